//! The residual add fused into RMSNorm on CUDA (kernels/norm.cu): from the residual stream `x`, a
//! block's output `a` and the norm's weight, one launch gives both the new stream `x + a` and its norm.
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CpuStorage, CudaDevice, CudaStorage, CustomOp3, DType, Layout, Shape};

use super::kernel_limits::{NORM_MAX_THREADS, NORM_PER_THREAD};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/norm.ptx"));
const MODULE: &str = "hearth_norm";

/// (x (rows, cols), a (rows, cols), w (cols)) -> (2, rows, cols): [x + a, rms_norm(x + a) * w].
pub struct AddRmsNorm {
    pub eps: f32,
}

impl AddRmsNorm {
    /// Whether the kernel takes rows of `cols` values.
    pub fn fits(cols: usize) -> bool {
        cols > 0 && cols <= NORM_MAX_THREADS * NORM_PER_THREAD
    }

    #[allow(clippy::too_many_arguments)]
    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        dev: &CudaDevice,
        xs: &CudaStorage,
        xl: &Layout,
        as_: &CudaStorage,
        al: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        suffix: &str,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (rows, cols) = xl.shape().dims2()?;
        let x = xs.as_cuda_slice::<T>()?.slice(xl.start_offset()..);
        let a = as_.as_cuda_slice::<T>()?.slice(al.start_offset()..);
        let w = ws.as_cuda_slice::<T>()?.slice(wl.start_offset()..);
        // SAFETY: the kernel writes every element of both halves.
        let out = unsafe { dev.alloc::<T>(2 * rows * cols)? };
        let sum = out.slice(..rows * cols);
        let normed = out.slice(rows * cols..);
        let func = dev.get_or_load_custom_func(&format!("add_rms_norm_{suffix}"), MODULE, PTX)?;
        let cols_i = cols as i32;
        let mut b = func.builder();
        b.arg(&sum);
        b.arg(&normed);
        b.arg(&x);
        b.arg(&a);
        b.arg(&w);
        b.arg(&cols_i);
        b.arg(&self.eps);
        let threads = cols.div_ceil(NORM_PER_THREAD).div_ceil(32) * 32;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads.clamp(32, NORM_MAX_THREADS) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: shapes were checked; the kernel reads rows x cols of x and a, cols of w.
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((2, rows, cols)),
        ))
    }
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "add-rms-norm-cuda"
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
        bail!("add-rms-norm-cuda runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        as_: &CudaStorage,
        al: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        for l in [xl, al, wl] {
            super::cuda_attention::check_contiguous(self.name(), l)?;
        }
        let (rows, cols) = xl.shape().dims2()?;
        if al.shape().dims2()? != (rows, cols) || wl.shape().dims1()? != cols || !Self::fits(cols) {
            bail!(
                "add-rms-norm: shapes {:?} + {:?}, weight {:?}",
                xl.shape(),
                al.shape(),
                wl.shape()
            );
        }
        if as_.dtype() != xs.dtype() || ws.dtype() != xs.dtype() {
            bail!("add-rms-norm: dtypes differ");
        }
        let dev = xs.device().clone();
        match xs.dtype() {
            DType::F32 => self.launch::<f32>(&dev, xs, xl, as_, al, ws, wl, "f32"),
            DType::F16 => self.launch::<half::f16>(&dev, xs, xl, as_, al, ws, wl, "f16"),
            DType::BF16 => self.launch::<half::bf16>(&dev, xs, xl, as_, al, ws, wl, "bf16"),
            other => bail!("add-rms-norm: unsupported dtype {other:?}"),
        }
    }
}
