//! The greedy pick of logit rows on CUDA in one launch (kernels/greedy.cu), what `ops::greedy::pick`
//! computes on the CPU.
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CpuStorage, CudaStorage, CustomOp1, DType, Layout, Shape};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/greedy.ptx"));
const MODULE: &str = "hearth_greedy";
/// The kernel's block size (`PICK_THREADS` in kernels/greedy.cu).
const THREADS: u32 = 1024;

/// f32 logits (rows, vocab) -> (rows, 4) f32: [token, ln(sum exp(l - max)), that minus the
/// entropy's moment over the sum, runner-up - max] per row.
pub struct GreedyPick;

impl CustomOp1 for GreedyPick {
    fn name(&self) -> &'static str {
        "greedy-pick-cuda"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        bail!("greedy-pick-cuda runs on CUDA tensors only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        if !l.is_contiguous() || s.dtype() != DType::F32 {
            bail!("greedy-pick: contiguous f32 logits only");
        }
        let (rows, cols) = l.shape().dims2()?;
        if cols == 0 || cols >= 1 << 24 {
            bail!("greedy-pick: {cols} columns (token ids must be exact in f32)");
        }
        let dev = s.device().clone();
        let src = s.as_cuda_slice::<f32>()?.slice(l.start_offset()..);
        // SAFETY: the kernel writes all four values of every row.
        let out = unsafe { dev.alloc::<f32>(rows * 4)? };
        if rows > 0 {
            let func = dev.get_or_load_custom_func("greedy_pick_f32", MODULE, PTX)?;
            let mut b = func.builder();
            b.arg(&out);
            b.arg(&src);
            b.arg(&cols);
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the kernel reads rows x cols values and writes rows x 4.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((rows, 4)),
        ))
    }
}
