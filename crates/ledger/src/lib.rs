//! The market ledger: a sans-IO state machine.
//!
//! Inputs are local operations, signed changes from peers, and the time (`now_ms`) supplied by the
//! driver; outputs are [`Entry`]s (signed change + decoded event) that the driver must make durable,
//! and typed errors. Nothing here touches a socket, a file, a clock or an executor, so the node, the
//! tests and the simulator all run exactly this code.
//!
//! ## Shape of the replicated data
//! Each device writes only to its own **journal**: a chain of changes numbered 0, 1, 2, ... Entry 0
//! is its enrolment certificate. The journal is stored as automerge documents, one per *segment* of
//! [`SEGMENT_CHANGES`] entries, whose actor is the device's public key. Because a document never
//! grows past one segment, the cost of applying a change stays flat however long the day runs
//! (automerge's per-change cost grows with the document: 0.5 ms at 1k changes, 31 ms at 100k).
//!
//! ## Stock rights
//! Stock is held as per-device rights (the escrow / bounded-counter idea): a restock adds rights to
//! its author, a sale or transfer spends the author's own rights, a transfer adds rights to its
//! recipient. A device can only spend what its own journal and the transfers it has seen give it,
//! and every change names the transfers it relied on (`causal`), which peers apply first. So no
//! replica, in any merge order, ever sees negative rights.

pub mod event;
pub mod state;
pub mod testkit;
pub mod validate;

pub use event::{DecodeError, Event, EventBody, Product, RecommendationShown, SaleLine};
pub use state::{sale_id, DeviceRecord, FoldError, PhotoRecord, ProductRecord, Sale, SalesSummary, State, StockView};

use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ActorId, Automerge, Change, ChangeHash, ObjId, ObjType, ReadDoc, ROOT};
use stallmesh_identity::{Certificate, ChangeDigest, DeviceId, DeviceKey, Dot, MarketId, MarketPublicKey, Revocation, SignedChange};
use std::collections::{BTreeMap, BTreeSet};

/// Entries per journal document. Small enough that applying one change costs well under a
/// millisecond; large enough that a day of a busy device spans only a few hundred documents.
pub const SEGMENT_CHANGES: u64 = 256;
/// Changes held while waiting for a gap or a causal dependency to be filled. Beyond this, a change
/// is rejected (`PendingFull`) and must be re-sent by sync; bounded so a peer cannot exhaust memory.
pub const MAX_PENDING_CHANGES: usize = 10_000;
/// Journal documents kept in memory per replica (least recently used are dropped and rebuilt from
/// their raw changes on demand): bounds memory in a market of hundreds of devices.
pub const MAX_OPEN_SEGMENT_DOCS: usize = 128;
/// Changes held for a device whose enrolment has not arrived: a stranger cannot fill the buffer.
pub const MAX_PENDING_PER_UNENROLLED: usize = SEGMENT_CHANGES as usize;
/// Largest automerge change accepted. A 100-line sale encodes to ~3 KB.
pub const MAX_CHANGE_BYTES: usize = 64 * 1024;
/// Most causal dependencies on one change (one per transfer received since the author's last change).
pub const MAX_CAUSAL_DOTS: usize = 1_024;
/// Lines in one sale: a market basket, not a warehouse order.
pub const MAX_SALE_LINES: usize = 100;
/// Units in one line, restock or transfer.
pub const MAX_QTY: u64 = 1_000_000;
/// A price above €10M per unit is a typo.
pub const MAX_PRICE_CENTS: u64 = 1_000_000_000;
pub const MAX_SKU_LEN: usize = 64;
pub const MAX_NAME_LEN: usize = 200;
pub const MAX_TAGS: usize = 16;
pub const MAX_TAG_LEN: usize = 32;
pub const MAX_CLIENT_REF_LEN: usize = 64;
/// Largest product photo in the journal: it must fit in one change ([`MAX_CHANGE_BYTES`]) with room
/// for the signature and ids. Nodes shrink photos to a 256-pixel JPEG (10–30 KB) before recording.
pub const MAX_PHOTO_BYTES: usize = 48 * 1024;
/// Most recommended SKUs recorded on one sale.
pub const MAX_RECOMMENDED: usize = 20;
/// Different changes kept as evidence for one journal position: two is proof; a few more show how
/// many copies of a device's credentials are signing. Beyond it a conflict is still counted.
pub const MAX_EVIDENCE_PER_POSITION: usize = 4;
/// Conflicting changes kept as evidence in all: a cloned tablet selling all day yields one per sale;
/// bounded so a device signing garbage histories cannot exhaust memory. Beyond it, counted.
pub const MAX_EVIDENCE_CHANGES: usize = 4_096;

/// For each device, the journal entries a replica holds (= the next seq it expects), with their
/// total kept alongside: heads only grow, so an unchanged total means unchanged heads.
///
/// Each device is also indexed by the total at which its entry last grew, so "which devices changed
/// since total T" costs the number of changes, not the number of devices: in a 1,000-device market
/// one sale changes one entry, and the sync core must not walk all 1,000 for every peer.
#[derive(Debug, Clone, Default)]
pub struct Heads {
    map: BTreeMap<DeviceId, u64>,
    total: u64,
    /// Total right after the device's entry last grew → the device. Totals only grow, so keys are unique.
    by_change: BTreeMap<u64, DeviceId>,
    changed_at: BTreeMap<DeviceId, u64>,
}

impl PartialEq for Heads {
    fn eq(&self, other: &Self) -> bool {
        self.map == other.map // the same entries, whatever order they arrived in
    }
}

impl Eq for Heads {}

impl Heads {
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The devices whose entry grew after the heads' total was `total`, with their current entry,
    /// most recently changed last.
    pub fn changed_since(&self, total: u64) -> impl Iterator<Item = (&DeviceId, u64)> + '_ {
        self.by_change.range(total.saturating_add(1)..).map(|(_, d)| (d, self.map.get(d).copied().unwrap_or(0)))
    }

    fn set(&mut self, device: DeviceId, next: u64) {
        let old = self.map.get(&device).copied().unwrap_or(0);
        assert!(next >= old, "heads only grow: {device:?} from {old} to {next}");
        if next == old {
            return;
        }
        self.map.insert(device, next);
        self.total += next - old;
        if let Some(at) = self.changed_at.insert(device, self.total) {
            self.by_change.remove(&at);
        }
        self.by_change.insert(self.total, device);
    }
}

impl std::ops::Deref for Heads {
    type Target = BTreeMap<DeviceId, u64>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl FromIterator<(DeviceId, u64)> for Heads {
    fn from_iter<I: IntoIterator<Item = (DeviceId, u64)>>(iter: I) -> Self {
        let mut h = Heads::default();
        for (d, n) in iter {
            h.set(d, n);
        }
        h
    }
}

/// A signed change and the event it carries: what the driver persists, and what peers receive.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Entry {
    pub change: SignedChange,
    pub event: Event,
}

/// What the market is: its id and the key that signs enrolments.
#[derive(Debug, Clone)]
pub struct MarketContext {
    pub market: MarketId,
    pub market_key: MarketPublicKey,
}

impl MarketContext {
    pub fn new(market_key: MarketPublicKey) -> Self {
        Self { market: market_key.market_id(), market_key }
    }
}

/// A local operation requested by staff (through the API, CLI or simulator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalOp {
    UpsertProduct(Product),
    Restock {
        sku: String,
        qty: u64,
    },
    Transfer {
        sku: String,
        qty: u64,
        to: DeviceId,
    },
    Sell {
        lines: Vec<LineRequest>,
        client_ref: Option<String>,
        recommendation: Option<RecommendationShown>,
    },
    /// Attaches (or replaces) a product's photo: a JPEG of at most [`MAX_PHOTO_BYTES`].
    AttachPhoto {
        sku: String,
        jpeg: Vec<u8>,
    },
    Revoke(Revocation),
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LineRequest {
    pub sku: String,
    pub qty: u64,
}

/// Why a local operation was refused. Nothing changed.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum LedgerError {
    #[error("unknown SKU {0:?}")]
    UnknownSku(String),
    #[error("unknown device {0}")]
    UnknownDevice(DeviceId),
    #[error("invalid {field}: {problem}")]
    Invalid { field: &'static str, problem: String },
    #[error(
        "not enough stock rights for {sku}: asked {requested}, this device holds {held_here}, other devices hold {held_elsewhere_total}"
    )]
    InsufficientRights { sku: String, requested: u64, held_here: u64, held_elsewhere_total: u64, held_elsewhere: BTreeMap<DeviceId, u64> },
    #[error("sale mixes currencies {0} and {1}")]
    MixedCurrency(String, String),
    #[error("sale with client_ref {client_ref:?} was already recorded as {sale_id}")]
    AlreadyRecorded { client_ref: String, sale_id: String },
    #[error("this device has no enrolment entry yet")]
    NotEnrolled,
    #[error("this device was revoked by the market")]
    Revoked,
    #[error(
        "another tablet signs with this device's credentials (two different journals of this device were seen): \
         this tablet stops recording; have the organiser enrol it afresh and revoke the old device"
    )]
    Cloned,
    #[error("certificate of this device: {0}")]
    Certificate(stallmesh_identity::IdentityError),
    #[error("revocation: {0}")]
    BadRevocation(stallmesh_identity::IdentityError),
    #[error("this device is an organiser-less seller of stall {own:?} and cannot change products of stall {other:?}")]
    OtherStall { own: String, other: String },
}

/// Why a remote change was rejected. The label is stable, for metrics.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum Rejection {
    #[error("change is for another market")]
    WrongMarket,
    #[error("change of {0} bytes exceeds the limit")]
    Oversized(usize),
    #[error("signature does not verify")]
    BadSignature,
    #[error("author has no valid enrolment in this market")]
    Unenrolled,
    #[error("enrolment rejected: {0}")]
    BadEnrolment(String),
    #[error("author was revoked")]
    Revoked,
    #[error("automerge actor is not the signing device")]
    WrongActor,
    #[error("malformed automerge change: {0}")]
    Malformed(String),
    #[error("change does not extend the author's journal: {0}")]
    BrokenChain(String),
    #[error("the author signed two different changes for one journal position (cloned or reset credentials)")]
    Equivocation,
    #[error("{0}")]
    Fold(FoldError),
    #[error("pending buffer full ({MAX_PENDING_CHANGES} changes)")]
    PendingFull,
}

impl Rejection {
    pub fn label(&self) -> &'static str {
        match self {
            Rejection::WrongMarket => "wrong_market",
            Rejection::Oversized(_) => "oversized",
            Rejection::BadSignature => "bad_signature",
            Rejection::Unenrolled => "unenrolled",
            Rejection::BadEnrolment(_) => "bad_enrolment",
            Rejection::Revoked => "revoked",
            Rejection::WrongActor => "wrong_actor",
            Rejection::Malformed(_) => "malformed",
            Rejection::BrokenChain(_) => "broken_chain",
            Rejection::Equivocation => "equivocation",
            Rejection::Fold(_) => "invalid_event",
            Rejection::PendingFull => "pending_full",
        }
    }
}

/// The outcome of [`Ledger::apply_remote`].
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// Newly applied, in the order applied (a causal order): persist them in this order.
    pub applied: Vec<Entry>,
    /// Already held, byte for byte: ignored.
    pub duplicates: usize,
    /// Validly signed changes that contradict the journal held (equivocation), newly kept as
    /// evidence in this call: the driver persists them and passes them on, so every replica sees both.
    pub evidence: Vec<SignedChange>,
    /// Held back until a gap or a causal dependency is filled.
    pub pending: usize,
    pub rejected: Vec<(Dot, Rejection)>,
}

/// Why a store's contents could not be restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RestoreError {
    #[error("journal of {device} jumps from {expected} to {found}")]
    Gap { device: DeviceId, expected: u64, found: u64 },
    #[error("entry {dot:?} does not fold: {error}")]
    Fold { dot: Dot, error: FoldError },
}

struct SegmentDoc {
    doc: Automerge,
    events: Option<ObjId>,
}

/// One device's journal as this replica holds it.
#[derive(Default)]
struct Journal {
    next_seq: u64,
    /// Digest of every held change, by seq: a change at a held position is a duplicate only if it
    /// is this very change.
    digests: Vec<ChangeDigest>,
    /// Raw changes of the current segment, so its document can be rebuilt on demand.
    segment_changes: Vec<bytes::Bytes>,
    doc: Option<SegmentDoc>,
}

impl Journal {
    fn segment_index(seq: u64) -> usize {
        (seq % SEGMENT_CHANGES) as usize
    }

    /// The document of the current segment, built from its raw changes if not in memory.
    fn doc(&mut self, actor: &DeviceId) -> Result<&mut SegmentDoc, String> {
        if self.doc.is_none() {
            let mut doc = Automerge::new().with_actor(ActorId::from(&actor.0[..]));
            let changes = self
                .segment_changes
                .iter()
                .map(|b| Change::from_bytes(b.to_vec()).map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, _>>()?;
            doc.apply_changes(changes).map_err(|e| e.to_string())?;
            let events = events_list(&doc);
            self.doc = Some(SegmentDoc { doc, events });
        }
        Ok(self.doc.as_mut().expect("just built"))
    }

    fn advance(&mut self, change: &SignedChange) {
        debug_assert_eq!(change.seq, self.next_seq, "a journal grows one position at a time");
        let change_bytes = change.change.clone();
        self.digests.push(change.digest());
        if Self::segment_index(self.next_seq) == 0 {
            self.segment_changes.clear();
        }
        self.segment_changes.push(change_bytes);
        self.next_seq += 1;
        if Self::segment_index(self.next_seq) == 0 {
            // Segment complete: its document is never written again; free it.
            self.doc = None;
            self.segment_changes.clear();
        }
    }
}

/// Most operations replayed from one change when reading it on its own (a 100-line sale takes
/// about 500); a change is at most [`MAX_CHANGE_BYTES`] anyway.
const MAX_STANDALONE_OPS: usize = 20_000;

/// The journal event `change` carries, read from the change alone: every change appends exactly
/// one event, built entirely by its own operations, so the event can be replayed into an empty
/// document without the journal before it. This is how a replica shows what a conflicting change
/// (never applied, its history not held) recorded.
pub fn decode_change_event(change: &SignedChange) -> Result<Event, String> {
    if change.change.len() > MAX_CHANGE_BYTES {
        return Err(format!("change of {} bytes exceeds the limit", change.change.len()));
    }
    // automerge's expansion asserts on inputs it considers impossible, and the bytes are a peer's.
    std::panic::catch_unwind(|| replay_event(change)).unwrap_or_else(|_| Err("the change's operations do not expand".into()))
}

fn replay_event(change: &SignedChange) -> Result<Event, String> {
    use automerge::legacy::{Key, ObjectId, OpId, OpType};
    let am = Change::from_bytes(change.change.to_vec()).map_err(|e| e.to_string())?;
    let expanded = am.decode();
    let ops = &expanded.operations;
    if ops.len() > MAX_STANDALONE_OPS {
        return Err(format!("{} operations, more than an event has", ops.len()));
    }
    let actor = expanded.actor_id.clone();
    let start_op = expanded.start_op.get();
    start_op.checked_add(ops.len() as u64).ok_or("operation counter overflows")?;
    let id_of = |i: usize| ObjectId::Id(OpId(start_op + i as u64, actor.clone()));
    // The event: the map this change inserts into a list it did not create.
    let event_op =
        ops.iter().position(|o| o.insert && matches!(o.action, OpType::Make(ObjType::Map))).ok_or("the change inserts no journal event")?;
    let mut doc = Automerge::new();
    let mut tx = doc.transaction();
    let am_err = |e: automerge::AutomergeError| e.to_string();
    let list = tx.put_object(ROOT, "events", ObjType::List).map_err(am_err)?;
    let map = tx.insert_object(&list, 0, ObjType::Map).map_err(am_err)?;
    // (object in the change, its copy here): each object is made before what it contains.
    let mut work = vec![(id_of(event_op), map)];
    // Each object is replayed once: a crafted change whose objects contain each other is refused,
    // not walked forever.
    let mut replayed = std::collections::HashSet::new();
    while let Some((src, dst)) = work.pop() {
        if !replayed.insert(src.clone()) || replayed.len() > ops.len() {
            return Err("the change's objects contain each other".into());
        }
        let mut index = 0;
        for (i, op) in ops.iter().enumerate().filter(|(_, o)| o.obj == src) {
            let made = match (&op.key, &op.action) {
                (Key::Map(k), OpType::Put(v)) => tx.put(&dst, k.as_str(), v.clone()).map(|_| None),
                (Key::Map(k), OpType::Make(t)) => tx.put_object(&dst, k.as_str(), *t).map(Some),
                (Key::Seq(_), OpType::Put(v)) if op.insert => tx.insert(&dst, index, v.clone()).map(|_| None),
                (Key::Seq(_), OpType::Make(t)) if op.insert => tx.insert_object(&dst, index, *t).map(Some),
                _ => return Err("the change does more than append one event".into()),
            }
            .map_err(am_err)?;
            if matches!(op.key, Key::Seq(_)) {
                index += 1;
            }
            if let Some(child) = made {
                work.push((id_of(i), child));
            }
        }
    }
    tx.commit();
    event::read_event(&doc, &list, 0).map_err(|e| e.to_string())
}

fn events_list(doc: &Automerge) -> Option<ObjId> {
    match doc.get(ROOT, "events") {
        Ok(Some((automerge::Value::Object(ObjType::List), id))) => Some(id),
        _ => None,
    }
}

/// Counters a driver exports as metrics.
#[derive(Debug, Default, Clone)]
pub struct LedgerStats {
    pub applied_remote: u64,
    pub duplicates: u64,
    /// Conflicting changes seen (each distinct one once), recorded or not.
    pub equivocations: u64,
    /// Conflicting changes not kept because an evidence limit was reached.
    pub evidence_not_kept: u64,
    pub rejected: BTreeMap<&'static str, u64>,
}

pub struct Ledger {
    ctx: MarketContext,
    key: DeviceKey,
    me: DeviceId,
    certificate: Certificate,
    journals: BTreeMap<DeviceId, Journal>,
    pending: BTreeMap<Dot, SignedChange>,
    /// Journal entries held per device (= `journals[d].next_seq`), kept alongside for cheap reads.
    heads: Heads,
    state: State,
    lamport: u64,
    /// Transfers to this device applied since its last change: its next change depends on them.
    unreferenced_transfers_in: Vec<Dot>,
    /// Devices whose journal document is in memory, least recently used first.
    open_docs: std::collections::VecDeque<DeviceId>,
    stats: LedgerStats,
    /// Changes that contradict the journal held at their position (or the history it follows):
    /// position → the distinct conflicting changes, each verified as signed by its device.
    evidence: BTreeMap<Dot, Vec<SignedChange>>,
    evidence_changes: usize,
    /// Devices with evidence against them: two histories signed with one key.
    forked: BTreeSet<DeviceId>,
    /// Test-only fault injection for the simulator's checker: let this device spend rights it does
    /// not hold. Never set in a node.
    pub allow_overspend_for_tests: bool,
}

impl Ledger {
    /// A ledger for device `key`, enrolled by `certificate` in market `ctx`, holding nothing yet.
    pub fn new(ctx: MarketContext, key: DeviceKey, certificate: Certificate) -> Self {
        let me = key.device_id();
        Self {
            ctx,
            key,
            me,
            certificate,
            journals: BTreeMap::new(),
            pending: BTreeMap::new(),
            heads: Heads::default(),
            state: State::default(),
            lamport: 0,
            unreferenced_transfers_in: Vec::new(),
            open_docs: std::collections::VecDeque::new(),
            stats: LedgerStats::default(),
            evidence: BTreeMap::new(),
            evidence_changes: 0,
            forked: BTreeSet::new(),
            allow_overspend_for_tests: false,
        }
    }

    /// Rebuilds the ledger from entries a store returns, in the order they were first applied.
    /// The store is trusted (every entry was verified before it was written; rows are checksummed),
    /// so signatures are not checked again: that keeps a cold start of a 100k-sale day fast.
    pub fn restore(
        ctx: MarketContext,
        key: DeviceKey,
        certificate: Certificate,
        entries: impl IntoIterator<Item = Entry>,
    ) -> Result<Self, RestoreError> {
        let mut ledger = Self::new(ctx, key, certificate);
        for entry in entries {
            let dot = entry.change.dot();
            let journal = ledger.journals.entry(dot.device).or_default();
            if dot.seq != journal.next_seq {
                return Err(RestoreError::Gap { device: dot.device, expected: journal.next_seq, found: dot.seq });
            }
            if let Err(error) = ledger.state.check(dot, &entry.event) {
                return Err(RestoreError::Fold { dot, error });
            }
            journal.advance(&entry.change);
            ledger.advanced(dot.device);
            ledger.after_fold(dot, &entry.event);
        }
        Ok(ledger)
    }

    pub fn device(&self) -> DeviceId {
        self.me
    }
    pub fn market(&self) -> &MarketContext {
        &self.ctx
    }
    pub fn certificate(&self) -> &Certificate {
        &self.certificate
    }
    pub fn state(&self) -> &State {
        &self.state
    }
    pub fn stats(&self) -> &LedgerStats {
        &self.stats
    }
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Conflicting changes kept as evidence, by journal position (see [`ApplyReport::evidence`]).
    pub fn evidence(&self) -> &BTreeMap<Dot, Vec<SignedChange>> {
        &self.evidence
    }

    /// Devices seen signing two different histories.
    pub fn forked_devices(&self) -> &BTreeSet<DeviceId> {
        &self.forked
    }

    /// Whether another holder of this device's key signed a different journal: then this ledger
    /// records nothing more (its sales would spend rights the other copy spends too).
    pub fn is_cloned(&self) -> bool {
        self.forked.contains(&self.me)
    }

    /// The digest of the change held at `dot`, if held.
    pub fn held_digest(&self, dot: Dot) -> Option<ChangeDigest> {
        self.journals.get(&dot.device)?.digests.get(usize::try_from(dot.seq).ok()?).copied()
    }

    /// Puts back evidence a driver persisted (after [`Ledger::restore`]); each change was verified
    /// when it was first kept.
    pub fn restore_evidence(&mut self, changes: impl IntoIterator<Item = SignedChange>) {
        for c in changes {
            self.keep_evidence(c);
        }
    }

    /// Keeps `change` as evidence unless the same change is already kept; returns whether it was new.
    fn keep_evidence(&mut self, change: SignedChange) -> bool {
        let dot = change.dot();
        let digest = change.digest();
        let kept = self.evidence.get(&dot).is_some_and(|v| v.iter().any(|c| c.digest() == digest));
        if kept {
            return false;
        }
        self.forked.insert(dot.device);
        self.stats.equivocations += 1;
        let per_position = self.evidence.get(&dot).map_or(0, Vec::len);
        if per_position >= MAX_EVIDENCE_PER_POSITION || self.evidence_changes >= MAX_EVIDENCE_CHANGES {
            self.stats.evidence_not_kept += 1;
            return false;
        }
        self.evidence.entry(dot).or_default().push(change);
        self.evidence_changes += 1;
        true
    }

    /// For each device, how many journal entries this replica holds (= the next seq it expects).
    pub fn heads(&self) -> Heads {
        self.heads.clone()
    }

    /// [`Ledger::heads`] without a copy, for hot paths (every sync message consults it).
    pub fn heads_ref(&self) -> &Heads {
        &self.heads
    }

    /// Marks `device`'s journal document as used; drops the least recently used beyond the bound
    /// (never this device's own, which every local operation writes to).
    fn touch_doc(&mut self, device: DeviceId) {
        if let Some(i) = self.open_docs.iter().position(|d| *d == device) {
            self.open_docs.remove(i);
        }
        self.open_docs.push_back(device);
        while self.open_docs.len() > MAX_OPEN_SEGMENT_DOCS {
            let Some(old) = self.open_docs.pop_front() else { break };
            if old == self.me {
                self.open_docs.push_back(old);
                if self.open_docs.len() == 1 {
                    break;
                }
                continue;
            }
            if let Some(j) = self.journals.get_mut(&old) {
                j.doc = None;
            }
        }
    }

    /// Drops every journal document from memory (they are rebuilt on demand).
    #[cfg(test)]
    fn drop_docs(&mut self) {
        for j in self.journals.values_mut() {
            j.doc = None;
        }
        self.open_docs.clear();
    }

    fn advanced(&mut self, device: DeviceId) {
        let next = self.journals.get(&device).map_or(0, |j| j.next_seq);
        self.heads.set(device, next);
    }

    /// Writes this device's enrolment as journal entry 0 if it has none yet.
    pub fn enrol_self(&mut self, now_ms: u64) -> Result<Option<Entry>, LedgerError> {
        if self.journals.get(&self.me).is_some_and(|j| j.next_seq > 0) {
            return Ok(None);
        }
        self.certificate.verify(&self.ctx.market_key, now_ms).map_err(LedgerError::Certificate)?;
        let body = EventBody::Enrolled { certificate: self.certificate.clone() };
        self.commit_local(Event { time_ms: now_ms, body }).map(Some)
    }

    /// Validates and records a local operation. The returned entry must be persisted before the
    /// operation is acknowledged to anyone.
    pub fn record(&mut self, op: LocalOp, now_ms: u64) -> Result<Entry, LedgerError> {
        if self.journals.get(&self.me).is_none_or(|j| j.next_seq == 0) {
            return Err(LedgerError::NotEnrolled);
        }
        if self.state.devices.get(&self.me).is_some_and(|d| d.revoked_at_ms.is_some()) {
            return Err(LedgerError::Revoked);
        }
        if self.is_cloned() {
            return Err(LedgerError::Cloned);
        }
        self.certificate.verify(&self.ctx.market_key, now_ms).map_err(LedgerError::Certificate)?;
        let body = self.validate(op)?;
        self.commit_local(Event { time_ms: now_ms, body })
    }

    fn validate(&self, op: LocalOp) -> Result<EventBody, LedgerError> {
        let limits =
            |body: &EventBody| validate::check_event_body(body).map_err(|e| LedgerError::Invalid { field: e.field, problem: e.problem });
        let known = |sku: &str| -> Result<&ProductRecord, LedgerError> {
            self.state.products.get(sku).ok_or_else(|| LedgerError::UnknownSku(sku.to_string()))
        };
        // A peer's product may have pushed the clock to its end: refuse rather than wrap.
        let next_lamport = || {
            self.lamport.checked_add(1).ok_or(LedgerError::Invalid { field: "lamport", problem: "the catalogue clock is exhausted".into() })
        };
        Ok(match op {
            LocalOp::UpsertProduct(p) => {
                let stall = p.stall.clone();
                let body = EventBody::ProductUpserted { product: p, lamport: next_lamport()? };
                limits(&body)?;
                if self.certificate.role == stallmesh_identity::Role::Seller && stall != self.certificate.stall {
                    return Err(LedgerError::OtherStall { own: self.certificate.stall.clone(), other: stall });
                }
                body
            }
            LocalOp::Restock { sku, qty } => {
                let body = EventBody::Restocked { sku: sku.clone(), qty };
                limits(&body)?;
                known(&sku)?;
                body
            }
            LocalOp::Transfer { sku, qty, to } => {
                let body = EventBody::Transferred { sku: sku.clone(), qty, to };
                limits(&body)?;
                known(&sku)?;
                if to == self.me {
                    return Err(LedgerError::Invalid { field: "to_device", problem: "cannot transfer to this device itself".into() });
                }
                match self.state.devices.get(&to) {
                    None => return Err(LedgerError::UnknownDevice(to)),
                    Some(d) if d.revoked_at_ms.is_some() => return Err(LedgerError::UnknownDevice(to)),
                    Some(_) => {}
                }
                self.check_rights(&sku, qty)?;
                body
            }
            LocalOp::AttachPhoto { sku, jpeg } => {
                let body = EventBody::PhotoAttached { sku: sku.clone(), jpeg, lamport: next_lamport()? };
                limits(&body)?;
                let p = known(&sku)?;
                if self.certificate.role == stallmesh_identity::Role::Seller && p.product.stall != self.certificate.stall {
                    return Err(LedgerError::OtherStall { own: self.certificate.stall.clone(), other: p.product.stall.clone() });
                }
                body
            }
            LocalOp::Sell { lines, client_ref, recommendation } => {
                if let Some(r) = &client_ref {
                    if let Some(sale_id) = self.state.sale_by_client_ref(&self.me, r) {
                        return Err(LedgerError::AlreadyRecorded { client_ref: r.clone(), sale_id: sale_id.to_string() });
                    }
                }
                let mut sale_lines = Vec::with_capacity(lines.len());
                let mut currency: Option<&str> = None;
                for l in &lines {
                    let p = known(&l.sku)?;
                    match currency {
                        None => currency = Some(&p.product.currency),
                        Some(c) if c != p.product.currency => {
                            return Err(LedgerError::MixedCurrency(c.to_string(), p.product.currency.clone()))
                        }
                        Some(_) => {}
                    }
                    sale_lines.push(SaleLine { sku: l.sku.clone(), qty: l.qty, price_cents: p.product.price_cents });
                }
                let body = EventBody::Sold {
                    // An overflowing sum is refused by the limits just below.
                    total_cents: validate::sale_total_cents(&sale_lines).unwrap_or(u64::MAX),
                    lines: sale_lines,
                    currency: currency.unwrap_or("EUR").to_string(),
                    client_ref,
                    recommendation,
                };
                limits(&body)?;
                if !self.allow_overspend_for_tests {
                    let mut per_sku: BTreeMap<&str, u64> = BTreeMap::new();
                    for l in &lines {
                        let units = per_sku.entry(&l.sku).or_default();
                        *units = units.checked_add(l.qty).expect("limits bound a sale's units: MAX_QTY * MAX_SALE_LINES fits u64");
                    }
                    for (sku, q) in per_sku {
                        self.check_rights(sku, q)?;
                    }
                }
                body
            }
            LocalOp::Revoke(revocation) => {
                revocation.verify(&self.ctx.market_key).map_err(LedgerError::BadRevocation)?;
                EventBody::Revoked { revocation }
            }
        })
    }

    fn check_rights(&self, sku: &str, requested: u64) -> Result<(), LedgerError> {
        let held_here = self.state.rights_of(sku, &self.me);
        if requested <= held_here {
            return Ok(());
        }
        let held_elsewhere: BTreeMap<DeviceId, u64> = self.state.stock(sku).per_device.into_iter().filter(|(d, _)| *d != self.me).collect();
        Err(LedgerError::InsufficientRights {
            sku: sku.to_string(),
            requested,
            held_here,
            held_elsewhere_total: held_elsewhere.values().sum(),
            held_elsewhere,
        })
    }

    /// Appends `event` to this device's journal: automerge change, signature, fold.
    fn commit_local(&mut self, event: Event) -> Result<Entry, LedgerError> {
        let me = self.me;
        let journal = self.journals.entry(me).or_default();
        let seq = journal.next_seq;
        let index = Journal::segment_index(seq);
        let am_err = |e: String| LedgerError::Invalid { field: "journal", problem: e };
        let seg = journal.doc(&me).map_err(am_err)?;
        let mut tx = seg.doc.transaction();
        let list = match &seg.events {
            Some(l) => l.clone(),
            None => tx.put_object(ROOT, "events", ObjType::List).map_err(|e| am_err(e.to_string()))?,
        };
        event::write_event(&mut tx, &list, index, &event).map_err(|e| am_err(e.to_string()))?;
        tx.commit_with(CommitOptions::default().with_time((event.time_ms / 1000) as i64));
        seg.events = Some(list);
        let change = seg.doc.get_last_local_change().ok_or_else(|| am_err("no change committed".into()))?;
        let bytes = change.raw_bytes().to_vec();
        let causal = std::mem::take(&mut self.unreferenced_transfers_in);
        let signed = self.key.sign_change(self.ctx.market, seq, causal, bytes);
        let dot = signed.dot();
        if !self.allow_overspend_for_tests {
            // Validation above guarantees this; a failure is a bug in the core, not bad input.
            self.state.check(dot, &event).expect("locally validated event folds");
        }
        self.journals.get_mut(&me).expect("created above").advance(&signed);
        self.advanced(me);
        self.touch_doc(me);
        self.after_fold(dot, &event);
        Ok(Entry { change: signed, event })
    }

    /// Folds an event already checked and appended to its journal.
    fn after_fold(&mut self, dot: Dot, event: &Event) {
        if self.allow_overspend_for_tests && dot.device == self.me {
            // The broken build: clamp instead of asserting, so the simulator's checker sees the damage.
            if let EventBody::Sold { lines, .. } = &event.body {
                for l in lines {
                    let r = self.state.rights.entry(l.sku.clone()).or_default().entry(dot.device).or_default();
                    *r += l.qty.saturating_sub(*r);
                }
            }
        }
        self.state.fold(dot, event);
        if dot.device == self.me {
            // Our own change carried (or, on restore, had carried) every transfer seen before it.
            self.unreferenced_transfers_in.clear();
        }
        match &event.body {
            EventBody::ProductUpserted { lamport, .. } | EventBody::PhotoAttached { lamport, .. } => {
                self.lamport = self.lamport.max(*lamport)
            }
            EventBody::Transferred { to, .. } if *to == self.me => self.unreferenced_transfers_in.push(dot),
            _ => {}
        }
    }

    /// Verifies and applies changes received from peers, in any order. Changes whose predecessor
    /// or causal dependencies are missing wait (bounded) until those arrive.
    pub fn apply_remote(&mut self, changes: impl IntoIterator<Item = SignedChange>) -> ApplyReport {
        let mut report = ApplyReport::default();
        let mut run = Vec::new();
        for change in changes {
            self.feed(change, &mut run, &mut report);
        }
        self.flush_run(&mut run, &mut report);
        self.drain_pending(&mut report);
        report.pending = self.pending.len();
        self.stats.applied_remote += report.applied.len() as u64;
        report
    }

    /// Routes one change: extends the current run of consecutive ready changes of one device (applied
    /// to automerge in one call), or waits, or is rejected or ignored.
    fn feed(&mut self, change: SignedChange, run: &mut Vec<SignedChange>, report: &mut ApplyReport) {
        let dot = change.dot();
        if let Some(last) = run.last() {
            let continues = last.device == dot.device
                && last.seq != 0 // the device's enrolment is applied on its own, before anything it signed
                && dot.seq == last.seq + 1
                && Journal::segment_index(dot.seq) != 0
                && run.len() < SEGMENT_CHANGES as usize;
            if continues && matches!(self.precheck_at(&change, dot.seq), Ok(Readiness::Ready)) {
                run.push(change);
                return;
            }
            self.flush_run(run, report);
        }
        match self.precheck(&change) {
            Err(r) => self.reject(report, dot, r),
            Ok(Readiness::Duplicate) => {
                report.duplicates += 1;
                self.stats.duplicates += 1;
            }
            Ok(Readiness::Conflict) => self.equivocation(change, report),
            Ok(Readiness::Wait) => self.hold(change, report),
            Ok(Readiness::Ready) => run.push(change),
        }
    }

    /// Keeps a change until its predecessor or causal dependencies arrive (bounded).
    fn hold(&mut self, change: SignedChange, report: &mut ApplyReport) {
        let dot = change.dot();
        if let Some(waiting) = self.pending.get(&dot) {
            if waiting.digest() == change.digest() {
                report.duplicates += 1;
                self.stats.duplicates += 1;
            } else if change.verify_signature().is_err() {
                self.reject(report, dot, Rejection::BadSignature);
            } else {
                // Two signed changes for one position, neither applied yet: the first waits on.
                self.equivocation(change, report);
            }
        } else if !self.state.devices.contains_key(&dot.device)
            && self.pending.range(Dot { device: dot.device, seq: 0 }..=Dot { device: dot.device, seq: u64::MAX }).count()
                >= MAX_PENDING_PER_UNENROLLED
        {
            self.reject(report, dot, Rejection::Unenrolled);
        } else if self.pending.len() >= MAX_PENDING_CHANGES {
            self.reject(report, dot, Rejection::PendingFull);
        } else {
            self.pending.insert(dot, change);
        }
    }

    fn flush_run(&mut self, run: &mut Vec<SignedChange>, report: &mut ApplyReport) {
        if run.is_empty() {
            return;
        }
        let changes = std::mem::take(run);
        let (applied, failure) = self.apply_run(changes);
        report.applied.extend(applied);
        if let Some((failed, why, rest)) = failure {
            if why == Rejection::Equivocation {
                // It follows a history other than the one held, and so do the changes after it.
                for c in std::iter::once(failed).chain(rest) {
                    self.equivocation(c, report);
                }
                return;
            }
            self.reject(report, failed.dot(), why);
            // Later changes of the same device cannot apply before a good change at `dot`: wait.
            for c in rest {
                self.hold(c, report);
            }
        }
    }

    /// A validly signed change that contradicts what this replica holds: kept as evidence (and
    /// reported, so the driver persists it and passes it on), counted, never applied.
    fn equivocation(&mut self, change: SignedChange, report: &mut ApplyReport) {
        let dot = change.dot();
        if self.keep_evidence(change.clone()) {
            tracing::error!(device = %dot.device, seq = dot.seq, "equivocation: one device signed two different journals");
            report.evidence.push(change);
        }
        self.reject(report, dot, Rejection::Equivocation);
    }

    fn reject(&mut self, report: &mut ApplyReport, dot: Dot, r: Rejection) {
        tracing::warn!(device = %dot.device, seq = dot.seq, reason = r.label(), error = %r, "rejected remote change");
        *self.stats.rejected.entry(r.label()).or_default() += 1;
        report.rejected.push((dot, r));
    }

    /// Applies every pending change that has become ready, until none is.
    fn drain_pending(&mut self, report: &mut ApplyReport) {
        loop {
            let ready: Vec<Dot> = self
                .pending
                .keys()
                .filter(|dot| {
                    let next = self.journals.get(&dot.device).map_or(0, |j| j.next_seq);
                    dot.seq <= next || self.pending.contains_key(&Dot { device: dot.device, seq: dot.seq.wrapping_sub(1) })
                })
                .copied()
                .collect();
            let before = (self.pending.len(), report.applied.len());
            let mut run = Vec::new();
            for dot in ready {
                let Some(change) = self.pending.remove(&dot) else { continue };
                self.feed(change, &mut run, report);
            }
            self.flush_run(&mut run, report);
            if (self.pending.len(), report.applied.len()) == before {
                break;
            }
        }
    }

    /// Cheap checks that need no automerge work: market, size, signature, position, dependencies.
    fn precheck(&self, c: &SignedChange) -> Result<Readiness, Rejection> {
        let next = self.journals.get(&c.device).map_or(0, |j| j.next_seq);
        self.precheck_at(c, next)
    }

    /// [`Ledger::precheck`] as if the device's journal held `next` entries (for runs not yet applied).
    fn precheck_at(&self, c: &SignedChange, next: u64) -> Result<Readiness, Rejection> {
        if c.market != self.ctx.market {
            return Err(Rejection::WrongMarket);
        }
        if c.change.len() > MAX_CHANGE_BYTES {
            return Err(Rejection::Oversized(c.change.len()));
        }
        if c.causal.len() > MAX_CAUSAL_DOTS {
            return Err(Rejection::Oversized(c.causal.len()));
        }
        if c.seq < next {
            if self.held_digest(c.dot()) == Some(c.digest()) {
                return Ok(Readiness::Duplicate);
            }
            // Not the change held here: altered bytes (forged), or a second change its device signed.
            c.verify_signature().map_err(|_| Rejection::BadSignature)?;
            return Ok(Readiness::Conflict);
        }
        c.verify_signature().map_err(|_| Rejection::BadSignature)?;
        if c.seq > 0 {
            match self.state.devices.get(&c.device) {
                Some(d) if d.revoked_at_ms.is_some() => return Err(Rejection::Revoked),
                Some(_) => {}
                None if next == 0 => return Ok(Readiness::Wait), // its enrolment may still be on the way
                None => return Err(Rejection::Unenrolled),
            }
        }
        if c.seq > next {
            return Ok(Readiness::Wait);
        }
        let deps_met = c.causal.iter().all(|d| self.journals.get(&d.device).is_some_and(|j| j.next_seq > d.seq));
        Ok(if deps_met { Readiness::Ready } else { Readiness::Wait })
    }

    /// Applies a run of consecutive ready changes of one device within one journal segment: one
    /// automerge call for the run (much cheaper than one per change), then each event is decoded,
    /// checked and folded in order. Returns the applied entries and, on the first failure, the
    /// failing change's position, why, and the changes after it.
    #[allow(clippy::type_complexity)]
    fn apply_run(&mut self, run: Vec<SignedChange>) -> (Vec<Entry>, Option<(SignedChange, Rejection, Vec<SignedChange>)>) {
        let device = run[0].device;
        let first_index = Journal::segment_index(run[0].seq);
        // Decode and check every change before touching the document.
        let mut ams = Vec::with_capacity(run.len());
        let mut bad: Option<(usize, Rejection)> = None;
        {
            let journal = self.journals.entry(device).or_default();
            let mut expected_deps: Vec<ChangeHash> = match journal.doc(&device) {
                Ok(seg) => seg.doc.get_heads(),
                Err(e) => {
                    let mut run = run.into_iter();
                    let first = run.next().expect("runs are never empty");
                    return (vec![], Some((first, Rejection::Malformed(e), run.collect())));
                }
            };
            for (i, c) in run.iter().enumerate() {
                let am = match Change::from_bytes(c.change.to_vec()) {
                    Ok(am) => am,
                    Err(e) => {
                        bad = Some((i, Rejection::Malformed(e.to_string())));
                        break;
                    }
                };
                if am.actor_id().to_bytes() != c.device.0 {
                    bad = Some((i, Rejection::WrongActor));
                    break;
                }
                if am.seq() != (first_index + i) as u64 + 1 {
                    bad = Some((i, Rejection::BrokenChain(format!("automerge seq {} at journal position {}", am.seq(), c.seq))));
                    break;
                }
                if am.deps() != expected_deps.as_slice() {
                    // Signed by its device (checked before the run), at the next position, yet built
                    // on another change than the one held before it: its device signed two histories.
                    bad = Some((i, Rejection::Equivocation));
                    break;
                }
                expected_deps = vec![am.hash()];
                ams.push(am);
            }
        }
        self.touch_doc(device);
        let good = ams.len();
        let mut run = run;
        let mut rest = run.split_off(good);
        let mut failure = bad.map(|(_, why)| {
            let failed = rest.remove(0);
            (failed, why, std::mem::take(&mut rest))
        });
        if good == 0 {
            return (vec![], failure);
        }
        let last_hash = ams.last().expect("good > 0").hash();
        let journal = self.journals.get_mut(&device).expect("created above");
        let seg = journal.doc.as_mut().expect("built above");
        let applied_ok = seg.doc.apply_changes(ams).is_ok() && seg.doc.get_heads() == [last_hash];
        if !applied_ok {
            journal.doc = None;
            let mut later: Vec<SignedChange> = run.drain(1..).collect();
            if let Some((failed, _, r)) = failure {
                later.push(failed);
                later.extend(r);
            }
            let first = run.pop().expect("good > 0");
            return (vec![], Some((first, Rejection::BrokenChain("changes were not applied".into()), later)));
        }
        seg.events = events_list(&seg.doc);
        let events: Vec<Result<Event, Rejection>> = (0..good)
            .map(|i| match &seg.events {
                Some(list) if seg.doc.length(list) == first_index + good => {
                    event::read_event(&seg.doc, list, first_index + i).map_err(|e| Rejection::Malformed(e.to_string()))
                }
                _ => Err(Rejection::Malformed("each change must append exactly one journal event".into())),
            })
            .collect();
        let mut applied = Vec::with_capacity(good);
        let mut changes = run.into_iter();
        for event in events {
            let c = changes.next().expect("one change per event");
            let dot = c.dot();
            match event.and_then(|e| self.check_remote(dot, &e).map(|_| e)) {
                Ok(event) => {
                    self.journals.get_mut(&device).expect("exists").advance(&c);
                    self.advanced(device);
                    self.after_fold(dot, &event);
                    applied.push(Entry { change: c, event });
                }
                Err(why) => {
                    // The document took changes that are not in the journal: rebuild it from the
                    // good ones when next needed.
                    self.journals.get_mut(&device).expect("exists").doc = None;
                    let mut later: Vec<SignedChange> = changes.collect();
                    if let Some((bad_change, _, bad_rest)) = failure.take() {
                        // What followed the undecodable change waits as well.
                        later.push(bad_change);
                        later.extend(bad_rest);
                    }
                    debug_assert_eq!(c.dot(), dot);
                    return (applied, Some((c, why, later)));
                }
            }
        }
        (applied, failure)
    }

    fn check_remote(&self, dot: Dot, event: &Event) -> Result<(), Rejection> {
        if let EventBody::Enrolled { certificate } = &event.body {
            if certificate.device != dot.device {
                return Err(Rejection::BadEnrolment("certificate names another device".into()));
            }
            certificate.verify(&self.ctx.market_key, event.time_ms).map_err(|e| Rejection::BadEnrolment(e.to_string()))?;
        } else if dot.seq == 0 {
            return Err(Rejection::Unenrolled);
        }
        if let EventBody::Revoked { revocation } = &event.body {
            revocation.verify(&self.ctx.market_key).map_err(|e| Rejection::Fold(FoldError::Invalid(format!("revocation: {e}"))))?;
        }
        self.state.check(dot, event).map_err(Rejection::Fold)
    }
}

enum Readiness {
    Ready,
    Wait,
    Duplicate,
    /// Validly signed, but another change is held at its position.
    Conflict,
}

#[cfg(test)]
mod tests;
