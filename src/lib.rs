//! Hearth: a self-hosted LLM inference engine with continuous batching over a paged KV cache.
pub mod bench;
pub mod config;
pub mod device;
pub mod engine;
pub mod error;
pub mod logits;
pub mod model;
pub mod server;
pub mod streaming;
pub mod telemetry;

pub use error::{HearthError, Result};
