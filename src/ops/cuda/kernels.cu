// peft-sft's CUDA kernels: RMSNorm and SwiGLU, forward and backward, for f32 and bf16 tensors.
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

// d_gate = grad * up * s * (1 + g * (1 - s)), s = sigmoid(g); d_up = grad * g * s.
template <typename T>
__device__ void swiglu_bwd(const T* gate, const T* up, const T* grad, T* d_gate, T* d_up, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float g = load(gate, i), u = load(up, i), dy = load(grad, i);
        const float s = sigmoid(g);
        store(d_gate, i, dy * u * s * (1.0f + g * (1.0f - s)));
        store(d_up, i, dy * g * s);
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
    extern "C" __global__ void swiglu_bwd_##NAME(const T* gate, const T* up, const T* grad, T* d_gate,    \
                                                 T* d_up, int64_t n) {                                    \
        swiglu_bwd(gate, up, grad, d_gate, d_up, n);                                                      \
    }

DEFINE(f32, float)
DEFINE(bf16, __nv_bfloat16)
