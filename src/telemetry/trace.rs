//! Request traces over OTLP. A request's spans are recorded as plain timestamps while it runs (the
//! engine steps, the choice streams and the cascade each add theirs) and handed to the OpenTelemetry
//! SDK once, when the request ends: nothing is built per token, and a request with tracing off
//! records nothing at all. The SDK's batch processor exports on its own thread.
use std::borrow::Cow;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider,
};
use serde::Deserialize;

use crate::error::{HearthError, Result};

/// How spans travel to the collector.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum OtlpProtocol {
    /// Protobuf over HTTP POST to `{otlp_endpoint}/v1/traces` (the collector's port 4318).
    #[default]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// OTLP/gRPC (the collector's port 4317).
    #[serde(rename = "grpc")]
    Grpc,
}

/// The trace settings of the config file.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceConfig {
    /// The collector's base URL, e.g. `http://localhost:4318`.
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    /// Export prompts and outputs as span attributes (off: only sizes and timings leave).
    pub content: bool,
    /// Share of new traces kept; a client's sampled `traceparent` decides for its own.
    pub sample_ratio: f64,
}

/// The exporter and tracer, shared by every request.
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    content: bool,
    /// Share of requests without a client trace that are traced.
    ratio: f64,
}

impl Tracing {
    /// Build the exporter (it connects lazily: a collector that is down loses spans, never
    /// requests). Call inside the Tokio runtime (the gRPC channel's worker is spawned on it).
    pub fn start(cfg: &TraceConfig) -> Result<Arc<Self>> {
        let bad = |e: opentelemetry_otlp::ExporterBuildError| {
            HearthError::Config(format!("otlp_endpoint `{}`: {e}", cfg.endpoint))
        };
        let exporter = match cfg.protocol {
            OtlpProtocol::HttpProtobuf => {
                let base = cfg.endpoint.trim_end_matches('/');
                let url = if base.ends_with("/v1/traces") {
                    base.to_string()
                } else {
                    format!("{base}/v1/traces")
                };
                opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_endpoint(url)
                    .with_timeout(Duration::from_secs(10))
                    .build()
                    .map_err(bad)?
            }
            OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(cfg.endpoint.clone())
                .with_timeout(Duration::from_secs(10))
                .build()
                .map_err(bad)?,
        };
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(
                std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "hearth".into()),
            )
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        // Whether a request is traced is decided at its arrival (see `begin`), so that an
        // unsampled one records nothing: what reaches the SDK is kept.
        // A request's spans arrive together when it ends: room for a few thousand requests'
        // worth between exports, so a burst is not dropped.
        let batches = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_max_queue_size(1 << 16)
                    .with_max_export_batch_size(2048)
                    .build(),
            )
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(batches)
            .with_sampler(Sampler::AlwaysOn)
            .with_resource(resource)
            .build();
        let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "hearth");
        tracing::info!(endpoint = %cfg.endpoint, protocol = ?cfg.protocol, content = cfg.content, "exporting request traces over OTLP");
        Ok(Arc::new(Self {
            provider,
            tracer,
            content: cfg.content,
            ratio: cfg.sample_ratio.clamp(0.0, 1.0),
        }))
    }

    /// A request's trace, begun at its arrival, under the client's `traceparent` if it sent one.
    /// A client's trace is kept or dropped as its sampled flag says (W3C parent-based sampling);
    /// others by `otlp_sample_ratio`.
    pub fn begin(self: &Arc<Self>, headers: &axum::http::HeaderMap, arrived: Instant) -> Trace {
        let parent =
            TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
        let client = parent.span().span_context().clone();
        let sampled = if client.is_valid() {
            client.is_sampled()
        } else {
            self.ratio >= 1.0 || rand::random::<f64>() < self.ratio
        };
        if !sampled {
            return Trace::off();
        }
        Trace(Some(Arc::new(Recording {
            tracing: self.clone(),
            parent,
            epoch: (Instant::now(), SystemTime::now()),
            arrived,
            state: Mutex::new(State::default()),
        })))
    }

    /// Export what is buffered now (benchmarks; the batch processor exports on its own schedule).
    pub fn flush(&self) {
        if let Err(e) = self.provider.force_flush() {
            tracing::warn!(error = %e, "trace export failed");
        }
    }

    /// Export what is buffered and stop (at shutdown; later spans are dropped).
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "trace exporter did not shut down cleanly");
        }
    }
}

/// A span recorded under a request's trace (None: the request's own span).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanRef(usize);

/// One request's trace while it runs; a no-op when tracing is off (or the request not traced).
#[derive(Clone, Default)]
pub struct Trace(Option<Arc<Recording>>);

pub struct Recording {
    tracing: Arc<Tracing>,
    parent: Context,
    /// One instant read with the wall clock: spans are timed on the monotonic clock and dated
    /// from here.
    epoch: (Instant, SystemTime),
    arrived: Instant,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    name: String,
    attrs: Vec<KeyValue>,
    spans: Vec<Recorded>,
    /// The first choice's text, kept only when content is exported.
    output: String,
    ended: bool,
}

struct Recorded {
    name: Cow<'static, str>,
    parent: Option<SpanRef>,
    start: Instant,
    /// None: still open; it ends with the request.
    end: Option<Instant>,
    attrs: Vec<KeyValue>,
}

impl Trace {
    pub fn off() -> Self {
        Self(None)
    }

    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// Whether prompts and outputs are exported.
    pub fn content(&self) -> bool {
        self.0.as_ref().is_some_and(|r| r.tracing.content)
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> Option<T> {
        let r = self.0.as_ref()?;
        let mut st = r.state.lock().unwrap_or_else(PoisonError::into_inner);
        (!st.ended).then(|| f(&mut st))
    }

    /// A finished span from `start` to `end` (attributes built only when traced).
    pub fn span(
        &self,
        name: &'static str,
        parent: Option<SpanRef>,
        start: Instant,
        end: Instant,
        attrs: impl FnOnce() -> Vec<KeyValue>,
    ) -> Option<SpanRef> {
        self.record(name, parent, start, Some(end), attrs)
    }

    /// A span from `start` that ends with the request.
    pub fn open(
        &self,
        name: &'static str,
        parent: Option<SpanRef>,
        start: Instant,
        attrs: impl FnOnce() -> Vec<KeyValue>,
    ) -> Option<SpanRef> {
        self.record(name, parent, start, None, attrs)
    }

    fn record(
        &self,
        name: &'static str,
        parent: Option<SpanRef>,
        start: Instant,
        end: Option<Instant>,
        attrs: impl FnOnce() -> Vec<KeyValue>,
    ) -> Option<SpanRef> {
        self.with(|st| {
            st.spans.push(Recorded {
                name: Cow::Borrowed(name),
                parent,
                start,
                end,
                attrs: attrs(),
            });
            SpanRef(st.spans.len() - 1)
        })
    }

    /// End an open span early, with more attributes.
    pub fn close(
        &self,
        span: Option<SpanRef>,
        end: Instant,
        attrs: impl FnOnce() -> Vec<KeyValue>,
    ) {
        let Some(SpanRef(i)) = span else { return };
        self.with(|st| {
            if let Some(s) = st.spans.get_mut(i) {
                s.end = Some(end);
                s.attrs.extend(attrs());
            }
        });
    }

    /// Name the request's own span (`{operation} {model}`, as the GenAI conventions name it).
    pub fn name(&self, name: impl FnOnce() -> String) {
        self.with(|st| st.name = name());
    }

    /// Attributes of the request's own span.
    pub fn set(&self, attrs: impl FnOnce() -> Vec<KeyValue>) {
        self.with(|st| st.attrs.extend(attrs()));
    }

    /// Text of the first choice, kept when content is exported.
    pub fn output(&self, text: &str) {
        if self.content() {
            self.with(|st| st.output.push_str(text));
        }
    }

    /// The first choice's text gathered so far.
    pub fn take_output(&self) -> String {
        self.with(|st| std::mem::take(&mut st.output))
            .unwrap_or_default()
    }

    /// End the request (once): its span and every span under it go to the exporter. `error`
    /// marks the request failed.
    pub fn end(&self, error: Option<String>) {
        let Some(r) = self.0.as_ref() else { return };
        let Some(st) = self.with(|st| {
            st.ended = true;
            State {
                name: std::mem::take(&mut st.name),
                attrs: std::mem::take(&mut st.attrs),
                spans: std::mem::take(&mut st.spans),
                output: String::new(),
                ended: true,
            }
        }) else {
            return;
        };
        r.export(st, Instant::now(), error);
    }
}

impl Recording {
    fn at(&self, t: Instant) -> SystemTime {
        let (i0, s0) = self.epoch;
        match t.checked_duration_since(i0) {
            Some(d) => s0 + d,
            None => s0 - (i0 - t),
        }
    }

    fn export(&self, st: State, end: Instant, error: Option<String>) {
        let tracer = &self.tracing.tracer;
        let name = if st.name.is_empty() {
            "request".to_string()
        } else {
            st.name
        };
        let mut root = tracer
            .span_builder(name)
            .with_kind(SpanKind::Server)
            .with_start_time(self.at(self.arrived))
            .with_attributes(st.attrs)
            .start_with_context(tracer, &self.parent);
        if let Some(e) = error {
            root.set_status(Status::error(e));
        }
        let root = self.parent.with_span(root);
        let mut made: Vec<(Context, Instant)> = Vec::with_capacity(st.spans.len());
        for s in st.spans {
            // A parent is always recorded before its children.
            let parent = match s.parent {
                Some(SpanRef(i)) => made.get(i).map_or(&root, |(c, _)| c),
                None => &root,
            };
            let span = tracer
                .span_builder(s.name)
                .with_kind(SpanKind::Internal)
                .with_start_time(self.at(s.start))
                .with_attributes(s.attrs)
                .start_with_context(tracer, parent);
            made.push((parent.with_span(span), s.end.unwrap_or(end).max(s.start)));
        }
        for (cx, t) in made {
            cx.span().end_with_timestamp(self.at(t));
        }
        root.span().end_with_timestamp(self.at(end));
    }
}
