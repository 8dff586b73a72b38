//! Chat templates: the model's own Jinja template (`tokenizer.chat_template`) rendered with minijinja,
//! or Gemma's turn format when a Gemma file carries none.
use minijinja::{context, Environment, Error as JinjaError, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{HearthError, Result};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.to_string(),
            content: content.to_string(),
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
        Self {
            source,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            native,
        }
    }

    /// Whether the model file carried its own template (else a fallback by architecture is used).
    pub fn is_native(&self) -> bool {
        self.native
    }

    /// The prompt text for `messages` with every message's content between `CONTENT_OPEN` and
    /// `CONTENT_CLOSE` (its surrounding whitespace outside them, so a template's `trim` still works),
    /// for `Tokenizer::encode_chat`, which recognises special tokens only outside the marks.
    pub fn render_marked(&self, messages: &[ChatMessage]) -> Result<String> {
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
                    role: m.role.clone(),
                    content,
                })
            })
            .collect::<Result<_>>()?;
        self.render(&marked)
    }

    /// The prompt text for `messages`, ending with the assistant's turn opener.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String> {
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
}
