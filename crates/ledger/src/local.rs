//! Local operations: validating what staff asked for against this replica's state, then
//! appending it to this device's own journal (automerge change, signature, fold).

use crate::event::{self, Event, EventBody, LoyaltyAsset, SaleLine, SaleLoyalty};
use crate::journal::Journal;
use crate::{validate, Entry, Ledger, LedgerError, LocalOp, LoyaltyOnSale, ProductRecord};
use automerge::transaction::{CommitOptions, Transactable};
use automerge::{ObjType, ROOT};
use stallmesh_identity::DeviceId;
use std::collections::BTreeMap;

impl Ledger {
    /// Writes this device's enrolment as journal entry 0 if it has none yet.
    pub fn enrol_self(&mut self, now_ms: u64) -> Result<Option<Entry>, LedgerError> {
        if self.journals.get(&self.me).is_some_and(|j| j.next_seq > 0) {
            return Ok(None);
        }
        self.certificate.verify(&self.ctx.market_key, now_ms).map_err(LedgerError::Certificate)?;
        let body = EventBody::Enrolled { certificate: std::sync::Arc::new(self.certificate.clone()) };
        self.commit_local(Event { time_ms: now_ms, body }).map(Some)
    }

    /// Validates and records a local operation. The returned entry must be persisted before the
    /// operation is acknowledged to anyone.
    pub fn record(&mut self, op: LocalOp, now_ms: u64) -> Result<Entry, LedgerError> {
        self.may_record(now_ms)?;
        let body = self.validate(op, now_ms)?;
        self.commit_local(Event { time_ms: now_ms, body })
    }

    /// Whether this device may write at all: enrolled, not revoked, not cloned, certificate valid.
    pub(crate) fn may_record(&self, now_ms: u64) -> Result<(), LedgerError> {
        if self.journals.get(&self.me).is_none_or(|j| j.next_seq == 0) {
            return Err(LedgerError::NotEnrolled);
        }
        if self.state.devices.get(&self.me).is_some_and(|d| d.revoked_at_ms.is_some()) {
            return Err(LedgerError::Revoked);
        }
        if self.is_cloned() {
            return Err(LedgerError::Cloned);
        }
        self.certificate.verify(&self.ctx.market_key, now_ms).map_err(LedgerError::Certificate)
    }

    fn validate(&self, op: LocalOp, now_ms: u64) -> Result<EventBody, LedgerError> {
        let limits =
            |body: &EventBody| validate::check_event_body(body).map_err(|e| LedgerError::Invalid { field: e.field, problem: e.problem });
        let known = |sku: &str| -> Result<&ProductRecord, LedgerError> {
            self.state.products.get(sku).ok_or_else(|| LedgerError::UnknownSku(sku.to_string()))
        };
        // A peer's product may have pushed the clock to its end: refuse rather than wrap.
        let next_lamport = || {
            self.lamport.checked_add(1).ok_or(LedgerError::Invalid { field: "lamport", problem: "the catalogue clock is exhausted".into() })
        };
        use stallmesh_identity::Role;
        let role = self.certificate.role;
        let is_cloud = role == Role::Cloud;
        let what = match &op {
            LocalOp::PlanDrop { .. } => "drops",
            LocalOp::RecordCloudHolds { .. } => "watermarks",
            LocalOp::Revoke(_) => "revocations",
            LocalOp::UpsertProduct(_) | LocalOp::AttachPhoto { .. } => "catalogue changes",
            LocalOp::Restock { .. } | LocalOp::Transfer { .. } => "stock changes",
            LocalOp::Sell { .. } => "sales",
            LocalOp::RecommendationFeedback(_) => "recommendation feedback",
            LocalOp::TransferLoyalty { .. } | LocalOp::MintVoucher { .. } | LocalOp::RedeemVoucher { .. } => "loyalty",
        };
        match &op {
            LocalOp::RecordCloudHolds { .. } if !is_cloud => return Err(LedgerError::RoleForbids { role: "seller or organiser", what }),
            LocalOp::RecordCloudHolds { .. } | LocalOp::Revoke(_) => {}
            _ if is_cloud => return Err(LedgerError::RoleForbids { role: "cloud", what }),
            LocalOp::Sell { .. } | LocalOp::Transfer { .. } => {}
            _ if role == Role::Online => return Err(LedgerError::RoleForbids { role: "online", what }),
            LocalOp::PlanDrop { .. } if role != Role::Organiser => return Err(LedgerError::RoleForbids { role: "seller", what }),
            _ => {}
        }
        Ok(match op {
            LocalOp::RecordCloudHolds { offset, heads } => {
                let body = EventBody::CloudHolds { offset, heads };
                limits(&body)?;
                body
            }
            LocalOp::PlanDrop { name, sku, units, start_ms, mut plan, max_per_buyer } => {
                plan.sort_by_key(|(device, _)| *device);
                let body = EventBody::DropPlanned { name, sku, units, start_ms, plan, max_per_buyer };
                limits(&body)?;
                let EventBody::DropPlanned { sku, plan, .. } = &body else { unreachable!("built above") };
                known(sku)?;
                for (device, _) in plan {
                    match self.state.devices.get(device) {
                        None => return Err(LedgerError::UnknownDevice(*device)),
                        Some(d) if d.revoked_at_ms.is_some() => return Err(LedgerError::UnknownDevice(*device)),
                        // The cloud's device never sells: units given to it would be stranded.
                        Some(d) if d.certificate.role == Role::Cloud => {
                            return Err(LedgerError::Invalid { field: "plan", problem: format!("device {device} is the cloud's and cannot sell") })
                        }
                        Some(_) => {}
                    }
                }
                body
            }
            LocalOp::UpsertProduct(p) => {
                let stall = p.stall.clone();
                let body = EventBody::ProductUpserted { product: std::sync::Arc::new(p), lamport: next_lamport()? };
                limits(&body)?;
                if self.certificate.role == stallmesh_identity::Role::Seller && stall != self.certificate.stall {
                    return Err(LedgerError::OtherStall { own: self.certificate.stall.clone(), other: stall });
                }
                body
            }
            LocalOp::Restock { sku, qty } => {
                let body = EventBody::Restocked { sku: sku.clone(), qty };
                limits(&body)?;
                known(&sku)?;
                body
            }
            LocalOp::Transfer { sku, qty, to } => {
                let body = EventBody::Transferred { sku: sku.clone(), qty, to };
                limits(&body)?;
                known(&sku)?;
                if to == self.me {
                    return Err(LedgerError::Invalid { field: "to_device", problem: "cannot transfer to this device itself".into() });
                }
                match self.state.devices.get(&to) {
                    None => return Err(LedgerError::UnknownDevice(to)),
                    Some(d) if d.revoked_at_ms.is_some() => return Err(LedgerError::UnknownDevice(to)),
                    Some(_) => {}
                }
                self.check_rights(&sku, qty)?;
                body
            }
            LocalOp::AttachPhoto { sku, jpeg } => {
                let body = EventBody::PhotoAttached { sku: sku.clone(), jpeg, lamport: next_lamport()? };
                limits(&body)?;
                let p = known(&sku)?;
                if self.certificate.role == stallmesh_identity::Role::Seller && p.product.stall != self.certificate.stall {
                    return Err(LedgerError::OtherStall { own: self.certificate.stall.clone(), other: p.product.stall.clone() });
                }
                body
            }
            LocalOp::TransferLoyalty { asset, qty, to } => {
                let body = EventBody::LoyaltyTransferred { asset, qty, to };
                limits(&body)?;
                if to == self.me {
                    return Err(LedgerError::Invalid { field: "to_device", problem: "cannot transfer to this device itself".into() });
                }
                if self.state.devices.get(&to).is_none_or(|d| d.revoked_at_ms.is_some()) {
                    return Err(LedgerError::UnknownDevice(to));
                }
                let held_here = self.state.loyalty.rights_of(&asset, &self.me);
                if qty > held_here {
                    return Err(LedgerError::InsufficientLoyaltyRights { asset: crate::loyalty::asset_label(&asset), requested: qty, held_here });
                }
                body
            }
            LocalOp::MintVoucher { voucher, label, value_cents } => {
                let body = EventBody::VoucherMinted { voucher, label, value_cents };
                limits(&body)?;
                if self.state.loyalty.vouchers.get(&voucher).is_some_and(|v| !v.minted.is_empty()) {
                    return Err(LedgerError::VoucherExists(voucher));
                }
                body
            }
            LocalOp::RedeemVoucher { voucher, offline_budget } => {
                let Some(v) = self.state.loyalty.vouchers.get(&voucher).filter(|v| !v.minted.is_empty()) else {
                    return Err(LedgerError::UnknownVoucher(voucher));
                };
                if let Some(by) = v.redemptions.keys().next() {
                    return Err(LedgerError::VoucherRedeemed { voucher, by: by.device });
                }
                let asset = LoyaltyAsset::Voucher(voucher);
                let proven = self.state.loyalty.rights_of(&asset, &self.me) >= 1;
                let spent = self.state.loyalty.unproven_spent(&self.me, None);
                if !proven && offline_budget.is_none_or(|b| b.vouchers_left(spent) == 0) {
                    let holders = self.state.loyalty.holders(&asset).into_keys().collect();
                    return Err(LedgerError::VoucherHeldElsewhere { voucher, holders });
                }
                EventBody::VoucherRedeemed { voucher, proven }
            }
            LocalOp::RecommendationFeedback(feedback) => {
                known(&feedback.sku)?;
                if let Some(chosen) = &feedback.chosen_sku {
                    known(chosen)?;
                }
                let body = EventBody::RecommendationFeedback { feedback };
                limits(&body)?;
                body
            }
            LocalOp::Sell { lines, client_ref, recommendation, loyalty, staff } => {
                if let Some(r) = &client_ref {
                    if let Some(sale_id) = self.state.sale_by_client_ref(&self.me, r) {
                        return Err(LedgerError::AlreadyRecorded { client_ref: r.clone(), sale_id: sale_id.to_string() });
                    }
                }
                let mut sale_lines = Vec::with_capacity(lines.len());
                let mut currency: Option<&str> = None;
                for l in &lines {
                    let p = known(&l.sku)?;
                    if let Some((drop, start_ms)) = self.state.drop_not_started(&l.sku, now_ms) {
                        return Err(LedgerError::DropNotStarted { sku: l.sku.clone(), drop: drop.to_string(), start_ms });
                    }
                    match currency {
                        None => currency = Some(&p.product.currency),
                        Some(c) if c != p.product.currency => {
                            return Err(LedgerError::MixedCurrency(c.to_string(), p.product.currency.clone()))
                        }
                        Some(_) => {}
                    }
                    sale_lines.push(SaleLine { sku: l.sku.clone(), qty: l.qty, price_cents: p.product.price_cents });
                }
                // An overflowing sum is refused by the limits just below.
                let total_cents = validate::sale_total_cents(&sale_lines).unwrap_or(u64::MAX);
                let loyalty = match loyalty {
                    Some(l) => Some(self.sale_loyalty(l)?),
                    None => None,
                };
                let body = EventBody::Sold {
                    total_cents,
                    lines: sale_lines,
                    currency: currency.unwrap_or("EUR").to_string(),
                    client_ref,
                    recommendation,
                    loyalty,
                    staff,
                };
                limits(&body)?;
                if !self.allow_overspend_for_tests {
                    let mut per_sku: BTreeMap<&str, u64> = BTreeMap::new();
                    for l in &lines {
                        let units = per_sku.entry(&l.sku).or_default();
                        *units = units.checked_add(l.qty).expect("limits bound a sale's units: MAX_QTY * MAX_SALE_LINES fits u64");
                    }
                    for (sku, q) in per_sku {
                        self.check_rights(sku, q)?;
                    }
                }
                body
            }
            LocalOp::Revoke(revocation) => {
                revocation.verify(&self.ctx.market_key).map_err(LedgerError::BadRevocation)?;
                EventBody::Revoked { revocation }
            }
        })
    }

    /// Splits a redemption into the points this device holds (proven) and the rest, which only its
    /// offline budget may cover.
    fn sale_loyalty(&self, l: LoyaltyOnSale) -> Result<SaleLoyalty, LedgerError> {
        let asset = LoyaltyAsset::Points(l.card);
        let held_here = self.state.loyalty.rights_of(&asset, &self.me);
        let proven = l.redeem_points.min(held_here);
        let unproven = l.redeem_points - proven;
        if unproven > 0 {
            let budget_left =
                l.offline_budget.map_or(0, |b| b.points_left(self.state.loyalty.unproven_spent(&self.me, Some(&l.card))));
            if unproven > budget_left {
                let held_elsewhere: BTreeMap<DeviceId, u64> =
                    self.state.loyalty.holders(&asset).into_iter().filter(|(d, _)| *d != self.me).collect();
                return Err(LedgerError::InsufficientPoints {
                    card: l.card,
                    requested: l.redeem_points,
                    held_here,
                    held_elsewhere_total: held_elsewhere.values().fold(0u64, |a, b| a.saturating_add(*b)),
                    held_elsewhere,
                    budget_left,
                });
            }
        }
        let discount_cents = l.point_value_cents.checked_mul(l.redeem_points).ok_or(LedgerError::Invalid {
            field: "loyalty.redeem_points",
            problem: "the discount does not fit u64".into(),
        })?;
        Ok(SaleLoyalty { card: l.card, points_earned: l.points_earned, points_redeemed: proven, points_unproven: unproven, discount_cents })
    }

    fn check_rights(&self, sku: &str, requested: u64) -> Result<(), LedgerError> {
        let held_here = self.state.rights_of(sku, &self.me);
        if requested <= held_here {
            return Ok(());
        }
        let held_elsewhere: BTreeMap<DeviceId, u64> = self.state.stock(sku).per_device.into_iter().filter(|(d, _)| *d != self.me).collect();
        Err(LedgerError::InsufficientRights {
            sku: sku.to_string(),
            requested,
            held_here,
            held_elsewhere_total: held_elsewhere.values().sum(),
            held_elsewhere,
        })
    }

    /// Appends `event` to this device's journal: automerge change, signature, fold.
    pub(crate) fn commit_local(&mut self, event: Event) -> Result<Entry, LedgerError> {
        let me = self.me;
        let journal = self.journals.entry(me).or_default();
        let seq = journal.next_seq;
        let index = Journal::segment_index(seq);
        let am_err = |e: String| LedgerError::Invalid { field: "journal", problem: e };
        let seg = journal.doc(&me).map_err(am_err)?;
        let mut tx = seg.doc.transaction();
        let list = match &seg.events {
            Some(l) => l.clone(),
            None => tx.put_object(ROOT, "events", ObjType::List).map_err(|e| am_err(e.to_string()))?,
        };
        event::write_event(&mut tx, &list, index, &event).map_err(|e| am_err(e.to_string()))?;
        tx.commit_with(CommitOptions::default().with_time((event.time_ms / 1000) as i64));
        seg.events = Some(list);
        let change = seg.doc.get_last_local_change().ok_or_else(|| am_err("no change committed".into()))?;
        let bytes = change.raw_bytes().to_vec();
        let causal = std::mem::take(&mut self.unreferenced_transfers_in);
        let signed = self.key.sign_change(self.ctx.market, seq, causal, bytes);
        let dot = signed.dot();
        if !self.allow_overspend_for_tests {
            // Validation above guarantees this; a failure is a bug in the core, not bad input.
            self.state.check(dot, &event).expect("locally validated event folds");
        }
        self.journals.get_mut(&me).expect("created above").advance(&signed);
        self.advanced(me);
        self.touch_doc(me);
        self.after_fold(dot, &event);
        debug_assert_eq!(self.heads.get(&me).copied(), Some(seq + 1), "a local change extends this device's journal by one");
        debug_assert!(self.unreferenced_transfers_in.is_empty(), "a local change carries every transfer received before it");
        Ok(Entry { change: signed, event })
    }
}
