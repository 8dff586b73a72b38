//! Decode steps replayed as CUDA graphs. A decode step's forward is ~150 small kernels; launched one
//! by one through candle, the GPU waits on the host between them. Captured once into a graph, the
//! whole step is one launch.
//!
//! A graph bakes in its kernels' arguments, so its inputs live at fixed device addresses: one packed
//! buffer (`Batch::pack`) per graph, rewritten by one host-to-device copy before each replay. Graphs
//! exist per (batch-size bucket, block-table width): a step is padded up to its bucket with rows that
//! write to a sink block no sequence owns. Only decode steps (one token per sequence, every row
//! sampled) are captured; prefill stays eager, as do steps larger than the largest bucket.
//!
//! Every tensor a graph allocates is freed inside it: its results (the logits and the greedy picks'
//! reductions) are copied into two buffers all of an engine's graphs share, allocated before the KV
//! cache is sized. So a graph holds no memory between launches beyond its working set (which CUDA
//! may share between graphs launched in order on one stream), and dropping one is always legal.
//!
//! Invariants: graphs are captured and launched on the engine thread only (candle's stream is the
//! thread's own); a step's results are read before the next step replays into the same buffers.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph, CudaStream, DriverError};
use candle_core::{
    bail, CpuStorage, CudaDevice, CudaStorage, DType, Device, InplaceOp1, Layout, Tensor,
};

use crate::error::{HearthError, Result};
use crate::model::batch::Padding;
use crate::model::decoder::StepInputs;
use crate::model::{AttentionBackend, Batch, Decoder, KvCache};
use crate::ops::cuda_attention::CudaBatch;

/// Batch sizes a graph is captured for; a step runs in the smallest that holds it.
const BUCKETS: [usize; 15] = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256];
/// Block-table widths are powers of two from this one up (a wider table is a longer upload).
const MIN_TABLE: usize = 16;

/// A step's results from a graph: the logits (rows, vocab) and `runner::pick_tensors` of them.
pub struct GraphOutput {
    pub logits: Tensor,
    pub picks: Tensor,
}

/// One captured graph and the inputs it reads.
struct Captured {
    batch: CudaBatch,
    graph: CudaGraph,
    /// Events between the ops, where the step was captured with HEARTH_CUDA_PROFILE=1.
    profile: Option<crate::device::CapturedProfile>,
}

// SAFETY: cudarc's graph handles are raw pointers, so not Send by default. CUDA allows a graph to be
// used from any thread provided no two threads use it at once (its objects are not internally
// synchronized); every `Captured` lives in `DecodeGraphs::slots`, behind a mutex, and is launched by
// the engine thread only (see the module's invariants).
unsafe impl Send for Captured {}

enum Slot {
    Ready(Captured),
    /// Capture or a replay failed for this shape (logged once); its steps run eagerly.
    Failed,
}

pub struct DecodeGraphs {
    dev: CudaDevice,
    /// A KV block no sequence owns: pad rows write there.
    sink: u32,
    /// The widest block table a sequence can have.
    table_cap: usize,
    /// Where every graph leaves its results: (largest bucket, vocab) f32 logits and (largest
    /// bucket, 4) picks.
    logits: Tensor,
    picks: Tensor,
    slots: Mutex<HashMap<(usize, usize), Slot>>,
}

/// Whether `HEARTH_CUDA_GRAPHS` leaves graphs on (anything but `0`).
pub fn enabled_by_env() -> bool {
    std::env::var("HEARTH_CUDA_GRAPHS").map_or(true, |v| v.trim() != "0")
}

fn driver(what: &str) -> impl Fn(DriverError) -> HearthError + '_ {
    move |e| HearthError::Internal(format!("CUDA graph {what}: {e}"))
}

/// Ends a stream capture however the capturing code leaves (an error or a panic): a stream left
/// capturing refuses all later work.
struct Capturing {
    stream: Arc<CudaStream>,
    open: bool,
}

impl Capturing {
    fn begin(stream: Arc<CudaStream>) -> Result<Self> {
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(driver("begin capture"))?;
        Ok(Self { stream, open: true })
    }

    fn end(mut self) -> std::result::Result<Option<CudaGraph>, DriverError> {
        self.open = false;
        self.stream.end_capture(sys::CUgraphInstantiate_flags(0))
    }
}

impl Drop for Capturing {
    fn drop(&mut self) {
        if self.open {
            drop(self.stream.end_capture(sys::CUgraphInstantiate_flags(0)));
            clear_errors(&self.stream);
        }
    }
}

/// A failed capture leaves errors from its tensors' frees recorded in the context; cudarc would
/// return them from the next, unrelated call.
fn clear_errors(stream: &CudaStream) {
    let _ = stream.context().check_err();
}

impl DecodeGraphs {
    /// Graphs for a model on `device`: None unless it is a CUDA device, the attention runs on
    /// Hearth's CUDA kernels, and `HEARTH_CUDA_GRAPHS` is not `0`. Allocates the shared result
    /// buffers now, so that the KV cache, sized after, leaves room for them. `with_sink` names the
    /// block pad rows write to before the first step.
    pub fn new(
        device: &Device,
        backend: AttentionBackend,
        vocab: usize,
        table_cap: usize,
    ) -> Result<Option<Self>> {
        let Device::Cuda(dev) = device else {
            return Ok(None);
        };
        if backend != AttentionBackend::Cuda || !enabled_by_env() {
            return Ok(None);
        }
        let rows = BUCKETS[BUCKETS.len() - 1];
        Ok(Some(Self {
            dev: dev.clone(),
            sink: 0,
            table_cap: table_cap.max(1),
            logits: Tensor::zeros((rows, vocab), DType::F32, device)?,
            picks: Tensor::zeros((rows, 4), DType::F32, device)?,
            slots: Mutex::new(HashMap::new()),
        }))
    }

    /// The KV block pad rows write to: one the block pool never hands out.
    pub fn with_sink(mut self, sink: u32) -> Self {
        self.sink = sink;
        self
    }

    /// The graph a batch runs in: (rows, table width), or None if it is not a decode step that fits.
    fn key(&self, batch: &Batch, max_context: usize) -> Option<(usize, usize)> {
        let decode = batch.seqs.iter().all(|s| s.len == 1 && s.wants_logits);
        // Past the context the eager forward reports the error (a graph would index past RoPE).
        let inside = batch.positions.iter().all(|&p| (p as usize) < max_context);
        let rows = BUCKETS.iter().copied().find(|&b| b >= batch.num_tokens())?;
        let need = batch.max_blocks();
        let width = need
            .next_power_of_two()
            .max(MIN_TABLE)
            .min(self.table_cap.max(need));
        (decode && inside && batch.num_tokens() > 0).then_some((rows, width))
    }

    /// Run a decode step through its graph: capture it on the shape's first step (which runs
    /// eagerly over the same padded inputs), replay it after. None: not a decode step that fits a
    /// graph, or its capture or a replay failed; the caller runs the step eagerly.
    pub fn run(
        &self,
        decoder: &Decoder,
        kv: &KvCache,
        batch: &Batch,
    ) -> Result<Option<GraphOutput>> {
        let Some((rows, width)) = self.key(batch, decoder.cfg.max_context) else {
            return Ok(None);
        };
        let n = batch.num_tokens();
        let pad = Padding {
            rows: rows - n,
            sink: self.sink,
        };
        let host = batch.pack(width, Some(pad));
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match slots.get(&(rows, width)) {
            Some(Slot::Failed) => return Ok(None),
            Some(Slot::Ready(c)) => {
                let replayed = c
                    .batch
                    .packed()
                    .inplace_op1(&Upload(&host))
                    .map_err(HearthError::from)
                    .and_then(|()| c.graph.launch().map_err(driver("launch")));
                if let Err(e) = replayed {
                    // An eager rerun rewrites whatever part of the step the graph got through.
                    tracing::warn!(rows, width, error = %e, "CUDA graph replay failed; this shape runs eagerly");
                    slots.insert((rows, width), Slot::Failed);
                    clear_errors(&self.dev.cuda_stream());
                    return Ok(None);
                }
                if let Some(p) = &c.profile {
                    p.accumulate();
                }
                return Ok(Some(self.output(n)?));
            }
            None => {}
        }
        let packed = Tensor::new(host.as_slice(), &Device::Cuda(self.dev.clone()))?;
        let cuda = CudaBatch::from_packed(packed, rows, width, kv.block_size)?;
        // candle uploads a few small parameter vectors (shapes, scalars) inside ops; with this
        // guard it keeps them, so the eager step fills the cache the capture then reads from.
        let _cache = self.dev.enable_cuda_graph_htod_cache();
        self.step(decoder, kv, batch, cuda.clone())?;
        let out = self.output(n)?;
        let t0 = std::time::Instant::now();
        match self.capture(decoder, kv, batch, cuda) {
            Ok(c) => {
                tracing::info!(
                    rows,
                    width,
                    ms = t0.elapsed().as_secs_f64() * 1e3,
                    "captured a decode-step CUDA graph"
                );
                slots.insert((rows, width), Slot::Ready(c));
                // A profile then counts replays only, not this shape's eager first step.
                let _ = crate::device::take_op_profile();
            }
            Err(e) => {
                tracing::warn!(rows, width, error = %e, "CUDA graph capture failed; this shape runs eagerly");
                slots.insert((rows, width), Slot::Failed);
            }
        }
        Ok(Some(out))
    }

    fn capture(
        &self,
        decoder: &Decoder,
        kv: &KvCache,
        batch: &Batch,
        cuda: CudaBatch,
    ) -> Result<Captured> {
        let capturing = Capturing::begin(self.dev.cuda_stream())?;
        let stepped = self.step(decoder, kv, batch, cuda.clone());
        let ended = capturing.end();
        let profile = crate::device::take_captured_profile();
        let graph = match (stepped, ended) {
            (Ok(()), Ok(Some(graph))) => graph,
            (stepped, ended) => {
                clear_errors(&self.dev.cuda_stream());
                stepped?;
                ended.map_err(driver("end capture"))?;
                return Err(HearthError::Internal(
                    "CUDA graph capture recorded nothing".into(),
                ));
            }
        };
        graph.upload().map_err(driver("upload"))?;
        Ok(Captured {
            batch: cuda,
            graph,
            profile,
        })
    }

    /// The step a graph holds: forward, the greedy reductions, both copied into the shared result
    /// buffers (device work only; the step's own tensors are freed before it returns).
    fn step(&self, decoder: &Decoder, kv: &KvCache, batch: &Batch, cuda: CudaBatch) -> Result<()> {
        let inputs = StepInputs::graph(batch, cuda)?;
        let logits = decoder.forward_inputs(&inputs, kv)?;
        let picks = super::runner::pick_tensors(&logits)?;
        self.logits.slice_set(&logits, 0, 0)?;
        self.picks.slice_set(&picks, 0, 0)?;
        Ok(())
    }

    fn output(&self, n: usize) -> Result<GraphOutput> {
        Ok(GraphOutput {
            logits: self.logits.narrow(0, 0, n)?,
            picks: self.picks.narrow(0, 0, n)?,
        })
    }
}

/// Overwrites a u32 device tensor with host data, in place (its address is baked into a graph).
struct Upload<'a>(&'a [u32]);

impl InplaceOp1 for Upload<'_> {
    fn name(&self) -> &'static str {
        "upload"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        bail!("upload: a CUDA tensor only")
    }

    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
        use candle_core::backend::BackendStorage;
        if !l.is_contiguous() || l.shape().elem_count() != self.0.len() {
            bail!(
                "upload: {} values for a tensor of {:?}",
                self.0.len(),
                l.shape()
            );
        }
        let dev = s.device().clone();
        let mut dst = s.as_cuda_slice_mut::<u32>()?.slice_mut(l.start_offset()..);
        dev.memcpy_htod(self.0, &mut dst)
    }
}
