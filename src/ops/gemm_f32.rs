//! f32 GEMM for AVX-512: `c[m×n] (+)= a[m×k]·b[k×n]`, c row-major, a and b any strides (so
//! the transposed operands of a backward pass are packed, never copied first). The fast path of
//! [`super::matmul::gemm`] for products big enough to pay for packing, on CPUs with AVX-512F;
//! faer does everything else. Its reference is `matmul::gemm_reference` (tests/ops.rs).
//!
//! BLIS-style blocking:
//! * Register tile `MR × NR = 14 × 32`: 28 zmm accumulators; per k step 2 loads of B (32
//!   columns), 14 broadcasts of A and 28 FMAs.
//! * B is packed per (NC columns × KC depth) block into `[NR-column panel][kc][NR]`, zero-padded
//!   past n, by all threads; the kc × NR micro-panel (≤ 32 KiB) stays in L1 while a row block's
//!   MR panels stream past it.
//! * A is packed per row block (whole MR panels, at most `MAX_PANELS`) into `[panel][kc][MR]`,
//!   zero-padded past m, by the thread that owns the block; row blocks are spread evenly over
//!   the threads, and each writes its own rows of C (no two threads touch one element).
//! * The first kc block replaces C (or adds to it when accumulating), later ones add.
//! * Two tunings ([`Tuning`], chosen once per process from CPUID). [`Tuning::Prefetch`] on Intel
//!   and AMD: the depth is split into even blocks of at most 384, NC = 1024 keeps the packed B
//!   block (1.5 MiB) in L2, and the kernel prefetches its C tile (strided rows no hardware
//!   prefetcher follows) and, on a B panel's last use, the next B panel. Made for Intel (48 KiB
//!   L1d, 2 MiB L2); measured on Zen 4 (32 KiB L1d, 1 MiB L2) it is as fast or faster there too
//!   (BENCHMARKS.md, 2026-12-06 fifteenth session). [`Tuning::Plain`] (kc = 256, NC = 2048, no
//!   software prefetch, the first blocking) for CPUs of other vendors. `cargo bench --bench ops
//!   -- gemm_f32` compares both on any CPU.
//! * Fused Linear ([`gemm_fused`]): the bias is added in the first kc block's tile store (C is
//!   never read or pre-filled), and an [`Epilogue`] (activation, residual add) is applied to
//!   each C tile right after its last kc block, while it is still in L1 — the same epilogues as
//!   the bf16 GEMM (`gemm_epilogue.rs`), bit-identical to bias-first accumulation followed by
//!   separate passes.
//! * A B packed once ([`gemm_fused_packed`], `gemm_f32_pack::PackedB`: the Linear weights of an
//!   inference model, packed at load) is read in place of the per-call packing: same panels,
//!   same bits, no packing per call and per thread.
use super::fastmath::SharedMut;
use super::gemm_epilogue::{EpiRun, Epilogue};
use super::gemm_f32_pack::{pack_a, pack_b, PackedB};
use super::matmul::View;
use rayon::prelude::*;

pub(super) const MR: usize = 14;
pub(super) const NR: usize = 32;
/// Upper bound on MR panels in one row block (the packed A block then fits L2: 8·14·384·4 B).
const MAX_PANELS: usize = 8;

/// The blocking and prefetch choices of one CPU kind (see the file header).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tuning {
    /// kc = 256 fixed, NC = 2048, no software prefetch (CPUs other than Intel's and AMD's).
    Plain,
    /// kc ≤ 384 split evenly over k, NC = 1024, C-tile and next-B-panel prefetch (Intel, AMD).
    Prefetch,
}

impl Tuning {
    /// The tuning for this CPU: [`Tuning::Prefetch`] on GenuineIntel and AuthenticAMD,
    /// [`Tuning::Plain`] otherwise.
    pub fn detected() -> Tuning {
        use super::cpu_path::{vendor, Vendor};
        match vendor() {
            Vendor::Intel | Vendor::Amd => Tuning::Prefetch,
            Vendor::Other => Tuning::Plain,
        }
    }

    /// Depth of one k block for a product of depth k.
    pub(super) fn kc(self, k: usize) -> usize {
        match self {
            Tuning::Plain => 256.min(k),
            Tuning::Prefetch => k.div_ceil(k.div_ceil(384)).max(1), // even blocks: 768 → 2×384, 512 → 2×256
        }
    }

    /// Columns of B packed per block.
    fn nc(self) -> usize {
        match self {
            Tuning::Plain => 2048,
            Tuning::Prefetch => 1024,
        }
    }

    fn prefetch(self) -> bool {
        self == Tuning::Prefetch
    }
}

/// Whether this CPU runs the AVX-512 path.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether [`gemm`] is the faster choice for an m×k·k×n product on this CPU.
pub fn worth_it(m: usize, n: usize, k: usize) -> bool {
    m >= 2 * MR && n >= NR && k >= 16 && m * n * k >= 1 << 21 && available()
}

thread_local! {
    static APACK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// c[m×n] (row-major) (+)= a·b. Call only when [`available`]; shapes must agree and the views
/// must lie inside their slices (checked by the caller, `matmul::gemm`).
pub fn gemm(a: View, b: View, c: &mut [f32], accumulate: bool) {
    gemm_tuned(a, b, c, accumulate, Tuning::detected());
}

/// [`gemm`] with a given [`Tuning`] (tests run every tuning on any AVX-512 CPU).
pub fn gemm_tuned(a: View, b: View, c: &mut [f32], accumulate: bool, tuning: Tuning) {
    run(a, BSrc::View(b), c, Fuse { accumulate, bias: None, epi: EpiRun::None }, tuning);
}

/// c[m×n] = epi(a·b + bias): a Linear with its bias and epilogue fused into the GEMM (C is only
/// written, so it need not be initialised). Call only when [`available`]; `bias` holds n values.
pub fn gemm_fused(a: View, b: View, c: &mut [f32], bias: Option<&[f32]>, epi: Epilogue) {
    gemm_fused_tuned(a, b, c, bias, epi, Tuning::detected());
}

/// [`gemm_fused`] with a given [`Tuning`].
pub fn gemm_fused_tuned(a: View, b: View, c: &mut [f32], bias: Option<&[f32]>, epi: Epilogue, tuning: Tuning) {
    fused(a, BSrc::View(b), c, bias, epi, tuning);
}

/// [`gemm_fused`] with B packed once ([`PackedB`], e.g. a Linear weight: y = x·Wᵀ), run with the
/// tuning it was packed for. Call only when [`available`]; a.cols must be `b.k()`.
pub fn gemm_fused_packed(a: View, b: &PackedB, c: &mut [f32], bias: Option<&[f32]>, epi: Epilogue) {
    fused(a, BSrc::Packed(b), c, bias, epi, b.tuning());
}

/// Where a product's B comes from: a strided view (packed per block by each thread that needs
/// it) or a [`PackedB`] packed for the tuning the product runs with.
#[derive(Clone, Copy)]
enum BSrc<'a> {
    View(View<'a>),
    Packed(&'a PackedB),
}

impl BSrc<'_> {
    fn rows(&self) -> usize {
        match self {
            BSrc::View(v) => v.rows,
            BSrc::Packed(p) => p.k(),
        }
    }
    fn cols(&self) -> usize {
        match self {
            BSrc::View(v) => v.cols,
            BSrc::Packed(p) => p.n(),
        }
    }
}

fn fused(a: View, b: BSrc, c: &mut [f32], bias: Option<&[f32]>, mut epi: Epilogue, tuning: Tuning) {
    let (m, n) = (a.rows, b.cols());
    assert!(c.len() == m * n && bias.is_none_or(|b| b.len() == n), "gemm_fused: c must be m*n and bias n");
    epi.check(m * n);
    let epi = epi.run();
    if a.cols == 0 {
        // An empty product: C = bias (or 0), then the epilogue.
        for row in c.chunks_mut(n.max(1)) {
            match bias {
                Some(b) => row.copy_from_slice(b),
                None => row.fill(0.0),
            }
        }
        // SAFETY: C and the epilogue's buffers hold m·n values; this thread is their only user.
        return unsafe { epi.apply(c.as_mut_ptr(), 0, n, m, n) };
    }
    run(a, b, c, Fuse { accumulate: false, bias, epi }, tuning);
}

/// What a GEMM call does besides the product: add to C, add a bias row, apply an epilogue.
#[derive(Clone, Copy)]
struct Fuse<'a> {
    accumulate: bool,
    bias: Option<&'a [f32]>,
    epi: EpiRun,
}

fn run(a: View, b: BSrc, c: &mut [f32], fuse: Fuse, tuning: Tuning) {
    let (m, n) = (a.rows, b.cols());
    assert!(a.cols == b.rows() && c.len() >= m * n && available(), "gemm_f32: bad call");
    assert!(!matches!(b, BSrc::Packed(p) if p.tuning() != tuning), "gemm_f32: a packed B runs with its own tuning");
    assert!(!fuse.accumulate || (fuse.bias.is_none() && matches!(fuse.epi, EpiRun::None)), "gemm_f32: accumulation takes no bias or epilogue");
    if a.cols == 0 {
        if !fuse.accumulate {
            c[..m * n].fill(0.0); // an empty product (`gemm_fused_tuned` handles its own before this)
        }
        return;
    }
    // One block of C per thread, each thread running the whole blocked loop on it with its own
    // packed panels: one fork-join per product, no barrier per kc block. The split is by rows
    // (every thread packs all of B) or by columns (every thread packs all of A), whichever
    // packs less twice.
    let threads = rayon::current_num_threads().max(1);
    let (mpan, npan) = (m.div_ceil(MR), n.div_ceil(NR));
    let by_rows = m >= n || npan < threads; // each thread packs all k×n of B, or all m×k of A
    let parts = if by_rows { threads.min(mpan) } else { threads.min(npan) };
    let cp = SharedMut::new(c); // the parts write disjoint rows / column blocks of C
    (0..parts).into_par_iter().for_each(|t| {
        let (i0, i1, j0, j1) = if by_rows {
            ((t * mpan / parts) * MR, ((t + 1) * mpan / parts * MR).min(m), 0, n)
        } else {
            (0, m, (t * npan / parts) * NR, ((t + 1) * npan / parts * NR).min(n))
        };
        // SAFETY: part t writes only rows i0..i1 × cols j0..j1 of c; the parts are disjoint.
        unsafe { gemm_block(&a, b, cp, (i0, i1), (j0, j1), fuse, tuning) };
    });
}

thread_local! {
    static BPACK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Rows i0..i1 × cols j0..j1 of c (+)= a·b (with the bias and epilogue of `fuse`) on the
/// calling thread.
///
/// # Safety
/// No other thread may access that block of c (or of the epilogue's output) meanwhile; c holds
/// a.rows × b.cols values.
unsafe fn gemm_block(a: &View, b: BSrc, cp: SharedMut<f32>, (i0, i1): (usize, usize), (j0, j1): (usize, usize), fuse: Fuse, tuning: Tuning) {
    let (n, k) = (b.cols(), a.cols);
    let (kc_max, nc_max, prefetch) = (tuning.kc(k), tuning.nc(), tuning.prefetch());
    BPACK.with_borrow_mut(|bpack| {
        APACK.with_borrow_mut(|ap| {
            for jc in (j0..j1).step_by(nc_max) {
                let nc = nc_max.min(j1 - jc);
                let npan = nc.div_ceil(NR);
                for pc in (0..k).step_by(kc_max) {
                    let kc = kc_max.min(k - pc);
                    let bpack: &[f32] = match b {
                        BSrc::View(v) => {
                            // pack_b writes every value (zeros past n): no zero-fill first
                            let bpack = super::fastmath::scratch(bpack, npan * kc * NR);
                            for (jp, dst) in bpack.chunks_exact_mut(kc * NR).enumerate() {
                                pack_b(&v, pc, kc, jc + jp * NR, dst);
                            }
                            bpack
                        }
                        BSrc::Packed(p) => p.block(pc, kc, jc, npan),
                    };
                    let add = fuse.accumulate || pc > 0;
                    let last = pc + kc == k;
                    for ib in (i0..i1).step_by(MAX_PANELS * MR) {
                        let ib1 = (ib + MAX_PANELS * MR).min(i1);
                        let panels = (ib1 - ib).div_ceil(MR);
                        let ap = super::fastmath::scratch(ap, panels * kc * MR); // pack_a writes all (zeros past m)
                        for (pi, dst) in ap.chunks_exact_mut(kc * MR).enumerate() {
                            pack_a(a, ib + pi * MR, pc, kc, dst);
                        }
                        for jp in 0..npan {
                            let j = jc + jp * NR;
                            let bpan = &bpack[jp * kc * NR..(jp + 1) * kc * NR];
                            // The next B panel, prefetched during this one's last use (or none).
                            let next_b = bpack.get((jp + 1) * kc * NR..(jp + 2) * kc * NR).filter(|_| prefetch).map(<[f32]>::as_ptr);
                            for pi in 0..panels {
                                let i = ib + pi * MR;
                                let apan = &ap[pi * kc * MR..(pi + 1) * kc * MR];
                                let (rows, cols) = (MR.min(i1 - i), NR.min(j1 - j));
                                let bias = fuse.bias.filter(|_| !add).map_or(std::ptr::null(), |b| b[j..].as_ptr());
                                let tile = Tile { c: cp.get().wrapping_add(i * n + j), ldc: n, rows, cols, add, bias };
                                let pf = Prefetch { c: prefetch, next_b: next_b.filter(|_| pi + 1 == panels) };
                                // SAFETY: rows i..i+rows (inside i0..i1) and cols j..j+cols
                                // (inside j0..j1) are inside c; the packed panels hold kc·MR and
                                // kc·NR values, the next B panel kc·NR; AVX-512F was checked by
                                // the caller.
                                if last {
                                    // the epilogue's reads from memory, under the last kernel call
                                    fuse.epi.prefetch(i * n + j, n, rows, cols);
                                }
                                #[cfg(target_arch = "x86_64")]
                                unsafe {
                                    kernel(apan.as_ptr(), bpan.as_ptr(), kc, tile, pf)
                                };
                                if last {
                                    // SAFETY: this tile (rows × cols at i, j) is this thread's
                                    // alone, and just finished; the epilogue's buffers are m·n.
                                    unsafe { fuse.epi.apply(cp.get(), i * n + j, n, rows, cols) };
                                }
                            }
                        }
                    }
                }
            }
        });
    });
}

/// The C tile a kernel call writes: `rows × cols` at `c`, row stride `ldc`, added to or replaced
/// (then with `bias[..cols]` added, unless `bias` is null).
#[derive(Clone, Copy)]
struct Tile {
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    add: bool,
    bias: *const f32,
}

/// Software prefetch of a kernel call: the C tile's rows first, and a packed B panel (kc·NR
/// values) for the next call, one 128-byte row per k step.
#[derive(Clone, Copy)]
struct Prefetch {
    c: bool,
    next_b: Option<*const f32>,
}

/// The 14 × 32 register tile: c[rows × cols] (row stride ldc) = (c +) Σ_p a[p][·] ⊗ b[p][·].
///
/// # Safety
/// AVX-512F must be available; `a` holds kc·MR and `b` kc·NR values (and `pf.next_b`, if any,
/// kc·NR); the rows × cols tile at `t.c` must be writable and not accessed concurrently; a
/// non-null `t.bias` holds `cols` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel(a: *const f32, b: *const f32, kc: usize, t: Tile, pf: Prefetch) {
    use std::arch::x86_64::*;
    let Tile { c, ldc, rows, cols, add, bias } = t;
    if pf.c {
        // Rows of C are ldc apart: no hardware prefetcher sees them coming; they are loaded (or
        // written) after the k loop, so this hides their miss behind the whole loop.
        for r in 0..rows {
            let row = c.wrapping_add(r * ldc);
            // A row of the tile spans up to three cache lines: its first, middle and last value.
            _mm_prefetch::<_MM_HINT_T0>(row.cast());
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(cols / 2).cast());
            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(cols.max(1) - 1).cast());
        }
    }
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    // One k step: two B loads, MR broadcasts of A, 2·MR FMAs.
    macro_rules! step {
        ($p:expr) => {{
            let p = $p;
            // SAFETY: p < kc keeps every read inside the packed panels.
            let (b0, b1) = unsafe { (_mm512_loadu_ps(b.add(p * NR)), _mm512_loadu_ps(b.add(p * NR + 16))) };
            let ap = unsafe { a.add(p * MR) };
            for (r, accr) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(unsafe { *ap.add(r) });
                accr[0] = _mm512_fmadd_ps(x, b0, accr[0]);
                accr[1] = _mm512_fmadd_ps(x, b1, accr[1]);
            }
        }};
    }
    match pf.next_b {
        Some(nb) => {
            for p in 0..kc {
                // A hint only: never faults; rows p of the next panel (kc·NR values, caller).
                _mm_prefetch::<_MM_HINT_T0>(nb.wrapping_add(p * NR).cast());
                _mm_prefetch::<_MM_HINT_T0>(nb.wrapping_add(p * NR + 16).cast());
                step!(p);
            }
        }
        None => {
            for p in 0..kc {
                step!(p);
            }
        }
    }
    let lanes = |c0: usize| -> __mmask16 {
        let k = cols.saturating_sub(c0).min(16);
        if k == 16 {
            0xFFFF
        } else {
            ((1u32 << k) - 1) as __mmask16
        }
    };
    let (m0, m1) = (lanes(0), lanes(16));
    if !bias.is_null() {
        // SAFETY: the masks keep the reads inside the bias's `cols` values (caller).
        let (b0, b1) = unsafe { (_mm512_maskz_loadu_ps(m0, bias), _mm512_maskz_loadu_ps(m1, bias.wrapping_add(16))) };
        for accr in acc.iter_mut().take(rows) {
            accr[0] = _mm512_add_ps(accr[0], b0);
            accr[1] = _mm512_add_ps(accr[1], b1);
        }
    }
    for (r, accr) in acc.iter().enumerate().take(rows) {
        // SAFETY: the masks keep the accesses inside the tile's cols of row r.
        unsafe {
            let row = c.add(r * ldc);
            let v0 = if add { _mm512_add_ps(accr[0], _mm512_maskz_loadu_ps(m0, row)) } else { accr[0] };
            _mm512_mask_storeu_ps(row, m0, v0);
            if m1 != 0 {
                let row = row.add(16);
                let v1 = if add { _mm512_add_ps(accr[1], _mm512_maskz_loadu_ps(m1, row)) } else { accr[1] };
                _mm512_mask_storeu_ps(row, m1, v1);
            }
        }
    }
}
