//! Publishing each market's reconciled log to NATS JetStream: one message per event on
//! `<stream>.events.<market>` (so two streams, say a test's and production's, never overlap), with `Nats-Msg-Id` = market/device/seq so the stream drops a
//! repeat (a restart, or two cloud processes publishing), and `Stallmesh-Offset`, from which a
//! restarted publisher resumes: it reads the last message of the market's subject.

use crate::markets::Markets;
use async_nats::jetstream;
use stallmesh_identity::MarketId;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

/// Events read from the store per round of publishing.
pub const PUBLISH_BATCH: usize = 1_000;
/// JetStream's de-duplication window: longer than any restart or failover of a publisher.
pub const DUPLICATE_WINDOW_S: u64 = 24 * 3600;
/// Pause after a failed publish before trying again (the server may be restarting).
pub const RETRY_MS: u64 = 1_000;
/// How often the publisher looks for newly registered markets.
pub const MARKETS_RESCAN_MS: u64 = 2_000;
pub const OFFSET_HEADER: &str = "Stallmesh-Offset";

pub fn subject(stream: &str, market: &MarketId) -> String {
    format!("{stream}.events.{}", market.to_hex())
}

/// Connects, makes sure the stream exists, and spawns one publisher per market.
pub async fn spawn(url: String, stream: String, markets: Arc<Markets>) -> Result<(), String> {
    let client = async_nats::connect(&url).await.map_err(|e| format!("{url}: {e}"))?;
    let js = jetstream::new(client);
    js.get_or_create_stream(jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("{stream}.events.>")],
        duplicate_window: Duration::from_secs(DUPLICATE_WINDOW_S),
        ..Default::default()
    })
    .await
    .map_err(|e| format!("stream {stream}: {e}"))?;
    tracing::info!(%url, %stream, "publishing the reconciled logs to NATS JetStream");
    tokio::spawn(async move {
        let mut started = BTreeSet::new();
        loop {
            match markets.store.markets().await {
                Ok(regs) => {
                    for reg in regs {
                        if started.insert(reg.market) {
                            tokio::spawn(publish_market(js.clone(), stream.clone(), markets.clone(), reg.market));
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "NATS publisher cannot list markets"),
            }
            tokio::time::sleep(Duration::from_millis(MARKETS_RESCAN_MS)).await;
        }
    });
    Ok(())
}

/// The offset of the last event of `market` the stream holds (0: none).
async fn last_published(js: &jetstream::Context, stream: &str, market: &MarketId) -> Result<u64, String> {
    let s = js.get_stream(stream).await.map_err(|e| e.to_string())?;
    match s.get_last_raw_message_by_subject(&subject(stream, market)).await {
        Ok(m) => {
            let offset = m.headers.get(OFFSET_HEADER).and_then(|v| v.as_str().parse::<u64>().ok());
            offset.ok_or_else(|| format!("the last message on {} has no {OFFSET_HEADER} header", subject(stream, market)))
        }
        Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => Ok(0),
        Err(e) => Err(e.to_string()),
    }
}

async fn publish_market(js: jetstream::Context, stream: String, markets: Arc<Markets>, market: MarketId) {
    let mut offsets = markets.offset_watch(&market);
    let mut after: Option<u64> = None;
    loop {
        let from = match after {
            Some(a) => a,
            None => match last_published(&js, &stream, &market).await {
                Ok(a) => {
                    tracing::info!(%market, after = a, "NATS publisher resumes");
                    after = Some(a);
                    a
                }
                Err(e) => {
                    markets.metrics.nats_failures.inc();
                    tracing::warn!(%market, error = %e, "cannot read the stream's last offset");
                    tokio::time::sleep(Duration::from_millis(RETRY_MS)).await;
                    continue;
                }
            },
        };
        let events = match markets.store.events(&market, from, PUBLISH_BATCH).await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(%market, error = %e, "NATS publisher cannot read the log");
                tokio::time::sleep(Duration::from_millis(RETRY_MS)).await;
                continue;
            }
        };
        if events.is_empty() {
            // Woken by this process's commits; other processes' within the poll interval.
            let _ = tokio::time::timeout(Duration::from_millis(crate::service::EVENTS_POLL_MS), offsets.changed()).await;
            continue;
        }
        let mut acks = Vec::with_capacity(events.len());
        let mut failed = false;
        for e in &events {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", format!("{}/{}/{}", e.market, e.device, e.seq).as_str());
            headers.insert(OFFSET_HEADER, e.offset.to_string().as_str());
            let payload = serde_json::to_vec(e).expect("events serialize");
            match js.publish_with_headers(subject(&stream, &market), headers, payload.into()).await {
                Ok(ack) => acks.push((e.offset, ack)),
                Err(err) => {
                    tracing::warn!(%market, error = %err, "publish failed");
                    failed = true;
                    break;
                }
            }
        }
        // Acknowledged in order: the publisher moves on only past what the stream confirmed.
        for (offset, ack) in acks {
            match ack.await {
                Ok(_) => {
                    markets.metrics.nats_published.inc();
                    after = Some(offset);
                }
                Err(err) => {
                    tracing::warn!(%market, error = %err, "publish not acknowledged");
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            // Resume after the last offset acknowledged in order (not the stream's last message,
            // which may be past one lost in a reconnect): repeats are dropped by the stream's
            // de-duplication on Nats-Msg-Id.
            markets.metrics.nats_failures.inc();
            tokio::time::sleep(Duration::from_millis(RETRY_MS)).await;
        }
    }
}
