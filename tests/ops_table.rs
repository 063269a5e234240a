//! The fused-op interface (`backend::Ops`) as one table: every operation the model is written
//! against runs on the CPU backend and on the emulated CUDA backend (in every warp schedule), and
//! each output is compared per element with the plain reference ops (`ops::*_reference`, f64 where
//! they have it), at odd shapes: 1 row, 7×45→65, widths 59 and 118 (head dim 59), packed
//! sequences of 5, 1 and 9 tokens and of 70, 1 and 130 (several query and key tiles; on the device
//! the variable-length kernels). (A real GPU would be a third column: `GpuOps::open()`.)
mod common;
mod emu_common;
use clipforge::backend::cpu::Cpu;
use clipforge::backend::device::Device;
use clipforge::backend::{Act, Ops, Seqs};
use clipforge::cuda::EmuOps;
use clipforge::ops::attention::{attention_backward_reference, attention_packed_reference, attention_reference, AttnShape};
use clipforge::ops::elementwise::{unary_bwd_reference, unary_reference, Unary};
use clipforge::ops::layernorm::{layer_norm_bwd_reference, layer_norm_reference};
use clipforge::ops::matmul::{gemm_reference, linear_reference, View};
use clipforge::ops::patch_embed::{patch_embed_bwd_weight_reference, patch_embed_reference, PatchShape};
use clipforge::DType;
use common::{assert_close, randn};

/// One row of the table: a name, the op on a backend, its reference, and the tolerance.
type Out = Vec<(String, Vec<f32>)>;

fn f64s(v: Vec<f64>) -> Vec<f32> {
    v.into_iter().map(|x| x as f32).collect()
}

/// Every op on backend `ops`, as named outputs.
fn run<O: Ops>(ops: &O) -> Out {
    let mut out: Out = vec![];
    let up = |v: &[f32]| ops.upload(v).unwrap();
    let dl = |b: &O::Buf, n: usize| ops.download(b).unwrap()[..n].to_vec();
    // linear and its backward: m × k → n, and a single row
    for (m, k, n) in [(7, 45, 65), (1, 59, 7)] {
        let (x, w, b, dy) = (randn(m * k, 1), randn(n * k, 2), randn(n, 3), randn(m * n, 4));
        let wt = ops.weight(up(&w), n, k, DType::F32).unwrap();
        out.push((format!("linear {m}x{k}->{n}"), dl(&ops.linear(&up(&x), &wt, Some(&up(&b)), m).unwrap(), m * n)));
        let mut dx = up(&randn(m * k, 5));
        let (dw, db) = ops.linear_bwd(&up(&dy), &up(&x), &wt, m, &mut dx, true, true).unwrap();
        out.push((format!("linear_bwd dx+= {m}x{k}"), dl(&dx, m * k)));
        out.push((format!("linear_bwd dW {n}x{k}"), dl(&dw, n * k)));
        out.push((format!("linear_bwd db {n}"), dl(&db.unwrap(), n)));
    }
    // the fused Linears: residual add, bias + activation, the three attention projections
    {
        let (m, k, n) = (7, 45, 65);
        let (x, w, b, res) = (randn(m * k, 1), randn(n * k, 2), randn(n, 3), randn(m * n, 14));
        let wt = ops.weight(up(&w), n, k, DType::F32).unwrap();
        out.push(("linear_add".into(), dl(&ops.linear_add(&up(&x), &wt, &up(&b), m, &up(&res)).unwrap(), m * n)));
        let (o, pre) = ops.linear_act(&up(&x), &wt, &up(&b), m, Act::QuickGelu, true).unwrap();
        out.push(("linear_act".into(), dl(&o, m * n)));
        out.push(("linear_act pre".into(), dl(&pre.unwrap(), m * n)));
        let ws: Vec<_> = (0..3).map(|i| ops.weight(up(&randn(n * k, 40 + i)), n, k, DType::F32).unwrap()).collect();
        let bs: Vec<_> = (0..3).map(|i| up(&randn(n, 50 + i))).collect();
        let qkv = ops.qkv(&up(&x), [&ws[0], &ws[1], &ws[2]], [&bs[0], &bs[1], &bs[2]], m, 5).unwrap();
        for (name, t) in ["q", "k", "v"].iter().zip(&qkv) {
            out.push((format!("qkv {name}"), dl(t, m * n)));
        }
        let ds: Vec<_> = (0..3).map(|i| up(&randn(m * n, 60 + i))).collect();
        let (dh, dw, db) = ops.qkv_bwd([&ds[0], &ds[1], &ds[2]], &up(&x), [&ws[0], &ws[1], &ws[2]], m).unwrap();
        out.push(("qkv_bwd dh".into(), dl(&dh, m * k)));
        for i in 0..3 {
            out.push((format!("qkv_bwd dW {i}"), dl(&dw[i], n * k)));
            out.push((format!("qkv_bwd db {i}"), dl(&db[i], n)));
        }
    }
    // LayerNorm, with the residual add, and its backward: rows × 59
    let (r, w) = (7, 59);
    let (x, f, g, b, dy) = (randn(r * w, 6), randn(r * w, 7), randn(w, 8), randn(w, 9), randn(r * w, 10));
    let (y, st) = ops.layernorm(&up(&x), &up(&g), &up(&b), r, w, 1e-5).unwrap();
    out.push(("layernorm".into(), dl(&y, r * w)));
    let mut xr = up(&x);
    let (y2, _) = ops.add_layernorm(&mut xr, &up(&f), &up(&g), &up(&b), r, w, 1e-5).unwrap();
    out.push(("add_layernorm x".into(), dl(&xr, r * w)));
    out.push(("add_layernorm y".into(), dl(&y2, r * w)));
    let (dx, dg, db) = ops.layernorm_bwd(&up(&dy), &up(&x), &up(&g), &st, r, w, 1e-5).unwrap();
    out.extend([("layernorm_bwd dx".into(), dl(&dx, r * w)), ("layernorm_bwd dg".into(), dl(&dg, w)), ("layernorm_bwd db".into(), dl(&db, w))]);
    let (h, _) = ops.layernorm_for_linear(&up(&x), &up(&g), &up(&b), r, w, 1e-5).unwrap();
    out.push(("layernorm_for_linear".into(), dl(&h, r * w)));
    let (dx, dg, db) = ops.layernorm_bwd_add(&up(&dy), &up(&x), &up(&g), &st, r, w, 1e-5, &up(&f)).unwrap();
    out.extend([("layernorm_bwd_add dx".into(), dl(&dx, r * w)), ("layernorm_bwd_add dg".into(), dl(&dg, w)), ("layernorm_bwd_add db".into(), dl(&db, w))]);
    // bias + activation and backward: rows × 65
    let n = 65;
    for act in [Act::QuickGelu, Act::Gelu] {
        let (u, bias, d) = (randn(r * n, 11), randn(n, 12), randn(r * n, 13));
        let (o, pre) = ops.bias_act(up(&u), &up(&bias), r, n, act, true).unwrap();
        let pre = pre.unwrap();
        out.push((format!("bias_act {act:?}"), dl(&o, r * n)));
        let (o2, none) = ops.bias_act(up(&u), &up(&bias), r, n, act, false).unwrap();
        assert!(none.is_none(), "inference keeps no pre-activation");
        out.push((format!("bias_act {act:?} inference"), dl(&o2, r * n)));
        let (du, db) = ops.bias_act_bwd(&up(&d), &pre, r, n, act).unwrap();
        out.push((format!("bias_act_bwd du {act:?}"), dl(&du, r * n)));
        out.push((format!("bias_act_bwd db {act:?}"), dl(&db, n)));
    }
    // attention: batched (causal and not) and packed; width 118 = 2 heads of 59
    let (heads, aw) = (2, 118);
    for seqs in [
        Seqs::Batch { batch: 2, seq: 7, causal: false },
        Seqs::Batch { batch: 2, seq: 7, causal: true },
        Seqs::Packed(vec![5, 1, 9]),
        Seqs::Packed(vec![70, 1, 130]),
    ] {
        let nr = seqs.rows();
        let (q, k, v, d) = (randn(nr * aw, 14), randn(nr * aw, 15), randn(nr * aw, 16), randn(nr * aw, 17));
        let (o, lse) = ops.attention(&up(&q), &up(&k), &up(&v), &seqs, heads, aw).unwrap();
        out.push((format!("attention {seqs:?}"), dl(&o, nr * aw)));
        let (dq, dk, dv) = ops.attention_bwd(&up(&q), &up(&k), &up(&v), &o, &lse, &up(&d), &seqs, heads, aw).unwrap();
        out.extend([
            (format!("attention_bwd dq {seqs:?}"), dl(&dq, nr * aw)),
            (format!("attention_bwd dk {seqs:?}"), dl(&dk, nr * aw)),
            (format!("attention_bwd dv {seqs:?}"), dl(&dv, nr * aw)),
        ]);
    }
    // rows: axpy, copy, gather, scatter, embedding backward
    let (x, y) = (randn(r * w, 18), randn(r * w, 19));
    let mut yb = up(&y);
    ops.axpy(&mut yb, &up(&x), -0.5, r * w).unwrap();
    out.push(("axpy".into(), dl(&yb, r * w)));
    out.push(("copy".into(), dl(&ops.copy(&up(&x), r * w).unwrap(), r * w)));
    let rows = [6, 0, 3];
    let gathered = ops.gather_rows(&up(&x), &rows, w).unwrap();
    out.push(("gather_rows".into(), dl(&gathered, 3 * w)));
    out.push(("scatter_rows".into(), dl(&ops.scatter_rows(&gathered, &rows, r, w).unwrap(), r * w)));
    let ids = [3, 1, 3, 0, 3, 2, 1];
    let mut table = up(&randn(4 * w, 20));
    ops.embedding_bwd(&up(&x), &ids, &mut table, w).unwrap();
    out.push(("embedding_bwd".into(), dl(&table, 4 * w)));
    // patch embedding (2 images, 3 channels, 14×14, patch 7 → 4 patches of dim 13) and the class/position assembly
    let (b, c, s, p, dd) = (2, 3, 14, 7, 13);
    let np = (s / p) * (s / p);
    let (px, pw, dp) = (randn(b * c * s * s, 21), randn(dd * c * p * p, 22), randn(b * np * dd, 23));
    let pwt = ops.weight(up(&pw), dd, c * p * p, DType::F32).unwrap();
    out.push(("patch_embed".into(), dl(&ops.patch_embed(&up(&px), &pwt, b, c, s, p).unwrap(), b * np * dd)));
    out.push(("patch_embed_bwd".into(), dl(&ops.patch_embed_bwd(&up(&px), &up(&dp), b, c, s, p, dd).unwrap(), dd * c * p * p)));
    let (cls, pos, dx) = (randn(dd, 24), randn((np + 1) * dd, 25), randn(b * (np + 1) * dd, 26));
    out.push(("vision_embed".into(), dl(&ops.vision_embed(&up(&dp), &up(&cls), &up(&pos), b, np, dd).unwrap(), b * (np + 1) * dd)));
    let (dpa, dcl, dpo) = ops.vision_embed_bwd(&up(&dx), b, np, dd).unwrap();
    out.extend([
        ("vision_embed_bwd patches".into(), dl(&dpa, b * np * dd)),
        ("vision_embed_bwd cls".into(), dl(&dcl, dd)),
        ("vision_embed_bwd pos".into(), dl(&dpo, (np + 1) * dd)),
    ]);
    out
}

/// The same table from the plain reference ops.
fn reference() -> Out {
    let mut out: Out = vec![];
    for (m, k, n) in [(7, 45, 65), (1, 59, 7)] {
        let (x, w, b, dy) = (randn(m * k, 1), randn(n * k, 2), randn(n, 3), randn(m * n, 4));
        out.push((format!("linear {m}x{k}->{n}"), linear_reference(&x, m, k, &w, n, Some(&b))));
        let mut dx = randn(m * k, 5);
        gemm_reference(View::row_major(&dy, m, n), View::row_major(&w, n, k), &mut dx, true);
        let mut dw = vec![0f32; n * k];
        gemm_reference(View::row_major(&dy, m, n).t(), View::row_major(&x, m, k), &mut dw, false);
        let db: Vec<f32> = (0..n).map(|j| (0..m).map(|i| dy[i * n + j] as f64).sum::<f64>() as f32).collect();
        out.extend([(format!("linear_bwd dx+= {m}x{k}"), dx), (format!("linear_bwd dW {n}x{k}"), dw), (format!("linear_bwd db {n}"), db)]);
    }
    {
        let (m, k, n) = (7, 45, 65);
        let (x, w, b, res) = (randn(m * k, 1), randn(n * k, 2), randn(n, 3), randn(m * n, 14));
        let y = linear_reference(&x, m, k, &w, n, Some(&b));
        out.push(("linear_add".into(), y.iter().zip(&res).map(|(a, c)| a + c).collect()));
        out.push(("linear_act".into(), unary_reference(Unary::QuickGelu, &y)));
        out.push(("linear_act pre".into(), y));
        let ws: Vec<_> = (0..3).map(|i| randn(n * k, 40 + i)).collect();
        let bs: Vec<_> = (0..3).map(|i| randn(n, 50 + i)).collect();
        for (i, name) in ["q", "k", "v"].iter().enumerate() {
            out.push((format!("qkv {name}"), linear_reference(&x, m, k, &ws[i], n, Some(&bs[i]))));
        }
        let ds: Vec<_> = (0..3).map(|i| randn(m * n, 60 + i)).collect();
        let mut dh = vec![0f32; m * k];
        for i in 0..3 {
            gemm_reference(View::row_major(&ds[i], m, n), View::row_major(&ws[i], n, k), &mut dh, true);
        }
        out.push(("qkv_bwd dh".into(), dh));
        for (i, d) in ds.iter().enumerate() {
            let mut dw = vec![0f32; n * k];
            gemm_reference(View::row_major(d, m, n).t(), View::row_major(&x, m, k), &mut dw, false);
            out.push((format!("qkv_bwd dW {i}"), dw));
            out.push((format!("qkv_bwd db {i}"), (0..n).map(|j| (0..m).map(|r| d[r * n + j] as f64).sum::<f64>() as f32).collect()));
        }
    }
    let (r, w) = (7, 59);
    let (x, f, g, b, dy) = (randn(r * w, 6), randn(r * w, 7), randn(w, 8), randn(w, 9), randn(r * w, 10));
    out.push(("layernorm".into(), layer_norm_reference(&x, w, &g, &b, 1e-5)));
    let xf: Vec<f32> = x.iter().zip(&f).map(|(a, b)| a + b).collect();
    out.push(("add_layernorm x".into(), xf.clone()));
    out.push(("add_layernorm y".into(), layer_norm_reference(&xf, w, &g, &b, 1e-5)));
    let (dx, dg, db) = layer_norm_bwd_reference(&x, w, &g, &dy, 1e-5);
    let dx = f64s(dx);
    let dxa: Vec<f32> = dx.iter().zip(&f).map(|(a, c)| a + c).collect();
    out.extend([("layernorm_bwd dx".into(), dx), ("layernorm_bwd dg".into(), f64s(dg.clone())), ("layernorm_bwd db".into(), f64s(db.clone()))]);
    out.push(("layernorm_for_linear".into(), layer_norm_reference(&x, w, &g, &b, 1e-5)));
    out.extend([("layernorm_bwd_add dx".into(), dxa), ("layernorm_bwd_add dg".into(), f64s(dg)), ("layernorm_bwd_add db".into(), f64s(db))]);
    let n = 65;
    for (act, op) in [(Act::QuickGelu, Unary::QuickGelu), (Act::Gelu, Unary::Gelu)] {
        let (u, bias, d) = (randn(r * n, 11), randn(n, 12), randn(r * n, 13));
        let pre: Vec<f32> = u.iter().enumerate().map(|(i, v)| v + bias[i % n]).collect();
        out.push((format!("bias_act {act:?}"), unary_reference(op, &pre)));
        out.push((format!("bias_act {act:?} inference"), unary_reference(op, &pre)));
        let du = f64s(unary_bwd_reference(op, &pre, &d));
        let db: Vec<f32> = (0..n).map(|j| (0..r).map(|i| du[i * n + j] as f64).sum::<f64>() as f32).collect();
        out.extend([(format!("bias_act_bwd du {act:?}"), du), (format!("bias_act_bwd db {act:?}"), db)]);
    }
    let (heads, aw) = (2, 118);
    for seqs in [
        Seqs::Batch { batch: 2, seq: 7, causal: false },
        Seqs::Batch { batch: 2, seq: 7, causal: true },
        Seqs::Packed(vec![5, 1, 9]),
        Seqs::Packed(vec![70, 1, 130]),
    ] {
        let nr = seqs.rows();
        let (q, k, v, d) = (randn(nr * aw, 14), randn(nr * aw, 15), randn(nr * aw, 16), randn(nr * aw, 17));
        let shape = |batch, seq, causal| AttnShape { batch, seq, heads, head_dim: 59, causal, scale: 1.0 / (59f32).sqrt() };
        // the backward reference per sequence (batched, or each packed sequence alone)
        let parts: Vec<(usize, AttnShape)> = match &seqs {
            Seqs::Batch { batch, seq, causal } => vec![(0, shape(*batch, *seq, *causal))],
            Seqs::Packed(lens) => lens.iter().scan(0, |off, &l| Some((std::mem::replace(off, *off + l), shape(1, l, true)))).collect(),
        };
        let o = match &seqs {
            Seqs::Packed(lens) => attention_packed_reference(&q, &k, &v, lens, heads, true).0,
            _ => attention_reference(&q, &k, &v, &parts[0].1).0,
        };
        out.push((format!("attention {seqs:?}"), o));
        let (mut dq, mut dk, mut dv) = (vec![], vec![], vec![]);
        for (off, s) in &parts {
            let rg = off * aw..(off + s.batch * s.seq) * aw;
            let (o, lse) = attention_reference(&q[rg.clone()], &k[rg.clone()], &v[rg.clone()], s);
            let (a, b, c) = attention_backward_reference(&q[rg.clone()], &k[rg.clone()], &v[rg.clone()], &o, &lse, &d[rg], s);
            dq.extend(a);
            dk.extend(b);
            dv.extend(c);
        }
        out.extend([(format!("attention_bwd dq {seqs:?}"), dq), (format!("attention_bwd dk {seqs:?}"), dk), (format!("attention_bwd dv {seqs:?}"), dv)]);
    }
    let (x, y) = (randn(r * w, 18), randn(r * w, 19));
    out.push(("axpy".into(), y.iter().zip(&x).map(|(a, b)| a - 0.5 * b).collect()));
    out.push(("copy".into(), x.clone()));
    let rows = [6, 0, 3];
    let gathered: Vec<f32> = rows.iter().flat_map(|&i| x[i * w..(i + 1) * w].to_vec()).collect();
    out.push(("gather_rows".into(), gathered.clone()));
    let mut sc = vec![0f32; r * w];
    for (j, &i) in rows.iter().enumerate() {
        sc[i * w..(i + 1) * w].copy_from_slice(&gathered[j * w..(j + 1) * w]);
    }
    out.push(("scatter_rows".into(), sc));
    let ids = [3u32, 1, 3, 0, 3, 2, 1];
    let base = randn(4 * w, 20);
    let add = clipforge::ops::embedding::embedding_bwd(&x, 4, w, &ids).unwrap();
    out.push(("embedding_bwd".into(), base.iter().zip(&add).map(|(a, b)| a + b).collect()));
    let (b, c, s, p, dd) = (2, 3, 14, 7, 13);
    let np = (s / p) * (s / p);
    let (px, pw, dp) = (randn(b * c * s * s, 21), randn(dd * c * p * p, 22), randn(b * np * dd, 23));
    let shape = PatchShape { batch: b, channels: c, height: s, width: s, patch: p, dim: dd };
    out.push(("patch_embed".into(), patch_embed_reference(&px, &pw, &shape)));
    out.push(("patch_embed_bwd".into(), f64s(patch_embed_bwd_weight_reference(&px, &dp, &shape))));
    let (cls, pos, dx) = (randn(dd, 24), randn((np + 1) * dd, 25), randn(b * (np + 1) * dd, 26));
    let t = np + 1;
    let emb: Vec<f32> = (0..b * t * dd)
        .map(|i| {
            let (bi, ti, c) = (i / (t * dd), i / dd % t, i % dd);
            (if ti == 0 { cls[c] } else { dp[(bi * np + ti - 1) * dd + c] }) + pos[ti * dd + c]
        })
        .collect();
    out.push(("vision_embed".into(), emb));
    let dpa: Vec<f32> = (0..b * np * dd).map(|i| dx[((i / dd / np) * t + i / dd % np + 1) * dd + i % dd]).collect();
    let dcl: Vec<f32> = (0..dd).map(|c| (0..b).map(|bi| dx[bi * t * dd + c]).sum()).collect();
    let dpo: Vec<f32> = (0..t * dd).map(|i| (0..b).map(|bi| dx[bi * t * dd + i]).sum()).collect();
    out.extend([("vision_embed_bwd patches".into(), dpa), ("vision_embed_bwd cls".into(), dcl), ("vision_embed_bwd pos".into(), dpo)]);
    out
}

fn check(backend: &str, got: &Out, want: &Out) {
    assert_eq!(got.len(), want.len(), "{backend}: table rows");
    for ((name, g), (wname, w)) in got.iter().zip(want) {
        assert_eq!(name, wname, "{backend}: row order");
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
        assert_close(&format!("{backend}: {name}"), g, w, 1e-5 * scale, 1e-4);
    }
}

#[test]
fn every_op_on_the_cpu_backend_matches_the_reference() {
    check("cpu", &run(&Cpu), &reference());
}

#[test]
fn every_op_on_the_emulated_device_matches_the_reference_in_every_warp_schedule() {
    let want = reference();
    let dev = Device::new(Box::new(EmuOps));
    for s in emu_common::TEST_SCHEDULES {
        emu_common::set_schedule(s);
        check(&format!("emulated cuda ({})", emu_common::sched_name(s)), &run(&dev), &want);
    }
    emu_common::set_schedule(emu_common::Schedule::Forward);
}

#[test]
fn a_real_gpu_matches_the_reference() {
    match clipforge::cuda::GpuOps::open() {
        Ok(g) => check("cuda", &run(&Device::new(Box::new(g))), &reference()),
        Err(why) => eprintln!("skipped: no CUDA device ({why})"),
    }
}
