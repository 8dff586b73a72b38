// Limits shared by the CUDA kernels in kernels/ and their launchers: this file is their one owner.
// build.rs `include!`s it and passes the values to nvcc as -D macros, so it holds plain consts only.

/// Warps per thread block of the paged-attention kernels.
pub const ATTN_WARPS: u32 = 4;
/// Threads per thread block of the paged-attention kernels.
pub const ATTN_THREADS: u32 = ATTN_WARPS * 32;
/// Head-dimension elements one lane holds; the largest head dimension is 32 lanes times this.
pub const ATTN_MAX_PER_LANE: usize = 8;
/// The largest head dimension the attention kernel takes.
pub const MAX_HEAD_DIM: usize = ATTN_MAX_PER_LANE * 32;
/// Row values one thread of the fused add + RMSNorm kernel holds.
pub const NORM_PER_THREAD: usize = 8;
/// Threads per block of that kernel (one block per row): rows up to this times `NORM_PER_THREAD`.
pub const NORM_MAX_THREADS: usize = 1024;
