//! Process logs: stdout and stderr of a process go through its log relay
//! ([`crate::node::relay`]) into one file per process, `ID.log`, which the relay rotates
//! between lines (`ID.log` → `ID.log.1` → ...) past `log_max_bytes`; its deploy step's output
//! is appended to the same file by the agent. The agent serves a file's tail and follows it
//! across rotations, so a follower sees every line once, whole.

use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use p2f_model::ProcessId;

/// How often a follower looks for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// The most a tail reads from the end of a file.
const TAIL_WINDOW: u64 = 1024 * 1024;

/// The log files of a node's processes.
#[derive(Debug, Clone)]
pub struct Logs {
    dir: PathBuf,
    keep: u32,
}

impl Logs {
    /// Logs under `dir`, keeping `keep` rotated files per process.
    pub fn new(dir: impl Into<PathBuf>, keep: u32) -> Logs {
        Logs {
            dir: dir.into(),
            keep,
        }
    }

    /// The current log file of a process.
    pub fn path(&self, id: &ProcessId) -> PathBuf {
        self.dir.join(format!("{id}.log"))
    }

    /// Where a process's relay writes how it ended.
    pub fn exit_path(&self, id: &ProcessId) -> PathBuf {
        self.dir.join(format!("{id}.exit"))
    }

    /// Opens the log file for appending (a deploy step's output; the relay's own messages),
    /// creating the directory. It is private to the agent (0700; output may hold secrets): a
    /// process writes through its relay, never by path.
    pub fn open_for_writing(&self, id: &ProcessId) -> io::Result<std::fs::File> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(self.path(id))
    }

    /// Deletes a process's log files.
    pub fn remove(&self, id: &ProcessId) {
        let path = self.path(id);
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(self.exit_path(id));
        for n in 1..=self.keep {
            let _ = std::fs::remove_file(format!("{}.{n}", path.display()));
        }
    }

    /// The last `lines` lines, then (with `follow`) every new byte as it is written, until the
    /// receiver goes away.
    pub fn stream(
        &self,
        id: &ProcessId,
        lines: usize,
        follow: bool,
    ) -> io::Result<impl Stream<Item = io::Result<Bytes>> + Send + 'static> {
        let path = self.path(id);
        let (head, file, offset) = tail_file(&path, lines)?;
        let state = Follow {
            path,
            file,
            offset,
            head: Some(head),
            follow,
        };
        Ok(futures_util::stream::unfold(state, Follow::next))
    }
}

/// A reader that follows a log file across its rotations: it reads through the file it has
/// open; once that has nothing new and the path names another file (the relay renamed it
/// away after its last write), it reads what is left of the old one, then follows the new
/// one from its start. A file emptied in place (`log_keep = 0`) is read again from its start.
struct Follow {
    path: PathBuf,
    /// The file being read and the offset reached in it.
    file: Option<std::fs::File>,
    offset: u64,
    head: Option<Vec<u8>>,
    follow: bool,
}

impl Follow {
    async fn next(mut self) -> Option<(io::Result<Bytes>, Follow)> {
        if let Some(head) = self.head.take()
            && !head.is_empty()
        {
            return Some((Ok(Bytes::from(head)), self));
        }
        if !self.follow {
            return None;
        }
        loop {
            match self.read_more() {
                Ok(chunk) if !chunk.is_empty() => return Some((Ok(Bytes::from(chunk)), self)),
                Ok(_) => {}
                Err(e) => {
                    self.follow = false;
                    return Some((Err(e), self));
                }
            }
            tokio::time::sleep(FOLLOW_POLL).await;
        }
    }

    /// New bytes, at most 64 KiB; empty when there are none yet.
    fn read_more(&mut self) -> io::Result<Vec<u8>> {
        use std::os::unix::fs::MetadataExt;
        let Some(file) = self.file.as_mut() else {
            match std::fs::File::open(&self.path) {
                Ok(file) => self.file = Some(file),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            return Ok(Vec::new());
        };
        let chunk = read_at(file, &mut self.offset)?;
        if !chunk.is_empty() {
            return Ok(chunk);
        }
        // Nothing new here. Still the current file: wait. Rotated away (the relay renames a
        // file only after its last write to it): go on with the file written after it.
        let ino = file.metadata()?.ino();
        let chain = rotation_chain(&self.path)?;
        match chain.iter().position(|(_, i)| *i == ino) {
            Some(at) if at + 1 == chain.len() => {}
            Some(at) => {
                let (next, next_ino) = &chain[at + 1];
                // Renamed again meanwhile: the next poll looks again.
                if let Ok(opened) = std::fs::File::open(next)
                    && opened.metadata()?.ino() == *next_ino
                {
                    self.file = Some(opened);
                    self.offset = 0;
                }
            }
            // Deleted (the follower fell more than `log_keep` files behind): from the oldest
            // file there is.
            None if !chain.is_empty() => {
                self.file = None;
                if let Some((oldest, _)) = chain.first() {
                    self.file = std::fs::File::open(oldest).ok();
                }
                self.offset = 0;
            }
            None => {}
        }
        Ok(Vec::new())
    }
}

/// A log's files in the order they were written, with their inodes: `ID.log.N` (highest N,
/// the oldest, first) ... `ID.log.1`, then `ID.log`.
fn rotation_chain(path: &Path) -> io::Result<Vec<(PathBuf, u64)>> {
    use std::os::unix::fs::MetadataExt;
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{name}.");
    let mut numbered: Vec<u32> = std::fs::read_dir(dir)?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            entry
                .file_name()
                .to_str()?
                .strip_prefix(&prefix)?
                .parse()
                .ok()
        })
        .collect();
    numbered.sort_unstable_by(|a, b| b.cmp(a));
    let paths = numbered
        .into_iter()
        .map(|n| dir.join(format!("{prefix}{n}")))
        .chain(std::iter::once(path.to_path_buf()));
    Ok(paths
        .filter_map(|p| {
            let ino = std::fs::metadata(&p).ok()?.ino();
            Some((p, ino))
        })
        .collect())
}

/// Reads at most 64 KiB from `offset` on (from 0 when the file was emptied meanwhile) and moves
/// `offset` past them.
fn read_at(file: &mut std::fs::File, offset: &mut u64) -> io::Result<Vec<u8>> {
    let len = file.metadata()?.len();
    if len < *offset {
        *offset = 0;
    }
    file.seek(SeekFrom::Start(*offset))?;
    let mut chunk = Vec::new();
    file.take(64 * 1024).read_to_end(&mut chunk)?;
    *offset += chunk.len() as u64;
    Ok(chunk)
}

/// The last `lines` lines of `path`, the file open, and the offset after them.
fn tail_file(path: &Path, lines: usize) -> io::Result<(Vec<u8>, Option<std::fs::File>, u64)> {
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), None, 0)),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let start = len.saturating_sub(TAIL_WINDOW);
    file.seek(SeekFrom::Start(start))?;
    let mut window = Vec::new();
    file.read_to_end(&mut window)?;
    let end = start + window.len() as u64;
    Ok((last_lines(&window, lines).to_vec(), Some(file), end))
}

/// The suffix of `text` holding its last `n` lines (a final line without `\n` counts).
fn last_lines(text: &[u8], n: usize) -> &[u8] {
    if n == 0 {
        return &[];
    }
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let mut seen = 0;
    for (i, byte) in body.iter().enumerate().rev() {
        if *byte == b'\n' {
            seen += 1;
            if seen == n {
                return &text[i + 1..];
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;
    use std::io::Write;

    use super::*;

    #[test]
    fn last_lines_counts_from_the_end() {
        let cases: [(&[u8], usize, &[u8]); 6] = [
            (b"a\nb\nc\n", 2, b"b\nc\n"),
            (b"a\nb\nc", 2, b"b\nc"),
            (b"a\nb\n", 5, b"a\nb\n"),
            (b"a\nb\n", 0, b""),
            (b"", 3, b""),
            (b"only\n", 1, b"only\n"),
        ];
        for (text, n, want) in cases {
            assert_eq!(
                last_lines(text, n),
                want,
                "{:?} {n}",
                String::from_utf8_lossy(text)
            );
        }
    }

    #[tokio::test]
    async fn follow_reads_every_line_once_across_rotations() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = Logs::new(dir.path(), 2);
        let id = ProcessId::for_service("svc", 1);
        let path = logs.path(&id);
        let mut writer = logs.open_for_writing(&id).expect("open");
        writer.write_all(b"one\n").expect("write");
        let mut stream = Box::pin(logs.stream(&id, 10, true).expect("stream"));
        let mut seen = Vec::new();
        let mut next = async |seen: &mut Vec<u8>| {
            let chunk = tokio::time::timeout(Duration::from_secs(2), stream.next())
                .await
                .expect("in time")
                .expect("some")
                .expect("ok");
            seen.extend_from_slice(&chunk);
        };
        next(&mut seen).await;
        // As the relay rotates, twice before the follower looks: the last write to the old
        // file, renames, a new file.
        let rotate = |text: &[u8], writer: &mut std::fs::File| {
            writer.write_all(text).expect("write");
            let numbered = |n: u32| format!("{}.{n}", path.display());
            if std::path::Path::new(&numbered(1)).exists() {
                std::fs::rename(numbered(1), numbered(2)).expect("rename .1");
            }
            std::fs::rename(&path, numbered(1)).expect("rename");
            logs.open_for_writing(&id).expect("open")
        };
        let mut writer = rotate(b"two\n", &mut writer);
        let mut writer = rotate(b"three\n", &mut writer);
        writer.write_all(b"four\n").expect("write");
        let all = b"one\ntwo\nthree\nfour\n";
        while seen.len() < all.len() {
            next(&mut seen).await;
        }
        assert_eq!(seen, all);
    }
}
