//! What the model-using commands share: opening a model through the library API, reading texts
//! and images, embedding them in batches with a progress bar.
use super::Compute;
use clipforge::api::{ClipModel, DeviceChoice, ImageOptions, OpenOptions};
use clipforge::error::{Error, Result};
use clipforge::io::image_prep::PreprocessConfig;
use clipforge::io::tokenizer::ClipTokenizer;
use clipforge::model::Towers;
use clipforge::tensor::Tensor;
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
    Ok(OpenOptions { device, dtype: compute.dtype.dtype()?, towers, tf32: !compute.no_tf32 })
}

/// Opens the model; with the image tower, checks its preprocessing up front (and notes a
/// missing preprocessor_config.json).
pub fn load_model(dir: &Path, towers: Towers, compute: Compute) -> Result<Loaded> {
    let model = ClipModel::open(dir, &open_options(towers, compute)?)?;
    if towers != Towers::Text {
        preprocess_config(dir, model.config().vision.image_size)?;
    }
    Ok(model)
}

/// The model's preprocessing: preprocessor_config.json if present, else OpenAI's at its image size
/// (which is what a released `.pt` checkpoint uses).
pub fn preprocess_config(dir: &Path, image_size: usize) -> Result<PreprocessConfig> {
    if !dir.join("preprocessor_config.json").exists() && !clipforge::io::pt::is_pt_file(dir) {
        eprintln!(
            "note: {} is missing: using OpenAI CLIP's preprocessing (resize to {image_size}, centre crop, OpenAI mean/std)",
            dir.join("preprocessor_config.json").display()
        );
    }
    PreprocessConfig::for_model_dir(dir, image_size)
}

/// Texts from arguments or a file (one per line).
pub fn read_texts(args: &[String], file: Option<&Path>) -> Result<Vec<String>> {
    let texts: Vec<String> = match file {
        Some(f) => {
            let s = clipforge::io::text::read_utf8(f)?;
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
            let (mut v, mut other): (Vec<PathBuf>, Vec<PathBuf>) = files.into_iter().partition(|p| clipforge::eval::data::is_image(p));
            v.sort();
            other.sort();
            if !other.is_empty() {
                let names: Vec<String> = other.iter().take(5).map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
                eprintln!(
                    "note: skipped {} file(s) of {} that are not images by their extension: {}{}",
                    other.len(),
                    d.display(),
                    names.join(", "),
                    if other.len() > 5 { ", ..." } else { "" }
                );
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

/// A progress bar for `n` items, hidden when `quiet` or when one batch holds them all.
pub fn items_bar(n: usize, batch: usize, quiet: bool, what: &str) -> indicatif::ProgressBar {
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
    let hint = clipforge::io::tokenizer::cut_hint(tok.context_length, model.context_length());
    if let Some(note) = tok.take_cut().note(tok.context_length, "texts", &hint) {
        eprintln!("{note}");
    }
    e.to_tensor()
}

/// Embeds images in batches → [N, D]. Decoding and preprocessing run in parallel.
pub fn embed_images(model: &Loaded, paths: &[PathBuf], batch: usize, normalize: bool, quiet: bool) -> Result<Tensor> {
    let bar = items_bar(paths.len(), batch, quiet, "images");
    let e = model.embed_image_files_with(paths, &ImageOptions { normalize, batch }, &mut |n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    e.to_tensor()
}

/// A `.pt` checkpoint given where a command needs a model directory (fine-tuning, stretching):
/// converted into `dir` (replaced if there) and `dir` returned; a directory is returned as is.
pub fn model_dir(model: &Path, dir: &Path) -> Result<PathBuf> {
    if !clipforge::io::pt::is_pt_file(model) {
        return Ok(model.to_path_buf());
    }
    let r = clipforge::model::convert::convert_pt(model)?.write(dir, true)?;
    eprintln!("note: {} converted into {}", model.display(), r.out.display());
    Ok(r.out)
}
