// pool.cu -- ResNet's pooling layers on bf16 NHWC activations: the stem's max-pool (3x3, stride 2,
// padding 1) and the global average pool before the head, forward and backward. CPU reference:
// src/backend/cpu/pool.rs (max_pool2d_forward/backward, global_avg_pool_forward/backward).
//
// Layout NHWC [N, H, W, C]: consecutive threads take consecutive channels of one pixel, so every
// load and store of a warp is one contiguous run of C (coalesced). Arithmetic fp32; the max-pool
// moves values without arithmetic (its output is bit-exact).
//
// * maxpool2d_forward: one thread per OUTPUT element (n, oy, ox, c), grid-stride. PyTorch's
//   semantics, exactly as the CPU reference: padded positions are -inf (never win), floor mode,
//   the window is scanned row-major over its in-image pixels starting from best = -inf with the
//   arg-max at the window's first in-image pixel, and a pixel replaces the running maximum when
//   `v > best || isnan(v)` -- so the first maximum wins a tie and the LAST NaN of the window wins
//   (PyTorch's `(val > maxval) || isnan(val)`). argmax = iy * W + ix within the image (PyTorch's
//   `indices`), int32.
// * maxpool2d_backward: a deterministic GATHER instead of PyTorch's scatter-add: one thread per
//   INPUT element (n, iy, ix, c) visits the output windows that contain (iy, ix) -- at most
//   ceil(k/s)^2, 4 for the stem -- in row-major output order and sums, in fp32, the dy of those
//   whose argmax is this pixel. No atomics, the same sum order as the CPU's scatter, and every dx
//   element is written (0 where no window picked it), so dx needs no zero fill.
// * global_avgpool_forward: one thread per output (n, c), summing the H*W pixels of its channel
//   in fp32 in pixel order (a warp reads 32 consecutive channels of a pixel), times 1/(H*W) as the
//   CPU does. global_avgpool_backward: one thread per dx element, dx[n, i, c] = dy[n, c] / (H*W)
//   (as dy * (1/(H*W)), the CPU's arithmetic).
// Launches: grid min(ceil(n_threads / T), cap), block T (256 on the GPU); the grid-stride loops
// cover the rest. Element counts stay below 2^31 (the wrappers check), so indices are 32-bit.
#include "common.cuh"

// y[n, oy, ox, c] = max over the k x k window at (oy*s - p, ox*s - p); argmax its position.
KERNEL void maxpool2d_forward(const bf16* __restrict__ x, bf16* __restrict__ y,
                              int* __restrict__ argmax, int N, int H, int W, int C, int OH,
                              int OW, int k, int s, int p) {
    const unsigned total = (unsigned)N * (unsigned)OH * (unsigned)OW * (unsigned)C;
    GRID_STRIDE_LOOP(i, total) {
        const unsigned c = i % (unsigned)C;
        unsigned t = i / (unsigned)C;
        const int ox = (int)(t % (unsigned)OW);
        t /= (unsigned)OW;
        const int oy = (int)(t % (unsigned)OH);
        const unsigned n = t / (unsigned)OH;
        const int y0 = oy * s - p, x0 = ox * s - p;
        const int ylo = max(y0, 0), yhi = min(y0 + k, H);
        const int xlo = max(x0, 0), xhi = min(x0 + k, W);
        const bf16* img = x + (size_t)n * H * W * C + c;
        float best = -INFINITY;
        bf16 best_h = __float2bfloat16(-INFINITY);
        int arg = ylo * W + xlo;
        for (int iy = ylo; iy < yhi; ++iy)
            for (int ix = xlo; ix < xhi; ++ix) {
                const int pos = iy * W + ix;
                const bf16 h = img[(size_t)pos * C];
                const float v = __bfloat162float(h);
                if (v > best || v != v) {
                    best = v;
                    best_h = h;
                    arg = pos;
                }
            }
        y[i] = best_h;
        argmax[i] = arg;
    }
}

// dx[n, iy, ix, c] = sum of dy[n, oy, ox, c] over the windows containing (iy, ix) whose argmax is
// iy * W + ix, in row-major (oy, ox) order.
KERNEL void maxpool2d_backward(const bf16* __restrict__ dy, const int* __restrict__ argmax,
                               bf16* __restrict__ dx, int N, int H, int W, int C, int OH, int OW,
                               int k, int s, int p) {
    const unsigned total = (unsigned)N * (unsigned)H * (unsigned)W * (unsigned)C;
    GRID_STRIDE_LOOP(i, total) {
        const unsigned c = i % (unsigned)C;
        unsigned t = i / (unsigned)C;
        const int ix = (int)(t % (unsigned)W);
        t /= (unsigned)W;
        const int iy = (int)(t % (unsigned)H);
        const unsigned n = t / (unsigned)H;
        const int pos = iy * W + ix;
        // Windows oy with oy*s - p <= iy <= oy*s - p + k - 1, clipped to the output.
        const int oylo = iy + p < k ? 0 : (iy + p - k) / s + 1, oyhi = min((iy + p) / s, OH - 1);
        const int oxlo = ix + p < k ? 0 : (ix + p - k) / s + 1, oxhi = min((ix + p) / s, OW - 1);
        const size_t base = (size_t)n * OH * OW * C + c;
        float sum = 0.f;
        for (int oy = oylo; oy <= oyhi; ++oy)
            for (int ox = oxlo; ox <= oxhi; ++ox) {
                const size_t o = base + ((size_t)oy * OW + ox) * C;
                if (argmax[o] == pos) sum += __bfloat162float(dy[o]);
            }
        dx[i] = __float2bfloat16(sum);
    }
}

// y[n, c] = (sum over the HW pixels of x[n, :, c]) * (1 / HW).
KERNEL void global_avgpool_forward(const bf16* __restrict__ x, bf16* __restrict__ y, int N, int HW,
                                   int C) {
    const float inv = 1.f / (float)HW;
    const unsigned total = (unsigned)N * (unsigned)C;
    GRID_STRIDE_LOOP(i, total) {
        const unsigned c = i % (unsigned)C, n = i / (unsigned)C;
        const bf16* px = x + (size_t)n * HW * C + c;
        float sum = 0.f;
        for (int j = 0; j < HW; ++j) sum += __bfloat162float(px[(size_t)j * C]);
        y[i] = __float2bfloat16(sum * inv);
    }
}

// dx[n, j, c] = dy[n, c] * (1 / HW) for every pixel j.
KERNEL void global_avgpool_backward(const bf16* __restrict__ dy, bf16* __restrict__ dx, int N,
                                    int HW, int C) {
    const float inv = 1.f / (float)HW;
    const unsigned total = (unsigned)N * (unsigned)HW * (unsigned)C;
    GRID_STRIDE_LOOP(i, total) {
        const unsigned c = i % (unsigned)C, n = i / ((unsigned)HW * (unsigned)C);
        dx[i] = __float2bfloat16(__bfloat162float(dy[(size_t)n * C + c]) * inv);
    }
}
