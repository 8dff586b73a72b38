//! Continuous batching: which sequences run this step and how many tokens each. Prefill is chunked to a
//! per-step token budget so a long prompt shares steps with decoding sequences; a sequence is admitted
//! only when blocks for its chunk exist, and when a running sequence cannot grow, the most recently
//! admitted one is preempted (its blocks freed, recomputed later). The scheduler never touches tensors.
use std::collections::VecDeque;

use super::block_pool::{BlockPool, ROOT_HASH};
use super::sequence::{Event, FinishReason, Sequence};

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Tokens (prefill chunks + decodes) one step may run.
    pub max_batch_tokens: usize,
    /// Sequences one step may run.
    pub max_seqs: usize,
    /// Requests that may wait for admission; beyond this, submissions are refused.
    pub max_waiting: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 512,
            max_seqs: 256,
            max_waiting: 1024,
        }
    }
}

/// One sequence's share of a step: plain data for the runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scheduled {
    pub seq_id: u64,
    pub tokens: Vec<u32>,
    pub first_pos: usize,
    pub block_table: Vec<u32>,
    /// The chunk reaches the end of the known tokens, so a new token is sampled after it.
    pub wants_logits: bool,
    /// How many of the chunk's tokens are prompt tokens (the rest are generated ones).
    pub prompt_tokens: usize,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StepPlan {
    pub items: Vec<Scheduled>,
}

impl StepPlan {
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn num_tokens(&self) -> usize {
        self.items.iter().map(|i| i.tokens.len()).sum()
    }
}

#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    pub pool: BlockPool,
    waiting: VecDeque<Sequence>,
    /// In admission order: the last one is preempted first.
    running: Vec<Sequence>,
    pub preemptions: u64,
    /// Prompt tokens looked up in the prefix cache, and of those found there.
    pub prefix_query_tokens: u64,
    pub prefix_hit_tokens: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, pool: BlockPool) -> Self {
        Self {
            cfg,
            pool,
            waiting: VecDeque::new(),
            running: Vec::new(),
            preemptions: 0,
            prefix_query_tokens: 0,
            prefix_hit_tokens: 0,
        }
    }

    pub fn add(&mut self, seq: Sequence) {
        self.waiting.push_back(seq);
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut Sequence> {
        self.running.iter_mut().find(|s| s.id == id)
    }

    /// Drop sequences whose client has gone away; their blocks are free when this returns.
    pub fn abort_cancelled(&mut self) -> usize {
        let mut n = 0;
        let pool = &mut self.pool;
        let mut drop_if = |s: &mut Sequence| {
            if s.is_cancelled() {
                pool.free(&mut s.block_table);
                n += 1;
                false
            } else {
                true
            }
        };
        self.running.retain_mut(&mut drop_if);
        self.waiting.retain_mut(&mut drop_if);
        n
    }

    fn preempt_last(&mut self) {
        if let Some(mut s) = self.running.pop() {
            self.pool.free(&mut s.block_table);
            s.num_computed = 0;
            s.block_hashes.clear();
            self.preemptions += 1;
            self.waiting.push_front(s);
        }
    }

    pub fn schedule(&mut self) -> StepPlan {
        let mut budget = self.cfg.max_batch_tokens;
        let mut plan = StepPlan::default();
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let n = self.running[i].num_pending().min(budget);
            let want = self.running[i].num_computed + n;
            loop {
                let seq = &mut self.running[i];
                if self.pool.append(&mut seq.block_table, want) {
                    break;
                }
                // Out of blocks: recompute the newest sequence later, possibly this one.
                let victim_is_self = i == self.running.len() - 1;
                self.preempt_last();
                if victim_is_self {
                    break;
                }
            }
            if i >= self.running.len() {
                break;
            }
            let seq = &self.running[i];
            plan.items.push(Self::item(seq, n));
            budget -= n;
            i += 1;
        }
        // Admit waiting sequences while the budget, the batch size and the pool allow.
        while budget > 0 && self.running.len() < self.cfg.max_seqs {
            let Some(seq) = self.waiting.front_mut() else {
                break;
            };
            if seq.block_table.is_empty() && self.pool.caching() {
                // Reuse the longest cached prefix, but always compute at least the last token: its
                // logits are needed.
                let max_blocks = (seq.tokens.len() - 1) / self.pool.block_size();
                let (blocks, hashes) = self.pool.match_prefix(&seq.tokens, seq.salt, max_blocks);
                seq.num_computed = blocks.len() * self.pool.block_size();
                seq.block_table = blocks;
                seq.block_hashes = hashes;
            }
            let n = seq.num_pending().min(budget);
            if !self.pool.append(&mut seq.block_table, seq.num_computed + n) {
                // Not now: give the matched blocks back (they stay cached) so nothing is pinned.
                self.pool.free(&mut seq.block_table);
                seq.num_computed = 0;
                seq.block_hashes.clear();
                break;
            }
            if self.pool.caching() {
                self.prefix_query_tokens += seq.tokens.len() as u64;
                self.prefix_hit_tokens += seq.num_computed as u64;
            }
            if !seq.admitted {
                seq.admitted = true;
                seq.cached_tokens = seq.num_computed.min(seq.prompt_len);
                seq.queue_secs = seq.arrived.elapsed().as_secs_f64();
                let _ = seq.reply.send(Event::Admitted {
                    cached_tokens: seq.cached_tokens,
                    queue_secs: seq.queue_secs,
                });
            }
            let Some(seq) = self.waiting.pop_front() else {
                break;
            };
            plan.items.push(Self::item(&seq, n));
            budget -= n;
            self.running.push(seq);
        }
        plan
    }

    fn item(seq: &Sequence, n: usize) -> Scheduled {
        let start = seq.num_computed;
        Scheduled {
            seq_id: seq.id,
            tokens: seq.tokens[start..start + n].to_vec(),
            first_pos: start,
            block_table: seq.block_table.clone(),
            wants_logits: start + n == seq.tokens.len(),
            prompt_tokens: seq.prompt_len.saturating_sub(start).min(n),
        }
    }

    /// Record that `plan` ran: its tokens are now in the cache.
    pub fn mark_computed(&mut self, plan: &StepPlan) {
        let bs = self.pool.block_size();
        for item in &plan.items {
            let Some(s) = self.running.iter_mut().find(|s| s.id == item.seq_id) else {
                continue;
            };
            s.num_computed = item.first_pos + item.tokens.len();
            // Blocks that just became full (all their K/V written) join the prefix cache.
            while (s.block_hashes.len() + 1) * bs <= s.num_computed {
                let i = s.block_hashes.len();
                let parent = s.block_hashes.last().copied().unwrap_or(ROOT_HASH);
                let h = self.pool.register(
                    s.block_table[i],
                    parent,
                    s.salt,
                    &s.tokens[i * bs..(i + 1) * bs],
                );
                s.block_hashes.push(h);
            }
        }
    }

    /// Token slots allocated to running sequences, and of those holding a token (for KV waste).
    pub fn kv_slot_usage(&self) -> (usize, usize) {
        let bs = self.pool.block_size();
        self.running.iter().fold((0, 0), |(alloc, used), s| {
            (
                alloc + s.block_table.len() * bs,
                used + s.tokens.len().min(s.block_table.len() * bs),
            )
        })
    }

    /// Remove a finished sequence, free its blocks and tell its client.
    pub fn finish(&mut self, id: u64, reason: FinishReason) {
        if let Some(pos) = self.running.iter().position(|s| s.id == id) {
            let mut s = self.running.remove(pos);
            self.pool.free(&mut s.block_table);
            let _ = s.reply.send(Event::Finished {
                reason,
                usage: s.usage(),
            });
        }
    }

    /// Fail every running sequence in `plan` (the step's forward failed).
    pub fn fail(&mut self, plan: &StepPlan, msg: &str) {
        for item in &plan.items {
            if let Some(pos) = self.running.iter().position(|s| s.id == item.seq_id) {
                let mut s = self.running.remove(pos);
                self.pool.free(&mut s.block_table);
                let _ = s.reply.send(Event::Error(msg.to_string()));
            }
        }
    }
}
