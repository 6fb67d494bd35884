//! Stock-rights rebalancing policy: how many units a device gives a peer that ran short.
//!
//! A device keeps a share of its rights in proportion to its recent sales against the asker's
//! (plus one each, so a device that has sold nothing yet still keeps something), and never gives
//! below `min_keep`. Pure arithmetic: the driver records the transfer (made by the giver).

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct RebalancePolicy {
    /// Units a device always keeps for itself.
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
    /// `my_recent_sales` against the asker's `their_recent_sales`.
    pub fn give(&self, held: u64, requested: u64, my_recent_sales: u64, their_recent_sales: u64) -> u64 {
        let mine = my_recent_sales + 1;
        let total = mine + their_recent_sales + 1;
        let keep = (held.saturating_mul(mine) / total).max(self.min_keep);
        held.saturating_sub(keep).min(requested)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_device_keeps_more_and_never_goes_below_min_keep() {
        let p = RebalancePolicy::default();
        // Equal sales: keep half.
        assert_eq!(p.give(10, 10, 0, 0), 5);
        // I sold 5, the asker 1: keep (5+1)/(5+1+1+1) = three quarters.
        assert_eq!(p.give(12, 10, 5, 1), 3);
        // The asker sells everything: still keep min_keep.
        assert_eq!(p.give(10, 10, 0, 1_000), 9);
        assert_eq!(p.give(1, 5, 0, 100), 0);
        assert_eq!(p.give(0, 5, 0, 0), 0);
        // Never more than asked.
        assert_eq!(p.give(100, 2, 0, 0), 2);
    }
}
