//! The gated-MLP activation on CUDA over a fused gate|up matmul output (kernels/activation.cu):
//! silu(gate) * up in one launch, without splitting the matmul output into two copies.
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CpuStorage, CudaDevice, CudaStorage, CustomOp1, DType, Layout, Shape};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/activation.ptx"));
const MODULE: &str = "hearth_activation";

/// (rows, 2 * inner) -> (rows, inner): silu of the first half times the second.
pub struct SiluMul;

impl SiluMul {
    fn launch<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        s: &CudaStorage,
        l: &Layout,
        suffix: &str,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (rows, width) = l.shape().dims2()?;
        let inner = width / 2;
        let src = s.as_cuda_slice::<T>()?.slice(l.start_offset()..);
        // SAFETY: every element is written by the kernel below.
        let out = unsafe { dev.alloc::<T>(rows * inner)? };
        let func = dev.get_or_load_custom_func(&format!("silu_mul_{suffix}"), MODULE, PTX)?;
        let (r, i) = (rows, inner);
        let mut b = func.builder();
        b.arg(&out);
        b.arg(&src);
        b.arg(&r);
        b.arg(&i);
        let n = (rows * inner) as u32;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256).clamp(1, 65_535), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the kernel reads rows * width elements and writes rows * inner.
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((rows, inner)),
        ))
    }
}

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul-cuda"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        bail!("silu-mul-cuda runs on CUDA tensors only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        if !l.is_contiguous() {
            bail!("silu-mul: input must be contiguous");
        }
        let (_, width) = l.shape().dims2()?;
        if width % 2 != 0 {
            bail!("silu-mul: odd width {width}");
        }
        let dev = s.device().clone();
        match s.dtype() {
            DType::F32 => Self::launch::<f32>(&dev, s, l, "f32"),
            DType::F16 => Self::launch::<half::f16>(&dev, s, l, "f16"),
            DType::BF16 => Self::launch::<half::bf16>(&dev, s, l, "bf16"),
            other => bail!("silu-mul: unsupported dtype {other:?}"),
        }
    }
}
