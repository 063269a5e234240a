//! Data-parallel fine-tuning without GPUs: N ranks as threads of this process, each with its own
//! backend (the CPU tape, or an emulated CUDA device), meeting in the in-process test double of
//! the collective (tests/dist_common). An N-rank run at per-rank micro-batch B/N equals the
//! one-rank run at B, step by step:
//! - the logged loss and its two terms, and the logit scale, within 1e-5 relative;
//! - every parameter of the step's checkpoint within 1e-6 + 1e-5·|w| per element, except where
//!   the gradient is rounding noise (RMS < 1e-6 from the checkpoint's AdamW moments, e.g. the
//!   attention key biases, see tests/device_step.rs): AdamW's normalisation turns that noise into
//!   moves of up to ±lr, so there only that bound holds, and such elements must be under 0.1 %;
//!
//! for Long-CLIP on the CPU and on the emulated device (its gradients summed in buckets from the
//! towers' backward), with accumulation, and for SmartCLIP on the CPU (SmartCLIP has no device
//! backend). Long-CLIP's PCA target runs on each rank's rows, as the official code does: the
//! one-rank run matches with `pca_group` = B/N, and with `pca_group` = B the N-rank run matches
//! the plain one-rank run. Also: an error on one rank stops every rank with a message naming it,
//! rank 0 alone writes, a run resumes exactly on N ranks, and a resume with another global batch
//! is refused.
mod common;
mod dist_common;
mod finetune_common;
use clipforge::cuda::EmuOps;
use clipforge::dist::Collective;
use clipforge::error::{Error, Result};
use clipforge::model::Weights;
use clipforge::train::device_step::DeviceStep;
use clipforge::train::step::StepEngine;
use clipforge::train::trainer::{run_dist, EngineSpec, RunResult, StepLog, TrainConfig};
use common::{fixture, tmpdir};
use finetune_common::{config, read_log, stretched};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Cpu,
    Emulator,
}

/// Runs `cfg` on `n` ranks (threads); every rank's result, in rank order.
/// `stop`: stop (as on Ctrl-C) after the first step, with a checkpoint.
fn ranks(cfg: &TrainConfig, n: usize, backend: Backend, resume: Option<&Path>, fail_rank: Option<usize>, stop: bool) -> Vec<Result<RunResult>> {
    let comms = dist_common::group(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    let rank = c.rank();
                    let comm: Rc<dyn Collective> = Rc::new(c);
                    run_dist(
                        cfg,
                        resume,
                        Arc::new(AtomicBool::new(stop)),
                        true,
                        &|model, opt| {
                            if fail_rank == Some(rank) {
                                return Err(Error::msg("out of device memory (planted)"));
                            }
                            match backend {
                                Backend::Cpu => EngineSpec::from_config(cfg).build(model, opt),
                                Backend::Emulator => {
                                    let s: Box<dyn StepEngine> = Box::new(DeviceStep::new(Box::new(EmuOps), model, opt, cfg.pca_dim, cfg.recompute, None)?);
                                    Ok(s)
                                }
                            }
                        },
                        comm,
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(Error::msg("rank panicked")))).collect()
    })
}

fn run_ok(cfg: &TrainConfig, n: usize, backend: Backend) -> RunResult {
    let mut all = ranks(cfg, n, backend, None, None, false);
    for (r, res) in all.iter().enumerate() {
        assert!(res.is_ok(), "rank {r}: {}", res.as_ref().err().map(|e| e.to_string()).unwrap_or_default());
    }
    all.swap_remove(0).unwrap()
}

fn terms(s: &StepLog) -> Vec<(&'static str, f64)> {
    let mut v = vec![("loss", s.loss), ("logit_scale", s.logit_scale), ("lr", s.lr)];
    for (k, x) in [("loss_long", s.loss_long), ("loss_short", s.loss_short), ("loss_align", s.loss_align), ("mask_l1", s.mask_l1)] {
        if let Some(x) = x {
            v.push((k, x));
        }
    }
    v
}

/// `one` on one rank, then each of its steps again on `n` ranks (`n_cfg`) from the same state
/// (the one-rank checkpoint before it), stopped after that step: the step's log within 1e-5
/// relative and its checkpoint's weights per element. (Step by step, so that noise-level
/// gradients — AdamW turns them into ±lr moves — cannot carry a perturbation into later steps.)
fn assert_equal_per_step(what: &str, one: &TrainConfig, n: usize, n_cfg: &TrainConfig, backend: Backend) {
    let want = run_ok(one, 1, backend);
    assert_eq!(want.steps.len(), one.max_steps.unwrap_or(0), "{what}: one-rank steps");
    for s in 1..=want.steps.len() {
        let mut c = n_cfg.clone();
        c.out = n_cfg.out.join(format!("from-{s}"));
        c.log = Some(c.out.join("log.jsonl"));
        let before = (s > 1).then(|| ckpt(&one.out, s - 1));
        for (r, res) in ranks(&c, n, backend, before.as_deref(), None, true).into_iter().enumerate() {
            if let Err(e) = res {
                assert!(matches!(e, Error::Interrupted(_)), "{what}: rank {r} at step {s}: {e}");
            }
        }
        let log = read_log(c.log.as_ref().unwrap());
        let (g, w) = (log.last().expect("a logged step"), &want.steps[s - 1]);
        assert_eq!(g.step, s, "{what}: the step run");
        for ((k, x), (_, y)) in terms(g).into_iter().zip(terms(w)) {
            assert!(x.is_finite() && (x - y).abs() <= 1e-5 * y.abs(), "{what}: step {s} {k} = {x}, one rank {y}");
        }
        assert_same_weights(&format!("{what}: step {s}"), &ckpt(&c.out, s), &ckpt(&one.out, s), w.lr);
    }
}

/// Every parameter (model and mask network) per element within 1e-6 + 1e-5·|w|, except where
/// the one-rank gradient is rounding noise (RMS < 1e-6 from the checkpoint's AdamW moments, e.g.
/// the attention key biases, which softmax cannot see): AdamW's normalisation turns that noise
/// into moves of up to ±lr, so there only |Δ| ≤ 2·lr holds; such elements must be under 0.1 %.
fn assert_same_weights(what: &str, a: &Path, b: &Path, lr: f64) {
    let opt = Weights::open(&b.join("optimizer.safetensors")).unwrap();
    let step: i32 =
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(b.join("trainer_state.json")).unwrap()).unwrap()["step"].as_i64().unwrap() as i32;
    let bias2 = 1.0 - 0.999f64.powi(step); // AdamW's second-moment bias correction
    let (mut noise, mut total) = (0usize, 0usize);
    for file in ["model.safetensors", "mask_net.safetensors"].into_iter().filter(|f| b.join(f).is_file()) {
        let (wa, wb) = (Weights::open(&a.join(file)).unwrap(), Weights::open(&b.join(file)).unwrap());
        let mut names = wb.names();
        names.sort();
        assert_eq!(wa.names().len(), names.len(), "{what}: parameter count in {file}");
        for n in names {
            let (x, y) = (wa.get(n).unwrap().to_vec_f32(), wb.get(n).unwrap().to_vec_f32());
            let v = opt.get(&format!("exp_avg_sq.{n}")).map(|t| t.to_vec_f32()).unwrap_or_default();
            assert_eq!(x.len(), y.len(), "{what}: {n}");
            for (i, (p, q)) in x.iter().zip(&y).enumerate() {
                total += 1;
                if p.is_finite() && (p - q).abs() <= 1e-6 + 1e-5 * q.abs() {
                    continue;
                }
                let rms = v.get(i).map_or(f64::INFINITY, |&v| (v as f64 / bias2).sqrt());
                assert!(p.is_finite() && rms < 1e-6 && ((p - q).abs() as f64) <= 2.0 * lr, "{what}: {n}[{i}] = {p}, one rank {q} (gradient RMS {rms:.2e})");
                noise += 1;
            }
        }
    }
    assert!(noise * 1000 <= total, "{what}: {noise} of {total} weights differ beyond 1e-5 (noise-level gradients): too many");
}

fn ckpt(out: &Path, step: usize) -> PathBuf {
    out.join("checkpoints").join(format!("step-{step:06}"))
}

/// The Long-CLIP test configuration, `steps` steps, a checkpoint after each.
fn longclip(model: &Path, out: &Path, batch: usize, accum: usize, steps: usize) -> TrainConfig {
    let mut c = config(model, out, batch, accum);
    (c.max_steps, c.save_every, c.warmup) = (Some(steps), 1, 1);
    (c.shuffle, c.seed) = (true, 7); // the seeded sampler, split by rank
    c
}

#[test]
fn longclip_on_n_cpu_ranks_equals_one_rank() {
    let d = tmpdir("dp-longclip-cpu");
    let model = stretched(&d);
    // one rank, micro-batch 8, PCA per 4 rows = two ranks at 4 (PCA per rank, the default)
    let mut one = longclip(&model, &d.join("one"), 8, 1, 3);
    one.pca_group = Some(4);
    assert_equal_per_step("2 cpu ranks", &one, 2, &longclip(&model, &d.join("two"), 4, 1, 3), Backend::Cpu);
    // one PCA over the global batch on 2 ranks = the plain one-rank run
    let mut global = longclip(&model, &d.join("global"), 4, 1, 2);
    global.pca_group = Some(8);
    assert_equal_per_step("2 ranks, one PCA", &longclip(&model, &d.join("plain"), 8, 1, 2), 2, &global, Backend::Cpu);
    // odd: 3 ranks at 2 with accumulation 2 = one rank at 6 × 2, PCA per 2 rows
    let mut one = longclip(&model, &d.join("one6"), 6, 2, 1);
    one.pca_group = Some(2);
    assert_equal_per_step("3 cpu ranks, accumulation 2", &one, 3, &longclip(&model, &d.join("three"), 2, 2, 1), Backend::Cpu);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn longclip_on_n_emulated_devices_equals_one() {
    let d = tmpdir("dp-longclip-emu");
    let model = stretched(&d);
    // accumulation 2: the first micro-batch accumulates, the last one's backward launches the buckets
    let mut one = longclip(&model, &d.join("one"), 4, 2, 2);
    one.pca_group = Some(2);
    assert_equal_per_step("2 emulated devices", &one, 2, &longclip(&model, &d.join("two"), 2, 2, 2), Backend::Emulator);
    let _ = std::fs::remove_dir_all(&d);
}

fn smartclip(out: &Path, batch: usize, steps: usize) -> TrainConfig {
    let mut c = config(&fixture("tiny"), out, batch, 1);
    c.data = fixture("smartclip/train.jsonl");
    (c.pca_dim, c.method, c.mask_lr) = (32, "smartclip".into(), 1e-2);
    c.mask_init = Some(fixture("smartclip/mask_init.safetensors"));
    (c.max_steps, c.save_every, c.warmup) = (Some(steps), 1, 1);
    (c.shuffle, c.seed) = (true, 7);
    c
}

#[test]
fn smartclip_on_n_cpu_ranks_equals_one_rank() {
    let d = tmpdir("dp-smartclip");
    assert_equal_per_step("smartclip 2 ranks", &smartclip(&d.join("one"), 8, 3), 2, &smartclip(&d.join("two"), 4, 3), Backend::Cpu);
    let full = run_ok(&smartclip(&d.join("full"), 4, 2), 2, Backend::Cpu);
    assert_eq!(full.steps.len(), 2);
    assert!(d.join("full/model/mask_net.safetensors").is_file(), "rank 0 writes the mask network");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn one_failing_rank_stops_all_and_resume_is_exact_on_n_ranks() {
    let d = tmpdir("dp-fail");
    let model = stretched(&d);
    // rank 1 fails building its backend: every rank returns an error naming it, none hangs
    let cfg = longclip(&model, &d.join("fail"), 4, 1, 2);
    let all = ranks(&cfg, 3, Backend::Cpu, None, Some(1), false);
    for (r, res) in all.iter().enumerate() {
        let e = res.as_ref().err().map(|e| e.to_string()).unwrap_or_else(|| panic!("rank {r} finished while rank 1 failed"));
        assert!(e.contains("out of device memory") && (r == 1 || e.contains("rank 1 failed")), "rank {r}: {e}");
    }
    // 4 steps on 2 ranks, and 2 + 2 resumed from the step-2 checkpoint: the same curve
    run_ok(&longclip(&model, &d.join("full"), 4, 1, 4), 2, Backend::Cpu);
    assert!(!d.join("full/checkpoints").read_dir().unwrap().any(|e| e.unwrap().file_name().to_string_lossy().contains("tmp")));
    let part = d.join("part");
    std::fs::create_dir_all(&part).unwrap();
    std::fs::copy(d.join("full/log.jsonl"), part.join("log.jsonl")).unwrap();
    let at = ckpt(&d.join("full"), 2);
    let res = ranks(&longclip(&model, &part, 4, 1, 4), 2, Backend::Cpu, Some(&at), None, false);
    assert!(res.iter().all(|r| r.is_ok()), "resume failed");
    let (log, full) = (read_log(&part.join("log.jsonl")), read_log(&d.join("full/log.jsonl")));
    assert_eq!(log.len(), 4);
    for (a, b) in log.iter().zip(&full) {
        assert_eq!((a.step, a.loss, a.logit_scale), (b.step, b.loss, b.logit_scale), "resumed step {}", a.step);
    }
    // the same checkpoint on 1 rank at --batch 4 is another global batch (4, not 8): refused
    let e = ranks(&longclip(&model, &d.join("other"), 4, 1, 4), 1, Backend::Cpu, Some(&at), None, false).remove(0).err().expect("refused");
    assert!(e.to_string().contains("global micro-batch of 8"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}

/// `finetune --nproc-per-node 2 --device cpu`: two processes meeting over TCP (the product path
/// without GPUs) give the one-process run's curve; a failure in the ranks is a non-zero exit with
/// one line naming the rank.
#[test]
fn nproc_per_node_starts_ranks_as_processes() {
    let d = tmpdir("dp-cli");
    let model = stretched(&d);
    let data = fixture("longclip/train.jsonl");
    let run = |out: &str, extra: &[&str]| {
        let out = d.join(out);
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_clipforge"))
            .args(["finetune", "--device", "cpu", "--no-shuffle", "--lr", "1e-3", "--warmup", "1", "--max-steps", "2", "--pca-dim", "4", "--json"])
            .args(["--model".as_ref(), model.as_os_str(), "--data".as_ref(), data.as_os_str(), "--out".as_ref(), out.as_os_str()])
            .args(["--log".as_ref(), out.join("log.jsonl").as_os_str()])
            .args(extra)
            .output()
            .unwrap();
        (o.status.code(), String::from_utf8_lossy(&o.stdout).to_string(), String::from_utf8_lossy(&o.stderr).to_string(), out)
    };
    let (c1, _, e1, one) = run("one", &["--batch", "8", "--pca-group", "4"]);
    assert_eq!(c1, Some(0), "{e1}");
    let (c2, o2, e2, two) = run("two", &["--batch", "4", "--nproc-per-node", "2"]);
    assert_eq!(c2, Some(0), "{e2}");
    assert!(o2.contains("\"steps\":2"), "rank 0's summary: {o2}");
    assert!(e2.contains("2 ranks (tcp"), "{e2}");
    let (a, b) = (read_log(&two.join("log.jsonl")), read_log(&one.join("log.jsonl")));
    assert_eq!(a.len(), 2);
    for (x, y) in a.iter().zip(&b) {
        for ((k, p), (_, q)) in terms(x).into_iter().zip(terms(y)) {
            assert!((p - q).abs() <= 1e-5 * q.abs(), "step {} {k}: 2 processes {p}, one {q}", x.step);
        }
    }
    assert!(two.join("model/model.safetensors").is_file());
    // every rank refuses the setting: non-zero, and the error names the rank
    let (c3, _, e3, _) = run("bad", &["--batch", "4", "--nproc-per-node", "2", "--pca-group", "3"]);
    assert!(c3.is_some_and(|c| c != 0), "{e3}");
    assert!(e3.contains("rank") && e3.contains("--pca-group 3"), "{e3}");
    let _ = std::fs::remove_dir_all(&d);
}
