//! On-device inference through a real node's HTTP API, with the real pinned models from `models/`:
//! hybrid search, photos and visual search, recommendations with the A/B record, degraded modes.

mod support;

use serde_json::{json, Value};
use stallmesh_identity::Role;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::{enrol_as, TestNode};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn catalogue() -> Vec<Value> {
    serde_json::from_slice(&std::fs::read(repo().join("tests/data/market-catalogue.json")).unwrap()).unwrap()
}

fn photo(name: &str) -> Vec<u8> {
    std::fs::read(repo().join("models/images").join(name)).unwrap()
}

/// An organiser's node (it may edit every stall's catalogue) holding the market catalogue.
fn market_node(dir: &Path, tweak: impl FnOnce(&mut stallmesh_node::Config)) -> TestNode {
    let (creds, _) = enrol_as(dir, "organiser", "Market Office", Role::Organiser);
    let node = TestNode::start_with(&dir.join("data"), &creds, tweak).unwrap();
    for p in catalogue() {
        let (status, body) = node.post("/api/v1/products", &p);
        assert_eq!(status, 201, "{body}");
    }
    node
}

fn health(node: &TestNode) -> Value {
    node.get("/healthz").1
}

/// Waits until every product has its text embedding and `photos` products have a photo embedding.
fn wait_indexed(node: &TestNode, products: u64, photos: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let h = health(node);
        let index = &h["inference"]["index"];
        if index["products"] == products && index["embedded"] == products && index["with_photo"] == photos {
            return;
        }
        assert!(Instant::now() < deadline, "index not ready: {h}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn skus(body: &Value, key: &str) -> Vec<String> {
    body[key].as_array().unwrap().iter().map(|h| h["sku"].as_str().unwrap().to_string()).collect()
}

#[test]
fn search_finds_products_by_meaning_and_an_exact_sku_first() {
    let dir = tempfile::tempdir().unwrap();
    let node = market_node(dir.path(), |_| {});
    let n = catalogue().len() as u64;
    wait_indexed(&node, n, 0);
    let h = health(&node);
    assert_eq!(h["inference"]["state"], "ready");
    assert!(h["inference"]["models"].as_array().unwrap().iter().all(|m| m["loaded"] == true), "{h}");

    let (status, body) = node.get("/api/v1/search?q=raw%20honey&k=5");
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["mode"], "hybrid");
    assert!(body["hits"].as_array().unwrap().iter().any(|h| h["name"] == "Organic honey 500g jar"), "{body}");
    assert!(skus(&body, "hits")[0].starts_with("HON-"), "{body}");
    assert_eq!(body["query_embedding_cached"], false);
    // The same words again (another case, other spacing) skip the model and rank the same.
    let (_, again) = node.get("/api/v1/search?q=Raw%20%20HONEY&k=5");
    assert_eq!(again["query_embedding_cached"], true);
    assert_eq!(skus(&again, "hits"), skus(&body, "hits"));

    // Words the catalogue never uses: only the model can connect them.
    let (_, body) = node.get("/api/v1/search?q=shrimp");
    let top3 = &skus(&body, "hits")[..3];
    assert!(top3.contains(&"FSH-PRAWN".to_string()) && top3.iter().all(|s| s.starts_with("FSH-")), "{body}");

    let (_, body) = node.get("/api/v1/search?q=cer-mug");
    assert_eq!((skus(&body, "hits")[0].as_str(), &body["hits"][0]["exact"]), ("CER-MUG", &json!("sku")));

    assert_eq!(node.get("/api/v1/search").1["error"], "missing_query");
    assert_eq!(node.get("/api/v1/search?q=%20%20").1["error"], "missing_query");
    let (status, body) = node.get(&format!("/api/v1/search?q={}", "a".repeat(300)));
    assert_eq!((status, body["error"].as_str()), (422, Some("query_too_long")));
    assert_eq!(node.get("/api/v1/search?q=honey&k=0").1["error"], "invalid_input");
    assert!(node.metric("stallmesh_search_requests_total{outcome=\"hybrid\"}") >= 3.0);
}

#[test]
fn embeddings_of_products_and_photos_are_cached_so_a_restart_does_not_recompute_them() {
    let dir = tempfile::tempdir().unwrap();
    let node = market_node(dir.path(), |_| {});
    let (status, _) = node.send_bytes("PUT", "/api/v1/products/COF-BEANS/photo", "image/png", &photo("coffee.png"));
    assert_eq!(status, 201);
    let n = catalogue().len() as u64;
    wait_indexed(&node, n, 1);
    assert!(node.metric("stallmesh_inference_completed_total") >= (n / 10) as f64, "embedded on the pool");
    let node = node.restart();
    wait_indexed(&node, n, 1);
    assert_eq!(node.metric("stallmesh_inference_completed_total"), 0.0, "every embedding came from the cache");
}

/// A crop, a mirror and a brightness change, as a customer's phone photo of the product would differ.
fn augment(png_or_jpeg: &[u8]) -> Vec<u8> {
    let img = image::load_from_memory(png_or_jpeg).unwrap().to_rgb8();
    let (w, h) = img.dimensions();
    let crop = image::imageops::crop_imm(&img, w / 10, h / 8, w * 3 / 4, h * 3 / 4).to_image();
    let mirrored = image::imageops::flip_horizontal(&crop);
    let brighter = image::imageops::colorops::brighten(&mirrored, 30);
    let mut out = std::io::Cursor::new(Vec::new());
    brighter.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

#[test]
fn visual_search_finds_the_product_from_an_augmented_photo_on_another_device_too() {
    let dir = tempfile::tempdir().unwrap();
    let node = market_node(dir.path(), |_| {});
    // Models loaded and the catalogue embedded; from here a photo is searchable as soon as its
    // upload returns.
    wait_indexed(&node, catalogue().len() as u64, 0);
    for (sku, file) in
        [("COF-BEANS", "coffee.png"), ("PET-CATNIP", "chelsea.png"), ("PAP-PRINT", "rocket.jpg"), ("PAP-CARD", "astronaut.png")]
    {
        let (status, body) = node.send_bytes("PUT", &format!("/api/v1/products/{sku}/photo"), "image/png", &photo(file));
        assert_eq!(status, 201, "{body}");
        assert!(body["photo_bytes"].as_u64().unwrap() <= stallmesh_ledger::MAX_PHOTO_BYTES as u64);
    }
    let stored = node.get_bytes("/api/v1/products/COF-BEANS/photo");
    assert_eq!(&stored[..3], &[0xFF, 0xD8, 0xFF], "kept as a small JPEG");
    assert_eq!(health(&node)["inference"]["index"]["with_photo"], 4, "every photo indexed when its upload returned");

    let top = |node: &TestNode, bytes: &[u8]| {
        let (status, body) = node.send_bytes("POST", "/api/v1/search/image?k=3", "image/jpeg", bytes);
        assert_eq!(status, 200, "{body}");
        skus(&body, "hits")[0].clone()
    };
    assert_eq!(top(&node, &photo("coffee_aug.jpg")), "COF-BEANS");
    assert_eq!(top(&node, &photo("chelsea_aug.jpg")), "PET-CATNIP");
    assert_eq!(top(&node, &augment(&photo("rocket.jpg"))), "PAP-PRINT");
    assert_eq!(top(&node, &augment(&photo("astronaut.png"))), "PAP-CARD");

    // The photos are journal entries: a second device that receives them embeds them itself.
    let (creds2, _) = enrol_as(dir.path(), "till-2", "Market Office", Role::Organiser);
    let other = TestNode::start(&dir.path().join("data2"), &creds2).unwrap();
    let device = node.get("/api/v1/status").1["node"]["device"].as_str().unwrap().to_string();
    let changes = node.get_bytes(&format!("/api/v1/changes?device={device}&from=0"));
    let (status, body) = other.post_bytes("/api/v1/changes", &changes);
    assert_eq!(status, 200, "{body}");
    wait_indexed(&other, catalogue().len() as u64, 4);
    assert_eq!(top(&other, &photo("coffee_aug.jpg")), "COF-BEANS");

    // Bad images: a precise 4xx each, and nothing attached.
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (vec![], 400, "empty_image"),
        (b"GIF89a this is no photo".to_vec(), 415, "unsupported_image_format"),
        (photo("chelsea.png")[..5_000].to_vec(), 422, "corrupt_image"),
        (vec![0u8; stallmesh_inference::MAX_IMAGE_BYTES + 1], 413, "image_too_large"),
    ];
    for (bytes, status, code) in cases {
        let (s, body) = node.send_bytes("POST", "/api/v1/search/image", "image/jpeg", &bytes);
        assert_eq!((s, body["error"].as_str()), (status, Some(code)), "{body}");
        let (s, body) = node.send_bytes("PUT", "/api/v1/products/DAI-MILK/photo", "image/jpeg", &bytes);
        assert_eq!((s, body["error"].as_str()), (status, Some(code)), "{body}");
    }
    let (s, body) = node.send_bytes("PUT", "/api/v1/products/NOPE/photo", "image/png", &photo("coffee.png"));
    assert_eq!((s, body["error"].as_str()), (404, Some("unknown_sku")));
    assert_eq!(health(&node)["inference"]["index"]["with_photo"], 4);
}

#[test]
fn recommendations_put_the_known_co_purchase_first_and_sales_record_what_was_shown() {
    let dir = tempfile::tempdir().unwrap();
    let node = market_node(dir.path(), |c| c.inference.treatment_percent = 50);
    for sku in ["BRD-SOUR", "DAI-BUTTER", "JAM-STRAW", "SOA-LAV", "CHE-CHED"] {
        assert_eq!(node.post("/api/v1/restocks", &json!({"sku": sku, "qty": 100})).0, 201);
    }
    let sell = |lines: &[&str], rec: Option<&Value>| {
        let lines: Vec<Value> = lines.iter().map(|s| json!({"sku": s, "qty": 1})).collect();
        let mut body = json!({ "lines": lines });
        if let Some(r) = rec {
            body["recommendation"] = r.clone();
        }
        let (status, sale) = node.post("/api/v1/sales", &body);
        assert_eq!(status, 201, "{sale}");
        sale
    };
    for _ in 0..8 {
        sell(&["BRD-SOUR", "DAI-BUTTER"], None);
    }
    for _ in 0..3 {
        sell(&["BRD-SOUR", "JAM-STRAW"], None);
    }
    for _ in 0..5 {
        sell(&["SOA-LAV"], None);
    }
    // A sale counts as soon as the request that made it returned: no waiting, no polling.
    let (status, recs) = node.get("/api/v1/recommendations?basket=BRD-SOUR&k=3&session=s-treat");
    assert_eq!(status, 200, "{recs}");
    assert_eq!(recs["record"]["skus"][0], "DAI-BUTTER", "{recs}");
    assert_eq!(recs["record"]["skus"][1], "JAM-STRAW", "{recs}");
    assert!(!recs["record"]["skus"].as_array().unwrap().contains(&json!("SOA-LAV")), "never bought with bread");

    // Sessions are split between the arms; the control arm is shown nothing but still recorded.
    let arm_of = |session: &str| node.get(&format!("/api/v1/recommendations?basket=BRD-SOUR&session={session}")).1;
    let (mut treated, mut control) = (None, None);
    for i in 0..64 {
        let body = arm_of(&format!("customer-{i}"));
        match body["arm"].as_str().unwrap() {
            "treatment" => treated = treated.or(Some(body)),
            _ => control = control.or(Some(body)),
        }
    }
    let (treated, control) = (treated.expect("a treatment session"), control.expect("a control session"));
    assert_eq!(skus(&treated, "recommendations")[0], "DAI-BUTTER");
    assert!(control["recommendations"].as_array().unwrap().is_empty());
    assert_eq!(arm_of("customer-7")["arm"], arm_of("customer-7")["arm"], "a session keeps its arm");

    // The treated customer takes the butter; the control customer buys bread only.
    let sale = sell(&["BRD-SOUR", "DAI-BUTTER"], Some(&treated["record"]));
    assert_eq!(sale["recommendation"]["arm"], "treatment");
    sell(&["BRD-SOUR"], Some(&control["record"]));
    let (_, lift) = node.get("/api/v1/recommendations/lift");
    assert_eq!(lift["treatment"], json!({"sales": 1, "converted": 1, "conversion_rate": 1.0}), "{lift}");
    assert_eq!(lift["control"]["converted"], 0, "{lift}");

    assert_eq!(node.get("/api/v1/recommendations").1["error"], "missing_basket");
    assert_eq!(node.get("/api/v1/recommendations?basket=NOPE").1["error"], "unknown_sku");
    let bad = json!({"lines": [{"sku": "BRD-SOUR", "qty": 1}], "recommendation": {"arm": "sometimes", "skus": []}});
    assert_eq!(node.post("/api/v1/sales", &bad).1["error"], "invalid_input");
}

#[test]
fn without_its_models_a_node_still_starts_and_searches_by_words() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("no-models");
    std::fs::create_dir_all(&empty).unwrap();
    let node = market_node(dir.path(), |c| c.inference.models_dir = empty.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    while health(&node)["inference"]["state"] != "ready" {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    let h = health(&node);
    assert_eq!(h["status"], "ok");
    for m in h["inference"]["models"].as_array().unwrap() {
        assert_eq!(m["loaded"], false);
        assert!(m["error"].as_str().unwrap().contains("cannot read"), "{h}");
    }
    wait_until(|| health(&node)["inference"]["index"]["products"] == catalogue().len());
    let (status, body) = node.get("/api/v1/search?q=sourdough");
    assert_eq!((status, body["mode"].as_str()), (200, Some("lexical")));
    assert_eq!(skus(&body, "hits")[0], "BRD-SOUR");
    let (status, body) = node.send_bytes("POST", "/api/v1/search/image", "image/png", &photo("coffee.png"));
    assert_eq!((status, body["error"].as_str()), (503, Some("model_unavailable")), "{body}");
}

fn wait_until(cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "condition not met in 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_full_inference_queue_answers_busy_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (creds, _) = enrol_as(dir.path(), "organiser", "Market Office", Role::Organiser);
    let node = TestNode::start_with(&dir.path().join("data"), &creds, |c| {
        c.inference.workers = 1;
        c.inference.queue_len = 1;
    })
    .unwrap();
    wait_until(|| health(&node)["inference"]["state"] == "ready");
    let base = node.base.clone();
    let bytes = photo("coffee.png");
    // Twelve photos at once against one worker and one queue slot.
    let handles: Vec<_> = (0..12)
        .map(|_| {
            let (base, bytes) = (base.clone(), bytes.clone());
            std::thread::spawn(move || {
                match support::fresh_agent()
                    .post(&format!("{base}/api/v1/search/image"))
                    .set("content-type", "image/png")
                    .send_bytes(&bytes)
                {
                    Ok(r) => (r.status(), Value::Null),
                    Err(ureq::Error::Status(s, r)) => (s, r.into_json().unwrap()),
                    Err(e) => panic!("{e}"),
                }
            })
        })
        .collect();
    let results: Vec<(u16, Value)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let busy = results.iter().filter(|(s, b)| *s == 503 && b["error"] == "inference_busy").count();
    let ok = results.iter().filter(|(s, _)| *s == 200).count();
    assert!(busy >= 1, "some requests must be refused: {results:?}");
    assert!(ok >= 1, "some are served");
    assert_eq!(busy + ok, 12, "nothing else: {results:?}");
    assert!(node.metric("stallmesh_inference_rejected_total") >= busy as f64);
}
