//! On-device inference for a stallmesh node.
//!
//! - [`models`]: the pinned ONNX models (text and image embedders) loaded once in tract. A missing or
//!   mismatched file never stops the node: that model is simply absent and [`ModelStatus`] says why.
//! - [`pool`]: a bounded worker pool that runs the models off the async executor; a full queue is an
//!   error the caller sees at once.
//! - [`search`]: hybrid (semantic + lexical) product search and visual search over a catalogue index.
//! - [`recommend`]: "bought together" from co-occurrence in the market's replicated sales, blended with
//!   embedding similarity for products that have no sales yet.
//! - [`cache`]: a redb cache of embeddings keyed by model hash and content hash.
//!
//! `search` and `recommend` are plain data structures (no threads, no I/O), like the ledger.

pub mod cache;
pub mod manifest;
pub mod models;
pub mod pool;
pub mod recommend;
pub mod search;
mod vision;

pub use manifest::{FileEntry, Manifest, MANIFEST_TOML};
pub use models::{ImageEmbedder, ModelStatus, Models, TextEmbedder};
pub use pool::{InferencePool, PoolStats};
pub use vision::{decode_image, model_input, shrink_for_journal, ImageError, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS};

/// Why an inference request failed.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error("model {0} is not loaded")]
    ModelUnavailable(&'static str),
    #[error("inference queue is full ({0} requests waiting); try again shortly")]
    QueueFull(usize),
    #[error("inference pool has shut down")]
    PoolClosed,
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("model run failed: {0}")]
    Run(String),
}

/// A unit-length embedding. Cosine similarity of two is their dot product.
pub type Embedding = Vec<f32>;

/// Scales `v` to unit length (a zero vector stays zero).
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// Dot product; for unit vectors, the cosine similarity.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Four accumulators let the compiler vectorise without -ffast-math.
    let mut acc = [0.0f32; 4];
    let chunks = a.len() / 4 * 4;
    for i in (0..chunks).step_by(4) {
        acc[0] += a[i] * b[i];
        acc[1] += a[i + 1] * b[i + 1];
        acc[2] += a[i + 2] * b[i + 2];
        acc[3] += a[i + 3] * b[i + 3];
    }
    let mut s = acc[0] + acc[1] + acc[2] + acc[3];
    for i in chunks..a.len().min(b.len()) {
        s += a[i] * b[i];
    }
    s
}
