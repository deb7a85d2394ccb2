// peft-sft's CUDA kernels: RMSNorm, SwiGLU and RoPE, forward and backward, for f32 and bf16
// tensors, the loss's fused row pass over f32 logits, and 4-bit (NF4/FP4) dequantization.
// Compiled to PTX by build.rs (the `cuda` feature) with the pinned nvcc and loaded through
// candle's custom-module cache (`ops/cuda/mod.rs`). Arithmetic is in f32 whatever the storage
// type, as the composed candle path does; bf16 values are rounded once, on store.
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16(v); }

// Sum of `v` over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ float block_sum(float v) {
    __shared__ float warp_sums[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    const int warps = blockDim.x / 32;
    float total = lane < warps ? warp_sums[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffff, total, o);
    __syncthreads();  // warp_sums is reused by the next call
    return total;
}

// out[r, :] = w * x[r, :] / sqrt(mean(x[r, :]^2) + eps); one block per row.
template <typename T>
__device__ void rms_norm_fwd(const T* x, const T* w, T* out, int64_t d, float eps) {
    const int64_t row = blockIdx.x;
    const T* xr = x + row * d;
    T* orow = out + row * d;
    float ss = 0.0f;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
        const float v = load(xr, j);
        ss += v * v;
    }
    const float inv_rms = rsqrtf(block_sum(ss) / (float)d + eps);
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) store(orow, j, load(w, j) * (load(xr, j) * inv_rms));
}

// The input gradient: dx = inv_rms * (g*w - x_hat * mean(g*w*x_hat)), x_hat = x * inv_rms.
template <typename T>
__device__ void rms_norm_bwd(const T* x, const T* w, const T* g, T* dx, int64_t d, float eps) {
    const int64_t row = blockIdx.x;
    const T* xr = x + row * d;
    const T* gr = g + row * d;
    T* dr = dx + row * d;
    float ss = 0.0f, dot = 0.0f;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
        const float v = load(xr, j);
        ss += v * v;
        dot += load(gr, j) * load(w, j) * v;
    }
    const float inv_rms = rsqrtf(block_sum(ss) / (float)d + eps);
    // mean(g*w*x_hat) = inv_rms * mean(g*w*x)
    const float mean_gwx = block_sum(dot) / (float)d * inv_rms;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
        const float x_hat = load(xr, j) * inv_rms;
        store(dr, j, inv_rms * (load(gr, j) * load(w, j) - x_hat * mean_gwx));
    }
}

__device__ __forceinline__ float sigmoid(float v) { return 1.0f / (1.0f + __expf(-v)); }

template <typename T>
__device__ void swiglu_fwd(const T* gate, const T* up, T* out, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float g = load(gate, i);
        store(out, i, g * sigmoid(g) * load(up, i));
    }
}

// d_gate = grad * up * s * (1 + g * (1 - s)), s = sigmoid(g); d_up = grad * g * s: d_gate into
// out[0, n), d_up into out[n, 2n).
template <typename T>
__device__ void swiglu_bwd(const T* gate, const T* up, const T* grad, T* out, int64_t n) {
    T* d_gate = out;
    T* d_up = out + n;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float g = load(gate, i), u = load(up, i), dy = load(grad, i);
        const float s = sigmoid(g);
        store(d_gate, i, dy * u * s * (1.0f + g * (1.0f - s)));
        store(d_up, i, dy * g * s);
    }
}


// RoPE ("rotate half") on token-major rows x [b, t, heads, d], or its inverse (sign -1):
// out1 = x1 cos - sign x2 sin, out2 = x2 cos + sign x1 sin over the two halves of each head.
// cos/sin: [rows, d/2] shared by the batch, or [b, rows, d/2] (`batched`), rows >= t.
template <typename T>
__device__ void rope_tokens(const T* x, const T* cos, const T* sin, T* out, int64_t t, int64_t heads,
                            int64_t d, int64_t rows, int batched, float sign, int64_t pairs) {
    const int64_t half = d / 2;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < pairs; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t j = i % half;
        const int64_t head_token = i / half;          // token * heads + head
        const int64_t token = head_token / heads;     // bi * t + ti
        const int64_t bi = token / t, ti = token % t;
        const int64_t row = (batched ? bi * rows + ti : ti) * half + j;
        const float c = load(cos, row), s = sign * load(sin, row);
        const int64_t base = head_token * d + j;
        const float x1 = load(x, base), x2 = load(x, base + half);
        store(out, base, x1 * c - x2 * s);
        store(out, base + half, x2 * c + x1 * s);
    }
}

// The maximum of (value, index) pairs over the block, the smaller index on ties; every thread
// gets it.
__device__ void block_argmax(float& v, int64_t& idx) {
    __shared__ float vals[32];
    __shared__ int64_t idxs[32];
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffff, v, o);
        const int64_t oi = __shfl_xor_sync(0xffffffff, idx, o);
        if (ov > v || (ov == v && oi < idx)) { v = ov; idx = oi; }
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) { vals[warp] = v; idxs[warp] = idx; }
    __syncthreads();
    const int warps = blockDim.x / 32;
    v = lane < warps ? vals[lane] : -INFINITY;
    idx = lane < warps ? idxs[lane] : INT64_MAX;
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffff, v, o);
        const int64_t oi = __shfl_xor_sync(0xffffffff, idx, o);
        if (ov > v || (ov == v && oi < idx)) { v = ov; idx = oi; }
    }
    __syncthreads();
}

// The loss's pass over one row of f32 logits [vocab] (one block per row): the weighted token
// cross-entropy, whether the argmax hits the target (weighted), the weighted predictive entropy
// -> stats[row * 3 + 0..3]; with `grad`, the row's gradient (softmax - onehot(target)) * loss_w
// -> grad[row * vocab ..]. out holds grad (rows * vocab values, when asked) then the stats.
extern "C" __global__ void ce_rows_f32(const float* logits, const uint32_t* ids, const float* loss_w,
                                       const float* ent_w, float* out, int64_t vocab, int64_t rows,
                                       int grad, int dft) {
    const int64_t row = blockIdx.x;
    const float* l = logits + row * vocab;
    float m = -INFINITY;
    int64_t arg = INT64_MAX;
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
        const float v = l[j];
        if (v > m || (v == m && j < arg)) { m = v; arg = j; }
    }
    block_argmax(m, arg);
    float se = 0.0f, sel = 0.0f;
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
        const float e = __expf(l[j] - m);
        se += e;
        sel += e * l[j];
    }
    se = block_sum(se);
    sel = block_sum(sel);
    const float lse = m + logf(se);
    const uint32_t target = ids[row];
    // TRL's DFT weighs the token's loss and gradient by its (detached) probability.
    const float w = loss_w[row] * (dft ? expf(l[target] - lse) : 1.0f);
    if (threadIdx.x == 0) {
        float* stats = out + (grad ? rows * vocab : 0) + row * 3;
        stats[0] = (lse - l[target]) * w;
        stats[1] = (int64_t)target == arg ? loss_w[row] : 0.0f;
        stats[2] = (lse - sel / se) * ent_w[row];
    }
    if (grad) {
        float* g = out + row * vocab;
        const float inv = 1.0f / se;
        for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
            const float p = __expf(l[j] - m) * inv;
            g[j] = (p - ((int64_t)target == j ? 1.0f : 0.0f)) * w;
        }
    }
}

// bitsandbytes' 4-bit dequantization: value i = code[nibble i] * absmax[i / blocksize], the first
// value of each byte in its high nibble; one rounding to the output type, as the CPU path (no
// fused multiply-add to differ from it).
template <typename T>
__device__ void dequant_4bit(const uint8_t* packed, const float* absmax, const float* code, T* out,
                             int64_t n, int64_t blocksize) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const uint8_t byte = packed[i / 2];
        const int c = (i & 1) ? (byte & 0x0f) : (byte >> 4);
        store(out, i, __fmul_rn(code[c], absmax[i / blocksize]));
    }
}

#define DEFINE(NAME, T)                                                                                   \
    extern "C" __global__ void rms_norm_fwd_##NAME(const T* x, const T* w, T* out, int64_t d, float eps) { \
        rms_norm_fwd(x, w, out, d, eps);                                                                  \
    }                                                                                                     \
    extern "C" __global__ void rms_norm_bwd_##NAME(const T* x, const T* w, const T* g, T* dx, int64_t d,  \
                                                   float eps) {                                           \
        rms_norm_bwd(x, w, g, dx, d, eps);                                                                \
    }                                                                                                     \
    extern "C" __global__ void swiglu_fwd_##NAME(const T* gate, const T* up, T* out, int64_t n) {         \
        swiglu_fwd(gate, up, out, n);                                                                     \
    }                                                                                                     \
    extern "C" __global__ void swiglu_bwd_##NAME(const T* gate, const T* up, const T* grad, T* out,       \
                                                 int64_t n) {                                             \
        swiglu_bwd(gate, up, grad, out, n);                                                               \
    }                                                                                                     \
    extern "C" __global__ void rope_tokens_##NAME(const T* x, const T* cos, const T* sin, T* out,         \
                                                  int64_t t, int64_t heads, int64_t d, int64_t rows,      \
                                                  int batched, float sign, int64_t pairs) {               \
        rope_tokens(x, cos, sin, out, t, heads, d, rows, batched, sign, pairs);                           \
    }                                                                                                     \
    extern "C" __global__ void dequant_4bit_##NAME(const uint8_t* packed, const float* absmax,            \
                                                   const float* code, T* out, int64_t n,                  \
                                                   int64_t blocksize) {                                   \
        dequant_4bit(packed, absmax, code, out, n, blocksize);                                            \
    }

DEFINE(f32, float)
DEFINE(bf16, __nv_bfloat16)
