//! Decode steps replayed as CUDA graphs. A decode step's forward is ~200 small kernels; launched one
//! by one through candle, the GPU waits on the host between them. Captured once into a graph, the
//! whole step is one launch.
//!
//! A graph bakes in its kernels' arguments, so its inputs live at fixed device addresses: one packed
//! buffer (token ids, positions, slot mapping, block tables; see `CudaBatch`) per graph, rewritten by
//! one host-to-device copy before each replay. Graphs exist per (batch-size bucket, block-table width):
//! a step is padded up to its bucket with rows that write to a sink block no sequence owns. Only decode
//! steps (one token per sequence, every row sampled) are captured; prefill stays eager, as do steps
//! larger than the largest bucket. The intermediate tensors are the graph's own memory (freed inside
//! it); its outputs (logits and the greedy picks' reductions) stay allocated at the same addresses
//! from one replay to the next (instantiated with auto-free-on-launch).
use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph, DriverError};
use candle_core::{bail, CpuStorage, CudaDevice, CudaStorage, Device, InplaceOp1, Layout, Tensor};

use crate::error::{HearthError, Result};
use crate::model::batch::Padding;
use crate::model::decoder::StepInputs;
use crate::model::{AttentionBackend, Batch, Decoder, KvCache};
use crate::ops::cuda_attention::CudaBatch;

/// Batch sizes a graph is captured for; a step runs in the smallest that holds it.
const BUCKETS: [usize; 15] = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256];
/// Block-table widths are powers of two from this one up (a wider table is a longer upload).
const MIN_TABLE: usize = 16;
/// `CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH`: a replay first frees what the last one left
/// allocated (the outputs), which keeps them at the same addresses.
const AUTO_FREE_ON_LAUNCH: u32 = 1;

/// A step's results from a graph: the logits (rows, vocab) and `runner::pick_tensors` of them.
pub struct GraphOutput {
    pub logits: Tensor,
    pub picks: Tensor,
}

/// One captured graph. Field order is drop order: the outputs go before the graph.
struct Captured {
    logits: Tensor,
    picks: Tensor,
    /// Events between the ops, where the step was captured with HEARTH_CUDA_PROFILE=1.
    profile: Option<crate::device::CapturedProfile>,
    batch: CudaBatch,
    graph: CudaGraph,
}

// SAFETY: cudarc's graph handles are raw pointers, so not Send by default. CUDA allows a graph to be
// used from any thread provided no two threads use it at once (its objects are not internally
// synchronized); every `Captured` lives in `DecodeGraphs::slots`, behind a mutex.
unsafe impl Send for Captured {}

enum Slot {
    Ready(Captured),
    /// Capture failed for this shape (logged once); its steps run eagerly.
    Failed,
}

pub struct DecodeGraphs {
    dev: CudaDevice,
    /// A KV block no sequence owns: pad rows write there.
    sink: u32,
    /// The widest block table a sequence can have.
    table_cap: usize,
    slots: Mutex<HashMap<(usize, usize), Slot>>,
}

/// Whether `HEARTH_CUDA_GRAPHS` leaves graphs on (anything but `0`).
pub fn enabled_by_env() -> bool {
    std::env::var("HEARTH_CUDA_GRAPHS").map_or(true, |v| v.trim() != "0")
}

fn driver(what: &str) -> impl Fn(DriverError) -> HearthError + '_ {
    move |e| HearthError::Internal(format!("CUDA graph {what}: {e}"))
}

impl DecodeGraphs {
    /// Graphs for a model on `device`: None unless it is a CUDA device, the attention runs on
    /// Hearth's CUDA kernels, and `HEARTH_CUDA_GRAPHS` is not `0`. `sink` is a KV block the block
    /// pool never hands out.
    pub fn new(
        device: &Device,
        backend: AttentionBackend,
        sink: u32,
        table_cap: usize,
    ) -> Option<Self> {
        match device {
            Device::Cuda(dev) if backend == AttentionBackend::Cuda && enabled_by_env() => {
                Some(Self {
                    dev: dev.clone(),
                    sink,
                    table_cap: table_cap.max(1),
                    slots: Mutex::new(HashMap::new()),
                })
            }
            _ => None,
        }
    }

    /// The graph a batch runs in: (rows, table width), or None if it is not a decode step that fits.
    fn key(&self, batch: &Batch) -> Option<(usize, usize)> {
        let decode = batch.seqs.iter().all(|s| s.len == 1 && s.wants_logits);
        let rows = BUCKETS.iter().copied().find(|&b| b >= batch.num_tokens())?;
        let need = batch.max_blocks();
        let width = need
            .next_power_of_two()
            .max(MIN_TABLE)
            .min(self.table_cap.max(need));
        (decode && batch.num_tokens() > 0).then_some((rows, width))
    }

    /// Run a decode step through its graph: capture it on the shape's first step (which runs
    /// eagerly over the same padded inputs), replay it after. None: not a decode step that fits a
    /// graph, or its capture failed; the caller runs the step eagerly.
    pub fn run(
        &self,
        decoder: &Decoder,
        kv: &KvCache,
        batch: &Batch,
    ) -> Result<Option<GraphOutput>> {
        let Some((rows, width)) = self.key(batch) else {
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
                c.batch.packed().inplace_op1(&Upload(&host))?;
                c.graph.launch().map_err(driver("launch"))?;
                if let Some(p) = &c.profile {
                    p.accumulate();
                }
                return Ok(Some(output(&c.logits, &c.picks, n)?));
            }
            None => {}
        }
        let packed = Tensor::new(host.as_slice(), &Device::Cuda(self.dev.clone()))?;
        let cuda = CudaBatch::from_packed(packed, rows, width, kv.block_size)?;
        // candle uploads a few small parameter vectors (shapes, scalars) inside ops; with this
        // guard it keeps them, so the eager step fills the cache the capture then reads from.
        let _cache = self.dev.enable_cuda_graph_htod_cache();
        let (logits, picks) = step(decoder, kv, batch, cuda.clone())?;
        let out = output(&logits, &picks, n)?;
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
        let stream = self.dev.cuda_stream();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .map_err(driver("begin capture"))?;
        let outputs = step(decoder, kv, batch, cuda.clone());
        // Ends the capture whatever happened: a stream left capturing refuses all later work.
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(AUTO_FREE_ON_LAUNCH));
        let clear = |e: HearthError| {
            // A failed capture leaves errors from its tensors' frees recorded in the context; they
            // would otherwise surface on the next, unrelated call.
            let _ = stream.context().check_err();
            e
        };
        let profile = crate::device::take_captured_profile();
        let (logits, picks) = outputs.map_err(clear)?;
        let graph = graph
            .map_err(driver("end capture"))
            .map_err(clear)?
            .ok_or_else(|| HearthError::Internal("CUDA graph capture recorded nothing".into()))?;
        graph.upload().map_err(driver("upload"))?;
        Ok(Captured {
            logits,
            picks,
            profile,
            batch: cuda,
            graph,
        })
    }
}

/// The step a graph holds: forward, then the greedy reductions (device work only).
fn step(
    decoder: &Decoder,
    kv: &KvCache,
    batch: &Batch,
    cuda: CudaBatch,
) -> Result<(Tensor, Tensor)> {
    let inputs = StepInputs::graph(batch, cuda)?;
    let logits = decoder.forward_inputs(&inputs, kv)?;
    let picks = super::runner::pick_tensors(&logits)?;
    Ok((logits, picks))
}

fn output(logits: &Tensor, picks: &Tensor, n: usize) -> Result<GraphOutput> {
    Ok(GraphOutput {
        logits: logits.narrow(0, 0, n)?,
        picks: picks.narrow(0, 0, n)?,
    })
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
