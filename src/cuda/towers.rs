//! The CLIP towers on a CUDA device ([`DeviceOps`]): the same computation as src/model/{vision,
//! text,layers}.rs (HF CLIP: pre-LN blocks x + attn(ln1 x), x + mlp(ln2 x), QuickGELU/GELU,
//! class-token / end-of-text pooling, projection), with every weight uploaded once. In f32 all of it
//! is f32; in bf16 ([`CudaClip::with_dtype`]) every Linear weight (q, k, v, o, fc1, fc2, the
//! projections) is stored bf16 and its GEMM takes bf16 inputs with f32 accumulation and output
//! ([`DeviceOps::linear_bf16`]), while the residual stream, LayerNorm, attention, embeddings and the
//! patch convolution stay f32 — the same split as the CPU bf16 towers (src/model/layers.rs).
//!
//! Per block (R = B·T rows, W width, I MLP width):
//!   h = LN1(x)                      layernorm_fwd_f32 (first block) or, fused with the previous
//!                                   block's MLP residual, residual_layernorm_fwd_f32 (x += f)
//!   q, k, v = h·Wqᵀ+bq, ...         3 GEMMs (cuBLASLt / linear_f32)
//!   a = attention(q, k, v)          attention_fwd_f32 (fused, online softmax; causal for text)
//!   o = a·Woᵀ + bo                  GEMM (into q's buffer)
//!   h = LN2(x += o)                 residual_layernorm_fwd_f32
//!   m = act(h·W1ᵀ + b1)             bias-less GEMM, then bias_{quick_,}gelu_fwd_f32 in place
//!   f = m·W2ᵀ + b2                  GEMM
//! After the last block only the pooled rows matter, and LayerNorm is per row: the class-token /
//! end-of-text rows of x and f are gathered (pool_rows_f32) and residual_layernorm_fwd_f32 on B
//! rows gives the post/final LayerNorm of the pooled state; the projection is one more GEMM.
//! Everything is queued on one stream; the embeddings are downloaded once per batch.
use super::attention::attention_fwd_launch;
use super::backend::{Buf, DeviceOps};
use super::launch::{KernelArgs, LaunchCfg};
use super::train_ops::ln_cfg;
use crate::error::{Error, Result};
use crate::model::config::Activation;
use crate::model::layers::{Block, LayerNorm, Linear};
use crate::model::text::pool_position;
use crate::model::vision::VisionTower;
use crate::model::ClipParts;
use crate::ops::attention::AttnShape;
use crate::tensor::{DType, Tensor};

struct LnW {
    g: Buf,
    b: Buf,
    eps: f32,
}

struct LinW {
    w: Buf,
    b: Option<Buf>,
    n: usize,
    k: usize,
    /// `w` holds bf16 values ([`DeviceOps::upload_bf16`]).
    bf16: bool,
}

struct BlockW {
    ln1: LnW,
    q: LinW,
    k: LinW,
    v: LinW,
    o: LinW,
    ln2: LnW,
    fc1: LinW,
    fc2: LinW,
    heads: usize,
    act: Activation,
}

struct VisionW {
    channels: usize,
    image: usize,
    patch: usize,
    width: usize,
    tokens: usize,
    patch_w: LinW, // [W, C·P·P], no bias
    cls: Buf,
    pos: Buf,
    pre_ln: LnW,
    blocks: Vec<BlockW>,
    post_ln: LnW,
    proj: LinW,
}

struct TextW {
    width: usize,
    vocab: usize,
    max_positions: usize,
    eos: u32,
    tok: Buf,
    pos: Buf,
    blocks: Vec<BlockW>,
    final_ln: LnW,
    proj: LinW,
}

/// CLIP on a CUDA device (or the emulator): weights resident, towers run per batch.
pub struct CudaClip {
    ops: Box<dyn DeviceOps>,
    vision: Option<VisionW>,
    text: Option<TextW>,
    pub projection_dim: usize,
}

fn f32_vec(t: &Tensor) -> Vec<f32> {
    if t.dtype() == DType::F32 {
        t.f32_data().into_owned()
    } else {
        t.to_vec_f32()
    }
}

impl CudaClip {
    /// Uploads the weights of the loaded towers of `model` (as f32) to `ops`' device.
    pub fn new(ops: Box<dyn DeviceOps>, model: &ClipParts) -> Result<CudaClip> {
        Self::with_dtype(ops, model, DType::F32)
    }

    /// The towers computing in `dtype`: F32, or BF16 (Linear weights bf16, see the module docs).
    pub fn with_dtype(ops: Box<dyn DeviceOps>, model: &ClipParts, dtype: DType) -> Result<CudaClip> {
        let bf16 = match dtype {
            DType::F32 => false,
            DType::BF16 => true,
            other => return Err(Error::msg(format!("the CUDA towers compute in f32 or bf16, not {}", other.name()))),
        };
        let up = |t: &Tensor| ops.upload(&f32_vec(t));
        let up_w = |t: &Tensor| -> Result<Buf> {
            if !bf16 {
                return up(t);
            }
            let v: Vec<half::bf16> = f32_vec(t).iter().map(|&x| half::bf16::from_f32(x)).collect();
            ops.upload_bf16(&v)
        };
        let ln = |l: &LayerNorm| -> Result<LnW> { Ok(LnW { g: up(&l.weight)?, b: up(&l.bias)?, eps: l.eps }) };
        let lin = |l: &Linear| -> Result<LinW> {
            let (n, k) = (l.weight.dim(0), l.weight.dim(1));
            Ok(LinW { w: up_w(&l.weight)?, b: l.bias.as_ref().map(up).transpose()?, n, k, bf16 })
        };
        let block = |b: &Block| -> Result<BlockW> {
            Ok(BlockW {
                ln1: ln(&b.ln1)?,
                q: lin(&b.q)?,
                k: lin(&b.k)?,
                v: lin(&b.v)?,
                o: lin(&b.o)?,
                ln2: ln(&b.ln2)?,
                fc1: lin(&b.fc1)?,
                fc2: lin(&b.fc2)?,
                heads: b.heads,
                act: b.act,
            })
        };
        let vision = match &model.vision {
            None => None,
            Some(v) => Some(Self::vision_weights(v, &up, &ln, &lin, &block)?),
        };
        let text = match &model.text {
            None => None,
            Some(t) => Some(TextW {
                width: t.cfg.tower.hidden,
                vocab: t.cfg.vocab,
                max_positions: t.cfg.max_positions,
                eos: t.cfg.eos_token_id,
                tok: up(&t.token_embedding)?,
                pos: up(&t.positions)?,
                blocks: t.encoder.layers.iter().map(&block).collect::<Result<_>>()?,
                final_ln: ln(&t.final_ln)?,
                proj: lin(&t.projection)?,
            }),
        };
        Ok(CudaClip { ops, vision, text, projection_dim: model.config.projection_dim })
    }

    fn vision_weights(
        v: &VisionTower,
        up: &dyn Fn(&Tensor) -> Result<Buf>,
        ln: &dyn Fn(&LayerNorm) -> Result<LnW>,
        lin: &dyn Fn(&Linear) -> Result<LinW>,
        block: &dyn Fn(&Block) -> Result<BlockW>,
    ) -> Result<VisionW> {
        let (w, c, p) = (v.cfg.tower.hidden, v.cfg.channels, v.cfg.patch_size);
        Ok(VisionW {
            channels: c,
            image: v.cfg.image_size,
            patch: p,
            width: w,
            tokens: v.cfg.tokens(),
            patch_w: LinW { w: up(&v.patch_weight)?, b: None, n: w, k: c * p * p, bf16: false },
            cls: up(&v.class_embedding)?,
            pos: up(&v.positions)?,
            pre_ln: ln(&v.pre_ln)?,
            blocks: v.encoder.layers.iter().map(block).collect::<Result<_>>()?,
            post_ln: ln(&v.post_ln)?,
            proj: lin(&v.projection)?,
        })
    }

    /// Which device runs the towers, in words.
    pub fn describe(&self) -> String {
        self.ops.describe()
    }

    /// pixels [B, C, S, S] (host, row-major) → image embeddings [B, D] (not normalised).
    pub fn embed_images(&self, pixels: &[f32], batch: usize) -> Result<Vec<f32>> {
        let v = self.vision.as_ref().ok_or_else(|| Error::msg("image tower not loaded"))?;
        let (c, s, p, w, t) = (v.channels, v.image, v.patch, v.width, v.tokens);
        if batch == 0 || pixels.len() != batch * c * s * s {
            return Err(crate::shape_err!("image tower expects pixels [B, {c}, {s}, {s}] with B >= 1, got {} values for B = {batch}", pixels.len()));
        }
        let ops = &*self.ops;
        let n = t - 1;
        let px = ops.upload(pixels)?;
        let cols = ops.alloc(batch * n * c * p * p)?;
        launch_elems(ops, "patch_im2col_f32", batch * n * c * p * p, |a| a.ptr(px.ptr()).ptr(cols.ptr()).i32(batch as i32).i32(c as i32).i32(s as i32).i32(p as i32))?;
        let patches = ops.alloc(batch * n * w)?;
        linear(ops, &cols, &v.patch_w, &patches, batch * n)?;
        drop(cols);
        let x = ops.alloc(batch * t * w)?;
        launch_elems(ops, "vision_embed_assemble_f32", batch * t * w, |a| {
            a.ptr(patches.ptr()).ptr(v.cls.ptr()).ptr(v.pos.ptr()).ptr(x.ptr()).i32(batch as i32).i32(n as i32).i32(w as i32)
        })?;
        drop(patches);
        // pre_layrnorm: the encoder's input is LN(embeddings)
        let x0 = ops.alloc(batch * t * w)?;
        layernorm(ops, &x, &v.pre_ln, &x0, batch * t, w)?;
        drop(x);
        let index = vec![0i32; batch];
        self.encode_pool_project(x0, batch, t, w, false, &v.blocks, &index, &v.post_ln, &v.proj)
    }

    /// Token ids (with start/end tokens, unpadded) → text embeddings [B, D] (not normalised),
    /// padded with the end token to the longest sequence like the CPU tower.
    pub fn embed_texts(&self, ids: &[Vec<u32>]) -> Result<Vec<f32>> {
        let tw = self.text.as_ref().ok_or_else(|| Error::msg("text tower not loaded"))?;
        let b = ids.len();
        let t = ids.iter().map(|s| s.len()).max().unwrap_or(0);
        if b == 0 || t == 0 {
            return Err(crate::shape_err!("text tower needs at least one non-empty sequence"));
        }
        if t > tw.max_positions {
            return Err(crate::shape_err!("sequence of {t} tokens exceeds the model's {} positions", tw.max_positions));
        }
        let mut flat = Vec::with_capacity(b * t);
        for s in ids {
            if let Some(&bad) = s.iter().find(|&&id| id as usize >= tw.vocab) {
                return Err(crate::shape_err!("token id {bad} outside the vocabulary of {}", tw.vocab));
            }
            flat.extend(s.iter().map(|&id| id as i32));
            flat.extend(std::iter::repeat(tw.eos as i32).take(t - s.len()));
        }
        let w = tw.width;
        let ops = &*self.ops;
        let idb = ops.upload_i32(&flat)?;
        let x = ops.alloc(b * t * w)?;
        launch_elems(ops, "text_embed_f32", b * t * w, |a| {
            a.ptr(idb.ptr()).ptr(tw.tok.ptr()).ptr(tw.pos.ptr()).ptr(x.ptr()).i32(b as i32).i32(t as i32).i32(w as i32)
        })?;
        let index: Vec<i32> = ids.iter().map(|s| pool_position(s, tw.eos) as i32).collect();
        self.encode_pool_project(x, b, t, w, true, &tw.blocks, &index, &tw.final_ln, &tw.proj)
    }

    /// The encoder on x [B, T, W] (consumed), then pooling at `index[b]`, the final LayerNorm of
    /// the pooled rows, the projection, and the one download.
    #[allow(clippy::too_many_arguments)]
    fn encode_pool_project(&self, x: Buf, b: usize, t: usize, w: usize, causal: bool, blocks: &[BlockW], index: &[i32], final_ln: &LnW, proj: &LinW) -> Result<Vec<f32>> {
        let ops = &*self.ops;
        let r = b * t;
        let inter = blocks.iter().map(|bl| bl.fc1.n).max().unwrap_or(0);
        let (h, q, k, v, a) = (ops.alloc(r * w)?, ops.alloc(r * w)?, ops.alloc(r * w)?, ops.alloc(r * w)?, ops.alloc(r * w)?);
        let m = ops.alloc(r * inter.max(1))?;
        let f = &k; // the MLP output reuses k's buffer (k is dead after attention)
        for (i, bl) in blocks.iter().enumerate() {
            if bl.q.k != w || bl.fc1.k != w || bl.fc2.n != w || w % bl.heads != 0 {
                return Err(crate::shape_err!("block {i}: weights do not match width {w} / {} heads", bl.heads));
            }
            if i == 0 {
                layernorm(ops, &x, &bl.ln1, &h, r, w)?;
            } else {
                residual_layernorm(ops, &x, f, &bl.ln1, &h, r, w)?;
            }
            linear(ops, &h, &bl.q, &q, r)?;
            linear(ops, &h, &bl.k, &k, r)?;
            linear(ops, &h, &bl.v, &v, r)?;
            let hd = w / bl.heads;
            let shape = AttnShape { batch: b, seq: t, heads: bl.heads, head_dim: hd, causal, scale: 1.0 / (hd as f32).sqrt() };
            let lc = attention_fwd_launch(&shape, DType::F32)?;
            let mut args = KernelArgs::new()
                .ptr(q.ptr())
                .ptr(k.ptr())
                .ptr(v.ptr())
                .ptr(a.ptr())
                .ptr(0) // lse: not needed for inference
                .i32(b as i32)
                .i32(t as i32)
                .i32(bl.heads as i32)
                .i32(hd as i32)
                .i32(causal as i32)
                .f32(shape.scale);
            ops.launch(&lc.kernel, LaunchCfg::new(lc.grid, lc.block, lc.smem_bytes), &mut args)?;
            linear(ops, &a, &bl.o, &q, r)?; // o-proj output into q (dead after attention)
            residual_layernorm(ops, &x, &q, &bl.ln2, &h, r, w)?;
            let n1 = bl.fc1.n;
            gemm(ops, &h, &bl.fc1, None, &m, r)?; // bias added with the activation below
            let kernel = match bl.act {
                Activation::QuickGelu => "bias_quick_gelu_fwd_f32",
                Activation::Gelu => "bias_gelu_fwd_f32",
            };
            let bias = bl.fc1.b.as_ref().map(|b| b.ptr()).unwrap_or(0);
            let cfg = LaunchCfg::new((n1.div_ceil(256) as u32, r.min(256) as u32, 1), (256, 1, 1), 0);
            ops.launch(kernel, cfg, &mut KernelArgs::new().ptr(m.ptr()).ptr(bias).ptr(0).i32(r as i32).i32(n1 as i32))?;
            linear(ops, &m, &bl.fc2, f, r)?;
        }
        // pooled rows of x and of the last MLP output (or of x alone without blocks)
        let idx = ops.upload_i32(index)?;
        let (px, pf, pooled) = (ops.alloc(b * w)?, ops.alloc(b * w)?, ops.alloc(b * w)?);
        let pool = |src: &Buf, dst: &Buf| {
            launch_elems(ops, "pool_rows_f32", b * w, |a| a.ptr(src.ptr()).ptr(idx.ptr()).ptr(dst.ptr()).i32(b as i32).i32(t as i32).i32(w as i32))
        };
        pool(&x, &px)?;
        if blocks.is_empty() {
            layernorm(ops, &px, final_ln, &pooled, b, w)?;
        } else {
            pool(f, &pf)?;
            residual_layernorm(ops, &px, &pf, final_ln, &pooled, b, w)?;
        }
        let e = ops.alloc(b * proj.n)?;
        linear(ops, &pooled, proj, &e, b)?;
        ops.download(&e)
    }
}

fn linear(ops: &dyn DeviceOps, x: &Buf, l: &LinW, y: &Buf, rows: usize) -> Result<()> {
    gemm(ops, x, l, l.b.as_ref(), y, rows)
}

/// y = x·Wᵀ (+ bias) in the weight's precision.
fn gemm(ops: &dyn DeviceOps, x: &Buf, l: &LinW, bias: Option<&Buf>, y: &Buf, rows: usize) -> Result<()> {
    if l.bf16 {
        ops.linear_bf16(x, &l.w, bias, y, rows, l.n, l.k)
    } else {
        ops.linear(x, &l.w, bias, y, rows, l.n, l.k)
    }
}


fn layernorm(ops: &dyn DeviceOps, x: &Buf, ln: &LnW, y: &Buf, rows: usize, cols: usize) -> Result<()> {
    let mut a = KernelArgs::new().ptr(x.ptr()).ptr(ln.g.ptr()).ptr(ln.b.ptr()).ptr(y.ptr()).ptr(0).ptr(0).i32(rows as i32).i32(cols as i32).f32(ln.eps);
    ops.launch("layernorm_fwd_f32", ln_cfg(rows), &mut a)
}

/// x += residual (in place), y = LN(x).
fn residual_layernorm(ops: &dyn DeviceOps, x: &Buf, residual: &Buf, ln: &LnW, y: &Buf, rows: usize, cols: usize) -> Result<()> {
    let mut a = KernelArgs::new()
        .ptr(x.ptr())
        .ptr(residual.ptr())
        .ptr(ln.g.ptr())
        .ptr(ln.b.ptr())
        .ptr(y.ptr())
        .ptr(0)
        .ptr(0)
        .i32(rows as i32)
        .i32(cols as i32)
        .f32(ln.eps);
    ops.launch("residual_layernorm_fwd_f32", ln_cfg(rows), &mut a)
}

/// A grid-stride kernel of embed.cu over `total` output elements.
fn launch_elems(ops: &dyn DeviceOps, kernel: &str, total: usize, args: impl FnOnce(KernelArgs) -> KernelArgs) -> Result<()> {
    let blocks = total.div_ceil(256).clamp(1, 16_384) as u32;
    let mut a = args(KernelArgs::new());
    ops.launch(kernel, LaunchCfg::new((blocks, 1, 1), (256, 1, 1), 0), &mut a)
}
