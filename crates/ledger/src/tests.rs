//! Specifications of the ledger's behaviour, one scenario each.

use super::testkit::{product, sell, TestMarket};
use super::*;
use automerge::transaction::Transactable;
use automerge::{Change, ObjType};

fn stocked(m: &TestMarket, n: u16, sku: &str, qty: u64) -> (Ledger, Vec<Entry>) {
    let (mut l, e0) = m.device(n, "Test Stall");
    let e1 = l.record(LocalOp::UpsertProduct(product(sku, 250)), 1).unwrap();
    let e2 = l.record(LocalOp::Restock { sku: sku.into(), qty }, 2).unwrap();
    (l, vec![e0, e1, e2])
}

/// Products, stock rights and sales agree (each replica also knows its own enrolment).
fn assert_same_business_state(x: &Ledger, y: &Ledger) {
    assert_eq!(x.state().products, y.state().products);
    assert_eq!(x.state().rights, y.state().rights);
    assert_eq!(x.state().sales, y.state().sales);
}

/// Drops every journal document of `l` from memory (they are rebuilt on demand), as the bound on
/// open documents does in a large market.
fn drop_docs(l: &mut Ledger) {
    for j in l.journals.values_mut() {
        j.doc = None;
    }
    l.open_docs.clear();
}

fn changes(entries: &[Entry]) -> Vec<SignedChange> {
    entries.iter().map(|e| e.change.clone()).collect()
}

#[test]
fn a_sale_spends_the_sellers_own_rights_and_is_refused_beyond_them() {
    let m = TestMarket::new(1);
    let (mut a, _) = stocked(&m, 1, "honey", 3);
    let sale = a.record(sell("honey", 2), 10).unwrap();
    assert!(matches!(&sale.event.body, EventBody::Sold { total_cents: 500, .. }));
    assert_eq!(a.state().stock("honey").total, 1);
    let err = a.record(sell("honey", 2), 11).unwrap_err();
    assert!(matches!(err, LedgerError::InsufficientRights { requested: 2, held_here: 1, held_elsewhere_total: 0, .. }), "{err:?}");
    assert_eq!(a.state().sales.len(), 1, "a refused sale changes nothing");
}

#[test]
fn refusal_names_the_devices_that_hold_the_missing_units() {
    let m = TestMarket::new(2);
    let (a, ea) = stocked(&m, 1, "jam", 5);
    let (mut b, eb) = m.device(2, "Test Stall");
    b.apply_remote(changes(&ea));
    let err = b.record(sell("jam", 1), 5).unwrap_err();
    match err {
        LedgerError::InsufficientRights { held_here: 0, held_elsewhere, held_elsewhere_total: 5, .. } => {
            assert_eq!(held_elsewhere.get(&a.device()), Some(&5));
        }
        other => panic!("unexpected {other:?}"),
    }
    drop(eb);
}

#[test]
fn transferred_rights_can_be_spent_and_peers_apply_the_transfer_first() {
    let m = TestMarket::new(3);
    let (mut a, mut ea) = stocked(&m, 1, "cheese", 4);
    let (mut b, eb0) = m.device(2, "Test Stall");
    a.apply_remote(changes(std::slice::from_ref(&eb0)));
    b.apply_remote(changes(&ea));
    ea.push(a.record(LocalOp::Transfer { sku: "cheese".into(), qty: 3, to: b.device() }, 3).unwrap());
    b.apply_remote(changes(&ea));
    let sale = b.record(sell("cheese", 3), 4).unwrap();
    assert_eq!(sale.change.causal, vec![ea[3].change.dot()], "the sale names the transfer it spends");

    // A third replica receives b's sale before a's transfer: it waits instead of going negative.
    let (mut c, _) = m.device(3, "Test Stall");
    let report = c.apply_remote(changes(&[eb0, sale.clone()]));
    assert_eq!(report.pending, 1);
    assert!(c.state().sales.is_empty());
    let report = c.apply_remote(changes(&ea));
    assert_eq!(report.pending, 0);
    assert_eq!(c.state().sales.len(), 1);
    assert_same_business_state(&c, &b);
    assert_eq!(c.state().stock("cheese").total, 1);
}

#[test]
fn remote_changes_in_any_order_give_the_same_state_and_duplicates_are_ignored() {
    let m = TestMarket::new(4);
    let (mut a, mut ea) = stocked(&m, 1, "bread", 10);
    for t in 0..5 {
        ea.push(a.record(sell("bread", 1), 100 + t).unwrap());
    }
    let (mut b, _) = m.device(2, "Test Stall");
    let mut reversed = changes(&ea);
    reversed.reverse();
    let report = b.apply_remote(reversed.clone());
    assert_eq!(report.applied.len(), ea.len());
    assert_same_business_state(&a, &b);
    let again = b.apply_remote(reversed);
    assert_eq!((again.applied.len(), again.duplicates), (0, ea.len()));
    assert_same_business_state(&a, &b);
}

#[test]
fn forged_unenrolled_wrong_market_and_wrong_actor_changes_are_rejected_without_effect() {
    let m = TestMarket::new(5);
    let (mut a, ea) = stocked(&m, 1, "eggs", 10);
    let (mut b, _) = m.device(2, "Test Stall");
    b.apply_remote(changes(&ea));
    let before = b.state().clone();

    // Forged: a byte of the sale flipped after signing.
    let mut forged = a.record(sell("eggs", 1), 9).unwrap().change;
    let mut bytes = forged.change.to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    forged.change = bytes.into();
    let r = b.apply_remote([forged]);
    assert_eq!(r.rejected[0].1, Rejection::BadSignature);

    // Another market's device, replaying its own valid changes here.
    let other = TestMarket::new(6);
    let (_, eo) = stocked(&other, 1, "eggs", 10);
    let r = b.apply_remote(changes(&eo));
    assert!(r.rejected.iter().all(|(_, why)| *why == Rejection::WrongMarket));

    // A device with a certificate signed by a stranger's key.
    let stranger = stallmesh_identity::MarketKey::from_secret([77; 32]);
    let key = DeviceKey::from_secret([78; 32]);
    let bad_cert = stranger.enrol(key.device_id(), "Fake", stallmesh_identity::Role::Seller, u64::MAX);
    let mut fake = Ledger::new(m.ctx.clone(), key, bad_cert);
    // The fake ledger thinks it is enrolled; peers must not.
    let e0 = fake.commit_local(Event { time_ms: 1, body: EventBody::Enrolled { certificate: fake.certificate().clone().into() } }).unwrap();
    let r = b.apply_remote([e0.change]);
    assert!(matches!(r.rejected[0].1, Rejection::BadEnrolment(_)), "{:?}", r.rejected);

    // Wrong actor: a device signs a change whose automerge actor is another device.
    let (mut c, ec0) = m.device(3, "Test Stall");
    c.apply_remote(changes(&ea));
    b.apply_remote([ec0.change.clone()]);
    let stolen = a.record(sell("eggs", 1), 10).unwrap().change;
    let c_key = m.device_key(3);
    let resigned = c_key.sign_change(m.ctx.market, 1, vec![], stolen.change.to_vec());
    let r = b.apply_remote([resigned]);
    assert_eq!(r.rejected[0].1, Rejection::WrongActor);

    // b never saw a's last two sales, so its state is what it was plus c's enrolment.
    assert_eq!(b.state().sales, before.sales);
    assert_eq!(b.state().rights, before.rights);
    assert!(b.stats().rejected.values().sum::<u64>() >= 4);
}

#[test]
fn a_signature_is_skipped_only_for_changes_the_caller_vouches_for() {
    struct Vouch(Vec<SignedChange>);
    impl crate::KnownValid for Vouch {
        fn known_valid(&self, c: &SignedChange) -> bool {
            self.0.contains(c)
        }
    }
    let m = TestMarket::new(5);
    let (mut a, ea) = stocked(&m, 1, "eggs", 10);
    let sale = a.record(sell("eggs", 1), 9).unwrap().change;
    let mut forged = sale.clone();
    let mut bytes = forged.change.to_vec();
    bytes[0] ^= 1;
    forged.change = bytes.into();
    forged.signature = sale.signature; // the good signature, over other bytes
    // Vouched for: not re-verified (a replica in the simulator trusts another's check).
    let (mut b, _) = m.device(2, "Test Stall");
    b.apply_remote(changes(&ea));
    let vouched = b.apply_remote_known([forged.clone()], &Vouch(vec![forged.clone()]));
    assert!(vouched.rejected.iter().all(|(_, r)| *r != Rejection::BadSignature), "{:?}", vouched.rejected);
    // Vouching for other bytes of the same position does not cover it: checked, and refused.
    let (mut c, _) = m.device(3, "Test Stall");
    c.apply_remote(changes(&ea));
    let r = c.apply_remote_known([forged], &Vouch(vec![sale.clone()]));
    assert_eq!(r.rejected[0].1, Rejection::BadSignature);
    assert_eq!(c.apply_remote_known([sale], &Vouch(vec![])).applied.len(), 1);
}

#[test]
fn a_vouched_event_is_taken_only_on_the_same_predecessor_and_still_checked_against_the_replica() {
    // What a ledger found applying a change, keyed by its exact bytes (as the simulator shares it).
    struct Applied(Vec<(SignedChange, crate::KnownApplied)>);
    impl crate::KnownValid for Applied {
        fn known_valid(&self, c: &SignedChange) -> bool {
            self.0.iter().any(|(k, _)| k == c)
        }
        fn known_applied(&self, c: &SignedChange) -> Option<crate::KnownApplied> {
            self.0.iter().find(|(k, _)| k == c).map(|(_, a)| a.clone())
        }
    }
    let m = TestMarket::new(6);
    let (mut a, ea) = stocked(&m, 1, "eggs", 10);
    let sale = a.record(sell("eggs", 2), 9).unwrap();
    let after = Some(ea[2].change.digest());
    let big_sale = {
        let (mut other, _) = stocked(&m, 1, "eggs", 100);
        other.record(sell("eggs", 50), 9).unwrap().event
    };
    // The real event on the real predecessor: taken as is, the same state as decoding it.
    let (mut decoded, _) = m.device(2, "Test Stall");
    let mut vouched = m.device(3, "Test Stall").0;
    decoded.apply_remote(changes(&ea));
    vouched.apply_remote(changes(&ea));
    assert_eq!(decoded.apply_remote([sale.change.clone()]).applied.len(), 1);
    let known = Applied(vec![(sale.change.clone(), crate::KnownApplied { event: sale.event.clone(), after })]);
    assert_eq!(vouched.apply_remote_known([sale.change.clone()], &known).applied.len(), 1);
    assert_same_business_state(&decoded, &vouched);
    // An event vouched on another predecessor is not taken: the change is decoded, and its own
    // event (2 units) is what the replica folds, not the vouched one (50).
    let (mut elsewhere, _) = m.device(4, "Test Stall");
    elsewhere.apply_remote(changes(&ea));
    let other_chain = Applied(vec![(sale.change.clone(), crate::KnownApplied { event: big_sale.clone(), after: Some(ea[1].change.digest()) })]);
    let r = elsewhere.apply_remote_known([sale.change.clone()], &other_chain);
    assert!(matches!(&r.applied[0].event.body, EventBody::Sold { lines, .. } if lines[0].qty == 2), "{:?}", r.applied);
    assert_same_business_state(&decoded, &elsewhere);
    // Taken, the event is still checked against this replica's state: 50 units the seller does
    // not hold are refused.
    let (mut checked, _) = m.device(5, "Test Stall");
    checked.apply_remote(changes(&ea));
    let lying = Applied(vec![(sale.change.clone(), crate::KnownApplied { event: big_sale, after })]);
    let r = checked.apply_remote_known([sale.change.clone()], &lying);
    assert!(matches!(r.rejected[..], [(_, Rejection::Fold(FoldError::Overspend { .. }))]), "{:?}", r.rejected);
}

#[test]
fn a_replica_keeping_two_documents_open_holds_what_one_keeping_all_holds() {
    let m = TestMarket::new(5);
    let sellers: Vec<(Ledger, Vec<Entry>)> = (1..=5).map(|n| stocked(&m, n, &format!("sku{n}"), 50)).collect();
    let (mut roomy, _) = m.device(10, "Test Stall");
    let (mut tight, _) = m.device(11, "Test Stall");
    tight.set_open_docs_limit(MIN_OPEN_SEGMENT_DOCS);
    let mut sellers = sellers;
    for (_, e) in &sellers {
        assert!(roomy.apply_remote(changes(e)).rejected.is_empty());
        assert!(tight.apply_remote(changes(e)).rejected.is_empty());
    }
    // Sales round-robin over the five journals: the tight replica drops and rebuilds a document
    // on almost every change, and must end in the same state with the same journals.
    for round in 0..4u64 {
        for (n, (l, _)) in sellers.iter_mut().enumerate() {
            let e = l.record(sell(&format!("sku{}", n + 1), 1), 10 + round).unwrap();
            assert!(roomy.apply_remote([e.change.clone()]).rejected.is_empty());
            assert!(tight.apply_remote([e.change]).rejected.is_empty());
            assert!(tight.open_docs.len() <= MIN_OPEN_SEGMENT_DOCS, "{} documents open", tight.open_docs.len());
        }
    }
    assert_same_business_state(&roomy, &tight);
    for (l, _) in &sellers {
        assert_eq!(roomy.heads_ref().get(&l.device()), tight.heads_ref().get(&l.device()));
        assert_eq!(tight.heads_ref().get(&l.device()), Some(&7));
    }
    assert!(roomy.open_docs.len() > MIN_OPEN_SEGMENT_DOCS);
}

#[test]
fn a_revoked_device_is_cut_off_everywhere_the_revocation_arrives() {
    let m = TestMarket::new(7);
    let (mut a, ea) = stocked(&m, 1, "figs", 10);
    let (mut b, eb) = m.device(2, "Test Stall");
    b.apply_remote(changes(&ea));
    a.apply_remote(changes(&[eb]));
    let rev = b.record(LocalOp::Revoke(m.key.revoke(a.device(), 50)), 50).unwrap();
    let late_sale = a.record(sell("figs", 1), 60).unwrap();
    let before = b.state().clone();
    let r = b.apply_remote([late_sale.change]);
    assert_eq!(r.rejected[0].1, Rejection::Revoked);
    assert_eq!(b.state(), &before);
    a.apply_remote([rev.change]);
    assert_eq!(a.record(sell("figs", 1), 70), Err(LedgerError::Revoked));
    // A revocation not signed by the market is refused.
    let fake = stallmesh_identity::MarketKey::from_secret([9; 32]).revoke(b.device(), 1);
    assert!(matches!(b.record(LocalOp::Revoke(fake), 80), Err(LedgerError::BadRevocation(_))));
}

#[test]
fn every_replica_refuses_a_watermark_from_a_device_that_is_not_the_cloud_and_a_sale_from_one_that_is() {
    let m = TestMarket::new(18);
    let (seller, e_seller) = m.device(1, "Test Stall");
    let cloud_key = m.device_key(2);
    let cloud_cert = m.key.enrol(cloud_key.device_id(), "cloud", stallmesh_identity::Role::Cloud, u64::MAX);
    let mut state = State::default();
    state.fold(e_seller.change.dot(), &e_seller.event);
    let cloud_enrolment = Event { time_ms: 0, body: EventBody::Enrolled { certificate: cloud_cert.into() } };
    let cloud = Dot { device: cloud_key.device_id(), seq: 0 };
    state.check(cloud, &cloud_enrolment).unwrap();
    state.fold(cloud, &cloud_enrolment);
    let mark = Event { time_ms: 1, body: EventBody::CloudHolds { offset: 3, heads: vec![(seller.device(), 1)] } };
    assert!(matches!(state.check(Dot { device: seller.device(), seq: 1 }, &mark), Err(FoldError::Invalid(_))), "a seller's watermark");
    assert_eq!(state.check(Dot { device: cloud.device, seq: 1 }, &mark), Ok(()));
    let restock = Event { time_ms: 1, body: EventBody::Restocked { sku: "X".into(), qty: 1 } };
    assert!(matches!(state.check(Dot { device: cloud.device, seq: 1 }, &restock), Err(FoldError::Invalid(_))), "the cloud's restock");
}

#[test]
fn a_revocation_that_arrives_before_the_devices_enrolment_still_revokes_it() {
    let m = TestMarket::new(17);
    let (mut a, ea) = m.device(1, "Test Stall");
    let (mut b, eb) = m.device(2, "Test Stall");
    let (mut c, _) = m.device(3, "Test Stall");
    b.apply_remote(changes(&[ea.clone()]));
    let rev = b.record(LocalOp::Revoke(m.key.revoke(a.device(), 50)), 50).unwrap();
    // C hears of the revocation (in B's journal) before A's enrolment; A the other way round.
    c.apply_remote(changes(&[eb.clone(), rev.clone()]));
    c.apply_remote(changes(&[ea.clone()]));
    a.apply_remote(changes(&[eb, rev]));
    let revoked = |l: &Ledger| l.state().devices.get(&a.device()).and_then(|d| d.revoked_at_ms);
    assert_eq!(revoked(&c), Some(50), "the early revocation is applied when the enrolment arrives");
    assert_eq!(revoked(&c), revoked(&b));
    assert_eq!(revoked(&a), revoked(&c));
}

#[test]
fn restore_from_entries_gives_the_same_state_and_continues_the_journal() {
    let m = TestMarket::new(8);
    let (mut a, mut ea) = stocked(&m, 1, "kale", 1_000);
    for t in 0..(SEGMENT_CHANGES + 10) {
        ea.push(a.record(sell("kale", 1), 100 + t).unwrap());
    }
    let key = m.device_key(1);
    let mut r = Ledger::restore(m.ctx.clone(), key, a.certificate().clone(), ea.clone()).unwrap();
    assert_eq!(r.state(), a.state());
    let next_a = a.record(sell("kale", 1), 999).unwrap();
    let next_r = r.record(sell("kale", 1), 999).unwrap();
    assert_eq!(next_a, next_r, "a restored ledger writes the very same next change");

    // A store that lost an entry is refused rather than silently restored.
    let mut gappy = ea.clone();
    gappy.remove(5);
    let key = m.device_key(1);
    assert!(matches!(Ledger::restore(m.ctx.clone(), key, a.certificate().clone(), gappy), Err(RestoreError::Gap { .. })));
}

#[test]
fn a_remote_overspend_is_rejected_as_a_protocol_violation() {
    let m = TestMarket::new(9);
    let (mut a, ea) = stocked(&m, 1, "plums", 1);
    a.allow_overspend_for_tests = true;
    let bad = a.record(sell("plums", 5), 10).unwrap();
    let (mut b, _) = m.device(2, "Test Stall");
    b.apply_remote(changes(&ea));
    let r = b.apply_remote([bad.change]);
    assert!(matches!(r.rejected[0].1, Rejection::Fold(FoldError::Overspend { .. })), "{:?}", r.rejected);
    assert_eq!(b.state().stock("plums").total, 1);
}

#[test]
fn client_ref_makes_a_retried_sale_idempotent() {
    let m = TestMarket::new(10);
    let (mut a, _) = stocked(&m, 1, "tea", 5);
    let op = LocalOp::Sell {
        lines: vec![LineRequest { sku: "tea".into(), qty: 1 }],
        client_ref: Some("till-7-0001".into()),
        recommendation: None,
        loyalty: None,
        staff: None,
    };
    let first = a.record(op.clone(), 1).unwrap();
    match a.record(op, 2) {
        Err(LedgerError::AlreadyRecorded { sale_id: id, .. }) => assert_eq!(id, sale_id(first.change.dot())),
        other => panic!("{other:?}"),
    }
    assert_eq!(a.state().stock("tea").total, 4);
}

fn sell_with_ref(sku: &str, client_ref: &str) -> LocalOp {
    LocalOp::Sell { lines: vec![LineRequest { sku: sku.into(), qty: 1 }], client_ref: Some(client_ref.into()), recommendation: None, loyalty: None, staff: None }
}

#[test]
fn a_retried_sale_is_recognised_after_a_restart() {
    let m = TestMarket::new(30);
    let (mut a, mut ea) = stocked(&m, 1, "tea", 5);
    let first = a.record(sell_with_ref("tea", "till-7-0001"), 10).unwrap();
    ea.push(first.clone());
    ea.push(a.record(sell_with_ref("tea", "till-7-0002"), 11).unwrap());

    let mut restored = Ledger::restore(m.ctx.clone(), m.device_key(1), a.certificate().clone(), ea).unwrap();
    assert_eq!(restored.state().sale_by_client_ref(&a.device(), "till-7-0001"), Some(sale_id(first.change.dot()).as_str()));
    match restored.record(sell_with_ref("tea", "till-7-0001"), 12) {
        Err(LedgerError::AlreadyRecorded { sale_id: id, .. }) => assert_eq!(id, sale_id(first.change.dot())),
        other => panic!("a retry after a restart must not sell twice: {other:?}"),
    }
    assert!(restored.record(sell_with_ref("tea", "till-7-0003"), 13).is_ok(), "a new client_ref sells");
    assert_eq!(restored.state().stock("tea").total, 2);
}

#[test]
fn a_client_ref_belongs_to_the_device_that_recorded_it() {
    let m = TestMarket::new(31);
    let (mut a, mut ea) = stocked(&m, 1, "tea", 5);
    let (mut b, eb) = stocked(&m, 2, "mint", 5);
    let a_sale = a.record(sell_with_ref("tea", "till-1-0001"), 10).unwrap();
    ea.push(a_sale.clone());
    b.apply_remote(changes(&ea));
    a.apply_remote(changes(&eb));

    // Every replica can name a device's sale by its client_ref ...
    let id = sale_id(a_sale.change.dot());
    assert_eq!(b.state().sale_by_client_ref(&a.device(), "till-1-0001"), Some(id.as_str()));
    assert_eq!(b.state().sale_by_client_ref(&b.device(), "till-1-0001"), None);
    assert_eq!(b.state().sale_by_client_ref(&a.device(), "till-1-0002"), None);
    // ... but only the device's own sales make a retry: another till may use the same numbering.
    assert!(b.record(sell_with_ref("mint", "till-1-0001"), 11).is_ok());
    assert!(matches!(a.record(sell_with_ref("tea", "till-1-0001"), 12), Err(LedgerError::AlreadyRecorded { .. })));
}

/// The recent-sales count a driver used to compute by scanning every sale of the day.
fn scanned_sales_since(state: &State, device: &DeviceId, since_ms: u64) -> u64 {
    state.sales.values().filter(|s| s.device == *device && s.time_ms >= since_ms).count() as u64
}

#[test]
fn recent_sales_are_counted_per_device_at_equal_times_and_with_a_clock_set_back() {
    let m = TestMarket::new(32);
    let (mut a, mut ea) = stocked(&m, 1, "tea", 100);
    let (mut b, eb) = stocked(&m, 2, "mint", 100);
    // Two sales in one millisecond, then the tablet's clock is set back 150 ms, then forward again.
    for time_ms in [100, 100, 200, 50, 300] {
        ea.push(a.record(sell("tea", 1), time_ms).unwrap());
    }
    ea.push(a.record(sell("tea", 1), 100).unwrap()); // back again, equal to earlier sales
    b.record(sell("mint", 1), 200).unwrap();
    let (a_id, b_id) = (a.device(), b.device());

    let counts =
        |s: &State, d: &DeviceId| -> Vec<u64> { [0, 50, 51, 100, 101, 200, 300, 301].map(|t| s.sales_of_device_since(d, t)).to_vec() };
    assert_eq!(counts(a.state(), &a_id), vec![6, 6, 5, 5, 2, 2, 1, 0]);
    assert_eq!(counts(a.state(), &b_id), vec![0; 8], "b's sale has not reached a");
    assert_eq!(counts(b.state(), &b_id), vec![1, 1, 1, 1, 1, 1, 0, 0]);
    for since_ms in 0..=301 {
        assert_eq!(a.state().sales_of_device_since(&a_id, since_ms), scanned_sales_since(a.state(), &a_id, since_ms), "since {since_ms}");
    }

    // A replica that applied a's journal, and a's own ledger restored from it, count the same.
    b.apply_remote(changes(&ea));
    let restored = Ledger::restore(m.ctx.clone(), m.device_key(1), a.certificate().clone(), ea).unwrap();
    assert_eq!(counts(b.state(), &a_id), counts(a.state(), &a_id));
    assert_eq!(counts(restored.state(), &a_id), counts(a.state(), &a_id));
    assert_eq!(restored.state(), a.state());
    drop(eb);
}

proptest::proptest! {
    /// Whatever the devices' clocks do, the indexes answer what a scan of the day's sales would.
    #[test]
    fn the_sale_indexes_agree_with_a_scan_of_the_sales(
        sales in proptest::collection::vec((0u8..3, 0u64..20, proptest::option::of(0u8..4)), 0..60),
    ) {
        let mut state = State::default();
        let mut next_seq = [1u64; 3];
        for (n, time_ms, client_ref) in &sales {
            let dot = Dot { device: DeviceId([*n; 32]), seq: next_seq[*n as usize] };
            next_seq[*n as usize] += 1;
            if dot.seq == 1 {
                state.fold(dot, &Event { time_ms: 0, body: EventBody::Restocked { sku: "tea".into(), qty: 1_000 } });
                continue;
            }
            let client_ref = client_ref.map(|r| format!("till-{r}"));
            let body = EventBody::Sold { lines: vec![line("tea", 1, 100)], total_cents: 100, currency: "EUR".into(), client_ref, recommendation: None, loyalty: None, staff: None };
            state.fold(dot, &Event { time_ms: *time_ms, body });
        }
        for n in 0..4u8 {
            let device = DeviceId([n; 32]);
            for since_ms in 0..=21 {
                proptest::prop_assert_eq!(state.sales_of_device_since(&device, since_ms), scanned_sales_since(&state, &device, since_ms));
            }
            for r in 0..5u8 {
                let client_ref = format!("till-{r}");
                let earliest = state
                    .sales
                    .values()
                    .filter(|s| s.device == device && s.client_ref.as_deref() == Some(client_ref.as_str()))
                    .min_by_key(|s| s.seq)
                    .map(|s| s.id.as_str());
                proptest::prop_assert_eq!(state.sale_by_client_ref(&device, &client_ref), earliest);
            }
        }
    }
}

#[test]
fn invalid_local_input_is_refused_with_the_field_named() {
    let m = TestMarket::new(11);
    let (mut a, _) = stocked(&m, 1, "oil", 5);
    assert_eq!(a.record(sell("nope", 1), 1), Err(LedgerError::UnknownSku("nope".into())));
    assert!(matches!(a.record(sell("oil", 0), 1), Err(LedgerError::Invalid { field: "qty", .. })));
    let mut p = product("bad sku", 1);
    assert!(matches!(a.record(LocalOp::UpsertProduct(p.clone()), 1), Err(LedgerError::Invalid { field: "sku", .. })));
    p.sku = "ok".into();
    p.currency = "euro".into();
    assert!(matches!(a.record(LocalOp::UpsertProduct(p), 1), Err(LedgerError::Invalid { field: "currency", .. })));
    assert!(matches!(
        a.record(LocalOp::Sell { lines: vec![], client_ref: None, recommendation: None, loyalty: None, staff: None }, 1),
        Err(LedgerError::Invalid { field: "lines", .. })
    ));
}

#[test]
fn a_bad_change_in_the_middle_of_a_batch_stops_the_batch_there() {
    let m = TestMarket::new(12);
    let (mut a, mut ea) = stocked(&m, 1, "rye", 100);
    for t in 0..5 {
        ea.push(a.record(sell("rye", 1), 10 + t).unwrap());
    }
    // Entry 5 is replaced by one a signs over another device's automerge change (wrong actor).
    let (mut other, _) = m.device(9, "Test Stall");
    let bytes = a_change_of(&mut other);
    let mut changes = changes(&ea);
    changes[5] = m.device_key(1).sign_change(m.ctx.market, 5, vec![], bytes);
    let (mut b, _) = m.device(2, "Test Stall");
    let r = b.apply_remote(changes);
    assert_eq!(r.applied.len(), 5, "entries 0..5 applied in one run");
    assert_eq!(r.rejected, vec![(ea[5].change.dot(), Rejection::WrongActor)]);
    assert_eq!(r.pending, 2, "what follows the bad change waits for a good one");
    // The good change arrives: everything applies.
    let r = b.apply_remote([ea[5].change.clone()]);
    assert_eq!((r.applied.len(), r.pending), (3, 0));
    assert_same_business_state(&a, &b);
}

/// The automerge bytes of some change made by `l` (another device).
fn a_change_of(l: &mut Ledger) -> Vec<u8> {
    l.record(LocalOp::UpsertProduct(product("other", 5)), 2).unwrap().change.change.to_vec()
}

#[test]
fn journal_documents_dropped_from_memory_are_rebuilt_and_the_journal_continues() {
    let m = TestMarket::new(13);
    let (mut a, mut ea) = stocked(&m, 1, "oat", 100);
    let (mut b, _) = m.device(2, "Test Stall");
    b.apply_remote(changes(&ea));
    // Both replicas forget every document (as the LRU bound does in a large market).
    drop_docs(&mut a);
    drop_docs(&mut b);
    for t in 0..3 {
        ea.push(a.record(sell("oat", 1), 20 + t).unwrap());
    }
    let r = b.apply_remote(changes(&ea[3..]));
    assert_eq!((r.applied.len(), r.rejected.len()), (3, 0));
    assert_same_business_state(&a, &b);
}

const JPEG_A: &[u8] = &[0xFF, 0xD8, 0xFF, 0xE0, 1, 2, 3];
const JPEG_B: &[u8] = &[0xFF, 0xD8, 0xFF, 0xE0, 4, 5, 6];

#[test]
fn product_photos_replicate_and_the_later_one_wins_on_every_replica() {
    let m = TestMarket::new(9);
    let (mut a, mut ea) = stocked(&m, 1, "honey", 3);
    let (mut b, eb0) = m.device(2, "Test Stall");
    a.apply_remote(changes(std::slice::from_ref(&eb0)));
    b.apply_remote(changes(&ea));
    ea.push(a.record(LocalOp::AttachPhoto { sku: "honey".into(), jpeg: JPEG_A.to_vec() }, 5).unwrap());
    b.apply_remote(changes(&ea));
    assert_eq!(b.state().photos["honey"].jpeg, JPEG_A);
    // b replaces it after seeing a's photo: a higher lamport, so it wins wherever it arrives.
    let eb = b.record(LocalOp::AttachPhoto { sku: "honey".into(), jpeg: JPEG_B.to_vec() }, 6).unwrap();
    a.apply_remote(changes(&[eb]));
    assert_eq!(a.state().photos, b.state().photos);
    assert_eq!(a.state().photos["honey"].jpeg, JPEG_B);

    let mut refuse = |op| matches!(a.record(op, 7), Err(LedgerError::Invalid { field: "photo", .. }) | Err(LedgerError::UnknownSku(_)));
    assert!(refuse(LocalOp::AttachPhoto { sku: "honey".into(), jpeg: b"GIF89a".to_vec() }), "not a JPEG");
    assert!(refuse(LocalOp::AttachPhoto { sku: "honey".into(), jpeg: vec![0xFF; MAX_PHOTO_BYTES + 1] }), "too large");
    assert!(refuse(LocalOp::AttachPhoto { sku: "nope".into(), jpeg: JPEG_A.to_vec() }), "unknown SKU");
}

#[test]
fn a_sale_carries_the_recommendations_shown_to_every_replica() {
    let m = TestMarket::new(10);
    let (mut a, ea) = stocked(&m, 1, "bread", 3);
    let (mut b, _) = m.device(2, "Test Stall");
    b.apply_remote(changes(&ea));
    let shown = RecommendationShown { arm: "treatment".into(), skus: vec!["butter".into(), "jam".into()] };
    let op =
        LocalOp::Sell { lines: vec![LineRequest { sku: "bread".into(), qty: 1 }], client_ref: None, recommendation: Some(shown.clone()), loyalty: None, staff: None };
    let sale = a.record(op, 9).unwrap();
    b.apply_remote(changes(&[sale]));
    let on_b: Vec<_> = b.state().sales.values().map(|s| s.recommendation.clone()).collect();
    assert_eq!(on_b, vec![Some(shown)]);
    let bad = RecommendationShown { arm: "maybe".into(), skus: vec![] };
    let op = LocalOp::Sell { lines: vec![LineRequest { sku: "bread".into(), qty: 1 }], client_ref: None, recommendation: Some(bad), loyalty: None, staff: None };
    assert!(matches!(a.record(op, 10), Err(LedgerError::Invalid { field: "recommendation.arm", .. })));
}

#[test]
fn heads_name_the_devices_changed_since_a_total_without_walking_the_others() {
    let m = TestMarket::new(9);
    let (mut a, _) = stocked(&m, 1, "honey", 10);
    let (mut b, b0) = m.device(2, "Test Stall");
    let (_, c0) = m.device(3, "Test Stall");
    assert_eq!(a.apply_remote(vec![b0.change.clone(), c0.change.clone()]).applied.len(), 2);
    let before = a.heads_ref().total();
    assert_eq!(a.heads_ref().changed_since(before).count(), 0, "nothing changed since the current total");

    let b1 = b.record(LocalOp::UpsertProduct(product("jam", 400)), 5).unwrap();
    assert_eq!(a.apply_remote(vec![b1.change]).applied.len(), 1);
    let changed: Vec<(DeviceId, u64)> = a.heads_ref().changed_since(before).map(|(d, n)| (*d, n)).collect();
    assert_eq!(changed, vec![(b.device(), 2)], "only b's journal grew");

    a.record(sell("honey", 1), 10).unwrap();
    let changed: Vec<(DeviceId, u64)> = a.heads_ref().changed_since(before).map(|(d, n)| (*d, n)).collect();
    assert_eq!(changed, vec![(b.device(), 2), (a.device(), 4)], "each changed device once, oldest change first");
    assert_eq!(a.heads_ref().changed_since(0).count(), 3, "since the beginning: every device");
}

/// Every copy of `c` with one bit flipped, in the signed fields and in the signature.
fn bit_flipped(c: &SignedChange) -> Vec<SignedChange> {
    let mut out = Vec::new();
    for i in (0..c.change.len()).step_by(7) {
        let mut bytes = c.change.to_vec();
        bytes[i] ^= 0x10;
        out.push(SignedChange { change: bytes.into(), ..c.clone() });
    }
    for i in (0..64).step_by(9) {
        let mut f = c.clone();
        f.signature.0[i] ^= 0x01;
        out.push(f);
    }
    let mut f = c.clone();
    f.causal.push(Dot { device: c.device, seq: 0 });
    out.push(f);
    out
}

#[test]
fn an_altered_copy_of_a_held_change_is_rejected_as_forged_not_counted_as_a_duplicate() {
    let m = TestMarket::new(40);
    let (mut a, mut ea) = stocked(&m, 1, "honey", 5);
    ea.push(a.record(sell("honey", 2), 3).unwrap());
    let (mut b, _) = m.device(2, "Test Stall");
    assert_eq!(b.apply_remote(changes(&ea)).applied.len(), 4);
    let before = b.state().clone();
    for held in &ea {
        let replay = b.apply_remote([held.change.clone()]);
        assert_eq!((replay.duplicates, replay.rejected.len()), (1, 0), "the same bytes again are a duplicate");
        for forged in bit_flipped(&held.change) {
            let r = b.apply_remote([forged]);
            assert_eq!(r.duplicates, 0, "altered bytes are not the change held");
            assert!(r.evidence.is_empty(), "a forgery is no evidence against its device");
            assert_eq!(r.rejected.len(), 1);
            assert_eq!(r.rejected[0].1, Rejection::BadSignature);
        }
    }
    assert_eq!(b.state(), &before, "nothing changed");
    assert!(b.forked_devices().is_empty());
}

/// Two tablets holding the same credentials, each with its own journal (a clone, or a reset tablet
/// that started a new journal).
fn clones(m: &TestMarket) -> (Ledger, Vec<Entry>, Ledger, Vec<Entry>) {
    let key = m.device_key(1);
    let cert = m.key.enrol(key.device_id(), "Test Stall", stallmesh_identity::Role::Organiser, u64::MAX);
    let fork = |start_ms: u64, qty: u64| {
        let mut l = Ledger::new(m.ctx.clone(), m.device_key(1), cert.clone());
        let mut e = vec![l.enrol_self(start_ms).unwrap().unwrap()];
        e.push(l.record(LocalOp::UpsertProduct(product("jam", 300)), start_ms + 1).unwrap());
        e.push(l.record(LocalOp::Restock { sku: "jam".into(), qty }, start_ms + 2).unwrap());
        for t in 0..qty {
            e.push(l.record(sell("jam", 1), start_ms + 3 + t).unwrap());
        }
        (l, e)
    };
    let (x, ex) = fork(1_000, 3);
    let (y, ey) = fork(2_000, 5);
    (x, ex, y, ey)
}

/// Every change a replica holds or keeps as evidence for `device`.
fn all_digests(l: &Ledger, device: DeviceId, held: &[Entry]) -> std::collections::BTreeSet<ChangeDigest> {
    let mut out: std::collections::BTreeSet<ChangeDigest> = held.iter().filter_map(|e| l.held_digest(e.change.dot())).collect();
    out.extend(l.evidence().iter().filter(|(d, _)| d.device == device).flat_map(|(_, v)| v.iter().map(|c| c.digest())));
    out
}

#[test]
fn two_journals_signed_with_one_key_are_detected_on_every_replica_that_sees_both_and_kept_as_evidence() {
    let m = TestMarket::new(41);
    let (mut x, ex, mut y, ey) = clones(&m);
    let device = x.device();
    let (mut c, _) = m.device(2, "Test Stall");
    let (mut d, _) = m.device(3, "Test Stall");
    // c sees x's journal first, d sees y's first: each applies the first and keeps the other as evidence.
    let first = c.apply_remote(changes(&ex));
    assert_eq!(first.applied.len(), ex.len());
    let second = c.apply_remote(changes(&ey));
    assert!(second.applied.is_empty(), "a second history is never applied");
    assert_eq!(second.duplicates, 0);
    assert_eq!(second.evidence.len(), ey.len(), "every change of the other history is evidence: {second:?}");
    assert!(second.rejected.iter().all(|(_, r)| *r == Rejection::Equivocation));
    d.apply_remote(changes(&ey));
    d.apply_remote(changes(&ex));
    for replica in [&c, &d] {
        assert!(replica.forked_devices().contains(&device));
        assert_eq!(
            replica.stats().rejected.get("equivocation").copied().unwrap_or(0) as usize,
            replica.evidence().values().map(Vec::len).sum::<usize>()
        );
    }
    let every: std::collections::BTreeSet<ChangeDigest> = ex.iter().chain(&ey).map(|e| e.change.digest()).collect();
    assert_eq!(all_digests(&c, device, &ex), every, "c holds one history and keeps the other");
    assert_eq!(all_digests(&d, device, &ey), every, "d holds both, the other way round");

    // Seeing it again adds nothing: evidence is kept once.
    assert!(c.apply_remote(changes(&ey)).evidence.is_empty());

    // Each clone, once it sees the other's journal, stops recording: its sales would spend the same rights.
    assert!(!x.is_cloned());
    x.apply_remote(changes(&ey));
    assert!(x.is_cloned());
    assert_eq!(x.record(sell("jam", 1), 9_000).unwrap_err(), LedgerError::Cloned);
    y.apply_remote(changes(&ex[..1]));
    assert_eq!(y.record(sell("jam", 1), 9_000).unwrap_err(), LedgerError::Cloned);

    // A replica restored with its kept evidence knows the fork after a restart.
    let mut restored = Ledger::new(m.ctx.clone(), m.device_key(2), c.certificate().clone());
    restored.restore_evidence(c.evidence().values().flatten().cloned());
    assert_eq!(restored.evidence(), c.evidence());
    assert!(restored.forked_devices().contains(&device));
}

#[test]
fn what_a_conflicting_change_recorded_can_be_read_from_the_change_alone() {
    let m = TestMarket::new(42);
    let (_x, ex, _y, ey) = clones(&m);
    let (mut z, _) = m.device(3, "Test Stall");
    z.record(LocalOp::UpsertProduct(Product { tags: vec!["a".into(), "b".into()], ..product("tea", 120) }), 1).unwrap();
    let with_tags_and_lines = vec![
        z.record(LocalOp::UpsertProduct(Product { tags: vec!["x".into()], ..product("cup", 80) }), 2).unwrap(),
        z.record(LocalOp::Restock { sku: "tea".into(), qty: 9 }, 3).unwrap(),
        z.record(LocalOp::Restock { sku: "cup".into(), qty: 9 }, 4).unwrap(),
        z.record(
            LocalOp::Sell {
                lines: vec![LineRequest { sku: "tea".into(), qty: 2 }, LineRequest { sku: "cup".into(), qty: 3 }],
                client_ref: Some("till-7".into()),
                recommendation: Some(RecommendationShown { arm: "treatment".into(), skus: vec!["cup".into()] }),
                loyalty: None,
                staff: None,
            },
            5,
        )
        .unwrap(),
    ];
    for e in ex.iter().chain(&ey).chain(&with_tags_and_lines) {
        assert_eq!(decode_change_event(&e.change).unwrap(), e.event, "{:?}", e.change.dot());
    }
    // Objects that contain each other (only a crafted change has them) are refused, not walked forever.
    let (mut w, _) = m.device(4, "Test Stall");
    let cyclic = {
        let me = w.device();
        let seg = w.journals.get_mut(&me).unwrap().doc(&me).unwrap();
        let mut tx = seg.doc.transaction();
        let list = seg.events.clone().unwrap();
        let map = tx.insert_object(&list, 1, ObjType::Map).unwrap();
        tx.put(&map, "kind", "sale").unwrap();
        tx.commit();
        let raw = seg.doc.get_last_local_change().unwrap().raw_bytes().to_vec();
        let mut expanded = Change::from_bytes(raw).unwrap().decode();
        // Point the event map at an object the change makes inside it.
        let inner = automerge::legacy::ObjectId::Id(automerge::legacy::OpId(expanded.start_op.get() + 1, expanded.actor_id.clone()));
        expanded.operations[0].obj = inner;
        expanded.operations[1].action = automerge::legacy::OpType::Make(ObjType::List);
        expanded.operations[1].obj =
            automerge::legacy::ObjectId::Id(automerge::legacy::OpId(expanded.start_op.get(), expanded.actor_id.clone()));
        expanded.hash = None;
        Change::from(expanded).raw_bytes().to_vec()
    };
    let mut c = ey[3].change.clone();
    c.change = cyclic.into();
    assert_eq!(decode_change_event(&c), Err("the change's objects contain each other".to_string()));
    // Bytes that are no automerge change are an error, never a guess or a panic.
    let mut broken = ey[3].change.clone();
    broken.change = bytes::Bytes::from_static(b"not a change");
    assert!(decode_change_event(&broken).is_err());
}

/// Signs `body` as `l`'s next journal entry without `l`'s own validation: a buggy or stolen tablet.
fn forge(l: &mut Ledger, body: EventBody) -> Entry {
    l.allow_overspend_for_tests = true;
    let entry = l.commit_local(Event { time_ms: 40, body }).unwrap();
    l.allow_overspend_for_tests = false;
    entry
}

/// `b` receives a fresh device's enrolment and legitimately recorded `setup`, then a change signed
/// over `bad`: asserts it is refused as an invalid event and changes nothing; returns the reason.
fn refused_by_peer(m: &TestMarket, b: &mut Ledger, n: u16, setup: Vec<LocalOp>, bad: EventBody) -> String {
    let (mut f, e0) = m.device(n, "Test Stall");
    let mut good = vec![e0];
    good.extend(setup.into_iter().map(|op| f.record(op, 30).unwrap()));
    let r = b.apply_remote(changes(&good));
    assert_eq!((r.applied.len(), r.rejected.len()), (good.len(), 0), "{:?}", r.rejected);
    let bad = forge(&mut f, bad);
    let before = b.state().clone();
    let r = b.apply_remote([bad.change.clone()]);
    assert_eq!(r.applied.len(), 0);
    assert_eq!(b.state(), &before, "a refused change leaves the state as it was");
    match &r.rejected[..] {
        [(dot, why @ Rejection::Fold(FoldError::Invalid(reason)))] if *dot == bad.change.dot() => {
            assert_eq!(why.label(), "invalid_event");
            reason.clone()
        }
        other => panic!("expected one invalid_event rejection, got {other:?}"),
    }
}

fn a_peer(m: &TestMarket) -> Ledger {
    m.device(99, "Test Stall").0
}

fn sale_of(lines: Vec<SaleLine>, total_cents: u64) -> EventBody {
    EventBody::Sold { lines, total_cents, currency: "EUR".into(), client_ref: None, recommendation: None, loyalty: None, staff: None }
}

fn line(sku: &str, qty: u64, price_cents: u64) -> SaleLine {
    SaleLine { sku: sku.into(), qty, price_cents }
}

#[test]
fn a_remote_restock_of_u64_max_is_refused_like_a_local_one() {
    let m = TestMarket::new(20);
    let mut b = a_peer(&m);
    let setup = vec![LocalOp::UpsertProduct(product("honey", 250))];
    let reason = refused_by_peer(&m, &mut b, 1, setup, EventBody::Restocked { sku: "honey".into(), qty: u64::MAX });
    assert!(reason.contains("qty"), "{reason}");
    assert_eq!(
        b.record(LocalOp::Restock { sku: "honey".into(), qty: u64::MAX }, 50).unwrap_err(),
        LedgerError::Invalid { field: "qty", problem: format!("must be 1..={MAX_QTY}") }
    );
}

#[test]
fn two_remote_restocks_of_2_pow_63_never_wrap_the_stock() {
    let m = TestMarket::new(21);
    let mut b = a_peer(&m);
    let honey = || vec![LocalOp::UpsertProduct(product("honey", 250))];
    let half = EventBody::Restocked { sku: "honey".into(), qty: 1 << 63 };
    refused_by_peer(&m, &mut b, 1, honey(), half.clone());
    refused_by_peer(&m, &mut b, 2, honey(), half);
    assert_eq!(b.state().stock("honey").total, 0);
}

#[test]
fn a_restock_taking_the_markets_rights_past_u64_max_is_refused() {
    let m = TestMarket::new(22);
    let mut b = a_peer(&m);
    // No sequence of valid changes gets this far (1.8e13 restocks): seed the state instead.
    let (holder, room) = (m.device_key(7).device_id(), 10);
    b.state.rights.entry("honey".into()).or_default().insert(holder, u64::MAX - room);

    let (mut a, ea0) = m.device(1, "Test Stall");
    let mut ea = vec![ea0, a.record(LocalOp::UpsertProduct(product("honey", 250)), 1).unwrap()];
    b.apply_remote(changes(&ea));
    ea.push(a.record(LocalOp::Restock { sku: "honey".into(), qty: room + 1 }, 2).unwrap());
    let before = b.state().clone();
    let r = b.apply_remote(changes(&ea[2..]));
    assert!(
        matches!(&r.rejected[..], [(_, Rejection::Fold(FoldError::Invalid(reason)))] if reason.contains("u64::MAX")),
        "{:?}",
        r.rejected
    );
    assert_eq!(b.state(), &before);

    // Exactly up to the limit is fine, and the total is still exact.
    let (mut c, ec0) = m.device(2, "Test Stall");
    c.apply_remote(changes(&ea[..2]));
    let ec = vec![ec0, c.record(LocalOp::Restock { sku: "honey".into(), qty: room }, 3).unwrap()];
    assert_eq!(b.apply_remote(changes(&ec)).applied.len(), 2);
    assert_eq!(b.state().stock("honey").total, u64::MAX);
}

#[test]
fn remote_events_beyond_the_local_limits_are_refused_with_the_field_named() {
    let m = TestMarket::new(23);
    let mut b = a_peer(&m);
    let with = |f: fn(&mut Product)| {
        let mut p = product("honey", 250);
        f(&mut p);
        EventBody::ProductUpserted { product: p.into(), lamport: 1 }
    };
    let honey = || vec![LocalOp::UpsertProduct(product("honey", 250))];
    // Twice MAX_QTY, so the forger itself can fold a transfer of MAX_QTY + 1.
    let restock = || LocalOp::Restock { sku: "honey".into(), qty: MAX_QTY };
    let stocked = || vec![LocalOp::UpsertProduct(product("honey", 250)), restock(), restock()];
    let photo = |jpeg: Vec<u8>| EventBody::PhotoAttached { sku: "honey".into(), jpeg, lamport: 2 };
    let cases: Vec<(&str, Vec<LocalOp>, EventBody)> = vec![
        ("price_cents", vec![], with(|p| p.price_cents = MAX_PRICE_CENTS + 1)),
        ("sku", vec![], with(|p| p.sku = "bad sku".into())),
        ("sku", vec![], with(|p| p.sku = "x".repeat(MAX_SKU_LEN + 1))),
        ("name", vec![], with(|p| p.name = " ".into())),
        ("stall", vec![], with(|p| p.stall = "x".repeat(MAX_NAME_LEN + 1))),
        ("currency", vec![], with(|p| p.currency = "euro".into())),
        ("tags", vec![], with(|p| p.tags = vec!["t".into(); MAX_TAGS + 1])),
        ("tags", vec![], with(|p| p.tags = vec!["t".repeat(MAX_TAG_LEN + 1)])),
        ("qty", honey(), EventBody::Restocked { sku: "honey".into(), qty: MAX_QTY + 1 }),
        ("qty", honey(), EventBody::Restocked { sku: "honey".into(), qty: 0 }),
        ("qty", stocked(), EventBody::Transferred { sku: "honey".into(), qty: MAX_QTY + 1, to: b.device() }),
        ("qty", stocked(), sale_of(vec![line("honey", MAX_QTY + 1, 1)], MAX_QTY + 1)),
        ("price_cents", stocked(), sale_of(vec![line("honey", 1, MAX_PRICE_CENTS + 1)], MAX_PRICE_CENTS + 1)),
        (
            "currency",
            stocked(),
            EventBody::Sold {
                lines: vec![line("honey", 1, 250)],
                total_cents: 250,
                currency: "€".into(),
                client_ref: None,
                recommendation: None,
                loyalty: None,
                staff: None,
            },
        ),
        (
            "client_ref",
            stocked(),
            EventBody::Sold {
                lines: vec![line("honey", 1, 250)],
                total_cents: 250,
                currency: "EUR".into(),
                client_ref: Some("r".repeat(MAX_CLIENT_REF_LEN + 1)),
                recommendation: None,
                loyalty: None,
                staff: None,
            },
        ),
        (
            "recommendation.arm",
            stocked(),
            EventBody::Sold {
                lines: vec![line("honey", 1, 250)],
                total_cents: 250,
                currency: "EUR".into(),
                client_ref: None,
                recommendation: Some(RecommendationShown { arm: "maybe".into(), skus: vec![] }),
                loyalty: None,
                staff: None,
            },
        ),
        (
            "recommendation.skus",
            stocked(),
            EventBody::Sold {
                lines: vec![line("honey", 1, 250)],
                total_cents: 250,
                currency: "EUR".into(),
                client_ref: None,
                recommendation: Some(RecommendationShown { arm: "control".into(), skus: vec!["jam".into(); MAX_RECOMMENDED + 1] }),
                loyalty: None,
                staff: None,
            },
        ),
        ("photo", honey(), photo(vec![0xFF; MAX_PHOTO_BYTES + 1])),
        ("photo", honey(), photo(b"GIF89a".to_vec())),
        ("photo", honey(), photo(vec![])),
    ];
    for (n, (field, setup, bad)) in cases.into_iter().enumerate() {
        let reason = refused_by_peer(&m, &mut b, n as u16 + 1, setup, bad);
        assert!(reason.starts_with(&format!("{field}: ")), "case {n}: {reason}");
    }
}

#[test]
fn a_remote_sale_with_too_many_lines_is_refused() {
    let m = TestMarket::new(24);
    let mut b = a_peer(&m);
    let stocked = vec![LocalOp::UpsertProduct(product("honey", 250)), LocalOp::Restock { sku: "honey".into(), qty: 1_000 }];
    let lines = vec![line("honey", 1, 250); MAX_SALE_LINES + 1];
    let total = 250 * lines.len() as u64;
    let reason = refused_by_peer(&m, &mut b, 1, stocked, sale_of(lines, total));
    assert!(reason.starts_with("lines: "), "{reason}");
}

#[test]
fn a_remote_sale_whose_total_disagrees_with_its_lines_is_refused() {
    let m = TestMarket::new(25);
    let mut b = a_peer(&m);
    let stocked = vec![LocalOp::UpsertProduct(product("honey", 250)), LocalOp::Restock { sku: "honey".into(), qty: 10 }];
    let reason = refused_by_peer(&m, &mut b, 1, stocked, sale_of(vec![line("honey", 2, 250)], 1));
    assert!(reason.starts_with("total_cents: "), "{reason}");
}

#[test]
fn a_remote_sale_whose_line_product_overflows_is_refused() {
    let m = TestMarket::new(26);
    let mut b = a_peer(&m);
    let honey = vec![LocalOp::UpsertProduct(product("honey", 250))];
    // 2^32 units at 2^32 cents: 2^64, which wraps to 0 in u64.
    refused_by_peer(&m, &mut b, 1, honey, sale_of(vec![line("honey", 1 << 32, 1 << 32)], 0));
}

#[test]
fn restoring_a_journal_holding_an_event_beyond_the_limits_fails() {
    let m = TestMarket::new(27);
    let (mut a, mut ea) = stocked(&m, 1, "honey", 5);
    ea.push(forge(&mut a, EventBody::Restocked { sku: "honey".into(), qty: u64::MAX - 5 }));
    let bad = ea[3].change.dot();
    match Ledger::restore(m.ctx.clone(), m.device_key(1), a.certificate().clone(), ea) {
        Err(RestoreError::Fold { dot, error: FoldError::Invalid(reason) }) => {
            assert_eq!(dot, bad);
            assert!(reason.starts_with("qty: "), "{reason}");
        }
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("restored a journal with a restock of u64::MAX - 5"),
    }
}

#[test]
fn local_limits_name_the_field_and_the_limit() {
    let m = TestMarket::new(28);
    let (mut a, _) = stocked(&m, 1, "oil", 5);
    let invalid = |field, problem: String| Err(LedgerError::Invalid { field, problem });
    let qty = || invalid("qty", format!("must be 1..={MAX_QTY}"));
    assert_eq!(a.record(LocalOp::Restock { sku: "oil".into(), qty: MAX_QTY + 1 }, 1), qty());
    assert_eq!(a.record(sell("oil", MAX_QTY + 1), 1), qty());
    let mut p = product("oil", MAX_PRICE_CENTS + 1);
    assert_eq!(a.record(LocalOp::UpsertProduct(p.clone()), 1), invalid("price_cents", format!("must be at most {MAX_PRICE_CENTS}")));
    p.price_cents = 1;
    p.tags = vec!["t".into(); MAX_TAGS + 1];
    assert_eq!(a.record(LocalOp::UpsertProduct(p), 1), invalid("tags", format!("at most {MAX_TAGS} tags of 1..={MAX_TAG_LEN} bytes")));
    let lines = vec![LineRequest { sku: "oil".into(), qty: 1 }; MAX_SALE_LINES + 1];
    assert_eq!(
        a.record(LocalOp::Sell { lines, client_ref: None, recommendation: None, loyalty: None, staff: None }, 1),
        invalid("lines", format!("must hold 1..={MAX_SALE_LINES} lines"))
    );
    let big_ref = Some("r".repeat(MAX_CLIENT_REF_LEN + 1));
    let op = LocalOp::Sell { lines: vec![LineRequest { sku: "oil".into(), qty: 1 }], client_ref: big_ref, recommendation: None, loyalty: None, staff: None };
    assert_eq!(a.record(op, 1), invalid("client_ref", format!("must be 1..={MAX_CLIENT_REF_LEN} bytes")));
    assert_eq!(a.state().stock("oil").total, 5, "nothing was recorded");
}

#[test]
fn a_summary_of_revenue_past_u64_max_saturates_instead_of_panicking() {
    // Each sale is within the limits (100 lines of MAX_QTY at MAX_PRICE_CENTS: 1e17 cents); 200 of
    // them sum past u64::MAX.
    let mut state = State::default();
    let device = DeviceId([7; 32]);
    let sales = 200u64;
    let lines = vec![line("gold", MAX_QTY, MAX_PRICE_CENTS); MAX_SALE_LINES];
    let sale_units = MAX_QTY * MAX_SALE_LINES as u64;
    state.rights.entry("gold".into()).or_default().insert(device, sale_units * sales);
    let sale_cents = sale_units * MAX_PRICE_CENTS;
    for seq in 1..=sales {
        let event = Event { time_ms: 0, body: sale_of(lines.clone(), sale_cents) };
        state.check(Dot { device, seq }, &event).unwrap();
        state.fold(Dot { device, seq }, &event);
    }
    let s = state.summary();
    assert_eq!(s.revenue_cents["EUR"], u64::MAX);
    assert_eq!(s.revenue_cents_per_hour[&0], u64::MAX);
    assert_eq!(s.average_order_cents, sale_cents, "the average is exact");
    assert_eq!((s.sales, s.units), (sales, sale_units * sales));
}

#[test]
fn a_photo_of_the_largest_size_replicates() {
    let m = TestMarket::new(29);
    let (mut a, mut ea) = stocked(&m, 1, "honey", 5);
    // Incompressible, like a real JPEG.
    let mut jpeg: Vec<u8> = (0..MAX_PHOTO_BYTES as u64).map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8).collect();
    jpeg[..3].copy_from_slice(&[0xFF, 0xD8, 0xFF]);
    ea.push(a.record(LocalOp::AttachPhoto { sku: "honey".into(), jpeg }, 5).unwrap());
    let change_bytes = ea[3].change.change.len();
    assert!(change_bytes <= MAX_PHOTO_BYTES + validate::PHOTO_CHANGE_ENVELOPE_BYTES, "{change_bytes}");
    let mut b = a_peer(&m);
    let r = b.apply_remote(changes(&ea));
    assert_eq!((r.applied.len(), r.rejected.len()), (4, 0), "{:?}", r.rejected);
}

#[test]
fn a_peers_product_beyond_the_catalogue_clock_limit_is_refused_and_local_upserts_go_on() {
    let m = TestMarket::new(30);
    let (mut a, ea0) = m.device(1, "Test Stall");
    let last = forge(&mut a, EventBody::ProductUpserted { product: product("honey", 250).into(), lamport: u64::MAX });
    let mut b = a_peer(&m);
    let report = b.apply_remote(changes(&[ea0, last]));
    assert_eq!(report.applied.len(), 1, "the enrolment only");
    assert_eq!(report.rejected[0].1.label(), "invalid_event", "{report:?}");
    b.record(LocalOp::UpsertProduct(product("jam", 100)), 5).expect("the clock is not exhausted");
    // At the limit itself, a local upsert is refused rather than going past it.
    let (mut c, ec0) = m.device(3, "Test Stall");
    let at_limit = forge(&mut c, EventBody::ProductUpserted { product: product("tea", 250).into(), lamport: validate::MAX_LAMPORT });
    let mut d = a_peer(&m);
    assert_eq!(d.apply_remote(changes(&[ec0, at_limit])).applied.len(), 2);
    assert!(matches!(d.record(LocalOp::UpsertProduct(product("jam", 100)), 5), Err(LedgerError::Invalid { field: "lamport", .. })));
}

#[test]
fn the_largest_sale_the_limits_accept_fits_in_one_change() {
    let m = TestMarket::new(33);
    let (mut a, _) = m.device(1, "Test Stall");
    let sku = |i: usize| format!("{i:03}{}", "S".repeat(MAX_SKU_LEN - 3));
    for i in 0..MAX_SALE_LINES {
        a.record(LocalOp::UpsertProduct(product(&sku(i), MAX_PRICE_CENTS)), 1).unwrap();
        a.record(LocalOp::Restock { sku: sku(i), qty: MAX_QTY }, 2).unwrap();
    }
    let sale = LocalOp::Sell {
        lines: (0..MAX_SALE_LINES).map(|i| LineRequest { sku: sku(i), qty: MAX_QTY }).collect(),
        client_ref: Some("r".repeat(MAX_CLIENT_REF_LEN)),
        recommendation: Some(RecommendationShown { arm: "treatment".into(), skus: (0..MAX_RECOMMENDED).map(sku).collect() }),
        loyalty: None,
        staff: None,
    };
    let entry = a.record(sale, 3).unwrap();
    let change_bytes = entry.change.change.len();
    let texts_bytes = (MAX_SALE_LINES + MAX_RECOMMENDED) * MAX_SKU_LEN + MAX_CLIENT_REF_LEN;
    let per_line_bytes = change_bytes.saturating_sub(texts_bytes) / (MAX_SALE_LINES + MAX_RECOMMENDED);
    assert!(per_line_bytes <= validate::SALE_LINE_ENVELOPE_BYTES, "{per_line_bytes} bytes a line beyond its SKU ({change_bytes} in all)");
    assert!(change_bytes <= MAX_CHANGE_BYTES, "{change_bytes}");
}

/// Found by `fuzz/enrolled_peer_change`: an enrolled peer's correctly signed change whose automerge
/// graph makes automerge assert (`change_graph.rs`). Before, the panic escaped `apply_remote`: a
/// node failed under its lock, so one tablet's bad bytes could stop every tablet of the market.
#[test]
fn an_enrolled_peers_change_that_makes_automerge_panic_is_refused_and_the_ledger_goes_on() {
    let bytes = include_bytes!("fuzz-crash-automerge-seq.bin");
    let m = TestMarket::new(7);
    let (mut tablet, _) = m.device(1, "Test Stall");
    let (mut peer, peer_enrolment) = m.device(2, "Test Stall");
    tablet.apply_remote(vec![peer_enrolment.change.clone()]);
    let forged = m.device_key(2).sign_change(m.ctx.market, 1, vec![], bytes.to_vec());
    let report = tablet.apply_remote(vec![forged]);
    assert!(report.applied.is_empty());
    assert!(matches!(report.rejected.as_slice(), [(_, Rejection::Malformed(_))]), "{:?}", report.rejected);
    // The tablet goes on recording, and the peer's real next change still applies.
    tablet.record(LocalOp::UpsertProduct(product("TEA", 300)), 1).unwrap();
    let real = peer.record(LocalOp::UpsertProduct(product("JAM", 400)), 2).unwrap();
    let report = tablet.apply_remote(vec![real.change]);
    assert_eq!(report.applied.len(), 1, "{:?}", report.rejected);
    assert!(tablet.state().products.contains_key("JAM"));
}

#[test]
fn a_skus_holders_are_kept_in_device_order_whatever_order_they_arrive_in() {
    let (a, b, c) = (DeviceId([3; 32]), DeviceId([1; 32]), DeviceId([2; 32]));
    let mut one = crate::Holders::default();
    let mut other = crate::Holders::default();
    for (d, n) in [(a, 5), (b, 1), (c, 7)] {
        *one.held_mut(d) += n;
    }
    for (d, n) in [(c, 7), (a, 5), (b, 1)] {
        other.insert(d, n);
    }
    assert_eq!(one, other, "the same holders compare equal on every replica");
    assert_eq!(one.iter().map(|(d, n)| (*d, *n)).collect::<Vec<_>>(), vec![(b, 1), (c, 7), (a, 5)]);
    assert_eq!(one.get(&c), Some(&7));
    assert_eq!(one.get(&DeviceId([9; 32])), None);
    *one.get_mut(&a).unwrap() -= 5;
    assert_eq!(one.values().sum::<u64>(), 8);
    assert_eq!(one.len(), 3, "a holder spent to zero is still listed, as before");
}
