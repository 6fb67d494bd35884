//! Stock and stock rights: `/api/v1/stock`, `/api/v1/restocks`, `/api/v1/transfers`.

use super::{blocking, run_blocking, ApiError, ApiResult, AppState};
use crate::runtime::Node;
use crate::runtime::NodeError;
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use stallmesh_api::{RestockRequest, StockList, StockMovement, StockRow, TransferRequest};
use stallmesh_identity::DeviceId;
use stallmesh_ledger::LedgerError;
use stallmesh_ledger::LocalOp;
use std::collections::BTreeSet;

#[utoipa::path(get, path = "/api/v1/stock", tag = "stock", responses((status = 200, description = "Stock rights per SKU and device", body = stallmesh_api::StockList)))]
pub(super) async fn stock(State(app): State<AppState>) -> Json<StockList> {
    let reachable = app.mesh.as_ref().map(|m| m.reachable_devices());
    Json(app.node.read(|l| {
        let me = l.device();
        let state = l.state();
        let skus: BTreeSet<&String> = state.products.keys().chain(state.rights.keys()).collect();
        let stock = skus
            .into_iter()
            .map(|sku| {
                let s = state.stock(sku);
                StockRow {
                    sku: sku.clone(),
                    name: state.products.get(sku).map(|p| p.product.name.clone()),
                    total: s.total,
                    this_device: s.per_device.get(&me).copied().unwrap_or(0),
                    per_device: s.per_device.iter().map(|(d, n)| (d.to_hex(), *n)).collect(),
                    reachable_peers: reachable.as_ref().map(|r| s.per_device.iter().filter(|(d, _)| **d != me && r.contains(d)).map(|(_, n)| *n).sum()),
                    unreachable: reachable.as_ref().map(|r| s.per_device.iter().filter(|(d, _)| **d != me && !r.contains(d)).map(|(_, n)| *n).sum()),
                }
            })
            .collect();
        StockList { device: me.to_hex(), stock }
    }))
}

#[utoipa::path(post, path = "/api/v1/restocks", tag = "stock", request_body = stallmesh_api::RestockRequest, responses((status = 201, description = "Recorded and durable", body = stallmesh_api::StockMovement), (status = 403, description = "`other_stall`; `role_forbids`", body = stallmesh_api::ErrorBody)))]
pub(super) async fn restock(
    State(node): State<Node>,
    body: Result<Json<RestockRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<StockMovement>)> {
    let Json(r) = body?;
    let (sku, qty) = (r.sku.clone(), r.qty);
    let entry = blocking(&node, move |n| n.execute(LocalOp::Restock { sku: r.sku, qty: r.qty })).await?;
    let rights_here = node.read(|l| l.state().rights_of(&sku, &l.device()));
    Ok((StatusCode::CREATED, Json(StockMovement { sku, qty, to_device: None, seq: entry.change.seq, rights_here })))
}

/// A transfer short of rights asks peers for them (as a refill: nobody waits at a till), and is
/// refused now; the organiser can try again once they arrive.
#[utoipa::path(post, path = "/api/v1/transfers", tag = "stock", request_body = stallmesh_api::TransferRequest, responses((status = 201, description = "Recorded and durable", body = stallmesh_api::StockMovement), (status = 409, description = "`insufficient_stock_rights` (with `details`)", body = stallmesh_api::ErrorBody), (status = 403, description = "`role_forbids`", body = stallmesh_api::ErrorBody)))]
pub(super) async fn transfer(
    State(app): State<AppState>,
    body: Result<Json<TransferRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<StockMovement>)> {
    let Json(t) = body?;
    let node = &app.node;
    let to = DeviceId::from_hex(&t.to_device).map_err(|e| {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", format!("to_device must be 64 hex characters: {e}"))
    })?;
    let (sku, qty) = (t.sku.clone(), t.qty);
    let entry = match run_blocking(node, move |n| n.execute(LocalOp::Transfer { sku: t.sku, qty: t.qty, to })).await {
        Ok(entry) => entry,
        Err(e) => {
            if let (
                NodeError::Ledger(LedgerError::InsufficientRights { sku, requested, held_here, held_elsewhere_total, .. }),
                Some(mesh),
            ) = (&e, &app.mesh)
            {
                mesh.refused(sku, *requested, *held_here, *held_elsewhere_total, false);
            }
            return Err(e.into());
        }
    };
    let rights_here = node.read(|l| l.state().rights_of(&sku, &l.device()));
    Ok((StatusCode::CREATED, Json(StockMovement { sku, qty, to_device: Some(to.to_hex()), seq: entry.change.seq, rights_here })))
}
