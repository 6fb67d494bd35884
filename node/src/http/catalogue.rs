//! Products and their photos: `/api/v1/products`, `/api/v1/products/{sku}`, `.../photo`.

use super::{blocking, error::join_error, until_indexed, ApiError, ApiResult, AppState, Index};
use crate::runtime::Node;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use stallmesh_api::{NewProduct, PhotoAttached, ProductList, ProductUpdate, ProductView};
use stallmesh_inference::MAX_IMAGE_BYTES;
use stallmesh_ledger::{LocalOp, Product, State as LedgerState};

fn product_view(state: &LedgerState, sku: &str) -> Option<ProductView> {
    let p = &state.products.get(sku)?.product;
    Some(ProductView {
        sku: p.sku.clone(),
        name: p.name.clone(),
        price_cents: p.price_cents,
        currency: p.currency.clone(),
        stall: p.stall.clone(),
        tags: p.tags.clone(),
        has_photo: state.photos.contains_key(sku),
    })
}

fn current(node: &Node, sku: &str) -> ApiResult<Json<ProductView>> {
    node.read(|l| product_view(l.state(), sku))
        .map(Json)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "unknown_sku", format!("unknown SKU {sku:?}")))
}

#[utoipa::path(post, path = "/api/v1/products", tag = "catalogue", request_body = stallmesh_api::NewProduct, responses((status = 201, description = "Recorded, durable and searchable", body = stallmesh_api::ProductView), (status = 409, description = "`product_exists`: the SKU is taken", body = stallmesh_api::ErrorBody), (status = 403, description = "`other_stall`: a seller device records its own stall’s products only; `role_forbids`", body = stallmesh_api::ErrorBody)))]
pub(super) async fn create_product(
    State(app): State<AppState>,
    body: Result<Json<NewProduct>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<ProductView>)> {
    let Json(p) = body?;
    let product = Product { sku: p.sku, name: p.name, price_cents: p.price_cents, currency: p.currency, stall: p.stall, tags: p.tags };
    let sku = product.sku.clone();
    let recorded = blocking(&app.node, move |n| n.write_product(product, true)).await?;
    until_indexed(&app, Index::Catalogue, recorded.commit).await;
    Ok((StatusCode::CREATED, current(&app.node, &sku)?))
}

#[utoipa::path(put, path = "/api/v1/products/{sku}", tag = "catalogue", params(("sku" = String, Path, description = "The product’s SKU")), request_body = stallmesh_api::ProductUpdate, responses((status = 200, description = "Recorded", body = stallmesh_api::ProductView), (status = 404, description = "`unknown_sku`", body = stallmesh_api::ErrorBody), (status = 403, description = "`other_stall`; `role_forbids`", body = stallmesh_api::ErrorBody)))]
pub(super) async fn update_product(
    State(app): State<AppState>,
    Path(sku): Path<String>,
    body: Result<Json<ProductUpdate>, JsonRejection>,
) -> ApiResult<Json<ProductView>> {
    let Json(u) = body?;
    if u.sku.as_ref().is_some_and(|s| *s != sku) {
        return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_input", "sku in the body differs from the path"));
    }
    let product =
        Product { sku: sku.clone(), name: u.name, price_cents: u.price_cents, currency: u.currency, stall: u.stall, tags: u.tags };
    let recorded = blocking(&app.node, move |n| n.write_product(product, false)).await?;
    until_indexed(&app, Index::Catalogue, recorded.commit).await;
    current(&app.node, &sku)
}

#[utoipa::path(get, path = "/api/v1/products", tag = "catalogue", responses((status = 200, description = "Every product this node holds", body = stallmesh_api::ProductList)))]
pub(super) async fn list_products(State(node): State<Node>) -> Json<ProductList> {
    Json(node.read(|l| ProductList { products: l.state().products.keys().filter_map(|sku| product_view(l.state(), sku)).collect() }))
}

/// An image body, or the same JSON error as every other endpoint when it is too large.
pub(super) fn image_body(body: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "image_too_large", format!("image larger than {MAX_IMAGE_BYTES} bytes"))
        } else {
            ApiError::new(r.status(), "bad_request", r.body_text())
        }
    })
}

/// Attaches a product photo (JPEG or PNG). It is shrunk, recorded in this device's journal and
/// replicated; every device embeds it for visual search. Answered once it is searchable here.
#[utoipa::path(put, path = "/api/v1/products/{sku}/photo", tag = "catalogue", params(("sku" = String, Path, description = "The product’s SKU")), request_body(content((super::openapi::ImageBody = "image/jpeg"), (super::openapi::ImageBody = "image/png")), description = "The photo, at most 8 MiB"), responses((status = 201, description = "Shrunk, recorded and searchable", body = stallmesh_api::PhotoAttached), (status = 404, description = "`unknown_sku`", body = stallmesh_api::ErrorBody), (status = 403, description = "`other_stall`; `role_forbids`", body = stallmesh_api::ErrorBody)))]
pub(super) async fn attach_photo(
    State(app): State<AppState>,
    Path(sku): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<PhotoAttached>)> {
    let body = image_body(body)?;
    // Checked again by the ledger under the lock; this only spares decoding a photo for nothing.
    if !app.node.read(|l| l.state().products.contains_key(&sku)) {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "unknown_sku", format!("unknown SKU {sku:?}")));
    }
    let jpeg = tokio::task::spawn_blocking(move || stallmesh_inference::shrink_for_journal(&body, stallmesh_ledger::MAX_PHOTO_BYTES))
        .await
        .map_err(join_error)??;
    let photo_bytes = jpeg.len();
    let s = sku.clone();
    let recorded = blocking(&app.node, move |n| n.record(LocalOp::AttachPhoto { sku: s, jpeg })).await?;
    until_indexed(&app, Index::Catalogue, recorded.commit).await;
    Ok((StatusCode::CREATED, Json(PhotoAttached { sku, photo_bytes, seq: recorded.entry.change.seq })))
}

#[utoipa::path(get, path = "/api/v1/products/{sku}/photo", tag = "catalogue", params(("sku" = String, Path, description = "The product’s SKU")), responses((status = 200, description = "The photo as kept in the journal", content_type = "image/jpeg", body = super::openapi::ImageBody), (status = 404, description = "`no_photo`", body = stallmesh_api::ErrorBody)))]
pub(super) async fn get_photo(State(node): State<Node>, Path(sku): Path<String>) -> ApiResult<Response> {
    match node.read(|l| l.state().photos.get(&sku).map(|p| p.jpeg.clone())) {
        Some(jpeg) => Ok(([(header::CONTENT_TYPE, "image/jpeg")], jpeg).into_response()),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, "no_photo", format!("no photo for SKU {sku:?}"))),
    }
}
