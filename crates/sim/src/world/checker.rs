//! The invariant checker: replicas agree within the liveness bound, no acknowledged sale is lost,
//! none is duplicated or invented, no stock is oversold; every acknowledged sale reaches the
//! cloud's log once, soon after an uplink can carry it.

use super::*;

/// The cloud invariant's name in violations.
pub const CLOUD_INVARIANT: &str = "every_sale_in_the_cloud_log_once";

impl World {
    pub(super) fn liveness_check(&mut self) {
        let bound = (self.sc.liveness_bound_s * US_PER_S as f64) as u64;
        if self.replicas_agree() {
            self.converged_after_heal = Some(self.now - self.end_of_day_at);
            self.finished = true;
            return;
        }
        if self.now - self.end_of_day_at > bound {
            self.finished = true;
            return;
        }
        self.push(self.now + US_PER_S / 4, Ev::LivenessCheck);
    }

    /// Cheap agreement test: every replica (and the cloud) holds the same journal heads, nothing pending.
    pub(super) fn replicas_agree(&self) -> bool {
        let first = self.devices[0].ledger.heads_ref();
        let cloud = self.cloud.ingest.ledger();
        self.devices.iter().all(|d| d.up && d.ledger.pending_len() == 0 && d.ledger.heads_ref() == first)
            && cloud.pending_len() == 0
            && cloud.heads_ref() == first
            && self.drop.as_ref().is_none_or(|d| d.online.heads_ref() == first)
    }

    /// Every replica's ledger, the cloud's last, with its name in violations.
    pub(super) fn replicas(&self) -> impl Iterator<Item = (Option<u32>, &Ledger)> + '_ {
        self.devices.iter().enumerate().map(|(d, dev)| (Some(d as u32), &dev.ledger)).chain([(None, self.cloud.ingest.ledger())])
    }

    fn cloud_violation(&mut self, detail: String, device: Option<u32>) {
        if self.cloud_violations.len() >= MAX_CLOUD_VIOLATIONS {
            return;
        }
        self.trace_cloud(format!("VIOLATION {detail}"));
        // A sale of the online channel (numbered after the tablets) is the cloud's.
        let device = device.filter(|d| *d < self.n());
        let timeline = match device {
            Some(d) => self.devices[d as usize].timeline.iter().cloned().collect(),
            None => self.cloud.timeline.iter().cloned().collect(),
        };
        self.cloud_violations.push(Violation { invariant: CLOUD_INVARIANT, detail, device, timeline });
    }

    /// The cloud's driver committed a record: offsets run 1, 2, 3, … without a gap and no
    /// (device, seq) is committed twice. An acknowledged sale is in the cloud from now on.
    pub(super) fn cloud_logged(&mut self, offset: u64, entry: &Entry) {
        let dot = entry.change.dot();
        let expected = self.cloud.last_offset + 1;
        if offset != expected {
            self.cloud_violation(format!("the cloud's log jumps from offset {} to {offset}", expected - 1), None);
        }
        self.cloud.last_offset = offset;
        self.cloud.records += 1;
        if let Some(first) = self.cloud.logged.get(&dot) {
            let detail = format!("{}:{} is in the cloud's log twice, at offsets {first} and {offset}", dot.device.short(), dot.seq);
            self.cloud_violation(detail, None);
            return;
        }
        self.cloud.logged.insert(dot, offset);
        if let Some(idx) = self.acked_sale_of(entry) {
            self.acked[idx as usize].in_cloud_at = Some(self.now);
            self.not_in_cloud.remove(&idx);
        }
    }

    /// Every `CLOUD_CHECK_INTERVAL_US`: an acknowledged sale not yet in the cloud's log must get
    /// there within the liveness bound of the cloud being able to have it (the uplinks back after
    /// any outage, a tablet with 4G up, and the sale held on its side of the Wi-Fi), for as long as
    /// that lasts; an outage, a crash or a walk away restarts the count.
    pub(super) fn cloud_check(&mut self) {
        self.push(self.now + CLOUD_CHECK_INTERVAL_US, Ev::CloudCheck);
        if self.not_in_cloud.is_empty() {
            return;
        }
        let bound = (self.sc.liveness_bound_s * US_PER_S as f64) as u64;
        let uplinks: Vec<u32> = if self.uplink_outage() || self.now < self.uplinks_back_at {
            Vec::new()
        } else {
            (0..self.n()).filter(|d| self.devices[*d as usize].has_uplink && self.devices[*d as usize].up).collect()
        };
        let waiting: Vec<u32> = self.not_in_cloud.keys().copied().collect();
        for idx in waiting {
            let reachable = self.within_reach_of_an_uplink(self.acked[idx as usize].dot, &uplinks);
            let now = self.now;
            let since = self.not_in_cloud.get_mut(&idx).expect("listed above");
            if !reachable {
                *since = None;
                continue;
            }
            let since = *since.get_or_insert(now);
            if now - since <= bound {
                continue;
            }
            self.not_in_cloud.remove(&idx); // once per sale
            let sale = &self.acked[idx as usize];
            let (seller, t_ack) = (sale.device, sale.t_ack);
            let detail = format!(
                "sale {} (device {seller}, acknowledged at {:.1} s) is not in the cloud's log {} s after an uplink could carry it \
                 (since {:.1} s); uplinks: {}",
                sale_id(sale.dot),
                t_ack as f64 / US_PER_S as f64,
                self.sc.liveness_bound_s,
                since as f64 / US_PER_S as f64,
                self.uplinks_summary()
            );
            let uplink = uplinks.first().copied();
            self.cloud_violation(detail, uplink.or(Some(seller)));
        }
    }

    /// Whether a tablet with a running uplink (of `uplinks`, all up) holds the sale, or is on the
    /// same side of the Wi-Fi as an up tablet holding it.
    fn within_reach_of_an_uplink(&self, dot: Dot, uplinks: &[u32]) -> bool {
        let holds = |d: u32| {
            let dev = &self.devices[d as usize];
            dev.up && dev.ledger.heads_ref().get(&dot.device).is_some_and(|n| *n > dot.seq)
        };
        if uplinks.is_empty() {
            return false;
        }
        uplinks.iter().any(|&u| holds(u))
            || (0..self.n()).any(|h| holds(h) && uplinks.iter().any(|&u| !self.blocked(u, h) && !self.blocked(h, u)))
    }

    /// Each tablet with 4G: up or down, its uplink's failures in a row and last error.
    fn uplinks_summary(&self) -> String {
        let parts: Vec<String> = (0..self.n())
            .filter(|d| self.devices[*d as usize].has_uplink)
            .map(|d| match &self.devices[d as usize].uplink {
                None => format!("{d} down"),
                Some(u) => format!("{d} up ({} failures, last error {:?})", u.core.failures(), u.core.last_error()),
            })
            .collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }

    /// At the end of the run: the log holds what the ingest core counts, and every acknowledged
    /// sale that survived on a replica is in it.
    fn check_cloud_at_end(&mut self) {
        let (records, last, offset) = (self.cloud.records, self.cloud.last_offset, self.cloud.ingest.offset());
        if records != last || last != offset {
            let detail = format!("the cloud's log has {records} records up to offset {last}; its ingest core counts {offset}");
            self.cloud_violation(detail, None);
        }
        let missing: Vec<u32> = (0..self.acked.len() as u32).filter(|i| self.acked[*i as usize].in_cloud_at.is_none()).collect();
        let mut reported = 0;
        for idx in &missing {
            let dot = self.acked[*idx as usize].dot;
            let survived = self.devices.iter().any(|d| d.ledger.heads_ref().get(&dot.device).is_some_and(|n| *n > dot.seq));
            if !survived {
                continue;
            }
            reported += 1;
            let seller = self.acked[*idx as usize].device;
            let detail = format!(
                "sale {} (device {seller}) is on a replica but not in the cloud's log at the end ({} of {} sales missing); uplinks: {}",
                sale_id(dot),
                missing.len(),
                self.acked.len(),
                self.uplinks_summary()
            );
            self.cloud_violation(detail, Some(seller));
            if reported == 2 {
                break;
            }
        }
    }

    pub(super) fn check(&mut self) -> Vec<Violation> {
        let mut v = Vec::new();
        // Device n is the online channel: its timeline is the cloud's.
        let timeline = |w: &World, d: u32| w.devices.get(d as usize).map_or(&w.cloud.timeline, |x| &x.timeline).iter().cloned().collect::<Vec<_>>();
        let name = |d: Option<u32>| d.map_or("the cloud".to_string(), |d| format!("device {d}"));
        if self.converged_after_heal.is_none() {
            let first = self.devices[0].ledger.heads_ref();
            let lagging = self.replicas().find(|(_, l)| l.heads_ref() != first).map(|(d, _)| d);
            v.push(Violation {
                invariant: "replicas_identical_within_liveness_bound",
                detail: format!(
                    "replicas did not agree within {} s after the faults stopped{}",
                    self.sc.liveness_bound_s,
                    lagging.map_or(String::new(), |d| format!(": {} differs from device 0", name(d)))
                ),
                device: lagging.flatten(),
                timeline: lagging.flatten().map(|d| timeline(self, d)).unwrap_or_default(),
            });
        }
        let reference = self.devices[0].ledger.state().clone();
        for (d, ledger) in self.replicas() {
            let s = ledger.state();
            if s.products != reference.products || s.rights != reference.rights || s.sales != reference.sales {
                v.push(Violation {
                    invariant: "replicas_identical",
                    detail: format!("{} differs from device 0", name(d)),
                    device: d,
                    timeline: d.map(|d| timeline(self, d)).unwrap_or_default(),
                });
                break;
            }
        }
        for (id, &idx) in &self.acked_index {
            for (d, ledger) in self.replicas() {
                if !ledger.state().sales.contains_key(id) {
                    let seller = self.acked[idx as usize].device;
                    v.push(Violation {
                        invariant: "no_acknowledged_sale_lost",
                        detail: format!("sale {id}, acknowledged by device {seller}, is missing on {}", name(d)),
                        device: Some(seller).filter(|d| *d < self.n()),
                        timeline: timeline(self, seller),
                    });
                    break;
                }
            }
            if v.len() > 5 {
                break;
            }
        }
        if reference.sales.len() != self.acked.len() {
            v.push(Violation {
                invariant: "no_sale_duplicated_or_invented",
                detail: format!("{} sales in the state, {} acknowledged", reference.sales.len(), self.acked.len()),
                device: None,
                timeline: vec![],
            });
        }
        let mut sold: BTreeMap<&str, u64> = BTreeMap::new();
        for s in reference.sales.values() {
            for l in &s.lines {
                *sold.entry(&l.sku).or_default() += l.qty;
            }
        }
        for (sku, restocked) in &self.restocked {
            let held = reference.stock(sku).total;
            let s = sold.get(sku.as_str()).copied().unwrap_or(0);
            if held + s != *restocked {
                let broken = self.opts.broken_device;
                v.push(Violation {
                    invariant: "no_negative_stock",
                    detail: format!("{sku}: {restocked} restocked, {s} sold, {held} still held: stock was oversold"),
                    device: broken,
                    timeline: broken.map(|d| timeline(self, d)).unwrap_or_default(),
                });
                break;
            }
        }
        self.check_cloud_at_end();
        v.append(&mut self.cloud_violations);
        v.extend(self.check_loyalty());
        v.extend(self.check_drop());
        v
    }
}
