//! The bf16 GEMM (AMX, its software model, AVX-512 BF16 kernel and the portable path) against its plain reference: per
//! element |x − ref| ≤ atol + rtol·Σ|terms| on odd shapes, edges, NaN propagation, pool sizes.
use clipforge::ops::gemm_bf16::*;
use clipforge::ops::gemm_epilogue::Epilogue;
use half::bf16;

/// Uniform values in [-scale, scale) from the project's seeded generator.
struct Rng(clipforge::model::synthetic::Rng);
impl Rng {
    fn seeded(seed: u64) -> Self {
        Rng(clipforge::model::synthetic::Rng::new(seed))
    }
    fn vec(&mut self, len: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|_| (self.0.uniform() * 2.0 - 1.0) * scale).collect()
    }
}

fn r(x: f32) -> f64 {
    bf16::from_f32(x).to_f32() as f64
}

/// Σ_k |bf16(a_ik)·bf16(w_jk)|: the scale of f32 accumulation error.
fn sum_abs(a: &[f32], w: &[f32], k: usize, i: usize, j: usize) -> f64 {
    (0..k).map(|kk| (r(a[i * k + kk]) * r(w[j * k + kk])).abs()).sum()
}

/// Checks rows `rows` of c against the reference: |x − ref| ≤ ATOL + RTOL·Σ|terms|.
/// f32 accumulation of ≤ 3072 terms stays far below RTOL·Σ|terms| (worst case is
/// ~kc·eps for one kc-block plus one rounding per block; typical errors are ~1e-8).
fn check(m: usize, n: usize, k: usize, bias: bool, kernel: Kernel, rows: &[usize]) {
    const ATOL: f64 = 1e-6;
    let mut g = Rng::seeded(0x9E3779B97F4A7C15 ^ (m * 1_000_003 + n * 1009 + k) as u64);
    let a = g.vec(m * k, 1.0);
    let w = g.vec(n * k, 0.5);
    let b = g.vec(n, 1.0);
    let bias = bias.then_some(&b[..]);
    let pw = PackedBf16::from_f32(&w, n, k);
    assert_eq!((pw.n(), pw.k()), (n, k));
    let mut c = vec![f32::NAN; m * n];
    matmul_bf16_forced(&a, m, &pw, bias, &mut c, kernel);
    for &i in rows {
        // reference for one row
        let mut cref = vec![0f32; n];
        matmul_bf16_reference(&a[i * k..(i + 1) * k], 1, &w, n, k, bias, &mut cref);
        for j in 0..n {
            let (x, y) = (c[i * n + j], cref[j]);
            assert!(x.is_finite(), "non-finite at ({i},{j}) for {m}x{n}x{k}: {x}");
            let tol = ATOL + rtol(kernel) * sum_abs(&a, &w, k, i, j);
            assert!(((x - y) as f64).abs() <= tol, "({i},{j}) {m}x{n}x{k} bias={} {kernel:?}: got {x}, ref {y}, tol {tol}", bias.is_some());
        }
    }
}

fn all_rows(m: usize) -> Vec<usize> {
    (0..m).collect()
}

const SMALL: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 7, 3),
    (7, 45, 65),
    (45, 65, 59),
    (33, 177, 301),
    (1, 768, 768),
    (7, 59, 177),
    (15, 33, 2),
    (29, 64, 1000), // kp = 500: one KC_WIDE block (vdpbf16ps), two of 250 (the others)
    (45, 65, 1023), // kp = 512: the widest one-block depth (vdpbf16ps, A rows 512 apart)
    (7, 33, 1025),  // kp = 513: two kc-blocks on every kernel
    (5, 40, 1601),  // kp = 801: three kc-blocks of ≤ 384 pairs (vdpbf16ps), four of ≤ 256 (the others)
];

const KERNELS: [Kernel; 8] =
    [Kernel::Auto, Kernel::Amx, Kernel::AmxSoft, Kernel::Avx512Bf16, Kernel::Avx512Fma, Kernel::Avx512Fp16, Kernel::Portable, Kernel::PortableBaseline];

/// The relative tolerance (of Σ|terms|) of a kernel: f32 accumulation 1e-5; the AVX512-FP16
/// kernel's f16 partial sums of 128 products 2e-3 (each of a lane's ≤ 128 roundings is ≤ 2⁻¹² of
/// its partial, so ≤ 3.1e-2 in the worst case; measured up to ≈ 8.5e-4 on random 333-deep products), half the
/// bf16 input rounding's own bound (2·2⁻⁹ ≈ 3.9e-3), and above one dropped term only past k ≈ 500.
fn rtol(kernel: Kernel) -> f64 {
    if resolve(kernel) == Kernel::Avx512Fp16 {
        2e-3
    } else {
        1e-5
    }
}

#[test]
fn small_shapes_all_kernels() {
    eprintln!("avx512_bf16 detected: {}", has_avx512_bf16());
    for kernel in KERNELS {
        for &(m, n, k) in SMALL {
            for bias in [false, true] {
                check(m, n, k, bias, kernel, &all_rows(m));
            }
        }
    }
}

#[test]
fn vit_shape_partial_check() {
    // Rows spread over all row blocks, including the last (edge) panel.
    let rows = [0, 1, 13, 14, 111, 112, 500, 799, 1203, 1596, 1599];
    // (the AMX software model is too slow for this size; tests/gemm_amx.rs covers its blocking)
    for kernel in KERNELS.into_iter().filter(|&k| k != Kernel::AmxSoft) {
        check(1600, 768, 768, true, kernel, &rows);
    }
    check(100, 512, 2048, false, Kernel::Auto, &[0, 50, 99]);
    // ViT-L's width: k = 1024 is one kc-block on vdpbf16ps
    check(514, 1024, 1024, true, Kernel::Auto, &[0, 13, 14, 257, 500, 513]);
}

#[test]
fn avx512_and_portable_agree() {
    if !has_avx512_bf16() {
        eprintln!("no avx512_bf16 on this CPU: only the portable path is exercised");
        return;
    }
    let (m, n, k) = (37, 100, 333);
    let mut g = Rng::seeded(7);
    let (a, w) = (g.vec(m * k, 1.0), g.vec(n * k, 1.0));
    let pw = PackedBf16::from_f32(&w, n, k);
    let (mut c1, mut c2) = (vec![0f32; m * n], vec![0f32; m * n]);
    matmul_bf16_forced(&a, m, &pw, None, &mut c1, Kernel::Auto);
    matmul_bf16_forced(&a, m, &pw, None, &mut c2, Kernel::PortableBaseline);
    for (i, (x, y)) in c1.iter().zip(&c2).enumerate() {
        let tol = 2.0 * rtol(Kernel::Auto) * sum_abs(&a, &w, k, i / n, i % n);
        assert!(((x - y) as f64).abs() <= tol, "{i}: {x} vs {y}");
    }
}

/// Against the exact f64 product of the *unrounded* inputs the only large error is
/// bf16 input rounding: |bf16(a)bf16(w) − aw| ≤ (2·2⁻⁹ + 2⁻¹⁸)|aw| per term.
#[test]
fn close_to_exact_f64_product() {
    for kernel in KERNELS {
        let (m, n, k) = (19, 77, 515);
        let mut g = Rng::seeded(42);
        let (a, w, b) = (g.vec(m * k, 3.0), g.vec(n * k, 0.1), g.vec(n, 1.0));
        let pw = PackedBf16::from_f32(&w, n, k);
        let mut c = vec![0f32; m * n];
        matmul_bf16_forced(&a, m, &pw, Some(&b), &mut c, kernel);
        let mut sq = 0.0;
        for i in 0..m {
            for j in 0..n {
                let (mut exact, mut sabs) = (b[j] as f64, 0.0);
                for kk in 0..k {
                    let t = a[i * k + kk] as f64 * w[j * k + kk] as f64;
                    exact += t;
                    sabs += t.abs();
                }
                let err = (c[i * n + j] as f64 - exact).abs();
                let bound = (2.0f64.powi(-8) + 2.0f64.powi(-18) + rtol(kernel)) * sabs + 1e-6;
                assert!(err <= bound, "({i},{j}): err {err} > bound {bound}");
                sq += (err / sabs).powi(2);
            }
        }
        // Rounding errors are random: the RMS relative error is far below the worst case.
        let rms = (sq / (m * n) as f64).sqrt();
        assert!(rms < 2.0f64.powi(-11), "rms relative error {rms}");
    }
}

#[test]
fn from_bf16_matches_from_f32_and_nonfinite_inputs() {
    let (n, k) = (45, 65);
    let mut g = Rng::seeded(3);
    let w = g.vec(n * k, 1.0);
    let wb: Vec<bf16> = w.iter().map(|&x| bf16::from_f32(x)).collect();
    let (p1, p2) = (PackedBf16::from_f32(&w, n, k), PackedBf16::from_bf16(&wb, n, k));
    for j in 0..n {
        for kk in 0..k {
            assert_eq!(p1.get(j, kk), wb[j * k + kk]);
            assert_eq!(p2.get(j, kk), wb[j * k + kk]);
        }
    }
    // An Inf/NaN in the input must show up in the output (no silent flush).
    let m = 3;
    let mut a = g.vec(m * k, 1.0);
    a[k + 5] = f32::NAN;
    for kernel in KERNELS {
        let mut c = vec![0f32; m * n];
        matmul_bf16_forced(&a, m, &p1, None, &mut c, kernel);
        assert!(c[..n].iter().chain(&c[2 * n..]).all(|x| x.is_finite()));
        assert!(c[n..2 * n].iter().all(|x| x.is_nan()));
    }
}

#[test]
fn degenerate_sizes() {
    let w = PackedBf16::from_f32(&[], 3, 0);
    let mut c = vec![1f32; 6];
    matmul_bf16(&[], 2, &w, Some(&[1.0, 2.0, 3.0]), &mut c);
    assert_eq!(c, [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    matmul_bf16(&[], 2, &w, None, &mut c);
    assert_eq!(c, [0.0; 6]);
    let w = PackedBf16::from_f32(&[1.0; 8], 2, 4);
    matmul_bf16(&[], 0, &w, None, &mut []);
}

/// The work split depends on the rayon pool size: check 1, 2 and 3 threads, including
/// many row blocks (1 thread, m = 2000 → capped block size) and column splitting.
#[test]
fn pool_sizes() {
    for threads in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            check(2000, 40, 70, true, Kernel::Auto, &[0, 13, 14, 1000, 1791, 1792, 1999]);
            check(20, 300, 33, true, Kernel::Auto, &all_rows(20));
            check(3, 1000, 17, false, Kernel::Portable, &all_rows(3));
        });
    }
}

mod epi;

/// The fused epilogues (activation with the pre-activation's bf16 rounding, residual add; bf16
/// A) on every kernel against the unfused composite, bit for bit: m = 1, 7, 45, widths not
/// divisible by 64 (7, 45, 65, 100, 177), odd k, k = 0, several kc-blocks.
#[test]
fn fused_epilogues_all_kernels() {
    const SHAPES: &[(usize, usize, usize)] =
        &[(1, 1, 1), (3, 7, 0), (1, 7, 3), (7, 45, 65), (45, 65, 59), (45, 65, 64), (33, 177, 301), (7, 100, 1000), (45, 65, 1023), (29, 64, 1100)];
    for kernel in KERNELS {
        for &(m, n, k) in SHAPES {
            epi::check_epilogues(m, n, k, kernel);
        }
    }
    // A ViT-B/32 MLP block's first rows (several work items, row and column edges).
    for kernel in [Kernel::Auto, Kernel::Avx512Bf16, Kernel::Avx512Fma, Kernel::Avx512Fp16, Kernel::Portable] {
        epi::check_epilogues(100, 3072, 768, kernel);
    }
}

/// The CPU backend's `linear_act` / `linear_add` with bf16 weights (the fused epilogues, the
/// activation kept in bf16 and read back by the next Linear) against the composite of its
/// unfused ops: `linear`, the bf16 rounding, `bias_act`, `axpy`. Bit for bit.
#[test]
fn cpu_backend_fused_ops_match_unfused() {
    use clipforge::backend::cpu::Cpu;
    use clipforge::backend::{Act, Ops};
    use clipforge::{DType, Tensor};
    for &(m, n, k) in &[(1, 7, 3), (7, 45, 65), (45, 65, 59), (50, 200, 96)] {
        let mut g = Rng::seeded((m * 31 + n * 7 + k) as u64);
        let t = |v: Vec<f32>| Tensor::from_vec(v.clone(), &[v.len()]).unwrap();
        let (x, b, b2) = (t(g.vec(m * k, 2.0)), t(g.vec(n, 1.0)), t(g.vec(k, 1.0)));
        let w1 = Cpu.weight(t(g.vec(n * k, 0.5)), n, k, DType::BF16).unwrap();
        let w2 = Cpu.weight(t(g.vec(k * n, 0.5)), k, n, DType::BF16).unwrap();
        for act in [Act::QuickGelu, Act::Gelu] {
            let (out, pre) = Cpu.linear_act(&x, &w1, &b, m, act, true).unwrap();
            let (out2, none) = Cpu.linear_act(&x, &w1, &b, m, act, false).unwrap();
            assert!(none.is_none());
            assert_eq!(out2.dtype(), DType::BF16, "the inference activation output is kept in bf16");
            // Unfused: Linear with bias, the bf16 rounding, then the activation with a zero bias.
            let u = Cpu.linear(&x, &w1, Some(&b), m).unwrap().to_vec_f32();
            let u: Vec<f32> = u.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
            let (want, want_pre) = Cpu.bias_act(t(u), &t(vec![0.0; n]), m, n, act, true).unwrap();
            let want16: Vec<u32> = want.to_vec_f32().iter().map(|&v| bf16::from_f32(v).to_f32().to_bits()).collect();
            let bits = |t: &Tensor| t.to_vec_f32().iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
            assert_eq!(bits(&out), bits(&want), "{m}x{n}x{k} {act:?}: activation (training: f32)");
            assert_eq!(bits(&out2), want16, "{m}x{n}x{k} {act:?}: activation without pre");
            assert_eq!(bits(pre.as_ref().unwrap()), bits(want_pre.as_ref().unwrap()), "{m}x{n}x{k} {act:?}: pre-activation");
            // The bf16 activation as the next Linear's input, with the residual add fused,
            // against the f32 copy of the same values through linear + axpy.
            let res2 = t(g.vec(m * k, 3.0));
            let y = Cpu.linear_add(&out2, &w2, &b2, m, &res2).unwrap();
            let mut want_y = Cpu.copy(&res2, m * k).unwrap();
            Cpu.axpy(&mut want_y, &Cpu.linear(&t(out2.to_vec_f32()), &w2, Some(&b2), m).unwrap(), 1.0, m * k).unwrap();
            assert_eq!(bits(&y), bits(&want_y), "{m}x{n}x{k} {act:?}: linear_add");
            // ... and the f32 (unrounded) activation gives the same: the GEMM rounds it to those values.
            assert_eq!(bits(&Cpu.linear_add(&out, &w2, &b2, m, &res2).unwrap()), bits(&y), "{m}x{n}x{k} {act:?}: linear_add of f32");
        }
    }
}

/// Every kernel overwrites all of C, at shapes with many work items and row / column edges: the
/// CPU backend hands the bf16 Linears an unfilled output buffer (`fastmath::written_by`).
#[test]
fn every_element_of_c_written_all_kernels() {
    let mut g = Rng::seeded(77);
    for &(m, n, k) in &[(200, 2304, 768), (1601, 77, 100), (3, 3072, 64)] {
        let (a, w, b) = (g.vec(m * k, 1.0), g.vec(n * k, 0.5), g.vec(n, 1.0));
        let pw = PackedBf16::from_f32(&w, n, k);
        for kernel in KERNELS {
            for bias in [None, Some(&b[..])] {
                let mut c = vec![f32::NAN; m * n];
                matmul_bf16_forced(&a, m, &pw, bias, &mut c, kernel);
                let bad = c.iter().position(|x| !x.is_finite());
                assert!(bad.is_none(), "{kernel:?} {m}x{n}x{k} bias {}: element {bad:?} not written", bias.is_some());
            }
        }
    }
}

/// The AVX512-FP16 kernel scales A (per row block) and W by powers of two into f16's range:
/// values that would overflow f16 (|a·w| ≫ 65504) or sink into its subnormals (≪ 6·10⁻⁵) come out
/// as exactly as values near 1, and a row block with ∞ takes the f32-FMA kernel (∞ and NaN as f32).
#[test]
fn fp16_kernel_scales_extreme_magnitudes() {
    eprintln!("Auto resolves to {:?}", resolve(Kernel::Auto));
    let (m, n, k) = (30, 70, 333);
    for (sa, sw) in [(1e4f32, 50.0f32), (3e-4, 1e-3), (1e-20, 1e-18), (1e18, 1e15), (1.0, 0.02)] {
        let mut g = Rng::seeded(sa.to_bits() as u64);
        let (a, w) = (g.vec(m * k, sa), g.vec(n * k, sw));
        let pw = PackedBf16::from_f32(&w, n, k);
        let mut c = vec![f32::NAN; m * n];
        matmul_bf16_forced(&a, m, &pw, None, &mut c, Kernel::Avx512Fp16);
        for i in 0..m {
            let mut cref = vec![0f32; n];
            matmul_bf16_reference(&a[i * k..(i + 1) * k], 1, &w, n, k, None, &mut cref);
            for j in 0..n {
                let (x, y) = (c[i * n + j] as f64, cref[j] as f64);
                let tol = rtol(Kernel::Avx512Fp16) * sum_abs(&a, &w, k, i, j) + 1e-30;
                assert!(x.is_finite() && (x - y).abs() <= tol, "scales {sa}, {sw} ({i},{j}): {x} vs {y} (tol {tol})");
            }
        }
    }
    // the largest partial sums the scaling allows: every a and w just below a power of two (the
    // top of their scaled ranges) and of one sign, so each lane's f16 partial of a whole chunk
    // reaches its bound (< 2^15, f16's largest finite is 65504): nothing infinite, and inside the
    // worst case of the f16 roundings (128 of ≤ 2⁻¹² of the partial: equal terms round one way —
    // measured 6.9e-3)
    for sign in [1.0f32, -1.0] {
        let k = 1000;
        let (a, w) = (vec![1.9921875f32; 3 * k], vec![sign * 0.99609375f32; 5 * k]);
        let pw = PackedBf16::from_f32(&w, 5, k);
        let mut c = vec![0f32; 15];
        matmul_bf16_forced(&a, 3, &pw, None, &mut c, Kernel::Avx512Fp16);
        let exact = sign as f64 * 1.9921875 * 0.99609375 * k as f64;
        for x in c {
            assert!(x.is_finite() && ((x as f64 - exact) / exact).abs() <= 128.0 / 4096.0, "{x} vs {exact}");
        }
    }
    // ∞ in row 17 (second row block of 14): that row is ∞/NaN, the rest finite and accurate
    let mut g = Rng::seeded(5);
    let (mut a, w) = (g.vec(m * k, 1.0), g.vec(n * k, 1.0));
    a[17 * k + 3] = f32::INFINITY;
    let pw = PackedBf16::from_f32(&w, n, k);
    let mut c = vec![0f32; m * n];
    matmul_bf16_forced(&a, m, &pw, None, &mut c, Kernel::Avx512Fp16);
    for i in 0..m {
        assert_eq!(c[i * n..(i + 1) * n].iter().all(|x| x.is_finite()), i != 17, "row {i}");
    }
    // the same from a bf16 A (its own max pass), with a NaN in row 2 as well
    let mut a16: Vec<bf16> = a.iter().map(|&x| bf16::from_f32(x)).collect();
    a16[2 * k + 300] = bf16::NAN;
    matmul_bf16_fused(&a16, m, &pw, None, &mut c, Epilogue::None, Kernel::Avx512Fp16);
    for i in 0..m {
        assert_eq!(c[i * n..(i + 1) * n].iter().all(|x| x.is_finite()), i != 17 && i != 2, "bf16 A, row {i}");
    }
    // NaN in a weight (no f16 twin: the FMA kernel): that output column is NaN, the rest finite
    let (a, mut w) = (g.vec(m * k, 1.0), g.vec(n * k, 1.0));
    w[40 * k + 100] = f32::NAN;
    let pw = PackedBf16::from_f32(&w, n, k);
    matmul_bf16_forced(&a, m, &pw, None, &mut c, Kernel::Avx512Fp16);
    for (e, x) in c.iter().enumerate() {
        assert_eq!(x.is_nan(), e % n == 40, "element ({}, {})", e / n, e % n);
    }
}
