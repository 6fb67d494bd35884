//! The node itself: `/api/v1/status`, `/healthz`, `/metrics`.

use super::search::readiness_name;
use super::AppState;
use crate::recovery::RecoveryCause;
use crate::runtime::{Node, NodeInfo};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use stallmesh_api::{CloudStatus, CloudWatermarkView, Health, IndexView, UplinkView, InferenceHealth, JournalView, ModelView, NodeView, RecoveryView, SetAsideView, Status};
use stallmesh_ledger::LedgerError;

/// A damaged store file moved aside on start, for the operator; `None` when none was.
fn set_aside_view(info: &NodeInfo) -> Option<SetAsideView> {
    info.store_set_aside.as_ref().map(|s| SetAsideView { moved_to: s.moved_to.display().to_string(), reason: s.reason.clone() })
}

/// The state of this device's own journal, for the operator: `ready`, `recovering` (taking it back
/// from peers) or `cloned` (another tablet signs with these credentials).
fn journal_view(node: &Node) -> JournalView {
    if let Some(r) = node.recovery() {
        let cause = match r.cause {
            RecoveryCause::EmptyStore => "empty_store",
            RecoveryCause::StoreSetAside => "store_set_aside",
            RecoveryCause::StaleStore => "stale_store",
            RecoveryCause::Interrupted => "interrupted",
        };
        return JournalView {
            state: "recovering".into(),
            message: Some(r.message.clone()),
            recovery: Some(RecoveryView {
                cause: cause.into(),
                since_ms: r.since_ms,
                holder_heard_ms: r.holder_heard_ms,
                entries_recovered: r.entries_recovered,
                entries_held_by_peers: r.entries_held_by_peers,
                peers_heard: r.peers_heard,
                message: r.message,
            }),
        };
    }
    if node.read(|l| l.is_cloned()) {
        return JournalView { state: "cloned".into(), message: Some(LedgerError::Cloned.to_string()), recovery: None };
    }
    JournalView { state: "ready".into(), message: None, recovery: None }
}

/// What the cloud holds as far as this tablet knows: the newest watermark any cloud device of the
/// market recorded (it arrives through whichever tablet uploads), measured against what is held here.
pub(crate) fn cloud_status(node: &Node, uplink: Option<&crate::uplink::UplinkHandle>) -> CloudStatus {
    let (watermark, sales_not_uploaded, entries_not_uploaded, through_seq) = node.read(|l| {
        let me = l.device();
        let state = l.state();
        let latest = state.cloud_watermarks.iter().max_by_key(|(_, w)| (w.time_ms, w.offset));
        let held_by_cloud = |d: &stallmesh_identity::DeviceId| latest.and_then(|(_, w)| w.heads.get(d).copied()).unwrap_or(0);
        let mine_held = held_by_cloud(&me);
        let sales = state.sales.values().filter(|s| s.device == me && s.seq >= mine_held).count() as u64;
        let entries: u64 = l
            .heads_ref()
            .iter()
            .filter(|(d, _)| !state.cloud_watermarks.contains_key(*d))
            .map(|(d, n)| n.saturating_sub(held_by_cloud(d)))
            .sum();
        let view = latest.map(|(device, w)| CloudWatermarkView {
            cloud_device: device.to_hex(),
            recorded_at_ms: w.time_ms,
            offset: w.offset,
            this_device_through_ms: None,
        });
        (view, sales, entries, mine_held.checked_sub(1))
    });
    // The time of the newest own change the cloud holds, read from the store outside the ledger lock.
    let watermark = watermark.map(|mut w| {
        w.this_device_through_ms = through_seq.and_then(|seq| {
            let me = node.read(|l| l.device());
            let change = node.changes_since(&me, seq, 1).ok()?.into_iter().next()?;
            stallmesh_ledger::decode_change_event(&change).ok().map(|e| e.time_ms)
        });
        w
    });
    node.metrics.cloud_sales_not_uploaded.set(sales_not_uploaded as i64);
    node.metrics.cloud_entries_not_uploaded.set(entries_not_uploaded as i64);
    let uplink = uplink.map(|u| {
        let s = u.snapshot();
        let state = match (s.started, s.failures, s.last_success_ms) {
            (_, 0, Some(_)) => "connected",
            (true, f, _) if f > 0 => "retrying",
            _ => "starting",
        };
        UplinkView {
            url: s.url,
            state: state.into(),
            last_success_ms: s.last_success_ms,
            last_error: s.last_error,
            consecutive_failures: s.failures,
            lacking: s.lacking,
            changes_uploaded: s.changes_uploaded,
            duplicates_reported: s.duplicates,
            refused_by_cloud: s.refused,
        }
    });
    CloudStatus { watermark, sales_not_uploaded, entries_not_uploaded, uplink }
}

#[utoipa::path(get, path = "/api/v1/status", tag = "status", responses((status = 200, description = "This node, its journal and the cloud’s watermark", body = stallmesh_api::Status)))]
pub(super) async fn status(State(app): State<AppState>) -> Json<Status> {
    let node = app.node.clone();
    let cloud = cloud_status(&node, app.uplink.as_ref());
    let info = node.info.clone();
    let journal = journal_view(&node);
    let view = NodeView {
        market_name: info.market_name.clone(),
        market_id: info.market_id.clone(),
        device: info.device.clone(),
        stall: info.stall.clone(),
        role: info.role.as_str().into(),
        demo: info.demo,
        store_path: info.store_path.display().to_string(),
    };
    let unshared_sales = super::events::status_notice(&app).unshared_sales;
    Json(node.read(|l| Status {
        node: view,
        unshared_sales,
        devices: l.state().devices.len(),
        products: l.state().products.len(),
        sales: l.state().sales.len(),
        pending_changes: l.pending_len(),
        heads: l.heads_ref().iter().map(|(d, n)| (d.to_hex(), *n)).collect(),
        journal,
        equivocations: l.evidence().values().map(Vec::len).sum(),
        store_set_aside: set_aside_view(&info),
        cloud,
    }))
}

#[utoipa::path(get, path = "/healthz", tag = "status", responses((status = 200, description = "`ok`", body = stallmesh_api::Health), (status = 503, description = "`failed`, with `reason`", body = stallmesh_api::Health)))]
pub(super) async fn healthz(State(app): State<AppState>) -> (StatusCode, Json<Health>) {
    let (node, i) = (&app.node, &app.inference);
    let index = i.index();
    let inference = InferenceHealth {
        state: readiness_name(i.readiness()).into(),
        models: i
            .statuses()
            .into_iter()
            .map(|m| ModelView {
                name: m.name.into(),
                file: m.file,
                loaded: m.loaded,
                sha256: m.sha256,
                error: m.error,
                load_ms: m.load_ms,
            })
            .collect(),
        index: IndexView { products: index.len(), embedded: index.embedded(), with_photo: index.with_photo() },
    };
    let mut health = Health {
        status: "ok".into(),
        device: node.info.device.clone(),
        demo: node.info.demo,
        reason: None,
        store: None,
        inference: Some(inference),
        store_set_aside: set_aside_view(&node.info),
    };
    match node.failed() {
        None => (StatusCode::OK, Json(health)),
        Some(why) => {
            health.status = "failed".into();
            health.reason = Some(why);
            health.store = Some(node.info.store_path.display().to_string());
            (StatusCode::SERVICE_UNAVAILABLE, Json(health))
        }
    }
}

#[utoipa::path(get, path = "/metrics", tag = "status", responses((status = 200, description = "Prometheus text exposition", content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8", body = String)))]
pub(super) async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
    let node = &app.node;
    // Sets the not-uploaded gauges.
    let _ = cloud_status(node, app.uplink.as_ref());
    let exposed = node.read(|l| super::loyalty::exposure_list(&l.state().loyalty));
    node.metrics.loyalty_exposures.set(exposed.exposures.len() as i64);
    node.metrics.loyalty_points_exposed.set(i64::try_from(exposed.points_exposed).unwrap_or(i64::MAX));
    node.metrics.loyalty_vouchers_exposed.set(i64::try_from(exposed.vouchers_exposed).unwrap_or(i64::MAX));
    if let Some(pool) = app.inference.pool() {
        let st = pool.stats();
        node.metrics.inference_queued.set(st.queued as i64);
        node.metrics.inference_completed.inner().store(st.completed, std::sync::atomic::Ordering::Relaxed);
        node.metrics.inference_rejected.inner().store(st.rejected_queue_full, std::sync::atomic::Ordering::Relaxed);
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], node.metrics.encode())
}
