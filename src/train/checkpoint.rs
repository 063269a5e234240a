//! Checkpoints: a directory that is itself a loadable HF model dir (model.safetensors with every
//! parameter in f32 under its HF name, the source's config.json and tokenizer/preprocessor files;
//! SmartCLIP's mask network in `mask_net.safetensors` beside it)
//! plus `optimizer.safetensors` (`exp_avg.<name>`, `exp_avg_sq.<name>`) and `trainer_state.json`.
//! Written under a temporary name and renamed into place (`io::output::write_dir`), so a crash
//! never leaves a half-written checkpoint; the previous one is replaced only after the new one is
//! complete.
use super::data::Position;
use super::optim::Optimizer;
use crate::error::{Error, Result};
use crate::model::ClipConfig;
use crate::tensor::Tensor;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};

/// Files copied from the source model into every checkpoint / output dir.
pub const MODEL_FILES: [&str; 6] =
    ["config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "special_tokens_map.json", "vocab.json"];

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// Where the data stream continues.
    pub position: Position,
    /// The run's settings (for the record and to check a resume uses the same ones).
    pub args: serde_json::Value,
    /// The number of ranks that trained it (the global micro-batch is `batch` × `world`).
    #[serde(default = "one")]
    pub world: usize,
}

fn one() -> usize {
    1
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes named f32 tensors to one safetensors file.
pub fn write_tensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<u8>)]) -> Result<()> {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| TensorView::new(Dtype::F32, s.clone(), b).map(|v| (n.clone(), v)))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::file(path, format!("cannot build tensors: {e}")))?;
    let meta = [("format".to_string(), "pt".to_string())].into_iter().collect();
    safetensors::serialize_to_file(views, Some(meta), path).map_err(|e| Error::file(path, format!("cannot write: {e}")))
}

/// Saves params (+ optimizer state and trainer state when given) as the model dir `dir`
/// (written whole through `io::output::write_dir`: a symlinked `dir` keeps its link).
pub fn save(dir: &Path, source: &Path, params: &[(String, Tensor)], opt: Option<&Optimizer>, state: Option<&TrainerState>) -> Result<()> {
    crate::io::output::write_dir(dir, |tmp| {
        // CLIP's own tensors form the HF model file; SmartCLIP's mask network goes beside it
        let t = |mask: bool| -> Vec<(String, Vec<usize>, Vec<u8>)> {
            params.iter().filter(|(n, _)| n.starts_with("mask_net.") == mask).map(|(n, t)| (n.clone(), t.shape().to_vec(), f32_bytes(&t.f32_data()))).collect()
        };
        write_tensors(&tmp.join("model.safetensors"), &t(false))?;
        let mask = t(true);
        if !mask.is_empty() {
            write_tensors(&tmp.join(super::smartclip::MASK_FILE), &mask)?;
        }
        for f in MODEL_FILES {
            let p = source.join(f);
            if p.is_file() {
                std::fs::copy(&p, tmp.join(f)).map_err(|e| Error::file(&p, format!("cannot copy: {e}")))?;
            }
        }
        if let Some(o) = opt {
            let mut t = vec![];
            for p in &o.params {
                t.push((format!("exp_avg.{}", p.name), p.shape.clone(), f32_bytes(&p.m)));
                t.push((format!("exp_avg_sq.{}", p.name), p.shape.clone(), f32_bytes(&p.v)));
            }
            t.push(("step".to_string(), vec![1], f32_bytes(&[o.step as f32])));
            write_tensors(&tmp.join("optimizer.safetensors"), &t)?;
        }
        if let Some(s) = state {
            let text = serde_json::to_string_pretty(s).map_err(Error::msg)?;
            let p = tmp.join("trainer_state.json");
            std::fs::write(&p, text).map_err(|e| Error::file(&p, format!("cannot write: {e}")))?;
        }
        Ok(())
    })?;
    Ok(())
}

/// Reads a checkpoint's optimizer moments into `opt` (same parameter names and shapes) and its
/// trainer state.
pub fn load_state(dir: &Path, opt: &mut Optimizer) -> Result<TrainerState> {
    let sp = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&sp).map_err(|e| Error::file(&sp, format!("cannot read: {e}")))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| Error::file(&sp, format!("not a trainer state: {e}")))?;
    let op = dir.join("optimizer.safetensors");
    let bytes = std::fs::read(&op).map_err(|e| Error::file(&op, format!("cannot read: {e}")))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::file(&op, format!("not a valid safetensors file: {e}")))?;
    let get = |name: &str, n: usize| -> Result<Vec<f32>> {
        let t = st.tensor(name).map_err(|_| Error::file(&op, format!("missing {name}")))?;
        if t.dtype() != Dtype::F32 || t.data().len() != 4 * n {
            return Err(Error::file(&op, format!("{name}: expected {n} f32 values")));
        }
        Ok(t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
    };
    for p in opt.params.iter_mut() {
        p.m = get(&format!("exp_avg.{}", p.name), p.m.len())?;
        p.v = get(&format!("exp_avg_sq.{}", p.name), p.v.len())?;
    }
    opt.step = get("step", 1)?[0] as u32;
    Ok(state)
}

/// Repairs what a crash inside [`save`] left under `parent` (`io::output::recover_dirs`): a
/// checkpoint moved aside is put back, a half-written one of a process that died is removed.
pub fn recover(parent: &Path) {
    crate::io::output::recover_dirs(parent)
}

/// The checkpoint with the highest step under `out/checkpoints`, if any (after [`recover`]).
pub fn latest(out: &Path) -> Option<PathBuf> {
    let dir = out.join("checkpoints");
    recover(&dir);
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            let step: usize = n.strip_prefix("step-")?.parse().ok()?;
            e.path().join("trainer_state.json").is_file().then_some((step, e.path()))
        })
        .max_by_key(|(s, _)| *s)
        .map(|(_, p)| p)
}

/// Checks that checkpoint `dir` holds the architecture of `model` (their config.json), so that a
/// resume with another --model says so instead of failing later on a mismatched file.
pub fn check_model(dir: &Path, model: &Path) -> Result<()> {
    let (ck, m) = (dir.join("config.json"), model.join("config.json"));
    if !ck.is_file() {
        return Err(Error::file(dir, "not a checkpoint (no config.json)"));
    }
    let (a, b) = (ClipConfig::from_file(&ck)?, ClipConfig::from_file(&m)?);
    if a != b {
        return Err(Error::file(
            dir,
            format!(
                "checkpoint and model differ: the checkpoint is {}, --model {} is {} (resume with the --model the run started from)",
                describe(&a),
                model.display(),
                describe(&b)
            ),
        ));
    }
    Ok(())
}

fn describe(c: &ClipConfig) -> String {
    let (v, t) = (&c.vision, &c.text);
    format!(
        "{}px images in {}px patches, {}×{} vision and {}×{} text layers, {} text positions, {}-d embeddings",
        v.image_size, v.patch_size, v.tower.layers, v.tower.hidden, t.tower.layers, t.tower.hidden, t.max_positions, c.projection_dim
    )
}

/// The checkpoint `--resume NAME` means: the directory NAME, else NAME (e.g. `step-000100`, or
/// just `100`) under `out/checkpoints`.
pub fn find(out: &Path, name: &Path) -> Result<PathBuf> {
    let under = out.join("checkpoints");
    let numbered = name.to_str().and_then(|n| n.parse::<usize>().ok()).map(|n| under.join(format!("step-{n:06}")));
    let found = [Some(name.to_path_buf()), Some(under.join(name)), numbered].into_iter().flatten().find(|p| p.is_dir());
    found.ok_or_else(|| Error::file(name, format!("no such checkpoint (looked for it as given and under {})", under.display())))
}

/// Before a run that does not resume: an `out` that already holds checkpoints is an error (they
/// would be overwritten step by step and `--resume` would mix the runs) unless `force`, which
/// removes them. Returns what was removed.
pub fn start_over(out: &Path, force: bool) -> Result<usize> {
    let under = out.join("checkpoints");
    let Some(last) = latest(out) else { return Ok(0) };
    if !force {
        let name = last.file_name().unwrap_or_default().to_string_lossy().into_owned();
        return Err(Error::file(
            out,
            format!("already holds a run (checkpoints up to {name}): continue it with --resume, or start over with --force (removes its checkpoints)"),
        ));
    }
    let n = std::fs::read_dir(&under).map(|d| d.count()).unwrap_or(0);
    std::fs::remove_dir_all(&under).map_err(|e| Error::file(&under, format!("cannot remove: {e}")))?;
    Ok(n)
}
