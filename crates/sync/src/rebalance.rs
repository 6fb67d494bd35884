//! Stock-rights rebalancing, the one driver policy both drivers (the node's mesh driver and HTTP
//! sale handler, and the simulator) call: when to ask peers for rights and how many
//! ([`Rebalancer`]), how many to give a peer that asked ([`RebalancePolicy::give`]), and how a sale
//! refused for rights waits for them ([`SaleWait`]). Sans-IO: every time is passed in as `now_ms`,
//! and each waiting thing says when it next needs to be woken (`poll_timeout`).
//!
//! Giving: a device keeps a share of its rights in proportion to its recent sales against the
//! asker's (plus one each, so a device that has sold nothing yet still keeps something), and never
//! gives below `min_keep`. The exception is a customer waiting: a device that sold nothing in the
//! window gives what a waiting sale asks for, down to its last unit (`min_keep` protects a device's
//! own customers, and an idle device has none), and a selling device still gives at least what the
//! waiting sale lacks, even its last units: a customer at the till now comes before one who may
//! come. Pure arithmetic: the driver records the transfer (made by the giver).

use serde::Deserialize;
use std::collections::BTreeMap;

/// Sales counted as "recent" by the policy: about a market's rush, long enough that a stall's
/// quiet quarter-hour does not make its tablet look idle.
pub const RECENT_SALES_WINDOW_MS: u64 = 3_600_000;
/// Do not ask the same peers for the same SKU to refill more often than this: a refill is not
/// urgent, and every ask goes to every peer.
pub const RIGHTS_REQUEST_INTERVAL_MS: u64 = 2_000;
/// How long a sale refused for rights that a reachable peer holds waits for them before it is
/// refused. On the LAN an ask, the giver's durable transfer and its broadcast take a few ms to
/// tens of ms (fsync on a tablet's flash is the slow part); 300 ms is still a tap's response time
/// for a cashier, and past it the units are not coming (the holder keeps them or did not hear).
pub const SALE_WAIT_FOR_RIGHTS_MS: u64 = 300;
/// Asks for a waiting sale bypass [`RIGHTS_REQUEST_INTERVAL_MS`] but are still limited per SKU to
/// one per this interval: about three within one wait, enough to repeat a lost ask, and at most ten
/// a second to every peer however many sales wait.
pub const SALE_RIGHTS_REQUEST_INTERVAL_MS: u64 = 100;

/// Most attempts of one sale while it waits for rights: a sale short of several SKUs retries as each
/// arrives; more within the wait means concurrent sales keep taking the units first.
pub const MAX_SALE_ATTEMPTS: usize = 8;

// A waiting sale asks more than once within its wait (a lost ask is repeated), and the wait ends
// before a refill may be asked again: a sale never waits on the slower limit.
const _: () = assert!(SALE_RIGHTS_REQUEST_INTERVAL_MS < SALE_WAIT_FOR_RIGHTS_MS);
const _: () = assert!(SALE_WAIT_FOR_RIGHTS_MS < RIGHTS_REQUEST_INTERVAL_MS);
// The ask map is pruned by the longer interval; it must cover the shorter one too.
const _: () = assert!(SALE_RIGHTS_REQUEST_INTERVAL_MS <= RIGHTS_REQUEST_INTERVAL_MS);
const _: () = assert!(MAX_SALE_ATTEMPTS >= 2, "a waiting sale is retried at least once");

/// The market's rebalancing numbers (node: `mesh.min_keep` / `low_watermark` / `refill`; simulator:
/// the scenario's `[rebalance]` table). A partial table keeps the defaults for the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RebalancePolicy {
    /// Units a device that is itself selling always keeps.
    pub min_keep: u64,
    /// Ask peers for more when this device's rights for a SKU fall to this level or below.
    pub low_watermark: u64,
    /// How many units to ask for when below the watermark.
    pub refill: u64,
}

impl Default for RebalancePolicy {
    fn default() -> Self {
        Self { min_keep: 1, low_watermark: 1, refill: 5 }
    }
}

impl RebalancePolicy {
    /// Units to give a peer that asked for `requested`, holding `held` and having sold
    /// `my_recent_sales` against the asker's `their_recent_sales` (within
    /// [`RECENT_SALES_WINDOW_MS`]). `for_sale`: the asker has a customer waiting for these units now.
    pub fn give(&self, held: u64, requested: u64, my_recent_sales: u64, their_recent_sales: u64, for_sale: bool) -> u64 {
        if for_sale && my_recent_sales == 0 {
            return held.min(requested);
        }
        let mine = my_recent_sales + 1;
        let total = mine + their_recent_sales + 1;
        let keep = (held.saturating_mul(mine) / total).max(self.min_keep);
        let share = held.saturating_sub(keep).min(requested);
        if for_sale {
            // A waiting sale asks for what it lacks plus a refill (the market's `refill`, as this
            // device's config has it): the part it lacks is never held back.
            let lacking = requested.saturating_sub(self.refill).max(1);
            return share.max(lacking.min(held));
        }
        share
    }

    /// Units to ask peers for after a local sale left `held_here` units of a SKU on this device and
    /// `held_elsewhere` on all others: a refill when at or below the low watermark and someone else
    /// holds any (asking a market that holds none only costs messages).
    pub fn refill_wanted(&self, held_here: u64, held_elsewhere: u64) -> Option<u64> {
        (held_here <= self.low_watermark && held_elsewhere > 0 && self.refill > 0).then_some(self.refill)
    }

    /// Units to ask for when an operation needing `requested` units was refused holding
    /// `held_here`, with `held_elsewhere_total` on other devices: what it lacks plus a refill (so
    /// the next sale need not ask again). `None` if no other device holds any.
    pub fn shortfall_wanted(&self, requested: u64, held_here: u64, held_elsewhere_total: u64) -> Option<u64> {
        (held_elsewhere_total > 0).then(|| self.short_plus_refill(requested.saturating_sub(held_here)))
    }

    /// What a waiting sale short of `short` units asks for: the shortfall and a refill. `give`
    /// relies on this shape (it takes `refill` off an ask `for_sale` to find what the sale lacks).
    fn short_plus_refill(&self, short: u64) -> u64 {
        debug_assert!(short > 0, "an ask for a refused sale lacks something");
        short.saturating_add(self.refill)
    }
}

/// What happened to an ask for rights: each is a counted outcome for the driver's metrics
/// (`stallmesh_rights_requests_total{outcome}` in the node), never a silent drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ask {
    /// Send `Sync::want_rights(sku, qty, for_sale, now_ms)` now.
    Send { sku: String, qty: u64, for_sale: bool },
    /// The same SKU (and kind) was asked for within its interval: nothing sent.
    RateLimited { sku: String, for_sale: bool },
}

impl Ask {
    /// The metric label: `for_sale`, `refill` or `rate_limited`.
    pub fn outcome(&self) -> &'static str {
        match self {
            Ask::Send { for_sale: true, .. } => "for_sale",
            Ask::Send { for_sale: false, .. } => "refill",
            Ask::RateLimited { .. } => "rate_limited",
        }
    }
}

/// Counts of [`Ask`] outcomes, for a driver that reports totals (the simulator's report).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct AskStats {
    pub for_sale: u64,
    pub refill: u64,
    pub rate_limited: u64,
}

/// The rebalancing policy with its memory: when each SKU was last asked for, per kind (refill or
/// for a waiting sale), so peers are not asked for the same units over and over. One per device,
/// owned by the driver that holds the sync core.
#[derive(Debug, Clone)]
pub struct Rebalancer {
    policy: RebalancePolicy,
    /// (SKU, for a waiting sale) → when last asked. Holds only asks within
    /// [`RIGHTS_REQUEST_INTERVAL_MS`] (pruned on every ask): older ones no longer limit anything.
    asked_at_ms: BTreeMap<(String, bool), u64>,
    stats: AskStats,
}

impl Rebalancer {
    pub fn new(policy: RebalancePolicy) -> Self {
        Self { policy, asked_at_ms: BTreeMap::new(), stats: AskStats::default() }
    }

    pub fn policy(&self) -> &RebalancePolicy {
        &self.policy
    }

    pub fn stats(&self) -> &AskStats {
        &self.stats
    }

    /// A local sale of `sku` left `held_here` units here and `held_elsewhere` on other devices:
    /// ask for a refill when low ([`RebalancePolicy::refill_wanted`]), within the refill interval.
    pub fn after_sale(&mut self, sku: &str, held_here: u64, held_elsewhere: u64, now_ms: u64) -> Option<Ask> {
        let qty = self.policy.refill_wanted(held_here, held_elsewhere)?;
        Some(self.ask(sku, qty, false, now_ms))
    }

    /// A local operation needing `requested` units of `sku` was refused holding `held_here`, with
    /// `held_elsewhere_total` on other devices. `for_sale`: a customer waits (a sale), else a
    /// refill-like ask (a transfer). `None` if no other device holds any.
    pub fn after_refusal(
        &mut self,
        sku: &str,
        requested: u64,
        held_here: u64,
        held_elsewhere_total: u64,
        for_sale: bool,
        now_ms: u64,
    ) -> Option<Ask> {
        let qty = self.policy.shortfall_wanted(requested, held_here, held_elsewhere_total)?;
        Some(self.ask(sku, qty, for_sale, now_ms))
    }

    /// A waiting sale asks again ([`SaleWaitStep::AskAgain`]) for the `short` units it still lacks.
    pub fn ask_again(&mut self, sku: &str, short: u64, now_ms: u64) -> Ask {
        let qty = self.policy.short_plus_refill(short);
        self.ask(sku, qty, true, now_ms)
    }

    /// The rate limit: one ask per SKU and kind per [`RIGHTS_REQUEST_INTERVAL_MS`] (refills) or
    /// [`SALE_RIGHTS_REQUEST_INTERVAL_MS`] (a waiting sale: a refill asked just before must not
    /// silence it, hence its own key). A clock that went back does not limit: the last ask's time
    /// says nothing about the interval then.
    pub fn ask(&mut self, sku: &str, qty: u64, for_sale: bool, now_ms: u64) -> Ask {
        let interval_ms = if for_sale { SALE_RIGHTS_REQUEST_INTERVAL_MS } else { RIGHTS_REQUEST_INTERVAL_MS };
        let recent = |at: u64, within_ms: u64| now_ms.checked_sub(at).is_some_and(|ago| ago < within_ms);
        self.asked_at_ms.retain(|_, at| recent(*at, RIGHTS_REQUEST_INTERVAL_MS));
        let key = (sku.to_string(), for_sale);
        if self.asked_at_ms.get(&key).is_some_and(|at| recent(*at, interval_ms)) {
            self.stats.rate_limited += 1;
            return Ask::RateLimited { sku: key.0, for_sale };
        }
        self.asked_at_ms.insert(key, now_ms);
        if for_sale {
            self.stats.for_sale += 1;
        } else {
            self.stats.refill += 1;
        }
        Ask::Send { sku: sku.to_string(), qty, for_sale }
    }

    /// Units to give a peer that asked: [`RebalancePolicy::give`]. `my_recent_sales` and
    /// `their_recent_sales` are counted since [`recent_sales_since_ms`]`(now_ms)` (the ledger's
    /// `State::sales_of_device_since`).
    pub fn give(&self, held: u64, requested: u64, my_recent_sales: u64, their_recent_sales: u64, for_sale: bool) -> u64 {
        let given = self.policy.give(held, requested, my_recent_sales, their_recent_sales, for_sale);
        debug_assert!(given <= held && given <= requested);
        given
    }
}

/// Sales at or after this time count as recent for [`RebalancePolicy::give`] at `now_ms`.
pub fn recent_sales_since_ms(now_ms: u64) -> u64 {
    now_ms.saturating_sub(RECENT_SALES_WINDOW_MS)
}

/// Why a waiting sale ended refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaleWaitEnd {
    /// No peer with a live session holds any of the SKU: nothing to wait for.
    NoReachableHolder,
    /// [`MAX_SALE_ATTEMPTS`] attempts were refused (concurrent sales keep taking the units).
    TooManyAttempts,
    /// [`SALE_WAIT_FOR_RIGHTS_MS`] passed.
    Deadline,
}

impl SaleWaitEnd {
    pub fn label(&self) -> &'static str {
        match self {
            SaleWaitEnd::NoReachableHolder => "no_reachable_holder",
            SaleWaitEnd::TooManyAttempts => "too_many_attempts",
            SaleWaitEnd::Deadline => "deadline",
        }
    }
}

/// What a waiting sale's driver does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaleWaitStep {
    /// The units it lacked are here: try the sale again, and tell [`SaleWait::refused`] if it is
    /// refused again.
    Retry,
    /// Ask peers again for the `short` units still lacking ([`Rebalancer::ask_again`]): a lost ask,
    /// or the rights moved meanwhile.
    AskAgain { short: u64 },
    /// Nothing until [`SaleWait::poll_timeout`], or until rights arrive here.
    Wait,
    /// Answer the refusal.
    GiveUp(SaleWaitEnd),
}

/// One customer's sale, refused for rights, waiting for a peer to transfer them (the node's HTTP
/// handler and the simulator's customer). The driver: before the first attempt [`SaleWait::new`];
/// after each attempt refused for rights [`SaleWait::refused`] (and [`Rebalancer::after_refusal`]);
/// then [`SaleWait::poll`] when a transfer to this device is applied or at
/// [`SaleWait::poll_timeout`], until `Retry` or `GiveUp`. `now_ms` is any monotonic clock in ms
/// (the wait's length must not jump with the wall clock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaleWait {
    started_ms: u64,
    deadline_ms: u64,
    attempts: usize,
    /// The SKU the last refused attempt was short of, and the units it needed.
    short_of: Option<(String, u64)>,
    /// When to ask again if nothing arrived (each refused attempt asked at once).
    next_ask_ms: u64,
    waited: bool,
}

impl SaleWait {
    pub fn new(started_ms: u64) -> Self {
        let deadline_ms = started_ms.saturating_add(SALE_WAIT_FOR_RIGHTS_MS);
        Self { started_ms, deadline_ms, attempts: 0, short_of: None, next_ask_ms: deadline_ms, waited: false }
    }

    /// An attempt was refused for `requested` units of `sku`; `reachable_holder`: a peer with a
    /// live session holds some. `Ok`: wait (poll it); `Err`: answer the refusal now.
    pub fn refused(&mut self, sku: &str, requested: u64, reachable_holder: bool, now_ms: u64) -> Result<(), SaleWaitEnd> {
        self.attempts += 1;
        if !reachable_holder {
            return Err(SaleWaitEnd::NoReachableHolder);
        }
        if self.attempts >= MAX_SALE_ATTEMPTS {
            return Err(SaleWaitEnd::TooManyAttempts);
        }
        if now_ms >= self.deadline_ms {
            return Err(SaleWaitEnd::Deadline);
        }
        self.short_of = Some((sku.to_string(), requested));
        self.next_ask_ms = now_ms.saturating_add(SALE_RIGHTS_REQUEST_INTERVAL_MS).min(self.deadline_ms);
        self.waited = true;
        Ok(())
    }

    /// `held_here`: this device's rights now for [`SaleWait::sku`].
    pub fn poll(&mut self, held_here: u64, now_ms: u64) -> SaleWaitStep {
        let Some((_, requested)) = &self.short_of else {
            debug_assert!(false, "polled a sale that is not waiting");
            return SaleWaitStep::Retry;
        };
        let requested = *requested;
        if held_here >= requested {
            return SaleWaitStep::Retry;
        }
        if now_ms >= self.deadline_ms {
            return SaleWaitStep::GiveUp(SaleWaitEnd::Deadline);
        }
        if now_ms >= self.next_ask_ms {
            self.next_ask_ms = now_ms.saturating_add(SALE_RIGHTS_REQUEST_INTERVAL_MS).min(self.deadline_ms);
            return SaleWaitStep::AskAgain { short: requested - held_here };
        }
        SaleWaitStep::Wait
    }

    /// When [`SaleWait::poll`] must next be called if no rights arrive: the next ask or the deadline.
    /// `None` before a refused attempt (nothing to wait for).
    pub fn poll_timeout(&self) -> Option<u64> {
        self.short_of.as_ref().map(|_| self.next_ask_ms.min(self.deadline_ms))
    }

    /// The SKU the sale waits for.
    pub fn sku(&self) -> Option<&str> {
        self.short_of.as_ref().map(|(s, _)| s.as_str())
    }

    /// Whether the sale waited at all (a refusal answered at once did not).
    pub fn waited(&self) -> bool {
        self.waited
    }

    pub fn attempts(&self) -> usize {
        self.attempts
    }

    pub fn waited_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.started_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_device_keeps_more_and_never_goes_below_min_keep() {
        let p = RebalancePolicy::default();
        // Equal sales: keep half.
        assert_eq!(p.give(10, 10, 0, 0, false), 5);
        // I sold 5, the asker 1: keep (5+1)/(5+1+1+1) = three quarters.
        assert_eq!(p.give(12, 10, 5, 1, false), 3);
        // The asker sells everything: still keep min_keep.
        assert_eq!(p.give(10, 10, 0, 1_000, false), 9);
        assert_eq!(p.give(1, 5, 0, 100, false), 0);
        assert_eq!(p.give(0, 5, 0, 0, false), 0);
        // Never more than asked.
        assert_eq!(p.give(100, 2, 0, 0, false), 2);
    }

    #[test]
    fn an_idle_device_gives_its_last_units_to_a_waiting_sale_and_a_selling_one_what_the_sale_lacks() {
        let p = RebalancePolicy::default();
        // The case: an idle tablet holding one unit, a customer waiting one tablet away.
        assert_eq!(p.give(1, 6, 0, 3, true), 1);
        assert_eq!(p.give(4, 6, 0, 0, true), 4);
        // Still never more than asked, nor than held.
        assert_eq!(p.give(10, 6, 0, 0, true), 6);
        assert_eq!(p.give(0, 6, 0, 0, true), 0);
        // A tablet that sold in the window gives a waiting sale what it lacks (6 asked = 1 lacking
        // + a refill of 5), even its last unit, and its policy share beyond that...
        assert_eq!(p.give(1, 6, 1, 3, true), 1);
        assert_eq!(p.give(4, 6, 1, 100, true), 3);
        assert_eq!(p.give(10, 8, 50, 0, true), 3, "lacking 3, though its share is 0");
        // ... and an idle one keeps it for a refill (nobody waits for a refill).
        assert_eq!(p.give(1, 6, 0, 3, false), 0);
        // A larger min_keep holds back only what a waiting sale does not lack.
        let p = RebalancePolicy { min_keep: 3, ..p };
        assert_eq!(p.give(3, 6, 0, 0, true), 3);
        assert_eq!(p.give(3, 6, 2, 100, true), 1);
        assert_eq!(p.give(3, 6, 2, 100, false), 0);
    }

    fn sent(sku: &str, qty: u64, for_sale: bool) -> Ask {
        Ask::Send { sku: sku.into(), qty, for_sale }
    }

    #[test]
    fn a_sale_that_leaves_the_device_at_the_low_watermark_asks_for_a_refill_if_anyone_holds_some() {
        let mut r = Rebalancer::new(RebalancePolicy { min_keep: 1, low_watermark: 2, refill: 5 });
        assert_eq!(r.after_sale("HNY", 3, 10, 0), None, "above the watermark");
        assert_eq!(r.after_sale("HNY", 2, 0, 0), None, "nobody else holds any");
        assert_eq!(r.after_sale("HNY", 2, 10, 0), Some(sent("HNY", 5, false)));
        assert_eq!(r.after_sale("JAM", 0, 1, 0), Some(sent("JAM", 5, false)), "each SKU has its own limit");
        assert_eq!(r.stats().refill, 2);
    }

    #[test]
    fn a_refused_sale_asks_for_what_it_lacks_plus_a_refill_and_nothing_when_nobody_holds_any() {
        let mut r = Rebalancer::new(RebalancePolicy::default());
        assert_eq!(r.after_refusal("HNY", 3, 1, 0, true, 0), None);
        assert_eq!(r.after_refusal("HNY", 3, 1, 4, true, 0), Some(sent("HNY", 2 + 5, true)));
        // The giver reads the same shape back: it gives at least the 2 lacking, even when selling.
        assert_eq!(r.give(2, 7, 50, 0, true), 2);
        // A refused transfer asks like a refill.
        assert_eq!(r.after_refusal("JAM", 4, 0, 4, false, 0), Some(sent("JAM", 4 + 5, false)));
    }

    #[test]
    fn refills_are_asked_at_most_once_an_interval_and_a_waiting_sale_has_its_own_shorter_limit() {
        let mut r = Rebalancer::new(RebalancePolicy::default());
        let t = 1_000_000;
        assert_eq!(r.after_sale("HNY", 0, 9, t), Some(sent("HNY", 5, false)));
        let limited = Some(Ask::RateLimited { sku: "HNY".into(), for_sale: false });
        assert_eq!(r.after_sale("HNY", 0, 9, t + RIGHTS_REQUEST_INTERVAL_MS - 1), limited);
        // A refill asked just before does not silence a customer waiting.
        assert_eq!(r.after_refusal("HNY", 1, 0, 9, true, t + 1), Some(sent("HNY", 6, true)));
        assert_eq!(r.ask_again("HNY", 1, t + 1 + SALE_RIGHTS_REQUEST_INTERVAL_MS - 1).outcome(), "rate_limited");
        assert_eq!(r.ask_again("HNY", 1, t + 1 + SALE_RIGHTS_REQUEST_INTERVAL_MS), sent("HNY", 6, true));
        assert_eq!(r.after_sale("HNY", 0, 9, t + RIGHTS_REQUEST_INTERVAL_MS), Some(sent("HNY", 5, false)));
        assert_eq!(*r.stats(), AskStats { for_sale: 2, refill: 2, rate_limited: 2 }, "every outcome is counted");
        // A clock that went back does not silence asks until it catches up again.
        assert_eq!(r.after_sale("HNY", 0, 9, t - 60_000), Some(sent("HNY", 5, false)));
    }

    #[test]
    fn the_ask_memory_holds_only_asks_within_the_longer_interval() {
        let mut r = Rebalancer::new(RebalancePolicy::default());
        for i in 0..1_000u64 {
            r.ask(&format!("SKU-{i}"), 1, i % 2 == 0, i * 10);
        }
        let now = 999 * 10;
        assert!(r.asked_at_ms.values().all(|at| now - at < RIGHTS_REQUEST_INTERVAL_MS));
        assert_eq!(r.asked_at_ms.len() as u64, RIGHTS_REQUEST_INTERVAL_MS / 10);
    }

    #[test]
    fn a_waiting_sale_asks_again_every_interval_retries_when_the_rights_arrive_and_ends_at_the_deadline() {
        let t = 5_000;
        let mut w = SaleWait::new(t);
        assert_eq!(w.poll_timeout(), None, "nothing to wait for before a refusal");
        assert_eq!(w.refused("HNY", 3, true, t), Ok(()));
        assert_eq!(w.sku(), Some("HNY"));
        let next = t + SALE_RIGHTS_REQUEST_INTERVAL_MS;
        assert_eq!(w.poll_timeout(), Some(next));
        assert_eq!(w.poll(1, next - 1), SaleWaitStep::Wait, "some arrived, not enough");
        assert_eq!(w.poll(1, next), SaleWaitStep::AskAgain { short: 2 });
        assert_eq!(w.poll_timeout(), Some(next + SALE_RIGHTS_REQUEST_INTERVAL_MS));
        assert_eq!(w.poll(3, next + 1), SaleWaitStep::Retry);
        // Another sale took them first: refused again, it waits on, asking again from now.
        assert_eq!(w.refused("HNY", 3, true, next + 2), Ok(()));
        assert_eq!(w.poll_timeout(), Some(next + 2 + SALE_RIGHTS_REQUEST_INTERVAL_MS));
        let deadline = t + SALE_WAIT_FOR_RIGHTS_MS;
        let mut at = next + 2;
        while let Some(timeout) = w.poll_timeout() {
            assert!(timeout > at && timeout <= deadline, "every wake moves forward and none is past the deadline");
            at = timeout;
            match w.poll(0, at) {
                SaleWaitStep::AskAgain { short: 3 } => {}
                SaleWaitStep::GiveUp(end) => {
                    assert_eq!((end, at), (SaleWaitEnd::Deadline, deadline));
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(w.waited());
        assert_eq!(w.waited_ms(deadline), SALE_WAIT_FOR_RIGHTS_MS);
    }

    #[test]
    fn a_refused_sale_waits_only_for_a_reachable_holder_within_its_attempts_and_deadline() {
        let mut w = SaleWait::new(0);
        assert_eq!(w.refused("HNY", 1, false, 0), Err(SaleWaitEnd::NoReachableHolder));
        assert!(!w.waited(), "answered at once");
        let mut w = SaleWait::new(0);
        for i in 1..MAX_SALE_ATTEMPTS {
            assert_eq!(w.refused("HNY", 1, true, i as u64), Ok(()));
        }
        assert_eq!(w.refused("HNY", 1, true, 10), Err(SaleWaitEnd::TooManyAttempts));
        assert_eq!(w.attempts(), MAX_SALE_ATTEMPTS);
        let mut w = SaleWait::new(0);
        assert_eq!(w.refused("HNY", 1, true, SALE_WAIT_FOR_RIGHTS_MS), Err(SaleWaitEnd::Deadline));
    }
}
