//! Runs one API request's choices on an engine and turns engine events into OpenAI responses: whole
//! JSON bodies, or Server-Sent Event chunks as tokens arrive. Detokenization is incremental (UTF-8 safe,
//! stop strings held back); a dropped client drops the receivers, which cancels the sequences.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::error::ApiError;
use super::openai::{PromptTokensDetails, TokenLogprob, TopLogprob, UsageOut};
use crate::engine::{EngineHandle, Event, FinishReason, Request, SamplingParams};
use crate::model::Tokenizer;
use crate::streaming::TextStream;
use crate::telemetry::names;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

pub struct Job {
    pub kind: Kind,
    pub model: String,
    pub engine: EngineHandle,
    pub prompts: Vec<Vec<u32>>,
    pub n: usize,
    pub params: SamplingParams,
    pub stops: Vec<String>,
    pub include_usage: bool,
    pub tenant: Option<String>,
    pub started: Instant,
}

/// What one choice reports as it goes.
#[derive(Debug)]
struct Update {
    choice: usize,
    text: String,
    logprobs: Vec<TokenLogprob>,
    /// Set on the choice's last update.
    finish: Option<Finish>,
}

#[derive(Debug)]
struct Finish {
    reason: &'static str,
    prompt_tokens: usize,
    completion_tokens: usize,
    cached_tokens: usize,
    /// The first choice of each prompt carries the prompt's usage; the others only their output.
    counts_prompt: bool,
    error: Option<String>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn next_id(kind: Kind) -> String {
    static N: AtomicU64 = AtomicU64::new(1);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let prefix = match kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    };
    format!("{prefix}-{:x}{n:06x}", now_secs())
}

fn token_logprob(tok: &Tokenizer, id: u32, logprob: f32, top: &[(u32, f32)]) -> TokenLogprob {
    let text = |i: u32| tok.decode(&[i]).unwrap_or_default();
    let token = text(id);
    TokenLogprob {
        bytes: token.as_bytes().to_vec(),
        token,
        logprob,
        top_logprobs: top
            .iter()
            .map(|&(i, lp)| {
                let t = text(i);
                TopLogprob {
                    bytes: t.as_bytes().to_vec(),
                    token: t,
                    logprob: lp,
                }
            })
            .collect(),
    }
}

/// Submit every choice up front, so that refusals (queue full, context) surface before any output.
fn submit_all(job: &Job) -> Result<Vec<(usize, usize, flume::Receiver<Event>)>, ApiError> {
    let mut out = Vec::new();
    for (pi, prompt) in job.prompts.iter().enumerate() {
        for j in 0..job.n {
            let mut params = job.params.clone();
            // n choices with one seed must still differ, reproducibly.
            params.seed = params.seed.map(|s| s.wrapping_add(j as u64));
            let rx = job.engine.submit(Request {
                prompt: prompt.clone(),
                params,
                tenant: job.tenant.clone(),
            })?;
            out.push((pi * job.n + j, prompt.len(), rx));
        }
    }
    Ok(out)
}

/// What one choice's task needs to know.
struct ChoiceCtx {
    choice: usize,
    prompt_tokens: usize,
    counts_prompt: bool,
    model: String,
    tok: Arc<Tokenizer>,
    stops: Vec<String>,
    want_logprobs: bool,
    started: Instant,
}

/// Drive one choice: engine events in, text pieces out.
async fn drive(ctx: ChoiceCtx, rx: flume::Receiver<Event>, tx: mpsc::Sender<Update>) {
    let ChoiceCtx {
        choice,
        prompt_tokens,
        counts_prompt,
        model,
        tok,
        stops,
        want_logprobs,
        started,
    } = ctx;
    let mut text = TextStream::new(tok.clone(), stops);
    let mut n = 0usize;
    let mut cached = 0usize;
    let mut last = started;
    let labels = [("model", model)];
    let finish = |reason, n, cached, error| Finish {
        reason,
        prompt_tokens,
        completion_tokens: n,
        cached_tokens: cached,
        counts_prompt,
        error,
    };
    loop {
        let ev = rx.recv_async().await;
        let (piece, logprobs, done) = match ev {
            Ok(Event::Admitted {
                cached_tokens,
                queue_secs,
            }) => {
                cached = cached_tokens;
                metrics::histogram!(names::QUEUE_TIME, &labels).record(queue_secs);
                continue;
            }
            Ok(Event::Token(s)) => {
                let now = Instant::now();
                if n == 0 {
                    metrics::histogram!(names::TIME_TO_FIRST_TOKEN, &labels)
                        .record((now - started).as_secs_f64());
                } else {
                    metrics::histogram!(names::INTER_TOKEN_LATENCY, &labels)
                        .record((now - last).as_secs_f64());
                }
                last = now;
                n += 1;
                metrics::counter!(names::GENERATION_TOKENS, &labels).increment(1);
                let piece = text.push(s.token).unwrap_or_default();
                let lp = if want_logprobs {
                    vec![token_logprob(&tok, s.token, s.logprob, &s.top)]
                } else {
                    Vec::new()
                };
                // A stop string ends the choice here; dropping `rx` below cancels the sequence.
                let done = text.stopped().then(|| finish("stop", n, cached, None));
                (piece, lp, done)
            }
            Ok(Event::Finished { reason, .. }) => {
                let rest = text.finish().unwrap_or_default();
                let r = match reason {
                    FinishReason::Length => "length",
                    _ => "stop",
                };
                (rest, Vec::new(), Some(finish(r, n, cached, None)))
            }
            Ok(Event::Error(e)) => (
                String::new(),
                Vec::new(),
                Some(finish("error", n, cached, Some(e))),
            ),
            Err(_) => (
                String::new(),
                Vec::new(),
                Some(finish(
                    "error",
                    n,
                    cached,
                    Some("the engine stopped".into()),
                )),
            ),
        };
        let last_update = done.is_some();
        if let Some(f) = &done {
            metrics::histogram!(names::E2E_LATENCY, &labels)
                .record(started.elapsed().as_secs_f64());
            if f.counts_prompt {
                metrics::counter!(names::PROMPT_TOKENS, &labels).increment(prompt_tokens as u64);
            }
            metrics::counter!(names::REQUESTS_FINISHED, &labels).increment(1);
        }
        let update = Update {
            choice,
            text: piece,
            logprobs,
            finish: done,
        };
        if tx.send(update).await.is_err() || last_update {
            return; // client gone, or this choice is done: dropping rx cancels it in the engine
        }
    }
}

fn spawn_choices(
    job: &Job,
    subs: Vec<(usize, usize, flume::Receiver<Event>)>,
    want_logprobs: bool,
) -> mpsc::Receiver<Update> {
    let (tx, rx) = mpsc::channel(256);
    for (choice, prompt_len, erx) in subs {
        let ctx = ChoiceCtx {
            choice,
            prompt_tokens: prompt_len,
            counts_prompt: choice % job.n == 0,
            model: job.model.clone(),
            tok: job.engine.tokenizer.clone(),
            stops: job.stops.clone(),
            want_logprobs,
            started: job.started,
        };
        tokio::spawn(drive(ctx, erx, tx.clone()));
    }
    rx
}

fn usage_of(finishes: &[&Finish]) -> UsageOut {
    let prompt: usize = finishes
        .iter()
        .filter(|f| f.counts_prompt)
        .map(|f| f.prompt_tokens)
        .sum();
    let cached: usize = finishes
        .iter()
        .filter(|f| f.counts_prompt)
        .map(|f| f.cached_tokens)
        .sum();
    let completion: usize = finishes.iter().map(|f| f.completion_tokens).sum();
    UsageOut {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        prompt_tokens_details: PromptTokensDetails {
            cached_tokens: cached,
        },
    }
}

/// Legacy completions' logprobs object.
fn legacy_logprobs(lps: &[TokenLogprob], start_offset: usize) -> Value {
    let mut offset = start_offset;
    let mut offsets = Vec::new();
    for t in lps {
        offsets.push(offset);
        offset += t.token.len();
    }
    json!({
        "tokens": lps.iter().map(|t| &t.token).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|t| t.top_logprobs.iter().map(|x| (x.token.clone(), json!(x.logprob))).collect::<serde_json::Map<String, Value>>()).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

fn logprobs_json(kind: Kind, lps: &[TokenLogprob], offset: usize) -> Value {
    match kind {
        Kind::Chat => json!({ "content": lps }),
        Kind::Completion => legacy_logprobs(lps, offset),
    }
}

/// Run to completion and build the whole response body.
pub async fn complete(job: Job, want_logprobs: bool) -> Result<Value, ApiError> {
    let subs = submit_all(&job)?;
    let total = subs.len();
    let mut rx = spawn_choices(&job, subs, want_logprobs);
    let mut texts = vec![String::new(); total];
    let mut lps: Vec<Vec<TokenLogprob>> = (0..total).map(|_| Vec::new()).collect();
    let mut finishes: Vec<Option<Finish>> = (0..total).map(|_| None).collect();
    let mut left = total;
    while left > 0 {
        let Some(u) = rx.recv().await else { break };
        texts[u.choice].push_str(&u.text);
        lps[u.choice].extend(u.logprobs);
        if let Some(f) = u.finish {
            if let Some(e) = &f.error {
                return Err(ApiError::from(crate::HearthError::InvalidRequest(
                    e.clone(),
                )));
            }
            finishes[u.choice] = Some(f);
            left -= 1;
        }
    }
    let done: Vec<&Finish> = finishes.iter().flatten().collect();
    let usage = usage_of(&done);
    let choices: Vec<Value> = (0..total)
        .map(|i| {
            let reason = finishes[i].as_ref().map(|f| f.reason).unwrap_or("stop");
            let logprobs = want_logprobs.then(|| logprobs_json(job.kind, &lps[i], 0));
            match job.kind {
                Kind::Chat => json!({
                    "index": i,
                    "message": { "role": "assistant", "content": texts[i] },
                    "logprobs": logprobs,
                    "finish_reason": reason,
                }),
                Kind::Completion => json!({
                    "index": i,
                    "text": texts[i],
                    "logprobs": logprobs,
                    "finish_reason": reason,
                }),
            }
        })
        .collect();
    Ok(json!({
        "id": next_id(job.kind),
        "object": match job.kind { Kind::Chat => "chat.completion", Kind::Completion => "text_completion" },
        "created": now_secs(),
        "model": job.model,
        "choices": choices,
        "usage": usage,
    }))
}

/// Start the choices and return the SSE data payloads as they come (the caller frames them).
pub fn stream(job: Job, want_logprobs: bool) -> Result<mpsc::Receiver<String>, ApiError> {
    let subs = submit_all(&job)?;
    let total = subs.len();
    let mut rx = spawn_choices(&job, subs, want_logprobs);
    let (out, out_rx) = mpsc::channel::<String>(256);
    let id = next_id(job.kind);
    let created = now_secs();
    tokio::spawn(async move {
        let object = match job.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let chunk = |choices: Value, usage: Value| {
            json!({ "id": id, "object": object, "created": created, "model": job.model,
                    "choices": choices, "usage": usage })
            .to_string()
        };
        if job.kind == Kind::Chat {
            let first: Vec<Value> = (0..total)
                .map(|i| {
                    json!({ "index": i, "delta": { "role": "assistant", "content": "" },
                                 "logprobs": null, "finish_reason": null })
                })
                .collect();
            if out
                .send(chunk(Value::Array(first), Value::Null))
                .await
                .is_err()
            {
                return;
            }
        }
        let mut finishes: Vec<Finish> = Vec::new();
        let mut offsets = vec![0usize; total];
        while finishes.len() < total {
            let Some(u) = rx.recv().await else { break };
            if let Some(Finish { error: Some(e), .. }) = &u.finish {
                let _ = out
                    .send(super::openai::error_body(e, "server_error", None, None).to_string())
                    .await;
                return;
            }
            let reason = u.finish.as_ref().map(|f| f.reason);
            if !u.text.is_empty() || !u.logprobs.is_empty() || reason.is_some() {
                let logprobs =
                    want_logprobs.then(|| logprobs_json(job.kind, &u.logprobs, offsets[u.choice]));
                offsets[u.choice] += u.text.len();
                let c = match job.kind {
                    Kind::Chat => {
                        let delta = if u.text.is_empty() {
                            json!({})
                        } else {
                            json!({ "content": u.text })
                        };
                        json!({ "index": u.choice, "delta": delta, "logprobs": logprobs, "finish_reason": reason })
                    }
                    Kind::Completion => {
                        json!({ "index": u.choice, "text": u.text, "logprobs": logprobs, "finish_reason": reason })
                    }
                };
                if out.send(chunk(json!([c]), Value::Null)).await.is_err() {
                    return; // client gone: dropping `rx` ends the choice tasks, which cancel
                }
            }
            if let Some(f) = u.finish {
                finishes.push(f);
            }
        }
        if job.include_usage {
            let usage = usage_of(&finishes.iter().collect::<Vec<_>>());
            let _ = out.send(chunk(json!([]), json!(usage))).await;
        }
        let _ = out.send("[DONE]".to_string()).await;
    });
    Ok(out_rx)
}
