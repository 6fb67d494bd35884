//! Journal events and their automerge encoding.
//!
//! A device's journal is a list of events in automerge documents (one per segment of
//! [`crate::SEGMENT_CHANGES`] entries). Each event is a map with scalar fields, so a peer reads it
//! back field by field from the document it applied the change to.

use automerge::transaction::Transactable;
use automerge::{Automerge, ObjId, ObjType, ReadDoc, ScalarValue, Value};
use serde::{Deserialize, Serialize};
use stallmesh_identity::{CardId, Certificate, DeviceId, Revocation, VoucherId};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    pub sku: String,
    pub name: String,
    pub price_cents: u64,
    pub currency: String,
    pub stall: String,
    #[serde(default)]
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaleLine {
    pub sku: String,
    pub qty: u64,
    /// Unit price at the time of sale, from the selling device's catalogue.
    pub price_cents: u64,
}

/// Which recommendations the customer was offered before this sale (or, in the control arm, would have
/// been offered), so conversion lift can be measured from the replicated sales.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecommendationShown {
    /// `"treatment"` (shown) or `"control"` (held back, recorded for comparison).
    pub arm: String,
    pub skus: Vec<String>,
}

/// Staff's answer to a recommendation the till showed: dismissed (with a reason) or overridden by a
/// product staff chose instead. Recorded in the device's journal so the cloud can retrain on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecommendationFeedback {
    pub action: FeedbackAction,
    /// The recommended product.
    pub sku: String,
    /// One of [`FEEDBACK_REASONS`].
    pub reason: String,
    /// What staff chose instead: present exactly when `action` is `Overridden`.
    pub chosen_sku: Option<String>,
    /// The basket the recommendation was made for.
    pub basket: Vec<String>,
    /// The experiment arm that showed it (`"treatment"`; the control arm shows nothing).
    pub arm: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum FeedbackAction {
    Dismissed,
    Overridden,
}

impl FeedbackAction {
    pub fn as_str(self) -> &'static str {
        match self {
            FeedbackAction::Dismissed => "dismiss",
            FeedbackAction::Overridden => "override",
        }
    }
}

/// Why staff dismissed or overrode a recommendation: a short list, so counts per reason mean something.
pub const FEEDBACK_REASONS: [&str; 5] = ["not_relevant", "out_of_stock", "customer_declined", "staff_choice", "other"];

/// A sale's loyalty: the card it earned points for, and the points it redeemed for a discount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaleLoyalty {
    pub card: CardId,
    /// Added to the seller's rights on the card's points.
    pub points_earned: u64,
    /// Redeemed from points the seller held for the card: spends those rights.
    pub points_redeemed: u64,
    /// Redeemed beyond what the seller held, from its offline budget (no rights spent; may turn
    /// out to be spent twice, which every replica then reports as an exposure).
    pub points_unproven: u64,
    /// What the redeemed points took off the sale. The sale's `total_cents` stays the sum of its
    /// lines; the customer paid `total_cents - discount_cents`.
    pub discount_cents: u64,
}

/// What loyalty rights are rights to: a card's points, or the one redemption of a voucher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum LoyaltyAsset {
    Points(CardId),
    Voucher(VoucherId),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventBody {
    /// Always entry 0 of a journal: the market's certificate for its author.
    Enrolled { certificate: Arc<Certificate> },
    /// Last writer wins per SKU, ordered by (lamport, author).
    ProductUpserted { product: Arc<Product>, lamport: u64 },
    /// New stock: adds stock rights to the author.
    Restocked { sku: String, qty: u64 },
    /// Moves stock rights from the author to `to`.
    Transferred { sku: String, qty: u64, to: DeviceId },
    /// Spends the author's stock rights.
    Sold {
        lines: Vec<SaleLine>,
        total_cents: u64,
        currency: String,
        client_ref: Option<String>,
        #[serde(default)]
        recommendation: Option<RecommendationShown>,
        #[serde(default)]
        loyalty: Option<SaleLoyalty>,
        /// The signed-in staff member who made the sale (tills with staff sign-in).
        #[serde(default)]
        staff: Option<String>,
    },
    /// A product photo (a small JPEG), last writer wins per SKU with the catalogue's lamport clock.
    PhotoAttached { sku: String, jpeg: Vec<u8>, lamport: u64 },
    /// The market's revocation of a device, recorded by whichever device learnt of it.
    Revoked { revocation: Revocation },
    /// The cloud's watermark, recorded only by a device of role `cloud`: its reconciled log holds
    /// `offset` entries, and of each listed device's journal the first `heads` entries. It lists
    /// only the devices whose count grew since this cloud device's previous watermark (the first
    /// lists all): every replica applies every watermark, so one listing a thousand unchanged
    /// tablets each time would be most of what a large market replicates. Folded by merging
    /// ([`crate::CloudWatermark`]).
    CloudHolds { offset: u64, heads: Vec<(DeviceId, u64)> },
    /// Moves loyalty rights (a card's points, a voucher's redemption) from the author to `to`.
    LoyaltyTransferred { asset: LoyaltyAsset, qty: u64, to: DeviceId },
    /// A single-use voucher: its one right to be redeemed is held by the author.
    VoucherMinted { voucher: VoucherId, label: String, value_cents: u64 },
    /// A voucher redeemed. `proven`: the author spent its right to it; otherwise it redeemed from
    /// its offline budget.
    VoucherRedeemed { voucher: VoucherId, proven: bool },
    /// Staff dismissed or overrode a recommendation.
    RecommendationFeedback { feedback: RecommendationFeedback },
    /// A limited drop, recorded only by an organiser: `units` new units of `sku`, released at
    /// `start_ms`, split between devices by `plan` (devices in order, once each, shares summing to
    /// `units`); each share becomes its device's stock rights. Before `start_ms` no device sells
    /// the SKU (each checks its own sales against its clock, as the till's rule, like the offline
    /// budget: replicas check only what rights allow). `max_per_buyer`: what the online channel
    /// sells one buyer (stalls' buyers are anonymous).
    DropPlanned { name: String, sku: String, units: u64, start_ms: u64, plan: Vec<(DeviceId, u64)>, max_per_buyer: Option<u64> },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The author's clock when the event was recorded (advisory: never used to order merges).
    pub time_ms: u64,
    pub body: EventBody,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
#[error("journal event {field}: {problem}")]
pub struct DecodeError {
    pub field: &'static str,
    pub problem: String,
}

fn missing(field: &'static str) -> DecodeError {
    DecodeError { field, problem: "missing or of the wrong type".into() }
}

type AmResult<T> = Result<T, automerge::AutomergeError>;

/// Writes `event` as a new map at `index` of the journal list.
pub(crate) fn write_event<T: Transactable>(tx: &mut T, list: &ObjId, index: usize, event: &Event) -> AmResult<()> {
    let map = tx.insert_object(list, index, ObjType::Map)?;
    tx.put(&map, "time_ms", event.time_ms)?;
    match &event.body {
        EventBody::Enrolled { certificate } => {
            tx.put(&map, "kind", "enrolled")?;
            tx.put(&map, "certificate", postcard::to_allocvec(certificate).expect("serializable"))?;
        }
        EventBody::ProductUpserted { product, lamport } => {
            tx.put(&map, "kind", "product")?;
            tx.put(&map, "sku", product.sku.as_str())?;
            tx.put(&map, "name", product.name.as_str())?;
            tx.put(&map, "price_cents", product.price_cents)?;
            tx.put(&map, "currency", product.currency.as_str())?;
            tx.put(&map, "stall", product.stall.as_str())?;
            let tags = tx.put_object(&map, "tags", ObjType::List)?;
            for (i, tag) in product.tags.iter().enumerate() {
                tx.insert(&tags, i, tag.as_str())?;
            }
            tx.put(&map, "lamport", *lamport)?;
        }
        EventBody::Restocked { sku, qty } => {
            tx.put(&map, "kind", "restock")?;
            tx.put(&map, "sku", sku.as_str())?;
            tx.put(&map, "qty", *qty)?;
        }
        EventBody::Transferred { sku, qty, to } => {
            tx.put(&map, "kind", "transfer")?;
            tx.put(&map, "sku", sku.as_str())?;
            tx.put(&map, "qty", *qty)?;
            tx.put(&map, "to", to.0.to_vec())?;
        }
        EventBody::Sold { lines, total_cents, currency, client_ref, recommendation, loyalty, staff } => {
            tx.put(&map, "kind", "sale")?;
            if let Some(s) = staff {
                tx.put(&map, "staff", s.as_str())?;
            }
            if let Some(l) = loyalty {
                tx.put(&map, "card", l.card.0.to_vec())?;
                tx.put(&map, "points_earned", l.points_earned)?;
                tx.put(&map, "points_redeemed", l.points_redeemed)?;
                tx.put(&map, "points_unproven", l.points_unproven)?;
                tx.put(&map, "discount_cents", l.discount_cents)?;
            }
            let list = tx.put_object(&map, "lines", ObjType::List)?;
            for (i, line) in lines.iter().enumerate() {
                let l = tx.insert_object(&list, i, ObjType::Map)?;
                tx.put(&l, "sku", line.sku.as_str())?;
                tx.put(&l, "qty", line.qty)?;
                tx.put(&l, "price_cents", line.price_cents)?;
            }
            tx.put(&map, "total_cents", *total_cents)?;
            tx.put(&map, "currency", currency.as_str())?;
            if let Some(r) = client_ref {
                tx.put(&map, "client_ref", r.as_str())?;
            }
            if let Some(rec) = recommendation {
                tx.put(&map, "rec_arm", rec.arm.as_str())?;
                let skus = tx.put_object(&map, "rec_skus", ObjType::List)?;
                for (i, sku) in rec.skus.iter().enumerate() {
                    tx.insert(&skus, i, sku.as_str())?;
                }
            }
        }
        EventBody::PhotoAttached { sku, jpeg, lamport } => {
            tx.put(&map, "kind", "photo")?;
            tx.put(&map, "sku", sku.as_str())?;
            tx.put(&map, "jpeg", jpeg.clone())?;
            tx.put(&map, "lamport", *lamport)?;
        }
        EventBody::Revoked { revocation } => {
            tx.put(&map, "kind", "revoked")?;
            tx.put(&map, "revocation", postcard::to_allocvec(revocation).expect("serializable"))?;
        }
        EventBody::CloudHolds { offset, heads } => {
            tx.put(&map, "kind", "cloud_holds")?;
            tx.put(&map, "offset", *offset)?;
            // One scalar rather than a list of maps: a watermark of a big market stays one small op.
            tx.put(&map, "heads", postcard::to_allocvec(heads).expect("serializable"))?;
        }
        EventBody::LoyaltyTransferred { asset, qty, to } => {
            tx.put(&map, "kind", "loyalty_transfer")?;
            let (kind, id) = match asset {
                LoyaltyAsset::Points(c) => ("points", c.0),
                LoyaltyAsset::Voucher(v) => ("voucher", v.0),
            };
            tx.put(&map, "asset_kind", kind)?;
            tx.put(&map, "asset", id.to_vec())?;
            tx.put(&map, "qty", *qty)?;
            tx.put(&map, "to", to.0.to_vec())?;
        }
        EventBody::VoucherMinted { voucher, label, value_cents } => {
            tx.put(&map, "kind", "voucher_minted")?;
            tx.put(&map, "voucher", voucher.0.to_vec())?;
            tx.put(&map, "label", label.as_str())?;
            tx.put(&map, "value_cents", *value_cents)?;
        }
        EventBody::VoucherRedeemed { voucher, proven } => {
            tx.put(&map, "kind", "voucher_redeemed")?;
            tx.put(&map, "voucher", voucher.0.to_vec())?;
            tx.put(&map, "proven", *proven)?;
        }
        EventBody::DropPlanned { name, sku, units, start_ms, plan, max_per_buyer } => {
            tx.put(&map, "kind", "drop_planned")?;
            if let Some(n) = max_per_buyer {
                tx.put(&map, "max_per_buyer", *n)?;
            }
            tx.put(&map, "name", name.as_str())?;
            tx.put(&map, "sku", sku.as_str())?;
            tx.put(&map, "units", *units)?;
            tx.put(&map, "start_ms", *start_ms)?;
            // One scalar, as a watermark's heads: a plan of many devices stays one small op.
            tx.put(&map, "plan", postcard::to_allocvec(plan).expect("serializable"))?;
        }
        EventBody::RecommendationFeedback { feedback } => {
            tx.put(&map, "kind", "rec_feedback")?;
            tx.put(&map, "action", feedback.action.as_str())?;
            tx.put(&map, "sku", feedback.sku.as_str())?;
            tx.put(&map, "reason", feedback.reason.as_str())?;
            if let Some(c) = &feedback.chosen_sku {
                tx.put(&map, "chosen_sku", c.as_str())?;
            }
            let basket = tx.put_object(&map, "basket", ObjType::List)?;
            for (i, sku) in feedback.basket.iter().enumerate() {
                tx.insert(&basket, i, sku.as_str())?;
            }
            tx.put(&map, "arm", feedback.arm.as_str())?;
        }
    }
    Ok(())
}

fn get_id<const N: usize>(doc: &Automerge, obj: &ObjId, key: &'static str) -> Result<[u8; N], DecodeError> {
    get_bytes(doc, obj, key)?.try_into().map_err(|_| DecodeError { field: key, problem: format!("not {N} bytes") })
}

fn get_bool(doc: &Automerge, obj: &ObjId, key: &'static str) -> Result<bool, DecodeError> {
    match scalar(doc, obj, key) {
        Some(ScalarValue::Boolean(b)) => Ok(b),
        _ => Err(missing(key)),
    }
}

fn scalar(doc: &Automerge, obj: &ObjId, key: &'static str) -> Option<ScalarValue> {
    match doc.get(obj, key) {
        Ok(Some((Value::Scalar(v), _))) => Some(v.into_owned()),
        _ => None,
    }
}

fn get_str(doc: &Automerge, obj: &ObjId, key: &'static str) -> Result<String, DecodeError> {
    match scalar(doc, obj, key) {
        Some(ScalarValue::Str(s)) => Ok(s.to_string()),
        _ => Err(missing(key)),
    }
}

fn get_u64(doc: &Automerge, obj: &ObjId, key: &'static str) -> Result<u64, DecodeError> {
    match scalar(doc, obj, key) {
        Some(ScalarValue::Uint(v)) => Ok(v),
        Some(ScalarValue::Int(v)) if v >= 0 => Ok(v as u64),
        _ => Err(missing(key)),
    }
}

fn get_bytes(doc: &Automerge, obj: &ObjId, key: &'static str) -> Result<Vec<u8>, DecodeError> {
    match scalar(doc, obj, key) {
        Some(ScalarValue::Bytes(b)) => Ok(b),
        _ => Err(missing(key)),
    }
}

fn get_obj(doc: &Automerge, obj: &ObjId, key: &'static str, ty: ObjType) -> Result<ObjId, DecodeError> {
    match doc.get(obj, key) {
        Ok(Some((Value::Object(t), id))) if t == ty => Ok(id),
        _ => Err(missing(key)),
    }
}

fn get_str_list(doc: &Automerge, list: &ObjId, field: &'static str) -> Result<Vec<String>, DecodeError> {
    let mut out = Vec::new();
    for i in 0..doc.length(list) {
        match doc.get(list, i) {
            Ok(Some((Value::Scalar(v), _))) => match v.as_ref() {
                ScalarValue::Str(s) => out.push(s.to_string()),
                _ => return Err(missing(field)),
            },
            _ => return Err(missing(field)),
        }
    }
    Ok(out)
}

fn decode_postcard<T: for<'de> Deserialize<'de>>(bytes: &[u8], field: &'static str) -> Result<T, DecodeError> {
    postcard::from_bytes(bytes).map_err(|e| DecodeError { field, problem: e.to_string() })
}

/// Reads the event at `index` of the journal list.
pub(crate) fn read_event(doc: &Automerge, list: &ObjId, index: usize) -> Result<Event, DecodeError> {
    let map = match doc.get(list, index) {
        Ok(Some((Value::Object(ObjType::Map), id))) => id,
        _ => return Err(missing("entry")),
    };
    let time_ms = get_u64(doc, &map, "time_ms")?;
    let kind = get_str(doc, &map, "kind")?;
    let body = match kind.as_str() {
        "enrolled" => EventBody::Enrolled { certificate: Arc::new(decode_postcard(&get_bytes(doc, &map, "certificate")?, "certificate")?) },
        "product" => {
            let tags = get_str_list(doc, &get_obj(doc, &map, "tags", ObjType::List)?, "tags")?;
            EventBody::ProductUpserted {
                product: Arc::new(Product {
                    sku: get_str(doc, &map, "sku")?,
                    name: get_str(doc, &map, "name")?,
                    price_cents: get_u64(doc, &map, "price_cents")?,
                    currency: get_str(doc, &map, "currency")?,
                    stall: get_str(doc, &map, "stall")?,
                    tags,
                }),
                lamport: get_u64(doc, &map, "lamport")?,
            }
        }
        "restock" => EventBody::Restocked { sku: get_str(doc, &map, "sku")?, qty: get_u64(doc, &map, "qty")? },
        "transfer" => {
            let to = get_bytes(doc, &map, "to")?;
            let to: [u8; 32] = to.try_into().map_err(|_| DecodeError { field: "to", problem: "not 32 bytes".into() })?;
            EventBody::Transferred { sku: get_str(doc, &map, "sku")?, qty: get_u64(doc, &map, "qty")?, to: DeviceId(to) }
        }
        "sale" => {
            let lines_obj = get_obj(doc, &map, "lines", ObjType::List)?;
            let mut lines = Vec::new();
            for i in 0..doc.length(&lines_obj) {
                let l = match doc.get(&lines_obj, i) {
                    Ok(Some((Value::Object(ObjType::Map), id))) => id,
                    _ => return Err(missing("lines")),
                };
                lines.push(SaleLine {
                    sku: get_str(doc, &l, "sku")?,
                    qty: get_u64(doc, &l, "qty")?,
                    price_cents: get_u64(doc, &l, "price_cents")?,
                });
            }
            let client_ref = optional_str(doc, &map, "client_ref")?;
            // Absent in sales made without staff sign-in (and in journals older than the field).
            let staff = optional_str(doc, &map, "staff")?;
            // Absent in sales recorded without a recommendation (and in journals older than the field).
            let recommendation = match scalar(doc, &map, "rec_arm") {
                None => None,
                Some(ScalarValue::Str(arm)) => Some(RecommendationShown {
                    arm: arm.to_string(),
                    skus: get_str_list(doc, &get_obj(doc, &map, "rec_skus", ObjType::List)?, "rec_skus")?,
                }),
                Some(_) => return Err(missing("rec_arm")),
            };
            // Absent in sales without a card.
            let loyalty = match scalar(doc, &map, "card") {
                None => None,
                Some(_) => Some(SaleLoyalty {
                    card: CardId(get_id(doc, &map, "card")?),
                    points_earned: get_u64(doc, &map, "points_earned")?,
                    points_redeemed: get_u64(doc, &map, "points_redeemed")?,
                    points_unproven: get_u64(doc, &map, "points_unproven")?,
                    discount_cents: get_u64(doc, &map, "discount_cents")?,
                }),
            };
            EventBody::Sold {
                lines,
                total_cents: get_u64(doc, &map, "total_cents")?,
                currency: get_str(doc, &map, "currency")?,
                client_ref,
                recommendation,
                loyalty,
                staff,
            }
        }
        "photo" => EventBody::PhotoAttached {
            sku: get_str(doc, &map, "sku")?,
            jpeg: get_bytes(doc, &map, "jpeg")?,
            lamport: get_u64(doc, &map, "lamport")?,
        },
        "revoked" => EventBody::Revoked { revocation: decode_postcard(&get_bytes(doc, &map, "revocation")?, "revocation")? },
        "cloud_holds" => EventBody::CloudHolds {
            offset: get_u64(doc, &map, "offset")?,
            heads: decode_postcard(&get_bytes(doc, &map, "heads")?, "heads")?,
        },
        "loyalty_transfer" => {
            let id: [u8; 8] = get_id(doc, &map, "asset")?;
            let asset = match get_str(doc, &map, "asset_kind")?.as_str() {
                "points" => LoyaltyAsset::Points(CardId(id)),
                "voucher" => LoyaltyAsset::Voucher(VoucherId(id)),
                other => return Err(DecodeError { field: "asset_kind", problem: format!("unknown asset kind {other:?}") }),
            };
            EventBody::LoyaltyTransferred { asset, qty: get_u64(doc, &map, "qty")?, to: DeviceId(get_id(doc, &map, "to")?) }
        }
        "voucher_minted" => EventBody::VoucherMinted {
            voucher: VoucherId(get_id(doc, &map, "voucher")?),
            label: get_str(doc, &map, "label")?,
            value_cents: get_u64(doc, &map, "value_cents")?,
        },
        "voucher_redeemed" => {
            EventBody::VoucherRedeemed { voucher: VoucherId(get_id(doc, &map, "voucher")?), proven: get_bool(doc, &map, "proven")? }
        }
        "rec_feedback" => {
            let action = match get_str(doc, &map, "action")?.as_str() {
                "dismiss" => FeedbackAction::Dismissed,
                "override" => FeedbackAction::Overridden,
                other => return Err(DecodeError { field: "action", problem: format!("unknown action {other:?}") }),
            };
            EventBody::RecommendationFeedback {
                feedback: RecommendationFeedback {
                    action,
                    sku: get_str(doc, &map, "sku")?,
                    reason: get_str(doc, &map, "reason")?,
                    chosen_sku: optional_str(doc, &map, "chosen_sku")?,
                    basket: get_str_list(doc, &get_obj(doc, &map, "basket", ObjType::List)?, "basket")?,
                    arm: get_str(doc, &map, "arm")?,
                },
            }
        }
        "drop_planned" => EventBody::DropPlanned {
            name: get_str(doc, &map, "name")?,
            sku: get_str(doc, &map, "sku")?,
            units: get_u64(doc, &map, "units")?,
            start_ms: get_u64(doc, &map, "start_ms")?,
            plan: decode_postcard(&get_bytes(doc, &map, "plan")?, "plan")?,
            max_per_buyer: match scalar(doc, &map, "max_per_buyer") {
                None => None,
                Some(_) => Some(get_u64(doc, &map, "max_per_buyer")?),
            },
        },
        other => return Err(DecodeError { field: "kind", problem: format!("unknown kind {other:?}") }),
    };
    Ok(Event { time_ms, body })
}

fn optional_str(doc: &Automerge, obj: &ObjId, key: &'static str) -> Result<Option<String>, DecodeError> {
    match scalar(doc, obj, key) {
        Some(ScalarValue::Str(s)) => Ok(Some(s.to_string())),
        None => Ok(None),
        Some(_) => Err(missing(key)),
    }
}
