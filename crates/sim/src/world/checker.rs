//! The invariant checker: replicas agree within the liveness bound, no acknowledged sale is lost,
//! none is duplicated or invented, no stock is oversold.

use super::*;

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
        self.devices.iter().all(|d| d.up && d.ledger.pending_len() == 0 && d.ledger.heads_ref() == first)
    }

    pub(super) fn check(&mut self) -> Vec<Violation> {
        let mut v = Vec::new();
        let timeline = |w: &World, d: u32| w.devices[d as usize].timeline.iter().cloned().collect::<Vec<_>>();
        if self.converged_after_heal.is_none() {
            let lagging = (0..=self.n()).find(|d| self.devices[*d as usize].ledger.heads_ref() != self.devices[0].ledger.heads_ref());
            v.push(Violation {
                invariant: "replicas_identical_within_liveness_bound",
                detail: format!("replicas did not agree within {} s after the faults stopped", self.sc.liveness_bound_s),
                device: lagging,
                timeline: lagging.map(|d| timeline(self, d)).unwrap_or_default(),
            });
        }
        let reference = self.devices[0].ledger.state().clone();
        for (d, dev) in self.devices.iter().enumerate() {
            let s = dev.ledger.state();
            if s.products != reference.products || s.rights != reference.rights || s.sales != reference.sales {
                v.push(Violation {
                    invariant: "replicas_identical",
                    detail: format!("device {d} differs from device 0"),
                    device: Some(d as u32),
                    timeline: timeline(self, d as u32),
                });
                break;
            }
        }
        for (id, &idx) in &self.acked_index {
            for (d, dev) in self.devices.iter().enumerate() {
                if !dev.ledger.state().sales.contains_key(id) {
                    let seller = self.acked[idx as usize].device;
                    v.push(Violation {
                        invariant: "no_acknowledged_sale_lost",
                        detail: format!("sale {id}, acknowledged by device {seller}, is missing on device {d}"),
                        device: Some(seller),
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
        v
    }
}
