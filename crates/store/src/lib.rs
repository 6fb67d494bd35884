//! The node's durable store: one redb file holding every journal entry this replica has applied.
//!
//! - `journal`: position → entry (signed change + decoded event), in the order the ledger applied
//!   them, which is a causal order: restoring in that order never sees negative stock rights.
//! - `by_dot`: (device, seq) → position, to serve a peer the changes it lacks.
//! - `meta`: schema version and the (market, device) this file belongs to.
//!
//! Every entry row carries a CRC-32 of its bytes, so a flipped bit is reported, never folded into
//! the state. `append` returns only after redb's durable commit: callers acknowledge after it.

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use stallmesh_identity::{DeviceId, MarketId, SignedChange};
use stallmesh_ledger::Entry;
use std::path::{Path, PathBuf};

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
    #[error("{path}: store is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("{path}: store belongs to {found}, this node is {expected}")]
    WrongOwner { path: PathBuf, expected: String, found: String },
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

impl Store {
    /// Opens (or creates) the store at `path` for `owner`. An existing but empty, truncated or
    /// corrupt file is an error naming the file: it is never silently re-initialised.
    pub fn open(path: &Path, owner: Owner) -> Result<Self, StoreError> {
        let p = path.to_path_buf();
        let db = match std::fs::metadata(path) {
            Ok(m) if m.len() == 0 => return Err(StoreError::Corrupt { path: p, detail: "file is empty (truncated?)".into() }),
            Ok(_) => Database::open(path),
            Err(_) => Database::create(path),
        }
        .map_err(|source| match source {
            redb::DatabaseError::Storage(e) => StoreError::Corrupt { path: p.clone(), detail: e.to_string() },
            source => StoreError::Open { path: p.clone(), source: Box::new(source) },
        })?;
        let mut store = Self { db, path: p, next_position: 0, unflushed: false };
        store.init(owner)?;
        Ok(store)
    }

    fn err<E: Into<redb::Error>>(&self) -> impl FnOnce(E) -> StoreError + '_ {
        move |e| match e.into() {
            redb::Error::Corrupted(detail) => StoreError::Corrupt { path: self.path.clone(), detail },
            source => StoreError::Db { path: self.path.clone(), source: Box::new(source) },
        }
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
                Some(v) => {
                    return Err(StoreError::Corrupt {
                        path: self.path.clone(),
                        detail: format!("unknown schema version {v:?}, expected {SCHEMA_VERSION}"),
                    })
                }
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

    /// Makes every relaxed commit durable.
    pub fn flush(&mut self) -> Result<(), StoreError> {
        if !self.unflushed {
            return Ok(());
        }
        let tx = self.db.begin_write().map_err(self.err())?;
        tx.commit().map_err(self.err())?;
        self.unflushed = false;
        Ok(())
    }

    fn append_with(&mut self, entries: &[Entry], durable: bool) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut tx = self.db.begin_write().map_err(self.err())?;
        if !durable {
            tx.set_durability(redb::Durability::None)
                .map_err(|e| StoreError::Corrupt { path: self.path.clone(), detail: e.to_string() })?;
        }
        let mut position = self.next_position;
        {
            let mut journal = tx.open_table(JOURNAL).map_err(self.err())?;
            let mut by_dot = tx.open_table(BY_DOT).map_err(self.err())?;
            for entry in entries {
                journal.insert(position, &frame(entry)[..]).map_err(self.err())?;
                by_dot.insert((&entry.change.device.0[..], entry.change.seq), position).map_err(self.err())?;
                position += 1;
            }
        }
        tx.commit().map_err(self.err())?;
        self.next_position = position;
        self.unflushed = !durable;
        Ok(())
    }

    /// Every entry, in the order it was appended.
    pub fn load(&self) -> Result<Vec<Entry>, StoreError> {
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
    }

    /// Up to `limit` (at most [`MAX_CHANGES_PER_READ`]) changes of `device` from `from_seq` on.
    pub fn changes_since(&self, device: &DeviceId, from_seq: u64, limit: usize) -> Result<Vec<SignedChange>, StoreError> {
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
            let entry = unframe(bytes.value())
                .map_err(|detail| StoreError::Corrupt { path: self.path.clone(), detail: format!("journal entry {position}: {detail}") })?;
            out.push(entry.change);
        }
        Ok(out)
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
