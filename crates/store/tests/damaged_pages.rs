//! Stores with one 4 KiB page zeroed: nothing panics out of the store, damage is reported naming
//! the file, and a store that reported damage never writes to it again. (Damage reported after a
//! good open is tested in `src/lib.rs`: redb caches the pages it verified, so zeroing one under an
//! open store is not seen.)

use stallmesh_ledger::testkit::{product, sell, TestMarket};
use stallmesh_ledger::{Entry, LocalOp};
use stallmesh_store::{set_aside, Owner, Store, StoreError};
use std::path::{Path, PathBuf};

const PAGE: usize = 4096;
/// Entries written to the store; one more is kept to append.
const STORED: usize = 40;

fn day() -> (Vec<Entry>, Owner) {
    let m = TestMarket::new(3);
    let (mut l, e0) = m.device(1, "Test Stall");
    let mut entries = vec![e0];
    entries.push(l.record(LocalOp::UpsertProduct(product("honey", 450)), 1).unwrap());
    entries.push(l.record(LocalOp::Restock { sku: "honey".into(), qty: 1_000 }, 2).unwrap());
    while entries.len() < STORED + 1 {
        let t = entries.len() as u64;
        entries.push(l.record(sell("honey", 1), 10 + t).unwrap());
    }
    (entries, Owner { market: m.ctx.market, device: l.device() })
}

/// A cleanly closed store of `STORED` entries written in several commits, durable and relaxed.
fn good_store(dir: &Path, entries: &[Entry], owner: Owner) -> Vec<u8> {
    let path = dir.join("good.redb");
    {
        let mut s = Store::open(&path, owner).unwrap();
        for (i, chunk) in entries[..STORED].chunks(7).enumerate() {
            if i % 2 == 0 {
                s.append(chunk).unwrap();
            } else {
                s.append_relaxed(chunk).unwrap();
            }
        }
        s.flush().unwrap();
    }
    std::fs::read(&path).unwrap()
}

fn zeroed(good: &[u8], page: usize) -> Vec<u8> {
    let mut bad = good.to_vec();
    let end = ((page + 1) * PAGE).min(bad.len());
    bad[page * PAGE..end].fill(0);
    bad
}

fn assert_names(err: &StoreError, path: &Path) {
    match err {
        StoreError::Corrupt { path: p, .. } => assert_eq!(p, path, "{err}"),
        other => panic!("expected Corrupt naming {}, got {other}", path.display()),
    }
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
}

/// After `store` reported damage: an append, a flush and the drop leave the file as it was.
fn assert_sealed(mut store: Store, path: &Path, extra: &Entry) {
    assert!(store.damaged().is_some());
    let before = std::fs::read(path).unwrap();
    let err = store.append(std::slice::from_ref(extra)).expect_err("append after damage refused");
    assert_names(&err, path);
    let err = store.append_relaxed(std::slice::from_ref(extra)).expect_err("relaxed append after damage refused");
    assert_names(&err, path);
    let _ = store.flush();
    drop(store);
    assert!(std::fs::read(path).unwrap() == before, "{}: written after it reported damage", path.display());
}

#[derive(Default, Debug)]
struct Outcomes {
    intact: usize,
    refused_on_open: usize,
    damaged_after_open: usize,
}

#[test]
fn a_zeroed_page_anywhere_is_refused_on_open_naming_the_file_or_does_not_matter() {
    let dir = tempfile::tempdir().unwrap();
    let (entries, owner) = day();
    let good = good_store(dir.path(), &entries, owner);
    let extra = &entries[STORED];
    let mut seen = Outcomes::default();
    for page in 0..good.len().div_ceil(PAGE) {
        let path = dir.path().join(format!("page-{page}.redb"));
        let bad = zeroed(&good, page);
        std::fs::write(&path, &bad).unwrap();
        match Store::open(&path, owner) {
            Err(e) => {
                assert_names(&e, &path);
                assert!(std::fs::read(&path).unwrap() == bad, "page {page}: the refused open wrote to the file");
                seen.refused_on_open += 1;
            }
            Ok(mut store) => match store.load() {
                Ok(loaded) => {
                    assert_eq!(loaded, entries[..STORED], "page {page}: loaded as different data");
                    let before = std::fs::read(&path).unwrap();
                    match store.append(std::slice::from_ref(extra)) {
                        Ok(()) => {
                            drop(store);
                            let reopened = Store::open(&path, owner).unwrap_or_else(|e| panic!("page {page}: {e}"));
                            assert_eq!(reopened.load().unwrap(), entries[..=STORED], "page {page}");
                            seen.intact += 1;
                        }
                        Err(e) => {
                            assert_names(&e, &path);
                            assert!(std::fs::read(&path).unwrap() == before, "page {page}: a failed append changed the file");
                            assert_sealed(store, &path, extra);
                            seen.damaged_after_open += 1;
                        }
                    }
                }
                Err(e) => {
                    assert_names(&e, &path);
                    assert_sealed(store, &path, extra);
                    seen.damaged_after_open += 1;
                }
            },
        }
    }
    assert!(seen.refused_on_open > 0, "{seen:?}");
}

#[test]
fn a_store_copied_while_open_like_after_a_crash_is_not_taken_for_damage() {
    let dir = tempfile::tempdir().unwrap();
    let (entries, owner) = day();
    let path = dir.path().join("live.redb");
    let mut s = Store::open(&path, owner).unwrap();
    s.append(&entries[..20]).unwrap();
    let crashed = dir.path().join("crashed.redb");
    std::fs::copy(&path, &crashed).unwrap();
    s.append_relaxed(&entries[20..30]).unwrap();
    let crashed_relaxed = dir.path().join("crashed-relaxed.redb");
    std::fs::copy(&path, &crashed_relaxed).unwrap();
    drop(s);

    assert_eq!(Store::open(&crashed, owner).unwrap().load().unwrap(), entries[..20]);
    let loaded = Store::open(&crashed_relaxed, owner).unwrap().load().unwrap();
    assert_eq!(loaded, entries[..loaded.len()], "a prefix survives");
    assert!(loaded.len() >= 20);
}

#[test]
fn set_aside_renames_to_a_unique_name_and_keeps_the_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stallmesh.redb");
    std::fs::write(&path, b"first").unwrap();
    let first = set_aside(&path, 1_234).unwrap();
    assert_eq!(first, dir.path().join("stallmesh.redb.damaged-1234"));
    assert!(!path.exists());
    assert_eq!(std::fs::read(&first).unwrap(), b"first");

    std::fs::write(&path, b"second").unwrap();
    let second = set_aside(&path, 1_234).unwrap();
    assert_ne!(second, first);
    assert_eq!(std::fs::read(&first).unwrap(), b"first", "an earlier copy is never overwritten");
    assert_eq!(std::fs::read(&second).unwrap(), b"second");

    let missing: PathBuf = dir.path().join("none.redb");
    assert!(set_aside(&missing, 1).is_err());
}
