//! Compile-fail and compile-pass tests of `deployment!` (trybuild).
//!
//! Every error of DESIGN.md §2 has a case under `tests/ui/fail/<family>/`, with the compiler's
//! output in the `.stderr` next to it; `tests/ui/pass/` holds inputs that must compile and run.
//! Regenerate the `.stderr` files with `TRYBUILD=overwrite cargo test --test it macro_ui`, then
//! read them: each caret must sit on the offending token.
//!
//! trybuild builds the cases in its own crate under `target/tests/trybuild/p2f/`, so that is the
//! `CARGO_MANIFEST_DIR` the macro resolves strategy files against there: the `files/` cases show
//! it as `$DIR/target/tests/trybuild/p2f/..` (trybuild turns the workspace path into `$DIR`), and
//! reach `tests/ui/fixtures/` through `../../../../`. Both assume the default target directory;
//! with `CARGO_TARGET_DIR` set elsewhere those `.stderr` files differ. Strategies that embed
//! files are compiled for real in `macro_expand`, where the manifest directory is the workspace.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/fail/**/*.rs");
    t.pass("tests/ui/pass/*.rs");
}
