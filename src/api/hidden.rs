//! Per-token outputs through the library API, as HF's `output_hidden_states=True` numbers them
//! (see [`crate::model::hidden`]): Long-CLIP or CLIP as the text encoder of a diffusion model
//! (the penultimate layer, 248 tokens), or image patch tokens for a vision-language model.
//!
//! ```no_run
//! use clipforge::{ClipModel, HiddenOptions, OpenOptions};
//! # fn main() -> clipforge::Result<()> {
//! let model = ClipModel::open("longclip-l", &OpenOptions::default())?;
//! let opts = HiddenOptions { layer: -2, ..HiddenOptions::default() }; // penultimate, padded to 248
//! let h = model.text_hidden_states(&["a long prompt ..."], &opts)?;
//! assert_eq!(h.hidden_states.shape(), &[1, model.context_length(), model.config().text.tower.hidden]);
//! # Ok(()) }
//! ```
use super::{finish, prep_rgb, ClipModel, Embeddings, RgbImage};
use crate::error::{Error, Result};
use crate::io::image_decode::load_rgb8_hf;
use crate::io::image_prep::preprocess;
use crate::model::hidden::resolve_layer;
use crate::tensor::Tensor;
use rayon::prelude::*;
use std::path::Path;

/// How texts are padded for per-token outputs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Padding {
    /// Every text padded to the context length (the tokenizer's max length): what diffusion
    /// pipelines feed their UNet.
    #[default]
    MaxLength,
    /// Every text padded to the longest text given.
    Longest,
}

/// Options of [`ClipModel::text_hidden_states`] and [`ClipModel::image_hidden_states`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HiddenOptions {
    /// HF's `hidden_states` index: 0 the embeddings (vision: after the pre-LayerNorm), i the output
    /// of layer i, −1 the last layer, −2 the penultimate (default −1).
    pub layer: i64,
    /// Apply the tower's final LayerNorm to every token (text `final_layer_norm`, vision
    /// `post_layernorm`), as diffusion pipelines do for the last layer (default off).
    pub final_layer_norm: bool,
    /// Text padding (default: to the context length).
    pub padding: Padding,
    /// Text context length (default: the model's positions).
    pub max_len: Option<usize>,
    /// Cut texts longer than the context (default); off: such a text is an error.
    pub truncate: bool,
    /// Texts or images per forward pass (default 32).
    pub batch: usize,
}

impl Default for HiddenOptions {
    fn default() -> Self {
        HiddenOptions { layer: -1, final_layer_norm: false, padding: Padding::MaxLength, max_len: None, truncate: true, batch: 32 }
    }
}

/// Per-token text outputs of N texts padded to T tokens.
#[derive(Clone, Debug)]
pub struct TextHidden {
    /// [N, T, W] the chosen hidden state of every token.
    pub hidden_states: Tensor,
    /// [N·T] 1 for the text's tokens (start to end token), 0 for padding.
    pub attention_mask: Vec<u8>,
    /// [N·T] the token ids, padded with the end token.
    pub input_ids: Vec<u32>,
    /// [N, D] the projected pooled output of the last layer (HF's `text_embeds`; not normalised).
    pub text_embeds: Embeddings,
    /// The tokens per text, T.
    pub tokens: usize,
}

/// Per-token image outputs of N images.
#[derive(Clone, Debug)]
pub struct ImageHidden {
    /// [N, T, W] the chosen hidden state of every token, class token first (T = 1 + patches).
    pub hidden_states: Tensor,
    /// [N, D] the projected class output of the last layer (HF's `image_embeds`; not normalised).
    pub image_embeds: Embeddings,
}

impl ClipModel {
    /// Texts → per-token hidden states (see [`HiddenOptions`]).
    pub fn text_hidden_states<S: AsRef<str>>(&self, texts: &[S], opts: &HiddenOptions) -> Result<TextHidden> {
        let (tok, ids) = self.encode(texts, opts.max_len, opts.truncate)?;
        self.token_hidden_states(&ids, tok.context_length, opts)
    }

    /// Token ids (start and end tokens included, unpadded) → per-token hidden states; `context`
    /// is the length [`Padding::MaxLength`] pads to.
    pub fn token_hidden_states(&self, ids: &[Vec<u32>], context: usize, opts: &HiddenOptions) -> Result<TextHidden> {
        let cfg = &self.parts.config.text;
        let layer = resolve_layer(opts.layer, cfg.tower.layers)?;
        let longest = ids.iter().map(|s| s.len()).max().ok_or_else(|| Error::msg("no texts to embed"))?;
        let t = match opts.padding {
            Padding::MaxLength => context.max(longest),
            Padding::Longest => longest,
        };
        let w = cfg.tower.hidden;
        let (mut states, mut embeds) = (Vec::with_capacity(ids.len() * t * w), Vec::new());
        for chunk in ids.chunks(opts.batch.max(1)) {
            let (s, e) = match &self.cuda {
                Some(c) => c.text_hidden(chunk, t, layer, opts.final_layer_norm)?,
                None => {
                    let (s, e) = self.parts.text()?.hidden_states(chunk, t, layer, opts.final_layer_norm)?; // [b, T, W], [b, D]
                    (s.to_vec_f32(), e.to_vec_f32())
                }
            };
            states.extend(s);
            embeds.extend(e);
        }
        let eos = cfg.eos_token_id;
        let input_ids = ids.iter().flat_map(|s| s.iter().copied().chain(std::iter::repeat_n(eos, t - s.len()))).collect();
        let attention_mask = ids.iter().flat_map(|s| (0..t).map(move |j| u8::from(j < s.len()))).collect();
        Ok(TextHidden {
            hidden_states: Tensor::from_vec(states, &[ids.len(), t, w])?,
            attention_mask,
            input_ids,
            text_embeds: finish(embeds, ids.len(), self.embed_dim(), false)?,
            tokens: t,
        })
    }

    /// Decoded RGB images → per-token hidden states (`opts.layer`, `opts.final_layer_norm`,
    /// `opts.batch`; the text options are ignored).
    pub fn image_hidden_states(&self, images: &[RgbImage], opts: &HiddenOptions) -> Result<ImageHidden> {
        let pre = self.preprocess_config()?;
        self.hidden_batches(images, opts, |im| prep_rgb(im, &pre))
    }

    /// Image files → per-token hidden states, each batch decoded in parallel.
    pub fn image_file_hidden_states<P: AsRef<Path> + Sync>(&self, paths: &[P], opts: &HiddenOptions) -> Result<ImageHidden> {
        let pre = self.preprocess_config()?;
        self.hidden_batches(paths, opts, |p| Ok(preprocess(&load_rgb8_hf(p.as_ref()).map_err(Error::msg)?, &pre)))
    }

    /// Pixels [N, 3, S, S] already preprocessed → per-token hidden states.
    pub fn pixel_hidden_states(&self, pixels: &[f32], n: usize, opts: &HiddenOptions) -> Result<ImageHidden> {
        let layer = resolve_layer(opts.layer, self.parts.config.vision.tower.layers)?;
        let cfg = &self.parts.config.vision;
        let (t, w, s) = (cfg.tokens(), cfg.tower.hidden, cfg.image_size);
        let (states, embeds) = match &self.cuda {
            Some(c) => c.vision_hidden(pixels, n, layer, opts.final_layer_norm)?,
            None => {
                let px = Tensor::from_vec(pixels.to_vec(), &[n, cfg.channels, s, s])?;
                let (st, e) = self.parts.vision()?.hidden_states(&px, layer, opts.final_layer_norm)?; // [n, T, W], [n, D]
                (st.to_vec_f32(), e.to_vec_f32())
            }
        };
        Ok(ImageHidden { hidden_states: Tensor::from_vec(states, &[n, t, w])?, image_embeds: finish(embeds, n, self.embed_dim(), false)? })
    }

    fn hidden_batches<T: Sync>(&self, items: &[T], opts: &HiddenOptions, prep: impl Fn(&T) -> Result<Vec<f32>> + Sync) -> Result<ImageHidden> {
        if items.is_empty() {
            return Err(Error::msg("no images to embed"));
        }
        let cfg = &self.parts.config.vision;
        let (t, w) = (cfg.tokens(), cfg.tower.hidden);
        let (mut states, mut embeds) = (Vec::with_capacity(items.len() * t * w), Vec::new());
        for chunk in items.chunks(opts.batch.max(1)) {
            let px: Vec<Vec<f32>> = chunk.par_iter().map(&prep).collect::<Result<_>>()?;
            let h = self.pixel_hidden_states(&px.concat(), chunk.len(), opts)?;
            states.extend(h.hidden_states.to_vec_f32());
            embeds.extend(h.image_embeds.data);
        }
        Ok(ImageHidden { hidden_states: Tensor::from_vec(states, &[items.len(), t, w])?, image_embeds: finish(embeds, items.len(), self.embed_dim(), false)? })
    }
}
