//! Hearth: a self-hosted LLM inference engine with continuous batching over a paged KV cache.
pub mod bench;
pub mod cache;
pub mod config;
pub mod device;
pub mod embedding;
pub mod engine;
pub mod error;
pub mod grammar;
pub mod kv_events;
pub mod ledger;
pub mod loader;
pub mod logits;
pub mod model;
pub mod ops;
pub mod quality;
pub mod router;
pub mod server;
pub mod telemetry;
pub mod tenancy;
pub mod text;

pub use error::{HearthError, Result};
