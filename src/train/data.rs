//! The fine-tuning data: image–caption pairs from JSONL ({"image", "caption", "short_caption"?},
//! image paths relative to the file) or ShareGPT4V JSON (an array of {"image", "conversations"},
//! long caption = `conversations[1].value` with newlines as spaces, images relative to the file's
//! directory or `image_root`). The short caption defaults to Long-CLIP's `caption.split(". ")[0]`.
//! Or WebDataset tar shards (`data/{00000..00099}.tar`, src/io/webdataset.rs): one sample per key
//! with an image (jpg, jpeg, png, webp, ...), the long caption from its `.txt` (trimmed, newlines
//! as spaces) or else the `caption` of its `.json`, the short caption from the `.json`'s
//! `short_caption` if present; images are read from the tar members in place.
//!
//! Batches: each epoch visits the samples in a permutation (identity with `shuffle = false`,
//! else a Fisher–Yates shuffle seeded by (seed, epoch)); consecutive `batch` samples form a
//! micro-batch and the last partial micro-batch of an epoch is dropped (every batch has the same
//! size, so its PCA and InfoNCE are comparable). A [`Position`] (epoch, next sample) fully
//! determines what comes next, so a resumed run sees exactly the batches an uninterrupted one would.
use crate::error::{Error, Result};
use crate::io::image_prep::{preprocess, PreprocessConfig};
pub use crate::io::image_source::ImageSource;
use crate::io::shards::{is_shard_spec, shard_list};
use crate::io::tokenizer::ClipTokenizer;
use crate::io::webdataset::{index_shard, no_image, read_json, read_text};
use crate::model::synthetic::Rng;
use crate::tensor::Tensor;
use rayon::prelude::*;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub image: ImageSource,
    pub caption: String,
    pub short_caption: String,
    /// Where it was read: "DATA: line N" (JSONL), "DATA: entry N" (ShareGPT4V JSON, from 0) or
    /// "SHARD: sample KEY" (a tar shard).
    pub at: String,
}

/// Long-CLIP's short caption: the text before the first ". ".
pub fn first_sentence(caption: &str) -> String {
    caption.split(". ").next().unwrap_or(caption).to_string()
}

fn sample(base: &Path, image: &str, caption: String, short: Option<String>, at: String) -> Sample {
    let short_caption = short.unwrap_or_else(|| first_sentence(&caption));
    Sample { image: ImageSource::File(base.join(image)), caption, short_caption, at }
}

/// The training data `data` names: tar shards (a brace pattern, a `.tar`, a `::` list; see
/// `io::shards`) or a JSONL / ShareGPT4V JSON file ([`read_samples`]).
pub fn read_data(data: &Path, image_root: Option<&Path>) -> Result<Vec<Sample>> {
    let spec = data.to_string_lossy();
    if !is_shard_spec(&spec) {
        return read_samples(data, image_root);
    }
    if image_root.is_some() {
        return Err(Error::msg("--image-root: tar shards hold their images (drop --image-root)"));
    }
    read_shards(&shard_list(&[spec])?)
}

/// The samples of tar shards, shard after shard in tar order (the shards indexed in parallel).
pub fn read_shards(shards: &[PathBuf]) -> Result<Vec<Sample>> {
    let per: Vec<Vec<Sample>> = shards.par_iter().map(|p| shard_samples(p)).collect::<Result<_>>()?;
    let out: Vec<Sample> = per.concat();
    if out.is_empty() {
        return Err(Error::msg(format!("no samples in the {} shard(s)", shards.len())));
    }
    Ok(out)
}

fn shard_samples(path: &Path) -> Result<Vec<Sample>> {
    let shard = index_shard(path)?;
    let mut out = Vec::with_capacity(shard.samples.len());
    for s in &shard.samples {
        let member = s.image().ok_or_else(|| no_image(path, s))?.clone();
        let json = s.get("json").map(|m| read_json(path, m)).transpose()?;
        let field = |k: &str| json.as_ref().and_then(|j| j.get(k)).and_then(|v| v.as_str()).map(String::from);
        let caption = match s.get("txt") {
            Some(m) => read_text(path, m)?.trim().replace('\n', " "),
            None => field("caption")
                .ok_or_else(|| Error::file(path, format!("sample {:?} has no caption (a .txt member or a \"caption\" string in its .json)", s.key)))?,
        };
        let image = ImageSource::Member { shard: shard.path.clone(), member };
        out.push(Sample {
            image,
            short_caption: field("short_caption").unwrap_or_else(|| first_sentence(&caption)),
            caption,
            at: format!("{}: sample {:?}", path.display(), s.key),
        });
    }
    Ok(out)
}

/// `e` about sample `s`'s image, with where the sample was read when the error does not say it.
fn image_err(s: &Sample, e: Error) -> Error {
    match s.image {
        ImageSource::File(_) => Error::msg(format!("{}: {e}", s.at)),
        ImageSource::Member { .. } => e,
    }
}

/// Reads a JSONL or ShareGPT4V JSON file (by content: a leading `[` is the JSON array form).
pub fn read_samples(path: &Path, image_root: Option<&Path>) -> Result<Vec<Sample>> {
    let text = crate::io::text::read_utf8(path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let base = image_root.unwrap_or(dir);
    let str_field = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_str()).map(|s| s.to_string());
    let mut out = vec![];
    if text.trim_start().starts_with('[') {
        let arr: Vec<serde_json::Value> = serde_json::from_str(&text).map_err(|e| Error::file(path, format!("not a ShareGPT4V JSON array: {e}")))?;
        for (i, v) in arr.iter().enumerate() {
            let image = str_field(v, "image").ok_or_else(|| Error::file(path, format!("entry {i}: no \"image\" string")))?;
            let caption = v
                .get("conversations")
                .and_then(|c| c.get(1))
                .and_then(|c| c.get("value"))
                .and_then(|c| c.as_str())
                .ok_or_else(|| Error::file(path, format!("entry {i}: no conversations[1].value string")))?
                .replace('\n', " ");
            out.push(sample(base, &image, caption, None, format!("{}: entry {i}", path.display())));
        }
    } else {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::file(path, format!("line {}: not JSON: {e}", i + 1)))?;
            let image = str_field(&v, "image").ok_or_else(|| Error::file(path, format!("line {}: no \"image\" string", i + 1)))?;
            let caption = str_field(&v, "caption").ok_or_else(|| Error::file(path, format!("line {}: no \"caption\" string", i + 1)))?;
            out.push(sample(base, &image, caption, str_field(&v, "short_caption"), format!("{}: line {}", path.display(), i + 1)));
        }
    }
    if out.is_empty() {
        return Err(Error::file(path, "no samples"));
    }
    Ok(out)
}

/// Checks a data set before the first step, so that a bad sample does not stop a run hours in:
/// every image must exist and have a readable header (no pixel is decoded); the first bad one is
/// an error naming the data file, its line and the image. Returns the notes for captions longer
/// than `tok`'s context (they are cut; `max_positions` picks the hint).
pub fn check(samples: &[Sample], tok: &ClipTokenizer, max_positions: usize) -> Result<Vec<String>> {
    let bad = samples.par_iter().enumerate().filter_map(|(i, s)| s.image.probe().err().map(|e| (i, e))).min_by_key(|(i, _)| *i);
    if let Some((i, e)) = bad {
        return Err(image_err(&samples[i], e));
    }
    let hint = crate::io::tokenizer::cut_hint(tok.context_length, max_positions);
    let mut notes = vec![];
    for (what, short) in [("long captions", false), ("short captions", true)] {
        tok.take_cut();
        samples.par_iter().try_for_each(|s| tok.encode(if short { &s.short_caption } else { &s.caption }).map(|_| ()))?;
        notes.extend(tok.take_cut().note(tok.context_length, what, &hint));
    }
    Ok(notes)
}

/// Where the data stream stands: the next micro-batch starts at sample `index` of epoch `epoch`'s
/// permutation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub epoch: usize,
    pub index: usize,
}

/// One micro-batch, ready for the towers.
pub struct Batch {
    pub pixels: Tensor,           // [B, 3, S, S]
    pub long_ids: Vec<Vec<u32>>,  // B token sequences (unpadded)
    pub short_ids: Vec<Vec<u32>>, // B token sequences (unpadded)
    pub samples: Vec<usize>,
}

pub struct Loader {
    pub samples: Vec<Sample>,
    pub batch: usize,
    pub seed: u64,
    pub shuffle: bool,
    pub position: Position,
    pre: PreprocessConfig,
    pub tok: ClipTokenizer,
}

impl Loader {
    pub fn new(samples: Vec<Sample>, batch: usize, seed: u64, shuffle: bool, pre: PreprocessConfig, tok: ClipTokenizer) -> Result<Loader> {
        if batch == 0 || samples.len() < batch {
            return Err(Error::msg(format!("--batch {batch} needs between 1 and the {} samples of the data", samples.len())));
        }
        Ok(Loader { samples, batch, seed, shuffle, position: Position { epoch: 0, index: 0 }, pre, tok })
    }

    /// Micro-batches per epoch (the last partial one is dropped).
    pub fn batches_per_epoch(&self) -> usize {
        self.samples.len() / self.batch
    }

    /// The visiting order of `epoch`.
    pub fn permutation(&self, epoch: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..self.samples.len()).collect();
        if self.shuffle {
            let mut r = Rng::new(self.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(0x5851_F42D));
            for i in (1..p.len()).rev() {
                let j = (r.next_u64() % (i as u64 + 1)) as usize;
                p.swap(i, j);
            }
        }
        p
    }

    /// The sample indices of the next micro-batch; advances the position.
    pub fn next_indices(&mut self) -> Vec<usize> {
        if self.position.index + self.batch > self.samples.len() {
            self.position = Position { epoch: self.position.epoch + 1, index: 0 };
        }
        let perm = self.permutation(self.position.epoch);
        let idx = perm[self.position.index..self.position.index + self.batch].to_vec();
        self.position.index += self.batch;
        idx
    }

    /// Loads, preprocesses and tokenises the next micro-batch (images in parallel).
    pub fn next_batch(&mut self) -> Result<Batch> {
        let idx = self.next_indices();
        self.load(&idx)
    }

    /// Rank `rank` of `world`'s shard of the next global micro-batch (`batch` = the global size):
    /// consecutive rows, so the ranks' shards in rank order are the one-rank micro-batch.
    pub fn next_shard(&mut self, rank: usize, world: usize) -> Result<Batch> {
        let idx = self.next_indices();
        let b = idx.len() / world.max(1);
        self.load(&idx[rank * b..(rank + 1) * b])
    }

    pub fn load(&self, idx: &[usize]) -> Result<Batch> {
        let (s, pre) = (self.pre.crop_h as usize, &self.pre);
        let images: Vec<Vec<f32>> = idx
            .par_iter()
            .map(|&i| self.samples[i].image.load_rgb8_hf().map(|im| preprocess(&im, pre)).map_err(|e| image_err(&self.samples[i], e)))
            .collect::<Result<_>>()?;
        let pixels: Vec<f32> = images.concat();
        let long: Vec<String> = idx.iter().map(|&i| self.samples[i].caption.clone()).collect();
        let short: Vec<String> = idx.iter().map(|&i| self.samples[i].short_caption.clone()).collect();
        Ok(Batch {
            pixels: Tensor::from_vec(pixels, &[idx.len(), 3, s, s])?,
            long_ids: self.tok.encode_batch(&long)?,
            short_ids: self.tok.encode_batch(&short)?,
            samples: idx.to_vec(),
        })
    }
}
