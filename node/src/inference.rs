//! The node's inference service: keeps a search index and co-purchase counts in step with the
//! replicated catalogue and sales, and answers search and recommendation requests.
//!
//! It follows the node's commit pipeline with two subscribers: one counts each sale as its commit
//! arrives (no polling, no rescan of the day), the other indexes products and photos (which may
//! wait for the models), so a sale is never held up behind a catalogue import's embeddings. Each
//! says how far it has got ([`Inference::sales_progress`], [`Inference::catalogue_progress`]), so
//! a request can return only once what it recorded is counted or searchable.
//!
//! Models load in the background after the node starts; until then (or if a model is missing) search
//! is lexical and says so. Embeddings are computed on the inference pool in small batches, so a
//! catalogue import never holds up a customer's query for long, and cached in redb.

use crate::pipeline::{Commit, Progress};
use crate::runtime::Node;
use serde::Serialize;
use stallmesh_inference::cache::{cache_key, EmbeddingCache};
use stallmesh_inference::recommend::{CoPurchase, Recommendation};
use stallmesh_inference::search::{CatalogueItem, Hit, SearchIndex};
use stallmesh_inference::{Embedding, InferenceError, InferencePool, ModelStatus, Models};
use stallmesh_ledger::EventBody;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

// A configuration that passed its check starts a pool of that many workers (the pool clamps).
const _: () = assert!(crate::config::MAX_INFERENCE_WORKERS <= stallmesh_inference::pool::MAX_WORKERS);

/// When embedding could not finish (the pool was busy with customers' queries), try again after
/// this long: a query takes 3–6 ms, so the queue has drained by then.
pub const EMBED_RETRY_MS: u64 = 250;
/// Longest a request waits for the index to take in what it recorded before answering anyway
/// (its write is durable either way): a product's text embeds in 3–6 ms and a photo in tens of
/// ms, so this is only reached when the pool is swamped or models are still loading.
pub const INDEX_WAIT_MS: u64 = 2_000;
/// Products embedded per pool job: 30–60 ms of work (3–6 ms each, `cargo bench --bench inference`),
/// so a query queued behind a catalogue import waits for at most one batch.
pub const EMBED_BATCH: usize = 10;
/// Longest search query accepted.
pub const MAX_QUERY_BYTES: usize = 256;
/// Query embeddings remembered: staff search the same few words all day ("honey", "sourdough"), and
/// a remembered query skips the model (~3–6 ms). 512 × 1.5 KB = 0.8 MB.
pub const QUERY_CACHE_ENTRIES: usize = 512;

/// Query → embedding, and the queries in insertion order for eviction.
type QueryCache = (HashMap<String, Arc<Embedding>>, std::collections::VecDeque<String>);

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Readiness {
    Off,
    Loading,
    Ready,
}

/// Derived state kept next to the ledger; rebuilt from it, never persisted except the embedding cache.
pub struct Inference {
    pool: OnceLock<Arc<InferencePool>>,
    statuses: RwLock<Vec<ModelStatus>>,
    readiness: RwLock<Readiness>,
    index: RwLock<Arc<SearchIndex>>,
    co_purchase: RwLock<CoPurchase>,
    cache: Option<EmbeddingCache>,
    /// sku → (cache key, embedding) of what is in the index now.
    text_vectors: Mutex<HashMap<String, ([u8; 32], Embedding)>>,
    photo_vectors: Mutex<HashMap<String, ([u8; 32], Embedding)>>,
    catalogue_seen: Mutex<Option<u64>>,
    /// Recent query embeddings, oldest first (evicted first).
    query_cache: Mutex<QueryCache>,
    pub treatment_percent: u8,
    /// Commits taken in by the sales counter, and by the catalogue indexer (as far as the models allow).
    sales_progress: Progress,
    catalogue_progress: Progress,
    models_loaded: tokio::sync::Notify,
}

impl Inference {
    pub fn new(cache_path: PathBuf, treatment_percent: u8) -> Inference {
        let cache = match EmbeddingCache::open(&cache_path) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "embedding cache unavailable; embeddings are recomputed at every start");
                None
            }
        };
        Inference {
            pool: OnceLock::new(),
            statuses: RwLock::new(Vec::new()),
            readiness: RwLock::new(Readiness::Loading),
            index: RwLock::new(Arc::new(SearchIndex::default())),
            co_purchase: RwLock::new(CoPurchase::default()),
            cache,
            text_vectors: Mutex::default(),
            photo_vectors: Mutex::default(),
            catalogue_seen: Mutex::new(None),
            query_cache: Mutex::default(),
            treatment_percent,
            sales_progress: Progress::default(),
            catalogue_progress: Progress::default(),
            models_loaded: tokio::sync::Notify::new(),
        }
    }

    /// Installs the loaded models (or none) and starts the pool.
    pub fn set_models(&self, models: Models, workers: usize, queue_len: usize, enabled: bool) {
        *self.statuses.write().expect("statuses lock") = models.status.clone();
        let pool = Arc::new(InferencePool::new(Arc::new(models), workers, queue_len));
        let _ = self.pool.set(pool);
        *self.readiness.write().expect("readiness lock") = if enabled { Readiness::Ready } else { Readiness::Off };
        // Force a rebuild with the models now present.
        *self.catalogue_seen.lock().expect("catalogue lock") = None;
        self.models_loaded.notify_one();
    }

    /// How far along the commit pipeline the co-purchase counts are.
    pub fn sales_progress(&self) -> &Progress {
        &self.sales_progress
    }

    /// How far along the commit pipeline the search index is.
    pub fn catalogue_progress(&self) -> &Progress {
        &self.catalogue_progress
    }

    pub fn pool(&self) -> Option<&Arc<InferencePool>> {
        self.pool.get()
    }

    pub fn readiness(&self) -> Readiness {
        *self.readiness.read().expect("readiness lock")
    }

    pub fn statuses(&self) -> Vec<ModelStatus> {
        self.statuses.read().expect("statuses lock").clone()
    }

    pub fn index(&self) -> Arc<SearchIndex> {
        self.index.read().expect("index lock").clone()
    }

    /// The query's text embedding, from the recent-query cache or the model. `None` without a text
    /// model; `Ok((vector, cached))` otherwise.
    pub async fn query_vector(&self, query: &str) -> Result<Option<(Arc<Embedding>, bool)>, InferenceError> {
        let Some(pool) = self.pool().filter(|p| p.models().text.is_some()) else { return Ok(None) };
        // Case and spacing do not change the embedding (the tokenizer is uncased).
        let key = query.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
        if let Some(v) = self.query_cache.lock().expect("query cache lock").0.get(&key) {
            return Ok(Some((v.clone(), true)));
        }
        let v = Arc::new(pool.embed_text(key.clone()).await?);
        let mut cache = self.query_cache.lock().expect("query cache lock");
        let (map, order) = &mut *cache;
        if map.insert(key.clone(), v.clone()).is_none() {
            order.push_back(key);
            while order.len() > QUERY_CACHE_ENTRIES {
                if let Some(old) = order.pop_front() {
                    map.remove(&old);
                }
            }
        }
        Ok(Some((v, false)))
    }

    /// Counts the sales of one commit.
    fn count_sales(&self, commit: &Commit) {
        let mut co = None;
        for e in &commit.entries {
            if let EventBody::Sold { lines, .. } = &e.event.body {
                let co = co.get_or_insert_with(|| self.co_purchase.write().expect("co-purchase lock"));
                co.observe(&stallmesh_ledger::sale_id(e.change.dot()), lines.iter().map(|l| l.sku.as_str()));
            }
        }
    }

    /// Rebuilds the search index if the catalogue changed since the last complete rebuild (at
    /// start, after a product or photo commit, when the models arrive).
    /// False if some embeddings could not be made now (a retry is due).
    async fn refresh_catalogue(&self, node: &Node) -> bool {
        let version = node.read(|l| l.state().catalogue_changes);
        if *self.catalogue_seen.lock().expect("catalogue lock") == Some(version) {
            return true;
        }
        let started = Instant::now();
        let image_model = self.pool().and_then(|p| p.models().image.as_ref().map(|i| i.model_id()));
        let (items, photos) = node.read(|l| {
            let s = l.state();
            let items: Vec<CatalogueItem> = s
                .products
                .values()
                .map(|p| CatalogueItem {
                    sku: p.product.sku.clone(),
                    name: p.product.name.clone(),
                    tags: p.product.tags.clone(),
                    stall: p.product.stall.clone(),
                })
                .collect();
            // A photo event is immutable and identified by (author, lamport): key it by that, and copy
            // its bytes out of the ledger only when its embedding is not already in the index.
            let have = self.photo_vectors.lock().expect("vectors lock");
            let photos: Vec<(String, [u8; 32], Option<Vec<u8>>)> = match image_model {
                None => Vec::new(),
                Some(model_id) => s
                    .photos
                    .iter()
                    .map(|(sku, p)| {
                        let mut id = Vec::with_capacity(sku.len() + 40);
                        id.extend_from_slice(sku.as_bytes());
                        id.extend_from_slice(&p.author.0);
                        id.extend_from_slice(&p.lamport.to_le_bytes());
                        let key = cache_key(&model_id, &id);
                        let bytes = (have.get(sku).map(|(k, _)| *k) != Some(key)).then(|| p.jpeg.clone());
                        (sku.clone(), key, bytes)
                    })
                    .collect(),
            };
            (items, photos)
        });
        // One rebuild, after embedding: a request that added a product waits for this anyway.
        let complete = self.embed_missing(&items, photos).await;
        self.rebuild(&items);
        if complete {
            *self.catalogue_seen.lock().expect("catalogue lock") = Some(version);
        }
        let index = self.index();
        tracing::info!(
            products = index.len(),
            embedded = index.embedded(),
            with_photo = index.with_photo(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "search index rebuilt"
        );
        complete
    }

    /// Counts every sale not counted yet (at start, and after falling behind the pipeline).
    fn refresh_sales(&self, node: &Node) {
        let counted = self.co_purchase.read().expect("co-purchase lock").sales_counted();
        if node.read(|l| l.state().sales.len()) == counted {
            return;
        }
        // Sales only grow. Copy out the new ones, then count them without holding the ledger lock
        // (`recommend` takes the two locks in the other order).
        let fresh: Vec<(String, Vec<String>)> = {
            let co = self.co_purchase.read().expect("co-purchase lock");
            node.read(|l| {
                l.state()
                    .sales
                    .iter()
                    .filter(|(id, _)| !co.has_counted(id))
                    .map(|(id, sale)| (id.clone(), sale.lines.iter().map(|line| line.sku.clone()).collect()))
                    .collect()
            })
        };
        let mut co = self.co_purchase.write().expect("co-purchase lock");
        for (id, skus) in &fresh {
            co.observe(id, skus.iter().map(String::as_str));
        }
    }

    fn rebuild(&self, items: &[CatalogueItem]) {
        let text: HashMap<String, Embedding> =
            self.text_vectors.lock().expect("vectors lock").iter().map(|(k, (_, v))| (k.clone(), v.clone())).collect();
        let photos: HashMap<String, Embedding> =
            self.photo_vectors.lock().expect("vectors lock").iter().map(|(k, (_, v))| (k.clone(), v.clone())).collect();
        let dim = self.pool().and_then(|p| p.models().text.as_ref().map(|t| t.dim())).unwrap_or(0);
        let index = SearchIndex::build(items.to_vec(), dim, &text, &photos);
        *self.index.write().expect("index lock") = Arc::new(index);
    }

    /// Embeds products and photos whose content changed, from the cache where possible. Returns
    /// false if some could not be embedded now (the pool was busy), so the next refresh retries.
    async fn embed_missing(&self, items: &[CatalogueItem], photos: Vec<(String, [u8; 32], Option<Vec<u8>>)>) -> bool {
        let Some(pool) = self.pool().cloned() else { return false };
        let mut complete = true;
        if let Some(text) = pool.models().text.as_ref() {
            let model_id = text.model_id();
            let wanted: Vec<(String, [u8; 32], String)> = items
                .iter()
                .map(|it| {
                    let t = it.embedding_text();
                    (it.sku.clone(), cache_key(&model_id, t.as_bytes()), t)
                })
                .collect();
            complete &= self.fill(&pool, &self.text_vectors, wanted, |m, t: &String| m.text.as_ref().map(|e| e.embed(t))).await;
        }
        if pool.models().image.is_some() {
            // Bytes are absent only for photos already embedded, which `fill` skips.
            let embed = |m: &Models, j: &Option<Vec<u8>>| j.as_ref().and_then(|j| m.image.as_ref().map(|e| e.embed(j)));
            complete &= self.fill(&pool, &self.photo_vectors, photos, embed).await;
        }
        complete
    }

    async fn fill<C: Send + Sync + 'static>(
        &self,
        pool: &Arc<InferencePool>,
        vectors: &Mutex<HashMap<String, ([u8; 32], Embedding)>>,
        wanted: Vec<(String, [u8; 32], C)>,
        embed: fn(&Models, &C) -> Option<Result<Embedding, InferenceError>>,
    ) -> bool {
        let mut missing = Vec::new();
        {
            let mut have = vectors.lock().expect("vectors lock");
            let keep: std::collections::HashSet<&String> = wanted.iter().map(|w| &w.0).collect();
            have.retain(|sku, _| keep.contains(sku));
            for (sku, key, content) in wanted {
                if have.get(&sku).is_some_and(|(k, _)| *k == key) {
                    continue;
                }
                match self.cache.as_ref().map(|c| c.get(&key)) {
                    Some(Ok(Some(v))) => {
                        have.insert(sku, (key, v));
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "embedding cache read failed");
                        missing.push((sku, key, content));
                    }
                    _ => missing.push((sku, key, content)),
                }
            }
        }
        let mut complete = true;
        let mut remaining = missing.into_iter().peekable();
        while remaining.peek().is_some() {
            let batch: Vec<(String, [u8; 32], C)> = remaining.by_ref().take(EMBED_BATCH).collect();
            let result = pool
                .run(move |m| {
                    Ok(batch
                        .into_iter()
                        .map(|(sku, key, content)| {
                            let r = embed(m, &content).unwrap_or(Err(InferenceError::ModelUnavailable("embedding")));
                            (sku, key, r)
                        })
                        .collect::<Vec<_>>())
                })
                .await;
            match result {
                Ok(done) => {
                    let mut fresh = Vec::new();
                    let mut have = vectors.lock().expect("vectors lock");
                    for (sku, key, r) in done {
                        match r {
                            Ok(v) => {
                                fresh.push((key, v.clone()));
                                have.insert(sku, (key, v));
                            }
                            // A photo that cannot be decoded stays without an embedding; it is not retried.
                            Err(e) => tracing::warn!(sku, error = %e, "cannot embed; product stays lexical-only"),
                        }
                    }
                    drop(have);
                    if let Some(Err(e)) = self.cache.as_ref().map(|c| c.put_many(&fresh)) {
                        tracing::warn!(error = %e, "embedding cache write failed");
                    }
                }
                Err(InferenceError::QueueFull(_)) => {
                    // Customers' queries come first; the rest is embedded on a later refresh.
                    complete = false;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "embedding batch failed");
                    complete = false;
                    break;
                }
            }
        }
        complete
    }

    /// Which arm of the recommendation experiment a customer session is in: a stable hash, so the
    /// same session always sees the same arm on this device.
    pub fn arm(&self, device: &str, session: &str) -> &'static str {
        use sha2::Digest;
        let h = sha2::Sha256::new().chain_update(device.as_bytes()).chain_update([0]).chain_update(session.as_bytes()).finalize();
        if u16::from_le_bytes([h[0], h[1]]) % 100 < u16::from(self.treatment_percent) {
            "treatment"
        } else {
            "control"
        }
    }

    pub fn recommend(&self, node: &Node, basket: &[String], k: usize) -> Vec<Recommendation> {
        let index = self.index();
        let co = self.co_purchase.read().expect("co-purchase lock");
        node.read(|l| co.recommend(basket, &index, k, |sku| l.state().stock(sku).total > 0))
    }

    pub fn search(&self, query: &str, vector: Option<&[f32]>, k: usize) -> Vec<Hit> {
        self.index().search(query, vector, k)
    }
}

/// Loads the models off the executor; meanwhile and after, follows the commit pipeline to keep the
/// index in step with the ledger until the node stops.
pub fn start(node: &Node, config: &crate::Config) -> Arc<Inference> {
    let settings = config.inference.clone();
    let inference = Arc::new(Inference::new(config.embeddings_path(), settings.treatment_percent));
    let dir = config.resolved_models_dir();
    let task = inference.clone();
    tokio::spawn(async move {
        let models = if settings.enabled {
            let d = dir.clone();
            tokio::task::spawn_blocking(move || Models::load(&d)).await.unwrap_or_else(|e| Models::none(&e.to_string()))
        } else {
            Models::none("inference disabled by configuration")
        };
        tracing::info!(models_dir = %dir.display(), loaded = ?models.status.iter().filter(|s| s.loaded).map(|s| s.name).collect::<Vec<_>>(), "inference ready");
        task.set_models(models, settings.workers, settings.queue_len, settings.enabled);
    });
    tokio::spawn(follow(inference.clone(), node.clone(), Follower::Sales));
    tokio::spawn(follow(inference.clone(), node.clone(), Follower::Catalogue));
    inference
}

/// What one subscriber does with the commits it takes in.
enum Follower {
    Sales,
    Catalogue,
}

/// A subscriber: takes in commits as they come (all that are queued at once), then, for the
/// catalogue, rebuilds the index once when a product or photo changed, when the models arrive, or
/// when a busy pool left embeddings to retry. Falling behind the pipeline means recounting (or
/// reindexing) from the ledger.
async fn follow(inference: Arc<Inference>, node: Node, role: Follower) {
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};
    let (label, progress) = match role {
        Follower::Sales => ("inference_sales", inference.sales_progress.clone()),
        Follower::Catalogue => ("inference_catalogue", inference.catalogue_progress.clone()),
    };
    let (mut commits, through) = node.subscribe();
    let mut retry_at = match role {
        Follower::Sales => {
            inference.refresh_sales(&node);
            None
        }
        Follower::Catalogue => (!inference.refresh_catalogue(&node).await).then(retry_deadline),
    };
    progress.done_through(through);
    let take_in = |c: &Commit, catalogue: &mut bool| match role {
        Follower::Sales => inference.count_sales(c),
        Follower::Catalogue => {
            *catalogue |=
                c.entries.iter().any(|e| matches!(e.event.body, EventBody::ProductUpserted { .. } | EventBody::PhotoAttached { .. }))
        }
    };
    loop {
        let mut catalogue = false;
        let mut last = None;
        let mut lagged = 0;
        tokio::select! {
            commit = commits.recv() => match commit {
                Ok(c) => {
                    take_in(&c, &mut catalogue);
                    last = Some(c.number);
                    loop {
                        match commits.try_recv() {
                            Ok(c) => {
                                take_in(&c, &mut catalogue);
                                last = Some(c.number);
                            }
                            Err(TryRecvError::Empty) => break,
                            Err(TryRecvError::Lagged(n)) => { lagged += n; break }
                            Err(TryRecvError::Closed) => return,
                        }
                    }
                }
                Err(RecvError::Lagged(n)) => lagged += n,
                Err(RecvError::Closed) => return, // the node is gone
            },
            _ = inference.models_loaded.notified(), if matches!(role, Follower::Catalogue) => catalogue = true,
            _ = sleep_until(retry_at), if retry_at.is_some() => catalogue = true,
        }
        if lagged > 0 {
            tracing::warn!(missed = lagged, subscriber = label, "fell behind the commit pipeline; catching up from the ledger");
            node.metrics.pipeline_lagged.get_or_create(&crate::metrics::Subscriber { subscriber: label }).inc_by(lagged);
            match role {
                Follower::Sales => inference.refresh_sales(&node),
                Follower::Catalogue => catalogue = true,
            }
        }
        if catalogue {
            let complete = inference.refresh_catalogue(&node).await;
            // Without a pool the models are still loading: their arrival triggers the rebuild.
            retry_at = (!complete && inference.pool().is_some()).then(retry_deadline);
        }
        if let Some(n) = last {
            progress.done_through(n);
        }
    }
}

fn retry_deadline() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_millis(EMBED_RETRY_MS)
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
