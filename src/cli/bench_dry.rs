//! `clipforge bench --device cuda --dry-run --gpu h100`: the device code path on the recording
//! device (nothing executed, no GPU or driver needed) and the roofline prediction of every launch
//! on a named GPU (src/perf/): per kernel its launches, predicted time, share of the step, % of
//! its roofline and SM waves, and the predicted images/s, texts/s or training samples/s; with
//! `--task train --nproc-per-node N [--nodes K]` then the data-parallel scaling table
//! (src/perf/collective.rs).
use super::bench::{text_len, BenchArgs};
use super::DeviceArg;
use clipforge::dist::buckets::DEFAULT_CAP;
use clipforge::error::{Error, Result};
use clipforge::model::{ClipConfig, Towers};
use clipforge::perf::collective::Scaling;
use clipforge::perf::gpus::k;
use clipforge::perf::report::{offenders, Report};
use clipforge::perf::{gpus, resources, run};
use clipforge::tensor::DType;
use serde_json::{json, Value};

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
            "scaling": scaling.as_ref().map(scaling_json),
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
        println!("\n== data parallel on up to {top} × {} (per-rank batch {})\n{}", gpu.name, a.batch, scaling_table(s));
    }
    Ok(())
}

/// The scaling prediction as JSON (the `scaling` object of `--json`).
fn scaling_json(sc: &Scaling) -> Value {
    let l = &sc.gpu.link;
    let s = &sc.split;
    let rows: Vec<Value> = sc
        .rows
        .iter()
        .map(|r| {
            json!({
                "ranks": r.layout.ranks(), "nodes": r.layout.nodes, "gpus_per_node": r.layout.per_node,
                "step_ms": r.step * 1e3, "samples_per_s": r.per_s, "efficiency": r.efficiency,
                "exposed_comm_ms": r.exposed * 1e3, "all_reduce_ms": r.all_reduce * 1e3, "all_gather_ms": r.all_gather * 1e3,
                "bound": r.bound.label(l), "host_loss_gflop": r.host_loss_flops / 1e9, "host_loss_extra_ms": r.host_loss * 1e3,
            })
        })
        .collect();
    json!({
        "per_rank_batch": sc.batch, "embedding_dim": sc.dim,
        "gradient_bytes": sc.grad_bytes(), "buckets": sc.buckets.len(), "bucket_cap_bytes": 4 * DEFAULT_CAP,
        "split_ms": {
            "forward": s.forward * 1e3, "optimizer": s.optimizer * 1e3,
            "backward": s.backward.iter().map(|(t, d)| json!({"tower": format!("{t:?}").to_lowercase(), "ms": d * 1e3})).collect::<Vec<_>>(),
        },
        "interconnect": {
            "intra": l.intra, "intra_busbw_gbs": l.intra_busbw / 1e9, "intra_step_us": l.intra_step_s * 1e6,
            "gpus_per_node": l.gpus_per_node, "nic": l.nic, "nics_per_node": l.nics_per_node,
            "nic_busbw_gbs": l.nic_busbw / 1e9, "net_step_us": l.net_step_s * 1e6, "nccl_base_us": k::NCCL_BASE_S * 1e6,
        },
        "rows": rows,
    })
}

/// The scaling prediction as text.
pub fn scaling_table(sc: &Scaling) -> String {
    let (l, s) = (&sc.gpu.link, &sc.split);
    let bwd = s.backward.iter().map(|(t, d)| format!("{} {:.1}", format!("{t:?}").to_lowercase(), d * 1e3)).collect::<Vec<_>>().join(", ");
    let mut out = format!(
        "data parallel: per-rank batch {}, {:.2} GB of f32 gradients in {} buckets of ≤ 25 MiB (ring all-reduce overlapped with the backward), \
         3 × [{}, {}] f32 embeddings all-gathered per rank and their gradients reduce-scattered\n",
        sc.batch,
        sc.grad_bytes() / 1e9,
        sc.buckets.len(),
        sc.batch,
        sc.dim
    );
    out += &format!(
        "step split forward {:.1} ms, backward {:.1} ms ({bwd}), AdamW {:.1} ms (from the recording)\n",
        s.forward * 1e3,
        s.backward_total() * 1e3,
        s.optimizer * 1e3
    );
    out += &format!(
        "links      {}: ring busbw {:.0} GB/s, {:.1} µs/step; {} ({} per node): {:.0} GB/s each, {:.1} µs/step; {:.1} µs per call\n",
        l.intra,
        l.intra_busbw / 1e9,
        l.intra_step_s * 1e6,
        l.nic,
        l.nics_per_node,
        l.nic_busbw / 1e9,
        l.net_step_s * 1e6,
        k::NCCL_BASE_S * 1e6
    );
    out += &format!(
        "{:>5} {:>10} {:>9} {:>10} {:>6} {:>10} {:>14} {:>10} {:>8} {:>16} {:>13}\n",
        "ranks", "nodes×GPUs", "step ms", "samples/s", "eff", "exposed ms", "all-reduce ms", "gather ms", "bound", "host loss GFLOP", "host +ms"
    );
    for r in &sc.rows {
        out += &format!(
            "{:>5} {:>10} {:>9.2} {:>10.0} {:>5.1}% {:>10.3} {:>14.3} {:>10.3} {:>8} {:>16.2} {:>13.2}\n",
            r.layout.ranks(),
            format!("{}×{}", r.layout.nodes, r.layout.per_node),
            r.step * 1e3,
            r.per_s,
            100.0 * r.efficiency,
            r.exposed * 1e3,
            r.all_reduce * 1e3,
            r.all_gather * 1e3,
            r.bound.label(l),
            r.host_loss_flops / 1e9,
            r.host_loss * 1e3
        );
    }
    out += &format!(
        "exposed = gathers and reduce-scatters + the host loss's growth over one GPU's (each rank's rows against the global batch, at an assumed {:.0} \
         GFLOP/s per rank) + all-reduce ending after the backward; eff = samples/s ÷ (ranks × one GPU's). Not modelled: NCCL kernels sharing SMs \
         and DRAM with the backward.\n",
        clipforge::perf::collective::HOST_FLOPS_PER_RANK / 1e9
    );
    out
}
