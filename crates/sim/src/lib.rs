//! The market simulator: a whole market day from a seed, in virtual time, running the real ledger,
//! sync and cloud code (the same `stallmesh-ledger`, `stallmesh-sync` and `stallmesh-ingest` state
//! machines the node and the cloud drive), with faults and invariant checks. See
//! `simulations/README.md` for the scenario format.

pub mod report;
pub mod html;
pub mod scenario;
pub mod series;
pub mod shrink;
pub mod world;

pub use report::{CloudReport, Report};
pub use scenario::Scenario;
pub use series::Series;
pub use shrink::{shrink, ShrinkError, Shrunk};
pub use world::{BrokenCloud, Options, RunResult, Violation, CLOUD_INVARIANT, UPLINK_REQUEST_TIMEOUT_MS};

/// Runs one scenario with one seed.
pub fn run(scenario: &Scenario, opts: Options) -> RunResult {
    let mut r = world::World::new(scenario.clone(), opts).run();
    r.report.digest = r.digest.clone();
    r
}

/// Where two runs of the same scenario and seed first differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    pub event: u64,
    pub first: String,
    pub second: String,
}

/// Runs the scenario twice with the same seed; `None` if both traces are identical.
pub fn check_determinism(scenario: &Scenario, seed: u64) -> (String, Option<Divergence>) {
    let opts = Options { seed, keep_event_hashes: true, ..Default::default() };
    let a = run(scenario, opts.clone());
    let b = run(scenario, opts);
    if a.digest == b.digest && a.event_hashes == b.event_hashes {
        return (a.digest, None);
    }
    let i = a.event_hashes.iter().zip(&b.event_hashes).position(|(x, y)| x != y).unwrap_or(a.event_hashes.len().min(b.event_hashes.len()));
    let capture = || {
        run(scenario, Options { seed, capture_event: Some(i as u64 + 1), ..Default::default() })
            .captured
            .unwrap_or_else(|| "(no event)".to_string())
    };
    let first = capture();
    let second = capture();
    (a.digest, Some(Divergence { event: i as u64, first, second }))
}

/// Runs seeds `seeds` on `jobs` threads; returns each seed's result summary, in seed order.
pub fn sweep(scenario: &Scenario, seeds: std::ops::Range<u64>, jobs: usize) -> Vec<(u64, Report, Vec<Violation>)> {
    sweep_with(scenario, seeds, jobs, &Options::default(), &|_, _| {})
}

/// [`sweep`] with `base`'s options (a broken build; its seed is each seed's), calling `on_seed`
/// as each seed finishes (in any order: for a progress bar). The reports keep their summaries,
/// not their time series (a thousand seeds stay small).
pub fn sweep_with(
    scenario: &Scenario,
    seeds: std::ops::Range<u64>,
    jobs: usize,
    base: &Options,
    on_seed: &(dyn Fn(u64, &[Violation]) + std::marker::Sync),
) -> Vec<(u64, Report, Vec<Violation>)> {
    let seeds: Vec<u64> = seeds.collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&seed) = seeds.get(i) else { break };
                let opts = Options { seed, progress: false, trace_file: None, keep_event_hashes: false, capture_event: None, ..base.clone() };
                let mut r = run(scenario, opts);
                r.report.series = Series::default();
                on_seed(seed, &r.violations);
                results.lock().expect("results lock").push((seed, r.report, r.violations));
            });
        }
    });
    let mut out = results.into_inner().expect("results lock");
    out.sort_by_key(|(seed, _, _)| *seed);
    out
}

/// A sweep's results in a few numbers: sales per day and convergence p99 over the seeds, and the
/// failing seeds grouped by the invariant each broke first (what `stallmesh sim --seeds` and the
/// measurement harness print).
#[derive(Debug, Clone, PartialEq)]
pub struct SweepSummary {
    pub seeds: usize,
    /// Sales per day: median, min, max.
    pub sales: (u64, u64, u64),
    /// Convergence p99 in ms: median over the seeds, and the worst.
    pub convergence_p99_ms: (f64, f64),
    /// Invariant → the seeds that broke it first, in seed order.
    pub failing: std::collections::BTreeMap<&'static str, Vec<u64>>,
}

impl SweepSummary {
    /// `None` for an empty sweep.
    pub fn of(results: &[(u64, Report, Vec<Violation>)]) -> Option<SweepSummary> {
        if results.is_empty() {
            return None;
        }
        let mut sales: Vec<u64> = results.iter().map(|(_, r, _)| r.sales).collect();
        sales.sort_unstable();
        let mut p99: Vec<f64> = results.iter().map(|(_, r, _)| r.convergence_ms_p99).collect();
        p99.sort_by(f64::total_cmp);
        let mut failing = std::collections::BTreeMap::<&'static str, Vec<u64>>::new();
        for (seed, _, v) in results {
            if let Some(first) = v.first() {
                failing.entry(first.invariant).or_default().push(*seed);
            }
        }
        Some(SweepSummary {
            seeds: results.len(),
            sales: (sales[sales.len() / 2], sales[0], sales[sales.len() - 1]),
            convergence_p99_ms: (p99[p99.len() / 2], p99[p99.len() - 1]),
            failing,
        })
    }
}

impl std::fmt::Display for SweepSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (median, min, max) = self.sales;
        let (p99_median, p99_worst) = self.convergence_p99_ms;
        write!(
            f,
            "{} seeds: sales per day median {median} (min {min}, max {max}); convergence p99 median {p99_median:.1} ms, worst {p99_worst:.1} ms",
            self.seeds
        )
    }
}
