//! Loyalty at a market whose Wi-Fi splits: real `stallmesh up` processes, one network namespace
//! each on a shared bridge (as `tests/mesh.rs`), a card's points and a voucher redeemed on both
//! sides of a 2|3 partition.

mod netns;

use netns::{eventually, in_netns, Lan};
use serde_json::{json, Value};
use std::time::Duration;

const CONVERGE: Duration = Duration::from_secs(30);

fn device(lan: &Lan, k: usize) -> String {
    lan.get(k, "/api/v1/status")["node"]["device"].as_str().unwrap().to_string()
}

fn card(lan: &Lan, k: usize, id: &str) -> Value {
    lan.get(k, &format!("/api/v1/loyalty/cards/{id}"))
}

fn redeem_points(lan: &Lan, k: usize, qr: &str, points: u64) -> (u16, Value) {
    lan.post(k, "/api/v1/sales", &json!({ "lines": [{ "sku": "TEA", "qty": 1 }], "loyalty": { "card": qr, "redeem_points": points } }))
}

#[test]
fn a_card_and_a_voucher_spent_on_both_sides_of_a_partition_stay_within_budget_and_every_tablet_reports_it_once() {
    in_netns("a_card_and_a_voucher_spent_on_both_sides_of_a_partition_stay_within_budget_and_every_tablet_reports_it_once", || {
        // An offline budget of 250 points per card: the tablets inherit it from this process.
        std::env::set_var("STALLMESH_LOYALTY_OFFLINE_POINTS_PER_CARD", "250");
        let lan = Lan::with_market(5);
        let all = [1, 2, 3, 4, 5];
        for k in all {
            eventually(CONVERGE, &format!("node {k} meshed"), || lan.peers(k) >= 4);
        }
        // Tea at €5; every tablet gets 10 units to sell.
        let p = json!({ "sku": "TEA", "name": "Tea", "price_cents": 500, "currency": "EUR", "stall": "Stall" });
        assert_eq!(lan.post(1, "/api/v1/products", &p).0, 201);
        assert_eq!(lan.post(1, "/api/v1/restocks", &json!({ "sku": "TEA", "qty": 200 })).0, 201);
        for k in 2..=5 {
            let to = device(&lan, k);
            eventually(CONVERGE, "enrolments spread", || lan.post(1, "/api/v1/transfers", &json!({ "sku": "TEA", "qty": 10, "to_device": to })).0 == 201);
        }
        // A customer's card, 300 points earned at tablet 1 (60 teas at €5, one point per euro).
        let (status, issued) = lan.post(1, "/api/v1/loyalty/cards", &json!({}));
        assert_eq!(status, 201, "{issued}");
        let (qr, id) = (issued["qr_text"].as_str().unwrap().to_string(), issued["id"].as_str().unwrap().to_string());
        let (status, sale) = lan.post(1, "/api/v1/sales", &json!({ "lines": [{ "sku": "TEA", "qty": 60 }], "loyalty": { "card": qr } }));
        assert_eq!(status, 201, "{sale}");
        assert_eq!(sale["loyalty"]["points_earned"], 300);
        // A voucher minted at tablet 1.
        let (status, minted) = lan.post(1, "/api/v1/loyalty/vouchers", &json!({ "label": "Free coffee", "value_cents": 250 }));
        assert_eq!(status, 201, "{minted}");
        let voucher = minted["vouchers"][0]["id"].as_str().unwrap().to_string();
        eventually(CONVERGE, "every tablet knows the card and the voucher", || {
            all.iter().all(|k| {
                card(&lan, *k, &id)["balance_points"] == 300
                    && lan.get(*k, "/api/v1/loyalty/vouchers")["vouchers"].as_array().is_some_and(|v| v.len() == 1)
                    && lan.get(*k, "/api/v1/stock")["stock"][0]["this_device"].as_u64() > Some(0)
            })
        });

        // The Wi-Fi splits: tablets 1 and 2 | 3, 4 and 5.
        let left = [1, 2];
        lan.partition(&left);
        // Every tablet must have noticed: one that still counts a tablet of the other side as
        // reachable asks it and waits instead of using its budget.
        eventually(CONVERGE, "each side drops the other", || {
            left.iter().all(|k| lan.peers(*k) == 1) && [3, 4, 5].iter().all(|k| lan.peers(*k) == 2)
        });

        // Left: tablet 2 holds none of the points; tablet 1 (reachable) hands them over: proven.
        let (status, on_left) = redeem_points(&lan, 2, &qr, 200);
        assert_eq!(status, 201, "{on_left}");
        assert_eq!((on_left["loyalty"]["points_redeemed"].as_u64(), on_left["loyalty"]["points_unproven"].as_u64()), (Some(200), Some(0)), "{on_left}");
        assert_eq!(on_left["loyalty"]["discount_cents"], 200);
        // Right: nobody reachable holds the points, tablet 1 is known to hold them out of reach,
        // and the offline budget (250 per card) covers it.
        let (status, on_right) = redeem_points(&lan, 3, &qr, 200);
        assert_eq!(status, 201, "{on_right}");
        assert_eq!(on_right["loyalty"]["points_unproven"], 200, "{on_right}");
        // Tablet 3's sale earned 3 points on the €3 paid in money; they are held there.
        assert_eq!(on_right["loyalty"]["points_earned"], 3, "{on_right}");
        eventually(CONVERGE, "the right side knows tablet 3's sale", || card(&lan, 4, &id)["points_unproven"] == 200);
        // Beyond the budget: tablet 4 takes what its side holds (tablet 3's 3 points), but 297
        // more is past its 250: refused, saying where the rest is and that it is out of reach.
        let (status, refused) = redeem_points(&lan, 4, &qr, 300);
        assert_eq!(status, 409, "{refused}");
        assert_eq!(refused["error"], "insufficient_points");
        assert_eq!(refused["points"]["held_here"], 3, "{refused}");
        assert_eq!(refused["points"]["offline_budget_left"], 250, "{refused}");
        assert_eq!(refused["points"]["reachable_holders"], json!([]), "{refused}");
        assert_eq!(refused["points"]["held_elsewhere"][device(&lan, 1)], 300, "this side cannot know tablet 1 gave 200 away: {refused}");
        // A fresh card has no points anywhere: no budget spends points nobody has seen.
        let (status, fresh) = lan.post(5, "/api/v1/loyalty/cards", &json!({}));
        assert_eq!(status, 201, "{fresh}");
        let (status, refused) = redeem_points(&lan, 5, fresh["qr_text"].as_str().unwrap(), 10);
        assert_eq!((status, refused["error"].as_str()), (409, Some("insufficient_points")), "{refused}");

        // The voucher: proven on the left (tablet 1 hands it to 2), from the budget on the right.
        let (status, v_left) = lan.post(2, &format!("/api/v1/loyalty/vouchers/{voucher}/redeem"), &json!({}));
        assert_eq!(status, 201, "{v_left}");
        assert_eq!(v_left["redemptions"][0]["proven"], true, "{v_left}");
        let (status, v_right) = lan.post(3, &format!("/api/v1/loyalty/vouchers/{voucher}/redeem"), &json!({}));
        assert_eq!(status, 201, "{v_right}");
        assert_eq!(v_right["redemptions"][0]["proven"], false, "{v_right}");
        // On the same side, once is all: once tablet 5 has seen tablet 3's redemption it refuses.
        // (Asking before it has seen it would be a second offline redemption, which is allowed.)
        eventually(CONVERGE, "the right side agrees the voucher is used", || {
            lan.get(5, "/api/v1/loyalty/vouchers")["vouchers"][0]["status"] == "redeemed"
        });
        let (status, again) = lan.post(5, &format!("/api/v1/loyalty/vouchers/{voucher}/redeem"), &json!({}));
        assert_eq!((status, again["error"].as_str()), (409, Some("already_redeemed")), "{again}");

        // Heal: every tablet reports the same exposures, once each, with both redemptions.
        lan.heal(&left);
        eventually(CONVERGE, "every tablet reports both exposures", || {
            all.iter().all(|k| lan.get(*k, "/api/v1/loyalty/exposures")["exposures"].as_array().is_some_and(|e| e.len() == 2))
        });
        let first = lan.get(1, "/api/v1/loyalty/exposures");
        for k in all {
            assert_eq!(lan.get(k, "/api/v1/loyalty/exposures"), first, "tablet {k} derives the same exposures");
        }
        let exposures = first["exposures"].as_array().unwrap();
        let points = exposures.iter().find(|e| e["asset"] == "points").unwrap();
        assert_eq!(points["id"], id.as_str());
        assert_eq!(points["units"], 94, "400 redeemed of 306 earned (300, and 3 on each redeeming sale): {points}");
        let evidence: Vec<(String, bool)> =
            points["evidence"].as_array().unwrap().iter().map(|r| (r["device"].as_str().unwrap().to_string(), r["proven"] == true)).collect();
        assert_eq!(evidence, vec![(device(&lan, 3), false), (device(&lan, 2), true)], "both redemptions, unproven first");
        let v = exposures.iter().find(|e| e["asset"] == "voucher").unwrap();
        assert_eq!((v["units"].as_u64(), v["redemptions"].as_u64()), (Some(1), Some(2)), "{v}");
        assert!(first["points_exposed"].as_u64() <= Some(250), "never beyond one tablet's budget here");
        let metrics = ureq::get(&format!("{}/metrics", lan.url(4))).call().unwrap().into_string().unwrap();
        assert!(metrics.contains("stallmesh_loyalty_points_exposed 94"), "{metrics}");
        assert!(metrics.contains("stallmesh_loyalty_exposures 2"), "{metrics}");
    });
}
