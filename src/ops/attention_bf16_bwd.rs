//! Attention's backward with bf16 products on the CPU (the backward of `attention_bf16.rs`'s
//! forward): the five products of `attention_bwd.rs` through the bf16 GEMM, P and dS in f32
//! between them. Same layouts: q, k, v, o, dO and the gradients [B, T, H·hd], lse [B, H, T]; q, k
//! and v in bf16 (as a bf16 model's `qkv` leaves them) or f32 (rounded while packing).
//!
//! Rounding: q, k, v and dO to bf16; S = Q·Kᵀ and dP = dO·Vᵀ accumulated in f32 (exact
//! products); P = exp(S·scale − lse) and dS = P∘(dP − D)·scale in f32, D = Σ dO∘O in f32 from the
//! rounded dO (the dO of dP: then Σ_j P_ij·dS_ij stays ≈ 0, where an unrounded one would shift
//! every dS of a row by P·(dO − dO₁₆)·O, the same sign across the row); P and dS rounded to bf16 as the left operands of dV = Pᵀ·dO, dQ = dS·K and
//! dK = dSᵀ·Q, accumulated in f32. [`attention_backward_bf16_reference`] is the same computation
//! in f64 with P and dS rounded from their f64 values.
//!
//! Per (sequence, head) pair (in parallel), with `qblk` query rows per block (the forward's):
//! 1. K and V packed as the weights [T keys × hd] (of S and dP), and Kᵀ, Qᵀ and dOᵀ as the
//!    weights [hd × T] (of dQ, dK and dV); Q's and dO's rows gathered; D.
//! 2. Per query block: S and dP over the keys the block sees, P and dS (`grad_row`), dQ = dS·K
//!    for the block's rows; then P and dS transposed (16×16 in registers) and rounded to bf16
//!    into per-key-block buffers Pᵀ, dSᵀ: key block b (the same `qblk` rows) holds its keys ×
//!    the queries that see them (causal: from the block's first key on, else all), contiguous,
//!    so each is an A operand as it is.
//! 3. Per key block: dV = Pᵀ·dO and dK = dSᵀ·Q over those queries: the weights' trailing pairs
//!    (`WView::suffix`; causal blocks start at an even query, so pairs stay whole), on the
//!    packed dOᵀ and Qᵀ, which hold a spare panel so the view stays in bounds.
//!
//! On `vdpbf16ps` with bf16 inputs (a bf16 model's attention on AMD), steps 2–3 run fused per
//! 14-row panel instead (`attention_bf16_bwd_fused.rs`: no gathered rows, no transposes, the
//! gradients stored in place), with the same bits.
//!
//! Causal blocks compute only the keys (steps 2) or queries (step 3) they see. Sums run in a
//! fixed order (bitwise reproducible for any thread count). The CPU backend takes this path
//! where it takes the bf16 forward (its q, k, v are then bf16).
use super::attention::{per_sequence_parts, AttnShape, SharedOut};
use super::attention_bf16::{head_row, pack_k, pack_vt, qblk};
#[cfg(target_arch = "x86_64")]
use super::attention_bf16_bwd_fused as fused;
use super::cpu_path::{self, GemmPath};
use super::fastmath;
#[cfg(target_arch = "x86_64")]
use super::gemm_bf16::Row;
use super::gemm_bf16::{converts_in_simd, matmul_bf16_seq, resolve, AElem, Kernel, WView, NR};
use super::gemm_bf16_pack::geometry;
use half::bf16;
use rayon::prelude::*;

/// (dq, dk, dv), each in the layout of q.
pub type Grads = (Vec<f32>, Vec<f32>, Vec<f32>);

/// The backward (see the module docs); `kernel` is the bf16 GEMM's kernel ([`Kernel::Auto`]: the
/// path `cpu_path` selects; the others for tests). Returns (dq, dk, dv) in the layout of q.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_bf16<T: AElem>(q: &[T], k: &[T], v: &[T], o: &[f32], lse: &[f32], dout: &[f32], s: &AttnShape, kernel: Kernel) -> Grads {
    // SAFETY: `bwd_into` writes every element of the three (each head's rows 0..T of each).
    unsafe { grads(s.numel(), |g| bwd_into([q, k, v], o, lse, dout, s, kernel, g)) }
    // [B, T, W] each
}

/// Three gradients of `n` values that `fill` writes (no zero-fill first).
///
/// # Safety
/// `fill` writes every element of the three and reads none before writing it.
unsafe fn grads(n: usize, fill: impl FnOnce([&mut [f32]; 3])) -> Grads {
    let (mut dk, mut dv) = (Vec::new(), Vec::new());
    // SAFETY: the caller's contract, for each buffer.
    let dq = unsafe { fastmath::written(n, |q| dk = fastmath::written(n, |k| dv = fastmath::written(n, |v| fill([q, k, v])))) };
    (dq, dk, dv)
}

/// Packed sequences (see `attention::attention_packed`): [`attention_backward_bf16`] per
/// sequence, each writing its own rows of the three gradients.
#[allow(clippy::too_many_arguments)]
pub fn attention_packed_backward_bf16<T: AElem>(
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[f32],
    lse: &[f32],
    dout: &[f32],
    lens: &[usize],
    heads: usize,
    causal: bool,
    kernel: Kernel,
) -> Grads {
    let (n, rows) = (q.len(), lens.iter().sum::<usize>());
    assert!(
        heads > 0 && (rows == 0 || (n.is_multiple_of(rows) && (n / rows).is_multiple_of(heads))) && (rows > 0 || n == 0),
        "attention_packed_backward_bf16: q must be [N, W] for the sequences' N rows, W a multiple of heads"
    );
    // SAFETY: the sequences' parts cover the N·W values (asserted), and `bwd_into` writes every
    // element of its parts (each head's rows of each sequence).
    unsafe {
        grads(n, |g| {
            per_sequence_parts(lens, heads, causal, g, |x, l, s, g| {
                bwd_into([&q[x.clone()], &k[x.clone()], &v[x.clone()]], &o[x.clone()], &lse[l], &dout[x], s, kernel, g)
            })
        })
    } // [N, W] each
}

/// One key block of step 3: keys `j0..j0 + keys`, seen by queries `i0..T` (`depth` of them);
/// its Pᵀ and dSᵀ are `[keys, depth]` at `off` in the transposed buffers.
#[derive(Clone, Copy, Debug)]
struct KeyBlock {
    j0: usize,
    keys: usize,
    i0: usize,
    depth: usize,
    off: usize,
}

/// The key blocks of a sequence (blocks of `step` keys, aligned with the query blocks) and the
/// length of the transposed buffers they fill.
fn key_blocks(s: &AttnShape, step: usize) -> (Vec<KeyBlock>, usize) {
    let t = s.seq;
    let mut off = 0;
    let blocks = (0..t)
        .step_by(step)
        .map(|j0| {
            let (keys, i0) = (step.min(t - j0), if s.causal { j0 } else { 0 });
            let b = KeyBlock { j0, keys, i0, depth: t - i0, off };
            off += keys * (t - i0);
            b
        })
        .collect();
    (blocks, off)
}

/// [`attention_backward_bf16`] into `g` = [dq, dk, dv] ([B, T, W] each, every element written).
#[allow(clippy::too_many_arguments)]
fn bwd_into<T: AElem>(x: [&[T]; 3], o: &[f32], lse: &[f32], dout: &[f32], s: &AttnShape, kernel: Kernel, g: [&mut [f32]; 3]) {
    let (t, n) = (s.seq, s.numel());
    assert!(
        x.iter().all(|x| x.len() >= n) && o.len() >= n && dout.len() >= n && lse.len() >= s.batch * s.heads * t && g.iter().all(|g| g.len() >= n),
        "attention_backward_bf16: q, k, v, o, dO and the gradients must hold B·T·W values, lse B·H·T"
    );
    if n == 0 {
        return;
    }
    let step = qblk(kernel).min(t);
    let simd = cfg!(target_arch = "x86_64") && cpu_path::selected() >= GemmPath::Avx512;
    let cvt = converts_in_simd(resolve(kernel)); // packing's f32 → bf16 as the kernel's own
    let (blocks, tlen) = key_blocks(s, step);
    let g = g.map(SharedOut::new);
    let ctx = Ctx { s, step, simd, cvt, kernel, blocks: &blocks };
    #[cfg(target_arch = "x86_64")]
    let fused = super::attention_bf16_fused::applies::<T>(kernel, t, s.head_dim);
    #[cfg(not(target_arch = "x86_64"))]
    let fused = false;
    let scratch = || Scratch::new(s, step, tlen, fused);
    (0..s.batch * s.heads).into_par_iter().for_each_init(scratch, |sc, bh| {
        // SAFETY: task bh writes only head h of sequence b of the gradients (SharedOut).
        unsafe { head(&ctx, x, o, dout, &lse[bh * t..][..t], &g, bh, sc) }
    });
}

/// What every (sequence, head) task of one call shares.
struct Ctx<'a> {
    s: &'a AttnShape,
    step: usize,
    /// The selected path allows AVX-512F.
    simd: bool,
    /// Packing converts f32 → bf16 with `vcvtne2ps2bf16`.
    cvt: bool,
    kernel: Kernel,
    blocks: &'a [KeyBlock],
}

/// One task's buffers, reused across the (sequence, head) pairs it runs. The packed weights start
/// zeroed and every pair writes the same positions (same T), so their padding stays zero.
struct Scratch<T> {
    /// K and V as the weights [T, hd].
    pk: Vec<u32>,
    pv: Vec<u32>,
    /// Kᵀ, Qᵀ and dOᵀ as the weights [hd, T] (Qᵀ and dOᵀ with a spare panel: `WView::suffix`).
    pkt: Vec<u32>,
    pq: Vec<u32>,
    pdo: Vec<u32>,
    /// One K panel's rows as pairs (`pack_k`).
    tmp: Vec<u32>,
    /// Q's rows of the head [T, hd], and dO's rounded to bf16.
    qh: Vec<T>,
    doh: Vec<f32>,
    /// D per query.
    dd: Vec<f32>,
    /// S then P, and dP then dS, of one query block [rows, keys].
    p: Vec<f32>,
    ds: Vec<f32>,
    /// Pᵀ and dSᵀ per key block (`KeyBlock::off`).
    pt: Vec<bf16>,
    dst: Vec<bf16>,
    /// One block's product [rows, hd] before it is copied out.
    out: Vec<f32>,
    /// The fused path's buffers, where it runs (`attention_bf16_bwd_fused.rs`).
    #[cfg(target_arch = "x86_64")]
    fused: Option<fused::FusedBwd>,
}

impl<T: AElem> Scratch<T> {
    fn new(s: &AttnShape, step: usize, tlen: usize, fused: bool) -> Self {
        let (t, d) = (s.seq, s.head_dim);
        // the composed path's query-block rows and transposed-block length (its buffers)
        let (composed, tlen) = if fused { (0, 0) } else { (step, tlen) };
        let (kt, vt) = (geometry(t, d).2, geometry(d, t));
        let spare = vt.1 * NR; // one panel of pairs: the largest suffix offset
        Scratch {
            pk: vec![0; kt],
            pv: vec![0; kt],
            pkt: vec![0; vt.2],
            pq: vec![0; vt.2 + spare],
            pdo: vec![0; vt.2 + spare],
            tmp: Vec::new(),
            qh: Vec::with_capacity(if fused { 0 } else { t * d }),
            doh: Vec::with_capacity(t * d),
            dd: vec![0.0; t],
            p: vec![0.0; composed * t],
            ds: vec![0.0; composed * t],
            pt: vec![bf16::ZERO; tlen],
            dst: vec![bf16::ZERO; tlen],
            out: vec![0.0; composed * d],
            #[cfg(target_arch = "x86_64")]
            fused: fused.then(|| fused::FusedBwd::new(t)),
        }
    }
}

/// The backward of one (sequence, head) pair `bh` (steps 1–3 of the module docs); `lr` its T
/// logsumexps, `g` = [dq, dk, dv].
///
/// # Safety
/// Every input holds B·T·W values; `g` point at B·T·W-value outputs of which this call alone
/// writes head h of sequence b.
#[allow(clippy::too_many_arguments)]
unsafe fn head<T: AElem>(c: &Ctx, [q, k, v]: [&[T]; 3], o: &[f32], dout: &[f32], lr: &[f32], g: &[SharedOut; 3], bh: usize, sc: &mut Scratch<T>) {
    let s = c.s;
    let (t, w, d) = (s.seq, s.width(), s.head_dim);
    let (b, h) = (bh / s.heads, bh % s.heads);
    let base = b * t * w + h * d; // (b, 0, h, 0)
    let (kps_k, kps_t) = (geometry(t, d).1, geometry(d, t).1); // pairs per panel
    super::attention::prefetch_head(&[q, k, v], bh + 1, s);
    super::attention::prefetch_head(&[o, dout], bh + 1, s);
    pack_k(&mut sc.pk, &mut sc.tmp, kps_k, t, d, c.cvt, c.simd, (k, base, w));
    pack_k(&mut sc.pv, &mut sc.tmp, kps_k, t, d, c.cvt, c.simd, (v, base, w));
    pack_vt(&mut sc.pkt, kps_t, t, d, c.cvt, |j| head_row(k, base, w, d, j));
    sc.doh.clear();
    for j in 0..t {
        sc.doh.extend_from_slice(head_row(dout, base, w, d, j));
    }
    pack_vt(&mut sc.pq, kps_t, t, d, c.cvt, |j| head_row(q, base, w, d, j));
    super::bf16_simd::round_bf16_in_place(&mut sc.doh); // dO as the products take it
    pack_vt(&mut sc.pdo, kps_t, t, d, c.cvt, |j| &sc.doh[j * d..][..d]); // from the rounded rows: the same bits
    for (i, (di, doi)) in sc.dd.iter_mut().zip(sc.doh.chunks_exact(d)).enumerate() {
        *di = dot(doi, head_row(o, base, w, d, i), c.simd); // D_i = Σ_e dO_ie·O_ie
    }
    #[cfg(target_arch = "x86_64")]
    if let (Some(f), Row::Bf16(qb)) = (sc.fused.as_mut(), T::row(q)) {
        let (pk, pv, pkt, pq, pdo) = ((kps_k, &sc.pk[..]), (kps_k, &sc.pv[..]), (kps_t, &sc.pkt[..]), (kps_t, &sc.pq[..]), (kps_t, &sc.pdo[..]));
        let packed = fused::Packed { k: pk, v: pv, kt: pkt, qt: pq, dot: pdo, doh: &sc.doh, dd: &sc.dd };
        // SAFETY: `fused` is Some only where `attention_bf16_fused::applies` (bwd_into); this
        // task's rows and columns of g (the caller's contract).
        unsafe { fused::head(qb, base, s, &packed, lr, f, g) };
        return;
    }
    sc.qh.clear();
    for j in 0..t {
        sc.qh.extend_from_slice(head_row(q, base, w, d, j));
    }
    let (wk, wv) = (WView::from_parts(t, d, kps_k, &sc.pk), WView::from_parts(t, d, kps_k, &sc.pv)); // [T, hd]
    let (wkt, wq, wdo) = (WView::from_parts(d, t, kps_t, &sc.pkt), WView::from_parts(d, t, kps_t, &sc.pq), WView::from_parts(d, t, kps_t, &sc.pdo)); // [hd, T]
    for r0 in (0..t).step_by(c.step) {
        let r1 = (r0 + c.step).min(t);
        let (m, nk) = (r1 - r0, if s.causal { r1 } else { t });
        let (p, ds) = (&mut sc.p[..m * nk], &mut sc.ds[..m * nk]);
        matmul_bf16_seq(&sc.qh[r0 * d..r1 * d], m, wk.prefix(nk, d), p, c.kernel); // S = Q·Kᵀ [rows, nk]
        matmul_bf16_seq(&sc.doh[r0 * d..r1 * d], m, wv.prefix(nk, d), ds, c.kernel); // dP = dO·Vᵀ [rows, nk]
        for (i, (pr, dr)) in (r0..r1).zip(p.chunks_exact_mut(nk).zip(ds.chunks_exact_mut(nk))) {
            grad_row(pr, dr, s.keys(i), s.scale, lr[i], sc.dd[i], c.simd); // P, dS
        }
        let gq = &mut sc.out[..m * d];
        matmul_bf16_seq(&*ds, m, wkt.prefix(d, nk), gq, c.kernel); // dQ = dS·K [rows, hd]
                                                                   // SAFETY: rows r0..r1 of head h of sequence b: this task's own elements (caller).
        unsafe { copy_rows(gq, &g[0], base + r0 * w, w, d) };
        // Pᵀ and dSᵀ of the key blocks this query block sees (aligned blocks: each lies in 0..nk,
        // and its first query i0 ≤ r0)
        for kb in c.blocks.iter().take_while(|kb| kb.j0 < nk) {
            let at = kb.off + r0 - kb.i0; // (key j0, query r0) in the block's [keys, depth]
            transpose_into(&sc.p[..m * nk], nk, kb.j0, kb.keys, &mut sc.pt[at..], kb.depth, c.simd);
            transpose_into(&sc.ds[..m * nk], nk, kb.j0, kb.keys, &mut sc.dst[at..], kb.depth, c.simd);
        }
    }
    for kb in c.blocks {
        let (pt, dst) = (&sc.pt[kb.off..][..kb.keys * kb.depth], &sc.dst[kb.off..][..kb.keys * kb.depth]);
        let gkv = &mut sc.out[..kb.keys * d];
        matmul_bf16_seq(pt, kb.keys, wdo.suffix(kb.i0 / 2), gkv, c.kernel); // dV = Pᵀ·dO [keys, hd]
                                                                            // SAFETY: rows j0..j0 + keys of head h of sequence b: this task's own elements (caller).
        unsafe { copy_rows(gkv, &g[2], base + kb.j0 * w, w, d) };
        matmul_bf16_seq(dst, kb.keys, wq.suffix(kb.i0 / 2), gkv, c.kernel); // dK = dSᵀ·Q [keys, hd]
                                                                            // SAFETY: as above.
        unsafe { copy_rows(gkv, &g[1], base + kb.j0 * w, w, d) };
    }
}

/// Rows of `d` values from `src` into `dst` at `at`, `at + w`, ….
///
/// # Safety
/// Those elements of `dst` are inside its buffer and this task's alone.
unsafe fn copy_rows(src: &[f32], dst: &SharedOut, at: usize, w: usize, d: usize) {
    for (r, row) in src.chunks_exact(d).enumerate() {
        // SAFETY: the caller's contract; `row` is this task's scratch.
        unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), dst.at(at + r * w), d) };
    }
}

/// Σ a·b: 16 lanes in a fixed order (`attn_kernel::dot`) where `simd`, else in order.
fn dot(a: &[f32], b: &[f32], simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd`: the selected path has AVX-512F.
        return unsafe { super::attn_kernel::dot(a, b) };
    }
    let _ = simd;
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// One query row: P = exp(S·scale − lse) and dS = P·(dP − D)·scale over its `keys` entries, the
/// rest of the row 0 (`attn_kernel::grad_row` where `simd`: the same formulas op for op).
fn grad_row(p: &mut [f32], ds: &mut [f32], keys: usize, scale: f32, lse: f32, dd: f32, simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd`: the selected path has AVX-512F.
        return unsafe { super::attn_kernel::grad_row(p, ds, keys, scale, lse, dd) };
    }
    let _ = simd;
    for (x, y) in p[..keys].iter_mut().zip(&mut ds[..keys]) {
        *x = fastmath::exp(*x * scale - lse);
        *y = *x * (*y - dd) * scale;
    }
    p[keys..].fill(0.0);
    ds[keys..].fill(0.0);
}

/// Columns `j0..j0 + keys` of a query block's rows (`src`: [rows, nk]) transposed and rounded to
/// bf16 (RNE) into `dst`: key j0 + jj, query row r at `dst[jj·depth + r]`.
fn transpose_into(src: &[f32], nk: usize, j0: usize, keys: usize, dst: &mut [bf16], depth: usize, simd: bool) {
    let rows = src.len() / nk;
    assert!(j0 + keys <= nk && rows <= depth && (keys == 0 || (keys - 1) * depth + rows <= dst.len()), "attention backward: transposed block out of bounds");
    #[cfg(target_arch = "x86_64")]
    if simd {
        for r in (0..rows).step_by(16) {
            // SAFETY: AVX-512F (`simd`); lines r.. < rows of src read columns j0..j0 + keys (≤ nk);
            // the stores reach dst[(keys − 1)·depth + rows − 1] at most (asserted).
            unsafe {
                super::transpose::transpose_lines_bf16(src.as_ptr().add(r * nk + j0), nk, (rows - r).min(16), keys, dst.as_mut_ptr().add(r), depth, None)
            };
        }
        return;
    }
    let _ = simd;
    for (r, row) in src.chunks_exact(nk).enumerate() {
        for (jj, &x) in row[j0..j0 + keys].iter().enumerate() {
            dst[jj * depth + r] = bf16::from_f32(x);
        }
    }
}

/// [`attention_backward_bf16_reference`] per packed sequence.
#[allow(clippy::too_many_arguments)]
pub fn attention_packed_backward_bf16_reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    dout: &[f32],
    lens: &[usize],
    heads: usize,
    causal: bool,
) -> Grads {
    let n = q.len();
    let (mut dq, mut dk, mut dv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    per_sequence_parts(lens, heads, causal, [&mut dq, &mut dk, &mut dv], |x, l, s, g| {
        let (a, b, c) = attention_backward_bf16_reference(&q[x.clone()], &k[x.clone()], &v[x.clone()], &o[x.clone()], &lse[l], &dout[x], s);
        for (dst, src) in g.into_iter().zip([a, b, c]) {
            dst.copy_from_slice(&src);
        }
    });
    (dq, dk, dv)
}

/// Reference in f64 with the fast path's roundings: q, k, v and dO rounded to bf16, S, P, dP and
/// dS in f64 (D from the rounded dO and O), P and dS rounded to bf16 before the products that
/// take them, sums in f64. Returns (dq, dk, dv) like [`attention_backward_bf16`].
pub fn attention_backward_bf16_reference(q: &[f32], k: &[f32], v: &[f32], o: &[f32], lse: &[f32], dout: &[f32], s: &AttnShape) -> Grads {
    let (t, w, d) = (s.seq, s.width(), s.head_dim);
    let n = s.numel();
    let r = |x: &[f32]| x[..n].iter().map(|&y| bf16::from_f32(y).to_f64()).collect::<Vec<f64>>();
    let (q16, k16, v16, do16) = (r(q), r(k), r(v), r(dout));
    let r64 = |x: f64| bf16::from_f64(x).to_f64();
    let scale = s.scale as f64;
    let (mut dq, mut dk, mut dv) = (vec![0f64; n], vec![0f64; n], vec![0f64; n]);
    for b in 0..s.batch {
        for h in 0..s.heads {
            let row = |j: usize| (b * t + j) * w + h * d;
            let dot = |x: &[f64], i: usize, y: &[f64], j: usize| (0..d).map(|e| x[row(i) + e] * y[row(j) + e]).sum::<f64>();
            for i in 0..t {
                let di = (0..d).map(|e| do16[row(i) + e] * o[row(i) + e] as f64).sum::<f64>();
                let li = lse[(b * s.heads + h) * t + i] as f64;
                for j in 0..s.keys(i) {
                    let p = (dot(&q16, i, &k16, j) * scale - li).exp();
                    let ds = p * (dot(&do16, i, &v16, j) - di) * scale;
                    let (p, ds) = (r64(p), r64(ds));
                    for e in 0..d {
                        dv[row(j) + e] += p * do16[row(i) + e];
                        dq[row(i) + e] += ds * k16[row(j) + e];
                        dk[row(j) + e] += ds * q16[row(i) + e];
                    }
                }
            }
        }
    }
    let f = |x: Vec<f64>| x.into_iter().map(|v| v as f32).collect::<Vec<f32>>();
    (f(dq), f(dk), f(dv))
}
