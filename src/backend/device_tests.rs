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
        let (mut h, _) = dev.layernorm(&dev.upload(&xv).unwrap(), &g, &b, m, k, 1e-5).unwrap();
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
