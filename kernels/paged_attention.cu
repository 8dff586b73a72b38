// Hearth's CUDA kernels for the paged KV cache: writing this step's K/V rows into cache slots, and
// attention of a ragged batch (decode tokens and prefill chunks alike) over each sequence's blocks.
//
// Layouts (all contiguous, row-major):
//   q, out           (tokens, heads, head_dim)
//   k_cache, v_cache (slots, kv_heads, head_dim), slot = block id * block_size + offset in block
//   block_tables     (seqs, max_blocks) u32, a sequence's blocks in position order
//   token_seq        (tokens) u32, which sequence a token belongs to
//   token_pos        (tokens) u32, the token's position; its K/V are already in the cache
// A query at position p attends to keys at positions [max(0, p + 1 - window), p] (window 0: all).
// Arithmetic is f32 whatever the storage type.
#include "common.cuh"

// WARPS and MAX_PER_LANE (head_dim <= 32 * MAX_PER_LANE) come from src/ops/kernel_limits.rs, their
// one owner, through build.rs (-D flags), so the launcher and the kernel cannot disagree.
#if !defined(HEARTH_ATTN_WARPS) || !defined(HEARTH_ATTN_MAX_PER_LANE)
#error "build.rs passes HEARTH_ATTN_WARPS and HEARTH_ATTN_MAX_PER_LANE"
#endif
#define WARPS HEARTH_ATTN_WARPS
#define MAX_PER_LANE HEARTH_ATTN_MAX_PER_LANE

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// One thread block per token: copies its (kv_heads * head_dim) row to the token's slot.
template <typename T>
__device__ void write_kv(T *__restrict__ cache, const T *__restrict__ src,
                         const uint32_t *__restrict__ slots, int row) {
    const size_t t = blockIdx.x;
    const T *s = src + t * row;
    T *d = cache + (size_t)slots[t] * row;
    for (int i = threadIdx.x; i < row; i += blockDim.x) d[i] = s[i];
}

// Fused projection epilogue: from one (tokens, (heads + 2 kv_heads) * head_dim) Q|K|V matmul output,
// RoPE (pairs (i, i + d/2)) on Q into q_out, RoPE on K and the plain V into the caches at the token's
// slot. One thread block per (token, head of Q|K|V); cos, sin are (tokens, d/2) for each token's position.
template <typename T>
__device__ void rope_write_qkv(T *__restrict__ q_out, T *__restrict__ k_cache,
                               T *__restrict__ v_cache, const T *__restrict__ qkv,
                               const T *__restrict__ cos, const T *__restrict__ sin,
                               const uint32_t *__restrict__ slots, int n_heads, int n_kv_heads,
                               int d) {
    const size_t t = blockIdx.x;
    const int j = blockIdx.y;
    const int half = d / 2;
    const T *src = qkv + t * (size_t)(n_heads + 2 * n_kv_heads) * d + (size_t)j * d;
    const size_t slot = slots[t];
    T *dst;
    bool rotate = true;
    if (j < n_heads) {
        dst = q_out + (t * n_heads + j) * d;
    } else if (j < n_heads + n_kv_heads) {
        dst = k_cache + (slot * n_kv_heads + (j - n_heads)) * d;
    } else {
        dst = v_cache + (slot * n_kv_heads + (j - n_heads - n_kv_heads)) * d;
        rotate = false;
    }
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        if (rotate) {
            const float x1 = to_f(src[i]);
            const float x2 = to_f(src[i + half]);
            const float c = to_f(cos[t * half + i]);
            const float s = to_f(sin[t * half + i]);
            dst[i] = from_f<T>(x1 * c - x2 * s);
            dst[i + half] = from_f<T>(x1 * s + x2 * c);
        } else {
            dst[i] = src[i];
            dst[i + half] = src[i + half];
        }
    }
}

// One thread block of WARPS warps per (token, head): grid (tokens, heads). Each warp walks every WARPS-th key with an
// online softmax, its lanes splitting head_dim; the warps' partial results are merged at the end.
template <typename T>
__device__ void paged_attention(T *__restrict__ out, const T *__restrict__ q,
                                const T *__restrict__ k_cache, const T *__restrict__ v_cache,
                                const uint32_t *__restrict__ block_tables,
                                const uint32_t *__restrict__ token_seq,
                                const uint32_t *__restrict__ token_pos, int n_heads,
                                int n_kv_heads, int d, int block_size, int max_blocks,
                                float scale, int window) {
    const size_t t = blockIdx.x;
    const int h = blockIdx.y;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int kvh = h / (n_heads / n_kv_heads);
    const int pos = (int)token_pos[t];
    const int lo = window > 0 ? max(0, pos + 1 - window) : 0;
    const uint32_t *table = block_tables + (size_t)token_seq[t] * max_blocks;
    const size_t row = (size_t)n_kv_heads * d;

    float qv[MAX_PER_LANE];
    float acc[MAX_PER_LANE];
    const T *qp = q + (t * n_heads + h) * d;
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; i++) {
        const int c = lane + 32 * i;
        qv[i] = c < d ? to_f(qp[c]) * scale : 0.f;
        acc[i] = 0.f;
    }
    float m = -INFINITY;
    float l = 0.f;
    for (int kp = lo + warp; kp <= pos; kp += WARPS) {
        const size_t slot = (size_t)table[kp / block_size] * block_size + kp % block_size;
        const T *kr = k_cache + slot * row + (size_t)kvh * d;
        const T *vr = v_cache + slot * row + (size_t)kvh * d;
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; i++) {
            const int c = lane + 32 * i;
            if (c < d) s += qv[i] * to_f(kr[c]);
        }
        s = warp_sum(s);
        const float m_new = fmaxf(m, s);
        const float corr = __expf(m - m_new);
        const float p = __expf(s - m_new);
        l = l * corr + p;
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; i++) {
            const int c = lane + 32 * i;
            if (c < d) acc[i] = acc[i] * corr + p * to_f(vr[c]);
        }
        m = m_new;
    }

    __shared__ float sm_m[WARPS];
    __shared__ float sm_l[WARPS];
    __shared__ float sm_acc[WARPS][32 * MAX_PER_LANE];
    if (lane == 0) {
        sm_m[warp] = m;
        sm_l[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; i++) sm_acc[warp][lane + 32 * i] = acc[i];
    __syncthreads();
    if (warp != 0) return;
    // The warp that walked key `pos` (warp (pos - lo) % WARPS) makes the maximum finite.
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < WARPS; w++) mx = fmaxf(mx, sm_m[w]);
    float wt[WARPS];
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; w++) {
        wt[w] = sm_m[w] == -INFINITY ? 0.f : __expf(sm_m[w] - mx);
        total += sm_l[w] * wt[w];
    }
    const float inv = 1.f / total;
    T *op = out + (t * n_heads + h) * d;
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; i++) {
        const int c = lane + 32 * i;
        if (c >= d) continue;
        float o = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; w++) o += sm_acc[w][c] * wt[w];
        op[c] = from_f<T>(o * inv);
    }
}

#define INSTANTIATE(NAME, T)                                                                     \
    extern "C" __global__ void write_kv_##NAME(T *cache, const T *src, const uint32_t *slots,    \
                                               int row) {                                        \
        write_kv<T>(cache, src, slots, row);                                                     \
    }                                                                                            \
    extern "C" __global__ void rope_write_qkv_##NAME(                                           \
        T *q_out, T *k_cache, T *v_cache, const T *qkv, const T *cos, const T *sin,              \
        const uint32_t *slots, int n_heads, int n_kv_heads, int d) {                             \
        rope_write_qkv<T>(q_out, k_cache, v_cache, qkv, cos, sin, slots, n_heads, n_kv_heads,   \
                          d);                                                                    \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(32 * WARPS) paged_attention_##NAME(             \
        T *out, const T *q, const T *k_cache, const T *v_cache, const uint32_t *block_tables,    \
        const uint32_t *token_seq, const uint32_t *token_pos, int n_heads, int n_kv_heads,       \
        int d, int block_size, int max_blocks, float scale, int window) {                        \
        paged_attention<T>(out, q, k_cache, v_cache, block_tables, token_seq, token_pos,         \
                           n_heads, n_kv_heads, d, block_size, max_blocks, scale, window);       \
    }

INSTANTIATE(f32, float)
INSTANTIATE(f16, __half)
INSTANTIATE(bf16, __nv_bfloat16)

// Attention with the query heads that share a KV head taken together: one thread block of WARPS
// warps per (token, KV head) and G query heads, so each K and V row is read once per group rather
// than once per query head. Each warp walks every WARPS-th key with G online softmaxes; lanes split
// head_dim (PL values each). Same layouts and masking as paged_attention.
template <typename T, int G, int PL>
__device__ void paged_attention_gqa(T *__restrict__ out, const T *__restrict__ q,
                                    const T *__restrict__ k_cache, const T *__restrict__ v_cache,
                                    const uint32_t *__restrict__ block_tables,
                                    const uint32_t *__restrict__ token_seq,
                                    const uint32_t *__restrict__ token_pos, int n_heads,
                                    int n_kv_heads, int d, int block_size, int max_blocks,
                                    float scale, int window) {
    const size_t t = blockIdx.x;
    const int kvh = blockIdx.y;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int pos = (int)token_pos[t];
    const int lo = window > 0 ? max(0, pos + 1 - window) : 0;
    const uint32_t *table = block_tables + (size_t)token_seq[t] * max_blocks;
    const size_t row = (size_t)n_kv_heads * d;

    float qv[G][PL];
    float acc[G][PL];
    float m[G];
    float l[G];
#pragma unroll
    for (int g = 0; g < G; g++) {
        const T *qp = q + (t * n_heads + (size_t)kvh * G + g) * d;
#pragma unroll
        for (int i = 0; i < PL; i++) {
            const int c = lane + 32 * i;
            qv[g][i] = c < d ? to_f(qp[c]) * scale : 0.f;
            acc[g][i] = 0.f;
        }
        m[g] = -INFINITY;
        l[g] = 0.f;
    }
    for (int kp = lo + warp; kp <= pos; kp += WARPS) {
        const size_t slot = (size_t)table[kp / block_size] * block_size + kp % block_size;
        const T *kr = k_cache + slot * row + (size_t)kvh * d;
        const T *vr = v_cache + slot * row + (size_t)kvh * d;
        float kv[PL];
        float vv[PL];
#pragma unroll
        for (int i = 0; i < PL; i++) {
            const int c = lane + 32 * i;
            kv[i] = c < d ? to_f(kr[c]) : 0.f;
            vv[i] = c < d ? to_f(vr[c]) : 0.f;
        }
        float s[G];
#pragma unroll
        for (int g = 0; g < G; g++) {
            s[g] = 0.f;
#pragma unroll
            for (int i = 0; i < PL; i++) s[g] += qv[g][i] * kv[i];
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
            for (int g = 0; g < G; g++) s[g] += __shfl_xor_sync(0xffffffffu, s[g], o);
        }
#pragma unroll
        for (int g = 0; g < G; g++) {
            const float m_new = fmaxf(m[g], s[g]);
            const float corr = __expf(m[g] - m_new);
            const float p = __expf(s[g] - m_new);
            l[g] = l[g] * corr + p;
#pragma unroll
            for (int i = 0; i < PL; i++) acc[g][i] = acc[g][i] * corr + p * vv[i];
            m[g] = m_new;
        }
    }

    __shared__ float sm_m[WARPS][G];
    __shared__ float sm_l[WARPS][G];
    __shared__ float sm_acc[WARPS][G][32 * PL];
#pragma unroll
    for (int g = 0; g < G; g++) {
        if (lane == 0) {
            sm_m[warp][g] = m[g];
            sm_l[warp][g] = l[g];
        }
#pragma unroll
        for (int i = 0; i < PL; i++) sm_acc[warp][g][lane + 32 * i] = acc[g][i];
    }
    __syncthreads();
    // Warp w merges heads w, w + WARPS, ...; the warp that saw key `pos` makes each maximum finite.
    for (int g = warp; g < G; g += WARPS) {
        float mx = -INFINITY;
#pragma unroll
        for (int w = 0; w < WARPS; w++) mx = fmaxf(mx, sm_m[w][g]);
        float wt[WARPS];
        float total = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; w++) {
            wt[w] = sm_m[w][g] == -INFINITY ? 0.f : __expf(sm_m[w][g] - mx);
            total += sm_l[w][g] * wt[w];
        }
        const float inv = 1.f / total;
        T *op = out + (t * n_heads + (size_t)kvh * G + g) * d;
#pragma unroll
        for (int i = 0; i < PL; i++) {
            const int c = lane + 32 * i;
            if (c >= d) continue;
            float o = 0.f;
#pragma unroll
            for (int w = 0; w < WARPS; w++) o += sm_acc[w][g][c] * wt[w];
            op[c] = from_f<T>(o * inv);
        }
    }
}

#define INSTANTIATE_GQA(NAME, T, G, PL)                                                          \
    extern "C" __global__ void __launch_bounds__(32 * WARPS)                                     \
        paged_attention_gqa##G##_pl##PL##_##NAME(                                                \
            T *out, const T *q, const T *k_cache, const T *v_cache,                              \
            const uint32_t *block_tables, const uint32_t *token_seq, const uint32_t *token_pos,  \
            int n_heads, int n_kv_heads, int d, int block_size, int max_blocks, float scale,     \
            int window) {                                                                        \
        paged_attention_gqa<T, G, PL>(out, q, k_cache, v_cache, block_tables, token_seq,         \
                                      token_pos, n_heads, n_kv_heads, d, block_size, max_blocks, \
                                      scale, window);                                            \
    }

#define INSTANTIATE_GQA_ALL(NAME, T)                                                             \
    INSTANTIATE_GQA(NAME, T, 2, 2)                                                               \
    INSTANTIATE_GQA(NAME, T, 2, 4)                                                               \
    INSTANTIATE_GQA(NAME, T, 2, 8)                                                               \
    INSTANTIATE_GQA(NAME, T, 4, 2)                                                               \
    INSTANTIATE_GQA(NAME, T, 4, 4)                                                               \
    INSTANTIATE_GQA(NAME, T, 4, 8)                                                               \
    INSTANTIATE_GQA(NAME, T, 8, 2)                                                               \
    INSTANTIATE_GQA(NAME, T, 8, 4)                                                               \
    INSTANTIATE_GQA(NAME, T, 8, 8)

INSTANTIATE_GQA_ALL(f32, float)
INSTANTIATE_GQA_ALL(f16, __half)
INSTANTIATE_GQA_ALL(bf16, __nv_bfloat16)
