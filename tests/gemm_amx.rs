//! The AMX bf16 GEMM: its blocking, packing and edges through the software model of the tile unit
//! (every machine), the real tile instructions where CPUID and Linux grant AMX, and every lower path
//! (`cpu_path::force_path`, as `CLIPFORGE_CPU_GEMM` does) against the f64 reference of the
//! bf16-rounded inputs. Each test prints which paths ran. On CPUs without AMX, the real tile
//! instructions run under an emulator in tests/gemm_amx_trap.rs.
//!
//! Tolerance, per element: |x − ref| ≤ ATOL + RTOL·|ref| with ATOL = 1e-4, RTOL = 1e-5. The
//! inputs are uniform in [−1, 1) (A) and [−0.5, 0.5) (W), so a term is ≤ 0.5 and a lost, doubled or
//! misplaced term moves a result by ~0.1; f32 accumulation of ≤ 1100 such terms stays below ~1e-5.
use clipforge::ops::cpu_path::{self, GemmPath};
use clipforge::ops::gemm_amx::{SoftTiles, TileOps};
use clipforge::ops::gemm_bf16::*;
use half::bf16;

const ATOL: f64 = 1e-4;
const RTOL: f64 = 1e-5;

fn rng_vec(seed: u64, len: usize, scale: f32) -> Vec<f32> {
    let mut g = clipforge::model::synthetic::Rng::new(seed);
    (0..len).map(|_| (g.uniform() * 2.0 - 1.0) * scale).collect()
}

/// Runs `kernel` at m×n×k (with and without bias) and checks every element.
fn check(m: usize, n: usize, k: usize, kernel: Kernel) {
    let seed = (m * 1_000_003 + n * 1009 + k) as u64;
    let (a, w, b) = (rng_vec(seed, m * k, 1.0), rng_vec(seed + 1, n * k, 0.5), rng_vec(seed + 2, n, 1.0));
    let pw = PackedBf16::from_f32(&w, n, k);
    for bias in [None, Some(&b[..])] {
        let mut c = vec![f32::NAN; m * n];
        matmul_bf16_forced(&a, m, &pw, bias, &mut c, kernel);
        let mut cref = vec![0f32; m * n];
        matmul_bf16_reference(&a, m, &w, n, k, bias, &mut cref);
        // the AVX512-FP16 kernel (Intel without AMX) sums 32 products in f16 first: its bound
        // adds 2e-3·Σ|terms| (tests/gemm_bf16.rs)
        let f16 = resolve(kernel) == Kernel::Avx512Fp16;
        let r = |x: f32| bf16::from_f32(x).to_f32() as f64;
        let sum_abs = |i: usize, j: usize| (0..k).map(|kk| (r(a[i * k + kk]) * r(w[j * k + kk])).abs()).sum::<f64>();
        for (i, (x, y)) in c.iter().zip(&cref).enumerate() {
            let tol = ATOL + RTOL * (*y as f64).abs() + if f16 { 2e-3 * sum_abs(i / n, i % n) } else { 0.0 };
            assert!(((x - y) as f64).abs() <= tol, "{kernel:?} {m}x{n}x{k} bias={}: ({}, {}) got {x}, ref {y}", bias.is_some(), i / n, i % n);
        }
    }
}

/// Odd shapes: m = 1 and 7 (one partial 16-row tile), 45×65 (partial second tile, n not a
/// multiple of 16), k not a multiple of 32 (partial last k tile) and odd k (zero `hi` half),
/// several kc-blocks (k > 512), and more 32-row panels than one work item holds.
const SHAPES: &[(usize, usize, usize)] =
    &[(1, 1, 1), (1, 7, 3), (7, 45, 65), (45, 65, 59), (45, 65, 64), (16, 16, 32), (33, 17, 31), (32, 48, 1100), (3, 100, 777), (300, 33, 40)];

#[test]
fn software_model_odd_shapes() {
    eprintln!("path: AMX blocking/packing/edges on the software tile model");
    for &(m, n, k) in SHAPES {
        check(m, n, k, Kernel::AmxSoft);
    }
}

#[test]
fn software_model_pool_sizes() {
    // The work split depends on the pool: many items, column splitting, one thread.
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            check(70, 200, 45, Kernel::AmxSoft);
            check(2, 300, 33, Kernel::AmxSoft);
        });
    }
}

#[test]
fn real_amx_when_available() {
    if cpu_path::detected() < GemmPath::Amx {
        eprintln!("path: real AMX NOT run (CPUID amx_bf16 = {}; no usable AMX on this machine)", cpu_path::cpu_has_amx_bf16());
        return;
    }
    eprintln!("path: real AMX tiles (tileloadd/tdpbf16ps/tilestored)");
    for &(m, n, k) in SHAPES {
        check(m, n, k, Kernel::Amx);
    }
    check(200, 768, 768, Kernel::Amx);
    // The hardware and the model agree to the same tolerance.
    let (m, n, k) = (45, 65, 333);
    let (a, w) = (rng_vec(5, m * k, 1.0), rng_vec(6, n * k, 0.5));
    let pw = PackedBf16::from_f32(&w, n, k);
    let (mut c1, mut c2) = (vec![0f32; m * n], vec![0f32; m * n]);
    matmul_bf16_forced(&a, m, &pw, None, &mut c1, Kernel::Amx);
    matmul_bf16_forced(&a, m, &pw, None, &mut c2, Kernel::AmxSoft);
    for (x, y) in c1.iter().zip(&c2) {
        assert!(((x - y) as f64).abs() <= ATOL + RTOL * (*y as f64).abs(), "hardware {x} vs model {y}");
    }
}

/// Every path this machine can run, selected the way `CLIPFORGE_CPU_GEMM` selects it, through the
/// public entry point (`Kernel::Auto`).
#[test]
fn every_forced_path() {
    eprintln!("detected: {}", cpu_path::detected().name());
    for cap in [GemmPath::Amx, GemmPath::Avx512Bf16, GemmPath::Avx512, GemmPath::Scalar] {
        cpu_path::force_path(Some(cap));
        let ran = cpu_path::selected();
        assert!(ran <= cap);
        eprintln!("forced {} → ran {}", cap.name(), ran.name());
        for &(m, n, k) in &SHAPES[..7] {
            check(m, n, k, Kernel::Auto);
            epi::check_epilogues(m, n, k, Kernel::Auto);
        }
        check(100, 96, 600, Kernel::Auto);
    }
    cpu_path::force_path(None);
    assert_eq!(GemmPath::parse(" AVX512bf16"), Some(GemmPath::Avx512Bf16));
    assert_eq!(GemmPath::parse("sse"), None);
}

/// The padded panel layout: `kps` is a multiple of 16 and the padding is zero (a B tile past k
/// must contribute nothing, even against Inf/NaN in A's padding-free rows).
#[test]
fn packed_weights_tile_padding() {
    for k in [1, 31, 32, 33, 64, 65] {
        let p = PackedBf16::from_f32(&vec![1.0; 5 * k], 5, k);
        assert_eq!(p.kps() % 16, 0);
        assert!(p.kps() >= k.div_ceil(2) && p.kps() < k.div_ceil(2) + 16);
    }
    // NaN in A propagates to its row only, through the AMX kernel.
    let (m, n, k) = (18, 20, 37);
    let mut a = rng_vec(1, m * k, 1.0);
    a[17 * k + 36] = f32::NAN;
    let pw = PackedBf16::from_f32(&rng_vec(2, n * k, 1.0), n, k);
    let mut c = vec![0f32; m * n];
    matmul_bf16_forced(&a, m, &pw, None, &mut c, Kernel::AmxSoft);
    assert!(c[..17 * n].iter().all(|x| x.is_finite()));
    assert!(c[17 * n..].iter().all(|x| x.is_nan()));
}

fn bits(x: f32) -> u16 {
    bf16::from_f32(x).to_bits()
}

/// One model `tdpbf16ps` on a 16×16 C: A and B entries as (index, bf16 bits), A `[16][32]` bf16
/// (row, pair·2 + half), B `[16][32]` bf16 (pair-row, column·2 + half); C starts as `c0`.
fn dp1(a_set: &[(usize, u16)], b_set: &[(usize, u16)], c0: &[(usize, f32)]) -> [f32; 256] {
    let (mut a, mut b, mut c) = ([0u16; 512], [0u16; 512], [0f32; 256]);
    a_set.iter().for_each(|&(i, v)| a[i] = v);
    b_set.iter().for_each(|&(i, v)| b[i] = v);
    c0.iter().for_each(|&(i, v)| c[i] = v);
    let mut t = SoftTiles::default();
    // SAFETY: the model has no hardware requirement; every tile is 16 rows × 64 bytes in bounds.
    unsafe {
        t.configure();
        t.load::<4>(a.as_ptr().cast(), 64);
        t.load::<6>(b.as_ptr().cast(), 64);
        t.load::<0>(c.as_ptr().cast(), 64);
        t.dp::<0, 4, 6>();
        t.store::<0>(c.as_mut_ptr().cast(), 64);
        t.release();
    }
    c
}

/// The model's `tdpbf16ps` itself: placement, pair order with one rounding per accumulation,
/// DAZ of bf16 inputs, FTZ of the f32 result.
#[test]
fn software_tdpbf16ps_semantics() {
    // A row 3, pair 5 = (2, 3); B pair-row 5, column 7 = (5, 7): C[3][7] = 1 + 2·5 + 3·7 = 32, and
    // nothing else changes.
    let c = dp1(&[(3 * 32 + 10, bits(2.0)), (3 * 32 + 11, bits(3.0))], &[(5 * 32 + 14, bits(5.0)), (5 * 32 + 15, bits(7.0))], &[(3 * 16 + 7, 1.0)]);
    assert_eq!(c[3 * 16 + 7], 32.0);
    assert_eq!(c.iter().filter(|&&x| x != 0.0).count(), 1);
    // One rounding per accumulation, lo then hi: C = 1, products 2⁻²⁴ and 2⁻²⁴; each step
    // 1 + 2⁻²⁴ rounds to 1 (ties to even), so C stays 1 (summing the pair first would give 1 + 2⁻²³).
    let e = bits(2f32.powi(-12));
    let c = dp1(&[(0, e), (1, e)], &[(0, e), (1, e)], &[(0, 1.0)]);
    assert_eq!(c[0], 1.0);
    // The same products onto C = 0 accumulate exactly.
    let c = dp1(&[(0, e), (1, e)], &[(0, e), (1, e)], &[]);
    assert_eq!(c[0], 2f32.powi(-23));
    // DAZ: a bf16 denormal (2⁻¹³³) times 2¹⁰⁰ would be 2⁻³³; read as zero it gives 0.
    let c = dp1(&[(0, 0x0001)], &[(0, bits(2f32.powi(100)))], &[]);
    assert_eq!(c[0], 0.0);
    // FTZ: ±2⁻⁶⁴·2⁻⁷⁰ = ±2⁻¹³⁴ is an f32 denormal and is flushed to a zero (the −0 of the first
    // step becomes +0 in the second, hi-half step: −0 + 0·0 = +0).
    let c = dp1(&[(0, bits(2f32.powi(-64))), (32, bits(-(2f32.powi(-64))))], &[(0, bits(2f32.powi(-70)))], &[]);
    assert_eq!((c[0].to_bits(), c[16].to_bits()), (0, 0));
    // Normal inputs give normal results: 2⁻⁶⁰·2⁻⁶⁰ = 2⁻¹²⁰.
    let c = dp1(&[(0, bits(2f32.powi(-60)))], &[(0, bits(2f32.powi(-60)))], &[]);
    assert_eq!(c[0], 2f32.powi(-120));
}

mod epi;

/// The fused epilogues through the AMX kernel's blocking and tile stores (software model), against
/// the unfused composite, bit for bit (the forced lower paths: `every_forced_path`).
#[test]
fn software_model_fused_epilogues() {
    for &(m, n, k) in SHAPES {
        epi::check_epilogues(m, n, k, Kernel::AmxSoft);
    }
    if cpu_path::detected() >= GemmPath::Amx {
        eprintln!("path: fused epilogues on real AMX tiles");
        for &(m, n, k) in SHAPES {
            epi::check_epilogues(m, n, k, Kernel::Amx);
        }
    }
}
