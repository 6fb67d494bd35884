//! Taking a tablet's own journal back from its peers after its store was lost (reset, reinstalled,
//! or set aside as damaged), before it records anything.
//!
//! A device's journal positions are its own to number. A tablet that started over at position 0
//! while its peers hold its old journal would sign a second history: every change of it would
//! conflict with what the market holds. So a node whose credentials were used before and whose
//! store is empty refuses to record until a peer has given its journal back; this module decides
//! when that has happened, from what the mesh reports. Pure: time comes in as `now_ms`.

use serde::Serialize;

/// After the first peer holding this device's journal is heard, wait this long for the others
/// before recording again: a peer reached a moment later may hold more of the journal, and a
/// position written before it arrives would be a second history. Two heartbeats plus a redial.
pub const RECOVERY_SETTLE_MS: u64 = 3_000;

/// Why the journal had to be recovered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecoveryCause {
    /// Credentials used before, empty store: the data directory was wiped or the tablet reinstalled.
    EmptyStore,
    /// The store was found damaged and set aside.
    StoreSetAside,
    /// A peer holds more of this device's journal than its store does (restored from an old copy).
    StaleStore,
    /// The tablet stopped while a recovery was under way: its store may hold part of the journal.
    Interrupted,
}

/// What one verified peer told of this device's journal: how many entries of it the peer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerView {
    pub entries_of_this_device: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Recovery {
    pub cause: RecoveryCause,
    pub since_ms: u64,
    /// When a peer holding this device's journal was first heard.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holder_heard_ms: Option<u64>,
    /// Entries of this device's journal held here now, and the most any peer reached holds.
    pub entries_recovered: u64,
    pub entries_held_by_peers: u64,
    pub peers_heard: usize,
    pub message: String,
}

/// What the node does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Wait,
    /// The journal is back (or never existed on any peer reached, see `Recovery::message`).
    Recovered {
        entries: u64,
    },
}

impl Recovery {
    pub fn new(cause: RecoveryCause, now_ms: u64) -> Self {
        let mut r = Recovery {
            cause,
            since_ms: now_ms,
            holder_heard_ms: None,
            entries_recovered: 0,
            entries_held_by_peers: 0,
            peers_heard: 0,
            message: String::new(),
        };
        r.message = r.describe();
        r
    }

    /// Called whenever the mesh has news (and on every tick): `own_entries` is how many entries of
    /// this device's journal the ledger holds, `peers` what each verified peer said it holds.
    pub fn step(&mut self, now_ms: u64, own_entries: u64, peers: &[PeerView]) -> Step {
        self.peers_heard = peers.len();
        self.entries_recovered = own_entries;
        self.entries_held_by_peers = peers.iter().map(|p| p.entries_of_this_device).max().unwrap_or(0).max(self.entries_held_by_peers);
        if self.entries_held_by_peers > 0 {
            self.holder_heard_ms.get_or_insert(now_ms);
        }
        self.message = self.describe();
        match self.holder_heard_ms {
            Some(heard) if own_entries >= self.entries_held_by_peers && now_ms.saturating_sub(heard) >= RECOVERY_SETTLE_MS => {
                Step::Recovered { entries: own_entries }
            }
            _ => Step::Wait,
        }
    }

    fn describe(&self) -> String {
        let lost = match self.cause {
            RecoveryCause::EmptyStore => "this tablet's store is empty but its credentials were used before (reset or reinstalled)",
            RecoveryCause::StoreSetAside => "this tablet's store was damaged and set aside",
            RecoveryCause::Interrupted => "this tablet stopped while it was taking its journal back",
            RecoveryCause::StaleStore => {
                "another tablet holds more of this device's journal than this tablet's store (restored from an old copy?)"
            }
        };
        let next = if self.entries_held_by_peers > 0 {
            format!(
                "taking this device's journal back from the market's other tablets ({} of {} entries so far); it records nothing until then",
                self.entries_recovered, self.entries_held_by_peers
            )
        } else if self.peers_heard > 0 {
            format!(
                "the {} tablet(s) reached hold none of this device's journal; if no other tablet does, have the organiser enrol this tablet afresh (a new device) and revoke the old one",
                self.peers_heard
            )
        } else {
            "waiting to reach another tablet of the market to take this device's journal back; keep it on the market's network. \
             If no other tablet holds its journal, have the organiser enrol this tablet afresh (a new device) and revoke the old one"
                .to_string()
        };
        format!("{lost}: {next}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holds(n: u64) -> PeerView {
        PeerView { entries_of_this_device: n }
    }

    #[test]
    fn recovery_waits_for_a_peer_that_holds_the_journal_then_for_all_of_it_then_settles() {
        let mut r = Recovery::new(RecoveryCause::EmptyStore, 0);
        assert_eq!(r.step(1_000, 0, &[]), Step::Wait, "no peer: wait");
        assert!(r.message.contains("waiting to reach"), "{}", r.message);
        assert_eq!(r.step(2_000, 0, &[holds(0)]), Step::Wait, "a peer without the journal is no recovery");
        assert!(r.message.contains("hold none"), "{}", r.message);
        assert_eq!(r.step(3_000, 2, &[holds(0), holds(5)]), Step::Wait, "catching up");
        assert!(r.message.contains("2 of 5"), "{}", r.message);
        assert_eq!(r.step(4_000, 5, &[holds(5)]), Step::Wait, "complete, but other tablets may hold more");
        assert_eq!(r.step(3_000 + RECOVERY_SETTLE_MS - 1, 5, &[holds(5)]), Step::Wait);
        assert_eq!(r.step(3_000 + RECOVERY_SETTLE_MS, 5, &[holds(5)]), Step::Recovered { entries: 5 });
    }

    #[test]
    fn a_store_behind_its_peers_says_so() {
        let r = Recovery::new(RecoveryCause::StaleStore, 0);
        assert!(r.message.contains("restored from an old copy"), "{}", r.message);
    }

    #[test]
    fn the_most_any_peer_ever_held_must_be_recovered_even_if_that_peer_left() {
        let mut r = Recovery::new(RecoveryCause::StoreSetAside, 0);
        r.step(0, 0, &[holds(3), holds(7)]);
        assert_eq!(r.step(RECOVERY_SETTLE_MS * 2, 3, &[holds(3)]), Step::Wait, "7 entries exist somewhere");
        assert_eq!(r.step(RECOVERY_SETTLE_MS * 3, 7, &[holds(3)]), Step::Recovered { entries: 7 });
    }
}
