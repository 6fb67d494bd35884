//! Kill -9 soak: a real node process under concurrent sales from several tills is killed at random
//! moments, again and again; after every restart each acknowledged sale is there exactly once, a
//! sale whose answer was lost is there at most once (the till's retry with its `client_ref` finds
//! it or records it), and stock adds up: restocked = sold + held.
//!
//! `STALLMESH_SOAK_KILLS` sets the number of kills (default sized for CI).

mod netns;

use serde_json::{json, Value};
use std::collections::BTreeMap;
use netns::LoopbackNode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Kills in a CI run: the issue asks for at least 200.
const DEFAULT_KILLS: usize = 200;
const TILLS: usize = 4;
/// Sales a till sends between two kills at most: a round ends with a kill, not with the tills done.
const SALES_PER_TILL_PER_ROUND: usize = 8;
const RESTOCKED: u64 = 1_000_000;

/// Deterministic kill moments (splitmix64).
struct Moments(u64);

impl Moments {
    fn next_ms(&mut self, below: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % below
    }
}

fn sale(client_ref: &str) -> Value {
    json!({ "lines": [{ "sku": "JAM", "qty": 1 }], "client_ref": client_ref })
}

/// What a till knows after a round: sales acknowledged, and the one whose answer it never got.
#[derive(Default)]
struct Till {
    acknowledged: Vec<String>,
    in_doubt: Option<String>,
}

fn till(url: String, name: String, stop: Arc<AtomicBool>) -> Till {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(5)).build();
    let mut t = Till::default();
    for n in 0..SALES_PER_TILL_PER_ROUND {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let client_ref = format!("{name}-{n}");
        match agent.post(&format!("{url}/api/v1/sales")).send_json(sale(&client_ref)) {
            Ok(r) if r.status() == 201 => t.acknowledged.push(client_ref),
            Ok(r) => panic!("{client_ref}: {} {}", r.status(), r.into_string().unwrap_or_default()),
            Err(ureq::Error::Status(s, r)) => panic!("{client_ref}: {s} {}", r.into_string().unwrap_or_default()),
            // The node died under it: the sale may or may not be recorded.
            Err(_) => {
                t.in_doubt = Some(client_ref);
                break;
            }
        }
    }
    t
}

#[test]
fn a_node_killed_at_random_moments_under_concurrent_sales_loses_no_acknowledged_sale_and_sells_none_twice() {
    let kills: usize = std::env::var("STALLMESH_SOAK_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_KILLS);
    let dir = tempfile::tempdir().unwrap();
    netns::enrol_tablet(dir.path());
    let port = netns::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut node = LoopbackNode::up(dir.path(), "tablet", "data", port);
    let product = json!({ "sku": "JAM", "name": "Jam", "price_cents": 400, "currency": "EUR", "stall": "Stall" });
    assert_eq!(netns::post(&url, "/api/v1/products", &product).0, 201);
    assert_eq!(netns::post(&url, "/api/v1/restocks", &json!({ "sku": "JAM", "qty": RESTOCKED })).0, 201);

    let mut moments = Moments(0x5eed_2026_1203);
    let mut acknowledged = 0;
    let mut in_doubt_total = 0;
    let mut killed_starting = 0;
    for round in 0..kills {
        // One kill in ten lands while the node is still starting (opening and checking its store).
        if round % 10 == 9 {
            node.kill();
            node = LoopbackNode::start(dir.path(), "tablet", "data", port);
            std::thread::sleep(Duration::from_millis(moments.next_ms(40)));
            node.kill();
            killed_starting += 1;
            node = LoopbackNode::up(dir.path(), "tablet", "data", port);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let tills: Vec<_> = (0..TILLS)
            .map(|t| {
                let (url, stop, name) = (url.clone(), stop.clone(), format!("r{round}-t{t}"));
                std::thread::spawn(move || till(url, name, stop))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(moments.next_ms(30)));
        node.kill();
        stop.store(true, Ordering::Relaxed);
        let rounds: Vec<Till> = tills.into_iter().map(|h| h.join().unwrap()).collect();

        node = LoopbackNode::up(dir.path(), "tablet", "data", port);
        // Each till retries the sale it never heard back about: found (200) or recorded now (201).
        let mut this_round: Vec<String> = Vec::new();
        for t in &rounds {
            this_round.extend(t.acknowledged.iter().cloned());
            if let Some(r) = &t.in_doubt {
                let (status, body) = netns::post(&url, "/api/v1/sales", &sale(r));
                assert!(status == 200 || status == 201, "retry of {r}: {status} {body}");
                this_round.push(r.clone());
                in_doubt_total += 1;
            }
        }
        acknowledged += this_round.len();
        // The newest sales (this round's among them) by client_ref, and the day's totals.
        let sales = netns::get(&url, "/api/v1/sales?limit=10000");
        let mut by_ref: BTreeMap<String, usize> = BTreeMap::new();
        for s in sales["sales"].as_array().unwrap() {
            *by_ref.entry(s["client_ref"].as_str().unwrap().to_string()).or_default() += 1;
        }
        for r in &this_round {
            assert_eq!(by_ref.get(r), Some(&1), "round {round}: acknowledged sale {r} is not there exactly once");
        }
        let summary = &sales["summary"];
        assert_eq!(summary["sales"].as_u64().unwrap() as usize, acknowledged, "round {round}: sales on record and sales acknowledged differ");
        let sold = summary["units"].as_u64().unwrap();
        let stock = netns::get(&url, "/api/v1/stock");
        let held = stock["stock"][0]["total"].as_u64().unwrap();
        assert_eq!(sold + held, RESTOCKED, "round {round}: restocked = sold + held");
    }
    node.kill();
    eprintln!(
        "soak: {kills} kills under load (+{killed_starting} while starting), {} sales acknowledged, {in_doubt_total} answers lost and retried",
        acknowledged
    );
    assert!(acknowledged > kills, "the tills sold between kills");
}
