//! A drop sold at the stalls and online at once, end to end: real `stallmesh up` tablets meshed
//! over loopback, a real `stallmesh cloud up` running the market's online channel (on the
//! machine's PostgreSQL, or its embedded store), buyers' holds and orders over HTTP from
//! concurrent clients, and a tablet's uplink the test can cut.

mod netns;
#[path = "../crates/cloud/tests/support/pg.rs"]
mod pg;
mod cloud_world;

use cloud_world::*;
use netns::eventually;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A shop's server calling the cloud's checkout: (status, body).
fn shop(w: &World, method: &str, path: &str, key: Option<&str>, body: Option<&Value>) -> (u16, Value) {
    let url = format!("{}/v1/markets/{}{path}", w.cloud_url, w.market_id);
    let mut req = ureq::request(method, &url).timeout(Duration::from_secs(20)).set("authorization", &format!("Bearer {}", w.admin_token()));
    if let Some(k) = key {
        req = req.set("idempotency-key", k);
    }
    let result = match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    };
    match result {
        Ok(r) => (r.status(), r.into_json().unwrap_or(Value::Null)),
        Err(ureq::Error::Status(s, r)) => (s, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("{method} {url}: {e}"),
    }
}

/// Holds `qty` for `buyer` and pays: the sale id, or the refusal's code.
fn buy_online(w: &World, drop: &str, buyer: &str, qty: u64) -> Result<String, String> {
    let (status, hold) = shop(w, "POST", &format!("/drops/{drop}/holds"), Some(&format!("{buyer}-hold")), Some(&json!({ "buyer": buyer, "qty": qty })));
    if status != 201 {
        return Err(hold["error"].as_str().unwrap_or("?").to_string());
    }
    let id = hold["id"].as_str().unwrap();
    let (status, order) = shop(w, "POST", &format!("/drops/{drop}/orders"), Some(&format!("{buyer}-pay")), Some(&json!({ "hold": id })));
    assert_eq!(status, 201, "a held hold is paid: {order}");
    Ok(order["sale_id"].as_str().unwrap().to_string())
}

/// A market of three tablets (tablet 1 with the uplink) and the cloud with an online channel; the
/// organiser's tablet 1 has the product. Returns the world, the uplink and the online device.
fn market(postgres_url: Option<&str>, cloud_env: &[(&str, &str)]) -> (World, Link, String) {
    let mut w = World::new(3);
    w.start_cloud_with(postgres_url, cloud_env);
    w.register_market();
    let online = w.set_up_online_channel();
    let link = w.start_three_tablets();
    let p = json!({ "sku": "TOTE", "name": "Summer tote", "price_cents": 3500, "currency": "EUR", "stall": "Stall 1" });
    assert_eq!(post(&format!("{}/api/v1/products", w.http[1]), &p).0, 201);
    (w, link, online)
}

/// Plans the drop on tablet 1 once every device in `plan` is known there (the online device's
/// enrolment comes back from the cloud through the uplink); waits until the cloud knows it.
fn plan_drop(w: &World, units: u64, start_ms: u64, plan: &[(String, u64)], max_per_buyer: Option<u64>) -> String {
    let plan: Vec<Value> = plan.iter().map(|(d, n)| json!({ "device": d, "units": n })).collect();
    let body = json!({ "name": "Summer tote", "sku": "TOTE", "units": units, "start_ms": start_ms, "plan": plan, "max_per_buyer": max_per_buyer });
    let mut drop = Value::Null;
    eventually(CONVERGE, "every planned device known to the organiser's tablet", || {
        let (status, d) = post(&format!("{}/api/v1/drops", w.http[1]), &body);
        assert!(status == 201 || d["error"] == "unknown_device", "{d}");
        drop = d;
        status == 201
    });
    let id = drop["id"].as_str().unwrap().to_string();
    eventually(CONVERGE, "the drop reaches the cloud's online channel", || shop(w, "GET", &format!("/drops/{id}"), None, None).0 == 200);
    id
}

/// Each tablet sells one unit at a time until refused: the sale ids.
fn sell_out_at_stalls(w: &World, k: usize) -> Vec<String> {
    let mut sold = Vec::new();
    loop {
        let (status, sale) = post(&format!("{}/api/v1/sales", w.http[k]), &json!({ "lines": [{ "sku": "TOTE", "qty": 1 }] }));
        match status {
            201 => sold.push(sale["id"].as_str().unwrap().to_string()),
            409 => {
                assert_eq!(sale["error"], "insufficient_stock_rights", "{sale}");
                return sold;
            }
            _ => panic!("tablet {k}: {status} {sale}"),
        }
    }
}

#[test]
fn a_drop_sold_at_three_stalls_and_online_at_once_sells_exactly_its_units_each_once_in_the_cloud_log_on_postgresql() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let Some(db) = rt.block_on(pg::fresh_database("drops_cloud")) else { return };
    let (w, link, online) = market(Some(&db.url), &[]);
    let devices: Vec<String> = (1..=3).map(|k| w.device(k)).collect();
    let start_ms = now_ms() + 4_000;
    let plan = [(devices[0].clone(), 10), (devices[1].clone(), 10), (devices[2].clone(), 10), (online.clone(), 20)];
    let drop = plan_drop(&w, 50, start_ms, &plan, Some(2));
    for k in 2..=3 {
        eventually(CONVERGE, "the drop reaches every tablet", || w.tablet(k, "/api/v1/drops")["drops"].as_array().is_some_and(|d| d.len() == 1));
    }

    // Before it opens nothing sells, at a stall or online.
    let (status, early) = post(&format!("{}/api/v1/sales", w.http[2]), &json!({ "lines": [{ "sku": "TOTE", "qty": 1 }] }));
    assert_eq!((status, early["error"].as_str()), (409, Some("drop_not_started")), "{early}");
    assert_eq!(buy_online(&w, &drop, "early-bird", 1), Err("drop_not_started".into()));
    while now_ms() < start_ms + 200 {
        std::thread::sleep(Duration::from_millis(100));
    }

    // It opens: three tills and 30 online buyers (20 units online, at most 2 each) at once; the
    // uplink dies half-way and comes back.
    let online_sold = Arc::new(Mutex::new(Vec::new()));
    let refusals = Arc::new(Mutex::new(Vec::new()));
    let mut stall_sold: Vec<String> = std::thread::scope(|s| {
        let w = &w;
        let tills: Vec<_> = (1..=3).map(|k| s.spawn(move || sell_out_at_stalls(w, k))).collect();
        for b in 0..30 {
            let (drop, online_sold, refusals) = (&drop, online_sold.clone(), refusals.clone());
            s.spawn(move || {
                // Half the buyers want two; told "sold out", they settle for one.
                let want = 1 + (b % 2);
                let mut result = buy_online(w, drop, &format!("buyer-{b}"), want);
                if want == 2 && result.as_ref().is_err_and(|c| c == "sold_out") {
                    result = buy_online(w, drop, &format!("buyer-{b}-one"), 1);
                }
                match result {
                    Ok(sale) => online_sold.lock().unwrap().push(sale),
                    Err(code) => refusals.lock().unwrap().push(code),
                }
            });
            if b == 15 {
                link.cut();
            }
        }
        tills.into_iter().flat_map(|t| t.join().unwrap()).collect()
    });
    link.restore();
    let mut online_sold = online_sold.lock().unwrap().clone();
    let refusals = refusals.lock().unwrap().clone();
    assert!(refusals.iter().all(|c| c == "sold_out"), "{refusals:?}");

    // Rights may have moved between the channels meanwhile (a till short of units asks the online
    // channel; the online channel, sold out, asks the tills): whatever is left anywhere is sold.
    let mut n = 0;
    eventually(Duration::from_secs(60), "nothing left on any channel", || {
        for k in 1..=3 {
            stall_sold.extend(sell_out_at_stalls(&w, k));
        }
        while let Ok(sale) = buy_online(&w, &drop, &format!("late-{n}"), 1) {
            online_sold.push(sale);
            n += 1;
        }
        n += 1;
        let (_, v) = shop(&w, "GET", &format!("/drops/{drop}"), None, None);
        v["available_online"] == 0 && v["in_holds"] == 0 && v["held_at_stalls"] == 0
    });

    // Exactly 50 sold over all channels, each sale once in the cloud's log, 20 of them online.
    let mut sold: BTreeSet<String> = stall_sold.iter().cloned().collect();
    sold.extend(online_sold.iter().cloned());
    assert_eq!(sold.len(), stall_sold.len() + online_sold.len(), "no sale id twice");
    eventually(Duration::from_secs(60), "every sale in the cloud", || w.cloud_sale_ids().len() >= sold.len());
    assert_log_exact(&w, &sold);
    let log = w.cloud_log();
    let units_sold: u64 = log
        .iter()
        .filter(|e| e["kind"] == "sale")
        .flat_map(|e| e["lines"].as_array().unwrap().iter())
        .filter(|l| l["sku"] == "TOTE")
        .map(|l| l["qty"].as_u64().unwrap())
        .sum();
    assert_eq!(units_sold, 50, "exactly the drop's units, never more, none lost");
    let online_units: u64 = log
        .iter()
        .filter(|e| e["kind"] == "sale" && e["device"] == online.as_str())
        .map(|e| e["lines"][0]["qty"].as_u64().unwrap())
        .sum();
    assert_eq!(online_units + stall_sold.len() as u64, 50, "what each channel sold adds up");

    // The online sales reach every tablet through the uplink; every till shows the drop sold out.
    for k in 1..=3 {
        eventually(CONVERGE, &format!("tablet {k} sees the drop sold out"), || {
            let d = &w.tablet(k, "/api/v1/drops")["drops"][0];
            d["status"] == "sold_out" && d["sold"] == 50 && d["left"] == 0
        });
    }
    let d = &w.tablet(3, "/api/v1/drops")["drops"][0];
    let online_channel = d["channels"].as_array().unwrap().iter().find(|c| c["device"] == online.as_str()).unwrap();
    assert_eq!((online_channel["role"].as_str(), online_channel["sold"].as_u64()), (Some("online"), Some(online_units)), "{d}");
    let (status, v) = shop(&w, "GET", &format!("/drops/{drop}"), None, None);
    assert_eq!((status, v["status"].as_str(), v["sold_online"].as_u64()), (200, Some("sold_out"), Some(online_units)), "{v}");
}

#[test]
fn an_unpaid_hold_expires_and_its_units_go_to_the_next_buyer_and_a_late_payment_is_refused() {
    let (w, _link, online) = market(None, &[("STALLMESH_CLOUD_SERVICE_HOLD_TTL_MS", "10000")]);
    let drop = plan_drop(&w, 2, 0, &[(online, 2)], None);

    let (status, ann) = shop(&w, "POST", &format!("/drops/{drop}/holds"), Some("ann-1"), Some(&json!({ "buyer": "ann", "qty": 2 })));
    assert_eq!(status, 201, "{ann}");
    let (status, again) = shop(&w, "POST", &format!("/drops/{drop}/holds"), Some("ann-1"), Some(&json!({ "buyer": "ann", "qty": 2 })));
    assert_eq!((status, &again["id"]), (200, &ann["id"]), "a double tap holds once: {again}");
    let (status, bob) = shop(&w, "POST", &format!("/drops/{drop}/holds"), Some("bob-1"), Some(&json!({ "buyer": "bob", "qty": 1 })));
    assert_eq!((status, bob["error"].as_str(), bob["sold_out"]["may_return"].as_bool()), (409, Some("sold_out"), Some(true)), "{bob}");
    assert_eq!(bob["sold_out"]["in_holds"], 2, "{bob}");

    // Ann walks away; ten seconds later her units are Bob's.
    let expires = ann["expires_at_ms"].as_u64().unwrap();
    while now_ms() < expires + 100 {
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, late) = shop(&w, "POST", &format!("/drops/{drop}/orders"), Some("ann-pay"), Some(&json!({ "hold": ann["id"] })));
    assert_eq!((status, late["error"].as_str()), (410, Some("hold_expired")), "{late}");
    let (status, bob) = shop(&w, "POST", &format!("/drops/{drop}/holds"), Some("bob-2"), Some(&json!({ "buyer": "bob", "qty": 2 })));
    assert_eq!(status, 201, "{bob}");
    let (status, order) = shop(&w, "POST", &format!("/drops/{drop}/orders"), Some("bob-pay"), Some(&json!({ "hold": bob["id"] })));
    assert_eq!((status, order["qty"].as_u64(), order["total_cents"].as_u64()), (201, Some(2), Some(7000)), "{order}");
    let (status, retry) = shop(&w, "POST", &format!("/drops/{drop}/orders"), Some("bob-pay-retry"), Some(&json!({ "hold": bob["id"] })));
    assert_eq!((status, &retry["sale_id"]), (200, &order["sale_id"]), "a retried payment finds the order: {retry}");

    // Nothing left anywhere, and nothing can come back.
    let (status, cat) = shop(&w, "POST", &format!("/drops/{drop}/holds"), Some("cat-1"), Some(&json!({ "buyer": "cat", "qty": 1 })));
    assert_eq!((status, cat["sold_out"]["may_return"].as_bool()), (409, Some(false)), "{cat}");
    let sales: Vec<String> = w.cloud_sale_ids();
    assert_eq!(sales, vec![order["sale_id"].as_str().unwrap().to_string()], "one sale in the log");

    // Bad requests change nothing and say why.
    let (status, e) = shop(&w, "POST", &format!("/drops/{drop}/holds"), None, Some(&json!({ "buyer": "dan", "qty": 1 })));
    assert_eq!((status, e["error"].as_str()), (400, Some("idempotency_key_required")));
    let (status, e) = shop(&w, "POST", "/drops/nope-1/holds", Some("k"), Some(&json!({ "buyer": "dan", "qty": 1 })));
    assert_eq!((status, e["error"].as_str()), (404, Some("unknown_drop")));
    let (status, e) = shop(&w, "POST", &format!("/drops/{drop}/holds"), Some("k"), Some(&json!({ "buyer": "dan", "qty": 0 })));
    assert_eq!((status, e["error"].as_str()), (422, Some("invalid_request")), "{e}");
    let url = format!("{}/v1/markets/{}/drops/{drop}/holds", w.cloud_url, w.market_id);
    let unauthenticated = ureq::post(&url).set("idempotency-key", "k").send_json(json!({ "buyer": "dan", "qty": 1 }));
    assert!(matches!(unauthenticated, Err(ureq::Error::Status(401, _))));
    assert_eq!(w.cloud_sale_ids().len(), 1);
}

#[test]
fn rights_move_between_the_online_channel_and_a_stall_through_the_uplink_and_wait_while_it_is_cut() {
    let (w, link, online) = market(None, &[]);
    let tablet = w.device(1);
    let drop = plan_drop(&w, 10, 0, &[(tablet.clone(), 1), (online.clone(), 9)], None);
    let sell = |qty: u64| post(&format!("{}/api/v1/sales", w.http[1]), &json!({ "lines": [{ "sku": "TOTE", "qty": qty }] }));
    let transfers = |from: &str, to: &str| -> u64 {
        w.cloud_log().iter().filter(|e| e["kind"] == "transfer" && e["device"] == from && e["to_device"] == to).map(|e| e["qty"].as_u64().unwrap()).sum()
    };

    // The till sells its one; the next customer wants two, and waits while the online channel's
    // units come through the uplink (no other tablet holds any).
    assert_eq!(sell(1).0, 201);
    let (status, sale) = sell(2);
    assert_eq!(status, 201, "the till got the online channel's units while the customer waited: {sale}");
    eventually(CONVERGE, "the online channel's transfer in the log", || transfers(&online, &tablet) > 0);
    let given = transfers(&online, &tablet);
    assert!((2..=9).contains(&given), "it gave what the sale lacked and a refill, never all it had to: {given}");

    // The uplink dies. Online sells what it still holds, then is sold out while the stall holds
    // units: they cannot move, so buyers are told units may come back.
    link.cut();
    let left_online = 9 - given;
    if left_online > 0 {
        assert!(buy_online(&w, &drop, "ann", left_online.min(2)).is_ok());
        for n in 0..left_online.saturating_sub(2) {
            assert!(buy_online(&w, &drop, &format!("early-{n}"), 1).is_ok());
        }
    }
    let (status, refused) = shop(&w, "POST", &format!("/drops/{drop}/holds"), Some("bob-1"), Some(&json!({ "buyer": "bob", "qty": 1 })));
    assert_eq!((status, refused["sold_out"]["may_return"].as_bool()), (409, Some(true)), "{refused}");
    assert!(refused["sold_out"]["held_at_stalls"].as_u64().unwrap() > 0, "{refused}");
    std::thread::sleep(Duration::from_secs(6)); // more than a heads refresh: nothing can cross
    assert_eq!(transfers(&tablet, &online), 0, "nothing moved over a cut uplink");

    // It comes back: the stall gives the online channel a share of what it holds.
    link.restore();
    let mut n = 0;
    eventually(CONVERGE, "a buyer gets a unit the stall gave the online channel", || {
        n += 1;
        buy_online(&w, &drop, &format!("retry-{n}"), 1).is_ok()
    });
    let back = transfers(&tablet, &online);
    assert!(back > 0, "the stall's transfer to the online channel is in the log");

    // Never more than the drop's ten units sold, over every channel.
    let units: u64 = w
        .cloud_log()
        .iter()
        .filter(|e| e["kind"] == "sale")
        .flat_map(|e| e["lines"].as_array().unwrap().clone())
        .filter(|l| l["sku"] == "TOTE")
        .map(|l| l["qty"].as_u64().unwrap())
        .sum();
    assert!(units <= 10, "{units} units sold of ten");
    let (_, v) = shop(&w, "GET", &format!("/drops/{drop}"), None, None);
    assert_eq!(v["sold_online"].as_u64().unwrap() + v["available_online"].as_u64().unwrap() + v["in_holds"].as_u64().unwrap() + v["held_at_stalls"].as_u64().unwrap() + 3, 10, "{v}");
}

/// A metric of the cloud's `/metrics` text (0 when absent).
fn cloud_metric(w: &World, name: &str) -> u64 {
    let text = ureq::get(&format!("{}/metrics", w.cloud_url)).call().unwrap().into_string().unwrap();
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0)
}

#[test]
fn a_crowd_of_buyers_decided_in_batches_holds_exactly_the_online_units_each_buyer_within_the_limit_and_a_double_tap_once() {
    let (w, _link, online) = market(None, &[]);
    let drop = plan_drop(&w, 30, 0, &[(online, 30)], Some(2));
    // 60 buyers at once, each asking for 2 units, twice with the same key (a double tap) and once
    // more with a new key (over the limit): 15 buyers get their 2, nobody more than 2.
    let held: Arc<Mutex<Vec<(String, u64, Value)>>> = Arc::default();
    std::thread::scope(|s| {
        for b in 0..60 {
            let (w, drop, held) = (&w, &drop, held.clone());
            s.spawn(move || {
                let buyer = format!("buyer-{b}");
                for key in ["tap", "tap", "again"] {
                    let (status, body) = shop(w, "POST", &format!("/drops/{drop}/holds"), Some(&format!("{buyer}-{key}")), Some(&json!({ "buyer": buyer, "qty": 2 })));
                    assert!(matches!(status, 200 | 201 | 409), "{status} {body}");
                    held.lock().unwrap().push((buyer.clone(), u64::from(status), body));
                }
            });
        }
    });
    let held = held.lock().unwrap();
    let created: Vec<&(String, u64, Value)> = held.iter().filter(|(_, s, _)| *s == 201).collect();
    assert_eq!(created.iter().map(|(_, _, h)| h["qty"].as_u64().unwrap()).sum::<u64>(), 30, "exactly the online units are held");
    let ids: BTreeSet<&str> = created.iter().map(|(_, _, h)| h["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), created.len(), "each hold created once");
    for (buyer, _, _) in &created {
        assert_eq!(created.iter().filter(|(b, _, _)| b == buyer).count(), 1, "{buyer} holds at most the limit");
    }
    for (buyer, status, body) in held.iter().filter(|(_, s, _)| *s == 200) {
        assert!(ids.contains(body["id"].as_str().unwrap()), "{buyer}'s double tap finds the first hold: {status} {body}");
    }
    let refusals: BTreeSet<&str> = held.iter().filter(|(_, s, _)| *s == 409).map(|(_, _, b)| b["error"].as_str().unwrap()).collect();
    assert!(refusals.iter().all(|e| ["sold_out", "buyer_limit"].contains(e)), "{refusals:?}");
    let (batches, requests) = (cloud_metric(&w, "stallmesh_cloud_checkout_batches_total"), cloud_metric(&w, "stallmesh_cloud_checkout_requests_total"));
    assert_eq!(requests, 180, "every request went through a batch");
    assert!(batches < requests, "waiting requests were decided together: {batches} batches for {requests} requests");
}
