//! The CUDA op table's rows for the mixed-precision and launch-geometry kernels: gemm_bf16/f16 (f32
//! or 16-bit D, with or without C), the
//! LayerNorm and bias + activation kernels with a half copy of their output, bias_act_bwd_f32v, the
//! two-stage column sums, the vectorized axpy and conversions with scalar tails (odd shapes: 1, 7,
//! 45×65, widths not divisible by 4 or 64). Run by tests/cuda_table.rs under every schedule.
use super::{check, common, layernorm_row, pack_bits, round_half, to_half_row, Row};
use clipforge::cuda::table::{Arg, KernelCase};
use clipforge::cuda::LaunchCfg;
use clipforge::ops::elementwise::Unary;

/// Unpacks 16-bit values (two per f32 word) of bf16 or f16 to f32.
fn unpack_half(words: &[f32], n: usize, f16: bool) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let bits = (words[i / 2].to_bits() >> (16 * (i % 2))) as u16;
            if f16 {
                half::f16::from_bits(bits).to_f32()
            } else {
                half::bf16::from_bits(bits).to_f32()
            }
        })
        .collect()
}

/// The unit roundoff of bf16 / f16 (2^-8 / 2^-11): a half copy of an f32 value computed in another
/// order is within one unit of the rounded reference, |x − r| ≤ 2u·|r|.
fn half_u(f16: bool) -> f32 {
    if f16 {
        2f32.powi(-11)
    } else {
        2f32.powi(-8)
    }
}

/// A row whose kernel also writes packed half values: (buffer, element count, f16?, expected f32
/// values before rounding) — checked unpacked, within 2u (one unit in the last place) of them.
pub struct HalfRow {
    pub row: Row,
    halves: Vec<(usize, usize, bool, Vec<f32>)>,
}

/// Where a half GEMM row puts its result: f32 D alone, f32 D = C (accumulate in place), f32 D next
/// to a separate C, or 16-bit D (gemm_*_h).
#[derive(Clone, Copy, PartialEq)]
enum GemmOut {
    F32,
    InPlace,
    SeparateC,
    Half,
}

/// gemm_bf16 / gemm_f16 (and *_h): D = op(A)·op(B) (+ bias) (+ C) on packed half A and B (the
/// reference: f64 products of the rounded values, so only the f32 summation order differs; a
/// 16-bit D within one rounding of it).
fn gemm_half_row(m: usize, n: usize, k: usize, ta: bool, tb: bool, out: GemmOut, bias: bool, f16: bool) -> HalfRow {
    let (a, b, c0, bv) = (common::randn(m * k, 61), common::randn(k * n, 62), common::randn(m * n, 63), common::randn(n, 64));
    let ab: Vec<u16> = a.iter().map(|&v| round_half(v, f16).1).collect();
    let bb: Vec<u16> = b.iter().map(|&v| round_half(v, f16).1).collect();
    let at = |r: usize, kk: usize| round_half(if ta { a[kk * m + r] } else { a[r * k + kk] }, f16).0;
    let bt = |kk: usize, c: usize| round_half(if tb { b[c * k + kk] } else { b[kk * n + c] }, f16).0;
    let add_c = matches!(out, GemmOut::InPlace | GemmOut::SeparateC);
    let want: Vec<f32> = (0..m * n)
        .map(|i| {
            let (r, c) = (i / n, i % n);
            let d: f64 = (0..k).map(|kk| at(r, kk) * bt(kk, c)).sum();
            (d + if bias { bv[c] as f64 } else { 0.0 } + if add_c { c0[i] as f64 } else { 0.0 }) as f32
        })
        .collect();
    let (cfg, _) = clipforge::cuda::gemm_launch::linear_kernel_launch(0, 0, None, 0, m, n, k).unwrap();
    let name = match (f16, out == GemmOut::Half) {
        (false, false) => "gemm_bf16",
        (true, false) => "gemm_f16",
        (false, true) => "gemm_bf16_h",
        (true, true) => "gemm_f16_h",
    };
    let mut buffers = vec![pack_bits(&ab), pack_bits(&bb), bv, c0];
    let (c, d) = match out {
        GemmOut::F32 | GemmOut::Half => (Arg::Null, 4),
        GemmOut::InPlace => (Arg::Buf(3), 3),
        GemmOut::SeparateC => (Arg::Buf(3), 4),
    };
    if d == 4 {
        buffers.push(vec![f32::NAN; if out == GemmOut::Half { (m * n).div_ceil(2) } else { m * n }]);
    }
    let args = vec![
        Arg::Buf(0),
        Arg::Buf(1),
        if bias { Arg::Buf(2) } else { Arg::Null },
        c,
        Arg::Buf(d),
        Arg::I32(m as i32),
        Arg::I32(n as i32),
        Arg::I32(k as i32),
        Arg::I32(ta as i32),
        Arg::I32(tb as i32),
    ];
    let tol = 1e-5 * (k as f32).sqrt();
    let (expect, halves) = if out == GemmOut::Half { (vec![], vec![(4, m * n, f16, want)]) } else { (vec![(d, want, tol, 1e-5)], vec![]) };
    HalfRow { row: Row { case: KernelCase { kernel: name, cfg, buffers, args }, expect }, halves }
}

/// layernorm_fwd_f32_h* / residual_layernorm_fwd_f32_h*: the f32 row of `layernorm_row` plus the
/// half copy of its output.
fn layernorm_half_row(rows: usize, cols: usize, residual: bool, f16: bool) -> HalfRow {
    let mut row = layernorm_row(rows, cols, residual);
    let yb = if residual { 4 } else { 3 };
    let y = row.expect[0].1.clone();
    row.case.kernel = match (residual, f16) {
        (false, false) => "layernorm_fwd_f32_hbf16",
        (false, true) => "layernorm_fwd_f32_hf16",
        (true, false) => "residual_layernorm_fwd_f32_hbf16",
        (true, true) => "residual_layernorm_fwd_f32_hf16",
    };
    let hb = row.case.buffers.len();
    row.case.buffers.push(vec![f32::NAN; (rows * cols).div_ceil(2)]);
    row.case.args.insert(yb + 1, Arg::Buf(hb));
    HalfRow { row, halves: vec![(hb, rows * cols, f16, y)] }
}

/// bias_act_fwd_f32v (and its _hbf16 / _hf16 twins with the half copy of the output), `parts` row
/// chunks, vectorized when n % 4 == 0.
fn bias_act_v_row(rows: usize, n: usize, act: Unary, parts: u32, half: Option<bool>) -> HalfRow {
    let y = common::randn(rows * n, 71).iter().map(|v| v * 4.0).collect::<Vec<_>>();
    let b = common::randn(n, 72);
    let pre: Vec<f32> = y.iter().enumerate().map(|(i, v)| v + b[i % n]).collect();
    let out: Vec<f32> = pre.iter().map(|&v| act.eval_ref(v)).collect();
    let vec = n.is_multiple_of(4);
    let cfg = LaunchCfg::new((n.div_ceil(if vec { 4 } else { 1 }).div_ceil(256) as u32, parts, 1), (256, 1, 1), 0);
    let mut buffers = vec![y, b, vec![f32::NAN; rows * n]];
    let mut args = vec![Arg::Buf(0), Arg::Buf(1), Arg::Buf(2)];
    let mut halves = vec![];
    if let Some(f16) = half {
        buffers.push(vec![f32::NAN; (rows * n).div_ceil(2)]);
        args.push(Arg::Buf(3));
        halves.push((3, rows * n, f16, out.clone()));
    }
    args.extend([Arg::I32(rows as i32), Arg::I32(n as i32), Arg::I32((act == Unary::Gelu) as i32), Arg::I32(vec as i32)]);
    let kernel = match half {
        None => "bias_act_fwd_f32v",
        Some(false) => "bias_act_fwd_f32_hbf16",
        Some(true) => "bias_act_fwd_f32_hf16",
    };
    HalfRow { row: Row { case: KernelCase { kernel, cfg, buffers, args }, expect: vec![(0, out, 1e-5, 1e-5), (2, pre, 1e-6, 1e-6)] }, halves }
}

/// bias_act_bwd_f32v: d(pre) and the per-chunk column partials (f64 reference sums per chunk).
fn bias_act_bwd_v_row(rows: usize, n: usize, act: Unary, parts: usize) -> Row {
    let (dy, pre) = (common::randn(rows * n, 73), common::randn(rows * n, 74).iter().map(|v| v * 3.0).collect::<Vec<_>>());
    let dpre: Vec<f32> = clipforge::ops::elementwise::unary_bwd_reference(act, &pre, &dy).iter().map(|&v| v as f32).collect();
    let chunk = rows.div_ceil(parts);
    let partial: Vec<f32> = (0..parts * n)
        .map(|i| {
            let (p, c) = (i / n, i % n);
            (p * chunk..((p + 1) * chunk).min(rows)).map(|r| dpre[r * n + c] as f64).sum::<f64>() as f32
        })
        .collect();
    let vec = n.is_multiple_of(4);
    let cfg = LaunchCfg::new((n.div_ceil(if vec { 4 } else { 1 }).div_ceil(256) as u32, parts as u32, 1), (256, 1, 1), 0);
    Row {
        case: KernelCase {
            kernel: "bias_act_bwd_f32v",
            cfg,
            buffers: vec![dy, pre, vec![f32::NAN; rows * n], vec![f32::NAN; parts * n]],
            args: vec![
                Arg::Buf(0),
                Arg::Buf(1),
                Arg::Buf(2),
                Arg::Buf(3),
                Arg::I32(rows as i32),
                Arg::I32(n as i32),
                Arg::I32((act == Unary::Gelu) as i32),
                Arg::I32(vec as i32),
            ],
        },
        expect: vec![(2, dpre, 1e-5, 1e-5), (3, partial, 1e-5 * (chunk as f32).sqrt(), 1e-5)],
    }
}

/// col_sums_partial_f32 (chunks of rows) then col_reduce_f32 (fixed-order sum of the chunks).
fn col_sums_rows(rows: usize, n: usize, parts: usize) -> Vec<Row> {
    let m = common::randn(rows * n, 81);
    let chunk = rows.div_ceil(parts);
    let partial: Vec<f32> = (0..parts * n)
        .map(|i| {
            let (p, c) = (i / n, i % n);
            (p * chunk..((p + 1) * chunk).min(rows)).map(|r| m[r * n + c] as f64).sum::<f64>() as f32
        })
        .collect();
    let total: Vec<f32> = (0..n).map(|c| (0..parts).map(|p| partial[p * n + c] as f64).sum::<f64>() as f32).collect();
    let tol = 1e-6 * (rows as f32);
    vec![
        Row {
            case: KernelCase {
                kernel: "col_sums_partial_f32",
                cfg: LaunchCfg::new((n.div_ceil(256) as u32, parts as u32, 1), (256, 1, 1), 0),
                buffers: vec![m, vec![f32::NAN; parts * n]],
                args: vec![Arg::Buf(0), Arg::Buf(1), Arg::I32(rows as i32), Arg::I32(n as i32)],
            },
            expect: vec![(1, partial.clone(), tol, 1e-5)],
        },
        Row {
            case: KernelCase {
                kernel: "col_reduce_f32",
                cfg: clipforge::cuda::train_ops::col_reduce_cfg(parts, n),
                buffers: vec![partial, vec![f32::NAN; n]],
                args: vec![Arg::Buf(0), Arg::Buf(1), Arg::I32(parts as i32), Arg::I32(n as i32)],
            },
            expect: vec![(1, total, tol, 1e-5)],
        },
    ]
}

/// Rows of the mixed-precision and launch-geometry kernels (odd shapes: 1, 7, 45×65, widths not
/// divisible by 64 or by 4).
pub fn half_table() -> Vec<HalfRow> {
    let mut t = vec![];
    for (m, n, k) in [(1, 1, 1), (7, 65, 33), (45, 13, 70)] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            for f16 in [false, true] {
                let bias = ta != tb;
                for out in [GemmOut::F32, GemmOut::InPlace, GemmOut::SeparateC, GemmOut::Half] {
                    t.push(gemm_half_row(m, n, k, ta, tb, out, bias, f16));
                }
            }
        }
    }
    for (r, c) in [(1, 1), (7, 65), (45, 768), (3, 1000)] {
        for f16 in [false, true] {
            t.push(layernorm_half_row(r, c, false, f16));
            t.push(layernorm_half_row(r, c, true, f16));
        }
    }
    for (r, n, parts) in [(1, 1, 1), (7, 59, 3), (45, 65, 4), (45, 1024, 7), (5, 1000, 2)] {
        for act in [Unary::QuickGelu, Unary::Gelu] {
            for half in [None, Some(false), Some(true)] {
                t.push(bias_act_v_row(r, n, act, parts, half));
            }
            t.push(HalfRow { row: bias_act_bwd_v_row(r, n, act, parts as usize), halves: vec![] });
        }
    }
    for (rows, n, parts) in [(1, 1, 1), (7, 65, 3), (45, 65, 2), (45, 768, 45), (300, 33, 9)] {
        t.extend(col_sums_rows(rows, n, parts).into_iter().map(|row| HalfRow { row, halves: vec![] }));
    }
    // axpy with a tail of three (float4 groups + scalar tail)
    let (y, x) = (common::randn(4003, 91), common::randn(4003, 92));
    let want = y.iter().zip(&x).map(|(y, x)| 0.5f32.mul_add(*x, *y)).collect();
    t.push(HalfRow {
        row: Row {
            case: KernelCase {
                kernel: "axpy_f32",
                cfg: LaunchCfg::new((2, 1, 1), (256, 1, 1), 0),
                buffers: vec![y, x],
                args: vec![Arg::Buf(0), Arg::Buf(1), Arg::F32(0.5), Arg::I32(4003)],
            },
            expect: vec![(0, want, 0.0, 0.0)],
        },
        halves: vec![],
    });
    for f16 in [false, true] {
        t.push(HalfRow { row: to_half_row(4002, f16), halves: vec![] }); // four-element groups + a tail of two
    }
    t
}

pub fn check_half(where_: &str, row: &HalfRow, got: &[Vec<f32>]) {
    check(where_, &row.row, got);
    for (i, n, f16, want) in &row.halves {
        let u = half_u(*f16);
        common::assert_close(&format!("{where_} {} half buffer {i}", row.row.case.kernel), &unpack_half(&got[*i], *n, *f16), want, 1e-6, 2.0 * u);
    }
}
