//! How weights are held for compute: the precision option of loading a model.
use crate::tensor::DType;

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
