//! Attention's forward with bf16 products on the CPU: S = Q·Kᵀ and O = P·V through the bf16 GEMM
//! (`gemm_bf16`: AMX tiles, `vdpbf16ps`, or bf16 inputs through f32 FMAs, as `cpu_path` picks),
//! the softmax in f32 between them. Same layout and outputs as `attention::attention`: q, k, v
//! and o [B, T, H·hd], lse [B, H, T]; q, k, v in f32 (rounded to bf16 while packing) or bf16.
//!
//! Rounding: q, k and v to bf16 (RNE); S accumulated in f32 (the product of two bf16 is exact in
//! f32), so lse is the logsumexp of the bf16-rounded scores; P (normalised, f32) rounded to bf16
//! as the left operand of P·V; O accumulated in f32. [`attention_bf16_reference`] is the same
//! computation in f64 with P rounded from its f64 value.
//!
//! Per (sequence, head) pair (in parallel): K is packed as the weight [T keys × hd] and V as the weight
//! Vᵀ [hd × T keys] in the bf16 GEMM's panel layout (buffers and their zero padding reused across
//! the pairs a task runs), Q's rows of the head gathered; per block of query rows (`qblk`: whole
//! panels of the kernel's rows) the two GEMMs run on this thread (`matmul_bf16_seq`, one work
//! item). A causal block uses only the keys it sees: a prefix of both packed weights (blocks of
//! an even number of rows keep that prefix even, so no pair reaches past it).
//!
//! bf16 inputs on the `vdpbf16ps` kernel (a bf16 model on AMD) take the fused form of the same
//! steps instead (`attention_bf16_fused.rs`: per 14-row panel, Q read from its rows, O stored in
//! place, a causal panel over its own keys), with the same bits.
//!
//! The CPU backend takes this path when a model computes in bf16 and [`pays`]: on AMX, or on
//! AVX512-BF16 where `vdpbf16ps` beats f32 FMAs (AMD); elsewhere bf16 products would only add
//! conversions to the f32 attention (`attention.rs`). `CLIPFORGE_CPU_ATTN=f32|bf16` overrides
//! that choice ([`chosen`]), to measure one against the other.
//!
//! The backward, with the same GEMM for its five products: `attention_bf16_bwd.rs`.
use super::attention::{check_into, fill, per_sequence_into, prefetch_head, softmax_row_portable, with_outputs, AttnShape, SharedOut};
use super::cpu_path::{self, GemmPath};
use super::gemm_bf16::{converts_in_simd, matmul_bf16_seq, resolve, AElem, Kernel, WView, MR, NR};
use super::gemm_bf16_pack::geometry;
#[cfg(target_arch = "x86_64")]
use super::transpose::transpose_lines;
use half::bf16;
use rayon::prelude::*;

/// Query rows per block for `kernel`: whole panels of its rows, even (a causal block's key prefix is
/// whole pairs). The AMX GEMM's 32-row blocks: 64. The `vdpbf16ps` (and f32-FMA) kernels' 14-row
/// panels: 56, four panels — 64 would run five, the last holding 8 rows (9 % of the rows computed
/// for nothing), where 56 wastes rows only in a sequence's last block (T = 197: 15 panels for 16,
/// T = 257: 19 for 21, T = 577: 42 for 46).
pub(super) fn qblk(kernel: Kernel) -> usize {
    match resolve(kernel) {
        Kernel::Amx | Kernel::AmxSoft => 64,
        _ => 4 * MR,
    }
}

/// Whether the bf16 attention beats the f32 one on the path GEMMs take now: the AMX tile unit, or
/// `vdpbf16ps` where it runs at the f32 FMAs' rate (then a bf16 pair is two products per lane).
pub fn pays() -> bool {
    match cpu_path::selected() {
        GemmPath::Amx => true,
        GemmPath::Avx512Bf16 => cpu_path::bf16_dot_pays(),
        GemmPath::Avx512 | GemmPath::Scalar => false,
    }
}

/// Whether a bf16 model's attention takes this path: `CLIPFORGE_CPU_ATTN` (`f32`, `bf16`; read
/// once; unset, empty or `auto`: [`pays`]; anything else is reported once and ignored).
pub fn chosen() -> bool {
    static ENV: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    let env = *ENV.get_or_init(|| match std::env::var("CLIPFORGE_CPU_ATTN").unwrap_or_default().trim() {
        "f32" => Some(false),
        "bf16" => Some(true),
        "" | "auto" => None,
        other => {
            eprintln!("clipforge: CLIPFORGE_CPU_ATTN={other:?} is not one of auto, f32, bf16; ignored");
            None
        }
    });
    env.unwrap_or_else(pays)
}

/// Row `j` of head `h0` (the offset `base` of its row 0) in a [T, W] block: hd values.
pub(super) fn head_row<T>(x: &[T], base: usize, w: usize, d: usize, j: usize) -> &[T] {
    &x[base + j * w..][..d]
}

/// Index of the pair (`p`, output `j`) in a packed weight with `kps` pairs per panel.
fn at(kps: usize, j: usize, p: usize) -> usize {
    (j / NR) * kps * NR + p * NR + j % NR
}

/// K of one head (rows `base + j·w`, j < t, of `x`) as the weight [T × hd] (output j = key j,
/// its pairs along hd), per 32-key panel: each key's row converted to contiguous pairs in `tmp`
/// ([keys, pairs]), then transposed into the panel's [pairs, 32 keys] (16×16 in-register
/// transposes when `avx512`: the path allows AVX-512F). bf16 rows of an even hd are pairs as they
/// lie: transposed straight from `x`.
#[allow(clippy::too_many_arguments)]
pub(super) fn pack_k<T: AElem>(
    dst: &mut [u32],
    tmp: &mut Vec<u32>,
    kps: usize,
    t: usize,
    d: usize,
    cvt: bool,
    avx512: bool,
    (x, base, w): (&[T], usize, usize),
) {
    let kp = d.div_ceil(2);
    let row = |j: usize| head_row(x, base, w, d, j);
    #[cfg(target_arch = "x86_64")]
    if let (true, true, super::gemm_bf16::Row::Bf16(xb)) = (avx512, d.is_multiple_of(2) && w.is_multiple_of(2), T::row(x)) {
        for (panel, out) in dst.chunks_exact_mut(kps * NR).enumerate().take(t.div_ceil(NR)) {
            let keys = NR.min(t - panel * NR);
            for half in 0..2 {
                let live = keys.saturating_sub(16 * half).min(16);
                if live > 0 {
                    let first = row(panel * NR + 16 * half).as_ptr();
                    // SAFETY: AVX-512F (`avx512`); lines i < live are key rows panel·32 + 16·half + i,
                    // w/2 pairs apart, kp = d/2 pairs each (inside x: `row` checked the first, the
                    // rest are rows < t of the same head); out[16·half..] holds (kp − 1)·NR + 16.
                    assert!(base + (panel * NR + 16 * half + live - 1) * w + d <= xb.len(), "pack_k: key rows past k");
                    unsafe { transpose_lines(first.cast::<f32>(), w / 2, live, kp, bytemuck::cast_slice_mut(&mut out[16 * half..]), NR, 16) };
                }
            }
        }
        return;
    }
    tmp.resize(NR * kp, 0);
    for (panel, out) in dst.chunks_exact_mut(kps * NR).enumerate().take(t.div_ceil(NR)) {
        let keys = NR.min(t - panel * NR);
        for jj in 0..keys {
            T::pairs(row(panel * NR + jj), &mut tmp[jj * kp..][..kp], cvt);
        }
        #[cfg(target_arch = "x86_64")]
        if avx512 {
            for half in 0..2 {
                let live = keys.saturating_sub(16 * half).min(16);
                if live > 0 {
                    // SAFETY: AVX-512F (`avx512`: the selected path has it); lines i < live are tmp rows 16·half + i,
                    // kp values each; out[16·half..] holds (kp − 1)·NR + 16 values (kp ≤ kps).
                    unsafe {
                        let base = tmp.as_ptr().add(16 * half * kp).cast::<f32>();
                        transpose_lines(base, kp, live, kp, bytemuck::cast_slice_mut(&mut out[16 * half..]), NR, 16)
                    };
                }
            }
            continue;
        }
        for jj in 0..keys {
            for p in 0..kp {
                out[p * NR + jj] = tmp[jj * kp + p];
            }
        }
    }
}

/// V of one head as the weight Vᵀ [hd × T] (output e = value column e, its pairs along the keys:
/// keys 2p and 2p+1, an odd last key paired with zero): per key pair, two rows interleaved into
/// each 32-column panel's contiguous row of pairs. Panel by panel, so that each load walks the
/// rows at one stride (which the hardware prefetchers follow).
pub(super) fn pack_vt<'a, T: AElem>(dst: &mut [u32], kps: usize, t: usize, d: usize, cvt: bool, row: impl Fn(usize) -> &'a [T]) {
    for e0 in (0..d).step_by(NR) {
        let e1 = (e0 + NR).min(d);
        for p in 0..t.div_ceil(2) {
            let (lo, hi) = (&row(2 * p)[e0..e1], (2 * p + 1 < t).then(|| &row(2 * p + 1)[e0..e1]));
            T::zip_pairs(lo, hi, &mut dst[at(kps, e0, p)..][..e1 - e0], cvt);
        }
    }
}

/// The forward (see the module docs); `kernel` is the bf16 GEMM's kernel ([`Kernel::Auto`]: the
/// path `cpu_path` selects; the others for tests).
pub fn attention_bf16<T: AElem>(q: &[T], k: &[T], v: &[T], s: &AttnShape, kernel: Kernel) -> (Vec<f32>, Vec<f32>) {
    // SAFETY: `bf16_into` writes every element of both outputs.
    unsafe { with_outputs(s, |o, l| bf16_into(q, k, v, s, kernel, o, l)) }
}

/// [`attention_bf16`] into `out` ([B, T, W]) and `lse` ([B, H, T]), every element written.
fn bf16_into<T: AElem>(q: &[T], k: &[T], v: &[T], s: &AttnShape, kernel: Kernel, out: &mut [f32], lse: &mut [f32]) {
    let (t, w, d) = (s.seq, s.width(), s.head_dim);
    check_into("attention_bf16", q, k, v, s, out, lse);
    if s.numel() == 0 {
        return;
    }
    let step = qblk(kernel).min(t);
    let simd = cfg!(target_arch = "x86_64") && cpu_path::selected() >= GemmPath::Avx512;
    let cvt = converts_in_simd(resolve(kernel)); // packing's f32 → bf16 as the kernel's own
    let out_at = SharedOut::new(out);
    #[cfg(target_arch = "x86_64")]
    let fused = super::attention_bf16_fused::applies::<T>(kernel, t, d);
    #[cfg(not(target_arch = "x86_64"))]
    let fused = false;
    let composed = if fused { 0 } else { step }; // the composed path's query-block rows (its buffers)
    let scratch = || Scratch {
        pk: packed_k_len(t, d),
        pv: packed_vt_len(t, d),
        tmp: Vec::new(),
        qh: Vec::with_capacity(if fused { 0 } else { t * d }),
        sc: vec![0f32; composed * t],
        o: vec![0f32; composed * d],
        #[cfg(target_arch = "x86_64")]
        fused: fused.then(|| super::attention_bf16_fused::Fused::new(t)),
    };
    // (sequence, head) pairs in parallel: a single long sequence still fills every core
    lse.par_chunks_mut(t).enumerate().for_each_init(scratch, |x, (bh, lr)| {
        let (b, h) = (bh / s.heads, bh % s.heads);
        let base = b * t * w + h * d; // (b, 0, h, 0)
        prefetch_head(&[q, k, v], bh + 1, s);
        let kv = pack_head(&mut x.pk, &mut x.pv, &mut x.tmp, [k, v], base, s, cvt, simd);
        #[cfg(target_arch = "x86_64")]
        if let Some(f) = &mut x.fused {
            // SAFETY: `applies`; task (b, h) writes only its head's rows and columns of out.
            return unsafe { super::attention_bf16_fused::head(q, base, s, kv, lr, f, out_at) };
        }
        x.qh.clear();
        (0..t).for_each(|j| x.qh.extend_from_slice(head_row(q, base, w, d, j)));
        for r0 in (0..t).step_by(step) {
            let r1 = (r0 + step).min(t);
            let (m, nk) = (r1 - r0, if s.causal { r1 } else { t });
            let o = &mut x.o[..m * d];
            query_block(&x.qh[r0 * d..r1 * d], kv, nk, s, r0, &mut lr[r0..r1], &mut x.sc[..m * nk], o, simd, kernel); // O [rows, hd]
            for (i, orow) in (r0..r1).zip(o.chunks_exact(d)) {
                // SAFETY: row i of head h of sequence b: d values inside out, this task's own
                // elements (SharedOut); `orow` is this task's scratch.
                unsafe { std::ptr::copy_nonoverlapping(orow.as_ptr(), out_at.at(base + i * w), d) };
            }
        }
    });
}

/// One query of a sequence (the pooled row of a last block at inference): the sequence's first
/// row `start` and length `len` in k and v, the query's position `pos` in it, causal or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PooledRow {
    pub start: usize,
    pub len: usize,
    pub pos: usize,
    pub causal: bool,
}

/// The attention of one query per entry of `rows` (q [R, W]) against its sequence's keys in k, v
/// [N, W] → o [R, W]: each row through [`attention_bf16`]'s own steps (`pack_head`, then
/// `query_block` over the score columns of the row's query block: the block's causal prefix,
/// or every key), so the same bits, without the other queries (the pooled rows of a last block
/// at inference).
pub fn attention_bf16_rows<T: AElem>(q: &[T], k: &[T], v: &[T], rows: &[PooledRow], heads: usize, kernel: Kernel) -> Vec<f32> {
    let w = q.len() / rows.len().max(1);
    assert!(heads > 0 && w.is_multiple_of(heads) && q.len() == rows.len() * w, "attention_bf16_rows: q must be [rows, W], W a multiple of heads");
    assert!(k.len() == v.len() && w > 0 && k.len().is_multiple_of(w), "attention_bf16_rows: k and v must be [N, W]");
    for r in rows {
        assert!(r.pos < r.len && (r.start + r.len) * w <= k.len(), "attention_bf16_rows: {r:?} outside the {} rows", k.len() / w);
    }
    let d = w / heads;
    let simd = cfg!(target_arch = "x86_64") && cpu_path::selected() >= GemmPath::Avx512;
    let cvt = converts_in_simd(resolve(kernel));
    let mut out = vec![0f32; q.len()]; // [R, W]
    out.par_chunks_mut(d).enumerate().for_each(|(ih, o)| {
        let (i, h) = (ih / heads, ih % heads);
        let r = rows[i];
        let s = AttnShape { batch: 1, seq: r.len, heads, head_dim: d, causal: r.causal, scale: 1.0 / (d as f32).sqrt() };
        let step = qblk(kernel).min(r.len);
        let nk = if r.causal { ((r.pos / step + 1) * step).min(r.len) } else { r.len };
        // fresh zeroed buffers, as `bf16_into`'s (panel padding reads zeros)
        let (mut pk, mut pv, mut tmp) = (packed_k_len(r.len, d), packed_vt_len(r.len, d), Vec::new());
        let kv = pack_head(&mut pk, &mut pv, &mut tmp, [k, v], r.start * w + h * d, &s, cvt, simd);
        query_block(&q[i * w + h * d..][..d], kv, nk, &s, r.pos, &mut [0f32], &mut vec![0f32; nk], o, simd, kernel);
        // o [1, hd]
    });
    out
}

/// Zeroed buffers for K of one head packed as a weight [T × hd], and for Vᵀ [hd × T]
/// (`gemm_bf16_pack::geometry`'s lengths).
fn packed_k_len(t: usize, d: usize) -> Vec<u32> {
    vec![0u32; geometry(t, d).2]
}
fn packed_vt_len(t: usize, d: usize) -> Vec<u32> {
    vec![0u32; geometry(d, t).2]
}

/// K and Vᵀ of the head whose row 0 is at `base` in k and v (`s.seq` rows at stride W) packed
/// into `pk`, `pv` as the weights of S = Q·Kᵀ and O = P·V.
#[allow(clippy::too_many_arguments)]
fn pack_head<'a, T: AElem>(
    pk: &'a mut [u32],
    pv: &'a mut [u32],
    tmp: &mut Vec<u32>,
    [k, v]: [&[T]; 2],
    base: usize,
    s: &AttnShape,
    cvt: bool,
    simd: bool,
) -> (WView<'a>, WView<'a>) {
    let (t, w, d) = (s.seq, s.width(), s.head_dim);
    let (kps_k, kps_v) = (geometry(t, d).1, geometry(d, t).1); // pairs per panel
    pack_k(pk, tmp, kps_k, t, d, cvt, simd, (k, base, w));
    pack_vt(pv, kps_v, t, d, cvt, |j| head_row(v, base, w, d, j));
    (WView::from_parts(t, d, kps_k, pk), WView::from_parts(d, t, kps_v, pv))
}

/// One block of query rows r0.. (`qh`: [rows, hd]) of a head: S = Q·Kᵀ over the first `nk` keys
/// (in `sc`, [rows, nk]), the masked softmax (logsumexps to `lse`), o = P·V ([rows, hd]).
#[allow(clippy::too_many_arguments)]
fn query_block<T: AElem>(
    qh: &[T],
    (kw, vw): (WView, WView),
    nk: usize,
    s: &AttnShape,
    r0: usize,
    lse: &mut [f32],
    sc: &mut [f32],
    o: &mut [f32],
    simd: bool,
    kernel: Kernel,
) {
    let (m, d) = (lse.len(), s.head_dim);
    matmul_bf16_seq(&qh[..m * d], m, kw.prefix(nk, d), sc, kernel); // S = Q·Kᵀ [rows, nk]
    softmax_rows(sc, nk, s, r0, lse, simd);
    matmul_bf16_seq(&*sc, m, vw.prefix(d, nk), o, kernel); // O = P·V [rows, hd]
}

/// One task's buffers, reused across the (sequence, head) pairs it runs.
struct Scratch<T> {
    /// K as the weight [T, hd], packed.
    pk: Vec<u32>,
    /// Vᵀ as the weight [hd, T], packed.
    pv: Vec<u32>,
    /// One K panel's rows as pairs [32, hd/2].
    tmp: Vec<u32>,
    /// Q of one head [T, hd].
    qh: Vec<T>,
    /// S, then P, of one query block [rows, keys].
    sc: Vec<f32>,
    /// O of one query block [rows, hd].
    o: Vec<f32>,
    /// The fused path's buffers, where it runs (`attention_bf16_fused::applies`; then qh, sc, o
    /// stay empty).
    #[cfg(target_arch = "x86_64")]
    fused: Option<super::attention_bf16_fused::Fused>,
}

/// The masked softmax of a block's score rows (`sc`: [rows, nk], queries r0..; AVX-512 where the
/// path allows it), their logsumexps to `lse`.
fn softmax_rows(sc: &mut [f32], nk: usize, s: &AttnShape, r0: usize, lse: &mut [f32], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` means the selected path is AVX-512F or higher (the CPU has it);
        // keys ≤ nk (a block's rows see at most nk keys).
        return unsafe { super::attn_kernel::softmax_rows(sc, nk, s.scale, |j| s.keys(r0 + j), lse) };
    }
    let _ = simd;
    for (j, row) in sc.chunks_exact_mut(nk).enumerate() {
        lse[j] = softmax_row_portable(row, s.keys(r0 + j), s.scale);
    }
}

/// Packed sequences (see `attention::attention_packed`): [`attention_bf16`] per sequence.
pub fn attention_packed_bf16<T: AElem>(q: &[T], k: &[T], v: &[T], lens: &[usize], heads: usize, causal: bool, kernel: Kernel) -> (Vec<f32>, Vec<f32>) {
    // SAFETY: `bf16_into` writes every element of its outputs.
    unsafe { per_sequence_into(lens, heads, causal, q.len(), |x, s, o, l| bf16_into(&q[x.clone()], &k[x.clone()], &v[x], s, kernel, o, l)) }
}

/// [`attention_bf16_reference`] per packed sequence.
pub fn attention_packed_bf16_reference(q: &[f32], k: &[f32], v: &[f32], lens: &[usize], heads: usize, causal: bool) -> (Vec<f32>, Vec<f32>) {
    // SAFETY: `fill` writes both parts in full.
    unsafe { per_sequence_into(lens, heads, causal, q.len(), |x, s, o, l| fill(o, l, attention_bf16_reference(&q[x.clone()], &k[x.clone()], &v[x], s))) }
}

/// Reference in f64: q, k, v rounded to bf16, scores and softmax in f64, P rounded to bf16, O
/// accumulated in f64. Returns (o, lse) like [`attention_bf16`].
pub fn attention_bf16_reference(q: &[f32], k: &[f32], v: &[f32], s: &AttnShape) -> (Vec<f32>, Vec<f32>) {
    let (t, w, d) = (s.seq, s.width(), s.head_dim);
    let r = |x: &[f32]| x[..s.numel()].iter().map(|&y| bf16::from_f32(y).to_f32() as f64).collect::<Vec<f64>>();
    let (q, k, v) = (r(q), r(k), r(v));
    let mut out = vec![0f32; s.numel()];
    let mut lse = vec![0f32; s.batch * s.heads * t];
    for b in 0..s.batch {
        for h in 0..s.heads {
            let row = |j: usize| (b * t + j) * w + h * d;
            for i in 0..t {
                let nk = s.keys(i);
                let sc: Vec<f64> = (0..nk).map(|j| (0..d).map(|e| q[row(i) + e] * k[row(j) + e]).sum::<f64>() * s.scale as f64).collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                lse[(b * s.heads + h) * t + i] = (m + z.ln()) as f32;
                let p: Vec<f64> = sc.iter().map(|x| bf16::from_f64((x - m).exp() / z).to_f64()).collect();
                for e in 0..d {
                    out[row(i) + e] = (0..nk).map(|j| p[j] * v[row(j) + e]).sum::<f64>() as f32;
                }
            }
        }
    }
    (out, lse)
}
