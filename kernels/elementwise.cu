// elementwise.cu -- GELU with bias fusion, bias add, drop path, attention softmax, and the flat
// casts and adds of mixed-precision training; CPU reference: src/backend/cpu/elementwise.rs
// (gelu, add, drop path), src/backend/cpu/softmax.rs (row softmax and its backward) and, for the
// casts and adds, half::bf16's conversions and f32 addition.
//
// Storage bf16 (activations, gradients), bias fp32 (a parameter), arithmetic fp32.
// * gelu_bias_forward: y = gelu(x + b), exact erf form (PyTorch's nn.GELU() default),
//   gelu(u) = u Phi(u), Phi(u) = (1 + erf(u / sqrt 2)) / 2. The bias add of the preceding
//   Linear (cuBLASLt's bias epilogue cannot do the exact GELU's backward) is fused so that the
//   pre-activation is never stored: the backward recomputes u = x + b from x.
// * gelu_bias_backward: du = dy (Phi(u) + u phi(u)); the bias gradient is the column sum of du,
//   computed by column_sum_partial + column_sum_finish (also the backward of bias_add).
// * bias_add: y = x + b (y may be x: no __restrict__ on them).
// * drop_path: y = mask[b] ? x / (1 - p) : 0 per sample b of [B, M] (timm's drop_path with the
//   per-sample mask given); linear, so the same kernel is its own backward (on dy).
//   drop_path_add: y = r + drop_path(x), the residual branch of a ViT block in one pass; its
//   backward is dr = dy and dx = drop_path(dy).
// * attn_softmax_forward: P = softmax(scale * S) per row of [rows, N] (rows = B*H*N query
//   tokens, N = 197 keys for ViT-S/16): one warp per row, max-subtracted, fp32.
//   attn_softmax_backward: dS = scale * P (dP - sum_j P dP) per row, one warp per row.
// * Mixed-precision plumbing of a training step over flat buffers of n elements (a model's
//   parameters: 25.6 M for ResNet-50, and a concatenation of several models' can pass 2^31, so
//   these take `unsigned long long n` and loop with 64-bit indices, GRID_STRIDE_LOOP64):
//   cast_f32_bf16 (fp32 master weights -> the bf16 operand copies, round to nearest even),
//   cast_bf16_f32 (exact widening, for checks), add_bf16 (y = a + b in fp32, rounded once;
//   y may be a: the residual add / gradient sum in place), accumulate_bf16_f32 (acc += g: a bf16
//   weight gradient from cuDNN/cuBLASLt into the fp32 gradient accumulator), accumulate_f32
//   (acc += g: batch norm's fp32 dgamma/dbeta into the accumulator).
// Launches: element-wise kernels grid ceil(n / T) (or fewer: grid-stride; the flat 64-bit
// kernels cap it, see src/backend/device/elementwise.rs), block T (256 on the GPU); row kernels grid ceil(rows / (T/32)), block T (a warp per row); column sums as
// norm.cu's (block 32 columns x T/32 row lanes, grid (ceil(C/32), G)).
#include "common.cuh"

// Grid-stride loop over [0, n) with 64-bit indices, for the flat kernels whose n may pass 2^31
// (no per-element division there, so the wider index costs little).
#define GRID_STRIDE_LOOP64(i, n)                                                          \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (size_t)(n);      \
         i += (size_t)gridDim.x * blockDim.x)

#define INV_SQRT2 0.70710678118654752f
#define INV_SQRT_2PI 0.39894228040143268f

__device__ __forceinline__ float phi_cdf(float u) { return 0.5f * (1.f + erff(u * INV_SQRT2)); }
__device__ __forceinline__ float phi_pdf(float u) { return INV_SQRT_2PI * expf(-0.5f * u * u); }

// y = gelu(x + bias[c]) over [R, C]; bias may be null.
KERNEL void gelu_bias_forward(const bf16* __restrict__ x, const float* __restrict__ bias,
                              bf16* __restrict__ y, int R, int C) {
    const unsigned n = (unsigned)R * (unsigned)C;
    GRID_STRIDE_LOOP(i, n) {
        const float u = __bfloat162float(x[i]) + (bias ? bias[i % (unsigned)C] : 0.f);
        y[i] = __float2bfloat16(u * phi_cdf(u));
    }
}

// du = dy (Phi(u) + u phi(u)), u = x + bias[c] recomputed; bias may be null.
KERNEL void gelu_bias_backward(const bf16* __restrict__ dy, const bf16* __restrict__ x,
                               const float* __restrict__ bias, bf16* __restrict__ du, int R, int C) {
    const unsigned n = (unsigned)R * (unsigned)C;
    GRID_STRIDE_LOOP(i, n) {
        const float u = __bfloat162float(x[i]) + (bias ? bias[i % (unsigned)C] : 0.f);
        du[i] = __float2bfloat16(__bfloat162float(dy[i]) * (phi_cdf(u) + u * phi_pdf(u)));
    }
}

// y = x + bias[c] over [R, C] (in place allowed).
KERNEL void bias_add(const bf16* x, const float* __restrict__ bias, bf16* y, int R, int C) {
    const unsigned n = (unsigned)R * (unsigned)C;
    GRID_STRIDE_LOOP(i, n)
        y[i] = __float2bfloat16(__bfloat162float(x[i]) + bias[i % (unsigned)C]);
}

// part[g][c] = sum of a[r][c] over rows r of group g (rpb rows), fixed order: the bias
// gradient's first step. Launch: grid (ceil(C/32), G = ceil(R/rpb)), block T (multiple of 32).
KERNEL void column_sum_partial(const bf16* __restrict__ a, float* __restrict__ part, int R, int C, int rpb) {
    __shared__ float red[32][33];
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5, lanes = blockDim.x >> 5;
    const int c = blockIdx.x * 32 + tx, g = blockIdx.y;
    const int r0 = g * rpb, r1 = min(R, r0 + rpb);
    float s = 0.f;
    if (c < C)
        for (int r = r0 + ty; r < r1; r += lanes) s += __bfloat162float(a[(size_t)r * C + c]);
    red[ty][tx] = s;
    __syncthreads();
    if (ty == 0 && c < C) {
        float t = 0.f;
        for (int l = 0; l < lanes; ++l) t += red[l][tx];
        part[(size_t)g * C + c] = t;
    }
}

// out[c] = sum_g part[g][c] (fixed order). Launch: grid ceil(C / T), block T.
KERNEL void column_sum_finish(const float* __restrict__ part, float* __restrict__ out, int G, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float s = 0.f;
    for (int g = 0; g < G; ++g) s += part[(size_t)g * C + c];
    out[c] = s;
}

// y = mask[b] ? x * inv_keep : 0 over samples b of [B, M] (inv_keep = 1 / (1 - drop_prob)).
KERNEL void drop_path(const bf16* __restrict__ x, const unsigned char* __restrict__ mask,
                      float inv_keep, bf16* __restrict__ y, int B, int M) {
    const unsigned n = (unsigned)B * (unsigned)M;
    GRID_STRIDE_LOOP(i, n)
        y[i] = __float2bfloat16(mask[i / (unsigned)M] ? __bfloat162float(x[i]) * inv_keep : 0.f);
}

// y = r + drop_path(x) (y may be r).
KERNEL void drop_path_add(const bf16* r, const bf16* __restrict__ x,
                          const unsigned char* __restrict__ mask, float inv_keep, bf16* y, int B,
                          int M) {
    const unsigned n = (unsigned)B * (unsigned)M;
    GRID_STRIDE_LOOP(i, n) {
        const float d = mask[i / (unsigned)M] ? __bfloat162float(x[i]) * inv_keep : 0.f;
        y[i] = __float2bfloat16(__bfloat162float(r[i]) + d);
    }
}

// P = softmax(scale * S) per row of [rows, N]; a warp per row.
KERNEL void attn_softmax_forward(const bf16* __restrict__ S, bf16* __restrict__ P, int rows, int N,
                                 float scale) {
    const int row = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    const bf16* s = S + (size_t)row * N;
    float m = -INFINITY;
    for (int j = lane; j < N; j += 32) m = fmaxf(m, __bfloat162float(s[j]) * scale);
    m = warp_max(m);
    float sum = 0.f;
    for (int j = lane; j < N; j += 32) sum += expf(__bfloat162float(s[j]) * scale - m);
    const float inv = 1.f / warp_sum(sum);
    for (int j = lane; j < N; j += 32)
        P[(size_t)row * N + j] = __float2bfloat16(expf(__bfloat162float(s[j]) * scale - m) * inv);
}

// dS = scale * P (dP - sum_j P dP) per row; a warp per row.
KERNEL void attn_softmax_backward(const bf16* __restrict__ dP, const bf16* __restrict__ P,
                                  bf16* __restrict__ dS, int rows, int N, float scale) {
    const int row = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    const size_t o = (size_t)row * N;
    float dot = 0.f;
    for (int j = lane; j < N; j += 32) dot += __bfloat162float(P[o + j]) * __bfloat162float(dP[o + j]);
    dot = warp_sum(dot);
    for (int j = lane; j < N; j += 32)
        dS[o + j] = __float2bfloat16(scale * __bfloat162float(P[o + j]) * (__bfloat162float(dP[o + j]) - dot));
}

// y = bf16(x), round to nearest even, over n elements.
KERNEL void cast_f32_bf16(const float* __restrict__ x, bf16* __restrict__ y, unsigned long long n) {
    GRID_STRIDE_LOOP64(i, n) y[i] = __float2bfloat16(x[i]);
}

// y = float(x) (exact) over n elements.
KERNEL void cast_bf16_f32(const bf16* __restrict__ x, float* __restrict__ y, unsigned long long n) {
    GRID_STRIDE_LOOP64(i, n) y[i] = __bfloat162float(x[i]);
}

// y = a + b in fp32, rounded once (y may be a: no __restrict__ on them).
KERNEL void add_bf16(const bf16* a, const bf16* __restrict__ b, bf16* y, unsigned long long n) {
    GRID_STRIDE_LOOP64(i, n) y[i] = __float2bfloat16(__bfloat162float(a[i]) + __bfloat162float(b[i]));
}

// acc += float(g) over n elements.
KERNEL void accumulate_bf16_f32(const bf16* __restrict__ g, float* __restrict__ acc,
                                unsigned long long n) {
    GRID_STRIDE_LOOP64(i, n) acc[i] += __bfloat162float(g[i]);
}

// acc += g over n elements.
KERNEL void accumulate_f32(const float* __restrict__ g, float* __restrict__ acc, unsigned long long n) {
    GRID_STRIDE_LOOP64(i, n) acc[i] += g[i];
}
