// Gated MLP activation over a fused gate|up matmul output: out[r, i] = act(gu[r, i]) * gu[r, I + i],
// computed in f32 and rounded once. One launch instead of two (activation, product) plus no split copies.
#include "common.cuh"

template <typename T>
__device__ void silu_mul(T *__restrict__ out, const T *__restrict__ gu, size_t rows, size_t inner) {
    const size_t n = rows * inner;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n;
         e += (size_t)gridDim.x * blockDim.x) {
        const size_t r = e / inner;
        const size_t i = e - r * inner;
        const float g = to_f(gu[r * 2 * inner + i]);
        const float u = to_f(gu[r * 2 * inner + inner + i]);
        out[e] = from_f<T>(g / (1.f + expf(-g)) * u);
    }
}

#define INSTANTIATE(NAME, T)                                                                     \
    extern "C" __global__ void silu_mul_##NAME(T *out, const T *gu, size_t rows, size_t inner) { \
        silu_mul<T>(out, gu, rows, inner);                                                       \
    }

INSTANTIATE(f32, float)
INSTANTIATE(f16, __half)
INSTANTIATE(bf16, __nv_bfloat16)
