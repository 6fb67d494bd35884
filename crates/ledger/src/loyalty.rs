//! Loyalty as every replica derives it: rights to cards' points and vouchers' redemptions, what
//! each device spent without proof, and the exposures (points or vouchers spent twice).
//!
//! Rights work as stock rights do: points are earned by the selling device and held by it, a
//! voucher's one redemption is held by the device that minted it, transfers move them, and a
//! proven redemption spends the author's own rights (checked on every replica, so no order of
//! merges makes them negative). An unproven redemption spends nothing: it is the author's word,
//! allowed locally within its offline budget. Everything here is sums and sets keyed by journal
//! position, so replicas holding the same changes derive the same balances and the same exposures.

use crate::event::{EventBody, LoyaltyAsset, SaleLoyalty};
use crate::state::FoldError;
use stallmesh_identity::{CardId, DeviceId, Dot, VoucherId};
use stallmesh_loyalty::{Card, CardError, UnprovenSpent};
use std::collections::{BTreeMap, BTreeSet};

/// Redemptions listed as the evidence of one exposure: the unproven ones first, then proven ones.
/// Bounded so a long-lived card's exposure stays a small answer; the count is always exact.
pub const MAX_EXPOSURE_EVIDENCE: usize = 64;

/// One card as the replica knows it from the sales that carried it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CardRecord {
    pub points_earned: u64,
    /// Redeemed from held points (proven).
    pub points_redeemed: u64,
    /// Redeemed from offline budgets (unproven).
    pub points_unproven: u64,
    /// Every sale that carried the card, by journal position.
    pub sales: BTreeSet<Dot>,
    /// Sales that redeemed points of it without proof.
    pub unproven_redemptions: BTreeSet<Dot>,
    /// Sales that redeemed held points of it.
    pub proven_redemptions: BTreeSet<Dot>,
}

impl CardRecord {
    /// Points earned and not redeemed; negative balances are exposures, never shown as a balance.
    pub fn balance(&self) -> u64 {
        self.points_earned.saturating_sub(self.points_redeemed.saturating_add(self.points_unproven))
    }

    /// Points redeemed beyond what the card ever earned: spent twice under a partition.
    pub fn overspent(&self) -> u64 {
        self.points_redeemed.saturating_add(self.points_unproven).saturating_sub(self.points_earned)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct VoucherRecord {
    /// Where it was minted (normally one position; two devices picking one id is a collision both
    /// replicas see alike).
    pub minted: BTreeSet<Dot>,
    /// Label and value from the earliest mint position.
    pub label: String,
    pub value_cents: u64,
    /// Redemptions: position → proven.
    pub redemptions: BTreeMap<Dot, bool>,
}

/// Something spent twice, with the signed redemptions that did it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Exposure {
    pub asset: LoyaltyAsset,
    /// Points beyond what the card earned, or redemptions of a voucher beyond its one.
    pub units: u64,
    /// Redemptions (journal positions), unproven first, at most [`MAX_EXPOSURE_EVIDENCE`].
    pub evidence: Vec<Dot>,
    pub redemptions: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoyaltyState {
    /// asset → device → units it may spend. Never negative (checked on every spend).
    pub rights: BTreeMap<LoyaltyAsset, BTreeMap<DeviceId, u64>>,
    pub cards: BTreeMap<CardId, CardRecord>,
    pub vouchers: BTreeMap<VoucherId, VoucherRecord>,
    /// device → card → points it redeemed without proof; and its unproven voucher redemptions.
    unproven_points: BTreeMap<DeviceId, BTreeMap<CardId, u64>>,
    unproven_vouchers: BTreeMap<DeviceId, u64>,
}

impl LoyaltyState {
    pub fn rights_of(&self, asset: &LoyaltyAsset, device: &DeviceId) -> u64 {
        self.rights.get(asset).and_then(|m| m.get(device)).copied().unwrap_or(0)
    }

    /// Who holds rights on `asset`, and how many.
    pub fn holders(&self, asset: &LoyaltyAsset) -> BTreeMap<DeviceId, u64> {
        self.rights.get(asset).map(|m| m.iter().filter(|(_, n)| **n > 0).map(|(d, n)| (*d, *n)).collect()).unwrap_or_default()
    }

    /// What `device` has spent without proof, for `card`'s budget and its own.
    pub fn unproven_spent(&self, device: &DeviceId, card: Option<&CardId>) -> UnprovenSpent {
        let per_card = self.unproven_points.get(device);
        UnprovenSpent {
            points_of_card: card.and_then(|c| per_card?.get(c)).copied().unwrap_or(0),
            points: per_card.map_or(0, |m| m.values().fold(0u64, |a, b| a.saturating_add(*b))),
            vouchers: self.unproven_vouchers.get(device).copied().unwrap_or(0),
        }
    }

    /// Points of `asset` held across the market. Fits u64: [`LoyaltyState::check`] refuses any
    /// earning past it.
    fn total(&self, asset: &LoyaltyAsset) -> u64 {
        self.rights.get(asset).map_or(0, |m| m.values().try_fold(0u64, |t, n| t.checked_add(*n)).expect("an asset's rights fit u64"))
    }

    fn spendable(&self, asset: LoyaltyAsset, device: &DeviceId, qty: u64) -> Result<(), FoldError> {
        let held = self.rights_of(&asset, device);
        if qty > held {
            return Err(FoldError::Overspend { device: *device, sku: asset_label(&asset), qty, held });
        }
        Ok(())
    }

    /// Checks, without changing anything, that `author` may record `body` (a loyalty event or a
    /// sale carrying loyalty). Other events pass.
    pub(crate) fn check(&self, author: &DeviceId, body: &EventBody) -> Result<(), FoldError> {
        match body {
            EventBody::Sold { loyalty: Some(l), .. } => {
                let asset = LoyaltyAsset::Points(l.card);
                self.spendable(asset, author, l.points_redeemed)?;
                // Earning is refused only where a card's points would pass u64 (beyond any market).
                // Unreachable within the limits (u64 points are 1.8e12 sales of MAX_POINTS_PER_SALE), so
                // it does not matter that it depends on other devices' events: refusing beats wrapping.
                let card = self.cards.get(&l.card);
                let earned = card.map_or(0, |c| c.points_earned);
                let unproven = card.map_or(0, |c| c.points_unproven);
                if self.total(&asset).checked_add(l.points_earned).is_none()
                    || earned.checked_add(l.points_earned).is_none()
                    || unproven.checked_add(l.points_unproven).is_none()
                {
                    return Err(FoldError::Invalid("a card's points would pass u64::MAX".into()));
                }
                Ok(())
            }
            EventBody::LoyaltyTransferred { to, .. } if to == author => Err(FoldError::Invalid("transfer to self".into())),
            EventBody::LoyaltyTransferred { asset, qty, .. } => self.spendable(*asset, author, *qty),
            EventBody::VoucherMinted { voucher, .. } => match self.total(&LoyaltyAsset::Voucher(*voucher)).checked_add(1) {
                Some(_) => Ok(()),
                None => Err(FoldError::Invalid("voucher minted past u64::MAX".into())),
            },
            EventBody::VoucherRedeemed { voucher, proven: true } => self.spendable(LoyaltyAsset::Voucher(*voucher), author, 1),
            _ => Ok(()),
        }
    }

    /// Folds a checked event. Sums and sets only, so the order of concurrent events does not matter.
    pub(crate) fn fold(&mut self, dot: Dot, body: &EventBody) {
        match body {
            EventBody::Sold { loyalty: Some(l), .. } => self.fold_sale(dot, l),
            EventBody::LoyaltyTransferred { asset, qty, to } => {
                self.spend(asset, &dot.device, *qty);
                self.add(asset, to, *qty);
            }
            EventBody::VoucherMinted { voucher, label, value_cents } => {
                let v = self.vouchers.entry(*voucher).or_default();
                if v.minted.first().is_none_or(|first| dot < *first) {
                    v.label = label.clone();
                    v.value_cents = *value_cents;
                }
                v.minted.insert(dot);
                self.add(&LoyaltyAsset::Voucher(*voucher), &dot.device, 1);
            }
            EventBody::VoucherRedeemed { voucher, proven } => {
                if *proven {
                    self.spend(&LoyaltyAsset::Voucher(*voucher), &dot.device, 1);
                } else {
                    let n = self.unproven_vouchers.entry(dot.device).or_default();
                    *n = n.saturating_add(1);
                }
                let previous = self.vouchers.entry(*voucher).or_default().redemptions.insert(dot, *proven);
                assert!(previous.is_none(), "a journal position is folded at most once");
            }
            _ => {}
        }
    }

    fn fold_sale(&mut self, dot: Dot, l: &SaleLoyalty) {
        let asset = LoyaltyAsset::Points(l.card);
        self.spend(&asset, &dot.device, l.points_redeemed);
        self.add(&asset, &dot.device, l.points_earned);
        let card = self.cards.entry(l.card).or_default();
        // `check` refused anything that would overflow these.
        card.points_earned = card.points_earned.checked_add(l.points_earned).expect("checked: a card's earned points fit u64");
        card.points_redeemed = card.points_redeemed.checked_add(l.points_redeemed).expect("redeemed points are earned points");
        card.points_unproven = card.points_unproven.checked_add(l.points_unproven).expect("checked: unproven points fit u64");
        card.sales.insert(dot);
        if l.points_unproven > 0 {
            card.unproven_redemptions.insert(dot);
            let n = self.unproven_points.entry(dot.device).or_default().entry(l.card).or_default();
            *n = n.saturating_add(l.points_unproven);
        }
        if l.points_redeemed > 0 {
            card.proven_redemptions.insert(dot);
        }
        debug_assert!(card.points_redeemed <= card.points_earned, "proven redemptions spend earned points only");
    }

    fn add(&mut self, asset: &LoyaltyAsset, device: &DeviceId, qty: u64) {
        if qty == 0 {
            return;
        }
        let held = self.rights.entry(*asset).or_default().entry(*device).or_default();
        *held = held.checked_add(qty).expect("checked: an asset's rights fit u64");
    }

    fn spend(&mut self, asset: &LoyaltyAsset, device: &DeviceId, qty: u64) {
        if qty == 0 {
            return;
        }
        match self.rights.get_mut(asset).and_then(|m| m.get_mut(device)) {
            Some(h) if *h >= qty => *h -= qty,
            // Invariant: rights never go negative. `check` and causal delivery guarantee it.
            _ => panic!("invariant violated: {device:?} spends {qty} of {asset:?} beyond its rights"),
        }
    }

    /// Everything spent twice, in asset order: the same list on every replica holding the same
    /// changes. Total units are at most what devices spent without proof.
    pub fn exposures(&self) -> Vec<Exposure> {
        let mut out = Vec::new();
        for (card, c) in &self.cards {
            let units = c.overspent();
            if units == 0 {
                continue;
            }
            debug_assert!(units <= c.points_unproven, "only unproven points can be spent twice");
            // A sale may redeem both held and unproven points: it is listed once, with the unproven.
            let proven_only = c.proven_redemptions.iter().filter(|d| !c.unproven_redemptions.contains(d));
            let redemptions = c.unproven_redemptions.len() + proven_only.clone().count();
            let evidence = c.unproven_redemptions.iter().chain(proven_only).copied().take(MAX_EXPOSURE_EVIDENCE).collect();
            out.push(Exposure { asset: LoyaltyAsset::Points(*card), units, evidence, redemptions });
        }
        for (voucher, v) in &self.vouchers {
            // A voucher is redeemed once, however many devices minted its id (a collision, or a
            // device re-minting a used id): a second mint gives no second redemption.
            let units = (v.redemptions.len() as u64).saturating_sub(1);
            if units == 0 {
                continue;
            }
            let (unproven, proven): (Vec<Dot>, Vec<Dot>) = {
                let unproven = v.redemptions.iter().filter(|(_, p)| !**p).map(|(d, _)| *d).collect();
                let proven = v.redemptions.iter().filter(|(_, p)| **p).map(|(d, _)| *d).collect();
                (unproven, proven)
            };
            let evidence = unproven.into_iter().chain(proven).take(MAX_EXPOSURE_EVIDENCE).collect();
            out.push(Exposure { asset: LoyaltyAsset::Voucher(*voucher), units, evidence, redemptions: v.redemptions.len() });
        }
        out
    }
}

/// How an asset is named in errors and metrics.
pub fn asset_label(asset: &LoyaltyAsset) -> String {
    match asset {
        LoyaltyAsset::Points(c) => format!("points of card {c}"),
        LoyaltyAsset::Voucher(v) => format!("voucher {v}"),
    }
}

impl crate::Ledger {
    /// Issues a loyalty card signed by this device; refused where this device may not record
    /// (revoked, cloned, certificate expired), so a retired tablet issues nothing.
    pub fn issue_card(&self, id: CardId, now_ms: u64, expires_at_ms: Option<u64>, holder: Option<[u8; 32]>) -> Result<Card, crate::LedgerError> {
        self.may_record(now_ms)?;
        Ok(Card::issue(&self.key, self.ctx.market, id, now_ms, expires_at_ms, holder))
    }

    /// Verifies `card` against this replica's market: its issuer is the enrolled device whose id
    /// starts with the card's prefix (its enrolment was verified against the market key when it was
    /// folded, so no chain is checked again here: one signature per scan). Returns the issuer.
    pub fn verify_card(&self, card: &Card, now_ms: u64) -> Result<DeviceId, CardError> {
        if card.market_prefix[..] != self.ctx.market.0[..8] {
            return Err(CardError::OtherMarket);
        }
        let mut from = [0u8; 32];
        from[..8].copy_from_slice(&card.issuer_prefix);
        let mut verdict = Err(CardError::UnknownIssuer);
        // Several devices sharing 8 bytes of id is a 2^-64 chance; each is tried, so it cannot hide one.
        for (device, record) in self.state.devices.range(DeviceId(from)..).take_while(|(d, _)| d.0[..8] == card.issuer_prefix) {
            verdict = card.verify(&self.ctx.market, device, record.revoked_at_ms, now_ms).map(|()| *device);
            if verdict.is_ok() {
                break;
            }
        }
        verdict
    }
}
