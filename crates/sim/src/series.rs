//! The run's time series at a resolution that fits its length: what happened bucket by bucket
//! (sales, refusals, replication lag, bytes, sessions, stock per side of the Wi-Fi split) and
//! every fault as a band in time. The world feeds a [`SeriesBuilder`]; the report carries the
//! finished [`Series`] and the HTML report draws it.

use serde::Serialize;

/// Bucket widths the series may use, seconds, smallest first: the first that covers the run in
/// at most [`MAX_BUCKETS`] buckets is taken (1 h: 10 s; 6-10 h: a minute).
pub const BUCKET_STEPS_S: [u64; 11] = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800];
/// Points per line: enough to see a five-minute partition in a ten-hour day, few enough that
/// a report of a 1,000-tablet day stays a few hundred kilobytes.
pub const MAX_BUCKETS: usize = 600;
/// SKUs whose stock the report follows per side: the scarcest (most refusals, then least stock).
pub const SCARCE_SKUS: usize = 3;
// The longest scenario (48 h, `scenario::validate`) plus its liveness phase fits the widest step.
const _: () = assert!(BUCKET_STEPS_S[BUCKET_STEPS_S.len() - 1] as usize * MAX_BUCKETS >= 49 * 3600);

const US_PER_S: u64 = 1_000_000;

/// A fault as it happened: from its start to its end (a crash until the restart; a clock jump or
/// a walk is an instant, `end_s == start_s`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FaultBand {
    pub kind: &'static str,
    /// What the fault did, short: "crash device 3", "partition [0-5] | [6-9]".
    pub label: String,
    pub start_s: f64,
    pub end_s: f64,
}

/// One SKU's units held by the tablets on one side of the Wi-Fi split, per bucket.
#[derive(Debug, Clone, Serialize)]
pub struct StockLine {
    pub sku: String,
    pub side: String,
    pub units: Vec<u64>,
}

/// Per bucket of `bucket_s` seconds from the start of the day to the end of the run (the
/// liveness phase included). Counters are per bucket; gauges are read at each bucket's end.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Series {
    pub bucket_s: u64,
    /// When the day ended and the liveness phase began, seconds.
    pub end_of_day_s: f64,
    pub sales: Vec<u64>,
    pub refused: Vec<u64>,
    /// Of the sales acknowledged in the bucket, how long until every replica held them, ms
    /// (`None`: no such sale converged).
    pub lag_ms_p50: Vec<Option<f64>>,
    pub lag_ms_p99: Vec<Option<f64>>,
    /// Bytes sent on the Wi-Fi, and over the 4G uplinks (requests and replies).
    pub bytes: Vec<u64>,
    pub uplink_bytes: Vec<u64>,
    /// Wi-Fi sessions open at the bucket's end, and tablets up.
    pub sessions: Vec<u64>,
    pub devices_up: Vec<u64>,
    /// Sales acknowledged and not yet in the cloud's log at the bucket's end.
    pub sales_not_in_cloud: Vec<u64>,
    pub scarce_stock: Vec<StockLine>,
    pub faults: Vec<FaultBand>,
}

/// The width for a run of `span_s` seconds.
pub fn bucket_s_for(span_s: f64) -> u64 {
    BUCKET_STEPS_S.iter().copied().find(|&b| (span_s / b as f64).ceil() as usize <= MAX_BUCKETS).unwrap_or(BUCKET_STEPS_S[BUCKET_STEPS_S.len() - 1])
}

/// Collects the series during a run. Gauges are sampled when virtual time first passes a bucket's
/// end (before the event that crosses it), so a bucket's gauge is the state at its end.
pub struct SeriesBuilder {
    pub bucket_us: u64,
    pub sales: Vec<u64>,
    pub refused: Vec<u64>,
    pub bytes: Vec<u64>,
    pub uplink_bytes: Vec<u64>,
    pub sessions: Vec<u64>,
    pub devices_up: Vec<u64>,
    pub sales_not_in_cloud: Vec<u64>,
    /// Per sampled bucket, units per (SKU index × sides + side).
    pub stock: Vec<Vec<u32>>,
    pub sides: usize,
    /// Refusals per SKU index, to pick the scarcest.
    pub refused_per_sku: Vec<u64>,
    pub faults: Vec<FaultBand>,
    /// Faults still open: (index into the scenario's faults or a device for crashes) → band index.
    pub open: Vec<(OpenFault, usize)>,
}

/// What closes an open band.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenFault {
    /// A timed fault, by its index in the world's fault list.
    Timed(usize),
    /// A crash: the device's restart closes it.
    Down(u32),
}

impl SeriesBuilder {
    pub fn new(span_s: f64, sides: usize, skus: usize) -> Self {
        let bucket_us = bucket_s_for(span_s) * US_PER_S;
        Self {
            bucket_us,
            sales: Vec::new(),
            refused: Vec::new(),
            bytes: Vec::new(),
            uplink_bytes: Vec::new(),
            sessions: Vec::new(),
            devices_up: Vec::new(),
            sales_not_in_cloud: Vec::new(),
            stock: Vec::new(),
            sides: sides.max(1),
            refused_per_sku: vec![0; skus],
            faults: Vec::new(),
            open: Vec::new(),
        }
    }

    pub fn bucket_of(&self, t_us: u64) -> usize {
        (t_us / self.bucket_us) as usize
    }

    /// The virtual time at which the next gauge sample is due.
    pub fn next_sample_us(&self) -> u64 {
        (self.sessions.len() as u64 + 1) * self.bucket_us
    }

    fn bump(v: &mut Vec<u64>, i: usize, by: u64) {
        if v.len() <= i {
            v.resize(i + 1, 0);
        }
        v[i] = v[i].saturating_add(by);
    }

    pub fn sale(&mut self, t_us: u64) {
        let b = self.bucket_of(t_us);
        Self::bump(&mut self.sales, b, 1);
    }

    pub fn refusal(&mut self, t_us: u64, sku: Option<usize>) {
        let b = self.bucket_of(t_us);
        Self::bump(&mut self.refused, b, 1);
        if let Some(slot) = sku.and_then(|i| self.refused_per_sku.get_mut(i)) {
            *slot += 1;
        }
    }

    pub fn bytes(&mut self, t_us: u64, n: u64) {
        let b = self.bucket_of(t_us);
        Self::bump(&mut self.bytes, b, n);
    }

    pub fn uplink_bytes(&mut self, t_us: u64, n: u64) {
        let b = self.bucket_of(t_us);
        Self::bump(&mut self.uplink_bytes, b, n);
    }

    pub fn fault_started(&mut self, t_us: u64, kind: &'static str, label: String, open: Option<OpenFault>) {
        let s = t_us as f64 / US_PER_S as f64;
        self.faults.push(FaultBand { kind, label, start_s: s, end_s: s });
        if let Some(o) = open {
            self.open.push((o, self.faults.len() - 1));
        }
    }

    pub fn fault_ended(&mut self, t_us: u64, which: OpenFault) {
        if let Some(pos) = self.open.iter().position(|(o, _)| *o == which) {
            let (_, band) = self.open.remove(pos);
            self.faults[band].end_s = t_us as f64 / US_PER_S as f64;
        }
    }

    /// The series of a run that ended at `end_us`: open faults end there; lag percentiles come
    /// from each acknowledged sale's (ack time, convergence time) in µs.
    pub fn finish(mut self, end_us: u64, end_of_day_us: u64, acked: &[(u64, Option<u64>)], sku_names: &[String], side_names: &[String]) -> Series {
        for (_, band) in std::mem::take(&mut self.open) {
            self.faults[band].end_s = end_us as f64 / US_PER_S as f64;
        }
        let buckets = self.bucket_of(end_us.saturating_sub(1)) + 1;
        let pad = |mut v: Vec<u64>| {
            v.resize(buckets, 0);
            v
        };
        let mut lags: Vec<Vec<f64>> = vec![Vec::new(); buckets];
        for &(ack, converged) in acked {
            if let (Some(c), Some(slot)) = (converged, lags.get_mut(self.bucket_of(ack))) {
                slot.push((c - ack) as f64 / 1000.0);
            }
        }
        let pct = |v: &mut Vec<f64>, p: f64| {
            v.sort_by(f64::total_cmp);
            (!v.is_empty()).then(|| v[((v.len() - 1) as f64 * p).round() as usize])
        };
        let lag_ms_p50 = lags.iter_mut().map(|v| pct(v, 0.5)).collect();
        let lag_ms_p99 = lags.iter_mut().map(|v| pct(v, 0.99)).collect();
        // The scarcest SKUs: most refusals, then the lowest stock reached, then catalogue order.
        let sides = self.sides;
        let min_total = |i: usize| self.stock.iter().map(|b| (0..sides).map(|s| u64::from(b[i * sides + s])).sum::<u64>()).min().unwrap_or(0);
        let mut order: Vec<usize> = (0..sku_names.len()).collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(self.refused_per_sku[i]), min_total(i), i));
        let mut scarce_stock = Vec::new();
        for &i in order.iter().take(SCARCE_SKUS) {
            for s in 0..sides {
                let mut units: Vec<u64> = self.stock.iter().map(|b| u64::from(b[i * sides + s])).collect();
                units.resize(buckets, units.last().copied().unwrap_or(0));
                scarce_stock.push(StockLine { sku: sku_names[i].clone(), side: side_names[s].clone(), units });
            }
        }
        let gauge = |mut v: Vec<u64>| {
            let last = v.last().copied().unwrap_or(0);
            v.resize(buckets, last);
            v
        };
        Series {
            bucket_s: self.bucket_us / US_PER_S,
            end_of_day_s: end_of_day_us as f64 / US_PER_S as f64,
            sales: pad(self.sales),
            refused: pad(self.refused),
            lag_ms_p50,
            lag_ms_p99,
            bytes: pad(self.bytes),
            uplink_bytes: pad(self.uplink_bytes),
            sessions: gauge(self.sessions),
            devices_up: gauge(self.devices_up),
            sales_not_in_cloud: gauge(self.sales_not_in_cloud),
            scarce_stock,
            faults: self.faults,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_fits_the_run() {
        assert_eq!(bucket_s_for(600.0), 1);
        assert_eq!(bucket_s_for(3600.0 + 30.0), 10);
        assert_eq!(bucket_s_for(2.0 * 3600.0), 15);
        assert_eq!(bucket_s_for(10.0 * 3600.0 + 300.0), 120);
        assert_eq!(bucket_s_for(6.0 * 3600.0), 60);
    }

    #[test]
    fn a_crash_band_runs_until_the_restart_and_an_open_one_until_the_end() {
        let mut b = SeriesBuilder::new(100.0, 1, 0);
        b.fault_started(10 * US_PER_S, "crash", "crash device 3".into(), Some(OpenFault::Down(3)));
        b.fault_started(20 * US_PER_S, "partition", "p".into(), Some(OpenFault::Timed(0)));
        b.fault_ended(40 * US_PER_S, OpenFault::Down(3));
        let s = b.finish(90 * US_PER_S, 80 * US_PER_S, &[], &[], &["all".into()]);
        assert_eq!((s.faults[0].start_s, s.faults[0].end_s), (10.0, 40.0));
        assert_eq!((s.faults[1].start_s, s.faults[1].end_s), (20.0, 90.0));
    }

    #[test]
    fn lag_percentiles_are_of_the_sales_acknowledged_in_each_bucket() {
        let b = SeriesBuilder::new(10.0, 1, 0);
        let acked = [(0, Some(10_000)), (500_000, Some(520_000)), (1_200_000, None), (1_500_000, Some(1_800_000))];
        let s = b.finish(3 * US_PER_S, 3 * US_PER_S, &acked, &[], &["all".into()]);
        assert_eq!(s.lag_ms_p50, vec![Some(20.0), Some(300.0), None]);
        assert_eq!(s.lag_ms_p99[0], Some(20.0));
    }
}
