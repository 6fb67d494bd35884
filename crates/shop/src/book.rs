//! The holds a batch of checkout decisions weighs. A driver decides several buyers' requests
//! under one lock and commits them in one transaction (group commit): it reads once what the
//! whole batch needs ([`HoldsWanted`]), and each decision then sees the holds the ones before it
//! placed or paid ([`HoldBook`]).

use crate::{Hold, HoldsView};
use std::collections::{BTreeMap, BTreeSet};

/// Which stored holds a batch of decisions reads: those named by id (a retried request, a
/// payment), every held hold of the SKUs it sells (what they reserve), and every hold of its
/// buyers in its drops (the per-buyer limit).
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

    /// Whether a store returns `h` for this read at `now_ms` (a store may return more: the
    /// decisions only weigh what matters to them).
    pub fn wants(&self, h: &Hold, now_ms: u64) -> bool {
        self.ids.contains(&h.id)
            || (self.skus.contains(&h.sku) && h.sale.is_none() && h.expires_ms > now_ms)
            || self.buyers.iter().any(|(d, b)| *d == h.drop && *b == h.buyer)
    }
}

/// The holds read for a batch, and those it placed or paid since: the next decision's view.
#[derive(Debug, Clone, Default)]
pub struct HoldBook {
    holds: BTreeMap<String, Hold>,
    changed: BTreeSet<String>,
}

impl HoldBook {
    /// The book of what the store returned for a [`HoldsWanted`].
    pub fn read(holds: impl IntoIterator<Item = Hold>) -> Self {
        HoldBook { holds: holds.into_iter().map(|h| (h.id.clone(), h)).collect(), changed: BTreeSet::new() }
    }

    pub fn get(&self, id: &str) -> Option<&Hold> {
        self.holds.get(id)
    }

    /// What a decision on (`sku`, `drop`, `buyer`) weighs now.
    pub fn view(&self, sku: &str, drop: &str, buyer: &str, now_ms: u64) -> HoldsView {
        HoldsView::of(self.holds.values(), sku, drop, buyer, now_ms)
    }

    /// A hold placed or paid by this batch: later decisions see it, and the driver writes it.
    pub fn put(&mut self, hold: Hold) {
        self.changed.insert(hold.id.clone());
        self.holds.insert(hold.id.clone(), hold);
    }

    /// The holds to write with the batch's commit.
    pub fn changed(&self) -> Vec<Hold> {
        self.changed.iter().filter_map(|id| self.holds.get(id)).cloned().collect()
    }
}
