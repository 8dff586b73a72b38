//! The CUDA backend of the paged-attention op: kernels/paged_attention.cu, compiled to PTX by build.rs
//! and loaded through candle's CUDA device (cudarc). The step's batch description (slot mapping, block
//! tables, token -> sequence, positions) is uploaded once per step, in one copy, and shared by every
//! layer.
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    bail, CpuStorage, CudaDevice, CudaStorage, CustomOp3, DType, InplaceOp2, Layout, Shape,
    Storage, Tensor,
};

use super::kernel_limits::{ATTN_THREADS as THREADS, MAX_HEAD_DIM};
use super::AttnParams;
use crate::model::batch::{Batch, Packed};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/paged_attention.ptx"));
const MODULE: &str = "hearth_paged_attention";

/// One step's batch description in device memory: `Batch::pack`'s buffer, uploaded in one copy. A
/// CUDA graph keeps one such buffer and rewrites it each replay.
#[derive(Clone)]
pub struct CudaBatch {
    packed: Tensor,
    max_blocks: usize,
    block_size: usize,
    n_tokens: usize,
}

impl CudaBatch {
    pub fn upload(dev: &CudaDevice, batch: &Batch) -> candle_core::Result<Self> {
        let max_blocks = batch.max_blocks();
        let packed = batch.pack(max_blocks, None);
        Self::from_packed(
            Tensor::new(packed.as_slice(), &candle_core::Device::Cuda(dev.clone()))?,
            batch.num_tokens(),
            max_blocks,
            batch.block_size,
        )
    }

    /// A batch description over an uploaded `pack` buffer of `n_tokens` rows.
    pub fn from_packed(
        packed: Tensor,
        n_tokens: usize,
        max_blocks: usize,
        block_size: usize,
    ) -> candle_core::Result<Self> {
        if packed.dtype() != DType::U32
            || packed.elem_count() < Packed::tables_from(n_tokens) + max_blocks
        {
            bail!("cuda batch: the packed buffer does not hold {n_tokens} rows");
        }
        Ok(Self {
            packed,
            max_blocks,
            block_size,
            n_tokens,
        })
    }

    /// The packed buffer (a graph rewrites it in place).
    pub fn packed(&self) -> &Tensor {
        &self.packed
    }

    /// The token ids, as a tensor.
    pub fn ids(&self) -> candle_core::Result<Tensor> {
        let r = Packed::Ids.range(self.n_tokens);
        self.packed.narrow(0, r.start, r.len())
    }

    /// The positions, as a tensor.
    pub fn positions(&self) -> candle_core::Result<Tensor> {
        let r = Packed::Positions.range(self.n_tokens);
        self.packed.narrow(0, r.start, r.len())
    }

    /// Runs `f` with the device buffer (from the layout's offset on).
    fn with_buffer<R>(
        &self,
        f: impl FnOnce(
            &candle_core::cuda_backend::cudarc::driver::CudaView<'_, u32>,
        ) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let (g, l) = self.packed.storage_and_layout();
        let all = cuda_storage(&g, "the batch description")?
            .as_cuda_slice::<u32>()?
            .slice(l.start_offset()..);
        f(&all)
    }
}

/// Whether the grouped attention kernel runs where it applies (the default; `HEARTH_ATTN_GQA=0`
/// keeps the per-head kernel, which the GPU check compares it with).
fn grouped_kernel() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("HEARTH_ATTN_GQA").map_or(true, |v| v.trim() != "0"))
}

fn kernel_suffix(dtype: DType) -> candle_core::Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!("paged attention on CUDA: unsupported dtype {other:?}"),
    })
}

pub(super) fn check_contiguous(name: &str, l: &Layout) -> candle_core::Result<()> {
    if !l.is_contiguous() {
        bail!("{name}: inputs must be contiguous");
    }
    Ok(())
}

/// Writes this step's K or V rows (tokens, kv_heads, head_dim) into a layer cache at the slot mapping.
pub struct WriteKv<'a> {
    pub batch: &'a CudaBatch,
}

impl WriteKv<'_> {
    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        dev: &CudaDevice,
        cache: &mut CudaStorage,
        cl: &Layout,
        src: &CudaStorage,
        sl: &Layout,
        suffix: &str,
    ) -> candle_core::Result<()> {
        let n = self.batch.n_tokens;
        let row = sl.shape().elem_count() / n.max(1);
        if !cl.shape().elem_count().is_multiple_of(row.max(1)) {
            bail!("write-kv: cache rows do not match the new rows");
        }
        let func = dev.get_or_load_custom_func(&format!("write_kv_{suffix}"), MODULE, PTX)?;
        let s = src.as_cuda_slice::<T>()?.slice(sl.start_offset()..);
        let mut c = cache
            .as_cuda_slice_mut::<T>()?
            .slice_mut(cl.start_offset()..);
        let row_i = row as i32;
        self.batch.with_buffer(|buf| {
            let slots = buf.slice(Packed::Slots.range(self.batch.n_tokens));
            let mut b = func.builder();
            b.arg(&mut c);
            b.arg(&s);
            b.arg(&slots);
            b.arg(&row_i);
            let cfg = LaunchConfig {
                grid_dim: (n as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the kernel reads `n * row` source elements and writes rows at slots the block
            // pool handed out, which lie inside the cache.
            unsafe { b.launch(cfg) }.w()?;
            Ok(())
        })
    }
}

impl InplaceOp2 for WriteKv<'_> {
    fn name(&self) -> &'static str {
        "write-kv-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<()> {
        bail!("write-kv-cuda runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        cache: &mut CudaStorage,
        cl: &Layout,
        src: &CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        check_contiguous(self.name(), cl)?;
        check_contiguous(self.name(), sl)?;
        if self.batch.n_tokens == 0 {
            return Ok(());
        }
        let dev = src.device().clone();
        let suffix = kernel_suffix(src.dtype())?;
        if cache.dtype() != src.dtype() {
            bail!("write-kv: cache and rows differ in dtype");
        }
        match src.dtype() {
            DType::F32 => self.launch::<f32>(&dev, cache, cl, src, sl, suffix),
            DType::F16 => self.launch::<half::f16>(&dev, cache, cl, src, sl, suffix),
            _ => self.launch::<half::bf16>(&dev, cache, cl, src, sl, suffix),
        }
    }
}

/// Attention of q (tokens, heads, head_dim) over the paged K and V caches.
pub struct Attend<'a> {
    pub batch: &'a CudaBatch,
    pub params: AttnParams,
}

impl Attend<'_> {
    #[allow(clippy::too_many_arguments)]
    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        dev: &CudaDevice,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
        suffix: &str,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let p = &self.params;
        let (n_tokens, n_heads, d) = ql.shape().dims3()?;
        // The grouped kernel (one block per KV head and its query heads: each K/V row read once per
        // group), where it is instantiated for this group size and head dimension.
        let group = n_heads / p.n_kv_heads.max(1);
        let per_lane = [2usize, 4, 8].into_iter().find(|&pl| 32 * pl >= d);
        let (name, blocks_y) = match per_lane {
            Some(pl) if grouped_kernel() && matches!(group, 2 | 4 | 8) => (
                format!("paged_attention_gqa{group}_pl{pl}_{suffix}"),
                p.n_kv_heads,
            ),
            _ => (format!("paged_attention_{suffix}"), n_heads),
        };
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let q = qs.as_cuda_slice::<T>()?.slice(ql.start_offset()..);
        let k = ks.as_cuda_slice::<T>()?.slice(kl.start_offset()..);
        let v = vs.as_cuda_slice::<T>()?.slice(vl.start_offset()..);
        // SAFETY: every element is written by the kernel below.
        let out = unsafe { dev.alloc::<T>(n_tokens * n_heads * d)? };
        let ints = [
            n_heads as i32,
            p.n_kv_heads as i32,
            d as i32,
            self.batch.block_size as i32,
            self.batch.max_blocks as i32,
        ];
        let window = p.window.unwrap_or(0) as i32;
        self.batch.with_buffer(|buf| {
            let tables = buf.slice(Packed::tables_from(self.batch.n_tokens)..);
            let seq = buf.slice(Packed::Chunks.range(self.batch.n_tokens));
            let pos = buf.slice(Packed::Positions.range(self.batch.n_tokens));
            let mut b = func.builder();
            b.arg(&out);
            b.arg(&q);
            b.arg(&k);
            b.arg(&v);
            b.arg(&tables);
            b.arg(&seq);
            b.arg(&pos);
            for i in &ints {
                b.arg(i);
            }
            b.arg(&p.scale);
            b.arg(&window);
            let cfg = LaunchConfig {
                grid_dim: (n_tokens as u32, blocks_y as u32, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the batch description was built from the same batch as q; block ids come
            // from the block pool and lie inside the caches.
            unsafe { b.launch(cfg) }.w()?;
            Ok(())
        })?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((n_tokens, n_heads, d)),
        ))
    }
}

impl CustomOp3 for Attend<'_> {
    fn name(&self) -> &'static str {
        "paged-attention-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        bail!("paged-attention-cuda runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        for l in [ql, kl, vl] {
            check_contiguous(self.name(), l)?;
        }
        let (n_tokens, n_heads, d) = ql.shape().dims3()?;
        let p = &self.params;
        if n_tokens != self.batch.n_tokens {
            bail!(
                "paged attention: {n_tokens} query rows for a batch of {}",
                self.batch.n_tokens
            );
        }
        if d > MAX_HEAD_DIM || d != p.head_dim || !n_heads.is_multiple_of(p.n_kv_heads) {
            bail!("paged attention: unsupported head layout ({n_heads} heads of {d})");
        }
        if ks.dtype() != qs.dtype() || vs.dtype() != qs.dtype() {
            bail!("paged attention: q and the caches differ in dtype");
        }
        let dev = qs.device().clone();
        let suffix = kernel_suffix(qs.dtype())?;
        match qs.dtype() {
            DType::F32 => self.launch::<f32>(&dev, qs, ql, ks, kl, vs, vl, suffix),
            DType::F16 => self.launch::<half::f16>(&dev, qs, ql, ks, kl, vs, vl, suffix),
            _ => self.launch::<half::bf16>(&dev, qs, ql, ks, kl, vs, vl, suffix),
        }
    }
}

/// The fused projection epilogue: RoPE on Q and K of a fused Q|K|V matmul output, K and V written to
/// the layer's caches at the slot mapping, rotated Q returned (tokens, heads, head_dim).
pub struct RopeWriteQkv<'a> {
    pub batch: &'a CudaBatch,
    pub k_cache: &'a Tensor,
    pub v_cache: &'a Tensor,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

fn cuda_storage<'g>(
    guard: &'g candle_core::StorageRef<'_>,
    what: &str,
) -> candle_core::Result<&'g CudaStorage> {
    match &**guard {
        Storage::Cuda(s) => Ok(s),
        _ => bail!("{what} is not on a CUDA device"),
    }
}

impl RopeWriteQkv<'_> {
    #[allow(clippy::too_many_arguments)]
    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        dev: &CudaDevice,
        qkv: &CudaStorage,
        ql: &Layout,
        cos: &CudaStorage,
        cl: &Layout,
        sin: &CudaStorage,
        sl: &Layout,
        suffix: &str,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let n = self.batch.n_tokens;
        let (h, kvh, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let (kg, kl) = self.k_cache.storage_and_layout();
        let (vg, vl) = self.v_cache.storage_and_layout();
        for l in [kl, vl] {
            check_contiguous(self.name(), l)?;
        }
        // SAFETY (of writing through read guards): the caches are only ever used by the engine
        // thread that runs this op, so no reader can observe the write concurrently.
        let k = cuda_storage(&kg, "the K cache")?
            .as_cuda_slice::<T>()?
            .slice(kl.start_offset()..);
        let v = cuda_storage(&vg, "the V cache")?
            .as_cuda_slice::<T>()?
            .slice(vl.start_offset()..);
        let src = qkv.as_cuda_slice::<T>()?.slice(ql.start_offset()..);
        let c = cos.as_cuda_slice::<T>()?.slice(cl.start_offset()..);
        let s = sin.as_cuda_slice::<T>()?.slice(sl.start_offset()..);
        // SAFETY: every element is written by the kernel below.
        let q = unsafe { dev.alloc::<T>(n * h * d)? };
        let func = dev.get_or_load_custom_func(&format!("rope_write_qkv_{suffix}"), MODULE, PTX)?;
        let ints = [h as i32, kvh as i32, d as i32];
        self.batch.with_buffer(|buf| {
            let slots = buf.slice(Packed::Slots.range(self.batch.n_tokens));
            let mut b = func.builder();
            b.arg(&q);
            b.arg(&k);
            b.arg(&v);
            b.arg(&src);
            b.arg(&c);
            b.arg(&s);
            b.arg(&slots);
            for i in &ints {
                b.arg(i);
            }
            let cfg = LaunchConfig {
                grid_dim: (n as u32, (h + 2 * kvh) as u32, 1),
                block_dim: ((d / 2).clamp(1, 128) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: shapes were checked against the batch; slots come from the block pool.
            unsafe { b.launch(cfg) }.w()?;
            Ok(())
        })?;
        Ok((
            CudaStorage::wrap_cuda_slice(q, dev.clone()),
            Shape::from((n, h, d)),
        ))
    }
}

impl CustomOp3 for RopeWriteQkv<'_> {
    fn name(&self) -> &'static str {
        "rope-write-qkv-cuda"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        bail!("rope-write-qkv-cuda runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        qkv: &CudaStorage,
        ql: &Layout,
        cos: &CudaStorage,
        cl: &Layout,
        sin: &CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        for l in [ql, cl, sl] {
            check_contiguous(self.name(), l)?;
        }
        let (n, width) = ql.shape().dims2()?;
        let (h, kvh, d) = (self.n_heads, self.n_kv_heads, self.head_dim);
        if n != self.batch.n_tokens || width != (h + 2 * kvh) * d || d % 2 != 0 {
            bail!("rope-write-qkv: ({n}, {width}) does not fit {h} + 2 x {kvh} heads of {d}");
        }
        if cl.shape().dims2()? != (n, d / 2) || sl.shape().dims2()? != (n, d / 2) {
            bail!("rope-write-qkv: cos/sin must be (tokens, head_dim / 2)");
        }
        if cos.dtype() != qkv.dtype()
            || sin.dtype() != qkv.dtype()
            || self.k_cache.dtype() != qkv.dtype()
        {
            bail!("rope-write-qkv: dtypes differ");
        }
        let dev = qkv.device().clone();
        let suffix = kernel_suffix(qkv.dtype())?;
        match qkv.dtype() {
            DType::F32 => self.launch::<f32>(&dev, qkv, ql, cos, cl, sin, sl, suffix),
            DType::F16 => self.launch::<half::f16>(&dev, qkv, ql, cos, cl, sin, sl, suffix),
            _ => self.launch::<half::bf16>(&dev, qkv, ql, cos, cl, sin, sl, suffix),
        }
    }
}
