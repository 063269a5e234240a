//! Fused ops against composite twins built from primitive tensor ops (matmul, broadcasting
//! arithmetic, reductions, exp): if a fused kernel and the plain algebra disagree, one is wrong.
mod common;
use clipforge::Tensor;
use common::*;

/// softmax(x) = exp(x − max) / Σ exp(x − max)
fn softmax_composite(x: &Tensor) -> Tensor {
    let last = x.rank() - 1;
    let e = x.sub(&x.max(last, true).unwrap()).unwrap().exp();
    e.div(&e.sum(last, true).unwrap()).unwrap()
}

fn layer_norm_composite(x: &Tensor, g: &Tensor, b: &Tensor, eps: f32) -> Tensor {
    let last = x.rank() - 1;
    let xc = x.sub(&x.mean(last, true).unwrap()).unwrap();
    let var = xc.mul(&xc).unwrap().mean(last, true).unwrap();
    let rstd = var.map_f32(|v| 1.0 / (v + eps).sqrt());
    xc.mul(&rstd).unwrap().mul(g).unwrap().add(b).unwrap()
}

/// Attention from reshapes, transposes, batched matmul, a mask and softmax.
fn attention_composite(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Tensor {
    let (b, t, w) = (q.dim(0), q.dim(1), q.dim(2));
    let d = w / heads;
    let split = |x: &Tensor| x.reshape(&[b, t, heads, d]).unwrap().transpose(1, 2).unwrap(); // [B, H, T, d]
    let (q, k, v) = (split(q), split(k), split(v));
    let s = q.matmul(&k.transpose(2, 3).unwrap()).unwrap().scale(1.0 / (d as f32).sqrt()); // [B, H, T, T]
    let s = if causal {
        let mask: Vec<f32> = (0..t * t).map(|i| if i % t > i / t { f32::NEG_INFINITY } else { 0.0 }).collect();
        s.add(&Tensor::from_vec(mask, &[t, t]).unwrap()).unwrap()
    } else {
        s
    };
    let o = softmax_composite(&s).matmul(&v).unwrap(); // [B, H, T, d]
    o.transpose(1, 2).unwrap().reshape(&[b, t, w]).unwrap()
}

#[test]
fn softmax_matches_composite() {
    let x = rand_tensor(&[7, 45, 65], 1).scale(4.0);
    assert_tensor_close("softmax", &x.softmax_last(), &softmax_composite(&x), 1e-6, 1e-5);
}

#[test]
fn layer_norm_matches_composite() {
    let x = rand_tensor(&[7, 45, 65], 2);
    let (g, b) = (rand_tensor(&[65], 3), rand_tensor(&[65], 4));
    assert_tensor_close("layernorm", &x.layer_norm(&g, &b, 1e-5).unwrap(), &layer_norm_composite(&x, &g, &b, 1e-5), 1e-5, 1e-4);
}

#[test]
fn attention_matches_composite() {
    for &(b, t, h, d) in &[(2, 7, 3, 59), (1, 77, 8, 64), (2, 50, 5, 20), (1, 1, 1, 7)] {
        let (q, k, v) = (rand_tensor(&[b, t, h * d], 5), rand_tensor(&[b, t, h * d], 6), rand_tensor(&[b, t, h * d], 7));
        for causal in [false, true] {
            let (o, _) = Tensor::attention(&q, &k, &v, h, causal).unwrap();
            assert_tensor_close(&format!("attention {b} {t} {h} {d} {causal}"), &o, &attention_composite(&q, &k, &v, h, causal), 1e-5, 1e-4);
        }
    }
}

#[test]
fn linear_matches_matmul_plus_bias() {
    let x = rand_tensor(&[3, 7, 65], 8);
    let (w, b) = (rand_tensor(&[45, 65], 9), rand_tensor(&[45], 10));
    let want = x.matmul(&w.transpose(0, 1).unwrap()).unwrap().add(&b).unwrap();
    assert_tensor_close("linear", &x.linear(&w, Some(&b)).unwrap(), &want, 1e-5, 1e-4);
}

#[test]
fn patch_embed_matches_explicit_patches_matmul() {
    // Composite: cut patches with narrow/reshape views, flatten, matmul with the flattened weight.
    let (b, c, s, p, d) = (2, 3, 28, 14, 9);
    let px = rand_tensor(&[b, c, s, s], 11);
    let w = rand_tensor(&[d, c, p, p], 12);
    let g = s / p;
    let mut rows = vec![];
    for bi in 0..b {
        for gy in 0..g {
            for gx in 0..g {
                let patch = px.get(bi).unwrap().narrow(1, gy * p, p).unwrap().narrow(2, gx * p, p).unwrap();
                rows.push(patch.reshape(&[1, c * p * p]).unwrap());
            }
        }
    }
    let cols = Tensor::cat(&rows.iter().collect::<Vec<_>>(), 0).unwrap(); // [B·N, C·P·P]
    let want = cols.matmul(&w.reshape(&[d, c * p * p]).unwrap().transpose(0, 1).unwrap()).unwrap().reshape(&[b, g * g, d]).unwrap();
    assert_tensor_close("patch_embed", &Tensor::patch_embed(&px, &w).unwrap(), &want, 1e-5, 1e-4);
}

#[test]
fn views_copy_correctly() {
    let x = rand_tensor(&[4, 5, 6], 13);
    let xt = x.transpose(0, 2).unwrap(); // [6, 5, 4]
    let v = x.to_vec_f32();
    let c = xt.contiguous().to_vec_f32();
    for i in 0..6 {
        for j in 0..5 {
            for k in 0..4 {
                assert_eq!(c[(i * 5 + j) * 4 + k], v[(k * 5 + j) * 6 + i]);
            }
        }
    }
    let n = x.narrow(1, 2, 3).unwrap();
    assert_eq!(n.shape(), &[4, 3, 6]);
    assert_eq!(n.get(1).unwrap().get(0).unwrap().to_vec_f32(), x.get(1).unwrap().get(2).unwrap().to_vec_f32());
    let cat = Tensor::cat(&[&x.narrow(1, 0, 2).unwrap(), &x.narrow(1, 2, 3).unwrap()], 1).unwrap();
    assert_eq!(cat.to_vec_f32(), v);
    assert!(x.reshape(&[7, 7]).is_err());
    assert_eq!(x.reshape(&[usize::MAX, 6]).unwrap().shape(), &[20, 6]);
}
