//! The agent's durable records: a record is on disk before the API answers.
//!
//! One redb file per node. Table `processes` maps a process id to the JSON of its [`Entry`];
//! table `meta` holds small node-level settings as text. Every write is its own commit with
//! redb's immediate durability (fsync before `commit` returns), so a caller that got `Ok` from
//! [`Store::put`] may answer its client: the record survives a crash of the agent or the machine.

use std::path::{Path, PathBuf};

use p2f_model::{Process, ProcessId};
use redb::{
    Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, TableDefinition,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};

/// Process id -> JSON of its [`Entry`].
const PROCESSES: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("processes");
/// Node-level settings: key -> value.
const META: TableDefinition<'static, &str, &str> = TableDefinition::new("meta");
/// redb's page cache (its default is 1 GiB); the agent's records fit in a few MiB.
const CACHE_BYTES: usize = 16 * 1024 * 1024;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The file cannot be created, opened or initialised.
    #[error("cannot open the record store {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    /// Another agent (another process, or another `Store` in this one) has the file open.
    #[error(
        "the record store {} is in use by another agent (it holds the file lock): stop that agent or use another state directory",
        path.display()
    )]
    InUse { path: PathBuf },
    /// A read failed.
    #[error("cannot read the record store {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    /// A write failed; nothing of it was committed.
    #[error("cannot write to the record store {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    /// A stored record is not a valid [`Entry`] (its bytes stay untouched in the file).
    #[error("record {id} cannot be decoded: {source}")]
    Decode {
        id: String,
        #[source]
        source: serde_json::Error,
    },
    /// An entry cannot be turned into JSON.
    #[error("record {id} cannot be encoded: {source}")]
    Encode {
        id: ProcessId,
        #[source]
        source: serde_json::Error,
    },
}

/// Node-local facts needed to re-adopt a running process after the agent restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Local {
    /// Its process group (the group leader's pid).
    pub pgid: u32,
    /// The leader's start time in clock ticks since boot, which tells it from a reused pid.
    pub start_ticks: u64,
    /// Its log relay's pid (0 in records written before relays: watched by its own pid).
    #[serde(default)]
    pub relay: u32,
    /// The relay's start time in clock ticks since boot.
    #[serde(default)]
    pub relay_ticks: u64,
}

/// One stored record: the network's view of a process and, when it runs here, local facts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The record as the network sees it.
    pub process: Process,
    /// Set while the process runs on this node.
    pub local: Option<Local>,
}

/// The agent's record store: one redb file, held exclusively by one agent.
///
/// After an I/O error (a full disk, say) redb refuses every later write until the database is
/// opened again ("a previous I/O error occurred"); the store does that itself, at once and
/// again before the next operation if it could not yet, so that writes work again as soon as
/// the disk does — without an agent restart.
#[derive(Debug)]
pub struct Store {
    /// `None` while it could not be opened again after an I/O error.
    db: std::sync::RwLock<Option<Database>>,
    path: PathBuf,
}

impl Store {
    /// Opens the store at `path`, creating the file and its tables if missing.
    ///
    /// The whole file is checked at open, so a damaged file is an error instead of a panic.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = open_database(path)?;
        let store = Store {
            db: std::sync::RwLock::new(Some(db)),
            path: path.to_path_buf(),
        };
        // Create both tables now, so that readers never meet a missing one.
        store
            .write(|txn| {
                txn.open_table(PROCESSES)?;
                txn.open_table(META)?;
                Ok(())
            })
            .map_err(|e| match e {
                StoreError::Write { path, source } => StoreError::Open { path, source },
                other => other,
            })?;
        Ok(store)
    }

    /// [`Store::open`]; a file that is damaged (not in use, but unreadable as a store) is moved
    /// aside to `PATH.damaged-UNIXSECONDS` and an empty store is made in its place, said loudly:
    /// the node starts with no records (its leftover processes are killed by the supervisor,
    /// and the root places again what it should run) instead of not starting at all.
    pub fn open_or_set_aside(path: &Path) -> Result<Store, StoreError> {
        match Store::open(path) {
            Err(StoreError::Open { source, .. }) if path.exists() => {
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let aside = PathBuf::from(format!("{}.damaged-{stamp}", path.display()));
                std::fs::rename(path, &aside).map_err(|e| StoreError::Open {
                    path: path.to_path_buf(),
                    source: Box::new(redb::Error::Io(e)),
                })?;
                tracing::error!(
                    store = %path.display(),
                    aside = %aside.display(),
                    "the record store is damaged ({source}); it was moved aside and this node \
                     starts with no records: the root places again what it should run"
                );
                Store::open(path)
            }
            other => other,
        }
    }

    /// Runs `f` on the database, opening it again first when an I/O error closed it.
    fn with_db<T>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, redb::Error>,
    ) -> Result<T, redb::Error> {
        {
            let guard = self
                .db
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(db) = guard.as_ref() {
                return f(db);
            }
        }
        let mut guard = self
            .db
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if guard.is_none() {
            *guard = Some(reopen(&self.path)?);
        }
        match guard.as_ref() {
            Some(db) => f(db),
            None => Err(redb::Error::DatabaseClosed),
        }
    }

    /// After an I/O error: closes the database and opens it again (redb refuses every write
    /// until then). When it cannot be opened yet, the next operation tries again.
    fn recover_from(&self, error: &redb::Error) {
        if !matches!(error, redb::Error::Io(_) | redb::Error::PreviousIo) {
            return;
        }
        let mut guard = self
            .db
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Closed first: the file is locked while it is open.
        drop(guard.take());
        match reopen(&self.path) {
            Ok(db) => {
                tracing::warn!(store = %self.path.display(), "a write failed ({error}); the store was opened again");
                *guard = Some(db);
            }
            Err(e) => tracing::error!(
                store = %self.path.display(),
                "a write failed ({error}) and the store cannot be opened again yet ({e}); the next operation tries again"
            ),
        }
    }
}

/// Opens (creating) the redb file, checking all of it.
fn open_database(path: &Path) -> Result<Database, StoreError> {
    {
        let opened = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .set_check_integrity_on_open(true)
            .create(path);
        let db = match opened {
            Ok(db) => db,
            Err(DatabaseError::DatabaseAlreadyOpen | DatabaseError::LockProtocolMismatch) => {
                return Err(StoreError::InUse {
                    path: path.to_path_buf(),
                });
            }
            Err(e) => {
                return Err(StoreError::Open {
                    path: path.to_path_buf(),
                    source: Box::new(e.into()),
                });
            }
        };
        Ok(db)
    }
}

/// [`open_database`] for [`Store::recover_from`], as a redb error.
fn reopen(path: &Path) -> Result<Database, redb::Error> {
    open_database(path).map_err(|e| redb::Error::Io(std::io::Error::other(e.to_string())))
}

impl Store {
    /// The file the store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stores `entry` under its process id, replacing any previous one; returns once it is on
    /// disk.
    pub fn put(&self, entry: &Entry) -> Result<(), StoreError> {
        let id = &entry.process.id;
        let bytes = serde_json::to_vec(entry).map_err(|source| StoreError::Encode {
            id: id.clone(),
            source,
        })?;
        self.write(|txn| {
            txn.open_table(PROCESSES)?
                .insert(id.as_str(), bytes.as_slice())?;
            Ok(())
        })
    }

    /// Removes the record of `id`; returns whether there was one. Durable like [`Store::put`].
    pub fn remove(&self, id: &ProcessId) -> Result<bool, StoreError> {
        self.write(|txn| {
            let mut table = txn.open_table(PROCESSES)?;
            let removed = table.remove(id.as_str())?.is_some();
            Ok(removed)
        })
    }

    /// The record of `id`, if any; an undecodable one is [`StoreError::Decode`].
    pub fn get(&self, id: &ProcessId) -> Result<Option<Entry>, StoreError> {
        let read = |db: &Database| -> Result<Option<Vec<u8>>, redb::Error> {
            let txn = db.begin_read()?;
            let table = txn.open_table(PROCESSES)?;
            Ok(table.get(id.as_str())?.map(|guard| guard.value().to_vec()))
        };
        match self.with_db(read).map_err(|e| self.read_failed(e))? {
            Some(bytes) => decode(id.as_str(), &bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Every record, sorted by id.
    ///
    /// A record that cannot be decoded is left out and logged (`error`) with its id; its bytes
    /// stay in the file untouched, for an operator or a later version to look at.
    pub fn all(&self) -> Result<Vec<Entry>, StoreError> {
        let read = |db: &Database| -> Result<Vec<(String, Vec<u8>)>, redb::Error> {
            let txn = db.begin_read()?;
            let table = txn.open_table(PROCESSES)?;
            let mut raw = Vec::new();
            for item in table.iter()? {
                let (key, value) = item?;
                raw.push((key.value().to_owned(), value.value().to_vec()));
            }
            Ok(raw)
        };
        let raw = self.with_db(read).map_err(|e| self.read_failed(e))?;
        // redb iterates `&str` keys in byte order, which is `ProcessId`'s order.
        let mut entries = Vec::with_capacity(raw.len());
        for (id, bytes) in raw {
            match decode(&id, &bytes) {
                Ok(entry) => entries.push(entry),
                Err(error) => tracing::error!(
                    id = %id,
                    store = %self.path.display(),
                    "{error}; the record is skipped and kept in the file as it is"
                ),
            }
        }
        Ok(entries)
    }

    /// The node-level setting `key`, if set.
    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        let read = |db: &Database| -> Result<Option<String>, redb::Error> {
            let txn = db.begin_read()?;
            let table = txn.open_table(META)?;
            Ok(table.get(key)?.map(|guard| guard.value().to_owned()))
        };
        self.with_db(read).map_err(|e| self.read_failed(e))
    }

    /// Sets the node-level setting `key`; durable like [`Store::put`].
    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.write(|txn| {
            txn.open_table(META)?.insert(key, value)?;
            Ok(())
        })
    }

    /// Runs `change` in one write transaction and commits it durably (fsync'd before return).
    fn write<T>(
        &self,
        change: impl FnOnce(&WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, StoreError> {
        let run = |db: &Database| -> Result<T, redb::Error> {
            let mut txn = db.begin_write()?;
            // Immediate is redb's default; said here because the store's promise rests on it.
            txn.set_durability(Durability::Immediate)?;
            let out = change(&txn)?;
            txn.commit()?;
            Ok(out)
        };
        self.with_db(run).map_err(|source| {
            self.recover_from(&source);
            StoreError::Write {
                path: self.path.clone(),
                source: Box::new(source),
            }
        })
    }

    fn read_failed(&self, source: redb::Error) -> StoreError {
        StoreError::Read {
            path: self.path.clone(),
            source: Box::new(source),
        }
    }
}

fn decode(id: &str, bytes: &[u8]) -> Result<Entry, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Decode {
        id: id.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use p2f_model::{NodeName, NodeRef, ProcessSpec, Timestamp};

    use super::*;

    const WRITER_ENV: &str = "P2F_STORE_WRITER";

    fn entry(n: u64) -> Entry {
        let process = Process::placed(
            ProcessId::for_service("svc", n),
            1,
            ProcessSpec::new("svc", "sleep 1"),
            NodeRef {
                name: NodeName::from_static("n1"),
                address: "127.0.0.1".into(),
            },
            Timestamp(0),
        );
        Entry {
            process,
            local: n.is_multiple_of(2).then_some(Local {
                pgid: 1000 + n as u32,
                start_ticks: 5000 + n,
                relay: 0,
                relay_ticks: 0,
            }),
        }
    }

    fn raw_put(path: &Path, key: &str, bytes: &[u8]) {
        let db = Database::create(path).expect("open with redb");
        let txn = db.begin_write().expect("begin");
        txn.open_table(PROCESSES)
            .expect("table")
            .insert(key, bytes)
            .expect("insert");
        txn.commit().expect("commit");
    }

    fn raw_get(path: &Path, key: &str) -> Option<Vec<u8>> {
        let db = Database::create(path).expect("open with redb");
        let txn = db.begin_read().expect("begin");
        let table = txn.open_table(PROCESSES).expect("table");
        table
            .get(key)
            .expect("get")
            .map(|guard| guard.value().to_vec())
    }

    #[test]
    fn the_store_can_be_shared_between_threads() {
        fn check<T: Send + Sync + 'static>() {}
        check::<Store>();
        check::<StoreError>();
    }

    #[test]
    fn records_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("records.redb");
        let store = Store::open(&path).expect("open");
        assert_eq!(store.path(), path);
        assert_eq!(store.all().expect("all"), Vec::new());

        for n in [3, 1, 2] {
            store.put(&entry(n)).expect("put");
        }
        assert_eq!(
            store.get(&entry(2).process.id).expect("get"),
            Some(entry(2))
        );
        assert_eq!(store.get(&entry(9).process.id).expect("get"), None);
        assert_eq!(
            store.all().expect("all"),
            vec![entry(1), entry(2), entry(3)]
        );

        let mut changed = entry(2);
        changed.process.restarts = 7;
        changed.local = None;
        store.put(&changed).expect("put again");
        assert_eq!(store.get(&changed.process.id).expect("get"), Some(changed));

        assert!(store.remove(&entry(1).process.id).expect("remove"));
        assert!(!store.remove(&entry(1).process.id).expect("remove again"));
        assert_eq!(store.all().expect("all").len(), 2);

        assert_eq!(store.meta("node").expect("meta"), None);
        store.set_meta("node", "n1").expect("set");
        store.set_meta("node", "n2").expect("set again");
        assert_eq!(store.meta("node").expect("meta").as_deref(), Some("n2"));
    }

    #[test]
    fn records_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("records.redb");
        {
            let store = Store::open(&path).expect("open");
            store.put(&entry(1)).expect("put");
            store.put(&entry(2)).expect("put");
            store.set_meta("secret", "s3").expect("set");
        }
        let store = Store::open(&path).expect("reopen");
        assert_eq!(store.all().expect("all"), vec![entry(1), entry(2)]);
        assert_eq!(store.meta("secret").expect("meta").as_deref(), Some("s3"));
    }

    #[test]
    fn a_second_open_says_the_store_is_in_use() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("records.redb");
        let first = Store::open(&path).expect("open");
        let err = Store::open(&path).expect_err("second open must fail");
        assert!(matches!(err, StoreError::InUse { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("in use by another agent"), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");
        drop(first);
        Store::open(&path).expect("open after the first is gone");
    }

    #[test]
    fn a_file_that_is_not_a_store_is_an_open_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("records.redb");
        std::fs::write(&path, b"not a redb file at all, just some words").expect("write");
        let err = Store::open(&path).expect_err("must fail");
        assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
        assert!(
            err.to_string().starts_with(&format!(
                "cannot open the record store {}: ",
                path.display()
            )),
            "{err}"
        );
    }

    /// Collects the `id` field of every `error` event.
    struct ErrorIds(Mutex<Vec<String>>);

    impl tracing::field::Visit for &ErrorIds {
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            if field.name() == "id" {
                self.0.lock().expect("lock").push(format!("{value:?}"));
            }
        }
    }

    impl tracing::Subscriber for ErrorIds {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            if *event.metadata().level() == tracing::Level::ERROR {
                event.record(&mut &*self);
            }
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    #[test]
    fn a_corrupt_record_is_reported_and_the_others_still_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("records.redb");
        {
            let store = Store::open(&path).expect("open");
            store.put(&entry(1)).expect("put");
            store.put(&entry(3)).expect("put");
        }
        let garbage: &[u8] = b"\x00\xffnot json{";
        raw_put(&path, "svc-000000000002", garbage);

        let store = Store::open(&path).expect("reopen");
        let seen = Arc::new(ErrorIds(Mutex::new(Vec::new())));
        let all = tracing::subscriber::with_default(Arc::clone(&seen), || store.all());
        assert_eq!(all.expect("all"), vec![entry(1), entry(3)]);
        assert_eq!(
            *seen.0.lock().expect("lock"),
            vec!["svc-000000000002".to_owned()]
        );

        let err = store
            .get(&entry(2).process.id)
            .expect_err("the bad record must not decode");
        assert!(matches!(err, StoreError::Decode { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("record svc-000000000002 cannot be decoded: "),
            "{err}"
        );

        drop(store);
        assert_eq!(
            raw_get(&path, "svc-000000000002").as_deref(),
            Some(garbage),
            "the bad record's bytes stay as they were"
        );
    }

    /// Many puts in a row each land (their latency is a benchmark's: `bench/agent`).
    #[test]
    fn every_put_is_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("records.redb")).expect("open");
        let puts = 200;
        for n in 0..puts {
            let entry = entry(n);
            store.put(&entry).expect("put");
            assert_eq!(store.get(&entry.process.id).expect("get"), Some(entry));
        }
        assert_eq!(store.all().expect("all").len(), puts as usize);
    }

    /// The child half of `committed_records_survive_sigkill`: does nothing unless
    /// `P2F_STORE_WRITER` names a store file.
    #[test]
    fn writer_child() {
        let Some(path) = std::env::var_os(WRITER_ENV) else {
            return;
        };
        let store = Store::open(Path::new(&path)).expect("child open");
        let deadline = Instant::now() + Duration::from_secs(20);
        for n in 0..100_000 {
            if Instant::now() > deadline {
                break;
            }
            store.put(&entry(n)).expect("child put");
            println!("put {n}");
        }
    }

    #[test]
    fn committed_records_survive_sigkill() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("records.redb");
        let exe = std::env::current_exe().expect("current exe");
        // libtest names tests by their path inside the crate.
        let module = module_path!().split_once("::").map_or("", |(_, rest)| rest);
        let mut child = Command::new(exe)
            .args([
                "--exact",
                &format!("{module}::writer_child"),
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WRITER_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn writer");
        let stdout = child.stdout.take().expect("stdout");
        let (lines, received) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines.send(line).is_err() {
                    break;
                }
            }
        });

        // The last "put N" seen; the child counts up from 0 without gaps. (The first one shares
        // its line with libtest's "test ... writer_child ... ".)
        fn note(committed: &mut Option<u64>, line: &str) {
            if let Some((_, n)) = line.rsplit_once("put ") {
                let n: u64 = n.trim().parse().expect("a count");
                assert_eq!(Some(n), committed.map_or(Some(0), |c| c.checked_add(1)));
                *committed = Some(n);
            }
        }
        let mut committed: Option<u64> = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        while committed.is_none_or(|c| c < 50) {
            let left = deadline.saturating_duration_since(Instant::now());
            match received.recv_timeout(left) {
                Ok(line) => note(&mut committed, &line),
                Err(_) => break,
            }
        }
        child.kill().expect("SIGKILL the writer");
        child.wait().expect("wait for the writer");
        // Whatever the child printed before it died was committed before it was printed.
        let drain_until = Instant::now() + Duration::from_secs(5);
        loop {
            let left = drain_until.saturating_duration_since(Instant::now());
            match received.recv_timeout(left) {
                Ok(line) => note(&mut committed, &line),
                Err(_) => break,
            }
        }
        reader.join().expect("reader thread");

        let committed = committed.expect("the writer committed nothing within 30 s");
        assert!(committed >= 50, "the writer only reached {committed}");
        let store = Store::open(&path).expect("reopen after SIGKILL");
        for n in 0..=committed {
            assert_eq!(
                store.get(&entry(n).process.id).expect("get"),
                Some(entry(n)),
                "record {n} was reported committed"
            );
        }
        let all = store.all().expect("all");
        assert!(all.len() as u64 > committed, "{} records", all.len());
        eprintln!(
            "writer was SIGKILLed after reporting {} commits; {} records on disk",
            committed + 1,
            all.len()
        );
    }
}
