//! The attention backward: the fast path against the f64 reference per element, and the
//! reference against central finite differences of the scalar loss L = Σ o·w computed in f64
//! (so dO = w), on small odd shapes, causal and not.
mod common;
use clipforge::ops::attention::{
    attention_backward, attention_backward_portable, attention_backward_reference, attention_packed, attention_packed_backward, attention_packed_reference,
    attention_reference, AttnShape,
};
use common::*;

fn shape(b: usize, t: usize, h: usize, d: usize, causal: bool) -> AttnShape {
    AttnShape { batch: b, seq: t, heads: h, head_dim: d, causal, scale: 1.0 / (d as f32).sqrt() }
}

#[test]
fn attention_backward_fast_matches_reference() {
    type Bwd = fn(&[f32], &[f32], &[f32], &[f32], &[f32], &[f32], &AttnShape) -> (Vec<f32>, Vec<f32>, Vec<f32>);
    let mut paths: Vec<(&str, Bwd)> = vec![("dispatch", attention_backward), ("portable", attention_backward_portable)];
    #[cfg(target_arch = "x86_64")]
    if clipforge::ops::gemm_f32::available() {
        paths.push(("avx512", clipforge::ops::attention::attention_backward_avx512));
    }
    // T crosses the 64-row query / key blocks (65, 130, 248); head dims 1, 8, 20, 59, 64, 65
    let shapes =
        [(1, 1, 1, 1), (2, 7, 3, 59), (1, 50, 2, 64), (3, 77, 5, 20), (1, 45, 1, 65), (1, 197, 1, 8), (2, 65, 2, 17), (1, 130, 3, 33), (1, 248, 2, 64)];
    for &(b, t, h, d) in &shapes {
        let n = b * t * h * d;
        let (q, k, v, dout) = (randn(n, 21), randn(n, 22), randn(n, 23), randn(n, 24));
        for causal in [false, true] {
            let s = shape(b, t, h, d, causal);
            let (o, lse) = attention_reference(&q, &k, &v, &s);
            let (rq, rk, rv) = attention_backward_reference(&q, &k, &v, &o, &lse, &dout, &s);
            for (name, f) in &paths {
                let (dq, dk, dv) = f(&q, &k, &v, &o, &lse, &dout, &s);
                let what = format!("attention backward {name} b{b} t{t} h{h} d{d} causal {causal}");
                assert_close(&format!("{what} dq"), &dq, &rq, 2e-5, 2e-4);
                assert_close(&format!("{what} dk"), &dk, &rk, 2e-5, 2e-4);
                assert_close(&format!("{what} dv"), &dv, &rv, 2e-5, 2e-4);
            }
        }
    }
}

/// The same gradients, bit for bit, whatever the thread count (fixed reduction order).
#[test]
fn attention_backward_is_bitwise_reproducible_across_thread_counts() {
    let (b, t, h, d) = (2, 130, 3, 40);
    let n = b * t * h * d;
    let (q, k, v, dout) = (randn(n, 31), randn(n, 32), randn(n, 33), randn(n, 34));
    for causal in [false, true] {
        let s = shape(b, t, h, d, causal);
        let (o, lse) = attention_reference(&q, &k, &v, &s);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| attention_backward(&q, &k, &v, &o, &lse, &dout, &s))
        };
        let (one, three) = (run(1), run(3));
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
        assert!(bits(&one.0) == bits(&three.0) && bits(&one.1) == bits(&three.1) && bits(&one.2) == bits(&three.2), "causal {causal}: 1 and 3 threads differ");
    }
}

/// L = Σ o·w with o = softmax(q·kᵀ·scale [+ mask])·v, everything in f64.
fn loss_f64(q: &[f64], k: &[f64], v: &[f64], w: &[f64], s: &AttnShape) -> f64 {
    let (t, wd, d) = (s.seq, s.width(), s.head_dim);
    let mut loss = 0.0;
    for b in 0..s.batch {
        for h in 0..s.heads {
            let row = |j: usize| (b * t + j) * wd + h * d;
            for i in 0..t {
                let nk = if s.causal { i + 1 } else { t };
                let sc: Vec<f64> = (0..nk).map(|j| (0..d).map(|e| q[row(i) + e] * k[row(j) + e]).sum::<f64>() * s.scale as f64).collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                for e in 0..d {
                    let oe: f64 = (0..nk).map(|j| (sc[j] - m).exp() / z * v[row(j) + e]).sum();
                    loss += oe * w[row(i) + e];
                }
            }
        }
    }
    loss
}

#[test]
fn attention_backward_reference_matches_finite_differences() {
    const H: f64 = 1e-5;
    let mut checked = 0;
    for b in [1, 2] {
        for t in [1, 3, 7] {
            for heads in [1, 3] {
                for d in [5, 20] {
                    for causal in [false, true] {
                        let s = shape(b, t, heads, d, causal);
                        let n = s.numel();
                        let seed = (b * 1000 + t * 100 + heads * 10 + d) as u64;
                        let (q, k, v, w) = (randn(n, seed), randn(n, seed + 1), randn(n, seed + 2), randn(n, seed + 3));
                        let (o, lse) = attention_reference(&q, &k, &v, &s);
                        let (dq, dk, dv) = attention_backward_reference(&q, &k, &v, &o, &lse, &w, &s);
                        let f64s = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
                        let (q64, k64, v64, w64) = (f64s(&q), f64s(&k), f64s(&v), f64s(&w));
                        for (name, which, grad) in [("dq", 0, &dq), ("dk", 1, &dk), ("dv", 2, &dv)] {
                            let mut fd = vec![0f32; n];
                            for (i, g) in fd.iter_mut().enumerate() {
                                let eval = |delta: f64| {
                                    let mut x = [q64.clone(), k64.clone(), v64.clone()];
                                    x[which][i] += delta;
                                    loss_f64(&x[0], &x[1], &x[2], &w64, &s)
                                };
                                *g = ((eval(H) - eval(-H)) / (2.0 * H)) as f32;
                            }
                            assert_close(&format!("{name} vs finite differences, {s:?}"), grad, &fd, 2e-6, 2e-5);
                            checked += n;
                        }
                    }
                }
            }
        }
    }
    assert!(checked > 10_000);
}

/// Packed sequences (the text tower's training layout, no padding): the fast path against the
/// f64 reference, forward and backward, and each sequence's rows against the padded batch op
/// (causal), where padding after a sequence cannot change its rows.
#[test]
fn packed_attention_matches_reference_and_the_padded_batch() {
    for (lens, h, d) in [(vec![1usize], 1usize, 1usize), (vec![7, 1, 45], 3, 59), (vec![77, 20, 50], 2, 64), (vec![5, 5], 1, 65)] {
        let (n, t) = (lens.iter().sum::<usize>(), *lens.iter().max().unwrap());
        let w = h * d;
        let (q, k, v, dout) = (randn(n * w, 31), randn(n * w, 32), randn(n * w, 33), randn(n * w, 34));
        let what = format!("packed attention {lens:?} h{h} d{d}");
        let (o, lse) = attention_packed(&q, &k, &v, &lens, h, true);
        let (ro, rlse) = attention_packed_reference(&q, &k, &v, &lens, h, true);
        assert_close(&format!("{what} o"), &o, &ro, 2e-5, 2e-4);
        assert_close(&format!("{what} lse"), &lse, &rlse, 2e-5, 2e-4);
        let (dq, dk, dv) = attention_packed_backward(&q, &k, &v, &ro, &rlse, &dout, &lens, h, true);
        let (mut rq, mut rk, mut rv) = (vec![], vec![], vec![]);
        let mut off = 0;
        for &l in &lens {
            let r = off * w..(off + l) * w;
            let s = shape(1, l, h, d, true);
            let (so, slse) = attention_reference(&q[r.clone()], &k[r.clone()], &v[r.clone()], &s);
            let (a, b, c) = attention_backward_reference(&q[r.clone()], &k[r.clone()], &v[r.clone()], &so, &slse, &dout[r], &s);
            rq.extend(a);
            rk.extend(b);
            rv.extend(c);
            off += l;
        }
        assert_close(&format!("{what} dq"), &dq, &rq, 2e-5, 2e-4);
        assert_close(&format!("{what} dk"), &dk, &rk, 2e-5, 2e-4);
        assert_close(&format!("{what} dv"), &dv, &rv, 2e-5, 2e-4);
        // The same sequences padded to T with noise rows, as one causal batch.
        let pad = |x: &[f32], seed: u64| {
            let mut out = randn(lens.len() * t * w, seed);
            let mut off = 0;
            for (b, &l) in lens.iter().enumerate() {
                out[b * t * w..(b * t + l) * w].copy_from_slice(&x[off * w..(off + l) * w]);
                off += l;
            }
            out
        };
        let (pq, pk, pv) = (pad(&q, 35), pad(&k, 36), pad(&v, 37));
        let (po, _) = attention_reference(&pq, &pk, &pv, &shape(lens.len(), t, h, d, true));
        let mut off = 0;
        for (b, &l) in lens.iter().enumerate() {
            assert_close(&format!("{what} sequence {b} vs padded batch"), &o[off * w..(off + l) * w], &po[b * t * w..(b * t + l) * w], 2e-5, 2e-4);
            off += l;
        }
    }
}
