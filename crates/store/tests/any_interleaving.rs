//! Whatever the interleaving of devices, the batch sizes and the mix of durable and relaxed
//! commits, a store reopened gives back every entry in the order appended, and serves each
//! device's changes from any seq, whether they sit in sealed blocks or the open tail.

use proptest::prelude::*;
use stallmesh_ledger::testkit::{product, sell, TestMarket};
use stallmesh_ledger::{Entry, LocalOp};
use stallmesh_store::{Owner, Store};
use std::sync::OnceLock;

const DEVICES: usize = 4;
const PER_DEVICE: usize = 90;

/// Each device's journal: enrolment, product, restock, then sales (signed once, shared by cases).
fn journals() -> &'static (Vec<Vec<Entry>>, Owner) {
    static JOURNALS: OnceLock<(Vec<Vec<Entry>>, Owner)> = OnceLock::new();
    JOURNALS.get_or_init(|| {
        let m = TestMarket::new(11);
        let mut all = Vec::new();
        let mut owner = None;
        for n in 0..DEVICES {
            let (mut l, e0) = m.device(n as u16 + 1, "Stall");
            let mut j = vec![e0];
            j.push(l.record(LocalOp::UpsertProduct(product("honey", 450)), 1).unwrap());
            j.push(l.record(LocalOp::Restock { sku: "honey".into(), qty: 10_000 }, 2).unwrap());
            while j.len() < PER_DEVICE {
                let t = j.len() as u64;
                j.push(l.record(sell("honey", 1), 10 + t).unwrap());
            }
            owner.get_or_insert(Owner { market: m.ctx.market, device: l.device() });
            all.push(j);
        }
        (all, owner.unwrap())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn a_reopened_store_gives_back_every_entry_and_serves_every_device_from_any_seq(
        picks in proptest::collection::vec(0..DEVICES, 1..DEVICES * PER_DEVICE),
        chunks in proptest::collection::vec((1usize..70, any::<bool>()), 1..40),
        from in proptest::collection::vec(0u64..PER_DEVICE as u64 + 2, DEVICES),
    ) {
        let (journals, owner) = journals();
        // The apply order: devices picked in turn, each journal in its own order.
        let mut next = [0usize; DEVICES];
        let order: Vec<Entry> = picks
            .iter()
            .filter_map(|&d| {
                let e = journals[d].get(next[d]).cloned();
                next[d] += 1;
                e
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let mut s = Store::open(&path, *owner).unwrap();
            let mut rest = &order[..];
            for (size, durable) in chunks.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (batch, after) = rest.split_at((*size).min(rest.len()));
                if *durable { s.append(batch).unwrap() } else { s.append_relaxed(batch).unwrap() }
                rest = after;
            }
            s.flush().unwrap();
        }
        let s = Store::open(&path, *owner).unwrap();
        prop_assert_eq!(s.load().unwrap(), order.clone());
        for (d, &from_seq) in from.iter().enumerate() {
            let device = journals[d][0].change.device;
            let held: Vec<_> = order.iter().filter(|e| e.change.device == device).map(|e| e.change.clone()).collect();
            let want = &held[(from_seq as usize).min(held.len())..];
            prop_assert_eq!(s.changes_since(&device, from_seq, 1_000).unwrap(), want.to_vec());
        }
    }
}
