//! The AVX-512 f32 GEMM under each of its tunings (`gemm_f32::Tuning`: `Prefetch`'s even kc split
//! up to 384, NC = 1024 and software prefetch; `Plain`'s kc = 256, NC = 2048) against the f64
//! reference, whatever CPU runs the tests: odd shapes (1, 7, 45×65, widths not multiples of 32
//! or 64), depths that split into uneven and even k blocks, parts wider than one NC block, row
//! and column thread splits, all four transpose combinations, replace and accumulate.
mod common;
use clipforge::ops::gemm_f32::{available, gemm, gemm_tuned, Tuning};
use clipforge::ops::matmul::{gemm_reference, View};
use common::*;

/// (m, k, n): k = 385 and 769 split evenly (Prefetch: 2×193, 3×257) and not (Plain: 256 + rest);
/// n = 2100 gives each of two threads a part wider than one NC block; 113 rows cut the second
/// row block of 8 panels; m < n splits by columns, m ≥ n by rows.
const SHAPES: &[(usize, usize, usize)] =
    &[(1, 1, 1), (1, 7, 3), (7, 45, 65), (45, 65, 59), (29, 385, 31), (130, 769, 257), (113, 64, 33), (200, 17, 2100), (250, 1100, 77)];

fn check(tuning: Tuning) {
    for &(m, k, n) in SHAPES {
        let (a, b, c0) = (randn(m * k, 21), randn(k * n, 22), randn(m * n, 23));
        // Per-element bound: f32 sums of k products of N(0,1) values are off by about eps·k.
        let atol = 1e-4 * (k as f32 / 256.0).max(1.0);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let av = if ta { View::row_major(&a, k, m).t() } else { View::row_major(&a, m, k) };
            let bv = if tb { View::row_major(&b, n, k).t() } else { View::row_major(&b, k, n) };
            for acc in [false, true] {
                let (mut got, mut want) = (c0.clone(), c0.clone());
                gemm_tuned(av, bv, &mut got, acc, tuning);
                gemm_reference(av, bv, &mut want, acc);
                assert_close(&format!("gemm_f32 {tuning:?} {m}x{k}x{n} t{ta}{tb} acc {acc}"), &got, &want, atol, 1e-4);
            }
        }
    }
}

#[test]
fn prefetch_tuning_matches_reference() {
    if !available() {
        eprintln!("skipped: no AVX-512F on this CPU");
        return;
    }
    check(Tuning::Prefetch);
}

#[test]
fn plain_tuning_matches_reference() {
    if !available() {
        eprintln!("skipped: no AVX-512F on this CPU");
        return;
    }
    check(Tuning::Plain);
}

/// `gemm` is `gemm_tuned` with the detected tuning: same bits.
#[test]
fn gemm_uses_the_detected_tuning() {
    if !available() {
        eprintln!("skipped: no AVX-512F on this CPU");
        return;
    }
    let (m, k, n) = (130, 769, 257);
    let (a, b) = (randn(m * k, 31), randn(k * n, 32));
    let (av, bv) = (View::row_major(&a, m, k), View::row_major(&b, n, k).t());
    let (mut x, mut y) = (vec![0.0; m * n], vec![0.0; m * n]);
    gemm(av, bv, &mut x, false);
    gemm_tuned(av, bv, &mut y, false, Tuning::detected());
    assert!(x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()), "gemm differs from gemm_tuned(detected)");
}

/// The fused Linear (`gemm_fused`: bias in the first k block's tile store, the epilogue per
/// finished tile) gives the bits of its composite twin — bias rows, an accumulating GEMM, then
/// the activation or residual add as separate passes (`elementwise::unary`, `+=`) — under both
/// tunings at the odd shapes (and an empty product, k = 0), with and without a bias, for every
/// epilogue; and stays within the f64 reference's tolerance. The output buffer starts as NaN: the fused path must never read it.
#[test]
fn fused_linear_matches_its_composite_twin() {
    use clipforge::ops::elementwise::{unary, Unary};
    use clipforge::ops::gemm_epilogue::{ActOut, Epilogue};
    use clipforge::ops::gemm_f32::gemm_fused_tuned;
    if !available() {
        eprintln!("skipped: no AVX-512F on this CPU");
        return;
    }
    for tuning in [Tuning::Prefetch, Tuning::Plain] {
        for &(m, k, n) in SHAPES.iter().chain(&[(3, 0, 5)]) {
            let (x, w, bias, res) = (randn(m * k, 41), randn(n * k, 42), randn(n, 43), randn(m * n, 44));
            let (av, bv) = (View::row_major(&x, m, k), View::row_major(&w, n, k).t());
            let atol = 1e-4 * (k as f32 / 256.0).max(1.0);
            for with_bias in [false, true] {
                let b = with_bias.then_some(&bias[..]);
                // The composite twin: bias rows, then accumulate (as `matmul::linear` did).
                let mut pre = vec![0.0; m * n];
                if let Some(b) = b {
                    pre.chunks_mut(n).for_each(|r| r.copy_from_slice(b));
                }
                gemm_tuned(av, bv, &mut pre, b.is_some(), tuning);
                let mut want_pre = vec![0.0; m * n];
                gemm_reference(av, bv, &mut want_pre, false);
                if let Some(b) = b {
                    want_pre.chunks_mut(n).for_each(|r| r.iter_mut().zip(b).for_each(|(v, b)| *v += b));
                }
                let what = |e: &str| format!("gemm_fused {tuning:?} {m}x{k}x{n} bias {with_bias} {e}");
                let same = |e: &str, got: &[f32], want: &[f32]| {
                    let bad = got.iter().zip(want).position(|(p, q)| p.to_bits() != q.to_bits());
                    assert!(bad.is_none(), "{}: element {} is {} fused, {} composite", what(e), bad.unwrap(), got[bad.unwrap()], want[bad.unwrap()]);
                };
                let mut got = vec![f32::NAN; m * n];
                gemm_fused_tuned(av, bv, &mut got, b, Epilogue::None, tuning);
                same("none", &got, &pre);
                assert_close(&what("none vs reference"), &got, &want_pre, atol, 1e-4);
                let mut sum = pre.clone();
                sum.iter_mut().zip(&res).for_each(|(v, r)| *v += r);
                let mut got = vec![f32::NAN; m * n];
                gemm_fused_tuned(av, bv, &mut got, b, Epilogue::Add { res: &res }, tuning);
                same("add", &got, &sum);
                for op in [Unary::QuickGelu, Unary::Gelu] {
                    let act = unary(op, &pre);
                    let mut got = vec![f32::NAN; m * n];
                    gemm_fused_tuned(av, bv, &mut got, b, Epilogue::Act { op, round_pre: false, out: ActOut::InPlace }, tuning);
                    same(&format!("{op:?} in place"), &got, &act);
                    let (mut got_pre, mut got_out) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
                    gemm_fused_tuned(av, bv, &mut got_pre, b, Epilogue::Act { op, round_pre: false, out: ActOut::F32(&mut got_out) }, tuning);
                    same(&format!("{op:?} pre kept"), &got_pre, &pre);
                    same(&format!("{op:?} out"), &got_out, &act);
                }
            }
        }
    }
}

/// `matmul::linear_into` takes the fused path for big products and the composite one for small
/// ones (faer): both agree with the reference, for every epilogue, writing every element of an
/// output that starts as NaN (the CPU backend hands it an unfilled buffer).
#[test]
fn linear_into_small_and_big() {
    use clipforge::ops::elementwise::{unary_reference, Unary};
    use clipforge::ops::gemm_epilogue::{ActOut, Epilogue};
    use clipforge::ops::matmul::{linear_into, linear_reference};
    for &(m, k, n) in &[(1, 1, 1), (3, 5, 7), (45, 65, 59), (130, 769, 257)] {
        let (x, w, bias, res) = (randn(m * k, 51), randn(n * k, 52), randn(n, 53), randn(m * n, 54));
        let want = linear_reference(&x, m, k, &w, n, Some(&bias));
        let atol = 1e-4 * (k as f32 / 256.0).max(1.0);
        let mut y = vec![f32::NAN; m * n];
        linear_into(&x, m, k, &w, n, Some(&bias), &mut y, Epilogue::None);
        assert_close(&format!("linear_into {m}x{k}x{n}"), &y, &want, atol, 1e-4);
        let mut y = vec![f32::NAN; m * n]; // no bias: C is replaced, never read
        linear_into(&x, m, k, &w, n, None, &mut y, Epilogue::None);
        assert_close(&format!("linear_into no bias {m}x{k}x{n}"), &y, &linear_reference(&x, m, k, &w, n, None), atol, 1e-4);
        let mut y = vec![f32::NAN; m * n];
        linear_into(&x, m, k, &w, n, Some(&bias), &mut y, Epilogue::Add { res: &res });
        let sum: Vec<f32> = want.iter().zip(&res).map(|(a, b)| a + b).collect();
        assert_close(&format!("linear_into add {m}x{k}x{n}"), &y, &sum, atol, 1e-4);
        for op in [Unary::QuickGelu, Unary::Gelu] {
            let (mut pre, mut out) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
            linear_into(&x, m, k, &w, n, Some(&bias), &mut pre, Epilogue::Act { op, round_pre: false, out: ActOut::F32(&mut out) });
            assert_close(&format!("linear_into {op:?} pre {m}x{k}x{n}"), &pre, &want, atol, 1e-4);
            assert_close(&format!("linear_into {op:?} {m}x{k}x{n}"), &out, &unary_reference(op, &pre), 1e-6, 1e-5);
        }
    }
}

/// B packed once (`PackedB`: a Linear weight frozen for inference) gives the bits of the same
/// product packing B per call, under both tunings, at the odd shapes (row and column thread
/// splits, so packed panels are read from column offsets too, and k = 0), for a transposed
/// weight and a plain row-major B, with a bias and a residual epilogue.
#[test]
fn packed_b_gives_the_bits_of_per_call_packing() {
    use clipforge::ops::gemm_epilogue::Epilogue;
    use clipforge::ops::gemm_f32::{gemm_fused_packed, gemm_fused_tuned};
    use clipforge::ops::gemm_f32_pack::PackedB;
    if !available() {
        eprintln!("skipped: no AVX-512F on this CPU");
        return;
    }
    for tuning in [Tuning::Prefetch, Tuning::Plain] {
        for &(m, k, n) in SHAPES.iter().chain(&[(3, 0, 5)]) {
            let (x, w, bias, res) = (randn(m * k, 61), randn(n * k, 62), randn(n, 63), randn(m * n, 64));
            let av = View::row_major(&x, m, k);
            for bv in [View::row_major(&w, n, k).t(), View::row_major(&w, k, n)] {
                let p = PackedB::new(bv, tuning);
                assert_eq!((p.k(), p.n(), p.tuning()), (k, n, tuning));
                for epi_add in [false, true] {
                    let epi = || if epi_add { Epilogue::Add { res: &res } } else { Epilogue::None };
                    let (mut got, mut want) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
                    gemm_fused_packed(av, &p, &mut got, Some(&bias), epi());
                    gemm_fused_tuned(av, bv, &mut want, Some(&bias), epi(), tuning);
                    let bad = got.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits());
                    assert!(bad.is_none(), "packed B {tuning:?} {m}x{k}x{n} cs {} add {epi_add}: element {bad:?} differs", bv.cs);
                }
            }
        }
    }
}

/// `matmul::linear_packed_into` (a frozen weight) gives the bits of `linear_into` on the same
/// weight, for products big enough for the packed GEMM and small ones (which fall back to w).
#[test]
fn linear_packed_into_matches_linear_into() {
    use clipforge::ops::gemm_epilogue::Epilogue;
    use clipforge::ops::gemm_f32_pack::PackedB;
    use clipforge::ops::matmul::{linear_into, linear_packed_into};
    if !available() {
        eprintln!("skipped: no AVX-512F on this CPU");
        return;
    }
    for &(m, k, n) in &[(1, 1, 1), (3, 5, 7), (45, 65, 59), (130, 769, 257), (64, 768, 2304)] {
        let (x, w, bias) = (randn(m * k, 71), randn(n * k, 72), randn(n, 73));
        let p = PackedB::linear_weight(&w, n, k);
        let (mut got, mut want) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
        linear_packed_into(&x, m, &w, &p, Some(&bias), &mut got, Epilogue::None);
        linear_into(&x, m, k, &w, n, Some(&bias), &mut want, Epilogue::None);
        let bad = got.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits());
        assert!(bad.is_none(), "linear_packed_into {m}x{k}x{n}: element {bad:?} differs from linear_into");
    }
}
