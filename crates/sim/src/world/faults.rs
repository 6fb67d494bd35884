//! Faults: partitions, tablets walking between their sides, one-way loss, isolation, uplink
//! outages, crashes (losing what was not yet durable) and restarts from the store, clock jumps; the
//! end of the day, when they all stop.

use super::*;

impl World {
    pub(super) fn fault_start(&mut self, i: usize) {
        if self.day_over {
            return;
        }
        let f = self.faults[i].clone();
        let kind = fault_kind(&f);
        *self.faults_fired.entry(kind.to_string()).or_default() += 1;
        self.trace(None, format!("fault start {kind} {f:?}"));
        let open = match f {
            FaultSpec::Crash { device, .. } => Some(OpenFault::Down(device)),
            FaultSpec::ClockJump { .. } | FaultSpec::Move { .. } => None,
            _ => Some(OpenFault::Timed(i)),
        };
        self.series.fault_started(self.now, kind, fault_label(&f), open);
        match f {
            FaultSpec::Crash { device, down_s, lose_unsynced, .. } => {
                self.crash(device, lose_unsynced);
                let t = self.now + (down_s * US_PER_S as f64) as u64;
                self.push(t, Ev::Restart { dev: device });
            }
            FaultSpec::ClockJump { device, jump_ms, .. } => {
                self.devices[device as usize].clock_offset_us += jump_ms * 1000;
            }
            // Instantaneous, as a partition's start: sessions to the old side go silent and time
            // out; the new side's, refused while blocked, are redialled.
            FaultSpec::Move { device, side, .. } => {
                self.moved.insert(device, side);
                self.trace(Some(device), format!("walked to side {side}"));
            }
            FaultSpec::Partition { duration_s, .. }
            | FaultSpec::Asymmetric { duration_s, .. }
            | FaultSpec::Isolate { duration_s, .. }
            | FaultSpec::UplinkOutage { duration_s, .. } => {
                self.active_faults.insert(i);
                let t = self.now + (duration_s * US_PER_S as f64) as u64;
                self.push(t, Ev::FaultEnd(i));
            }
        }
    }

    pub(super) fn fault_end(&mut self, i: usize) {
        if self.active_faults.remove(&i) {
            self.series.fault_ended(self.now, OpenFault::Timed(i));
            self.trace(None, format!("fault end {}", fault_kind(&self.faults[i])));
            if matches!(self.faults[i], FaultSpec::UplinkOutage { .. }) {
                self.uplinks_back_at = self.now + UPLINK_RECOVERY_US;
            }
        }
    }

    pub(super) fn crash(&mut self, dev: u32, lose_unsynced: bool) {
        let d = &mut self.devices[dev as usize];
        if !d.up {
            return;
        }
        d.up = false;
        if lose_unsynced {
            d.unsynced.clear();
        } else {
            let entries = std::mem::take(&mut d.unsynced);
            d.store(entries);
        }
        let mut peers: Vec<(u32, u32)> = self.conns.keys().filter(|(a, b)| *a == dev || *b == dev).copied().collect();
        peers.sort_unstable(); // torn down in pair order: `conns` is hashed
        for (a, b) in peers {
            self.teardown(a, b);
        }
        self.drop_waiting(Some(dev));
        self.stop_uplink(dev);
        let policy = self.sc.rebalance;
        let d = &mut self.devices[dev as usize];
        let lost = std::mem::replace(&mut d.rebalancer, Rebalancer::new(policy));
        let a = &mut self.asks_before_restarts;
        (a.for_sale, a.refill, a.rate_limited) =
            (a.for_sale + lost.stats().for_sale, a.refill + lost.stats().refill, a.rate_limited + lost.stats().rate_limited);
        self.trace(Some(dev), format!("crash lose_unsynced={lose_unsynced}"));
    }

    pub(super) fn restart(&mut self, dev: u32) {
        let d = &mut self.devices[dev as usize];
        if d.up {
            return;
        }
        let key = DeviceKey::from_secret(d.key_secret);
        let restored = self.protocol(|w| {
            let d = &w.devices[dev as usize];
            Ledger::restore(w.ctx.clone(), key, d.cert.clone(), d.durable.iter().map(|e| (**e).clone()))
        });
        let open_docs = open_docs_per_replica(self.n());
        let d = &mut self.devices[dev as usize];
        match restored {
            Ok(mut ledger) => {
                ledger.set_open_docs_limit(open_docs);
                ledger.allow_overspend_for_tests = d.broken;
                d.ledger = ledger;
            }
            Err(e) => {
                self.trace(Some(dev), format!("restore failed: {e}"));
                return;
            }
        }
        let d = &mut self.devices[dev as usize];
        d.sync = SyncCore::new(SyncConfig {
            heartbeat_ms: self.sc.network.heartbeat_ms,
            liveness_timeout_ms: self.sc.network.liveness_timeout_ms,
        });
        d.up = true;
        self.series.fault_ended(self.now, OpenFault::Down(dev));
        self.trace(Some(dev), "restart".into());
        self.start_uplink(dev);
        let pairs: Vec<(u32, u32)> = self.wanted.iter().filter(|(a, b)| *a == dev || *b == dev).copied().collect();
        for (a, b) in pairs {
            self.push(self.now, Ev::Dial { a, b });
        }
    }

    pub(super) fn end_of_day(&mut self) {
        self.day_over = true;
        self.end_of_day_at = self.now;
        self.trace(None, "end of day: faults stop, liveness phase".into());
        self.drop_waiting(None);
        if self.uplink_outage() {
            self.uplinks_back_at = self.now + UPLINK_RECOVERY_US;
        }
        for i in std::mem::take(&mut self.active_faults) {
            self.series.fault_ended(self.now, OpenFault::Timed(i));
        }
        self.moved.clear();
        for d in 0..self.n() {
            if !self.devices[d as usize].up {
                self.restart(d);
            }
        }
        let wanted: Vec<(u32, u32)> = self.wanted.iter().copied().collect();
        for (a, b) in wanted {
            self.push(self.now, Ev::Dial { a, b });
        }
        self.push(self.now + US_PER_S / 4, Ev::LivenessCheck);
    }
}

pub(crate) fn fault_at(f: &FaultSpec) -> f64 {
    match f {
        FaultSpec::Partition { at_s, .. }
        | FaultSpec::Asymmetric { at_s, .. }
        | FaultSpec::Isolate { at_s, .. }
        | FaultSpec::UplinkOutage { at_s, .. }
        | FaultSpec::Crash { at_s, .. }
        | FaultSpec::ClockJump { at_s, .. }
        | FaultSpec::Move { at_s, .. } => *at_s,
    }
}

/// Device numbers as ranges: "0-5, 8, 10-12".
pub(super) fn ranges(devices: &[u32]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < devices.len() {
        let mut j = i;
        while j + 1 < devices.len() && devices[j + 1] == devices[j] + 1 {
            j += 1;
        }
        out.push(if j == i { devices[i].to_string() } else { format!("{}-{}", devices[i], devices[j]) });
        i = j + 1;
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(", ")
    }
}

/// What a fault does, in a few words, for plots and tables.
pub fn fault_label(f: &FaultSpec) -> String {
    let sorted = |v: &[u32]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v.dedup();
        ranges(&v)
    };
    match f {
        FaultSpec::Partition { groups, .. } => {
            format!("partition {}", groups.iter().map(|g| sorted(g)).collect::<Vec<_>>().join(" | "))
        }
        FaultSpec::Move { device, side, .. } => format!("tablet {device} walks to side {side}"),
        FaultSpec::Asymmetric { from, to, .. } => format!("one-way loss {} to {}", sorted(from), sorted(to)),
        FaultSpec::Isolate { device, .. } => format!("tablet {device} off the Wi-Fi"),
        FaultSpec::UplinkOutage { .. } => "4G outage".into(),
        FaultSpec::Crash { device, lose_unsynced, .. } => {
            format!("tablet {device} crashes{}", if *lose_unsynced { ", loses unsynced" } else { "" })
        }
        FaultSpec::ClockJump { device, jump_ms, .. } => format!("tablet {device} clock {jump_ms:+} ms"),
    }
}

pub fn fault_kind(f: &FaultSpec) -> &'static str {
    match f {
        FaultSpec::Partition { .. } => "partition",
        FaultSpec::Asymmetric { .. } => "asymmetric",
        FaultSpec::Isolate { .. } => "isolate",
        FaultSpec::UplinkOutage { .. } => "uplink_outage",
        FaultSpec::Crash { .. } => "crash",
        FaultSpec::ClockJump { .. } => "clock_jump",
        FaultSpec::Move { .. } => "move",
    }
}

/// Random faults for the whole day, drawn up front from their own stream per device.
pub(crate) fn random_faults(sc: &Scenario, seed: u64) -> Vec<FaultSpec> {
    let rf = &sc.random_faults;
    let day_s = sc.duration_h * 3600.0;
    let mut out = Vec::new();
    for d in 0..sc.devices() {
        let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, "faults", d as u64));
        let mut draw = |rate_per_h: f64, out: &mut Vec<FaultSpec>, make: &mut dyn FnMut(f64, &mut ChaCha8Rng) -> FaultSpec| {
            if rate_per_h <= 0.0 {
                return;
            }
            let exp = Exp::new(rate_per_h / 3600.0).expect("positive rate");
            let mut t = exp.sample(&mut rng);
            while t < day_s {
                out.push(make(t, &mut rng));
                t += exp.sample(&mut rng);
            }
        };
        draw(rf.crashes_per_device_per_hour, &mut out, &mut |t, _| FaultSpec::Crash {
            at_s: t,
            down_s: rf.crash_down_s.max(1.0),
            device: d,
            lose_unsynced: rf.crash_loses_unsynced,
        });
        draw(rf.isolations_per_device_per_hour, &mut out, &mut |t, _| FaultSpec::Isolate {
            at_s: t,
            duration_s: rf.isolation_s.max(1.0),
            device: d,
        });
        draw(rf.clock_jumps_per_device_per_hour, &mut out, &mut |t, r| FaultSpec::ClockJump {
            at_s: t,
            device: d,
            jump_ms: (r.gen_range(-1.0..=1.0) * rf.clock_jump_max_ms) as i64,
        });
    }
    out
}
