//! The embedding queue: one worker thread per embedding model takes requests in arrival order and
//! runs their inputs in padded batches of at most `max_batch_tokens` (longest input x inputs, the
//! padded size TEI budgets by), so that concurrent small requests share one forward and a large
//! request is cut into several. A request's inputs go longest first, so each of its batches holds
//! inputs of similar length and little padding. Each forward's measured device time is split over
//! its inputs by the work done for each (`Embedder::cost`), exactly, as the engine splits a step.
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::Embedder;
use crate::engine::metering::split;
use crate::error::{HearthError, Result};

/// A request's vectors, in input order, and what they cost.
#[derive(Debug)]
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    /// This request's share of the device time of the forwards it ran in.
    pub device: Duration,
    /// Arrival to its first forward.
    pub queue: Duration,
}

/// Totals since start, for /metrics.
#[derive(Debug, Default, Clone)]
pub struct EmbedStats {
    pub device_nanos: u64,
    /// The same time split over the tenants whose inputs ran (sums to `device_nanos`).
    pub tenant_device_nanos: BTreeMap<Arc<str>, u64>,
    pub batches: u64,
    pub inputs: u64,
    pub waiting: usize,
}

#[derive(Debug, Default)]
struct Shared {
    stats: Mutex<EmbedStats>,
    waiting: AtomicUsize,
    batches: AtomicU64,
}

struct Job {
    inputs: Vec<Vec<u32>>,
    tenant: Arc<str>,
    arrived: Instant,
    reply: oneshot::Sender<Result<Embedded>>,
}

/// Serving settings of one embedding model.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Padded tokens (longest input x inputs) of one forward; at least the model's `max_tokens`.
    pub max_batch_tokens: usize,
    /// Requests that may wait before new ones are refused.
    pub max_waiting: usize,
}

/// A served embedding model: tokenize with `embedder()`, embed with `embed`.
#[derive(Clone)]
pub struct EmbedHandle {
    pub name: String,
    embedder: Arc<Embedder>,
    tx: flume::Sender<Job>,
    shared: Arc<Shared>,
    max_waiting: usize,
}

impl EmbedHandle {
    /// Start the worker thread of `embedder`.
    pub fn start(name: &str, embedder: Embedder, cfg: BatchConfig) -> Result<Self> {
        let embedder = Arc::new(embedder);
        let (tx, rx) = flume::unbounded();
        let shared = Arc::new(Shared::default());
        let budget = cfg.max_batch_tokens.max(embedder.max_tokens());
        let worker = Worker {
            embedder: embedder.clone(),
            rx,
            shared: shared.clone(),
            budget,
            pending: VecDeque::new(),
        };
        std::thread::Builder::new()
            .name(format!("embed-{name}"))
            .spawn(move || worker.run())?;
        Ok(Self {
            name: name.to_string(),
            embedder,
            tx,
            shared,
            max_waiting: cfg.max_waiting,
        })
    }

    /// The model (its tokenizer, sizes and limits).
    pub fn embedder(&self) -> &Embedder {
        &self.embedder
    }

    /// Queue `inputs` (token ids, each at most `max_tokens`) for `tenant`; the answer comes when
    /// all of them are embedded. A full queue refuses at once; dropping the receiver cancels the
    /// inputs not yet run.
    pub fn submit(
        &self,
        inputs: Vec<Vec<u32>>,
        tenant: Arc<str>,
    ) -> Result<oneshot::Receiver<Result<Embedded>>> {
        if inputs.is_empty() || inputs.iter().any(Vec::is_empty) {
            return Err(HearthError::InvalidRequest("nothing to embed".into()));
        }
        if let Some(long) = inputs.iter().find(|x| x.len() > self.embedder.max_tokens()) {
            return Err(HearthError::InvalidRequest(format!(
                "an input has {} tokens; this model embeds at most {}",
                long.len(),
                self.embedder.max_tokens()
            )));
        }
        let waiting = self.shared.waiting.fetch_add(1, Ordering::AcqRel);
        if waiting >= self.max_waiting {
            self.shared.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(HearthError::QueueFull(waiting));
        }
        let (reply, rx) = oneshot::channel();
        let job = Job {
            inputs,
            tenant,
            arrived: Instant::now(),
            reply,
        };
        self.tx.send(job).map_err(|_| {
            self.shared.waiting.fetch_sub(1, Ordering::AcqRel);
            HearthError::EngineStopped
        })?;
        Ok(rx)
    }

    /// Embed and wait (for callers off the async runtime: tests, benchmarks).
    pub fn embed_blocking(&self, inputs: Vec<Vec<u32>>, tenant: &str) -> Result<Embedded> {
        self.submit(inputs, tenant.into())?
            .blocking_recv()
            .map_err(|_| HearthError::EngineStopped)?
    }

    pub fn stats(&self) -> EmbedStats {
        let mut s = self
            .shared
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        s.waiting = self.shared.waiting.load(Ordering::Acquire);
        s.batches = self.shared.batches.load(Ordering::Acquire);
        s
    }
}

/// A request being embedded: its inputs in the order they run (longest first) and what is done.
struct Pending {
    job: Job,
    order: Vec<usize>,
    next: usize,
    out: Vec<Vec<f32>>,
    device: Duration,
    first_run: Option<Instant>,
}

impl Pending {
    fn new(job: Job) -> Self {
        let mut order: Vec<usize> = (0..job.inputs.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(job.inputs[i].len()));
        let out = vec![Vec::new(); job.inputs.len()];
        Self {
            job,
            order,
            next: 0,
            out,
            device: Duration::ZERO,
            first_run: None,
        }
    }

    fn done(&self) -> bool {
        self.next == self.order.len()
    }
}

struct Worker {
    embedder: Arc<Embedder>,
    rx: flume::Receiver<Job>,
    shared: Arc<Shared>,
    budget: usize,
    pending: VecDeque<Pending>,
}

impl Worker {
    fn run(mut self) {
        loop {
            if self.pending.is_empty() {
                match self.rx.recv() {
                    Ok(job) => self.pending.push_back(Pending::new(job)),
                    Err(_) => return,
                }
            }
            while let Ok(job) = self.rx.try_recv() {
                self.pending.push_back(Pending::new(job));
            }
            // A request whose client left runs no further.
            let before = self.pending.len();
            self.pending.retain(|p| !p.job.reply.is_closed());
            self.shared
                .waiting
                .fetch_sub(before - self.pending.len(), Ordering::AcqRel);
            if !self.pending.is_empty() {
                self.step();
            }
        }
    }

    /// The next batch: inputs in arrival order while the padded size stays within the budget
    /// (always at least one: no input is longer than the budget).
    fn next_batch(&mut self) -> Vec<(usize, usize)> {
        let mut batch = Vec::new();
        let mut longest = 0;
        for (j, p) in self.pending.iter_mut().enumerate() {
            while !p.done() {
                let i = p.order[p.next];
                let len = p.job.inputs[i].len();
                if !batch.is_empty() && longest.max(len) * (batch.len() + 1) > self.budget {
                    return batch;
                }
                longest = longest.max(len);
                batch.push((j, i));
                p.next += 1;
            }
        }
        batch
    }

    /// Run one batch, share out its time, and answer the requests it completed.
    fn step(&mut self) {
        let batch = self.next_batch();
        let started = Instant::now();
        let ids: Vec<Vec<u32>> = batch
            .iter()
            .map(|&(j, i)| std::mem::take(&mut self.pending[j].job.inputs[i]))
            .collect();
        // Like a decoder's step: one forward computes on the CPU at a time (running beside a
        // decoder's, both would be billed for each other's time), timed on the device.
        let device = self.embedder.device();
        let turn = crate::device::cpu_turn(device);
        let timer = crate::device::StepTimer::start(device);
        let result = self.embedder.embed_ids(&ids);
        let elapsed = timer.stop();
        drop(turn);
        self.shared.batches.fetch_add(1, Ordering::AcqRel);
        match result {
            Ok(vectors) => {
                let costs: Vec<u128> = ids.iter().map(|x| self.embedder.cost(x.len())).collect();
                let shares = split(elapsed, &costs);
                let mut stats = self
                    .shared
                    .stats
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                stats.device_nanos += elapsed.as_nanos() as u64;
                stats.inputs += batch.len() as u64;
                for ((&(j, i), v), share) in batch.iter().zip(vectors).zip(shares) {
                    let p = &mut self.pending[j];
                    p.out[i] = v;
                    p.device += share;
                    p.first_run.get_or_insert(started);
                    *stats
                        .tenant_device_nanos
                        .entry(p.job.tenant.clone())
                        .or_default() += share.as_nanos() as u64;
                }
            }
            Err(e) => {
                // The inputs were checked before queueing, so this is the server's fault: every
                // request in the batch fails (and runs no further).
                tracing::error!(error = %e, "embedding batch failed");
                let mut failed: Vec<usize> = batch.iter().map(|&(j, _)| j).collect();
                failed.dedup();
                for &j in failed.iter().rev() {
                    if let Some(p) = self.pending.remove(j) {
                        let _ = p
                            .job
                            .reply
                            .send(Err(HearthError::Internal(format!("embedding failed: {e}"))));
                        self.shared.waiting.fetch_sub(1, Ordering::AcqRel);
                    }
                }
                return;
            }
        }
        let mut k = 0;
        while k < self.pending.len() {
            if !self.pending[k].done() {
                k += 1;
                continue;
            }
            let Some(p) = self.pending.remove(k) else {
                break;
            };
            self.shared.waiting.fetch_sub(1, Ordering::AcqRel);
            let queue = p.first_run.map_or(Duration::ZERO, |t| {
                t.saturating_duration_since(p.job.arrived)
            });
            let _ = p.job.reply.send(Ok(Embedded {
                vectors: p.out,
                device: p.device,
                queue,
            }));
        }
    }
}
