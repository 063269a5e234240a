//! The command line: one subcommand per job, `--help` on each. Data goes to stdout (or the
//! --out file), progress and messages to stderr.
pub mod bench;
pub mod bench_dry;
pub mod bench_loader;
pub mod bench_profile;
pub mod bench_train;
pub mod classify;
pub mod common;
pub mod convert;
pub mod embed;
pub mod embed_shards;
pub mod eval;
pub mod finetune;
pub mod finetune_dist;
pub mod hidden;
pub mod serve;
pub mod stretch;

use clap::{Args, Parser, Subcommand, ValueEnum};
use clipforge::error::{Error, Result};
use clipforge::tensor::DType;

#[derive(Parser, Debug)]
#[command(name = "clipforge", version, about = "CLIP, Long-CLIP and SmartCLIP inference, fine-tuning and benchmarking")]
pub struct Cli {
    /// Worker threads (default: all cores)
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub cmd: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Throughput of the image and text towers (synthetic ViT-B/32 weights by default)
    Bench(bench::BenchArgs),
    /// Image embeddings to a float32 .npy [N, D] (or per-token hidden states to .safetensors)
    EmbedImage(embed::EmbedImageArgs),
    /// Text embeddings to a float32 .npy [N, D] (or per-token hidden states to .safetensors)
    EmbedText(embed::EmbedTextArgs),
    /// Zero-shot classification of images against class names
    Classify(classify::ClassifyArgs),
    /// Cosine similarity and softmax probabilities between images and texts
    Similarity(classify::SimilarityArgs),
    /// Evaluate a model: zero-shot classification, retrieval, linear probe
    #[command(subcommand)]
    Eval(eval::EvalCmd),
    /// Fine-tune CLIP: Long-CLIP (long + short captions, primary component matching) or SmartCLIP (per-caption dimension masks)
    Finetune(finetune::FinetuneArgs),
    /// Convert a released PyTorch .pt checkpoint (OpenAI CLIP, Long-CLIP, SmartCLIP) into an HF model dir
    Convert(convert::ConvertArgs),
    /// Long-CLIP knowledge-preserved stretching of the text positions (77 → 248) into a new HF model dir
    Stretch(stretch::StretchArgs),
    /// Serve text and image embeddings over HTTP (OpenAI-compatible /v1/embeddings), dynamically batched
    Serve(serve::ServeArgs),
}

/// Where and in what precision a command computes.
#[derive(Args, Clone, Copy, Debug)]
pub struct Compute {
    /// auto (CUDA when available, else CPU), cpu, or cuda
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Compute precision: f32 or bf16 (bf16 Linear weights, GEMM inputs rounded to bf16, f32 accumulation: AVX512-BF16 on the CPU, cuBLASLt tensor cores on CUDA)
    #[arg(long, default_value = "f32", value_parser = inference_dtype())]
    pub dtype: DtypeArg,
    /// With --dtype f32 on CUDA: exact FP32 GEMMs instead of the TF32 tensor cores (TF32: inputs rounded to a 10-bit mantissa, f32 accumulation, ~1e-3 relative; the default). No effect on the CPU or in bf16
    #[arg(long)]
    pub no_tf32: bool,
}

/// The precisions the inference towers compute in: f32 and bf16 (f16 only trains, on CUDA).
fn inference_dtype() -> impl clap::builder::TypedValueParser<Value = DtypeArg> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["f32", "bf16"]).map(|s| if s == "bf16" { DtypeArg::Bf16 } else { DtypeArg::F32 })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    F32,
    Bf16,
    F16,
}

impl DtypeArg {
    /// The precision asked for, as the crate's one precision type.
    pub fn precision(self) -> DType {
        match self {
            DtypeArg::F32 => DType::F32,
            DtypeArg::Bf16 => DType::BF16,
            DtypeArg::F16 => DType::F16,
        }
    }

    /// The compute dtype of the inference towers (f32 or bf16).
    pub fn dtype(self) -> Result<DType> {
        match self {
            DtypeArg::F32 => Ok(DType::F32),
            DtypeArg::Bf16 => {
                if !clipforge::ops::gemm_bf16::has_avx512_bf16() {
                    eprintln!("note: this CPU has no AVX512-BF16; --dtype bf16 runs a slower portable path (f32 is faster here)");
                }
                Ok(DType::BF16)
            }
            DtypeArg::F16 => Err(Error::msg("--dtype f16: clipforge computes in f32 or bf16 (use --dtype bf16)")),
        }
    }
}

pub use clipforge::progress::bar as progress;

pub fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build_global().map_err(Error::msg)?;
    }
    match cli.cmd {
        Command::Bench(a) => bench::run(&a),
        Command::EmbedImage(a) => embed::embed_image(&a),
        Command::EmbedText(a) => embed::embed_text(&a),
        Command::Classify(a) => classify::classify(&a),
        Command::Similarity(a) => classify::similarity(&a),
        Command::Stretch(a) => stretch::run(&a),
        Command::Convert(a) => convert::run(&a),
        Command::Finetune(a) => finetune::finetune(&a),
        Command::Eval(c) => eval::run(&c),
        Command::Serve(a) => serve::run(&a),
    }
}
