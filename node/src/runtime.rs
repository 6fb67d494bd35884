//! The driver around the sans-IO ledger: it supplies the clock, makes entries durable in redb
//! before anything is acknowledged, and counts what happened.
//!
//! Failure model: if a durable commit fails, the in-memory ledger is ahead of the disk. The node
//! then stops accepting writes (fail-stop, like a database whose log write failed) and memory is
//! rebuilt from what is on disk, so nothing unacknowledged is ever reported as done: by a restart,
//! or, for an I/O error such as a full disk, in place once the store takes writes again
//! ([`Node::heal`], tried every `HEAL_INTERVAL_MS`).

use crate::config::Config;
use crate::metrics::{Metrics, Origin, Reason};
use crate::pipeline::{Commit, CommitOrigin, Publisher};
use crate::recovery::{PeerView, Recovery, RecoveryCause, Step};
use stallmesh_identity::files::{self, DeviceCredentials, FileError};
use stallmesh_identity::{Role, SignedChange};
use stallmesh_ledger::{ApplyReport, Entry, Ledger, LedgerError, LineRequest, LocalOp, MarketContext, Product, RestoreError};
use stallmesh_store::{panic_message, Owner, Store, StoreError};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Credentials(#[from] FileError),
    #[error("{path}: cannot restore the ledger from the store: {source}")]
    Restore { path: PathBuf, source: Box<RestoreError> },
    #[error("{0}: cannot create the data directory: {1}")]
    DataDir(PathBuf, std::io::Error),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("node stopped accepting writes after a store failure ({0}); it writes again once the store does (free disk space) or after a restart")]
    Failed(String),
    #[error("{0}")]
    Recovering(String),
    #[error("SKU {0:?} exists; change it with PUT /api/v1/products/{{sku}}")]
    ProductExists(String),
    #[error("unknown SKU {0:?}")]
    UnknownProduct(String),
    #[error("{path}: store is damaged ({reason}) and cannot be set aside: {source}")]
    SetAside { path: PathBuf, reason: String, source: std::io::Error },
}

/// A damaged store file moved out of the way on start; the node began again with an empty store.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SetAside {
    pub original: PathBuf,
    pub moved_to: PathBuf,
    pub reason: String,
}

/// Written next to a device's credentials once its journal has an entry: from then on an empty
/// store means the journal was lost here, not that the device is new (see `recovery`).
pub const JOURNAL_STARTED_FILE: &str = "journal.started";
/// Written beside the credentials while a recovery is under way, removed once it ends: a tablet
/// switched off half-way holds part of its journal, and must not take that part for all of it.
pub const JOURNAL_RECOVERING_FILE: &str = "journal.recovering";

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

struct Inner {
    ledger: Ledger,
    store: Store,
    failed: Option<String>,
    /// The failure is a store I/O error the disk may get over (a full disk): [`Node::heal`] tries
    /// to open the store again. Damage and panics are not healed in place.
    healable: bool,
    /// What rebuilding the ledger from the store needs (see [`Node::heal`]).
    owner: Owner,
    market_ctx: MarketContext,
    certificate: stallmesh_identity::Certificate,
    /// Set while this device's own journal is being taken back from peers: nothing is recorded.
    recovery: Option<Recovery>,
    /// Where the "journal started" marker lives (beside the credentials).
    journal_marker: PathBuf,
    /// For the mesh: the device secret (its libp2p identity) and the market's network key.
    mesh_secrets: ([u8; 32], [u8; 32]),
    /// Every commit is published here, under this lock (so in commit order), after it is made.
    commits: Publisher,
}

/// Facts about this node that never change while it runs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeInfo {
    pub market_name: String,
    pub market_id: String,
    pub device: String,
    pub stall: String,
    pub role: Role,
    pub demo: bool,
    pub store_path: PathBuf,
    /// Shown at the top level of `/api/v1/status` and `/healthz`.
    #[serde(skip)]
    pub store_set_aside: Option<SetAside>,
}

/// Recent arrivals kept for `GET /api/v1/mesh/arrivals` (replication-lag measurements).
pub const MAX_RECENT_ARRIVALS: usize = 4_096;

/// When a sale recorded elsewhere arrived here.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Arrival {
    pub sale_id: String,
    pub recorded_ms: u64,
    pub arrived_us: u64,
}

/// A local operation made durable, and the number of its commit on the pipeline.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub entry: Entry,
    pub commit: u64,
}

/// Positions listed by [`Node::equivocations`]: enough to show every sale a cloned tablet made in
/// a morning; each position is decoded for the listing.
pub const MAX_EQUIVOCATIONS_LISTED: usize = 200;

/// One device seen signing two histories.
pub struct DeviceEquivocation {
    pub device: stallmesh_identity::DeviceId,
    pub positions: Vec<EquivocatedPosition>,
}

/// One journal position with more than one signed change.
pub struct EquivocatedPosition {
    pub seq: u64,
    /// The change this replica holds (and applied) there, if it holds one.
    pub held: Option<(SignedChange, stallmesh_ledger::Event)>,
    /// The other changes signed for it, with what each recorded if it can be read.
    #[allow(clippy::type_complexity)]
    pub conflicting: Vec<(SignedChange, Result<stallmesh_ledger::Event, String>)>,
}

/// Most local operations one group commit records: a batch holds the ledger lock for each
/// operation's ledger step (~0.4 ms for a sale), so this bounds one batch (~25 ms); a longer queue
/// is committed in several batches, in order. 64 covers a market's busiest node (32 tills at once
/// measured in `benches/sales.rs`) in one batch.
pub const MAX_GROUP_COMMIT_OPS: usize = 64;

/// A precondition a local operation must meet, checked under the ledger lock just before it is
/// recorded.
type Precondition = Box<dyn FnOnce(&Ledger) -> Result<(), NodeError> + Send>;
/// Where a queued operation's answer is left by the commit that holds it.
type Slot = Arc<Mutex<Option<Result<Recorded, NodeError>>>>;

/// A local operation waiting for the next group commit.
struct Queued {
    op: LocalOp,
    precondition: Precondition,
    slot: Slot,
}

fn answer(slot: &Slot, result: Result<Recorded, NodeError>) {
    *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
}

/// Every slot of a batch: any still unanswered when it is dropped (a panic under the lock) is
/// answered with the failure, so no caller waits for a commit that will never come. Callers take
/// their answers only under the ledger lock, which the batch holds until this is dropped.
struct BatchSlots(Vec<Slot>);

impl Drop for BatchSlots {
    fn drop(&mut self) {
        for slot in &self.0 {
            let mut answer = slot.lock().unwrap_or_else(|p| p.into_inner());
            if answer.is_none() {
                *answer = Some(Err(NodeError::Failed("the group commit holding this operation did not finish".into())));
            }
        }
    }
}

#[derive(Clone)]
pub struct Node {
    inner: Arc<Mutex<Inner>>,
    /// Local operations waiting for the next group commit, in arrival order. Each is a caller
    /// blocked on its answer on a blocking thread, so tokio's blocking pool bounds it.
    queue: Arc<Mutex<Vec<Queued>>>,
    /// `[store] group_commit`: concurrent local operations share one durable commit.
    group_commit: bool,
    pub metrics: Arc<Metrics>,
    pub info: Arc<NodeInfo>,
    arrivals: Arc<Mutex<std::collections::VecDeque<Arrival>>>,
    rights_arrived: Arc<tokio::sync::watch::Sender<u64>>,
}

const DEMO_MARKET_DIR: &str = "demo-market";
const DEVICE_DIR: &str = "device";

/// The demo catalogue shown to a newcomer: a honey and preserves stall.
fn demo_catalogue(stall: &str) -> Vec<(Product, u64)> {
    let p = |sku: &str, name: &str, price_cents: u64, tags: &[&str], qty: u64| {
        (
            Product {
                sku: sku.into(),
                name: name.into(),
                price_cents,
                currency: "EUR".into(),
                stall: stall.into(),
                tags: tags.iter().map(|t| t.to_string()).collect(),
            },
            qty,
        )
    };
    vec![
        p("HNY-500", "Organic wildflower honey 500g jar", 850, &["honey", "organic"], 24),
        p("HNY-250", "Raw acacia honey 250g jar", 550, &["honey"], 30),
        p("JAM-STR", "Strawberry jam 340g", 475, &["jam", "fruit"], 18),
        p("JAM-APR", "Apricot jam 340g", 475, &["jam", "fruit"], 12),
        p("BEE-CND", "Beeswax candle, hand-dipped", 1200, &["candle", "beeswax"], 8),
        p("BRD-SRD", "Sourdough loaf 800g", 520, &["bread"], 15),
    ]
}

impl Node {
    /// Opens the node described by `config`: credentials (or demo mode), store, ledger.
    pub fn open(config: &Config) -> Result<Node, NodeError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| NodeError::DataDir(config.data_dir.clone(), e))?;
        let default_dir = config.credentials_dir.as_os_str().is_empty();
        let device_dir = if default_dir { config.data_dir.join(DEVICE_DIR) } else { config.credentials_dir.clone() };
        let creds = if device_dir.join(files::DEVICE_KEY_FILE).exists() || !default_dir {
            files::load_device(&device_dir)? // a missing file is reported by name
        } else {
            create_demo_credentials(config, &device_dir)?
        };
        // Demo mode: the node made (now or on an earlier start) its own throw-away market.
        let demo = default_dir && config.data_dir.join(DEMO_MARKET_DIR).exists();
        let DeviceCredentials { key, certificate, market, mesh_psk } = creds;
        let journal_marker = device_dir.join(JOURNAL_STARTED_FILE);
        let mesh_secrets = (key.secret(), mesh_psk);
        let mut info = NodeInfo {
            market_name: market.name.clone(),
            market_id: market.market_id.to_hex(),
            device: key.device_id().to_hex(),
            stall: certificate.stall.clone(),
            role: certificate.role,
            demo,
            store_path: config.store_path(),
            store_set_aside: None,
        };
        let owner = Owner { market: market.market_id, device: key.device_id() };
        let (store, set_aside) = open_store(config, owner)?;
        info.store_set_aside = set_aside;
        let started = Instant::now();
        let entries = store.load()?;
        let restored = entries.len();
        let ctx = MarketContext::new(market.public_key);
        let (market_ctx, own_certificate) = (ctx.clone(), certificate.clone());
        let mut ledger = Ledger::restore(ctx, key, certificate, entries)
            .map_err(|source| NodeError::Restore { path: config.store_path(), source: Box::new(source) })?;
        ledger.restore_evidence(store.evidence()?);
        tracing::info!(
            entries = restored,
            elapsed_ms = started.elapsed().as_millis() as u64,
            store = %config.store_path().display(),
            "ledger restored"
        );
        let fresh = restored == 0;
        // A set-aside store held this device's journal whatever the marker says: never start anew.
        let recovering_marker = recovering_marker(&journal_marker);
        let recovery = if info.store_set_aside.is_some() {
            Some(Recovery::new(RecoveryCause::StoreSetAside, now_ms()))
        } else if recovering_marker.exists() {
            Some(Recovery::new(RecoveryCause::Interrupted, now_ms()))
        } else {
            (fresh && journal_marker.exists()).then(|| Recovery::new(RecoveryCause::EmptyStore, now_ms()))
        };
        if recovery.is_some() {
            mark_recovering(&recovering_marker, true);
        }
        let node = Node {
            inner: Arc::new(Mutex::new(Inner {
                ledger,
                store,
                failed: None,
                healable: false,
                owner,
                market_ctx,
                certificate: own_certificate,
                recovery,
                journal_marker,
                mesh_secrets,
                commits: Publisher::default(),
            })),
            queue: Arc::default(),
            group_commit: config.store.group_commit,
            metrics: Arc::new(Metrics::new()),
            info: Arc::new(info),
            arrivals: Arc::default(),
            rights_arrived: Arc::new(tokio::sync::watch::Sender::new(0)),
        };
        node.metrics.journal_entries.set(restored as i64);
        if let Some(r) = node.recovery() {
            tracing::warn!(cause = ?r.cause, "{}", r.message);
        } else {
            node.start_journal()?;
        }
        if demo && fresh && node.recovery().is_none() {
            node.seed_demo()?;
        }
        if demo {
            tracing::warn!(
                data_dir = %config.data_dir.display(),
                "DEMO MODE: no credentials configured, so this node runs a throw-away demo market with a sample \
                 catalogue. Create a real market with `stallmesh market init` and `stallmesh device enroll`."
            );
        }
        Ok(node)
    }

    /// Writes this device's enrolment as entry 0 if its journal has none, and marks the journal as
    /// started beside the credentials.
    fn start_journal(&self) -> Result<(), NodeError> {
        let written = self.with_write(|l| l.enrol_self(now_ms()).map(|e| e.into_iter().collect()))?;
        let marker = self.lock().journal_marker.clone();
        if !marker.exists() {
            let note =
                format!("device {} journal started at {} ms; an empty store from now on means it was lost\n", self.info.device, now_ms());
            if let Err(e) = std::fs::write(&marker, note) {
                // Without the marker a wiped store would be taken for a new device: say so loudly.
                tracing::error!(path = %marker.display(), error = %e, "cannot mark the journal as started beside the credentials");
            }
        }
        if !written.is_empty() {
            tracing::info!("journal started: enrolment recorded as entry 0");
        }
        Ok(())
    }

    /// While this device's journal is being taken back from peers: what the operator is told.
    pub fn recovery(&self) -> Option<Recovery> {
        self.lock().recovery.clone()
    }

    /// The mesh's news: how many entries of this device each verified peer holds. A peer holding
    /// more of this device's journal than this node does (a store restored from an old copy)
    /// starts a recovery; the recovery ends when the journal is back (then the node records again).
    pub fn recovery_step(&self, now_ms: u64, peers: &[PeerView]) {
        let step = {
            let mut inner = self.lock();
            let own = inner.ledger.heads_ref().get(&inner.ledger.device()).copied().unwrap_or(0);
            let ahead = peers.iter().map(|p| p.entries_of_this_device).max().unwrap_or(0);
            if inner.recovery.is_none() && ahead > own {
                let r = Recovery::new(RecoveryCause::StaleStore, now_ms);
                tracing::warn!(own, held_by_peers = ahead, "{}", r.message);
                mark_recovering(&recovering_marker(&inner.journal_marker), true);
                inner.recovery = Some(r);
            }
            let Some(r) = inner.recovery.as_mut() else { return };
            let step = r.step(now_ms, own, peers);
            if step != Step::Wait {
                // What was taken back is made durable before the recovery is over for good.
                if let Err(e) = inner.store.flush() {
                    tracing::error!(error = %e, "cannot make the recovered journal durable; still recovering");
                    return;
                }
                mark_recovering(&recovering_marker(&inner.journal_marker), false);
                inner.recovery = None;
            }
            step
        };
        if let Step::Recovered { entries } = step {
            tracing::info!(entries, "journal recovered from peers: this tablet records again");
            if let Err(e) = self.start_journal() {
                tracing::error!(error = %e, "cannot record after recovering the journal");
            }
        }
    }

    fn seed_demo(&self) -> Result<(), NodeError> {
        for (product, qty) in demo_catalogue(&self.info.stall) {
            let sku = product.sku.clone();
            self.execute(LocalOp::UpsertProduct(product))?;
            self.execute(LocalOp::Restock { sku, qty })?;
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Panics are caught under the lock (see `guarded`), so this is a last resort: a panic while
        // holding it means a broken invariant, so the node fails (no more writes) but still answers.
        self.inner.lock().unwrap_or_else(|poisoned| {
            self.inner.clear_poison();
            let mut inner = poisoned.into_inner();
            inner.failed.get_or_insert_with(|| "a panic while holding the ledger lock".into());
            inner
        })
    }

    /// Runs `f` under the lock; a panic in it (ledger or store) marks the node failed instead of
    /// poisoning the lock or reaching the caller as a 500.
    fn guarded<R>(&self, what: &str, f: impl FnOnce(&mut Inner) -> Result<R, NodeError>) -> Result<R, NodeError> {
        let mut inner = self.lock();
        match catch_unwind(AssertUnwindSafe(|| f(&mut inner))) {
            Ok(result) => result,
            Err(payload) => {
                let why = format!("{}: panic during {what}: {}", inner.store.path().display(), panic_message(&*payload));
                tracing::error!(reason = %why, "refusing further writes until restart");
                inner.failed.get_or_insert(why.clone());
                Err(NodeError::Failed(why))
            }
        }
    }

    /// Fail-stop on a store error: the ledger may be ahead of the disk, or the file is damaged.
    fn fail_on_store_error(inner: &mut Inner, e: &StoreError, what: &str) {
        tracing::error!(error = %e, "store {what} failed; refusing writes until the store takes them again or a restart");
        if inner.failed.is_none() {
            inner.failed = Some(e.to_string());
            inner.healable = matches!(e, StoreError::Db { .. });
        }
    }

    /// After a store I/O failure (a full disk): opens the store again and rebuilds the ledger from
    /// what is on disk, as a restart would, and writes are taken again. Nothing acknowledged is
    /// lost (it was durable) and nothing unacknowledged comes back (it never was). `Ok(false)`:
    /// nothing to heal (not failed, or failed in a way a restart must deal with); an error: the
    /// store still refuses (the disk is still full), try again later.
    pub fn heal(&self) -> Result<bool, NodeError> {
        let mut inner = self.lock();
        if inner.failed.is_none() || !inner.healable {
            return Ok(false);
        }
        let owner = inner.owner;
        if let Err(e) = inner.store.reopen(owner) {
            // Only an I/O refusal may pass by itself; damage or a wrong file needs the restart
            // that sets it aside or says what is wrong.
            if !matches!(e, StoreError::Db { .. } | StoreError::Open { .. }) {
                inner.healable = false;
                inner.failed = Some(format!("{e}; restart the node"));
                tracing::error!(error = %e, "the store cannot be opened again in place: restart the node");
            }
            return Err(e.into());
        }
        let entries = inner.store.load()?;
        let restored = entries.len();
        let key = stallmesh_identity::DeviceKey::from_secret(inner.mesh_secrets.0);
        let mut ledger = Ledger::restore(inner.market_ctx.clone(), key, inner.certificate.clone(), entries)
            .map_err(|source| NodeError::Restore { path: inner.store.path().to_path_buf(), source: Box::new(source) })?;
        ledger.restore_evidence(inner.store.evidence()?);
        inner.ledger = ledger;
        inner.failed = None;
        inner.healable = false;
        self.metrics.journal_entries.set(restored as i64);
        tracing::warn!(entries = restored, "the store takes writes again: ledger rebuilt from it; this tablet records again");
        Ok(true)
    }

    /// Runs `f` on the ledger and durably appends the entries it returns, under one lock so the
    /// store's order is the ledger's order. Blocking: call from a blocking thread.
    fn with_write<T>(&self, f: impl FnOnce(&mut Ledger) -> Result<Vec<Entry>, T>) -> Result<Vec<Entry>, NodeError>
    where
        NodeError: From<T>,
    {
        self.with_write_as(true, f).map(|(entries, _)| entries)
    }

    /// As [`Node::with_write`]; `durable: false` for changes from peers (see `Store::append_relaxed`).
    /// Publishes the entries on the commit pipeline after their commit, and returns the commit's
    /// number (0 when `f` made no entry: nothing was published).
    fn with_write_as<T>(&self, durable: bool, f: impl FnOnce(&mut Ledger) -> Result<Vec<Entry>, T>) -> Result<(Vec<Entry>, u64), NodeError>
    where
        NodeError: From<T>,
    {
        self.guarded("a write", |inner| {
            if let Some(why) = &inner.failed {
                return Err(NodeError::Failed(why.clone()));
            }
            // Checked under the lock: a recovery may start between a caller's look and its write.
            // Changes from peers (relaxed) are how a recovery ends, so they go through.
            if let (true, Some(r)) = (durable, &inner.recovery) {
                return Err(NodeError::Recovering(r.message.clone()));
            }
            let entries = f(&mut inner.ledger)?;
            let started = Instant::now();
            let result = if durable { inner.store.append(&entries) } else { inner.store.append_relaxed(&entries) };
            if let Err(e) = result {
                Self::fail_on_store_error(inner, &e, "commit");
                return Err(e.into());
            }
            self.metrics.store_commit_seconds.observe(started.elapsed().as_secs_f64());
            self.metrics.journal_entries.set(inner.store.len() as i64);
            // After the commit, under the lock: subscribers see commits in the store's order, and
            // never one that is not in the store.
            let origin = if durable { CommitOrigin::Local } else { CommitOrigin::Remote };
            let number = if entries.is_empty() { 0 } else { inner.commits.publish(origin, entries.clone(), Vec::new()) };
            Ok((entries, number))
        })
    }

    /// Subscribes to the commit pipeline; also returns the number of the last commit published
    /// before the subscription (both under the ledger lock). A subscriber that then reads the ledger
    /// misses nothing: whatever it reads is either in it or arrives on the pipeline; what is in both
    /// it takes in twice, so what it derives must be idempotent (sales are counted by id).
    pub fn subscribe(&self) -> (tokio::sync::broadcast::Receiver<Arc<Commit>>, u64) {
        let inner = self.lock();
        (inner.commits.subscribe(), inner.commits.last())
    }

    /// Records a local operation; returns once its entry is durable.
    pub fn execute(&self, op: LocalOp) -> Result<Entry, NodeError> {
        self.execute_as(op, true).map(|r| r.entry)
    }

    /// As [`Node::execute`], with the commit's number on the pipeline (to wait for a subscriber
    /// to take it in before answering).
    pub fn record(&self, op: LocalOp) -> Result<Recorded, NodeError> {
        self.execute_as(op, true)
    }

    /// Records a product, which must be new (`create`) or known (else): checked under the write
    /// lock, so two tills creating one SKU at once cannot both succeed.
    pub fn write_product(&self, product: Product, create: bool) -> Result<Recorded, NodeError> {
        let sku = product.sku.clone();
        self.execute_when(LocalOp::UpsertProduct(product), true, move |l| match (create, l.state().products.contains_key(&sku)) {
            (true, true) => Err(NodeError::ProductExists(sku)),
            (false, false) => Err(NodeError::UnknownProduct(sku)),
            _ => Ok(()),
        })
    }

    /// As [`Node::execute`]; `count_rights_refusal: false` when the caller may still wait for the
    /// rights and retry (it counts the refusal it finally answers).
    fn execute_as(&self, op: LocalOp, count_rights_refusal: bool) -> Result<Recorded, NodeError> {
        self.execute_when(op, count_rights_refusal, |_| Ok(()))
    }

    /// As [`Node::execute_as`], once `precondition` holds of the ledger, under the same lock.
    fn execute_when(
        &self,
        op: LocalOp,
        count_rights_refusal: bool,
        precondition: impl FnOnce(&Ledger) -> Result<(), NodeError> + Send + 'static,
    ) -> Result<Recorded, NodeError> {
        let kind = match &op {
            LocalOp::Sell { .. } => "sale",
            LocalOp::Restock { .. } => "restock",
            LocalOp::Transfer { .. } => "transfer",
            LocalOp::UpsertProduct(_) => "product",
            LocalOp::AttachPhoto { .. } => "photo",
            LocalOp::Revoke(_) => "revocation",
            LocalOp::RecordCloudHolds { .. } => "cloud_watermark",
            LocalOp::TransferLoyalty { .. } => "loyalty_transfer",
            LocalOp::MintVoucher { .. } => "voucher_mint",
            LocalOp::RedeemVoucher { .. } => "voucher_redemption",
            LocalOp::RecommendationFeedback(_) => "recommendation_feedback",
            LocalOp::PlanDrop { .. } => "drop",
        };
        let _span = tracing::debug_span!("local_op", kind).entered();
        let result = if self.group_commit {
            self.commit_in_group(op, Box::new(precondition))
        } else {
            self.with_write_as(true, |l| {
                precondition(l)?;
                Ok::<_, NodeError>(vec![l.record(op, now_ms())?])
            })
            .map(|(mut v, commit)| {
                let entry = v.pop().expect("one entry per operation");
                debug_assert!(v.is_empty() && commit > 0, "one entry, published");
                Recorded { entry, commit }
            })
        };
        match &result {
            Ok(_) => {
                self.metrics.changes_applied.get_or_create(&Origin { origin: "local" }).inc();
                if kind == "sale" {
                    self.metrics.sales.inc();
                }
            }
            Err(NodeError::Ledger(LedgerError::InsufficientRights { .. })) => {
                if count_rights_refusal {
                    self.count_refused(&format!("{kind}_insufficient_stock_rights"));
                }
            }
            Err(e) => {
                let reason = match e {
                    NodeError::Recovering(_) => "recovering",
                    NodeError::Ledger(LedgerError::Cloned) => "device_cloned",
                    NodeError::Ledger(LedgerError::UnknownSku(_)) => "unknown_sku",
                    NodeError::Ledger(LedgerError::AlreadyRecorded { .. }) => "already_recorded",
                    NodeError::Ledger(LedgerError::InsufficientPoints { .. }) => "insufficient_points",
                    NodeError::Ledger(LedgerError::VoucherRedeemed { .. }) => "already_redeemed",
                    NodeError::Ledger(LedgerError::VoucherHeldElsewhere { .. }) => "held_elsewhere",
                    NodeError::Ledger(LedgerError::UnknownVoucher(_)) => "unknown_voucher",
                    NodeError::Ledger(_) => "invalid",
                    NodeError::ProductExists(_) => "exists",
                    NodeError::UnknownProduct(_) => "unknown_sku",
                    _ => "store",
                };
                self.metrics.refused_operations.get_or_create(&Reason { reason: format!("{kind}_{reason}") }).inc();
            }
        }
        result
    }

    /// Group commit: the operation joins the queue, and whoever holds the ledger lock next records
    /// every queued operation in queue order and makes their entries durable with one commit (one
    /// fsync), then answers each. While that commit runs, the next operations queue up for the
    /// next one. An operation is answered only after the commit that holds its entry.
    fn commit_in_group(&self, op: LocalOp, precondition: Precondition) -> Result<Recorded, NodeError> {
        let slot: Slot = Arc::default();
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).push(Queued { op, precondition, slot: slot.clone() });
        self.guarded("a group commit", |inner| loop {
            if let Some(done) = slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return done;
            }
            let batch: Vec<Queued> = {
                let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                let n = queue.len().min(MAX_GROUP_COMMIT_OPS);
                queue.drain(..n).collect()
            };
            // This operation is queued or answered: a batch that takes it answers it.
            if batch.is_empty() {
                return Err(NodeError::Internal("group commit: an operation was neither queued nor answered".into()));
            }
            self.commit_batch(inner, batch);
        })
    }

    /// Records each operation of `batch` (a refused one is answered at once) and commits the
    /// entries with one durable append, under the ledger lock.
    fn commit_batch(&self, inner: &mut Inner, batch: Vec<Queued>) {
        let _all = BatchSlots(batch.iter().map(|q| q.slot.clone()).collect());
        let mut entries = Vec::with_capacity(batch.len());
        let mut pending: Vec<Slot> = Vec::with_capacity(batch.len());
        // A refusal was judged against a ledger holding this batch's earlier operations: it stands
        // only once they are durable (a retry refused as "already recorded" must not be answered
        // with a sale the disk then refused).
        let mut refused: Vec<(Slot, NodeError)> = Vec::new();
        for q in batch {
            let outcome = (|| {
                if let Some(why) = &inner.failed {
                    return Err(NodeError::Failed(why.clone()));
                }
                if let Some(r) = &inner.recovery {
                    return Err(NodeError::Recovering(r.message.clone()));
                }
                (q.precondition)(&inner.ledger)?;
                Ok(inner.ledger.record(q.op, now_ms())?)
            })();
            match outcome {
                Ok(entry) => {
                    entries.push(entry);
                    pending.push(q.slot);
                }
                Err(e) => refused.push((q.slot, e)),
            }
        }
        debug_assert_eq!(entries.len(), pending.len());
        if entries.is_empty() {
            for (slot, e) in refused {
                answer(&slot, Err(e));
            }
            return;
        }
        let started = Instant::now();
        if let Err(e) = inner.store.append(&entries) {
            Self::fail_on_store_error(inner, &e, "commit");
            for slot in pending.iter().chain(refused.iter().map(|(s, _)| s)) {
                answer(slot, Err(NodeError::Failed(e.to_string())));
            }
            return;
        }
        self.metrics.store_commit_seconds.observe(started.elapsed().as_secs_f64());
        self.metrics.group_commit_ops.observe(entries.len() as f64);
        self.metrics.journal_entries.set(inner.store.len() as i64);
        let number = inner.commits.publish(CommitOrigin::Local, entries.clone(), Vec::new());
        debug_assert!(number > 0);
        for (slot, entry) in pending.iter().zip(entries) {
            answer(slot, Ok(Recorded { entry, commit: number }));
        }
        for (slot, e) in refused {
            answer(&slot, Err(e));
        }
    }

    pub fn count_refused(&self, reason: &str) {
        self.metrics.refused_operations.get_or_create(&Reason { reason: reason.to_string() }).inc();
    }

    /// Changes each time a transfer of rights to this device is applied from a peer: a sale waiting
    /// for rights wakes on it instead of polling.
    pub fn rights_arrived(&self) -> tokio::sync::watch::Receiver<u64> {
        self.rights_arrived.subscribe()
    }

    /// Device secret and mesh pre-shared key, for starting the mesh. Never logged.
    pub(crate) fn mesh_secrets(&self) -> ([u8; 32], [u8; 32]) {
        self.lock().mesh_secrets
    }

    /// Sales recorded elsewhere that arrived here most recently (at most `MAX_RECENT_ARRIVALS`).
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals.lock().expect("arrivals lock").iter().cloned().collect()
    }

    pub fn sell(
        &self,
        lines: Vec<LineRequest>,
        client_ref: Option<String>,
        recommendation: Option<stallmesh_ledger::RecommendationShown>,
    ) -> Result<Entry, NodeError> {
        self.execute(LocalOp::Sell { lines, client_ref, recommendation, loyalty: None, staff: None })
    }

    /// As [`Node::sell`], for a caller that waits for missing rights and retries: a refusal for
    /// rights is not counted here.
    pub fn try_sell(
        &self,
        lines: Vec<LineRequest>,
        client_ref: Option<String>,
        recommendation: Option<stallmesh_ledger::RecommendationShown>,
        loyalty: Option<stallmesh_ledger::LoyaltyOnSale>,
        staff: Option<String>,
    ) -> Result<Recorded, NodeError> {
        self.execute_as(LocalOp::Sell { lines, client_ref, recommendation, loyalty, staff }, false)
    }

    /// Records staff's dismissal or override of a recommendation.
    pub fn record_feedback(&self, feedback: stallmesh_ledger::RecommendationFeedback) -> Result<Recorded, NodeError> {
        self.execute_as(LocalOp::RecommendationFeedback(feedback), true)
    }

    /// Records a loyalty operation (a voucher's mint or redemption, a transfer of loyalty rights).
    pub fn record_loyalty(&self, op: LocalOp) -> Result<Recorded, NodeError> {
        debug_assert!(matches!(op, LocalOp::MintVoucher { .. } | LocalOp::RedeemVoucher { .. } | LocalOp::TransferLoyalty { .. }));
        self.execute_as(op, true)
    }

    /// Verifies and applies changes from a peer; persists what was applied.
    pub fn ingest(&self, changes: Vec<SignedChange>) -> Result<ApplyReport, NodeError> {
        let _span = tracing::debug_span!("ingest", changes = changes.len()).entered();
        let mut report = None;
        let mut me = None;
        // Nobody was promised these: commit without waiting for the disk (flushed within a tick).
        self.with_write_as(false, |l| {
            me = Some(l.device());
            let r = l.apply_remote(changes);
            let applied = r.applied.clone();
            report = Some(r);
            Ok::<_, NodeError>(applied)
        })?;
        let report = report.expect("set by the closure");
        if !report.evidence.is_empty() {
            self.keep_evidence(&report.evidence)?;
        }
        let to_me = |e: &&Entry| match &e.event.body {
            stallmesh_ledger::EventBody::Transferred { to, .. } | stallmesh_ledger::EventBody::LoyaltyTransferred { to, .. } => Some(*to) == me,
            _ => false,
        };
        if report.applied.iter().any(|e| to_me(&e)) {
            self.rights_arrived.send_modify(|n| *n += 1);
        }
        let arrived_us = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0);
        {
            let mut arrivals = self.arrivals.lock().expect("arrivals lock");
            for e in report.applied.iter().filter(|e| matches!(e.event.body, stallmesh_ledger::EventBody::Sold { .. })) {
                if arrivals.len() == MAX_RECENT_ARRIVALS {
                    arrivals.pop_front();
                }
                arrivals.push_back(Arrival {
                    sale_id: stallmesh_ledger::sale_id(e.change.dot()),
                    recorded_ms: e.event.time_ms,
                    arrived_us,
                });
            }
        }
        self.metrics.changes_applied.get_or_create(&Origin { origin: "remote" }).inc_by(report.applied.len() as u64);
        self.metrics.duplicate_changes.inc_by(report.duplicates as u64);
        self.metrics.pending_changes.set(report.pending as i64);
        for (_, why) in &report.rejected {
            self.metrics.verification_failures.get_or_create(&Reason { reason: why.label().to_string() }).inc();
        }
        Ok(report)
    }

    /// Keeps conflicting changes durably, counts them, and publishes them on the commit pipeline
    /// for the mesh to pass on, so that every replica sees both histories (each replica passes a
    /// given change on once: evidence is kept once).
    fn keep_evidence(&self, evidence: &[SignedChange]) -> Result<(), NodeError> {
        // The change held at each position goes out too: the tablet that signed the conflicting
        // one learns of the other history (two clones share a peer id, so the mesh alone may
        // never carry one's changes to the other).
        let mut pass_on = evidence.to_vec();
        {
            let mut inner = self.lock();
            if let Err(e) = inner.store.keep_evidence(evidence) {
                Self::fail_on_store_error(&mut inner, &e, "keeping evidence");
                return Err(e.into());
            }
            for c in evidence {
                pass_on.extend(inner.store.changes_since(&c.device, c.seq, 1)?.into_iter().filter(|h| h.seq == c.seq));
            }
            inner.commits.publish(CommitOrigin::Remote, Vec::new(), pass_on);
        }
        self.metrics.equivocations.inc_by(evidence.len() as u64);
        for c in evidence {
            tracing::error!(
                device = %c.device,
                seq = c.seq,
                "equivocation: two different changes signed by one device for one journal position (cloned or reset credentials); kept as evidence"
            );
        }
        Ok(())
    }

    /// Makes changes received from peers durable (the mesh calls this every tick).
    pub fn flush(&self) -> Result<(), NodeError> {
        self.guarded("a flush", |inner| {
            if inner.failed.is_some() {
                return Ok(());
            }
            if let Err(e) = inner.store.flush() {
                Self::fail_on_store_error(inner, &e, "flush");
                return Err(e.into());
            }
            Ok(())
        })
    }

    /// Reads the ledger under the lock. A panic in `f` marks the node failed and continues in the
    /// caller, after the lock is released (so it is not poisoned).
    pub fn read<R>(&self, f: impl FnOnce(&Ledger) -> R) -> R {
        let mut inner = self.lock();
        match catch_unwind(AssertUnwindSafe(|| f(&inner.ledger))) {
            Ok(r) => r,
            Err(payload) => {
                let why = format!("{}: panic while reading the ledger: {}", inner.store.path().display(), panic_message(&*payload));
                tracing::error!(reason = %why, "refusing further writes until restart");
                inner.failed.get_or_insert(why);
                drop(inner);
                std::panic::resume_unwind(payload)
            }
        }
    }

    /// Changes of `device` from `from_seq`, from the store, for a peer or the cloud.
    pub fn changes_since(
        &self,
        device: &stallmesh_identity::DeviceId,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<SignedChange>, NodeError> {
        self.guarded("a read of changes", |inner| {
            inner.store.changes_since(device, from_seq, limit).map_err(|e| {
                if matches!(e, StoreError::Corrupt { .. }) {
                    Self::fail_on_store_error(inner, &e, "read");
                }
                e.into()
            })
        })
    }

    /// Conflicting positions, device by device, with what each history recorded there (at most
    /// [`MAX_EQUIVOCATIONS_LISTED`] positions).
    pub fn equivocations(&self) -> Result<Vec<DeviceEquivocation>, NodeError> {
        // Copied under the lock, decoded after it: a listing never holds up a sale.
        let listed: Vec<(stallmesh_identity::Dot, Vec<SignedChange>, Option<SignedChange>)> = {
            let inner = self.lock();
            let mut listed = Vec::new();
            for (dot, conflicting) in inner.ledger.evidence().iter().take(MAX_EQUIVOCATIONS_LISTED) {
                let held = inner.store.changes_since(&dot.device, dot.seq, 1)?.into_iter().find(|c| c.seq == dot.seq);
                listed.push((*dot, conflicting.clone(), held));
            }
            listed
        };
        let mut out: Vec<DeviceEquivocation> = Vec::new();
        for (dot, conflicting, held) in listed {
            let held = held.and_then(|c| {
                let event = stallmesh_ledger::decode_change_event(&c).ok()?;
                Some((c, event))
            });
            let conflicting = conflicting.iter().map(|c| (c.clone(), stallmesh_ledger::decode_change_event(c))).collect();
            let position = EquivocatedPosition { seq: dot.seq, held, conflicting };
            match out.last_mut() {
                Some(d) if d.device == dot.device => d.positions.push(position),
                _ => out.push(DeviceEquivocation { device: dot.device, positions: vec![position] }),
            }
        }
        Ok(out)
    }

    /// The newest change of this device's own journal, if it has one.
    pub fn latest_own_change(&self) -> Result<Option<SignedChange>, NodeError> {
        let inner = self.lock();
        let me = inner.ledger.device();
        let Some(next) = inner.ledger.heads_ref().get(&me).copied().filter(|n| *n > 0) else { return Ok(None) };
        Ok(inner.store.changes_since(&me, next - 1, 1)?.into_iter().next())
    }

    pub fn failed(&self) -> Option<String> {
        self.lock().failed.clone()
    }
}

/// Opens the node's store. A damaged one (`Corrupt`) is set aside, never deleted, and a fresh
/// store takes its place: the node then recovers its journal from its peers. Another device's store
/// or an unknown schema stays a refusal: those are configuration mistakes, not damage.
fn open_store(config: &Config, owner: Owner) -> Result<(Store, Option<SetAside>), NodeError> {
    let path = config.store_path();
    let reason = match Store::open(&path, owner) {
        Ok(store) => return Ok((store, None)),
        Err(StoreError::Corrupt { detail, .. }) => detail,
        Err(e) => return Err(e.into()),
    };
    let moved_to = stallmesh_store::set_aside(&path, now_ms()).map_err(|source| NodeError::SetAside {
        path: path.clone(),
        reason: reason.clone(),
        source,
    })?;
    tracing::error!(
        store = %path.display(),
        moved_to = %moved_to.display(),
        %reason,
        "STORE DAMAGED: the store file was set aside (kept, not deleted) and this tablet starts with an empty \
         store; it will rebuild its journal from its peers. Keep the set-aside file for inspection."
    );
    let store = Store::open(&path, owner)?;
    Ok((store, Some(SetAside { original: path, moved_to, reason })))
}

fn recovering_marker(journal_marker: &std::path::Path) -> PathBuf {
    journal_marker.with_file_name(JOURNAL_RECOVERING_FILE)
}

/// Sets or clears the "recovery under way" marker. Failing to write it is logged loudly: the
/// recovery itself goes on, only a power cut in the middle of it would then go unnoticed.
fn mark_recovering(path: &std::path::Path, on: bool) {
    let result = if on {
        std::fs::write(path, "this tablet's journal is being taken back from its peers\n")
    } else {
        std::fs::remove_file(path).or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
    };
    if let Err(e) = result {
        tracing::error!(path = %path.display(), error = %e, "cannot record whether a recovery is under way");
    }
}

fn create_demo_credentials(config: &Config, device_dir: &std::path::Path) -> Result<DeviceCredentials, NodeError> {
    let market_dir = config.data_dir.join(DEMO_MARKET_DIR);
    let (market_key, market) = if market_dir.join(files::MARKET_KEY_FILE).exists() {
        files::load_market(&market_dir)?
    } else {
        files::init_market(&market_dir, "Demo Market")?
    };
    let key = stallmesh_identity::DeviceKey::generate().map_err(|e| {
        NodeError::Credentials(FileError::Invalid { path: device_dir.into(), what: "random source", detail: e.to_string() })
    })?;
    // Demo credentials last ten years: a demo must not stop working on a Saturday.
    let expires = now_ms() + 10 * 365 * 24 * 3_600_000;
    let certificate = market_key.enrol(key.device_id(), "Demo Stall", Role::Organiser, expires);
    let creds = DeviceCredentials { key, certificate, market, mesh_psk: market_key.mesh_psk() };
    files::write_device(device_dir, &creds)?;
    files::load_device(device_dir).map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded defaults, in demo mode, with data in `dir`.
    fn demo_config(dir: &std::path::Path) -> Config {
        let mut config = Config::load(None, |_| None).unwrap();
        config.data_dir = dir.to_path_buf();
        config
    }

    /// A metric's value from the node's own exposition.
    fn metric(node: &Node, name: &str) -> f64 {
        let text = node.metrics.encode();
        let line = text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' ')).unwrap_or_else(|| panic!("{name} in\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    #[test]
    fn concurrent_sales_share_durable_commits_and_never_sell_the_last_unit_twice() {
        let dir = tempfile::tempdir().unwrap();
        let config = demo_config(dir.path());
        assert!(config.store.group_commit, "group commit is the default");
        let node = Node::open(&config).unwrap();
        let candles = node.read(|l| l.state().rights_of("BEE-CND", &l.device()));
        assert_eq!(candles, 8, "the demo stall has 8 candles");
        let (commits_before, ops_before) = (metric(&node, "stallmesh_group_commit_ops_count"), metric(&node, "stallmesh_group_commit_ops_sum"));
        let tills = 24;
        let start = Arc::new(std::sync::Barrier::new(tills));
        let handles: Vec<_> = (0..tills)
            .map(|i| {
                let (node, start) = (node.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    node.sell(vec![LineRequest { sku: "BEE-CND".into(), qty: 1 }], Some(format!("till-{i}")), None)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let sold = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(sold, 8, "exactly the candles held are sold");
        for r in results.iter().filter_map(|r| r.as_ref().err()) {
            assert!(matches!(r, NodeError::Ledger(LedgerError::InsufficientRights { .. })), "{r}");
        }
        // Fewer commits than sales: some sales shared an fsync.
        let commits = metric(&node, "stallmesh_group_commit_ops_count") - commits_before;
        let in_commits = metric(&node, "stallmesh_group_commit_ops_sum") - ops_before;
        assert_eq!(in_commits, 8.0, "every sale was in exactly one commit");
        assert!(commits < 8.0, "{commits} commits for 8 sales");
        // Every acknowledged sale is on disk.
        drop(node);
        let again = Node::open(&config).unwrap();
        assert_eq!(again.read(|l| l.state().sales.len()), 8);
        assert_eq!(again.read(|l| l.state().rights_of("BEE-CND", &l.device())), 0);
    }

    #[test]
    fn a_panic_in_the_middle_of_a_group_commit_answers_every_operation_of_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let config = demo_config(dir.path());
        let node = Node::open(&config).unwrap();
        let restock = || LocalOp::Restock { sku: "JAM-STR".into(), qty: 1 };
        // Three operations queued behind one another; the second one's step panics.
        let queued: Vec<Slot> = (0..3)
            .map(|i| {
                let slot: Slot = Arc::default();
                let precondition: Precondition =
                    if i == 1 { Box::new(|_: &Ledger| -> Result<(), NodeError> { panic!("boom in a batch") }) } else { Box::new(|_: &Ledger| Ok(())) };
                node.queue.lock().unwrap().push(Queued { op: restock(), precondition, slot: slot.clone() });
                slot
            })
            .collect();
        let last = node.commit_in_group(restock(), Box::new(|_: &Ledger| Ok(()))).unwrap_err();
        assert!(matches!(&last, NodeError::Failed(why) if why.contains("boom in a batch")), "{last}");
        for (i, slot) in queued.iter().enumerate() {
            let answer = slot.lock().unwrap().take();
            assert!(matches!(answer, Some(Err(NodeError::Failed(_)))), "operation {i} is answered with the failure: {answer:?}");
        }
        assert!(node.queue.lock().unwrap().is_empty());
        // Nothing of the batch reached the disk.
        drop(node);
        let again = Node::open(&config).unwrap();
        assert_eq!(again.read(|l| l.state().rights_of("JAM-STR", &l.device())), 18);
    }

    #[test]
    fn a_panic_under_the_lock_fails_the_node_without_poisoning_it() {
        let dir = tempfile::tempdir().unwrap();
        let config = demo_config(dir.path());
        let node = Node::open(&config).unwrap();
        let err = node.with_write(|_| -> Result<Vec<Entry>, NodeError> { panic!("boom in the ledger") }).unwrap_err();
        assert!(matches!(&err, NodeError::Failed(why) if why.contains("boom") && why.contains("stallmesh.redb")), "{err}");
        assert!(node.failed().unwrap().contains("boom"));
        // Fail-stop: later writes get `Failed` (503), reads and the lock keep working.
        let sku = node.read(|l| l.state().products.keys().next().cloned()).unwrap();
        let err = node.execute(LocalOp::Restock { sku, qty: 1 }).unwrap_err();
        assert!(matches!(err, NodeError::Failed(_)), "{err}");
        assert!(node.flush().is_ok());
        assert!(node.changes_since(&node.read(|l| l.device()), 0, 10).is_ok());
    }
}
