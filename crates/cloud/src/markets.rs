//! The markets this process serves: each an ingest core ([`MarketIngest`]) rebuilt from the store
//! on first use, behind one async lock per market, and the driver steps around it: authenticate,
//! take the store's offset lock, catch up with what other processes appended, ingest, commit, and
//! only then answer. Any store failure drops the market's core, so the next request rebuilds it
//! from what the store holds: this process keeps no state that the store does not.

use crate::metrics::{CloudMetrics, MarketLabel, ReasonLabel};
use crate::store::{MarketRegistration, MarketTx, OnlineRegistration, Registered, Store, StoreError};
use stallmesh_identity::{DeviceId, MarketId, SignedChange};
use stallmesh_ingest::wire::{AuthError, CloudReply, RequestAuth};
use stallmesh_ingest::{IngestError, LogRecord, MarketIngest, RejectedChange};
use stallmesh_ledger::{Ledger, MarketContext};
use stallmesh_shop::{Hold, HoldBook, HoldRequest, HoldsWanted, Paid, Placed, ShopError};
use stallmesh_sync::{MemoryLog, Message, ProtocolError};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Markets one process keeps loaded. A cloud serves many markets; each loaded one holds its log's
/// changes in memory (about 5 MB for a 10,000-sale day). At the limit an idle market (no request
/// holds it) is unloaded to make room, which loses nothing: the store holds all of it. Only when
/// every loaded market is in use is a request refused with 503, counted, rather than unloading a
/// market mid-batch.
pub const MAX_LOADED_MARKETS: usize = 1_024;

mod shop;
pub use shop::{MAX_CHECKOUT_BATCH, MAX_CHECKOUT_QUEUE};

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("market {0} is not registered with this cloud")]
    UnknownMarket(MarketId),
    #[error("{0}")]
    Auth(#[from] AuthError),
    #[error("device {0} was revoked by the market")]
    Revoked(DeviceId),
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("the cloud accepts Heads and Changes messages only, not {0}")]
    WrongMessage(&'static str),
    #[error("{rejected} of the uploaded changes were refused")]
    Rejected { rejected: usize, reply: Box<CloudReply> },
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Ingest(#[from] IngestError),
    #[error("this process serves at most {MAX_LOADED_MARKETS} markets at once")]
    TooManyMarkets,
    #[error("{0}")]
    Shop(#[from] ShopError),
    #[error("the market's online checkout has {MAX_CHECKOUT_QUEUE} requests waiting; retry shortly with the same idempotency key")]
    CheckoutBusy,
}

impl SyncError {
    pub fn label(&self) -> &'static str {
        match self {
            SyncError::UnknownMarket(_) => "unknown_market",
            SyncError::Auth(a) => a.label(),
            SyncError::Revoked(_) => "revoked",
            SyncError::Protocol(_) => "malformed_message",
            SyncError::WrongMessage(_) => "wrong_message",
            SyncError::Rejected { .. } => "changes_rejected",
            SyncError::Store(StoreError::UnknownMarket(_)) => "unknown_market",
            SyncError::Store(_) | SyncError::Ingest(_) => "store_unavailable",
            SyncError::TooManyMarkets => "too_many_markets",
            SyncError::CheckoutBusy => "checkout_busy",
            SyncError::Shop(e) => match e {
                ShopError::Invalid { .. } => "invalid_request",
                ShopError::NoOnlineChannel => "no_online_channel",
                ShopError::UnknownDrop(_) => "unknown_drop",
                ShopError::UnknownHold(_) => "unknown_hold",
                ShopError::DropNotStarted { .. } => "drop_not_started",
                ShopError::BuyerLimit { .. } => "buyer_limit",
                ShopError::SoldOut { .. } => "sold_out",
                ShopError::IdempotencyConflict(_) => "idempotency_conflict",
                ShopError::HoldExpired { .. } => "hold_expired",
                ShopError::Ledger(_) => "online_channel_unavailable",
            },
        }
    }
}

struct Loaded {
    ingest: MarketIngest,
    /// Every logged change, to serve what a tablet lacks (the sync core reads a [`ChangeLog`]).
    ///
    /// [`ChangeLog`]: stallmesh_sync::ChangeLog
    log: MemoryLog,
    /// The market's online channel: its device's own ledger, fed the same log (its own sales
    /// among them), so it sells from what it holds exactly as a tablet would.
    online: Option<Ledger>,
    /// What the online channel, sold out while the tablets hold some, asks them for in every
    /// reply until a tablet's transfer to it is logged or the ask lapses. Advisory and in memory:
    /// a lost ask costs only a buyer's retry.
    online_asks: stallmesh_shop::OnlineAsks,
}

// Every open ask fits in one reply.
const _: () = assert!(stallmesh_shop::MAX_ONLINE_ASKS <= stallmesh_ingest::wire::MAX_RIGHTS_WANTED);

impl Loaded {
    /// Hands changes the log took in to the online channel's ledger too (the cloud's ledger
    /// verified them; the online one checks them again, as any replica does).
    fn feed_online(&mut self, changes: &[SignedChange]) {
        let Some(online) = self.online.as_mut() else { return };
        let report = online.apply_remote(changes.iter().cloned());
        if !report.rejected.is_empty() {
            // Both ledgers run the same rules on the same changes: a disagreement is a bug.
            tracing::error!(rejected = report.rejected.len(), "the online channel refused changes the cloud logged");
        }
        let me = online.device();
        for e in &report.applied {
            if let stallmesh_ledger::EventBody::Transferred { sku, to, .. } = &e.event.body {
                if *to == me {
                    self.online_asks.answered(sku);
                }
            }
        }
    }

    /// Asks to put in a reply: the online channel's unexpired ones.
    fn online_wants(&self, now_ms: u64) -> Vec<stallmesh_ingest::wire::OnlineWants> {
        let Some(online) = &self.online else { return Vec::new() };
        self.online_asks
            .open(now_ms)
            .map(|(sku, qty)| stallmesh_ingest::wire::OnlineWants { device: online.device(), sku: sku.to_string(), qty })
            .collect()
    }
}

pub struct MarketSlot {
    pub registration: MarketRegistration,
    /// Read with the registration, and again when a shop request finds none (set up since).
    online: Option<OnlineRegistration>,
    loaded: Option<Loaded>,
}

/// A hold as placed or found, and whether this request created it.
#[derive(Debug, Clone)]
pub struct HoldOutcome {
    pub hold: Hold,
    pub created: bool,
    pub now_ms: u64,
}

/// A paid hold, and whether this request paid it.
#[derive(Debug, Clone)]
pub struct OrderOutcome {
    pub hold: Hold,
    pub created: bool,
    pub total_cents: u64,
    pub currency: String,
    /// The log's length after the sale was logged.
    pub offset: u64,
}

pub struct Markets {
    pub store: Store,
    slots: Mutex<BTreeMap<MarketId, Arc<tokio::sync::Mutex<MarketSlot>>>>,
    /// Per market, the log length this process last saw: long-polling consumers wait on it.
    offsets: Mutex<BTreeMap<MarketId, watch::Sender<u64>>>,
    pub metrics: CloudMetrics,
    watermark_interval_ms: u64,
    checkout_queues: shop::CheckoutQueues,
}

impl Markets {
    pub fn new(store: Store, metrics: CloudMetrics, watermark_interval_ms: u64) -> Self {
        Self {
            store,
            slots: Mutex::new(BTreeMap::new()),
            offsets: Mutex::new(BTreeMap::new()),
            metrics,
            watermark_interval_ms,
            checkout_queues: Default::default(),
        }
    }

    /// Registers a market with its cloud device's credentials (role `cloud`, checked by the caller).
    pub async fn register(&self, registration: MarketRegistration) -> Result<Registered, SyncError> {
        let ctx = MarketContext::new(registration.market_key);
        let (_, created) = MarketIngest::create(ctx, registration.device_key(), registration.certificate.clone(), now_ms())?;
        let outcome = self.store.register(&registration, &created.records).await?;
        tracing::info!(market = %registration.market, name = %registration.name, ?outcome, "market registered");
        Ok(outcome)
    }

    async fn slot(&self, market: &MarketId) -> Result<Arc<tokio::sync::Mutex<MarketSlot>>, SyncError> {
        if let Some(s) = self.slots.lock().expect("slots lock").get(market) {
            return Ok(s.clone());
        }
        let registration = self.store.market(market).await?.ok_or(SyncError::UnknownMarket(*market))?;
        let online = self.store.online(market).await?;
        let mut slots = self.slots.lock().expect("slots lock");
        if slots.len() >= MAX_LOADED_MARKETS && !slots.contains_key(market) {
            // A slot is handed out only under this lock, so one whose Arc nobody else holds is idle
            // and stays so while we hold the lock.
            let idle = slots.iter().find(|(_, s)| Arc::strong_count(s) == 1).map(|(m, _)| *m);
            let Some(idle) = idle else { return Err(SyncError::TooManyMarkets) };
            slots.remove(&idle);
            self.metrics.markets_unloaded.inc();
            tracing::info!(unloaded = %idle, loading = %market, "market limit reached: an idle market is unloaded");
        }
        Ok(slots.entry(*market).or_insert_with(|| Arc::new(tokio::sync::Mutex::new(MarketSlot { registration, online, loaded: None }))).clone())
    }

    /// The loaded slots, for the watermark ticker.
    pub fn loaded_markets(&self) -> Vec<MarketId> {
        self.slots.lock().expect("slots lock").keys().copied().collect()
    }

    /// The watch of a market's log length (created on first use).
    pub fn offset_watch(&self, market: &MarketId) -> watch::Receiver<u64> {
        self.offsets.lock().expect("offsets lock").entry(*market).or_insert_with(|| watch::channel(0).0).subscribe()
    }

    fn published(&self, market: &MarketId, offset: u64) {
        let mut offsets = self.offsets.lock().expect("offsets lock");
        let tx = offsets.entry(*market).or_insert_with(|| watch::channel(0).0);
        tx.send_if_modified(|o| {
            let moved = offset > *o;
            *o = (*o).max(offset);
            moved
        });
        self.metrics.offset.get_or_create(&MarketLabel { market: market.to_hex() }).set(offset as i64);
    }

    /// Rebuilds the market's core from the store if it is not loaded, then takes in whatever other
    /// processes appended since (reads only committed records).
    async fn refresh(&self, slot: &mut MarketSlot) -> Result<(), SyncError> {
        let market = slot.registration.market;
        if slot.loaded.is_none() {
            let records = self.store.load_log(&market, 0).await?;
            let mut log = MemoryLog::default();
            for r in &records {
                log.add(r.entry.change.clone());
            }
            let reg = &slot.registration;
            let online = match &slot.online {
                Some(o) => Some(
                    Ledger::restore(MarketContext::new(reg.market_key), o.device_key(), o.certificate.clone(), records.iter().map(|r| r.entry.clone()))
                        .map_err(IngestError::Restore)?,
                ),
                None => None,
            };
            let ingest = MarketIngest::restore(MarketContext::new(reg.market_key), reg.device_key(), reg.certificate.clone(), records)?
                .with_watermark_interval_ms(self.watermark_interval_ms);
            tracing::info!(%market, offset = ingest.offset(), online = online.is_some(), "market loaded from the store");
            slot.loaded = Some(Loaded { ingest, log, online, online_asks: Default::default() });
        }
        let loaded = slot.loaded.as_mut().expect("just loaded");
        let stored = self.store.next_offset(&market).await?;
        if stored > loaded.ingest.next_offset() {
            let records = self.store.load_log(&market, loaded.ingest.offset()).await?;
            Self::take_in(loaded, records)?;
        }
        let offset = loaded.ingest.offset();
        self.published(&market, offset);
        Ok(())
    }

    fn take_in(loaded: &mut Loaded, records: Vec<LogRecord>) -> Result<(), IngestError> {
        let changes: Vec<SignedChange> = records.iter().map(|r| r.entry.change.clone()).collect();
        loaded.ingest.catch_up(records)?;
        loaded.feed_online(&changes);
        for c in changes {
            loaded.log.add(c);
        }
        Ok(())
    }

    /// One authenticated sync request of a tablet: `Heads` → what the tablet lacks; `Changes` →
    /// ingest. `path` and `body` are exactly what the device signed.
    pub async fn sync(&self, market: &MarketId, path: &str, auth: Result<RequestAuth, AuthError>, body: &[u8]) -> Result<CloudReply, SyncError> {
        let result = self.sync_inner(market, path, auth, body).await;
        match &result {
            Ok(_) => {}
            Err(e) => {
                self.metrics.requests_refused.get_or_create(&ReasonLabel { reason: e.label().to_string() }).inc();
                tracing::warn!(%market, reason = e.label(), error = %e, "sync request refused");
            }
        }
        result
    }

    async fn sync_inner(&self, market: &MarketId, path: &str, auth: Result<RequestAuth, AuthError>, body: &[u8]) -> Result<CloudReply, SyncError> {
        let slot = self.slot(market).await?;
        let auth = auth?;
        let now = now_ms();
        auth.verify(&slot.lock().await.registration.market_key, path, body, now)?;
        let message = Message::decode(body)?;
        let mut slot = slot.lock().await;
        if let Err(e) = self.refresh(&mut slot).await {
            slot.loaded = None;
            return Err(e);
        }
        let loaded = slot.loaded.as_ref().expect("refreshed");
        let revoked = loaded.ingest.ledger().state().devices.get(&auth.device).is_some_and(|d| d.revoked_at_ms.is_some());
        if revoked {
            return Err(SyncError::Revoked(auth.device));
        }
        match message {
            Message::Heads { heads, .. } => {
                let theirs: BTreeMap<DeviceId, u64> = heads.into_iter().collect();
                let (changes, more) = loaded.ingest.missing_for(&theirs, &loaded.log).map_err(StoreError::Unavailable)?;
                self.metrics.changes_served.inc_by(changes.len() as u64);
                Ok(Self::reply(loaded, changes, more))
            }
            Message::Changes { changes, .. } => {
                let n = changes.len();
                let (reply, rejected) = match self.ingest(&mut slot, changes, now).await {
                    Ok(r) => r,
                    Err(e) => {
                        slot.loaded = None; // the core may hold what the store refused: rebuild
                        return Err(e);
                    }
                };
                tracing::debug!(%market, uploaded = n, accepted = reply.accepted, duplicates = reply.duplicates, "upload ingested");
                if rejected > 0 {
                    return Err(SyncError::Rejected { rejected, reply: Box::new(reply) });
                }
                Ok(reply)
            }
            Message::HeadsWanted => Err(SyncError::WrongMessage("HeadsWanted")),
            Message::RightsWanted { sku, qty, for_sale } => self.online_give(&mut slot, auth.device, sku, qty, for_sale).await,
            Message::LoyaltyWanted { .. } => Err(SyncError::WrongMessage("LoyaltyWanted")),
        }
    }

    fn reply(loaded: &Loaded, changes: Vec<SignedChange>, more: bool) -> CloudReply {
        let ingest = &loaded.ingest;
        CloudReply {
            offset: ingest.offset(),
            heads: ingest.heads().iter().map(|(d, n)| (*d, *n)).collect(),
            changes,
            more,
            rights_wanted: loaded.online_wants(now_ms()),
            ..Default::default()
        }
    }

    /// Ingests under the store's offset lock and commits before answering. The core is taken out
    /// of the slot meanwhile and put back only after the commit: an error or a panic on the way
    /// leaves the slot empty, so the next request rebuilds it from the store.
    async fn ingest(&self, slot: &mut MarketSlot, changes: Vec<SignedChange>, now: u64) -> Result<(CloudReply, usize), SyncError> {
        let mut taken = slot.loaded.take().expect("refreshed by the caller");
        let result = self.ingest_into(slot.registration.market, &mut taken, changes, now).await;
        if result.is_ok() {
            slot.loaded = Some(taken);
        }
        result
    }

    /// Takes the market's lock in the store and catches up with what other processes appended
    /// between our refresh and the lock, so offsets continue their log and neither the cloud
    /// device nor the online one ever signs one position twice.
    async fn lock(&self, market: MarketId, loaded: &mut Loaded) -> Result<MarketTx<'_>, SyncError> {
        let mut tx = self.store.begin(&market).await?;
        if tx.next_offset() != loaded.ingest.next_offset() {
            let records = tx.load_after(loaded.ingest.offset()).await?;
            Self::take_in(loaded, records)?;
            if tx.next_offset() != loaded.ingest.next_offset() {
                return Err(StoreError::OffsetMoved { market, expected: loaded.ingest.next_offset(), found: tx.next_offset() }.into());
            }
        }
        Ok(tx)
    }

    /// Ingests `changes` and commits them with `holds`, then hands what was logged to the
    /// in-memory log and the online channel.
    async fn log_and_commit(
        &self,
        market: MarketId,
        loaded: &mut Loaded,
        tx: MarketTx<'_>,
        changes: Vec<SignedChange>,
        holds: &[Hold],
        now: u64,
    ) -> Result<stallmesh_ingest::Batch, SyncError> {
        // The online channel's own changes (its enrolment, its sales, its transfers) must all be
        // logged by this very batch: a sale held back or refused would leave a hold marked paid
        // with no sale in the log. Checked before anything commits; the caller drops the market's
        // core on the error, so both ledgers are rebuilt from the store.
        let online = loaded.online.as_ref().map(|o| o.device());
        let own: Vec<stallmesh_identity::Dot> = changes.iter().filter(|c| Some(c.device) == online).map(|c| c.dot()).collect();
        let batch = loaded.ingest.ingest(changes, now);
        if let Some(missing) = own.iter().find(|d| !batch.records.iter().any(|r| r.entry.change.dot() == **d)) {
            return Err(StoreError::Unavailable(format!("the online channel's change {}:{} was not logged", missing.device.short(), missing.seq)).into());
        }
        tx.commit(&batch.records, &batch.rejected, &batch.evidence, holds, now).await?;
        self.count(&market, batch.records.len(), batch.duplicates, &batch.rejected);
        let logged: Vec<SignedChange> = batch.records.iter().map(|r| r.entry.change.clone()).collect();
        loaded.feed_online(&logged);
        for c in logged {
            loaded.log.add(c);
        }
        self.published(&market, loaded.ingest.offset());
        Ok(batch)
    }

    async fn ingest_into(&self, market: MarketId, loaded: &mut Loaded, changes: Vec<SignedChange>, now: u64) -> Result<(CloudReply, usize), SyncError> {
        let tx = self.lock(market, loaded).await?;
        let batch = self.log_and_commit(market, loaded, tx, changes, &[], now).await?;
        // The cloud's own changes of this batch (its watermark) and the online channel's (its
        // enrolment, its sales) go back to the uploader at once.
        let me = loaded.ingest.cloud_device();
        let online = loaded.online.as_ref().map(|o| o.device());
        let own: Vec<SignedChange> = batch
            .records
            .iter()
            .filter(|r| r.entry.change.device == me || Some(r.entry.change.device) == online)
            .map(|r| r.entry.change.clone())
            .collect();
        let mut reply = Self::reply(loaded, own, false);
        reply.accepted = batch.records.len() as u64;
        reply.duplicates = batch.duplicates;
        reply.pending = batch.pending;
        let rejected = batch.rejected.len();
        reply.rejected = batch.rejected;
        let offset = loaded.ingest.offset();
        self.published(&market, offset);
        Ok((reply, rejected))
    }

    fn count(&self, market: &MarketId, accepted: usize, duplicates: u64, rejected: &[RejectedChange]) {
        let label = MarketLabel { market: market.to_hex() };
        self.metrics.accepted.get_or_create(&label).inc_by(accepted as u64);
        self.metrics.duplicates.get_or_create(&label).inc_by(duplicates);
        for r in rejected {
            self.metrics.rejected.get_or_create(&ReasonLabel { reason: r.reason.clone() }).inc();
        }
    }

    /// Records due watermarks of loaded markets; returns the earliest next wake-up.
    pub async fn tick(&self) -> Option<u64> {
        let mut next: Option<u64> = None;
        for market in self.loaded_markets() {
            let Ok(slot) = self.slot(&market).await else { continue };
            let mut slot = slot.lock().await;
            let Some(loaded) = slot.loaded.as_ref() else { continue };
            let now = now_ms();
            match loaded.ingest.poll_timeout() {
                Some(t) if t <= now => {}
                Some(t) => {
                    next = Some(next.map_or(t, |n| n.min(t)));
                    continue;
                }
                None => continue,
            }
            if let Err(e) = self.refresh(&mut slot).await {
                tracing::warn!(%market, error = %e, "cannot refresh the market to record a watermark");
                slot.loaded = None;
                continue;
            }
            if let Err(e) = self.ingest(&mut slot, Vec::new(), now).await {
                tracing::warn!(%market, error = %e, "cannot record the watermark");
                slot.loaded = None;
            }
        }
        next
    }

    /// A market's view for `GET /v1/markets/{market}`.
    pub async fn view(&self, market: &MarketId) -> Result<stallmesh_api::cloud::MarketView, SyncError> {
        let slot = self.slot(market).await?;
        let mut slot = slot.lock().await;
        if let Err(e) = self.refresh(&mut slot).await {
            slot.loaded = None;
            return Err(e);
        }
        let loaded = slot.loaded.as_ref().expect("refreshed");
        let stats = loaded.ingest.stats();
        Ok(stallmesh_api::cloud::MarketView {
            market: market.to_hex(),
            name: slot.registration.name.clone(),
            cloud_device: loaded.ingest.cloud_device().to_hex(),
            offset: loaded.ingest.offset(),
            heads: loaded.ingest.heads().iter().map(|(d, n)| (d.to_hex(), *n)).collect(),
            rejected: stats.rejected.clone(),
            duplicates: stats.duplicates,
        })
    }
}
