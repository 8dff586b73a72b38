//! A request's trace attributes, named as the OpenTelemetry GenAI conventions name them (plus
//! `hearth.*` for what they have no name for): what was asked, at validation; what it returned and
//! cost, from its ledger row when it ends. Prompts and outputs only with `otlp_export_content`.
use opentelemetry::{Array, KeyValue, StringValue, Value};
use serde_json::json;

use super::openai::ResponseMetrics;
use super::validate::{Input, Kind, Validated};
use crate::ledger::Row;
use crate::telemetry::trace::Trace;

/// A list of strings as an attribute value.
pub(super) fn strings(v: impl IntoIterator<Item = String>) -> Value {
    Value::Array(Array::String(
        v.into_iter().map(StringValue::from).collect(),
    ))
}

fn kv(key: &'static str, v: impl Into<Value>) -> KeyValue {
    KeyValue::new(key, v)
}

pub fn operation(kind: Kind) -> &'static str {
    match kind {
        Kind::Chat => "chat",
        Kind::Completion => "text_completion",
    }
}

/// The request span's name and what was asked.
pub fn asked(trace: &Trace, req: &Validated) {
    if !trace.is_on() {
        return;
    }
    let op = operation(req.kind);
    trace.name(|| format!("{op} {}", req.model));
    let content = trace.content();
    trace.set(|| {
        let p = &req.params;
        let mut v = vec![
            kv("gen_ai.operation.name", op),
            kv("gen_ai.provider.name", "hearth"),
            kv("gen_ai.request.model", req.model.clone()),
            kv("gen_ai.request.temperature", f64::from(p.temperature)),
            kv("gen_ai.request.top_p", f64::from(p.top_p)),
            kv("gen_ai.request.choice.count", req.n as i64),
            kv("hearth.stream", req.stream),
        ];
        if let Some(m) = p.max_tokens {
            v.push(kv("gen_ai.request.max_tokens", m as i64));
        }
        if let Some(s) = p.seed {
            v.push(kv("gen_ai.request.seed", s as i64));
        }
        if p.top_k > 0 {
            v.push(kv("gen_ai.request.top_k", p.top_k as i64));
        }
        if p.presence_penalty != 0.0 {
            v.push(kv(
                "gen_ai.request.presence_penalty",
                f64::from(p.presence_penalty),
            ));
        }
        if p.frequency_penalty != 0.0 {
            v.push(kv(
                "gen_ai.request.frequency_penalty",
                f64::from(p.frequency_penalty),
            ));
        }
        // Stop strings are the client's text: only their number unless content is exported.
        if content && !req.stops.is_empty() {
            v.push(kv(
                "gen_ai.request.stop_sequences",
                strings(req.stops.iter().cloned()),
            ));
        } else if !req.stops.is_empty() {
            v.push(kv("hearth.request.stop_sequences", req.stops.len() as i64));
        }
        if req.constraint.is_some() {
            v.push(kv("hearth.constrained", true));
        }
        if content {
            v.push(kv("gen_ai.input.messages", input_messages(&req.input)));
        }
        v
    });
}

/// The prompt as the conventions' input messages (a JSON array of role and text parts).
fn input_messages(input: &Input) -> String {
    let text = |role: &str, content: &str| json!({"role": role, "parts": [{"type": "text", "content": content}]});
    let msgs: Vec<serde_json::Value> = match input {
        Input::Chat(ms) => ms.iter().map(|m| text(&m.role, &m.content)).collect(),
        Input::Prompts(ps) => ps.iter().map(|p| text("user", p)).collect(),
    };
    serde_json::Value::Array(msgs).to_string()
}

/// An embedding request's span name and attributes.
pub fn embedding(trace: &Trace, model: &str) {
    trace.name(|| format!("embeddings {model}"));
    trace.set(|| {
        vec![
            kv("gen_ai.operation.name", "embeddings"),
            kv("gen_ai.provider.name", "hearth"),
            kv("gen_ai.request.model", model.to_string()),
        ]
    });
}

/// What the request returned and cost, from its ledger row and its measurements; then the trace
/// goes out. A server fault (5xx) marks the request span an error.
pub fn ended(trace: &Trace, row: &Row, m: Option<&ResponseMetrics>) {
    if !trace.is_on() {
        return;
    }
    let output = trace.take_output();
    let content = trace.content();
    trace.set(|| {
        let mut v = vec![
            kv("hearth.tenant", row.tenant.clone()),
            kv("hearth.request_id", row.request_id.clone()),
            kv("http.response.status_code", i64::from(row.status)),
            kv("gen_ai.usage.input_tokens", row.prompt_tokens as i64),
            kv("gen_ai.usage.output_tokens", row.completion_tokens as i64),
            kv(
                "gen_ai.usage.cache_read.input_tokens",
                row.cached_tokens as i64,
            ),
            kv(
                "hearth.device_time_ms",
                row.prefill_device_ms + row.decode_device_ms,
            ),
            kv("hearth.prefill_device_time_ms", row.prefill_device_ms),
            kv("hearth.decode_device_time_ms", row.decode_device_ms),
            kv("hearth.queue_time_ms", row.queue_ms),
        ];
        if !row.key_id.is_empty() {
            v.push(kv("hearth.key_id", row.key_id.clone()));
        }
        // The end-user label often names a person: it goes with the content.
        if let Some(u) = row.user.as_ref().filter(|_| content) {
            v.push(kv("hearth.user", u.clone()));
        }
        if let Some(t) = row.ttft_ms {
            v.push(kv("hearth.time_to_first_token_ms", t));
        }
        if row.status < 400 {
            v.push(kv(
                "gen_ai.response.finish_reasons",
                strings([row.finish_reason.clone()]),
            ));
        } else {
            v.push(kv("error.type", row.status.to_string()));
            v.push(kv("hearth.ending", row.finish_reason.clone()));
        }
        if !row.cache.is_empty() {
            v.push(kv("hearth.cache.hit", row.cache.clone()));
            v.push(kv("hearth.cache.saved_device_time_ms", row.saved_device_ms));
        }
        let route = m.and_then(|m| m.route.as_ref());
        let answered = route.map_or(row.model.clone(), |d| d.model.clone());
        if !answered.is_empty() {
            v.push(kv("gen_ai.response.model", answered));
        }
        if let Some(d) = route {
            v.extend([
                kv("hearth.route.group", d.group.clone()),
                kv(
                    "hearth.route.policy",
                    format!("{:?}", d.policy).to_lowercase(),
                ),
                kv("hearth.route.reason", d.reason.clone()),
                kv("hearth.route.escalated", d.escalated),
                kv("hearth.route.tried", strings(d.tried.iter().cloned())),
            ]);
            if let Some(t) = d.escalated_at_token {
                v.push(kv("hearth.route.escalated_at_token", t as i64));
            }
        }
        if let Some(q) = &row.quality {
            v.extend([
                kv("hearth.quality.mean_logprob", q.mean_logprob),
                kv("hearth.quality.p10_logprob", q.p10_logprob),
                kv("hearth.quality.min_logprob", q.min_logprob),
                kv("hearth.quality.mean_entropy", q.mean_entropy),
                kv("hearth.quality.repetition", q.repetition),
                kv("hearth.quality.stopped_on_length", q.stopped_on_length),
            ]);
            if let Some(mg) = q.mean_margin {
                v.push(kv("hearth.quality.mean_margin", mg));
            }
        }
        if content && row.status < 400 && row.finish_reason != "embedded" {
            let out = json!([{
                "role": "assistant",
                "parts": [{"type": "text", "content": output}],
                "finish_reason": row.finish_reason,
            }]);
            v.push(kv("gen_ai.output.messages", out.to_string()));
        }
        v
    });
    let fault = (row.status >= 500).then(|| format!("{} {}", row.status, row.finish_reason));
    trace.end(fault);
}
