//! The model manifest: which files the node loads and the sha256 each must have.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The manifest shipped in `models/manifest.toml`, compiled in so that a file swapped on disk cannot
/// also swap its expected hash.
pub const MANIFEST_TOML: &str = include_str!("../../../models/manifest.toml");

#[derive(Debug, Clone, Deserialize)]
pub struct FileEntry {
    pub file: String,
    pub sha256: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TextSection {
    pub model: FileEntry,
    pub tokenizer: FileEntry,
    pub dim: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ImageSection {
    pub model: FileEntry,
    pub dim: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub text: TextSection,
    pub image: ImageSection,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum FileError {
    #[error("{path}: cannot read: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("{path}: sha256 {actual} does not match the manifest's {expected}; refusing to load it")]
    HashMismatch { path: PathBuf, expected: String, actual: String },
}

impl Manifest {
    pub fn builtin() -> Manifest {
        toml::from_str(MANIFEST_TOML).expect("models/manifest.toml is checked by a unit test")
    }
}

impl FileEntry {
    /// Reads the file under `dir` and checks its sha256. The returned bytes are the ones checked, so
    /// nothing can change between the check and the load.
    pub fn read_verified(&self, dir: &Path) -> Result<(Vec<u8>, [u8; 32]), FileError> {
        let path = dir.join(&self.file);
        let bytes = std::fs::read(&path).map_err(|e| FileError::Unreadable { path: path.clone(), reason: e.to_string() })?;
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        let actual = hex::encode(digest);
        if !actual.eq_ignore_ascii_case(&self.sha256) {
            return Err(FileError::HashMismatch { path, expected: self.sha256.clone(), actual });
        }
        Ok((bytes, digest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_manifest_parses_and_pins_every_file() {
        let m = Manifest::builtin();
        for e in [&m.text.model, &m.text.tokenizer, &m.image.model] {
            assert_eq!(e.sha256.len(), 64, "{} must be pinned by a full sha256", e.file);
        }
        assert_eq!((m.text.dim, m.image.dim), (384, 1280));
    }

    #[test]
    fn a_file_with_another_hash_is_refused_with_both_hashes_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("m.onnx"), b"not the model").unwrap();
        let entry = FileEntry { file: "m.onnx".into(), sha256: "00".repeat(32) };
        match entry.read_verified(dir.path()) {
            Err(FileError::HashMismatch { expected, actual, .. }) => {
                assert_eq!(expected, "00".repeat(32));
                assert_ne!(actual, expected);
            }
            other => panic!("expected a hash mismatch, got {other:?}"),
        }
        let missing = FileEntry { file: "absent.onnx".into(), sha256: "00".repeat(32) };
        assert!(matches!(missing.read_verified(dir.path()), Err(FileError::Unreadable { .. })));
    }
}
