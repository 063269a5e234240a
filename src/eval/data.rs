//! Evaluation datasets: an ImageFolder tree (one subfolder per class, sorted; images sorted by
//! name) and retrieval JSONL ({"image": path relative to the file, "captions": [..]} or
//! {"image", "caption"}), or WebDataset tar shards: one image per sample key, its captions the
//! `.json`'s "captions" array or "caption" string, else the lines of its `.txt` (one caption per
//! non-empty line, as clip_benchmark writes retrieval sets).
use crate::error::{Error, Result};
use crate::io::image_source::ImageSource;
use std::path::{Path, PathBuf};

const IMAGE_EXT: [&str; 8] = ["png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff"];

/// Whether `p` names an image file by its extension (png, jpg, jpeg, webp, bmp, gif, tif, tiff).
pub fn is_image(p: &Path) -> bool {
    p.extension().map(|e| IMAGE_EXT.contains(&e.to_string_lossy().to_lowercase().as_str())).unwrap_or(false)
}

pub struct ImageFolder {
    /// Folder names, sorted.
    pub folders: Vec<String>,
    pub images: Vec<PathBuf>,
    pub labels: Vec<usize>,
}

pub fn image_folder(root: &Path) -> Result<ImageFolder> {
    let mut folders: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(|e| Error::file(root, format!("cannot list: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && !p.file_name().map(|n| n.to_string_lossy().starts_with('.')).unwrap_or(true))
        .collect();
    folders.sort();
    if folders.is_empty() {
        return Err(Error::file(root, "no class subfolders (expected ROOT/<class>/<image>)"));
    }
    let (mut images, mut labels) = (vec![], vec![]);
    for (c, f) in folders.iter().enumerate() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(f)
            .map_err(|e| Error::file(f, format!("cannot list: {e}")))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_image(p))
            .collect();
        files.sort();
        labels.extend(std::iter::repeat_n(c, files.len()));
        images.extend(files);
    }
    if images.is_empty() {
        return Err(Error::file(root, "no images in the class subfolders"));
    }
    Ok(ImageFolder { folders: folders.iter().map(|f| f.file_name().unwrap().to_string_lossy().to_string()).collect(), images, labels })
}

pub struct RetrievalSet {
    pub images: Vec<ImageSource>,
    pub texts: Vec<String>,
    /// The image of each text.
    pub owner: Vec<usize>,
}

pub fn retrieval_set(path: &Path) -> Result<RetrievalSet> {
    if crate::io::shards::is_shard_spec(&path.to_string_lossy()) {
        return retrieval_shards(&crate::io::shards::shard_list(&[path.to_string_lossy()])?);
    }
    let text = crate::io::text::read_utf8(path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut s = RetrievalSet { images: vec![], texts: vec![], owner: vec![] };
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::file(path, format!("line {}: not JSON: {e}", i + 1)))?;
        let img = v.get("image").and_then(|x| x.as_str()).ok_or_else(|| Error::file(path, format!("line {}: no \"image\" string", i + 1)))?;
        let caps: Vec<String> = match (v.get("captions"), v.get("caption")) {
            (Some(c), _) => c.as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect()).unwrap_or_default(),
            (None, Some(c)) => c.as_str().map(|s| vec![s.to_string()]).unwrap_or_default(),
            _ => vec![],
        };
        if caps.is_empty() {
            return Err(Error::file(path, format!("line {}: no \"captions\" array of strings or \"caption\" string", i + 1)));
        }
        let n = s.images.len();
        s.images.push(ImageSource::File(dir.join(img)));
        s.owner.extend(std::iter::repeat_n(n, caps.len()));
        s.texts.extend(caps);
    }
    if s.images.is_empty() {
        return Err(Error::file(path, "no samples"));
    }
    Ok(s)
}

/// A retrieval set from tar shards, shard after shard in tar order.
pub fn retrieval_shards(shards: &[PathBuf]) -> Result<RetrievalSet> {
    use crate::io::webdataset::{index_shard, no_image, read_json, read_text};
    let mut s = RetrievalSet { images: vec![], texts: vec![], owner: vec![] };
    for path in shards {
        let shard = index_shard(path)?;
        for smp in &shard.samples {
            let member = smp.image().ok_or_else(|| no_image(path, smp))?.clone();
            let json = smp.get("json").map(|m| read_json(path, m)).transpose()?;
            let strs = |v: &serde_json::Value| v.as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect::<Vec<_>>());
            let mut caps = match json.as_ref().map(|j| (j.get("captions"), j.get("caption"))) {
                Some((Some(c), _)) => strs(c).unwrap_or_default(),
                Some((None, Some(c))) => c.as_str().map(|c| vec![c.to_string()]).unwrap_or_default(),
                _ => vec![],
            };
            if caps.is_empty() {
                if let Some(m) = smp.get("txt") {
                    caps = read_text(path, m)?.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
                }
            }
            if caps.is_empty() {
                return Err(Error::file(path, format!("sample {:?} has no caption (a .txt member, or \"captions\" / \"caption\" in its .json)", smp.key)));
            }
            let n = s.images.len();
            s.images.push(ImageSource::Member { shard: shard.path.clone(), member });
            s.owner.extend(std::iter::repeat_n(n, caps.len()));
            s.texts.extend(caps);
        }
    }
    if s.images.is_empty() {
        return Err(Error::msg(format!("no samples in the {} shard(s)", shards.len())));
    }
    Ok(s)
}
