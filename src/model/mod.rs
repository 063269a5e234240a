//! CLIP: configuration, weights (and released .pt checkpoints converted), the shared transformer block and the two towers.
pub mod block;
pub mod clip;
pub mod config;
pub mod convert;
pub mod device;
pub mod hidden;
pub mod layers;
pub mod schema;
pub mod stretch;
pub mod synthetic;
pub mod text;
pub mod tower;
pub mod tower_backward;
pub mod vision;
pub mod weights;

pub use clip::{Clip, ClipParts, Towers};
pub use config::ClipConfig;
pub use device::CudaClip;
pub use layers::LoadOptions;
pub use schema::{BlockParam, Schema};
pub use weights::Weights;
