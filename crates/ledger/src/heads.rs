//! [`Heads`]: the version vector of the journals a replica holds, indexed by when each grew.

use stallmesh_identity::DeviceId;
use std::collections::BTreeMap;

/// For each device, the journal entries a replica holds (= the next seq it expects), with their
/// total kept alongside: heads only grow, so an unchanged total means unchanged heads.
///
/// Each device is also indexed by the total at which its entry last grew, so "which devices changed
/// since total T" costs the number of changes, not the number of devices: in a 1,000-device market
/// one sale changes one entry, and the sync core must not walk all 1,000 for every peer.
#[derive(Debug, Clone, Default)]
pub struct Heads {
    map: BTreeMap<DeviceId, u64>,
    total: u64,
    /// Total right after the device's entry last grew → the device. Totals only grow, so keys are unique.
    by_change: BTreeMap<u64, DeviceId>,
    changed_at: BTreeMap<DeviceId, u64>,
}

impl PartialEq for Heads {
    fn eq(&self, other: &Self) -> bool {
        self.map == other.map // the same entries, whatever order they arrived in
    }
}

impl Eq for Heads {}

impl Heads {
    pub fn total(&self) -> u64 {
        self.total
    }

    /// The devices whose entry grew after the heads' total was `total`, with their current entry,
    /// most recently changed last.
    pub fn changed_since(&self, total: u64) -> impl Iterator<Item = (&DeviceId, u64)> + '_ {
        let start = total.saturating_add(1);
        // Nothing grew since `total` (a peer served a moment ago): no search down the index.
        let changed = (start <= self.total).then(|| self.by_change.range(start..));
        changed.into_iter().flatten().map(|(_, d)| (d, self.map.get(d).copied().unwrap_or(0)))
    }

    pub(crate) fn set(&mut self, device: DeviceId, next: u64) {
        let old = self.map.get(&device).copied().unwrap_or(0);
        assert!(next >= old, "heads only grow: {device:?} from {old} to {next}");
        if next == old {
            return;
        }
        self.map.insert(device, next);
        self.total += next - old;
        if let Some(at) = self.changed_at.insert(device, self.total) {
            self.by_change.remove(&at);
        }
        self.by_change.insert(self.total, device);
        // One change index entry per device, and the total is the sum of the entries (O(devices),
        // debug builds only).
        debug_assert_eq!(self.by_change.len(), self.map.len());
        debug_assert_eq!(self.changed_at.len(), self.map.len());
        debug_assert_eq!(self.total, self.map.values().sum::<u64>(), "heads total is the sum of its entries");
    }
}

impl std::ops::Deref for Heads {
    type Target = BTreeMap<DeviceId, u64>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl FromIterator<(DeviceId, u64)> for Heads {
    fn from_iter<I: IntoIterator<Item = (DeviceId, u64)>>(iter: I) -> Self {
        let mut h = Heads::default();
        for (d, n) in iter {
            h.set(d, n);
        }
        h
    }
}
