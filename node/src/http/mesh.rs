//! The market's mesh as this node sees it, and what crosses it: `/api/v1/mesh`, arrivals,
//! equivocations, signed changes in and out, revocations.

use super::{blocking, ApiError, ApiResult, AppState, MAX_CHANGES_PER_REQUEST};
use crate::runtime::Node;
use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use stallmesh_api::{
    ArrivalView, Arrivals, ChangeView, ChangesReport, EquivocatedPosition, EquivocatingDevice, Equivocations, EventView, MeshCounters,
    MeshView, PeerView, RejectedChange, Revoked, SaleLineView,
};
use stallmesh_identity::{DeviceId, Revocation, SignedChange};
use stallmesh_ledger::{sale_id, Event, EventBody, LocalOp};

/// Peers, their state and how far behind each is; the node's own mesh identity.
#[utoipa::path(get, path = "/api/v1/mesh", tag = "mesh", responses((status = 200, description = "Peers, refusals and counters", body = stallmesh_api::MeshView), (status = 404, description = "`mesh_disabled`: this node runs without a mesh", body = stallmesh_api::ErrorBody)))]
pub(super) async fn mesh(State(app): State<AppState>) -> ApiResult<Json<MeshView>> {
    let Some(mesh) = &app.mesh else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "mesh_disabled", "this node runs without a mesh"));
    };
    let s = mesh.status();
    let st = &s.stats;
    Ok(Json(MeshView {
        peer_id: s.peer_id,
        listen_addrs: s.listen_addrs,
        peers: s
            .peers
            .into_iter()
            .map(|p| PeerView {
                peer_id: p.peer_id,
                device: p.device,
                stall: p.stall,
                state: p.state.to_string(),
                connected_for_ms: p.connected_for_ms,
                last_heard_ms_ago: p.last_heard_ms_ago,
                behind: p.behind,
                ahead: p.ahead,
                messages_in: p.session.messages_in,
                messages_out: p.session.messages_out,
                bytes_in: p.session.bytes_in,
                bytes_out: p.session.bytes_out,
                changes_in: p.session.changes_in,
                changes_out: p.session.changes_out,
                in_flight_bytes: p.session.in_flight_bytes,
            })
            .collect(),
        refused: s.refused,
        stats: MeshCounters {
            messages_in: st.messages_in,
            messages_out: st.messages_out,
            bytes_in: st.bytes_in,
            bytes_out: st.bytes_out,
            changes_sent: st.changes_sent,
            changes_received: st.changes_received,
            protocol_errors: st.protocol_errors.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            liveness_disconnects: st.liveness_disconnects,
            peers_refused: st.peers_refused,
            serving_paused: st.serving_paused,
            full_heads_wanted: st.full_heads_wanted,
            unconfirmed_expired: st.unconfirmed_expired,
        },
    }))
}

/// When recent sales from other devices arrived here (for replication-lag measurement).
#[utoipa::path(get, path = "/api/v1/mesh/arrivals", tag = "mesh", responses((status = 200, description = "When other devices’ sales arrived here", body = stallmesh_api::Arrivals)))]
pub(super) async fn arrivals(State(node): State<Node>) -> Json<Arrivals> {
    Json(Arrivals {
        arrivals: node
            .arrivals()
            .into_iter()
            .map(|a| ArrivalView { sale_id: a.sale_id, recorded_ms: a.recorded_ms, arrived_us: a.arrived_us })
            .collect(),
    })
}

/// An event, as the API shows it (a sale with its lines and total; others by kind).
fn event_view(change: &SignedChange, body: &EventBody) -> EventView {
    match body {
        EventBody::Sold { lines, total_cents, currency, client_ref, .. } => EventView::Sale {
            sale_id: sale_id(change.dot()),
            lines: lines.iter().map(|l| SaleLineView { sku: l.sku.clone(), qty: l.qty, price_cents: l.price_cents }).collect(),
            total_cents: *total_cents,
            currency: currency.clone(),
            client_ref: client_ref.clone(),
        },
        EventBody::Enrolled { .. } => EventView::Enrolment,
        EventBody::ProductUpserted { product, .. } => EventView::Product { sku: product.sku.clone() },
        EventBody::Restocked { sku, qty } => EventView::Restock { sku: sku.clone(), qty: *qty },
        EventBody::Transferred { sku, qty, to } => EventView::Transfer { sku: sku.clone(), qty: *qty, to_device: to.to_hex() },
        EventBody::PhotoAttached { sku, .. } => EventView::Photo { sku: sku.clone() },
        EventBody::Revoked { revocation } => EventView::Revocation { device: revocation.device.to_hex() },
        EventBody::CloudHolds { offset, .. } => EventView::CloudWatermark { offset: *offset },
        EventBody::LoyaltyTransferred { asset, qty, to } => {
            let (asset, id) = match asset {
                stallmesh_ledger::LoyaltyAsset::Points(c) => ("points", c.to_hex()),
                stallmesh_ledger::LoyaltyAsset::Voucher(v) => ("voucher", v.to_hex()),
            };
            EventView::LoyaltyTransfer { asset: asset.into(), id, qty: *qty, to_device: to.to_hex() }
        }
        EventBody::VoucherMinted { voucher, .. } => EventView::VoucherMinted { voucher: voucher.to_hex() },
        EventBody::VoucherRedeemed { voucher, proven } => EventView::VoucherRedeemed { voucher: voucher.to_hex(), proven: *proven },
        EventBody::RecommendationFeedback { feedback: f } => {
            EventView::RecommendationFeedback { action: f.action.as_str().into(), sku: f.sku.clone(), reason: f.reason.clone() }
        }
        EventBody::DropPlanned { name, sku, units, start_ms, .. } => EventView::Drop {
            drop_id: stallmesh_ledger::drop_id(change.dot()),
            name: name.clone(),
            sku: sku.clone(),
            units: *units,
            start_ms: *start_ms,
        },
    }
}

/// One change in an equivocation listing: which it is and what it recorded, if that can be read.
fn change_view(change: &SignedChange, event: Result<Event, String>) -> ChangeView {
    let digest = change.digest().to_hex();
    match event {
        Ok(e) => ChangeView {
            seq: change.seq,
            digest,
            time_ms: Some(e.time_ms),
            event: Some(event_view(change, &e.body)),
            event_unreadable: None,
        },
        Err(why) => ChangeView { seq: change.seq, digest, time_ms: None, event: None, event_unreadable: Some(why) },
    }
}

/// Devices seen signing two different journals, with both histories at each conflicting position:
/// the change held here and the conflicting ones kept as evidence, with the sales each recorded.
#[utoipa::path(get, path = "/api/v1/equivocations", tag = "mesh", responses((status = 200, description = "Devices seen signing two histories", body = stallmesh_api::Equivocations)))]
pub(super) async fn equivocations(State(node): State<Node>) -> ApiResult<Json<Equivocations>> {
    let listing = blocking(&node, |n| n.equivocations()).await?;
    let devices: Vec<EquivocatingDevice> = listing
        .into_iter()
        .map(|d| EquivocatingDevice {
            device: d.device.to_hex(),
            this_device: d.device.to_hex() == node.info.device,
            positions: d
                .positions
                .into_iter()
                .map(|p| EquivocatedPosition {
                    seq: p.seq,
                    held: p.held.map(|(c, e)| change_view(&c, Ok(e))),
                    conflicting: p.conflicting.into_iter().map(|(c, e)| change_view(&c, e)).collect(),
                })
                .collect(),
        })
        .collect();
    let conflicting_changes = devices.iter().flat_map(|d| &d.positions).map(|p| p.conflicting.len()).sum();
    Ok(Json(Equivocations { conflicting_changes, devices }))
}

/// A revocation signed with the market key (`stallmesh market revoke` writes one).
#[utoipa::path(post, path = "/api/v1/revocations", tag = "mesh", request_body(content = super::openapi::RevocationBody, description = "A revocation signed with the market key (`stallmesh market revoke` writes one)"), responses((status = 201, description = "Recorded and durable", body = stallmesh_api::Revoked)))]
pub(super) async fn revoke(
    State(node): State<Node>,
    body: Result<Json<Revocation>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Revoked>)> {
    let Json(rev) = body?;
    let device = rev.device;
    blocking(&node, move |n| n.execute(LocalOp::Revoke(rev))).await?;
    Ok((StatusCode::CREATED, Json(Revoked { revoked: device.to_hex() })))
}

/// Pushes a postcard-encoded `Vec<SignedChange>` from a peer or a tool; every change is verified.
#[utoipa::path(post, path = "/api/v1/changes", tag = "mesh", request_body(content = super::openapi::ChangesBody, content_type = "application/octet-stream", description = "A postcard-encoded list of signed changes"), responses((status = 200, description = "What became of each change", body = stallmesh_api::ChangesReport)))]
pub(super) async fn push_changes(State(node): State<Node>, body: Bytes) -> ApiResult<Json<ChangesReport>> {
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
    Ok(Json(ChangesReport {
        applied: report.applied.len(),
        duplicates: report.duplicates,
        pending: report.pending,
        rejected: report
            .rejected
            .iter()
            .map(|(dot, why)| RejectedChange {
                device: dot.device.to_hex(),
                seq: dot.seq,
                reason: why.label().to_string(),
                message: why.to_string(),
            })
            .collect(),
    }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ChangesQuery {
    device: String,
    /// The first journal position wanted.
    #[serde(default)]
    #[param(minimum = 0, maximum = 9_223_372_036_854_775_807_u64)]
    from: u64,
    /// Changes returned at most (default and largest: 5,000).
    #[param(minimum = 0, maximum = 5_000)]
    limit: Option<usize>,
}

/// A device's changes from `from`, postcard-encoded, for a peer or the cloud to catch up.
#[utoipa::path(get, path = "/api/v1/changes", tag = "mesh", params(ChangesQuery), responses((status = 200, description = "The device’s changes, postcard-encoded", content_type = "application/octet-stream", body = super::openapi::ChangesBody)))]
pub(super) async fn get_changes(State(node): State<Node>, Query(q): Query<ChangesQuery>) -> ApiResult<Response> {
    let device = DeviceId::from_hex(&q.device)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_device", format!("device must be 64 hex characters: {e}")))?;
    let limit = super::in_range("limit", q.limit.unwrap_or(MAX_CHANGES_PER_REQUEST), 0, MAX_CHANGES_PER_REQUEST)?;
    let from = super::in_range("from", q.from, 0, i64::MAX as u64)?;
    let changes = blocking(&node, move |n| n.changes_since(&device, from, limit)).await?;
    let body = postcard::to_allocvec(&changes).map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}
