//! The node's durable store: one redb file holding every journal entry this replica has applied.
//!
//! - the journal (`journal.rs`): each device's entries sealed into deflated blocks of
//!   `BLOCK_ENTRIES`, its newest in an open tail, every entry with its position in the order the
//!   ledger applied them, which is a causal order: restoring in that order never sees negative
//!   stock rights;
//! - `meta`: schema version and the (market, device) this file belongs to;
//! - `evidence` (`evidence.rs`): conflicting changes, kept beside the journal.
//!
//! Every row carries a CRC-32 of its bytes, so a flipped bit is reported, never folded into the
//! state. `append` returns only after redb's durable commit: callers acknowledge after it. A
//! schema-1 file (`legacy.rs`) is upgraded when it is opened, in one transaction.

use redb::backends::FileBackend;
use redb::{Database, ReadableDatabase, TableDefinition, TableError};
use stallmesh_identity::{DeviceId, MarketId, SignedChange};
use stallmesh_ledger::Entry;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

mod backend;
use backend::{Overlay, Sealable};

mod evidence;
mod journal;
mod legacy;
pub use journal::{decode_block, BLOCK_ENTRIES};
use journal::{BLOCKS, TAIL};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// Bumped when the on-disk layout changes; an unknown version is refused, not guessed at.
/// 1: one row per entry and a (device, seq) index; 2: per-device deflated blocks and an open tail.
pub const SCHEMA_VERSION: u32 = 2;
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
    owner: Owner,
    next_position: u64,
    /// Positions of each device's entries in the open tail, oldest first (fewer than
    /// `BLOCK_ENTRIES` between appends).
    tails: HashMap<DeviceId, Vec<u64>>,
    /// The entries read by the check on open, handed to the first `load` so a start decodes the
    /// journal once.
    checked: Mutex<Option<Vec<Entry>>>,
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

/// What a check of an existing file found.
enum Contents {
    /// Created but never initialised (a crash before the first commit): nothing to lose.
    Uninitialised,
    /// A schema-1 file, to be upgraded.
    V1(Vec<Entry>),
    V2(journal::Journal),
}

/// Reads and checks every row through `db`: the meta record, the journal (see
/// `journal::read_journal`, or `legacy::read_v1` for a schema-1 file) and the evidence.
fn verify_contents(db: &impl ReadableDatabase, path: &Path, owner: Owner) -> Result<Contents, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt { path: path.into(), detail };
    let tx = db.begin_read().map_err(|e| db_error(path, e))?;
    let meta = match tx.open_table(META) {
        Ok(t) => t,
        Err(TableError::TableDoesNotExist(_))
            if [tx.open_table(TAIL).err(), tx.open_table(legacy::JOURNAL_V1).err()]
                .iter()
                .all(|e| matches!(e, Some(TableError::TableDoesNotExist(_)))) =>
        {
            return Ok(Contents::Uninitialised)
        }
        Err(e) => return Err(db_error(path, e)),
    };
    let version = meta.get("schema_version").map_err(|e| db_error(path, e))?.map(|v| v.value().to_vec());
    let version = match version {
        None => return Err(corrupt("meta has no schema version".into())),
        Some(v) if v == 1u32.to_le_bytes() => 1,
        Some(v) if v == SCHEMA_VERSION.to_le_bytes() => SCHEMA_VERSION,
        Some(v) => return Err(StoreError::UnknownSchema { path: path.into(), found: v }),
    };
    let found = meta.get("owner").map_err(|e| db_error(path, e))?.map(|v| v.value().to_vec()).unwrap_or_default();
    if found != owner.encode() {
        return Err(StoreError::WrongOwner {
            path: path.into(),
            expected: Owner::describe(&owner.encode()),
            found: Owner::describe(&found),
        });
    }
    drop(meta);
    let contents =
        if version == 1 { Contents::V1(legacy::read_v1(&tx, path)?) } else { Contents::V2(journal::read_journal(&tx, path, owner)?) };
    drop(tx);
    evidence::read_evidence(db, path)?;
    Ok(contents)
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
        let contents = if exists { Self::check_contents(path, owner)? } else { Contents::Uninitialised };
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
        let mut store =
            Self { db, path: p, owner, next_position: 0, tails: HashMap::new(), checked: Mutex::new(None), unflushed: false, damaged };
        store.guarded("init", |s| s.init(contents))?;
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
        Ok(match Self::check_contents(path, owner)? {
            Contents::Uninitialised => 0,
            Contents::V1(entries) => entries.len() as u64,
            Contents::V2(journal) => journal.entries.len() as u64,
        })
    }

    fn check_contents(path: &Path, owner: Owner) -> Result<Contents, StoreError> {
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

    /// Takes over what the check found: a new file gets its meta record and tables, a schema-1
    /// file is upgraded (one transaction: a crash leaves it schema 1), a current one is read as is.
    fn init(&mut self, contents: Contents) -> Result<(), StoreError> {
        let entries = match contents {
            Contents::V2(journal) => {
                self.next_position = journal.entries.len() as u64;
                self.tails = journal.tails;
                *self.checked.get_mut().unwrap_or_else(|p| p.into_inner()) = Some(journal.entries);
                return Ok(());
            }
            Contents::V1(entries) => Some(entries),
            Contents::Uninitialised => None,
        };
        let tx = self.db.begin_write().map_err(self.err())?;
        {
            let mut meta = tx.open_table(META).map_err(self.err())?;
            meta.insert("schema_version", &SCHEMA_VERSION.to_le_bytes()[..]).map_err(self.err())?;
            meta.insert("owner", &self.owner.encode()[..]).map_err(self.err())?;
        }
        if let Some(entries) = &entries {
            legacy::drop_v1(&tx, &self.path)?;
            self.tails = journal::write_entries(&tx, &self.path, &HashMap::new(), 0, entries)?;
            self.next_position = entries.len() as u64;
            tracing::info!(store = %self.path.display(), entries = entries.len(), "store upgraded from schema 1 to {SCHEMA_VERSION}");
        } else {
            tx.open_table(TAIL).map_err(self.err())?;
            tx.open_table(BLOCKS).map_err(self.err())?;
        }
        tx.commit().map_err(self.err())?;
        if entries.is_some() {
            // The schema-1 pages are free now but still in the file: give them back to the disk.
            self.db.compact().map_err(|e| db_error(&self.path, e))?;
        }
        *self.checked.get_mut().unwrap_or_else(|p| p.into_inner()) = entries;
        Ok(())
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
        let empty =
            redb::Builder::new().create_with_backend(redb::backends::InMemoryBackend::new()).map_err(|e| open_error(&self.path, e))?;
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
        // What the check read is no longer the whole journal.
        *self.checked.get_mut().unwrap_or_else(|p| p.into_inner()) = None;
        self.guarded("append", |s| s.append_unguarded(entries, durable))
    }

    fn append_unguarded(&mut self, entries: &[Entry], durable: bool) -> Result<(), StoreError> {
        // The ledger applies only its own market's changes: a store holds one market.
        assert!(entries.iter().all(|e| e.change.market == self.owner.market), "an entry of another market");
        let mut tx = self.db.begin_write().map_err(self.err())?;
        if !durable {
            tx.set_durability(redb::Durability::None)
                .map_err(|e| StoreError::Corrupt { path: self.path.clone(), detail: e.to_string() })?;
        }
        let start = self.next_position;
        let touched = journal::write_entries(&tx, &self.path, &self.tails, start, entries)?;
        tx.commit().map_err(self.err())?;
        // Only what committed changes what the store believes is on disk.
        self.tails.extend(touched);
        self.next_position = start + entries.len() as u64;
        self.unflushed = !durable;
        Ok(())
    }

    /// Every entry, in the order it was appended.
    pub fn load(&self) -> Result<Vec<Entry>, StoreError> {
        if let Some(entries) = self.checked.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Ok(entries);
        }
        self.note(no_panic(&self.path, "load", || {
            let tx = self.db.begin_read().map_err(self.err())?;
            Ok(journal::read_journal(&tx, &self.path, self.owner)?.entries)
        }))
    }

    /// Up to `limit` (at most [`MAX_CHANGES_PER_READ`]) changes of `device` from `from_seq` on.
    pub fn changes_since(&self, device: &DeviceId, from_seq: u64, limit: usize) -> Result<Vec<SignedChange>, StoreError> {
        let limit = limit.min(MAX_CHANGES_PER_READ);
        self.note(no_panic(&self.path, "changes_since", || {
            let corrupt = |detail: String| StoreError::Corrupt { path: self.path.clone(), detail };
            let mut out = Vec::new();
            if limit == 0 {
                return Ok(out);
            }
            let tx = self.db.begin_read().map_err(self.err())?;
            let blocks = tx.open_table(BLOCKS).map_err(self.err())?;
            let id = &device.0[..];
            // The block holding `from_seq` is the last one of the device starting at or before it.
            let first = blocks.range((id, 0)..=(id, from_seq)).map_err(self.err())?.next_back().transpose().map_err(self.err())?;
            let lowest = first.map_or(from_seq, |(k, _)| k.value().1);
            for row in blocks.range((id, lowest)..=(id, u64::MAX)).map_err(self.err())? {
                let (k, v) = row.map_err(self.err())?;
                let entries = decode_block(v.value()).map_err(|detail| corrupt(format!("block {device}:{}: {detail}", k.value().1)))?;
                for (_, entry) in entries {
                    if entry.change.seq >= from_seq {
                        out.push(entry.change);
                        if out.len() == limit {
                            return Ok(out);
                        }
                    }
                }
            }
            let tail = tx.open_table(TAIL).map_err(self.err())?;
            for &position in self.tails.get(device).into_iter().flatten() {
                let row =
                    tail.get(position).map_err(self.err())?.ok_or_else(|| corrupt(format!("open journal entry {position} is missing")))?;
                let entry = unframe(row.value()).map_err(|detail| corrupt(format!("journal entry {position}: {detail}")))?;
                if entry.change.seq >= from_seq {
                    out.push(entry.change);
                    if out.len() == limit {
                        break;
                    }
                }
            }
            Ok(out)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{ReadableTable, ReadableTableMetadata};
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

    /// Three devices selling at once, each journal interleaved with the others in apply order.
    fn busy_day(sales_each: u64) -> (Vec<Entry>, Owner) {
        let m = TestMarket::new(2);
        let mut entries = Vec::new();
        let mut tills = Vec::new();
        for n in 1..=3 {
            let (mut l, e0) = m.device(n, "Test Stall");
            entries.push(e0);
            entries.push(l.record(LocalOp::UpsertProduct(product("honey", 450)), 1).unwrap());
            entries.push(l.record(LocalOp::Restock { sku: "honey".into(), qty: 1_000_000 }, 2).unwrap());
            tills.push(l);
        }
        for t in 0..sales_each {
            for l in &mut tills {
                entries.push(l.record(sell("honey", 1), 10 + t).unwrap());
            }
        }
        (entries, Owner { market: m.ctx.market, device: tills[0].device() })
    }

    #[test]
    fn each_devices_journal_is_sealed_into_blocks_and_served_from_any_seq() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        let (entries, owner) = busy_day(150);
        {
            let mut s = Store::open(&path, owner).unwrap();
            for (i, chunk) in entries.chunks(7).enumerate() {
                if i % 3 == 0 {
                    s.append(chunk).unwrap()
                } else {
                    s.append_relaxed(chunk).unwrap()
                }
            }
            s.flush().unwrap();
            assert!(s.tails.values().all(|open| open.len() < BLOCK_ENTRIES), "sealed as it went");
        }
        let s = Store::open(&path, owner).unwrap();
        assert!(s.tails.values().all(|open| open.len() < BLOCK_ENTRIES), "{:?}", s.tails.values().map(Vec::len).collect::<Vec<_>>());
        let tx = s.db.begin_read().unwrap();
        assert!(tx.open_table(BLOCKS).unwrap().len().unwrap() >= 3 * 150 / BLOCK_ENTRIES as u64);
        drop(tx);
        assert_eq!(s.load().unwrap(), entries);
        for device in entries[..9].iter().map(|e| e.change.device).collect::<std::collections::BTreeSet<_>>() {
            let own: Vec<_> = entries.iter().filter(|e| e.change.device == device).map(|e| e.change.clone()).collect();
            for from in 0..=own.len() + 1 {
                let want = &own[from.min(own.len())..own.len().min(from + 50)];
                assert_eq!(s.changes_since(&device, from as u64, 50).unwrap(), want, "device {device} from {from}");
            }
            assert_eq!(s.changes_since(&device, 0, 0).unwrap(), vec![]);
        }
    }

    #[test]
    fn a_day_of_sales_takes_at_most_250_bytes_per_sale_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        let (entries, owner) = busy_day(5_000);
        let mut s = Store::open(&path, owner).unwrap();
        for chunk in entries.chunks(3) {
            s.append(chunk).unwrap();
        }
        drop(s);
        let per_entry = std::fs::metadata(&path).unwrap().len() / entries.len() as u64;
        assert!(per_entry <= 250, "{per_entry} bytes per entry");
    }

    #[test]
    fn a_store_read_on_open_and_appended_to_loads_every_entry() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        let (entries, owner) = busy_day(20);
        Store::open(&path, owner).unwrap().append(&entries[..40]).unwrap();
        let mut s = Store::open(&path, owner).unwrap();
        s.append(&entries[40..]).unwrap();
        assert_eq!(s.load().unwrap(), entries, "not only what the check read on open");
    }

    #[test]
    fn a_block_filed_under_another_change_is_damage_found_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        let (entries, owner) = busy_day(40);
        Store::open(&path, owner).unwrap().append(&entries).unwrap();
        {
            let db = redb::Database::open(&path).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let mut blocks = tx.open_table(BLOCKS).unwrap();
                let (key, row) = {
                    let (k, v) = blocks.first().unwrap().unwrap();
                    ((k.value().0.to_vec(), k.value().1), v.value().to_vec())
                };
                blocks.remove((&key.0[..], key.1)).unwrap();
                blocks.insert((&key.0[..], key.1 + 1), &row[..]).unwrap();
            }
            tx.commit().unwrap();
        }
        match Store::open(&path, owner) {
            Err(StoreError::Corrupt { path: p, detail }) => {
                assert_eq!(p, path);
                assert!(detail.contains("block"), "{detail}");
            }
            other => panic!("expected Corrupt, got {:?}", other.map(|_| ())),
        }
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
        tx.open_table(TAIL).unwrap().insert(1, &b"\0\0\0\0garbage"[..]).unwrap();
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
