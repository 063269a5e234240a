//! `clipforge classify` (zero-shot labels for images) and `clipforge similarity` (cosine matrix and
//! softmax probabilities between images and texts).
use super::common::*;
use super::Compute;
use clap::Args;
use clipforge::error::{Error, Result};
use clipforge::model::clip::cosine_matrix;
use clipforge::model::Towers;
use clipforge::ops::softmax::softmax;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ClassifyArgs {
    /// HF CLIP model directory
    #[arg(long)]
    pub model: PathBuf,
    /// Comma-separated class names
    #[arg(long, conflicts_with = "labels_file")]
    pub labels: Option<String>,
    /// File with one class name per line
    #[arg(long)]
    pub labels_file: Option<PathBuf>,
    /// Prompt template; {} is replaced by the class name
    #[arg(long, default_value = "a photo of a {}.")]
    pub template: String,
    /// How many labels to show per image
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub compute: Compute,
    /// Image files
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

#[derive(Args, Debug)]
pub struct SimilarityArgs {
    /// HF CLIP model directory
    #[arg(long)]
    pub model: PathBuf,
    /// Image files (rows of the matrix)
    #[arg(long = "image", required = true, num_args = 1..)]
    pub images: Vec<PathBuf>,
    /// Texts (columns of the matrix)
    #[arg(long = "text", required = true, num_args = 1..)]
    pub texts: Vec<String>,
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub compute: Compute,
}

/// (cosine [I×T], probabilities over texts per image [I×T], logit scale).
fn scores(model_dir: &std::path::Path, images: &[PathBuf], texts: &[String], compute: Compute) -> Result<(Vec<f32>, Vec<f32>, f32)> {
    let model = load_model(model_dir, Towers::Both, compute)?;
    let tok = model.tokenizer(None)?;
    let img = embed_images(&model, images, 32, true, true)?;
    let txt = embed_texts(&model, &tok, texts, 64, true, true)?;
    let cos = cosine_matrix(&img, &txt)?.to_vec_f32();
    let scale = model.logit_scale().exp();
    let logits: Vec<f32> = cos.iter().map(|c| c * scale).collect();
    Ok((cos, softmax(&logits, texts.len()), scale))
}

pub fn classify(a: &ClassifyArgs) -> Result<()> {
    let labels: Vec<String> = match (&a.labels, &a.labels_file) {
        (Some(l), _) => l.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
        (None, Some(f)) => read_texts(&[], Some(f))?.into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
        (None, None) => return Err(Error::msg("give class names with --labels a,b,c or --labels-file FILE")),
    };
    if labels.is_empty() {
        return Err(Error::msg("no class names given"));
    }
    if !a.template.contains("{}") {
        return Err(Error::msg(format!("--template {:?} has no {{}} for the class name", clipforge::io::text::excerpt(&a.template, 80))));
    }
    let prompts: Vec<String> = labels.iter().map(|l| a.template.replace("{}", l)).collect();
    let (_, probs, _) = scores(&a.model, &a.images, &prompts, a.compute)?;
    let k = a.top_k.clamp(1, labels.len());
    let mut out = vec![];
    for (i, img) in a.images.iter().enumerate() {
        let p = &probs[i * labels.len()..(i + 1) * labels.len()];
        let mut order: Vec<usize> = (0..labels.len()).collect();
        order.sort_by(|&x, &y| p[y].partial_cmp(&p[x]).unwrap_or(std::cmp::Ordering::Equal));
        let top: Vec<(String, f32)> = order[..k].iter().map(|&j| (labels[j].clone(), p[j])).collect();
        if a.json {
            out.push(serde_json::json!({"image": img.display().to_string(), "top": top.iter().map(|(l, s)| serde_json::json!({"label": l, "prob": s})).collect::<Vec<_>>()}));
        } else {
            println!("{}", img.display());
            for (l, s) in &top {
                println!("  {:6.2}%  {l}", 100.0 * s);
            }
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out).map_err(Error::msg)?);
    }
    Ok(())
}

pub fn similarity(a: &SimilarityArgs) -> Result<()> {
    let (cos, probs, scale) = scores(&a.model, &a.images, &a.texts, a.compute)?;
    let t = a.texts.len();
    if a.json {
        let rows = |v: &[f32]| v.chunks(t).map(|r| r.to_vec()).collect::<Vec<_>>();
        let j = serde_json::json!({
            "images": a.images.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "texts": a.texts, "logit_scale": scale, "cosine": rows(&cos), "probs": rows(&probs),
        });
        println!("{}", serde_json::to_string_pretty(&j).map_err(Error::msg)?);
        return Ok(());
    }
    println!("cosine similarity (rows: images, columns: texts); softmax over texts in brackets, logit scale {scale:.2}");
    for (j, txt) in a.texts.iter().enumerate() {
        println!("  T{j}: {txt}");
    }
    // one column per text, headed T0, T1, ...; image names padded to one width
    let names: Vec<String> = a.images.iter().map(|p| p.display().to_string()).collect();
    let w = names.iter().map(|n| n.chars().count()).max().unwrap_or(0);
    let head: Vec<String> = (0..t).map(|j| format!("{:>16}", format!("T{j}"))).collect();
    println!("{:w$}  {}", "", head.join("  "));
    for (i, name) in names.iter().enumerate() {
        let cells: Vec<String> = (0..t).map(|j| format!("{:+.4} [{:5.1}%]", cos[i * t + j], 100.0 * probs[i * t + j])).collect();
        println!("{name:w$}  {}", cells.join("  "));
    }
    Ok(())
}
