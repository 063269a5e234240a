//! The CUDA op table's rows for the kernels that keep activations in 16 bit between GEMMs
//! (kernels/half_act.cu, layernorm_fwd_h*, layernorm_bwd_add_f32, patch_im2col_h16), copy_f32 and
//! the tree of col_reduce_f32 (bit for bit against its f32 twin): odd shapes 1, 7, 45×65, widths not
//! divisible by 4, 8 or 64, bf16 and f16. Run by tests/cuda_table.rs under every schedule.
use super::{common, layernorm_row, pack_bits, round_half};
use clipforge::cuda::table::{Arg, KernelCase};
use clipforge::cuda::train_ops::col_reduce_cfg;
use clipforge::cuda::LaunchCfg;
use clipforge::ops::elementwise::{unary_bwd_reference, Unary};

/// A case and its checks: f32 buffers (buffer, want, atol, rtol), 16-bit buffers within `ulps`
/// units of bf16/f16 roundoff of unrounded values (buffer, count, f16?, want, ulps), and 16-bit
/// buffers bit for bit (buffer, bits).
pub struct K16Row {
    pub case: KernelCase,
    f32s: Vec<(usize, Vec<f32>, f32, f32)>,
    halves: Vec<(usize, usize, bool, Vec<f32>, f32)>,
    bits: Vec<(usize, Vec<u16>)>,
}

fn row(case: KernelCase) -> K16Row {
    K16Row { case, f32s: vec![], halves: vec![], bits: vec![] }
}

fn unpack_bits(words: &[f32], n: usize) -> Vec<u16> {
    (0..n).map(|i| (words[i / 2].to_bits() >> (16 * (i % 2))) as u16).collect()
}

fn to_f32(bits: u16, f16: bool) -> f32 {
    if f16 {
        half::f16::from_bits(bits).to_f32()
    } else {
        half::bf16::from_bits(bits).to_f32()
    }
}

fn act_of(gelu: bool) -> Unary {
    if gelu {
        Unary::Gelu
    } else {
        Unary::QuickGelu
    }
}

/// `n` values rounded to bf16/f16: (their bits, their f32 values).
fn halves_of(v: &[f32], f16: bool) -> (Vec<u16>, Vec<f32>) {
    v.iter().map(|&x| (round_half(x, f16).1, round_half(x, f16).0 as f32)).unzip()
}

fn copy_row(n: usize) -> K16Row {
    let x = common::randn(n, 101);
    let mut r = row(KernelCase {
        kernel: "copy_f32",
        cfg: LaunchCfg::new((2, 1, 1), (256, 1, 1), 0), // fewer threads than float4 groups: grid-stride
        buffers: vec![x.clone(), vec![f32::NAN; n]],
        args: vec![Arg::Buf(0), Arg::Buf(1), Arg::I64(n as i64)],
    });
    r.f32s.push((1, x, 0.0, 0.0));
    r
}

/// col_reduce_f32 on the launcher's geometry: equal bit for bit to an f32 twin of its tree (thread
/// rows sum p ≡ ty mod R in order, then pairwise halving), and within f64 tolerance of the sum.
fn col_reduce_row(parts: usize, n: usize) -> K16Row {
    let partial = common::randn(parts * n, 102);
    let cfg = col_reduce_cfg(parts, n);
    let rr = cfg.block.1 as usize;
    let twin: Vec<f32> = (0..n)
        .map(|c| {
            let mut s: Vec<f32> = (0..rr).map(|ty| (ty..parts).step_by(rr).fold(0f32, |a, p| a + partial[p * n + c])).collect();
            let mut h = rr / 2;
            while h > 0 {
                for ty in 0..h {
                    s[ty] += s[ty + h];
                }
                h /= 2;
            }
            s[0]
        })
        .collect();
    let total: Vec<f32> = (0..n).map(|c| (0..parts).map(|p| partial[p * n + c] as f64).sum::<f64>() as f32).collect();
    let mut r = row(KernelCase {
        kernel: "col_reduce_f32",
        cfg,
        buffers: vec![partial, vec![f32::NAN; n]],
        args: vec![Arg::Buf(0), Arg::Buf(1), Arg::I32(parts as i32), Arg::I32(n as i32)],
    });
    r.f32s.push((1, twin, 0.0, 0.0));
    r.f32s.push((1, total, 1e-6 * parts as f32, 1e-5));
    r
}

/// act_fwd_h*: out = act(pre) on rounded 16-bit inputs, grid-stride over 2 blocks.
fn act_fwd_row(rows: usize, n: usize, gelu: bool, f16: bool) -> K16Row {
    let (pb, pv) = halves_of(&common::randn(rows * n, 103).iter().map(|v| v * 4.0).collect::<Vec<_>>(), f16);
    let want: Vec<f32> = pv.iter().map(|&v| act_of(gelu).eval_ref(v)).collect();
    let vec = (rows * n).is_multiple_of(8);
    let mut r = row(KernelCase {
        kernel: if f16 { "act_fwd_hf16" } else { "act_fwd_hbf16" },
        cfg: LaunchCfg::new((2, 1, 1), (256, 1, 1), 0),
        buffers: vec![pack_bits(&pb), vec![f32::NAN; (rows * n).div_ceil(2)]],
        args: vec![Arg::Buf(0), Arg::Buf(1), Arg::I32(rows as i32), Arg::I32(n as i32), Arg::I32(gelu as i32), Arg::I32(vec as i32)],
    });
    r.halves.push((1, rows * n, f16, want, 2.0));
    r
}

/// act_bwd_h*: du rounded from dout·act'(pre) and the f32 partials of the UNROUNDED du per row
/// chunk (the rounded values would miss the partials' tolerance).
fn act_bwd_row(rows: usize, n: usize, parts: usize, gelu: bool, f16: bool) -> K16Row {
    let dout = common::randn(rows * n, 104);
    let (pb, pv) = halves_of(&common::randn(rows * n, 105).iter().map(|v| v * 3.0).collect::<Vec<_>>(), f16);
    let du: Vec<f32> = unary_bwd_reference(act_of(gelu), &pv, &dout).iter().map(|&v| v as f32).collect();
    let chunk = rows.div_ceil(parts);
    let partial: Vec<f32> = (0..parts * n)
        .map(|i| {
            let (p, c) = (i / n, i % n);
            (p * chunk..((p + 1) * chunk).min(rows)).map(|r| du[r * n + c] as f64).sum::<f64>() as f32
        })
        .collect();
    let vec = n.is_multiple_of(4);
    let cfg = LaunchCfg::new((n.div_ceil(if vec { 4 } else { 1 }).div_ceil(256) as u32, parts as u32, 1), (256, 1, 1), 0);
    let mut r = row(KernelCase {
        kernel: if f16 { "act_bwd_hf16" } else { "act_bwd_hbf16" },
        cfg,
        buffers: vec![dout, pack_bits(&pb), vec![f32::NAN; (rows * n).div_ceil(2)], vec![f32::NAN; parts * n]],
        args: vec![Arg::Buf(0), Arg::Buf(1), Arg::Buf(2), Arg::Buf(3), Arg::I32(rows as i32), Arg::I32(n as i32), Arg::I32(gelu as i32), Arg::I32(vec as i32)],
    });
    r.halves.push((2, rows * n, f16, du, 2.0));
    r.f32s.push((3, partial, 1e-5 * (chunk as f32).sqrt(), 1e-5));
    r
}

/// col_sums_partial_h*: f32 sums of the 16-bit values per row chunk.
fn col_sums_half_row(rows: usize, n: usize, parts: usize, f16: bool) -> K16Row {
    let (mb, mv) = halves_of(&common::randn(rows * n, 106), f16);
    let chunk = rows.div_ceil(parts);
    let partial: Vec<f32> = (0..parts * n)
        .map(|i| {
            let (p, c) = (i / n, i % n);
            (p * chunk..((p + 1) * chunk).min(rows)).map(|r| mv[r * n + c] as f64).sum::<f64>() as f32
        })
        .collect();
    let vec = n.is_multiple_of(4);
    let mut r = row(KernelCase {
        kernel: if f16 { "col_sums_partial_hf16" } else { "col_sums_partial_hbf16" },
        cfg: LaunchCfg::new((n.div_ceil(if vec { 4 } else { 1 }).div_ceil(256) as u32, parts as u32, 1), (256, 1, 1), 0),
        buffers: vec![pack_bits(&mb), vec![f32::NAN; parts * n]],
        args: vec![Arg::Buf(0), Arg::Buf(1), Arg::I32(rows as i32), Arg::I32(n as i32), Arg::I32(vec as i32)],
    });
    r.f32s.push((1, partial, 1e-6 * chunk as f32, 1e-5));
    r
}

/// layernorm_fwd_h*: only the 16-bit y (within one unit of the f32 LayerNorm) and the stats.
fn layernorm_half_row(rows: usize, cols: usize, f16: bool) -> K16Row {
    let base = layernorm_row(rows, cols, false);
    let y = base.expect[0].1.clone();
    let x = base.case.buffers[0].clone();
    let (mean, rstd): (Vec<f32>, Vec<f32>) = x
        .chunks(cols)
        .map(|r| {
            let m = r.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
            let var = r.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / cols as f64;
            (m as f32, (1.0 / (var + 1e-5).sqrt()) as f32)
        })
        .unzip();
    let mut b = base.case.buffers;
    b[3] = vec![f32::NAN; (rows * cols).div_ceil(2)];
    let mut r =
        row(KernelCase { kernel: if f16 { "layernorm_fwd_hf16" } else { "layernorm_fwd_hbf16" }, cfg: base.case.cfg, buffers: b, args: base.case.args });
    r.halves.push((3, rows * cols, f16, y, 2.0));
    r.f32s.push((4, mean, 1e-5, 1e-5));
    r.f32s.push((5, rstd, 1e-5, 1e-4));
    r
}

/// layernorm_bwd_add_f32: dx = res + the f64 LayerNorm backward, and the per-chunk dγ/dβ partials.
fn layernorm_bwd_add_row(rows: usize, cols: usize) -> K16Row {
    let x: Vec<f32> = common::randn(rows * cols, 107).iter().map(|v| v * 2.0 + 0.5).collect();
    let (dy, res, g) =
        (common::randn(rows * cols, 108), common::randn(rows * cols, 109), common::randn(cols, 110).iter().map(|v| 1.0 + 0.1 * v).collect::<Vec<_>>());
    let (dx, _, _) = clipforge::ops::layernorm::layer_norm_bwd_reference(&x, cols, &g, &dy, 1e-5);
    let want: Vec<f32> = dx.iter().zip(&res).map(|(d, r)| (d + *r as f64) as f32).collect();
    let mut st = (vec![0f64; rows], vec![0f64; rows]);
    for (i, r) in x.chunks(cols).enumerate() {
        let m = r.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
        st.0[i] = m;
        st.1[i] = 1.0 / (r.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / cols as f64 + 1e-5).sqrt();
    }
    let cfg = clipforge::cuda::train_ops::ln_bwd_cfg(rows);
    let parts = cfg.grid.0 as usize;
    let chunk = rows.div_ceil(parts);
    let (mut pg, mut pb) = (vec![0f64; parts * cols], vec![0f64; parts * cols]);
    for rr in 0..rows {
        for c in 0..cols {
            let i = rr * cols + c;
            pg[rr / chunk * cols + c] += dy[i] as f64 * (x[i] as f64 - st.0[rr]) * st.1[rr];
            pb[rr / chunk * cols + c] += dy[i] as f64;
        }
    }
    let f = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<_>>();
    let nan = |k: usize| vec![f32::NAN; k];
    let mut r = row(KernelCase {
        kernel: "layernorm_bwd_add_f32",
        cfg,
        buffers: vec![dy, x, g, f(&st.0), f(&st.1), res, nan(rows * cols), nan(parts * cols), nan(parts * cols)],
        args: (0..9).map(Arg::Buf).chain([Arg::I32(rows as i32), Arg::I32(cols as i32)]).collect(),
    });
    r.f32s.push((6, want, 1e-4, 1e-4));
    r.f32s.push((7, f(&pg), 1e-5 * (chunk as f32).sqrt(), 1e-4));
    r.f32s.push((8, f(&pb), 1e-5 * (chunk as f32).sqrt(), 1e-5));
    r
}

/// patch_im2col_h16: the bits of patch_im2col_f32's layout (odd element counts: half words).
fn im2col_half_row(b: usize, c: usize, s: usize, p: usize, f16: bool) -> K16Row {
    let (g, kk) = (s / p, c * p * p);
    let n = g * g;
    let (px, _) = halves_of(&common::randn(b * c * s * s, 111), f16);
    let cols: Vec<u16> = (0..b * n * kk)
        .map(|i| {
            let (row, col) = (i / kk, i % kk);
            let (bi, patch) = (row / n, row % n);
            let (ci, ky, kx) = (col / (p * p), col % (p * p) / p, col % p);
            px[((bi * c + ci) * s + patch / g * p + ky) * s + patch % g * p + kx]
        })
        .collect();
    let mut r = row(KernelCase {
        kernel: "patch_im2col_h16",
        cfg: LaunchCfg::new((3, 1, 1), (256, 1, 1), 0),
        buffers: vec![pack_bits(&px), vec![f32::NAN; cols.len().div_ceil(2)]],
        args: vec![Arg::Buf(0), Arg::Buf(1), Arg::I32(b as i32), Arg::I32(c as i32), Arg::I32(s as i32), Arg::I32(p as i32)],
    });
    r.bits.push((1, cols));
    r
}

/// Every row (odd shapes; bf16 and f16).
pub fn keep16_table() -> Vec<K16Row> {
    let mut t = vec![];
    for n in [1, 7, 4003, 4096] {
        t.push(copy_row(n));
    }
    for (parts, n) in [(1, 1), (7, 65), (45, 768), (100, 45), (2100, 13), (3, 2200)] {
        t.push(col_reduce_row(parts, n));
    }
    for f16 in [false, true] {
        for gelu in [false, true] {
            for (r, n) in [(1, 1), (7, 59), (45, 65), (5, 1000)] {
                t.push(act_fwd_row(r, n, gelu, f16));
            }
            for (r, n, parts) in [(1, 1, 1), (7, 59, 3), (45, 65, 4), (45, 1024, 7), (5, 1000, 2)] {
                t.push(act_bwd_row(r, n, parts, gelu, f16));
            }
        }
        for (rows, n, parts) in [(1, 1, 1), (7, 65, 3), (45, 65, 2), (45, 768, 45), (300, 36, 9)] {
            t.push(col_sums_half_row(rows, n, parts, f16));
        }
        for (r, c) in [(1, 1), (7, 65), (45, 768), (3, 1000)] {
            t.push(layernorm_half_row(r, c, f16));
        }
        t.push(im2col_half_row(2, 3, 10, 3, f16)); // remainder of one pixel, 2·9·27 = 486 values
        t.push(im2col_half_row(1, 1, 7, 7, f16)); // one patch of 49: an odd count
    }
    for (r, c) in [(1, 1), (7, 65), (45, 768), (300, 64)] {
        t.push(layernorm_bwd_add_row(r, c));
    }
    t
}

pub fn check_k16(where_: &str, row: &K16Row, got: &[Vec<f32>]) {
    let k = row.case.kernel;
    for (i, want, atol, rtol) in &row.f32s {
        common::assert_close(&format!("{where_} {k} buffer {i}"), &got[*i], want, *atol, *rtol);
    }
    for (i, n, f16, want, ulps) in &row.halves {
        let u = if *f16 { 2f32.powi(-11) } else { 2f32.powi(-8) };
        let vals: Vec<f32> = unpack_bits(&got[*i], *n).iter().map(|&b| to_f32(b, *f16)).collect();
        common::assert_close(&format!("{where_} {k} half buffer {i}"), &vals, want, 1e-6, ulps * u);
    }
    for (i, want) in &row.bits {
        assert_eq!(&unpack_bits(&got[*i], want.len()), want, "{where_} {k} 16-bit buffer {i}");
    }
}
