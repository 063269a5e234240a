//! The CUDA op table: each kernel case runs on the CPU emulator and, when a GPU is present, on
//! the real device through the production launcher, and both are checked per element against
//! the CPU backend's reference op. Without a device the GPU column prints
//! "skipped: no CUDA device" and passes.
mod common;
use clipforge::cuda::table::{Arg, Gpu, KernelCase};
use clipforge::cuda::LaunchCfg;
use clipforge::ops::elementwise::Unary;
use clipforge::ops::layernorm::layer_norm_reference;

struct Row {
    case: KernelCase,
    /// (buffer index, expected contents, atol, rtol)
    expect: Vec<(usize, Vec<f32>, f32, f32)>,
}

fn layernorm_row(rows: usize, cols: usize, residual: bool) -> Row {
    let x = common::randn(rows * cols, (rows * cols) as u64).iter().map(|v| v * 2.0 + 0.5).collect::<Vec<_>>();
    let res = common::randn(rows * cols, 7);
    let (g, b) = (common::randn(cols, 8).iter().map(|v| 1.0 + 0.1 * v).collect::<Vec<_>>(), common::randn(cols, 9));
    let xin: Vec<f32> = if residual { x.iter().zip(&res).map(|(a, r)| a + r).collect() } else { x.clone() };
    let y = layer_norm_reference(&xin, cols, &g, &b, 1e-5);
    let cfg = LaunchCfg::new((rows.div_ceil(4) as u32, 1, 1), (128, 1, 1), 0);
    let nan = |n| vec![f32::NAN; n];
    let (kernel, buffers, args, yb) = if residual {
        (
            "residual_layernorm_fwd_f32",
            vec![x.clone(), res, g, b, nan(rows * cols), nan(rows), nan(rows)],
            vec![Arg::Buf(0), Arg::Buf(1), Arg::Buf(2), Arg::Buf(3), Arg::Buf(4), Arg::Buf(5), Arg::Buf(6), Arg::I32(rows as i32), Arg::I32(cols as i32), Arg::F32(1e-5)],
            4,
        )
    } else {
        (
            "layernorm_fwd_f32",
            vec![x.clone(), g, b, nan(rows * cols), nan(rows), nan(rows)],
            vec![Arg::Buf(0), Arg::Buf(1), Arg::Buf(2), Arg::Buf(3), Arg::Buf(4), Arg::Buf(5), Arg::I32(rows as i32), Arg::I32(cols as i32), Arg::F32(1e-5)],
            3,
        )
    };
    let mut expect = vec![(yb, y, 1e-5, 1e-4)];
    if residual {
        expect.push((0, xin, 1e-6, 1e-6));
    }
    Row { case: KernelCase { kernel, cfg, buffers, args }, expect }
}

fn bias_act_row(rows: usize, n: usize, act: Unary) -> Row {
    let y = common::randn(rows * n, 11).iter().map(|v| v * 4.0).collect::<Vec<_>>();
    let b = common::randn(n, 12);
    let pre: Vec<f32> = y.iter().enumerate().map(|(i, v)| v + b[i % n]).collect();
    let out: Vec<f32> = pre.iter().map(|&v| act.eval_ref(v)).collect();
    let kernel = if act == Unary::QuickGelu { "bias_quick_gelu_fwd_f32" } else { "bias_gelu_fwd_f32" };
    let cfg = LaunchCfg::new((n.div_ceil(256) as u32, 3, 1), (256, 1, 1), 0);
    Row {
        case: KernelCase {
            kernel,
            cfg,
            buffers: vec![y, b, vec![f32::NAN; rows * n]],
            args: vec![Arg::Buf(0), Arg::Buf(1), Arg::Buf(2), Arg::I32(rows as i32), Arg::I32(n as i32)],
        },
        expect: vec![(0, out, 1e-5, 1e-5), (2, pre, 1e-6, 1e-6)],
    }
}

fn table() -> Vec<Row> {
    let mut t = vec![];
    for (r, c) in [(1, 1), (7, 65), (45, 768), (3, 1000)] {
        t.push(layernorm_row(r, c, false));
        t.push(layernorm_row(r, c, true));
    }
    for (r, n) in [(1, 1), (7, 59), (45, 3072), (5, 1000)] {
        t.push(bias_act_row(r, n, Unary::QuickGelu));
        t.push(bias_act_row(r, n, Unary::Gelu));
    }
    t
}

fn check(where_: &str, row: &Row, got: &[Vec<f32>]) {
    for (i, want, atol, rtol) in &row.expect {
        common::assert_close(&format!("{where_} {} buffer {i}", row.case.kernel), &got[*i], want, *atol, *rtol);
    }
}

#[test]
fn emulated_kernels_match_cpu_ops() {
    for row in table() {
        let got = row.case.run_emulated().unwrap_or_else(|e| panic!("{}: {e}", row.case.kernel));
        check("emulated", &row, &got);
    }
}

#[test]
fn gpu_kernels_match_cpu_ops() {
    let gpu = match Gpu::open() {
        Ok(g) => g,
        Err(why) => {
            eprintln!("skipped: no CUDA device ({why})");
            return;
        }
    };
    for row in table() {
        let got = row.case.run_gpu(&gpu).unwrap_or_else(|e| panic!("{}: {e}", row.case.kernel));
        check("gpu", &row, &got);
    }
}
