//! Input and output: tokenizer, image preprocessing, .npy files.
pub mod image_decode;
pub mod image_prep;
pub mod npy;
pub mod tokenizer;
