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

/// Checkout requests of one market decided and committed in one transaction (group commit): one
/// lock, one read, one commit for up to this many buyers. Bounded so one transaction stays small
/// and the last request in a batch waits for at most this many decisions.
pub const MAX_CHECKOUT_BATCH: usize = 64;
/// Checkout requests waiting for a market's next batch: past it a buyer is told to retry (503
/// `checkout_busy`) rather than queueing without end.
pub const MAX_CHECKOUT_QUEUE: usize = 4_096;
const _: () = assert!(MAX_CHECKOUT_BATCH <= MAX_CHECKOUT_QUEUE);

/// A step's outcome: its value and the online device's new changes to log; the holds it placed or
/// paid are in the book.
type Step<T> = Result<(T, Vec<SignedChange>), SyncError>;

/// One buyer's checkout request, waiting for its market's next batch.
enum Checkout {
    Hold { req: HoldRequest, ttl_ms: u64 },
    Pay { drop: String, hold: String },
}

enum CheckoutDone {
    Hold(HoldOutcome),
    Pay(OrderOutcome),
}

struct Queued {
    checkout: Checkout,
    answer: tokio::sync::oneshot::Sender<Result<CheckoutDone, SyncError>>,
}

/// Each market's checkout requests waiting for the lock.
#[derive(Default)]
pub(super) struct CheckoutQueues(Mutex<BTreeMap<MarketId, Arc<Mutex<std::collections::VecDeque<Queued>>>>>);

impl Markets {
    /// Sets up the market's online channel (its device of role `online`, checked by the caller)
    /// and logs its enrolment, so every tablet learns of it through the next upload.
    pub async fn set_online(&self, market: &MarketId, online: OnlineRegistration) -> Result<(Registered, DeviceId), SyncError> {
        let outcome = self.store.set_online(market, &online, now_ms()).await?;
        let slot = self.slot(market).await?;
        let mut slot = slot.lock().await;
        // Read back from the store: it names the device to run.
        slot.online = None;
        self.with_online(&mut slot, |_| Ok(HoldsWanted::default()), |_, _, _| Ok(((), Vec::new()))).await?;
        let device = slot.online.as_ref().map(|o| o.certificate.device).ok_or(ShopError::NoOnlineChannel)?;
        Ok((outcome, device))
    }

    /// Runs `step` on the online channel's ledger under the market's store lock: catches up with
    /// the log, logs the online device's enrolment if it has none yet, reads the holds `plan`
    /// names (from the caught-up ledger), runs `step` (synchronous: every decision is
    /// `stallmesh-shop`'s) and commits its changes and the holds it put in the book in the same
    /// transaction.
    async fn with_online<T>(
        &self,
        slot: &mut MarketSlot,
        plan: impl FnOnce(&Ledger) -> Result<HoldsWanted, SyncError>,
        step: impl FnOnce(&mut Ledger, &mut HoldBook, u64) -> Step<T>,
    ) -> Result<(T, u64), SyncError> {
        let market = slot.registration.market;
        if slot.online.is_none() {
            slot.online = self.store.online(&market).await?;
            if slot.online.is_none() {
                return Err(ShopError::NoOnlineChannel.into());
            }
            slot.loaded = None; // rebuilt with the online channel's ledger
        }
        // Caught up before the lock is taken (measured: catching up under the lock instead makes a
        // lone order twice as slow and a burst a third slower), and again under it by `lock`.
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
        plan: impl FnOnce(&Ledger) -> Result<HoldsWanted, SyncError>,
        step: impl FnOnce(&mut Ledger, &mut HoldBook, u64) -> Step<T>,
    ) -> Result<(T, u64), SyncError> {
        let mut tx = self.lock(market, loaded).await?;
        let now = now_ms();
        let online = loaded.online.as_mut().ok_or(ShopError::NoOnlineChannel)?;
        let mut changes = Vec::new();
        if let Some(enrolment) = online.enrol_self(now).map_err(ShopError::Ledger)? {
            changes.push(enrolment.change);
        }
        let mut book = HoldBook::default();
        let decided = match plan(online) {
            Ok(wanted) => {
                book = HoldBook::read(tx.holds_for(&wanted, now).await?, now);
                step(online, &mut book, now)
            }
            Err(e) => Err(e),
        };
        let value = match decided {
            Ok((value, more)) => {
                changes.extend(more);
                Ok(value)
            }
            // A refusal changes nothing, but an enrolment signed just now must still be logged:
            // the online ledger holds it, and a later change of the device builds on it.
            Err(e) => {
                book = HoldBook::default();
                Err(e)
            }
        };
        let holds = book.changed();
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
        match self.checkout(market, Checkout::Hold { req, ttl_ms }).await? {
            CheckoutDone::Hold(h) => Ok(h),
            CheckoutDone::Pay(_) => unreachable!("a hold request is answered with a hold"),
        }
    }

    /// Pays a held hold: the online device's signed sale, logged with the hold in one commit.
    pub async fn pay_hold(&self, market: &MarketId, drop: &str, hold_id: &str) -> Result<OrderOutcome, SyncError> {
        // A hold id is what `hold_id` writes (32 hex characters): anything else names no hold,
        // and never reaches the store.
        if hold_id.len() != 32 || !hold_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ShopError::UnknownHold(hold_id.chars().take(64).collect()).into());
        }
        match self.checkout(market, Checkout::Pay { drop: drop.to_string(), hold: hold_id.to_string() }).await? {
            CheckoutDone::Pay(o) => Ok(o),
            CheckoutDone::Hold(_) => unreachable!("a payment is answered with an order"),
        }
    }

    /// Queues a checkout request for its market and waits for its answer. Whoever takes the
    /// market's lock decides every request waiting (up to [`MAX_CHECKOUT_BATCH`]) in one
    /// transaction and answers each before letting the lock go; a request still queued then
    /// takes the lock for the next batch.
    async fn checkout(&self, market: &MarketId, checkout: Checkout) -> Result<CheckoutDone, SyncError> {
        let slot = self.slot(market).await?;
        let queue = self.checkout_queues.0.lock().expect("checkout queues").entry(*market).or_default().clone();
        let (answer, mut answered) = tokio::sync::oneshot::channel::<Result<CheckoutDone, SyncError>>();
        {
            let mut q = queue.lock().expect("checkout queue");
            if q.len() >= MAX_CHECKOUT_QUEUE {
                self.metrics.checkout_busy.inc();
                return Err(SyncError::CheckoutBusy);
            }
            q.push_back(Queued { checkout, answer });
        }
        loop {
            // Answered by a batch another request ran: done, without queueing for the lock (so
            // the next lock holder finds every request that arrived meanwhile, and batches grow
            // with the crowd instead of each answered request running a batch of one).
            let mut slot = tokio::select! {
                biased;
                done = &mut answered => {
                    // The batch it was in was abandoned midway (the request running it went
                    // away, dropping its future): it may or may not have committed, and a retry
                    // with the same idempotency key finds whichever (the same hold, the same sale).
                    return done.unwrap_or(Err(SyncError::CheckoutBusy));
                }
                slot = slot.lock() => slot,
            };
            let batch: Vec<Queued> = {
                let mut q = queue.lock().expect("checkout queue");
                let n = q.len().min(MAX_CHECKOUT_BATCH);
                q.drain(..n).collect()
            };
            if !batch.is_empty() {
                self.run_checkout(&mut slot, batch).await;
            }
        }
    }

    /// Decides a batch of checkout requests in arrival order, each seeing the holds the ones
    /// before it placed or paid, commits them together and answers each.
    async fn run_checkout(&self, slot: &mut MarketSlot, batch: Vec<Queued>) {
        let market = slot.registration.market;
        let (checkouts, answers): (Vec<Checkout>, Vec<_>) = batch.into_iter().map(|q| (q.checkout, q.answer)).unzip();
        self.metrics.checkout_batches.inc();
        self.metrics.checkout_requests.inc_by(checkouts.len() as u64);
        let plan = |online: &Ledger| {
            let mut wanted = HoldsWanted::default();
            for c in &checkouts {
                match c {
                    Checkout::Hold { req, .. } => {
                        wanted.ids.insert(stallmesh_shop::hold_id(&market, &req.buyer, &req.idempotency_key));
                        if let Some(d) = online.state().drops.get(&req.drop) {
                            wanted.skus.insert(d.sku.clone());
                            wanted.buyers.insert((req.drop.clone(), req.buyer.clone()));
                        }
                    }
                    Checkout::Pay { hold, .. } => {
                        wanted.ids.insert(hold.clone());
                    }
                }
            }
            Ok(wanted)
        };
        let step = |online: &mut Ledger, book: &mut HoldBook, now: u64| -> Step<Vec<Result<CheckoutDone, ShopError>>> {
            let mut changes = Vec::new();
            let decided = checkouts.iter().map(|c| Self::decide(online, book, &market, c, now, &mut changes)).collect();
            Ok((decided, changes))
        };
        match self.with_online(slot, plan, step).await {
            Ok((decided, offset)) => {
                for ((result, answer), checkout) in decided.into_iter().zip(answers).zip(&checkouts) {
                    // Sold out online while the stalls hold units: the tablets are asked.
                    if let (Err(ShopError::SoldOut { held_elsewhere, .. }), Checkout::Hold { req, .. }) = (&result, checkout) {
                        if *held_elsewhere > 0 {
                            self.ask_tablets(slot, &req.drop, req.qty);
                        }
                    }
                    let _ = answer.send(result.map_err(SyncError::from).map(|d| match d {
                        CheckoutDone::Pay(o) => CheckoutDone::Pay(OrderOutcome { offset, ..o }),
                        hold => hold,
                    }));
                }
            }
            Err(e) => {
                // Nothing of the batch committed: each request hears why (the first the error
                // itself, the others what it said) and may retry with its idempotency key.
                let why = e.to_string();
                let mut answers = answers.into_iter();
                if let Some(first) = answers.next() {
                    let _ = first.send(Err(e));
                }
                for a in answers {
                    let _ = a.send(Err(StoreError::Unavailable(format!("the checkout batch failed: {why}")).into()));
                }
            }
        }
    }

    /// One request of a batch, decided on the online ledger and the batch's book.
    fn decide(
        online: &mut Ledger,
        book: &mut HoldBook,
        market: &MarketId,
        checkout: &Checkout,
        now: u64,
        changes: &mut Vec<SignedChange>,
    ) -> Result<CheckoutDone, ShopError> {
        match checkout {
            Checkout::Hold { req, ttl_ms } => {
                let sku = online.state().drops.get(&req.drop).map(|d| d.sku.clone()).ok_or_else(|| ShopError::UnknownDrop(req.drop.clone()))?;
                let id = stallmesh_shop::hold_id(market, &req.buyer, &req.idempotency_key);
                let view = book.view(&sku, &req.drop, &req.buyer);
                let existing = book.get(&id).cloned();
                match stallmesh_shop::place_hold(online, market, existing.as_ref(), &view, req, *ttl_ms, now)? {
                    Placed::New(h) => {
                        book.put(h.clone());
                        Ok(CheckoutDone::Hold(HoldOutcome { hold: h, created: true, now_ms: now }))
                    }
                    Placed::Again(h) => Ok(CheckoutDone::Hold(HoldOutcome { hold: h, created: false, now_ms: now })),
                }
            }
            Checkout::Pay { drop, hold } => {
                let found = book.get(hold).filter(|h| h.drop == *drop).cloned().ok_or_else(|| ShopError::UnknownHold(hold.clone()))?;
                let (paid, created) = match stallmesh_shop::pay(online, &found, now)? {
                    Paid::New { hold, entry } => {
                        changes.push(entry.change);
                        book.put(hold.clone());
                        (hold, true)
                    }
                    Paid::Again(paid) => {
                        // Paid through another process whose hold row this one had not read: write it.
                        if found.sale.is_none() {
                            book.put(paid.clone());
                        }
                        (paid, false)
                    }
                };
                let sale = paid.sale.as_ref().and_then(|id| online.state().sales.get(id));
                let (total_cents, currency) = sale.map_or((0, String::new()), |s| (s.total_cents, s.currency.clone()));
                Ok(CheckoutDone::Pay(OrderOutcome { hold: paid, created, total_cents, currency, offset: 0 }))
            }
        }
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
            move |_: &Ledger| Ok(HoldsWanted { skus: [sku].into(), ..Default::default() })
        };
        let step = move |online: &mut Ledger, book: &mut HoldBook, now: u64| -> Step<Option<SignedChange>> {
            let policy = stallmesh_sync::rebalance::RebalancePolicy::default();
            let held = book.view(&sku, "", "").held_units;
            let given = stallmesh_shop::give_rights(online, &policy, held, &sku, qty, to, for_sale, now)?.map(|e| e.change);
            Ok((given.clone(), given.into_iter().collect()))
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
                Ok(HoldsWanted { skus: [sku].into(), ..Default::default() })
            }
        };
        let step = move |online: &mut Ledger, book: &mut HoldBook, now: u64| -> Step<OnlineDropView> {
            let state = online.state();
            let record = state.drops.get(&drop).cloned().ok_or(ShopError::UnknownDrop(drop))?;
            let view = book.view(&record.sku, "", "");
            let me = online.device();
            let held_online = state.rights_of(&record.sku, &me);
            let drop_view = OnlineDropView {
                online_device: me,
                held_online,
                in_holds: view.held_units.min(held_online),
                held_elsewhere: state.stock(&record.sku).total.saturating_sub(held_online),
                sold_online: state.drop_progress(&record).sold.get(&me).copied().unwrap_or(0),
                next_expiry_ms: view.next_expiry_ms,
                now_ms: now,
                drop: record,
            };
            Ok((drop_view, Vec::new()))
        };
        Ok(self.with_online(&mut slot, plan, step).await?.0)
    }
}
