//! `stallmesh sim`: runs a scenario (or a sweep of seeds), prints the report, checks invariants.

use crate::cli::SimArgs;
use stallmesh_sim::{check_determinism, run, shrink, sweep_with, Options, Scenario, SweepSummary, Violation};
use std::path::Path;

/// Past this many seeds a sweep prints a summary instead of a line per seed.
const SWEEP_LINES_MAX: usize = 50;
/// Seeds in one sweep: each keeps its report summary (about a kilobyte) until the end, and a
/// million is weeks of runs on a laptop; a mistyped range is refused, not started.
const MAX_SWEEP_SEEDS: u64 = 1_000_000;

fn replay_line(args: &SimArgs, seed: u64) -> String {
    replay(&args.scenario, seed, args.broken_allow_overspend)
}

fn replay(scenario: &Path, seed: u64, broken: Option<u32>) -> String {
    let mut line = format!("stallmesh sim {} --seed {seed}", scenario.display());
    if let Some(d) = broken {
        line.push_str(&format!(" --broken-allow-overspend {d}"));
    }
    line
}

/// `--shrink`: the failing run cut down to the smallest scenario that still fails the same way.
fn run_shrink(args: &SimArgs, scenario: &Scenario) -> Result<u8, String> {
    let opts = Options { seed: args.seed, broken_device: args.broken_allow_overspend, ..Default::default() };
    println!("shrinking {} seed {} ...", args.scenario.display(), args.seed);
    let shrunk = match shrink(scenario, &opts, args.jobs, &mut |step| println!("  kept failing with {step}")) {
        Ok(s) => s,
        Err(e) => {
            println!("{e}");
            return Ok(0);
        }
    };
    let dir = args.out.clone().unwrap_or_else(|| ".".into());
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let stem = args.scenario.file_stem().map_or("scenario".into(), |s| s.to_string_lossy().to_string());
    let path = dir.join(format!("{stem}-seed{}-shrunk.toml", args.seed));
    std::fs::write(&path, shrunk.toml()).map_err(|e| format!("{}: {e}", path.display()))?;
    println!(
        "shrunk: {} still fails with {} fault events (from {}), {} stalls x {} tablets, {:.3} h, in {} runs{}",
        shrunk.invariant,
        shrunk.faults_after,
        shrunk.faults_before,
        shrunk.scenario.market.stalls,
        shrunk.scenario.market.devices_per_stall,
        shrunk.scenario.duration_h,
        shrunk.runs,
        if shrunk.budget_exhausted { " (the run budget ran out: it may shrink further)" } else { "" }
    );
    println!("scenario: {}", path.display());
    println!("replay: {}", replay(&path, args.seed, shrunk.broken_device));
    Ok(1)
}

fn print_violations(args: &SimArgs, seed: u64, violations: &[Violation]) {
    println!("\nINVARIANT VIOLATED (seed {seed}):");
    for v in violations {
        println!("  {}: {}", v.invariant, v.detail);
        if let Some(d) = v.device {
            println!("  timeline of device {d} (virtual µs, device, event):");
            for line in &v.timeline {
                println!("    {line}");
            }
        }
    }
    println!("replay: {}", replay_line(args, seed));
}

/// Returns the process exit code: 0 when every invariant held.
pub fn run_sim(args: SimArgs) -> Result<u8, String> {
    let scenario = Scenario::load(&args.scenario).map_err(|e| e.to_string())?;
    if args.check_determinism {
        let (digest, divergence) = check_determinism(&scenario, args.seed);
        return Ok(match divergence {
            None => {
                println!("deterministic: two runs of seed {} gave the same trace, digest {digest}", args.seed);
                0
            }
            Some(d) => {
                println!("NOT deterministic: first divergent event #{}:\n  run 1: {}\n  run 2: {}", d.event, d.first, d.second);
                1
            }
        });
    }
    if let Some(range) = &args.seeds {
        let (a, b) = range.split_once("..").ok_or("--seeds wants A..B")?;
        let (a, b): (u64, u64) =
            (a.parse().map_err(|_| "--seeds: A is not a number")?, b.parse().map_err(|_| "--seeds: B is not a number")?);
        if b <= a {
            return Err(format!("--seeds {a}..{b} is empty"));
        }
        if b - a > MAX_SWEEP_SEEDS {
            return Err(format!("--seeds {a}..{b} is {} seeds; a sweep runs at most {MAX_SWEEP_SEEDS}", b - a));
        }
        let started = std::time::Instant::now();
        let bar = (!args.quiet).then(|| {
            let b = indicatif::ProgressBar::new(b - a);
            b.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {msg} [{bar:40}] {pos}/{len} seeds ({per_sec}, eta {eta})").expect("template"),
            );
            b.set_message(scenario.name.clone());
            b
        });
        let failed = std::sync::atomic::AtomicU64::new(0);
        let on_seed = |_seed: u64, v: &[Violation]| {
            if let Some(bar) = &bar {
                if !v.is_empty() {
                    let n = failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    bar.set_message(format!("{}: {n} failing", scenario.name));
                }
                bar.inc(1);
            }
        };
        let base = Options { broken_device: args.broken_allow_overspend, ..Default::default() };
        let results = sweep_with(&scenario, a..b, args.jobs, &base, &on_seed);
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        let wall_s = started.elapsed().as_secs_f64();
        let summary = SweepSummary::of(&results);
        if results.len() <= SWEEP_LINES_MAX {
            println!("{:>6} {:>8} {:>8} {:>12} {:>12}  result", "seed", "sales", "refused", "conv p99 ms", "wall ms");
            for (seed, r, v) in &results {
                println!(
                    "{seed:>6} {:>8} {:>8} {:>12.1} {:>12.0}  {}",
                    r.sales,
                    r.refused.values().sum::<u64>(),
                    r.convergence_ms_p99,
                    r.wall_ms,
                    if v.is_empty() { "ok".to_string() } else { format!("FAILED: {}", v[0].invariant) }
                );
            }
        } else if let Some(summary) = &summary {
            println!("{summary}");
        }
        println!("sweep wall time {wall_s:.1} s on {} jobs", args.jobs);
        // Failing seeds grouped by the invariant each broke first.
        let by_invariant = summary.map(|s| s.failing).unwrap_or_default();
        if by_invariant.is_empty() {
            println!("all {} seeds passed", results.len());
            return Ok(0);
        }
        let failing: usize = by_invariant.values().map(Vec::len).sum();
        println!("{failing} of {} seeds failed:", results.len());
        for (invariant, seeds) in &by_invariant {
            println!("  {invariant}: {} seeds {seeds:?}", seeds.len());
            println!("    replay the first: {}", replay_line(&args, seeds[0]));
        }
        // The details of the first failing seed of each invariant.
        for seeds in by_invariant.values() {
            if let Some((seed, _, v)) = results.iter().find(|(s, _, _)| *s == seeds[0]) {
                print_violations(&args, *seed, v);
            }
        }
        return Ok(1);
    }
    if args.shrink {
        return run_shrink(&args, &scenario);
    }
    let opts = Options {
        seed: args.seed,
        trace_file: args.trace.clone(),
        broken_device: args.broken_allow_overspend,
        progress: !args.quiet,
        ..Default::default()
    };
    let result = run(&scenario, opts);
    println!("{}", result.report.table());
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        result.report.write_json(&dir.join("report.json")).map_err(|e| e.to_string())?;
        result.report.write_html(&result.violations, &dir.join("report.html"))?;
        println!("report: {} and {}", dir.join("report.json").display(), dir.join("report.html").display());
    }
    if result.violations.is_empty() {
        println!("all invariants held: no acknowledged sale lost, none duplicated, no negative stock, replicas identical");
        Ok(0)
    } else {
        print_violations(&args, args.seed, &result.violations);
        Ok(1)
    }
}
