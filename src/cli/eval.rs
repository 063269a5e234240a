//! `clipforge eval zeroshot`, `eval retrieval` and `eval linear-probe`: metrics on a model's embeddings
//! (src/eval/), with embedding caches, --json output and an SVG picture (confusion matrix,
//! recall@K).
use super::common::*;
use super::Compute;
use clap::{Args, Subcommand};
use clipforge::error::{Error, Result};
use clipforge::eval::cache::{model_key, EmbeddingCache, Hasher};
use clipforge::eval::data::{image_folder, retrieval_set};
use clipforge::eval::metrics::{retrieval, similarity, zero_shot};
use clipforge::eval::templates;
use clipforge::io::tokenizer::ClipTokenizer;
use clipforge::model::Towers;
use std::path::{Path, PathBuf};

/// How ties rank, in every metric's --help.
const TIES: &str = "Ties rank as in clip_benchmark (torch.topk over all candidates): a candidate scoring the same as the right one counts ahead of it when it comes first in the data, never in its favour (duplicate captions are not all hits).";

#[derive(Subcommand, Debug)]
pub enum EvalCmd {
    /// Zero-shot classification of an ImageFolder tree (ROOT/<class>/<image>)
    #[command(after_help = TIES)]
    Zeroshot(ZeroshotArgs),
    /// Image↔text retrieval recall@1/5/10 on a JSONL file
    #[command(after_help = TIES)]
    Retrieval(RetrievalArgs),
    /// Linear probe: L2-regularised logistic regression on frozen image features (ImageFolder trees);
    /// --plot draws the validation accuracy of the λ sweep
    LinearProbe(ProbeArgs),
}

#[derive(Args, Debug)]
pub struct ProbeArgs {
    #[command(flatten)]
    pub common: Common,
    /// Training ImageFolder root (one subfolder per class)
    #[arg(long)]
    pub train: PathBuf,
    /// Test ImageFolder root (the same class folders)
    #[arg(long)]
    pub test: PathBuf,
}

#[derive(Args, Debug)]
pub struct Common {
    /// HF CLIP model directory
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub compute: Compute,
    /// Items per forward pass
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Embedding cache directory (default: $XDG_CACHE_HOME/clipforge/embeddings)
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Do not read or write cached embeddings
    #[arg(long)]
    pub no_cache: bool,
    /// Print the metrics as JSON
    #[arg(long)]
    pub json: bool,
    /// Where to write the SVG picture (default: zeroshot_confusion.svg, retrieval_recall.svg,
    /// linear_probe.svg)
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ZeroshotArgs {
    #[command(flatten)]
    pub common: Common,
    /// ImageFolder root: one subfolder per class
    #[arg(long)]
    pub data: PathBuf,
    /// Class names, one per line in sorted-folder order (default: folder names, '_' → ' ')
    #[arg(long)]
    pub classnames: Option<PathBuf>,
    /// Prompt templates: imagenet (the CLIP paper's 80), simple, or a file with one per line
    #[arg(long, default_value = "imagenet")]
    pub templates: String,
}

#[derive(Args, Debug)]
pub struct RetrievalArgs {
    #[command(flatten)]
    pub common: Common,
    /// JSONL: {"image": path relative to the file, "captions": [...]} (or "caption": "..."), or
    /// WebDataset tar shards ('data/{00000..00009}.tar': KEY.jpg/png/webp with KEY.json
    /// {"captions": [...]} / {"caption": "..."} or KEY.txt, one caption per line)
    #[arg(long)]
    pub data: PathBuf,
    /// Context length (77, or up to 248 for a stretched Long-CLIP model; default: the model's)
    #[arg(long)]
    pub max_len: Option<usize>,
}

pub fn run(cmd: &EvalCmd) -> Result<()> {
    match cmd {
        EvalCmd::Zeroshot(a) => zeroshot(a),
        EvalCmd::Retrieval(a) => retrieval_cmd(a),
        EvalCmd::LinearProbe(a) => probe_cmd(a),
    }
}

/// What both commands share: the model, its key, the cache.
struct Ctx {
    model: Loaded,
    key: u64,
    cache: EmbeddingCache,
    pre: clipforge::io::image_prep::PreprocessConfig,
}

fn ctx(c: &Common) -> Result<Ctx> {
    let model = load_model(&c.model, Towers::Both, c.compute)?;
    let key = model_key(&c.model)?;
    let dir = if c.no_cache { None } else { c.cache_dir.clone().or_else(EmbeddingCache::default_dir) };
    let pre = clipforge::io::image_prep::PreprocessConfig::for_model_dir(&c.model, model.config().vision.image_size)?; // (load_model noted a missing file)
    Ok(Ctx { model, key, cache: EmbeddingCache::new(dir), pre })
}

fn images(x: &Ctx, c: &Common, paths: &[PathBuf]) -> Result<Vec<f32>> {
    let mut h = Hasher::default();
    h.bytes(&x.key.to_le_bytes()).str("images").str(&format!("{:?}", x.pre));
    for p in paths {
        h.file(p)?;
    }
    let (v, _, hit) = x.cache.get_or(h.finish(), || {
        let e = embed_images(&x.model, paths, c.batch, true, c.json)?;
        Ok((e.to_vec_f32(), e.shape().to_vec()))
    })?;
    if hit && !c.json {
        eprintln!("image embeddings: from the cache");
    }
    Ok(v)
}

/// [`images`] of images that may be tar members (hashed by their bytes, as files are).
fn source_images(x: &Ctx, c: &Common, srcs: &[clipforge::io::image_source::ImageSource]) -> Result<Vec<f32>> {
    if let Some(paths) = srcs.iter().map(|s| s.path().map(Path::to_path_buf)).collect::<Option<Vec<_>>>() {
        return images(x, c, &paths);
    }
    let mut h = Hasher::default();
    h.bytes(&x.key.to_le_bytes()).str("images").str(&format!("{:?}", x.pre));
    for s in srcs {
        h.bytes(&s.read()?);
    }
    let (v, _, hit) = x.cache.get_or(h.finish(), || {
        let e = super::embed_shards::embed_sources(&x.model, srcs, c.batch, true, c.json)?;
        Ok((e.to_vec_f32(), e.shape().to_vec()))
    })?;
    if hit && !c.json {
        eprintln!("image embeddings: from the cache");
    }
    Ok(v)
}

fn texts(x: &Ctx, c: &Common, tok: &ClipTokenizer, t: &[String]) -> Result<Vec<f32>> {
    let mut h = Hasher::default();
    h.bytes(&x.key.to_le_bytes()).str("texts").bytes(&tok.context_length.to_le_bytes());
    for s in t {
        h.str(s);
    }
    let (v, _, _) = x.cache.get_or(h.finish(), || {
        let e = embed_texts(&x.model, tok, t, c.batch, true, c.json)?;
        Ok((e.to_vec_f32(), e.shape().to_vec()))
    })?;
    Ok(v)
}

fn write_svg(path: &Path, svg: &str, quiet: bool) -> Result<()> {
    clipforge::io::output::write_file(path, svg.as_bytes())?;
    if !quiet {
        eprintln!("picture: {}", path.display());
    }
    Ok(())
}

pub fn zeroshot(a: &ZeroshotArgs) -> Result<()> {
    let c = &a.common;
    let set = image_folder(&a.data)?;
    let names: Vec<String> = match &a.classnames {
        Some(p) => {
            let t = clipforge::io::text::read_utf8(p)?;
            let n: Vec<String> = t.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect();
            if n.len() != set.folders.len() {
                return Err(Error::file(p, format!("{} class names for {} class folders", n.len(), set.folders.len())));
            }
            n
        }
        None => set.folders.iter().map(|f| f.replace('_', " ")).collect(),
    };
    let tmpl = templates::load(&a.templates)?;
    let x = ctx(c)?;
    let d = x.model.config().projection_dim;
    let img = images(&x, c, &set.images)?;
    let tok = x.model.tokenizer(None)?;
    // class embeddings: mean of the normalised prompt embeddings, re-normalised
    let prompts: Vec<String> = names.iter().flat_map(|n| templates::prompts(&tmpl, n)).collect();
    let pe = texts(&x, c, &tok, &prompts)?;
    let mut cls = vec![0f32; names.len() * d];
    for (k, row) in pe.chunks(d).enumerate() {
        cls[(k / tmpl.len()) * d..][..d].iter_mut().zip(row).for_each(|(a, b)| *a += b);
    }
    for r in cls.chunks_mut(d) {
        let n = r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        r.iter_mut().for_each(|v| *v /= n);
    }
    let scores = similarity(&img, &cls, d); // [N, C]
    let z = zero_shot(&scores, names.len(), &set.labels);
    let plot = c.plot.clone().unwrap_or_else(|| PathBuf::from("zeroshot_confusion.svg"));
    write_svg(&plot, &clipforge::plot::heatmap(&format!("zero-shot confusion, top-1 {:.1}%", 100.0 * z.top1), &names, &z.confusion)?, c.json)?;
    if c.json {
        let per: Vec<serde_json::Value> =
            names.iter().zip(&z.per_class).map(|(n, (cnt, acc))| serde_json::json!({"class": n, "images": cnt, "top1": acc})).collect();
        println!(
            "{}",
            serde_json::json!({"images": set.images.len(), "classes": names.len(), "templates": tmpl.len(), "top1": z.top1, "top5": z.top5, "per_class": per, "confusion": z.confusion, "plot": plot})
        );
    } else {
        println!("{} images, {} classes, {} templates: top-1 {:.2}%  top-5 {:.2}%", set.images.len(), names.len(), tmpl.len(), 100.0 * z.top1, 100.0 * z.top5);
        for (n, (cnt, acc)) in names.iter().zip(&z.per_class) {
            println!("  {n:<24} {cnt:>6} images  top-1 {:>6.2}%", 100.0 * acc);
        }
    }
    Ok(())
}

pub fn retrieval_cmd(a: &RetrievalArgs) -> Result<()> {
    let c = &a.common;
    let set = retrieval_set(&a.data)?;
    let x = ctx(c)?;
    let d = x.model.config().projection_dim;
    let tok = x.model.tokenizer(a.max_len).map_err(|e| e.context("--max-len"))?;
    let img = source_images(&x, c, &set.images)?;
    let txt = texts(&x, c, &tok, &set.texts)?;
    let ks = [1usize, 5, 10];
    let r = retrieval(&img, &txt, d, &set.owner, &ks);
    let series = |name: &str, f: &dyn Fn(&clipforge::eval::metrics::Recall) -> f64| clipforge::plot::Series {
        name: name.into(),
        points: r.iter().map(|x| (x.k as f64, 100.0 * f(x))).collect(),
    };
    let plot = c.plot.clone().unwrap_or_else(|| PathBuf::from("retrieval_recall.svg"));
    let svg = clipforge::plot::line_chart(
        "retrieval recall@K",
        "K",
        "recall (%)",
        &[series("image→text", &|x| x.image_to_text), series("text→image", &|x| x.text_to_image)],
    )?;
    write_svg(&plot, &svg, c.json)?;
    if c.json {
        println!(
            "{}",
            serde_json::json!({"images": set.images.len(), "texts": set.texts.len(), "context_length": tok.context_length, "recall": r, "plot": plot})
        );
    } else {
        println!("{} images, {} texts (context {}):", set.images.len(), set.texts.len(), tok.context_length);
        for x in &r {
            println!("  R@{:<3} image→text {:>6.2}%   text→image {:>6.2}%", x.k, 100.0 * x.image_to_text, 100.0 * x.text_to_image);
        }
    }
    Ok(())
}

pub fn probe_cmd(a: &ProbeArgs) -> Result<()> {
    let c = &a.common;
    let (train, test) = (image_folder(&a.train)?, image_folder(&a.test)?);
    if train.folders != test.folders {
        return Err(Error::file(&a.test, format!("class folders {:?} differ from the training set's {:?}", test.folders, train.folders)));
    }
    let x = ctx(c)?;
    let d = x.model.config().projection_dim;
    let (tx, vx) = (images(&x, c, &train.images)?, images(&x, c, &test.images)?);
    let r = clipforge::eval::probe::linear_probe(&tx, &train.labels, &vx, &test.labels, d, train.folders.len())?;
    let plot = c.plot.clone().unwrap_or_else(|| PathBuf::from("linear_probe.svg"));
    let sweep = clipforge::plot::Series { name: "validation accuracy".into(), points: r.sweep.iter().map(|&(l, a)| (l.log10(), 100.0 * a)).collect() };
    let chosen = clipforge::plot::Series { name: format!("test accuracy at λ = {:e}", r.lambda), points: vec![(r.lambda.log10(), 100.0 * r.test_accuracy)] };
    write_svg(&plot, &clipforge::plot::line_chart("linear probe: λ sweep", "log10 λ", "accuracy (%)", &[sweep, chosen])?, c.json)?;
    if c.json {
        println!(
            "{}",
            serde_json::json!({"train_images": train.images.len(), "test_images": test.images.len(), "classes": train.folders.len(), "result": r, "plot": plot})
        );
    } else {
        println!(
            "{} classes, {} train / {} test images: test accuracy {:.2}% (train {:.2}%), λ = {:e} chosen on a validation split",
            train.folders.len(),
            train.images.len(),
            test.images.len(),
            100.0 * r.test_accuracy,
            100.0 * r.train_accuracy,
            r.lambda
        );
    }
    Ok(())
}
