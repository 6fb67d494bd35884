//! The cloud's HTTP endpoints (under `/v1`). Every error is `{"error", "message", "details"}` with
//! a stable code; nothing a tablet or a consumer sends can panic the service.
//!
//! - `POST /v1/markets/{market}/sync` — a tablet's signed sync request (`stallmesh-ingest::wire`).
//! - `GET  /v1/markets/{market}/events?after=&limit=&wait_ms=` — the reconciled log, NDJSON.
//! - `GET  /v1/markets`, `GET /v1/markets/{market}` — registered markets, offsets, counters.
//! - `POST /v1/markets` — register a market (admin token).
//! - `PUT  /v1/markets/{market}/online` — set up the market's online channel (admin token).
//! - `GET  /v1/markets/{market}/drops/{drop}`, `POST …/holds`, `POST …/orders` — online checkout
//!   of a drop (admin token: the shop's own server calls these for its buyers), `Idempotency-Key`
//!   on every POST.
//! - `GET  /metrics`, `GET /healthz`.

use crate::markets::{Markets, SyncError};
use crate::store::{MarketRegistration, Registered, StoreError};
use axum::body::Bytes;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use stallmesh_api::cloud::{
    CloudErrorBody, HoldView, MarketList, MarketRegistered, MarketSummary, OnlineChannelSet, OnlineDrop, OrderView, PlaceHold, PlaceOrder,
    RegisterMarket, RejectedView, SetOnlineChannel, SoldOutView, UploadRefused,
};
use stallmesh_shop::{HoldRequest, ShopError};
use stallmesh_identity::{Certificate, MarketId, MarketPublicKey, Role};
use stallmesh_ingest::wire::{self, RequestAuth, MAX_BODY_BYTES};
use std::sync::Arc;
use std::time::Duration;

/// Events one consumer request returns at most: a page a consumer processes in well under a second.
pub const MAX_EVENTS_PER_REQUEST: usize = 10_000;
/// Events returned when the consumer names no limit.
pub const DEFAULT_EVENTS_PER_REQUEST: usize = 1_000;
/// Longest long-poll: below common proxy idle timeouts (60 s).
pub const MAX_WAIT_MS: u64 = 55_000;
/// While long-polling, how often the store is read too: another cloud process may have appended.
pub const EVENTS_POLL_MS: u64 = 200;
/// Largest JSON body (market registration).
pub const MAX_JSON_BODY_BYTES: usize = 16 * 1024;

#[derive(Clone)]
pub struct CloudState {
    pub markets: Arc<Markets>,
    pub admin_token: Arc<String>,
    /// How long an online buyer's hold lasts unless paid.
    pub hold_ttl_ms: u64,
}

pub struct CloudError {
    status: StatusCode,
    body: CloudErrorBody,
}

impl CloudError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self { status, body: CloudErrorBody { error: code.into(), message: message.into(), details: None, sold_out: None } }
    }
}

impl IntoResponse for CloudError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

impl From<SyncError> for CloudError {
    fn from(e: SyncError) -> Self {
        let status = match &e {
            SyncError::UnknownMarket(_) | SyncError::Store(StoreError::UnknownMarket(_)) => StatusCode::NOT_FOUND,
            SyncError::Auth(a) => match a {
                wire::AuthError::NotEnrolled(_) => StatusCode::FORBIDDEN,
                _ => StatusCode::UNAUTHORIZED,
            },
            SyncError::Revoked(_) => StatusCode::FORBIDDEN,
            SyncError::Protocol(_) | SyncError::WrongMessage(_) => StatusCode::BAD_REQUEST,
            SyncError::Rejected { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            SyncError::Store(_) | SyncError::Ingest(_) | SyncError::TooManyMarkets | SyncError::CheckoutBusy => StatusCode::SERVICE_UNAVAILABLE,
            SyncError::Shop(s) => match s {
                ShopError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                ShopError::NoOnlineChannel | ShopError::UnknownDrop(_) | ShopError::UnknownHold(_) => StatusCode::NOT_FOUND,
                ShopError::DropNotStarted { .. }
                | ShopError::BuyerLimit { .. }
                | ShopError::SoldOut { .. }
                | ShopError::IdempotencyConflict(_) => StatusCode::CONFLICT,
                ShopError::HoldExpired { .. } => StatusCode::GONE,
                ShopError::Ledger(_) => StatusCode::SERVICE_UNAVAILABLE,
            },
        };
        let mut err = CloudError::new(status, e.label(), e.to_string());
        if let SyncError::Shop(ShopError::SoldOut { available, in_holds, held_elsewhere, may_return, next_expiry_ms }) = &e {
            err.body.sold_out = Some(SoldOutView {
                available_online: *available,
                in_holds: *in_holds,
                held_at_stalls: *held_elsewhere,
                may_return: *may_return,
                next_expiry_ms: *next_expiry_ms,
            });
        }
        if let SyncError::Rejected { reply, .. } = e {
            let rejected = reply
                .rejected
                .iter()
                .map(|r| RejectedView { device: r.device.to_hex(), seq: r.seq, reason: r.reason.clone(), message: r.message.clone() })
                .collect();
            err.body.details = Some(UploadRefused { accepted: reply.accepted, duplicates: reply.duplicates, offset: reply.offset, rejected });
        }
        err
    }
}

impl From<StoreError> for CloudError {
    fn from(e: StoreError) -> Self {
        SyncError::Store(e).into()
    }
}

impl From<QueryRejection> for CloudError {
    fn from(r: QueryRejection) -> Self {
        CloudError::new(StatusCode::BAD_REQUEST, "bad_query", r.body_text())
    }
}

impl From<PathRejection> for CloudError {
    fn from(r: PathRejection) -> Self {
        CloudError::new(StatusCode::BAD_REQUEST, "bad_path", r.body_text())
    }
}

impl From<JsonRejection> for CloudError {
    fn from(r: JsonRejection) -> Self {
        let code = if r.status() == StatusCode::PAYLOAD_TOO_LARGE { "body_too_large" } else { "invalid_body" };
        CloudError::new(r.status(), code, r.body_text())
    }
}

type CloudResult<T> = Result<T, CloudError>;

/// Counts a refused request of the consumer and admin endpoints (sync requests are counted where
/// they are handled, in `markets.rs`).
fn counted<T>(state: &CloudState, result: CloudResult<T>) -> CloudResult<T> {
    if let Err(e) = &result {
        state.markets.metrics.requests_refused.get_or_create(&crate::metrics::ReasonLabel { reason: e.body.error.clone() }).inc();
    }
    result
}

fn market_id(text: &str) -> CloudResult<MarketId> {
    MarketId::from_hex(text).map_err(|e| CloudError::new(StatusCode::BAD_REQUEST, "bad_market_id", format!("market id {text:?}: {e}")))
}

pub fn router(state: CloudState) -> Router {
    let sync = Router::new().route("/v1/markets/{market}/sync", post(sync)).layer(DefaultBodyLimit::max(MAX_BODY_BYTES));
    Router::new()
        .route("/v1/markets", get(list_markets).post(register_market))
        .route("/v1/markets/{market}", get(market_view))
        .route("/v1/markets/{market}/events", get(events))
        .route("/v1/markets/{market}/online", put(set_online))
        .route("/v1/markets/{market}/drops/{drop}", get(online_drop))
        .route("/v1/markets/{market}/drops/{drop}/holds", post(place_hold))
        .route("/v1/markets/{market}/drops/{drop}/orders", post(place_order))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY_BYTES))
        .merge(sync)
        .fallback(|| async { CloudError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            CloudError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "this endpoint does not take that method")
        })
        .with_state(state)
}

async fn sync(State(state): State<CloudState>, market: Result<Path<String>, PathRejection>, headers: HeaderMap, body: Result<Bytes, axum::extract::rejection::BytesRejection>) -> CloudResult<Response> {
    let body = body.map_err(|r| {
        let code = if r.status() == StatusCode::PAYLOAD_TOO_LARGE { "body_too_large" } else { "bad_body" };
        state.markets.metrics.requests_refused.get_or_create(&crate::metrics::ReasonLabel { reason: code.into() }).inc();
        CloudError::new(r.status(), code, r.body_text())
    })?;
    let Path(market) = counted(&state, market.map_err(CloudError::from))?;
    let id = counted(&state, market_id(&market))?;
    let path = wire::sync_path(&id);
    let auth = RequestAuth::from_headers(|name| headers.get(name).and_then(|v| v.to_str().ok()));
    // On a task of its own: a tablet that hangs up mid-request must not cancel a commit halfway,
    // leaving the core in memory ahead of the store.
    let markets = state.markets.clone();
    let reply = tokio::spawn(async move { markets.sync(&id, &path, auth, &body).await })
        .await
        .map_err(|e| {
            state.markets.metrics.requests_refused.get_or_create(&crate::metrics::ReasonLabel { reason: "internal".into() }).inc();
            CloudError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("the ingest task failed: {e}"))
        })??;
    Ok(([(header::CONTENT_TYPE, wire::CONTENT_TYPE)], reply.encode()).into_response())
}

#[derive(Deserialize)]
struct EventsQuery {
    after: Option<u64>,
    limit: Option<usize>,
    wait_ms: Option<u64>,
}

async fn events(
    State(state): State<CloudState>,
    market: Result<Path<String>, PathRejection>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> CloudResult<Response> {
    let result = events_inner(&state, market, query).await;
    counted(&state, result)
}

async fn events_inner(
    state: &CloudState,
    market: Result<Path<String>, PathRejection>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> CloudResult<Response> {
    let Path(market) = market?;
    let Query(q) = query?;
    let id = market_id(&market)?;
    let after = q.after.unwrap_or(0);
    let limit = q.limit.unwrap_or(DEFAULT_EVENTS_PER_REQUEST);
    if limit == 0 || limit > MAX_EVENTS_PER_REQUEST {
        return Err(CloudError::new(StatusCode::BAD_REQUEST, "bad_query", format!("limit must be 1..={MAX_EVENTS_PER_REQUEST}")));
    }
    let wait_ms = q.wait_ms.unwrap_or(0);
    if wait_ms > MAX_WAIT_MS {
        return Err(CloudError::new(StatusCode::BAD_REQUEST, "bad_query", format!("wait_ms must be at most {MAX_WAIT_MS}")));
    }
    if state.markets.store.market(&id).await?.is_none() {
        return Err(SyncError::UnknownMarket(id).into());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
    let mut offsets = state.markets.offset_watch(&id);
    let found = loop {
        let found = state.markets.store.events(&id, after, limit).await?;
        if !found.is_empty() || tokio::time::Instant::now() >= deadline {
            break found;
        }
        // Woken by this process's commits at once, and by other processes' within the poll interval.
        let poll = tokio::time::Instant::now() + Duration::from_millis(EVENTS_POLL_MS);
        let _ = tokio::time::timeout_at(poll.min(deadline), offsets.changed()).await;
    };
    let mut body = String::new();
    for e in &found {
        body.push_str(&serde_json::to_string(e).expect("events serialize"));
        body.push('\n');
    }
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

async fn list_markets(State(state): State<CloudState>) -> CloudResult<Json<MarketList>> {
    let result = async {
        let mut markets = Vec::new();
        for reg in state.markets.store.markets().await? {
            let next = state.markets.store.next_offset(&reg.market).await?;
            markets.push(MarketSummary {
                market: reg.market.to_hex(),
                name: reg.name.clone(),
                cloud_device: reg.certificate.device.to_hex(),
                offset: next.saturating_sub(1),
            });
        }
        Ok(Json(MarketList { markets }))
    }
    .await;
    counted(&state, result)
}

async fn market_view(
    State(state): State<CloudState>,
    market: Result<Path<String>, PathRejection>,
) -> CloudResult<Json<stallmesh_api::cloud::MarketView>> {
    let result = async {
        let Path(market) = market?;
        let id = market_id(&market)?;
        Ok(Json(state.markets.view(&id).await?))
    }
    .await;
    counted(&state, result)
}

async fn metrics(State(state): State<CloudState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.markets.metrics.encode())
}

fn invalid(message: impl Into<String>) -> CloudError {
    CloudError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_registration", message)
}

async fn register_market(State(state): State<CloudState>, headers: HeaderMap, body: Result<Json<RegisterMarket>, JsonRejection>) -> CloudResult<Response> {
    let result = register_inner(&state, headers, body).await;
    counted(&state, result)
}

async fn register_inner(state: &CloudState, headers: HeaderMap, body: Result<Json<RegisterMarket>, JsonRejection>) -> CloudResult<Response> {
    // Compared in full whatever the length: the token is long and random, so timing says nothing useful.
    require_admin(state, &headers, "registering a market")?;
    let Json(req) = body?;
    let market_key = MarketPublicKey::from_hex(&req.market_public_key).map_err(|e| invalid(format!("market_public_key: {e}")))?;
    let cert_bytes = hex::decode(&req.certificate).map_err(|e| invalid(format!("certificate: {e}")))?;
    let certificate: Certificate = postcard::from_bytes(&cert_bytes).map_err(|e| invalid(format!("certificate: {e}")))?;
    let mut device_secret = [0u8; 32];
    hex::decode_to_slice(&req.device_key, &mut device_secret).map_err(|e| invalid(format!("device_key: {e}")))?;
    let market = market_key.market_id();
    certificate.verify(&market_key, crate::markets::now_ms()).map_err(|e| invalid(format!("the certificate is not this market's: {e}")))?;
    if certificate.role != Role::Cloud {
        return Err(invalid("the certificate is not for a device of role cloud: enrol one with `stallmesh device enroll --role cloud`"));
    }
    let registration = MarketRegistration {
        market,
        name: req.name,
        market_key,
        device_secret,
        certificate,
        registered_at_ms: crate::markets::now_ms(),
    };
    if registration.device_key().device_id() != registration.certificate.device {
        return Err(invalid("the device key does not match the certificate"));
    }
    let cloud_device = registration.certificate.device.to_hex();
    let created = match state.markets.register(registration).await {
        Ok(Registered::New) => true,
        Ok(Registered::Already) => false,
        Err(SyncError::Store(StoreError::Conflict(m))) => {
            return Err(CloudError::new(StatusCode::CONFLICT, "market_exists", format!("market {m} is registered with another cloud device")))
        }
        Err(e) => return Err(e.into()),
    };
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(MarketRegistered { market: market.to_hex(), cloud_device, created })).into_response())
}

/// The admin token, or 401 naming what it is needed for.
fn require_admin(state: &CloudState, headers: &HeaderMap, what: &str) -> CloudResult<()> {
    let token = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if token.is_none_or(|t| !constant_time_eq(t.as_bytes(), state.admin_token.as_bytes())) {
        return Err(CloudError::new(StatusCode::UNAUTHORIZED, "unauthenticated", format!("{what} takes the cloud's admin token (Authorization: Bearer …)")));
    }
    Ok(())
}

/// The `Idempotency-Key` header every checkout POST carries: a retry with the same key is
/// answered with what the first request did.
fn idempotency_key(headers: &HeaderMap) -> CloudResult<String> {
    let missing = || CloudError::new(StatusCode::BAD_REQUEST, "idempotency_key_required", "send an Idempotency-Key header (a UUID per attempt of one purchase step)");
    let key = headers.get("idempotency-key").ok_or_else(missing)?.to_str().map_err(|_| missing())?.trim();
    if key.is_empty() || key.len() > stallmesh_shop::MAX_IDEMPOTENCY_KEY_LEN {
        return Err(CloudError::new(
            StatusCode::BAD_REQUEST,
            "idempotency_key_required",
            format!("the Idempotency-Key must be 1..={} characters", stallmesh_shop::MAX_IDEMPOTENCY_KEY_LEN),
        ));
    }
    Ok(key.to_string())
}

async fn set_online(
    State(state): State<CloudState>,
    headers: HeaderMap,
    market: Result<Path<String>, PathRejection>,
    body: Result<Json<SetOnlineChannel>, JsonRejection>,
) -> CloudResult<Response> {
    let result = async {
        require_admin(&state, &headers, "setting up an online channel")?;
        let Path(market) = market?;
        let market = market_id(&market)?;
        let Json(req) = body?;
        let registration = state.markets.store.market(&market).await?.ok_or(SyncError::UnknownMarket(market))?;
        let cert_bytes = hex::decode(&req.certificate).map_err(|e| invalid(format!("certificate: {e}")))?;
        let certificate: Certificate = postcard::from_bytes(&cert_bytes).map_err(|e| invalid(format!("certificate: {e}")))?;
        let mut device_secret = [0u8; 32];
        hex::decode_to_slice(&req.device_key, &mut device_secret).map_err(|e| invalid(format!("device_key: {e}")))?;
        certificate
            .verify(&registration.market_key, crate::markets::now_ms())
            .map_err(|e| invalid(format!("the certificate is not this market's: {e}")))?;
        if certificate.role != Role::Online {
            return Err(invalid("the certificate is not for a device of role online: enrol one with `stallmesh device enroll --role online`"));
        }
        let online = crate::store::OnlineRegistration { device_secret, certificate };
        if online.device_key().device_id() != online.certificate.device {
            return Err(invalid("the device key does not match the certificate"));
        }
        let (created, device) = match state.markets.set_online(&market, online).await {
            Ok((outcome, device)) => (outcome == Registered::New, device),
            Err(SyncError::Store(StoreError::Conflict(m))) => {
                return Err(CloudError::new(StatusCode::CONFLICT, "online_channel_exists", format!("market {m} has another online device")))
            }
            Err(e) => return Err(e.into()),
        };
        let status = if created { StatusCode::CREATED } else { StatusCode::OK };
        Ok((status, Json(OnlineChannelSet { market: market.to_hex(), online_device: device.to_hex(), created })).into_response())
    }
    .await;
    counted(&state, result)
}

fn hold_view(h: &stallmesh_shop::Hold, now_ms: u64) -> HoldView {
    let status = h.status(now_ms);
    HoldView {
        id: h.id.clone(),
        drop: h.drop.clone(),
        sku: h.sku.clone(),
        buyer: h.buyer.clone(),
        qty: h.qty,
        status: status.as_str().into(),
        placed_at_ms: h.placed_ms,
        expires_at_ms: h.expires_ms,
        expires_in_ms: if status == stallmesh_shop::HoldStatus::Held { h.expires_ms.saturating_sub(now_ms) } else { 0 },
        sale_id: h.sale.clone(),
    }
}

async fn place_hold(
    State(state): State<CloudState>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Result<Json<PlaceHold>, JsonRejection>,
) -> CloudResult<Response> {
    let result = async {
        require_admin(&state, &headers, "online checkout")?;
        let Path((market, drop)) = path?;
        let market = market_id(&market)?;
        let key = idempotency_key(&headers)?;
        let Json(req) = body?;
        let req = HoldRequest { drop, buyer: req.buyer, qty: req.qty, idempotency_key: key };
        let outcome = state.markets.place_hold(&market, req, state.hold_ttl_ms).await?;
        let status = if outcome.created { StatusCode::CREATED } else { StatusCode::OK };
        Ok((status, Json(hold_view(&outcome.hold, outcome.now_ms))).into_response())
    }
    .await;
    counted(&state, result)
}

async fn place_order(
    State(state): State<CloudState>,
    headers: HeaderMap,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Result<Json<PlaceOrder>, JsonRejection>,
) -> CloudResult<Response> {
    let result = async {
        require_admin(&state, &headers, "online checkout")?;
        let Path((market, drop)) = path?;
        let market = market_id(&market)?;
        // Required like a hold's; the hold itself makes the payment idempotent (a hold is sold
        // once: its sale's client_ref names it), so a retry with any key finds the same order.
        idempotency_key(&headers)?;
        let Json(req) = body?;
        let outcome = state.markets.pay_hold(&market, &drop, &req.hold).await?;
        let h = &outcome.hold;
        let view = OrderView {
            sale_id: h.sale.clone().unwrap_or_default(),
            hold: h.id.clone(),
            drop: h.drop.clone(),
            sku: h.sku.clone(),
            qty: h.qty,
            total_cents: outcome.total_cents,
            currency: outcome.currency,
            offset: outcome.offset,
        };
        let status = if outcome.created { StatusCode::CREATED } else { StatusCode::OK };
        Ok((status, Json(view)).into_response())
    }
    .await;
    counted(&state, result)
}

async fn online_drop(State(state): State<CloudState>, headers: HeaderMap, path: Result<Path<(String, String)>, PathRejection>) -> CloudResult<Json<OnlineDrop>> {
    let result = async {
        require_admin(&state, &headers, "online checkout")?;
        let Path((market, drop)) = path?;
        let market = market_id(&market)?;
        let v = state.markets.online_drop(&market, &drop).await?;
        let available_online = v.held_online.saturating_sub(v.in_holds);
        let status = if v.now_ms < v.drop.start_ms {
            "scheduled"
        } else if available_online == 0 {
            "sold_out"
        } else {
            "open"
        };
        Ok(Json(OnlineDrop {
            drop_id: v.drop.id.clone(),
            name: v.drop.name.clone(),
            sku: v.drop.sku.clone(),
            units: v.drop.units,
            start_ms: v.drop.start_ms,
            status: status.into(),
            opens_in_ms: v.drop.start_ms.saturating_sub(v.now_ms),
            max_per_buyer: v.drop.max_per_buyer,
            online_device: v.online_device.to_hex(),
            available_online,
            in_holds: v.in_holds,
            held_at_stalls: v.held_elsewhere,
            sold_online: v.sold_online,
            next_expiry_ms: v.next_expiry_ms,
        }))
    }
    .await;
    counted(&state, result)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= (a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0)) as usize;
    }
    diff == 0
}
