// softmax_ce.cu -- cross-entropy with temperature, soft targets and label smoothing, the loss
// behind every Suave/Daino term (swapped prediction against Sinkhorn codes, DINO's
// teacher/student term, the supervised term). CPU reference: src/backend/cpu/loss.rs.
//
// For logits z [B, K] (bf16, row-major, one row per sample), targets t [B, K] (fp32: codes or
// teacher probabilities; one-hot for labels), 1/tau and label smoothing ls:
//     t'   = (1 - ls) t + ls / K,        lse_b = log sum_k exp(z_bk / tau)
//     loss = (1/B) sum_b loss_b,         loss_b = -sum_k t'_bk (z_bk / tau - lse_b)
//     dz   = dloss (p mass_b - t') / (tau B),  p = exp(z/tau - lse),  mass_b = sum_k t'_bk
// Everything in fp32; the loss is summed from the log-probabilities term by term (no
// lse*sum(t') - sum(t' z) cancellation for confident rows), as the reference does.
//
// One block per row: pass 1 is an online softmax (each thread keeps a running max and a sum
// rescaled when the max grows, merged across the block), giving lse with one read of the row;
// pass 2 forms the loss terms (and, fused, the gradient). The backward never needs the
// probabilities stored: it recomputes p = exp(z/tau - lse) from the saved lse (B floats
// instead of B x K). Row losses are written per row and averaged by ce_loss_mean in a fixed
// order, so the loss is deterministic (no float atomics).
// Launch (all row kernels): grid B, block T (multiple of 32, <= 1024; 256 on the GPU, 1024
// for K >= 16384), no dynamic shared memory.
#include "common.cuh"

// Online max/sum of exp(z/tau) over one row, combined over the block; returns lse.
__device__ __forceinline__ float row_lse(const bf16* __restrict__ z, int K, float inv_tau,
                                         float* scratch) {
    float m = -INFINITY, s = 0.f;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const float x = __bfloat162float(z[k]) * inv_tau;
        const float m2 = fmaxf(m, x);
        s = s * expf(m - m2) + expf(x - m2);   // exp(-inf - finite) = 0 on the first element
        m = m2;
    }
    const float M = block_max(m, scratch);
    const float part = (m == -INFINITY) ? 0.f : s * expf(m - M);   // idle threads add 0
    const float S = block_sum(part, scratch);
    return logf(S) + M;
}

// Row sum of the smoothed targets, sum_k t'_k = (1 - ls) sum_k t_k + ls.
__device__ __forceinline__ float row_mass(const float* __restrict__ t, int K, float keep,
                                          float ls, float* scratch) {
    float a = 0.f;
    for (int k = threadIdx.x; k < K; k += blockDim.x) a += t[k];
    return keep * block_sum(a, scratch) + ls;
}

// Forward: row_loss[b], and lse[b], mass[b] saved for the backward.
KERNEL void softmax_ce_forward(const bf16* __restrict__ z, const float* __restrict__ t,
                               float* __restrict__ row_loss, float* __restrict__ lse_out,
                               float* __restrict__ mass_out, int B, int K, float inv_tau,
                               float ls) {
    __shared__ float scratch[33];
    const int b = blockIdx.x;
    if (b >= B) return;
    const bf16* zr = z + (size_t)b * K;
    const float* tr = t + (size_t)b * K;
    const float keep = 1.f - ls, spread = ls / (float)K;
    const float lse = row_lse(zr, K, inv_tau, scratch);
    float acc = 0.f;
    for (int k = threadIdx.x; k < K; k += blockDim.x)
        acc += (keep * tr[k] + spread) * (__bfloat162float(zr[k]) * inv_tau - lse);
    const float loss = -block_sum(acc, scratch);
    const float mass = row_mass(tr, K, keep, ls, scratch);
    if (threadIdx.x == 0) {
        row_loss[b] = loss;
        lse_out[b] = lse;
        mass_out[b] = mass;
    }
}

// Backward from the saved lse and mass: dz = dloss (p mass - t') / (tau B), bf16.
KERNEL void softmax_ce_backward(const bf16* __restrict__ z, const float* __restrict__ t,
                                const float* __restrict__ lse, const float* __restrict__ mass,
                                bf16* __restrict__ dz, int B, int K, float inv_tau, float ls,
                                float dloss) {
    const int b = blockIdx.x;
    if (b >= B) return;
    const bf16* zr = z + (size_t)b * K;
    const float* tr = t + (size_t)b * K;
    bf16* dr = dz + (size_t)b * K;
    const float keep = 1.f - ls, spread = ls / (float)K;
    const float scale = dloss * inv_tau / (float)B, l = lse[b], pm = scale * mass[b];
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const float p = expf(__bfloat162float(zr[k]) * inv_tau - l);
        dr[k] = __float2bfloat16(pm * p - scale * (keep * tr[k] + spread));
    }
}

// Forward and backward in one launch, when dloss is known at forward time (the loss is the
// objective, dloss its weight): the row is read twice (lse pass, then loss and gradient).
KERNEL void softmax_ce_fused(const bf16* __restrict__ z, const float* __restrict__ t,
                             float* __restrict__ row_loss, float* __restrict__ lse_out,
                             bf16* __restrict__ dz, int B, int K, float inv_tau, float ls,
                             float dloss) {
    __shared__ float scratch[33];
    const int b = blockIdx.x;
    if (b >= B) return;
    const bf16* zr = z + (size_t)b * K;
    const float* tr = t + (size_t)b * K;
    bf16* dr = dz + (size_t)b * K;
    const float keep = 1.f - ls, spread = ls / (float)K;
    const float lse = row_lse(zr, K, inv_tau, scratch);
    const float mass = row_mass(tr, K, keep, ls, scratch);
    const float scale = dloss * inv_tau / (float)B, pm = scale * mass;
    float acc = 0.f;
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        const float logp = __bfloat162float(zr[k]) * inv_tau - lse;
        const float tp = keep * tr[k] + spread;
        acc += tp * logp;
        dr[k] = __float2bfloat16(pm * expf(logp) - scale * tp);
    }
    const float loss = -block_sum(acc, scratch);
    if (threadIdx.x == 0) {
        row_loss[b] = loss;
        lse_out[b] = lse;
    }
}

// loss = (1/B) sum_b row_loss[b], summed in a fixed order (deterministic).
// Launch: grid 1, block T (multiple of 32; 256 on the GPU).
KERNEL void ce_loss_mean(const float* __restrict__ row_loss, float* __restrict__ loss, int B) {
    __shared__ float scratch[33];
    float a = 0.f;
    for (int b = threadIdx.x; b < B; b += blockDim.x) a += row_loss[b];
    const float s = block_sum(a, scratch);
    if (threadIdx.x == 0) *loss = s / (float)B;
}
