//! Specifications of online checkout: holds reserve the online device's rights, expire, and are
//! sold at most once.

use super::*;
use stallmesh_identity::SignedChange;
use stallmesh_ledger::testkit::{product, TestMarket};

fn changes(entries: &[Entry]) -> Vec<SignedChange> {
    entries.iter().map(|e| e.change.clone()).collect()
}

const START_MS: u64 = 1_000_000;

/// An organiser's drop of `units` totes at START_MS: `online` units to the online device, the
/// rest to the organiser's own stall. Returns the online device's ledger, and the drop's id.
fn drop_of(units: u64, online: u64, max_per_buyer: Option<u64>) -> (TestMarket, Ledger, Ledger, String) {
    let m = TestMarket::new(60);
    let (mut organiser, e0) = m.device(1, "Office");
    let (mut web, w0) = m.device_as(2, "online", Role::Online);
    organiser.apply_remote(changes(std::slice::from_ref(&w0)));
    let p = organiser.record(LocalOp::UpsertProduct(product("tote", 3_500)), 1).unwrap();
    let mut plan = vec![(web.device(), online)];
    if units > online {
        plan.push((organiser.device(), units - online));
    }
    let op = LocalOp::PlanDrop { name: "Tote".into(), sku: "tote".into(), units, start_ms: START_MS, plan, max_per_buyer };
    let d = organiser.record(op, 2).unwrap();
    web.apply_remote(changes(&[e0, p, d.clone()]));
    let id = stallmesh_ledger::drop_id(d.change.dot());
    (m, organiser, web, id)
}

fn req(drop: &str, buyer: &str, qty: u64, key: &str) -> HoldRequest {
    HoldRequest { drop: drop.into(), buyer: buyer.into(), qty, idempotency_key: key.into() }
}

/// Places holds as a driver would: the view from every hold kept so far, new ones kept.
struct Shop {
    market: MarketId,
    web: Ledger,
    holds: Vec<Hold>,
}

impl Shop {
    fn hold(&mut self, r: HoldRequest, now_ms: u64) -> Result<Hold, ShopError> {
        let id = hold_id(&self.market, &r.buyer, &r.idempotency_key);
        let existing = self.holds.iter().find(|h| h.id == id).cloned();
        let sku = self.web.state().drops.get(&r.drop).map(|d| d.sku.clone()).unwrap_or_default();
        let view = HoldsView::of(&self.holds, &sku, &r.drop, &r.buyer, now_ms);
        match place_hold(&self.web, &self.market, existing.as_ref(), &view, &r, DEFAULT_HOLD_TTL_MS, now_ms)? {
            Placed::New(h) => {
                self.holds.push(h.clone());
                Ok(h)
            }
            Placed::Again(h) => Ok(h),
        }
    }

    fn pay(&mut self, id: &str, now_ms: u64) -> Result<Hold, ShopError> {
        let i = self.holds.iter().position(|h| h.id == id).ok_or_else(|| ShopError::UnknownHold(id.into()))?;
        match pay(&mut self.web, &self.holds[i], now_ms)? {
            Paid::New { hold, .. } => {
                self.holds[i] = hold.clone();
                Ok(hold)
            }
            Paid::Again(h) => Ok(h),
        }
    }
}

fn shop(units: u64, online: u64, max_per_buyer: Option<u64>) -> (Shop, String) {
    let (m, _, web, id) = drop_of(units, online, max_per_buyer);
    (Shop { market: m.ctx.market, web, holds: Vec::new() }, id)
}

#[test]
fn holds_reserve_the_online_devices_units_and_the_next_buyer_is_told_sold_out_and_whether_units_may_return() {
    let (mut s, drop) = shop(10, 3, None);
    let t = START_MS;
    s.hold(req(&drop, "ann", 2, "k1"), t).unwrap();
    s.hold(req(&drop, "bob", 1, "k1"), t).unwrap();
    let err = s.hold(req(&drop, "cat", 1, "k1"), t + 1).unwrap_err();
    match err {
        ShopError::SoldOut { available: 0, in_holds: 3, held_elsewhere: 7, may_return: true, next_expiry_ms } => {
            assert_eq!(next_expiry_ms, Some(t + DEFAULT_HOLD_TTL_MS))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn nothing_is_held_before_the_drop_opens() {
    let (mut s, drop) = shop(5, 5, None);
    assert_eq!(s.hold(req(&drop, "ann", 1, "k"), START_MS - 1).unwrap_err(), ShopError::DropNotStarted { start_ms: START_MS });
    assert!(s.holds.is_empty());
}

#[test]
fn an_expired_hold_gives_its_units_back_and_cannot_be_paid() {
    let (mut s, drop) = shop(2, 2, None);
    let ann = s.hold(req(&drop, "ann", 2, "k"), START_MS).unwrap();
    assert!(matches!(s.hold(req(&drop, "bob", 1, "k"), START_MS + 1), Err(ShopError::SoldOut { may_return: true, .. })));
    let after = ann.expires_ms;
    let bob = s.hold(req(&drop, "bob", 2, "k"), after).expect("the expired hold's units are free again");
    assert_eq!(s.pay(&ann.id, after).unwrap_err(), ShopError::HoldExpired { expired_at_ms: ann.expires_ms });
    let paid = s.pay(&bob.id, after + 1).unwrap();
    assert!(paid.sale.is_some());
    assert_eq!(s.web.state().rights_of("tote", &s.web.device()), 0);
    assert_eq!(s.web.state().sales.len(), 1, "only the paid hold became a sale");
}

#[test]
fn a_retried_hold_or_payment_is_answered_with_the_first_and_never_sold_twice() {
    let (mut s, drop) = shop(5, 5, None);
    let first = s.hold(req(&drop, "ann", 2, "tap"), START_MS).unwrap();
    let again = s.hold(req(&drop, "ann", 2, "tap"), START_MS + 5).unwrap();
    assert_eq!(first, again, "a double tap holds once");
    assert_eq!(s.holds.len(), 1);
    assert!(matches!(s.hold(req(&drop, "ann", 3, "tap"), START_MS + 6), Err(ShopError::IdempotencyConflict(_))));

    let paid = s.pay(&first.id, START_MS + 10).unwrap();
    assert_eq!(s.pay(&first.id, START_MS + 11).unwrap(), paid, "a retried payment finds the sale");
    // Even a stale copy of the hold (another process's, not yet written back) sells nothing twice.
    let stale = Hold { sale: None, ..paid.clone() };
    assert!(matches!(pay(&mut s.web, &stale, START_MS + 12), Ok(Paid::Again(h)) if h.sale == paid.sale));
    assert_eq!(s.web.state().sales.len(), 1);
}

#[test]
fn a_buyer_gets_at_most_the_drops_limit_over_all_holds_and_orders() {
    let (mut s, drop) = shop(10, 10, Some(2));
    let h = s.hold(req(&drop, "ann", 1, "a"), START_MS).unwrap();
    s.pay(&h.id, START_MS + 1).unwrap();
    s.hold(req(&drop, "ann", 1, "b"), START_MS + 2).unwrap();
    assert_eq!(s.hold(req(&drop, "ann", 1, "c"), START_MS + 3).unwrap_err(), ShopError::BuyerLimit { limit: 2, already: 2, asked: 1 });
    s.hold(req(&drop, "bob", 2, "a"), START_MS + 3).expect("the limit is per buyer");
}

#[test]
fn bad_requests_are_refused_precisely() {
    let (mut s, drop) = shop(5, 5, None);
    let field = |e: ShopError| match e {
        ShopError::Invalid { field, .. } => field,
        other => panic!("{other:?}"),
    };
    assert_eq!(field(s.hold(req(&drop, "", 1, "k"), START_MS).unwrap_err()), "buyer");
    assert_eq!(field(s.hold(req(&drop, "ann", 0, "k"), START_MS).unwrap_err()), "qty");
    assert_eq!(field(s.hold(req(&drop, "ann", MAX_HOLD_UNITS + 1, "k"), START_MS).unwrap_err()), "qty");
    assert_eq!(field(s.hold(req(&drop, "ann", 1, &"k".repeat(MAX_IDEMPOTENCY_KEY_LEN + 1)), START_MS).unwrap_err()), "idempotency_key");
    assert_eq!(s.hold(req("nope-1", "ann", 1, "k"), START_MS).unwrap_err(), ShopError::UnknownDrop("nope-1".into()));
    assert!(s.holds.is_empty());
}

#[test]
fn a_device_that_is_not_the_online_channel_places_no_holds() {
    let (m, organiser, _, drop) = drop_of(5, 5, None);
    let r = req(&drop, "ann", 1, "k");
    let err = place_hold(&organiser, &m.ctx.market, None, &HoldsView::default(), &r, DEFAULT_HOLD_TTL_MS, START_MS).unwrap_err();
    assert_eq!(err, ShopError::NoOnlineChannel);
}

#[test]
fn a_tablet_short_of_units_gets_what_the_online_channel_holds_beyond_its_buyers_holds() {
    let (mut s, drop) = shop(10, 5, None);
    let (_, organiser, _, _) = drop_of(10, 5, None);
    let tablet = organiser.device();
    let policy = stallmesh_sync::rebalance::RebalancePolicy::default();
    s.hold(req(&drop, "ann", 3, "k"), START_MS).unwrap();
    let held = HoldsView::of(&s.holds, "tote", &drop, "", START_MS).held_units;
    // A customer waits at the till for 4: the online channel has sold nothing lately and 2 free.
    let given = give_rights(&mut s.web, &policy, held, "tote", 4, tablet, true, START_MS).unwrap().expect("it gives");
    assert!(matches!(&given.event.body, stallmesh_ledger::EventBody::Transferred { qty: 2, to, .. } if *to == tablet), "{given:?}");
    assert_eq!(s.web.state().rights_of("tote", &s.web.device()), 3, "Ann's hold is untouched");
    assert_eq!(give_rights(&mut s.web, &policy, held, "tote", 4, tablet, true, START_MS).unwrap(), None, "nothing free is left");
    let ann = s.holds[0].id.clone();
    s.pay(&ann, START_MS + 1).expect("the held units are still there to sell");
}

#[test]
fn no_hold_is_placed_while_another_drop_of_the_sku_has_yet_to_open_since_it_could_not_be_paid() {
    let (m, mut organiser, mut web, open_drop) = drop_of(5, 5, None);
    let later = LocalOp::PlanDrop { name: "Encore".into(), sku: "tote".into(), units: 1, start_ms: START_MS * 3, plan: vec![(web.device(), 1)], max_per_buyer: None };
    let d = organiser.record(later, 3).unwrap();
    web.apply_remote(changes(std::slice::from_ref(&d)));
    let err = place_hold(&web, &m.ctx.market, None, &HoldsView::default(), &req(&open_drop, "ann", 1, "k"), DEFAULT_HOLD_TTL_MS, START_MS).unwrap_err();
    assert_eq!(err, ShopError::DropNotStarted { start_ms: START_MS * 3 });
}

#[test]
fn a_sold_out_online_channel_asks_the_tablets_for_a_refill_until_one_gives_or_the_ask_lapses() {
    let policy = stallmesh_sync::rebalance::RebalancePolicy::default();
    let mut asks = OnlineAsks::default();
    assert!(asks.sold_out("tote", 2, &policy, 1_000));
    assert!(asks.sold_out("tote", 1, &policy, 2_000), "a smaller ask keeps the larger");
    assert_eq!(asks.open(2_000).collect::<Vec<_>>(), vec![("tote", 2 + policy.refill)]);
    assert_eq!(asks.open(2_000 + ONLINE_ASK_MS).count(), 0, "it lapses after ONLINE_ASK_MS");
    asks.sold_out("tote", 1, &policy, 3_000);
    asks.answered("tote");
    assert_eq!(asks.open(3_000).count(), 0, "a tablet's transfer answers it");
    for i in 0..MAX_ONLINE_ASKS {
        assert!(asks.sold_out(&format!("sku-{i}"), 1, &policy, 4_000));
    }
    assert!(!asks.sold_out("one-too-many", 1, &policy, 4_000), "no more SKUs than one reply carries");
    assert!(asks.sold_out("one-too-many", 1, &policy, 4_000 + ONLINE_ASK_MS), "once the others lapsed");
}

#[test]
fn a_tablet_spares_units_only_for_the_markets_online_channel() {
    let (m, organiser, web, _) = drop_of(10, 4, None);
    let policy = stallmesh_sync::rebalance::RebalancePolicy::default();
    let (stranger, _) = m.device(3, "Stall 3");
    // The organiser holds 6 totes and sold none lately: it spares them to the online channel.
    assert!(spare_for_online(&organiser, web.device(), "tote", 5, &policy, START_MS) > 0);
    // An ask naming a device that is not the market's online channel moves nothing.
    assert_eq!(spare_for_online(&organiser, stranger.device(), "tote", 5, &policy, START_MS), 0);
    assert_eq!(spare_for_online(&organiser, organiser.device(), "tote", 5, &policy, START_MS), 0);
}

#[test]
fn a_batchs_book_sees_the_holds_placed_and_paid_before_each_decision_as_a_fresh_read_would() {
    let hold = |id: &str, buyer: &str, qty: u64, expires_ms: u64| Hold {
        id: id.into(),
        drop: "d".into(),
        sku: "tote".into(),
        buyer: buyer.into(),
        qty,
        placed_ms: 0,
        expires_ms,
        sale: None,
    };
    let now = 1_000;
    let stored = vec![hold("a", "ann", 2, 5_000), hold("b", "bob", 1, 500), hold("c", "cat", 3, 9_000)];
    let wanted = HoldsWanted {
        ids: ["a".to_string(), "n".to_string()].into(),
        skus: ["tote".to_string()].into(),
        buyers: [("d".to_string(), "ann".to_string()), ("d".to_string(), "dan".to_string())].into(),
    };
    let mut book = HoldBook::read(HoldsRead::of(&stored, &wanted, now), now);
    // b expired: only a and c reserve units; ann's 2 count for her limit.
    assert_eq!(book.view("tote", "d", "ann"), HoldsView { held_units: 5, buyer_units: 2, next_expiry_ms: Some(5_000) });
    // Dan places a hold, then Ann pays hers: each later decision sees it, as a fresh read would.
    book.put(hold("n", "dan", 4, 7_000));
    book.put(Hold { sale: Some("sale-1".into()), ..hold("a", "ann", 2, 5_000) });
    let all = vec![Hold { sale: Some("sale-1".into()), ..hold("a", "ann", 2, 5_000) }, hold("b", "bob", 1, 500), hold("c", "cat", 3, 9_000), hold("n", "dan", 4, 7_000)];
    let fresh = HoldsRead::of(&all, &wanted, now);
    for buyer in ["ann", "dan"] {
        let v = book.view("tote", "d", buyer);
        assert_eq!(v.held_units, fresh.held["tote"].0, "{buyer}");
        assert_eq!(v.buyer_units, fresh.buyers[&("d".to_string(), buyer.to_string())], "{buyer}");
    }
    assert_eq!(book.view("tote", "d", "dan").held_units, 7, "c's 3 and dan's 4; ann's paid hold reserves nothing now");
    assert_eq!(book.changed().iter().map(|h| h.id.as_str()).collect::<Vec<_>>(), vec!["a", "n"], "what the driver writes");
}
