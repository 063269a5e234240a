//! Evaluation: zero-shot classification and retrieval metrics (`metrics`), the prompt templates
//! (`templates`), embedding caches (`cache`) and the datasets (`data`).
pub mod cache;
pub mod data;
pub mod metrics;
pub mod templates;
