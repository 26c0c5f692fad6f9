//! Finding the files a strategy names. The only IO the macro does: paths are resolved against
//! the calling crate's `CARGO_MANIFEST_DIR`; the files are embedded with `include_bytes!`, so
//! editing one rebuilds the crate.

use std::path::{Path, PathBuf};

use p2f_model::{Strategy, is_local_nix_path, normalize_bundle_path};

/// A directory bundle larger than this many files is almost certainly a mistake (a `target/`
/// or `node_modules/` inside the flake); the walk stops there.
const MAX_FILES: usize = 2_000;

pub(crate) fn manifest_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from("."), PathBuf::from)
}

/// The files to embed for `strategy` as (bundle path, disk path), and where they were looked
/// for. Missing files are simply absent: the shared rule `MissingFile` reports them.
pub(crate) fn strategy_files(strategy: &Strategy) -> (Vec<(String, PathBuf)>, Option<PathBuf>) {
    match strategy {
        Strategy::Script(path) | Strategy::Ansible(path) => {
            let resolved = manifest_dir().join(&**path);
            let files = if resolved.is_file() {
                vec![(normalize_bundle_path(path), resolved.clone())]
            } else {
                Vec::new()
            };
            (files, Some(resolved))
        }
        Strategy::Nix(dir) if is_local_nix_path(dir) => {
            let resolved = manifest_dir().join(&**dir);
            let mut files = Vec::new();
            if resolved.is_dir() {
                walk(&resolved, &normalize_bundle_path(dir), &mut files);
            }
            (files, Some(resolved))
        }
        _ => (Vec::new(), None),
    }
}

/// Regular files under `dir`, sorted, skipping symlinks (Nix's `result` links into the store)
/// and `.git`.
fn walk(dir: &Path, prefix: &str, out: &mut Vec<(String, PathBuf)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        if out.len() >= MAX_FILES {
            return;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let inner = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        if kind.is_dir() && name != ".git" {
            walk(&entry.path(), &inner, out);
        } else if kind.is_file() {
            out.push((inner, entry.path()));
        }
    }
}
