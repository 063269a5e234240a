//! Prompt templates for zero-shot classification: `{}` is replaced by the class name. The 80
//! ImageNet templates of the CLIP paper (as OpenAI's notebook and open_clip list them) and the
//! short "simple" set; a file gives one template per line.
use crate::error::{Error, Result};
use std::path::Path;

/// The CLIP paper's 80 ImageNet prompt templates.
pub const IMAGENET: [&str; 80] = [
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
];

/// open_clip's short template set.
pub const SIMPLE: [&str; 7] = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
];

/// `imagenet`, `simple`, or a file with one template per line (each containing `{}`).
pub fn load(spec: &str) -> Result<Vec<String>> {
    match spec {
        "imagenet" => Ok(IMAGENET.iter().map(|s| s.to_string()).collect()),
        "simple" => Ok(SIMPLE.iter().map(|s| s.to_string()).collect()),
        path => {
            let p = Path::new(path);
            let text = std::fs::read_to_string(p).map_err(|e| Error::file(p, format!("cannot read templates (or use imagenet / simple): {e}")))?;
            let t: Vec<String> = text.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect();
            if t.is_empty() {
                return Err(Error::file(p, "no templates"));
            }
            if let Some((i, _)) = t.iter().enumerate().find(|(_, l)| !l.contains("{}")) {
                return Err(Error::file(p, format!("template on line {} has no {{}} for the class name", i + 1)));
            }
            Ok(t)
        }
    }
}

/// The prompts of one class.
pub fn prompts(templates: &[String], class: &str) -> Vec<String> {
    templates.iter().map(|t| t.replacen("{}", class, 1)).collect()
}
