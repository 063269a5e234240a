//! The attention backward (of `attention.rs`'s forward): given dO, the saved output O and the row
//! logsumexp, recompute P = exp(S·scale − lse) (masked entries 0), then
//!   dV = Pᵀ·dO,  dP = dO·Vᵀ,  D_i = Σ_e dO_ie·O_ie (= Σ_j P_ij·dP_ij),
//!   dS = P ∘ (dP − D),  dQ = scale·dS·K,  dK = scale·dSᵀ·Q.
//! Same layouts as the forward: q, k, v, o, dO and the gradients [B, T, H·hd], lse [B, H, T].
//!
//! - [`attention_backward_reference`]: naive loops in f64 (the ground truth; tests/attention_grad.rs
//!   checks it against central finite differences).
//! - [`attention_backward_avx512`]: (sequence, head) pairs in parallel, the five products on
//!   `attn_kernel`'s AVX-512 small GEMM (the transposed Pᵀ and dSᵀ read in place), P and dS 16
//!   lanes at a time.
//! - [`attention_backward_portable`]: batches in parallel, faer small GEMMs (CPUs without
//!   AVX-512F and `CLIPFORGE_CPU_GEMM=scalar`).
//! - [`attention_backward`] picks one; [`attention_packed_backward`] runs it per packed sequence.
use super::attention::{concat, gather_head, per_sequence, query_blocks, AttnShape};
#[cfg(target_arch = "x86_64")]
use super::attention::{SharedOut, QBLK};
use super::fastmath;
use super::matmul::{gemm_seq, gemm_seq_into, View};
use rayon::prelude::*;

/// Naive backward in f64: loops over (b, h, i, j), P recomputed from `lse`, D from `o`.
/// Returns (dq, dk, dv) in the layout of q, k, v.
pub fn attention_backward_reference(q: &[f32], k: &[f32], v: &[f32], o: &[f32], lse: &[f32], dout: &[f32], s: &AttnShape) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (t, w, d) = (s.seq, s.width(), s.head_dim);
    let scale = s.scale as f64;
    let (mut dq, mut dk, mut dv) = (vec![0f64; s.numel()], vec![0f64; s.numel()], vec![0f64; s.numel()]);
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum::<f64>();
    for b in 0..s.batch {
        for h in 0..s.heads {
            let row = |j: usize| (b * t + j) * w + h * d;
            for i in 0..t {
                let (qi, doi) = (&q[row(i)..][..d], &dout[row(i)..][..d]);
                let di = dot(doi, &o[row(i)..][..d]);
                let li = lse[(b * s.heads + h) * t + i] as f64;
                for j in 0..s.keys(i) {
                    let (kj, vj) = (&k[row(j)..][..d], &v[row(j)..][..d]);
                    let p = (dot(qi, kj) * scale - li).exp();
                    let ds = p * (dot(doi, vj) - di) * scale;
                    for e in 0..d {
                        dv[row(j) + e] += p * doi[e] as f64;
                        dq[row(i) + e] += ds * kj[e] as f64;
                        dk[row(j) + e] += ds * qi[e] as f64;
                    }
                }
            }
        }
    }
    let f = |x: Vec<f64>| x.into_iter().map(|v| v as f32).collect::<Vec<f32>>();
    (f(dq), f(dk), f(dv))
}

/// The fast path: on AVX-512 CPUs [`attention_backward_avx512`], else
/// [`attention_backward_portable`]. Returns (dq, dk, dv) in the layout of q, k, v.
pub fn attention_backward(q: &[f32], k: &[f32], v: &[f32], o: &[f32], lse: &[f32], dout: &[f32], s: &AttnShape) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu_path::selected() >= super::cpu_path::GemmPath::Avx512 {
        return attention_backward_avx512(q, k, v, o, lse, dout, s);
    }
    attention_backward_portable(q, k, v, o, lse, dout, s)
}

/// One task's scratch: Kᵀ and Vᵀ ([hd, T] tiles); K, Q and dO ([T, hd] tiles: read in place at
/// the layout's row stride H·hd, often a power of two, their rows would crowd a few L1 sets);
/// the full [T, T] P and dS of one head; D. One per thread, reused by later calls (every value
/// a task reads it wrote first, so nothing is cleared between tasks).
#[cfg(target_arch = "x86_64")]
#[derive(Default)]
struct Scratch {
    kt: Vec<f32>,
    vt: Vec<f32>,
    kc: Vec<f32>,
    qc: Vec<f32>,
    doc: Vec<f32>,
    p: Vec<f32>,
    ds: Vec<f32>,
    dd: Vec<f32>,
}

#[cfg(target_arch = "x86_64")]
impl Scratch {
    /// Makes every buffer big enough for sequences of `t` tokens and head dim `d` (growing only:
    /// the text tower alternates long and short captions).
    fn fit(&mut self, t: usize, d: usize) {
        let (dt, tt) = (d * t, t * t);
        for (x, n) in [
            (&mut self.kt, dt),
            (&mut self.vt, dt),
            (&mut self.kc, dt),
            (&mut self.qc, dt),
            (&mut self.doc, dt),
            (&mut self.p, tt),
            (&mut self.ds, tt),
            (&mut self.dd, t),
        ] {
            if x.len() < n {
                x.resize(n, 0.0);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// (Sequence, head) pairs in parallel — a single long sequence still fills every core — each:
/// 1. Kᵀ and Vᵀ copied into [hd, T] tiles (16×16 register transposes), K, Q and dO into [T, hd]
///    tiles, D = rowsum(dO∘O);
/// 2. per block of QBLK query rows, S = Q·Kᵀ and dP = dO·Vᵀ into the block's rows of P and dS,
///    then P = exp(S·scale − lse), dS = P∘(dP − D)·scale, and dQ = dS·K (written in place);
///    causal blocks stop at the keys they see;
/// 3. per block of QBLK keys, dV = Pᵀ·dO and dK = dSᵀ·Q over the queries that see those keys,
///    Pᵀ and dSᵀ read through transposed strides, dV and dK written in place.
///
/// Every product goes through `attn_kernel::gemm_rows_at`; sums run in a fixed order (bitwise
/// reproducible for any thread count). Panics unless AVX-512F (callers: [`attention_backward`],
/// tests, benches).
#[cfg(target_arch = "x86_64")]
pub fn attention_backward_avx512(q: &[f32], k: &[f32], v: &[f32], o: &[f32], lse: &[f32], dout: &[f32], s: &AttnShape) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert!(super::gemm_f32::available(), "attention_backward_avx512 needs AVX-512F");
    let (t, n) = (s.seq, s.numel());
    assert!(
        [q, k, v, o, dout].iter().all(|x| x.len() >= n) && lse.len() >= s.batch * s.heads * t,
        "attention backward: q, k, v, o, dO must hold B·T·W values, lse B·H·T"
    );
    let (mut dq, mut dk, mut dv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]); // [B, T, W] each
    if n == 0 {
        return (dq, dk, dv);
    }
    let g = [SharedOut::new(&mut dq), SharedOut::new(&mut dk), SharedOut::new(&mut dv)];
    (0..s.batch * s.heads).into_par_iter().for_each(|bh| {
        SCRATCH.with_borrow_mut(|sc| {
            sc.fit(t, s.head_dim);
            // SAFETY: AVX-512F (asserted); the inputs hold B·T·W values and lse B·H·T (asserted);
            // task bh writes only its own head's elements of the outputs (SharedOut).
            unsafe { head_backward([q, k, v, o, dout], &lse[bh * t..][..t], g, s, bh, sc) }
        })
    });
    (dq, dk, dv)
}

/// The backward of one (sequence, head) pair `bh` (steps 1–3 of [`attention_backward_avx512`]):
/// `x` = [q, k, v, o, dO], `lr` the pair's T logsumexps, `g` = [dq, dk, dv].
///
/// # Safety
/// AVX-512F; every `x` holds B·T·W values; `g` point at B·T·W-value outputs of which this call
/// alone writes head h of sequence b.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn head_backward(x: [&[f32]; 5], lr: &[f32], g: [SharedOut; 3], s: &AttnShape, bh: usize, sc: &mut Scratch) {
    use super::attention::transpose_head;
    use super::attn_kernel::{dot, gemm_rows, gemm_rows_at, grad_row};
    let [q, k, v, o, dout] = x;
    let [gq, gk, gv] = g;
    let (t, w, d) = (s.seq, s.width(), s.head_dim);
    let step = QBLK.min(t);
    let (b, h) = (bh / s.heads, bh % s.heads);
    let base = b * t * w + h * d; // (b, 0, h, 0)
    super::attention::prefetch_head(&x, bh + 1, s);
    transpose_head(k, b, h, s, &mut sc.kt);
    transpose_head(v, b, h, s, &mut sc.vt);
    for (src, dst) in [(k, &mut sc.kc), (q, &mut sc.qc), (dout, &mut sc.doc)] {
        gather_head(src, b, h, s, dst);
    }
    for (i, di) in sc.dd[..t].iter_mut().enumerate() {
        let r = base + i * w;
        *di = dot(&dout[r..r + d], &o[r..r + d]); // D_i = Σ_e dO_ie·O_ie
    }
    for r0 in (0..t).step_by(step) {
        let (r1, rows) = ((r0 + step).min(t), (r0 + step).min(t) - r0);
        let nk = if s.causal { r1 } else { t };
        let (p, ds) = (sc.p[r0 * t..].as_mut_ptr(), sc.ds[r0 * t..].as_mut_ptr());
        // S = Q·Kᵀ and dP = dO·Vᵀ. SAFETY: Q and dO rows r0..r1 ([rows, hd] tiles), Kᵀ's and
        // Vᵀ's first nk columns ([hd, nk] at stride T), P and dS rows r0..r1 ([rows, nk] at
        // stride T): all in bounds.
        unsafe {
            gemm_rows(rows, nk, d, sc.qc[r0 * d..].as_ptr(), d, sc.kt.as_ptr(), t, p, t);
            gemm_rows(rows, nk, d, sc.doc[r0 * d..].as_ptr(), d, sc.vt.as_ptr(), t, ds, t);
        }
        for (i, (&li, &di)) in lr.iter().zip(&sc.dd).enumerate().take(r1).skip(r0) {
            let (pr, dr) = (&mut sc.p[i * t..i * t + nk], &mut sc.ds[i * t..i * t + nk]);
            grad_row(pr, dr, s.keys(i), s.scale, li, di); // keys(i) ≤ nk
        }
        // dQ = dS·K. SAFETY: dS rows r0..r1 ([rows, nk] at stride T), K rows 0..nk ([nk, hd]
        // tile); dQ rows r0..r1 of head h ([rows, hd] at stride w): this call's own elements.
        unsafe { gemm_rows(rows, d, nk, sc.ds[r0 * t..].as_ptr(), t, sc.kc.as_ptr(), d, gq.at(base + r0 * w), w) };
    }
    for j0 in (0..t).step_by(step) {
        let keys = (j0 + step).min(t) - j0;
        let i0 = if s.causal { j0 } else { 0 }; // the first query that sees key j0
        let at = (1, t); // Pᵀ and dSᵀ: element (key j, query i) at [i·T + j]
                         // dV = Pᵀ·dO and dK = dSᵀ·Q. SAFETY: Pᵀ and dSᵀ rows j0..j0+keys, columns i0..T, i.e.
                         // P and dS rows i0..T, columns j0..j0+keys: every entry written above (a causal query
                         // block r0 ≥ j0 computed keys up to its r1 ≥ j0 + keys); dO and Q rows i0..T ([T − i0,
                         // hd] tiles); dV and dK rows j0..j0+keys of head h: this call's own elements.
        unsafe {
            gemm_rows_at(keys, d, t - i0, sc.p[i0 * t + j0..].as_ptr(), at, sc.doc[i0 * d..].as_ptr(), d, gv.at(base + j0 * w), w);
            gemm_rows_at(keys, d, t - i0, sc.ds[i0 * t + j0..].as_ptr(), at, sc.qc[i0 * d..].as_ptr(), d, gk.at(base + j0 * w), w);
        }
    }
}

/// The portable backward: batches in parallel; per head and query block five small GEMMs (S =
/// Q·Kᵀ, dP = dO·Vᵀ, dV += Pᵀ·dO, dQ = dS·K, dK += dSᵀ·Q; faer) on gathered [T, hd] tiles, with P
/// and dS formed in place; causal blocks touch only the keys they see.
pub fn attention_backward_portable(q: &[f32], k: &[f32], v: &[f32], o: &[f32], lse: &[f32], dout: &[f32], s: &AttnShape) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (t, w, d) = (s.seq, s.width(), s.head_dim);
    let (mut dq, mut dk, mut dv) = (vec![0f32; s.numel()], vec![0f32; s.numel()], vec![0f32; s.numel()]);
    if s.numel() == 0 {
        return (dq, dk, dv);
    }
    let chunks = dq.par_chunks_mut(t * w).zip(dk.par_chunks_mut(t * w)).zip(dv.par_chunks_mut(t * w));
    chunks.enumerate().for_each(|(b, ((dqb, dkb), dvb))| {
        let tile = || vec![0f32; t * d];
        let (mut qt, mut kt, mut vt, mut dot) = (tile(), tile(), tile(), tile()); // [T, d]
        let (mut gq, mut gk, mut gv) = (tile(), tile(), tile()); // [T, d]
        let (mut p, mut dp) = (vec![0f32; t * t], vec![0f32; t * t]); // [rows of the block, keys]
        let mut drow = vec![0f32; t];
        for h in 0..s.heads {
            for (src, dst) in [(q, &mut qt), (k, &mut kt), (v, &mut vt), (dout, &mut dot)] {
                gather_head(src, b, h, s, dst);
            }
            for (j, dj) in drow.iter_mut().enumerate() {
                let row = (b * t + j) * w + h * d;
                *dj = dout[row..row + d].iter().zip(&o[row..row + d]).map(|(x, y)| x * y).sum();
            }
            gk.fill(0.0);
            gv.fill(0.0);
            for (r0, r1, nk) in query_blocks(s) {
                let bm = r1 - r0;
                let (p, dp) = (&mut p[..bm * nk], &mut dp[..bm * nk]);
                let (qb, db) = (View::row_major(&qt[r0 * d..r1 * d], bm, d), View::row_major(&dot[r0 * d..r1 * d], bm, d));
                gemm_seq(qb, View::row_major(&kt[..nk * d], nk, d).t(), p); // S = Q·Kᵀ
                gemm_seq(db, View::row_major(&vt[..nk * d], nk, d).t(), dp); // dP = dO·Vᵀ
                for (i, (pr, dpr)) in (r0..r1).zip(p.chunks_exact_mut(nk).zip(dp.chunks_exact_mut(nk))) {
                    let li = lse[(b * s.heads + h) * t + i];
                    let keys = s.keys(i);
                    for j in 0..keys {
                        pr[j] = fastmath::exp(pr[j] * s.scale - li);
                        dpr[j] = pr[j] * (dpr[j] - drow[i]) * s.scale; // dS, scale folded in
                    }
                    pr[keys..].fill(0.0);
                    dpr[keys..].fill(0.0);
                }
                gemm_seq_into(View::row_major(p, bm, nk).t(), db, &mut gv[..nk * d], true); // dV += Pᵀ·dO
                gemm_seq(View::row_major(dp, bm, nk), View::row_major(&kt[..nk * d], nk, d), &mut gq[r0 * d..r1 * d]); // dQ = dS·K
                gemm_seq_into(View::row_major(dp, bm, nk).t(), qb, &mut gk[..nk * d], true);
                // dK += dSᵀ·Q
            }
            scatter(dvb, &gv, h, s);
            scatter(dqb, &gq, h, s);
            scatter(dkb, &gk, h, s);
        }
    });
    (dq, dk, dv)
}

/// Writes the [T, hd] tile `g` into head `h` of one batch's [T, H·hd] rows.
fn scatter(dst: &mut [f32], g: &[f32], h: usize, s: &AttnShape) {
    let (w, d) = (s.width(), s.head_dim);
    for (j, gr) in g.chunks_exact(d).enumerate() {
        dst[j * w + h * d..][..d].copy_from_slice(gr);
    }
}

/// The backward of [`attention_packed`]: [`attention_backward`] per sequence → (dq, dk, dv).
///
/// [`attention_packed`]: super::attention::attention_packed
#[allow(clippy::too_many_arguments)]
pub fn attention_packed_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    dout: &[f32],
    lens: &[usize],
    heads: usize,
    causal: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let parts = per_sequence(lens, heads, causal, q.len(), |x, l, s| {
        attention_backward(&q[x.clone()], &k[x.clone()], &v[x.clone()], &o[x.clone()], &lse[l], &dout[x], s)
    });
    let mut g: [Vec<Vec<f32>>; 3] = Default::default(); // each sequence's dq, dk, dv
    for (a, b, c) in parts {
        g[0].push(a);
        g[1].push(b);
        g[2].push(c);
    }
    let [dq, dk, dv] = g.map(|p| concat(&p));
    (dq, dk, dv)
}
