//! The CLIP transformer block, written once against the fused operations of [`Ops`] and run by
//! every backend: pre-LN, x + out_proj(attn(ln1 x)), then + fc2(act(fc1(ln2 ·))), named as HF's
//! CLIPEncoderLayer. The forward optionally keeps what the backward needs; the backward is
//! written by hand over the same operations (dX and dW GEMMs, the fused LayerNorm, activation and
//! attention backwards). With `rows`, only those rows of the output are wanted (the pooled
//! tokens): keys and values are computed for every row, the output projection and the MLP for
//! the chosen rows only — and at inference the queries and the attention too
//! ([`Ops::attention_pooled`]).
//!
//! Per block (N rows, R output rows, W width, I MLP width):
//!   h1 = LN1(x)                       layernorm_for_linear              [N, W]
//!   q, k, v = h1·Wᵀ + b               qkv                               [N, W] each
//!   a = attention(q, k, v)            attention (batched or packed)     [N, W]
//!   xs, as = rows of x, a             gather_rows (pooled blocks only)  [R, W]
//!   xm = xs + as·Woᵀ + bo             linear_add (residual fused)       [R, W]
//!   h2 = LN2(xm)                      layernorm_for_linear
//!   m = act(h2·W1ᵀ + b1)              linear_act (bias, activation)     [R, I]
//!   y = xm + m·W2ᵀ + b2               linear_add                        [R, W]
//!
//! The outputs that only feed a GEMM or attention (h1, h2, q, k, v, m) go through the ops that say
//! so, so that a backend with 16-bit GEMMs may keep them in 16 bits only.
use crate::backend::{Act, Ops, Seqs, Weight};
use crate::error::{Error, Result};
use crate::model::config::{Activation, TowerConfig};
use crate::model::schema::BlockParam;

/// A parameter as a backend holds it: a plain buffer, or a Linear weight (with its
/// low-precision copy when the backend computes in bf16/f16).
pub enum Stored<O: Ops> {
    Buf(O::Buf),
    Linear(Weight<O>),
}

impl<O: Ops> Stored<O> {
    /// The f32 values (of a Linear weight: its f32 master).
    pub fn buf(&self) -> &O::Buf {
        match self {
            Stored::Buf(b) => b,
            Stored::Linear(w) => &w.w,
        }
    }
}

/// One block's 16 parameters ([`BlockParam`] order) and its sizes.
pub struct BlockRef<'a, O: Ops> {
    pub p: &'a [Stored<O>],
    pub cfg: &'a TowerConfig,
}

impl<'a, O: Ops> BlockRef<'a, O> {
    pub fn new(p: &'a [Stored<O>], cfg: &'a TowerConfig) -> Result<Self> {
        if p.len() != 16 {
            return Err(Error::msg(format!("a block has 16 parameters, got {}", p.len())));
        }
        Ok(BlockRef { p, cfg })
    }
    fn buf(&self, b: BlockParam) -> &'a O::Buf {
        self.p[b.index()].buf()
    }
    fn lin(&self, b: BlockParam) -> Result<&'a Weight<O>> {
        match &self.p[b.index()] {
            Stored::Linear(w) => Ok(w),
            Stored::Buf(_) => Err(Error::msg(format!("block parameter {} is not held as a Linear weight", b.name()))),
        }
    }
    fn act(&self) -> Act {
        match self.cfg.act {
            Activation::QuickGelu => Act::QuickGelu,
            Activation::Gelu => Act::Gelu,
        }
    }
}

/// What the forward keeps for the backward.
pub struct Saved<O: Ops> {
    seqs: Seqs,
    rows: Option<Vec<usize>>,
    x: O::Buf,
    h1: O::Buf,
    st1: O::Buf,
    q: O::Buf,
    k: O::Buf,
    v: O::Buf,
    a: O::Buf,
    lse: O::Buf,
    /// Rows `rows` of a (None: all rows, `a` itself).
    a_rows: Option<O::Buf>,
    xm: O::Buf,
    h2: O::Buf,
    st2: O::Buf,
    pre: O::Buf,
    m: O::Buf,
}

/// The residual stream x [N, W] (consumed) → the block's output [N, W] (or [R, W] with `rows`),
/// with `keep` what the backward needs.
pub fn forward<O: Ops>(ops: &O, blk: &BlockRef<O>, x: O::Buf, seqs: &Seqs, rows: Option<&[usize]>, keep: bool) -> Result<(O::Buf, Option<Saved<O>>)> {
    use BlockParam::*;
    let c = blk.cfg;
    let (n, w) = (seqs.rows(), c.hidden);
    let (h1, st1) = ops.layernorm_for_linear(&x, blk.buf(Ln1Weight), blk.buf(Ln1Bias), n, w, c.eps)?; // [N, W]
    let lins = [blk.lin(QWeight)?, blk.lin(KWeight)?, blk.lin(VWeight)?];
    let biases = [blk.buf(QBias), blk.buf(KBias), blk.buf(VBias)];
    if let (Some(rs), false) = (rows, keep) {
        // inference, pooled rows only: their queries and attention alone (k, v for every row)
        let a_rows = ops.attention_pooled(&h1, lins, biases, seqs, rs, c.heads, w)?; // [R, W]
        drop(h1);
        let xs = ops.gather_rows(&x, rs, w)?; // [R, W]
        let y = after_attention(ops, blk, &a_rows, &xs, rs.len(), false)?.0; // [R, W]
        return Ok((y, None));
    }
    let [q, k, v] = ops.qkv(&h1, lins, biases, n, c.heads)?; // [N, W] each
    let (a, lse) = ops.attention(&q, &k, &v, seqs, c.heads, w)?; // [N, W]
    let (r, xs, a_rows) = match rows {
        Some(rs) => (rs.len(), Some(ops.gather_rows(&x, rs, w)?), Some(ops.gather_rows(&a, rs, w)?)), // [R, W]
        None => (n, None, None),
    };
    let (y, kept) = after_attention(ops, blk, a_rows.as_ref().unwrap_or(&a), xs.as_ref().unwrap_or(&x), r, keep)?; // [R, W]
    drop(xs);
    let Some((xm, h2, st2, pre, m)) = kept else {
        return Ok((y, None));
    };
    let saved = Saved { seqs: seqs.clone(), rows: rows.map(|r| r.to_vec()), x, h1, st1, q, k, v, a, lse, a_rows, xm, h2, st2, pre, m };
    Ok((y, Some(saved)))
}

/// What the second half of the block keeps for the backward: xm, h2, its LN statistics, the
/// MLP's pre-activation and activation.
type AfterSaved<O> = (<O as Ops>::Buf, <O as Ops>::Buf, <O as Ops>::Buf, <O as Ops>::Buf, <O as Ops>::Buf);

/// The block after the attention, for R rows: xm = xs + a·Woᵀ + bo, then y = xm + fc2(act(fc1(
/// LN2(xm)))) → (y [R, W], with `keep` what the backward needs).
fn after_attention<O: Ops>(ops: &O, blk: &BlockRef<O>, a: &O::Buf, xs: &O::Buf, r: usize, keep: bool) -> Result<(O::Buf, Option<AfterSaved<O>>)> {
    use BlockParam::*;
    let (c, w) = (blk.cfg, blk.cfg.hidden);
    let xm = ops.linear_add(a, blk.lin(OutWeight)?, blk.buf(OutBias), r, xs)?; // [R, W]
    let (h2, st2) = ops.layernorm_for_linear(&xm, blk.buf(Ln2Weight), blk.buf(Ln2Bias), r, w, c.eps)?; // [R, W]
    let (m, pre) = ops.linear_act(&h2, blk.lin(Fc1Weight)?, blk.buf(Fc1Bias), r, blk.act(), keep)?; // [R, I] each (pre only to keep)
    let y = ops.linear_add(&m, blk.lin(Fc2Weight)?, blk.buf(Fc2Bias), r, &xm)?; // [R, W]
    if !keep {
        return Ok((y, None));
    }
    let pre = pre.ok_or_else(|| Error::msg("linear_act kept no pre-activation"))?;
    Ok((y, Some((xm, h2, st2, pre, m))))
}

/// dy [R, W] → (dx [N, W], the 16 parameter gradients in [`BlockParam`] order).
pub fn backward<O: Ops>(ops: &O, blk: &BlockRef<O>, s: &Saved<O>, dy: &O::Buf) -> Result<(O::Buf, Vec<O::Buf>)> {
    use BlockParam::*;
    let c = blk.cfg;
    let (n, w, inter) = (s.seqs.rows(), c.hidden, c.intermediate);
    let r = s.rows.as_ref().map_or(n, |v| v.len());
    // MLP: y = xm + fc2(act(fc1(ln2(xm))))
    let mut dm = ops.uninit(r * inter)?; // [R, I]
    let (dw2, db2) = ops.linear_bwd(dy, &s.m, blk.lin(Fc2Weight)?, r, &mut dm, false, true)?;
    let (du, db1) = ops.bias_act_bwd(&dm, &s.pre, r, inter, blk.act())?; // [R, I]
    drop(dm);
    let mut dh2 = ops.uninit(r * w)?; // [R, W]
    let (dw1, _) = ops.linear_bwd(&du, &s.h2, blk.lin(Fc1Weight)?, r, &mut dh2, false, false)?; // its bias gradient came with the activation's
    drop(du);
    let (dxm, dg2, dbeta2) = ops.layernorm_bwd_add(&dh2, &s.xm, blk.buf(Ln2Weight), &s.st2, r, w, c.eps, dy)?; // dy + d(ln2 path) [R, W]
    drop(dh2);
    // attention: xm = x + out_proj(attn(q, k, v))
    let mut da = ops.uninit(r * w)?; // [R, W]
    let (dwo, dbo) = ops.linear_bwd(&dxm, s.a_rows.as_ref().unwrap_or(&s.a), blk.lin(OutWeight)?, r, &mut da, false, true)?;
    let (da, dres) = match &s.rows {
        Some(rows) => (ops.scatter_rows(&da, rows, n, w)?, ops.scatter_rows(&dxm, rows, n, w)?), // [N, W]
        None => (da, dxm),
    };
    let (dq, dk, dv) = ops.attention_bwd(&s.q, &s.k, &s.v, &s.a, &s.lse, &da, &s.seqs, c.heads, w)?;
    drop(da);
    let lins = [blk.lin(QWeight)?, blk.lin(KWeight)?, blk.lin(VWeight)?];
    let (dh1, [dwq, dwk, dwv], [dbq, dbk, dbv]) = ops.qkv_bwd([&dq, &dk, &dv], &s.h1, lins, n)?; // [N, W]
    drop((dq, dk, dv));
    let (dx, dg1, dbeta1) = ops.layernorm_bwd_add(&dh1, &s.x, blk.buf(Ln1Weight), &s.st1, n, w, c.eps, &dres)?; // residual + d(ln1 path)
    let b = |d: Option<O::Buf>| d.ok_or_else(|| Error::msg("linear_bwd returned no bias gradient"));
    Ok((dx, vec![dg1, dbeta1, dwq, dbq, dwk, dbk, dwv, dbv, dwo, b(dbo)?, dg2, dbeta2, dw1, db1, dw2, b(db2)?]))
}
