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
        let cfg = &self.cfg;
        let n = batch.num_tokens();
        if n == 0 {
            return Err(HearthError::InvalidRequest("empty batch".into()));
        }
        if let Some(&p) = batch.positions.iter().max() {
            if p as usize >= cfg.max_context {
                return Err(HearthError::ContextLength {
                    prompt: p as usize + 1,
                    context: cfg.max_context,
                });
            }
        }
        let dev = &self.device;
        let ids = Tensor::new(batch.tokens.as_slice(), dev)?;
        let pos = Tensor::new(batch.positions.as_slice(), dev)?;
        let cos_g = self.rope_global.0.index_select(&pos, 0)?;
        let sin_g = self.rope_global.1.index_select(&pos, 0)?;
        let (cos_l, sin_l) = if cfg.sliding_window.is_some() {
            (
                self.rope_local.0.index_select(&pos, 0)?,
                self.rope_local.1.index_select(&pos, 0)?,
            )
        } else {
            (cos_g.clone(), sin_g.clone())
        };

        let attn = StepAttention::new(backend, batch, dev)?;
        let fused_rope = attn.fuses_rope() && cfg.rope_layout == RopeLayout::Halves;
        let mut x = self.embed.forward(&ids)?.to_dtype(cfg.dtype)?;
        if let Some(s) = cfg.embed_scale {
            x = (x * s as f64)?;
        }
        for (li, layer) in self.layers.iter().enumerate() {
            let window = cfg.layer_window(li);
            let h = layer.attn_norm.forward(&x)?;
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
                    attn.rope_write_qkv(&w.forward(&h)?, cos, sin, &kv.k[li], &kv.v[li], &params)?
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
            let a = attn.attend(&q, &kv.k[li], &kv.v[li], &params)?;
            let a = layer
                .wo
                .forward(&a.reshape((n, cfg.n_heads * cfg.head_dim))?)?;
            let a = match &layer.post_attn_norm {
                Some(nm) => nm.forward(&a)?,
                None => a,
            };
            x = (x + a)?;

            let h = layer.ffn_norm.forward(&x)?;
            let f = layer.down.forward(&self.gated(&layer.gate_up, &h)?)?;
            let f = match &layer.post_ffn_norm {
                Some(nm) => nm.forward(&f)?,
                None => f,
            };
            x = (x + f)?;
        }
        let rows = batch.logit_rows();
        if rows.is_empty() {
            return Ok(Tensor::zeros((0, cfg.vocab), DType::F32, dev)?);
        }
        let rows = Tensor::new(rows.as_slice(), dev)?;
        let x = x.index_select(&rows, 0)?;
        let x = self.final_norm.forward(&x)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }
}
