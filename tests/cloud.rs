//! Cloud reconciliation end to end: real `stallmesh up` tablets meshed over loopback (libp2p, the
//! peers' addresses given), a real `stallmesh cloud up`, and — for the PostgreSQL test — the
//! machine's PostgreSQL. A tablet's uplink goes through a proxy the test can cut, as a dead 4G
//! link is cut: connections refused.

// The tablets here run on loopback (peers' addresses given, mDNS off), not in namespaces; the
// helpers for finding the binary and waiting are the mesh tests'.
mod netns;
#[path = "../crates/cloud/tests/support/pg.rs"]
mod pg;
mod cloud_world;

use cloud_world::*;
use netns::{binary, eventually, free_port};

use serde_json::{json, Value};
use stallmesh_identity::files;
use stallmesh_identity::{DeviceKey, MarketKey, Role, SignedChange};
use stallmesh_ingest::wire::{self, RequestAuth};
use stallmesh_sync::Message;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Three tablets, one with an uplink: every sale reaches the cloud once; a cut uplink catches up;
/// a second uplink adds no duplicates; every tablet shows the cloud's watermark.
fn market_day(postgres_url: Option<&str>) -> World {
    let mut w = World::new(3);
    w.start_cloud(postgres_url);
    w.register_market();
    let link = w.start_three_tablets();
    let p = json!({ "sku": "HNY-500", "name": "Heather honey", "price_cents": 850, "currency": "EUR", "stall": "Stall 1" });
    assert_eq!(post(&format!("{}/api/v1/products", w.http[1]), &p).0, 201);
    assert_eq!(post(&format!("{}/api/v1/restocks", w.http[1]), &json!({ "sku": "HNY-500", "qty": 300 })).0, 201);
    for k in 2..=3 {
        let to = w.device(k);
        eventually(CONVERGE, "enrolments spread", || {
            post(&format!("{}/api/v1/transfers", w.http[1]), &json!({ "sku": "HNY-500", "qty": 100, "to_device": to })).0 == 201
        });
    }
    eventually(CONVERGE, "rights arrive", || (2..=3).all(|k| w.tablet(k, "/api/v1/stock")["stock"][0]["this_device"] == 100));

    let mut sold = BTreeSet::new();
    for round in 0..5 {
        for k in 1..=3 {
            sold.insert(sell(&w, k, "HNY-500"));
        }
        let _ = round;
    }
    eventually(CONVERGE, "every sale in the cloud", || w.cloud_sale_ids().len() >= sold.len());
    assert_log_exact(&w, &sold);

    // The 4G dies: the tablets sell on; the uplink says it is retrying.
    link.cut();
    let before = w.cloud_log().len();
    let mut offline = BTreeSet::new();
    for k in 1..=3 {
        for _ in 0..3 {
            offline.insert(sell(&w, k, "HNY-500"));
        }
    }
    eventually(CONVERGE, "the uplink notices", || w.tablet(1, "/api/v1/status")["cloud"]["uplink"]["state"] == "retrying");
    let cut_status = w.tablet(1, "/api/v1/status");
    assert!(cut_status["cloud"]["uplink"]["lacking"].as_u64().unwrap() > 0 || cut_status["cloud"]["sales_not_uploaded"].as_u64().unwrap() > 0, "{cut_status}");
    assert!(w.cloud_sale_ids().iter().all(|id| !offline.contains(id)), "nothing crossed a cut link");
    assert!(w.cloud_log().len() <= before + 1, "only a watermark may have been recorded meanwhile");
    link.restore();
    sold.extend(offline);
    eventually(Duration::from_secs(60), "caught up after the link returned", || w.cloud_sale_ids().len() >= sold.len());
    assert_log_exact(&w, &sold);

    // A second tablet gets 4G too: both upload, the cloud keeps each change once.
    w.stop_tablet(2);
    let direct = w.cloud_url.clone();
    w.start_tablet(2, Some(&direct));
    eventually(CONVERGE, "tablet 2 meshed again", || w.tablet(2, "/api/v1/mesh")["peers"].as_array().map_or(0, Vec::len) >= 2);
    for k in 1..=3 {
        for _ in 0..3 {
            sold.insert(sell(&w, k, "HNY-500"));
        }
    }
    eventually(CONVERGE, "the last sales in the cloud", || w.cloud_sale_ids().len() >= sold.len());
    assert_log_exact(&w, &sold);

    // Every tablet, including the one that never had an uplink, learns what the cloud holds.
    for k in 1..=3 {
        eventually(CONVERGE, &format!("tablet {k} shows the cloud holds all its sales"), || {
            let s = w.tablet(k, "/api/v1/status");
            s["cloud"]["watermark"]["offset"].as_u64().is_some_and(|o| o > 0) && s["cloud"]["sales_not_uploaded"] == 0
        });
    }
    let s3 = w.tablet(3, "/api/v1/status");
    assert!(s3["cloud"]["uplink"].is_null(), "tablet 3 has no uplink of its own: {s3}");
    assert!(s3["cloud"]["watermark"]["this_device_through_ms"].as_u64().is_some(), "{s3}");
    let metrics = ureq::get(&format!("{}/metrics", w.http[3])).call().unwrap().into_string().unwrap();
    assert!(metrics.contains("stallmesh_cloud_sales_not_uploaded 0"), "{metrics}");
    w
}

#[test]
fn every_sale_of_three_tablets_reaches_the_embedded_cloud_once_through_one_uplink() {
    let w = market_day(None);
    let m = get(&format!("{}/v1/markets/{}", w.cloud_url, w.market_id));
    assert_eq!(m["offset"].as_u64().unwrap() as usize, w.cloud_log().len(), "{m}");
    let listed = get(&format!("{}/v1/markets", w.cloud_url));
    assert_eq!(listed["markets"][0]["offset"], m["offset"], "the list reads the same offset from the store: {listed}");
    consumers_restarting_from_their_last_offset_see_each_event_once(&w);
}

/// `stallmesh cloud tail`, as an analytics job runs it: read to the end, restart from the last
/// offset it processed, and follow.
fn consumers_restarting_from_their_last_offset_see_each_event_once(w: &World) {
    let tail = |extra: &[&str]| -> Vec<u64> {
        let out = Command::new(binary())
            .args(["cloud", "tail", "--market", w.market_id.as_str(), "--cloud", w.cloud_url.as_str()])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "tail {extra:?}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["offset"].as_u64().unwrap()).collect()
    };
    let total = w.cloud_log().len() as u64;
    assert!(total > 10);
    assert_eq!(tail(&[]), (1..=total).collect::<Vec<_>>(), "every event once, in order");
    let half = total / 2;
    assert_eq!(tail(&["--after", &half.to_string()]), (half + 1..=total).collect::<Vec<_>>(), "a restart resumes after its offset");
    assert!(tail(&["--after", &total.to_string()]).is_empty());

    // Following: a new sale reaches the waiting consumer, and nothing before its offset does.
    let mut follower = Proc(
        Command::new(binary())
            .args(["cloud", "tail", "--market", w.market_id.as_str(), "--cloud", w.cloud_url.as_str(), "--follow", "--after", &total.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = follower.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let id = sell(w, 1, "HNY-500");
    let deadline = Instant::now() + CONVERGE;
    let mut seen = Vec::new();
    while !seen.iter().any(|e: &Value| e["sale_id"] == id.as_str()) {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).unwrap_or_else(|_| panic!("the follower did not print sale {id}; it printed {seen:?}"));
        seen.push(serde_json::from_str(&line).unwrap());
    }
    let offsets: Vec<u64> = seen.iter().map(|e| e["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, (total + 1..=total + offsets.len() as u64).collect::<Vec<_>>(), "followed in order, from after {total}");
}

#[test]
fn every_sale_lands_in_postgresql_once_with_its_lines_and_totals() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let Some(db) = rt.block_on(pg::fresh_database("every_sale_lands_in_postgresql_once_with_its_lines_and_totals")) else { return };
    let w = market_day(Some(&db.url));
    let sale_ids: BTreeSet<String> = w.cloud_sale_ids().into_iter().collect();
    rt.block_on(async {
        let client = db.client().await;
        let m = &w.market_id;
        let sales: i64 = client.query_one("SELECT count(*) FROM sales WHERE market = $1", &[m]).await.unwrap().get(0);
        assert_eq!(sales as usize, sale_ids.len(), "one row per sale");
        let distinct: i64 = client.query_one("SELECT count(DISTINCT sale_id) FROM sales WHERE market = $1", &[m]).await.unwrap().get(0);
        assert_eq!(distinct, sales);
        let revenue: i64 = client.query_one("SELECT sum(total_cents)::bigint FROM sales WHERE market = $1", &[m]).await.unwrap().get(0);
        assert_eq!(revenue, 850 * sales, "every sale was one jar at 8.50");
        let lines: i64 = client
            .query_one("SELECT count(*) FROM sale_lines WHERE market = $1 AND sku = 'HNY-500' AND qty = 1 AND price_cents = 850", &[m])
            .await
            .unwrap()
            .get(0);
        assert_eq!(lines, sales);
        // A watermark may still be recorded meanwhile: compare within one snapshot.
        let logged = w.cloud_log().len();
        let row = client
            .query_one("SELECT (SELECT count(*) FROM events WHERE market = $1), (SELECT next_offset FROM markets WHERE id = $1)", &[m])
            .await
            .unwrap();
        let (events, next): (i64, i64) = (row.get(0), row.get(1));
        assert!(events as usize >= logged, "the tables hold the whole log");
        assert_eq!(next, events + 1, "the tables and the log's offset agree");
        let per_stall = client
            .query(
                "SELECT d.stall, count(*) FROM sales s JOIN devices d ON d.market = s.market AND d.device = s.device \
                 WHERE s.market = $1 GROUP BY d.stall ORDER BY d.stall",
                &[m],
            )
            .await
            .unwrap();
        let stalls: Vec<String> = per_stall.iter().map(|r| r.get::<_, String>(0)).collect();
        assert_eq!(stalls, vec!["Stall 1", "Stall 2", "Stall 3"], "sales attributed to the selling tablet's stall");
    });
    drop(w);
    drop(db);
}

/// A signed request from `key`/`cert` with `body` to the cloud's sync endpoint.
fn sync_request(cloud: &str, market: &stallmesh_identity::MarketId, key: &DeviceKey, cert: &stallmesh_identity::Certificate, body: &[u8]) -> (u16, Value) {
    let path = wire::sync_path(market);
    let auth = RequestAuth::sign(key, cert, &path, stallmesh_node::runtime::now_ms(), body);
    let mut req = ureq::post(&format!("{cloud}{path}")).set("content-type", wire::CONTENT_TYPE);
    for (name, value) in auth.headers() {
        req = req.set(name, &value);
    }
    match req.send_bytes(body) {
        Ok(r) => (r.status(), Value::Null),
        Err(ureq::Error::Status(s, r)) => (s, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("sync request: {e}"),
    }
}

#[test]
fn forged_unregistered_unenrolled_revoked_and_malformed_uploads_get_a_precise_error_and_store_nothing() {
    let mut w = World::new(1);
    w.start_cloud(None);
    w.register_market();
    let creds = files::load_device(&w.dir.path().join("tablet1")).unwrap();
    let market = creds.certificate.market;
    // What tablets put in the log (the cloud's own enrolment and watermarks aside).
    let offset = || w.cloud_log().iter().filter(|e| e["kind"] != "cloud_watermark" && e["body"]["role"] != "cloud").filter(|e| e["role"] != "cloud").count() as u64;
    let start = offset();
    // A real tablet's journal: its enrolment, then a product.
    let mut ledger = stallmesh_ledger::Ledger::new(stallmesh_ledger::MarketContext::new(creds.market.public_key), DeviceKey::from_secret(creds.key.secret()), creds.certificate.clone());
    let enrol = ledger.enrol_self(stallmesh_node::runtime::now_ms()).unwrap().unwrap().change;
    let product = stallmesh_ledger::Product { sku: "X".into(), name: "X".into(), price_cents: 1, currency: "EUR".into(), stall: "Stall 1".into(), tags: vec![] };
    let mut forged = ledger.record(stallmesh_ledger::LocalOp::UpsertProduct(product), stallmesh_node::runtime::now_ms()).unwrap().change;
    forged.signature.0[5] ^= 1;
    let changes = |c: Vec<SignedChange>| Message::Changes { changes: c, more: false }.encode();

    let (status, body) = sync_request(&w.cloud_url, &market, &creds.key, &creds.certificate, &changes(vec![enrol.clone(), forged]));
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"], "changes_rejected");
    assert_eq!(body["details"]["rejected"][0]["reason"], "bad_signature", "{body}");
    assert_eq!(offset(), start + 1, "the good change (the enrolment) was logged, the forged one not");

    // An unregistered market.
    let other = MarketKey::generate().unwrap();
    let stranger = DeviceKey::generate().unwrap();
    let stranger_cert = other.enrol(stranger.device_id(), "x", Role::Seller, u64::MAX);
    let (status, body) = sync_request(&w.cloud_url, &other.market_id(), &stranger, &stranger_cert, &changes(vec![]));
    assert_eq!((status, body["error"].as_str()), (404, Some("unknown_market")), "{body}");
    // A device of another market, uploading to this one.
    let (status, body) = sync_request(&w.cloud_url, &market, &stranger, &stranger_cert, &changes(vec![enrol.clone()]));
    assert_eq!((status, body["error"].as_str()), (403, Some("not_enrolled")), "{body}");
    // Malformed and oversized bodies, and a request without its signature headers.
    let (status, body) = sync_request(&w.cloud_url, &market, &creds.key, &creds.certificate, b"\x03garbage");
    assert_eq!((status, body["error"].as_str()), (400, Some("malformed_message")), "{body}");
    let big = vec![0u8; wire::MAX_BODY_BYTES + 1];
    let r = ureq::post(&format!("{}{}", w.cloud_url, wire::sync_path(&market))).send_bytes(&big);
    match r {
        Err(ureq::Error::Status(s, r)) => {
            let b: Value = r.into_json().unwrap();
            assert_eq!((s, b["error"].as_str()), (413, Some("body_too_large")), "{b}");
        }
        // The server may close the connection once it refused the body.
        Err(ureq::Error::Transport(_)) => {}
        Ok(r) => panic!("oversized body accepted: {}", r.status()),
    }
    let r = ureq::post(&format!("{}{}", w.cloud_url, wire::sync_path(&market))).send_bytes(&changes(vec![enrol]));
    let Err(ureq::Error::Status(401, r)) = r else { panic!("unsigned upload not refused with 401") };
    assert_eq!(r.into_json::<Value>().unwrap()["error"], "unauthenticated");
    // Consumer and admin endpoints refuse bad input in JSON too.
    for (url, code, error) in [
        (format!("{}/v1/markets/{}/events?limit=abc", w.cloud_url, w.market_id), 400, "bad_query"),
        (format!("{}/v1/markets/{}/events?limit=0", w.cloud_url, w.market_id), 400, "bad_query"),
        (format!("{}/v1/markets/zz/events", w.cloud_url), 400, "bad_market_id"),
        (format!("{}/v1/markets/%ff%fe/events", w.cloud_url), 400, "bad_path"),
        (format!("{}/v1/nothing", w.cloud_url), 404, "not_found"),
    ] {
        let Err(ureq::Error::Status(s, r)) = ureq::get(&url).call() else { panic!("{url} accepted") };
        assert_eq!((s, r.into_json::<Value>().unwrap()["error"].as_str().map(str::to_string)), (code, Some(error.to_string())), "{url}");
    }
    let (status, body) = post(&format!("{}/v1/markets", w.cloud_url), &json!({}));
    assert_eq!((status, body["error"].as_str()), (401, Some("unauthenticated")), "registering needs the admin token");
    assert_eq!(offset(), start + 1, "nothing else was stored");
    let metrics = ureq::get(&format!("{}/metrics", w.cloud_url)).call().unwrap().into_string().unwrap();
    for reason in ["unknown_market", "not_enrolled", "malformed_message", "unauthenticated", "bad_query", "bad_market_id", "bad_path"] {
        assert!(metrics.contains(&format!("stallmesh_cloud_requests_refused_total{{reason=\"{reason}\"}}")), "{reason} counted: {metrics}");
    }
    assert!(metrics.contains("stallmesh_cloud_changes_rejected_total{reason=\"bad_signature\"} 1"), "{metrics}");

    // A second tablet records the market's revocation of the first and uploads it: from then on the
    // first is refused, whether it uploads itself (403) or another tablet uploads its changes (422).
    let others = journals(&w, 1, 0);
    let (b_key, b_cert, b_changes) = &others[0];
    let (market_key, _) = files::load_market(&w.dir.path().join("market")).unwrap();
    let mut b = stallmesh_ledger::Ledger::new(stallmesh_ledger::MarketContext::new(market_key.public()), DeviceKey::from_secret(b_key.secret()), b_cert.clone());
    let now = stallmesh_node::runtime::now_ms();
    assert!(b.apply_remote(b_changes.clone()).rejected.is_empty());
    let revocation = b.record(stallmesh_ledger::LocalOp::Revoke(market_key.revoke(creds.certificate.device, now)), now).unwrap().change;
    let mut b_journal = b_changes.clone();
    b_journal.push(revocation);
    let (status, body) = sync_request(&w.cloud_url, &market, b_key, b_cert, &changes(b_journal));
    assert_eq!(status, 200, "{body}");
    // The revoked tablet has not heard of it yet and records on.
    let later = ledger.record(stallmesh_ledger::LocalOp::Restock { sku: "X".into(), qty: 1 }, now + 1).unwrap();
    let (status, body) = sync_request(&w.cloud_url, &market, &creds.key, &creds.certificate, &Message::Heads { heads: vec![], full: true, total: 0 }.encode());
    assert_eq!((status, body["error"].as_str()), (403, Some("revoked")), "{body}");
    let (status, body) = sync_request(&w.cloud_url, &market, b_key, b_cert, &changes(vec![later.change]));
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["details"]["rejected"][0]["reason"], "revoked", "{body}");
    let metrics = ureq::get(&format!("{}/metrics", w.cloud_url)).call().unwrap().into_string().unwrap();
    assert!(metrics.contains("stallmesh_cloud_requests_refused_total{reason=\"revoked\"} 1"), "{metrics}");
    let _ = BTreeMap::<u8, u8>::new();
}

/// Tablets' journals built in the test process, enrolled in the market the CLI made.
fn journals(w: &World, tablets: u16, sales: usize) -> Vec<(DeviceKey, stallmesh_identity::Certificate, Vec<SignedChange>)> {
    let (market_key, _) = files::load_market(&w.dir.path().join("market")).unwrap();
    let ctx = stallmesh_ledger::MarketContext::new(market_key.public());
    let now = stallmesh_node::runtime::now_ms();
    (0..tablets)
        .map(|n| {
            let key = DeviceKey::generate().unwrap();
            let cert = market_key.enrol(key.device_id(), &format!("Stall {n}"), Role::Organiser, u64::MAX);
            let mut l = stallmesh_ledger::Ledger::new(ctx.clone(), DeviceKey::from_secret(key.secret()), cert.clone());
            let mut out = vec![l.enrol_self(now).unwrap().unwrap().change];
            let sku = format!("SKU-{n}");
            let product = stallmesh_ledger::Product { sku: sku.clone(), name: sku.clone(), price_cents: 100, currency: "EUR".into(), stall: format!("Stall {n}"), tags: vec![] };
            out.push(l.record(stallmesh_ledger::LocalOp::UpsertProduct(product), now).unwrap().change);
            out.push(l.record(stallmesh_ledger::LocalOp::Restock { sku: sku.clone(), qty: 100_000 }, now).unwrap().change);
            for i in 0..sales {
                let sale = stallmesh_ledger::LocalOp::Sell {
                    lines: vec![stallmesh_ledger::LineRequest { sku: sku.clone(), qty: 1 }],
                    client_ref: None,
                    recommendation: None,
                    loyalty: None,
                    staff: None,
                };
                out.push(l.record(sale, now + i as u64).unwrap().change);
            }
            (key, cert, out)
        })
        .collect()
}

/// Uploads `changes` as `key` in batches of `batch` (as an uplink would), retrying a refused
/// connection (a cloud being restarted) until `limit`.
fn upload(cloud: &str, market: &stallmesh_identity::MarketId, key: &DeviceKey, cert: &stallmesh_identity::Certificate, changes: &[SignedChange], batch: usize) {
    for chunk in changes.chunks(batch) {
        let body = Message::Changes { changes: chunk.to_vec(), more: false }.encode();
        let start = Instant::now();
        loop {
            let path = wire::sync_path(market);
            let auth = RequestAuth::sign(key, cert, &path, stallmesh_node::runtime::now_ms(), &body);
            let mut req = ureq::post(&format!("{cloud}{path}")).timeout(Duration::from_secs(30));
            for (name, value) in auth.headers() {
                req = req.set(name, &value);
            }
            match req.send_bytes(&body) {
                Ok(_) => break,
                Err(e) => {
                    assert!(start.elapsed() < CONVERGE, "upload kept failing: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

#[test]
fn two_cloud_processes_on_one_postgresql_log_overlapping_uploads_of_five_uploaders_exactly_once() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let who = "two_cloud_processes_on_one_postgresql_log_overlapping_uploads_of_five_uploaders_exactly_once";
    let Some(db) = rt.block_on(pg::fresh_database(who)) else { return };
    let mut a = World::new(0);
    a.start_cloud(Some(&db.url));
    a.register_market();
    // A second process on the same database, with a data directory of its own.
    let mut b = World { dir: tempfile::tempdir().unwrap(), cloud: None, cloud_url: String::new(), tablets: vec![], http: vec![], mesh_ports: vec![], market_id: a.market_id.clone() };
    b.start_cloud(Some(&db.url));
    let journals = journals(&a, 5, 300);
    let market = journals[0].1.market;
    let all: Vec<SignedChange> = journals.iter().flat_map(|j| j.2.clone()).collect();
    // A consumer follows the log from process B while the uploads run.
    let follow_url = format!("{}/v1/markets/{}/events", b.cloud_url, a.market_id);
    let expected = all.len();
    let consumer = std::thread::spawn(move || {
        let mut seen: Vec<Value> = Vec::new();
        let start = Instant::now();
        while seen.iter().filter(|e| e["kind"] != "cloud_watermark" && e["role"] != "cloud").count() < expected {
            assert!(start.elapsed() < Duration::from_secs(120), "the consumer did not see everything: {} of {expected}", seen.len());
            let after = seen.last().map_or(0, |e| e["offset"].as_u64().unwrap());
            let text = ureq::get(&follow_url).query("after", &after.to_string()).query("wait_ms", "2000").call().unwrap().into_string().unwrap();
            seen.extend(text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()));
        }
        seen
    });
    // Five uploaders, each with an overlapping share (every tablet's journal is sent by two or three
    // of them), alternating between the two cloud processes.
    let clouds = [a.cloud_url.clone(), b.cloud_url.clone()];
    let threads: Vec<_> = (0..5)
        .map(|u| {
            let mine: Vec<SignedChange> = journals.iter().enumerate().filter(|(t, _)| (t + u) % 5 < 3).flat_map(|(_, j)| j.2.clone()).collect();
            let cloud = clouds[u % 2].clone();
            // Each uploader is one of the tablets (any enrolled device may upload any journal).
            let key = DeviceKey::from_secret(journals[u].0.secret());
            let cert = journals[u].1.clone();
            std::thread::spawn(move || upload(&cloud, &market, &key, &cert, &mine, 200))
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let seen = consumer.join().unwrap();
    let offsets: Vec<u64> = seen.iter().map(|e| e["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, (1..=seen.len() as u64).collect::<Vec<_>>(), "the consumer saw offsets 1, 2, 3, … each once, in order");
    let log = a.cloud_log();
    let dots: BTreeSet<(String, u64)> = log.iter().map(|e| (e["device"].as_str().unwrap().to_string(), e["seq"].as_u64().unwrap())).collect();
    assert_eq!(dots.len(), log.len(), "each change once in the log");
    for c in &all {
        assert!(dots.contains(&(c.device.to_hex(), c.seq)), "{}:{} missing", c.device, c.seq);
    }
    // The other process serves the same log; a watermark either process records meanwhile may
    // follow it.
    let b_log = b.cloud_log();
    assert!(b_log.len() >= log.len(), "both processes serve one log");
    assert_eq!(b_log[..log.len()], log[..], "both processes serve one log");
    assert!(b_log[log.len()..].iter().all(|e| e["kind"] == "cloud_watermark"), "only watermarks since");
    let dup = |w: &World| get(&format!("{}/v1/markets/{}", w.cloud_url, w.market_id))["duplicates"].as_u64().unwrap();
    assert!(dup(&a) + dup(&b) > 0, "overlapping uploads are counted as duplicates");
    rt.block_on(async {
        let client = db.client().await;
        // Watermarks may still be recorded meanwhile: compare within one snapshot.
        let row = client.query_one("SELECT (SELECT count(*) FROM events), (SELECT next_offset FROM markets)", &[]).await.unwrap();
        let (events, next): (i64, i64) = (row.get(0), row.get(1));
        assert_eq!(events, next - 1, "the log and the market's next offset agree");
        assert!(events as usize >= log.len());
        let sales: i64 = client.query_one("SELECT count(*) FROM sales", &[]).await.unwrap().get(0);
        assert_eq!(sales, 5 * 300);
    });
    drop((a, b));
    drop(db);
}

#[test]
fn a_cloud_killed_mid_upload_and_a_tablet_killed_mid_batch_lose_nothing_and_duplicate_nothing() {
    let mut w = World::new(1);
    w.start_cloud(None);
    w.register_market();
    let journals = journals(&w, 3, 400);
    let market = journals[0].1.market;
    let cloud = w.cloud_url.clone();
    let uploads: Vec<_> = journals
        .iter()
        .map(|(key, cert, changes)| {
            let (key, cert, changes, cloud) = (DeviceKey::from_secret(key.secret()), cert.clone(), changes.clone(), cloud.clone());
            std::thread::spawn(move || upload(&cloud, &market, &key, &cert, &changes, 50))
        })
        .collect();
    // kill -9 while the batches arrive, then start it again on the same data directory and port.
    eventually(CONVERGE, "some batches arrive", || w.cloud_log().len() > 100);
    let port = w.cloud_url.rsplit(':').next().unwrap().to_string();
    w.cloud.take(); // SIGKILL
    let mut cmd = Command::new(binary());
    cmd.args(["cloud", "up", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"]).arg(w.dir.path().join("cloud"));
    let log = std::fs::OpenOptions::new().append(true).open(w.dir.path().join("cloud.log")).unwrap();
    w.cloud = Some(Proc(cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap()));
    for u in uploads {
        u.join().unwrap();
    }
    let all: BTreeSet<(String, u64)> = journals.iter().flat_map(|j| j.2.iter().map(|c| (c.device.to_hex(), c.seq))).collect();
    let check = |w: &World| {
        let log = w.cloud_log();
        let offsets: Vec<u64> = log.iter().map(|e| e["offset"].as_u64().unwrap()).collect();
        assert_eq!(offsets, (1..=log.len() as u64).collect::<Vec<_>>(), "gapless after the kill");
        let dots: BTreeSet<(String, u64)> = log.iter().map(|e| (e["device"].as_str().unwrap().to_string(), e["seq"].as_u64().unwrap())).collect();
        assert_eq!(dots.len(), log.len(), "nothing twice");
        dots
    };
    assert!(check(&w).is_superset(&all), "every acknowledged upload survived the kill");

    // A tablet with a day's sales gets its uplink and is killed while it uploads, then restarted.
    w.start_tablet(1, None);
    let p = json!({ "sku": "JAM", "name": "Jam", "price_cents": 400, "currency": "EUR", "stall": "Stall 1" });
    assert_eq!(post(&format!("{}/api/v1/products", w.http[1]), &p).0, 201);
    assert_eq!(post(&format!("{}/api/v1/restocks", w.http[1]), &json!({ "sku": "JAM", "qty": 1000 })).0, 201);
    let mut sold = BTreeSet::new();
    for _ in 0..300 {
        sold.insert(sell(&w, 1, "JAM"));
    }
    w.stop_tablet(1);
    let url = w.cloud_url.clone();
    w.start_tablet(1, Some(&url));
    std::thread::sleep(Duration::from_millis(30));
    w.tablets[1].take(); // SIGKILL, mid-upload or just before
    w.start_tablet(1, Some(&url));
    eventually(CONVERGE, "the restarted uplink resumes", || {
        let ids: BTreeSet<String> = w.cloud_sale_ids().into_iter().collect();
        sold.is_subset(&ids)
    });
    check(&w);
    assert_log_exact(&w, &sold);
}

#[test]
fn the_log_is_published_to_jetstream_once_per_event_and_a_restarted_publisher_resumes() {
    let nats_url = "nats://127.0.0.1:4222";
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let client = match rt.block_on(async { tokio::time::timeout(Duration::from_secs(3), async_nats::connect(nats_url)).await }) {
        Ok(Ok(c)) => c,
        other => {
            let msg = format!("SKIPPED the JetStream test: no NATS server on {nats_url} ({other:?})");
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "{msg}; under CI=true it must run");
            netns::skipped(&msg);
            return;
        }
    };
    let stream = format!("STALLMESH_TEST_{}", std::process::id());
    let mut w = World::new(0);
    let start = |w: &mut World| {
        let port = free_port();
        let mut cmd = Command::new(binary());
        cmd.args(["cloud", "up", "--listen", &format!("127.0.0.1:{port}"), "--nats-url", nats_url, "--data-dir"]).arg(w.dir.path().join("cloud"));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(w.dir.path().join("cloud.log")).unwrap();
        w.cloud = Some(Proc(cmd.env("STALLMESH_CLOUD_SERVICE_NATS_STREAM", &stream).stdout(Stdio::null()).stderr(log).spawn().unwrap()));
        w.cloud_url = format!("http://127.0.0.1:{port}");
        let health = format!("{}/healthz", w.cloud_url);
        eventually(Duration::from_secs(30), "the cloud answers", || ureq::get(&health).call().is_ok());
    };
    start(&mut w);
    w.register_market();
    let journals = journals(&w, 2, 100);
    let market = journals[0].1.market;
    let (key, cert, changes) = &journals[0];
    upload(&w.cloud_url, &market, key, cert, changes, 40);
    let subject = format!("{stream}.events.{}", w.market_id);
    let js = rt.block_on(async { async_nats::jetstream::new(client) });
    let published = |rt: &tokio::runtime::Runtime| -> u64 {
        rt.block_on(async {
            let mut s = js.get_stream(&stream).await.unwrap();
            s.info().await.unwrap().state.messages
        })
    };
    eventually(CONVERGE, "the first upload is published", || published(&rt) as usize == w.cloud_log().len());
    // A restart (kill -9) of the cloud: the publisher resumes from the stream's last offset.
    w.cloud.take();
    start(&mut w);
    let (key, cert, changes) = &journals[1];
    upload(&w.cloud_url, &market, key, cert, changes, 40);
    eventually(CONVERGE, "everything is published", || published(&rt) as usize >= w.cloud_log().len());
    std::thread::sleep(Duration::from_millis(1_000));
    // Exactly once: the stream's last message carries offset n and the stream holds n messages
    // (a repeat would make more messages than offsets); the log may grow meanwhile (a watermark),
    // so the two are read until they describe one moment.
    let last_offset = |rt: &tokio::runtime::Runtime| -> u64 {
        let last = rt.block_on(async { js.get_stream(&stream).await.unwrap().get_last_raw_message_by_subject(&subject).await.unwrap() });
        last.headers.get("Stallmesh-Offset").unwrap().as_str().parse().unwrap()
    };
    eventually(CONVERGE, "the stream holds offsets 1..n once each", || {
        let (before, offset, after) = (published(&rt), last_offset(&rt), published(&rt));
        before == after && offset == after
    });
    assert!(last_offset(&rt) as usize >= w.cloud_log().len() - 1, "the stream reached the log's end");
    rt.block_on(async { js.delete_stream(&stream).await.unwrap() });
}

/// A PostgreSQL server of the test's own (initdb + pg_ctl in a temporary directory), so the test
/// can crash and restart it. As root it runs as the `postgres` user (PostgreSQL refuses root).
struct OwnPostgres {
    dir: tempfile::TempDir,
    port: u16,
    as_user: Option<&'static str>,
    /// Where initdb, pg_ctl and psql are.
    bindir: PathBuf,
}

/// The PostgreSQL server programs' folder: where `initdb` is on PATH, else `pg_config --bindir`,
/// else Debian's `/usr/lib/postgresql/<version>/bin` (newest), which is not on PATH there.
fn postgres_bindir() -> Option<PathBuf> {
    let works = |dir: &Path| Command::new(dir.join("initdb")).arg("--version").output().is_ok_and(|o| o.status.success());
    let on_path = std::env::var_os("PATH").into_iter().flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>());
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let mut debian: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    // Newest first: "15" sorts after "9.6" only by number.
    debian.sort_by_key(|p| std::cmp::Reverse(p.parent().and_then(|v| v.file_name()?.to_str()?.split('.').next()?.parse::<u32>().ok())));
    on_path.chain(from_pg_config).chain(debian).find(|d| works(d))
}

impl OwnPostgres {
    fn start(who: &str) -> Option<OwnPostgres> {
        let Some(bindir) = postgres_bindir() else {
            let msg = format!("SKIPPED {who}: no PostgreSQL server programs (initdb, pg_ctl) on PATH, from pg_config or in /usr/lib/postgresql");
            assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "{msg}; under CI=true it must run");
            netns::skipped(&msg);
            return None;
        };
        let is_root = Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        let as_user = is_root.then_some("postgres");
        let dir = tempfile::tempdir().unwrap();
        if let Some(u) = as_user {
            assert!(Command::new("chown").args([u, dir.path().to_str().unwrap()]).status().unwrap().success());
        }
        let pg = OwnPostgres { dir, port: free_port(), as_user, bindir };
        let data = pg.data();
        pg.run(&["initdb", "-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"]);
        pg.ctl_start();
        pg.run(&["psql", "-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", "postgres", "-d", "postgres", "-c", "CREATE DATABASE stallmesh"]);
        Some(pg)
    }
    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }
    fn run(&self, args: &[&str]) {
        // psql is a client program: on PATH where the server programs' folder lacks it.
        let program = Some(self.bindir.join(args[0])).filter(|p| p.exists()).unwrap_or_else(|| PathBuf::from(args[0]));
        let out = match self.as_user {
            Some(u) => Command::new("runuser").args(["-u", u, "--"]).arg(&program).args(&args[1..]).current_dir("/").output().unwrap(),
            None => Command::new(&program).args(&args[1..]).output().unwrap(),
        };
        assert!(out.status.success(), "{args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    fn ctl_start(&self) {
        let opts = format!("-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off", self.port, self.dir.path().display());
        let log = self.dir.path().join("pg.log").display().to_string();
        self.run(&["pg_ctl", "-D", &self.data(), "-o", &opts, "-l", &log, "-w", "start"]);
    }
    /// The server dies as in a power cut: no shutdown checkpoint, clients cut off.
    fn crash(&self) {
        self.run(&["pg_ctl", "-D", &self.data(), "-m", "immediate", "-w", "stop"]);
    }
    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/stallmesh", self.port)
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let pg_ctl = self.bindir.join("pg_ctl");
        let _ = Command::new("runuser").args(["-u", "postgres", "--"]).arg(&pg_ctl).args(["-D", &self.data(), "-m", "immediate", "stop"]).output();
        let _ = Command::new(&pg_ctl).args(["-D", &self.data(), "-m", "immediate", "stop"]).output();
    }
}

#[test]
fn a_postgresql_restart_mid_ingest_loses_nothing_duplicates_nothing_and_the_uplink_resumes_by_itself() {
    let Some(pg) = OwnPostgres::start("a_postgresql_restart_mid_ingest…") else { return };
    let mut w = World::new(1);
    w.start_cloud(Some(&pg.url()));
    w.register_market();
    let url = w.cloud_url.clone();
    w.start_tablet(1, Some(&url));
    let p = json!({ "sku": "JAM", "name": "Jam", "price_cents": 400, "currency": "EUR", "stall": "Stall 1" });
    assert_eq!(post(&format!("{}/api/v1/products", w.http[1]), &p).0, 201);
    assert_eq!(post(&format!("{}/api/v1/restocks", w.http[1]), &json!({ "sku": "JAM", "qty": 1000 })).0, 201);
    let mut sold = BTreeSet::new();
    for _ in 0..60 {
        sold.insert(sell(&w, 1, "JAM"));
    }
    eventually(CONVERGE, "the first sales are in PostgreSQL", || w.cloud_sale_ids().len() >= 30);
    // The database dies as in a power cut while the tablet sells on and uploads each sale: the
    // seller runs on its own thread, so the crash falls among uploads in flight.
    let during = std::thread::scope(|scope| {
        let seller = scope.spawn(|| (0..60).map(|_| sell(&w, 1, "JAM")).collect::<Vec<_>>());
        std::thread::sleep(Duration::from_millis(300));
        pg.crash();
        seller.join().unwrap()
    });
    sold.extend(during);
    // Both sides saw the outage: the cloud answered 503 store_unavailable (counted), and the
    // tablet's uplink backs off and says so — the sales stay on the tablet meanwhile.
    let refused_store = || {
        let metrics = ureq::get(&format!("{}/metrics", w.cloud_url)).call().unwrap().into_string().unwrap();
        metrics.contains("stallmesh_cloud_requests_refused_total{reason=\"store_unavailable\"}")
    };
    eventually(CONVERGE, "the cloud refuses uploads while its database is down", refused_store);
    eventually(CONVERGE, "the tablet's uplink retries", || w.tablet(1, "/api/v1/status")["cloud"]["uplink"]["state"] == "retrying");
    let status = w.tablet(1, "/api/v1/status");
    assert!(status["cloud"]["sales_not_uploaded"].as_u64().unwrap() > 0, "sales wait on the tablet: {status}");
    pg.ctl_start();
    for _ in 0..30 {
        sold.insert(sell(&w, 1, "JAM"));
    }
    eventually(Duration::from_secs(90), "the uplink resumed by itself", || {
        let ids: BTreeSet<String> = w.cloud_sale_ids().into_iter().collect();
        sold.is_subset(&ids)
    });
    assert_log_exact(&w, &sold);
    eventually(CONVERGE, "the uplink is connected again", || w.tablet(1, "/api/v1/status")["cloud"]["uplink"]["state"] == "connected");
}
