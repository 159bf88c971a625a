// optim.cu -- optimiser-side kernels: multi-tensor LARS (Suave) and AdamW (Daino), the DINO
// teacher EMA, and the DINO centre update. CPU references: src/optim/lars.rs,
// src/optim/adamw.rs, src/optim/ema.rs, src/methods/dino_loss.rs (DinoCenter).
//
// Precision (DESIGN.md): fp32 master weights and fp32 optimizer state; every update is computed
// in f32 with the CPU reference's operation order, so the CPU shim reproduces the CPU backend to
// the last bit except where a sum is reordered. Norms and the centre's column sums are
// accumulated in f64 like the CPU reference (exact squares of f32 values, then an f64 sum), so a
// tensor whose norm is zero in f64 is zero here too and LARS takes the same branch. An optional
// bf16 shadow of each updated tensor is written in the same pass (the copy the bf16 forward pass
// reads), saving a separate cast kernel and a read of the fp32 weights.
//
// Multi-tensor layout (apex's multi_tensor_apply, reshaped): the host builds a table of
// per-tensor descriptors in device memory (pointers as 64-bit integers, element counts,
// per-tensor hyper-parameters) and cuts every tensor into chunks of `chunk` elements. Tensor t
// owns the chunks chunk0[t] .. chunk0[t] + ceil(n[t] / chunk) - 1, chunk0 being the prefix sum of
// the chunk counts; one block handles one chunk and finds its tensor by a binary search over
// chunk0 (8 steps for ResNet-50's 161 tensors), so one launch covers the whole model with no
// per-block table and no idle blocks. The grid is the total number of chunks. Within a chunk,
// thread i handles elements i, i + blockDim.x, ... (coalesced). The tables are rewritten by the
// host when a hyper-parameter changes (one small async copy per step; pointers stay), so the
// kernels have no host synchronisation and can be captured in a CUDA graph.
//
// LARS needs the norms of the whole tensor before any element is updated: `lars_norms` writes
// per-chunk partial sums of p^2 and g^2 (f64) to `partial[2 * chunk]`, then `lars_update` has each
// block re-sum its own tensor's partials (a few hundred values at most) before updating its
// chunk. Two launches, no atomics, deterministic: the result does not depend on block order.

#include "common.cuh"

namespace optim_detail {

// One tensor of a LARS step. 56 bytes; the Rust mirror is `LarsTensor` (repr(C)).
struct LarsTensor {
    unsigned long long param;       // float*: fp32 master weights, updated in place
    unsigned long long grad;        // const float*: the accumulated gradient
    unsigned long long mom;         // float*: momentum buffer, ZERO before the first step
    unsigned long long param_bf16;  // __nv_bfloat16*: bf16 shadow written after the update, or 0
    long long n;                    // elements
    int chunk0;                     // first chunk of this tensor
    float lr;                       // learning rate of this step
    float weight_decay;             // weight decay (Suave: on every parameter)
    int pad_;
};

// One tensor of an AdamW step. 64 bytes; the Rust mirror is `AdamWTensor`. The three scalars are
// computed by the host in f64 from the tensor's group (lr, wd) and its own step count k, then
// rounded to f32, exactly as src/optim/adamw.rs does.
struct AdamWTensor {
    unsigned long long param, grad, exp_avg, exp_avg_sq;  // float*; the moments start at zero
    unsigned long long param_bf16;                        // bf16 shadow, or 0
    long long n;
    int chunk0;
    float decay;      // 1 - lr * wd
    float step_size;  // lr / (1 - beta1^k)
    float bc2_sqrt;   // sqrt(1 - beta2^k)
};

// One tensor pair of the teacher EMA. 40 bytes; the Rust mirror is `EmaTensor`.
struct EmaTensor {
    unsigned long long teacher;       // float*, updated in place
    unsigned long long student;       // const float*
    unsigned long long teacher_bf16;  // bf16 shadow of the teacher, or 0
    long long n;
    int chunk0;
    int pad_;
};

// The tensor owning chunk `c`: the last t with tab[t].chunk0 <= c (tab sorted by chunk0).
template <class Tab>
__device__ __forceinline__ int find_tensor(const Tab* tab, int ntensors, int c) {
    int lo = 0, hi = ntensors - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (tab[mid].chunk0 <= c) lo = mid; else hi = mid - 1;
    }
    return lo;
}

__device__ __forceinline__ double warp_sum_f64(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum of v over the block (blockDim.x a multiple of 32, at most 1024), returned to every thread.
__device__ double block_sum_f64(double v, double* scratch /* [32] shared */) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum_f64(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    const int nwarps = blockDim.x >> 5;
    double r = ((int)threadIdx.x < nwarps) ? scratch[threadIdx.x] : 0.0;
    if (warp == 0) r = warp_sum_f64(r);
    if (threadIdx.x == 0) scratch[0] = r;
    __syncthreads();
    r = scratch[0];
    __syncthreads();  // scratch reusable afterwards
    return r;
}

}  // namespace optim_detail

// ------------------------------------------------------------------------------------------
// LARS, pass 1: per-chunk partial sums of squares.
// grid (total chunks), block (multiple of 32, 256 recommended); partial: f64 [2 * total chunks],
// partial[2c] = sum p^2, partial[2c + 1] = sum g^2 over chunk c.
KERNEL void lars_norms(const optim_detail::LarsTensor* __restrict__ tab, int ntensors, int chunk,
                       double* __restrict__ partial) {
    using namespace optim_detail;
    __shared__ double scratch[32];
    const int c = blockIdx.x;
    const LarsTensor& d = tab[find_tensor(tab, ntensors, c)];
    const long long start = (long long)(c - d.chunk0) * chunk;
    const long long end = min(start + (long long)chunk, d.n);
    const float* p = (const float*)d.param;
    const float* g = (const float*)d.grad;
    double ps = 0.0, gs = 0.0;
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        const double pv = p[i], gv = g[i];
        ps += pv * pv;  // exact: a squared f32 fits in an f64 mantissa
        gs += gv * gv;
    }
    ps = block_sum_f64(ps, scratch);
    gs = block_sum_f64(gs, scratch);
    if (threadIdx.x == 0) {
        partial[2 * c] = ps;
        partial[2 * c + 1] = gs;
    }
}

// LARS, pass 2: trust ratio from the tensor's norms, then the momentum update (src/optim/lars.rs):
//   if |p| != 0 and |g| != 0: lambda = eta |p| / (|g| + wd |p| + eps), d = (g + wd p) lambda
//   else d = g (no weight decay: apex adds it only in the adaptive branch)
//   buf = momentum buf + d   (buf starts at zero, so step 1 gives buf = d like torch's clone)
//   p -= lr buf
// Same grid, block and chunk as lars_norms.
KERNEL void lars_update(const optim_detail::LarsTensor* __restrict__ tab, int ntensors, int chunk,
                        const double* __restrict__ partial, float momentum, float eta, float eps) {
    using namespace optim_detail;
    __shared__ double scratch[32];
    const int c = blockIdx.x;
    const LarsTensor& d = tab[find_tensor(tab, ntensors, c)];
    const int nch = (int)((d.n + chunk - 1) / chunk);
    double ps = 0.0, gs = 0.0;
    for (int j = threadIdx.x; j < nch; j += blockDim.x) {
        ps += partial[2 * (d.chunk0 + j)];
        gs += partial[2 * (d.chunk0 + j) + 1];
    }
    const double pn = sqrt(block_sum_f64(ps, scratch));
    const double gn = sqrt(block_sum_f64(gs, scratch));
    float scale = 1.0f, wd = 0.0f;
    if (pn != 0.0 && gn != 0.0) {
        const double lambda = (double)eta * pn / (gn + (double)d.weight_decay * pn + (double)eps);
        scale = (float)lambda;
        wd = d.weight_decay;
    }
    const bool adaptive = wd != 0.0f || scale != 1.0f;
    const long long start = (long long)(c - d.chunk0) * chunk;
    const long long end = min(start + (long long)chunk, d.n);
    float* p = (float*)d.param;
    const float* g = (const float*)d.grad;
    float* buf = (float*)d.mom;
    __nv_bfloat16* pb = (__nv_bfloat16*)d.param_bf16;
    const float lr = d.lr;
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        const float gv = g[i];
        float pv = p[i];
        const float dv = adaptive ? (gv + wd * pv) * scale : gv;
        const float bv = buf[i] * momentum + dv;
        buf[i] = bv;
        pv -= lr * bv;
        p[i] = pv;
        if (pb) pb[i] = __float2bfloat16(pv);
    }
}

// ------------------------------------------------------------------------------------------
// AdamW (torch's single-tensor path, src/optim/adamw.rs), elementwise:
//   p *= decay; m += (1 - b1)(g - m); v = b2 v + (1 - b2) g^2;
//   p += -step_size m / (sqrt(v) / bc2_sqrt + eps)
// grid (total chunks), block (multiple of 32, 256 recommended). w1 = 1 - beta1, w2 = 1 - beta2,
// each rounded to f32 by the host as the CPU reference does.
KERNEL void adamw_update(const optim_detail::AdamWTensor* __restrict__ tab, int ntensors, int chunk,
                         float w1, float b2, float w2, float eps) {
    using namespace optim_detail;
    const int c = blockIdx.x;
    const AdamWTensor& d = tab[find_tensor(tab, ntensors, c)];
    const long long start = (long long)(c - d.chunk0) * chunk;
    const long long end = min(start + (long long)chunk, d.n);
    float* p = (float*)d.param;
    const float* g = (const float*)d.grad;
    float* m = (float*)d.exp_avg;
    float* v = (float*)d.exp_avg_sq;
    __nv_bfloat16* pb = (__nv_bfloat16*)d.param_bf16;
    const float decay = d.decay, step_size = d.step_size, bc2_sqrt = d.bc2_sqrt;
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        const float gv = g[i];
        float pv = p[i] * decay;
        float mv = m[i];
        mv += w1 * (gv - mv);
        const float vv = v[i] * b2 + w2 * gv * gv;
        const float denom = sqrtf(vv) / bc2_sqrt + eps;
        pv += -step_size * mv / denom;
        m[i] = mv;
        v[i] = vv;
        p[i] = pv;
        if (pb) pb[i] = __float2bfloat16(pv);
    }
}

// ------------------------------------------------------------------------------------------
// Teacher EMA (src/optim/ema.rs): t = t a + b s with a = m, b = 1 - m rounded to f32 by the host
// from the f64 momentum. grid (total chunks), block (multiple of 32, 256 recommended).
KERNEL void ema_update(const optim_detail::EmaTensor* __restrict__ tab, int ntensors, int chunk,
                       float a, float b) {
    using namespace optim_detail;
    const int c = blockIdx.x;
    const EmaTensor& d = tab[find_tensor(tab, ntensors, c)];
    const long long start = (long long)(c - d.chunk0) * chunk;
    const long long end = min(start + (long long)chunk, d.n);
    float* t = (float*)d.teacher;
    const float* s = (const float*)d.student;
    __nv_bfloat16* tb = (__nv_bfloat16*)d.teacher_bf16;
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        const float tv = t[i] * a + b * s[i];
        t[i] = tv;
        if (tb) tb[i] = __float2bfloat16(tv);
    }
}

// ------------------------------------------------------------------------------------------
// DINO centre, pass 1: column sums of the teacher's raw logits x [rows, cols] (row-major; the
// rows of both global views stacked), in f64, written to colsum [cols] for the f64 all-reduce
// over ranks (accumulate != 0 adds to colsum instead, for views kept in separate buffers).
// One thread per column walks the rows in order: consecutive threads read consecutive columns
// (coalesced), and the sum order is the CPU reference's (views, then rows), so the shim matches
// it bit for bit. grid (ceil(cols / block)), block (256).
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T>
__device__ void center_colsum_impl(const T* __restrict__ x, int rows, int cols,
                                   double* __restrict__ colsum, int accumulate) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= cols) return;
    double s = accumulate ? colsum[k] : 0.0;
    for (int r = 0; r < rows; ++r) s += (double)to_f32(x[(long long)r * cols + k]);
    colsum[k] = s;
}
KERNEL void dino_center_colsum_f32(const float* __restrict__ x, int rows, int cols,
                                   double* __restrict__ colsum, int accumulate) {
    center_colsum_impl(x, rows, cols, colsum, accumulate);
}
KERNEL void dino_center_colsum_bf16(const __nv_bfloat16* __restrict__ x, int rows, int cols,
                                    double* __restrict__ colsum, int accumulate) {
    center_colsum_impl(x, rows, cols, colsum, accumulate);
}

// DINO centre, pass 2 (after the all-reduce): c = m c + (1 - m) colsum / n in f64, stored as f32,
// n = views * batch * world size. grid (ceil(cols / block)), block (256).
KERNEL void dino_center_update(float* __restrict__ center, const double* __restrict__ colsum,
                               int cols, double n, double m) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= cols) return;
    center[k] = (float)((double)center[k] * m + colsum[k] / n * (1.0 - m));
}
