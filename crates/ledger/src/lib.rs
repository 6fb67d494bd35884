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

//!
//! ## Code map
//! This file holds the public types and the [`Ledger`] itself (construction, restore, reads,
//! evidence, folding); `local.rs` records local operations, `remote.rs` verifies and applies
//! peers' changes, `journal.rs` holds one device's journal and its segment documents, `heads.rs`
//! the version vector.

pub mod event;
mod heads;
mod journal;
mod local;
pub mod loyalty;
mod remote;
pub mod state;
// Test markets with deterministic keys: for tests, benchmarks and tools, never a node's build.
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod validate;

pub use event::{
    DecodeError, Event, EventBody, FeedbackAction, LoyaltyAsset, Product, RecommendationFeedback, RecommendationShown, SaleLine, SaleLoyalty,
    FEEDBACK_REASONS,
};
pub use heads::Heads;
pub use journal::decode_change_event;
pub use state::{drop_id, sale_id, CloudWatermark, DeviceRecord, Holders, DropProgress, DropRecord, FeedbackRecord, FoldError, PhotoRecord, ProductRecord, Sale, SalesSummary, State, StockView};

use journal::Journal;
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
/// The fewest: this device's own document, which is never dropped, and the one a remote run is
/// being applied to (`touch_doc` then uses it).
pub const MIN_OPEN_SEGMENT_DOCS: usize = 2;
const _: () = assert!(MIN_OPEN_SEGMENT_DOCS <= MAX_OPEN_SEGMENT_DOCS);
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
/// Longest staff name on a sale, in characters (letters, digits, spaces, `-`, `.`): a person's name.
pub const MAX_STAFF_NAME_CHARS: usize = 40;
pub const MAX_TAGS: usize = 16;
pub const MAX_TAG_LEN: usize = 32;
pub const MAX_CLIENT_REF_LEN: usize = 64;
/// A voucher's label: "Free coffee", "Summer drop #37 of 50"; printed on a receipt.
pub const MAX_VOUCHER_LABEL_LEN: usize = 80;
/// Largest product photo in the journal: it must fit in one change ([`MAX_CHANGE_BYTES`]) with room
/// for the signature and ids. Nodes shrink photos to a 256-pixel JPEG (10–30 KB) before recording.
pub const MAX_PHOTO_BYTES: usize = 48 * 1024;
/// Devices one cloud watermark lists: far above any market (tens of tablets), and what fits one
/// change (asserted in `validate.rs`).
pub const MAX_WATERMARK_DEVICES: usize = 1_024;
/// A drop's name: "Summer tote, 200 numbered", shown on the till and the shop.
pub const MAX_DROP_NAME_LEN: usize = 80;
/// Devices one drop's plan splits its units between: every stall's tablets and the online channel
/// of a large market, and what fits one change (asserted in `validate.rs`).
pub const MAX_DROP_PLAN_DEVICES: usize = 256;
/// Most recommended SKUs recorded on one sale.
pub const MAX_RECOMMENDED: usize = 20;
/// Different changes kept as evidence for one journal position: two is proof; a few more show how
/// many copies of a device's credentials are signing. Beyond it a conflict is still counted.
pub const MAX_EVIDENCE_PER_POSITION: usize = 4;
/// Conflicting changes kept as evidence in all: a cloned tablet selling all day yields one per sale;
/// bounded so a device signing garbage histories cannot exhaust memory. Beyond it, counted.
pub const MAX_EVIDENCE_CHANGES: usize = 4_096;

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
        /// A loyalty card on the sale: points it earns, points it redeems.
        loyalty: Option<LoyaltyOnSale>,
        /// The signed-in staff member making the sale, if the till signs staff in.
        staff: Option<String>,
    },
    /// Records staff's dismissal or override of a recommendation.
    RecommendationFeedback(RecommendationFeedback),
    /// Moves this device's rights on a card's points or a voucher to another device (the holder's
    /// answer when a tablet asks for them).
    TransferLoyalty { asset: LoyaltyAsset, qty: u64, to: DeviceId },
    /// Mints a single-use voucher held by this device.
    MintVoucher { voucher: stallmesh_identity::VoucherId, label: String, value_cents: u64 },
    /// Redeems a voucher: spends this device's right to it if it holds it, else (with a budget)
    /// spends from the offline budget.
    RedeemVoucher { voucher: stallmesh_identity::VoucherId, offline_budget: Option<stallmesh_loyalty::OfflineBudget> },
    /// Attaches (or replaces) a product's photo: a JPEG of at most [`MAX_PHOTO_BYTES`].
    AttachPhoto {
        sku: String,
        jpeg: Vec<u8>,
    },
    Revoke(Revocation),
    /// The cloud's watermark (only a device of role `cloud` records it): see [`EventBody::CloudHolds`].
    RecordCloudHolds { offset: u64, heads: Vec<(DeviceId, u64)> },
    /// An organiser plans a drop: see [`EventBody::DropPlanned`]. `plan` may list devices in any
    /// order; it is recorded sorted.
    PlanDrop { name: String, sku: String, units: u64, start_ms: u64, plan: Vec<(DeviceId, u64)>, max_per_buyer: Option<u64> },
}

/// A card on a sale, as the till asks: the points the sale earns (from the market's earning rule,
/// applied by the caller), the points to redeem and what each is worth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoyaltyOnSale {
    pub card: stallmesh_identity::CardId,
    pub points_earned: u64,
    pub redeem_points: u64,
    pub point_value_cents: u64,
    /// What may be redeemed beyond the points this device holds; `None`: nothing (a holder is
    /// reachable and should be asked first).
    pub offline_budget: Option<stallmesh_loyalty::OfflineBudget>,
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
    #[error("a device of role {role} cannot record {what}")]
    RoleForbids { role: &'static str, what: &'static str },
    #[error("this device is an organiser-less seller of stall {own:?} and cannot change products of stall {other:?}")]
    OtherStall { own: String, other: String },
    #[error(
        "not enough points on card {card}: asked {requested}, this device holds {held_here}, other devices hold \
         {held_elsewhere_total}, offline budget left {budget_left}"
    )]
    InsufficientPoints {
        card: stallmesh_identity::CardId,
        requested: u64,
        held_here: u64,
        held_elsewhere_total: u64,
        held_elsewhere: BTreeMap<DeviceId, u64>,
        budget_left: u64,
    },
    #[error("no voucher {0} is known here (minted elsewhere and not replicated yet, or never minted)")]
    UnknownVoucher(stallmesh_identity::VoucherId),
    #[error("voucher {voucher} was already redeemed (by {by})")]
    VoucherRedeemed { voucher: stallmesh_identity::VoucherId, by: DeviceId },
    #[error("voucher {voucher} is held by another device and this device's offline budget is spent")]
    VoucherHeldElsewhere { voucher: stallmesh_identity::VoucherId, holders: Vec<DeviceId> },
    #[error("voucher {0} already exists")]
    VoucherExists(stallmesh_identity::VoucherId),
    #[error("not enough loyalty rights: {asset} asked {requested}, this device holds {held_here}")]
    InsufficientLoyaltyRights { asset: String, requested: u64, held_here: u64 },
    #[error("{sku} is in drop {drop:?}, which opens at {start_ms} ms since the epoch: nothing of it sells before then")]
    DropNotStarted { sku: String, drop: String, start_ms: u64 },
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

/// Remote changes whose signatures a caller already knows are good, for
/// [`Ledger::apply_remote_known`]. `known_valid` may answer true only for a change byte-for-byte
/// equal (signature included) to one whose signature was verified: the simulator's replicas share
/// one process and receive the same changes, so one verification serves all of them. The node
/// verifies every change ([`VerifyAll`]).
pub trait KnownValid {
    fn known_valid(&self, change: &SignedChange) -> bool;

    /// What a ledger of this market found applying a change byte-for-byte equal to `change` to its
    /// journal, if the caller knows: the event automerge gave and the digest of the change that
    /// journal held before it. Both follow from the bytes and the journal before them alone, so a
    /// replica holding that same predecessor takes the event instead of decoding the change again;
    /// everything that depends on the replica (position, revocation, enrolment, the fold's checks
    /// against its own state) is checked as always. The node never vouches (`None`).
    fn known_applied(&self, _change: &SignedChange) -> Option<KnownApplied> {
        None
    }
}

/// See [`KnownValid::known_applied`].
#[derive(Debug, Clone)]
pub struct KnownApplied {
    pub event: Event,
    /// The digest of the change held just before it; `None` for a journal's first change.
    pub after: Option<ChangeDigest>,
}

/// Vouches for nothing: every signature is checked.
pub struct VerifyAll;

impl KnownValid for VerifyAll {
    fn known_valid(&self, _: &SignedChange) -> bool {
        false
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
    /// How many may be: [`MAX_OPEN_SEGMENT_DOCS`] unless [`Ledger::set_open_docs_limit`] lowered it.
    open_docs_limit: usize,
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
            open_docs_limit: MAX_OPEN_SEGMENT_DOCS,
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
        // Restored journals grew by doubling: most devices' journals take nothing more for a while.
        for journal in ledger.journals.values_mut() {
            journal.shrink_to_fit();
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
    /// Keeps at most `limit` journal documents in memory (within [`MIN_OPEN_SEGMENT_DOCS`] and
    /// [`MAX_OPEN_SEGMENT_DOCS`]); the rest are dropped now and rebuilt from their raw changes when
    /// next needed. Memory for time: a thousand replicas in one simulator process each need few.
    pub fn set_open_docs_limit(&mut self, limit: usize) {
        assert!(
            (MIN_OPEN_SEGMENT_DOCS..=MAX_OPEN_SEGMENT_DOCS).contains(&limit),
            "an open-documents limit within {MIN_OPEN_SEGMENT_DOCS}..={MAX_OPEN_SEGMENT_DOCS}"
        );
        self.open_docs_limit = limit;
        self.evict_docs();
    }

    fn touch_doc(&mut self, device: DeviceId) {
        if let Some(i) = self.open_docs.iter().position(|d| *d == device) {
            self.open_docs.remove(i);
        }
        self.open_docs.push_back(device);
        self.evict_docs();
    }

    fn evict_docs(&mut self) {
        while self.open_docs.len() > self.open_docs_limit {
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

    fn advanced(&mut self, device: DeviceId) {
        let next = self.journals.get(&device).map_or(0, |j| j.next_seq);
        self.heads.set(device, next);
    }

    /// Folds an event already checked and appended to its journal.
    fn after_fold(&mut self, dot: Dot, event: &Event) {
        if self.allow_overspend_for_tests && dot.device == self.me {
            // The broken build: clamp instead of asserting, so the simulator's checker sees the damage.
            if let EventBody::Sold { lines, .. } = &event.body {
                for l in lines {
                    let r = self.state.rights.entry(l.sku.clone()).or_default().held_mut(dot.device);
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
            EventBody::Transferred { to, .. } | EventBody::LoyaltyTransferred { to, .. } if *to == self.me => {
                self.unreferenced_transfers_in.push(dot)
            }
            // A drop's share is rights received from the organiser: the first spend names it (an
            // organiser's own share is in its own journal, before anything that spends it).
            EventBody::DropPlanned { plan, .. } if dot.device != self.me && plan.iter().any(|(d, _)| *d == self.me) => {
                self.unreferenced_transfers_in.push(dot)
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod loyalty_tests;
#[cfg(test)]
mod drop_tests;
