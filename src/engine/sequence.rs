//! One request's state inside the engine, and the events it sends back.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::block_pool::Allocation;
use super::sampler::{Sampled, Sampler};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS or a stop token.
    Stop,
    /// max_tokens or the context was reached.
    Length,
    /// Ended from outside: the client went away (its receiver dropped), or the text layer stopped
    /// it (a stop string) through its `StopHandle`, which still gets this `Finished`.
    Aborted,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
    /// Seconds from submission to first admission.
    pub queue_secs: f64,
    /// This request's share of the device time of the steps it ran in.
    pub device: DeviceTime,
}

/// A sequence's metered device time, split by the kind of step work (see `engine::metering`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceTime {
    /// Prompt tokens run through the model (and a preempted sequence's recomputation).
    pub prefill: Duration,
    /// Decode steps: one new token each.
    pub decode: Duration,
}

impl DeviceTime {
    pub fn total(&self) -> Duration {
        self.prefill + self.decode
    }
}

impl std::ops::AddAssign for DeviceTime {
    fn add_assign(&mut self, other: Self) {
        self.prefill += other.prefill;
        self.decode += other.decode;
    }
}

/// What a request's reply channel carries: `Admitted` once, then `Prefilled` chunks and `Token`s,
/// then exactly one of `Finished` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// First admission: how much of the prompt came from the prefix cache, and the time queued.
    Admitted {
        cached_tokens: usize,
        queue_secs: f64,
        /// When (the reply is sent only after the step it joined).
        at: Instant,
    },
    /// A chunk of the prompt ran: `tokens` of it, in a step of `batch_tokens` whose forward took
    /// `forward` and ended at `at` (a trace's prefill span).
    Prefilled {
        tokens: usize,
        batch_tokens: usize,
        forward: Duration,
        at: Instant,
    },
    Token(Sampled),
    Finished {
        reason: FinishReason,
        usage: Usage,
    },
    /// The engine failed while running this request (a fault of the server, not of the request).
    Error(String),
}

/// Ends a submitted request early. Unlike dropping the receiver, the request's `Finished` (with the
/// device time its last steps used) still arrives, so a stop string's response is metered whole.
#[derive(Debug, Clone, Default)]
pub struct StopHandle(Arc<AtomicBool>);

impl StopHandle {
    pub fn stop(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn is_stopped(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
pub struct Sequence {
    pub id: u64,
    pub prompt_len: usize,
    /// Prompt then generated tokens.
    pub tokens: Vec<u32>,
    /// Leading tokens whose K/V are in the cache.
    pub num_computed: usize,
    /// The KV blocks; released only by the scheduler's `retire` (or by preemption).
    pub alloc: Allocation,
    /// Chained prefix-cache hashes of the prompt's full blocks (set when the scheduler takes the
    /// sequence in, with prefix caching on).
    pub prompt_hashes: Vec<u64>,
    pub sampler: Sampler,
    /// Stop after this many generated tokens.
    pub max_tokens: usize,
    pub eos_ids: Vec<u32>,
    pub reply: flume::Sender<Event>,
    pub arrived: Instant,
    /// Set at first admission: prompt tokens whose KV came from the prefix cache, time queued.
    pub admitted: Option<(usize, f64)>,
    /// Whom the device time is billed to (also the prefix-cache namespace, via the salt).
    pub tenant: Option<Arc<str>>,
    /// The tenant's fair-share weight.
    pub weight: u32,
    pub device: DeviceTime,
    pub stop: StopHandle,
}

impl Sequence {
    pub fn num_generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens still to be run through the model before the next sample.
    pub fn num_pending(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    /// Whether the client has gone away or the request was stopped from outside.
    pub fn is_cancelled(&self) -> bool {
        self.reply.is_disconnected() || self.stop.is_stopped()
    }

    /// Whether the sequence is done, and why: the one place that decides it. `max_context` is the
    /// model's context length.
    pub fn finish_reason(&self, max_context: usize) -> Option<FinishReason> {
        if self.is_cancelled() {
            return Some(FinishReason::Aborted);
        }
        if self.num_generated() == 0 {
            return None;
        }
        if self.sampler.grammar_finished() {
            return Some(FinishReason::Stop);
        }
        let last = self.tokens[self.tokens.len() - 1];
        let params = self.sampler.params();
        if (!params.ignore_eos && self.eos_ids.contains(&last))
            || params.stop_token_ids.contains(&last)
        {
            Some(FinishReason::Stop)
        } else if self.num_generated() >= self.max_tokens || self.tokens.len() >= max_context {
            Some(FinishReason::Length)
        } else {
            None
        }
    }

    pub fn push(&mut self, s: &Sampled) {
        self.tokens.push(s.token);
    }

    pub fn usage(&self) -> Usage {
        let (cached_tokens, queue_secs) = self.admitted.unwrap_or_default();
        Usage {
            prompt_tokens: self.prompt_len,
            completion_tokens: self.num_generated(),
            cached_tokens,
            queue_secs,
            device: self.device,
        }
    }
}
