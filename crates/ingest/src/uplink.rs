//! The uplink core: what a tablet sends its cloud next, and when.
//!
//! A tablet holds the whole market's ledger, so it uploads what the cloud lacks of **every**
//! device's journal: one tablet with 4G is enough for the market. The cloud's heads say what it
//! lacks; uploads are bounded batches ([`stallmesh_sync::missing`]); a failure backs off
//! exponentially with jitter and, since the cloud may have moved meanwhile (other tablets upload
//! too), the next attempt starts again from the cloud's heads.

use crate::wire::CloudReply;
use crate::RejectedChange;
use stallmesh_identity::{DeviceId, SignedChange};
use stallmesh_ledger::Heads;
use stallmesh_sync::{ChangeLog, Message, MAX_CHANGES_PER_MESSAGE, MAX_CHANGE_BYTES_PER_MESSAGE};
use std::collections::BTreeMap;

/// First retry after a failure; doubles per failure up to [`BACKOFF_MAX_MS`].
pub const BACKOFF_BASE_MS: u64 = 500;
/// Longest wait between attempts: a tablet whose 4G came back uploads within half a minute.
pub const BACKOFF_MAX_MS: u64 = 30_000;
/// With nothing to upload, ask the cloud's heads this often: other tablets' uploads and the cloud's
/// watermark come back this way, so a tablet whose own uploads are done still learns them.
pub const HEADS_REFRESH_MS: u64 = 5_000;
/// Changes in one upload: one sync message.
pub const UPLOAD_MAX_CHANGES: usize = MAX_CHANGES_PER_MESSAGE;
pub const UPLOAD_MAX_BYTES: usize = MAX_CHANGE_BYTES_PER_MESSAGE;

/// SKUs a tablet may be waiting on the online channel for at once: a till short of a drop's units
/// asks for one SKU at a time; beyond this, an older ask is replaced (counted).
pub const MAX_RIGHTS_ASKS: usize = 16;
/// A reply within this long counts as a live uplink: a till may wait on the online channel (three
/// heads refreshes, so one lost request does not end it).
pub const LIVE_UPLINK_MS: u64 = 15_000;
const _: () = assert!(LIVE_UPLINK_MS >= 2 * HEADS_REFRESH_MS);

/// The ledger's refusal labels that pass with time (`Rejection::label`): the cloud's pending
/// buffer was full, or it had not seen the author's enrolment yet.
pub const TEMPORARY_REFUSALS: [&str; 2] = ["pending_full", "unenrolled"];

/// A request for the driver to send (then call [`Uplink::on_reply`], [`Uplink::on_rejected`] or
/// [`Uplink::on_failure`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// A sync protocol message ([`Message::encode`]).
    pub body: Vec<u8>,
    /// Changes it uploads (0 for a heads request).
    pub changes: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UplinkStats {
    pub requests: u64,
    pub failures: u64,
    pub changes_uploaded: u64,
    pub bytes_uploaded: u64,
    pub changes_downloaded: u64,
    pub rejected: u64,
    /// Asks for the online channel's units sent, and those dropped at [`MAX_RIGHTS_ASKS`].
    pub rights_asked: u64,
    pub rights_asks_dropped: u64,
    /// Duplicates the cloud reported: another tablet (or a lost reply's retry) uploaded them first.
    pub duplicates: u64,
}

#[derive(Debug, Clone)]
pub struct Uplink {
    /// What the cloud said it holds, from its last reply; `None`: ask before uploading.
    cloud_heads: Option<BTreeMap<DeviceId, u64>>,
    /// `cloud_heads` with refused journals counted as held (`u64::MAX`), so they are not offered
    /// again: kept beside it (set together in `set_cloud_heads`), since every `poll_timeout` reads it.
    cloud_view: Option<BTreeMap<DeviceId, u64>>,
    /// The cloud's log length at its last reply.
    cloud_offset: Option<u64>,
    in_flight: bool,
    /// Consecutive failures, and no attempt before `retry_at_ms`.
    failures: u32,
    retry_at_ms: u64,
    last_heads_ms: Option<u64>,
    last_success_ms: Option<u64>,
    last_error: Option<String>,
    /// device → first position the cloud refused: nothing of that device from there on is sent
    /// again (it would be refused again) until the tablet restarts. Counted and shown in status.
    refused: BTreeMap<DeviceId, u64>,
    /// Journals whose changes from the cloud this tablet's ledger refused (a revoked or forked
    /// device): told to the cloud as held, so it does not send them again on every refresh.
    refused_downloads: BTreeMap<DeviceId, u64>,
    /// Consecutive uploads that moved none of the cloud's heads.
    stalled: u32,
    /// sku → (units, for a waiting sale): asks for the online channel's units, sent before
    /// anything else (a customer may be waiting), one per request.
    rights_asks: BTreeMap<String, (u64, bool)>,
    rng: u64,
    stats: UplinkStats,
}

impl Uplink {
    /// `seed` varies the jitter between tablets (the node passes its device id's bytes; the
    /// simulator its own stream), so tablets whose 4G returns together do not retry in step.
    pub fn new(seed: u64) -> Self {
        Self {
            cloud_heads: None,
            cloud_view: None,
            cloud_offset: None,
            in_flight: false,
            failures: 0,
            retry_at_ms: 0,
            last_heads_ms: None,
            last_success_ms: None,
            last_error: None,
            refused: BTreeMap::new(),
            refused_downloads: BTreeMap::new(),
            stalled: 0,
            rights_asks: BTreeMap::new(),
            rng: seed | 1,
            stats: UplinkStats::default(),
        }
    }

    pub fn stats(&self) -> &UplinkStats {
        &self.stats
    }
    pub fn cloud_heads(&self) -> Option<&BTreeMap<DeviceId, u64>> {
        self.cloud_heads.as_ref()
    }
    pub fn cloud_offset(&self) -> Option<u64> {
        self.cloud_offset
    }
    pub fn last_success_ms(&self) -> Option<u64> {
        self.last_success_ms
    }
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
    pub fn failures(&self) -> u32 {
        self.failures
    }
    /// Whether the cloud answered within [`LIVE_UPLINK_MS`] and nothing failed since.
    pub fn live(&self, now_ms: u64) -> bool {
        self.failures == 0 && self.last_success_ms.is_some_and(|t| now_ms.saturating_sub(t) <= LIVE_UPLINK_MS)
    }
    pub fn refused(&self) -> &BTreeMap<DeviceId, u64> {
        &self.refused
    }

    /// Replaces the cloud's heads (and the view with refused journals counted as held).
    fn set_cloud_heads(&mut self, heads: Option<BTreeMap<DeviceId, u64>>) {
        self.cloud_view = heads.clone().map(|mut view| {
            for d in self.refused.keys() {
                view.insert(*d, u64::MAX);
            }
            view
        });
        self.cloud_heads = heads;
    }

    /// Changes this tablet holds that the cloud lacks (by the cloud's last heads).
    pub fn lacking(&self, mine: &Heads) -> u64 {
        let Some(cloud) = &self.cloud_view else { return 0 };
        stallmesh_sync::against(mine, cloud).fold(0u64, |t, (_, n, held)| t.saturating_add(n.saturating_sub(held)))
    }

    /// This tablet ran short of `sku` (`for_sale`: a customer waits) and the market's online
    /// channel holds some: ask it through the cloud. Asks for one SKU merge (the larger count).
    pub fn want_rights(&mut self, sku: String, qty: u64, for_sale: bool) {
        if !self.rights_asks.contains_key(&sku) && self.rights_asks.len() >= MAX_RIGHTS_ASKS {
            // Replace the oldest-named (first in order) ask: a full queue is a busy till, not a leak.
            self.rights_asks.pop_first();
            self.stats.rights_asks_dropped += 1;
        }
        let ask = self.rights_asks.entry(sku).or_insert((0, false));
        *ask = (ask.0.max(qty), ask.1 || for_sale);
        debug_assert!(self.rights_asks.len() <= MAX_RIGHTS_ASKS);
    }

    /// When [`Uplink::poll`] next has something to send, given this tablet's heads.
    pub fn poll_timeout(&self, mine: &Heads) -> Option<u64> {
        if self.in_flight {
            return None;
        }
        if self.cloud_heads.is_none() || self.lacking(mine) > 0 || !self.rights_asks.is_empty() {
            return Some(self.retry_at_ms);
        }
        Some(self.retry_at_ms.max(self.last_heads_ms.unwrap_or(0).saturating_add(HEADS_REFRESH_MS)))
    }

    /// The next request, if one is due: the cloud's heads first (after a start, an outage or a
    /// refresh interval), then uploads of what it lacks.
    pub fn poll(&mut self, now_ms: u64, mine: &Heads, log: &impl ChangeLog) -> Option<Outgoing> {
        if self.in_flight || now_ms < self.retry_at_ms {
            return None;
        }
        if let Some((sku, (qty, for_sale))) = self.rights_asks.pop_first() {
            // Sent even before the cloud's heads are known: the ask needs none of them. A failed
            // ask is not repeated: its customer is answered by the till's own wait, and the next
            // shortfall asks again.
            self.in_flight = true;
            self.stats.requests += 1;
            self.stats.rights_asked += 1;
            return Some(Outgoing { body: Message::RightsWanted { sku, qty, for_sale }.encode(), changes: 0 });
        }
        let refresh_due = self.last_heads_ms.is_none_or(|t| now_ms >= t.saturating_add(HEADS_REFRESH_MS));
        let Some(cloud) = &self.cloud_view else { return Some(self.heads_request(now_ms, mine)) };
        let (changes, _more) = match stallmesh_sync::missing(mine, cloud, log, UPLOAD_MAX_CHANGES, UPLOAD_MAX_BYTES) {
            Ok(found) => found,
            Err(e) => {
                // The tablet's own store failed to read: try again later, like a network failure.
                self.on_failure(now_ms, format!("reading changes to upload: {e}"));
                return None;
            }
        };
        if changes.is_empty() {
            if !refresh_due && self.lacking(mine) > 0 {
                // The heads say the cloud lacks something the store did not return (a read racing
                // a write): look again shortly rather than at once, so a driver cannot spin.
                self.retry_at_ms = now_ms.saturating_add(BACKOFF_BASE_MS);
            }
            return refresh_due.then(|| self.heads_request(now_ms, mine));
        }
        let n = changes.len();
        let body = Message::Changes { changes, more: false }.encode();
        self.in_flight = true;
        self.stats.requests += 1;
        self.stats.bytes_uploaded += body.len() as u64;
        Some(Outgoing { body, changes: n })
    }

    fn heads_request(&mut self, now_ms: u64, mine: &Heads) -> Outgoing {
        self.in_flight = true;
        self.last_heads_ms = Some(now_ms);
        self.stats.requests += 1;
        let heads: Vec<(DeviceId, u64)> = if self.refused_downloads.is_empty() {
            mine.iter().map(|(d, n)| (*d, *n)).collect() // already in device order
        } else {
            let mut heads: BTreeMap<DeviceId, u64> = mine.iter().map(|(d, n)| (*d, *n)).collect();
            for d in self.refused_downloads.keys() {
                heads.insert(*d, u64::MAX);
            }
            heads.into_iter().collect()
        };
        let total = heads.iter().fold(0u64, |t, (_, n)| t.saturating_add(*n));
        Outgoing { body: Message::Heads { heads, full: true, total }.encode(), changes: 0 }
    }

    /// This tablet's ledger refused changes of these journals that the cloud sent: ask for no more
    /// of them (until a restart), so a revoked or forked journal is not downloaded every refresh.
    pub fn refuse_downloads(&mut self, devices: impl IntoIterator<Item = (DeviceId, u64)>) {
        for (d, seq) in devices {
            let s = self.refused_downloads.entry(d).or_insert(seq);
            *s = (*s).min(seq);
        }
    }

    /// The cloud answered `sent` (the request's change count). Returns the changes the cloud sent
    /// for this tablet to apply through its ledger (verified there like any peer's).
    pub fn on_reply(&mut self, reply: CloudReply, sent: usize, now_ms: u64) -> Vec<SignedChange> {
        debug_assert!(self.in_flight, "a reply answers a request");
        self.in_flight = false;
        self.failures = 0;
        self.retry_at_ms = now_ms;
        self.last_success_ms = Some(now_ms);
        self.last_error = None;
        self.stats.changes_uploaded = self.stats.changes_uploaded.saturating_add(sent as u64);
        self.stats.duplicates = self.stats.duplicates.saturating_add(reply.duplicates);
        self.stats.changes_downloaded = self.stats.changes_downloaded.saturating_add(reply.changes.len() as u64);
        let new_heads: BTreeMap<DeviceId, u64> = reply.heads.into_iter().collect();
        // An upload that moved none of the cloud's heads made no progress: the cloud holds it all
        // waiting for changes this tablet does not have (another device's, not here yet). Sending
        // it again at once would only repeat that: back off, growing, until heads move.
        let progress = match &self.cloud_heads {
            None => true,
            // Some device the old heads lack or hold less of (one walk down both).
            Some(old) => stallmesh_sync::against(&new_heads, old).any(|(d, n, held)| n > held || (held == 0 && !old.contains_key(d))),
        };
        if sent > 0 && !progress {
            self.stalled = self.stalled.saturating_add(1);
            let wait = self.backoff_ms(self.stalled);
            self.retry_at_ms = now_ms.saturating_add(wait);
        } else if sent > 0 {
            self.stalled = 0;
        }
        // The cloud's word is what it holds now: heads from a reply replace the old view (another
        // process or tablet may have moved them; a restored cloud may even hold less).
        self.set_cloud_heads(Some(new_heads));
        self.cloud_offset = Some(reply.offset);
        if reply.more && !reply.changes.is_empty() {
            self.last_heads_ms = None; // ask again at once for the rest
        }
        reply.changes
    }

    /// The cloud refused some of the uploaded changes (HTTP 422): they are not offered again.
    pub fn on_rejected(&mut self, rejected: &[RejectedChange], now_ms: u64) {
        if rejected.is_empty() {
            // A 422 naming nothing (a proxy's page, a body cut short): nothing to stop offering, so
            // retrying at once would loop; it is a failure like any unreadable reply.
            return self.on_failure(now_ms, "the cloud refused the upload without naming a refused change".into());
        }
        self.in_flight = false;
        self.retry_at_ms = now_ms;
        self.stats.rejected = self.stats.rejected.saturating_add(rejected.len() as u64);
        // Only lasting refusals stop a journal's uploads; a full pending buffer or an enrolment the
        // cloud has not seen yet pass, so those are offered again (after the usual backoff).
        let lasting = rejected.iter().filter(|r| !TEMPORARY_REFUSALS.contains(&r.reason.as_str()));
        for r in lasting {
            let seq = self.refused.entry(r.device).or_insert(r.seq);
            *seq = (*seq).min(r.seq);
        }
        if rejected.iter().any(|r| TEMPORARY_REFUSALS.contains(&r.reason.as_str())) {
            self.failures = self.failures.saturating_add(1);
            let wait = self.backoff_ms(self.failures);
            self.retry_at_ms = now_ms.saturating_add(wait);
        }
        self.last_error = rejected.first().map(|r| format!("the cloud refused {}:{}: {}", r.device.short(), r.seq, r.message));
        // What the cloud holds after a partial acceptance is not known: ask.
        self.set_cloud_heads(None);
    }

    /// The request failed (no connection, timeout, a 5xx, a reply that does not decode): back off
    /// with jitter, then start again from the cloud's heads.
    pub fn on_failure(&mut self, now_ms: u64, error: String) {
        self.in_flight = false;
        self.failures = self.failures.saturating_add(1);
        self.stats.failures += 1;
        self.last_error = Some(error);
        self.set_cloud_heads(None);
        let wait = self.backoff_ms(self.failures);
        self.retry_at_ms = now_ms.saturating_add(wait);
    }

    /// The wait after `failures` consecutive failures: exponential from [`BACKOFF_BASE_MS`] up to
    /// [`BACKOFF_MAX_MS`], with "equal jitter" (at least half the ceiling, so a flapping link is
    /// not hammered and tablets whose link returned together spread out).
    fn backoff_ms(&mut self, failures: u32) -> u64 {
        let ceiling = BACKOFF_BASE_MS.saturating_mul(1u64 << failures.saturating_sub(1).min(16)).min(BACKOFF_MAX_MS);
        let jitter = self.next_random() % (ceiling / 2 + 1);
        let wait = ceiling / 2 + jitter;
        debug_assert!(wait <= BACKOFF_MAX_MS);
        wait
    }

    /// splitmix64: deterministic for a seed, so the simulator replays the same retries.
    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}
