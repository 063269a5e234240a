//! `clipforge bench --device cuda --dry-run --gpu h100`: the device code path on the recording
//! device (nothing executed, no GPU or driver needed) and the roofline prediction of every launch
//! on a named GPU (src/perf/): per kernel its launches, predicted time, share of the step, % of
//! its roofline and SM waves, and the predicted images/s, texts/s or training samples/s; with
//! `--task train --nproc-per-node N [--nodes K]` then the data-parallel scaling table
//! (src/perf/collective.rs).
use super::bench::{text_len, BenchArgs};
use super::DeviceArg;
use clipforge::error::{Error, Result};
use clipforge::model::{ClipConfig, Towers};
use clipforge::perf::collective::Scaling;
use clipforge::perf::report::{offenders, Report};
use clipforge::perf::{gpus, resources, run};
use clipforge::tensor::DType;
use serde_json::json;

pub fn run(a: &BenchArgs) -> Result<()> {
    if a.compute.device == DeviceArg::Cpu {
        return Err(Error::msg("--dry-run predicts the CUDA device path: use --device cuda"));
    }
    let gpu = gpus::gpu(&a.gpu).ok_or_else(|| Error::msg(format!("--gpu {}: expected {}", a.gpu, gpus::keys())))?;
    if a.model.is_some() {
        return Err(Error::msg("--dry-run uses the --preset shapes (weights are never read): drop --model"));
    }
    let mut cfg = ClipConfig::preset(&a.preset).ok_or_else(|| Error::msg(format!("--preset {}: expected {}", a.preset, ClipConfig::PRESETS)))?;
    let dtype = a.compute.dtype.precision();
    if a.nproc_per_node.is_some() || a.nodes.is_some() {
        clipforge::perf::collective::check_layout(gpu, a.nproc_per_node.unwrap_or(1), a.nodes.unwrap_or(1))?;
    }
    let (rec, phases) = match a.task.as_str() {
        "embed" => {
            if dtype == DType::F16 {
                return Err(Error::msg("--dtype f16: the inference towers compute in f32 or bf16 (use bf16)"));
            }
            let towers = match a.towers.as_str() {
                "both" => Towers::Both,
                "image" => Towers::Vision,
                "text" => Towers::Text,
                o => return Err(Error::msg(format!("--towers {o}: expected both, image or text"))),
            };
            let t = text_len(a, 2, cfg.text.max_positions)?;
            run::infer(&cfg, a.batch, dtype, t, towers, !a.compute.no_tf32)?
        }
        "train" => {
            if a.stretch {
                if cfg.text.frozen_positions > 0 {
                    return Err(Error::msg(format!("--stretch: the preset {} is already stretched", a.preset)));
                }
                // the same shapes as bench_train's in-memory stretch (77 → 248, 20 kept)
                let s = clipforge::ops::pos_gather::Stretch::LONG_CLIP;
                (cfg.text.max_positions, cfg.text.frozen_positions) = (s.new_len(), s.keep);
            }
            let t = text_len(a, 3, cfg.text.max_positions)?;
            let (rec, p) = run::train(&cfg, a.batch, dtype, t, a.recompute)?;
            (rec, vec![p])
        }
        t => return Err(Error::msg(format!("--dry-run: --task {t}: expected embed or train"))),
    };
    let log = rec.log();
    let reports = phases.iter().map(|p| Report::new(gpu, p, &log)).collect::<Result<Vec<_>>>()?;
    let scaling = match (a.nproc_per_node, a.nodes, reports.first()) {
        (None, None, _) => None,
        (n, k, Some(r)) if a.task == "train" => Some(Scaling::new(gpu, r, &cfg, n.unwrap_or(1), k.unwrap_or(1))?),
        _ => return Err(Error::msg("--nproc-per-node / --nodes: only with --task train")),
    };
    let regs = if !resources::have_report() {
        format!(
            "DEFAULT {} registers per thread for every kernel: this build had no nvcc (no ptxas report), occupancy is a guess",
            clipforge::perf::gpus::k::DEFAULT_REGS
        )
    } else if reports.iter().any(|r| r.default_regs()) {
        format!("ptxas report of {} (some kernels missing from it: DEFAULT registers for those)", resources::arch_of(gpu.sm))
    } else {
        format!("ptxas report of {} ({})", resources::arch_of(gpu.sm), clipforge::cuda::kernels::NVCC_VERSION.unwrap_or("nvcc"))
    };
    if a.json {
        let v = json!({
            "dry_run": true, "gpu": gpu.name, "gpu_key": gpu.key, "task": a.task, "preset": a.preset, "batch": a.batch,
            "dtype": dtype.name(), "recompute": a.recompute, "stretch": a.stretch, "registers": regs,
            "phases": reports.iter().map(|r| r.json()).collect::<Vec<_>>(),
            "scaling": scaling.as_ref().map(|s| s.json()),
        });
        println!("{}", serde_json::to_string_pretty(&v).map_err(Error::msg)?);
        return Ok(());
    }
    println!(
        "dry run    {} on {} ({} SMs), batch {}, {} — predicted by the roofline model of KERNELS.md, nothing executed",
        a.preset,
        gpu.name,
        gpu.sms,
        a.batch,
        dtype.name()
    );
    println!("registers  {regs}");
    for r in &reports {
        println!("\n== {}\n{}", r.phase, r.table());
        let low = r.below_wave();
        if !low.is_empty() {
            print!("{}", offenders("below one full wave although the work could fill the GPU", &low));
        }
        let off = r.off_tensor_cores();
        if !off.is_empty() && dtype != DType::F32 {
            print!("{}", offenders(&format!("GEMMs / attention not on tensor cores under {}", dtype.name()), &off));
        }
    }
    if let Some(s) = &scaling {
        let top = s.rows.last().map_or(1, |r| r.layout.ranks());
        println!("\n== data parallel on up to {top} × {} (per-rank batch {})\n{}", gpu.name, a.batch, s.table());
    }
    Ok(())
}
