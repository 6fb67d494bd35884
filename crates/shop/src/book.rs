//! The holds a batch of checkout decisions weighs. A driver decides several buyers' requests
//! under one lock and commits them in one transaction (group commit): it reads once what the
//! whole batch needs ([`HoldsWanted`] → [`HoldsRead`]), and each decision then sees the holds the
//! ones before it placed or paid ([`HoldBook`]).

use crate::{Hold, HoldStatus, HoldsView};
use std::collections::{BTreeMap, BTreeSet};

/// What a batch of decisions reads: the holds named by id (a retried request, a payment), what
/// the held holds of its SKUs reserve, and what its buyers have in its drops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HoldsWanted {
    pub ids: BTreeSet<String>,
    pub skus: BTreeSet<String>,
    /// (drop, buyer).
    pub buyers: BTreeSet<(String, String)>,
}

impl HoldsWanted {
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.skus.is_empty() && self.buyers.is_empty()
    }
}

/// What a store read for a [`HoldsWanted`] at one instant: sums, not rows, so a drop with
/// thousands of open baskets costs one row per SKU.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HoldsRead {
    /// The holds named by id that exist.
    pub holds: Vec<Hold>,
    /// SKU → units in held holds (unpaid, unexpired), and the earliest of their expiries.
    pub held: BTreeMap<String, (u64, Option<u64>)>,
    /// (drop, buyer) → units in the buyer's held or paid holds of the drop.
    pub buyers: BTreeMap<(String, String), u64>,
}

impl HoldsRead {
    /// The read, from every hold of the market (a store that scans them).
    pub fn of<'a>(all: impl IntoIterator<Item = &'a Hold>, wanted: &HoldsWanted, now_ms: u64) -> Self {
        let mut read = HoldsRead::default();
        for h in all {
            if wanted.ids.contains(&h.id) {
                read.holds.push(h.clone());
            }
            let status = h.status(now_ms);
            if status == HoldStatus::Held && wanted.skus.contains(&h.sku) {
                let e = read.held.entry(h.sku.clone()).or_insert((0, None));
                e.0 = e.0.saturating_add(h.qty);
                e.1 = Some(e.1.map_or(h.expires_ms, |t| t.min(h.expires_ms)));
            }
            let key = (h.drop.clone(), h.buyer.clone());
            if status != HoldStatus::Expired && wanted.buyers.contains(&key) {
                let units = read.buyers.entry(key).or_default();
                *units = units.saturating_add(h.qty);
            }
        }
        read
    }
}

/// What was read for a batch, kept up to date as its decisions place and pay holds: the next
/// decision's view, and the holds the driver writes with the batch.
#[derive(Debug, Clone, Default)]
pub struct HoldBook {
    now_ms: u64,
    by_id: BTreeMap<String, Hold>,
    held: BTreeMap<String, (u64, Option<u64>)>,
    buyers: BTreeMap<(String, String), u64>,
    changed: BTreeSet<String>,
}

impl HoldBook {
    /// The book of a read made at `now_ms` (every decision of the batch is made at that instant).
    pub fn read(read: HoldsRead, now_ms: u64) -> Self {
        HoldBook {
            now_ms,
            by_id: read.holds.into_iter().map(|h| (h.id.clone(), h)).collect(),
            held: read.held,
            buyers: read.buyers,
            changed: BTreeSet::new(),
        }
    }

    pub fn get(&self, id: &str) -> Option<&Hold> {
        self.by_id.get(id)
    }

    /// What a decision on (`sku`, `drop`, `buyer`) weighs.
    pub fn view(&self, sku: &str, drop: &str, buyer: &str) -> HoldsView {
        let (held_units, next_expiry_ms) = self.held.get(sku).copied().unwrap_or((0, None));
        let buyer_units = self.buyers.get(&(drop.to_string(), buyer.to_string())).copied().unwrap_or(0);
        HoldsView { held_units, buyer_units, next_expiry_ms }
    }

    /// A hold placed or paid by this batch (its earlier version, if any, was read by id or put
    /// before): later decisions see it, and the driver writes it.
    pub fn put(&mut self, hold: Hold) {
        let now = self.now_ms;
        let before = self.by_id.get(&hold.id);
        debug_assert!(before.is_none_or(|b| b.sku == hold.sku && b.qty == hold.qty), "a hold changes only by being paid");
        let reserved = |h: Option<&Hold>| h.map_or(0, |h| h.reserves(now));
        let counted = |h: Option<&Hold>| h.map_or(0, |h| if h.status(now) == HoldStatus::Expired { 0 } else { h.qty });
        let (reserved_before, counted_before) = (reserved(before), counted(before));
        let (reserved_after, counted_after) = (reserved(Some(&hold)), counted(Some(&hold)));
        let held = self.held.entry(hold.sku.clone()).or_insert((0, None));
        held.0 = held.0.saturating_sub(reserved_before).saturating_add(reserved_after);
        if reserved_after > 0 {
            held.1 = Some(held.1.map_or(hold.expires_ms, |t| t.min(hold.expires_ms)));
        }
        let units = self.buyers.entry((hold.drop.clone(), hold.buyer.clone())).or_default();
        *units = units.saturating_sub(counted_before).saturating_add(counted_after);
        self.changed.insert(hold.id.clone());
        self.by_id.insert(hold.id.clone(), hold);
    }

    /// The holds to write with the batch's commit.
    pub fn changed(&self) -> Vec<Hold> {
        self.changed.iter().filter_map(|id| self.by_id.get(id)).cloned().collect()
    }
}
