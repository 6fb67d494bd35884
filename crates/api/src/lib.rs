//! The node's HTTP API contract (`/api/v1`): the request bodies it accepts and the responses it
//! gives, as types of their own.
//!
//! Architecture invariant: nothing here depends on the ledger, the sync core or the store; the
//! node maps its internals into these types, so internals (automerge positions, lamport clocks,
//! sync sessions) can change without a client noticing. Device ids are 64 hex characters; amounts
//! are integer cents with their currency; times are milliseconds since the Unix epoch (`_ms`),
//! durations `_us` or `_ms` as named.
//!
//! Requests are strict: a JSON object with exactly the documented keys (see [`strict`]).

pub mod drops;
pub mod loyalty;
pub mod strict;
pub mod till;

pub use loyalty::{SaleLoyaltyRequest, SaleLoyaltyView};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

// ---- errors

/// Every error answer: a stable machine-readable `error` code and a message for people.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Box<RightsShortfall>>,
    /// `insufficient_points`: where the card's points are held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub points: Option<Box<loyalty::PointsShortfall>>,
}

/// `insufficient_stock_rights`: who holds the units this device lacks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RightsShortfall {
    pub sku: String,
    pub requested: u64,
    pub held_here: u64,
    pub held_elsewhere_total: u64,
    /// Device → units it holds.
    pub held_elsewhere: BTreeMap<String, u64>,
    /// With a mesh: how much of that sits on devices this one cannot reach now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_on_unreachable_devices: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reachable_devices: Option<Vec<String>>,
    /// How long the sale waited for a transfer from a reachable peer before it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waited_ms: Option<u64>,
}

// ---- catalogue

request! {
    /// `POST /api/v1/products`.
    pub struct NewProduct {
        pub sku: String,
        pub name: String,
        pub price_cents: u64,
        pub currency: String,
        pub stall: String,
        #[serde(default)]
        pub tags: Vec<String>,
    }
}

request! {
    /// `PUT /api/v1/products/{sku}`: the whole product (the SKU may be repeated, and must match).
    pub struct ProductUpdate {
        #[serde(default)]
        pub sku: Option<String>,
        pub name: String,
        pub price_cents: u64,
        pub currency: String,
        pub stall: String,
        #[serde(default)]
        pub tags: Vec<String>,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProductView {
    pub sku: String,
    pub name: String,
    pub price_cents: u64,
    pub currency: String,
    pub stall: String,
    pub tags: Vec<String>,
    pub has_photo: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProductList {
    pub products: Vec<ProductView>,
}

/// `PUT /api/v1/products/{sku}/photo`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PhotoAttached {
    pub sku: String,
    /// Size of the JPEG kept in the journal (shrunk from the upload).
    pub photo_bytes: usize,
    pub seq: u64,
}

// ---- stock

request! {
    /// `POST /api/v1/restocks`: units received at this device.
    pub struct RestockRequest {
        pub sku: String,
        pub qty: u64,
    }
}

request! {
    /// `POST /api/v1/transfers`: stock rights handed from this device to another.
    pub struct TransferRequest {
        pub sku: String,
        pub qty: u64,
        pub to_device: String,
    }
}

/// A restock or a transfer, recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StockMovement {
    pub sku: String,
    pub qty: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_device: Option<String>,
    pub seq: u64,
    /// Rights this device holds for the SKU afterwards.
    pub rights_here: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StockRow {
    pub sku: String,
    pub name: Option<String>,
    pub total: u64,
    pub this_device: u64,
    pub per_device: BTreeMap<String, u64>,
    /// With a mesh: units held by peers this device reaches now (it can ask them for units)…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reachable_peers: Option<u64>,
    /// …and by devices it cannot reach now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreachable: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StockList {
    pub device: String,
    pub stock: Vec<StockRow>,
}

// ---- sales

request! {
    /// One line of a sale: a SKU and a quantity (the price comes from the catalogue).
    pub struct SaleLineRequest {
        pub sku: String,
        pub qty: u64,
    }
}

request! {
    /// What `GET /api/v1/recommendations` showed (or held back) for a basket; sent back with the sale.
    pub struct RecommendationRecord {
        /// `"treatment"` (shown) or `"control"` (held back, recorded for comparison).
        pub arm: String,
        pub skus: Vec<String>,
    }
}

request! {
    /// `POST /api/v1/sales`.
    pub struct SaleRequest {
        pub lines: Vec<SaleLineRequest>,
        /// The till's own id for this sale: a retry with the same one returns the sale recorded.
        #[serde(default)]
        pub client_ref: Option<String>,
        /// The `record` from `GET /api/v1/recommendations`, when recommendations were asked for.
        #[serde(default)]
        pub recommendation: Option<RecommendationRecord>,
        /// A loyalty card on the sale: it earns points, and may redeem some for a discount.
        #[serde(default)]
        pub loyalty: Option<SaleLoyaltyRequest>,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SaleLineView {
    pub sku: String,
    pub qty: u64,
    /// Unit price when sold.
    pub price_cents: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SaleView {
    pub id: String,
    pub device: String,
    pub lines: Vec<SaleLineView>,
    pub total_cents: u64,
    pub currency: String,
    /// The selling device's clock.
    pub time_ms: u64,
    pub client_ref: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recommendation: Option<RecommendationRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loyalty: Option<SaleLoyaltyView>,
    /// The signed-in staff member who sold (tills with staff sign-in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staff: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SalesSummary {
    pub sales: u64,
    pub units: u64,
    /// Currency → revenue.
    pub revenue_cents: BTreeMap<String, u64>,
    /// Start of the hour (ms since the epoch) → revenue in that hour.
    #[schema(value_type = BTreeMap<String, u64>)]
    pub revenue_cents_per_hour: BTreeMap<u64, u64>,
    pub average_order_cents: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SalesList {
    pub summary: SalesSummary,
    /// Newest first.
    pub sales: Vec<SaleView>,
}

// ---- search and recommendations

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SearchHit {
    pub sku: String,
    pub name: String,
    pub score: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub semantic: Option<f32>,
    pub lexical: f32,
    /// `"sku"` or `"name"` when the query is exactly that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SearchResults {
    pub query: String,
    /// `"hybrid"` (words and meaning) or `"lexical"` (words only: no text model).
    pub mode: String,
    pub query_embedding_cached: bool,
    /// `"off"`, `"loading"` or `"ready"`.
    pub inference: String,
    pub hits: Vec<SearchHit>,
    pub took_us: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImageSearchResults {
    pub hits: Vec<SearchHit>,
    pub took_us: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RecommendationView {
    pub sku: String,
    pub name: String,
    pub score: f32,
    /// Sales in which this product was bought with a basket item.
    pub bought_together: u32,
    /// `"bought_together"` or `"similar_to_bought_together"`.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Recommendations {
    pub basket: Vec<String>,
    pub arm: String,
    /// Empty in the control arm.
    pub recommendations: Vec<RecommendationView>,
    /// Send this back as the sale's `recommendation`.
    pub record: RecommendationRecord,
    pub took_us: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ArmConversion {
    pub sales: u64,
    pub converted: u64,
    pub conversion_rate: Option<f64>,
}

/// Conversion by experiment arm over the market's replicated sales.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RecommendationLift {
    pub treatment: ArmConversion,
    pub control: ArmConversion,
    /// Treatment conversion over control, minus one; `None` until both arms have sales.
    pub lift: Option<f64>,
    pub treatment_percent_here: u8,
}

// ---- node status

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeView {
    pub market_name: String,
    pub market_id: String,
    pub device: String,
    pub stall: String,
    /// `"seller"` or `"organiser"`.
    pub role: String,
    pub demo: bool,
    pub store_path: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SetAsideView {
    pub moved_to: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RecoveryView {
    /// `"empty_store"`, `"store_set_aside"`, `"stale_store"` or `"interrupted"`.
    pub cause: String,
    pub since_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder_heard_ms: Option<u64>,
    pub entries_recovered: u64,
    pub entries_held_by_peers: u64,
    pub peers_heard: usize,
    pub message: String,
}

/// This device's own journal: `"ready"`, `"recovering"` (taken back from peers) or `"cloned"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JournalView {
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery: Option<RecoveryView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Status {
    pub node: NodeView,
    /// This device's sales no other device (a peer, as its heads say, or the cloud) holds yet.
    #[serde(default)]
    pub unshared_sales: u64,
    pub devices: usize,
    pub products: usize,
    pub sales: usize,
    pub pending_changes: usize,
    /// Device → journal entries of it held here.
    pub heads: BTreeMap<String, u64>,
    pub journal: JournalView,
    pub equivocations: usize,
    pub store_set_aside: Option<SetAsideView>,
    /// What the cloud holds, as its latest watermark says (replicated through the mesh, so a tablet
    /// that never had connectivity shows it too), and this tablet's own uplink, if configured.
    pub cloud: CloudStatus,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CloudStatus {
    /// `None`: no watermark has reached this tablet yet.
    pub watermark: Option<CloudWatermarkView>,
    /// This device's sales the cloud does not hold yet (by the watermark; all of them without one).
    pub sales_not_uploaded: u64,
    /// Journal entries of all devices held here that the watermark does not cover.
    pub entries_not_uploaded: u64,
    /// `None`: this tablet has no `cloud.url`.
    pub uplink: Option<UplinkView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CloudWatermarkView {
    /// The cloud device that recorded it.
    pub cloud_device: String,
    /// When the cloud recorded it (the cloud's clock).
    pub recorded_at_ms: u64,
    /// Entries in the cloud's reconciled log of this market.
    pub offset: u64,
    /// The newest of this device's changes the cloud holds, by this device's clock: "the cloud
    /// holds everything up to 14:32".
    pub this_device_through_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UplinkView {
    pub url: String,
    /// `"connected"` (last request succeeded), `"retrying"` or `"starting"`.
    pub state: String,
    pub last_success_ms: Option<u64>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    /// Entries this tablet holds that the cloud lacks, by the cloud's last reply.
    pub lacking: u64,
    pub changes_uploaded: u64,
    pub duplicates_reported: u64,
    pub refused_by_cloud: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelView {
    pub name: String,
    pub file: String,
    pub loaded: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct IndexView {
    pub products: usize,
    pub embedded: usize,
    pub with_photo: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InferenceHealth {
    /// `"off"`, `"loading"` or `"ready"`.
    pub state: String,
    pub models: Vec<ModelView>,
    pub index: IndexView,
}

/// `GET /healthz`: `status` is `"ok"` (200) or `"failed"` (503, with `reason`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Health {
    pub status: String,
    pub device: String,
    pub demo: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference: Option<InferenceHealth>,
    pub store_set_aside: Option<SetAsideView>,
}

// ---- mesh

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PeerView {
    pub peer_id: String,
    pub device: String,
    pub stall: String,
    /// `"in_sync"`, `"catching_up"` (this node lacks entries the peer holds) or
    /// `"peer_catching_up"`.
    pub state: String,
    pub connected_for_ms: u64,
    pub last_heard_ms_ago: u64,
    /// Journal entries this node holds that the peer did not, as of its last heads.
    pub behind: u64,
    /// Journal entries the peer holds that this node does not (yet).
    pub ahead: u64,
    pub messages_in: u64,
    pub messages_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub changes_in: u64,
    pub changes_out: u64,
    /// Bytes sent to the peer and not yet reported delivered.
    pub in_flight_bytes: usize,
}

/// Counters of the mesh since the node started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MeshCounters {
    pub messages_in: u64,
    pub messages_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub changes_sent: u64,
    pub changes_received: u64,
    /// Malformed or oversized messages, by kind (the peer was dropped).
    pub protocol_errors: BTreeMap<String, u64>,
    pub liveness_disconnects: u64,
    pub peers_refused: u64,
    /// Serves paused because a peer had too many bytes in flight.
    pub serving_paused: u64,
    /// Peer heads views that did not add up (a lost heads message), repaired by one full heads.
    pub full_heads_wanted: u64,
    /// Changes served and not confirmed within the liveness timeout (served again).
    pub unconfirmed_expired: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MeshView {
    pub peer_id: String,
    pub listen_addrs: Vec<String>,
    pub peers: Vec<PeerView>,
    /// Peer id → why it was refused (bad enrolment, revoked).
    pub refused: BTreeMap<String, String>,
    pub stats: MeshCounters,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ArrivalView {
    pub sale_id: String,
    /// When the sale was recorded, on its device's clock.
    pub recorded_ms: u64,
    /// When it arrived here, on this device's clock.
    pub arrived_us: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Arrivals {
    pub arrivals: Vec<ArrivalView>,
}

// ---- changes and equivocations

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RejectedChange {
    pub device: String,
    pub seq: u64,
    pub reason: String,
    pub message: String,
}

/// `POST /api/v1/changes`: what became of pushed changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChangesReport {
    pub applied: usize,
    pub duplicates: usize,
    /// Held until a predecessor arrives.
    pub pending: usize,
    pub rejected: Vec<RejectedChange>,
}

/// What one journal entry recorded, by kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventView {
    Sale { sale_id: String, lines: Vec<SaleLineView>, total_cents: u64, currency: String, client_ref: Option<String> },
    Enrolment,
    Product { sku: String },
    Restock { sku: String, qty: u64 },
    Transfer { sku: String, qty: u64, to_device: String },
    Photo { sku: String },
    Revocation { device: String },
    CloudWatermark { offset: u64 },
    /// `asset`: `points` (of card `id`) or `voucher` (`id`).
    LoyaltyTransfer { asset: String, id: String, qty: u64, to_device: String },
    VoucherMinted { voucher: String },
    VoucherRedeemed { voucher: String, proven: bool },
    RecommendationFeedback { action: String, sku: String, reason: String },
    Drop { drop_id: String, name: String, sku: String, units: u64, start_ms: u64 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChangeView {
    pub seq: u64,
    /// SHA-256 of the signed change, hex: tells two changes at one position apart.
    pub digest: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<EventView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_unreadable: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EquivocatedPosition {
    pub seq: u64,
    /// The change held (and applied) here, if this node holds one.
    pub held: Option<ChangeView>,
    pub conflicting: Vec<ChangeView>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EquivocatingDevice {
    pub device: String,
    pub this_device: bool,
    pub positions: Vec<EquivocatedPosition>,
}

/// `GET /api/v1/equivocations`: devices seen signing two histories.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Equivocations {
    pub conflicting_changes: usize,
    pub devices: Vec<EquivocatingDevice>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Revoked {
    pub revoked: String,
}

pub mod cloud;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sale_is_an_object_of_objects_and_nothing_else() {
        let sale: SaleRequest = serde_json::from_str(r#"{"lines":[{"sku":"BEE-CND","qty":1}],"client_ref":"t-1"}"#).unwrap();
        assert_eq!(sale.lines, vec![SaleLineRequest { sku: "BEE-CND".into(), qty: 1 }]);
        assert_eq!(sale.client_ref.as_deref(), Some("t-1"));
        // serde's derived struct form would take these as a sale of one candle.
        for body in [
            r#"{"lines":[["BEE-CND",1]]}"#,
            r#"[[{"sku":"BEE-CND","qty":1}]]"#,
            r#"{"lines":[{"sku":"BEE-CND","qty":1}],"recommendation":["treatment",[]]}"#,
        ] {
            let err = serde_json::from_str::<SaleRequest>(body).unwrap_err().to_string();
            assert!(err.contains("expected a JSON object"), "{body}: {err}");
        }
        let err = serde_json::from_str::<SaleRequest>(r#"{"lines":[{"sku":"B","qty":1,"price_cents":1}]}"#).unwrap_err().to_string();
        assert!(err.contains("unknown field `price_cents`"), "{err}");
        let err = serde_json::from_str::<SaleRequest>(r#"{"lines":[{"sku":"B"}]}"#).unwrap_err().to_string();
        assert!(err.contains("missing field `qty`"), "{err}");
    }

    #[test]
    fn optional_request_keys_may_be_left_out_and_round_trip() {
        let p: NewProduct = serde_json::from_str(r#"{"sku":"A","name":"a","price_cents":1,"currency":"EUR","stall":"s"}"#).unwrap();
        assert!(p.tags.is_empty());
        let again: NewProduct = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(again, p);
        let e = EventView::Transfer { sku: "A".into(), qty: 2, to_device: "ab".into() };
        assert_eq!(serde_json::to_value(&e).unwrap()["kind"], "transfer");
    }
}
