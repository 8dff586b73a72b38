//! Library errors. Every failure a request or a model file can cause ends up here, never in a panic.
use thiserror::Error;

#[derive(Debug, Error)]
pub enum HearthError {
    #[error("model file not found: {0}")]
    ModelNotFound(String),
    #[error("cannot read model file {path}: {reason}")]
    ModelFile { path: String, reason: String },
    #[error("unsupported model architecture `{0}` (supported: llama, mistral, qwen2, gemma3)")]
    UnsupportedArchitecture(String),
    #[error("model metadata is missing `{0}`")]
    MissingMetadata(String),
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    #[error("chat template error: {0}")]
    ChatTemplate(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("the prompt has {prompt} tokens, but the model's context is {context} tokens (prompt + max_tokens must fit)")]
    ContextLength { prompt: usize, context: usize },
    #[error("the request needs {needed} KV blocks but the pool only has {total}")]
    KvCapacity { needed: usize, total: usize },
    #[error("the request queue is full ({0} waiting); retry later")]
    QueueFull(usize),
    /// A fault of the server, not of the request (a failed engine step, a broken invariant).
    #[error("internal error: {0}")]
    Internal(String),
    #[error("the engine has stopped")]
    EngineStopped,
    /// The usage ledger's database cannot be reached (the query can be retried).
    #[error("the usage ledger is unavailable: {0}")]
    LedgerUnavailable(String),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("io error: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, HearthError>;
