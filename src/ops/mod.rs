//! The operations the decoder runs on a device: the paged-attention op and its backends (portable,
//! CPU, CUDA), quantized matmuls, and the CUDA launchers of kernels/.
pub mod attention;
#[cfg(feature = "cuda")]
pub mod cuda_activation;
#[cfg(feature = "cuda")]
pub mod cuda_attention;
#[cfg(feature = "cuda")]
pub mod cuda_greedy;
#[cfg(feature = "cuda")]
pub mod cuda_norm;
pub mod gelu;
pub mod greedy;
#[cfg(feature = "cuda")]
pub mod kernel_limits;
pub mod linear;
pub mod panels;
pub mod threads;
pub mod vexp;

/// Per-layer attention parameters.
#[derive(Debug, Clone, Copy)]
pub struct AttnParams {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// A query at position p sees keys at positions > p - window.
    pub window: Option<usize>,
}
