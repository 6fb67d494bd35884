//! What the POS page needs beyond the resources: staff feedback on recommendations
//! (`/api/v1/recommendations/feedback`), the KPIs (`/api/v1/kpis`), and a loyalty card's QR read
//! from a photo (`/api/v1/loyalty/scan`: headless and many tablet browsers have no barcode
//! detector, so the node decodes it).

use super::catalogue::image_body;
use super::{run_blocking, ApiError, ApiResult, AppState};
use crate::metrics::Reason;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use stallmesh_api::till::{FeedbackCount, FeedbackList, FeedbackRequest, FeedbackView, Kpis, ScannedCard};
use stallmesh_ledger::{FeedbackAction, FeedbackRecord, RecommendationFeedback, FEEDBACK_REASONS};
use std::collections::BTreeMap;

/// Feedback listed when the request does not say, and at most.
const DEFAULT_FEEDBACK_LISTED: usize = 50;
pub(super) const MAX_FEEDBACK_LISTED: usize = 1_000;
/// Largest side of a photo the QR reader looks at: a phone photo is scaled down to it first (a
/// card's QR fills a good part of the frame; the reader's time grows with the pixels).
const MAX_SCAN_SIDE_PX: u32 = 1_024;
/// Card photos read at once: each decode holds up to `MAX_IMAGE_PIXELS` × 3 bytes; a till scans one
/// card at a time, a few tills may share a node. Beyond it: 503, try again.
pub const MAX_CONCURRENT_SCANS: usize = 2;

static SCANS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_CONCURRENT_SCANS);

fn invalid(field: &str, problem: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_input", format!("{field}: {problem}"))
}

/// `POST /api/v1/recommendations/feedback`: recorded as a signed event of this device's journal,
/// replicated like a sale, and in the cloud's log for retraining.
#[utoipa::path(post, path = "/api/v1/recommendations/feedback", tag = "till", request_body = stallmesh_api::till::FeedbackRequest, responses((status = 201, description = "Recorded and durable", body = stallmesh_api::till::FeedbackView)))]
pub(super) async fn record_feedback(
    State(app): State<AppState>,
    body: Result<Json<FeedbackRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<FeedbackView>)> {
    let Json(req) = body?;
    let action = match req.action.as_str() {
        "dismiss" => FeedbackAction::Dismissed,
        "override" => FeedbackAction::Overridden,
        other => return Err(invalid("action", format!("{other:?} is not \"dismiss\" or \"override\""))),
    };
    let reason = match (action, req.reason) {
        (_, Some(r)) => r,
        (FeedbackAction::Overridden, None) => "staff_choice".to_string(),
        (FeedbackAction::Dismissed, None) => return Err(invalid("reason", format!("a dismissal says why: {}", FEEDBACK_REASONS.join(", ")))),
    };
    let feedback = RecommendationFeedback { action, sku: req.sku, reason, chosen_sku: req.chosen_sku, basket: req.basket, arm: req.arm };
    // The ledger checks it (the one validation path a peer's event also takes).
    let recorded = run_blocking(&app.node, move |n| n.record_feedback(feedback)).await?;
    let stallmesh_ledger::EventBody::RecommendationFeedback { feedback } = &recorded.entry.event.body else {
        unreachable!("record_feedback records feedback")
    };
    let label = format!("{}:{}", feedback.action.as_str(), feedback.reason);
    app.node.metrics.recommendation_feedback.get_or_create(&Reason { reason: label.clone() }).inc();
    tracing::info!(sku = %feedback.sku, feedback = %label, "recommendation feedback recorded");
    let record = FeedbackRecord {
        device: recorded.entry.change.device,
        seq: recorded.entry.change.seq,
        time_ms: recorded.entry.event.time_ms,
        feedback: feedback.clone(),
    };
    Ok((StatusCode::CREATED, Json(feedback_view(&record))))
}

fn feedback_view(r: &FeedbackRecord) -> FeedbackView {
    FeedbackView {
        device: r.device.to_hex(),
        seq: r.seq,
        time_ms: r.time_ms,
        action: r.feedback.action.as_str().into(),
        sku: r.feedback.sku.clone(),
        reason: r.feedback.reason.clone(),
        chosen_sku: r.feedback.chosen_sku.clone(),
        basket: r.feedback.basket.clone(),
        arm: r.feedback.arm.clone(),
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct FeedbackQuery {
    /// Recent feedback listed (default 50).
    #[param(minimum = 0, maximum = 1_000)]
    limit: Option<usize>,
}

/// `GET /api/v1/recommendations/feedback`: the market's feedback, counted per reason.
#[utoipa::path(get, path = "/api/v1/recommendations/feedback", tag = "till", params(FeedbackQuery), responses((status = 200, description = "The market’s feedback counted per reason", body = stallmesh_api::till::FeedbackList)))]
pub(super) async fn list_feedback(State(app): State<AppState>, Query(q): Query<FeedbackQuery>) -> ApiResult<Json<FeedbackList>> {
    let limit = super::in_range("limit", q.limit.unwrap_or(DEFAULT_FEEDBACK_LISTED), 0, MAX_FEEDBACK_LISTED)?;
    Ok(Json(app.node.read(|l| {
        let all = &l.state().recommendation_feedback;
        let mut counts: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for r in all {
            *counts.entry((r.feedback.action.as_str(), r.feedback.reason.as_str())).or_default() += 1;
        }
        let mut recent: Vec<&FeedbackRecord> = all.iter().collect();
        // Replicas fold devices' journals in different orders: sort for one answer everywhere.
        recent.sort_by(|a, b| (b.time_ms, b.device, b.seq).cmp(&(a.time_ms, a.device, a.seq)));
        FeedbackList {
            total: all.len() as u64,
            by_reason: counts.into_iter().map(|((action, reason), count)| FeedbackCount { action: action.into(), reason: reason.into(), count }).collect(),
            recent: recent.into_iter().take(limit).map(feedback_view).collect(),
        }
    })))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct KpiQuery {
    /// Sales from this time on (ms since the epoch; default: all).
    #[param(minimum = 0, maximum = 253_402_300_799_999_u64)]
    since_ms: Option<u64>,
}

/// `GET /api/v1/kpis?since_ms=…` (default: every sale this replica holds).
#[utoipa::path(get, path = "/api/v1/kpis", tag = "till", params(KpiQuery), responses((status = 200, description = "The market’s key figures", body = stallmesh_api::till::Kpis)))]
pub(super) async fn kpis(State(app): State<AppState>, Query(q): Query<KpiQuery>) -> ApiResult<Json<Kpis>> {
    let treatment_percent = app.inference.treatment_percent;
    let since_ms = super::in_range("since_ms", q.since_ms.unwrap_or(0), 0, super::MAX_TIME_MS)?;
    Ok(Json(app.node.read(|l| {
        let state = l.state();
        crate::kpi::kpis(
            state.sales.values(),
            since_ms,
            |sku| state.products.get(sku).map(|p| p.product.name.clone()),
            treatment_percent,
        )
    })))
}

/// `POST /api/v1/loyalty/scan`: the QR text of the card in a photo (JPEG or PNG).
#[utoipa::path(post, path = "/api/v1/loyalty/scan", tag = "loyalty", request_body(content((super::openapi::ImageBody = "image/jpeg"), (super::openapi::ImageBody = "image/png")), description = "A photo of a loyalty card’s QR code"), responses((status = 200, description = "The QR code’s text", body = stallmesh_api::till::ScannedCard)))]
pub(super) async fn scan_card(State(_app): State<AppState>, body: Result<Bytes, BytesRejection>) -> ApiResult<Json<ScannedCard>> {
    let bytes = image_body(body)?;
    let Ok(_permit) = SCANS.try_acquire() else {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "scanner_busy", format!("{MAX_CONCURRENT_SCANS} card photos are being read: try again")));
    };
    let started = std::time::Instant::now();
    let text = tokio::task::spawn_blocking(move || read_qr(&bytes))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))??;
    Ok(Json(ScannedCard { qr_text: text, took_us: started.elapsed().as_micros() as u64 }))
}

/// Decodes the first QR code in the image. Pure Rust (rqrr), so it runs on any tablet. The image
/// goes through visual search's decoder and its limits (format, size, pixels read from the header).
pub fn read_qr(bytes: &[u8]) -> Result<String, ApiError> {
    let rgb = stallmesh_inference::decode_image(bytes).map_err(|e| ApiError::from(stallmesh_inference::InferenceError::Image(e)))?;
    let img = image::DynamicImage::ImageRgb8(rgb);
    let img = if img.width().max(img.height()) > MAX_SCAN_SIDE_PX {
        img.resize(MAX_SCAN_SIDE_PX, MAX_SCAN_SIDE_PX, image::imageops::FilterType::Triangle)
    } else {
        img
    };
    let luma = img.to_luma8();
    let mut prepared = rqrr::PreparedImage::prepare_from_greyscale(luma.width() as usize, luma.height() as usize, |x, y| {
        luma.get_pixel(x as u32, y as u32).0[0]
    });
    let no_code = || ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "no_qr_code", "no readable QR code in the image: hold the card flat and closer");
    // rqrr can still assert on some images (an open issue upstream): a photo it cannot read is a
    // photo without a code, not a failed request.
    let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        prepared.detect_grids().iter().find_map(|g| g.decode().ok().map(|(_, text)| text))
    }));
    found.ok().flatten().ok_or_else(no_code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qr_png(text: &str, scale: u32) -> Vec<u8> {
        let code = qrcode::QrCode::new(text.as_bytes()).unwrap();
        let width = code.width() as u32;
        let colors = code.to_colors();
        let quiet = 4;
        let side = (width + 2 * quiet) * scale;
        let img = image::GrayImage::from_fn(side, side, |x, y| {
            let (mx, my) = ((x / scale) as i64 - quiet as i64, (y / scale) as i64 - quiet as i64);
            let dark = mx >= 0 && my >= 0 && mx < width as i64 && my < width as i64 && colors[(my as u32 * width + mx as u32) as usize] == qrcode::Color::Dark;
            image::Luma([if dark { 0 } else { 255 }])
        });
        let mut out = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn a_card_qr_in_a_photo_is_read_and_a_photo_without_one_is_refused_precisely() {
        let text = "SMC1:6BFOXN*TS0 FEUP4PN+0$P";
        assert_eq!(read_qr(&qr_png(text, 6)).ok().as_deref(), Some(text));
        let blank = qr_png("x", 1);
        let mut img = image::load_from_memory(&blank).unwrap().to_luma8();
        img.pixels_mut().for_each(|p| p.0[0] = 255);
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
        assert_eq!(read_qr(&png).err().map(|e| e.body.error), Some("no_qr_code".to_string()));
        assert_eq!(read_qr(b"not an image").err().map(|e| e.body.error), Some("unsupported_image_format".to_string()));
    }
}
