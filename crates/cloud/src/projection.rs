//! A log record as consumers read it: the ledger's event mapped to the API's [`LogEvent`], so no
//! automerge or postcard internals reach a consumer. The PostgreSQL tables are built from the same
//! mapping (`store/postgres.rs`).

use stallmesh_api::cloud::{LogBody, LogEvent, RecommendationRecord};
use stallmesh_api::SaleLineView;
use stallmesh_identity::{MarketId, Role};
use stallmesh_ingest::LogRecord;
use stallmesh_ledger::{sale_id, EventBody, LoyaltyAsset, SaleLoyalty};

/// A sale's loyalty as the API shows it (tablets and the cloud alike).
pub fn sale_loyalty_view(l: &SaleLoyalty) -> stallmesh_api::SaleLoyaltyView {
    stallmesh_api::SaleLoyaltyView {
        card: l.card.to_hex(),
        points_earned: l.points_earned,
        points_redeemed: l.points_redeemed,
        points_unproven: l.points_unproven,
        discount_cents: l.discount_cents,
    }
}

pub fn role_name(role: Role) -> &'static str {
    role.as_str()
}

pub fn log_event(market: &MarketId, record: &LogRecord) -> LogEvent {
    let change = &record.entry.change;
    let event = &record.entry.event;
    let body = match &event.body {
        EventBody::Enrolled { certificate } => LogBody::Enrolment {
            stall: certificate.stall.clone(),
            role: role_name(certificate.role).into(),
            expires_at_ms: certificate.expires_at_ms,
        },
        EventBody::ProductUpserted { product, lamport } => LogBody::Product {
            sku: product.sku.clone(),
            name: product.name.clone(),
            price_cents: product.price_cents,
            currency: product.currency.clone(),
            stall: product.stall.clone(),
            tags: product.tags.clone(),
            lamport: *lamport,
        },
        EventBody::Restocked { sku, qty } => LogBody::Restock { sku: sku.clone(), qty: *qty },
        EventBody::Transferred { sku, qty, to } => LogBody::Transfer { sku: sku.clone(), qty: *qty, to_device: to.to_hex() },
        EventBody::Sold { lines, total_cents, currency, client_ref, recommendation, loyalty, staff } => LogBody::Sale {
            sale_id: sale_id(change.dot()),
            lines: lines.iter().map(|l| SaleLineView { sku: l.sku.clone(), qty: l.qty, price_cents: l.price_cents }).collect(),
            total_cents: *total_cents,
            currency: currency.clone(),
            client_ref: client_ref.clone(),
            recommendation: recommendation.as_ref().map(|r| RecommendationRecord { arm: r.arm.clone(), skus: r.skus.clone() }),
            loyalty: loyalty.as_ref().map(sale_loyalty_view),
            staff: staff.clone(),
        },
        EventBody::PhotoAttached { sku, jpeg, lamport } => LogBody::Photo { sku: sku.clone(), jpeg_bytes: jpeg.len() as u64, lamport: *lamport },
        EventBody::Revoked { revocation } => {
            LogBody::Revocation { device: revocation.device.to_hex(), revoked_at_ms: revocation.revoked_at_ms }
        }
        EventBody::CloudHolds { offset, heads } => {
            LogBody::CloudWatermark { covers_offset: *offset, heads: heads.iter().map(|(d, n)| (d.to_hex(), *n)).collect() }
        }
        EventBody::LoyaltyTransferred { asset, qty, to } => {
            let (asset, id) = match asset {
                LoyaltyAsset::Points(c) => ("points", c.to_hex()),
                LoyaltyAsset::Voucher(v) => ("voucher", v.to_hex()),
            };
            LogBody::LoyaltyTransfer { asset: asset.into(), id, qty: *qty, to_device: to.to_hex() }
        }
        EventBody::VoucherMinted { voucher, label, value_cents } => {
            LogBody::VoucherMinted { voucher: voucher.to_hex(), label: label.clone(), value_cents: *value_cents }
        }
        EventBody::VoucherRedeemed { voucher, proven } => LogBody::VoucherRedeemed { voucher: voucher.to_hex(), proven: *proven },
        EventBody::RecommendationFeedback { feedback: f } => LogBody::RecommendationFeedback {
            action: f.action.as_str().into(),
            sku: f.sku.clone(),
            reason: f.reason.clone(),
            chosen_sku: f.chosen_sku.clone(),
            basket: f.basket.clone(),
            arm: f.arm.clone(),
        },
        EventBody::DropPlanned { name, sku, units, start_ms, plan, max_per_buyer } => LogBody::Drop {
            max_per_buyer: *max_per_buyer,
            drop_id: stallmesh_ledger::drop_id(change.dot()),
            name: name.clone(),
            sku: sku.clone(),
            units: *units,
            start_ms: *start_ms,
            plan: plan.iter().map(|(d, n)| (d.to_hex(), *n)).collect(),
        },
    };
    LogEvent {
        market: market.to_hex(),
        offset: record.offset,
        device: change.device.to_hex(),
        seq: change.seq,
        time_ms: event.time_ms,
        digest: change.digest().to_hex(),
        body,
    }
}
