//! Cloud reconciliation as sans-IO state machines.
//!
//! **The cloud is one more peer.** For each market it holds a device of its own (enrolled by the
//! organiser with role `cloud`) and a real [`Ledger`] for it, so a change is accepted by the cloud
//! if and only if a tablet's ledger would accept it: nothing of verification is written twice.
//! What the cloud lacks is a version vector ([`Heads`]); an upload is exactly the missing changes
//! ([`stallmesh_sync::missing`]), carried in the sync protocol's own messages ([`wire`]).
//!
//! - [`MarketIngest`] (this file): per market, the accepted changes in one total order with gapless
//!   offsets 1, 2, 3, …, each (device, seq) once; rejections with their reason; and the cloud's
//!   watermark, recorded as a signed journal event of the cloud's own device
//!   ([`EventBody::CloudHolds`]) so it reaches every tablet through whichever one uploads.
//! - [`uplink::Uplink`]: what a tablet sends the cloud next, and when (bounded batches, backoff with
//!   jitter, resuming from the cloud's heads).
//! - [`wire`]: the request and reply bodies and the request signature's headers.
//!
//! Nothing here reads a clock or touches a socket, file or executor: the cloud service
//! (`stallmesh-cloud`), the node's uplink and the simulator drive this same code.

pub mod uplink;
pub mod wire;

use stallmesh_identity::{Certificate, DeviceId, DeviceKey, Dot, SignedChange};
use stallmesh_ledger::{Entry, EventBody, Heads, Ledger, LedgerError, LocalOp, MarketContext, RestoreError, MAX_WATERMARK_DEVICES};
use stallmesh_sync::ChangeLog;
use std::collections::BTreeMap;

/// The cloud records a watermark at most this often while changes arrive: often enough that a
/// tablet's "uploaded up to" is seconds old, rarely enough that watermarks stay a small share of
/// the log. At 2 s a quiet market logged about one watermark per sale (every tablet verifies and
/// stores each); at 10 s a market selling every few seconds logs one per several sales.
pub const DEFAULT_WATERMARK_INTERVAL_MS: u64 = 10_000;
/// Rejections returned in one reply (each also counted): a batch of forgeries cannot make the
/// reply larger than the batch.
pub const MAX_REJECTIONS_LISTED: usize = stallmesh_sync::MAX_CHANGES_PER_MESSAGE;

/// One entry of a market's reconciled log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// Position in the market's log: 1, 2, 3, … without gaps.
    pub offset: u64,
    pub entry: Entry,
}

/// A change the cloud refused, with the ledger's reason (`reason` is the stable metric label).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RejectedChange {
    pub device: DeviceId,
    pub seq: u64,
    pub reason: String,
    pub message: String,
}

/// What one call to [`MarketIngest::ingest`] or [`MarketIngest::tick`] produced. The driver commits
/// `records` (and `rejected`, `evidence`) in one transaction **before** answering anyone; if that
/// fails it must drop this `MarketIngest` and rebuild it from its store, since the ledger in memory
/// already holds them.
#[derive(Debug, Default)]
pub struct Batch {
    pub records: Vec<LogRecord>,
    /// Already in the log, byte for byte (another tablet or a retry uploaded them first).
    pub duplicates: u64,
    /// Held in memory until a gap or a dependency arrives; never logged until applied.
    pub pending: u64,
    pub rejected: Vec<RejectedChange>,
    /// Validly signed changes contradicting the log (a cloned tablet): kept as evidence, not logged.
    pub evidence: Vec<SignedChange>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IngestError {
    #[error("the market's log does not restore: {0}")]
    Restore(#[from] RestoreError),
    #[error("log offsets jump from {expected} to {found}")]
    OffsetGap { expected: u64, found: u64 },
    #[error("the cloud device of this market cannot record: {0}")]
    CloudDevice(#[from] LedgerError),
    #[error("the log written by another process does not apply here: {0}")]
    Diverged(String),
}

/// Counters the driver exports as metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct IngestStats {
    pub accepted: u64,
    pub duplicates: u64,
    pub rejected: BTreeMap<String, u64>,
    pub watermarks: u64,
}

/// One market's reconciled log, as the cloud's own device of that market holds it.
pub struct MarketIngest {
    ledger: Ledger,
    /// The offset the next logged change gets; the log holds `next_offset - 1` entries.
    next_offset: u64,
    watermark_interval_ms: u64,
    /// When the last watermark was recorded, and the heads total (others' changes) it covered.
    last_watermark: Option<(u64, u64)>,
    /// Changes the ledger applied that are not in the log yet (pending ones that another process's
    /// log released during [`MarketIngest::catch_up`]): logged first by the next batch.
    unlogged: Vec<Entry>,
    stats: IngestStats,
}

impl MarketIngest {
    /// A market the cloud has just registered: its log starts with the cloud device's enrolment.
    pub fn create(ctx: MarketContext, key: DeviceKey, certificate: Certificate, now_ms: u64) -> Result<(Self, Batch), IngestError> {
        assert_eq!(certificate.role, stallmesh_identity::Role::Cloud, "the driver checks the role before creating");
        let mut ledger = Ledger::new(ctx, key, certificate);
        let enrolment = ledger.enrol_self(now_ms)?.ok_or_else(|| IngestError::Diverged("a fresh ledger already enrolled".into()))?;
        let mut ingest = Self::empty(ledger);
        let mut batch = Batch::default();
        ingest.log(&mut batch, enrolment);
        Ok((ingest, batch))
    }

    /// Rebuilds from the log a store returns, in offset order (every record was verified before
    /// it was logged).
    pub fn restore(
        ctx: MarketContext,
        key: DeviceKey,
        certificate: Certificate,
        records: impl IntoIterator<Item = LogRecord>,
    ) -> Result<Self, IngestError> {
        let mut expected = 1u64;
        let mut entries = Vec::new();
        let mut last_mark = None;
        let me = key.device_id();
        for r in records {
            if r.offset != expected {
                return Err(IngestError::OffsetGap { expected, found: r.offset });
            }
            expected += 1;
            if r.entry.change.device == me && matches!(r.entry.event.body, EventBody::CloudHolds { .. }) {
                last_mark = Some(r.entry.event.time_ms);
            }
            entries.push(r.entry);
        }
        let ledger = Ledger::restore(ctx, key, certificate, entries)?;
        let mut ingest = Self::empty(ledger);
        ingest.next_offset = expected;
        // What the last watermark covered is not known without decoding it: cover again when due.
        ingest.last_watermark = last_mark.map(|t| (t, u64::MAX));
        Ok(ingest)
    }

    fn empty(ledger: Ledger) -> Self {
        Self {
            ledger,
            next_offset: 1,
            watermark_interval_ms: DEFAULT_WATERMARK_INTERVAL_MS,
            last_watermark: None,
            unlogged: Vec::new(),
            stats: IngestStats::default(),
        }
    }

    pub fn with_watermark_interval_ms(mut self, interval_ms: u64) -> Self {
        self.watermark_interval_ms = interval_ms;
        self
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }
    pub fn heads(&self) -> &Heads {
        self.ledger.heads_ref()
    }
    /// Entries in the log.
    pub fn offset(&self) -> u64 {
        self.next_offset - 1
    }
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }
    pub fn stats(&self) -> &IngestStats {
        &self.stats
    }
    pub fn cloud_device(&self) -> DeviceId {
        self.ledger.device()
    }

    /// Takes in records another process appended to the shared log (offsets from
    /// [`MarketIngest::next_offset`] on, in order), before this one appends under the same lock.
    pub fn catch_up(&mut self, records: Vec<LogRecord>) -> Result<(), IngestError> {
        for (i, r) in records.iter().enumerate() {
            let expected = self.next_offset + i as u64;
            if r.offset != expected {
                return Err(IngestError::OffsetGap { expected, found: r.offset });
            }
        }
        let logged: BTreeMap<Dot, stallmesh_identity::ChangeDigest> =
            records.iter().map(|r| (r.entry.change.dot(), r.entry.change.digest())).collect();
        let n = records.len() as u64;
        let report = self.ledger.apply_remote(records.into_iter().map(|r| r.entry.change));
        if let Some((dot, why)) = report.rejected.first() {
            return Err(IngestError::Diverged(format!("{}:{} refused: {why}", dot.device, dot.seq)));
        }
        // Every logged change is now held here, byte for byte (some may have waited in this
        // ledger's pending buffer and count as duplicates there).
        if let Some((dot, _)) = logged.iter().find(|(dot, digest)| self.ledger.held_digest(**dot) != Some(**digest)) {
            return Err(IngestError::Diverged(format!("{}:{} from the log is not held after catching up", dot.device, dot.seq)));
        }
        for e in report.applied {
            if !logged.contains_key(&e.change.dot()) {
                // A change pending here that the other process's records released.
                self.unlogged.push(e);
            }
        }
        self.next_offset += n;
        self.unlogged.retain(|e| !logged.contains_key(&e.change.dot()));
        Ok(())
    }

    /// Verifies `changes` with the market's ledger and logs what it applies, in the order applied
    /// (a causal order); then records a watermark if one is due.
    pub fn ingest(&mut self, changes: Vec<SignedChange>, now_ms: u64) -> Batch {
        let mut batch = Batch::default();
        for e in std::mem::take(&mut self.unlogged) {
            self.log(&mut batch, e);
        }
        let report = self.ledger.apply_remote(changes);
        for e in report.applied {
            self.log(&mut batch, e);
        }
        batch.duplicates = report.duplicates as u64;
        batch.pending = report.pending as u64;
        batch.evidence = report.evidence;
        self.stats.duplicates += batch.duplicates;
        for (dot, why) in report.rejected {
            *self.stats.rejected.entry(why.label().to_string()).or_default() += 1;
            if batch.rejected.len() < MAX_REJECTIONS_LISTED {
                batch.rejected.push(RejectedChange { device: dot.device, seq: dot.seq, reason: why.label().into(), message: why.to_string() });
            }
        }
        if self.watermark_due(now_ms) {
            self.record_watermark(&mut batch, now_ms);
        }
        batch
    }

    /// The changes of others this log holds (its own watermarks excluded).
    fn others_total(&self) -> u64 {
        let own = self.heads().get(&self.cloud_device()).copied().unwrap_or(0);
        self.heads().total() - own
    }

    fn watermark_due(&self, now_ms: u64) -> bool {
        match self.last_watermark {
            None => true,
            Some((at_ms, covered)) => covered != self.others_total() && now_ms >= at_ms.saturating_add(self.watermark_interval_ms),
        }
    }

    /// When [`MarketIngest::tick`] next has something to do: a watermark not yet recorded for
    /// changes logged since the last one.
    pub fn poll_timeout(&self) -> Option<u64> {
        match self.last_watermark {
            None => Some(0),
            Some((at_ms, covered)) if covered != self.others_total() => Some(at_ms.saturating_add(self.watermark_interval_ms)),
            Some(_) => None,
        }
    }

    /// Records a due watermark; `None` when nothing is due.
    pub fn tick(&mut self, now_ms: u64) -> Option<Batch> {
        if !self.watermark_due(now_ms) && self.unlogged.is_empty() {
            return None;
        }
        Some(self.ingest(Vec::new(), now_ms))
    }

    fn record_watermark(&mut self, batch: &mut Batch, now_ms: u64) {
        let me = self.cloud_device();
        let covered = self.others_total();
        // Only what grew since the last watermark: the ledger's fold of this cloud device's own
        // watermarks is what every replica holds of them (after a restart too, since the log
        // restores it), so the merge on a tablet gives the cloud's full heads.
        let said = self.ledger.state().cloud_watermarks.get(&me).map(|w| &w.heads);
        let mut heads: Vec<(DeviceId, u64)> = self
            .heads()
            .iter()
            .filter(|(d, n)| **d != me && said.and_then(|h| h.get(*d)) != Some(*n))
            .map(|(d, n)| (*d, *n))
            .collect();
        // More devices grew than one watermark may list (a first watermark of a huge market): the
        // rest go in the next, due one interval later.
        let covered = if heads.len() > MAX_WATERMARK_DEVICES {
            heads.truncate(MAX_WATERMARK_DEVICES);
            u64::MAX
        } else {
            covered
        };
        if heads.is_empty() {
            // Restored from the log, the core re-covers when due; nothing grew since the last one.
            self.last_watermark = Some((now_ms, covered));
            return;
        }
        let op = LocalOp::RecordCloudHolds { offset: self.offset(), heads };
        match self.ledger.record(op, now_ms) {
            Ok(entry) => {
                self.log(batch, entry);
                self.last_watermark = Some((now_ms, covered));
                self.stats.watermarks += 1;
            }
            // A revoked or expired cloud device: the log goes on without watermarks, and says why
            // once per interval.
            Err(e) => {
                tracing::error!(error = %e, "the cloud cannot record its watermark");
                self.last_watermark = Some((now_ms, covered));
            }
        }
    }

    fn log(&mut self, batch: &mut Batch, entry: Entry) {
        let offset = self.next_offset;
        self.next_offset += 1;
        self.stats.accepted += 1;
        batch.records.push(LogRecord { offset, entry });
        debug_assert!(batch.records.windows(2).all(|w| w[1].offset == w[0].offset + 1), "offsets are gapless");
    }

    /// What a peer holding `theirs` lacks of this log, within the sync message limits.
    pub fn missing_for(&self, theirs: &BTreeMap<DeviceId, u64>, log: &impl ChangeLog) -> Result<(Vec<SignedChange>, bool), String> {
        stallmesh_sync::missing(
            self.heads(),
            theirs,
            log,
            stallmesh_sync::MAX_CHANGES_PER_MESSAGE,
            stallmesh_sync::MAX_CHANGE_BYTES_PER_MESSAGE,
        )
    }
}

#[cfg(test)]
mod tests;
