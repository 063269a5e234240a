//! Evaluation: zero-shot classification and retrieval metrics (`metrics`), the prompt templates
//! (`templates`), the linear probe (`probe`), embedding caches (`cache`) and the datasets (`data`).
pub mod cache;
pub mod data;
pub mod metrics;
pub mod probe;
pub mod templates;
