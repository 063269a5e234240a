//! `clipforge finetune`: Long-CLIP or SmartCLIP fine-tuning (src/train/). Stretch the model first
//! (`clipforge stretch`) for 248-token captions; the frozen position rows it records stay fixed.
use clap::{Args, ValueEnum};
use clipforge::cuda::GpuOps;
use clipforge::dist::launch::RankEnv;
use clipforge::dist::{Collective, Single};
use clipforge::error::{Error, Result};
use clipforge::train::model::TrainClip;
use clipforge::train::optim::Optimizer;
use clipforge::train::trainer::{run_dist, EngineSpec, TrainConfig};
use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Method {
    /// Long-CLIP: long captions vs images + short captions vs the PCA reconstruction of the images
    Longclip,
    /// SmartCLIP: a mask network selects embedding dimensions per caption; modular alignment + sparsity
    Smartclip,
}

#[derive(Args, Debug)]
pub struct FinetuneArgs {
    /// Fine-tuning method
    #[arg(long, value_enum, default_value_t = Method::Longclip)]
    pub method: Method,
    /// HF CLIP model directory to start from (run `clipforge stretch` on it for 248 tokens), or a released .pt checkpoint (converted into OUT/source-model first)
    #[arg(long)]
    pub model: PathBuf,
    /// Training data: JSONL {"image", "caption", "short_caption"?}, ShareGPT4V JSON, or WebDataset
    /// tar shards ('data/{00000..00099}.tar'; KEY.jpg/png/webp with KEY.txt and/or KEY.json)
    #[arg(long)]
    pub data: PathBuf,
    /// Images are relative to this directory (default: the data file's directory)
    #[arg(long)]
    pub image_root: Option<PathBuf>,
    /// Output directory: checkpoints/step-N/ and the final model/
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Visit the data in file order every epoch
    #[arg(long)]
    pub no_shuffle: bool,
    /// Micro-batch size per rank (InfoNCE runs over the global micro-batch of --batch × ranks, the
    /// PCA over each rank's; see --pca-group)
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Micro-batches per optimizer step (gradient accumulation)
    #[arg(long, default_value_t = 1)]
    pub accum: usize,
    /// Peak learning rate (Long-CLIP: 1e-6)
    #[arg(long, default_value_t = 1e-6)]
    pub lr: f64,
    /// Linear warm-up steps, then cosine decay
    #[arg(long, default_value_t = 200)]
    pub warmup: usize,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Stop after this many optimizer steps (the schedule spans them)
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Write a checkpoint every N steps (0: only at the end)
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    /// AdamW weight decay
    #[arg(long, default_value_t = 1e-2)]
    pub weight_decay: f64,
    /// Principal components kept by the short-caption branch (Long-CLIP: 32)
    #[arg(long, default_value_t = 32)]
    pub pca_dim: usize,
    /// Long-CLIP: rows of the global micro-batch per PCA of the short-caption target (default: each
    /// rank's --batch, as the official code does it on every GPU; --batch × ranks: one PCA over all)
    #[arg(long)]
    pub pca_group: Option<usize>,
    /// Recompute each block's activations in the backward pass (less memory, ~1.3× compute)
    #[arg(long)]
    pub recompute: bool,
    /// One JSON line per optimizer step; a loss-curve SVG is written next to it at the end
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Continue from a checkpoint: a directory, or a name under OUT/checkpoints (step-000100, or
    /// 100); alone, the latest under OUT/checkpoints
    #[arg(long, num_args = 0..=1)]
    pub resume: Option<Option<PathBuf>>,
    /// Start over in an OUT that holds checkpoints of an earlier run (they are removed); without
    /// it (or --resume) such an OUT is an error
    #[arg(long, conflicts_with = "resume")]
    pub force: bool,
    /// SmartCLIP: the mask network's peak learning rate (CLIP uses --lr)
    #[arg(long, default_value_t = 1e-3)]
    pub mask_lr: f64,
    /// SmartCLIP: weight of L_ctrI + L_ctrT
    #[arg(long, default_value_t = 1.0)]
    pub lambda_align: f64,
    /// SmartCLIP: weight of the mean L1 norm of the masks
    #[arg(long, default_value_t = 1e-3)]
    pub lambda_sparsity: f64,
    /// SmartCLIP: initial mask-network weights (safetensors; default: a seeded random init)
    #[arg(long)]
    pub mask_init: Option<PathBuf>,
    /// Where the towers run: auto (a CUDA GPU when a driver opens, Long-CLIP), cpu or cuda
    #[arg(long, value_enum, default_value_t = super::DeviceArg::Auto)]
    pub device: super::DeviceArg,
    /// Compute type: f32, or bf16 / f16 on a CUDA device (half-precision forward GEMMs, f32 master
    /// weights, gradients and optimizer)
    #[arg(long, value_enum, default_value_t = super::DtypeArg::F32)]
    pub dtype: super::DtypeArg,
    /// Print a JSON summary at the end
    #[arg(long)]
    pub json: bool,
    /// Data parallel on this machine: start one rank per GPU (NCCL; with --device cpu, ranks over
    /// TCP). Each rank takes --batch samples of every global micro-batch. Under torchrun
    /// (--no-python), srun or mpirun leave it out: their variables (RANK, WORLD_SIZE, LOCAL_RANK,
    /// MASTER_ADDR, MASTER_PORT, or SLURM_* / OMPI_*) place each process
    #[arg(long, default_value_t = 1)]
    pub nproc_per_node: usize,
}

pub fn finetune(a: &FinetuneArgs) -> Result<()> {
    if a.nproc_per_node == 0 {
        return Err(Error::msg("--nproc-per-node must be at least 1"));
    }
    if a.nproc_per_node > 1 && !RankEnv::launched_here() {
        return super::finetune_dist::spawn(a.nproc_per_node); // the ranks run this command
    }
    let device = format!("{:?}", a.device).to_lowercase();
    let job = super::finetune_dist::join(&device, matches!(a.method, Method::Smartclip))?;
    let rank = job.as_ref().map_or(0, |j| j.env.rank);
    let comm: Rc<dyn Collective> = job.as_ref().map_or_else(|| Rc::new(Single) as Rc<dyn Collective>, |j| j.comm.clone());
    let r = prepare_and_run(a, &device, rank, &comm, job.and_then(|j| j.gpu));
    clipforge::dist::spread_failure(&*comm, &r); // (also a failure before the trainer's loop)
    r
}

/// Rank 0 converts a `.pt` and clears an earlier run's checkpoints while the others wait; then
/// every rank trains.
fn prepare_and_run(a: &FinetuneArgs, device: &str, rank: usize, comm: &Rc<dyn Collective>, gpu: Option<GpuOps>) -> Result<()> {
    let source = a.out.join("source-model");
    let model = if rank == 0 {
        super::common::model_dir(&a.model, &source)?
    } else if clipforge::io::pt::is_pt_file(&a.model) {
        source // rank 0 converted it
    } else {
        a.model.clone()
    };
    // a SmartCLIP checkpoint's mask network is the one its fine-tune starts from
    let mask_file = model.join(clipforge::train::smartclip::MASK_FILE);
    let mask_init = a.mask_init.clone().or_else(|| (model != a.model && matches!(a.method, Method::Smartclip) && mask_file.is_file()).then_some(mask_file));
    let cfg = TrainConfig {
        model,
        data: a.data.clone(),
        image_root: a.image_root.clone(),
        out: a.out.clone(),
        seed: a.seed,
        shuffle: !a.no_shuffle,
        batch: a.batch,
        accum: a.accum,
        lr: a.lr,
        warmup: a.warmup,
        epochs: a.epochs,
        max_steps: a.max_steps,
        save_every: a.save_every,
        weight_decay: a.weight_decay,
        pca_dim: a.pca_dim,
        recompute: a.recompute,
        log: a.log.clone(),
        method: match a.method {
            Method::Longclip => "longclip".into(),
            Method::Smartclip => "smartclip".into(),
        },
        mask_lr: a.mask_lr,
        lambda_align: a.lambda_align,
        lambda_sparsity: a.lambda_sparsity,
        mask_init,
        device: device.to_string(),
        dtype: a.dtype.precision(),
        pca_group: a.pca_group,
    };
    let resume = match &a.resume {
        None if rank > 0 => None,
        None => {
            let removed = clipforge::train::checkpoint::start_over(&a.out, a.force)?;
            if removed > 0 {
                eprintln!("--force: removed {removed} checkpoint(s) of the earlier run in {}", a.out.join("checkpoints").display());
            }
            None
        }
        Some(Some(p)) => Some(clipforge::train::checkpoint::find(&a.out, p)?),
        Some(None) => {
            Some(clipforge::train::checkpoint::latest(&a.out).ok_or_else(|| Error::file(a.out.join("checkpoints"), "--resume: no checkpoint found"))?)
        }
    };
    comm.barrier()?; // rank 0's conversion and clean-up are done
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130); // second Ctrl-C: leave now
        }
        eprintln!("\ninterrupt: finishing this step and writing a checkpoint (Ctrl-C again to quit at once)");
    });
    let spec = EngineSpec::from_config(&cfg);
    let gpu = RefCell::new(gpu);
    let engine = |model: &TrainClip, opt: &Optimizer| match gpu.borrow_mut().take() {
        Some(g) => spec.build_on(model, opt, g),
        None => spec.build(model, opt),
    };
    let r = run_dist(&cfg, resume.as_deref(), stop, false, &engine, comm.clone())?;
    if rank > 0 {
        return Ok(()); // rank 0 reports
    }
    let last = r.steps.last();
    if a.json {
        let v = serde_json::json!({"steps": r.steps.len(), "last": last, "model": a.out.join("model"), "checkpoint": r.last_checkpoint});
        println!("{v}");
    } else if let Some(l) = last {
        println!("{} steps; final loss {:.4}; model in {}", l.step, l.loss, a.out.join("model").display());
    }
    Ok(())
}
