//! Prometheus metrics a market organiser can scrape from `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Direction {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Origin {
    pub origin: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Subscriber {
    pub subscriber: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub sales: Counter,
    pub refused_operations: Family<Reason, Counter>,
    pub changes_applied: Family<Origin, Counter>,
    pub verification_failures: Family<Reason, Counter>,
    pub duplicate_changes: Counter,
    pub equivocations: Counter,
    pub store_commit_seconds: Histogram,
    /// Local operations made durable by one commit (group commit).
    pub group_commit_ops: Histogram,
    pub journal_entries: Gauge,
    pub pending_changes: Gauge,
    pub mesh_peers: Gauge,
    pub sync_messages: Family<Direction, Counter>,
    pub sync_bytes: Family<Direction, Counter>,
    pub protocol_errors: Family<Reason, Counter>,
    pub peers_refused: Family<Reason, Counter>,
    pub liveness_disconnects: Counter,
    pub full_heads_wanted: Counter,
    pub unconfirmed_resent: Counter,
    pub mesh_queue_full: Counter,
    pub rights_requests: Family<Outcome, Counter>,
    pub sale_rights_waits: Family<Outcome, Counter>,
    pub loyalty_gives: Family<Outcome, Counter>,
    pub loyalty_redemptions: Family<Outcome, Counter>,
    pub staff_sign_ins: Family<Outcome, Counter>,
    pub recommendation_feedback: Family<Reason, Counter>,
    pub event_streams: Gauge,
    pub event_streams_refused: Counter,
    pub loyalty_cards_refused: Family<Reason, Counter>,
    pub loyalty_exposures: Gauge,
    pub loyalty_points_exposed: Gauge,
    pub loyalty_vouchers_exposed: Gauge,
    pub sync_lag_ms: Histogram,
    pub search_requests: Family<Outcome, Counter>,
    pub search_seconds: Histogram,
    pub recommend_seconds: Histogram,
    pub inference_queued: Gauge,
    pub inference_completed: Counter,
    pub inference_rejected: Counter,
    pub pipeline_lagged: Family<Subscriber, Counter>,
    pub index_wait_timeouts: Counter,
    pub uplink_requests: Family<Outcome, Counter>,
    /// Transfers this tablet made to the market's online channel when it sold out.
    pub online_rights_given: Counter,
    /// Asks this tablet sent the online channel for units a till ran short of.
    pub online_rights_asked: Counter,
    pub uplink_changes_uploaded: Counter,
    pub cloud_entries_not_uploaded: Gauge,
    pub cloud_sales_not_uploaded: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("stallmesh");
        let m = Metrics {
            sales: Counter::default(),
            refused_operations: Family::default(),
            changes_applied: Family::default(),
            verification_failures: Family::default(),
            duplicate_changes: Counter::default(),
            equivocations: Counter::default(),
            // 0.1 ms .. ~3 s: an fsync on a tablet's flash can take hundreds of milliseconds.
            store_commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            group_commit_ops: Histogram::new(exponential_buckets(1.0, 2.0, 9)),
            journal_entries: Gauge::default(),
            pending_changes: Gauge::default(),
            mesh_peers: Gauge::default(),
            sync_messages: Family::default(),
            sync_bytes: Family::default(),
            protocol_errors: Family::default(),
            peers_refused: Family::default(),
            liveness_disconnects: Counter::default(),
            full_heads_wanted: Counter::default(),
            unconfirmed_resent: Counter::default(),
            mesh_queue_full: Counter::default(),
            rights_requests: Family::default(),
            sale_rights_waits: Family::default(),
            loyalty_gives: Family::default(),
            loyalty_redemptions: Family::default(),
            staff_sign_ins: Family::default(),
            recommendation_feedback: Family::default(),
            event_streams: Gauge::default(),
            event_streams_refused: Counter::default(),
            loyalty_cards_refused: Family::default(),
            loyalty_exposures: Gauge::default(),
            loyalty_points_exposed: Gauge::default(),
            loyalty_vouchers_exposed: Gauge::default(),
            // 1 ms .. ~65 s: from a sale on one tablet to its arrival here.
            sync_lag_ms: Histogram::new(exponential_buckets(1.0, 2.0, 17)),
            search_requests: Family::default(),
            // 0.1 ms .. ~1.6 s.
            search_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
            recommend_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
            inference_queued: Gauge::default(),
            inference_completed: Counter::default(),
            inference_rejected: Counter::default(),
            pipeline_lagged: Family::default(),
            index_wait_timeouts: Counter::default(),
            uplink_requests: Family::default(),
            online_rights_given: Counter::default(),
            online_rights_asked: Counter::default(),
            uplink_changes_uploaded: Counter::default(),
            cloud_entries_not_uploaded: Gauge::default(),
            cloud_sales_not_uploaded: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("sales", "Sales recorded by this device", m.sales.clone());
        registry.register("refused_operations", "Local operations refused, by reason", m.refused_operations.clone());
        registry.register("changes_applied", "Journal changes applied, by origin", m.changes_applied.clone());
        registry.register(
            "verification_failures",
            "Remote changes rejected before being applied, by reason",
            m.verification_failures.clone(),
        );
        registry.register("duplicate_changes", "Remote changes received that were already held", m.duplicate_changes.clone());
        registry.register(
            "equivocations",
            "Validly signed changes that contradict the journal held at their position (a cloned or reset device), kept as evidence",
            m.equivocations.clone(),
        );
        registry.register("store_commit_seconds", "Durable redb commit latency", m.store_commit_seconds.clone());
        registry.register("group_commit_ops", "Local operations made durable by one commit: concurrent sales share an fsync", m.group_commit_ops.clone());
        registry.register("journal_entries", "Journal entries held in the store", m.journal_entries.clone());
        registry.register("pending_changes", "Remote changes waiting for a predecessor", m.pending_changes.clone());
        registry.register("mesh_peers", "Peers with a verified enrolment, connected now", m.mesh_peers.clone());
        registry.register("sync_messages", "Sync protocol messages, by direction", m.sync_messages.clone());
        registry.register("sync_bytes", "Sync protocol bytes, by direction", m.sync_bytes.clone());
        registry.register("protocol_errors", "Malformed or oversized messages from peers (the peer is dropped)", m.protocol_errors.clone());
        registry.register("peers_refused", "Peers or messages refused: bad enrolment, revoked, unverified", m.peers_refused.clone());
        registry.register("liveness_disconnects", "Peers dropped after falling silent", m.liveness_disconnects.clone());
        registry.register(
            "sync_full_heads_wanted",
            "Peer heads views that did not add up (a lost heads message), repaired with a full heads",
            m.full_heads_wanted.clone(),
        );
        registry.register(
            "sync_unconfirmed_resent",
            "Changes served but not confirmed by the peer within the liveness timeout (served again)",
            m.unconfirmed_resent.clone(),
        );
        registry.register(
            "mesh_queue_full",
            "Stock-rights requests not queued because the mesh command queue was full (a waiting sale asks again)",
            m.mesh_queue_full.clone(),
        );
        registry.register(
            "rights_requests",
            "Stock-rights requests to peers: for_sale (a customer waits), refill, rate_limited (not sent)",
            m.rights_requests.clone(),
        );
        registry.register(
            "sale_rights_waits",
            "Sales that waited for rights a reachable peer held: sold (they arrived in time), refused",
            m.sale_rights_waits.clone(),
        );
        registry.register("loyalty_gives", "Cards' points or vouchers transferred to a peer that was redeeming them: given, failed", m.loyalty_gives.clone());
        registry.register(
            "loyalty_redemptions",
            "Redemptions recorded here: points_proven, points_unproven (offline budget), voucher_proven, voucher_unproven, refused",
            m.loyalty_redemptions.clone(),
        );
        registry.register("staff_sign_ins", "Staff sign-ins: signed_in, refused (wrong PIN), locked (too many wrong PINs)", m.staff_sign_ins.clone());
        registry.register(
            "recommendation_feedback",
            "Recommendations staff dismissed or overrode on this device, by reason (dismiss:not_relevant, override:staff_choice, …)",
            m.recommendation_feedback.clone(),
        );
        registry.register("event_streams", "Pages following the live event stream now", m.event_streams.clone());
        registry.register("event_streams_refused", "Event streams refused: the limit of open streams was reached", m.event_streams_refused.clone());
        registry.register("loyalty_cards_refused", "Loyalty cards refused, by reason (forged_token, expired_token, …)", m.loyalty_cards_refused.clone());
        registry.register(
            "loyalty_exposures",
            "Cards' points or vouchers spent twice (under a partition), as every replica holding the same changes sees them",
            m.loyalty_exposures.clone(),
        );
        registry.register("loyalty_points_exposed", "Points redeemed beyond what their cards earned", m.loyalty_points_exposed.clone());
        registry.register("loyalty_vouchers_exposed", "Voucher redemptions beyond each voucher's one", m.loyalty_vouchers_exposed.clone());
        registry.register("sync_lag_ms", "Time from a sale being recorded elsewhere to its arrival here, ms", m.sync_lag_ms.clone());
        registry.register("search_requests", "Search requests, by mode (hybrid, lexical, image) or refused", m.search_requests.clone());
        registry.register("search_seconds", "Text search latency, query embedding included", m.search_seconds.clone());
        registry.register("recommend_seconds", "Recommendation latency", m.recommend_seconds.clone());
        registry.register("inference_queued", "Inference jobs waiting for a worker", m.inference_queued.clone());
        registry.register(
            "inference_completed",
            "Inference jobs run (queries, product and photo embeddings)",
            m.inference_completed.clone(),
        );
        registry.register(
            "inference_rejected",
            "Inference requests refused because the queue was full (the caller got 503 inference_busy)",
            m.inference_rejected.clone(),
        );
        registry.register(
            "commit_pipeline_lagged",
            "Commits a subscriber missed because it fell behind the pipeline, by subscriber (it resynchronised from the ledger)",
            m.pipeline_lagged.clone(),
        );
        registry.register(
            "index_wait_timeouts",
            "Requests that answered before the search index had taken in what they recorded (it is taken in later)",
            m.index_wait_timeouts.clone(),
        );
        registry.register("uplink_requests", "Requests of this tablet's uplink to the cloud: ok, rejected (some changes refused), failed", m.uplink_requests.clone());
        registry.register("online_rights_given", "Transfers to the market's online channel after it sold out", m.online_rights_given.clone());
        registry.register("online_rights_asked", "Asks to the market's online channel for units a till ran short of", m.online_rights_asked.clone());
        registry.register("uplink_changes_uploaded", "Changes this tablet uploaded to the cloud (any device's)", m.uplink_changes_uploaded.clone());
        registry.register(
            "cloud_entries_not_uploaded",
            "Journal entries held here that the cloud's latest watermark does not cover",
            m.cloud_entries_not_uploaded.clone(),
        );
        registry.register(
            "cloud_sales_not_uploaded",
            "This device's sales that the cloud's latest watermark does not cover",
            m.cloud_sales_not_uploaded.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
