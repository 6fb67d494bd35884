//! Stock-rights rebalancing policy: how many units a device gives a peer that ran short.
//!
//! A device keeps a share of its rights in proportion to its recent sales against the asker's
//! (plus one each, so a device that has sold nothing yet still keeps something), and never gives
//! below `min_keep`. The exception is a customer waiting: a device that sold nothing in the window
//! gives what a waiting sale asks for, down to its last unit (`min_keep` protects a device's own
//! customers, and an idle device has none), and a selling device still gives at least what the
//! waiting sale lacks, even its last units: a customer at the till now comes before one who may
//! come. Pure arithmetic: the driver records the transfer (made by the giver).

use serde::Deserialize;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
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
}
