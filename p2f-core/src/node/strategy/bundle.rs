//! A placement's bundle directory on disk: unpacked by the agent into a fresh directory nobody
//! else can reach, then (for a process with a `user`) handed over to that user without ever
//! following a link or a path component someone else could have changed.
//!
//! The layout under the bundles directory (`DATA/bundles`), owners and modes once deployed:
//!
//! ```text
//! DATA/bundles/                  agent (root)  0711  traversable, not listable
//!   .staging/                    agent         0700  unpacks in progress
//!     <id>.g<N>.<random>/        agent         0700  one unpack (or what a crash left of it)
//!   <id>/                        agent         0711
//!     g<N>/                      user          0700  the bundle: the agent's while it is unpacked
//!                                                    and deployed, the user's once handed over
//!                                                    (the agent's for a process without `user`)
//!       <files>                  user          0644, or 0755 for `#!` files (subdirectories
//!                                                    0755); modes are kept by the hand-over
//!     g<N>.deployed              agent         0644  the deploy step's marker
//! ```
//!
//! The user needs only to traverse `bundles/` and `<id>/` to reach its own `g<N>`; nobody but
//! the agent and that user can read a bundle (bundles hold configuration with passwords).

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Write as _};
use std::os::fd::{AsFd, AsRawFd as _, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::{Gid, Uid};
use p2f_model::{Process, normalize_bundle_path};

/// The mode of the bundles directory and of each process's directory in it: its users must
/// pass through to their own bundle, nobody may list them.
const TRAVERSE: u32 = 0o711;
/// The mode of a bundle directory, and of the staging directory.
const PRIVATE: u32 = 0o700;
/// The mode of directories inside a bundle (the bundle directory itself keeps others out).
const SUBDIR: u32 = 0o755;
/// Where bundles are unpacked before they are moved into place (a process id never starts with
/// a dot, so it cannot clash with one).
const STAGING: &str = ".staging";
/// How many fresh names are tried before giving up (each has 64 random bits: a clash means
/// someone else is creating directories with our names).
const FRESH_ATTEMPTS: usize = 8;
/// The deepest directory a hand-over descends into (it holds one descriptor per level).
pub(crate) const MAX_DEPTH: usize = 64;
/// The most entries a hand-over walks through.
pub(crate) const MAX_ENTRIES: usize = 1_000_000;

/// Unpacks `process`'s bundle into `root/<id>/g<generation>` and returns that path.
///
/// The files are written into a fresh directory (`mkdtemp`-style, 0700) under the agent's
/// private staging directory, each created exclusively relative to its directory's descriptor
/// (`O_CREAT | O_EXCL | O_NOFOLLOW`), and the finished directory is renamed into place: `g<N>`
/// either does not exist or is complete, and belongs to the agent with mode 0700.
///
/// A `g<N>` already there is an unfinished earlier attempt (a finished deploy leaves a marker,
/// and then nothing is unpacked): when it is a directory of the agent's it is removed (without
/// following anything in it); anything else (a symbolic link, a file, a directory of another
/// user) is refused, never unpacked through or removed. Files whose paths repeat: the last one
/// wins.
pub(crate) fn unpack(root: &Path, process: &Process) -> io::Result<PathBuf> {
    let me = nix::unistd::geteuid();
    let id = process.id.as_str();
    let generation = format!("g{}", process.generation);
    let target = root.join(id).join(&generation);
    let bundles = open_root(root, me)?;
    let parent = own_subdir(bundles.as_fd(), id, TRAVERSE, me)
        .map_err(|e| context(e, root.join(id).display()))?;
    let staging = own_subdir(bundles.as_fd(), STAGING, PRIVATE, me)
        .map_err(|e| context(e, root.join(STAGING).display()))?;
    let staging_path = root.join(STAGING);
    let prefix = format!("{id}.{generation}.");
    clear_leftovers(&staging_path, &prefix);
    let (name, fresh) = fresh_dir(staging.as_fd(), &prefix).map_err(|e| {
        context(
            e,
            format!("cannot make a directory in {}", staging_path.display()),
        )
    })?;
    let done = fill(fresh.as_fd(), process)
        .and_then(|()| clear_target(parent.as_fd(), &generation, &target, me))
        .and_then(|()| {
            nix::fcntl::renameat(staging.as_fd(), name.as_str(), parent.as_fd(), &*generation)
                .map_err(|e| context(e, format!("cannot move the bundle to {}", target.display())))
        });
    if let Err(e) = done {
        let _ = std::fs::remove_dir_all(staging_path.join(&name));
        return Err(e);
    }
    Ok(target)
}

/// After the deploy step (which runs as the agent's user in `dir`, and may have changed its
/// mode or owner, as a playbook setting up its files may): checks that `dir` is still a
/// directory, not a link, and makes it the agent's and 0700 again until it is handed over.
pub(crate) fn seal(dir: &Path) -> io::Result<()> {
    let fd = nix::fcntl::open(dir, dir_flags(), Mode::empty())
        .map_err(|e| context(not_a_directory(e), dir.display()))?;
    let stat = nix::sys::stat::fstat(&fd).map_err(|e| context(e, dir.display()))?;
    let (me, my_group) = (nix::unistd::geteuid(), nix::unistd::getegid());
    if (stat.st_uid, stat.st_gid) != (me.as_raw(), my_group.as_raw()) {
        tracing::warn!(
            "the deploy step gave {} to {}:{}; taken back until it is handed over",
            dir.display(),
            stat.st_uid,
            stat.st_gid
        );
        nix::unistd::fchown(&fd, Some(me), Some(my_group))
            .map_err(|e| context(e, dir.display()))?;
    }
    // A chown may have cleared bits: the mode is set after it.
    nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(PRIVATE))
        .map_err(|e| context(e, dir.display()))
}

/// What a hand-over did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct HandedOver {
    /// The entries walked through (the top directory not counted).
    pub(crate) entries: usize,
    /// Entries left to their owner (paths relative to the top directory): files with more
    /// than one hard link (they are shared with something else, possibly outside, which a
    /// chown would give away too), device nodes (a chown would give the device), and the
    /// directories where another filesystem is mounted (not entered).
    pub(crate) kept: Vec<PathBuf>,
}

/// Gives `dir` and everything in it to `uid`:`gid`, without following any symbolic link and
/// without resolving any path below `dir` by name twice: the walk holds a descriptor for each
/// directory it is in, opens each entry relative to it (`O_PATH | O_NOFOLLOW`) and changes the
/// owner of what it opened (`fchownat(fd, "", AT_EMPTY_PATH)`, `fchown`). It goes bottom-up
/// and gives `dir` itself away last, made 0700 first, so the user reaches nothing inside
/// before all of it is handed over. Symbolic links are chowned as links (`lchown`); see
/// [`HandedOver::kept`] for what is left alone. Modes inside are kept.
///
/// An entry that disappears during the walk is skipped; one that is replaced is taken as what
/// the walk opened. Fails, with `dir` still not given away, beyond [`MAX_DEPTH`] levels or
/// [`MAX_ENTRIES`] entries.
pub(crate) fn hand_over(dir: &Path, uid: Uid, gid: Gid) -> io::Result<HandedOver> {
    let top = nix::fcntl::open(dir, dir_flags(), Mode::empty())
        .map_err(|e| context(not_a_directory(e), dir.display()))?;
    let top_stat = nix::sys::stat::fstat(&top).map_err(|e| context(e, dir.display()))?;
    let mut done = HandedOver::default();
    let names = list(top.as_fd(), &mut done.entries).map_err(|e| context(e, dir.display()))?;
    let mut stack = vec![Frame {
        dir: top,
        names,
        path: PathBuf::new(),
    }];
    let at = |path: &Path| dir.join(path).display().to_string();
    while let Some(frame) = stack.last_mut() {
        let next = frame.names.pop().map(|name| {
            let path = frame.path.join(&name);
            let opened = nix::fcntl::openat(
                frame.dir.as_fd(),
                name.as_os_str(),
                OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            );
            (path, opened)
        });
        let Some((path, opened)) = next else {
            // Everything in this directory is handed over: now the directory.
            let Some(finished) = stack.pop() else { break };
            if stack.is_empty() {
                let stat =
                    nix::sys::stat::fstat(&finished.dir).map_err(|e| context(e, dir.display()))?;
                set_mode(finished.dir.as_fd(), &stat, PRIVATE)
                    .map_err(|e| context(e, dir.display()))?;
            }
            nix::unistd::fchown(&finished.dir, Some(uid), Some(gid))
                .map_err(|e| context(e, at(&finished.path)))?;
            continue;
        };
        let fd = match opened {
            Ok(fd) => fd,
            // Gone since the directory was listed.
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(context(e, at(&path))),
        };
        let stat = nix::sys::stat::fstat(&fd).map_err(|e| context(e, at(&path)))?;
        match kind(&stat) {
            SFlag::S_IFDIR if stat.st_dev != top_stat.st_dev => done.kept.push(path),
            SFlag::S_IFDIR => {
                if stack.len() >= MAX_DEPTH {
                    return Err(io::Error::other(format!(
                        "{}: deeper than {MAX_DEPTH} levels, not handed over",
                        at(&path)
                    )));
                }
                // The directory the O_PATH descriptor names, whatever is at its name now.
                let sub = nix::fcntl::openat(fd.as_fd(), ".", dir_flags(), Mode::empty())
                    .map_err(|e| context(e, at(&path)))?;
                let names =
                    list(sub.as_fd(), &mut done.entries).map_err(|e| context(e, at(&path)))?;
                stack.push(Frame {
                    dir: sub,
                    names,
                    path,
                });
            }
            SFlag::S_IFBLK | SFlag::S_IFCHR => done.kept.push(path),
            _ if stat.st_nlink > 1 => done.kept.push(path),
            _ => nix::unistd::fchownat(
                fd.as_fd(),
                "",
                Some(uid),
                Some(gid),
                AtFlags::AT_EMPTY_PATH | AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|e| context(e, at(&path)))?,
        }
    }
    Ok(done)
}

/// A directory the hand-over is in: its descriptor, the names not handled yet, its path
/// relative to the top (for messages only: nothing is opened by path).
struct Frame {
    dir: OwnedFd,
    names: Vec<OsString>,
    path: PathBuf,
}

/// The names in the directory `dir` (not `.` and `..`), counted into `entries`, which may not
/// pass [`MAX_ENTRIES`]. Read through `/proc/self/fd`, which names the very directory the
/// descriptor holds, whatever happened to its path.
fn list(dir: BorrowedFd<'_>, entries: &mut usize) -> io::Result<Vec<OsString>> {
    let through = format!("/proc/self/fd/{}", dir.as_raw_fd());
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&through)
        .map_err(|e| context(e, format!("cannot list the directory (through {through})")))?
    {
        *entries += 1;
        if *entries > MAX_ENTRIES {
            return Err(io::Error::other(format!(
                "more than {MAX_ENTRIES} entries, not handed over"
            )));
        }
        names.push(entry?.file_name());
    }
    Ok(names)
}

/// The type bits of `stat`.
fn kind(stat: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits())
}

/// How directories are opened: for reading, only a directory.
fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

/// Sets the permission bits of `fd` to `mode` unless they already are.
fn set_mode(fd: BorrowedFd<'_>, stat: &FileStat, mode: u32) -> io::Result<()> {
    if stat.st_mode & 0o7777 != mode {
        nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(mode))?;
    }
    Ok(())
}

/// Opens the bundles directory, making it (0711) if it is missing; it must belong to `me`.
/// Its own path is the agent's configuration, so a link in it is followed.
fn open_root(root: &Path, me: Uid) -> io::Result<OwnedFd> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(TRAVERSE)
        .create(root)
        .map_err(|e| context(e, format!("cannot create {}", root.display())))?;
    let fd = nix::fcntl::open(
        root,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| context(e, root.display()))?;
    check_own(fd.as_fd(), me, TRAVERSE).map_err(|e| context(e, root.display()))?;
    Ok(fd)
}

/// Opens the directory `name` in `parent`, making it with `mode` if it is missing: never
/// through a symbolic link, and only a directory of `me`'s, whose mode becomes `mode`.
fn own_subdir(parent: BorrowedFd<'_>, name: &str, mode: u32, me: Uid) -> io::Result<OwnedFd> {
    match nix::sys::stat::mkdirat(parent, name, Mode::from_bits_truncate(mode)) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(e.into()),
    }
    let fd =
        nix::fcntl::openat(parent, name, dir_flags(), Mode::empty()).map_err(not_a_directory)?;
    check_own(fd.as_fd(), me, mode)?;
    Ok(fd)
}

/// Fails unless `fd` belongs to `me`; then sets its mode to `mode`.
fn check_own(fd: BorrowedFd<'_>, me: Uid, mode: u32) -> io::Result<()> {
    let stat = nix::sys::stat::fstat(fd)?;
    if stat.st_uid != me.as_raw() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "owned by uid {}, not by the agent's user (uid {me}): refusing to use it",
                stat.st_uid
            ),
        ));
    }
    set_mode(fd, &stat, mode)
}

/// `ELOOP` and `ENOTDIR` from opening a directory with `O_NOFOLLOW`, said plainly.
fn not_a_directory(e: Errno) -> io::Error {
    match e {
        Errno::ELOOP | Errno::ENOTDIR => io::Error::new(
            io::ErrorKind::NotADirectory,
            "a symbolic link or not a directory: refusing to use it",
        ),
        e => e.into(),
    }
}

/// Removes what earlier unpacks of the same placement left in the staging directory (a crash
/// in the middle of one). Best effort: the staging directory is the agent's alone.
fn clear_leftovers(staging: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(staging) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            let path = entry.path();
            let removed = match entry.file_type() {
                Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
                _ => std::fs::remove_file(&path),
            };
            if let Err(e) = removed {
                tracing::warn!("cannot remove {}: {e}", path.display());
            }
        }
    }
}

/// Makes a fresh directory `<prefix><random>` (0700) in `staging` and opens it.
fn fresh_dir(staging: BorrowedFd<'_>, prefix: &str) -> io::Result<(String, OwnedFd)> {
    for _ in 0..FRESH_ATTEMPTS {
        let name = format!("{prefix}{:016x}", rand::random::<u64>());
        match nix::sys::stat::mkdirat(staging, name.as_str(), Mode::from_bits_truncate(PRIVATE)) {
            Ok(()) => {}
            Err(Errno::EEXIST) => continue,
            Err(e) => return Err(e.into()),
        }
        let fd = nix::fcntl::openat(staging, name.as_str(), dir_flags(), Mode::empty())?;
        // Exactly 0700, whatever the umask.
        nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(PRIVATE))?;
        return Ok((name, fd));
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "every fresh name tried was taken",
    ))
}

/// Writes `process`'s bundle files into the fresh directory `dir`: paths normalized (so none
/// leaves it), every file and directory created new (a name that is there already fails),
/// files that start with `#!` executable.
fn fill(dir: BorrowedFd<'_>, process: &Process) -> io::Result<()> {
    // The last file of a path wins, as when each file overwrote the one before.
    let files: BTreeMap<String, &[u8]> = process
        .spec
        .bundle()
        .files()
        .iter()
        .map(|file| (normalize_bundle_path(file.path()), file.contents()))
        .filter(|(path, _)| !path.is_empty())
        .collect();
    for (path, contents) in files {
        write_file(dir, &path, contents).map_err(|e| context(e, format!("bundle file {path}")))?;
    }
    Ok(())
}

/// Writes one file at the normalized `path` below `dir`, making its directories.
fn write_file(dir: BorrowedFd<'_>, path: &str, contents: &[u8]) -> io::Result<()> {
    let parts: Vec<&str> = path.split('/').collect();
    let Some((name, dirs)) = parts.split_last() else {
        return Ok(());
    };
    let mut current: Option<OwnedFd> = None;
    for part in dirs {
        let base = current.as_ref().map_or(dir, |fd| fd.as_fd());
        let sub = match nix::sys::stat::mkdirat(base, *part, Mode::from_bits_truncate(SUBDIR)) {
            Ok(()) => {
                let sub = nix::fcntl::openat(base, *part, dir_flags(), Mode::empty())?;
                nix::sys::stat::fchmod(&sub, Mode::from_bits_truncate(SUBDIR))?;
                sub
            }
            // Made for an earlier file (the directory is fresh: nothing else is in it).
            Err(Errno::EEXIST) => nix::fcntl::openat(base, *part, dir_flags(), Mode::empty())
                .map_err(|e| context(not_a_directory(e), format!("{part} (also a file)")))?,
            Err(e) => return Err(e.into()),
        };
        current = Some(sub);
    }
    let base = current.as_ref().map_or(dir, |fd| fd.as_fd());
    let mode = if contents.starts_with(b"#!") {
        0o755
    } else {
        0o644
    };
    let fd = nix::fcntl::openat(
        base,
        OsStr::new(name),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(mode),
    )?;
    let mut file = File::from(fd);
    // Exactly `mode`, whatever the umask.
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    file.write_all(contents)
}

/// Makes room for the bundle at `generation` in `parent` (`target` is its path, for messages):
/// nothing there is fine; a directory of `me`'s (an unfinished earlier attempt) is removed,
/// without following anything in it; anything else is refused.
fn clear_target(
    parent: BorrowedFd<'_>,
    generation: &str,
    target: &Path,
    me: Uid,
) -> io::Result<()> {
    let stat = match nix::sys::stat::fstatat(parent, generation, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(stat) => stat,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(context(e, target.display())),
    };
    let what = match kind(&stat) {
        SFlag::S_IFDIR if stat.st_uid == me.as_raw() => None,
        SFlag::S_IFDIR => Some(format!("a directory of uid {}", stat.st_uid)),
        SFlag::S_IFLNK => Some("a symbolic link".to_owned()),
        _ => Some("not a directory".to_owned()),
    };
    if let Some(what) = what {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} is already there and is {what}, which the agent did not make: not \
                 unpacking through it (remove it to deploy)",
                target.display()
            ),
        ));
    }
    // `remove_dir_all` never follows a symbolic link, even one swapped in meanwhile (and
    // nobody but the agent can write in `parent`).
    std::fs::remove_dir_all(target).map_err(|e| {
        context(
            e,
            format!("cannot remove the unfinished earlier {}", target.display()),
        )
    })
}

/// `e` with `what` in front.
fn context(e: impl Into<io::Error>, what: impl std::fmt::Display) -> io::Error {
    let e = e.into();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use p2f_model::{
        Bundle, BundleFile, NodeName, NodeRef, ProcessId, ProcessSpec, Strategy, Timestamp,
    };

    use super::*;

    fn process(bundle: Vec<BundleFile>) -> Process {
        let node = NodeRef {
            name: NodeName::from_static("n1"),
            address: "127.0.0.1".into(),
        };
        let spec = ProcessSpec::new("web", "true").with_bundle(Bundle::owned(bundle));
        Process::placed(
            ProcessId::for_service("web", 1),
            3,
            spec,
            node,
            Timestamp(0),
        )
    }

    /// Who a hand-over gives to in these tests: a uid and gid nobody has when the tests run
    /// as root, else (a chown to another user being refused) the test's own.
    fn someone() -> (Uid, Gid) {
        if nix::unistd::geteuid().is_root() {
            (Uid::from_raw(12345), Gid::from_raw(12345))
        } else {
            (nix::unistd::geteuid(), nix::unistd::getegid())
        }
    }

    fn meta(path: &Path) -> std::fs::Metadata {
        std::fs::symlink_metadata(path).expect("lstat")
    }

    /// Owner, group and change time: what a chown that reached `path` would change.
    fn fingerprint(path: &Path) -> (u32, u32, i64, i64) {
        let m = meta(path);
        (m.uid(), m.gid(), m.ctime(), m.ctime_nsec())
    }

    fn mode(path: &Path) -> u32 {
        meta(path).mode() & 0o7777
    }

    /// A service user racing the hand-over swaps `sub` between its directory and a symbolic
    /// link to a directory outside (atomically, `RENAME_EXCHANGE`): nothing outside is ever
    /// chowned, however the walk and the swaps interleave.
    #[test]
    fn chown_tree_never_leaves_the_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let tree = tmp.path().join("tree");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(tree.join("sub")).expect("mkdir");
        std::fs::write(tree.join("sub/file"), "inside").expect("write");
        std::fs::create_dir(&outside).expect("mkdir");
        std::fs::write(outside.join("file"), "secret").expect("write");
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&outside, &link).expect("symlink");
        let before = [fingerprint(&outside), fingerprint(&outside.join("file"))];

        let stop = Arc::new(AtomicBool::new(false));
        let swaps = Arc::new(AtomicUsize::new(0));
        let swapper = {
            let (stop, swaps, sub) = (stop.clone(), swaps.clone(), tree.join("sub"));
            let spare = tmp.path().join("spare");
            std::thread::spawn(move || {
                let give_up = Instant::now() + Duration::from_secs(10);
                while !stop.load(Ordering::Relaxed) && Instant::now() < give_up {
                    let exchanged = nix::fcntl::renameat2(
                        nix::fcntl::AT_FDCWD,
                        &sub,
                        nix::fcntl::AT_FDCWD,
                        &link,
                        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
                    );
                    if exchanged == Err(Errno::EINVAL) {
                        // A filesystem without RENAME_EXCHANGE: through a third name.
                        std::fs::rename(&sub, &spare).expect("rename");
                        std::fs::rename(&link, &sub).expect("rename");
                        std::fs::rename(&spare, &link).expect("rename");
                    } else {
                        exchanged.expect("exchange");
                    }
                    swaps.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let (uid, gid) = someone();
        let (mut runs, mut handed) = (0, 0);
        let until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < until {
            runs += 1;
            if hand_over(&tree, uid, gid).is_ok() {
                handed += 1;
                assert_eq!(meta(&tree).uid(), uid.as_raw());
            }
        }
        stop.store(true, Ordering::Relaxed);
        swapper.join().expect("swapper");

        let after = [fingerprint(&outside), fingerprint(&outside.join("file"))];
        assert_eq!(before, after, "something outside was chowned");
        assert!(
            swaps.load(Ordering::Relaxed) > 100,
            "the swapper hardly ran"
        );
        assert!(handed > 10, "{handed} of {runs} hand-overs succeeded");
        assert_eq!(mode(&tree), 0o700);
    }

    /// A file with another hard link (here outside the tree) is not chowned: that would give
    /// away the other name's file too. Symbolic links are chowned as links, their targets
    /// untouched.
    #[test]
    fn shared_files_stay_and_links_are_not_followed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let tree = tmp.path().join("tree");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(tree.join("dir")).expect("mkdir");
        std::fs::create_dir(&outside).expect("mkdir");
        std::fs::write(tree.join("dir/own"), "mine").expect("write");
        std::fs::write(outside.join("shadow"), "secret").expect("write");
        std::fs::hard_link(outside.join("shadow"), tree.join("linked")).expect("link");
        std::os::unix::fs::symlink(outside.join("shadow"), tree.join("dir/to-shadow"))
            .expect("symlink");
        std::os::unix::fs::symlink(&outside, tree.join("to-outside")).expect("symlink");
        assert_eq!(meta(&tree.join("linked")).nlink(), 2);
        let before = [fingerprint(&outside), fingerprint(&outside.join("shadow"))];

        let (uid, gid) = someone();
        let done = hand_over(&tree, uid, gid).expect("hand over");

        assert_eq!(done.kept, vec![PathBuf::from("linked")]);
        assert_eq!(done.entries, 5);
        let after = [fingerprint(&outside), fingerprint(&outside.join("shadow"))];
        assert_eq!(before, after);
        for given in ["", "dir", "dir/own", "dir/to-shadow", "to-outside"] {
            let m = meta(&tree.join(given));
            assert_eq!((m.uid(), m.gid()), (uid.as_raw(), gid.as_raw()), "{given}");
        }
        assert!(meta(&tree.join("to-outside")).file_type().is_symlink());
    }

    /// Too deep a tree is refused, and its top is not given away.
    #[test]
    fn hand_over_is_bounded() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let tree = tmp.path().join("tree");
        let mut deep = tree.clone();
        for _ in 0..MAX_DEPTH + 1 {
            deep.push("d");
        }
        std::fs::create_dir_all(&deep).expect("mkdir");
        let owner = meta(&tree).uid();
        let (uid, gid) = someone();
        let e = hand_over(&tree, uid, gid).expect_err("too deep");
        assert!(e.to_string().contains("deeper than"), "{e}");
        assert_eq!(meta(&tree).uid(), owner);
        let e = hand_over(&tmp.path().join("missing"), uid, gid).expect_err("missing");
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
    }

    /// `g<N>` is made fresh, private and the agent's; its parents are only traversable; the
    /// files keep their modes, and after the hand-over others still cannot read it.
    #[test]
    fn bundles_are_private_to_their_user() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("bundles");
        let p = process(vec![
            BundleFile::owned("run.sh", b"#!/bin/sh\necho hi\n".to_vec()),
            BundleFile::owned("conf/app.conf", b"password=old\n".to_vec()),
            BundleFile::owned("./conf//app.conf", b"password=hunter2\n".to_vec()),
            BundleFile::owned("../up.txt", b"up\n".to_vec()),
        ]);
        let dir = unpack(&root, &p).expect("unpack");
        assert_eq!(dir, root.join(p.id.as_str()).join("g3"));
        assert_eq!(dir, super::super::bundle_dir(&root, &p));
        let me = nix::unistd::geteuid().as_raw();
        assert_eq!((mode(&root), meta(&root).uid()), (0o711, me));
        assert_eq!(mode(&root.join(p.id.as_str())), 0o711);
        assert_eq!(mode(&root.join(STAGING)), 0o700);
        assert_eq!((mode(&dir), meta(&dir).uid()), (0o700, me));
        assert_eq!(mode(&dir.join("run.sh")), 0o755);
        assert_eq!(mode(&dir.join("conf")), 0o755);
        assert_eq!(mode(&dir.join("conf/app.conf")), 0o644);
        assert_eq!(
            std::fs::read_to_string(dir.join("conf/app.conf")).expect("read"),
            "password=hunter2\n",
            "the last file of a path wins"
        );
        assert!(dir.join("_parent/up.txt").is_file());
        let staged: Vec<_> = std::fs::read_dir(root.join(STAGING))
            .expect("staging")
            .collect();
        assert!(staged.is_empty(), "{staged:?}");

        let (uid, gid) = someone();
        hand_over(&dir, uid, gid).expect("hand over");
        assert_eq!((mode(&dir), meta(&dir).uid()), (0o700, uid.as_raw()));
        assert_eq!(meta(&dir).mode() & 0o077, 0, "others can reach the bundle");
        assert_eq!(mode(&dir.join("run.sh")), 0o755);
        assert_eq!(mode(&dir.join("conf/app.conf")), 0o644);
        assert_eq!(meta(&dir.join("conf/app.conf")).uid(), uid.as_raw());
        assert_eq!(mode(&root.join(p.id.as_str())), 0o711);
    }

    /// A `g<N>` that is a symbolic link, or a directory someone else owns (with a link to a
    /// file outside in it), is refused: nothing is written through it.
    #[test]
    fn unpack_refuses_a_symlinked_target() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("bundles");
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        std::fs::write(outside.join("file"), "secret").expect("write");
        let p = process(vec![BundleFile::owned("run.sh", b"#!/bin/sh\n".to_vec())]);
        let target = super::super::bundle_dir(&root, &p);
        std::fs::create_dir_all(root.join(p.id.as_str())).expect("mkdir");
        std::os::unix::fs::symlink(&outside, &target).expect("symlink");
        let before = [fingerprint(&outside), fingerprint(&outside.join("file"))];

        let e = unpack(&root, &p).expect_err("a symlinked target");
        assert!(e.to_string().contains("a symbolic link"), "{e}");
        assert!(meta(&target).file_type().is_symlink());
        let listed: Vec<_> = std::fs::read_dir(&outside).expect("ls").collect();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            [fingerprint(&outside), fingerprint(&outside.join("file"))],
            before
        );
        assert_eq!(
            std::fs::read(outside.join("file")).expect("read"),
            b"secret"
        );
        let staged: Vec<_> = std::fs::read_dir(root.join(STAGING))
            .expect("staging")
            .collect();
        assert!(staged.is_empty(), "{staged:?}");

        if !nix::unistd::geteuid().is_root() {
            return;
        }
        // A directory of another user, with `run.sh` a link to the outside file.
        std::fs::remove_file(&target).expect("rm");
        std::fs::create_dir(&target).expect("mkdir");
        std::os::unix::fs::symlink(outside.join("file"), target.join("run.sh")).expect("ln");
        let (uid, gid) = someone();
        std::os::unix::fs::lchown(&target, Some(uid.as_raw()), Some(gid.as_raw())).expect("chown");
        let before = [fingerprint(&outside), fingerprint(&outside.join("file"))];
        let e = unpack(&root, &p).expect_err("another user's target");
        assert!(e.to_string().contains("a directory of uid 12345"), "{e}");
        assert!(meta(&target.join("run.sh")).file_type().is_symlink());
        assert_eq!(
            [fingerprint(&outside), fingerprint(&outside.join("file"))],
            before
        );
        assert_eq!(
            std::fs::read(outside.join("file")).expect("read"),
            b"secret"
        );
    }

    /// What an unfinished earlier attempt left (the agent's own directory) is replaced whole;
    /// a parent directory that is a link is refused.
    #[test]
    fn unpack_replaces_an_unfinished_attempt() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("bundles");
        let p = process(vec![BundleFile::owned("app.conf", b"new\n".to_vec())]);
        let target = super::super::bundle_dir(&root, &p);
        std::fs::create_dir_all(target.join("sub")).expect("mkdir");
        std::fs::write(target.join("stale"), "left over").expect("write");
        std::fs::write(target.join("app.conf"), "old\n").expect("write");
        // A crash in the middle of an earlier unpack of the same placement left this.
        let crashed = root.join(STAGING).join(format!("{}.g3.0123", p.id));
        std::fs::create_dir_all(&crashed).expect("mkdir");

        let dir = unpack(&root, &p).expect("unpack");
        assert!(!dir.join("stale").exists());
        assert!(!dir.join("sub").exists());
        assert_eq!(std::fs::read(dir.join("app.conf")).expect("read"), b"new\n");
        assert!(!crashed.exists());

        let other = tmp.path().join("elsewhere");
        std::fs::create_dir(&other).expect("mkdir");
        let q = process(vec![]);
        let q = Process::placed(
            ProcessId::new("linked-1").expect("id"),
            1,
            q.spec,
            q.node,
            Timestamp(0),
        );
        std::os::unix::fs::symlink(&other, root.join("linked-1")).expect("symlink");
        let e = unpack(&root, &q).expect_err("a linked parent");
        assert!(e.to_string().contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read_dir(&other).expect("ls").count(), 0);
    }

    /// A deploy step (run as root in the bundle directory) cannot leave it open to others, nor
    /// give it away before the hand-over.
    #[tokio::test]
    async fn a_deploy_step_cannot_open_up_the_bundle() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("bundles");
        let mut p = process(vec![BundleFile::owned("app.conf", b"x\n".to_vec())]);
        let give = if nix::unistd::geteuid().is_root() {
            "chown 12345:12345 . && "
        } else {
            ""
        };
        let step = format!("{give}chmod 755 . && echo made > step.txt");
        p.spec = p.spec.with_strategy(Strategy::Custom(step.into()));
        let log = File::create(tmp.path().join("log")).expect("log");
        let options = super::super::DeployOptions {
            timeout: Duration::from_secs(30),
            ..Default::default()
        };
        let prepared = super::super::deploy(&root, &p, &log, &options)
            .await
            .expect("deploy");
        let dir = &prepared.bundle_dir;
        assert_eq!(dir, &super::super::bundle_dir(&root, &p));
        assert_eq!(mode(dir), 0o700);
        assert_eq!(meta(dir).uid(), nix::unistd::geteuid().as_raw());
        assert_eq!(meta(dir).gid(), nix::unistd::getegid().as_raw());
        assert!(dir.join("step.txt").is_file());
        assert_eq!(super::super::already_deployed(&root, &p), Some(prepared));
    }
}
