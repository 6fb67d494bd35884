//! Schema 1, read once to upgrade: one CRC-framed postcard row per entry (`journal`, by position)
//! and a (device, seq) → position index (`by_dot`). Schema 2 keeps the rows of the open tail in the
//! same framing and seals them into deflated blocks per device, with no index on disk.

use crate::{db_error, unframe, StoreError};
use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use stallmesh_identity::DeviceId;
use stallmesh_ledger::Entry;
use std::collections::HashMap;
use std::path::Path;

pub(crate) const JOURNAL_V1: TableDefinition<u64, &[u8]> = TableDefinition::new("journal");
pub(crate) const BY_DOT_V1: TableDefinition<(&[u8], u64), u64> = TableDefinition::new("by_dot");

/// Every entry of a schema-1 store, checked as schema 1 checked it: each row's CRC and decoding,
/// positions without gaps, and the index one-to-one with the journal.
pub(crate) fn read_v1(tx: &redb::ReadTransaction, path: &Path) -> Result<Vec<Entry>, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt { path: path.into(), detail };
    let journal = tx.open_table(JOURNAL_V1).map_err(|e| db_error(path, e))?;
    let mut dots: HashMap<(DeviceId, u64), u64> = HashMap::new();
    let mut entries = Vec::with_capacity(journal.len().map_err(|e| db_error(path, e))? as usize);
    for row in journal.iter().map_err(|e| db_error(path, e))? {
        let (k, v) = row.map_err(|e| db_error(path, e))?;
        let position = k.value();
        if position != entries.len() as u64 {
            return Err(corrupt(format!("journal skips from entry {} to {position}", entries.len())));
        }
        let entry = unframe(v.value()).map_err(|detail| corrupt(format!("journal entry {position}: {detail}")))?;
        if dots.insert((entry.change.device, entry.change.seq), position).is_some() {
            return Err(corrupt(format!("journal entry {position} repeats change {}:{}", entry.change.device.to_hex(), entry.change.seq)));
        }
        entries.push(entry);
    }
    let by_dot = tx.open_table(BY_DOT_V1).map_err(|e| db_error(path, e))?;
    let mut indexed = 0usize;
    for row in by_dot.iter().map_err(|e| db_error(path, e))? {
        let (k, v) = row.map_err(|e| db_error(path, e))?;
        let (device, seq) = k.value();
        let device = DeviceId(device.try_into().map_err(|_| corrupt(format!("index key with a {}-byte device", device.len())))?);
        if dots.get(&(device, seq)) != Some(&v.value()) {
            return Err(corrupt(format!("index entry {}:{seq} -> {} does not match the journal", device.to_hex(), v.value())));
        }
        indexed += 1;
    }
    if indexed != entries.len() {
        return Err(corrupt(format!("index holds {indexed} entries, the journal {}", entries.len())));
    }
    Ok(entries)
}

/// Removes the schema-1 tables (inside the upgrade's one transaction).
pub(crate) fn drop_v1(tx: &WriteTransaction, path: &Path) -> Result<(), StoreError> {
    tx.delete_table(JOURNAL_V1).map_err(|e| db_error(path, e))?;
    tx.delete_table(BY_DOT_V1).map_err(|e| db_error(path, e))?;
    Ok(())
}
