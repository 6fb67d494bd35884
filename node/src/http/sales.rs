//! Sales: `POST /api/v1/sales` (with the wait for stock rights a reachable peer holds) and the
//! day's sales with their summary.

use super::{run_blocking, until_indexed, ApiError, ApiResult, AppState, Index, DEFAULT_SALES_LISTED, MAX_SALES_LISTED};
use crate::mesh::MeshHandle;
use crate::metrics::Outcome;
use crate::runtime::{Node, NodeError};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use stallmesh_api::{RecommendationRecord, SaleLineView, SaleLoyaltyView, SaleRequest, SaleView, SalesList, SalesSummary};
use stallmesh_ledger::{EventBody, LedgerError, LineRequest, RecommendationShown, Sale};
use stallmesh_sync::rebalance::{SaleWait, SaleWaitStep};
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
        loyalty: s.loyalty.as_ref().map(|l| SaleLoyaltyView {
            card: l.card.to_hex(),
            points_earned: l.points_earned,
            points_redeemed: l.points_redeemed,
            points_unproven: l.points_unproven,
            discount_cents: l.discount_cents,
        }),
        staff: s.staff.clone(),
    }
}

/// A sale refused for rights that a reachable peer holds waits up to `SALE_WAIT_FOR_RIGHTS_MS` for
/// the transfer the refusal asked for, then is retried (`client_ref` keeps a retry from selling
/// twice). Nothing is locked while it waits. Answered once the sale is durable and counted in
/// recommendations.
#[utoipa::path(post, path = "/api/v1/sales", tag = "sales", request_body = stallmesh_api::SaleRequest, responses((status = 201, description = "Recorded and durable", body = stallmesh_api::SaleView), (status = 200, description = "A retry: the sale recorded earlier with this `client_ref`", body = stallmesh_api::SaleView), (status = 409, description = "`insufficient_stock_rights` (with `details`: who holds the units); `client_ref_reused` (a different sale under this `client_ref`); `insufficient_points` (with `points`); `insufficient_loyalty_rights`; `already_redeemed`; `drop_not_started` (the SKU is in a drop that has not opened)", body = stallmesh_api::ErrorBody), (status = 403, description = "a loyalty card refused: `bad_signature`, `wrong_market`, `revoked`, `holder_proof_invalid`, …", body = stallmesh_api::ErrorBody)))]
pub(super) async fn create_sale(
    State(app): State<AppState>,
    signed_in: Option<axum::Extension<super::session::SignedIn>>,
    body: Result<Json<SaleRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Option<SaleView>>)> {
    let staff = signed_in.map(|axum::Extension(s)| s.0);
    let Json(req) = body?;
    let node = &app.node;
    let lines: Vec<LineRequest> = req.lines.into_iter().map(|l| LineRequest { sku: l.sku, qty: l.qty }).collect();
    let recommendation = req.recommendation.map(|r| RecommendationShown { arm: r.arm, skus: r.skus });
    // A till's retry of a sale already recorded is answered with it: its card is not looked at
    // again (a phone wallet's challenge is used up, and nothing must be redeemed twice).
    let retry = req.client_ref.as_ref().is_some_and(|r| node.read(|l| l.state().sale_by_client_ref(&l.device(), r).is_some()));
    // A card is verified (and points to redeem fetched from a reachable holder) before the sale.
    let prepared = match &req.loyalty {
        Some(l) if !retry => Some(super::loyalty::prepare_sale_loyalty(&app, l, &lines).await?),
        _ => None,
    };
    let challenge = prepared.as_ref().and_then(|p| p.challenge);
    let loyalty = prepared.map(|p| p.on_sale);
    // The wait's own monotonic clock (ms since the request began): the wall clock may jump.
    let started = tokio::time::Instant::now();
    let elapsed_ms = || started.elapsed().as_millis() as u64;
    let mut wait = SaleWait::new(0);
    // Whether this sale asked the market's online channel (through the uplink) already: once.
    let mut asked_online = false;
    // Subscribed before the first attempt: a transfer applied right after it still wakes the wait.
    let mut arrived = node.rights_arrived();
    let result = loop {
        let (lines, client_ref, recommendation, loyalty, staff) =
            (lines.clone(), req.client_ref.clone(), recommendation.clone(), loyalty.clone(), staff.clone());
        let r = run_blocking(node, move |n| n.try_sell(lines, client_ref, recommendation, loyalty, staff)).await;
        let Err(NodeError::Ledger(LedgerError::InsufficientRights { sku, requested, held_here, held_elsewhere, held_elsewhere_total })) =
            &r
        else {
            break r;
        };
        let Some(mesh) = &app.mesh else { break r };
        mesh.refused(sku, *requested, *held_here, *held_elsewhere_total, true);
        let reachable = mesh.reachable_devices();
        // The online channel is reachable through a live uplink: ask it once, and wait for it as
        // for a peer.
        let online = app.uplink.as_ref().filter(|u| u.live(crate::runtime::now_ms())).and_then(|u| {
            let held_online = node.read(|l| {
                let state = l.state();
                held_elsewhere
                    .iter()
                    .filter(|(d, _)| state.devices.get(d).is_some_and(|r| r.certificate.role == stallmesh_identity::Role::Online))
                    .map(|(_, n)| *n)
                    .sum::<u64>()
            });
            (held_online > 0).then_some((u, held_online))
        });
        if let (Some((uplink, held_online)), false) = (online, asked_online) {
            asked_online = uplink.ask_for_sale(node, sku, *requested, *held_here, held_online);
        }
        let reachable_holder = held_elsewhere.iter().any(|(d, n)| *n > 0 && reachable.contains(d)) || online.is_some();
        if let Err(end) = wait.refused(sku, *requested, reachable_holder, elapsed_ms()) {
            tracing::debug!(reason = end.label(), "sale refused for stock rights without waiting further");
            break r;
        }
        if !wait_for_rights(node, mesh, &mut wait, &mut arrived, started).await {
            break r;
        }
    };
    if let (Err(_), Some((c, expires))) = (&result, challenge) {
        app.loyalty.reopen_challenge(c, expires);
    }
    let waited = wait.waited();
    if waited {
        let outcome = if matches!(result, Err(NodeError::Ledger(LedgerError::InsufficientRights { .. }))) { "refused" } else { "sold" };
        node.metrics.sale_rights_waits.get_or_create(&Outcome { outcome }).inc();
        tracing::debug!(outcome, attempts = wait.attempts(), waited_ms = elapsed_ms(), "sale waited for stock rights");
    }
    let (status, id) = match result {
        Ok(recorded) => {
            debug_assert!(matches!(recorded.entry.event.body, EventBody::Sold { .. }));
            if let EventBody::Sold { loyalty: Some(l), .. } = &recorded.entry.event.body {
                let count = |outcome: &'static str| node.metrics.loyalty_redemptions.get_or_create(&Outcome { outcome }).inc();
                if l.points_redeemed > 0 {
                    count("points_proven");
                }
                if l.points_unproven > 0 {
                    count("points_unproven");
                }
            }
            until_indexed(&app, Index::Sales, recorded.commit).await;
            (StatusCode::CREATED, stallmesh_ledger::sale_id(recorded.entry.change.dot()))
        }
        // A retried POST with the same client_ref returns the sale already recorded — if it is the
        // same basket: items added after a failed attempt must not vanish into the earlier sale.
        Err(NodeError::Ledger(LedgerError::AlreadyRecorded { sale_id, client_ref })) => {
            let same = node.read(|l| l.state().sales.get(&sale_id).is_some_and(|s| units_per_sku(s.lines.iter().map(|l| (&l.sku, l.qty))) == units_per_sku(lines.iter().map(|l| (&l.sku, l.qty)))));
            if !same {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "client_ref_reused",
                    format!("client_ref {client_ref:?} already recorded sale {sale_id} with other lines: a different basket needs its own client_ref"),
                ));
            }
            (StatusCode::OK, sale_id)
        }
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
                d.waited_ms = Some(if waited { wait.waited_ms(elapsed_ms()) } else { 0 });
            }
            return Err(err);
        }
        Err(NodeError::Ledger(e @ LedgerError::InsufficientPoints { .. })) => return Err(super::loyalty::points_shortfall(&app, e)),
        Err(e) => return Err(e.into()),
    };
    Ok((status, Json(node.read(|l| l.state().sales.get(&id).map(sale_view)))))
}

fn units_per_sku<'a>(lines: impl Iterator<Item = (&'a String, u64)>) -> std::collections::BTreeMap<&'a str, u64> {
    let mut units = std::collections::BTreeMap::new();
    for (sku, qty) in lines {
        let u: &mut u64 = units.entry(sku.as_str()).or_default();
        *u = u.saturating_add(qty);
    }
    units
}

/// Drives a waiting sale ([`SaleWait`], the policy the simulator runs too) until its units are
/// here (true: retry the sale) or it gives up. Wakes when a transfer to this device is applied, and
/// at the wait's own deadlines (asking again in between).
async fn wait_for_rights(
    node: &Node,
    mesh: &MeshHandle,
    wait: &mut SaleWait,
    arrived: &mut tokio::sync::watch::Receiver<u64>,
    started: tokio::time::Instant,
) -> bool {
    let sku = wait.sku().expect("a refused sale waits for one SKU").to_string();
    loop {
        let here = node.read(|l| l.state().rights_of(&sku, &l.device()));
        match wait.poll(here, started.elapsed().as_millis() as u64) {
            SaleWaitStep::Retry => return true,
            SaleWaitStep::GiveUp(end) => {
                tracing::debug!(reason = end.label(), sku, "sale gave up waiting for stock rights");
                return false;
            }
            SaleWaitStep::AskAgain { short } => mesh.ask_again(&sku, short),
            SaleWaitStep::Wait => {
                let at_ms = wait.poll_timeout().expect("a waiting sale has a deadline");
                let at = started + Duration::from_millis(at_ms);
                if let Ok(Err(_)) = tokio::time::timeout_at(at, arrived.changed()).await {
                    return false; // the node is shutting down
                }
            }
        }
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct SalesQuery {
    /// Sales listed, newest first (default 1,000).
    #[param(minimum = 0, maximum = 10_000)]
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/api/v1/sales", tag = "sales", params(SalesQuery), responses((status = 200, description = "The sales this node holds with their summary, newest first", body = stallmesh_api::SalesList)))]
pub(super) async fn list_sales(State(node): State<Node>, Query(q): Query<SalesQuery>) -> ApiResult<Json<SalesList>> {
    let limit = super::in_range("limit", q.limit.unwrap_or(DEFAULT_SALES_LISTED), 0, MAX_SALES_LISTED)?;
    Ok(Json(node.read(|l| {
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
    })))
}
