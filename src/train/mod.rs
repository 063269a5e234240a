//! Fine-tuning (the CPU tape, or the towers on a CUDA device):
//! - `model`: the trainable CLIP on the autograd tape; `longclip`: Long-CLIP's loss;
//! - `smartclip`: SmartCLIP's mask network and modular alignment loss;
//! - `optim`: AdamW over named parameters; `schedule`: warm-up + cosine learning rate;
//! - `data`: the image–caption data and the batch loader; `checkpoint`: atomic checkpoints;
//! - `step`: one step's work behind `StepEngine` (`CpuStep`); `device_step`: the CUDA backend;
//! - `trainer`: the loop (accumulation, logging, checkpoints, resume, Ctrl-C, NaN stop);
//! - `dist`: the data-parallel pieces of a step (gathered embeddings, gradient sums over ranks).
pub mod checkpoint;
pub mod data;
pub mod device_step;
pub mod dist;
pub mod longclip;
pub mod model;
pub mod optim;
pub mod schedule;
pub mod smartclip;
pub mod step;
pub mod trainer;
