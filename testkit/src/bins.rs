//! The binaries tests run that cargo does not build for a test target by itself: `p2f` (from
//! the `p2f-cli` package) and this workspace's examples.
//!
//! They are built once per test process with the profile the running test executable was built
//! with, into its target directory, and looked up there: one place decides both. A test built
//! by `cargo test` lies in `TARGET/debug/deps/`, so `p2f` is built with the `dev` profile into
//! `TARGET/debug/`; under `cargo test --release` both are `release`; a custom profile `NAME`
//! uses `TARGET/NAME/`. (Cross-compiled test runs, `TARGET/TRIPLE/PROFILE/`, are not handled.)

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context as _, Result, anyhow, ensure};

/// Where the running test executable was built.
#[derive(Debug)]
struct Profile {
    /// `TARGET`.
    target_dir: PathBuf,
    /// `TARGET/debug`, `TARGET/release`, ...
    dir: PathBuf,
    /// The cargo profile that builds into `dir`.
    name: String,
}

fn profile() -> Result<&'static Profile> {
    static PROFILE: OnceLock<Result<Profile, String>> = OnceLock::new();
    PROFILE
        .get_or_init(|| find_profile().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

fn find_profile() -> Result<Profile> {
    let exe = std::env::current_exe().context("the test executable's path")?;
    // TARGET/PROFILE/deps/NAME-HASH, or TARGET/PROFILE/examples/NAME
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .with_context(|| format!("{} is not in TARGET/PROFILE/deps", exe.display()))?
        .to_owned();
    let target_dir = dir.parent().context("the target directory")?.to_owned();
    let dir_name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .context("the profile directory's name")?;
    let name = match dir_name {
        "debug" => "dev".to_owned(),
        other => other.to_owned(),
    };
    Ok(Profile {
        target_dir,
        dir,
        name,
    })
}

/// Variables cargo sets for the test executable it runs, which describe the test's package, not
/// the build: passed on to the nested cargo, some of them (`CARGO_MANIFEST_DIR`, which `ring`'s
/// build script watches) would make it rebuild what the test build just built, and the next
/// plain `cargo build` rebuild it again.
fn set_for_the_test(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || name.starts_with("CARGO_BIN_EXE_")
        || matches!(
            name,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
                | "CARGO_RUSTC_CURRENT_DIR"
                | "OUT_DIR"
        )
}

/// `cargo build --quiet --profile PROFILE ARGS` into the running test's target directory.
fn cargo_build(profile: &Profile, args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(&cargo);
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(set_for_the_test) {
            command.env_remove(&name);
        }
    }
    let status = command
        .args(["build", "--quiet", "--profile", &profile.name])
        .args(args)
        .env("CARGO_TARGET_DIR", &profile.target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .with_context(|| format!("run {cargo} build"))?;
    ensure!(
        status.success(),
        "cargo build --profile {} {} failed",
        profile.name,
        args.join(" ")
    );
    Ok(())
}

/// Builds once per process; the outcome is kept (an error too).
fn once(cell: &'static OnceLock<Result<(), String>>, args: &[&str]) -> Result<&'static Profile> {
    let profile = profile()?;
    cell.get_or_init(|| cargo_build(profile, args).map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("{e}"))?;
    Ok(profile)
}

/// The `p2f` binary, built once per test process. Call it before any thread enters a network
/// namespace: cargo then runs where the test runs.
pub fn p2f_bin() -> Result<PathBuf> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let profile = once(&BUILT, &["-p", "p2f-cli", "--bin", "p2f"])?;
    Ok(profile.dir.join("p2f"))
}

/// An example of the `p2f` package (`examples/NAME.rs`), all of them built once per test process.
pub fn example_bin(name: &str) -> Result<PathBuf> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let profile = once(&BUILT, &["-p", "p2f", "--examples"])?;
    Ok(profile.dir.join("examples").join(name))
}
