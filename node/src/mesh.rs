//! The libp2p driver around the sans-IO sync core: how a tablet finds its market and stays in it.
//!
//! Transport: TCP → pre-shared-key private network (derived from the market secret, so devices of
//! other markets and strangers cannot complete a handshake) → noise (authenticates the device key:
//! the libp2p identity *is* the device's ed25519 key) → yamux. No QUIC: pnet cannot cover it.
//!
//! What libp2p does not do by itself, and this driver adds:
//! dial on mDNS discovery, redial known peers every second, drop silent peers (the sync core's
//! heartbeat and liveness), and catch-up on every (re)connection (the sync core's heads exchange).
//! A peer takes part only after its enrolment certificate for this market has been verified.

use crate::metrics::{Direction, Metrics, Outcome, Reason};
use crate::pipeline::{Commit, CommitOrigin};
use crate::runtime::{now_ms, Node};
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::core::upgrade::Version;
use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity};
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{identity, mdns, noise, tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm, Transport};
use serde::Serialize;
use stallmesh_identity::{Certificate, DeviceId, SignedChange};
use stallmesh_ledger::{EventBody, LocalOp, LoyaltyAsset};
use stallmesh_sync::rebalance::{recent_sales_since_ms, Ask, RebalancePolicy, Rebalancer};
use stallmesh_sync::{ChangeLog, Heads, Output, Sync as SyncCore, SyncConfig, MAX_MESSAGE_BYTES};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Commands from the HTTP API to the mesh task. Bounded: a full queue is counted, and a waiting
/// sale asks again within its wait.
pub const MESH_COMMAND_QUEUE: usize = 1_024;
/// Evidence passed on in one mesh broadcast: half a sync message (`MAX_MESSAGE_BYTES`), leaving
/// room for its framing.
pub const MAX_EVIDENCE_BROADCAST_BYTES: usize = MAX_MESSAGE_BYTES / 2;
/// How often the driver does its own housekeeping: flushes received changes, cuts revoked and
/// refused peers, steps a recovery, publishes its status. The sync core's timers (heartbeats,
/// liveness) are not on this clock: the core says when it next needs waking (`poll_timeout`).
const HOUSEKEEPING_MS: u64 = 250;
const REDIAL_MS: u64 = 1_000;
/// A dial (TCP connect + pnet + noise + yamux) that takes longer has failed: during a partition a
/// SYN is never answered, and a pending dial blocks the next redial.
const DIAL_TIMEOUT_MS: u64 = 2_000;
/// Peers remembered for redial (and refused peers remembered not to redial): a market has tens;
/// the bound keeps a stranger announcing many peer ids over mDNS from growing memory.
const MAX_KNOWN_PEERS: usize = 1_024;
/// mDNS: a query every 5 s and a 60 s record lifetime let a healed or restarted peer be found again
/// within seconds (measured; the library's defaults, 5 and 6 minutes, leave a tablet alone that long).
const MDNS_QUERY_INTERVAL_MS: u64 = 5_000;
const MDNS_TTL_MS: u64 = 60_000;
/// gossipsub's own mesh maintenance (its default): broadcasts do not wait for it.
const GOSSIP_HEARTBEAT_MS: u64 = 1_000;
/// A sync or hello message not acknowledged by then has failed (the sync core serves it again).
const REQUEST_TIMEOUT_MS: u64 = 10_000;
/// A connection with no stream open is closed after this: the sync heartbeat keeps live peers busy.
const IDLE_CONNECTION_TIMEOUT_MS: u64 = 60_000;
const _: () = assert!(REQUEST_TIMEOUT_MS > DIAL_TIMEOUT_MS && IDLE_CONNECTION_TIMEOUT_MS > REQUEST_TIMEOUT_MS);
/// Addresses remembered per peer (a tablet has one or two interfaces).
const MAX_ADDRS_PER_PEER: usize = 8;

#[derive(Debug, Clone)]
pub struct MeshConfig {
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub mdns: bool,
    pub rebalance: RebalancePolicy,
}

/// From a sale whose customer waits: the mesh's [`Rebalancer`] decides what to ask peers for.
#[derive(Debug)]
pub enum MeshCommand {
    /// An operation was refused for rights; `for_sale`: a customer waits (a sale), else a refill
    /// (a transfer that fell short).
    Refused { sku: String, requested: u64, held_here: u64, held_elsewhere_total: u64, for_sale: bool },
    /// A waiting sale still lacks `short` units (its ask may have been lost).
    AskAgain { sku: String, short: u64 },
    /// A redemption lacks `qty` of a card's points or a voucher: ask the peers.
    LoyaltyWanted { asset: LoyaltyAsset, qty: u64 },
}

/// What the HTTP API holds of a running mesh: its status and a way to ask for stock rights.
#[derive(Clone)]
pub struct MeshHandle {
    commands: mpsc::Sender<MeshCommand>,
    status: Arc<Mutex<MeshStatus>>,
    metrics: Arc<Metrics>,
}

impl MeshHandle {
    /// An operation was refused for rights: peers are asked for what it lacks (and a refill). A
    /// full command queue is counted, never waited on: a waiting sale asks again within its wait.
    pub fn refused(&self, sku: &str, requested: u64, held_here: u64, held_elsewhere_total: u64, for_sale: bool) {
        self.send(MeshCommand::Refused { sku: sku.to_string(), requested, held_here, held_elsewhere_total, for_sale });
    }

    /// A waiting sale still lacks `short` units of `sku`.
    pub fn ask_again(&self, sku: &str, short: u64) {
        self.send(MeshCommand::AskAgain { sku: sku.to_string(), short });
    }

    /// A redemption lacks `qty` of `asset`: peers holding it are asked to transfer it here.
    pub fn want_loyalty(&self, asset: LoyaltyAsset, qty: u64) {
        self.send(MeshCommand::LoyaltyWanted { asset, qty });
    }

    fn send(&self, command: MeshCommand) {
        if self.commands.try_send(command).is_err() {
            self.metrics.mesh_queue_full.inc();
        }
    }

    /// As of the driver's last tick.
    pub fn status(&self) -> MeshStatus {
        self.status.lock().expect("mesh status lock").clone()
    }

    /// Devices with a live sync session now (as of the last tick, at most one tick old).
    pub fn reachable_devices(&self) -> BTreeSet<DeviceId> {
        self.status.lock().expect("mesh status lock").peers.iter().filter_map(|p| DeviceId::from_hex(&p.device).ok()).collect()
    }

    /// Of the units held on other devices, how many sit on devices this one cannot reach now.
    pub fn held_on_unreachable(&self, held_elsewhere: &BTreeMap<DeviceId, u64>) -> u64 {
        let reachable = self.reachable_devices();
        held_elsewhere.iter().filter(|(d, _)| !reachable.contains(d)).map(|(_, n)| *n).sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("mesh transport: {0}")]
    Transport(String),
    #[error("cannot listen on {addr}: {detail}")]
    Listen { addr: Multiaddr, detail: String },
}

/// What `GET /api/v1/mesh` shows.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MeshStatus {
    pub peer_id: String,
    pub listen_addrs: Vec<String>,
    pub peers: Vec<PeerStatus>,
    pub refused: BTreeMap<String, String>,
    pub stats: stallmesh_sync::SyncStats,
    /// The most of this device's journal any verified peer has been seen to hold since the node
    /// started: entries below it are shared (another device has them).
    pub own_entries_shared: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    pub peer_id: String,
    pub device: String,
    pub stall: String,
    pub state: &'static str,
    pub connected_for_ms: u64,
    pub last_heard_ms_ago: u64,
    /// Journal entries this node holds that the peer did not, as of the peer's last heads.
    pub behind: u64,
    /// Journal entries the peer holds that this node does not (yet).
    pub ahead: u64,
    pub session: stallmesh_sync::PeerSession,
}

/// The first exchange on every connection, both ways (request and response).
#[derive(Serialize, serde::Deserialize)]
struct Hello {
    certificate: Certificate,
    /// The sender's newest change of its own journal.
    latest_own: Option<SignedChange>,
}

/// Length-prefixed raw bytes over request-response (sync responses are empty acknowledgements).
#[derive(Clone, Default)]
pub struct BytesCodec;

async fn read_frame<T: futures::AsyncRead + Unpin + Send>(io: &mut T) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE_BYTES {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("frame of {len} bytes over the limit")));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn write_frame<T: futures::AsyncWrite + Unpin + Send>(io: &mut T, bytes: &[u8]) -> std::io::Result<()> {
    io.write_all(&(bytes.len() as u32).to_be_bytes()).await?;
    io.write_all(bytes).await?;
    io.close().await
}

impl request_response::Codec for BytesCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: futures::AsyncRead + Unpin + Send>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<Vec<u8>> {
        read_frame(io).await
    }
    async fn read_response<T: futures::AsyncRead + Unpin + Send>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<Vec<u8>> {
        read_frame(io).await
    }
    async fn write_request<T: futures::AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> std::io::Result<()> {
        write_frame(io, &req).await
    }
    async fn write_response<T: futures::AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> std::io::Result<()> {
        write_frame(io, &res).await
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    gossipsub: gossipsub::Behaviour,
    mdns: libp2p::swarm::behaviour::toggle::Toggle<mdns::tokio::Behaviour>,
    /// First exchange on a connection: each side proves its enrolment.
    hello: request_response::Behaviour<BytesCodec>,
    /// The sync core's directed messages.
    sync: request_response::Behaviour<BytesCodec>,
}

/// The device's libp2p identity: its own ed25519 key, so the peer id names the device.
pub fn keypair(secret: [u8; 32]) -> identity::Keypair {
    let mut s = secret;
    identity::Keypair::ed25519_from_bytes(&mut s).expect("32 bytes is a valid ed25519 secret")
}

/// The device behind a peer id (peer ids of ed25519 keys embed the key).
pub fn device_of(peer: &PeerId) -> Option<DeviceId> {
    let key = identity::PublicKey::try_decode_protobuf(peer.as_ref().digest()).ok()?;
    Some(DeviceId(key.try_into_ed25519().ok()?.to_bytes()))
}

struct StoreLog(Node);

impl ChangeLog for StoreLog {
    fn changes_since(&self, device: &DeviceId, from_seq: u64, limit: usize) -> Result<Vec<SignedChange>, String> {
        self.0.changes_since(device, from_seq, limit).map_err(|e| e.to_string())
    }
}

pub struct Mesh {
    pub status: Arc<Mutex<MeshStatus>>,
    pub task: tokio::task::JoinHandle<()>,
}

fn build_swarm(secret: [u8; 32], psk: [u8; 32], topic: &IdentTopic, mdns_on: bool) -> Result<Swarm<Behaviour>, MeshError> {
    let err = |e: &dyn std::fmt::Display| MeshError::Transport(e.to_string());
    let psk = PreSharedKey::new(psk);
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair(secret))
        .with_tokio()
        .with_other_transport(|key| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
            let noise = noise::Config::new(key)?;
            Ok(tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
                .upgrade(Version::V1Lazy)
                .authenticate(noise)
                .multiplex(yamux::Config::default())
                .timeout(Duration::from_millis(DIAL_TIMEOUT_MS)))
        })
        .map_err(|e| err(&e))?
        .with_behaviour(|key| -> Result<Behaviour, Box<dyn std::error::Error + Send + Sync>> {
            let gossip_config = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_millis(GOSSIP_HEARTBEAT_MS))
                .max_transmit_size(MAX_MESSAGE_BYTES)
                // The same change relayed along two paths is one message.
                .message_id_fn(|m: &gossipsub::Message| {
                    use sha2::Digest;
                    gossipsub::MessageId::from(sha2::Sha256::digest(&m.data).to_vec())
                })
                .build()?;
            let gossipsub = gossipsub::Behaviour::new(MessageAuthenticity::Signed(key.clone()), gossip_config)?;
            let mdns = if mdns_on {
                let cfg = mdns::Config {
                    ttl: Duration::from_millis(MDNS_TTL_MS),
                    query_interval: Duration::from_millis(MDNS_QUERY_INTERVAL_MS),
                    ..Default::default()
                };
                Some(mdns::tokio::Behaviour::new(cfg, key.public().to_peer_id())?)
            } else {
                None
            };
            let rr_config = request_response::Config::default().with_request_timeout(Duration::from_millis(REQUEST_TIMEOUT_MS));
            Ok(Behaviour {
                gossipsub,
                mdns: mdns.into(),
                hello: request_response::Behaviour::new(
                    [(StreamProtocol::new("/stallmesh/hello/2"), ProtocolSupport::Full)],
                    rr_config.clone(),
                ),
                sync: request_response::Behaviour::new([(StreamProtocol::new("/stallmesh/sync/1"), ProtocolSupport::Full)], rr_config),
            })
        })
        .map_err(|e| err(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_millis(IDLE_CONNECTION_TIMEOUT_MS)))
        .build();
    swarm.behaviour_mut().gossipsub.subscribe(topic).map_err(|e| err(&e))?;
    Ok(swarm)
}

/// Starts the mesh for `node`: it follows the node's commit pipeline (broadcasting what this
/// device records) and takes commands from the returned handle.
pub fn start(
    node: Node,
    config: MeshConfig,
    secret: [u8; 32],
    psk: [u8; 32],
    certificate: Certificate,
) -> Result<(Mesh, MeshHandle), MeshError> {
    let topic = IdentTopic::new(format!("stallmesh/{}/changes", node.info.market_id));
    let mut swarm = build_swarm(secret, psk, &topic, config.mdns)?;
    for addr in &config.listen {
        swarm.listen_on(addr.clone()).map_err(|e| MeshError::Listen { addr: addr.clone(), detail: e.to_string() })?;
    }
    let (tx, rx) = mpsc::channel(MESH_COMMAND_QUEUE);
    let status = Arc::new(Mutex::new(MeshStatus { peer_id: swarm.local_peer_id().to_string(), ..Default::default() }));
    // Subscribed before the first tick: whatever is recorded from now on is broadcast; what was
    // recorded before reaches peers by catch-up (heads) as they connect.
    let (commits, _) = node.subscribe();
    let handle = MeshHandle { commands: tx, status: status.clone(), metrics: node.metrics.clone() };
    let driver = Driver {
        node,
        swarm,
        topic,
        sync: SyncCore::new(SyncConfig::default()),
        rebalancer: Rebalancer::new(config.rebalance),
        config,
        certificate,
        verified: BTreeMap::new(),
        refused: BTreeMap::new(),
        known: BTreeMap::new(),
        in_flight: HashMap::new(),
        status: status.clone(),
        last_stats: Default::default(),
    };
    let span = tracing::info_span!("mesh", peer_id = %status.lock().expect("status lock").peer_id);
    let task = tokio::spawn(tracing::Instrument::instrument(driver.run(rx, commits), span));
    Ok((Mesh { status, task }, handle))
}

struct Driver {
    node: Node,
    swarm: Swarm<Behaviour>,
    topic: IdentTopic,
    sync: SyncCore<PeerId>,
    config: MeshConfig,
    certificate: Certificate,
    /// Peers whose enrolment was verified: only these take part in sync.
    verified: BTreeMap<PeerId, Certificate>,
    /// Peers refused (bad enrolment, revoked): never redialled.
    refused: BTreeMap<PeerId, String>,
    /// Addresses learnt from mDNS or connections, for redial.
    known: BTreeMap<PeerId, BTreeSet<Multiaddr>>,
    in_flight: HashMap<request_response::OutboundRequestId, (PeerId, usize)>,
    /// The rebalancing policy and its memory of recent asks (the same code the simulator runs).
    rebalancer: Rebalancer,
    status: Arc<Mutex<MeshStatus>>,
    last_stats: stallmesh_sync::SyncStats,
}

impl Driver {
    fn heads(&self) -> Heads {
        self.node.read(|l| l.heads())
    }

    async fn run(mut self, mut commands: mpsc::Receiver<MeshCommand>, mut commits: tokio::sync::broadcast::Receiver<Arc<Commit>>) {
        let mut housekeeping = tokio::time::interval(Duration::from_millis(HOUSEKEEPING_MS));
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_redial = 0;
        loop {
            // Re-read after every event: whatever the core just did may have moved its deadline.
            let wake_at_ms = self.sync.poll_timeout();
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_event(event),
                command = commands.recv() => match command {
                    Some(MeshCommand::Refused { sku, requested, held_here, held_elsewhere_total, for_sale }) => {
                        let ask = self.rebalancer.after_refusal(&sku, requested, held_here, held_elsewhere_total, for_sale, now_ms());
                        self.ask(ask);
                    }
                    Some(MeshCommand::AskAgain { sku, short }) => {
                        let ask = self.rebalancer.ask_again(&sku, short, now_ms());
                        self.ask(Some(ask));
                    }
                    Some(MeshCommand::LoyaltyWanted { asset, qty }) => {
                        let out = self.sync.want_loyalty(asset, qty, now_ms());
                        self.execute(out);
                    }
                    None => break, // the API is gone
                },
                commit = commits.recv() => match commit {
                    Ok(commit) => self.on_commit(&commit),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                        // Peers pull what was not broadcast by heads on the next heartbeat.
                        tracing::warn!(missed, "mesh fell behind the commit pipeline; peers catch up by heads");
                        self.node.metrics.pipeline_lagged.get_or_create(&crate::metrics::Subscriber { subscriber: "mesh" }).inc_by(missed);
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break, // the node is gone
                },
                _ = sleep_until_ms(wake_at_ms) => {
                    let heads = self.heads();
                    let out = self.sync.tick(now_ms(), &heads);
                    self.execute(out);
                }
                _ = housekeeping.tick() => {
                    let now = now_ms();
                    let heads = self.heads();
                    self.cut_revoked();
                    self.cut_refused();
                    tokio::task::block_in_place(|| self.recovery_step(now)); // may commit the enrolment
                    let node = self.node.clone();
                    if let Err(e) = tokio::task::block_in_place(|| node.flush()) {
                        tracing::error!(error = %e, "cannot make received changes durable");
                    }
                    if now.saturating_sub(last_redial) >= REDIAL_MS {
                        last_redial = now;
                        self.redial();
                    }
                    self.publish_status(now, &heads);
                }
            }
        }
    }

    /// A commit on the node: broadcast what this device recorded, pass evidence on, and ask for a
    /// refill of what a sale here left low.
    fn on_commit(&mut self, commit: &Commit) {
        if commit.origin == CommitOrigin::Local && !commit.entries.is_empty() {
            let out = self.sync.local_changes(commit.entries.iter().map(|e| e.change.clone()).collect());
            self.execute(out);
            self.refill_if_low(&commit.entries);
        }
        // In batches a mesh message can carry: an oversized broadcast would not be published at all.
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        for c in &commit.evidence {
            if !batch.is_empty() && batch_bytes + c.encoded_len() > MAX_EVIDENCE_BROADCAST_BYTES {
                let out = self.sync.local_changes(std::mem::take(&mut batch));
                self.execute(out);
                batch_bytes = 0;
            }
            batch_bytes += c.encoded_len();
            batch.push(c.clone());
        }
        if !batch.is_empty() {
            let out = self.sync.local_changes(batch);
            self.execute(out);
        }
    }

    /// After a sale here, ask peers for more stock rights when this device runs low on a SKU.
    fn refill_if_low(&mut self, entries: &[stallmesh_ledger::Entry]) {
        for e in entries {
            let EventBody::Sold { lines, .. } = &e.event.body else { continue };
            for l in lines {
                let (here, elsewhere) = self.node.read(|led| {
                    let s = led.state().stock(&l.sku);
                    let here = s.per_device.get(&led.device()).copied().unwrap_or(0);
                    (here, s.total - here)
                });
                let ask = self.rebalancer.after_sale(&l.sku, here, elsewhere, now_ms());
                self.ask(ask);
            }
        }
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "mesh listening");
                self.status.lock().expect("status lock").listen_addrs.push(address.to_string());
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                for (peer, addr) in found {
                    if self.refused.contains_key(&peer) {
                        continue;
                    }
                    if !self.known.contains_key(&peer) && self.known.len() >= MAX_KNOWN_PEERS {
                        self.count_refused("known_peers_full");
                        continue;
                    }
                    let addrs = self.known.entry(peer).or_default();
                    if addrs.len() < MAX_ADDRS_PER_PEER {
                        addrs.insert(addr.clone());
                    }
                    self.dial(peer);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Expired(_))) => {}
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, num_established, .. } => {
                if endpoint.is_dialer() && (self.known.contains_key(&peer_id) || self.known.len() < MAX_KNOWN_PEERS) {
                    let addrs = self.known.entry(peer_id).or_default();
                    if addrs.len() < MAX_ADDRS_PER_PEER {
                        addrs.insert(endpoint.get_remote_address().clone());
                    }
                }
                // On every connection, not only a peer's first: two tablets holding one device's
                // credentials share a peer id, and each must hear from us to take part (and be caught).
                tracing::info!(peer = %peer_id, connections = num_established.get(), "connected; proving enrolment");
                let hello = self.hello();
                self.swarm.behaviour_mut().hello.send_request(&peer_id, hello);
            }
            SwarmEvent::ConnectionClosed { peer_id, num_established: 0, cause, .. } => {
                tracing::info!(peer = %peer_id, cause = ?cause, "disconnected");
                self.verified.remove(&peer_id);
                self.sync.disconnected(&peer_id);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Hello(request_response::Event::Message {
                peer,
                message: request_response::Message::Request { request, channel, .. },
                ..
            })) => {
                // The answer carries our certificate too: a request to a peer id goes out on one of
                // its connections, so a second tablet under the same peer id (a clone) would
                // otherwise never hear from us, nor be caught.
                let hello = self.hello();
                let _ = self.swarm.behaviour_mut().hello.send_response(channel, hello);
                self.on_hello(peer, &request);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Hello(request_response::Event::Message {
                peer,
                message: request_response::Message::Response { response, .. },
                ..
            })) if !response.is_empty() => self.on_hello(peer, &response),
            SwarmEvent::Behaviour(BehaviourEvent::Sync(request_response::Event::Message { peer, message, .. })) => match message {
                request_response::Message::Request { request, channel, .. } => {
                    let _ = self.swarm.behaviour_mut().sync.send_response(channel, vec![]);
                    if self.verified.contains_key(&peer) {
                        let heads = self.heads();
                        let log = StoreLog(self.node.clone());
                        let out = self.sync.receive(peer, &request, now_ms(), &heads, &log);
                        self.execute(out);
                    } else {
                        self.count_refused("unverified_message");
                    }
                }
                request_response::Message::Response { request_id, .. } => self.acked(request_id),
            },
            SwarmEvent::Behaviour(BehaviourEvent::Sync(request_response::Event::OutboundFailure { request_id, error, peer, .. })) => {
                tracing::debug!(%peer, %error, "sync message not delivered");
                self.acked(request_id);
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(gossipsub::Event::Message { propagation_source, message, .. })) => {
                if self.verified.contains_key(&propagation_source) {
                    let heads = self.heads();
                    let log = StoreLog(self.node.clone());
                    let out = self.sync.receive(propagation_source, &message.data, now_ms(), &heads, &log);
                    self.execute(out);
                } else {
                    self.count_refused("unverified_message");
                }
            }
            _ => {}
        }
    }

    fn acked(&mut self, id: request_response::OutboundRequestId) {
        if let Some((peer, len)) = self.in_flight.remove(&id) {
            self.sync.acked(&peer, len);
        }
    }

    fn count_refused(&self, reason: &str) {
        self.node.metrics.peers_refused.get_or_create(&Reason { reason: reason.to_string() }).inc();
    }

    /// Our hello: the enrolment certificate, and the newest change of our own journal.
    fn hello(&self) -> Vec<u8> {
        let latest_own = self.node.latest_own_change().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read this device's newest change for the hello");
            None
        });
        postcard::to_allocvec(&Hello { certificate: self.certificate.clone(), latest_own }).expect("hellos serialize")
    }

    /// Verifies a peer's enrolment; only then does sync with it start.
    fn on_hello(&mut self, peer: PeerId, bytes: &[u8]) {
        let now = now_ms();
        let mut latest_own = None;
        let verdict = (|| {
            let hello: Hello = postcard::from_bytes(bytes).map_err(|_| "malformed hello".to_string())?;
            let cert = hello.certificate;
            latest_own = hello.latest_own.filter(|c| c.device == cert.device);
            let device = device_of(&peer).ok_or("peer id is not an ed25519 device key")?;
            if cert.device != device {
                return Err("certificate names another device".to_string());
            }
            cert.verify(&self.node.read(|l| l.market().market_key), now).map_err(|e| e.to_string())?;
            if self.node.read(|l| l.state().devices.get(&device).is_some_and(|d| d.revoked_at_ms.is_some())) {
                return Err("device was revoked".to_string());
            }
            Ok(cert)
        })();
        match verdict {
            Ok(cert) => {
                if let Some(change) = latest_own {
                    // Versions vectors cannot tell two histories of one device apart; its newest
                    // change, checked like any other, can (a clone's shows up as a conflict).
                    let node = self.node.clone();
                    if let Err(e) = tokio::task::block_in_place(|| node.ingest(vec![change])) {
                        tracing::error!(error = %e, "cannot apply a peer's newest change");
                    }
                }
                if self.verified.insert(peer, cert).is_none() {
                    tracing::info!(%peer, "peer enrolment verified; syncing");
                    let heads = self.heads();
                    let out = self.sync.connected(peer, now, &heads);
                    self.execute(out);
                }
            }
            Err(reason) => {
                tracing::warn!(%peer, %reason, "refusing peer");
                self.count_refused(if reason.contains("revoked") { "revoked" } else { "bad_enrolment" });
                if self.refused.len() < MAX_KNOWN_PEERS {
                    self.refused.insert(peer, reason);
                }
                self.known.remove(&peer);
                // Disconnected on the next tick, not now: our own hello must still reach the peer, so
                // that it can judge us too (refusals are visible on both sides).
            }
        }
    }

    /// Tells the node what each verified peer holds of this device's own journal (peers whose
    /// heads have not arrived yet say nothing): how a lost or stale journal is noticed and recovered.
    fn recovery_step(&self, now: u64) {
        let me = self.node.read(|l| l.device());
        let views: Vec<crate::recovery::PeerView> = self
            .sync
            .peers()
            .iter()
            .filter(|(p, s)| self.verified.contains_key(p) && s.their_total > 0)
            .map(|(p, _)| crate::recovery::PeerView { entries_of_this_device: self.sync.peer_holds(p, &me).unwrap_or(0) })
            .collect();
        self.node.recovery_step(now, &views);
    }

    fn cut_revoked(&mut self) {
        let revoked: Vec<PeerId> = self
            .verified
            .keys()
            .filter(|p| {
                device_of(p).is_some_and(|d| self.node.read(|l| l.state().devices.get(&d).is_some_and(|r| r.revoked_at_ms.is_some())))
            })
            .copied()
            .collect();
        for peer in revoked {
            tracing::warn!(%peer, "peer revoked; disconnecting");
            self.verified.remove(&peer);
            self.sync.disconnected(&peer);
            self.refused.insert(peer, "device was revoked".into());
            self.count_refused("revoked");
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    /// Drops connections to refused peers (they never get a sync session in the meantime).
    fn cut_refused(&mut self) {
        let connected: Vec<PeerId> = self.refused.keys().filter(|p| self.swarm.is_connected(p)).copied().collect();
        for peer in connected {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    fn dial(&mut self, peer: PeerId) {
        if peer == *self.swarm.local_peer_id() || self.refused.contains_key(&peer) || self.swarm.is_connected(&peer) {
            return;
        }
        let addrs: Vec<Multiaddr> = self.known.get(&peer).map(|a| a.iter().cloned().collect()).unwrap_or_default();
        let opts = DialOpts::peer_id(peer).condition(PeerCondition::DisconnectedAndNotDialing).addresses(addrs).build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::debug!(%peer, error = %e, "dial not started");
        }
    }

    fn redial(&mut self) {
        let peers: Vec<PeerId> = self.known.keys().copied().collect();
        for p in peers {
            self.dial(p);
        }
        let known_addrs: BTreeSet<Multiaddr> = self.known.values().flatten().cloned().collect();
        for addr in self.config.bootstrap.clone() {
            if !known_addrs.contains(&addr) {
                let _ = self.swarm.dial(DialOpts::unknown_peer_id().address(addr).build());
            }
        }
    }

    /// Carries out the sync core's outputs (and those that follow from them).
    fn execute(&mut self, outputs: Vec<Output<PeerId>>) {
        let mut queue: VecDeque<Output<PeerId>> = outputs.into();
        while let Some(o) = queue.pop_front() {
            match o {
                Output::Send { to, bytes } => {
                    let len = bytes.len();
                    let id = self.swarm.behaviour_mut().sync.send_request(&to, bytes);
                    self.in_flight.insert(id, (to, len));
                }
                Output::Broadcast { bytes } => {
                    if let Err(e) = self.swarm.behaviour_mut().gossipsub.publish(self.topic.clone(), bytes) {
                        // No peers yet is normal for a lone tablet: catch-up carries it later.
                        tracing::debug!(error = %e, "broadcast not published");
                    }
                }
                Output::Apply { from, changes } => {
                    let node = self.node.clone();
                    match tokio::task::block_in_place(|| node.ingest(changes)) {
                        Ok(report) => {
                            if !report.applied.is_empty() {
                                self.node.metrics.sync_lag_ms.observe(lag_ms(&report.applied));
                            }
                            let heads = self.heads();
                            queue.extend(self.sync.applied(&from, report.pending, now_ms(), &heads));
                        }
                        Err(e) => tracing::error!(error = %e, "cannot apply changes from a peer"),
                    }
                }
                Output::Disconnect { peer, reason } => {
                    tracing::info!(%peer, %reason, "dropping peer");
                    self.verified.remove(&peer);
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
                Output::RightsWanted { from, sku, qty, for_sale } => self.give_rights(from, sku, qty, for_sale),
                Output::LoyaltyWanted { from, asset, qty } => self.give_loyalty(from, asset, qty),
            }
        }
    }

    /// Carries out the rebalancer's decision, counting its outcome (rate-limited asks included).
    fn ask(&mut self, ask: Option<Ask>) {
        let Some(ask) = ask else { return };
        self.node.metrics.rights_requests.get_or_create(&Outcome { outcome: ask.outcome() }).inc();
        if let Ask::Send { sku, qty, for_sale } = ask {
            let out = self.sync.want_rights(&sku, qty, for_sale, now_ms());
            self.execute(out);
        }
    }

    /// A peer ran short: give what the policy allows, as a transfer made by this device.
    fn give_rights(&mut self, from: PeerId, sku: String, qty: u64, for_sale: bool) {
        let Some(to) = device_of(&from) else { return };
        let now = now_ms();
        let give = self.node.read(|l| {
            let state = l.state();
            let held = state.rights_of(&sku, &l.device());
            let since = recent_sales_since_ms(now);
            let recent = |d: &DeviceId| state.sales_of_device_since(d, since);
            self.rebalancer.give(held, qty, recent(&l.device()), recent(&to), for_sale)
        });
        if give == 0 {
            return;
        }
        let node = self.node.clone();
        let result = tokio::task::block_in_place(|| node.execute(LocalOp::Transfer { sku: sku.clone(), qty: give, to }));
        match result {
            Ok(_) => tracing::info!(%sku, qty = give, to = %to, for_sale, "gave stock rights to a peer that ran short"),
            Err(e) => tracing::warn!(%sku, error = %e, "could not give stock rights"),
        }
    }

    /// A peer redeems a card's points or a voucher this device holds: transfer what it holds, up
    /// to what was asked (a card's points are worth nothing where they sit).
    fn give_loyalty(&mut self, from: PeerId, asset: LoyaltyAsset, qty: u64) {
        let Some(to) = device_of(&from) else { return };
        let cap = match asset {
            LoyaltyAsset::Points(_) => stallmesh_ledger::validate::MAX_LOYALTY_TRANSFER_POINTS,
            LoyaltyAsset::Voucher(_) => 1,
        };
        let give = self.node.read(|l| l.state().loyalty.rights_of(&asset, &l.device())).min(qty).min(cap);
        if give == 0 {
            return;
        }
        let node = self.node.clone();
        let result = tokio::task::block_in_place(|| node.execute(LocalOp::TransferLoyalty { asset, qty: give, to }));
        let outcome = match &result {
            Ok(_) => "given",
            Err(_) => "failed",
        };
        self.node.metrics.loyalty_gives.get_or_create(&Outcome { outcome }).inc();
        match result {
            Ok(_) => tracing::info!(?asset, qty = give, to = %to, "gave loyalty rights to a peer redeeming them"),
            Err(e) => tracing::warn!(?asset, error = %e, "could not give loyalty rights"),
        }
    }

    fn publish_status(&mut self, now: u64, heads: &Heads) {
        let stats = self.sync.stats().clone();
        let m = &self.node.metrics;
        m.sync_bytes.get_or_create(&Direction { direction: "in" }).inc_by(stats.bytes_in - self.last_stats.bytes_in);
        m.sync_bytes.get_or_create(&Direction { direction: "out" }).inc_by(stats.bytes_out - self.last_stats.bytes_out);
        m.sync_messages.get_or_create(&Direction { direction: "in" }).inc_by(stats.messages_in - self.last_stats.messages_in);
        m.sync_messages.get_or_create(&Direction { direction: "out" }).inc_by(stats.messages_out - self.last_stats.messages_out);
        m.liveness_disconnects.inc_by(stats.liveness_disconnects - self.last_stats.liveness_disconnects);
        m.full_heads_wanted.inc_by(stats.full_heads_wanted - self.last_stats.full_heads_wanted);
        m.unconfirmed_resent.inc_by(stats.unconfirmed_expired - self.last_stats.unconfirmed_expired);
        for (label, n) in &stats.protocol_errors {
            let before = self.last_stats.protocol_errors.get(label).copied().unwrap_or(0);
            m.protocol_errors.get_or_create(&Reason { reason: label.to_string() }).inc_by(n - before);
        }
        m.mesh_peers.set(self.verified.len() as i64);
        let peers = self
            .sync
            .peers()
            .iter()
            .map(|(p, s)| PeerStatus {
                peer_id: p.to_string(),
                device: device_of(p).map(|d| d.to_hex()).unwrap_or_default(),
                stall: self.verified.get(p).map(|c| c.stall.clone()).unwrap_or_default(),
                state: match (self.sync.ahead(p, heads).unwrap_or(0), self.sync.behind(p, heads).unwrap_or(0)) {
                    (0, 0) => "in_sync",
                    (0, _) => "peer_catching_up",
                    _ => "catching_up",
                },
                connected_for_ms: now.saturating_sub(s.connected_at_ms),
                last_heard_ms_ago: now.saturating_sub(s.last_heard_ms),
                behind: self.sync.behind(p, heads).unwrap_or(0),
                ahead: self.sync.ahead(p, heads).unwrap_or(0),
                session: s.clone(),
            })
            .collect();
        let me = self.node.read(|l| l.device());
        let shared = self
            .sync
            .peers()
            .iter()
            .filter(|(p, _)| self.verified.contains_key(p))
            .filter_map(|(p, _)| self.sync.peer_holds(p, &me))
            .max()
            .unwrap_or(0);
        let mut status = self.status.lock().expect("status lock");
        status.own_entries_shared = status.own_entries_shared.max(shared);
        status.peers = peers;
        status.refused = self.refused.iter().map(|(p, r)| (p.to_string(), r.clone())).collect();
        status.stats = stats.clone();
        self.last_stats = stats;
    }
}

/// Sleeps until the wall-clock time `at_ms` (now if it has passed); forever without a deadline.
async fn sleep_until_ms(at_ms: Option<u64>) {
    match at_ms {
        Some(at) => tokio::time::sleep(Duration::from_millis(at.saturating_sub(now_ms()))).await,
        None => std::future::pending().await,
    }
}

/// Milliseconds from the newest applied sale's recording to now (author's clock: advisory).
fn lag_ms(applied: &[stallmesh_ledger::Entry]) -> f64 {
    let now = now_ms();
    applied
        .iter()
        .filter(|e| matches!(e.event.body, EventBody::Sold { .. }))
        .map(|e| now.saturating_sub(e.event.time_ms) as f64)
        .fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_mesh_command_queue_is_counted_and_never_waited_on() {
        let metrics = Arc::new(Metrics::new());
        // A driver that never drains its queue (a swarm task stuck on a slow peer).
        let (commands, _stuck) = mpsc::channel(MESH_COMMAND_QUEUE);
        let mesh = MeshHandle { commands, status: Arc::default(), metrics: metrics.clone() };
        for _ in 0..MESH_COMMAND_QUEUE + 3 {
            mesh.ask_again("JAM", 1); // returns at once, full or not
        }
        assert_eq!(metrics.mesh_queue_full.get(), 3, "each command beyond the queue's limit is counted");
        assert!(metrics.encode().contains("stallmesh_mesh_queue_full_total 3"), "{}", metrics.encode());
    }
}
