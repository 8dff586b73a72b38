//! The BERT encoder on the CPU. candle-transformers' `BertModel` (the portable path on every
//! device, and this one's reference in the tests) runs about 25 candle ops per layer, each on its
//! own threads or none: a 20-token input, the semantic cache's usual lookup, spent a third of its
//! time outside the matrix multiplies and gained 12% from a second core. Here a batch's inputs are
//! packed without padding (a token's projections do not depend on the others, and attention runs
//! per input over its own tokens, which is what the padding mask computes), Q, K and V are one
//! projection, and the work is split over the pool by output columns and by (input, head).
//!
//! Every output element's sum runs in one order whatever the batch, the thread count or the CPU's
//! cache sizes: gemm (the crate candle's CPU matmul uses) is called per fixed column chunk with at
//! most `KC` terms, which it sums in one pass. So an input gets the same vector alone or batched.
use std::collections::HashMap;

use candle_core::{DType, Tensor};
use candle_transformers::models::bert::{Config, HiddenAct, PositionEmbeddingType};

use crate::error::Result;
use crate::ops::gelu::gelu_erf_slices;
use crate::ops::threads::{pool, OutPtr};
use crate::ops::vexp;

/// Output columns of one gemm call (one pool task).
const NC: usize = 64;
/// Terms of one gemm call's sums: gemm sums up to 512 in one pass (more, and the split depends on
/// the CPU's cache sizes).
const KC: usize = 512;
/// Elements of one pool task of the activation.
const ACT_CHUNK: usize = 8192;

/// A linear projection: y = x W^T + b.
struct Dense {
    /// W^T, (k, n) row-major: a chunk of output columns is a strided view of it.
    wt: Vec<f32>,
    bias: Vec<f32>,
    k: usize,
    n: usize,
}

impl Dense {
    /// Projections stacked along their outputs (Q, K and V as one), from PyTorch's (n, k) weights.
    fn stacked(parts: &[(&Tensor, &Tensor)]) -> Result<Self> {
        let w = Tensor::cat(&parts.iter().map(|p| p.0).collect::<Vec<_>>(), 0)?;
        let b = Tensor::cat(&parts.iter().map(|p| p.1).collect::<Vec<_>>(), 0)?;
        let (n, k) = w.dims2()?;
        let wt = w.to_dtype(DType::F32)?.t()?.contiguous()?.flatten_all()?;
        Ok(Self {
            wt: wt.to_vec1::<f32>()?,
            bias: b.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            k,
            n,
        })
    }

    /// out (m, n) = x (m, k) W^T + b.
    fn forward(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let (k, n) = (self.k, self.n);
        debug_assert!(x.len() == m * k && out.len() == m * n);
        for row in out.chunks_exact_mut(n) {
            row.copy_from_slice(&self.bias);
        }
        let dst = OutPtr::new(out);
        pool().execute_chunked(n.div_ceil(NC), |chunks| {
            for c in chunks {
                let (col, width) = (c * NC, NC.min(n - c * NC));
                for k0 in (0..k).step_by(KC) {
                    // SAFETY: this task alone writes columns col..col + width of `out` (rows
                    // m, stride n), inside it; x is (m, k) and wt (k, n), both read in bounds:
                    // rows k0..k0 + KC.min(k - k0), columns col..col + width.
                    unsafe {
                        gemm::gemm(
                            m,
                            width,
                            KC.min(k - k0),
                            dst.at(col),
                            1,
                            n as isize,
                            true,
                            x.as_ptr().add(k0),
                            1,
                            k as isize,
                            self.wt.as_ptr().add(k0 * n + col),
                            1,
                            n as isize,
                            1.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                }
            }
        });
    }
}

struct LayerNorm {
    w: Vec<f32>,
    b: Vec<f32>,
    eps: f32,
}

impl LayerNorm {
    fn load(t: &Weights, prefix: &str, eps: f64) -> Result<Self> {
        Ok(Self {
            w: t.vec(&format!("{prefix}.weight"))?,
            b: t.vec(&format!("{prefix}.bias"))?,
            eps: eps as f32,
        })
    }

    /// Each row of x normalized, in place.
    fn forward(&self, x: &mut [f32]) {
        let h = self.w.len() as f32;
        for row in x.chunks_exact_mut(self.w.len()) {
            let mean = row.iter().sum::<f32>() / h;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h;
            let inv = 1.0 / (var + self.eps).sqrt();
            for ((v, w), b) in row.iter_mut().zip(&self.w).zip(&self.b) {
                *v = (*v - mean) * inv * w + b;
            }
        }
    }
}

struct Layer {
    qkv: Dense,
    out: Dense,
    attn_norm: LayerNorm,
    up: Dense,
    down: Dense,
    norm: LayerNorm,
}

/// The model's tensors by name, with or without a `bert.` prefix.
struct Weights<'a> {
    tensors: &'a HashMap<String, Tensor>,
    prefix: &'static str,
}

impl Weights<'_> {
    fn get(&self, name: &str) -> Result<&Tensor> {
        let full = format!("{}{name}", self.prefix);
        self.tensors.get(&full).ok_or_else(|| {
            crate::error::HearthError::Config(format!("the BERT weights have no `{full}`"))
        })
    }

    fn vec(&self, name: &str) -> Result<Vec<f32>> {
        Ok(self
            .get(name)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }
}

pub struct CpuBert {
    /// (vocab, h) token embeddings, with the token-type-0 embedding added (every input is one
    /// segment).
    words: Vec<f32>,
    /// (positions, h).
    positions: Vec<f32>,
    norm: LayerNorm,
    layers: Vec<Layer>,
    hidden: usize,
    heads: usize,
}

impl CpuBert {
    /// None for a configuration this path does not compute as `BertModel` does (another
    /// activation or position embedding): the portable path serves those.
    pub fn load(
        tensors: &HashMap<String, Tensor>,
        cfg: &Config,
        max_tokens: usize,
    ) -> Result<Option<Self>> {
        let supported = cfg.hidden_act == HiddenAct::Gelu
            && cfg.position_embedding_type == PositionEmbeddingType::Absolute
            && cfg.num_attention_heads > 0
            && cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
            && max_tokens <= cfg.max_position_embeddings;
        if !supported {
            return Ok(None);
        }
        let prefix = if tensors.contains_key("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let t = Weights { tensors, prefix };
        let h = cfg.hidden_size;
        let segment = t.vec("embeddings.token_type_embeddings.weight")?;
        let mut words = t.vec("embeddings.word_embeddings.weight")?;
        if segment.len() < h || words.len() != cfg.vocab_size * h {
            return Err(crate::error::HearthError::Config(
                "the BERT embeddings do not match its config".into(),
            ));
        }
        for row in words.chunks_exact_mut(h) {
            for (v, s) in row.iter_mut().zip(&segment[..h]) {
                *v += s;
            }
        }
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                let pair = |name: &str| -> Result<(&Tensor, &Tensor)> {
                    Ok((
                        t.get(&format!("{p}.{name}.weight"))?,
                        t.get(&format!("{p}.{name}.bias"))?,
                    ))
                };
                Ok(Layer {
                    qkv: Dense::stacked(&[
                        pair("attention.self.query")?,
                        pair("attention.self.key")?,
                        pair("attention.self.value")?,
                    ])?,
                    out: Dense::stacked(&[pair("attention.output.dense")?])?,
                    attn_norm: LayerNorm::load(
                        &t,
                        &format!("{p}.attention.output.LayerNorm"),
                        cfg.layer_norm_eps,
                    )?,
                    up: Dense::stacked(&[pair("intermediate.dense")?])?,
                    down: Dense::stacked(&[pair("output.dense")?])?,
                    norm: LayerNorm::load(
                        &t,
                        &format!("{p}.output.LayerNorm"),
                        cfg.layer_norm_eps,
                    )?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Self {
            words,
            positions: t.vec("embeddings.position_embeddings.weight")?,
            norm: LayerNorm::load(&t, "embeddings.LayerNorm", cfg.layer_norm_eps)?,
            layers,
            hidden: h,
            heads: cfg.num_attention_heads,
        }))
    }

    /// The mean of each input's last hidden states (ids checked by the caller: in the
    /// vocabulary, at most `max_tokens`, none empty).
    pub fn mean_states(&self, inputs: &[Vec<u32>]) -> Vec<Vec<f32>> {
        let h = self.hidden;
        let mut spans = Vec::with_capacity(inputs.len());
        let mut x = Vec::with_capacity(inputs.iter().map(Vec::len).sum::<usize>() * h);
        for input in inputs {
            spans.push((x.len() / h, input.len()));
            for (p, &id) in input.iter().enumerate() {
                let word = &self.words[id as usize * h..][..h];
                let pos = &self.positions[p * h..][..h];
                x.extend(word.iter().zip(pos).map(|(w, p)| w + p));
            }
        }
        let m = x.len() / h;
        self.norm.forward(&mut x);
        let mut qkv = vec![0f32; m * 3 * h];
        let mut ctx = vec![0f32; m * h];
        let mut attn = vec![0f32; m * h];
        let ff = self.layers.first().map_or(0, |l| l.up.n);
        let mut mid = vec![0f32; m * ff];
        for layer in &self.layers {
            layer.qkv.forward(&x, m, &mut qkv);
            self.attention(&qkv, &spans, &mut ctx);
            layer.out.forward(&ctx, m, &mut attn);
            add(&mut attn, &x);
            layer.attn_norm.forward(&mut attn);
            layer.up.forward(&attn, m, &mut mid);
            gelu_erf(&mut mid);
            layer.down.forward(&mid, m, &mut x);
            add(&mut x, &attn);
            layer.norm.forward(&mut x);
        }
        spans
            .iter()
            .map(|&(r0, t)| {
                let mut sum = vec![0f32; h];
                for row in x[r0 * h..(r0 + t) * h].chunks_exact(h) {
                    add(&mut sum, row);
                }
                sum.iter().map(|s| s / t as f32).collect()
            })
            .collect()
    }

    /// Scaled dot-product attention of each input over its own tokens, one pool task per
    /// (input, head): ctx = softmax(Q K^T / sqrt(d)) V.
    fn attention(&self, qkv: &[f32], spans: &[(usize, usize)], ctx: &mut [f32]) {
        let (h, heads) = (self.hidden, self.heads);
        let d = h / heads;
        let scale = (1.0 / (d as f64).sqrt()) as f32;
        let dst = OutPtr::new(ctx);
        pool().execute_chunked(spans.len() * heads, |tasks| {
            let (mut scores, mut probs) = (Vec::new(), Vec::new());
            for task in tasks {
                let (r0, t) = spans[task / heads];
                let head = task % heads;
                scores.resize(t * t, 0f32);
                probs.resize(t * t, 0f32);
                let q = &qkv[r0 * 3 * h + head * d..];
                let (k, v) = (&q[h..], &q[2 * h..]);
                // SAFETY: Q, K and V of this input and head are t rows of d at stride 3h inside
                // qkv; scores is (t, t); K^T is K read with swapped strides.
                unsafe {
                    gemm::gemm(
                        t,
                        t,
                        d,
                        scores.as_mut_ptr(),
                        1,
                        t as isize,
                        false,
                        q.as_ptr(),
                        1,
                        3 * h as isize,
                        k.as_ptr(),
                        3 * h as isize,
                        1,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                for (s, p) in scores.chunks_exact(t).zip(probs.chunks_exact_mut(t)) {
                    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let sum = vexp::exp_sum(s, max, Some(p));
                    for v in p.iter_mut() {
                        *v /= sum;
                    }
                }
                // SAFETY: this task alone writes rows r0..r0 + t, columns head*d..(head+1)*d of
                // ctx (m, h); probs is (t, t) and V t rows of d at stride 3h inside qkv.
                unsafe {
                    gemm::gemm(
                        t,
                        d,
                        t,
                        dst.at(r0 * h + head * d),
                        1,
                        h as isize,
                        false,
                        probs.as_ptr(),
                        1,
                        t as isize,
                        v.as_ptr(),
                        1,
                        3 * h as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            }
        });
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// BERT's activation in place, on the pool.
fn gelu_erf(x: &mut [f32]) {
    let len = x.len();
    let dst = OutPtr::new(x);
    pool().execute_chunked(len.div_ceil(ACT_CHUNK), |chunks| {
        let start = chunks.start * ACT_CHUNK;
        let end = (chunks.end * ACT_CHUNK).min(len);
        // SAFETY: each task owns elements start..end (disjoint chunk ranges), inside x.
        gelu_erf_slices(unsafe { dst.slice(start, end - start) });
    });
}
