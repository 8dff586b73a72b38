// The residual add fused into RMSNorm: sum = x + a, rounded to the storage type (the residual stream
// keeps it), and out = sum / rms(sum) * w. One launch where there were two, and the norm reads the sum
// from registers instead of from memory. One thread block per row; each thread holds up to
// NORM_PER_THREAD of the row's values. Arithmetic is f32 whatever the storage type.
#include "common.cuh"

#if !defined(HEARTH_NORM_PER_THREAD)
#error "build.rs passes HEARTH_NORM_PER_THREAD"
#endif
#define NORM_PER_THREAD HEARTH_NORM_PER_THREAD

template <typename T>
__device__ void add_rms_norm(T *__restrict__ sum, T *__restrict__ out, const T *__restrict__ x,
                             const T *__restrict__ a, const T *__restrict__ w, int cols,
                             float eps) {
    const size_t base = (size_t)blockIdx.x * cols;
    float v[NORM_PER_THREAD];
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < NORM_PER_THREAD; i++) {
        const int c = threadIdx.x + i * blockDim.x;
        v[i] = 0.f;
        if (c < cols) {
            const T s = from_f<T>(to_f(x[base + c]) + to_f(a[base + c]));
            sum[base + c] = s;
            v[i] = to_f(s);
            ss += v[i] * v[i];
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    __shared__ float partial[32];
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (lane == 0) partial[warp] = ss;
    __syncthreads();
    const int warps = (blockDim.x + 31) / 32;
    ss = lane < warps ? partial[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    const float scale = rsqrtf(ss / cols + eps);
#pragma unroll
    for (int i = 0; i < NORM_PER_THREAD; i++) {
        const int c = threadIdx.x + i * blockDim.x;
        if (c < cols) out[base + c] = from_f<T>(scale * v[i] * to_f(w[c]));
    }
}

#define INSTANTIATE(NAME, T)                                                                     \
    extern "C" __global__ void add_rms_norm_##NAME(T *sum, T *out, const T *x, const T *a,       \
                                                   const T *w, int cols, float eps) {            \
        add_rms_norm<T>(sum, out, x, a, w, cols, eps);                                           \
    }

INSTANTIATE(f32, float)
INSTANTIATE(f16, __half)
INSTANTIATE(bf16, __nv_bfloat16)
