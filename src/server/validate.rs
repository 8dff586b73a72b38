//! The one validation step of the request path: an OpenAI request in, a `Validated` request out,
//! before any tokenization or template rendering. Everything a request can get wrong that does not
//! need the model's tokens is refused here, cheaply (a 4 MiB prompt costs a character count); what
//! needs the model (prompt length against the context, token ids against the vocabulary) is
//! `check_model`, still before tokenization, and the engine's admission check after it.
use std::sync::Arc;

use super::error::ApiError;
use super::openai::{ChatRequest, CompletionRequest, Content, MessageIn, Sampling};
use super::tools::{self, Tools};
use crate::engine::{EngineHandle, SamplingParams};
use crate::error::HearthError;
use crate::grammar::Constraint;
use crate::model::ChatMessage;

/// What one request may ask for.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Choices per prompt.
    pub max_n: usize,
    /// Prompts in one completions request.
    pub max_prompts: usize,
    pub max_stops: usize,
    /// Bytes of one stop string.
    pub max_stop_bytes: usize,
    /// Messages in one chat request.
    pub max_messages: usize,
    /// Cap on prompts x n x max_tokens: the tokens one request may ask the engine to generate.
    pub max_request_tokens: usize,
    /// max_tokens assumed for the cap when a request names none (the engine's default).
    pub default_max_tokens: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_n: 16,
            max_prompts: 64,
            max_stops: 4,
            max_stop_bytes: 256,
            max_messages: 1024,
            max_request_tokens: 262_144,
            default_max_tokens: 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

/// The text to tokenize: a conversation for the chat template, or plain prompts.
#[derive(Debug, Clone)]
pub enum Input {
    Chat(Vec<ChatMessage>),
    Prompts(Vec<String>),
}

/// A request that passed validation: every field typed and in range.
#[derive(Debug, Clone)]
pub struct Validated {
    pub kind: Kind,
    pub model: String,
    pub input: Input,
    /// Choices per prompt.
    pub n: usize,
    pub params: SamplingParams,
    /// Shared by every choice.
    pub stops: Arc<[String]>,
    pub stream: bool,
    pub include_usage: bool,
    pub want_logprobs: bool,
    /// The end-user label from the request (never the tenant).
    pub user: Option<String>,
    /// The grammar the output must follow (`response_format`, or the tools' call format).
    pub constraint: Option<Constraint>,
    /// The functions a chat reply may call (then a reply made of calls becomes `tool_calls`).
    pub tools: Option<Tools>,
}

/// What route rules' patterns read: the last user message of a chat, or the first prompt.
pub fn routing_text(req: &Validated) -> String {
    match &req.input {
        Input::Chat(ms) => ms
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.clone())
            .unwrap_or_default(),
        Input::Prompts(ps) => ps.first().cloned().unwrap_or_default(),
    }
}

impl Validated {
    /// Characters of text the prompt(s) are made of.
    pub fn prompt_chars(&self) -> usize {
        match &self.input {
            // Calls are left out: how a template writes them is not known here, and the sum
            // must not exceed the prompt's text (it bounds the tokens from below).
            Input::Chat(ms) => ms.iter().map(|m| m.content.chars().count()).sum(),
            Input::Prompts(ps) => ps.iter().map(|p| p.chars().count()).max().unwrap_or(0),
        }
    }

    fn num_prompts(&self) -> usize {
        match &self.input {
            Input::Chat(_) => 1,
            Input::Prompts(ps) => ps.len(),
        }
    }
}

fn role(m: &MessageIn) -> Result<&'static str, ApiError> {
    Ok(match m.role.as_str() {
        "system" | "developer" => "system",
        "user" => "user",
        "assistant" => "assistant",
        "tool" => "tool",
        "function" => {
            return Err(ApiError::unsupported(
                "messages",
                format!("`{}` messages are not supported yet", m.role),
            ))
        }
        other => {
            return Err(ApiError::invalid(
                format!(
                    "unknown message role `{other}` (expected system, developer, user or assistant)"
                ),
                Some("messages"),
            ))
        }
    })
}

/// A message as the chat template reads it: its text, and an assistant's calls (checked here,
/// written out per model at tokenization, by the template or in Hearth's generic format).
fn message(m: &MessageIn) -> Result<ChatMessage, ApiError> {
    let mut out = ChatMessage::new(role(m)?, &text_content(m)?);
    match &m.tool_calls {
        Some(calls) if m.role == "assistant" => out.tool_calls = Some(tools::checked_calls(calls)?),
        Some(_) => {
            return Err(ApiError::invalid(
                "only assistant messages carry `tool_calls`",
                Some("messages"),
            ))
        }
        None => {}
    }
    Ok(out)
}

fn text_content(m: &MessageIn) -> Result<String, ApiError> {
    Ok(match &m.content {
        None => String::new(),
        Some(Content::Text(t)) => t.clone(),
        Some(Content::Parts(parts)) => {
            let mut out = String::new();
            for p in parts {
                match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => out.push_str(t),
                    ("text", None) => {
                        return Err(ApiError::invalid(
                            "a text content part needs `text`",
                            Some("messages"),
                        ))
                    }
                    (other, _) => {
                        return Err(ApiError::unsupported(
                            "messages",
                            format!("content parts of type `{other}` are not supported"),
                        ))
                    }
                }
            }
            out
        }
    })
}

/// The output constraint `response_format` asks for: OpenAI's `text`, `json_object` and
/// `json_schema`, and as extensions (as vLLM and llama.cpp offer) `regex` and `grammar` (Lark, or
/// GBNF-style rules). The grammar is compiled here once, so a bad one is a 400 before any
/// tokenization.
fn response_format(s: &Sampling) -> Result<Option<Constraint>, ApiError> {
    let Some(rf) = &s.response_format else {
        return Ok(None);
    };
    let field = Some("response_format");
    let bad = |m: String| ApiError::invalid(m, field);
    let text = |key: &str| {
        rf.get(key).and_then(|v| v.as_str()).ok_or_else(|| {
            bad(format!(
                "response_format of type `{key}` needs a string field `{key}`"
            ))
        })
    };
    let constraint = match rf.get("type").and_then(|t| t.as_str()) {
        Some("text") => return Ok(None),
        Some("json_object") => Constraint::json_object(),
        Some("json_schema") => {
            let spec = rf.get("json_schema").ok_or_else(|| {
                bad("response_format of type `json_schema` needs `json_schema`".into())
            })?;
            match spec.get("schema") {
                Some(schema) => Constraint::json_schema(schema.clone()),
                None => Constraint::json_object(),
            }
        }
        Some("regex") => Constraint::regex(text("regex")?),
        Some("grammar") => Constraint::lark(text("grammar")?),
        Some(other) => {
            return Err(ApiError::unsupported(
                "response_format",
                format!(
                    "response_format type `{other}` is not supported (text, json_object, \
                     json_schema, regex, grammar)"
                ),
            ))
        }
        None => return Err(bad("response_format needs a `type`".into())),
    };
    constraint.map(Some).map_err(|e| match e {
        HearthError::InvalidRequest(m) => bad(format!("response_format: {m}")),
        other => ApiError::from(other),
    })
}

/// The longest `user` label kept (in characters).
const MAX_USER_LABEL: usize = 512;

/// The end-user label, as the usage ledger keeps and exports it: bounded, and free of control
/// characters (a NUL is not text to PostgreSQL; a newline would split an exported line).
pub fn user_label(user: Option<String>) -> Result<Option<String>, ApiError> {
    let Some(u) = user else { return Ok(None) };
    if u.chars().count() > MAX_USER_LABEL {
        return Err(ApiError::invalid(
            format!("`user` must be at most {MAX_USER_LABEL} characters"),
            Some("user"),
        ));
    }
    if u.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "`user` must not contain control characters",
            Some("user"),
        ));
    }
    Ok(Some(u))
}

/// Refuse the fields that would change the result and that Hearth cannot honour yet.
fn refuse_unsupported(s: &Sampling) -> Result<(), ApiError> {
    if s.functions.is_some() {
        return Err(ApiError::unsupported(
            "functions",
            "function calls are not supported",
        ));
    }
    Ok(())
}

fn logit_bias(s: &Sampling) -> Result<Vec<(u32, f32)>, ApiError> {
    let Some(map) = &s.logit_bias else {
        return Ok(Vec::new());
    };
    if map.len() > 1024 {
        return Err(ApiError::invalid(
            "logit_bias may name at most 1024 tokens",
            Some("logit_bias"),
        ));
    }
    let mut out = Vec::with_capacity(map.len());
    for (k, &v) in map {
        let id: u32 = k.parse().map_err(|_| {
            ApiError::invalid(
                format!("logit_bias keys must be token ids, got `{k}`"),
                Some("logit_bias"),
            )
        })?;
        out.push((id, v));
    }
    out.sort_unstable_by_key(|&(id, _)| id);
    Ok(out)
}

/// The sampling fields both endpoints share, checked; `logprobs` is the number of top alternatives
/// wanted (None: no log-probabilities).
fn sampling(
    kind: Kind,
    model: String,
    input: Input,
    s: Sampling,
    logprobs: Option<usize>,
    limits: &Limits,
) -> Result<Validated, ApiError> {
    refuse_unsupported(&s)?;
    let n = s.n.unwrap_or(1) as usize;
    if !(1..=limits.max_n).contains(&n) {
        return Err(ApiError::invalid(
            format!("n must be between 1 and {}", limits.max_n),
            Some("n"),
        ));
    }
    let stops = s.stop.clone().map(|x| x.into_vec()).unwrap_or_default();
    if stops.len() > limits.max_stops {
        return Err(ApiError::invalid(
            format!("at most {} stop sequences", limits.max_stops),
            Some("stop"),
        ));
    }
    if stops.iter().any(|x| x.len() > limits.max_stop_bytes) {
        return Err(ApiError::invalid(
            format!(
                "a stop sequence may be at most {} bytes",
                limits.max_stop_bytes
            ),
            Some("stop"),
        ));
    }
    let max_tokens = s.max_completion_tokens.or(s.max_tokens).map(|m| m as usize);
    if max_tokens == Some(0) {
        return Err(ApiError::invalid(
            "max_tokens must be at least 1",
            Some("max_tokens"),
        ));
    }
    let params = SamplingParams {
        temperature: s.temperature.unwrap_or(1.0),
        top_k: s.top_k.unwrap_or(0) as usize,
        top_p: s.top_p.unwrap_or(1.0),
        min_p: s.min_p.unwrap_or(0.0),
        repetition_penalty: s.repetition_penalty.unwrap_or(1.0),
        presence_penalty: s.presence_penalty.unwrap_or(0.0),
        frequency_penalty: s.frequency_penalty.unwrap_or(0.0),
        seed: s.seed,
        max_tokens,
        stop_token_ids: Vec::new(),
        ignore_eos: s.ignore_eos.unwrap_or(false),
        logprobs,
        logit_bias: logit_bias(&s)?,
        probe_tokens: 0,
    };
    params.validate().map_err(ApiError::from)?;
    let v = Validated {
        kind,
        model,
        input,
        n,
        params,
        stops: stops.into(),
        stream: s.stream.unwrap_or(false),
        include_usage: s
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        want_logprobs: logprobs.is_some(),
        constraint: response_format(&s)?,
        tools: None,
        user: user_label(s.user)?,
    };
    let work = v.num_prompts() * n * max_tokens.unwrap_or(limits.default_max_tokens);
    if work > limits.max_request_tokens {
        return Err(ApiError::invalid(
            format!(
                "the request asks for up to {work} generated tokens (prompts x n x max_tokens); the limit is {}",
                limits.max_request_tokens
            ),
            Some("max_tokens"),
        ));
    }
    Ok(v)
}

pub fn chat(req: ChatRequest, limits: &Limits) -> Result<Validated, ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    if req.messages.len() > limits.max_messages {
        return Err(ApiError::invalid(
            format!("at most {} messages", limits.max_messages),
            Some("messages"),
        ));
    }
    let messages = req
        .messages
        .iter()
        .map(message)
        .collect::<Result<Vec<_>, ApiError>>()?;
    let s = &req.sampling;
    let tools = Tools::parse(
        s.tools.as_ref(),
        s.tool_choice.as_ref(),
        s.parallel_tool_calls,
    )?
    .filter(Tools::callable);
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (Some(true), t) => Some(t.unwrap_or(0) as usize),
        (_, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs requires logprobs to be true",
                Some("top_logprobs"),
            ))
        }
        _ => None,
    };
    let constraint = tools.as_ref().map(Tools::constraint).transpose()?.flatten();
    let mut v = sampling(
        Kind::Chat,
        req.model,
        Input::Chat(messages),
        req.sampling,
        logprobs,
        limits,
    )?;
    if constraint.is_some() {
        if v.constraint.is_some() {
            return Err(ApiError::invalid(
                "tools and a response_format cannot be combined",
                Some("response_format"),
            ));
        }
        v.constraint = constraint;
    }
    v.tools = tools;
    Ok(v)
}

pub fn completion(req: CompletionRequest, limits: &Limits) -> Result<Validated, ApiError> {
    if req.echo == Some(true) {
        return Err(ApiError::unsupported("echo", "echo is not supported"));
    }
    if req.best_of.is_some_and(|b| b != 1) {
        return Err(ApiError::unsupported("best_of", "best_of is not supported"));
    }
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported("suffix", "suffix is not supported"));
    }
    if req
        .sampling
        .tools
        .as_ref()
        .is_some_and(|t| !t.as_array().is_some_and(|a| a.is_empty()))
    {
        return Err(ApiError::unsupported(
            "tools",
            "tools are for chat completions",
        ));
    }
    let prompts = req.prompt.into_vec();
    if prompts.is_empty() || prompts.iter().any(|t| t.is_empty()) {
        return Err(ApiError::invalid(
            "prompt must not be empty",
            Some("prompt"),
        ));
    }
    if prompts.len() > limits.max_prompts {
        return Err(ApiError::invalid(
            format!("at most {} prompts per request", limits.max_prompts),
            Some("prompt"),
        ));
    }
    sampling(
        Kind::Completion,
        req.model,
        Input::Prompts(prompts),
        req.sampling,
        req.logprobs.map(|n| n as usize),
        limits,
    )
}

/// The checks that need the model but not the tokens: the prompt cannot be longer in tokens than
/// the model could take (no token spans more than `max_token_chars` characters), and biased token
/// ids exist.
pub fn check_model(v: &Validated, engine: &EngineHandle) -> Result<(), ApiError> {
    let chars = v.prompt_chars();
    let limit = engine.max_prompt_chars();
    if chars > limit {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::invalid(
                format!(
                    "the prompt has {chars} characters; `{}` takes at most {limit} (its context is {} tokens, and none of its tokens spans more than {} characters)",
                    v.model,
                    engine.max_context,
                    engine.tokenizer.max_token_chars()
                ),
                Some(match v.kind {
                    Kind::Chat => "messages",
                    Kind::Completion => "prompt",
                }),
            )
        });
    }
    let vocab = engine.tokenizer.vocab_size() as u32;
    if let Some(&(id, _)) = v.params.logit_bias.iter().find(|&&(id, _)| id >= vocab) {
        return Err(ApiError::invalid(
            format!("logit_bias names token {id}, outside the vocabulary ({vocab})"),
            Some("logit_bias"),
        ));
    }
    Ok(())
}
