//! Specifications of drops and of the online channel's role.

use super::testkit::{product, sell, TestMarket};
use super::*;
use stallmesh_identity::Role;

fn changes(entries: &[Entry]) -> Vec<SignedChange> {
    entries.iter().map(|e| e.change.clone()).collect()
}

fn plan_drop(units: u64, start_ms: u64, plan: Vec<(DeviceId, u64)>) -> LocalOp {
    LocalOp::PlanDrop { name: "Summer tote".into(), sku: "tote".into(), units, start_ms, plan, max_per_buyer: None }
}

/// An organiser with the product, a seller and an online device, each knowing the others.
struct Market {
    m: TestMarket,
    organiser: Ledger,
    seller: Ledger,
    online: Ledger,
    log: Vec<Entry>,
}

fn market(seed: u8) -> Market {
    let m = TestMarket::new(seed);
    let (mut organiser, e0) = m.device(1, "Office");
    let (mut seller, s0) = m.device_as(2, "Totes", Role::Seller);
    let (mut online, o0) = m.device_as(3, "online", Role::Online);
    let p = organiser.record(LocalOp::UpsertProduct(product("tote", 3_500)), 1).unwrap();
    let log = vec![e0, s0, o0, p];
    for l in [&mut organiser, &mut seller, &mut online] {
        l.apply_remote(changes(&log));
    }
    Market { m, organiser, seller, online, log }
}

#[test]
fn a_drop_gives_each_planned_device_its_share_and_nothing_of_it_sells_before_it_opens() {
    let mut k = market(40);
    let plan = vec![(k.seller.device(), 30), (k.online.device(), 20)];
    let drop = k.organiser.record(plan_drop(50, 10_000, plan), 100).unwrap();
    k.seller.apply_remote(changes(std::slice::from_ref(&drop)));
    k.online.apply_remote(changes(std::slice::from_ref(&drop)));

    for l in [&k.organiser, &k.seller, &k.online] {
        assert_eq!(l.state().rights_of("tote", &k.seller.device()), 30);
        assert_eq!(l.state().rights_of("tote", &k.online.device()), 20);
        assert_eq!(l.state().rights_of("tote", &k.organiser.device()), 0, "the organiser keeps only what it planned for itself");
        let d = l.state().drops.values().next().expect("the drop is known everywhere");
        assert_eq!((d.units, d.start_ms, d.name.as_str()), (50, 10_000, "Summer tote"));
    }

    let early = k.seller.record(sell("tote", 1), 9_999).unwrap_err();
    assert!(matches!(&early, LedgerError::DropNotStarted { start_ms: 10_000, .. }), "{early:?}");
    assert!(k.seller.state().sales.is_empty(), "a refused sale changes nothing");
    let early_online = k.online.record(sell("tote", 1), 5_000).unwrap_err();
    assert!(matches!(early_online, LedgerError::DropNotStarted { .. }));

    let sale = k.seller.record(sell("tote", 30), 10_000).unwrap();
    assert_eq!(sale.change.causal, vec![drop.change.dot()], "the first spend names the drop it spends");
    let over = k.seller.record(sell("tote", 1), 10_001).unwrap_err();
    assert!(matches!(over, LedgerError::InsufficientRights { held_here: 0, held_elsewhere_total: 20, .. }), "{over:?}");
    k.online.record(sell("tote", 20), 10_002).unwrap();
}

#[test]
fn a_sale_of_drop_units_waits_on_a_replica_until_the_drop_arrives() {
    let mut k = market(41);
    let drop = k.organiser.record(plan_drop(5, 0, vec![(k.seller.device(), 5)]), 100).unwrap();
    k.seller.apply_remote(changes(std::slice::from_ref(&drop)));
    let sale = k.seller.record(sell("tote", 5), 200).unwrap();

    let (mut other, _) = k.m.device(9, "Other");
    other.apply_remote(changes(&k.log));
    other.apply_remote(changes(std::slice::from_ref(&sale)));
    assert!(other.state().sales.is_empty(), "the sale spends rights the drop gives: it waits for it");
    let report = other.apply_remote(changes(std::slice::from_ref(&drop)));
    assert_eq!(report.applied.len(), 2, "the drop, then the sale it released");
    assert_eq!(other.state().rights, k.seller.state().rights);
    assert_eq!(other.state().drops, k.seller.state().drops);
}

#[test]
fn only_an_organiser_plans_a_drop_and_replicas_refuse_anyone_elses() {
    let mut k = market(42);
    let plan = vec![(k.seller.device(), 1)];
    let e = k.seller.record(plan_drop(1, 0, plan.clone()), 100).unwrap_err();
    assert!(matches!(e, LedgerError::RoleForbids { what: "drops", .. }), "{e:?}");
    let e = k.online.record(plan_drop(1, 0, plan.clone()), 100).unwrap_err();
    assert!(matches!(e, LedgerError::RoleForbids { role: "online", .. }), "{e:?}");

    // A seller's drop reaching a replica by another road is refused there too.
    let forged = Event { time_ms: 100, body: EventBody::DropPlanned { name: "x".into(), sku: "tote".into(), units: 1, start_ms: 0, plan, max_per_buyer: None } };
    let dot = stallmesh_identity::Dot { device: k.seller.device(), seq: 1 };
    let err = k.organiser.state().check(dot, &forged).unwrap_err();
    assert!(matches!(&err, FoldError::Invalid(m) if m.contains("organiser")), "{err:?}");
}

#[test]
fn a_plan_must_name_enrolled_sellers_once_each_with_shares_adding_up_to_the_drop() {
    let mut k = market(43);
    let (s, o) = (k.seller.device(), k.online.device());
    let invalid = |e: LedgerError| matches!(e, LedgerError::Invalid { field: "plan", .. });
    assert!(invalid(k.organiser.record(plan_drop(10, 0, vec![(s, 4), (o, 5)]), 10).unwrap_err()), "shares short of the units");
    assert!(invalid(k.organiser.record(plan_drop(10, 0, vec![(s, 5), (s, 5)]), 10).unwrap_err()), "a device twice");
    assert!(invalid(k.organiser.record(plan_drop(10, 0, vec![(s, 10), (o, 0)]), 10).unwrap_err()), "a device given nothing");
    assert!(invalid(k.organiser.record(plan_drop(1, 0, vec![]), 10).unwrap_err()), "nobody");
    let stranger = k.m.device_key(77).device_id();
    assert!(matches!(k.organiser.record(plan_drop(1, 0, vec![(stranger, 1)]), 10).unwrap_err(), LedgerError::UnknownDevice(_)));
    let unknown_sku = LocalOp::PlanDrop { name: "n".into(), sku: "nope".into(), units: 1, start_ms: 0, plan: vec![(s, 1)], max_per_buyer: None };
    let greedy = LocalOp::PlanDrop { name: "n".into(), sku: "tote".into(), units: 2, start_ms: 0, plan: vec![(s, 2)], max_per_buyer: Some(3) };
    assert!(matches!(k.organiser.record(greedy, 10).unwrap_err(), LedgerError::Invalid { field: "max_per_buyer", .. }));
    assert!(matches!(k.organiser.record(unknown_sku, 10).unwrap_err(), LedgerError::UnknownSku(_)));
    assert!(k.organiser.state().drops.is_empty(), "nothing refused was recorded");
    // Listed in any order, recorded in order.
    let ok = k.organiser.record(plan_drop(10, 0, vec![(o.max(s), 4), (o.min(s), 6)]), 10).unwrap();
    let EventBody::DropPlanned { plan, .. } = &ok.event.body else { panic!("{ok:?}") };
    assert_eq!(plan, &vec![(o.min(s), 6), (o.max(s), 4)]);
}

#[test]
fn an_online_device_sells_and_moves_rights_but_never_edits_the_catalogue_or_restocks() {
    let mut k = market(44);
    let drop = k.organiser.record(plan_drop(8, 0, vec![(k.online.device(), 8)]), 100).unwrap();
    k.online.apply_remote(changes(std::slice::from_ref(&drop)));
    k.online.record(sell("tote", 2), 200).unwrap();
    k.online.record(LocalOp::Transfer { sku: "tote".into(), qty: 3, to: k.seller.device() }, 201).unwrap();
    for op in [LocalOp::UpsertProduct(product("tote", 1)), LocalOp::Restock { sku: "tote".into(), qty: 1 }] {
        let e = k.online.record(op, 202).unwrap_err();
        assert!(matches!(e, LedgerError::RoleForbids { role: "online", .. }), "{e:?}");
    }
    // A replica refuses an online device's restock however it arrives.
    let restock = Event { time_ms: 1, body: EventBody::Restocked { sku: "tote".into(), qty: 1 } };
    let dot = stallmesh_identity::Dot { device: k.online.device(), seq: 9 };
    assert!(matches!(k.seller.state().check(dot, &restock), Err(FoldError::Invalid(_))));
}

#[test]
fn an_organiser_keeps_a_share_of_its_own_drop_and_sells_it_like_any_stall() {
    let mut k = market(45);
    let plan = vec![(k.organiser.device(), 2), (k.seller.device(), 1)];
    k.organiser.record(plan_drop(3, 50, plan), 10).unwrap();
    let sale = k.organiser.record(sell("tote", 2), 60).unwrap();
    assert!(sale.change.causal.is_empty(), "its own share is in its own journal, before the sale");
    assert_eq!(k.organiser.state().rights_of("tote", &k.organiser.device()), 0);
}
