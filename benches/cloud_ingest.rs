//! The cloud's PostgreSQL store under ingest (one process, the store's own pool):
//!
//! - `cloud_ingest_postgres/one_market_batch_2000`: one batch of 2,000 log records of a market
//!   committed (begin with the market's row lock, events and every projection, commit);
//! - `cloud_ingest_postgres/two_markets_batch_2000_each`: two markets, a batch each, committed by
//!   two tasks at the same time (different markets never wait for each other's lock).
//!
//! Throughput is in log records (events). The records are made beforehand by the real ingest core
//! from a day of 20 tablets' sales, so this is the store's cost alone; the core's own (signature
//! checks, automerge) is in the ledger bench. The database is fresh; when a market's prepared log
//! is used up the tables are emptied (untimed) and it starts over, so a market's log stays within
//! [`LOG_RECORDS`] during the measurement.
//!
//! Needs PostgreSQL (as for the cloud's tests: 127.0.0.1:5432, or `STALLMESH_TEST_POSTGRES`);
//! without one it prints SKIPPED and measures nothing.
//! Run: `cargo bench -p stallmesh-benches --no-default-features --features cloud --bench cloud_ingest`.

#[path = "../crates/cloud/tests/support/pg.rs"]
mod pg;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use stallmesh_cloud::store::postgres::PgStore;
use stallmesh_cloud::store::{MarketRegistration, Store};
use stallmesh_identity::{Role, SignedChange};
use stallmesh_ingest::{LogRecord, MarketIngest};
use stallmesh_ledger::testkit::{product, sell, TestMarket};
use stallmesh_ledger::LocalOp;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The cloud service's largest upload batch.
const BATCH: usize = 2_000;
/// Records prepared per market: ten batches, reused after a reset.
const LOG_RECORDS: usize = 10 * BATCH;
const TABLETS: u16 = 20;
const DAY_MS: u64 = 1_714_780_800_000;
const CLOUD_DEVICE: u16 = 1_000;

/// A market's registration and its log (after the registration's first record), in batches.
struct PreparedMarket {
    reg: MarketRegistration,
    first: Vec<LogRecord>,
    batches: Vec<Vec<LogRecord>>,
}

fn prepare(seed: u8) -> PreparedMarket {
    let m = TestMarket::new(seed);
    let key = m.device_key(CLOUD_DEVICE);
    let certificate = m.key.enrol(key.device_id(), "cloud", Role::Cloud, u64::MAX);
    let (mut cloud, created) = MarketIngest::create(m.ctx.clone(), m.device_key(CLOUD_DEVICE), certificate.clone(), DAY_MS).unwrap();
    let mut tablets = Vec::new();
    let mut changes: Vec<SignedChange> = Vec::new();
    for n in 1..=TABLETS {
        let (mut l, enrol) = m.device(n, &format!("Stall {n}"));
        let sku = format!("SKU-{n}");
        changes.push(enrol.change);
        changes.push(l.record(LocalOp::UpsertProduct(product(&sku, 100 + n as u64)), DAY_MS).unwrap().change);
        changes.push(l.record(LocalOp::Restock { sku, qty: 1_000_000 }, DAY_MS).unwrap().change);
        tablets.push(l);
    }
    let mut i = 0u64;
    while changes.len() < LOG_RECORDS {
        let n = (i % TABLETS as u64) as usize;
        let t = DAY_MS + 8 * 3_600_000 + i * 1_000;
        changes.push(tablets[n].record(sell(&format!("SKU-{}", n + 1), 1 + i % 3), t).unwrap().change);
        i += 1;
    }
    let mut records = Vec::new();
    for chunk in changes.chunks(BATCH) {
        records.extend(cloud.ingest(chunk.to_vec(), DAY_MS + 20 * 3_600_000).records);
    }
    records.truncate(LOG_RECORDS);
    let reg = MarketRegistration {
        market: m.ctx.market,
        name: format!("Bench market {seed}"),
        market_key: m.ctx.market_key,
        device_secret: key.secret(),
        certificate,
        registered_at_ms: DAY_MS,
    };
    PreparedMarket { reg, first: created.records, batches: records.chunks(BATCH).map(|c| c.to_vec()).collect() }
}

/// Empties the tables and registers the markets again, to start their logs over.
async fn reset(db: &pg::TestDb, store: &Store, markets: &[Arc<PreparedMarket>]) {
    let c = db.client().await;
    c.batch_execute(
        "TRUNCATE markets, events, devices, products, sales, sale_lines, restocks, transfers, revocations, \
         recommendation_records, rejections, evidence",
    )
    .await
    .unwrap();
    for m in markets {
        store.register(&m.reg, &m.first).await.unwrap();
    }
}

async fn commit(store: &Store, m: &PreparedMarket, batch: usize) {
    let tx = store.begin(&m.reg.market).await.unwrap();
    tx.commit(&m.batches[batch], &[], &[], &[], DAY_MS).await.unwrap();
}

fn cloud_ingest(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let Some(db) = rt.block_on(pg::fresh_database("the cloud_ingest benchmark")) else {
        eprintln!("SKIPPED: cloud_ingest measured nothing");
        return;
    };
    let store = Arc::new(Store::Postgres(rt.block_on(PgStore::connect(&db.url)).unwrap()));
    let started = Instant::now();
    let markets: Vec<Arc<PreparedMarket>> = [41, 42].into_iter().map(|seed| Arc::new(prepare(seed))).collect();
    eprintln!("prepared {} markets of {LOG_RECORDS} records in {:.1?}", markets.len(), started.elapsed());

    let mut group = c.benchmark_group("cloud_ingest_postgres");
    group.sample_size(10).measurement_time(Duration::from_secs(20)).warm_up_time(Duration::from_secs(3));

    let batches = markets[0].batches.len();
    group.throughput(Throughput::Elements(BATCH as u64));
    let one = &markets[..1];
    // The next batch to commit; at `batches` the logs are used up and start over.
    let mut next = batches;
    group.bench_function("one_market_batch_2000", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    if next == batches {
                        reset(&db, &store, one).await;
                        next = 0;
                    }
                    let start = Instant::now();
                    commit(&store, &one[0], next).await;
                    total += start.elapsed();
                    next += 1;
                }
                total
            })
        })
    });

    group.throughput(Throughput::Elements(2 * BATCH as u64));
    // The next batch to commit; at `batches` the logs are used up and start over.
    let mut next = batches;
    group.bench_function("two_markets_batch_2000_each", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    if next == batches {
                        reset(&db, &store, &markets).await;
                        next = 0;
                    }
                    let start = Instant::now();
                    let tasks: Vec<_> = markets
                        .iter()
                        .map(|m| {
                            let (store, m, batch) = (store.clone(), m.clone(), next);
                            tokio::spawn(async move { commit(&store, &m, batch).await })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                    total += start.elapsed();
                    next += 1;
                }
                total
            })
        })
    });
    group.finish();
    drop(store);
    drop(db);
}

criterion_group!(benches, cloud_ingest);
criterion_main!(benches);
