//! `clipforge embed-image` and `clipforge embed-text`: embeddings to a float32 .npy [N, D], rows
//! in input order, L2-normalised unless --no-normalize; with --hidden-states, per-token outputs
//! to a .safetensors file (src/cli/hidden.rs).
use super::common::*;
use super::Compute;
use clap::Args;
use clipforge::error::{Error, Result};
use clipforge::io::npy::write_npy;
use clipforge::io::output::write_file;
use clipforge::model::Towers;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct EmbedImageArgs {
    /// HF CLIP model directory
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub compute: Compute,
    /// Images per forward pass
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Output .npy file (float32 [N, D]); with --hidden-states a .safetensors file
    #[arg(long)]
    pub out: PathBuf,
    /// Embed every image file of this directory (sorted by name; other files are skipped with a note); the row→file list is written to OUT's stem + .files.txt
    #[arg(long, conflicts_with = "images")]
    pub dir: Option<PathBuf>,
    /// Write raw projections instead of L2-normalised embeddings
    #[arg(long)]
    pub no_normalize: bool,
    /// Skip images that cannot be read or decoded (each named on stderr) instead of failing; the
    /// rows written are listed in OUT's stem + .files.txt
    #[arg(long)]
    pub skip_bad: bool,
    #[command(flatten)]
    pub hidden: super::hidden::HiddenArgs,
    #[command(flatten)]
    pub shards: super::embed_shards::ShardArgs,
    /// Image files
    pub images: Vec<PathBuf>,
}

#[derive(Args, Debug)]
pub struct EmbedTextArgs {
    /// HF CLIP model directory
    #[arg(long)]
    pub model: PathBuf,
    /// Context length (default: the model's positions, 77 for CLIP, 248 for Long-CLIP)
    #[arg(long)]
    pub max_len: Option<usize>,
    #[command(flatten)]
    pub compute: Compute,
    /// Texts per forward pass
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Output .npy file (float32 [N, D]); with --hidden-states a .safetensors file
    #[arg(long)]
    pub out: PathBuf,
    /// Read texts from this file, one per line
    #[arg(long, conflicts_with = "texts")]
    pub file: Option<PathBuf>,
    /// Write raw projections instead of L2-normalised embeddings
    #[arg(long)]
    pub no_normalize: bool,
    /// SmartCLIP: also write each text's binary dimension mask (float32 [N, D] of 0/1) to this
    /// .npy, from the model directory's mask_net.safetensors
    #[arg(long)]
    pub mask: Option<PathBuf>,
    #[command(flatten)]
    pub hidden: super::hidden::HiddenArgs,
    /// With --hidden-states: pad every text to the context length or to the longest text
    #[arg(long, value_enum, default_value_t = super::hidden::PaddingArg::MaxLength, requires = "hidden_states")]
    pub padding: super::hidden::PaddingArg,
    /// Texts
    pub texts: Vec<String>,
}

pub fn embed_image(a: &EmbedImageArgs) -> Result<()> {
    if a.shards.given() {
        if a.hidden.hidden_states.is_some() {
            return Err(Error::msg(
                "--hidden-states writes one .safetensors file of the images given; it does not combine with --shards (per-shard embeddings)",
            ));
        }
        return super::embed_shards::run(a);
    }
    let mut paths = image_paths(&a.images, a.dir.as_deref())?;
    if a.skip_bad {
        paths = readable_images(paths, a.dir.as_deref())?;
    }
    let model = load_model(&a.model, Towers::Vision, a.compute)?;
    if a.hidden.hidden_states.is_some() {
        return super::hidden::images(&model, &paths, &a.hidden, a.batch, &a.out);
    }
    let e = embed_images(&model, &paths, a.batch, !a.no_normalize, false)?;
    write_npy(&a.out, &e.to_vec_f32(), e.shape())?;
    if a.dir.is_some() || a.skip_bad {
        let list = a.out.with_file_name(format!("{}.files.txt", a.out.file_stem().map(|s| s.to_string_lossy()).unwrap_or_default()));
        let text: String = paths.iter().map(|p| format!("{}\n", p.display())).collect();
        write_file(&list, text.as_bytes())?;
    }
    eprintln!("wrote {} image embeddings of dim {} to {}", e.dim(0), e.dim(1), a.out.display());
    Ok(())
}

/// `--skip-bad`: the images that decode (in parallel), each other one named on stderr.
fn readable_images(paths: Vec<PathBuf>, dir: Option<&std::path::Path>) -> Result<Vec<PathBuf>> {
    use rayon::prelude::*;
    let errs: Vec<Option<Error>> = paths.par_iter().map(|p| clipforge::io::image_decode::load_rgb8_hf(p).err()).collect();
    let mut good = vec![];
    for (p, e) in paths.into_iter().zip(errs) {
        match e {
            Some(e) => eprintln!("skipped: {e}"),
            None => good.push(p),
        }
    }
    if good.is_empty() {
        let what = dir.map(|d| d.display().to_string()).unwrap_or_else(|| "the images given".into());
        return Err(Error::msg(format!("--skip-bad: none of {what} could be read")));
    }
    Ok(good)
}

pub fn embed_text(a: &EmbedTextArgs) -> Result<()> {
    let texts = read_texts(&a.texts, a.file.as_deref())?;
    let model = load_model(&a.model, Towers::Text, a.compute)?;
    let tok = model.tokenizer(a.max_len).map_err(|e| e.context("--max-len"))?;
    if a.hidden.hidden_states.is_some() {
        return super::hidden::texts(&model, &tok, &texts, &a.hidden, a.padding, a.batch, &a.out);
    }
    let e = embed_texts(&model, &tok, &texts, a.batch, !a.no_normalize, false)?;
    if e.dim(0) != texts.len() {
        return Err(Error::msg("internal: row count mismatch"));
    }
    if let Some(mpath) = &a.mask {
        let m = clipforge::train::smartclip::text_masks(&a.model, &tok, &texts, a.batch)?;
        write_npy(mpath, &m, &[texts.len(), e.dim(1)])?;
        eprintln!("wrote {} masks to {}", texts.len(), mpath.display());
    }
    write_npy(&a.out, &e.to_vec_f32(), e.shape())?;
    eprintln!("wrote {} text embeddings of dim {} to {}", e.dim(0), e.dim(1), a.out.display());
    Ok(())
}
