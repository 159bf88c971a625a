// mixup.cu -- Mixup / CutMix of an NHWC batch with its reversed self, and the soft targets
// (timm's "batch" mode as src/data/mixup.rs implements it; lambda and the CutMix box are sampled
// on the host by `sample_mix` and passed in).
//
//   Mixup : out[i] = lambda x1[i] + (1 - lambda) x2[B-1-i]        (f32 arithmetic, same order)
//   CutMix: out[i] = x1[i], with the box [y_lo, y_hi) x [x_lo, x_hi) copied from x2[B-1-i]
//
// Layout: x1, x2, out are [B, H, W, C] contiguous. One thread per output element, grid-stride:
// the kernel is a pure stream (read two values, write one), so the only goal is coalescing, which
// the flat index within an image gives (grid.y = image, grid-stride over its elements in x, so
// offsets are 32-bit). `out` must not alias x1 or x2 (the partner row B-1-i is read while row i
// is written); Suave's extended labelled batch writes the mixed half into its own slot of the
// [2B] buffer, so that holds. f32 in / f32 out for the CPU path and the f32 batch; bf16 in /
// bf16 out (computed in f32, rounded once) for the bf16 activations path.
// Launch: grid (min(ceil(H*W*C / block), 1024), B), block 256; cutmix = 0 for Mixup.
//
// mixup_targets writes lambda onehot(y) + (1 - lambda) onehot(y[B-1-i]) with label smoothing
// `smoothing` (B x classes, one thread per element), like `mixup_targets` in mixup.rs.

#include "common.cuh"

namespace mixup_detail {
__device__ __forceinline__ float ld(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, long long i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__nv_bfloat16* p, long long i, float v) { p[i] = __float2bfloat16(v); }

template <class T>
__device__ void mix_impl(const T* __restrict__ x1, const T* __restrict__ x2, T* __restrict__ out,
                         int b, int h, int w, int c, float lambda, int cutmix, int y_lo, int y_hi,
                         int x_lo, int x_hi) {
    // blockIdx.y = image i (partner b-1-i); 32-bit offsets within the image (per < 2^31).
    const int i = blockIdx.y;
    const int per = h * w * c, row = w * c;
    const long long base = (long long)i * per, src = ((long long)b - 1 - i) * per;
    const float l = lambda, m = 1.0f - lambda;
    for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < per; r += gridDim.x * blockDim.x) {
        float v;
        if (cutmix) {
            const int y = r / row, x = (r - y * row) / c;
            const bool inside = y >= y_lo && y < y_hi && x >= x_lo && x < x_hi;
            v = inside ? ld(x2, src + r) : ld(x1, base + r);
        } else {
            v = ld(x1, base + r) * l + ld(x2, src + r) * m;
        }
        st(out, base + r, v);
    }
}
}  // namespace mixup_detail

KERNEL void mix_batch_f32(const float* __restrict__ x1, const float* __restrict__ x2,
                          float* __restrict__ out, int b, int h, int w, int c, float lambda,
                          int cutmix, int y_lo, int y_hi, int x_lo, int x_hi) {
    mixup_detail::mix_impl(x1, x2, out, b, h, w, c, lambda, cutmix, y_lo, y_hi, x_lo, x_hi);
}
KERNEL void mix_batch_bf16(const __nv_bfloat16* __restrict__ x1, const __nv_bfloat16* __restrict__ x2,
                           __nv_bfloat16* __restrict__ out, int b, int h, int w, int c, float lambda,
                           int cutmix, int y_lo, int y_hi, int x_lo, int x_hi) {
    mixup_detail::mix_impl(x1, x2, out, b, h, w, c, lambda, cutmix, y_lo, y_hi, x_lo, x_hi);
}

// targets [b, classes]: off = smoothing / classes, on = 1 - smoothing + off;
// t = off + (on - off) lambda [k == y_i] + (on - off) (1 - lambda) [k == y_{b-1-i}],
// added in the CPU reference's order. grid (ceil(b * classes / block)), block (256).
KERNEL void mixup_targets(const int* __restrict__ labels, int b, int classes, float lambda,
                          float smoothing, float* __restrict__ out) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)b * classes) return;
    const int i = (int)(idx / classes), k = (int)(idx - (long long)i * classes);
    const float off = smoothing / (float)classes;
    const float on = 1.0f - smoothing + off;
    float t = off;
    if (labels[i] == k) t += (on - off) * lambda;
    if (labels[b - 1 - i] == k) t += (on - off) * (1.0f - lambda);
    out[idx] = t;
}
