//! Criterion benches of the CUDA kernels on a real GPU (buffers resident, launch + sync timed),
//! named cuda/<kernel>/<shape>. Without a device: prints "skipped: no CUDA device" and exits.
//! Run: cargo bench --bench cuda
use clipforge::cuda::table::{Arg, Gpu, KernelCase};
use clipforge::cuda::LaunchCfg;
use criterion::{Criterion, Throughput};

fn cases() -> Vec<(String, KernelCase, u64)> {
    let mut v = vec![];
    // ViT-B/16 batch 256 (50,432 rows × 768) and L/14 batch 256 (65,792 × 1024): bytes moved per launch.
    for (name, rows, cols) in [("B16", 50432usize, 768usize), ("L14", 65792, 1024)] {
        let n = rows * cols;
        let cfg = LaunchCfg::new((rows.div_ceil(4) as u32, 1, 1), (128, 1, 1), 0);
        let bufs = vec![vec![0.5; n], vec![1.0; cols], vec![0.0; cols], vec![0.0; n], vec![0.0; rows], vec![0.0; rows]];
        let args =
            vec![Arg::Buf(0), Arg::Buf(1), Arg::Buf(2), Arg::Buf(3), Arg::Buf(4), Arg::Buf(5), Arg::I32(rows as i32), Arg::I32(cols as i32), Arg::F32(1e-5)];
        v.push((format!("layernorm_fwd_f32/{name}"), KernelCase { kernel: "layernorm_fwd_f32", cfg, buffers: bufs, args }, (8 * n) as u64));
        let i = 4 * cols;
        let m = rows * i;
        let cfg = LaunchCfg::new((i.div_ceil(256) as u32, 512, 1), (256, 1, 1), 0);
        let bufs = vec![vec![0.5; m], vec![0.1; i], vec![0.0; m]];
        let args = vec![Arg::Buf(0), Arg::Buf(1), Arg::Buf(2), Arg::I32(rows as i32), Arg::I32(i as i32)];
        v.push((format!("bias_quick_gelu_fwd_f32/{name}"), KernelCase { kernel: "bias_quick_gelu_fwd_f32", cfg, buffers: bufs, args }, (12 * m) as u64));
    }
    // the token-embedding gradient of B/32 text at batch 256 (256·77 positions, W 512, ~4000 distinct ids)
    let (n, w, v_) = (256 * 77usize, 512usize, 49408usize);
    let ids: Vec<u32> = (0..n).map(|i| ((i * 2654435761) % 4000) as u32).collect();
    let (order, starts, uniq) = clipforge::ops::embedding::group_by_id(&ids);
    let bits = |x: &[i32]| x.iter().map(|&i| f32::from_bits(i as u32)).collect::<Vec<f32>>();
    let u = uniq.len();
    let bufs = vec![vec![0.01; n * w], bits(&order), bits(&starts), bits(&uniq), vec![0.0; v_ * w]];
    let args = vec![Arg::Buf(0), Arg::Buf(1), Arg::Buf(2), Arg::Buf(3), Arg::Buf(4), Arg::I32(u as i32), Arg::I32(w as i32)];
    let cfg = LaunchCfg::new(((u * w).div_ceil(256).min(16384) as u32, 1, 1), (256, 1, 1), 0);
    v.push((
        "embedding_bwd_rows_f32/B32-text-b256".into(),
        KernelCase { kernel: "embedding_bwd_rows_f32", cfg, buffers: bufs, args },
        (4 * (n * w + 2 * u * w)) as u64,
    ));
    // attention at ViT-B/16 (T 197, 12 heads) and L/14 (T 257, 16 heads), hd 64, batch 256, bf16: the
    // tensor-core flash kernels next to the CUDA-core kernel they replace (bytes: q, k, v, o or
    // q, k, v, o, dO, dq, dk, dv once each, + lse)
    for (name, t, h) in [("B16", 197usize, 12usize), ("L14", 257, 16)] {
        let (b, d) = (256usize, 64usize);
        let n = b * t * h * d; // elements per tensor
        let half = |x: f32| f32::from_bits(u32::from(half::bf16::from_f32(x).to_bits()) * 0x1_0001); // two equal bf16s
        let s = clipforge::ops::attention::AttnShape { batch: b, seq: t, heads: h, head_dim: d, causal: false, scale: 0.125 };
        let tail = [Arg::I32(b as i32), Arg::I32(t as i32), Arg::I32(h as i32), Arg::I32(d as i32), Arg::I32(0), Arg::F32(0.125)];
        for (kernel, bwd) in [("flash_fwd_bf16", false), ("attention_fwd_bf16", false), ("flash_bwd_bf16", true)] {
            let l = clipforge::cuda::flash::best_launch(&s, clipforge::DType::BF16, bwd).unwrap();
            let l = if kernel.starts_with("attention") { clipforge::cuda::attention::attention_fwd_launch(&s, clipforge::DType::BF16).unwrap() } else { l };
            let cfg = LaunchCfg::new(l.grid, l.block, l.smem_bytes);
            let tensors = if bwd { 8 } else { 4 };
            let mut bufs: Vec<Vec<f32>> = (0..tensors).map(|i| vec![half(0.01 * (i + 1) as f32); n / 2]).collect();
            let lse_at = if bwd { 5 } else { 4 };
            bufs.insert(lse_at, vec![0.0; b * h * t]);
            let mut args: Vec<Arg> = (0..bufs.len()).map(Arg::Buf).collect();
            args.extend(tail.iter().copied());
            v.push((format!("{kernel}/{name}-b256"), KernelCase { kernel, cfg, buffers: bufs, args }, (2 * tensors * n + 4 * b * h * t) as u64));
        }
    }
    v
}

fn main() {
    let gpu = match Gpu::open() {
        Ok(g) => g,
        Err(why) => {
            println!("skipped: no CUDA device ({why})");
            return;
        }
    };
    let mut c = Criterion::default().configure_from_args();
    let mut g = c.benchmark_group("cuda");
    for (name, case, bytes) in cases() {
        let mut r = case.upload(&gpu).unwrap_or_else(|e| panic!("{name}: {e}"));
        g.throughput(Throughput::Bytes(bytes));
        g.bench_function(&name, |b| b.iter(|| r.launch_sync(&gpu).unwrap()));
    }
    g.finish();
    c.final_summary();
}
