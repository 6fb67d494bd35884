//! The cloud ingest service (`stallmesh cloud up`): tablets upload their market's signed changes,
//! the ingest core (`stallmesh-ingest`) verifies and orders them, and the reconciled log is kept
//! (embedded redb, or PostgreSQL with relational projections), served to consumers and published
//! to NATS JetStream.
//!
//! - `markets.rs` — the driver around the ingest core: per-market lock, store transaction,
//!   catch-up with other processes, commit before answering, watermark ticks.
//! - `service.rs` — the HTTP endpoints.
//! - `store/` — the embedded and PostgreSQL stores behind one `Store`.
//! - `projection.rs` — a log record as consumers read it.
//! - `nats.rs` — the JetStream publisher.
//! - `metrics.rs` — Prometheus counters.

pub mod markets;
pub mod metrics;
pub mod nats;
pub mod projection;
pub mod service;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// The `[cloud_service]` table of the configuration (defined with the rest of it).
pub use stallmesh_config::CloudConfig;

pub const ADMIN_TOKEN_FILE: &str = "admin.token";
pub const EMBEDDED_STORE_FILE: &str = "cloud.redb";

#[derive(Debug, thiserror::Error)]
pub enum CloudStartError {
    #[error("{0}")]
    Store(#[from] store::StoreError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("NATS: {0}")]
    Nats(String),
    #[error("[cloud_service] {0}")]
    Config(String),
}

/// A running cloud: its address and the server's task.
pub struct RunningCloud {
    pub addr: SocketAddr,
    pub markets: Arc<markets::Markets>,
    pub server: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// The admin token: from the configuration, else the one in the data directory (made on first start).
pub fn admin_token(config: &CloudConfig) -> Result<String, CloudStartError> {
    if !config.admin_token.is_empty() {
        return Ok(config.admin_token.clone());
    }
    let path = config.data_dir.join(ADMIN_TOKEN_FILE);
    let io = |source| CloudStartError::Io { path: path.clone(), source };
    match std::fs::read_to_string(&path) {
        Ok(t) => return Ok(t.trim().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let mut secret = [0u8; 32];
    getrandom::getrandom(&mut secret).map_err(|e| io(std::io::Error::other(e.to_string())))?;
    let token = hex::encode(secret);
    std::fs::create_dir_all(&config.data_dir).map_err(io)?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    use std::io::Write;
    let mut f = options.open(&path).map_err(io)?;
    f.write_all(token.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(token)
}

/// Opens the store (running migrations), binds, and serves until `shutdown` resolves.
pub async fn start(
    config: &CloudConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<RunningCloud, CloudStartError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| CloudStartError::Io { path: config.data_dir.clone(), source })?;
    let store = if config.postgres_url.is_empty() {
        store::Store::Embedded(store::embedded::EmbeddedStore::open(&config.data_dir.join(EMBEDDED_STORE_FILE))?)
    } else {
        store::Store::Postgres(store::postgres::PgStore::connect(&config.postgres_url).await?)
    };
    let token = admin_token(config)?;
    let kind = store.kind();
    let markets = Arc::new(markets::Markets::new(store, metrics::CloudMetrics::new(), config.watermark_interval_ms));
    for reg in markets.store.markets().await? {
        tracing::info!(market = %reg.market, name = %reg.name, "serving market");
    }
    let listener =
        tokio::net::TcpListener::bind(config.listen).await.map_err(|source| CloudStartError::Listen { addr: config.listen, source })?;
    let addr = listener.local_addr().map_err(|source| CloudStartError::Listen { addr: config.listen, source })?;
    tracing::info!(%addr, store = kind, "cloud ingest listening");
    // Watermarks are recorded when due, whether or not an upload arrives.
    let ticker = markets.clone();
    tokio::spawn(async move {
        loop {
            let next = ticker.tick().await;
            let wait_ms = next.map_or(WATERMARK_TICK_MAX_MS, |t| t.saturating_sub(markets::now_ms()).clamp(10, WATERMARK_TICK_MAX_MS));
            tokio::time::sleep(std::time::Duration::from_millis(wait_ms)).await;
        }
    });
    if !config.nats_url.is_empty() {
        nats::spawn(config.nats_url.clone(), config.nats_stream.clone(), markets.clone()).await.map_err(CloudStartError::Nats)?;
    }
    if !(stallmesh_shop::MIN_HOLD_TTL_MS..=stallmesh_shop::MAX_HOLD_TTL_MS).contains(&config.hold_ttl_ms) {
        return Err(CloudStartError::Config(format!(
            "hold_ttl_ms = {} is outside {}..={} (10 s to 1 h)",
            config.hold_ttl_ms,
            stallmesh_shop::MIN_HOLD_TTL_MS,
            stallmesh_shop::MAX_HOLD_TTL_MS
        )));
    }
    let app = service::router(service::CloudState { markets: markets.clone(), admin_token: Arc::new(token), hold_ttl_ms: config.hold_ttl_ms });
    let server = tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(shutdown).await });
    Ok(RunningCloud { addr, markets, server })
}

/// Longest sleep of the watermark ticker: a market loaded after it went to sleep is looked at
/// within this.
pub const WATERMARK_TICK_MAX_MS: u64 = 500;
