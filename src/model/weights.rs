//! Named weights: safetensors files (single or sharded with model.safetensors.index.json),
//! memory-mapped and used in place, or tensors made in memory (synthetic models).
//! Every lookup failure names the file and the tensor.
use crate::error::{Error, Result};
use crate::tensor::{DType, Storage, Tensor};
use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

enum Entry {
    /// A tensor inside mapped file `file`: dtype, shape, absolute byte start.
    Mapped {
        file: usize,
        dtype: DType,
        shape: Vec<usize>,
        start: usize,
    },
    /// A tensor whose dtype clipforge cannot read (kept so the error can say so).
    Unsupported {
        file: usize,
        dtype: String,
    },
    Owned(Tensor),
}

pub struct Weights {
    files: Vec<(PathBuf, Arc<Mmap>)>,
    entries: HashMap<String, Entry>,
    /// Where the weights came from, for error messages.
    origin: PathBuf,
}

impl Weights {
    /// Tensors made in memory (no file behind them).
    pub fn from_tensors(tensors: HashMap<String, Tensor>, origin: &str) -> Weights {
        Weights { files: vec![], entries: tensors.into_iter().map(|(k, v)| (k, Entry::Owned(v))).collect(), origin: origin.into() }
    }

    /// Opens a model directory (model.safetensors, or the shards listed in
    /// model.safetensors.index.json) or a single .safetensors file. A sharded model must agree
    /// with its index: every shard listed is there, every tensor is in the shard the index names,
    /// and no tensor is in two shards (an error naming both files, never one silently kept).
    pub fn open(path: &Path) -> Result<Weights> {
        let (files, index) = if path.is_dir() { model_files(path)? } else { (vec![path.to_path_buf()], None) };
        let mut w = Weights { files: vec![], entries: HashMap::new(), origin: path.to_path_buf() };
        for f in files {
            w.add_file(&f)?;
        }
        if let Some((index, map)) = index {
            w.check_index(&index, &map)?;
        }
        Ok(w)
    }

    /// Every tensor the index lists is in the shard it names.
    fn check_index(&self, index: &Path, map: &[(String, String)]) -> Result<()> {
        for (name, shard) in map {
            let at = match self.entries.get(name) {
                Some(Entry::Mapped { file, .. } | Entry::Unsupported { file, .. }) => Some(&self.files[*file].0),
                _ => None,
            };
            match at {
                Some(p) if p.file_name().is_some_and(|n| n == shard.as_str()) => {}
                Some(p) => return Err(Error::file(index, format!("lists tensor \"{name}\" in {shard}, but it is in {}", p.display()))),
                None => return Err(Error::file(index, format!("lists tensor \"{name}\" in {shard}, which does not hold it"))),
            }
        }
        Ok(())
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        let file = std::fs::File::open(path).map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
        // SAFETY: the file is mapped read-only; clipforge never writes to it while mapped. A
        // concurrent writer from outside could change the bytes under us, as with any mmap reader.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::file(path, format!("cannot map: {e}")))?;
        let (header, meta) = SafeTensors::read_metadata(&map).map_err(|e| Error::file(path, format!("not a valid safetensors file: {e}")))?;
        let base = 8 + header;
        let idx = self.files.len();
        for (name, info) in meta.tensors() {
            let dtype = match info.dtype {
                StDtype::F32 => Some(DType::F32),
                StDtype::F16 => Some(DType::F16),
                StDtype::BF16 => Some(DType::BF16),
                _ => None,
            };
            let entry = match dtype {
                Some(dtype) => Entry::Mapped { file: idx, dtype, shape: info.shape.clone(), start: base + info.data_offsets.0 },
                None => Entry::Unsupported { file: idx, dtype: format!("{:?}", info.dtype) },
            };
            if let Some(Entry::Mapped { file, .. } | Entry::Unsupported { file, .. }) = self.entries.get(&name) {
                let other = &self.files[*file].0;
                return Err(Error::file(path, format!("tensor \"{name}\" is also in {}: a tensor must be in one shard only", other.display())));
            }
            self.entries.insert(name, entry);
        }
        self.files.push((path.to_path_buf(), Arc::new(map)));
        Ok(())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.entries.keys().map(|s| s.as_str()).collect();
        v.sort();
        v
    }

    fn file_of(&self, name: &str) -> &Path {
        match self.entries.get(name) {
            Some(Entry::Mapped { file, .. } | Entry::Unsupported { file, .. }) => &self.files[*file].0,
            _ => &self.origin,
        }
    }

    /// The tensor `name` in its stored dtype (mapped, not copied).
    pub fn get(&self, name: &str) -> Result<Tensor> {
        match self.entries.get(name) {
            None => Err(Error::file(&self.origin, format!("missing tensor \"{name}\""))),
            Some(Entry::Owned(t)) => Ok(t.clone()),
            Some(Entry::Unsupported { file, dtype }) => {
                Err(Error::file(&self.files[*file].0, format!("tensor \"{name}\" has dtype {dtype}; clipforge reads F32, F16 and BF16")))
            }
            Some(Entry::Mapped { file, dtype, shape, start }) => {
                let len = shape.iter().product();
                let storage = Storage::Mapped { map: self.files[*file].1.clone(), start: *start, len, dtype: *dtype };
                Tensor::from_storage(storage, shape).map_err(|e| Error::file(&self.files[*file].0, e))
            }
        }
    }

    /// The tensor `name`, which must have shape `shape` (what the config implies).
    pub fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.get(name)?;
        if t.shape() != shape {
            return Err(Error::file(self.file_of(name), format!("tensor \"{name}\" has shape {:?} but config.json implies {:?}", t.shape(), shape)));
        }
        Ok(t)
    }

    /// Total bytes of all readable tensors.
    pub fn total_bytes(&self) -> usize {
        self.entries
            .values()
            .map(|e| match e {
                Entry::Mapped { dtype, shape, .. } => dtype.size() * shape.iter().product::<usize>(),
                Entry::Owned(t) => t.dtype().size() * t.numel(),
                Entry::Unsupported { .. } => 0,
            })
            .sum()
    }
}

/// The safetensors files of a model directory: model.safetensors, or else the shards
/// model.safetensors.index.json lists (with its path and its (tensor, shard) pairs), each checked
/// to be a plain file name inside the directory that exists.
pub fn model_files(dir: &Path) -> Result<ModelFiles> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.exists() {
        return Ok((vec![single], None));
    }
    if !index.exists() {
        return Err(Error::file(dir, "no model.safetensors or model.safetensors.index.json in this directory"));
    }
    let bytes = std::fs::read(&index).map_err(|e| Error::file(&index, format!("cannot read: {e}")))?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| Error::file(&index, format!("not valid JSON: {e}")))?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::file(&index, "no \"weight_map\" object"))?;
    let mut pairs = Vec::with_capacity(map.len());
    let mut files: Vec<String> = Vec::new();
    for (name, f) in map {
        let f = f.as_str().ok_or_else(|| Error::file(&index, format!("weight_map[\"{name}\"] must be a file name, got {f}")))?;
        if f.is_empty() || f.contains(['/', '\\']) || f == "." || f == ".." {
            return Err(Error::file(&index, format!("shard name \"{f}\" must be a plain file name in this directory")));
        }
        if !files.iter().any(|x| x == f) {
            files.push(f.to_string());
        }
        pairs.push((name.clone(), f.to_string()));
    }
    if files.is_empty() {
        return Err(Error::file(&index, "\"weight_map\" lists no tensors"));
    }
    files.sort();
    let files: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
    if let Some(missing) = files.iter().find(|f| !f.is_file()) {
        return Err(Error::file(missing, format!("missing: {} lists it as a shard", index.display())));
    }
    Ok((files, Some((index, pairs))))
}

/// [`model_files`]: the files, and for a sharded model the index with its (tensor, shard) pairs.
pub type ModelFiles = (Vec<PathBuf>, Option<(PathBuf, Vec<(String, String)>)>);
