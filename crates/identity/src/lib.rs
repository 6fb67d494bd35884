//! Who may write to a market, and proof that they did.
//!
//! A market is an ed25519 key held by its organiser. A device has its own key; its enrolment
//! certificate is the market key's signature over (market, device public key, stall, role, expiry).
//! A revocation is the market key's signature over (market, device, time). Every change a device makes
//! travels as a [`SignedChange`]: the device signs the market id, its own id, the change's position in
//! its journal, the changes it causally depends on, and the change bytes.
//!
//! Everything here is pure computation; reading and writing key files lives in [`files`].

pub mod files;

use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// Domain separation: a signature made for one purpose can never be replayed as another.
const CERT_DOMAIN: &[u8] = b"stallmesh/enrolment/v1\0";
const REVOCATION_DOMAIN: &[u8] = b"stallmesh/revocation/v1\0";
const CHANGE_DOMAIN: &[u8] = b"stallmesh/change/v1\0";
const MESH_PSK_DOMAIN: &[u8] = b"stallmesh/mesh-psk/v1\0";
const CLOUD_REQUEST_DOMAIN: &[u8] = b"stallmesh/cloud-request/v1\0";
const LOYALTY_CARD_DOMAIN: &[u8] = b"stallmesh/loyalty-card/v1\0";
const CARD_HOLDER_DOMAIN: &[u8] = b"stallmesh/card-holder/v1\0";

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum IdentityError {
    #[error("signature does not verify")]
    BadSignature,
    #[error("not a valid ed25519 public key")]
    BadPublicKey,
    #[error("certificate is for market {found}, expected {expected}")]
    WrongMarket { expected: MarketId, found: MarketId },
    #[error("certificate expired at {expires_at_ms} ms (time checked: {at_ms} ms)")]
    Expired { expires_at_ms: u64, at_ms: u64 },
    #[error("no secure random source: {0}")]
    Random(String),
}

/// Fixed-size byte identifiers: hex in human-readable formats (JSON, TOML), raw bytes in binary ones.
macro_rules! byte_id {
    ($(#[$m:meta])* $name:ident, $len:expr) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
            pub fn from_hex(text: &str) -> Result<Self, hex::FromHexError> {
                let mut out = [0u8; $len];
                hex::decode_to_slice(text.trim(), &mut out)?;
                Ok(Self(out))
            }
            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // Short form keeps logs readable; ids are unique well before 8 bytes for a market.
                write!(f, "{}({})", stringify!($name), &self.to_hex()[..16.min(2 * $len)])
            }
        }
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                if s.is_human_readable() {
                    s.serialize_str(&self.to_hex())
                } else {
                    // Bytes, not a sequence of u8: the same postcard encoding (length, then the
                    // bytes), read without a per-byte visit or an allocation.
                    s.serialize_bytes(&self.0)
                }
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                use serde::de::Error;
                if d.is_human_readable() {
                    let text = String::deserialize(d)?;
                    Self::from_hex(&text).map_err(D::Error::custom)
                } else {
                    struct BytesVisitor;
                    impl<'de> serde::de::Visitor<'de> for BytesVisitor {
                        type Value = [u8; $len];
                        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                            write!(f, "{} bytes", $len)
                        }
                        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
                            v.try_into().map_err(|_| E::custom(concat!(stringify!($name), ": wrong length")))
                        }
                        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                            let mut arr = [0u8; $len];
                            for (i, b) in arr.iter_mut().enumerate() {
                                *b = seq.next_element()?.ok_or_else(|| A::Error::invalid_length(i, &self))?;
                            }
                            if seq.next_element::<u8>()?.is_some() {
                                return Err(A::Error::custom(concat!(stringify!($name), ": wrong length")));
                            }
                            Ok(arr)
                        }
                    }
                    Ok(Self(d.deserialize_bytes(BytesVisitor)?))
                }
            }
        }
    };
}

byte_id!(
    /// A market: the first 16 bytes of SHA-256 over the market's public key.
    MarketId,
    16
);
byte_id!(
    /// A device: its ed25519 public key. Also the automerge actor id of its journal.
    DeviceId,
    32
);
byte_id!(
    /// An ed25519 signature.
    SignatureBytes,
    64
);
byte_id!(
    /// A loyalty card: 8 random bytes chosen by the issuing device (a collision needs ~4 billion
    /// cards in one market).
    CardId,
    8
);
byte_id!(
    /// A single-use voucher: 8 random bytes chosen by the minting device.
    VoucherId,
    8
);

impl CardId {
    pub fn random() -> Result<Self, IdentityError> {
        random_bytes().map(Self)
    }
}

impl VoucherId {
    pub fn random() -> Result<Self, IdentityError> {
        random_bytes().map(Self)
    }
}

fn random_bytes<const N: usize>() -> Result<[u8; N], IdentityError> {
    let mut out = [0u8; N];
    getrandom::getrandom(&mut out).map_err(|e| IdentityError::Random(e.to_string()))?;
    Ok(out)
}
byte_id!(
    /// SHA-256 of a whole signed change ([`SignedChange::digest`]).
    ChangeDigest,
    32
);
byte_id!(
    /// An ed25519 public key of a market.
    MarketPublicKey,
    32
);

impl DeviceId {
    pub fn verifying_key(&self) -> Result<VerifyingKey, IdentityError> {
        VerifyingKey::from_bytes(&self.0).map_err(|_| IdentityError::BadPublicKey)
    }
    /// Eight hex characters: enough to tell the devices of one market apart on a screen.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl MarketPublicKey {
    pub fn market_id(&self) -> MarketId {
        let digest = Sha256::digest(self.0);
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        MarketId(id)
    }
    pub fn verifying_key(&self) -> Result<VerifyingKey, IdentityError> {
        VerifyingKey::from_bytes(&self.0).map_err(|_| IdentityError::BadPublicKey)
    }
}

fn random_signing_key() -> Result<SigningKey, IdentityError> {
    let mut secret = [0u8; 32];
    getrandom::getrandom(&mut secret).map_err(|e| IdentityError::Random(e.to_string()))?;
    Ok(SigningKey::from_bytes(&secret))
}

fn verify(key: &VerifyingKey, message: &[u8], sig: &SignatureBytes) -> Result<(), IdentityError> {
    let sig = ed25519_dalek::Signature::from_bytes(&sig.0);
    key.verify(message, &sig).map_err(|_| IdentityError::BadSignature)
}

/// The organiser's key. Its secret never leaves the organiser's machine.
pub struct MarketKey(SigningKey);

impl MarketKey {
    pub fn generate() -> Result<Self, IdentityError> {
        random_signing_key().map(Self)
    }
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&secret))
    }
    pub fn secret(&self) -> [u8; 32] {
        self.0.to_bytes()
    }
    pub fn public(&self) -> MarketPublicKey {
        MarketPublicKey(self.0.verifying_key().to_bytes())
    }
    pub fn market_id(&self) -> MarketId {
        self.public().market_id()
    }

    /// The market's network pre-shared key, derived from its secret: only devices the organiser
    /// enrolled receive it, so no one else can even complete a transport handshake.
    pub fn mesh_psk(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(MESH_PSK_DOMAIN);
        h.update(self.0.to_bytes());
        h.finalize().into()
    }

    pub fn enrol(&self, device: DeviceId, stall: &str, role: Role, expires_at_ms: u64) -> Certificate {
        let mut cert = Certificate {
            market: self.market_id(),
            device,
            stall: stall.to_string(),
            role,
            expires_at_ms,
            signature: SignatureBytes([0; 64]),
        };
        cert.signature = SignatureBytes(self.0.sign(&cert.signed_bytes()).to_bytes());
        cert
    }

    pub fn revoke(&self, device: DeviceId, revoked_at_ms: u64) -> Revocation {
        let mut rev = Revocation { market: self.market_id(), device, revoked_at_ms, signature: SignatureBytes([0; 64]) };
        rev.signature = SignatureBytes(self.0.sign(&rev.signed_bytes()).to_bytes());
        rev
    }
}

impl fmt::Debug for MarketKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret, even in debug output.
        write!(f, "MarketKey(public={})", self.public())
    }
}

/// A device's own key.
pub struct DeviceKey(SigningKey);

impl DeviceKey {
    pub fn generate() -> Result<Self, IdentityError> {
        random_signing_key().map(Self)
    }
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&secret))
    }
    pub fn secret(&self) -> [u8; 32] {
        self.0.to_bytes()
    }
    pub fn device_id(&self) -> DeviceId {
        DeviceId(self.0.verifying_key().to_bytes())
    }

    /// Signs one journal entry. `causal` lists changes of other devices this one depends on.
    pub fn sign_change(&self, market: MarketId, seq: u64, causal: Vec<Dot>, change: Vec<u8>) -> SignedChange {
        let mut signed =
            SignedChange { market, device: self.device_id(), seq, causal, change: change.into(), signature: SignatureBytes([0; 64]) };
        signed.signature = SignatureBytes(self.0.sign(&signed.signed_bytes()).to_bytes());
        signed
    }
}

/// What a device signs to authenticate one request to the cloud: the market, the request's path,
/// the device's clock and the SHA-256 of the body. A replay within the cloud's clock window can only
/// repeat an upload of signed changes, which the cloud de-duplicates anyway.
fn cloud_request_bytes(market: MarketId, path: &str, time_ms: u64, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(CLOUD_REQUEST_DOMAIN.len() + 16 + 8 + path.len() + 8 + 32);
    m.extend_from_slice(CLOUD_REQUEST_DOMAIN);
    m.extend_from_slice(&market.0);
    m.extend_from_slice(&(path.len() as u64).to_le_bytes());
    m.extend_from_slice(path.as_bytes());
    m.extend_from_slice(&time_ms.to_le_bytes());
    m.extend_from_slice(&Sha256::digest(body));
    m
}

impl DeviceKey {
    /// Signs a request to the cloud (see [`verify_cloud_request`]).
    pub fn sign_cloud_request(&self, market: MarketId, path: &str, time_ms: u64, body: &[u8]) -> SignatureBytes {
        SignatureBytes(self.0.sign(&cloud_request_bytes(market, path, time_ms, body)).to_bytes())
    }
}

/// Checks that `device` signed this request to the cloud.
pub fn verify_cloud_request(
    device: &DeviceId,
    market: MarketId,
    path: &str,
    time_ms: u64,
    body: &[u8],
    signature: &SignatureBytes,
) -> Result<(), IdentityError> {
    verify(&device.verifying_key()?, &cloud_request_bytes(market, path, time_ms, body), signature)
}

impl DeviceKey {
    /// Signs a loyalty card's fields (`stallmesh-loyalty` lays them out; the domain is added here).
    pub fn sign_loyalty_card(&self, fields: &[u8]) -> SignatureBytes {
        SignatureBytes(self.0.sign(&[LOYALTY_CARD_DOMAIN, fields].concat()).to_bytes())
    }
}

/// Checks that `device` signed a loyalty card's fields.
pub fn verify_loyalty_card(device: &DeviceId, fields: &[u8], signature: &SignatureBytes) -> Result<(), IdentityError> {
    verify(&device.verifying_key()?, &[LOYALTY_CARD_DOMAIN, fields].concat(), signature)
}

/// A customer's phone wallet key: proves possession of a card by signing the challenge a tablet shows.
pub struct CardHolderKey(SigningKey);

impl CardHolderKey {
    pub fn generate() -> Result<Self, IdentityError> {
        random_signing_key().map(Self)
    }
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Self(SigningKey::from_bytes(&secret))
    }
    pub fn public(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }
    /// Answers a tablet's challenge for `card`.
    pub fn sign_challenge(&self, card: &CardId, challenge: &[u8]) -> SignatureBytes {
        SignatureBytes(self.0.sign(&card_holder_bytes(card, challenge)).to_bytes())
    }
}

fn card_holder_bytes(card: &CardId, challenge: &[u8]) -> Vec<u8> {
    [CARD_HOLDER_DOMAIN, &card.0, &(challenge.len() as u64).to_le_bytes(), challenge].concat()
}

/// Checks a phone wallet's answer to a challenge for `card`, against the holder key in the card.
pub fn verify_card_holder(holder: &[u8; 32], card: &CardId, challenge: &[u8], signature: &SignatureBytes) -> Result<(), IdentityError> {
    let key = VerifyingKey::from_bytes(holder).map_err(|_| IdentityError::BadPublicKey)?;
    verify(&key, &card_holder_bytes(card, challenge), signature)
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceKey(device={})", self.device_id())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Sells, restocks and transfers stock rights.
    Seller,
    /// May also edit the catalogue of any stall.
    Organiser,
    /// The market's cloud ingest: records only what the cloud holds (its watermark), never sells.
    Cloud,
    /// An online sales channel (a web shop, a live stream) run by the cloud: sells and moves stock
    /// rights like a tablet, never edits the catalogue. Appended last: earlier certificates keep
    /// their encoding.
    Online,
}

impl Role {
    /// The role's name, as the CLI, the API and the cloud's log write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Seller => "seller",
            Role::Organiser => "organiser",
            Role::Cloud => "cloud",
            Role::Online => "online",
        }
    }
}

/// The market's statement that a device belongs to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    pub market: MarketId,
    pub device: DeviceId,
    pub stall: String,
    pub role: Role,
    pub expires_at_ms: u64,
    pub signature: SignatureBytes,
}

impl Certificate {
    fn signed_bytes(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(128);
        m.extend_from_slice(CERT_DOMAIN);
        m.extend_from_slice(&self.market.0);
        m.extend_from_slice(&self.device.0);
        m.extend_from_slice(&(self.stall.len() as u64).to_le_bytes());
        m.extend_from_slice(self.stall.as_bytes());
        m.push(match self.role {
            Role::Seller => 1,
            Role::Organiser => 2,
            Role::Cloud => 3,
            Role::Online => 4,
        });
        m.extend_from_slice(&self.expires_at_ms.to_le_bytes());
        m
    }

    /// Checks the market's signature, the market id and, at `at_ms`, the expiry.
    pub fn verify(&self, market: &MarketPublicKey, at_ms: u64) -> Result<(), IdentityError> {
        let expected = market.market_id();
        if self.market != expected {
            return Err(IdentityError::WrongMarket { expected, found: self.market });
        }
        verify(&market.verifying_key()?, &self.signed_bytes(), &self.signature)?;
        if at_ms > self.expires_at_ms {
            return Err(IdentityError::Expired { expires_at_ms: self.expires_at_ms, at_ms });
        }
        Ok(())
    }
}

/// The market's statement that a device no longer belongs to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub market: MarketId,
    pub device: DeviceId,
    pub revoked_at_ms: u64,
    pub signature: SignatureBytes,
}

impl Revocation {
    fn signed_bytes(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(96);
        m.extend_from_slice(REVOCATION_DOMAIN);
        m.extend_from_slice(&self.market.0);
        m.extend_from_slice(&self.device.0);
        m.extend_from_slice(&self.revoked_at_ms.to_le_bytes());
        m
    }

    pub fn verify(&self, market: &MarketPublicKey) -> Result<(), IdentityError> {
        let expected = market.market_id();
        if self.market != expected {
            return Err(IdentityError::WrongMarket { expected, found: self.market });
        }
        verify(&market.verifying_key()?, &self.signed_bytes(), &self.signature)
    }
}

/// One position in one device's journal: (device, seq).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dot {
    pub device: DeviceId,
    pub seq: u64,
}

/// One journal entry as it travels and is stored: an automerge change plus its author's signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedChange {
    pub market: MarketId,
    pub device: DeviceId,
    /// Position in the device's journal, from 0 (the device's enrolment) upwards, without gaps.
    pub seq: u64,
    /// Changes of other devices that must be applied before this one (transfers of stock rights this
    /// change may spend).
    pub causal: Vec<Dot>,
    /// automerge change bytes; the change's actor must be `device`. Shared, not copied, on clone.
    pub change: bytes::Bytes,
    pub signature: SignatureBytes,
}

impl SignedChange {
    fn signed_bytes(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(CHANGE_DOMAIN.len() + 72 + self.causal.len() * 40 + self.change.len());
        m.extend_from_slice(CHANGE_DOMAIN);
        m.extend_from_slice(&self.market.0);
        m.extend_from_slice(&self.device.0);
        m.extend_from_slice(&self.seq.to_le_bytes());
        m.extend_from_slice(&(self.causal.len() as u64).to_le_bytes());
        for dot in &self.causal {
            m.extend_from_slice(&dot.device.0);
            m.extend_from_slice(&dot.seq.to_le_bytes());
        }
        m.extend_from_slice(&(self.change.len() as u64).to_le_bytes());
        m.extend_from_slice(&self.change);
        m
    }

    /// Checks the author's signature over every field.
    pub fn verify_signature(&self) -> Result<(), IdentityError> {
        verify(&self.device.verifying_key()?, &self.signed_bytes(), &self.signature)
    }

    pub fn dot(&self) -> Dot {
        Dot { device: self.device, seq: self.seq }
    }

    /// SHA-256 over every field, signature included: two copies are the same change if and only if
    /// their digests are equal, so a replay is told apart from an altered or a second, different
    /// change signed for the same journal position.
    pub fn digest(&self) -> ChangeDigest {
        let mut h = Sha256::new();
        h.update(CHANGE_DOMAIN);
        h.update(self.market.0);
        h.update(self.device.0);
        h.update(self.seq.to_le_bytes());
        h.update((self.causal.len() as u64).to_le_bytes());
        for dot in &self.causal {
            h.update(dot.device.0);
            h.update(dot.seq.to_le_bytes());
        }
        h.update((self.change.len() as u64).to_le_bytes());
        h.update(&self.change);
        h.update(self.signature.0);
        ChangeDigest(h.finalize().into())
    }

    /// Bytes this entry takes on the wire and on disk (excluding framing).
    pub fn encoded_len(&self) -> usize {
        16 + 32 + 8 + self.causal.len() * 40 + self.change.len() + 64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_travel_as_a_length_and_their_bytes_and_a_wrong_length_is_refused() {
        let id = DeviceId([7; 32]);
        let wire = postcard::to_allocvec(&id).unwrap();
        assert_eq!(wire, [&[32u8][..], &[7; 32][..]].concat(), "the wire format peers already speak");
        assert_eq!(postcard::from_bytes::<DeviceId>(&wire).unwrap(), id);
        let short = [&[31u8][..], &[7; 31][..]].concat();
        assert!(postcard::from_bytes::<DeviceId>(&short).is_err());
        assert!(postcard::from_bytes::<DeviceId>(&wire[..20]).is_err(), "truncated");
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<DeviceId>(&json).unwrap(), id, "hex when human-readable");
    }

    #[test]
    fn a_cloud_request_signature_covers_market_path_time_and_body() {
        let market = MarketKey::generate().unwrap().market_id();
        let device = DeviceKey::generate().unwrap();
        let id = device.device_id();
        let sig = device.sign_cloud_request(market, "/v1/markets/m/sync", 5, b"body");
        assert_eq!(verify_cloud_request(&id, market, "/v1/markets/m/sync", 5, b"body", &sig), Ok(()));
        let bad = Err(IdentityError::BadSignature);
        assert_eq!(verify_cloud_request(&id, MarketId([9; 16]), "/v1/markets/m/sync", 5, b"body", &sig), bad);
        assert_eq!(verify_cloud_request(&id, market, "/v1/markets/m/events", 5, b"body", &sig), bad);
        assert_eq!(verify_cloud_request(&id, market, "/v1/markets/m/sync", 6, b"body", &sig), bad);
        assert_eq!(verify_cloud_request(&id, market, "/v1/markets/m/sync", 5, b"bodY", &sig), bad);
        let other = DeviceKey::generate().unwrap().device_id();
        assert_eq!(verify_cloud_request(&other, market, "/v1/markets/m/sync", 5, b"body", &sig), bad);
    }

    #[test]
    fn certificate_verifies_only_for_its_market_and_before_expiry() {
        let market = MarketKey::generate().unwrap();
        let other = MarketKey::generate().unwrap();
        let device = DeviceKey::generate().unwrap();
        let cert = market.enrol(device.device_id(), "Honey Stall", Role::Seller, 1_000);
        assert_eq!(cert.verify(&market.public(), 999), Ok(()));
        assert!(matches!(cert.verify(&market.public(), 1_001), Err(IdentityError::Expired { .. })));
        assert!(matches!(cert.verify(&other.public(), 0), Err(IdentityError::WrongMarket { .. })));

        let mut forged = cert.clone();
        forged.stall = "Cheese Stall".into();
        assert_eq!(forged.verify(&market.public(), 0), Err(IdentityError::BadSignature));
    }

    #[test]
    fn signed_change_detects_any_tampered_field() {
        let market = MarketKey::generate().unwrap();
        let device = DeviceKey::generate().unwrap();
        let signed = device.sign_change(market.market_id(), 3, vec![], vec![1, 2, 3]);
        assert_eq!(signed.verify_signature(), Ok(()));
        let mut t = signed.clone();
        t.seq = 4;
        assert_eq!(t.verify_signature(), Err(IdentityError::BadSignature));
        let mut t = signed.clone();
        let mut bytes = t.change.to_vec();
        bytes[0] = 9;
        t.change = bytes.into();
        assert_eq!(t.verify_signature(), Err(IdentityError::BadSignature));
        let mut t = signed.clone();
        t.causal.push(Dot { device: device.device_id(), seq: 1 });
        assert_eq!(t.verify_signature(), Err(IdentityError::BadSignature));
    }

    #[test]
    fn ids_round_trip_as_hex_in_json_and_bytes_in_postcard() {
        let device = DeviceKey::generate().unwrap().device_id();
        let json = serde_json::to_string(&device).unwrap();
        assert_eq!(json, format!("\"{}\"", device.to_hex()));
        assert_eq!(serde_json::from_str::<DeviceId>(&json).unwrap(), device);
        assert!(serde_json::from_str::<DeviceId>("\"abcd\"").is_err());
    }
}
