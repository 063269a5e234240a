//! The CLIP transformer block, written once against the fused operations of [`Ops`] and run by
//! every backend: pre-LN, x + out_proj(attn(ln1 x)), then + fc2(act(fc1(ln2 ·))), named as HF's
//! CLIPEncoderLayer. The forward optionally keeps what the backward needs; the backward is
//! written by hand over the same operations (dX and dW GEMMs, the fused LayerNorm, activation and
//! attention backwards). With `rows`, only those rows of the output are wanted (the pooled
//! tokens): keys and values are computed for every row, the output projection and the MLP for
//! the chosen rows only.
//!
//! Per block (N rows, R output rows, W width, I MLP width):
//!   h1 = LN1(x)                       layernorm
//!   q, k, v = h1·Wᵀ + b               3 × linear                        [N, W]
//!   a = attention(q, k, v)            attention (batched or packed)     [N, W]
//!   xs, as = rows of x, a             gather_rows (pooled blocks only)  [R, W]
//!   o = as·Woᵀ + bo                   linear
//!   h2 = LN2(xm = xs + o)             add_layernorm (residual fused)
//!   m = act(h2·W1ᵀ + b1)              linear, bias_act                  [R, I]
//!   y = xm + m·W2ᵀ + b2               linear, axpy                      [R, W]
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

/// The residual stream x [N, W] (consumed) plus, from the previous block, its MLP output
/// `pending` not yet added (it is added inside this block's first LayerNorm: the residual fused
/// with the norm) → this block's (xm, f), whose sum is the block's output [N, W], or [R, W] with
/// `rows`; with `keep`, what the backward needs (the block's input is x + pending).
#[allow(clippy::type_complexity)]
pub fn forward<O: Ops>(
    ops: &O,
    blk: &BlockRef<O>,
    mut x: O::Buf,
    pending: Option<&O::Buf>,
    seqs: &Seqs,
    rows: Option<&[usize]>,
    keep: bool,
) -> Result<(O::Buf, O::Buf, Option<Saved<O>>)> {
    use BlockParam::*;
    let c = blk.cfg;
    let (n, w, inter) = (seqs.rows(), c.hidden, c.intermediate);
    let (g1, b1) = (blk.buf(Ln1Weight), blk.buf(Ln1Bias));
    let (h1, st1) = match pending {
        Some(f) => ops.add_layernorm(&mut x, f, g1, b1, n, w, c.eps)?, // x += f
        None => ops.layernorm(&x, g1, b1, n, w, c.eps)?,
    }; // [N, W]
    let q = ops.linear(&h1, blk.lin(QWeight)?, Some(blk.buf(QBias)), n)?; // [N, W]
    let k = ops.linear(&h1, blk.lin(KWeight)?, Some(blk.buf(KBias)), n)?;
    let v = ops.linear(&h1, blk.lin(VWeight)?, Some(blk.buf(VBias)), n)?;
    let (a, lse) = ops.attention(&q, &k, &v, seqs, c.heads, w)?; // [N, W]
    let (r, mut xm, a_rows) = match rows {
        Some(rs) => (rs.len(), ops.gather_rows(&x, rs, w)?, Some(ops.gather_rows(&a, rs, w)?)), // [R, W]
        None if keep => (n, ops.copy(&x, n * w)?, None),                                        // [N, W]
        None => (n, std::mem::replace(&mut x, ops.zeros(0)?), None),                            // [N, W], x no longer needed
    };
    let o = ops.linear(a_rows.as_ref().unwrap_or(&a), blk.lin(OutWeight)?, Some(blk.buf(OutBias)), r)?; // [R, W]
    let (h2, st2) = ops.add_layernorm(&mut xm, &o, blk.buf(Ln2Weight), blk.buf(Ln2Bias), r, w, c.eps)?; // xm = x + o
    drop(o);
    let u = ops.linear(&h2, blk.lin(Fc1Weight)?, None, r)?; // [R, I]
    let (m, pre) = ops.bias_act(u, blk.buf(Fc1Bias), r, inter, blk.act(), keep)?; // [R, I] each (pre only to keep)
    let f = ops.linear(&m, blk.lin(Fc2Weight)?, Some(blk.buf(Fc2Bias)), r)?; // [R, W]
    if !keep {
        return Ok((xm, f, None));
    }
    let out = ops.copy(&xm, r * w)?;
    let pre = pre.ok_or_else(|| Error::msg("bias_act kept no pre-activation"))?;
    let saved = Saved { seqs: seqs.clone(), rows: rows.map(|r| r.to_vec()), x, h1, st1, q, k, v, a, lse, a_rows, xm, h2, st2, pre, m };
    Ok((out, f, Some(saved)))
}

/// The block's output xm + f (in xm's buffer).
pub fn finish<O: Ops>(ops: &O, mut xm: O::Buf, f: &O::Buf, n: usize) -> Result<O::Buf> {
    ops.axpy(&mut xm, f, 1.0, n)?;
    Ok(xm)
}

/// dy [R, W] → (dx [N, W], the 16 parameter gradients in [`BlockParam`] order).
pub fn backward<O: Ops>(ops: &O, blk: &BlockRef<O>, s: &Saved<O>, dy: &O::Buf) -> Result<(O::Buf, Vec<O::Buf>)> {
    use BlockParam::*;
    let c = blk.cfg;
    let (n, w, inter) = (s.seqs.rows(), c.hidden, c.intermediate);
    let r = s.rows.as_ref().map_or(n, |v| v.len());
    // MLP: y = xm + fc2(act(fc1(ln2(xm))))
    let mut dm = ops.zeros(r * inter)?;
    let (dw2, db2) = ops.linear_bwd(dy, &s.m, blk.lin(Fc2Weight)?, r, &mut dm, false, true)?;
    let (du, db1) = ops.bias_act_bwd(&dm, &s.pre, r, inter, blk.act())?; // [R, I]
    drop(dm);
    let mut dh2 = ops.zeros(r * w)?;
    let (dw1, _) = ops.linear_bwd(&du, &s.h2, blk.lin(Fc1Weight)?, r, &mut dh2, false, false)?; // its bias gradient came with the activation's
    drop(du);
    let (dxm2, dg2, dbeta2) = ops.layernorm_bwd(&dh2, &s.xm, blk.buf(Ln2Weight), &s.st2, r, w, c.eps)?;
    let mut dxm = ops.copy(dy, r * w)?;
    ops.axpy(&mut dxm, &dxm2, 1.0, r * w)?; // [R, W]
                                            // attention: xm = x + out_proj(attn(q, k, v))
    let mut da = ops.zeros(r * w)?;
    let (dwo, dbo) = ops.linear_bwd(&dxm, s.a_rows.as_ref().unwrap_or(&s.a), blk.lin(OutWeight)?, r, &mut da, false, true)?;
    let (da, mut dx) = match &s.rows {
        Some(rows) => (ops.scatter_rows(&da, rows, n, w)?, ops.scatter_rows(&dxm, rows, n, w)?), // [N, W]
        None => (da, dxm),
    };
    let (dq, dk, dv) = ops.attention_bwd(&s.q, &s.k, &s.v, &s.a, &s.lse, &da, &s.seqs, c.heads, w)?;
    drop(da);
    let mut dh1 = ops.zeros(n * w)?;
    let (dwq, dbq) = ops.linear_bwd(&dq, &s.h1, blk.lin(QWeight)?, n, &mut dh1, false, true)?;
    let (dwk, dbk) = ops.linear_bwd(&dk, &s.h1, blk.lin(KWeight)?, n, &mut dh1, true, true)?;
    let (dwv, dbv) = ops.linear_bwd(&dv, &s.h1, blk.lin(VWeight)?, n, &mut dh1, true, true)?;
    let (dx1, dg1, dbeta1) = ops.layernorm_bwd(&dh1, &s.x, blk.buf(Ln1Weight), &s.st1, n, w, c.eps)?;
    ops.axpy(&mut dx, &dx1, 1.0, n * w)?; // dx = residual + d(ln1 path)
    let b = |d: Option<O::Buf>| d.ok_or_else(|| Error::msg("linear_bwd returned no bias gradient"));
    Ok((dx, vec![dg1, dbeta1, dwq, b(dbq)?, dwk, b(dbk)?, dwv, b(dbv)?, dwo, b(dbo)?, dg2, dbeta2, dw1, db1, dw2, b(db2)?]))
}
