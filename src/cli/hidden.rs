//! `embed-text --hidden-states LAYER` and `embed-image --hidden-states LAYER`: per-token outputs
//! (HF's `hidden_states` numbering) to a .safetensors file, through the library's
//! [`ClipModel::text_hidden_states`](clipforge::ClipModel) family. Text: `hidden_states` [N, T, W],
//! `attention_mask` [N, T], `input_ids` [N, T] (int64) and `text_embeds` [N, D]; images:
//! `hidden_states` [N, T, W] (class token first) and `image_embeds` [N, D]. The embeddings are
//! the projected pooled outputs, not normalised (what SDXL reads as `text_embeds`).
use super::common::{items_bar, Loaded};
use clap::{Args, ValueEnum};
use clipforge::api::{HiddenOptions, Padding};
use clipforge::error::{Error, Result};
use clipforge::io::st_out::{write_safetensors, Values};
use clipforge::io::tokenizer::ClipTokenizer;
use clipforge::tensor::DType;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The per-token flags both embed commands share.
#[derive(Args, Debug, Clone)]
pub struct HiddenArgs {
    /// Write per-token hidden states of this layer to a .safetensors OUT instead of embeddings:
    /// HF's `hidden_states` index (0: the embeddings, -1: the last layer, -2: the penultimate, the
    /// one diffusion pipelines use)
    #[arg(long, allow_hyphen_values = true, value_name = "LAYER")]
    pub hidden_states: Option<i64>,
    /// With --hidden-states: apply the tower's final LayerNorm to every token (text
    /// final_layer_norm, vision post_layernorm), as diffusion pipelines do for the last layer
    #[arg(long, requires = "hidden_states")]
    pub final_layer_norm: bool,
    /// With --hidden-states: float dtype of hidden_states and the embeddings in the file
    #[arg(long, value_enum, default_value_t = OutDtype::F32, requires = "hidden_states")]
    pub out_dtype: OutDtype,
}

/// Text padding of the per-token outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PaddingArg {
    /// Every text padded to the context length (--max-len, default the model's positions)
    MaxLength,
    /// Every text padded to the longest text given
    Longest,
}

/// The stored float dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutDtype {
    F32,
    F16,
    Bf16,
}

impl OutDtype {
    fn dtype(self) -> DType {
        match self {
            OutDtype::F32 => DType::F32,
            OutDtype::F16 => DType::F16,
            OutDtype::Bf16 => DType::BF16,
        }
    }
}

fn check_out(out: &Path) -> Result<()> {
    match out.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => Ok(()),
        _ => Err(Error::file(out, "--hidden-states writes a .safetensors file: name the output FILE.safetensors")),
    }
}

fn meta(model: &Loaded, layer: i64, a: &HiddenArgs) -> HashMap<String, String> {
    let mut m = HashMap::new();
    m.insert("format".into(), "pt".into());
    m.insert("hidden_layer".into(), layer.to_string());
    m.insert("final_layer_norm".into(), a.final_layer_norm.to_string());
    m.insert("model".into(), model.dir().map(|d| d.display().to_string()).unwrap_or_default());
    m
}

/// Texts → per-token outputs in `out`, `batch` texts per pass, padded as `padding`.
pub fn texts(model: &Loaded, tok: &ClipTokenizer, texts: &[String], a: &HiddenArgs, padding: PaddingArg, batch: usize, out: &Path) -> Result<()> {
    check_out(out)?;
    let layer = a.hidden_states.ok_or_else(|| Error::msg("internal: no --hidden-states"))?;
    let ids = tok.encode_batch(texts)?;
    let t = match padding {
        PaddingArg::MaxLength => tok.context_length,
        PaddingArg::Longest => ids.iter().map(|s| s.len()).max().unwrap_or(2),
    };
    let opts = HiddenOptions { layer, final_layer_norm: a.final_layer_norm, padding: Padding::MaxLength, max_len: None, truncate: true, batch };
    let bar = items_bar(texts.len(), batch, false, "texts");
    let (mut states, mut embeds, mut input_ids, mut mask) = (vec![], vec![], vec![], vec![]);
    for chunk in ids.chunks(batch.max(1)) {
        let h = model.token_hidden_states(chunk, t, &opts)?;
        states.extend(h.hidden_states.to_vec_f32());
        embeds.extend(h.text_embeds.iter_rows().flatten().copied());
        input_ids.extend(h.input_ids.iter().map(|&i| i as i64));
        mask.extend(h.attention_mask.iter().map(|&m| m as i64));
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    if let Some(note) = tok.take_cut().note(tok.context_length, "texts", &clipforge::io::tokenizer::cut_hint(tok.context_length, model.context_length())) {
        eprintln!("{note}");
    }
    let (n, w, d) = (texts.len(), model.config().text.tower.hidden, model.embed_dim());
    let tensors = [
        ("hidden_states", vec![n, t, w], Values::F32(&states)),
        ("attention_mask", vec![n, t], Values::I64(mask)),
        ("input_ids", vec![n, t], Values::I64(input_ids)),
        ("text_embeds", vec![n, d], Values::F32(&embeds)),
    ];
    write_safetensors(out, &tensors, a.out_dtype.dtype(), meta(model, layer, a))?;
    eprintln!("wrote hidden states [{n}, {t}, {w}] of layer {layer} and text_embeds [{n}, {d}] to {}", out.display());
    Ok(())
}

/// Image files → per-token outputs in `out`, `batch` images per pass.
pub fn images(model: &Loaded, paths: &[PathBuf], a: &HiddenArgs, batch: usize, out: &Path) -> Result<()> {
    check_out(out)?;
    let layer = a.hidden_states.ok_or_else(|| Error::msg("internal: no --hidden-states"))?;
    let opts = HiddenOptions { layer, final_layer_norm: a.final_layer_norm, batch, ..HiddenOptions::default() };
    let bar = items_bar(paths.len(), batch, false, "images");
    let (mut states, mut embeds) = (vec![], vec![]);
    for chunk in paths.chunks(batch.max(1)) {
        let h = model.image_file_hidden_states(chunk, &opts)?;
        states.extend(h.hidden_states.to_vec_f32());
        embeds.extend(h.image_embeds.iter_rows().flatten().copied());
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let c = &model.config().vision;
    let (n, t, w, d) = (paths.len(), c.tokens(), c.tower.hidden, model.embed_dim());
    let tensors = [("hidden_states", vec![n, t, w], Values::F32(&states)), ("image_embeds", vec![n, d], Values::F32(&embeds))];
    write_safetensors(out, &tensors, a.out_dtype.dtype(), meta(model, layer, a))?;
    eprintln!("wrote hidden states [{n}, {t}, {w}] of layer {layer} and image_embeds [{n}, {d}] to {}", out.display());
    Ok(())
}
