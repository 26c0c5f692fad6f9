//! Process logs: stdout and stderr of a process (and of its deploy step) go straight to one
//! append-only file per process, so they survive the agent; the agent rotates them by copy and
//! truncate (the process keeps its file descriptor), and serves their tail and follows them.

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
    max_bytes: u64,
    keep: u32,
}

impl Logs {
    /// Logs under `dir`, rotated past `max_bytes`, keeping `keep` old files.
    pub fn new(dir: impl Into<PathBuf>, max_bytes: u64, keep: u32) -> Logs {
        Logs {
            dir: dir.into(),
            max_bytes,
            keep,
        }
    }

    /// The current log file of a process.
    pub fn path(&self, id: &ProcessId) -> PathBuf {
        self.dir.join(format!("{id}.log"))
    }

    /// Opens the log file for a child's stdout/stderr, appending.
    /// The directory is private to the agent (0700; output may hold secrets): the process
    /// writes through the descriptor the agent hands it, not by path.
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

    /// Rotates the file when it outgrew its limit: `id.log.N` shifts to `N+1`, the current
    /// content is copied to `id.log.1`, and the file is truncated in place.
    pub fn rotate_if_needed(&self, id: &ProcessId) -> io::Result<bool> {
        let path = self.path(id);
        let size = match std::fs::metadata(&path) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        if size <= self.max_bytes {
            return Ok(false);
        }
        if self.keep == 0 {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)?
                .set_len(0)?;
            return Ok(true);
        }
        let numbered = |n: u32| PathBuf::from(format!("{}.{n}", path.display()));
        for n in (1..self.keep).rev() {
            let from = numbered(n);
            if from.exists() {
                std::fs::rename(&from, numbered(n + 1))?;
            }
        }
        std::fs::copy(&path, numbered(1))?;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)?
            .set_len(0)?;
        Ok(true)
    }

    /// Deletes a process's log files.
    pub fn remove(&self, id: &ProcessId) {
        let path = self.path(id);
        let _ = std::fs::remove_file(&path);
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
        let (head, offset) = tail_file(&path, lines)?;
        let state = Follow {
            path,
            offset,
            head: Some(head),
            follow,
        };
        Ok(futures_util::stream::unfold(state, Follow::next))
    }
}

/// A reader that follows a growing (and sometimes truncated) file.
struct Follow {
    path: PathBuf,
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
            match read_from(&self.path, self.offset) {
                Ok((chunk, offset)) if !chunk.is_empty() => {
                    self.offset = offset;
                    return Some((Ok(Bytes::from(chunk)), self));
                }
                Ok((_, offset)) => self.offset = offset,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    self.follow = false;
                    return Some((Err(e), self));
                }
            }
            tokio::time::sleep(FOLLOW_POLL).await;
        }
    }
}

/// New bytes of `path` from `offset` (from 0 when the file was truncated), at most 64 KiB.
fn read_from(path: &Path, offset: u64) -> io::Result<(Vec<u8>, u64)> {
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let start = if len < offset { 0 } else { offset };
    file.seek(SeekFrom::Start(start))?;
    let mut chunk = Vec::new();
    file.take(64 * 1024).read_to_end(&mut chunk)?;
    let end = start + chunk.len() as u64;
    Ok((chunk, end))
}

fn tail_file(path: &Path, lines: usize) -> io::Result<(Vec<u8>, u64)> {
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let start = len.saturating_sub(TAIL_WINDOW);
    file.seek(SeekFrom::Start(start))?;
    let mut window = Vec::new();
    file.read_to_end(&mut window)?;
    let end = start + window.len() as u64;
    Ok((last_lines(&window, lines).to_vec(), end))
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
    async fn rotation_keeps_the_writer_appending_and_follow_sees_new_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = Logs::new(dir.path(), 10, 2);
        let id = ProcessId::for_service("svc", 1);
        let mut writer = logs.open_for_writing(&id).expect("open");
        writer.write_all(b"one\ntwo\nthree\n").expect("write");
        assert!(logs.rotate_if_needed(&id).expect("rotate"));
        writer.write_all(b"four\n").expect("write");
        let current = std::fs::read(logs.path(&id)).expect("read");
        assert_eq!(current, b"four\n", "the writer appends at the new end");
        let rotated = std::fs::read(format!("{}.1", logs.path(&id).display())).expect("read .1");
        assert_eq!(rotated, b"one\ntwo\nthree\n");

        let mut stream = Box::pin(logs.stream(&id, 10, true).expect("stream"));
        let first = tokio::time::timeout(Duration::from_secs(2), stream.next())
            .await
            .expect("in time")
            .expect("some")
            .expect("ok");
        assert_eq!(&first[..], b"four\n");
        writer.write_all(b"five\n").expect("write");
        let next = tokio::time::timeout(Duration::from_secs(2), stream.next())
            .await
            .expect("in time")
            .expect("some")
            .expect("ok");
        assert_eq!(&next[..], b"five\n");
    }
}
