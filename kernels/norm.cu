// norm.cu -- normalisation kernels; CPU reference: src/backend/cpu/norm.rs.
//
// Storage: activations and their gradients bf16; statistics, gamma/beta and master weights fp32;
// all arithmetic fp32 (the final mean/var of batch norm in double: C values only).
//
// * L2 normalisation (F.normalize over the last dim), rows [R, D] with D small (128-2048):
//   one warp per row (the row stays in L1 between its reduction and its write).
//     y = x / max(|x|, 1e-12);  dx = (dy - x (x.dy) / n^2) / n, or dy / 1e-12 where clamped.
// * Prototype renormalisation: rows of the fp32 weight [K, D] to unit norm in place (SwAV does
//   it under no_grad every step), optionally writing the bf16 copy the GEMM reads, same pass.
// * Batch norm over NHWC viewed as [R = N*H*W, C] (channels contiguous). Statistics are column
//   sums, split for SyncBatchNorm:
//     bn_stats_partial: block (32 channels) x (T/32 row lanes), grid (ceil(C/32), G); each
//       block sums rows [g*rpb, (g+1)*rpb) of its 32 channels, reduces its row lanes through
//       shared memory in a fixed order and writes part[2][G][C] (sum, sumsq): no atomics, so
//       the result is deterministic; a warp reads 32 consecutive channels of one row.
//     sum_partials2: part[2][G][C] -> out0[C], out1[C], summed over g in order.
//     (all-reduce sum/sumsq across ranks here for SyncBN)
//     bn_finalize: mean, invstd = 1/sqrt(var + eps) (biased var, in double) and the running
//       statistics update of PyTorch (momentum; unbiased variance).
//     bn_apply: y = relu?(x*scale + shift + residual?) with scale = gamma*invstd,
//       shift = beta - mean*scale (one read of x (and r), one write of y).
//   Backward, same split: bn_backward_partial (sum dy', sum dy'(x - mean), where dy' = dy masked
//   by y > 0 when the forward fused a ReLU: the mask comes from the saved output, which also
//   covers the residual case) -> sum_partials2 -> bn_param_grads (dgamma, dbeta from the LOCAL
//   sums) -> all-reduce -> bn_backward_apply (dx; also d residual = dy' when asked).
//     training: dx = gamma invstd (dy' - sdy/n - (x - mean) invstd^2 sdxmu/n)
//     eval:     dx = gamma invstd dy'
// * Layer norm over the last dim D (384 for ViT-S): one warp per row, mean then variance of the
//   deviations (two passes over an L1-resident row, no cancellation). Backward: dx per row by a
//   warp; dgamma/dbeta accumulated per warp in dynamic shared memory, reduced over the block's
//   warps in order into part[2][G][D], then sum_partials2 (deterministic).
#include "common.cuh"

#define L2_EPS 1e-12f

// 1 / max(n, 1e-12), except that a NaN norm stays NaN (fmaxf would drop it and hide the NaN).
__device__ __forceinline__ float inv_clamped_norm(float n) {
    return (n != n) ? n : 1.f / fmaxf(n, L2_EPS);
}

// ---------------------------------------------------------------- L2 normalisation

// Launch: grid ceil(R / (T/32)), block T (multiple of 32; 256 on the GPU): a warp per row.
KERNEL void l2norm_forward(const bf16* __restrict__ x, bf16* __restrict__ y,
                           float* __restrict__ norm, int R, int D) {
    const int row = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
    if (row >= R) return;
    const bf16* xr = x + (size_t)row * D;
    float ss = 0.f;
    for (int d = lane; d < D; d += 32) {
        const float v = __bfloat162float(xr[d]);
        ss += v * v;
    }
    const float n = sqrtf(warp_sum(ss));
    const float inv = inv_clamped_norm(n);
    for (int d = lane; d < D; d += 32) y[(size_t)row * D + d] = __float2bfloat16(__bfloat162float(xr[d]) * inv);
    if (lane == 0) norm[row] = n;
}

// Launch: as l2norm_forward.
KERNEL void l2norm_backward(const bf16* __restrict__ dy, const bf16* __restrict__ x,
                            const float* __restrict__ norm, bf16* __restrict__ dx, int R, int D) {
    const int row = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
    if (row >= R) return;
    const size_t o = (size_t)row * D;
    const float n = norm[row];
    if (!(n > L2_EPS)) {   // clamped: y = x / 1e-12 is linear; a NaN norm gives NaN dx
        const float k = (n != n) ? n : 1.f / L2_EPS;
        for (int d = lane; d < D; d += 32) dx[o + d] = __float2bfloat16(__bfloat162float(dy[o + d]) * k);
        return;
    }
    float dot = 0.f;
    for (int d = lane; d < D; d += 32) dot += __bfloat162float(x[o + d]) * __bfloat162float(dy[o + d]);
    dot = warp_sum(dot);
    const float inv = 1.f / n, c = dot * inv * inv;
    for (int d = lane; d < D; d += 32)
        dx[o + d] = __float2bfloat16((__bfloat162float(dy[o + d]) - __bfloat162float(x[o + d]) * c) * inv);
}

// Rows of the fp32 prototype weight w [K, D] to unit norm in place (x / max(|x|, 1e-12)); when
// w_bf16 is not null, also writes the bf16 copy. Launch: as l2norm_forward with R = K.
KERNEL void prototypes_renorm(float* __restrict__ w, bf16* __restrict__ w_bf16, int K, int D) {
    const int row = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
    if (row >= K) return;
    float* wr = w + (size_t)row * D;
    float ss = 0.f;
    for (int d = lane; d < D; d += 32) ss += wr[d] * wr[d];
    const float inv = inv_clamped_norm(sqrtf(warp_sum(ss)));
    for (int d = lane; d < D; d += 32) {
        const float v = wr[d] * inv;
        wr[d] = v;
        if (w_bf16) w_bf16[(size_t)row * D + d] = __float2bfloat16(v);
    }
}

// ---------------------------------------------------------------- batch norm

// Column partial sums of f(row, c) over this block's rows; MODE 0: (x, x^2);
// MODE 1: (dy', dy' (x - mean)). Writes part[0][g][c], part[1][g][c].
template <int MODE>
__device__ __forceinline__ void column_partials(const bf16* __restrict__ a, const bf16* __restrict__ x,
                                                const bf16* __restrict__ y, const float* __restrict__ mean,
                                                float* __restrict__ part, int R, int C, int rpb) {
    __shared__ float red[2][32][33];
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5, lanes = blockDim.x >> 5;
    const int c = blockIdx.x * 32 + tx, g = blockIdx.y;
    const int r0 = g * rpb, r1 = min(R, r0 + rpb);
    float s0 = 0.f, s1 = 0.f;
    if (c < C) {
        const float mu = MODE == 1 ? mean[c] : 0.f;
        for (int r = r0 + ty; r < r1; r += lanes) {
            const size_t i = (size_t)r * C + c;
            if (MODE == 0) {
                const float v = __bfloat162float(a[i]);
                s0 += v;
                s1 += v * v;
            } else {
                float g1 = __bfloat162float(a[i]);
                if (y && !(__bfloat162float(y[i]) > 0.f)) g1 = 0.f;
                s0 += g1;
                s1 += g1 * (__bfloat162float(x[i]) - mu);
            }
        }
    }
    red[0][ty][tx] = s0;
    red[1][ty][tx] = s1;
    __syncthreads();
    if (ty == 0 && c < C) {
        float t0 = 0.f, t1 = 0.f;
        for (int l = 0; l < lanes; ++l) {
            t0 += red[0][l][tx];
            t1 += red[1][l][tx];
        }
        part[(size_t)g * C + c] = t0;
        part[((size_t)gridDim.y + g) * C + c] = t1;
    }
}

// Per-channel partial (sum x, sum x^2) of x [R, C] over row groups of rpb rows.
// Launch: grid (ceil(C/32), G = ceil(R/rpb)), block T (multiple of 32, <= 1024; 256 on the GPU,
// rpb ~ 256..1024), no dynamic shared memory; part has 2*G*C floats.
KERNEL void bn_stats_partial(const bf16* __restrict__ x, float* __restrict__ part, int R, int C, int rpb) {
    column_partials<0>(x, nullptr, nullptr, nullptr, part, R, C, rpb);
}

// out0[c] = sum_g part[0][g][c], out1[c] = sum_g part[1][g][c] (fixed order).
// Launch: grid ceil(C / T), block T (256 on the GPU).
KERNEL void sum_partials2(const float* __restrict__ part, float* __restrict__ out0,
                          float* __restrict__ out1, int G, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float a = 0.f, b = 0.f;
    for (int g = 0; g < G; ++g) {
        a += part[(size_t)g * C + c];
        b += part[((size_t)G + g) * C + c];
    }
    out0[c] = a;
    out1[c] = b;
}

// Mean and invstd from (all-reduced) sums over `count` values per channel; updates the running
// statistics (momentum; unbiased variance) in place. Launch: grid ceil(C / T), block T.
KERNEL void bn_finalize(const float* __restrict__ sum, const float* __restrict__ sumsq, int C,
                        float count, float eps, float momentum, float* __restrict__ running_mean,
                        float* __restrict__ running_var, float* __restrict__ mean,
                        float* __restrict__ invstd) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const double n = count, mu = (double)sum[c] / n;
    double var = (double)sumsq[c] / n - mu * mu;
    var = var > 0.0 ? var : 0.0;
    mean[c] = (float)mu;
    invstd[c] = (float)(1.0 / sqrt(var + (double)eps));
    const double m = momentum;
    running_mean[c] = (float)((1.0 - m) * running_mean[c] + m * mu);
    running_var[c] = (float)((1.0 - m) * running_var[c] + m * var * n / (n - 1.0));
}

// y = relu?(x*scale + shift + residual?) over [R, C]; residual may be null.
// Launch: grid ceil(R*C / T) (or fewer: grid-stride), block T (256 on the GPU).
KERNEL void bn_apply(const bf16* __restrict__ x, const bf16* __restrict__ residual,
                     const float* __restrict__ mean, const float* __restrict__ invstd,
                     const float* __restrict__ gamma, const float* __restrict__ beta,
                     bf16* __restrict__ y, int R, int C, int relu) {
    const unsigned n = (unsigned)R * (unsigned)C;
    GRID_STRIDE_LOOP(i, n) {
        const int c = (int)(i % (unsigned)C);
        const float scale = gamma[c] * invstd[c], shift = beta[c] - mean[c] * scale;
        float v = __bfloat162float(x[i]) * scale + shift;
        if (residual) v += __bfloat162float(residual[i]);
        if (relu && v <= 0.f) v = 0.f;   // NaN stays NaN, as torch.relu
        y[i] = __float2bfloat16(v);
    }
}

// Per-channel partial (sum dy', sum dy' (x - mean)); y = the forward output when it fused a
// ReLU (mask y > 0), else null. Launch: as bn_stats_partial.
KERNEL void bn_backward_partial(const bf16* __restrict__ dy, const bf16* __restrict__ x,
                                const bf16* __restrict__ y, const float* __restrict__ mean,
                                float* __restrict__ part, int R, int C, int rpb) {
    column_partials<1>(dy, x, y, mean, part, R, C, rpb);
}

// dgamma = invstd * sum dy'(x - mean), dbeta = sum dy' (from the LOCAL sums).
// Launch: grid ceil(C / T), block T.
KERNEL void bn_param_grads(const float* __restrict__ sum_dy, const float* __restrict__ sum_dy_xmu,
                           const float* __restrict__ invstd, float* __restrict__ dgamma,
                           float* __restrict__ dbeta, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    dgamma[c] = sum_dy_xmu[c] * invstd[c];
    dbeta[c] = sum_dy[c];
}

// dx (and d residual = dy' when dres is not null) from the (all-reduced) sums over `count`
// values; training = 0 treats the statistics as constants. Launch: as bn_apply.
KERNEL void bn_backward_apply(const bf16* __restrict__ dy, const bf16* __restrict__ x,
                              const bf16* __restrict__ y, const float* __restrict__ mean,
                              const float* __restrict__ invstd, const float* __restrict__ gamma,
                              const float* __restrict__ sum_dy, const float* __restrict__ sum_dy_xmu,
                              float count, bf16* __restrict__ dx, bf16* __restrict__ dres, int R,
                              int C, int training) {
    const unsigned n = (unsigned)R * (unsigned)C;
    GRID_STRIDE_LOOP(i, n) {
        const int c = (int)(i % (unsigned)C);
        float g = __bfloat162float(dy[i]);
        if (y && !(__bfloat162float(y[i]) > 0.f)) g = 0.f;
        const float is = invstd[c], k = gamma[c] * is;
        float d;
        if (training) {
            const float inv_n = 1.f / count;
            d = k * (g - sum_dy[c] * inv_n - (__bfloat162float(x[i]) - mean[c]) * is * is * sum_dy_xmu[c] * inv_n);
        } else {
            d = k * g;
        }
        dx[i] = __float2bfloat16(d);
        if (dres) dres[i] = __float2bfloat16(g);
    }
}

// ---------------------------------------------------------------- layer norm

// y = (x - mean) rstd gamma + beta per row of [R, D]; saves mean[R], rstd[R].
// Launch: grid ceil(R / (T/32)), block T (256 on the GPU): a warp per row.
KERNEL void layernorm_forward(const bf16* __restrict__ x, const float* __restrict__ gamma,
                              const float* __restrict__ beta, bf16* __restrict__ y,
                              float* __restrict__ mean, float* __restrict__ rstd, int R, int D,
                              float eps) {
    const int row = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
    if (row >= R) return;
    const bf16* xr = x + (size_t)row * D;
    float s = 0.f;
    for (int d = lane; d < D; d += 32) s += __bfloat162float(xr[d]);
    const float mu = warp_sum(s) / (float)D;
    float v = 0.f;
    for (int d = lane; d < D; d += 32) {
        const float t = __bfloat162float(xr[d]) - mu;
        v += t * t;
    }
    const float rs = 1.f / sqrtf(warp_sum(v) / (float)D + eps);
    for (int d = lane; d < D; d += 32)
        y[(size_t)row * D + d] = __float2bfloat16((__bfloat162float(xr[d]) - mu) * rs * gamma[d] + beta[d]);
    if (lane == 0) {
        mean[row] = mu;
        rstd[row] = rs;
    }
}

// dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dy gamma, per row (a warp each); block
// partials of dgamma = sum dy xhat and dbeta = sum dy over this block's rows into part[2][G][D]
// (then sum_partials2). Rows of block g: [g*rpb, (g+1)*rpb), warps take every (T/32)-th row.
// Launch: grid G = ceil(R / rpb), block T (256 on the GPU), dynamic shared 2 * (T/32) * D floats.
KERNEL void layernorm_backward(const bf16* __restrict__ dy, const bf16* __restrict__ x,
                               const float* __restrict__ gamma, const float* __restrict__ mean,
                               const float* __restrict__ rstd, bf16* __restrict__ dx,
                               float* __restrict__ part, int R, int D, int rpb) {
    DYN_SHARED(float, acc);   // [nwarps][2][D]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    float* mine = acc + (size_t)warp * 2 * D;
    for (int d = lane; d < 2 * D; d += 32) mine[d] = 0.f;
    const int r0 = blockIdx.x * rpb, r1 = min(R, r0 + rpb);
    for (int row = r0 + warp; row < r1; row += nwarps) {
        const size_t o = (size_t)row * D;
        const float mu = mean[row], rs = rstd[row];
        float sg = 0.f, sgx = 0.f;
        for (int d = lane; d < D; d += 32) {
            const float g = __bfloat162float(dy[o + d]) * gamma[d];
            const float xh = (__bfloat162float(x[o + d]) - mu) * rs;
            sg += g;
            sgx += g * xh;
        }
        sg = warp_sum(sg) / (float)D;
        sgx = warp_sum(sgx) / (float)D;
        for (int d = lane; d < D; d += 32) {
            const float gy = __bfloat162float(dy[o + d]);
            const float xh = (__bfloat162float(x[o + d]) - mu) * rs;
            dx[o + d] = __float2bfloat16(rs * (gy * gamma[d] - sg - xh * sgx));
            mine[d] += gy * xh;
            mine[D + d] += gy;
        }
    }
    __syncthreads();
    for (int d = threadIdx.x; d < 2 * D; d += blockDim.x) {
        float t = 0.f;
        for (int w = 0; w < nwarps; ++w) t += acc[(size_t)w * 2 * D + d];
        const int which = d / D, col = d % D;
        part[((size_t)which * gridDim.x + blockIdx.x) * D + col] = t;
    }
}
