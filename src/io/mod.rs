//! Input and output: tokenizer, image preprocessing, .npy files.
pub mod npy;
pub mod tokenizer;
