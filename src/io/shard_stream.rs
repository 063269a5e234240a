//! Streams WebDataset shards as preprocessed image batches: each shard is indexed
//! (src/io/webdataset.rs), its samples cut into batches of at most `batch`, and each batch's
//! images read from the tar, decoded and preprocessed in parallel on the rayon pool, on a
//! producer thread that stays one batch ahead of the consumer (src/io/pipeline.rs). A batch never
//! spans two shards, so every shard's rows can be written on their own.
use super::image_prep::{preprocess, PreprocessConfig};
use super::image_source::ImageSource;
use super::pipeline::pipeline;
use super::webdataset::{index_shard, no_image};
use crate::error::{Error, Result};
use rayon::prelude::*;
use std::path::PathBuf;

/// One batch of one shard.
pub struct ShardBatch {
    /// Index of the shard in the list streamed.
    pub shard: usize,
    /// The sample keys of the rows, in tar order.
    pub keys: Vec<String>,
    /// Preprocessed images, `keys.len()` × [3, H, W] (the preprocessing's crop).
    pub pixels: Vec<f32>,
    /// The shard's last batch (a shard without samples sends one empty last batch).
    pub last: bool,
    /// With `skip_bad`: the samples left out of this batch (no image, or one that does not read
    /// or decode), one error each.
    pub skipped: Vec<Error>,
    /// With `skip_bad`: the shard could not be indexed (a corrupt or truncated tar); nothing of it
    /// is sent but this one empty last batch.
    pub failed: Option<Error>,
}

/// Streams `shards` → `consume(batch)` in shard and tar order. Without `skip_bad` the first bad
/// shard or sample is the error; with it, they are left out and reported in the batches.
pub fn stream_shards(shards: &[PathBuf], pre: &PreprocessConfig, batch: usize, skip_bad: bool, consume: impl FnMut(ShardBatch) -> Result<()>) -> Result<()> {
    let batch = batch.max(1);
    let empty = |shard, failed| ShardBatch { shard, keys: vec![], pixels: vec![], last: true, skipped: vec![], failed };
    let produce = |send: &dyn Fn(Result<ShardBatch>) -> bool| {
        for (si, path) in shards.iter().enumerate() {
            let index = match index_shard(path) {
                Ok(x) => x,
                Err(e) if skip_bad => {
                    if !send(Ok(empty(si, Some(e)))) {
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    send(Err(e));
                    return;
                }
            };
            // (key, image) of each sample; one without an image is an error or a skip
            let mut items = vec![];
            let mut skipped = vec![];
            for s in &index.samples {
                match s.image() {
                    Some(m) => items.push((s.key.clone(), ImageSource::Member { shard: index.path.clone(), member: m.clone() })),
                    None if skip_bad => skipped.push(no_image(path, s)),
                    None => {
                        send(Err(no_image(path, s)));
                        return;
                    }
                }
            }
            if items.is_empty() {
                let mut b = empty(si, None);
                b.skipped = skipped;
                if !send(Ok(b)) {
                    return;
                }
                continue;
            }
            let n_chunks = items.len().div_ceil(batch);
            for (ci, chunk) in items.chunks(batch).enumerate() {
                let px: Vec<Result<Vec<f32>>> = chunk.par_iter().map(|(_, src)| src.load_rgb8_hf().map(|im| preprocess(&im, pre))).collect();
                let mut b =
                    ShardBatch { shard: si, keys: vec![], pixels: vec![], last: ci + 1 == n_chunks, skipped: std::mem::take(&mut skipped), failed: None };
                for ((key, _), r) in chunk.iter().zip(px) {
                    match r {
                        Ok(p) => {
                            b.keys.push(key.clone());
                            b.pixels.extend(p);
                        }
                        Err(e) if skip_bad => b.skipped.push(e),
                        Err(e) => {
                            send(Err(e));
                            return;
                        }
                    }
                }
                if !send(Ok(b)) {
                    return;
                }
            }
        }
    };
    pipeline(1, produce, consume)
}

/// Prepares images (files or tar members) in batches of at most `batch`, in order, one batch
/// ahead of `consume(pixels, n)` (the first image that does not read or decode is the error).
pub fn stream_sources(sources: &[ImageSource], pre: &PreprocessConfig, batch: usize, consume: impl FnMut((Vec<f32>, usize)) -> Result<()>) -> Result<()> {
    let produce = |send: &dyn Fn(Result<(Vec<f32>, usize)>) -> bool| {
        for chunk in sources.chunks(batch.max(1)) {
            let px: Result<Vec<Vec<f32>>> = chunk.par_iter().map(|s| s.load_rgb8_hf().map(|im| preprocess(&im, pre))).collect();
            let stop = px.is_err();
            if !send(px.map(|p| (p.concat(), chunk.len()))) || stop {
                return;
            }
        }
    };
    pipeline(1, produce, consume)
}
