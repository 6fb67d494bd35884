//! The embedded store: one redb file in the cloud's data directory, for a newcomer's first run
//! and for small deployments. redb locks the file, so only one process serves it; within that
//! process the service's per-market lock serialises offset assignment.

use super::{decode_entry, encode_entry, Events, MarketRegistration, OnlineRegistration, Registered, StoreError};
use stallmesh_shop::{Hold, HoldsRead, HoldsWanted};
use crate::projection::log_event;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use stallmesh_identity::{Certificate, MarketId, MarketPublicKey, SignedChange};
use stallmesh_ingest::{LogRecord, RejectedChange};
use std::path::Path;

/// market id → [`MarketRow`] (postcard).
const MARKETS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("markets");
/// (market id, offset) → the logged entry (postcard).
const LOG: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("log");
/// (market id, number) → a rejected change (postcard), numbered per market.
const REJECTIONS: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("rejections");
/// (market id, digest) → a conflicting change kept as evidence (postcard).
const EVIDENCE: TableDefinition<(&[u8], &[u8]), &[u8]> = TableDefinition::new("evidence");
/// market id → [`OnlineRow`] (postcard): the market's online channel.
const ONLINE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("online");
/// (market id, hold id) → a [`Hold`] (postcard).
const HOLDS: TableDefinition<(&[u8], &str), &[u8]> = TableDefinition::new("holds");

#[derive(Serialize, Deserialize)]
struct OnlineRow {
    device_secret: [u8; 32],
    certificate: Certificate,
}

#[derive(Serialize, Deserialize)]
struct MarketRow {
    name: String,
    market_key: MarketPublicKey,
    device_secret: [u8; 32],
    certificate: Certificate,
    registered_at_ms: u64,
    next_offset: u64,
    rejections: u64,
}

pub struct EmbeddedStore {
    db: Database,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl EmbeddedStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|e| StoreError::Unavailable(format!("{}: {e}", path.display())))?;
        let tx = db.begin_write().map_err(unavailable)?;
        {
            tx.open_table(MARKETS).map_err(unavailable)?;
            tx.open_table(LOG).map_err(unavailable)?;
            tx.open_table(REJECTIONS).map_err(unavailable)?;
            tx.open_table(EVIDENCE).map_err(unavailable)?;
            tx.open_table(ONLINE).map_err(unavailable)?;
            tx.open_table(HOLDS).map_err(unavailable)?;
        }
        tx.commit().map_err(unavailable)?;
        Ok(Self { db })
    }

    fn row(&self, market: &MarketId) -> Result<Option<MarketRow>, StoreError> {
        let tx = self.db.begin_read().map_err(unavailable)?;
        let t = tx.open_table(MARKETS).map_err(unavailable)?;
        match t.get(&market.0[..]).map_err(unavailable)? {
            None => Ok(None),
            Some(v) => postcard::from_bytes(v.value()).map(Some).map_err(|e| StoreError::Corrupt(e.to_string())),
        }
    }

    fn registration(market: MarketId, row: MarketRow) -> MarketRegistration {
        MarketRegistration {
            market,
            name: row.name,
            market_key: row.market_key,
            device_secret: row.device_secret,
            certificate: row.certificate,
            registered_at_ms: row.registered_at_ms,
        }
    }

    pub fn register(&self, reg: &MarketRegistration, first: &[LogRecord]) -> Result<Registered, StoreError> {
        // Checked inside the write transaction (redb has one writer at a time), so two concurrent
        // registrations cannot both write a first enrolment of the cloud device.
        let tx = self.db.begin_write().map_err(unavailable)?;
        {
            let mut markets = tx.open_table(MARKETS).map_err(unavailable)?;
            let existing: Option<MarketRow> = match markets.get(&reg.market.0[..]).map_err(unavailable)? {
                Some(v) => Some(postcard::from_bytes(v.value()).map_err(|e| StoreError::Corrupt(e.to_string()))?),
                None => None,
            };
            if let Some(row) = existing {
                return if row.certificate.device == reg.certificate.device { Ok(Registered::Already) } else { Err(StoreError::Conflict(reg.market)) };
            }
            let mut log = tx.open_table(LOG).map_err(unavailable)?;
            for r in first {
                log.insert((&reg.market.0[..], r.offset), &encode_entry(&r.entry)[..]).map_err(unavailable)?;
            }
            let row = MarketRow {
                name: reg.name.clone(),
                market_key: reg.market_key,
                device_secret: reg.device_secret,
                certificate: reg.certificate.clone(),
                registered_at_ms: reg.registered_at_ms,
                next_offset: 1 + first.len() as u64,
                rejections: 0,
            };
            markets.insert(&reg.market.0[..], &postcard::to_allocvec(&row).expect("rows serialize")[..]).map_err(unavailable)?;
        }
        tx.commit().map_err(unavailable)?;
        Ok(Registered::New)
    }

    pub fn markets(&self) -> Result<Vec<MarketRegistration>, StoreError> {
        let tx = self.db.begin_read().map_err(unavailable)?;
        let t = tx.open_table(MARKETS).map_err(unavailable)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(unavailable)? {
            let (k, v) = item.map_err(unavailable)?;
            let id: [u8; 16] = k.value().try_into().map_err(|_| StoreError::Corrupt("market id of the wrong length".into()))?;
            let row: MarketRow = postcard::from_bytes(v.value()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            out.push(Self::registration(MarketId(id), row));
        }
        Ok(out)
    }

    pub fn market(&self, market: &MarketId) -> Result<Option<MarketRegistration>, StoreError> {
        Ok(self.row(market)?.map(|row| Self::registration(*market, row)))
    }

    pub fn next_offset(&self, market: &MarketId) -> Result<u64, StoreError> {
        Ok(self.row(market)?.ok_or(StoreError::UnknownMarket(*market))?.next_offset)
    }

    pub fn load_log(&self, market: &MarketId, after: u64) -> Result<Vec<LogRecord>, StoreError> {
        self.records(market, after, usize::MAX)
    }

    fn records(&self, market: &MarketId, after: u64, limit: usize) -> Result<Vec<LogRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(unavailable)?;
        let t = tx.open_table(LOG).map_err(unavailable)?;
        // Nothing comes after the last possible offset.
        let Some(from) = after.checked_add(1) else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for item in t.range((&market.0[..], from)..=(&market.0[..], u64::MAX)).map_err(unavailable)?.take(limit) {
            let (k, v) = item.map_err(unavailable)?;
            out.push(LogRecord { offset: k.value().1, entry: decode_entry(v.value())? });
        }
        Ok(out)
    }

    pub fn events(&self, market: &MarketId, after: u64, limit: usize) -> Result<Events, StoreError> {
        Ok(self.records(market, after, limit)?.iter().map(|r| log_event(market, r)).collect())
    }

    pub fn online(&self, market: &MarketId) -> Result<Option<OnlineRegistration>, StoreError> {
        let tx = self.db.begin_read().map_err(unavailable)?;
        let t = tx.open_table(ONLINE).map_err(unavailable)?;
        match t.get(&market.0[..]).map_err(unavailable)? {
            None => Ok(None),
            Some(v) => {
                let row: OnlineRow = postcard::from_bytes(v.value()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                Ok(Some(OnlineRegistration { device_secret: row.device_secret, certificate: row.certificate }))
            }
        }
    }

    pub fn set_online(&self, market: &MarketId, online: &OnlineRegistration) -> Result<Registered, StoreError> {
        let tx = self.db.begin_write().map_err(unavailable)?;
        {
            if tx.open_table(MARKETS).map_err(unavailable)?.get(&market.0[..]).map_err(unavailable)?.is_none() {
                return Err(StoreError::UnknownMarket(*market));
            }
            let mut t = tx.open_table(ONLINE).map_err(unavailable)?;
            let existing: Option<OnlineRow> = match t.get(&market.0[..]).map_err(unavailable)? {
                Some(v) => Some(postcard::from_bytes(v.value()).map_err(|e| StoreError::Corrupt(e.to_string()))?),
                None => None,
            };
            if let Some(row) = existing {
                return if row.certificate.device == online.certificate.device { Ok(Registered::Already) } else { Err(StoreError::Conflict(*market)) };
            }
            let row = OnlineRow { device_secret: online.device_secret, certificate: online.certificate.clone() };
            t.insert(&market.0[..], &postcard::to_allocvec(&row).expect("rows serialize")[..]).map_err(unavailable)?;
        }
        tx.commit().map_err(unavailable)?;
        Ok(Registered::New)
    }

    fn holds_of(&self, market: &MarketId) -> Result<Vec<Hold>, StoreError> {
        let tx = self.db.begin_read().map_err(unavailable)?;
        let t = tx.open_table(HOLDS).map_err(unavailable)?;
        let mut out = Vec::new();
        // Every id sorts after "" and before the first string past hex digits.
        for item in t.range((&market.0[..], "")..(&market.0[..], "~")).map_err(unavailable)? {
            let (_, v) = item.map_err(unavailable)?;
            out.push(postcard::from_bytes(v.value()).map_err(|e| StoreError::Corrupt(e.to_string()))?);
        }
        Ok(out)
    }

    /// The caller holds the market's lock in the service (see the module's comment).
    pub fn begin(&self, market: &MarketId) -> Result<EmbeddedTx<'_>, StoreError> {
        let next_offset = self.next_offset(market)?;
        Ok(EmbeddedTx { store: self, market: *market, next_offset })
    }
}

pub struct EmbeddedTx<'a> {
    store: &'a EmbeddedStore,
    market: MarketId,
    next_offset: u64,
}

impl EmbeddedTx<'_> {
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    pub fn load_after(&mut self, after: u64) -> Result<Vec<LogRecord>, StoreError> {
        self.store.load_log(&self.market, after)
    }

    /// Scans the market's holds: one process, a few thousand holds at most per drop.
    pub fn holds_for(&self, wanted: &HoldsWanted, now_ms: u64) -> Result<HoldsRead, StoreError> {
        if wanted.is_empty() {
            return Ok(HoldsRead::default());
        }
        Ok(HoldsRead::of(&self.store.holds_of(&self.market)?, wanted, now_ms))
    }

    pub fn commit(
        self,
        records: &[LogRecord],
        rejected: &[RejectedChange],
        evidence: &[SignedChange],
        holds: &[Hold],
        _now_ms: u64,
    ) -> Result<(), StoreError> {
        if records.is_empty() && rejected.is_empty() && evidence.is_empty() && holds.is_empty() {
            return Ok(());
        }
        let m = &self.market.0[..];
        let tx = self.store.db.begin_write().map_err(unavailable)?;
        {
            let mut markets = tx.open_table(MARKETS).map_err(unavailable)?;
            let mut row: MarketRow = {
                let v = markets.get(m).map_err(unavailable)?.ok_or(StoreError::UnknownMarket(self.market))?;
                postcard::from_bytes(v.value()).map_err(|e| StoreError::Corrupt(e.to_string()))?
            };
            if row.next_offset != self.next_offset {
                return Err(StoreError::OffsetMoved { market: self.market, expected: self.next_offset, found: row.next_offset });
            }
            let mut log = tx.open_table(LOG).map_err(unavailable)?;
            for r in records {
                let previous = log.insert((m, r.offset), &encode_entry(&r.entry)[..]).map_err(unavailable)?;
                assert!(previous.is_none(), "an offset is written once");
            }
            let mut rejections = tx.open_table(REJECTIONS).map_err(unavailable)?;
            for r in rejected {
                row.rejections += 1;
                rejections.insert((m, row.rejections), &postcard::to_allocvec(r).expect("serializes")[..]).map_err(unavailable)?;
            }
            let mut kept = tx.open_table(EVIDENCE).map_err(unavailable)?;
            for c in evidence {
                kept.insert((m, &c.digest().0[..]), &postcard::to_allocvec(c).expect("serializes")[..]).map_err(unavailable)?;
            }
            let mut held = tx.open_table(HOLDS).map_err(unavailable)?;
            for h in holds {
                held.insert((m, h.id.as_str()), &postcard::to_allocvec(h).expect("serializes")[..]).map_err(unavailable)?;
            }
            row.next_offset += records.len() as u64;
            markets.insert(m, &postcard::to_allocvec(&row).expect("rows serialize")[..]).map_err(unavailable)?;
        }
        tx.commit().map_err(unavailable)?;
        Ok(())
    }
}
