//! Attention's backward with bf16 products on the CPU (`ops::attention_bf16_bwd`): every bf16
//! GEMM kernel (the AMX blocking on the software tile model, the real tiles where Linux grants
//! AMX, `vdpbf16ps`, bf16 through f32 FMAs, the portable kernel), on the detected CPU path and on
//! the scalar one, against the f64 reference of the same rounding (q, k, v, dO, P and dS to bf16)
//! at odd shapes: T = 1, 7, 45, 50, 77, 130 and 248 (several query and key blocks, causal key
//! prefixes and query suffixes), head dims 1, 20, 33, 59, 64, 65; then against the exact f64
//! backward (itself checked against finite differences in tests/attention_grad.rs) within bf16's
//! error; bf16 inputs give the bits of f32 inputs rounded (on `vdpbf16ps` the fused per-head
//! backward against the composed one); packed sequences; the same bits for any thread count; and
//! the CPU backend's `attention_bwd` takes this path for bf16 q, k, v.
//!
//! Tolerance, per element: |x − ref| ≤ ATOL + RTOL·|ref|. Both sides round P and dS to bf16;
//! where the f32 values and the f64 ones straddle a rounding boundary (P: about one in 2000)
//! that operand differs by one bf16 ulp, 2^-8 of it: dV moves by at most 2^-8·P·|dO| ≤
//! 2^-8·0.5, dK and dQ by 2^-8·|dS|·2 (|q|, |k| ≤ 2, |dS| < 0.5 here); ATOL = 2e-3 holds one
//! such straddle per output element; a lost, doubled, misplaced or unmasked entry moves outputs
//! by ~0.05–0.5.
mod common;
use clipforge::backend::cpu::Cpu;
use clipforge::backend::{Ops, Seqs};
use clipforge::ops::attention::{attention_backward_reference, AttnShape};
use clipforge::ops::attention_bf16::attention_bf16_reference;
use clipforge::ops::attention_bf16::attention_packed_bf16_reference;
use clipforge::ops::attention_bf16_bwd::{
    attention_backward_bf16, attention_backward_bf16_reference, attention_packed_backward_bf16, attention_packed_backward_bf16_reference,
};
use clipforge::ops::cpu_path::{self, GemmPath};
use clipforge::ops::gemm_bf16::{has_avx512_bf16, Kernel};
use clipforge::tensor::{Storage, Tensor};
use common::attn_bf16::{assert_within, path_lock, uniform, KERNELS, SHAPES};
use half::bf16;

const ATOL: f64 = 2e-3;
const RTOL: f64 = 1e-3;

/// q, k (scores of a few units: the softmax neither flat nor one-hot), v, dO, and the forward's
/// o and lse (the bf16 forward's reference: the lse the backward is given in a bf16 model).
struct Case {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
    o: Vec<f32>,
    lse: Vec<f32>,
}

fn case(s: &AttnShape, seed: u64) -> Case {
    let n = s.numel();
    let (q, k, v, dout) = (uniform(n, seed, 2.0), uniform(n, seed + 1, 2.0), uniform(n, seed + 2, 0.5), uniform(n, seed + 3, 0.5));
    let (o, lse) = attention_bf16_reference(&q, &k, &v, s);
    Case { q, k, v, dout, o, lse }
}

fn shape(b: usize, t: usize, h: usize, d: usize, causal: bool) -> AttnShape {
    AttnShape { batch: b, seq: t, heads: h, head_dim: d, causal, scale: 1.0 / (d as f32).sqrt() }
}

#[test]
fn every_kernel_matches_the_rounding_reference() {
    let _path = path_lock();
    eprintln!("CPU path: {:?}, AVX512-BF16: {}", cpu_path::detected(), has_avx512_bf16());
    // The detected path, then the scalar one (portable grad rows, D and transposes too).
    for cap in [None, Some(GemmPath::Scalar)] {
        cpu_path::force_path(cap);
        let path = format!("{:?}", cpu_path::selected());
        for (si, &(b, t, h, d)) in SHAPES.iter().enumerate() {
            for causal in [false, true] {
                let s = shape(b, t, h, d, causal);
                let c = case(&s, 100 * si as u64);
                let (rq, rk, rv) = attention_backward_bf16_reference(&c.q, &c.k, &c.v, &c.o, &c.lse, &c.dout, &s);
                for kernel in KERNELS {
                    if kernel == Kernel::AmxSoft && t > 130 {
                        continue; // the software tile model is slow; T ≤ 130 covers its edges
                    }
                    let what = format!("path {path}, {kernel:?} b{b} t{t} h{h} d{d} causal {causal}");
                    let (dq, dk, dv) = attention_backward_bf16(&c.q, &c.k, &c.v, &c.o, &c.lse, &c.dout, &s, kernel);
                    let e = [("dq", &dq, &rq), ("dk", &dk, &rk), ("dv", &dv, &rv)].map(|(n, g, r)| assert_within(&format!("{what} {n}"), g, r, ATOL, RTOL));
                    eprintln!("{what}: max |err| dq {:.1e} dk {:.1e} dv {:.1e}", e[0], e[1], e[2]);
                }
            }
        }
    }
    cpu_path::force_path(None);
}

/// Against the exact backward (f64, no rounding): bf16's error, and no more: within 2 % of the
/// largest gradient element (head dims > 1: a one-term score q·k carries all of q's and k's
/// rounding into the exponent).
#[test]
fn close_to_the_exact_backward() {
    let _path = path_lock();
    for &(b, t, h, d) in SHAPES.iter().filter(|s| s.3 > 1) {
        for causal in [false, true] {
            let s = shape(b, t, h, d, causal);
            let c = case(&s, 7 + t as u64);
            let (eq, ek, ev) = attention_backward_reference(&c.q, &c.k, &c.v, &c.o, &c.lse, &c.dout, &s);
            let (dq, dk, dv) = attention_backward_bf16(&c.q, &c.k, &c.v, &c.o, &c.lse, &c.dout, &s, Kernel::Auto);
            for (n, g, r) in [("dq", &dq, &eq), ("dk", &dk, &ek), ("dv", &dv, &ev)] {
                let size = r.iter().fold(0f64, |m, &x| m.max(x.abs() as f64));
                let err = assert_within(&format!("b{b} t{t} h{h} d{d} causal {causal} {n} against the exact backward"), g, r, 0.02 * size, 0.02);
                eprintln!("b{b} t{t} h{h} d{d} causal {causal} {n}: max |err| {err:.1e} of max |ref| {size:.1e}");
            }
        }
    }
}

/// bf16 inputs on `vdpbf16ps` take the fused per-head backward (`attention_bf16_bwd_fused.rs`:
/// 14-row query panels over their own keys, Pᵀ and dSᵀ as pair-major panels, every gradient
/// stored in place); f32 inputs the GEMM-composed one. Same bits on every shape (one panel, one
/// more, odd T, head dims 2–128, causal and not, packed sequences), and within the rounding
/// reference's tolerance. Elsewhere (no AVX512-BF16) both run the composed path and this holds.
#[test]
fn the_fused_backward_gives_the_composed_backwards_bits() {
    let _path = path_lock();
    let r = |x: &[f32]| x.iter().map(|&y| bf16::from_f32(y)).collect::<Vec<bf16>>();
    let same = |what: &str, a: &[f32], b: &[f32]| {
        let first = a.iter().zip(b).position(|(x, y)| x.to_bits() != y.to_bits());
        assert!(first.is_none(), "{what}: differs first at {first:?}: {:?}", first.map(|i| (a[i], b[i])));
    };
    let shapes = [(1, 1, 1, 2), (2, 14, 3, 46), (1, 15, 2, 64), (3, 77, 5, 20), (2, 50, 2, 64), (2, 130, 2, 96), (1, 248, 2, 64), (1, 29, 4, 128)];
    for (si, &(b, t, h, d)) in shapes.iter().enumerate() {
        for causal in [false, true] {
            let s = shape(b, t, h, d, causal);
            let c = case(&s, 300 + 5 * si as u64);
            let (rq, rk, rv) = attention_backward_bf16_reference(&c.q, &c.k, &c.v, &c.o, &c.lse, &c.dout, &s);
            for kernel in [Kernel::Auto, Kernel::Avx512Bf16] {
                let what = format!("{kernel:?} b{b} t{t} h{h} d{d} causal {causal}");
                let g32 = attention_backward_bf16(&c.q, &c.k, &c.v, &c.o, &c.lse, &c.dout, &s, kernel);
                let g16 = attention_backward_bf16(&r(&c.q), &r(&c.k), &r(&c.v), &c.o, &c.lse, &c.dout, &s, kernel);
                for (n, a, f, rf) in [("dq", &g32.0, &g16.0, &rq), ("dk", &g32.1, &g16.1, &rk), ("dv", &g32.2, &g16.2, &rv)] {
                    same(&format!("{what} {n}"), a, f);
                    assert_within(&format!("{what} {n}"), f, rf, ATOL, RTOL);
                }
            }
        }
    }
    // packed sequences (the text tower's layout), causal
    let (lens, h, d) = ([1usize, 14, 77, 130, 2], 2, 64);
    let n = lens.iter().sum::<usize>() * h * d;
    let (q, k, v, dout) = (uniform(n, 191, 2.0), uniform(n, 192, 2.0), uniform(n, 193, 0.5), uniform(n, 194, 0.5));
    let (o, lse) = attention_packed_bf16_reference(&q, &k, &v, &lens, h, true);
    let g32 = attention_packed_backward_bf16(&q, &k, &v, &o, &lse, &dout, &lens, h, true, Kernel::Auto);
    let g16 = attention_packed_backward_bf16(&r(&q), &r(&k), &r(&v), &o, &lse, &dout, &lens, h, true, Kernel::Auto);
    for (n, a, f) in [("dq", &g32.0, &g16.0), ("dk", &g32.1, &g16.1), ("dv", &g32.2, &g16.2)] {
        same(&format!("packed {n}"), a, f);
    }
}

/// bf16 inputs are packed as they are; f32 inputs are rounded while packing: the same bits out.
#[test]
fn bf16_inputs_give_the_bits_of_rounded_f32_inputs() {
    let _path = path_lock();
    let r = |x: &[f32]| x.iter().map(|&y| bf16::from_f32(y)).collect::<Vec<bf16>>();
    for causal in [false, true] {
        let s = AttnShape { batch: 2, seq: 130, heads: 3, head_dim: 40, causal, scale: 0.2 };
        let c = case(&s, 9);
        for kernel in [Kernel::Auto, Kernel::AmxSoft, Kernel::Avx512Bf16, Kernel::Portable] {
            let g32 = attention_backward_bf16(&c.q, &c.k, &c.v, &c.o, &c.lse, &c.dout, &s, kernel);
            let g16 = attention_backward_bf16(&r(&c.q), &r(&c.k), &r(&c.v), &c.o, &c.lse, &c.dout, &s, kernel);
            for (n, a, b) in [("dq", &g32.0, &g16.0), ("dk", &g32.1, &g16.1), ("dv", &g32.2, &g16.2)] {
                let first = a.iter().zip(b).position(|(x, y)| x.to_bits() != y.to_bits());
                assert!(first.is_none(), "{kernel:?} causal {causal} {n}: differs first at {first:?}");
            }
        }
    }
}

#[test]
fn packed_sequences_match_the_reference() {
    let _path = path_lock();
    let (lens, h, d) = ([1usize, 7, 77, 130, 2, 64], 2, 33);
    let n = lens.iter().sum::<usize>() * h * d;
    let (q, k, v, dout) = (uniform(n, 21, 2.0), uniform(n, 22, 2.0), uniform(n, 23, 0.5), uniform(n, 24, 0.5));
    let (o, lse) = attention_packed_bf16_reference(&q, &k, &v, &lens, h, true);
    let (rq, rk, rv) = attention_packed_backward_bf16_reference(&q, &k, &v, &o, &lse, &dout, &lens, h, true);
    for kernel in [Kernel::Auto, Kernel::AmxSoft, Kernel::Avx512Bf16, Kernel::Portable] {
        let (dq, dk, dv) = attention_packed_backward_bf16(&q, &k, &v, &o, &lse, &dout, &lens, h, true, kernel);
        for (nm, g, r) in [("dq", &dq, &rq), ("dk", &dk, &rk), ("dv", &dv, &rv)] {
            assert_within(&format!("packed {kernel:?} {nm}"), g, r, ATOL, RTOL);
        }
    }
}

#[test]
fn bitwise_reproducible_across_thread_counts() {
    let _path = path_lock();
    let s = shape(2, 130, 3, 64, true);
    let c = case(&s, 31);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| attention_backward_bf16(&c.q, &c.k, &c.v, &c.o, &c.lse, &c.dout, &s, Kernel::Auto))
    };
    let one = run(1);
    for threads in [2, 3] {
        let many = run(threads);
        let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same(&one.0, &many.0) && same(&one.1, &many.1) && same(&one.2, &many.2), "{threads} threads: gradients differ from 1 thread's");
    }
}

/// The CPU backend's `attention_bwd` on bf16 q, k, v (what `qkv` gives a bf16 model where the
/// bf16 attention is chosen) is this backward, bit for bit, batched and packed; on f32 q, k, v it
/// stays the f32 backward.
#[test]
fn cpu_backend_takes_this_path_for_bf16_inputs() {
    let _path = path_lock();
    let t16 = |x: &[f32]| Tensor::from_storage(Storage::BF16(x.iter().map(|&y| bf16::from_f32(y)).collect()), &[x.len()]).unwrap();
    let t32 = |x: &[f32]| Cpu.upload(x).unwrap();
    let (lens, h, d) = (vec![77usize, 5, 130], 4, 32);
    let w = h * d;
    let n = lens.iter().sum::<usize>() * w;
    let (q, k, v, dout) = (uniform(n, 41, 2.0), uniform(n, 42, 2.0), uniform(n, 43, 0.5), uniform(n, 44, 0.5));
    let (o, lse) = attention_packed_bf16_reference(&q, &k, &v, &lens, h, true);
    let bits = |t: &Tensor| t.to_vec_f32().iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    let vbits = |x: &[f32]| x.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    let seqs = Seqs::Packed(lens.clone());
    let (gq, gk, gv) = Cpu.attention_bwd(&t16(&q), &t16(&k), &t16(&v), &t32(&o), &t32(&lse), &t32(&dout), &seqs, h, w).unwrap();
    let (wq, wk, wv) = attention_packed_backward_bf16(&q, &k, &v, &o, &lse, &dout, &lens, h, true, Kernel::Auto);
    assert!(bits(&gq) == vbits(&wq) && bits(&gk) == vbits(&wk) && bits(&gv) == vbits(&wv), "packed: the backend's gradients are not the bf16 backward's");
    // batched (an image tower's sequences), 2 × 50 tokens
    let (b, t) = (2, 50);
    let s = AttnShape { batch: b, seq: t, heads: h, head_dim: d, causal: false, scale: 1.0 / (d as f32).sqrt() };
    let m = b * t * w;
    let (o, lse) = attention_bf16_reference(&q[..m], &k[..m], &v[..m], &s);
    let seqs = Seqs::Batch { batch: b, seq: t, causal: false };
    let (gq, gk, gv) = Cpu.attention_bwd(&t16(&q[..m]), &t16(&k[..m]), &t16(&v[..m]), &t32(&o), &t32(&lse), &t32(&dout[..m]), &seqs, h, w).unwrap();
    let (wq, wk, wv) = attention_backward_bf16(&q[..m], &k[..m], &v[..m], &o, &lse, &dout[..m], &s, Kernel::Auto);
    assert!(bits(&gq) == vbits(&wq) && bits(&gk) == vbits(&wk) && bits(&gv) == vbits(&wv), "batched: the backend's gradients are not the bf16 backward's");
    // f32 q, k, v: the f32 backward
    let (fq, ..) = Cpu.attention_bwd(&t32(&q[..m]), &t32(&k[..m]), &t32(&v[..m]), &t32(&o), &t32(&lse), &t32(&dout[..m]), &seqs, h, w).unwrap();
    let (eq, ..) = clipforge::ops::attention::attention_backward(&q[..m], &k[..m], &v[..m], &o, &lse, &dout[..m], &s);
    assert_eq!(bits(&fq), vbits(&eq), "f32 inputs: the backend's dq is not the f32 backward's");
}
