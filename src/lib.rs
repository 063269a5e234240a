//! clipforge: CLIP, Long-CLIP and SmartCLIP on a from-scratch tensor engine.
//!
//! - `api`: the library API ([`ClipModel`]): open a model, embed images and texts, compare them;
//! - `autograd`: the tape (reverse-mode gradients over the CPU ops);
//! - `train`: fine-tuning (optimizer, schedule);
//! - `tensor`: the Tensor type (shape, strides, dtype, device) and its ops;
//! - `ops`: the CPU kernels, each with a plain reference twin;
//! - `model`: CLIP configs, safetensors weights and the two towers;
//! - `io`: tokenizer, image preprocessing, .npy output;
//! - `alloc`: the binary's global allocator (large blocks cache-line aligned), for programs too.
pub mod alloc;
pub mod api;
pub mod autograd;
pub mod backend;
pub mod cuda;
pub mod dist;
pub mod error;
pub mod eval;
pub mod flops;
pub mod io;
pub mod model;
pub mod ops;
pub mod perf;
pub mod plot;
pub mod progress;
pub mod tensor;
pub mod train;

pub use api::{ClipModel, DeviceChoice, Embeddings, HiddenOptions, ImageHidden, ImageOptions, OpenOptions, Padding, RgbImage, TextHidden, TextOptions};
pub use error::{Error, Result};
pub use model::Towers;
pub use tensor::{DType, Device, Tensor};

/// The README's code blocks, compiled and run as doctests ("Use as a library").
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
