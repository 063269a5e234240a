//! Matrix multiplication: a plain triple-loop reference and the fast path: on AVX-512 CPUs the
//! project's packed GEMM (src/ops/gemm_f32.rs) for every product big enough, faer's packed,
//! multithreaded GEMM otherwise; both read strided views, so transposed operands are never copied.
//!
//! `linear` is the transformer's hot op: y[m×n] = x[m×k]·Wᵀ + b with W stored [n×k] as in
//! PyTorch/HF Linear layers. The bias is written first and the GEMM accumulates onto it.
use super::gemm_epilogue::{EpiRun, Epilogue};
use super::gemm_f32_pack::PackedB;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

/// A strided matrix view over a slice: element (i, j) is `data[i*rs + j*cs]`.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        View { data, rows, cols, rs: cols, cs: 1 }
    }
    /// The transpose of a row-major [rows×cols] matrix, as a view.
    pub fn t(self) -> Self {
        View { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }
    fn max_index(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.rs + (self.cols - 1) * self.cs
        }
    }
}

/// c[m×n] (row-major) (+)= a·b, naive loops with f64 accumulation. The reference.
pub fn gemm_reference(a: View, b: View, c: &mut [f32], accumulate: bool) {
    assert_eq!(a.cols, b.rows);
    let (m, n, k) = (a.rows, b.cols, a.cols);
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for p in 0..k {
                s += a.data[i * a.rs + p * a.cs] as f64 * b.data[p * b.rs + j * b.cs] as f64;
            }
            let o = &mut c[i * n + j];
            *o = if accumulate { *o + s as f32 } else { s as f32 };
        }
    }
}

/// Work below which threading costs more than it saves.
const PAR_MIN_FLOPS: usize = 1 << 21;

/// c[m×n] (row-major) (+)= a·b with faer. Panics only on views that overrun their slices
/// (callers check shapes first).
pub fn gemm(a: View, b: View, c: &mut [f32], accumulate: bool) {
    assert_eq!(a.cols, b.rows, "gemm inner dims");
    let (m, n, k) = (a.rows, b.cols, a.cols);
    assert!(c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    assert!(a.max_index() < a.data.len() && b.max_index() < b.data.len(), "gemm view out of bounds");
    if super::gemm_f32::worth_it(m, n, k) && super::cpu_path::selected() >= super::cpu_path::GemmPath::Avx512 {
        super::gemm_f32::gemm(a, b, c, accumulate); // the hand-written AVX-512 path
        return;
    }
    gemm_faer(a, b, c, accumulate);
}

/// [`gemm`] through faer only (non-AVX-512 CPUs and small products; the bench's comparison).
pub fn gemm_faer(a: View, b: View, c: &mut [f32], accumulate: bool) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    assert!(a.cols == b.rows && c.len() >= m * n, "gemm shapes");
    assert!(a.max_index() < a.data.len().max(1) && b.max_index() < b.data.len().max(1), "gemm view out of bounds");
    if m == 0 || n == 0 || k == 0 {
        return gemm(a, b, c, accumulate);
    }
    let threads = rayon::current_num_threads();
    let big = 2 * m * n * k >= PAR_MIN_FLOPS;
    if big && threads > 1 && m >= 64 * threads {
        // Tall products (every Linear layer: m = batch × tokens) split by rows, one sequential GEMM
        // per thread: each packs its own copy of b, which costs O(k·n) against O(m·k·n / threads)
        // of work, and avoids faer's per-block barriers between threads.
        let rows = m.div_ceil(threads);
        c[..m * n].par_chunks_mut(rows * n).enumerate().for_each(|(i, ci)| {
            let r0 = i * rows;
            let sub = View { data: &a.data[r0 * a.rs..], rows: ci.len() / n, ..a };
            gemm_one(sub, b, ci, accumulate, Par::Seq);
        });
        return;
    }
    gemm_one(a, b, c, accumulate, if big { Par::rayon(0) } else { Par::Seq });
}

/// c[m×n] = a·b on the calling thread (for small products inside already-parallel loops).
pub fn gemm_seq(a: View, b: View, c: &mut [f32]) {
    gemm_seq_into(a, b, c, false);
}

/// c[m×n] (+)= a·b on the calling thread.
pub fn gemm_seq_into(a: View, b: View, c: &mut [f32], accumulate: bool) {
    assert_eq!(a.cols, b.rows, "gemm inner dims");
    assert!(a.max_index() < a.data.len().max(1) && b.max_index() < b.data.len().max(1), "gemm view out of bounds");
    assert!(c.len() >= a.rows * b.cols, "gemm output too small");
    gemm_one(a, b, c, accumulate, Par::Seq);
}

fn gemm_one(a: View, b: View, c: &mut [f32], accumulate: bool, par: Par) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    // SAFETY: the views' extents were checked against their slices above; c holds m*n elements;
    // faer reads a and b and writes c only within those extents.
    let (am, bm, cm) = unsafe {
        (
            MatRef::<f32>::from_raw_parts(a.data.as_ptr(), m, k, a.rs as isize, a.cs as isize),
            MatRef::<f32>::from_raw_parts(b.data.as_ptr(), k, n, b.rs as isize, b.cs as isize),
            MatMut::<f32>::from_raw_parts_mut(c.as_mut_ptr(), m, n, n as isize, 1),
        )
    };
    let beta = if accumulate { Accum::Add } else { Accum::Replace };
    faer::linalg::matmul::matmul(cm, beta, am, bm, 1.0f32, par);
}

/// y[m×n] = x[m×k]·wᵀ (+ bias), w is [n×k] row-major. The reference.
pub fn linear_reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, bias: Option<&[f32]>) -> Vec<f32> {
    let mut y = vec![0.0; m * n];
    gemm_reference(View::row_major(x, m, k), View::row_major(w, n, k).t(), &mut y, false);
    if let Some(b) = bias {
        for row in y.chunks_mut(n) {
            row.iter_mut().zip(b).for_each(|(o, b)| *o += b);
        }
    }
    y
}

/// y[m×n] = x[m×k]·wᵀ (+ bias): the fast path.
pub fn linear(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, bias: Option<&[f32]>) -> Vec<f32> {
    let mut y = super::fastmath::zeros(m * n); // [m, n]
    linear_into(x, m, k, w, n, bias, &mut y, Epilogue::None);
    y
}

/// [`linear_into`] with w also packed once ([`PackedB`] of the same values, n = `p.n()`, k =
/// `p.k()`): the AVX-512 GEMM reads the packed copy and packs nothing; where that path does not
/// run (small products, `CLIPFORGE_CPU_GEMM` below avx512) w is used as in `linear_into`.
pub fn linear_packed_into(x: &[f32], m: usize, w: &[f32], p: &PackedB, bias: Option<&[f32]>, y: &mut [f32], epi: Epilogue) {
    let (n, k) = (p.n(), p.k());
    assert!(y.len() == m * n && bias.is_none_or(|b| b.len() == n) && x.len() >= m * k, "linear: y must be m*n, bias n and x m*k");
    if super::gemm_f32::worth_it(m, n, k) && super::cpu_path::selected() >= super::cpu_path::GemmPath::Avx512 {
        return super::gemm_f32::gemm_fused_packed(View::row_major(&x[..m * k], m, k), p, y, bias, epi);
    }
    linear_into(x, m, k, w, n, bias, y, epi)
}

/// y[m×n] = epi(x[m×k]·wᵀ + bias), every element of y written (its old values are never read):
/// a Linear with its bias and epilogue (activation, residual add; `gemm_epilogue.rs`) fused into
/// the AVX-512 GEMM's tile stores when that path runs, otherwise bias rows, an accumulating GEMM
/// and the epilogue as one pass over the rows — the same values either way.
#[allow(clippy::too_many_arguments)]
pub fn linear_into(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, bias: Option<&[f32]>, y: &mut [f32], mut epi: Epilogue) {
    assert!(y.len() == m * n && bias.is_none_or(|b| b.len() == n), "linear: y must be m*n and bias n");
    let (a, b) = (View::row_major(x, m, k), View::row_major(w, n, k).t());
    if super::gemm_f32::worth_it(m, n, k) && super::cpu_path::selected() >= super::cpu_path::GemmPath::Avx512 {
        assert!(a.max_index() < x.len() && b.max_index() < w.len(), "linear: x or w too short");
        return super::gemm_f32::gemm_fused(a, b, y, bias, epi);
    }
    epi.check(m * n);
    let run = epi.run();
    if let Some(b) = bias.filter(|_| n > 0) {
        y.par_chunks_mut(n).for_each(|row| row.copy_from_slice(b));
    }
    gemm(a, b, y, bias.is_some());
    if matches!(run, EpiRun::None) || n == 0 {
        return;
    }
    let yp = super::fastmath::SharedMut::new(y); // rows in parallel
    (0..m).into_par_iter().with_min_len((1 << 14) / n + 1).for_each(|r| {
        // SAFETY: row r of y (and of the epilogue's m·n buffers) is this iteration's alone.
        unsafe { run.apply(yp.get(), r * n, n, 1, n) }
    });
}
