//! How weights are loaded for compute: the precision option and f32 views of stored tensors.
use super::weights::Weights;
use crate::error::Result;
use crate::tensor::{DType, Tensor};

/// How weights are held for compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// F32: weights used as f32 (mapped in place when the file is f32). BF16: every Linear weight
    /// also packed to bf16 for the AVX-512 BF16 GEMM; embeddings, norms and attention stay f32.
    pub dtype: DType,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { dtype: DType::F32 }
    }
}

/// A weight ready for f32 compute: mapped in place if stored f32, converted once otherwise.
pub fn load_f32(w: &Weights, name: &str, shape: &[usize]) -> Result<Tensor> {
    let t = w.get_shaped(name, shape)?;
    Ok(if t.dtype() == DType::F32 { t } else { t.to_dtype(DType::F32) })
}
