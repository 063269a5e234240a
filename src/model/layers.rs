//! The layers both towers share: Linear, LayerNorm, and the pre-LN transformer block
//! (x + attn(ln1(x)), then x + mlp(ln2(x))), named as in HF's CLIPEncoderLayer.
use super::config::{Activation, TowerConfig};
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
    pub fn load(w: &Weights, prefix: &str, inp: usize, out: usize, bias: bool, opt: &LoadOptions) -> Result<Linear> {
        let name = format!("{prefix}.weight");
        let bias = if bias { Some(load_f32(w, &format!("{prefix}.bias"), &[out])?) } else { None };
        if opt.dtype == DType::BF16 {
            let raw = w.get_shaped(&name, &[out, inp])?;
            let packed = PackedBf16::from_f32(&raw.f32_data(), out, inp);
            return Ok(Linear { weight: raw, bias, packed: Some(Arc::new(packed)) });
        }
        Ok(Linear { weight: load_f32(w, &name, &[out, inp])?, bias, packed: None })
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
    /// Loads `{prefix}.self_attn.{q,k,v,out}_proj`, `layer_norm1/2`, `mlp.fc1/fc2`.
    pub fn load(w: &Weights, prefix: &str, c: &TowerConfig, opt: &LoadOptions) -> Result<Block> {
        let (h, i) = (c.hidden, c.intermediate);
        let lin = |name: &str, a, b| Linear::load(w, &format!("{prefix}.{name}"), a, b, true, opt);
        Ok(Block {
            ln1: LayerNorm::load(w, &format!("{prefix}.layer_norm1"), h, c.eps)?,
            q: lin("self_attn.q_proj", h, h)?,
            k: lin("self_attn.k_proj", h, h)?,
            v: lin("self_attn.v_proj", h, h)?,
            o: lin("self_attn.out_proj", h, h)?,
            ln2: LayerNorm::load(w, &format!("{prefix}.layer_norm2"), h, c.eps)?,
            fc1: lin("mlp.fc1", h, i)?,
            fc2: lin("mlp.fc2", i, h)?,
            heads: c.heads,
            act: c.act,
        })
    }

    /// x: [B, T, W] → [B, T, W].
    pub fn forward(&self, x: &Tensor, causal: bool) -> Result<Tensor> {
        let h = self.ln1.forward(x)?; // [B, T, W]
        let (q, k, v) = (self.q.forward(&h)?, self.k.forward(&h)?, self.v.forward(&h)?); // [B, T, W] each
        let (a, _lse) = Tensor::attention(&q, &k, &v, self.heads, causal)?; // [B, T, W]
        let x = x.add(&self.o.forward(&a)?)?; // [B, T, W]
        let h = self.ln2.forward(&x)?; // [B, T, W]
        let m = self.fc1.forward(&h)?.unary(match self.act {
            Activation::QuickGelu => Unary::QuickGelu,
            Activation::Gelu => Unary::Gelu,
        }); // [B, T, I]
        x.add(&self.fc2.forward(&m)?) // [B, T, W]
    }
}

/// A stack of blocks; `hook(name, x)` sees every layer's output as `{prefix}.layer.{i}`.
pub struct Encoder {
    pub layers: Vec<Block>,
}

impl Encoder {
    pub fn load(w: &Weights, prefix: &str, c: &TowerConfig, opt: &LoadOptions) -> Result<Encoder> {
        let layers = (0..c.layers).map(|i| Block::load(w, &format!("{prefix}.encoder.layers.{i}"), c, opt)).collect::<Result<_>>()?;
        Ok(Encoder { layers })
    }
    pub fn forward(&self, mut x: Tensor, causal: bool, name: &str, hook: &mut dyn FnMut(&str, &Tensor)) -> Result<Tensor> {
        for (i, b) in self.layers.iter().enumerate() {
            x = b.forward(&x, causal)?; // [B, T, W]
            hook(&format!("{name}.layer.{i}"), &x);
        }
        Ok(x)
    }
}
