//! Cards as a till meets them: issued here, scanned elsewhere, copied, altered, expired.

use super::*;
use stallmesh_identity::{CardHolderKey, DeviceKey, MarketKey};

const NOW_MS: u64 = 1_764_000_000_000;

struct Setup {
    market: MarketId,
    issuer: DeviceKey,
}

fn setup() -> Setup {
    Setup { market: MarketKey::from_secret([7; 32]).market_id(), issuer: DeviceKey::from_secret([9; 32]) }
}

fn card(s: &Setup, holder: Option<[u8; 32]>, expires_at_ms: Option<u64>) -> Card {
    Card::issue(&s.issuer, s.market, CardId([1, 2, 3, 4, 5, 6, 7, 8]), NOW_MS, expires_at_ms, holder)
}

#[test]
fn a_card_fits_a_qr_code_and_reads_back_as_issued() {
    let s = setup();
    let holder = CardHolderKey::from_secret([3; 32]).public();
    for c in [card(&s, None, None), card(&s, Some(holder), Some(NOW_MS + 86_400_000))] {
        let text = c.to_text();
        assert!(text.len() <= MAX_CARD_TEXT_LEN, "{} characters", text.len());
        let alphanumeric = |ch: char| ch.is_ascii_digit() || ch.is_ascii_uppercase() || " $%*+-./:".contains(ch);
        assert!(text.chars().all(alphanumeric), "QR alphanumeric mode only: {text}");
        let back = Card::from_text(&format!("  {text}\n")).unwrap();
        assert_eq!(back, c);
        back.verify(&s.market, &s.issuer.device_id(), None, NOW_MS).unwrap();
    }
}

#[test]
fn an_altered_byte_anywhere_is_refused() {
    let s = setup();
    let c = card(&s, Some(CardHolderKey::from_secret([3; 32]).public()), None);
    let bytes = c.to_bytes();
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x01;
        let verdict = Card::from_bytes(&b).and_then(|altered| altered.verify(&s.market, &s.issuer.device_id(), None, NOW_MS));
        assert!(verdict.is_err(), "byte {i} altered and still accepted");
    }
}

#[test]
fn a_card_of_another_market_or_another_issuer_is_refused() {
    let s = setup();
    let c = card(&s, None, None);
    let other_market = MarketKey::from_secret([8; 32]).market_id();
    assert_eq!(c.verify(&other_market, &s.issuer.device_id(), None, NOW_MS), Err(CardError::OtherMarket));
    // A device of this market signing a card in another's name: the prefix does not match it.
    let impostor = DeviceKey::from_secret([10; 32]);
    assert_eq!(c.verify(&s.market, &impostor.device_id(), None, NOW_MS), Err(CardError::UnknownIssuer));
    // Or claiming another's prefix with its own signature: forged.
    let mut forged = Card::issue(&impostor, s.market, c.id, NOW_MS, None, None);
    forged.issuer_prefix = c.issuer_prefix;
    assert_eq!(forged.verify(&s.market, &s.issuer.device_id(), None, NOW_MS), Err(CardError::Forged));
}

#[test]
fn an_expired_card_and_a_card_issued_after_its_issuer_was_revoked_are_refused() {
    let s = setup();
    let c = card(&s, None, Some(NOW_MS + 1_000));
    c.verify(&s.market, &s.issuer.device_id(), None, NOW_MS).unwrap();
    assert_eq!(c.verify(&s.market, &s.issuer.device_id(), None, NOW_MS + 1_000), Err(CardError::Expired { expires_at_ms: NOW_MS + 1_000 }));
    // Revoked after issuing: the customer keeps the card. Revoked before: refused.
    c.verify(&s.market, &s.issuer.device_id(), Some(NOW_MS + 500), NOW_MS).unwrap();
    assert_eq!(c.verify(&s.market, &s.issuer.device_id(), Some(NOW_MS), NOW_MS), Err(CardError::RevokedIssuer));
}

#[test]
fn a_phone_card_needs_the_holders_answer_to_this_challenge() {
    let s = setup();
    let phone = CardHolderKey::from_secret([3; 32]);
    let c = card(&s, Some(phone.public()), None);
    let challenge = b"tablet-challenge-0001";
    assert_eq!(c.verify_holder(None), Err(CardError::HolderProofMissing));
    let answer = phone.sign_challenge(&c.id, challenge);
    c.verify_holder(Some((challenge, &answer))).unwrap();
    assert_eq!(c.verify_holder(Some((b"another-challenge", &answer))), Err(CardError::HolderProofInvalid));
    let thief = CardHolderKey::from_secret([4; 32]);
    assert_eq!(c.verify_holder(Some((challenge, &thief.sign_challenge(&c.id, challenge)))), Err(CardError::HolderProofInvalid));
    // A bearer card needs nothing.
    card(&s, None, None).verify_holder(None).unwrap();
}

#[test]
fn text_that_is_not_a_card_gets_a_precise_error() {
    for (text, needle) in [
        ("", "does not start"),
        ("SMC1:", "empty"),
        ("SMC1:!!", "base45"),
        ("hello", "does not start"),
        (&format!("SMC1:{}", "0".repeat(300)), "characters"),
    ] {
        match Card::from_text(text) {
            Err(CardError::Malformed(why)) => assert!(why.contains(needle), "{text:?}: {why}"),
            other => panic!("{text:?}: {other:?}"),
        }
    }
}

#[test]
fn points_follow_the_rule_with_stall_multipliers_and_round_down() {
    let mut rule = EarningRule::default();
    assert_eq!(rule.points_for([("Honey".to_string(), 850)]), 8);
    rule.stall_multipliers.insert("Honey".into(), 2);
    assert_eq!(rule.points_for([("Honey".to_string(), 850), ("Bread".to_string(), 199)]), 18);
    assert_eq!(rule.points_for([("Honey".to_string(), u64::MAX)]), MAX_POINTS_PER_SALE);
    rule.point_value_cents = 5;
    assert_eq!(rule.discount_cents(10), Some(50));
    assert_eq!(rule.discount_cents(u64::MAX), None, "refused, not wrapped");
}

#[test]
fn the_offline_budget_is_the_smaller_of_the_card_and_device_allowances() {
    let b = OfflineBudget { points_per_card: 100, points_per_device: 150, vouchers_per_device: 2 };
    assert_eq!(b.points_left(UnprovenSpent::default()), 100);
    assert_eq!(b.points_left(UnprovenSpent { points_of_card: 0, points: 120, vouchers: 0 }), 30);
    assert_eq!(b.points_left(UnprovenSpent { points_of_card: 100, points: 100, vouchers: 0 }), 0);
    assert_eq!(b.vouchers_left(UnprovenSpent { vouchers: 2, ..Default::default() }), 0);
}

proptest::proptest! {
    #[test]
    fn no_bytes_make_the_card_reader_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
        let _ = Card::from_bytes(&bytes);
        let _ = Card::from_text(&format!("SMC1:{}", String::from_utf8_lossy(&bytes)));
    }
}
