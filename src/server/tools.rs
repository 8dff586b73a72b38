//! OpenAI function calling in Hearth's generic format. The default models' chat templates have no
//! tool format of their own, so the tools are described in the system prompt and a call is written
//! as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (one per line), the format
//! Hermes-style models are trained on. The reply is generated under a grammar, so every call names
//! one of the request's functions and its arguments follow that function's parameter schema; a
//! reply that starts with `<tool_call>` becomes `tool_calls`.
use rand::distr::{Alphanumeric, SampleString};
use serde_json::{json, Value};

use super::error::ApiError;
use crate::grammar::Constraint;
use crate::text::ChatMessage;

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    pub parameters: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    /// The model answers in text (the tools are not shown to it).
    None,
    /// Text or calls, as the model decides.
    Auto,
    /// At least one call.
    Required,
    /// A call of this function.
    Named(String),
}

/// A request's tools and how they may be used.
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    pub tools: Vec<Tool>,
    pub choice: Choice,
    pub parallel: bool,
}

/// One call the model made.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub id: String,
    pub name: String,
    /// The arguments as a JSON string (as OpenAI sends them).
    pub arguments: String,
}

fn bad(msg: impl Into<String>, param: &'static str) -> ApiError {
    ApiError::invalid(msg, Some(param))
}

impl Tools {
    /// Read `tools`, `tool_choice` and `parallel_tool_calls`; None when no tools are given (and
    /// `tool_choice` is absent or "none").
    pub fn parse(
        tools: Option<&Value>,
        choice: Option<&Value>,
        parallel: Option<bool>,
    ) -> Result<Option<Self>, ApiError> {
        let list = match tools {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a.iter().map(tool).collect::<Result<_, _>>()?,
            Some(_) => return Err(bad("tools must be an array", "tools")),
        };
        if list.len() > 128 {
            return Err(bad("at most 128 tools", "tools"));
        }
        for (i, t) in list.iter().enumerate() {
            if list[..i].iter().any(|o: &Tool| o.name == t.name) {
                return Err(bad(format!("tool `{}` is defined twice", t.name), "tools"));
            }
        }
        let choice = match choice {
            None | Some(Value::Null) => Choice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => Choice::None,
                "auto" => Choice::Auto,
                "required" => Choice::Required,
                other => {
                    return Err(bad(
                        format!("tool_choice `{other}` is not none, auto or required"),
                        "tool_choice",
                    ))
                }
            },
            Some(v) => {
                let name = v
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        bad(
                            "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                            "tool_choice",
                        )
                    })?;
                if !list.iter().any(|t| t.name == name) {
                    return Err(bad(
                        format!("tool_choice names `{name}`, which is not in tools"),
                        "tool_choice",
                    ));
                }
                Choice::Named(name.to_string())
            }
        };
        if list.is_empty() {
            return match choice {
                Choice::None | Choice::Auto => Ok(None),
                _ => Err(bad("tool_choice needs tools", "tool_choice")),
            };
        }
        Ok(Some(Self {
            tools: list,
            choice,
            parallel: parallel.unwrap_or(true),
        }))
    }

    /// The tools as OpenAI's tool objects, for a chat template that renders them.
    pub fn openai_json(&self) -> Value {
        Value::Array(
            self.tools
                .iter()
                .map(|t| {
                    // Templates print `description` without asking whether it is there.
                    let d = t.description.as_deref().unwrap_or("");
                    json!({"type": "function", "function":
                        {"name": t.name, "description": d, "parameters": t.parameters}})
                })
                .collect(),
        )
    }

    /// Whether the model is told about the tools and may call them.
    pub fn callable(&self) -> bool {
        self.choice != Choice::None
    }

    /// The system prompt's part that describes the tools and how to call them.
    pub fn system_text(&self) -> String {
        let mut s = String::from(
            "# Tools\n\nYou may call functions to help with the user's request. \
             The functions, with JSON schemas of their arguments:\n",
        );
        for t in &self.tools {
            let mut f = json!({"name": t.name, "parameters": t.parameters});
            if let Some(d) = &t.description {
                f["description"] = json!(d);
            }
            s.push_str(&f.to_string());
            s.push('\n');
        }
        s.push_str(&format!(
            "\nTo call a function, reply with only {OPEN}{{\"name\": <function name>, \"arguments\": <arguments object>}}{CLOSE}"
        ));
        if self.parallel {
            s.push_str(", one line per call");
        }
        s.push_str(". Each result comes back as a <tool_response>.");
        s
    }

    /// The grammar the reply follows: calls only (required, named), or calls or text not starting
    /// with `<` (auto).
    pub fn constraint(&self) -> Result<Option<Constraint>, ApiError> {
        let named = match &self.choice {
            Choice::None => return Ok(None),
            Choice::Named(n) => Some(n),
            _ => None,
        };
        let alternatives: Vec<Value> = self
            .tools
            .iter()
            .filter(|t| named.is_none_or(|n| *n == t.name))
            .map(|t| {
                let mut arguments = t.parameters.clone();
                crate::grammar::close_objects(&mut arguments);
                json!({
                    "type": "object",
                    "properties": {"name": {"const": t.name}, "arguments": arguments},
                    "required": ["name", "arguments"],
                    "additionalProperties": false
                })
            })
            .collect();
        let call = json!({
            "anyOf": alternatives,
            "x-guidance": {"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}
        });
        let calls = if self.parallel {
            "call (\"\\n\" call)*"
        } else {
            "call"
        };
        let start = if self.choice == Choice::Auto {
            "calls | TEXT"
        } else {
            "calls"
        };
        let lark = format!(
            "start: {start}\ncalls: {calls}\ncall: {open} \"\\n\"? %json {call} \"\\n\"? {close}\nTEXT: /[^<][\\s\\S]*/\n",
            open = serde_json::to_string(OPEN).unwrap_or_default(),
            close = serde_json::to_string(CLOSE).unwrap_or_default(),
        );
        Constraint::lark(&lark)
            .map(Some)
            .map_err(|e| bad(format!("tools: {e}"), "tools"))
    }
}

fn is_function_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn tool(v: &Value) -> Result<Tool, ApiError> {
    if v.get("type").and_then(Value::as_str) != Some("function") {
        return Err(bad("every tool must be of type `function`", "tools"));
    }
    let f = v
        .get("function")
        .ok_or_else(|| bad("a tool needs `function`", "tools"))?;
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| is_function_name(n))
        .ok_or_else(|| {
            bad(
                "a function needs a `name` of 1-64 letters, digits, `_` or `-`",
                "tools",
            )
        })?;
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(p) if p.is_object() => p.clone(),
        Some(_) => return Err(bad("a function's `parameters` must be an object", "tools")),
    };
    Ok(Tool {
        name: name.to_string(),
        description: f
            .get("description")
            .and_then(Value::as_str)
            .map(String::from),
        parameters,
    })
}

/// An assistant message's `tool_calls`, checked, in the shape chat templates read: OpenAI's, with
/// each call's `arguments` parsed into an object.
pub fn checked_calls(tool_calls: &Value) -> Result<Value, ApiError> {
    let calls = tool_calls
        .as_array()
        .ok_or_else(|| bad("`tool_calls` must be an array", "messages"))?;
    let mut out = Vec::with_capacity(calls.len());
    for c in calls {
        let f = c
            .get("function")
            .ok_or_else(|| bad("a tool call needs `function`", "messages"))?;
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| is_function_name(n))
            .ok_or_else(|| {
                bad(
                    "a tool call needs a function `name` of 1-64 letters, digits, `_` or `-`",
                    "messages",
                )
            })?;
        let args: Value = match f.get("arguments") {
            Some(Value::String(s)) => serde_json::from_str(s)
                .map_err(|e| bad(format!("tool call arguments are not JSON: {e}"), "messages"))?,
            Some(v) => v.clone(),
            None => json!({}),
        };
        if !args.is_object() {
            return Err(bad("tool call arguments must be a JSON object", "messages"));
        }
        let id = c
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| {
                id.len() <= 64
                    && id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            })
            .unwrap_or_default();
        out.push(
            json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}}),
        );
    }
    Ok(Value::Array(out))
}

/// Checked calls (`checked_calls`) as the text the model would have written.
fn calls_text(calls: &Value) -> String {
    let calls = calls.as_array().map(Vec::as_slice).unwrap_or_default();
    calls
        .iter()
        .map(|c| {
            let f = &c["function"];
            format!(
                "{OPEN}{}{CLOSE}",
                json!({"name": f["name"], "arguments": f["arguments"]})
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The conversation in Hearth's generic tool format, for a template that does not render tools:
/// the tools described in the system prompt (the first system message, or a new one), calls
/// written out in the assistant's turn, and each tool result a user turn.
pub fn generic_messages(messages: &[ChatMessage], tools: Option<&Tools>) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = messages
        .iter()
        .map(|m| match (m.role.as_str(), &m.tool_calls) {
            ("tool", _) => ChatMessage::new("user", &result_text(&m.content)),
            (role, Some(calls)) => {
                let calls = calls_text(calls);
                let content = if m.content.is_empty() {
                    calls
                } else {
                    format!("{}\n{calls}", m.content)
                };
                ChatMessage::new(role, &content)
            }
            _ => m.clone(),
        })
        .collect();
    if let Some(t) = tools {
        let described = t.system_text();
        match out.first_mut() {
            Some(m) if m.role == "system" => m.content = format!("{}\n\n{described}", m.content),
            _ => out.insert(0, ChatMessage::new("system", &described)),
        }
    }
    out
}

/// A `tool` message's content as the text the model reads.
fn result_text(content: &str) -> String {
    format!("<tool_response>\n{content}\n</tool_response>")
}

/// The calls in a finished reply, if it is made of calls (None for a text reply). A call cut off by
/// `max_tokens` after complete ones is dropped, and so is a repeat of an earlier call (small
/// models, free to add calls, can repeat one until the limit).
pub fn parse_calls(text: &str) -> Option<Vec<Call>> {
    let mut rest = text.trim();
    if !rest.starts_with(OPEN) {
        return None;
    }
    let mut calls: Vec<Call> = Vec::new();
    while let Some(after) = rest.strip_prefix(OPEN) {
        let Some(end) = after.find(CLOSE) else {
            break;
        };
        let v: Value = serde_json::from_str(&after[..end]).ok()?;
        let name = v.get("name")?.as_str()?.to_string();
        let arguments = v.get("arguments")?.to_string();
        if !calls
            .iter()
            .any(|c| c.name == name && c.arguments == arguments)
        {
            calls.push(Call {
                id: format!("call_{}", Alphanumeric.sample_string(&mut rand::rng(), 24)),
                name,
                arguments,
            });
        }
        rest = after[end + CLOSE.len()..].trim_start();
    }
    (!calls.is_empty() && (rest.is_empty() || rest.starts_with(OPEN))).then_some(calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
    }

    #[test]
    fn tool_choice_forms_and_their_errors() {
        let t = Tools::parse(Some(&weather()), None, None).unwrap().unwrap();
        assert_eq!(t.choice, Choice::Auto);
        assert!(t.parallel);
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let t = Tools::parse(Some(&weather()), Some(&named), Some(false))
            .unwrap()
            .unwrap();
        assert_eq!(t.choice, Choice::Named("get_weather".into()));
        assert!(Tools::parse(None, Some(&json!("none")), None)
            .unwrap()
            .is_none());
        for (tools, choice) in [
            (Some(weather()), Some(json!("sometimes"))),
            (
                Some(weather()),
                Some(json!({"type": "function", "function": {"name": "nope"}})),
            ),
            (None, Some(json!("required"))),
            (Some(json!([{"type": "retrieval"}])), None),
            (Some(json!({"a": 1})), None),
        ] {
            assert!(
                Tools::parse(tools.as_ref(), choice.as_ref(), None).is_err(),
                "{tools:?} {choice:?}"
            );
        }
    }

    #[test]
    fn calls_round_trip_through_their_text() {
        let text = calls_text(
            &checked_calls(&json!([
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}},
                {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}}
            ]))
            .unwrap(),
        );
        let calls = parse_calls(&text).unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(
            (calls[0].name.as_str(), calls[0].arguments.as_str()),
            ("f", "{\"x\":1}")
        );
        assert_eq!(calls[1].name, "g");
        assert!(parse_calls("The weather is fine.").is_none());
        assert!(parse_calls("<tool_call>{\"name\": \"f\", \"argu").is_none());
        // Repeated until cut off: the complete call, once.
        let looped = format!("{text}\n{text}\n<tool_call>{{\"name\": \"f\"");
        assert_eq!(parse_calls(&looped).unwrap().len(), 2);
    }

    #[test]
    fn every_choice_compiles_to_a_grammar() {
        for choice in [
            json!("auto"),
            json!("required"),
            json!({"type": "function", "function": {"name": "get_weather"}}),
        ] {
            let t = Tools::parse(Some(&weather()), Some(&choice), None)
                .unwrap()
                .unwrap();
            assert!(t.constraint().unwrap().is_some(), "{choice}");
        }
    }
}
