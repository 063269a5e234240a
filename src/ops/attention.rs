//! Fused multi-head attention: o = softmax(q·kᵀ·scale [+ causal mask])·v in one pass per
//! (batch, head), never materialising the [T×T] score matrix beyond one row. Also returns the
//! row logsumexp (what a backward pass needs to recompute the probabilities).
//!
//! Layout: q, k, v and o are [B, T, H·hd] (heads side by side in each row, as the projections
//! produce them), lse is [B, H, T]. Any T ≥ 1 and any head dim.
//!
//! The backward is in `attention_bwd.rs` (re-exported here).
#[cfg(target_arch = "x86_64")]
pub use super::attention_bwd::attention_backward_avx512;
pub use super::attention_bwd::{attention_backward, attention_backward_portable, attention_backward_reference, attention_packed_backward};
use super::fastmath;
use super::matmul::{gemm_seq, View};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub scale: f32,
}

impl AttnShape {
    pub fn width(&self) -> usize {
        self.heads * self.head_dim
    }
    pub fn numel(&self) -> usize {
        self.batch * self.seq * self.width()
    }
    /// Keys visible to query `i`.
    pub(super) fn keys(&self, i: usize) -> usize {
        if self.causal {
            i + 1
        } else {
            self.seq
        }
    }
}

/// Naive reference in f64.
pub fn attention_reference(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape) -> (Vec<f32>, Vec<f32>) {
    let (t, w, d) = (s.seq, s.width(), s.head_dim);
    let mut out = vec![0f32; s.numel()];
    let mut lse = vec![0f32; s.batch * s.heads * t];
    for b in 0..s.batch {
        for h in 0..s.heads {
            for i in 0..t {
                let qi = &q[(b * t + i) * w + h * d..][..d];
                let nk = s.keys(i);
                let sc: Vec<f64> = (0..nk)
                    .map(|j| {
                        let kj = &k[(b * t + j) * w + h * d..][..d];
                        qi.iter().zip(kj).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>() * s.scale as f64
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                lse[(b * s.heads + h) * t + i] = (m + z.ln()) as f32;
                for e in 0..d {
                    let acc: f64 = (0..nk).map(|j| (sc[j] - m).exp() / z * v[(b * t + j) * w + h * d + e] as f64).sum();
                    out[(b * t + i) * w + h * d + e] = acc as f32;
                }
            }
        }
    }
    (out, lse)
}

/// Query rows per block on the causal path: the block of rows r0..r1 needs keys 0..r1 only, so
/// the masked half of the score matrix is (block-wise) never computed.
pub(super) const QBLK: usize = 64;

/// The query blocks of one sequence: (r0, r1, keys the block needs).
pub(super) fn query_blocks(s: &AttnShape) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    let step = if s.causal { QBLK } else { s.seq.max(1) };
    (0..s.seq).step_by(step).map(move |r0| {
        let r1 = (r0 + step).min(s.seq);
        (r0, r1, if s.causal { r1 } else { s.seq })
    })
}

/// The fast path: on AVX-512 CPUs [`attention_avx512`], else [`attention_portable`].
pub fn attention(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape) -> (Vec<f32>, Vec<f32>) {
    // SAFETY: `attention_into` writes every element of both outputs.
    unsafe { with_outputs(s, |o, l| attention_into(q, k, v, s, o, l)) }
}

/// [`attention`] into `out` ([B, T, W]) and `lse` ([B, H, T]), every element written.
pub fn attention_into(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape, out: &mut [f32], lse: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu_path::selected() >= super::cpu_path::GemmPath::Avx512 {
        return avx512_into(q, k, v, s, out, lse);
    }
    portable_into(q, k, v, s, out, lse)
}

/// Runs `f(out, lse)` on new buffers of `s`'s output sizes ([B, T, W] and [B, H, T]) and returns
/// them, with no zero-fill first (a pass over [B, T, W] on one core).
///
/// # Safety
/// `f` writes every element of both and reads none before writing it (as every `_into` attention).
pub(super) unsafe fn with_outputs(s: &AttnShape, f: impl FnOnce(&mut [f32], &mut [f32])) -> (Vec<f32>, Vec<f32>) {
    // SAFETY: the caller's contract.
    unsafe { outputs(s.numel(), s.batch * s.heads * s.seq, f) }
}

/// Buffers of `n` and `nl` values that `f` fills.
///
/// # Safety
/// As [`with_outputs`].
unsafe fn outputs(n: usize, nl: usize, f: impl FnOnce(&mut [f32], &mut [f32])) -> (Vec<f32>, Vec<f32>) {
    let mut lse = Vec::new();
    // SAFETY: `f` writes every element of both (the caller's contract).
    let out = unsafe { fastmath::written(n, |o| lse = fastmath::written(nl, |l| f(o, l))) };
    (out, lse)
}

/// Checks the buffers of an `_into` attention: q, k, v hold B·T·W values, out B·T·W, lse B·H·T.
pub(super) fn check_into<T>(name: &str, q: &[T], k: &[T], v: &[T], s: &AttnShape, out: &[f32], lse: &[f32]) {
    assert!(q.len() >= s.numel() && k.len() >= s.numel() && v.len() >= s.numel(), "{name}: q, k, v must hold B·T·W values");
    assert!(out.len() == s.numel() && lse.len() == s.batch * s.heads * s.seq, "{name}: out must be B·T·W and lse B·H·T");
}

/// Starts loading the rows of (sequence, head) task `bh` of `xs` (q, k, v, …: T rows of hd
/// values at stride W, which the hardware prefetchers do not follow) into L2; tasks call it for
/// the next task, usually the same thread's next, while they compute (the packing of K and V
/// waited on these rows from L3: ≈ 10 % of a bf16 attention at T = 50, Zen 4).
pub(super) fn prefetch_head<T>(xs: &[&[T]], bh: usize, s: &AttnShape) {
    if bh >= s.batch * s.heads {
        return;
    }
    let (t, w, d) = (s.seq, s.width(), s.head_dim);
    let base = (bh / s.heads) * t * w + (bh % s.heads) * d; // (b, 0, h, 0)
    for x in xs {
        (0..t).for_each(|j| fastmath::prefetch_l2(&x[base + j * w..][..d]));
    }
}

/// An attention output or gradient [B, T, H·hd] shared by the (sequence, head) tasks: task (b, h) writes
/// only rows b·T.. b·T+T, columns h·hd.. h·hd+hd, so no two tasks touch the same element.
pub(super) type SharedOut = super::fastmath::SharedMut<f32>;

/// (Sequence, head) pairs in parallel — a single long sequence still fills every core — each:
/// Kᵀ copied into a [hd, T] tile and, per block of QBLK query rows, S = Q·Kᵀ (Q read in place),
/// the masked softmax over S's rows, and O = P·V (V read and O written in place) through
/// `attn_kernel`'s AVX-512 small GEMM and 16-lane softmax.
/// Panics unless AVX-512F (callers: [`attention`], tests).
#[cfg(target_arch = "x86_64")]
pub fn attention_avx512(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape) -> (Vec<f32>, Vec<f32>) {
    // SAFETY: `avx512_into` writes every element of both outputs.
    unsafe { with_outputs(s, |o, l| avx512_into(q, k, v, s, o, l)) }
}

#[cfg(target_arch = "x86_64")]
fn avx512_into(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape, out: &mut [f32], lse: &mut [f32]) {
    use super::attn_kernel::{gemm_rows, softmax_rows};
    assert!(super::gemm_f32::available(), "attention_avx512 needs AVX-512F");
    let (t, w, d) = (s.seq, s.width(), s.head_dim);
    check_into("attention", q, k, v, s, out, lse);
    if s.numel() == 0 {
        return;
    }
    let step = QBLK.min(t);
    let o = SharedOut::new(out);
    let scratch = || (vec![0f32; d * t], vec![0f32; step * t]); // Kᵀ [hd, T], scores of one query block [rows, keys]
    lse.par_chunks_mut(t).enumerate().for_each_init(scratch, |(kt, sc), (bh, lr)| {
        let (b, h) = (bh / s.heads, bh % s.heads);
        let base = b * t * w + h * d; // (b, 0, h, 0)
        prefetch_head(&[q, k, v], bh + 1, s);
        // SAFETY: AVX-512F (asserted).
        unsafe { transpose_head(k, b, h, s, kt) };
        for r0 in (0..t).step_by(step) {
            let r1 = (r0 + step).min(t);
            let nk = if s.causal { r1 } else { t };
            let sc = &mut sc[..(r1 - r0) * nk];
            // S = Q·Kᵀ. SAFETY: AVX-512F (asserted); Q rows r0..r1 of head h ([rows, hd] at
            // stride w), Kᵀ's first nk columns ([hd, nk] at stride t), sc [rows, nk]: all in bounds.
            unsafe { gemm_rows(r1 - r0, nk, d, q[base + r0 * w..].as_ptr(), w, kt.as_ptr(), t, sc.as_mut_ptr(), nk) };
            // SAFETY: AVX-512F; keys(i) ≤ nk = a row's length.
            unsafe { softmax_rows(sc, nk, s.scale, |j| s.keys(r0 + j), &mut lr[r0..r1]) };
            // SAFETY: P [rows, nk], V rows 0..nk of head h ([nk, hd] at stride w); O rows r0..r1
            // of head h of sequence b ([rows, hd] at stride w): inside out, and this task's own
            // elements (SharedOut).
            unsafe { gemm_rows(r1 - r0, d, nk, sc.as_ptr(), nk, v[base..].as_ptr(), w, o.at(base + r0 * w), w) };
            // O = P·V
        }
    });
}

/// The portable path: batches in parallel; per head, Q, K and V are gathered into contiguous
/// tiles and, per query block, the scores S = Q·Kᵀ and the mix O = P·V run as two small GEMMs
/// (faer), with the (masked) softmax applied to S in place in between.
pub fn attention_portable(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape) -> (Vec<f32>, Vec<f32>) {
    // SAFETY: `portable_into` writes every element of both outputs.
    unsafe { with_outputs(s, |o, l| portable_into(q, k, v, s, o, l)) }
}

fn portable_into(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape, out: &mut [f32], lse: &mut [f32]) {
    let (t, w, d) = (s.seq, s.width(), s.head_dim);
    check_into("attention", q, k, v, s, out, lse);
    if s.numel() == 0 {
        return;
    }
    out.par_chunks_mut(t * w).zip(lse.par_chunks_mut(s.heads * t)).enumerate().for_each(|(b, (ob, lb))| {
        let (mut qt, mut kt, mut vt) = (vec![0f32; t * d], vec![0f32; t * d], vec![0f32; t * d]); // [T, d] each
        let mut sc = vec![0f32; t * t]; // [rows of the block, keys]
        let mut o = vec![0f32; t * d]; // [T, d]
        for h in 0..s.heads {
            for (src, dst) in [(q, &mut qt), (k, &mut kt), (v, &mut vt)] {
                gather_head(src, b, h, s, dst);
            }
            for (r0, r1, nk) in query_blocks(s) {
                let sc = &mut sc[..(r1 - r0) * nk];
                gemm_seq(View::row_major(&qt[r0 * d..r1 * d], r1 - r0, d), View::row_major(&kt[..nk * d], nk, d).t(), sc); // S = Q·Kᵀ
                for (i, row) in (r0..r1).zip(sc.chunks_exact_mut(nk)) {
                    lb[h * t + i] = softmax_row_portable(row, s.keys(i), s.scale);
                }
                gemm_seq(View::row_major(sc, r1 - r0, nk), View::row_major(&vt[..nk * d], nk, d), &mut o[r0 * d..r1 * d]);
                // O = P·V
            }
            for i in 0..t {
                ob[i * w + h * d..][..d].copy_from_slice(&o[i * d..(i + 1) * d]);
            }
        }
    });
}

/// Copies head `h` of sequence `b` of x ([B, T, H·hd]) into the [T, hd] tile `dst`.
pub(super) fn gather_head(x: &[f32], b: usize, h: usize, s: &AttnShape, dst: &mut [f32]) {
    let (t, w, d) = (s.seq, s.width(), s.head_dim);
    for (j, r) in dst[..t * d].chunks_exact_mut(d.max(1)).enumerate() {
        let row = (b * t + j) * w + h * d;
        r.copy_from_slice(&x[row..row + d]);
    }
}

/// Head `h` of sequence `b` of x ([B, T, H·hd]) transposed into the [hd, T] tile `dst` (16×16
/// register transposes): Kᵀ and Vᵀ for the attention's small GEMM.
///
/// # Safety
/// AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn transpose_head(x: &[f32], b: usize, h: usize, s: &AttnShape, dst: &mut [f32]) {
    let (t, w, d) = (s.seq, s.width(), s.head_dim);
    let base = b * t * w + h * d; // (b, 0, h, 0)
    assert!(x.len() >= base + (t.max(1) - 1) * w + d && dst.len() >= d * t, "transpose_head: out of bounds");
    for j0 in (0..t).step_by(16) {
        let live = (t - j0).min(16);
        // SAFETY: rows j0..j0+live of the head ([live, hd] at stride w) are inside x (asserted);
        // dst[j0..] holds (hd − 1)·T + live values.
        unsafe { super::transpose::transpose_lines(x[base + j0 * w..].as_ptr(), w, live, d, &mut dst[j0..], t, live) };
    }
}

/// One score row in place: the first `keys` entries scaled, exponentiated and normalised, the
/// rest zeroed; returns the row's logsumexp (of the scaled scores). Scalar twin of
/// `attn_kernel::softmax_row`.
pub(super) fn softmax_row_portable(row: &mut [f32], keys: usize, scale: f32) -> f32 {
    let (row, dead) = row.split_at_mut(keys);
    dead.fill(0.0);
    let mut m = f32::NEG_INFINITY;
    for x in row.iter_mut() {
        *x *= scale;
        m = m.max(*x);
    }
    let mut z = 0f32;
    for x in row.iter_mut() {
        *x = fastmath::exp(*x - m);
        z += *x;
    }
    let inv = 1.0 / z;
    row.iter_mut().for_each(|x| *x *= inv);
    m + z.ln()
}

/// Packed sequences (no padding): q, k, v and o are [N, H·hd] holding sequences of `lens[i]`
/// tokens back to back (N = Σ lens); each row attends only to rows of its own sequence. lse is
/// each sequence's [H, len] block, back to back. [`attention_into`] per sequence, sequences in
/// parallel, each writing its own rows of o and block of lse.
pub fn attention_packed(q: &[f32], k: &[f32], v: &[f32], lens: &[usize], heads: usize, causal: bool) -> (Vec<f32>, Vec<f32>) {
    // SAFETY: `attention_into` writes every element of its outputs.
    unsafe { per_sequence_into(lens, heads, causal, q.len(), |x, s, o, l| attention_into(&q[x.clone()], &k[x.clone()], &v[x], s, o, l)) }
}

/// [`attention_reference`] per packed sequence (f64).
pub fn attention_packed_reference(q: &[f32], k: &[f32], v: &[f32], lens: &[usize], heads: usize, causal: bool) -> (Vec<f32>, Vec<f32>) {
    // SAFETY: `fill` writes both parts in full.
    unsafe { per_sequence_into(lens, heads, causal, q.len(), |x, s, o, l| fill(o, l, attention_reference(&q[x.clone()], &k[x.clone()], &v[x], s))) }
}

/// Runs `f(rows, lse range, shape)` for every packed sequence, in parallel, results in order.
/// `numel` = N·W fixes the width W = numel / Σ lens.
pub(super) fn per_sequence<R: Send>(
    lens: &[usize],
    heads: usize,
    causal: bool,
    numel: usize,
    f: impl Fn(std::ops::Range<usize>, std::ops::Range<usize>, &AttnShape) -> R + Sync,
) -> Vec<R> {
    let jobs: Vec<_> = sequences(lens, heads, causal, numel).collect();
    jobs.into_par_iter().map(|(x, l, s)| f(x, l, &s)).collect()
}

/// Each packed sequence's elements of q ([N, W]), its lse range ([N·H]) and its shape.
fn sequences(
    lens: &[usize],
    heads: usize,
    causal: bool,
    numel: usize,
) -> impl Iterator<Item = (std::ops::Range<usize>, std::ops::Range<usize>, AttnShape)> + '_ {
    let n: usize = lens.iter().sum();
    let w = numel / n.max(1);
    let d = w / heads.max(1);
    lens.iter().scan(0, move |off, &len| {
        let s = AttnShape { batch: 1, seq: len, heads, head_dim: d, causal, scale: 1.0 / (d as f32).sqrt() };
        let r = (*off * w..(*off + len) * w, *off * heads..(*off + len) * heads, s);
        *off += len;
        Some(r)
    })
}

/// [`per_sequence`] for a forward: o ([N, W], `numel` values) and lse ([N·H]) made here, and
/// `f(rows, shape, o, lse)` given each sequence's own part of both to fill.
///
/// # Safety
/// `f` writes every element of both parts and reads none before writing it.
pub(super) unsafe fn per_sequence_into(
    lens: &[usize],
    heads: usize,
    causal: bool,
    numel: usize,
    f: impl Fn(std::ops::Range<usize>, &AttnShape, &mut [f32], &mut [f32]) + Sync,
) -> (Vec<f32>, Vec<f32>) {
    let n: usize = lens.iter().sum();
    // SAFETY: the parts cover both buffers, and `f` fills each (the caller's contract).
    unsafe {
        outputs(numel, n * heads, |o, l| {
            // [N, W] and [N·H], split into the sequences' parts
            let seqs: Vec<_> = sequences(lens, heads, causal, numel).collect();
            let os = split(o, seqs.iter().map(|(x, ..)| x.len()));
            let ls = split(l, seqs.iter().map(|(_, l, _)| l.len()));
            seqs.into_par_iter().zip(os).zip(ls).for_each(|(((x, _, s), o), l)| f(x, &s, o, l));
        })
    }
}

/// [`per_sequence`] for a backward: the three gradients `g` ([N, W] each) cut into each
/// sequence's rows, and `f(rows, lse range, shape, parts)` run per sequence in parallel on its own
/// parts.
pub(super) fn per_sequence_parts(
    lens: &[usize],
    heads: usize,
    causal: bool,
    g: [&mut [f32]; 3],
    f: impl Fn(std::ops::Range<usize>, std::ops::Range<usize>, &AttnShape, [&mut [f32]; 3]) + Sync,
) {
    let seqs: Vec<_> = sequences(lens, heads, causal, g[0].len()).collect();
    let [a, b, c] = g.map(|x| split(x, seqs.iter().map(|(x, ..)| x.len())));
    let parts = a.into_iter().zip(b).zip(c).map(|((a, b), c)| [a, b, c]);
    seqs.into_par_iter().zip(parts.collect::<Vec<_>>()).for_each(|((x, l, s), p)| f(x, l, &s, p));
}

/// The parts back to back in one buffer, copied in parallel.
pub(super) fn concat(parts: &[Vec<f32>]) -> Vec<f32> {
    let n = parts.iter().map(Vec::len).sum();
    // SAFETY: the parts' lengths sum to n: the copies write every value, and read none.
    unsafe { fastmath::written(n, |o| split(o, parts.iter().map(Vec::len)).into_par_iter().zip(parts).for_each(|(d, p)| d.copy_from_slice(p))) }
}

/// `buf` cut into consecutive parts of the given lengths (their sum at most buf.len()).
fn split(mut buf: &mut [f32], lens: impl Iterator<Item = usize>) -> Vec<&mut [f32]> {
    lens.map(|n| {
        let (part, rest) = std::mem::take(&mut buf).split_at_mut(n);
        buf = rest;
        part
    })
    .collect()
}

/// Copies an (o, lse) pair made by a whole-output attention into the parts `per_sequence_into` gives.
pub(super) fn fill(o: &mut [f32], l: &mut [f32], (a, b): (Vec<f32>, Vec<f32>)) {
    o.copy_from_slice(&a);
    l.copy_from_slice(&b);
}
