//! The trainable CLIP: every parameter as an f32 tensor under its HF name, and both towers as
//! tape computations (the same math as src/model/{vision,text,layers}.rs, checked against them
//! in tests/train_model.rs). One block function serves both towers; with `recompute` each block is
//! a checkpoint: its forward runs unrecorded and its backward re-runs it on a private tape.
use crate::autograd::{Tape, Var};
use crate::error::{Error, Result};
use crate::model::config::{Activation, ClipConfig, TowerConfig};
use crate::backend::cpu::Cpu;
use crate::backend::Seqs;
use crate::model::tower::TowerParams;
use crate::model::tower::Mode;
use crate::model::tower_backward::Grads;
use crate::tensor::DType;
use crate::model::schema::{names, Schema, Tower};
use crate::model::text::pool_position;
use crate::model::weights::Weights;
use crate::ops::elementwise::Unary;
use crate::tensor::Tensor;
use std::collections::HashMap;
use std::path::Path;

pub use crate::model::schema::BLOCK_PARAMS;

/// Every parameter name of a CLIP model with `c`'s shapes, in the schema's order.
pub fn param_shapes(c: &ClipConfig) -> Vec<(String, Vec<usize>)> {
    Schema::clip(c).shapes()
}

pub struct TrainClip {
    pub config: ClipConfig,
    /// The model's parameters: `params` starts with them, in this order.
    pub schema: Schema,
    /// (HF name, f32 value), in the schema's order, then any extra parameters (SmartCLIP's mask network).
    pub params: Vec<(String, Tensor)>,
    /// Parameters that get gradients (default: all).
    pub trainable: Vec<bool>,
    /// Per-block activation recompute (checkpointing).
    pub recompute: bool,
    index: HashMap<String, usize>,
}

/// The parameters of one step on one tape.
pub struct StepVars {
    pub vars: Vec<Var>,
}

impl TrainClip {
    /// All parameters of `w` as f32 (any stored dtype), shapes checked against `config`'s schema.
    pub fn from_weights(w: &Weights, config: &ClipConfig) -> Result<TrainClip> {
        let schema = Schema::clip(config);
        let mut params = vec![];
        for p in schema.params() {
            if p.name == names::LOGIT_SCALE && !w.contains(&p.name) {
                params.push((p.name.clone(), Tensor::scalar(config.logit_scale_init))); // HF's init value
                continue;
            }
            let t = w.get_shaped(&p.name, &p.shape)?;
            params.push((p.name.clone(), Tensor::from_vec(t.to_vec_f32(), &p.shape)?)); // an owned f32 copy: training updates it
        }
        let index = params.iter().enumerate().map(|(i, (n, _))| (n.clone(), i)).collect();
        let n = params.len();
        Ok(TrainClip { config: config.clone(), schema, params, trainable: vec![true; n], recompute: false, index })
    }

    /// Replaces the configuration (e.g. after stretching the position table in memory) and the
    /// schema made from it; the parameters must already have its shapes.
    pub fn set_config(&mut self, config: ClipConfig) {
        self.schema = Schema::clip(&config);
        self.config = config;
    }

    pub fn load_dir(dir: &Path) -> Result<TrainClip> {
        let config = ClipConfig::from_file(&dir.join("config.json"))?;
        Self::from_weights(&Weights::open(dir)?, &config)
    }

    /// Appends parameters that are not CLIP's (e.g. SmartCLIP's mask network), trainable.
    pub fn add_params(&mut self, extra: Vec<(String, Tensor)>) {
        for (n, t) in extra {
            self.index.insert(n.clone(), self.params.len());
            self.params.push((n, t));
            self.trainable.push(true);
        }
    }

    pub fn index(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// Freezes every parameter of `tower` (its blocks, embeddings, norms and projection).
    pub fn freeze_tower(&mut self, tower: Tower) {
        for i in self.schema.tower(tower) {
            self.trainable[i] = false;
        }
    }

    /// Leading elements of parameter `i` that fine-tuning never changes (Long-CLIP's kept
    /// position rows; 0 for parameters outside the schema).
    pub fn frozen_elems(&self, i: usize) -> usize {
        self.schema.params().get(i).map_or(0, |p| p.frozen_elems())
    }

    /// Puts the parameters on `tape` (trainable ones as leaves, the rest as constants).
    pub fn vars(&self, tape: &Tape) -> StepVars {
        let vars = self.params.iter().zip(&self.trainable).map(|((_, t), &tr)| if tr { tape.param(t.clone()) } else { tape.constant(t.clone()) }).collect();
        StepVars { vars }
    }

    fn v<'a>(&self, sv: &'a StepVars, name: &str) -> Result<&'a Var> {
        self.index(name).map(|i| &sv.vars[i]).ok_or_else(|| Error::msg(format!("no parameter {name}")))
    }

    /// Block `l`'s 16 tensors ([`BlockParam`](crate::model::BlockParam) order).
    fn block_vars(&self, sv: &StepVars, tower: Tower, l: usize) -> Vec<Var> {
        sv.vars[self.schema.block(tower, l)].to_vec()
    }

    /// The tower's blocks on `x`. With `pool`, only those rows of the output are wanted: the last
    /// block computes keys and values for every row but everything after attention for the
    /// pooled rows only, and the result is [R, W] instead of x's shape.
    fn encoder(&self, tape: &Tape, sv: &StepVars, tower: Tower, t: &TowerConfig, mut x: Var, seqs: &Seqs, pool: Option<&[usize]>) -> Result<Var> {
        let full = if pool.is_some() { t.layers.saturating_sub(1) } else { t.layers };
        for l in 0..full {
            let p = self.block_vars(sv, tower, l);
            x = if self.recompute { block_checkpoint(tape, &x, &p, t, seqs)? } else { block_on(tape, &x, &p, t, seqs)? }; // x's shape
        }
        let Some(rows) = pool else { return Ok(x) };
        if full == t.layers {
            let n = x.value().numel() / t.hidden.max(1);
            return tape.gather_rows(&tape.reshape(&x, &[n, t.hidden])?, rows); // no blocks: [R, W]
        }
        block_rows(tape, &x, &self.block_vars(sv, tower, full), t, seqs, rows) // [R, W]
    }

    /// pixels [B, C, S, S] → image embeddings [B, D] (not normalised): the one vision tower
    /// (src/model/tower.rs, tower_backward.rs) on the CPU backend, as one tape node over the tower's parameters
    /// (its backward is the tower's hand-written backward).
    pub fn image_embeds(&self, tape: &Tape, sv: &StepVars, pixels: &Tensor) -> Result<Var> {
        let (vc, b) = (self.config.vision.clone(), pixels.dim(0));
        let (params, inputs) = self.tower_node_params(sv, Tower::Vision)?;
        let (e, saved) = params.vision(&Cpu, &vc, pixels.contiguous(), b, self.mode(), &mut None)?; // [B, D]
        let mut saved = saved.ok_or_else(|| Error::msg("a training forward keeps its activations"))?;
        let e = e.reshape(&[b, self.config.projection_dim])?;
        let shapes = self.tower_shapes(Tower::Vision);
        Ok(tape.custom(&inputs.iter().collect::<Vec<_>>(), e, move |g| {
            let mut grads: Grads<Cpu> = (0..params.len()).map(|_| None).collect();
            params.vision_backward(&Cpu, &vc, &mut saved, g, &mut grads)?;
            grads.into_iter().zip(shapes).map(|(g, s)| g.map(|t| t.reshape(&s)).transpose()).collect()
        }))
    }

    fn mode(&self) -> Mode {
        Mode::Train { recompute: self.recompute }
    }

    /// A tower's parameters as the CPU backend holds them (sharing the step's values) and their
    /// tape variables, in the tower's order.
    fn tower_node_params(&self, sv: &StepVars, tower: Tower) -> Result<(TowerParams<Cpu>, Vec<Var>)> {
        let params = TowerParams::load_with(&Cpu, &self.schema, tower, DType::F32, |q| Ok(self.v(sv, &q.name)?.value().clone()))?;
        let inputs = self.schema.tower(tower).into_iter().map(|i| sv.vars[i].clone()).collect();
        Ok((params, inputs))
    }

    fn tower_shapes(&self, tower: Tower) -> Vec<Vec<usize>> {
        self.schema.tower(tower).into_iter().map(|i| self.schema.params()[i].shape.clone()).collect()
    }

    /// [`image_embeds`](Self::image_embeds) composed of tape ops (patch embedding, blocks, norms,
    /// projection, each with its own tape rule): the oracle the tower code is tested against.
    pub fn image_embeds_composite(&self, tape: &Tape, sv: &StepVars, pixels: &Tensor) -> Result<Var> {
        let vc = &self.config.vision;
        let (b, w, t) = (pixels.dim(0), vc.tower.hidden, vc.tokens());
        let px = tape.constant(pixels.clone());
        let patches = tape.patch_embed(&px, self.v(sv, names::PATCH_EMBEDDING)?)?; // [B, N, W]
        let cls = tape.reshape(self.v(sv, names::CLASS_EMBEDDING)?, &[1, 1, w])?;
        let cls = tape.add(&tape.constant(Tensor::zeros(&[b, 1, w])), &cls)?; // [B, 1, W]
        let x = tape.cat(&[&cls, &patches], 1)?; // [B, T, W]
        let x = tape.add(&x, self.v(sv, names::VISION_POSITIONS)?)?; // [B, T, W]
        let x = self.ln(tape, sv, names::PRE_LN, &x, vc.tower.eps)?;
        let cls: Vec<usize> = (0..b).map(|i| i * t).collect();
        let pooled = self.encoder(tape, sv, Tower::Vision, &vc.tower, x, &Seqs::Batch { batch: b, seq: t, causal: false }, Some(&cls))?; // [B, W]
        let pooled = self.ln(tape, sv, names::POST_LN, &pooled, vc.tower.eps)?;
        tape.linear(&pooled, self.v(sv, names::VISUAL_PROJECTION)?, None) // [B, D]
    }

    /// Token ids (start/end tokens included, unpadded) → text embeddings [B, D] (not normalised):
    /// the one text tower on the CPU backend as one tape node. Each sequence is cut after its
    /// pooled (end) token, since with the causal mask nothing after it reaches it, and the
    /// sequences are packed back to back with no padding: every row computed is a real token.
    pub fn text_embeds(&self, tape: &Tape, sv: &StepVars, ids: &[Vec<u32>]) -> Result<Var> {
        let tc = self.config.text.clone();
        let (params, inputs) = self.tower_node_params(sv, Tower::Text)?;
        let (e, saved) = params.text(&Cpu, &tc, ids, None, self.mode(), &mut None)?; // [B, D]
        let mut saved = saved.ok_or_else(|| Error::msg("a training forward keeps its activations"))?;
        let e = e.reshape(&[ids.len(), self.config.projection_dim])?;
        let shapes = self.tower_shapes(Tower::Text);
        Ok(tape.custom(&inputs.iter().collect::<Vec<_>>(), e, move |g| {
            let mut grads: Grads<Cpu> = (0..params.len()).map(|_| None).collect();
            params.text_backward(&Cpu, &tc, &mut saved, g, &mut grads)?;
            grads.into_iter().zip(shapes).map(|(g, s)| g.map(|t| t.reshape(&s)).transpose()).collect()
        }))
    }

    /// [`text_embeds`](Self::text_embeds) composed of tape ops: the oracle of the tower code.
    pub fn text_embeds_composite(&self, tape: &Tape, sv: &StepVars, ids: &[Vec<u32>]) -> Result<Var> {
        let tc = &self.config.text;
        let lens: Vec<usize> = ids.iter().map(|s| if s.is_empty() { 0 } else { pool_position(s, tc.eos_token_id) + 1 }).collect();
        if ids.is_empty() || lens.iter().any(|&l| l == 0 || l > tc.max_positions) {
            let longest = ids.iter().map(|s| s.len()).max().unwrap_or(0);
            return Err(crate::shape_err!("text batch of {} sequences up to {longest} tokens (model: {} positions)", ids.len(), tc.max_positions));
        }
        let flat: Vec<u32> = ids.iter().zip(&lens).flat_map(|(s, &l)| s[..l].iter().copied()).collect();
        let pos: Vec<u32> = lens.iter().flat_map(|&l| 0..l as u32).collect();
        let tok = tape.embedding(self.v(sv, names::TOKEN_EMBEDDING)?, &flat)?; // [N, W]
        let pos = tape.embedding(self.v(sv, names::TEXT_POSITIONS)?, &pos)?; // [N, W]
        let x = tape.add(&tok, &pos)?; // [N, W]
        let ends: Vec<usize> = lens.iter().scan(0, |off, &l| { *off += l; Some(*off - 1) }).collect();
        let pooled = self.encoder(tape, sv, Tower::Text, &tc.tower, x, &Seqs::Packed(lens), Some(&ends))?; // [B, W]
        let pooled = self.ln(tape, sv, names::FINAL_LN, &pooled, tc.tower.eps)?;
        tape.linear(&pooled, self.v(sv, names::TEXT_PROJECTION)?, None) // [B, D]
    }

    /// The text tower's final token states [B, T, W] (after the final LayerNorm; T = the longest
    /// sequence, shorter ones padded with the end token) and the text embeddings [B, D]: the one
    /// text tower on the CPU backend as one tape node (SmartCLIP's mask network reads the states).
    pub fn text_states(&self, tape: &Tape, sv: &StepVars, ids: &[Vec<u32>]) -> Result<(Var, Var)> {
        let tc = self.config.text.clone();
        let (b, t, w, d) = (ids.len(), ids.iter().map(|s| s.len()).max().unwrap_or(0), tc.tower.hidden, self.config.projection_dim);
        let (params, inputs) = self.tower_node_params(sv, Tower::Text)?;
        let (states, e, saved) = params.text_states(&Cpu, &tc, ids, self.mode())?; // [B·T, W], [B, D]
        let mut saved = saved.ok_or_else(|| Error::msg("a training forward keeps its activations"))?;
        let mut both = states.into_f32_vec();
        both.extend_from_slice(&e.f32_data());
        let n = b * t * w;
        let value = Tensor::from_vec(both, &[n + b * d])?; // the two outputs back to back
        let shapes = self.tower_shapes(Tower::Text);
        let node = tape.custom(&inputs.iter().collect::<Vec<_>>(), value, move |g| {
            let gd = g.f32_data();
            let (ds, de) = (Tensor::from_vec(gd[..n].to_vec(), &[n])?, Tensor::from_vec(gd[n..].to_vec(), &[b * d])?);
            let mut grads: Grads<Cpu> = (0..params.len()).map(|_| None).collect();
            params.text_states_backward(&Cpu, &tc, &mut saved, Some(&ds), &de, &mut grads)?;
            grads.into_iter().zip(shapes).map(|(g, s)| g.map(|t| t.reshape(&s)).transpose()).collect()
        });
        let states = tape.reshape(&tape.narrow(&node, 0, 0, n)?, &[b, t, w])?; // [B, T, W]
        let e = tape.reshape(&tape.narrow(&node, 0, n, b * d)?, &[b, d])?; // [B, D]
        Ok((states, e))
    }

    /// [`text_states`](Self::text_states) composed of tape ops: the oracle of the tower code.
    pub fn text_states_composite(&self, tape: &Tape, sv: &StepVars, ids: &[Vec<u32>]) -> Result<(Var, Var)> {
        let tc = &self.config.text;
        let (b, w) = (ids.len(), tc.tower.hidden);
        let t = ids.iter().map(|s| s.len()).max().unwrap_or(0);
        if b == 0 || t == 0 || t > tc.max_positions {
            return Err(crate::shape_err!("text batch of {b} sequences up to {t} tokens (model: {} positions)", tc.max_positions));
        }
        let mut flat = Vec::with_capacity(b * t);
        for s in ids {
            flat.extend_from_slice(s);
            flat.extend(std::iter::repeat(tc.eos_token_id).take(t - s.len()));
        }
        let tok = tape.embedding(self.v(sv, names::TOKEN_EMBEDDING)?, &flat)?; // [B·T, W]
        let tok = tape.reshape(&tok, &[b, t, w])?; // [B, T, W]
        let pos = tape.narrow(self.v(sv, names::TEXT_POSITIONS)?, 0, 0, t)?; // [T, W]
        let x = tape.add(&tok, &pos)?; // [B, T, W]
        let x = self.encoder(tape, sv, Tower::Text, &tc.tower, x, &Seqs::Batch { batch: b, seq: t, causal: true }, None)?;
        let x = self.ln(tape, sv, names::FINAL_LN, &x, tc.tower.eps)?; // [B, T, W]
        let rows: Vec<usize> = ids.iter().enumerate().map(|(i, s)| i * t + pool_position(s, tc.eos_token_id)).collect();
        let pooled = tape.gather_rows(&tape.reshape(&x, &[b * t, w])?, &rows)?; // [B, W]
        let e = tape.linear(&pooled, self.v(sv, names::TEXT_PROJECTION)?, None)?; // [B, D]
        Ok((x, e))
    }

    /// The logit scale s (a [1] tensor; τ = exp(s)).
    pub fn logit_scale<'a>(&self, sv: &'a StepVars) -> Result<&'a Var> {
        self.v(sv, names::LOGIT_SCALE)
    }

    fn ln(&self, tape: &Tape, sv: &StepVars, prefix: &str, x: &Var, eps: f32) -> Result<Var> {
        tape.layer_norm(x, self.v(sv, &format!("{prefix}.weight"))?, self.v(sv, &format!("{prefix}.bias"))?, eps)
    }
}

/// One pre-LN block on [B, T, W]: x + attn(ln1 x), then + mlp(ln2 ·). `p` as [`BLOCK_PARAMS`].
pub fn block(tape: &Tape, x: &Var, p: &[Var], t: &TowerConfig, causal: bool) -> Result<Var> {
    let s = x.value().shape().to_vec();
    let (batch, seq) = (s.first().copied().unwrap_or(1), s.get(1).copied().unwrap_or(1));
    block_on(tape, x, p, t, &Seqs::Batch { batch, seq, causal })
}

/// [`block`] on any grouping of rows.
pub fn block_on(tape: &Tape, x: &Var, p: &[Var], t: &TowerConfig, seqs: &Seqs) -> Result<Var> {
    let a = attend(tape, x, p, t, seqs)?; // x's shape
    block_tail(tape, x, &a, p, t)
}

/// [`block_on`] when only rows `rows` of its output are read (the pooled tokens): keys and values
/// for every row, then the output projection and the MLP on the chosen rows only → [R, W].
pub fn block_rows(tape: &Tape, x: &Var, p: &[Var], t: &TowerConfig, seqs: &Seqs, rows: &[usize]) -> Result<Var> {
    let a = attend(tape, x, p, t, seqs)?; // x's shape
    let n = x.value().numel() / t.hidden.max(1);
    let a = tape.gather_rows(&tape.reshape(&a, &[n, t.hidden])?, rows)?; // [R, W]
    let x = tape.gather_rows(&tape.reshape(x, &[n, t.hidden])?, rows)?; // [R, W]
    block_tail(tape, &x, &a, p, t)
}

/// attn(ln1 x), before the output projection.
fn attend(tape: &Tape, x: &Var, p: &[Var], t: &TowerConfig, seqs: &Seqs) -> Result<Var> {
    let h = tape.layer_norm(x, &p[0], &p[1], t.eps)?; // x's shape
    let q = tape.linear(&h, &p[2], Some(&p[3]))?;
    let k = tape.linear(&h, &p[4], Some(&p[5]))?;
    let v = tape.linear(&h, &p[6], Some(&p[7]))?;
    match seqs {
        Seqs::Batch { causal, .. } => tape.attention(&q, &k, &v, t.heads, *causal),
        Seqs::Packed(lens) => tape.attention_packed(&q, &k, &v, t.heads, true, lens),
    }
}

/// x + out_proj(a), then + mlp(ln2 ·).
fn block_tail(tape: &Tape, x: &Var, a: &Var, p: &[Var], t: &TowerConfig) -> Result<Var> {
    let x = tape.add(x, &tape.linear(a, &p[8], Some(&p[9]))?)?; // x's shape
    let h = tape.layer_norm(&x, &p[10], &p[11], t.eps)?;
    let act = match t.act {
        Activation::QuickGelu => Unary::QuickGelu,
        Activation::Gelu => Unary::Gelu,
    };
    let m = tape.unary(&tape.linear(&h, &p[12], Some(&p[13]))?, act); // [.., I]
    tape.add(&x, &tape.linear(&m, &p[14], Some(&p[15]))?) // x's shape
}

/// [`block_on`] as a checkpoint: nothing inside is kept; the backward re-runs the block on a
/// private tape (its inputs as leaves) and back-propagates the output gradient through it.
pub fn block_checkpoint(tape: &Tape, x: &Var, p: &[Var], t: &TowerConfig, seqs: &Seqs) -> Result<Var> {
    let inner = Tape::new();
    let y = inner.no_grad(|| {
        let pc: Vec<Var> = p.iter().map(|v| inner.constant(v.value().clone())).collect();
        block_on(&inner, &inner.constant(x.value().clone()), &pc, t, seqs)
    })?;
    let (xv, pv) = (x.value().clone(), p.iter().map(|v| (v.value().clone(), v.requires_grad())).collect::<Vec<_>>());
    let (t, seqs, need_x) = (t.clone(), seqs.clone(), x.requires_grad());
    let mut inputs = vec![x];
    inputs.extend(p.iter());
    Ok(tape.custom(&inputs, y.value().clone(), move |g| {
        let tp = Tape::new();
        let xi = if need_x { tp.param(xv) } else { tp.constant(xv) };
        let pi: Vec<Var> = pv.into_iter().map(|(v, r)| if r { tp.param(v) } else { tp.constant(v) }).collect();
        let y = block_on(&tp, &xi, &pi, &t, &seqs)?;
        let grads = tp.backward_from(&y, g.clone())?;
        let mut out = vec![grads.get(&xi).cloned()];
        out.extend(pi.iter().map(|v| grads.get(v).cloned()));
        Ok(out)
    }))
}
