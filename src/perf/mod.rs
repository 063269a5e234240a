//! The performance model: run the device code path on a recording device and predict its time on
//! a named GPU, without a GPU (`clipforge bench --device cuda --dry-run --gpu h100`).
//!
//! - [`record`]: [`RecordingOps`](record::RecordingOps), a `DeviceOps` that records every launch,
//!   GEMM, memset and copy instead of executing it;
//! - [`cost`]: per-kernel FLOP/byte models decoded from the launch arguments ([`cost_half`]: the
//!   16-bit activation kernels' rows; `cost_attn`: the attention and flash kernels');
//! - [`resources`]: registers and static shared memory from the build's ptxas report;
//! - [`gpus`]: the named GPUs, their interconnects and every constant of the model;
//! - [`roofline`]: occupancy, waves and the predicted time of each operation;
//! - [`run`]: the towers and the training step on the recorder;
//! - [`report`]: per-kernel tables, throughput, offenders;
//! - [`collective`]: the train step scaled to many GPUs (ring all-reduce and all-gather over
//!   NVLink and the network, gradient buckets overlapped with the backward).
//!
//! KERNELS.md ("Performance model") documents the constants and assumptions.
pub mod collective;
pub mod cost;
mod cost_attn;
pub mod cost_half;
pub mod gpus;
pub mod record;
pub mod report;
pub mod resources;
pub mod roofline;
pub mod run;
