//! Continuous batching: which sequences run this step and how many tokens each (`schedule`), and
//! what follows from the step's logits (`update`: sample, append, decide finishes). Prefill is
//! chunked to a per-step token budget so a long prompt shares steps with decoding sequences; a
//! sequence is admitted only when blocks for its chunk exist, and when a running sequence cannot
//! grow, the most recently admitted one is preempted (its blocks released, recomputed later).
//! The scheduler never touches tensors and deals in token counts; the block pool keeps the blocks
//! and their prefix-cache chains.
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use super::block_pool::BlockPool;
use super::metering::{split, CostModel};
use super::runner::{Row, StepOutput};
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
    /// The sampler needs the whole logits row (else the argmax and its log-probability suffice).
    pub full_logits: bool,
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

/// One sequence's part in a step, as metering needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqStep {
    pub seq_id: u64,
    /// Tokens the step ran for it (prompt chunk, recomputation, or one decode token).
    pub tokens: usize,
    /// Of those, prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens in its KV cache after the step (what attention read).
    pub context_len: usize,
    /// Its share of the step's device time (the shares add up to the step's time).
    pub device_time: Duration,
    pub tenant: Option<Arc<str>>,
}

/// What a step produced: replies to send, and the facts metering and stats need.
#[derive(Debug, Default)]
pub struct StepOutputs {
    /// Each event with the channel it goes to, in order.
    pub events: Vec<(flume::Sender<Event>, Event)>,
    pub seqs: Vec<SeqStep>,
    /// Host wall time of the forward and its read-back.
    pub forward_time: Duration,
    /// Device time of the step (CUDA events on a GPU; wall time on the CPU).
    pub device_time: Duration,
}

impl StepOutputs {
    /// Send every event; a closed channel is noticed by the next `schedule`.
    pub fn send(self) {
        for (tx, ev) in self.events {
            let _ = tx.send(ev);
        }
    }
}

/// How a sequence leaves the scheduler.
enum Ending {
    Finished(FinishReason),
    Failed(String),
}

#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    pub pool: BlockPool,
    /// The model's context length (prompt + generated tokens).
    max_context: usize,
    waiting: VecDeque<Sequence>,
    /// In admission order: the last one is preempted first.
    running: Vec<Sequence>,
    /// Events produced by `schedule` (admissions, cancellations), handed out with the next outputs.
    pending: Vec<(flume::Sender<Event>, Event)>,
    pub preemptions: u64,
    /// Prompt tokens looked up in the prefix cache, and of those found there.
    pub prefix_query_tokens: u64,
    pub prefix_hit_tokens: u64,
    /// How a step's device time is split over its sequences.
    cost: CostModel,
    /// Fair share between tenants: tokens run for each tenant divided by its weight ("virtual
    /// time"). Admission picks the waiting tenant with the least, so a tenant with a thousand
    /// queued requests cannot starve another's one, and weights set the shares under contention.
    vtime: HashMap<Arc<str>, f64>,
    /// Sequences per tenant in `waiting` or `running`.
    active: HashMap<Arc<str>, usize>,
}

/// The fair-share key of a sequence (sequences submitted without a tenant share one).
fn tenant_key(seq: &Sequence) -> Arc<str> {
    seq.tenant.clone().unwrap_or_else(|| "".into())
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, pool: BlockPool, max_context: usize, cost: CostModel) -> Self {
        Self {
            cfg,
            pool,
            max_context,
            cost,
            vtime: HashMap::new(),
            active: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            pending: Vec::new(),
            preemptions: 0,
            prefix_query_tokens: 0,
            prefix_hit_tokens: 0,
        }
    }

    pub fn add(&mut self, seq: Sequence) {
        let key = tenant_key(&seq);
        if !self.active.contains_key(&key) {
            // A tenant coming back starts level with the least-served active one: idle time is not
            // banked as credit.
            let floor = self
                .active
                .keys()
                .filter_map(|t| self.vtime.get(t))
                .copied()
                .fold(f64::INFINITY, f64::min);
            let v = self.vtime.entry(key.clone()).or_default();
            if floor.is_finite() {
                *v = v.max(floor);
            }
        }
        *self.active.entry(key).or_default() += 1;
        self.waiting.push_back(seq);
    }

    /// Charge `tokens` run for sequence `seq` to its tenant's virtual time.
    fn charge(vtime: &mut HashMap<Arc<str>, f64>, seq: &Sequence, tokens: usize) {
        let v = vtime.entry(tenant_key(seq)).or_default();
        *v += tokens as f64 / f64::from(seq.weight.max(1));
    }

    /// The waiting sequence to admit next: a preempted one first (it keeps its place), else the
    /// oldest of the tenant with the least virtual time (ties: the earlier in the queue).
    fn next_waiting(&self) -> Option<usize> {
        let front = self.waiting.front()?;
        if front.admitted.is_some() {
            return Some(0);
        }
        let mut seen: Vec<&str> = Vec::new();
        let mut best: Option<(f64, usize)> = None;
        for (i, s) in self.waiting.iter().enumerate() {
            let t = s.tenant.as_deref().unwrap_or("");
            if seen.contains(&t) {
                continue;
            }
            seen.push(t);
            let v = self.vtime.get(t).copied().unwrap_or(0.0);
            if best.is_none_or(|(b, _)| v < b) {
                best = Some((v, i));
            }
        }
        best.map(|(_, i)| i)
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

    /// Events not yet handed out (from a `schedule` whose plan turned out empty).
    pub fn take_pending(&mut self) -> StepOutputs {
        StepOutputs {
            events: std::mem::take(&mut self.pending),
            ..StepOutputs::default()
        }
    }

    /// Token slots allocated to running sequences, and of those holding a token (for KV waste).
    pub fn kv_slot_usage(&self) -> (usize, usize) {
        let bs = self.pool.block_size();
        self.running.iter().fold((0, 0), |(alloc, used), s| {
            let slots = s.alloc.blocks().len() * bs;
            (alloc + slots, used + s.tokens.len().min(slots))
        })
    }

    /// Remove a sequence for good: release its blocks and queue its last event. Every way out of
    /// the scheduler (finish, cancellation, failure) goes through here.
    fn retire(&mut self, mut s: Sequence, ending: Ending) {
        self.pool.release(&mut s.alloc);
        let key = tenant_key(&s);
        if let Some(n) = self.active.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.active.remove(&key);
            }
        }
        if self.active.is_empty() {
            // Nobody is waiting for anybody: start the next contention from even.
            self.vtime.clear();
        }
        let ev = match ending {
            Ending::Finished(reason) => Event::Finished {
                reason,
                usage: s.usage(),
            },
            Ending::Failed(msg) => Event::Error(msg),
        };
        self.pending.push((s.reply, ev));
    }

    /// Retire sequences whose client has gone away, running or waiting.
    fn retire_cancelled(&mut self) {
        if !self
            .running
            .iter()
            .chain(&self.waiting)
            .any(Sequence::is_cancelled)
        {
            return;
        }
        let (gone, running): (Vec<_>, Vec<_>) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(Sequence::is_cancelled);
        let (gone_waiting, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(Sequence::is_cancelled);
        self.running = running;
        self.waiting = waiting.into();
        for s in gone.into_iter().chain(gone_waiting) {
            self.retire(s, Ending::Finished(FinishReason::Aborted));
        }
    }

    fn preempt_last(&mut self) {
        if let Some(mut s) = self.running.pop() {
            self.pool.release(&mut s.alloc);
            s.num_computed = 0;
            self.preemptions += 1;
            self.waiting.push_front(s);
        }
    }

    /// Decide the next step: retire cancelled sequences, grow the running ones (preempting when out
    /// of blocks), then admit waiting ones while the token budget, the batch size and the pool allow.
    pub fn schedule(&mut self) -> StepPlan {
        self.retire_cancelled();
        let mut budget = self.cfg.max_batch_tokens;
        let mut plan = StepPlan::default();
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let n = self.running[i].num_pending().min(budget);
            let want = self.running[i].num_computed + n;
            loop {
                let seq = &mut self.running[i];
                if self.pool.grow(&mut seq.alloc, want) {
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
            plan.items.push(Self::item(&self.running[i], n));
            Self::charge(&mut self.vtime, &self.running[i], n);
            budget -= n;
            i += 1;
        }
        while budget > 0 && self.running.len() < self.cfg.max_seqs {
            let Some(at) = self.next_waiting() else {
                break;
            };
            let Some(seq) = self.waiting.get_mut(at) else {
                break;
            };
            if seq.alloc.blocks().is_empty() {
                // Reuse the longest cached prefix, but always compute at least the last token: its
                // logits are needed.
                let max_blocks = (seq.tokens.len() - 1) / self.pool.block_size();
                seq.num_computed = self
                    .pool
                    .match_prefix(&mut seq.alloc, &seq.tokens, max_blocks);
            }
            let n = seq.num_pending().min(budget);
            if !self.pool.grow(&mut seq.alloc, seq.num_computed + n) {
                // Not now: give the matched blocks back (they stay cached) so nothing is pinned.
                self.pool.release(&mut seq.alloc);
                seq.num_computed = 0;
                break;
            }
            if self.pool.caching() {
                self.prefix_query_tokens += seq.tokens.len() as u64;
                self.prefix_hit_tokens += seq.num_computed as u64;
            }
            if seq.admitted.is_none() {
                let cached = seq.num_computed.min(seq.prompt_len);
                let queue_secs = seq.arrived.elapsed().as_secs_f64();
                seq.admitted = Some((cached, queue_secs));
                self.pending.push((
                    seq.reply.clone(),
                    Event::Admitted {
                        cached_tokens: cached,
                        queue_secs,
                    },
                ));
            }
            let Some(seq) = self.waiting.remove(at) else {
                break;
            };
            plan.items.push(Self::item(&seq, n));
            Self::charge(&mut self.vtime, &seq, n);
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
            block_table: seq.alloc.blocks().to_vec(),
            wants_logits: start + n == seq.tokens.len(),
            full_logits: seq.sampler.needs_full_logits(),
            prompt_tokens: seq.prompt_len.saturating_sub(start).min(n),
        }
    }

    /// Take in a step's result: the planned tokens are now in the cache (full blocks join the prefix
    /// index), each sequence that wanted logits samples and appends a token, and finished ones are
    /// retired.
    pub fn update(&mut self, plan: &StepPlan, out: StepOutput) -> StepOutputs {
        let mut outputs = StepOutputs {
            events: std::mem::take(&mut self.pending),
            seqs: Vec::with_capacity(plan.items.len()),
            forward_time: out.elapsed,
            device_time: out.device_time,
        };
        let mut rows = out.rows.into_iter();
        let mut done = Vec::new();
        let costs: Vec<u128> = plan
            .items
            .iter()
            .map(|i| self.cost.cost(i.first_pos, i.tokens.len(), i.wants_logits))
            .collect();
        let mut shares = split(out.device_time, &costs).into_iter();
        // Plan items follow `running`'s order (running ones first, then admissions), so one
        // forward walk finds them all.
        let mut at = 0;
        for item in &plan.items {
            let row = if item.wants_logits { rows.next() } else { None };
            let share = shares.next().unwrap_or_default();
            let Some(pos) = self.running[at..]
                .iter()
                .position(|s| s.id == item.seq_id)
                .map(|p| p + at)
            else {
                continue;
            };
            at = pos + 1;
            let seq = &mut self.running[pos];
            seq.num_computed = item.first_pos + item.tokens.len();
            self.pool
                .commit(&mut seq.alloc, &seq.tokens, seq.num_computed);
            // Prompt work (a chunk, or recomputation after preemption) is prefill, the rest decode.
            let prefill =
                share.mul_f64(item.prompt_tokens as f64 / item.tokens.len().max(1) as f64);
            seq.device.prefill += prefill;
            seq.device.decode += share - prefill;
            outputs.seqs.push(SeqStep {
                seq_id: seq.id,
                tokens: item.tokens.len(),
                prompt_tokens: item.prompt_tokens,
                context_len: seq.num_computed,
                device_time: share,
                tenant: seq.tenant.clone(),
            });
            let Some(row) = row else { continue };
            let sampled = match row {
                Row::Full(r) => seq.sampler.sample(&r, &seq.tokens),
                Row::Greedy { token, logprob } => seq.sampler.accept_greedy(token, logprob),
            };
            seq.push(&sampled);
            outputs
                .events
                .push((seq.reply.clone(), Event::Token(sampled)));
            if let Some(reason) = seq.finish_reason(self.max_context) {
                done.push((seq.id, reason));
            }
        }
        for (id, reason) in done {
            if let Some(pos) = self.running.iter().position(|s| s.id == id) {
                let s = self.running.remove(pos);
                self.retire(s, Ending::Finished(reason));
            }
        }
        outputs.events.append(&mut self.pending);
        outputs
    }

    /// The step's forward failed: retire every sequence in `plan` with the error.
    pub fn fail(&mut self, plan: &StepPlan, msg: &str) -> StepOutputs {
        for item in &plan.items {
            if let Some(pos) = self.running.iter().position(|s| s.id == item.seq_id) {
                let s = self.running.remove(pos);
                self.retire(s, Ending::Failed(msg.to_string()));
            }
        }
        self.take_pending()
    }
}
