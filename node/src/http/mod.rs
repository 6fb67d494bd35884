//! The HTTP API (`/api/v1`, axum): one module per resource. Handlers parse strict request types
//! from `stallmesh-api`, run ledger and store work off the executor, and answer with the API's
//! own response types, mapped from the node's internals here and nowhere else.
//!
//! Architecture invariant: a write is answered only after its commit (and, for what search and
//! recommendations use, after the index took it in or [`INDEX_WAIT_MS`] passed).

mod catalogue;
mod drain;
mod drops;
mod error;
pub mod events;
pub mod loyalty;
mod mesh;
pub mod openapi;
mod sales;
mod search;
pub mod session;
mod status;
mod stock;
mod till;

pub use error::ApiError;

use crate::inference::{Inference, INDEX_WAIT_MS};
use crate::mesh::MeshHandle;
use crate::runtime::{Node, NodeError};
use axum::extract::{DefaultBodyLimit, FromRef};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use std::net::SocketAddr;
use axum::Router;
use stallmesh_inference::MAX_IMAGE_BYTES;
use std::sync::Arc;

/// Largest JSON request body: a 100-line sale is ~5 KB.
pub const MAX_JSON_BODY_BYTES: usize = 64 * 1024;
/// Largest batch of signed changes one request may push (postcard-encoded).
pub const MAX_CHANGES_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Most changes returned or accepted by one request.
pub const MAX_CHANGES_PER_REQUEST: usize = 5_000;
/// Most sales listed by one request.
pub const MAX_SALES_LISTED: usize = 10_000;
/// Sales listed when the request does not say: a busy stall's day.
pub const DEFAULT_SALES_LISTED: usize = 1_000;
const _: () = assert!(DEFAULT_SALES_LISTED <= MAX_SALES_LISTED);

/// What the handlers are given: the node, its mesh (if it runs) and its inference service.
#[derive(Clone)]
pub struct AppState {
    pub node: Node,
    pub mesh: Option<MeshHandle>,
    pub inference: Arc<Inference>,
    pub uplink: Option<crate::uplink::UplinkHandle>,
    pub loyalty: loyalty::Desk,
    pub staff: session::Desk,
    pub streams: events::Streams,
}

impl FromRef<AppState> for Node {
    fn from_ref(app: &AppState) -> Node {
        app.node.clone()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Latest time a query may name: the end of year 9999 (ms since the epoch). Larger is a mistake.
pub const MAX_TIME_MS: u64 = 253_402_300_799_999;

/// A query number within its documented range, or a 422 naming it: never clamped in silence.
fn in_range<T: PartialOrd + std::fmt::Display + Copy>(name: &str, value: T, min: T, max: T) -> ApiResult<T> {
    if value < min || value > max {
        return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_input", format!("{name} is {value}; it must be {min} to {max}")));
    }
    Ok(value)
}

pub fn router(app: AppState) -> Router {
    let changes = Router::new()
        .route("/api/v1/changes", post(mesh::push_changes).get(mesh::get_changes))
        .layer(DefaultBodyLimit::max(MAX_CHANGES_BODY_BYTES));
    let images = Router::new()
        .route("/api/v1/search/image", post(search::search_image))
        .route("/api/v1/loyalty/scan", post(till::scan_card))
        .route("/api/v1/products/{sku}/photo", put(catalogue::attach_photo).get(catalogue::get_photo))
        .layer(DefaultBodyLimit::max(MAX_IMAGE_BYTES));
    Router::new()
        .route("/api/v1/products", post(catalogue::create_product).get(catalogue::list_products))
        .route("/api/v1/products/{sku}", put(catalogue::update_product))
        .route("/api/v1/search", get(search::search))
        .route("/api/v1/recommendations", get(search::recommendations))
        .route("/api/v1/recommendations/lift", get(search::recommendation_lift))
        .route("/api/v1/recommendations/feedback", post(till::record_feedback).get(till::list_feedback))
        .route("/api/v1/kpis", get(till::kpis))
        .route("/api/v1/events", get(events::events))
        .route("/api/v1/session", get(session::show).post(session::sign_in).delete(session::sign_out))
        .route("/api/v1/drops", post(drops::plan_drop).get(drops::list_drops))
        .route("/api/v1/drops/{drop}", get(drops::show_drop))
        .route("/api/v1/restocks", post(stock::restock))
        .route("/api/v1/transfers", post(stock::transfer))
        .route("/api/v1/sales", post(sales::create_sale).get(sales::list_sales))
        .route("/api/v1/stock", get(stock::stock))
        .route("/api/v1/loyalty/cards", post(loyalty::issue_card))
        .route("/api/v1/loyalty/cards/{card}", get(loyalty::show_card))
        .route("/api/v1/loyalty/challenge", get(loyalty::challenge))
        .route("/api/v1/loyalty/vouchers", post(loyalty::mint_vouchers).get(loyalty::list_vouchers))
        .route("/api/v1/loyalty/vouchers/{voucher}/redeem", post(loyalty::redeem_voucher))
        .route("/api/v1/loyalty/exposures", get(loyalty::exposures))
        .route("/api/v1/openapi.json", get(openapi::openapi_json))
        .route("/api/v1/status", get(status::status))
        .route("/api/v1/mesh", get(mesh::mesh))
        .route("/api/v1/mesh/arrivals", get(mesh::arrivals))
        .route("/api/v1/equivocations", get(mesh::equivocations))
        .route("/api/v1/revocations", post(mesh::revoke))
        .route("/healthz", get(status::healthz))
        .route("/metrics", get(status::metrics))
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY_BYTES))
        .merge(changes)
        .merge(images)
        .merge(stallmesh_page::router())
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .layer(axum::middleware::from_fn_with_state(app.clone(), session::guard))
        .layer(axum::middleware::from_fn(error::json_errors))
        .layer(axum::middleware::from_fn(drain::drain_refused_bodies))
        .with_state(app)
}

/// The router as a service that knows each connection's address (the staff guard trusts this
/// device's own loopback connections).
pub fn service(app: AppState) -> axum::extract::connect_info::IntoMakeServiceWithConnectInfo<Router, SocketAddr> {
    router(app).into_make_service_with_connect_info::<SocketAddr>()
}

/// Runs blocking ledger + store work off the async executor.
async fn run_blocking<T: Send + 'static>(
    node: &Node,
    f: impl FnOnce(Node) -> Result<T, NodeError> + Send + 'static,
) -> Result<T, NodeError> {
    let node = node.clone();
    tokio::task::spawn_blocking(move || f(node)).await.map_err(|e| NodeError::Internal(e.to_string()))?
}

async fn blocking<T: Send + 'static>(node: &Node, f: impl FnOnce(Node) -> Result<T, NodeError> + Send + 'static) -> ApiResult<T> {
    run_blocking(node, f).await.map_err(ApiError::from)
}

/// What a request waits to see taken in before it answers.
#[derive(Clone, Copy)]
enum Index {
    /// The co-purchase counts (a sale counts in recommendations).
    Sales,
    /// The search index (a product or photo is searchable).
    Catalogue,
}

/// Waits until `index` holds commit `commit`, so that what a request recorded is searchable (or
/// counted in recommendations) when it returns.
async fn until_indexed(app: &AppState, index: Index, commit: u64) {
    let progress = match index {
        Index::Sales => app.inference.sales_progress(),
        Index::Catalogue => app.inference.catalogue_progress(),
    };
    if !progress.wait_for(commit, INDEX_WAIT_MS).await {
        app.node.metrics.index_wait_timeouts.inc();
        tracing::warn!(commit, "answering before the search index took in this request's change");
    }
}
