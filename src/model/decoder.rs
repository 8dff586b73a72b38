//! One decoder-only transformer that covers the supported architectures (Llama, Mistral, Qwen2, Gemma 3):
//! they differ only in the switches of `DecoderConfig` (norm placement, QK-norm, activation, RoPE layout,
//! sliding-window layers, embedding scale).
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

use super::batch::Batch;
use crate::error::{HearthError, Result};
use crate::ops::attention::{AttentionBackend, AttnParams, KvCache, StepAttention};
use crate::ops::gelu;
use crate::ops::linear::Linear;
use crate::ops::panels::Panels;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    GeluTanh,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs (2i, 2i+1): GGUF Llama/Mistral files, whose Q/K rows were permuted at conversion.
    Interleaved,
    /// Pairs (i, i + d/2): Gemma, Qwen2, and Hugging Face Llama checkpoints.
    Halves,
}

#[derive(Debug, Clone)]
pub struct DecoderConfig {
    pub arch: String,
    pub hidden: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub max_context: usize,
    pub rms_eps: f64,
    pub rope_base: f32,
    /// RoPE base of sliding-window layers (Gemma 3's local layers).
    pub rope_base_local: f32,
    pub rope_layout: RopeLayout,
    pub activation: Activation,
    pub embed_scale: Option<f32>,
    pub attn_scale: f32,
    pub sliding_window: Option<usize>,
    /// Layer `i` is a sliding-window layer when `i % pattern != pattern - 1`.
    pub sliding_pattern: Option<usize>,
    /// Activations and KV cache dtype.
    pub dtype: DType,
}

impl DecoderConfig {
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        match (self.sliding_window, self.sliding_pattern) {
            (Some(w), Some(p)) if layer % p != p - 1 => Some(w),
            (Some(w), None) => Some(w),
            _ => None,
        }
    }
}

/// A norm weight vector (RMSNorm over the last dimension).
#[derive(Debug, Clone)]
pub struct Norm {
    pub weight: Tensor,
    pub eps: f32,
}

impl Norm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(x, &self.weight, self.eps)?)
    }

    /// The residual stream after adding a block's output `a` to `x`, and its norm: on CUDA one
    /// kernel, elsewhere the add and then `forward`.
    pub fn add_forward(&self, x: &Tensor, a: &Tensor) -> Result<(Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda()
            && x.rank() == 2
            && crate::ops::cuda_norm::AddRmsNorm::fits(x.dim(1)?)
        {
            let op = crate::ops::cuda_norm::AddRmsNorm { eps: self.eps };
            let both = x
                .contiguous()?
                .apply_op3_no_bwd(&a.contiguous()?, &self.weight, &op)?;
            return Ok((both.get(0)?, both.get(1)?));
        }
        let sum = (x + a)?;
        let normed = self.forward(&sum)?;
        Ok((sum, normed))
    }
}

/// The Q, K and V projections: three matrices, or one with rows Q | K | V (one matmul; on CUDA its
/// output goes straight to the fused RoPE + KV-write kernel).
#[derive(Debug)]
pub enum QkvProj {
    Separate { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

/// The gate and up projections: two matrices, or one with rows gate | up.
#[derive(Debug)]
pub enum GateUpProj {
    Separate { gate: Linear, up: Linear },
    Fused(Linear),
}

#[derive(Debug)]
pub struct Layer {
    pub attn_norm: Norm,
    pub qkv: QkvProj,
    pub wo: Linear,
    pub q_norm: Option<Norm>,
    pub k_norm: Option<Norm>,
    pub post_attn_norm: Option<Norm>,
    pub ffn_norm: Norm,
    pub gate_up: GateUpProj,
    pub down: Linear,
    pub post_ffn_norm: Option<Norm>,
}

/// Token embeddings: kept quantized where the file has them so (Gemma's are 262k x 640).
#[derive(Debug)]
pub enum Embeddings {
    Quantized(Arc<QTensor>),
    /// The tied output projection's panels.
    Panels(Arc<Panels>),
    Dense(Tensor),
}

impl Embeddings {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Quantized(q) => q.embedding(ids)?,
            Self::Panels(p) => {
                let (rows, hidden) = p.dims();
                let ids = ids.flatten_all()?.to_vec1::<u32>()?;
                let mut out = vec![0f32; ids.len() * hidden];
                for (&id, row) in ids.iter().zip(out.chunks_exact_mut(hidden)) {
                    if id as usize >= rows {
                        return Err(HearthError::Internal(format!(
                            "token id {id} is out of range for {rows} embeddings"
                        )));
                    }
                    p.dequantize_row(id as usize, row);
                }
                Tensor::from_vec(out, (ids.len(), hidden), &Device::Cpu)?
            }
            Self::Dense(w) => w.embedding(ids)?,
        })
    }
}

/// Which rows of a step get logits.
pub enum LogitRows {
    None,
    /// Every row (a decode step: one token per sequence).
    All,
    Some(Tensor),
}

/// One forward's inputs on the device: the attention set-up (on CUDA, the batch description),
/// token ids, positions, and the rows that get logits.
pub struct StepInputs<'a> {
    attn: StepAttention<'a>,
    ids: Tensor,
    pos: Tensor,
    rows: LogitRows,
}

impl<'a> StepInputs<'a> {
    /// A decode step's inputs from a batch description a CUDA graph keeps in device memory; every
    /// one of its `n_tokens` rows gets logits. `batch` is the step's real (unpadded) batch.
    #[cfg(feature = "cuda")]
    pub fn graph(batch: &'a Batch, cuda: crate::ops::cuda_attention::CudaBatch) -> Result<Self> {
        Ok(Self {
            ids: cuda.ids()?,
            pos: cuda.positions()?,
            attn: StepAttention::over(batch, cuda),
            rows: LogitRows::All,
        })
    }
}

#[derive(Debug)]
pub struct Decoder {
    pub cfg: DecoderConfig,
    pub embed: Embeddings,
    pub layers: Vec<Layer>,
    pub final_norm: Norm,
    pub lm_head: Linear,
    /// (cos, sin) tables, (max_context, rope_dim / 2), for global and for local layers.
    rope_global: (Tensor, Tensor),
    rope_local: (Tensor, Tensor),
    pub device: Device,
}

fn rope_tables(
    base: f32,
    dim: usize,
    max_pos: usize,
    freq_factors: Option<&[f32]>,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let inv: Vec<f32> = (0..dim / 2)
        .map(|i| {
            let f = 1f32 / base.powf(2.0 * i as f32 / dim as f32);
            match freq_factors {
                Some(ff) => f / ff.get(i).copied().unwrap_or(1.0),
                None => f,
            }
        })
        .collect();
    let mut cos = Vec::with_capacity(max_pos * dim / 2);
    let mut sin = Vec::with_capacity(max_pos * dim / 2);
    for p in 0..max_pos {
        for &f in &inv {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    let cos = Tensor::from_vec(cos, (max_pos, dim / 2), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (max_pos, dim / 2), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

impl Decoder {
    /// The constants of the device-time cost model (see `engine::metering`), from the loaded
    /// weights.
    pub fn cost_model(&self) -> crate::engine::metering::CostModel {
        let per_token = self
            .layers
            .iter()
            .map(|l| {
                let qkv = match &l.qkv {
                    QkvProj::Separate { q, k, v } => q.weights() + k.weights() + v.weights(),
                    QkvProj::Fused(w) => w.weights(),
                };
                let gate_up = match &l.gate_up {
                    GateUpProj::Separate { gate, up } => gate.weights() + up.weights(),
                    GateUpProj::Fused(w) => w.weights(),
                };
                qkv + l.wo.weights() + gate_up + l.down.weights()
            })
            .sum();
        crate::engine::metering::CostModel {
            per_token,
            per_logits_row: self.lm_head.weights(),
            per_attended: 2 * (self.cfg.n_heads * self.cfg.head_dim) as u64,
            windows: (0..self.cfg.n_layers)
                .map(|i| self.cfg.layer_window(i))
                .collect(),
        }
    }

    pub fn new(
        cfg: DecoderConfig,
        embed: Embeddings,
        layers: Vec<Layer>,
        final_norm: Norm,
        lm_head: Linear,
        rope_freq_factors: Option<Vec<f32>>,
        device: &Device,
    ) -> Result<Self> {
        let ff = rope_freq_factors.as_deref();
        let rope_global = rope_tables(
            cfg.rope_base,
            cfg.head_dim,
            cfg.max_context,
            ff,
            cfg.dtype,
            device,
        )?;
        let rope_local = if cfg.sliding_window.is_some() && cfg.rope_base_local != cfg.rope_base {
            rope_tables(
                cfg.rope_base_local,
                cfg.head_dim,
                cfg.max_context,
                ff,
                cfg.dtype,
                device,
            )?
        } else {
            rope_global.clone()
        };
        Ok(Self {
            cfg,
            embed,
            layers,
            final_norm,
            lm_head,
            rope_global,
            rope_local,
            device: device.clone(),
        })
    }

    pub fn new_kv_cache(&self, num_blocks: usize, block_size: usize) -> Result<KvCache> {
        KvCache::new(
            self.cfg.n_layers,
            num_blocks,
            block_size,
            self.cfg.n_kv_heads,
            self.cfg.head_dim,
            self.cfg.dtype,
            &self.device,
        )
    }

    /// RoPE over x (tokens, heads, dim) with per-token cos/sin (tokens, dim/2).
    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        match self.cfg.rope_layout {
            // The (tokens, heads, dim) kernel: no transposed copies (two kernel launches fewer each).
            RopeLayout::Halves => {
                Ok(
                    candle_nn::rotary_emb::rope_thd(&x.contiguous()?.unsqueeze(0)?, cos, sin)?
                        .squeeze(0)?,
                )
            }
            RopeLayout::Interleaved => {
                let x = x.transpose(0, 1)?.unsqueeze(0)?.contiguous()?; // (1, heads, tokens, dim)
                let y = candle_nn::rotary_emb::rope_i(&x, cos, sin)?;
                Ok(y.squeeze(0)?.transpose(0, 1)?.contiguous()?)
            }
        }
    }

    /// Q, K, V as (tokens, heads, head_dim) each.
    fn project_qkv(&self, p: &QkvProj, h: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let cfg = &self.cfg;
        let n = h.dim(0)?;
        let (qd, kd) = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim);
        let (q, k, v) = match p {
            QkvProj::Separate { q, k, v } => (q.forward(h)?, k.forward(h)?, v.forward(h)?),
            QkvProj::Fused(w) => {
                let y = w.forward(h)?;
                (
                    y.narrow(1, 0, qd)?,
                    y.narrow(1, qd, kd)?,
                    y.narrow(1, qd + kd, kd)?,
                )
            }
        };
        Ok((
            q.reshape((n, cfg.n_heads, cfg.head_dim))?,
            k.reshape((n, cfg.n_kv_heads, cfg.head_dim))?,
            v.reshape((n, cfg.n_kv_heads, cfg.head_dim))?,
        ))
    }

    /// act(gate(h)) * up(h).
    fn gated(&self, p: &GateUpProj, h: &Tensor) -> Result<Tensor> {
        let act_mul = |g: &Tensor, u: &Tensor| -> Result<Tensor> {
            Ok(match self.cfg.activation {
                Activation::Silu => (candle_nn::ops::silu(g)? * u)?,
                Activation::GeluTanh if g.device().is_cpu() => gelu::gelu_mul(g, u)?,
                Activation::GeluTanh => (g.gelu()? * u)?,
            })
        };
        match p {
            GateUpProj::Separate { gate, up } => act_mul(&gate.forward(h)?, &up.forward(h)?),
            GateUpProj::Fused(w) => {
                let y = w.forward(h)?;
                #[cfg(feature = "cuda")]
                if y.device().is_cuda() && self.cfg.activation == Activation::Silu {
                    return Ok(y.apply_op1_no_bwd(&crate::ops::cuda_activation::SiluMul)?);
                }
                let inner = y.dim(1)? / 2;
                act_mul(&y.narrow(1, 0, inner)?, &y.narrow(1, inner, inner)?)
            }
        }
    }

    /// One forward over a ragged batch. K/V of every token are written to `kv`; returns the logits
    /// (rows of `batch.logit_rows()`, vocab) as f32.
    pub fn forward(
        &self,
        batch: &Batch,
        kv: &KvCache,
        backend: AttentionBackend,
    ) -> Result<Tensor> {
        let inputs = self.inputs(batch, backend)?;
        self.forward_inputs(&inputs, kv)
    }

    /// A batch's inputs on the device, after checking it.
    pub fn inputs<'a>(
        &self,
        batch: &'a Batch,
        backend: AttentionBackend,
    ) -> Result<StepInputs<'a>> {
        let n = batch.num_tokens();
        if n == 0 {
            return Err(HearthError::InvalidRequest("empty batch".into()));
        }
        if let Some(&p) = batch.positions.iter().max() {
            if p as usize >= self.cfg.max_context {
                return Err(HearthError::ContextLength {
                    prompt: p as usize + 1,
                    context: self.cfg.max_context,
                });
            }
        }
        let attn = StepAttention::new(backend, batch, &self.device)?;
        let (ids, pos) = attn.ids_and_positions(&self.device)?;
        let wanted = batch.logit_rows();
        let rows = if wanted.is_empty() {
            LogitRows::None
        } else if wanted.len() == n && wanted.iter().enumerate().all(|(i, &r)| r as usize == i) {
            LogitRows::All
        } else {
            LogitRows::Some(Tensor::new(wanted.as_slice(), &self.device)?)
        };
        Ok(StepInputs {
            attn,
            ids,
            pos,
            rows,
        })
    }

    /// The forward over inputs already on the device: device work only (no host copies), so a
    /// CUDA graph can capture it.
    pub fn forward_inputs(&self, inputs: &StepInputs<'_>, kv: &KvCache) -> Result<Tensor> {
        let cfg = &self.cfg;
        let dev = &self.device;
        let (ids, pos, attn) = (&inputs.ids, &inputs.pos, &inputs.attn);
        let n = ids.dim(0)?;
        let cos_g = self.rope_global.0.index_select(pos, 0)?;
        let sin_g = self.rope_global.1.index_select(pos, 0)?;
        let (cos_l, sin_l) = if cfg.sliding_window.is_some() {
            (
                self.rope_local.0.index_select(pos, 0)?,
                self.rope_local.1.index_select(pos, 0)?,
            )
        } else {
            (cos_g.clone(), sin_g.clone())
        };

        let fused_rope = attn.fuses_rope() && cfg.rope_layout == RopeLayout::Halves;
        // Decode steps only: their op mix is what a profile is for.
        let mut prof = match inputs.rows {
            LogitRows::All => crate::device::OpProfile::start(dev),
            _ => None,
        };
        let mut mark = |name: &'static str| {
            if let Some(p) = prof.as_mut() {
                p.mark(name);
            }
        };
        mark("rope tables");
        let mut x = self.embed.forward(ids)?.to_dtype(cfg.dtype)?;
        if let Some(s) = cfg.embed_scale {
            x = (x * s as f64)?;
        }
        mark("embedding");
        // The last block's output, added to the stream together with the next norm.
        let mut pending: Option<Tensor> = None;
        for (li, layer) in self.layers.iter().enumerate() {
            let window = cfg.layer_window(li);
            let h = match pending.take() {
                Some(f) => {
                    let (sum, h) = layer.attn_norm.add_forward(&x, &f)?;
                    x = sum;
                    h
                }
                None => layer.attn_norm.forward(&x)?,
            };
            mark("add + attn norm");
            let (cos, sin) = if window.is_some() {
                (&cos_l, &sin_l)
            } else {
                (&cos_g, &sin_g)
            };
            let params = AttnParams {
                n_heads: cfg.n_heads,
                n_kv_heads: cfg.n_kv_heads,
                head_dim: cfg.head_dim,
                scale: cfg.attn_scale,
                window,
            };
            let q = match &layer.qkv {
                QkvProj::Fused(w)
                    if fused_rope && layer.q_norm.is_none() && layer.k_norm.is_none() =>
                {
                    let qkv = w.forward(&h)?;
                    mark("qkv matmul");
                    attn.rope_write_qkv(&qkv, cos, sin, &kv.k[li], &kv.v[li], &params)?
                }
                _ => {
                    let (q, k, v) = self.project_qkv(&layer.qkv, &h)?;
                    let q = match &layer.q_norm {
                        Some(nm) => nm.forward(&q)?,
                        None => q,
                    };
                    let k = match &layer.k_norm {
                        Some(nm) => nm.forward(&k)?,
                        None => k,
                    };
                    let q = self.rope(&q, cos, sin)?;
                    let k = self.rope(&k, cos, sin)?;
                    attn.write(&kv.k[li], &k)?;
                    attn.write(&kv.v[li], &v)?;
                    q
                }
            };
            mark("rope + kv write");
            let a = attn.attend(&q, &kv.k[li], &kv.v[li], &params)?;
            mark("attention");
            let a = layer
                .wo
                .forward(&a.reshape((n, cfg.n_heads * cfg.head_dim))?)?;
            mark("o matmul");
            let a = match &layer.post_attn_norm {
                Some(nm) => nm.forward(&a)?,
                None => a,
            };
            let (sum, h) = layer.ffn_norm.add_forward(&x, &a)?;
            x = sum;
            mark("add + ffn norm");
            let g = self.gated(&layer.gate_up, &h)?;
            mark("gate|up matmul + act");
            let f = layer.down.forward(&g)?;
            mark("down matmul");
            pending = Some(match &layer.post_ffn_norm {
                Some(nm) => nm.forward(&f)?,
                None => f,
            });
        }
        let x = match (&inputs.rows, pending) {
            (LogitRows::None, _) => return Ok(Tensor::zeros((0, cfg.vocab), DType::F32, dev)?),
            (LogitRows::All, Some(f)) => self.final_norm.add_forward(&x, &f)?.1,
            (LogitRows::All, None) => self.final_norm.forward(&x)?,
            (LogitRows::Some(rows), pending) => {
                let x = match pending {
                    Some(f) => (x + f)?,
                    None => x,
                };
                self.final_norm.forward(&x.index_select(rows, 0)?)?
            }
        };
        mark("final norm");
        let logits = self.lm_head.forward(&x)?;
        mark("lm head");
        let logits = logits.to_dtype(DType::F32)?;
        mark("logits to f32");
        if let Some(p) = prof {
            p.finish();
        }
        Ok(logits)
    }
}
