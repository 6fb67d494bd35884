//! Rights flowing between the online channel and the tablets, decided here for both ends: the
//! cloud's asks to the tablets when the online channel sells out ([`OnlineAsks`]), and what a
//! tablet spares when asked ([`spare_for_online`]). The cloud service, the tablets' uplinks and
//! the simulator all call these, so the simulated market rebalances as the real one does.

use stallmesh_identity::{DeviceId, Role};
use stallmesh_ledger::Ledger;
use stallmesh_sync::rebalance::{recent_sales_since_ms, RebalancePolicy};
use std::collections::BTreeMap;

/// How long the online channel asks the tablets for a SKU it sold out of: a few uplink heads
/// refreshes, so every tablet with an uplink hears it; a buyer refused again asks again.
pub const ONLINE_ASK_MS: u64 = 30_000;
/// SKUs asked for at once: what one cloud reply carries (the cloud asserts the wire's bound).
pub const MAX_ONLINE_ASKS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ask {
    qty: u64,
    until_ms: u64,
}

/// The online channel's open asks, per SKU: put in every reply to an uplink until a tablet gives
/// or [`ONLINE_ASK_MS`] passes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OnlineAsks {
    asks: BTreeMap<String, Ask>,
}

impl OnlineAsks {
    /// A buyer wanting `qty` of `sku` was refused while the stalls hold some: ask for `qty` plus
    /// the policy's refill. False when asks for other SKUs fill the reply (asked again on the next
    /// refusal, once one has expired or been answered).
    pub fn sold_out(&mut self, sku: &str, qty: u64, policy: &RebalancePolicy, now_ms: u64) -> bool {
        self.asks.retain(|_, a| a.until_ms > now_ms);
        if !self.asks.contains_key(sku) && self.asks.len() >= MAX_ONLINE_ASKS {
            return false;
        }
        let want = qty.saturating_add(policy.refill);
        let until_ms = now_ms.saturating_add(ONLINE_ASK_MS);
        let ask = self.asks.entry(sku.to_string()).or_insert(Ask { qty: 0, until_ms });
        *ask = Ask { qty: ask.qty.max(want), until_ms };
        debug_assert!(self.asks.len() <= MAX_ONLINE_ASKS);
        true
    }

    /// A tablet gave the online channel units of `sku`: that ask is answered.
    pub fn answered(&mut self, sku: &str) {
        self.asks.remove(sku);
    }

    /// The asks still open at `now_ms`: (sku, units).
    pub fn open(&self, now_ms: u64) -> impl Iterator<Item = (&str, u64)> + '_ {
        self.asks.iter().filter(move |(_, a)| a.until_ms > now_ms).map(|(sku, a)| (sku.as_str(), a.qty)).take(MAX_ONLINE_ASKS)
    }
}

/// The online channel `online` asked this tablet (through its uplink's reply) for `qty` units of
/// `sku`: what the tablet spares by the market's rebalancing policy, as for a peer's refill (no
/// customer waits at this till for it). 0 unless `online` is, by this tablet's ledger, the
/// market's online device and not revoked: a forged ask moves nothing.
pub fn spare_for_online(tablet: &Ledger, online: DeviceId, sku: &str, qty: u64, policy: &RebalancePolicy, now_ms: u64) -> u64 {
    let state = tablet.state();
    let is_online = state.devices.get(&online).is_some_and(|d| d.certificate.role == Role::Online && d.revoked_at_ms.is_none());
    let me = tablet.device();
    if !is_online || online == me {
        return 0;
    }
    let since = recent_sales_since_ms(now_ms);
    let give = policy.give(state.rights_of(sku, &me), qty, state.sales_of_device_since(&me, since), state.sales_of_device_since(&online, since), false);
    give.min(stallmesh_ledger::MAX_QTY)
}
