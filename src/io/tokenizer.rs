//! The CLIP tokenizer: HF `tokenizer.json` through the `tokenizers` crate, with CLIP's truncation
//! (start token, the first n−2 content tokens, end token last) to any context length. What the
//! truncation cut is counted ([`ClipTokenizer::take_cut`]) so that commands can say so.
//! OpenAI's CLIP BPE is built in ([`CLIP_TOKENIZER_JSON`]): a `.pt` checkpoint used as a model
//! has no tokenizer.json beside it, and `clipforge convert` writes this one.
use crate::error::{Error, Result};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    pub sot: u32,
    pub eot: u32,
    /// Longest sequence produced, start and end tokens included.
    pub context_length: usize,
    /// Since the last [`ClipTokenizer::take_cut`]: texts encoded, texts cut, tokens cut, longest text.
    counts: [AtomicUsize; 4],
}

/// What the truncation to the context cut from a set of texts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cut {
    /// Texts encoded.
    pub texts: usize,
    /// Texts longer than the context.
    pub cut: usize,
    /// Tokens cut from them in all.
    pub tokens: usize,
    /// The longest text's length in tokens (start and end included).
    pub longest: usize,
}

impl Cut {
    /// One line for stderr when anything was cut, e.g. "note: 3 of 10 texts are longer than the
    /// 77-token context and cut to it (120 tokens lost; the longest has 300)", `hint` appended.
    pub fn note(&self, context: usize, what: &str, hint: &str) -> Option<String> {
        (self.cut > 0).then(|| {
            format!(
                "note: {} of {} {what} are longer than the {context}-token context and cut to it ({} tokens lost; the longest has {}){hint}",
                self.cut, self.texts, self.tokens, self.longest
            )
        })
    }
}

/// The hint of a cut note for a context of `context` tokens on a model of `max_positions`: a longer
/// --max-len, or stretching a model of 77 positions to 248.
pub fn cut_hint(context: usize, max_positions: usize) -> String {
    if context < max_positions {
        format!("; the model takes up to {max_positions} (--max-len)")
    } else if max_positions < 248 {
        "; stretch the model first (clipforge stretch) for texts of up to 248 tokens".into()
    } else {
        String::new()
    }
}

/// OpenAI CLIP's BPE (49408 tokens, the vocabulary and merges of `bpe_simple_vocab_16e6`) as an
/// HF `tokenizer.json` (the file tests/fixtures/tokenizer.json also holds).
pub const CLIP_TOKENIZER_JSON: &[u8] = include_bytes!("../../assets/clip_tokenizer.json");

/// A BPE model's merges: each one's second token starts with the continuing-subword prefix
/// (tokenizers slices it off by length, even inside a character) and each merged token is in the
/// vocabulary (tokenizers copies it into a buffer as long as the longest entry before it checks).
fn check_bpe_merges(v: &serde_json::Value) -> std::result::Result<(), String> {
    let model = &v["model"];
    let (Some(vocab), Some(merges)) = (model["vocab"].as_object(), model["merges"].as_array()) else { return Ok(()) };
    let prefix = model["continuing_subword_prefix"].as_str().unwrap_or("");
    for (i, m) in merges.iter().enumerate() {
        let (a, b) = match (m, m.as_array().map(|p| p.as_slice())) {
            (_, Some([serde_json::Value::String(a), serde_json::Value::String(b)])) => (a.as_str(), b.as_str()),
            (serde_json::Value::String(s), _) => match s.split_once(' ') {
                Some(p) => p,
                None => continue,
            },
            _ => continue, // tokenizers says what is wrong with it
        };
        let Some(rest) = b.strip_prefix(prefix) else {
            return Err(format!("BPE merge {i} ({a:?}, {b:?}): the second token lacks the continuing-subword prefix {prefix:?}"));
        };
        if !vocab.contains_key(&format!("{a}{rest}")) {
            return Err(format!("BPE merge {i} ({a:?}, {b:?}): the merged token is not in the vocabulary"));
        }
    }
    Ok(())
}

/// No Replace normalizer with an empty pattern (tokenizers 0.23 then panics in the next
/// normalizer when it encodes; found by tests/fuzz.rs).
fn check_replace(n: &serde_json::Value) -> std::result::Result<(), String> {
    match n["type"].as_str() {
        Some("Sequence") => n["normalizers"].as_array().into_iter().flatten().try_for_each(check_replace),
        Some("Replace") if ["Regex", "String"].iter().any(|k| n["pattern"][k].as_str() == Some("")) => Err("a Replace normalizer has an empty pattern".into()),
        _ => Ok(()),
    }
}

impl ClipTokenizer {
    /// Loads `tokenizer.json` (a file, or the one in a model directory); for a `.pt` checkpoint
    /// (which carries none), the built-in CLIP BPE.
    pub fn from_file(path: &Path, context_length: usize) -> Result<ClipTokenizer> {
        if crate::io::pt::is_pt_file(path) {
            return ClipTokenizer::clip_bpe(context_length);
        }
        let file = if path.is_dir() { path.join("tokenizer.json") } else { path.to_path_buf() };
        if !file.exists() {
            return Err(Error::file(&file, "missing (the model directory needs the tokenizer.json of the CLIP BPE)"));
        }
        let text = crate::io::text::read_utf8(&file)?;
        // tokenizers 0.23 panics on some bad files (found by tests/fuzz.rs): on malformed JSON (an
        // `expect` in its decoder deserializer) and on a BPE merge longer than every vocabulary
        // entry; so the file is checked to be JSON and its merges checked first, and a panic
        // left is caught.
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::file(&file, format!("not valid JSON: {e}")))?;
        check_bpe_merges(&json).and_then(|_| check_replace(&json["normalizer"])).map_err(|e| Error::file(&file, e))?;
        drop(json);
        let inner = std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>())
            .map_err(|_| Error::file(&file, "not a valid tokenizer.json (the tokenizers crate crashed on it)"))?
            .map_err(|e| Error::file(&file, format!("not a valid tokenizer.json: {e}")))?;
        let id = |t: &str| inner.token_to_id(t).ok_or_else(|| Error::file(&file, format!("vocabulary has no {t} token")));
        let (sot, eot) = (id("<|startoftext|>")?, id("<|endoftext|>")?);
        if context_length < 2 {
            return Err(Error::msg(format!("context length {context_length} is too short (need ≥ 2)")));
        }
        Ok(ClipTokenizer { inner, sot, eot, context_length, counts: Default::default() })
    }

    /// The built-in CLIP BPE ([`CLIP_TOKENIZER_JSON`]) at `context_length` tokens.
    pub fn clip_bpe(context_length: usize) -> Result<ClipTokenizer> {
        let inner = tokenizers::Tokenizer::from_bytes(CLIP_TOKENIZER_JSON).map_err(|e| Error::msg(format!("the built-in CLIP tokenizer: {e}")))?;
        let id = |t: &str| inner.token_to_id(t).ok_or_else(|| Error::msg(format!("the built-in CLIP tokenizer has no {t} token")));
        let (sot, eot) = (id("<|startoftext|>")?, id("<|endoftext|>")?);
        if context_length < 2 {
            return Err(Error::msg(format!("context length {context_length} is too short (need ≥ 2)")));
        }
        Ok(ClipTokenizer { inner, sot, eot, context_length, counts: Default::default() })
    }

    /// Ids of one text: [SOT, first n−2 content tokens, EOT]; no padding.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_counting(text)?.0)
    }

    /// [`encode`](Self::encode), and how many content tokens the context length cut off.
    pub fn encode_counting(&self, text: &str) -> Result<(Vec<u32>, usize)> {
        // a panic inside tokenizers (a hostile tokenizer.json the checks above let through) is an error
        let enc = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.inner.encode(text, false)))
            .map_err(|_| Error::msg(format!("the tokenizer crashed on {:?} (a broken tokenizer.json?)", crate::io::text::excerpt(text, 80))))?
            .map_err(|e| Error::msg(format!("tokenizer failed on {:?}: {e}", crate::io::text::excerpt(text, 80))))?;
        let content = enc.get_ids();
        let n = content.len().min(self.context_length - 2);
        let [texts, cut, tokens, longest] = &self.counts;
        texts.fetch_add(1, Ordering::Relaxed);
        if n < content.len() {
            cut.fetch_add(1, Ordering::Relaxed);
            tokens.fetch_add(content.len() - n, Ordering::Relaxed);
        }
        longest.fetch_max(content.len() + 2, Ordering::Relaxed);
        let mut ids = Vec::with_capacity(n + 2);
        ids.push(self.sot);
        ids.extend_from_slice(&content[..n]);
        ids.push(self.eot);
        Ok((ids, content.len() - n))
    }

    pub fn encode_batch(&self, texts: &[String]) -> Result<Vec<Vec<u32>>> {
        texts.iter().map(|t| self.encode(t)).collect()
    }

    /// What the truncation cut since the last call (or since loading); resets the counts.
    pub fn take_cut(&self) -> Cut {
        let [texts, cut, tokens, longest] = self.counts.each_ref().map(|c| c.swap(0, Ordering::Relaxed));
        Cut { texts, cut, tokens, longest }
    }
}
