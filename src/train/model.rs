//! The trainable CLIP: every parameter as an f32 tensor under its HF name, and both towers as
//! tape computations (the same math as src/model/{vision,text,layers}.rs, checked against them
//! in tests/train_model.rs). One block function serves both towers; with `recompute` each block is
//! a checkpoint: its forward runs unrecorded and its backward re-runs it on a private tape.
use crate::autograd::{Tape, Var};
use crate::backend::cpu::Cpu;
use crate::backend::Ops;
use crate::backend::Seqs;
use crate::error::{Error, Result};
use crate::model::block::{backward, forward, BlockRef, Stored};
use crate::model::config::{ClipConfig, TowerConfig};
use crate::model::schema::BlockParam;
use crate::model::schema::{names, Schema, Tower};
use crate::model::tower::Mode;
use crate::model::tower::TowerParams;
use crate::model::tower_backward::Grads;
use crate::model::weights::Weights;
use crate::tensor::DType;
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
    /// The towers' GEMM type on the CPU: F32, or BF16 (bf16 copies of the Linear weights made from
    /// the f32 masters every step; forward and backward GEMMs on bf16 inputs, f32 accumulation).
    pub compute: DType,
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
            params.push((p.name.clone(), Tensor::from_vec(t.to_vec_f32(), &p.shape)?));
            // an owned f32 copy: training updates it
        }
        let index = params.iter().enumerate().map(|(i, (n, _))| (n.clone(), i)).collect();
        let n = params.len();
        Ok(TrainClip { config: config.clone(), schema, params, trainable: vec![true; n], recompute: false, compute: DType::F32, index })
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
        let params = TowerParams::load_with(&Cpu, &self.schema, tower, self.compute, |q| Ok(self.v(sv, &q.name)?.value().clone()))?;
        let inputs = self.schema.tower(tower).into_iter().map(|i| sv.vars[i].clone()).collect();
        Ok((params, inputs))
    }

    fn tower_shapes(&self, tower: Tower) -> Vec<Vec<usize>> {
        self.schema.tower(tower).into_iter().map(|i| self.schema.params()[i].shape.clone()).collect()
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

    /// The logit scale s (a `[1]` tensor; τ = exp(s)).
    pub fn logit_scale<'a>(&self, sv: &'a StepVars) -> Result<&'a Var> {
        self.v(sv, names::LOGIT_SCALE)
    }
}

/// One pre-LN transformer block (the one of src/model/block.rs, on the CPU backend) on x
/// [B, T, W] as one tape node over x and its 16 parameters `p` ([`BLOCK_PARAMS`] order): what
/// SmartCLIP's mask network runs over the text token states.
pub fn block(tape: &Tape, x: &Var, p: &[Var], t: &TowerConfig, causal: bool) -> Result<Var> {
    let shape = x.value().shape().to_vec();
    let (batch, seq) = match shape[..] {
        [b, s, w] if w == t.hidden && p.len() == 16 => (b, s),
        _ => return Err(crate::shape_err!("block: x {shape:?} and {} parameters for width {}", p.len(), t.hidden)),
    };
    let stored: Vec<Stored<Cpu>> = BlockParam::ALL
        .iter()
        .zip(p)
        .map(|(b, v)| {
            let val = v.value().clone();
            Ok(if BlockParam::LINEAR_WEIGHTS.contains(b) {
                Stored::Linear(Cpu.weight(val.clone(), val.dim(0), val.dim(1), DType::F32)?)
            } else {
                Stored::Buf(val)
            })
        })
        .collect::<Result<_>>()?;
    let cfg = t.clone();
    let seqs = Seqs::Batch { batch, seq, causal };
    let (y, saved) = forward(&Cpu, &BlockRef::new(&stored, &cfg)?, x.value().contiguous(), &seqs, None, true)?;
    let y = y.reshape(&shape)?; // [B, T, W]
    let saved = saved.ok_or_else(|| Error::msg("block: the forward kept nothing"))?;
    let shapes: Vec<Vec<usize>> = p.iter().map(|v| v.value().shape().to_vec()).collect();
    let mut inputs = vec![x];
    inputs.extend(p.iter());
    Ok(tape.custom(&inputs, y, move |g| {
        let (dx, grads) = backward(&Cpu, &BlockRef::new(&stored, &cfg)?, &saved, g)?;
        let mut out = vec![Some(dx.reshape(&shape)?)];
        for (d, s) in grads.into_iter().zip(&shapes) {
            out.push(Some(d.reshape(s)?));
        }
        Ok(out)
    }))
}
