//! Sales: `POST /api/v1/sales` (with the wait for stock rights a reachable peer holds) and the
//! day's sales with their summary.

use super::{run_blocking, until_indexed, ApiError, ApiResult, AppState, Index, MAX_SALES_LISTED};
use crate::mesh::MeshHandle;
use crate::metrics::Outcome;
use crate::runtime::{Node, NodeError};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use stallmesh_api::{RecommendationRecord, SaleLineView, SaleRequest, SaleView, SalesList, SalesSummary};
use stallmesh_ledger::{EventBody, LedgerError, LineRequest, RecommendationShown, Sale};
use stallmesh_sync::rebalance::{MAX_SALE_ATTEMPTS, SALE_RIGHTS_REQUEST_INTERVAL_MS, SALE_WAIT_FOR_RIGHTS_MS};
use std::time::Duration;

pub(super) fn sale_view(s: &Sale) -> SaleView {
    SaleView {
        id: s.id.clone(),
        device: s.device.to_hex(),
        lines: s.lines.iter().map(|l| SaleLineView { sku: l.sku.clone(), qty: l.qty, price_cents: l.price_cents }).collect(),
        total_cents: s.total_cents,
        currency: s.currency.clone(),
        time_ms: s.time_ms,
        client_ref: s.client_ref.clone(),
        recommendation: s.recommendation.as_ref().map(|r| RecommendationRecord { arm: r.arm.clone(), skus: r.skus.clone() }),
    }
}

/// A sale refused for rights that a reachable peer holds waits up to `SALE_WAIT_FOR_RIGHTS_MS` for
/// the transfer the refusal asked for, then is retried (`client_ref` keeps a retry from selling
/// twice). Nothing is locked while it waits. Answered once the sale is durable and counted in
/// recommendations.
pub(super) async fn create_sale(
    State(app): State<AppState>,
    body: Result<Json<SaleRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Option<SaleView>>)> {
    let Json(req) = body?;
    let node = &app.node;
    let lines: Vec<LineRequest> = req.lines.into_iter().map(|l| LineRequest { sku: l.sku, qty: l.qty }).collect();
    let recommendation = req.recommendation.map(|r| RecommendationShown { arm: r.arm, skus: r.skus });
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_millis(SALE_WAIT_FOR_RIGHTS_MS);
    // Subscribed before the first attempt: a transfer applied right after it still wakes the wait.
    let mut arrived = node.rights_arrived();
    let mut waited = false;
    let mut attempts = 0;
    let result = loop {
        attempts += 1;
        let (lines, client_ref, recommendation) = (lines.clone(), req.client_ref.clone(), recommendation.clone());
        let r = run_blocking(node, move |n| n.try_sell(lines, client_ref, recommendation)).await;
        let Err(NodeError::Ledger(LedgerError::InsufficientRights { sku, requested, held_here, held_elsewhere, held_elsewhere_total })) =
            &r
        else {
            break r;
        };
        let Some(mesh) = &app.mesh else { break r };
        if *held_elsewhere_total > 0 {
            mesh.want_rights(sku, requested - held_here, true);
        }
        let reachable = mesh.reachable_devices();
        if attempts >= MAX_SALE_ATTEMPTS || !held_elsewhere.iter().any(|(d, n)| *n > 0 && reachable.contains(d)) {
            break r;
        }
        waited = true;
        if !wait_for_rights(node, mesh, &mut arrived, sku, *requested, deadline).await {
            break r;
        }
    };
    if waited {
        let outcome = if matches!(result, Err(NodeError::Ledger(LedgerError::InsufficientRights { .. }))) { "refused" } else { "sold" };
        node.metrics.sale_rights_waits.get_or_create(&Outcome { outcome }).inc();
        tracing::debug!(outcome, attempts, waited_ms = started.elapsed().as_millis() as u64, "sale waited for stock rights");
    }
    let (status, id) = match result {
        Ok(recorded) => {
            debug_assert!(matches!(recorded.entry.event.body, EventBody::Sold { .. }));
            until_indexed(&app, Index::Sales, recorded.commit).await;
            (StatusCode::CREATED, stallmesh_ledger::sale_id(recorded.entry.change.dot()))
        }
        // A retried POST with the same client_ref returns the sale already recorded.
        Err(NodeError::Ledger(LedgerError::AlreadyRecorded { sale_id, .. })) => (StatusCode::OK, sale_id),
        Err(NodeError::Ledger(le @ LedgerError::InsufficientRights { .. })) => {
            node.count_refused("sale_insufficient_stock_rights");
            let Some(mesh) = &app.mesh else { return Err(NodeError::Ledger(le).into()) };
            // Say how much of what is held elsewhere sits on devices this one cannot reach now.
            let unreachable = match &le {
                LedgerError::InsufficientRights { held_elsewhere, .. } => mesh.held_on_unreachable(held_elsewhere),
                _ => 0,
            };
            let mut err = ApiError::from(NodeError::Ledger(le));
            if let Some(d) = err.body.details.as_mut() {
                d.held_on_unreachable_devices = Some(unreachable);
                d.reachable_devices = Some(mesh.reachable_devices().iter().map(|d| d.to_hex()).collect());
                d.waited_ms = Some(if waited { started.elapsed().as_millis() as u64 } else { 0 });
            }
            return Err(err);
        }
        Err(e) => return Err(e.into()),
    };
    Ok((status, Json(node.read(|l| l.state().sales.get(&id).map(sale_view)))))
}

/// Waits until this device holds `requested` units of `sku`, or `deadline`. Wakes when a transfer
/// to this device is applied; asks again every `SALE_RIGHTS_REQUEST_INTERVAL_MS` in between (a
/// lost ask, or the rights moved to another peer meanwhile).
async fn wait_for_rights(
    node: &Node,
    mesh: &MeshHandle,
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
            Err(_) => mesh.want_rights(sku, requested - here, true),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SalesQuery {
    limit: Option<usize>,
}

pub(super) async fn list_sales(State(node): State<Node>, Query(q): Query<SalesQuery>) -> Json<SalesList> {
    let limit = q.limit.unwrap_or(1_000).min(MAX_SALES_LISTED);
    Json(node.read(|l| {
        let mut sales: Vec<&Sale> = l.state().sales.values().collect();
        sales.sort_by(|a, b| (b.time_ms, &b.id).cmp(&(a.time_ms, &a.id)));
        let s = l.state().summary();
        SalesList {
            summary: SalesSummary {
                sales: s.sales,
                units: s.units,
                revenue_cents: s.revenue_cents,
                revenue_cents_per_hour: s.revenue_cents_per_hour,
                average_order_cents: s.average_order_cents,
            },
            sales: sales.into_iter().take(limit).map(sale_view).collect(),
        }
    }))
}
