//! The paged-attention op: new K/V are written into the block-paged cache by slot mapping, and each
//! query attends to its own sequence's cached positions (causal, optionally within a sliding window).
//! One op, three backends: a portable one from candle ops (any device, the reference), a fast CPU one,
//! and CUDA kernels (kernels/paged_attention.cu).
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor};

use super::threads::{pool, OutPtr};
pub use super::AttnParams;
use crate::error::{HearthError, Result};
use crate::model::batch::{Batch, SeqChunk};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionBackend {
    /// Built from candle ops; runs on every device.
    Portable,
    /// Hand-written f32 loops over the cache's memory, parallel over (token, head).
    Cpu,
    /// CUDA kernels for the cache write and the attention (the `cuda` feature).
    Cuda,
}

impl AttentionBackend {
    /// The fastest backend for `device` and cache dtype.
    pub fn best_for(device: &Device, dtype: DType) -> Self {
        if device.is_cuda() {
            Self::Cuda
        } else if device.is_cpu() && dtype == DType::F32 {
            Self::Cpu
        } else {
            Self::Portable
        }
    }

    /// `portable`, `cpu` or `cuda` (the `HEARTH_ATTENTION` override and `--attention`).
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "portable" => Ok(Self::Portable),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            other => Err(HearthError::InvalidRequest(format!(
                "unknown attention backend `{other}` (portable, cpu, cuda)"
            ))),
        }
    }
}

/// One step's attention, set up once per forward and used by every layer: on CUDA it holds the
/// batch description in device memory.
pub struct StepAttention<'a> {
    backend: AttentionBackend,
    batch: &'a Batch,
    #[cfg(feature = "cuda")]
    cuda: Option<super::cuda_attention::CudaBatch>,
}

impl<'a> StepAttention<'a> {
    /// The CUDA backend over a batch description already in device memory (a graph's inputs).
    #[cfg(feature = "cuda")]
    pub fn over(batch: &'a Batch, cuda: super::cuda_attention::CudaBatch) -> Self {
        Self {
            backend: AttentionBackend::Cuda,
            batch,
            cuda: Some(cuda),
        }
    }

    /// The step's token ids and positions as tensors on `device`: on CUDA, views of the batch
    /// description's one upload.
    pub fn ids_and_positions(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if let Some(b) = &self.cuda {
            return Ok((b.ids()?, b.positions()?));
        }
        Ok((
            Tensor::new(self.batch.tokens.as_slice(), device)?,
            Tensor::new(self.batch.positions.as_slice(), device)?,
        ))
    }

    pub fn new(backend: AttentionBackend, batch: &'a Batch, device: &Device) -> Result<Self> {
        #[cfg(feature = "cuda")]
        let cuda = match (backend, device) {
            (AttentionBackend::Cuda, Device::Cuda(d)) => {
                Some(super::cuda_attention::CudaBatch::upload(d, batch)?)
            }
            _ => None,
        };
        let usable = match backend {
            AttentionBackend::Portable => true,
            AttentionBackend::Cpu => device.is_cpu(),
            AttentionBackend::Cuda => device.is_cuda(),
        };
        if !usable {
            return Err(HearthError::InvalidRequest(format!(
                "the {backend:?} attention backend cannot run on {device:?}"
            )));
        }
        Ok(Self {
            backend,
            batch,
            #[cfg(feature = "cuda")]
            cuda,
        })
    }

    /// Write this step's K or V rows (tokens, kv_heads, head_dim) into a layer's cache.
    pub fn write(&self, cache: &Tensor, new: &Tensor) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(b) = &self.cuda {
            let op = super::cuda_attention::WriteKv { batch: b };
            cache.inplace_op2(&new.contiguous()?, &op)?;
            return Ok(());
        }
        write_kv(cache, new, &self.batch.slot_mapping)
    }

    /// Whether `rope_write_qkv` is available (the CUDA backend).
    pub fn fuses_rope(&self) -> bool {
        #[cfg(feature = "cuda")]
        if self.cuda.is_some() {
            return true;
        }
        false
    }

    /// From a fused Q|K|V projection (tokens, (heads + 2 kv_heads) * head_dim): RoPE (halves layout)
    /// on Q and K with per-token `cos`/`sin` (tokens, head_dim / 2), K and V into the layer's caches;
    /// returns the rotated Q (tokens, heads, head_dim). Only where `fuses_rope`.
    pub fn rope_write_qkv(
        &self,
        qkv: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        p: &AttnParams,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(b) = &self.cuda {
            let op = super::cuda_attention::RopeWriteQkv {
                batch: b,
                k_cache,
                v_cache,
                n_heads: p.n_heads,
                n_kv_heads: p.n_kv_heads,
                head_dim: p.head_dim,
            };
            return Ok(qkv.contiguous()?.apply_op3_no_bwd(
                &cos.contiguous()?,
                &sin.contiguous()?,
                &op,
            )?);
        }
        let _ = (qkv, cos, sin, k_cache, v_cache, p);
        Err(HearthError::InvalidRequest(
            "fused RoPE + KV write needs the CUDA attention backend".into(),
        ))
    }

    /// Attention of `q` (tokens, heads, head_dim) over a layer's caches.
    pub fn attend(
        &self,
        q: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        p: &AttnParams,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(b) = &self.cuda {
            let op = super::cuda_attention::Attend {
                batch: b,
                params: *p,
            };
            return Ok(q.contiguous()?.apply_op3_no_bwd(k_cache, v_cache, &op)?);
        }
        paged_attention(self.backend, q, k_cache, v_cache, self.batch, p)
    }
}

/// The paged KV cache of one model: per layer, K and V of shape (slots, kv_heads, head_dim).
#[derive(Debug)]
pub struct KvCache {
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub block_size: usize,
    pub num_blocks: usize,
}

impl KvCache {
    pub fn new(
        n_layers: usize,
        num_blocks: usize,
        block_size: usize,
        n_kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = (num_blocks * block_size, n_kv_heads, head_dim);
        let mut k = Vec::with_capacity(n_layers);
        let mut v = Vec::with_capacity(n_layers);
        for _ in 0..n_layers {
            k.push(Tensor::zeros(shape, dtype, device)?);
            v.push(Tensor::zeros(shape, dtype, device)?);
        }
        Ok(Self {
            k,
            v,
            block_size,
            num_blocks,
        })
    }

    /// Copy the first `c.len` slots of block `c.src` into block `c.dst`, in every layer.
    pub fn copy_slots(&self, c: &crate::engine::block_pool::BlockCopy) -> Result<()> {
        let bs = self.block_size;
        for t in self.k.iter().chain(&self.v) {
            // Through a copy of just those slots (`copy` would clone the whole cache): the source and
            // the destination share the cache's storage.
            let part = t
                .narrow(0, c.src as usize * bs, c.len)?
                .force_contiguous()?;
            t.slice_set(&part, 0, c.dst as usize * bs)?;
        }
        Ok(())
    }

    /// Bytes one block takes over all layers (K and V).
    pub fn bytes_per_block(
        n_layers: usize,
        block_size: usize,
        n_kv_heads: usize,
        head_dim: usize,
        dtype: DType,
    ) -> usize {
        2 * n_layers * block_size * n_kv_heads * head_dim * dtype.size_in_bytes()
    }
}

/// Write this step's K/V rows (tokens, kv_heads, head_dim) into layer caches at `slot_mapping`.
/// Consecutive slots are written as one copy, so a chunk costs one copy per block it touches.
pub fn write_kv(cache: &Tensor, new: &Tensor, slot_mapping: &[u32]) -> Result<()> {
    let new = new.contiguous()?;
    let mut i = 0;
    while i < slot_mapping.len() {
        let mut j = i + 1;
        while j < slot_mapping.len() && slot_mapping[j] == slot_mapping[j - 1] + 1 {
            j += 1;
        }
        cache.slice_set(&new.narrow(0, i, j - i)?, 0, slot_mapping[i] as usize)?;
        i = j;
    }
    Ok(())
}

/// Attention of `q` (tokens, heads, head_dim) over the paged cache; returns (tokens, heads, head_dim).
/// The host-side backends; `StepAttention` adds the CUDA one.
pub fn paged_attention(
    backend: AttentionBackend,
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    batch: &Batch,
    p: &AttnParams,
) -> Result<Tensor> {
    match backend {
        AttentionBackend::Portable | AttentionBackend::Cuda => {
            portable(q, k_cache, v_cache, batch, p)
        }
        AttentionBackend::Cpu => {
            let op = CpuPagedAttention {
                seqs: &batch.seqs,
                block_size: batch.block_size,
                params: *p,
            };
            Ok(q.contiguous()?.apply_op3_no_bwd(k_cache, v_cache, &op)?)
        }
    }
}

/// First key position a query at `pos` may see.
fn first_key(pos: usize, window: Option<usize>) -> usize {
    match window {
        Some(w) => (pos + 1).saturating_sub(w),
        None => 0,
    }
}

fn slot(seq: &SeqChunk, block_size: usize, pos: usize) -> usize {
    seq.block_table[pos / block_size] as usize * block_size + pos % block_size
}

fn portable(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    batch: &Batch,
    p: &AttnParams,
) -> Result<Tensor> {
    let dev = q.device();
    let groups = p.n_heads / p.n_kv_heads;
    let mut outs = Vec::with_capacity(batch.seqs.len());
    for seq in &batch.seqs {
        let first_pos = seq.first_pos();
        let k0 = first_key(first_pos, p.window);
        let n_keys = seq.context_len - k0;
        let slots: Vec<u32> = (k0..seq.context_len)
            .map(|pos| slot(seq, batch.block_size, pos) as u32)
            .collect();
        let slots = Tensor::new(slots.as_slice(), dev)?;
        // (kv_heads, keys, dim)
        let k = k_cache
            .index_select(&slots, 0)?
            .transpose(0, 1)?
            .contiguous()?;
        let v = v_cache
            .index_select(&slots, 0)?
            .transpose(0, 1)?
            .contiguous()?;
        // (heads, len, dim) -> (kv_heads, groups * len, dim): query heads sharing a KV head side by side.
        let qs = q
            .narrow(0, seq.start, seq.len)?
            .transpose(0, 1)?
            .contiguous()?;
        let qs = qs.reshape((p.n_kv_heads, groups * seq.len, p.head_dim))?;
        let att = (qs.matmul(&k.t()?)? * p.scale as f64)?;
        let mask: Vec<f32> = (0..seq.len)
            .flat_map(|i| {
                let pos = first_pos + i;
                let lo = first_key(pos, p.window);
                (k0..seq.context_len).map(move |kp| {
                    if kp <= pos && kp >= lo {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (1, 1, seq.len, n_keys), dev)?.to_dtype(att.dtype())?;
        let att = att
            .reshape((p.n_kv_heads, groups, seq.len, n_keys))?
            .broadcast_add(&mask)?;
        let att = candle_nn::ops::softmax_last_dim(&att)?.reshape((
            p.n_kv_heads,
            groups * seq.len,
            n_keys,
        ))?;
        let o = att.matmul(&v)?; // (kv_heads, groups * len, dim)
        let o = o
            .reshape((p.n_heads, seq.len, p.head_dim))?
            .transpose(0, 1)?;
        outs.push(o);
    }
    Ok(Tensor::cat(&outs, 0)?.contiguous()?)
}

/// Tokens of one sequence whose queries share each key and value read (CPU attention).
const TILE: usize = 4;

/// Borrows the batch's chunks: the op runs once per layer, so copying block tables would repeat per layer.
struct CpuPagedAttention<'a> {
    seqs: &'a [SeqChunk],
    block_size: usize,
    params: AttnParams,
}

/// Four queries' dot products with one key: per query eight fused multiply-add lanes over the
/// dimensions, summed in order, then the remainder; the four run as independent chains (one chain
/// alone waits on the fused multiply-add's latency).
#[inline]
fn dot4(qs: [&[f32]; 4], kv: &[f32]) -> [f32; 4] {
    let mut acc = [[0f32; 8]; 4];
    let n8 = kv.len() / 8 * 8;
    for c in (0..n8).step_by(8) {
        let kc = &kv[c..c + 8];
        for (acc_j, qj) in acc.iter_mut().zip(&qs) {
            let qc = &qj[c..c + 8];
            for l in 0..8 {
                acc_j[l] = qc[l].mul_add(kc[l], acc_j[l]);
            }
        }
    }
    std::array::from_fn(|j| {
        let mut s = acc[j].iter().sum::<f32>();
        for (x, y) in qs[j][n8..].iter().zip(&kv[n8..]) {
            s += x * y;
        }
        s
    })
}

#[inline]
fn axpy(out: &mut [f32], w: f32, x: &[f32]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o = v.mul_add(w, *o);
    }
}

impl CustomOp3 for CpuPagedAttention<'_> {
    fn name(&self) -> &'static str {
        "paged-attention-cpu"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let p = &self.params;
        let (n_tokens, n_heads, d) = ql.shape().dims3()?;
        if !(ql.is_contiguous() && kl.is_contiguous() && vl.is_contiguous()) {
            candle_core::bail!("paged attention needs contiguous inputs");
        }
        let q = &qs.as_slice::<f32>()?[ql.start_offset()..];
        let k = &ks.as_slice::<f32>()?[kl.start_offset()..];
        let v = &vs.as_slice::<f32>()?[vl.start_offset()..];
        let groups = n_heads / p.n_kv_heads;
        let row = p.n_kv_heads * d;
        let bs = self.block_size;

        // One task per (sequence, tile of up to TILE tokens, KV head): each key and value row is
        // read once for the tile's tokens and the KV head's query heads. Every query still gets its
        // own scores, softmax and output sum in key order, exactly as alone, so results do not
        // depend on the tiling or on what else shares the batch.
        let mut tasks = Vec::with_capacity(n_tokens.div_ceil(TILE) * p.n_kv_heads);
        for (si, s) in self.seqs.iter().enumerate() {
            for t0 in (0..s.len).step_by(TILE) {
                for kvh in 0..p.n_kv_heads {
                    tasks.push((si, t0, kvh));
                }
            }
        }
        let mut out = vec![0f32; n_tokens * n_heads * d];
        let dst = OutPtr::new(&mut out);
        pool().execute_chunked(tasks.len(), |range| {
            for &(si, t0, kvh) in &tasks[range] {
                let s = &self.seqs[si];
                let nt = (s.len - t0).min(TILE);
                let pos0 = s.first_pos() + t0;
                // Query i is token t0 + i / groups, head kvh * groups + i % groups.
                let nq = nt * groups;
                let row_of =
                    |i: usize| (s.start + t0 + i / groups) * n_heads + kvh * groups + i % groups;
                let keys = |i: usize| {
                    let pos = pos0 + i / groups;
                    first_key(pos, p.window)..=pos
                };
                let slot = |kp: usize| s.block_table[kp / bs] as usize * bs + kp % bs;
                let (lo, hi) = (*keys(0).start(), pos0 + nt - 1);
                let mut scores: Vec<Vec<f32>> = (0..nq)
                    .map(|i| Vec::with_capacity(keys(i).count()))
                    .collect();
                let qv = |i: usize| &q[row_of(i) * d..][..d];
                for kp in lo..=hi {
                    let kv = &k[slot(kp) * row + kvh * d..][..d];
                    // The queries that see key kp (a run of tokens: causal, and a window that
                    // moves forward with them), four at a time in query order, gathered on the
                    // stack: a list per key was an allocation per key, KV head and layer.
                    let mut score = |quad: &[usize]| {
                        let qs = std::array::from_fn(|j| qv(quad[j.min(quad.len() - 1)]));
                        for (&i, sc) in quad.iter().zip(dot4(qs, kv)) {
                            scores[i].push(sc * p.scale);
                        }
                    };
                    let (mut quad, mut taken) = ([0usize; 4], 0);
                    for i in (0..nq).filter(|&i| keys(i).contains(&kp)) {
                        quad[taken] = i;
                        taken += 1;
                        if taken == 4 {
                            score(&quad);
                            taken = 0;
                        }
                    }
                    if taken > 0 {
                        score(&quad[..taken]);
                    }
                }
                let mut inv = vec![0f32; nq];
                for (sc, inv) in scores.iter_mut().zip(&mut inv) {
                    let max = sc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                    let mut sum = 0f32;
                    for x in sc.iter_mut() {
                        *x = (*x - max).exp();
                        sum += *x;
                    }
                    *inv = 1.0 / sum;
                }
                // SAFETY: query i's output row belongs to this task alone (one task per token tile
                // and KV head, and each head to one KV head), is inside `out` (one row of d per
                // token and head), and `out` outlives the pool call.
                let mut outs: Vec<&mut [f32]> = (0..nq)
                    .map(|i| unsafe { dst.slice(row_of(i) * d, d) })
                    .collect();
                for kp in lo..=hi {
                    let vv = &v[slot(kp) * row + kvh * d..][..d];
                    for (i, o) in outs.iter_mut().enumerate() {
                        let ks = keys(i);
                        if ks.contains(&kp) {
                            axpy(o, scores[i][kp - ks.start()] * inv[i], vv);
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n_tokens, n_heads, d))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One query at a time, one accumulator chain: the arithmetic `dot4` must keep per query.
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; 8];
        let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for l in 0..8 {
                acc[l] = x[l].mul_add(y[l], acc[l]);
            }
        }
        let mut s = acc.iter().sum::<f32>();
        for (x, y) in ra.iter().zip(rb) {
            s += x * y;
        }
        s
    }

    #[test]
    fn four_query_dots_are_each_the_single_query_dot() {
        for d in [256usize, 64, 70] {
            let v = |seed: usize| -> Vec<f32> {
                (0..d)
                    .map(|i| ((i * 7919 + seed * 104729) % 1000) as f32 / 250.0 - 2.0)
                    .collect()
            };
            let qs: Vec<Vec<f32>> = (1..5).map(v).collect();
            let kv = v(9);
            let got = dot4(std::array::from_fn(|j| qs[j].as_slice()), &kv);
            for (j, q) in qs.iter().enumerate() {
                assert_eq!(got[j].to_bits(), dot(q, &kv).to_bits(), "d={d} query {j}");
            }
        }
    }

    /// Both backends over a ragged batch (a prefill chunk after cached tokens, a fresh prompt, decodes),
    /// with grouped-query heads, with and without a sliding window.
    #[test]
    fn cpu_backend_matches_portable() {
        let dev = Device::Cpu;
        let (h, kvh, d, bs) = (6, 2, 16, 4);
        let cache = KvCache::new(1, 32, bs, kvh, d, DType::F32, &dev).unwrap();
        // Fill the cache with random keys/values so cached positions hold data.
        let k_all = Tensor::randn(0f32, 1.0, (32 * bs, kvh, d), &dev).unwrap();
        let v_all = Tensor::randn(0f32, 1.0, (32 * bs, kvh, d), &dev).unwrap();
        cache.k[0].slice_set(&k_all, 0, 0).unwrap();
        cache.v[0].slice_set(&v_all, 0, 0).unwrap();
        let mut batch = Batch::new(bs);
        batch.push(&[1; 5], 7, &[3, 9, 4], true); // positions 7..12 after 7 cached
        batch.push(&[1; 9], 0, &[0, 1, 2], true);
        batch.push(&[1], 20, &[10, 11, 12, 13, 14, 15], true);
        batch.push(&[1], 0, &[20], true);
        let q = Tensor::randn(0f32, 1.0, (batch.num_tokens(), h, d), &dev).unwrap();
        for window in [None, Some(3)] {
            let p = AttnParams {
                n_heads: h,
                n_kv_heads: kvh,
                head_dim: d,
                scale: 0.25,
                window,
            };
            let a = paged_attention(
                AttentionBackend::Portable,
                &q,
                &cache.k[0],
                &cache.v[0],
                &batch,
                &p,
            )
            .unwrap();
            let b = paged_attention(
                AttentionBackend::Cpu,
                &q,
                &cache.k[0],
                &cache.v[0],
                &batch,
                &p,
            )
            .unwrap();
            let diff = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "window {window:?}: max diff {diff}");
        }
    }
}
