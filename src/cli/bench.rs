//! `clipforge bench`: images/s and texts/s of the towers on synthetic weights made in memory
//! (or a model directory), achieved GFLOP/s (the model's FLOPs, as HF counts them), and the FLOPs
//! executed per second as a share of a GEMM ceiling measured in the same run (the bench's largest
//! GEMM alone, same kernel); `--task train` times Long-CLIP fine-tuning steps instead (src/cli/bench_train.rs).
//! `--dry-run` predicts instead of running (src/cli/bench_dry.rs; with `--task train
//! --nproc-per-node N --nodes K` also on many GPUs). `--profile` adds where the CPU's time goes, per
//! backend operation (src/cli/bench_profile.rs).
use super::bench_profile as profile;
use super::{DeviceArg, DtypeArg};
use clap::Args;
use clipforge::api::ClipModel;
use clipforge::error::{Error, Result};
use clipforge::flops;
use clipforge::model::synthetic::{normal_vec, random_weights, Rng};
use clipforge::model::{ClipConfig, Towers};
use clipforge::ops::gemm_bf16::{matmul_bf16, PackedBf16};
use clipforge::ops::gemm_epilogue::Epilogue;
use clipforge::ops::gemm_f32_pack::PackedB;
use clipforge::ops::matmul::linear_packed_into;
use clipforge::tensor::DType;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// What to time: embed (the towers' forward), train (Long-CLIP fine-tuning steps: forward,
    /// loss with the PCA, backward, AdamW) or loader (read + decode + preprocess of --data shards,
    /// no model)
    #[arg(long, default_value = "embed")]
    pub task: String,
    /// --task train: recompute each block's activations in the backward pass
    #[arg(long)]
    pub recompute: bool,
    /// --task train: stretch the text positions 77 → 248 first (keep 20, ×4, as `clipforge stretch`),
    /// so that --text-len can go up to 248 (Long-CLIP's long captions)
    #[arg(long)]
    pub stretch: bool,
    /// An HF CLIP model directory (default: synthetic weights made in memory)
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Architecture of the synthetic weights: b32, b16, l14, l14-336, or their Long-CLIP forms
    /// (248 text positions, 20 frozen) longclip-b32, longclip-b16, longclip-l14, longclip-l14-336
    #[arg(long, default_value = "b32")]
    pub preset: String,
    /// Images (and texts) per batch
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[command(flatten)]
    pub compute: BenchCompute,
    /// Timed batches per tower, or training steps (after one warm-up)
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Tokens per text (the full context, as HF pads to max_length; --task train: the long captions).
    /// Default 77 (the model's positions if fewer); more than the model's positions is an error
    #[arg(long)]
    pub text_len: Option<usize>,
    /// Which towers: both, image, text
    #[arg(long, default_value = "both")]
    pub towers: String,
    /// Print one JSON object instead of a table
    #[arg(long)]
    pub json: bool,
    /// --task loader: WebDataset tar shards ('data/{00000..00009}.tar')
    #[arg(long)]
    pub data: Option<String>,
    /// On the CPU: after the timed batches (or training steps), run --iters more with every
    /// operation of the CPU backend timed, and print where the time goes — per operation and
    /// shape: calls, ms per batch, share of the wall time, GFLOP/s and its share of the GEMM
    /// ceiling (--json: an "image_profile" / "text_profile" / "step_profile" object). For a GPU:
    /// --dry-run
    #[arg(long)]
    pub profile: bool,
    /// With --device cuda: run nothing; record every kernel launch and GEMM of the device path
    /// (embed or --task train) and print the time each would take on --gpu (roofline model,
    /// KERNELS.md "Performance model"): per kernel launches, time, share, % of roofline, SM
    /// waves; predicted img/s, texts/s or samples/s. Needs no GPU or CUDA driver
    #[arg(long)]
    pub dry_run: bool,
    /// --dry-run: the GPU to predict: h100 (H100 SXM), h200, a100 (A100 SXM 80GB) or l40s
    #[arg(long, default_value = "h100")]
    pub gpu: String,
    /// --dry-run --task train only: predict data-parallel fine-tuning on this many GPUs per node
    /// (default 1; at most the server's 8): after the one-GPU report, a table for 1, 2, 4, … ranks
    /// with step time, global samples/s, scaling efficiency, exposed communication and the gradient
    /// all-reduce (NVLink / InfiniBand ring model, KERNELS.md "Many GPUs"). --batch is the batch
    /// of each rank (global batch = --batch × ranks)
    #[arg(long, value_name = "N")]
    pub nproc_per_node: Option<usize>,
    /// --dry-run --task train only: predict on this many nodes of --nproc-per-node GPUs each,
    /// joined by the GPU kind's network (default 1; the table adds a row per node count 2..K)
    #[arg(long, value_name = "K")]
    pub nodes: Option<usize>,
}

/// Where and in what precision bench computes: the inference commands' choices, and f16 for
/// `--task train` on a CUDA device.
#[derive(Args, Clone, Copy, Debug)]
pub struct BenchCompute {
    /// auto (CUDA when available, else CPU), cpu, or cuda
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// f32 or bf16 (as the inference commands); f16 only with --task train on a CUDA device
    /// (half-precision forward GEMMs, f32 master weights)
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// With --dtype f32 on CUDA: exact FP32 GEMMs instead of the TF32 tensor cores (the default for inference; fine-tuning stays exact FP32)
    #[arg(long)]
    pub no_tf32: bool,
}

/// `b` token sequences of `len` tokens: start, random ids, end (seeded).
pub fn synthetic_ids(cfg: &ClipConfig, b: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = Rng::new(seed);
    (0..b)
        .map(|_| {
            let mut s = vec![cfg.text.bos_token_id];
            s.extend((0..len.saturating_sub(2)).map(|_| (rng.next_u64() % 49000) as u32 + 256));
            s.push(cfg.text.eos_token_id);
            s
        })
        .collect()
}

/// The tokens per text of a run: `--text-len` checked against `min` and the model's positions
/// (`stretched`: after `--stretch`), or 77 (fewer if the model has fewer).
pub fn text_len(a: &BenchArgs, min: usize, positions: usize) -> Result<usize> {
    let n = a.text_len.unwrap_or(77.min(positions));
    let hint = match (a.stretch, a.task.as_str()) {
        (false, "train") if positions < 248 => " (add --stretch for up to 248)",
        (false, _) if positions < 248 => " (stretch the model first: clipforge stretch)",
        _ => "",
    };
    if n > positions {
        return Err(Error::msg(format!("--text-len {n} exceeds the model's {positions} text positions{hint}")));
    }
    if n < min {
        return Err(Error::msg(format!("--text-len {n}: at least {min} tokens")));
    }
    Ok(n)
}

/// Seconds per call of `f`, median of `iters` after one warm-up.
fn time_it(iters: usize, what: &str, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let bar = super::progress(iters as u64 + 1, what);
    f()?;
    bar.inc(1);
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
        bar.inc(1);
    }
    bar.finish_and_clear();
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

/// The GEMM ceiling of this run: the bench's largest GEMM — an MLP input Linear (`rows × k → n`) of
/// the first tower timed — alone, through the same kernel and packed weight the towers use (the
/// packed f32 AVX-512 GEMM, or the bf16 one), best of a few calls. The towers add attention,
/// LayerNorms, smaller GEMMs and their thread joins to it, so their share of it stays below 100 %.
pub fn gemm_ceiling_gflops(dtype: DType, (m, k, n): (usize, usize, usize)) -> f64 {
    let x = normal_vec(m * k, 0.0, 1.0, 1); // [m, k]
    let w = normal_vec(n * k, 0.0, 1.0, 2); // [n, k]
    let mut y = vec![0f32; m * n]; // [m, n]
    let mut best = f64::MAX;
    let mut run = |f: &mut dyn FnMut(&mut [f32])| {
        for _ in 0..4 {
            let t = Instant::now();
            f(&mut y);
            best = best.min(t.elapsed().as_secs_f64());
        }
    };
    if dtype == DType::BF16 {
        let p = PackedBf16::from_f32(&w, n, k);
        run(&mut |y| matmul_bf16(&x, m, &p, None, y));
    } else {
        let p = PackedB::linear_weight(&w, n, k);
        run(&mut |y| linear_packed_into(&x, m, &w, &p, None, y, Epilogue::None));
    }
    2.0 * (m * n * k) as f64 / best / 1e9
}

/// The shape (rows, k, n) of [`gemm_ceiling_gflops`]: the MLP input Linear of the image tower
/// (batch × tokens rows) or, when only texts are timed, of the text tower; at most 4096 rows
/// (the kernel's speed has settled long before, and a large model's bench stays short).
pub fn ceiling_shape(cfg: &ClipConfig, images: bool, batch: usize, text_len: usize) -> (usize, usize, usize) {
    let (tower, rows) = if images { (&cfg.vision.tower, batch * cfg.vision.tokens()) } else { (&cfg.text.tower, batch * text_len) };
    (rows.clamp(1, 4096), tower.hidden, tower.intermediate)
}

pub fn run(a: &BenchArgs) -> Result<()> {
    if (a.nproc_per_node.is_some() || a.nodes.is_some()) && !(a.dry_run && a.task == "train") {
        return Err(Error::msg("--nproc-per-node / --nodes predict multi-GPU training: only with --dry-run --task train"));
    }
    if a.profile && (a.dry_run || a.task == "loader") {
        return Err(Error::msg("--profile times the CPU backend's operations of --task embed or train runs, not --dry-run or --task loader"));
    }
    if a.dry_run {
        return super::bench_dry::run(a);
    }
    match a.task.as_str() {
        "embed" => {}
        "train" => return super::bench_train::run(a),
        "loader" => return super::bench_loader::run(a),
        t => return Err(Error::msg(format!("--task {t}: expected embed, train or loader"))),
    }
    let (towers, do_img, do_txt) = match a.towers.as_str() {
        "both" => (Towers::Both, true, true),
        "image" => (Towers::Vision, true, false),
        "text" => (Towers::Text, false, true),
        o => return Err(Error::msg(format!("--towers {o}: expected both, image or text"))),
    };
    if a.batch == 0 {
        return Err(Error::msg("--batch must be at least 1"));
    }
    let opts = super::common::open_options(towers, super::Compute { device: a.compute.device, dtype: a.compute.dtype, no_tf32: a.compute.no_tf32 })?;
    let (model, source) = match &a.model {
        Some(dir) => (ClipModel::open(dir, &opts)?, dir.display().to_string()),
        None => {
            let cfg = ClipConfig::preset(&a.preset).ok_or_else(|| Error::msg(format!("--preset {}: expected {}", a.preset, ClipConfig::PRESETS)))?;
            (ClipModel::from_weights(&random_weights(&cfg, 0), &cfg, &opts)?, format!("synthetic {}", a.preset))
        }
    };
    let on_cuda = model.device() != "cpu";
    if a.profile {
        profile::check_cpu(&model.device())?;
    }
    let mut profiles = vec![];
    let (device, dtype) = (model.device(), model.dtype());
    let cfg = model.config().clone();
    let b = a.batch;
    let mut report = serde_json::json!({
        "model": source, "batch": b, "dtype": dtype.name(), "device": device,
        "threads": rayon::current_num_threads(),
    });
    if do_img {
        let s = cfg.vision.image_size;
        let px = normal_vec(b * 3 * s * s, 0.0, 1.0, 7); // [B, 3, S, S]
        let embed = || model.embed_pixels(&px, b).map(|_| ());
        let sec = time_it(a.iters, "image tower", embed)?;
        if a.profile {
            profiles.push(("image", profile::record(a.iters.max(1), embed)?));
        }
        report["images_per_s"] = (b as f64 / sec).into();
        report["image_gflops"] = (flops::image_flops(&cfg) * b as f64 / sec / 1e9).into();
        report["image_gflops_executed"] = (flops::image_flops_executed(&cfg) * b as f64 / sec / 1e9).into();
    }
    let t = if do_txt { text_len(a, 2, cfg.text.max_positions)? } else { 0 }; // tokens per text
    if do_txt {
        let ids = synthetic_ids(&cfg, b, t, 11);
        let embed = || model.embed_token_ids(&ids, false, b, &mut |_| {}).map(|_| ());
        let sec = time_it(a.iters, "text tower", embed)?;
        if a.profile {
            profiles.push(("text", profile::record(a.iters.max(1), embed)?));
        }
        report["texts_per_s"] = (b as f64 / sec).into();
        report["text_gflops"] = (flops::text_flops(&cfg, t) * b as f64 / sec / 1e9).into();
        report["text_gflops_executed"] = (flops::text_flops_executed(&cfg, t) * b as f64 / sec / 1e9).into();
        report["text_tokens"] = t.into();
    }
    // the ceiling is the CPU's GEMM: only meaningful for CPU runs
    let shape = ceiling_shape(&cfg, do_img, b, t);
    let ceiling = if on_cuda { f64::NAN } else { gemm_ceiling_gflops(dtype, shape) };
    let cpu = (!on_cuda).then(clipforge::ops::cpu_info::CpuInfo::detect);
    if let Some(c) = &cpu {
        report["gemm_ceiling_gflops"] = ceiling.into();
        report["gemm_ceiling_shape"] = serde_json::json!([shape.0, shape.1, shape.2]);
        report["cpu"] = c.to_json();
    }
    for k in ["image", "text"] {
        if on_cuda {
            break;
        }
        // the FLOPs the CPU executed (the pooled last block), not the model's: a share of work done
        if let Some(g) = report.get(format!("{k}_gflops_executed")).and_then(|v| v.as_f64()) {
            report[format!("{k}_share_of_ceiling")] = (g / ceiling).into();
        }
    }
    for (k, p) in &profiles {
        report[format!("{k}_profile")] = p.to_json(ceiling);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report).map_err(Error::msg)?);
    } else {
        if on_cuda {
            println!("model      {}  (batch {b}, f32, {device})", source);
        } else {
            println!("model      {}  (batch {b}, {}, cpu, {} threads)", source, report["dtype"].as_str().unwrap_or(""), report["threads"]);
        }
        if let Some(c) = &cpu {
            println!("cpu        {}", c.line());
        }
        if let Some(x) = report["images_per_s"].as_f64() {
            println!(
                "images/s   {x:8.2}   {:7.1} GFLOP/s model, {:7.1} executed: {:4.0}% of GEMM ceiling",
                report["image_gflops"].as_f64().unwrap_or(0.0),
                report["image_gflops_executed"].as_f64().unwrap_or(0.0),
                100.0 * report["image_share_of_ceiling"].as_f64().unwrap_or(0.0)
            );
        }
        if let Some(x) = report["texts_per_s"].as_f64() {
            println!(
                "texts/s    {x:8.2}   {:7.1} GFLOP/s model, {:7.1} executed: {:4.0}% of GEMM ceiling   ({} tokens)",
                report["text_gflops"].as_f64().unwrap_or(0.0),
                report["text_gflops_executed"].as_f64().unwrap_or(0.0),
                100.0 * report["text_share_of_ceiling"].as_f64().unwrap_or(0.0),
                report["text_tokens"]
            );
        }
        if !on_cuda {
            let (m, k, n) = shape;
            let tower = if do_img { "image" } else { "text" };
            println!("GEMM ceiling {ceiling:.1} GFLOP/s ({} {m}×{k}→{n}: the {tower} tower's MLP GEMM alone, measured now)", dtype.name());
        }
        for (k, p) in &profiles {
            p.print(&format!("{k} tower"), ceiling);
        }
    }
    Ok(())
}
