//! What the model-using commands share: opening a model through the library API, reading texts
//! and images, embedding them in batches with a progress bar.
use super::Compute;
use crate::api::{ClipModel, DeviceChoice, ImageOptions, OpenOptions};
use crate::error::{Error, Result};
use crate::io::image_prep::PreprocessConfig;
use crate::io::tokenizer::ClipTokenizer;
use crate::model::Towers;
use crate::tensor::Tensor;
use std::path::{Path, PathBuf};

/// The model a command runs: the library's [`ClipModel`].
pub type Loaded = ClipModel;

/// `--device`/`--dtype` as the library's open options.
pub fn open_options(towers: Towers, compute: Compute) -> Result<OpenOptions> {
    let device = match compute.device {
        super::DeviceArg::Auto => DeviceChoice::Auto,
        super::DeviceArg::Cpu => DeviceChoice::Cpu,
        super::DeviceArg::Cuda => DeviceChoice::Cuda,
    };
    Ok(OpenOptions { device, dtype: compute.dtype.dtype()?, towers })
}

pub fn load_model(dir: &Path, towers: Towers, compute: Compute) -> Result<Loaded> {
    ClipModel::open(dir, &open_options(towers, compute)?)
}

/// The model's preprocessing: preprocessor_config.json if present, else OpenAI's at its image size.
pub fn preprocess_config(dir: &Path, image_size: usize) -> Result<PreprocessConfig> {
    PreprocessConfig::for_model_dir(dir, image_size)
}

/// Texts from arguments or a file (one per line).
pub fn read_texts(args: &[String], file: Option<&Path>) -> Result<Vec<String>> {
    let texts: Vec<String> = match file {
        Some(f) => {
            let s = std::fs::read_to_string(f).map_err(|e| Error::file(f, format!("cannot read: {e}")))?;
            let v: Vec<String> = s.lines().map(|l| l.to_string()).collect();
            if v.is_empty() {
                return Err(Error::file(f, "holds no texts (one text per line)"));
            }
            v
        }
        None => args.to_vec(),
    };
    if texts.is_empty() {
        return Err(Error::msg("no texts given (pass TEXT... or --file FILE)"));
    }
    Ok(texts)
}

/// Image paths from arguments or a directory (files sorted by name).
pub fn image_paths(args: &[PathBuf], dir: Option<&Path>) -> Result<Vec<PathBuf>> {
    let paths = match dir {
        Some(d) => {
            let rd = std::fs::read_dir(d).map_err(|e| Error::file(d, format!("cannot list directory: {e}")))?;
            let mut v: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file()).collect();
            v.sort();
            if v.is_empty() {
                return Err(Error::file(d, "holds no files"));
            }
            v
        }
        None => args.to_vec(),
    };
    if paths.is_empty() {
        return Err(Error::msg("no images given (pass IMAGE... or --dir DIR)"));
    }
    Ok(paths)
}

/// A progress bar for `n` items, hidden when `quiet` or when one batch holds them all.
fn items_bar(n: usize, batch: usize, quiet: bool, what: &str) -> indicatif::ProgressBar {
    let bar = super::progress(n as u64, what);
    if quiet || n <= batch {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar
}

/// Embeds texts in batches → [N, D] (L2-normalised if `normalize`).
pub fn embed_texts(model: &Loaded, tok: &ClipTokenizer, texts: &[String], batch: usize, normalize: bool, quiet: bool) -> Result<Tensor> {
    let bar = items_bar(texts.len(), batch, quiet, "texts");
    let ids = tok.encode_batch(texts)?;
    let e = model.embed_token_ids(&ids, normalize, batch, &mut |n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    Ok(e.into())
}

/// Embeds images in batches → [N, D]. Decoding and preprocessing run in parallel.
pub fn embed_images(model: &Loaded, paths: &[PathBuf], batch: usize, normalize: bool, quiet: bool) -> Result<Tensor> {
    let bar = items_bar(paths.len(), batch, quiet, "images");
    let e = model.embed_image_files_with(paths, &ImageOptions { normalize, batch }, &mut |n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    Ok(e.into())
}

/// The context length to tokenize to: --max-len, else the model's positions.
pub fn context_length(model: &Loaded, max_len: Option<usize>) -> Result<usize> {
    let p = model.context_length();
    match max_len {
        Some(n) if n > p => Err(Error::msg(format!("--max-len {n} exceeds the model's {p} positions (stretch the model first)"))),
        Some(n) if n < 2 => Err(Error::msg("--max-len must be at least 2")),
        Some(n) => Ok(n),
        None => Ok(p),
    }
}
