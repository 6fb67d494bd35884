//! Every error answer: an HTTP status, a stable code and a message (`stallmesh_api::ErrorBody`).

use crate::runtime::NodeError;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use stallmesh_api::{ErrorBody, RightsShortfall};
use stallmesh_inference::{ImageError, InferenceError};
use stallmesh_ledger::LedgerError;

pub struct ApiError {
    pub(super) status: StatusCode,
    pub(super) body: ErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self { status, body: ErrorBody { error: code.to_string(), message: message.into(), details: None, points: None } }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
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
                    LedgerError::RoleForbids { .. } => (StatusCode::FORBIDDEN, "role_forbids"),
                    LedgerError::Cloned => (StatusCode::SERVICE_UNAVAILABLE, "device_cloned"),
                    LedgerError::InsufficientPoints { .. } => (StatusCode::CONFLICT, "insufficient_points"),
                    LedgerError::InsufficientLoyaltyRights { .. } => (StatusCode::CONFLICT, "insufficient_loyalty_rights"),
                    LedgerError::VoucherRedeemed { .. } => (StatusCode::CONFLICT, "already_redeemed"),
                    LedgerError::VoucherHeldElsewhere { .. } => (StatusCode::CONFLICT, "voucher_held_elsewhere"),
                    LedgerError::VoucherExists(_) => (StatusCode::CONFLICT, "voucher_exists"),
                    LedgerError::UnknownVoucher(_) => (StatusCode::NOT_FOUND, "unknown_voucher"),
                    LedgerError::DropNotStarted { .. } => (StatusCode::CONFLICT, "drop_not_started"),
                };
                let mut err = ApiError::new(status, code, message);
                if let LedgerError::InsufficientRights { sku, requested, held_here, held_elsewhere_total, held_elsewhere } = le {
                    err.body.details = Some(Box::new(RightsShortfall {
                        sku,
                        requested,
                        held_here,
                        held_elsewhere_total,
                        held_elsewhere: held_elsewhere.into_iter().map(|(d, n)| (d.to_hex(), n)).collect(),
                        held_on_unreachable_devices: None,
                        reachable_devices: None,
                        waited_ms: None,
                    }));
                }
                err
            }
            NodeError::ProductExists(_) => ApiError::new(StatusCode::CONFLICT, "product_exists", message),
            NodeError::UnknownProduct(_) => ApiError::new(StatusCode::NOT_FOUND, "unknown_sku", message),
            NodeError::Failed(_) | NodeError::Store(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", message),
            NodeError::Recovering(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "recovering", message),
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message),
        }
    }
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

/// Longest text of a framework error (a rejection's message) carried into the JSON body.
const MAX_ERROR_TEXT_BYTES: usize = 4 * 1024;

/// Every error answer is the documented JSON, including the ones the framework makes before any
/// handler runs: 405 for a wrong method (empty body), 400 for a query string or path that does not
/// parse, 413 from a body limit, 404 for a page asset. Their text becomes the message; headers such
/// as `Allow` stay.
pub(super) async fn json_errors(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, MAX_ERROR_TEXT_BYTES).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_input",
        s if s.is_server_error() => "internal",
        _ => "error",
    };
    let message = if text.is_empty() { status.canonical_reason().unwrap_or("error").to_string() } else { text };
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    parts.headers.remove(axum::http::header::CONTENT_TYPE);
    let mut out = ApiError::new(status, code, message).into_response();
    // Keep what the framework said beside the body (`Allow` for a 405).
    for (name, value) in parts.headers.iter() {
        out.headers_mut().entry(name.clone()).or_insert(value.clone());
    }
    out
}

/// A spawned blocking task that did not finish (it panicked): an internal error.
pub(super) fn join_error(e: tokio::task::JoinError) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
}
