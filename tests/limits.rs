//! Queues filled to their limits, on a real node: each limit gives its error and its metric, and
//! nothing hangs. (The inference queue's limit is `a_full_inference_queue_answers_busy_at_once` in
//! `tests/inference_api.rs`; the mesh command queue's is a unit test in `node/src/mesh.rs`.)

mod support;

use serde_json::json;
use stallmesh_identity::{files, DeviceKey, SignedChange};
use stallmesh_ledger::{MAX_PENDING_CHANGES, MAX_PENDING_PER_UNENROLLED};
use support::{enrol_as, TestNode};

#[test]
fn a_full_pending_buffer_refuses_more_waiting_changes_with_pending_full_and_the_node_still_sells() {
    let dir = tempfile::tempdir().unwrap();
    let (creds, _) = enrol_as(dir.path(), "tablet-1", "Stall", stallmesh_identity::Role::Organiser);
    let node = TestNode::start(&dir.path().join("data"), &creds).unwrap();
    let market = files::load_device(&creds).unwrap().market.market_id;
    let product = json!({ "sku": "JAM", "name": "Jam", "price_cents": 400, "currency": "EUR", "stall": "Stall" });
    assert_eq!(node.post("/api/v1/products", &product).0, 201);
    assert_eq!(node.post("/api/v1/restocks", &json!({ "sku": "JAM", "qty": 10 })).0, 201);

    // Changes of devices whose enrolment never arrived: each waits for its predecessors. Spread
    // over enough devices that no one device reaches its own, smaller, limit first.
    let per_device = MAX_PENDING_PER_UNENROLLED as u64 - 6;
    let devices = MAX_PENDING_CHANGES.div_ceil(per_device as usize);
    let mut waiting: Vec<SignedChange> = Vec::new();
    for _ in 0..devices {
        let key = DeviceKey::generate().unwrap();
        waiting.extend((1..=per_device).map(|seq| key.sign_change(market, seq, vec![], vec![0])));
    }
    let (fits, over) = waiting.split_at(MAX_PENDING_CHANGES);
    let mut held = 0;
    for batch in fits.chunks(5_000) {
        let (status, report) = node.post_bytes("/api/v1/changes", &postcard::to_allocvec(&batch.to_vec()).unwrap());
        assert_eq!(status, 200, "{report}");
        assert!(report["rejected"].as_array().unwrap().is_empty(), "{report}");
        held = report["pending"].as_u64().unwrap();
    }
    assert_eq!(held as usize, MAX_PENDING_CHANGES, "the buffer holds up to its limit");

    // One more waiting change: refused at once, named, counted.
    let one_more = vec![over.first().cloned().unwrap_or_else(|| DeviceKey::generate().unwrap().sign_change(market, 1, vec![], vec![0]))];
    let (status, report) = node.post_bytes("/api/v1/changes", &postcard::to_allocvec(&one_more).unwrap());
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["rejected"][0]["reason"], "pending_full", "{report}");
    assert_eq!(report["pending"], MAX_PENDING_CHANGES, "{report}");
    assert_eq!(node.metric("stallmesh_verification_failures_total{reason=\"pending_full\"}"), 1.0);
    assert_eq!(node.metric("stallmesh_pending_changes"), MAX_PENDING_CHANGES as f64);
    assert_eq!(node.get("/api/v1/status").1["pending_changes"], MAX_PENDING_CHANGES);

    // The till is not held up by a full buffer.
    let (status, sale) = node.post("/api/v1/sales", &json!({ "lines": [{ "sku": "JAM", "qty": 1 }] }));
    assert_eq!(status, 201, "{sale}");
}
