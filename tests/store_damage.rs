//! A node whose store file is damaged: it sets the file aside (kept, not deleted), starts with an
//! empty store, says so on `/api/v1/status` and `/healthz`, and never answers 500.

mod support;

use serde_json::{json, Value};
use stallmesh_identity::files;
use stallmesh_store::{Owner, Store, StoreError};
use std::path::{Path, PathBuf};
use support::{enrol, TestNode};

const PAGE: usize = 4096;

fn honey() -> Value {
    json!({ "sku": "HNY-500", "name": "Organic honey 500g jar", "price_cents": 850, "currency": "EUR", "stall": "Honey", "tags": ["honey"] })
}

fn owner(creds: &Path) -> Owner {
    let c = files::load_device(creds).unwrap();
    Owner { market: c.market.market_id, device: c.key.device_id() }
}

/// The store bytes with the first page whose zeroing the store's check reports as damage zeroed.
fn damage(good: &[u8], dir: &Path, owner: Owner) -> Vec<u8> {
    let probe = dir.join("probe.redb");
    for page in 1..good.len() / PAGE {
        let mut bad = good.to_vec();
        bad[page * PAGE..(page + 1) * PAGE].fill(0);
        std::fs::write(&probe, &bad).unwrap();
        if matches!(Store::check(&probe, owner), Err(StoreError::Corrupt { .. })) {
            std::fs::remove_file(&probe).unwrap();
            return bad;
        }
    }
    panic!("no page of the store is detected as damage when zeroed");
}

fn set_aside_files(data: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("stallmesh.redb.damaged-"))
        .collect()
}

#[test]
fn a_node_on_a_damaged_store_sets_it_aside_reports_it_and_never_answers_500() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (creds, _) = enrol(dir.path(), "tablet-1", "Honey");
    {
        let node = TestNode::start(&data, &creds).unwrap();
        assert_eq!(node.post("/api/v1/products", &honey()).0, 201);
        assert_eq!(node.post("/api/v1/restocks", &json!({ "sku": "HNY-500", "qty": 100 })).0, 201);
        for _ in 0..40 {
            assert_eq!(node.post("/api/v1/sales", &json!({ "lines": [{ "sku": "HNY-500", "qty": 1 }] })).0, 201);
        }
        node.stop();
    }
    let store = data.join("stallmesh.redb");
    let bad = damage(&std::fs::read(&store).unwrap(), dir.path(), owner(&creds));
    std::fs::write(&store, &bad).unwrap();

    let node = TestNode::start(&data, &creds).expect("a damaged store does not stop the node");
    let aside = set_aside_files(&data);
    assert_eq!(aside.len(), 1, "{aside:?}");
    let (status, s) = node.get("/api/v1/status");
    assert_eq!(status, 200, "{s}");
    assert_eq!(s["store_set_aside"]["moved_to"], json!(aside[0]), "{s}");
    assert!(!s["store_set_aside"]["reason"].as_str().unwrap_or("").is_empty(), "{s}");
    assert_eq!(s["sales"], 0, "starts empty, to recover from its peers");
    let (status, h) = node.get("/healthz");
    assert_eq!(status, 200, "{h}");
    assert_eq!(h["store_set_aside"]["moved_to"], json!(aside[0]), "{h}");

    // It records nothing until a peer gives its journal back (this node has no mesh, so none
    // will): every write is refused with a 503 that says why, and nothing answers 500.
    assert_eq!(s["journal"]["state"], "recovering", "{s}");
    let (status, refusal) = node.post("/api/v1/sales", &json!({ "lines": [{ "sku": "HNY-500", "qty": 1 }] }));
    assert_eq!((status, refusal["error"].as_str()), (503, Some("recovering")), "{refusal}");
    assert!(refusal["message"].as_str().unwrap().contains("damaged and set aside"), "{refusal}");
    let mut statuses = vec![node.post("/api/v1/products", &honey()).0];
    statuses.push(node.post("/api/v1/restocks", &json!({ "sku": "HNY-500", "qty": 5 })).0);
    statuses.push(node.get("/healthz").0);
    statuses.push(node.get("/api/v1/sales").0);
    assert_eq!(statuses, [503, 503, 200, 200]);
    node.stop();
    assert!(std::fs::read(&aside[0]).unwrap() == bad, "the set-aside file is kept as it was found");

    // A restart sets nothing more aside, and still waits for the journal rather than start anew.
    let node = TestNode::start(&data, &creds).unwrap();
    let (_, s) = node.get("/api/v1/status");
    assert_eq!((s["sales"].clone(), s["store_set_aside"].clone()), (json!(0), Value::Null), "{s}");
    assert_eq!(s["journal"]["state"], "recovering", "{s}");
    assert_eq!(set_aside_files(&data).len(), 1);
}
