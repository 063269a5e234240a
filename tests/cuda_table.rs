//! The CUDA op table: each kernel case runs on the CPU emulator (in every warp schedule) and, when a GPU is present, on
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
    let (cfg, _) = clipforge::cuda::backend::linear_kernel_launch(0, 0, None, 0, m, n, k).unwrap();
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
    let (cfg, _) = clipforge::cuda::backend::linear_kernel_launch(0, 0, None, 0, m, n, k).unwrap();
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
    let (cfg, _) = clipforge::cuda::backend::linear_kernel_launch(0, 0, None, 0, m, n, k).unwrap();
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
struct HalfRow {
    row: Row,
    halves: Vec<(usize, usize, bool, Vec<f32>)>,
}

/// gemm_bf16 / gemm_f16: C = op(A)·op(B) (+ bias) + beta·C on packed half A and B (the reference:
/// f64 products of the rounded values, so only the f32 summation order differs).
fn gemm_half_row(m: usize, n: usize, k: usize, ta: bool, tb: bool, beta: f32, bias: bool, f16: bool) -> Row {
    let (a, b, c0, bv) = (common::randn(m * k, 61), common::randn(k * n, 62), common::randn(m * n, 63), common::randn(n, 64));
    let ab: Vec<u16> = a.iter().map(|&v| round_half(v, f16).1).collect();
    let bb: Vec<u16> = b.iter().map(|&v| round_half(v, f16).1).collect();
    let at = |r: usize, kk: usize| round_half(if ta { a[kk * m + r] } else { a[r * k + kk] }, f16).0;
    let bt = |kk: usize, c: usize| round_half(if tb { b[c * k + kk] } else { b[kk * n + c] }, f16).0;
    let want: Vec<f32> = (0..m * n)
        .map(|i| {
            let (r, c) = (i / n, i % n);
            let d: f64 = (0..k).map(|kk| at(r, kk) * bt(kk, c)).sum();
            (d + if bias { bv[c] as f64 } else { 0.0 } + beta as f64 * c0[i] as f64) as f32
        })
        .collect();
    let (cfg, _) = clipforge::cuda::backend::linear_kernel_launch(0, 0, None, 0, m, n, k).unwrap();
    Row {
        case: KernelCase {
            kernel: if f16 { "gemm_f16" } else { "gemm_bf16" },
            cfg,
            buffers: vec![pack_bits(&ab), pack_bits(&bb), bv, c0],
            args: vec![
                Arg::Buf(0),
                Arg::Buf(1),
                if bias { Arg::Buf(2) } else { Arg::Null },
                Arg::Buf(3),
                Arg::I32(m as i32),
                Arg::I32(n as i32),
                Arg::I32(k as i32),
                Arg::I32(ta as i32),
                Arg::I32(tb as i32),
                Arg::F32(1.0),
                Arg::F32(beta),
            ],
        },
        expect: vec![(3, want, 1e-5 * (k as f32).sqrt(), 1e-5)],
    }
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
                cfg: clipforge::cuda::train_ops::col_reduce_cfg(n),
                buffers: vec![partial, vec![f32::NAN; n]],
                args: vec![Arg::Buf(0), Arg::Buf(1), Arg::I32(parts as i32), Arg::I32(n as i32)],
            },
            expect: vec![(1, total, tol, 1e-5)],
        },
    ]
}

/// Rows of the mixed-precision and launch-geometry kernels (odd shapes: 1, 7, 45×65, widths not
/// divisible by 64 or by 4).
fn half_table() -> Vec<HalfRow> {
    let mut t = vec![];
    for (m, n, k) in [(1, 1, 1), (7, 65, 33), (45, 13, 70)] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            for f16 in [false, true] {
                let bias = ta != tb;
                t.push(HalfRow { row: gemm_half_row(m, n, k, ta, tb, if ta == tb { 0.0 } else { 1.0 }, bias, f16), halves: vec![] });
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

fn check_half(where_: &str, row: &HalfRow, got: &[Vec<f32>]) {
    check(where_, &row.row, got);
    for (i, n, f16, want) in &row.halves {
        let u = half_u(*f16);
        common::assert_close(&format!("{where_} {} half buffer {i}", row.row.case.kernel), &unpack_half(&got[*i], *n, *f16), want, 1e-6, 2.0 * u);
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
