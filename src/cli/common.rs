//! What the model-using commands share: loading a model directory, reading texts and images in
//! batches, running the towers with a progress bar.
use super::Compute;
use crate::error::{Error, Result};
use crate::io::image_prep::{load_rgb8_hf, preprocess, PreprocessConfig};
use crate::io::tokenizer::ClipTokenizer;
use crate::model::clip::l2_normalize;
use crate::cuda::CudaClip;
use crate::model::{ClipParts, LoadOptions, Towers};
use crate::tensor::Tensor;
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// A loaded model and, with `--device cuda` (or auto on a machine with a GPU), its towers on the
/// CUDA backend. Derefs to the CPU model (config, logit scale).
pub struct Loaded {
    pub model: ClipParts,
    pub cuda: Option<CudaClip>,
}

impl std::ops::Deref for Loaded {
    type Target = ClipParts;
    fn deref(&self) -> &ClipParts {
        &self.model
    }
}

impl Loaded {
    /// The model on `engine`: the CUDA towers get every weight uploaded once.
    /// `dtype`: what the CUDA towers compute in (the CPU model is loaded in its own dtype).
    pub fn new(model: ClipParts, engine: super::Engine, dtype: crate::tensor::DType) -> Result<Loaded> {
        let cuda = match engine {
            super::Engine::Cpu => None,
            super::Engine::Cuda(ops) => Some(CudaClip::with_dtype(Box::new(ops), &model, dtype)?),
        };
        Ok(Loaded { model, cuda })
    }
}

pub fn load_model(dir: &Path, towers: Towers, compute: Compute) -> Result<Loaded> {
    let engine = super::resolve_device(compute.device, compute.dtype)?;
    let compute_dtype = compute.dtype.dtype()?;
    // On CUDA the CPU copy is only the source of the uploads (and the config): load it as f32.
    let dtype = if matches!(engine, super::Engine::Cuda(_)) { crate::tensor::DType::F32 } else { compute_dtype };
    Loaded::new(ClipParts::load_dir(dir, towers, &LoadOptions { dtype })?, engine, compute_dtype)
}

/// The model's preprocessing: preprocessor_config.json if present, else OpenAI's at its image size.
pub fn preprocess_config(dir: &Path, image_size: usize) -> Result<PreprocessConfig> {
    let p = dir.join("preprocessor_config.json");
    if p.exists() {
        let s = std::fs::read_to_string(&p).map_err(|e| Error::file(&p, format!("cannot read: {e}")))?;
        let c = PreprocessConfig::from_json_str(&s).map_err(|e| Error::file(&p, e))?;
        if c.crop_h as usize != image_size || c.crop_w as usize != image_size {
            return Err(Error::file(&p, format!("crop size {}×{} does not match the model's image_size {image_size}", c.crop_h, c.crop_w)));
        }
        Ok(c)
    } else {
        eprintln!("note: {} is missing: using OpenAI CLIP's preprocessing (resize to {image_size}, centre crop, OpenAI mean/std)", p.display());
        Ok(PreprocessConfig::openai(image_size as u32))
    }
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

/// Image paths from arguments or a directory (its image files sorted by name; other files, as
/// `.DS_Store` or `README.txt`, are skipped with a note, as `eval` does).
pub fn image_paths(args: &[PathBuf], dir: Option<&Path>) -> Result<Vec<PathBuf>> {
    let paths = match dir {
        Some(d) => {
            let rd = std::fs::read_dir(d).map_err(|e| Error::file(d, format!("cannot list directory: {e}")))?;
            let files: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file()).collect();
            let (mut v, mut other): (Vec<PathBuf>, Vec<PathBuf>) = files.into_iter().partition(|p| crate::eval::data::is_image(p));
            (v.sort(), other.sort());
            if !other.is_empty() {
                let names: Vec<String> = other.iter().take(5).map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
                eprintln!("note: skipped {} file(s) of {} that are not images by their extension: {}{}", other.len(), d.display(), names.join(", "), if other.len() > 5 { ", ..." } else { "" });
            }
            if v.is_empty() {
                return Err(Error::file(d, "holds no image files (png, jpg, jpeg, webp, bmp, gif, tif, tiff)"));
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

/// Embeds texts in batches → [N, D] (L2-normalised if `normalize`).
pub fn embed_texts(model: &Loaded, tok: &ClipTokenizer, texts: &[String], batch: usize, normalize: bool, quiet: bool) -> Result<Tensor> {
    let tower = model.text()?;
    let bar = super::progress(texts.len() as u64, "texts");
    if quiet || texts.len() <= batch {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut parts = vec![];
    for chunk in texts.chunks(batch.max(1)) {
        let ids = tok.encode_batch(chunk)?;
        let e = match &model.cuda {
            Some(c) => Tensor::from_vec(c.embed_texts(&ids)?, &[ids.len(), c.projection_dim])?,
            None => tower.forward(&ids, None, &mut |_, _| {})?, // [b, D]
        };
        parts.push(if normalize { l2_normalize(&e)? } else { e });
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let hint = crate::io::tokenizer::cut_hint(tok.context_length, model.config.text.max_positions);
    if let Some(note) = tok.take_cut().note(tok.context_length, "texts", &hint) {
        eprintln!("{note}");
    }
    Tensor::cat(&parts.iter().collect::<Vec<_>>(), 0)
}

/// Embeds images in batches → [N, D]. Decoding and preprocessing run in parallel.
pub fn embed_images(model: &Loaded, pre: &PreprocessConfig, paths: &[PathBuf], batch: usize, normalize: bool, quiet: bool) -> Result<Tensor> {
    let tower = model.vision()?;
    let s = tower.cfg.image_size;
    let bar = super::progress(paths.len() as u64, "images");
    if quiet || paths.len() <= batch {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut parts = vec![];
    for chunk in paths.chunks(batch.max(1)) {
        let px: Vec<Vec<f32>> = chunk.par_iter().map(|p| Ok(preprocess(&load_rgb8_hf(p)?, pre))).collect::<Result<_>>()?;
        let flat: Vec<f32> = px.concat();
        let e = match &model.cuda {
            Some(c) => Tensor::from_vec(c.embed_images(&flat, chunk.len())?, &[chunk.len(), c.projection_dim])?,
            None => tower.forward(&Tensor::from_vec(flat, &[chunk.len(), 3, s, s])?, &mut |_, _| {})?, // [b, D]
        };
        parts.push(if normalize { l2_normalize(&e)? } else { e });
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Tensor::cat(&parts.iter().collect::<Vec<_>>(), 0)
}

/// The context length to tokenize to: --max-len, else the model's positions.
pub fn context_length(model: &ClipParts, max_len: Option<usize>) -> Result<usize> {
    let p = model.config.text.max_positions;
    match max_len {
        Some(n) if n > p => Err(Error::msg(format!("--max-len {n} exceeds the model's {p} positions (stretch the model first)"))),
        Some(n) if n < 2 => Err(Error::msg("--max-len must be at least 2")),
        Some(n) => Ok(n),
        None => Ok(p),
    }
}
