//! The driver around the sans-IO ledger: it supplies the clock, makes entries durable in redb
//! before anything is acknowledged, and counts what happened.
//!
//! Failure model: if a durable commit fails, the in-memory ledger is ahead of the disk. The node
//! then stops accepting writes (fail-stop, like a database whose log write failed) and a restart
//! rebuilds memory from what is on disk, so nothing unacknowledged is ever reported as done.

use crate::config::Config;
use crate::mesh::{MeshCommand, MeshStatus};
use crate::metrics::{Metrics, Origin, Reason};
use stallmesh_identity::files::{self, DeviceCredentials, FileError};
use stallmesh_identity::{Role, SignedChange};
use stallmesh_ledger::{ApplyReport, Entry, Ledger, LedgerError, LineRequest, LocalOp, MarketContext, Product, RestoreError};
use stallmesh_store::{Owner, Store, StoreError};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
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
    #[error("node stopped accepting writes after a store failure ({0}); restart it")]
    Failed(String),
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

struct Inner {
    ledger: Ledger,
    store: Store,
    failed: Option<String>,
    /// For the mesh: the device secret (its libp2p identity) and the market's network key.
    mesh_secrets: ([u8; 32], [u8; 32]),
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

/// The node's link to its mesh task, once the mesh runs.
pub struct MeshLink {
    pub commands: tokio::sync::mpsc::Sender<MeshCommand>,
    pub status: Arc<Mutex<MeshStatus>>,
    pub low_watermark: u64,
    pub refill: u64,
}

#[derive(Clone)]
pub struct Node {
    inner: Arc<Mutex<Inner>>,
    pub metrics: Arc<Metrics>,
    pub info: Arc<NodeInfo>,
    pub mesh: Arc<OnceLock<MeshLink>>,
    /// Search and recommendations, once `start` has set them up.
    pub inference: Arc<OnceLock<Arc<crate::inference::Inference>>>,
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
        let mesh_secrets = (key.secret(), mesh_psk);
        let info = NodeInfo {
            market_name: market.name.clone(),
            market_id: market.market_id.to_hex(),
            device: key.device_id().to_hex(),
            stall: certificate.stall.clone(),
            role: certificate.role,
            demo,
            store_path: config.store_path(),
        };
        let owner = Owner { market: market.market_id, device: key.device_id() };
        let store = Store::open(&config.store_path(), owner)?;
        let started = Instant::now();
        let entries = store.load()?;
        let restored = entries.len();
        let ctx = MarketContext::new(market.public_key);
        let ledger = Ledger::restore(ctx, key, certificate, entries)
            .map_err(|source| NodeError::Restore { path: config.store_path(), source: Box::new(source) })?;
        tracing::info!(
            entries = restored,
            elapsed_ms = started.elapsed().as_millis() as u64,
            store = %config.store_path().display(),
            "ledger restored"
        );
        let node = Node {
            inner: Arc::new(Mutex::new(Inner { ledger, store, failed: None, mesh_secrets })),
            metrics: Arc::new(Metrics::new()),
            info: Arc::new(info),
            mesh: Arc::new(OnceLock::new()),
            inference: Arc::new(OnceLock::new()),
            arrivals: Arc::default(),
            rights_arrived: Arc::new(tokio::sync::watch::Sender::new(0)),
        };
        node.metrics.journal_entries.set(restored as i64);
        let fresh = restored == 0;
        node.with_write(|l| l.enrol_self(now_ms()).map(|e| e.into_iter().collect()))?;
        if demo && fresh {
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

    fn seed_demo(&self) -> Result<(), NodeError> {
        for (product, qty) in demo_catalogue(&self.info.stall) {
            let sku = product.sku.clone();
            self.execute(LocalOp::UpsertProduct(product))?;
            self.execute(LocalOp::Restock { sku, qty })?;
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock means a broken invariant: refuse to go on from that state.
        self.inner.lock().expect("ledger lock poisoned by a panic in the core")
    }

    /// Runs `f` on the ledger and durably appends the entries it returns, under one lock so the
    /// store's order is the ledger's order. Blocking: call from a blocking thread.
    fn with_write<T>(&self, f: impl FnOnce(&mut Ledger) -> Result<Vec<Entry>, T>) -> Result<Vec<Entry>, NodeError>
    where
        NodeError: From<T>,
    {
        self.with_write_as(true, f)
    }

    /// As [`Node::with_write`]; `durable: false` for changes from peers (see `Store::append_relaxed`).
    fn with_write_as<T>(&self, durable: bool, f: impl FnOnce(&mut Ledger) -> Result<Vec<Entry>, T>) -> Result<Vec<Entry>, NodeError>
    where
        NodeError: From<T>,
    {
        let mut inner = self.lock();
        if let Some(why) = &inner.failed {
            return Err(NodeError::Failed(why.clone()));
        }
        let entries = f(&mut inner.ledger)?;
        let started = Instant::now();
        let result = if durable { inner.store.append(&entries) } else { inner.store.append_relaxed(&entries) };
        if let Err(e) = result {
            tracing::error!(error = %e, "store commit failed; refusing further writes until restart");
            inner.failed = Some(e.to_string());
            return Err(e.into());
        }
        self.metrics.store_commit_seconds.observe(started.elapsed().as_secs_f64());
        self.metrics.journal_entries.set(inner.store.len() as i64);
        Ok(entries)
    }

    /// Records a local operation; returns once its entry is durable.
    pub fn execute(&self, op: LocalOp) -> Result<Entry, NodeError> {
        self.execute_as(op, true)
    }

    /// As [`Node::execute`]; `count_rights_refusal: false` when the caller may still wait for the
    /// rights and retry (it counts the refusal it finally answers).
    fn execute_as(&self, op: LocalOp, count_rights_refusal: bool) -> Result<Entry, NodeError> {
        let kind = match &op {
            LocalOp::Sell { .. } => "sale",
            LocalOp::Restock { .. } => "restock",
            LocalOp::Transfer { .. } => "transfer",
            LocalOp::UpsertProduct(_) => "product",
            LocalOp::AttachPhoto { .. } => "photo",
            LocalOp::Revoke(_) => "revocation",
        };
        let _span = tracing::debug_span!("local_op", kind).entered();
        let result = self.with_write(|l| l.record(op, now_ms()).map(|e| vec![e]));
        match &result {
            Ok(entries) => {
                self.metrics.changes_applied.get_or_create(&Origin { origin: "local" }).inc();
                if kind == "sale" {
                    self.metrics.sales.inc();
                }
                self.to_mesh(MeshCommand::Broadcast(entries.iter().map(|e| e.change.clone()).collect()));
                self.ask_for_rights_if_low(entries);
            }
            Err(NodeError::Ledger(LedgerError::InsufficientRights { sku, requested, held_here, held_elsewhere_total, .. })) => {
                if *held_elsewhere_total > 0 {
                    self.want_rights(sku, requested - held_here, kind == "sale");
                }
                if count_rights_refusal {
                    self.count_refused(&format!("{kind}_insufficient_stock_rights"));
                }
            }
            Err(e) => {
                let reason = match e {
                    NodeError::Ledger(LedgerError::UnknownSku(_)) => "unknown_sku",
                    NodeError::Ledger(LedgerError::AlreadyRecorded { .. }) => "already_recorded",
                    NodeError::Ledger(_) => "invalid",
                    _ => "store",
                };
                self.metrics.refused_operations.get_or_create(&Reason { reason: format!("{kind}_{reason}") }).inc();
            }
        }
        result.map(|mut v| v.pop().expect("one entry per operation"))
    }

    pub fn count_refused(&self, reason: &str) {
        self.metrics.refused_operations.get_or_create(&Reason { reason: reason.to_string() }).inc();
    }

    /// Asks peers for `short` units of `sku` plus a refill; `for_sale`: a customer waits for them.
    pub fn want_rights(&self, sku: &str, short: u64, for_sale: bool) {
        let refill = self.mesh.get().map_or(0, |m| m.refill);
        self.to_mesh(MeshCommand::WantRights { sku: sku.to_string(), qty: short + refill, for_sale });
    }

    /// Changes each time a transfer of rights to this device is applied from a peer: a sale waiting
    /// for rights wakes on it instead of polling.
    pub fn rights_arrived(&self) -> tokio::sync::watch::Receiver<u64> {
        self.rights_arrived.subscribe()
    }

    /// Hands a command to the mesh task, if one runs. A full queue is counted, never waited on:
    /// the heartbeat's catch-up carries whatever a dropped broadcast would have.
    fn to_mesh(&self, command: MeshCommand) {
        if let Some(link) = self.mesh.get() {
            if link.commands.try_send(command).is_err() {
                self.metrics.mesh_queue_full.inc();
            }
        }
    }

    /// After a sale, ask peers for more stock rights when this device runs low on a SKU.
    fn ask_for_rights_if_low(&self, entries: &[Entry]) {
        let Some(link) = self.mesh.get() else { return };
        for e in entries {
            if let stallmesh_ledger::EventBody::Sold { lines, .. } = &e.event.body {
                for l in lines {
                    let (here, elsewhere) = self.read(|led| {
                        let s = led.state().stock(&l.sku);
                        let here = s.per_device.get(&led.device()).copied().unwrap_or(0);
                        (here, s.total - here)
                    });
                    if here <= link.low_watermark && elsewhere > 0 {
                        self.to_mesh(MeshCommand::WantRights { sku: l.sku.clone(), qty: link.refill, for_sale: false });
                    }
                }
            }
        }
    }

    /// Device secret and mesh pre-shared key, for starting the mesh. Never logged.
    pub(crate) fn mesh_secrets(&self) -> ([u8; 32], [u8; 32]) {
        self.lock().mesh_secrets
    }

    /// Sales recorded elsewhere that arrived here most recently (at most `MAX_RECENT_ARRIVALS`).
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals.lock().expect("arrivals lock").iter().cloned().collect()
    }

    pub fn mesh_status(&self) -> Option<MeshStatus> {
        self.mesh.get().map(|m| m.status.lock().expect("mesh status lock").clone())
    }

    pub fn sell(
        &self,
        lines: Vec<LineRequest>,
        client_ref: Option<String>,
        recommendation: Option<stallmesh_ledger::RecommendationShown>,
    ) -> Result<Entry, NodeError> {
        self.execute(LocalOp::Sell { lines, client_ref, recommendation })
    }

    /// As [`Node::sell`], for a caller that waits for missing rights and retries: a refusal for
    /// rights is not counted here.
    pub fn try_sell(
        &self,
        lines: Vec<LineRequest>,
        client_ref: Option<String>,
        recommendation: Option<stallmesh_ledger::RecommendationShown>,
    ) -> Result<Entry, NodeError> {
        self.execute_as(LocalOp::Sell { lines, client_ref, recommendation }, false)
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
        if report.applied.iter().any(|e| matches!(&e.event.body, stallmesh_ledger::EventBody::Transferred { to, .. } if Some(*to) == me)) {
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

    /// Makes changes received from peers durable (the mesh calls this every tick).
    pub fn flush(&self) -> Result<(), NodeError> {
        let mut inner = self.lock();
        if inner.failed.is_some() {
            return Ok(());
        }
        if let Err(e) = inner.store.flush() {
            tracing::error!(error = %e, "store flush failed; refusing further writes until restart");
            inner.failed = Some(e.to_string());
            return Err(e.into());
        }
        Ok(())
    }

    /// Reads the ledger under the lock.
    pub fn read<R>(&self, f: impl FnOnce(&Ledger) -> R) -> R {
        f(&self.lock().ledger)
    }

    /// Changes of `device` from `from_seq`, from the store, for a peer or the cloud.
    pub fn changes_since(
        &self,
        device: &stallmesh_identity::DeviceId,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<SignedChange>, NodeError> {
        Ok(self.lock().store.changes_since(device, from_seq, limit)?)
    }

    pub fn failed(&self) -> Option<String> {
        self.lock().failed.clone()
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
