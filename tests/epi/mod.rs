//! The bf16 GEMM's fused epilogues against the unfused composite (tests/gemm_bf16.rs and
//! tests/gemm_amx.rs): the same GEMM with no epilogue, then the separate passes the CPU backend
//! made before (bf16 rounding of the pre-activation, `elementwise::unary`, the residual add).
//! Same kernel, same blocking: the results must be bit-identical, element by element.
use clipforge::ops::elementwise::{unary, Unary};
use clipforge::ops::gemm_bf16::{matmul_bf16_forced, matmul_bf16_fused, Kernel, PackedBf16};
use clipforge::ops::gemm_epilogue::{round_bf16, ActOut, Epilogue};
use half::bf16;

fn rng_vec(seed: u64, len: usize, scale: f32) -> Vec<f32> {
    let mut g = clipforge::model::synthetic::Rng::new(seed);
    (0..len).map(|_| (g.uniform() * 2.0 - 1.0) * scale).collect()
}

fn same(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.to_bits() == w.to_bits(), "{what}: [{i}] fused {g} vs unfused {w}");
    }
}

/// Every epilogue (QuickGELU and GELU in place, to f32, to bf16 from a bf16 A; the residual
/// add; the output narrowed to bf16; the outputs with no C, rounded pre-activation or not — on the
/// `vdpbf16ps` kernel those are applied to the tile in registers) at m×n×k on `kernel`, against the plain GEMM followed by the unfused passes.
pub fn check_epilogues(m: usize, n: usize, k: usize, kernel: Kernel) {
    let seed = (m * 7919 + n * 104_729 + k) as u64;
    let (a, w, b, res) = (rng_vec(seed, m * k, 2.0), rng_vec(seed + 1, n * k, 0.5), rng_vec(seed + 2, n, 1.0), rng_vec(seed + 3, m * n, 4.0));
    let a16: Vec<bf16> = a.iter().map(|&x| bf16::from_f32(x)).collect();
    let pw = PackedBf16::from_f32(&w, n, k);
    let tag = format!("{kernel:?} {m}x{n}x{k}");
    let mut plain = vec![f32::NAN; m * n];
    matmul_bf16_forced(&a, m, &pw, Some(&b), &mut plain, kernel);
    let pre: Vec<f32> = plain.iter().map(|&x| round_bf16(x)).collect();
    for op in [Unary::QuickGelu, Unary::Gelu] {
        let want = unary(op, &pre);
        let mut c = vec![f32::NAN; m * n];
        matmul_bf16_fused(&a, m, &pw, Some(&b), &mut c, Epilogue::Act { op, round_pre: true, out: ActOut::InPlace }, kernel);
        same(&format!("{tag} {op:?} in place"), &c, &want);
        let (mut c, mut out) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
        matmul_bf16_fused(&a, m, &pw, Some(&b), &mut c, Epilogue::Act { op, round_pre: true, out: ActOut::F32(&mut out) }, kernel);
        same(&format!("{tag} {op:?} pre kept"), &c, &pre);
        same(&format!("{tag} {op:?} to f32"), &out, &want);
        // A already bf16: packed as it is, the same values the f32 A rounds to.
        let (mut c, mut out) = (vec![f32::NAN; m * n], vec![bf16::NAN; m * n]);
        matmul_bf16_fused(&a16, m, &pw, Some(&b), &mut c, Epilogue::Act { op, round_pre: true, out: ActOut::Bf16(&mut out) }, kernel);
        same(&format!("{tag} {op:?} bf16 A, pre kept"), &c, &pre);
        let want16: Vec<f32> = want.iter().map(|&x| round_bf16(x)).collect();
        same(&format!("{tag} {op:?} to bf16"), &out.iter().map(|x| x.to_f32()).collect::<Vec<_>>(), &want16);
        // No C wanted (an empty one: per-thread C tiles, or a scratch C past one kc-block or
        // on AMX): the same outputs.
        let mut out = vec![f32::NAN; m * n];
        matmul_bf16_fused(&a, m, &pw, Some(&b), &mut [], Epilogue::Act { op, round_pre: true, out: ActOut::F32(&mut out) }, kernel);
        same(&format!("{tag} {op:?} to f32, no C"), &out, &want);
        let mut out = vec![bf16::NAN; m * n];
        matmul_bf16_fused(&a16, m, &pw, Some(&b), &mut [], Epilogue::Act { op, round_pre: true, out: ActOut::Bf16(&mut out) }, kernel);
        same(&format!("{tag} {op:?} to bf16, no C"), &out.iter().map(|x| x.to_f32()).collect::<Vec<_>>(), &want16);
    }
    // Without rounding: the activation of the f32 pre-activation.
    let mut c = vec![f32::NAN; m * n];
    matmul_bf16_fused(&a, m, &pw, Some(&b), &mut c, Epilogue::Act { op: Unary::QuickGelu, round_pre: false, out: ActOut::InPlace }, kernel);
    same(&format!("{tag} QuickGelu unrounded"), &c, &unary(Unary::QuickGelu, &plain));
    for op in [Unary::QuickGelu, Unary::Gelu] {
        let mut out = vec![bf16::NAN; m * n];
        matmul_bf16_fused(&a, m, &pw, Some(&b), &mut [], Epilogue::Act { op, round_pre: false, out: ActOut::Bf16(&mut out) }, kernel);
        let want: Vec<f32> = unary(op, &plain).iter().map(|&x| round_bf16(x)).collect();
        same(&format!("{tag} {op:?} unrounded to bf16, no C"), &out.iter().map(|x| x.to_f32()).collect::<Vec<_>>(), &want);
    }
    let mut c = vec![f32::NAN; m * n];
    matmul_bf16_fused(&a, m, &pw, Some(&b), &mut c, Epilogue::Add { res: &res }, kernel);
    let want: Vec<f32> = plain.iter().zip(&res).map(|(y, r)| r + y).collect();
    same(&format!("{tag} residual add"), &c, &want);
    // The output narrowed to bf16 (q, k, v of a 16-bit tower); C keeps the f32 values.
    let (mut c, mut out) = (vec![f32::NAN; m * n], vec![bf16::NAN; m * n]);
    matmul_bf16_fused(&a, m, &pw, Some(&b), &mut c, Epilogue::Bf16 { out: &mut out }, kernel);
    same(&format!("{tag} bf16 out, C kept"), &c, &plain);
    let plain16: Vec<f32> = plain.iter().map(|&x| round_bf16(x)).collect();
    same(&format!("{tag} bf16 out"), &out.iter().map(|x| x.to_f32()).collect::<Vec<_>>(), &plain16);
    let mut out = vec![bf16::NAN; m * n];
    matmul_bf16_fused(&a, m, &pw, Some(&b), &mut [], Epilogue::Bf16 { out: &mut out }, kernel);
    same(&format!("{tag} bf16 out, no C"), &out.iter().map(|x| x.to_f32()).collect::<Vec<_>>(), &plain16);
    // No bias, bf16 A, no epilogue: the plain GEMM of the same values.
    let (mut c, mut c2) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
    matmul_bf16_fused(&a16, m, &pw, None, &mut c, Epilogue::None, kernel);
    matmul_bf16_forced(&a, m, &pw, None, &mut c2, kernel);
    same(&format!("{tag} bf16 A"), &c, &c2);
}
