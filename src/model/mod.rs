//! A loaded model and the forward pass: the decoder architecture over a batch description. Loading
//! is `crate::loader`, text is `crate::text`, the attention op and matmul kernels are `crate::ops`.
pub mod batch;
pub mod decoder;

use std::path::Path;

use candle_core::Device;

pub use crate::ops::attention::{AttentionBackend, KvCache};
pub use crate::text::{ChatMessage, ChatTemplate, Tokenizer};
pub use batch::Batch;
pub use decoder::Decoder;

use crate::error::Result;

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
    /// (see `crate::loader`).
    pub fn load(path: &Path, name: &str, device: &Device) -> Result<Self> {
        crate::loader::load(path, name, device)
    }

    pub fn max_context(&self) -> usize {
        self.decoder.cfg.max_context
    }

    /// Prompt token ids of a chat conversation, rendered through the model's template.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let text = self.chat_template.render_marked(messages, None)?;
        self.tokenizer.encode_chat(&text)
    }
}
