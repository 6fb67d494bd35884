//! `/api/v1/loyalty`: cards, vouchers, exposures; and a sale's loyalty.
//!
//! Card ids and voucher ids are 16 hex characters; a card travels as its QR text (`SMC1:…`).

use crate::request;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

request! {
    /// `POST /api/v1/loyalty/cards`: issue a card on this device.
    pub struct IssueCardRequest {
        /// The customer's phone wallet key (64 hex characters): the card then needs the wallet's
        /// answer to a challenge to redeem. Without one it is a bearer card (printed).
        #[serde(default)]
        pub holder_public_key: Option<String>,
        /// Days until the card expires; without it, it does not expire.
        #[serde(default)]
        pub expires_in_days: Option<u32>,
    }
}

/// `201` of `POST /api/v1/loyalty/cards`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CardIssued {
    pub id: String,
    /// What the QR code holds (QR alphanumeric mode, at most 250 characters).
    pub qr_text: String,
    /// The QR code as an SVG image, ready to show or print.
    pub qr_svg: String,
    pub issuer: String,
    pub issued_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    pub phone_wallet: bool,
}

/// `GET /api/v1/loyalty/cards/{id or QR text}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CardView {
    pub id: String,
    /// Points earned and not redeemed.
    pub balance_points: u64,
    pub points_earned: u64,
    pub points_redeemed: u64,
    /// Redeemed from offline budgets, without proof.
    pub points_unproven: u64,
    /// Device → points of this card it holds: where the balance can be spent with proof.
    pub held: BTreeMap<String, u64>,
    pub held_here: u64,
    /// Of `held`, the points on devices this one reaches now (itself included).
    pub held_reachable: u64,
    /// What this device may still redeem of this card without proof.
    pub offline_budget_left: u64,
    /// Sales that carried the card, newest first (at most 50).
    pub sales: Vec<String>,
    /// Points spent twice, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exposure: Option<ExposureView>,
    /// The token's own fields, when the card was looked up by its QR text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<CardTokenView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CardTokenView {
    pub issuer: String,
    pub issued_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    pub phone_wallet: bool,
}

request! {
    /// A sale's `loyalty`: the card (its QR text), and points to redeem for a discount.
    pub struct SaleLoyaltyRequest {
        pub card: String,
        #[serde(default)]
        pub redeem_points: u64,
        /// For a phone wallet card: the challenge from `GET /api/v1/loyalty/challenge`, and the
        /// wallet's signature over it (128 hex characters).
        #[serde(default)]
        pub challenge: Option<String>,
        #[serde(default)]
        pub holder_signature: Option<String>,
    }
}

/// A sale's loyalty as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SaleLoyaltyView {
    pub card: String,
    pub points_earned: u64,
    /// Redeemed from points this device held.
    pub points_redeemed: u64,
    /// Redeemed from this device's offline budget (it could not reach the holder).
    pub points_unproven: u64,
    /// Taken off the sale's `total_cents`.
    pub discount_cents: u64,
}

/// `GET /api/v1/loyalty/challenge`: a phone wallet signs this to prove it holds its card.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChallengeView {
    pub challenge: String,
    pub expires_in_ms: u64,
}

request! {
    /// `POST /api/v1/loyalty/vouchers`: mint `count` single-use vouchers on this device.
    pub struct MintVouchersRequest {
        pub label: String,
        #[serde(default)]
        pub value_cents: u64,
        /// 1..=1000; a limited edition of N for a drop is N vouchers labelled "#k of N".
        #[serde(default)]
        pub count: Option<u32>,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VoucherView {
    pub id: String,
    pub label: String,
    pub value_cents: u64,
    pub minted_by: Vec<String>,
    /// Device → 1 while it holds the right to redeem it.
    pub held_by: Vec<String>,
    /// `open`, `redeemed`, or `exposed` (redeemed more than once).
    pub status: String,
    pub redemptions: Vec<RedemptionView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RedemptionView {
    pub device: String,
    pub seq: u64,
    pub proven: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VoucherList {
    pub vouchers: Vec<VoucherView>,
}

/// Something spent twice, found identically by every replica holding the same changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExposureView {
    /// `points` (of a card) or `voucher`.
    pub asset: String,
    pub id: String,
    /// Points beyond what the card earned, or redemptions beyond the voucher's one.
    pub units: u64,
    pub redemptions: u64,
    /// The signed redemptions (journal positions), unproven first.
    pub evidence: Vec<RedemptionView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ExposureList {
    pub exposures: Vec<ExposureView>,
    pub points_exposed: u64,
    pub vouchers_exposed: u64,
}

/// `insufficient_points`: where a card's points are and whether this device can reach them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PointsShortfall {
    pub card: String,
    pub requested: u64,
    pub held_here: u64,
    pub held_elsewhere: BTreeMap<String, u64>,
    /// Devices holding points that this one reaches now.
    pub reachable_holders: Vec<String>,
    pub offline_budget_left: u64,
}
