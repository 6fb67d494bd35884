//! Building blocks for tests, benchmarks and the simulator: a market with enrolled devices.

use crate::{Entry, Ledger, LineRequest, LocalOp, MarketContext, Product};
use stallmesh_identity::{DeviceKey, MarketKey, Role};

/// A market whose organiser key is at hand, so tests can enrol and revoke devices.
pub struct TestMarket {
    pub key: MarketKey,
    pub ctx: MarketContext,
}

impl TestMarket {
    /// Deterministic keys from `seed`, so failures reproduce.
    pub fn new(seed: u8) -> Self {
        let key = MarketKey::from_secret([seed; 32]);
        let ctx = MarketContext::new(key.public());
        Self { key, ctx }
    }

    /// A fresh, enrolled ledger for device number `n` of stall `stall`; returns its enrolment entry too.
    pub fn device(&self, n: u16, stall: &str) -> (Ledger, Entry) {
        self.device_as(n, stall, Role::Organiser)
    }

    /// As [`TestMarket::device`], enrolled with `role`.
    pub fn device_as(&self, n: u16, stall: &str, role: Role) -> (Ledger, Entry) {
        let key = self.device_key(n);
        let cert = self.key.enrol(key.device_id(), stall, role, u64::MAX);
        let mut ledger = Ledger::new(self.ctx.clone(), key, cert);
        let entry = ledger.enrol_self(0).expect("valid certificate").expect("first enrolment");
        (ledger, entry)
    }
}

impl TestMarket {
    /// The key of device number `n` (the same on every call).
    pub fn device_key(&self, n: u16) -> DeviceKey {
        let mut secret = [0u8; 32];
        secret[..2].copy_from_slice(&n.to_le_bytes());
        secret[2] = self.key.secret()[0];
        secret[31] = 0xd0;
        DeviceKey::from_secret(secret)
    }
}

pub fn product(sku: &str, price_cents: u64) -> Product {
    Product {
        sku: sku.into(),
        name: format!("Product {sku}"),
        price_cents,
        currency: "EUR".into(),
        stall: "Test Stall".into(),
        tags: vec![],
    }
}

pub fn sell(sku: &str, qty: u64) -> LocalOp {
    LocalOp::Sell { lines: vec![LineRequest { sku: sku.into(), qty }], client_ref: None, recommendation: None, loyalty: None, staff: None }
}
