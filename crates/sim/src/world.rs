//! The simulated market: devices running the real ledger and sync core, a network of ordered
//! streams with latency, loss and partitions, customers, faults, and a discrete-event loop in
//! virtual time. No wall clock, no threads in the event loop (setup restores replicas on two, each
//! alone from the same entries), no hash-ordered iteration: a scenario and a seed fully determine
//! the run.

use crate::report::{HourStats, Report};
use crate::series::{OpenFault, Series, SeriesBuilder};
use crate::scenario::{FaultSpec, Scenario};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp};
use sha2::{Digest, Sha256};
use stallmesh_identity::{Certificate, ChangeDigest, DeviceId, DeviceKey, Dot, MarketKey, Role, SignedChange};
use stallmesh_ingest::uplink::{Uplink, UplinkStats};
use stallmesh_ingest::{LogRecord, MarketIngest};
use stallmesh_ledger::{sale_id, Entry, EventBody, KnownApplied, Ledger, LedgerError, LineRequest, LocalOp, LoyaltyOnSale, MarketContext, Product};
use stallmesh_sync::rebalance::{recent_sales_since_ms, Ask, AskStats, Rebalancer, SaleWait, SaleWaitStep};
use stallmesh_sync::{MemoryLog, Output, Sync as SyncCore, SyncConfig};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::BuildHasherDefault;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Trace lines kept per device for the timeline printed with a violation.
const TIMELINE_LINES: usize = 40;
/// Gossipsub's duplicate cache time (its default): a copy arriving later reaches the application.
const GOSSIP_DUPLICATE_CACHE_US: u64 = 60 * US_PER_S;
/// Journal documents open in all the replicas of one run: each keeps its share (within the
/// ledger's bounds; the node keeps up to `MAX_OPEN_SEGMENT_DOCS`). A market of tens of tablets
/// keeps the node's number; a thousand replicas sharing this process keep 16 each. A document
/// dropped is rebuilt from its segment's raw changes when next applied to — the same document —
/// so only time is traded for memory.
const OPEN_DOCS_BUDGET: usize = 16_384;

fn open_docs_per_replica(devices: u32) -> usize {
    (OPEN_DOCS_BUDGET / devices.max(1) as usize).clamp(stallmesh_ledger::MIN_OPEN_SEGMENT_DOCS, stallmesh_ledger::MAX_OPEN_SEGMENT_DOCS)
}

/// Threads the start of a run restores replicas on: each is restored alone from the same entries,
/// so any split gives the same ledgers. On `stress-1000` (side by side with the build before, one run
/// each way): setup ~8 s instead of ~16 s, and the day's event loop 370 s instead of 459 s, while the
/// peak rose from 2.71 to 2.91 GB: glibc gives the second thread its own arena, which the main
/// thread's allocations during the day never share.
const SETUP_THREADS: usize = 2;

/// One device's ledger restored from `entries` as from its store, within the run's share of open
/// documents; `broken`: the deliberately broken build's device.
fn restore_replica(ctx: &MarketContext, key_secret: [u8; 32], cert: &Certificate, broken: bool, entries: &[Entry], open_docs: usize) -> Ledger {
    let mut l = Ledger::restore(ctx.clone(), DeviceKey::from_secret(key_secret), cert.clone(), entries.iter().cloned()).expect("setup entries restore");
    l.set_open_docs_limit(open_docs);
    l.allow_overspend_for_tests = broken;
    l
}

/// Every device's ledger restored from the day's opening entries, in device order.
fn restore_replicas(ctx: &MarketContext, replicas: &[([u8; 32], Certificate, bool)], entries: &[Entry], open_docs: usize) -> Vec<Ledger> {
    let per_thread = replicas.len().div_ceil(SETUP_THREADS).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = replicas
            .chunks(per_thread)
            .map(|chunk| scope.spawn(move || chunk.iter().map(|(secret, cert, broken)| restore_replica(ctx, *secret, cert, *broken, entries, open_docs)).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("a setup thread does not panic")).collect()
    })
}

/// A device's broadcast duplicate cache is pruned of expired entries when it reaches this size
/// (and each power of two past it): pruning is O(n), so it runs rarely.
const SEEN_PRUNE_LEN: usize = 1024;
/// One protocol call in this many is timed for the engine/protocol split of the report.
const PROTOCOL_TIMING_SAMPLE: u64 = 16;
/// Events processed before the run gives up (a runaway scenario, not a market day).
pub const MAX_EVENTS: u64 = 2_000_000_000;

mod checker;
mod cloud;
mod drops;
mod faults;
mod loyalty;
mod network;
mod queue;

pub use checker::CLOUD_INVARIANT;
pub use faults::{fault_kind, fault_label};
pub(crate) use faults::{fault_at as fault_start_s, random_faults as drawn_faults};
use faults::{fault_at, random_faults};

const US_PER_MS: u64 = 1_000;
/// What device clocks read at virtual time 0: a plausible epoch, so times look real.
const DEVICE_EPOCH_MS: u64 = 1_800_000_000_000;
/// A device's wake is scheduled at most this far ahead: a clock jumped far back makes its timeout
/// far off on the virtual clock; waking sooner only finds nothing due and looks again.
const MAX_WAKE_AHEAD_US: u64 = 60 * US_PER_S;
const US_PER_S: u64 = 1_000_000;
/// An uplink request with no reply after this long has failed (an HTTP client's timeout on 4G): a
/// lost request or reply, or an outage, reaches the uplink core as `on_failure`, so it backs off.
pub const UPLINK_REQUEST_TIMEOUT_MS: u64 = 10_000;
/// How often the checker looks at acknowledged sales not yet in the cloud's log: deadlines of the
/// cloud invariant are measured to within this.
const CLOUD_CHECK_INTERVAL_US: u64 = US_PER_S;
/// After an outage the uplinks are back once each can have tried again: its last request's
/// timeout, then its longest backoff (the uplink core's contract: within half a minute).
const UPLINK_RECOVERY_US: u64 = (UPLINK_REQUEST_TIMEOUT_MS + stallmesh_ingest::uplink::BACKOFF_MAX_MS) * US_PER_MS;
/// Violations of the cloud invariant recorded during the run (the first ones explain the rest).
const MAX_CLOUD_VIOLATIONS: usize = 5;

#[derive(Debug, Clone, Default)]
pub struct Options {
    pub seed: u64,
    /// Keep a hash of every trace line (for --check-determinism).
    pub keep_event_hashes: bool,
    /// Capture the trace line of this event index (to print where two runs diverge).
    pub capture_event: Option<u64>,
    /// Write every trace line to this file.
    pub trace_file: Option<std::path::PathBuf>,
    /// The deliberately broken build: this device may spend stock rights it does not hold.
    pub broken_device: Option<u32>,
    /// A deliberately broken cloud path (tests of the cloud invariant).
    pub broken_cloud: Option<BrokenCloud>,
    pub progress: bool,
}

/// Deliberately broken cloud paths: the cloud invariant must catch each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokenCloud {
    /// The cloud's driver leaves the first acknowledged sale it accepts out of the committed log
    /// (a lost store write): the ingest core holds it, the log does not.
    DropsOneSale,
    /// Uplinks upload only their own tablet's journal, never the other devices' they hold.
    UploadsOwnJournalOnly,
    /// The online channel's store reads no holds for a decision (a lost index): each buyer's
    /// hold ignores the others'.
    HoldsReadAsNone,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Violation {
    pub invariant: &'static str,
    pub detail: String,
    pub device: Option<u32>,
    /// The device's last trace lines before the check.
    pub timeline: Vec<String>,
}

pub struct RunResult {
    pub report: Report,
    pub violations: Vec<Violation>,
    pub digest: String,
    pub event_hashes: Vec<u64>,
    pub captured: Option<String>,
}

#[derive(Debug)]
enum Ev {
    Arrival {
        stall: u32,
    },
    /// The device's sync core asked to be woken now (`Sync::poll_timeout`); stale unless it is
    /// the device's `wake_at`.
    Wake {
        dev: u32,
    },
    Deliver {
        from: u32,
        to: u32,
        epoch: u64,
        bytes: Payload,
        /// `None`: a message on the ordered stream; a broadcast carries its gossip message id
        /// (a hash of its bytes, computed once where it was published).
        broadcast: Option<u64>,
    },
    Dial {
        a: u32,
        b: u32,
    },
    Commit {
        dev: u32,
    },
    FaultStart(usize),
    FaultEnd(usize),
    Restart {
        dev: u32,
    },
    EndOfDay,
    LivenessCheck,
    SaleWait {
        id: u64,
    },
    /// The tablet's uplink core asked to be woken now (`Uplink::poll_timeout`); stale unless it is
    /// the uplink's `wake_at`.
    UplinkWake {
        dev: u32,
    },
    /// Uplink request `id` of tablet `dev` reaches the cloud.
    CloudRequest {
        dev: u32,
        id: u64,
        body: Vec<u8>,
    },
    /// The cloud's reply to request `id` reaches tablet `dev`.
    CloudReply {
        dev: u32,
        id: u64,
        body: Vec<u8>,
    },
    /// Request `id` is unanswered after `UPLINK_REQUEST_TIMEOUT_MS`; stale if answered.
    UplinkTimeout {
        dev: u32,
        id: u64,
    },
    /// The ingest core asked to be woken now (`MarketIngest::poll_timeout`); stale unless it is
    /// the cloud's `wake_at`.
    CloudWake,
    /// The cloud invariant's periodic look at sales not yet in the cloud's log.
    CloudCheck,
    /// Voucher drop `i` of the scenario's loyalty.
    VoucherDrop(usize),
    /// A card customer's sale after the till waited for a reachable holder's points.
    CardAfterWait {
        dev: u32,
        lines: Vec<LineRequest>,
        /// Boxed: the rarest event must not make every queued event larger (see the size assertion below).
        card: Box<LoyaltyOnSale>,
    },
    /// A voucher redemption after the till waited for the holder to hand it over.
    VoucherAfterWait {
        dev: u32,
        voucher: stallmesh_identity::VoucherId,
    },
    /// An online buyer's hold request reaches the cloud.
    DropBuyer {
        buyer: u32,
    },
    /// An online buyer's payment reaches the cloud.
    DropPay {
        buyer: u32,
    },
    /// An online buyer's hold expires (unless paid).
    DropHoldExpiry {
        buyer: u32,
    },
    /// A walk-in buyer of the drop at a stall.
    DropWalkIn {
        stall: u32,
    },
}

// Events wait in the queue's slab, tens of thousands at once: one cache line each (large payloads
// are boxed).
const _: () = assert!(std::mem::size_of::<Option<Ev>>() <= 64);

/// A message's bytes: its own for a message to one peer (most are heartbeats: no second
/// allocation to share them), shared by every copy of a broadcast.
#[derive(Debug, Clone)]
enum Payload {
    Own(Vec<u8>),
    Shared(Rc<Vec<u8>>),
}

impl std::ops::Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Payload::Own(b) => b,
            Payload::Shared(b) => b,
        }
    }
}

struct Device {
    id: DeviceId,
    stall: u32,
    key_secret: [u8; 32],
    cert: Certificate,
    ledger: Ledger,
    sync: SyncCore<u32>,
    /// The store: shared `Rc`s into the world's entries (each entry is stored once in memory).
    durable: Vec<Rc<Entry>>,
    unsynced: Vec<Rc<Entry>>,
    commit_scheduled: bool,
    up: bool,
    /// The tablet has 4G: it runs an uplink core against the cloud.
    has_uplink: bool,
    /// Its uplink core while it is up (a restart starts a new one, as a restarted node does).
    uplink: Option<UplinkSide>,
    rng: ChaCha8Rng,
    clock_offset_us: i64,
    drift_ppm: f64,
    timeline: VecDeque<String>,
    storage_bytes: u64,
    /// Bit i: acknowledged sale number i has reached this device (ever).
    held: Vec<u64>,
    /// The rebalancing policy and its ask memory, as the node's mesh driver holds them.
    rebalancer: Rebalancer,
    /// The earliest `Ev::Wake` pending for this device (virtual µs), if any.
    wake_at: Option<u64>,
    broken: bool,
    /// Broadcasts already seen (gossipsub's duplicate cache): content hash → first seen (virtual µs).
    seen: BTreeMap<u64, u64>,
}

impl Device {
    /// Makes `entries` durable in the device's store, after what it holds. The store grows by an
    /// eighth, not by doubling: every device's store holds the whole day's entries.
    fn store(&mut self, entries: impl IntoIterator<Item = Rc<Entry>>) {
        for e in entries {
            if self.durable.len() == self.durable.capacity() {
                self.durable.reserve_exact((self.durable.len() / 8).max(16));
            }
            self.storage_bytes += e.change.encoded_len() as u64;
            self.durable.push(e);
        }
    }
}

/// A tablet's uplink: the real uplink core (`stallmesh-ingest`) and its request in flight.
struct UplinkSide {
    core: Uplink,
    /// The pending `Ev::UplinkWake` (virtual µs); others are stale.
    wake_at: Option<u64>,
    /// The request in flight: its number (a reply or timeout for another one is stale) and the
    /// changes it uploads.
    in_flight: Option<(u64, usize)>,
}

/// The market's cloud: the real ingest core, enrolled with role `cloud`, and the log its driver
/// commits. It is not on the Wi-Fi: tablets with 4G reach it over the uplink, one request at a time.
struct Cloud {
    key_secret: [u8; 32],
    cert: Certificate,
    ingest: MarketIngest,
    /// Each committed (device, seq) → its offset: one committed twice is a violation.
    logged: BTreeMap<Dot, u64>,
    /// The offset of the last committed record, and how many were committed: offsets must run
    /// 1, 2, 3, … without a gap.
    last_offset: u64,
    records: u64,
    /// The pending `Ev::CloudWake` (virtual µs); others are stale.
    wake_at: Option<u64>,
    /// `BrokenCloud::DropsOneSale` has dropped its sale.
    dropped_one: bool,
    timeline: VecDeque<String>,
}

struct Conn {
    epoch: u64,
    /// Delivery time of the last ordered message, per direction (low→high, high→low).
    last_deliver: [u64; 2],
}

/// A customer's sale refused for rights a reachable peer holds, waiting for them (as the node's
/// HTTP handler waits).
struct WaitingSale {
    dev: u32,
    lines: Vec<LineRequest>,
    /// The sync core's waiting sale, on the virtual clock in ms (monotonic, as the node's wait).
    wait: SaleWait,
    /// The pending `Ev::SaleWait` for it (virtual µs); others are stale.
    wake_at: u64,
    /// The customer's card, if any.
    card: Option<LoyaltyOnSale>,
}

/// A reachable tablet holding rights a refused sale lacked (for the report and the trace).
#[derive(Debug)]
#[allow(dead_code)] // read through Debug, in the trace
struct Holder {
    device: u32,
    held: u64,
    /// Its sales within the policy's window: 0 = idle, free to give its last units.
    recent_sales: usize,
}

struct AckedSale {
    t_ack: u64,
    device: u32,
    dot: Dot,
    holders: u32,
    converged_at: Option<u64>,
    /// When the cloud committed it to its log.
    in_cloud_at: Option<u64>,
}

pub struct World {
    sc: Scenario,
    opts: Options,
    now: u64,
    queue: queue::EventQueue<Ev>,
    /// The tablets, numbered 0.. in stall order.
    devices: Vec<Device>,
    cloud: Cloud,
    ctx: MarketContext,
    faults: Vec<FaultSpec>,
    active_faults: BTreeSet<usize>,
    /// Tablets walked to another side of the Wi-Fi split (`move` faults): device → side.
    moved: BTreeMap<u32, usize>,
    /// Open streams by tablet pair (low, high): looked up twice per message, so hashed (with a
    /// fixed hasher: never iterated in hash order, see `faults.rs`).
    conns: HashMap<(u32, u32), Conn, BuildHasherDefault<rustc_hash::FxHasher>>,
    wanted: BTreeSet<(u32, u32)>,
    epochs: u64,
    stall_rngs: Vec<ChaCha8Rng>,
    products: Vec<Vec<Product>>,
    /// Every change made in the market, by device and seq: what a tablet holds is the prefix its
    /// heads name, so each tablet's change log is a view of this one (see `HeldLog`).
    all_changes: MemoryLog,
    entries: BTreeMap<stallmesh_identity::Dot, Rc<Entry>>,
    /// Each interned entry (past a journal's first) → the digest of the change its ledger held
    /// before it, on which its event was decoded.
    applied_after: BTreeMap<Dot, ChangeDigest>,
    acked: Vec<AckedSale>,
    acked_index: BTreeMap<String, u32>,
    restocked: BTreeMap<String, u64>,
    /// Ask outcomes of rebalancers that a crash discarded (the live ones are in each device).
    asks_before_restarts: AskStats,
    /// Counters of uplink cores that a crash discarded.
    uplinks_before_restarts: UplinkStats,
    next_request_id: u64,
    /// Acknowledged sales not yet in the cloud's log → since when the cloud could have had them
    /// (an uplink up, no outage, the sale on its side of the Wi-Fi), while that lasts.
    not_in_cloud: BTreeMap<u32, Option<u64>>,
    /// Violations of the cloud invariant found during the run.
    cloud_violations: Vec<Violation>,
    /// When the uplinks are back after the last outage (its end + `UPLINK_RECOVERY_US`).
    uplinks_back_at: u64,
    day_over: bool,
    end_of_day_at: u64,
    converged_after_heal: Option<u64>,
    finished: bool,
    // Accounting.
    events: u64,
    hasher: Sha256,
    event_hashes: Vec<u64>,
    captured: Option<String>,
    trace_out: Option<std::io::BufWriter<std::fs::File>>,
    messages: u64,
    bytes: u64,
    refused: BTreeMap<String, u64>,
    refused_while_reachable_held: u64,
    refused_while_reachable_idle_held: u64,
    refused_while_unreachable_held: u64,
    sales_after_waiting: u64,
    waiting: BTreeMap<u64, WaitingSale>,
    next_wait_id: u64,
    customers_lost: u64,
    faults_fired: BTreeMap<String, u64>,
    hours: Vec<HourStats>,
    protocol_time: Duration,
    protocol_calls: u64,
    /// Loyalty customers, when the scenario has them.
    loyalty: Option<loyalty::LoyaltySim>,
    /// The drop and the online channel, when the scenario has one.
    drop: Option<drops::DropSim>,
    /// The report's time series.
    series: SeriesBuilder,
    /// Each SKU's index in catalogue order (stall, then product): the series' stock columns.
    sku_index: BTreeMap<String, usize>,
}

fn mix(seed: u64, stream: &str, n: u64) -> u64 {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(stream.as_bytes());
    h.update(n.to_le_bytes());
    u64::from_le_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
}

fn fnv(line: &str) -> u64 {
    line.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

/// A tablet's change log: the market's changes, up to what this tablet holds (its heads).
struct HeldLog<'a> {
    all: &'a MemoryLog,
    heads: &'a stallmesh_ledger::Heads,
}

impl stallmesh_sync::ChangeLog for HeldLog<'_> {
    fn changes_since(&self, device: &DeviceId, from_seq: u64, limit: usize) -> Result<Vec<stallmesh_identity::SignedChange>, String> {
        let held = self.heads.get(device).copied().unwrap_or(0);
        let limit = limit.min(held.saturating_sub(from_seq) as usize);
        self.all.changes_since(device, from_seq, limit)
    }
}

/// Changes some ledger of the market already accepted: every entry in `World::entries` was
/// recorded by its author or applied by a replica's `apply_remote`, so its signature is good, and a
/// change equal to it byte for byte (signature included) needs no second check; nor a second
/// automerge decode by a replica holding the same change before it (`applied_after`).
struct Interned<'a> {
    entries: &'a BTreeMap<Dot, Rc<Entry>>,
    applied_after: &'a BTreeMap<Dot, ChangeDigest>,
}

impl<'a> Interned<'a> {
    fn equal(&self, change: &SignedChange) -> Option<&'a Rc<Entry>> {
        self.entries.get(&change.dot()).filter(|e| e.change == *change)
    }
}

impl stallmesh_ledger::KnownValid for Interned<'_> {
    fn known_valid(&self, change: &SignedChange) -> bool {
        self.equal(change).is_some()
    }

    fn known_applied(&self, change: &SignedChange) -> Option<KnownApplied> {
        let e = self.equal(change)?;
        let after = match change.seq {
            0 => None,
            _ => Some(*self.applied_after.get(&change.dot())?),
        };
        Some(KnownApplied { event: e.event.clone(), after })
    }
}

/// The digest of the change `ledger` holds just before `dot`.
fn held_before(ledger: &Ledger, dot: Dot) -> Option<ChangeDigest> {
    ledger.held_digest(Dot { device: dot.device, seq: dot.seq.checked_sub(1)? })
}

/// Notes a broadcast in a device's duplicate cache. Entries older than the cache's time decide
/// nothing (a copy arriving later counts as new), so they are pruned once the map has grown: the
/// same decisions, without a thousand tablets each remembering every broadcast of the day.
fn remember_broadcast(seen: &mut BTreeMap<u64, u64>, hash: u64, t: u64) {
    seen.insert(hash, t);
    if seen.len() >= SEEN_PRUNE_LEN && seen.len().is_power_of_two() {
        seen.retain(|_, first| t.saturating_sub(*first) < GOSSIP_DUPLICATE_CACHE_US);
    }
}

fn fnv_bytes(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3))
}

fn push_timeline(tl: &mut VecDeque<String>, line: String) {
    if tl.len() == TIMELINE_LINES {
        tl.pop_front();
    }
    tl.push_back(line);
}

fn pair(a: u32, b: u32) -> (u32, u32) {
    (a.min(b), a.max(b))
}

impl World {
    pub fn new(sc: Scenario, opts: Options) -> World {
        let seed = opts.seed;
        let loyalty = sc.loyalty.clone().map(|l| loyalty::LoyaltySim::new(l, seed));
        let n = sc.devices();
        // Identities depend on the scenario's shape only, so a seed changes behaviour, not keys.
        let market_key = MarketKey::from_secret(mix(0, "market", 0).to_le_bytes().repeat(4).try_into().expect("32 bytes"));
        let ctx = MarketContext::new(market_key.public());
        let uplinks = (sc.market.uplink_fraction * n as f64).round() as u32;
        let mut devices = Vec::with_capacity(n as usize);
        let secret_of = |d: u32| -> [u8; 32] { mix(0, "device", d as u64).to_le_bytes().repeat(4).try_into().expect("32 bytes") };
        for d in 0..n {
            let secret = secret_of(d);
            let key = DeviceKey::from_secret(secret);
            let stall = d / sc.market.devices_per_stall;
            let cert = market_key.enrol(key.device_id(), &format!("Stall {stall}"), Role::Organiser, u64::MAX);
            let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, "device-rng", d as u64));
            let clock_offset_us = (rng.gen_range(-1.0..=1.0) * sc.clock.max_offset_ms * 1000.0) as i64;
            let drift_ppm = rng.gen_range(-1.0..=1.0) * sc.clock.max_drift_ppm;
            let mut ledger = Ledger::new(ctx.clone(), key, cert.clone());
            ledger.set_open_docs_limit(open_docs_per_replica(n));
            ledger.allow_overspend_for_tests = opts.broken_device == Some(d);
            devices.push(Device {
                id: DeviceId(ledger.device().0),
                stall,
                key_secret: secret,
                cert,
                ledger,
                sync: SyncCore::new(SyncConfig {
                    heartbeat_ms: sc.network.heartbeat_ms,
                    liveness_timeout_ms: sc.network.liveness_timeout_ms,
                }),
                durable: Vec::new(),
                unsynced: Vec::new(),
                commit_scheduled: false,
                up: true,
                has_uplink: d < uplinks,
                uplink: None,
                rng,
                clock_offset_us,
                drift_ppm,
                timeline: VecDeque::new(),
                storage_bytes: 0,
                held: Vec::new(),
                rebalancer: Rebalancer::new(sc.rebalance),
                wake_at: None,
                broken: opts.broken_device == Some(d),
                seen: BTreeMap::new(),
            });
        }
        // The cloud's device: number n (after the tablets), role `cloud`. Its ingest core is built
        // again in `setup`, from the day's opening entries.
        let cloud_secret = secret_of(n);
        let cloud_key = DeviceKey::from_secret(cloud_secret);
        let cloud_cert = market_key.enrol(cloud_key.device_id(), "cloud", Role::Cloud, u64::MAX);
        let (ingest, _) = MarketIngest::create(ctx.clone(), cloud_key, cloud_cert.clone(), DEVICE_EPOCH_MS).expect("a cloud certificate");
        let cloud = Cloud {
            key_secret: cloud_secret,
            cert: cloud_cert,
            ingest,
            logged: BTreeMap::new(),
            last_offset: 0,
            records: 0,
            wake_at: None,
            dropped_one: false,
            timeline: VecDeque::new(),
        };
        // The online channel's device: number n + 1, role `online`, run by the cloud.
        let drop = sc.drop.clone().map(|spec| {
            let secret = secret_of(n + 1);
            let cert = market_key.enrol(DeviceKey::from_secret(secret).device_id(), "online", Role::Online, u64::MAX);
            drops::DropSim::new(spec, seed, &ctx, secret, cert)
        });
        let stall_rngs = (0..sc.market.stalls).map(|s| ChaCha8Rng::seed_from_u64(mix(seed, "stall", s as u64))).collect();
        let products: Vec<Vec<Product>> = (0..sc.market.stalls)
            .map(|s| {
                (0..sc.market.products_per_stall)
                    .map(|p| Product {
                        sku: format!("S{s}-P{p}"),
                        name: format!("Product {p} of stall {s}"),
                        price_cents: 100 + 50 * p as u64,
                        currency: "EUR".into(),
                        stall: format!("Stall {s}"),
                        tags: vec![],
                    })
                    .collect()
            })
            .collect();
        let hours = (0..(sc.duration_h.ceil() as usize + 2)).map(|_| HourStats::default()).collect();
        let trace_out = opts.trace_file.as_ref().and_then(|p| std::fs::File::create(p).ok()).map(std::io::BufWriter::new);
        let mut faults = sc.faults.clone();
        faults.extend(random_faults(&sc, seed));
        let sku_index: BTreeMap<String, usize> =
            products.iter().flatten().enumerate().map(|(i, p)| (p.sku.clone(), i)).collect();
        let span_s = sc.duration_h * 3600.0 + sc.liveness_bound_s;
        let series = SeriesBuilder::new(span_s, side_names(&faults, n).len(), sku_index.len());
        let mut w = World {
            series,
            sku_index,
            asks_before_restarts: AskStats::default(),
            uplinks_before_restarts: UplinkStats::default(),
            next_request_id: 0,
            not_in_cloud: BTreeMap::new(),
            cloud_violations: Vec::new(),
            uplinks_back_at: 0,
            cloud,
            moved: BTreeMap::new(),
            sc,
            opts,
            now: 0,
            queue: queue::EventQueue::new(),
            devices,
            ctx,
            faults,
            active_faults: BTreeSet::new(),
            conns: HashMap::default(),
            wanted: BTreeSet::new(),
            epochs: 0,
            stall_rngs,
            products,
            all_changes: MemoryLog::default(),
            entries: BTreeMap::new(),
            applied_after: BTreeMap::new(),
            acked: Vec::new(),
            acked_index: BTreeMap::new(),
            restocked: BTreeMap::new(),
            day_over: false,
            end_of_day_at: 0,
            converged_after_heal: None,
            finished: false,
            events: 0,
            hasher: Sha256::new(),
            event_hashes: Vec::new(),
            captured: None,
            trace_out,
            messages: 0,
            bytes: 0,
            refused: BTreeMap::new(),
            refused_while_reachable_held: 0,
            refused_while_reachable_idle_held: 0,
            refused_while_unreachable_held: 0,
            sales_after_waiting: 0,
            waiting: BTreeMap::new(),
            next_wait_id: 0,
            customers_lost: 0,
            faults_fired: BTreeMap::new(),
            hours,
            protocol_time: Duration::ZERO,
            protocol_calls: 0,
            loyalty,
            drop,
        };
        w.setup();
        w
    }

    /// The one shared copy of an entry (every tablet that holds it points here). `after`: the
    /// digest of the change held before it by the ledger that recorded or applied it, on which its
    /// event was decoded (`Interned::known_applied`); see [`held_before`].
    fn intern(&mut self, entry: Entry, after: Option<ChangeDigest>) -> Rc<Entry> {
        let dot = entry.change.dot();
        if let Some(e) = self.entries.get(&dot) {
            return e.clone();
        }
        if let Some(digest) = after {
            self.applied_after.insert(dot, digest);
        }
        self.all_changes.add(entry.change.clone());
        let e = Rc::new(entry);
        self.entries.insert(dot, e.clone());
        e
    }

    /// [`World::intern`] of an entry tablet `dev` holds.
    fn intern_held(&mut self, dev: u32, entry: Entry) -> Rc<Entry> {
        let after = held_before(&self.devices[dev as usize].ledger, entry.change.dot());
        self.intern(entry, after)
    }

    fn n(&self) -> u32 {
        self.sc.devices()
    }

    /// The cloud's clock (NTP-synchronised: virtual time), in ms.
    fn cloud_now_ms(&self) -> u64 {
        self.now / US_PER_MS + DEVICE_EPOCH_MS
    }

    fn push(&mut self, t: u64, ev: Ev) {
        self.queue.push(t, ev);
    }

    /// The device's own clock (offset, drift, jumps), in ms: what its ledger and sync core see.
    fn dev_now_ms(&self, d: u32) -> u64 {
        let dev = &self.devices[d as usize];
        let t = self.now as f64 * (1.0 + dev.drift_ppm / 1e6) + dev.clock_offset_us as f64;
        (t.max(0.0) / 1000.0) as u64 + DEVICE_EPOCH_MS
    }

    /// A trace line of the cloud (`cloud` in the device column), kept in its own timeline.
    fn trace_cloud(&mut self, line: String) {
        let full = self.trace_line("cloud", line);
        push_timeline(&mut self.cloud.timeline, full);
    }

    fn trace(&mut self, dev: Option<u32>, line: String) {
        let full = self.trace_line(&dev.map_or("-".to_string(), |d| d.to_string()), line);
        if let Some(d) = dev {
            push_timeline(&mut self.devices[d as usize].timeline, full);
        }
    }

    /// Hashes and writes one trace line; returns it.
    fn trace_line(&mut self, who: &str, line: String) -> String {
        let full = format!("{} {who} {line}", self.now);
        self.hasher.update(full.as_bytes());
        self.hasher.update(b"\n");
        if self.opts.keep_event_hashes {
            self.event_hashes.push(fnv(&full));
        }
        if self.opts.capture_event == Some(self.events) {
            self.captured = Some(full.clone());
        }
        if let Some(out) = self.trace_out.as_mut() {
            use std::io::Write;
            let _ = writeln!(out, "{full}");
        }
        full
    }

    fn hour(&mut self) -> &mut HourStats {
        let h = ((self.now / (3600 * US_PER_S)) as usize).min(self.hours.len() - 1);
        &mut self.hours[h]
    }

    fn setup(&mut self) {
        let n = self.n();
        let restore = |w: &World, d: u32, entries: &[Entry]| -> Ledger {
            let dev = &w.devices[d as usize];
            restore_replica(&w.ctx, dev.key_secret, &dev.cert, dev.broken, entries, open_docs_per_replica(w.n()))
        };
        // Everyone enrols (a first meeting before the day).
        let mut shared: Vec<Entry> = Vec::new();
        for d in 0..n {
            let now = self.dev_now_ms(d);
            let e = self.devices[d as usize].ledger.enrol_self(now).expect("valid certificate").expect("first enrolment");
            shared.push(e);
        }
        // The cloud's device enrols with them (its journal will hold only its watermarks).
        let cloud_key = DeviceKey::from_secret(self.cloud.key_secret);
        let mut cloud_ledger = Ledger::new(self.ctx.clone(), cloud_key, self.cloud.cert.clone());
        shared.push(cloud_ledger.enrol_self(self.cloud_now_ms()).expect("valid certificate").expect("first enrolment"));
        self.enrol_online(&mut shared);
        let enrolments = shared.clone();
        // Each stall's first device adds its catalogue and stock, and shares the stock out evenly.
        let dps = self.sc.market.devices_per_stall;
        for s in 0..self.sc.market.stalls {
            let first = s * dps;
            let mut ledger = restore(self, first, &enrolments);
            let now = self.dev_now_ms(first);
            for p in self.products[s as usize].clone() {
                let sku = p.sku.clone();
                shared.push(ledger.record(LocalOp::UpsertProduct(p), now).expect("valid product"));
                let qty = self.sc.market.initial_stock;
                *self.restocked.entry(sku.clone()).or_default() += qty;
                shared.push(ledger.record(LocalOp::Restock { sku: sku.clone(), qty }, now).expect("restock"));
                let share = qty / dps as u64;
                for k in 1..dps {
                    if share > 0 {
                        let to = self.devices[(first + k) as usize].id;
                        shared.push(ledger.record(LocalOp::Transfer { sku: sku.clone(), qty: share, to }, now).expect("transfer"));
                    }
                }
            }
        }
        self.plan_drop(&mut shared);
        // Every device starts the day holding all of it: restored as from its store (the entries
        // were made by the simulation's own ledgers, and checked when the authors recorded them).
        let mut last_of: BTreeMap<DeviceId, ChangeDigest> = BTreeMap::new();
        let shared_rc: Vec<Rc<Entry>> = shared
            .iter()
            .map(|e| {
                let after = last_of.insert(e.change.device, e.change.digest());
                self.intern(e.clone(), after)
            })
            .collect();
        let setup_bytes: u64 = shared.iter().map(|e| e.change.encoded_len() as u64).sum();
        let replicas: Vec<([u8; 32], Certificate, bool)> = self.devices.iter().map(|d| (d.key_secret, d.cert.clone(), d.broken)).collect();
        let ledgers = restore_replicas(&self.ctx, &replicas, &shared, open_docs_per_replica(n));
        debug_assert_eq!(ledgers.len(), n as usize);
        for (dev, ledger) in self.devices.iter_mut().zip(ledgers) {
            dev.ledger = ledger;
            dev.durable = shared_rc.clone();
            dev.storage_bytes = setup_bytes;
        }
        // The cloud's log starts the day with the same entries, at offsets 1.. in this order (it
        // registered the market and took in the meeting's entries before the day).
        let records = shared.iter().enumerate().map(|(i, e)| LogRecord { offset: i as u64 + 1, entry: e.clone() });
        let cloud_key = DeviceKey::from_secret(self.cloud.key_secret);
        self.cloud.ingest =
            MarketIngest::restore(self.ctx.clone(), cloud_key, self.cloud.cert.clone(), records).expect("setup log restores");
        for (i, e) in shared.iter().enumerate() {
            self.cloud.logged.insert(e.change.dot(), i as u64 + 1);
        }
        self.cloud.last_offset = shared.len() as u64;
        self.cloud.records = shared.len() as u64;
        self.start_drop(&shared);
        // Topology: the stall's own devices, plus random others. The cloud is not on the Wi-Fi.
        let per = self.sc.network.peers_per_device;
        for a in 0..n {
            if per == 0 {
                for b in (a + 1)..n {
                    self.wanted.insert((a, b));
                }
            } else {
                let s = self.devices[a as usize].stall;
                let dps = self.sc.market.devices_per_stall;
                for b in (s * dps)..((s + 1) * dps) {
                    if b != a {
                        self.wanted.insert(pair(a, b));
                    }
                }
                let mut picked = 0;
                let mut tries = 0;
                while picked < per && tries < per * 8 {
                    tries += 1;
                    let b = self.devices[a as usize].rng.gen_range(0..n);
                    if b != a && self.wanted.insert(pair(a, b)) {
                        picked += 1;
                    }
                }
            }
        }
        let wanted: Vec<(u32, u32)> = self.wanted.iter().copied().collect();
        for (a, b) in wanted {
            self.push(0, Ev::Dial { a, b });
        }
        for s in 0..self.sc.market.stalls {
            let t = self.next_arrival(s, 0);
            self.push(t, Ev::Arrival { stall: s });
        }
        for i in 0..self.faults.len() {
            let at = fault_at(&self.faults[i]);
            self.push((at * US_PER_S as f64) as u64, Ev::FaultStart(i));
        }
        let drops: Vec<f64> = self.sc.loyalty.iter().flat_map(|l| l.voucher_drops.iter().map(|d| d.at_s)).collect();
        for (i, at_s) in drops.into_iter().enumerate() {
            self.push((at_s * US_PER_S as f64) as u64, Ev::VoucherDrop(i));
        }
        let end = (self.sc.duration_h * 3600.0 * US_PER_S as f64) as u64;
        self.push(end, Ev::EndOfDay);
        for d in 0..n {
            self.start_uplink(d);
        }
        self.schedule_cloud_wake();
        self.push(CLOUD_CHECK_INTERVAL_US, Ev::CloudCheck);
    }

    fn next_arrival(&mut self, stall: u32, now: u64) -> u64 {
        let hour = (now / (3600 * US_PER_S)) as usize;
        let profile = &self.sc.customers.hourly_profile;
        let factor = if profile.is_empty() { 1.0 } else { profile[hour % profile.len()] };
        let rate_per_us = (self.sc.customers.arrivals_per_stall_per_hour * factor).max(1e-9) / (3600.0 * US_PER_S as f64);
        let gap = Exp::new(rate_per_us).expect("positive rate").sample(&mut self.stall_rngs[stall as usize]);
        now + gap.min(24.0 * 3600.0 * US_PER_S as f64) as u64 + 1
    }

    /// Runs the day and the liveness phase; checks the invariants.
    pub fn run(mut self) -> RunResult {
        let started = Instant::now();
        let bar = self.opts.progress.then(|| {
            let b = indicatif::ProgressBar::new((self.sc.duration_h * 3600.0) as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {msg} [{bar:40}] {pos}/{len} simulated s ({per_sec}, eta {eta})")
                    .expect("template"),
            );
            b.set_message(self.sc.name.clone());
            b
        });
        while let Some((t, ev)) = self.queue.pop() {
            while t >= self.series.next_sample_us() {
                self.sample_series();
            }
            self.now = t;
            self.events += 1;
            if self.events > MAX_EVENTS {
                break;
            }
            if let Some(b) = &bar {
                if self.events.is_multiple_of(4096) {
                    b.set_position(self.now / US_PER_S);
                }
            }
            self.handle(ev);
            if self.finished {
                break;
            }
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        let wall = started.elapsed();
        let violations = self.check();
        let series = self.finish_series();
        let report = self.report(wall, series);
        if let Some(out) = self.trace_out.as_mut() {
            use std::io::Write;
            let _ = out.flush();
        }
        RunResult {
            report,
            violations,
            digest: hex::encode(self.hasher.clone().finalize()),
            event_hashes: std::mem::take(&mut self.event_hashes),
            captured: self.captured.take(),
        }
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Arrival { stall } => self.on_arrival(stall),
            Ev::Wake { dev } => self.on_wake(dev),
            Ev::Deliver { from, to, epoch, bytes, broadcast } => self.on_deliver(from, to, epoch, bytes, broadcast),
            Ev::Dial { a, b } => self.on_dial(a, b),
            Ev::Commit { dev } => {
                let d = &mut self.devices[dev as usize];
                d.commit_scheduled = false;
                let entries = std::mem::take(&mut d.unsynced);
                d.store(entries);
            }
            Ev::FaultStart(i) => self.fault_start(i),
            Ev::FaultEnd(i) => self.fault_end(i),
            Ev::Restart { dev } => self.restart(dev),
            Ev::EndOfDay => self.end_of_day(),
            Ev::LivenessCheck => self.liveness_check(),
            Ev::SaleWait { id } => self.on_sale_wait(id),
            Ev::UplinkWake { dev } => self.on_uplink_wake(dev),
            Ev::CloudRequest { dev, id, body } => self.on_cloud_request(dev, id, body),
            Ev::CloudReply { dev, id, body } => self.on_cloud_reply(dev, id, body),
            Ev::UplinkTimeout { dev, id } => self.on_uplink_timeout(dev, id),
            Ev::CloudWake => self.on_cloud_wake(),
            Ev::CloudCheck => self.cloud_check(),
            Ev::VoucherDrop(i) => self.voucher_drop(i),
            Ev::CardAfterWait { dev, lines, card } => {
                if self.devices[dev as usize].up {
                    let card = self.card_after_wait(dev, *card);
                    self.sell(dev, lines, None, Some(card));
                } else {
                    self.customers_lost += 1;
                }
            }
            Ev::VoucherAfterWait { dev, voucher } => self.redeem_voucher(dev, voucher, None),
            Ev::DropBuyer { buyer } => self.on_drop_buyer(buyer),
            Ev::DropPay { buyer } => self.on_drop_pay(buyer),
            Ev::DropHoldExpiry { buyer } => self.on_drop_hold_expiry(buyer),
            Ev::DropWalkIn { stall } => self.on_drop_walk_in(stall),
        }
    }

    /// Runs protocol code (ledger, sync core) and accounts its CPU time. Reading the clock costs
    /// about as much as an idle heartbeat, so one call in `PROTOCOL_TIMING_SAMPLE` is timed and
    /// scaled (this only feeds the report; it never affects the simulation).
    fn protocol<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        self.protocol_calls += 1;
        if !self.protocol_calls.is_multiple_of(PROTOCOL_TIMING_SAMPLE) {
            return f(self);
        }
        let t = Instant::now();
        let r = f(self);
        self.protocol_time += t.elapsed() * PROTOCOL_TIMING_SAMPLE as u32;
        r
    }

    /// The tablets of `stall` that serve customers (`selling_devices_per_stall`, 0: all of them).
    fn sellers(&self, stall: u32) -> std::ops::Range<u32> {
        let dps = self.sc.market.devices_per_stall;
        let sellers = match self.sc.customers.selling_devices_per_stall {
            0 => dps,
            k => k.min(dps),
        };
        stall * dps..stall * dps + sellers
    }

    /// Of them, those up now.
    fn sellers_up(&self, stall: u32) -> Vec<u32> {
        self.sellers(stall).filter(|d| self.devices[*d as usize].up).collect()
    }

    fn on_arrival(&mut self, stall: u32) {
        if self.day_over {
            return;
        }
        let next = self.next_arrival(stall, self.now);
        self.push(next, Ev::Arrival { stall });
        let up = self.sellers_up(stall);
        if up.is_empty() {
            self.customers_lost += 1;
            self.trace(None, format!("customer stall={stall} lost: no device up"));
            return;
        }
        let rng = &mut self.stall_rngs[stall as usize];
        let dev = up[rng.gen_range(0..up.len())];
        let lines_n = rng.gen_range(1..=self.sc.customers.basket_max.max(1));
        let catalogue = &self.products[stall as usize];
        let mut lines: Vec<LineRequest> = Vec::new();
        for _ in 0..lines_n {
            let p = &catalogue[rng.gen_range(0..catalogue.len())];
            let qty = rng.gen_range(1..=2);
            match lines.iter_mut().find(|l| l.sku == p.sku) {
                Some(l) => l.qty += qty,
                None => lines.push(LineRequest { sku: p.sku.clone(), qty }),
            }
        }
        self.trace(Some(dev), format!("customer at stall {stall}"));
        let card = self.customer_card(dev, &lines);
        self.customer_voucher(dev);
        match card {
            Some(Err(card)) => self.push(self.now + loyalty::ASK_WAIT_US, Ev::CardAfterWait { dev, lines, card: Box::new(card) }),
            Some(Ok(card)) => self.sell(dev, lines, None, Some(card)),
            None => self.sell(dev, lines, None, None),
        }
    }

    /// One attempt of a customer's sale (`wait`: the sale already waits for rights, with its id).
    /// Refused for rights that a peer with a live session holds, it waits as the node does
    /// ([`SaleWait`]): ask, retry when a transfer to this device is applied, refuse at the deadline.
    fn sell(&mut self, dev: u32, lines: Vec<LineRequest>, wait: Option<(u64, WaitingSale)>, card: Option<LoyaltyOnSale>) {
        let now = self.dev_now_ms(dev);
        let op = LocalOp::Sell { lines: lines.clone(), client_ref: None, recommendation: None, loyalty: card.clone(), staff: None };
        let result = self.protocol(|w| w.devices[dev as usize].ledger.record(op, now));
        match result {
            Ok(entry) => {
                let id = sale_id(entry.change.dot());
                self.trace(Some(dev), format!("sale {id} acked"));
                let idx = self.acked.len() as u32;
                let dot = entry.change.dot();
                self.acked.push(AckedSale { t_ack: self.now, device: dev, dot, holders: 0, converged_at: None, in_cloud_at: None });
                self.acked_index.insert(id, idx);
                self.not_in_cloud.insert(idx, None);
                self.hour().sales += 1;
                self.series.sale(self.now);
                if wait.is_some() {
                    self.sales_after_waiting += 1;
                }
                self.loyalty_acked(&entry);
                let stall = self.devices[dev as usize].stall;
                let drop_units: u64 = lines.iter().filter(|l| l.sku == drops::DROP_SKU).map(|l| l.qty).sum();
                if drop_units > 0 {
                    self.drop_sold(drops::Channel::Stall(stall), drop_units);
                }
                self.local_entry(dev, entry);
                // Ask for a refill where the sale left this device low, as the node does after a sale.
                for l in &lines {
                    let d = &mut self.devices[dev as usize];
                    let stock = d.ledger.state().stock(&l.sku);
                    let here = stock.per_device.get(&d.id).copied().unwrap_or(0);
                    let ask = d.rebalancer.after_sale(&l.sku, here, stock.total - here, now);
                    self.ask(dev, ask);
                }
            }
            Err(LedgerError::InsufficientRights { sku, requested, held_here, held_elsewhere_total, held_elsewhere }) => {
                let ask = self.devices[dev as usize].rebalancer.after_refusal(&sku, requested, held_here, held_elsewhere_total, true, now);
                self.ask(dev, ask);
                // The online channel is reachable through a live uplink: asked once, waited for as a peer.
                let held_online = self.held_online_seen_by(dev, &sku);
                let online = self.ask_online_for_sale(dev, &sku, requested, held_here, held_online, wait.is_none());
                let peers = self.devices[dev as usize].sync.peers();
                let reachable_holds =
                    online || held_elsewhere.iter().any(|(d, n)| *n > 0 && peers.keys().any(|p| self.devices[*p as usize].id == *d));
                let wait_now_ms = self.now / US_PER_MS;
                let (id, mut wait) = match wait {
                    Some((id, w)) => (id, w.wait),
                    None => (self.next_wait_id, SaleWait::new(wait_now_ms)),
                };
                match wait.refused(&sku, requested, reachable_holds, wait_now_ms) {
                    Ok(()) => {
                        self.trace(Some(dev), format!("sale waits for {sku}"));
                        if id == self.next_wait_id {
                            self.next_wait_id += 1;
                        }
                        self.waiting.insert(id, WaitingSale { dev, lines, wait, wake_at: 0, card });
                        self.schedule_sale_wait(id);
                    }
                    Err(_) => self.refuse(dev, "insufficient_stock_rights", Some(&sku)),
                }
            }
            // Short of points: the till says what it can redeem here (held plus budget left) and
            // the customer takes that, or pays without redeeming; the card still earns.
            Err(LedgerError::InsufficientPoints { held_here, budget_left, .. }) => {
                self.redemption_refused();
                let can = held_here.saturating_add(budget_left);
                let card = card.map(|c| {
                    let redeem_points = if can < c.redeem_points { can } else { 0 };
                    LoyaltyOnSale { redeem_points, offline_budget: c.offline_budget.filter(|_| redeem_points > 0), ..c }
                });
                self.sell(dev, lines, wait, card);
            }
            Err(e) => {
                let reason = match &e {
                    LedgerError::Revoked => "revoked",
                    LedgerError::UnknownSku(_) => "unknown_sku",
                    LedgerError::DropNotStarted { .. } => "drop_not_started",
                    _ => "invalid",
                };
                self.refuse(dev, reason, None);
            }
        }
    }

    /// Carries out an ask the rebalancer decided on (a rate-limited one is counted there).
    fn ask(&mut self, dev: u32, ask: Option<Ask>) {
        let Some(Ask::Send { sku, qty, for_sale }) = ask else { return };
        let now = self.dev_now_ms(dev);
        let out = self.protocol(|w| w.devices[dev as usize].sync.want_rights(&sku, qty, for_sale, now));
        self.execute(dev, out);
    }

    fn refuse(&mut self, dev: u32, reason: &str, short_of: Option<&str>) {
        *self.refused.entry(reason.to_string()).or_default() += 1;
        let sku = short_of.and_then(|s| self.sku_index.get(s).copied());
        self.series.refusal(self.now, sku);
        let holders = short_of.map(|sku| self.reachable_holders(dev, sku)).unwrap_or_default();
        if holders.is_empty() {
            let me = self.devices[dev as usize].id;
            let held_elsewhere =
                short_of.is_some_and(|sku| self.devices.iter().any(|d| d.id != me && d.ledger.state().rights_of(sku, &d.id) > 0));
            if held_elsewhere {
                self.refused_while_unreachable_held += 1;
            }
            self.trace(Some(dev), format!("sale refused {reason}"));
            return;
        }
        self.refused_while_reachable_held += 1;
        if holders.iter().any(|h| h.recent_sales == 0) {
            self.refused_while_reachable_idle_held += 1;
        }
        self.trace(Some(dev), format!("sale refused {reason} while reachable tablets held {holders:?}"));
    }

    /// Peers `dev` can reach now (a live session, both up, no fault between them) holding rights
    /// for `sku`: the truth, not `dev`'s view of it.
    fn reachable_holders(&self, dev: u32, sku: &str) -> Vec<Holder> {
        self.devices[dev as usize]
            .sync
            .peers()
            .keys()
            .filter_map(|&p| {
                let peer = &self.devices[p as usize];
                let state = peer.ledger.state();
                let held = state.rights_of(sku, &peer.id);
                let reachable = peer.up && !self.blocked(dev, p) && !self.blocked(p, dev);
                let now = self.dev_now_ms(p);
                let since = recent_sales_since_ms(now);
                let recent_sales = state.sales_of_device_since(&peer.id, since) as usize;
                (reachable && held > 0).then_some(Holder { device: p, held, recent_sales })
            })
            .collect()
    }

    /// The sale's pending wake (its `SaleWait::poll_timeout`) is due: poll it, unless stale.
    fn on_sale_wait(&mut self, id: u64) {
        if self.waiting.get(&id).is_some_and(|w| w.wake_at == self.now) {
            self.poll_sale_wait(id);
        } // else sold, refused or rescheduled since
    }

    /// Polls a waiting sale (at its timeout, or when rights arrived) and does what it says.
    fn poll_sale_wait(&mut self, id: u64) {
        let Some(w) = self.waiting.get_mut(&id) else { return };
        let dev = w.dev;
        let d = &self.devices[dev as usize];
        let sku = w.wait.sku().expect("a waiting sale is short of a SKU").to_string();
        let here = d.ledger.state().rights_of(&sku, &d.id);
        match w.wait.poll(here, self.now / US_PER_MS) {
            SaleWaitStep::Retry => {
                let w = self.waiting.remove(&id).expect("just seen");
                let (lines, card) = (w.lines.clone(), w.card.clone());
                self.sell(dev, lines, Some((id, w)), card);
            }
            SaleWaitStep::AskAgain { short } => {
                let now = self.dev_now_ms(dev);
                let ask = self.devices[dev as usize].rebalancer.ask_again(&sku, short, now);
                self.ask(dev, Some(ask));
                self.schedule_sale_wait(id);
            }
            SaleWaitStep::Wait => self.schedule_sale_wait(id),
            SaleWaitStep::GiveUp(_) => {
                self.waiting.remove(&id);
                self.refuse(dev, "insufficient_stock_rights", Some(&sku));
            }
        }
    }

    /// Schedules a waiting sale's next wake at its `poll_timeout` (ms of virtual time).
    fn schedule_sale_wait(&mut self, id: u64) {
        let now = self.now;
        let Some(w) = self.waiting.get_mut(&id) else { return };
        let at = w.wait.poll_timeout().expect("a waiting sale has a timeout") * US_PER_MS;
        let at = at.max(now);
        if w.wake_at == at && at > now {
            return; // already pending
        }
        w.wake_at = at;
        self.push(at, Ev::SaleWait { id });
    }

    /// Rights arrived at `dev`: poll its waiting sales (each retries if its short SKU is covered).
    fn retry_waiting(&mut self, dev: u32) {
        let mine: Vec<u64> = self.waiting.iter().filter(|(_, w)| w.dev == dev).map(|(id, _)| *id).collect();
        for id in mine {
            self.poll_sale_wait(id);
        }
    }

    /// A tablet went down or the day ended: its waiting customers leave.
    fn drop_waiting(&mut self, dev: Option<u32>) {
        let gone: Vec<u64> = self.waiting.iter().filter(|(_, w)| dev.is_none_or(|d| w.dev == d)).map(|(id, _)| *id).collect();
        for id in gone {
            let w = self.waiting.remove(&id).expect("listed above");
            if dev.is_some() {
                self.customers_lost += 1;
            } else {
                self.refuse(w.dev, "insufficient_stock_rights", w.wait.sku());
            }
        }
    }

    /// A change this device made: durable at once (acknowledged after its commit), then broadcast.
    fn local_entry(&mut self, dev: u32, entry: Entry) {
        self.note_held(dev, &entry);
        let change = entry.change.clone();
        let entry = self.intern_held(dev, entry);
        let d = &mut self.devices[dev as usize];
        // A durable commit makes the relaxed ones before it durable too (`Store::append_relaxed`):
        // the store stays a causal prefix when a sale spends rights that just arrived.
        let earlier = std::mem::take(&mut d.unsynced);
        d.store(earlier.into_iter().chain([entry]));
        let out = self.protocol(|w| w.devices[dev as usize].sync.local_changes(vec![change]));
        for o in &out {
            if let Output::Broadcast { bytes } = o {
                let t = self.now;
                remember_broadcast(&mut self.devices[dev as usize].seen, fnv_bytes(bytes), t);
            }
        }
        self.execute(dev, out);
        self.schedule_uplink(dev);
    }

    fn note_held(&mut self, dev: u32, entry: &Entry) {
        if !matches!(entry.event.body, EventBody::Sold { .. }) {
            return;
        }
        let Some(&idx) = self.acked_index.get(&sale_id(entry.change.dot())) else { return };
        let d = &mut self.devices[dev as usize];
        let (word, bit) = (idx as usize / 64, idx % 64);
        if d.held.len() <= word {
            d.held.resize(word + 1, 0);
        }
        if d.held[word] & (1 << bit) != 0 {
            return; // held before a crash lost it: first arrival counts
        }
        d.held[word] |= 1 << bit;
        let n = self.n();
        let sale = &mut self.acked[idx as usize];
        sale.holders += 1;
        if sale.holders == n && sale.converged_at.is_none() {
            sale.converged_at = Some(self.now);
            let lag_ms = (self.now - sale.t_ack) as f64 / 1000.0;
            let h = ((sale.t_ack / (3600 * US_PER_S)) as usize).min(self.hours.len() - 1);
            self.hours[h].lag_ms_sum += lag_ms;
            self.hours[h].lag_count += 1;
            self.hours[h].lag_ms_max = self.hours[h].lag_ms_max.max(lag_ms);
        }
    }

    /// Carries out a device's sync outputs (and those that follow).
    fn execute(&mut self, dev: u32, outputs: Vec<Output<u32>>) {
        let mut queue: VecDeque<Output<u32>> = outputs.into();
        while let Some(o) = queue.pop_front() {
            match o {
                Output::Send { to, bytes } => self.transmit(dev, to, Payload::Own(bytes), None),
                Output::Broadcast { bytes } => {
                    let id = Some(fnv_bytes(&bytes));
                    let bytes = Payload::Shared(Rc::new(bytes));
                    let peers: Vec<u32> = self.devices[dev as usize].sync.peers().keys().copied().collect();
                    for p in peers {
                        self.transmit(dev, p, bytes.clone(), id);
                    }
                }
                Output::Apply { from, changes } => {
                    let (pending, rights_arrived) = self.apply_changes(dev, from, changes);
                    let now = self.dev_now_ms(dev);
                    let more = self.protocol(|w| {
                        let d = &mut w.devices[dev as usize];
                        d.sync.applied(&from, pending, now, d.ledger.heads_ref())
                    });
                    queue.extend(more);
                    if rights_arrived {
                        self.retry_waiting(dev);
                    }
                }
                Output::Disconnect { peer, reason } => {
                    self.trace(Some(dev), format!("disconnect {peer}: {reason}"));
                    self.teardown(dev, peer);
                }
                Output::RightsWanted { from, sku, qty, for_sale } => {
                    if let Some(entry) = self.give_rights(dev, from, &sku, qty, for_sale) {
                        self.trace(Some(dev), format!("gave {sku} to {from}"));
                        self.local_entry(dev, entry);
                    }
                }
                Output::LoyaltyWanted { from, asset, qty } => self.give_loyalty(dev, from, asset, qty),
            }
        }
        self.schedule_wake(dev);
    }

    /// Verifies and applies changes from a peer or the cloud through the device's ledger; what it
    /// applies becomes durable after the group commit. Returns the changes left pending and whether
    /// stock rights for this device arrived.
    fn apply_changes(&mut self, dev: u32, from: impl std::fmt::Display, changes: Vec<SignedChange>) -> (usize, bool) {
        // A change another replica already applied is the very same bytes: hand the ledger the
        // one shared copy (its journal keeps it; a thousand replicas would keep a thousand) and
        // let it skip re-verifying a signature one ledger verified (`Interned`).
        let changes: Vec<SignedChange> = changes
            .into_iter()
            .map(|c| match self.entries.get(&c.dot()) {
                Some(e) if e.change == c => e.change.clone(),
                _ => c,
            })
            .collect();
        let report = self.protocol(|w| {
            let known = Interned { entries: &w.entries, applied_after: &w.applied_after };
            w.devices[dev as usize].ledger.apply_remote_known(changes, &known)
        });
        for (dot, why) in &report.rejected {
            self.trace(Some(dev), format!("rejected {}:{} from {from}: {}", dot.device.short(), dot.seq, why.label()));
        }
        if !report.applied.is_empty() {
            self.trace(Some(dev), format!("applied {} from {from}", report.applied.len()));
        }
        let me = self.devices[dev as usize].id;
        let rights_arrived = report.applied.iter().any(|e| matches!(&e.event.body, EventBody::Transferred { to, .. } if *to == me));
        let grew = !report.applied.is_empty();
        for e in report.applied {
            self.note_held(dev, &e);
            let e = self.intern_held(dev, e);
            self.devices[dev as usize].unsynced.push(e);
        }
        self.schedule_commit(dev);
        if grew {
            self.schedule_uplink(dev);
        }
        (report.pending, rights_arrived)
    }

    /// Every call into a device's sync core ends here (through `execute`): it may have moved the
    /// core's `poll_timeout` earlier (a new peer, a first unconfirmed serve). A later timeout needs
    /// nothing: the pending wake finds nothing due and reschedules.
    fn schedule_wake(&mut self, dev: u32) {
        let Some(due_ms) = self.devices[dev as usize].sync.poll_timeout() else { return };
        let at = self.virtual_us_at(dev, due_ms);
        let d = &mut self.devices[dev as usize];
        if d.wake_at.is_some_and(|w| w <= at) {
            return;
        }
        d.wake_at = Some(at);
        self.push(at, Ev::Wake { dev });
    }

    /// The device's wake is due: tick its sync core if something is due on its clock, then
    /// schedule the next one. Stale wakes (superseded by an earlier one) cost one comparison.
    fn on_wake(&mut self, dev: u32) {
        let d = &mut self.devices[dev as usize];
        if d.wake_at != Some(self.now) {
            return;
        }
        d.wake_at = None;
        if !d.up {
            return; // restarted with a new core, which schedules its own
        }
        let now = self.dev_now_ms(dev);
        if self.devices[dev as usize].sync.poll_timeout().is_some_and(|due| due <= now) {
            let out = self.protocol(|w| {
                let d = &mut w.devices[dev as usize];
                d.sync.tick(now, d.ledger.heads_ref())
            });
            self.execute(dev, out); // schedules the next wake
        } else {
            self.schedule_wake(dev); // woken a little early by rounding of the drifting clock
        }
    }

    /// The first virtual µs at which device `dev`'s clock reads `dev_ms` (never before now): the
    /// inverse of `dev_now_ms`.
    fn virtual_us_at(&self, dev: u32, dev_ms: u64) -> u64 {
        let d = &self.devices[dev as usize];
        let local_us = (dev_ms.saturating_sub(DEVICE_EPOCH_MS)) as f64 * 1000.0 - d.clock_offset_us as f64;
        let at = (local_us / (1.0 + d.drift_ppm / 1e6)).ceil().max(0.0) as u64;
        at.max(self.now + 1).min(self.now.saturating_add(MAX_WAKE_AHEAD_US))
    }

    fn give_rights(&mut self, dev: u32, to: u32, sku: &str, qty: u64, for_sale: bool) -> Option<Entry> {
        let now = self.dev_now_ms(dev);
        let to_id = self.devices[to as usize].id;
        self.protocol(|w| {
            let d = &mut w.devices[dev as usize];
            let state = d.ledger.state();
            let me = d.ledger.device();
            let held = state.rights_of(sku, &me);
            let since = recent_sales_since_ms(now);
            let count = |x: &DeviceId| state.sales_of_device_since(x, since);
            let give = d.rebalancer.give(held, qty, count(&me), count(&to_id), for_sale);
            (give > 0).then(|| d.ledger.record(LocalOp::Transfer { sku: sku.to_string(), qty: give, to: to_id }, now).ok()).flatten()
        })
    }

    fn schedule_commit(&mut self, dev: u32) {
        let delay = self.sc.storage.remote_commit_delay_ms * US_PER_MS;
        let d = &mut self.devices[dev as usize];
        if d.unsynced.is_empty() || d.commit_scheduled {
            return;
        }
        d.commit_scheduled = true;
        let t = self.now + delay;
        self.push(t, Ev::Commit { dev });
    }

    /// The state at the end of a series bucket: sessions, tablets up, sales not yet in the cloud,
    /// and each tablet's own stock rights (its own ledger is the authority on what it holds) summed
    /// per side of the split. A tablet only ever holds rights for its own stall's products: they
    /// are restocked there and asked for only by the stall's sellers.
    fn sample_series(&mut self) {
        let sides = self.series.sides;
        let mut stock = vec![0u32; self.sku_index.len() * sides];
        for (d, dev) in self.devices.iter().enumerate() {
            let side = side_of(&self.faults, &self.moved, d as u32).min(sides - 1);
            let state = dev.ledger.state();
            for p in &self.products[dev.stall as usize] {
                let i = self.sku_index[&p.sku];
                let held = u32::try_from(state.rights_of(&p.sku, &dev.id)).unwrap_or(u32::MAX);
                stock[i * sides + side] = stock[i * sides + side].saturating_add(held);
            }
        }
        let b = &mut self.series;
        b.stock.push(stock);
        b.sessions.push(self.conns.len() as u64);
        b.devices_up.push(self.devices.iter().filter(|d| d.up).count() as u64);
        b.sales_not_in_cloud.push(self.not_in_cloud.len() as u64);
    }

    fn finish_series(&mut self) -> Series {
        let empty = SeriesBuilder::new(1.0, 1, 0);
        let builder = std::mem::replace(&mut self.series, empty);
        let acked: Vec<(u64, Option<u64>)> = self.acked.iter().map(|s| (s.t_ack, s.converged_at)).collect();
        let skus: Vec<String> = self.products.iter().flatten().map(|p| p.sku.clone()).collect();
        builder.finish(self.now, self.end_of_day_at, &acked, &skus, &side_names(&self.faults, self.n()))
    }

    fn report(&self, wall: Duration, series: Series) -> Report {
        let mut lags: Vec<f64> = self.acked.iter().filter_map(|s| s.converged_at.map(|t| (t - s.t_ack) as f64 / 1000.0)).collect();
        lags.sort_by(f64::total_cmp);
        let pct = |p: f64| if lags.is_empty() { 0.0 } else { lags[((lags.len() - 1) as f64 * p).round() as usize] };
        let storage: Vec<u64> = self.devices.iter().map(|d| d.storage_bytes).collect();
        let sales = self.acked.len() as u64;
        let asks = self.devices.iter().map(|d| *d.rebalancer.stats()).fold(self.asks_before_restarts, |a, b| AskStats {
            for_sale: a.for_sale + b.for_sale,
            refill: a.refill + b.refill,
            rate_limited: a.rate_limited + b.rate_limited,
        });
        let hours_run = ((self.end_of_day_at.max(1) as f64 / (3600.0 * US_PER_S as f64)).ceil() as usize).max(1);
        Report {
            scenario: self.sc.name.clone(),
            seed: self.opts.seed,
            devices: self.n(),
            simulated_hours: self.sc.duration_h,
            events: self.events,
            sales,
            refused: self.refused.clone(),
            refused_while_reachable_held: self.refused_while_reachable_held,
            refused_while_reachable_idle_held: self.refused_while_reachable_idle_held,
            refused_while_unreachable_held: self.refused_while_unreachable_held,
            units_unsold: self.restocked.keys().map(|sku| self.devices[0].ledger.state().stock(sku).total).sum(),
            sales_after_waiting_for_rights: self.sales_after_waiting,
            rights_asks_for_sale: asks.for_sale,
            rights_asks_refill: asks.refill,
            rights_asks_rate_limited: asks.rate_limited,
            customers_lost: self.customers_lost,
            convergence_ms_p50: pct(0.5),
            convergence_ms_p99: pct(0.99),
            convergence_ms_max: lags.last().copied().unwrap_or(0.0),
            sales_not_converged_by_end: self.acked.iter().filter(|s| s.converged_at.is_none()).count() as u64,
            converged_after_faults_stopped_ms: self.converged_after_heal.map(|t| t as f64 / 1000.0),
            messages: self.messages,
            bytes: self.bytes,
            messages_per_sale: if sales > 0 { self.messages as f64 / sales as f64 } else { 0.0 },
            bytes_per_sale: if sales > 0 { self.bytes as f64 / sales as f64 } else { 0.0 },
            storage_bytes_per_device_mean: storage.iter().sum::<u64>() as f64 / storage.len().max(1) as f64,
            storage_bytes_per_device_max: storage.iter().copied().max().unwrap_or(0),
            faults_fired: self.faults_fired.clone(),
            wall_ms: wall.as_secs_f64() * 1000.0,
            protocol_ms: self.protocol_time.as_secs_f64() * 1000.0,
            engine_ms: (wall.saturating_sub(self.protocol_time)).as_secs_f64() * 1000.0,
            per_hour: self.hours[..hours_run.min(self.hours.len())].to_vec(),
            cloud: self.cloud_report(),
            loyalty: self.loyalty.as_ref().map(|l| l.report.clone()),
            drop: self.drop.as_ref().map(|d| d.report.clone()),
            series,
            digest: String::new(),
        }
    }
}

/// The sides of the Wi-Fi split the series follows stock on: those of the scenario's first
/// partition (a tablet listed in none is on side 0, as `blocked` has it); one side without one.
fn first_partition(faults: &[FaultSpec]) -> Option<&Vec<Vec<u32>>> {
    faults.iter().find_map(|f| match f {
        FaultSpec::Partition { groups, .. } => Some(groups),
        _ => None,
    })
}

fn side_names(faults: &[FaultSpec], devices: u32) -> Vec<String> {
    let Some(groups) = first_partition(faults) else { return vec!["all tablets".to_string()] };
    (0..groups.len().max(1))
        .map(|s| {
            let members: Vec<u32> = (0..devices).filter(|&d| groups.iter().position(|g| g.contains(&d)).unwrap_or(0) == s).collect();
            format!("side {s} (tablets {})", faults::ranges(&members))
        })
        .collect()
}

fn side_of(faults: &[FaultSpec], moved: &BTreeMap<u32, usize>, d: u32) -> usize {
    if let Some(s) = moved.get(&d) {
        return *s;
    }
    first_partition(faults).and_then(|g| g.iter().position(|g| g.contains(&d))).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use stallmesh_ledger::KnownValid;

    #[test]
    fn a_replica_skips_the_signature_check_only_of_a_change_equal_to_an_accepted_one() {
        let sc = crate::Scenario::parse(
            "name = \"t\"\nduration_h = 0.1\n[market]\nstalls = 1\ndevices_per_stall = 2\nproducts_per_stall = 1\ninitial_stock = 4\n[customers]\narrivals_per_stall_per_hour = 1\n",
            "t",
        )
        .unwrap();
        let w = World::new(sc, Options::default());
        let accepted = w.entries.values().next().expect("the day's opening entries").change.clone();
        let known = Interned { entries: &w.entries, applied_after: &w.applied_after };
        assert!(known.known_valid(&accepted));
        let mut altered = accepted.clone();
        let mut bytes = altered.change.to_vec();
        bytes[0] ^= 1;
        altered.change = bytes.into();
        assert!(!known.known_valid(&altered), "same position, other bytes: checked");
    }
}
