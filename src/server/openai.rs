//! OpenAI request and response shapes, typed, with their OpenAPI schemas. Unknown request fields are
//! ignored (clients send many optional ones); fields that would change the result and that Hearth
//! does not support are refused by `validate`, never silently dropped.
use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct MessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    /// The call a `tool` message answers (the generic format does not need it).
    #[serde(default)]
    pub tool_call_id: Option<String>,
    /// Present on assistant messages that called tools.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub tool_calls: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// Fields shared by chat and text completions.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct Sampling {
    #[schema(minimum = 1)]
    pub max_tokens: Option<u32>,
    #[schema(minimum = 1)]
    pub max_completion_tokens: Option<u32>,
    #[schema(minimum = 0, maximum = 2)]
    pub temperature: Option<f32>,
    #[schema(exclusive_minimum = 0, maximum = 1)]
    pub top_p: Option<f32>,
    /// Extension: keep only the k most likely tokens (0: no limit).
    pub top_k: Option<u32>,
    /// Extension: drop tokens less likely than min_p times the most likely one.
    #[schema(minimum = 0, maximum = 1)]
    pub min_p: Option<f32>,
    #[schema(minimum = -2, maximum = 2)]
    pub presence_penalty: Option<f32>,
    #[schema(minimum = -2, maximum = 2)]
    pub frequency_penalty: Option<f32>,
    /// Extension (as vLLM): multiplicative penalty on tokens seen in the prompt or output.
    #[schema(exclusive_minimum = 0)]
    pub repetition_penalty: Option<f32>,
    /// Extension (as vLLM): keep generating past the end-of-sequence token.
    pub ignore_eos: Option<bool>,
    pub seed: Option<u64>,
    pub stop: Option<OneOrMany>,
    #[schema(minimum = 1, maximum = 16)]
    pub n: Option<u32>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// An end-user label (recorded; it does not choose the tenant).
    pub user: Option<String>,
    /// Token id (as a string) -> bias in [-100, 100] added to its logit before sampling.
    pub logit_bias: Option<HashMap<String, f32>>,
    /// `{"type": "text" | "json_object"}`, `{"type": "json_schema", "json_schema": {"name",
    /// "schema", "strict"}}`, or the extensions `{"type": "regex", "regex": "..."}` and
    /// `{"type": "grammar", "grammar": "<Lark>"}`.
    #[schema(value_type = Option<Object>)]
    pub response_format: Option<serde_json::Value>,
    /// Functions a chat reply may call (`{"type": "function", "function": {"name", "description",
    /// "parameters"}}`); refused on text completions.
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<serde_json::Value>,
    /// `"none"`, `"auto"` (default), `"required"` or `{"type": "function", "function": {"name"}}`.
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<serde_json::Value>,
    /// Whether a reply may make several calls (default true).
    pub parallel_tool_calls: Option<bool>,
    /// The legacy form of `tools` (refused).
    #[schema(value_type = Option<Vec<Object>>)]
    pub functions: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ChatRequest {
    #[schema(example = "smollm2-135m-instruct")]
    pub model: String,
    pub messages: Vec<MessageIn>,
    pub logprobs: Option<bool>,
    #[schema(minimum = 0, maximum = 20)]
    pub top_logprobs: Option<u32>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct CompletionRequest {
    #[schema(example = "smollm2-135m-instruct")]
    pub model: String,
    pub prompt: OneOrMany,
    /// Legacy completions: the number of top alternatives per token.
    #[schema(minimum = 0, maximum = 20)]
    pub logprobs: Option<u32>,
    /// Echoing the prompt back is not supported; only `false` is accepted.
    pub echo: Option<bool>,
    /// Only 1 (or absent) is accepted.
    pub best_of: Option<u32>,
    /// Text after the completion is not supported; only absent or empty is accepted.
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// Hearth's per-request measurements (vLLM's field names where it has them): wall-clock phases as
/// the server saw them, and the request's metered share of device time (see `engine::metering`).
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct ResponseMetrics {
    /// Arrival to admission into the running batch (the longest of the choices').
    pub queue_time_ms: f64,
    /// Arrival to the first generated token; null when none was generated.
    pub time_to_first_token_ms: Option<f64>,
    /// First generated token to the last.
    pub generation_time_ms: f64,
    /// Mean time between consecutive tokens of a choice; null with fewer than two tokens.
    pub mean_itl_ms: Option<f64>,
    /// Completion tokens per second of the request's whole life.
    pub tokens_per_second: f64,
    /// This request's share of the device time of the engine steps it ran in.
    pub device_time_ms: f64,
    pub prefill_device_time_ms: f64,
    pub decode_device_time_ms: f64,
    /// For a request to a route group: which model answered and why (see the README, "Routing").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<crate::router::Decision>,
    /// When the response cache is on for the request: what it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheMetrics>,
    /// Answer-quality signals from the generated tokens (absent when none were generated, as
    /// on a cache hit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quality: Option<crate::quality::Quality>,
}

/// The response cache's part in a request (`metrics.cache`).
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct CacheMetrics {
    /// `hit`, `miss` or `bypass` (as the `x-hearth-cache` header says).
    pub status: &'static str,
    pub hit: bool,
    /// `exact` or `semantic`, on a hit.
    pub kind: Option<&'static str>,
    /// Cosine similarity of the cached question to this one (1 for an exact hit).
    pub similarity: Option<f32>,
    /// Device time the cached answer took, not spent again.
    pub saved_device_time_ms: f64,
    /// Device time of embedding the message for the semantic lookup (part of `device_time_ms`).
    pub lookup_device_time_ms: f64,
    /// Why the request was not cached (`client`, `sampled without a seed`, `n > 1`, `tools`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bypass_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

/// Chat log-probabilities: one entry per content token; `refusal` is always null.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprob>,
    #[schema(value_type = Option<Vec<TokenLogprob>>)]
    pub refusal: Option<Vec<TokenLogprob>>,
}

/// Legacy completions' log-probabilities.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<HashMap<String, f32>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
    /// The reply is function calls (`tool_calls`).
    ToolCalls,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatMessageOut {
    pub role: &'static str,
    /// Null when the reply is function calls.
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallOut>>,
    /// Always null: Hearth's models do not refuse through a separate channel.
    #[schema(value_type = Option<String>)]
    pub refusal: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: FinishReason,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    /// Always `chat.completion`.
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    pub metrics: ResponseMetrics,
}

#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallOut>>,
}

/// One function call of a reply (in a stream's delta, `index` places it; each call comes whole).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ToolCallOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCallOut,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FunctionCallOut {
    pub name: String,
    /// The arguments, as a JSON string.
    pub arguments: String,
}

impl ToolCallOut {
    pub fn from_calls(calls: Vec<crate::server::tools::Call>, indexed: bool) -> Vec<Self> {
        calls
            .into_iter()
            .enumerate()
            .map(|(i, c)| Self {
                index: indexed.then_some(i),
                id: c.id,
                kind: "function",
                function: FunctionCallOut {
                    name: c.name,
                    arguments: c.arguments,
                },
            })
            .collect()
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    /// Always `chat.completion.chunk`.
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    /// Only on the last chunk, when `stream_options.include_usage` is set (null otherwise).
    pub usage: Option<Usage>,
    /// With the usage, on the last chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<ResponseMetrics>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<FinishReason>,
}

/// A text completion, whole or (with `stream`) one chunk of it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Completion {
    pub id: String,
    /// Always `text_completion`.
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    /// Absent on stream chunks but the usage one (OpenAI's schema does not allow null here).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// With the usage: on the whole response, and on the last stream chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<ResponseMetrics>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// The endpoints that take this model: `chat.completions` and `completions` for a text model
    /// or route group, `embeddings` for an embedding model.
    pub capabilities: Vec<&'static str>,
}

/// What `/v1/embeddings` takes as `input`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(untagged)]
pub enum EmbeddingInput {
    Text(String),
    Texts(Vec<String>),
    /// One input as the model's token ids ([CLS] and [SEP] included).
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct EmbeddingRequest {
    #[schema(example = "all-minilm-l6-v2")]
    pub model: String,
    /// A string, an array of strings (at most 2048), an array of token ids, or an array of such
    /// arrays; none may be empty.
    #[schema(value_type = EmbeddingInput)]
    pub input: serde_json::Value,
    /// `float` (default) or `base64` (the little-endian f32 bytes).
    pub encoding_format: Option<String>,
    /// Only the model's own size is accepted (384 for all-minilm-l6-v2).
    pub dimensions: Option<u64>,
    /// A label kept in the usage ledger.
    pub user: Option<String>,
    /// Hearth extension (TEI's name): cut inputs longer than the model takes, as
    /// sentence-transformers does, instead of refusing them.
    pub truncate: Option<bool>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum EmbeddingVector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Embedding {
    /// Always `embedding`.
    pub object: &'static str,
    pub index: usize,
    pub embedding: EmbeddingVector,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EmbeddingUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

/// Hearth's measurements of an embedding request.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EmbeddingMetrics {
    /// Arrival at the queue to the first forward.
    pub queue_time_ms: f64,
    /// This request's share of the device time of the forwards it ran in.
    pub device_time_ms: f64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EmbeddingResponse {
    /// Always `list`.
    pub object: &'static str,
    pub data: Vec<Embedding>,
    pub model: String,
    pub usage: EmbeddingUsage,
    pub metrics: EmbeddingMetrics,
}

/// `GET /v1/usage`: totals per group, from the usage ledger.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct UsageList {
    /// Always `list`.
    pub object: &'static str,
    pub data: Vec<crate::ledger::UsageRow>,
}

/// `GET /v1/usage` parameters.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageParams {
    /// Unix seconds, inclusive (default: the beginning).
    pub start: Option<i64>,
    /// Unix seconds, exclusive (default: now).
    pub end: Option<i64>,
    /// Any of `tenant,model,user,day`, comma-separated (default: one total).
    pub group_by: Option<String>,
    /// Admin keys only: one tenant's rows (a tenant key always reads its own).
    pub tenant: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

/// Every error: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorDetail,
}

impl ErrorResponse {
    pub fn new(message: &str, kind: &str, param: Option<&str>, code: Option<&str>) -> Self {
        Self {
            error: ErrorDetail {
                message: message.to_string(),
                kind: kind.to_string(),
                param: param.map(String::from),
                code: code.map(String::from),
            },
        }
    }
}
