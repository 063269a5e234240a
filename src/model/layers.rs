//! The layers both towers share: Linear, LayerNorm, and the pre-LN transformer block
//! (x + attn(ln1(x)), then x + mlp(ln2(x))), named as in HF's CLIPEncoderLayer.
use super::config::{Activation, TowerConfig};
use super::schema::{block_name, BlockParam, Tower};
use super::weights::Weights;
use crate::error::Result;
use crate::ops::gemm_bf16::{matmul_bf16, PackedBf16};
use std::sync::Arc;
use crate::ops::elementwise::Unary;
use crate::tensor::{DType, Tensor};

/// How weights are held for compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// F32: weights used as f32 (mapped in place when the file is f32). BF16: every Linear weight
    /// packed to bf16 for the AVX-512 BF16 GEMM; embeddings, norms and attention stay f32.
    pub dtype: DType,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { dtype: DType::F32 }
    }
}

/// A weight ready for f32 compute: mapped in place if stored f32, converted once otherwise.
pub fn load_f32(w: &Weights, name: &str, shape: &[usize]) -> Result<Tensor> {
    let t = w.get_shaped(name, shape)?;
    Ok(if t.dtype() == DType::F32 { t } else { t.to_dtype(DType::F32) })
}

/// y = x·Wᵀ + b with W [out, in].
pub struct Linear {
    /// [out, in] as stored (mapped in place when f32); unused for compute in bf16 mode.
    pub weight: Tensor,
    pub bias: Option<Tensor>, // [out]
    /// bf16 mode: W packed for the AVX-512 BF16 GEMM (activations are rounded to bf16 on the fly).
    pub packed: Option<Arc<PackedBf16>>,
}

impl Linear {
    /// Loads weight `name` of shape [out, in] and, if named, its bias [out].
    pub fn load_named(w: &Weights, name: &str, bias: Option<&str>, shape: &[usize], opt: &LoadOptions) -> Result<Linear> {
        let (out, inp) = (shape[0], shape[1]);
        let bias = bias.map(|b| load_f32(w, b, &[out])).transpose()?;
        if opt.dtype == DType::BF16 {
            let raw = w.get_shaped(name, &[out, inp])?;
            let packed = PackedBf16::from_f32(&raw.f32_data(), out, inp);
            return Ok(Linear { weight: raw, bias, packed: Some(Arc::new(packed)) });
        }
        Ok(Linear { weight: load_f32(w, name, &[out, inp])?, bias, packed: None })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let Some(p) = &self.packed else {
            return x.linear(&self.weight, self.bias.as_ref()); // [.., out]
        };
        let k = *x.shape().last().unwrap_or(&0);
        if x.rank() == 0 || k != p.k() {
            return Err(crate::shape_err!("linear: input {:?}, weight [{}, {}]", x.shape(), p.n(), p.k()));
        }
        let m = if k == 0 { 0 } else { x.numel() / k };
        let mut y = vec![0f32; m * p.n()]; // [m, out]
        let bias = self.bias.as_ref().map(|b| b.f32_data());
        matmul_bf16(&x.f32_data(), m, p, bias.as_deref(), &mut y);
        let mut shape = x.shape().to_vec();
        *shape.last_mut().unwrap() = p.n();
        Tensor::from_vec(y, &shape) // [.., out]
    }
}

pub struct LayerNorm {
    pub weight: Tensor, // [n]
    pub bias: Tensor,   // [n]
    pub eps: f32,
}

impl LayerNorm {
    /// Loads `{prefix}.weight` and `{prefix}.bias`, both [n].
    pub fn load(w: &Weights, prefix: &str, n: usize, eps: f32) -> Result<LayerNorm> {
        Ok(LayerNorm { weight: load_f32(w, &format!("{prefix}.weight"), &[n])?, bias: load_f32(w, &format!("{prefix}.bias"), &[n])?, eps })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.layer_norm(&self.weight, &self.bias, self.eps) // same shape as x
    }
}

/// One pre-LN transformer block; the vision tower runs it without a mask, the text tower causal.
pub struct Block {
    pub ln1: LayerNorm,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub ln2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    pub heads: usize,
    pub act: Activation,
}

impl Block {
    /// Loads block `layer` of `tower` (the schema's [`BlockParam`] names).
    pub fn load(w: &Weights, tower: Tower, layer: usize, c: &TowerConfig, opt: &LoadOptions) -> Result<Block> {
        let (h, i) = (c.hidden, c.intermediate);
        let name = |p: BlockParam| block_name(tower, layer, p);
        let lin = |wt: BlockParam, b: BlockParam| Linear::load_named(w, &name(wt), Some(&name(b)), &wt.shape(h, i), opt);
        let ln = |g: BlockParam, b: BlockParam| -> Result<LayerNorm> { Ok(LayerNorm { weight: load_f32(w, &name(g), &[h])?, bias: load_f32(w, &name(b), &[h])?, eps: c.eps }) };
        use BlockParam::*;
        Ok(Block {
            ln1: ln(Ln1Weight, Ln1Bias)?,
            q: lin(QWeight, QBias)?,
            k: lin(KWeight, KBias)?,
            v: lin(VWeight, VBias)?,
            o: lin(OutWeight, OutBias)?,
            ln2: ln(Ln2Weight, Ln2Bias)?,
            fc1: lin(Fc1Weight, Fc1Bias)?,
            fc2: lin(Fc2Weight, Fc2Bias)?,
            heads: c.heads,
            act: c.act,
        })
    }

    /// x: [B, T, W] → [B, T, W].
    pub fn forward(&self, x: &Tensor, causal: bool) -> Result<Tensor> {
        self.forward_on(x, &Seqs::Batch { causal }, None)
    }

    /// The block on any grouping of rows (`seqs`). With `rows`, only those rows of the output are
    /// wanted (the pooled tokens): keys and values are computed for every row, the output
    /// projection and the MLP for the chosen rows only, and the result is [R, W].
    pub fn forward_on(&self, x: &Tensor, seqs: &Seqs, rows: Option<&[usize]>) -> Result<Tensor> {
        let h = self.ln1.forward(x)?; // x's shape
        let (q, k, v) = (self.q.forward(&h)?, self.k.forward(&h)?, self.v.forward(&h)?); // x's shape each
        let a = match seqs {
            Seqs::Batch { causal } => Tensor::attention(&q, &k, &v, self.heads, *causal)?.0, // [B, T, W]
            Seqs::Packed(lens) => {
                let (o, _lse) = crate::ops::attention::attention_packed(&q.f32_data(), &k.f32_data(), &v.f32_data(), lens, self.heads, true);
                Tensor::from_vec(o, q.shape())? // [N, W]
            }
        };
        let (x, a) = match rows {
            None => (x.clone(), a),
            Some(r) => (gather_rows(x, r)?, gather_rows(&a, r)?), // [R, W] each
        };
        let x = x.add(&self.o.forward(&a)?)?; // x's shape
        let h = self.ln2.forward(&x)?;
        let m = self.fc1.forward(&h)?.unary(match self.act {
            Activation::QuickGelu => Unary::QuickGelu,
            Activation::Gelu => Unary::Gelu,
        }); // [.., I]
        x.add(&self.fc2.forward(&m)?) // x's shape
    }
}

/// How a block's attention groups the rows of its input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seqs {
    /// x is [B, T, W]: B sequences of T tokens, optionally causal.
    Batch { causal: bool },
    /// x is [N, W]: causal sequences of these lengths packed back to back (N = Σ lengths).
    Packed(Vec<usize>),
}

/// Rows `rows` of x viewed as [N, W] → [R, W].
pub fn gather_rows(x: &Tensor, rows: &[usize]) -> Result<Tensor> {
    let w = *x.shape().last().unwrap_or(&1);
    let n = if w == 0 { 0 } else { x.numel() / w };
    let ids: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
    Tensor::embedding(&x.reshape(&[n, w])?, &ids) // [R, W]
}

/// A stack of blocks; `hook(name, x)` sees every layer's output as `{prefix}.layer.{i}`.
pub struct Encoder {
    pub layers: Vec<Block>,
}

impl Encoder {
    pub fn load(w: &Weights, tower: Tower, c: &TowerConfig, opt: &LoadOptions) -> Result<Encoder> {
        let layers = (0..c.layers).map(|i| Block::load(w, tower, i, c, opt)).collect::<Result<_>>()?;
        Ok(Encoder { layers })
    }
    pub fn forward(&self, x: Tensor, causal: bool, name: &str, hook: &mut dyn FnMut(&str, &Tensor)) -> Result<Tensor> {
        self.forward_on(x, &Seqs::Batch { causal }, None, name, hook)
    }

    /// The blocks on any grouping of rows; with `pool`, the last block computes only those rows
    /// of its output (see [`Block::forward_on`]) and the result is [R, W].
    pub fn forward_on(&self, mut x: Tensor, seqs: &Seqs, pool: Option<&[usize]>, name: &str, hook: &mut dyn FnMut(&str, &Tensor)) -> Result<Tensor> {
        let last = self.layers.len().saturating_sub(1);
        for (i, b) in self.layers.iter().enumerate() {
            x = b.forward_on(&x, seqs, if i == last { pool } else { None })?; // x's shape, [R, W] after a pooled last block
            hook(&format!("{name}.layer.{i}"), &x);
        }
        match (pool, self.layers.is_empty()) {
            (Some(r), true) => gather_rows(&x, r), // no blocks: [R, W]
            _ => Ok(x),
        }
    }
}
