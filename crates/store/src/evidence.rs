//! Evidence of equivocation: validly signed changes that contradict the journal held at their
//! position. Kept durably beside the journal (never in it: they were never applied), so a replica
//! still shows a cloned device's other history after a restart.

use crate::{frame_bytes, no_panic, unframe_bytes, Store, StoreError};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use stallmesh_identity::SignedChange;
use std::path::Path;

/// (device, seq, digest of the conflicting change) → CRC-framed postcard `SignedChange`.
#[allow(clippy::type_complexity)] // redb's table types are spelt out where they are defined
const EVIDENCE: TableDefinition<(&[u8], u64, &[u8]), &[u8]> = TableDefinition::new("evidence");

/// Reads (and so verifies) every evidence row: part of the check a file passes before it is opened.
pub(crate) fn read_evidence(db: &impl ReadableDatabase, path: &Path) -> Result<Vec<SignedChange>, StoreError> {
    let db_err = |e: redb::Error| crate::db_error(path, e);
    let corrupt = |detail: String| StoreError::Corrupt { path: path.into(), detail };
    let tx = db.begin_read().map_err(|e| db_err(e.into()))?;
    let table = match tx.open_table(EVIDENCE) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(db_err(e.into())),
    };
    let mut out = Vec::new();
    for row in table.iter().map_err(|e| db_err(e.into()))? {
        let (k, v) = row.map_err(|e| db_err(e.into()))?;
        let body = unframe_bytes(v.value()).map_err(|detail| corrupt(format!("evidence: {detail}")))?;
        let change: SignedChange = postcard::from_bytes(body).map_err(|e| corrupt(format!("evidence row does not decode: {e}")))?;
        let (device, seq, digest) = k.value();
        if device != change.device.0 || seq != change.seq || digest != change.digest().0 {
            return Err(corrupt("evidence row is filed under another change".into()));
        }
        out.push(change);
    }
    Ok(out)
}

impl Store {
    /// Durably keeps conflicting changes (each once, by digest).
    pub fn keep_evidence(&mut self, changes: &[SignedChange]) -> Result<(), StoreError> {
        self.refuse_if_damaged()?;
        if changes.is_empty() {
            return Ok(());
        }
        self.guarded("keeping evidence", |s| s.keep_evidence_unguarded(changes))
    }

    fn keep_evidence_unguarded(&mut self, changes: &[SignedChange]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(self.err())?;
        {
            let mut table = tx.open_table(EVIDENCE).map_err(self.err())?;
            for c in changes {
                let body = postcard::to_allocvec(c).expect("signed changes always serialize");
                table.insert((&c.device.0[..], c.seq, &c.digest().0[..]), &frame_bytes(&body)[..]).map_err(self.err())?;
            }
        }
        tx.commit().map_err(self.err())
    }

    /// Every change kept as evidence, by position.
    pub fn evidence(&self) -> Result<Vec<SignedChange>, StoreError> {
        let result = no_panic(&self.path, "reading evidence", || read_evidence(&self.db, &self.path));
        self.note(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Owner;
    use stallmesh_ledger::testkit::TestMarket;

    #[test]
    fn evidence_is_kept_across_a_restart_and_a_damaged_row_is_damage_found_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let m = TestMarket::new(9);
        let (l, _) = m.device(1, "Stall");
        let owner = Owner { market: m.ctx.market, device: l.device() };
        let (_, e1) = m.device(2, "Stall");
        let (_, e2) = m.device(3, "Stall");
        let kept = vec![e1.change.clone(), e2.change.clone()];
        {
            let mut s = Store::open(&path, owner).unwrap();
            s.keep_evidence(&kept).unwrap();
            s.keep_evidence(&kept[..1]).unwrap(); // kept once
        }
        let mut sorted = kept.clone();
        sorted.sort_by_key(|c| (c.device, c.seq));
        assert_eq!(Store::open(&path, owner).unwrap().evidence().unwrap(), sorted);

        // A row whose bytes no longer match its checksum: the file is refused as damaged on open.
        {
            let db = redb::Database::open(&path).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let mut t = tx.open_table(EVIDENCE).unwrap();
                t.insert((&e1.change.device.0[..], e1.change.seq, &e1.change.digest().0[..]), &b"\0\0\0\0garbage"[..]).unwrap();
            }
            tx.commit().unwrap();
        }
        match Store::open(&path, owner) {
            Err(StoreError::Corrupt { path: p, detail }) => {
                assert_eq!(p, path);
                assert!(detail.contains("evidence"), "{detail}");
            }
            other => panic!("expected Corrupt, got {:?}", other.map(|_| ())),
        }
    }
}
