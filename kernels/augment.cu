// augment.cu -- the multi-crop augmentation of a batch on the GPU, from decoded 8-bit HWC RGB
// images to normalised NHWC views (f32, or bf16 for the bf16 activations path).
//
// CPU reference: `ViewAug::apply` (src/data/augment.rs) over src/data/transforms.rs, step for step:
//   RandomResizedCrop (separable antialiased resampling, PIL's / torch's `_upsample_*_aa`:
//   horizontal pass over the crop rows, then vertical; bilinear = triangle filter, bicubic = Keys
//   a = -0.5 with the result clamped to [0, 1]; when downscaling the filter is stretched by the
//   scale so that every input pixel contributes) -> horizontal flip -> ColorJitter (brightness,
//   contrast, saturation, hue in the sampled order) -> grayscale -> PIL Gaussian blur (three
//   extended box blurs per axis, PIL's fixed-point weights) -> solarise (>= 128/255) ->
//   Normalize. Every parameter (crop box, flip, jitter order and factors, grayscale, blur box
//   radius and weights, solarise) is sampled on the host by `ViewAug::sample` and passed in a
//   table of `AugView`, one row per view; nothing random happens here.
//
// One launch per crop set: one BLOCK per view (every view of every image of the batch, global
// and local sizes mixed; put the large views first so that they start first). A view needs two
// global reductions-or-neighbourhoods (the contrast mean and the blur), so a block owns the whole
// view and walks it in stages separated by __syncthreads(); its intermediate images live in a
// per-view slice of a global workspace (a 224x224x3 f32 view is 600 KB, too large for shared
// memory; the slices stay mostly in L2). Workspace of a view, in floats (see `aug_ws_floats`):
//   wts_w [size * kmax_w]  start_w, count_w [size] (ints)   -- horizontal taps
//   wts_h [size * kmax_h]  start_h, count_h [size] (ints)   -- vertical taps
//   tmp   [max(crop_h, size) * size * 3]                    -- horizontal pass, then blur ping-pong
//   x     [size * size * 3]                                 -- the view between stages
// Stages: (1) filter taps, computed in f64 and rounded to f32 exactly as the CPU's `taps`;
// (2) horizontal pass over every crop row (u8 -> f32 with the 1/255 folded into the weights);
// (3) vertical pass, clamp, flip, then the per-pixel jitter ops that precede contrast, with the
// grayscale sum for the contrast mean (f64, like the CPU); (4) contrast and the remaining
// per-pixel ops, grayscale; without blur the pixel is solarised, normalised and written to the
// output here; (5) blur: one thread per (line, channel) runs PIL's running box sum along the line
// (same order as the CPU, so the same rounding), three horizontal then three vertical passes;
// the last pass solarises, normalises and writes the output.
// Threads of a stage loop over the stage's items with stride blockDim.x (coalesced along x).
// Launch: grid (views), block (256; any multiple of 32 up to 1024), no dynamic shared memory.

#include "common.cuh"

namespace augment_detail {

// One view. 144 bytes; the Rust mirror is `AugView` (repr(C)).
struct AugView {
    unsigned long long img;  // const unsigned char*: decoded image, HWC RGB, img_h x img_w
    unsigned long long out;  // float* / __nv_bfloat16*: the view's slot, size x size x 3 (HWC)
    long long ws;            // offset of this view's workspace slice, in floats
    int img_h, img_w;
    int top, left, crop_h, crop_w;  // crop box in image pixels
    int size;                       // output side
    int bicubic;                    // 0 bilinear, 1 bicubic
    int flip;
    int njitter;                    // 0 (no ColorJitter) or 4
    int order[4];                   // torchvision fn_idx: 0 brightness 1 contrast 2 saturation 3 hue
    float factors[4];               // by op, not by position: brightness, contrast, saturation, hue
    int gray;
    int blur_r;                     // integer box radius of PIL's blur, -1 = no blur
    float blur_ww, blur_fw;         // PIL's fixed-point inner / fractional weights, as f32
    int solarize;
    float mean[3];
    float stdv[3];
    int pad_;
};

__device__ __forceinline__ double filter(int bicubic, double x) {
    x = fabs(x);
    if (!bicubic) return x < 1.0 ? 1.0 - x : 0.0;
    const double A = -0.5;
    if (x < 1.0) return ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * A;
    return 0.0;
}

// kmax of transforms.rs `taps` for in -> out.
__device__ __forceinline__ int taps_kmax(int in_size, int out_size, int bicubic) {
    const double support0 = bicubic ? 2.0 : 1.0;
    const double scale = (double)in_size / (double)out_size;
    const double support = scale >= 1.0 ? support0 * scale : support0;
    return (int)ceil(support) * 2 + 1;
}

// The taps of output coordinate i (transforms.rs `taps`), written to wts[i * kmax ..], start[i],
// count[i]. Two passes over the filter (sum, then normalised values) instead of a scratch array.
__device__ void make_taps(int in_size, int out_size, int bicubic, double gain, int i, int kmax,
                          float* wts, int* start, int* count) {
    const double support0 = bicubic ? 2.0 : 1.0;
    const double scale = (double)in_size / (double)out_size;
    double support = support0, invscale = 1.0;
    if (scale >= 1.0) {
        support = support0 * scale;
        invscale = 1.0 / scale;
    }
    const double center = scale * ((double)i + 0.5);
    long long xmin = (long long)(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    long long xmax = (long long)(center + support + 0.5);
    xmax = xmax < 0 ? 0 : (xmax > in_size ? in_size : xmax);
    long long n = xmax - xmin;
    if (n < 0) n = 0;
    if (n > kmax) n = kmax;
    double total = 0.0;
    for (int j = 0; j < n; ++j) total += filter(bicubic, ((double)j + (double)xmin - center + 0.5) * invscale);
    const double norm = total != 0.0 ? gain / total : 0.0;
    for (int j = 0; j < n; ++j)
        wts[(long long)i * kmax + j] =
            (float)(filter(bicubic, ((double)j + (double)xmin - center + 0.5) * invscale) * norm);
    start[i] = (int)xmin;
    count[i] = (int)n;
}

__device__ __forceinline__ float clamp01(float v) { return v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v); }

// torchvision's tensor rgb_to_grayscale weights (transforms.rs GRAY_WEIGHTS).
__device__ __forceinline__ float gray_of(const float* p) {
    return 0.2989f * p[0] + 0.587f * p[1] + 0.114f * p[2];
}

// adjust_hue (torchvision's _rgb2hsv / _hsv2rgb), as transforms.rs.
__device__ void hue(float* p, float factor) {
    const float r = p[0], g = p[1], b = p[2];
    const float maxc = fmaxf(fmaxf(r, g), b);
    const float minc = fminf(fminf(r, g), b);
    const bool eqc = maxc == minc;
    const float cr = maxc - minc;
    const float s = cr / (eqc ? 1.0f : maxc);
    const float crd = eqc ? 1.0f : cr;
    const float rc = (maxc - r) / crd, gc = (maxc - g) / crd, bc = (maxc - b) / crd;
    float h;
    if (maxc == r) h = bc - gc;
    else if (maxc == g) h = 2.0f + rc - bc;
    else h = 4.0f + gc - rc;
    h = fmodf(h / 6.0f + 1.0f, 1.0f);
    h = fmodf(h + factor, 1.0f);
    if (h < 0.0f) h += 1.0f;
    const float v = maxc;
    const float h6 = h * 6.0f;
    const float fi = floorf(h6);
    const float f = h6 - fi;
    int i = ((int)fi) % 6;
    if (i < 0) i += 6;
    const float pp = clamp01(v * (1.0f - s));
    const float q = clamp01(v * (1.0f - s * f));
    const float t = clamp01(v * (1.0f - s * (1.0f - f)));
    float o0, o1, o2;
    switch (i) {
        case 0: o0 = v; o1 = t; o2 = pp; break;
        case 1: o0 = q; o1 = v; o2 = pp; break;
        case 2: o0 = pp; o1 = v; o2 = t; break;
        case 3: o0 = pp; o1 = q; o2 = v; break;
        case 4: o0 = t; o1 = pp; o2 = v; break;
        default: o0 = v; o1 = pp; o2 = q; break;
    }
    p[0] = o0;
    p[1] = o1;
    p[2] = o2;
}

// One per-pixel ColorJitter op (not contrast, whose mean is global).
__device__ __forceinline__ void pixel_op(int op, float f, float* p) {
    if (op == 0) {
        for (int c = 0; c < 3; ++c) p[c] = clamp01(f * p[c]);
    } else if (op == 2) {
        const float g = (1.0f - f) * gray_of(p);
        for (int c = 0; c < 3; ++c) p[c] = clamp01(f * p[c] + g);
    } else if (op == 3) {
        hue(p, f);
    }
}

__device__ __forceinline__ void store(float* o, long long i, float v) { o[i] = v; }
__device__ __forceinline__ void store(__nv_bfloat16* o, long long i, float v) { o[i] = __float2bfloat16(v); }

// Solarise (PIL's threshold 128) and Normalize one channel value.
__device__ __forceinline__ float finish_channel(const AugView& d, int c, float v) {
    if (d.solarize && v >= 128.0f / 255.0f) v = 1.0f - v;
    return (v - d.mean[c]) / d.stdv[c];
}

__device__ __forceinline__ double warp_sum_f64(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ double block_sum_f64(double v, double* scratch) {
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
    __syncthreads();
    return r;
}

// One extended-box pass along a line of n values spaced `stride` apart, edges clamped
// (transforms.rs `box_line`, PIL's ImagingLineBoxBlur). `last` != null: solarise + normalise
// channel c and write to last[i * ostride] instead of dst.
template <class TO>
__device__ void box_line(const float* src, float* dst, int n, long long stride, int r, float ww,
                         float fw, const AugView* d, int c, TO* last, long long ostride) {
    const int lastix = n - 1;
#define AT(i) src[(long long)((i) < 0 ? 0 : ((i) > lastix ? lastix : (i))) * stride]
    float acc = 0.0f;
    for (int k = -r; k <= r; ++k) acc += AT(k);
    for (int x = 0; x < n; ++x) {
        const float v = acc * ww + (AT(x - r - 1) + AT(x + r + 1)) * fw;
        if (last) store(last, (long long)x * ostride, finish_channel(*d, c, v));
        else dst[(long long)x * stride] = v;
        acc += AT(x + r + 1) - AT(x - r);
    }
#undef AT
}

template <class TO>
__device__ void augment_impl(const AugView* __restrict__ tab, float* __restrict__ ws_all) {
    __shared__ double scratch[32];
    const AugView& d = tab[blockIdx.x];
    const int size = d.size, tid = threadIdx.x, nt = blockDim.x;
    const int kw = taps_kmax(d.crop_w, size, d.bicubic), kh = taps_kmax(d.crop_h, size, d.bicubic);
    float* ws = ws_all + d.ws;
    float* wts_w = ws;
    int* start_w = (int*)(wts_w + (long long)size * kw);
    int* count_w = start_w + size;
    float* wts_h = (float*)(count_w + size);
    int* start_h = (int*)(wts_h + (long long)size * kh);
    int* count_h = start_h + size;
    float* tmp = (float*)(count_h + size);
    float* x = tmp + (long long)max(d.crop_h, size) * size * 3;
    TO* out = (TO*)d.out;
    const unsigned char* img = (const unsigned char*)d.img;

    // (1) taps of both axes (u8 -> [0, 1] folded into the horizontal weights).
    for (int i = tid; i < 2 * size; i += nt) {
        if (i < size) make_taps(d.crop_w, size, d.bicubic, 1.0 / 255.0, i, kw, wts_w, start_w, count_w);
        else make_taps(d.crop_h, size, d.bicubic, 1.0, i - size, kh, wts_h, start_h, count_h);
    }
    __syncthreads();

    // (2) horizontal pass: crop row r, output column xo -> tmp[r][xo][c].
    const long long hp = (long long)d.crop_h * size;
    for (long long it = tid; it < hp; it += nt) {
        const int r = (int)(it / size), xo = (int)(it - (long long)r * size);
        const int s = start_w[xo], n = count_w[xo];
        const float* w = wts_w + (long long)xo * kw;
        const unsigned char* src = img + ((long long)(d.top + r) * d.img_w + d.left + s) * 3;
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f;
        for (int k = 0; k < n; ++k) {
            const float wk = w[k];
            a0 += wk * (float)src[3 * k];
            a1 += wk * (float)src[3 * k + 1];
            a2 += wk * (float)src[3 * k + 2];
        }
        float* t = tmp + it * 3;
        t[0] = a0;
        t[1] = a1;
        t[2] = a2;
    }
    __syncthreads();

    // The contrast op's position in the jitter order (-1: none).
    int jc = -1;
    for (int j = 0; j < d.njitter; ++j)
        if (d.order[j] == 1) jc = j;
    const bool blur = d.blur_r >= 0;
    const long long npix = (long long)size * size;

    // Everything after contrast: the remaining jitter ops, grayscale, and (without blur)
    // solarise + normalise + store; with blur, back to x for stage (5).
    auto finish_pixel = [&](float* p, long long pix, int from) {
        for (int j = from; j < d.njitter; ++j) pixel_op(d.order[j], d.factors[d.order[j]], p);
        if (d.gray) {
            const float g = gray_of(p);
            p[0] = g;
            p[1] = g;
            p[2] = g;
        }
        if (blur) {
            for (int c = 0; c < 3; ++c) x[pix * 3 + c] = p[c];
        } else {
            for (int c = 0; c < 3; ++c) store(out, pix * 3 + c, finish_channel(d, c, p[c]));
        }
    };

    // (3) vertical pass, clamp (bicubic), flip, jitter ops before contrast.
    double gsum = 0.0;
    for (long long pix = tid; pix < npix; pix += nt) {
        const int y = (int)(pix / size), xo = (int)(pix - (long long)y * size);
        const int s = start_h[y], n = count_h[y];
        const float* w = wts_h + (long long)y * kh;
        float p[3] = {0.0f, 0.0f, 0.0f};
        for (int k = 0; k < n; ++k) {
            const float wk = w[k];
            const float* t = tmp + ((long long)(s + k) * size + xo) * 3;
            p[0] += wk * t[0];
            p[1] += wk * t[1];
            p[2] += wk * t[2];
        }
        if (d.bicubic)
            for (int c = 0; c < 3; ++c) p[c] = clamp01(p[c]);
        const long long dst = (long long)y * size + (d.flip ? size - 1 - xo : xo);
        if (jc < 0) {
            finish_pixel(p, dst, 0);
        } else {
            for (int j = 0; j < jc; ++j) pixel_op(d.order[j], d.factors[d.order[j]], p);
            gsum += (double)gray_of(p);
            for (int c = 0; c < 3; ++c) x[dst * 3 + c] = p[c];
        }
    }

    // (4) contrast: blend with the mean of the grayscale image, then the rest.
    if (jc >= 0) {
        const double sum = block_sum_f64(gsum, scratch);  // contains the stage (3) barrier
        const float mean = (float)(sum / (double)(npix > 0 ? npix : 1));
        const float f = d.factors[1];
        const float off = (1.0f - f) * mean;
        for (long long pix = tid; pix < npix; pix += nt) {
            float p[3];
            for (int c = 0; c < 3; ++c) p[c] = clamp01(f * x[pix * 3 + c] + off);
            finish_pixel(p, pix, jc + 1);
        }
    }
    if (!blur) return;
    __syncthreads();

    // (5) PIL Gaussian blur: 3 horizontal box passes x -> tmp -> x -> tmp, then 3 vertical
    // tmp -> x -> tmp -> out (the last one solarises, normalises and stores).
    const int r = d.blur_r;
    float* bufs[2] = {x, tmp};
    int cur = 0;
    for (int pass = 0; pass < 6; ++pass) {
        const float* src = bufs[cur];
        float* dst = bufs[cur ^ 1];
        const bool horiz = pass < 3, final_pass = pass == 5;
        for (int it = tid; it < 3 * size; it += nt) {
            const int line = it / 3, c = it - line * 3;
            const long long o = horiz ? (long long)line * size * 3 + c : (long long)line * 3 + c;
            const long long stride = horiz ? 3 : (long long)size * 3;
            box_line<TO>(src + o, dst + o, size, stride, r, d.blur_ww, d.blur_fw, &d, c,
                         final_pass ? out + o : (TO*)nullptr, stride);
        }
        cur ^= 1;
        __syncthreads();
    }
}

}  // namespace augment_detail

KERNEL void augment_views_f32(const augment_detail::AugView* __restrict__ tab, float* __restrict__ ws) {
    augment_detail::augment_impl<float>(tab, ws);
}
KERNEL void augment_views_bf16(const augment_detail::AugView* __restrict__ tab, float* __restrict__ ws) {
    augment_detail::augment_impl<__nv_bfloat16>(tab, ws);
}
