//! Shrinking a failing run: delta debugging over the scenario. Faults (the random ones drawn
//! from the seed first written out as fixed ones), then the day's length, stalls, tablets per
//! stall, customers, products, the network's noise and loyalty are cut while the same invariant
//! still fails with the same seed. What is left is a scenario small enough to read.

use crate::scenario::{FaultSpec, NetworkSpec, Scenario};
use crate::world::fault_start_s;
use crate::{run, Options};

/// Simulator runs one shrink may spend: delta debugging is O(n log n) runs in the faults and the
/// rest is a few dozen; past this the smallest failing scenario so far is kept.
pub const MAX_SHRINK_RUNS: u32 = 400;
/// The day is not cut below this: a minute of market still has customers and a liveness phase.
const MIN_DURATION_H: f64 = 1.0 / 60.0;

/// The smallest failing scenario found.
#[derive(Debug, Clone)]
pub struct Shrunk {
    pub scenario: Scenario,
    /// The invariant that fails in the original run and in this one.
    pub invariant: &'static str,
    /// The deliberately broken device, renumbered if tablets were removed.
    pub broken_device: Option<u32>,
    pub runs: u32,
    /// Fault events before (fixed and drawn) and after.
    pub faults_before: usize,
    pub faults_after: usize,
    /// Every step that kept the failure, in order ("faults 42 -> 0", "stalls 5 -> 1", ...).
    pub steps: Vec<String>,
    /// Whether the run budget ran out before no cut was left to try.
    pub budget_exhausted: bool,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ShrinkError {
    #[error("seed {0} passes every invariant: there is nothing to shrink")]
    Passes(u64),
}

/// A candidate: the scenario and the broken device as numbered in it.
#[derive(Clone)]
struct Case {
    sc: Scenario,
    broken: Option<u32>,
}

struct Shrinker<'a> {
    opts: &'a Options,
    invariant: &'static str,
    runs: u32,
    jobs: usize,
    progress: &'a mut dyn FnMut(&str),
}

impl Shrinker<'_> {
    fn exhausted(&self) -> bool {
        self.runs >= MAX_SHRINK_RUNS
    }

    /// Whether the case still fails the same invariant (an invalid scenario does not).
    fn fails(opts: &Options, invariant: &str, c: &Case) -> bool {
        if c.sc.validate().is_err() {
            return false;
        }
        debug_assert!(c.broken.is_none_or(|d| d < c.sc.devices()), "a cut never removes the broken tablet");
        let o = Options { broken_device: c.broken, progress: false, trace_file: None, ..opts.clone() };
        run(&c.sc, o).violations.iter().any(|v| v.invariant == invariant)
    }

    /// The first of `cases`, in order, that still fails: run `jobs` at a time, so the answer is
    /// the same whatever the number of threads.
    fn first_failing(&mut self, cases: Vec<Case>) -> Option<Case> {
        for batch in cases.chunks(self.jobs.max(1)) {
            if self.exhausted() {
                return None;
            }
            let batch: Vec<&Case> = batch.iter().take((MAX_SHRINK_RUNS - self.runs) as usize).collect();
            self.runs += batch.len() as u32;
            let (opts, invariant) = (self.opts, self.invariant);
            let verdicts: Vec<bool> = std::thread::scope(|s| {
                let handles: Vec<_> = batch.iter().map(|c| s.spawn(move || Self::fails(opts, invariant, c))).collect();
                handles.into_iter().map(|h| h.join().expect("a simulator run does not panic")).collect()
            });
            if let Some(i) = verdicts.iter().position(|f| *f) {
                return Some(batch[i].clone());
            }
        }
        None
    }

    /// Delta debugging (ddmin) over the faults: the smallest subset found that still fails.
    fn faults(&mut self, case: Case) -> Case {
        let with = |faults: Vec<FaultSpec>| Case { sc: Scenario { faults, ..case.sc.clone() }, broken: case.broken };
        if let Some(c) = self.first_failing(vec![with(Vec::new())]) {
            return c;
        }
        let mut items = case.sc.faults.clone();
        let mut n = 2usize;
        while items.len() >= 2 && !self.exhausted() {
            let size = items.len().div_ceil(n);
            let chunks: Vec<Vec<FaultSpec>> = items.chunks(size).map(|c| c.to_vec()).collect();
            let complements: Vec<Vec<FaultSpec>> = (0..chunks.len())
                .map(|i| chunks.iter().enumerate().filter(|(j, _)| *j != i).flat_map(|(_, c)| c.clone()).collect())
                .collect();
            if let Some(c) = self.first_failing(chunks.iter().cloned().map(with).collect()) {
                items = c.sc.faults;
                n = 2;
                continue;
            }
            if chunks.len() > 2 {
                if let Some(c) = self.first_failing(complements.into_iter().map(with).collect()) {
                    items = c.sc.faults;
                    n = (n - 1).max(2);
                    continue;
                }
            }
            if n >= items.len() {
                break;
            }
            n = (n * 2).min(items.len());
        }
        with(items)
    }

    /// Tries one cut after another, smallest scenario first; keeps the first that still fails.
    fn try_cuts(&mut self, case: &Case, what: &str, cuts: Vec<Case>, steps: &mut Vec<String>, show: impl Fn(&Case) -> String) -> Option<Case> {
        let cuts: Vec<Case> = cuts.into_iter().filter(|c| c.sc.validate().is_ok()).collect();
        let found = self.first_failing(cuts)?;
        let line = format!("{what} {} -> {}", show(case), show(&found));
        (self.progress)(&line);
        steps.push(line);
        Some(found)
    }
}

/// Renumbers devices for a market of `stalls` × `dps` cut from one of `old_dps` per stall:
/// tablet k of stall s keeps its place if both remain, else it is gone.
fn renumber(d: u32, old_dps: u32, stalls: u32, dps: u32) -> Option<u32> {
    let (s, k) = (d / old_dps, d % old_dps);
    (s < stalls && k < dps).then_some(s * dps + k)
}

/// The faults of a market cut to `stalls` × `dps`: those naming a gone tablet go, lists lose
/// their gone tablets (a partition or one-way loss left with an empty side goes).
fn cut_faults(faults: &[FaultSpec], old_dps: u32, stalls: u32, dps: u32) -> Vec<FaultSpec> {
    let map = |d: u32| renumber(d, old_dps, stalls, dps);
    let list = |v: &[u32]| v.iter().filter_map(|d| map(*d)).collect::<Vec<u32>>();
    faults
        .iter()
        .filter_map(|f| {
            let mut f = f.clone();
            match &mut f {
                FaultSpec::Partition { groups, .. } => {
                    *groups = groups.iter().map(|g| list(g)).collect();
                    if groups.iter().filter(|g| !g.is_empty()).count() == 0 {
                        return None;
                    }
                }
                FaultSpec::Asymmetric { from, to, .. } => {
                    (*from, *to) = (list(from), list(to));
                    if from.is_empty() || to.is_empty() {
                        return None;
                    }
                }
                FaultSpec::Isolate { device, .. }
                | FaultSpec::Crash { device, .. }
                | FaultSpec::ClockJump { device, .. }
                | FaultSpec::Move { device, .. } => *device = map(*device)?,
                FaultSpec::UplinkOutage { .. } => {}
            }
            Some(f)
        })
        .collect()
}

/// The case in a market cut to `stalls` × `dps` tablets (faults and the broken tablet renumbered),
/// or `None` if the cut would remove the broken tablet: its failure is what is being kept.
fn cut_market(c: &Case, stalls: u32, dps: u32) -> Option<Case> {
    let old_dps = c.sc.market.devices_per_stall;
    let broken = match c.broken {
        Some(d) => Some(renumber(d, old_dps, stalls, dps)?),
        None => None,
    };
    let mut n = c.clone();
    n.sc.faults = cut_faults(&c.sc.faults, old_dps, stalls, dps);
    n.sc.market.stalls = stalls;
    n.sc.market.devices_per_stall = dps;
    n.sc.customers.selling_devices_per_stall = n.sc.customers.selling_devices_per_stall.min(dps);
    n.broken = broken;
    Some(n)
}

/// Shrinks a failing run of `sc` with `opts` (its seed, its broken build). `progress` hears each
/// cut that kept the failure.
pub fn shrink(sc: &Scenario, opts: &Options, jobs: usize, progress: &mut dyn FnMut(&str)) -> Result<Shrunk, ShrinkError> {
    let first = run(sc, Options { progress: false, trace_file: None, ..opts.clone() });
    let Some(v) = first.violations.first() else { return Err(ShrinkError::Passes(opts.seed)) };
    let invariant = v.invariant;
    // The random faults as fixed ones, in the order the world draws them: the same run.
    let mut start = sc.clone();
    start.faults.extend(crate::world::drawn_faults(sc, opts.seed));
    start.random_faults = Default::default();
    let faults_before = start.faults.len();
    let mut s = Shrinker { opts, invariant, runs: 1, jobs, progress };
    let mut case = Case { sc: start, broken: opts.broken_device };
    let mut steps = Vec::new();
    loop {
        let before = toml::to_string(&case.sc).expect("a scenario serialises");
        // Stalls, then tablets per stall, first: every later run is of a smaller market.
        let stalls = case.sc.market.stalls;
        let mut stall_counts: Vec<u32> = vec![1, stalls / 2, stalls - 1];
        stall_counts.retain(|k| *k >= 1 && *k < stalls);
        stall_counts.dedup();
        let dps = case.sc.market.devices_per_stall;
        let cuts = stall_counts.iter().filter_map(|&k| cut_market(&case, k, dps)).collect();
        if let Some(c) = s.try_cuts(&case, "stalls", cuts, &mut steps, |c| c.sc.market.stalls.to_string()) {
            case = c;
        }
        let (stalls, dps) = (case.sc.market.stalls, case.sc.market.devices_per_stall);
        let mut dps_counts: Vec<u32> = vec![1, dps - 1];
        dps_counts.retain(|k| *k >= 1 && *k < dps);
        dps_counts.dedup();
        let cuts = dps_counts.iter().filter_map(|&k| cut_market(&case, stalls, k)).collect();
        if let Some(c) = s.try_cuts(&case, "tablets per stall", cuts, &mut steps, |c| c.sc.market.devices_per_stall.to_string()) {
            case = c;
        }
        // Customers and products (fewer products run out sooner, so a day may then be cut shorter).
        let rate = case.sc.customers.arrivals_per_stall_per_hour;
        let cuts = [rate / 4.0, rate / 2.0]
            .into_iter()
            .filter(|r| *r >= 1.0)
            .map(|r| {
                let mut c = case.clone();
                c.sc.customers.arrivals_per_stall_per_hour = r;
                c.sc.customers.hourly_profile.clear();
                c
            })
            .collect();
        if let Some(c) = s.try_cuts(&case, "customers per stall per hour", cuts, &mut steps, |c| c.sc.customers.arrivals_per_stall_per_hour.to_string())
        {
            case = c;
        }
        let pps = case.sc.market.products_per_stall;
        let cuts = [1, pps / 2]
            .into_iter()
            .filter(|k| *k >= 1 && *k < pps)
            .map(|k| {
                let mut c = case.clone();
                c.sc.market.products_per_stall = k;
                c
            })
            .collect();
        if let Some(c) = s.try_cuts(&case, "products per stall", cuts, &mut steps, |c| c.sc.market.products_per_stall.to_string()) {
            case = c;
        }
        // The shortest day that still fails, down to just after the last fault starts.
        let last_fault_s = case.sc.faults.iter().map(fault_start_s).fold(0.0, f64::max);
        let h = case.sc.duration_h;
        let mut durations: Vec<f64> = vec![(last_fault_s + 60.0) / 3600.0, h / 16.0, h / 8.0, h / 4.0, h / 2.0];
        durations.retain(|h| *h >= MIN_DURATION_H && *h < case.sc.duration_h);
        durations.sort_by(f64::total_cmp);
        let cuts = durations
            .iter()
            .map(|&h| {
                let mut c = case.clone();
                c.sc.duration_h = h;
                c.sc.faults.retain(|f| fault_start_s(f) < h * 3600.0);
                c
            })
            .collect();
        if let Some(c) = s.try_cuts(&case, "hours", cuts, &mut steps, |c| format!("{:.3}", c.sc.duration_h)) {
            case = c;
        }
        // Faults.
        let n = case.sc.faults.len();
        if n > 0 {
            let cut = s.faults(case.clone());
            if cut.sc.faults.len() < n {
                let line = format!("faults {n} -> {}", cut.sc.faults.len());
                (s.progress)(&line);
                steps.push(line);
                case = cut;
            }
        }
        // Noise: a quiet network, no loyalty customers.
        let quiet = NetworkSpec { loss: 0.0, duplicate: 0.0, reorder_ms: 0.0, latency_tail_ms: 0.0, ..case.sc.network.clone() };
        let noisy = |n: &NetworkSpec| n.loss > 0.0 || n.duplicate > 0.0 || n.reorder_ms > 0.0 || n.latency_tail_ms > 0.0;
        if noisy(&case.sc.network) {
            let mut c = case.clone();
            c.sc.network = quiet;
            let show = |c: &Case| format!("loss {} duplicate {} reorder {} ms tail {} ms", c.sc.network.loss, c.sc.network.duplicate, c.sc.network.reorder_ms, c.sc.network.latency_tail_ms);
            if let Some(c) = s.try_cuts(&case, "network", vec![c], &mut steps, show) {
                case = c;
            }
        }
        if case.sc.loyalty.is_some() {
            let mut c = case.clone();
            c.sc.loyalty = None;
            if let Some(c) = s.try_cuts(&case, "loyalty", vec![c], &mut steps, |c| if c.sc.loyalty.is_some() { "on" } else { "off" }.into()) {
                case = c;
            }
        }
        // Another pass only if this one cut something: a cut can open others (fewer faults, a
        // shorter day).
        if toml::to_string(&case.sc).expect("a scenario serialises") == before || s.exhausted() {
            break;
        }
    }
    if !case.sc.name.ends_with("-shrunk") {
        case.sc.name = format!("{}-shrunk", case.sc.name);
    }
    Ok(Shrunk {
        faults_after: case.sc.faults.len(),
        invariant,
        broken_device: case.broken,
        runs: s.runs,
        faults_before,
        steps,
        budget_exhausted: s.exhausted(),
        scenario: case.sc,
    })
}

impl Shrunk {
    /// The minimal scenario as a scenario file.
    pub fn toml(&self) -> String {
        let head = format!(
            "# Shrunk from a failing run ({}): {} fault events -> {}, in {} runs.\n# Cuts that kept the failure: {}.\n",
            self.invariant,
            self.faults_before,
            self.faults_after,
            self.runs,
            if self.steps.is_empty() { "none".to_string() } else { self.steps.join("; ") }
        );
        head + &toml::to_string(&self.scenario).expect("a scenario serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutting_the_market_renumbers_tablets_and_drops_faults_on_gone_ones() {
        // 3 stalls x 2 tablets cut to 2 x 1: tablet 2 (stall 1, first) becomes 1; 3 and 5 go.
        let faults = vec![
            FaultSpec::Crash { at_s: 1.0, down_s: 1.0, device: 2, lose_unsynced: false },
            FaultSpec::Crash { at_s: 1.0, down_s: 1.0, device: 3, lose_unsynced: false },
            FaultSpec::Partition { at_s: 1.0, duration_s: 1.0, groups: vec![vec![0, 1, 2], vec![3, 5]] },
            FaultSpec::Asymmetric { at_s: 1.0, duration_s: 1.0, from: vec![5], to: vec![0] },
        ];
        let cut = cut_faults(&faults, 2, 2, 1);
        assert_eq!(
            cut,
            vec![
                FaultSpec::Crash { at_s: 1.0, down_s: 1.0, device: 1, lose_unsynced: false },
                FaultSpec::Partition { at_s: 1.0, duration_s: 1.0, groups: vec![vec![0, 1], vec![]] },
            ]
        );
    }
}
