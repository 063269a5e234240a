//! A minimal reverse-mode autograd over the engine's CPU ops (hand-written on purpose):
//! - `tape`: [`Tape`], [`Var`], [`Grads`] — recording, `no_grad`, the backward walk, `custom` ops;
//! - `basic`: broadcasting arithmetic, activations, reductions, views;
//! - `nn`: Linear/matmul, LayerNorm, softmax, fused attention, embedding, patch embedding,
//!   positional gather, cross-entropy, L2-normalisation.
//!
//! Every rule is checked against f64 central finite differences in tests/autograd.rs.
pub mod basic;
pub mod nn;
pub mod tape;

pub use basic::reduce_to;
pub use tape::{Backward, Grads, Tape, Var};

use crate::error::Result;
use crate::tensor::{DType, Tensor};

/// A contiguous f32 copy of `t` (no copy when it already is one).
pub fn f32_contiguous(t: &Tensor) -> Tensor {
    if t.dtype() == DType::F32 && t.is_contiguous() {
        t.clone()
    } else {
        Tensor::from_vec(t.to_vec_f32(), t.shape()).expect("same element count")
    }
}

/// A tensor from a vector (shape checked).
pub(crate) fn t(v: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(v, shape)
}
