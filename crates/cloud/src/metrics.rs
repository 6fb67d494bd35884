//! Prometheus metrics of the cloud service (`GET /metrics`, prefix `stallmesh_cloud_`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MarketLabel {
    pub market: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone)]
pub struct CloudMetrics {
    registry: Arc<Registry>,
    pub accepted: Family<MarketLabel, Counter>,
    pub duplicates: Family<MarketLabel, Counter>,
    /// Changes refused by the ledger's verification, by reason.
    pub rejected: Family<ReasonLabel, Counter>,
    /// Requests refused before any change was looked at (authentication, bad bodies, unknown markets).
    pub requests_refused: Family<ReasonLabel, Counter>,
    pub changes_served: Counter,
    pub offset: Family<MarketLabel, Gauge>,
    pub nats_published: Counter,
    pub nats_failures: Counter,
    /// Idle markets unloaded to make room for another (the store holds everything; reloaded on use).
    pub markets_unloaded: Counter,
    /// Transfers the online channel made to tablets that asked through their uplink.
    pub online_rights_given: Counter,
    /// Transfers tablets made to the online channel after it asked (counted as they are logged).
    pub online_rights_asked: Counter,
    /// Checkout requests refused because the market's queue was full (`MAX_CHECKOUT_QUEUE`).
    pub checkout_busy: Counter,
    /// Checkout batches committed, and the requests they decided (their ratio: the batch size).
    pub checkout_batches: Counter,
    pub checkout_requests: Counter,
}

impl CloudMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("stallmesh_cloud");
        let m = CloudMetrics {
            registry: Arc::new(Registry::default()),
            accepted: Family::default(),
            duplicates: Family::default(),
            rejected: Family::default(),
            requests_refused: Family::default(),
            changes_served: Counter::default(),
            offset: Family::default(),
            nats_published: Counter::default(),
            nats_failures: Counter::default(),
            markets_unloaded: Counter::default(),
            online_rights_given: Counter::default(),
            online_rights_asked: Counter::default(),
            checkout_busy: Counter::default(),
            checkout_batches: Counter::default(),
            checkout_requests: Counter::default(),
        };
        registry.register("changes_accepted", "Changes verified and appended to a market's log", m.accepted.clone());
        registry.register("changes_duplicate", "Uploaded changes the log already held (several tablets upload)", m.duplicates.clone());
        registry.register("changes_rejected", "Uploaded changes the market's ledger refused, by reason", m.rejected.clone());
        registry.register("requests_refused", "Requests refused before ingest, by reason", m.requests_refused.clone());
        registry.register("changes_served", "Changes sent to tablets that lacked them", m.changes_served.clone());
        registry.register("log_offset", "Entries in each market's reconciled log", m.offset.clone());
        registry.register("nats_published", "Log events published to NATS JetStream", m.nats_published.clone());
        registry.register("nats_failures", "Failed attempts to publish to NATS JetStream", m.nats_failures.clone());
        registry.register(
            "markets_unloaded",
            "Idle markets unloaded from memory to make room for another (reloaded from the store on use)",
            m.markets_unloaded.clone(),
        );
        registry.register("online_rights_given", "Transfers of the online channel to tablets that ran short", m.online_rights_given.clone());
        registry.register("online_rights_asked", "Times the online channel, sold out, asked the tablets for units", m.online_rights_asked.clone());
        registry.register("checkout_busy", "Online checkout requests refused: the market's queue was full", m.checkout_busy.clone());
        registry.register("checkout_batches", "Online checkout batches decided and committed in one transaction", m.checkout_batches.clone());
        registry.register("checkout_requests", "Online checkout requests decided in batches", m.checkout_requests.clone());
        CloudMetrics { registry: Arc::new(registry), ..m }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for CloudMetrics {
    fn default() -> Self {
        Self::new()
    }
}
