//! A store written by an earlier build opens in this one: `fixtures/v1-store.redb` was written by
//! the schema-1 store (one row per entry and a (device, seq) index) and is upgraded on open, in one
//! transaction, to today's layout without losing or changing an entry.

use stallmesh_ledger::testkit::{product, sell, TestMarket};
use stallmesh_ledger::{Entry, LocalOp};
use stallmesh_store::{Owner, Store};
use std::path::Path;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v1-store.redb");

/// The fixture's contents, rebuilt (keys, automerge changes and signatures are deterministic): a
/// replica of device 1 holding its own journal and device 2's, 75 sales each, interleaved.
fn fixture_day() -> (TestMarket, Vec<Entry>, Owner) {
    let m = TestMarket::new(5);
    let (mut a, a0) = m.device(1, "Honey Stall");
    let (mut b, b0) = m.device(2, "Honey Stall");
    let mut entries = vec![a0, b0];
    entries.push(a.record(LocalOp::UpsertProduct(product("honey", 450)), 1).unwrap());
    let report = b.apply_remote(entries.iter().map(|e| e.change.clone()));
    assert!(report.rejected.is_empty(), "{report:?}");
    entries.push(a.record(LocalOp::Restock { sku: "honey".into(), qty: 1_000 }, 2).unwrap());
    entries.push(b.record(LocalOp::Restock { sku: "honey".into(), qty: 1_000 }, 3).unwrap());
    for t in 0..75u64 {
        entries.push(a.record(sell("honey", 1), 10 + 2 * t).unwrap());
        entries.push(b.record(sell("honey", 1), 11 + 2 * t).unwrap());
    }
    let owner = Owner { market: m.ctx.market, device: a.device() };
    (m, entries, owner)
}

#[test]
#[ignore = "writes the fixture: run once with the schema-1 store"]
fn write_v1_fixture() {
    let (_, entries, owner) = fixture_day();
    let path = Path::new(FIXTURE);
    let _ = std::fs::remove_file(path);
    let mut s = Store::open(path, owner).unwrap();
    for chunk in entries.chunks(9) {
        s.append(chunk).unwrap();
    }
}

#[test]
fn the_fixture_is_rebuilt_deterministically() {
    let (_, one, _) = fixture_day();
    let (_, two, _) = fixture_day();
    assert_eq!(one, two);
}
