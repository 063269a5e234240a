//! The fine-tuning loop, the same for every backend ([`StepEngine`]: the CPU tape, or the towers
//! on a CUDA device): micro-batches with gradient accumulation,
//! warm-up + cosine learning rate, AdamW (frozen position rows untouched), one JSON log line per
//! optimizer step, atomic checkpoints with optimizer state and data position, exact resume,
//! Ctrl-C → checkpoint then exit, a non-finite loss → stop with the last good state saved, and a
//! loss-curve SVG next to the log at the end.
//!
//! Many ranks ([`run_dist`], src/dist/): `batch` is each rank's micro-batch; the loader walks the
//! global micro-batches (`batch` × ranks, the same seed-driven order as one rank) and each rank
//! loads its consecutive shard; the loss is the global batch's, the gradients are summed over
//! ranks; rank 0 writes the log, the checkpoints and the model while the others wait at a barrier;
//! Ctrl-C on any rank stops every rank after the same step; an error on one rank stops them all.
use super::checkpoint::{self, TrainerState};
use super::data::{read_data, Loader};
use super::device_step::DeviceStep;
use super::model::TrainClip;
use super::optim::Optimizer;
use super::schedule::CosineSchedule;
use super::smartclip::{init_mask_params, load_mask_params, MASK_FILE};
use super::step::{CpuStep, Micro, StepEngine};
use crate::dist::{Collective, Single};
use crate::error::{Error, Result};
use crate::io::tokenizer::ClipTokenizer;
use crate::ops::adamw::AdamW;
use crate::tensor::{DType, Tensor};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Everything a run is configured by (the CLI fills it).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    pub model: PathBuf,
    pub data: PathBuf,
    pub image_root: Option<PathBuf>,
    pub out: PathBuf,
    pub seed: u64,
    pub shuffle: bool,
    pub batch: usize,
    pub accum: usize,
    pub lr: f64,
    pub warmup: usize,
    pub epochs: usize,
    pub max_steps: Option<usize>,
    pub save_every: usize,
    pub weight_decay: f64,
    pub pca_dim: usize,
    pub recompute: bool,
    pub log: Option<PathBuf>,
    /// "longclip" or "smartclip".
    pub method: String,
    /// SmartCLIP: the mask network's peak learning rate (CLIP's is `lr`).
    pub mask_lr: f64,
    pub lambda_align: f64,
    pub lambda_sparsity: f64,
    /// SmartCLIP: start the mask network from this safetensors file instead of a seeded init.
    pub mask_init: Option<PathBuf>,
    /// "auto" (a CUDA device when one opens, Long-CLIP), "cpu" or "cuda".
    #[serde(default = "default_device")]
    pub device: String,
    /// F32; BF16 (CPU: forward and backward GEMMs on bf16 inputs; CUDA: the forward GEMMs read
    /// bf16 copies of the f32 master weights); F16 on a CUDA device. Masters and AdamW stay f32.
    #[serde(default = "default_dtype")]
    pub dtype: DType,
    /// Long-CLIP: rows per PCA group of the short-caption target in the global micro-batch
    /// (None: each rank's micro-batch, as the official code; one rank: the whole micro-batch).
    #[serde(default)]
    pub pca_group: Option<usize>,
}

fn default_device() -> String {
    "auto".into()
}
fn default_dtype() -> DType {
    DType::F32
}

/// Builds the step backend once the model and the optimizer exist (tests pass an emulated one).
pub type EngineFactory<'a> = dyn Fn(&TrainClip, &Optimizer) -> Result<Box<dyn StepEngine>> + 'a;

/// What picks and builds a step backend: the run's device, dtype and loss settings.
pub struct EngineSpec<'a> {
    /// "auto" (a CUDA device when one opens and the method runs there), "cpu" or "cuda".
    pub device: &'a str,
    /// F32, BF16 (CPU or CUDA) or F16 (CUDA only).
    pub dtype: DType,
    pub smart: bool,
    pub pca_dim: usize,
    pub recompute: bool,
    pub lambda_align: f32,
    pub lambda_sparsity: f32,
}

impl EngineSpec<'_> {
    pub fn from_config(cfg: &TrainConfig) -> EngineSpec<'_> {
        EngineSpec {
            device: &cfg.device,
            dtype: cfg.dtype,
            smart: cfg.method == "smartclip",
            pca_dim: cfg.pca_dim,
            recompute: cfg.recompute,
            lambda_align: cfg.lambda_align as f32,
            lambda_sparsity: cfg.lambda_sparsity as f32,
        }
    }

    /// The device backend on a GPU already open (a rank's GPU LOCAL_RANK).
    pub fn build_on(&self, model: &TrainClip, opt: &Optimizer, gpu: crate::cuda::GpuOps) -> Result<Box<dyn StepEngine>> {
        if self.smart {
            return Err(Error::msg("--device cuda: SmartCLIP fine-tuning runs on the CPU backend; use --device cpu"));
        }
        let low = (self.dtype != DType::F32).then_some(self.dtype);
        Ok(Box::new(DeviceStep::new(Box::new(gpu), model, opt, self.pca_dim, self.recompute, low)?))
    }

    /// The backend asked for (SmartCLIP always on the CPU tape; no GPU is opened for it).
    pub fn build(&self, model: &TrainClip, opt: &Optimizer) -> Result<Box<dyn StepEngine>> {
        let low = (self.dtype != DType::F32).then_some(self.dtype);
        let cpu = || -> Result<Box<dyn StepEngine>> {
            match low {
                // bf16: the towers' GEMMs in bf16 (`TrainClip::compute`), masters and AdamW in f32
                None | Some(DType::BF16) => Ok(Box::new(CpuStep::new(self.smart, self.pca_dim, self.lambda_align, self.lambda_sparsity))),
                Some(_) => {
                    Err(Error::msg(format!("--dtype {} needs a CUDA device (--device cuda): the CPU trainer computes in f32 or bf16", self.dtype.name())))
                }
            }
        };
        let device = |ops: crate::cuda::GpuOps| self.build_on(model, opt, ops);
        match self.device {
            "cpu" => cpu(),
            "cuda" if self.smart => Err(Error::msg("--device cuda: SmartCLIP fine-tuning runs on the CPU backend; use --device cpu")),
            "cuda" => device(crate::cuda::GpuOps::open().map_err(|why| Error::Device(format!("--device cuda: {}; use --device cpu or auto", why.message())))?),
            "auto" if self.smart => cpu(),
            "auto" => crate::cuda::GpuOps::open().map_or_else(|_| cpu(), device),
            d => Err(Error::msg(format!("--device {d}: expected auto, cpu or cuda"))),
        }
    }
}

/// An AdamW state for every trainable parameter of `model`: Long-CLIP's frozen position rows
/// excluded, SmartCLIP's mask network in group 1 (its own learning rate).
pub fn new_optimizer(model: &TrainClip, hp: AdamW) -> Optimizer {
    let mut opt = Optimizer::new(hp);
    for (i, (name, t)) in model.params.iter().enumerate() {
        if model.trainable[i] {
            opt.add(name, t.shape(), model.frozen_elems(i), name.starts_with("mask_net.") as usize);
        }
    }
    opt
}

/// One logged optimizer step.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct StepLog {
    pub step: usize,
    pub loss: f64,
    /// Long-CLIP's two terms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_long: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_short: Option<f64>,
    /// SmartCLIP: L_ctrI + L_ctrT and the mean mask L1 norm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_align: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_l1: Option<f64>,
    pub lr: f64,
    pub logit_scale: f64,
    pub samples_per_s: f64,
}

/// What a finished (or stopped) run reports.
pub struct RunResult {
    pub steps: Vec<StepLog>,
    pub last_checkpoint: Option<PathBuf>,
}

fn checkpoint_dir(out: &Path, step: usize) -> PathBuf {
    out.join("checkpoints").join(format!("step-{step:06}"))
}

/// Runs (or, with `resume`, continues) a fine-tune on the backend `cfg` asks for. `stop` is
/// polled after every step (Ctrl-C); `quiet` hides the progress bar.
pub fn run(cfg: &TrainConfig, resume: Option<&Path>, stop: Arc<AtomicBool>, quiet: bool) -> Result<RunResult> {
    run_with(cfg, resume, stop, quiet, &|model, opt| EngineSpec::from_config(cfg).build(model, opt))
}

/// [`run`] with the backend made by `engine`.
pub fn run_with(cfg: &TrainConfig, resume: Option<&Path>, stop: Arc<AtomicBool>, quiet: bool, engine: &EngineFactory) -> Result<RunResult> {
    run_dist(cfg, resume, stop, quiet, engine, Rc::new(Single))
}

/// [`run_with`] as one rank of `comm`'s ranks (every rank calls it with the same settings). An
/// error on this rank is passed to the others ([`Collective::abort`]) so that they stop too.
pub fn run_dist(
    cfg: &TrainConfig,
    resume: Option<&Path>,
    stop: Arc<AtomicBool>,
    quiet: bool,
    engine: &EngineFactory,
    comm: Rc<dyn Collective>,
) -> Result<RunResult> {
    let r = run_rank(cfg, resume, stop, quiet, engine, comm.clone());
    crate::dist::spread_failure(&*comm, &r);
    r
}

fn run_rank(
    cfg: &TrainConfig,
    resume: Option<&Path>,
    stop: Arc<AtomicBool>,
    quiet: bool,
    engine: &EngineFactory,
    comm: Rc<dyn Collective>,
) -> Result<RunResult> {
    if cfg.accum == 0 {
        return Err(Error::msg("--accum must be at least 1"));
    }
    let (rank, world) = (comm.rank(), comm.world());
    if rank == 0 {
        checkpoint::recover(&cfg.out.join("checkpoints")); // what a crash left
        if let Some(parent) = resume.and_then(|dir| dir.parent()) {
            checkpoint::recover(parent);
        }
    }
    comm.barrier()?;
    if let Some(dir) = resume {
        checkpoint::check_model(dir, &cfg.model)?;
    }
    let source = resume.unwrap_or(&cfg.model);
    let mut model = TrainClip::load_dir(source)?;
    model.recompute = cfg.recompute;
    model.compute = cfg.dtype; // read by the CPU step only (the device step makes its own copies)
    let tc = model.config.text.clone();
    let pre = crate::io::image_prep::PreprocessConfig::for_model_dir(&cfg.model, model.config.vision.image_size)?;
    let tok = ClipTokenizer::from_file(&cfg.model, tc.max_positions)?;
    let samples = read_data(&cfg.data, cfg.image_root.as_deref())?;
    let notes = super::data::check(&samples, &tok, tc.max_positions)?;
    let global = cfg.batch * world; // the global micro-batch
    if let Some(g) = cfg.pca_group.filter(|&g| g == 0 || !global.is_multiple_of(g)) {
        return Err(Error::msg(format!("--pca-group {g} must divide the global micro-batch {global} (--batch {} × {world} ranks)", cfg.batch)));
    }
    let mut loader = Loader::new(samples, global, cfg.seed, cfg.shuffle, pre, tok)?;
    let steps_per_epoch = loader.batches_per_epoch() / cfg.accum;
    if steps_per_epoch == 0 {
        return Err(Error::msg(format!(
            "--batch {} × {world} ranks × --accum {} is more than one epoch of {} samples",
            cfg.batch,
            cfg.accum,
            loader.samples.len()
        )));
    }
    let total = cfg.max_steps.unwrap_or(cfg.epochs * steps_per_epoch);
    let sched = CosineSchedule { lr: cfg.lr, warmup: cfg.warmup, total };
    let smart = match cfg.method.as_str() {
        "longclip" => false,
        "smartclip" => true,
        m => return Err(Error::msg(format!("--method {m}: expected longclip or smartclip"))),
    };
    if smart {
        let mask = match (resume, &cfg.mask_init) {
            (Some(dir), _) => load_mask_params(&model, &dir.join(MASK_FILE))?,
            (None, Some(f)) => load_mask_params(&model, f)?,
            (None, None) => init_mask_params(&model, cfg.seed)?,
        };
        model.add_params(mask);
    }
    let mut opt = new_optimizer(&model, AdamW { lr: cfg.lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: cfg.weight_decay });
    let mut start = 0;
    if let Some(dir) = resume {
        let st = checkpoint::load_state(dir, &mut opt)?;
        let was = st.args.get("batch").and_then(|b| b.as_u64()).map(|b| b as usize * st.world);
        if was.is_some_and(|was| was != global) {
            return Err(Error::file(
                dir,
                format!("was trained with a global micro-batch of {} (--batch × ranks); this run's is {global}: resume with the same", was.unwrap_or(0)),
            ));
        }
        start = st.step;
        loader.position = st.position;
    } else if let (false, Some(i)) = (smart, model.index("logit_scale")) {
        model.params[i].1 = Tensor::from_vec(vec![100f32.ln()], model.params[i].1.shape())?;
        // reset to ln 100
    }
    let mut log = if rank == 0 { open_log(cfg.log.as_deref(), start)? } else { None };
    let mut eng = engine(&model, &opt)?;
    eng.set_dist(comm.clone(), cfg.pca_group);
    let quiet = quiet || rank > 0;
    if !quiet {
        notes.iter().for_each(|n| eprintln!("{n}"));
        match world {
            1 => eprintln!("fine-tuning on {}", eng.describe()),
            _ => eprintln!("fine-tuning on {world} ranks ({}; rank 0: {}), global micro-batch {global}", comm.describe(), eng.describe()),
        }
    }
    let bar = crate::progress::bar(total as u64, "finetune");
    if quiet {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_position(start as u64);
    let (mut steps, mut last_ckpt) = (vec![], resume.map(|p| p.to_path_buf()));
    let save = |eng: &mut Box<dyn StepEngine>, model: &mut TrainClip, opt: &mut Optimizer, step: usize, pos| -> Result<PathBuf> {
        eng.sync(model, opt)?;
        let dir = checkpoint_dir(&cfg.out, step);
        if rank == 0 {
            let args = serde_json::to_value(cfg).map_err(Error::msg)?;
            checkpoint::save(&dir, &cfg.model, &model.params, Some(opt), Some(&TrainerState { step, position: pos, args, world }))?;
        }
        comm.barrier()?; // every rank's copy is the same: rank 0 wrote it
        Ok(dir)
    };
    for step in start..total {
        let t0 = Instant::now();
        let lr = sched.lr(step);
        let (mut loss, mut l_long, mut l_short) = (0f64, 0f64, 0f64);
        let lrs = [lr, lr * cfg.mask_lr / cfg.lr];
        let pos_before = loader.position;
        for a in 0..cfg.accum {
            let batch = match loader.next_shard(rank, world) {
                Ok(b) => b,
                Err(e) if step > start && world == 1 => {
                    let dir = save(&mut eng, &mut model, &mut opt, step, pos_before)?;
                    bar.finish_and_clear();
                    return Err(Error::msg(format!("{e}; stopped, the last good state (step {step}) is saved in {}", dir.display())));
                }
                Err(e) => return Err(e),
            };
            let ids = if smart { Some(sampled_captions(&loader, &batch.samples, cfg.seed, loader.position.epoch)?) } else { None }; // the batch's epoch
            let l = eng.micro_batch(&model, &Micro { batch: &batch, smart_ids: ids.as_deref(), last: a + 1 == cfg.accum }, 1.0 / cfg.accum as f32)?;
            if !l.loss.is_finite() {
                let dir = save(&mut eng, &mut model, &mut opt, step, pos_before)?;
                bar.finish_and_clear();
                return Err(Error::msg(format!("loss is {} at step {}: stopped; the last good state is saved in {}", l.loss, step + 1, dir.display())));
            }
            loss += l.loss as f64 / cfg.accum as f64;
            l_long += l.a as f64 / cfg.accum as f64;
            l_short += l.b as f64 / cfg.accum as f64;
        }
        opt.begin_step();
        eng.apply(&mut model, &mut opt, &lrs)?;
        let logit_scale = model.index("logit_scale").map(|i| model.params[i].1.f32_data()[0] as f64).unwrap_or(f64::NAN);
        let (two, none) = (|a: f64| Some(a), None);
        let rec = StepLog {
            step: step + 1,
            loss,
            loss_long: if smart { none } else { two(l_long) },
            loss_short: if smart { none } else { two(l_short) },
            loss_align: if smart { two(l_long) } else { none },
            mask_l1: if smart { two(l_short) } else { none },
            lr,
            logit_scale,
            samples_per_s: (global * cfg.accum) as f64 / t0.elapsed().as_secs_f64(),
        };
        if let Some(f) = log.as_mut() {
            writeln!(f, "{}", serde_json::to_string(&rec).map_err(Error::msg)?)
                .and_then(|_| f.flush())
                .map_err(|e| Error::msg(format!("cannot write the log: {e}")))?;
        }
        bar.set_message(format!("loss {loss:.4}"));
        bar.inc(1);
        steps.push(rec);
        let done = step + 1;
        let mut flag = [stop.load(Ordering::SeqCst) as u8 as f32];
        if world > 1 {
            comm.all_reduce_sum(&mut flag)?; // a Ctrl-C on any rank stops every rank after this step
        }
        let interrupted = flag[0] > 0.0;
        if (cfg.save_every > 0 && done % cfg.save_every == 0) || done == total || interrupted {
            last_ckpt = Some(save(&mut eng, &mut model, &mut opt, done, loader.position)?);
        }
        if interrupted {
            bar.finish_and_clear();
            let at = last_ckpt.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
            return Err(Error::Interrupted(format!("interrupted after step {done}: checkpoint written to {at} (continue with --resume)")));
        }
    }
    bar.finish_and_clear();
    eng.sync(&mut model, &mut opt)?;
    if rank == 0 {
        // the fine-tuned model itself, loadable by every command
        checkpoint::save(&cfg.out.join("model"), &cfg.model, &model.params, None, None)?;
        if let Some(p) = &cfg.log {
            write_curve(p)?;
        }
    }
    comm.barrier()?;
    Ok(RunResult { steps, last_checkpoint: last_ckpt })
}

/// The log file: created, or on resume kept up to `start` steps and appended to.
fn open_log(path: Option<&Path>, start: usize) -> Result<Option<std::fs::File>> {
    let Some(p) = path else { return Ok(None) };
    if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, format!("cannot create: {e}")))?;
    }
    let keep: String = if start > 0 && p.is_file() {
        let text = std::fs::read_to_string(p).map_err(|e| Error::file(p, format!("cannot read: {e}")))?;
        text.lines().filter(|l| serde_json::from_str::<StepLog>(l).map(|r| r.step <= start).unwrap_or(false)).map(|l| format!("{l}\n")).collect()
    } else {
        String::new()
    };
    crate::io::output::write_file(p, keep.as_bytes())?;
    let f = std::fs::OpenOptions::new().append(true).open(p).map_err(|e| Error::file(p, format!("cannot open: {e}")))?;
    Ok(Some(f))
}

/// Reads a log and writes the loss curve next to it (`<log>.svg`).
pub fn write_curve(log: &Path) -> Result<PathBuf> {
    let text = std::fs::read_to_string(log).map_err(|e| Error::file(log, format!("cannot read: {e}")))?;
    let recs: Vec<StepLog> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let series =
        |name: &str, f: &dyn Fn(&StepLog) -> f64| crate::plot::Series { name: name.into(), points: recs.iter().map(|r| (r.step as f64, f(r))).collect() };
    let opt_series = |name: &str, f: &dyn Fn(&StepLog) -> Option<f64>| crate::plot::Series {
        name: name.into(),
        points: recs.iter().filter_map(|r| f(r).map(|v| (r.step as f64, v))).collect(),
    };
    let mut all = vec![series("loss", &|r| r.loss)];
    for (n, f) in [
        ("loss_long", &(|r: &StepLog| r.loss_long) as &dyn Fn(&StepLog) -> Option<f64>),
        ("loss_short", &|r: &StepLog| r.loss_short),
        ("loss_align", &|r: &StepLog| r.loss_align),
    ] {
        let s = opt_series(n, f);
        if !s.points.is_empty() {
            all.push(s);
        }
    }
    let svg = crate::plot::line_chart("fine-tune", "optimizer step", "loss", &all)?;
    let mut out = log.as_os_str().to_owned();
    out.push(".svg");
    let out = PathBuf::from(out);
    crate::io::output::write_file(&out, svg.as_bytes())?;
    Ok(out)
}

/// SmartCLIP samples one caption per image per step from its pool (the long caption, the short
/// one, and each sentence of the long one), seeded by (seed, epoch, sample) so a resumed run
/// draws the same captions.
fn sampled_captions(loader: &Loader, samples: &[usize], seed: u64, epoch: usize) -> Result<Vec<Vec<u32>>> {
    let texts: Vec<String> = samples
        .iter()
        .map(|&i| {
            let s = &loader.samples[i];
            let mut pool = vec![s.caption.clone(), s.short_caption.clone()];
            pool.extend(s.caption.split(". ").map(|x| x.trim().to_string()).filter(|x| !x.is_empty()));
            pool.dedup();
            let mut r =
                crate::model::synthetic::Rng::new(seed ^ (epoch as u64).wrapping_mul(0x2545_F491_4F6C_DD1D) ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            pool[(r.next_u64() % pool.len() as u64) as usize].clone()
        })
        .collect();
    loader.tok.encode_batch(&texts)
}
