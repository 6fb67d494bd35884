//! The text and image embedders, loaded once from pinned files.

use crate::manifest::{FileError, Manifest};
use crate::vision::{decode_image, model_input, MODEL_SIDE};
use crate::{l2_normalize, Embedding, InferenceError};
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tokenizers::{Tokenizer, TruncationParams};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::dims;

/// Longest text embedded, in tokens: the model was trained on at most 128 (longer input is cut).
pub const MAX_TEXT_TOKENS: usize = 128;
/// Longest text accepted at all, in bytes, before tokenising.
pub const MAX_TEXT_BYTES: usize = 2_048;

type Plan = Arc<TypedRunnableModel>;

/// Whether one model is usable, and if not, why — shown on `/healthz`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ModelStatus {
    pub name: &'static str,
    pub file: String,
    pub loaded: bool,
    /// sha256 of the model file (hex) when loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_ms: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{file}: not a usable model: {reason}")]
    Model { file: String, reason: String },
}

pub struct TextEmbedder {
    plan: Plan,
    tokenizer: Tokenizer,
    /// Identifies the model + tokenizer pair, so cached embeddings from another model are never reused.
    model_id: [u8; 32],
    /// sha256 of the model file alone, as pinned in the manifest.
    file_sha256: [u8; 32],
    dim: usize,
}

pub struct ImageEmbedder {
    plan: Plan,
    model_id: [u8; 32],
    dim: usize,
}

fn model_err(file: &str, e: impl std::fmt::Display) -> LoadError {
    LoadError::Model { file: file.to_string(), reason: format!("{e:#}") }
}

/// A model must run once at load and give the manifest's number of dimensions.
fn check_probe(file: &str, probe: Result<Embedding, InferenceError>, dim: usize) -> Result<(), LoadError> {
    let probe = probe.map_err(|e| model_err(file, e))?;
    if probe.len() != dim {
        return Err(model_err(file, format!("embedding has {} dimensions, manifest says {dim}", probe.len())));
    }
    Ok(())
}

impl TextEmbedder {
    pub fn load(manifest: &Manifest, dir: &Path) -> Result<TextEmbedder, LoadError> {
        let entry = &manifest.text;
        let (model_bytes, model_sha) = entry.model.read_verified(dir)?;
        let (tok_bytes, tok_sha) = entry.tokenizer.read_verified(dir)?;
        let mut tokenizer = Tokenizer::from_bytes(&tok_bytes).map_err(|e| model_err(&entry.tokenizer.file, e))?;
        // The shipped tokenizer pads every input to 128 tokens: a 7-token query would cost 18x more.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: MAX_TEXT_TOKENS, ..Default::default() }))
            .map_err(|e| model_err(&entry.tokenizer.file, e))?;
        let file = entry.model.file.as_str();
        let load = || -> TractResult<Plan> {
            let model =
                tract_onnx::onnx().with_ignore_output_shapes(true).with_ignore_value_info(true).model_for_read(&mut &model_bytes[..])?;
            let s = model.sym("S");
            let model = model
                .with_input_fact(0, i64::fact(dims!(1, s)).into())?
                .with_input_fact(1, i64::fact(dims!(1, s)).into())?
                .with_input_fact(2, i64::fact(dims!(1, s)).into())?;
            model.into_optimized()?.into_runnable()
        };
        let plan = load().map_err(|e| model_err(file, e))?;
        let mut id = sha2::Sha256::default();
        sha2::Digest::update(&mut id, model_sha);
        sha2::Digest::update(&mut id, tok_sha);
        let embedder =
            TextEmbedder { plan, tokenizer, model_id: sha2::Digest::finalize(id).into(), file_sha256: model_sha, dim: entry.dim };
        // A wrong graph (say, a different model under the pinned name) shows here, not on the first query.
        check_probe(file, embedder.embed("probe"), entry.dim)?;
        Ok(embedder)
    }

    pub fn model_id(&self) -> [u8; 32] {
        self.model_id
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The token ids the model sees for `text` (used to feed another runtime identical input).
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>, InferenceError> {
        Ok(self.tokenizer.encode(text, true).map_err(|e| InferenceError::InvalidInput(e.to_string()))?.get_ids().to_vec())
    }

    /// The sentence embedding of `text`: mean of the token states under the attention mask, unit length.
    pub fn embed(&self, text: &str) -> Result<Embedding, InferenceError> {
        if text.len() > MAX_TEXT_BYTES {
            return Err(InferenceError::InvalidInput(format!("text is {} bytes; at most {MAX_TEXT_BYTES}", text.len())));
        }
        let started = Instant::now();
        let enc = self.tokenizer.encode(text, true).map_err(|e| InferenceError::InvalidInput(e.to_string()))?;
        let n = enc.get_ids().len();
        let as_i64 = |v: &[u32]| v.iter().map(|&x| i64::from(x)).collect::<Vec<i64>>();
        let mask = as_i64(enc.get_attention_mask());
        let tensor = |v: Vec<i64>| Tensor::from_shape(&[1, n], &v).map(TValue::from);
        let run = || -> TractResult<Embedding> {
            let out = self.plan.run(tvec![tensor(as_i64(enc.get_ids()))?, tensor(mask.clone())?, tensor(as_i64(enc.get_type_ids()))?])?;
            let states = out[0].to_plain_array_view::<f32>()?;
            let states = states.into_shape_with_order((n, self.dim))?;
            let mut pooled = vec![0.0f32; self.dim];
            let mut weight = 0.0f32;
            for (t, row) in states.outer_iter().enumerate() {
                if mask[t] == 0 {
                    continue;
                }
                weight += 1.0;
                pooled.iter_mut().zip(row.iter()).for_each(|(p, x)| *p += x);
            }
            if weight > 0.0 {
                pooled.iter_mut().for_each(|p| *p /= weight);
            }
            l2_normalize(&mut pooled);
            Ok(pooled)
        };
        let v = run().map_err(|e| InferenceError::Run(format!("{e:#}")))?;
        tracing::debug!(tokens = n, elapsed_us = started.elapsed().as_micros() as u64, "text embedded");
        Ok(v)
    }
}

impl ImageEmbedder {
    pub fn load(manifest: &Manifest, dir: &Path) -> Result<ImageEmbedder, LoadError> {
        let entry = &manifest.image;
        let (bytes, sha) = entry.model.read_verified(dir)?;
        let file = entry.model.file.as_str();
        let side = MODEL_SIDE as usize;
        let load = || -> TractResult<Plan> {
            tract_onnx::onnx()
                .with_ignore_output_shapes(true)
                .with_ignore_value_info(true)
                .model_for_read(&mut &bytes[..])?
                .with_input_fact(0, f32::fact([1, 3, side, side]).into())?
                .into_optimized()?
                .into_runnable()
        };
        let plan = load().map_err(|e| model_err(file, e))?;
        let embedder = ImageEmbedder { plan, model_id: sha, dim: entry.dim };
        check_probe(file, embedder.embed_input(vec![0.0; 3 * side * side]), entry.dim)?;
        Ok(embedder)
    }

    pub fn model_id(&self) -> [u8; 32] {
        self.model_id
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The image embedding of a JPEG or PNG photo, unit length.
    pub fn embed(&self, photo: &[u8]) -> Result<Embedding, InferenceError> {
        let started = Instant::now();
        let img = decode_image(photo)?;
        let decoded_us = started.elapsed().as_micros() as u64;
        let v = self.embed_input(model_input(&img))?;
        tracing::debug!(decoded_us, elapsed_us = started.elapsed().as_micros() as u64, "image embedded");
        Ok(v)
    }

    /// Embeds an already decoded photo (used by benchmarks to time the model alone).
    pub fn embed_rgb(&self, img: &image::RgbImage) -> Result<Embedding, InferenceError> {
        self.embed_input(model_input(img))
    }

    fn embed_input(&self, input: Vec<f32>) -> Result<Embedding, InferenceError> {
        let side = MODEL_SIDE as usize;
        let run = || -> TractResult<Embedding> {
            let t = Tensor::from_shape(&[1, 3, side, side], &input)?;
            let out = self.plan.run(tvec![t.into()])?;
            let mut v: Vec<f32> = out[0].to_plain_array_view::<f32>()?.iter().copied().collect();
            l2_normalize(&mut v);
            Ok(v)
        };
        run().map_err(|e| InferenceError::Run(format!("{e:#}")))
    }
}

/// Both embedders, each present only if its pinned files loaded.
pub struct Models {
    pub text: Option<TextEmbedder>,
    pub image: Option<ImageEmbedder>,
    pub status: Vec<ModelStatus>,
}

impl Models {
    /// Loads what it can from `dir`. Never fails: a missing or refused model is logged as a warning
    /// and reported in [`Models::status`], and the node runs without it.
    pub fn load(dir: &Path) -> Models {
        let manifest = Manifest::builtin();
        let started = Instant::now();
        let text = TextEmbedder::load(&manifest, dir);
        let text_ms = started.elapsed().as_millis() as u64;
        let started = Instant::now();
        let image = ImageEmbedder::load(&manifest, dir);
        let image_ms = started.elapsed().as_millis() as u64;
        let status = |name, file: &str, r: Result<[u8; 32], &LoadError>, ms| {
            let s = ModelStatus {
                name,
                file: file.to_string(),
                loaded: r.is_ok(),
                sha256: r.as_ref().ok().map(hex::encode),
                error: r.as_ref().err().map(|e| e.to_string()),
                load_ms: r.is_ok().then_some(ms),
            };
            match &s.error {
                Some(e) => tracing::warn!(model = name, error = %e, "model not loaded; running without it"),
                None => tracing::info!(model = name, load_ms = ms, "model loaded"),
            }
            s
        };
        let status = vec![
            status("text", &manifest.text.model.file, text.as_ref().map(|t| t.file_sha256), text_ms),
            status("image", &manifest.image.model.file, image.as_ref().map(|i| i.model_id), image_ms),
        ];
        Models { text: text.ok(), image: image.ok(), status }
    }

    /// No models at all (inference switched off): every search is lexical.
    pub fn none(reason: &str) -> Models {
        let manifest = Manifest::builtin();
        let off = |name, file: &str| ModelStatus {
            name,
            file: file.to_string(),
            loaded: false,
            sha256: None,
            error: Some(reason.to_string()),
            load_ms: None,
        };
        Models { text: None, image: None, status: vec![off("text", &manifest.text.model.file), off("image", &manifest.image.model.file)] }
    }
}
