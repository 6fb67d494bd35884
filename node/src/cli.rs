//! The `stallmesh` command line: market and device administration, `up`, and client verbs that talk
//! to a running node over its HTTP API.

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "stallmesh", version, about = "Peer-to-peer point of sale for market stalls")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create and manage a market (the organiser's key).
    #[command(subcommand)]
    Market(MarketCmd),
    /// Enrol or revoke devices (run by the market organiser).
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Run a node: HTTP API, ledger and store. With no credentials, starts a demo market.
    Up(UpArgs),
    /// The cloud ingest service, for head office: run it, register markets, follow a market's log.
    #[command(subcommand)]
    Cloud(CloudCmd),
    /// Staff who may sign in to this tablet's till (needed when it is reachable from the LAN).
    #[command(subcommand)]
    Staff(StaffCmd),
    /// Record a sale on a running node: `stallmesh sell HNY-500:2 JAM-STR`.
    Sell {
        /// SKU[:QTY] for each line (QTY defaults to 1).
        #[arg(required = true)]
        lines: Vec<String>,
        /// Idempotency key: retrying with the same value never records the sale twice.
        #[arg(long)]
        client_ref: Option<String>,
        /// A loyalty card's QR text (or a file holding it): the sale earns points on it.
        #[arg(long)]
        card: Option<String>,
        /// Points of the card to redeem for a discount on this sale.
        #[arg(long, default_value_t = 0, requires = "card")]
        redeem: u64,
        #[command(flatten)]
        node: NodeAddr,
    },
    /// Loyalty cards and vouchers on a running node.
    #[command(subcommand)]
    Loyalty(LoyaltyCmd),
    /// Add stock: gives this device stock rights for QTY units of SKU.
    Restock {
        sku: String,
        qty: u64,
        #[command(flatten)]
        node: NodeAddr,
    },
    /// Give QTY units of this device's stock rights for SKU to another device.
    Transfer {
        sku: String,
        qty: u64,
        /// Device id (64 hex characters) of the recipient.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        node: NodeAddr,
    },
    /// Limited drops: plan one (from an organiser's device), list them, follow one.
    #[command(subcommand)]
    Drop(DropCmd),
    /// Add or change a product in the catalogue.
    Product(ProductArgs),
    /// Show stock per SKU: total, this device's rights, rights per device.
    Stock {
        #[command(flatten)]
        node: NodeAddr,
    },
    /// Show recent sales and the day's totals.
    Sales {
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[command(flatten)]
        node: NodeAddr,
    },
    /// Search the catalogue by meaning and by words: `stallmesh search raw honey`.
    Search {
        #[arg(required = true)]
        words: Vec<String>,
        #[arg(long, default_value_t = 10)]
        k: usize,
        #[command(flatten)]
        node: NodeAddr,
    },
    /// What customers bought with these products: `stallmesh recommend BRD-SOUR DAI-BUTTER`.
    Recommend {
        #[arg(required = true)]
        basket: Vec<String>,
        #[arg(long, default_value_t = 5)]
        k: usize,
        #[command(flatten)]
        node: NodeAddr,
    },
    /// Show the node's identity, market and journal heads.
    Status {
        #[command(flatten)]
        node: NodeAddr,
    },
    /// Simulate a market day from a scenario file, deterministically, and check the invariants.
    Sim(SimArgs),
    /// Hand a revocation (from `stallmesh device revoke`) to a running node, which spreads it.
    Revoke {
        /// Revocation file.
        file: PathBuf,
        #[command(flatten)]
        node: NodeAddr,
    },
}

#[derive(Subcommand, Debug)]
pub enum LoyaltyCmd {
    /// Issue a loyalty card on this device: prints its id and QR text.
    Issue {
        /// The customer's phone wallet public key (64 hex characters); without it, a bearer card.
        #[arg(long)]
        phone_key: Option<String>,
        /// Days until it expires (default: never).
        #[arg(long)]
        days: Option<u32>,
        /// Also write the QR code as an SVG image to this file.
        #[arg(long)]
        svg: Option<PathBuf>,
        #[command(flatten)]
        node: NodeAddr,
    },
    /// A card's balance, where its points are held, and its sales: by id or QR text.
    Card {
        card: String,
        #[command(flatten)]
        node: NodeAddr,
    },
    /// Mint single-use vouchers held by this device ("Free coffee"; --count N for an edition).
    Mint {
        label: String,
        #[arg(long, default_value_t = 0)]
        value_cents: u64,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[command(flatten)]
        node: NodeAddr,
    },
    /// List the market's vouchers and their state.
    Vouchers {
        #[command(flatten)]
        node: NodeAddr,
    },
    /// Redeem a voucher (16 hex characters).
    Redeem {
        voucher: String,
        #[command(flatten)]
        node: NodeAddr,
    },
    /// Points and vouchers spent twice under a partition, with the redemptions that did it.
    Exposures {
        #[command(flatten)]
        node: NodeAddr,
    },
}

#[derive(Subcommand, Debug)]
pub enum StaffCmd {
    /// Add a staff member, or set a new PIN: the PIN is read from standard input (4-12 digits).
    Add {
        name: String,
        /// The node's data directory (where the staff book is kept).
        #[arg(long, env = "STALLMESH_DATA_DIR", default_value = "stallmesh-data")]
        data_dir: PathBuf,
    },
    /// Remove a staff member.
    Remove {
        name: String,
        #[arg(long, env = "STALLMESH_DATA_DIR", default_value = "stallmesh-data")]
        data_dir: PathBuf,
    },
    /// List the staff members.
    List {
        #[arg(long, env = "STALLMESH_DATA_DIR", default_value = "stallmesh-data")]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum MarketCmd {
    /// Create a new market: its key (mode 0600) and public info in DIR.
    Init {
        /// Directory for market.key and market.json. Keep it off the tablets.
        #[arg(long, default_value = "market")]
        dir: PathBuf,
        #[arg(long, default_value = "My Market")]
        name: String,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum RoleArg {
    Seller,
    Organiser,
    /// The market's cloud ingest (register it with `stallmesh cloud market add`).
    Cloud,
    /// An online sales channel: sells and moves stock rights, never edits the catalogue.
    Online,
}

#[derive(Subcommand, Debug)]
pub enum DropCmd {
    /// Plan a drop: `stallmesh drop plan "Summer tote" --sku TOTE --units 200 --in 30m
    /// --share <device>=150 --share <device>=50`. Nothing of the SKU sells before it opens.
    Plan {
        /// What staff and buyers see: "Summer tote, 200 numbered".
        name: String,
        #[arg(long)]
        sku: String,
        /// Units released, all new stock: the shares must add up to it.
        #[arg(long)]
        units: u64,
        /// When it opens, RFC 3339 (`2026-12-05T14:00:00Z`).
        #[arg(long, conflicts_with = "in_", required_unless_present = "in_")]
        at: Option<String>,
        /// When it opens, from now (`30m`, `2h`, `0s` for at once).
        #[arg(long = "in", id = "in_")]
        in_: Option<String>,
        /// DEVICE=UNITS, once per device given units (a tablet's id from `stallmesh status`).
        #[arg(long = "share", required = true)]
        shares: Vec<String>,
        /// Units the online channel sells one buyer.
        #[arg(long)]
        max_per_buyer: Option<u64>,
        #[command(flatten)]
        node: NodeAddr,
    },
    /// Every drop this node knows, latest first: status, units left and sold.
    List {
        #[command(flatten)]
        node: NodeAddr,
    },
    /// One drop, per device: planned, held now, sold.
    Show {
        id: String,
        #[command(flatten)]
        node: NodeAddr,
    },
}

#[derive(Subcommand, Debug)]
pub enum DeviceCmd {
    /// Issue credentials for a new device: key, certificate and market info, written to OUT.
    Enroll {
        /// The market directory created by `stallmesh market init`.
        #[arg(long, default_value = "market")]
        market: PathBuf,
        /// The stall this device sells for.
        #[arg(long)]
        stall: String,
        #[arg(long, value_enum, default_value = "seller")]
        role: RoleArg,
        /// Days the certificate stays valid.
        #[arg(long, default_value_t = 365)]
        valid_days: u64,
        /// Directory to write; start the device with `stallmesh up --credentials OUT`.
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a revocation of DEVICE; hand the file to any node with `stallmesh revoke FILE`.
    Revoke {
        #[arg(long, default_value = "market")]
        market: PathBuf,
        /// Device id (64 hex characters).
        #[arg(long)]
        device: String,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum CloudCmd {
    /// Run the cloud ingest (embedded store by default; `--postgres-url` for PostgreSQL).
    Up(CloudUpArgs),
    /// Register markets with a running cloud.
    #[command(subcommand)]
    Market(CloudMarketCmd),
    /// Print a market's reconciled log as NDJSON, one event per line, from offset AFTER on.
    Tail {
        /// Market id (32 hex characters).
        #[arg(long)]
        market: String,
        /// Print events after this offset (0: from the start).
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Keep waiting for new events.
        #[arg(long)]
        follow: bool,
        #[arg(long, default_value = "http://127.0.0.1:7880", env = "STALLMESH_CLOUD_URL")]
        cloud: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum CloudMarketCmd {
    /// Register a market, given the directory `stallmesh device enroll --role cloud --out DIR` wrote.
    Add(CloudDeviceArgs),
    /// Set up a registered market's online channel, given the directory `stallmesh device enroll
    /// --role online --out DIR` wrote: the cloud then sells that device's share of drops online.
    Online(CloudDeviceArgs),
}

/// A device the cloud runs for a market, handed to the cloud with its admin token.
#[derive(Args, Debug)]
pub struct CloudDeviceArgs {
    /// The device's directory (device.key, certificate.json, market.json).
    pub dir: PathBuf,
    #[arg(long, default_value = "http://127.0.0.1:7880", env = "STALLMESH_CLOUD_URL")]
    pub cloud: String,
    /// The cloud's admin token; default: read from DATA_DIR/admin.token.
    #[arg(long, env = "STALLMESH_CLOUD_SERVICE_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The cloud's data directory, where it wrote admin.token.
    #[arg(long, default_value = "stallmesh-cloud")]
    pub data_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct CloudUpArgs {
    /// TOML config file (the `[cloud_service]` table; defaults in config/stallmesh.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Overrides `cloud_service.listen`, e.g. 127.0.0.1:7880.
    #[arg(long)]
    pub listen: Option<String>,
    /// Overrides `cloud_service.data_dir`.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Overrides `cloud_service.postgres_url`: keep the reconciled log in PostgreSQL.
    #[arg(long)]
    pub postgres_url: Option<String>,
    /// Overrides `cloud_service.nats_url`: publish the log to NATS JetStream.
    #[arg(long)]
    pub nats_url: Option<String>,
}

#[derive(Args, Debug)]
pub struct UpArgs {
    /// TOML config file (defaults are in config/stallmesh.toml, embedded).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Overrides `data_dir`.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Overrides `http_addr`, e.g. 127.0.0.1:7878.
    #[arg(long)]
    pub http_addr: Option<String>,
    /// Overrides `credentials_dir` (written by `stallmesh device enroll`).
    #[arg(long)]
    pub credentials: Option<PathBuf>,
    /// Overrides `cloud.url`: upload the market's changes to this cloud, e.g. http://127.0.0.1:7880.
    #[arg(long)]
    pub cloud_url: Option<String>,
}

#[derive(Args, Debug)]
pub struct SimArgs {
    /// Scenario file (TOML; see simulations/README.md).
    pub scenario: PathBuf,
    /// The seed: the same scenario and seed give the same run, event for event.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// A sweep over seeds A..B (B excluded), e.g. 1..50; lists the failing seeds.
    #[arg(long, value_name = "A..B")]
    pub seeds: Option<String>,
    /// Threads for a sweep or a shrink.
    #[arg(long, default_value_t = std::thread::available_parallelism().map_or(1, |n| n.get()))]
    pub jobs: usize,
    /// Directory for report.json and report.html (and a shrunk scenario).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// On a failing run, cut faults, tablets, customers and time while the same invariant still
    /// fails; write the smallest scenario found as a TOML file and print its replay line.
    #[arg(long, conflicts_with_all = ["seeds", "check_determinism"])]
    pub shrink: bool,
    /// Run twice and report the first event where the traces differ.
    #[arg(long)]
    pub check_determinism: bool,
    /// Write every trace line to this file.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Test only: let DEVICE spend stock rights it does not hold (a deliberately broken build),
    /// to see the checker catch it.
    #[arg(long, hide = true, value_name = "DEVICE")]
    pub broken_allow_overspend: Option<u32>,
}

#[derive(Args, Debug)]
pub struct ProductArgs {
    #[arg(long)]
    sku: String,
    #[arg(long)]
    name: String,
    #[arg(long)]
    price_cents: u64,
    #[arg(long, default_value = "EUR")]
    currency: String,
    #[arg(long)]
    stall: String,
    /// Comma-separated tags.
    #[arg(long, value_delimiter = ',')]
    tags: Vec<String>,
    #[command(flatten)]
    node: NodeAddr,
}

#[derive(Args, Debug)]
pub struct NodeAddr {
    /// Base URL of the node's HTTP API.
    #[arg(long = "node", env = "STALLMESH_NODE", default_value = "http://127.0.0.1:7878")]
    pub url: String,
}

/// Seconds a client verb waits for the node: a local node answers in milliseconds.
const CLIENT_TIMEOUT_SECS: u64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The node answered with an error: shown to a person as sentences, never as JSON.
    #[error("{}", describe_api_error(*status, code, message, details.as_ref()))]
    Api { status: u16, code: String, message: String, details: Option<Value> },
    #[error("cannot reach the node at {url}: {detail} (is `stallmesh up` running?)")]
    Unreachable { url: String, detail: String },
    #[error("{0}")]
    Usage(String),
}

pub struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(base: &str) -> Self {
        let agent = ureq::AgentBuilder::new().timeout(std::time::Duration::from_secs(CLIENT_TIMEOUT_SECS)).build();
        Self { base: base.trim_end_matches('/').to_string(), agent }
    }

    fn handle(&self, result: Result<ureq::Response, ureq::Error>) -> Result<Value, ClientError> {
        match result {
            Ok(resp) => resp.into_json().map_err(|e| ClientError::Unreachable { url: self.base.clone(), detail: e.to_string() }),
            Err(ureq::Error::Status(status, resp)) => {
                let body: Value = resp.into_json().unwrap_or(Value::Null);
                Err(ClientError::Api {
                    status,
                    code: body["error"].as_str().unwrap_or("error").to_string(),
                    message: body["message"].as_str().unwrap_or("").to_string(),
                    details: body.get("details").cloned(),
                })
            }
            Err(e) => Err(ClientError::Unreachable { url: self.base.clone(), detail: e.to_string() }),
        }
    }

    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.handle(self.agent.get(&format!("{}{path}", self.base)).call())
    }

    /// GET with query parameters, encoded by ureq.
    pub fn get_query(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, ClientError> {
        let req = params.iter().fold(self.agent.get(&format!("{}{path}", self.base)), |r, (k, v)| r.query(k, v));
        self.handle(req.call())
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.handle(self.agent.post(&format!("{}{path}", self.base)).send_json(body))
    }

    pub fn put(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.handle(self.agent.put(&format!("{}{path}", self.base)).send_json(body))
    }
}

/// A device id as a person reads it in a sentence: its first 8 hex characters.
fn short_device(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

fn units(n: u64) -> String {
    if n == 1 {
        "1 unit".to_string()
    } else {
        format!("{n} units")
    }
}

/// A JSON value in words: strings bare, lists comma-separated, objects as `key: value` pairs.
fn in_words(v: &Value) -> String {
    match v {
        Value::Null => "none".to_string(),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.is_empty() => "none".to_string(),
        Value::Array(a) => a.iter().map(in_words).collect::<Vec<_>>().join(", "),
        Value::Object(o) => o.iter().map(|(k, v)| format!("{}: {}", k.replace('_', " "), in_words(v))).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

/// A refused sale, restock or transfer for want of stock rights, from the details the node sends.
fn describe_insufficient_rights(d: &Value) -> String {
    let sku = d["sku"].as_str().unwrap_or("this product");
    let requested = d["requested"].as_u64().unwrap_or(0);
    let here = d["held_here"].as_u64().unwrap_or(0);
    let mut elsewhere: Vec<(&str, u64)> =
        d["held_elsewhere"].as_object().into_iter().flatten().filter_map(|(dev, n)| Some((dev.as_str(), n.as_u64()?))).collect();
    elsewhere.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let elsewhere_total = d["held_elsewhere_total"].as_u64().unwrap_or_else(|| elsewhere.iter().map(|(_, n)| n).sum());
    let mut text = format!("Refused: not enough {sku} here — asked {requested}, this tablet holds {here}; ");
    if elsewhere_total == 0 {
        text.push_str("no other tablet holds any.");
        return text;
    }
    let list = elsewhere.iter().map(|(dev, n)| format!("{}: {n}", short_device(dev))).collect::<Vec<_>>().join(", ");
    if elsewhere.len() == 1 {
        text.push_str(&format!("another tablet holds {elsewhere_total} ({list})"));
    } else {
        text.push_str(&format!("other tablets hold {elsewhere_total} ({list})"));
    }
    // Present only when the node runs a mesh: how much of that it cannot reach now. A node with a
    // mesh asks the others for rights when a sale is refused for want of them.
    let reachable: Vec<&str> = d["reachable_devices"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    let away_holders = elsewhere.iter().filter(|(dev, _)| !reachable.contains(dev)).count();
    let tablets_away = if away_holders == 1 { "a tablet" } else { "tablets" };
    match d["held_on_unreachable_devices"].as_u64() {
        Some(0) => {
            let them = if elsewhere.len() == 1 { "it" } else { "them" };
            text.push_str(&format!("; this tablet has asked {them} to pass some over: try again in a moment."));
        }
        Some(n) if n >= elsewhere_total => text.push_str(&format!("; all of it sits on {tablets_away} out of reach.")),
        Some(n) => text.push_str(&format!(
            "; {} {} on {tablets_away} out of reach, and this tablet has asked the ones in reach to pass some over: try again in a moment.",
            units(n),
            if n == 1 { "sits" } else { "sit" },
        )),
        None => text.push('.'),
    }
    text
}

/// What a person reads when the node refuses a request: the node's message and, in words, the details
/// that matter; the error code last, for support and scripts.
pub fn describe_api_error(status: u16, code: &str, message: &str, details: Option<&Value>) -> String {
    if code == "insufficient_stock_rights" {
        if let Some(d) = details {
            return describe_insufficient_rights(d);
        }
    }
    let lead = if status >= 500 { "The node cannot do that now" } else { "Refused" };
    let mut text = if message.is_empty() { format!("{lead}: the node answered HTTP {status}") } else { format!("{lead}: {message}") };
    if !code.is_empty() && code != "error" {
        text.push_str(&format!(" [{code}]"));
    }
    if let Some(d) = details.filter(|d| !d.is_null() && d.as_object().is_none_or(|o| !o.is_empty())) {
        text.push_str(&format!("\n  {}", in_words(d)));
    }
    text
}

/// Parses `SKU[:QTY]`.
pub fn parse_line(text: &str) -> Result<Value, ClientError> {
    let (sku, qty) = match text.rsplit_once(':') {
        Some((sku, q)) => (sku, q.parse::<u64>().map_err(|_| ClientError::Usage(format!("{text:?}: quantity must be a whole number")))?),
        None => (text, 1),
    };
    Ok(json!({ "sku": sku, "qty": qty }))
}

fn euros(cents: u64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

/// A card's QR text as given, or read from a file that holds it (a scanner's output).
fn card_text(card: &str) -> Result<String, ClientError> {
    if card.trim().starts_with("SMC1:") {
        return Ok(card.trim().to_string());
    }
    std::fs::read_to_string(card).map(|t| t.trim().to_string()).map_err(|e| ClientError::Usage(format!("{card:?} is neither a card's QR text nor a readable file: {e}")))
}

/// Percent-encodes a path segment (a card's QR text holds spaces, `/`, `%`, `+`).
fn path_segment(text: &str) -> String {
    text.bytes().map(|b| if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

fn run_loyalty(cmd: LoyaltyCmd) -> Result<(), ClientError> {
    match cmd {
        LoyaltyCmd::Issue { phone_key, days, svg, node } => {
            let c = Client::new(&node.url).post("/api/v1/loyalty/cards", &json!({ "holder_public_key": phone_key, "expires_in_days": days }))?;
            println!("card {}{}", c["id"].as_str().unwrap_or("?"), if c["phone_wallet"] == true { " (phone wallet)" } else { "" });
            println!("{}", c["qr_text"].as_str().unwrap_or(""));
            if let Some(path) = svg {
                std::fs::write(&path, c["qr_svg"].as_str().unwrap_or("")).map_err(|e| ClientError::Usage(format!("{}: {e}", path.display())))?;
                eprintln!("QR code written to {}", path.display());
            }
        }
        LoyaltyCmd::Card { card, node } => {
            let key = if card.trim().starts_with("SMC1:") || card.trim().len() == 16 { card.trim().to_string() } else { card_text(&card)? };
            let c = Client::new(&node.url).get(&format!("/api/v1/loyalty/cards/{}", path_segment(&key)))?;
            println!("card {}: {} points ({} earned, {} redeemed, {} without proof)", c["id"].as_str().unwrap_or("?"), c["balance_points"], c["points_earned"], c["points_redeemed"], c["points_unproven"]);
            for (device, n) in c["held"].as_object().into_iter().flatten() {
                println!("  {n:>8} held by {}", device.chars().take(16).collect::<String>());
            }
            if let Some(e) = c.get("exposure").filter(|e| !e.is_null()) {
                println!("  EXPOSED: {} points spent twice over {} redemptions", e["units"], e["redemptions"]);
            }
        }
        LoyaltyCmd::Mint { label, value_cents, count, node } => {
            let r = Client::new(&node.url).post("/api/v1/loyalty/vouchers", &json!({ "label": label, "value_cents": value_cents, "count": count }))?;
            for v in r["vouchers"].as_array().into_iter().flatten() {
                println!("voucher {}  {}", v["id"].as_str().unwrap_or("?"), v["label"].as_str().unwrap_or(""));
            }
        }
        LoyaltyCmd::Vouchers { node } => {
            let r = Client::new(&node.url).get("/api/v1/loyalty/vouchers")?;
            for v in r["vouchers"].as_array().into_iter().flatten() {
                println!("{}  {:<9} {}", v["id"].as_str().unwrap_or("?"), v["status"].as_str().unwrap_or("?"), v["label"].as_str().unwrap_or(""));
            }
        }
        LoyaltyCmd::Redeem { voucher, node } => {
            let v = Client::new(&node.url).post(&format!("/api/v1/loyalty/vouchers/{}/redeem", path_segment(voucher.trim())), &json!({}))?;
            let proven = v["redemptions"].as_array().and_then(|r| r.last()).is_some_and(|r| r["proven"] == true);
            println!("redeemed {} ({}){}", v["id"].as_str().unwrap_or("?"), v["label"].as_str().unwrap_or(""), if proven { "" } else { " from this tablet's offline budget" });
        }
        LoyaltyCmd::Exposures { node } => {
            let r = Client::new(&node.url).get("/api/v1/loyalty/exposures")?;
            println!("{} points and {} voucher redemptions spent twice", r["points_exposed"], r["vouchers_exposed"]);
            for e in r["exposures"].as_array().into_iter().flatten() {
                println!("  {} {}: {} over {} redemptions", e["asset"].as_str().unwrap_or("?"), e["id"].as_str().unwrap_or("?"), e["units"], e["redemptions"]);
            }
        }
    }
    Ok(())
}

/// When a drop opens, in ms since the epoch, from `--at` (RFC 3339) or `--in` (a duration from now).
fn drop_start_ms(at: Option<&str>, in_: Option<&str>) -> Result<u64, ClientError> {
    let since_epoch = match (at, in_) {
        (Some(at), _) => humantime::parse_rfc3339_weak(at)
            .map_err(|e| ClientError::Usage(format!("--at {at:?}: {e} (write it as 2026-12-05T14:00:00Z)")))?
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| ClientError::Usage(format!("--at {at:?} is before 1970")))?,
        (None, Some(d)) => {
            let d = humantime::parse_duration(d).map_err(|e| ClientError::Usage(format!("--in {d:?}: {e} (write it as 30m or 2h)")))?;
            std::time::SystemTime::now()
                .checked_add(d)
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .ok_or_else(|| ClientError::Usage("--in is too far ahead".into()))?
        }
        (None, None) => return Err(ClientError::Usage("say when the drop opens: --at or --in".into())),
    };
    u64::try_from(since_epoch.as_millis()).map_err(|_| ClientError::Usage("the start is too far ahead".into()))
}

fn print_drop(d: &Value) {
    println!(
        "drop {}  {:?}  {} x {}  {}  sold {}, left {}{}",
        d["id"].as_str().unwrap_or("?"),
        d["name"].as_str().unwrap_or(""),
        d["units"],
        d["sku"].as_str().unwrap_or("?"),
        match d["status"].as_str() {
            Some("scheduled") => format!("opens in {}", humantime::format_duration(std::time::Duration::from_secs(d["opens_in_ms"].as_u64().unwrap_or(0) / 1000))),
            Some(s) => s.to_string(),
            None => "?".into(),
        },
        d["sold"],
        d["left"],
        if d["sold_out_at_ms"].is_u64() { format!(" (sold out at {} ms)", d["sold_out_at_ms"]) } else { String::new() }
    );
}

fn run_drop(cmd: DropCmd) -> Result<(), ClientError> {
    match cmd {
        DropCmd::Plan { name, sku, units, at, in_, shares, max_per_buyer, node } => {
            let start_ms = drop_start_ms(at.as_deref(), in_.as_deref())?;
            let plan = shares
                .iter()
                .map(|s| {
                    let (device, n) = s.split_once('=').ok_or_else(|| ClientError::Usage(format!("--share {s:?}: write DEVICE=UNITS")))?;
                    let n: u64 = n.trim().parse().map_err(|_| ClientError::Usage(format!("--share {s:?}: UNITS must be a whole number")))?;
                    Ok(json!({ "device": device.trim(), "units": n }))
                })
                .collect::<Result<Vec<_>, ClientError>>()?;
            let body = json!({ "name": name, "sku": sku, "units": units, "start_ms": start_ms, "plan": plan, "max_per_buyer": max_per_buyer });
            let d = Client::new(&node.url).post("/api/v1/drops", &body)?;
            print_drop(&d);
        }
        DropCmd::List { node } => {
            let r = Client::new(&node.url).get("/api/v1/drops")?;
            let drops = r["drops"].as_array().cloned().unwrap_or_default();
            if drops.is_empty() {
                println!("no drops");
            }
            drops.iter().for_each(print_drop);
        }
        DropCmd::Show { id, node } => {
            let d = Client::new(&node.url).get(&format!("/api/v1/drops/{}", path_segment(id.trim())))?;
            print_drop(&d);
            println!("  {:<16} {:<10} {:<12} {:>8} {:>8} {:>8}", "device", "role", "stall", "planned", "held", "sold");
            for c in d["channels"].as_array().into_iter().flatten() {
                println!(
                    "  {:<16} {:<10} {:<12} {:>8} {:>8} {:>8}",
                    c["device"].as_str().unwrap_or("?").chars().take(16).collect::<String>(),
                    c["role"].as_str().unwrap_or("?"),
                    c["stall"].as_str().unwrap_or("?"),
                    c["planned"],
                    c["held"],
                    c["sold"]
                );
            }
        }
    }
    Ok(())
}

/// Runs a client verb and prints its result for a person.
pub fn run_client(cmd: Command) -> Result<(), ClientError> {
    match cmd {
        Command::Sell { lines, client_ref, card, redeem, node } => {
            let lines = lines.iter().map(|l| parse_line(l)).collect::<Result<Vec<_>, _>>()?;
            let mut body = json!({ "lines": lines, "client_ref": client_ref });
            if let Some(card) = card {
                body["loyalty"] = json!({ "card": card_text(&card)?, "redeem_points": redeem });
            }
            let sale = Client::new(&node.url).post("/api/v1/sales", &body)?;
            if let Some(l) = sale.get("loyalty").filter(|l| !l.is_null()) {
                println!(
                    "card {}: +{} points, {} redeemed ({} without proof), discount {}",
                    l["card"].as_str().unwrap_or("?"),
                    l["points_earned"],
                    l["points_redeemed"].as_u64().unwrap_or(0).saturating_add(l["points_unproven"].as_u64().unwrap_or(0)),
                    l["points_unproven"],
                    euros(l["discount_cents"].as_u64().unwrap_or(0))
                );
            }
            println!(
                "sale {}  total {} {}",
                sale["id"].as_str().unwrap_or("?"),
                euros(sale["total_cents"].as_u64().unwrap_or(0)),
                sale["currency"].as_str().unwrap_or("")
            );
            for l in sale["lines"].as_array().into_iter().flatten() {
                println!(
                    "  {:>4} x {:<12} @ {}",
                    l["qty"],
                    l["sku"].as_str().unwrap_or("?"),
                    euros(l["price_cents"].as_u64().unwrap_or(0))
                );
            }
        }
        Command::Restock { sku, qty, node } => {
            let r = Client::new(&node.url).post("/api/v1/restocks", &json!({ "sku": sku, "qty": qty }))?;
            println!("restocked {qty} x {sku}; this device now holds {}", r["rights_here"]);
        }
        Command::Drop(cmd) => run_drop(cmd)?,
        Command::Transfer { sku, qty, to, node } => {
            let r = Client::new(&node.url).post("/api/v1/transfers", &json!({ "sku": sku, "qty": qty, "to_device": to }))?;
            println!("gave {qty} x {sku} to {to}; this device now holds {}", r["rights_here"]);
        }
        Command::Product(p) => {
            let client = Client::new(&p.node.url);
            let body = json!({ "sku": p.sku, "name": p.name, "price_cents": p.price_cents, "currency": p.currency, "stall": p.stall, "tags": p.tags });
            let r = match client.post("/api/v1/products", &body) {
                Err(ClientError::Api { code, .. }) if code == "product_exists" => {
                    client.put(&format!("/api/v1/products/{}", p.sku), &body)?
                }
                other => other?,
            };
            println!(
                "product {} = {} at {} {}",
                r["sku"].as_str().unwrap_or("?"),
                r["name"].as_str().unwrap_or("?"),
                euros(r["price_cents"].as_u64().unwrap_or(0)),
                r["currency"].as_str().unwrap_or("")
            );
        }
        Command::Stock { node } => {
            let r = Client::new(&node.url).get("/api/v1/stock")?;
            println!("{:<12} {:>7} {:>12}  name", "sku", "total", "this device");
            for row in r["stock"].as_array().into_iter().flatten() {
                println!(
                    "{:<12} {:>7} {:>12}  {}",
                    row["sku"].as_str().unwrap_or("?"),
                    row["total"].as_u64().unwrap_or(0),
                    row["this_device"].as_u64().unwrap_or(0),
                    row["name"].as_str().unwrap_or("")
                );
            }
        }
        Command::Sales { limit, node } => {
            let r = Client::new(&node.url).get(&format!("/api/v1/sales?limit={limit}"))?;
            let s = &r["summary"];
            println!("{} sales, {} units, average order {}", s["sales"], s["units"], euros(s["average_order_cents"].as_u64().unwrap_or(0)));
            for sale in r["sales"].as_array().into_iter().flatten() {
                println!(
                    "  {:<24} {:>9} {}",
                    sale["id"].as_str().unwrap_or("?"),
                    euros(sale["total_cents"].as_u64().unwrap_or(0)),
                    sale["currency"].as_str().unwrap_or("")
                );
            }
        }
        Command::Search { words, k, node } => {
            let k = k.to_string();
            let r = Client::new(&node.url).get_query("/api/v1/search", &[("q", &words.join(" ")), ("k", &k)])?;
            println!("{} search, {} µs", r["mode"].as_str().unwrap_or("?"), r["took_us"]);
            for h in r["hits"].as_array().into_iter().flatten() {
                println!(
                    "  {:<14} {:>6.3}  {}",
                    h["sku"].as_str().unwrap_or("?"),
                    h["score"].as_f64().unwrap_or(0.0),
                    h["name"].as_str().unwrap_or("")
                );
            }
        }
        Command::Recommend { basket, k, node } => {
            // The CLI is an operator's view: always show what the model would recommend (the record).
            let k = k.to_string();
            let r = Client::new(&node.url).get_query("/api/v1/recommendations", &[("basket", &basket.join(",")), ("k", &k)])?;
            println!("arm {} (the POS page shows recommendations only in the treatment arm)", r["arm"].as_str().unwrap_or("?"));
            for sku in r["record"]["skus"].as_array().into_iter().flatten() {
                println!("  {}", sku.as_str().unwrap_or("?"));
            }
        }
        Command::Status { node } => {
            let r = Client::new(&node.url).get("/api/v1/status")?;
            println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
        }
        Command::Loyalty(cmd) => run_loyalty(cmd)?,
        Command::Revoke { file, node } => {
            let rev = stallmesh_identity::files::read_revocation(&file).map_err(|e| ClientError::Usage(e.to_string()))?;
            let r = Client::new(&node.url).post("/api/v1/revocations", &json!(rev))?;
            println!("revoked {}", r["revoked"].as_str().unwrap_or("?"));
        }
        Command::Market(_) | Command::Device(_) | Command::Up(_) | Command::Sim(_) | Command::Cloud(_) | Command::Staff(_) => unreachable!("not a client verb"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "a1b2c3d4a1b2c3d4a1b2c3d4a1b2c3d4a1b2c3d4a1b2c3d4a1b2c3d4a1b2c3d4";
    const E: &str = "e5f6a7b8e5f6a7b8e5f6a7b8e5f6a7b8e5f6a7b8e5f6a7b8e5f6a7b8e5f6a7b8";

    fn refused(details: Value) -> String {
        let e = ClientError::Api {
            status: 409,
            code: "insufficient_stock_rights".into(),
            message: "not enough stock rights for BEE-CND: asked 99, this device holds 8, other devices hold 3".into(),
            details: Some(details),
        };
        e.to_string()
    }

    #[test]
    fn a_refused_sale_reads_as_sentences_with_the_rights_held_elsewhere() {
        let text = refused(json!({
            "sku": "BEE-CND", "requested": 99, "held_here": 8, "held_elsewhere_total": 3,
            "held_elsewhere": { A: 2, E: 1 }, "held_on_unreachable_devices": 1, "reachable_devices": [A],
        }));
        assert_eq!(
            text,
            "Refused: not enough BEE-CND here — asked 99, this tablet holds 8; other tablets hold 3 (a1b2c3d4: 2, e5f6a7b8: 1); \
             1 unit sits on a tablet out of reach, and this tablet has asked the ones in reach to pass some over: try again in a moment."
        );
    }

    /// `requested` 9, none held here; `elsewhere` as the node sends it, plus the mesh's view if any.
    fn refused_with(elsewhere: Value, total: u64, mesh: Option<(u64, Value)>) -> String {
        let mut d = json!({ "sku": "BEE-CND", "requested": 9, "held_here": 0, "held_elsewhere_total": total, "held_elsewhere": elsewhere });
        if let Some((unreachable, reachable)) = mesh {
            d["held_on_unreachable_devices"] = json!(unreachable);
            d["reachable_devices"] = reachable;
        }
        refused(d)
    }

    #[test]
    fn a_refused_sale_says_when_nothing_else_is_held_or_all_is_out_of_reach() {
        let none = refused_with(json!({}), 0, Some((0, json!([]))));
        assert_eq!(none, "Refused: not enough BEE-CND here — asked 9, this tablet holds 0; no other tablet holds any.");
        let away = refused_with(json!({ E: 4 }), 4, Some((4, json!([]))));
        assert_eq!(
            away,
            "Refused: not enough BEE-CND here — asked 9, this tablet holds 0; another tablet holds 4 (e5f6a7b8: 4); \
             all of it sits on a tablet out of reach."
        );
        let in_reach = refused_with(json!({ E: 4 }), 4, Some((0, json!([E]))));
        assert!(in_reach.ends_with("(e5f6a7b8: 4); this tablet has asked it to pass some over: try again in a moment."), "{in_reach}");
        let both_away = refused_with(json!({ A: 2, E: 1 }), 3, Some((3, json!([]))));
        assert!(both_away.ends_with("(a1b2c3d4: 2, e5f6a7b8: 1); all of it sits on tablets out of reach."), "{both_away}");
        let no_mesh = refused_with(json!({ E: 4 }), 4, None);
        assert!(no_mesh.ends_with("(e5f6a7b8: 4)."), "{no_mesh}");
    }

    #[test]
    fn other_refusals_show_the_message_and_details_in_words_never_json() {
        let e = ClientError::Api { status: 422, code: "unknown_sku".into(), message: "unknown SKU \"NOPE\"".into(), details: None };
        assert_eq!(e.to_string(), "Refused: unknown SKU \"NOPE\" [unknown_sku]");
        let e = ClientError::Api {
            status: 503,
            code: "store_unavailable".into(),
            message: "node stopped accepting writes after a store failure (disk full); restart it".into(),
            details: Some(json!({ "file": "stallmesh-data/stallmesh.redb", "reasons": ["disk full", "io"] })),
        };
        let text = e.to_string();
        assert!(text.starts_with("The node cannot do that now: node stopped accepting writes"), "{text}");
        assert!(text.ends_with("\n  file: stallmesh-data/stallmesh.redb, reasons: disk full, io"), "{text}");
        assert!(!text.contains('{') && !text.contains('"'), "{text}");
        let e = ClientError::Api { status: 413, code: "error".into(), message: String::new(), details: None };
        assert_eq!(e.to_string(), "Refused: the node answered HTTP 413");
    }
}
