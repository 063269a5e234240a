//! The CPU backward ops the tape uses, fast path vs plain reference, per element
//! (|x − ref| ≤ atol + rtol·|ref|, NaN fails), on odd shapes. Their agreement with finite
//! differences is tests/autograd.rs.
use clipforge::model::synthetic::Rng;
use clipforge::ops::elementwise::{unary_bwd, unary_bwd_reference, Unary};
use clipforge::ops::embedding::embedding_bwd;
use clipforge::ops::layernorm::{layer_norm_bwd, layer_norm_bwd_reference};
use clipforge::ops::patch_embed::{patch_embed_bwd_weight, patch_embed_bwd_weight_reference, PatchShape};
use clipforge::ops::softmax::{softmax, softmax_bwd, softmax_bwd_reference};

fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| r.normal()).collect()
}

fn close(what: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite() && (g as f64 - w).abs() <= atol + rtol * w.abs(), "{what}[{i}]: {g} vs reference {w}");
    }
}

#[test]
fn layer_norm_backward_fast_matches_reference() {
    for (r, c) in [(1, 1), (7, 65), (45, 768), (130, 59), (33, 16), (97, 17)] {
        let x: Vec<f32> = randn(r * c, 1).iter().map(|v| 2.0 * v + 0.3).collect();
        let g: Vec<f32> = randn(c, 2).iter().map(|v| 1.0 + 0.2 * v).collect();
        let dy = randn(r * c, 3);
        let (dx, dg, db) = layer_norm_bwd(&x, c, &g, &dy, 1e-5);
        let (rx, rg, rb) = layer_norm_bwd_reference(&x, c, &g, &dy, 1e-5);
        close(&format!("dx {r}x{c}"), &dx, &rx, 1e-4, 1e-3);
        close(&format!("dgamma {r}x{c}"), &dg, &rg, 1e-4 * (r as f64).sqrt(), 1e-3);
        close(&format!("dbeta {r}x{c}"), &db, &rb, 1e-4 * (r as f64).sqrt(), 1e-4);
    }
}

/// dγ and dβ add partials over blocks of rows: the blocks are fixed, so 1 and 3 threads give the
/// same bits (and dx, row-local, too).
#[test]
fn layer_norm_backward_bits_do_not_depend_on_threads() {
    let (r, c) = (250, 77);
    let x: Vec<f32> = randn(r * c, 11).iter().map(|v| 1.5 * v - 0.2).collect();
    let g: Vec<f32> = randn(c, 12).iter().map(|v| 1.0 + 0.2 * v).collect();
    let dy = randn(r * c, 13);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| layer_norm_bwd(&x, c, &g, &dy, 1e-5))
    };
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    let (one, three) = (run(1), run(3));
    assert_eq!(bits(&one.0), bits(&three.0), "dx");
    assert_eq!(bits(&one.1), bits(&three.1), "dgamma");
    assert_eq!(bits(&one.2), bits(&three.2), "dbeta");
}

#[test]
fn softmax_backward_fast_matches_reference() {
    for (r, c) in [(1, 1), (7, 65), (45, 1000)] {
        let y = softmax(&randn(r * c, 4), c);
        let dy = randn(r * c, 5);
        close(&format!("softmax {r}x{c}"), &softmax_bwd(&y, &dy, c), &softmax_bwd_reference(&y, &dy, c), 1e-6, 1e-4);
    }
}

#[test]
fn activation_backward_fast_matches_reference() {
    for n in [1, 7, 4097, 45 * 3072] {
        let x: Vec<f32> = randn(n, 6).iter().map(|v| 3.0 * v).collect();
        let dy = randn(n, 7);
        for op in [Unary::QuickGelu, Unary::Gelu, Unary::Exp] {
            close(&format!("{op:?} n {n}"), &unary_bwd(op, &x, &dy), &unary_bwd_reference(op, &x, &dy), 1e-5, 1e-4);
        }
    }
}

#[test]
fn patch_embed_weight_backward_fast_matches_reference() {
    for s in [
        PatchShape { batch: 1, channels: 1, height: 1, width: 1, patch: 1, dim: 1 },
        PatchShape { batch: 2, channels: 3, height: 10, width: 7, patch: 3, dim: 5 },
        PatchShape { batch: 3, channels: 3, height: 32, width: 32, patch: 8, dim: 65 },
    ] {
        let px = randn(s.batch * s.channels * s.height * s.width, 8);
        let dout = randn(s.batch * s.patches() * s.dim, 9);
        close(&format!("{s:?}"), &patch_embed_bwd_weight(&px, &dout, &s), &patch_embed_bwd_weight_reference(&px, &dout, &s), 1e-4, 1e-4);
    }
}

#[test]
fn embedding_backward_adds_repeated_rows() {
    let dout = vec![1.0, 2.0, 10.0, 20.0, 100.0, 200.0];
    let g = embedding_bwd(&dout, 4, 2, &[3, 0, 3]).unwrap();
    assert_eq!(g, vec![10.0, 20.0, 0.0, 0.0, 0.0, 0.0, 101.0, 202.0]);
    assert!(embedding_bwd(&dout, 3, 2, &[3, 0, 3]).is_err());
    assert!(embedding_bwd(&dout[..4], 4, 2, &[3, 0, 3]).is_err());
}
