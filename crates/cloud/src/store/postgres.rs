//! PostgreSQL store (being written: see the helper's task).

use super::{Events, MarketRegistration, Registered, StoreError};
use stallmesh_identity::{MarketId, SignedChange};
use stallmesh_ingest::{LogRecord, RejectedChange};

pub struct PgStore {}

fn not_yet() -> StoreError {
    StoreError::Unavailable("PostgreSQL store not built yet".into())
}

impl PgStore {
    pub async fn connect(_url: &str) -> Result<Self, StoreError> {
        Err(not_yet())
    }
    pub async fn register(&self, _reg: &MarketRegistration, _first: &[LogRecord]) -> Result<Registered, StoreError> {
        Err(not_yet())
    }
    pub async fn markets(&self) -> Result<Vec<MarketRegistration>, StoreError> {
        Err(not_yet())
    }
    pub async fn market(&self, _market: &MarketId) -> Result<Option<MarketRegistration>, StoreError> {
        Err(not_yet())
    }
    pub async fn load_log(&self, _market: &MarketId, _after: u64) -> Result<Vec<LogRecord>, StoreError> {
        Err(not_yet())
    }
    pub async fn events(&self, _market: &MarketId, _after: u64, _limit: usize) -> Result<Events, StoreError> {
        Err(not_yet())
    }
    pub async fn next_offset(&self, _market: &MarketId) -> Result<u64, StoreError> {
        Err(not_yet())
    }
    pub async fn begin(&self, _market: &MarketId) -> Result<PgTx, StoreError> {
        Err(not_yet())
    }
}

pub struct PgTx {}

impl PgTx {
    pub fn next_offset(&self) -> u64 {
        0
    }
    pub async fn load_after(&mut self, _after: u64) -> Result<Vec<LogRecord>, StoreError> {
        Err(not_yet())
    }
    pub async fn commit(self, _records: &[LogRecord], _rejected: &[RejectedChange], _evidence: &[SignedChange], _now_ms: u64) -> Result<(), StoreError> {
        Err(not_yet())
    }
}
