//! Gradient checks for every tape rule: the loss is Σ R ⊙ op(inputs) with fixed random R (the
//! seed of `backward_from`); the tape's f32 gradient of each input that needs one is compared per
//! element with f64 central differences of a naive f64 forward written here, independent of the
//! engine: |g − fd| ≤ atol + rtol·|fd|, NaN fails. Shapes are small and odd. Plus the tape's own
//! behaviour: accumulation on reuse, constants and no_grad record nothing, a wrong rule is caught.
use clipforge::autograd::{Tape, Var};
use clipforge::model::synthetic::Rng;
use clipforge::ops::elementwise::Unary;
use clipforge::ops::pos_gather::{pos_gather_reference, Stretch};
use clipforge::Tensor;

type F64Fn = dyn Fn(&[Vec<f64>]) -> Vec<f64>;

struct Input {
    shape: Vec<usize>,
    data: Vec<f32>,
    grad: bool,
}

fn inp(shape: &[usize], seed: u64, grad: bool) -> Input {
    let mut r = Rng::new(seed);
    Input { shape: shape.to_vec(), data: (0..shape.iter().product()).map(|_| r.normal()).collect(), grad }
}

/// Runs the f32 rule and checks every gradient against central differences of `f64_fwd`.
fn check(name: &str, inputs: Vec<Input>, f32_fwd: impl Fn(&Tape, &[Var]) -> Var, f64_fwd: &F64Fn, atol: f64, rtol: f64) {
    let tape = Tape::new();
    let vars: Vec<Var> = inputs
        .iter()
        .map(|i| {
            let t = Tensor::from_vec(i.data.clone(), &i.shape).unwrap();
            if i.grad {
                tape.param(t)
            } else {
                tape.constant(t)
            }
        })
        .collect();
    let y = f32_fwd(&tape, &vars);
    let x64: Vec<Vec<f64>> = inputs.iter().map(|i| i.data.iter().map(|&v| v as f64).collect()).collect();
    let want_y = f64_fwd(&x64);
    let got_y = y.value().to_vec_f32();
    assert_eq!(got_y.len(), want_y.len(), "{name}: forward size");
    for (i, (&g, &w)) in got_y.iter().zip(&want_y).enumerate() {
        assert!(g.is_finite() && (g as f64 - w).abs() <= 1e-4 + 1e-4 * w.abs(), "{name}: forward[{i}] = {g}, f64 {w}");
    }
    let mut rng = Rng::new(99);
    let r: Vec<f32> = (0..got_y.len()).map(|_| rng.normal()).collect();
    let grads = tape.backward_from(&y, Tensor::from_vec(r.clone(), y.shape()).unwrap()).unwrap();
    let loss = |x: &[Vec<f64>]| -> f64 { f64_fwd(x).iter().zip(&r).map(|(a, &b)| a * b as f64).sum() };
    for (k, input) in inputs.iter().enumerate() {
        let g = grads.get(&vars[k]);
        if !input.grad {
            assert!(g.is_none(), "{name}: constant input {k} got a gradient");
            continue;
        }
        let g = g.unwrap_or_else(|| panic!("{name}: no gradient for input {k}")).to_vec_f32();
        let mut x = x64.clone();
        for e in 0..input.data.len() {
            let h = 1e-5 * (1.0 + x[k][e].abs());
            let x0 = x[k][e];
            x[k][e] = x0 + h;
            let up = loss(&x);
            x[k][e] = x0 - h;
            let down = loss(&x);
            x[k][e] = x0;
            let fd = (up - down) / (2.0 * h);
            let got = g[e] as f64;
            assert!(got.is_finite() && (got - fd).abs() <= atol + rtol * fd.abs(), "{name}: d input {k}[{e}] = {got}, finite differences {fd}");
        }
    }
}

// ---- naive f64 forwards ----

/// Broadcast binary op in numpy semantics.
fn bcast(a: &[f64], sa: &[usize], b: &[f64], sb: &[usize], f: impl Fn(f64, f64) -> f64) -> Vec<f64> {
    let r = sa.len().max(sb.len());
    let pad = |s: &[usize]| [vec![1; r - s.len()], s.to_vec()].concat();
    let (pa, pb) = (pad(sa), pad(sb));
    let so: Vec<usize> = pa.iter().zip(&pb).map(|(&x, &y)| x.max(y)).collect();
    let n: usize = so.iter().product();
    let strides = |s: &[usize]| {
        let mut st = vec![0; r];
        let mut acc = 1;
        for d in (0..r).rev() {
            st[d] = if s[d] == 1 { 0 } else { acc };
            acc *= s[d];
        }
        st
    };
    let (ta, tb) = (strides(&pa), strides(&pb));
    (0..n)
        .map(|mut i| {
            let (mut ia, mut ib) = (0, 0);
            for d in (0..r).rev() {
                let c = i % so[d];
                i /= so[d];
                ia += c * ta[d];
                ib += c * tb[d];
            }
            f(a[ia], b[ib])
        })
        .collect()
}

fn linear64(x: &[f64], w: &[f64], b: Option<&[f64]>, n: usize, k: usize) -> Vec<f64> {
    let m = x.len() / k;
    (0..m * n).map(|i| (0..k).map(|j| x[i / n * k + j] * w[i % n * k + j]).sum::<f64>() + b.map_or(0.0, |b| b[i % n])).collect()
}

fn ln64(x: &[f64], g: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
    let n = g.len();
    x.chunks(n)
        .flat_map(|r| {
            let m = r.iter().sum::<f64>() / n as f64;
            let v = r.iter().map(|a| (a - m).powi(2)).sum::<f64>() / n as f64;
            r.iter().enumerate().map(move |(j, a)| (a - m) / (v + eps).sqrt() * g[j] + b[j]).collect::<Vec<_>>()
        })
        .collect()
}

fn softmax64(x: &[f64], n: usize) -> Vec<f64> {
    x.chunks(n)
        .flat_map(|r| {
            let m = r.iter().cloned().fold(f64::MIN, f64::max);
            let s: f64 = r.iter().map(|a| (a - m).exp()).sum();
            r.iter().map(move |a| (a - m).exp() / s).collect::<Vec<_>>()
        })
        .collect()
}

fn attention64(q: &[f64], k: &[f64], v: &[f64], b: usize, t: usize, h: usize, hd: usize, causal: bool) -> Vec<f64> {
    let w = h * hd;
    let mut o = vec![0f64; b * t * w];
    for bi in 0..b {
        for hi in 0..h {
            for i in 0..t {
                let at = |x: &[f64], r: usize, d: usize| x[(bi * t + r) * w + hi * hd + d];
                let keys = if causal { i + 1 } else { t };
                let s: Vec<f64> = (0..keys).map(|j| (0..hd).map(|d| at(q, i, d) * at(k, j, d)).sum::<f64>() / (hd as f64).sqrt()).collect();
                let p = softmax64(&s, keys);
                for d in 0..hd {
                    o[(bi * t + i) * w + hi * hd + d] = (0..keys).map(|j| p[j] * at(v, j, d)).sum();
                }
            }
        }
    }
    o
}

fn unary64(op: Unary, x: f64) -> f64 {
    match op {
        Unary::QuickGelu => x / (1.0 + (-1.702 * x).exp()),
        Unary::Gelu => 0.5 * x * (1.0 + clipforge::ops::elementwise::erf64(x / std::f64::consts::SQRT_2)),
        Unary::Exp => x.exp(),
        Unary::Neg => -x,
        Unary::Sqrt => x.sqrt(),
        Unary::Recip => 1.0 / x,
    }
}

// ---- one test per rule family ----

#[test]
fn broadcasting_arithmetic() {
    for (sa, sb) in [(vec![7, 5], vec![7, 5]), (vec![3, 4, 5], vec![5]), (vec![2, 3, 4], vec![3, 1]), (vec![1, 6], vec![4, 1]), (vec![5, 3], vec![1])] {
        let (sa2, sb2) = (sa.clone(), sb.clone());
        check(
            &format!("add {sa:?} {sb:?}"),
            vec![inp(&sa, 1, true), inp(&sb, 2, true)],
            |t, v| t.add(&v[0], &v[1]).unwrap(),
            &move |x| bcast(&x[0], &sa2, &x[1], &sb2, |a, b| a + b),
            1e-6,
            1e-4,
        );
        let (sa2, sb2) = (sa.clone(), sb.clone());
        check(
            &format!("sub {sa:?} {sb:?}"),
            vec![inp(&sa, 3, true), inp(&sb, 4, true)],
            |t, v| t.sub(&v[0], &v[1]).unwrap(),
            &move |x| bcast(&x[0], &sa2, &x[1], &sb2, |a, b| a - b),
            1e-6,
            1e-4,
        );
        let (sa2, sb2) = (sa.clone(), sb.clone());
        check(
            &format!("mul {sa:?} {sb:?}"),
            vec![inp(&sa, 5, true), inp(&sb, 6, true)],
            |t, v| t.mul(&v[0], &v[1]).unwrap(),
            &move |x| bcast(&x[0], &sa2, &x[1], &sb2, |a, b| a * b),
            1e-5,
            1e-4,
        );
        let (sa2, sb2) = (sa.clone(), sb.clone());
        let mut den = inp(&sb, 8, true);
        den.data.iter_mut().for_each(|v| *v = v.abs() + 0.5);
        check(
            &format!("div {sa:?} {sb:?}"),
            vec![inp(&sa, 7, true), den],
            |t, v| t.div(&v[0], &v[1]).unwrap(),
            &move |x| bcast(&x[0], &sa2, &x[1], &sb2, |a, b| a / b),
            1e-4,
            1e-3,
        );
    }
    check("scale", vec![inp(&[7], 9, true)], |t, v| t.scale(&v[0], -2.5), &|x| x[0].iter().map(|a| a * -2.5).collect(), 1e-6, 1e-5);
    // logits · exp(s): the logit-scale product of the contrastive loss
    check(
        "mul by exp(scalar)",
        vec![inp(&[3, 4], 10, true), inp(&[1], 11, true)],
        |t, v| t.mul(&v[0], &t.exp(&v[1])).unwrap(),
        &|x| x[0].iter().map(|a| a * x[1][0].exp()).collect(),
        1e-5,
        1e-4,
    );
}

#[test]
fn activations() {
    for op in [Unary::QuickGelu, Unary::Gelu, Unary::Exp] {
        check(
            &format!("{op:?}"),
            vec![inp(&[45, 3], 12, true)],
            move |t, v| t.unary(&v[0], op),
            &move |x| x[0].iter().map(|&a| unary64(op, a)).collect(),
            1e-5,
            1e-3,
        );
    }
}

/// Sqrt (SmartCLIP's norms), Neg and Recip, on positive inputs away from 0 where their f64
/// finite differences are well conditioned.
#[test]
fn sqrt_neg_recip() {
    for op in [Unary::Sqrt, Unary::Neg, Unary::Recip] {
        let mut x = inp(&[7, 5], 31, true);
        x.data.iter_mut().for_each(|v| *v = v.abs() + 0.3);
        check(&format!("{op:?}"), vec![x], move |t, v| t.unary(&v[0], op), &move |x| x[0].iter().map(|&a| unary64(op, a)).collect(), 1e-5, 1e-3);
    }
}

#[test]
fn reductions_and_views() {
    for dim in 0..3 {
        check(
            &format!("sum dim {dim}"),
            vec![inp(&[3, 4, 5], 13, true)],
            move |t, v| t.sum(&v[0], dim, false).unwrap(),
            &move |x| sum64(&x[0], &[3, 4, 5], dim),
            1e-5,
            1e-4,
        );
        check(
            &format!("mean dim {dim}"),
            vec![inp(&[3, 4, 5], 14, true)],
            move |t, v| t.mean(&v[0], dim, true).unwrap(),
            &move |x| sum64(&x[0], &[3, 4, 5], dim).iter().map(|s| s / [3.0, 4.0, 5.0][dim]).collect(),
            1e-5,
            1e-4,
        );
    }
    check("sum_all", vec![inp(&[7, 3], 15, true)], |t, v| t.sum_all(&v[0]).unwrap(), &|x| vec![x[0].iter().sum()], 1e-5, 1e-4);
    check("reshape", vec![inp(&[6, 5], 16, true)], |t, v| t.reshape(&v[0], &[3, 10]).unwrap(), &|x| x[0].clone(), 1e-6, 1e-5);
    check(
        "transpose",
        vec![inp(&[4, 7], 17, true)],
        |t, v| t.transpose(&v[0], 0, 1).unwrap(),
        &|x| (0..28).map(|i| x[0][(i % 4) * 7 + i / 4]).collect(),
        1e-6,
        1e-5,
    );
    check(
        "narrow",
        vec![inp(&[3, 7, 2], 18, true)],
        |t, v| t.narrow(&v[0], 1, 2, 4).unwrap(),
        &|x| (0..24).map(|i| x[0][(i / 8) * 14 + (2 + (i % 8) / 2) * 2 + i % 2]).collect(),
        1e-6,
        1e-5,
    );
    check(
        "cat",
        vec![inp(&[2, 3], 19, true), inp(&[2, 1], 20, true), inp(&[2, 2], 21, false)],
        |t, v| t.cat(&[&v[0], &v[1], &v[2]], 1).unwrap(),
        &|x| {
            (0..12)
                .map(|i| {
                    let (r, c) = (i / 6, i % 6);
                    if c < 3 {
                        x[0][r * 3 + c]
                    } else if c < 4 {
                        x[1][r]
                    } else {
                        x[2][r * 2 + c - 4]
                    }
                })
                .collect()
        },
        1e-6,
        1e-5,
    );
    check(
        "gather_rows",
        vec![inp(&[7, 3], 22, true)],
        |t, v| t.gather_rows(&v[0], &[6, 0, 6, 2]).unwrap(),
        &|x| [6, 0, 6, 2].iter().flat_map(|&r| x[0][r * 3..r * 3 + 3].to_vec()).collect(),
        1e-6,
        1e-5,
    );
}

fn sum64(x: &[f64], s: &[usize], dim: usize) -> Vec<f64> {
    let (outer, n, inner) = (s[..dim].iter().product::<usize>(), s[dim], s[dim + 1..].iter().product::<usize>());
    (0..outer * inner).map(|o| (0..n).map(|j| x[(o / inner * n + j) * inner + o % inner]).sum()).collect()
}

#[test]
fn linear_and_matmul() {
    for (m, n, k) in [(1, 1, 1), (7, 5, 3), (9, 65, 13)] {
        check(
            &format!("linear {m}x{k}·{n}"),
            vec![inp(&[m, k], 23, true), inp(&[n, k], 24, true), inp(&[n], 25, true)],
            |t, v| t.linear(&v[0], &v[1], Some(&v[2])).unwrap(),
            &move |x| linear64(&x[0], &x[1], Some(&x[2]), n, k),
            1e-4,
            1e-3,
        );
        check(
            &format!("linear no bias, frozen x {m}x{k}·{n}"),
            vec![inp(&[m, k], 26, false), inp(&[n, k], 27, true)],
            |t, v| t.linear(&v[0], &v[1], None).unwrap(),
            &move |x| linear64(&x[0], &x[1], None, n, k),
            1e-4,
            1e-3,
        );
        check(
            &format!("matmul {m}x{k}·{k}x{n}"),
            vec![inp(&[m, k], 28, true), inp(&[k, n], 29, true)],
            |t, v| t.matmul(&v[0], &v[1]).unwrap(),
            &move |x| (0..m * n).map(|i| (0..k).map(|j| x[0][i / n * k + j] * x[1][j * n + i % n]).sum()).collect(),
            1e-4,
            1e-3,
        );
    }
    // a 3-D input to linear (tokens of a batch)
    check(
        "linear 3-D",
        vec![inp(&[2, 3, 4], 30, true), inp(&[5, 4], 31, true), inp(&[5], 32, true)],
        |t, v| t.linear(&v[0], &v[1], Some(&v[2])).unwrap(),
        &|x| linear64(&x[0], &x[1], Some(&x[2]), 5, 4),
        1e-4,
        1e-3,
    );
}

#[test]
fn layer_norm_and_softmax() {
    for (r, c) in [(1, 1), (7, 5), (4, 65)] {
        let mut g = inp(&[c], 34, true);
        g.data.iter_mut().for_each(|v| *v = 1.0 + 0.3 * *v);
        check(
            &format!("layer_norm {r}x{c}"),
            vec![inp(&[r, c], 33, true), g, inp(&[c], 35, true)],
            |t, v| t.layer_norm(&v[0], &v[1], &v[2], 1e-5).unwrap(),
            &|x| ln64(&x[0], &x[1], &x[2], 1e-5),
            1e-4,
            1e-3,
        );
        check(&format!("softmax {r}x{c}"), vec![inp(&[r, c], 36, true)], |t, v| t.softmax(&v[0]).unwrap(), &move |x| softmax64(&x[0], c), 1e-5, 1e-3);
    }
}

#[test]
fn fused_attention() {
    for (b, t, h, hd, causal) in [(1, 1, 1, 1, false), (2, 7, 2, 3, true), (1, 9, 1, 59, false), (2, 5, 3, 4, false)] {
        let s = [b, t, h * hd];
        check(
            &format!("attention B{b} T{t} H{h} hd{hd} causal {causal}"),
            vec![inp(&s, 37, true), inp(&s, 38, true), inp(&s, 39, true)],
            move |tp, v| tp.attention(&v[0], &v[1], &v[2], h, causal).unwrap(),
            &move |x| attention64(&x[0], &x[1], &x[2], b, t, h, hd, causal),
            1e-4,
            1e-3,
        );
    }
}

#[test]
fn packed_attention() {
    // Sequences of `lens` tokens back to back, each causal on its own: the f64 forward is
    // `attention64` per sequence.
    for (lens, h, hd) in [(vec![1usize], 1usize, 1usize), (vec![3, 1, 5], 2, 3), (vec![7, 2], 1, 59)] {
        let n: usize = lens.iter().sum();
        let s = [n, h * hd];
        let l2 = lens.clone();
        let f64_fwd = move |x: &[Vec<f64>]| -> Vec<f64> {
            let (w, mut off, mut out) = (h * hd, 0, vec![]);
            for &l in &l2 {
                let r = off * w..(off + l) * w;
                out.extend(attention64(&x[0][r.clone()], &x[1][r.clone()], &x[2][r], 1, l, h, hd, true));
                off += l;
            }
            out
        };
        let l3 = lens.clone();
        check(
            &format!("attention_packed {lens:?} H{h} hd{hd}"),
            vec![inp(&s, 40, true), inp(&s, 41, true), inp(&s, 42, true)],
            move |tp, v| tp.attention_packed(&v[0], &v[1], &v[2], h, true, &l3).unwrap(),
            &f64_fwd,
            1e-4,
            1e-3,
        );
    }
}

#[test]
fn gathers() {
    let ids = [3u32, 0, 3, 6, 1];
    check(
        "embedding",
        vec![inp(&[7, 4], 40, true)],
        move |t, v| t.embedding(&v[0], &ids).unwrap(),
        &move |x| ids.iter().flat_map(|&i| x[0][i as usize * 4..i as usize * 4 + 4].to_vec()).collect(),
        1e-6,
        1e-5,
    );
    // 2 images, 3 channels, 7×9 pixels, patch 3 (a remainder is ignored), width 5
    let (b, c, hh, ww, p, d) = (2, 3, 7, 9, 3, 5);
    check(
        "patch_embed (weight)",
        vec![inp(&[b, c, hh, ww], 41, false), inp(&[d, c, p, p], 42, true)],
        |t, v| t.patch_embed(&v[0], &v[1]).unwrap(),
        &move |x| {
            let (gh, gw) = (hh / p, ww / p);
            let mut out = vec![0f64; b * gh * gw * d];
            for (i, o) in out.iter_mut().enumerate() {
                let (bi, g, od) = (i / (gh * gw * d), i / d % (gh * gw), i % d);
                for ci in 0..c {
                    for py in 0..p {
                        for px in 0..p {
                            *o += x[0][((bi * c + ci) * hh + g / gw * p + py) * ww + g % gw * p + px] * x[1][((od * c + ci) * p + py) * p + px];
                        }
                    }
                }
            }
            out
        },
        1e-4,
        1e-3,
    );
    let s = Stretch::new(9, 3, 4).unwrap();
    let pos: Vec<u32> = (0..s.new_len() as u32).chain([0, 5, 20]).collect();
    let pos2 = pos.clone();
    check(
        "pos_gather (Long-CLIP stretch)",
        vec![inp(&[9, 3], 43, true)],
        move |t, v| t.pos_gather(&v[0], s, &pos).unwrap(),
        &move |x| pos_gather_reference(&x[0], 3, s, &pos2).unwrap(),
        1e-5,
        1e-4,
    );
}

#[test]
fn losses() {
    for (n, c, eps) in [(1, 1, 0.0), (7, 7, 0.1), (5, 9, 0.0)] {
        let targets: Vec<u32> = (0..n as u32).map(|i| i % c as u32).collect();
        let tg = targets.clone();
        check(
            &format!("cross_entropy {n}x{c} ε {eps}"),
            vec![inp(&[n, c], 44, true)],
            move |t, v| t.cross_entropy(&v[0], &targets, eps as f32).unwrap(),
            &move |x| vec![clipforge::ops::cross_entropy::cross_entropy_reference(&x[0], c, &tg, eps).unwrap().mean],
            1e-5,
            1e-3,
        );
    }
    check(
        "l2_normalize",
        vec![inp(&[7, 5], 45, true)],
        |t, v| t.l2_normalize(&v[0]).unwrap(),
        &|x| {
            x[0].chunks(5)
                .flat_map(|r| {
                    let n = r.iter().map(|a| a * a).sum::<f64>().sqrt();
                    r.iter().map(move |a| a / n).collect::<Vec<_>>()
                })
                .collect()
        },
        1e-5,
        1e-3,
    );
}

#[test]
fn pca_reconstruction() {
    // a gapped spectrum: column j scaled by 3/(1 + j)
    let mut x = inp(&[9, 6], 46, true);
    x.data.iter_mut().enumerate().for_each(|(i, v)| *v *= 3.0 / (1.0 + (i % 6) as f32));
    check(
        "pca_reconstruct k=2",
        vec![x],
        |t, v| t.pca_reconstruct(&v[0], 2).unwrap(),
        &|x| {
            let (b, d, k) = (9, 6, 2);
            let mean: Vec<f64> = (0..d).map(|j| (0..b).map(|i| x[0][i * d + j]).sum::<f64>() / b as f64).collect();
            let xc: Vec<f64> = (0..b * d).map(|e| x[0][e] - mean[e % d]).collect();
            let mut c = vec![0f64; d * d];
            for r in xc.chunks(d) {
                for i in 0..d {
                    for j in 0..d {
                        c[i * d + j] += r[i] * r[j];
                    }
                }
            }
            let (vals, vecs) = clipforge::ops::pca::sym_eig(&c, d);
            let mut o: Vec<usize> = (0..d).collect();
            o.sort_by(|&i, &j| vals[j].total_cmp(&vals[i]));
            (0..b * d)
                .map(|e| {
                    let (row, q) = (e / d, e % d);
                    mean[q] + (0..k).map(|cc| (0..d).map(|p| xc[row * d + p] * vecs[p * d + o[cc]]).sum::<f64>() * vecs[q * d + o[cc]]).sum::<f64>()
                })
                .collect()
        },
        1e-4,
        1e-3,
    );
}

#[test]
fn a_small_network_end_to_end() {
    // ln → linear → quick_gelu → linear → + residual → l2 normalise → logits·exp(s) → CE both ways
    let (n, w, hdim) = (5, 6, 11);
    let inputs = vec![
        inp(&[n, w], 50, false),
        inp(&[w], 51, true),
        inp(&[w], 52, true),
        inp(&[hdim, w], 53, true),
        inp(&[hdim], 54, true),
        inp(&[w, hdim], 55, true),
        inp(&[1], 56, true),
    ];
    let targets: Vec<u32> = (0..n as u32).collect();
    let tg = targets.clone();
    check(
        "network",
        inputs,
        move |t, v| {
            let h = t.layer_norm(&v[0], &v[1], &v[2], 1e-5).unwrap();
            let a = t.unary(&t.linear(&h, &v[3], Some(&v[4])).unwrap(), Unary::QuickGelu);
            let y = t.add(&v[0], &t.linear(&a, &v[5], None).unwrap()).unwrap();
            let e = t.l2_normalize(&y).unwrap();
            let logits = t.mul(&t.linear(&e, &e, None).unwrap(), &t.exp(&v[6])).unwrap();
            let l1 = t.cross_entropy(&logits, &targets, 0.1).unwrap();
            let l2 = t.cross_entropy(&t.transpose(&logits, 0, 1).unwrap(), &targets, 0.1).unwrap();
            t.add(&l1, &l2).unwrap()
        },
        &move |x| {
            let h = ln64(&x[0], &x[1], &x[2], 1e-5);
            let a: Vec<f64> = linear64(&h, &x[3], Some(&x[4]), hdim, w).iter().map(|&v| unary64(Unary::QuickGelu, v)).collect();
            let y: Vec<f64> = linear64(&a, &x[5], None, w, hdim).iter().zip(&x[0]).map(|(a, b)| a + b).collect();
            let e: Vec<f64> = y
                .chunks(w)
                .flat_map(|r| {
                    let nn = r.iter().map(|a| a * a).sum::<f64>().sqrt();
                    r.iter().map(move |a| a / nn).collect::<Vec<_>>()
                })
                .collect();
            let logits: Vec<f64> = linear64(&e, &e, None, n, w).iter().map(|v| v * x[6][0].exp()).collect();
            let lt: Vec<f64> = (0..n * n).map(|i| logits[(i % n) * n + i / n]).collect();
            let ce = |l: &[f64]| clipforge::ops::cross_entropy::cross_entropy_reference(l, n, &tg, 0.1).unwrap().mean;
            vec![ce(&logits) + ce(&lt)]
        },
        1e-4,
        2e-3,
    );
}

#[test]
fn tape_bookkeeping() {
    let tape = Tape::new();
    let x = tape.param(Tensor::from_vec(vec![1.0, 2.0, 3.0], &[3]).unwrap());
    let c = tape.constant(Tensor::from_vec(vec![4.0, 5.0, 6.0], &[3]).unwrap());
    let before = tape.len();
    let cc = tape.mul(&c, &c).unwrap(); // constants only: nothing recorded
    assert!(!cc.requires_grad());
    assert_eq!(tape.len(), before);
    let frozen = tape.no_grad(|| tape.mul(&x, &x).unwrap());
    assert!(!frozen.requires_grad());
    assert_eq!(tape.len(), before);
    // y = Σ x·x + Σ x·c: x used three times, gradients accumulate to 2x + c
    let y = tape.add(&tape.sum_all(&tape.mul(&x, &x).unwrap()).unwrap(), &tape.sum_all(&tape.mul(&x, &c).unwrap()).unwrap()).unwrap();
    assert_eq!(y.item(), 1.0 + 4.0 + 9.0 + 4.0 + 10.0 + 18.0);
    let grads = tape.backward(&y).unwrap();
    assert_eq!(grads.get(&x).unwrap().to_vec_f32(), vec![6.0, 9.0, 12.0]);
    assert!(grads.get(&c).is_none());
    // backward from a value that depends on no parameter is an error, not a panic
    assert!(Tape::new().backward(&cc).is_err());
}

#[test]
fn a_wrong_rule_is_caught() {
    // A custom op computing x² whose backward forgets the factor 2: the check must fail.
    let result = std::panic::catch_unwind(|| {
        check(
            "planted bug",
            vec![inp(&[4], 60, true)],
            |t, v| {
                let x = v[0].value().clone();
                let y = x.mul(&x).unwrap();
                t.custom(&[&v[0]], y, move |g| Ok(vec![Some(g.mul(&x)?)]))
            },
            &|x| x[0].iter().map(|a| a * a).collect(),
            1e-4,
            1e-3,
        )
    });
    assert!(result.is_err(), "a backward missing its factor 2 passed the gradient check");
}
