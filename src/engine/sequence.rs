//! One request's state inside the engine, and the events it sends back.
use std::time::Instant;

use super::sampler::{Sampled, Sampler};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, a stop token, or (decided by the caller) a stop string.
    Stop,
    /// max_tokens or the context was reached.
    Length,
    /// The client went away or the request was cancelled.
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
}

/// What a request's reply channel carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// First admission: how much of the prompt came from the prefix cache, and the time queued.
    Admitted {
        cached_tokens: usize,
        queue_secs: f64,
    },
    Token(Sampled),
    Finished {
        reason: FinishReason,
        usage: Usage,
    },
    Error(String),
}

#[derive(Debug)]
pub struct Sequence {
    pub id: u64,
    pub prompt_len: usize,
    /// Prompt then generated tokens.
    pub tokens: Vec<u32>,
    /// Leading tokens whose K/V are in the cache.
    pub num_computed: usize,
    pub block_table: Vec<u32>,
    pub sampler: Sampler,
    /// Stop after this many generated tokens.
    pub max_tokens: usize,
    pub eos_ids: Vec<u32>,
    pub reply: flume::Sender<Event>,
    pub arrived: Instant,
    /// Prompt tokens whose KV came from the prefix cache at first admission.
    pub cached_tokens: usize,
    /// Prefix-cache namespace (tenant and model): blocks are shared only under the same salt.
    pub salt: u64,
    /// Chained hashes of the sequence's full, computed blocks, in order.
    pub block_hashes: Vec<u64>,
    pub admitted: bool,
    pub queue_secs: f64,
}

impl Sequence {
    pub fn num_generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens still to be run through the model before the next sample.
    pub fn num_pending(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    /// Whether the client has gone away.
    pub fn is_cancelled(&self) -> bool {
        self.reply.is_disconnected()
    }

    /// Append a sampled token and decide whether the sequence is done.
    pub fn push(&mut self, s: &Sampled) -> Option<FinishReason> {
        self.tokens.push(s.token);
        let params = self.sampler.params();
        if (!params.ignore_eos && self.eos_ids.contains(&s.token))
            || params.stop_token_ids.contains(&s.token)
        {
            Some(FinishReason::Stop)
        } else if self.num_generated() >= self.max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        }
    }

    pub fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_len,
            completion_tokens: self.num_generated(),
            cached_tokens: self.cached_tokens,
            queue_secs: self.queue_secs,
        }
    }
}
