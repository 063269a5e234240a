//! Cost rows (src/perf/cost.rs) of the kernels that keep activations in 16 bit between GEMMs
//! (kernels/half_act.cu, the 16-bit LayerNorm and im2col) and of `copy_f32`: bytes count 2 per
//! 16-bit element and 4 per f32 one, each tensor read or written once.
use super::cost::{cc, ew, vec_width, Class, Cost, Ctx, Row, REDUCE_PER_THREAD};
use crate::error::Result;

/// act_fwd_h*: (pre, out, rows, n, act, vec): 16-bit in and out, eight values a thread when vec.
fn act_fwd(c: &Ctx) -> Result<Cost> {
    let t = c.i(2)? * c.i(3)?;
    let per = if c.i(5)? != 0.0 { 8.0 } else { 1.0 }; // values a thread
    Ok(Cost { par: t / per, ..ew(t, 2.0, 2.0, 10.0) })
}

/// act_bwd_h*: (dout f32, pre 16-bit, du 16-bit, partial f32 [parts, n], rows, n, act, vec).
fn act_bwd(c: &Ctx) -> Result<Cost> {
    let (r, n) = (c.i(4)?, c.i(5)?);
    let parts = c.rec.cfg.grid.1 as f64;
    Ok(Cost { par: r * n / vec_width(c, 7)?, ..ew(r * n, 4.0 + 2.0, 2.0 + 4.0 * parts / r.max(1.0), 15.0) })
}

/// col_sums_partial_h*: (m 16-bit, partial f32, rows, n, vec) on grid (cols, parts).
fn col_sums_partial(c: &Ctx) -> Result<Cost> {
    let (r, n) = (c.i(2)?, c.i(3)?);
    let parts = c.rec.cfg.grid.1 as f64;
    Ok(cc(Class::Reduction, r * n, 2.0 * r * n, 4.0 * parts * n, r * n / REDUCE_PER_THREAD))
}

/// layernorm_fwd_h*: (x f32, g, b, yh 16-bit, mean, rstd, rows, cols, eps): no f32 y.
fn ln_fwd(c: &Ctx) -> Result<Cost> {
    let (r, n) = (c.i(6)?, c.i(7)?);
    Ok(cc(Class::Norm, 8.0 * r * n, 4.0 * r * n + 8.0 * n, 2.0 * r * n + 8.0 * r, 32.0 * r))
}

/// Every 16-bit activation kernel and copy_f32 (argument numbers as in each kernel's signature).
pub const TABLE: &[Row] = &[
    // embed.cu: (x, y, n as i64), one float4 a thread
    Row { name: "copy_f32", cost: |c| Ok(Cost { par: c.i(2)? / 4.0, ..ew(c.i(2)?, 4.0, 4.0, 0.0) }) },
    // (px, cols, B, C, S, P): 16-bit values moved, B·C·S² of them (as patch_im2col_f32)
    Row { name: "patch_im2col_h16", cost: |c| Ok(ew(c.i(2)? * c.i(3)? * c.i(4)? * c.i(4)?, 2.0, 2.0, 0.0)) },
    // half_act.cu
    Row { name: "act_fwd_hbf16", cost: act_fwd },
    Row { name: "act_fwd_hf16", cost: act_fwd },
    Row { name: "act_bwd_hbf16", cost: act_bwd },
    Row { name: "act_bwd_hf16", cost: act_bwd },
    Row { name: "col_sums_partial_hbf16", cost: col_sums_partial },
    Row { name: "col_sums_partial_hf16", cost: col_sums_partial },
    // layernorm.cu
    Row { name: "layernorm_fwd_hbf16", cost: ln_fwd },
    Row { name: "layernorm_fwd_hf16", cost: ln_fwd },
    Row {
        name: "layernorm_bwd_add_f32", // (dy, x, g, mean, rstd, res, dx, dg_partial, db_partial, rows, cols)
        cost: |c| {
            let (r, n) = (c.i(9)?, c.i(10)?);
            let parts = c.rec.cfg.grid.0 as f64;
            Ok(cc(Class::Norm, 13.0 * r * n, 12.0 * r * n + 8.0 * r + 4.0 * n, 4.0 * r * n + 8.0 * parts * n, 32.0 * r))
        },
    },
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::{KernelArgs, LaunchCfg};
    use crate::perf::cost::launch_cost;
    use crate::perf::record::{LaunchRec, Log};

    fn cost(kernel: &str, cfg: LaunchCfg, a: KernelArgs) -> Cost {
        launch_cost(&LaunchRec { kernel: kernel.into(), cfg, args: a.args().to_vec() }, &Log::default()).unwrap()
    }

    /// 2 bytes per 16-bit element, 4 per f32 one.
    #[test]
    fn half_rows_count_honest_bytes() {
        let g = LaunchCfg::new((1, 1, 1), (256, 1, 1), 0);
        let c = cost("act_fwd_hbf16", g, KernelArgs::new().ptr(1).ptr(2).i32(10).i32(8).i32(0).i32(1));
        assert_eq!((c.read, c.written, c.par), (160.0, 160.0, 10.0));
        let c = cost("copy_f32", g, KernelArgs::new().ptr(1).ptr(2).i64(100));
        assert_eq!((c.read, c.written), (400.0, 400.0));
        let parts = LaunchCfg::new((1, 5, 1), (256, 1, 1), 0);
        let c = cost("act_bwd_hf16", parts, KernelArgs::new().ptr(1).ptr(2).ptr(3).ptr(4).i32(10).i32(8).i32(1).i32(1));
        assert_eq!((c.read, c.written), (80.0 * 6.0, 80.0 * 2.0 + 4.0 * 5.0 * 8.0));
        let c = cost("col_sums_partial_hbf16", parts, KernelArgs::new().ptr(1).ptr(2).i32(10).i32(8).i32(1));
        assert_eq!((c.read, c.written), (160.0, 160.0));
        let c = cost("layernorm_fwd_hf16", g, KernelArgs::new().ptr(1).ptr(2).ptr(3).ptr(4).ptr(5).ptr(6).i32(10).i32(8).f32(1e-5));
        assert_eq!((c.read, c.written), (320.0 + 64.0, 160.0 + 80.0));
    }
}
