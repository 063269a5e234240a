//! Tests of the device backend's half-precision Linears and fused ops on the emulator.
use super::*;
use crate::cuda::EmuOps;

fn lcg(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}
fn r(v: f32, dt: DType) -> f64 {
    if dt == DType::F16 {
        half::f16::from_f32(v).to_f64()
    } else {
        half::bf16::from_f32(v).to_f64()
    }
}
/// C[m×n] = A[m×k]·B[k×n] of f64 values.
fn mm(a: &[f64], b: &[f64], m: usize, n: usize, k: usize) -> Vec<f64> {
    (0..m * n).map(|i| (0..k).map(|j| a[i / n * k + j] * b[j * n + i % n]).sum()).collect()
}
fn close(what: &str, got: &[f32], want: &[f64], k: usize) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((*g as f64 - w).abs() <= 1e-5 * (k as f64).sqrt() * (1.0 + w.abs()), "{what}[{i}]: {g} vs {w}");
    }
}

/// A half Linear's forward and both backward GEMMs read half inputs with f32 accumulation
/// (vs an f64 reference of the rounded values, and measurably not f32), whether x carries the
/// LayerNorm's half copy or is converted; an in-place change drops the copy.
#[test]
fn half_linear_forward_and_backward_round_their_inputs() {
    let (m, n, k) = (13, 7, 37);
    for dt in [DType::BF16, DType::F16] {
        let dev = Device::new(Box::new(EmuOps));
        let (wv, xv, dyv) = (lcg(n * k, 1), lcg(m * k, 2), lcg(m * n, 3));
        let w = dev.weight(dev.upload(&wv).unwrap(), n, k, dt).unwrap();
        let (g, b) = (dev.upload(&vec![1.0; k]).unwrap(), dev.upload(&vec![0.0; k]).unwrap());
        let (mut h, _) = dev.layernorm_for_linear(&dev.upload(&xv).unwrap(), &g, &b, m, k, 1e-5).unwrap();
        assert!(h.half(dt).is_some(), "{dt:?}: the LayerNorm wrote no half copy");
        let hv = dev.download(&h).unwrap();
        let plain = dev.upload(&hv).unwrap(); // the same values without the copy
        let (y1, y2) = (dev.linear(&h, &w, None, m).unwrap(), dev.linear(&plain, &w, None, m).unwrap());
        let (hr, wr): (Vec<f64>, Vec<f64>) = (hv.iter().map(|&v| r(v, dt)).collect(), wv.iter().map(|&v| r(v, dt)).collect());
        let wt: Vec<f64> = (0..k * n).map(|i| wr[i % n * k + i / n]).collect(); // Wᵀ [k, n]
        let want = mm(&hr, &wt, m, n, k);
        assert_eq!(dev.download(&y1).unwrap(), dev.download(&y2).unwrap(), "{dt:?}: kept and converted inputs differ");
        close("y", &dev.download(&y1).unwrap(), &want, k);
        // backward: dx = dy·W (half W), dW = dyᵀ·x (half x), f32 out
        let dy = dev.upload(&dyv).unwrap();
        let mut dx = dev.zeros(m * k).unwrap();
        let (dw, db) = dev.linear_bwd(&dy, &h, &w, m, &mut dx, false, true).unwrap();
        let dyr: Vec<f64> = dyv.iter().map(|&v| r(v, dt)).collect();
        let dyt: Vec<f64> = (0..n * m).map(|i| dyr[i % m * n + i / m]).collect(); // dyᵀ [n, m]
        let (dxv, dwv) = (dev.download(&dx).unwrap(), dev.download(&dw).unwrap());
        close("dx", &dxv, &mm(&dyr, &wr, m, k, n), n);
        close("dW", &dwv, &mm(&dyt, &hr, n, k, m), m);
        let exact_dw = mm(&(0..n * m).map(|i| dyv[i % m * n + i / m] as f64).collect::<Vec<_>>(), &hv.iter().map(|&v| v as f64).collect::<Vec<_>>(), n, k, m);
        assert!(dwv.iter().zip(&exact_dw).any(|(g, e)| (*g as f64 - e).abs() > 1e-4 * (1.0 + e.abs())), "{dt:?}: dW looks like f32");
        let dbv = dev.download(&db.unwrap()).unwrap();
        close("db", &dbv, &(0..n).map(|c| (0..m).map(|i| dyv[i * n + c] as f64).sum()).collect::<Vec<_>>(), m);
        // an in-place update drops the half copy: the next Linear reads the new values
        dev.axpy(&mut h, &plain, 1.0, m * k).unwrap();
        assert!(h.half(dt).is_none());
        let y3 = dev.download(&dev.linear(&h, &w, None, m).unwrap()).unwrap();
        let hr2: Vec<f64> = hv.iter().map(|&v| r(v + v, dt)).collect();
        close("y after axpy", &y3, &mm(&hr2, &wt, m, n, k), k);
    }
}

fn quick_gelu(x: f64) -> f64 {
    x / (1.0 + (-1.702 * x).exp())
}

/// The fused Linears of 16-bit towers against an f64 reference of the rounded inputs: the
/// residual added as the GEMM's C (f32 out); the MLP's pre-activation rounded to 16 bits and held
/// only so ([`Buf::half_only`]), its activation computed from those values and rounded again;
/// q, k, v in 16 bits only where the flash kernels read them (head dim 64) and f32 otherwise
/// (head dim 59); a LayerNorm feeding Linears in 16 bits only; pixels uploaded in 16 bits. Every
/// 16-bit-only buffer still downloads its values.
#[test]
fn fused_half_linears_round_where_documented() {
    let (m, k, n) = (9, 37, 65);
    for dt in [DType::BF16, DType::F16] {
        let u = if dt == DType::F16 { 2f64.powi(-11) } else { 2f64.powi(-8) };
        let dev = Device::new(Box::new(EmuOps));
        let (wv, xv, bv, resv) = (lcg(n * k, 11), lcg(m * k, 12), lcg(n, 13), lcg(m * n, 14));
        let w = dev.weight(dev.upload(&wv).unwrap(), n, k, dt).unwrap();
        let (x, b, res) = (dev.upload(&xv).unwrap(), dev.upload(&bv).unwrap(), dev.upload(&resv).unwrap());
        let (xr, wr): (Vec<f64>, Vec<f64>) = (xv.iter().map(|&v| r(v, dt)).collect(), wv.iter().map(|&v| r(v, dt)).collect());
        let wt: Vec<f64> = (0..k * n).map(|i| wr[i % n * k + i / n]).collect(); // Wᵀ [k, n]
        let base: Vec<f64> = mm(&xr, &wt, m, n, k).iter().enumerate().map(|(i, v)| v + bv[i % n] as f64).collect(); // x·Wᵀ + b
                                                                                                                    // linear_add: f32, res + x·Wᵀ + b
        let y = dev.linear_add(&x, &w, &b, m, &res).unwrap();
        assert!(!y.is_half_only());
        close("linear_add", &dev.download(&y).unwrap(), &base.iter().zip(&resv).map(|(a, c)| a + *c as f64).collect::<Vec<_>>(), k);
        // linear_act: the pre-activation rounded, held in 16 bits only
        let (o, pre) = dev.linear_act(&x, &w, &b, m, Act::QuickGelu, true).unwrap();
        let pre = pre.unwrap();
        assert!(o.is_half_only() && pre.is_half_only(), "{dt:?}: MLP activations must be 16-bit only");
        let (pv, ov) = (dev.download(&pre).unwrap(), dev.download(&o).unwrap());
        for (i, (&p, &e)) in pv.iter().zip(&base).enumerate() {
            assert!((p as f64 - e).abs() <= u * e.abs() + 1e-5 * (k as f64).sqrt() * (1.0 + e.abs()), "{dt:?} pre[{i}]: {p} vs {e}");
            assert_eq!(r(p, dt), p as f64, "{dt:?} pre[{i}] is not a 16-bit value");
            let want = r(quick_gelu(p as f64) as f32, dt);
            assert!((ov[i] as f64 - want).abs() <= 2.0 * u * want.abs() + 1e-6, "{dt:?} act[{i}]: {} vs {want}", ov[i]);
        }
        assert!(pv.iter().zip(&base).any(|(&p, e)| (p as f64 - e).abs() > 1e-3 * u * e.abs()), "{dt:?}: the pre-activation was not rounded");
        // the next Linear reads the 16-bit m as is; a copy and an in-place add give f32 values back
        let mut c = dev.copy(&o, m * n).unwrap();
        assert!(!c.is_half_only());
        assert_eq!(dev.download(&c).unwrap(), ov);
        dev.axpy(&mut c, &o, 1.0, m * n).unwrap();
        assert_eq!(dev.download(&c).unwrap(), ov.iter().map(|v| v + v).collect::<Vec<_>>());
        // LayerNorm feeding Linears: 16-bit only, the same values as the plain LayerNorm's copy
        let (g, bb) = (dev.upload(&vec![1.0; k]).unwrap(), dev.upload(&vec![0.0; k]).unwrap());
        let (h, _) = dev.layernorm_for_linear(&x, &g, &bb, m, k, 1e-5).unwrap();
        let (hf, _) = dev.layernorm(&x, &g, &bb, m, k, 1e-5).unwrap();
        assert!(h.is_half_only());
        assert_eq!(dev.download(&h).unwrap(), dev.download(&hf).unwrap().iter().map(|&v| r(v, dt) as f32).collect::<Vec<_>>());
        assert!(hf.half(dt).is_none(), "a plain LayerNorm writes f32 only");
        // rows of a 16-bit-only matrix are gathered in 16 bits (even widths), exactly
        let rows = [8, 0, 3];
        let hv = dev.download(&h).unwrap();
        let odd = dev.gather_rows(&h, &rows, k).unwrap(); // odd width: through f32
        assert_eq!(dev.download(&odd).unwrap(), rows.iter().flat_map(|&r| hv[r * k..(r + 1) * k].to_vec()).collect::<Vec<_>>());
        let (hh, _) = dev
            .layernorm_for_linear(&dev.upload(&lcg(m * 36, 40)).unwrap(), &dev.upload(&[1.0; 36]).unwrap(), &dev.upload(&[0.0; 36]).unwrap(), m, 36, 1e-5)
            .unwrap();
        let g16 = dev.gather_rows(&hh, &rows, 36).unwrap();
        assert!(g16.is_half_only());
        let all = dev.download(&hh).unwrap();
        assert_eq!(dev.download(&g16).unwrap(), rows.iter().flat_map(|&r| all[r * 36..(r + 1) * 36].to_vec()).collect::<Vec<_>>());
        // pixels: 16 bits over the bus
        let px = dev.upload_input(&xv).unwrap();
        assert!(px.is_half_only());
        assert_eq!(dev.download(&px).unwrap(), xr.iter().map(|&v| v as f32).collect::<Vec<_>>());
        // q, k, v: 16-bit only for the flash kernels (head dim 64), f32 for head dim 59
        for (width, heads, flash) in [(64, 1, true), (118, 2, false)] {
            let ws: Vec<Weight<Device>> = (0..3).map(|s| dev.weight(dev.upload(&lcg(width * k, 20 + s)).unwrap(), width, k, dt).unwrap()).collect();
            let bs: Vec<Buf> = (0..3).map(|s| dev.upload(&lcg(width, 30 + s)).unwrap()).collect();
            let qkv = dev.qkv(&x, [&ws[0], &ws[1], &ws[2]], [&bs[0], &bs[1], &bs[2]], m, heads).unwrap();
            for t in &qkv {
                assert_eq!(t.is_half_only(), flash, "{dt:?} width {width}: 16-bit only iff the flash kernels read it");
            }
            let q = dev.download(&qkv[0]).unwrap();
            let want = dev.download(&dev.linear(&x, &ws[0], Some(&bs[0]), m).unwrap()).unwrap();
            for (i, (&a, &e)) in q.iter().zip(&want).enumerate() {
                let e = if flash { r(e, dt) } else { e as f64 };
                assert!((a as f64 - e).abs() <= u * e.abs() + 1e-6, "{dt:?} q[{i}]: {a} vs {e}");
            }
        }
    }
}
