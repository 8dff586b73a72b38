//! The engine: one thread per model that owns the device, the KV cache and the scheduler, and runs
//! `schedule -> execute -> sample -> update` in a loop. Requests arrive over a channel; each gets its
//! tokens back on its own channel, and a closed channel cancels it.
pub mod block_pool;
pub mod runner;
pub mod sampler;
pub mod scheduler;
pub mod sequence;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::DType;

pub use sampler::{Sampled, SamplingParams};
pub use scheduler::SchedulerConfig;
pub use sequence::{Event, FinishReason, Usage};

use crate::error::{HearthError, Result};
use crate::model::{AttentionBackend, ChatTemplate, KvCache, Model, Tokenizer};
use block_pool::BlockPool;
use runner::{Row, Runner};
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
}

impl Request {
    pub fn new(prompt: Vec<u32>, params: SamplingParams) -> Self {
        Self {
            prompt,
            params,
            tenant: None,
        }
    }
}

/// Counters the engine keeps; read from any thread.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub total_blocks: AtomicUsize,
    pub steps: AtomicU64,
    /// Prompt tokens run through the model (prefix-cache hits are not).
    pub prefill_tokens: AtomicU64,
    /// Generated tokens run through the model (including recomputation after preemption).
    pub decode_tokens: AtomicU64,
    pub preemptions: AtomicU64,
    /// Wall time of whole engine steps: scheduling, the forward, sampling, replies.
    pub step_micros: AtomicU64,
    /// Wall time of the forward passes (including the read-back of logits).
    pub busy_micros: AtomicU64,
    /// Device time of steps (CUDA events on a GPU), the basis of GPU-time metering.
    pub device_micros: AtomicU64,
    pub prefix_query_tokens: AtomicU64,
    pub prefix_hit_tokens: AtomicU64,
    /// KV token slots held by running sequences, and of those holding a token.
    pub kv_slots_allocated: AtomicUsize,
    pub kv_slots_used: AtomicUsize,
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
    pub stats: Arc<EngineStats>,
    pool: Arc<block_pool::PoolGauges>,
    block_size: usize,
    max_waiting: usize,
}

impl EngineHandle {
    /// Validate and enqueue a request; its events arrive on the returned channel. Dropping the
    /// receiver cancels the request.
    pub fn submit(&self, req: Request) -> Result<flume::Receiver<Event>> {
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
        let prompt_len = req.prompt.len();
        if prompt_len >= self.max_context {
            return Err(HearthError::ContextLength {
                prompt: prompt_len,
                context: self.max_context,
            });
        }
        let room = self.max_context - prompt_len;
        let max_tokens = match req.params.max_tokens {
            Some(m) if m > room => {
                return Err(HearthError::ContextLength {
                    prompt: prompt_len + m,
                    context: self.max_context,
                })
            }
            Some(m) => m,
            None => room,
        };
        // The longest this sequence can get must fit the pool, or it could never finish.
        let total = self.stats.total_blocks.load(Ordering::Relaxed);
        let needed = (prompt_len + max_tokens).div_ceil(self.block_size);
        if needed > total {
            return Err(HearthError::KvCapacity { needed, total });
        }
        let salt = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            self.name.hash(&mut h);
            req.tenant.hash(&mut h);
            h.finish()
        };
        let waiting = self.stats.waiting.load(Ordering::Relaxed) + self.tx.len();
        if waiting >= self.max_waiting {
            return Err(HearthError::QueueFull(waiting));
        }
        let (reply, rx) = flume::unbounded();
        let seq = Sequence {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            prompt_len,
            tokens: req.prompt,
            num_computed: 0,
            block_table: Vec::new(),
            sampler: sampler::Sampler::new(req.params),
            max_tokens,
            eos_ids: self.tokenizer.eos_ids.clone(),
            reply,
            arrived: Instant::now(),
            cached_tokens: 0,
            salt,
            block_hashes: Vec::new(),
            admitted: false,
            queue_secs: 0.0,
        };
        self.tx.send(seq).map_err(|_| HearthError::EngineStopped)?;
        Ok(rx)
    }

    /// Blocks that can be allocated (empty, or cached and unused).
    pub fn free_blocks(&self) -> usize {
        self.pool.free.load(Ordering::Relaxed)
    }

    /// Unused blocks that still hold a cached prefix.
    pub fn cached_blocks(&self) -> usize {
        self.pool.cached.load(Ordering::Relaxed)
    }

    pub fn total_blocks(&self) -> usize {
        self.stats.total_blocks.load(Ordering::Relaxed)
    }

    /// Whether no request is queued or running.
    pub fn is_idle(&self) -> bool {
        self.stats.running.load(Ordering::Relaxed) == 0
            && self.stats.waiting.load(Ordering::Relaxed) == 0
            && self.tx.is_empty()
    }

    /// Run a request to the end and collect its tokens (a convenience for the CLI, tests, benches).
    pub fn generate(&self, req: Request) -> Result<(Vec<Sampled>, FinishReason, Usage)> {
        let rx = self.submit(req)?;
        let mut out = Vec::new();
        for ev in rx.iter() {
            match ev {
                Event::Admitted { .. } => {}
                Event::Token(s) => out.push(s),
                Event::Finished { reason, usage } => return Ok((out, reason, usage)),
                Event::Error(e) => return Err(HearthError::InvalidRequest(e)),
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
        let num_blocks = cfg
            .num_blocks
            .unwrap_or(cfg.kv_budget.bytes(&d.device) / per_block.max(1));
        if num_blocks == 0 {
            return Err(HearthError::KvCapacity {
                needed: 1,
                total: 0,
            });
        }
        let kv = d.new_kv_cache(num_blocks, cfg.block_size)?;
        // candle's CUDA device queues work on the calling thread's stream: the weights and the zeroed
        // cache must be complete before the engine thread uses them from its own.
        d.device.synchronize()?;
        let backend = cfg
            .backend
            .unwrap_or_else(|| AttentionBackend::best_for(&d.device, dtype));
        let pool = BlockPool::new(num_blocks, cfg.block_size, cfg.prefix_caching);
        let stats = Arc::new(EngineStats::default());
        stats.total_blocks.store(num_blocks, Ordering::Relaxed);
        let (tx, rx) = flume::unbounded::<Sequence>();
        let handle = EngineHandle {
            tx,
            next_id: Arc::new(AtomicU64::new(0)),
            name: model.name.clone(),
            tokenizer: Arc::new(model.tokenizer.clone()),
            chat_template: Arc::new(model.chat_template.clone()),
            max_context: model.max_context(),
            stats: stats.clone(),
            pool: pool.gauges(),
            block_size: cfg.block_size,
            max_waiting: cfg.scheduler.max_waiting,
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
        };
        let scheduler = Scheduler::new(cfg.scheduler, pool);
        std::thread::Builder::new()
            .name(format!("engine-{}", model.name))
            .spawn(move || run_loop(runner, scheduler, rx, stats))?;
        Ok(handle)
    }
}

fn run_loop(
    runner: Runner,
    mut sched: Scheduler,
    rx: flume::Receiver<Sequence>,
    stats: Arc<EngineStats>,
) {
    loop {
        if sched.is_idle() {
            match rx.recv() {
                Ok(seq) => sched.add(seq),
                Err(_) => break,
            }
        }
        let t_step = Instant::now();
        while let Ok(seq) = rx.try_recv() {
            sched.add(seq);
        }
        sched.abort_cancelled();
        let plan = sched.schedule();
        stats.running.store(sched.num_running(), Ordering::Relaxed);
        stats.waiting.store(sched.num_waiting(), Ordering::Relaxed);
        stats
            .preemptions
            .store(sched.preemptions, Ordering::Relaxed);
        if plan.is_empty() {
            if !sched.is_idle() {
                // Nothing fits right now (should not happen: admission checks capacity); avoid spinning.
                std::thread::sleep(Duration::from_millis(1));
            }
            continue;
        }
        let full: Vec<bool> = plan
            .items
            .iter()
            .filter(|it| it.wants_logits)
            .map(|it| {
                sched
                    .get_mut(it.seq_id)
                    .is_none_or(|s| s.sampler.needs_full_logits())
            })
            .collect();
        let out = match runner.execute(&plan, &full) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "step failed");
                sched.fail(&plan, &e.to_string());
                continue;
            }
        };
        stats.steps.fetch_add(1, Ordering::Relaxed);
        stats
            .busy_micros
            .fetch_add(out.elapsed.as_micros() as u64, Ordering::Relaxed);
        stats
            .device_micros
            .fetch_add(out.device_time.as_micros() as u64, Ordering::Relaxed);
        sched.mark_computed(&plan);
        let mut rows = out.rows.into_iter();
        for item in plan.items.iter() {
            let prompt = item.prompt_tokens as u64;
            stats.prefill_tokens.fetch_add(prompt, Ordering::Relaxed);
            stats
                .decode_tokens
                .fetch_add(item.tokens.len() as u64 - prompt, Ordering::Relaxed);
            if !item.wants_logits {
                continue;
            }
            let Some(row) = rows.next() else { break };
            let Some(seq) = sched.get_mut(item.seq_id) else {
                continue;
            };
            let sampled = match row {
                Row::Full(r) => seq.sampler.sample(&r, &seq.tokens),
                Row::Greedy { token, logprob } => seq.sampler.accept_greedy(token, logprob),
            };
            let done = seq.push(&sampled);
            let gone = seq.reply.send(Event::Token(sampled)).is_err();
            let done = if seq.tokens.len() >= runner.decoder.cfg.max_context {
                Some(done.unwrap_or(FinishReason::Length))
            } else {
                done
            };
            match (done, gone) {
                (_, true) => sched.finish(item.seq_id, FinishReason::Aborted),
                (Some(r), false) => sched.finish(item.seq_id, r),
                (None, false) => {}
            }
        }
        publish(&stats, &sched);
        stats
            .step_micros
            .fetch_add(t_step.elapsed().as_micros() as u64, Ordering::Relaxed);
    }
    tracing::info!("engine stopped");
}

fn publish(stats: &EngineStats, sched: &Scheduler) {
    stats.running.store(sched.num_running(), Ordering::Relaxed);
    stats.waiting.store(sched.num_waiting(), Ordering::Relaxed);
    stats
        .preemptions
        .store(sched.preemptions, Ordering::Relaxed);
    stats
        .prefix_query_tokens
        .store(sched.prefix_query_tokens, Ordering::Relaxed);
    stats
        .prefix_hit_tokens
        .store(sched.prefix_hit_tokens, Ordering::Relaxed);
    let (alloc, used) = sched.kv_slot_usage();
    stats.kv_slots_allocated.store(alloc, Ordering::Relaxed);
    stats.kv_slots_used.store(used, Ordering::Relaxed);
}
