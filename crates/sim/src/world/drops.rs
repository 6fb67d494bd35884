//! A drop sold at the stalls and online at once. The market's online channel is a device of role
//! `online` run by the cloud: its own ledger, fed every change the cloud logs, and the checkout
//! decisions of `stallmesh-shop` — holds, payments, what it gives a tablet's uplink that asks,
//! what it asks the tablets for when sold out — exactly as `stallmesh-cloud` drives them, with the
//! holds kept here as the cloud keeps them in its store. Online buyers reach the cloud over their
//! own internet (uplink outages do not stop them); the online channel's sales reach the stalls
//! only through the tablets' uplinks.
//!
//! Invariants, always on: units acknowledged over all channels never exceed the drop's
//! (`drop_never_oversold`, at every sale); holds never reserve more than the online channel
//! holds (`holds_within_online_rights`, after every cloud step); a held hold can always be paid
//! (`a_hold_is_a_promise`); an expired hold reserves nothing from its expiry on
//! (`every_expired_hold_returned`); the online channel's ledger agrees with the market's at the end.

use super::*;
use crate::report::DropReport;
use crate::scenario::DropSpec;
use stallmesh_ingest::wire::OnlineWants;
use stallmesh_shop::{Hold, HoldRequest, HoldsView, OnlineAsks, Paid, Placed, ShopError};

/// Where a drop's units were sold or are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Channel {
    Online,
    Stall(u32),
}

struct Buyer {
    arrived_us: u64,
    qty: u64,
    attempts: u32,
    hold: Option<String>,
    /// When the buyer first held units (the wait ends there).
    held_at_us: Option<u64>,
}

pub(super) struct DropSim {
    pub(super) spec: DropSpec,
    pub(super) sku: String,
    pub(super) id: String,
    opens_us: u64,
    pub(super) key_secret: [u8; 32],
    pub(super) cert: Certificate,
    /// The online channel's ledger, as the cloud runs it.
    pub(super) online: Ledger,
    holds: BTreeMap<String, Hold>,
    asks: OnlineAsks,
    buyers: Vec<Buyer>,
    rng: ChaCha8Rng,
    /// Units acknowledged over all channels.
    sold: u64,
    violations: Vec<Violation>,
    pub(super) report: DropReport,
}

/// Violations of the drop's invariants recorded during the run (the first ones explain the rest).
const MAX_DROP_VIOLATIONS: usize = 5;
/// The drop's SKU: a product of stall 0, sold at every stall.
pub(super) const DROP_SKU: &str = "DROP-1";

impl DropSim {
    pub(super) fn new(spec: DropSpec, seed: u64, ctx: &MarketContext, key_secret: [u8; 32], cert: Certificate) -> Self {
        let online = Ledger::new(ctx.clone(), DeviceKey::from_secret(key_secret), cert.clone());
        let opens_us = (spec.at_s * US_PER_S as f64) as u64;
        DropSim {
            report: DropReport { units: spec.units, online_buyers: spec.online_buyers as u64, ..DropReport::default() },
            spec,
            sku: DROP_SKU.to_string(),
            id: String::new(),
            opens_us,
            key_secret,
            cert,
            online,
            holds: BTreeMap::new(),
            asks: OnlineAsks::default(),
            buyers: Vec::new(),
            rng: ChaCha8Rng::seed_from_u64(mix(seed, "drop", 0)),
            sold: 0,
            violations: Vec::new(),
        }
    }

    fn ttl_ms(&self) -> u64 {
        (self.spec.hold_ttl_s * 1000.0) as u64
    }

    fn latency_us(&self) -> u64 {
        (self.spec.buyer_latency_ms * US_PER_MS as f64) as u64
    }
}

impl World {
    /// Before the day: the online channel enrols with the tablets.
    pub(super) fn enrol_online(&mut self, shared: &mut Vec<Entry>) {
        let now = self.cloud_now_ms();
        let Some(d) = self.drop.as_mut() else { return };
        shared.push(d.online.enrol_self(now).expect("valid certificate").expect("first enrolment"));
    }

    /// Before the day: device 0 (an organiser) adds the drop's product and plans the drop, the
    /// online channel's share first, the rest evenly over every stall's selling tablets.
    pub(super) fn plan_drop(&mut self, shared: &mut Vec<Entry>) {
        let Some(d) = self.drop.as_ref() else { return };
        let spec = d.spec.clone();
        let sellers: Vec<DeviceId> = (0..self.sc.market.stalls).flat_map(|s| self.sellers(s)).map(|x| self.devices[x as usize].id).collect();
        let online_id = d.online.device();
        let at_stalls = spec.units - spec.online_units;
        let each = at_stalls / sellers.len() as u64;
        let mut plan: Vec<(DeviceId, u64)> = sellers.iter().map(|id| (*id, each)).collect();
        plan[0].1 += at_stalls - each * sellers.len() as u64;
        if spec.online_units > 0 {
            plan.push((online_id, spec.online_units));
        }
        plan.retain(|(_, n)| *n > 0);
        let dev0 = &self.devices[0];
        let mut ledger = Ledger::restore(self.ctx.clone(), DeviceKey::from_secret(dev0.key_secret), dev0.cert.clone(), shared.iter().cloned())
            .expect("setup entries restore");
        let now = self.dev_now_ms(0);
        let product = Product {
            sku: DROP_SKU.into(),
            name: "Limited drop".into(),
            price_cents: 4_500,
            currency: "EUR".into(),
            stall: "Stall 0".into(),
            tags: vec![],
        };
        shared.push(ledger.record(LocalOp::UpsertProduct(product), now).expect("valid product"));
        let start_ms = DEVICE_EPOCH_MS + (spec.at_s * 1000.0) as u64;
        let max_per_buyer = (spec.max_per_buyer > 0).then_some(spec.max_per_buyer);
        let op = LocalOp::PlanDrop { name: "Saturday drop".into(), sku: DROP_SKU.into(), units: spec.units, start_ms, plan, max_per_buyer };
        let planned = ledger.record(op, now).expect("a valid drop plan");
        let id = sale_id(planned.change.dot());
        shared.push(planned);
        *self.restocked.entry(DROP_SKU.to_string()).or_default() += spec.units;
        let d = self.drop.as_mut().expect("checked above");
        d.id = id;
        d.report.planned_online = spec.online_units;
    }

    /// Before the day, once every opening entry is made: the online channel's ledger holds them
    /// (the cloud restores it from its log), and the day's buyers are drawn.
    pub(super) fn start_drop(&mut self, shared: &[Entry]) {
        let opens = match self.drop.as_mut() {
            Some(d) => {
                let key = DeviceKey::from_secret(d.key_secret);
                d.online = Ledger::restore(self.ctx.clone(), key, d.cert.clone(), shared.iter().cloned()).expect("setup entries restore");
                d.opens_us
            }
            None => return,
        };
        let d = self.drop.as_mut().expect("checked above");
        let window_us = (d.spec.online_window_s * US_PER_S as f64) as u64;
        let latency = d.latency_us();
        let mut arrivals = Vec::with_capacity(d.spec.online_buyers as usize);
        for _ in 0..d.spec.online_buyers {
            let arrived_us = opens + d.rng.gen_range(0..=window_us);
            let qty = d.rng.gen_range(1..=d.spec.buyer_units_max);
            d.buyers.push(Buyer { arrived_us, qty, attempts: 0, hold: None, held_at_us: None });
            arrivals.push(arrived_us + latency);
        }
        let walk_ins = d.spec.stall_buyers_per_min > 0.0;
        for (b, at) in arrivals.into_iter().enumerate() {
            self.push(at, Ev::DropBuyer { buyer: b as u32 });
        }
        if walk_ins {
            for s in 0..self.sc.market.stalls {
                let at = self.next_walk_in(opens);
                self.push(at, Ev::DropWalkIn { stall: s });
            }
        }
    }

    fn next_walk_in(&mut self, now: u64) -> u64 {
        let d = self.drop.as_mut().expect("a drop");
        let rate_per_us = d.spec.stall_buyers_per_min / (60.0 * US_PER_S as f64);
        now + Exp::new(rate_per_us).expect("positive rate").sample(&mut d.rng) as u64 + 1
    }

    pub(super) fn online_index(&self) -> u32 {
        self.n()
    }

    fn drop_violation(&mut self, invariant: &'static str, detail: String) {
        self.trace_cloud(format!("VIOLATION {invariant}: {detail}"));
        let timeline = self.cloud.timeline.iter().cloned().collect();
        let Some(d) = self.drop.as_mut() else { return };
        // The first of each invariant explains the rest.
        if d.violations.len() < MAX_DROP_VIOLATIONS && !d.violations.iter().any(|v| v.invariant == invariant) {
            d.violations.push(Violation { invariant, detail, device: None, timeline });
        }
    }

    /// The holds the cloud's store would give a decision on the drop's SKU (for `buyer`).
    fn holds_view(&self, buyer: &str, now_ms: u64) -> HoldsView {
        let d = self.drop.as_ref().expect("a drop");
        HoldsView::of(d.holds.values(), &d.sku, &d.id, buyer, now_ms)
    }

    /// The holds a decision reads from the cloud's store: with `BrokenCloud::HoldsReadAsNone`,
    /// none (a lost index), so buyers' holds overlap.
    fn store_holds_view(&self, buyer: &str, now_ms: u64) -> HoldsView {
        if self.opts.broken_cloud == Some(BrokenCloud::HoldsReadAsNone) {
            return HoldsView::default();
        }
        self.holds_view(buyer, now_ms)
    }

    /// After every cloud step: units in holds never exceed what the online channel holds.
    fn check_holds_within_rights(&mut self, now_ms: u64) {
        let held = self.holds_view("", now_ms).held_units;
        let d = self.drop.as_ref().expect("a drop");
        let rights = d.online.state().rights_of(&d.sku, &d.online.device());
        if held > rights {
            self.drop_violation("holds_within_online_rights", format!("{held} units in buyers' holds, the online channel holds {rights}"));
        }
    }

    /// An online buyer's hold request reaches the cloud (arriving, or trying again).
    pub(super) fn on_drop_buyer(&mut self, b: u32) {
        if self.day_over {
            return;
        }
        let now_ms = self.cloud_now_ms();
        let market = self.ctx.market;
        let d = self.drop.as_mut().expect("a drop");
        let buyer = &mut d.buyers[b as usize];
        buyer.attempts += 1;
        let req = HoldRequest {
            drop: d.id.clone(),
            buyer: format!("buyer-{b}"),
            qty: buyer.qty,
            idempotency_key: format!("attempt-{}", buyer.attempts),
        };
        d.report.hold_requests += 1;
        let existing = d.holds.get(&stallmesh_shop::hold_id(&market, &req.buyer, &req.idempotency_key)).cloned();
        let view = self.store_holds_view(&req.buyer, now_ms);
        let d = self.drop.as_mut().expect("a drop");
        let ttl_ms = d.ttl_ms();
        let result = self.protocol(|w| {
            let d = w.drop.as_ref().expect("a drop");
            stallmesh_shop::place_hold(&d.online, &market, existing.as_ref(), &view, &req, ttl_ms, now_ms)
        });
        let latency = self.drop.as_ref().expect("a drop").latency_us();
        match result {
            Ok(Placed::New(hold)) | Ok(Placed::Again(hold)) => {
                let d = self.drop.as_mut().expect("a drop");
                let buyer = &mut d.buyers[b as usize];
                buyer.hold = Some(hold.id.clone());
                if buyer.held_at_us.is_none() {
                    buyer.held_at_us = Some(self.now + latency);
                }
                d.report.holds_placed += 1;
                let expires_us = (hold.expires_ms - DEVICE_EPOCH_MS) * US_PER_MS;
                let abandons = d.rng.gen_bool(d.spec.abandon_share);
                let checkout_us = (Exp::new(1.0 / d.spec.checkout_mean_s.max(1e-3)).expect("positive").sample(&mut d.rng) * US_PER_S as f64) as u64;
                d.holds.insert(hold.id.clone(), hold);
                self.trace_cloud(format!("buyer {b}: hold placed"));
                if abandons {
                    self.drop.as_mut().expect("a drop").report.holds_abandoned += 1;
                } else {
                    self.push(self.now + 2 * latency + checkout_us, Ev::DropPay { buyer: b });
                }
                self.push(expires_us, Ev::DropHoldExpiry { buyer: b });
            }
            Err(ShopError::SoldOut { may_return, held_elsewhere, .. }) => {
                let policy = self.sc.rebalance;
                let d = self.drop.as_mut().expect("a drop");
                d.report.sold_out_replies += 1;
                if held_elsewhere > 0 && d.asks.sold_out(&d.sku, req.qty, &policy, now_ms) {
                    d.report.online_asks += 1;
                }
                self.trace_cloud(format!("buyer {b}: sold out (may return: {may_return})"));
                self.buyer_retries(b, may_return);
            }
            Err(ShopError::DropNotStarted { start_ms }) => {
                let at = (start_ms.saturating_sub(DEVICE_EPOCH_MS) * US_PER_MS).max(self.now) + latency;
                self.push(at, Ev::DropBuyer { buyer: b });
            }
            Err(ShopError::BuyerLimit { .. }) => {
                let d = self.drop.as_mut().expect("a drop");
                d.report.buyer_limit_replies += 1;
                d.report.buyers_left_empty += 1;
            }
            Err(e) => self.drop_violation("online_checkout_answers", format!("buyer {b}'s hold: {e}")),
        }
        self.check_holds_within_rights(now_ms);
    }

    /// A buyer refused for now tries again later if units may come back and patience lasts.
    fn buyer_retries(&mut self, b: u32, may_return: bool) {
        let now = self.now;
        let d = self.drop.as_mut().expect("a drop");
        let retry_us = ((1.0 + d.rng.gen::<f64>()) * d.spec.retry_s * US_PER_S as f64) as u64;
        let patience_us = (d.spec.patience_s * US_PER_S as f64) as u64;
        let buyer = &d.buyers[b as usize];
        if may_return && now + retry_us <= buyer.arrived_us + patience_us {
            let at = now + 2 * d.latency_us() + retry_us;
            self.push(at, Ev::DropBuyer { buyer: b });
        } else {
            d.report.buyers_left_empty += 1;
        }
    }

    /// A buyer's payment reaches the cloud: the online channel's signed sale, logged before the
    /// buyer hears back.
    pub(super) fn on_drop_pay(&mut self, b: u32) {
        if self.day_over {
            return;
        }
        let now_ms = self.cloud_now_ms();
        let d = self.drop.as_ref().expect("a drop");
        let Some(hold) = d.buyers[b as usize].hold.as_ref().and_then(|id| d.holds.get(id)).cloned() else { return };
        let result = self.protocol(|w| stallmesh_shop::pay(&mut w.drop.as_mut().expect("a drop").online, &hold, now_ms));
        match result {
            Ok(Paid::New { hold, entry }) => {
                let d = self.drop.as_mut().expect("a drop");
                d.report.holds_paid += 1;
                d.holds.insert(hold.id.clone(), hold);
                self.online_sale(*entry, now_ms);
            }
            Ok(Paid::Again(_)) => {}
            Err(ShopError::HoldExpired { .. }) => {
                self.drop.as_mut().expect("a drop").report.paid_too_late += 1;
                self.trace_cloud(format!("buyer {b}: paid after the hold expired"));
                self.buyer_retries(b, true);
            }
            Err(e @ ShopError::SoldOut { .. }) => {
                self.drop_violation("a_hold_is_a_promise", format!("buyer {b}'s held hold of {} could not be paid: {e}", hold.qty))
            }
            Err(e) => self.drop_violation("online_checkout_answers", format!("buyer {b}'s payment: {e}")),
        }
        self.check_holds_within_rights(now_ms);
    }

    /// The online channel's sale: acknowledged to the buyer once the cloud logged it.
    fn online_sale(&mut self, entry: Entry, now_ms: u64) {
        let dot = entry.change.dot();
        let id = sale_id(dot);
        let units: u64 = match &entry.event.body {
            EventBody::Sold { lines, .. } => lines.iter().map(|l| l.qty).sum(),
            _ => 0,
        };
        let idx = self.acked.len() as u32;
        self.acked.push(AckedSale { t_ack: self.now, device: self.online_index(), dot, holders: 0, converged_at: None, in_cloud_at: None });
        self.acked_index.insert(id.clone(), idx);
        let batch = self.protocol(|w| w.cloud.ingest.ingest(vec![entry.change.clone()], now_ms));
        if !batch.records.iter().any(|r| r.entry.change.dot() == dot) {
            self.drop_violation("online_checkout_answers", format!("online sale {id} was not logged by the cloud"));
        }
        self.commit_cloud_batch(batch);
        self.schedule_cloud_wake();
        self.hour().sales += 1;
        self.series.sale(self.now);
        self.trace_cloud(format!("online sale {id} acked"));
        self.drop_sold(Channel::Online, units);
    }

    /// Units of the drop acknowledged at `channel`: never more than the drop over all channels.
    pub(super) fn drop_sold(&mut self, channel: Channel, units: u64) {
        let now = self.now;
        let Some(d) = self.drop.as_mut() else { return };
        d.sold += units;
        match channel {
            Channel::Online => d.report.sold_online += units,
            Channel::Stall(s) => {
                let per = &mut d.report.sold_per_stall;
                if per.len() <= s as usize {
                    per.resize(s as usize + 1, 0);
                }
                per[s as usize] += units;
            }
        }
        if d.sold == d.spec.units && d.report.sold_out_after_s.is_none() {
            d.report.sold_out_after_s = Some(now.saturating_sub(d.opens_us) as f64 / US_PER_S as f64);
        }
        if d.sold > d.spec.units {
            let (sold, units) = (d.sold, d.spec.units);
            self.drop_violation("drop_never_oversold", format!("{sold} units of the drop acknowledged over all channels, {units} planned"));
        }
    }

    /// A hold's expiry: unpaid, it reserves nothing from now on, so its units are free again.
    pub(super) fn on_drop_hold_expiry(&mut self, b: u32) {
        let now_ms = self.cloud_now_ms();
        let d = self.drop.as_ref().expect("a drop");
        let Some(hold) = d.buyers[b as usize].hold.as_ref().and_then(|id| d.holds.get(id)).cloned() else { return };
        if hold.sale.is_some() || hold.expires_ms > now_ms {
            return; // paid, or a later hold of the same buyer
        }
        let still_live: u64 =
            d.holds.values().filter(|h| h.sku == d.sku && h.sale.is_none() && now_ms < h.expires_ms).map(|h| h.qty).sum();
        let counted = self.holds_view("", now_ms).held_units;
        if hold.reserves(now_ms) != 0 || counted != still_live {
            let detail = format!("buyer {b}'s hold of {} expired, yet holds count {counted} units; {still_live} are in live holds", hold.qty);
            self.drop_violation("every_expired_hold_returned", detail);
        }
        let d = self.drop.as_mut().expect("a drop");
        d.report.holds_expired += 1;
        d.report.units_returned_by_expiry += hold.qty;
    }

    /// A walk-in buyer of the drop at a stall: one unit at one of its selling tablets.
    pub(super) fn on_drop_walk_in(&mut self, stall: u32) {
        let d = self.drop.as_ref().expect("a drop");
        let ends = d.opens_us + (d.spec.stall_window_s * US_PER_S as f64) as u64;
        if self.day_over || self.now > ends {
            return;
        }
        let next = self.next_walk_in(self.now);
        self.push(next, Ev::DropWalkIn { stall });
        let up = self.sellers_up(stall);
        let d = self.drop.as_mut().expect("a drop");
        d.report.walk_ins += 1;
        if up.is_empty() {
            self.customers_lost += 1;
            return;
        }
        let dev = up[d.rng.gen_range(0..up.len())];
        self.trace(Some(dev), "drop buyer at the stall".into());
        self.sell(dev, vec![LineRequest { sku: DROP_SKU.into(), qty: 1 }], None, None);
    }

    /// A till short of `sku` asks the online channel through its live uplink, as the node does
    /// (once per sale): true if the online channel holds some and was asked.
    pub(super) fn ask_online_for_sale(&mut self, dev: u32, sku: &str, requested: u64, held_here: u64, held_online: u64, first_attempt: bool) -> bool {
        let now = self.dev_now_ms(dev);
        let policy = self.sc.rebalance;
        let Some(u) = self.devices[dev as usize].uplink.as_mut() else { return false };
        if held_online == 0 || !u.core.live(now) {
            return false;
        }
        if first_attempt {
            let Some(qty) = policy.shortfall_wanted(requested, held_here, held_online) else { return false };
            u.core.want_rights(sku.to_string(), qty, true);
            if let Some(d) = self.drop.as_mut() {
                d.report.tablet_asks_online += 1;
            }
            self.schedule_uplink(dev);
        }
        true
    }

    /// Units of `sku` the online channel holds, as tablet `dev` sees it.
    pub(super) fn held_online_seen_by(&self, dev: u32, sku: &str) -> u64 {
        let Some(d) = self.drop.as_ref() else { return 0 };
        self.devices[dev as usize].ledger.state().rights_of(sku, &d.online.device())
    }

    /// A tablet's uplink asks the online channel for units (`RightsWanted`): it gives by the
    /// market's policy, never units in buyers' holds, and the transfer is logged and goes back in
    /// the reply. Without an online channel nothing is given.
    pub(super) fn online_give(&mut self, dev: u32, sku: &str, qty: u64, for_sale: bool, now_ms: u64) -> Option<SignedChange> {
        self.drop.as_ref()?;
        let to = self.devices[dev as usize].id;
        let held = self.store_holds_view("", now_ms).held_units;
        let policy = self.sc.rebalance;
        let given = self.protocol(|w| {
            let d = w.drop.as_mut().expect("checked above");
            stallmesh_shop::give_rights(&mut d.online, &policy, held, sku, qty, to, for_sale, now_ms)
        });
        let entry = match given {
            Ok(Some(entry)) => entry,
            Ok(None) => return None,
            Err(e) => {
                self.trace_cloud(format!("the online channel cannot give {sku} to {dev}: {e}"));
                return None;
            }
        };
        let units = match &entry.event.body {
            EventBody::Transferred { qty, .. } => *qty,
            _ => 0,
        };
        let change = entry.change.clone();
        let batch = self.protocol(|w| w.cloud.ingest.ingest(vec![change.clone()], now_ms));
        self.commit_cloud_batch(batch);
        self.schedule_cloud_wake();
        self.check_holds_within_rights(now_ms);
        self.trace_cloud(format!("the online channel gave {units} {sku} to {dev}"));
        self.drop.as_mut().expect("checked above").report.units_given_by_online += units;
        Some(change)
    }

    /// The online channel's open asks, for a reply to an uplink.
    pub(super) fn online_wants(&self, now_ms: u64) -> Vec<OnlineWants> {
        let Some(d) = self.drop.as_ref() else { return Vec::new() };
        let device = d.online.device();
        d.asks.open(now_ms).map(|(sku, qty)| OnlineWants { device, sku: sku.to_string(), qty }).collect()
    }

    /// The cloud logged changes: the online channel's ledger takes them in too, as the cloud
    /// feeds it; a tablet's transfer to it answers its ask.
    pub(super) fn feed_online(&mut self, changes: Vec<SignedChange>) {
        if self.drop.is_none() || changes.is_empty() {
            return;
        }
        let report = self.protocol(|w| {
            let known = Interned { entries: &w.entries, applied_after: &w.applied_after };
            w.drop.as_mut().expect("checked above").online.apply_remote_known(changes, &known)
        });
        if let Some((dot, why)) = report.rejected.first() {
            let detail = format!("the online channel refused {}:{} the cloud logged: {}", dot.device.short(), dot.seq, why.label());
            self.drop_violation("online_channel_follows_the_log", detail);
        }
        let d = self.drop.as_mut().expect("checked above");
        let me = d.online.device();
        for e in &report.applied {
            if let EventBody::Transferred { sku, to, qty } = &e.event.body {
                if *to == me {
                    d.asks.answered(sku);
                    d.report.units_given_to_online += qty;
                }
            }
        }
    }

    /// The online channel asked tablet `dev`, in a reply to its uplink: it gives what its policy
    /// spares, as the node does.
    pub(super) fn give_online(&mut self, dev: u32, w: OnlineWants) {
        let now = self.dev_now_ms(dev);
        let policy = self.sc.rebalance;
        let entry = self.protocol(|world| {
            let l = &mut world.devices[dev as usize].ledger;
            let give = stallmesh_shop::spare_for_online(l, w.device, &w.sku, w.qty, &policy, now);
            (give > 0).then(|| l.record(LocalOp::Transfer { sku: w.sku.clone(), qty: give, to: w.device }, now).ok()).flatten()
        });
        if let Some(entry) = entry {
            self.trace(Some(dev), format!("gave {} to the online channel", w.sku));
            self.local_entry(dev, entry);
        }
    }

    /// At the end: the online channel agrees with the market, and what is left of the drop, per
    /// channel, goes in the report.
    pub(super) fn check_drop(&mut self) -> Vec<Violation> {
        let Some(mut d) = self.drop.take() else { return Vec::new() };
        let reference = self.devices[0].ledger.state();
        let online = d.online.state();
        if online.rights != reference.rights || online.sales != reference.sales {
            d.violations.push(Violation {
                invariant: "online_channel_follows_the_log",
                detail: "the online channel's ledger differs from device 0's at the end".into(),
                device: None,
                timeline: vec![],
            });
        }
        let left = reference.stock(&d.sku);
        d.report.left_online = left.per_device.get(&d.online.device()).copied().unwrap_or(0);
        let mut per_stall = vec![0; self.sc.market.stalls as usize];
        for dev in &self.devices {
            per_stall[dev.stall as usize] += left.per_device.get(&dev.id).copied().unwrap_or(0);
        }
        d.report.left_per_stall = per_stall;
        d.report.sold_per_stall.resize(self.sc.market.stalls as usize, 0);
        let mut waits: Vec<f64> = d.buyers.iter().filter_map(|b| b.held_at_us.map(|t| (t - b.arrived_us) as f64 / 1000.0)).collect();
        waits.sort_by(f64::total_cmp);
        let pct = |p: f64| if waits.is_empty() { 0.0 } else { waits[((waits.len() - 1) as f64 * p).round() as usize] };
        d.report.buyers_who_held = waits.len() as u64;
        d.report.hold_wait_ms_p50 = pct(0.5);
        d.report.hold_wait_ms_p99 = pct(0.99);
        d.report.hold_wait_ms_max = waits.last().copied().unwrap_or(0.0);
        let v = std::mem::take(&mut d.violations);
        self.drop = Some(d);
        v
    }
}
