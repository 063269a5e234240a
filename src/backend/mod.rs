//! The interface of fused operations the CLIP block is written against ([`crate::model::block`]),
//! and its backends: the CPU ([`cpu::Cpu`]: the AVX-512 GEMMs, bf16 packed weights, the blocked
//! attention) and a CUDA device or its CPU emulator ([`device::Device`]: the kernels of kernels/,
//! cuBLASLt). Operations are sized like the kernels: a Linear with its bias, LayerNorm with an
//! optional residual add, attention over batched or packed sequences, a bias + activation, and
//! their backwards. Backends know no CLIP: rows, widths, weights and sequence lengths only.
pub mod cpu;
mod cpu_attention;
mod cpu_linear;
pub mod device;
mod device_attn;
mod device_fused;
pub mod profile;

use crate::error::Result;
use crate::tensor::DType;

/// The activation after a Linear's bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// x·σ(1.702x) (OpenAI CLIP).
    QuickGelu,
    /// The exact erf GELU.
    Gelu,
}

/// How attention groups the rows of q, k, v [N, W].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seqs {
    /// `batch` sequences of `seq` rows each (N = batch·seq), optionally causal.
    Batch { batch: usize, seq: usize, causal: bool },
    /// Causal sequences of these lengths packed back to back with no padding (N = Σ lengths).
    Packed(Vec<usize>),
}

impl Seqs {
    /// The number of rows N.
    pub fn rows(&self) -> usize {
        match self {
            Seqs::Batch { batch, seq, .. } => batch * seq,
            Seqs::Packed(lens) => lens.iter().sum(),
        }
    }
}

/// [`Ops::qkv_bwd`] as three [`Ops::linear_bwd`]s, dh accumulated over q, k, v in that order (the
/// default, and a backend's fallback where it fuses the common case).
#[allow(clippy::type_complexity)]
pub fn qkv_bwd_composite<O: Ops>(ops: &O, d: [&O::Buf; 3], h: &O::Buf, w: [&Weight<O>; 3], n: usize) -> Result<(O::Buf, [O::Buf; 3], [O::Buf; 3])> {
    let mut dh = ops.uninit(n * w[0].k)?; // [n, K]
    let mut out = Vec::with_capacity(3);
    for (i, (d, w)) in d.into_iter().zip(w).enumerate() {
        let (dw, db) = ops.linear_bwd(d, h, w, n, &mut dh, i > 0, true)?;
        out.push((dw, db.ok_or_else(|| crate::error::Error::msg("linear_bwd returned no bias gradient"))?));
    }
    let [(dwq, dbq), (dwk, dbk), (dwv, dbv)]: [(O::Buf, O::Buf); 3] =
        out.try_into().map_err(|_| crate::error::Error::msg("qkv_bwd: three gradients expected"))?;
    Ok((dh, [dwq, dwk, dwv], [dbq, dbk, dbv]))
}

/// [`Ops::attention_pooled`] through the general ops: q, k, v and the attention of every row, then
/// the rows `rows` ([R, W]).
#[allow(clippy::too_many_arguments)]
pub fn attention_pooled_composite<O: Ops>(
    ops: &O,
    h: &O::Buf,
    w: [&Weight<O>; 3],
    b: [&O::Buf; 3],
    seqs: &Seqs,
    rows: &[usize],
    heads: usize,
    width: usize,
) -> Result<O::Buf> {
    let [q, k, v] = ops.qkv(h, w, b, seqs.rows(), heads)?; // [N, W] each
    let (a, _) = ops.attention(&q, &k, &v, seqs, heads, width)?; // [N, W]
    ops.gather_rows(&a, rows, width) // [R, W]
}

/// A Linear weight W [n, k] as a backend holds it: the f32 values (the backward's, and the
/// forward's in f32) and, in bf16/f16, the low-precision copy the forward GEMM reads.
pub struct Weight<O: Ops + ?Sized> {
    pub w: O::Buf,
    pub half: Option<O::Half>,
    pub n: usize,
    pub k: usize,
}

/// The fused operations. Buffers hold f32 values, row-major; shapes are passed explicitly. Every
/// operation returns fresh buffers except the ones that say "in place".
pub trait Ops {
    /// A buffer of f32 values on the backend.
    type Buf;
    /// A Linear weight's copy for the forward GEMM in the backend's own layout (low precision,
    /// or packed: [`Ops::freeze_weight`]).
    type Half;

    /// Where it computes, in words.
    fn describe(&self) -> String;
    fn upload(&self, data: &[f32]) -> Result<Self::Buf>;
    fn download(&self, b: &Self::Buf) -> Result<Vec<f32>>;
    fn zeros(&self, n: usize) -> Result<Self::Buf>;
    /// A weight or input tensor as f32 values on the backend (the CPU keeps it as it is).
    fn upload_tensor(&self, t: &crate::tensor::Tensor) -> Result<Self::Buf> {
        self.upload(&t.to_vec_f32())
    }
    /// Whether [`Ops::attention`] takes [`Seqs::Packed`] (else sequences are padded to a batch).
    fn packed_attention(&self) -> bool {
        true
    }
    /// A Linear weight W [n, k] from f32 values, with a `dtype` copy for the forward when
    /// `dtype` is BF16 or F16 (an error where the backend has no such GEMM).
    fn weight(&self, w: Self::Buf, n: usize, k: usize, dtype: DType) -> Result<Weight<Self>>;
    /// Says that `w` will not change any more (an inference model): the backend may keep a
    /// copy in the layout its forward GEMM reads (changes to `w.w` afterwards are not seen by
    /// that copy). Nothing by default.
    fn freeze_weight(&self, w: &mut Weight<Self>) -> Result<()> {
        let _ = w;
        Ok(())
    }

    /// y `[m, n]` = x `[m, k]`·Wᵀ (+ bias `[n]`).
    fn linear(&self, x: &Self::Buf, w: &Weight<Self>, bias: Option<&Self::Buf>, m: usize) -> Result<Self::Buf>;
    /// The backward of [`Ops::linear`] from dy `[m, n]`: dx `[m, k]` written (or added to, with
    /// `accumulate`) in place, and (dW `[n, k]`, db `[n]` when the Linear has its `bias` here).
    #[allow(clippy::too_many_arguments)]
    fn linear_bwd(
        &self,
        dy: &Self::Buf,
        x: &Self::Buf,
        w: &Weight<Self>,
        m: usize,
        dx: &mut Self::Buf,
        accumulate: bool,
        bias: bool,
    ) -> Result<(Self::Buf, Option<Self::Buf>)>;

    /// A buffer of `n` elements that the caller overwrites entirely before reading it (zeros
    /// where the backend has no cheaper allocation).
    fn uninit(&self, n: usize) -> Result<Self::Buf> {
        self.zeros(n)
    }

    /// q, k, v [n, W] = h·Wᵀ + b for the three weights of an attention layer, whose outputs are
    /// read only by [`Ops::attention`], [`Ops::attention_bwd`] and `download` (a backend may then
    /// keep them in the format its attention computes in).
    fn qkv(&self, h: &Self::Buf, w: [&Weight<Self>; 3], b: [&Self::Buf; 3], n: usize, heads: usize) -> Result<[Self::Buf; 3]> {
        let _ = heads;
        Ok([self.linear(h, w[0], Some(b[0]), n)?, self.linear(h, w[1], Some(b[1]), n)?, self.linear(h, w[2], Some(b[2]), n)?])
    }
    /// The backward of [`Ops::qkv`] from dq, dk, dv → (dh [n, K], the three dW, the three db).
    #[allow(clippy::type_complexity)]
    fn qkv_bwd(&self, d: [&Self::Buf; 3], h: &Self::Buf, w: [&Weight<Self>; 3], n: usize) -> Result<(Self::Buf, [Self::Buf; 3], [Self::Buf; 3])>
    where
        Self: Sized,
    {
        qkv_bwd_composite(self, d, h, w, n)
    }
    /// act(x·Wᵀ + bias) [m, n] → (out, with `keep_pre` x·Wᵀ + bias for the backward): the MLP's
    /// first Linear with its bias and activation. The output is read by a Linear (as its input),
    /// [`Ops::linear_bwd`] (as x) and `download`; `pre` only by [`Ops::bias_act_bwd`].
    #[allow(clippy::too_many_arguments)]
    fn linear_act(&self, x: &Self::Buf, w: &Weight<Self>, bias: &Self::Buf, m: usize, act: Act, keep_pre: bool) -> Result<(Self::Buf, Option<Self::Buf>)> {
        let u = self.linear(x, w, None, m)?; // [m, n]
        self.bias_act(u, bias, m, w.n, act, keep_pre)
    }
    /// y [m, n] = res + (x·Wᵀ + bias), a new buffer (res is kept): a Linear with the residual
    /// add fused.
    fn linear_add(&self, x: &Self::Buf, w: &Weight<Self>, bias: &Self::Buf, m: usize, res: &Self::Buf) -> Result<Self::Buf> {
        let f = self.linear(x, w, Some(bias), m)?; // [m, n]
        let mut y = self.copy(res, m * w.n)?;
        self.axpy(&mut y, &f, 1.0, m * w.n)?;
        Ok(y)
    }

    /// y = LayerNorm(x) over rows of `w` → (y, statistics for the backward).
    fn layernorm(&self, x: &Self::Buf, g: &Self::Buf, b: &Self::Buf, rows: usize, w: usize, eps: f32) -> Result<(Self::Buf, Self::Buf)>;
    /// x += f in place, then y = LayerNorm(x) → (y, statistics): a residual add fused with the next norm.
    #[allow(clippy::too_many_arguments)]
    fn add_layernorm(&self, x: &mut Self::Buf, f: &Self::Buf, g: &Self::Buf, b: &Self::Buf, rows: usize, w: usize, eps: f32) -> Result<(Self::Buf, Self::Buf)>;
    /// [`Ops::layernorm`] whose output is read only by Linears (as their input),
    /// [`Ops::linear_bwd`] (as x), [`Ops::qkv`] / [`Ops::linear_act`] and `download` (a backend may
    /// keep it in its GEMMs' input format only).
    #[allow(clippy::too_many_arguments)]
    fn layernorm_for_linear(&self, x: &Self::Buf, g: &Self::Buf, b: &Self::Buf, rows: usize, w: usize, eps: f32) -> Result<(Self::Buf, Self::Buf)> {
        self.layernorm(x, g, b, rows, w, eps)
    }
    /// The backward of [`Ops::layernorm`] from dy → (dx, dγ, dβ).
    #[allow(clippy::too_many_arguments)]
    fn layernorm_bwd(
        &self,
        dy: &Self::Buf,
        x: &Self::Buf,
        g: &Self::Buf,
        stats: &Self::Buf,
        rows: usize,
        w: usize,
        eps: f32,
    ) -> Result<(Self::Buf, Self::Buf, Self::Buf)>;
    /// [`Ops::layernorm_bwd`] with a residual gradient added: (res + dx, dγ, dβ).
    #[allow(clippy::too_many_arguments)]
    fn layernorm_bwd_add(
        &self,
        dy: &Self::Buf,
        x: &Self::Buf,
        g: &Self::Buf,
        stats: &Self::Buf,
        rows: usize,
        w: usize,
        eps: f32,
        res: &Self::Buf,
    ) -> Result<(Self::Buf, Self::Buf, Self::Buf)> {
        let (dx, dg, db) = self.layernorm_bwd(dy, x, g, stats, rows, w, eps)?;
        let mut out = self.copy(res, rows * w)?;
        self.axpy(&mut out, &dx, 1.0, rows * w)?;
        Ok((out, dg, db))
    }

    /// u [rows, n] (consumed) → act(u + bias), in u's buffer, and with `keep_pre` u + bias (the
    /// backward's input): the MLP's bias and activation.
    #[allow(clippy::type_complexity)]
    fn bias_act(&self, u: Self::Buf, bias: &Self::Buf, rows: usize, n: usize, act: Act, keep_pre: bool) -> Result<(Self::Buf, Option<Self::Buf>)>;
    /// The backward of [`Ops::bias_act`] from d(out) → (d(u), d(bias)), given pre = u + bias.
    fn bias_act_bwd(&self, dout: &Self::Buf, pre: &Self::Buf, rows: usize, n: usize, act: Act) -> Result<(Self::Buf, Self::Buf)>;

    /// Multi-head attention of q, k, v [N, W] (`heads` heads of W/heads) → (o [N, W], lse).
    fn attention(&self, q: &Self::Buf, k: &Self::Buf, v: &Self::Buf, seqs: &Seqs, heads: usize, w: usize) -> Result<(Self::Buf, Self::Buf)>;
    /// The attention outputs of rows `rows` only ([R, W]), from h [N, W] (the block's LN1
    /// output) and the q, k, v weights: the pooled rows of a last block at inference, whose other
    /// rows nothing reads. The default computes q, k, v and the attention for every row
    /// ([`Ops::qkv`], [`Ops::attention`]) and gathers the rows; a backend may compute q and the
    /// attention for those rows alone (k and v still for every row).
    #[allow(clippy::too_many_arguments)]
    fn attention_pooled(
        &self,
        h: &Self::Buf,
        w: [&Weight<Self>; 3],
        b: [&Self::Buf; 3],
        seqs: &Seqs,
        rows: &[usize],
        heads: usize,
        width: usize,
    ) -> Result<Self::Buf>
    where
        Self: Sized,
    {
        attention_pooled_composite(self, h, w, b, seqs, rows, heads, width)
    }
    /// The backward of [`Ops::attention`] from do → (dq, dk, dv).
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        o: &Self::Buf,
        lse: &Self::Buf,
        d_o: &Self::Buf,
        seqs: &Seqs,
        heads: usize,
        w: usize,
    ) -> Result<(Self::Buf, Self::Buf, Self::Buf)>;

    /// A fresh copy of the first `n` values of x.
    fn copy(&self, x: &Self::Buf, n: usize) -> Result<Self::Buf>;
    /// The patch convolution (stride = kernel = p, no bias) of pixels [B, C, S, S] with the
    /// weight W [D, C·p·p] → [B·N, D], N = (S/p)², patches in raster order.
    #[allow(clippy::too_many_arguments)]
    fn patch_embed(&self, px: &Self::Buf, w: &Weight<Self>, b: usize, c: usize, s: usize, p: usize) -> Result<Self::Buf>;
    /// The class token before each image's N patches, plus the positions: patches `[B·N, W]`,
    /// cls `[W]`, pos `[N+1, W]` → `[B·(N+1), W]`.
    #[allow(clippy::too_many_arguments)]
    fn vision_embed(&self, patches: &Self::Buf, cls: &Self::Buf, pos: &Self::Buf, b: usize, n: usize, w: usize) -> Result<Self::Buf>;
    /// The backward of [`Ops::patch_embed`] to the weight: dW [D, C·p·p] from d(patches) [B·N, D].
    #[allow(clippy::too_many_arguments)]
    fn patch_embed_bwd(&self, px: &Self::Buf, dpatches: &Self::Buf, b: usize, c: usize, s: usize, p: usize, d: usize) -> Result<Self::Buf>;
    /// The backward of [`Ops::vision_embed`]: dx `[B·(N+1), W]` → (d(patches) `[B·N, W]`, d(cls) `[W]`,
    /// d(pos) `[N+1, W]`).
    fn vision_embed_bwd(&self, dx: &Self::Buf, b: usize, n: usize, w: usize) -> Result<(Self::Buf, Self::Buf, Self::Buf)>;
    /// The backward of a row gather from a table: `table[ids[i]] += dx[i]` in place, each table row's
    /// sum in the order of `ids` (deterministic: no atomics).
    fn embedding_bwd(&self, dx: &Self::Buf, ids: &[usize], table: &mut Self::Buf, w: usize) -> Result<()>;
    /// y += alpha·x in place (n elements).
    fn axpy(&self, y: &mut Self::Buf, x: &Self::Buf, alpha: f32, n: usize) -> Result<()>;
    /// Rows `rows` of x [N, w] → [R, w].
    fn gather_rows(&self, x: &Self::Buf, rows: &[usize], w: usize) -> Result<Self::Buf>;
    /// dx [N, w] = zeros with rows `rows` set to d [R, w] (the backward of [`Ops::gather_rows`]
    /// for distinct rows).
    fn scatter_rows(&self, d: &Self::Buf, rows: &[usize], n: usize, w: usize) -> Result<Self::Buf>;
}
