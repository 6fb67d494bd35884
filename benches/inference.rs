//! On-device inference costs, on one core (tract runs single-threaded):
//!
//! - `text_embedding/N_tokens`: a query of N tokens through MiniLM (tokenise, run, mean-pool);
//! - `image_embedding/model`: EfficientNet-Lite0 on a decoded photo; `/jpeg`: decode + resize + model;
//! - `search_index/N`: hybrid scoring over N products for an embedded query; `recommend/N`: bought-
//!   together over N products and 100k sales;
//! - then, outside criterion, p50/p99 over 500 end-to-end searches (query embedding included) and
//!   recommendations at 10k products, and the same models in onnxruntime (PyPI, single-threaded, via
//!   `benches/onnxruntime_bench.py`) side by side with tract in this run, with their ratio.
//!
//! The 10k catalogue repeats the 153 real products of `tests/data/market-catalogue.json` with their
//! real embeddings slightly perturbed: scoring costs do not depend on the values.
//! Run: `cargo bench -p stallmesh-benches --bench inference`.

use criterion::{criterion_group, BenchmarkId, Criterion};
use stallmesh_inference::recommend::CoPurchase;
use stallmesh_inference::search::{CatalogueItem, SearchIndex};
use stallmesh_inference::{l2_normalize, Models};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const QUERIES: [&str; 10] = [
    "raw honey",
    "sourdough",
    "cheese for the grill",
    "french press",
    "shrimp",
    "vegan lunch",
    "woolly hat",
    "dog treats",
    "CER-MUG",
    "berries",
];

/// The repository root (this package lives in `benches/`): models and test data are there.
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("benches/ is inside the repository").to_path_buf()
}

fn models() -> &'static Models {
    static M: OnceLock<Models> = OnceLock::new();
    M.get_or_init(|| {
        let m = Models::load(&root().join("models"));
        assert!(m.text.is_some() && m.image.is_some(), "models must load: {:?}", m.status);
        m
    })
}

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn unit(&mut self) -> f32 {
        (self.next() % 20_001) as f32 / 10_000.0 - 1.0
    }
}

/// The real catalogue grown to `n` products, with embeddings.
fn catalogue(n: usize) -> (Vec<CatalogueItem>, HashMap<String, Vec<f32>>) {
    static BASE: OnceLock<Vec<(CatalogueItem, Vec<f32>)>> = OnceLock::new();
    let base = BASE.get_or_init(|| {
        let raw: Vec<serde_json::Value> =
            serde_json::from_slice(&std::fs::read(root().join("tests/data/market-catalogue.json")).unwrap()).unwrap();
        let text = models().text.as_ref().unwrap();
        raw.iter()
            .map(|p| {
                let item = CatalogueItem {
                    sku: p["sku"].as_str().unwrap().into(),
                    name: p["name"].as_str().unwrap().into(),
                    tags: p["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect(),
                    stall: p["stall"].as_str().unwrap().into(),
                };
                let v = text.embed(&item.embedding_text()).unwrap();
                (item, v)
            })
            .collect()
    });
    let mut rng = Lcg(7);
    let mut items = Vec::with_capacity(n);
    let mut vectors = HashMap::with_capacity(n);
    for i in 0..n {
        let (item, v) = &base[i % base.len()];
        let mut item = item.clone();
        if i >= base.len() {
            item.sku = format!("{}-{i}", item.sku);
            item.name = format!("{} (batch {})", item.name, i / base.len());
        }
        let mut v: Vec<f32> = v.iter().map(|x| x + 0.02 * rng.unit()).collect();
        l2_normalize(&mut v);
        vectors.insert(item.sku.clone(), v);
        items.push(item);
    }
    (items, vectors)
}

fn index(n: usize) -> SearchIndex {
    let (items, vectors) = catalogue(n);
    SearchIndex::build(items, 384, &vectors, &HashMap::new())
}

/// 100k sales of 1–4 products, skewed towards the first products of each stall.
fn history(index: &SearchIndex) -> CoPurchase {
    let mut rng = Lcg(11);
    let mut co = CoPurchase::default();
    let items = index.items();
    for s in 0..100_000 {
        let lines = 1 + (rng.next() % 4) as usize;
        let skus: Vec<&str> =
            (0..lines).map(|_| items[(rng.next() % 2_000).min(rng.next() % items.len() as u64) as usize].sku.as_str()).collect();
        co.observe(&format!("sale-{s}"), skus);
    }
    co
}

fn photo(name: &str) -> Vec<u8> {
    std::fs::read(root().join("models/images").join(name)).unwrap()
}

fn embeddings(c: &mut Criterion) {
    let m = models();
    let text = m.text.as_ref().unwrap();
    let image = m.image.as_ref().unwrap();
    // A typical POS query, and a longer sentence (token counts include [CLS] and [SEP]).
    for q in ["raw honey", "organic raw honey in a glass jar"] {
        let name = format!("text_embedding/{}_tokens", text.token_ids(q).unwrap().len());
        c.bench_function(&name, |b| b.iter(|| text.embed(q).unwrap()));
    }
    let decoded = stallmesh_inference::decode_image(&photo("coffee.png")).unwrap();
    c.bench_function("image_embedding/model", |b| b.iter(|| image.embed_rgb(&decoded).unwrap()));
    let jpeg = photo("coffee_aug.jpg");
    c.bench_function("image_embedding/jpeg", |b| b.iter(|| image.embed(&jpeg).unwrap()));
}

fn search_and_recommend(c: &mut Criterion) {
    let text = models().text.as_ref().unwrap();
    let queries: Vec<(&str, Vec<f32>)> = QUERIES.iter().map(|q| (*q, text.embed(q).unwrap())).collect();
    for n in [500usize, 10_000] {
        let index = index(n);
        let mut i = 0;
        c.bench_with_input(BenchmarkId::new("search_index", n), &index, |b, index| {
            b.iter(|| {
                i = (i + 1) % queries.len();
                index.search(queries[i].0, Some(&queries[i].1), 10)
            })
        });
        let co = history(&index);
        let baskets: Vec<Vec<String>> =
            (0..10).map(|k| vec![index.items()[k * 7].sku.clone(), index.items()[k * 11 + 3].sku.clone()]).collect();
        let mut j = 0;
        c.bench_with_input(BenchmarkId::new("recommend", n), &index, |b, index| {
            b.iter(|| {
                j = (j + 1) % baskets.len();
                co.recommend(&baskets[j], index, 5, |_| true)
            })
        });
    }
}

fn percentiles(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (ms(v[v.len() / 2]), ms(v[v.len() * 99 / 100]))
}

fn time_runs(runs: usize, mut f: impl FnMut(usize)) -> Vec<Duration> {
    for i in 0..runs / 10 {
        f(i);
    }
    (0..runs)
        .map(|i| {
            let t = Instant::now();
            f(i);
            t.elapsed()
        })
        .collect()
}

/// End-to-end latency percentiles, and tract against onnxruntime in the same run.
fn tails_and_onnxruntime() {
    let m = models();
    let text = m.text.as_ref().unwrap();
    let image = m.image.as_ref().unwrap();
    let index = index(10_000);
    let co = history(&index);
    let (p50, p99) = percentiles(time_runs(500, |i| {
        let q = QUERIES[i % QUERIES.len()];
        let v = text.embed(q).unwrap();
        std::hint::black_box(index.search(q, Some(&v), 10));
    }));
    println!("search end-to-end at 10k products (query embedding + hybrid scoring), 500 runs: p50 {p50:.2} ms, p99 {p99:.2} ms");
    let (p50, p99) = percentiles(time_runs(500, |i| {
        let basket = vec![index.items()[(i * 7) % 2_000].sku.clone()];
        std::hint::black_box(co.recommend(&basket, &index, 5, |_| true));
    }));
    println!("recommend at 10k products / 100k sales, 500 runs: p50 {p50:.2} ms, p99 {p99:.2} ms");

    let sentence = "organic raw honey in a glass jar";
    let ids = text.token_ids(sentence).unwrap();
    let decoded = stallmesh_inference::decode_image(&photo("coffee.png")).unwrap();
    let pixels = stallmesh_inference::model_input(&decoded);
    let (tract_text, _) = percentiles(time_runs(200, |_| {
        std::hint::black_box(text.embed(sentence).unwrap());
    }));
    let (tract_image, _) = percentiles(time_runs(100, |_| {
        std::hint::black_box(image.embed_rgb(&decoded).unwrap());
    }));
    let tensor = std::env::temp_dir().join(format!("stallmesh-bench-image-{}.f32", std::process::id()));
    std::fs::write(&tensor, pixels.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    let ids_arg = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let script = root().join("benches/onnxruntime_bench.py");
    let run =
        || std::process::Command::new("python3").arg(&script).arg(root().join("models")).arg(&ids_arg).arg(&tensor).arg("200").output();
    let has_ort = std::process::Command::new("python3").args(["-c", "import onnxruntime, numpy"]).status().is_ok_and(|s| s.success());
    if !has_ort {
        println!("installing onnxruntime from PyPI (benches/requirements.txt) for the comparison");
        let req = root().join("benches/requirements.txt");
        let _ = std::process::Command::new("python3").args(["-m", "pip", "install", "-q", "-r"]).arg(req).status();
    }
    match run() {
        Ok(out) if out.status.success() => {
            let ort: serde_json::Value = serde_json::from_slice(&out.stdout).expect("script prints JSON");
            let (ot, oi) = (ort["text_ms_median"].as_f64().unwrap(), ort["image_ms_median"].as_f64().unwrap());
            println!(
                "text embedding ({} tokens): tract {tract_text:.2} ms vs onnxruntime {} {ot:.2} ms median: tract/onnxruntime = {:.2}x",
                ids.len(),
                ort["onnxruntime"].as_str().unwrap_or("?"),
                tract_text / ot
            );
            println!("image embedding (224x224): tract {tract_image:.2} ms vs onnxruntime {oi:.2} ms median: tract/onnxruntime = {:.2}x", tract_image / oi);
        }
        other => println!(
            "SKIPPED the onnxruntime comparison: python3 with onnxruntime and numpy is needed ({:?}); tract alone: text {tract_text:.2} ms, image {tract_image:.2} ms",
            other.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        ),
    }
    let _ = std::fs::remove_file(&tensor);
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(40).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = embeddings, search_and_recommend
}

fn main() {
    benches();
    tails_and_onnxruntime();
    Criterion::default().configure_from_args().final_summary();
}
