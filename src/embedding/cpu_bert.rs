//! The BERT encoder on the CPU. candle-transformers' `BertModel` (the portable path on every
//! device, and this one's reference in the tests) runs about 25 candle ops per layer, each on its
//! own threads or none: a 20-token input, the semantic cache's usual lookup, spent a third of its
//! time outside the matrix multiplies and gained 12% from a second core. Here a batch's inputs are
//! packed without padding (a token's projections do not depend on the others, and attention runs
//! per input over its own tokens, which is what the padding mask computes), Q, K and V are one
//! projection, and the work is split over the pool by output columns and by (input, head).
//!
//! Every output element's sum runs in one order whatever the batch and the thread count: gemm (the
//! crate candle's CPU matmul uses) is called per fixed column chunk with at most `KC` terms, which
//! it sums in one pass, and never on one row (gemm's one-row path adds in another order). So an
//! input gets the same vector alone or batched.
use std::collections::HashMap;

use candle_core::{DType, Tensor};
use candle_transformers::models::bert::{Config, HiddenAct, PositionEmbeddingType};

use crate::error::Result;
use crate::ops::gelu::gelu_erf;
use crate::ops::threads::{pool, OutPtr};
use crate::ops::vexp;

/// Output columns of one gemm call (one pool task).
const NC: usize = 64;
/// Terms of one gemm call's sums: gemm sums up to 512 in one pass (more, and the split depends on
/// the CPU's cache sizes).
const KC: usize = 512;

/// A linear projection: y = x W^T + b.
struct Dense {
    /// W^T, (k, n) row-major: a chunk of output columns is a strided view of it.
    wt: Vec<f32>,
    bias: Vec<f32>,
    k: usize,
    n: usize,
}

impl Dense {
    /// Projections stacked along their outputs (Q, K and V as one), from PyTorch's (n, k) weights;
    /// an error unless the result is (k, n) (the unchecked multiplies below rely on it).
    fn stacked(parts: &[(&Tensor, &Tensor)], k: usize, n: usize) -> Result<Self> {
        let w = Tensor::cat(&parts.iter().map(|p| p.0).collect::<Vec<_>>(), 0)?;
        let b = Tensor::cat(&parts.iter().map(|p| p.1).collect::<Vec<_>>(), 0)?;
        if w.dims() != [n, k] || b.dims() != [n] {
            return Err(misfit(format!(
                "a projection is {:?} with bias {:?}, not ({n}, {k}) and ({n})",
                w.dims(),
                b.dims()
            )));
        }
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
        // The unsafe calls below read and write within these bounds only; one row would take
        // gemm's other path (`mean_states` pads to two).
        assert!(m >= 2 && x.len() == m * k && out.len() == m * n);
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
    fn load(t: &Weights, prefix: &str, h: usize, eps: f64) -> Result<Self> {
        let (w, b) = (
            t.vec(&format!("{prefix}.weight"))?,
            t.vec(&format!("{prefix}.bias"))?,
        );
        if w.len() != h || b.len() != h {
            return Err(misfit(format!("`{prefix}` is not of size {h}")));
        }
        Ok(Self {
            w,
            b,
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
        self.tensors
            .get(&full)
            .ok_or_else(|| misfit(format!("there is no `{full}`")))
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
    intermediate: usize,
    heads: usize,
}

impl CpuBert {
    /// None for a configuration or a weight layout this path does not compute as `BertModel`
    /// does (another activation or position embedding, other tensor names): the portable path
    /// serves those.
    pub fn load(
        tensors: &HashMap<String, Tensor>,
        cfg: &Config,
        max_tokens: usize,
    ) -> Result<Option<Self>> {
        let (h, ff) = (cfg.hidden_size, cfg.intermediate_size);
        let supported = cfg.hidden_act == HiddenAct::Gelu
            && cfg.position_embedding_type == PositionEmbeddingType::Absolute
            && h > 0
            && ff > 0
            && cfg.num_attention_heads > 0
            && h.is_multiple_of(cfg.num_attention_heads)
            && max_tokens <= cfg.max_position_embeddings;
        let prefix = ["", "bert."]
            .into_iter()
            .find(|p| tensors.contains_key(&format!("{p}embeddings.word_embeddings.weight")));
        let Some(prefix) = prefix.filter(|_| supported) else {
            return Ok(None);
        };
        let t = Weights { tensors, prefix };
        let segment = t.vec("embeddings.token_type_embeddings.weight")?;
        let mut words = t.vec("embeddings.word_embeddings.weight")?;
        let positions = t.vec("embeddings.position_embeddings.weight")?;
        if segment.len() < h
            || words.len() != cfg.vocab_size * h
            || positions.len() < max_tokens * h
        {
            return Err(misfit("the embeddings do not match the config".into()));
        }
        for row in words.chunks_exact_mut(h) {
            for (v, s) in row.iter_mut().zip(&segment[..h]) {
                *v += s;
            }
        }
        let eps = cfg.layer_norm_eps;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                let pair = |name: &str| -> Result<(&Tensor, &Tensor)> {
                    Ok((
                        t.get(&format!("{p}.{name}.weight"))?,
                        t.get(&format!("{p}.{name}.bias"))?,
                    ))
                };
                let qkv = [
                    pair("attention.self.query")?,
                    pair("attention.self.key")?,
                    pair("attention.self.value")?,
                ];
                Ok(Layer {
                    qkv: Dense::stacked(&qkv, h, 3 * h)?,
                    out: Dense::stacked(&[pair("attention.output.dense")?], h, h)?,
                    attn_norm: LayerNorm::load(
                        &t,
                        &format!("{p}.attention.output.LayerNorm"),
                        h,
                        eps,
                    )?,
                    up: Dense::stacked(&[pair("intermediate.dense")?], h, ff)?,
                    down: Dense::stacked(&[pair("output.dense")?], ff, h)?,
                    norm: LayerNorm::load(&t, &format!("{p}.output.LayerNorm"), h, eps)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Self {
            words,
            positions,
            norm: LayerNorm::load(&t, "embeddings.LayerNorm", h, eps)?,
            layers,
            hidden: h,
            intermediate: ff,
            heads: cfg.num_attention_heads,
        }))
    }

    /// The mean of each input's last hidden states (ids checked by the caller: in the
    /// vocabulary, at most `max_tokens`).
    pub fn mean_states(&self, inputs: &[Vec<u32>]) -> Vec<Vec<f32>> {
        let h = self.hidden;
        let mut spans = Vec::with_capacity(inputs.len());
        let mut x = Vec::with_capacity(inputs.iter().map(Vec::len).sum::<usize>().max(2) * h);
        for input in inputs {
            spans.push((x.len() / h, input.len()));
            for (p, &id) in input.iter().enumerate() {
                let word = &self.words[id as usize * h..][..h];
                let pos = &self.positions[p * h..][..h];
                x.extend(word.iter().zip(pos).map(|(w, p)| w + p));
            }
        }
        if x.is_empty() {
            return vec![vec![0f32; h]; inputs.len()];
        }
        // At least two rows: gemm adds a single row's products in another order (a one-token
        // input would get other bits alone than batched). The pad row is in no input's span.
        x.resize(x.len().max(2 * h), 0.0);
        let m = x.len() / h;
        self.norm.forward(&mut x);
        let mut qkv = vec![0f32; m * 3 * h];
        let mut ctx = vec![0f32; m * h];
        let mut attn = vec![0f32; m * h];
        let mut mid = vec![0f32; m * self.intermediate];
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
                sum.iter().map(|s| s / t.max(1) as f32).collect()
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

/// A weight file that does not fit the config.
fn misfit(why: String) -> crate::error::HearthError {
    crate::error::HearthError::Config(format!("BERT weights: {why}"))
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
