//! Evidence of equivocation: validly signed changes that contradict the journal held at their
//! position. Kept durably beside the journal (never in it: they were never applied), so a replica
//! still shows a cloned device's other history after a restart.

use crate::{frame_bytes, unframe_bytes, Store, StoreError};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use stallmesh_identity::SignedChange;

/// (device, seq, digest of the conflicting change) → CRC-framed postcard `SignedChange`.
const EVIDENCE: TableDefinition<(&[u8], u64, &[u8]), &[u8]> = TableDefinition::new("evidence");

impl Store {
    /// Durably keeps conflicting changes (each once, by digest).
    pub fn keep_evidence(&mut self, changes: &[SignedChange]) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
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
        let tx = self.db.begin_read().map_err(self.err())?;
        let table = match tx.open_table(EVIDENCE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.err()(e)),
        };
        let mut out = Vec::new();
        for row in table.iter().map_err(self.err())? {
            let (_, v) = row.map_err(self.err())?;
            let body = unframe_bytes(v.value())
                .map_err(|detail| StoreError::Corrupt { path: self.path.clone(), detail: format!("evidence: {detail}") })?;
            let change: SignedChange = postcard::from_bytes(body)
                .map_err(|e| StoreError::Corrupt { path: self.path.clone(), detail: format!("evidence row does not decode: {e}") })?;
            out.push(change);
        }
        Ok(out)
    }
}
