//! Loyalty at the till, in the ledger (no store, no HTTP), on a market that has seen many cards:
//!
//! - `loyalty/verify_card`: read a card's QR text and verify it (issuer found by prefix among the
//!   market's devices, one ed25519 signature; the issuer's enrolment was verified when folded);
//! - `loyalty/redeem_on_sale`: verify the card, then record a sale that redeems points this device
//!   holds (validate, automerge commit, sign, fold): what a tablet does before the durable commit;
//! - `loyalty/sale_without_card`: the same sale without a card, side by side, for the overhead.
//!
//! The market holds `STALLMESH_BENCH_LOYALTY_CARDS` cards (default 100,000) and
//! `STALLMESH_BENCH_LOYALTY_EARNS` sales that earned points on them (default 1,000,000, spread
//! over the cards; building them takes a few minutes and ~2 GB). p50 and p99 are printed beside
//! criterion's estimate.
//! Run: `cargo bench -p stallmesh-benches --no-default-features --bench loyalty`.

use criterion::{criterion_group, criterion_main, Criterion};
use stallmesh_identity::CardId;
use stallmesh_ledger::testkit::{product, TestMarket};
use stallmesh_ledger::{Ledger, LineRequest, LocalOp, LoyaltyOnSale};
use stallmesh_loyalty::Card;
use std::time::{Duration, Instant};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn card_id(n: u64) -> CardId {
    CardId(n.to_be_bytes())
}

fn sale(loyalty: Option<LoyaltyOnSale>) -> LocalOp {
    LocalOp::Sell { lines: vec![LineRequest { sku: "TEA".into(), qty: 1 }], client_ref: None, recommendation: None, loyalty, staff: None }
}

fn earn(card: CardId) -> LoyaltyOnSale {
    LoyaltyOnSale { card, points_earned: 5, redeem_points: 0, point_value_cents: 1, offline_budget: None }
}

/// A tablet of a 20-device market whose journal holds `earns` card sales over `cards` cards.
fn market(cards: u64, earns: u64) -> (TestMarket, Ledger) {
    let m = TestMarket::new(77);
    let (mut l, _) = m.device(1, "Bench Stall");
    for n in 2..=20 {
        let (_, enrol) = m.device(n, "Bench Stall");
        l.apply_remote([enrol.change]);
    }
    l.record(LocalOp::UpsertProduct(product("TEA", 500)), 1).unwrap();
    l.record(LocalOp::Restock { sku: "TEA".into(), qty: 1_000_000 }, 1).unwrap();
    let started = Instant::now();
    for i in 0..earns {
        if i % 900_000 == 899_999 {
            // Stock rights run out: a restock now and then, as a stall would.
            l.record(LocalOp::Restock { sku: "TEA".into(), qty: 1_000_000 }, 2).unwrap();
        }
        l.record(sale(Some(earn(card_id(i % cards)))), 2 + i).unwrap();
    }
    println!("built a market of {cards} cards and {earns} earning sales in {:.1?}", started.elapsed());
    (m, l)
}

fn percentiles(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let at = |p: usize| samples[(samples.len() * p / 100).min(samples.len() - 1)];
    format!("p50 {:?}, p99 {:?} over {} samples", at(50), at(99), samples.len())
}

fn loyalty(c: &mut Criterion) {
    let (cards, earns) = (env("STALLMESH_BENCH_LOYALTY_CARDS", 100_000), env("STALLMESH_BENCH_LOYALTY_EARNS", 1_000_000));
    let (_m, mut l) = market(cards, earns);
    let now_ms = 10_000_000_000;
    // A card of this market, issued by another device of it.
    let issuer = TestMarket::new(77).device_key(7);
    let card = Card::issue(&issuer, l.market().market, card_id(42), now_ms - 1000, None, None);
    let text = card.to_text();
    let mut g = c.benchmark_group("loyalty");
    let mut verify = Vec::new();
    g.bench_function("verify_card", |b| {
        b.iter(|| {
            let t = Instant::now();
            let card = Card::from_text(std::hint::black_box(&text)).unwrap();
            let issuer = l.verify_card(&card, now_ms).unwrap();
            verify.push(t.elapsed());
            issuer
        })
    });
    let mut redeem = Vec::new();
    let mut clock = now_ms;
    g.bench_function("redeem_on_sale", |b| {
        b.iter(|| {
            clock += 1;
            let t = Instant::now();
            let card = Card::from_text(&text).unwrap();
            l.verify_card(&card, clock).unwrap();
            // Earns 5, redeems 1: the card's points here never run out during the measurement.
            let op = sale(Some(LoyaltyOnSale { card: card.id, points_earned: 5, redeem_points: 1, point_value_cents: 1, offline_budget: None }));
            let entry = l.record(op, clock).unwrap();
            redeem.push(t.elapsed());
            entry
        })
    });
    let mut plain = Vec::new();
    g.bench_function("sale_without_card", |b| {
        b.iter(|| {
            clock += 1;
            let t = Instant::now();
            let entry = l.record(sale(None), clock).unwrap();
            plain.push(t.elapsed());
            entry
        })
    });
    g.finish();
    println!("loyalty/verify_card: {}", percentiles(verify));
    println!("loyalty/redeem_on_sale: {}", percentiles(redeem));
    println!("loyalty/sale_without_card: {}", percentiles(plain));
}

criterion_group!(benches, loyalty);
criterion_main!(benches);
