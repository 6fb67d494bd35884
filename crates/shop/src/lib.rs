//! The online channel's checkout, as sans-IO decisions.
//!
//! A market's online channel (a web shop, a live stream) is one more device of the market, of role
//! `online`, run by the cloud. It sells a drop's units only from the stock rights it holds, like
//! any tablet, so it can never oversell together with the stalls. A buyer first places a **hold**:
//! units of the online device's rights reserved for a few minutes ([`DEFAULT_HOLD_TTL_MS`]). Paying
//! turns the hold into the online device's signed sale (a journal event like a tablet's, its
//! `client_ref` naming the hold, so a hold is sold at most once on every replica); a hold not paid
//! in time simply stops counting, and its units are available again.
//!
//! Holds are the cloud's, not the market's: they never enter a journal (a thousand buyers
//! browsing would otherwise fill every tablet). The driver keeps them in its store, reads what a
//! decision needs ([`HoldsView`]) under the market's lock, and writes back what the decision
//! returns in the same transaction as the sale it may have signed.
//!
//! Nothing here reads a clock or touches a socket or file: the cloud service and the simulator
//! drive these same functions.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use stallmesh_identity::{MarketId, Role};
use stallmesh_ledger::{Entry, Ledger, LedgerError, LineRequest, LocalOp};

mod asks;
mod book;
pub use asks::{spare_for_online, OnlineAsks, MAX_ONLINE_ASKS, ONLINE_ASK_MS};
pub use book::{HoldBook, HoldsRead, HoldsWanted};

/// How long a hold lasts unless paid: time to type a card number, short enough that an
/// abandoned basket gives its units back within minutes, not the day some platforms keep them.
pub const DEFAULT_HOLD_TTL_MS: u64 = 10 * 60 * 1000;
/// The longest hold a market may configure.
pub const MAX_HOLD_TTL_MS: u64 = 60 * 60 * 1000;
/// The shortest: a hold must outlive one checkout round trip.
pub const MIN_HOLD_TTL_MS: u64 = 10 * 1000;
/// Units one hold reserves: a buyer's basket of one drop, not a reseller's crate.
pub const MAX_HOLD_UNITS: u64 = 100;
/// A buyer's id as the shop's front end names it (an account id, a hashed e-mail).
pub const MAX_BUYER_LEN: usize = 128;
/// An idempotency key, as clients generate them (a UUID is 36).
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;
/// A drop's id as the ledger writes it (16 hex characters, '-', a journal position).
pub const MAX_DROP_ID_LEN: usize = 64;
const _: () = assert!(MIN_HOLD_TTL_MS <= DEFAULT_HOLD_TTL_MS && DEFAULT_HOLD_TTL_MS <= MAX_HOLD_TTL_MS);
// A sale of one hold is one line within the ledger's limits.
const _: () = assert!(MAX_HOLD_UNITS <= stallmesh_ledger::MAX_QTY);

/// Units of one drop reserved for one buyer, until `expires_ms` or until paid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// [`hold_id`] of the market, buyer and the idempotency key it was placed with.
    pub id: String,
    pub drop: String,
    pub sku: String,
    pub buyer: String,
    pub qty: u64,
    pub placed_ms: u64,
    pub expires_ms: u64,
    /// The online device's sale, once paid.
    pub sale: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldStatus {
    /// Reserving its units until `expires_ms`.
    Held,
    Paid,
    /// Not paid in time: its units count for nobody.
    Expired,
}

impl HoldStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldStatus::Held => "held",
            HoldStatus::Paid => "paid",
            HoldStatus::Expired => "expired",
        }
    }
}

impl Hold {
    pub fn status(&self, now_ms: u64) -> HoldStatus {
        match (&self.sale, now_ms < self.expires_ms) {
            (Some(_), _) => HoldStatus::Paid,
            (None, true) => HoldStatus::Held,
            (None, false) => HoldStatus::Expired,
        }
    }

    /// Units this hold keeps from everyone else now.
    pub fn reserves(&self, now_ms: u64) -> u64 {
        if self.status(now_ms) == HoldStatus::Held {
            self.qty
        } else {
            0
        }
    }

    /// The `client_ref` of the sale that pays it: the ledger refuses a second sale with it.
    pub fn client_ref(&self) -> String {
        format!("hold-{}", self.id)
    }
}

/// A hold's id: the same buyer retrying with the same idempotency key names the same hold, in any
/// cloud process, without a lookup table.
pub fn hold_id(market: &MarketId, buyer: &str, idempotency_key: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"stallmesh-hold-v1");
    h.update(market.0);
    for part in [buyer, idempotency_key] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

/// What a buyer asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldRequest {
    pub drop: String,
    pub buyer: String,
    pub qty: u64,
    pub idempotency_key: String,
}

/// The holds a decision weighs, read by the driver under the market's lock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HoldsView {
    /// Units of the drop's SKU in holds still held (unpaid, unexpired), over all buyers.
    pub held_units: u64,
    /// Units this buyer has in held or paid holds of this drop.
    pub buyer_units: u64,
    /// When the earliest held hold of the SKU expires: when units may come back.
    pub next_expiry_ms: Option<u64>,
}

impl HoldsView {
    /// The view of `holds` (every hold of the market the driver keeps, or at least those of the
    /// drop's SKU and of the buyer) for a request.
    pub fn of<'a>(holds: impl IntoIterator<Item = &'a Hold>, sku: &str, drop: &str, buyer: &str, now_ms: u64) -> Self {
        let mut view = HoldsView::default();
        for h in holds {
            let status = h.status(now_ms);
            if h.sku == sku && status == HoldStatus::Held {
                view.held_units = view.held_units.saturating_add(h.qty);
                view.next_expiry_ms = Some(view.next_expiry_ms.map_or(h.expires_ms, |t| t.min(h.expires_ms)));
            }
            if h.drop == drop && h.buyer == buyer && status != HoldStatus::Expired {
                view.buyer_units = view.buyer_units.saturating_add(h.qty);
            }
        }
        view
    }
}

/// Why a hold or a payment is refused. Each refusal changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShopError {
    #[error("{field}: {problem}")]
    Invalid { field: &'static str, problem: String },
    #[error("this market has no online channel")]
    NoOnlineChannel,
    #[error("no drop {0:?} is known to the online channel")]
    UnknownDrop(String),
    #[error("no hold {0:?} of this drop")]
    UnknownHold(String),
    #[error("the drop opens at {start_ms} ms since the epoch")]
    DropNotStarted { start_ms: u64 },
    #[error("a buyer may have {limit} units of this drop: this buyer has {already}, asked {asked} more")]
    BuyerLimit { limit: u64, already: u64, asked: u64 },
    #[error(
        "sold out online: {available} units free here, {in_holds} in other buyers' holds, {held_elsewhere} at the stalls{}",
        if *may_return { " (units may come back)" } else { "" }
    )]
    SoldOut {
        available: u64,
        in_holds: u64,
        held_elsewhere: u64,
        /// Whether units may still become available online: holds that may expire, or units the
        /// stalls hold that may be moved online.
        may_return: bool,
        next_expiry_ms: Option<u64>,
    },
    #[error("idempotency key already used for a different request ({0})")]
    IdempotencyConflict(String),
    #[error("the hold expired at {expired_at_ms} ms since the epoch and its units went back")]
    HoldExpired { expired_at_ms: u64 },
    #[error("the online channel cannot record: {0}")]
    Ledger(LedgerError),
}

fn invalid(field: &'static str, problem: impl Into<String>) -> ShopError {
    ShopError::Invalid { field, problem: problem.into() }
}

fn check_text(field: &'static str, v: &str, max: usize) -> Result<(), ShopError> {
    if v.is_empty() || v.len() > max || v.chars().any(char::is_control) {
        return Err(invalid(field, format!("must be 1..={max} bytes without control characters")));
    }
    Ok(())
}

/// The limits of a hold request alone: a driver checks them before reading anything for it.
pub fn check_request(req: &HoldRequest) -> Result<(), ShopError> {
    check_text("buyer", &req.buyer, MAX_BUYER_LEN)?;
    check_text("idempotency_key", &req.idempotency_key, MAX_IDEMPOTENCY_KEY_LEN)?;
    check_text("drop", &req.drop, MAX_DROP_ID_LEN)?;
    if req.qty == 0 || req.qty > MAX_HOLD_UNITS {
        return Err(invalid("qty", format!("must be 1..={MAX_HOLD_UNITS}")));
    }
    Ok(())
}

/// A hold placed, or found again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placed {
    /// New: the driver stores it before answering.
    New(Hold),
    /// The same request was placed before (same buyer and key): answer with it, store nothing.
    Again(Hold),
}

/// Decides a hold. `online` is the online device's ledger (what it holds), `existing` the hold
/// already stored under this request's id, `view` the other holds.
pub fn place_hold(
    online: &Ledger,
    market: &MarketId,
    existing: Option<&Hold>,
    view: &HoldsView,
    req: &HoldRequest,
    ttl_ms: u64,
    now_ms: u64,
) -> Result<Placed, ShopError> {
    assert!((MIN_HOLD_TTL_MS..=MAX_HOLD_TTL_MS).contains(&ttl_ms), "the driver bounds the hold time");
    if online.certificate().role != Role::Online {
        return Err(ShopError::NoOnlineChannel);
    }
    check_request(req)?;
    let id = hold_id(market, &req.buyer, &req.idempotency_key);
    if let Some(h) = existing {
        debug_assert_eq!(h.id, id, "the driver looks the hold up by this request's id");
        if h.drop != req.drop || h.qty != req.qty {
            return Err(ShopError::IdempotencyConflict(format!("hold {} is {} of drop {}", h.id, h.qty, h.drop)));
        }
        return Ok(Placed::Again(h.clone()));
    }
    let state = online.state();
    let drop = state.drops.get(&req.drop).ok_or_else(|| ShopError::UnknownDrop(req.drop.clone()))?;
    if now_ms < drop.start_ms {
        return Err(ShopError::DropNotStarted { start_ms: drop.start_ms });
    }
    // Another drop of the same SKU not open yet stops its sales (the till's rule), so a hold here
    // could never be paid: refused now rather than at payment.
    if let Some((_, start_ms)) = state.drop_not_started(&drop.sku, now_ms) {
        return Err(ShopError::DropNotStarted { start_ms });
    }
    if let Some(limit) = drop.max_per_buyer {
        if view.buyer_units.saturating_add(req.qty) > limit {
            return Err(ShopError::BuyerLimit { limit, already: view.buyer_units, asked: req.qty });
        }
    }
    let me = online.device();
    let rights = state.rights_of(&drop.sku, &me);
    let available = rights.saturating_sub(view.held_units);
    if req.qty > available {
        let stock = state.stock(&drop.sku);
        let held_elsewhere = stock.total.saturating_sub(rights);
        return Err(ShopError::SoldOut {
            available,
            in_holds: view.held_units,
            held_elsewhere,
            may_return: view.held_units > 0 || held_elsewhere > 0,
            next_expiry_ms: view.next_expiry_ms,
        });
    }
    let hold = Hold {
        id,
        drop: req.drop.clone(),
        sku: drop.sku.clone(),
        buyer: req.buyer.clone(),
        qty: req.qty,
        placed_ms: now_ms,
        expires_ms: now_ms.saturating_add(ttl_ms),
        sale: None,
    };
    debug_assert!(hold.reserves(now_ms) == req.qty && view.held_units.saturating_add(req.qty) <= rights, "a new hold fits the online device's rights");
    Ok(Placed::New(hold))
}

/// A hold paid, or found paid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Paid {
    /// Newly sold: the driver logs `entry` (the online device's signed sale) and stores `hold`
    /// in one transaction before answering.
    New { hold: Hold, entry: Box<Entry> },
    /// Paid before (a retry): answer with it.
    Again(Hold),
}

/// Turns a held hold into the online device's sale, signed by its ledger.
pub fn pay(online: &mut Ledger, hold: &Hold, now_ms: u64) -> Result<Paid, ShopError> {
    match hold.status(now_ms) {
        HoldStatus::Paid => return Ok(Paid::Again(hold.clone())),
        HoldStatus::Expired => return Err(ShopError::HoldExpired { expired_at_ms: hold.expires_ms }),
        HoldStatus::Held => {}
    }
    let op = LocalOp::Sell {
        lines: vec![LineRequest { sku: hold.sku.clone(), qty: hold.qty }],
        client_ref: Some(hold.client_ref()),
        recommendation: None,
        loyalty: None,
        staff: None,
    };
    match online.record(op, now_ms) {
        Ok(entry) => {
            let sale = stallmesh_ledger::sale_id(entry.change.dot());
            Ok(Paid::New { hold: Hold { sale: Some(sale), ..hold.clone() }, entry: Box::new(entry) })
        }
        // Another process paid it and its hold row was not written back (it is, in the same
        // transaction): still, the ledger is the judge of "sold once".
        Err(LedgerError::AlreadyRecorded { sale_id, .. }) => Ok(Paid::Again(Hold { sale: Some(sale_id), ..hold.clone() })),
        Err(LedgerError::DropNotStarted { start_ms, .. }) => Err(ShopError::DropNotStarted { start_ms }),
        Err(LedgerError::InsufficientRights { held_here, held_elsewhere_total, .. }) => Err(ShopError::SoldOut {
            available: held_here,
            in_holds: 0,
            held_elsewhere: held_elsewhere_total,
            may_return: held_elsewhere_total > 0,
            next_expiry_ms: None,
        }),
        Err(e) => Err(ShopError::Ledger(e)),
    }
}

/// A tablet whose till ran short asked the online channel, through its uplink, for `requested`
/// units of `sku`: what the online channel gives by the market's rebalancing policy (the very
/// `RebalancePolicy::give` tablets use with each other), never touching units in buyers' holds,
/// recorded as its signed transfer. `None`: nothing to give.
pub fn give_rights(
    online: &mut Ledger,
    policy: &stallmesh_sync::rebalance::RebalancePolicy,
    held_units: u64,
    sku: &str,
    requested: u64,
    to: stallmesh_identity::DeviceId,
    for_sale: bool,
    now_ms: u64,
) -> Result<Option<Entry>, ShopError> {
    if online.certificate().role != Role::Online {
        return Err(ShopError::NoOnlineChannel);
    }
    let me = online.device();
    let state = online.state();
    let free = state.rights_of(sku, &me).saturating_sub(held_units);
    let since = stallmesh_sync::rebalance::recent_sales_since_ms(now_ms);
    // One transfer moves at most the ledger's MAX_QTY.
    let give = policy
        .give(free, requested, state.sales_of_device_since(&me, since), state.sales_of_device_since(&to, since), for_sale)
        .min(stallmesh_ledger::MAX_QTY);
    if give == 0 || to == me {
        return Ok(None);
    }
    debug_assert!(give <= free, "units in holds are never given away");
    match online.record(LocalOp::Transfer { sku: sku.to_string(), qty: give, to }, now_ms) {
        Ok(entry) => Ok(Some(entry)),
        Err(LedgerError::UnknownSku(_) | LedgerError::UnknownDevice(_)) => Ok(None),
        Err(e) => Err(ShopError::Ledger(e)),
    }
}

#[cfg(test)]
mod tests;
