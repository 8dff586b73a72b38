//! Model loading and the forward pass: loaders (GGUF, safetensors), tokenizer and chat template, the
//! shared decoder architecture, and the paged-attention op.
pub mod attention;
pub mod batch;
pub mod chat;
#[cfg(feature = "cuda")]
pub mod cuda_activation;
#[cfg(feature = "cuda")]
pub mod cuda_attention;
pub mod decoder;
pub mod gguf;
pub mod hub;
pub mod linear;
pub mod safetensors;
pub mod tokenizer;

use std::path::Path;

use candle_core::Device;

pub use attention::{AttentionBackend, KvCache};
pub use batch::Batch;
pub use chat::{ChatMessage, ChatTemplate};
pub use decoder::Decoder;
pub use tokenizer::Tokenizer;

use crate::error::{HearthError, Result};

/// A loaded model: weights, tokenizer, chat template.
#[derive(Debug)]
pub struct Model {
    pub name: String,
    pub decoder: Decoder,
    pub tokenizer: Tokenizer,
    pub chat_template: ChatTemplate,
}

impl Model {
    /// Load a GGUF file, a folder holding a safetensors checkpoint, or either from the Hugging Face Hub
    /// (`hf:ORG/REPO[@REVISION][:FILE]`, see `hub`).
    pub fn load(path: &Path, name: &str, device: &Device) -> Result<Self> {
        if let Some(spec) = path.to_str().and_then(hub::parse) {
            let local = hub::resolve(&spec?, hf_hub::Cache::from_env(), hub::offline_from_env())?;
            return Self::load(&local, name, device);
        }
        if path.is_dir() {
            return safetensors::load(path, name, device);
        }
        if !path.exists() {
            return Err(HearthError::ModelNotFound(path.display().to_string()));
        }
        gguf::load(path, name, device)
    }

    pub fn max_context(&self) -> usize {
        self.decoder.cfg.max_context
    }

    /// Prompt token ids of a chat conversation, rendered through the model's template.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let text = self.chat_template.render_marked(messages)?;
        self.tokenizer.encode_chat(&text)
    }
}
