//! The node itself: `/api/v1/status`, `/healthz`, `/metrics`.

use super::search::readiness_name;
use super::AppState;
use crate::recovery::RecoveryCause;
use crate::runtime::{Node, NodeInfo};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use stallmesh_api::{Health, IndexView, InferenceHealth, JournalView, ModelView, NodeView, RecoveryView, SetAsideView, Status};
use stallmesh_identity::Role;
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

pub(super) async fn status(State(node): State<Node>) -> Json<Status> {
    let info = node.info.clone();
    let journal = journal_view(&node);
    let view = NodeView {
        market_name: info.market_name.clone(),
        market_id: info.market_id.clone(),
        device: info.device.clone(),
        stall: info.stall.clone(),
        role: match info.role {
            Role::Seller => "seller",
            Role::Organiser => "organiser",
            Role::Cloud => "cloud",
        }
        .into(),
        demo: info.demo,
        store_path: info.store_path.display().to_string(),
    };
    Json(node.read(|l| Status {
        node: view,
        devices: l.state().devices.len(),
        products: l.state().products.len(),
        sales: l.state().sales.len(),
        pending_changes: l.pending_len(),
        heads: l.heads_ref().iter().map(|(d, n)| (d.to_hex(), *n)).collect(),
        journal,
        equivocations: l.evidence().values().map(Vec::len).sum(),
        store_set_aside: set_aside_view(&info),
    }))
}

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

pub(super) async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
    let node = &app.node;
    if let Some(pool) = app.inference.pool() {
        let st = pool.stats();
        node.metrics.inference_queued.set(st.queued as i64);
        node.metrics.inference_completed.inner().store(st.completed, std::sync::atomic::Ordering::Relaxed);
        node.metrics.inference_rejected.inner().store(st.rejected_queue_full, std::sync::atomic::Ordering::Relaxed);
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], node.metrics.encode())
}
