//! A redb cache of embeddings, so a restart does not recompute the catalogue's.
//!
//! Keyed by sha256(model id ‖ content): a new model or an edited product name simply misses. It is a
//! cache: a file that cannot be opened or read back is set aside (renamed `*.corrupt`, with a warning
//! naming it) and a fresh one started, because every entry can be recomputed.

use crate::Embedding;
use redb::{Database, ReadableDatabase, TableDefinition};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

const EMBEDDINGS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("embeddings");
/// Largest embedding stored: 4 bytes × 4,096 dimensions (ours are 384 and 1,280).
pub const MAX_CACHED_DIM: usize = 4_096;

#[derive(Debug, thiserror::Error)]
#[error("embedding cache {path}: {detail}")]
pub struct CacheError {
    pub path: PathBuf,
    pub detail: String,
}

pub struct EmbeddingCache {
    db: Database,
    path: PathBuf,
}

/// The cache key of `content` embedded by the model `model_id`.
pub fn cache_key(model_id: &[u8; 32], content: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(model_id);
    h.update((content.len() as u64).to_le_bytes());
    h.update(content);
    h.finalize().into()
}

impl EmbeddingCache {
    pub fn open(path: &Path) -> Result<EmbeddingCache, CacheError> {
        match Self::open_inner(path) {
            Ok(c) => Ok(c),
            // Only a file that is not a readable redb database is set aside; one that is merely in
            // use (another node on the same data directory) or unreadable for lack of rights is not.
            Err((true, e)) if path.exists() => {
                let aside = path.with_extension("redb.corrupt");
                tracing::warn!(path = %path.display(), error = %e.detail, moved_to = %aside.display(), "embedding cache unreadable; starting a fresh one");
                std::fs::rename(path, &aside)
                    .map_err(|r| CacheError { path: path.into(), detail: format!("{}; and cannot move it aside: {r}", e.detail) })?;
                Self::open_inner(path).map_err(|(_, e)| e)
            }
            Err((_, e)) => Err(e),
        }
    }

    /// On failure, also says whether the file itself is unreadable (so setting it aside is safe).
    fn open_inner(path: &Path) -> Result<EmbeddingCache, (bool, CacheError)> {
        let err = |e: &dyn std::fmt::Display| CacheError { path: path.into(), detail: e.to_string() };
        let db = Database::create(path).map_err(|e| {
            let unreadable = match &e {
                redb::DatabaseError::UpgradeRequired(_) => true,
                redb::DatabaseError::Storage(redb::StorageError::Corrupted(_)) => true,
                redb::DatabaseError::Storage(redb::StorageError::Io(io)) => {
                    matches!(io.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData)
                }
                _ => false,
            };
            (unreadable, err(&e))
        })?;
        let unreadable = |e: &dyn std::fmt::Display| (true, err(e));
        let tx = db.begin_write().map_err(|e| unreadable(&e))?;
        tx.open_table(EMBEDDINGS).map_err(|e| unreadable(&e))?;
        tx.commit().map_err(|e| unreadable(&e))?;
        Ok(EmbeddingCache { db, path: path.into() })
    }

    fn err(&self, e: impl std::fmt::Display) -> CacheError {
        CacheError { path: self.path.clone(), detail: e.to_string() }
    }

    /// The cached embedding under `key`, if any. An entry of the wrong size reads as a miss.
    pub fn get(&self, key: &[u8; 32]) -> Result<Option<Embedding>, CacheError> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = tx.open_table(EMBEDDINGS).map_err(|e| self.err(e))?;
        let Some(v) = table.get(&key[..]).map_err(|e| self.err(e))? else { return Ok(None) };
        let bytes = v.value();
        if bytes.len() % 4 != 0 || bytes.len() / 4 > MAX_CACHED_DIM {
            return Ok(None);
        }
        Ok(Some(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()))
    }

    /// Stores a batch in one transaction. Not fsynced: losing recent entries to a power cut only
    /// costs recomputing them.
    pub fn put_many(&self, entries: &[([u8; 32], Embedding)]) -> Result<(), CacheError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut tx = self.db.begin_write().map_err(|e| self.err(e))?;
        tx.set_durability(redb::Durability::None).map_err(|e| self.err(e))?;
        {
            let mut table = tx.open_table(EMBEDDINGS).map_err(|e| self.err(e))?;
            for (key, v) in entries.iter().filter(|(_, v)| v.len() <= MAX_CACHED_DIM) {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                table.insert(&key[..], &bytes[..]).map_err(|e| self.err(e))?;
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    pub fn len(&self) -> Result<u64, CacheError> {
        use redb::ReadableTableMetadata;
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        tx.open_table(EMBEDDINGS).map_err(|e| self.err(e))?.len().map_err(|e| self.err(e))
    }

    pub fn is_empty(&self) -> Result<bool, CacheError> {
        Ok(self.len()? == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_reopening_and_another_model_misses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("embeddings.redb");
        let key = cache_key(&[1; 32], b"Organic honey 500g jar");
        {
            let cache = EmbeddingCache::open(&path).unwrap();
            cache.put_many(&[(key, vec![0.25, -1.5, 3.0])]).unwrap();
        }
        let cache = EmbeddingCache::open(&path).unwrap();
        assert_eq!(cache.get(&key).unwrap(), Some(vec![0.25, -1.5, 3.0]));
        assert_eq!(cache.get(&cache_key(&[2; 32], b"Organic honey 500g jar")).unwrap(), None);
    }

    #[test]
    fn a_corrupt_cache_file_is_set_aside_and_a_fresh_one_started() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("embeddings.redb");
        std::fs::write(&path, b"this is not a redb file at all, just some bytes").unwrap();
        let cache = EmbeddingCache::open(&path).unwrap();
        assert!(cache.is_empty().unwrap());
        assert!(dir.path().join("embeddings.redb.corrupt").exists(), "the unreadable file is kept for inspection");
    }

    #[test]
    fn a_cache_in_use_is_an_error_and_is_not_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("embeddings.redb");
        let _first = EmbeddingCache::open(&path).unwrap();
        assert!(EmbeddingCache::open(&path).is_err());
        assert!(path.exists() && !dir.path().join("embeddings.redb.corrupt").exists());
    }
}
