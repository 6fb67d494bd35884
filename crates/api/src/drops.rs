//! Drops: a limited number of units of one SKU released at a set time and split between the
//! market's devices (stalls' tablets and the online channel) by the organiser's plan.

use crate::request;
use serde::{Deserialize, Serialize};

request! {
    /// One device's share of a drop.
    pub struct DropShare {
        /// 64 hex characters.
        pub device: String,
        pub units: u64,
    }
}

request! {
    /// `POST /api/v1/drops` (an organiser's device): `units` new units of `sku`, none of which
    /// sells before `start_ms`, split by `plan` (shares adding up to `units`, each device once).
    pub struct DropRequest {
        pub name: String,
        pub sku: String,
        pub units: u64,
        /// Milliseconds since the Unix epoch. In the past: open at once.
        pub start_ms: u64,
        pub plan: Vec<DropShare>,
        /// Units the online channel sells one buyer (1..=units); absent: no limit.
        pub max_per_buyer: Option<u64>,
    }
}

/// One device's part in a drop: what the plan gave it, what it holds now, what it sold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DropChannel {
    pub device: String,
    /// The device answering: "here" on its till.
    pub this_device: bool,
    pub stall: Option<String>,
    /// `seller`, `organiser`, `online`; absent for a device whose enrolment has not arrived here.
    pub role: Option<String>,
    /// Units the plan gave it.
    pub planned: u64,
    /// Units of the SKU it holds now (rights move between devices as they sell).
    pub held: u64,
    /// Units of the SKU it sold since the drop opened.
    pub sold: u64,
}

/// A drop as this device knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DropView {
    pub id: String,
    pub name: String,
    pub sku: String,
    pub units: u64,
    pub start_ms: u64,
    pub max_per_buyer: Option<u64>,
    /// `scheduled` (before `start_ms` by this device's clock), `open`, or `sold_out` (no device
    /// holds a unit of the SKU).
    pub status: String,
    /// Until the drop opens, by this device's clock; 0 once open.
    pub opens_in_ms: u64,
    /// The organiser's device that planned it.
    pub planned_by: String,
    /// Units of the SKU sold since the drop opened, over every device.
    pub sold: u64,
    /// Units of the SKU still held over every device.
    pub left: u64,
    /// When the last unit sold (the seller's clock), once sold out.
    pub sold_out_at_ms: Option<u64>,
    /// Each device of the plan, and any other that has held or sold the SKU since.
    pub channels: Vec<DropChannel>,
}

/// `GET /api/v1/drops`: every drop this device knows, latest start first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DropList {
    pub drops: Vec<DropView>,
}
