//! PyTorch `.pt` checkpoints read without Python: the zip archive `torch.save` and
//! `torch.jit.save` write (`<top>/data.pkl`, the storages in `<top>/data/<key>`; the top folder's
//! name varies), its pickle read by the minimal unpickler of [`pickle`] (never executing
//! anything), and every tensor materialised as f32 (f32/f16/bf16/f64 storages, integer ones too),
//! whatever its storage offset and strides (several tensors may view one storage).
//!
//! A state dict (`torch.save(model.state_dict())`, possibly wrapped as `{"state_dict": …}` or with
//! DDP's `module.` prefix) gives its keys; a TorchScript module tree gives each tensor attribute's
//! dotted path (`visual.conv1.weight`), which for OpenAI's released CLIP archives are the
//! state-dict names.
pub mod pickle;

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use half::{bf16, f16};
use pickle::{StorageDtype, TensorRef, Value};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

/// What kind of file a checkpoint was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum PtKind {
    /// `torch.save` of a (state) dict.
    StateDict,
    /// `torch.jit.save` of a TorchScript module.
    TorchScript,
}

/// The tensors of a checkpoint, by name, as f32.
pub struct PtCheckpoint {
    pub kind: PtKind,
    pub tensors: HashMap<String, Tensor>,
}

/// Whether `path` names a `.pt`/`.pth`/`.bin`-style checkpoint file rather than a model directory:
/// a regular file ending in `.pt` or `.pth`.
pub fn is_pt_file(path: &Path) -> bool {
    path.is_file() && path.extension().is_some_and(|e| e == "pt" || e == "pth")
}

/// Reads every tensor of the checkpoint `path`.
pub fn read_pt(path: &Path) -> Result<PtCheckpoint> {
    let err = |m: String| Error::file(path, m);
    let file = std::fs::File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| err(format!("not a PyTorch zip checkpoint ({e}); a truncated download, or a pre-1.6 torch.save file (re-save it with a newer torch)")))?;
    let names: Vec<String> = zip
        .file_names()
        .map(|s| s.map(|n| n.into_owned()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| err(format!("unreadable zip entry name: {e}")))?;
    let pkl: Vec<&String> = names.iter().filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1).collect();
    let top = match pkl.as_slice() {
        [one] => one.trim_end_matches("data.pkl").to_string(),
        [] => return Err(err("no <folder>/data.pkl in the zip: not a PyTorch checkpoint".into())),
        _ => return Err(err(format!("{} data.pkl entries in the zip: not one PyTorch checkpoint", pkl.len()))),
    };
    if let Ok(mut f) = zip.by_name(&format!("{top}byteorder")) {
        let mut s = String::new();
        if f.read_to_string(&mut s).is_ok() && s.trim() != "little" {
            return Err(err(format!("byte order \"{}\" is not supported (little-endian only)", s.trim())));
        }
    }
    let torchscript = names.iter().any(|n| *n == format!("{top}constants.pkl") || n.starts_with(&format!("{top}code/")));
    let bytes = read_entry(&mut zip, &format!("{top}data.pkl"), MAX_PICKLE).map_err(err)?;
    if bytes.len() as u64 >= MAX_PICKLE {
        return Err(err(format!("{top}data.pkl is larger than {} MiB: not a checkpoint's pickle", MAX_PICKLE >> 20)));
    }
    let root = pickle::unpickle(&bytes, torchscript).map_err(|m| err(format!("{m} (not a PyTorch state dict)")))?;
    let mut found: Vec<(String, std::rc::Rc<TensorRef>)> = vec![];
    let kind = if torchscript { PtKind::TorchScript } else { PtKind::StateDict };
    let collected = collect(&root, "", &mut found, 0);
    pickle::dismantle(root); // a deep pickle is not dropped recursively
    collected.map_err(err)?;
    if found.is_empty() {
        return Err(err("holds no tensors".into()));
    }
    let found = unwrap_state_dict(found);
    // one storage read at a time; every tensor viewing it materialised from it
    let mut by_key: HashMap<String, Vec<(String, std::rc::Rc<TensorRef>)>> = HashMap::new();
    for (n, t) in found {
        by_key.entry(t.storage.key.clone()).or_default().push((n, t));
    }
    let mut keys: Vec<String> = by_key.keys().cloned().collect();
    keys.sort();
    let mut tensors = HashMap::new();
    for key in keys {
        let views = by_key.remove(&key).unwrap_or_default();
        let Some(s) = views.first().map(|(_, t)| t.storage.clone()) else { continue };
        let need = s.numel.checked_mul(s.dtype.size()).ok_or_else(|| err(format!("storage {key} is too large")))?;
        // no more than the pickle says is read: a compressed entry cannot inflate without bound
        let raw = read_entry(&mut zip, &format!("{top}data/{key}"), need as u64).map_err(err)?;
        if raw.len() < need {
            return Err(err(format!("storage data/{key} holds {} bytes, the pickle says {} ({} × {:?})", raw.len(), need, s.numel, s.dtype)));
        }
        let values = decode(&raw[..need], s.dtype);
        drop(raw);
        for (name, t) in views {
            if t.storage.dtype != s.dtype || t.storage.numel != s.numel {
                return Err(err(format!("storage {key} is read as both {:?}[{}] and {:?}[{}]", s.dtype, s.numel, t.storage.dtype, t.storage.numel)));
            }
            let data = materialise(&values, &t).map_err(|m| err(format!("tensor \"{name}\": {m}")))?;
            let tensor = Tensor::from_vec(data, &t.shape).map_err(|e| err(format!("tensor \"{name}\": {e}")))?;
            tensors.insert(name, tensor);
        }
    }
    Ok(PtCheckpoint { kind, tensors })
}

/// The largest `data.pkl` read (a CLIP checkpoint's is well under 1 MiB).
const MAX_PICKLE: u64 = 256 << 20;

/// The first `max` bytes of zip entry `name` (all of it if shorter). An entry of exactly `max`
/// bytes is read to its end, so that the zip reader checks its CRC.
fn read_entry<R: Read + std::io::Seek>(zip: &mut zip::ZipArchive<R>, name: &str, max: u64) -> std::result::Result<Vec<u8>, String> {
    let mut f = zip.by_name(name).map_err(|e| format!("zip entry {name}: {e}"))?;
    let mut v = Vec::with_capacity(f.size().min(max).min(1 << 26) as usize); // a claimed size is not trusted
    let bad = |e: std::io::Error| format!("zip entry {name} cannot be read ({e}): the file is truncated or corrupt");
    (&mut f).take(max).read_to_end(&mut v).map_err(bad)?;
    if v.len() as u64 == max {
        f.read(&mut [0u8; 1]).map_err(bad)?;
    }
    Ok(v)
}

/// Every tensor under `v` with its dotted path (dict keys, object attributes, list indices).
fn collect(v: &Value, path: &str, out: &mut Vec<(String, std::rc::Rc<TensorRef>)>, depth: usize) -> std::result::Result<(), String> {
    if depth > 64 {
        return Err(format!("pickle nests deeper than 64 levels at \"{path}\""));
    }
    let join = |k: &str| if path.is_empty() { k.to_string() } else { format!("{path}.{k}") };
    match v {
        Value::Tensor(t) => out.push((path.to_string(), t.clone())),
        Value::Dict(d) => {
            for (k, x) in d.borrow().iter() {
                let key = match k {
                    Value::Str(s) => s.clone(),
                    Value::Int(i) => i.to_string(),
                    _ => continue,
                };
                collect(x, &join(&key), out, depth + 1)?;
            }
        }
        Value::List(l) => {
            for (i, x) in l.borrow().iter().enumerate() {
                collect(x, &join(&i.to_string()), out, depth + 1)?;
            }
        }
        Value::Tuple(t) => {
            for (i, x) in t.iter().enumerate() {
                collect(x, &join(&i.to_string()), out, depth + 1)?;
            }
        }
        Value::Object(o) => {
            if let Some(s) = &o.try_borrow().map_err(|_| format!("object at \"{path}\" contains itself"))?.state {
                collect(s, path, out, depth + 1)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// A training checkpoint's `{"state_dict": {...}, "epoch": ...}` (or "model") → its inner names;
/// DDP's `module.` prefix dropped.
fn unwrap_state_dict(found: Vec<(String, std::rc::Rc<TensorRef>)>) -> Vec<(String, std::rc::Rc<TensorRef>)> {
    let mut found = found;
    for wrap in ["state_dict.", "model.", "module."] {
        if found.iter().all(|(n, _)| n.starts_with(wrap)) {
            found = found.into_iter().map(|(n, t)| (n[wrap.len()..].to_string(), t)).collect();
        }
    }
    found
}

/// A storage's bytes (little-endian) as f32 values.
fn decode(raw: &[u8], dtype: StorageDtype) -> Vec<f32> {
    use StorageDtype::*;
    let n = dtype.size();
    let it = raw.chunks_exact(n);
    match dtype {
        F32 => it.map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        F16 => it.map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        BF16 => it.map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        F64 => it.map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32).collect(),
        I64 => it.map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32).collect(),
        I32 => it.map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32).collect(),
        I16 => it.map(|c| i16::from_le_bytes([c[0], c[1]]) as f32).collect(),
        I8 => it.map(|c| c[0] as i8 as f32).collect(),
        U8 | Bool => it.map(|c| c[0] as f32).collect(),
    }
}

/// The elements of view `t` of `storage`, row-major, bounds-checked.
fn materialise(storage: &[f32], t: &TensorRef) -> std::result::Result<Vec<f32>, String> {
    let numel = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("shape overflows")?;
    if numel == 0 {
        return Ok(vec![]);
    }
    if numel > storage.len().saturating_mul(4).saturating_add(1024) {
        return Err(format!("view of {numel} elements on a storage of {} (broadcast views this large are not supported)", storage.len()));
    }
    // the farthest element the view reaches must lie inside the storage
    let last =
        t.shape.iter().zip(&t.strides).try_fold(t.offset, |a, (&d, &s)| (d - 1).checked_mul(s).and_then(|x| a.checked_add(x))).ok_or("strides overflow")?;
    if last >= storage.len() {
        return Err(format!(
            "view (offset {}, shape {:?}, strides {:?}) reaches element {last} of a storage of {}",
            t.offset,
            t.shape,
            t.strides,
            storage.len()
        ));
    }
    let contiguous = crate::tensor::contiguous_strides(&t.shape);
    if t.strides == contiguous || t.shape.iter().zip(&t.strides).zip(&contiguous).all(|((&d, s), c)| d == 1 || s == c) {
        return Ok(storage[t.offset..t.offset + numel].to_vec());
    }
    let mut out = Vec::with_capacity(numel);
    let rank = t.shape.len();
    let mut idx = vec![0usize; rank];
    loop {
        let base: usize = t.offset + idx[..rank - 1].iter().zip(&t.strides).map(|(i, s)| i * s).sum::<usize>();
        let (n, s) = (t.shape[rank - 1], t.strides[rank - 1]);
        out.extend((0..n).map(|j| storage[base + j * s]));
        // next index over the leading dimensions
        let mut d = rank - 1;
        loop {
            if d == 0 {
                return Ok(out);
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < t.shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pickle::StorageRef;

    fn view(offset: usize, shape: &[usize], strides: &[usize]) -> TensorRef {
        TensorRef { storage: StorageRef { dtype: StorageDtype::F32, key: "0".into(), numel: 12 }, offset, shape: shape.to_vec(), strides: strides.to_vec() }
    }

    #[test]
    fn views_by_strides() {
        let s: Vec<f32> = (0..12).map(|i| i as f32).collect();
        // a [3, 4] matrix transposed: [4, 3] with strides [1, 4]
        assert_eq!(materialise(&s, &view(0, &[4, 3], &[1, 4])).unwrap(), vec![0., 4., 8., 1., 5., 9., 2., 6., 10., 3., 7., 11.]);
        assert_eq!(materialise(&s, &view(5, &[2], &[1])).unwrap(), vec![5., 6.]);
        assert_eq!(materialise(&s, &view(3, &[], &[])).unwrap(), vec![3.]);
        assert!(materialise(&s, &view(10, &[2, 2], &[2, 1])).is_err());
    }
}
