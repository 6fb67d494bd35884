//! The cloud service's JSON: its reconciled log as consumers read it (`GET
//! /v1/markets/{market}/events`, NDJSON, one [`LogEvent`] per line; the same body is PostgreSQL's
//! `events.body`), market registration and status.

use crate::SaleLineView;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One entry of a market's reconciled log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LogEvent {
    /// Market id, 32 hex characters.
    pub market: String,
    /// 1, 2, 3, … without gaps, per market.
    pub offset: u64,
    /// The signing device, 64 hex characters, and the position in its journal.
    pub device: String,
    pub seq: u64,
    /// The author's clock when it was recorded.
    pub time_ms: u64,
    /// SHA-256 of the signed change, hex.
    pub digest: String,
    #[serde(flatten)]
    pub body: LogBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LogBody {
    Enrolment { stall: String, role: String, expires_at_ms: u64 },
    Product { sku: String, name: String, price_cents: u64, currency: String, stall: String, tags: Vec<String>, lamport: u64 },
    Restock { sku: String, qty: u64 },
    Transfer { sku: String, qty: u64, to_device: String },
    Sale {
        sale_id: String,
        lines: Vec<SaleLineView>,
        total_cents: u64,
        currency: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_ref: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        recommendation: Option<RecommendationRecord>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        loyalty: Option<crate::SaleLoyaltyView>,
        /// The signed-in staff member who sold.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        staff: Option<String>,
    },
    Photo { sku: String, jpeg_bytes: u64, lamport: u64 },
    Revocation { device: String, revoked_at_ms: u64 },
    /// The cloud's watermark: its log held `covers_offset` entries, and of each listed device's
    /// journal the first `heads` entries (named apart from the event's own `offset`, which it
    /// flattens beside). It lists only the devices whose count grew since the cloud's previous
    /// watermark; what the cloud holds of a device is its highest count over all watermarks.
    CloudWatermark { covers_offset: u64, heads: BTreeMap<String, u64> },
    /// Loyalty rights moved: `asset` is `points` (of `card`) or `voucher`.
    LoyaltyTransfer { asset: String, id: String, qty: u64, to_device: String },
    VoucherMinted { voucher: String, label: String, value_cents: u64 },
    VoucherRedeemed { voucher: String, proven: bool },
    /// Staff dismissed (`action: "dismiss"`) or overrode (`"override"`, with `chosen_sku`) a
    /// recommendation: feedback for retraining.
    RecommendationFeedback {
        action: String,
        sku: String,
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        chosen_sku: Option<String>,
        basket: Vec<String>,
        arm: String,
    },
    /// An organiser's drop: `units` of `sku` released at `start_ms`, split by `plan` (device → units).
    Drop {
        drop_id: String,
        name: String,
        sku: String,
        units: u64,
        start_ms: u64,
        plan: BTreeMap<String, u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_per_buyer: Option<u64>,
    },
}

impl LogBody {
    /// The `kind` field's value.
    pub fn kind(&self) -> &'static str {
        match self {
            LogBody::Enrolment { .. } => "enrolment",
            LogBody::Product { .. } => "product",
            LogBody::Restock { .. } => "restock",
            LogBody::Transfer { .. } => "transfer",
            LogBody::Sale { .. } => "sale",
            LogBody::Photo { .. } => "photo",
            LogBody::Revocation { .. } => "revocation",
            LogBody::CloudWatermark { .. } => "cloud_watermark",
            LogBody::LoyaltyTransfer { .. } => "loyalty_transfer",
            LogBody::VoucherMinted { .. } => "voucher_minted",
            LogBody::VoucherRedeemed { .. } => "voucher_redeemed",
            LogBody::RecommendationFeedback { .. } => "recommendation_feedback",
            LogBody::Drop { .. } => "drop",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RecommendationRecord {
    /// `"treatment"` or `"control"`.
    pub arm: String,
    pub skus: Vec<String>,
}

/// A registered market, as `GET /v1/markets/{market}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MarketView {
    pub market: String,
    pub name: String,
    pub cloud_device: String,
    /// Entries in the reconciled log.
    pub offset: u64,
    /// Device → journal entries the cloud holds.
    pub heads: BTreeMap<String, u64>,
    /// Changes refused since this process started, by reason.
    pub rejected: BTreeMap<String, u64>,
    pub duplicates: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MarketList {
    pub markets: Vec<MarketSummary>,
}

/// One market in `GET /v1/markets`: read from the store alone, so listing a cloud of many markets
/// loads none of their logs (`GET /v1/markets/{market}` has the heads and counts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MarketSummary {
    pub market: String,
    pub name: String,
    pub cloud_device: String,
    /// Entries in the reconciled log.
    pub offset: u64,
}

/// `POST /v1/markets` (with the cloud's admin token): register a market with the credentials of
/// the cloud's own device of it, as `stallmesh device enroll --role cloud` wrote them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterMarket {
    pub name: String,
    /// The market's public key, 64 hex characters.
    pub market_public_key: String,
    /// The cloud device's enrolment certificate, hex of its binary (postcard) form.
    pub certificate: String,
    /// The cloud device's secret key, 64 hex characters.
    pub device_key: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MarketRegistered {
    pub market: String,
    pub cloud_device: String,
    /// `false`: it was registered already, with this same device; nothing changed.
    pub created: bool,
}

/// Every error answer of the cloud: a stable code, a sentence, and for a partly refused upload
/// what was refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CloudErrorBody {
    pub error: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<UploadRefused>,
    /// `sold_out` (HTTP 409): where the units are, and whether some may come back online.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sold_out: Option<SoldOutView>,
}

// ---- the online channel: `/v1/markets/{market}/online`, `/v1/markets/{market}/drops/{drop}/…`

/// `PUT /v1/markets/{market}/online` (with the cloud's admin token): the market's online channel,
/// a device the organiser enrolled with role `online` (`stallmesh device enroll --role online`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetOnlineChannel {
    /// Its enrolment certificate, hex of its binary (postcard) form.
    pub certificate: String,
    /// Its secret key, 64 hex characters.
    pub device_key: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OnlineChannelSet {
    pub market: String,
    /// The online device: plan drops with a share for it.
    pub online_device: String,
    /// `false`: it was set up already, with this same device.
    pub created: bool,
}

/// `POST /v1/markets/{market}/drops/{drop}/holds`, with an `Idempotency-Key` header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceHold {
    /// The buyer as the shop knows them (an account id): limits per buyer count by it.
    pub buyer: String,
    pub qty: u64,
}

/// A buyer's hold on units of a drop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HoldView {
    pub id: String,
    pub drop: String,
    pub sku: String,
    pub buyer: String,
    pub qty: u64,
    /// `held`, `paid` or `expired`.
    pub status: String,
    pub placed_at_ms: u64,
    pub expires_at_ms: u64,
    /// 0 once expired or paid.
    pub expires_in_ms: u64,
    /// The online device's sale, once paid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sale_id: Option<String>,
}

/// `POST /v1/markets/{market}/drops/{drop}/orders`, with an `Idempotency-Key` header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrder {
    pub hold: String,
}

/// A paid hold: the online device's sale, in the market's log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OrderView {
    pub sale_id: String,
    pub hold: String,
    pub drop: String,
    pub sku: String,
    pub qty: u64,
    pub total_cents: u64,
    pub currency: String,
    /// The market log's length once the sale was in it.
    pub offset: u64,
}

/// `sold_out`: nothing free online now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SoldOutView {
    pub available_online: u64,
    /// Units in other buyers' unpaid holds: they come back if not paid in time.
    pub in_holds: u64,
    /// Units the stalls hold.
    pub held_at_stalls: u64,
    /// Whether units may still become available online (holds expiring, stalls' units moved).
    pub may_return: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_expiry_ms: Option<u64>,
}

/// `GET /v1/markets/{market}/drops/{drop}`: a drop as the online channel sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OnlineDrop {
    pub drop_id: String,
    pub name: String,
    pub sku: String,
    pub units: u64,
    pub start_ms: u64,
    /// `scheduled`, `open` or `sold_out` (nothing free online).
    pub status: String,
    pub opens_in_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_per_buyer: Option<u64>,
    pub online_device: String,
    /// Free to hold now.
    pub available_online: u64,
    pub in_holds: u64,
    pub held_at_stalls: u64,
    pub sold_online: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_expiry_ms: Option<u64>,
}

/// `changes_rejected` (HTTP 422): the upload's good changes were logged, these were not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UploadRefused {
    pub accepted: u64,
    pub duplicates: u64,
    pub offset: u64,
    pub rejected: Vec<RejectedView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RejectedView {
    pub device: String,
    pub seq: u64,
    /// Stable label: `bad_signature`, `wrong_market`, `unenrolled`, `revoked`, `equivocation`, …
    pub reason: String,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_log_event_round_trips_through_its_ndjson_line_with_no_field_named_twice() {
        let bodies = vec![
            LogBody::CloudWatermark { covers_offset: 2, heads: BTreeMap::from([("ab".to_string(), 1)]) },
            LogBody::Sale {
                sale_id: "s".into(),
                lines: vec![SaleLineView { sku: "X".into(), qty: 1, price_cents: 5 }],
                total_cents: 5,
                currency: "EUR".into(),
                client_ref: None,
                recommendation: Some(RecommendationRecord { arm: "control".into(), skus: vec!["Y".into()] }),
                loyalty: Some(crate::SaleLoyaltyView {
                    card: "0101010101010101".into(),
                    points_earned: 5,
                    points_redeemed: 1,
                    points_unproven: 2,
                    discount_cents: 3,
                }),
                staff: Some("Ana".into()),
            },
            LogBody::VoucherRedeemed { voucher: "v".into(), proven: false },
            LogBody::LoyaltyTransfer { asset: "points".into(), id: "c".into(), qty: 4, to_device: "t".into() },
            LogBody::RecommendationFeedback {
                action: "override".into(),
                sku: "A".into(),
                reason: "staff_choice".into(),
                chosen_sku: Some("B".into()),
                basket: vec!["C".into()],
                arm: "treatment".into(),
            },
            LogBody::Enrolment { stall: "s".into(), role: "cloud".into(), expires_at_ms: 1 },
            LogBody::Drop {
                drop_id: "d".into(),
                name: "n".into(),
                sku: "S".into(),
                units: 3,
                start_ms: 4,
                plan: BTreeMap::from([("x".to_string(), 3)]),
                max_per_buyer: Some(1),
            },
        ];
        for body in bodies {
            let event = LogEvent { market: "m".into(), offset: 7, device: "d".into(), seq: 3, time_ms: 9, digest: "h".into(), body };
            let line = serde_json::to_string(&event).unwrap();
            // A flattened body must not shadow the envelope's fields (a consumer resuming from
            // `offset` would read the wrong one).
            let keys: Vec<&str> = line.match_indices("\"offset\":").map(|(i, _)| &line[i..i + 9]).collect();
            assert_eq!(keys.len(), 1, "{line}");
            assert_eq!(serde_json::from_str::<LogEvent>(&line).unwrap(), event);
        }
    }
}
