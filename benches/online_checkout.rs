//! Online checkout of a drop against a real cloud (`stallmesh_cloud::start`) on PostgreSQL (a
//! fresh database on the machine's server; the embedded store, said loudly, when none answers
//! outside CI), with a real tablet (`stallmesh_node::start`, its uplink pointed at the cloud) that
//! planned the drop.
//!
//! - `checkout/stall_sale`: a sale at the tablet's HTTP API, for comparison in the same run.
//! - `checkout/online_hold`, `checkout/online_order`: one buyer's hold, then its payment, in turn.
//! - A burst, printed beside them: `BURST_REQUESTS` holds and their orders from `BURST_CLIENTS`
//!   concurrent clients, with requests per second and p50/p99 of each.
//! - `checkout/online_sale_to_tablet`: from an order's answer to the sale being on the tablet,
//!   through its uplink (the uplink asks the cloud for what it lacks every few seconds).
//!
//! Run: `cargo bench -p stallmesh-benches --bench online_checkout`.

#[path = "../crates/cloud/tests/support/pg.rs"]
mod pg;

use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::{json, Value};
use stallmesh_identity::{DeviceKey, Role};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Concurrent clients of the bursts: a shop's server with a pool of connections, and a crowd
/// (the cloud decides a market's waiting requests in batches, so more clients fill them).
const BURST_CLIENTS: [usize; 2] = [16, 64];
/// Holds in the burst (each then paid).
const BURST_REQUESTS: usize = 2_000;

static BUYER: AtomicU64 = AtomicU64::new(0);

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

struct Shop {
    base: String,
    drop: String,
    agent: ureq::Agent,
}

impl Shop {
    fn post(&self, path: &str, key: &str, body: Value) -> Value {
        let r = self
            .agent
            .post(&format!("{}{path}", self.base))
            .set("authorization", "Bearer bench")
            .set("idempotency-key", key)
            .send_json(body);
        match r {
            Ok(r) => r.into_json().unwrap(),
            Err(e) => panic!("POST {path}: {e}"),
        }
    }

    fn hold(&self) -> String {
        let n = BUYER.fetch_add(1, Ordering::Relaxed);
        let h = self.post(&format!("/drops/{}/holds", self.drop), &format!("h{n}"), json!({ "buyer": format!("buyer-{n}"), "qty": 1 }));
        h["id"].as_str().unwrap().to_string()
    }

    fn order(&self, hold: &str) -> String {
        let o = self.post(&format!("/drops/{}/orders", self.drop), &format!("o-{hold}"), json!({ "hold": hold }));
        o["sale_id"].as_str().unwrap().to_string()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn bench_checkout(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let db = rt.block_on(pg::fresh_database("online_checkout bench"));
    if db.is_none() {
        eprintln!("NOTE: no PostgreSQL: measuring the embedded store instead");
    }
    let dir = tempfile::tempdir().unwrap();
    let config = stallmesh_cloud::CloudConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("cloud"),
        postgres_url: db.as_ref().map(|d| d.url.clone()).unwrap_or_default(),
        nats_url: String::new(),
        nats_stream: "STALLMESH".into(),
        admin_token: "bench".into(),
        watermark_interval_ms: 2_000,
        hold_ttl_ms: 600_000,
    };
    let cloud = rt.block_on(stallmesh_cloud::start(&config, std::future::pending())).unwrap();
    let cloud_base = format!("http://{}", cloud.addr);

    // The market, its cloud device, its online channel.
    let (market_key, info) = stallmesh_identity::files::init_market(&dir.path().join("market"), "Bench Market").unwrap();
    let cloud_key = DeviceKey::generate().unwrap();
    let cloud_cert = market_key.enrol(cloud_key.device_id(), "cloud", Role::Cloud, u64::MAX);
    let body = stallmesh_api::cloud::RegisterMarket {
        name: "Bench Market".into(),
        market_public_key: market_key.public().to_hex(),
        certificate: hex::encode(postcard::to_allocvec(&cloud_cert).unwrap()),
        device_key: hex::encode(cloud_key.secret()),
    };
    ureq::post(&format!("{cloud_base}/v1/markets")).set("authorization", "Bearer bench").send_json(&body).unwrap();
    let online_key = DeviceKey::generate().unwrap();
    let online_cert = market_key.enrol(online_key.device_id(), "online", Role::Online, u64::MAX);
    let body = stallmesh_api::cloud::SetOnlineChannel {
        certificate: hex::encode(postcard::to_allocvec(&online_cert).unwrap()),
        device_key: hex::encode(online_key.secret()),
    };
    let market = info.market_id.to_hex();
    ureq::put(&format!("{cloud_base}/v1/markets/{market}/online")).set("authorization", "Bearer bench").send_json(&body).unwrap();

    // The organiser's tablet, uploading to the cloud.
    let key = DeviceKey::generate().unwrap();
    let certificate = market_key.enrol(key.device_id(), "Office", Role::Organiser, u64::MAX);
    let creds = dir.path().join("tablet");
    let device = key.device_id().to_hex();
    stallmesh_identity::files::write_device(&creds, &stallmesh_identity::files::DeviceCredentials { key, certificate, market: info, mesh_psk: market_key.mesh_psk() })
        .unwrap();
    let mut tconfig = stallmesh_node::Config::load(None, |_| None).unwrap();
    tconfig.data_dir = dir.path().join("data");
    tconfig.credentials_dir = creds;
    tconfig.http_addr = "127.0.0.1:0".parse().unwrap();
    tconfig.mesh.enabled = false;
    tconfig.inference.enabled = false;
    tconfig.cloud.url = cloud_base.clone();
    let node = rt.block_on(stallmesh_node::start(&tconfig, std::future::pending())).unwrap();
    let tablet = format!("http://{}", node.addr);
    let p = json!({ "sku": "TOTE", "name": "Tote", "price_cents": 3500, "currency": "EUR", "stall": "Office" });
    ureq::post(&format!("{tablet}/api/v1/products")).send_json(p).unwrap();
    ureq::post(&format!("{tablet}/api/v1/restocks")).send_json(json!({ "sku": "TOTE", "qty": 1_000_000 })).unwrap();
    let online = online_key.device_id().to_hex();
    let plan = json!([{ "device": online, "units": 900_000 }, { "device": device, "units": 100_000 }]);
    let body = json!({ "name": "Bench drop", "sku": "TOTE", "units": 1_000_000, "start_ms": 0, "plan": plan });
    let deadline = Instant::now() + Duration::from_secs(60);
    let drop = loop {
        // The online device's enrolment reaches the tablet through its uplink first.
        match ureq::post(&format!("{tablet}/api/v1/drops")).send_json(&body) {
            Ok(r) => break r.into_json::<Value>().unwrap()["id"].as_str().unwrap().to_string(),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => panic!("the drop: {e}"),
        }
    };
    let shop = Shop { base: format!("{cloud_base}/v1/markets/{market}"), drop: drop.clone(), agent: ureq::AgentBuilder::new().build() };
    let drop_url = format!("{}/drops/{drop}", shop.base);
    while ureq::get(&drop_url).set("authorization", "Bearer bench").call().is_err() {
        assert!(Instant::now() < deadline, "the drop reaches the cloud");
        std::thread::sleep(Duration::from_millis(200));
    }

    let mut g = c.benchmark_group("checkout");
    g.sample_size(50);
    g.bench_function("stall_sale", |b| {
        b.iter(|| ureq::post(&format!("{tablet}/api/v1/sales")).send_json(json!({ "lines": [{ "sku": "TOTE", "qty": 1 }] })).unwrap())
    });
    g.bench_function("online_hold", |b| b.iter(|| shop.hold()));
    // Each measured order pays a hold placed (unmeasured) just before its batch.
    g.bench_function("online_order", |b| {
        b.iter_custom(|iters| {
            let holds: Vec<String> = (0..iters).map(|_| shop.hold()).collect();
            let started = Instant::now();
            for h in &holds {
                shop.order(h);
            }
            started.elapsed()
        })
    });
    g.finish();

    for clients in BURST_CLIENTS {
        burst(&shop, &drop, clients, db.is_some());
    }

    // From an online order to the sale on the tablet, through its uplink.
    let mut g = c.benchmark_group("checkout");
    g.sample_size(10).measurement_time(Duration::from_secs(60));
    let mut lags = Vec::new();
    g.bench_function("online_sale_to_tablet", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let hold = shop.hold();
                let sale = shop.order(&hold);
                let paid = Instant::now();
                let since = now_ms().saturating_sub(60_000);
                loop {
                    let s: Value = ureq::get(&format!("{tablet}/api/v1/sales?limit=5")).call().unwrap().into_json().unwrap();
                    if s["sales"].as_array().unwrap().iter().any(|x| x["id"] == sale.as_str()) {
                        break;
                    }
                    assert!(paid.elapsed() < Duration::from_secs(60), "the online sale reaches the tablet (since {since})");
                    std::thread::sleep(Duration::from_millis(10));
                }
                let lag = paid.elapsed();
                lags.push(lag);
                total += lag;
            }
            total
        })
    });
    g.finish();
    lags.sort();
    println!("online_sale_to_tablet: p50 {:.0} ms, p99 {:.0} ms over {} sales", percentile(&lags, 0.5).as_secs_f64() * 1e3, percentile(&lags, 0.99).as_secs_f64() * 1e3, lags.len());
    cloud.server.abort();
}

criterion_group!(benches, bench_checkout);
criterion_main!(benches);

/// A burst: `clients` concurrent clients, each placing a hold then paying it, until
/// `BURST_REQUESTS` holds; prints requests per second and p50/p99 of each.
fn burst(shop: &Shop, drop: &str, clients: usize, postgres: bool) {
    let started = Instant::now();
    let per_client = BURST_REQUESTS / clients;
    let (mut holds, mut orders): (Vec<Duration>, Vec<Duration>) = std::thread::scope(|s| {
        let clients: Vec<_> = (0..clients)
            .map(|_| {
                s.spawn(|| {
                    let client = Shop { base: shop.base.clone(), drop: drop.to_string(), agent: ureq::AgentBuilder::new().build() };
                    let (mut h, mut o) = (Vec::new(), Vec::new());
                    for _ in 0..per_client {
                        let t = Instant::now();
                        let id = client.hold();
                        h.push(t.elapsed());
                        let t = Instant::now();
                        client.order(&id);
                        o.push(t.elapsed());
                    }
                    (h, o)
                })
            })
            .collect();
        clients.into_iter().map(|c| c.join().unwrap()).fold((Vec::new(), Vec::new()), |(mut h, mut o), (ch, co)| {
            h.extend(ch);
            o.extend(co);
            (h, o)
        })
    });
    let wall = started.elapsed();
    holds.sort();
    orders.sort();
    let requests = holds.len() + orders.len();
    println!(
        "burst ({} store): {} holds + {} orders from {clients} clients in {:.2} s = {:.0} requests/s; hold p50 {:.1} ms p99 {:.1} ms; order p50 {:.1} ms p99 {:.1} ms",
        if postgres { "PostgreSQL" } else { "embedded" },
        holds.len(),
        orders.len(),
        wall.as_secs_f64(),
        requests as f64 / wall.as_secs_f64(),
        percentile(&holds, 0.5).as_secs_f64() * 1e3,
        percentile(&holds, 0.99).as_secs_f64() * 1e3,
        percentile(&orders, 0.5).as_secs_f64() * 1e3,
        percentile(&orders, 0.99).as_secs_f64() * 1e3,
    );

}
