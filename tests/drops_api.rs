//! Drops through the HTTP API: a real organiser node (real HTTP on loopback, real redb file) and
//! an online-channel device of the same market, whose own real ledger exchanges signed changes
//! with the node through `/api/v1/changes`.

mod support;

use serde_json::{json, Value};
use stallmesh_identity::{DeviceKey, Role, SignedChange};
use stallmesh_ledger::{Ledger, LineRequest, LocalOp, MarketContext};
use support::{enrol_as, TestNode};

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// The organiser's tablet with two products, and the market's online channel (its ledger here)
/// known to the tablet.
fn market(dir: &std::path::Path) -> (TestNode, Ledger) {
    let (creds, market_key) = enrol_as(dir, "office", "Office", Role::Organiser);
    let node = TestNode::start(&dir.join("data"), &creds).unwrap();
    for (sku, name) in [("TOTE", "Summer tote"), ("CAP", "Numbered cap")] {
        let p = json!({ "sku": sku, "name": name, "price_cents": 3500, "currency": "EUR", "stall": "Office" });
        assert_eq!(node.post("/api/v1/products", &p).0, 201);
    }
    let key = DeviceKey::generate().unwrap();
    let certificate = market_key.enrol(key.device_id(), "online", Role::Online, u64::MAX);
    let mut online = Ledger::new(MarketContext::new(market_key.public()), key, certificate);
    let enrolment = online.enrol_self(now_ms()).unwrap().unwrap();
    push(&node, vec![enrolment.change]);
    (node, online)
}

fn push(node: &TestNode, changes: Vec<SignedChange>) {
    let (status, report) = node.send_bytes("POST", "/api/v1/changes", "application/octet-stream", &postcard::to_allocvec(&changes).unwrap());
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["rejected"], json!([]), "{report}");
}

/// What the node holds of `device`'s journal, for the online ledger to apply.
fn pull(node: &TestNode, device: &str) -> Vec<SignedChange> {
    let resp = ureq::get(&format!("{}/api/v1/changes?device={device}&from=0", node.base)).call().unwrap();
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut resp.into_reader(), &mut bytes).unwrap();
    postcard::from_bytes(&bytes).unwrap()
}

fn me(node: &TestNode) -> String {
    node.get("/api/v1/status").1["node"]["device"].as_str().unwrap().to_string()
}

fn sell(node: &TestNode, sku: &str, qty: u64) -> (u16, Value) {
    node.post("/api/v1/sales", &json!({ "lines": [{ "sku": sku, "qty": qty }] }))
}

fn channel<'a>(drop: &'a Value, device: &str) -> &'a Value {
    drop["channels"].as_array().unwrap().iter().find(|c| c["device"] == device).unwrap_or_else(|| panic!("{device} in {drop}"))
}

#[test]
fn a_scheduled_drop_gives_each_channel_its_share_and_nothing_of_it_sells_before_it_opens() {
    let dir = tempfile::tempdir().unwrap();
    let (node, online) = market(dir.path());
    let (office, web) = (me(&node), online.device().to_hex());
    let start_ms = now_ms() + 3_600_000;
    let plan = json!([{ "device": office, "units": 30 }, { "device": web, "units": 20 }]);
    let (status, drop) = node.post("/api/v1/drops", &json!({ "name": "Summer tote", "sku": "TOTE", "units": 50, "start_ms": start_ms, "plan": plan }));
    assert_eq!(status, 201, "{drop}");
    assert_eq!((drop["status"].as_str(), drop["units"].as_u64(), drop["left"].as_u64()), (Some("scheduled"), Some(50), Some(50)));
    assert!(drop["opens_in_ms"].as_u64().unwrap() > 3_500_000, "{drop}");
    assert_eq!((channel(&drop, &office)["held"].as_u64(), channel(&drop, &web)["planned"].as_u64()), (Some(30), Some(20)));
    assert_eq!(channel(&drop, &web)["role"], "online");

    let (status, err) = sell(&node, "TOTE", 1);
    assert_eq!((status, err["error"].as_str()), (409, Some("drop_not_started")), "{err}");
    assert_eq!(node.get("/api/v1/sales").1["summary"]["sales"], 0, "a refused sale records nothing");
    let listed = node.get("/api/v1/drops").1;
    assert_eq!(listed["drops"].as_array().unwrap().len(), 1);
    let (status, shown) = node.get(&format!("/api/v1/drops/{}", drop["id"].as_str().unwrap()));
    assert_eq!((status, &shown["name"]), (200, &json!("Summer tote")));
    assert_eq!(node.get("/api/v1/drops/nope-1").0, 404);
}

#[test]
fn an_open_drop_sells_what_each_channel_holds_and_reports_sell_through_per_channel_until_sold_out() {
    let dir = tempfile::tempdir().unwrap();
    let (node, mut online) = market(dir.path());
    let (office, web) = (me(&node), online.device().to_hex());
    let plan = json!([{ "device": office, "units": 3 }, { "device": web, "units": 2 }]);
    let (status, drop) = node.post("/api/v1/drops", &json!({ "name": "Caps", "sku": "CAP", "units": 5, "start_ms": now_ms() - 1_000, "plan": plan }));
    assert_eq!(status, 201, "{drop}");
    assert_eq!(drop["status"], "open");
    let id = drop["id"].as_str().unwrap().to_string();

    assert_eq!(sell(&node, "CAP", 3).0, 201);
    let (status, err) = sell(&node, "CAP", 1);
    assert_eq!((status, err["error"].as_str()), (409, Some("insufficient_stock_rights")), "the tablet sells only its share: {err}");
    assert_eq!(err["details"]["held_elsewhere"][&web], 2, "{err}");

    // The online channel takes the drop in, sells its two, and its sale reaches the tablet.
    online.apply_remote(pull(&node, &office));
    let line = LineRequest { sku: "CAP".into(), qty: 2 };
    let sale = online.record(LocalOp::Sell { lines: vec![line], client_ref: None, recommendation: None, loyalty: None, staff: None }, now_ms()).unwrap();
    push(&node, vec![sale.change]);

    let d = node.get(&format!("/api/v1/drops/{id}")).1;
    assert_eq!((d["status"].as_str(), d["sold"].as_u64(), d["left"].as_u64()), (Some("sold_out"), Some(5), Some(0)), "{d}");
    assert_eq!((channel(&d, &office)["sold"].as_u64(), channel(&d, &web)["sold"].as_u64()), (Some(3), Some(2)));
    assert!(d["sold_out_at_ms"].as_u64().is_some(), "{d}");
}

#[test]
fn a_plan_that_does_not_add_up_or_names_a_stranger_is_refused_and_records_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (node, online) = market(dir.path());
    let (office, web) = (me(&node), online.device().to_hex());
    let body = |plan: Value| json!({ "name": "Caps", "sku": "CAP", "units": 5, "start_ms": 0, "plan": plan });
    let cases = [
        (json!([{ "device": office, "units": 3 }, { "device": web, "units": 1 }]), 422, "invalid_input"),
        (json!([{ "device": "ab".repeat(32), "units": 5 }]), 422, "unknown_device"),
        (json!([{ "device": "not hex", "units": 5 }]), 422, "invalid_body"),
        (json!([]), 422, "invalid_input"),
    ];
    for (plan, status, code) in cases {
        let (got, err) = node.post("/api/v1/drops", &body(plan.clone()));
        assert_eq!((got, err["error"].as_str()), (status, Some(code)), "{plan}: {err}");
    }
    let (got, err) = node.post("/api/v1/drops", &json!({ "name": "Caps", "sku": "CAP", "units": 5, "start_ms": 0, "plan": [], "extra": 1 }));
    assert_eq!(got, 422, "unknown keys are refused: {err}");
    assert_eq!(node.get("/api/v1/drops").1["drops"], json!([]));
}

#[test]
fn only_an_organisers_device_plans_a_drop() {
    let dir = tempfile::tempdir().unwrap();
    let (creds, _) = enrol_as(dir.path(), "stall", "Totes", Role::Seller);
    let node = TestNode::start(&dir.path().join("data"), &creds).unwrap();
    let p = json!({ "sku": "TOTE", "name": "Tote", "price_cents": 3500, "currency": "EUR", "stall": "Totes" });
    assert_eq!(node.post("/api/v1/products", &p).0, 201);
    let plan = json!([{ "device": me(&node), "units": 5 }]);
    let (status, err) = node.post("/api/v1/drops", &json!({ "name": "Tote", "sku": "TOTE", "units": 5, "start_ms": 0, "plan": plan }));
    assert_eq!((status, err["error"].as_str()), (403, Some("role_forbids")), "{err}");
}
