//! The performance model's assertions (issue 12, points 5 and 6), without a GPU: the device code
//! path runs on the recording device (src/perf/record.rs) and the roofline predictor
//! (src/perf/roofline.rs) times it on an H100 SXM. Three cases, bf16:
//! ViT-B/16 and ViT-L/14 image-tower inference at batch 256, and the Long-CLIP ViT-L/14 training
//! step (248-token long captions, 16-token short ones, batch 128, no --recompute).
//!
//! (a) no kernel launch below one full wave (SMs × blocks per SM at its occupancy) when its work
//!     could fill the GPU: the problem's parallelism (src/perf/cost.rs `par`: threads with one
//!     independent output element each, reductions one per 64 summed elements, row kernels one
//!     warp per row) ≥ SMs × blocks per SM × threads per block;
//! (b) under bf16 every GEMM and attention runs on the tensor cores (the patch convolution too:
//!     its GEMM and weight gradient read 16-bit pixels and weights);
//! (c) the issue's goals hold: B/16 ≥ 12 000 img/s, L/14 ≥ 2 500 img/s, Long-CLIP L/14
//!     fine-tuning ≥ 600 samples/s on an H100 SXM (the test prints each prediction and its margin).
//! Each failure prints a table of the offending launches.
//!
//! Many GPUs (issue 17, point 4; src/perf/collective.rs): the same Long-CLIP L/14 step as data
//! parallel on 8 H100s per node (NVLink 4 ring inside a node, InfiniBand NDR between nodes,
//! gradients all-reduced in 25 MiB buckets overlapped with the backward): ≥ 90 % scaling
//! efficiency at 8 ranks, 100 % at one, efficiency non-increasing with the ranks in a node and
//! lower on two nodes than on one; the all-reduce cost against a hand computation.
use clipforge::model::{ClipConfig, Towers};
use clipforge::perf::collective::{all_reduce, Bound, Layout, Scaling};
use clipforge::perf::cost::row_of;
use clipforge::perf::gpus::gpu;
use clipforge::perf::record::Op;
use clipforge::perf::report::{offenders, Report};
use clipforge::perf::run;
use clipforge::DType;
use std::collections::BTreeSet;
use std::sync::OnceLock;

struct Case {
    name: &'static str,
    report: Report,
    kernels: BTreeSet<String>,
    /// The issue's goal (img/s or samples/s).
    goal: f64,
}

fn kernels(ops: &[Op]) -> BTreeSet<String> {
    ops.iter().filter_map(|o| if let Op::Launch(l) = o { Some(l.kernel.clone()) } else { None }).collect()
}

fn infer(name: &'static str, preset: &str, goal: f64) -> Case {
    let cfg = ClipConfig::preset(preset).unwrap();
    let (rec, phases) = run::infer(&cfg, 256, DType::BF16, 77, Towers::Vision, true).unwrap();
    let report = Report::new(gpu("h100").unwrap(), &phases[0], &rec.log()).unwrap();
    Case { name, report, kernels: kernels(&phases[0].ops), goal }
}

/// Long-CLIP L/14: 248 text positions, 20 frozen.
fn long_clip_l14() -> ClipConfig {
    let mut cfg = ClipConfig::preset("longclip-l14").unwrap();
    cfg.text.max_positions = 248;
    cfg
}

fn train() -> Case {
    let cfg = long_clip_l14();
    let (rec, phase) = run::train(&cfg, 128, DType::BF16, 248, false).unwrap();
    let report = Report::new(gpu("h100").unwrap(), &phase, &rec.log()).unwrap();
    Case { name: "Long-CLIP L/14 train step (248 tokens, batch 128)", report, kernels: kernels(&phase.ops), goal: 600.0 }
}

fn cases() -> &'static [Case] {
    static C: OnceLock<Vec<Case>> = OnceLock::new();
    C.get_or_init(|| vec![infer("ViT-B/16 inference (batch 256)", "b16", 12_000.0), infer("ViT-L/14 inference (batch 256)", "l14", 2_500.0), train()])
}

#[test]
fn every_launched_kernel_has_a_cost_row() {
    // (launching one without a row already fails the dry run; this names them all at once)
    let missing: Vec<String> = cases().iter().flat_map(|c| c.kernels.iter()).filter(|k| row_of(k).is_none()).cloned().collect();
    assert!(missing.is_empty(), "kernels without a row in src/perf/cost.rs: {missing:?}");
    let all: Vec<&str> = clipforge::cuda::kernels::MODULES.iter().flat_map(|m| m.entry_points.iter().copied()).filter(|k| row_of(k).is_none()).collect();
    assert!(all.is_empty(), "entry points of kernels/*.cu without a cost row: {all:?}");
}

#[test]
fn no_launch_below_a_full_wave_when_the_work_could_fill_the_gpu() {
    let mut msg = String::new();
    for c in cases() {
        let low = c.report.below_wave();
        if !low.is_empty() {
            msg += &format!("\n{}:\n{}", c.name, offenders("below one full wave on 132 SMs although the work could fill it", &low));
        }
    }
    assert!(msg.is_empty(), "{msg}");
}

#[test]
fn bf16_gemms_and_attention_run_on_tensor_cores() {
    let mut msg = String::new();
    for c in cases() {
        let off = c.report.off_tensor_cores();
        if !off.is_empty() {
            msg += &format!("\n{}:\n{}", c.name, offenders("GEMMs / attention not on bf16 tensor cores under --dtype bf16", &off));
        }
    }
    assert!(msg.is_empty(), "{msg}");
}

#[test]
fn predicted_h100_throughput_meets_the_goals() {
    let mut msg = String::new();
    for c in cases() {
        let got = c.report.throughput();
        println!("{}: predicted {got:.0} {}, goal {:.0} ({:.1} % of it)", c.name, c.report.per, c.goal, 100.0 * got / c.goal);
        if got < c.goal {
            msg += &format!("\n{}: predicted {got:.0} {} < goal {:.0}\n{}", c.name, c.report.per, c.goal, c.report.table());
        }
    }
    assert!(msg.is_empty(), "{msg}");
}

#[test]
fn the_model_sees_what_the_issue_describes() {
    // sanity of the recording itself: the towers' structure is all there
    let b16 = &cases()[0];
    let gemms = b16.report.preds.iter().filter(|p| p.name.starts_with("cuBLASLt")).count();
    assert!(gemms >= 12 * 4, "B/16: {gemms} GEMMs recorded, expected at least 4 per block");
    assert!(b16.kernels.iter().any(|k| k.starts_with("flash_fwd64_bf16")), "{:?}", b16.kernels);
    let tr = &cases()[2];
    assert!(
        tr.kernels.iter().any(|k| k.starts_with("flash_bwd_bf16") || k.starts_with("flash_varlen_bwd_bf16"))
            && tr.kernels.iter().any(|k| k.starts_with("adamw")),
        "{:?}",
        tr.kernels
    );
    for c in cases() {
        let t = c.report.throughput();
        assert!(t.is_finite() && t > 0.0, "{}: {t}", c.name);
    }
}

#[test]
fn the_cli_predicts_with_no_device() {
    let exe = env!("CARGO_BIN_EXE_clipforge");
    let out = std::process::Command::new(exe)
        .args(["bench", "--device", "cuda", "--dry-run", "--gpu", "a100", "--preset", "b32", "--batch", "8", "--dtype", "bf16", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["gpu"], "A100 SXM 80GB");
    let phases = v["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 2, "image and text towers");
    for p in phases {
        assert!(p["predicted_per_s"].as_f64().unwrap() > 0.0);
        let share: f64 = p["kernels"].as_array().unwrap().iter().map(|k| k["share"].as_f64().unwrap()).sum();
        assert!((share - 1.0).abs() < 1e-9, "shares sum to {share}");
    }
    let bad = std::process::Command::new(exe).args(["bench", "--device", "cuda", "--dry-run", "--gpu", "v100"]).output().unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("--gpu v100") && err.trim().lines().count() == 1, "{err}");
}

/// The rows of a scaling prediction, for failure messages.
fn rows(s: &Scaling) -> String {
    s.rows
        .iter()
        .map(|r| {
            format!("{} × {}: {:.2} ms, {:.2} %, exposed {:.3} ms\n", r.layout.nodes, r.layout.per_node, r.step * 1e3, 100.0 * r.efficiency, r.exposed * 1e3)
        })
        .collect()
}

/// The train step (batch 128 per rank) on `per_node` H100s per node, `nodes` nodes.
fn scaling(per_node: usize, nodes: usize) -> Scaling {
    Scaling::new(gpu("h100").unwrap(), &cases()[2].report, &long_clip_l14(), per_node, nodes).unwrap()
}

#[test]
fn eight_h100s_scale_at_90_percent_or_better() {
    let s = scaling(8, 1);
    println!("{}", rows(&s));
    let r = s.row(8).unwrap();
    assert!(r.efficiency >= 0.90, "8 × H100: {:.1} % < 90 %\n{}", 100.0 * r.efficiency, rows(&s));
    assert_eq!(r.bound, Bound::Intra);
    // global samples/s = 8 × 128 / step
    assert!((r.per_s - 1024.0 / r.step).abs() < 1e-9 * r.per_s);
}

#[test]
fn one_rank_is_the_one_gpu_step() {
    let s = scaling(8, 1);
    let (r, one) = (s.row(1).unwrap(), &cases()[2].report);
    assert_eq!((r.efficiency, r.exposed, r.all_reduce, r.all_gather, r.step), (1.0, 0.0, 0.0, 0.0, one.step));
    assert_eq!(r.per_s, one.throughput());
    // the split covers the step, and the backward is measured, not assumed
    let sp = &s.split;
    assert!((sp.forward + sp.backward_total() + sp.optimizer - one.step).abs() < 1e-9 * one.step);
    let ratio = sp.backward_total() / sp.forward;
    assert!((1.5..3.5).contains(&ratio), "backward / forward = {ratio:.2}: {sp:?}");
}

#[test]
fn efficiency_falls_with_ranks_and_across_nodes() {
    let s = scaling(8, 2);
    let ranks: Vec<usize> = s.rows.iter().map(|r| r.layout.ranks()).collect();
    assert_eq!(ranks, vec![1, 2, 4, 8, 16]);
    let node: Vec<f64> = s.rows.iter().filter(|r| r.layout.nodes == 1).map(|r| r.efficiency).collect();
    assert!(node.windows(2).all(|w| w[1] <= w[0]), "within a node: {node:?}\n{}", rows(&s));
    let (one, two) = (s.row(8).unwrap(), s.row(16).unwrap());
    assert!(two.efficiency < one.efficiency && two.exposed > one.exposed, "2 × 8 vs 1 × 8\n{}", rows(&s));
    assert_eq!(two.bound, Bound::Network);
    // 4 ranks per node use 4 of the 8 NICs: slower than 8 per node on the same 2 nodes
    let half = Scaling::new(gpu("h100").unwrap(), &cases()[2].report, &long_clip_l14(), 4, 2).unwrap();
    assert!(half.row(8).unwrap().all_reduce > one.all_reduce);
}

#[test]
fn all_reduce_cost_by_hand() {
    let link = &gpu("h100").unwrap().link;
    // one full 25 MiB bucket on 8 H100s: 2·7/8 × 26 214 400 B ÷ 330 GB/s = 139.016 µs, plus
    // NCCL's 8.4 µs + 14 ring steps × 3.4 µs = 56.0 µs
    let t = all_reduce(link, 26_214_400.0, Layout { nodes: 1, per_node: 8 });
    assert!((t - 195.016e-6).abs() < 0.001e-6, "{t}");
    // the step's gradients: every tower parameter of Long-CLIP L/14 in f32, once
    let s = scaling(8, 1);
    let schema = clipforge::model::schema::Schema::clip(&long_clip_l14());
    let elems: usize = schema.params().iter().filter(|p| p.tower != clipforge::model::schema::Tower::Head).map(|p| p.numel()).sum();
    let bytes: f64 = s.buckets.iter().map(|b| b.bytes).sum();
    assert_eq!(bytes, 4.0 * elems as f64);
    assert!((427_000_000..429_000_000).contains(&elems), "{elems} parameters");
    let sum: f64 = s.buckets.iter().map(|b| all_reduce(link, b.bytes, Layout { nodes: 1, per_node: 8 })).sum();
    assert!((s.row(8).unwrap().all_reduce - sum).abs() < 1e-12);
}

#[test]
fn the_cli_predicts_many_gpus() {
    let exe = env!("CARGO_BIN_EXE_clipforge");
    let args = ["bench", "--device", "cuda", "--dry-run", "--task", "train", "--preset", "b32", "--batch", "8", "--dtype", "bf16"];
    let out = std::process::Command::new(exe).args(args).args(["--nproc-per-node", "8", "--nodes", "2", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v["scaling"]["rows"].as_array().unwrap();
    let ranks: Vec<u64> = rows.iter().map(|r| r["ranks"].as_u64().unwrap()).collect();
    assert_eq!(ranks, vec![1, 2, 4, 8, 16]);
    assert_eq!(rows[0]["efficiency"], 1.0);
    assert_eq!(rows[4]["bound"], "network");
    let base = v["phases"][0]["predicted_per_s"].as_f64().unwrap();
    assert_eq!(rows[0]["samples_per_s"].as_f64().unwrap(), base);
    for bad in [vec!["--nproc-per-node", "9"], vec!["--nodes", "0"]] {
        let o = std::process::Command::new(exe).args(args).args(&bad).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(bad[0]) && err.trim().lines().count() == 1, "{err}");
    }
    let o = std::process::Command::new(exe).args(["bench", "--device", "cuda", "--dry-run", "--preset", "b32", "--nproc-per-node", "2"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--task train") && err.trim().lines().count() == 1, "{err}");
}

/// On a GPU (scripts/gpu_check.sh runs the `gpu` tests): which image every kernel module loaded
/// from (cubin of which SM, embedded PTX, or NVRTC) and the GEMM path, as one `gpu-info:` JSON
/// line; skipped without a driver.
#[test]
fn gpu_module_image_and_gemm_path() {
    use clipforge::cuda::{driver_available, DeviceOps, GpuOps};
    if driver_available().is_err() {
        eprintln!("skipped: no CUDA driver");
        return;
    }
    let ops = match GpuOps::open() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            return;
        }
    };
    let cache = ops.gpu().launcher.modules();
    let mut modules = serde_json::Map::new();
    for m in clipforge::cuda::kernels::MODULES {
        let origin = match cache.module(m.name) {
            Ok(_) => format!("{:?}", cache.origin(m.name)),
            Err(e) => format!("failed: {e}"),
        };
        modules.insert(m.name.to_string(), origin.into());
    }
    let v = serde_json::json!({
        "device": ops.describe(), "sm": ops.gpu().device.sm(), "nvcc_at_build": clipforge::cuda::kernels::NVCC_VERSION, "modules": modules,
    });
    println!("gpu-info: {v}");
    assert!(modules.values().all(|o| !o.as_str().unwrap_or("").starts_with("failed")), "{v}");
}
