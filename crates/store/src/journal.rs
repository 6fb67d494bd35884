//! The journal's layout (schema 2): each device's entries are sealed, `BLOCK_ENTRIES` at a time, into
//! one deflated block; the newest entries of each device wait in the open tail, one row each.
//!
//! - `tail`: position → CRC-framed postcard entry (a device's entries not yet sealed).
//! - `blocks`: (device, seq of its first entry) → CRC-framed deflate of postcard `[(position, entry)]`.
//!
//! One block holds one device's consecutive entries, so what is shared within it (the market, the
//! device, the automerge actor, the field names) deflates away, and serving a peer one device's
//! changes from a seq on reads that device's blocks only. The apply order is the positions: loading
//! puts every entry back at its position.

use crate::{db_error, frame, frame_bytes, unframe, unframe_bytes, Owner, StoreError};
use redb::{ReadTransaction, ReadableTable, TableDefinition, WriteTransaction};
use stallmesh_identity::DeviceId;
use stallmesh_ledger::{Entry, MAX_CAUSAL_DOTS, MAX_CHANGE_BYTES};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;

pub(crate) const TAIL: TableDefinition<u64, &[u8]> = TableDefinition::new("tail");
pub(crate) const BLOCKS: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("blocks");

/// A device's open tail is sealed once it holds this many entries.
pub const BLOCK_ENTRIES: usize = 32;
/// Most bytes a sealed block's row takes: with redb's leaf header and the block's key it fits one
/// 4 KiB page, where a larger value takes a page of 8 KiB and leaves most of it empty (measured:
/// blocks of 32 sales, ~4.8 KB, made a 20k-sale store 442 bytes per entry by file length, with
/// 151 bytes per entry stored). A block takes the most entries that deflate within it; an entry
/// that alone does not (a photo) is a block of its own.
const MAX_BLOCK_ROW_BYTES: usize = 3_900;
/// Most entries a block read from the file may hold: a build with another `BLOCK_ENTRIES` still
/// reads its files, a damaged length does not allocate.
const MAX_BLOCK_ENTRIES: usize = 1_024;
/// Bound on one entry's encoding: its change (which carries the event's data) and the decoded
/// event, its causal dots, and the signature and ids.
const MAX_ENTRY_BYTES: usize = 2 * MAX_CHANGE_BYTES + MAX_CAUSAL_DOTS * 48 + 1_024;
/// What one block may inflate to before it is refused as damaged.
const MAX_BLOCK_INFLATED_BYTES: usize = MAX_BLOCK_ENTRIES * MAX_ENTRY_BYTES;
const _: () = assert!(BLOCK_ENTRIES >= 2 && BLOCK_ENTRIES <= MAX_BLOCK_ENTRIES);
const _: () = assert!(MAX_BLOCK_ROW_BYTES < 4_096 - 128, "a block and its key within one redb page");

/// A block's row: the CRC frame of the deflated postcard of its (position, entry) pairs.
pub(crate) fn encode_block(entries: &[(u64, Entry)]) -> Vec<u8> {
    let body = postcard::to_allocvec(entries).expect("entries always serialize");
    let mut deflate = flate2::write::DeflateEncoder::new(Vec::with_capacity(body.len() / 2), flate2::Compression::default());
    deflate.write_all(&body).expect("writing to a Vec cannot fail");
    frame_bytes(&deflate.finish().expect("writing to a Vec cannot fail"))
}

/// Decodes one block row as the store reads it: checksum, inflate (bounded), entries.
pub fn decode_block(bytes: &[u8]) -> Result<Vec<(u64, Entry)>, String> {
    let deflated = unframe_bytes(bytes)?;
    let mut body = Vec::new();
    flate2::read::DeflateDecoder::new(deflated)
        .take(MAX_BLOCK_INFLATED_BYTES as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| format!("block does not inflate: {e}"))?;
    if body.len() > MAX_BLOCK_INFLATED_BYTES {
        return Err(format!("block inflates past {MAX_BLOCK_INFLATED_BYTES} bytes"));
    }
    let entries: Vec<(u64, Entry)> = postcard::from_bytes(&body).map_err(|e| format!("block does not decode: {e}"))?;
    if entries.is_empty() || entries.len() > MAX_BLOCK_ENTRIES {
        return Err(format!("block of {} entries (1 to {MAX_BLOCK_ENTRIES})", entries.len()));
    }
    Ok(entries)
}

/// A store's journal as read: every entry in apply order, and the positions of each device's
/// entries still in the open tail.
pub(crate) struct Journal {
    pub(crate) entries: Vec<Entry>,
    pub(crate) tails: HashMap<DeviceId, Vec<u64>>,
}

/// Reads and checks the whole journal: every row's CRC and decoding, every block filed under its
/// device and first seq with consecutive seqs, positions 0..n each once, each device's journal
/// gapless in apply order with its sealed entries before its open ones, and the market the owner's.
pub(crate) fn read_journal(tx: &ReadTransaction, path: &Path, owner: Owner) -> Result<Journal, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt { path: path.into(), detail };
    let mut found: Vec<(u64, Entry, bool)> = Vec::new();
    let blocks = tx.open_table(BLOCKS).map_err(|e| db_error(path, e))?;
    for row in blocks.iter().map_err(|e| db_error(path, e))? {
        let (k, v) = row.map_err(|e| db_error(path, e))?;
        let (device, first_seq) = k.value();
        let device = DeviceId(device.try_into().map_err(|_| corrupt(format!("block key with a {}-byte device", device.len())))?);
        let what = || format!("block {}:{first_seq}", device.to_hex());
        let entries = decode_block(v.value()).map_err(|detail| corrupt(format!("{}: {detail}", what())))?;
        for (i, (position, entry)) in entries.into_iter().enumerate() {
            if entry.change.device != device || Some(entry.change.seq) != first_seq.checked_add(i as u64) {
                return Err(corrupt(format!("{} holds change {}:{} at {i}", what(), entry.change.device.to_hex(), entry.change.seq)));
            }
            found.push((position, entry, true));
        }
    }
    let tail = tx.open_table(TAIL).map_err(|e| db_error(path, e))?;
    for row in tail.iter().map_err(|e| db_error(path, e))? {
        let (k, v) = row.map_err(|e| db_error(path, e))?;
        let entry = unframe(v.value()).map_err(|detail| corrupt(format!("journal entry {}: {detail}", k.value())))?;
        found.push((k.value(), entry, false));
    }

    // Each entry back at its position: positions must be exactly 0..n.
    let n = found.len();
    let mut slots: Vec<Option<(Entry, bool)>> = (0..n).map(|_| None).collect();
    for (position, entry, sealed) in found {
        let slot = usize::try_from(position)
            .ok()
            .and_then(|p| slots.get_mut(p))
            .ok_or_else(|| corrupt(format!("journal entry {position} lies past the {n} entries stored")))?;
        if slot.replace((entry, sealed)).is_some() {
            return Err(corrupt(format!("journal entry {position} is stored twice")));
        }
    }
    let mut next_seq: HashMap<DeviceId, (u64, bool)> = HashMap::new();
    let mut journal = Journal { entries: Vec::with_capacity(n), tails: HashMap::new() };
    for (position, slot) in slots.into_iter().enumerate() {
        let (entry, sealed) = slot.expect("n entries at n distinct positions below n fill every slot");
        let (device, seq) = (entry.change.device, entry.change.seq);
        if entry.change.market != owner.market {
            return Err(corrupt(format!("journal entry {position} belongs to market {}", entry.change.market.to_hex())));
        }
        let (next, open) = next_seq.entry(device).or_insert((0, false));
        if seq != *next {
            return Err(corrupt(format!("journal entry {position} is change {}:{seq}, expected seq {next}", device.to_hex())));
        }
        if sealed && *open {
            return Err(corrupt(format!("journal entry {position} is sealed after an open entry of its device")));
        }
        *next += 1;
        if !sealed {
            *open = true;
            journal.tails.entry(device).or_default().push(position as u64);
        }
        journal.entries.push(entry);
    }
    Ok(journal)
}

/// The largest prefix of `open` (at least one entry) whose block row fits `MAX_BLOCK_ROW_BYTES`,
/// encoded: starts from all of it and shrinks in proportion to the overshoot.
fn seal_prefix(open: &[(u64, Entry)]) -> (usize, Vec<u8>) {
    debug_assert!(!open.is_empty());
    let mut take = open.len();
    loop {
        let row = encode_block(&open[..take]);
        if row.len() <= MAX_BLOCK_ROW_BYTES || take == 1 {
            return (take, row);
        }
        // Shrink by the overshoot, and by at least one entry.
        let scaled = take * MAX_BLOCK_ROW_BYTES / row.len();
        take = scaled.min(take - 1).max(1);
    }
}

/// Writes `entries` at positions from `start`, inside `tx`: each device's open tail gains its new
/// entries and, once it holds `BLOCK_ENTRIES`, is sealed into blocks (oldest first) until fewer
/// remain. Only what stays open is written as a row, and a device's stored open entries are read
/// back only when it seals. Returns the open tails of the devices it touched, to replace the
/// caller's once `tx` commits.
pub(crate) fn write_entries(
    tx: &WriteTransaction,
    path: &Path,
    tails: &HashMap<DeviceId, Vec<u64>>,
    start: u64,
    entries: &[Entry],
) -> Result<HashMap<DeviceId, Vec<u64>>, StoreError> {
    let err = |e: redb::StorageError| db_error(path, e);
    let corrupt = |detail: String| StoreError::Corrupt { path: path.into(), detail };
    let mut tail = tx.open_table(TAIL).map_err(|e| db_error(path, e))?;
    let mut blocks = tx.open_table(BLOCKS).map_err(|e| db_error(path, e))?;
    // The new entries per device, devices in the order they first appear: the same appends lay
    // out the same file.
    let mut groups: Vec<(DeviceId, Vec<(u64, &Entry)>)> = Vec::new();
    let mut group_of: HashMap<DeviceId, usize> = HashMap::new();
    for (position, entry) in (start..).zip(entries) {
        let device = entry.change.device;
        let i = *group_of.entry(device).or_insert_with(|| {
            groups.push((device, Vec::new()));
            groups.len() - 1
        });
        groups[i].1.push((position, entry));
    }
    let mut touched = HashMap::with_capacity(groups.len());
    for (device, fresh) in groups {
        let stored = tails.get(&device).map_or(&[][..], Vec::as_slice);
        let mut open: Vec<u64> = stored.iter().copied().chain(fresh.iter().map(|(p, _)| *p)).collect();
        if open.len() >= BLOCK_ENTRIES {
            let mut pending = Vec::with_capacity(open.len());
            for &p in stored {
                let row = tail.get(p).map_err(err)?.ok_or_else(|| corrupt(format!("open journal entry {p} is missing")))?;
                pending.push((p, unframe(row.value()).map_err(|detail| corrupt(format!("journal entry {p}: {detail}")))?));
            }
            pending.extend(fresh.iter().map(|(p, e)| (*p, (*e).clone())));
            while pending.len() >= BLOCK_ENTRIES {
                let (take, row) = seal_prefix(&pending);
                let first_seq = pending[0].1.change.seq;
                debug_assert!(pending[..take].iter().enumerate().all(|(i, (_, e))| e.change.seq == first_seq + i as u64));
                let replaced = blocks.insert((&device.0[..], first_seq), &row[..]).map_err(err)?.is_some();
                assert!(!replaced, "block {device}:{first_seq} written twice");
                // Entries from earlier appends have a row to remove; this append's have none yet.
                for (position, _) in pending.drain(..take).filter(|(p, _)| *p < start) {
                    tail.remove(position).map_err(err)?;
                }
            }
            open = pending.into_iter().map(|(p, _)| p).collect();
        }
        // What stays open of this append's entries: the newest positions, the last of `fresh`.
        let unsealed = open.iter().filter(|p| **p >= start).count();
        for (position, entry) in &fresh[fresh.len() - unsealed..] {
            let replaced = tail.insert(*position, &frame(entry)[..]).map_err(err)?.is_some();
            // The ledger hands over each journal position once.
            assert!(!replaced, "journal position {position} written twice");
        }
        touched.insert(device, open);
    }
    Ok(touched)
}
