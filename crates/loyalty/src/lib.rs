//! Loyalty cards and the rules of earning and spending points, as pure computation.
//!
//! A **card** is a token any enrolled device can issue: card id, issuing device, times, and
//! optionally the customer's public key (a phone wallet; without one the card is a bearer card).
//! The issuing device signs it, so any tablet verifies it offline through the issuer's enrolment
//! (which the market key signed) without asking anyone. It is small enough for a QR code in
//! alphanumeric mode: [`Card::to_text`] is at most [`MAX_CARD_TEXT_LEN`] characters.
//!
//! Points and vouchers themselves are not in the token: they are journal events (`stallmesh-ledger`),
//! held as rights by devices like stock, and [`OfflineBudget`] says what a device may spend beyond
//! what it can prove is its own.

use stallmesh_identity::{CardId, DeviceId, MarketId, SignatureBytes};
use std::collections::BTreeMap;

/// What every card's text starts with: tells a card from any other QR code at a glance, and the
/// token version.
pub const CARD_TEXT_PREFIX: &str = "SMC1:";
/// Longest card text: a QR code of version 10 at level M holds 311 alphanumeric characters, so a
/// card stays scannable from a phone screen in the sun with room to spare.
pub const MAX_CARD_TEXT_LEN: usize = 250;
/// Bytes of a card token: version, market, card, issuer prefix, two times, flags, signature.
const CARD_BYTES: usize = 1 + 8 + 8 + 8 + 4 + 4 + 1 + 64;
/// A card with the holder's public key.
const CARD_BYTES_WITH_HOLDER: usize = CARD_BYTES + 32;
const TOKEN_VERSION: u8 = 1;
const FLAG_HOLDER: u8 = 1;
// base45 writes 2 bytes as 3 characters: the largest card fits the QR budget.
const _: () = assert!(CARD_TEXT_PREFIX.len() + CARD_BYTES_WITH_HOLDER.div_ceil(2) * 3 <= MAX_CARD_TEXT_LEN);

/// Why a card is refused. Nothing was changed by looking at it.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum CardError {
    #[error("not a stallmesh loyalty card: {0}")]
    Malformed(String),
    #[error("this card belongs to another market")]
    OtherMarket,
    #[error("the card's issuing device is not enrolled in this market (or its enrolment has not reached this tablet yet)")]
    UnknownIssuer,
    #[error("the card's signature does not verify: forged or altered")]
    Forged,
    #[error("the card expired at {expires_at_ms} ms")]
    Expired { expires_at_ms: u64 },
    #[error("the card was issued by a device the market revoked before it issued the card")]
    RevokedIssuer,
    #[error("this card belongs to a phone wallet: the customer must answer the tablet's challenge")]
    HolderProofMissing,
    #[error("the phone wallet's answer to the challenge does not verify")]
    HolderProofInvalid,
}

impl CardError {
    /// A stable label, for metrics and API error codes.
    pub fn label(&self) -> &'static str {
        match self {
            CardError::Malformed(_) => "malformed_token",
            CardError::OtherMarket => "other_market",
            CardError::UnknownIssuer => "unknown_issuer",
            CardError::Forged => "forged_token",
            CardError::Expired { .. } => "expired_token",
            CardError::RevokedIssuer => "revoked_issuer",
            CardError::HolderProofMissing => "holder_proof_missing",
            CardError::HolderProofInvalid => "holder_proof_invalid",
        }
    }
}

/// A loyalty card token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Card {
    /// The first 8 bytes of the market id: "another market" is told without a signature check.
    pub market_prefix: [u8; 8],
    pub id: CardId,
    /// The first 8 bytes of the issuing device's id, resolved against the market's devices.
    pub issuer_prefix: [u8; 8],
    /// Issuer's clock, whole seconds since the epoch (a card needs no finer time).
    pub issued_at_s: u32,
    /// 0: the card does not expire.
    pub expires_at_s: u32,
    /// The customer's ed25519 public key, for a phone wallet.
    pub holder: Option<[u8; 32]>,
    pub signature: SignatureBytes,
}

fn prefix<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

impl Card {
    /// Issues a card signed by `issuer`. Times are clamped into the token's seconds range.
    pub fn issue(
        issuer: &stallmesh_identity::DeviceKey,
        market: MarketId,
        id: CardId,
        issued_at_ms: u64,
        expires_at_ms: Option<u64>,
        holder: Option<[u8; 32]>,
    ) -> Card {
        let seconds = |ms: u64| u32::try_from(ms / 1000).unwrap_or(u32::MAX);
        let device = issuer.device_id();
        let mut card = Card {
            market_prefix: prefix(&market.0),
            id,
            issuer_prefix: prefix(&device.0),
            issued_at_s: seconds(issued_at_ms),
            expires_at_s: expires_at_ms.map_or(0, |ms| seconds(ms).max(1)),
            holder,
            signature: SignatureBytes([0; 64]),
        };
        card.signature = issuer.sign_loyalty_card(&card.signed_fields(&market, &device));
        card
    }

    /// What the issuer signs: the full market and issuer ids, not just the prefixes the token carries.
    fn signed_fields(&self, market: &MarketId, issuer: &DeviceId) -> Vec<u8> {
        let mut m = Vec::with_capacity(1 + 16 + 8 + 32 + 4 + 4 + 1 + 32);
        m.push(TOKEN_VERSION);
        m.extend_from_slice(&market.0);
        m.extend_from_slice(&self.id.0);
        m.extend_from_slice(&issuer.0);
        m.extend_from_slice(&self.issued_at_s.to_be_bytes());
        m.extend_from_slice(&self.expires_at_s.to_be_bytes());
        m.push(if self.holder.is_some() { FLAG_HOLDER } else { 0 });
        if let Some(h) = &self.holder {
            m.extend_from_slice(h);
        }
        m
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(CARD_BYTES_WITH_HOLDER);
        b.push(TOKEN_VERSION);
        b.extend_from_slice(&self.market_prefix);
        b.extend_from_slice(&self.id.0);
        b.extend_from_slice(&self.issuer_prefix);
        b.extend_from_slice(&self.issued_at_s.to_be_bytes());
        b.extend_from_slice(&self.expires_at_s.to_be_bytes());
        b.push(if self.holder.is_some() { FLAG_HOLDER } else { 0 });
        if let Some(h) = &self.holder {
            b.extend_from_slice(h);
        }
        b.extend_from_slice(&self.signature.0);
        debug_assert!(b.len() == CARD_BYTES || b.len() == CARD_BYTES_WITH_HOLDER);
        b
    }

    pub fn from_bytes(b: &[u8]) -> Result<Card, CardError> {
        let malformed = |why: &str| CardError::Malformed(why.to_string());
        let Some(&version) = b.first() else { return Err(malformed("empty")) };
        if version != TOKEN_VERSION {
            return Err(malformed(&format!("token version {version}, expected {TOKEN_VERSION}")));
        }
        let flags = *b.get(CARD_BYTES - 65).ok_or_else(|| malformed("too short"))?;
        let has_holder = match flags {
            0 => false,
            FLAG_HOLDER => true,
            _ => return Err(malformed("unknown flags")),
        };
        let expected = if has_holder { CARD_BYTES_WITH_HOLDER } else { CARD_BYTES };
        if b.len() != expected {
            return Err(malformed(&format!("{} bytes, expected {expected}", b.len())));
        }
        let holder = has_holder.then(|| prefix::<32>(&b[34..66]));
        let sig_at = expected - 64;
        Ok(Card {
            market_prefix: prefix(&b[1..9]),
            id: CardId(prefix(&b[9..17])),
            issuer_prefix: prefix(&b[17..25]),
            issued_at_s: u32::from_be_bytes(prefix(&b[25..29])),
            expires_at_s: u32::from_be_bytes(prefix(&b[29..33])),
            holder,
            signature: SignatureBytes(prefix(&b[sig_at..])),
        })
    }

    /// The QR text: [`CARD_TEXT_PREFIX`] and base45 (QR alphanumeric mode, the densest for text).
    pub fn to_text(&self) -> String {
        let text = format!("{CARD_TEXT_PREFIX}{}", base45::encode(self.to_bytes()));
        debug_assert!(text.len() <= MAX_CARD_TEXT_LEN);
        text
    }

    /// Reads a card's QR text (surrounding whitespace ignored, as scanners add it).
    pub fn from_text(text: &str) -> Result<Card, CardError> {
        let text = text.trim();
        if text.len() > MAX_CARD_TEXT_LEN {
            return Err(CardError::Malformed(format!("{} characters, at most {MAX_CARD_TEXT_LEN}", text.len())));
        }
        let body = text.strip_prefix(CARD_TEXT_PREFIX).ok_or_else(|| CardError::Malformed(format!("does not start with {CARD_TEXT_PREFIX}")))?;
        let bytes = base45::decode(body).map_err(|e| CardError::Malformed(format!("base45: {e:?}")))?;
        Card::from_bytes(&bytes)
    }

    pub fn issued_at_ms(&self) -> u64 {
        u64::from(self.issued_at_s) * 1000
    }

    pub fn expires_at_ms(&self) -> Option<u64> {
        (self.expires_at_s != 0).then(|| u64::from(self.expires_at_s) * 1000)
    }

    /// Checks the card against this market and the device its prefix resolved to. `issuer_revoked_at_ms`:
    /// when the market revoked that device, if it did. A card issued before a revocation stays valid (a
    /// retired tablet's customers keep their cards); one issued at or after it is refused. Backdating
    /// with a stolen key gains nothing: a card is worth only the points enrolled devices record for it.
    pub fn verify(&self, market: &MarketId, issuer: &DeviceId, issuer_revoked_at_ms: Option<u64>, now_ms: u64) -> Result<(), CardError> {
        if self.market_prefix != prefix::<8>(&market.0) {
            return Err(CardError::OtherMarket);
        }
        if self.issuer_prefix != prefix::<8>(&issuer.0) {
            return Err(CardError::UnknownIssuer);
        }
        stallmesh_identity::verify_loyalty_card(issuer, &self.signed_fields(market, issuer), &self.signature)
            .map_err(|_| CardError::Forged)?;
        if let Some(expires_at_ms) = self.expires_at_ms() {
            if now_ms >= expires_at_ms {
                return Err(CardError::Expired { expires_at_ms });
            }
        }
        if issuer_revoked_at_ms.is_some_and(|revoked| self.issued_at_ms() >= revoked) {
            return Err(CardError::RevokedIssuer);
        }
        Ok(())
    }

    /// Checks a phone wallet's answer to `challenge`; a bearer card needs none.
    pub fn verify_holder(&self, proof: Option<(&[u8], &SignatureBytes)>) -> Result<(), CardError> {
        match (&self.holder, proof) {
            (None, _) => Ok(()),
            (Some(_), None) => Err(CardError::HolderProofMissing),
            (Some(h), Some((challenge, sig))) => {
                stallmesh_identity::verify_card_holder(h, &self.id, challenge, sig).map_err(|_| CardError::HolderProofInvalid)
            }
        }
    }
}

/// Most points one sale may earn or redeem: a typo guard far above any market basket (a
/// €10,000 basket at 10 points per euro is 100,000).
pub const MAX_POINTS_PER_SALE: u64 = 10_000_000;
/// Highest stall multiplier: "double points at the honey stall", not a way around the cap.
pub const MAX_STALL_MULTIPLIER: u64 = 10;

/// How a sale earns points and what a point is worth: the market's configuration, applied by the
/// selling device, which records the result (replicas check only the limits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EarningRule {
    /// Cents of a sale per point: 100 is one point per euro. At least 1.
    pub cents_per_point: u64,
    /// Stall → multiplier of the points its lines earn (1 where absent).
    pub stall_multipliers: BTreeMap<String, u64>,
    /// Discount in cents one redeemed point gives.
    pub point_value_cents: u64,
}

impl Default for EarningRule {
    fn default() -> Self {
        EarningRule { cents_per_point: 100, stall_multipliers: BTreeMap::new(), point_value_cents: 1 }
    }
}

impl EarningRule {
    /// Points for a sale whose lines are (stall, line total in cents). Rounded down per sale;
    /// capped at [`MAX_POINTS_PER_SALE`].
    pub fn points_for(&self, lines: impl IntoIterator<Item = (String, u64)>) -> u64 {
        let cents_per_point = u128::from(self.cents_per_point.max(1));
        let weighted: u128 = lines
            .into_iter()
            .map(|(stall, cents)| {
                let m = self.stall_multipliers.get(&stall).copied().unwrap_or(1).min(MAX_STALL_MULTIPLIER);
                u128::from(cents) * u128::from(m)
            })
            .sum();
        u64::try_from(weighted / cents_per_point).unwrap_or(u64::MAX).min(MAX_POINTS_PER_SALE)
    }

    /// The discount `points` give, or `None` past u64 (refused by the caller).
    pub fn discount_cents(&self, points: u64) -> Option<u64> {
        points.checked_mul(self.point_value_cents)
    }
}

/// What a tablet may spend without proof that it is its to spend, counted in points and
/// redemptions (not per hour: device clocks drift). Whatever is spent this way and turns out to be
/// spent twice is the market's exposure, bounded by these numbers times the devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OfflineBudget {
    /// Points of one card this device may redeem without holding them.
    pub points_per_card: u64,
    /// Points of all cards together.
    pub points_per_device: u64,
    /// Vouchers this device may redeem without holding them.
    pub vouchers_per_device: u64,
}

impl Default for OfflineBudget {
    fn default() -> Self {
        OfflineBudget { points_per_card: 500, points_per_device: 5_000, vouchers_per_device: 10 }
    }
}

/// What one device has spent without proof so far (from its own journal, so it survives a restart).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnprovenSpent {
    pub points_of_card: u64,
    pub points: u64,
    pub vouchers: u64,
}

impl OfflineBudget {
    /// Points of a card still spendable without proof.
    pub fn points_left(&self, spent: UnprovenSpent) -> u64 {
        self.points_per_card.saturating_sub(spent.points_of_card).min(self.points_per_device.saturating_sub(spent.points))
    }

    pub fn vouchers_left(&self, spent: UnprovenSpent) -> u64 {
        self.vouchers_per_device.saturating_sub(spent.vouchers)
    }
}

#[cfg(test)]
mod tests;
