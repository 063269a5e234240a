//! The CLIP tokenizer: HF `tokenizer.json` through the `tokenizers` crate, with CLIP's truncation
//! (start token, the first n−2 content tokens, end token last) to any context length.
use crate::error::{Error, Result};
use std::path::Path;

pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    pub sot: u32,
    pub eot: u32,
    /// Longest sequence produced, start and end tokens included.
    pub context_length: usize,
}

impl ClipTokenizer {
    /// Loads `tokenizer.json` (a file, or the one in a model directory).
    pub fn from_file(path: &Path, context_length: usize) -> Result<ClipTokenizer> {
        let file = if path.is_dir() { path.join("tokenizer.json") } else { path.to_path_buf() };
        if !file.exists() {
            return Err(Error::file(&file, "missing (the model directory needs the tokenizer.json of the CLIP BPE)"));
        }
        let inner = tokenizers::Tokenizer::from_file(&file).map_err(|e| Error::file(&file, format!("not a valid tokenizer.json: {e}")))?;
        let id = |t: &str| inner.token_to_id(t).ok_or_else(|| Error::file(&file, format!("vocabulary has no {t} token")));
        let (sot, eot) = (id("<|startoftext|>")?, id("<|endoftext|>")?);
        if context_length < 2 {
            return Err(Error::msg(format!("context length {context_length} is too short (need ≥ 2)")));
        }
        Ok(ClipTokenizer { inner, sot, eot, context_length })
    }

    /// Ids of one text: [SOT, first n−2 content tokens, EOT]; no padding.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_counting(text)?.0)
    }

    /// [`encode`](Self::encode), and how many content tokens the context length cut off.
    pub fn encode_counting(&self, text: &str) -> Result<(Vec<u32>, usize)> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::msg(format!("tokenizer failed on {text:?}: {e}")))?;
        let content = enc.get_ids();
        let n = content.len().min(self.context_length - 2);
        let mut ids = Vec::with_capacity(n + 2);
        ids.push(self.sot);
        ids.extend_from_slice(&content[..n]);
        ids.push(self.eot);
        Ok((ids, content.len() - n))
    }

    pub fn encode_batch(&self, texts: &[String]) -> Result<Vec<Vec<u32>>> {
        texts.iter().map(|t| self.encode(t)).collect()
    }
}
