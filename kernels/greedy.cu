// The greedy pick of f32 logit rows, what ops::greedy::pick computes on the CPU, in one launch: per
// row, the first index of the maximum, ln(sum exp(l - max)), the entropy's moment sum(e * (l - max))
// with l - max clamped as the CPU pass clamps it, and the best logit other than the pick. Before this,
// the same came from ~18 candle kernels, each a full pass over the logits.
// Output per row (4 x f32): token (exact below 2^24), lse, lse - moment / sum, runner-up - max.
#include "common.cuh"

#define PICK_CLAMP 87.f

struct Best {
    float v;
    unsigned int i;
};

// The larger value; the first index on a tie; NaN never wins.
__device__ __forceinline__ Best better(Best a, Best b) {
    if (b.v > a.v || (b.v == a.v && b.i < a.i)) return b;
    return a;
}

template <int THREADS>
__device__ Best block_best(Best b) {
    __shared__ float sv[THREADS / 32];
    __shared__ unsigned int si[THREADS / 32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        Best other{__shfl_xor_sync(0xffffffffu, b.v, o), __shfl_xor_sync(0xffffffffu, b.i, o)};
        b = better(b, other);
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        sv[warp] = b.v;
        si[warp] = b.i;
    }
    __syncthreads();
    b = lane < THREADS / 32 ? Best{sv[lane], si[lane]} : Best{-INFINITY, 0xffffffffu};
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        Best other{__shfl_xor_sync(0xffffffffu, b.v, o), __shfl_xor_sync(0xffffffffu, b.i, o)};
        b = better(b, other);
    }
    __syncthreads();
    return b;
}

template <int THREADS>
__device__ float block_sum(float v) {
    __shared__ float s[THREADS / 32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) s[warp] = v;
    __syncthreads();
    v = lane < THREADS / 32 ? s[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    return v;
}

template <int THREADS>
__device__ float block_max(float v) {
    __shared__ float s[THREADS / 32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) s[warp] = v;
    __syncthreads();
    v = lane < THREADS / 32 ? s[lane] : -INFINITY;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    return v;
}

#define PICK_THREADS 1024

extern "C" __global__ void __launch_bounds__(PICK_THREADS)
    greedy_pick_f32(float *__restrict__ out, const float *__restrict__ logits, size_t cols) {
    const float *row = logits + blockIdx.x * cols;
    Best b{-INFINITY, 0xffffffffu};
    for (size_t c = threadIdx.x; c < cols; c += PICK_THREADS) b = better(b, Best{row[c], (unsigned int)c});
    b = block_best<PICK_THREADS>(b);
    // A row that starts with NaN, or holds nothing but NaN, picks index 0 (as the CPU pass); an
    // all -inf row already picked its first index.
    if (b.i == 0xffffffffu || isnan(row[0])) b = Best{row[0], 0};
    const float max = b.v;
    float sum = 0.f, moment = 0.f, second = -INFINITY;
    for (size_t c = threadIdx.x; c < cols; c += PICK_THREADS) {
        const float l = row[c];
        const float x = fminf(fmaxf(l - max, -PICK_CLAMP), PICK_CLAMP);
        const float e = expf(x);
        sum += e;
        moment += e * x;
        if (c != b.i) second = fmaxf(second, l);
    }
    sum = block_sum<PICK_THREADS>(sum);
    moment = block_sum<PICK_THREADS>(moment);
    second = block_max<PICK_THREADS>(second);
    if (threadIdx.x == 0) {
        const float lse = logf(sum);
        float *o = out + blockIdx.x * 4;
        o[0] = (float)b.i;
        o[1] = lse;
        o[2] = lse - moment / sum;
        o[3] = second - max;
    }
}
