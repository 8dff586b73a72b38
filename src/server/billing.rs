//! A request's usage-ledger row: begun once its tenant is known (from the key), written exactly once
//! when the request ends: finished, refused, failed, cut at shutdown, or left by its client (then on
//! drop, with what was counted so far).
use std::sync::Arc;
use std::time::Instant;

use super::console::errors::{ErrorEntry, ErrorLog};
use super::openai::{FinishReason, ResponseMetrics, Usage};
use crate::ledger::{now_ms, Ledger, Row};
use crate::telemetry::trace::Trace;
use crate::tenancy::Tenant;

pub struct Receipt {
    ledger: Option<Arc<Ledger>>,
    /// The request's trace, which goes out with the row.
    trace: Trace,
    /// Where an error ending is also noted (the console's recent errors).
    errors: Option<Arc<ErrorLog>>,
    row: Row,
    started: Instant,
    done: bool,
}

/// How a request ended, for the row.
pub enum Ending<'a> {
    Finished {
        reason: FinishReason,
        usage: &'a Usage,
        metrics: &'a ResponseMetrics,
    },
    /// The client left (or the stream was cut) before the end, with what was counted by then.
    Cut {
        status: u16,
        reason: &'static str,
        usage: &'a Usage,
        metrics: &'a ResponseMetrics,
    },
    /// An embedding request, answered.
    Embedded {
        tokens: usize,
        device_ms: f64,
        queue_ms: f64,
    },
    /// Refused or failed before producing anything.
    Refused {
        status: u16,
        message: &'a str,
    },
    Failed {
        message: &'a str,
    },
    /// Dropped with no ending: the client left before anything was counted.
    ClientClosed,
}

impl Receipt {
    pub fn new(
        ledger: Option<Arc<Ledger>>,
        tenant: &Tenant,
        key_id: &str,
        request_id: &str,
        started: Instant,
        trace: Trace,
        errors: Option<Arc<ErrorLog>>,
    ) -> Self {
        Self {
            ledger,
            trace,
            errors,
            row: Row {
                request_id: request_id.into(),
                tenant: tenant.name.to_string(),
                key_id: key_id.into(),
                ..Default::default()
            },
            started,
            done: false,
        }
    }

    /// The validated request's model and `user` label.
    pub fn set_request(&mut self, model: &str, user: Option<&str>) {
        self.row.model = model.into();
        self.row.user = user.map(String::from);
    }

    /// The request's trace (off unless `otlp_endpoint` is set).
    pub fn trace(&self) -> &Trace {
        &self.trace
    }

    /// Write the row of a request refused with `e`.
    pub fn refuse(&mut self, e: &super::error::ApiError) {
        self.finish(Ending::Refused {
            status: e.status.as_u16(),
            message: &e.message,
        });
    }

    /// Whether the row has been written (or handed on by `take`).
    pub fn is_written(&self) -> bool {
        self.done
    }

    /// Hand the unwritten row to a new receipt (which writes it); this one writes nothing.
    pub fn take(&mut self) -> Self {
        let taken = Self {
            ledger: self.ledger.take(),
            trace: std::mem::take(&mut self.trace),
            errors: self.errors.take(),
            row: std::mem::take(&mut self.row),
            started: self.started,
            done: self.done,
        };
        self.done = true;
        taken
    }

    /// Write the row (once; later calls do nothing).
    pub fn finish(&mut self, ending: Ending<'_>) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let mut row = std::mem::take(&mut self.row);
        let mut error = None;
        let (status, reason, counted) = match ending {
            Ending::Finished {
                reason,
                usage,
                metrics,
            } => {
                let r = match reason {
                    FinishReason::Stop => "stop",
                    FinishReason::Length => "length",
                    FinishReason::ToolCalls => "tool_calls",
                };
                (200, r, Some((usage, metrics)))
            }
            Ending::Cut {
                status,
                reason,
                usage,
                metrics,
            } => (status, reason, Some((usage, metrics))),
            Ending::Embedded {
                tokens,
                device_ms,
                queue_ms,
            } => {
                row.prompt_tokens = tokens as u64;
                row.prefill_device_ms = device_ms;
                row.queue_ms = queue_ms;
                (200, "embedded", None)
            }
            Ending::Refused { status, message } => {
                error = Some(message);
                (status, "refused", None)
            }
            Ending::Failed { message } => {
                error = Some(message);
                (500, "error", None)
            }
            Ending::ClientClosed => (499, "client_closed", None),
        };
        row.status = status;
        row.finish_reason = reason.into();
        if let Some((u, m)) = counted {
            row.prompt_tokens = u.prompt_tokens as u64;
            row.cached_tokens = u.prompt_tokens_details.cached_tokens as u64;
            row.completion_tokens = u.completion_tokens as u64;
            row.prefill_device_ms = m.prefill_device_time_ms;
            row.decode_device_ms = m.decode_device_time_ms;
            row.queue_ms = m.queue_time_ms;
            row.ttft_ms = m.time_to_first_token_ms;
            row.route = m.route.as_ref().map(|d| d.summary()).unwrap_or_default();
            row.quality = m.quality;
            if let Some(q) = &m.quality {
                match &m.route {
                    Some(d) => q.observe(&d.model, &d.group),
                    None => q.observe(&row.model, ""),
                }
            }
            if let Some(c) = m.cache.as_ref().filter(|c| c.hit) {
                row.cache = c.kind.unwrap_or_default().into();
                row.saved_device_ms = c.saved_device_time_ms;
            }
        }
        row.e2e_ms = self.started.elapsed().as_secs_f64() * 1e3;
        row.ts_ms = now_ms();
        super::genai::ended(&self.trace, &row, counted.map(|(_, m)| m));
        // A client that left is not an error of the service.
        if row.status >= 400 && row.status != 499 {
            if let Some(log) = &self.errors {
                log.push(ErrorEntry {
                    ts_ms: row.ts_ms,
                    tenant: row.tenant.clone(),
                    model: row.model.clone(),
                    status: row.status,
                    reason: row.finish_reason.clone(),
                    message: error.unwrap_or_default().to_string(),
                    request_id: row.request_id.clone(),
                });
            }
        }
        if let Some(l) = &self.ledger {
            l.record(row);
        }
    }
}

impl Drop for Receipt {
    fn drop(&mut self) {
        self.finish(Ending::ClientClosed);
    }
}
