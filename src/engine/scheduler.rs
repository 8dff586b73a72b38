//! Continuous batching: which sequences run this step and how many tokens each (`schedule`), and
//! what follows from the step's logits (`update`: sample, append, decide finishes). Prefill is
//! chunked to a per-step token budget so a long prompt shares steps with decoding sequences; a
//! sequence is admitted only when blocks for its chunk exist, and when a running sequence cannot
//! grow, the most recently admitted one is preempted (its blocks released, recomputed later).
//! The scheduler never touches tensors and deals in token counts; the block pool keeps the blocks
//! and their prefix-cache chains.
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::block_pool::{BlockCopy, BlockPool};
use super::metering::{split, CostModel};
use super::runner::{Row, StepOutput};
use super::sampler::{Sampled, Spread};
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
    /// K/V slots to copy between blocks before the forward, in order (a later copy may overwrite
    /// a block an earlier one read: one evicted while this plan was made).
    pub copies: Vec<BlockCopy>,
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
    /// Grammar masks are computed ahead, beside the forward (on an accelerator, where the host is
    /// idle meanwhile); on the CPU the device's argmax is checked against the grammar instead.
    pub masks_ahead: bool,
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
    cost: Option<CostModel>,
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
    /// `cost`: how to split a step's device time over its sequences (None: not split).
    pub fn new(
        cfg: SchedulerConfig,
        pool: BlockPool,
        max_context: usize,
        cost: Option<CostModel>,
    ) -> Self {
        Self {
            cfg,
            pool,
            masks_ahead: false,
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

    pub fn add(&mut self, mut seq: Sequence) {
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
        if self.pool.caching() && seq.prompt_hashes.is_empty() {
            seq.prompt_hashes = self
                .pool
                .chain(seq.alloc.salt(), &seq.tokens[..seq.prompt_len]);
        }
        self.waiting.push_back(seq);
    }

    /// Whether a request not yet admitted should wait for its next uncached prompt block, which a
    /// running sequence is computing now: admitted at once, it would compute the same block again
    /// (a burst of requests behind a fresh system prompt would each compute it); admitted once the
    /// block is committed, it reuses it. Usually a step's wait. Requests that share nothing in
    /// flight are never held.
    fn awaits_prefix(&self, w: &Sequence) -> bool {
        if w.admitted.is_some() || w.prompt_hashes.is_empty() {
            return false;
        }
        // As in `admit`: the last prompt token is always computed, so its block is never reused.
        let reusable = (w.tokens.len() - 1) / self.pool.block_size();
        let chain = &w.prompt_hashes[..reusable.min(w.prompt_hashes.len())];
        let Some(next) = chain.get(self.pool.cached_run(chain)) else {
            return false;
        };
        self.running.iter().any(|s| {
            s.prompt_hashes
                .get(s.alloc.num_hashed()..)
                .is_some_and(|in_flight| in_flight.contains(next))
        })
    }

    /// Charge `tokens` run for sequence `seq` to its tenant's virtual time.
    fn charge(vtime: &mut HashMap<Arc<str>, f64>, seq: &Sequence, tokens: usize) {
        let v = vtime.entry(tenant_key(seq)).or_default();
        *v += tokens as f64 / f64::from(seq.weight.max(1));
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

    /// The prompt work queued ahead of a new request: prompt tokens not yet run (waiting sequences'
    /// whole prompts, running ones' unfinished prefill), and the blocks the waiting ones need to be
    /// admitted (before prefix-cache hits, which are not known until admission).
    pub fn queued_work(&self) -> (usize, usize) {
        let bs = self.pool.block_size();
        let prefill = |s: &Sequence| s.prompt_len.saturating_sub(s.num_computed);
        let waiting_tokens: usize = self.waiting.iter().map(|s| s.num_pending()).sum();
        let running_tokens: usize = self.running.iter().map(prefill).sum();
        let blocks = self
            .waiting
            .iter()
            .map(|s| s.tokens.len().div_ceil(bs))
            .sum();
        (waiting_tokens + running_tokens, blocks)
    }

    /// Whether any sequence of `plan` samples under a grammar (then `prepare_masks` has work).
    pub fn plan_is_constrained(&self, plan: &StepPlan) -> bool {
        let constrained: Vec<u64> = self
            .running
            .iter()
            .filter(|s| s.sampler.is_constrained())
            .map(|s| s.id)
            .collect();
        !constrained.is_empty()
            && plan
                .items
                .iter()
                .any(|i| i.wants_logits && constrained.contains(&i.seq_id))
    }

    /// Take the device's argmax for every constrained sequence with a greedy row, all in parallel
    /// (the forward is over: the cores are free); a refused pick reads its logit row and finds the
    /// masked argmax (`Sampler::accept_greedy`).
    fn accept_constrained_greedy(
        &mut self,
        plan: &StepPlan,
        out: &StepOutput,
    ) -> HashMap<u64, crate::error::Result<Sampled>> {
        use rayon::prelude::*;
        let picks: HashMap<u64, (usize, u32, f32, Spread)> = plan
            .items
            .iter()
            .filter(|i| i.wants_logits)
            .zip(&out.rows)
            .enumerate()
            .filter_map(|(row, (i, r))| match r {
                Row::Greedy {
                    token,
                    logprob,
                    spread,
                } => Some((i.seq_id, (row, *token, *logprob, *spread))),
                Row::Full(_) => None,
            })
            .collect();
        let wanted = |s: &Sequence| s.sampler.is_constrained() && picks.contains_key(&s.id);
        if !self.running.iter().any(wanted) {
            return HashMap::new();
        }
        self.running
            .par_iter_mut()
            .filter(|s| wanted(s))
            .filter_map(|s| {
                let &(row, token, logprob, spread) = picks.get(&s.id)?;
                let sampled = s
                    .sampler
                    .accept_greedy(token, logprob, spread, || logits_row(out, row));
                Some((s.id, sampled))
            })
            .collect()
    }

    /// Compute the grammar masks the plan's sampling will need, in parallel: the engine runs this
    /// beside the step's forward, which does not touch the samplers.
    pub fn prepare_masks(&mut self, plan: &StepPlan) {
        use rayon::prelude::*;
        let sampling: std::collections::HashSet<u64> = plan
            .items
            .iter()
            .filter(|i| i.wants_logits)
            .map(|i| i.seq_id)
            .collect();
        self.running
            .par_iter_mut()
            .filter(|s| s.sampler.is_constrained() && sampling.contains(&s.id))
            .for_each(|s| s.sampler.prepare_mask());
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

    /// Preempt the newest running sequence not in `planned`: its blocks go back, it waits at the
    /// front of the queue and is recomputed later. False when every running sequence is planned.
    fn preempt_unplanned(&mut self, planned: &HashMap<u64, usize>) -> bool {
        let Some(pos) = self
            .running
            .iter()
            .rposition(|s| !planned.contains_key(&s.id))
        else {
            return false;
        };
        let mut s = self.running.remove(pos);
        self.pool.release(&mut s.alloc);
        s.num_computed = 0;
        self.preemptions += 1;
        self.waiting.push_front(s);
        true
    }

    /// Grow running sequence `id` to hold `want` tokens, preempting the newest unplanned sequences
    /// when out of blocks (possibly this one). Its position in `running` if it is still there.
    fn grow_running(
        &mut self,
        id: u64,
        want: usize,
        planned: &HashMap<u64, usize>,
    ) -> Option<usize> {
        loop {
            let pos = self.running.iter().position(|s| s.id == id)?;
            if self.pool.grow(&mut self.running[pos].alloc, want) {
                return Some(pos);
            }
            if !self.preempt_unplanned(planned) {
                return None;
            }
        }
    }

    /// Put `n` tokens of running sequence `pos` in the plan (or widen its chunk to `n`).
    fn plan_running(
        &mut self,
        plan: &mut StepPlan,
        planned: &mut HashMap<u64, usize>,
        pos: usize,
        n: usize,
    ) {
        let seq = &self.running[pos];
        let before = match planned.get(&seq.id) {
            Some(&k) => {
                let before = plan.items[k].tokens.len();
                plan.items[k] = Self::item(seq, n, self.masks_ahead);
                before
            }
            None => {
                planned.insert(seq.id, plan.items.len());
                plan.items.push(Self::item(seq, n, self.masks_ahead));
                0
            }
        };
        Self::charge(&mut self.vtime, seq, n - before);
    }

    /// Admit waiting sequence `at` with a chunk of at most `cap` tokens; false when the pool has no
    /// room for it now (its matched prefix blocks go back, so nothing is pinned).
    fn admit(
        &mut self,
        plan: &mut StepPlan,
        planned: &mut HashMap<u64, usize>,
        at: usize,
        cap: usize,
    ) -> bool {
        let Some(seq) = self.waiting.get_mut(at) else {
            return false;
        };
        if seq.alloc.blocks().is_empty() {
            // Reuse the longest cached prefix, but always compute at least the last token: its
            // logits are needed.
            seq.num_computed =
                self.pool
                    .match_prefix(&mut seq.alloc, &seq.tokens, seq.tokens.len() - 1);
        }
        let n = seq.num_pending().min(cap);
        if !self.pool.grow(&mut seq.alloc, seq.num_computed + n) {
            self.pool.release(&mut seq.alloc);
            seq.num_computed = 0;
            return false;
        }
        if self.pool.caching() {
            self.prefix_query_tokens += seq.tokens.len() as u64;
            self.prefix_hit_tokens += seq.num_computed as u64;
        }
        plan.copies.extend(seq.alloc.take_copy());
        if seq.admitted.is_none() {
            let cached = seq.num_computed.min(seq.prompt_len);
            let at = Instant::now();
            let queue_secs = (at - seq.arrived).as_secs_f64();
            seq.admitted = Some((cached, queue_secs));
            self.pending.push((
                seq.reply.clone(),
                Event::Admitted {
                    cached_tokens: cached,
                    queue_secs,
                    at,
                },
            ));
        }
        let Some(seq) = self.waiting.remove(at) else {
            return false;
        };
        self.running.push(seq);
        let pos = self.running.len() - 1;
        self.plan_running(plan, planned, pos, n);
        true
    }

    /// Decide the next step. Retire cancelled sequences; give every decoding sequence its one
    /// token (in admission order, preempting the newest when out of blocks); readmit preempted
    /// sequences (they keep their place); then share the rest of the token budget between the
    /// tenants with prompt work (running prompts' next chunks first, then admissions): first each
    /// tenant up to its weighted slice, least-served (virtual time) first, then whatever is left
    /// to anyone, so a tenant's long prompts cannot hold another's out of a step.
    pub fn schedule(&mut self) -> StepPlan {
        self.retire_cancelled();
        let mut budget = self.cfg.max_batch_tokens;
        let mut plan = StepPlan::default();
        let mut planned: HashMap<u64, usize> = HashMap::new();
        let mut admitting = true;
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let (id, pending, computed) = {
                let s = &self.running[i];
                (s.id, s.num_pending(), s.num_computed)
            };
            if pending > 1 {
                i += 1;
                continue;
            }
            let Some(pos) = self.grow_running(id, computed + 1, &planned) else {
                continue;
            };
            self.plan_running(&mut plan, &mut planned, pos, 1);
            budget -= 1;
            i = pos + 1;
        }
        while budget > 0
            && self.running.len() < self.cfg.max_seqs
            && self.waiting.front().is_some_and(|s| s.admitted.is_some())
        {
            let before = plan.num_tokens();
            if !self.admit(&mut plan, &mut planned, 0, budget) {
                // No room for it yet: nobody else is admitted ahead of it.
                admitting = false;
                break;
            }
            budget -= plan.num_tokens() - before;
        }
        let quotas = self.weighted_slices(budget);
        self.share_prompt_work(
            &mut plan,
            &mut planned,
            &mut budget,
            admitting,
            Some(quotas),
        );
        self.share_prompt_work(&mut plan, &mut planned, &mut budget, admitting, None);
        plan
    }

    /// Tokens of prompt work `seq` could still get this step (0 for a decoding sequence).
    fn prompt_work(seq: &Sequence, planned: &HashMap<u64, usize>, plan: &StepPlan) -> usize {
        let done = planned
            .get(&seq.id)
            .map_or(0, |&k| plan.items[k].tokens.len());
        let pending = seq.num_pending();
        if pending <= 1 && done == 0 {
            return 0;
        }
        pending - done.min(pending)
    }

    /// Each tenant with prompt work gets `budget * weight / total weight` tokens (at least one).
    fn weighted_slices(&self, budget: usize) -> HashMap<Arc<str>, usize> {
        let mut weights: HashMap<Arc<str>, u32> = HashMap::new();
        let running = self.running.iter().filter(|s| s.num_pending() > 1);
        for s in running.chain(&self.waiting) {
            weights.insert(tenant_key(s), s.weight.max(1));
        }
        let total: u64 = weights.values().map(|&w| u64::from(w)).sum();
        weights
            .into_iter()
            .map(|(t, w)| {
                let slice = budget as u64 * u64::from(w) / total.max(1);
                (t, (slice as usize).max(1))
            })
            .collect()
    }

    /// Hand out prompt work while the budget lasts: the least-served tenant with work (and, when
    /// `quotas` is given, slice left) gets its next chunk, a running prompt's before an admission.
    fn share_prompt_work(
        &mut self,
        plan: &mut StepPlan,
        planned: &mut HashMap<u64, usize>,
        budget: &mut usize,
        mut admitting: bool,
        mut quotas: Option<HashMap<Arc<str>, usize>>,
    ) {
        // Tenants whose next chunk found no blocks: no more prompt work for them this step.
        let mut blocked: Vec<Arc<str>> = Vec::new();
        while *budget > 0 {
            let room = |t: &Arc<str>| {
                if blocked.contains(t) {
                    return 0;
                }
                quotas
                    .as_ref()
                    .map_or(usize::MAX, |q| q.get(t).copied().unwrap_or(0))
            };
            let can_admit = admitting && self.running.len() < self.cfg.max_seqs;
            let running = self
                .running
                .iter()
                .filter(|s| Self::prompt_work(s, planned, plan) > 0);
            let waiting = self.waiting.iter().filter(|_| can_admit);
            let Some(tenant) = running
                .chain(waiting)
                .map(tenant_key)
                .filter(|t| room(t) > 0)
                .min_by(|a, b| {
                    let v = |t: &Arc<str>| self.vtime.get(t).copied().unwrap_or(0.0);
                    v(a).total_cmp(&v(b))
                })
            else {
                return;
            };
            let cap = (*budget).min(room(&tenant));
            let before = plan.num_tokens();
            let ongoing = self
                .running
                .iter()
                .find(|s| tenant_key(s) == tenant && Self::prompt_work(s, planned, plan) > 0)
                .map(|s| (s.id, s.num_computed, Self::prompt_work(s, planned, plan)));
            if let Some((id, computed, work)) = ongoing {
                let done = planned.get(&id).map_or(0, |&k| plan.items[k].tokens.len());
                let n = done + work.min(cap);
                let grown = if done > 0 {
                    // Widening a chunk already planned: only with free blocks (no preemption).
                    let pos = self.running.iter().position(|s| s.id == id);
                    pos.filter(|&p| self.pool.grow(&mut self.running[p].alloc, computed + n))
                } else {
                    self.grow_running(id, computed + n, planned)
                };
                if let Some(pos) = grown {
                    self.plan_running(plan, planned, pos, n);
                }
            } else if let Some(at) = self
                .waiting
                .iter()
                .position(|s| tenant_key(s) == tenant && !self.awaits_prefix(s))
            {
                if !self.admit(plan, planned, at, cap) {
                    admitting = false;
                }
            }
            let used = plan.num_tokens() - before;
            if used == 0 {
                blocked.push(tenant.clone());
            }
            *budget -= used;
            if let Some(q) = quotas.as_mut() {
                if let Some(left) = q.get_mut(&tenant) {
                    *left = left.saturating_sub(used);
                }
            }
        }
    }

    fn item(seq: &Sequence, n: usize, masks_ahead: bool) -> Scheduled {
        let start = seq.num_computed;
        Scheduled {
            seq_id: seq.id,
            tokens: seq.tokens[start..start + n].to_vec(),
            first_pos: start,
            block_table: seq.alloc.blocks().to_vec(),
            wants_logits: start + n == seq.tokens.len(),
            full_logits: seq.sampler.needs_full_logits(masks_ahead),
            prompt_tokens: seq.prompt_len.saturating_sub(start).min(n),
        }
    }

    /// Take in a step's result: the planned tokens are now in the cache (full blocks join the prefix
    /// index), each sequence that wanted logits samples and appends a token, and finished ones are
    /// retired.
    pub fn update(&mut self, plan: &StepPlan, out: StepOutput) -> StepOutputs {
        // When the forward ended, as near as the host knows (before any sampling work).
        let (ended, batch_tokens) = (Instant::now(), plan.num_tokens());
        let mut outputs = StepOutputs {
            events: std::mem::take(&mut self.pending),
            seqs: Vec::with_capacity(plan.items.len()),
            forward_time: out.elapsed,
            device_time: out.device_time,
        };
        let mut constrained = if self.masks_ahead {
            HashMap::new()
        } else {
            self.accept_constrained_greedy(plan, &out)
        };
        let mut rows = out.rows.iter().enumerate();
        let mut done = Vec::new();
        let mut failed = Vec::new();
        let shares = match &self.cost {
            Some(model) => {
                let costs: Vec<u128> = plan
                    .items
                    .iter()
                    .map(|i| model.cost(i.first_pos, i.tokens.len(), i.wants_logits))
                    .collect();
                split(out.device_time, &costs)
            }
            None => Vec::new(),
        };
        let mut shares = shares.into_iter();
        let index: HashMap<u64, usize> = self
            .running
            .iter()
            .enumerate()
            .map(|(pos, s)| (s.id, pos))
            .collect();
        for item in &plan.items {
            let row = if item.wants_logits { rows.next() } else { None };
            let share = shares.next().unwrap_or_default();
            let Some(&pos) = index.get(&item.seq_id) else {
                continue;
            };
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
            if item.prompt_tokens > 0 {
                outputs.events.push((
                    seq.reply.clone(),
                    Event::Prefilled {
                        tokens: item.prompt_tokens,
                        batch_tokens,
                        forward: out.elapsed,
                        at: ended,
                    },
                ));
            }
            let Some((i, row)) = row else { continue };
            let sampled = match row {
                Row::Full(r) => seq.sampler.sample(r, &seq.tokens),
                &Row::Greedy {
                    token,
                    logprob,
                    spread,
                } => {
                    let sampled = match constrained.remove(&seq.id) {
                        Some(s) => s,
                        None => seq
                            .sampler
                            .accept_greedy(token, logprob, spread, || logits_row(&out, i)),
                    };
                    match sampled {
                        Ok(s) => s,
                        Err(e) => {
                            failed.push((seq.id, e.to_string()));
                            continue;
                        }
                    }
                }
            };
            seq.push(&sampled);
            outputs
                .events
                .push((seq.reply.clone(), Event::Token(sampled)));
            if let Some(reason) = seq.finish_reason(self.max_context) {
                done.push((seq.id, reason));
            }
        }
        let endings = done
            .into_iter()
            .map(|(id, r)| (id, Ending::Finished(r)))
            .chain(failed.into_iter().map(|(id, e)| (id, Ending::Failed(e))));
        for (id, ending) in endings {
            if let Some(pos) = self.running.iter().position(|s| s.id == id) {
                let s = self.running.remove(pos);
                self.retire(s, ending);
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

/// Row `i` of a step's logits, for a greedy pick its grammar refused.
fn logits_row(out: &StepOutput, i: usize) -> crate::error::Result<Vec<f32>> {
    let logits = out.logits.as_ref().ok_or_else(|| {
        crate::error::HearthError::Internal("no logits for a refused argmax".to_string())
    })?;
    logits
        .get(i)
        .and_then(|r| r.to_vec1::<f32>())
        .map_err(|e| crate::error::HearthError::Internal(format!("reading a logits row: {e}")))
}
