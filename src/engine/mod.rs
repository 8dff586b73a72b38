//! The engine: one thread per model that owns the device, the KV cache and the scheduler, and runs
//! `schedule -> execute -> sample -> update` in a loop. Requests arrive over a channel; each gets its
//! tokens back on its own channel, and a closed channel cancels it.
pub mod block_pool;
#[cfg(feature = "cuda")]
pub mod decode_graphs;
pub mod metering;
pub mod runner;
pub mod sampler;
pub mod scheduler;
pub mod sequence;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use candle_core::DType;

pub use sampler::{Sampled, SamplingParams};
pub use scheduler::SchedulerConfig;
pub use sequence::{DeviceTime, Event, FinishReason, StopHandle, Usage};

use crate::error::{HearthError, Result};
use crate::model::{AttentionBackend, ChatTemplate, KvCache, Model, Tokenizer};
use block_pool::BlockPool;
use runner::Runner;
use scheduler::Scheduler;
use sequence::Sequence;

/// How much memory the KV cache gets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvBudget {
    Bytes(usize),
    /// A fraction of the device memory free at start-up (on the CPU, MemAvailable).
    FreeFraction(f64),
}

impl KvBudget {
    pub fn bytes(&self, device: &candle_core::Device) -> usize {
        match *self {
            Self::Bytes(b) => b,
            Self::FreeFraction(f) => (free_memory(device) as f64 * f.clamp(0.0, 1.0)) as usize,
        }
    }
}

/// Free memory of `device` in bytes (best effort: 1 GiB when it cannot be read).
fn free_memory(device: &candle_core::Device) -> usize {
    crate::device::free_memory(device).unwrap_or(1 << 30)
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub block_size: usize,
    /// Number of KV blocks; when None, sized from `kv_budget`.
    pub num_blocks: Option<usize>,
    pub kv_budget: KvBudget,
    pub scheduler: SchedulerConfig,
    /// None: the fastest backend for the device.
    pub backend: Option<AttentionBackend>,
    /// Reuse the KV of cached prompt prefixes.
    pub prefix_caching: bool,
    /// max_tokens of a request that names none (clamped to what fits the context and the pool).
    pub default_max_tokens: usize,
    /// Split each step's device time over its sequences (off: their shares are zero).
    pub metering: bool,
    /// Where prefix-index changes go as KV-cache events (None: not recorded).
    pub kv_events: Option<crate::kv_events::Sink>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            num_blocks: None,
            kv_budget: KvBudget::Bytes(512 << 20),
            scheduler: SchedulerConfig::default(),
            backend: None,
            prefix_caching: true,
            default_max_tokens: 1024,
            metering: true,
            kv_events: None,
        }
    }
}

/// A generation request: prompt token ids and how to sample.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// Who asks: prefix-cache blocks are never shared between tenants (a timing side channel).
    pub tenant: Option<String>,
    /// The tenant's share of the engine under contention, relative to other tenants' (>= 1).
    pub weight: u32,
    /// The grammar the output must follow (compiled for this engine's vocabulary at submission).
    pub constraint: Option<crate::grammar::Constraint>,
}

impl Request {
    pub fn new(prompt: Vec<u32>, params: SamplingParams) -> Self {
        Self {
            prompt,
            params,
            tenant: None,
            weight: 1,
            constraint: None,
        }
    }
}

/// The engine's numbers, published as one snapshot after every step (the only copy readers see).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub total_blocks: usize,
    /// Blocks that can be allocated: empty ones plus cached ones nobody uses.
    pub free_blocks: usize,
    /// Of those, blocks that still hold a reusable prefix.
    pub cached_blocks: usize,
    pub steps: u64,
    /// Prompt tokens run through the model (prefix-cache hits are not).
    pub prefill_tokens: u64,
    /// Generated tokens run through the model (including recomputation after preemption).
    pub decode_tokens: u64,
    pub preemptions: u64,
    /// Wall time of whole engine steps: scheduling, the forward, sampling, replies.
    pub step_micros: u64,
    /// Wall time of the forward passes (including the read-back of logits).
    pub busy_micros: u64,
    /// Device time of steps (CUDA events on a GPU), the basis of GPU-time metering.
    pub device_nanos: u64,
    /// The same device time as split over the tenants whose sequences ran (sums to
    /// `device_nanos`; sequences submitted without a tenant count under "").
    pub tenant_device_nanos: std::collections::BTreeMap<Arc<str>, u64>,
    pub prefix_query_tokens: u64,
    pub prefix_hit_tokens: u64,
    /// KV token slots held by running sequences, and of those holding a token.
    pub kv_slots_allocated: usize,
    pub kv_slots_used: usize,
    /// Prompt tokens queued or in prefill, not yet run through the model.
    pub pending_prompt_tokens: usize,
    /// Blocks the waiting sequences need to be admitted.
    pub waiting_blocks: usize,
    /// Device time of recent steps against their size: what the router's load policy predicts a
    /// queue's wait with.
    pub step_cost: StepCost,
}

/// A step's device time as `fixed + per_token x tokens`, fitted by least squares over recent
/// steps (older ones weigh less by a factor per step). A single ratio of time to tokens would
/// charge a short step's fixed cost to every token of a long prompt, and overstate its wait.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct StepCost {
    w: f64,
    x: f64,
    y: f64,
    xx: f64,
    xy: f64,
}

impl StepCost {
    /// How much each older step keeps of its weight when a new one comes: about the last fifty
    /// steps count.
    const DECAY: f64 = 0.98;

    pub fn add(&mut self, tokens: usize, nanos: f64) {
        let x = tokens as f64;
        for v in [
            &mut self.w,
            &mut self.x,
            &mut self.y,
            &mut self.xx,
            &mut self.xy,
        ] {
            *v *= Self::DECAY;
        }
        self.w += 1.0;
        self.x += x;
        self.y += nanos;
        self.xx += x * x;
        self.xy += x * nanos;
    }

    /// `(fixed, per_token)` in nanoseconds, None before any step. With steps of one size only
    /// (no spread to fit a slope on), the time is all per token.
    pub fn fit(&self) -> Option<(f64, f64)> {
        if self.w == 0.0 || self.x == 0.0 {
            return None;
        }
        let (mx, my) = (self.x / self.w, self.y / self.w);
        let var = self.xx / self.w - mx * mx;
        let slope = (self.xy / self.w - mx * my) / var;
        if var <= mx * mx * 1e-3 || !slope.is_finite() || slope <= 0.0 {
            return Some((0.0, my / mx));
        }
        let fixed = (my - slope * mx).max(0.0);
        Some((fixed, slope))
    }
}

impl EngineStats {
    /// Share of the KV blocks in use (0 to 1): a cached prefix nobody holds counts as free.
    pub fn kv_usage(&self) -> f64 {
        1.0 - self.free_blocks as f64 / self.total_blocks.max(1) as f64
    }

    /// Count one step's work.
    fn add_step(&mut self, out: &scheduler::StepOutputs, step: Duration) {
        self.steps += 1;
        let tokens: usize = out.seqs.iter().map(|s| s.tokens).sum();
        self.step_cost
            .add(tokens, out.device_time.as_nanos() as f64);
        for s in &out.seqs {
            self.prefill_tokens += s.prompt_tokens as u64;
            self.decode_tokens += (s.tokens - s.prompt_tokens) as u64;
            let tenant = s.tenant.clone().unwrap_or_else(|| "".into());
            *self.tenant_device_nanos.entry(tenant).or_default() += s.device_time.as_nanos() as u64;
        }
        self.busy_micros += out.forward_time.as_micros() as u64;
        self.device_nanos += out.device_time.as_nanos() as u64;
        self.step_micros += step.as_micros() as u64;
    }

    /// Take the gauges of the scheduler and its pool.
    fn observe(&mut self, sched: &Scheduler) {
        self.running = sched.num_running();
        self.waiting = sched.num_waiting();
        self.total_blocks = sched.pool.num_total();
        self.free_blocks = sched.pool.num_free();
        self.cached_blocks = sched.pool.num_cached();
        self.preemptions = sched.preemptions;
        self.prefix_query_tokens = sched.prefix_query_tokens;
        self.prefix_hit_tokens = sched.prefix_hit_tokens;
        (self.kv_slots_allocated, self.kv_slots_used) = sched.kv_slot_usage();
        (self.pending_prompt_tokens, self.waiting_blocks) = sched.queued_work();
    }
}

/// An engine's queue as a new request would find it (see `router::load`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Load {
    /// Prompt tokens ahead of it, not yet run.
    pub pending_prompt_tokens: usize,
    /// Sequences running (each takes a token of every step's budget while it decodes).
    pub running: usize,
    /// Blocks left once the waiting sequences are admitted.
    pub free_blocks: usize,
    pub block_size: usize,
    /// Tokens one step may run.
    pub max_batch_tokens: usize,
    /// Measured step time as (fixed, per token) nanoseconds; None before any step has run.
    pub step_cost: Option<(f64, f64)>,
}

/// Everything a client needs to build prompts and read replies, plus the way in.
#[derive(Clone)]
pub struct EngineHandle {
    tx: flume::Sender<Sequence>,
    next_id: Arc<AtomicU64>,
    pub name: String,
    pub tokenizer: Arc<Tokenizer>,
    pub chat_template: Arc<ChatTemplate>,
    pub max_context: usize,
    stats: Arc<Mutex<EngineStats>>,
    block_size: usize,
    max_waiting: usize,
    max_batch_tokens: usize,
    default_max_tokens: usize,
    /// The metering cost model's work for one decoded token (the router orders models by it).
    pub cost_per_token: u128,
    /// Compiles output constraints for this model's vocabulary; built on the first constrained
    /// request.
    grammars: Arc<std::sync::OnceLock<std::result::Result<crate::grammar::Compiler, String>>>,
}

impl EngineHandle {
    /// Validate and enqueue a request; its events arrive on the returned channel. Dropping the
    /// receiver cancels the request.
    pub fn submit(&self, req: Request) -> Result<flume::Receiver<Event>> {
        self.submit_stoppable(req).map(|(rx, _)| rx)
    }

    /// `submit`, with a handle that ends the request early and still hears its `Finished`.
    pub fn submit_stoppable(&self, req: Request) -> Result<(flume::Receiver<Event>, StopHandle)> {
        if req.prompt.is_empty() {
            return Err(HearthError::InvalidRequest("the prompt is empty".into()));
        }
        req.params.validate()?;
        let vocab = self.tokenizer.vocab_size() as u32;
        if let Some(bad) = req.prompt.iter().find(|&&t| t >= vocab) {
            return Err(HearthError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary ({vocab})"
            )));
        }
        if let Some(&(bad, _)) = req.params.logit_bias.iter().find(|&&(t, _)| t >= vocab) {
            return Err(HearthError::InvalidRequest(format!(
                "logit_bias names token {bad}, outside the vocabulary ({vocab})"
            )));
        }
        let prompt_len = req.prompt.len();
        if prompt_len >= self.max_context {
            return Err(HearthError::ContextLength {
                prompt: prompt_len,
                context: self.max_context,
            });
        }
        let room = self.max_context - prompt_len;
        // One snapshot for every check below (each read takes the lock and copies it).
        let snap = self.stats();
        // The longest this sequence can get must fit the pool, or it could never finish.
        let pool_tokens = snap.total_blocks * self.block_size;
        if prompt_len >= pool_tokens {
            return Err(HearthError::KvCapacity {
                needed: (prompt_len + 1).div_ceil(self.block_size),
                total: snap.total_blocks,
            });
        }
        let fits = room.min(pool_tokens - prompt_len);
        let max_tokens = match req.params.max_tokens {
            Some(m) if m > room => {
                return Err(HearthError::ContextLength {
                    prompt: prompt_len + m,
                    context: self.max_context,
                })
            }
            Some(m) if m > fits => {
                return Err(HearthError::KvCapacity {
                    needed: (prompt_len + m).div_ceil(self.block_size),
                    total: snap.total_blocks,
                })
            }
            Some(m) => m,
            // Omitted: the configured default, clamped to what fits the context and the pool.
            None => self.default_max_tokens.min(fits),
        };
        let salt = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            self.name.hash(&mut h);
            req.tenant.hash(&mut h);
            h.finish()
        };
        let waiting = snap.waiting + self.tx.len();
        if waiting >= self.max_waiting {
            return Err(HearthError::QueueFull(waiting));
        }
        let mut sampler = sampler::Sampler::new(req.params);
        if let Some(c) = &req.constraint {
            sampler = sampler.with_guide(self.grammar_compiler()?.guide(c)?);
        }
        let (reply, rx) = flume::unbounded();
        let seq = Sequence {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            prompt_len,
            tokens: req.prompt,
            num_computed: 0,
            alloc: block_pool::Allocation::new(salt),
            prompt_hashes: Vec::new(),
            sampler,
            max_tokens,
            eos_ids: self.tokenizer.eos_ids.clone(),
            reply,
            arrived: Instant::now(),
            admitted: None,
            tenant: req.tenant.map(Arc::from),
            weight: req.weight.max(1),
            device: DeviceTime::default(),
            stop: StopHandle::default(),
        };
        let stop = seq.stop.clone();
        self.tx.send(seq).map_err(|_| HearthError::EngineStopped)?;
        Ok((rx, stop))
    }

    /// The longest prompt, in characters, that could fit the context and the KV pool: more
    /// characters than this are more tokens than fit, whatever the text (see
    /// `Tokenizer::max_token_chars`), so such a prompt is refused before it is tokenized.
    pub fn max_prompt_chars(&self) -> usize {
        let fits = self
            .max_context
            .min(self.total_blocks() * self.block_size)
            .saturating_sub(1);
        fits.saturating_mul(self.tokenizer.max_token_chars())
    }

    /// The latest snapshot of the engine's numbers.
    pub fn stats(&self) -> EngineStats {
        self.stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Blocks that can be allocated (empty, or cached and unused).
    pub fn free_blocks(&self) -> usize {
        self.stats().free_blocks
    }

    /// Unused blocks that still hold a cached prefix.
    pub fn cached_blocks(&self) -> usize {
        self.stats().cached_blocks
    }

    /// Requests not yet admitted: the scheduler's queue and those still in the channel to it (a
    /// long step leaves new arrivals there, and admission counts them).
    pub fn waiting(&self, snap: &EngineStats) -> usize {
        snap.waiting + self.tx.len()
    }

    /// Tokens per KV block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total_blocks(&self) -> usize {
        self.stats().total_blocks
    }

    /// Build the grammar compiler now if it is not built yet (it takes a moment: call it where
    /// blocking is fine).
    pub fn warm_grammar(&self) -> Result<()> {
        self.grammar_compiler().map(|_| ())
    }

    fn grammar_compiler(&self) -> Result<&crate::grammar::Compiler> {
        self.grammars
            .get_or_init(|| {
                crate::grammar::Compiler::new(self.tokenizer.clone()).map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| HearthError::Internal(e.clone()))
    }

    /// The queue a new request would join, for the router's load policy.
    pub fn load(&self) -> Load {
        // Read under the lock, not through `stats()`: a clone would copy the per-tenant map on
        // every routed request.
        let s = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        Load {
            pending_prompt_tokens: s.pending_prompt_tokens,
            running: s.running,
            free_blocks: s.free_blocks.saturating_sub(s.waiting_blocks),
            block_size: self.block_size,
            max_batch_tokens: self.max_batch_tokens,
            step_cost: s.step_cost.fit(),
        }
    }

    /// Whether no request is queued or running.
    pub fn is_idle(&self) -> bool {
        let s = self.stats();
        s.running == 0 && s.waiting == 0 && self.tx.is_empty()
    }

    /// Run a request to the end and collect its tokens (a convenience for the CLI, tests, benches).
    pub fn generate(&self, req: Request) -> Result<(Vec<Sampled>, FinishReason, Usage)> {
        let rx = self.submit(req)?;
        let mut out = Vec::new();
        for ev in rx.iter() {
            match ev {
                Event::Admitted { .. } | Event::Prefilled { .. } => {}
                Event::Token(s) => out.push(s),
                Event::Finished { reason, usage } => return Ok((out, reason, usage)),
                Event::Error(e) => return Err(HearthError::Internal(e)),
            }
        }
        Err(HearthError::EngineStopped)
    }
}

pub struct Engine;

impl Engine {
    /// Start the engine thread for `model`; it runs until every handle is dropped and work is done.
    pub fn start(model: Model, cfg: EngineConfig) -> Result<EngineHandle> {
        let d = &model.decoder;
        let dtype: DType = d.cfg.dtype;
        let per_block = KvCache::bytes_per_block(
            d.cfg.n_layers,
            cfg.block_size,
            d.cfg.n_kv_heads,
            d.cfg.head_dim,
            dtype,
        );
        let backend = cfg
            .backend
            .unwrap_or_else(|| AttentionBackend::best_for(&d.device, dtype));
        // Before the KV cache is sized from the free memory: the graphs' shared result buffers.
        #[cfg(feature = "cuda")]
        let graphs = decode_graphs::DecodeGraphs::new(
            &d.device,
            backend,
            d.cfg.vocab,
            model.max_context().div_ceil(cfg.block_size),
        )?;
        let num_blocks = cfg
            .num_blocks
            .unwrap_or(cfg.kv_budget.bytes(&d.device) / per_block.max(1));
        if num_blocks == 0 {
            return Err(HearthError::KvCapacity {
                needed: 1,
                total: 0,
            });
        }
        // Decode graphs pad their batches with rows that write to a block of their own: one block
        // past the pool's.
        #[cfg(feature = "cuda")]
        let graphs = graphs.map(|g| g.with_sink(num_blocks as u32));
        #[cfg(feature = "cuda")]
        let sink_blocks = usize::from(graphs.is_some());
        #[cfg(not(feature = "cuda"))]
        let sink_blocks = 0;
        let kv = d.new_kv_cache(num_blocks + sink_blocks, cfg.block_size)?;
        // candle's CUDA device queues work on the calling thread's stream: the weights and the zeroed
        // cache must be complete before the engine thread uses them from its own.
        d.device.synchronize()?;
        let mut pool = BlockPool::new(num_blocks, cfg.block_size, cfg.prefix_caching);
        pool.set_partial_reuse(d.device.is_cpu());
        let events = cfg.kv_events.clone().map(|sink| {
            pool.record_events();
            let events = crate::kv_events::EngineEvents::new(sink, &model.name, cfg.block_size);
            // A (re)started engine holds nothing: routers drop what they knew of it.
            events.send(true, Vec::new());
            events
        });
        let cost = model.decoder.cost_model();
        let cost_per_token = cost.cost(0, 1, true);
        let mut scheduler = Scheduler::new(
            cfg.scheduler.clone(),
            pool,
            model.max_context(),
            cfg.metering.then_some(cost),
        );
        scheduler.masks_ahead = !d.device.is_cpu();
        let mut first = EngineStats::default();
        first.observe(&scheduler);
        let stats = Arc::new(Mutex::new(first));
        let (tx, rx) = flume::unbounded::<Sequence>();
        let handle = EngineHandle {
            tx,
            next_id: Arc::new(AtomicU64::new(0)),
            name: model.name.clone(),
            tokenizer: Arc::new(model.tokenizer.clone()),
            chat_template: Arc::new(model.chat_template.clone()),
            max_context: model.max_context(),
            stats: stats.clone(),
            block_size: cfg.block_size,
            max_waiting: cfg.scheduler.max_waiting,
            max_batch_tokens: cfg.scheduler.max_batch_tokens,
            default_max_tokens: cfg.default_max_tokens,
            cost_per_token,
            grammars: Arc::default(),
        };
        tracing::info!(
            model = %model.name,
            num_blocks,
            block_size = cfg.block_size,
            kv_mib = (num_blocks * per_block) >> 20,
            ?backend,
            "engine starting"
        );
        let runner = Runner {
            decoder: model.decoder,
            kv,
            backend,
            #[cfg(feature = "cuda")]
            graphs,
        };
        std::thread::Builder::new()
            .name(format!("engine-{}", model.name))
            .spawn(move || run_loop(runner, scheduler, rx, stats, events))?;
        Ok(handle)
    }
}

/// The engine thread: take new requests, then `schedule -> execute -> update`, publish the stats,
/// send the replies; until every handle is gone and no work is left.
fn run_loop(
    runner: Runner,
    mut sched: Scheduler,
    rx: flume::Receiver<Sequence>,
    shared: Arc<Mutex<EngineStats>>,
    events: Option<crate::kv_events::EngineEvents>,
) {
    let mut stats = EngineStats::default();
    loop {
        if sched.is_idle() {
            debug_assert!(sched.pool.all_free(), "KV blocks held with no sequence");
            match rx.recv() {
                Ok(seq) => sched.add(seq),
                Err(_) => break,
            }
        }
        let t_step = Instant::now();
        for seq in rx.try_iter() {
            sched.add(seq);
        }
        let plan = sched.schedule();
        // Admission control reads `waiting` from the snapshot: publish the queue as it is now, not
        // only after the forward (a request drained from the channel must not be invisible).
        stats.observe(&sched);
        publish(&shared, &stats);
        let outputs = if plan.is_empty() {
            sched.take_pending()
        } else {
            // On an accelerator the host is idle while the forward runs: the step's grammar masks
            // are computed then. On the CPU the forward takes every core, so a mask costs the
            // same there; the sampler checks the device's argmax instead and masks only when the
            // grammar refuses it.
            let result = if sched.masks_ahead && sched.plan_is_constrained(&plan) {
                std::thread::scope(|scope| {
                    let sched = &mut sched;
                    let plan = &plan;
                    scope.spawn(move || sched.prepare_masks(plan));
                    runner.execute(plan)
                })
            } else {
                runner.execute(&plan)
            };
            match result {
                Ok(out) => sched.update(&plan, out),
                Err(e) => {
                    tracing::error!(error = %e, "step failed");
                    sched.fail(&plan, &e.to_string())
                }
            }
        };
        if !plan.is_empty() {
            stats.add_step(&outputs, t_step.elapsed());
        }
        stats.observe(&sched);
        publish(&shared, &stats);
        let idle_but_waiting = plan.is_empty() && !sched.is_idle();
        outputs.send();
        if let Some(events) = &events {
            let changes = sched.pool.take_events();
            if !changes.is_empty() {
                events.send(false, changes);
            }
        }
        if idle_but_waiting {
            // Nothing fits right now (admission checks capacity, so this is rare): avoid spinning.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    tracing::info!("engine stopped");
}

fn publish(shared: &Mutex<EngineStats>, stats: &EngineStats) {
    match shared.lock() {
        Ok(mut s) => s.clone_from(stats),
        Err(p) => p.into_inner().clone_from(stats),
    }
}
