//! Limits every journal event obeys, whoever wrote it.
//!
//! One function, [`check_event_body`], used for local operations ([`crate::Ledger::record`]) and by
//! [`crate::State::check`] (remote changes and restore), so a peer cannot record what the local API
//! refuses. Only properties of the event alone are checked here: anything that depends on the
//! replica's state (unknown SKU, stock rights, catalogue currency, stall) is checked elsewhere.

use crate::event::{
    EventBody, FeedbackAction, LoyaltyAsset, Product, RecommendationFeedback, RecommendationShown, SaleLine, SaleLoyalty, FEEDBACK_REASONS,
};
use stallmesh_loyalty::MAX_POINTS_PER_SALE;
use crate::{
    MAX_CHANGE_BYTES, MAX_CLIENT_REF_LEN, MAX_DROP_NAME_LEN, MAX_DROP_PLAN_DEVICES, MAX_EVIDENCE_CHANGES, MAX_EVIDENCE_PER_POSITION, MAX_NAME_LEN, MAX_OPEN_SEGMENT_DOCS,
    MAX_PENDING_CHANGES, MAX_PENDING_PER_UNENROLLED, MAX_PHOTO_BYTES, MAX_STAFF_NAME_CHARS, MAX_PRICE_CENTS, MAX_QTY, MAX_RECOMMENDED, MAX_SALE_LINES,
    MAX_SKU_LEN, MAX_TAGS, MAX_TAG_LEN, MAX_VOUCHER_LABEL_LEN, MAX_WATERMARK_DEVICES, SEGMENT_CHANGES,
};

/// Room in a photo change for all but the JPEG: actor, deps, keys, SKU, clocks (184 bytes measured
/// with a 5-byte SKU, in the test `a_photo_of_the_largest_size_replicates`).
pub(crate) const PHOTO_CHANGE_ENVELOPE_BYTES: usize = 4 * 1024;
/// Bytes of one sale line (or recommended SKU) in a change beyond its SKU: keys, quantity, price
/// (48 measured, the change's own envelope spread over the lines: 13.6 KB for the largest sale, in
/// the test `the_largest_sale_the_limits_accept_fits_in_one_change`).
pub(crate) const SALE_LINE_ENVELOPE_BYTES: usize = 64;
/// Room in a sale change for all but its lines and texts: actor, deps, keys, totals, time.
pub(crate) const SALE_CHANGE_ENVELOPE_BYTES: usize = 4 * 1024;

// A sale's total, and the units of one SKU in one sale, fit u64 whatever lines pass the limits.
const _: () = assert!((MAX_QTY as u128) * (MAX_PRICE_CENTS as u128) * (MAX_SALE_LINES as u128) <= u64::MAX as u128);
const _: () = assert!((MAX_QTY as u128) * (MAX_SALE_LINES as u128) <= u64::MAX as u128);
// The largest photo fits in one change with room for the rest of the change.
const _: () = assert!(MAX_PHOTO_BYTES + PHOTO_CHANGE_ENVELOPE_BYTES <= MAX_CHANGE_BYTES);
// The largest sale the limits accept (every line with a SKU of the longest length, the longest
// client_ref, the most recommendations) fits in one change: a valid sale is never refused as oversized.
const _: () = assert!(
    MAX_SALE_LINES * (MAX_SKU_LEN + SALE_LINE_ENVELOPE_BYTES)
        + MAX_CLIENT_REF_LEN
        + MAX_STAFF_NAME_CHARS * 4
        + MAX_RECOMMENDED * (MAX_SKU_LEN + SALE_LINE_ENVELOPE_BYTES)
        + SALE_CHANGE_ENVELOPE_BYTES
        <= MAX_CHANGE_BYTES
);
// The largest recommendation feedback (a full basket, two SKUs) fits in one change, as a sale does.
const _: () = assert!((MAX_SALE_LINES + 2) * (MAX_SKU_LEN + SALE_LINE_ENVELOPE_BYTES) + SALE_CHANGE_ENVELOPE_BYTES <= MAX_CHANGE_BYTES);
// Points redeemed in one sale (held plus unproven) fit u64 with room: both are capped per sale.
const _: () = assert!(2 * (MAX_POINTS_PER_SALE as u128) < u64::MAX as u128);
// A stranger's changes cannot fill the pending buffer on their own.
const _: () = assert!(MAX_PENDING_PER_UNENROLLED < MAX_PENDING_CHANGES);
/// A watermark of the largest market fits one change: each device costs its 32-byte id and a
/// varint count (at most 10 bytes), plus automerge's framing.
const _: () = assert!(MAX_WATERMARK_DEVICES * (32 + 10) + 1024 <= MAX_CHANGE_BYTES);
/// The largest drop plan fits one change, as a watermark does: each device costs its id and a varint.
const _: () = assert!(MAX_DROP_PLAN_DEVICES * (32 + 10) + MAX_DROP_NAME_LEN + MAX_SKU_LEN + 1024 <= MAX_CHANGE_BYTES);
// Every share of a valid drop is at most its units, so a plan's sum is checked, never wrapped.
const _: () = assert!((MAX_DROP_PLAN_DEVICES as u128) * (MAX_QTY as u128) <= u64::MAX as u128);
// Two conflicting changes at one position are the proof of a fork; the total bound holds one position's.
const _: () = assert!(MAX_EVIDENCE_PER_POSITION >= 2 && MAX_EVIDENCE_PER_POSITION <= MAX_EVIDENCE_CHANGES);
// This device's own journal document is always kept open, so the bound must leave room for it.
const _: () = assert!(MAX_OPEN_SEGMENT_DOCS >= 1 && SEGMENT_CHANGES >= 1);
// A catalogue clock at its limit can still be incremented by one without wrapping.
const _: () = assert!(MAX_LAMPORT < u64::MAX);

/// Highest catalogue clock an event may carry: one catalogue change a millisecond for 285,000
/// years. Bounded so that one forged product cannot push every replica's clock to its end (then no
/// tablet could change a product again: last writer wins by this clock).
pub const MAX_LAMPORT: u64 = 1 << 53;

/// The field of an event that breaks a limit, and how.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
#[error("{field}: {problem}")]
pub struct InvalidField {
    pub field: &'static str,
    pub problem: String,
}

type Checked = Result<(), InvalidField>;

fn check_lamport(lamport: u64) -> Checked {
    if lamport > MAX_LAMPORT {
        return Err(invalid("lamport", format!("must be at most {MAX_LAMPORT}")));
    }
    Ok(())
}

fn invalid(field: &'static str, problem: impl Into<String>) -> InvalidField {
    InvalidField { field, problem: problem.into() }
}

/// Checks every limit of `body` that does not depend on the replica's state.
pub fn check_event_body(body: &EventBody) -> Checked {
    match body {
        // Verified against the market key by whoever records or applies them.
        EventBody::Enrolled { .. } | EventBody::Revoked { .. } => Ok(()),
        EventBody::CloudHolds { heads, .. } => {
            if heads.len() > MAX_WATERMARK_DEVICES {
                return Err(invalid("heads", format!("a watermark lists at most {MAX_WATERMARK_DEVICES} devices")));
            }
            if heads.windows(2).any(|w| w[0].0 >= w[1].0) {
                return Err(invalid("heads", "devices must be listed once each, in order"));
            }
            Ok(())
        }
        EventBody::ProductUpserted { product, lamport } => {
            check_lamport(*lamport)?;
            check_product(product)
        }
        EventBody::Restocked { sku, qty } | EventBody::Transferred { sku, qty, .. } => {
            check_qty(*qty)?;
            check_sku(sku)
        }
        EventBody::PhotoAttached { sku, jpeg, lamport } => {
            check_lamport(*lamport)?;
            check_sku(sku)?;
            check_photo(jpeg)
        }
        EventBody::LoyaltyTransferred { asset, qty, .. } => match asset {
            LoyaltyAsset::Points(_) if (1..=MAX_LOYALTY_TRANSFER_POINTS).contains(qty) => Ok(()),
            LoyaltyAsset::Points(_) => Err(invalid("qty", format!("a points transfer moves 1..={MAX_LOYALTY_TRANSFER_POINTS} points"))),
            LoyaltyAsset::Voucher(_) if *qty == 1 => Ok(()),
            LoyaltyAsset::Voucher(_) => Err(invalid("qty", "a voucher is transferred whole: qty 1")),
        },
        EventBody::VoucherMinted { label, value_cents, .. } => {
            check_text("label", label, MAX_VOUCHER_LABEL_LEN)?;
            if *value_cents > MAX_PRICE_CENTS {
                return Err(invalid("value_cents", format!("must be at most {MAX_PRICE_CENTS}")));
            }
            Ok(())
        }
        EventBody::VoucherRedeemed { .. } => Ok(()),
        EventBody::RecommendationFeedback { feedback } => check_feedback(feedback),
        EventBody::DropPlanned { name, sku, units, plan, max_per_buyer, .. } => {
            check_drop(name, sku, *units, plan)?;
            match max_per_buyer {
                Some(n) if *n == 0 || n > units => Err(invalid("max_per_buyer", format!("must be 1..={units}, the drop's units"))),
                _ => Ok(()),
            }
        }
        EventBody::Sold { lines, total_cents, currency, client_ref, recommendation, loyalty, staff } => {
            if let Some(s) = staff {
                check_staff(s)?;
            }
            if let Some(rec) = recommendation {
                check_recommendation(rec)?;
            }
            if let Some(l) = loyalty {
                check_sale_loyalty(l, *total_cents)?;
            }
            if lines.is_empty() || lines.len() > MAX_SALE_LINES {
                return Err(invalid("lines", format!("must hold 1..={MAX_SALE_LINES} lines")));
            }
            if let Some(r) = client_ref {
                check_text("client_ref", r, MAX_CLIENT_REF_LEN)?;
            }
            for line in lines {
                check_qty(line.qty)?;
                check_sku(&line.sku)?;
                check_price(line.price_cents)?;
            }
            check_currency(currency)?;
            match sale_total_cents(lines) {
                Some(sum) if sum == *total_cents => Ok(()),
                Some(sum) => Err(invalid("total_cents", format!("{total_cents} is not the sum of the lines, {sum}"))),
                None => Err(invalid("total_cents", "the sum of the lines overflows")),
            }
        }
    }
}

/// The sum of qty × unit price over `lines`, or `None` if it does not fit u64 (never within the limits).
pub fn sale_total_cents(lines: &[SaleLine]) -> Option<u64> {
    lines.iter().try_fold(0u64, |total, l| l.qty.checked_mul(l.price_cents).and_then(|line| total.checked_add(line)))
}

fn check_product(p: &Product) -> Checked {
    check_sku(&p.sku)?;
    check_text("name", &p.name, MAX_NAME_LEN)?;
    check_text("stall", &p.stall, MAX_NAME_LEN)?;
    check_price(p.price_cents)?;
    check_currency(&p.currency)?;
    if p.tags.len() > MAX_TAGS || p.tags.iter().any(|t| t.is_empty() || t.len() > MAX_TAG_LEN) {
        return Err(invalid("tags", format!("at most {MAX_TAGS} tags of 1..={MAX_TAG_LEN} bytes")));
    }
    Ok(())
}

fn check_drop(name: &str, sku: &str, units: u64, plan: &[(stallmesh_identity::DeviceId, u64)]) -> Checked {
    check_text("name", name, MAX_DROP_NAME_LEN)?;
    check_sku(sku)?;
    check_qty(units).map_err(|e| invalid("units", e.problem))?;
    if plan.is_empty() || plan.len() > MAX_DROP_PLAN_DEVICES {
        return Err(invalid("plan", format!("must list 1..={MAX_DROP_PLAN_DEVICES} devices")));
    }
    if plan.windows(2).any(|w| w[0].0 >= w[1].0) {
        return Err(invalid("plan", "devices must be listed once each, in order"));
    }
    if plan.iter().any(|(_, share)| *share == 0) {
        return Err(invalid("plan", "every device listed gets at least one unit"));
    }
    let planned = plan.iter().try_fold(0u64, |sum, (_, share)| sum.checked_add(*share));
    if planned != Some(units) {
        return Err(invalid("plan", format!("the shares must add up to the drop's {units} units")));
    }
    Ok(())
}

fn check_text(field: &'static str, v: &str, max_bytes: usize) -> Checked {
    if v.trim().is_empty() || v.len() > max_bytes {
        return Err(invalid(field, format!("must be 1..={max_bytes} bytes")));
    }
    Ok(())
}

fn check_sku(sku: &str) -> Checked {
    check_text("sku", sku, MAX_SKU_LEN)?;
    if !sku.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(invalid("sku", "only letters, digits, '-', '_' and '.'"));
    }
    Ok(())
}

fn check_qty(qty: u64) -> Checked {
    if qty == 0 || qty > MAX_QTY {
        return Err(invalid("qty", format!("must be 1..={MAX_QTY}")));
    }
    Ok(())
}

fn check_price(price_cents: u64) -> Checked {
    if price_cents > MAX_PRICE_CENTS {
        return Err(invalid("price_cents", format!("must be at most {MAX_PRICE_CENTS}")));
    }
    Ok(())
}

fn check_currency(currency: &str) -> Checked {
    if currency.len() != 3 || !currency.chars().all(|c| c.is_ascii_uppercase()) {
        return Err(invalid("currency", "must be an ISO 4217 code like EUR"));
    }
    Ok(())
}

fn check_photo(jpeg: &[u8]) -> Checked {
    if jpeg.is_empty() || jpeg.len() > MAX_PHOTO_BYTES {
        return Err(invalid("photo", format!("must be 1..={MAX_PHOTO_BYTES} bytes")));
    }
    if !jpeg.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return Err(invalid("photo", "must be a JPEG"));
    }
    Ok(())
}

/// Most points one transfer moves: a card's whole balance after years of market days.
pub const MAX_LOYALTY_TRANSFER_POINTS: u64 = 1_000 * MAX_POINTS_PER_SALE;

fn check_sale_loyalty(l: &SaleLoyalty, total_cents: u64) -> Checked {
    for (field, points) in [("points_earned", l.points_earned), ("points_redeemed", l.points_redeemed), ("points_unproven", l.points_unproven)] {
        if points > MAX_POINTS_PER_SALE {
            return Err(invalid(field, format!("must be at most {MAX_POINTS_PER_SALE}")));
        }
    }
    if l.discount_cents > total_cents {
        return Err(invalid("discount_cents", format!("{} exceeds the sale's total {total_cents}", l.discount_cents)));
    }
    if (l.discount_cents > 0) != (l.points_redeemed + l.points_unproven > 0) {
        return Err(invalid("discount_cents", "redeemed points and a discount go together"));
    }
    Ok(())
}

/// Whether `name` may stand as the staff member on a sale: a person's name, not arbitrary text on
/// every replica's sales. The node's staff book takes only such names.
pub fn is_staff_name(name: &str) -> bool {
    !name.trim().is_empty() && name.chars().count() <= MAX_STAFF_NAME_CHARS && name.chars().all(|c| c.is_alphanumeric() || " -.".contains(c))
}

fn check_staff(name: &str) -> Checked {
    if is_staff_name(name) {
        Ok(())
    } else {
        Err(invalid("staff", format!("1..={MAX_STAFF_NAME_CHARS} letters, digits, spaces, '-' or '.'")))
    }
}

fn check_feedback(f: &RecommendationFeedback) -> Checked {
    check_sku(&f.sku)?;
    if !FEEDBACK_REASONS.contains(&f.reason.as_str()) {
        return Err(invalid("reason", format!("must be one of {}", FEEDBACK_REASONS.join(", "))));
    }
    match (f.action, &f.chosen_sku) {
        (FeedbackAction::Overridden, Some(chosen)) => check_sku(chosen)?,
        (FeedbackAction::Overridden, None) => return Err(invalid("chosen_sku", "an override names the product chosen instead")),
        (FeedbackAction::Dismissed, Some(_)) => return Err(invalid("chosen_sku", "a dismissal chooses nothing instead")),
        (FeedbackAction::Dismissed, None) => {}
    }
    if f.basket.len() > MAX_SALE_LINES {
        return Err(invalid("basket", format!("at most {MAX_SALE_LINES} SKUs")));
    }
    f.basket.iter().try_for_each(|s| check_sku(s))?;
    if f.arm != "treatment" && f.arm != "control" {
        return Err(invalid("arm", "must be \"treatment\" or \"control\""));
    }
    Ok(())
}

fn check_recommendation(rec: &RecommendationShown) -> Checked {
    if rec.arm != "treatment" && rec.arm != "control" {
        return Err(invalid("recommendation.arm", "must be \"treatment\" or \"control\""));
    }
    // Length only, as the API has always accepted: these SKUs are a record, never looked up.
    if rec.skus.len() > MAX_RECOMMENDED || rec.skus.iter().any(|s| s.is_empty() || s.len() > MAX_SKU_LEN) {
        return Err(invalid("recommendation.skus", format!("at most {MAX_RECOMMENDED} SKUs of 1..={MAX_SKU_LEN} bytes")));
    }
    Ok(())
}
