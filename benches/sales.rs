//! Durable sales over HTTP: a real node (`stallmesh_node::start`, a real redb file, mesh and
//! inference off) and real HTTP clients on loopback, with and without group commit, side by side
//! in one run.
//!
//! - `closed/<n>`: n clients, each posting its next sale as soon as the last is acknowledged, for
//!   `RUN_MS`: sales/s and p50/p99 acknowledgement time.
//! - `open/500`: sales sent at 500/s on a fixed schedule (32 client threads), whatever the answers
//!   do; the time is from each sale's scheduled send to its acknowledgement, so a stall is counted
//!   for every sale it holds up (no coordinated omission).
//!
//! Each cell runs `ROUNDS` times, the two modes alternating; the table gives the medians. Clients
//! and node share the machine's cores, as a till's browser and its node share a tablet's.
//!
//! Run: `cargo bench -p stallmesh-benches --bench sales`.

// The API tests' node on loopback (mesh off): one place that knows how a test node starts.
#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use support::TestNode;

const RUN_MS: u64 = 3_000;
const ROUNDS: usize = 3;
const OPEN_RATE_PER_S: u64 = 500;
const OPEN_CLIENTS: usize = 32;

/// A tablet with one product in stock for every sale the run can make.
struct Tablet {
    node: TestNode,
    _dir: tempfile::TempDir,
}

fn tablet(group_commit: bool) -> Tablet {
    let dir = tempfile::tempdir().unwrap();
    let (creds, _) = support::enrol_as(dir.path(), "tablet", "Stall", stallmesh_identity::Role::Organiser);
    let node = TestNode::start_with(&dir.path().join("data"), &creds, |c| {
        c.inference.enabled = false;
        c.store.group_commit = group_commit;
    })
    .unwrap();
    let p = serde_json::json!({ "sku": "JAM", "name": "Jam", "price_cents": 400, "currency": "EUR", "stall": "Stall" });
    assert_eq!(node.post("/api/v1/products", &p).0, 201);
    assert_eq!(node.post("/api/v1/restocks", &serde_json::json!({ "sku": "JAM", "qty": 1_000_000 })).0, 201);
    Tablet { node, _dir: dir }
}

fn sell(agent: &ureq::Agent, url: &str) {
    let sale = serde_json::json!({ "lines": [{ "sku": "JAM", "qty": 1 }] });
    let status = agent.post(url).send_json(sale).expect("a sale is acknowledged").status();
    assert_eq!(status, 201);
}

fn percentile(sorted_us: &[u64], p: f64) -> f64 {
    sorted_us[((sorted_us.len() - 1) as f64 * p).round() as usize] as f64 / 1_000.0
}

/// (sales/s, p50 ms, p99 ms) for `clients` clients in a closed loop.
fn closed(t: &Tablet, clients: usize) -> (f64, f64, f64) {
    let url = format!("{}/api/v1/sales", t.node.base);
    let start = Arc::new(Barrier::new(clients + 1));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (url, start) = (url.clone(), start.clone());
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new().build();
                start.wait();
                let until = Instant::now() + Duration::from_millis(RUN_MS);
                let mut times = Vec::new();
                while Instant::now() < until {
                    let sent = Instant::now();
                    sell(&agent, &url);
                    times.push(sent.elapsed().as_micros() as u64);
                }
                times
            })
        })
        .collect();
    start.wait();
    let began = Instant::now();
    let mut times: Vec<u64> = threads.into_iter().flat_map(|h| h.join().unwrap()).collect();
    let elapsed = began.elapsed().as_secs_f64();
    times.sort_unstable();
    (times.len() as f64 / elapsed, percentile(&times, 0.5), percentile(&times, 0.99))
}

/// (p50 ms, p99 ms) at `OPEN_RATE_PER_S`, from each sale's scheduled send.
fn open(t: &Tablet) -> (f64, f64) {
    let url = format!("{}/api/v1/sales", t.node.base);
    let total = OPEN_RATE_PER_S * RUN_MS / 1_000;
    let interval = Duration::from_micros(1_000_000 / OPEN_RATE_PER_S);
    let origin = Instant::now() + Duration::from_millis(50);
    let threads: Vec<_> = (0..OPEN_CLIENTS)
        .map(|c| {
            let url = url.clone();
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new().build();
                let mut times = Vec::new();
                // Client c sends sales c, c + 32, c + 64, …: together, one every `interval`.
                for i in (c as u64..total).step_by(OPEN_CLIENTS) {
                    let due = origin + interval * i as u32;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    sell(&agent, &url);
                    times.push(due.elapsed().as_micros() as u64);
                }
                times
            })
        })
        .collect();
    let mut times: Vec<u64> = threads.into_iter().flat_map(|h| h.join().unwrap()).collect();
    times.sort_unstable();
    (percentile(&times, 0.5), percentile(&times, 0.99))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo test --benches` runs this with `--bench` absent: a quick pass only checks it works.
    let quick = !std::env::args().any(|a| a == "--bench");
    let rounds = if quick { 1 } else { ROUNDS };
    let modes = [("per-sale commit", false), ("group commit", true)];
    let tablets: Vec<Tablet> = modes.iter().map(|(_, on)| tablet(*on)).collect();
    let cells: Vec<usize> = if quick { vec![1] } else { vec![1, 8, 32] };
    println!("durable sales over HTTP, {rounds} round(s) of {RUN_MS} ms per cell, medians");
    println!("{:<18} {:>8} {:>10} {:>9} {:>9}", "mode", "clients", "sales/s", "p50 ms", "p99 ms");
    let mut results: Vec<Vec<Vec<(f64, f64, f64)>>> = vec![vec![Vec::new(); cells.len() + 1]; modes.len()];
    for _ in 0..rounds {
        for (ci, &clients) in cells.iter().enumerate() {
            for (mi, t) in tablets.iter().enumerate() {
                results[mi][ci].push(closed(t, clients));
            }
        }
        if !quick {
            for (mi, t) in tablets.iter().enumerate() {
                let (p50, p99) = open(t);
                results[mi][cells.len()].push((OPEN_RATE_PER_S as f64, p50, p99));
            }
        }
    }
    for (mi, (name, _)) in modes.iter().enumerate() {
        for (ci, runs) in results[mi].iter().enumerate().filter(|(_, r)| !r.is_empty()) {
            let label = cells.get(ci).map_or(format!("open {OPEN_RATE_PER_S}/s"), |c| c.to_string());
            let rate = median(runs.iter().map(|r| r.0).collect());
            let p50 = median(runs.iter().map(|r| r.1).collect());
            let p99 = median(runs.iter().map(|r| r.2).collect());
            println!("{name:<18} {label:>8} {rate:>10.0} {p50:>9.2} {p99:>9.2}");
        }
    }
}
