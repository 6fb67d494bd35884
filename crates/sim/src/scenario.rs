//! Scenario files: what market to simulate, its customers, network and faults. Every key is
//! documented here; the shipped scenarios in `simulations/` use them.

use serde::{Deserialize, Serialize};
use stallmesh_sync::rebalance::RebalancePolicy;

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: {detail}")]
    Invalid { path: String, detail: String },
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    /// Simulated length of the market day, hours.
    pub duration_h: f64,
    /// After the day, faults stop (partitions heal, crashed devices restart) and every replica must
    /// hold the same state within this many simulated seconds.
    #[serde(default = "default_liveness")]
    pub liveness_bound_s: f64,
    pub market: MarketSpec,
    pub customers: CustomerSpec,
    #[serde(default)]
    pub network: NetworkSpec,
    #[serde(default)]
    pub clock: ClockSpec,
    #[serde(default)]
    pub storage: StorageSpec,
    /// Faults at fixed times.
    #[serde(default)]
    pub faults: Vec<FaultSpec>,
    /// Faults drawn at random (rates per device per hour).
    #[serde(default)]
    pub random_faults: RandomFaults,
    /// The market's rebalancing numbers (`min_keep`, `low_watermark`, `refill`), as the node's
    /// `mesh` settings; missing keys keep `RebalancePolicy::default()`.
    #[serde(default)]
    pub rebalance: RebalancePolicy,
    /// Customers with loyalty cards and vouchers; absent, nobody carries one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loyalty: Option<LoyaltySpec>,
    /// A limited drop sold at the stalls and by the market's online channel at once; absent, the
    /// market has no online channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop: Option<DropSpec>,
}

/// A drop: `units` of a new SKU opening at `at_s`, planned between the online channel (run by
/// the cloud, as `stallmesh-cloud` runs it) and the stalls' selling tablets; online buyers
/// placing holds and paying (or abandoning) through the cloud, walk-in buyers at the stalls.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DropSpec {
    /// When the drop opens, seconds into the day (planned before the day, by device 0).
    pub at_s: f64,
    pub units: u64,
    /// Of them, planned to the online channel; the rest evenly to the selling tablets of every
    /// stall (the remainder to the first).
    pub online_units: u64,
    /// The drop's per-buyer limit (0: none).
    pub max_per_buyer: u64,
    /// Online buyers, arriving uniformly over `online_window_s` from the opening.
    pub online_buyers: u32,
    pub online_window_s: f64,
    /// Units an online buyer asks for: uniform in 1..=buyer_units_max.
    pub buyer_units_max: u64,
    /// Of buyers holding units, those who never pay: their holds expire.
    pub abandon_share: f64,
    /// The others pay after an exponential time with this mean (some past their hold's expiry).
    pub checkout_mean_s: f64,
    /// The cloud's hold time (its `cloud_service.hold_ttl_ms`).
    pub hold_ttl_s: f64,
    /// A buyer told "sold out, units may come back" tries again after this (plus up to as much
    /// again at random), until `patience_s` after arriving.
    pub retry_s: f64,
    pub patience_s: f64,
    /// One way between a buyer and the cloud (the buyer's own internet, not the market's 4G).
    pub buyer_latency_ms: f64,
    /// Walk-in buyers of the drop at each stall per minute, for `stall_window_s` from the opening.
    pub stall_buyers_per_min: f64,
    pub stall_window_s: f64,
}

impl Default for DropSpec {
    fn default() -> Self {
        Self {
            at_s: 600.0,
            units: 200,
            online_units: 80,
            max_per_buyer: 2,
            online_buyers: 1_000,
            online_window_s: 60.0,
            buyer_units_max: 2,
            abandon_share: 0.2,
            checkout_mean_s: 40.0,
            hold_ttl_s: 120.0,
            retry_s: 10.0,
            patience_s: 300.0,
            buyer_latency_ms: 40.0,
            stall_buyers_per_min: 4.0,
            stall_window_s: 1_800.0,
        }
    }
}

/// Online buyers in one drop: a crowd, not a way to exhaust memory.
pub const MAX_DROP_BUYERS: u32 = 100_000;

/// Loyalty customers: cards that come back to other stalls, redemptions, voucher drops.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoyaltySpec {
    /// Customers carrying a card.
    pub card_share: f64,
    /// Distinct cards among the customers (each comes back to any stall).
    pub cards: u32,
    /// Of card customers, those who redeem points: what the serving tablet shows as their
    /// balance, up to `max_redeem_points` (a stale balance across a partition spends points twice).
    pub redeem_share: f64,
    pub max_redeem_points: u64,
    /// Customers save up: they redeem only once the balance shown reaches this.
    pub redeem_at_points: u64,
    /// The tablets' offline budget (as the node's `[loyalty]` settings).
    pub offline_points_per_card: u64,
    pub offline_points_per_device: u64,
    pub offline_vouchers_per_device: u64,
    /// Customers who bring a voucher of a drop (any minted so far, so some bring one already used).
    pub voucher_share: f64,
    pub voucher_drops: Vec<VoucherDrop>,
}

impl Default for LoyaltySpec {
    fn default() -> Self {
        Self {
            card_share: 0.4,
            cards: 300,
            redeem_share: 0.3,
            max_redeem_points: 50,
            redeem_at_points: 0,
            offline_points_per_card: 30,
            offline_points_per_device: 300,
            offline_vouchers_per_device: 5,
            voucher_share: 0.0,
            voucher_drops: Vec::new(),
        }
    }
}

/// At `at_s`, tablet `device` mints `count` single-use vouchers.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VoucherDrop {
    pub at_s: f64,
    pub device: u32,
    pub count: u32,
}

/// Vouchers in one drop: a limited edition, not a way to exhaust memory.
pub const MAX_VOUCHERS_PER_DROP: u32 = 10_000;

fn default_liveness() -> f64 {
    60.0
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MarketSpec {
    pub stalls: u32,
    pub devices_per_stall: u32,
    pub products_per_stall: u32,
    /// Units of each product restocked at the start (by the stall's first device, then shared out).
    pub initial_stock: u64,
    /// Devices with a cloud uplink (4G): a fraction of all devices (rounded), from the first.
    /// Each runs the uplink core against the cloud's ingest core; 0 = none ever reaches the cloud.
    #[serde(default = "one")]
    pub uplink_fraction: f64,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerSpec {
    /// Mean customer arrivals per hour at each stall (Poisson).
    pub arrivals_per_stall_per_hour: f64,
    /// Multiplier of the arrival rate for each hour of the day (repeats if shorter than the day).
    #[serde(default)]
    pub hourly_profile: Vec<f64>,
    /// Lines in a basket: uniform in 1..=basket_max.
    #[serde(default = "three")]
    pub basket_max: u32,
    /// Customers are served by the first this many tablets of each stall (the others only hold
    /// stock); 0 = every tablet.
    #[serde(default)]
    pub selling_devices_per_stall: u32,
}

fn three() -> u32 {
    3
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSpec {
    /// One-way latency: base plus an exponential tail with this mean, milliseconds.
    pub latency_ms: f64,
    pub latency_tail_ms: f64,
    /// Probability that a directed message is lost; on an ordered stream a loss resets the stream
    /// (both ends see a disconnect and redial), as a TCP connection reset does.
    pub loss: f64,
    /// Probability that a broadcast is delivered twice (gossip relays along two paths).
    pub duplicate: f64,
    /// Broadcasts are not ordered with a stream: extra random delay up to this, milliseconds.
    pub reorder_ms: f64,
    /// Link bandwidth, kilobits per second (serialization delay).
    pub bandwidth_kbps: f64,
    /// Peers each device keeps connections to (the stall's own devices plus random others);
    /// 0 = every device (full mesh).
    pub peers_per_device: u32,
    pub heartbeat_ms: u64,
    pub liveness_timeout_ms: u64,
    /// Delay before a lost connection is redialled.
    pub redial_ms: u64,
    /// One-way latency of the cloud uplink (each request and each reply), milliseconds, plus the
    /// same tail as the Wi-Fi; `loss` applies too (a lost request or reply is a timeout).
    pub uplink_latency_ms: f64,
}

impl Default for NetworkSpec {
    fn default() -> Self {
        Self {
            latency_ms: 1.0,
            latency_tail_ms: 1.0,
            loss: 0.0,
            duplicate: 0.0,
            reorder_ms: 0.0,
            bandwidth_kbps: 50_000.0,
            peers_per_device: 0,
            heartbeat_ms: 1_000,
            liveness_timeout_ms: 4_000,
            redial_ms: 1_000,
            uplink_latency_ms: 60.0,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClockSpec {
    /// Each device's clock starts off by a uniform offset in ±max_offset_ms.
    pub max_offset_ms: f64,
    /// ... and drifts by a uniform rate in ±max_drift_ppm.
    pub max_drift_ppm: f64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSpec {
    /// Changes received from peers become durable after this group-commit delay; a crash that
    /// loses unsynced data drops those still waiting. Local sales are acknowledged only after
    /// their own commit, so a crash never loses an acknowledged sale.
    pub remote_commit_delay_ms: u64,
}

impl Default for StorageSpec {
    fn default() -> Self {
        Self { remote_commit_delay_ms: 50 }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum FaultSpec {
    /// Split the Wi-Fi: `groups` lists device numbers per side; devices not listed join side 0.
    Partition { at_s: f64, duration_s: f64, groups: Vec<Vec<u32>> },
    /// The tablet walks to `side` of the Wi-Fi split (an index into a partition's `groups`): from
    /// `at_s` until its next move or the end of the day, every partition puts it on that side,
    /// whatever its `groups` say. Its uplink, if it has one, goes with it.
    Move { at_s: f64, device: u32, side: usize },
    /// One-way: messages from `from` devices to `to` devices are lost.
    Asymmetric { at_s: f64, duration_s: f64, from: Vec<u32>, to: Vec<u32> },
    /// Cut one device off the Wi-Fi.
    Isolate { at_s: f64, duration_s: f64, device: u32 },
    /// Every cloud uplink is down: requests and replies are lost, each a timeout for its uplink.
    UplinkOutage { at_s: f64, duration_s: f64 },
    /// The device crashes and restarts after `down_s`; with `lose_unsynced`, changes not yet
    /// durable are lost.
    Crash {
        at_s: f64,
        down_s: f64,
        device: u32,
        #[serde(default)]
        lose_unsynced: bool,
    },
    /// The device's clock jumps by `jump_ms` (negative: backwards).
    ClockJump { at_s: f64, device: u32, jump_ms: i64 },
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RandomFaults {
    pub crashes_per_device_per_hour: f64,
    pub crash_down_s: f64,
    pub crash_loses_unsynced: bool,
    pub isolations_per_device_per_hour: f64,
    pub isolation_s: f64,
    pub clock_jumps_per_device_per_hour: f64,
    pub clock_jump_max_ms: f64,
}

impl Scenario {
    pub fn load(path: &std::path::Path) -> Result<Scenario, ScenarioError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Io { path: p.clone(), source })?;
        Scenario::parse(&text, &p)
    }

    pub fn parse(text: &str, origin: &str) -> Result<Scenario, ScenarioError> {
        let s: Scenario = toml::from_str(text).map_err(|e| ScenarioError::Invalid { path: origin.into(), detail: e.to_string() })?;
        s.validate().map_err(|detail| ScenarioError::Invalid { path: origin.into(), detail })?;
        Ok(s)
    }

    /// Whether the scenario makes sense (devices named exist, fractions are fractions, ...).
    pub fn validate(&self) -> Result<(), String> {
        let devices = self.devices();
        if self.market.stalls == 0 || self.market.devices_per_stall == 0 || self.market.products_per_stall == 0 {
            return Err("market needs at least one stall, device and product".into());
        }
        if devices > MAX_DEVICES {
            return Err(format!("{devices} devices; the simulator handles at most {MAX_DEVICES}"));
        }
        if !(self.duration_h > 0.0 && self.duration_h <= 48.0) {
            return Err("duration_h must be in (0, 48]".into());
        }
        if self.customers.selling_devices_per_stall > self.market.devices_per_stall {
            return Err("customers.selling_devices_per_stall exceeds market.devices_per_stall".into());
        }
        for p in [self.network.loss, self.network.duplicate, self.market.uplink_fraction] {
            if !(0.0..=1.0).contains(&p) {
                return Err("probabilities and fractions must be within [0, 1]".into());
            }
        }
        let check_device = |d: u32| if d < devices { Ok(()) } else { Err(format!("fault names device {d}; there are {devices}")) };
        if let Some(l) = &self.loyalty {
            for p in [l.card_share, l.redeem_share, l.voucher_share] {
                if !(0.0..=1.0).contains(&p) {
                    return Err("loyalty shares must be within [0, 1]".into());
                }
            }
            if l.cards == 0 {
                return Err("loyalty.cards must be at least 1".into());
            }
            for d in &l.voucher_drops {
                check_device(d.device)?;
                if d.count == 0 || d.count > MAX_VOUCHERS_PER_DROP {
                    return Err(format!("a voucher drop mints 1..={MAX_VOUCHERS_PER_DROP} vouchers"));
                }
            }
        }
        if let Some(d) = &self.drop {
            d.validate(self.duration_h * 3600.0)?;
        }
        for f in &self.faults {
            match f {
                FaultSpec::Partition { groups, .. } => groups.iter().flatten().try_for_each(|d| check_device(*d))?,
                FaultSpec::Asymmetric { from, to, .. } => from.iter().chain(to).try_for_each(|d| check_device(*d))?,
                FaultSpec::Isolate { device, .. } | FaultSpec::Crash { device, .. } | FaultSpec::ClockJump { device, .. } => {
                    check_device(*device)?
                }
                FaultSpec::UplinkOutage { .. } => {}
                FaultSpec::Move { device, side, .. } => {
                    check_device(*device)?;
                    let mut sides = self.faults.iter().filter_map(|f| match f {
                        FaultSpec::Partition { groups, .. } => Some(groups.len()),
                        _ => None,
                    });
                    if !sides.any(|n| *side < n) {
                        return Err(format!("move of device {device} to side {side}: no partition has that many sides"));
                    }
                }
            }
        }
        Ok(())
    }

    pub fn devices(&self) -> u32 {
        self.market.stalls * self.market.devices_per_stall
    }
}

impl DropSpec {
    fn validate(&self, day_s: f64) -> Result<(), String> {
        if !(0.0..day_s).contains(&self.at_s) {
            return Err("drop.at_s must be within the day".into());
        }
        if self.units == 0 || self.units > stallmesh_ledger::MAX_QTY || self.online_units > self.units {
            return Err(format!("drop.units must be 1..={} and drop.online_units at most drop.units", stallmesh_ledger::MAX_QTY));
        }
        if self.online_buyers > MAX_DROP_BUYERS {
            return Err(format!("drop.online_buyers: at most {MAX_DROP_BUYERS}"));
        }
        if self.buyer_units_max == 0 || self.buyer_units_max > stallmesh_shop::MAX_HOLD_UNITS {
            return Err(format!("drop.buyer_units_max must be 1..={}", stallmesh_shop::MAX_HOLD_UNITS));
        }
        let ttl_ms = self.hold_ttl_s * 1000.0;
        if !(stallmesh_shop::MIN_HOLD_TTL_MS as f64..=stallmesh_shop::MAX_HOLD_TTL_MS as f64).contains(&ttl_ms) {
            return Err(format!(
                "drop.hold_ttl_s must be {}..={} s, as the cloud allows",
                stallmesh_shop::MIN_HOLD_TTL_MS / 1000,
                stallmesh_shop::MAX_HOLD_TTL_MS / 1000
            ));
        }
        if !(0.0..=1.0).contains(&self.abandon_share) {
            return Err("drop.abandon_share must be within [0, 1]".into());
        }
        let times = [self.online_window_s, self.checkout_mean_s, self.retry_s, self.patience_s, self.buyer_latency_ms, self.stall_window_s];
        if times.iter().any(|t| !(t.is_finite() && *t >= 0.0)) || self.stall_buyers_per_min < 0.0 || !self.stall_buyers_per_min.is_finite() {
            return Err("drop times and rates must be finite and not negative".into());
        }
        if self.retry_s <= 0.0 {
            return Err("drop.retry_s must be positive".into());
        }
        Ok(())
    }
}

/// Devices in one simulation: keeps a mistyped scenario from exhausting memory.
pub const MAX_DEVICES: u32 = 2_000;
