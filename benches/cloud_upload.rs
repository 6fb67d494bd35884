//! The uplink end to end, on loopback, against a real cloud (`stallmesh_cloud::start`, embedded
//! store; PostgreSQL when `STALLMESH_BENCH_POSTGRES` names a server URL with its database).
//!
//! - `upload_day_10k`: a 10,000-sale market day (one tablet's journal) uploaded by the uplink core
//!   over HTTP to an empty cloud, from the first heads request until the cloud holds all of it.
//!   Printed beside it: bytes on the wire against the raw bytes of the signed changes.
//! - `sale_to_consumer_lag`: a real tablet (`stallmesh_node::start`, `cloud.url` set) records a
//!   sale; a consumer long-polls the cloud's events; measured from the sale's acknowledgement to
//!   the consumer having it. Printed beside it: p50 and p99 over the samples.
//!
//! Run: `cargo bench -p stallmesh-benches --bench cloud_upload`.

use criterion::{criterion_group, criterion_main, Criterion};
use stallmesh_identity::{DeviceKey, MarketKey, Role, SignedChange};
use stallmesh_ingest::uplink::Uplink;
use stallmesh_ingest::wire::{self, CloudReply, RequestAuth};
use stallmesh_ledger::{Ledger, LineRequest, LocalOp, MarketContext, Product};
use stallmesh_sync::MemoryLog;
use std::io::Read;
use std::time::{Duration, Instant};

const DAY_SALES: usize = 10_000;

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

fn cloud_config(dir: &std::path::Path) -> stallmesh_cloud::CloudConfig {
    stallmesh_cloud::CloudConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        postgres_url: std::env::var("STALLMESH_BENCH_POSTGRES").unwrap_or_default(),
        nats_url: String::new(),
        nats_stream: "STALLMESH".into(),
        admin_token: "bench".into(),
        watermark_interval_ms: 2_000,
        hold_ttl_ms: 600_000,
    }
}

/// Registers `market_key`'s market with the cloud at `base`, with a fresh cloud device.
fn register(base: &str, name: &str, market_key: &MarketKey) {
    let key = DeviceKey::generate().unwrap();
    let cert = market_key.enrol(key.device_id(), "cloud", Role::Cloud, u64::MAX);
    let body = stallmesh_api::cloud::RegisterMarket {
        name: name.into(),
        market_public_key: market_key.public().to_hex(),
        certificate: hex::encode(postcard::to_allocvec(&cert).unwrap()),
        device_key: hex::encode(key.secret()),
    };
    ureq::post(&format!("{base}/v1/markets")).set("authorization", "Bearer bench").send_json(&body).unwrap();
}

struct Day {
    market_key: MarketKey,
    tablet: Ledger,
    key: DeviceKey,
    cert: stallmesh_identity::Certificate,
    log: MemoryLog,
    raw_bytes: usize,
}

fn day() -> Day {
    let market_key = MarketKey::generate().unwrap();
    let key = DeviceKey::generate().unwrap();
    let cert = market_key.enrol(key.device_id(), "Stall", Role::Organiser, u64::MAX);
    let mut tablet = Ledger::new(MarketContext::new(market_key.public()), DeviceKey::from_secret(key.secret()), cert.clone());
    let mut changes: Vec<SignedChange> = vec![tablet.enrol_self(1).unwrap().unwrap().change];
    for s in 0..20 {
        let p = Product { sku: format!("SKU-{s}"), name: format!("Product {s}"), price_cents: 250, currency: "EUR".into(), stall: "Stall".into(), tags: vec![] };
        changes.push(tablet.record(LocalOp::UpsertProduct(p), 2).unwrap().change);
        changes.push(tablet.record(LocalOp::Restock { sku: format!("SKU-{s}"), qty: 100_000 }, 3).unwrap().change);
    }
    for i in 0..DAY_SALES {
        let lines = vec![LineRequest { sku: format!("SKU-{}", i % 20), qty: 1 }, LineRequest { sku: format!("SKU-{}", (i + 7) % 20), qty: 2 }];
        let op = LocalOp::Sell { lines, client_ref: Some(format!("till-{i}")), recommendation: None, loyalty: None, staff: None };
        changes.push(tablet.record(op, 10 + i as u64).unwrap().change);
    }
    let raw_bytes = changes.iter().map(SignedChange::encoded_len).sum();
    let mut log = MemoryLog::default();
    for c in changes {
        log.add(c);
    }
    Day { market_key, tablet, key, cert, log, raw_bytes }
}

/// Drives the uplink core until the cloud lacks nothing; returns the bytes sent and received.
fn upload(base: &str, d: &Day) -> (usize, usize) {
    let agent = ureq::AgentBuilder::new().build();
    let path = wire::sync_path(&d.cert.market);
    let mut core = Uplink::new(7);
    let (mut sent, mut received) = (0, 0);
    loop {
        let Some(out) = core.poll(now_ms(), d.tablet.heads_ref(), &d.log) else {
            assert_eq!(core.lacking(d.tablet.heads_ref()), 0, "nothing left to upload");
            return (sent, received);
        };
        let auth = RequestAuth::sign(&d.key, &d.cert, &path, now_ms(), &out.body);
        let mut req = agent.post(&format!("{base}{path}"));
        for (n, v) in auth.headers() {
            req = req.set(n, &v);
        }
        sent += out.body.len();
        let mut bytes = Vec::new();
        req.send_bytes(&out.body).unwrap().into_reader().read_to_end(&mut bytes).unwrap();
        received += bytes.len();
        core.on_reply(CloudReply::decode(&bytes).unwrap(), out.changes, now_ms());
    }
}

fn bench_upload(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let d = day();
    let mut g = c.benchmark_group("cloud");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    let mut ratios = Vec::new();
    g.bench_function("upload_day_10k", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // An empty cloud each time.
                let dir = tempfile::tempdir().unwrap();
                let running = rt.block_on(stallmesh_cloud::start(&cloud_config(dir.path()), std::future::pending())).unwrap();
                let base = format!("http://{}", running.addr);
                register(&base, "Bench Market", &d.market_key);
                let start = Instant::now();
                let (sent, _) = upload(&base, &d);
                total += start.elapsed();
                ratios.push(sent as f64 / d.raw_bytes as f64);
                running.server.abort();
            }
            total
        })
    });
    g.finish();
    ratios.sort_by(f64::total_cmp);
    println!("upload_day_10k: {} changes, {} raw bytes; wire bytes / raw bytes: median {:.3}", DAY_SALES + 41, d.raw_bytes, ratios[ratios.len() / 2]);
}

fn bench_lag(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cloud = rt.block_on(stallmesh_cloud::start(&cloud_config(&dir.path().join("cloud")), std::future::pending())).unwrap();
    let cloud_base = format!("http://{}", cloud.addr);
    // A tablet enrolled in a market of its own, registered with the cloud.
    let market_dir = dir.path().join("market");
    let (market_key, info) = stallmesh_identity::files::init_market(&market_dir, "Bench Market").unwrap();
    register(&cloud_base, "Bench Market", &market_key);
    let key = DeviceKey::generate().unwrap();
    let certificate = market_key.enrol(key.device_id(), "Stall", Role::Organiser, u64::MAX);
    let creds = dir.path().join("tablet");
    stallmesh_identity::files::write_device(&creds, &stallmesh_identity::files::DeviceCredentials { key, certificate, market: info.clone(), mesh_psk: market_key.mesh_psk() }).unwrap();
    let mut config = stallmesh_node::Config::load(None, |_| None).unwrap();
    config.data_dir = dir.path().join("data");
    config.credentials_dir = creds;
    config.http_addr = "127.0.0.1:0".parse().unwrap();
    config.mesh.enabled = false;
    config.inference.enabled = false;
    config.cloud.url = cloud_base.clone();
    let node = rt.block_on(stallmesh_node::start(&config, std::future::pending())).unwrap();
    let tablet = format!("http://{}", node.addr);
    let p = serde_json::json!({ "sku": "JAM", "name": "Jam", "price_cents": 400, "currency": "EUR", "stall": "Stall" });
    ureq::post(&format!("{tablet}/api/v1/products")).send_json(p).unwrap();
    ureq::post(&format!("{tablet}/api/v1/restocks")).send_json(serde_json::json!({ "sku": "JAM", "qty": 1_000_000 })).unwrap();
    let events = format!("{cloud_base}/v1/markets/{}/events", info.market_id.to_hex());
    let offset = |after: u64| -> (u64, Vec<String>) {
        let text = ureq::get(&events).query("after", &after.to_string()).query("wait_ms", "5000").call().unwrap().into_string().unwrap();
        let mut last = after;
        let mut sales = Vec::new();
        for l in text.lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            last = v["offset"].as_u64().unwrap();
            if v["kind"] == "sale" {
                sales.push(v["sale_id"].as_str().unwrap().to_string());
            }
        }
        (last, sales)
    };
    let mut after = 0;
    // Catch the consumer up with the catalogue first.
    loop {
        let (a, _) = offset(after);
        if a == after {
            break;
        }
        after = a;
    }
    let mut lags = Vec::new();
    let mut g = c.benchmark_group("cloud");
    g.sample_size(50);
    g.bench_function("sale_to_consumer_lag", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let sale: serde_json::Value =
                    ureq::post(&format!("{tablet}/api/v1/sales")).send_json(serde_json::json!({ "lines": [{ "sku": "JAM", "qty": 1 }] })).unwrap().into_json().unwrap();
                let acked = Instant::now();
                let id = sale["id"].as_str().unwrap().to_string();
                loop {
                    let (a, sales) = offset(after);
                    after = a;
                    if sales.contains(&id) {
                        break;
                    }
                }
                let lag = acked.elapsed();
                lags.push(lag);
                total += lag;
            }
            total
        })
    });
    g.finish();
    lags.sort();
    let pct = |p: usize| lags[(lags.len() * p / 100).min(lags.len() - 1)];
    println!("sale_to_consumer_lag over {} sales: p50 {:?}, p99 {:?}", lags.len(), pct(50), pct(99));
}

criterion_group!(benches, bench_upload, bench_lag);
criterion_main!(benches);
