//! The commit pipeline: every entry the runtime commits (recorded here or applied from a peer) is
//! published, in commit order, after its commit; the mesh, the inference index and later
//! subscribers (cloud uplink, the page's event stream) subscribe instead of polling the ledger or
//! being called by the runtime.
//!
//! Bounded: a subscriber that falls more than [`COMMIT_PIPELINE_CAPACITY`] commits behind is told
//! how many it missed (`Lagged`), counts it, and resynchronises from the ledger itself; a commit is
//! never held up by a slow subscriber.
//!
//! Read-your-writes: each commit has a number; a subscriber that derives state (the search index)
//! publishes the number it has taken in ([`Progress`]), so a request can wait until what it just
//! committed shows up there before it returns.

use stallmesh_identity::SignedChange;
use stallmesh_ledger::Entry;
use std::sync::Arc;
use tokio::sync::{broadcast, watch};

/// Commits held for subscribers: a remote batch is one commit of up to thousands of entries, so
/// this is minutes of a busy market; a commit holding a photo is ~100 KB, so the ring stays below
/// ~100 MB even if every held commit were a photo.
pub const COMMIT_PIPELINE_CAPACITY: usize = 1_024;

/// Where the entries of a commit were made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOrigin {
    /// Recorded by this device (durable before it was published).
    Local,
    /// Applied from a peer or a tool (appended; made durable within a tick).
    Remote,
}

/// One commit, as subscribers see it.
#[derive(Debug)]
pub struct Commit {
    /// Increases by one per commit, from 1.
    pub number: u64,
    pub origin: CommitOrigin,
    /// The entries made in this commit, in commit order (may be empty when only evidence came).
    pub entries: Vec<Entry>,
    /// Conflicting changes kept as evidence with this commit (with the change held at each
    /// position), to be passed on to peers.
    pub evidence: Vec<SignedChange>,
}

/// The runtime's end of the pipeline. Publishing happens under the ledger lock, so numbers follow
/// commit order.
pub struct Publisher {
    tx: broadcast::Sender<Arc<Commit>>,
    last: u64,
}

impl Default for Publisher {
    fn default() -> Self {
        let (tx, _) = broadcast::channel(COMMIT_PIPELINE_CAPACITY);
        Publisher { tx, last: 0 }
    }
}

impl Publisher {
    /// Publishes a commit; returns its number. Nobody subscribed is fine (a node without a mesh).
    pub fn publish(&mut self, origin: CommitOrigin, entries: Vec<Entry>, evidence: Vec<SignedChange>) -> u64 {
        self.last = self.last.checked_add(1).expect("commit numbers do not run out");
        let _ = self.tx.send(Arc::new(Commit { number: self.last, origin, entries, evidence }));
        self.last
    }

    /// The number of the last commit published.
    pub fn last(&self) -> u64 {
        self.last
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Commit>> {
        self.tx.subscribe()
    }
}

/// How far a subscriber has taken in the pipeline, for requests that wait to read their own write.
#[derive(Clone)]
pub struct Progress(Arc<watch::Sender<u64>>);

impl Default for Progress {
    fn default() -> Self {
        Progress(Arc::new(watch::Sender::new(0)))
    }
}

impl Progress {
    /// Everything up to commit `number` is taken in (never moves back).
    pub fn done_through(&self, number: u64) {
        self.0.send_if_modified(|n| {
            let moved = number > *n;
            *n = (*n).max(number);
            moved
        });
    }

    pub fn through(&self) -> u64 {
        *self.0.borrow()
    }

    /// Waits until commit `number` is taken in, at most `timeout_ms`; false if it was not in time.
    pub async fn wait_for(&self, number: u64, timeout_ms: u64) -> bool {
        let mut rx = self.0.subscribe();
        let reached =
            matches!(tokio::time::timeout(std::time::Duration::from_millis(timeout_ms), rx.wait_for(|n| *n >= number)).await, Ok(Ok(_)));
        reached
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiter_wakes_when_its_commit_is_taken_in_and_not_before() {
        let p = Progress::default();
        assert!(!p.wait_for(2, 20).await, "nothing taken in yet");
        p.done_through(1);
        assert!(!p.wait_for(2, 20).await, "commit 1 is not commit 2");
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move { p.wait_for(2, 5_000).await })
        };
        p.done_through(3);
        assert!(waiter.await.unwrap());
        p.done_through(2);
        assert_eq!(p.through(), 3, "progress never moves back");
    }

    #[test]
    fn a_subscriber_that_falls_behind_is_told_how_many_commits_it_missed() {
        let mut publisher = Publisher::default();
        let mut rx = publisher.subscribe();
        for _ in 0..COMMIT_PIPELINE_CAPACITY + 5 {
            publisher.publish(CommitOrigin::Remote, Vec::new(), Vec::new());
        }
        assert!(matches!(rx.try_recv(), Err(broadcast::error::TryRecvError::Lagged(5))));
        assert_eq!(rx.try_recv().unwrap().number, 6, "it resumes at the oldest commit still held");
        assert_eq!(publisher.last(), COMMIT_PIPELINE_CAPACITY as u64 + 5);
    }
}
