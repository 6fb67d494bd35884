//! A store written by an earlier build opens in this one: `fixtures/v1-store.redb` was written by
//! the schema-1 store (one row per entry and a (device, seq) index; commit 714b29d) and is upgraded
//! on open, in one transaction, to today's layout without losing or changing an entry.

use stallmesh_ledger::testkit::{product, sell, TestMarket};
use stallmesh_ledger::{Entry, Ledger, LocalOp};
use stallmesh_store::{Owner, Store, SCHEMA_VERSION};

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

fn schema_version(path: &std::path::Path) -> Vec<u8> {
    let db = redb::Database::open(path).unwrap();
    let tx = redb::ReadableDatabase::begin_read(&db).unwrap();
    let meta = tx.open_table(redb::TableDefinition::<&str, &[u8]>::new("meta")).unwrap();
    meta.get("schema_version").unwrap().unwrap().value().to_vec()
}

#[test]
fn a_schema_1_store_is_upgraded_on_open_with_every_entry_in_order() {
    let (m, entries, owner) = fixture_day();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    std::fs::copy(FIXTURE, &path).unwrap();
    assert_eq!(schema_version(&path), 1u32.to_le_bytes());
    let before = std::fs::metadata(&path).unwrap().len();

    let store = Store::open(&path, owner).unwrap();
    assert_eq!(store.load().unwrap(), entries, "the upgrade's own read");
    drop(store);
    assert_eq!(schema_version(&path), SCHEMA_VERSION.to_le_bytes());
    let after = std::fs::metadata(&path).unwrap().len();
    eprintln!("fixture: {before} bytes as schema 1, {after} after the upgrade");
    assert!(after < before, "the upgrade gives the old layout's pages back: {before} -> {after} bytes");

    // Opened again, as schema 2: the same entries, a ledger restores from them, peers are served.
    let mut store = Store::open(&path, owner).unwrap();
    let loaded = store.load().unwrap();
    assert_eq!(loaded, entries);
    let cert = m.device(1, "Honey Stall").0.certificate().clone();
    let ledger = Ledger::restore(m.ctx.clone(), m.device_key(1), cert.clone(), loaded).unwrap();
    assert_eq!(ledger.state().sales.len(), 150);
    for device in [entries[0].change.device, entries[1].change.device] {
        let own: Vec<_> = entries.iter().filter(|e| e.change.device == device).map(|e| e.change.clone()).collect();
        for from in 0..own.len() {
            assert_eq!(store.changes_since(&device, from as u64, 40).unwrap(), own[from..own.len().min(from + 40)], "from {from}");
        }
    }
    // And it takes new entries.
    let mut ledger = ledger;
    let more = ledger.record(sell("honey", 1), 1_000).unwrap();
    store.append(std::slice::from_ref(&more)).unwrap();
    drop(store);
    let mut expected = entries.clone();
    expected.push(more);
    assert_eq!(Store::open(&path, owner).unwrap().load().unwrap(), expected);
}

#[test]
fn the_fixture_is_rebuilt_deterministically() {
    let (_, one, _) = fixture_day();
    let (_, two, _) = fixture_day();
    assert_eq!(one, two);
}
