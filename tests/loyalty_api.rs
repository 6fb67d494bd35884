//! Loyalty through the HTTP API, one tablet: real node, real HTTP on loopback, real redb file.
//! (Cards and vouchers across a split Wi-Fi: `tests/loyalty.rs`.)

mod support;

use serde_json::{json, Value};
use stallmesh_identity::files;
use stallmesh_identity::{CardHolderKey, CardId, DeviceKey, MarketKey};
use stallmesh_loyalty::Card;
use support::{enrol, TestNode};

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A tablet of stall "Honey" with 50 jars at €8.50.
fn till(dir: &std::path::Path) -> (TestNode, std::path::PathBuf) {
    let (creds, _) = enrol(dir, "tablet-1", "Honey");
    let node = TestNode::start(&dir.join("data"), &creds).unwrap();
    let honey = json!({ "sku": "HNY-500", "name": "Honey 500g", "price_cents": 850, "currency": "EUR", "stall": "Honey" });
    assert_eq!(node.post("/api/v1/products", &honey).0, 201);
    assert_eq!(node.post("/api/v1/restocks", &json!({ "sku": "HNY-500", "qty": 50 })).0, 201);
    (node, creds)
}

fn sale_with(node: &TestNode, qty: u64, loyalty: Value) -> (u16, Value) {
    node.post("/api/v1/sales", &json!({ "lines": [{ "sku": "HNY-500", "qty": qty }], "loyalty": loyalty }))
}

fn issue(node: &TestNode, body: Value) -> Value {
    let (status, card) = node.post("/api/v1/loyalty/cards", &body);
    assert_eq!(status, 201, "{card}");
    card
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
}

/// A QR text in a URL path.
fn path(text: &str) -> String {
    text.bytes().map(|b| if b.is_ascii_alphanumeric() || b":-._".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

#[test]
fn a_card_is_issued_as_a_qr_code_earns_points_on_sales_and_its_points_are_redeemed_for_a_discount() {
    let dir = tempfile::tempdir().unwrap();
    let (node, _) = till(dir.path());
    let card = issue(&node, json!({}));
    let qr = card["qr_text"].as_str().unwrap();
    assert!(qr.len() <= 250 && qr.starts_with("SMC1:"), "{qr}");
    assert!(card["qr_svg"].as_str().unwrap().contains("<svg"), "a QR image to show or print");

    // Two jars: €17.00 earns 17 points at one point per euro.
    let (status, sale) = sale_with(&node, 2, json!({ "card": qr }));
    assert_eq!(status, 201, "{sale}");
    assert_eq!(sale["loyalty"]["points_earned"], 17);
    let by_id = node.get(&format!("/api/v1/loyalty/cards/{}", card["id"].as_str().unwrap())).1;
    let by_qr = node.get(&format!("/api/v1/loyalty/cards/{}", path(qr))).1;
    assert_eq!(by_id["balance_points"], 17, "{by_id}");
    assert_eq!(by_qr["balance_points"], 17);
    assert_eq!(by_qr["token"]["phone_wallet"], false);
    assert_eq!(by_id["held_here"], 17, "points are held where they were earned");

    // 10 points off the next jar; the sale's total stays the lines' sum, the discount beside it.
    let (status, sale) = sale_with(&node, 1, json!({ "card": qr, "redeem_points": 10 }));
    assert_eq!(status, 201, "{sale}");
    assert_eq!(sale["total_cents"], 850);
    assert_eq!((sale["loyalty"]["points_redeemed"].as_u64(), sale["loyalty"]["discount_cents"].as_u64()), (Some(10), Some(10)));
    assert_eq!(sale["loyalty"]["points_earned"], 7, "the sale earns on the €8.40 paid in money");
    let c = node.get(&format!("/api/v1/loyalty/cards/{}", card["id"].as_str().unwrap())).1;
    assert_eq!((c["balance_points"].as_u64(), c["points_redeemed"].as_u64()), (Some(14), Some(10)), "{c}");

    // More than the balance, on a tablet that sees the whole market: refused, nothing recorded.
    let sales_before = node.get("/api/v1/sales").1["summary"]["sales"].clone();
    let (status, err) = sale_with(&node, 1, json!({ "card": qr, "redeem_points": 15 }));
    assert_eq!(status, 409, "{err}");
    assert_eq!(err["error"], "insufficient_points");
    assert_eq!(err["points"]["held_here"], 14);
    assert_eq!(node.get("/api/v1/sales").1["summary"]["sales"], sales_before);
    assert_eq!(node.get("/api/v1/loyalty/exposures").1["exposures"], json!([]));
}

#[test]
fn forged_altered_expired_other_market_and_malformed_cards_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (node, creds) = till(dir.path());
    let good = issue(&node, json!({}));
    let qr = good["qr_text"].as_str().unwrap();
    let device = files::load_device(&creds).unwrap();
    let market = device.market.market_id;
    let mut altered = Card::from_text(qr).unwrap();
    altered.id.0[0] ^= 1;
    let other_market = Card::issue(&device.key, MarketKey::from_secret([99; 32]).market_id(), CardId([5; 8]), now_ms(), None, None);
    let expired = Card::issue(&device.key, market, CardId([6; 8]), now_ms() - 2 * 86_400_000, Some(now_ms() - 86_400_000), None);
    let stranger = Card::issue(&DeviceKey::from_secret([42; 32]), market, CardId([7; 8]), now_ms(), None, None);
    let cases = [
        (altered.to_text(), 403, "forged_token"),
        (other_market.to_text(), 403, "other_market"),
        (expired.to_text(), 403, "expired_token"),
        (stranger.to_text(), 403, "unknown_issuer"),
        ("SMC1:NOT A CARD".to_string(), 422, "malformed_token"),
        ("hello".to_string(), 422, "malformed_token"),
    ];
    for (text, status, code) in cases {
        let (got, err) = sale_with(&node, 1, json!({ "card": text, "redeem_points": 1 }));
        assert_eq!((got, err["error"].as_str()), (status, Some(code)), "{text}: {err}");
        // Looked up: a card's text is verified the same way (anything else is read as a card id).
        let (got, err) = node.get(&format!("/api/v1/loyalty/cards/{}", path(&text)));
        let expected = if text.starts_with("SMC1:") { (status, Some(code)) } else { (422, Some("invalid_input")) };
        assert_eq!((got, err["error"].as_str()), expected, "{text}: {err}");
    }
    assert_eq!(node.get("/api/v1/sales").1["summary"]["sales"], 0, "no refused card sold anything");
    assert_eq!(node.get("/api/v1/stock").1["stock"][0]["this_device"], 50);
    assert_eq!(node.metric("stallmesh_loyalty_cards_refused_total{reason=\"forged_token\"}"), 2.0, "counted by reason");
}

#[test]
fn a_phone_wallet_card_redeems_only_with_its_answer_to_a_challenge_this_till_showed_once() {
    let dir = tempfile::tempdir().unwrap();
    let (node, _) = till(dir.path());
    let phone = CardHolderKey::from_secret([3; 32]);
    let card = issue(&node, json!({ "holder_public_key": phone.public().iter().map(|b| format!("{b:02x}")).collect::<String>(), "expires_in_days": 365 }));
    assert_eq!(card["phone_wallet"], true);
    let qr = card["qr_text"].as_str().unwrap();
    let id = CardId::from_hex(card["id"].as_str().unwrap()).unwrap();
    // Earning needs no proof (it only adds).
    assert_eq!(sale_with(&node, 4, json!({ "card": qr })).0, 201);
    let (status, err) = sale_with(&node, 1, json!({ "card": qr, "redeem_points": 5 }));
    assert_eq!((status, err["error"].as_str()), (403, Some("holder_proof_missing")), "{err}");

    let challenge = node.get("/api/v1/loyalty/challenge").1["challenge"].as_str().unwrap().to_string();
    let bytes = unhex(&challenge);
    let thief = CardHolderKey::from_secret([4; 32]).sign_challenge(&id, &bytes);
    let (status, err) = sale_with(&node, 1, json!({ "card": qr, "redeem_points": 5, "challenge": challenge, "holder_signature": thief.to_hex() }));
    assert_eq!((status, err["error"].as_str()), (403, Some("holder_proof_invalid")), "{err}");

    let challenge = node.get("/api/v1/loyalty/challenge").1["challenge"].as_str().unwrap().to_string();
    let answer = phone.sign_challenge(&id, &unhex(&challenge));
    let proof = json!({ "card": qr, "redeem_points": 5, "challenge": challenge, "holder_signature": answer.to_hex() });
    let tap = |client_ref: Option<&str>| {
        node.post("/api/v1/sales", &json!({ "lines": [{ "sku": "HNY-500", "qty": 1 }], "loyalty": proof, "client_ref": client_ref }))
    };
    let (status, sale) = tap(Some("till-1-0007"));
    assert_eq!(status, 201, "{sale}");
    assert_eq!(sale["loyalty"]["points_redeemed"], 5);
    // The till's retry of that very sale (a double tap) is answered with it, nothing redeemed again.
    let (status, again) = tap(Some("till-1-0007"));
    assert_eq!((status, &again["id"]), (200, &sale["id"]), "{again}");
    // But a challenge answers one redemption: the same proof on another sale is refused.
    let (status, err) = tap(None);
    assert_eq!((status, err["error"].as_str()), (403, Some("holder_proof_invalid")), "{err}");
    let c = node.get(&format!("/api/v1/loyalty/cards/{}", card["id"].as_str().unwrap())).1;
    assert_eq!(c["points_redeemed"], 5, "{c}");
}

#[test]
fn a_voucher_is_redeemed_once_and_a_second_redemption_is_refused_saying_by_whom() {
    let dir = tempfile::tempdir().unwrap();
    let (node, _) = till(dir.path());
    let (status, minted) = node.post("/api/v1/loyalty/vouchers", &json!({ "label": "Free coffee", "value_cents": 250, "count": 3 }));
    assert_eq!(status, 201, "{minted}");
    let vouchers = minted["vouchers"].as_array().unwrap();
    assert_eq!(vouchers.len(), 3);
    assert_eq!(vouchers[2]["label"], "Free coffee #3 of 3");
    let id = vouchers[0]["id"].as_str().unwrap();
    let (status, v) = node.post(&format!("/api/v1/loyalty/vouchers/{id}/redeem"), &json!({}));
    assert_eq!(status, 201, "{v}");
    assert_eq!((v["status"].as_str(), v["redemptions"][0]["proven"].as_bool()), (Some("redeemed"), Some(true)));
    let (status, err) = node.post(&format!("/api/v1/loyalty/vouchers/{id}/redeem"), &json!({}));
    assert_eq!((status, err["error"].as_str()), (409, Some("already_redeemed")), "{err}");
    assert!(err["message"].as_str().unwrap().contains(&node.get("/api/v1/status").1["node"]["device"].as_str().unwrap()[..16]), "{err}");
    let (status, err) = node.post("/api/v1/loyalty/vouchers/0000000000000000/redeem", &json!({}));
    assert_eq!((status, err["error"].as_str()), (404, Some("unknown_voucher")), "{err}");
    let (status, err) = node.post("/api/v1/loyalty/vouchers/xyz/redeem", &json!({}));
    assert_eq!((status, err["error"].as_str()), (422, Some("invalid_input")), "{err}");
    let (status, err) = node.post("/api/v1/loyalty/vouchers", &json!({ "label": "", "count": 1 }));
    assert_eq!((status, err["error"].as_str()), (422, Some("invalid_input")), "{err}");
    let (status, _) = node.post("/api/v1/loyalty/vouchers", &json!({ "label": "x", "count": 1001 }));
    assert_eq!(status, 422);
    let list = node.get("/api/v1/loyalty/vouchers").1;
    let open = list["vouchers"].as_array().unwrap().iter().filter(|v| v["status"] == "open").count();
    assert_eq!(open, 2, "{list}");
}
