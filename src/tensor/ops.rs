//! Tensor-level ops: shape checks, layout handling and dispatch to the CPU kernels in `crate::ops`.
//! Every op returns a new contiguous f32 tensor. Fused ops (layer_norm, softmax, attention,
//! patch_embed, linear) have composite twins built from the primitives in tests/composite.rs.
use super::{contiguous_strides, Tensor};
use crate::error::Result;
use crate::ops::attention::{self, AttnShape};
use crate::ops::elementwise::{self, broadcast_shape, broadcast_strides, Binary, Operand, Unary};
use crate::ops::matmul::{self, View};
use crate::ops::patch_embed::{self, PatchShape};
use crate::ops::reduce::{self, Reduce};
use crate::ops::{embedding, layernorm, softmax};
use crate::shape_err;

impl Tensor {
    /// The last dim, and the number of rows before it.
    fn rows_cols(&self) -> (usize, usize) {
        let n = *self.shape().last().unwrap_or(&1);
        (self.numel().checked_div(n).unwrap_or(0), n)
    }

    // ---- elementwise -------------------------------------------------------------------------

    pub fn unary(&self, op: Unary) -> Tensor {
        Tensor::from_vec(elementwise::unary(op, &self.f32_data()), self.shape()).expect("same shape")
    }
    pub fn quick_gelu(&self) -> Tensor {
        self.unary(Unary::QuickGelu)
    }
    pub fn gelu(&self) -> Tensor {
        self.unary(Unary::Gelu)
    }
    pub fn exp(&self) -> Tensor {
        self.unary(Unary::Exp)
    }

    /// Elementwise `op` with numpy broadcasting; operands may be any strided views.
    pub fn binary(&self, op: Binary, other: &Tensor) -> Result<Tensor> {
        let shape = broadcast_shape(self.shape(), other.shape()).ok_or_else(|| shape_err!("cannot broadcast {:?} with {:?}", self.shape(), other.shape()))?;
        let (a, b) = (self.storage_f32(), other.storage_f32());
        let oa = Operand { data: &a.0, offset: a.1, strides: broadcast_strides(self.shape(), self.strides(), &shape) };
        let ob = Operand { data: &b.0, offset: b.1, strides: broadcast_strides(other.shape(), other.strides(), &shape) };
        Tensor::from_vec(elementwise::binary(op, &oa, &ob, &shape), &shape)
    }
    pub fn add(&self, o: &Tensor) -> Result<Tensor> {
        self.binary(Binary::Add, o)
    }
    pub fn sub(&self, o: &Tensor) -> Result<Tensor> {
        self.binary(Binary::Sub, o)
    }
    pub fn mul(&self, o: &Tensor) -> Result<Tensor> {
        self.binary(Binary::Mul, o)
    }
    pub fn div(&self, o: &Tensor) -> Result<Tensor> {
        self.binary(Binary::Div, o)
    }
    pub fn scale(&self, s: f32) -> Tensor {
        self.map_f32(|x| x * s)
    }

    /// The storage as f32 plus this view's offset (converted once if the storage is f16/bf16).
    fn storage_f32(&self) -> (std::borrow::Cow<'_, [f32]>, usize) {
        match self.storage().as_f32() {
            Some(s) => (std::borrow::Cow::Borrowed(s), self.offset),
            None => (std::borrow::Cow::Owned(self.storage().to_f32_range(0, self.storage().len())), self.offset),
        }
    }

    // ---- reductions ----------------------------------------------------------------------------

    /// Reduces `dim` (kept as size 1 when `keepdim`).
    pub fn reduce(&self, op: Reduce, dim: usize, keepdim: bool) -> Result<Tensor> {
        if dim >= self.rank() {
            return Err(shape_err!("reduce over dim {dim} of {:?}", self.shape()));
        }
        let last = self.rank() - 1;
        let moved = if dim == last { self.clone() } else { self.transpose(dim, last)? };
        let n = moved.dim(last);
        let vals = reduce::reduce(op, &moved.f32_data(), n);
        let mut shape = moved.shape().to_vec();
        shape[last] = 1;
        let t = Tensor::from_vec(vals, &shape)?;
        let t = if dim == last { t } else { t.transpose(dim, last)?.contiguous() };
        if keepdim {
            Ok(t)
        } else {
            let mut s = self.shape().to_vec();
            s.remove(dim);
            t.reshape(&s)
        }
    }
    pub fn sum(&self, dim: usize, keepdim: bool) -> Result<Tensor> {
        self.reduce(Reduce::Sum, dim, keepdim)
    }
    pub fn max(&self, dim: usize, keepdim: bool) -> Result<Tensor> {
        self.reduce(Reduce::Max, dim, keepdim)
    }
    pub fn mean(&self, dim: usize, keepdim: bool) -> Result<Tensor> {
        self.reduce(Reduce::Mean, dim, keepdim)
    }

    // ---- fused row ops ---------------------------------------------------------------------------

    pub fn softmax_last(&self) -> Tensor {
        let (_, n) = self.rows_cols();
        Tensor::from_vec(softmax::softmax(&self.f32_data(), n), self.shape()).expect("same shape")
    }

    /// LayerNorm over the last dim.
    pub fn layer_norm(&self, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
        let (_, n) = self.rows_cols();
        if gamma.shape() != [n] || beta.shape() != [n] {
            return Err(shape_err!("layer_norm of {:?} with weight {:?} and bias {:?}", self.shape(), gamma.shape(), beta.shape()));
        }
        let y = layernorm::layer_norm(&self.f32_data(), n, &gamma.f32_data(), &beta.f32_data(), eps);
        Tensor::from_vec(y, self.shape())
    }

    // ---- matmul --------------------------------------------------------------------------------

    /// Batched matmul [.., m, k] × [.., k, n] → [.., m, n]; `other` may be 2-D (shared by all
    /// batches). Transposed views are used in place.
    pub fn matmul(&self, other: &Tensor) -> Result<Tensor> {
        let (ra, rb) = (self.rank(), other.rank());
        if ra < 2 || rb < 2 {
            return Err(shape_err!("matmul needs rank ≥ 2: {:?} × {:?}", self.shape(), other.shape()));
        }
        let (m, k) = (self.dim(ra - 2), self.dim(ra - 1));
        let (k2, n) = (other.dim(rb - 2), other.dim(rb - 1));
        let batch_a = &self.shape()[..ra - 2];
        let batch_b = &other.shape()[..rb - 2];
        if k != k2 || (rb > 2 && batch_a != batch_b) {
            return Err(shape_err!("matmul {:?} × {:?}", self.shape(), other.shape()));
        }
        let nb: usize = batch_a.iter().product();
        // Each operand needs uniform strides over its batch dims: make it contiguous if not.
        let a = if uniform_batch(self) { self.clone() } else { self.contiguous() };
        let b = if rb == 2 || uniform_batch(other) { other.clone() } else { other.contiguous() };
        let (ad, ao) = a.storage_f32();
        let (bd, bo) = b.storage_f32();
        let a_bs = if ra > 2 { a.strides()[ra - 3] } else { 0 };
        let b_bs = if rb > 2 { b.strides()[rb - 3] } else { 0 };
        let mut out = vec![0f32; nb * m * n];
        for i in 0..nb {
            let av = View { data: &ad[ao + i * a_bs..], rows: m, cols: k, rs: a.strides()[ra - 2], cs: a.strides()[ra - 1] };
            let bv = View { data: &bd[bo + i * b_bs..], rows: k, cols: n, rs: b.strides()[rb - 2], cs: b.strides()[rb - 1] };
            matmul::gemm(av, bv, &mut out[i * m * n..(i + 1) * m * n], false);
        }
        let mut shape = batch_a.to_vec();
        shape.extend([m, n]);
        Tensor::from_vec(out, &shape)
    }

    /// x[.., k] · wᵀ (+ b) with w [n, k]: the Linear layer.
    pub fn linear(&self, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let (m, k) = self.rows_cols();
        if self.rank() == 0 || w.rank() != 2 || w.dim(1) != k {
            return Err(shape_err!("linear: input {:?}, weight {:?}", self.shape(), w.shape()));
        }
        let n = w.dim(0);
        if let Some(b) = bias {
            if b.shape() != [n] {
                return Err(shape_err!("linear: weight {:?}, bias {:?}", w.shape(), b.shape()));
            }
        }
        let bias_data = bias.map(|b| b.f32_data());
        let y = matmul::linear(&self.f32_data(), m, k, &w.f32_data(), n, bias_data.as_deref());
        let mut shape = self.shape().to_vec();
        *shape.last_mut().unwrap() = n;
        Tensor::from_vec(y, &shape)
    }

    // ---- model ops -----------------------------------------------------------------------------

    /// Fused attention over q, k, v of shape [B, T, H·hd]; returns (o [B, T, H·hd], lse [B, H, T]).
    pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Result<(Tensor, Tensor)> {
        if q.rank() != 3 || q.shape() != k.shape() || q.shape() != v.shape() || heads == 0 || !q.dim(2).is_multiple_of(heads) {
            return Err(shape_err!("attention: q {:?}, k {:?}, v {:?}, {heads} heads", q.shape(), k.shape(), v.shape()));
        }
        let (b, t, w) = (q.dim(0), q.dim(1), q.dim(2));
        let hd = w / heads;
        let s = AttnShape { batch: b, seq: t, heads, head_dim: hd, causal, scale: 1.0 / (hd as f32).sqrt() };
        let (o, lse) = attention::attention(&q.f32_data(), &k.f32_data(), &v.f32_data(), &s);
        Ok((Tensor::from_vec(o, q.shape())?, Tensor::from_vec(lse, &[b, heads, t])?))
    }

    /// Rows of `table` [V, W] picked by `ids` → [ids.len(), W].
    pub fn embedding(table: &Tensor, ids: &[u32]) -> Result<Tensor> {
        if table.rank() != 2 {
            return Err(shape_err!("embedding table {:?}", table.shape()));
        }
        let (v, w) = (table.dim(0), table.dim(1));
        Tensor::from_vec(embedding::embedding(&table.f32_data(), v, w, ids)?, &[ids.len(), w])
    }

    /// Stride-P, kernel-P convolution without bias: pixels [B, C, H, W], weight [D, C, P, P] → [B, N, D].
    pub fn patch_embed(pixels: &Tensor, weight: &Tensor) -> Result<Tensor> {
        if pixels.rank() != 4 || weight.rank() != 4 || weight.dim(1) != pixels.dim(1) || weight.dim(2) != weight.dim(3) {
            return Err(shape_err!("patch_embed: pixels {:?}, weight {:?}", pixels.shape(), weight.shape()));
        }
        let s =
            PatchShape { batch: pixels.dim(0), channels: pixels.dim(1), height: pixels.dim(2), width: pixels.dim(3), patch: weight.dim(2), dim: weight.dim(0) };
        if s.patch == 0 || s.height < s.patch || s.width < s.patch {
            return Err(shape_err!("patch_embed: image {}×{} smaller than patch {}", s.height, s.width, s.patch));
        }
        let y = patch_embed::patch_embed(&pixels.f32_data(), &weight.f32_data(), &s);
        Tensor::from_vec(y, &[s.batch, s.patches(), s.dim])
    }
}

/// Whether the batch dims (all but the last two) of `t` can be walked with one stride.
fn uniform_batch(t: &Tensor) -> bool {
    let r = t.rank();
    if r <= 3 {
        return true;
    }
    let (sh, st) = (&t.shape()[..r - 2], &t.strides()[..r - 2]);
    let cs = contiguous_strides(sh);
    (0..sh.len()).all(|i| sh[i] == 1 || st[i] == cs[i] * st[sh.len() - 1])
}
