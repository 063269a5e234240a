//! The op table: every CPU op's fast path against its plain reference on odd shapes (1, 7,
//! 45×65, head dim 59, widths not divisible by 64), and every fused op against its composite
//! twin built from primitive tensor ops.
mod common;
use clipforge::ops::attention::{attention, attention_portable, attention_reference, AttnShape};
use clipforge::ops::elementwise::{unary, unary_reference, Unary};
use clipforge::ops::layernorm::{layer_norm, layer_norm_reference};
use clipforge::ops::matmul::{gemm, gemm_reference, linear, linear_reference, View};
use clipforge::ops::patch_embed::{patch_embed, patch_embed_reference, PatchShape};
use clipforge::ops::reduce::{col_sums, reduce, reduce_reference, Reduce};
use clipforge::ops::softmax::{softmax, softmax_reference};
use clipforge::Tensor;
use common::*;

#[test]
fn matmul_fast_matches_reference() {
    for &(m, k, n) in &[(1, 1, 1), (1, 7, 3), (7, 45, 65), (45, 65, 59), (33, 177, 301), (130, 300, 257)] {
        let a = randn(m * k, 1);
        let b = randn(k * n, 2);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let av = if ta { View::row_major(&a, k, m).t() } else { View::row_major(&a, m, k) };
            let bv = if tb { View::row_major(&b, n, k).t() } else { View::row_major(&b, k, n) };
            let (mut got, mut want) = (vec![0.0; m * n], vec![0.0; m * n]);
            gemm(av, bv, &mut got, false);
            gemm_reference(av, bv, &mut want, false);
            assert_close(&format!("gemm {m}x{k}x{n} t{ta}{tb}"), &got, &want, 1e-4, 1e-4);
        }
    }
}

/// The AVX-512 GEMM directly (matmul::gemm picks it only for big products): odd shapes that
/// cut every register tile and kc block, all four transpose combinations, replace and add.
#[test]
fn gemm_f32_matches_reference() {
    if !clipforge::ops::gemm_f32::available() {
        eprintln!("skipped: no AVX-512F on this CPU");
        return;
    }
    for &(m, k, n) in &[(1, 1, 1), (7, 45, 65), (45, 65, 59), (15, 257, 33), (130, 300, 257), (29, 513, 31), (200, 17, 2100)] {
        let (a, b, c0) = (randn(m * k, 11), randn(k * n, 12), randn(m * n, 13));
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let av = if ta { View::row_major(&a, k, m).t() } else { View::row_major(&a, m, k) };
            let bv = if tb { View::row_major(&b, n, k).t() } else { View::row_major(&b, k, n) };
            for acc in [false, true] {
                let (mut got, mut want) = (c0.clone(), c0.clone());
                clipforge::ops::gemm_f32::gemm(av, bv, &mut got, acc);
                gemm_reference(av, bv, &mut want, acc);
                assert_close(&format!("gemm_f32 {m}x{k}x{n} t{ta}{tb} acc {acc}"), &got, &want, 1e-4, 1e-4);
            }
        }
    }
}

#[test]
fn linear_fast_matches_reference() {
    for &(m, k, n) in &[(1, 1, 1), (7, 65, 45), (50, 59, 177), (77, 301, 33)] {
        let (x, w, b) = (randn(m * k, 3), randn(n * k, 4), randn(n, 5));
        for bias in [None, Some(&b[..])] {
            let got = linear(&x, m, k, &w, n, bias);
            let want = linear_reference(&x, m, k, &w, n, bias);
            assert_close(&format!("linear {m}x{k}x{n} bias {}", bias.is_some()), &got, &want, 1e-4, 1e-4);
        }
    }
}

#[test]
fn unary_fast_matches_reference() {
    let x: Vec<f32> = randn(45 * 65, 6).iter().map(|v| v * 6.0).collect();
    let mut edge = vec![0.0, -0.0, 1e-30, -1e-30, 80.0, -80.0, 88.0, -87.0, 20.0, -20.0];
    edge.extend_from_slice(&x);
    for op in [Unary::QuickGelu, Unary::Gelu, Unary::Exp, Unary::Neg] {
        let xs: Vec<f32> = if op == Unary::Exp { edge.iter().map(|v| v.clamp(-80.0, 80.0)).collect() } else { edge.clone() };
        assert_close(&format!("{op:?}"), &unary(op, &xs), &unary_reference(op, &xs), 1e-6, 3e-6);
    }
}

#[test]
fn reduce_fast_matches_reference() {
    for &(rows, n) in &[(1, 1), (7, 1), (45, 65), (3, 1000), (1, 4099)] {
        let x = randn(rows * n, 7);
        for op in [Reduce::Sum, Reduce::Mean, Reduce::Max, Reduce::Min] {
            assert_close(&format!("{op:?} {rows}x{n}"), &reduce(op, &x, n), &reduce_reference(op, &x, n), 1e-4, 1e-5);
        }
    }
}

/// Bias gradients: the parallel column split must give the bits of one pass adding rows in order.
#[test]
fn col_sums_adds_rows_in_order() {
    for &(m, n) in &[(1, 1), (7, 3), (45, 65), (300, 257), (1984, 33), (1984, 1536), (3, 70000)] {
        let g = randn(m * n, 5);
        let mut want = vec![0f32; n];
        for row in g.chunks_exact(n) {
            want.iter_mut().zip(row).for_each(|(a, b)| *a += b);
        }
        let got = col_sums(&g, n);
        assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "col_sums {m}x{n} differs from the in-order sum");
    }
    assert!(col_sums(&[], 0).is_empty());
}

#[test]
fn softmax_fast_matches_reference() {
    let mut x: Vec<f32> = randn(45 * 65, 8).iter().map(|v| v * 10.0).collect();
    x[3] = f32::NEG_INFINITY;
    x[65..130].fill(f32::NEG_INFINITY); // a fully masked row gives zeros
    assert_close("softmax 45x65", &softmax(&x, 65), &softmax_reference(&x, 65), 1e-6, 1e-5);
    let y = randn(7, 9);
    assert_close("softmax 1x7", &softmax(&y, 7), &softmax_reference(&y, 7), 1e-6, 1e-5);
}

#[test]
fn layer_norm_fast_matches_reference() {
    for &(rows, n) in &[(1, 1), (7, 59), (45, 65), (50, 768), (3, 1000)] {
        let x: Vec<f32> = randn(rows * n, 10).iter().map(|v| v * 3.0 + 1.5).collect();
        let (g, b) = (randn(n, 11), randn(n, 12));
        assert_close(&format!("layernorm {rows}x{n}"), &layer_norm(&x, n, &g, &b, 1e-5), &layer_norm_reference(&x, n, &g, &b, 1e-5), 1e-5, 1e-4);
    }
}

/// The attention's softmax four rows at a time (`attn_kernel::softmax_rows`) gives the bits of one
/// row at a time (`softmax_row`), logsumexp included: rows of equal and of different key counts
/// (causal blocks), 1, 7, 45 and 77 rows, row lengths around a 16-lane boundary.
#[test]
#[cfg(target_arch = "x86_64")]
fn attention_softmax_rows_match_one_row_at_a_time() {
    use clipforge::ops::attn_kernel::{softmax_row, softmax_rows};
    if !std::arch::is_x86_feature_detected!("avx512f") {
        return;
    }
    for &(rows, nk) in &[(1, 1), (7, 7), (45, 50), (77, 77), (9, 17), (8, 16)] {
        for causal in [false, true] {
            let keys = |j: usize| if causal { (j * nk / rows + 1).min(nk) } else { nk };
            let x: Vec<f32> = randn(rows * nk, 21).iter().map(|v| v * 4.0).collect();
            let (mut four, mut one) = (x.clone(), x.clone());
            let (mut l4, mut l1) = (vec![f32::NAN; rows], vec![f32::NAN; rows]);
            // SAFETY: AVX-512F was detected; keys(j) ≤ nk.
            unsafe {
                softmax_rows(&mut four, nk, 0.125, keys, &mut l4);
                for (j, row) in one.chunks_exact_mut(nk).enumerate() {
                    l1[j] = softmax_row(row, keys(j), 0.125);
                }
            }
            let tag = format!("{rows}x{nk} causal {causal}");
            assert!(four.iter().zip(&one).all(|(a, b)| a.to_bits() == b.to_bits()), "{tag}: P differs");
            assert!(l4.iter().zip(&l1).all(|(a, b)| a.to_bits() == b.to_bits()), "{tag}: logsumexp differs");
        }
    }
}

/// The softmax's own exp (`attn_kernel::exp_softmax`, FMAs, x ≤ 0) within 2 ulp of e^x in f64
/// over [−87, 0] (a dense grid, the ends, −0, values next to 0), e^−87 below −87 (−∞ included),
/// NaN kept.
#[test]
#[cfg(target_arch = "x86_64")]
fn softmax_exp_within_two_ulp() {
    use clipforge::ops::attn_kernel::exp_softmax;
    if !std::arch::is_x86_feature_detected!("avx512f") {
        return;
    }
    let mut x: Vec<f32> = (0..=200_000).map(|i| -87.0 * i as f32 / 200_000.0).collect();
    x.extend([-0.0, -1e-30, -1e-7, -f32::MIN_POSITIVE, -0.346_573_6, -0.346_573_62, -86.999_99, -87.0]);
    let mut e = vec![0f32; x.len()];
    // SAFETY: AVX-512F was detected.
    unsafe { exp_softmax(&x, &mut e) };
    for (&xi, &ei) in x.iter().zip(&e) {
        let want = (xi as f64).exp();
        let ulp = (want as f32).to_bits().abs_diff(ei.to_bits());
        assert!(ulp <= 2, "e^{xi}: {ei} against {want} ({ulp} ulp)");
    }
    let (low, mut got) = ([-87.5f32, -100.0, -1e30, f32::NEG_INFINITY, f32::NAN, -87.0], [0f32; 6]);
    // SAFETY: as above.
    unsafe { exp_softmax(&low, &mut got) };
    assert!(got[..4].iter().all(|&g| g == got[5]), "below −87: {got:?}");
    assert!(got[4].is_nan(), "NaN: {}", got[4]);
}

/// Both forward paths (AVX-512 small GEMMs + 16-lane softmax where the CPU has AVX-512F, and the
/// portable one) and the dispatching `attention` against the f64 reference: T = 1, 7, 45, 50, 77
/// and 130 (more than one 64-row query block and 64-column tile), head dims 1, 20, 59, 64, 65.
#[test]
fn attention_fast_matches_reference() {
    type Fwd = fn(&[f32], &[f32], &[f32], &AttnShape) -> (Vec<f32>, Vec<f32>);
    let mut paths: Vec<(&str, Fwd)> = vec![("dispatch", attention), ("portable", attention_portable)];
    if clipforge::ops::gemm_f32::available() {
        paths.push(("avx512", clipforge::ops::attention::attention_avx512));
    }
    for &(b, t, h, d) in &[(1, 1, 1, 1), (2, 7, 3, 59), (1, 50, 2, 64), (3, 77, 5, 20), (1, 45, 1, 65), (2, 130, 2, 33)] {
        let w = h * d;
        let (q, k, v) = (randn(b * t * w, 13), randn(b * t * w, 14), randn(b * t * w, 15));
        for causal in [false, true] {
            let s = AttnShape { batch: b, seq: t, heads: h, head_dim: d, causal, scale: 1.0 / (d as f32).sqrt() };
            let (ro, rl) = attention_reference(&q, &k, &v, &s);
            for (name, f) in &paths {
                let (o, l) = f(&q, &k, &v, &s);
                let what = format!("attention {name} b{b} t{t} h{h} d{d} causal {causal}");
                assert_close(&format!("{what} out"), &o, &ro, 1e-5, 1e-4);
                assert_close(&format!("{what} lse"), &l, &rl, 1e-5, 1e-5);
            }
        }
    }
}

#[test]
fn patch_embed_fast_matches_reference() {
    for &(b, c, hw, p, dim) in &[(1, 1, 1, 1, 1), (2, 3, 98, 14, 45), (1, 3, 32, 8, 64), (1, 3, 33, 8, 7)] {
        let s = PatchShape { batch: b, channels: c, height: hw, width: hw, patch: p, dim };
        let (px, w) = (randn(b * c * hw * hw, 16), randn(dim * c * p * p, 17));
        assert_close(&format!("patch_embed {s:?}"), &patch_embed(&px, &w, &s), &patch_embed_reference(&px, &w, &s), 1e-4, 1e-4);
    }
}

/// The bf16 patch GEMM's A: `im2col_bf16` is `im2col` rounded (`half::bf16::from_f32`), bit for
/// bit, and the CPU backend's bf16 patch embedding (that A, packed as it is) gives the bits of
/// the bf16 GEMM rounding the f32 im2col rows itself — odd shapes, a partial last patch.
#[test]
fn patch_embed_bf16_rows_give_the_f32_rows_bits() {
    use clipforge::backend::{cpu::Cpu, Ops};
    use clipforge::ops::gemm_bf16::{matmul_bf16, PackedBf16};
    use clipforge::ops::patch_embed::{im2col, im2col_bf16};
    for &(b, c, hw, p, dim) in &[(1, 1, 1, 1, 1), (2, 3, 98, 14, 45), (1, 3, 33, 8, 7), (3, 3, 64, 32, 65)] {
        let s = PatchShape { batch: b, channels: c, height: hw, width: hw, patch: p, dim };
        let (px, w) = (randn(b * c * hw * hw, 16), randn(dim * c * p * p, 17));
        let (f, h) = (im2col(&px, &s), im2col_bf16(&px, &s));
        assert_eq!(f.len(), h.len(), "{s:?}");
        for (i, (x, y)) in f.iter().zip(&h).enumerate() {
            assert_eq!(half::bf16::from_f32(*x).to_bits(), y.to_bits(), "{s:?}: im2col value {i}");
        }
        let (rows, k) = (b * s.patches(), c * p * p);
        let mut want = vec![0f32; rows * dim];
        matmul_bf16(&f, rows, &PackedBf16::from_f32(&w, dim, k), None, &mut want);
        let wt = Cpu.weight(Tensor::from_vec(w.clone(), &[dim * k]).unwrap(), dim, k, clipforge::DType::BF16).unwrap();
        let got = Cpu.patch_embed(&Tensor::from_vec(px.clone(), &[px.len()]).unwrap(), &wt, b, c, hw, p).unwrap().to_vec_f32();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{s:?}: output {i}: {g} against {w}");
        }
    }
}

#[test]
fn embedding_rejects_out_of_range_ids() {
    let table = rand_tensor(&[10, 7], 18);
    let e = Tensor::embedding(&table, &[3, 9, 0]).unwrap();
    assert_eq!(e.shape(), &[3, 7]);
    assert_eq!(e.get(1).unwrap().to_vec_f32(), table.get(9).unwrap().to_vec_f32());
    let err = Tensor::embedding(&table, &[10]).unwrap_err().to_string();
    assert!(err.contains("out of range"), "{err}");
}
