//! The simulator without the node around it: `cargo run --release -p stallmesh-sim --example sim
//! -- SCENARIO [SEED]` prints the report table. A release build of this crate alone takes a
//! fraction of the node's (no libp2p, no tract), which is what a before/after measurement of the
//! engine needs; `stallmesh sim` is the command users run.

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("usage: sim SCENARIO [SEED]");
    let seed = args.next().map_or(1, |s| s.parse().expect("SEED is a number"));
    let scenario = stallmesh_sim::Scenario::load(std::path::Path::new(&path)).unwrap_or_else(|e| panic!("{e}"));
    let r = stallmesh_sim::run(&scenario, stallmesh_sim::Options { seed, progress: true, ..Default::default() });
    print!("{}", r.report.table());
    for v in &r.violations {
        println!("VIOLATED {}: {}", v.invariant, v.detail);
    }
}
