//! The sync protocol: a sans-IO state machine, one session per connected peer.
//!
//! Each journal is a gap-free chain per device, so what a peer lacks is exactly "device D from seq s
//! on". Peers exchange their **heads** (device → entries held) in full on connect, then as deltas
//! (only what changed) with each heartbeat; each side answers with the changes the other lacks, in
//! bounded messages. New local changes are broadcast at once. Changes received are handed to the
//! driver (`Output::Apply`), which verifies and applies them through the ledger; if some could not
//! be applied yet (a gap), the session pulls.
//!
//! Lost messages are repaired without periodic full heads (1,000 entries in a big market): every
//! heads message carries the sender's total, so a receiver whose view drifted (a lost delta) sees
//! the sums differ and asks for the full heads once; changes served and not confirmed by the
//! peer's heads within the liveness timeout are assumed lost and served again.
//!
//! The driver supplies everything from outside: bytes received, `now_ms`, this node's heads, and a
//! [`ChangeLog`] to read stored changes from. It carries out the [`Output`]s: send to one peer,
//! broadcast, apply, disconnect, give stock rights. Nothing here knows libp2p, tokio or a clock, so
//! the node and the simulator run this same code.

pub mod rebalance;

use serde::{Deserialize, Serialize};
use stallmesh_identity::{DeviceId, SignedChange};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;

/// What a node holds: device → number of journal entries (= next seq expected).
pub use stallmesh_ledger::Heads;

/// First byte of every message; a peer speaking another version is disconnected, not guessed at.
/// 3: `RightsWanted` says whether a sale waits for the rights. 4: `LoyaltyWanted`.
pub const PROTOCOL_VERSION: u8 = 4;
/// Largest encoded message. 2,000 changes of a typical sale (~550 bytes) fit in about 1.1 MB.
pub const MAX_MESSAGE_BYTES: usize = 2 * 1024 * 1024;
/// Most changes in one message; more are sent in follow-up messages (`more: true`).
pub const MAX_CHANGES_PER_MESSAGE: usize = 2_000;
/// Budget for the changes in one message, leaving room for framing under `MAX_MESSAGE_BYTES`.
pub const MAX_CHANGE_BYTES_PER_MESSAGE: usize = MAX_MESSAGE_BYTES - 64 * 1024;
/// Most devices a heads message may list: far above any market, small enough to bound memory.
pub const MAX_HEADS_ENTRIES: usize = 4_096;
/// Bytes sent to one peer and not yet acknowledged before serving that peer pauses.
pub const MAX_IN_FLIGHT_BYTES_PER_PEER: usize = 8 * MAX_MESSAGE_BYTES;
/// Most connected peers a node keeps sessions for (a market has tens of devices).
pub const MAX_PEERS: usize = 256;
/// Most devices a node's sessions keep numbers for ([`DeviceIndex`]): room for two markets' worth
/// of full heads, so a peer telling one whole market never finds it full. Reached only by peers
/// naming devices that hold nothing anywhere else: the numbers are then compacted to the devices
/// some session still names, and a peer whose heads still do not fit is dropped
/// (`ProtocolError::OverLimit`).
pub const MAX_KNOWN_DEVICES: usize = 2 * MAX_HEADS_ENTRIES;
const _: () = assert!(MAX_KNOWN_DEVICES >= MAX_HEADS_ENTRIES, "one full heads always fits an empty index");
const _: () = assert!(MAX_KNOWN_DEVICES <= u32::MAX as usize, "device numbers are u32");
/// A heartbeat due goes out together with those due within `heartbeat_ms / HEARTBEAT_COALESCE_DIVISOR`
/// (250 ms of the default second, the node's old fixed tick): peers' heartbeats fall into step, so
/// a driver woken at [`Sync::poll_timeout`] wakes about once a round instead of once per peer, and
/// no heartbeat is sent sooner than three quarters of the interval.
pub const HEARTBEAT_COALESCE_DIVISOR: u64 = 4;
const _: () = assert!(HEARTBEAT_COALESCE_DIVISOR >= 2, "a heartbeat is never sent sooner than half its interval");

/// Bytes reserved for an encoded message before it is written: an idle heartbeat's heads (version,
/// tag, empty list, flag, total) take at most 14.
const ENCODE_INITIAL_CAPACITY: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// What the sender holds. The receiver answers with what the sender lacks. `full: false`: only
    /// the entries that changed since the sender's previous heads to this peer (merged by max).
    /// `total`: the sum of all the sender's entries, so the receiver can tell its view is whole.
    Heads { heads: Vec<(DeviceId, u64)>, full: bool, total: u64 },
    /// The sender's view of the receiver's heads does not add up (a heads message was lost): send
    /// them in full.
    HeadsWanted,
    /// Changes the receiver lacks. `more`: the sender had more than one message holds.
    Changes { changes: Vec<SignedChange>, more: bool },
    /// The sender ran short of stock rights for `sku` and asks for `qty` units. `for_sale`: a
    /// customer waits for them now (else a refill below the low watermark).
    RightsWanted { sku: String, qty: u64, for_sale: bool },
    /// The sender is redeeming a card's points or a voucher it does not hold: a holder transfers
    /// what it holds of it, up to `qty` (a customer waits at the till).
    LoyaltyWanted { asset: stallmesh_ledger::LoyaltyAsset, qty: u64 },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum ProtocolError {
    #[error("message of {0} bytes exceeds {MAX_MESSAGE_BYTES}")]
    Oversized(usize),
    #[error("empty message")]
    Empty,
    #[error("protocol version {0}, expected {PROTOCOL_VERSION}")]
    Version(u8),
    #[error("message does not decode: {0}")]
    Malformed(String),
    #[error("{0} exceeds its limit")]
    OverLimit(&'static str),
}

impl ProtocolError {
    pub fn label(&self) -> &'static str {
        match self {
            ProtocolError::Oversized(_) => "oversized",
            ProtocolError::Empty => "empty",
            ProtocolError::Version(_) => "version",
            ProtocolError::Malformed(_) => "malformed",
            ProtocolError::OverLimit(_) => "over_limit",
        }
    }
}

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        // Room for a heartbeat's heads (version, tag, a few varints) up front: most messages are
        // those, and growing from one byte reallocates twice.
        let mut buf = Vec::with_capacity(ENCODE_INITIAL_CAPACITY);
        buf.push(PROTOCOL_VERSION);
        postcard::to_extend(self, buf).expect("messages always serialize")
    }

    /// Decodes and checks limits. Never panics on any input.
    pub fn decode(bytes: &[u8]) -> Result<Message, ProtocolError> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(ProtocolError::Oversized(bytes.len()));
        }
        let (&version, body) = bytes.split_first().ok_or(ProtocolError::Empty)?;
        if version != PROTOCOL_VERSION {
            return Err(ProtocolError::Version(version));
        }
        let msg: Message = postcard::from_bytes(body).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
        match &msg {
            Message::Heads { heads, .. } if heads.len() > MAX_HEADS_ENTRIES => Err(ProtocolError::OverLimit("heads entries")),
            Message::Changes { changes, .. } if changes.len() > MAX_CHANGES_PER_MESSAGE => {
                Err(ProtocolError::OverLimit("changes per message"))
            }
            _ => Ok(msg),
        }
    }
}

/// Where a node's stored changes are read from (the redb store in a node, memory in the simulator).
pub trait ChangeLog {
    /// Up to `limit` changes of `device` from `from_seq` on, in order.
    fn changes_since(&self, device: &DeviceId, from_seq: u64, limit: usize) -> Result<Vec<SignedChange>, String>;
}

/// Changes read per device per round of [`missing`]: small enough that one busy device cannot
/// take a whole batch while another device's changes (which it may depend on) wait.
pub const MISSING_ROUND_CHANGES: usize = 64;

/// What a holder of `mine` has that a peer holding `theirs` lacks, at most `max_changes` changes
/// and `max_bytes` of them, and whether more remain. Devices take turns, [`MISSING_ROUND_CHANGES`]
/// at a time, so a bounded batch advances every lacking device: a change waiting for another
/// device's transfer (its `causal`) finds it in the same batch or the next. Used where the peer
/// keeps no session between batches (the cloud, and the uplink serving it).
pub fn missing(
    mine: &Heads,
    theirs: &BTreeMap<DeviceId, u64>,
    log: &impl ChangeLog,
    max_changes: usize,
    max_bytes: usize,
) -> Result<(Vec<SignedChange>, bool), String> {
    let mut cursors: Vec<(DeviceId, u64, u64)> =
        against(mine, theirs).filter_map(|(d, n, held)| (held < n).then_some((*d, held, n))).collect();
    let mut changes = Vec::new();
    let mut bytes = 0usize;
    let mut more = false;
    while !cursors.is_empty() {
        let mut next_round = Vec::with_capacity(cursors.len());
        for (device, from, until) in cursors {
            let room = max_changes - changes.len();
            if room == 0 {
                return Ok((changes, true));
            }
            let want = room.min(MISSING_ROUND_CHANGES).min((until - from) as usize);
            let batch = log.changes_since(&device, from, want)?;
            let mut at = from;
            let mut full = false;
            for c in batch {
                let size = c.encoded_len() + 8;
                if bytes + size > max_bytes {
                    // This device's next change does not fit: the others still take their turn
                    // (one device of large changes must not crowd out the one it depends on).
                    full = true;
                    more = true;
                    break;
                }
                bytes += size;
                at = c.seq + 1;
                changes.push(c);
            }
            // A log holding less than its heads say (a read racing a write) is looked at again next time.
            if !full && at < until && at > from {
                next_round.push((device, at, until));
            }
        }
        cursors = next_round;
    }
    debug_assert!(changes.len() <= max_changes && bytes <= max_bytes);
    Ok((changes, more))
}

/// Each device of `mine` with its count there and in `theirs` (0: absent), in device order: one
/// walk down both sorted maps, not a search of `theirs` per device (1,000 devices, 32-byte ids).
pub fn against<'a>(
    mine: &'a BTreeMap<DeviceId, u64>,
    theirs: &'a BTreeMap<DeviceId, u64>,
) -> impl Iterator<Item = (&'a DeviceId, u64, u64)> + 'a {
    let mut theirs = theirs.iter().peekable();
    mine.iter().map(move |(d, &n)| {
        while theirs.next_if(|(t, _)| *t < d).is_some() {}
        let held = theirs.next_if(|(t, _)| *t == d).map_or(0, |(_, &h)| h);
        (d, n, held)
    })
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output<P> {
    /// Send `bytes` to one peer (a directed, reliable message).
    Send { to: P, bytes: Vec<u8> },
    /// Publish `bytes` to every peer of the market.
    Broadcast { bytes: Vec<u8> },
    /// Verify and apply these changes through the ledger, then call [`Sync::applied`].
    Apply { from: P, changes: Vec<SignedChange> },
    /// Drop the connection to this peer.
    Disconnect { peer: P, reason: String },
    /// A peer asks for stock rights: the driver consults [`rebalance`] and may record a transfer.
    RightsWanted { from: P, sku: String, qty: u64, for_sale: bool },
    /// A peer asks for a card's points or a voucher: a holder transfers what it holds, up to `qty`.
    LoyaltyWanted { from: P, asset: stallmesh_ledger::LoyaltyAsset, qty: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncConfig {
    /// Heads are sent to a peer at least this often; they double as the heartbeat.
    pub heartbeat_ms: u64,
    /// A peer heard nothing from for this long is disconnected: TCP alone hides a partition for
    /// many seconds (measured here: 12–16 s), the heartbeat makes silence meaningful.
    pub liveness_timeout_ms: u64,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self { heartbeat_ms: 1_000, liveness_timeout_ms: 4_000 }
    }
}

/// The devices a node's sessions have heard of, numbered in the order first heard. A session keeps
/// its peer's heads as a vector by these numbers: 8 bytes a device instead of a map entry of ~45,
/// and a lookup per device instead of a walk down a tree keyed by 32-byte ids. (A tablet of a
/// 1,000-device market keeps ~15 sessions.)
///
/// Architecture invariant: numbers are only handed out and compacted here; a session's vector is
/// never longer than `ids`, and entry `i` is the peer's count for `ids[i]`.
#[derive(Debug, Clone, Default)]
struct DeviceIndex {
    ids: Vec<DeviceId>,
    /// Hash-ordered, so never iterated (`ids` is the order); keyed with a random seed, so a peer
    /// cannot pick ids that collide.
    numbers: HashMap<DeviceId, u32>,
}

impl DeviceIndex {
    fn number(&self, device: &DeviceId) -> Option<usize> {
        self.numbers.get(device).map(|&i| i as usize)
    }

    /// The device's number, handed out if it has none; `None` when the index is full.
    fn number_or_insert(&mut self, device: DeviceId) -> Option<usize> {
        if let Some(i) = self.number(&device) {
            return Some(i);
        }
        if self.ids.len() >= MAX_KNOWN_DEVICES {
            return None;
        }
        let i = self.ids.len();
        self.ids.push(device);
        self.numbers.insert(device, i as u32);
        debug_assert_eq!(self.ids.len(), self.numbers.len());
        Some(i)
    }
}

/// A peer's count for `device` in `their_heads` (a vector by [`DeviceIndex`] number).
fn told(index: &DeviceIndex, their_heads: &[u64], device: &DeviceId) -> u64 {
    index.number(device).and_then(|i| their_heads.get(i).copied()).unwrap_or(0)
}

/// One connected peer, as this node sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PeerSession {
    pub connected_at_ms: u64,
    pub last_heard_ms: u64,
    pub last_sent_ms: u64,
    /// The peer's heads as it told them (merged by max), by device number ([`DeviceIndex`]; a
    /// device past the end holds 0). Read through [`Sync::peer_holds`].
    #[serde(skip)]
    their_heads: Vec<u64>,
    /// The sum of the peer's heads.
    pub their_total: u64,
    /// Changes served to the peer beyond what it told: device → (next seq sent, since when the
    /// peer's heads for it have not moved). Counted as held so they are not sent twice; dropped when
    /// the peer's heads confirm them, or when its heads for that device stand still for the
    /// liveness timeout: then they are assumed lost and served again.
    #[serde(skip)]
    pub sent_ahead: BTreeMap<DeviceId, (u64, u64)>,
    /// When a [`Message::HeadsWanted`] was sent that no full heads answered yet (asked again after
    /// the liveness timeout, in case the answer was lost).
    pub full_heads_wanted_ms: Option<u64>,
    /// Sent a heads message to pull, and no changes came back yet.
    pub pulling: bool,
    /// The total of this node's heads when it last told them to the peer: the next delta is the
    /// devices changed since ([`Heads::changed_since`]).
    #[serde(skip)]
    pub told_total: u64,
    /// Sum of this node's heads when it last served the peer, and whether the peer's heads changed
    /// since: an idle heartbeat needs no walk over every device.
    #[serde(skip)]
    pub served_total: Option<u64>,
    /// The total of this node's heads at the last serve that left the peer lacking nothing (as far
    /// as its heads say): later serves look only at devices changed since. `None` after a full
    /// heads (the peer may hold less than assumed) or a serve cut short by a limit.
    #[serde(skip)]
    pub complete_through: Option<u64>,
    /// The peer's last changes message said it had more to send.
    pub more_available: bool,
    /// Bytes sent and not yet reported delivered (or failed) by the transport.
    pub in_flight_bytes: usize,
    pub messages_in: u64,
    pub messages_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub changes_in: u64,
    pub changes_out: u64,
}

impl PeerSession {
    /// The next seq of `device` the peer holds or has been sent.
    fn held(&self, index: &DeviceIndex, device: &DeviceId) -> u64 {
        let told = told(index, &self.their_heads, device);
        self.sent_ahead.get(device).map_or(told, |(sent, _)| told.max(*sent))
    }

    /// Sets the peer's count for device number `i` (the vector grows to the index's length, exactly:
    /// every session of a node grows alike, so doubling would waste the most where it is repeated).
    fn set_told(&mut self, index: &DeviceIndex, i: usize, n: u64) {
        debug_assert!(i < index.ids.len());
        if i >= self.their_heads.len() {
            self.their_heads.reserve_exact(index.ids.len() - self.their_heads.len());
            self.their_heads.resize(index.ids.len(), 0);
        }
        self.their_heads[i] = n;
    }
}

/// Counters the driver exports as metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SyncStats {
    pub messages_in: u64,
    pub messages_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub changes_sent: u64,
    pub changes_received: u64,
    pub protocol_errors: BTreeMap<&'static str, u64>,
    pub liveness_disconnects: u64,
    pub peers_refused: u64,
    pub serving_paused: u64,
    /// Heads views found not to add up (a lost heads message), each repaired by one full heads.
    pub full_heads_wanted: u64,
    /// Changes served and never confirmed by the peer within the liveness timeout (served again).
    pub unconfirmed_expired: u64,
}

#[derive(Clone)]
pub struct Sync<P> {
    config: SyncConfig,
    peers: BTreeMap<P, PeerSession>,
    devices: DeviceIndex,
    stats: SyncStats,
}

impl<P: Ord + Clone + Debug> Sync<P> {
    pub fn new(config: SyncConfig) -> Self {
        Self { config, peers: BTreeMap::new(), devices: DeviceIndex::default(), stats: SyncStats::default() }
    }

    /// How many entries of `device`'s journal `peer` holds, as of its last heads (`None`: no session).
    pub fn peer_holds(&self, peer: &P, device: &DeviceId) -> Option<u64> {
        Some(told(&self.devices, &self.peers.get(peer)?.their_heads, device))
    }

    /// Renumbers the devices to those some session still names (a nonzero count): run when the
    /// index fills, which only peers naming devices nobody else holds can cause.
    fn compact_devices(&mut self) {
        let old = &self.devices.ids;
        let mut named = vec![false; old.len()];
        for s in self.peers.values() {
            for (i, &n) in s.their_heads.iter().enumerate() {
                named[i] |= n > 0;
            }
        }
        let mut index = DeviceIndex::default();
        let mut renumber = vec![None; old.len()];
        for (i, d) in old.iter().enumerate() {
            if named[i] {
                renumber[i] = index.number_or_insert(*d);
            }
        }
        for s in self.peers.values_mut() {
            let mut heads = vec![0; index.ids.len()];
            for (i, &n) in s.their_heads.iter().enumerate() {
                if let Some(j) = renumber[i] {
                    heads[j] = n;
                }
            }
            s.their_heads = heads;
        }
        tracing::warn!(before = old.len(), after = index.ids.len(), "device numbers compacted");
        self.devices = index;
    }

    /// Drops `peer`, whose heads name more devices than [`MAX_KNOWN_DEVICES`] leaves room for.
    fn too_many_devices(&mut self, mut out: Vec<Output<P>>, peer: P) -> Vec<Output<P>> {
        self.protocol_error(&mut out, peer, ProtocolError::OverLimit("known devices"));
        out
    }

    /// Drops `peer` for breaking the protocol.
    fn protocol_error(&mut self, out: &mut Vec<Output<P>>, peer: P, e: ProtocolError) {
        *self.stats.protocol_errors.entry(e.label()).or_default() += 1;
        tracing::warn!(peer = ?peer, error = %e, "protocol error; dropping peer");
        self.peers.remove(&peer);
        out.push(Output::Disconnect { peer, reason: e.to_string() });
    }

    pub fn peers(&self) -> &BTreeMap<P, PeerSession> {
        &self.peers
    }

    pub fn stats(&self) -> &SyncStats {
        &self.stats
    }

    /// How many entries `peer` lacks compared with `mine`, as of its last heads.
    pub fn behind(&self, peer: &P, mine: &Heads) -> Option<u64> {
        let s = self.peers.get(peer)?;
        Some(mine.iter().map(|(d, n)| n.saturating_sub(told(&self.devices, &s.their_heads, d))).sum())
    }

    /// Changes served to `peer` and not yet confirmed by its heads: device → next seq sent.
    pub fn unconfirmed(&self, peer: &P) -> Option<BTreeMap<DeviceId, u64>> {
        Some(self.peers.get(peer)?.sent_ahead.iter().map(|(d, (n, _))| (*d, *n)).collect())
    }

    /// How many entries `peer` holds that `mine` lacks, as of its last heads.
    pub fn ahead(&self, peer: &P, mine: &Heads) -> Option<u64> {
        let s = self.peers.get(peer)?;
        let ids = &self.devices.ids;
        // Saturating: a peer may tell any counts.
        Some(s.their_heads.iter().zip(ids).fold(0u64, |t, (n, d)| t.saturating_add(n.saturating_sub(mine.get(d).copied().unwrap_or(0)))))
    }

    /// A connection to an authenticated peer of this market opened: start catch-up both ways.
    pub fn connected(&mut self, peer: P, now_ms: u64, mine: &Heads) -> Vec<Output<P>> {
        if self.peers.contains_key(&peer) {
            return vec![]; // a second connection to the same peer (simultaneous dials): one session
        }
        if self.peers.len() >= MAX_PEERS {
            self.stats.peers_refused += 1;
            return vec![Output::Disconnect { peer, reason: format!("more than {MAX_PEERS} peers") }];
        }
        self.peers.insert(peer.clone(), PeerSession { connected_at_ms: now_ms, last_heard_ms: now_ms, ..Default::default() });
        let mut out = Vec::new();
        self.send_heads(&mut out, &peer, mine, now_ms, true);
        out
    }

    pub fn disconnected(&mut self, peer: &P) {
        self.peers.remove(peer);
    }

    /// Sends `mine` to `to`: in full, or only what changed since the last heads told to it. A heads
    /// message is also a pull: the peer answers with what this node lacks.
    fn send_heads(&mut self, out: &mut Vec<Output<P>>, to: &P, mine: &Heads, now_ms: u64, force_full: bool) {
        let Some(s) = self.peers.get_mut(to) else { return };
        let full = force_full;
        let mine_total = mine.total();
        let heads: Vec<(DeviceId, u64)> = if full {
            mine.iter().map(|(d, n)| (*d, *n)).collect()
        } else if s.told_total >= mine_total {
            Vec::new() // heads only grow: the same sum means nothing changed since the last heads
        } else {
            // What the peer was told equals `mine` as it was at `told_total`: the delta is exactly
            // the devices changed since, in device order.
            let mut delta: Vec<(DeviceId, u64)> = mine.changed_since(s.told_total).map(|(d, n)| (*d, n)).collect();
            delta.sort_unstable_by_key(|e| e.0);
            delta
        };
        s.told_total = mine_total;
        s.pulling = true;
        self.send(out, to, Message::Heads { heads, full, total: mine_total }.encode(), now_ms);
    }

    fn send(&mut self, out: &mut Vec<Output<P>>, to: &P, bytes: Vec<u8>, now_ms: u64) {
        if let Some(s) = self.peers.get_mut(to) {
            s.last_sent_ms = now_ms;
            s.messages_out += 1;
            s.bytes_out += bytes.len() as u64;
            s.in_flight_bytes += bytes.len();
        }
        self.stats.messages_out += 1;
        self.stats.bytes_out += bytes.len() as u64;
        out.push(Output::Send { to: to.clone(), bytes });
    }

    /// The transport reports `bytes` sent to `peer` delivered, or failed: no longer in flight.
    pub fn acked(&mut self, peer: &P, bytes: usize) {
        if let Some(s) = self.peers.get_mut(peer) {
            s.in_flight_bytes = s.in_flight_bytes.saturating_sub(bytes);
        }
    }

    /// Handles one message from `from`. A malformed or oversized message drops the peer.
    pub fn receive(&mut self, from: P, bytes: &[u8], now_ms: u64, mine: &Heads, log: &impl ChangeLog) -> Vec<Output<P>> {
        let mut out = Vec::new();
        self.stats.messages_in += 1;
        self.stats.bytes_in += bytes.len() as u64;
        let msg = match Message::decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                self.protocol_error(&mut out, from, e);
                return out;
            }
        };
        if let Message::Heads { heads, full, .. } = &msg {
            // Room for every device this heads may name is made before any session changes: the
            // numbers are never compacted in the middle of a message.
            if self.devices.ids.len() + heads.len() > MAX_KNOWN_DEVICES {
                if let Some(s) = self.peers.get_mut(&from).filter(|_| *full) {
                    s.their_heads.clear(); // about to be replaced: its devices need no number
                }
                self.compact_devices();
            }
        }
        let Some(session) = self.peers.get_mut(&from) else {
            // Not (or no longer) a session: broadcasts can still arrive from a peer being set up.
            if let Message::Changes { changes, .. } = msg {
                self.stats.changes_received += changes.len() as u64;
                out.push(Output::Apply { from, changes });
            }
            return out;
        };
        session.last_heard_ms = now_ms;
        session.messages_in += 1;
        session.bytes_in += bytes.len() as u64;
        match msg {
            Message::Heads { heads, full, total } => {
                let mine_total = mine.total();
                let unchanged = !full && heads.is_empty() && session.served_total == Some(mine_total);
                let they_have_more;
                let index = &mut self.devices;
                if full {
                    session.their_heads.clear();
                    for (d, n) in heads {
                        let Some(i) = index.number_or_insert(d) else { return self.too_many_devices(out, from) };
                        session.set_told(index, i, n); // a device listed twice: the last entry counts
                    }
                    session.their_total = saturating_sum(&session.their_heads);
                    session.complete_through = None;
                    session.full_heads_wanted_ms = None;
                    let their = &session.their_heads;
                    session.sent_ahead.retain(|d, (n, _)| told(index, their, d) < *n);
                    they_have_more = holds_more(index, &session.their_heads, mine);
                } else {
                    // Only the entries in this message can show something new the peer holds:
                    // earlier ones were looked at when they arrived.
                    they_have_more = heads.iter().any(|(d, n)| *n > mine.get(d).copied().unwrap_or(0));
                    for (d, n) in heads {
                        let Some(i) = index.number_or_insert(d) else { return self.too_many_devices(out, from) };
                        let h = session.their_heads.get(i).copied().unwrap_or(0);
                        let advanced = n > h;
                        if advanced {
                            session.their_total = session.their_total.saturating_add(n - h);
                            session.set_told(index, i, n);
                        }
                        match session.sent_ahead.get_mut(&d) {
                            Some((sent, _)) if *sent <= n => {
                                session.sent_ahead.remove(&d);
                            }
                            Some((_, since)) if advanced => *since = now_ms, // confirmed in part: still arriving
                            _ => {}
                        }
                    }
                }
                debug_assert_eq!(session.their_total, saturating_sum(&session.their_heads), "their_total is their heads' sum");
                let timeout = self.config.liveness_timeout_ms;
                let asked_lately = session.full_heads_wanted_ms.is_some_and(|at| now_ms.saturating_sub(at) <= timeout);
                if session.their_total != total && !asked_lately {
                    // A delta was lost (or overtaken by a later one): one full heads repairs the view.
                    session.full_heads_wanted_ms = Some(now_ms);
                    self.stats.full_heads_wanted += 1;
                    self.send(&mut out, &from, Message::HeadsWanted.encode(), now_ms);
                    return out;
                }
                if unchanged {
                    return out; // an idle heartbeat: nothing new on either side since the last one
                }
                let Some(session) = self.peers.get_mut(&from) else { return out };
                let pull = they_have_more && !session.pulling;
                session.served_total = Some(mine_total);
                self.serve(&mut out, &from, now_ms, mine, log);
                if pull {
                    self.send_heads(&mut out, &from, mine, now_ms, false);
                }
            }
            Message::HeadsWanted => self.send_heads(&mut out, &from, mine, now_ms, true),
            Message::Changes { changes, more } => {
                session.changes_in += changes.len() as u64;
                // The reply to a pull arrived; if the peer has more, `applied` pulls the next batch
                // with heads that include this one.
                session.pulling = false;
                session.more_available = more;
                self.stats.changes_received += changes.len() as u64;
                out.push(Output::Apply { from, changes });
            }
            Message::RightsWanted { sku, qty, for_sale } => out.push(Output::RightsWanted { from, sku, qty, for_sale }),
            Message::LoyaltyWanted { asset, qty } => out.push(Output::LoyaltyWanted { from, asset, qty }),
        }
        out
    }

    /// Sends `to` what it lacks according to its last heads, within the message limits.
    fn serve(&mut self, out: &mut Vec<Output<P>>, to: &P, now_ms: u64, mine: &Heads, log: &impl ChangeLog) {
        let Some(session) = self.peers.get(to) else { return };
        if session.in_flight_bytes >= MAX_IN_FLIGHT_BYTES_PER_PEER {
            self.stats.serving_paused += 1;
            return;
        }
        // The devices where the peer may lack something, in device order: after a complete serve
        // only those changed since (heads only grow, and the peer's only grow between full heads).
        let lacking: Vec<(DeviceId, u64, u64)> = match session.complete_through {
            Some(through) => {
                let mut v: Vec<(DeviceId, u64, u64)> = mine
                    .changed_since(through)
                    .filter_map(|(d, n)| {
                        let theirs = session.held(&self.devices, d);
                        (theirs < n).then_some((*d, theirs, n))
                    })
                    .collect();
                v.sort_unstable_by_key(|e| e.0);
                v
            }
            None => mine
                .iter()
                .filter_map(|(device, &my_next)| {
                    let their_next = session.held(&self.devices, device);
                    (their_next < my_next).then_some((*device, their_next, my_next))
                })
                .collect(),
        };
        let mut changes = Vec::new();
        let mut bytes = 0usize;
        let mut more = false;
        let mut cut_short = false;
        'devices: for (device, their_next, my_next) in lacking {
            let mut from = their_next;
            while from < my_next {
                let room = MAX_CHANGES_PER_MESSAGE - changes.len();
                if room == 0 {
                    more = true;
                    break 'devices;
                }
                let batch = match log.changes_since(&device, from, room.min((my_next - from) as usize)) {
                    Ok(b) if !b.is_empty() => b,
                    Ok(_) => {
                        cut_short = true; // the log holds less than the heads say: look again next time
                        break;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read changes to serve a peer");
                        cut_short = true;
                        break 'devices;
                    }
                };
                for c in batch {
                    let size = c.encoded_len() + 8;
                    if bytes + size > MAX_CHANGE_BYTES_PER_MESSAGE {
                        more = true;
                        break 'devices;
                    }
                    bytes += size;
                    from = c.seq + 1;
                    changes.push(c);
                }
            }
        }
        if let Some(s) = self.peers.get_mut(to) {
            s.complete_through = if more || cut_short { None } else { Some(mine.total()) };
        }
        if changes.is_empty() {
            return;
        }
        let n = changes.len() as u64;
        if let Some(s) = self.peers.get_mut(to) {
            s.changes_out += n;
            // Assume delivery until the peer's heads say otherwise, so the next heartbeat does not
            // resend the same changes.
            // The clock starts at the first unconfirmed send: serving newer changes of a device must
            // not keep postponing the repair of an older one that was lost.
            for c in &changes {
                let e = s.sent_ahead.entry(c.device).or_insert((0, now_ms));
                e.0 = e.0.max(c.seq + 1);
            }
        }
        self.stats.changes_sent += n;
        self.send(out, to, Message::Changes { changes, more }.encode(), now_ms);
    }

    /// The driver applied what `from` sent. Pull again if changes are still missing (a gap left
    /// changes pending, or the peer said it had more).
    pub fn applied(&mut self, from: &P, still_pending: usize, now_ms: u64, mine: &Heads) -> Vec<Output<P>> {
        let mut out = Vec::new();
        let Some(s) = self.peers.get(from) else { return out };
        // (A peer known to hold more is served on our next heads anyway; no scan over every device here.)
        if (still_pending > 0 || s.more_available) && !s.pulling {
            self.send_heads(&mut out, from, mine, now_ms, false);
        }
        out
    }

    /// New local changes: broadcast them at once, in bounded messages.
    pub fn local_changes(&mut self, changes: Vec<SignedChange>) -> Vec<Output<P>> {
        let mut out = Vec::new();
        for chunk in changes.chunks(MAX_CHANGES_PER_MESSAGE) {
            let bytes = Message::Changes { changes: chunk.to_vec(), more: false }.encode();
            self.stats.messages_out += 1;
            self.stats.bytes_out += bytes.len() as u64;
            self.stats.changes_sent += chunk.len() as u64;
            out.push(Output::Broadcast { bytes });
        }
        out
    }

    /// Asks every connected peer for stock rights (`for_sale`: a customer waits for them).
    pub fn want_rights(&mut self, sku: &str, qty: u64, for_sale: bool, now_ms: u64) -> Vec<Output<P>> {
        self.ask_everyone(Message::RightsWanted { sku: sku.to_string(), qty, for_sale }, now_ms)
    }

    /// Asks every connected peer for `qty` of a card's points or a voucher (only holders answer,
    /// with a transfer).
    pub fn want_loyalty(&mut self, asset: stallmesh_ledger::LoyaltyAsset, qty: u64, now_ms: u64) -> Vec<Output<P>> {
        self.ask_everyone(Message::LoyaltyWanted { asset, qty }, now_ms)
    }

    fn ask_everyone(&mut self, message: Message, now_ms: u64) -> Vec<Output<P>> {
        let mut out = Vec::new();
        let bytes = message.encode();
        let peers: Vec<P> = self.peers.keys().cloned().collect();
        for p in peers {
            self.send(&mut out, &p, bytes.clone(), now_ms);
        }
        out
    }

    /// The earliest `now_ms` at which [`Sync::tick`] does anything: a heartbeat due
    /// (`last_sent_ms + heartbeat_ms`), a peer silent past the liveness timeout
    /// (`last_heard_ms + liveness_timeout_ms + 1`: silence is *longer* than the timeout), or served
    /// changes unconfirmed past it (the oldest `sent_ahead` entry, likewise). Before it `tick` sends
    /// nothing and changes nothing; a driver sleeps until it (or until bytes arrive) and calls
    /// `tick` then, and asks again after every call into the core, since each may move it (a
    /// `receive` that returns no outputs only ever moves it later: it heard from a peer). `None`:
    /// no peers, nothing will ever be due. A time already past (a clock that jumped forward) means
    /// tick now. O(peers + unconfirmed devices).
    pub fn poll_timeout(&self) -> Option<u64> {
        let timeout = self.config.liveness_timeout_ms;
        self.peers
            .values()
            .map(|s| {
                let heartbeat = s.last_sent_ms.saturating_add(self.config.heartbeat_ms);
                let silent = s.last_heard_ms.saturating_add(timeout).saturating_add(1);
                let unconfirmed = s.sent_ahead.values().map(|(_, at)| at.saturating_add(timeout).saturating_add(1)).min();
                heartbeat.min(silent).min(unconfirmed.unwrap_or(u64::MAX))
            })
            .min()
    }

    /// Time passes: heartbeat heads to peers not written to lately; drop peers silent too long.
    /// Does nothing before [`Sync::poll_timeout`].
    pub fn tick(&mut self, now_ms: u64, mine: &Heads) -> Vec<Output<P>> {
        let mut out = Vec::new();
        let timeout = self.config.liveness_timeout_ms;
        let silent: Vec<P> = if !self.peers.values().any(|s| now_ms.saturating_sub(s.last_heard_ms) > timeout) {
            Vec::new()
        } else {
            self.peers.iter().filter(|(_, s)| now_ms.saturating_sub(s.last_heard_ms) > timeout).map(|(p, _)| p.clone()).collect()
        };
        for p in silent {
            self.peers.remove(&p);
            self.stats.liveness_disconnects += 1;
            out.push(Output::Disconnect { peer: p, reason: "silent past the liveness timeout".into() });
        }
        for s in self.peers.values_mut() {
            let before = s.sent_ahead.len();
            s.sent_ahead.retain(|_, (_, at)| now_ms.saturating_sub(*at) <= timeout);
            if s.sent_ahead.len() != before {
                // Served, never confirmed: serve those devices again on the peer's next heads.
                self.stats.unconfirmed_expired += (before - s.sent_ahead.len()) as u64;
                s.complete_through = None;
                s.served_total = None;
            }
        }
        let heartbeat_ms = self.config.heartbeat_ms;
        let since_sent = |s: &PeerSession| now_ms.saturating_sub(s.last_sent_ms);
        let due: Vec<P> = if self.peers.values().any(|s| since_sent(s) >= heartbeat_ms) {
            // Peers due soon go out with this one: a driver woken at `poll_timeout` is then woken
            // about once a round, not once per peer.
            let early_ms = heartbeat_ms - heartbeat_ms / HEARTBEAT_COALESCE_DIVISOR;
            self.peers.iter().filter(|(_, s)| since_sent(s) >= early_ms).map(|(p, _)| p.clone()).collect()
        } else {
            Vec::new()
        };
        for p in due {
            // A heartbeat is also a pull; a lost reply must not block the next one.
            self.send_heads(&mut out, &p, mine, now_ms, false);
        }
        out
    }
}

/// Whether `theirs` (a peer's heads by device number) names an entry `mine` lacks.
fn holds_more(index: &DeviceIndex, theirs: &[u64], mine: &Heads) -> bool {
    theirs.iter().zip(&index.ids).any(|(n, d)| *n > mine.get(d).copied().unwrap_or(0))
}

/// The sum of a peer's heads, at most `u64::MAX` (a peer may send any counts).
fn saturating_sum(heads: &[u64]) -> u64 {
    heads.iter().fold(0u64, |t, n| t.saturating_add(*n))
}

#[cfg(test)]
mod tests;

/// A [`ChangeLog`] in memory: for tests and the simulator.
#[derive(Debug, Default, Clone)]
pub struct MemoryLog {
    changes: BTreeMap<DeviceId, Vec<SignedChange>>,
}

impl MemoryLog {
    /// Records a change this node holds. Changes of one device must be added in seq order.
    pub fn add(&mut self, change: SignedChange) {
        let journal = self.changes.entry(change.device).or_default();
        if change.seq == journal.len() as u64 {
            journal.push(change);
        }
    }

    pub fn len(&self) -> usize {
        self.changes.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ChangeLog for MemoryLog {
    fn changes_since(&self, device: &DeviceId, from_seq: u64, limit: usize) -> Result<Vec<SignedChange>, String> {
        Ok(self.changes.get(device).map(|j| j.iter().skip(from_seq as usize).take(limit).cloned().collect()).unwrap_or_default())
    }
}
