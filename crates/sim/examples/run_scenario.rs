//! Runs one scenario file with one seed and prints the report as JSON (the measurement harness;
//! `stallmesh sim` is the full CLI, but building the node pulls in libp2p and tract). With a
//! third argument, also writes `report.html` into that directory.
//!
//! `cargo run --release -p stallmesh-sim --example run_scenario -- simulations/market-day.toml 1 [out/]`

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("usage: run_scenario <scenario.toml> [seed] [out-dir]");
    let seed: u64 = args.next().map_or(1, |s| s.parse().expect("seed is a number"));
    let out = args.next().map(std::path::PathBuf::from);
    let scenario = stallmesh_sim::Scenario::load(std::path::Path::new(&path)).unwrap_or_else(|e| panic!("{e}"));
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
