//! The market state every replica derives from the journals it holds, and its projections.
//!
//! Folding is order-independent for any causal order: stock rights are sums, sales are keyed by
//! their journal position, products are last-writer-wins on (lamport, author). So replicas that
//! hold the same set of changes have identical state.

use crate::event::{Event, EventBody, Product, RecommendationShown, SaleLine, SaleLoyalty};
use serde::Serialize;
use stallmesh_identity::{Certificate, DeviceId, Dot};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// A sale's id is its journal position: unique by construction, so it can never be duplicated.
pub fn sale_id(dot: Dot) -> String {
    format!("{}-{}", hex::encode(&dot.device.0[..8]), dot.seq)
}

/// A drop's id is its journal position, as a sale's: unique by construction.
pub fn drop_id(dot: Dot) -> String {
    sale_id(dot)
}

/// A drop as planned ([`EventBody::DropPlanned`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DropRecord {
    pub id: String,
    /// The organiser that planned it, and where in its journal.
    pub author: DeviceId,
    pub seq: u64,
    /// When the organiser recorded it (its clock).
    pub planned_at_ms: u64,
    pub name: String,
    pub sku: String,
    pub units: u64,
    pub start_ms: u64,
    /// device → units of the drop it was given.
    pub plan: BTreeMap<DeviceId, u64>,
    pub max_per_buyer: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceRecord {
    /// Shared with the enrolment event it was folded from (every replica folds the same one).
    pub certificate: Arc<Certificate>,
    pub revoked_at_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProductRecord {
    /// Shared with the event it was folded from (every replica folds the same one).
    #[serde(flatten)]
    pub product: Arc<Product>,
    pub lamport: u64,
    pub author: DeviceId,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sale {
    pub id: String,
    pub device: DeviceId,
    pub seq: u64,
    pub lines: Vec<SaleLine>,
    pub total_cents: u64,
    pub currency: String,
    pub time_ms: u64,
    pub client_ref: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recommendation: Option<RecommendationShown>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loyalty: Option<SaleLoyalty>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staff: Option<String>,
}

/// One recorded answer of staff to a recommendation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FeedbackRecord {
    pub device: DeviceId,
    pub seq: u64,
    /// The recording device's clock.
    pub time_ms: u64,
    pub feedback: crate::event::RecommendationFeedback,
}

/// A product's current photo: last writer wins on (lamport, author), like the product itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PhotoRecord {
    #[serde(skip)]
    pub jpeg: Vec<u8>,
    pub lamport: u64,
    pub author: DeviceId,
}

/// What one cloud device has said its reconciled log holds: its [`EventBody::CloudHolds`] folded
/// together (each lists only what grew since the one before).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CloudWatermark {
    /// The cloud's journal position of its latest watermark (`time_ms` and `offset` are that one's).
    pub seq: u64,
    /// When the cloud recorded it (the cloud's clock).
    pub time_ms: u64,
    /// Entries in the cloud's reconciled log of this market.
    pub offset: u64,
    /// device → entries of its journal the cloud holds: each device's highest count over all its
    /// watermarks.
    pub heads: BTreeMap<DeviceId, u64>,
}

/// One SKU's stock rights: device → units, in device order. A sorted list, not a map: a SKU has a
/// handful of holders (its stall's tablets), every replica keeps one of these per SKU of the
/// market, and the smallest `BTreeMap` allocates room for eleven.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holders(Vec<(DeviceId, u64)>);

impl Holders {
    pub fn get(&self, device: &DeviceId) -> Option<&u64> {
        self.0.binary_search_by(|(d, _)| d.cmp(device)).ok().map(|i| &self.0[i].1)
    }

    pub fn get_mut(&mut self, device: &DeviceId) -> Option<&mut u64> {
        self.0.binary_search_by(|(d, _)| d.cmp(device)).ok().map(|i| &mut self.0[i].1)
    }

    /// The device's units, added at 0 if it held none.
    pub fn held_mut(&mut self, device: DeviceId) -> &mut u64 {
        let i = match self.0.binary_search_by(|(d, _)| d.cmp(&device)) {
            Ok(i) => i,
            Err(i) => {
                // Room for exactly one more: a SKU gains holders one at a time and rarely (a
                // doubling Vec would keep four slots for the usual one holder, in every replica).
                self.0.reserve_exact(1);
                self.0.insert(i, (device, 0));
                i
            }
        };
        &mut self.0[i].1
    }

    /// Sets the device's units.
    pub fn insert(&mut self, device: DeviceId, units: u64) {
        *self.held_mut(device) = units;
    }

    /// (device, units) in device order.
    pub fn iter(&self) -> impl Iterator<Item = (&DeviceId, &u64)> + '_ {
        self.0.iter().map(|(d, n)| (d, n))
    }

    pub fn values(&self) -> impl Iterator<Item = &u64> + '_ {
        self.0.iter().map(|(_, n)| n)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Why an event cannot be folded into the state. For a remote change this is a protocol violation.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum FoldError {
    #[error("device {device} spends {qty} of {sku} but holds {held}")]
    Overspend { device: DeviceId, sku: String, qty: u64, held: u64 },
    #[error("enrolment is only valid as journal entry 0")]
    MisplacedEnrolment,
    #[error("invalid event: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct State {
    pub devices: BTreeMap<DeviceId, DeviceRecord>,
    pub products: BTreeMap<String, ProductRecord>,
    /// sku → device → units that device may sell. Never negative (u64, checked on every spend).
    pub rights: BTreeMap<String, Holders>,
    pub sales: BTreeMap<String, Sale>,
    pub photos: BTreeMap<String, PhotoRecord>,
    /// Product and photo events folded so far: tells a derived index (search) when to rebuild.
    pub catalogue_changes: u64,
    pub restocks: u64,
    pub transfers: u64,
    /// Cloud device → its latest watermark. Per device, the highest journal position wins, so the
    /// result does not depend on arrival order.
    pub cloud_watermarks: BTreeMap<DeviceId, CloudWatermark>,
    /// Cards' points, vouchers, unproven spending and exposures (`loyalty.rs`).
    pub loyalty: crate::loyalty::LoyaltyState,
    /// Drops by id ([`drop_id`]).
    pub drops: BTreeMap<String, DropRecord>,
    /// Staff's dismissals and overrides of recommendations, in fold order (every replica folds a
    /// device's journal in order; across devices the order may differ, so readers sort).
    pub recommendation_feedback: Vec<FeedbackRecord>,
    /// Revocations of devices whose enrolment this replica has not folded yet (earliest time per
    /// device): the revocation and the enrolment are in different journals, so either may arrive
    /// first, and the device must end up revoked either way.
    early_revocations: BTreeMap<DeviceId, u64>,
    /// device → client_ref → id of the device's earliest sale carrying it. Derived from `sales` in
    /// [`State::fold`], so a till's retry is found without scanning the day's sales.
    client_refs: HashMap<DeviceId, HashMap<String, String>>,
    /// sku → the latest start of a drop of it, and that drop's id: what a till checks before
    /// selling (the latest start decides whether any of the SKU's drops has yet to open).
    latest_drop_start: HashMap<String, (u64, String)>,
    /// device → the times of its sales (author's clock), sorted. Derived from `sales` in
    /// [`State::fold`], so a recent-sales count is a binary search, not a scan of the day.
    sale_times_ms: HashMap<DeviceId, Vec<u64>>,
}

impl State {
    pub fn rights_of(&self, sku: &str, device: &DeviceId) -> u64 {
        self.rights.get(sku).and_then(|m| m.get(device)).copied().unwrap_or(0)
    }

    /// The id of `device`'s sale carrying `client_ref`, if it recorded one: a till's retry is
    /// answered with the sale already made. Should a device have recorded one client_ref twice (only
    /// a forged or broken journal can: the local check refuses it), the earliest in its journal is
    /// named, the same on every replica. O(1).
    pub fn sale_by_client_ref(&self, device: &DeviceId, client_ref: &str) -> Option<&str> {
        self.client_refs.get(device)?.get(client_ref).map(String::as_str)
    }

    /// The drop of `sku` that opens after `now_ms`, if any: (drop id, start). O(1).
    pub fn drop_not_started(&self, sku: &str, now_ms: u64) -> Option<(&str, u64)> {
        self.latest_drop_start.get(sku).filter(|(start_ms, _)| *start_ms > now_ms).map(|(start_ms, id)| (id.as_str(), *start_ms))
    }

    /// How many sales `device` recorded at or after `since_ms` (by its own clock, as the sales
    /// carry): what a giver of stock rights weighs. For the sales of the last window, pass
    /// `now_ms.saturating_sub(window_ms)`, which counts exactly the sales with
    /// `time_ms.saturating_add(window_ms) >= now_ms`. O(log n) in the device's sales.
    pub fn sales_of_device_since(&self, device: &DeviceId, since_ms: u64) -> u64 {
        let Some(times_ms) = self.sale_times_ms.get(device) else { return 0 };
        (times_ms.len() - times_ms.partition_point(|t| *t < since_ms)) as u64
    }

    /// Checks, without changing anything, that `event` by `dot.device` can be folded.
    pub fn check(&self, dot: Dot, event: &Event) -> Result<(), FoldError> {
        let spend = |sku: &str, qty: u64| -> Result<(), FoldError> {
            let held = self.rights_of(sku, &dot.device);
            if qty > held {
                return Err(FoldError::Overspend { device: dot.device, sku: sku.to_string(), qty, held });
            }
            Ok(())
        };
        match &event.body {
            EventBody::Enrolled { .. } if dot.seq != 0 => return Err(FoldError::MisplacedEnrolment),
            EventBody::Enrolled { .. } => {}
            _ if dot.seq == 0 => return Err(FoldError::Invalid("journal entry 0 must be the enrolment".into())),
            _ => {}
        }
        crate::validate::check_event_body(&event.body).map_err(|e| FoldError::Invalid(e.to_string()))?;
        // What a role may record, checked here so every replica (and the cloud) applies one rule.
        // The ledger folds a device's enrolment (entry 0) before anything else it signed, so the
        // author's role is known; an unknown one can record no watermark.
        let role = match &event.body {
            EventBody::Enrolled { certificate } => Some(certificate.role),
            _ => self.devices.get(&dot.device).map(|d| d.certificate.role),
        };
        let is_cloud = role == Some(stallmesh_identity::Role::Cloud);
        let is_online = role == Some(stallmesh_identity::Role::Online);
        match &event.body {
            EventBody::CloudHolds { .. } if !is_cloud => {
                return Err(FoldError::Invalid("only a device of role cloud records what the cloud holds".into()))
            }
            EventBody::DropPlanned { .. } if role != Some(stallmesh_identity::Role::Organiser) => {
                return Err(FoldError::Invalid("only a device of role organiser plans a drop".into()))
            }
            EventBody::Enrolled { .. } | EventBody::CloudHolds { .. } | EventBody::Revoked { .. } => {}
            _ if is_cloud => return Err(FoldError::Invalid("a device of role cloud records only enrolments, revocations and watermarks".into())),
            EventBody::Sold { .. } | EventBody::Transferred { .. } => {}
            _ if is_online => return Err(FoldError::Invalid("a device of role online records only sales and transfers".into())),
            _ => {}
        }
        self.loyalty.check(&dot.device, &event.body)?;
        match &event.body {
            EventBody::Enrolled { .. }
            | EventBody::CloudHolds { .. }
            | EventBody::ProductUpserted { .. }
            | EventBody::PhotoAttached { .. }
            | EventBody::Revoked { .. }
            | EventBody::LoyaltyTransferred { .. }
            | EventBody::VoucherMinted { .. }
            | EventBody::VoucherRedeemed { .. }
            | EventBody::RecommendationFeedback { .. } => Ok(()),
            // Unreachable within the limits (2^64 units take 1.8e13 restocks of MAX_QTY), so it does
            // not matter that it depends on other devices' restocks: refusing beats wrapping.
            EventBody::Restocked { sku, qty } => match self.total_rights(sku).checked_add(*qty) {
                Some(_) => Ok(()),
                None => Err(FoldError::Invalid(format!("restock of {qty} {sku} takes the market's stock rights past u64::MAX"))),
            },
            EventBody::Transferred { to, .. } if *to == dot.device => Err(FoldError::Invalid("transfer to self".into())),
            EventBody::Transferred { sku, qty, .. } => spend(sku, *qty),
            // As a restock: new units, unreachable past u64 within the limits.
            EventBody::DropPlanned { sku, units, .. } => match self.total_rights(sku).checked_add(*units) {
                Some(_) => Ok(()),
                None => Err(FoldError::Invalid(format!("drop of {units} {sku} takes the market's stock rights past u64::MAX"))),
            },
            EventBody::Sold { lines, .. } => {
                let mut per_sku: BTreeMap<&str, u64> = BTreeMap::new();
                for l in lines {
                    let units = per_sku.entry(&l.sku).or_default();
                    *units = units.checked_add(l.qty).expect("limits bound a sale's units: MAX_QTY * MAX_SALE_LINES fits u64");
                }
                per_sku.into_iter().try_for_each(|(sku, qty)| spend(sku, qty))
            }
        }
    }

    /// Units of `sku` held across the market. Fits u64: [`State::check`] refuses any restock past it.
    fn total_rights(&self, sku: &str) -> u64 {
        self.rights.get(sku).map_or(0, |per_device| {
            per_device.values().try_fold(0u64, |total, held| total.checked_add(*held)).expect("a SKU's total stock rights fit u64")
        })
    }

    /// Folds one event. The caller has run [`State::check`]; a failure here means the core is broken.
    pub fn fold(&mut self, dot: Dot, event: &Event) {
        self.loyalty.fold(dot, &event.body);
        match &event.body {
            EventBody::Enrolled { certificate } => {
                let revoked_at_ms = self.early_revocations.remove(&dot.device);
                self.devices.entry(dot.device).or_insert_with(|| DeviceRecord { certificate: certificate.clone(), revoked_at_ms });
            }
            EventBody::ProductUpserted { product, lamport } => {
                self.catalogue_changes += 1;
                let newer = match self.products.get(&product.sku) {
                    Some(cur) => (*lamport, dot.device) > (cur.lamport, cur.author),
                    None => true,
                };
                if newer {
                    self.products
                        .insert(product.sku.clone(), ProductRecord { product: product.clone(), lamport: *lamport, author: dot.device });
                }
            }
            EventBody::Restocked { sku, qty } => {
                // `check` refuses a restock taking the SKU's total past u64; a device holds at most the total.
                self.total_rights(sku).checked_add(*qty).expect("checked: a SKU's total stock rights stay within u64");
                let held = self.rights.entry(sku.clone()).or_default().held_mut(dot.device);
                *held = held.checked_add(*qty).expect("a device holds at most the SKU's total");
                self.restocks += 1;
            }
            EventBody::Transferred { sku, qty, to } => {
                self.spend(sku, &dot.device, *qty);
                let held = self.rights.entry(sku.clone()).or_default().held_mut(*to);
                // A transfer moves rights without changing the SKU's total, which fits u64.
                *held = held.checked_add(*qty).expect("transferred rights within the SKU's total");
                self.transfers += 1;
            }
            EventBody::Sold { lines, total_cents, currency, client_ref, recommendation, loyalty, staff } => {
                for l in lines {
                    self.spend(&l.sku, &dot.device, l.qty);
                }
                let id = sale_id(dot);
                let previous = self.sales.insert(
                    id.clone(),
                    Sale {
                        id,
                        device: dot.device,
                        seq: dot.seq,
                        lines: lines.clone(),
                        total_cents: *total_cents,
                        currency: currency.clone(),
                        time_ms: event.time_ms,
                        client_ref: client_ref.clone(),
                        recommendation: recommendation.clone(),
                        loyalty: loyalty.clone(),
                        staff: staff.clone(),
                    },
                );
                assert!(previous.is_none(), "a journal position is folded at most once");
                self.index_sale(dot, event.time_ms, client_ref.as_deref());
            }
            EventBody::PhotoAttached { sku, jpeg, lamport } => {
                self.catalogue_changes += 1;
                let newer = self.photos.get(sku).is_none_or(|cur| (*lamport, dot.device) > (cur.lamport, cur.author));
                if newer {
                    self.photos.insert(sku.clone(), PhotoRecord { jpeg: jpeg.clone(), lamport: *lamport, author: dot.device });
                }
            }
            EventBody::CloudHolds { offset, heads } => {
                // A watermark lists only the devices whose count grew since the cloud's previous
                // one: they are merged over it, each device's highest count winning, so the result
                // does not depend on arrival order either.
                let mark = self.cloud_watermarks.entry(dot.device).or_insert_with(|| CloudWatermark {
                    seq: dot.seq,
                    time_ms: event.time_ms,
                    offset: *offset,
                    heads: BTreeMap::new(),
                });
                if dot.seq >= mark.seq {
                    (mark.seq, mark.time_ms, mark.offset) = (dot.seq, event.time_ms, *offset);
                }
                for (device, held) in heads {
                    let count = mark.heads.entry(*device).or_insert(0);
                    *count = (*count).max(*held);
                }
            }
            EventBody::Revoked { revocation } => {
                // The earliest revocation wins, so the result does not depend on arrival order.
                let earliest = |held: Option<u64>| held.map_or(revocation.revoked_at_ms, |t| t.min(revocation.revoked_at_ms));
                match self.devices.get_mut(&revocation.device) {
                    Some(d) => d.revoked_at_ms = Some(earliest(d.revoked_at_ms)),
                    None => {
                        let t = earliest(self.early_revocations.get(&revocation.device).copied());
                        self.early_revocations.insert(revocation.device, t);
                    }
                }
            }
            // Folded into `self.loyalty` above.
            EventBody::LoyaltyTransferred { .. } | EventBody::VoucherMinted { .. } | EventBody::VoucherRedeemed { .. } => {}
            EventBody::DropPlanned { name, sku, units, start_ms, plan, max_per_buyer } => {
                self.total_rights(sku).checked_add(*units).expect("checked: a SKU's total stock rights stay within u64");
                for (device, share) in plan {
                    let held = self.rights.entry(sku.clone()).or_default().held_mut(*device);
                    *held = held.checked_add(*share).expect("a device holds at most the SKU's total");
                }
                let id = drop_id(dot);
                let latest = self.latest_drop_start.entry(sku.clone()).or_insert((*start_ms, id.clone()));
                // The latest start wins, ties by id: the same on every replica whatever the order.
                if (*start_ms, &id) > (latest.0, &latest.1) {
                    *latest = (*start_ms, id.clone());
                }
                let record = DropRecord {
                    id: id.clone(),
                    author: dot.device,
                    seq: dot.seq,
                    planned_at_ms: event.time_ms,
                    name: name.clone(),
                    sku: sku.clone(),
                    units: *units,
                    start_ms: *start_ms,
                    plan: plan.iter().copied().collect(),
                    max_per_buyer: *max_per_buyer,
                };
                let previous = self.drops.insert(id, record);
                assert!(previous.is_none(), "a journal position is folded at most once");
            }
            EventBody::RecommendationFeedback { feedback } => self.recommendation_feedback.push(FeedbackRecord {
                device: dot.device,
                seq: dot.seq,
                time_ms: event.time_ms,
                feedback: feedback.clone(),
            }),
        }
    }

    /// Adds a newly folded sale to the indexes derived from `sales`.
    fn index_sale(&mut self, dot: Dot, time_ms: u64, client_ref: Option<&str>) {
        if let Some(r) = client_ref {
            // A device's sales fold in journal order on every replica, so the first one kept is the
            // earliest: the same answer everywhere.
            self.client_refs.entry(dot.device).or_default().entry(r.to_string()).or_insert_with(|| sale_id(dot));
        }
        let times_ms = self.sale_times_ms.entry(dot.device).or_default();
        // A device's clock mostly moves forward, so appending is the common case; a clock set back
        // inserts in order (after any equal times).
        let at =
            if times_ms.last().is_none_or(|last| *last <= time_ms) { times_ms.len() } else { times_ms.partition_point(|t| *t <= time_ms) };
        times_ms.insert(at, time_ms);
        // Sorted around the new time (checking the whole list would make a day quadratic in tests).
        debug_assert!(at == 0 || times_ms[at - 1] <= time_ms, "sale times are kept sorted");
        debug_assert!(times_ms.get(at + 1).is_none_or(|next| time_ms <= *next), "sale times are kept sorted");
    }

    fn spend(&mut self, sku: &str, device: &DeviceId, qty: u64) {
        let held = self.rights.get_mut(sku).and_then(|m| m.get_mut(device));
        match held {
            Some(h) if *h >= qty => *h -= qty,
            // Invariant: stock rights never go negative. `check` and causal delivery guarantee it.
            _ => panic!("invariant violated: {device:?} spends {qty} of {sku} beyond its stock rights"),
        }
    }

    /// Stock of one SKU: total and per device.
    pub fn stock(&self, sku: &str) -> StockView {
        let per_device: BTreeMap<DeviceId, u64> =
            self.rights.get(sku).map(|m| m.iter().filter(|(_, v)| **v > 0).map(|(k, v)| (*k, *v)).collect()).unwrap_or_default();
        StockView { sku: sku.to_string(), total: self.total_rights(sku), per_device }
    }

    /// What became of a drop: units of its SKU each device holds now and sold since it opened.
    /// Scans the day's sales (a drop is looked at by people, not on a till's hot path); sums
    /// saturate, since a projection must never panic under the node's lock.
    pub fn drop_progress(&self, drop: &DropRecord) -> DropProgress {
        let held = self.stock(&drop.sku).per_device;
        let mut sold: BTreeMap<DeviceId, u64> = BTreeMap::new();
        let mut last_sale_ms = None;
        for sale in self.sales.values().filter(|s| s.time_ms >= drop.start_ms) {
            let units = sale.lines.iter().filter(|l| l.sku == drop.sku).fold(0u64, |n, l| n.saturating_add(l.qty));
            if units > 0 {
                let n = sold.entry(sale.device).or_default();
                *n = n.saturating_add(units);
                last_sale_ms = last_sale_ms.max(Some(sale.time_ms));
            }
        }
        let sold_out_at_ms = if held.is_empty() { last_sale_ms } else { None };
        DropProgress { held, sold, sold_out_at_ms }
    }

    /// Revenue and units over every sale. Sums run in u128 and are clamped to u64: a market's
    /// revenue past u64::MAX cents (1.8e17 EUR) can only come from forged sales, and a projection
    /// must never panic under the node's lock.
    pub fn summary(&self) -> SalesSummary {
        fn clamp(v: u128) -> u64 {
            u64::try_from(v).unwrap_or(u64::MAX)
        }
        let mut sales: u64 = 0;
        let mut units: u128 = 0;
        let mut revenue_cents: BTreeMap<String, u128> = BTreeMap::new();
        let mut revenue_cents_per_hour: BTreeMap<u64, u128> = BTreeMap::new();
        for sale in self.sales.values() {
            sales += 1;
            *revenue_cents.entry(sale.currency.clone()).or_default() += u128::from(sale.total_cents);
            let hour_start_ms = sale.time_ms - sale.time_ms % 3_600_000;
            *revenue_cents_per_hour.entry(hour_start_ms).or_default() += u128::from(sale.total_cents);
            units += sale.lines.iter().map(|l| u128::from(l.qty)).sum::<u128>();
        }
        // u128 sums cannot overflow: fewer than 2^64 sales of at most u64::MAX each.
        let total_cents: u128 = revenue_cents.values().sum();
        SalesSummary {
            sales,
            units: clamp(units),
            revenue_cents: revenue_cents.into_iter().map(|(c, v)| (c, clamp(v))).collect(),
            revenue_cents_per_hour: revenue_cents_per_hour.into_iter().map(|(h, v)| (h, clamp(v))).collect(),
            average_order_cents: clamp(total_cents.checked_div(u128::from(sales)).unwrap_or(0)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StockView {
    pub sku: String,
    pub total: u64,
    pub per_device: BTreeMap<DeviceId, u64>,
}

/// [`State::drop_progress`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DropProgress {
    /// device → units of the drop's SKU it holds (devices holding none are left out).
    pub held: BTreeMap<DeviceId, u64>,
    /// device → units of the SKU it sold at or after the drop's start (by the seller's clock).
    pub sold: BTreeMap<DeviceId, u64>,
    /// With nothing left anywhere: the time of the last sale of the SKU since the start.
    pub sold_out_at_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SalesSummary {
    pub sales: u64,
    pub units: u64,
    pub revenue_cents: BTreeMap<String, u64>,
    /// Start of the hour (ms since the epoch, author's clock) → revenue in that hour.
    pub revenue_cents_per_hour: BTreeMap<u64, u64>,
    pub average_order_cents: u64,
}
