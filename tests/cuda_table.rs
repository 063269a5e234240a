//! The CUDA op table: each kernel case runs on the CPU emulator (in every warp schedule) and, when a GPU is present, on
//! the real device through the production launcher, and both are checked per element against
//! the CPU backend's reference op. Without a device the GPU column prints
//! "skipped: no CUDA device" and passes.
mod common;
/// Rows of the mixed-precision and launch-geometry kernels (half GEMMs, half outputs, two-stage reductions).
#[path = "cuda_table_rows/half.rs"]
mod half_rows;
/// Rows of the kernels that keep activations in 16 bit between GEMMs, copy_f32, col_reduce_f32's tree.
#[path = "cuda_table_rows/keep16.rs"]
mod keep16_rows;
use clipforge::cuda::table::{Arg, Gpu, KernelCase};
use clipforge::cuda::LaunchCfg;
use clipforge::ops::elementwise::Unary;
use clipforge::ops::layernorm::layer_norm_reference;
use half_rows::{check_half, half_table};
use keep16_rows::{check_k16, keep16_table};

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
            vec![
                Arg::Buf(0),
                Arg::Buf(1),
                Arg::Buf(2),
                Arg::Buf(3),
                Arg::Buf(4),
                Arg::Buf(5),
                Arg::Buf(6),
                Arg::I32(rows as i32),
                Arg::I32(cols as i32),
                Arg::F32(1e-5),
            ],
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

fn bits(v: &[i32]) -> Vec<f32> {
    v.iter().map(|&i| f32::from_bits(i as u32)).collect()
}

fn grid(total: usize) -> LaunchCfg {
    LaunchCfg::new((total.div_ceil(256).min(16_384) as u32, 1, 1), (256, 1, 1), 0)
}

fn linear_row(m: usize, n: usize, k: usize, bias: bool) -> Row {
    let (x, w, b) = (common::randn(m * k, 21), common::randn(n * k, 22), common::randn(n, 23));
    let want: Vec<f32> = (0..m * n)
        .map(|i| {
            let (r, c) = (i / n, i % n);
            let d: f64 = (0..k).map(|j| x[r * k + j] as f64 * w[c * k + j] as f64).sum();
            (d + if bias { b[c] as f64 } else { 0.0 }) as f32
        })
        .collect();
    let (cfg, _) = clipforge::cuda::gemm_launch::linear_kernel_launch(0, 0, None, 0, m, n, k).unwrap();
    Row {
        case: KernelCase {
            kernel: "linear_f32",
            cfg,
            buffers: vec![x, w, b, vec![f32::NAN; m * n]],
            args: vec![Arg::Buf(0), Arg::Buf(1), Arg::Buf(2), Arg::Buf(3), Arg::I32(m as i32), Arg::I32(n as i32), Arg::I32(k as i32), Arg::I32(bias as i32)],
        },
        expect: vec![(3, want, 1e-5 * (k as f32).sqrt(), 1e-5)],
    }
}

/// gemm_f32: C = op(A)·op(B) + beta·C for every transpose combination (f64 reference).
fn gemm_row(m: usize, n: usize, k: usize, ta: bool, tb: bool, beta: f32) -> Row {
    let (a, b, c0) = (common::randn(m * k, 41), common::randn(k * n, 42), common::randn(m * n, 43));
    let at = |r: usize, kk: usize| if ta { a[kk * m + r] } else { a[r * k + kk] } as f64;
    let bt = |kk: usize, c: usize| if tb { b[c * k + kk] } else { b[kk * n + c] } as f64;
    let want: Vec<f32> = (0..m * n).map(|i| ((0..k).map(|kk| at(i / n, kk) * bt(kk, i % n)).sum::<f64>() + beta as f64 * c0[i] as f64) as f32).collect();
    let (cfg, _) = clipforge::cuda::gemm_launch::linear_kernel_launch(0, 0, None, 0, m, n, k).unwrap();
    Row {
        case: KernelCase {
            kernel: "gemm_f32",
            cfg,
            buffers: vec![a, b, c0],
            args: vec![
                Arg::Buf(0),
                Arg::Buf(1),
                Arg::Buf(2),
                Arg::I32(m as i32),
                Arg::I32(n as i32),
                Arg::I32(k as i32),
                Arg::I32(ta as i32),
                Arg::I32(tb as i32),
                Arg::F32(1.0),
                Arg::F32(beta),
            ],
        },
        expect: vec![(2, want, 1e-5 * (k as f32).sqrt(), 1e-5)],
    }
}

/// Rounds to bf16 or f16 and back, and the 16-bit pattern of that rounding.
fn round_half(v: f32, f16: bool) -> (f64, u16) {
    if f16 {
        let h = half::f16::from_f32(v);
        (h.to_f64(), h.to_bits())
    } else {
        let h = half::bf16::from_f32(v);
        (h.to_f64(), h.to_bits())
    }
}

/// 16-bit values packed two per f32 word, as `DeviceOps::upload_bf16` stores them.
fn pack_bits(v: &[u16]) -> Vec<f32> {
    v.chunks(2).map(|p| f32::from_bits(p[0] as u32 | (p.get(1).copied().unwrap_or(0) as u32) << 16)).collect()
}

/// linear_bf16w / linear_f16w: W in half precision, x rounded to it on load, f32 accumulation;
/// the reference is the f64 dot product of the rounded values (each product is exact in f32).
fn linear_half_row(m: usize, n: usize, k: usize, bias: bool, f16: bool) -> Row {
    let (x, w, b) = (common::randn(m * k, 24), common::randn(n * k, 25), common::randn(n, 26));
    let want: Vec<f32> = (0..m * n)
        .map(|i| {
            let (row, c) = (i / n, i % n);
            let d: f64 = (0..k).map(|j| round_half(x[row * k + j], f16).0 * round_half(w[c * k + j], f16).0).sum();
            (d + if bias { b[c] as f64 } else { 0.0 }) as f32
        })
        .collect();
    let (atol, rtol) = (1e-5 * (k as f32).sqrt(), 1e-5);
    // the check can tell the format: the unrounded (f32) product is outside this tolerance of the
    // rounded reference somewhere (any k ≥ 2 row), so a kernel that skipped the rounding fails
    let exact: Vec<f32> = (0..m * n)
        .map(|i| ((0..k).map(|j| x[i / n * k + j] as f64 * w[i % n * k + j] as f64).sum::<f64>() + if bias { b[i % n] as f64 } else { 0.0 }) as f32)
        .collect();
    assert!(
        k < 2 || exact.iter().zip(&want).any(|(e, r)| (e - r).abs() > atol + rtol * r.abs()),
        "linear_half_row {m}x{n}x{k} f16 {f16}: f32 products pass the rounded check"
    );
    let (cfg, _) = clipforge::cuda::gemm_launch::linear_kernel_launch(0, 0, None, 0, m, n, k).unwrap();
    let wbits: Vec<u16> = w.iter().map(|&v| round_half(v, f16).1).collect();
    Row {
        case: KernelCase {
            kernel: if f16 { "linear_f16w" } else { "linear_bf16w" },
            cfg,
            buffers: vec![x, pack_bits(&wbits), b, vec![f32::NAN; m * n]],
            args: vec![Arg::Buf(0), Arg::Buf(1), Arg::Buf(2), Arg::Buf(3), Arg::I32(m as i32), Arg::I32(n as i32), Arg::I32(k as i32), Arg::I32(bias as i32)],
        },
        expect: vec![(3, want, atol, rtol)],
    }
}

/// f32_to_bf16 / f32_to_f16: round to nearest even, bit exact (n even, so every packed word is
/// written).
fn to_half_row(n: usize, f16: bool) -> Row {
    let x = common::randn(n, 27).iter().map(|v| v * 3.0).collect::<Vec<_>>();
    let want = pack_bits(&x.iter().map(|&v| round_half(v, f16).1).collect::<Vec<_>>());
    Row {
        case: KernelCase {
            kernel: if f16 { "f32_to_f16" } else { "f32_to_bf16" },
            cfg: LaunchCfg::new((n.div_ceil(256).min(7) as u32, 1, 1), (256, 1, 1), 0),
            buffers: vec![x, vec![f32::NAN; n / 2]],
            args: vec![Arg::Buf(0), Arg::Buf(1), Arg::I64(n as i64)],
        },
        expect: vec![(1, want, 0.0, 0.0)],
    }
}

fn embed_rows() -> Vec<Row> {
    let (b, t, w, v) = (2, 5, 37, 11);
    let ids: Vec<i32> = (0..b * t).map(|i| ((i * 7 + 3) % v) as i32).collect();
    let (tok, pos) = (common::randn(v * w, 31), common::randn(t * w, 32));
    let text: Vec<f32> = (0..b * t * w).map(|i| tok[ids[i / w] as usize * w + i % w] + pos[(i / w) % t * w + i % w]).collect();
    // 2 images, 3 channels, 10×10, patch 3: G = 3 (a remainder of one pixel), N = 9
    let (c, sz, p) = (3, 10, 3);
    let (g, n, kk) = (sz / p, (sz / p) * (sz / p), c * p * p);
    let px = common::randn(b * c * sz * sz, 33);
    let cols: Vec<f32> = (0..b * n * kk)
        .map(|i| {
            let (row, col) = (i / kk, i % kk);
            let (bi, patch) = (row / n, row % n);
            let (ci, ky, kx) = (col / (p * p), col % (p * p) / p, col % p);
            px[((bi * c + ci) * sz + patch / g * p + ky) * sz + patch % g * p + kx]
        })
        .collect();
    let patches = common::randn(b * n * w, 34);
    let (cls, vpos) = (common::randn(w, 35), common::randn((n + 1) * w, 36));
    let assembled: Vec<f32> = (0..b * (n + 1) * w)
        .map(|i| {
            let (row, col) = (i / w, i % w);
            let (bi, ti) = (row / (n + 1), row % (n + 1));
            (if ti == 0 { cls[col] } else { patches[(bi * n + ti - 1) * w + col] }) + vpos[ti * w + col]
        })
        .collect();
    let x = common::randn(b * t * w, 37);
    let index = [4i32, 1];
    let pooled: Vec<f32> = (0..b * w).map(|i| x[(i / w * t + index[i / w] as usize) * w + i % w]).collect();
    let (b32, t32, w32) = (b as i32, t as i32, w as i32);
    vec![
        Row {
            case: KernelCase {
                kernel: "text_embed_f32",
                cfg: grid(b * t * w),
                buffers: vec![bits(&ids), tok, pos, vec![f32::NAN; b * t * w]],
                args: vec![Arg::Buf(0), Arg::Buf(1), Arg::Buf(2), Arg::Buf(3), Arg::I32(b32), Arg::I32(t32), Arg::I32(w32)],
            },
            expect: vec![(3, text, 0.0, 0.0)],
        },
        Row {
            case: KernelCase {
                kernel: "patch_im2col_f32",
                cfg: grid(b * n * kk),
                buffers: vec![px, vec![f32::NAN; b * n * kk]],
                args: vec![Arg::Buf(0), Arg::Buf(1), Arg::I32(b32), Arg::I32(c as i32), Arg::I32(sz as i32), Arg::I32(p as i32)],
            },
            expect: vec![(1, cols, 0.0, 0.0)],
        },
        Row {
            case: KernelCase {
                kernel: "vision_embed_assemble_f32",
                cfg: LaunchCfg::new((2, 1, 1), (256, 1, 1), 0), // fewer blocks than elements: grid-stride
                buffers: vec![patches, cls, vpos, vec![f32::NAN; b * (n + 1) * w]],
                args: vec![Arg::Buf(0), Arg::Buf(1), Arg::Buf(2), Arg::Buf(3), Arg::I32(b32), Arg::I32(n as i32), Arg::I32(w32)],
            },
            expect: vec![(3, assembled, 0.0, 0.0)],
        },
        embedding_bwd_row(b * t, w, v),
        Row {
            // y += alpha·x over 4000 elements with 3 blocks: grid-stride rounds
            case: KernelCase {
                kernel: "axpy_f32",
                cfg: LaunchCfg::new((3, 1, 1), (256, 1, 1), 0),
                buffers: vec![common::randn(4000, 51), common::randn(4000, 52)],
                args: vec![Arg::Buf(0), Arg::Buf(1), Arg::F32(-0.75), Arg::I32(4000)],
            },
            expect: vec![(0, common::randn(4000, 51).iter().zip(common::randn(4000, 52)).map(|(y, x)| (-0.75f32).mul_add(x, *y)).collect(), 0.0, 0.0)],
        },
        Row {
            // dx[b, index[b], :] += dp[b, :] into a non-zero dx; every other row untouched
            case: KernelCase {
                kernel: "unpool_rows_f32",
                cfg: grid(b * w),
                buffers: vec![common::randn(b * w, 53), bits(&index), common::randn(b * t * w, 54)],
                args: vec![Arg::Buf(0), Arg::Buf(1), Arg::Buf(2), Arg::I32(b32), Arg::I32(t32), Arg::I32(w32)],
            },
            expect: vec![(
                2,
                {
                    let (dp, mut dx) = (common::randn(b * w, 53), common::randn(b * t * w, 54));
                    for bi in 0..b {
                        for c in 0..w {
                            dx[(bi * t + index[bi] as usize) * w + c] += dp[bi * w + c];
                        }
                    }
                    dx
                },
                0.0,
                0.0,
            )],
        },
        Row {
            // the patch rows of d(assembled): dpatches[b·N + t − 1] = dx[b, t] for t ≥ 1
            case: KernelCase {
                kernel: "vision_embed_bwd_f32",
                cfg: LaunchCfg::new((2, 1, 1), (128, 1, 1), 0),
                buffers: vec![common::randn(b * (n + 1) * w, 55), vec![f32::NAN; b * n * w]],
                args: vec![Arg::Buf(0), Arg::Buf(1), Arg::I32(b32), Arg::I32(n as i32), Arg::I32(w32)],
            },
            expect: vec![(
                1,
                {
                    let dx = common::randn(b * (n + 1) * w, 55);
                    (0..b * n * w)
                        .map(|i| {
                            let (row, c) = (i / w, i % w);
                            dx[((row / n) * (n + 1) + row % n + 1) * w + c]
                        })
                        .collect()
                },
                0.0,
                0.0,
            )],
        },
        Row {
            case: KernelCase {
                kernel: "pool_rows_f32",
                cfg: grid(b * w),
                buffers: vec![x, bits(&index), vec![f32::NAN; b * w]],
                args: vec![Arg::Buf(0), Arg::Buf(1), Arg::Buf(2), Arg::I32(b32), Arg::I32(t32), Arg::I32(w32)],
            },
            expect: vec![(2, pooled, 0.0, 0.0)],
        },
    ]
}

/// embedding_bwd_rows_f32 on `n` positions with repeated ids (groups of different sizes), added
/// into a non-zero table: equal bit for bit to the CPU reference (same order of additions).
fn embedding_bwd_row(n: usize, w: usize, v: usize) -> Row {
    let ids: Vec<u32> = (0..n).map(|i| ((i * i + 3 * i) % v.min(5)) as u32).collect();
    let dx = common::randn(n * w, 41);
    let start = common::randn(v * w, 42);
    let scattered = clipforge::ops::embedding::embedding_bwd(&dx, v, w, &ids).unwrap();
    let want: Vec<f32> = start.iter().zip(&scattered).map(|(a, b)| a + b).collect();
    let mut twin = start.clone(); // the CPU twin of the kernel
    clipforge::ops::embedding::embedding_bwd_grouped(&dx, &mut twin, w, &ids).unwrap();
    assert_eq!(twin, want, "embedding_bwd_grouped differs from the reference");
    let (order, starts, uniq) = clipforge::ops::embedding::group_by_id(&ids);
    let u = uniq.len();
    Row {
        case: KernelCase {
            kernel: "embedding_bwd_rows_f32",
            cfg: LaunchCfg::new((1, 1, 1), (64, 1, 1), 0), // grid-stride: one block of 64 covers u·w
            buffers: vec![dx, bits(&order), bits(&starts), bits(&uniq), start],
            args: vec![Arg::Buf(0), Arg::Buf(1), Arg::Buf(2), Arg::Buf(3), Arg::Buf(4), Arg::I32(u as i32), Arg::I32(w as i32)],
        },
        expect: vec![(4, want, 0.0, 0.0)],
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
    for (m, n, k, bias) in [(1, 1, 1, true), (7, 65, 33, false), (130, 70, 100, true)] {
        t.push(linear_row(m, n, k, bias));
        t.push(linear_half_row(m, n, k, bias, false));
        t.push(linear_half_row(m, n, k, bias, true));
    }
    for (m, n, k) in [(1, 1, 1), (7, 65, 33), (45, 13, 70)] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            t.push(gemm_row(m, n, k, ta, tb, if ta == tb { 0.0 } else { 1.0 }));
        }
    }
    for f16 in [false, true] {
        t.push(to_half_row(2, f16));
        t.push(to_half_row(4000, f16)); // grid-stride: 7 blocks of 256 threads cover 4000 in 3 rounds
    }
    t.extend(embed_rows());
    t
}

fn check(where_: &str, row: &Row, got: &[Vec<f32>]) {
    for (i, want, atol, rtol) in &row.expect {
        common::assert_close(&format!("{where_} {} buffer {i}", row.case.kernel), &got[*i], want, *atol, *rtol);
    }
}

/// Every row in every warp schedule of the emulator (forward, reverse, two seeded random ones):
/// a race that happens to work in launch order fails in another order.
#[test]
fn emulated_kernels_match_cpu_ops() {
    use clipforge::cuda::emu::{set_schedule, Schedule, TEST_SCHEDULES};
    for s in TEST_SCHEDULES {
        set_schedule(s);
        for row in table() {
            let got = row.case.run_emulated().unwrap_or_else(|e| panic!("{}: {e}", row.case.kernel));
            check(&format!("emulated ({s:?})"), &row, &got);
        }
        for row in half_table() {
            let got = row.row.case.run_emulated().unwrap_or_else(|e| panic!("{}: {e}", row.row.case.kernel));
            check_half(&format!("emulated ({s:?})"), &row, &got);
        }
    }
    set_schedule(Schedule::Forward);
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
    for row in half_table() {
        let got = row.row.case.run_gpu(&gpu).unwrap_or_else(|e| panic!("{}: {e}", row.row.case.kernel));
        check_half("gpu", &row, &got);
    }
}

/// The 16-bit activation kernels (and copy_f32, col_reduce_f32) in every warp schedule.
#[test]
fn emulated_keep16_kernels_match_cpu_ops() {
    use clipforge::cuda::emu::{set_schedule, Schedule, TEST_SCHEDULES};
    for s in TEST_SCHEDULES {
        set_schedule(s);
        for row in keep16_table() {
            let got = row.case.run_emulated().unwrap_or_else(|e| panic!("{}: {e}", row.case.kernel));
            check_k16(&format!("emulated ({s:?})"), &row, &got);
        }
    }
    set_schedule(Schedule::Forward);
}

#[test]
fn gpu_keep16_kernels_match_cpu_ops() {
    let gpu = match Gpu::open() {
        Ok(g) => g,
        Err(why) => {
            eprintln!("skipped: no CUDA device ({why})");
            return;
        }
    };
    for row in keep16_table() {
        let got = row.case.run_gpu(&gpu).unwrap_or_else(|e| panic!("{}: {e}", row.case.kernel));
        check_k16("gpu", &row, &got);
    }
}
