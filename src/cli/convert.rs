//! `clipforge convert`: a released PyTorch checkpoint (OpenAI's TorchScript CLIP archives,
//! Long-CLIP's and SmartCLIP's state dicts) → an HF CLIP model directory (src/model/convert.rs).
use clap::Args;
use clipforge::error::{Error, Result};
use clipforge::model::convert::convert_pt;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// The .pt checkpoint: OpenAI CLIP (ViT-B-32.pt, …), Long-CLIP (longclip-B.pt, …) or SmartCLIP
    #[arg(long)]
    pub from: PathBuf,
    /// Output HF model directory (config.json, model.safetensors, tokenizer.json, preprocessor_config.json; mask_net.safetensors for SmartCLIP); must not exist or be empty unless --force
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing non-empty output directory
    #[arg(long)]
    pub force: bool,
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: &ConvertArgs) -> Result<()> {
    if !a.from.is_file() {
        return Err(Error::file(&a.from, "not a file (expected a PyTorch .pt checkpoint)"));
    }
    let c = convert_pt(&a.from)?;
    let r = c.write(&a.out, a.force)?;
    if a.json {
        println!("{}", serde_json::to_string(&r).map_err(Error::msg)?);
    } else {
        let v = &c.config.vision;
        println!(
            "{}: {:?} {:?} → {} tensors; ViT {}px/{} ({}×{}), text {}×{} with {} positions{}{}",
            r.out.display(),
            r.flavour,
            r.kind,
            r.tensors,
            v.image_size,
            v.patch_size,
            v.tower.layers,
            v.tower.hidden,
            c.config.text.tower.layers,
            c.config.text.tower.hidden,
            r.text_positions,
            if r.frozen_positions > 0 { format!(" (rows < {} frozen for fine-tuning)", r.frozen_positions) } else { String::new() },
            if r.mask_net { "; SmartCLIP mask network in mask_net.safetensors" } else { "" },
        );
        if !r.ignored.is_empty() {
            eprintln!("note: not model parameters, left out: {}", r.ignored.join(", "));
        }
    }
    Ok(())
}
