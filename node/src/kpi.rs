//! Key figures over the market's replicated sales that are not a ledger projection: the
//! recommendation experiment's conversion by arm and its lift, and the page's KPIs (revenue per
//! open hour, average order, sales per hour, top products).

use stallmesh_api::till::{HourFigures, Kpis, LiftFigures, TopProduct};
use stallmesh_api::{ArmConversion, RecommendationLift};
use stallmesh_ledger::Sale;
use std::collections::{BTreeMap, HashMap};

const HOUR_MS: u64 = 3_600_000;
/// Products listed in the KPIs' top list.
pub const TOP_PRODUCTS: usize = 10;
/// z for a two-sided 95% interval.
const Z_95: f64 = 1.959964;

/// The KPIs over the sales at or after `since_ms` (by the selling device's clock), in the currency
/// most of them use; `names` gives product names.
pub fn kpis<'a>(
    sales: impl IntoIterator<Item = &'a Sale>,
    since_ms: u64,
    names: impl Fn(&str) -> Option<String>,
    treatment_percent_here: u8,
) -> Kpis {
    let sales: Vec<&Sale> = sales.into_iter().filter(|s| s.time_ms >= since_ms).collect();
    let mut by_currency: HashMap<&str, u64> = HashMap::new();
    for s in &sales {
        *by_currency.entry(s.currency.as_str()).or_default() += 1;
    }
    // Most sales, then the name: the same answer whatever the order.
    let currency = by_currency.iter().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0))).map(|(c, _)| c.to_string());
    let (counted, other): (Vec<&Sale>, Vec<&Sale>) = sales.iter().partition(|s| Some(s.currency.as_str()) == currency.as_deref());
    // Sums saturate: the ledger's limits keep each sale's total within u64, not a market's year.
    let paid = |s: &Sale| s.total_cents.saturating_sub(s.loyalty.as_ref().map_or(0, |l| l.discount_cents));
    let mut per_hour: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    let mut per_sku: HashMap<&str, (u64, u64)> = HashMap::new();
    let mut revenue_cents = 0u64;
    for s in &counted {
        revenue_cents = revenue_cents.saturating_add(paid(s));
        let hour = per_hour.entry(s.time_ms - s.time_ms % HOUR_MS).or_default();
        hour.0 += 1;
        hour.1 = hour.1.saturating_add(paid(s));
        for l in &s.lines {
            let p = per_sku.entry(l.sku.as_str()).or_default();
            p.0 = p.0.saturating_add(l.qty);
            p.1 = p.1.saturating_add(l.qty.saturating_mul(l.price_cents));
        }
    }
    let n = counted.len() as u64;
    let open_hours = per_hour.len() as u64;
    let mut top: Vec<(&str, (u64, u64))> = per_sku.into_iter().collect();
    top.sort_by(|a, b| b.1 .1.cmp(&a.1 .1).then(a.0.cmp(b.0)));
    let lift = recommendation_lift(counted.iter().copied(), treatment_percent_here);
    Kpis {
        since_ms,
        currency,
        other_currency_sales: other.len() as u64,
        sales: n,
        revenue_cents,
        average_order_cents: (n > 0).then(|| revenue_cents / n),
        open_hours,
        revenue_per_open_hour_cents: (open_hours > 0).then(|| revenue_cents / open_hours),
        per_hour: per_hour.into_iter().map(|(h, (sales, revenue_cents))| HourFigures { hour_start_ms: h, sales, revenue_cents }).collect(),
        top_products: top
            .into_iter()
            .take(TOP_PRODUCTS)
            .map(|(sku, (units, revenue_cents))| TopProduct { sku: sku.to_string(), name: names(sku), units, revenue_cents })
            .collect(),
        lift: lift_with_interval(lift),
    }
}

/// The lift's 95% interval: the relative risk's log is about normal with standard error
/// sqrt(1/xt - 1/nt + 1/xc - 1/nc) (conversions x of n sales per arm).
pub fn lift_with_interval(lift: RecommendationLift) -> LiftFigures {
    let (t, c) = (&lift.treatment, &lift.control);
    let interval = (t.converted > 0 && c.converted > 0).then(|| {
        let (xt, nt, xc, nc) = (t.converted as f64, t.sales as f64, c.converted as f64, c.sales as f64);
        let log_rr = ((xt / nt) / (xc / nc)).ln();
        let se = (1.0 / xt - 1.0 / nt + 1.0 / xc - 1.0 / nc).max(0.0).sqrt();
        ((log_rr - Z_95 * se).exp() - 1.0, (log_rr + Z_95 * se).exp() - 1.0)
    });
    LiftFigures {
        treatment: lift.treatment,
        control: lift.control,
        lift: lift.lift,
        lift_ci_low: interval.map(|i| i.0),
        lift_ci_high: interval.map(|i| i.1),
    }
}

/// A sale converts when it holds a product that was recommended (treatment) or would have been
/// (control) for its basket. Sales without a recommendation record take no part.
pub fn recommendation_lift<'a>(sales: impl IntoIterator<Item = &'a Sale>, treatment_percent_here: u8) -> RecommendationLift {
    let (mut treatment, mut control) = ((0u64, 0u64), (0u64, 0u64));
    for sale in sales {
        let Some(rec) = &sale.recommendation else { continue };
        let arm = if rec.arm == "treatment" { &mut treatment } else { &mut control };
        arm.0 += 1;
        if sale.lines.iter().any(|line| rec.skus.contains(&line.sku)) {
            arm.1 += 1;
        }
    }
    let view = |(sales, converted): (u64, u64)| ArmConversion {
        sales,
        converted,
        conversion_rate: (sales > 0).then(|| converted as f64 / sales as f64),
    };
    let (treatment, control) = (view(treatment), view(control));
    let lift = match (treatment.conversion_rate, control.conversion_rate) {
        (Some(t), Some(c)) if c > 0.0 => Some(t / c - 1.0),
        _ => None,
    };
    RecommendationLift { treatment, control, lift, treatment_percent_here }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stallmesh_identity::DeviceId;
    use stallmesh_ledger::{RecommendationShown, SaleLine};

    fn sale(arm: Option<&str>, bought: &str, recommended: &str) -> Sale {
        Sale {
            id: format!("{arm:?}-{bought}"),
            device: DeviceId([1; 32]),
            seq: 1,
            lines: vec![SaleLine { sku: bought.into(), qty: 1, price_cents: 100 }],
            total_cents: 100,
            currency: "EUR".into(),
            time_ms: 0,
            client_ref: None,
            recommendation: arm.map(|a| RecommendationShown { arm: a.into(), skus: vec![recommended.into()] }),
            loyalty: None,
            staff: None,
        }
    }

    #[test]
    fn lift_compares_conversion_of_the_two_arms_and_ignores_unrecorded_sales() {
        let sales = [
            sale(Some("treatment"), "JAM", "JAM"),
            sale(Some("treatment"), "JAM", "HNY"),
            sale(Some("control"), "JAM", "JAM"),
            sale(Some("control"), "BRD", "JAM"),
            sale(Some("control"), "BRD", "JAM"),
            sale(Some("control"), "BRD", "JAM"),
            sale(None, "JAM", "JAM"),
        ];
        let lift = recommendation_lift(&sales, 50);
        assert_eq!((lift.treatment.sales, lift.treatment.converted), (2, 1));
        assert_eq!((lift.control.sales, lift.control.converted), (4, 1));
        assert_eq!(lift.lift, Some(1.0), "0.5 against 0.25 is a lift of 100%");
        assert_eq!(recommendation_lift(&sales[..2], 50).lift, None, "no control sales yet");
    }

    #[test]
    fn the_lift_interval_contains_the_lift_and_narrows_with_more_sales() {
        let few = [
            sale(Some("treatment"), "JAM", "JAM"),
            sale(Some("treatment"), "BRD", "JAM"),
            sale(Some("control"), "JAM", "JAM"),
            sale(Some("control"), "BRD", "JAM"),
            sale(Some("control"), "BRD", "JAM"),
            sale(Some("control"), "BRD", "JAM"),
        ];
        let small = lift_with_interval(recommendation_lift(&few, 50));
        let many: Vec<Sale> = few.iter().cycle().take(few.len() * 50).cloned().collect();
        let large = lift_with_interval(recommendation_lift(&many, 50));
        for f in [&small, &large] {
            let (lo, hi, lift) = (f.lift_ci_low.unwrap(), f.lift_ci_high.unwrap(), f.lift.unwrap());
            assert!(lo < lift && lift < hi, "{lo} < {lift} < {hi}");
        }
        assert!(large.lift_ci_high.unwrap() - large.lift_ci_low.unwrap() < small.lift_ci_high.unwrap() - small.lift_ci_low.unwrap());
        assert_eq!(small.lift, Some(1.0));
    }

    #[test]
    fn kpis_count_the_day_per_hour_in_its_main_currency_with_what_customers_paid() {
        let mut a = sale(None, "JAM", "JAM");
        a.time_ms = 10 * HOUR_MS + 5;
        let mut b = sale(None, "BRD", "JAM");
        b.time_ms = 10 * HOUR_MS + 9;
        b.lines[0].qty = 3;
        b.total_cents = 300;
        let mut c = sale(None, "JAM", "JAM");
        c.time_ms = 12 * HOUR_MS;
        let mut old = sale(None, "JAM", "JAM");
        old.time_ms = HOUR_MS;
        let mut dollars = sale(None, "JAM", "JAM");
        dollars.time_ms = 12 * HOUR_MS;
        dollars.currency = "USD".into();
        let k = kpis([&a, &b, &c, &old, &dollars], 10 * HOUR_MS, |sku| Some(format!("{sku} name")), 50);
        assert_eq!((k.currency.as_deref(), k.sales, k.other_currency_sales), (Some("EUR"), 3, 1));
        assert_eq!((k.revenue_cents, k.average_order_cents, k.open_hours, k.revenue_per_open_hour_cents), (500, Some(166), 2, Some(250)));
        assert_eq!(k.per_hour.iter().map(|h| (h.hour_start_ms / HOUR_MS, h.sales, h.revenue_cents)).collect::<Vec<_>>(), vec![(10, 2, 400), (12, 1, 100)]);
        assert_eq!((k.top_products[0].sku.as_str(), k.top_products[0].units, k.top_products[0].name.as_deref()), ("BRD", 3, Some("BRD name")));
    }
}
