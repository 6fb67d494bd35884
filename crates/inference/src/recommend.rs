//! "Bought together": co-occurrence counts over the market's replicated sales, with embedding
//! similarity standing in for products that have no sales yet.
//!
//! For a basket B and a candidate c with sales history the score is the smoothed confidence
//! Σ_{b∈B} n(b,c) / (n(b) + SMOOTHING). A product with no sales borrows from what it resembles: its
//! cosine to the centroid of the co-purchased products, scaled by the best co-purchase score. A basket
//! item with no sales borrows the co-purchases of its nearest sold neighbours the same way.

use crate::search::{top_k, SearchIndex};
use crate::{dot, l2_normalize};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};

/// Most basket items considered: a basket is a handful of products; a long list is a mistake or abuse.
pub const MAX_BASKET: usize = 50;
/// Added to a basket item's sales count so one lucky pair does not read as certainty.
pub const SMOOTHING: f32 = 2.0;
/// Weight of the similarity-based score of a product without sales, against real co-purchases.
pub const COLD_START_WEIGHT: f32 = 0.8;
/// A sold product must be at least this similar to stand in for a basket item without sales.
pub const NEIGHBOUR_MIN_SIMILARITY: f32 = 0.5;
/// Sold neighbours that stand in for one basket item without sales.
pub const NEIGHBOURS: usize = 3;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Recommendation {
    pub sku: String,
    pub name: String,
    pub score: f32,
    /// Sales in which this product was bought with a basket item.
    pub bought_together: u32,
    /// `"bought_together"` or `"similar_to_bought_together"` (a product without sales yet).
    pub reason: &'static str,
}

/// Co-occurrence counts, fed with each sale once (sales are keyed by id, so replays are harmless).
#[derive(Debug, Default, Clone)]
pub struct CoPurchase {
    seen: HashSet<String>,
    /// sku → sales it appears in.
    sales_of: HashMap<String, u32>,
    /// sku → other sku → sales with both.
    pairs: HashMap<String, BTreeMap<String, u32>>,
}

impl CoPurchase {
    /// Counts one sale's distinct SKUs. Returns false if this sale was already counted.
    pub fn observe<'a>(&mut self, sale_id: &str, skus: impl IntoIterator<Item = &'a str>) -> bool {
        if !self.seen.insert(sale_id.to_string()) {
            return false;
        }
        let mut distinct: Vec<&str> = skus.into_iter().collect();
        distinct.sort_unstable();
        distinct.dedup();
        for a in &distinct {
            *self.sales_of.entry(a.to_string()).or_default() += 1;
            for b in &distinct {
                if a != b {
                    *self.pairs.entry(a.to_string()).or_default().entry(b.to_string()).or_default() += 1;
                }
            }
        }
        true
    }

    pub fn has_counted(&self, sale_id: &str) -> bool {
        self.seen.contains(sale_id)
    }

    pub fn sales_counted(&self) -> usize {
        self.seen.len()
    }

    pub fn sales_of(&self, sku: &str) -> u32 {
        self.sales_of.get(sku).copied().unwrap_or(0)
    }

    /// Top `k` products to offer with `basket`; `available` filters out what cannot be sold (say, no stock).
    pub fn recommend(&self, basket: &[String], index: &SearchIndex, k: usize, available: impl Fn(&str) -> bool) -> Vec<Recommendation> {
        let basket: Vec<&str> = basket.iter().take(MAX_BASKET).map(String::as_str).collect();
        let in_basket: HashSet<&str> = basket.iter().copied().collect();
        // (sku, weight) whose co-purchases count for the basket: the items themselves, or for an item
        // without sales its most similar sold products.
        let mut sources: Vec<(&str, f32)> = Vec::new();
        for &b in &basket {
            if self.sales_of(b) > 0 {
                sources.push((b, 1.0));
            } else if let Some(v) = index.text_vector(b) {
                let mut near: Vec<(f32, u32, &str)> = index
                    .items()
                    .iter()
                    .enumerate()
                    .filter(|(_, it)| self.sales_of(&it.sku) > 0 && !in_basket.contains(it.sku.as_str()))
                    .filter_map(|(i, it)| index.text_vector_at(i).map(|w| (dot(v, w), i as u32, it.sku.as_str())))
                    .filter(|(s, _, _)| *s >= NEIGHBOUR_MIN_SIMILARITY)
                    .collect();
                top_k(&mut near, NEIGHBOURS, |n| n.0, |n| n.1);
                sources.extend(near.into_iter().map(|(s, _, sku)| (sku, s)));
            }
        }
        let mut co: BTreeMap<&str, (f32, u32)> = BTreeMap::new();
        for (src, weight) in &sources {
            let Some(with) = self.pairs.get(*src) else { continue };
            let n = self.sales_of(src) as f32 + SMOOTHING;
            for (c, &count) in with {
                if in_basket.contains(c.as_str()) {
                    continue;
                }
                let e = co.entry(c.as_str()).or_default();
                e.0 += weight * count as f32 / n;
                e.1 += count;
            }
        }
        let mut out: Vec<(f32, u32, Recommendation)> = Vec::new();
        for (sku, (score, count)) in &co {
            if let (Some(i), true) = (index.items().binary_search_by(|it| it.sku.as_str().cmp(sku)).ok(), available(sku)) {
                let name = index.items()[i].name.clone();
                out.push((
                    *score,
                    i as u32,
                    Recommendation { sku: sku.to_string(), name, score: *score, bought_together: *count, reason: "bought_together" },
                ));
            }
        }
        // Products without sales: similarity to the co-purchase centroid, scaled by the best co-purchase.
        let best = co.values().map(|v| v.0).fold(0.0f32, f32::max);
        if best > 0.0 {
            let mut centroid: Vec<f32> = Vec::new();
            for (sku, (score, _)) in &co {
                if let Some(v) = index.text_vector(sku) {
                    if centroid.is_empty() {
                        centroid = vec![0.0; v.len()];
                    }
                    centroid.iter_mut().zip(v).for_each(|(c, x)| *c += score * x);
                }
            }
            l2_normalize(&mut centroid);
            if !centroid.is_empty() {
                for (i, item) in index.items().iter().enumerate() {
                    if self.sales_of(&item.sku) > 0 || in_basket.contains(item.sku.as_str()) || !available(&item.sku) {
                        continue;
                    }
                    if let Some(v) = index.text_vector_at(i) {
                        let sim = dot(&centroid, v).max(0.0);
                        let score = COLD_START_WEIGHT * best * sim * sim;
                        if score > 0.0 {
                            out.push((
                                score,
                                i as u32,
                                Recommendation {
                                    sku: item.sku.clone(),
                                    name: item.name.clone(),
                                    score,
                                    bought_together: 0,
                                    reason: "similar_to_bought_together",
                                },
                            ));
                        }
                    }
                }
            }
        }
        top_k(&mut out, k, |o| o.0, |o| o.1);
        out.into_iter().map(|o| o.2).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::CatalogueItem;

    fn index(text: &[(&str, Vec<f32>)]) -> SearchIndex {
        let items = ["bread", "butter", "jam", "jam-new", "soap", "cheese"]
            .iter()
            .map(|s| CatalogueItem { sku: s.to_string(), name: s.to_string(), tags: vec![], stall: "s".into() })
            .collect();
        let text = text.iter().map(|(s, v)| (s.to_string(), v.clone())).collect();
        SearchIndex::build(items, 2, &text, &HashMap::new())
    }

    fn history() -> CoPurchase {
        let mut co = CoPurchase::default();
        for i in 0..10 {
            co.observe(&format!("a{i}"), ["bread", "butter"]);
        }
        for i in 0..3 {
            co.observe(&format!("b{i}"), ["bread", "jam"]);
        }
        co.observe("c0", ["soap"]);
        co
    }

    #[test]
    fn the_most_co_purchased_item_comes_first_and_the_basket_is_excluded() {
        let recs = history().recommend(&["bread".into()], &index(&[]), 5, |_| true);
        let skus: Vec<&str> = recs.iter().map(|r| r.sku.as_str()).collect();
        assert_eq!(skus, vec!["butter", "jam"]);
        assert_eq!(recs[0].bought_together, 10);
        assert!(recs[0].score > recs[1].score);
    }

    #[test]
    fn counting_a_sale_twice_changes_nothing() {
        let mut co = history();
        assert!(!co.observe("a0", ["bread", "butter"]));
        assert_eq!(co.sales_of("butter"), 10);
    }

    #[test]
    fn unavailable_products_are_not_offered() {
        let recs = history().recommend(&["bread".into()], &index(&[]), 5, |sku| sku != "butter");
        assert_eq!(recs.iter().map(|r| r.sku.as_str()).collect::<Vec<_>>(), vec!["jam"]);
    }

    #[test]
    fn a_new_product_like_a_co_purchased_one_is_offered_by_similarity() {
        let vectors = [
            ("butter", vec![1.0, 0.0]),
            ("jam", vec![0.0, 1.0]),
            ("jam-new", vec![0.0, 1.0]),
            ("soap", vec![-1.0, 0.0]),
            ("bread", vec![0.7, 0.7]),
        ];
        let recs = history().recommend(&["bread".into()], &index(&vectors), 5, |_| true);
        let new = recs.iter().find(|r| r.sku == "jam-new").expect("a product without sales is offered");
        assert_eq!(new.reason, "similar_to_bought_together");
        assert!(recs.iter().all(|r| r.sku != "soap"), "dissimilar and never bought with bread");
        assert_eq!(recs[0].sku, "butter", "real co-purchases still lead");
    }

    #[test]
    fn a_basket_item_without_sales_borrows_its_nearest_sold_neighbour() {
        let vectors = [("bread", vec![1.0, 0.0]), ("cheese", vec![0.95, 0.31]), ("butter", vec![0.0, 1.0]), ("jam", vec![0.0, 1.0])];
        // "cheese" has never sold; it resembles bread, so it gets bread's companions.
        let recs = history().recommend(&["cheese".into()], &index(&vectors), 5, |_| true);
        assert_eq!(recs.first().map(|r| r.sku.as_str()), Some("butter"));
    }
}
