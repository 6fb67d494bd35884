//! Loyalty customers in the simulated market: cards that earn at one stall and redeem at another,
//! voucher drops, and the node's redemption policy (`node/src/http/loyalty.rs`): spend what this
//! tablet holds; short of it, ask a reachable holder (the customer does not wait here: the points
//! come for the next visit); with no reachable holder and tablets out of reach, the offline budget.
//!
//! Ground truth is tallied from what tablets acknowledged, and checked at the end: replicas agree on
//! loyalty, every double spend is reported by every replica, and overspending stays within the
//! budgets.

use super::*;
use crate::report::LoyaltyReport;
use crate::scenario::LoyaltySpec;
use stallmesh_identity::{CardId, VoucherId};
use stallmesh_ledger::{LoyaltyAsset, LoyaltyOnSale};
use stallmesh_loyalty::{EarningRule, OfflineBudget};

/// How long a till waits for a reachable holder to hand over points or a voucher (the node's
/// `loyalty.ask_wait_ms` default is 1.5 s; on a working LAN the transfer takes milliseconds).
pub(super) const ASK_WAIT_US: u64 = 300 * US_PER_MS;

pub(super) struct LoyaltySim {
    spec: LoyaltySpec,
    rule: EarningRule,
    budget: OfflineBudget,
    /// Its own stream: a scenario without loyalty draws exactly what it drew before.
    rng: ChaCha8Rng,
    /// Vouchers minted so far (acknowledged), in order.
    vouchers: Vec<VoucherId>,
    next_voucher: u64,
    /// From acknowledged events: per card, points earned and points redeemed (proven or not).
    earned: BTreeMap<CardId, u64>,
    spent: BTreeMap<CardId, u64>,
    /// Per voucher, times redeemed (a voucher is redeemed once however often its id was minted).
    redeemed: BTreeMap<VoucherId, u64>,
    pub(super) report: LoyaltyReport,
}

impl LoyaltySim {
    pub(super) fn new(spec: LoyaltySpec, seed: u64) -> Self {
        let budget = OfflineBudget {
            points_per_card: spec.offline_points_per_card,
            points_per_device: spec.offline_points_per_device,
            vouchers_per_device: spec.offline_vouchers_per_device,
        };
        LoyaltySim {
            spec,
            rule: EarningRule::default(),
            budget,
            rng: ChaCha8Rng::seed_from_u64(mix(seed, "loyalty", 0)),
            vouchers: Vec::new(),
            next_voucher: 0,
            earned: BTreeMap::new(),
            spent: BTreeMap::new(),
            redeemed: BTreeMap::new(),
            report: LoyaltyReport::default(),
        }
    }
}

/// What `dev` can do about `qty` of `asset` it lacks, by its own view (live sessions), as the node.
enum Reach {
    Here,
    /// A peer with a live session holds some: asked; the customer goes on without.
    Asked,
    /// Nobody reachable holds any and some tablet is out of reach: the offline budget applies.
    Budget,
    /// The whole market is in view: what is known here is the truth.
    Nothing,
}

impl World {
    fn loyalty_reach(&mut self, dev: u32, asset: LoyaltyAsset, qty: u64) -> Reach {
        let me = self.devices[dev as usize].id;
        let state = self.devices[dev as usize].ledger.state();
        if state.loyalty.rights_of(&asset, &me) >= qty {
            return Reach::Here;
        }
        let peers: BTreeSet<DeviceId> = self.devices[dev as usize].sync.peers().keys().map(|p| self.devices[*p as usize].id).collect();
        let holders = state.loyalty.holders(&asset);
        if holders.iter().any(|(d, n)| *n > 0 && peers.contains(d)) {
            let here = holders.get(&me).copied().unwrap_or(0);
            let now = self.dev_now_ms(dev);
            let out = self.protocol(|w| w.devices[dev as usize].sync.want_loyalty(asset, qty - here, now));
            self.execute(dev, out);
            if let Some(l) = self.loyalty.as_mut() {
                l.report.asks += 1;
            }
            return Reach::Asked;
        }
        let out_of_reach = self.devices.iter().any(|d| d.id != me && !peers.contains(&d.id));
        if out_of_reach {
            Reach::Budget
        } else {
            Reach::Nothing
        }
    }

    /// A customer at `dev` with a card, maybe redeeming: the sale's loyalty, or `None` without a
    /// card. `Err`: a reachable tablet holds the points and was asked; the till waits for them
    /// (`ASK_WAIT_US`) and then sells with what is here ([`World::card_after_wait`]).
    pub(super) fn customer_card(&mut self, dev: u32, lines: &[LineRequest]) -> Option<Result<LoyaltyOnSale, LoyaltyOnSale>> {
        let l = self.loyalty.as_mut()?;
        if !l.rng.gen_bool(l.spec.card_share) {
            return None;
        }
        let card = CardId(u64::from(l.rng.gen_range(0..l.spec.cards)).to_be_bytes());
        let redeems = l.rng.gen_bool(l.spec.redeem_share);
        let (max_redeem, redeem_at, rule) = (l.spec.max_redeem_points, l.spec.redeem_at_points, l.rule.clone());
        let state = self.devices[dev as usize].ledger.state();
        let priced: Vec<(String, u64)> = lines
            .iter()
            .filter_map(|line| state.products.get(&line.sku).map(|p| (p.product.stall.clone(), line.qty * p.product.price_cents)))
            .collect();
        let gross: u64 = priced.iter().map(|(_, c)| c).sum();
        let points = rule.points_for(priced);
        // The balance as this tablet shows it: stale across a partition.
        let balance = state.loyalty.cards.get(&card).map_or(0, |c| c.balance());
        let mut redeem = if redeems && balance >= redeem_at { balance.min(max_redeem).min(gross) } else { 0 };
        let mut budget = None;
        let mut asked = false;
        if redeem > 0 {
            match self.loyalty_reach(dev, LoyaltyAsset::Points(card), redeem) {
                Reach::Here => {}
                Reach::Budget => {
                    self.trace(Some(dev), format!("card {card}: {redeem} points, none reachable: the offline budget applies"));
                    budget = self.loyalty.as_ref().map(|l| l.budget);
                }
                Reach::Asked => asked = true,
                Reach::Nothing => redeem = redeem.min(self.held_here(dev, LoyaltyAsset::Points(card))),
            }
        }
        // Points are earned on what is paid in money.
        let earned = if gross == 0 { 0 } else { points * (gross - redeem.min(gross)) / gross };
        let l = LoyaltyOnSale { card, points_earned: earned, redeem_points: redeem, point_value_cents: rule.point_value_cents, offline_budget: budget };
        Some(if asked { Err(l) } else { Ok(l) })
    }

    fn held_here(&self, dev: u32, asset: LoyaltyAsset) -> u64 {
        let d = &self.devices[dev as usize];
        d.ledger.state().loyalty.rights_of(&asset, &d.id)
    }

    /// After the wait for reachable holders: if they handed over all they held and tablets are
    /// out of reach, the offline budget may cover the rest (as the node's `fetch`); if a reachable
    /// one still holds some, only what arrived is redeemed.
    pub(super) fn card_after_wait(&self, dev: u32, mut card: LoyaltyOnSale) -> LoyaltyOnSale {
        let asset = LoyaltyAsset::Points(card.card);
        let here = self.held_here(dev, asset);
        if here >= card.redeem_points {
            return card;
        }
        let d = &self.devices[dev as usize];
        let peers: BTreeSet<DeviceId> = d.sync.peers().keys().map(|p| self.devices[*p as usize].id).collect();
        let reachable_hold = d.ledger.state().loyalty.holders(&asset).iter().any(|(h, n)| *n > 0 && peers.contains(h));
        let out_of_reach = self.devices.iter().any(|x| x.id != d.id && !peers.contains(&x.id));
        match (reachable_hold, out_of_reach, self.loyalty.as_ref()) {
            (false, true, Some(l)) => {
                card.offline_budget = Some(l.budget);
            }
            _ => card.redeem_points = here,
        }
        card
    }

    /// A customer at `dev` who may bring a voucher of a drop.
    pub(super) fn customer_voucher(&mut self, dev: u32) {
        let Some(l) = self.loyalty.as_mut() else { return };
        if l.vouchers.is_empty() || !l.rng.gen_bool(l.spec.voucher_share) {
            return;
        }
        let voucher = l.vouchers[l.rng.gen_range(0..l.vouchers.len())];
        let budget = match self.loyalty_reach(dev, LoyaltyAsset::Voucher(voucher), 1) {
            Reach::Here | Reach::Nothing => None,
            Reach::Budget => self.loyalty.as_ref().map(|l| l.budget),
            Reach::Asked => {
                self.push(self.now + ASK_WAIT_US, Ev::VoucherAfterWait { dev, voucher });
                return;
            }
        };
        self.redeem_voucher(dev, voucher, budget);
    }

    /// Redeems `voucher` at `dev` (after the wait for a reachable holder: with what arrived).
    pub(super) fn redeem_voucher(&mut self, dev: u32, voucher: VoucherId, budget: Option<OfflineBudget>) {
        if !self.devices[dev as usize].up {
            return;
        }
        let now = self.dev_now_ms(dev);
        let result = self.protocol(|w| w.devices[dev as usize].ledger.record(LocalOp::RedeemVoucher { voucher, offline_budget: budget }, now));
        match result {
            Ok(entry) => {
                self.trace(Some(dev), format!("voucher {voucher} redeemed"));
                self.loyalty_acked(&entry);
                self.local_entry(dev, entry);
            }
            Err(e) => {
                self.trace(Some(dev), format!("voucher {voucher} refused: {e}"));
                self.loyalty.as_mut().expect("loyalty on").report.vouchers_refused += 1;
            }
        }
    }

    /// A voucher drop: the tablet mints its vouchers (if it is up).
    pub(super) fn voucher_drop(&mut self, i: usize) {
        let Some(l) = self.loyalty.as_ref() else { return };
        let drop = l.spec.voucher_drops[i].clone();
        if !self.devices[drop.device as usize].up {
            self.trace(Some(drop.device), "voucher drop missed: the tablet is down".into());
            return;
        }
        for _ in 0..drop.count {
            let l = self.loyalty.as_mut().expect("loyalty on");
            l.next_voucher += 1;
            let voucher = VoucherId(mix(0, "voucher", l.next_voucher).to_be_bytes());
            let now = self.dev_now_ms(drop.device);
            let op = LocalOp::MintVoucher { voucher, label: format!("Drop {i}"), value_cents: 0 };
            let result = self.protocol(|w| w.devices[drop.device as usize].ledger.record(op, now));
            if let Ok(entry) = result {
                self.loyalty_acked(&entry);
                self.local_entry(drop.device, entry);
            }
        }
        self.trace(Some(drop.device), format!("voucher drop {i}: {} minted", drop.count));
    }

    /// A peer asked `dev` for loyalty rights: it gives what it holds, up to `qty` (as the node).
    pub(super) fn give_loyalty(&mut self, dev: u32, to: u32, asset: LoyaltyAsset, qty: u64) {
        let now = self.dev_now_ms(dev);
        let to_id = self.devices[to as usize].id;
        let entry = self.protocol(|w| {
            let d = &mut w.devices[dev as usize];
            let give = d.ledger.state().loyalty.rights_of(&asset, &d.id).min(qty);
            (give > 0).then(|| d.ledger.record(LocalOp::TransferLoyalty { asset, qty: give, to: to_id }, now).ok()).flatten()
        });
        if let Some(entry) = entry {
            self.trace(Some(dev), format!("gave {asset:?} to {to}"));
            if let Some(l) = self.loyalty.as_mut() {
                l.report.gives += 1;
            }
            self.local_entry(dev, entry);
        }
    }

    /// Tallies an acknowledged loyalty event (a sale with a card, a mint, a redemption).
    pub(super) fn loyalty_acked(&mut self, entry: &Entry) {
        if let EventBody::Sold { loyalty: Some(s), .. } = &entry.event.body {
            let line = format!("card {}: +{} points, -{} held, -{} unproven", s.card, s.points_earned, s.points_redeemed, s.points_unproven);
            self.trace(None, line);
        }
        let Some(l) = self.loyalty.as_mut() else { return };
        match &entry.event.body {
            EventBody::Sold { loyalty: Some(s), .. } => {
                *l.earned.entry(s.card).or_default() += s.points_earned;
                *l.spent.entry(s.card).or_default() += s.points_redeemed + s.points_unproven;
                l.report.card_sales += 1;
                l.report.points_earned += s.points_earned;
                l.report.points_redeemed_proven += s.points_redeemed;
                l.report.points_redeemed_unproven += s.points_unproven;
            }
            EventBody::VoucherMinted { voucher, .. } => {
                l.vouchers.push(*voucher);
                l.report.vouchers_minted += 1;
            }
            EventBody::VoucherRedeemed { voucher, proven } => {
                *l.redeemed.entry(*voucher).or_default() += 1;
                if *proven {
                    l.report.vouchers_redeemed_proven += 1;
                } else {
                    l.report.vouchers_redeemed_unproven += 1;
                }
            }
            _ => {}
        }
    }

    /// A sale's redemption was refused (short of points): the customer pays without it.
    pub(super) fn redemption_refused(&mut self) {
        if let Some(l) = self.loyalty.as_mut() {
            l.report.redemptions_refused += 1;
        }
    }

    /// At the end: every replica reports exactly the double spends that happened, and they stay
    /// within the budgets.
    pub(super) fn check_loyalty(&mut self) -> Vec<Violation> {
        let Some(mut l) = self.loyalty.take() else { return Vec::new() };
        let v = self.check_loyalty_with(&mut l);
        self.loyalty = Some(l);
        v
    }

    fn check_loyalty_with(&self, l: &mut LoyaltySim) -> Vec<Violation> {
        let mut v = Vec::new();
        let devices = self.devices.len() as u64;
        // The truth, from what tablets acknowledged.
        let mut truth: BTreeMap<LoyaltyAsset, u64> = BTreeMap::new();
        for (card, spent) in &l.spent {
            let over = spent.saturating_sub(l.earned.get(card).copied().unwrap_or(0));
            if over > 0 {
                truth.insert(LoyaltyAsset::Points(*card), over);
            }
            if over > devices * l.budget.points_per_card {
                v.push(Violation {
                    invariant: "loyalty_within_offline_budget",
                    detail: format!("card {card}: {over} points spent beyond what it earned, more than {devices} tablets' budgets"),
                    device: None,
                    timeline: vec![],
                });
            }
        }
        for (voucher, n) in &l.redeemed {
            let over = n.saturating_sub(1);
            if over > 0 {
                truth.insert(LoyaltyAsset::Voucher(*voucher), over);
            }
        }
        let points_over: u64 = truth.iter().filter(|(a, _)| matches!(a, LoyaltyAsset::Points(_))).map(|(_, n)| n).sum();
        if points_over > devices * l.budget.points_per_device {
            v.push(Violation {
                invariant: "loyalty_within_offline_budget",
                detail: format!("{points_over} points spent twice in all, more than {devices} tablets' budgets"),
                device: None,
                timeline: vec![],
            });
        }
        l.report.points_exposed = points_over;
        l.report.vouchers_exposed = truth.iter().filter(|(a, _)| matches!(a, LoyaltyAsset::Voucher(_))).map(|(_, n)| n).sum();
        l.report.exposures = truth.len() as u64;
        let reference = self.devices[0].ledger.state().loyalty.clone();
        for (d, ledger) in self.replicas() {
            let name = d.map_or("the cloud".to_string(), |d| format!("device {d}"));
            let seen: BTreeMap<LoyaltyAsset, u64> = ledger.state().loyalty.exposures().into_iter().map(|e| (e.asset, e.units)).collect();
            if seen != truth {
                v.push(Violation {
                    invariant: "every_double_spend_reported_on_every_replica",
                    detail: format!("{name} reports {} exposures, {} happened", seen.len(), truth.len()),
                    device: d,
                    timeline: vec![],
                });
                break;
            }
            if ledger.state().loyalty != reference {
                v.push(Violation { invariant: "loyalty_replicas_agree", detail: format!("{name}'s balances differ from device 0's"), device: d, timeline: vec![] });
                break;
            }
        }
        v
    }
}
