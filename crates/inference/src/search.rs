//! Product search over one device's copy of the catalogue: hybrid semantic + lexical for text, cosine
//! over photo embeddings for images. Plain data: build it, query it; no threads, no I/O.

use crate::{dot, Embedding};
use serde::Serialize;
use std::collections::{BTreeSet, HashMap};

/// Most hits one query returns.
pub const MAX_RESULTS: usize = 50;
/// Vocabulary words a partial query word may expand to ("hon" → "honey", "honeycomb", ...).
pub const MAX_PREFIX_EXPANSIONS: usize = 64;
/// Weight of the normalised lexical score against the cosine similarity (both in 0..=1).
pub const LEXICAL_WEIGHT: f32 = 0.35;
/// A product that shares no word with the query must be at least this similar to be listed, so a
/// query for something the market does not sell returns little rather than ten random products.
pub const MIN_SEMANTIC_ONLY: f32 = 0.30;
/// Boosts that put an exact SKU, then an exact name, above any similarity score.
const EXACT_SKU_BOOST: f32 = 10.0;
const EXACT_NAME_BOOST: f32 = 5.0;
// BM25 parameters (the usual values).
const BM25_K1: f32 = 1.2;
const BM25_B: f32 = 0.75;

/// What the index knows of one product.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogueItem {
    pub sku: String,
    pub name: String,
    pub tags: Vec<String>,
    pub stall: String,
}

impl CatalogueItem {
    /// The text whose embedding represents the product: its name and tags (not the stall: every
    /// product of a stall would otherwise drift towards the stall's name).
    pub fn embedding_text(&self) -> String {
        if self.tags.is_empty() {
            self.name.clone()
        } else {
            format!("{}. {}", self.name, self.tags.join(", "))
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Hit {
    pub sku: String,
    pub name: String,
    pub score: f32,
    /// Cosine similarity of the query and the product (text search with the model loaded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub semantic: Option<f32>,
    /// BM25 over name, tags, stall and SKU, scaled so the best lexical match of the query is 1.
    pub lexical: f32,
    /// `"sku"` or `"name"` when the query is exactly that.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact: Option<&'static str>,
}

/// Words too common in shoppers' phrasing to say anything about a product.
const STOP_WORDS: &[&str] = &["a", "an", "and", "for", "in", "of", "on", "or", "some", "something", "the", "to", "with"];

/// Lower-case words without stop words; a plural `s` is dropped so "jars" finds "jar".
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty() && !STOP_WORDS.iter().any(|s| w.eq_ignore_ascii_case(s)))
        .map(|w| {
            let w = w.to_lowercase();
            if w.len() > 3 && w.ends_with('s') && !w.ends_with("ss") {
                w[..w.len() - 1].to_string()
            } else {
                w
            }
        })
        .collect()
}

fn normalise(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

#[derive(Default)]
pub struct SearchIndex {
    items: Vec<CatalogueItem>,
    by_sku_lower: HashMap<String, u32>,
    by_name_lower: HashMap<String, Vec<u32>>,
    /// word → (item, weighted term frequency)
    postings: HashMap<String, Vec<(u32, f32)>>,
    vocabulary: BTreeSet<String>,
    doc_len: Vec<f32>,
    avg_doc_len: f32,
    text_dim: usize,
    /// Row i is item i's text embedding (zeros when it has none yet).
    text_vectors: Vec<f32>,
    has_text: Vec<bool>,
    /// (item, photo embedding) for every product with a photo.
    photos: Vec<(u32, Embedding)>,
}

impl SearchIndex {
    /// Builds the index. Items are ordered by SKU so results never depend on input order; embeddings
    /// of the wrong length are ignored (the product then falls back to lexical search).
    pub fn build(
        mut items: Vec<CatalogueItem>,
        text_dim: usize,
        text: &HashMap<String, Embedding>,
        photos: &HashMap<String, Embedding>,
    ) -> SearchIndex {
        items.sort_by(|a, b| a.sku.cmp(&b.sku));
        items.dedup_by(|a, b| a.sku == b.sku);
        let mut index = SearchIndex { text_dim, ..Default::default() };
        index.text_vectors = vec![0.0; items.len() * text_dim];
        index.has_text = vec![false; items.len()];
        for (i, item) in items.iter().enumerate() {
            let id = i as u32;
            index.by_sku_lower.insert(item.sku.to_lowercase(), id);
            index.by_name_lower.entry(normalise(&item.name)).or_default().push(id);
            // Name words count twice: a word in the name says more than a tag.
            let mut tf: HashMap<String, f32> = HashMap::new();
            for w in words(&item.name) {
                *tf.entry(w).or_default() += 2.0;
            }
            for tag in &item.tags {
                for w in words(tag) {
                    *tf.entry(w).or_default() += 1.0;
                }
            }
            for w in words(&item.stall) {
                *tf.entry(w).or_default() += 0.5;
            }
            *tf.entry(item.sku.to_lowercase()).or_default() += 1.0;
            index.doc_len.push(tf.values().sum());
            for (w, f) in tf {
                index.vocabulary.insert(w.clone());
                index.postings.entry(w).or_default().push((id, f));
            }
            if let Some(v) = text.get(&item.sku).filter(|v| v.len() == text_dim) {
                index.text_vectors[i * text_dim..(i + 1) * text_dim].copy_from_slice(v);
                index.has_text[i] = true;
            }
            if let Some(v) = photos.get(&item.sku) {
                index.photos.push((id, v.clone()));
            }
        }
        index.avg_doc_len = if items.is_empty() { 1.0 } else { index.doc_len.iter().sum::<f32>() / items.len() as f32 };
        index.items = items;
        index
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Products with a text embedding.
    pub fn embedded(&self) -> usize {
        self.has_text.iter().filter(|h| **h).count()
    }

    pub fn with_photo(&self) -> usize {
        self.photos.len()
    }

    pub fn item(&self, sku: &str) -> Option<&CatalogueItem> {
        self.position(sku).map(|i| &self.items[i])
    }

    pub fn items(&self) -> &[CatalogueItem] {
        &self.items
    }

    fn position(&self, sku: &str) -> Option<usize> {
        self.items.binary_search_by(|it| it.sku.as_str().cmp(sku)).ok()
    }

    /// The product's text embedding, if it has one.
    pub fn text_vector(&self, sku: &str) -> Option<&[f32]> {
        self.position(sku).and_then(|i| self.text_vector_at(i))
    }

    pub(crate) fn text_vector_at(&self, i: usize) -> Option<&[f32]> {
        self.has_text[i].then(|| &self.text_vectors[i * self.text_dim..(i + 1) * self.text_dim])
    }

    fn bm25(&self, query: &str) -> Vec<f32> {
        let mut scores = vec![0.0f32; self.items.len()];
        let n = self.items.len() as f32;
        let add = |word: &str, weight: f32, scores: &mut Vec<f32>| {
            let Some(list) = self.postings.get(word) else { return };
            let idf = ((n - list.len() as f32 + 0.5) / (list.len() as f32 + 0.5) + 1.0).ln();
            for &(doc, tf) in list {
                let len_norm = 1.0 - BM25_B + BM25_B * self.doc_len[doc as usize] / self.avg_doc_len;
                scores[doc as usize] += weight * idf * tf * (BM25_K1 + 1.0) / (tf + BM25_K1 * len_norm);
            }
        };
        for word in words(query) {
            if self.postings.contains_key(&word) {
                add(&word, 1.0, &mut scores);
            } else if word.len() >= 3 {
                // A word still being typed: every vocabulary word it begins, at a discount.
                let expansions: Vec<&String> =
                    self.vocabulary.range(word.clone()..).take_while(|w| w.starts_with(&word)).take(MAX_PREFIX_EXPANSIONS).collect();
                for w in expansions {
                    add(w, 0.8, &mut scores);
                }
            }
        }
        // An exact SKU typed in whatever case is one word in the postings; also match it whole.
        if let Some(&doc) = self.by_sku_lower.get(&query.trim().to_lowercase()) {
            scores[doc as usize] += 1.0;
        }
        scores
    }

    /// Top `k` products for `query`. With `query_vector` (the query's text embedding) the ranking is
    /// hybrid; without it (no text model), lexical only. An exact SKU, then an exact name, ranks first.
    pub fn search(&self, query: &str, query_vector: Option<&[f32]>, k: usize) -> Vec<Hit> {
        let k = k.min(MAX_RESULTS);
        if self.items.is_empty() || k == 0 || query.trim().is_empty() {
            return Vec::new();
        }
        let lexical = self.bm25(query);
        let max_lexical = lexical.iter().copied().fold(0.0f32, f32::max);
        let semantic_on = query_vector.is_some_and(|q| q.len() == self.text_dim);
        let exact_sku = self.by_sku_lower.get(&query.trim().to_lowercase()).copied();
        let exact_name: &[u32] = self.by_name_lower.get(&normalise(query)).map(Vec::as_slice).unwrap_or(&[]);
        // (score, item, semantic, lexical, exact)
        type Scored = (f32, u32, Option<f32>, f32, Option<&'static str>);
        let mut scored: Vec<Scored> = Vec::new();
        for (i, raw_lexical) in lexical.iter().enumerate() {
            let lex = if max_lexical > 0.0 { raw_lexical / max_lexical } else { 0.0 };
            let sem = match (semantic_on, query_vector, self.text_vector_at(i)) {
                (true, Some(q), Some(v)) => Some(dot(q, v)),
                _ => None,
            };
            let exact = if exact_sku == Some(i as u32) {
                Some("sku")
            } else if exact_name.contains(&(i as u32)) {
                Some("name")
            } else {
                None
            };
            let boost = match exact {
                Some("sku") => EXACT_SKU_BOOST,
                Some(_) => EXACT_NAME_BOOST,
                None => 0.0,
            };
            let relevant = lex > 0.0 || exact.is_some() || sem.is_some_and(|s| s >= MIN_SEMANTIC_ONLY);
            if !relevant {
                continue;
            }
            let score = sem.unwrap_or(0.0) + LEXICAL_WEIGHT * lex + boost;
            scored.push((score, i as u32, sem, lex, exact));
        }
        top_k(&mut scored, k, |s| s.0, |s| s.1);
        scored
            .into_iter()
            .map(|(score, i, semantic, lexical, exact)| {
                let item = &self.items[i as usize];
                Hit { sku: item.sku.clone(), name: item.name.clone(), score, semantic, lexical, exact }
            })
            .collect()
    }

    /// Top `k` products whose photo is most like `photo_vector` (an image embedding).
    pub fn search_image(&self, photo_vector: &[f32], k: usize) -> Vec<Hit> {
        let mut scored: Vec<(f32, u32)> =
            self.photos.iter().filter(|(_, v)| v.len() == photo_vector.len()).map(|(i, v)| (dot(photo_vector, v), *i)).collect();
        top_k(&mut scored, k.min(MAX_RESULTS), |s| s.0, |s| s.1);
        scored
            .into_iter()
            .map(|(score, i)| {
                let item = &self.items[i as usize];
                Hit { sku: item.sku.clone(), name: item.name.clone(), score, semantic: Some(score), lexical: 0.0, exact: None }
            })
            .collect()
    }
}

/// Keeps the `k` best by score (ties broken by item position, so results are deterministic), best first.
pub(crate) fn top_k<T>(v: &mut Vec<T>, k: usize, score: impl Fn(&T) -> f32, id: impl Fn(&T) -> u32) {
    let cmp = |a: &T, b: &T| score(b).total_cmp(&score(a)).then(id(a).cmp(&id(b)));
    if v.len() > k && k > 0 {
        v.select_nth_unstable_by(k - 1, cmp);
        v.truncate(k);
    }
    v.sort_by(cmp);
    v.truncate(k);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(sku: &str, name: &str, tags: &[&str]) -> CatalogueItem {
        CatalogueItem { sku: sku.into(), name: name.into(), tags: tags.iter().map(|t| t.to_string()).collect(), stall: "Stall".into() }
    }

    fn catalogue() -> Vec<CatalogueItem> {
        vec![
            item("HON-500", "Organic honey 500g jar", &["honey", "sweet"]),
            item("HON-COMB", "Honeycomb slab", &["honey"]),
            item("CHE-CHED", "Mature cheddar", &["cheese"]),
            item("BRD-SOUR", "Sourdough loaf", &["bread"]),
            item("JAR", "Honey", &["honey"]),
        ]
    }

    #[test]
    fn lexical_search_finds_words_plurals_and_partial_words() {
        let index = SearchIndex::build(catalogue(), 4, &HashMap::new(), &HashMap::new());
        let skus = |q: &str| index.search(q, None, 5).into_iter().map(|h| h.sku).collect::<Vec<_>>();
        assert_eq!(skus("cheddar"), vec!["CHE-CHED"]);
        assert_eq!(skus("sourdough loaves").first().map(String::as_str), Some("BRD-SOUR"));
        assert!(skus("jars").contains(&"HON-500".to_string()), "plural finds singular");
        assert!(skus("honeyc").contains(&"HON-COMB".to_string()), "a word being typed");
        assert!(skus("bicycle").is_empty(), "nothing shares a word: no results without a model");
    }

    #[test]
    fn an_exact_sku_then_an_exact_name_ranks_first() {
        let index = SearchIndex::build(catalogue(), 4, &HashMap::new(), &HashMap::new());
        let hits = index.search("jar", None, 5);
        assert_eq!((hits[0].sku.as_str(), hits[0].exact), ("JAR", Some("sku")));
        let hits = index.search("  HONEY ", None, 5);
        assert_eq!((hits[0].sku.as_str(), hits[0].exact), ("JAR", Some("name")));
        let hits = index.search("hon-500", None, 5);
        assert_eq!((hits[0].sku.as_str(), hits[0].exact), ("HON-500", Some("sku")));
    }

    #[test]
    fn with_embeddings_a_product_sharing_no_word_is_found_by_meaning() {
        let mut text = HashMap::new();
        // Toy 4-d "meanings": axis 0 = sweet things, axis 1 = dairy.
        text.insert("HON-500".to_string(), vec![1.0, 0.0, 0.0, 0.0]);
        text.insert("CHE-CHED".to_string(), vec![0.0, 1.0, 0.0, 0.0]);
        let index = SearchIndex::build(catalogue(), 4, &text, &HashMap::new());
        let hits = index.search("nectar", Some(&[0.9, 0.1, 0.0, 0.0]), 3);
        assert_eq!(hits[0].sku, "HON-500");
        assert!(hits.iter().all(|h| h.sku != "BRD-SOUR"), "no embedding and no shared word: not listed");
        // A vector of the wrong size is ignored rather than trusted.
        assert!(index.search("nectar", Some(&[1.0; 3]), 3).is_empty());
    }

    #[test]
    fn image_search_ranks_by_photo_similarity() {
        let mut photos = HashMap::new();
        photos.insert("HON-500".to_string(), vec![1.0, 0.0]);
        photos.insert("CHE-CHED".to_string(), vec![0.0, 1.0]);
        let index = SearchIndex::build(catalogue(), 4, &HashMap::new(), &photos);
        let hits = index.search_image(&[0.2, 0.9], 5);
        assert_eq!(hits.iter().map(|h| h.sku.as_str()).collect::<Vec<_>>(), vec!["CHE-CHED", "HON-500"]);
    }
}
