//! Atomic file writes: a file is replaced whole or not at all, with exactly the mode asked for
//! (owner-only by default), and is on disk once the write returns.
//!
//! Meant for every file that holds a key, a secret or a token, and for files other programs
//! poll (such as the agent's `api.addr`): [`write_private`] for the first, [`write_atomic`] with
//! a mode for the rest.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use rand::Rng as _;

/// The mode of files only their owner may read and write: keys, secrets, tokens.
pub const PRIVATE: u32 = 0o600;

/// How many temporary names are tried before giving up (each is 64 random bits: a clash means
/// someone else is creating files with our names).
const TEMP_ATTEMPTS: usize = 4;

/// A file could not be written; `path` is always the file asked for, never the temporary file.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}: {source}", path.display())]
#[non_exhaustive]
pub struct WriteError {
    /// What failed: "create a temporary file for", "write", "replace" or "sync the directory of".
    pub action: &'static str,
    /// The file that was to be written.
    pub path: PathBuf,
    /// The underlying error.
    pub source: io::Error,
}

/// Writes `contents` to `path` with mode 0600, atomically: see [`write_atomic`].
pub fn write_private(path: &Path, contents: impl AsRef<[u8]>) -> Result<(), WriteError> {
    write_atomic(path, contents, PRIVATE)
}

/// Replaces `path` with a file holding `contents` and permission bits `mode`, so that readers
/// see the old file or the new one, never part of either, and a crash after the return cannot
/// lose it.
///
/// The contents go to a new temporary file in the same directory (created exclusively, never
/// through a symbolic link, and never wider than `mode` even for a moment); it is flushed to
/// disk, renamed over `path` and the directory is flushed too. The mode is set exactly, whatever
/// the umask and whatever mode an earlier file at `path` had; a symbolic link at `path` is
/// replaced, not followed. The new file belongs to the calling user. On error `path` is left as
/// it was and no temporary file remains.
pub fn write_atomic(path: &Path, contents: impl AsRef<[u8]>, mode: u32) -> Result<(), WriteError> {
    write_atomic_owned(path, contents, mode, None)
}

/// [`write_atomic`], and the new file belongs to `owner` (uid, gid) before it takes `path`'s
/// place (for a file kept in another user's home, such as `authorized_keys`, written as root).
pub fn write_atomic_owned(
    path: &Path,
    contents: impl AsRef<[u8]>,
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), WriteError> {
    let fail = |action, source| WriteError {
        action,
        path: path.to_owned(),
        source,
    };
    let Some(name) = path.file_name() else {
        let source = io::Error::new(io::ErrorKind::InvalidInput, "the path names no file");
        return Err(fail("write", source));
    };
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let (temp, file) =
        create_temp(dir, name, mode).map_err(|e| fail("create a temporary file for", e))?;
    let owned = match owner {
        Some((uid, gid)) => std::os::unix::fs::fchown(&file, Some(uid), Some(gid)),
        None => Ok(()),
    };
    if let Err(e) = owned.and_then(|()| fill(file, contents.as_ref(), mode)) {
        let _ = fs::remove_file(&temp);
        return Err(fail("write", e));
    }
    if let Err(e) = fs::rename(&temp, path) {
        let _ = fs::remove_file(&temp);
        return Err(fail("replace", e));
    }
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| fail("sync the directory of", e))
}

/// Creates `dir/.NAME.RANDOM.tmp` exclusively (`O_CREAT | O_EXCL`, which also refuses to follow
/// a symbolic link), with `mode` less the umask.
fn create_temp(dir: &Path, name: &OsStr, mode: u32) -> io::Result<(PathBuf, File)> {
    for _ in 0..TEMP_ATTEMPTS {
        let mut random = [0u8; 8];
        rand::rng().fill_bytes(&mut random);
        let mut temp_name = OsString::from(".");
        temp_name.push(name);
        temp_name.push(".");
        for byte in random {
            temp_name.push(format!("{byte:02x}"));
        }
        temp_name.push(".tmp");
        let temp = dir.join(temp_name);
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)
        {
            Ok(file) => return Ok((temp, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "every temporary name tried was taken",
    ))
}

/// Sets the exact mode (the umask may have removed bits), writes and flushes to disk.
fn fill(mut file: File, contents: &[u8], mode: u32) -> io::Result<()> {
    file.set_permissions(fs::Permissions::from_mode(mode))?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("metadata").permissions().mode() & 0o7777
    }

    /// The names in `dir`, sorted.
    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn replaces_a_wider_file_whole_and_makes_it_private() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("token");
        fs::write(&path, "a much longer old content that must not survive").expect("old");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).expect("chmod");

        write_private(&path, "new").expect("write");
        assert_eq!(fs::read_to_string(&path).expect("read"), "new");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(listing(dir.path()), ["token"], "a temporary file remained");

        write_private(&path, b"").expect("write empty");
        assert_eq!(fs::read(&path).expect("read"), b"");
    }

    #[test]
    fn sets_exactly_the_mode_asked_for() {
        let dir = tempfile::tempdir().expect("temp dir");
        for wanted in [0o600, 0o640, 0o644, 0o400] {
            let path = dir.path().join(format!("file-{wanted:o}"));
            write_atomic(&path, "x", wanted).expect("write");
            assert_eq!(mode(&path), wanted, "{}", path.display());
        }
    }

    #[test]
    fn replaces_a_symlink_instead_of_following_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let elsewhere = dir.path().join("elsewhere");
        fs::write(&elsewhere, "untouched").expect("elsewhere");
        let path = dir.path().join("key");
        std::os::unix::fs::symlink(&elsewhere, &path).expect("symlink");

        write_private(&path, "secret").expect("write");
        assert_eq!(fs::read_to_string(&elsewhere).expect("read"), "untouched");
        assert!(!fs::symlink_metadata(&path).expect("meta").is_symlink());
        assert_eq!(fs::read_to_string(&path).expect("read"), "secret");
    }

    #[test]
    fn errors_name_the_path_and_leave_nothing_behind() {
        let dir = tempfile::tempdir().expect("temp dir");

        // The directory does not exist.
        let missing = dir.path().join("nowhere").join("key");
        let err = write_private(&missing, "x").expect_err("no directory");
        assert_eq!(err.path, missing);
        assert_eq!(err.source.kind(), io::ErrorKind::NotFound);
        assert_eq!(
            err.to_string(),
            format!(
                "cannot create a temporary file for {}: {}",
                missing.display(),
                err.source
            )
        );

        // The rename fails: a non-empty directory stands where the file should go.
        let taken = dir.path().join("taken");
        fs::create_dir(&taken).expect("mkdir");
        fs::write(taken.join("inside"), "x").expect("inside");
        let err = write_private(&taken, "x").expect_err("a directory is in the way");
        assert_eq!((err.action, &err.path), ("replace", &taken));
        assert!(err.to_string().contains(&*taken.to_string_lossy()), "{err}");
        assert_eq!(listing(dir.path()), ["taken"], "a temporary file remained");

        // A path that names no file.
        let err = write_private(&dir.path().join(".."), "x").expect_err("no file name");
        assert_eq!(err.source.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("the path names no file"), "{err}");
    }
}
