//! A tablet that lost its store, and tablets sharing one device's credentials, on real processes:
//! `stallmesh up` on loopback, joined by bootstrap addresses (mDNS off: nothing leaves loopback).

mod netns;

use netns::{eventually, free_port};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const CONVERGE: Duration = Duration::from_secs(30);

struct Market {
    dir: tempfile::TempDir,
    bin: PathBuf,
}

/// One tablet: its credentials, data directory and fixed loopback ports (so a restart keeps them).
struct Tablet {
    creds: String,
    data: String,
    http: u16,
    mesh: u16,
    child: Option<Child>,
}


impl Market {
    fn new() -> Market {
        let m = Market { dir: tempfile::tempdir().unwrap(), bin: netns::binary() };
        m.run(&["market", "init", "--dir", "market"]);
        m
    }

    fn run(&self, args: &[&str]) {
        let out = Command::new(&self.bin).args(args).current_dir(self.dir.path()).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn tablet(&self, creds: &str, data: &str) -> Tablet {
        if !self.path(creds).exists() {
            self.run(&["device", "enroll", "--market", "market", "--stall", "Stall", "--role", "organiser", "--out", creds]);
        }
        Tablet { creds: creds.into(), data: data.into(), http: free_port(), mesh: free_port(), child: None }
    }

    /// Starts `t` with every tablet in `peers` as a bootstrap address; returns once it serves HTTP.
    fn start(&self, t: &mut Tablet, peers: &[&Tablet]) {
        let log = std::fs::File::options().create(true).append(true).open(self.path(&format!("{}.log", t.data))).unwrap();
        let bootstrap: Vec<String> = peers.iter().map(|p| format!("/ip4/127.0.0.1/tcp/{}", p.mesh)).collect();
        let child = Command::new(&self.bin)
            .args(["up", "--credentials", &t.creds, "--data-dir", &t.data, "--http-addr", &format!("127.0.0.1:{}", t.http)])
            .current_dir(self.dir.path())
            .env("STALLMESH_MESH_MDNS", "false")
            .env("STALLMESH_MESH_LISTEN", format!("/ip4/127.0.0.1/tcp/{}", t.mesh))
            .env("STALLMESH_MESH_BOOTSTRAP", bootstrap.join(","))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let url = t.url();
        let log = self.path(&format!("{}.log", t.data));
        t.child = Some(child);
        netns::wait_up(t.child.as_mut().unwrap(), &url, &log);
    }

    fn log(&self, t: &Tablet) -> String {
        std::fs::read_to_string(self.path(&format!("{}.log", t.data))).unwrap_or_default()
    }
}

impl Tablet {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }
    fn get(&self, path: &str) -> Value {
        netns::get(&self.url(), path)
    }
    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        netns::post(&self.url(), path, body)
    }
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    fn peers(&self) -> usize {
        self.get("/api/v1/mesh")["peers"].as_array().map_or(0, Vec::len)
    }
    fn journal_state(&self) -> String {
        self.get("/api/v1/status")["journal"]["state"].as_str().unwrap_or_default().to_string()
    }
    fn sale_ids(&self) -> BTreeSet<String> {
        let sales = self.get("/api/v1/sales?limit=1000");
        sales["sales"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect()
    }
    fn sell(&self, sku: &str, qty: u64) -> (u16, Value) {
        self.post("/api/v1/sales", &json!({ "lines": [{ "sku": sku, "qty": qty }] }))
    }
    fn metric(&self, prefix: &str) -> f64 {
        let text = ureq::get(&format!("{}/metrics", self.url())).call().unwrap().into_string().unwrap();
        text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    }
}

impl Drop for Tablet {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A product, a restock and a sale on `t`; waits until `other` holds the sale.
fn trade(t: &Tablet, other: &Tablet, sku: &str) -> String {
    let p = json!({ "sku": sku, "name": format!("Product {sku}"), "price_cents": 300, "currency": "EUR", "stall": "Stall" });
    assert_eq!(t.post("/api/v1/products", &p).0, 201);
    assert_eq!(t.post("/api/v1/restocks", &json!({ "sku": sku, "qty": 10 })).0, 201);
    let (status, sale) = t.sell(sku, 2);
    assert_eq!(status, 201, "{sale}");
    let id = sale["id"].as_str().unwrap().to_string();
    eventually(CONVERGE, "the sale reaches the other tablet", || other.sale_ids().contains(&id));
    id
}

/// Tablets `a` and `b` of `m`, running and connected.
fn two_tablets(m: &Market) -> (Tablet, Tablet) {
    let (mut a, mut b) = (m.tablet("a", "a-data"), m.tablet("b", "b-data"));
    m.start(&mut a, &[]);
    m.start(&mut b, &[&a]);
    eventually(CONVERGE, "a and b connect", || a.peers() == 1 && b.peers() == 1);
    (a, b)
}

fn wipe(m: &Market, t: &Tablet) {
    std::fs::remove_dir_all(m.path(&t.data)).unwrap();
}

fn no_forks_anywhere(tablets: &[&Tablet]) {
    for t in tablets {
        assert_eq!(t.get("/api/v1/equivocations")["conflicting_changes"], 0, "no second history on {}", t.url());
        assert_eq!(t.metric("stallmesh_verification_failures_total"), 0.0, "nothing rejected on {}", t.url());
    }
}

#[test]
fn a_reset_tablet_takes_its_journal_back_from_a_peer_before_it_sells_and_every_sale_reaches_every_tablet() {
    let m = Market::new();
    let (mut a, b) = two_tablets(&m);
    let before = trade(&a, &b, "JAM");

    // The tablet is reset: its data directory is gone, its credentials are not.
    a.stop();
    wipe(&m, &a);
    m.start(&mut a, &[&b]);
    let (status, refusal) = a.sell("JAM", 1);
    assert_eq!((status, refusal["error"].as_str()), (503, Some("recovering")), "{refusal}");
    assert!(refusal["message"].as_str().unwrap().contains("journal"), "{refusal}");
    eventually(CONVERGE, "a recovers its journal", || a.journal_state() == "ready");
    assert!(m.log(&a).contains("journal recovered from peers"), "the log says so");

    // It sells its own products again, and every sale is on both tablets.
    let (status, sale) = a.sell("JAM", 1);
    assert_eq!(status, 201, "{sale}");
    let after = sale["id"].as_str().unwrap().to_string();
    eventually(CONVERGE, "the new sale reaches b", || b.sale_ids().contains(&after));
    let expected: BTreeSet<String> = [before, after].into();
    assert_eq!(a.sale_ids(), expected);
    assert_eq!(b.sale_ids(), expected);
    assert_eq!(a.get("/api/v1/stock")["stock"][0]["total"], 7, "{}", a.get("/api/v1/stock"));
    no_forks_anywhere(&[&a, &b]);
}

#[test]
fn a_reset_tablet_with_no_peer_in_reach_refuses_to_sell_until_one_appears() {
    let m = Market::new();
    let (mut a, mut b) = two_tablets(&m);
    let before = trade(&a, &b, "TEA");
    // Received changes are made durable within a mesh tick (250 ms); b is killed, not stopped.
    std::thread::sleep(Duration::from_secs(1));
    b.stop();
    a.stop();
    wipe(&m, &a);

    m.start(&mut a, &[&b]);
    std::thread::sleep(Duration::from_secs(4));
    let (status, refusal) = a.sell("TEA", 1);
    assert_eq!((status, refusal["error"].as_str()), (503, Some("recovering")), "{refusal}");
    let message = refusal["message"].as_str().unwrap();
    assert!(message.contains("waiting to reach another tablet") && message.contains("enrol this tablet afresh"), "{message}");
    assert_eq!(a.journal_state(), "recovering");
    assert!(a.get("/api/v1/status")["heads"].as_object().unwrap().is_empty(), "nothing was written while alone");

    m.start(&mut b, &[&a]);
    eventually(CONVERGE, "a recovers once b is in reach", || a.journal_state() == "ready");
    let (status, sale) = a.sell("TEA", 1);
    assert_eq!(status, 201, "{sale}\n{}", m.log(&a));
    let after = sale["id"].as_str().unwrap().to_string();
    eventually(CONVERGE, "the new sale reaches b", || b.sale_ids().contains(&after));
    assert_eq!(b.sale_ids(), [before, after].into());
    no_forks_anywhere(&[&a, &b]);
}

#[test]
fn a_tablet_whose_store_is_damaged_sets_it_aside_and_rebuilds_from_its_peer() {
    let m = Market::new();
    let (mut a, b) = two_tablets(&m);
    let before = trade(&a, &b, "HNY");
    a.stop();
    let store = m.path("a-data").join("stallmesh.redb");
    let creds = stallmesh_identity::files::load_device(&m.path("a")).unwrap();
    let owner = stallmesh_store::Owner { market: creds.market.market_id, device: creds.key.device_id() };
    std::fs::write(&store, damaged(&std::fs::read(&store).unwrap(), &m.path("probe.redb"), owner)).unwrap();

    m.start(&mut a, &[&b]);
    let status = a.get("/api/v1/status");
    assert!(status["store_set_aside"]["moved_to"].as_str().is_some_and(|p| m.path(p).exists()), "kept: {status}");
    eventually(CONVERGE, "a rebuilds its journal from b", || a.journal_state() == "ready");
    let (code, sale) = a.sell("HNY", 1);
    assert_eq!(code, 201, "{sale}");
    let after = sale["id"].as_str().unwrap().to_string();
    eventually(CONVERGE, "the new sale reaches b", || b.sale_ids().contains(&after));
    assert_eq!(a.sale_ids(), [before, after].into());
    no_forks_anywhere(&[&a, &b]);
}

#[test]
fn a_tablet_switched_off_half_way_through_a_recovery_finishes_it_before_selling() {
    let m = Market::new();
    let (mut a, b) = two_tablets(&m);
    trade(&a, &b, "OIL");
    a.stop();
    // Left behind by a recovery cut short by a power cut: the store may hold only part of the journal.
    let marker = m.path("a").join("journal.recovering");
    std::fs::write(&marker, "").unwrap();
    m.start(&mut a, &[&b]);
    let status = a.get("/api/v1/status");
    assert_eq!(status["journal"]["recovery"]["cause"], "interrupted", "{status}");
    assert_eq!(a.sell("OIL", 1).0, 503);
    eventually(CONVERGE, "a finishes the recovery", || a.journal_state() == "ready");
    assert!(!marker.exists(), "the marker goes once the journal is back");
    assert_eq!(a.sell("OIL", 1).0, 201);
    no_forks_anywhere(&[&a, &b]);
}

/// `good` with the first 4 KiB page whose zeroing the store's own check reports as damage zeroed.
fn damaged(good: &[u8], probe: &Path, owner: stallmesh_store::Owner) -> Vec<u8> {
    const PAGE: usize = 4096;
    for page in 1..good.len() / PAGE {
        let mut bad = good.to_vec();
        bad[page * PAGE..(page + 1) * PAGE].fill(0);
        std::fs::write(probe, &bad).unwrap();
        if matches!(stallmesh_store::Store::check(probe, owner), Err(stallmesh_store::StoreError::Corrupt { .. })) {
            return bad;
        }
    }
    panic!("no page of the store is detected as damage when zeroed");
}

/// Every change listed for `device` in a tablet's equivocation listing: (seq, digest) and the sales.
/// (seq, digest) of every change, and (seq, SKU) of every sale.
type Listing = (BTreeSet<(u64, String)>, BTreeSet<(u64, String)>);

fn listed(t: &Tablet, device: &str) -> Listing {
    let listing = t.get("/api/v1/equivocations");
    let mut changes = BTreeSet::new();
    let mut sales = BTreeSet::new();
    for d in listing["devices"].as_array().unwrap().iter().filter(|d| d["device"] == device) {
        for p in d["positions"].as_array().unwrap() {
            let seq = p["seq"].as_u64().unwrap();
            for c in p["held"]
                .as_object()
                .into_iter()
                .map(|o| Value::Object(o.clone()))
                .chain(p["conflicting"].as_array().unwrap().iter().cloned())
            {
                changes.insert((seq, c["digest"].as_str().unwrap().to_string()));
                if c["event"]["kind"] == "sale" {
                    sales.insert((seq, c["event"]["lines"][0]["sku"].as_str().unwrap().to_string()));
                }
            }
        }
    }
    (changes, sales)
}

#[test]
fn two_tablets_started_with_the_same_credentials_are_detected_and_both_histories_sales_are_shown() {
    let m = Market::new();
    let mut b = m.tablet("b", "b-data");
    let mut x = m.tablet("clone", "x-data");
    copy_dir(&m.path("clone"), &m.path("clone-copy"));
    let mut y = m.tablet("clone-copy", "y-data");
    // Both copies start, and sell, before the market's Wi-Fi reaches them (b is not up yet).
    m.start(&mut x, &[&b]);
    m.start(&mut y, &[&b]);
    let device = x.get("/api/v1/status")["node"]["device"].as_str().unwrap().to_string();
    assert_eq!(y.get("/api/v1/status")["node"]["device"], device.as_str());
    for (t, sku) in [(&x, "JAM"), (&y, "TEA")] {
        let p = json!({ "sku": sku, "name": sku, "price_cents": 300, "currency": "EUR", "stall": "Stall" });
        assert_eq!(t.post("/api/v1/products", &p).0, 201);
        assert_eq!(t.post("/api/v1/restocks", &json!({ "sku": sku, "qty": 5 })).0, 201);
        assert_eq!(t.sell(sku, 1).0, 201);
    }
    m.start(&mut b, &[&x, &y]);

    // The market's other tablet holds one history and keeps the other as evidence, sales included.
    let detected = std::panic::catch_unwind(|| {
        eventually(CONVERGE, "b lists both histories' sales", || {
            let (_, sales) = listed(&b, &device);
            sales.iter().any(|(_, s)| s == "JAM") && sales.iter().any(|(_, s)| s == "TEA")
        })
    });
    assert!(detected.is_ok(), "listing {}\nb:\n{}\nx:\n{}\ny:\n{}", b.get("/api/v1/equivocations"), m.log(&b), m.log(&x), m.log(&y));
    assert!(b.metric("stallmesh_equivocations_total") > 0.0);
    let status = b.get("/api/v1/status");
    assert!(status["equivocations"].as_u64() > Some(0), "{status}");
    // (That a copy which sees the other history stops recording is the ledger's own test: both
    // copies share one peer id, so which of them, if any, the mesh carries it to is up to libp2p.)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}
