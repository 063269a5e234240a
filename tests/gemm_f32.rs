//! The AVX-512 f32 GEMM under each of its tunings (`gemm_f32::Tuning`: Intel's even kc split up
//! to 384, NC = 1024 and software prefetch; the generic kc = 256, NC = 2048) against the f64
//! reference, whatever CPU runs the tests: odd shapes (1, 7, 45×65, widths not multiples of 32
//! or 64), depths that split into uneven and even k blocks, parts wider than one NC block, row
//! and column thread splits, all four transpose combinations, replace and accumulate.
mod common;
use clipforge::ops::gemm_f32::{available, gemm, gemm_tuned, Tuning};
use clipforge::ops::matmul::{gemm_reference, View};
use common::*;

/// (m, k, n): k = 385 and 769 split evenly (Intel: 2×193, 3×257) and not (generic: 256 + rest);
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
fn intel_tuning_matches_reference() {
    if !available() {
        eprintln!("skipped: no AVX-512F on this CPU");
        return;
    }
    check(Tuning::Intel);
}

#[test]
fn generic_tuning_matches_reference() {
    if !available() {
        eprintln!("skipped: no AVX-512F on this CPU");
        return;
    }
    check(Tuning::Generic);
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
