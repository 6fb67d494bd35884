//! HTTP JSON API under `/api/v1`, `/healthz` and `/metrics`. Errors are `{"error": code, "message": text}`.

use crate::runtime::{Node, NodeError};
use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use stallmesh_identity::{DeviceId, Revocation, SignedChange};
use stallmesh_inference::search::MAX_RESULTS;
use stallmesh_inference::{ImageError, InferenceError, MAX_IMAGE_BYTES};
use stallmesh_ledger::{sale_id, EventBody, LedgerError, LineRequest, LocalOp, Product, RecommendationShown, Sale};
use stallmesh_sync::rebalance::{MAX_SALE_ATTEMPTS, SALE_RIGHTS_REQUEST_INTERVAL_MS, SALE_WAIT_FOR_RIGHTS_MS};
use std::collections::BTreeMap;
use std::time::Duration;

/// Largest JSON request body: a 100-line sale is ~5 KB.
pub const MAX_JSON_BODY_BYTES: usize = 64 * 1024;
/// Largest batch of signed changes one request may push (postcard-encoded).
pub const MAX_CHANGES_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Most changes returned or accepted by one request.
pub const MAX_CHANGES_PER_REQUEST: usize = 5_000;
/// Most sales listed by one request.
pub const MAX_SALES_LISTED: usize = 10_000;

pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Option<Value>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), details: None }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.code, "message": self.message });
        if let Some(d) = self.details {
            body["details"] = d;
        }
        (self.status, Json(body)).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let code = match &r {
            JsonRejection::JsonSyntaxError(_) => "malformed_json",
            JsonRejection::JsonDataError(_) => "invalid_body",
            JsonRejection::MissingJsonContentType(_) => "unsupported_media_type",
            _ if r.status() == StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
            _ => "bad_request",
        };
        ApiError::new(r.status(), code, r.body_text())
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        let message = e.to_string();
        match e {
            NodeError::Ledger(le) => {
                let (status, code) = match &le {
                    LedgerError::UnknownSku(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unknown_sku"),
                    LedgerError::UnknownDevice(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unknown_device"),
                    LedgerError::Invalid { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_input"),
                    LedgerError::MixedCurrency(..) => (StatusCode::UNPROCESSABLE_ENTITY, "mixed_currency"),
                    LedgerError::BadRevocation(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_revocation"),
                    LedgerError::InsufficientRights { .. } => (StatusCode::CONFLICT, "insufficient_stock_rights"),
                    LedgerError::AlreadyRecorded { .. } => (StatusCode::CONFLICT, "already_recorded"),
                    LedgerError::NotEnrolled | LedgerError::Revoked | LedgerError::Certificate(_) => {
                        (StatusCode::FORBIDDEN, "device_not_allowed")
                    }
                    LedgerError::OtherStall { .. } => (StatusCode::FORBIDDEN, "other_stall"),
                    LedgerError::Cloned => (StatusCode::SERVICE_UNAVAILABLE, "device_cloned"),
                };
                let mut err = ApiError::new(status, code, message);
                if let LedgerError::InsufficientRights { sku, requested, held_here, held_elsewhere_total, held_elsewhere } = le {
                    err.details = Some(json!({
                        "sku": sku,
                        "requested": requested,
                        "held_here": held_here,
                        "held_elsewhere_total": held_elsewhere_total,
                        "held_elsewhere": held_elsewhere,
                    }));
                }
                err
            }
            NodeError::Failed(_) | NodeError::Store(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", message),
            NodeError::Recovering(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "recovering", message),
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message),
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

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

pub fn router(node: Node) -> Router {
    let changes =
        Router::new().route("/api/v1/changes", post(push_changes).get(get_changes)).layer(DefaultBodyLimit::max(MAX_CHANGES_BODY_BYTES));
    Router::new()
        .route("/api/v1/products", post(create_product).get(list_products))
        .route("/api/v1/products/{sku}", put(update_product))
        .route("/api/v1/search", get(search))
        .route("/api/v1/recommendations", get(recommendations))
        .route("/api/v1/recommendations/lift", get(recommendation_lift))
        .route("/api/v1/restocks", post(restock))
        .route("/api/v1/transfers", post(transfer))
        .route("/api/v1/sales", post(create_sale).get(list_sales))
        .route("/api/v1/stock", get(stock))
        .route("/api/v1/status", get(status))
        .route("/api/v1/mesh", get(mesh))
        .route("/api/v1/mesh/arrivals", get(arrivals))
        .route("/api/v1/equivocations", get(equivocations))
        .route("/api/v1/revocations", post(revoke))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY_BYTES))
        .merge(changes)
        .merge(
            Router::new()
                .route("/api/v1/search/image", post(search_image))
                .route("/api/v1/products/{sku}/photo", put(attach_photo).get(get_photo))
                .layer(DefaultBodyLimit::max(MAX_IMAGE_BYTES)),
        )
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .with_state(node)
}

#[derive(Serialize)]
struct SaleView {
    id: String,
    device: DeviceId,
    lines: Vec<stallmesh_ledger::SaleLine>,
    total_cents: u64,
    currency: String,
    time_ms: u64,
    client_ref: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recommendation: Option<RecommendationShown>,
}

impl From<&Sale> for SaleView {
    fn from(s: &Sale) -> Self {
        SaleView {
            id: s.id.clone(),
            device: s.device,
            lines: s.lines.clone(),
            total_cents: s.total_cents,
            currency: s.currency.clone(),
            time_ms: s.time_ms,
            client_ref: s.client_ref.clone(),
            recommendation: s.recommendation.clone(),
        }
    }
}

fn product_json(node: &Node, sku: &str) -> Value {
    node.read(|l| l.state().products.get(sku).map(|p| json!(p)).unwrap_or(Value::Null))
}

async fn create_product(State(node): State<Node>, body: Result<Json<Product>, JsonRejection>) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(product) = body?;
    if node.read(|l| l.state().products.contains_key(&product.sku)) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "product_exists",
            format!("SKU {:?} exists; use PUT /api/v1/products/{{sku}}", product.sku),
        ));
    }
    let sku = product.sku.clone();
    blocking(&node, move |n| n.execute(LocalOp::UpsertProduct(product))).await?;
    Ok((StatusCode::CREATED, Json(product_json(&node, &sku))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProductUpdate {
    #[serde(default)]
    sku: Option<String>,
    name: String,
    price_cents: u64,
    currency: String,
    stall: String,
    #[serde(default)]
    tags: Vec<String>,
}

async fn update_product(
    State(node): State<Node>,
    Path(sku): Path<String>,
    body: Result<Json<ProductUpdate>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Json(u) = body?;
    if u.sku.as_ref().is_some_and(|s| *s != sku) {
        return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_input", "sku in the body differs from the path"));
    }
    if !node.read(|l| l.state().products.contains_key(&sku)) {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "unknown_sku", format!("unknown SKU {sku:?}")));
    }
    let product =
        Product { sku: sku.clone(), name: u.name, price_cents: u.price_cents, currency: u.currency, stall: u.stall, tags: u.tags };
    blocking(&node, move |n| n.execute(LocalOp::UpsertProduct(product))).await?;
    Ok(Json(product_json(&node, &sku)))
}

async fn list_products(State(node): State<Node>) -> Json<Value> {
    Json(node.read(|l| json!({ "products": l.state().products.values().collect::<Vec<_>>() })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestockRequest {
    sku: String,
    qty: u64,
}

async fn restock(State(node): State<Node>, body: Result<Json<RestockRequest>, JsonRejection>) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(r) = body?;
    let sku = r.sku.clone();
    let entry = blocking(&node, move |n| n.execute(LocalOp::Restock { sku: r.sku, qty: r.qty })).await?;
    let rights = node.read(|l| l.state().rights_of(&sku, &l.device()));
    Ok((StatusCode::CREATED, Json(json!({ "sku": sku, "qty": r.qty, "seq": entry.change.seq, "rights_here": rights }))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferRequest {
    sku: String,
    qty: u64,
    to_device: DeviceId,
}

async fn transfer(State(node): State<Node>, body: Result<Json<TransferRequest>, JsonRejection>) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(t) = body?;
    let (sku, to) = (t.sku.clone(), t.to_device);
    let entry = blocking(&node, move |n| n.execute(LocalOp::Transfer { sku: t.sku, qty: t.qty, to: t.to_device })).await?;
    let rights = node.read(|l| l.state().rights_of(&sku, &l.device()));
    Ok((StatusCode::CREATED, Json(json!({ "sku": sku, "qty": t.qty, "to_device": to, "seq": entry.change.seq, "rights_here": rights }))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SaleRequest {
    lines: Vec<LineRequest>,
    #[serde(default)]
    client_ref: Option<String>,
    /// The `record` from `GET /api/v1/recommendations`, when recommendations were requested for this basket.
    #[serde(default)]
    recommendation: Option<RecommendationShown>,
}

/// A sale refused for rights that a reachable peer holds waits up to `SALE_WAIT_FOR_RIGHTS_MS` for
/// the transfer the refusal asked for, then is retried (`client_ref` keeps a retry from selling
/// twice). Nothing is locked while it waits.
async fn create_sale(State(node): State<Node>, body: Result<Json<SaleRequest>, JsonRejection>) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(req) = body?;
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_millis(SALE_WAIT_FOR_RIGHTS_MS);
    // Subscribed before the first attempt: a transfer applied right after it still wakes the wait.
    let mut arrived = node.rights_arrived();
    let mut waited = false;
    let mut attempts = 0;
    let result = loop {
        attempts += 1;
        let (lines, client_ref, recommendation) = (req.lines.clone(), req.client_ref.clone(), req.recommendation.clone());
        let r = run_blocking(&node, move |n| n.try_sell(lines, client_ref, recommendation)).await;
        let Err(NodeError::Ledger(LedgerError::InsufficientRights { sku, requested, held_elsewhere, .. })) = &r else { break r };
        let reachable = reachable_devices(&node);
        if attempts >= MAX_SALE_ATTEMPTS || !held_elsewhere.iter().any(|(d, n)| *n > 0 && reachable.contains(&d.to_hex())) {
            break r;
        }
        waited = true;
        if !wait_for_rights(&node, &mut arrived, sku, *requested, deadline).await {
            break r;
        }
    };
    if waited {
        let outcome = if matches!(result, Err(NodeError::Ledger(LedgerError::InsufficientRights { .. }))) { "refused" } else { "sold" };
        node.metrics.sale_rights_waits.get_or_create(&crate::metrics::Outcome { outcome }).inc();
        tracing::debug!(outcome, attempts, waited_ms = started.elapsed().as_millis() as u64, "sale waited for stock rights");
    }
    let (status, id) = match result {
        Ok(entry) => {
            debug_assert!(matches!(entry.event.body, EventBody::Sold { .. }));
            (StatusCode::CREATED, sale_id(entry.change.dot()))
        }
        // A retried POST with the same client_ref returns the sale already recorded.
        Err(NodeError::Ledger(LedgerError::AlreadyRecorded { sale_id, .. })) => (StatusCode::OK, sale_id),
        Err(NodeError::Ledger(le @ LedgerError::InsufficientRights { .. })) => {
            node.count_refused("sale_insufficient_stock_rights");
            if node.mesh.get().is_none() {
                return Err(NodeError::Ledger(le).into());
            }
            // Say how much of what is held elsewhere sits on devices this one cannot reach now.
            let reachable = reachable_devices(&node);
            let unreachable: u64 = match &le {
                LedgerError::InsufficientRights { held_elsewhere, .. } => {
                    held_elsewhere.iter().filter(|(d, _)| !reachable.contains(&d.to_hex())).map(|(_, n)| *n).sum()
                }
                _ => 0,
            };
            let mut err = ApiError::from(NodeError::Ledger(le));
            if let Some(d) = err.details.as_mut() {
                d["held_on_unreachable_devices"] = json!(unreachable);
                d["reachable_devices"] = json!(reachable);
                d["waited_ms"] = json!(if waited { started.elapsed().as_millis() as u64 } else { 0 });
            }
            return Err(err);
        }
        Err(e) => return Err(e.into()),
    };
    let sale = node.read(|l| l.state().sales.get(&id).map(SaleView::from));
    Ok((status, Json(json!(sale))))
}

/// Devices with a live sync session now (as of the mesh's last status, at most a tick old).
fn reachable_devices(node: &Node) -> std::collections::BTreeSet<String> {
    node.mesh_status().map(|m| m.peers.into_iter().map(|p| p.device).collect()).unwrap_or_default()
}

/// Waits until this device holds `requested` units of `sku`, or `deadline`. Wakes when a transfer
/// to this device is applied; asks again every `SALE_RIGHTS_REQUEST_INTERVAL_MS` in between (a
/// lost ask, or the rights moved to another peer meanwhile).
async fn wait_for_rights(
    node: &Node,
    arrived: &mut tokio::sync::watch::Receiver<u64>,
    sku: &str,
    requested: u64,
    deadline: tokio::time::Instant,
) -> bool {
    loop {
        let here = node.read(|l| l.state().rights_of(sku, &l.device()));
        if here >= requested {
            return true;
        }
        let slice = (tokio::time::Instant::now() + Duration::from_millis(SALE_RIGHTS_REQUEST_INTERVAL_MS)).min(deadline);
        match tokio::time::timeout_at(slice, arrived.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return false, // the node is shutting down
            Err(_) if slice >= deadline => return false,
            Err(_) => node.want_rights(sku, requested - here, true),
        }
    }
}

#[derive(Deserialize)]
struct SalesQuery {
    limit: Option<usize>,
}

async fn list_sales(State(node): State<Node>, Query(q): Query<SalesQuery>) -> Json<Value> {
    let limit = q.limit.unwrap_or(1_000).min(MAX_SALES_LISTED);
    Json(node.read(|l| {
        let mut sales: Vec<&Sale> = l.state().sales.values().collect();
        sales.sort_by(|a, b| (b.time_ms, &b.id).cmp(&(a.time_ms, &a.id)));
        let summary = l.state().summary();
        json!({
            "summary": summary,
            "sales": sales.into_iter().take(limit).map(SaleView::from).collect::<Vec<_>>(),
        })
    }))
}

async fn stock(State(node): State<Node>) -> Json<Value> {
    Json(node.read(|l| {
        let me = l.device();
        let state = l.state();
        let skus: std::collections::BTreeSet<&String> = state.products.keys().chain(state.rights.keys()).collect();
        let rows: Vec<Value> = skus
            .into_iter()
            .map(|sku| {
                let s = state.stock(sku);
                json!({
                    "sku": sku,
                    "name": state.products.get(sku).map(|p| p.product.name.clone()),
                    "total": s.total,
                    "this_device": s.per_device.get(&me).copied().unwrap_or(0),
                    "per_device": s.per_device,
                })
            })
            .collect();
        json!({ "device": me, "stock": rows })
    }))
}

/// The state of this device's own journal, for the operator: `ready`, `recovering` (taking it back
/// from peers) or `cloned` (another tablet signs with these credentials).
fn journal_json(node: &Node) -> Value {
    if let Some(r) = node.recovery() {
        return json!({ "state": "recovering", "message": r.message, "recovery": r });
    }
    if node.read(|l| l.is_cloned()) {
        return json!({ "state": "cloned", "message": LedgerError::Cloned.to_string() });
    }
    json!({ "state": "ready" })
}

async fn status(State(node): State<Node>) -> Json<Value> {
    let info = node.info.clone();
    let journal = journal_json(&node);
    Json(node.read(|l| {
        let heads: BTreeMap<String, u64> = l.heads_ref().iter().map(|(d, n)| (d.to_hex(), *n)).collect();
        json!({
            "node": *info,
            "devices": l.state().devices.len(),
            "products": l.state().products.len(),
            "sales": l.state().sales.len(),
            "pending_changes": l.pending_len(),
            "heads": heads,
            "journal": journal,
            "equivocations": l.evidence().values().map(Vec::len).sum::<usize>(),
            "store_set_aside": set_aside_json(&info),
        })
    }))
}

/// Peers, their state and how far behind each is; the node's own mesh identity.
async fn mesh(State(node): State<Node>) -> ApiResult<Json<Value>> {
    match node.mesh_status() {
        Some(status) => Ok(Json(json!(status))),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, "mesh_disabled", "this node runs without a mesh")),
    }
}

/// One change in an equivocation listing: which it is and what it recorded, if that can be read.
fn change_json(change: &SignedChange, event: Result<stallmesh_ledger::Event, String>) -> Value {
    let mut v = json!({ "seq": change.seq, "digest": change.digest().to_hex() });
    match event {
        Ok(e) => {
            v["time_ms"] = json!(e.time_ms);
            v["event"] = event_json(change, &e.body);
        }
        Err(why) => v["event_unreadable"] = json!(why),
    }
    v
}

/// An event, as the API shows it (a sale with its lines and total; others by kind).
fn event_json(change: &SignedChange, body: &EventBody) -> Value {
    match body {
        EventBody::Sold { lines, total_cents, currency, client_ref, .. } => json!({
            "kind": "sale",
            "sale_id": sale_id(change.dot()),
            "lines": lines.iter().map(|l| json!({ "sku": l.sku, "qty": l.qty, "price_cents": l.price_cents })).collect::<Vec<_>>(),
            "total_cents": total_cents,
            "currency": currency,
            "client_ref": client_ref,
        }),
        EventBody::Enrolled { .. } => json!({ "kind": "enrolment" }),
        EventBody::ProductUpserted { product, .. } => json!({ "kind": "product", "sku": product.sku }),
        EventBody::Restocked { sku, qty } => json!({ "kind": "restock", "sku": sku, "qty": qty }),
        EventBody::Transferred { sku, qty, to } => json!({ "kind": "transfer", "sku": sku, "qty": qty, "to_device": to }),
        EventBody::PhotoAttached { sku, .. } => json!({ "kind": "photo", "sku": sku }),
        EventBody::Revoked { revocation } => json!({ "kind": "revocation", "device": revocation.device }),
    }
}

/// Devices seen signing two different journals, with both histories at each conflicting position:
/// the change held here and the conflicting ones kept as evidence, with the sales each recorded.
async fn equivocations(State(node): State<Node>) -> ApiResult<Json<Value>> {
    let listing = blocking(&node, |n| n.equivocations()).await?;
    let devices: Vec<Value> = listing
        .into_iter()
        .map(|d| {
            let positions: Vec<Value> = d
                .positions
                .into_iter()
                .map(|p| {
                    json!({
                        "seq": p.seq,
                        "held": p.held.map(|(c, e)| change_json(&c, Ok(e))),
                        "conflicting": p.conflicting.into_iter().map(|(c, e)| change_json(&c, e)).collect::<Vec<_>>(),
                    })
                })
                .collect();
            json!({ "device": d.device, "this_device": d.device.to_hex() == node.info.device, "positions": positions })
        })
        .collect();
    let count: usize = devices
        .iter()
        .map(|d| d["positions"].as_array().map_or(0, |p| p.iter().map(|x| x["conflicting"].as_array().map_or(0, Vec::len)).sum()))
        .sum();
    Ok(Json(json!({ "conflicting_changes": count, "devices": devices })))
}

/// When recent sales from other devices arrived here (for replication-lag measurement).
async fn arrivals(State(node): State<Node>) -> Json<Value> {
    Json(json!({ "arrivals": node.arrivals() }))
}

async fn revoke(State(node): State<Node>, body: Result<Json<Revocation>, JsonRejection>) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(rev) = body?;
    let device = rev.device;
    blocking(&node, move |n| n.execute(LocalOp::Revoke(rev))).await?;
    Ok((StatusCode::CREATED, Json(json!({ "revoked": device }))))
}

/// Pushes a postcard-encoded `Vec<SignedChange>` from a peer or a tool; every change is verified.
async fn push_changes(State(node): State<Node>, body: Bytes) -> ApiResult<Json<Value>> {
    let changes: Vec<SignedChange> = postcard::from_bytes(&body).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "malformed_changes", format!("body is not a postcard Vec<SignedChange>: {e}"))
    })?;
    if changes.len() > MAX_CHANGES_PER_REQUEST {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_changes",
            format!("{} changes; at most {MAX_CHANGES_PER_REQUEST} per request", changes.len()),
        ));
    }
    let report = blocking(&node, move |n| n.ingest(changes)).await?;
    let rejected: Vec<Value> = report
        .rejected
        .iter()
        .map(|(dot, why)| json!({ "device": dot.device, "seq": dot.seq, "reason": why.label(), "message": why.to_string() }))
        .collect();
    Ok(Json(json!({
        "applied": report.applied.len(),
        "duplicates": report.duplicates,
        "pending": report.pending,
        "rejected": rejected,
    })))
}

#[derive(Deserialize)]
struct ChangesQuery {
    device: String,
    #[serde(default)]
    from: u64,
    limit: Option<usize>,
}

/// A device's changes from `from`, postcard-encoded, for a peer or the cloud to catch up.
async fn get_changes(State(node): State<Node>, Query(q): Query<ChangesQuery>) -> ApiResult<Response> {
    let device = DeviceId::from_hex(&q.device)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_device", format!("device must be 64 hex characters: {e}")))?;
    let limit = q.limit.unwrap_or(MAX_CHANGES_PER_REQUEST).min(MAX_CHANGES_PER_REQUEST);
    let changes = blocking(&node, move |n| n.changes_since(&device, q.from, limit)).await?;
    let body = postcard::to_allocvec(&changes).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}

async fn healthz(State(node): State<Node>) -> (StatusCode, Json<Value>) {
    let inference = node.inference.get().map(|i| {
        let index = i.index();
        json!({
            "state": i.readiness(),
            "models": i.statuses(),
            "index": { "products": index.len(), "embedded": index.embedded(), "with_photo": index.with_photo() },
        })
    });
    let set_aside = set_aside_json(&node.info);
    match node.failed() {
        None => (
            StatusCode::OK,
            Json(json!({
                "status": "ok",
                "device": node.info.device,
                "demo": node.info.demo,
                "inference": inference,
                "store_set_aside": set_aside,
            })),
        ),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "failed", "reason": why, "store": node.info.store_path, "store_set_aside": set_aside })),
        ),
    }
}

/// A damaged store file moved aside on start, for the operator; `null` when none was.
fn set_aside_json(info: &crate::runtime::NodeInfo) -> Value {
    info.store_set_aside.as_ref().map_or(Value::Null, |s| json!({ "moved_to": s.moved_to, "reason": s.reason }))
}

async fn metrics(State(node): State<Node>) -> impl IntoResponse {
    if let Some(pool) = node.inference.get().and_then(|i| i.pool().cloned()) {
        let st = pool.stats();
        node.metrics.inference_queued.set(st.queued as i64);
        node.metrics.inference_completed.inner().store(st.completed, std::sync::atomic::Ordering::Relaxed);
        node.metrics.inference_rejected.inner().store(st.rejected_queue_full, std::sync::atomic::Ordering::Relaxed);
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], node.metrics.encode())
}

impl From<InferenceError> for ApiError {
    fn from(e: InferenceError) -> Self {
        let message = e.to_string();
        let (status, code) = match &e {
            InferenceError::QueueFull(_) => (StatusCode::SERVICE_UNAVAILABLE, "inference_busy"),
            InferenceError::ModelUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "model_unavailable"),
            InferenceError::PoolClosed => (StatusCode::SERVICE_UNAVAILABLE, "inference_unavailable"),
            InferenceError::InvalidInput(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_input"),
            InferenceError::Image(ImageError::Empty) => (StatusCode::BAD_REQUEST, "empty_image"),
            InferenceError::Image(ImageError::TooLarge(_)) => (StatusCode::PAYLOAD_TOO_LARGE, "image_too_large"),
            InferenceError::Image(ImageError::UnsupportedFormat) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_image_format"),
            InferenceError::Image(ImageError::TooManyPixels { .. }) => (StatusCode::UNPROCESSABLE_ENTITY, "image_too_many_pixels"),
            InferenceError::Image(ImageError::Corrupt(_)) => (StatusCode::UNPROCESSABLE_ENTITY, "corrupt_image"),
            InferenceError::Run(_) => (StatusCode::INTERNAL_SERVER_ERROR, "inference_failed"),
        };
        ApiError::new(status, code, message)
    }
}

fn inference_of(node: &Node) -> ApiResult<std::sync::Arc<crate::inference::Inference>> {
    node.inference
        .get()
        .cloned()
        .ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "inference_unavailable", "inference is starting"))
}

/// An image body, or the same JSON error as every other endpoint when it is too large.
fn image_body(body: Result<Bytes, axum::extract::rejection::BytesRejection>) -> ApiResult<Bytes> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "image_too_large", format!("image larger than {MAX_IMAGE_BYTES} bytes"))
        } else {
            ApiError::new(r.status(), "bad_request", r.body_text())
        }
    })
}

#[derive(Deserialize)]
struct SearchQuery {
    q: Option<String>,
    k: Option<usize>,
}

fn result_count(k: Option<usize>, default: usize) -> ApiResult<usize> {
    match k.unwrap_or(default) {
        0 => Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_input", "k must be at least 1")),
        k => Ok(k.min(MAX_RESULTS)),
    }
}

/// Hybrid product search: `GET /api/v1/search?q=raw+honey&k=10`.
async fn search(State(node): State<Node>, Query(q): Query<SearchQuery>) -> ApiResult<Json<Value>> {
    let started = std::time::Instant::now();
    let query = q.q.unwrap_or_default().trim().to_string();
    if query.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "missing_query", "give the search words as ?q="));
    }
    if query.len() > crate::inference::MAX_QUERY_BYTES {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "query_too_long",
            format!("query is {} bytes; at most {}", query.len(), crate::inference::MAX_QUERY_BYTES),
        ));
    }
    let k = result_count(q.k, 10)?;
    let inference = inference_of(&node)?;
    let looked_up = inference.query_vector(&query).await.map_err(|e| {
        node.metrics.search_requests.get_or_create(&crate::metrics::Outcome { outcome: "refused" }).inc();
        ApiError::from(e)
    })?;
    let cached = looked_up.as_ref().is_some_and(|(_, c)| *c);
    let vector = looked_up.map(|(v, _)| v);
    let mode = if vector.is_some() { "hybrid" } else { "lexical" };
    let inf = inference.clone();
    let q2 = query.clone();
    let hits = tokio::task::spawn_blocking(move || inf.search(&q2, vector.as_ref().map(|v| v.as_slice()), k))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    node.metrics.search_requests.get_or_create(&crate::metrics::Outcome { outcome: mode }).inc();
    node.metrics.search_seconds.observe(started.elapsed().as_secs_f64());
    Ok(Json(json!({
        "query": query,
        "mode": mode,
        "query_embedding_cached": cached,
        "inference": inference.readiness(),
        "hits": hits,
        "took_us": started.elapsed().as_micros() as u64,
    })))
}

/// Visual search: the body is a JPEG or PNG photo; `?k=` results.
async fn search_image(
    State(node): State<Node>,
    Query(q): Query<SearchQuery>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Json<Value>> {
    let started = std::time::Instant::now();
    let body = image_body(body)?;
    let k = result_count(q.k, 5)?;
    let inference = inference_of(&node)?;
    let pool = inference.pool().cloned().ok_or(InferenceError::ModelUnavailable("image"))?;
    let vector = pool.embed_image(body.to_vec()).await?;
    let hits = inference.index().search_image(&vector, k);
    node.metrics.search_requests.get_or_create(&crate::metrics::Outcome { outcome: "image" }).inc();
    Ok(Json(json!({ "hits": hits, "took_us": started.elapsed().as_micros() as u64 })))
}

/// Longest side of the photo kept in the journal: enough for the 224-pixel model and a POS thumbnail.
const PHOTO_SIDE: u32 = 256;

/// Shrinks a photo to a small JPEG for the journal (every device stores and embeds it itself).
fn journal_photo(bytes: &[u8]) -> Result<Vec<u8>, InferenceError> {
    let img = stallmesh_inference::decode_image(bytes)?;
    let small = if img.width().max(img.height()) > PHOTO_SIDE {
        let scale = f64::from(PHOTO_SIDE) / f64::from(img.width().max(img.height()));
        let (w, h) = ((f64::from(img.width()) * scale).round().max(1.0) as u32, (f64::from(img.height()) * scale).round().max(1.0) as u32);
        image::imageops::thumbnail(&img, w, h)
    } else {
        img
    };
    for quality in [85u8, 70, 50, 30] {
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality)
            .encode_image(&small)
            .map_err(|e| InferenceError::Run(format!("jpeg encoding: {e}")))?;
        if out.len() <= stallmesh_ledger::MAX_PHOTO_BYTES {
            return Ok(out);
        }
    }
    Err(InferenceError::InvalidInput("photo does not compress below the journal's photo limit".into()))
}

/// Attaches a product photo (JPEG or PNG). It is shrunk, recorded in this device's journal and
/// replicated; every device embeds it for visual search.
async fn attach_photo(
    State(node): State<Node>,
    Path(sku): Path<String>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let body = image_body(body)?;
    if !node.read(|l| l.state().products.contains_key(&sku)) {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "unknown_sku", format!("unknown SKU {sku:?}")));
    }
    let jpeg = tokio::task::spawn_blocking(move || journal_photo(&body))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))??;
    let bytes = jpeg.len();
    let s = sku.clone();
    let entry = blocking(&node, move |n| n.execute(LocalOp::AttachPhoto { sku: s, jpeg })).await?;
    Ok((StatusCode::CREATED, Json(json!({ "sku": sku, "photo_bytes": bytes, "seq": entry.change.seq }))))
}

async fn get_photo(State(node): State<Node>, Path(sku): Path<String>) -> ApiResult<Response> {
    match node.read(|l| l.state().photos.get(&sku).map(|p| p.jpeg.clone())) {
        Some(jpeg) => Ok(([(header::CONTENT_TYPE, "image/jpeg")], jpeg).into_response()),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, "no_photo", format!("no photo for SKU {sku:?}"))),
    }
}

#[derive(Deserialize)]
struct RecommendationQuery {
    basket: Option<String>,
    k: Option<usize>,
    /// The customer's checkout session; decides the experiment arm (default: the basket itself).
    session: Option<String>,
}

/// "Bought together": `GET /api/v1/recommendations?basket=SKU1,SKU2&k=5&session=...`.
async fn recommendations(State(node): State<Node>, Query(q): Query<RecommendationQuery>) -> ApiResult<Json<Value>> {
    let started = std::time::Instant::now();
    let basket: Vec<String> = q.basket.unwrap_or_default().split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
    if basket.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "missing_basket", "give the basket's SKUs as ?basket=SKU1,SKU2"));
    }
    if basket.len() > stallmesh_inference::recommend::MAX_BASKET {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "basket_too_large",
            format!("{} SKUs; at most {}", basket.len(), stallmesh_inference::recommend::MAX_BASKET),
        ));
    }
    if let Some(unknown) = node.read(|l| basket.iter().find(|s| !l.state().products.contains_key(*s)).cloned()) {
        return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "unknown_sku", format!("unknown SKU {unknown:?}")));
    }
    let k = result_count(q.k, 5)?.min(stallmesh_ledger::MAX_RECOMMENDED);
    let session = q.session.unwrap_or_else(|| basket.join(","));
    if session.len() > 128 {
        return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_input", "session must be at most 128 bytes"));
    }
    let inference = inference_of(&node)?;
    let arm = inference.arm(&node.info.device, &session);
    let (inf, n, b) = (inference.clone(), node.clone(), basket.clone());
    let recs = tokio::task::spawn_blocking(move || inf.recommend(&n, &b, k))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    node.metrics.recommend_seconds.observe(started.elapsed().as_secs_f64());
    let record = RecommendationShown { arm: arm.to_string(), skus: recs.iter().map(|r| r.sku.clone()).collect() };
    let shown: Vec<_> = if arm == "treatment" { recs } else { Vec::new() };
    Ok(Json(json!({
        "basket": basket,
        "arm": arm,
        "recommendations": shown,
        // Send this back as the sale's `recommendation`, so conversion can be compared between arms.
        "record": record,
        "took_us": started.elapsed().as_micros() as u64,
    })))
}

/// Conversion by experiment arm over the market's replicated sales: a sale converts when it holds a
/// product that was recommended (treatment) or would have been (control) for its basket.
async fn recommendation_lift(State(node): State<Node>) -> Json<Value> {
    Json(node.read(|l| {
        let mut arms: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for sale in l.state().sales.values() {
            let Some(rec) = &sale.recommendation else { continue };
            let arm = if rec.arm == "treatment" { "treatment" } else { "control" };
            let e = arms.entry(arm).or_default();
            e.0 += 1;
            if sale.lines.iter().any(|line| rec.skus.contains(&line.sku)) {
                e.1 += 1;
            }
        }
        let rate = |arm: &str| arms.get(arm).filter(|(n, _)| *n > 0).map(|(n, c)| *c as f64 / *n as f64);
        let lift = match (rate("treatment"), rate("control")) {
            (Some(t), Some(c)) if c > 0.0 => Some(t / c - 1.0),
            _ => None,
        };
        let arm_json = |arm: &str| {
            let (sales, converted) = arms.get(arm).copied().unwrap_or_default();
            json!({ "sales": sales, "converted": converted, "conversion_rate": rate(arm) })
        };
        json!({
            "treatment": arm_json("treatment"),
            "control": arm_json("control"),
            "lift": lift,
            "treatment_percent_here": node.inference.get().map(|i| i.treatment_percent),
        })
    }))
}
