//! Text in and out: tokenizers, chat templates, and incremental detokenization.
pub mod chat;
pub mod detokenizer;
pub mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate};
pub use detokenizer::TextStream;
pub use tokenizer::Tokenizer;
