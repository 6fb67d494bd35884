//! Specifications of the PostgreSQL store, against a real server (see `support/pg.rs`: each test
//! gets a fresh database; without a server they are skipped, loudly, unless `CI=true`).

mod support;

use stallmesh_cloud::projection::log_event;
use stallmesh_cloud::store::postgres::{PgStore, PgTx};
use stallmesh_cloud::store::{MarketRegistration, Registered, Store, StoreError};
use stallmesh_identity::{Role, SignedChange};
use stallmesh_ingest::{Batch, LogRecord, MarketIngest};
use stallmesh_ledger::testkit::{product, sell, TestMarket};
use stallmesh_ledger::{EventBody, Ledger, LineRequest, LocalOp, Product, RecommendationShown};
use std::sync::Arc;
use std::time::Duration;
use support::pg::{fresh_database, TestDb};

/// 2024-05-04T00:00:00Z: the market day of these tests.
const DAY_MS: u64 = 1_714_780_800_000;
const HOUR_MS: u64 = 3_600_000;
const MINUTE_MS: u64 = 60_000;
/// The cloud device is device number 100 of each test market.
const CLOUD_DEVICE: u16 = 100;

macro_rules! database_or_skip {
    ($who:expr) => {
        match fresh_database($who).await {
            Some(db) => db,
            None => return,
        }
    };
}

/// A market as the cloud holds it: its registration and its ingest core.
struct CloudMarket {
    m: TestMarket,
    reg: MarketRegistration,
    ingest: MarketIngest,
    first: Vec<LogRecord>,
}

fn cloud_market(seed: u8) -> CloudMarket {
    let m = TestMarket::new(seed);
    let key = m.device_key(CLOUD_DEVICE);
    let certificate = m.key.enrol(key.device_id(), "cloud", Role::Cloud, u64::MAX);
    let (ingest, created) = MarketIngest::create(m.ctx.clone(), m.device_key(CLOUD_DEVICE), certificate.clone(), DAY_MS).unwrap();
    let reg = MarketRegistration {
        market: m.ctx.market,
        name: format!("Market {seed}"),
        market_key: m.ctx.market_key,
        device_secret: key.secret(),
        certificate,
        registered_at_ms: DAY_MS,
    };
    CloudMarket { m, reg, ingest, first: created.records }
}

impl CloudMarket {
    /// Ingests `changes` under the store's lock and commits, as the service's driver does.
    async fn upload(&mut self, store: &Store, changes: Vec<SignedChange>, now_ms: u64) -> Batch {
        let mut tx = store.begin(&self.reg.market).await.unwrap();
        if tx.next_offset() != self.ingest.next_offset() {
            let records = tx.load_after(self.ingest.offset()).await.unwrap();
            self.ingest.catch_up(records).unwrap();
        }
        let batch = self.ingest.ingest(changes, now_ms);
        tx.commit(&batch.records, &batch.rejected, &batch.evidence, &[], now_ms).await.unwrap();
        batch
    }
}

/// A selling tablet of `stall`: enrolled, with its own product `SKU-<n>` at `price_cents` and stock.
fn tablet(m: &TestMarket, n: u16, stall: &str, price_cents: u64) -> (Ledger, Vec<SignedChange>) {
    let (mut l, enrol) = m.device(n, stall);
    let sku = format!("SKU-{n}");
    let mut out = vec![enrol.change];
    out.push(l.record(LocalOp::UpsertProduct(Product { stall: stall.into(), ..product(&sku, price_cents) }), DAY_MS).unwrap().change);
    out.push(l.record(LocalOp::Restock { sku, qty: 10_000 }, DAY_MS).unwrap().change);
    (l, out)
}

async fn connect(db: &TestDb) -> Store {
    Store::Postgres(PgStore::connect(&db.url).await.expect("connects and migrates"))
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn registering_a_market_is_idempotent_and_another_cloud_device_conflicts() {
    let db = database_or_skip!("registering_a_market_is_idempotent_and_another_cloud_device_conflicts");
    let store = connect(&db).await;
    let cm = cloud_market(1);
    assert_eq!(store.register(&cm.reg, &cm.first).await.unwrap(), Registered::New);
    assert_eq!(store.register(&cm.reg, &cm.first).await.unwrap(), Registered::Already, "the same device again changes nothing");
    let mut other = cm.reg.clone();
    let stranger = cm.m.device_key(CLOUD_DEVICE + 1);
    other.device_secret = stranger.secret();
    other.certificate = cm.m.key.enrol(stranger.device_id(), "cloud", Role::Cloud, u64::MAX);
    assert!(matches!(store.register(&other, &cm.first).await, Err(StoreError::Conflict(id)) if id == cm.reg.market));

    let stored = store.market(&cm.reg.market).await.unwrap().expect("registered");
    assert_eq!(
        (stored.name.as_str(), stored.market_key, stored.device_secret, &stored.certificate, stored.registered_at_ms),
        (cm.reg.name.as_str(), cm.reg.market_key, cm.reg.device_secret, &cm.reg.certificate, cm.reg.registered_at_ms)
    );
    assert_eq!(store.markets().await.unwrap().len(), 1);
    assert_eq!(store.next_offset(&cm.reg.market).await.unwrap(), 2, "the log holds the cloud device's enrolment");
    assert_eq!(store.load_log(&cm.reg.market, 0).await.unwrap(), cm.first);
    let unknown = cloud_market(2).reg.market;
    assert!(store.market(&unknown).await.unwrap().is_none());
    assert!(matches!(store.next_offset(&unknown).await, Err(StoreError::UnknownMarket(_))));
    assert!(matches!(store.begin(&unknown).await, Err(StoreError::UnknownMarket(_))));

    // Two processes registering one market at the same moment: one creates it, the other finds it.
    let (a, b) = (connect(&db).await, connect(&db).await);
    let cm3 = cloud_market(3);
    let (ra, rb) = tokio::join!(a.register(&cm3.reg, &cm3.first), b.register(&cm3.reg, &cm3.first));
    let mut outcomes = vec![ra.unwrap(), rb.unwrap()];
    outcomes.sort_by_key(|o| *o == Registered::New);
    assert_eq!(outcomes, vec![Registered::Already, Registered::New]);
    assert_eq!(a.load_log(&cm3.reg.market, 0).await.unwrap(), cm3.first, "logged once");
}

#[tokio::test]
async fn processes_starting_together_on_an_empty_database_both_migrate() {
    let db = database_or_skip!("processes_starting_together_on_an_empty_database_both_migrate");
    let (a, b, c) = tokio::join!(PgStore::connect(&db.url), PgStore::connect(&db.url), PgStore::connect(&db.url));
    for s in [a, b, c] {
        assert!(s.unwrap().markets().await.unwrap().is_empty());
    }
    let client = db.client().await;
    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations")).unwrap().count() as i64;
    assert!(migrations >= 2);
    assert_eq!(count(&client, "SELECT count(*) FROM stallmesh_schema_history").await, migrations, "each migration applied once");
}

#[tokio::test]
async fn a_batch_commits_the_log_and_its_projections_together() {
    let db = database_or_skip!("a_batch_commits_the_log_and_its_projections_together");
    let store = connect(&db).await;
    let mut cm = cloud_market(4);
    store.register(&cm.reg, &cm.first).await.unwrap();
    let (mut fish, mut fish_changes) = tablet(&cm.m, 1, "Fish", 250);
    let (mut bread, bread_changes) = tablet(&cm.m, 2, "Bread", 400);
    // Fish learns of Bread (to transfer stock rights to it); one of its sales has two lines.
    fish.apply_remote(bread_changes.clone());
    let rec = RecommendationShown { arm: "treatment".into(), skus: vec!["SKU-2".into(), "SKU-1".into()] };
    let two_lines = LocalOp::Sell {
        lines: vec![LineRequest { sku: "SKU-1".into(), qty: 2 }, LineRequest { sku: "SKU-1".into(), qty: 1 }],
        client_ref: Some("till-7".into()),
        recommendation: Some(rec.clone()),
        loyalty: None,
        staff: None,
    };
    fish_changes.push(fish.record(two_lines, DAY_MS + 10 * HOUR_MS).unwrap().change);
    fish_changes.push(fish.record(sell("SKU-1", 4), DAY_MS + 11 * HOUR_MS).unwrap().change);
    fish_changes
        .push(fish.record(LocalOp::Transfer { sku: "SKU-1".into(), qty: 5, to: bread.device() }, DAY_MS + 11 * HOUR_MS).unwrap().change);
    // SHARED is written by both stalls without seeing each other: Bread's later write (a higher
    // lamport) arrives first, Fish's older one in a later batch and must not win.
    let shared = |stall: &str, price| LocalOp::UpsertProduct(Product { stall: stall.into(), ..product("SHARED", price) });
    let fish_shared = fish.record(shared("Fish", 111), DAY_MS).unwrap();
    let bread_shared: Vec<_> = (0..3).map(|i| bread.record(shared("Bread", 200 + i), DAY_MS).unwrap()).collect();
    let lamport = |e: &stallmesh_ledger::Entry| match &e.event.body {
        EventBody::ProductUpserted { lamport, .. } => *lamport,
        _ => unreachable!(),
    };
    assert!(lamport(&fish_shared) < lamport(&bread_shared[2]), "the scenario: Fish's write is the older one");
    let mut bread_batch = bread_changes.clone();
    bread_batch.extend(bread_shared.iter().map(|e| e.change.clone()));
    bread_batch.push(bread.record(sell("SKU-2", 3), DAY_MS + 12 * HOUR_MS).unwrap().change);

    let first = cm.upload(&store, bread_batch, DAY_MS + 12 * HOUR_MS).await;
    assert!(first.records.len() >= 7 && first.rejected.is_empty(), "{:?}", first.rejected);
    let mut rest = fish_changes.clone();
    rest.push(fish_shared.change.clone());
    let second = cm.upload(&store, rest, DAY_MS + 13 * HOUR_MS).await;
    assert!(second.rejected.is_empty(), "{:?}", second.rejected);

    let c = db.client().await;
    let market = cm.reg.market.to_hex();
    let state = cm.ingest.ledger().state();
    // The log: every record once, in order, its body as consumers read it.
    let rows = c
        .query("SELECT \"offset\", device, seq, kind, body, digest FROM events WHERE market = $1 ORDER BY \"offset\"", &[&market])
        .await
        .unwrap();
    let log = store.load_log(&cm.reg.market, 0).await.unwrap();
    assert_eq!(rows.len() as u64, cm.ingest.offset());
    assert_eq!(log.len(), rows.len());
    for (row, record) in rows.iter().zip(&log) {
        let event = log_event(&cm.reg.market, record);
        assert_eq!(row.get::<_, i64>(0) as u64, event.offset);
        assert_eq!((row.get::<_, String>(1), row.get::<_, i64>(2) as u64), (event.device.clone(), event.seq));
        assert_eq!(row.get::<_, String>(3), event.body.kind());
        assert_eq!(row.get::<_, serde_json::Value>(4), serde_json::to_value(&event.body).unwrap());
        assert_eq!(row.get::<_, String>(5), event.digest);
    }
    assert_eq!(store.next_offset(&cm.reg.market).await.unwrap(), cm.ingest.next_offset());

    // Sales: one row each, lines adding up to the total, the recommendation beside it.
    assert_eq!(count(&c, "SELECT count(*) FROM sales").await as usize, state.sales.len());
    for sale in state.sales.values() {
        let row = c
            .query_one(
                "SELECT s.total_cents, s.currency, s.client_ref, s.device, \
                 (SELECT sum(qty * price_cents)::bigint FROM sale_lines l WHERE l.market = s.market AND l.sale_id = s.sale_id), \
                 (SELECT count(*) FROM sale_lines l WHERE l.market = s.market AND l.sale_id = s.sale_id), \
                 stallmesh_timestamptz_to_ms(s.time) \
                 FROM sales s WHERE s.market = $1 AND s.sale_id = $2",
                &[&market, &sale.id],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0) as u64, sale.total_cents);
        assert_eq!(row.get::<_, i64>(4) as u64, sale.total_cents, "the lines add up to the total");
        assert_eq!(row.get::<_, i64>(5) as usize, sale.lines.len());
        assert_eq!((row.get::<_, String>(1), row.get::<_, Option<String>>(2)), (sale.currency.clone(), sale.client_ref.clone()));
        assert_eq!(row.get::<_, String>(3), sale.device.to_hex());
        assert_eq!(row.get::<_, i64>(6) as u64, sale.time_ms);
    }
    let recs = c.query("SELECT arm, skus FROM recommendation_records WHERE market = $1", &[&market]).await.unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!((recs[0].get::<_, String>(0), recs[0].get::<_, Vec<String>>(1)), (rec.arm, rec.skus));

    // Products: exactly the ledger's last-writer-wins catalogue.
    let products = c
        .query(
            "SELECT sku, name, price_cents, currency, stall, tags, lamport, author FROM products WHERE market = $1 ORDER BY sku",
            &[&market],
        )
        .await
        .unwrap();
    assert_eq!(products.len(), state.products.len());
    for (row, (sku, p)) in products.iter().zip(&state.products) {
        assert_eq!(&row.get::<_, String>(0), sku);
        assert_eq!(
            (
                row.get::<_, String>(1),
                row.get::<_, i64>(2) as u64,
                row.get::<_, String>(3),
                row.get::<_, String>(4),
                row.get::<_, Vec<String>>(5)
            ),
            (p.product.name.clone(), p.product.price_cents, p.product.currency.clone(), p.product.stall.clone(), p.product.tags.clone())
        );
        assert_eq!((row.get::<_, i64>(6) as u64, row.get::<_, String>(7)), (p.lamport, p.author.to_hex()));
    }
    assert_eq!(state.products["SHARED"].product.price_cents, 202, "Bread's last write wins");

    // Devices with their stalls; stock movements.
    let devices = c.query("SELECT device, stall, role FROM devices WHERE market = $1 ORDER BY device", &[&market]).await.unwrap();
    let expected: Vec<(String, String, String)> = state
        .devices
        .iter()
        .map(|(d, r)| (d.to_hex(), r.certificate.stall.clone(), stallmesh_cloud::projection::role_name(r.certificate.role).to_string()))
        .collect();
    let found: Vec<(String, String, String)> = devices.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(found, expected);
    assert!(found.iter().any(|(d, stall, _)| *d == fish.device().to_hex() && stall == "Fish"));
    assert_eq!(count(&c, "SELECT count(*) FROM restocks").await as u64, state.restocks);
    let transfer = c.query_one("SELECT device, to_device, sku, qty FROM transfers", &[]).await.unwrap();
    assert_eq!(
        (transfer.get::<_, String>(0), transfer.get::<_, String>(1), transfer.get::<_, String>(2), transfer.get::<_, i64>(3)),
        (fish.device().to_hex(), bread.device().to_hex(), "SKU-1".to_string(), 5)
    );
}

#[tokio::test]
async fn rejections_evidence_and_revocations_are_kept() {
    let db = database_or_skip!("rejections_evidence_and_revocations_are_kept");
    let store = connect(&db).await;
    let mut cm = cloud_market(5);
    store.register(&cm.reg, &cm.first).await.unwrap();
    let (mut a, changes) = tablet(&cm.m, 1, "Fish", 250);
    let (b, b_changes) = tablet(&cm.m, 2, "Bread", 400);
    let mut forged = changes[2].clone();
    forged.signature.0[0] ^= 1;
    // A's revocation of B, logged before B's enrolment reaches the cloud: it applies once it does
    // (devices.revoked_at is the earliest revocation logged, whatever the order of arrival).
    a.apply_remote(b_changes.clone());
    let revocation = cm.m.key.revoke(b.device(), DAY_MS + HOUR_MS);
    let revoke = a.record(LocalOp::Revoke(revocation), DAY_MS + HOUR_MS).unwrap().change;
    let batch = cm.upload(&store, vec![changes[0].clone(), changes[1].clone(), forged], DAY_MS).await;
    assert_eq!(batch.rejected.len(), 1);
    let c = db.client().await;
    let row = c.query_one("SELECT device, seq, reason FROM rejections", &[]).await.unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, i64>(1), row.get::<_, String>(2)),
        (a.device().to_hex(), 2, batch.rejected[0].reason.clone())
    );

    let mut rest = changes[2..].to_vec();
    rest.push(revoke);
    rest.extend(b_changes);
    cm.upload(&store, rest, DAY_MS + 2 * HOUR_MS).await;
    let revoked_at: i64 = c
        .query_one("SELECT stallmesh_timestamptz_to_ms(revoked_at) FROM devices WHERE device = $1", &[&b.device().to_hex()])
        .await
        .unwrap()
        .get(0);
    assert_eq!(revoked_at as u64, DAY_MS + HOUR_MS);
    assert_eq!(count(&c, "SELECT count(*) FROM revocations").await, 1);

    // Evidence is kept once per change, whichever batch carries it again.
    let evidence: Vec<SignedChange> = vec![changes[1].clone(), changes[1].clone()];
    let tx = store.begin(&cm.reg.market).await.unwrap();
    tx.commit(&[], &[], &evidence, &[], DAY_MS).await.unwrap();
    let tx = store.begin(&cm.reg.market).await.unwrap();
    tx.commit(&[], &[], &evidence[..1], &[], DAY_MS).await.unwrap();
    let row = c.query_one("SELECT count(*), min(digest), min(seq) FROM evidence", &[]).await.unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, String>(1), row.get::<_, i64>(2)), (1, changes[1].digest().to_hex(), 1));
}

#[tokio::test]
async fn the_stored_log_restores_the_ingest_core() {
    let db = database_or_skip!("the_stored_log_restores_the_ingest_core");
    let store = connect(&db).await;
    let mut cm = cloud_market(6);
    store.register(&cm.reg, &cm.first).await.unwrap();
    for n in 1..=3u16 {
        let (mut l, mut changes) = tablet(&cm.m, n, &format!("Stall {n}"), 100 * n as u64);
        for i in 0..20 {
            changes.push(l.record(sell(&format!("SKU-{n}"), 1), DAY_MS + i * MINUTE_MS).unwrap().change);
        }
        cm.upload(&store, changes, DAY_MS + n as u64 * HOUR_MS).await;
    }
    // Another process, from the store alone.
    let other = connect(&db).await;
    let reg = other.market(&cm.reg.market).await.unwrap().unwrap();
    let records = other.load_log(&reg.market, 0).await.unwrap();
    let restored = MarketIngest::restore(cm.m.ctx.clone(), reg.device_key(), reg.certificate.clone(), records.clone()).unwrap();
    assert_eq!(restored.heads(), cm.ingest.heads());
    assert_eq!(restored.offset(), cm.ingest.offset());
    assert_eq!(restored.ledger().state(), cm.ingest.ledger().state());

    let tail = other.load_log(&reg.market, 10).await.unwrap();
    assert_eq!(tail, records[10..].to_vec(), "records after an offset");
    let events = other.events(&reg.market, 5, 7).await.unwrap();
    let expected: Vec<_> = records[5..12].iter().map(|r| log_event(&reg.market, r)).collect();
    assert_eq!(events, expected, "events are the log mapped for consumers, `limit` at a time");
    assert!(other.events(&reg.market, records.len() as u64, 10).await.unwrap().is_empty());
}

async fn registered(db: &TestDb, seeds: &[u8]) -> (Arc<PgStore>, Vec<CloudMarket>) {
    let store = Arc::new(PgStore::connect(&db.url).await.unwrap());
    let mut markets = Vec::new();
    for seed in seeds {
        let cm = cloud_market(*seed);
        store.register(&cm.reg, &cm.first).await.unwrap();
        markets.push(cm);
    }
    (store, markets)
}

/// How long a transaction that must wait is watched still waiting.
const STILL_WAITING: Duration = Duration::from_millis(500);
/// Generous for a lock that is free: a loaded CI machine, not a wait for another transaction.
const PROMPTLY: Duration = Duration::from_secs(5);

#[tokio::test]
async fn transactions_on_one_market_take_turns_and_other_markets_do_not_wait() {
    let db = database_or_skip!("transactions_on_one_market_take_turns_and_other_markets_do_not_wait");
    let (a, mut markets) = registered(&db, &[7, 8]).await;
    let b = Arc::new(PgStore::connect(&db.url).await.unwrap()); // a second process
    let (one, two) = (markets[0].reg.market, markets[1].reg.market);

    let tx = a.begin(&one).await.unwrap();
    let start = tx.next_offset();
    let waiting = {
        let b = b.clone();
        tokio::spawn(async move { b.begin(&one).await })
    };
    tokio::time::sleep(STILL_WAITING).await;
    assert!(!waiting.is_finished(), "the second transaction on a market waits for the first");
    let other: PgTx = tokio::time::timeout(PROMPTLY, b.begin(&two)).await.expect("another market does not wait").unwrap();
    drop(other);

    let (_, changes) = tablet(&markets[0].m, 1, "Fish", 250);
    let batch = markets[0].ingest.ingest(changes, DAY_MS);
    let n = batch.records.len() as u64;
    tx.commit(&batch.records, &batch.rejected, &batch.evidence, &[], DAY_MS).await.unwrap();
    let mut second = tokio::time::timeout(PROMPTLY, waiting).await.expect("the lock is released by the commit").unwrap().unwrap();
    assert_eq!(second.next_offset(), start + n, "it sees what the first committed");
    assert_eq!(second.load_after(start - 1).await.unwrap(), batch.records, "and can catch up under the lock");
}

async fn idle_in_transaction(db: &TestDb) -> i64 {
    let c = db.client().await;
    let sql = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND state LIKE 'idle in transaction%'";
    count(&c, sql).await
}

#[tokio::test]
async fn an_aborted_transaction_leaves_nothing_and_releases_the_market() {
    let db = database_or_skip!("an_aborted_transaction_leaves_nothing_and_releases_the_market");
    let (store, mut markets) = registered(&db, &[9]).await;
    let cm = &mut markets[0];
    let market = cm.reg.market;
    let before = store.next_offset(&market).await.unwrap();

    // Dropped without committing.
    drop(store.begin(&market).await.unwrap());
    let tx = tokio::time::timeout(PROMPTLY, store.begin(&market)).await.expect("the lock is released").unwrap();
    assert_eq!(tx.next_offset(), before);
    drop(tx);

    // A commit that fails part-way (a change logged twice: the log refuses it) writes nothing.
    let (mut l, changes) = tablet(&cm.m, 1, "Fish", 250);
    let mut changes = changes;
    changes.push(l.record(sell("SKU-1", 1), DAY_MS).unwrap().change);
    let batch = cm.ingest.ingest(changes, DAY_MS);
    let mut broken = batch.records.clone();
    broken.push(LogRecord { offset: broken.last().unwrap().offset + 1, entry: batch.records[0].entry.clone() });
    let tx = store.begin(&market).await.unwrap();
    assert!(matches!(tx.commit(&broken, &[], &[], &[], DAY_MS).await, Err(StoreError::Unavailable(_))));
    let c = db.client().await;
    assert_eq!(store.next_offset(&market).await.unwrap(), before);
    assert_eq!(count(&c, "SELECT count(*) FROM events").await as u64, before - 1);
    for table in ["sales", "sale_lines", "products", "restocks"] {
        assert_eq!(count(&c, &format!("SELECT count(*) FROM {table}")).await, 0, "{table}");
    }
    assert_eq!(count(&c, "SELECT count(*) FROM devices").await, 1, "only the cloud device");

    // A commit abandoned mid-flight (its future dropped) is all or nothing.
    let tx = store.begin(&market).await.unwrap();
    let _ = tokio::time::timeout(Duration::from_micros(50), tx.commit(&batch.records, &[], &[], &[], DAY_MS)).await;
    let tx = tokio::time::timeout(PROMPTLY, store.begin(&market)).await.expect("the lock is released").unwrap();
    let n = tx.next_offset();
    assert!(n == before || n == before + batch.records.len() as u64, "all or nothing: {n}");
    let logged = count(&c, "SELECT count(*) FROM events").await as u64;
    assert_eq!(logged, n - 1);
    let sales = count(&c, "SELECT count(*) FROM sales").await;
    assert_eq!(sales, if n == before { 0 } else { 1 });
    // The same batch still commits: the market goes on.
    if n == before {
        tx.commit(&batch.records, &[], &[], &[], DAY_MS).await.unwrap();
    } else {
        drop(tx);
    }
    assert_eq!(store.next_offset(&market).await.unwrap(), before + batch.records.len() as u64);
    assert_eq!(count(&c, "SELECT count(*) FROM sales").await, 1);

    // No pooled connection is left inside a transaction (rollbacks finish on the runtime).
    let mut idle = idle_in_transaction(&db).await;
    for _ in 0..50 {
        if idle == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        idle = idle_in_transaction(&db).await;
    }
    assert_eq!(idle, 0, "sessions idle in a transaction");
}

/// The query in the module documentation of `store/postgres.rs`, as an analyst would paste it.
fn documented_revenue_query() -> String {
    let source = include_str!("../src/store/postgres.rs");
    let doc: Vec<&str> = source.lines().take_while(|l| l.starts_with("//!")).map(|l| l.trim_start_matches("//!").trim_start()).collect();
    let start = doc.iter().position(|l| *l == "```sql").expect("a ```sql block in the module docs") + 1;
    let end = start + doc[start..].iter().position(|l| *l == "```").expect("the block ends");
    doc[start..end].join("\n")
}

#[tokio::test]
async fn the_documented_query_gives_revenue_per_hour_per_stall() {
    let db = database_or_skip!("the_documented_query_gives_revenue_per_hour_per_stall");
    let store = connect(&db).await;
    let mut cm = cloud_market(10);
    store.register(&cm.reg, &cm.first).await.unwrap();
    let (mut fish, mut changes) = tablet(&cm.m, 1, "Fish", 250);
    let (mut bread, bread_changes) = tablet(&cm.m, 2, "Bread", 400);
    changes.extend(bread_changes);
    let at = |h: u64, m: u64| DAY_MS + h * HOUR_MS + m * MINUTE_MS;
    for (qty, t) in [(2, at(10, 5)), (1, at(10, 59)), (4, at(11, 30)), (1, DAY_MS + 24 * HOUR_MS), (1, DAY_MS - 1)] {
        changes.push(fish.record(sell("SKU-1", qty), t).unwrap().change);
    }
    for (qty, t) in [(1, at(10, 15)), (3, at(12, 0))] {
        changes.push(bread.record(sell("SKU-2", qty), t).unwrap().change);
    }
    cm.upload(&store, changes, at(13, 0)).await;
    let other = cloud_market(11); // another market's sales never count
    store.register(&other.reg, &other.first).await.unwrap();

    let c = db.client().await;
    let sql = format!(
        "SELECT hour::text, stall, currency, revenue_cents::bigint, sales FROM ({}) q ORDER BY 1, 2, 3",
        documented_revenue_query().trim().trim_end_matches(';')
    );
    let text = tokio_postgres::types::Type::TEXT;
    let stmt = c.prepare_typed(&sql, &[text.clone(), text.clone(), text]).await.expect("the documented query is valid SQL");
    let run = |tz: &'static str| {
        let (c, stmt, market) = (&c, &stmt, cm.reg.market.to_hex());
        async move {
            let rows = c.query(stmt, &[&market, &"2024-05-04", &tz]).await.unwrap();
            rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))).collect::<Vec<(String, String, String, i64, i64)>>()
        }
    };
    let row = |h: &str, stall: &str, cents, n| (format!("2024-05-04 {h}:00:00"), stall.to_string(), "EUR".to_string(), cents, n);
    assert_eq!(
        run("UTC").await,
        vec![row("10", "Bread", 400, 1), row("10", "Fish", 750, 2), row("11", "Fish", 1000, 1), row("12", "Bread", 1200, 1)]
    );
    // The market's own day and hours: in Berlin (UTC+2 in May) the sale at 23:59 UTC the day
    // before is at 01:59 on the day, and the one at midnight UTC after it is the next day's.
    assert_eq!(
        run("Europe/Berlin").await,
        vec![
            row("01", "Fish", 250, 1),
            row("12", "Bread", 400, 1),
            row("12", "Fish", 750, 2),
            row("13", "Fish", 1000, 1),
            row("14", "Bread", 1200, 1),
        ]
    );
}

#[tokio::test]
async fn odd_values_a_device_may_sign_never_stop_the_ingest() {
    let db = database_or_skip!("odd_values_a_device_may_sign_never_stop_the_ingest");
    let store = connect(&db).await;
    let mut cm = cloud_market(12);
    store.register(&cm.reg, &cm.first).await.unwrap();
    let (mut l, mut changes) = tablet(&cm.m, 1, "Fish", 250);
    // PostgreSQL text and jsonb cannot hold NUL; a clock may say anything.
    let odd = Product { name: "Fish\0Chips".into(), tags: vec!["a\0b".into()], ..product("ODD", 100) };
    changes.push(l.record(LocalOp::UpsertProduct(odd), DAY_MS).unwrap().change);
    changes.push(l.record(LocalOp::Restock { sku: "ODD".into(), qty: 10 }, DAY_MS).unwrap().change);
    let far =
        LocalOp::Sell { lines: vec![LineRequest { sku: "ODD".into(), qty: 1 }], client_ref: Some("x\0y".into()), recommendation: None, loyalty: None, staff: None };
    changes.push(l.record(far, u64::MAX).unwrap().change);
    let batch = cm.upload(&store, changes, DAY_MS).await;
    assert!(batch.rejected.is_empty(), "{:?}", batch.rejected);

    let c = db.client().await;
    let p = c.query_one("SELECT name, tags FROM products WHERE sku = 'ODD'", &[]).await.unwrap();
    assert_eq!((p.get::<_, String>(0), p.get::<_, Vec<String>>(1)), ("Fish\u{fffd}Chips".to_string(), vec!["a\u{fffd}b".to_string()]));
    let s = c.query_one("SELECT client_ref, time = 'infinity', stallmesh_timestamptz_to_ms(time) FROM sales", &[]).await.unwrap();
    assert_eq!((s.get::<_, String>(0), s.get::<_, bool>(1), s.get::<_, i64>(2)), ("x\u{fffd}y".to_string(), true, i64::MAX));
    let body: serde_json::Value =
        c.query_one("SELECT body FROM events WHERE kind = 'product' AND body->>'sku' = 'ODD'", &[]).await.unwrap().get(0);
    assert_eq!(body["name"], "Fish\u{fffd}Chips");
    // The exact bytes are in the log, which restores the core.
    let records = store.load_log(&cm.reg.market, 0).await.unwrap();
    let restored = MarketIngest::restore(cm.m.ctx.clone(), cm.reg.device_key(), cm.reg.certificate.clone(), records).unwrap();
    assert_eq!(restored.ledger().state().products["ODD"].product.name, "Fish\0Chips");
}

#[tokio::test]
async fn head_office_sees_each_cards_totals_and_what_was_spent_twice_across_a_split() {
    use stallmesh_identity::{CardId, VoucherId};
    use stallmesh_ledger::{LoyaltyAsset, LoyaltyOnSale};
    use stallmesh_loyalty::OfflineBudget;
    let db = database_or_skip!("head_office_sees_each_cards_totals_and_what_was_spent_twice_across_a_split");
    let store = connect(&db).await;
    let mut cm = cloud_market(13);
    store.register(&cm.reg, &cm.first).await.unwrap();
    let (mut a, mut changes) = tablet(&cm.m, 1, "Tea", 1_000);
    let (mut b, b_changes) = tablet(&cm.m, 2, "Cake", 1_000);
    a.apply_remote(b_changes.clone());
    b.apply_remote(changes.clone());
    changes.extend(b_changes);
    let card = CardId([4; 8]);
    let budget = Some(OfflineBudget { points_per_card: 50, points_per_device: 500, vouchers_per_device: 2 });
    let with_card = |sku: &str, earn: u64, redeem: u64, budget| LocalOp::Sell {
        lines: vec![LineRequest { sku: sku.into(), qty: 1 }],
        client_ref: None,
        recommendation: None,
        loyalty: Some(LoyaltyOnSale { card, points_earned: earn, redeem_points: redeem, point_value_cents: 1, offline_budget: budget }),
        staff: None,
    };
    // 40 points earned at tablet 1 and a voucher minted there, both known to tablet 2.
    let earn = a.record(with_card("SKU-1", 40, 0, None), DAY_MS + 1).unwrap();
    let voucher = VoucherId([9; 8]);
    let minted = a.record(LocalOp::MintVoucher { voucher, label: "Free tea".into(), value_cents: 300 }, DAY_MS + 2).unwrap();
    b.apply_remote([earn.change.clone(), minted.change.clone()]);
    changes.extend([earn.change, minted.change]);
    // The Wi-Fi splits: each side redeems the card's 40 points and the voucher.
    changes.push(a.record(with_card("SKU-1", 0, 40, None), DAY_MS + 10).unwrap().change);
    changes.push(a.record(LocalOp::RedeemVoucher { voucher, offline_budget: None }, DAY_MS + 11).unwrap().change);
    changes.push(b.record(with_card("SKU-2", 0, 40, budget), DAY_MS + 12).unwrap().change);
    changes.push(b.record(LocalOp::RedeemVoucher { voucher, offline_budget: budget }, DAY_MS + 13).unwrap().change);
    cm.upload(&store, changes, DAY_MS + HOUR_MS).await;

    let c = db.client().await;
    let m = cm.reg.market.to_hex();
    let row = c.query_one("SELECT points_earned, points_redeemed, points_unproven, discount_cents, sales FROM loyalty_cards WHERE market = $1 AND card = $2", &[&m, &card.to_hex()]).await.unwrap();
    let totals: (i64, i64, i64, i64, i64) = (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    assert_eq!(totals, (40, 40, 40, 80, 3));
    let rows = c.query("SELECT asset, id, units FROM loyalty_exposures WHERE market = $1 ORDER BY asset", &[&m]).await.unwrap();
    let exposures: Vec<(String, String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    assert_eq!(exposures, vec![("points".into(), card.to_hex(), 40), ("voucher".into(), voucher.to_hex(), 1)]);
    // The same as the cloud's own ledger (and every tablet holding both sides) derives.
    let ledger: Vec<(LoyaltyAsset, u64)> = cm.ingest.ledger().state().loyalty.exposures().iter().map(|e| (e.asset, e.units)).collect();
    assert_eq!(ledger, vec![(LoyaltyAsset::Points(card), 40), (LoyaltyAsset::Voucher(voucher), 1)]);
}
