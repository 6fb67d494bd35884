//! `GET /api/v1/events`: the live event stream the page follows (server-sent events). Each commit
//! on the node's pipeline becomes one `commit` event saying what changed (and which sales), and
//! every second a `status` event says how many peers are connected and how many of this device's
//! sales no other device holds yet. A page that falls behind the pipeline gets `lagged` and reads
//! everything again. The browser's EventSource reconnects by itself.

use super::{ApiError, ApiResult, AppState};
use crate::pipeline::{Commit, CommitOrigin};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use stallmesh_api::till::{CommitNotice, SaleNotice, StatusNotice};
use stallmesh_ledger::EventBody;
use std::collections::BTreeSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;

/// Pages following the stream at once: every tablet's page and a few phones, with room. Each holds
/// a pipeline subscription; beyond it a page is refused (503) and retries by itself.
pub const MAX_EVENT_STREAMS: usize = 64;
/// How often `status` is sent: the offline banner reacts within this.
pub const STATUS_EVERY_MS: u64 = 1_000;
/// Sales named in one `commit` event: a peer's catch-up batch may hold thousands; the page reads
/// the list again anyway, so the notice names the first ones and says how many kinds changed.
pub const MAX_SALES_PER_NOTICE: usize = 100;
// A local group commit's sales all fit in one notice.
const _: () = assert!(crate::runtime::MAX_GROUP_COMMIT_OPS <= MAX_SALES_PER_NOTICE);

/// What every page's stream shares: the bound on open streams, and the last status notice (one
/// computation per second serves every open page, not one each).
pub struct Hub {
    streams: Arc<tokio::sync::Semaphore>,
    status: std::sync::Mutex<Option<(std::time::Instant, StatusNotice)>>,
}

pub type Streams = Arc<Hub>;

pub fn streams() -> Streams {
    Arc::new(Hub { streams: Arc::new(tokio::sync::Semaphore::new(MAX_EVENT_STREAMS)), status: std::sync::Mutex::new(None) })
}

#[utoipa::path(get, path = "/api/v1/events", tag = "till", responses((status = 200, description = "Server-sent events: `commit` when entries are committed here, `status` every second", content_type = "text/event-stream", body = String), (status = 503, description = "`too_many_streams`", body = stallmesh_api::ErrorBody)))]
pub(super) async fn events(State(app): State<AppState>) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let Ok(permit) = app.streams.streams.clone().try_acquire_owned() else {
        app.node.metrics.event_streams_refused.inc();
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_streams",
            format!("{MAX_EVENT_STREAMS} pages follow this node already"),
        ));
    };
    let (commits, _) = app.node.subscribe();
    let mut ticker = tokio::time::interval(Duration::from_millis(STATUS_EVERY_MS));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    app.node.metrics.event_streams.inc();
    let open = OpenStream { app, commits, ticker, _permit: permit };
    let stream = futures::stream::unfold(open, |mut s| async move {
        let event = tokio::select! {
            r = s.commits.recv() => match r {
                Ok(commit) => commit_event(&commit),
                Err(RecvError::Lagged(missed)) => Event::default().event("lagged").data(missed.to_string()),
                Err(RecvError::Closed) => return None,
            },
            _ = s.ticker.tick() => status_event(&s.app),
        };
        Some((Ok(event), s))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// One page's stream; dropping it (the page went away) frees its place.
struct OpenStream {
    app: AppState,
    commits: tokio::sync::broadcast::Receiver<Arc<Commit>>,
    ticker: tokio::time::Interval,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.app.node.metrics.event_streams.dec();
    }
}

fn kind(body: &EventBody) -> &'static str {
    match body {
        EventBody::Sold { .. } => "sale",
        EventBody::Restocked { .. } | EventBody::Transferred { .. } => "stock",
        EventBody::DropPlanned { .. } => "drop",
        EventBody::ProductUpserted { .. } => "product",
        EventBody::PhotoAttached { .. } => "photo",
        EventBody::LoyaltyTransferred { .. } | EventBody::VoucherMinted { .. } | EventBody::VoucherRedeemed { .. } => "loyalty",
        EventBody::Enrolled { .. } | EventBody::Revoked { .. } | EventBody::CloudHolds { .. } => "mesh",
        EventBody::RecommendationFeedback { .. } => "feedback",
    }
}

pub fn commit_notice(commit: &Commit) -> CommitNotice {
    let kinds: BTreeSet<&str> = commit.entries.iter().map(|e| kind(&e.event.body)).collect();
    let sales = commit
        .entries
        .iter()
        .filter_map(|e| match &e.event.body {
            EventBody::Sold { total_cents, currency, .. } => Some(SaleNotice {
                sale_id: stallmesh_ledger::sale_id(e.change.dot()),
                device: e.change.device.to_hex(),
                total_cents: *total_cents,
                currency: currency.clone(),
                time_ms: e.event.time_ms,
            }),
            _ => None,
        })
        .take(MAX_SALES_PER_NOTICE)
        .collect();
    CommitNotice {
        commit: commit.number,
        origin: match commit.origin {
            CommitOrigin::Local => "local",
            CommitOrigin::Remote => "remote",
        }
        .into(),
        kinds: kinds.into_iter().map(String::from).collect(),
        sales,
    }
}

fn commit_event(commit: &Commit) -> Event {
    Event::default().event("commit").json_data(commit_notice(commit)).expect("a notice serialises")
}

pub fn status_notice(app: &AppState) -> StatusNotice {
    let (peers_connected, shared_with_peers) = match &app.mesh {
        Some(mesh) => {
            let status = mesh.status();
            (status.peers.iter().filter(|p| !p.device.is_empty()).count() as u64, status.own_entries_shared)
        }
        None => (0, 0),
    };
    let (unshared_sales, cloud_offset) = app.node.read(|l| {
        let me = l.device();
        let state = l.state();
        let in_cloud = state.cloud_watermarks.values().filter_map(|w| w.heads.get(&me).copied()).max().unwrap_or(0);
        let shared = shared_with_peers.max(in_cloud);
        // Journal positions from 0: the entry at `seq` is shared once someone holds seq + 1 entries.
        let unshared = state.sales.values().filter(|s| s.device == me && s.seq >= shared).count() as u64;
        (unshared, state.cloud_watermarks.values().map(|w| w.offset).max())
    });
    StatusNotice { peers_connected, unshared_sales, cloud_offset }
}

fn status_event(app: &AppState) -> Event {
    let fresh_for = Duration::from_millis(STATUS_EVERY_MS / 2);
    let cached = app.streams.status.lock().expect("status lock").as_ref().filter(|(at, _)| at.elapsed() < fresh_for).map(|(_, n)| n.clone());
    let notice = cached.unwrap_or_else(|| {
        let n = status_notice(app);
        *app.streams.status.lock().expect("status lock") = Some((std::time::Instant::now(), n.clone()));
        n
    });
    Event::default().event("status").json_data(notice).expect("a notice serialises")
}
