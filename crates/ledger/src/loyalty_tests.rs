//! Loyalty as the ledger keeps it: points earned where sold, redeemed once while connected,
//! redeemed on both sides of a partition only within the offline budget, and every double spend
//! found alike on every replica.

use super::testkit::{product, TestMarket};
use super::*;
use proptest::prelude::*;
use stallmesh_identity::{CardId, VoucherId};
use stallmesh_loyalty::OfflineBudget;

const CARD: CardId = CardId([7; 8]);
const BUDGET: OfflineBudget = OfflineBudget { points_per_card: 50, points_per_device: 80, vouchers_per_device: 1 };

fn shop(m: &TestMarket, n: u16) -> (Ledger, Vec<Entry>) {
    let (mut l, e0) = m.device(n, "Test Stall");
    let e1 = l.record(LocalOp::UpsertProduct(product(&format!("tea{n}"), 1_000)), 1).unwrap();
    let e2 = l.record(LocalOp::Restock { sku: format!("tea{n}"), qty: 1_000 }, 2).unwrap();
    (l, vec![e0, e1, e2])
}

fn sale(n: u16, earn: u64, redeem: u64, budget: Option<OfflineBudget>) -> LocalOp {
    LocalOp::Sell {
        lines: vec![LineRequest { sku: format!("tea{n}"), qty: 1 }],
        client_ref: None,
        recommendation: None,
        loyalty: Some(LoyaltyOnSale { card: CARD, points_earned: earn, redeem_points: redeem, point_value_cents: 1, offline_budget: budget }),
        staff: None,
    }
}

fn changes(entries: &[Entry]) -> Vec<SignedChange> {
    entries.iter().map(|e| e.change.clone()).collect()
}

fn same_loyalty(x: &Ledger, y: &Ledger) {
    assert_eq!(x.state().loyalty, y.state().loyalty);
    assert_eq!(x.state().loyalty.exposures(), y.state().loyalty.exposures());
}

#[test]
fn points_are_earned_where_sold_and_only_their_holder_redeems_them() {
    let m = TestMarket::new(40);
    let (mut a, ea) = shop(&m, 1);
    let (mut b, eb) = shop(&m, 2);
    a.apply_remote(changes(&eb));
    b.apply_remote(changes(&ea));
    let earn = a.record(sale(1, 100, 0, None), 10).unwrap();
    b.apply_remote(changes(std::slice::from_ref(&earn)));
    assert_eq!(b.state().loyalty.cards[&CARD].balance(), 100, "every replica sees the balance");
    // b holds none of them: without a budget it is refused, naming the holder.
    match b.record(sale(2, 0, 30, None), 11).unwrap_err() {
        LedgerError::InsufficientPoints { requested: 30, held_here: 0, held_elsewhere, budget_left: 0, .. } => {
            assert_eq!(held_elsewhere.get(&a.device()), Some(&100))
        }
        other => panic!("{other:?}"),
    }
    // The holder moves them (what it does when b asks over the mesh); b redeems them, proven.
    let moved = a.record(LocalOp::TransferLoyalty { asset: LoyaltyAsset::Points(CARD), qty: 30, to: b.device() }, 12).unwrap();
    b.apply_remote(changes(std::slice::from_ref(&moved)));
    let redeemed = b.record(sale(2, 0, 30, None), 13).unwrap();
    match &redeemed.event.body {
        EventBody::Sold { loyalty: Some(l), total_cents: 1_000, .. } => {
            assert_eq!((l.points_redeemed, l.points_unproven, l.discount_cents), (30, 0, 30))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(redeemed.change.causal, vec![moved.change.dot()], "the redemption names the transfer it spends");
    a.apply_remote(changes(std::slice::from_ref(&redeemed)));
    same_loyalty(&a, &b);
    assert_eq!(a.state().loyalty.cards[&CARD].balance(), 70);
    assert!(a.state().loyalty.exposures().is_empty());
}

#[test]
fn under_partition_each_side_spends_within_its_budget_and_the_double_spend_is_found_on_both() {
    let m = TestMarket::new(41);
    let (mut a, ea) = shop(&m, 1);
    let (mut b, eb) = shop(&m, 2);
    a.apply_remote(changes(&eb));
    b.apply_remote(changes(&ea));
    let earn = a.record(sale(1, 60, 0, None), 10).unwrap();
    b.apply_remote(changes(std::slice::from_ref(&earn)));
    // Partition. a redeems what it holds; b, cut off from the holder, redeems from its budget.
    let on_a = a.record(sale(1, 0, 60, Some(BUDGET)), 20).unwrap();
    let refused = b.record(sale(2, 0, 51, Some(BUDGET)), 21).unwrap_err();
    assert!(matches!(refused, LedgerError::InsufficientPoints { budget_left: 50, .. }), "{refused:?}");
    let on_b = b.record(sale(2, 0, 50, Some(BUDGET)), 22).unwrap();
    assert!(matches!(&on_b.event.body, EventBody::Sold { loyalty: Some(SaleLoyalty { points_unproven: 50, points_redeemed: 0, .. }), .. }));
    assert!(b.record(sale(2, 0, 1, Some(BUDGET)), 23).is_err(), "the card's budget on this device is spent");
    // Heal: both replicas report the same exposure, with both redemptions as evidence.
    a.apply_remote(changes(std::slice::from_ref(&on_b)));
    b.apply_remote(changes(std::slice::from_ref(&on_a)));
    same_loyalty(&a, &b);
    let exposures = a.state().loyalty.exposures();
    assert_eq!(exposures.len(), 1);
    assert_eq!(exposures[0].units, 50, "never more than the budget spent");
    assert_eq!(exposures[0].evidence, vec![on_b.change.dot(), on_a.change.dot()], "unproven first");
}

#[test]
fn a_voucher_is_redeemed_once_while_connected_and_twice_only_within_budget_under_partition() {
    let m = TestMarket::new(42);
    let (mut a, ea) = shop(&m, 1);
    let (mut b, eb) = shop(&m, 2);
    a.apply_remote(changes(&eb));
    b.apply_remote(changes(&ea));
    let v = VoucherId([1; 8]);
    let minted = a.record(LocalOp::MintVoucher { voucher: v, label: "Free coffee".into(), value_cents: 250 }, 10).unwrap();
    assert_eq!(a.record(LocalOp::MintVoucher { voucher: v, label: "again".into(), value_cents: 1 }, 10).unwrap_err(), LedgerError::VoucherExists(v));
    b.apply_remote(changes(std::slice::from_ref(&minted)));
    // Connected: b without the right and without a budget is told who holds it.
    assert_eq!(b.record(LocalOp::RedeemVoucher { voucher: v, offline_budget: None }, 11).unwrap_err(), LedgerError::VoucherHeldElsewhere { voucher: v, holders: vec![a.device()] });
    let first = a.record(LocalOp::RedeemVoucher { voucher: v, offline_budget: None }, 12).unwrap();
    assert!(matches!(first.event.body, EventBody::VoucherRedeemed { proven: true, .. }));
    b.apply_remote(changes(std::slice::from_ref(&first)));
    assert_eq!(b.record(LocalOp::RedeemVoucher { voucher: v, offline_budget: Some(BUDGET) }, 13).unwrap_err(), LedgerError::VoucherRedeemed { voucher: v, by: a.device() });

    // Another voucher, redeemed on both sides of a partition.
    let (w, x) = (VoucherId([2; 8]), VoucherId([3; 8]));
    let w_minted = a.record(LocalOp::MintVoucher { voucher: w, label: "Drop #7 of 50".into(), value_cents: 0 }, 20).unwrap();
    let x_minted = a.record(LocalOp::MintVoucher { voucher: x, label: "Another".into(), value_cents: 0 }, 20).unwrap();
    b.apply_remote(changes(&[w_minted, x_minted]));
    // Partition from here on.
    let on_a = a.record(LocalOp::RedeemVoucher { voucher: w, offline_budget: Some(BUDGET) }, 21).unwrap();
    let on_b = b.record(LocalOp::RedeemVoucher { voucher: w, offline_budget: Some(BUDGET) }, 22).unwrap();
    assert!(matches!(on_b.event.body, EventBody::VoucherRedeemed { proven: false, .. }));
    assert!(matches!(b.record(LocalOp::RedeemVoucher { voucher: x, offline_budget: Some(BUDGET) }, 24), Err(LedgerError::VoucherHeldElsewhere { .. })), "one unproven redemption per device");
    a.apply_remote(changes(std::slice::from_ref(&on_b)));
    b.apply_remote(changes(std::slice::from_ref(&on_a)));
    same_loyalty(&a, &b);
    let exposures = b.state().loyalty.exposures();
    assert_eq!(exposures.len(), 1, "{exposures:?}");
    assert_eq!((exposures[0].asset, exposures[0].units, exposures[0].redemptions), (LoyaltyAsset::Voucher(w), 1, 2));
    assert_eq!(exposures[0].evidence, vec![on_b.change.dot(), on_a.change.dot()]);
}

#[test]
fn a_peer_redeeming_points_it_does_not_hold_as_proven_is_refused_and_changes_nothing() {
    let m = TestMarket::new(43);
    let (mut a, ea) = shop(&m, 1);
    let (mut b, eb) = shop(&m, 2);
    let (mut c, ec) = shop(&m, 3);
    for (l, others) in [(&mut a, [&eb, &ec]), (&mut b, [&ea, &ec]), (&mut c, [&ea, &eb])] {
        for o in others {
            l.apply_remote(changes(o));
        }
    }
    // c earns points and gives them to b, which redeems them, proven.
    let earn = c.record(sale(3, 10, 0, None), 5).unwrap();
    let moved = c.record(LocalOp::TransferLoyalty { asset: LoyaltyAsset::Points(CARD), qty: 10, to: b.device() }, 6).unwrap();
    b.apply_remote(changes(&[earn.clone(), moved.clone()]));
    let redeemed = b.record(sale(2, 0, 10, None), 7).unwrap();
    // A tampered copy that hides the transfer it spends (b's key signs it again without `causal`):
    // a, which never saw the transfer, must refuse it rather than wait for it.
    let hidden = m.device_key(2).sign_change(redeemed.change.market, redeemed.change.seq, vec![], redeemed.change.change.to_vec());
    a.apply_remote(changes(&[earn]));
    let before = a.state().loyalty.clone();
    let report = a.apply_remote([hidden]);
    assert_eq!(report.rejected.len(), 1, "{report:?}");
    assert_eq!(a.state().loyalty, before, "a refused change leaves loyalty untouched");
}

#[derive(Debug, Clone)]
enum Op {
    Earn { dev: usize, points: u64 },
    Redeem { dev: usize, points: u64 },
    Transfer { from: usize, to: usize, points: u64 },
    Sync { from: usize, to: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..3usize, 1..40u64).prop_map(|(dev, points)| Op::Earn { dev, points }),
        (0..3usize, 1..60u64).prop_map(|(dev, points)| Op::Redeem { dev, points }),
        (0..3usize, 0..3usize, 1..40u64).prop_map(|(from, to, points)| Op::Transfer { from, to, points }),
        (0..3usize, 0..3usize).prop_map(|(from, to)| Op::Sync { from, to }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    /// Random earning, redeeming and transfers on three tablets that sync only now and then (a
    /// partition by any other name), then everything delivered in a shuffled order: every replica
    /// agrees, no balance is negative, and what is spent beyond what was earned is never more
    /// than the offline budgets let out.
    #[test]
    fn replicas_agree_and_overspending_stays_within_the_budgets(ops in proptest::collection::vec(op(), 1..40), order in any::<u64>()) {
        let m = TestMarket::new(44);
        let mut tablets: Vec<(Ledger, Vec<Entry>)> = (1..=3).map(|n| shop(&m, n)).collect();
        let all: Vec<Vec<SignedChange>> = tablets.iter().map(|t| changes(&t.1)).collect();
        for (i, t) in tablets.iter_mut().enumerate() {
            for (j, c) in all.iter().enumerate() {
                if i != j {
                    t.0.apply_remote(c.clone());
                }
            }
        }
        let mut time = 10;
        for op in ops {
            time += 1;
            match op {
                Op::Earn { dev, points } => {
                    let e = tablets[dev].0.record(sale(dev as u16 + 1, points, 0, None), time).unwrap();
                    tablets[dev].1.push(e);
                }
                Op::Redeem { dev, points } => {
                    if let Ok(e) = tablets[dev].0.record(sale(dev as u16 + 1, 0, points, Some(BUDGET)), time) {
                        tablets[dev].1.push(e);
                    }
                }
                Op::Transfer { from, to, points } if from != to => {
                    let to_device = tablets[to].0.device();
                    if let Ok(e) = tablets[from].0.record(LocalOp::TransferLoyalty { asset: LoyaltyAsset::Points(CARD), qty: points, to: to_device }, time) {
                        tablets[from].1.push(e);
                    }
                }
                Op::Transfer { .. } => {}
                Op::Sync { from, to } => {
                    let c = changes(&tablets[from].1);
                    tablets[to].0.apply_remote(c);
                }
            }
        }
        // Heal: every change to every tablet, in a shuffled order per receiver.
        let everything: Vec<SignedChange> = tablets.iter().flat_map(|t| changes(&t.1)).collect();
        for (k, t) in tablets.iter_mut().enumerate() {
            let mut mine = everything.clone();
            let mut seed = order.wrapping_add(k as u64);
            for i in (1..mine.len()).rev() {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                mine.swap(i, (seed >> 33) as usize % (i + 1));
            }
            // Out-of-order changes wait for their predecessors; apply until nothing moves.
            t.0.apply_remote(mine);
        }
        let first = &tablets[0].0;
        for t in &tablets[1..] {
            prop_assert_eq!(&first.state().loyalty, &t.0.state().loyalty);
            prop_assert_eq!(first.state().loyalty.exposures(), t.0.state().loyalty.exposures());
        }
        let card = first.state().loyalty.cards.get(&CARD).cloned().unwrap_or_default();
        let held: u64 = first.state().loyalty.holders(&LoyaltyAsset::Points(CARD)).values().sum();
        prop_assert_eq!(held, card.points_earned - card.points_redeemed, "rights are what was earned less what was spent from them");
        let budget_total = 3 * BUDGET.points_per_card;
        prop_assert!(card.overspent() <= budget_total, "overspent {} > budgets {}", card.overspent(), budget_total);
        let exposed: u64 = first.state().loyalty.exposures().iter().map(|e| e.units).sum();
        prop_assert_eq!(exposed, card.overspent());
    }
}

#[test]
fn a_card_is_verified_through_its_issuers_enrolment_and_a_revoked_issuers_later_cards_are_refused() {
    use stallmesh_loyalty::CardError;
    let m = TestMarket::new(45);
    let (mut a, _) = shop(&m, 1);
    let (b, eb) = shop(&m, 2);
    let before_ms = 1_000_000;
    let card = b.issue_card(CARD, before_ms, None, None).unwrap();
    assert_eq!(a.verify_card(&card, before_ms), Err(CardError::UnknownIssuer), "the issuer's enrolment has not arrived");
    a.apply_remote(changes(&eb));
    assert_eq!(a.verify_card(&card, before_ms), Ok(b.device()));
    // The organiser retires tablet b: its customers keep their cards, but it issues no valid new ones.
    let revoked_at_ms = before_ms + 10_000;
    a.record(LocalOp::Revoke(m.key.revoke(b.device(), revoked_at_ms)), revoked_at_ms).unwrap();
    assert_eq!(a.verify_card(&card, revoked_at_ms + 1), Ok(b.device()));
    let later = b.issue_card(CardId([9; 8]), revoked_at_ms + 5_000, None, None).unwrap();
    assert_eq!(a.verify_card(&later, revoked_at_ms + 6_000), Err(CardError::RevokedIssuer));
    // And a's own ledger, once revoked itself, refuses to issue any.
    let (mut c, ec) = shop(&m, 3);
    c.apply_remote(changes(&eb));
    c.record(LocalOp::Revoke(m.key.revoke(c.device(), 5)), 5).unwrap();
    assert_eq!(c.issue_card(CardId([8; 8]), 6, None, None).unwrap_err(), LedgerError::Revoked);
    drop(ec);
}
