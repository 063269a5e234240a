//! Released PyTorch CLIP checkpoints → clipforge's model (HF `CLIPModel` names and config):
//! OpenAI's TorchScript archives (ViT-B/32, B/16, L/14, L/14@336), Long-CLIP's state dicts
//! (OpenAI names plus `positional_embedding_res`, 248 positions) and SmartCLIP's (those plus the
//! mask network). The `.pt` is read by `io::pt`; this file maps names and derives the config:
//!
//! - `visual.conv1` → patch embedding, `class_embedding`, position tables, `ln_pre` →
//!   `pre_layrnorm` (HF's spelling), `ln_post`, `ln_final`; each residual block's
//!   `attn.in_proj_{weight,bias}` [3W, W] split into q/k/v, `out_proj`, `ln_1/2`,
//!   `mlp.c_fc/c_proj` → `fc1/fc2`; `visual.proj` and `text_projection` [W, D] transposed to HF's
//!   [D, W] Linear weights; `logit_scale` as is.
//! - The config from the shapes as OpenAI's `build_model` derives it: widths, layers (count of
//!   resblocks), heads = width / 64, patch size, image size = patch · √(positions − 1), vocab,
//!   context length, projection size, QuickGELU.
//! - Long-CLIP: its text tower adds `positional_embedding ⊙ mask1 + positional_embedding_res ⊙
//!   mask2` with mask1 = rows < 20, mask2 = the rest (LC `model_longclip.py`), so the one
//!   effective table is rows 0..20 of the first and rows 20.. of the second; the 20 rows are
//!   recorded as `clipforge_frozen_positions`, as `clipforge stretch` does, so fine-tuning keeps
//!   them fixed.
//! - SmartCLIP: `mask_net.*` tensors → `mask_net.safetensors` in `train::smartclip`'s layout (see
//!   `map_mask_net`; SmartCLIP's own code could not be read, so the accepted layout is
//!   documented there and anything else is refused by name).
//!
//! Tensors a checkpoint holds besides these (TorchScript's `input_resolution`, `context_length`,
//! `vocab_size`, `attn_mask`) are listed as ignored.
use super::config::{Activation, ClipConfig, TextConfig, TowerConfig, VisionConfig};
use super::schema::{names, BlockParam, Schema, Tower};
use super::Weights;
use crate::error::{Error, Result};
use crate::io::pt::{read_pt, PtKind};
use crate::tensor::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Long-CLIP's kept (frozen) leading text positions: its mask1 covers rows 0..20.
pub const LONGCLIP_KEEP: usize = 20;

/// Which released model family a checkpoint is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Flavour {
    /// OpenAI CLIP (77 positions).
    OpenAi,
    /// Long-CLIP (`positional_embedding_res`).
    LongClip,
    /// SmartCLIP (Long-CLIP's tables plus `mask_net.*`).
    SmartClip,
}

/// A checkpoint converted in memory.
pub struct Converted {
    pub source: PathBuf,
    pub kind: PtKind,
    pub flavour: Flavour,
    pub config: ClipConfig,
    /// Every CLIP parameter under its HF name, in the schema's order, f32.
    pub tensors: Vec<(String, Tensor)>,
    /// SmartCLIP's mask network under `mask_net.` names ([`crate::train::smartclip::mask_param_shapes`] order).
    pub mask_net: Option<Vec<(String, Tensor)>>,
    /// Tensors of the file that are not parameters of the model (sorted).
    pub ignored: Vec<String>,
}

/// What `convert` wrote.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ConvertReport {
    pub out: PathBuf,
    pub kind: PtKind,
    pub flavour: Flavour,
    pub tensors: usize,
    pub mask_net: bool,
    pub text_positions: usize,
    pub frozen_positions: usize,
    pub image_size: usize,
    pub ignored: Vec<String>,
}

/// The tensors of a checkpoint by OpenAI name; taking one removes it, so what is left is ignored.
struct Source<'a> {
    path: &'a Path,
    t: HashMap<String, Tensor>,
}

impl Source<'_> {
    fn take(&mut self, name: &str) -> Result<Tensor> {
        self.t.remove(name).ok_or_else(|| Error::file(self.path, format!("missing tensor \"{name}\" (not an OpenAI-style CLIP ViT checkpoint)")))
    }
    fn shape(&self, name: &str) -> Result<Vec<usize>> {
        self.t
            .get(name)
            .map(|t| t.shape().to_vec())
            .ok_or_else(|| Error::file(self.path, format!("missing tensor \"{name}\" (not an OpenAI-style CLIP ViT checkpoint)")))
    }
    fn dim(&self, name: &str, rank: usize, i: usize) -> Result<usize> {
        let s = self.shape(name)?;
        if s.len() != rank {
            return Err(Error::file(self.path, format!("tensor \"{name}\" has shape {s:?}, expected rank {rank}")));
        }
        Ok(s[i])
    }
    /// Blocks `prefix0.`, `prefix1.`, … that exist.
    fn layers(&self, prefix: &str) -> usize {
        (0..).take_while(|i| self.t.contains_key(&format!("{prefix}{i}.ln_1.weight"))).count()
    }
}

/// Reads and converts the checkpoint `path` (see the module docs).
pub fn convert_pt(path: &Path) -> Result<Converted> {
    let ck = read_pt(path)?;
    let mut src = Source { path, t: ck.tensors };
    if src.t.keys().any(|k| k.starts_with("visual.layer1.") || k.starts_with("visual.attnpool.")) {
        return Err(Error::file(path, "a ResNet CLIP (RN50, RN101, …): clipforge runs the ViT models only"));
    }
    let config = derive_config(&src)?;
    let schema = Schema::clip(&config);
    let long = src.t.contains_key("positional_embedding_res");
    let mut tensors = vec![];
    for p in schema.params() {
        let t = match p.block {
            Some((layer, bp)) => {
                let pre = if p.tower == Tower::Vision { format!("visual.transformer.resblocks.{layer}.") } else { format!("transformer.resblocks.{layer}.") };
                block_tensor(&mut src, &pre, bp)?
            }
            None => head_tensor(&mut src, &p.name)?,
        };
        if t.shape() != p.shape.as_slice() {
            return Err(Error::file(path, format!("{} would have shape {:?}; the other tensors imply {:?}", p.name, t.shape(), p.shape)));
        }
        tensors.push((p.name.clone(), t));
    }
    let mask_keys: Vec<String> = src.t.keys().filter(|k| k.starts_with("mask_net.")).cloned().collect();
    let mask_net = if mask_keys.is_empty() { None } else { Some(map_mask_net(&mut src, &config)?) };
    let mut ignored: Vec<String> = src.t.into_keys().collect();
    ignored.sort();
    let flavour = match (mask_net.is_some(), long) {
        (true, _) => Flavour::SmartClip,
        (false, true) => Flavour::LongClip,
        _ => Flavour::OpenAi,
    };
    Ok(Converted { source: path.to_path_buf(), kind: ck.kind, flavour, config, tensors, mask_net, ignored })
}

/// The config OpenAI's `build_model` derives from the shapes.
fn derive_config(s: &Source) -> Result<ClipConfig> {
    let err = |m: String| Error::file(s.path, m);
    let vw = s.dim("visual.class_embedding", 1, 0)?;
    let patch = s.dim("visual.conv1.weight", 4, 2)?;
    let channels = s.dim("visual.conv1.weight", 4, 1)?;
    let vpos = s.dim("visual.positional_embedding", 2, 0)?;
    let grid = (1..=vpos).find(|g| g * g + 1 >= vpos).unwrap_or(0);
    if grid * grid + 1 != vpos {
        return Err(err(format!("visual.positional_embedding has {vpos} rows, not a square grid plus the class token")));
    }
    let tw = s.dim("ln_final.weight", 1, 0)?;
    let d = s.dim("text_projection", 2, 1)?;
    let vd = s.dim("visual.proj", 2, 1)?;
    if vd != d {
        return Err(err(format!("visual.proj projects to {vd} and text_projection to {d}: the embedding sizes differ")));
    }
    let tower = |w: usize, prefix: &str, what: &str| -> Result<TowerConfig> {
        let layers = s.layers(prefix);
        if layers == 0 {
            return Err(err(format!("no {what} blocks (missing tensor \"{prefix}0.ln_1.weight\")")));
        }
        if !w.is_multiple_of(64) {
            return Err(err(format!("{what} width {w} is not a multiple of 64 (OpenAI CLIP's head size)")));
        }
        let inter = s.dim(&format!("{prefix}0.mlp.c_fc.weight"), 2, 0)?;
        Ok(TowerConfig { hidden: w, intermediate: inter, heads: w / 64, layers, eps: 1e-5, act: Activation::QuickGelu })
    };
    let positions = s.dim("positional_embedding", 2, 0)?;
    let long = s.t.contains_key("positional_embedding_res");
    if long && positions <= LONGCLIP_KEEP {
        return Err(err(format!("positional_embedding has {positions} rows; Long-CLIP keeps the first {LONGCLIP_KEEP}")));
    }
    Ok(ClipConfig {
        vision: VisionConfig { tower: tower(vw, "visual.transformer.resblocks.", "vision")?, image_size: grid * patch, patch_size: patch, channels },
        text: TextConfig {
            tower: tower(tw, "transformer.resblocks.", "text")?,
            vocab: s.dim("token_embedding.weight", 2, 0)?,
            max_positions: positions,
            frozen_positions: if long { LONGCLIP_KEEP } else { 0 },
            eos_token_id: 49407,
            bos_token_id: 49406,
        },
        projection_dim: d,
        logit_scale_init: 2.6592,
    })
}

/// One of the 16 HF block tensors from the OpenAI block under `pre`.
fn block_tensor(s: &mut Source, pre: &str, p: BlockParam) -> Result<Tensor> {
    use BlockParam::*;
    let qkv = |s: &mut Source, name: &str, part: usize| -> Result<Tensor> {
        let full = format!("{pre}attn.{name}");
        let t = s.t.get(&full).cloned().ok_or_else(|| Error::file(s.path, format!("missing tensor \"{full}\"")))?;
        let w = t.dim(0) / 3;
        if t.dim(0) != 3 * w || w == 0 {
            return Err(Error::file(s.path, format!("tensor \"{full}\" has shape {:?}, expected [3·W, …]", t.shape())));
        }
        if part == 2 {
            s.t.remove(&full);
        }
        Ok(t.narrow(0, part * w, w)?.contiguous()) // [W, W] or [W]
    };
    let name = match p {
        QWeight => return qkv(s, "in_proj_weight", 0),
        KWeight => return qkv(s, "in_proj_weight", 1),
        VWeight => return qkv(s, "in_proj_weight", 2),
        QBias => return qkv(s, "in_proj_bias", 0),
        KBias => return qkv(s, "in_proj_bias", 1),
        VBias => return qkv(s, "in_proj_bias", 2),
        Ln1Weight => "ln_1.weight",
        Ln1Bias => "ln_1.bias",
        OutWeight => "attn.out_proj.weight",
        OutBias => "attn.out_proj.bias",
        Ln2Weight => "ln_2.weight",
        Ln2Bias => "ln_2.bias",
        Fc1Weight => "mlp.c_fc.weight",
        Fc1Bias => "mlp.c_fc.bias",
        Fc2Weight => "mlp.c_proj.weight",
        Fc2Bias => "mlp.c_proj.bias",
    };
    s.take(&format!("{pre}{name}"))
}

/// A tensor outside the blocks, by its HF name.
fn head_tensor(s: &mut Source, hf: &str) -> Result<Tensor> {
    let ln = |s: &mut Source, openai: &str| s.take(&format!("{openai}{}", &hf[hf.rfind('.').unwrap_or(0)..]));
    match hf {
        names::CLASS_EMBEDDING => s.take("visual.class_embedding"),
        names::PATCH_EMBEDDING => s.take("visual.conv1.weight"),
        names::VISION_POSITIONS => s.take("visual.positional_embedding"),
        names::VISUAL_PROJECTION => Ok(s.take("visual.proj")?.transpose(0, 1)?.contiguous()), // [D, W]
        names::TOKEN_EMBEDDING => s.take("token_embedding.weight"),
        names::TEXT_POSITIONS => {
            let p = s.take("positional_embedding")?; // [L, W]
            match s.t.remove("positional_embedding_res") {
                None => Ok(p),
                Some(res) if res.shape() == p.shape() => {
                    // Long-CLIP: rows < 20 of the frozen table, the rest of the trained one
                    let l = p.dim(0);
                    Ok(Tensor::cat(&[&p.narrow(0, 0, LONGCLIP_KEEP)?, &res.narrow(0, LONGCLIP_KEEP, l - LONGCLIP_KEEP)?], 0)?)
                    // [L, W]
                }
                Some(res) => Err(Error::file(s.path, format!("positional_embedding_res has shape {:?}, positional_embedding {:?}", res.shape(), p.shape()))),
            }
        }
        names::TEXT_PROJECTION => Ok(s.take("text_projection")?.transpose(0, 1)?.contiguous()), // [D, W]
        names::LOGIT_SCALE => {
            let t = s.take("logit_scale")?;
            if t.numel() != 1 {
                return Err(Error::file(s.path, format!("logit_scale has shape {:?}, expected a scalar", t.shape())));
            }
            t.reshape(&[])
        }
        n if n.starts_with(names::PRE_LN) => ln(s, "visual.ln_pre"),
        n if n.starts_with(names::POST_LN) => ln(s, "visual.ln_post"),
        n if n.starts_with(names::FINAL_LN) => ln(s, "ln_final"),
        n => Err(Error::msg(format!("convert: no OpenAI name for {n}"))),
    }
}

/// SmartCLIP's mask network → clipforge's (`train::smartclip`). Accepted layout, under `mask_net.`:
/// one OpenAI residual block as `resblocks.0.` or `block.` (`ln_1`, `attn.in_proj_*`,
/// `attn.out_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`: split and renamed as the towers' blocks),
/// and clipforge's own attention pooling and projection names (`pool.query`, `pool.k.*`,
/// `pool.v.*`, `proj.*`). A tensor outside this layout, or a second block, is refused by name.
fn map_mask_net(s: &mut Source, c: &ClipConfig) -> Result<Vec<(String, Tensor)>> {
    let pre = if s.t.contains_key("mask_net.resblocks.0.ln_1.weight") { "mask_net.resblocks.0." } else { "mask_net.block." };
    if s.t.contains_key("mask_net.resblocks.1.ln_1.weight") {
        return Err(Error::file(s.path, "mask_net has more than one residual block; clipforge's SmartCLIP mask network has one"));
    }
    let t = &c.text.tower;
    let shapes = crate::train::smartclip::mask_param_shapes(t.hidden, t.intermediate, c.projection_dim);
    let mut out = vec![];
    for (bp, (name, shape)) in BlockParam::ALL.iter().zip(&shapes) {
        out.push((name.clone(), block_tensor(s, pre, *bp).map_err(|e| e.context("SmartCLIP mask network"))?, shape.clone()));
    }
    for (name, shape) in &shapes[BlockParam::ALL.len()..] {
        let t = s.take(name).map_err(|e| e.context("SmartCLIP mask network"))?;
        out.push((name.clone(), t, shape.clone()));
    }
    if let Some(k) = s.t.keys().filter(|k| k.starts_with("mask_net.")).min() {
        return Err(Error::file(s.path, format!("SmartCLIP mask network tensor \"{k}\" has no place in clipforge's mask network (one block, attention pooling, projection; see src/model/convert.rs)")));
    }
    out.into_iter()
        .map(|(n, t, shape)| {
            if t.shape() != shape.as_slice() {
                return Err(Error::file(
                    s.path,
                    format!(
                        "SmartCLIP mask network tensor {n} has shape {:?}, expected {shape:?} for text width {} and {}-d embeddings",
                        t.shape(),
                        c.text.tower.hidden,
                        c.projection_dim
                    ),
                ));
            }
            Ok((n, t))
        })
        .collect()
}

impl Converted {
    /// The CLIP parameters as [`Weights`] (for [`crate::ClipModel`] and the trainer).
    pub fn weights(&self) -> Weights {
        Weights::from_tensors(self.tensors.iter().cloned().collect(), &self.source.display().to_string())
    }

    /// Writes the HF model directory `out` (config.json, model.safetensors, tokenizer.json,
    /// tokenizer_config.json, preprocessor_config.json, and mask_net.safetensors for SmartCLIP),
    /// whole or not at all; `force` replaces an existing non-empty `out`.
    pub fn write(&self, out: &Path, force: bool) -> Result<ConvertReport> {
        if out.exists() && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(true) && !force {
            return Err(Error::file(out, "exists and is not empty (use --force to replace it)"));
        }
        crate::io::output::write_dir(out, |tmp| self.fill(tmp))?;
        let (v, t) = (&self.config.vision, &self.config.text);
        Ok(ConvertReport {
            out: out.to_path_buf(),
            kind: self.kind,
            flavour: self.flavour,
            tensors: self.tensors.len(),
            mask_net: self.mask_net.is_some(),
            text_positions: t.max_positions,
            frozen_positions: t.frozen_positions,
            image_size: v.image_size,
            ignored: self.ignored.clone(),
        })
    }

    fn fill(&self, dir: &Path) -> Result<()> {
        use crate::train::checkpoint::write_tensors;
        let bytes = |ts: &[(String, Tensor)]| -> Vec<(String, Vec<usize>, Vec<u8>)> {
            ts.iter().map(|(n, t)| (n.clone(), t.shape().to_vec(), t.f32_data().iter().flat_map(|x| x.to_le_bytes()).collect())).collect()
        };
        write_tensors(&dir.join("model.safetensors"), &bytes(&self.tensors))?;
        if let Some(m) = &self.mask_net {
            write_tensors(&dir.join(crate::train::smartclip::MASK_FILE), &bytes(m))?;
        }
        let json = |name: &str, v: serde_json::Value| -> Result<()> {
            let p = dir.join(name);
            std::fs::write(&p, serde_json::to_string_pretty(&v).map_err(Error::msg)? + "\n").map_err(|e| Error::file(&p, format!("cannot write: {e}")))
        };
        json("config.json", self.config.to_json())?;
        let p = dir.join("tokenizer.json");
        std::fs::write(&p, crate::io::tokenizer::CLIP_TOKENIZER_JSON).map_err(|e| Error::file(&p, format!("cannot write: {e}")))?;
        json(
            "tokenizer_config.json",
            serde_json::json!({
                "tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                "model_max_length": self.config.text.max_positions, "do_lower_case": true,
            }),
        )?;
        let s = self.config.vision.image_size;
        json(
            "preprocessor_config.json",
            serde_json::json!({
                "image_processor_type": "CLIPImageProcessor", "do_convert_rgb": true, "do_resize": true,
                "size": {"shortest_edge": s}, "resample": 3, "do_center_crop": true,
                "crop_size": {"height": s, "width": s}, "do_rescale": true, "rescale_factor": 1.0 / 255.0,
                "do_normalize": true, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
            }),
        )
    }
}
