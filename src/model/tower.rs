//! The two CLIP towers, written once over [`Ops`] and run by every backend, for inference and
//! training alike: their parameters loaded through the schema, the embeddings, the encoder (the
//! one block of [`super::block`], each residual add fused into a Linear, the last block for the
//! pooled rows only), the final LayerNorm of the pooled rows and the projection. A training
//! forward ([`Mode::Train`]) keeps what [`super::tower_backward`] needs.
//!
//! Vision: patch convolution, class token + positions, pre-LN, encoder (non-causal), post-LN of
//! the class rows, visual projection. Text: token + position embeddings, the causal encoder over
//! packed sequences (each cut after its end token, no padding) or, where the backend has no
//! packed attention or for layer-by-layer parity, a padded batch; final LN of the end-token rows,
//! text projection.
use super::block::{forward, BlockRef, Saved, Stored};
use super::config::{TextConfig, TowerConfig, VisionConfig};
use super::schema::{names, Param, Schema, Tower};
use super::text::pool_position;
use super::tower_backward::Grads;
use super::weights::Weights;
use crate::backend::{Ops, Seqs};
use crate::error::{Error, Result};
use crate::shape_err;
use crate::tensor::DType;

/// Sees intermediate activations by name with their shape (parity tests); None in production.
pub type Hook<'a, O> = Option<&'a mut dyn FnMut(&str, &<O as Ops>::Buf, &[usize])>;

fn see<O: Ops>(hook: &mut Hook<O>, name: &str, x: &O::Buf, shape: &[usize]) {
    if let Some(h) = hook {
        h(name, x, shape);
    }
}

/// One tower's parameters on a backend, in schema order.
pub struct TowerParams<O: Ops> {
    pub tower: Tower,
    schema: Schema,
    /// The schema index of `p[0]`.
    first: usize,
    p: Vec<Stored<O>>,
}

/// Is this parameter a Linear weight (held with its low-precision copy in bf16)?
fn is_linear(p: &Param) -> bool {
    p.is_block_linear() || p.name == names::VISUAL_PROJECTION || p.name == names::TEXT_PROJECTION
}

impl<O: Ops> TowerParams<O> {
    /// The tower's tensors of `weights` (any stored dtype, shapes checked) on `ops`; Linear
    /// weights also in `dtype` when that is BF16/F16 (the patch convolution stays f32).
    pub fn load(ops: &O, schema: &Schema, tower: Tower, weights: &Weights, dtype: DType) -> Result<TowerParams<O>> {
        Self::load_with(ops, schema, tower, dtype, |q| weights.get_shaped(&q.name, &q.shape))
    }

    /// [`load`](Self::load) with each parameter's values from `value` (e.g. a training model's).
    pub fn load_with(ops: &O, schema: &Schema, tower: Tower, dtype: DType, value: impl Fn(&Param) -> Result<crate::tensor::Tensor>) -> Result<TowerParams<O>> {
        let idx = schema.tower(tower);
        let first = *idx.first().ok_or_else(|| Error::msg("empty tower"))?;
        let mut p = Vec::with_capacity(idx.len());
        for &i in &idx {
            let q = &schema.params()[i];
            let b = ops.upload_tensor(&value(q)?)?;
            p.push(if is_linear(q) {
                Stored::Linear(ops.weight(b, q.shape[0], q.shape[1], dtype)?)
            } else if q.name == names::PATCH_EMBEDDING {
                Stored::Linear(ops.weight(b, q.shape[0], q.numel() / q.shape[0], dtype)?)
            // the patch convolution is a Linear over im2col rows
            } else {
                Stored::Buf(b)
            });
        }
        Ok(TowerParams { tower, schema: schema.clone(), first, p })
    }

    /// Marks the Linear weights as fixed (an inference model): the backend may keep them in its
    /// forward GEMM's layout ([`Ops::freeze_weight`]; the CPU packs f32 weights once).
    pub fn freeze(mut self, ops: &O) -> Result<Self> {
        for s in &mut self.p {
            if let Stored::Linear(w) = s {
                ops.freeze_weight(w)?;
            }
        }
        Ok(self)
    }

    /// Tower-local parameter `i` as the backend holds it.
    pub fn stored(&self, i: usize) -> &Stored<O> {
        &self.p[i]
    }
    /// Tower-local parameter `i`, to change in place (a Linear weight's f32 values included; its
    /// low-precision or frozen copy, if any, is not remade): finite differences in tests.
    pub fn stored_mut(&mut self, i: usize) -> &mut Stored<O> {
        &mut self.p[i]
    }

    /// The same parameters on another backend (values read back with `download`), Linear
    /// weights (and the patch convolution's) also in `dtype` there.
    pub fn upload<P: Ops>(&self, src: &O, ops: &P, dtype: DType) -> Result<TowerParams<P>> {
        let schema = &self.schema;
        let p = self
            .p
            .iter()
            .map(|s| {
                let b = ops.upload(&src.download(s.buf())?)?;
                Ok(match s {
                    Stored::Buf(_) => Stored::Buf(b),
                    Stored::Linear(w) => Stored::Linear(ops.weight(b, w.n, w.k, dtype)?),
                })
            })
            .collect::<Result<_>>()?;
        Ok(TowerParams { tower: self.tower, schema: schema.clone(), first: self.first, p })
    }

    fn get(&self, name: &str) -> Result<&Stored<O>> {
        self.schema
            .index(name)
            .and_then(|i| i.checked_sub(self.first))
            .and_then(|i| self.p.get(i))
            .ok_or_else(|| Error::msg(format!("no parameter {name} in this tower")))
    }
    /// Replaces a plain (non-Linear) parameter's values, e.g. to perturb a weight in a test.
    pub fn set(&mut self, name: &str, b: O::Buf) -> Result<()> {
        let i = self.schema.index(name).and_then(|i| i.checked_sub(self.first)).filter(|&i| i < self.p.len());
        match i.map(|i| &mut self.p[i]) {
            Some(Stored::Buf(old)) => {
                *old = b;
                Ok(())
            }
            _ => Err(Error::msg(format!("{name}: not a plain parameter of this tower"))),
        }
    }
    pub fn param(&self, name: &str) -> Result<&O::Buf> {
        Ok(self.get(name)?.buf())
    }
    pub fn linear(&self, name: &str) -> Result<&crate::backend::Weight<O>> {
        match self.get(name)? {
            Stored::Linear(w) => Ok(w),
            Stored::Buf(_) => Err(Error::msg(format!("{name} is not held as a Linear weight"))),
        }
    }
    /// The number of parameters of the tower.
    pub fn len(&self) -> usize {
        self.p.len()
    }
    pub fn is_empty(&self) -> bool {
        self.p.is_empty()
    }
    /// The tower-local index of a parameter (its place in a [`super::tower_backward::Grads`] list).
    pub fn local(&self, name: &str) -> Result<usize> {
        self.schema
            .index(name)
            .and_then(|i| i.checked_sub(self.first))
            .filter(|&i| i < self.p.len())
            .ok_or_else(|| Error::msg(format!("no parameter {name} in this tower")))
    }
    /// The schema's index of the tower's first parameter (tower-local index 0).
    pub fn first(&self) -> usize {
        self.first
    }
    /// The element count of tower-local parameter `i`.
    pub fn numel(&self, i: usize) -> usize {
        self.schema.params()[self.first + i].numel()
    }
    /// The tower-local index of block `l`'s first tensor.
    pub fn block_index(&self, l: usize) -> Result<usize> {
        Ok(self.schema.block(self.tower, l).start - self.first)
    }
    /// Block `l`'s 16 parameters.
    pub fn block<'a>(&'a self, l: usize, cfg: &'a TowerConfig) -> Result<BlockRef<'a, O>> {
        let r = self.schema.block(self.tower, l);
        BlockRef::new(&self.p[r.start - self.first..r.end - self.first], cfg)
    }

    /// The encoder on x [N, W] → the last block's output ([R, W] with `pool`: those rows only),
    /// and what the blocks kept for the backward (with `recompute`, each block's input only).
    /// `hook` sees `{name}.layer.{i}`.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    pub fn encoder(
        &self,
        ops: &O,
        cfg: &TowerConfig,
        x: O::Buf,
        seqs: &Seqs,
        pool: Option<&[usize]>,
        mode: Mode,
        name: &str,
        hook: &mut Hook<O>,
    ) -> Result<(O::Buf, Vec<Kept<O>>)> {
        let (n, w) = (seqs.rows(), cfg.hidden);
        let (mut x, mut kept) = (x, Vec::new());
        for l in 0..cfg.layers {
            let rows = pool.filter(|_| l + 1 == cfg.layers);
            let blk = self.block(l, cfg)?;
            x = match mode {
                Mode::Train { recompute: true } => {
                    kept.push(Kept::Input(ops.copy(&x, n * w)?));
                    forward(ops, &blk, x, seqs, rows, false)?.0
                }
                _ => {
                    let (y, saved) = forward(ops, &blk, x, seqs, rows, mode != Mode::Infer)?;
                    kept.extend(saved.map(Kept::All));
                    y
                }
            };
            let r = rows.map_or(n, |r| r.len());
            see::<O>(hook, &format!("{name}.layer.{l}"), &x, &[r, w]);
        }
        if let Some(p) = pool.filter(|_| cfg.layers == 0) {
            x = ops.gather_rows(&x, p, w)?; // no blocks: [R, W]
        }
        Ok((x, kept))
    }

    /// LayerNorm `ln` of x ([rows, W]), then the projection `proj` → (normed [rows, W], e [rows,
    /// D], the LayerNorm's (input, statistics) for the backward).
    #[allow(clippy::type_complexity)]
    pub(super) fn head(&self, ops: &O, x: O::Buf, ln: &str, proj: &str, rows: usize, cfg: &TowerConfig) -> Result<(O::Buf, O::Buf, (O::Buf, O::Buf))> {
        let (g, b) = (self.param(&format!("{ln}.weight"))?, self.param(&format!("{ln}.bias"))?);
        let (normed, stats) = ops.layernorm_for_linear(&x, g, b, rows, cfg.hidden, cfg.eps)?; // [R, W]
        let e = ops.linear(&normed, self.linear(proj)?, None, rows)?; // [R, D]
        Ok((normed, e, (x, stats)))
    }

    /// Pixels [B, C, S, S] (consumed) → image embeddings [B, D] (not normalised), and in training
    /// what the backward needs. `hook` sees vision.embeddings, vision.pre_ln, vision.layer.{i}
    /// (the last: class rows only), vision.pooled, vision.embeds.
    pub fn vision(&self, ops: &O, cfg: &VisionConfig, pixels: O::Buf, b: usize, mode: Mode, hook: &mut Hook<O>) -> Result<(O::Buf, Option<TowerSaved<O>>)> {
        let (w, t) = (cfg.tower.hidden, cfg.tokens());
        let (x, h, st0) = self.vision_stem(ops, cfg, &pixels, b)?; // [B·T, W] twice
        see::<O>(hook, "vision.embeddings", &x, &[b, t, w]);
        see::<O>(hook, "vision.pre_ln", &h, &[b, t, w]);
        let cls: Vec<usize> = (0..b).map(|i| i * t).collect();
        let seqs = Seqs::Batch { batch: b, seq: t, causal: false };
        let (x_last, blocks) = self.encoder(ops, &cfg.tower, h, &seqs, Some(&cls), mode, "vision", hook)?; // [B, W]
        let (normed, e, head) = self.head(ops, x_last, names::POST_LN, names::VISUAL_PROJECTION, b, &cfg.tower)?;
        see::<O>(hook, "vision.pooled", &normed, &[b, w]);
        see::<O>(hook, "vision.embeds", &e, &[b, self.linear(names::VISUAL_PROJECTION)?.n]);
        let saved = (mode != Mode::Infer).then(|| TowerSaved {
            seqs,
            pool: Some(cls),
            blocks,
            head,
            normed,
            input: Input::Pixels { pixels, b, x, stats: st0 },
            on_block: None,
        });
        Ok((e, saved))
    }

    /// Pixels [B, C, S, S] → (class token + patches + positions x [B·T, W], its pre-LayerNorm h
    /// [B·T, W], the LayerNorm's statistics).
    pub(super) fn vision_stem(&self, ops: &O, cfg: &VisionConfig, pixels: &O::Buf, b: usize) -> Result<(O::Buf, O::Buf, O::Buf)> {
        let (w, t, c, s, p) = (cfg.tower.hidden, cfg.tokens(), cfg.channels, cfg.image_size, cfg.patch_size);
        let patches = ops.patch_embed(pixels, self.linear(names::PATCH_EMBEDDING)?, b, c, s, p)?; // [B·N, W]
        let x = ops.vision_embed(&patches, self.param(names::CLASS_EMBEDDING)?, self.param(names::VISION_POSITIONS)?, b, t - 1, w)?; // [B·T, W]
        drop(patches);
        let (h, st0) =
            ops.layernorm(&x, self.param(&format!("{}.weight", names::PRE_LN))?, self.param(&format!("{}.bias", names::PRE_LN))?, b * t, w, cfg.tower.eps)?; // [B·T, W]
        Ok((x, h, st0))
    }

    /// Token ids (start/end tokens included, unpadded) → text embeddings [B, D] (not normalised),
    /// and in training what the backward needs. Packed when the backend has packed attention and
    /// `pad_to` is None; else padded with the end token to the longest sequence or `pad_to`.
    /// `hook` sees text.embeddings, text.layer.{i} (the last: end-token rows only), text.pooled
    /// (the final LayerNorm's rows), text.embeds.
    pub fn text(
        &self,
        ops: &O,
        cfg: &TextConfig,
        ids: &[Vec<u32>],
        pad_to: Option<usize>,
        mode: Mode,
        hook: &mut Hook<O>,
    ) -> Result<(O::Buf, Option<TowerSaved<O>>)> {
        let w = cfg.tower.hidden;
        let (tok, pos, seqs, ends) = text_rows(cfg, ids, pad_to, pad_to.is_none() && ops.packed_attention())?;
        let x = self.text_embed(ops, &tok, &pos, w)?; // [N, W]
        see::<O>(hook, "text.embeddings", &x, &[tok.len(), w]);
        let (x, blocks) = self.encoder(ops, &cfg.tower, x, &seqs, Some(&ends), mode, "text", hook)?; // [B, W]
        let b = ids.len();
        let (normed, e, head) = self.head(ops, x, names::FINAL_LN, names::TEXT_PROJECTION, b, &cfg.tower)?;
        see::<O>(hook, "text.pooled", &normed, &[b, w]);
        see::<O>(hook, "text.embeds", &e, &[b, self.linear(names::TEXT_PROJECTION)?.n]);
        let saved = (mode != Mode::Infer).then(|| TowerSaved {
            seqs,
            pool: Some(ends),
            blocks,
            head,
            normed,
            input: Input::Tokens { tok, pos, states_pool: None },
            on_block: None,
        });
        Ok((e, saved))
    }

    /// The text tower's final token states [B·T, W] (after the final LayerNorm; T = the longest
    /// sequence, shorter ones padded with the end token) and the embeddings [B, D], with what the
    /// backward needs in training (SmartCLIP's mask network reads every token state).
    #[allow(clippy::type_complexity)]
    pub fn text_states(&self, ops: &O, cfg: &TextConfig, ids: &[Vec<u32>], mode: Mode) -> Result<(O::Buf, O::Buf, Option<TowerSaved<O>>)> {
        let w = cfg.tower.hidden;
        let (tok, pos, seqs, ends) = text_rows(cfg, ids, None, false)?;
        let n = tok.len();
        let x = self.text_embed(ops, &tok, &pos, w)?; // [N, W]
        let (x, blocks) = self.encoder(ops, &cfg.tower, x, &seqs, None, mode, "text", &mut None)?; // [N, W]
        let (g, b) = (self.param(&format!("{}.weight", names::FINAL_LN))?, self.param(&format!("{}.bias", names::FINAL_LN))?);
        let (states, stats) = ops.layernorm(&x, g, b, n, w, cfg.tower.eps)?; // [N, W]
        let pooled = ops.gather_rows(&states, &ends, w)?; // [B, W]
        let e = ops.linear(&pooled, self.linear(names::TEXT_PROJECTION)?, None, ids.len())?; // [B, D]
        if mode == Mode::Infer {
            return Ok((states, e, None));
        }
        let out = ops.copy(&states, n * w)?;
        let input = Input::Tokens { tok, pos, states_pool: Some((ends, pooled)) };
        Ok((out, e, Some(TowerSaved { seqs, pool: None, blocks, head: (x, stats), normed: states, input, on_block: None })))
    }

    /// Token + position embeddings of the rows → [N, W].
    pub(super) fn text_embed(&self, ops: &O, tok: &[usize], pos: &[usize], w: usize) -> Result<O::Buf> {
        let mut x = ops.gather_rows(self.param(names::TOKEN_EMBEDDING)?, tok, w)?; // [N, W]
        ops.axpy(&mut x, &ops.gather_rows(self.param(names::TEXT_POSITIONS)?, pos, w)?, 1.0, tok.len() * w)?;
        Ok(x)
    }
}

/// How a forward runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Nothing kept.
    Infer,
    /// Activations kept for the backward, or (`recompute`) only each block's input.
    Train { recompute: bool },
}

/// What one block kept.
pub enum Kept<O: Ops> {
    All(Saved<O>),
    /// The block's input (the forward re-runs in the backward).
    Input(O::Buf),
}

/// The tower's input as the backward needs it.
pub enum Input<O: Ops> {
    /// The pixels, the embeddings before the pre-LayerNorm and its statistics.
    Pixels { pixels: O::Buf, b: usize, x: O::Buf, stats: O::Buf },
    /// Token and position ids of the rows; for token states, the end rows and the projection's input.
    Tokens { tok: Vec<usize>, pos: Vec<usize>, states_pool: Option<(Vec<usize>, O::Buf)> },
}

/// What a training forward keeps (see [`super::tower_backward`]).
pub struct TowerSaved<O: Ops> {
    pub(super) seqs: Seqs,
    /// The rows the last block computes (None: all of them).
    pub(super) pool: Option<Vec<usize>>,
    pub(super) blocks: Vec<Kept<O>>,
    /// The final LayerNorm's input and statistics, and its output.
    pub(super) head: (O::Buf, O::Buf),
    pub(super) normed: O::Buf,
    pub(super) input: Input<O>,
    /// Called by the backward after each block with the tower-local indices of the parameters
    /// whose gradients it just added (data parallel: their bucket may be all-reduced now).
    pub(super) on_block: Option<BlockDone<O>>,
}

/// What the backward calls when a block's parameter gradients are done: (ops, the gradients,
/// the block's tower-local parameter indices).
pub type BlockDone<O> = Box<dyn FnMut(&O, &mut Grads<O>, &[usize]) -> Result<()>>;

impl<O: Ops> TowerSaved<O> {
    /// The rows the encoder computed (text: Σ caption lengths when packed, B·T when padded).
    pub fn rows(&self) -> usize {
        self.seqs.rows()
    }
    /// Sets what the backward calls after each block ([`BlockDone`]).
    pub fn on_block(&mut self, f: BlockDone<O>) {
        self.on_block = Some(f);
    }
    /// Whether the sequences ran packed (no padding).
    pub fn packed(&self) -> bool {
        matches!(self.seqs, Seqs::Packed(_))
    }
}

/// Checks a text batch and lays out its rows (see [`text_layout`]); `pad_to` pads further.
#[allow(clippy::type_complexity)]
pub(super) fn text_rows(cfg: &TextConfig, ids: &[Vec<u32>], pad_to: Option<usize>, packed: bool) -> Result<(Vec<usize>, Vec<usize>, Seqs, Vec<usize>)> {
    let lens: Vec<usize> = ids.iter().map(|s| if s.is_empty() { 0 } else { pool_position(s, cfg.eos_token_id) + 1 }).collect();
    let longest = ids.iter().map(|s| s.len()).max().unwrap_or(0);
    if ids.is_empty() || lens.contains(&0) {
        return Err(shape_err!("text tower needs at least one sequence, none of them empty"));
    }
    let t = pad_to.unwrap_or(longest).max(longest);
    if t > cfg.max_positions {
        return Err(shape_err!("sequence of {t} tokens exceeds the model's {} positions", cfg.max_positions));
    }
    if let Some(&bad) = ids.iter().flatten().find(|&&id| id as usize >= cfg.vocab) {
        return Err(shape_err!("token id {bad} outside the vocabulary of {}", cfg.vocab));
    }
    Ok(text_layout(ids, &lens, t, cfg.eos_token_id as usize, packed))
}

/// The rows of a text batch: (token ids, position ids, the attention's grouping, the pooled
/// (end-token) rows). Packed: each sequence cut after its pooled token (`lens`), back to back;
/// else padded with the end token to `t` tokens each.
pub fn text_layout(ids: &[Vec<u32>], lens: &[usize], t: usize, eos: usize, packed: bool) -> (Vec<usize>, Vec<usize>, Seqs, Vec<usize>) {
    if packed {
        let tok = ids.iter().zip(lens).flat_map(|(s, &l)| s[..l].iter().map(|&i| i as usize)).collect();
        let pos = lens.iter().flat_map(|&l| 0..l).collect();
        let ends = lens.iter().scan(0, |off, &l| Some(std::mem::replace(off, *off + l) + l - 1)).collect();
        (tok, pos, Seqs::Packed(lens.to_vec()), ends)
    } else {
        let b = ids.len();
        let tok = ids.iter().flat_map(|s| s.iter().map(|&i| i as usize).chain(std::iter::repeat_n(eos, t - s.len()))).collect();
        let pos = (0..b).flat_map(|_| 0..t).collect();
        let ends = lens.iter().enumerate().map(|(i, &l)| i * t + l - 1).collect();
        (tok, pos, Seqs::Batch { batch: b, seq: t, causal: true }, ends)
    }
}
