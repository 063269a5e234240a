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
