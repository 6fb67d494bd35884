//! The uplink driver: carries out what the uplink core (`stallmesh_ingest::uplink::Uplink`) asks —
//! signed HTTP requests to the cloud — on a thread of its own, woken by the commit pipeline (a
//! commit may give the cloud something to take) and at the core's `poll_timeout`. What the cloud
//! sends back (its watermark, other tablets' uploads) is applied like any peer's changes, so it
//! reaches the rest of the mesh from here.
//!
//! The market's online channel is reached through it too: a till short of units the online device
//! holds asks for them ([`UplinkHandle::ask_for_sale`], answered with its transfer), and the online
//! channel's own asks arrive in replies (`rights_wanted`), given to by this tablet's rebalancing
//! policy as it gives a peer that asks.

use crate::runtime::{now_ms, Node};
use stallmesh_api::cloud::CloudErrorBody;
use stallmesh_identity::{DeviceId, DeviceKey, SignedChange};
use stallmesh_ingest::uplink::{Uplink, HEADS_REFRESH_MS};
use stallmesh_ingest::wire::{self, CloudReply, OnlineWants, RequestAuth};
use stallmesh_ledger::LocalOp;
use stallmesh_sync::rebalance::RebalancePolicy;
use stallmesh_ingest::RejectedChange;
use stallmesh_sync::ChangeLog;
use std::io::Read;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Time to open a connection to the cloud: a dead 4G link is given up on quickly, then backed off.
pub const CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Time for a whole request and reply: a full batch (2 MB) over a slow 4G link.
pub const REQUEST_TIMEOUT_MS: u64 = 60_000;

/// What the status endpoint shows of the uplink.
#[derive(Debug, Clone, Default)]
pub struct UplinkSnapshot {
    pub url: String,
    pub started: bool,
    pub last_success_ms: Option<u64>,
    pub last_error: Option<String>,
    pub failures: u32,
    pub lacking: u64,
    pub changes_uploaded: u64,
    pub duplicates: u64,
    pub refused: u64,
}

use stallmesh_ingest::uplink::LIVE_UPLINK_MS;

#[derive(Clone)]
pub struct UplinkHandle {
    snapshot: Arc<Mutex<UplinkSnapshot>>,
    /// Asks for the online channel's units, taken by the uplink thread (bounded there).
    asks: Arc<Mutex<Vec<(String, u64, bool)>>>,
    wake: mpsc::SyncSender<()>,
    policy: RebalancePolicy,
}

impl UplinkHandle {
    pub fn snapshot(&self) -> UplinkSnapshot {
        self.snapshot.lock().expect("uplink snapshot").clone()
    }

    /// Whether the cloud answered lately and nothing failed since.
    pub fn live(&self, now_ms: u64) -> bool {
        let s = self.snapshot();
        s.failures == 0 && s.last_success_ms.is_some_and(|t| now_ms.saturating_sub(t) <= LIVE_UPLINK_MS)
    }

    /// A sale needing `requested` units of `sku` was refused holding `held_here`, and the online
    /// channel holds `held_online`: ask it for what is short plus a refill (the policy's), as a
    /// peer would be asked. False: nothing to ask.
    pub fn ask_for_sale(&self, node: &Node, sku: &str, requested: u64, held_here: u64, held_online: u64) -> bool {
        let Some(qty) = self.policy.shortfall_wanted(requested, held_here, held_online) else { return false };
        node.metrics.online_rights_asked.inc();
        self.want_rights(sku, qty, true);
        true
    }

    /// Asks the market's online channel for `qty` units of `sku` (`for_sale`: a customer waits):
    /// sent before anything else, its transfer applied as it comes back.
    pub fn want_rights(&self, sku: &str, qty: u64, for_sale: bool) {
        let mut asks = self.asks.lock().expect("uplink asks");
        // Merged by the core; bounded here too, so a stalled thread cannot grow it.
        if asks.len() < stallmesh_ingest::uplink::MAX_RIGHTS_ASKS {
            asks.push((sku.to_string(), qty, for_sale));
        }
        drop(asks);
        let _ = self.wake.try_send(());
    }
}

/// The node's store, as the core reads changes to upload.
struct NodeLog<'a>(&'a Node);

impl ChangeLog for NodeLog<'_> {
    fn changes_since(&self, device: &DeviceId, from_seq: u64, limit: usize) -> Result<Vec<SignedChange>, String> {
        self.0.changes_since(device, from_seq, limit).map_err(|e| e.to_string())
    }
}

/// Starts the uplink to `url` (e.g. `http://127.0.0.1:7880`).
pub fn start(node: Node, url: String, policy: RebalancePolicy) -> UplinkHandle {
    let url = url.trim_end_matches('/').to_string();
    let snapshot = Arc::new(Mutex::new(UplinkSnapshot { url: url.clone(), ..Default::default() }));
    // A commit wakes the thread; one pending wake-up is enough, so the channel holds one.
    let (wake, woken) = mpsc::sync_channel::<()>(1);
    let asks = Arc::new(Mutex::new(Vec::new()));
    let handle = UplinkHandle { snapshot: snapshot.clone(), asks: asks.clone(), wake: wake.clone(), policy };
    let (mut commits, _) = node.subscribe();
    tokio::spawn(async move {
        loop {
            match commits.recv().await {
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    let _ = wake.try_send(());
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
    });
    std::thread::Builder::new()
        .name("uplink".into())
        .spawn(move || run(node, url, snapshot, woken, asks, policy))
        .expect("spawning the uplink thread");
    handle
}

fn run(
    node: Node,
    url: String,
    snapshot: Arc<Mutex<UplinkSnapshot>>,
    woken: mpsc::Receiver<()>,
    asks: Arc<Mutex<Vec<(String, u64, bool)>>>,
    policy: RebalancePolicy,
) {
    let (secret, _) = node.mesh_secrets();
    let key = DeviceKey::from_secret(secret);
    let certificate = node.read(|l| l.certificate().clone());
    let path = wire::sync_path(&certificate.market);
    let endpoint = format!("{url}{path}");
    let seed = u64::from_le_bytes(key.device_id().0[..8].try_into().expect("8 bytes"));
    let mut core = Uplink::new(seed);
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_millis(CONNECT_TIMEOUT_MS))
        .timeout(Duration::from_millis(REQUEST_TIMEOUT_MS))
        .build();
    let _span = tracing::info_span!("uplink", cloud = %url).entered();
    tracing::info!("uplink to the cloud started");
    loop {
        for (sku, qty, for_sale) in asks.lock().expect("uplink asks").drain(..) {
            core.want_rights(sku, qty, for_sale);
        }
        let heads = node.read(|l| l.heads());
        let now = now_ms();
        if let Some(out) = core.poll(now, &heads, &NodeLog(&node)) {
            let auth = RequestAuth::sign(&key, &certificate, &path, now, &out.body);
            let mut request = agent.post(&endpoint).set("content-type", wire::CONTENT_TYPE);
            for (name, value) in auth.headers() {
                request = request.set(name, &value);
            }
            let outcome = request.send_bytes(&out.body);
            let now = now_ms();
            match outcome {
                Ok(response) => match read_reply(response) {
                    Ok(mut reply) => {
                        let wanted = std::mem::take(&mut reply.rights_wanted);
                        let back = core.on_reply(reply, out.changes, now);
                        node.metrics.uplink_requests.get_or_create(&crate::metrics::Outcome { outcome: "ok" }).inc();
                        node.metrics.uplink_changes_uploaded.inc_by(out.changes as u64);
                        if !back.is_empty() {
                            let refused = apply_from_cloud(&node, back);
                            core.refuse_downloads(refused);
                        }
                        for w in wanted {
                            give_online(&node, &policy, w);
                        }
                    }
                    Err(e) => fail(&node, &mut core, now, e),
                },
                Err(ureq::Error::Status(422, response)) => {
                    let rejected = read_rejections(response);
                    tracing::warn!(rejected = rejected.len(), "the cloud refused some changes this tablet holds");
                    node.metrics.uplink_requests.get_or_create(&crate::metrics::Outcome { outcome: "rejected" }).inc();
                    core.on_rejected(&rejected, now);
                }
                Err(ureq::Error::Status(code, response)) => {
                    let body = read_error(response);
                    let why = body.map_or_else(|| format!("HTTP {code}"), |b| format!("HTTP {code} {}: {}", b.error, b.message));
                    fail(&node, &mut core, now, why);
                }
                Err(e) => fail(&node, &mut core, now, e.to_string()),
            }
            publish(&snapshot, &core, &heads);
            continue;
        }
        publish(&snapshot, &core, &heads);
        let wait_ms = core.poll_timeout(&heads).map_or(HEADS_REFRESH_MS, |t| t.saturating_sub(now)).min(HEADS_REFRESH_MS);
        match woken.recv_timeout(Duration::from_millis(wait_ms)) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                tracing::info!("uplink stops: the node shut down");
                return;
            }
        }
    }
}

fn fail(node: &Node, core: &mut Uplink, now: u64, why: String) {
    if core.failures() == 0 {
        tracing::warn!(error = %why, "cloud unreachable; retrying with backoff");
    } else {
        tracing::debug!(error = %why, failures = core.failures(), "cloud still unreachable");
    }
    node.metrics.uplink_requests.get_or_create(&crate::metrics::Outcome { outcome: "failed" }).inc();
    core.on_failure(now, why);
}

fn read_reply(response: ureq::Response) -> Result<CloudReply, String> {
    let mut bytes = Vec::new();
    // One byte more than allowed tells an oversized reply apart from one exactly at the limit.
    response.into_reader().take(wire::MAX_BODY_BYTES as u64 + 1).read_to_end(&mut bytes).map_err(|e| format!("reading the reply: {e}"))?;
    CloudReply::decode(&bytes).map_err(|e| format!("the cloud's reply: {e}"))
}

/// An error body of the cloud, read within the reply limit (a 422 lists up to a batch of refusals).
fn read_error(response: ureq::Response) -> Option<CloudErrorBody> {
    let mut bytes = Vec::new();
    response.into_reader().take(wire::MAX_BODY_BYTES as u64).read_to_end(&mut bytes).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn read_rejections(response: ureq::Response) -> Vec<RejectedChange> {
    read_error(response)
        .and_then(|b| b.details)
        .map(|d| {
            d.rejected
                .into_iter()
                .filter_map(|r| {
                    let device = DeviceId::from_hex(&r.device).ok()?;
                    Some(RejectedChange { device, seq: r.seq, reason: r.reason, message: r.message })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The online channel sold out of a SKU this tablet holds: give what the rebalancing policy spares,
/// as to a peer that asked for a refill (no customer waits at this till for it). Only a device the
/// ledger knows as the market's online channel is given to.
fn give_online(node: &Node, policy: &RebalancePolicy, w: OnlineWants) {
    let now = now_ms();
    let give = node.read(|l| stallmesh_shop::spare_for_online(l, w.device, &w.sku, w.qty, policy, now));
    if give == 0 {
        return;
    }
    match node.execute(LocalOp::Transfer { sku: w.sku.clone(), qty: give, to: w.device }) {
        Ok(_) => {
            node.metrics.online_rights_given.inc();
            tracing::info!(sku = %w.sku, qty = give, "gave stock rights to the online channel, which sold out");
        }
        Err(e) => tracing::warn!(sku = %w.sku, error = %e, "could not give stock rights to the online channel"),
    }
}

/// The cloud's changes are verified by this tablet's ledger like any peer's, and made durable.
/// Returns the journals (and first positions) the ledger refused, not to be downloaded again.
fn apply_from_cloud(node: &Node, changes: Vec<SignedChange>) -> Vec<(DeviceId, u64)> {
    match node.ingest(changes) {
        Ok(report) => {
            if !report.rejected.is_empty() {
                tracing::warn!(rejected = report.rejected.len(), "changes from the cloud refused by this tablet's ledger");
            }
            if let Err(e) = node.flush() {
                tracing::error!(error = %e, "cannot make the cloud's changes durable");
            }
            report.rejected.iter().filter(|(_, why)| why.label() != "pending_full").map(|(dot, _)| (dot.device, dot.seq)).collect()
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot apply the cloud's changes");
            Vec::new()
        }
    }
}

fn publish(snapshot: &Mutex<UplinkSnapshot>, core: &Uplink, heads: &stallmesh_ledger::Heads) {
    let mut s = snapshot.lock().expect("uplink snapshot");
    s.started = true;
    s.last_success_ms = core.last_success_ms();
    s.last_error = core.last_error().map(str::to_string);
    s.failures = core.failures();
    s.lacking = core.lacking(heads);
    s.changes_uploaded = core.stats().changes_uploaded;
    s.duplicates = core.stats().duplicates;
    s.refused = core.stats().rejected;
}
