//! The library API: open a CLIP model directory on a device and precision, embed images and
//! texts, compare them. The `clipforge` command line is one user of it; a Rust program is another.
//!
//! ```no_run
//! use clipforge::{ClipModel, OpenOptions};
//! # fn main() -> clipforge::Result<()> {
//! let model = ClipModel::open("clip-b32", &OpenOptions::default())?; // auto device, f32
//! let texts = model.embed_texts(&["a photo of a cat", "a diagram"])?; // [2, D], L2-normalised
//! let images = model.embed_image_files(&["photo.jpg"])?; // [1, D]
//! let cos = images.cosine(&texts)?; // [1, 2]
//! println!("cat: {:.3}, diagram: {:.3}", cos.row(0)[0], cos.row(0)[1]);
//! # Ok(()) }
//! ```
#![warn(missing_docs)]
use crate::error::{Error, Result};
use crate::io::image_decode::{load_rgb8_hf, RgbImage8};
use crate::io::image_prep::{preprocess, PreprocessConfig};
use crate::io::tokenizer::ClipTokenizer;
use crate::model::CudaClip;
use crate::model::{ClipConfig, ClipParts, LoadOptions, Towers, Weights};
use crate::tensor::{DType, Tensor};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

mod hidden;
pub use hidden::{HiddenOptions, ImageHidden, Padding, TextHidden};

/// A decoded 8-bit RGB image (interleaved, row-major), the input of [`ClipModel::embed_images`].
pub type RgbImage = RgbImage8;

/// Where a model computes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The CUDA backend when a GPU opens (and the precision runs there), else the CPU.
    #[default]
    Auto,
    /// The CPU backend (AVX-512 GEMMs, bf16 packed weights), whatever GPU there is.
    Cpu,
    /// The CUDA backend on device 0, or an error saying why not.
    Cuda,
}

/// How to open a model: device, precision, and which towers to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenOptions {
    /// Where the towers compute (default: auto).
    pub device: DeviceChoice,
    /// F32, or BF16 (bf16 Linear weights, bf16 GEMM inputs, f32 accumulation). F16 is refused.
    pub dtype: DType,
    /// A text-only program need not load the image tower, and vice versa.
    pub towers: Towers,
    /// With `dtype` F32 on a GPU: the GEMMs on the TF32 tensor cores (inputs rounded to a 10-bit
    /// mantissa, f32 accumulation, ~1e-3 relative) instead of exact FP32. Default off here (exact,
    /// as the CPU); the CLI turns it on unless `--no-tf32`. No effect on the CPU, in bf16, or on
    /// the emulator.
    pub tf32: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions { device: DeviceChoice::Auto, dtype: DType::F32, towers: Towers::Both, tf32: false }
    }
}

impl OpenOptions {
    /// These options on device `d`.
    pub fn device(mut self, d: DeviceChoice) -> Self {
        self.device = d;
        self
    }
    /// These options in precision `d`.
    pub fn dtype(mut self, d: DType) -> Self {
        self.dtype = d;
        self
    }
    /// These options loading only `t`.
    pub fn towers(mut self, t: Towers) -> Self {
        self.towers = t;
        self
    }
    /// These options with f32 GEMMs in TF32 on a GPU (`on`) or exact FP32.
    pub fn tf32(mut self, on: bool) -> Self {
        self.tf32 = on;
        self
    }
}

/// Options of text embedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TextOptions {
    /// Context length in tokens, start and end tokens included (default: the model's positions,
    /// 77 for CLIP, 248 for a stretched Long-CLIP model).
    pub max_len: Option<usize>,
    /// Cut longer texts CLIP-style (start token, first max_len−2 tokens, end token); `false`
    /// makes a longer text an error instead.
    pub truncate: bool,
    /// L2-normalise each embedding (default true).
    pub normalize: bool,
    /// Texts per forward pass.
    pub batch: usize,
}

impl Default for TextOptions {
    fn default() -> Self {
        TextOptions { max_len: None, truncate: true, normalize: true, batch: 64 }
    }
}

/// Options of image embedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageOptions {
    /// L2-normalise each embedding (default true).
    pub normalize: bool,
    /// Images per forward pass.
    pub batch: usize,
}

impl Default for ImageOptions {
    fn default() -> Self {
        ImageOptions { normalize: true, batch: 32 }
    }
}

/// A rows × cols matrix of f32, row-major: embeddings (one row per input) or scores.
#[derive(Clone, Debug, PartialEq)]
pub struct Embeddings {
    /// Rows: one per input (or per image of a score matrix).
    pub rows: usize,
    /// Values per row: the embedding size D (or the number of texts of a score matrix).
    pub dim: usize,
    /// `rows × dim` values, row-major.
    pub data: Vec<f32>,
}

impl Embeddings {
    /// A matrix from row-major data; an error unless `data.len() == rows·dim`.
    pub fn new(data: Vec<f32>, rows: usize, dim: usize) -> Result<Embeddings> {
        if data.len() != rows * dim {
            return Err(crate::shape_err!("{} values for a {rows} × {dim} matrix", data.len()));
        }
        Ok(Embeddings { rows, dim, data })
    }
    /// Row `i` (panics if out of range, like slice indexing).
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }
    /// The rows in order.
    pub fn iter_rows(&self) -> impl Iterator<Item = &[f32]> {
        self.data.chunks_exact(self.dim.max(1)).take(self.rows)
    }
    /// Each row divided by its L2 norm (a zero row stays zero).
    pub fn normalized(&self) -> Embeddings {
        let mut data = self.data.clone();
        for r in data.chunks_exact_mut(self.dim.max(1)) {
            let n = r.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt() as f32;
            if n > 0.0 {
                r.iter_mut().for_each(|a| *a /= n);
            }
        }
        Embeddings { data, ..*self }
    }
    /// Cosine similarity of every row of `self` with every row of `other` → [self.rows, other.rows].
    pub fn cosine(&self, other: &Embeddings) -> Result<Embeddings> {
        if self.dim != other.dim {
            return Err(crate::shape_err!("cosine of {}-dim and {}-dim embeddings", self.dim, other.dim));
        }
        let (a, b) = (self.normalized(), other.normalized());
        let data = a.iter_rows().flat_map(|x| b.iter_rows().map(move |y| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>())).collect();
        Embeddings::new(data, self.rows, other.rows)
    }
    /// The matrix as a [rows, dim] tensor (an error if `data` does not hold rows·dim values).
    pub fn to_tensor(&self) -> Result<Tensor> {
        Tensor::from_vec(self.data.clone(), &[self.rows, self.dim])
    }
}

/// A CLIP model opened for inference: config, weights on the chosen device, tokenizer and image
/// preprocessing from its directory.
pub struct ClipModel {
    /// The model directory (tokenizer.json, preprocessor_config.json); None for weights made in memory.
    dir: Option<PathBuf>,
    parts: ClipParts,
    cuda: Option<CudaClip>,
    dtype: DType,
}

impl ClipModel {
    /// Opens an HF CLIP directory (config.json, model.safetensors or shards, tokenizer.json,
    /// preprocessor_config.json), or a released PyTorch `.pt` checkpoint (OpenAI CLIP, Long-CLIP,
    /// SmartCLIP), converted in memory, with the built-in CLIP tokenizer and OpenAI's preprocessing.
    pub fn open(dir: impl AsRef<Path>, opts: &OpenOptions) -> Result<ClipModel> {
        let dir = dir.as_ref();
        if crate::io::pt::is_pt_file(dir) {
            let c = crate::model::convert::convert_pt(dir)?;
            let mut m = ClipModel::from_weights(&c.weights(), &c.config, opts)?;
            m.dir = Some(dir.to_path_buf());
            return Ok(m);
        }
        if !dir.is_dir() {
            return Err(Error::file(dir, "not a model directory (expected config.json and model.safetensors)"));
        }
        let config = ClipConfig::from_file(&dir.join("config.json"))?;
        let mut m = ClipModel::from_weights(&Weights::open(dir)?, &config, opts)?;
        m.dir = Some(dir.to_path_buf());
        Ok(m)
    }

    /// A model from weights already open or made in memory (e.g.
    /// [`random_weights`](crate::model::synthetic::random_weights)); it has no tokenizer or
    /// preprocessing, so it embeds token ids and pixels only.
    pub fn from_weights(weights: &Weights, config: &ClipConfig, opts: &OpenOptions) -> Result<ClipModel> {
        if opts.dtype == DType::F16 {
            return Err(Error::msg("dtype f16: inference computes in f32 or bf16 (use bf16)"));
        }
        let cuda_ops = open_device(opts.device, opts.dtype, opts.tf32)?;
        // On CUDA the host copy is only the source of the uploads (and the config): keep it f32.
        let host = if cuda_ops.is_some() { DType::F32 } else { opts.dtype };
        let parts = ClipParts::load(weights, config, opts.towers, &LoadOptions { dtype: host })?;
        let cuda = match cuda_ops {
            Some(ops) => Some(CudaClip::with_dtype(ops, &parts, opts.dtype)?),
            None => None,
        };
        Ok(ClipModel { dir: None, parts, cuda, dtype: opts.dtype })
    }

    /// The model's configuration (HF config.json).
    pub fn config(&self) -> &ClipConfig {
        &self.parts.config
    }
    /// The model directory or `.pt` file (None for weights made in memory).
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    fn need_dir(&self, what: &str) -> Result<&Path> {
        self.dir.as_deref().ok_or_else(|| Error::msg(format!("this model was made in memory: it has no {what}")))
    }
    /// The CPU model (towers, logit scale); its towers are not used when a GPU computes.
    pub fn parts(&self) -> &ClipParts {
        &self.parts
    }
    /// ln of the softmax temperature: probabilities are softmax(exp(s)·cosine).
    pub fn logit_scale(&self) -> f32 {
        self.parts.logit_scale
    }
    /// The embedding size D.
    pub fn embed_dim(&self) -> usize {
        self.parts.config.projection_dim
    }
    /// The compute precision.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Where the towers run, in words ("cpu", or the GPU's name).
    pub fn device(&self) -> String {
        self.cuda.as_ref().map_or_else(|| "cpu".to_string(), |c| c.describe())
    }
    /// The model's text positions (its longest context).
    pub fn context_length(&self) -> usize {
        self.parts.config.text.max_positions
    }

    /// The tokenizer of the model directory at `max_len` tokens (default: the model's positions).
    pub fn tokenizer(&self, max_len: Option<usize>) -> Result<ClipTokenizer> {
        let p = self.context_length();
        let n = match max_len {
            Some(n) if n > p => return Err(Error::msg(format!("max length {n} exceeds the model's {p} positions (stretch the model first)"))),
            Some(n) if n < 2 => return Err(Error::msg("max length must be at least 2")),
            Some(n) => n,
            None => p,
        };
        ClipTokenizer::from_file(self.need_dir("tokenizer.json")?, n)
    }

    /// The image preprocessing of the model directory (preprocessor_config.json, else OpenAI's).
    pub fn preprocess_config(&self) -> Result<PreprocessConfig> {
        PreprocessConfig::for_model_dir(self.need_dir("preprocessor_config.json")?, self.parts.config.vision.image_size)
    }

    /// Texts → L2-normalised embeddings [N, D], with the default [`TextOptions`].
    pub fn embed_texts<S: AsRef<str>>(&self, texts: &[S]) -> Result<Embeddings> {
        self.embed_texts_with(texts, &TextOptions::default(), &mut |_| {})
    }

    /// Texts → embeddings [N, D]; `done(n)` is called after each batch of n texts.
    pub fn embed_texts_with<S: AsRef<str>>(&self, texts: &[S], opts: &TextOptions, done: &mut dyn FnMut(usize)) -> Result<Embeddings> {
        let (_, ids) = self.encode(texts, opts.max_len, opts.truncate)?;
        self.embed_token_ids(&ids, opts.normalize, opts.batch, done)
    }

    /// The tokenizer at `max_len` and the ids of `texts` (unpadded); a text longer than the
    /// context is cut, or with `truncate` off an error naming it.
    fn encode<S: AsRef<str>>(&self, texts: &[S], max_len: Option<usize>, truncate: bool) -> Result<(ClipTokenizer, Vec<Vec<u32>>)> {
        let tok = self.tokenizer(max_len)?;
        let mut ids = Vec::with_capacity(texts.len());
        for (i, t) in texts.iter().enumerate() {
            let (s, lost) = tok.encode_counting(t.as_ref())?;
            if lost > 0 && !truncate {
                return Err(Error::msg(format!(
                    "text {i} has {} tokens, {lost} more than the context of {} (truncation is off)",
                    s.len() + lost,
                    tok.context_length
                )));
            }
            ids.push(s);
        }
        Ok((tok, ids))
    }

    /// Token ids (start and end tokens included, unpadded) → embeddings [N, D].
    pub fn embed_token_ids(&self, ids: &[Vec<u32>], normalize: bool, batch: usize, done: &mut dyn FnMut(usize)) -> Result<Embeddings> {
        if ids.is_empty() {
            return Err(Error::msg("no texts to embed"));
        }
        let d = self.embed_dim();
        let mut data = Vec::with_capacity(ids.len() * d);
        for chunk in ids.chunks(batch.max(1)) {
            let e = match &self.cuda {
                Some(c) => c.embed_texts(chunk)?,
                None => self.parts.text()?.embed(chunk)?.to_vec_f32(), // [b, D]
            };
            data.extend(e);
            done(chunk.len());
        }
        finish(data, ids.len(), d, normalize)
    }

    /// Image files → L2-normalised embeddings [N, D], with the default [`ImageOptions`].
    pub fn embed_image_files<P: AsRef<Path> + Sync>(&self, paths: &[P]) -> Result<Embeddings> {
        self.embed_image_files_with(paths, &ImageOptions::default(), &mut |_| {})
    }

    /// Image files → embeddings [N, D]: each batch decoded and preprocessed in parallel;
    /// `done(n)` is called after each batch of n images.
    pub fn embed_image_files_with<P: AsRef<Path> + Sync>(&self, paths: &[P], opts: &ImageOptions, done: &mut dyn FnMut(usize)) -> Result<Embeddings> {
        let pre = self.preprocess_config()?;
        self.embed_batches(paths, opts, done, |p| Ok(preprocess(&load_rgb8_hf(p.as_ref()).map_err(Error::msg)?, &pre)))
    }

    /// Decoded RGB images → L2-normalised embeddings [N, D] (preprocessed as the model's
    /// directory says: resize, centre crop, normalise).
    pub fn embed_images(&self, images: &[RgbImage]) -> Result<Embeddings> {
        let pre = self.preprocess_config()?;
        self.embed_batches(images, &ImageOptions::default(), &mut |_| {}, |im| prep_rgb(im, &pre))
    }

    /// Pixels [N, 3, S, S] already preprocessed → embeddings [N, D] (not normalised).
    pub fn embed_pixels(&self, pixels: &[f32], n: usize) -> Result<Embeddings> {
        match &self.cuda {
            Some(c) => Embeddings::new(c.embed_images(pixels, n)?, n, self.embed_dim()),
            None => self.embed_pixel_vec(pixels.to_vec(), n),
        }
    }

    /// [`embed_pixels`](Self::embed_pixels) of a batch it may keep (no copy on the CPU).
    fn embed_pixel_vec(&self, pixels: Vec<f32>, n: usize) -> Result<Embeddings> {
        let s = self.parts.config.vision.image_size;
        let e = match &self.cuda {
            Some(c) => c.embed_images(&pixels, n)?,
            None => self.parts.vision()?.embed(&Tensor::from_vec(pixels, &[n, 3, s, s])?)?.to_vec_f32(),
        };
        Embeddings::new(e, n, self.embed_dim())
    }

    fn embed_batches<T: Sync>(
        &self,
        items: &[T],
        opts: &ImageOptions,
        done: &mut dyn FnMut(usize),
        prep: impl Fn(&T) -> Result<Vec<f32>> + Sync,
    ) -> Result<Embeddings> {
        if items.is_empty() {
            return Err(Error::msg("no images to embed"));
        }
        let d = self.embed_dim();
        let mut data = Vec::with_capacity(items.len() * d);
        for chunk in items.chunks(opts.batch.max(1)) {
            let px: Vec<Vec<f32>> = chunk.par_iter().map(&prep).collect::<Result<_>>()?;
            data.extend(self.embed_pixel_vec(px.concat(), chunk.len())?.data);
            done(chunk.len());
        }
        finish(data, items.len(), d, opts.normalize)
    }

    /// Cosine similarities [I, T] and, per image, the softmax over the texts of exp(logit
    /// scale)·cosine [I, T].
    pub fn similarity(&self, images: &Embeddings, texts: &Embeddings) -> Result<(Embeddings, Embeddings)> {
        let cos = images.cosine(texts)?;
        let scale = self.logit_scale().exp();
        let logits: Vec<f32> = cos.data.iter().map(|c| c * scale).collect();
        let probs = crate::ops::softmax::softmax(&logits, texts.rows.max(1));
        Ok((cos.clone(), Embeddings::new(probs, cos.rows, cos.dim)?))
    }

    /// Zero-shot classification: each label put in `template` ("{}" marks the label), embedded,
    /// and compared with every image → probabilities [I, labels].
    pub fn zero_shot<S: AsRef<str>>(&self, images: &Embeddings, labels: &[S], template: &str) -> Result<Embeddings> {
        if !template.contains("{}") {
            return Err(Error::msg(format!("template {template:?} has no {{}} for the class name")));
        }
        let prompts: Vec<String> = labels.iter().map(|l| template.replace("{}", l.as_ref())).collect();
        let texts = self.embed_texts(&prompts)?;
        Ok(self.similarity(images, &texts)?.1)
    }
}

/// A decoded image checked (its bytes fill width × height × 3, neither side 0) and preprocessed.
fn prep_rgb(im: &RgbImage, pre: &PreprocessConfig) -> Result<Vec<f32>> {
    if im.data.len() != im.width as usize * im.height as usize * 3 || im.width == 0 || im.height == 0 {
        return Err(crate::shape_err!(
            "RGB image {}×{} with {} bytes (expected {})",
            im.width,
            im.height,
            im.data.len(),
            im.width as usize * im.height as usize * 3
        ));
    }
    Ok(preprocess(im, pre))
}

fn finish(data: Vec<f32>, rows: usize, d: usize, normalize: bool) -> Result<Embeddings> {
    let e = Embeddings::new(data, rows, d)?;
    Ok(if normalize { e.normalized() } else { e })
}

/// The GPU a request resolves to: `Cpu` → none; `Cuda` → device 0 or an error saying why not;
/// `Auto` → device 0 when it opens and `dtype` runs there (f32, bf16), else none. With `tf32`
/// and F32, the GPU's f32 GEMMs run in TF32 ([`crate::cuda::GpuOps::set_tf32`]).
pub fn open_device(d: DeviceChoice, dtype: DType, tf32: bool) -> Result<Option<Box<dyn crate::cuda::DeviceOps>>> {
    // GpuOps::open probes the driver first, so no driver is an Err, never a panic.
    let open = || {
        crate::cuda::GpuOps::open().map(|mut g| {
            g.set_tf32(tf32 && dtype == DType::F32);
            Box::new(g) as Box<dyn crate::cuda::DeviceOps>
        })
    };
    match d {
        DeviceChoice::Cpu => Ok(None),
        DeviceChoice::Auto if dtype == DType::F16 => Ok(None),
        DeviceChoice::Auto => Ok(open().ok()),
        DeviceChoice::Cuda if dtype == DType::F16 => Err(Error::Device("cuda: the CUDA towers compute in f32 or bf16, not f16; use bf16".into())),
        DeviceChoice::Cuda => open().map(Some).map_err(|why| Error::Device(format!("cuda: {why}; use the CPU or auto"))),
    }
}
