//! Input and output: tokenizer, image preprocessing, .npy files, PyTorch .pt checkpoints, how
//! outputs are written, WebDataset tar shards (brace patterns, the tar index, images from files or
//! tar members).
pub mod image_decode;
pub mod image_prep;
pub mod image_source;
mod jpeg_decode;
pub mod npy;
pub mod output;
pub mod pipeline;
pub mod pt;
pub mod shard_stream;
pub mod shards;
pub mod st_out;
pub mod text;
pub mod tokenizer;
pub mod webdataset;
