//! Where the cloud keeps its markets and their reconciled logs: an embedded redb file by default
//! (one process), PostgreSQL for real use (several processes against one database).
//!
//! Every ingested batch is one transaction: the log records, their relational projections, the
//! rejections and the market's next offset, so a crash never leaves the tables and the log
//! disagreeing. Offsets are assigned under a per-market lock ([`Store::begin`]): the market's row
//! `FOR UPDATE` in PostgreSQL, an in-process mutex for the embedded store, whose file only one
//! process may open. Different markets never wait for each other in PostgreSQL.

pub mod embedded;
pub mod postgres;

use stallmesh_api::cloud::LogEvent;
use stallmesh_identity::{Certificate, DeviceKey, MarketId, MarketPublicKey, SignedChange};
use stallmesh_ingest::{LogRecord, RejectedChange};
use stallmesh_shop::{Hold, HoldsRead, HoldsWanted};

/// A market the cloud serves, with the credentials of its own device of that market (enrolled by
/// the organiser with role `cloud`). Kept in the store, so any cloud process can serve any market.
#[derive(Clone)]
pub struct MarketRegistration {
    pub market: MarketId,
    pub name: String,
    pub market_key: MarketPublicKey,
    pub device_secret: [u8; 32],
    pub certificate: Certificate,
    pub registered_at_ms: u64,
}

impl MarketRegistration {
    pub fn device_key(&self) -> DeviceKey {
        DeviceKey::from_secret(self.device_secret)
    }
}

impl std::fmt::Debug for MarketRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MarketRegistration")
            .field("market", &self.market)
            .field("name", &self.name)
            .field("cloud_device", &self.certificate.device)
            .finish_non_exhaustive()
    }
}

/// A market's online channel: the device of role `online` (enrolled by the organiser) that the
/// cloud runs for it, selling online from the stock rights it holds.
#[derive(Clone)]
pub struct OnlineRegistration {
    pub device_secret: [u8; 32],
    pub certificate: Certificate,
}

impl OnlineRegistration {
    pub fn device_key(&self) -> DeviceKey {
        DeviceKey::from_secret(self.device_secret)
    }
}

impl std::fmt::Debug for OnlineRegistration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnlineRegistration").field("device", &self.certificate.device).finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registered {
    New,
    /// The same market with the same cloud device was registered already: nothing changed.
    Already,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("market {0} is already registered with another cloud device")]
    Conflict(MarketId),
    #[error("market {0} is not registered")]
    UnknownMarket(MarketId),
    /// The log moved under a lock this process believed it held: a bug, or a second process on an
    /// embedded store. The caller drops its view of the market and reloads.
    #[error("market {market}: expected next offset {expected}, the store has {found}")]
    OffsetMoved { market: MarketId, expected: u64, found: u64 },
    #[error("the cloud store is unavailable: {0}")]
    Unavailable(String),
    #[error("the cloud store holds an unreadable record: {0}")]
    Corrupt(String),
}

/// Events of a market's log from an offset on, as consumers read them.
pub type Events = Vec<LogEvent>;

pub enum Store {
    Embedded(embedded::EmbeddedStore),
    Postgres(postgres::PgStore),
}

impl Store {
    pub fn kind(&self) -> &'static str {
        match self {
            Store::Embedded(_) => "embedded",
            Store::Postgres(_) => "postgres",
        }
    }

    /// Registers a market with the first records of its log (the cloud device's enrolment), in
    /// one transaction.
    pub async fn register(&self, reg: &MarketRegistration, first: &[LogRecord]) -> Result<Registered, StoreError> {
        match self {
            Store::Embedded(s) => s.register(reg, first),
            Store::Postgres(s) => s.register(reg, first).await,
        }
    }

    pub async fn markets(&self) -> Result<Vec<MarketRegistration>, StoreError> {
        match self {
            Store::Embedded(s) => s.markets(),
            Store::Postgres(s) => s.markets().await,
        }
    }

    pub async fn market(&self, market: &MarketId) -> Result<Option<MarketRegistration>, StoreError> {
        match self {
            Store::Embedded(s) => s.market(market),
            Store::Postgres(s) => s.market(market).await,
        }
    }

    /// The market's online channel, if one was set up.
    pub async fn online(&self, market: &MarketId) -> Result<Option<OnlineRegistration>, StoreError> {
        match self {
            Store::Embedded(s) => s.online(market),
            Store::Postgres(s) => s.online(market).await,
        }
    }

    /// Sets up the market's online channel (once: a second device is a conflict).
    pub async fn set_online(&self, market: &MarketId, online: &OnlineRegistration, now_ms: u64) -> Result<Registered, StoreError> {
        match self {
            Store::Embedded(s) => s.set_online(market, online),
            Store::Postgres(s) => s.set_online(market, online, now_ms).await,
        }
    }

    /// The market's log records with offset > `after`, in order (to rebuild the ingest core).
    pub async fn load_log(&self, market: &MarketId, after: u64) -> Result<Vec<LogRecord>, StoreError> {
        match self {
            Store::Embedded(s) => s.load_log(market, after),
            Store::Postgres(s) => s.load_log(market, after).await,
        }
    }

    /// Up to `limit` events with offset > `after`, in order.
    pub async fn events(&self, market: &MarketId, after: u64, limit: usize) -> Result<Events, StoreError> {
        match self {
            Store::Embedded(s) => s.events(market, after, limit),
            Store::Postgres(s) => s.events(market, after, limit).await,
        }
    }

    /// The market's next offset as stored (its log holds `next - 1` records).
    pub async fn next_offset(&self, market: &MarketId) -> Result<u64, StoreError> {
        match self {
            Store::Embedded(s) => s.next_offset(market),
            Store::Postgres(s) => s.next_offset(market).await,
        }
    }

    /// Takes the market's offset lock. The caller catches up with [`MarketTx::load_after`] if the
    /// stored next offset moved past its own, ingests, then [`MarketTx::commit`]s; dropping the
    /// transaction rolls back.
    pub async fn begin(&self, market: &MarketId) -> Result<MarketTx<'_>, StoreError> {
        Ok(match self {
            Store::Embedded(s) => MarketTx::Embedded(s.begin(market)?),
            Store::Postgres(s) => MarketTx::Postgres(s.begin(market).await?),
        })
    }
}

/// A market's offset lock, held until commit or drop.
pub enum MarketTx<'a> {
    Embedded(embedded::EmbeddedTx<'a>),
    Postgres(postgres::PgTx),
}

impl MarketTx<'_> {
    /// The stored next offset, read under the lock.
    pub fn next_offset(&self) -> u64 {
        match self {
            MarketTx::Embedded(t) => t.next_offset(),
            MarketTx::Postgres(t) => t.next_offset(),
        }
    }

    /// Records with offset > `after` appended by another process (under the lock, so complete).
    pub async fn load_after(&mut self, after: u64) -> Result<Vec<LogRecord>, StoreError> {
        match self {
            MarketTx::Embedded(t) => t.load_after(after),
            MarketTx::Postgres(t) => t.load_after(after).await,
        }
    }

    /// What a batch of checkout decisions weighs ([`HoldsWanted`]), read under the lock.
    pub async fn holds_for(&mut self, wanted: &HoldsWanted, now_ms: u64) -> Result<HoldsRead, StoreError> {
        match self {
            MarketTx::Embedded(t) => t.holds_for(wanted, now_ms),
            MarketTx::Postgres(t) => t.holds_for(wanted, now_ms).await,
        }
    }

    /// Writes the batch: `records` (offsets continuing [`MarketTx::next_offset`] without gaps),
    /// their projections, `rejected` and `evidence`, `holds` (new or changed), and the new next
    /// offset, atomically.
    pub async fn commit(
        self,
        records: &[LogRecord],
        rejected: &[RejectedChange],
        evidence: &[SignedChange],
        holds: &[Hold],
        now_ms: u64,
    ) -> Result<(), StoreError> {
        if let Some(first) = records.first() {
            assert_eq!(first.offset, self.next_offset(), "a batch continues the stored log");
        }
        assert!(records.windows(2).all(|w| w[1].offset == w[0].offset + 1), "a batch's offsets are gapless");
        match self {
            MarketTx::Embedded(t) => t.commit(records, rejected, evidence, holds, now_ms),
            MarketTx::Postgres(t) => t.commit(records, rejected, evidence, holds, now_ms).await,
        }
    }
}

/// A stored change and its decoded event, framed for storage: postcard of the `Entry`, as the
/// tablet's store keeps it. Both stores keep this next to the projections, so the log restores the
/// ingest core exactly.
pub fn encode_entry(entry: &stallmesh_ledger::Entry) -> Vec<u8> {
    postcard::to_allocvec(entry).expect("entries serialize")
}

pub fn decode_entry(bytes: &[u8]) -> Result<stallmesh_ledger::Entry, StoreError> {
    postcard::from_bytes(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}
