//! `clipforge stretch`: Long-CLIP's knowledge-preserved positional stretching of a model directory
//! (src/model/stretch.rs), written as a new HF directory: by a ratio (Long-CLIP: keep 20, ×4,
//! 77 → 248) or to a context length (the smallest ratio that reaches it, the table cut there).
//! A `.pt` checkpoint is converted beside the output first.
use clap::Args;
use clipforge::error::{Error, Result};
use clipforge::model::stretch::{stretch_model_to, Target};
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
    /// Interpolation factor for the positions after `keep` (default 4: 77 → 248 with keep 20);
    /// the new length is ratio·L − (ratio−1)·keep
    #[arg(long, conflicts_with = "length")]
    pub ratio: Option<usize>,
    /// Target context length instead of a ratio: the smallest ratio that reaches it, the
    /// table then cut to exactly this many positions
    #[arg(long)]
    pub length: Option<usize>,
    /// Replace an existing non-empty output directory
    #[arg(long)]
    pub force: bool,
    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: &StretchArgs) -> Result<()> {
    let target = match (a.length, a.ratio) {
        (Some(len), _) => Target::Length(len),
        (None, r) => Target::Ratio(r.unwrap_or(4)),
    };
    let r = if clipforge::io::pt::is_pt_file(&a.model) {
        // converted beside the output first (that copy removed after)
        let c = clipforge::model::convert::convert_pt(&a.model)?;
        if c.config.text.frozen_positions > 0 {
            return Err(Error::file(
                &a.model,
                format!(
                    "already stretched ({} positions, the first {} frozen): a Long-CLIP checkpoint; stretch the original model",
                    c.config.text.max_positions, c.config.text.frozen_positions
                ),
            ));
        }
        let name = a.out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = a.out.with_file_name(format!(".{name}.pt-source-{}", std::process::id()));
        let r = c.write(&tmp, true).and_then(|_| stretch_model_to(&tmp, &a.out, a.keep, target, a.force));
        let _ = std::fs::remove_dir_all(&tmp);
        r?
    } else {
        stretch_model_to(&a.model, &a.out, a.keep, target, a.force)?
    };
    if a.json {
        println!("{}", serde_json::to_string(&r).map_err(Error::msg)?);
    } else {
        let full = r.ratio * r.old_len - (r.ratio - 1) * r.keep;
        let tail = if r.new_len < full { format!("cut at {} of {full}", r.new_len) } else { "last row extrapolated".into() };
        println!(
            "{}: {} → {} text positions (rows < {} copied and frozen for fine-tuning, ×{} interpolation, {tail}), {} tensors",
            r.out.display(),
            r.old_len,
            r.new_len,
            r.keep,
            r.ratio,
            r.tensors
        );
    }
    Ok(())
}
