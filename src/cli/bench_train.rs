//! `clipforge bench --task train`: Long-CLIP fine-tuning step throughput on synthetic weights
//! (or a model directory) and a synthetic batch — the same `StepEngine` the trainer runs (the CPU
//! tape, or the towers on a CUDA device with `--device cuda`), timed per optimizer step (forward,
//! loss with the PCA, backward, AdamW), with the peak resident memory of the steps (the peak is reset
//! after loading, where Linux allows it) and of the process.
use super::bench::{synthetic_ids, BenchArgs};
use clipforge::error::{Error, Result};
use clipforge::flops;
use clipforge::model::synthetic::{normal_vec, random_weights};
use clipforge::model::ClipConfig;
use clipforge::ops::adamw::AdamW;
use clipforge::tensor::Tensor;
use clipforge::train::data::Batch;
use clipforge::train::model::TrainClip;
use clipforge::train::step::Micro;
use clipforge::train::trainer::{new_optimizer, EngineSpec};
use std::time::Instant;

/// A memory line of /proc/self/status ("VmHWM": peak resident set, "VmRSS": current), MiB;
/// None where /proc is absent.
pub fn status_mib(key: &str) -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = s.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb / 1024.0)
}

/// Long-CLIP's knowledge-preserved stretch of the text position table, in memory: L → 4L − 3·20
/// rows, the first 20 frozen (the same arithmetic as `clipforge stretch`, `ops::pos_gather::stretch`).
fn stretch_positions(model: &mut TrainClip) -> Result<()> {
    let name = "text_model.embeddings.position_embedding.weight";
    let i = model.index(name).ok_or_else(|| Error::msg(format!("no parameter {name}")))?;
    let (len, w) = (model.config.text.max_positions, model.config.text.tower.hidden);
    if model.config.text.frozen_positions > 0 {
        return Err(Error::msg(format!("--stretch: the model is already stretched ({len} positions)")));
    }
    let s = clipforge::ops::pos_gather::Stretch::new(len, 20, 4)?;
    let table = clipforge::ops::pos_gather::stretch(&model.params[i].1.f32_data(), w, s)?;
    model.params[i].1 = Tensor::from_vec(table, &[s.new_len(), w])?;
    let mut config = model.config.clone();
    (config.text.max_positions, config.text.frozen_positions) = (s.new_len(), 20);
    model.set_config(config);
    Ok(())
}

pub fn run(a: &BenchArgs) -> Result<()> {
    if a.batch < 2 {
        return Err(Error::msg("--task train: --batch must be at least 2 (the contrastive loss compares samples)"));
    }
    let (model, source) = match &a.model {
        Some(dir) => (TrainClip::load_dir(dir)?, dir.display().to_string()),
        None => {
            let cfg = ClipConfig::preset(&a.preset).ok_or_else(|| Error::msg(format!("--preset {}: expected {}", a.preset, ClipConfig::PRESETS)))?;
            (TrainClip::from_weights(&random_weights(&cfg, 0), &cfg)?, format!("synthetic {}", a.preset))
        }
    };
    let mut model = model;
    model.recompute = a.recompute;
    model.compute = a.compute.dtype.precision(); // the CPU step's GEMM type (bf16: forward and backward)
    if a.stretch {
        stretch_positions(&mut model)?;
    }
    let cfg = model.config.clone();
    let mut opt = new_optimizer(&model, AdamW { lr: 1e-6, ..AdamW::default() });
    let spec = EngineSpec {
        device: &format!("{:?}", a.compute.device).to_lowercase(),
        dtype: a.compute.dtype.precision(),
        smart: false,
        pca_dim: 32,
        recompute: a.recompute,
        lambda_align: 1.0,
        lambda_sparsity: 0.0,
    };
    let mut eng = spec.build(&model, &opt)?;
    let device = eng.describe();
    if a.profile {
        super::bench_profile::check_cpu(&device)?;
    }
    let (b, s) = (a.batch, cfg.vision.image_size);
    let t_long = super::bench::text_len(a, 3, cfg.text.max_positions)?;
    let t_short = 16.min(t_long);
    let batch = Batch {
        pixels: Tensor::from_vec(normal_vec(b * 3 * s * s, 0.0, 1.0, 7), &[b, 3, s, s])?,
        long_ids: synthetic_ids(&cfg, b, t_long, 11),
        short_ids: synthetic_ids(&cfg, b, t_short, 12),
        samples: (0..b).collect(),
    };
    let mut step = || -> Result<f32> {
        let l = eng.micro_batch(&model, &Micro { batch: &batch, smart_ids: None, last: true }, 1.0)?;
        opt.begin_step();
        eng.apply(&mut model, &mut opt, &[1e-6])?;
        Ok(l.loss)
    };
    // The peak from here on is the steps' (weights, optimizer state, gradients, activations), not
    // the loading's transient copies: "5" to clear_refs resets VmHWM (Linux ≥ 4.0).
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let before = status_mib("VmRSS");
    let bar = super::progress(a.iters as u64 + 1, "train steps");
    step()?; // warm-up (allocations, module loads, the optimizer moments touched)
    bar.inc(1);
    let mut times = vec![];
    let mut loss = 0f32;
    for _ in 0..a.iters.max(1) {
        let t0 = Instant::now();
        loss = step()?;
        times.push(t0.elapsed().as_secs_f64()); // the next step's first download waits for this step's AdamW
        bar.inc(1);
    }
    bar.finish_and_clear();
    let prof = if a.profile { Some(super::bench_profile::record(a.iters.max(1), || step().map(|_| ()))?) } else { None };
    times.sort_by(f64::total_cmp);
    let sec = times[times.len() / 2];
    // forward + backward ≈ 3 forwards (+1 with recompute): image + long text + short text
    let fwd = b as f64 * (flops::image_flops(&cfg) + flops::text_flops(&cfg, t_long) + flops::text_flops(&cfg, t_short));
    let gflops = fwd * if a.recompute { 4.0 } else { 3.0 } / sec / 1e9;
    let peak = status_mib("VmHWM"); // the steps' peak where it was reset, else the whole process's
    let step_peak = peak.filter(|_| reset);
    let mut report = serde_json::json!({
        "task": "train", "model": source, "batch": b, "device": device, "dtype": spec.dtype.name(),
        "recompute": a.recompute, "long_tokens": t_long, "short_tokens": t_short, "threads": rayon::current_num_threads(),
        "step_s": sec, "samples_per_s": b as f64 / sec, "train_gflops": gflops, "loss": loss,
        "peak_rss_mib": peak, "peak_rss_mib_per_sample": peak.map(|p| p / b as f64),
        "rss_before_steps_mib": before, "step_peak_rss_mib": step_peak,
    });
    // the CPU's GEMM in the step's precision at the image tower's MLP shape, for the profile's shares
    let ceiling = match &prof {
        Some(_) => super::bench::gemm_ceiling_gflops(spec.dtype, super::bench::ceiling_shape(&cfg, true, b, 0)),
        None => f64::NAN,
    };
    let cpu = device.starts_with("cpu").then(clipforge::ops::cpu_info::CpuInfo::detect);
    if let Some(c) = &cpu {
        report["cpu"] = c.to_json();
    }
    if let Some(p) = &prof {
        report["step_profile"] = p.to_json(ceiling);
        report["gemm_ceiling_gflops"] = ceiling.into();
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report).map_err(Error::msg)?);
    } else {
        println!(
            "model      {source}  (Long-CLIP step, batch {b}, {} tokens long / {t_short} short, {}{}, {device})",
            t_long,
            report["dtype"].as_str().unwrap_or(""),
            if a.recompute { ", recompute" } else { "" }
        );
        if let Some(c) = &cpu {
            println!("cpu        {}", c.line());
        }
        println!("step       {:8.1} ms   {:8.2} samples/s   {gflops:7.1} GFLOP/s (≈3× forward)", sec * 1e3, b as f64 / sec);
        match (step_peak, before) {
            (Some(p), Some(b0)) => {
                println!("peak RSS   {p:8.0} MiB during the steps ({b0:.0} MiB before them: weights; the rest AdamW state, gradients, activations)")
            }
            _ => {
                if let Some(p) = peak {
                    println!("peak RSS   {p:8.0} MiB  = {:.0} MiB/sample (host, whole process: weights, AdamW state, gradients, activations)", p / b as f64);
                }
            }
        }
        if let Some(p) = &prof {
            println!("GEMM ceiling {ceiling:.1} GFLOP/s ({}, the image tower's MLP GEMM alone, measured now)", spec.dtype.name());
            p.print("training step", ceiling);
        }
    }
    Ok(())
}
