//! Runs a validated request on an engine. Each choice is one stream of typed events (text pieces with
//! their log-probabilities, then a finish or a failure); the choices' streams are merged, the SSE
//! response is a map over the merged stream and the JSON response a fold over the same stream.
//! Dropping the stream (a client gone) drops the engine receivers, which cancels the sequences.
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures_util::stream::{self, BoxStream, Stream, StreamExt};
use rand::distr::{Alphanumeric, SampleString};

use super::billing::{Ending, Receipt};
use super::cascade::StopSet;
use super::error::ApiError;
use super::openai::{
    ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk, ChatDelta, ChatLogprobs,
    ChatMessageOut, Completion, CompletionChoice, CompletionLogprobs, ErrorResponse, FinishReason,
    PromptTokensDetails, ResponseMetrics, TokenLogprob, ToolCallOut, TopLogprob, Usage,
};
use super::tools;
use super::validate::{Kind, Validated};
use crate::engine::{self, EngineHandle, Event, Request};
use crate::router::{Decision, Probe};
use crate::telemetry::names;
use crate::telemetry::trace::{SpanRef, Trace};
use crate::text::{TextStream, Tokenizer};
use opentelemetry::KeyValue;

/// Where a request's answer comes from.
// One per request, moved once: the size of `Live` costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Source {
    /// A model: `engine` with the prompts in its tokens. With `route` set, `model` named a route
    /// group: `engine` and `prompts` are its first (cheapest) model's, and the cascade may
    /// escalate to the others.
    Live {
        engine: EngineHandle,
        prompts: Vec<Vec<u32>>,
        route: Option<super::cascade::RoutePlan>,
    },
    /// The response cache: an earlier answer, replayed.
    Cached(Arc<crate::cache::Answer>),
}

impl Source {
    fn prompts(&self) -> usize {
        match self {
            Self::Live { prompts, .. } => prompts.len(),
            Self::Cached(_) => 1,
        }
    }

    fn routed(&self) -> bool {
        match self {
            Self::Live { route, .. } => route.is_some(),
            Self::Cached(a) => a.route.is_some(),
        }
    }
}

/// A validated request with its source, ready to run.
pub struct Job {
    pub req: Validated,
    pub source: Source,
    /// From the request's key: the prefix-cache namespace (and, later, whom the usage is billed to).
    pub tenant: Arc<crate::tenancy::Tenant>,
    /// The request's place under its tenant's limits, held until the response ends.
    pub admission: crate::tenancy::limits::Admission,
    /// Its ledger row, written when the response ends.
    pub receipt: Receipt,
    pub started: Instant,
    /// The response cache's part, when it is on for the request (reported in `metrics.cache`).
    pub cache: Option<super::openai::CacheMetrics>,
    /// On a cache miss: where the answer is kept once it finishes.
    pub store: Option<super::cached::Store>,
}

/// One choice's usage and timings, reported with its finish.
#[derive(Debug, Clone, Copy)]
pub(super) struct ChoiceUsage {
    prompt_tokens: usize,
    completion_tokens: usize,
    cached_tokens: usize,
    /// The first choice of each prompt carries the prompt's usage; the others only their output.
    counts_prompt: bool,
    queue_secs: f64,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    pub(super) device: engine::DeviceTime,
    /// The choice's answer-quality signals (None before its first token).
    pub(super) quality: Option<crate::quality::Quality>,
}

#[derive(Debug)]
pub(super) enum ChoiceEvent {
    Text {
        text: String,
        logprobs: Vec<TokenLogprob>,
        /// The token's doubt signal, while the router probes.
        probe: Option<Probe>,
    },
    Finished {
        reason: FinishReason,
        usage: ChoiceUsage,
    },
    /// The engine failed while running the choice (a server fault).
    Failed(String),
    /// The router's decision (once, before any text of a routed request).
    Routed(Box<Decision>),
}

#[derive(Debug)]
pub(super) struct Update {
    pub(super) choice: usize,
    pub(super) event: ChoiceEvent,
}

/// What starting a request's choices on some model needs (owned: the cascade keeps it to start
/// the next model).
#[derive(Clone)]
pub(super) struct Spec {
    params: engine::SamplingParams,
    n: usize,
    stops: Arc<[String]>,
    want_logprobs: bool,
    tenant: Arc<crate::tenancy::Tenant>,
    limiter: Arc<crate::tenancy::limits::TenantLimiter>,
    started: Instant,
    constraint: Option<crate::grammar::Constraint>,
    trace: Trace,
    /// The span the choices' queue, prefill and decode spans go under (None: the request's).
    parent: Option<SpanRef>,
}

impl Spec {
    fn of(job: &Job) -> Self {
        Self {
            trace: job.receipt.trace().clone(),
            parent: None,
            params: job.req.params.clone(),
            n: job.req.n,
            stops: job.req.stops.clone(),
            want_logprobs: job.req.want_logprobs,
            tenant: job.tenant.clone(),
            limiter: job.admission.limiter(),
            started: job.started,
            constraint: job.req.constraint.clone(),
        }
    }

    /// Choices per prompt.
    pub(super) fn n(&self) -> usize {
        self.n
    }

    pub(super) fn trace(&self) -> &Trace {
        &self.trace
    }

    /// The same request, its choices' spans under `parent` (an escalation's).
    pub(super) fn under(&self, parent: Option<SpanRef>) -> Self {
        Self {
            parent,
            ..self.clone()
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A random response id (a counter would tell clients how busy the server is).
fn response_id(kind: Kind) -> String {
    let prefix = match kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    };
    format!(
        "{prefix}-{}",
        Alphanumeric.sample_string(&mut rand::rng(), 24)
    )
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

/// A choice's engine events, and the way to end it early.
type Submitted = (flume::Receiver<Event>, engine::StopHandle);

/// Submit every choice up front, so that refusals (queue full, context) surface before any output.
fn submit_all(
    spec: &Spec,
    engine: &EngineHandle,
    prompts: &[Vec<u32>],
    probe_tokens: usize,
) -> Result<Vec<(usize, usize, Submitted)>, ApiError> {
    let mut out = Vec::new();
    let n = spec.n;
    for (pi, prompt) in prompts.iter().enumerate() {
        for j in 0..n {
            let mut params = spec.params.clone();
            // n choices with one seed must still differ, reproducibly.
            params.seed = params.seed.map(|s| s.wrapping_add(j as u64));
            params.probe_tokens = probe_tokens;
            let sub = engine.submit_stoppable(Request {
                prompt: prompt.clone(),
                params,
                tenant: Some(spec.tenant.name.to_string()),
                weight: spec.tenant.weight,
                constraint: spec.constraint.clone(),
            })?;
            out.push((pi * n + j, prompt.len(), sub));
        }
    }
    Ok(out)
}

/// What one choice's stream keeps between engine events.
struct ChoiceState {
    choice: usize,
    rx: flume::Receiver<Event>,
    /// Set once a stop string ended the text: the engine is told to stop, and the choice finishes
    /// on the engine's `Finished`, which carries the device time of every step it ran in.
    stop: engine::StopHandle,
    stopping: bool,
    text: TextStream,
    tok: Arc<Tokenizer>,
    labels: [(&'static str, String); 1],
    /// Whom the tokens are counted for, and where completion tokens are charged.
    tenant: Arc<str>,
    limiter: Arc<crate::tenancy::limits::TenantLimiter>,
    want_logprobs: bool,
    started: Instant,
    last: Instant,
    usage: ChoiceUsage,
    quality: crate::quality::Tracker,
    trace: Trace,
    parent: Option<SpanRef>,
    /// Prompt chunks run so far (the prefill spans' numbering).
    chunks: usize,
    done: bool,
}

impl ChoiceState {
    /// The attributes every span of this choice carries.
    fn span_attrs(&self) -> Vec<KeyValue> {
        vec![
            KeyValue::new("gen_ai.response.model", self.labels[0].1.clone()),
            KeyValue::new("hearth.choice", self.choice as i64),
        ]
    }

    fn finished(&mut self, reason: FinishReason) -> ChoiceEvent {
        self.done = true;
        self.usage.quality = self.quality.summary(reason == FinishReason::Length);
        tracing::debug!(
            choice = self.choice,
            ?reason,
            completion_tokens = self.usage.completion_tokens,
            "finished"
        );
        metrics::histogram!(names::E2E_LATENCY, &self.labels)
            .record(self.started.elapsed().as_secs_f64());
        if self.usage.counts_prompt {
            metrics::counter!(names::PROMPT_TOKENS, &self.labels)
                .increment(self.usage.prompt_tokens as u64);
        }
        metrics::counter!(names::REQUESTS_FINISHED, &self.labels).increment(1);
        let (prompt, cached) = if self.usage.counts_prompt {
            (self.usage.prompt_tokens, self.usage.cached_tokens)
        } else {
            (0, 0)
        };
        for (kind, n) in [
            ("prompt", prompt),
            ("cached", cached),
            ("completion", self.usage.completion_tokens),
        ] {
            metrics::counter!(
                names::TENANT_TOKENS,
                "tenant" => self.tenant.to_string(),
                "model" => self.labels[0].1.clone(),
                "kind" => kind
            )
            .increment(n as u64);
        }
        self.limiter.charge(self.usage.completion_tokens);
        ChoiceEvent::Finished {
            reason,
            usage: self.usage,
        }
    }

    /// The updates one engine event turns into (none, a text piece, a finish, or both).
    fn on_event(&mut self, ev: Option<Event>) -> Vec<ChoiceEvent> {
        match ev {
            Some(Event::Admitted {
                cached_tokens,
                queue_secs,
                at,
            }) => {
                self.usage.cached_tokens = cached_tokens;
                self.usage.queue_secs = queue_secs;
                let queued = at
                    .checked_sub(std::time::Duration::from_secs_f64(queue_secs))
                    .unwrap_or(at);
                self.trace.span("queue", self.parent, queued, at, || {
                    let mut v = self.span_attrs();
                    v.push(KeyValue::new(
                        "gen_ai.usage.cache_read.input_tokens",
                        cached_tokens as i64,
                    ));
                    v
                });
                metrics::histogram!(names::QUEUE_TIME, &self.labels).record(queue_secs);
                tracing::debug!(
                    choice = self.choice,
                    cached_tokens,
                    queue_ms = queue_secs * 1e3,
                    "queued -> prefill"
                );
                Vec::new()
            }
            Some(Event::Prefilled {
                tokens,
                batch_tokens,
                forward,
                at,
            }) => {
                self.chunks += 1;
                let start = at.checked_sub(forward).unwrap_or(at);
                self.trace.span("prefill", self.parent, start, at, || {
                    let mut v = self.span_attrs();
                    v.extend([
                        KeyValue::new("hearth.prefill.chunk", self.chunks as i64),
                        KeyValue::new("hearth.prefill.tokens", tokens as i64),
                        KeyValue::new("hearth.step.tokens", batch_tokens as i64),
                    ]);
                    v
                });
                Vec::new()
            }
            // Tokens the engine ran before it saw the stop: billed (in `Finished`), not shown.
            Some(Event::Token(_)) if self.stopping => Vec::new(),
            Some(Event::Token(s)) => {
                let now = Instant::now();
                if self.usage.completion_tokens == 0 {
                    let ttft = (now - self.started).as_secs_f64();
                    metrics::histogram!(names::TIME_TO_FIRST_TOKEN, &self.labels).record(ttft);
                    tracing::debug!(
                        choice = self.choice,
                        ttft_ms = ttft * 1e3,
                        "prefill -> decode"
                    );
                } else {
                    metrics::histogram!(names::INTER_TOKEN_LATENCY, &self.labels)
                        .record((now - self.last).as_secs_f64());
                }
                self.last = now;
                self.usage.first_token.get_or_insert(now);
                self.usage.last_token = Some(now);
                self.usage.completion_tokens += 1;
                self.quality.push(&s);
                metrics::counter!(names::GENERATION_TOKENS, &self.labels).increment(1);
                let text = match self.text.push(s.token) {
                    Ok(t) => t,
                    Err(e) => return vec![self.failed(e.to_string())],
                };
                let logprobs = if self.want_logprobs {
                    vec![token_logprob(&self.tok, s.token, s.logprob, &s.top)]
                } else {
                    Vec::new()
                };
                if self.text.stopped() {
                    self.stopping = true;
                    self.stop.stop();
                }
                let probe = s.margin.map(|margin| Probe {
                    logprob: s.logprob,
                    margin,
                });
                vec![ChoiceEvent::Text {
                    text,
                    logprobs,
                    probe,
                }]
            }
            Some(Event::Finished { reason, usage }) => {
                // After a stop string the tokens shown are the ones counted (as OpenAI counts them);
                // the device time still covers every step the sequence ran in.
                if !self.stopping {
                    self.usage.completion_tokens = usage.completion_tokens;
                }
                self.usage.device = usage.device;
                if let (Some(first), Some(last)) = (self.usage.first_token, self.usage.last_token) {
                    self.trace.span("decode", self.parent, first, last, || {
                        let mut v = self.span_attrs();
                        v.extend([
                            KeyValue::new(
                                "gen_ai.usage.output_tokens",
                                usage.completion_tokens as i64,
                            ),
                            KeyValue::new(
                                "hearth.decode_device_time_ms",
                                usage.device.decode.as_secs_f64() * 1e3,
                            ),
                            KeyValue::new("hearth.finish", format!("{reason:?}").to_lowercase()),
                        ]);
                        v
                    });
                }
                let rest = self.text.finish().unwrap_or_default();
                let reason = match reason {
                    engine::FinishReason::Length if !self.stopping => FinishReason::Length,
                    _ => FinishReason::Stop,
                };
                let mut out = Vec::new();
                if !rest.is_empty() {
                    out.push(ChoiceEvent::Text {
                        text: rest,
                        logprobs: Vec::new(),
                        probe: None,
                    });
                }
                out.push(self.finished(reason));
                out
            }
            Some(Event::Error(e)) => vec![self.failed(e)],
            None => vec![self.failed("the engine stopped".into())],
        }
    }

    fn failed(&mut self, msg: String) -> ChoiceEvent {
        self.done = true;
        tracing::error!(choice = self.choice, error = %msg, "failed");
        ChoiceEvent::Failed(msg)
    }
}

/// One choice as a stream of updates; it ends after its finish or failure.
fn choice_stream(st: ChoiceState) -> impl Stream<Item = Update> + Send {
    stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        let ev = st.rx.recv_async().await.ok();
        let choice = st.choice;
        let updates: Vec<Update> = st
            .on_event(ev)
            .into_iter()
            .map(|event| Update { choice, event })
            .collect();
        Some((stream::iter(updates), st))
    })
    .flatten()
}

/// Every choice of a request started on `engine`, merged into one stream (fair between choices),
/// and their stop handles. The first `probe_tokens` tokens of each carry the router's signal.
pub(super) fn start(
    spec: &Spec,
    engine: &EngineHandle,
    prompts: &[Vec<u32>],
    probe_tokens: usize,
) -> Result<(BoxStream<'static, Update>, Vec<engine::StopHandle>), ApiError> {
    let subs = submit_all(spec, engine, prompts, probe_tokens)?;
    let stops = subs.iter().map(|(_, _, (_, stop))| stop.clone()).collect();
    let streams = subs.into_iter().map(|(choice, prompt_len, (rx, stop))| {
        choice_stream(ChoiceState {
            choice,
            rx,
            stop,
            stopping: false,
            text: TextStream::new(engine.tokenizer.clone(), spec.stops.clone()),
            tok: engine.tokenizer.clone(),
            labels: [("model", engine.name.clone())],
            tenant: spec.tenant.name.clone(),
            limiter: spec.limiter.clone(),
            want_logprobs: spec.want_logprobs,
            started: spec.started,
            last: spec.started,
            usage: ChoiceUsage {
                prompt_tokens: prompt_len,
                completion_tokens: 0,
                cached_tokens: 0,
                counts_prompt: choice % spec.n == 0,
                queue_secs: 0.0,
                first_token: None,
                last_token: None,
                device: engine::DeviceTime::default(),
                quality: None,
            },
            quality: Default::default(),
            trace: spec.trace.clone(),
            parent: spec.parent,
            chunks: 0,
            done: false,
        })
        .boxed()
    });
    Ok((stream::select_all(streams).boxed(), stops))
}

/// The job's update stream: its choices on its model, through the router's cascade, or the
/// replay of a cached answer (the router's decision, the whole text, the finish with the original
/// usage and no device time).
fn updates(job: &Job) -> Result<(BoxStream<'static, Update>, StopSet), ApiError> {
    let spec = Spec::of(job);
    match &job.source {
        Source::Live {
            engine,
            prompts,
            route: None,
        } => {
            let (updates, stops) = start(&spec, engine, prompts, 0)?;
            Ok((updates, StopSet::new(stops)))
        }
        Source::Live {
            engine,
            prompts,
            route: Some(plan),
        } => super::cascade::run(spec, plan.clone(), engine, prompts),
        Source::Cached(a) => {
            let now = Instant::now();
            let routed = a.route.clone().map(|d| ChoiceEvent::Routed(Box::new(d)));
            let events = routed.into_iter().chain([
                ChoiceEvent::Text {
                    text: a.text.clone(),
                    logprobs: a.logprobs.clone(),
                    probe: None,
                },
                ChoiceEvent::Finished {
                    reason: a.reason,
                    usage: ChoiceUsage {
                        prompt_tokens: a.prompt_tokens,
                        completion_tokens: a.completion_tokens,
                        cached_tokens: a.cached_tokens,
                        counts_prompt: true,
                        queue_secs: 0.0,
                        first_token: Some(now),
                        last_token: Some(now),
                        device: engine::DeviceTime::default(),
                        // A replay generated nothing: no signals of its own.
                        quality: None,
                    },
                },
            ]);
            let updates: Vec<Update> = events.map(|event| Update { choice: 0, event }).collect();
            Ok((stream::iter(updates).boxed(), StopSet::new(Vec::new())))
        }
    }
}

/// A response's running count, and its ledger row: whoever ends the response writes the row
/// once, with every choice's usage and device time.
struct Tally {
    updates: BoxStream<'static, Update>,
    stops: StopSet,
    /// The usage of the choices finished so far.
    finishes: Vec<ChoiceUsage>,
    /// The router's decision, for a routed request.
    route: Option<Decision>,
    receipt: Receipt,
    /// The request's arrival.
    started: Instant,
    /// Already draining after its client left (a second drop writes what it has).
    draining: bool,
    /// The response cache's part (`metrics.cache`), and on a miss where the answer goes, with
    /// the first choice's text and log-probabilities gathered for it.
    cache: Option<super::openai::CacheMetrics>,
    store: Option<super::cached::Store>,
    recorded: (String, Vec<TokenLogprob>),
}

impl Tally {
    fn new(updates: BoxStream<'static, Update>, stops: StopSet, job: &mut Job) -> Self {
        Self {
            updates,
            stops,
            finishes: Vec::new(),
            route: None,
            receipt: job.receipt.take(),
            started: job.started,
            draining: false,
            cache: job.cache.take(),
            store: job.store.take(),
            recorded: Default::default(),
        }
    }

    /// Usage and measurements of the choices finished so far (the semantic lookup's embedding
    /// counts as prefill device time).
    fn totals(&self) -> (Usage, ResponseMetrics) {
        let mut metrics = metrics_of(&self.finishes, self.started);
        metrics.route = self.route.clone();
        if let Some(c) = &self.cache {
            metrics.device_time_ms += c.lookup_device_time_ms;
            metrics.prefill_device_time_ms += c.lookup_device_time_ms;
            metrics.cache = Some(c.clone());
        }
        (usage_of(&self.finishes), metrics)
    }

    /// Gather the first choice's text for the response cache (only on a miss) and the trace
    /// (only when it exports content).
    fn record(&mut self, choice: usize, text: &str, logprobs: &[TokenLogprob]) {
        if choice != 0 {
            return;
        }
        self.receipt.trace().output(text);
        if self.store.is_some() {
            self.recorded.0.push_str(text);
            self.recorded.1.extend_from_slice(logprobs);
        }
    }

    /// Keep a finished answer in the response cache (a miss that ended normally, not in calls).
    fn keep(&mut self, reason: FinishReason, usage: &Usage, metrics: &ResponseMetrics) {
        let Some(store) = self.store.take() else {
            return;
        };
        if reason == FinishReason::ToolCalls {
            return;
        }
        let (text, logprobs) = std::mem::take(&mut self.recorded);
        let lookup = store.metrics.lookup_device_time_ms;
        store.put(crate::cache::Answer {
            text,
            logprobs,
            reason,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cached_tokens: usage.prompt_tokens_details.cached_tokens,
            device_ms: (metrics.device_time_ms - lookup).max(0.0),
            route: self.route.clone(),
        });
    }

    /// Write the row of a response that ends early, with what was counted by then.
    fn finish_cut(&mut self, status: u16, reason: &'static str) {
        let (usage, metrics) = self.totals();
        self.receipt.finish(Ending::Cut {
            status,
            reason,
            usage: &usage,
            metrics: &metrics,
        });
    }
}

impl Drop for Tally {
    /// Dropped before its row was written: the client left. Its unfinished choices are stopped
    /// and their last events (which carry the device time they used) drained in the background,
    /// so the row bills everything the request ran.
    fn drop(&mut self) {
        if self.receipt.is_written() {
            return;
        }
        let runtime = tokio::runtime::Handle::try_current();
        if self.draining || runtime.is_err() {
            self.finish_cut(499, "client_closed");
            return;
        }
        self.stops.stop_all();
        let mut rest = Tally {
            updates: std::mem::replace(&mut self.updates, stream::empty().boxed()),
            stops: self.stops.clone(),
            finishes: std::mem::take(&mut self.finishes),
            route: self.route.take(),
            receipt: self.receipt.take(),
            started: self.started,
            draining: true,
            cache: self.cache.take(),
            store: None,
            recorded: Default::default(),
        };
        if let Ok(rt) = runtime {
            rt.spawn(async move {
                while let Some(u) = rest.updates.next().await {
                    if let ChoiceEvent::Finished { usage, .. } = u.event {
                        rest.finishes.push(usage);
                    }
                }
                rest.finish_cut(499, "client_closed");
            });
        }
    }
}

fn usage_of(finishes: &[ChoiceUsage]) -> Usage {
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
    Usage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        prompt_tokens_details: PromptTokensDetails {
            cached_tokens: cached,
        },
    }
}

/// The request's measurements from its choices' usage; `started` is its arrival.
fn metrics_of(finishes: &[ChoiceUsage], started: Instant) -> ResponseMetrics {
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let first = finishes.iter().filter_map(|f| f.first_token).min();
    let last = finishes.iter().filter_map(|f| f.last_token).max();
    let (mut gaps, mut gap_time) = (0usize, std::time::Duration::ZERO);
    for f in finishes {
        if let (Some(a), Some(b)) = (f.first_token, f.last_token) {
            gaps += f.completion_tokens.saturating_sub(1);
            gap_time += b - a;
        }
    }
    let completion: usize = finishes.iter().map(|f| f.completion_tokens).sum();
    let device = finishes
        .iter()
        .fold(engine::DeviceTime::default(), |mut acc, f| {
            acc += f.device;
            acc
        });
    let life = last.map_or(started.elapsed(), |l| l - started);
    ResponseMetrics {
        queue_time_ms: finishes
            .iter()
            .map(|f| f.queue_secs * 1e3)
            .fold(0.0, f64::max),
        time_to_first_token_ms: first.map(|t| ms(t - started)),
        generation_time_ms: match (first, last) {
            (Some(a), Some(b)) => ms(b - a),
            _ => 0.0,
        },
        mean_itl_ms: (gaps > 0).then(|| ms(gap_time) / gaps as f64),
        tokens_per_second: completion as f64 / life.as_secs_f64().max(1e-9),
        device_time_ms: ms(device.total()),
        prefill_device_time_ms: ms(device.prefill),
        decode_device_time_ms: ms(device.decode),
        route: None,
        cache: None,
        quality: crate::quality::Quality::combine(finishes.iter().filter_map(|f| f.quality)),
    }
}

/// Legacy completions' logprobs object; `offset` is the text offset of the first token.
fn legacy_logprobs(lps: &[TokenLogprob], offset: usize) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let mut at = offset;
    for t in lps {
        out.text_offset.push(at);
        at += t.token.len();
        out.tokens.push(t.token.clone());
        out.token_logprobs.push(t.logprob);
        out.top_logprobs.push(
            t.top_logprobs
                .iter()
                .map(|x| (x.token.clone(), x.logprob))
                .collect(),
        );
    }
    out
}

/// A whole response body: chat or text completion.
#[derive(Debug, serde::Serialize)]
#[serde(untagged)]
pub enum Body {
    Chat(ChatCompletion),
    Completion(Completion),
}

impl Body {
    pub fn metrics(&self) -> Option<&ResponseMetrics> {
        match self {
            Self::Chat(c) => Some(&c.metrics),
            Self::Completion(c) => c.metrics.as_ref(),
        }
    }
}

/// Run to completion: the fold over the updates.
pub async fn complete(mut job: Job) -> Result<Body, ApiError> {
    let mut tally = match updates(&job) {
        Ok((updates, stops)) => Tally::new(updates, stops, &mut job),
        Err(e) => {
            job.receipt.refuse(&e);
            return Err(e);
        }
    };
    let total = job.source.prompts() * job.req.n;
    let mut texts = vec![String::new(); total];
    let mut lps: Vec<Vec<TokenLogprob>> = vec![Vec::new(); total];
    let mut finishes: Vec<Option<(FinishReason, ChoiceUsage)>> = vec![None; total];
    while let Some(u) = tally.updates.next().await {
        match u.event {
            ChoiceEvent::Text { text, logprobs, .. } => {
                tally.record(u.choice, &text, &logprobs);
                texts[u.choice].push_str(&text);
                lps[u.choice].extend(logprobs);
            }
            ChoiceEvent::Routed(d) => tally.route = Some(*d),
            ChoiceEvent::Finished { reason, usage } => {
                finishes[u.choice] = Some((reason, usage));
                tally.finishes.push(usage);
            }
            ChoiceEvent::Failed(e) => {
                tally.receipt.finish(Ending::Failed { message: &e });
                return Err(ApiError::internal(e));
            }
        }
    }
    // A chat reply made of calls becomes `tool_calls` (and finishes as such, in the ledger too).
    let calls_wanted = job.req.tools.is_some() && job.req.kind == Kind::Chat;
    let mut calls: Vec<Option<Vec<tools::Call>>> = texts
        .iter()
        .map(|t| calls_wanted.then(|| tools::parse_calls(t)).flatten())
        .collect();
    let reason = |i: usize| match calls[i] {
        Some(_) => FinishReason::ToolCalls,
        None => finishes[i].map(|f| f.0).unwrap_or(FinishReason::Stop),
    };
    let (usage, metrics) = tally.totals();
    tally.keep(reason(0), &usage, &metrics);
    tally.receipt.finish(Ending::Finished {
        reason: reason(0),
        usage: &usage,
        metrics: &metrics,
    });
    let reasons: Vec<FinishReason> = (0..total).map(reason).collect();
    let want = job.req.want_logprobs;
    let model = match &tally.route {
        Some(d) => d.model.clone(),
        None => job.req.model,
    };
    let (id, created) = (response_id(job.req.kind), now_secs());
    Ok(match job.req.kind {
        Kind::Chat => Body::Chat(ChatCompletion {
            id,
            object: "chat.completion",
            created,
            model,
            choices: texts
                .into_iter()
                .zip(lps)
                .enumerate()
                .map(|(i, (content, lp))| {
                    let (content, tool_calls) = match calls[i].take() {
                        Some(c) => (None, Some(ToolCallOut::from_calls(c, false))),
                        None => (Some(content), None),
                    };
                    ChatChoice {
                        index: i,
                        message: ChatMessageOut {
                            role: "assistant",
                            content,
                            tool_calls,
                            refusal: None,
                        },
                        logprobs: want.then_some(ChatLogprobs {
                            content: lp,
                            refusal: None,
                        }),
                        finish_reason: reasons[i],
                    }
                })
                .collect(),
            usage,
            metrics,
        }),
        Kind::Completion => Body::Completion(Completion {
            id,
            object: "text_completion",
            created,
            model,
            choices: texts
                .into_iter()
                .zip(lps)
                .enumerate()
                .map(|(i, (text, lp))| CompletionChoice {
                    index: i,
                    text,
                    logprobs: want.then(|| legacy_logprobs(&lp, 0)),
                    finish_reason: Some(reasons[i]),
                })
                .collect(),
            usage: Some(usage),
            metrics: Some(metrics),
        }),
    })
}

/// What the SSE map keeps between updates.
struct SseState {
    tally: Tally,
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    want_logprobs: bool,
    include_usage: bool,
    total: usize,
    /// Text bytes sent per choice (legacy logprobs' offsets).
    offsets: Vec<usize>,
    /// Held while the stream runs (the tenant's concurrency slot).
    _admission: crate::tenancy::limits::Admission,
    /// The first choice to finish's reason, for the ledger.
    first_reason: Option<FinishReason>,
    phase: Phase,
    /// Turns true at the server's drain deadline.
    cut: tokio::sync::watch::Receiver<bool>,
    /// Routed: the first chunk waits for the router's decision (it names the model).
    routed: bool,
    /// An update read while waiting for the decision.
    stash: Option<Update>,
    /// With tools: per choice, the text held while it may still be function calls (a reply that
    /// starts with `<`), and chunks ready to go out.
    held: Vec<Option<(String, Vec<TokenLogprob>)>>,
    queued: VecDeque<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Start,
    Body,
    Done,
    End,
}

impl SseState {
    /// A chat chunk with these choices (and, on the last, the totals), as JSON.
    fn chat_chunk(
        &self,
        choices: Vec<ChatChunkChoice>,
        totals: Option<(Usage, ResponseMetrics)>,
    ) -> String {
        let (usage, metrics) = totals.unzip();
        serde_json::to_string(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
            metrics,
        })
        .unwrap_or_default()
    }

    /// A text-completion chunk with these choices (and, on the last, the totals), as JSON.
    fn completion_chunk(
        &self,
        choices: Vec<CompletionChoice>,
        totals: Option<(Usage, ResponseMetrics)>,
    ) -> String {
        let (usage, metrics) = totals.unzip();
        serde_json::to_string(&Completion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
            metrics,
        })
        .unwrap_or_default()
    }

    fn chunk(
        &self,
        choice: usize,
        text: String,
        lps: Vec<TokenLogprob>,
        fin: Option<FinishReason>,
    ) -> String {
        match self.kind {
            Kind::Chat => self.chat_chunk(
                vec![ChatChunkChoice {
                    index: choice,
                    delta: ChatDelta {
                        role: None,
                        content: (!text.is_empty()).then_some(text),
                        tool_calls: None,
                    },
                    logprobs: self.want_logprobs.then_some(ChatLogprobs {
                        content: lps,
                        refusal: None,
                    }),
                    finish_reason: fin,
                }],
                None,
            ),
            Kind::Completion => self.completion_chunk(
                vec![CompletionChoice {
                    index: choice,
                    logprobs: self
                        .want_logprobs
                        .then(|| legacy_logprobs(&lps, self.offsets[choice])),
                    text,
                    finish_reason: fin,
                }],
                None,
            ),
        }
    }

    /// With tools, a choice's text is held until it is plainly not calls (its first character is
    /// not `<`), or until it finishes: then calls go out as one `tool_calls` delta and a finish
    /// chunk. Returns what to send now as ordinary text (None: nothing yet, or queued).
    fn hold(
        &mut self,
        choice: usize,
        text: String,
        lps: Vec<TokenLogprob>,
        fin: Option<FinishReason>,
    ) -> Option<(String, Vec<TokenLogprob>)> {
        let Some(held) = self.held.get_mut(choice).and_then(Option::as_mut) else {
            return Some((text, lps));
        };
        held.0.push_str(&text);
        held.1.extend(lps);
        let start = held.0.trim_start().chars().next();
        if fin.is_none() && start.is_none_or(|c| c == '<') {
            return None;
        }
        let (text, lps) = self.held[choice].take().unwrap_or_default();
        if fin.is_none() {
            return Some((text, lps));
        }
        match tools::parse_calls(&text) {
            Some(calls) => {
                let delta = |tool_calls, finish_reason| ChatChunkChoice {
                    index: choice,
                    delta: ChatDelta {
                        role: None,
                        content: None,
                        tool_calls,
                    },
                    logprobs: None,
                    finish_reason,
                };
                if choice == 0 {
                    self.first_reason = Some(FinishReason::ToolCalls);
                }
                let calls = ToolCallOut::from_calls(calls, true);
                let a = self.chat_chunk(vec![delta(Some(calls), None)], None);
                let b = self.chat_chunk(vec![delta(None, Some(FinishReason::ToolCalls))], None);
                self.queued.extend([a, b]);
                None
            }
            None => Some((text, lps)),
        }
    }

    fn role_chunk(&self) -> String {
        let choices = (0..self.total)
            .map(|i| ChatChunkChoice {
                index: i,
                delta: ChatDelta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                    tool_calls: None,
                },
                logprobs: None,
                finish_reason: None,
            })
            .collect();
        self.chat_chunk(choices, None)
    }

    fn usage_chunk(&self, totals: (Usage, ResponseMetrics)) -> String {
        match self.kind {
            Kind::Chat => self.chat_chunk(Vec::new(), Some(totals)),
            Kind::Completion => self.completion_chunk(Vec::new(), Some(totals)),
        }
    }

    /// The next SSE data payload.
    async fn next(&mut self) -> Option<String> {
        loop {
            match self.phase {
                Phase::Start => {
                    self.phase = Phase::Body;
                    if self.routed {
                        // The first chunk names the model that answers: wait for the decision.
                        match self.tally.updates.next().await {
                            Some(Update {
                                event: ChoiceEvent::Routed(d),
                                ..
                            }) => {
                                self.model = d.model.clone();
                                self.tally.route = Some(*d);
                            }
                            other => self.stash = other,
                        }
                    }
                    if self.kind == Kind::Chat {
                        return Some(self.role_chunk());
                    }
                }
                Phase::Body => {
                    if let Some(chunk) = self.queued.pop_front() {
                        return Some(chunk);
                    }
                    let stashed = self.stash.take();
                    let next = tokio::select! {
                        u = async { match stashed { Some(u) => Some(u), None => self.tally.updates.next().await } } => Some(u),
                        Ok(_) = self.cut.wait_for(|cut| *cut) => None,
                    };
                    let Some(next) = next else {
                        self.phase = Phase::Done;
                        self.tally.finish_cut(503, "shutting_down");
                        let err = ErrorResponse::new(
                            "the server is shutting down: this stream was cut at the drain deadline",
                            "server_error",
                            None,
                            Some("shutting_down"),
                        );
                        return Some(serde_json::to_string(&err).unwrap_or_default());
                    };
                    let Some(u) = next else {
                        self.phase = Phase::Done;
                        let (usage, metrics) = self.tally.totals();
                        let reason = self.first_reason.unwrap_or(FinishReason::Stop);
                        self.tally.keep(reason, &usage, &metrics);
                        self.tally.receipt.finish(Ending::Finished {
                            reason,
                            usage: &usage,
                            metrics: &metrics,
                        });
                        if self.include_usage {
                            return Some(self.usage_chunk((usage, metrics)));
                        }
                        continue;
                    };
                    let (text, lps, fin) = match u.event {
                        ChoiceEvent::Text { text, logprobs, .. } => {
                            self.tally.record(u.choice, &text, &logprobs);
                            (text, logprobs, None)
                        }
                        ChoiceEvent::Routed(d) => {
                            self.model = d.model.clone();
                            self.tally.route = Some(*d);
                            continue;
                        }
                        ChoiceEvent::Finished { reason, usage } => {
                            self.tally.finishes.push(usage);
                            if u.choice == 0 {
                                self.first_reason = Some(reason);
                            }
                            (String::new(), Vec::new(), Some(reason))
                        }
                        ChoiceEvent::Failed(e) => {
                            self.phase = Phase::Done;
                            self.tally.receipt.finish(Ending::Failed { message: &e });
                            let err = ErrorResponse::new(
                                &e,
                                "server_error",
                                None,
                                Some("internal_error"),
                            );
                            return Some(serde_json::to_string(&err).unwrap_or_default());
                        }
                    };
                    let Some((text, lps)) = self.hold(u.choice, text, lps, fin) else {
                        continue;
                    };
                    if text.is_empty() && lps.is_empty() && fin.is_none() {
                        continue;
                    }
                    let chunk = self.chunk(u.choice, text.clone(), lps, fin);
                    self.offsets[u.choice] += text.len();
                    return Some(chunk);
                }
                Phase::Done => {
                    self.phase = Phase::End;
                    return Some("[DONE]".to_string());
                }
                Phase::End => return None,
            }
        }
    }
}

/// Start the choices and return the SSE data payloads: the map over the updates, then the usage
/// chunk (if asked for) and `[DONE]`.
pub fn stream(
    mut job: Job,
    cut: tokio::sync::watch::Receiver<bool>,
) -> Result<impl Stream<Item = String> + Send + 'static, ApiError> {
    let tally = match updates(&job) {
        Ok((updates, stops)) => Tally::new(updates, stops, &mut job),
        Err(e) => {
            job.receipt.refuse(&e);
            return Err(e);
        }
    };
    let total = job.source.prompts() * job.req.n;
    let st = SseState {
        tally,
        kind: job.req.kind,
        id: response_id(job.req.kind),
        created: now_secs(),
        model: job.req.model,
        want_logprobs: job.req.want_logprobs,
        include_usage: job.req.include_usage,
        total,
        offsets: vec![0; total],
        _admission: job.admission,
        first_reason: None,
        phase: Phase::Start,
        cut,
        routed: job.source.routed(),
        stash: None,
        held: vec![job.req.tools.as_ref().map(|_| (String::new(), Vec::new())); total],
        queued: VecDeque::new(),
    };
    Ok(stream::unfold(st, |mut st| async move {
        st.next().await.map(|s| (s, st))
    }))
}
