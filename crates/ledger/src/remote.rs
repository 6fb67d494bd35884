//! Changes from peers: cheap checks first (market, size, signature, position, dependencies), then
//! runs of consecutive changes of one device applied to automerge in one call; changes that wait
//! for a gap or a causal dependency are held (bounded), conflicting ones kept as evidence.

use crate::event::{self, Event, EventBody};
use crate::journal::{events_list, Journal};
use crate::{
    ApplyReport, Entry, FoldError, KnownValid, Ledger, Rejection, VerifyAll, MAX_CAUSAL_DOTS, MAX_CHANGE_BYTES, MAX_PENDING_CHANGES, MAX_PENDING_PER_UNENROLLED,
    SEGMENT_CHANGES,
};
use automerge::{Change, ChangeHash, ReadDoc};
use stallmesh_identity::{Dot, SignedChange};

impl Ledger {
    /// Verifies and applies changes received from peers, in any order. Changes whose predecessor
    /// or causal dependencies are missing wait (bounded) until those arrive.
    pub fn apply_remote(&mut self, changes: impl IntoIterator<Item = SignedChange>) -> ApplyReport {
        self.apply_remote_known(changes, &VerifyAll)
    }

    /// [`Ledger::apply_remote`], skipping the signature check of changes `known` vouches for
    /// (byte-for-byte equal to ones already verified). Everything else is checked as always.
    pub fn apply_remote_known(&mut self, changes: impl IntoIterator<Item = SignedChange>, known: &dyn KnownValid) -> ApplyReport {
        let mut report = ApplyReport::default();
        let mut run = Vec::new();
        for change in changes {
            self.feed(change, &mut run, &mut report, known);
        }
        self.flush_run(&mut run, &mut report, known);
        self.drain_pending(&mut report, known);
        report.pending = self.pending.len();
        self.stats.applied_remote += report.applied.len() as u64;
        debug_assert!(self.pending.len() <= MAX_PENDING_CHANGES, "the pending buffer is bounded");
        debug_assert!(
            report.applied.iter().all(|e| e.change.seq < self.heads.get(&e.change.device).copied().unwrap_or(0)),
            "every applied change is below its device's new head"
        );
        debug_assert!(report.applied.iter().all(|e| !self.pending.contains_key(&e.change.dot())), "an applied change no longer waits");
        report
    }

    /// Routes one change: extends the current run of consecutive ready changes of one device (applied
    /// to automerge in one call), or waits, or is rejected or ignored.
    fn feed(&mut self, change: SignedChange, run: &mut Vec<SignedChange>, report: &mut ApplyReport, known: &dyn KnownValid) {
        let dot = change.dot();
        if let Some(last) = run.last() {
            let continues = last.device == dot.device
                && last.seq != 0 // the device's enrolment is applied on its own, before anything it signed
                && dot.seq == last.seq + 1
                && Journal::segment_index(dot.seq) != 0
                && run.len() < SEGMENT_CHANGES as usize;
            let vouched = || known.known_applied(&change).is_some();
            if continues && !vouched() && matches!(self.precheck_at(&change, dot.seq, known), Ok(Readiness::Ready)) {
                run.push(change);
                return;
            }
            self.flush_run(run, report, known);
        }
        match self.precheck(&change, known) {
            Err(r) => self.reject(report, dot, r),
            Ok(Readiness::Duplicate) => {
                report.duplicates += 1;
                self.stats.duplicates += 1;
            }
            Ok(Readiness::Conflict) => self.equivocation(change, report),
            Ok(Readiness::Wait) => self.hold(change, report, known),
            Ok(Readiness::Ready) => match known.known_applied(&change) {
                Some(k) if self.journals.get(&dot.device).and_then(|j| j.digests.last()) == k.after.as_ref() => {
                    self.apply_known(change, k.event, report)
                }
                _ => run.push(change),
            },
        }
    }

    /// Appends a ready change whose event another ledger decoded on the same predecessor
    /// ([`crate::KnownValid::known_applied`]): checked against this replica and folded as
    /// [`Ledger::apply_run`] does, without automerge. The journal's document, now behind its
    /// journal, is dropped (rebuilt from the segment's raw changes if ever needed).
    fn apply_known(&mut self, change: SignedChange, event: Event, report: &mut ApplyReport) {
        let dot = change.dot();
        if let Err(why) = self.check_remote(dot, &event) {
            self.reject(report, dot, why);
            return;
        }
        let journal = self.journals.entry(dot.device).or_default();
        journal.advance(&change);
        if journal.doc.take().is_some() {
            self.open_docs.retain(|d| *d != dot.device);
        }
        self.advanced(dot.device);
        self.after_fold(dot, &event);
        report.applied.push(Entry { change, event });
    }

    /// Keeps a change until its predecessor or causal dependencies arrive (bounded).
    fn hold(&mut self, change: SignedChange, report: &mut ApplyReport, known: &dyn KnownValid) {
        let dot = change.dot();
        if let Some(waiting) = self.pending.get(&dot) {
            if waiting.digest() == change.digest() {
                report.duplicates += 1;
                self.stats.duplicates += 1;
            } else if verify(&change, known).is_err() {
                self.reject(report, dot, Rejection::BadSignature);
            } else {
                // Two signed changes for one position, neither applied yet: the first waits on.
                self.equivocation(change, report);
            }
        } else if !self.state.devices.contains_key(&dot.device)
            && self.pending.range(Dot { device: dot.device, seq: 0 }..=Dot { device: dot.device, seq: u64::MAX }).count()
                >= MAX_PENDING_PER_UNENROLLED
        {
            self.reject(report, dot, Rejection::Unenrolled);
        } else if self.pending.len() >= MAX_PENDING_CHANGES {
            self.reject(report, dot, Rejection::PendingFull);
        } else {
            self.pending.insert(dot, change);
        }
    }

    fn flush_run(&mut self, run: &mut Vec<SignedChange>, report: &mut ApplyReport, known: &dyn KnownValid) {
        if run.is_empty() {
            return;
        }
        let changes = std::mem::take(run);
        let (applied, failure) = self.apply_run(changes);
        report.applied.extend(applied);
        if let Some((failed, why, rest)) = failure {
            if why == Rejection::Equivocation {
                // It follows a history other than the one held, and so do the changes after it.
                for c in std::iter::once(failed).chain(rest) {
                    self.equivocation(c, report);
                }
                return;
            }
            self.reject(report, failed.dot(), why);
            // Later changes of the same device cannot apply before a good change at `dot`: wait.
            for c in rest {
                self.hold(c, report, known);
            }
        }
    }

    /// A validly signed change that contradicts what this replica holds: kept as evidence (and
    /// reported, so the driver persists it and passes it on), counted, never applied.
    fn equivocation(&mut self, change: SignedChange, report: &mut ApplyReport) {
        let dot = change.dot();
        if self.keep_evidence(change.clone()) {
            tracing::error!(device = %dot.device, seq = dot.seq, "equivocation: one device signed two different journals");
            report.evidence.push(change);
        }
        self.reject(report, dot, Rejection::Equivocation);
    }

    fn reject(&mut self, report: &mut ApplyReport, dot: Dot, r: Rejection) {
        tracing::warn!(device = %dot.device, seq = dot.seq, reason = r.label(), error = %r, "rejected remote change");
        *self.stats.rejected.entry(r.label()).or_default() += 1;
        report.rejected.push((dot, r));
    }

    /// Applies every pending change that has become ready, until none is.
    fn drain_pending(&mut self, report: &mut ApplyReport, known: &dyn KnownValid) {
        loop {
            let ready: Vec<Dot> = self
                .pending
                .keys()
                .filter(|dot| {
                    let next = self.journals.get(&dot.device).map_or(0, |j| j.next_seq);
                    dot.seq <= next || self.pending.contains_key(&Dot { device: dot.device, seq: dot.seq.wrapping_sub(1) })
                })
                .copied()
                .collect();
            let before = (self.pending.len(), report.applied.len());
            let mut run = Vec::new();
            for dot in ready {
                let Some(change) = self.pending.remove(&dot) else { continue };
                self.feed(change, &mut run, report, known);
            }
            self.flush_run(&mut run, report, known);
            if (self.pending.len(), report.applied.len()) == before {
                break;
            }
        }
    }

    /// Cheap checks that need no automerge work: market, size, signature, position, dependencies.
    fn precheck(&self, c: &SignedChange, known: &dyn KnownValid) -> Result<Readiness, Rejection> {
        let next = self.journals.get(&c.device).map_or(0, |j| j.next_seq);
        self.precheck_at(c, next, known)
    }

    /// [`Ledger::precheck`] as if the device's journal held `next` entries (for runs not yet applied).
    fn precheck_at(&self, c: &SignedChange, next: u64, known: &dyn KnownValid) -> Result<Readiness, Rejection> {
        if c.market != self.ctx.market {
            return Err(Rejection::WrongMarket);
        }
        if c.change.len() > MAX_CHANGE_BYTES {
            return Err(Rejection::Oversized(c.change.len()));
        }
        if c.causal.len() > MAX_CAUSAL_DOTS {
            return Err(Rejection::Oversized(c.causal.len()));
        }
        if c.seq < next {
            if self.held_digest(c.dot()) == Some(c.digest()) {
                return Ok(Readiness::Duplicate);
            }
            // Not the change held here: altered bytes (forged), or a second change its device signed.
            verify(c, known)?;
            return Ok(Readiness::Conflict);
        }
        verify(c, known)?;
        if c.seq > 0 {
            match self.state.devices.get(&c.device) {
                Some(d) if d.revoked_at_ms.is_some() => return Err(Rejection::Revoked),
                Some(_) => {}
                None if next == 0 => return Ok(Readiness::Wait), // its enrolment may still be on the way
                None => return Err(Rejection::Unenrolled),
            }
        }
        if c.seq > next {
            return Ok(Readiness::Wait);
        }
        let deps_met = c.causal.iter().all(|d| self.journals.get(&d.device).is_some_and(|j| j.next_seq > d.seq));
        Ok(if deps_met { Readiness::Ready } else { Readiness::Wait })
    }

    /// Applies a run of consecutive ready changes of one device within one journal segment: one
    /// automerge call for the run (much cheaper than one per change), then each event is decoded,
    /// checked and folded in order. Returns the applied entries and, on the first failure, the
    /// failing change's position, why, and the changes after it.
    #[allow(clippy::type_complexity)]
    fn apply_run(&mut self, run: Vec<SignedChange>) -> (Vec<Entry>, Option<(SignedChange, Rejection, Vec<SignedChange>)>) {
        let device = run[0].device;
        let first_index = Journal::segment_index(run[0].seq);
        // Decode and check every change before touching the document.
        let mut ams = Vec::with_capacity(run.len());
        let mut bad: Option<(usize, Rejection)> = None;
        {
            let journal = self.journals.entry(device).or_default();
            let mut expected_deps: Vec<ChangeHash> = match journal.doc(&device) {
                Ok(seg) => seg.doc.get_heads(),
                Err(e) => {
                    let mut run = run.into_iter();
                    let first = run.next().expect("runs are never empty");
                    return (vec![], Some((first, Rejection::Malformed(e), run.collect())));
                }
            };
            for (i, c) in run.iter().enumerate() {
                let am = match Change::from_bytes(c.change.to_vec()) {
                    Ok(am) => am,
                    Err(e) => {
                        bad = Some((i, Rejection::Malformed(e.to_string())));
                        break;
                    }
                };
                if am.actor_id().to_bytes() != c.device.0 {
                    bad = Some((i, Rejection::WrongActor));
                    break;
                }
                if am.seq() != (first_index + i) as u64 + 1 {
                    bad = Some((i, Rejection::BrokenChain(format!("automerge seq {} at journal position {}", am.seq(), c.seq))));
                    break;
                }
                if am.deps() != expected_deps.as_slice() {
                    // Signed by its device (checked before the run), at the next position, yet built
                    // on another change than the one held before it: its device signed two histories.
                    bad = Some((i, Rejection::Equivocation));
                    break;
                }
                expected_deps = vec![am.hash()];
                ams.push(am);
            }
        }
        self.touch_doc(device);
        let good = ams.len();
        let mut run = run;
        let mut rest = run.split_off(good);
        let mut failure = bad.map(|(_, why)| {
            let failed = rest.remove(0);
            (failed, why, std::mem::take(&mut rest))
        });
        if good == 0 {
            return (vec![], failure);
        }
        let last_hash = ams.last().expect("good > 0").hash();
        let journal = self.journals.get_mut(&device).expect("created above");
        let seg = journal.doc.as_mut().expect("built above");
        // automerge asserts on change graphs it considers impossible, and these bytes are a peer's
        // (found by fuzz/enrolled_peer_change): a panic refuses the change like any malformed one,
        // and the document, perhaps half updated, is dropped and rebuilt from the journal's good
        // changes when next needed.
        let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| seg.doc.apply_changes(ams)));
        let panicked = applied.is_err();
        let applied_ok = matches!(applied, Ok(Ok(_))) && seg.doc.get_heads() == [last_hash];
        if !applied_ok {
            journal.doc = None;
            let mut later: Vec<SignedChange> = run.drain(1..).collect();
            if let Some((failed, _, r)) = failure {
                later.push(failed);
                later.extend(r);
            }
            let first = run.pop().expect("good > 0");
            let why = if panicked {
                Rejection::Malformed("automerge cannot apply the change (its graph is inconsistent)".into())
            } else {
                Rejection::BrokenChain("changes were not applied".into())
            };
            return (vec![], Some((first, why, later)));
        }
        seg.events = events_list(&seg.doc);
        let events: Vec<Result<Event, Rejection>> = (0..good)
            .map(|i| match &seg.events {
                Some(list) if seg.doc.length(list) == first_index + good => {
                    event::read_event(&seg.doc, list, first_index + i).map_err(|e| Rejection::Malformed(e.to_string()))
                }
                _ => Err(Rejection::Malformed("each change must append exactly one journal event".into())),
            })
            .collect();
        let mut applied = Vec::with_capacity(good);
        let mut changes = run.into_iter();
        for event in events {
            let c = changes.next().expect("one change per event");
            let dot = c.dot();
            match event.and_then(|e| self.check_remote(dot, &e).map(|_| e)) {
                Ok(event) => {
                    self.journals.get_mut(&device).expect("exists").advance(&c);
                    self.advanced(device);
                    self.after_fold(dot, &event);
                    applied.push(Entry { change: c, event });
                }
                Err(why) => {
                    // The document took changes that are not in the journal: rebuild it from the
                    // good ones when next needed.
                    self.journals.get_mut(&device).expect("exists").doc = None;
                    let mut later: Vec<SignedChange> = changes.collect();
                    if let Some((bad_change, _, bad_rest)) = failure.take() {
                        // What followed the undecodable change waits as well.
                        later.push(bad_change);
                        later.extend(bad_rest);
                    }
                    debug_assert_eq!(c.dot(), dot);
                    return (applied, Some((c, why, later)));
                }
            }
        }
        (applied, failure)
    }

    fn check_remote(&self, dot: Dot, event: &Event) -> Result<(), Rejection> {
        if let EventBody::Enrolled { certificate } = &event.body {
            if certificate.device != dot.device {
                return Err(Rejection::BadEnrolment("certificate names another device".into()));
            }
            certificate.verify(&self.ctx.market_key, event.time_ms).map_err(|e| Rejection::BadEnrolment(e.to_string()))?;
        } else if dot.seq == 0 {
            return Err(Rejection::Unenrolled);
        }
        if let EventBody::Revoked { revocation } = &event.body {
            revocation.verify(&self.ctx.market_key).map_err(|e| Rejection::Fold(FoldError::Invalid(format!("revocation: {e}"))))?;
        }
        self.state.check(dot, event).map_err(Rejection::Fold)
    }
}

enum Readiness {
    Ready,
    Wait,
    Duplicate,
    /// Validly signed, but another change is held at its position.
    Conflict,
}

/// The one signature check of a remote change: its author's signature, unless `known` vouches for
/// these exact bytes.
fn verify(c: &SignedChange, known: &dyn KnownValid) -> Result<(), Rejection> {
    if known.known_valid(c) {
        return Ok(());
    }
    c.verify_signature().map_err(|_| Rejection::BadSignature)
}
