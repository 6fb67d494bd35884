//! What the POS page uses beyond the resources: staff sessions, recommendation feedback, key
//! figures, a card's QR read from a photo, and the live event stream's messages.

use crate::request;
use serde::{Deserialize, Serialize};

// ---- staff sessions

/// `GET /api/v1/session`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SessionView {
    /// Whether this node asks for a staff sign-in (it is reachable from the LAN).
    pub required: bool,
    pub signed_in: bool,
    pub staff: Option<String>,
    /// Who may sign in here (names only), for the sign-in screen.
    pub staff_names: Vec<String>,
}

request! {
    /// `POST /api/v1/session`.
    pub struct SignInRequest {
        pub staff: String,
        pub pin: String,
    }
}

/// `201` of `POST /api/v1/session` (the session itself is an HttpOnly cookie).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SignedInView {
    pub staff: String,
    pub expires_in_ms: u64,
}

// ---- recommendation feedback

request! {
    /// `POST /api/v1/recommendations/feedback`: staff dismissed a recommendation (with a reason)
    /// or overrode it with a product they chose.
    pub struct FeedbackRequest {
        /// `"dismiss"` or `"override"`.
        pub action: String,
        /// The recommended SKU.
        pub sku: String,
        /// Required for a dismissal: `not_relevant`, `out_of_stock`, `customer_declined`, `other`.
        /// An override's reason is `staff_choice` unless given.
        #[serde(default)]
        pub reason: Option<String>,
        /// Required for an override: the SKU staff chose instead.
        #[serde(default)]
        pub chosen_sku: Option<String>,
        /// The basket the recommendation was shown for.
        #[serde(default)]
        pub basket: Vec<String>,
        /// The arm that showed it (`"treatment"`).
        pub arm: String,
    }
}

/// One recorded feedback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FeedbackView {
    pub device: String,
    pub seq: u64,
    pub time_ms: u64,
    pub action: String,
    pub sku: String,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen_sku: Option<String>,
    pub basket: Vec<String>,
    pub arm: String,
}

/// Feedback recorded for one (action, reason) across the market.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FeedbackCount {
    pub action: String,
    pub reason: String,
    pub count: u64,
}

/// `GET /api/v1/recommendations/feedback`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FeedbackList {
    pub total: u64,
    pub by_reason: Vec<FeedbackCount>,
    /// Newest first (by the recording device's clock), at most the limit asked for.
    pub recent: Vec<FeedbackView>,
}

// ---- key figures

/// Sales in one clock hour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HourFigures {
    pub hour_start_ms: u64,
    pub sales: u64,
    pub revenue_cents: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TopProduct {
    pub sku: String,
    pub name: Option<String>,
    pub units: u64,
    pub revenue_cents: u64,
}

/// The recommendation experiment: conversion per arm and the lift with a 95% interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LiftFigures {
    pub treatment: crate::ArmConversion,
    pub control: crate::ArmConversion,
    pub lift: Option<f64>,
    /// 95% interval of the lift (log relative risk ± 1.96 standard errors); `None` until both
    /// arms have conversions.
    pub lift_ci_low: Option<f64>,
    pub lift_ci_high: Option<f64>,
}

/// `GET /api/v1/kpis`: the market's figures over its replicated sales since `since_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Kpis {
    pub since_ms: u64,
    /// The currency of the figures (sales in other currencies are left out and counted).
    pub currency: Option<String>,
    pub other_currency_sales: u64,
    pub sales: u64,
    pub revenue_cents: u64,
    pub average_order_cents: Option<u64>,
    /// Hours in which the market sold anything: a pop-up's open hours.
    pub open_hours: u64,
    pub revenue_per_open_hour_cents: Option<u64>,
    /// Oldest first.
    pub per_hour: Vec<HourFigures>,
    /// Most revenue first.
    pub top_products: Vec<TopProduct>,
    pub lift: LiftFigures,
}

// ---- a card's QR from a photo

/// `POST /api/v1/loyalty/scan` (body: a JPEG or PNG).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ScannedCard {
    pub qr_text: String,
    pub took_us: u64,
}

// ---- the live event stream (`GET /api/v1/events`, server-sent events)

/// A sale in a `commit` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SaleNotice {
    pub sale_id: String,
    pub device: String,
    pub total_cents: u64,
    pub currency: String,
    pub time_ms: u64,
}

/// `event: commit`: entries committed on this node (recorded here or arrived from a peer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CommitNotice {
    pub commit: u64,
    /// `"local"` or `"remote"`.
    pub origin: String,
    /// What the entries changed: `sale`, `stock`, `product`, `photo`, `loyalty`, `mesh`, `feedback`.
    pub kinds: Vec<String>,
    pub sales: Vec<SaleNotice>,
}

/// `event: status`, every second.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StatusNotice {
    pub peers_connected: u64,
    /// This device's sales that no other device (peer or cloud) is known to hold yet.
    pub unshared_sales: u64,
    pub cloud_offset: Option<u64>,
}
