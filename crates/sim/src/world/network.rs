//! The simulated network: ordered streams with latency, loss and bandwidth, gossip-like
//! broadcasts with duplicates and reordering, dialling, and stream resets. The Wi-Fi joins the
//! tablets; the 4G uplink to the cloud is apart (`world/cloud.rs`): only outages and the tablet's
//! own crashes cut it.

use super::*;

impl World {
    /// Whether the Wi-Fi currently drops messages from tablet `from` to tablet `to`.
    pub(super) fn blocked(&self, from: u32, to: u32) -> bool {
        self.active_faults.iter().any(|&i| match &self.faults[i] {
            FaultSpec::Partition { groups, .. } => {
                // A tablet that walked (`move`) is on the side it walked to, whatever `groups` says.
                let side = |d: u32| self.moved.get(&d).copied().unwrap_or_else(|| groups.iter().position(|g| g.contains(&d)).unwrap_or(0));
                side(from) != side(to)
            }
            FaultSpec::Asymmetric { from: f, to: t, .. } => f.contains(&from) && t.contains(&to),
            FaultSpec::Isolate { device, .. } => from == *device || to == *device,
            _ => false,
        })
    }

    /// Whether every 4G uplink is down.
    pub(super) fn uplink_outage(&self) -> bool {
        self.active_faults.iter().any(|&i| matches!(self.faults[i], FaultSpec::UplinkOutage { .. }))
    }

    /// Whether tablet `dev` cannot reach the cloud: an outage, or the tablet is down.
    pub(super) fn uplink_cut(&self, dev: u32) -> bool {
        !self.devices[dev as usize].up || self.uplink_outage()
    }

    pub(super) fn transmit(&mut self, from: u32, to: u32, bytes: Payload, broadcast: Option<u64>) {
        debug_assert_eq!(broadcast.is_some(), matches!(bytes, Payload::Shared(_)), "only broadcasts share their bytes");
        let ordered = broadcast.is_none();
        let key = pair(from, to);
        let Some(conn) = self.conns.get(&key) else { return };
        let epoch = conn.epoch;
        self.messages += 1;
        self.bytes += bytes.len() as u64;
        self.hour().bytes += bytes.len() as u64;
        self.series.bytes(self.now, bytes.len() as u64);
        if self.blocked(from, to) {
            return; // the cable is cut: the bytes sit in a buffer that never drains
        }
        let net = &self.sc.network;
        let rng = &mut self.devices[from as usize].rng;
        if rng.gen_bool(net.loss) {
            if ordered {
                self.trace(Some(from), format!("stream to {to} reset"));
                self.teardown(from, to);
            }
            return;
        }
        let base = net.latency_ms;
        let tail = if net.latency_tail_ms > 0.0 { Exp::new(1.0 / net.latency_tail_ms).expect("positive").sample(rng) } else { 0.0 };
        let serialize_ms = bytes.len() as f64 * 8.0 / net.bandwidth_kbps.max(1.0);
        let mut delay_us = ((base + tail + serialize_ms) * 1000.0) as u64 + 1;
        let duplicate = !ordered && rng.gen_bool(net.duplicate);
        if !ordered && net.reorder_ms > 0.0 {
            delay_us += (rng.gen_range(0.0..net.reorder_ms) * 1000.0) as u64;
        }
        let mut at = self.now + delay_us;
        if ordered {
            let dir = (from > to) as usize;
            let conn = self.conns.get_mut(&key).expect("checked above");
            at = at.max(conn.last_deliver[dir]);
            conn.last_deliver[dir] = at;
        }
        if duplicate {
            self.push(at, Ev::Deliver { from, to, epoch, bytes: bytes.clone(), broadcast });
            self.push(at + delay_us, Ev::Deliver { from, to, epoch, bytes, broadcast });
        } else {
            self.push(at, Ev::Deliver { from, to, epoch, bytes, broadcast });
        }
    }

    pub(super) fn on_deliver(&mut self, from: u32, to: u32, epoch: u64, bytes: Payload, broadcast: Option<u64>) {
        let ordered = broadcast.is_none();
        match self.conns.get(&pair(from, to)) {
            Some(c) if c.epoch == epoch => {}
            _ => return, // the stream was reset since: its bytes are gone
        }
        if !self.devices[to as usize].up {
            return;
        }
        if ordered {
            self.devices[from as usize].sync.acked(&to, bytes.len());
        }
        // Gossipsub hands the application a broadcast once (its duplicate cache, by message id,
        // remembers for a minute) and forwards it to its own mesh peers.
        if let Some(h) = broadcast {
            let t = self.now;
            let seen = &mut self.devices[to as usize].seen;
            if seen.get(&h).is_some_and(|first| t.saturating_sub(*first) < GOSSIP_DUPLICATE_CACHE_US) {
                return;
            }
            remember_broadcast(seen, h, t);
            let peers: Vec<u32> = self.devices[to as usize].sync.peers().keys().copied().filter(|p| *p != from).collect();
            for p in peers {
                self.transmit(to, p, bytes.clone(), broadcast);
            }
        }
        let now = self.dev_now_ms(to);
        let out = self.protocol(|w| {
            let d = &mut w.devices[to as usize];
            let held = HeldLog { all: &w.all_changes, heads: d.ledger.heads_ref() };
            d.sync.receive(from, &bytes, now, d.ledger.heads_ref(), &held)
        });
        if out.is_empty() {
            return; // an idle heartbeat: it moved no timeout earlier (`Sync::poll_timeout`), the pending wake stands
        }
        self.execute(to, out);
    }

    pub(super) fn on_dial(&mut self, a: u32, b: u32) {
        let key = pair(a, b);
        if !self.wanted.contains(&key) || self.conns.contains_key(&key) || self.finished {
            return;
        }
        let (da, db) = (&self.devices[a as usize], &self.devices[b as usize]);
        if !da.up || !db.up || self.blocked(a, b) || self.blocked(b, a) {
            let t = self.now + self.sc.network.redial_ms * US_PER_MS;
            if da.up || db.up {
                self.push(t, Ev::Dial { a, b });
            }
            return;
        }
        self.epochs += 1;
        self.conns.insert(key, Conn { epoch: self.epochs, last_deliver: [0, 0] });
        self.trace(Some(a), format!("connected {b}"));
        for (x, y) in [(a, b), (b, a)] {
            let now = self.dev_now_ms(x);
            let out = self.protocol(|w| {
                let d = &mut w.devices[x as usize];
                d.sync.connected(y, now, d.ledger.heads_ref())
            });
            self.execute(x, out);
        }
    }

    pub(super) fn teardown(&mut self, a: u32, b: u32) {
        if self.conns.remove(&pair(a, b)).is_some() {
            self.devices[a as usize].sync.disconnected(&b);
            self.devices[b as usize].sync.disconnected(&a);
            let t = self.now + self.sc.network.redial_ms * US_PER_MS;
            self.push(t, Ev::Dial { a: a.min(b), b: a.max(b) });
        }
    }
}
