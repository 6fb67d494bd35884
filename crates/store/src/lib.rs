//! The node's durable store: one redb file holding every journal entry this replica has applied.
//!
//! - `journal`: position → entry (signed change + decoded event), in the order the ledger applied
//!   them, which is a causal order: restoring in that order never sees negative stock rights.
//! - `by_dot`: (device, seq) → position, to serve a peer the changes it lacks.
//! - `meta`: schema version and the (market, device) this file belongs to.
//!
//! Every entry row carries a CRC-32 of its bytes, so a flipped bit is reported, never folded into
//! the state. `append` returns only after redb's durable commit: callers acknowledge after it.

use redb::backends::FileBackend;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableError};
use stallmesh_identity::{DeviceId, MarketId, SignedChange};
use stallmesh_ledger::Entry;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

mod backend;
use backend::{Overlay, Sealable};

mod evidence;

const JOURNAL: TableDefinition<u64, &[u8]> = TableDefinition::new("journal");
const BY_DOT: TableDefinition<(&[u8], u64), u64> = TableDefinition::new("by_dot");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// Bumped when the on-disk layout changes; an unknown version is refused, not guessed at.
pub const SCHEMA_VERSION: u32 = 1;
/// Most entries returned by one `changes_since` call: bounds the memory of serving one peer.
pub const MAX_CHANGES_PER_READ: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: cannot open store: {source}")]
    Open { path: PathBuf, source: Box<redb::DatabaseError> },
    /// The file is damaged (or redb panicked on it). Nothing more is written to it.
    #[error("{path}: store is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("{path}: store belongs to {found}, this node is {expected}")]
    WrongOwner { path: PathBuf, expected: String, found: String },
    #[error("{path}: unknown store schema version {found:?}, this build reads version {SCHEMA_VERSION}")]
    UnknownSchema { path: PathBuf, found: Vec<u8> },
    #[error("{path}: {source}")]
    Db { path: PathBuf, source: Box<redb::Error> },
}

/// Whose data a store file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub market: MarketId,
    pub device: DeviceId,
}

impl Owner {
    fn encode(&self) -> Vec<u8> {
        [&self.market.0[..], &self.device.0[..]].concat()
    }
    fn describe(bytes: &[u8]) -> String {
        if bytes.len() == 48 {
            format!("market {} device {}", hex::encode(&bytes[..16]), hex::encode(&bytes[16..]))
        } else {
            format!("an unreadable owner record ({} bytes)", bytes.len())
        }
    }
}

pub struct Store {
    db: Database,
    path: PathBuf,
    next_position: u64,
    /// Relaxed commits made since the last durable one.
    unflushed: bool,
    /// The first damage reported. Once set, the backend refuses every write (see `backend`), and
    /// `append`/`flush` refuse before reaching redb.
    damaged: Arc<OnceLock<String>>,
}

fn frame(entry: &Entry) -> Vec<u8> {
    frame_bytes(&postcard::to_allocvec(entry).expect("entries always serialize"))
}

/// A row: CRC-32 of the body, then the body.
fn frame_bytes(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 4);
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

fn unframe_bytes(bytes: &[u8]) -> Result<&[u8], String> {
    if bytes.len() < 4 {
        return Err(format!("row of {} bytes is shorter than its checksum", bytes.len()));
    }
    let (crc, body) = bytes.split_at(4);
    let crc = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
    if crc32fast::hash(body) != crc {
        return Err("row checksum mismatch".into());
    }
    Ok(body)
}

fn unframe(bytes: &[u8]) -> Result<Entry, String> {
    postcard::from_bytes(unframe_bytes(bytes)?).map_err(|e| format!("row does not decode: {e}"))
}

/// Decodes one journal row as the store reads it (checksum, then the entry): the same path as
/// `load` and `check`, public for the fuzz target.
pub fn decode_row(bytes: &[u8]) -> Result<Entry, String> {
    unframe(bytes)
}

/// Frames an entry's encoded body as a journal row (checksum first), for tools and the fuzz
/// target to reach the decoder past the checksum.
pub fn frame_row_body(body: &[u8]) -> Vec<u8> {
    frame_bytes(body)
}

/// The message a caught panic carried (for errors that say what happened).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// Runs `f`, turning a panic (redb panics on some damaged pages) into `Corrupt`.
fn no_panic<T>(path: &Path, what: &str, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        Err(StoreError::Corrupt { path: path.to_path_buf(), detail: format!("redb panicked during {what}: {}", panic_message(&*payload)) })
    })
}

/// Damage (a corrupt file) versus a refusal (busy, permissions, disk full): only damage is set aside.
fn open_error(path: &Path, e: redb::DatabaseError) -> StoreError {
    use std::io::ErrorKind::{InvalidData, UnexpectedEof};
    match e {
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(detail)) => StoreError::Corrupt { path: path.into(), detail },
        redb::DatabaseError::Storage(redb::StorageError::Io(e)) if matches!(e.kind(), InvalidData | UnexpectedEof) => {
            StoreError::Corrupt { path: path.into(), detail: e.to_string() }
        }
        source => StoreError::Open { path: path.into(), source: Box::new(source) },
    }
}

fn db_error(path: &Path, e: impl Into<redb::Error>) -> StoreError {
    match e.into() {
        redb::Error::Corrupted(detail) => StoreError::Corrupt { path: path.into(), detail },
        source => StoreError::Db { path: path.into(), source: Box::new(source) },
    }
}

/// Renames a damaged store file to `<name>.damaged-<now_ms>` (with `-<n>` appended if that exists)
/// and returns the new path. Never overwrites, never deletes the data.
pub fn set_aside(path: &Path, now_ms: u64) -> std::io::Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "store path has no file name"))?;
    for n in 0..1_000u32 {
        let mut candidate = name.to_os_string();
        candidate.push(format!(".damaged-{now_ms}"));
        if n > 0 {
            candidate.push(format!("-{n}"));
        }
        let target = path.with_file_name(candidate);
        // A hard link fails if the target exists, where a rename would replace it.
        match std::fs::hard_link(path, &target) {
            Ok(()) => std::fs::remove_file(path)?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(e),
            // No hard links on this file system: check, then rename.
            Err(_) if target.exists() => continue,
            Err(_) => std::fs::rename(path, &target)?,
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        }
        return Ok(target);
    }
    Err(std::io::Error::new(std::io::ErrorKind::AlreadyExists, format!("{}: too many set-aside copies", path.display())))
}

/// Reads and checks every row through `db`: each journal row's CRC and decoding, positions without
/// gaps, `by_dot` one-to-one with the journal, and the meta record. Returns the number of entries.
fn verify_contents(db: &impl ReadableDatabase, path: &Path, owner: Owner) -> Result<u64, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt { path: path.into(), detail };
    let tx = db.begin_read().map_err(|e| db_error(path, e))?;
    let meta = match tx.open_table(META) {
        Ok(t) => t,
        // Created but never initialised (a crash before the first commit): nothing to lose.
        Err(TableError::TableDoesNotExist(_)) if matches!(tx.open_table(JOURNAL), Err(TableError::TableDoesNotExist(_))) => return Ok(0),
        Err(e) => return Err(db_error(path, e)),
    };
    let version = meta.get("schema_version").map_err(|e| db_error(path, e))?.map(|v| v.value().to_vec());
    match version {
        None => return Err(corrupt("meta has no schema version".into())),
        Some(v) if v != SCHEMA_VERSION.to_le_bytes() => return Err(StoreError::UnknownSchema { path: path.into(), found: v }),
        Some(_) => {}
    }
    let found = meta.get("owner").map_err(|e| db_error(path, e))?.map(|v| v.value().to_vec()).unwrap_or_default();
    if found != owner.encode() {
        return Err(StoreError::WrongOwner {
            path: path.into(),
            expected: Owner::describe(&owner.encode()),
            found: Owner::describe(&found),
        });
    }
    let journal = tx.open_table(JOURNAL).map_err(|e| db_error(path, e))?;
    let mut dots: HashMap<(DeviceId, u64), u64> = HashMap::new();
    let mut expected = 0u64;
    for row in journal.iter().map_err(|e| db_error(path, e))? {
        let (k, v) = row.map_err(|e| db_error(path, e))?;
        let position = k.value();
        if position != expected {
            return Err(corrupt(format!("journal skips from entry {expected} to {position}")));
        }
        let entry = unframe(v.value()).map_err(|detail| corrupt(format!("journal entry {position}: {detail}")))?;
        if dots.insert((entry.change.device, entry.change.seq), position).is_some() {
            return Err(corrupt(format!("journal entry {position} repeats change {}:{}", entry.change.device.to_hex(), entry.change.seq)));
        }
        expected += 1;
    }
    if journal.len().map_err(|e| db_error(path, e))? != expected {
        return Err(corrupt(format!("journal says it holds {} entries, {expected} were read", journal.len().unwrap_or(0))));
    }
    let by_dot = tx.open_table(BY_DOT).map_err(|e| db_error(path, e))?;
    let mut indexed = 0u64;
    for row in by_dot.iter().map_err(|e| db_error(path, e))? {
        let (k, v) = row.map_err(|e| db_error(path, e))?;
        let (device, seq) = k.value();
        let device = DeviceId(device.try_into().map_err(|_| corrupt(format!("index key with a {}-byte device", device.len())))?);
        let position = v.value();
        if dots.get(&(device, seq)) != Some(&position) {
            return Err(corrupt(format!("index entry {}:{seq} -> {position} does not match the journal", device.to_hex())));
        }
        indexed += 1;
    }
    if indexed != expected {
        return Err(corrupt(format!("index holds {indexed} entries, the journal {expected}")));
    }
    drop((by_dot, journal, meta, tx));
    evidence::read_evidence(db, path)?;
    Ok(expected)
}

impl Store {
    /// Opens (or creates) the store at `path` for `owner`. An existing file is first verified
    /// without writing a byte to it (see [`Store::check`]); an empty, truncated or damaged file is
    /// `Corrupt` naming the file, never silently re-initialised.
    pub fn open(path: &Path, owner: Owner) -> Result<Self, StoreError> {
        let p = path.to_path_buf();
        let exists = match std::fs::metadata(path) {
            Ok(m) if m.len() == 0 => return Err(StoreError::Corrupt { path: p, detail: "file is empty (truncated?)".into() }),
            Ok(_) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(StoreError::Open { path: p, source: Box::new(e.into()) }),
        };
        if exists {
            Self::check(path, owner)?;
        }
        let damaged = Arc::new(OnceLock::new());
        let db = no_panic(path, "open", || {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| open_error(path, e.into()))?;
            let backend = Sealable::new(FileBackend::new(file).map_err(|e| open_error(path, e))?, damaged.clone());
            redb::Builder::new().create_with_backend(backend).map_err(|e| open_error(path, e))
        })?;
        let mut store = Self { db, path: p, next_position: 0, unflushed: false, damaged };
        store.guarded("init", |s| s.init(owner))?;
        Ok(store)
    }

    /// Verifies the existing store at `path` for `owner` without changing the file: redb's own
    /// check and every row (see `verify_contents`).
    ///
    /// redb 4 offers `Database::check_integrity` (and `Builder::set_check_integrity_on_open`):
    /// verifies every page checksum of the data and system trees, but needs a writable handle and
    /// commits a repair when it finds damage, which is exactly the write that can destroy what
    /// was still readable. `ReadOnlyDatabase` writes nothing but checks no checksums and refuses a
    /// file left by a crash. So the check runs on a writable handle over an in-memory overlay of
    /// the file: redb reads the file, and whatever it writes (repair, shutdown header) stays in
    /// memory and is dropped. Open-time crash recovery then runs for real only on a file that passed.
    pub fn check(path: &Path, owner: Owner) -> Result<u64, StoreError> {
        no_panic(path, "the integrity check", || {
            let file = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(|e| open_error(path, e.into()))?;
            let backend = Overlay::new(FileBackend::new(file).map_err(|e| open_error(path, e))?).map_err(|e| open_error(path, e.into()))?;
            let mut db = redb::Builder::new().create_with_backend(backend).map_err(|e| open_error(path, e))?;
            match db.check_integrity() {
                Ok(true) => {}
                Ok(false) => {
                    return Err(StoreError::Corrupt { path: path.into(), detail: "redb's integrity check found damaged pages".into() })
                }
                Err(e) => return Err(open_error(path, e)),
            }
            verify_contents(&db, path, owner)
        })
    }

    /// Runs `f`; a panic or a `Corrupt` error marks the store damaged.
    fn guarded<T>(&mut self, what: &str, f: impl FnOnce(&mut Self) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let path = self.path.clone();
        let result = no_panic(&path, what, || f(self));
        self.note(result)
    }

    fn note<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(StoreError::Corrupt { detail, .. }) = &result {
            if self.damaged.set(detail.clone()).is_ok() {
                tracing::error!(store = %self.path.display(), %detail, "store damaged: no further writes to this file");
            }
        }
        result
    }

    /// Why this store stopped writing, once it has reported damage.
    pub fn damaged(&self) -> Option<&str> {
        self.damaged.get().map(String::as_str)
    }

    fn refuse_if_damaged(&self) -> Result<(), StoreError> {
        match self.damaged.get() {
            Some(why) => {
                Err(StoreError::Corrupt { path: self.path.clone(), detail: format!("not written: damage reported earlier ({why})") })
            }
            None => Ok(()),
        }
    }

    fn err<E: Into<redb::Error>>(&self) -> impl FnOnce(E) -> StoreError + '_ {
        move |e| db_error(&self.path, e)
    }

    fn init(&mut self, owner: Owner) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(self.err())?;
        {
            let mut meta = tx.open_table(META).map_err(self.err())?;
            let version = meta.get("schema_version").map_err(self.err())?.map(|v| v.value().to_vec());
            match version {
                None => {
                    meta.insert("schema_version", &SCHEMA_VERSION.to_le_bytes()[..]).map_err(self.err())?;
                    meta.insert("owner", &owner.encode()[..]).map_err(self.err())?;
                }
                Some(v) if v == SCHEMA_VERSION.to_le_bytes() => {
                    let found = meta.get("owner").map_err(self.err())?.map(|v| v.value().to_vec()).unwrap_or_default();
                    if found != owner.encode() {
                        return Err(StoreError::WrongOwner {
                            path: self.path.clone(),
                            expected: Owner::describe(&owner.encode()),
                            found: Owner::describe(&found),
                        });
                    }
                }
                Some(v) => return Err(StoreError::UnknownSchema { path: self.path.clone(), found: v }),
            }
            tx.open_table(BY_DOT).map_err(self.err())?;
            let journal = tx.open_table(JOURNAL).map_err(self.err())?;
            self.next_position = journal.last().map_err(self.err())?.map_or(0, |(k, _)| k.value() + 1);
        }
        tx.commit().map_err(self.err())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Entries stored.
    pub fn len(&self) -> u64 {
        self.next_position
    }

    pub fn is_empty(&self) -> bool {
        self.next_position == 0
    }

    /// Durably appends `entries` in one transaction; returns after the commit is on disk (and with
    /// it every relaxed commit before it).
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        self.append_with(entries, true)
    }

    /// Appends without waiting for the disk: for changes received from peers, which nobody was
    /// promised and which sync fetches again if a crash loses them. The next durable commit (a local
    /// sale, or [`Store::flush`]) makes them durable too, in order, so the store stays a causal prefix.
    pub fn append_relaxed(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        self.append_with(entries, false)
    }

    /// Closes the file and opens it again, checked as on start. redb refuses every operation after
    /// a failed write (a full disk) until the database is opened anew; this is how a node writes
    /// again once the disk does, without a restart. While it is closed, and if opening fails, the
    /// store refuses every write (`damaged` is set) and every read fails (an empty stand-in
    /// database without tables).
    pub fn reopen(&mut self, owner: Owner) -> Result<(), StoreError> {
        let _ = self.damaged.set("closed to be opened again after a failed write".into());
        let empty = redb::Builder::new().create_with_backend(redb::backends::InMemoryBackend::new()).map_err(|e| open_error(&self.path, e))?;
        // The file's handle (and its lock) goes before the file is opened again.
        drop(std::mem::replace(&mut self.db, empty));
        *self = Store::open(&self.path.clone(), owner)?;
        Ok(())
    }

    /// Makes every relaxed commit durable.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        self.refuse_if_damaged()?;
        if !self.unflushed {
            return Ok(());
        }
        self.guarded("flush", |s| {
            let tx = s.db.begin_write().map_err(s.err())?;
            tx.commit().map_err(s.err())?;
            s.unflushed = false;
            Ok(())
        })
    }

    fn append_with(&mut self, entries: &[Entry], durable: bool) -> Result<(), StoreError> {
        self.refuse_if_damaged()?;
        if entries.is_empty() {
            return Ok(());
        }
        self.guarded("append", |s| s.append_unguarded(entries, durable))
    }

    fn append_unguarded(&mut self, entries: &[Entry], durable: bool) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write().map_err(self.err())?;
        if !durable {
            tx.set_durability(redb::Durability::None)
                .map_err(|e| StoreError::Corrupt { path: self.path.clone(), detail: e.to_string() })?;
        }
        let start = self.next_position;
        let mut position = start;
        {
            let mut journal = tx.open_table(JOURNAL).map_err(self.err())?;
            let mut by_dot = tx.open_table(BY_DOT).map_err(self.err())?;
            for entry in entries {
                let replaced = journal.insert(position, &frame(entry)[..]).map_err(self.err())?.is_some();
                // The ledger hands over each journal position once: a second row for one (device,
                // seq), or a position written twice, would make the store disagree with the ledger.
                assert!(!replaced, "journal position {position} written twice");
                let earlier = by_dot.insert((&entry.change.device.0[..], entry.change.seq), position).map_err(self.err())?;
                assert!(earlier.is_none(), "change {}:{} appended twice", entry.change.device, entry.change.seq);
                position += 1;
            }
        }
        tx.commit().map_err(self.err())?;
        debug_assert_eq!(position, start + entries.len() as u64, "one row per entry");
        self.next_position = position;
        self.unflushed = !durable;
        Ok(())
    }

    /// Every entry, in the order it was appended.
    pub fn load(&self) -> Result<Vec<Entry>, StoreError> {
        self.note(no_panic(&self.path, "load", || {
            let tx = self.db.begin_read().map_err(self.err())?;
            let journal = tx.open_table(JOURNAL).map_err(self.err())?;
            let mut out = Vec::with_capacity(journal.len().map_err(self.err())? as usize);
            for row in journal.iter().map_err(self.err())? {
                let (k, v) = row.map_err(self.err())?;
                let entry = unframe(v.value()).map_err(|detail| StoreError::Corrupt {
                    path: self.path.clone(),
                    detail: format!("journal entry {}: {detail}", k.value()),
                })?;
                out.push(entry);
            }
            Ok(out)
        }))
    }

    /// Up to `limit` (at most [`MAX_CHANGES_PER_READ`]) changes of `device` from `from_seq` on.
    pub fn changes_since(&self, device: &DeviceId, from_seq: u64, limit: usize) -> Result<Vec<SignedChange>, StoreError> {
        self.note(no_panic(&self.path, "changes_since", || {
            let tx = self.db.begin_read().map_err(self.err())?;
            let by_dot = tx.open_table(BY_DOT).map_err(self.err())?;
            let journal = tx.open_table(JOURNAL).map_err(self.err())?;
            let mut out = Vec::new();
            let range = by_dot.range((&device.0[..], from_seq)..=(&device.0[..], u64::MAX)).map_err(self.err())?;
            for row in range.take(limit.min(MAX_CHANGES_PER_READ)) {
                let (_, position) = row.map_err(self.err())?;
                let position = position.value();
                let bytes = journal.get(position).map_err(self.err())?.ok_or_else(|| StoreError::Corrupt {
                    path: self.path.clone(),
                    detail: format!("index points at missing journal entry {position}"),
                })?;
                let entry = unframe(bytes.value()).map_err(|detail| StoreError::Corrupt {
                    path: self.path.clone(),
                    detail: format!("journal entry {position}: {detail}"),
                })?;
                out.push(entry.change);
            }
            Ok(out)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stallmesh_ledger::testkit::{product, sell, TestMarket};
    use stallmesh_ledger::LocalOp;

    fn day(n_sales: u64) -> (TestMarket, Vec<Entry>, Owner) {
        let m = TestMarket::new(1);
        let (mut l, e0) = m.device(1, "Test Stall");
        let mut entries = vec![e0];
        entries.push(l.record(LocalOp::UpsertProduct(product("honey", 450)), 1).unwrap());
        entries.push(l.record(LocalOp::Restock { sku: "honey".into(), qty: 1_000 }, 2).unwrap());
        for t in 0..n_sales {
            entries.push(l.record(sell("honey", 1), 10 + t).unwrap());
        }
        let owner = Owner { market: m.ctx.market, device: l.device() };
        (m, entries, owner)
    }

    #[test]
    fn appended_entries_load_back_in_order_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        let (_, entries, owner) = day(20);
        {
            let mut s = Store::open(&path, owner).unwrap();
            s.append(&entries[..10]).unwrap();
            s.append(&entries[10..]).unwrap();
        }
        let s = Store::open(&path, owner).unwrap();
        assert_eq!(s.len(), entries.len() as u64);
        assert_eq!(s.load().unwrap(), entries);
        let since = s.changes_since(&owner.device, 5, 3).unwrap();
        assert_eq!(since.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![5, 6, 7]);
    }

    #[test]
    fn relaxed_appends_become_durable_with_the_next_flush_or_durable_append() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        let (_, entries, owner) = day(6);
        {
            let mut s = Store::open(&path, owner).unwrap();
            s.append(&entries[..3]).unwrap();
            s.append_relaxed(&entries[3..6]).unwrap();
            assert_eq!(s.load().unwrap().len(), 6, "visible at once");
            s.flush().unwrap();
            s.append_relaxed(&entries[6..8]).unwrap();
            s.append(&entries[8..]).unwrap();
        }
        assert_eq!(Store::open(&path, owner).unwrap().load().unwrap(), entries);
    }

    #[test]
    fn a_store_of_another_device_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        let (_, _, owner) = day(0);
        drop(Store::open(&path, owner).unwrap());
        let other = Owner { device: DeviceId([7; 32]), ..owner };
        let err = Store::open(&path, other).err().unwrap();
        assert!(matches!(err, StoreError::WrongOwner { .. }), "{err}");
    }

    #[test]
    fn once_damage_is_reported_nothing_more_is_written_not_even_by_redb() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        let (_, entries, owner) = day(6);
        let mut s = Store::open(&path, owner).unwrap();
        s.append(&entries[..3]).unwrap();
        s.append_relaxed(&entries[3..5]).unwrap();
        let err = s.guarded("a test", |_| -> Result<(), StoreError> { panic!("boom") }).unwrap_err();
        assert!(matches!(&err, StoreError::Corrupt { path: p, detail } if *p == path && detail.contains("boom")), "{err}");
        assert!(s.damaged().unwrap().contains("boom"));
        let before = std::fs::read(&path).unwrap();
        assert!(matches!(s.append(&entries[5..]), Err(StoreError::Corrupt { .. })));
        assert!(matches!(s.flush(), Err(StoreError::Corrupt { .. })));
        // Past the store's own refusal, the backend refuses redb's writes.
        assert!(s.append_unguarded(&entries[5..], true).is_err());
        drop(s);
        assert!(std::fs::read(&path).unwrap() == before, "written after damage was reported");
    }

    #[test]
    fn a_corrupt_row_found_after_opening_marks_the_store_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        let (_, entries, owner) = day(3);
        let mut s = Store::open(&path, owner).unwrap();
        s.append(&entries).unwrap();
        // A row whose checksum fails, written past the store's framing.
        let tx = s.db.begin_write().unwrap();
        tx.open_table(JOURNAL).unwrap().insert(1, &b"\0\0\0\0garbage"[..]).unwrap();
        tx.commit().unwrap();
        let err = s.load().unwrap_err();
        assert!(matches!(&err, StoreError::Corrupt { detail, .. } if detail.contains("entry 1")), "{err}");
        assert!(s.damaged().is_some());
        assert!(s.append(&entries[..1]).is_err());
        drop(s);
        let err = Store::open(&path, owner).err().expect("refused on open");
        assert!(matches!(&err, StoreError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn empty_truncated_or_corrupted_files_give_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (_, entries, owner) = day(300);
        let path = dir.path().join("node.redb");
        {
            let mut s = Store::open(&path, owner).unwrap();
            s.append(&entries).unwrap();
        }
        let good = std::fs::read(&path).unwrap();
        let name = path.display().to_string();

        // Empty.
        std::fs::write(&path, b"").unwrap();
        let err = Store::open(&path, owner).err().expect("empty file refused").to_string();
        assert!(err.contains(&name), "{err}");

        // Truncated to half.
        std::fs::write(&path, &good[..good.len() / 2]).unwrap();
        let result = Store::open(&path, owner).and_then(|s| s.load());
        let err = result.expect_err("truncated file refused").to_string();
        assert!(err.contains(&name), "{err}");

        // A flipped byte inside the entries: every run flips each position in turn until one is
        // detected somewhere, and no corruption ever loads as silently different data.
        let mut detected = 0;
        for offset in (0..good.len()).step_by(good.len() / 97 + 1) {
            let mut bad = good.clone();
            bad[offset] ^= 0x55;
            std::fs::write(&path, &bad).unwrap();
            match Store::open(&path, owner).and_then(|s| s.load()) {
                Ok(loaded) => assert_eq!(loaded, entries, "corruption at {offset} loaded as different data"),
                Err(e) => {
                    assert!(e.to_string().contains(&name), "{e}");
                    detected += 1;
                }
            }
        }
        assert!(detected > 0, "no corruption was detected at all");
    }
}
