//! Input and output: tokenizer, image preprocessing, .npy files, how outputs are written,
//! WebDataset tar shards (brace patterns, the tar index, images from files or tar members).
pub mod image_decode;
pub mod image_prep;
pub mod image_source;
pub mod npy;
pub mod output;
pub mod pipeline;
pub mod shard_stream;
pub mod shards;
pub mod tokenizer;
pub mod webdataset;
