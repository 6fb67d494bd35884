//! Drops: `/api/v1/drops` (an organiser plans one; anyone lists them), `/api/v1/drops/{drop}`.

use super::{blocking, ApiError, ApiResult};
use crate::runtime::{now_ms, Node};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use stallmesh_api::drops::{DropChannel, DropList, DropRequest, DropView};
use stallmesh_identity::DeviceId;
use stallmesh_ledger::{DropRecord, LocalOp, State as LedgerState};
use std::collections::BTreeSet;

fn drop_view(state: &LedgerState, me: DeviceId, d: &DropRecord, now_ms: u64) -> DropView {
    let progress = state.drop_progress(d);
    let devices: BTreeSet<DeviceId> =
        d.plan.keys().chain(progress.held.keys()).chain(progress.sold.keys()).copied().collect();
    let channels = devices
        .into_iter()
        .map(|device| {
            let record = state.devices.get(&device);
            DropChannel {
                device: device.to_hex(),
                this_device: device == me,
                stall: record.map(|r| r.certificate.stall.clone()),
                role: record.map(|r| r.certificate.role.as_str().to_string()),
                planned: d.plan.get(&device).copied().unwrap_or(0),
                held: progress.held.get(&device).copied().unwrap_or(0),
                sold: progress.sold.get(&device).copied().unwrap_or(0),
            }
        })
        .collect();
    let left = progress.held.values().fold(0u64, |n, h| n.saturating_add(*h));
    let status = if now_ms < d.start_ms {
        "scheduled"
    } else if left == 0 {
        "sold_out"
    } else {
        "open"
    };
    DropView {
        id: d.id.clone(),
        name: d.name.clone(),
        sku: d.sku.clone(),
        units: d.units,
        start_ms: d.start_ms,
        max_per_buyer: d.max_per_buyer,
        status: status.into(),
        opens_in_ms: d.start_ms.saturating_sub(now_ms),
        planned_by: d.author.to_hex(),
        sold: progress.sold.values().fold(0u64, |n, s| n.saturating_add(*s)),
        left,
        sold_out_at_ms: progress.sold_out_at_ms,
        channels,
    }
}

fn parse_device(hex: &str) -> Result<DeviceId, ApiError> {
    DeviceId::from_hex(hex)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", format!("plan device must be 64 hex characters: {e}")))
}

/// Records the drop in this organiser device's journal; its shares become the planned devices'
/// stock rights as the change reaches them.
#[utoipa::path(post, path = "/api/v1/drops", tag = "drops", request_body = stallmesh_api::drops::DropRequest, responses((status = 201, description = "Recorded and durable", body = stallmesh_api::drops::DropView), (status = 403, description = "`role_forbids`: only an organiser's device plans a drop", body = stallmesh_api::ErrorBody), (status = 422, description = "`invalid_input` (a plan whose shares do not add up, a device twice, the cloud's device), `unknown_sku`, `unknown_device`", body = stallmesh_api::ErrorBody)))]
pub(super) async fn plan_drop(
    State(node): State<Node>,
    body: Result<Json<DropRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<DropView>)> {
    let Json(r) = body?;
    let plan = r.plan.iter().map(|s| Ok((parse_device(&s.device)?, s.units))).collect::<Result<Vec<_>, ApiError>>()?;
    let op = LocalOp::PlanDrop { name: r.name, sku: r.sku, units: r.units, start_ms: r.start_ms, plan, max_per_buyer: r.max_per_buyer };
    let entry = blocking(&node, move |n| n.execute(op)).await?;
    let id = stallmesh_ledger::drop_id(entry.change.dot());
    let view = node.read(|l| l.state().drops.get(&id).map(|d| drop_view(l.state(), l.device(), d, now_ms())));
    view.map(|v| (StatusCode::CREATED, Json(v))).ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "a recorded drop is not in the state"))
}

#[utoipa::path(get, path = "/api/v1/drops", tag = "drops", responses((status = 200, description = "Every drop this device knows, latest start first, with units held and sold per device", body = stallmesh_api::drops::DropList)))]
pub(super) async fn list_drops(State(node): State<Node>) -> Json<DropList> {
    let now = now_ms();
    let mut drops: Vec<DropView> = node.read(|l| l.state().drops.values().map(|d| drop_view(l.state(), l.device(), d, now)).collect());
    drops.sort_by(|a, b| b.start_ms.cmp(&a.start_ms).then_with(|| a.id.cmp(&b.id)));
    Json(DropList { drops })
}

#[utoipa::path(get, path = "/api/v1/drops/{drop}", tag = "drops", params(("drop" = String, Path, description = "The drop's id")), responses((status = 200, description = "The drop", body = stallmesh_api::drops::DropView), (status = 404, description = "`unknown_drop`: not planned, or not replicated here yet", body = stallmesh_api::ErrorBody)))]
pub(super) async fn show_drop(State(node): State<Node>, Path(id): Path<String>) -> ApiResult<Json<DropView>> {
    let now = now_ms();
    node.read(|l| l.state().drops.get(&id).map(|d| drop_view(l.state(), l.device(), d, now)))
        .map(Json)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, "unknown_drop", format!("no drop {id:?} is known here")))
}
