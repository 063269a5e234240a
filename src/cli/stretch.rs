//! `clipforge stretch`: Long-CLIP's knowledge-preserved positional stretching of a model directory
//! (src/model/stretch.rs), written as a new HF directory.
use clipforge::error::{Error, Result};
use clipforge::model::stretch::stretch_model;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct StretchArgs {
    /// HF CLIP model directory (77 text positions for OpenAI CLIP), or OpenAI's released .pt checkpoint
    #[arg(long)]
    pub model: PathBuf,
    /// Output directory (a new HF model directory; must not exist or be empty unless --force)
    #[arg(long)]
    pub out: PathBuf,
    /// Leading positions copied unchanged (and kept frozen when fine-tuning)
    #[arg(long, default_value_t = 20)]
    pub keep: usize,
    /// Interpolation factor for the positions after `keep`
    #[arg(long, default_value_t = 4)]
    pub ratio: usize,
    /// Replace an existing non-empty output directory
    #[arg(long)]
    pub force: bool,
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: &StretchArgs) -> Result<()> {
    let r = if clipforge::io::pt::is_pt_file(&a.model) {
        // converted beside the output first (that copy removed after)
        let c = clipforge::model::convert::convert_pt(&a.model)?;
        if c.config.text.frozen_positions > 0 {
            return Err(Error::file(&a.model, format!("already stretched ({} positions, the first {} frozen): a Long-CLIP checkpoint; stretch the original model", c.config.text.max_positions, c.config.text.frozen_positions)));
        }
        let name = a.out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = a.out.with_file_name(format!(".{name}.pt-source-{}", std::process::id()));
        let r = c.write(&tmp, true).and_then(|_| stretch_model(&tmp, &a.out, a.keep, a.ratio, a.force));
        let _ = std::fs::remove_dir_all(&tmp);
        r?
    } else {
        stretch_model(&a.model, &a.out, a.keep, a.ratio, a.force)?
    };
    if a.json {
        println!("{}", serde_json::to_string(&r).map_err(Error::msg)?);
    } else {
        println!(
            "{}: {} → {} text positions (rows < {} copied and frozen for fine-tuning, ×{} interpolation, last row extrapolated), {} tensors",
            r.out.display(), r.old_len, r.new_len, r.keep, r.ratio, r.tensors
        );
    }
    Ok(())
}
