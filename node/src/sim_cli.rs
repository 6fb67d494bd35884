//! `stallmesh sim`: runs a scenario (or a sweep of seeds), prints the report, checks invariants.

use crate::cli::SimArgs;
use stallmesh_sim::{check_determinism, run, sweep, Options, Scenario, Violation};

fn replay_line(args: &SimArgs, seed: u64) -> String {
    let mut line = format!("stallmesh sim {} --seed {seed}", args.scenario.display());
    if let Some(d) = args.broken_allow_overspend {
        line.push_str(&format!(" --broken-allow-overspend {d}"));
    }
    line
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
        let results = sweep(&scenario, a..b, args.jobs);
        let failing: Vec<u64> = results.iter().filter(|(_, _, v)| !v.is_empty()).map(|(s, _, _)| *s).collect();
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
        if failing.is_empty() {
            println!("all {} seeds passed", results.len());
            return Ok(0);
        }
        println!("failing seeds: {failing:?}");
        for (seed, _, v) in results.iter().filter(|(_, _, v)| !v.is_empty()) {
            print_violations(&args, *seed, v);
        }
        return Ok(1);
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
        result.report.write_svg(&dir.join("report.svg"))?;
        println!("report: {} and {}", dir.join("report.json").display(), dir.join("report.svg").display());
    }
    if result.violations.is_empty() {
        println!("all invariants held: no acknowledged sale lost, none duplicated, no negative stock, replicas identical");
        Ok(0)
    } else {
        print_violations(&args, args.seed, &result.violations);
        Ok(1)
    }
}
