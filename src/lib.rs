//! Hearth: a self-hosted LLM inference engine with continuous batching over a paged KV cache.
pub mod bench;
pub mod engine;
pub mod error;
pub mod model;
pub mod streaming;

pub use error::{HearthError, Result};
