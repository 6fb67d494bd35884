//! Runs one scenario file with one seed and prints the report as JSON (the measurement harness;
//! `stallmesh sim` is the full CLI, but building the node pulls in libp2p and tract). With a
//! third argument, also writes `report.html` into that directory. With seeds `A..B`, runs the
//! same sweep as `stallmesh sim --seeds A..B --jobs N` and prints its summary.
//!
//! `cargo run --release -p stallmesh-sim --example run_scenario -- simulations/market-day.toml 1 [out/]`
//! `cargo run --release -p stallmesh-sim --example run_scenario -- simulations/flaky-wifi.toml 1..1001 [jobs]`

/// The allocator `stallmesh sim` runs on (`node/src/main.rs`), so the harness measures the same.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("usage: run_scenario <scenario.toml> [seed | A..B] [out-dir | jobs]");
    let seed_arg = args.next().unwrap_or_else(|| "1".to_string());
    let scenario = stallmesh_sim::Scenario::load(std::path::Path::new(&path)).unwrap_or_else(|e| panic!("{e}"));
    if let Some((a, b)) = seed_arg.split_once("..") {
        let (a, b): (u64, u64) = (a.parse().expect("seeds A..B"), b.parse().expect("seeds A..B"));
        let jobs: usize = args.next().map_or(2, |s| s.parse().expect("jobs is a number"));
        return sweep(&scenario, a..b, jobs);
    }
    let seed: u64 = seed_arg.parse().expect("seed is a number");
    let out = args.next().map(std::path::PathBuf::from);
    let r = stallmesh_sim::run(&scenario, stallmesh_sim::Options { seed, ..Default::default() });
    for v in &r.violations {
        eprintln!("violation: {} {}", v.invariant, v.detail);
    }
    if let Some(dir) = out {
        std::fs::create_dir_all(&dir).expect("the output directory can be made");
        r.report.write_html(&r.violations, &dir.join("report.html")).expect("report.html is written");
    }
    println!("{}", serde_json::to_string(&r.report).expect("the report serializes"));
}

fn sweep(scenario: &stallmesh_sim::Scenario, seeds: std::ops::Range<u64>, jobs: usize) {
    let started = std::time::Instant::now();
    let results = stallmesh_sim::sweep(scenario, seeds, jobs);
    let wall_s = started.elapsed().as_secs_f64();
    let Some(summary) = stallmesh_sim::SweepSummary::of(&results) else {
        println!("no seeds");
        return;
    };
    println!("{}: {summary}; {wall_s:.1} s on {jobs} jobs", scenario.name);
    for (invariant, seeds) in &summary.failing {
        println!("  FAILED {invariant}: {} seeds {seeds:?}", seeds.len());
    }
    if summary.failing.is_empty() {
        println!("all {} seeds passed", summary.seeds);
    }
}
