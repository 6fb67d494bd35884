//! What crosses the uplink: requests are the sync protocol's own messages
//! ([`stallmesh_sync::Message`]: `Heads` to learn what the cloud holds, `Changes` to upload), signed
//! by the uploading device in four headers; the cloud answers with a [`CloudReply`].

use crate::RejectedChange;
use serde::{Deserialize, Serialize};
use stallmesh_identity::{verify_cloud_request, Certificate, DeviceId, DeviceKey, IdentityError, MarketId, MarketPublicKey, SignatureBytes, SignedChange};
use stallmesh_sync::{MAX_CHANGES_PER_MESSAGE, MAX_HEADS_ENTRIES, MAX_MESSAGE_BYTES};

/// The uploading device, hex.
pub const HEADER_DEVICE: &str = "stallmesh-device";
/// Its enrolment certificate, hex of its postcard encoding: the cloud may not hold the device's
/// journal yet, and the certificate alone proves it belongs to the market.
pub const HEADER_CERTIFICATE: &str = "stallmesh-certificate";
/// The device's clock when it signed, ms since the epoch.
pub const HEADER_TIME_MS: &str = "stallmesh-time-ms";
/// The device's signature over market, path, time and body ([`DeviceKey::sign_cloud_request`]), hex.
pub const HEADER_SIGNATURE: &str = "stallmesh-signature";
pub const CONTENT_TYPE: &str = "application/x-stallmesh-sync";
/// How far a device's clock may be from the cloud's. Tablets left in a drawer drift and are set by
/// hand; a replay inside the window can only repeat an upload of signed changes (de-duplicated), so
/// the window is generous rather than tight.
pub const MAX_CLOCK_SKEW_MS: u64 = 60 * 60 * 1000;
/// Largest request or reply body: one sync message.
pub const MAX_BODY_BYTES: usize = MAX_MESSAGE_BYTES;
/// First byte of every reply. 2: `rights_wanted`.
pub const REPLY_VERSION: u8 = 2;
/// The reply before `rights_wanted`: still written when there is nothing to ask, so tablets of
/// the previous release keep reading the cloud's replies through an upgrade, and still read, so
/// an upgraded tablet keeps working with a cloud not upgraded yet.
pub const REPLY_VERSION_1: u8 = 1;
const _: () = assert!(REPLY_VERSION_1 < REPLY_VERSION);
/// SKUs one reply asks the tablets for (the online channel's sold-out SKUs): a drop or a few.
pub const MAX_RIGHTS_WANTED: usize = 16;

/// The path a market's uploads go to.
pub fn sync_path(market: &MarketId) -> String {
    format!("/v1/markets/{}/sync", market.to_hex())
}

/// The four authentication headers of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestAuth {
    pub device: DeviceId,
    pub certificate: Certificate,
    pub time_ms: u64,
    pub signature: SignatureBytes,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum AuthError {
    #[error("header {0} is missing")]
    Missing(&'static str),
    #[error("header {0} is malformed: {1}")]
    Malformed(&'static str, String),
    #[error("the certificate is for device {certificate}, the request names {header}")]
    DeviceMismatch { certificate: DeviceId, header: DeviceId },
    #[error("the device is not enrolled in this market: {0}")]
    NotEnrolled(IdentityError),
    #[error("the device's clock is {skew_ms} ms away from the cloud's (at most {MAX_CLOCK_SKEW_MS} ms): set the tablet's clock")]
    ClockSkew { skew_ms: u64 },
    #[error("the request's signature does not verify")]
    BadSignature,
}

impl AuthError {
    /// Stable label, for metrics and the error body's `error` field.
    pub fn label(&self) -> &'static str {
        match self {
            AuthError::Missing(_) | AuthError::Malformed(..) => "unauthenticated",
            AuthError::DeviceMismatch { .. } | AuthError::BadSignature => "bad_signature",
            AuthError::NotEnrolled(_) => "not_enrolled",
            AuthError::ClockSkew { .. } => "clock_skew",
        }
    }
}

impl RequestAuth {
    /// Signs a request of `body` to `path` as this device.
    pub fn sign(key: &DeviceKey, certificate: &Certificate, path: &str, time_ms: u64, body: &[u8]) -> Self {
        let signature = key.sign_cloud_request(certificate.market, path, time_ms, body);
        Self { device: key.device_id(), certificate: certificate.clone(), time_ms, signature }
    }

    /// The headers to send, as (name, value).
    pub fn headers(&self) -> [(&'static str, String); 4] {
        let cert = postcard::to_allocvec(&self.certificate).expect("certificates serialize");
        [
            (HEADER_DEVICE, self.device.to_hex()),
            (HEADER_CERTIFICATE, hex::encode(&cert)),
            (HEADER_TIME_MS, self.time_ms.to_string()),
            (HEADER_SIGNATURE, hex::encode(self.signature.0)),
        ]
    }

    /// Reads the headers back; `get` returns a header's value.
    pub fn from_headers<'a>(get: impl Fn(&'static str) -> Option<&'a str>) -> Result<Self, AuthError> {
        let read = |name: &'static str| get(name).ok_or(AuthError::Missing(name));
        let device = DeviceId::from_hex(read(HEADER_DEVICE)?).map_err(|e| AuthError::Malformed(HEADER_DEVICE, e.to_string()))?;
        let cert_bytes = hex::decode(read(HEADER_CERTIFICATE)?).map_err(|e| AuthError::Malformed(HEADER_CERTIFICATE, e.to_string()))?;
        let certificate: Certificate =
            postcard::from_bytes(&cert_bytes).map_err(|e| AuthError::Malformed(HEADER_CERTIFICATE, e.to_string()))?;
        let time_ms = read(HEADER_TIME_MS)?.parse::<u64>().map_err(|e| AuthError::Malformed(HEADER_TIME_MS, e.to_string()))?;
        let sig = hex::decode(read(HEADER_SIGNATURE)?).map_err(|e| AuthError::Malformed(HEADER_SIGNATURE, e.to_string()))?;
        let sig: [u8; 64] = sig.try_into().map_err(|_| AuthError::Malformed(HEADER_SIGNATURE, "not 64 bytes".into()))?;
        Ok(Self { device, certificate, time_ms, signature: SignatureBytes(sig) })
    }

    /// Checks the certificate against the market key, the clock window and the signature. Whether
    /// the device was revoked is the market's state: the caller checks it in its ledger.
    pub fn verify(&self, market_key: &MarketPublicKey, path: &str, body: &[u8], now_ms: u64) -> Result<(), AuthError> {
        if self.certificate.device != self.device {
            return Err(AuthError::DeviceMismatch { certificate: self.certificate.device, header: self.device });
        }
        self.certificate.verify(market_key, now_ms).map_err(AuthError::NotEnrolled)?;
        let skew_ms = self.time_ms.abs_diff(now_ms);
        if skew_ms > MAX_CLOCK_SKEW_MS {
            return Err(AuthError::ClockSkew { skew_ms });
        }
        verify_cloud_request(&self.device, market_key.market_id(), path, self.time_ms, body, &self.signature)
            .map_err(|_| AuthError::BadSignature)
    }
}

/// The cloud's answer to a sync request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CloudReply {
    /// Entries in the market's log after this request.
    pub offset: u64,
    /// What the cloud holds of each journal after this request.
    pub heads: Vec<(DeviceId, u64)>,
    pub accepted: u64,
    pub duplicates: u64,
    pub pending: u64,
    /// Changes refused, with the reason (then the HTTP status is 422, not 2xx).
    pub rejected: Vec<RejectedChange>,
    /// What the requester lacks of the cloud's log (answering a `Heads` request): the cloud's
    /// watermarks and other tablets' uploads, which reach the mesh through this tablet.
    pub changes: Vec<SignedChange>,
    /// The cloud had more for the requester than one reply holds.
    pub more: bool,
    /// The market's online channel sold out of these while the tablets hold some: a tablet gives
    /// what its rebalancing policy spares, as it would a peer that asked.
    pub rights_wanted: Vec<OnlineWants>,
}

/// The online channel (`device`, of role `online`) asks for `qty` units of `sku`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnlineWants {
    pub device: DeviceId,
    pub sku: String,
    pub qty: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum ReplyError {
    #[error("reply of {0} bytes exceeds {MAX_BODY_BYTES}")]
    Oversized(usize),
    #[error("reply version {0:?}, expected {REPLY_VERSION}")]
    Version(Option<u8>),
    #[error("reply does not decode: {0}")]
    Malformed(String),
    #[error("reply lists more than its limit of {0}")]
    OverLimit(&'static str),
}

/// [`CloudReply`] in version 1: every field but `rights_wanted`, in the same order.
#[derive(Serialize)]
struct ReplyV1Ref<'a> {
    offset: u64,
    heads: &'a Vec<(DeviceId, u64)>,
    accepted: u64,
    duplicates: u64,
    pending: u64,
    rejected: &'a Vec<RejectedChange>,
    changes: &'a Vec<SignedChange>,
    more: bool,
}

#[derive(Deserialize)]
struct ReplyV1 {
    offset: u64,
    heads: Vec<(DeviceId, u64)>,
    accepted: u64,
    duplicates: u64,
    pending: u64,
    rejected: Vec<RejectedChange>,
    changes: Vec<SignedChange>,
    more: bool,
}

impl CloudReply {
    pub fn encode(&self) -> Vec<u8> {
        if self.rights_wanted.is_empty() {
            let v1 = ReplyV1Ref {
                offset: self.offset,
                heads: &self.heads,
                accepted: self.accepted,
                duplicates: self.duplicates,
                pending: self.pending,
                rejected: &self.rejected,
                changes: &self.changes,
                more: self.more,
            };
            return postcard::to_extend(&v1, vec![REPLY_VERSION_1]).expect("replies serialize");
        }
        postcard::to_extend(self, vec![REPLY_VERSION]).expect("replies serialize")
    }

    /// Decodes and checks limits. Never panics on any input.
    pub fn decode(bytes: &[u8]) -> Result<Self, ReplyError> {
        if bytes.len() > MAX_BODY_BYTES {
            return Err(ReplyError::Oversized(bytes.len()));
        }
        let reply = match bytes.split_first() {
            Some((&REPLY_VERSION, body)) => postcard::from_bytes(body).map_err(|e| ReplyError::Malformed(e.to_string()))?,
            Some((&REPLY_VERSION_1, body)) => {
                let r: ReplyV1 = postcard::from_bytes(body).map_err(|e| ReplyError::Malformed(e.to_string()))?;
                CloudReply {
                    offset: r.offset,
                    heads: r.heads,
                    accepted: r.accepted,
                    duplicates: r.duplicates,
                    pending: r.pending,
                    rejected: r.rejected,
                    changes: r.changes,
                    more: r.more,
                    rights_wanted: Vec::new(),
                }
            }
            Some((&v, _)) => return Err(ReplyError::Version(Some(v))),
            None => return Err(ReplyError::Version(None)),
        };
        let reply: CloudReply = reply;
        if reply.heads.len() > MAX_HEADS_ENTRIES {
            return Err(ReplyError::OverLimit("heads"));
        }
        if reply.changes.len() > MAX_CHANGES_PER_MESSAGE || reply.rejected.len() > MAX_CHANGES_PER_MESSAGE {
            return Err(ReplyError::OverLimit("changes"));
        }
        if reply.rights_wanted.len() > MAX_RIGHTS_WANTED || reply.rights_wanted.iter().any(|w| w.sku.len() > stallmesh_ledger::MAX_SKU_LEN) {
            return Err(ReplyError::OverLimit("rights_wanted"));
        }
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stallmesh_identity::{MarketKey, Role};

    #[test]
    fn a_signed_request_verifies_and_each_failure_is_named() {
        let market = MarketKey::from_secret([3; 32]);
        let key = DeviceKey::from_secret([4; 32]);
        let cert = market.enrol(key.device_id(), "Honey", Role::Seller, 10_000_000);
        let path = sync_path(&market.market_id());
        let auth = RequestAuth::sign(&key, &cert, &path, 1_000, b"body");
        let headers = auth.headers();
        let back = RequestAuth::from_headers(|n| headers.iter().find(|(h, _)| *h == n).map(|(_, v)| v.as_str())).unwrap();
        assert_eq!(back, auth);
        assert_eq!(back.verify(&market.public(), &path, b"body", 2_000), Ok(()));
        assert_eq!(back.verify(&market.public(), &path, b"bodY", 2_000), Err(AuthError::BadSignature));
        assert!(matches!(back.verify(&market.public(), &path, b"body", 1_000 + MAX_CLOCK_SKEW_MS + 1), Err(AuthError::ClockSkew { .. })));
        let other = MarketKey::from_secret([5; 32]);
        assert!(matches!(back.verify(&other.public(), &path, b"body", 2_000), Err(AuthError::NotEnrolled(_))));
        assert!(matches!(back.verify(&market.public(), &path, b"body", 10_000_001), Err(AuthError::NotEnrolled(_))), "expired");
        let missing = RequestAuth::from_headers(|n| headers.iter().find(|(h, _)| *h == n && n != HEADER_SIGNATURE).map(|(_, v)| v.as_str()));
        assert_eq!(missing, Err(AuthError::Missing(HEADER_SIGNATURE)));
    }

    #[test]
    fn a_reply_round_trips_and_garbage_is_refused_without_panicking() {
        let reply = CloudReply { offset: 7, heads: vec![(DeviceId([1; 32]), 3)], accepted: 2, ..Default::default() };
        assert_eq!(CloudReply::decode(&reply.encode()), Ok(reply));
        assert_eq!(CloudReply::decode(&[]), Err(ReplyError::Version(None)));
        assert_eq!(CloudReply::decode(&[9, 1, 2]), Err(ReplyError::Version(Some(9))));
        assert!(matches!(CloudReply::decode(&[REPLY_VERSION, 0xff, 0xff, 0xff]), Err(ReplyError::Malformed(_))));
        for n in 0..64u8 {
            let _ = CloudReply::decode(&[REPLY_VERSION, n, n.wrapping_mul(7), 0xff, n]);
        }
    }
}
