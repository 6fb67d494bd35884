//! Key figures over the market's replicated sales that are not a ledger projection: the
//! recommendation experiment's conversion by arm, and its lift.

use stallmesh_api::{ArmConversion, RecommendationLift};
use stallmesh_ledger::Sale;

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
}
