//! Chat templates: the model's own Jinja template (`tokenizer.chat_template`) rendered with minijinja,
//! or Gemma's turn format when a Gemma file carries none.
use minijinja::{context, Environment, Error as JinjaError, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{HearthError, Result};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant turn's function calls, in OpenAI's shape with `arguments` as an object (what
    /// templates with a tool format read: `tool_call.function.arguments | tojson`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
            tool_calls: None,
        }
    }
}

/// Gemma's documented turn format; the system prompt is folded into the first user turn.
const GEMMA_TEMPLATE: &str = "{{ bos_token }}\
{% if messages[0].role == 'system' %}{% set sys = messages[0].content + '\n\n' %}{% set rest = messages[1:] %}\
{% else %}{% set sys = '' %}{% set rest = messages %}{% endif %}\
{% for m in rest %}{% set role = 'model' if m.role == 'assistant' else m.role %}\
<start_of_turn>{{ role }}\n{% if loop.first %}{{ sys }}{% endif %}{{ m.content | trim }}<end_of_turn>\n\
{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}";

/// ChatML, for files with no template of their own.
const CHATML_TEMPLATE: &str =
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Marks around message content in a rendered prompt (Unicode noncharacters, which no text
/// exchanged with a client may carry).
pub const CONTENT_OPEN: char = '\u{FDD0}';
pub const CONTENT_CLOSE: char = '\u{FDD1}';

#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
    /// Whether the template came with the model (a file without one is usually a base model,
    /// not tuned to follow chat turns).
    native: bool,
    /// Whether it renders tools in the Hermes format (see `renders_tools`).
    tool_format: bool,
}

fn raise_exception(msg: String) -> std::result::Result<String, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// `template` from the model file if any; otherwise a fallback chosen by architecture.
    pub fn new(template: Option<String>, arch: &str, bos_token: &str, eos_token: &str) -> Self {
        let native = template.is_some();
        let source = template.unwrap_or_else(|| {
            if arch.starts_with("gemma") {
                GEMMA_TEMPLATE.to_string()
            } else {
                CHATML_TEMPLATE.to_string()
            }
        });
        let mut t = Self {
            source,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            native,
            tool_format: false,
        };
        t.tool_format = t.native && t.probe_tool_format();
        t
    }

    /// A template given by the operator (a file next to the model, as `chat_template` in the
    /// config) in place of the model's own: it counts as the model's.
    pub fn replace_source(&mut self, source: String) {
        self.source = source;
        self.native = true;
        self.tool_format = self.probe_tool_format();
    }

    /// Whether the model file carried its own template (else a fallback by architecture is used).
    pub fn is_native(&self) -> bool {
        self.native
    }

    /// Whether the template renders `tools` itself, in the Hermes format (`<tool_call>` blocks and
    /// `tool` turns), the one format Hearth's tool grammar and parser read. Other templates get
    /// Hearth's generic tool prompt (`server::tools`).
    pub fn renders_tools(&self) -> bool {
        self.tool_format
    }

    /// Render a conversation with one tool and one call of it: the template has the Hermes format
    /// when it shows the tool and writes the call as `<tool_call>` JSON `</tool_call>` (templates
    /// that write other bodies inside the same tags, such as XML parameters, do not).
    fn probe_tool_format(&self) -> bool {
        let tools = serde_json::json!([{"type": "function", "function": {"name": "probe_fn",
            "description": "", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}}]);
        let call = serde_json::json!({"name": "probe_fn", "arguments": {"x": 7}});
        let mut assistant = ChatMessage::new("assistant", "");
        assistant.tool_calls =
            Some(serde_json::json!([{"id": "c1", "type": "function", "function": call}]));
        let convo = [
            ChatMessage::new("user", "hi"),
            assistant,
            ChatMessage::new("tool", "done"),
        ];
        let Ok(text) = self.render_with(&convo, Some(&tools)) else {
            return false;
        };
        let written = text.split("<tool_call>").skip(1).any(|s| {
            s.split("</tool_call>")
                .next()
                .and_then(|body| serde_json::from_str::<serde_json::Value>(body.trim()).ok())
                .is_some_and(|v| v == call)
        });
        written && text.matches("probe_fn").count() >= 2
    }

    /// The prompt text for `messages` with every message's content between `CONTENT_OPEN` and
    /// `CONTENT_CLOSE` (its surrounding whitespace outside them, so a template's `trim` still works),
    /// for `Tokenizer::encode_chat`, which recognises special tokens only outside the marks.
    /// `tools` (OpenAI's tool objects) are given to templates that `renders_tools`.
    pub fn render_marked(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
    ) -> Result<String> {
        let marked: Vec<ChatMessage> = messages
            .iter()
            .map(|m| {
                if m.content.contains([CONTENT_OPEN, CONTENT_CLOSE]) {
                    return Err(HearthError::InvalidRequest(
                        "message content contains the noncharacter U+FDD0 or U+FDD1".into(),
                    ));
                }
                let core = m.content.trim();
                let lead = &m.content[..m.content.len() - m.content.trim_start().len()];
                let trail = &m.content[m.content.trim_end().len()..];
                let content = if core.is_empty() {
                    m.content.clone()
                } else {
                    format!("{lead}{CONTENT_OPEN}{core}{CONTENT_CLOSE}{trail}")
                };
                Ok(ChatMessage {
                    content,
                    ..m.clone()
                })
            })
            .collect::<Result<_>>()?;
        self.render_with(&marked, tools.filter(|_| self.tool_format))
    }

    /// The prompt text for `messages`, ending with the assistant's turn opener.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        self.render_with(messages, None)
    }

    fn render_with(
        &self,
        messages: &[ChatMessage],
        tools: Option<&serde_json::Value>,
    ) -> Result<String> {
        if messages.is_empty() {
            return Err(HearthError::InvalidRequest(
                "messages must not be empty".into(),
            ));
        }
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template("chat", &self.source)
            .map_err(|e| HearthError::ChatTemplate(e.to_string()))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| HearthError::ChatTemplate(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            tools => tools,
            add_generation_prompt => true,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| HearthError::ChatTemplate(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemma_fallback_folds_system_into_first_user_turn() {
        let t = ChatTemplate::new(None, "gemma3", "<bos>", "<eos>");
        let out = t
            .render(&[
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "Hi"),
                ChatMessage::new("assistant", "Hello"),
                ChatMessage::new("user", "Bye"),
            ])
            .unwrap();
        assert_eq!(
            out,
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n\
<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn empty_messages_are_rejected() {
        let t = ChatTemplate::new(None, "llama", "<s>", "</s>");
        assert!(t.render(&[]).is_err());
    }

    #[test]
    fn a_template_with_a_tool_format_renders_tools_calls_and_results_itself() {
        let hermes = include_str!("../../tests/data/hermes_tools.jinja").to_string();
        let t = ChatTemplate::new(Some(hermes), "llama", "", "<|im_end|>");
        assert!(t.renders_tools());
        let tools = serde_json::json!([{"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
        let mut call = ChatMessage::new("assistant", "");
        call.tool_calls = Some(serde_json::json!([{"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris <3"}}}]));
        let convo = [
            ChatMessage::new("user", "Weather in Paris?"),
            call,
            ChatMessage::new("tool", "18 C, sunny"),
        ];
        let out = t.render_marked(&convo, Some(&tools)).unwrap();
        assert!(out.starts_with("<|im_start|>system\n# Functions"), "{out}");
        assert!(
            out.contains("<tools>\n{\"function\":{\"name\":\"get_weather\""),
            "{out}"
        );
        // The call as the model writes one; `tojson` escapes `<`, so no argument reads as a
        // special token.
        assert!(
            out.contains("<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\":\"Paris \\u003c3\"}}\n</tool_call><|im_end|>"),
            "{out}"
        );
        assert!(
            out.contains(&format!(
                "<tool_response>\n{CONTENT_OPEN}18 C, sunny{CONTENT_CLOSE}\n</tool_response>"
            )),
            "{out}"
        );
        // The same tags around another body (XML parameters, as some templates write) is not the
        // format the tool grammar follows.
        let xml = include_str!("../../tests/data/hermes_tools.jinja").replace(
            "{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}",
            "<function={{ c.function.name }}>",
        );
        assert!(!ChatTemplate::new(Some(xml), "llama", "", "").renders_tools());
        // No tools given: no tool block.
        assert!(!t.render(&convo[..1]).unwrap().contains("<tools>"));
        // A template without a tool format never sees them.
        let plain = ChatTemplate::new(None, "llama", "", "");
        assert!(!plain.renders_tools());
        let out = plain.render_marked(&convo[..1], Some(&tools)).unwrap();
        assert!(!out.contains("get_weather"), "{out}");
    }
}
