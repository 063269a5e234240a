//! Fine-tuning: the trainable CLIP on the autograd tape (`model`), AdamW over named parameters
//! (`optim`) and the learning-rate schedule (`schedule`).
pub mod model;
pub mod optim;
pub mod schedule;
