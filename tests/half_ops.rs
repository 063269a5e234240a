//! The launchers of src/cuda/half_ops.rs and train_ops::copy / reduce_parts on the emulated device
//! (`EmuOps`): buffer sizes, the vector-or-scalar choice and the two-stage sums end to end, against
//! CPU references (per-element tolerances; 16-bit outputs within one unit of bf16/f16 roundoff).
mod common;
use clipforge::cuda::backend::{Buf, DeviceOps};
use clipforge::cuda::half_ops::{act_bwd_half, act_half, col_sums_half, layernorm_bwd, layernorm_half, patch_im2col_half};
use clipforge::cuda::train_ops::{copy, reduce_parts};
use clipforge::cuda::EmuOps;
use clipforge::ops::elementwise::{unary_bwd_reference, Unary};
use clipforge::ops::layernorm::{layer_norm_bwd_reference, layer_norm_reference};
use clipforge::tensor::DType;

fn round(v: f32, dt: DType) -> (u16, f32) {
    if dt == DType::F16 {
        let h = half::f16::from_f32(v);
        (h.to_bits(), h.to_f32())
    } else {
        let h = half::bf16::from_f32(v);
        (h.to_bits(), h.to_f32())
    }
}

fn upload_half(ops: &EmuOps, v: &[f32], dt: DType) -> (Buf, Vec<f32>) {
    let bits: Vec<half::bf16> = v.iter().map(|&x| half::bf16::from_bits(round(x, dt).0)).collect();
    (ops.upload_bf16(&bits).unwrap(), v.iter().map(|&x| round(x, dt).1).collect())
}

fn download_half(ops: &EmuOps, b: &Buf, n: usize, dt: DType) -> Vec<f32> {
    let words = ops.download(b).unwrap();
    (0..n)
        .map(|i| {
            let bits = (words[i / 2].to_bits() >> (16 * (i % 2))) as u16;
            if dt == DType::F16 {
                half::f16::from_bits(bits).to_f32()
            } else {
                half::bf16::from_bits(bits).to_f32()
            }
        })
        .collect()
}

fn unit(dt: DType) -> f32 {
    if dt == DType::F16 {
        2f32.powi(-11)
    } else {
        2f32.powi(-8)
    }
}

const SHAPES: [(usize, usize); 4] = [(1, 1), (7, 59), (45, 65), (33, 768)];

#[test]
fn copy_and_reduce_parts() {
    let ops = EmuOps;
    for n in [1, 7, 4003, 4096] {
        let x = common::randn(n, 1);
        let y = copy(&ops, &ops.upload(&x).unwrap(), n).unwrap();
        assert_eq!(ops.download(&y).unwrap(), x, "copy {n}");
    }
    assert!(copy(&ops, &ops.upload(&[1.0]).unwrap(), 2).is_err());
    for (parts, n) in [(1, 1), (300, 7), (2100, 5)] {
        let p = common::randn(parts * n, 2);
        let want: Vec<f32> = (0..n).map(|c| (0..parts).map(|r| p[r * n + c] as f64).sum::<f64>() as f32).collect();
        let got = ops.download(&reduce_parts(&ops, &ops.upload(&p).unwrap(), parts, n).unwrap()).unwrap();
        common::assert_close(&format!("reduce_parts {parts}x{n}"), &got, &want, 1e-6 * parts as f32, 1e-5);
    }
}

#[test]
fn activation_forward_and_backward_on_halves() {
    let ops = EmuOps;
    for dt in [DType::BF16, DType::F16] {
        for (rows, n) in SHAPES {
            for (code, act) in [(0, Unary::QuickGelu), (1, Unary::Gelu)] {
                let what = format!("{dt:?} {rows}x{n} act {code}");
                let (pre, prev) = upload_half(&ops, &common::randn(rows * n, 3).iter().map(|v| v * 3.0).collect::<Vec<_>>(), dt);
                let out = act_half(&ops, dt, &pre, rows, n, code).unwrap();
                let want: Vec<f32> = prev.iter().map(|&v| act.eval_ref(v)).collect();
                common::assert_close(&format!("act_half {what}"), &download_half(&ops, &out, rows * n, dt), &want, 1e-6, 2.0 * unit(dt));

                let dout = common::randn(rows * n, 4);
                let (du, db) = act_bwd_half(&ops, dt, &ops.upload(&dout).unwrap(), &pre, rows, n, code).unwrap();
                let g = unary_bwd_reference(act, &prev, &dout);
                let gw: Vec<f32> = g.iter().map(|&v| v as f32).collect();
                common::assert_close(&format!("act_bwd_half du {what}"), &download_half(&ops, &du, rows * n, dt), &gw, 1e-6, 2.0 * unit(dt));
                let dbw: Vec<f32> = (0..n).map(|c| (0..rows).map(|r| g[r * n + c]).sum::<f64>() as f32).collect();
                common::assert_close(&format!("act_bwd_half db {what}"), &ops.download(&db).unwrap(), &dbw, 1e-5 * (rows as f32).sqrt(), 1e-5);

                let (m, mv) = upload_half(&ops, &common::randn(rows * n, 5), dt);
                let s = col_sums_half(&ops, dt, &m, rows, n).unwrap();
                let sw: Vec<f32> = (0..n).map(|c| (0..rows).map(|r| mv[r * n + c] as f64).sum::<f64>() as f32).collect();
                common::assert_close(&format!("col_sums_half {what}"), &ops.download(&s).unwrap(), &sw, 1e-6 * rows as f32, 1e-5);
            }
        }
        assert!(act_half(&ops, DType::F32, &ops.upload(&[0.0]).unwrap(), 1, 1, 0).is_err());
        assert!(act_half(&ops, dt, &ops.upload(&[0.0]).unwrap(), 3, 1, 0).is_err(), "3 halves from one word");
    }
}

#[test]
fn layernorms_and_im2col_on_halves() {
    let ops = EmuOps;
    for (rows, w) in SHAPES {
        let x: Vec<f32> = common::randn(rows * w, 6).iter().map(|v| 2.0 * v + 0.5).collect();
        let g: Vec<f32> = common::randn(w, 7).iter().map(|v| 1.0 + 0.1 * v).collect();
        let b = common::randn(w, 8);
        let (xb, gb, bb) = (ops.upload(&x).unwrap(), ops.upload(&g).unwrap(), ops.upload(&b).unwrap());
        let y = layer_norm_reference(&x, w, &g, &b, 1e-5);
        for dt in [DType::BF16, DType::F16] {
            let (yh, st) = layernorm_half(&ops, dt, &xb, &gb, &bb, rows, w, 1e-5).unwrap();
            common::assert_close(&format!("layernorm_half {dt:?} {rows}x{w}"), &download_half(&ops, &yh, rows * w, dt), &y, 1e-5, 2.0 * unit(dt));
            assert_eq!(ops.download(&st).unwrap().len(), 2 * rows);
        }
        // the backward from the f32 LayerNorm's stats, with the residual gradient added
        let (_, st) = layernorm_half(&ops, DType::BF16, &xb, &gb, &bb, rows, w, 1e-5).unwrap();
        let (dy, res) = (common::randn(rows * w, 9), common::randn(rows * w, 10));
        let (dx, dg, dbeta) = layernorm_bwd(&ops, &ops.upload(&dy).unwrap(), &xb, &gb, &st, Some(&ops.upload(&res).unwrap()), rows, w).unwrap();
        let (rdx, rdg, rdb) = layer_norm_bwd_reference(&x, w, &g, &dy, 1e-5);
        let f = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<_>>();
        let want: Vec<f32> = rdx.iter().zip(&res).map(|(d, r)| (d + *r as f64) as f32).collect();
        common::assert_close(&format!("layernorm_bwd_add dx {rows}x{w}"), &ops.download(&dx).unwrap(), &want, 1e-4, 1e-4);
        common::assert_close(&format!("layernorm_bwd_add dgamma {rows}x{w}"), &ops.download(&dg).unwrap(), &f(&rdg), 1e-4 * (rows as f32).sqrt(), 1e-4);
        common::assert_close(&format!("layernorm_bwd_add dbeta {rows}x{w}"), &ops.download(&dbeta).unwrap(), &f(&rdb), 1e-5 * (rows as f32).sqrt(), 1e-5);
    }
    // im2col: 2 images, 3 channels, 10×10, patch 3 (a remainder of one pixel)
    let (b, c, s, p) = (2, 3, 10, 3);
    let (gsz, kk) = (s / p, c * p * p);
    let n = gsz * gsz;
    for dt in [DType::BF16, DType::F16] {
        let (px, pv) = upload_half(&ops, &common::randn(b * c * s * s, 11), dt);
        let cols = patch_im2col_half(&ops, &px, b, c, s, p).unwrap();
        let want: Vec<f32> = (0..b * n * kk)
            .map(|i| {
                let (row, col) = (i / kk, i % kk);
                let (bi, patch) = (row / n, row % n);
                let (ci, ky, kx) = (col / (p * p), col % (p * p) / p, col % p);
                pv[((bi * c + ci) * s + patch / gsz * p + ky) * s + patch % gsz * p + kx]
            })
            .collect();
        assert_eq!(download_half(&ops, &cols, b * n * kk, dt), want, "patch_im2col_half {dt:?}");
        assert!(patch_im2col_half(&ops, &px, b, c, s, 0).is_err());
    }
}
