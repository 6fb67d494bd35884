//! The cloud and the uplinks. The market's cloud runs the real ingest core ([`MarketIngest`]): a
//! gapless log of verified changes, each (device, seq) once, and its own signed watermarks. Each
//! tablet with 4G runs the real uplink core ([`Uplink`]) against it. Requests (sync `Heads` and
//! `Changes` messages) and replies ([`CloudReply`]) travel the simulated uplink: its latency, the
//! network's loss, cut by uplink outages and by the tablet's crashes. A request with no reply
//! within [`UPLINK_REQUEST_TIMEOUT_MS`] is the core's `on_failure`, so it backs off as on 4G.

use super::*;
use crate::report::CloudReport;
use stallmesh_ingest::uplink::Outgoing;
use stallmesh_ingest::wire::CloudReply;
use stallmesh_ingest::Batch;
use stallmesh_ledger::Heads;
use stallmesh_sync::Message;

/// An uplink whose core said it was due but sent nothing is polled again no sooner than this: a
/// driver must not spin on a core that has nothing to send yet.
const UPLINK_REPOLL_MIN_US: u64 = 100 * US_PER_MS;

impl World {
    /// A tablet with 4G starts (the day begins, or it restarted) with a fresh uplink core, as a
    /// restarted node does: it asks the cloud's heads first.
    pub(super) fn start_uplink(&mut self, dev: u32) {
        let d = &mut self.devices[dev as usize];
        if !d.has_uplink || !d.up {
            return;
        }
        // From the tablet's own stream: tablets whose 4G returns together do not retry in step.
        let seed = d.rng.gen::<u64>();
        d.uplink = Some(UplinkSide { core: Uplink::new(seed), wake_at: None, in_flight: None });
        self.schedule_uplink(dev);
    }

    /// The tablet crashed: its uplink core (and the request in flight) is gone, its counters kept.
    pub(super) fn stop_uplink(&mut self, dev: u32) {
        if let Some(u) = self.devices[dev as usize].uplink.take() {
            add_uplink_stats(&mut self.uplinks_before_restarts, u.core.stats());
        }
    }

    /// Runs `f` on the tablet's uplink core with what the tablet holds (its heads, and its change
    /// log as a view of the market's); `None` without a running uplink.
    fn with_uplink<T>(&mut self, dev: u32, f: impl FnOnce(&mut Uplink, &Heads, &UplinkLog<'_>) -> T) -> Option<T> {
        let own_only = self.opts.broken_cloud == Some(BrokenCloud::UploadsOwnJournalOnly);
        let all = &self.all_changes;
        let d = &mut self.devices[dev as usize];
        let u = d.uplink.as_mut()?;
        let heads = d.ledger.heads_ref();
        let log = UplinkLog { held: HeldLog { all, heads }, only: own_only.then_some(d.id) };
        Some(f(&mut u.core, heads, &log))
    }

    /// Schedules the uplink's next wake at its core's `poll_timeout` (after every change to what
    /// the tablet holds, and every reply or failure): none while a request is in flight, whose
    /// reply or timeout comes first.
    pub(super) fn schedule_uplink(&mut self, dev: u32) {
        let d = &self.devices[dev as usize];
        if !d.up || d.uplink.as_ref().is_none_or(|u| u.in_flight.is_some()) {
            return;
        }
        let Some(due_ms) = self.with_uplink(dev, |core, mine, _| core.poll_timeout(mine)).flatten() else { return };
        let at = self.virtual_us_at(dev, due_ms);
        self.wake_uplink_at(dev, at);
    }

    fn wake_uplink_at(&mut self, dev: u32, at: u64) {
        let Some(u) = self.devices[dev as usize].uplink.as_mut() else { return };
        if u.wake_at.is_some_and(|w| w <= at) {
            return; // an earlier wake is pending; it reschedules
        }
        u.wake_at = Some(at);
        self.push(at, Ev::UplinkWake { dev });
    }

    pub(super) fn on_uplink_wake(&mut self, dev: u32) {
        let now = self.now;
        let Some(u) = self.devices[dev as usize].uplink.as_mut() else { return }; // crashed since
        if u.wake_at != Some(now) {
            return; // stale
        }
        u.wake_at = None;
        let now_ms = self.dev_now_ms(dev);
        let out = self.protocol(|w| w.with_uplink(dev, |core, mine, log| core.poll(now_ms, mine, log))).flatten();
        match out {
            Some(out) => self.send_uplink_request(dev, out),
            None => {
                let due = self.with_uplink(dev, |core, mine, _| core.poll_timeout(mine)).flatten();
                if due.is_some_and(|due| due <= now_ms) {
                    self.wake_uplink_at(dev, now + UPLINK_REPOLL_MIN_US);
                    return;
                }
            }
        }
        self.schedule_uplink(dev);
    }

    fn send_uplink_request(&mut self, dev: u32, out: Outgoing) {
        self.next_request_id += 1;
        let id = self.next_request_id;
        let u = self.devices[dev as usize].uplink.as_mut().expect("it just polled");
        u.in_flight = Some((id, out.changes));
        let what = if out.changes == 0 { "heads".to_string() } else { format!("{} changes", out.changes) };
        self.trace(Some(dev), format!("uplink request #{id}: {what}"));
        self.push(self.now + UPLINK_REQUEST_TIMEOUT_MS * US_PER_MS, Ev::UplinkTimeout { dev, id });
        match self.uplink_transit(dev, out.body.len()) {
            Some(at) => self.push(at, Ev::CloudRequest { dev, id, body: out.body }),
            None => self.trace(Some(dev), format!("uplink request #{id} lost")),
        }
    }

    /// When a message of `len` bytes between tablet `dev` and the cloud arrives, or `None` if it
    /// is lost: the uplink is cut (an outage, the tablet down) or the network's loss takes it.
    /// Draws from the tablet's stream, so each uplink's fate is its own.
    fn uplink_transit(&mut self, dev: u32, len: usize) -> Option<u64> {
        self.messages += 1;
        self.bytes += len as u64;
        self.hour().bytes += len as u64;
        self.series.uplink_bytes(self.now, len as u64);
        if self.uplink_cut(dev) {
            return None;
        }
        let net = &self.sc.network;
        let rng = &mut self.devices[dev as usize].rng;
        if rng.gen_bool(net.loss) {
            return None;
        }
        let tail = if net.latency_tail_ms > 0.0 { Exp::new(1.0 / net.latency_tail_ms).expect("positive").sample(rng) } else { 0.0 };
        let serialize_ms = len as f64 * 8.0 / net.bandwidth_kbps.max(1.0);
        Some(self.now + ((net.uplink_latency_ms + tail + serialize_ms) * 1000.0) as u64 + 1)
    }

    /// A request reaches the cloud: it answers as the cloud service does (`Heads`: what the tablet
    /// lacks of the log; `Changes`: ingest, commit, then the new heads).
    pub(super) fn on_cloud_request(&mut self, dev: u32, id: u64, body: Vec<u8>) {
        if self.uplink_outage() {
            self.trace_cloud(format!("request #{id} from {dev} cut off by the outage"));
            return;
        }
        let now_ms = self.cloud_now_ms();
        let mut reply = CloudReply::default();
        match Message::decode(&body) {
            Ok(Message::Heads { heads, .. }) => {
                let theirs: BTreeMap<DeviceId, u64> = heads.into_iter().collect();
                let found = self.protocol(|w| {
                    let log = HeldLog { all: &w.all_changes, heads: w.cloud.ingest.heads() };
                    w.cloud.ingest.missing_for(&theirs, &log)
                });
                match found {
                    Ok((changes, more)) => {
                        reply.changes = changes;
                        reply.more = more;
                    }
                    Err(e) => {
                        self.trace_cloud(format!("request #{id} from {dev}: reading the log failed: {e}"));
                        return; // a 5xx: the tablet times out
                    }
                }
            }
            Ok(Message::Changes { changes, .. }) => {
                let sent = changes.len();
                let batch = self.protocol(|w| w.cloud.ingest.ingest(changes, now_ms));
                reply.accepted = batch.records.len() as u64;
                reply.duplicates = batch.duplicates;
                reply.pending = batch.pending;
                reply.rejected = batch.rejected.clone();
                self.trace_cloud(format!(
                    "request #{id} from {dev}: {sent} changes, {} logged, {} duplicates, {} pending, {} refused",
                    reply.accepted,
                    reply.duplicates,
                    reply.pending,
                    reply.rejected.len()
                ));
                self.commit_cloud_batch(batch);
                self.schedule_cloud_wake();
            }
            Ok(Message::RightsWanted { sku, qty, for_sale }) => {
                reply.changes = self.online_give(dev, &sku, qty, for_sale, now_ms).into_iter().collect();
            }
            other => {
                self.trace_cloud(format!("request #{id} from {dev} is not an uplink message: {other:?}"));
                return; // a 400: the tablet times out
            }
        }
        reply.heads = self.cloud.ingest.heads().iter().map(|(d, n)| (*d, *n)).collect();
        reply.offset = self.cloud.ingest.offset();
        reply.rights_wanted = self.online_wants(now_ms);
        let body = reply.encode();
        match self.uplink_transit(dev, body.len()) {
            Some(at) => self.push(at, Ev::CloudReply { dev, id, body }),
            None => self.trace_cloud(format!("reply #{id} to {dev} lost")),
        }
    }

    /// The cloud's driver commits what the ingest core produced, in order, before answering (as
    /// the cloud service does in one transaction); the checker sees each record.
    pub(super) fn commit_cloud_batch(&mut self, batch: Batch) {
        let mut logged: Vec<SignedChange> = Vec::with_capacity(batch.records.len());
        for r in batch.records {
            if self.opts.broken_cloud == Some(BrokenCloud::DropsOneSale)
                && !self.cloud.dropped_one
                && self.acked_sale_of(&r.entry).is_some()
            {
                self.cloud.dropped_one = true;
                self.trace_cloud(format!("BROKEN: offset {} not committed", r.offset));
                continue;
            }
            self.cloud_logged(r.offset, &r.entry);
            // The cloud's watermarks join the market's changes (what a tablet's log view reads).
            logged.push(r.entry.change.clone());
            let after = held_before(self.cloud.ingest.ledger(), r.entry.change.dot());
            self.intern(r.entry, after);
        }
        // The online channel's ledger follows the log, as the cloud feeds it.
        self.feed_online(logged);
    }

    /// The acknowledged sale this entry records, if it records one.
    pub(super) fn acked_sale_of(&self, entry: &Entry) -> Option<u32> {
        if !matches!(entry.event.body, EventBody::Sold { .. }) {
            return None;
        }
        self.acked_index.get(&sale_id(entry.change.dot())).copied()
    }

    /// Wakes the cloud at its ingest core's `poll_timeout` (a watermark due).
    pub(super) fn schedule_cloud_wake(&mut self) {
        let Some(due_ms) = self.cloud.ingest.poll_timeout() else { return };
        let at = (due_ms.saturating_sub(DEVICE_EPOCH_MS) * US_PER_MS).max(self.now + 1);
        if self.cloud.wake_at.is_some_and(|w| w <= at) {
            return;
        }
        self.cloud.wake_at = Some(at);
        self.push(at, Ev::CloudWake);
    }

    pub(super) fn on_cloud_wake(&mut self) {
        if self.cloud.wake_at != Some(self.now) {
            return; // stale
        }
        self.cloud.wake_at = None;
        let now_ms = self.cloud_now_ms();
        if let Some(batch) = self.protocol(|w| w.cloud.ingest.tick(now_ms)) {
            self.trace_cloud(format!("tick: {} records, log at {}", batch.records.len(), self.cloud.ingest.offset()));
            self.commit_cloud_batch(batch);
        }
        self.schedule_cloud_wake();
    }

    /// The cloud's reply reaches the tablet: the core takes it in, and the changes it brings (the
    /// cloud's watermarks, other tablets' uploads) go through the tablet's ledger like a peer's.
    pub(super) fn on_cloud_reply(&mut self, dev: u32, id: u64, body: Vec<u8>) {
        if self.uplink_cut(dev) {
            return; // lost on the way; the request times out
        }
        let Some(u) = self.devices[dev as usize].uplink.as_mut() else { return };
        let Some((_, sent)) = u.in_flight.filter(|(want, _)| *want == id) else { return }; // timed out already
        u.in_flight = None;
        let now_ms = self.dev_now_ms(dev);
        let (changes, wanted) = self.protocol(|w| {
            let core = &mut w.devices[dev as usize].uplink.as_mut().expect("checked above").core;
            match CloudReply::decode(&body) {
                Err(e) => {
                    core.on_failure(now_ms, format!("the reply does not decode: {e}"));
                    (Vec::new(), Vec::new())
                }
                Ok(reply) if !reply.rejected.is_empty() => {
                    core.on_rejected(&reply.rejected, now_ms);
                    (Vec::new(), Vec::new())
                }
                Ok(mut reply) => {
                    let wanted = std::mem::take(&mut reply.rights_wanted);
                    (core.on_reply(reply, sent, now_ms), wanted)
                }
            }
        });
        self.trace(Some(dev), format!("uplink reply #{id}: {} changes back", changes.len()));
        if !changes.is_empty() {
            let (_, rights_arrived) = self.apply_changes(dev, "cloud", changes);
            if rights_arrived {
                self.retry_waiting(dev);
            }
        }
        // The online channel sold out of what this tablet may spare: it gives, as the node does.
        for w in wanted {
            self.give_online(dev, w);
        }
        self.schedule_uplink(dev);
    }

    pub(super) fn on_uplink_timeout(&mut self, dev: u32, id: u64) {
        let now_ms = self.dev_now_ms(dev);
        let Some(u) = self.devices[dev as usize].uplink.as_mut() else { return };
        if u.in_flight.is_none_or(|(want, _)| want != id) {
            return; // answered
        }
        u.in_flight = None;
        u.core.on_failure(now_ms, format!("no reply within {UPLINK_REQUEST_TIMEOUT_MS} ms"));
        let failures = u.core.failures();
        self.trace(Some(dev), format!("uplink request #{id} timed out ({failures} failures in a row)"));
        self.schedule_uplink(dev);
    }

    pub(super) fn cloud_report(&self) -> CloudReport {
        let stats = self.cloud.ingest.stats();
        let mut up = self.uplinks_before_restarts.clone();
        for d in &self.devices {
            if let Some(u) = &d.uplink {
                add_uplink_stats(&mut up, u.core.stats());
            }
        }
        let mut lags: Vec<f64> = self.acked.iter().filter_map(|s| s.in_cloud_at.map(|t| (t - s.t_ack) as f64 / 1000.0)).collect();
        lags.sort_by(f64::total_cmp);
        let pct = |p: f64| if lags.is_empty() { 0.0 } else { lags[((lags.len() - 1) as f64 * p).round() as usize] };
        CloudReport {
            log_entries: self.cloud.ingest.offset(),
            accepted: stats.accepted,
            duplicates: stats.duplicates,
            rejected: stats.rejected.clone(),
            watermarks: stats.watermarks,
            uplink_requests: up.requests,
            uplink_failures: up.failures,
            uplink_changes_uploaded: up.changes_uploaded,
            uplink_bytes_uploaded: up.bytes_uploaded,
            uplink_changes_downloaded: up.changes_downloaded,
            upload_lag_ms_p50: pct(0.5),
            upload_lag_ms_p99: pct(0.99),
            upload_lag_ms_max: lags.last().copied().unwrap_or(0.0),
            sales_not_in_cloud_by_end: self.acked.iter().filter(|s| s.in_cloud_at.is_none()).count() as u64,
        }
    }
}

/// The change log an uplink reads: the tablet's, or with `BrokenCloud::UploadsOwnJournalOnly`
/// only its own journal (the others read as not there yet).
struct UplinkLog<'a> {
    held: HeldLog<'a>,
    only: Option<DeviceId>,
}

impl stallmesh_sync::ChangeLog for UplinkLog<'_> {
    fn changes_since(&self, device: &DeviceId, from_seq: u64, limit: usize) -> Result<Vec<SignedChange>, String> {
        if self.only.is_some_and(|me| me != *device) {
            return Ok(Vec::new());
        }
        self.held.changes_since(device, from_seq, limit)
    }
}

fn add_uplink_stats(a: &mut UplinkStats, b: &UplinkStats) {
    a.requests += b.requests;
    a.failures += b.failures;
    a.changes_uploaded += b.changes_uploaded;
    a.bytes_uploaded += b.bytes_uploaded;
    a.changes_downloaded += b.changes_downloaded;
    a.rejected += b.rejected;
    a.duplicates += b.duplicates;
}
