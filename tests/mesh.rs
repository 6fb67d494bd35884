//! The mesh as it runs at a market: one `stallmesh up` process per tablet, each in its own network
//! namespace on a shared bridge, no peer addresses configured (mDNS finds them), driven over HTTP.

mod netns;

use netns::{eventually, free_port, in_netns, Lan};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::Duration;

const CONVERGE: Duration = Duration::from_secs(30);

fn market(n: usize) -> Lan {
    Lan::with_market(n)
}

fn device(lan: &Lan, k: usize) -> String {
    lan.get(k, "/api/v1/status")["node"]["device"].as_str().unwrap().to_string()
}

fn sale_ids(lan: &Lan, k: usize) -> Vec<String> {
    let v = lan.get(k, "/api/v1/sales?limit=10000");
    v["sales"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect()
}

fn stock(lan: &Lan, k: usize) -> Value {
    lan.get(k, "/api/v1/stock")["stock"].clone()
}

/// Stock as every replica should agree on it: totals and rights per device (not "this device").
fn shared_stock(lan: &Lan, k: usize) -> Vec<(Value, Value, Value)> {
    stock(lan, k).as_array().unwrap().iter().map(|r| (r["sku"].clone(), r["total"].clone(), r["per_device"].clone())).collect()
}

/// Every node in `ks` shows the same sales and the same stock.
fn converged(lan: &Lan, ks: &[usize]) -> bool {
    let first = (shared_stock(lan, ks[0]), sale_ids(lan, ks[0]));
    ks[1..].iter().all(|k| (shared_stock(lan, *k), sale_ids(lan, *k)) == first)
}

fn wait_full_mesh(lan: &Lan, ks: &[usize]) {
    for &k in ks {
        eventually(CONVERGE, &format!("node {k} sees {} peers", ks.len() - 1), || lan.peers(k) >= ks.len() - 1);
    }
}

/// Node 1 adds `sku` with `qty` units and hands `share` units to each other node.
fn stock_up(lan: &Lan, ks: &[usize], sku: &str, qty: u64, share: u64) {
    let p = json!({ "sku": sku, "name": format!("Product {sku}"), "price_cents": 500, "currency": "EUR", "stall": "Stall" });
    assert_eq!(lan.post(1, "/api/v1/products", &p).0, 201);
    assert_eq!(lan.post(1, "/api/v1/restocks", &json!({ "sku": sku, "qty": qty })).0, 201);
    for &k in &ks[1..] {
        let to = device(lan, k);
        // Node 1 can only give to devices whose enrolment it has received.
        eventually(CONVERGE, "enrolments spread", || {
            lan.post(1, "/api/v1/transfers", &json!({ "sku": sku, "qty": share, "to_device": to })).0 == 201
        });
    }
    eventually(CONVERGE, "stock spread", || {
        ks.iter().all(|k| {
            stock(lan, *k).as_array().is_some_and(|s| {
                s.iter().any(|r| {
                    r["sku"] == sku && r["this_device"].as_u64() == Some(if *k == 1 { qty - share * (ks.len() as u64 - 1) } else { share })
                })
            })
        })
    });
}

fn sell(lan: &Lan, k: usize, sku: &str, qty: u64) -> Result<String, Value> {
    match lan.post(k, "/api/v1/sales", &json!({ "lines": [{ "sku": sku, "qty": qty }] })) {
        (201, sale) => Ok(sale["id"].as_str().unwrap().to_string()),
        (_, err) => Err(err),
    }
}

#[test]
fn a_five_nodes_with_no_addresses_discover_each_other_and_converge() {
    in_netns("a_five_nodes_with_no_addresses_discover_each_other_and_converge", || {
        let lan = market(5);
        let all = [1, 2, 3, 4, 5];
        wait_full_mesh(&lan, &all);
        stock_up(&lan, &all, "HNY", 50, 5);
        sell(&lan, 3, "HNY", 2).unwrap();
        eventually(CONVERGE, "five nodes converge", || converged(&lan, &all));
        let mesh = lan.get(2, "/api/v1/mesh");
        assert_eq!(mesh["peers"].as_array().unwrap().len(), 4, "{mesh}");
        assert!(mesh["peers"][0]["stall"].as_str().is_some_and(|s| !s.is_empty()));
    });
}

#[test]
fn b_concurrent_sales_on_every_node_converge_to_identical_stock_and_sales() {
    in_netns("b_concurrent_sales_on_every_node_converge_to_identical_stock_and_sales", || {
        let lan = market(5);
        let all = [1, 2, 3, 4, 5];
        wait_full_mesh(&lan, &all);
        stock_up(&lan, &all, "JAM", 100, 15);
        let urls: Vec<String> = all.iter().map(|k| lan.url(*k).to_string()).collect();
        let acknowledged: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = urls
                .iter()
                .map(|u| {
                    s.spawn(move || {
                        (0..10)
                            .filter_map(|_| match netns::post(u, "/api/v1/sales", &json!({ "lines": [{ "sku": "JAM", "qty": 1 }] })) {
                                (201, sale) => Some(sale["id"].as_str().unwrap().to_string()),
                                _ => None,
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(acknowledged.len(), 50, "every node held enough rights for its 10 sales");
        eventually(CONVERGE, "concurrent sales converge", || converged(&lan, &all));
        let ids: BTreeSet<String> = sale_ids(&lan, 4).into_iter().collect();
        assert_eq!(ids, acknowledged.into_iter().collect::<BTreeSet<_>>());
        let jam = stock(&lan, 2).as_array().unwrap().iter().find(|r| r["sku"] == "JAM").unwrap().clone();
        assert_eq!(jam["total"], 50);
    });
}

#[test]
fn c_partition_2_3_sells_the_last_units_on_both_sides_and_heals_without_loss_or_oversell() {
    in_netns("c_partition_2_3_sells_the_last_units_on_both_sides_and_heals_without_loss_or_oversell", || {
        let lan = market(5);
        let all = [1, 2, 3, 4, 5];
        wait_full_mesh(&lan, &all);
        // 9 units: node 1 keeps 1, every other node holds 2.
        stock_up(&lan, &all, "LAST", 9, 2);
        let (left, right) = ([1, 2], [3, 4, 5]);
        lan.partition(&left);
        // Both sides sell until refused; the refusal names what sits on the other side.
        // Rebalancing moves rights to whoever runs short on the same side, so sell in rounds
        // until a whole round sells nothing.
        let mut acknowledged = Vec::new();
        for _round in 0..10 {
            let before = acknowledged.len();
            for k in all {
                loop {
                    match sell(&lan, k, "LAST", 1) {
                        Ok(id) => acknowledged.push(id),
                        Err(err) => {
                            assert_eq!(err["error"], "insufficient_stock_rights", "{err}");
                            break;
                        }
                    }
                }
            }
            if acknowledged.len() == before {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        assert_eq!(acknowledged.len(), 9, "exactly the stock was sold across the partition");
        eventually(CONVERGE, "left side converges", || converged(&lan, &left));
        eventually(CONVERGE, "right side converges", || converged(&lan, &right));
        // Long enough for liveness to notice: each side drops the peers it cannot hear.
        eventually(CONVERGE, "each side drops the other", || lan.peers(1) == 1 && lan.peers(3) == 2);
        assert!(!converged(&lan, &all), "the sides cannot have exchanged sales while partitioned");
        lan.heal(&left);
        let took = eventually(CONVERGE, "all converge after heal", || converged(&lan, &all));
        let reconnected = eventually(CONVERGE, "full mesh again", || all.iter().all(|k| lan.peers(*k) == 4));
        eprintln!("converged {took:?} after heal; full mesh {:?} after heal", took + reconnected);
        assert!(took < Duration::from_secs(5), "converged only {took:?} after the heal");
        for k in all {
            let ids = sale_ids(&lan, k);
            let unique: BTreeSet<&String> = ids.iter().collect();
            assert_eq!(unique.len(), ids.len(), "a sale appears twice on node {k}");
            assert_eq!(unique, acknowledged.iter().collect(), "node {k} lost or invented a sale");
            let last = stock(&lan, k).as_array().unwrap().iter().find(|r| r["sku"] == "LAST").unwrap().clone();
            assert_eq!(last["total"], 0, "node {k}: {last}");
        }
    });
}

#[test]
fn d_devices_of_another_market_or_without_enrolment_get_no_connection_and_inject_nothing() {
    in_netns("d_devices_of_another_market_or_without_enrolment_get_no_connection_and_inject_nothing", || {
        let mut lan = Lan::new(4);
        lan.market("A");
        lan.market("B");
        for k in [1, 2] {
            let creds = lan.enrol(k, "A");
            lan.start(k, &creds);
        }
        // Host 3: a device of market B, on the same Wi-Fi.
        let b = lan.enrol(3, "B");
        lan.start(3, &b);
        // Host 4: market A's network key (leaked), but enrolled only in market B: no enrolment in A.
        let forged = lan.enrol(4, "B");
        std::fs::copy(lan.dir.path().join("creds1/mesh.psk"), forged.join("mesh.psk")).unwrap();
        lan.start(4, &forged);
        wait_full_mesh(&lan, &[1, 2]);
        let p = json!({ "sku": "X", "name": "Thing", "price_cents": 100, "currency": "EUR", "stall": "Stall" });
        for k in [3, 4] {
            // The intruders record changes of their own, hoping to spread them.
            let _ = lan.post(k, "/api/v1/products", &p);
            let _ = lan.post(k, "/api/v1/restocks", &json!({ "sku": "X", "qty": 5 }));
        }
        eventually(CONVERGE, "node 1 refuses the forged enrolment", || {
            lan.get(1, "/api/v1/mesh")["refused"].as_object().is_some_and(|r| !r.is_empty())
                || lan.get(2, "/api/v1/mesh")["refused"].as_object().is_some_and(|r| !r.is_empty())
        });
        std::thread::sleep(Duration::from_secs(3));
        for k in [1, 2] {
            assert_eq!(lan.peers(k), 1, "node {k} talks only to the other market-A node");
            let status = lan.get(k, "/api/v1/status");
            assert_eq!(status["devices"], 2, "node {k} knows only market A's two devices: {status}");
            assert!(stock(&lan, k).as_array().unwrap().iter().all(|r| r["sku"] != "X"));
        }
        assert_eq!(lan.peers(3), 0, "market B's device is alone");
    });
}

#[test]
fn e_a_node_killed_mid_sales_restarts_catches_up_and_loses_no_acknowledged_sale() {
    in_netns("e_a_node_killed_mid_sales_restarts_catches_up_and_loses_no_acknowledged_sale", || {
        let mut lan = market(3);
        let all = [1, 2, 3];
        wait_full_mesh(&lan, &all);
        stock_up(&lan, &all, "BRD", 6_000, 2_000);
        let url3 = lan.url(3).to_string();
        // Node 3 sells in a burst; it is killed while the burst is running.
        let seller = std::thread::spawn(move || {
            let mut acked = Vec::new();
            for _ in 0..2_000 {
                match ureq::post(&format!("{url3}/api/v1/sales"))
                    .timeout(Duration::from_secs(2))
                    .send_json(json!({ "lines": [{ "sku": "BRD", "qty": 1 }] }))
                {
                    Ok(r) if r.status() == 201 => acked.push(r.into_json::<Value>().unwrap()["id"].as_str().unwrap().to_string()),
                    _ => break,
                }
            }
            acked
        });
        std::thread::sleep(Duration::from_millis(300));
        lan.kill9(3);
        let acked = seller.join().unwrap();
        assert!(acked.len() < 2_000, "the kill must land mid-burst");
        // Meanwhile the others keep selling.
        let mut others = Vec::new();
        for k in [1, 2] {
            for _ in 0..5 {
                others.push(sell(&lan, k, "BRD", 1).unwrap());
            }
        }
        lan.start(3, &lan.dir.path().join("creds3"));
        eventually(CONVERGE, "restarted node catches up", || converged(&lan, &all));
        for k in all {
            let ids: BTreeSet<String> = sale_ids(&lan, k).into_iter().collect();
            for id in acked.iter().chain(&others) {
                assert!(ids.contains(id), "node {k} lost acknowledged sale {id}");
            }
        }
        eprintln!("node 3 had {} sales acknowledged before kill -9", acked.len());
    });
}

#[test]
fn f_a_device_that_runs_short_is_given_stock_rights_by_a_peer() {
    in_netns("f_a_device_that_runs_short_is_given_stock_rights_by_a_peer", || {
        let lan = market(2);
        wait_full_mesh(&lan, &[1, 2]);
        let p = json!({ "sku": "EGG", "name": "Eggs", "price_cents": 300, "currency": "EUR", "stall": "Stall" });
        assert_eq!(lan.post(1, "/api/v1/products", &p).0, 201);
        assert_eq!(lan.post(1, "/api/v1/restocks", &json!({ "sku": "EGG", "qty": 10 })).0, 201);
        // Node 1 sells too, so it keeps a share when asked.
        sell(&lan, 1, "EGG", 1).unwrap();
        eventually(CONVERGE, "restock spread", || converged(&lan, &[1, 2]));
        // Node 2 holds nothing: its sale waits for node 1's transfer (what the sale lacks, plus
        // node 1's policy share of a refill) and goes through.
        let (status, sale) = lan.post(2, "/api/v1/sales", &json!({ "lines": [{ "sku": "EGG", "qty": 2 }] }));
        assert_eq!(status, 201, "{sale}");
        let rows = lan.get(2, "/api/v1/stock")["stock"].clone();
        let egg = rows.as_array().unwrap().iter().find(|r| r["sku"] == "EGG").unwrap().clone();
        assert_eq!(egg["total"], 7, "{egg}");
        assert!(egg["per_device"].as_object().unwrap().values().all(|v| v.as_u64().unwrap() >= 1), "node 1 kept some: {egg}");
    });
}

/// `stallmesh` CLI and `stallmesh up` processes in `dir`, on loopback: mDNS off (multicast does
/// not work there, and it must never run outside a namespace of its own).
struct Loopback {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
}

impl Loopback {
    fn new() -> Loopback {
        Loopback { dir: tempfile::tempdir().unwrap(), bin: netns::binary() }
    }

    fn run(&self, args: &[&str]) {
        let out = std::process::Command::new(&self.bin).args(args).current_dir(self.dir.path()).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A market in `market/` and organiser tablets enrolled in it.
    fn market(&self, tablets: &[&str]) {
        self.run(&["market", "init", "--dir", "market"]);
        for t in tablets {
            self.run(&["device", "enroll", "--market", "market", "--stall", "Stall", "--role", "organiser", "--out", t]);
        }
    }

    fn start(&self, creds: &str, http: u16, env: Vec<(&str, String)>) -> (KillOnDrop, String) {
        let log = std::fs::File::create(self.dir.path().join(format!("{creds}.log"))).unwrap();
        let mut cmd = std::process::Command::new(&self.bin);
        cmd.args(["up", "--credentials", creds, "--data-dir", &format!("{creds}-data"), "--http-addr", &format!("127.0.0.1:{http}")])
            .current_dir(self.dir.path())
            .env("STALLMESH_MESH_MDNS", "false")
            .stdout(std::process::Stdio::null())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let url = format!("http://127.0.0.1:{http}");
        netns::wait_up(&mut child, &url, &self.dir.path().join(format!("{creds}.log")));
        (KillOnDrop(child), url)
    }
}


fn loopback_peers(u: &str) -> usize {
    netns::get(u, "/api/v1/mesh")["peers"].as_array().map_or(0, Vec::len)
}

/// Two tablets where multicast does not work (loopback): one is given the other's address.
/// Also: a revoked tablet is cut off and not let back in.
#[test]
fn g_bootstrap_addresses_work_where_mdns_cannot_and_a_revoked_device_is_cut() {
    let lo = Loopback::new();
    lo.market(&["t1", "t2"]);
    let (mesh1, http1, http2) = (free_port(), free_port(), free_port());
    let (_n1, u1) = lo.start("t1", http1, vec![("STALLMESH_MESH_LISTEN", format!("/ip4/127.0.0.1/tcp/{mesh1}"))]);
    let (_n2, u2) = lo.start(
        "t2",
        http2,
        vec![
            ("STALLMESH_MESH_LISTEN", "/ip4/127.0.0.1/tcp/0".to_string()),
            ("STALLMESH_MESH_BOOTSTRAP", format!("/ip4/127.0.0.1/tcp/{mesh1}")),
        ],
    );
    let peers = loopback_peers;
    eventually(CONVERGE, "bootstrap connects the two", || peers(&u1) == 1 && peers(&u2) == 1);
    let p = json!({ "sku": "TEA", "name": "Tea", "price_cents": 300, "currency": "EUR", "stall": "Stall" });
    assert_eq!(netns::post(&u1, "/api/v1/products", &p).0, 201);
    eventually(CONVERGE, "the product reaches tablet 2", || {
        netns::get(&u2, "/api/v1/products")["products"].as_array().is_some_and(|a| a.len() == 1)
    });

    // The organiser revokes tablet 2; tablet 1 learns it and cuts it off for good.
    let device2 = netns::get(&u2, "/api/v1/status")["node"]["device"].as_str().unwrap().to_string();
    lo.run(&["device", "revoke", "--market", "market", "--device", &device2, "--out", "revoked.json"]);
    let rev: Value = serde_json::from_str(&std::fs::read_to_string(lo.dir.path().join("revoked.json")).unwrap()).unwrap();
    assert_eq!(netns::post(&u1, "/api/v1/revocations", &rev).0, 201);
    eventually(CONVERGE, "tablet 1 cuts tablet 2", || peers(&u1) == 0);
    let mesh = netns::get(&u1, "/api/v1/mesh");
    assert!(mesh["refused"].as_object().is_some_and(|r| r.values().any(|v| v.as_str().is_some_and(|s| s.contains("revoked")))), "{mesh}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(peers(&u1), 0, "a revoked device is not let back in by the redial");
}

/// Issue 10: units restocked on an idle tablet, a customer at another tablet that holds none. The
/// sale waits for the idle tablet to give its units (all of them: it sells nothing itself) and
/// succeeds within the bound; a later sale is given even a selling tablet's last unit.
#[test]
fn h_a_sale_waits_for_units_an_idle_peer_holds_and_succeeds_within_the_bound() {
    let lo = Loopback::new();
    lo.market(&["t1", "t2"]);
    let mesh1 = free_port();
    let (_n1, u1) = lo.start("t1", free_port(), vec![("STALLMESH_MESH_LISTEN", format!("/ip4/127.0.0.1/tcp/{mesh1}"))]);
    let (_n2, u2) = lo.start(
        "t2",
        free_port(),
        vec![
            ("STALLMESH_MESH_LISTEN", "/ip4/127.0.0.1/tcp/0".to_string()),
            ("STALLMESH_MESH_BOOTSTRAP", format!("/ip4/127.0.0.1/tcp/{mesh1}")),
        ],
    );
    eventually(CONVERGE, "bootstrap connects the two", || loopback_peers(&u1) == 1 && loopback_peers(&u2) == 1);
    let device = |u: &str| netns::get(u, "/api/v1/status")["node"]["device"].as_str().unwrap().to_string();
    let (d1, d2) = (device(&u1), device(&u2));
    let p = json!({ "sku": "HNY", "name": "Honey", "price_cents": 850, "currency": "EUR", "stall": "Stall" });
    assert_eq!(netns::post(&u1, "/api/v1/products", &p).0, 201);
    assert_eq!(netns::post(&u1, "/api/v1/restocks", &json!({ "sku": "HNY", "qty": 3 })).0, 201);
    let rights = |u: &str, d: &str| -> u64 {
        let rows = netns::get(u, "/api/v1/stock")["stock"].clone();
        rows.as_array().and_then(|r| r.iter().find(|r| r["sku"] == "HNY")).and_then(|r| r["per_device"][d].as_u64()).unwrap_or(0)
    };
    eventually(CONVERGE, "the restock reaches tablet 2", || rights(&u2, &d1) == 3);

    let sale = json!({ "lines": [{ "sku": "HNY", "qty": 2 }], "client_ref": "till-2-0001" });
    let started = std::time::Instant::now();
    let (status, sold) = netns::post(&u2, "/api/v1/sales", &sale);
    let took = started.elapsed();
    eprintln!("sale on a tablet holding nothing: {status} after {took:?}");
    assert_eq!(status, 201, "the idle tablet's units arrive within the wait: {sold}");
    let bound = Duration::from_millis(stallmesh_sync::rebalance::SALE_WAIT_FOR_RIGHTS_MS);
    assert!(took < bound + Duration::from_millis(200), "answered after {took:?}, the wait is {bound:?}");
    // Tablet 1 sold nothing: it gave everything, min_keep notwithstanding.
    assert_eq!((rights(&u2, &d1), rights(&u2, &d2)), (0, 1));
    // The client retries its POST: the same sale, not a second one.
    let (again, same) = netns::post(&u2, "/api/v1/sales", &sale);
    assert_eq!((again, &same["id"]), (200, &sold["id"]), "{same}");

    // Tablet 2 has sold, yet a customer waiting at tablet 1 still gets its last unit: a customer
    // at the till comes before one who may come.
    eventually(CONVERGE, "the transfer and the sale reach tablet 1", || rights(&u1, &d2) == 1);
    let (status, sold) = netns::post(&u1, "/api/v1/sales", &json!({ "lines": [{ "sku": "HNY", "qty": 1 }] }));
    assert_eq!(status, 201, "{sold}");
    // Now no tablet holds any: refused at once, without waiting.
    let (status, err) = netns::post(&u1, "/api/v1/sales", &json!({ "lines": [{ "sku": "HNY", "qty": 1 }] }));
    assert_eq!(status, 409, "{err}");
    assert_eq!(err["details"]["held_elsewhere_total"], 0, "{err}");
    assert_eq!(err["details"]["waited_ms"], 0, "{err}");
    assert_eq!(netns::get(&u1, "/api/v1/sales")["sales"].as_array().unwrap().len(), 2, "two sales in the market");
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
