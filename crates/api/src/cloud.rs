//! The cloud service's JSON: its reconciled log as consumers read it (`GET
//! /v1/markets/{market}/events`, NDJSON, one [`LogEvent`] per line; the same body is PostgreSQL's
//! `events.body`), market registration and status.

use crate::SaleLineView;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One entry of a market's reconciled log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEvent {
    /// Market id, 32 hex characters.
    pub market: String,
    /// 1, 2, 3, … without gaps, per market.
    pub offset: u64,
    /// The signing device, 64 hex characters, and the position in its journal.
    pub device: String,
    pub seq: u64,
    /// The author's clock when it was recorded.
    pub time_ms: u64,
    /// SHA-256 of the signed change, hex.
    pub digest: String,
    #[serde(flatten)]
    pub body: LogBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LogBody {
    Enrolment { stall: String, role: String, expires_at_ms: u64 },
    Product { sku: String, name: String, price_cents: u64, currency: String, stall: String, tags: Vec<String>, lamport: u64 },
    Restock { sku: String, qty: u64 },
    Transfer { sku: String, qty: u64, to_device: String },
    Sale {
        sale_id: String,
        lines: Vec<SaleLineView>,
        total_cents: u64,
        currency: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_ref: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        recommendation: Option<RecommendationRecord>,
    },
    Photo { sku: String, jpeg_bytes: u64, lamport: u64 },
    Revocation { device: String, revoked_at_ms: u64 },
    CloudWatermark { offset: u64, heads: BTreeMap<String, u64> },
}

impl LogBody {
    /// The `kind` field's value.
    pub fn kind(&self) -> &'static str {
        match self {
            LogBody::Enrolment { .. } => "enrolment",
            LogBody::Product { .. } => "product",
            LogBody::Restock { .. } => "restock",
            LogBody::Transfer { .. } => "transfer",
            LogBody::Sale { .. } => "sale",
            LogBody::Photo { .. } => "photo",
            LogBody::Revocation { .. } => "revocation",
            LogBody::CloudWatermark { .. } => "cloud_watermark",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecommendationRecord {
    /// `"treatment"` or `"control"`.
    pub arm: String,
    pub skus: Vec<String>,
}

/// A registered market, as `GET /v1/markets` and `GET /v1/markets/{market}` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MarketView {
    pub market: String,
    pub name: String,
    pub cloud_device: String,
    /// Entries in the reconciled log.
    pub offset: u64,
    /// Device → journal entries the cloud holds.
    pub heads: BTreeMap<String, u64>,
    /// Changes refused since this process started, by reason.
    pub rejected: BTreeMap<String, u64>,
    pub duplicates: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MarketList {
    pub markets: Vec<MarketView>,
}
