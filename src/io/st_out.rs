//! A .safetensors file of named outputs (per-token hidden states and their masks, ids and pooled
//! embeddings), float tensors stored as f32, f16 or bf16 and integer ones as int64 (HF's
//! convention for ids and masks); written through [`super::output::write_file`], so never
//! half-written.
use super::output::write_file;
use crate::error::{Error, Result};
use crate::tensor::DType;
use half::{bf16, f16};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;

/// The values of one output tensor.
pub enum Values<'a> {
    /// Floats, stored in the file's float dtype.
    F32(&'a [f32]),
    /// Integers (ids, masks), stored as int64.
    I64(Vec<i64>),
}

/// Writes `tensors` (name, shape, values) to `path`, floats as `dtype` (F32, F16 or BF16), with
/// `meta` as the file's string metadata.
pub fn write_safetensors(path: &Path, tensors: &[(&str, Vec<usize>, Values)], dtype: DType, meta: HashMap<String, String>) -> Result<()> {
    let mut bytes: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, shape, v) in tensors {
        let n: usize = shape.iter().product();
        let (dt, b) = match v {
            Values::F32(x) if x.len() == n => match dtype {
                DType::F16 => (Dtype::F16, x.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect()),
                DType::BF16 => (Dtype::BF16, x.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect()),
                _ => (Dtype::F32, x.iter().flat_map(|&v| v.to_le_bytes()).collect()),
            },
            Values::I64(x) if x.len() == n => (Dtype::I64, x.iter().flat_map(|&v| v.to_le_bytes()).collect()),
            _ => return Err(crate::shape_err!("{name}: values do not fill the shape {shape:?}")),
        };
        bytes.push((name.to_string(), shape.clone(), dt, b));
    }
    let mut views = Vec::with_capacity(bytes.len());
    for (name, shape, dt, b) in &bytes {
        let v = TensorView::new(*dt, shape.clone(), b).map_err(|e| Error::file(path, format!("{name}: {e}")))?;
        views.push((name.clone(), v));
    }
    let data = safetensors::serialize(views, Some(meta)).map_err(|e| Error::file(path, format!("cannot serialise: {e}")))?;
    write_file(path, &data)
}
