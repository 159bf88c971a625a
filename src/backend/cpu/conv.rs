//! 2-D convolution (ResNet-50's convs, ViT's 16x16/16 patch embedding), forward and backward.
//!
//! Layout: activations NHWC `[N, H, W, C]`, weights `[O, KH, KW, C]` ("KRSC"), bias `[O]`, output
//! `[N, OH, OW, O]` with `OH = (H + 2p − KH)/s + 1` (floor), square stride `s` and zero padding `p`.
//!
//! Every product is a GEMM ([`matmul`]) over the im2col matrix `cols: [P = N·OH·OW, K = KH·KW·C]`,
//! whose row for an output pixel is its receptive field in weight order (kh, kw, c). In NHWC that
//! row is KH contiguous runs of KW·C input values, so im2col is a few `memcpy`s per pixel:
//! - forward `Y[P, O] = cols · Wᵀ` (+ bias, pre-filled into `Y`), with `Wᵀ [K, O]` transposed once
//!   per call: the GEMM runs ~20% faster on a row-major right operand than through strides;
//! - weights `dW[O, K] = dYᵀ · cols`, computed as `dWᵀ = colsᵀ · dY` when O < K (faster GEMM shape);
//! - input, stride 1: `dX` is itself a convolution, of `dY` with the spatially flipped,
//!   in/out-swapped weight and padding `KH−1−p`, so it runs through the forward's code;
//! - input, stride > 1: `dcols = dY · W`, then col2im (the scatter-add of the patches).
//!
//! A 1x1 stride-1 unpadded conv (ResNet's bottleneck 1x1s) needs no im2col: `cols` is the input
//! itself and `dX = dY · W`. Strided 1x1s (downsample) and patch embedding (kernel == stride, no
//! padding) use the general im2col, which for them is exactly the strided / reshaping gather.
//!
//! Work split (measured on 2 cores with `benches/conv.rs`): the forward and the weight gradient
//! split the output pixels into one contiguous group per thread; each group builds im2col for a
//! chunk of its rows in its own cache-sized buffer and runs single-threaded GEMMs on it, so the
//! copy and the product it feeds stay in one core's cache (this beat one multi-threaded GEMM per
//! chunk). Each group accumulates its own `dW` partial; the partials are summed in group order.
//! The strided input gradient runs chunk by chunk over output rows: one multi-threaded GEMM for
//! `dcols`, then col2im parallel over *input* rows, each gathering every contribution it
//! receives, so writes never race. Every sum is taken in a fixed order: results are bit-identical
//! from run to run on a machine.

use super::matmul::matmul;
use crate::error::{Error, Result};
use crate::tensor::{Float, Tensor};
use rayon::prelude::*;

/// Stride and zero padding of a 2-D convolution (the same along H and W); the kernel size comes
/// from the weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dParams {
    /// Step between receptive fields, ≥ 1.
    pub stride: usize,
    /// Zero padding added on each side of H and W.
    pub padding: usize,
}

/// Gradients returned by [`conv2d_backward`].
#[derive(Clone, Debug)]
pub struct Conv2dGrads<T: Float> {
    /// Gradient of the input `[N, H, W, C]`; `None` when not requested (a network's first layer).
    pub dx: Option<Tensor<T>>,
    /// Gradient of the weight `[O, KH, KW, C]`.
    pub dw: Tensor<T>,
    /// Gradient of the bias `[O]`; `None` when the conv has no bias.
    pub db: Option<Tensor<T>>,
}

/// Buffer sizes of the chunked loops (tests shrink them to exercise chunk boundaries).
#[derive(Clone, Copy, Debug)]
struct Tuning {
    /// Bytes of one thread's im2col buffer in the forward: a chunk of `cols` that stays in the
    /// core's cache while the GEMM consumes it.
    fwd_chunk_bytes: usize,
    /// Bytes of one thread's im2col buffer in the weight gradient: larger, because each chunk's
    /// GEMM reads and writes the whole `dW` partial, so fewer, deeper chunks win.
    dw_chunk_bytes: usize,
    /// Bytes of the `dcols` buffer of the input gradient (one at a time, shared by all threads).
    dx_chunk_bytes: usize,
    /// Rows of `cols` a GEMM gets at least, so that packing the weight is amortised.
    min_chunk_rows: usize,
    /// Largest weight whose gradient is computed transposed (see `weight_grad`).
    dw_transpose_max: usize,
}

/// The sizes used by the public functions (measured with `benches/conv.rs`).
const TUNING: Tuning = Tuning {
    fwd_chunk_bytes: 1 << 20,
    dw_chunk_bytes: 1 << 20,
    dx_chunk_bytes: 8 << 20,
    min_chunk_rows: 256,
    dw_transpose_max: 1 << 20,
};

/// Rows of `dy` summed by one task of the bias gradient.
const DB_ROWS_PER_TASK: usize = 512;

/// The shapes of one convolution, checked and derived once.
#[derive(Clone, Copy, Debug)]
struct Geom {
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    o: usize,
    kh: usize,
    kw: usize,
    s: usize,
    p: usize,
    oh: usize,
    ow: usize,
}

impl Geom {
    /// Length of an im2col row: one receptive field.
    fn k(&self) -> usize {
        self.kh * self.kw * self.c
    }

    /// Rows of the im2col matrix: output pixels of the whole batch.
    fn pixels(&self) -> usize {
        self.n * self.oh * self.ow
    }

    /// 1x1, stride 1, no padding: the input already is the im2col matrix.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.s == 1 && self.p == 0
    }

    /// For stride 1 and a square kernel with `p < KH`: the geometry of the conv that maps `dY` to
    /// `dX` (input `[N, OH, OW, O]`, padding `KH−1−p`, output `[N, H, W, C]`).
    fn transposed(&self) -> Option<Geom> {
        (self.s == 1 && self.kh == self.kw && self.p < self.kh).then_some(Geom {
            n: self.n,
            h: self.oh,
            w: self.ow,
            c: self.o,
            o: self.c,
            kh: self.kh,
            kw: self.kw,
            s: 1,
            p: self.kh - 1 - self.p,
            oh: self.h,
            ow: self.w,
        })
    }

    /// The range `[lo, hi)` of kernel columns whose input column `x0 + kw` lies inside the image,
    /// for a receptive field starting at input column `x0` (negative in the left padding).
    fn kw_range(&self, x0: isize) -> (usize, usize) {
        let lo = (-x0).clamp(0, self.kw as isize) as usize;
        let hi = (self.w as isize - x0).clamp(lo as isize, self.kw as isize) as usize;
        (lo, hi)
    }
}

/// Checks input, weight and parameters and derives the output size.
fn geometry(op: &'static str, xs: &[usize], ws: &[usize], p: Conv2dParams) -> Result<Geom> {
    for (what, shape) in [("input (NHWC)", xs), ("weight (O×KH×KW×I)", ws)] {
        if shape.len() != 4 {
            return Err(Error::shape(
                op,
                format!("{what} has shape {shape:?}, expected 4 dimensions"),
            ));
        }
    }
    if p.stride == 0 {
        return Err(Error::invalid(op, "stride must be at least 1"));
    }
    let (n, h, wd, c) = (xs[0], xs[1], xs[2], xs[3]);
    let (o, kh, kw, wc) = (ws[0], ws[1], ws[2], ws[3]);
    if wc != c || [h, wd, c, o, kh, kw].contains(&0) {
        return Err(Error::shape(
            op,
            format!(
                "input {:?} (NHWC) and weight {:?} (O×KH×KW×I): the weight's last dimension must equal the input's channels, and every size but the batch must be ≥ 1",
                xs,
                ws
            ),
        ));
    }
    if h + 2 * p.padding < kh || wd + 2 * p.padding < kw {
        return Err(Error::shape(
            op,
            format!(
                "input {:?} with padding {} is smaller than the kernel {kh}x{kw} of weight {:?}",
                xs, p.padding, ws
            ),
        ));
    }
    Ok(Geom {
        n,
        h,
        w: wd,
        c,
        o,
        kh,
        kw,
        s: p.stride,
        p: p.padding,
        oh: (h + 2 * p.padding - kh) / p.stride + 1,
        ow: (wd + 2 * p.padding - kw) / p.stride + 1,
    })
}

/// im2col for output pixels `p0 .. p0 + cols.len()/K` (flattened n, oy, ox): row `i` of `cols`
/// becomes the receptive field of pixel `p0 + i` in weight order (kh, kw, c), zeros where it
/// reaches into the padding. Each kernel row is one contiguous copy of up to KW·C values.
fn im2col<T: Float>(x: &[T], g: &Geom, p0: usize, cols: &mut [T]) {
    let k = g.k();
    let run = g.kw * g.c;
    let plane = g.oh * g.ow;
    for (i, row) in cols.chunks_exact_mut(k).enumerate() {
        let pix = p0 + i;
        let (n, r) = (pix / plane, pix % plane);
        let (oy, ox) = (r / g.ow, r % g.ow);
        let x0 = (ox * g.s) as isize - g.p as isize;
        let (lo, hi) = g.kw_range(x0);
        for (ky, dst) in row.chunks_exact_mut(run).enumerate() {
            let iy = (oy * g.s + ky) as isize - g.p as isize;
            if iy < 0 || iy >= g.h as isize || lo == hi {
                dst.fill(T::ZERO);
                continue;
            }
            dst[..lo * g.c].fill(T::ZERO);
            dst[hi * g.c..].fill(T::ZERO);
            let src = ((n * g.h + iy as usize) * g.w + (x0 + lo as isize) as usize) * g.c;
            dst[lo * g.c..hi * g.c].copy_from_slice(&x[src..src + (hi - lo) * g.c]);
        }
    }
}

/// col2im for the output rows `r0..r1` (flattened n·OH + oy) whose patch gradients are `dcols`
/// (`[(r1−r0)·OW, K]`): adds every patch value into `dx` at the input position it came from.
/// Parallel over input rows: each task gathers all contributions to its own row of `dx`, so
/// writes never race and every element is summed in the same order on every run.
fn col2im_rows<T: Float>(dcols: &[T], g: &Geom, r0: usize, r1: usize, dx: &mut [T]) {
    let k = g.k();
    let row_len = g.w * g.c;
    // Input rows (flattened n·H + iy) that the output rows r0..r1 touch, as one contiguous range.
    let in_row = |r: usize, ky: usize| {
        let (n, oy) = (r / g.oh, r % g.oh);
        let iy = ((oy * g.s + ky) as isize - g.p as isize).clamp(0, g.h as isize) as usize;
        n * g.h + iy
    };
    let first = in_row(r0, 0);
    let last = in_row(r1 - 1, g.kh).max(first);
    dx[first * row_len..last * row_len]
        .par_chunks_mut(row_len)
        .enumerate()
        .for_each(|(i, dx_row)| {
            let q = first + i;
            let (n, iy) = (q / g.h, q % g.h);
            for ky in 0..g.kh {
                let t = (iy + g.p) as isize - ky as isize;
                if t < 0 || !(t as usize).is_multiple_of(g.s) {
                    continue;
                }
                let oy = t as usize / g.s;
                let r = n * g.oh + oy;
                if oy >= g.oh || r < r0 || r >= r1 {
                    continue;
                }
                let base = (r - r0) * g.ow;
                for ox in 0..g.ow {
                    let x0 = (ox * g.s) as isize - g.p as isize;
                    let (lo, hi) = g.kw_range(x0);
                    let src = (base + ox) * k + (ky * g.kw) * g.c;
                    let src = &dcols[src + lo * g.c..src + hi * g.c];
                    let dst = (x0 + lo as isize).max(0) as usize * g.c;
                    let dst = &mut dx_row[dst..dst + src.len()];
                    for (d, &v) in dst.iter_mut().zip(src) {
                        *d += v;
                    }
                }
            }
        });
}

/// Rows per chunk when `rows` rows are processed in chunks of a `K`-wide buffer of about `bytes`
/// and at least `min_rows` rows: the chunks are balanced (no short tail chunk, which would pay
/// the GEMM's packing of the weight for little work).
fn chunk_rows<T>(rows: usize, bytes: usize, k: usize, min_rows: usize) -> usize {
    let target = (bytes / (k * std::mem::size_of::<T>()).max(1)).max(min_rows);
    let chunks = (rows / target).max(1);
    rows.div_ceil(chunks).max(1)
}

/// Splits `rows` into contiguous groups, one per rayon thread (fewer when there are few rows):
/// returns the rows per group.
fn group_rows(rows: usize, min_rows: usize) -> usize {
    let groups = rayon::current_num_threads()
        .min(rows.div_ceil(min_rows.div_ceil(4)))
        .max(1);
    rows.div_ceil(groups).max(1)
}

/// 2-D convolution `y = conv(x, w) + b`: `x [N, H, W, C]`, `w [O, KH, KW, C]`, optional
/// `bias [O]`, returns `y [N, OH, OW, O]`.
///
/// One GEMM `cols · Wᵀ` per chunk of output pixels; the output pixels are split into one group per
/// thread, each building im2col into its own cache-sized buffer right before its GEMM consumes it.
/// 1x1 stride-1 convs multiply the input directly. The bias is written into `y` first and the
/// GEMM accumulates onto it (no separate pass).
pub fn conv2d_forward<T: Float>(
    x: &Tensor<T>,
    w: &Tensor<T>,
    bias: Option<&Tensor<T>>,
    p: Conv2dParams,
) -> Result<Tensor<T>> {
    forward_tuned(x, w, bias, p, TUNING)
}

/// [`conv2d_forward`] with explicit buffer sizes.
fn forward_tuned<T: Float>(
    x: &Tensor<T>,
    w: &Tensor<T>,
    bias: Option<&Tensor<T>>,
    p: Conv2dParams,
    tu: Tuning,
) -> Result<Tensor<T>> {
    const OP: &str = "conv2d_forward";
    let g = geometry(OP, x.shape(), w.shape(), p)?;
    if let Some(b) = bias {
        b.expect_shape(OP, "bias", &[g.o])?;
    }
    let wt = transpose_weight(w.data(), g.o, g.k());
    let y = conv_gemm(x.data(), &g, &wt, bias.map(|b| b.data()), tu);
    Tensor::from_vec(y, &[g.n, g.oh, g.ow, g.o])
}

/// The transpose `[K, O]` of a row-major `[O, K]` matrix, in parallel over blocks of 8 rows of
/// the result (each block reads one short run of every source row).
///
/// The forward multiplies by `Wᵀ [K, O]` materialised this way rather than read through strides:
/// the GEMM runs ~20% faster on a row-major right operand when the weight is large (measured on
/// 512x4608), and the copy is one pass over the weight per call.
fn transpose_weight<T: Float>(w: &[T], o: usize, k: usize) -> Vec<T> {
    const BLOCK: usize = 8;
    let mut wt = vec![T::ZERO; k * o];
    wt.par_chunks_mut(BLOCK * o)
        .enumerate()
        .for_each(|(bi, rows)| {
            let k0 = bi * BLOCK;
            let kb = rows.len() / o;
            for (oi, w_row) in w.chunks_exact(k).enumerate() {
                for (j, &v) in w_row[k0..k0 + kb].iter().enumerate() {
                    rows[j * o + oi] = v;
                }
            }
        });
    wt
}

/// The convolution as GEMMs: `y[P, O] = cols(x)[P, K] · wt[K, O]` (+ `bias` in every row) for the
/// geometry `g`, returned row-major (`[N, OH, OW, O]`).
///
/// The output pixels are split into one contiguous group per thread; each group builds im2col for
/// a chunk of its rows in its own cache-sized buffer right before its single-threaded GEMM
/// consumes it (1x1 stride-1: the input rows themselves). The bias is written into `y` first and
/// the GEMM accumulates onto it.
fn conv_gemm<T: Float>(x: &[T], g: &Geom, wt: &[T], bias: Option<&[T]>, tu: Tuning) -> Vec<T> {
    let (rows, k, o) = (g.pixels(), g.k(), g.o);
    let mut y = vec![T::ZERO; rows * o];
    if y.is_empty() {
        return y;
    }
    let per_group = group_rows(rows, tu.min_chunk_rows);
    y.par_chunks_mut(per_group * o)
        .enumerate()
        .for_each(|(gi, y_group)| {
            let g_rows = y_group.len() / o;
            let chunk = chunk_rows::<T>(g_rows, tu.fwd_chunk_bytes, k, tu.min_chunk_rows);
            let mut buf = if g.pointwise() {
                Vec::new()
            } else {
                vec![T::ZERO; chunk * k]
            };
            for (ci, y_chunk) in y_group.chunks_mut(chunk * o).enumerate() {
                let p0 = gi * per_group + ci * chunk;
                let m = y_chunk.len() / o;
                let a: &[T] = if g.pointwise() {
                    &x[p0 * k..(p0 + m) * k]
                } else {
                    im2col(x, g, p0, &mut buf[..m * k]);
                    &buf[..m * k]
                };
                if let Some(b) = bias {
                    for row in y_chunk.chunks_exact_mut(o) {
                        row.copy_from_slice(b);
                    }
                }
                matmul(m, o, k, a, false, wt, false, y_chunk, bias.is_some());
            }
        });
    y
}

/// Backward of [`conv2d_forward`]: given `x`, `w` and `dy [N, OH, OW, O]`, returns `dw` always,
/// `dx` when `need_dx` (skip it for a network's first layer) and `db` when `need_db` (the conv
/// has a bias).
///
/// `dW = dYᵀ·cols` is split over one group of output pixels per thread, each rebuilding its im2col
/// chunks and accumulating its own partial (summed in group order). `dX`: for stride 1 the forward
/// conv of `dY` with the flipped weight; for larger strides `dY·W` chunk by chunk scattered back
/// by col2im; for a 1x1 stride-1 conv the single GEMM `dY·W`.
pub fn conv2d_backward<T: Float>(
    x: &Tensor<T>,
    w: &Tensor<T>,
    dy: &Tensor<T>,
    p: Conv2dParams,
    need_dx: bool,
    need_db: bool,
) -> Result<Conv2dGrads<T>> {
    backward_tuned(x, w, dy, p, need_dx, need_db, TUNING)
}

/// The input gradient alone, `dx [N, H, W, C]` of an input of shape `x_shape`, from `dy` and
/// the weight (the input's values are not needed): what a library's backward-data call
/// computes, for the device emulation.
pub fn conv2d_backward_data<T: Float>(
    x_shape: &[usize],
    w: &Tensor<T>,
    dy: &Tensor<T>,
    p: Conv2dParams,
) -> Result<Tensor<T>> {
    const OP: &str = "conv2d_backward_data";
    let g = geometry(OP, x_shape, w.shape(), p)?;
    dy.expect_shape(OP, "dy", &[g.n, g.oh, g.ow, g.o])?;
    Tensor::from_vec(input_grad(w.data(), dy.data(), &g, TUNING), x_shape)
}

/// [`conv2d_backward`] with explicit buffer sizes.
fn backward_tuned<T: Float>(
    x: &Tensor<T>,
    w: &Tensor<T>,
    dy: &Tensor<T>,
    p: Conv2dParams,
    need_dx: bool,
    need_db: bool,
    tu: Tuning,
) -> Result<Conv2dGrads<T>> {
    const OP: &str = "conv2d_backward";
    let g = geometry(OP, x.shape(), w.shape(), p)?;
    dy.expect_shape(OP, "dy", &[g.n, g.oh, g.ow, g.o])?;
    let db = if need_db {
        Some(Tensor::from_vec(bias_grad(dy.data(), g.o), &[g.o])?)
    } else {
        None
    };
    let dw = Tensor::from_vec(weight_grad(x.data(), dy.data(), &g, tu), w.shape())?;
    let dx = if need_dx {
        Some(Tensor::from_vec(
            input_grad(w.data(), dy.data(), &g, tu),
            x.shape(),
        )?)
    } else {
        None
    };
    Ok(Conv2dGrads { dx, dw, db })
}

/// `db[o] = Σ_rows dy[row, o]`: partial sums over fixed blocks of rows (in parallel), added in
/// block order.
fn bias_grad<T: Float>(dy: &[T], o: usize) -> Vec<T> {
    if o == 0 {
        return Vec::new();
    }
    let partials: Vec<Vec<T>> = dy
        .par_chunks(DB_ROWS_PER_TASK * o)
        .map(|block| {
            let mut acc = vec![T::ZERO; o];
            for row in block.chunks_exact(o) {
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += v;
                }
            }
            acc
        })
        .collect();
    let mut db = vec![T::ZERO; o];
    for part in partials {
        for (a, v) in db.iter_mut().zip(part) {
            *a += v;
        }
    }
    db
}

/// `dW[O, K] = dY[P, O]ᵀ · cols[P, K]`: the rows are split into one group per thread, each
/// rebuilding im2col chunk by chunk and accumulating its own partial; the partials are summed in
/// group order.
fn weight_grad<T: Float>(x: &[T], dy: &[T], g: &Geom, tu: Tuning) -> Vec<T> {
    let (rows, k, o) = (g.pixels(), g.k(), g.o);
    if rows == 0 {
        return vec![T::ZERO; o * k];
    }
    // With fewer outputs than patch values, `dWᵀ[K, O] = colsᵀ · dY` runs 10-25% faster in the
    // GEMM than `dYᵀ · cols` (measured: 64x147, 64x576, 128x1152); the result is transposed once
    // at the end, which is cheap below a million weights.
    let transposed = o < k && o * k <= tu.dw_transpose_max;
    // dw (+)= the product over the rows p0..p0+m whose im2col is `a`.
    let gemm = |a: &[T], p0: usize, m: usize, dw: &mut [T], acc: bool| {
        let d = &dy[p0 * o..(p0 + m) * o];
        if transposed {
            matmul(k, o, m, a, true, d, false, dw, acc);
        } else {
            matmul(o, k, m, d, true, a, false, dw, acc);
        }
    };
    let per_group = group_rows(rows, tu.min_chunk_rows);
    let partials: Vec<Vec<T>> = (0..rows.div_ceil(per_group))
        .into_par_iter()
        .map(|gi| {
            let (start, end) = (gi * per_group, ((gi + 1) * per_group).min(rows));
            let chunk = chunk_rows::<T>(end - start, tu.dw_chunk_bytes, k, tu.min_chunk_rows);
            let mut buf = if g.pointwise() {
                Vec::new()
            } else {
                vec![T::ZERO; chunk * k]
            };
            let mut dw = vec![T::ZERO; o * k];
            for p0 in (start..end).step_by(chunk) {
                let m = chunk.min(end - p0);
                if g.pointwise() {
                    gemm(&x[p0 * k..(p0 + m) * k], p0, m, &mut dw, p0 != start);
                } else {
                    im2col(x, g, p0, &mut buf[..m * k]);
                    gemm(&buf[..m * k], p0, m, &mut dw, p0 != start);
                }
            }
            dw
        })
        .collect();
    let mut parts = partials.into_iter();
    let mut dw = parts.next().unwrap_or_else(|| vec![T::ZERO; o * k]);
    for part in parts {
        dw.par_chunks_mut(4096)
            .zip(part.par_chunks(4096))
            .for_each(|(a, b)| {
                for (a, &b) in a.iter_mut().zip(b) {
                    *a += b;
                }
            });
    }
    if transposed {
        transpose_weight(&dw, k, o)
    } else {
        dw
    }
}

/// The input gradient `dX [N, H, W, C]`. A 1x1 stride-1 conv: the single GEMM `dY[P, O] · W[O, C]`.
/// Stride 1 (square kernel, `p < KH`): the forward conv of `dY` with the flipped weight. Otherwise
/// `col2im(dY · W)`: per chunk of output rows one multi-threaded GEMM into the `dcols` buffer,
/// then the parallel col2im.
fn input_grad<T: Float>(w: &[T], dy: &[T], g: &Geom, tu: Tuning) -> Vec<T> {
    let (k, o) = (g.k(), g.o);
    let mut dx = Vec::new();
    if g.pixels() == 0 {
        dx.resize(g.n * g.h * g.w * g.c, T::ZERO);
        return dx;
    }
    if g.pointwise() {
        dx.resize(g.pixels() * k, T::ZERO);
        matmul(g.pixels(), k, o, dy, false, w, false, &mut dx, false);
        return dx;
    }
    if let Some(gt) = g.transposed() {
        // Stride 1: dX is the forward conv of dY with the spatially flipped, in/out-swapped
        // weight (a "full" correlation): wt'[(ky', kx', o), c] = w[o, KH−1−ky', KW−1−kx', c].
        let mut wt = vec![T::ZERO; g.kh * g.kw * o * g.c];
        wt.par_chunks_mut(o * g.c)
            .enumerate()
            .for_each(|(t, rows)| {
                let (ky, kx) = (g.kh - 1 - t / g.kw, g.kw - 1 - t % g.kw);
                for (oi, row) in rows.chunks_exact_mut(g.c).enumerate() {
                    let src = ((oi * g.kh + ky) * g.kw + kx) * g.c;
                    row.copy_from_slice(&w[src..src + g.c]);
                }
            });
        return conv_gemm(dy, &gt, &wt, None, tu);
    }
    dx.resize(g.n * g.h * g.w * g.c, T::ZERO);
    let out_rows = g.n * g.oh;
    let row_k = g.ow * k;
    let chunk = (tu.dx_chunk_bytes / (row_k * std::mem::size_of::<T>()).max(1))
        .max(tu.min_chunk_rows.div_ceil(g.ow))
        .min(out_rows);
    let mut dcols = vec![T::ZERO; chunk * row_k];
    for r0 in (0..out_rows).step_by(chunk) {
        let r1 = (r0 + chunk).min(out_rows);
        let m = (r1 - r0) * g.ow;
        let dc = &mut dcols[..m * k];
        matmul(
            m,
            k,
            o,
            &dy[r0 * g.ow * o..r1 * g.ow * o],
            false,
            w,
            false,
            dc,
            false,
        );
        col2im_rows(dc, g, r0, r1, &mut dx);
    }
    dx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_gradients, randn64, GradCheck};

    /// Tiny buffers: many chunks and groups even for the small test shapes.
    const TINY: Tuning = Tuning {
        fwd_chunk_bytes: 1,
        dw_chunk_bytes: 1,
        dx_chunk_bytes: 1,
        min_chunk_rows: 3,
        dw_transpose_max: 1 << 20,
    };

    /// Direct 7-loop convolution, the definition.
    fn naive(
        x: &Tensor<f64>,
        w: &Tensor<f64>,
        b: Option<&Tensor<f64>>,
        p: Conv2dParams,
    ) -> Tensor<f64> {
        let g = geometry("naive", x.shape(), w.shape(), p).unwrap();
        let mut y = Tensor::zeros(&[g.n, g.oh, g.ow, g.o]);
        let (xd, wd) = (x.data(), w.data());
        for n in 0..g.n {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    for o in 0..g.o {
                        let mut s = b.map_or(0.0, |b| b.data()[o]);
                        for ky in 0..g.kh {
                            for kx in 0..g.kw {
                                let iy = (oy * g.s + ky) as isize - g.p as isize;
                                let ix = (ox * g.s + kx) as isize - g.p as isize;
                                if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                                    continue;
                                }
                                for c in 0..g.c {
                                    s += xd
                                        [((n * g.h + iy as usize) * g.w + ix as usize) * g.c + c]
                                        * wd[((o * g.kh + ky) * g.kw + kx) * g.c + c];
                                }
                            }
                        }
                        y.data_mut()[((n * g.oh + oy) * g.ow + ox) * g.o + o] = s;
                    }
                }
            }
        }
        y
    }

    /// (name, x shape, weight shape, stride, padding, bias)
    #[allow(clippy::type_complexity)]
    const CASES: &[(&str, [usize; 4], [usize; 4], usize, usize, bool)] = &[
        ("1x1_s1", [2, 5, 7, 3], [4, 1, 1, 3], 1, 0, false),
        ("1x1_s2", [2, 7, 5, 4], [3, 1, 1, 4], 2, 0, false),
        ("3x3_s1_p1", [2, 5, 7, 3], [4, 3, 3, 3], 1, 1, false),
        ("3x3_s2_p1", [3, 7, 6, 4], [5, 3, 3, 4], 2, 1, true),
        ("7x7_s2_p3", [2, 11, 9, 3], [4, 7, 7, 3], 2, 3, false),
        ("patch_4x4_s4", [2, 8, 13, 3], [5, 4, 4, 3], 4, 0, true),
    ];

    fn inputs(name: &str, xs: [usize; 4], ws: [usize; 4], bias: bool) -> Vec<Tensor<f64>> {
        let mut v = vec![
            randn64(1, &format!("{name}.x"), &xs),
            randn64(1, &format!("{name}.w"), &ws),
        ];
        if bias {
            v.push(randn64(1, &format!("{name}.b"), &[ws[0]]));
        }
        v
    }

    #[test]
    fn forward_matches_the_definition() {
        for &(name, xs, ws, s, pad, bias) in CASES {
            let p = Conv2dParams {
                stride: s,
                padding: pad,
            };
            let v = inputs(name, xs, ws, bias);
            let want = naive(&v[0], &v[1], v.get(2), p);
            for tu in [TUNING, TINY] {
                let got = forward_tuned(&v[0], &v[1], v.get(2), p, tu).unwrap();
                assert_eq!(got.shape(), want.shape(), "{name}");
                for (a, b) in got.data().iter().zip(want.data()) {
                    assert!(
                        (a - b).abs() < 1e-12 * (1.0 + b.abs()),
                        "{name}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        for &(name, xs, ws, s, pad, bias) in CASES {
            let p = Conv2dParams {
                stride: s,
                padding: pad,
            };
            let v = inputs(name, xs, ws, bias);
            check_gradients(
                name,
                &v,
                |v| conv2d_forward(&v[0], &v[1], v.get(2), p),
                |v, dy| {
                    let g = conv2d_backward(&v[0], &v[1], dy, p, true, v.len() == 3)?;
                    let mut out = vec![g.dx, Some(g.dw)];
                    if v.len() == 3 {
                        out.push(g.db);
                    }
                    Ok(out)
                },
                GradCheck::default(),
            );
        }
    }

    #[test]
    fn chunked_backward_matches_unchunked() {
        for &(name, xs, ws, s, pad, bias) in CASES {
            let p = Conv2dParams {
                stride: s,
                padding: pad,
            };
            let v = inputs(name, xs, ws, bias);
            let y = conv2d_forward(&v[0], &v[1], v.get(2), p).unwrap();
            let dy = randn64(2, &format!("{name}.dy"), y.shape());
            let a = backward_tuned(&v[0], &v[1], &dy, p, true, bias, TUNING).unwrap();
            let b = backward_tuned(&v[0], &v[1], &dy, p, true, bias, TINY).unwrap();
            let pairs = [(a.dx, b.dx), (Some(a.dw), Some(b.dw)), (a.db, b.db)];
            for (i, (ga, gb)) in pairs.into_iter().enumerate() {
                assert_eq!(ga.is_some(), gb.is_some());
                if let (Some(ga), Some(gb)) = (ga, gb) {
                    for (u, w) in ga.data().iter().zip(gb.data()) {
                        assert!(
                            (u - w).abs() < 1e-12 * (1.0 + w.abs()),
                            "{name} grad {i}: {u} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn results_are_bit_identical_across_runs() {
        for &(name, xs, ws, s, pad, bias) in CASES {
            let p = Conv2dParams {
                stride: s,
                padding: pad,
            };
            let v = inputs(name, xs, ws, bias);
            let y = conv2d_forward(&v[0], &v[1], v.get(2), p).unwrap();
            let dy = randn64(3, &format!("{name}.dy"), y.shape());
            for tu in [TUNING, TINY] {
                let a = backward_tuned(&v[0], &v[1], &dy, p, true, bias, tu).unwrap();
                let b = backward_tuned(&v[0], &v[1], &dy, p, true, bias, tu).unwrap();
                assert_eq!(a.dx, b.dx, "{name}");
                assert_eq!(a.dw, b.dw, "{name}");
                assert_eq!(a.db, b.db, "{name}");
                let fwd = || forward_tuned(&v[0], &v[1], v.get(2), p, tu).unwrap();
                assert_eq!(fwd(), fwd(), "{name}");
            }
        }
    }

    #[test]
    fn optional_gradients_are_skipped() {
        let p = Conv2dParams {
            stride: 2,
            padding: 3,
        };
        let x = randn64(3, "x", &[1, 9, 9, 3]);
        let w = randn64(3, "w", &[2, 7, 7, 3]);
        let dy = randn64(3, "dy", &[1, 5, 5, 2]);
        let g = conv2d_backward(&x, &w, &dy, p, false, false).unwrap();
        assert!(g.dx.is_none() && g.db.is_none());
        assert_eq!(g.dw.shape(), w.shape());
    }

    #[test]
    fn backward_data_alone_is_the_full_backwards_dx() {
        let p = Conv2dParams {
            stride: 2,
            padding: 3,
        };
        let x = randn64(4, "x", &[2, 9, 11, 3]);
        let w = randn64(4, "w", &[5, 7, 7, 3]);
        let dy = randn64(4, "dy", &[2, 5, 6, 5]);
        let full = conv2d_backward(&x, &w, &dy, p, true, false).unwrap();
        let dx = conv2d_backward_data(x.shape(), &w, &dy, p).unwrap();
        assert_eq!(Some(dx), full.dx);
        assert!(conv2d_backward_data(&[2, 9, 11], &w, &dy, p).is_err());
        assert!(conv2d_backward_data(x.shape(), &w, &randn64(4, "d", &[2, 5, 5, 5]), p).is_err());
    }

    #[test]
    fn shape_errors_name_the_shapes() {
        let p = Conv2dParams {
            stride: 1,
            padding: 1,
        };
        let x = Tensor::<f64>::zeros(&[2, 5, 5, 3]);
        let w = Tensor::<f64>::zeros(&[4, 3, 3, 2]);
        let e = conv2d_forward(&x, &w, None, p).unwrap_err().to_string();
        assert!(
            e.contains("conv2d_forward")
                && e.contains("[4, 3, 3, 2]")
                && e.contains("[2, 5, 5, 3]"),
            "{e}"
        );
        let w = Tensor::<f64>::zeros(&[4, 3, 3, 3]);
        let b = Tensor::<f64>::zeros(&[5]);
        let e = conv2d_forward(&x, &w, Some(&b), p).unwrap_err().to_string();
        assert!(e.contains("bias") && e.contains("[5]"), "{e}");
        let big = Tensor::<f64>::zeros(&[4, 9, 9, 3]);
        let e = conv2d_forward(&x, &big, None, p).unwrap_err().to_string();
        assert!(e.contains("smaller than the kernel"), "{e}");
        let dy = Tensor::<f64>::zeros(&[2, 4, 5, 4]);
        let e = conv2d_backward(&x, &w, &dy, p, true, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("conv2d_backward")
                && e.contains("[2, 4, 5, 4]")
                && e.contains("[2, 5, 5, 4]"),
            "{e}"
        );
        let e = conv2d_forward(
            &x,
            &w,
            None,
            Conv2dParams {
                stride: 0,
                padding: 0,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("stride"), "{e}");
        let e = conv2d_forward(&Tensor::<f64>::zeros(&[5, 5, 3]), &w, None, p).unwrap_err();
        assert!(e.to_string().contains("[5, 5, 3]"), "{e}");
    }
}
