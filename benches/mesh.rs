//! Mesh benchmark on real processes in network namespaces (needs root or user namespaces):
//!
//! - propagation: a sale recorded on one node, until it has arrived at every other node, at 5 and
//!   20 nodes (p50 / p99 over many sales; arrival times are read from each node's
//!   `/api/v1/mesh/arrivals`, stamped with the shared machine clock);
//! - catch-up: a node that missed 10,000 sales starts; time until it holds them all, and the sync
//!   bytes it received against the raw bytes of those changes.
//!
//! Run: `cargo bench -p stallmesh-benches --bench mesh` (`STALLMESH_BENCH_MESH_SIZES=5` and
//! `STALLMESH_BENCH_CATCHUP=2000` for a quick run). It prints a table; nothing here is a pass/fail
//! test.

#[path = "../tests/netns/mod.rs"]
mod netns;

use netns::{eventually, Lan};
use serde_json::{json, Value};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SALES_PER_RUN: usize = 200;

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn start_market(n: usize) -> Lan {
    let lan = Lan::with_market(n);
    for k in 1..=n {
        eventually(Duration::from_secs(60), "full mesh", || lan.peers(k) >= n - 1);
    }
    let p = json!({ "sku": "S", "name": "Sample", "price_cents": 100, "currency": "EUR", "stall": "Stall" });
    assert_eq!(lan.post(1, "/api/v1/products", &p).0, 201);
    assert_eq!(lan.post(1, "/api/v1/restocks", &json!({ "sku": "S", "qty": 1_000_000 })).0, 201);
    lan
}

fn propagation(n: usize) {
    let lan = start_market(n);
    let mut sent: Vec<(String, u64)> = Vec::new();
    for _ in 0..SALES_PER_RUN {
        let t0 = now_us();
        let (status, sale) = lan.post(1, "/api/v1/sales", &json!({ "lines": [{ "sku": "S", "qty": 1 }] }));
        assert_eq!(status, 201);
        sent.push((sale["id"].as_str().unwrap().to_string(), t0));
        // Spread sales out as a busy market would (and so each is measured on its own).
        std::thread::sleep(Duration::from_millis(20));
    }
    let last = &sent.last().unwrap().0;
    for k in 2..=n {
        eventually(Duration::from_secs(60), "all sales arrived", || {
            lan.get(k, "/api/v1/mesh/arrivals")["arrivals"].as_array().unwrap().iter().any(|a| a["sale_id"] == *last)
        });
    }
    let arrivals: Vec<Vec<Value>> = (2..=n).map(|k| lan.get(k, "/api/v1/mesh/arrivals")["arrivals"].as_array().unwrap().clone()).collect();
    let mut to_all: Vec<f64> = sent
        .iter()
        .map(|(id, t0)| {
            arrivals
                .iter()
                .map(|list| list.iter().find(|a| a["sale_id"] == *id).map(|a| a["arrived_us"].as_u64().unwrap()).expect("arrived"))
                .max()
                .unwrap()
                .saturating_sub(*t0) as f64
                / 1000.0
        })
        .collect();
    to_all.sort_by(f64::total_cmp);
    println!(
        "propagation to all peers, {n:>2} nodes, {SALES_PER_RUN} sales: p50 {:6.2} ms  p99 {:6.2} ms  max {:6.2} ms  (from the POST on node 1, incl. its durable commit)",
        percentile(&to_all, 0.5),
        percentile(&to_all, 0.99),
        to_all.last().unwrap()
    );
}

fn metric(url: &str, prefix: &str) -> f64 {
    let text = ureq::get(&format!("{url}/metrics")).call().unwrap().into_string().unwrap();
    text.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

fn catch_up(missed: usize) {
    let mut lan = Lan::new(2);
    lan.market("A");
    let c1 = lan.enrol(1, "A");
    let c2 = lan.enrol(2, "A");
    lan.start(1, &c1);
    let p = json!({ "sku": "S", "name": "Sample", "price_cents": 100, "currency": "EUR", "stall": "Stall" });
    assert_eq!(lan.post(1, "/api/v1/products", &p).0, 201);
    assert_eq!(lan.post(1, "/api/v1/restocks", &json!({ "sku": "S", "qty": 1_000_000 })).0, 201);
    for _ in 0..missed {
        assert_eq!(lan.post(1, "/api/v1/sales", &json!({ "lines": [{ "sku": "S", "qty": 1 }] })).0, 201);
    }
    // The raw bytes of every change node 2 lacks: node 1's whole journal.
    let device1 = lan.get(1, "/api/v1/status")["node"]["device"].as_str().unwrap().to_string();
    let mut raw = 0usize;
    let mut from = 0;
    loop {
        let bytes = {
            let mut out = Vec::new();
            let url = format!("{}/api/v1/changes?device={device1}&from={from}", lan.url(1));
            std::io::Read::read_to_end(&mut ureq::get(&url).call().unwrap().into_reader(), &mut out).unwrap();
            out
        };
        let changes: Vec<stallmesh_identity::SignedChange> = postcard::from_bytes(&bytes).unwrap();
        if changes.is_empty() {
            break;
        }
        raw += changes.iter().map(|c| c.encoded_len()).sum::<usize>();
        from += changes.len() as u64;
    }
    let started = Instant::now();
    lan.start(2, &c2);
    let up = started.elapsed();
    let took = eventually(Duration::from_secs(120), "catch-up", || lan.get(2, "/api/v1/status")["sales"].as_u64() == Some(missed as u64));
    let received = metric(lan.url(2), "stallmesh_sync_bytes_total{direction=\"in\"}");
    println!(
        "catch-up of {missed} missed sales: {:.0} ms after the node answered HTTP ({:.0} ms after its start); \
         received {:.2} MB of sync messages for {:.2} MB of changes ({:.3}x)",
        took.as_secs_f64() * 1000.0,
        (took + up).as_secs_f64() * 1000.0,
        received / 1e6,
        raw as f64 / 1e6,
        received / raw as f64
    );
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would pass nothing: do not run then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let sizes: Vec<usize> = std::env::var("STALLMESH_BENCH_MESH_SIZES")
        .unwrap_or_else(|_| "5,20".into())
        .split(',')
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let missed: usize = std::env::var("STALLMESH_BENCH_CATCHUP").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    netns::in_netns_bench(|| {
        for n in &sizes {
            propagation(*n);
        }
        catch_up(missed);
    });
}
