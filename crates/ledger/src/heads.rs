//! [`Heads`]: the version vector of the journals a replica holds, indexed by when each grew.

use stallmesh_identity::DeviceId;
use std::collections::{BTreeMap, HashMap};

/// For each device, the journal entries a replica holds (= the next seq it expects), with their
/// total kept alongside: heads only grow, so an unchanged total means unchanged heads.
///
/// Each device is also indexed by the total at which its entry last grew, so "which devices changed
/// since total T" costs the number of changes, not the number of devices: in a 1,000-device market
/// one sale changes one entry, and the sync core must not walk all 1,000 for every peer.
#[derive(Clone, Default)]
pub struct Heads {
    map: BTreeMap<DeviceId, u64>,
    total: u64,
    /// Total right after the device's entry last grew → the device and its entry (then and now).
    /// Totals only grow, so keys are unique.
    by_change: BTreeMap<u64, (DeviceId, u64)>,
    /// Device → its entry and its key in `by_change`: a point lookup in one probe, where the sorted
    /// map walks three nodes of 32-byte keys (the sync core looks up every device a peer's heads name).
    index: HashMap<DeviceId, (u64, u64)>,
}

/// The entries and their total: the indexes are derived from them, and the hash index's order is
/// random per process, so it stays out of anything printed.
impl std::fmt::Debug for Heads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Heads").field("map", &self.map).field("total", &self.total).finish()
    }
}

impl PartialEq for Heads {
    fn eq(&self, other: &Self) -> bool {
        self.map == other.map // the same entries, whatever order they arrived in
    }
}

impl Eq for Heads {}

impl Heads {
    /// The entries held of `device`'s journal (shadows the sorted map's `get`: same answer, one probe).
    pub fn get(&self, device: &DeviceId) -> Option<&u64> {
        self.index.get(device).map(|(n, _)| n)
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// The devices whose entry grew after the heads' total was `total`, with their current entry,
    /// most recently changed last.
    pub fn changed_since(&self, total: u64) -> impl Iterator<Item = (&DeviceId, u64)> + '_ {
        let start = total.saturating_add(1);
        // Nothing grew since `total` (a peer served a moment ago): no search down the index.
        let changed = (start <= self.total).then(|| self.by_change.range(start..));
        changed.into_iter().flatten().map(|(_, (d, n))| (d, *n))
    }

    pub(crate) fn set(&mut self, device: DeviceId, next: u64) {
        let old = self.get(&device).copied().unwrap_or(0);
        assert!(next >= old, "heads only grow: {device:?} from {old} to {next}");
        if next == old {
            return;
        }
        self.map.insert(device, next);
        self.total += next - old;
        if let Some((_, at)) = self.index.insert(device, (next, self.total)) {
            self.by_change.remove(&at);
        }
        self.by_change.insert(self.total, (device, next));
        // One change index entry per device, and the total is the sum of the entries (O(devices),
        // debug builds only).
        debug_assert_eq!(self.by_change.len(), self.map.len());
        debug_assert_eq!(self.index.len(), self.map.len());
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

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Whatever order journals grow in, the one-probe `get` and `changed_since` answer as the
        /// sorted map and a log of every growth do.
        #[test]
        fn lookups_and_changes_since_agree_with_the_sorted_entries(
            growth in proptest::collection::vec((0u8..12, 1u64..4), 0..80),
            since in 0u64..200,
        ) {
            let mut heads = Heads::default();
            let mut log: Vec<(u64, DeviceId)> = Vec::new(); // (total after, device)
            for (d, by) in growth {
                let device = DeviceId([d; 32]);
                let next = heads.get(&device).copied().unwrap_or(0) + by;
                heads.set(device, next);
                log.push((heads.total(), device));
                for probe in 0u8..14 {
                    let probe = DeviceId([probe; 32]);
                    proptest::prop_assert_eq!(heads.get(&probe), heads.map.get(&probe));
                }
            }
            // Reference: each device whose last growth came after `since`, oldest change first.
            let mut expected: Vec<(DeviceId, u64)> = Vec::new();
            for (i, (at, d)) in log.iter().enumerate() {
                let last = !log[i + 1..].iter().any(|(_, later)| later == d);
                if last && *at > since {
                    expected.push((*d, heads.map[d]));
                }
            }
            let changed: Vec<(DeviceId, u64)> = heads.changed_since(since).map(|(d, n)| (*d, n)).collect();
            proptest::prop_assert_eq!(changed, expected);
        }
    }
}
