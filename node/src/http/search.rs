//! Product search (text and photo) and recommendations, with the experiment's lift.

use super::catalogue::image_body;
use super::error::join_error;
use super::{ApiError, ApiResult, AppState};
use crate::inference::{Readiness, MAX_QUERY_BYTES};
use crate::metrics::Outcome;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use stallmesh_api::{
    ImageSearchResults, RecommendationLift, RecommendationRecord, RecommendationView, Recommendations, SearchHit, SearchResults,
};
use stallmesh_inference::search::{Hit, MAX_RESULTS};
use stallmesh_inference::InferenceError;

/// Results when the request does not say: a screenful of search hits, a row of suggestions.
const DEFAULT_SEARCH_HITS: usize = 10;
const DEFAULT_IMAGE_HITS: usize = 5;
const DEFAULT_RECOMMENDATIONS: usize = 5;
/// Longest customer session id accepted for the experiment's arm.
const MAX_SESSION_BYTES: usize = 128;

pub(super) fn readiness_name(r: Readiness) -> &'static str {
    match r {
        Readiness::Off => "off",
        Readiness::Loading => "loading",
        Readiness::Ready => "ready",
    }
}

fn hit_view(h: Hit) -> SearchHit {
    SearchHit { sku: h.sku, name: h.name, score: h.score, semantic: h.semantic, lexical: h.lexical, exact: h.exact.map(String::from) }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct SearchQuery {
    /// The search words (text search).
    q: Option<String>,
    /// Hits wanted.
    #[param(minimum = 1, maximum = 50)]
    k: Option<usize>,
}

fn result_count(k: Option<usize>, default: usize) -> ApiResult<usize> {
    match k.unwrap_or(default) {
        0 => Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_input", "k must be at least 1")),
        k => super::in_range("k", k, 1, MAX_RESULTS),
    }
}

/// Hybrid product search: `GET /api/v1/search?q=raw+honey&k=10`.
#[utoipa::path(get, path = "/api/v1/search", tag = "search", params(SearchQuery), responses((status = 200, description = "Hits, best first", body = stallmesh_api::SearchResults), (status = 400, description = "`missing_query`", body = stallmesh_api::ErrorBody)))]
pub(super) async fn search(State(app): State<AppState>, Query(q): Query<SearchQuery>) -> ApiResult<Json<SearchResults>> {
    let started = std::time::Instant::now();
    let (node, inference) = (&app.node, &app.inference);
    let query = q.q.unwrap_or_default().trim().to_string();
    if query.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "missing_query", "give the search words as ?q="));
    }
    if query.len() > MAX_QUERY_BYTES {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "query_too_long",
            format!("query is {} bytes; at most {MAX_QUERY_BYTES}", query.len()),
        ));
    }
    let k = result_count(q.k, DEFAULT_SEARCH_HITS)?;
    let looked_up = inference.query_vector(&query).await.map_err(|e| {
        node.metrics.search_requests.get_or_create(&Outcome { outcome: "refused" }).inc();
        ApiError::from(e)
    })?;
    let query_embedding_cached = looked_up.as_ref().is_some_and(|(_, c)| *c);
    let vector = looked_up.map(|(v, _)| v);
    let mode = if vector.is_some() { "hybrid" } else { "lexical" };
    let (inf, q2) = (inference.clone(), query.clone());
    let hits = tokio::task::spawn_blocking(move || inf.search(&q2, vector.as_ref().map(|v| v.as_slice()), k)).await.map_err(join_error)?;
    node.metrics.search_requests.get_or_create(&Outcome { outcome: mode }).inc();
    node.metrics.search_seconds.observe(started.elapsed().as_secs_f64());
    Ok(Json(SearchResults {
        query,
        mode: mode.to_string(),
        query_embedding_cached,
        inference: readiness_name(inference.readiness()).to_string(),
        hits: hits.into_iter().map(hit_view).collect(),
        took_us: started.elapsed().as_micros() as u64,
    }))
}

/// Visual search: the body is a JPEG or PNG photo; `?k=` results.
#[utoipa::path(post, path = "/api/v1/search/image", tag = "search", params(SearchQuery), request_body(content((super::openapi::ImageBody = "image/jpeg"), (super::openapi::ImageBody = "image/png")), description = "A photo of the product"), responses((status = 200, description = "Products that look alike, best first", body = stallmesh_api::ImageSearchResults)))]
pub(super) async fn search_image(
    State(app): State<AppState>,
    Query(q): Query<SearchQuery>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<ImageSearchResults>> {
    let started = std::time::Instant::now();
    let body = image_body(body)?;
    let k = result_count(q.k, DEFAULT_IMAGE_HITS)?;
    let pool = app.inference.pool().cloned().ok_or(InferenceError::ModelUnavailable("image"))?;
    let vector = pool.embed_image(body.to_vec()).await?;
    let hits = app.inference.index().search_image(&vector, k);
    app.node.metrics.search_requests.get_or_create(&Outcome { outcome: "image" }).inc();
    Ok(Json(ImageSearchResults { hits: hits.into_iter().map(hit_view).collect(), took_us: started.elapsed().as_micros() as u64 }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct RecommendationQuery {
    /// The basket's SKUs, comma-separated.
    basket: Option<String>,
    /// Recommendations wanted.
    #[param(minimum = 1, maximum = 50)]
    k: Option<usize>,
    /// The customer's checkout session; decides the experiment arm (default: the basket itself).
    session: Option<String>,
}

/// "Bought together": `GET /api/v1/recommendations?basket=SKU1,SKU2&k=5&session=...`.
#[utoipa::path(get, path = "/api/v1/recommendations", tag = "search", params(RecommendationQuery), responses((status = 200, description = "Bought together with the basket", body = stallmesh_api::Recommendations), (status = 400, description = "`missing_basket`", body = stallmesh_api::ErrorBody)))]
pub(super) async fn recommendations(State(app): State<AppState>, Query(q): Query<RecommendationQuery>) -> ApiResult<Json<Recommendations>> {
    let started = std::time::Instant::now();
    let (node, inference) = (&app.node, &app.inference);
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
    let k = result_count(q.k, DEFAULT_RECOMMENDATIONS)?.min(stallmesh_ledger::MAX_RECOMMENDED);
    let session = q.session.unwrap_or_else(|| basket.join(","));
    if session.len() > MAX_SESSION_BYTES {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_input",
            format!("session must be at most {MAX_SESSION_BYTES} bytes"),
        ));
    }
    let arm = inference.arm(&node.info.device, &session);
    let (inf, n, b) = (inference.clone(), node.clone(), basket.clone());
    let recs = tokio::task::spawn_blocking(move || inf.recommend(&n, &b, k)).await.map_err(join_error)?;
    node.metrics.recommend_seconds.observe(started.elapsed().as_secs_f64());
    let record = RecommendationRecord { arm: arm.to_string(), skus: recs.iter().map(|r| r.sku.clone()).collect() };
    let shown = if arm == "treatment" { recs } else { Vec::new() };
    Ok(Json(Recommendations {
        basket,
        arm: arm.to_string(),
        recommendations: shown
            .into_iter()
            .map(|r| RecommendationView {
                sku: r.sku,
                name: r.name,
                score: r.score,
                bought_together: r.bought_together,
                reason: r.reason.to_string(),
            })
            .collect(),
        record,
        took_us: started.elapsed().as_micros() as u64,
    }))
}

/// Conversion by experiment arm over the market's replicated sales (see `kpi`).
#[utoipa::path(get, path = "/api/v1/recommendations/lift", tag = "search", responses((status = 200, description = "Conversion by experiment arm", body = stallmesh_api::RecommendationLift)))]
pub(super) async fn recommendation_lift(State(app): State<AppState>) -> Json<RecommendationLift> {
    let treatment_percent = app.inference.treatment_percent;
    Json(app.node.read(|l| crate::kpi::recommendation_lift(l.state().sales.values(), treatment_percent)))
}
