//! Embedding caches: a set of embeddings is stored as a float32 .npy named by a 64-bit hash of
//! the model (config.json and every weight file, byte for byte), the kind of input, the
//! preprocessing or context length, and the inputs' contents (image file bytes, caption text), so
//! a repeated evaluation loads instead of recomputing and any change of model or data misses.
//! Location: `--cache-dir`, else `$XDG_CACHE_HOME/clipforge/embeddings`, else
//! `~/.cache/clipforge/embeddings`. Writes are atomic; an unreadable entry is recomputed.
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// A streaming 64-bit hash (8 bytes per step, multiply–xorshift mixing; not cryptographic).
#[derive(Clone)]
pub struct Hasher(u64);

impl Default for Hasher {
    fn default() -> Self {
        Hasher(0x243F_6A88_85A3_08D3)
    }
}

impl Hasher {
    fn mix(&mut self, v: u64) {
        let x = (self.0 ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = x ^ (x >> 29) ^ (x << 17);
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        let mut ch = b.chunks_exact(8);
        for c in &mut ch {
            self.mix(u64::from_le_bytes(c.try_into().unwrap()));
        }
        let mut tail = [0u8; 8];
        tail[..ch.remainder().len()].copy_from_slice(ch.remainder());
        self.mix(u64::from_le_bytes(tail));
        self.mix(b.len() as u64);
        self
    }
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }
    pub fn file(&mut self, p: &Path) -> Result<&mut Self> {
        let b = std::fs::read(p).map_err(|e| Error::file(p, format!("cannot read: {e}")))?;
        Ok(self.bytes(&b))
    }
    pub fn finish(&self) -> u64 {
        let mut x = self.0;
        x ^= x >> 33;
        x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
        x ^ (x >> 33)
    }
}

/// Hash of a model directory: config.json and every .safetensors / index file, in name order.
pub fn model_key(dir: &Path) -> Result<u64> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::file(dir, format!("cannot list: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            n == "config.json" || (n.starts_with("model") && (n.ends_with(".safetensors") || n.ends_with(".index.json")))
        })
        .collect();
    files.sort();
    let mut h = Hasher::default();
    for f in &files {
        h.str(&f.file_name().unwrap().to_string_lossy()).file(f)?;
    }
    Ok(h.finish())
}

pub struct EmbeddingCache {
    dir: Option<PathBuf>,
}

impl EmbeddingCache {
    /// `None` directory: caching off.
    pub fn new(dir: Option<PathBuf>) -> EmbeddingCache {
        EmbeddingCache { dir }
    }
    /// The default location (see the module docs).
    pub fn default_dir() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
        Some(base.join("clipforge").join("embeddings"))
    }
    fn path(&self, key: u64) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(format!("{key:016x}.npy")))
    }
    /// The cached [N, D] embeddings of `key`, or `compute()` (then stored).
    pub fn get_or(&self, key: u64, compute: impl FnOnce() -> Result<(Vec<f32>, Vec<usize>)>) -> Result<(Vec<f32>, Vec<usize>, bool)> {
        if let Some(p) = self.path(key) {
            if let Ok((v, s)) = crate::io::npy::read_npy(&p) {
                return Ok((v, s, true));
            }
        }
        let (v, s) = compute()?;
        if let Some(p) = self.path(key) {
            if std::fs::create_dir_all(p.parent().unwrap()).is_ok() {
                let _ = crate::io::npy::write_npy(&p, &v, &s); // a cache that cannot be written is not an error
            }
        }
        Ok((v, s, false))
    }
}
