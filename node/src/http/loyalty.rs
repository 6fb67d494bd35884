//! Loyalty at the till: issue a card (QR), look one up, redeem points on a sale (in `sales.rs`,
//! through [`prepare_sale_loyalty`]), mint and redeem vouchers, and the exposures every replica
//! derives alike.
//!
//! A redemption spends what this device holds first. Short of it, a reachable holder is asked to
//! hand its points or voucher over the mesh (milliseconds on a LAN) and the till waits up to
//! `loyalty.ask_wait_ms`; only when no reachable device holds any does the offline budget cover
//! the rest — so while devices are connected each point and voucher is spent once.

use super::{run_blocking, ApiError, ApiResult, AppState};
use crate::runtime::NodeError;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use stallmesh_api::loyalty::{
    CardIssued, CardTokenView, CardView, ChallengeView, ExposureList, ExposureView, IssueCardRequest, MintVouchersRequest, PointsShortfall,
    RedemptionView, VoucherList, VoucherView,
};
use stallmesh_api::SaleLoyaltyRequest;
use stallmesh_identity::{CardId, DeviceId, Dot, SignatureBytes, VoucherId};
use stallmesh_ledger::loyalty::{Exposure, LoyaltyState, VoucherRecord};
use stallmesh_ledger::{LedgerError, LocalOp, LoyaltyAsset, LoyaltyOnSale};
use stallmesh_loyalty::{Card, CardError, EarningRule, OfflineBudget};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a challenge shown to a phone wallet stays answerable.
pub const CHALLENGE_TTL_MS: u64 = 120_000;
/// Challenges open at once: a till shows one per customer; bounded so a script cannot fill memory.
/// Past it, the oldest expired ones go; if none has expired the request is refused (503).
pub const MAX_OPEN_CHALLENGES: usize = 4_096;
/// Vouchers minted by one request (a limited edition for a drop).
pub const MAX_VOUCHERS_PER_MINT: u32 = 1_000;
/// Sales listed on a card.
pub const CARD_SALES_LISTED: usize = 50;
/// Vouchers one listing shows (a drop of a thousand fits).
pub const MAX_VOUCHERS_LISTED: usize = 5_000;
/// Exposures one listing shows; the totals beside it cover all.
pub const MAX_EXPOSURES_LISTED: usize = 1_000;
/// Most days a card may be issued for (ten years).
pub const MAX_CARD_DAYS: u32 = 3_660;

/// The till's loyalty settings and the challenges it has shown.
pub struct LoyaltyDesk {
    pub rule: EarningRule,
    pub budget: OfflineBudget,
    pub ask_wait_ms: u64,
    challenges: Mutex<HashMap<[u8; 16], u64>>,
}

impl LoyaltyDesk {
    pub fn new(settings: &crate::config::LoyaltySettings) -> Self {
        Self { rule: settings.earning_rule(), budget: settings.offline_budget(), ask_wait_ms: settings.ask_wait_ms, challenges: Mutex::default() }
    }

    fn open_challenge(&self, now_ms: u64) -> Result<[u8; 16], ApiError> {
        let mut open = self.challenges.lock().expect("challenges lock");
        if open.len() >= MAX_OPEN_CHALLENGES {
            open.retain(|_, expires| *expires > now_ms);
        }
        if open.len() >= MAX_OPEN_CHALLENGES {
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "too_many_challenges", format!("{MAX_OPEN_CHALLENGES} challenges are open")));
        }
        let mut c = [0u8; 16];
        getrandom::getrandom(&mut c).map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_randomness", e.to_string()))?;
        open.insert(c, now_ms + CHALLENGE_TTL_MS);
        Ok(c)
    }

    /// Uses up a challenge this till showed: each answers one redemption. Returns its expiry.
    fn take_challenge(&self, c: &[u8; 16], now_ms: u64) -> Option<u64> {
        self.challenges.lock().expect("challenges lock").remove(c).filter(|expires| *expires > now_ms)
    }

    /// Gives a challenge back when the sale it answered was refused (the customer may try again).
    pub(super) fn reopen_challenge(&self, c: [u8; 16], expires_ms: u64) {
        self.challenges.lock().expect("challenges lock").insert(c, expires_ms);
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn card_error(app: &AppState, e: CardError) -> ApiError {
    app.node.metrics.loyalty_cards_refused.get_or_create(&crate::metrics::Reason { reason: e.label().into() }).inc();
    let status = match e {
        CardError::Malformed(_) => StatusCode::UNPROCESSABLE_ENTITY,
        _ => StatusCode::FORBIDDEN,
    };
    ApiError::new(status, e.label(), e.to_string())
}

fn invalid(field: &str, problem: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_input", format!("{field}: {problem}"))
}

fn hex_bytes<const N: usize>(field: &str, text: &str) -> Result<[u8; N], ApiError> {
    let mut out = [0u8; N];
    hex::decode_to_slice(text.trim(), &mut out).map_err(|e| invalid(field, format!("{N} bytes as {} hex characters: {e}", 2 * N)))?;
    Ok(out)
}

/// `POST /api/v1/loyalty/cards`.
#[utoipa::path(post, path = "/api/v1/loyalty/cards", tag = "loyalty", request_body = stallmesh_api::loyalty::IssueCardRequest, responses((status = 201, description = "A signed card, its QR code and its first points", body = stallmesh_api::loyalty::CardIssued)))]
pub(super) async fn issue_card(State(app): State<AppState>, body: Result<Json<IssueCardRequest>, JsonRejection>) -> ApiResult<(StatusCode, Json<CardIssued>)> {
    let Json(req) = body?;
    let holder = match &req.holder_public_key {
        Some(h) => {
            let key = hex_bytes::<32>("holder_public_key", h)?;
            ed25519_dalek::VerifyingKey::from_bytes(&key).map_err(|_| invalid("holder_public_key", "not an ed25519 public key"))?;
            Some(key)
        }
        None => None,
    };
    let days = req.expires_in_days;
    if days.is_some_and(|d| d == 0 || d > MAX_CARD_DAYS) {
        return Err(invalid("expires_in_days", format!("1..={MAX_CARD_DAYS}")));
    }
    let id = CardId::random().map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_randomness", e.to_string()))?;
    let now = now_ms();
    let expires_at_ms = days.map(|d| now + u64::from(d) * 86_400_000);
    let card = app.node.read(|l| l.issue_card(id, now, expires_at_ms, holder)).map_err(|e| ApiError::from(NodeError::Ledger(e)))?;
    let qr_text = card.to_text();
    let qr_svg = qr_svg(&qr_text)?;
    tracing::info!(card = %id, phone_wallet = holder.is_some(), "loyalty card issued");
    Ok((
        StatusCode::CREATED,
        Json(CardIssued {
            id: id.to_hex(),
            qr_text,
            qr_svg,
            issuer: app.node.read(|l| l.device()).to_hex(),
            issued_at_ms: card.issued_at_ms(),
            expires_at_ms: card.expires_at_ms(),
            phone_wallet: holder.is_some(),
        }),
    ))
}

/// The card's QR code as SVG (alphanumeric mode, error correction M: readable from a scuffed print).
fn qr_svg(text: &str) -> ApiResult<String> {
    let code = qrcode::QrCode::with_error_correction_level(text, qrcode::EcLevel::M)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("QR code: {e}")))?;
    Ok(code.render::<qrcode::render::svg::Color>().min_dimensions(240, 240).build())
}

/// `GET /api/v1/loyalty/challenge`.
#[utoipa::path(get, path = "/api/v1/loyalty/challenge", tag = "loyalty", responses((status = 200, description = "A fresh challenge for a phone wallet to sign", body = stallmesh_api::loyalty::ChallengeView)))]
pub(super) async fn challenge(State(app): State<AppState>) -> ApiResult<Json<ChallengeView>> {
    let c = app.loyalty.open_challenge(now_ms())?;
    Ok(Json(ChallengeView { challenge: hex::encode(c), expires_in_ms: CHALLENGE_TTL_MS }))
}

/// `GET /api/v1/loyalty/cards/{card}`: by id (16 hex characters) or by its QR text (verified).
#[utoipa::path(get, path = "/api/v1/loyalty/cards/{card}", tag = "loyalty", params(("card" = String, Path, description = "The card as its QR code reads, or its id")), responses((status = 200, description = "The card’s points, where they are held", body = stallmesh_api::loyalty::CardView), (status = 403, description = "the card is refused: `bad_signature`, `wrong_market`, `revoked`, …", body = stallmesh_api::ErrorBody)))]
pub(super) async fn show_card(State(app): State<AppState>, card: Result<Path<String>, PathRejection>) -> ApiResult<Json<CardView>> {
    let Path(text) = card.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_path", e.body_text()))?;
    let (id, token) = if text.trim().starts_with(stallmesh_loyalty::CARD_TEXT_PREFIX) {
        let card = Card::from_text(&text).map_err(|e| card_error(&app, e))?;
        let issuer = app.node.read(|l| l.verify_card(&card, now_ms())).map_err(|e| card_error(&app, e))?;
        let token = CardTokenView {
            issuer: issuer.to_hex(),
            issued_at_ms: card.issued_at_ms(),
            expires_at_ms: card.expires_at_ms(),
            phone_wallet: card.holder.is_some(),
        };
        (card.id, Some(token))
    } else {
        (CardId(hex_bytes("card", &text)?), None)
    };
    let reachable = reachable(&app);
    let budget = app.loyalty.budget;
    Ok(Json(app.node.read(|l| {
        let state = l.state();
        let me = l.device();
        let asset = LoyaltyAsset::Points(id);
        let c = state.loyalty.cards.get(&id).cloned().unwrap_or_default();
        let held = state.loyalty.holders(&asset);
        let held_reachable = held.iter().filter(|(d, _)| **d == me || reachable.contains(d)).map(|(_, n)| *n).fold(0u64, u64::saturating_add);
        let exposure = state.loyalty.exposures().into_iter().find(|e| e.asset == asset).map(|e| exposure_view(&e, &state.loyalty));
        CardView {
            id: id.to_hex(),
            balance_points: c.balance(),
            points_earned: c.points_earned,
            points_redeemed: c.points_redeemed,
            points_unproven: c.points_unproven,
            held_here: held.get(&me).copied().unwrap_or(0),
            held: held.iter().map(|(d, n)| (d.to_hex(), *n)).collect(),
            held_reachable,
            offline_budget_left: budget.points_left(state.loyalty.unproven_spent(&me, Some(&id))),
            sales: c.sales.iter().rev().take(CARD_SALES_LISTED).map(|d| stallmesh_ledger::sale_id(*d)).collect(),
            exposure,
            token,
        }
    })))
}

/// Devices with a live mesh session now (none without a mesh).
fn reachable(app: &AppState) -> std::collections::BTreeSet<DeviceId> {
    app.mesh.as_ref().map(|m| m.reachable_devices()).unwrap_or_default()
}

/// A sale's loyalty, ready for the ledger, and the phone wallet's challenge it used up (given back
/// if the sale is then refused).
pub(super) struct PreparedLoyalty {
    pub on_sale: LoyaltyOnSale,
    pub challenge: Option<([u8; 16], u64)>,
}

/// What a sale's loyalty becomes once its card is verified and, for a redemption, the points
/// were fetched from a reachable holder if any: the ledger's request, with the offline budget
/// only where no reachable device holds the card's points, some tablet is out of reach, and the
/// points asked for are known to exist on the tablets out of reach (no budget for points nobody
/// has seen: a fresh card cannot be spent on credit).
pub(super) async fn prepare_sale_loyalty(app: &AppState, req: &SaleLoyaltyRequest, lines: &[stallmesh_ledger::LineRequest]) -> ApiResult<PreparedLoyalty> {
    let card = Card::from_text(&req.card).map_err(|e| card_error(app, e))?;
    app.node.read(|l| l.verify_card(&card, now_ms())).map_err(|e| card_error(app, e))?;
    if req.redeem_points > stallmesh_loyalty::MAX_POINTS_PER_SALE {
        return Err(invalid("loyalty.redeem_points", format!("at most {} in one sale", stallmesh_loyalty::MAX_POINTS_PER_SALE)));
    }
    // Points by the market's rule, from the catalogue's stall and price of each line, on what the
    // customer pays: the part paid with points earns none.
    let rule = &app.loyalty.rule;
    let discount_cents = rule.discount_cents(req.redeem_points).ok_or_else(|| invalid("loyalty.redeem_points", "the discount does not fit"))?;
    let gross_cents = app.node.read(|l| {
        lines.iter().filter_map(|line| l.state().products.get(&line.sku).map(|p| u128::from(line.qty) * u128::from(p.product.price_cents))).sum::<u128>()
    });
    if u128::from(discount_cents) > gross_cents {
        return Err(invalid("loyalty.redeem_points", format!("{} points take {discount_cents} cents off a sale of {gross_cents}", req.redeem_points)));
    }
    let mut challenge = None;
    if req.redeem_points > 0 {
        let proof = match (&req.challenge, &req.holder_signature) {
            (Some(c), Some(s)) => Some((hex_bytes::<16>("loyalty.challenge", c)?, SignatureBytes(hex_bytes::<64>("loyalty.holder_signature", s)?))),
            (None, None) => None,
            _ => return Err(invalid("loyalty", "challenge and holder_signature go together")),
        };
        card.verify_holder(proof.as_ref().map(|(c, s)| (&c[..], s))).map_err(|e| card_error(app, e))?;
        // The signature is right; the challenge must also be one this till showed, unused.
        if let (Some(_), Some((c, _))) = (&card.holder, &proof) {
            let expires = app.loyalty.take_challenge(c, now_ms()).ok_or_else(|| {
                ApiError::new(StatusCode::FORBIDDEN, "holder_proof_invalid", "the challenge was not shown by this till, or expired, or was used")
            })?;
            challenge = Some((*c, expires));
        }
    }
    let points_earned = app.node.read(|l| {
        let products = &l.state().products;
        let lines: Vec<(String, u64)> = lines
            .iter()
            .filter_map(|line| {
                let p = products.get(&line.sku)?;
                Some((p.product.stall.clone(), line.qty.saturating_mul(p.product.price_cents)))
            })
            .collect();
        let gross = lines.iter().map(|(_, c)| u128::from(*c)).sum::<u128>();
        let paid = gross.saturating_sub(u128::from(discount_cents));
        let points = u128::from(rule.points_for(lines));
        // gross is 0 only for a sale of free items, which earns nothing anyway.
        u64::try_from((points * paid).checked_div(gross).unwrap_or(0)).unwrap_or(u64::MAX)
    });
    let asset = LoyaltyAsset::Points(card.id);
    let fetched = if req.redeem_points > 0 { fetch(app, asset, req.redeem_points).await } else { Fetched::Here };
    let known = || {
        app.node.read(|l| {
            let reachable = reachable(app);
            let me = l.device();
            l.state().loyalty.holders(&asset).iter().filter(|(d, _)| **d == me || !reachable.contains(d)).map(|(_, n)| *n).fold(0u64, u64::saturating_add)
        })
    };
    let budget_applies = fetched == Fetched::NoReachableHolder && known() >= req.redeem_points;
    Ok(PreparedLoyalty {
        on_sale: LoyaltyOnSale {
            card: card.id,
            points_earned,
            redeem_points: req.redeem_points,
            point_value_cents: app.loyalty.rule.point_value_cents,
            offline_budget: budget_applies.then_some(app.loyalty.budget),
        },
        challenge,
    })
}

#[derive(Debug, PartialEq, Eq)]
enum Fetched {
    /// This device holds enough.
    Here,
    /// No device this one reaches holds any, and some of the market's tablets are out of reach:
    /// what they hold (or earned since) cannot be proven here, so the offline budget may cover it.
    NoReachableHolder,
    /// Every tablet of the market is in reach: what this replica knows is the whole truth, and a
    /// shortfall is a refusal, not a budget matter.
    WholeMarketInView,
    /// A reachable holder did not hand it over in time: redeem with what is here, no budget.
    NotInTime,
}

/// Makes sure this device holds `qty` of `asset` if reachable devices can give it: asks the
/// peers over the mesh and waits (without holding any lock) until the transfers are applied or
/// the reachable holders have none left. What still lacks after that may come from the offline
/// budget only if some of the market's tablets are out of reach.
async fn fetch(app: &AppState, asset: LoyaltyAsset, qty: u64) -> Fetched {
    let node = &app.node;
    let mut arrived = node.rights_arrived();
    let reachable = reachable(app);
    // (held here, held on reachable devices, a tablet of the market is out of reach)
    let look = || {
        node.read(|l| {
            let me = l.device();
            let state = l.state();
            let holders = state.loyalty.holders(&asset);
            let on_reachable = holders.iter().filter(|(d, _)| reachable.contains(d)).map(|(_, n)| *n).fold(0u64, u64::saturating_add);
            // Tablets only: a cloud device never joins the mesh and holds no loyalty rights.
            let out_of_reach = state.devices.iter().any(|(d, r)| {
                *d != me && r.revoked_at_ms.is_none() && r.certificate.role != stallmesh_identity::Role::Cloud && !reachable.contains(d)
            });
            (holders.get(&me).copied().unwrap_or(0), on_reachable, out_of_reach)
        })
    };
    let (here, on_reachable, _) = look();
    if here >= qty {
        return Fetched::Here;
    }
    if on_reachable > 0 {
        if let Some(mesh) = &app.mesh {
            mesh.want_loyalty(asset, qty - here);
            let deadline = tokio::time::Instant::now() + Duration::from_millis(app.loyalty.ask_wait_ms);
            loop {
                let (here, on_reachable, _) = look();
                if here >= qty || on_reachable == 0 {
                    break;
                }
                match tokio::time::timeout_at(deadline, arrived.changed()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) | Err(_) => break,
                }
            }
        }
    }
    match look() {
        (here, _, _) if here >= qty => Fetched::Here,
        (_, on_reachable, _) if on_reachable > 0 => Fetched::NotInTime,
        (_, _, true) => Fetched::NoReachableHolder,
        (_, _, false) => Fetched::WholeMarketInView,
    }
}

/// Adds where a card's points are, and who of them is reachable, to an `insufficient_points` answer.
pub(super) fn points_shortfall(app: &AppState, e: LedgerError) -> ApiError {
    let LedgerError::InsufficientPoints { card, requested, held_here, held_elsewhere, budget_left, .. } = &e else {
        return ApiError::from(NodeError::Ledger(e));
    };
    let reachable = reachable(app);
    let details = PointsShortfall {
        card: card.to_hex(),
        requested: *requested,
        held_here: *held_here,
        held_elsewhere: held_elsewhere.iter().map(|(d, n)| (d.to_hex(), *n)).collect(),
        reachable_holders: held_elsewhere.keys().filter(|d| reachable.contains(d)).map(|d| d.to_hex()).collect(),
        offline_budget_left: *budget_left,
    };
    app.node.metrics.loyalty_redemptions.get_or_create(&crate::metrics::Outcome { outcome: "refused" }).inc();
    let mut err = ApiError::from(NodeError::Ledger(e));
    err.body.points = Some(Box::new(details));
    err
}

/// `POST /api/v1/loyalty/vouchers`.
#[utoipa::path(post, path = "/api/v1/loyalty/vouchers", tag = "loyalty", request_body = stallmesh_api::loyalty::MintVouchersRequest, responses((status = 201, description = "Vouchers minted, durable", body = stallmesh_api::loyalty::VoucherList)))]
pub(super) async fn mint_vouchers(State(app): State<AppState>, body: Result<Json<MintVouchersRequest>, JsonRejection>) -> ApiResult<(StatusCode, Json<VoucherList>)> {
    let Json(req) = body?;
    let count = req.count.unwrap_or(1);
    if count == 0 || count > MAX_VOUCHERS_PER_MINT {
        return Err(invalid("count", format!("1..={MAX_VOUCHERS_PER_MINT}")));
    }
    // Checked before the first is minted, so a batch never stops half way on its longest label.
    let longest = if count == 1 { req.label.len() } else { format!("{} #{count} of {count}", req.label).len() };
    if req.label.trim().is_empty() || longest > stallmesh_ledger::MAX_VOUCHER_LABEL_LEN {
        return Err(invalid("label", format!("1..={} bytes with its \" #k of N\"", stallmesh_ledger::MAX_VOUCHER_LABEL_LEN)));
    }
    let mut minted = Vec::with_capacity(count as usize);
    for k in 1..=count {
        let label = if count == 1 { req.label.clone() } else { format!("{} #{k} of {count}", req.label) };
        let voucher = VoucherId::random().map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_randomness", e.to_string()))?;
        let op = LocalOp::MintVoucher { voucher, label, value_cents: req.value_cents };
        run_blocking(&app.node, move |n| n.record_loyalty(op)).await?;
        minted.push(voucher);
    }
    let vouchers = app.node.read(|l| minted.iter().filter_map(|v| l.state().loyalty.vouchers.get(v).map(|r| voucher_view(v, r, &l.state().loyalty.holders(&LoyaltyAsset::Voucher(*v))))).collect());
    Ok((StatusCode::CREATED, Json(VoucherList { vouchers })))
}

/// `GET /api/v1/loyalty/vouchers`: at most `MAX_VOUCHERS_LISTED`, in id order.
#[utoipa::path(get, path = "/api/v1/loyalty/vouchers", tag = "loyalty", responses((status = 200, description = "Every voucher this node holds", body = stallmesh_api::loyalty::VoucherList)))]
pub(super) async fn list_vouchers(State(app): State<AppState>) -> Json<VoucherList> {
    Json(app.node.read(|l| {
        let loyalty = &l.state().loyalty;
        let vouchers =
            loyalty.vouchers.iter().take(MAX_VOUCHERS_LISTED).map(|(id, v)| voucher_view(id, v, &loyalty.holders(&LoyaltyAsset::Voucher(*id)))).collect();
        VoucherList { vouchers }
    }))
}

/// `POST /api/v1/loyalty/vouchers/{voucher}/redeem`.
#[utoipa::path(post, path = "/api/v1/loyalty/vouchers/{voucher}/redeem", tag = "loyalty", params(("voucher" = String, Path, description = "The voucher id")), responses((status = 201, description = "Redeemed, durable", body = stallmesh_api::loyalty::VoucherView), (status = 404, description = "`unknown_voucher`", body = stallmesh_api::ErrorBody), (status = 409, description = "`already_redeemed`; `voucher_held_elsewhere`", body = stallmesh_api::ErrorBody)))]
pub(super) async fn redeem_voucher(State(app): State<AppState>, voucher: Result<Path<String>, PathRejection>) -> ApiResult<(StatusCode, Json<VoucherView>)> {
    let Path(text) = voucher.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_path", e.body_text()))?;
    let voucher = VoucherId(hex_bytes("voucher", &text)?);
    let fetched = fetch(&app, LoyaltyAsset::Voucher(voucher), 1).await;
    let offline_budget = (fetched == Fetched::NoReachableHolder).then_some(app.loyalty.budget);
    let op = LocalOp::RedeemVoucher { voucher, offline_budget };
    let recorded = run_blocking(&app.node, move |n| n.record_loyalty(op)).await;
    let recorded = match recorded {
        Ok(r) => r,
        Err(e) => {
            app.node.metrics.loyalty_redemptions.get_or_create(&crate::metrics::Outcome { outcome: "refused" }).inc();
            return Err(e.into());
        }
    };
    let proven = matches!(recorded.entry.event.body, stallmesh_ledger::EventBody::VoucherRedeemed { proven: true, .. });
    let outcome = if proven { "voucher_proven" } else { "voucher_unproven" };
    app.node.metrics.loyalty_redemptions.get_or_create(&crate::metrics::Outcome { outcome }).inc();
    tracing::info!(%voucher, proven, "voucher redeemed");
    let view = app.node.read(|l| {
        let loyalty = &l.state().loyalty;
        let record = loyalty.vouchers.get(&voucher).cloned().unwrap_or_default();
        voucher_view(&voucher, &record, &loyalty.holders(&LoyaltyAsset::Voucher(voucher)))
    });
    Ok((StatusCode::CREATED, Json(view)))
}

/// `GET /api/v1/loyalty/exposures`.
#[utoipa::path(get, path = "/api/v1/loyalty/exposures", tag = "loyalty", responses((status = 200, description = "Points redeemed offline beyond what their holders proved", body = stallmesh_api::loyalty::ExposureList)))]
pub(super) async fn exposures(State(app): State<AppState>) -> Json<ExposureList> {
    Json(app.node.read(|l| exposure_list(&l.state().loyalty)))
}

pub(super) fn exposure_list(loyalty: &LoyaltyState) -> ExposureList {
    let all = loyalty.exposures();
    let sum = |points: bool| all.iter().filter(|e| matches!(e.asset, LoyaltyAsset::Points(_)) == points).map(|e| e.units).fold(0u64, u64::saturating_add);
    // The sums cover every exposure; the list stops at MAX_EXPOSURES_LISTED.
    ExposureList {
        points_exposed: sum(true),
        vouchers_exposed: sum(false),
        exposures: all.iter().take(MAX_EXPOSURES_LISTED).map(|e| exposure_view(e, loyalty)).collect(),
    }
}

fn redemption(dot: &Dot, proven: bool) -> RedemptionView {
    RedemptionView { device: dot.device.to_hex(), seq: dot.seq, proven }
}

fn exposure_view(e: &Exposure, loyalty: &LoyaltyState) -> ExposureView {
    let (asset, id) = match e.asset {
        LoyaltyAsset::Points(c) => ("points", c.to_hex()),
        LoyaltyAsset::Voucher(v) => ("voucher", v.to_hex()),
    };
    let proven_of = |dot: &Dot| match e.asset {
        LoyaltyAsset::Voucher(v) => loyalty.vouchers.get(&v).and_then(|r| r.redemptions.get(dot)).copied().unwrap_or(false),
        LoyaltyAsset::Points(c) => loyalty.cards.get(&c).is_some_and(|r| !r.unproven_redemptions.contains(dot)),
    };
    ExposureView {
        asset: asset.into(),
        id,
        units: e.units,
        redemptions: e.redemptions as u64,
        evidence: e.evidence.iter().map(|d| redemption(d, proven_of(d))).collect(),
    }
}

fn voucher_view(id: &VoucherId, v: &VoucherRecord, holders: &BTreeMap<DeviceId, u64>) -> VoucherView {
    let status = match v.redemptions.len() {
        0 => "open",
        1 => "redeemed",
        _ => "exposed",
    };
    VoucherView {
        id: id.to_hex(),
        label: v.label.clone(),
        value_cents: v.value_cents,
        minted_by: v.minted.iter().map(|d| d.device.to_hex()).collect(),
        held_by: holders.keys().map(|d| d.to_hex()).collect(),
        status: status.into(),
        redemptions: v.redemptions.iter().map(|(d, p)| redemption(d, *p)).collect(),
    }
}

/// The desk every handler reaches through [`AppState`].
pub type Desk = Arc<LoyaltyDesk>;
