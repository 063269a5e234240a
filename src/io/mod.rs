//! Input and output: tokenizer, image preprocessing, .npy files, how outputs are written.
pub mod image_decode;
pub mod image_prep;
mod jpeg_decode;
pub mod npy;
pub mod output;
pub mod st_out;
pub mod tokenizer;
