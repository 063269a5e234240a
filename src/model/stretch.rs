//! Long-CLIP's knowledge-preserved stretching of a model directory (methods.md §2.1): the text
//! position table [L, W] becomes [ratio·L − (ratio−1)·keep, W] — rows below `keep` copied, rows
//! keep..L−1 interpolated ×ratio, the last row extrapolated (`ops::pos_gather::stretch`). Every
//! other tensor is copied byte for byte in its stored dtype; the output is one model.safetensors,
//! config.json with the new max_position_embeddings and `clipforge_frozen_positions = keep`, and
//! the tokenizer/preprocessor files. HF transformers' CLIPModel loads it unchanged. The directory
//! is written under a temporary name and renamed into place, so it is never half-written.
use crate::error::{Error, Result};
use crate::ops::pos_gather::{stretch, Stretch};
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const POSITION_TABLE: &str = "text_model.embeddings.position_embedding.weight";
const POSITION_IDS: &str = "text_model.embeddings.position_ids";

#[derive(Debug, Clone, serde::Serialize)]
pub struct StretchReport {
    pub out: PathBuf,
    pub old_len: usize,
    pub new_len: usize,
    pub keep: usize,
    pub ratio: usize,
    pub tensors: usize,
}

/// The weight files of a model dir (model.safetensors or the shards of its index), checked as
/// [`crate::model::Weights::open`] checks them (shards inside the directory, present, agreeing
/// with the index, no tensor in two shards).
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    crate::model::Weights::open(dir)?;
    Ok(crate::model::weights::model_files(dir)?.0)
}

fn to_f32(data: &[u8], dtype: Dtype, path: &Path) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
        Dtype::F16 => data.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => data.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        d => return Err(Error::file(path, format!("{POSITION_TABLE} has dtype {d:?}; expected F32, F16 or BF16"))),
    })
}

fn from_f32(v: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F16 => v.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect(),
        Dtype::BF16 => v.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect(),
        _ => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
    }
}

/// Stretches `src` into `out` (see the module docs). `force` replaces an existing `out`.
pub fn stretch_model(src: &Path, out: &Path, keep: usize, ratio: usize, force: bool) -> Result<StretchReport> {
    stretch_model_to(src, out, keep, Target::Ratio(ratio), force)
}

/// How far a stretch goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Interpolation factor R: L·R − (R−1)·keep positions.
    Ratio(usize),
    /// A context length: the smallest integer ratio that reaches it, the table then cut to that
    /// many rows (the extrapolated tail and the last interpolated rows beyond it are dropped).
    Length(usize),
}

/// The ratio that reaches `len` positions from `base` keeping `keep`: ⌈(len − keep)/(base − keep)⌉.
pub fn ratio_for_length(base: usize, keep: usize, len: usize) -> Result<usize> {
    if len <= base || keep + 1 >= base {
        return Err(Error::msg(format!(
            "--length {len}: a stretch needs a length above the model's {base} positions and --keep below {}",
            base.saturating_sub(1)
        )));
    }
    Ok((len - keep).div_ceil(base - keep))
}

/// [`stretch_model`] to a [`Target`].
pub fn stretch_model_to(src: &Path, out: &Path, keep: usize, target: Target, force: bool) -> Result<StretchReport> {
    let cfg_path = src.join("config.json");
    let cfg_text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::file(&cfg_path, format!("cannot read: {e}")))?;
    let cfg = crate::model::config::ClipConfig::from_json(&cfg_text).map_err(|e| Error::file(&cfg_path, e))?;
    if cfg.text.frozen_positions > 0 {
        return Err(Error::file(
            &cfg_path,
            format!("already stretched (clipforge_frozen_positions = {}); stretch the original model", cfg.text.frozen_positions),
        ));
    }
    let base = cfg.text.max_positions;
    let ratio = match target {
        Target::Ratio(r) => r,
        Target::Length(len) => ratio_for_length(base, keep, len).map_err(|e| Error::file(&cfg_path, e))?,
    };
    let s = Stretch::new(base, keep, ratio).map_err(|e| Error::file(&cfg_path, e))?;
    let new_len = match target {
        Target::Ratio(_) => s.new_len(),
        Target::Length(len) => len,
    };
    if out.exists() && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(true) && !force {
        return Err(Error::file(out, "exists and is not empty (use --force to replace it)"));
    }
    // the output policy of every clipforge output (src/io/output.rs): filled under a temp name
    // beside the symlink-resolved target, then renamed into place
    let mut tensors = 0;
    crate::io::output::write_dir(out, |tmp| {
        tensors = write_stretched(src, tmp, &cfg_text, s, new_len, cfg.text.tower.hidden)?;
        Ok(())
    })?;
    Ok(StretchReport { out: out.to_path_buf(), old_len: s.len, new_len, keep, ratio, tensors })
}

/// Writes the stretched directory: the table stretched by `s` and cut to `new_len` rows.
fn write_stretched(src: &Path, dst: &Path, cfg_text: &str, s: Stretch, new_len: usize, width: usize) -> Result<usize> {
    // every tensor of every file, the position table replaced
    let files = weight_files(src)?;
    let mut bytes: Vec<(PathBuf, Vec<u8>)> = vec![];
    for f in &files {
        bytes.push((f.clone(), std::fs::read(f).map_err(|e| Error::file(f, format!("cannot read: {e}")))?));
    }
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = vec![];
    let mut found = false;
    for (path, b) in &bytes {
        let st = SafeTensors::deserialize(b).map_err(|e| Error::file(path, format!("not a valid safetensors file: {e}")))?;
        for (name, view) in st.tensors() {
            let (dtype, shape) = (view.dtype(), view.shape().to_vec());
            if name == POSITION_TABLE {
                if shape != [s.len, width] {
                    return Err(Error::file(path, format!("{name} has shape {shape:?}; config.json says [{}, {width}]", s.len)));
                }
                let table = stretch(&to_f32(view.data(), dtype, path)?, width, s)?; // [Ln, W]
                owned.push((name, dtype, vec![new_len, width], from_f32(&table[..new_len * width], dtype)));
                found = true;
            } else if name == POSITION_IDS {
                let ids: Vec<u8> = (0..new_len as i64).flat_map(|i| i.to_le_bytes()).collect();
                owned.push((name, Dtype::I64, vec![1, new_len], ids));
            } else {
                owned.push((name, dtype, shape, view.data().to_vec()));
            }
        }
    }
    if !found {
        return Err(Error::file(src, format!("no {POSITION_TABLE} tensor")));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = owned
        .iter()
        .map(|(n, d, sh, b)| safetensors::tensor::TensorView::new(*d, sh.clone(), b).map(|v| (n.clone(), v)))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::msg(format!("cannot build the output tensors: {e}")))?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let path = dst.join("model.safetensors");
    safetensors::serialize_to_file(views, Some(meta), &path).map_err(|e| Error::file(&path, format!("cannot write: {e}")))?;

    // config.json: everything kept, the new length and the frozen-row count added
    let mut cfg: serde_json::Value = serde_json::from_str(cfg_text).map_err(|e| Error::file(src.join("config.json"), e))?;
    let tc = cfg.get_mut("text_config").and_then(|t| t.as_object_mut()).ok_or_else(|| Error::file(src.join("config.json"), "no text_config object"))?;
    tc.insert("max_position_embeddings".into(), new_len.into());
    tc.insert("clipforge_frozen_positions".into(), s.keep.into());
    write_json(&dst.join("config.json"), &cfg)?;
    // tokenizer and preprocessor files
    for f in ["tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"] {
        let p = src.join(f);
        if !p.is_file() {
            continue;
        }
        if f == "tokenizer_config.json" {
            let text = std::fs::read_to_string(&p).map_err(|e| Error::file(&p, format!("cannot read: {e}")))?;
            let mut v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::file(&p, format!("not JSON: {e}")))?;
            if let Some(o) = v.as_object_mut().filter(|o| o.contains_key("model_max_length")) {
                o.insert("model_max_length".into(), new_len.into());
            }
            write_json(&dst.join(f), &v)?;
        } else {
            std::fs::copy(&p, dst.join(f)).map_err(|e| Error::file(&p, format!("cannot copy: {e}")))?;
        }
    }
    Ok(owned.len())
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(Error::msg)?;
    std::fs::write(path, text + "\n").map_err(|e| Error::file(path, format!("cannot write: {e}")))
}
