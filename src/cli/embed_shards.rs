//! `clipforge embed-image --shards PATTERN`: WebDataset tar shards streamed through the image
//! tower (src/io/shard_stream.rs: the next batch is read, decoded and preprocessed in parallel
//! while the model computes this one), one `OUT/<shard>.npy` [N, D] and `OUT/<shard>.keys.txt`
//! (the N sample keys, one per line) per shard. `--shard-rank R --shard-world W` takes shard i of
//! the list when i % W == R; a shard whose two outputs exist is skipped, so a rerun resumes and
//! any scheduler can run the ranks. Also the image embedding of `eval` for images in shards.
use super::common::*;
use super::embed::EmbedImageArgs;
use clap::Args;
use clipforge::api::Embeddings;
use clipforge::error::{Error, Result};
use clipforge::io::image_source::ImageSource;
use clipforge::io::npy::write_npy;
use clipforge::io::output::write_file;
use clipforge::io::shard_stream::{stream_shards, stream_sources};
use clipforge::io::shards::{rank_shards, shard_list, shard_stem};
use clipforge::model::Towers;
use clipforge::tensor::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct ShardArgs {
    /// WebDataset tar shards to embed instead of image files: a brace pattern such as
    /// 'data/{00000..00099}.tar' (repeat the flag or separate with '::' for several). Each
    /// sample's image (KEY.jpg/jpeg/png/webp) is embedded; --out is then a directory that gets
    /// <shard>.npy [N, D] and <shard>.keys.txt (the N sample keys) per shard, and shards whose
    /// outputs already exist are skipped (rerun to resume)
    #[arg(long = "shards", value_name = "PATTERN", conflicts_with_all = ["images", "dir"])]
    pub patterns: Vec<String>,
    /// With --shards: this process's rank (default 0); shard i of the expanded list goes to rank
    /// i % --shard-world
    #[arg(long, value_name = "R", requires = "patterns")]
    pub shard_rank: Option<usize>,
    /// With --shards: how many processes (machines) split the shard list (default 1)
    #[arg(long, value_name = "W", requires = "patterns")]
    pub shard_world: Option<usize>,
}

impl ShardArgs {
    /// Whether any shard flag was given (embed-image then runs [`run`]).
    pub fn given(&self) -> bool {
        !self.patterns.is_empty() || self.shard_rank.is_some() || self.shard_world.is_some()
    }
}

/// The outputs of one shard in `out`: (embeddings .npy, keys .txt).
pub fn shard_outputs(out: &Path, shard: &Path) -> (PathBuf, PathBuf) {
    let stem = shard_stem(shard);
    (out.join(format!("{stem}.npy")), out.join(format!("{stem}.keys.txt")))
}

/// `embed-image --shards`.
pub fn run(a: &EmbedImageArgs) -> Result<()> {
    let s = &a.shards;
    if s.patterns.is_empty() {
        return Err(Error::msg("--shard-rank / --shard-world split the shards of --shards PATTERN (not image files)"));
    }
    let all = shard_list(&s.patterns)?;
    let mut by_stem: HashMap<String, &PathBuf> = HashMap::new();
    for p in &all {
        if let Some(other) = by_stem.insert(shard_stem(p), p) {
            return Err(Error::file(p, format!("has the same output name as {} (shards need distinct file names)", other.display())));
        }
    }
    let (rank, world_n) = (s.shard_rank.unwrap_or(0), s.shard_world.unwrap_or(1));
    let mine = rank_shards(&all, rank, world_n)?;
    if a.out.is_file() {
        return Err(Error::file(&a.out, "--out must be a directory with --shards (it is a file)"));
    }
    std::fs::create_dir_all(&a.out).map_err(|e| Error::file(&a.out, format!("cannot create the output directory: {e}")))?;
    let todo: Vec<PathBuf> = mine.iter().filter(|p| !(shard_outputs(&a.out, p).0.is_file() && shard_outputs(&a.out, p).1.is_file())).cloned().collect();
    let done_before = mine.len() - todo.len();
    let world = if world_n > 1 { format!(" (rank {rank} of {world_n})") } else { String::new() };
    if done_before > 0 {
        eprintln!("{done_before} of this rank's {} shard(s) already have their outputs in {}: skipped", mine.len(), a.out.display());
    }
    if todo.is_empty() {
        eprintln!("nothing to do: all {} shard(s){world} are done", mine.len());
        return Ok(());
    }
    let model = load_model(&a.model, Towers::Vision, a.compute)?;
    let pre = model.preprocess_config()?;
    let d = model.embed_dim();
    let bar = super::progress(todo.len() as u64, "shards");
    let (mut rows, mut keys) = (Vec::<f32>::new(), Vec::<String>::new());
    let (mut images, mut failed, mut skipped) = (0usize, 0usize, 0usize);
    stream_shards(&todo, &pre, a.batch, a.skip_bad, |b| {
        for e in &b.skipped {
            bar.suspend(|| eprintln!("skipped: {e}"));
        }
        skipped += b.skipped.len();
        if let Some(e) = b.failed {
            bar.suspend(|| eprintln!("skipped shard (no output written; a rerun retries it): {e}"));
            failed += 1;
            bar.inc(1);
            return Ok(());
        }
        let n = b.keys.len();
        if n > 0 {
            rows.extend(model.embed_pixels(&b.pixels, n)?.data); // [n, D]
            keys.extend(b.keys);
        }
        if b.last {
            let n = keys.len();
            let e = Embeddings::new(std::mem::take(&mut rows), n, d)?;
            let e = if a.no_normalize { e } else { e.normalized() };
            let (npy, txt) = shard_outputs(&a.out, &todo[b.shard]);
            // the keys last: a shard counts as done once both exist
            write_npy(&npy, &e.data, &[n, d])?;
            write_file(&txt, keys.iter().map(|k| format!("{k}\n")).collect::<String>().as_bytes())?;
            images += n;
            keys.clear();
            bar.inc(1);
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    let extra = if skipped > 0 { format!("; {skipped} sample(s) skipped") } else { String::new() };
    let extra = if failed > 0 { format!("{extra}; {failed} shard(s) could not be read (rerun to retry)") } else { extra };
    eprintln!("wrote {images} image embeddings of dim {d} from {} shard(s){world} to {}{extra}", todo.len() - failed, a.out.display());
    Ok(())
}

/// Embeds images that may be tar members, in batches, the next batch prepared while the model
/// runs this one → [N, D] (L2-normalised if `normalize`).
pub fn embed_sources(model: &Loaded, sources: &[ImageSource], batch: usize, normalize: bool, quiet: bool) -> Result<Tensor> {
    if sources.is_empty() {
        return Err(Error::msg("no images to embed"));
    }
    let bar = super::progress(sources.len() as u64, "images");
    if quiet || sources.len() <= batch {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let pre = model.preprocess_config()?;
    let mut data = Vec::with_capacity(sources.len() * model.embed_dim());
    stream_sources(sources, &pre, batch, |(px, n)| {
        data.extend(model.embed_pixels(&px, n)?.data); // [n, D]
        bar.inc(n as u64);
        Ok(())
    })?;
    bar.finish_and_clear();
    let e = Embeddings::new(data, sources.len(), model.embed_dim())?;
    (if normalize { e.normalized() } else { e }).to_tensor()
}
