//! The online channel's checkout, driven under the market's lock: every decision is
//! `stallmesh-shop`'s, on the online device's ledger caught up with the log and the holds read in
//! the same store transaction that then writes the hold or the sale. So several cloud processes
//! on one PostgreSQL take turns per market, and a hold or a sale is answered only once committed.

use super::*;

/// What a drop looks like from the online channel, for a shop's product page.
#[derive(Debug, Clone)]
pub struct OnlineDropView {
    pub drop: stallmesh_ledger::DropRecord,
    pub online_device: DeviceId,
    /// Units the online device holds (held in buyers' holds included).
    pub held_online: u64,
    /// Of those, in buyers' holds.
    pub in_holds: u64,
    /// Units of the SKU the other devices (the stalls) hold.
    pub held_elsewhere: u64,
    /// Units the online device sold since the drop opened.
    pub sold_online: u64,
    pub next_expiry_ms: Option<u64>,
    pub now_ms: u64,
}

/// The store reads a step needs, named from the online ledger once caught up under the lock.
#[derive(Default)]
struct Reads {
    /// A hold by id.
    hold: Option<String>,
    /// A [`HoldsView`]: (sku, drop, buyer).
    view: Option<(String, String, String)>,
}

/// What [`Reads`] found, read in the transaction the step's writes then commit in.
#[derive(Default)]
struct Read {
    hold: Option<Hold>,
    view: HoldsView,
}

/// A step's outcome: its value, the online device's new changes to log, holds to write.
type Step<T> = Result<(T, Vec<SignedChange>, Vec<Hold>), SyncError>;

impl Markets {
    /// Sets up the market's online channel (its device of role `online`, checked by the caller)
    /// and logs its enrolment, so every tablet learns of it through the next upload.
    pub async fn set_online(&self, market: &MarketId, online: OnlineRegistration) -> Result<(Registered, DeviceId), SyncError> {
        let outcome = self.store.set_online(market, &online, now_ms()).await?;
        let slot = self.slot(market).await?;
        let mut slot = slot.lock().await;
        // Read back from the store: it names the device to run.
        slot.online = None;
        self.with_online(&mut slot, |_| Ok(Reads::default()), |_, _, _| Ok(((), Vec::new(), Vec::new()))).await?;
        let device = slot.online.as_ref().map(|o| o.certificate.device).ok_or(ShopError::NoOnlineChannel)?;
        Ok((outcome, device))
    }

    /// Runs `step` on the online channel's ledger under the market's store lock: catches up with
    /// the log, logs the online device's enrolment if it has none yet, reads what `plan` names
    /// (from the caught-up ledger), runs `step` (synchronous: every decision is
    /// `stallmesh-shop`'s) and commits what it returns in the same transaction.
    async fn with_online<T>(
        &self,
        slot: &mut MarketSlot,
        plan: impl FnOnce(&Ledger) -> Result<Reads, SyncError>,
        step: impl FnOnce(&mut Ledger, Read, u64) -> Step<T>,
    ) -> Result<(T, u64), SyncError> {
        let market = slot.registration.market;
        if slot.online.is_none() {
            slot.online = self.store.online(&market).await?;
            if slot.online.is_none() {
                return Err(ShopError::NoOnlineChannel.into());
            }
            slot.loaded = None; // rebuilt with the online channel's ledger
        }
        if let Err(e) = self.refresh(slot).await {
            slot.loaded = None;
            return Err(e);
        }
        let mut loaded = slot.loaded.take().expect("refreshed");
        let result = self.online_step(market, &mut loaded, plan, step).await;
        // A refusal changed nothing; any other failure may have left a ledger ahead of the
        // store, so the market is rebuilt from the store on its next request.
        if matches!(result, Ok(_) | Err(SyncError::Shop(_))) {
            slot.loaded = Some(loaded);
        }
        result
    }

    async fn online_step<T>(
        &self,
        market: MarketId,
        loaded: &mut Loaded,
        plan: impl FnOnce(&Ledger) -> Result<Reads, SyncError>,
        step: impl FnOnce(&mut Ledger, Read, u64) -> Step<T>,
    ) -> Result<(T, u64), SyncError> {
        let mut tx = self.lock(market, loaded).await?;
        let now = now_ms();
        let online = loaded.online.as_mut().ok_or(ShopError::NoOnlineChannel)?;
        let mut changes = Vec::new();
        if let Some(enrolment) = online.enrol_self(now).map_err(ShopError::Ledger)? {
            changes.push(enrolment.change);
        }
        let decided = match plan(online) {
            Ok(reads) => {
                let mut read = Read::default();
                if let Some(id) = &reads.hold {
                    read.hold = tx.hold(id).await?;
                }
                if let Some((sku, drop, buyer)) = &reads.view {
                    read.view = tx.holds_view(sku, drop, buyer, now).await?;
                }
                step(online, read, now)
            }
            Err(e) => Err(e),
        };
        let (value, holds) = match decided {
            Ok((value, more, holds)) => {
                changes.extend(more);
                (Ok(value), holds)
            }
            // A refusal changes nothing, but an enrolment signed just now must still be logged:
            // the online ledger holds it, and a later change of the device builds on it.
            Err(e) => (Err(e), Vec::new()),
        };
        if changes.is_empty() && holds.is_empty() {
            return value.map(|v| (v, loaded.ingest.offset())); // the transaction rolls back: nothing to write
        }
        self.log_and_commit(market, loaded, tx, changes, &holds, now).await?;
        value.map(|v| (v, loaded.ingest.offset()))
    }

    /// Places a buyer's hold on units of a drop the online channel holds.
    pub async fn place_hold(&self, market: &MarketId, req: HoldRequest, ttl_ms: u64) -> Result<HoldOutcome, SyncError> {
        // Checked before anything is read for it: bad text never reaches the store.
        stallmesh_shop::check_request(&req)?;
        let slot = self.slot(market).await?;
        let mut slot = slot.lock().await;
        let market = *market;
        let id = stallmesh_shop::hold_id(&market, &req.buyer, &req.idempotency_key);
        let (drop, buyer) = (req.drop.clone(), req.buyer.clone());
        let (asked_drop, asked_qty) = (req.drop.clone(), req.qty);
        let plan = move |online: &Ledger| {
            let sku = online.state().drops.get(&drop).map(|d| d.sku.clone()).ok_or_else(|| ShopError::UnknownDrop(drop.clone()))?;
            Ok(Reads { hold: Some(id), view: Some((sku, drop, buyer)) })
        };
        let step = move |online: &mut Ledger, read: Read, now: u64| -> Step<HoldOutcome> {
            match stallmesh_shop::place_hold(online, &market, read.hold.as_ref(), &read.view, &req, ttl_ms, now)? {
                Placed::New(h) => Ok((HoldOutcome { hold: h.clone(), created: true, now_ms: now }, Vec::new(), vec![h])),
                Placed::Again(h) => Ok((HoldOutcome { hold: h, created: false, now_ms: now }, Vec::new(), Vec::new())),
            }
        };
        let result = self.with_online(&mut slot, plan, step).await;
        if let Err(SyncError::Shop(ShopError::SoldOut { held_elsewhere, .. })) = &result {
            if *held_elsewhere > 0 {
                self.ask_tablets(&mut slot, &asked_drop, asked_qty);
            }
        }
        Ok(result?.0)
    }

    /// The online channel sold out of `sku` while the tablets hold some: ask them, in every
    /// reply to an uplink, for `qty` plus a refill, for `stallmesh_shop::ONLINE_ASK_MS` or until one gives.
    fn ask_tablets(&self, slot: &mut MarketSlot, drop: &str, qty: u64) {
        let Some(loaded) = slot.loaded.as_mut() else { return };
        let Some(sku) = loaded.online.as_ref().and_then(|o| o.state().drops.get(drop)).map(|d| d.sku.clone()) else { return };
        let policy = stallmesh_sync::rebalance::RebalancePolicy::default();
        if !loaded.online_asks.sold_out(&sku, qty, &policy, now_ms()) {
            return; // asks for other SKUs fill the reply; this one is asked again on the next refusal
        }
        self.metrics.online_rights_asked.inc();
    }

    /// Pays a held hold: the online device's signed sale, logged with the hold in one commit.
    pub async fn pay_hold(&self, market: &MarketId, drop: &str, hold_id: &str) -> Result<OrderOutcome, SyncError> {
        // A hold id is what `hold_id` writes (32 hex characters): anything else names no hold,
        // and never reaches the store.
        if hold_id.len() != 32 || !hold_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ShopError::UnknownHold(hold_id.chars().take(64).collect()).into());
        }
        let slot = self.slot(market).await?;
        let mut slot = slot.lock().await;
        let (drop, id) = (drop.to_string(), hold_id.to_string());
        let plan = {
            let id = id.clone();
            move |_: &Ledger| Ok(Reads { hold: Some(id), view: None })
        };
        let step = move |online: &mut Ledger, read: Read, now: u64| -> Step<(Hold, bool)> {
            let hold = read.hold.filter(|h| h.drop == drop).ok_or(ShopError::UnknownHold(id))?;
            match stallmesh_shop::pay(online, &hold, now)? {
                Paid::New { hold, entry } => Ok(((hold.clone(), true), vec![entry.change], vec![hold])),
                Paid::Again(paid) => {
                    // Paid through another process whose hold row this one had not read: write it.
                    let write = if hold.sale.is_none() { vec![paid.clone()] } else { Vec::new() };
                    Ok(((paid, false), Vec::new(), write))
                }
            }
        };
        let ((hold, created), offset) = self.with_online(&mut slot, plan, step).await?;
        let online = slot.loaded.as_ref().and_then(|l| l.online.as_ref()).expect("kept after a step");
        let sale = hold.sale.as_ref().and_then(|id| online.state().sales.get(id));
        let (total_cents, currency) = sale.map_or((0, String::new()), |s| (s.total_cents, s.currency.clone()));
        Ok(OrderOutcome { hold, created, total_cents, currency, offset })
    }

    /// A tablet's till ran short and its uplink asks the online channel for units (the sync
    /// protocol's `RightsWanted`): the channel gives what the market's rebalancing policy says,
    /// never units in buyers' holds, and the transfer goes back in the reply. A market without an
    /// online channel answers with nothing given.
    pub(super) async fn online_give(&self, slot: &mut MarketSlot, to: DeviceId, sku: String, qty: u64, for_sale: bool) -> Result<CloudReply, SyncError> {
        // The SKU's limits, before it is looked up in the store (the message bounds only its size).
        let as_transfer = stallmesh_ledger::EventBody::Transferred { sku: sku.clone(), qty: 1, to };
        stallmesh_ledger::validate::check_event_body(&as_transfer)
            .map_err(|e| ShopError::Invalid { field: "sku", problem: e.problem })?;
        let plan = {
            let sku = sku.clone();
            move |_: &Ledger| Ok(Reads { hold: None, view: Some((sku, String::new(), String::new())) })
        };
        let step = move |online: &mut Ledger, read: Read, now: u64| -> Step<Option<SignedChange>> {
            let policy = stallmesh_sync::rebalance::RebalancePolicy::default();
            let given = stallmesh_shop::give_rights(online, &policy, read.view.held_units, &sku, qty, to, for_sale, now)?.map(|e| e.change);
            Ok((given.clone(), given.into_iter().collect(), Vec::new()))
        };
        let given = match self.with_online(slot, plan, step).await {
            Ok((given, _)) => given,
            Err(SyncError::Shop(ShopError::NoOnlineChannel)) => None,
            Err(e) => return Err(e),
        };
        if given.is_some() {
            self.metrics.online_rights_given.inc();
        }
        if slot.loaded.is_none() {
            self.refresh(slot).await?;
        }
        let loaded = slot.loaded.as_ref().expect("refreshed");
        Ok(Self::reply(loaded, given.into_iter().collect(), false))
    }

    /// A drop as the online channel sees it, for a shop's product page.
    pub async fn online_drop(&self, market: &MarketId, drop: &str) -> Result<OnlineDropView, SyncError> {
        let slot = self.slot(market).await?;
        let mut slot = slot.lock().await;
        let drop = drop.to_string();
        let plan = {
            let drop = drop.clone();
            move |online: &Ledger| {
                let sku = online.state().drops.get(&drop).map(|d| d.sku.clone()).ok_or_else(|| ShopError::UnknownDrop(drop.clone()))?;
                Ok(Reads { hold: None, view: Some((sku, drop, String::new())) })
            }
        };
        let step = move |online: &mut Ledger, read: Read, now: u64| -> Step<OnlineDropView> {
            let state = online.state();
            let record = state.drops.get(&drop).cloned().ok_or(ShopError::UnknownDrop(drop))?;
            let me = online.device();
            let held_online = state.rights_of(&record.sku, &me);
            let view = OnlineDropView {
                online_device: me,
                held_online,
                in_holds: read.view.held_units.min(held_online),
                held_elsewhere: state.stock(&record.sku).total.saturating_sub(held_online),
                sold_online: state.drop_progress(&record).sold.get(&me).copied().unwrap_or(0),
                next_expiry_ms: read.view.next_expiry_ms,
                now_ms: now,
                drop: record,
            };
            Ok((view, Vec::new(), Vec::new()))
        };
        Ok(self.with_online(&mut slot, plan, step).await?.0)
    }
}
