//! Fine-tuning: the learning-rate schedule and AdamW over named parameters.
pub mod optim;
pub mod schedule;
