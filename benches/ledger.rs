//! Ledger and store costs as a market day grows.
//!
//! - `local_sale_commit_durable`: record a sale and commit it to redb (what a tablet waits for);
//! - `apply_one_remote_sale/N`: verify and apply one sale from a peer when the day holds N sales;
//! - `apply_remote_batch_100/N`: the same for a batch of 100 (catch-up after a short partition);
//! - `cold_load/N`: open the redb file, read every entry and rebuild the ledger (node restart);
//! - `local_sale_with_client_ref/N`: record a sale carrying a client_ref on a tablet holding a day
//!   of N sales (the retry check looks the client_ref up);
//! - `recent_sales_count/N` and, side by side, `recent_sales_count_scan/N`: the recent sales of one
//!   device that a giver of stock rights weighs, from the index and by the scan drivers used to run.
//!
//! Days are built from 20 selling devices (a large market).
//! Run: `cargo bench -p stallmesh-benches --no-default-features --bench ledger` (set
//! `STALLMESH_BENCH_MAX_SALES=10000` for a quick run).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use stallmesh_identity::SignedChange;
use stallmesh_ledger::testkit::{product, sell, TestMarket};
use stallmesh_ledger::{Entry, Ledger, LineRequest, LocalOp};
use stallmesh_store::{Owner, Store};
use std::time::{Duration, Instant};

const DEVICES: u16 = 20;
const SKUS: usize = 50;

struct Day {
    market: TestMarket,
    sellers: Vec<Ledger>,
    /// Every entry of the day in a causal order (as a replica would have applied them).
    entries: Vec<Entry>,
    sales: usize,
    clock_ms: u64,
}

impl Day {
    fn new() -> Day {
        let market = TestMarket::new(3);
        let mut entries = Vec::new();
        let mut sellers = Vec::new();
        for d in 0..DEVICES {
            let (mut l, e0) = market.device(d + 1, "Bench Stall");
            entries.push(e0);
            for s in 0..SKUS {
                let sku = format!("SKU-{s:03}");
                if d == 0 {
                    entries.push(l.record(LocalOp::UpsertProduct(product(&sku, 100 + s as u64)), 1).unwrap());
                } else {
                    // Every seller needs the catalogue to sell: give it device 0's product entries.
                    let products: Vec<SignedChange> = entries[1..=SKUS].iter().map(|e| e.change.clone()).collect();
                    if s == 0 {
                        l.apply_remote(std::iter::once(entries[0].change.clone()).chain(products));
                    }
                }
            }
            for s in 0..SKUS {
                entries.push(l.record(LocalOp::Restock { sku: format!("SKU-{s:03}"), qty: 1_000_000 }, 2).unwrap());
            }
            sellers.push(l);
        }
        Day { market, sellers, entries, sales: 0, clock_ms: 1_000 }
    }

    /// Records `n` more sales, round robin over the devices; returns their entries.
    fn sell(&mut self, n: usize) -> Vec<Entry> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            self.clock_ms += 1;
            let d = i % self.sellers.len();
            let sku = format!("SKU-{:03}", (i * 7) % SKUS);
            out.push(self.sellers[d].record(sell(&sku, 1), self.clock_ms).unwrap());
        }
        self.entries.extend(out.iter().cloned());
        self.sales += n;
        out
    }

    /// A replica (another device) that has applied the whole day so far.
    fn replica(&self) -> Ledger {
        let (mut r, _) = self.market.device(999, "Bench Stall");
        for chunk in self.entries.chunks(2_000) {
            let report = r.apply_remote(chunk.iter().map(|e| e.change.clone()));
            assert!(report.rejected.is_empty() && report.pending == 0);
        }
        r
    }
}

fn sizes() -> Vec<usize> {
    let max: usize = std::env::var("STALLMESH_BENCH_MAX_SALES").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    [1_000, 10_000, 100_000].into_iter().filter(|n| *n <= max).collect()
}

fn local_sale(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut day = Day::new();
    let me = &day.sellers[0];
    let owner = Owner { market: day.market.ctx.market, device: me.device() };
    let mut store = Store::open(&dir.path().join("bench.redb"), owner).unwrap();
    let mut t = 10_000_000;
    c.bench_function("local_sale_commit_durable", |b| {
        b.iter(|| {
            t += 1;
            let e = day.sellers[0].record(sell("SKU-001", 1), t).unwrap();
            store.append(std::slice::from_ref(&e)).unwrap();
        })
    });
}

fn remote_apply(c: &mut Criterion) {
    let mut group = c.benchmark_group("apply_one_remote_sale");
    group.sample_size(20).measurement_time(Duration::from_secs(5));
    let mut batch_group_inputs = Vec::new();
    let mut day = Day::new();
    for n in sizes() {
        day.sell(n.saturating_sub(day.sales));
        let mut replica = day.replica();
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_custom(|iters| {
                let fresh = day.sell(iters as usize);
                let start = Instant::now();
                for e in fresh {
                    let r = replica.apply_remote([e.change]);
                    debug_assert_eq!(r.applied.len(), 1);
                }
                start.elapsed()
            })
        });
        batch_group_inputs.push((n, replica));
    }
    group.finish();

    let mut group = c.benchmark_group("apply_remote_batch_100");
    group.sample_size(10).measurement_time(Duration::from_secs(5));
    for (n, mut replica) in batch_group_inputs {
        // Bring the replica up to date with what the single-sale bench added since.
        let heads = replica.heads();
        let missing: Vec<SignedChange> = day
            .entries
            .iter()
            .filter(|e| e.change.seq >= heads.get(&e.change.device).copied().unwrap_or(0))
            .map(|e| e.change.clone())
            .collect();
        replica.apply_remote(missing);
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let fresh: Vec<SignedChange> = day.sell(100).into_iter().map(|e| e.change).collect();
                    let start = Instant::now();
                    let r = replica.apply_remote(fresh);
                    total += start.elapsed();
                    assert_eq!(r.applied.len(), 100);
                }
                total
            })
        });
    }
    group.finish();
}

fn cold_load(c: &mut Criterion) {
    let mut group = c.benchmark_group("cold_load");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    let dir = tempfile::tempdir().unwrap();
    let mut day = Day::new();
    for n in sizes().into_iter().filter(|n| *n >= 10_000) {
        day.sell(n.saturating_sub(day.sales));
        // The store of a replica that applied the whole day.
        let replica = day.replica();
        let owner = Owner { market: day.market.ctx.market, device: replica.device() };
        let path = dir.path().join(format!("day-{n}.redb"));
        let cert = replica.certificate().clone();
        {
            let mut store = Store::open(&path, owner).unwrap();
            for chunk in day.entries.chunks(5_000) {
                store.append(chunk).unwrap();
            }
        }
        let bytes = std::fs::metadata(&path).unwrap().len();
        eprintln!(
            "cold_load/{n}: store file {:.1} MB, {} entries, {:.0} bytes per entry",
            bytes as f64 / 1e6,
            day.entries.len(),
            bytes as f64 / day.entries.len() as f64
        );
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let store = Store::open(&path, owner).unwrap();
                let entries = store.load().unwrap();
                let ledger = Ledger::restore(day.market.ctx.clone(), day.market.device_key(999), cert.clone(), entries).unwrap();
                assert_eq!(ledger.state().sales.len(), day.sales);
                ledger
            })
        });
    }
    group.finish();
}

/// The design we did not take, measured side by side: one automerge document holding the whole
/// day's sales of every device. Applying one more remote sale costs more as the day grows.
fn whole_day_document(c: &mut Criterion) {
    use automerge::transaction::Transactable;
    use automerge::{ActorId, AutoCommit, ObjType, ROOT};
    let mut group = c.benchmark_group("baseline_whole_day_document_apply_one");
    group.sample_size(20).measurement_time(Duration::from_secs(5));
    for n in sizes().into_iter().filter(|n| *n <= 10_000) {
        let mut writer = AutoCommit::new().with_actor(ActorId::from(&[1u8; 32][..]));
        let sales = writer.put_object(ROOT, "sales", ObjType::List).unwrap();
        let add_sale = |doc: &mut AutoCommit, i: usize| {
            let len = automerge::ReadDoc::length(doc, &sales);
            let m = doc.insert_object(&sales, len, ObjType::Map).unwrap();
            doc.put(&m, "kind", "sale").unwrap();
            doc.put(&m, "time_ms", i as u64).unwrap();
            let lines = doc.put_object(&m, "lines", ObjType::List).unwrap();
            let l = doc.insert_object(&lines, 0, ObjType::Map).unwrap();
            doc.put(&l, "sku", format!("SKU-{:03}", i % SKUS)).unwrap();
            doc.put(&l, "qty", 1u64).unwrap();
            doc.put(&l, "price_cents", 100u64).unwrap();
            doc.put(&m, "total_cents", 100u64).unwrap();
            doc.put(&m, "currency", "EUR").unwrap();
            doc.commit();
            doc.get_last_local_change().unwrap()
        };
        for i in 0..n {
            add_sale(&mut writer, i);
        }
        let mut reader = AutoCommit::load(&writer.save()).unwrap();
        let mut next = n;
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_custom(|iters| {
                let fresh: Vec<_> = (0..iters)
                    .map(|_| {
                        next += 1;
                        add_sale(&mut writer, next)
                    })
                    .collect();
                let start = Instant::now();
                for ch in fresh {
                    reader.apply_changes([ch]).unwrap();
                }
                start.elapsed()
            })
        });
    }
    group.finish();
}

/// A tablet holding a day of every device's sales that can sell itself: the day's replica, stocked.
fn selling_replica(day: &Day) -> Ledger {
    let mut till = day.replica();
    till.record(LocalOp::Restock { sku: "SKU-001".into(), qty: 1_000_000 }, day.clock_ms).unwrap();
    till
}

fn local_sale_with_client_ref(c: &mut Criterion) {
    let mut group = c.benchmark_group("local_sale_with_client_ref");
    group.sample_size(20).measurement_time(Duration::from_secs(5));
    let mut day = Day::new();
    for n in sizes().into_iter().filter(|n| *n >= 10_000) {
        day.sell(n.saturating_sub(day.sales));
        let mut till = selling_replica(&day);
        let mut t = day.clock_ms;
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                t += 1;
                let op = LocalOp::Sell {
                    lines: vec![LineRequest { sku: "SKU-001".into(), qty: 1 }],
                    client_ref: Some(format!("till-1-{t}")),
                    recommendation: None,
                    loyalty: None,
                    staff: None,
                };
                till.record(op, t).unwrap()
            })
        });
    }
    group.finish();
}

/// The window a giver of stock rights looks back over; the bench's day advances 1 ms a sale, so
/// this is the last half of the day's sales.
fn recent_since_ms(day: &Day) -> u64 {
    day.clock_ms - day.sales as u64 / 2
}

fn recent_sales_count(c: &mut Criterion) {
    let mut group = c.benchmark_group("recent_sales_count");
    let mut day = Day::new();
    for n in sizes().into_iter().filter(|n| *n >= 10_000) {
        day.sell(n.saturating_sub(day.sales));
        let replica = day.replica();
        let device = day.sellers[1].device();
        let since_ms = recent_since_ms(&day);
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| replica.state().sales_of_device_since(std::hint::black_box(&device), since_ms))
        });
    }
    group.finish();
}

/// The count as drivers computed it before the index: a scan of every sale of the day.
fn recent_sales_count_scan(c: &mut Criterion) {
    let mut group = c.benchmark_group("recent_sales_count_scan");
    let mut day = Day::new();
    for n in sizes().into_iter().filter(|n| *n >= 10_000) {
        day.sell(n.saturating_sub(day.sales));
        let replica = day.replica();
        let device = day.sellers[1].device();
        let since_ms = recent_since_ms(&day);
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                let d = std::hint::black_box(&device);
                replica.state().sales.values().filter(|s| s.device == *d && s.time_ms >= since_ms).count() as u64
            })
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    local_sale,
    remote_apply,
    cold_load,
    whole_day_document,
    local_sale_with_client_ref,
    recent_sales_count,
    recent_sales_count_scan
);
criterion_main!(benches);
