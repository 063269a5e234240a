//! Input and output: tokenizer, image preprocessing, .npy files, PyTorch .pt checkpoints, how
//! outputs are written.
pub mod image_decode;
pub mod image_prep;
pub mod npy;
pub mod output;
pub mod pt;
pub mod st_out;
pub mod tokenizer;
