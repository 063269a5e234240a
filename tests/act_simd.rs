//! The 16-lane activations (`ops::act_simd`) give the bits of the scalar definitions
//! (`fastmath::quick_gelu`, `fastmath::gelu`) for every kind of input — a spread of bit patterns
//! over the whole f32 range, NaN, ±∞, ±0, subnormals, the exp clamp's edges — and at lengths with
//! every tail (0, 1, 15, 16, 17, 33, 100), in place and into another buffer; and they are within
//! tolerance of the f64 formulas on ordinary values. The same for the backward's dy·act′(x)
//! (`act_grad_into` against `Unary::deriv_fast`, and against the f64 derivative).
use clipforge::ops::act_simd::{
    act_grad_into, act_grad_scalar, act_in_place, act_into, act_into_scalar, act_row_with, round_bf16_in_place, to_bf16_into_with, ActDst, Narrow,
};
use clipforge::ops::elementwise::{unary_reference, Unary};

fn inputs() -> Vec<f32> {
    let mut v: Vec<f32> = (0..200_000u32).map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761))).collect();
    v.extend((0..20_000).map(|i| (i as f32 - 10_000.0) * 1e-3)); // [-10, 10)
    v.extend([f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1e-40, -1e-40, f32::MIN_POSITIVE, f32::MAX, f32::MIN]);
    v.extend([87.0, -87.0, 88.3, -88.3, 51.1, -51.1, 52.0, -52.0, 60.0, -60.0, 100.0, -100.0]);
    v
}

fn same_bits(what: &str, x: &[f32], got: &[f32], want: &[f32]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.to_bits() == w.to_bits(), "{what}: x = {:e} ({:#x}) gives {g:e} against the scalar {w:e}", x[i], x[i].to_bits());
    }
}

#[test]
fn simd_activations_give_the_scalar_bits() {
    let x = inputs();
    for act in [Unary::QuickGelu, Unary::Gelu] {
        let mut want = vec![0.0; x.len()];
        act_into_scalar(act, &x, &mut want);
        let mut got = vec![f32::NAN; x.len()];
        act_into(act, &x, &mut got);
        same_bits(&format!("{act:?} into"), &x, &got, &want);
        let mut inplace = x.clone();
        act_in_place(act, &mut inplace);
        same_bits(&format!("{act:?} in place"), &x, &inplace, &want);
        for len in [0, 1, 15, 16, 17, 33, 100] {
            let (src, mut dst) = (&x[1000..1000 + len], vec![f32::NAN; len]);
            act_into(act, src, &mut dst);
            same_bits(&format!("{act:?} length {len}"), src, &dst, &want[1000..1000 + len]);
        }
    }
}

#[test]
fn simd_activations_match_the_f64_formulas() {
    let x: Vec<f32> = (0..4001).map(|i| (i as f32 - 2000.0) * 5e-3).collect(); // [-10, 10]
    for (act, op) in [(Unary::QuickGelu, Unary::QuickGelu), (Unary::Gelu, Unary::Gelu)] {
        let mut got = vec![0.0; x.len()];
        act_into(act, &x, &mut got);
        let want = unary_reference(op, &x);
        for ((g, w), v) in got.iter().zip(&want).zip(&x) {
            assert!(g.is_finite() && (g - w).abs() <= 1e-6 + 1e-5 * w.abs(), "{act:?}({v}) = {g}, f64 formula {w}");
        }
    }
}

#[test]
fn simd_activation_gradients_give_the_scalar_bits() {
    let x = inputs();
    // upstream gradients: ordinary values, and the special ones at shifted positions
    let mut dy: Vec<f32> = (0..x.len()).map(|i| ((i * 7919) % 2001) as f32 * 1e-3 - 1.0).collect();
    for (i, v) in [f32::NAN, f32::INFINITY, -0.0, 1e-40, f32::MAX].into_iter().enumerate() {
        dy[i * 37 + 5] = v;
    }
    for act in [Unary::QuickGelu, Unary::Gelu] {
        let mut want = vec![0.0; x.len()];
        act_grad_scalar(act, &x, &dy, &mut want);
        let mut got = vec![f32::NAN; x.len()];
        act_grad_into(act, &x, &dy, &mut got);
        same_bits(&format!("{act:?} gradient"), &x, &got, &want);
        for len in [0, 1, 15, 16, 17, 33, 100] {
            let mut dst = vec![f32::NAN; len];
            act_grad_into(act, &x[1000..1000 + len], &dy[1000..1000 + len], &mut dst);
            same_bits(&format!("{act:?} gradient length {len}"), &x[1000..1000 + len], &dst, &want[1000..1000 + len]);
        }
    }
}

#[test]
fn simd_activation_gradients_match_the_f64_derivatives() {
    use clipforge::ops::elementwise::unary_bwd_reference;
    let x: Vec<f32> = (0..4001).map(|i| (i as f32 - 2000.0) * 5e-3).collect(); // [-10, 10]
    let dy: Vec<f32> = (0..x.len()).map(|i| ((i * 31) % 17) as f32 * 0.25 - 2.0).collect();
    for act in [Unary::QuickGelu, Unary::Gelu] {
        let mut got = vec![0.0; x.len()];
        act_grad_into(act, &x, &dy, &mut got);
        let want = unary_bwd_reference(act, &x, &dy);
        for ((g, w), v) in got.iter().zip(&want).zip(&x) {
            assert!(g.is_finite() && (*g as f64 - w).abs() <= 1e-6 + 1e-5 * w.abs(), "{act:?}′({v}) gives {g}, f64 derivative {w}");
        }
    }
}

/// The 16-lane bf16 rounding (the GEMM epilogues' pre-activation rounding and bf16 output) gives
/// `half::bf16::from_f32`'s bits: ties to even, carries into the exponent, overflow to ∞, NaN
/// payloads made quiet, subnormals kept; at every tail length. Both narrowings of
/// `to_bf16_into`: the CPU's choice (`vcvtneps2bf16` where it has AVX512-BF16) and the integer
/// form forced.
#[test]
fn simd_bf16_rounding_gives_the_half_crate_bits() {
    let mut x = inputs();
    // ties (the round bit alone, with an even and an odd kept LSB) and carries
    x.extend([0x3f80_8000u32, 0x3f81_8000, 0x3f80_8001, 0x3fff_ffff, 0x7f7f_ffff, 0x7f80_0001, 0xffc0_0000, 0x0000_8000, 0x8001_8000].map(f32::from_bits));
    let want: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v)).collect();
    let mut rounded = x.clone();
    round_bf16_in_place(&mut rounded);
    for narrow in [Narrow::Auto, Narrow::Integer] {
        let mut got = vec![half::bf16::from_bits(0x1234); x.len()];
        to_bf16_into_with(&x, &mut got, narrow);
        for (i, v) in x.iter().enumerate() {
            assert_eq!(got[i].to_bits(), want[i].to_bits(), "to_bf16_into {narrow:?} ({:#x})", v.to_bits());
            assert_eq!(rounded[i].to_bits(), want[i].to_f32().to_bits(), "round_bf16_in_place({:#x})", v.to_bits());
        }
        for len in [0, 1, 15, 16, 17, 33, 100] {
            let mut r = x[500..500 + len].to_vec();
            round_bf16_in_place(&mut r);
            let mut b = vec![half::bf16::from_bits(0x1234); len + 1];
            to_bf16_into_with(&x[500..500 + len], &mut b, narrow);
            assert_eq!(b[len].to_bits(), 0x1234, "{narrow:?} length {len}: wrote past the end");
            for i in 0..len {
                assert_eq!(r[i].to_bits(), want[500 + i].to_f32().to_bits(), "length {len} [{i}]");
                assert_eq!(b[i].to_bits(), want[500 + i].to_bits(), "{narrow:?} length {len} [{i}]");
            }
        }
    }
}

/// The epilogue's one-pass row (`act_row`: optional bf16 rounding, the activation in place, to
/// f32 or to bf16) against the composite of the separate scalar passes, bit for bit, over every
/// kind of input and at every tail length; nothing written past the row. Both narrowings: the
/// CPU's choice (`vcvtneps2bf16` where it has AVX512-BF16, with its subnormal lanes redone) and
/// the integer form forced. The inputs hold ≈ 800 subnormals, and a run of them (a whole
/// vector, and a vector with one among normal values) is added here.
#[test]
fn fused_row_gives_the_composite_bits() {
    let mut x = inputs();
    x.extend((1..=16u32).map(|i| f32::from_bits(i * 0x0007_1234))); // 16 subnormals
    x.extend((0..16u32).map(|i| if i == 9 { f32::from_bits(0x8000_8000) } else { i as f32 * 0.37 - 2.0 }));
    for narrow in [Narrow::Auto, Narrow::Integer] {
        for act in [Unary::QuickGelu, Unary::Gelu] {
            for round in [false, true] {
                let pre: Vec<f32> = if round { x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect() } else { x.clone() };
                let mut y = vec![0.0; x.len()];
                act_into_scalar(act, &pre, &mut y);
                for len in [0, 1, 15, 16, 17, 33, 100, x.len()] {
                    let tag = format!("{narrow:?} {act:?} round {round} length {len}");
                    let (src, want_pre, want) = (&x[..len], &pre[..len], &y[..len]);
                    let mut r = src.to_vec();
                    act_row_with(act, round, &mut r, ActDst::InPlace, narrow);
                    same_bits(&format!("{tag} in place"), src, &r, want);
                    let (mut r, mut o) = (src.to_vec(), vec![f32::NAN; len + 1]);
                    act_row_with(act, round, &mut r, ActDst::F32(&mut o), narrow);
                    same_bits(&format!("{tag} pre kept"), src, &r, want_pre);
                    same_bits(&format!("{tag} to f32"), src, &o[..len], want);
                    assert!(o[len].is_nan(), "{tag}: wrote past the row");
                    let (mut r, mut b) = (src.to_vec(), vec![half::bf16::from_bits(0x1234); len + 1]);
                    act_row_with(act, round, &mut r, ActDst::Bf16(&mut b), narrow);
                    same_bits(&format!("{tag} pre kept (bf16 out)"), src, &r, want_pre);
                    for i in 0..len {
                        assert_eq!(b[i].to_bits(), half::bf16::from_f32(want[i]).to_bits(), "{tag} to bf16 [{i}] (x = {:#x})", src[i].to_bits());
                    }
                    assert_eq!(b[len].to_bits(), 0x1234, "{tag}: wrote past the row");
                }
            }
        }
    }
}

/// A rounded pre-activation to a bf16 output is a lookup (`bf16_table`): over every one of the
/// 65536 bf16 values (NaNs, ±∞, subnormals included), the table path (`round`) writes the bits
/// the computed path (the same values, already bf16, not rounded again: act16, then narrowed)
/// writes, with both narrowings, and keeps the rounded pre-activation.
#[test]
fn bf16_activation_table_gives_the_computed_bits() {
    let x: Vec<f32> = (0..=u16::MAX).map(|b| half::bf16::from_bits(b).to_f32()).collect();
    for narrow in [Narrow::Auto, Narrow::Integer] {
        for act in [Unary::QuickGelu, Unary::Gelu] {
            let (mut pre, mut table) = (x.clone(), vec![half::bf16::from_bits(0x1234); x.len()]);
            act_row_with(act, true, &mut pre, ActDst::Bf16(&mut table), narrow);
            let (mut same, mut computed) = (x.clone(), vec![half::bf16::ZERO; x.len()]);
            act_row_with(act, false, &mut same, ActDst::Bf16(&mut computed), narrow);
            for (i, (t, c)) in table.iter().zip(&computed).enumerate() {
                assert_eq!(t.to_bits(), c.to_bits(), "{narrow:?} {act:?}: bf16 input {i:#06x}: table {t} against computed {c}");
            }
            same_bits(&format!("{narrow:?} {act:?} pre kept"), &x, &pre, &x);
        }
    }
}
