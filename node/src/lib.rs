//! The stallmesh node: configuration, the runtime around the ledger and store, and the HTTP API.

pub mod cli;
pub mod cloud_cli;
pub use stallmesh_config as config;
pub mod http;
pub mod inference;
pub mod kpi;
pub mod mesh;
pub mod metrics;
pub mod pipeline;
pub mod recovery;
pub mod runtime;
pub mod sim_cli;
pub mod staff;
pub mod uplink;

pub use config::Config;
pub use runtime::{Node, NodeError};

use std::net::SocketAddr;

/// Logs to stderr, as text or JSON lines (`log_format`), filtered by `RUST_LOG` (default `info`).
pub fn init_tracing(format: config::LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        config::LogFormat::Json => builder.json().init(),
        config::LogFormat::Text => builder.init(),
    }
}

/// A node serving its API: the address it bound (useful with port 0) and its server task.
pub struct Running {
    pub node: Node,
    pub addr: SocketAddr,
    pub server: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// How often a node whose store refused a write (a full disk) checks whether the disk takes
/// writes again.
pub const HEAL_INTERVAL_MS: u64 = 1_000;
/// Longest wait between two attempts to open the store again when the disk takes writes but the
/// store still will not open (each attempt holds the node's lock while it reloads the journal).
pub const MAX_HEAL_INTERVAL_MS: u64 = 30_000;
/// Written and synced beside the store before the store is opened again: a disk that cannot take
/// this much cannot take a commit either, and the node's lock is not taken for nothing.
pub const HEAL_PROBE_BYTES: usize = 256 * 1024;
const _: () = assert!(HEAL_INTERVAL_MS <= MAX_HEAL_INTERVAL_MS);

/// Whether the store's filesystem takes (and syncs) `HEAL_PROBE_BYTES` now.
fn disk_takes_writes(store_path: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write;
    let probe = store_path.with_extension("write-probe");
    let result = (|| {
        let mut f = std::fs::File::create(&probe)?;
        f.write_all(&vec![0u8; HEAL_PROBE_BYTES])?;
        f.sync_all()
    })();
    let _ = std::fs::remove_file(&probe);
    result
}

/// How one try to heal the store went.
enum HealAttempt {
    /// Healed, or nothing to heal.
    Done,
    /// The probe write failed: the disk is still full.
    DiskRefuses(std::io::Error),
    /// The disk takes writes; the store did not open again.
    StoreRefuses(NodeError),
}

/// Keeps trying [`Node::heal`] while the node is failed: a tablet whose disk filled up sells again
/// by itself once space is freed, without anyone restarting it.
async fn heal_when_the_store_takes_writes(node: Node) {
    let mut wait_ms = HEAL_INTERVAL_MS;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(wait_ms)).await;
        if node.failed().is_none() {
            wait_ms = HEAL_INTERVAL_MS;
            continue;
        }
        let n = node.clone();
        let attempt = tokio::task::spawn_blocking(move || match disk_takes_writes(&n.info.store_path) {
            Err(e) => HealAttempt::DiskRefuses(e),
            Ok(()) => match n.heal() {
                Ok(_) => HealAttempt::Done,
                Err(e) => HealAttempt::StoreRefuses(e),
            },
        });
        wait_ms = match attempt.await {
            Ok(HealAttempt::Done) => HEAL_INTERVAL_MS,
            // Still full: probing again is cheap (no lock taken).
            Ok(HealAttempt::DiskRefuses(e)) => {
                tracing::debug!(error = %e, "the disk still refuses writes");
                HEAL_INTERVAL_MS
            }
            Ok(HealAttempt::StoreRefuses(e)) => {
                tracing::warn!(error = %e, "the disk takes writes but the store does not open again yet");
                (wait_ms * 2).min(MAX_HEAL_INTERVAL_MS)
            }
            Err(e) => {
                tracing::error!(error = %e, "healing the store panicked");
                MAX_HEAL_INTERVAL_MS
            }
        };
    }
}

/// Opens the node and serves its HTTP API until `shutdown` resolves.
pub async fn start(config: &Config, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Result<Running, StartError> {
    let cfg = config.clone();
    let node =
        tokio::task::spawn_blocking(move || Node::open(&cfg)).await.map_err(|e| StartError::Node(NodeError::Internal(e.to_string())))??;
    let listener =
        tokio::net::TcpListener::bind(config.http_addr).await.map_err(|source| StartError::Bind { addr: config.http_addr, source })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind { addr: config.http_addr, source })?;
    let mesh = if config.mesh.enabled {
        Some(start_mesh(&node, config)?)
    } else {
        tracing::info!("mesh disabled by configuration: this node syncs with no one");
        None
    };
    let inference = inference::start(&node, config);
    tokio::spawn(heal_when_the_store_takes_writes(node.clone()));
    let uplink = if config.cloud.url.is_empty() {
        None
    } else {
        tracing::info!(cloud = %config.cloud.url, "uploading the market's changes to the cloud whenever it is reachable");
        Some(uplink::start(node.clone(), config.cloud.url.clone(), rebalance_policy(config)))
    };
    let loyalty = std::sync::Arc::new(http::loyalty::LoyaltyDesk::new(&config.loyalty));
    let staff = std::sync::Arc::new(http::session::StaffDesk {
        book: staff::StaffBook::in_data_dir(&config.data_dir),
        sessions: staff::Sessions::default(),
        required: config.sign_in_required(),
    });
    if staff.required {
        match staff.book.names() {
            Ok(names) if names.is_empty() => {
                tracing::warn!("sign-in is required and no staff can sign in yet: add them with `stallmesh staff add NAME` on this tablet")
            }
            Ok(names) => tracing::info!(
                staff = names.len(),
                "the page and the API ask for a staff sign-in (http_addr is reachable from the network)"
            ),
            Err(e) => {
                tracing::error!(error = %e, "sign-in is required and the staff book cannot be read: nobody can sign in until it is fixed")
            }
        }
    } else if !config.http_addr.ip().is_loopback() {
        tracing::warn!(addr = %config.http_addr, "staff sign-in is off on an address reachable from the network: anyone on it can sell");
    }
    let app =
        http::service(http::AppState { node: node.clone(), mesh, inference, uplink, loyalty, staff, streams: http::events::streams() });
    let server = tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(shutdown).await });
    tracing::info!(%addr, device = %node.info.device, market = %node.info.market_id, stall = %node.info.stall, "stallmesh node up");
    Ok(Running { node, addr, server })
}

/// The market's rebalancing settings (`[mesh]`), for peers and for the online channel alike.
fn rebalance_policy(config: &Config) -> stallmesh_sync::rebalance::RebalancePolicy {
    stallmesh_sync::rebalance::RebalancePolicy { min_keep: config.mesh.min_keep, low_watermark: config.mesh.low_watermark, refill: config.mesh.refill }
}

fn start_mesh(node: &Node, config: &Config) -> Result<mesh::MeshHandle, StartError> {
    let parse = |a: &String| a.parse::<libp2p::Multiaddr>().map_err(|e| StartError::Mesh(mesh::MeshError::Transport(format!("{a}: {e}"))));
    let mesh_config = mesh::MeshConfig {
        listen: config.mesh.listen.iter().map(parse).collect::<Result<_, _>>()?,
        bootstrap: config.mesh.bootstrap.iter().map(parse).collect::<Result<_, _>>()?,
        mdns: config.mesh.mdns,
        rebalance: rebalance_policy(config),
    };
    let (secret, psk) = node.mesh_secrets();
    let certificate = node.read(|l| l.certificate().clone());
    let (mesh, handle) = mesh::start(node.clone(), mesh_config, secret, psk, certificate)?;
    tracing::info!(peer_id = %mesh.status.lock().expect("status lock").peer_id, mdns = config.mesh.mdns, "mesh started");
    Ok(handle)
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Mesh(#[from] mesh::MeshError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}
