#[test]
fn quick() {
    let sc = stallmesh_sim::Scenario::load(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../simulations/partition-heal.toml"))).unwrap();
    let r = stallmesh_sim::run(&sc, stallmesh_sim::Options { seed: 1, ..Default::default() });
    println!("{}", r.report.table());
    println!("{:#?}", r.violations);
}
