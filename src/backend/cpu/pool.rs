//! Pooling: ResNet's stem max-pool (3x3, stride 2, padding 1) and the global average pool before
//! the head, forward and backward.
//!
//! Layout NHWC `[N, H, W, C]`: a pixel's channels are contiguous, so every inner loop runs over
//! `C` (vectorisable) and a window is visited pixel by pixel. Max-pool follows PyTorch: padded
//! positions never win (they are −∞), floor mode, NaN propagates, ties go to the first maximum in
//! window order (row-major), whose index is saved for the backward's scatter-add. The max-pool's
//! channel loop is branch-free and compiled for AVX-512 / AVX2 at run time (see `simd`): it is the
//! one compute-bound loop here.

use crate::error::{Error, Result};
use crate::tensor::{Float, Tensor};
use rayon::prelude::*;

/// Window of a 2-D max-pool (square kernel, stride and padding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxPool2dParams {
    /// Window size, ≥ 1.
    pub kernel: usize,
    /// Step between windows, ≥ 1.
    pub stride: usize,
    /// Implicit −∞ padding on each side, at most `kernel / 2` (as PyTorch requires).
    pub padding: usize,
}

/// What [`max_pool2d_backward`] needs from the forward.
#[derive(Clone, Debug)]
pub struct MaxPool2dSaved {
    /// Shape of the input `[N, H, W, C]`.
    pub x_shape: [usize; 4],
    /// Shape of the output `[N, OH, OW, C]`.
    pub y_shape: [usize; 4],
    /// For every output element `[N, OH, OW, C]`, the position `iy·W + ix` of its maximum within
    /// its image (PyTorch's `indices`), u32 to halve the memory of i64.
    pub argmax: Vec<u32>,
}

/// Max-pool over `x [N, H, W, C]` → `y [N, OH, OW, C]` with `OH = (H + 2p − k)/s + 1`, plus the
/// arg-max of each output for the backward.
///
/// Parallel over output rows; for each output pixel the window's pixels are visited in row-major
/// order and compared channel-wise against the running maximum (`>`, so the first maximum wins;
/// NaN replaces it, as in PyTorch), with vector selects rather than branches.
pub fn max_pool2d_forward<T: Float>(
    x: &Tensor<T>,
    p: MaxPool2dParams,
) -> Result<(Tensor<T>, MaxPool2dSaved)> {
    const OP: &str = "max_pool2d_forward";
    x.expect_rank(OP, "input (NHWC)", 4)?;
    let (n, h, w, c) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    if p.kernel == 0 || p.stride == 0 || 2 * p.padding > p.kernel {
        return Err(Error::invalid(
            OP,
            format!(
                "kernel {} and stride {} must be ≥ 1 and padding {} at most half the kernel",
                p.kernel, p.stride, p.padding
            ),
        ));
    }
    if h + 2 * p.padding < p.kernel || w + 2 * p.padding < p.kernel {
        return Err(Error::shape(
            OP,
            format!(
                "input {:?} with padding {} is smaller than the {}x{} window",
                x.shape(),
                p.padding,
                p.kernel,
                p.kernel
            ),
        ));
    }
    if h * w > u32::MAX as usize {
        return Err(Error::invalid(
            OP,
            format!("input {:?}: H·W does not fit the u32 arg-max", x.shape()),
        ));
    }
    let oh = (h + 2 * p.padding - p.kernel) / p.stride + 1;
    let ow = (w + 2 * p.padding - p.kernel) / p.stride + 1;
    let mut y = Tensor::zeros(&[n, oh, ow, c]);
    let mut argmax = vec![0u32; n * oh * ow * c];
    let row_len = ow * c;
    if n * oh * row_len == 0 {
        return Ok((
            y,
            MaxPool2dSaved {
                x_shape: [n, h, w, c],
                y_shape: [n, oh, ow, c],
                argmax,
            },
        ));
    }
    let xd = x.data();
    y.data_mut()
        .par_chunks_mut(row_len)
        .zip(argmax.par_chunks_mut(row_len))
        .enumerate()
        .for_each(|(r, (y_row, a_row))| {
            let (ni, oy) = (r / oh, r % oh);
            let img = &xd[ni * h * w * c..(ni + 1) * h * w * c];
            simd::dispatch(PoolRow {
                img,
                h,
                w,
                c,
                p,
                oy,
                y_row,
                a_row,
            });
        });
    Ok((
        y,
        MaxPool2dSaved {
            x_shape: [n, h, w, c],
            y_shape: [n, oh, ow, c],
            argmax,
        },
    ))
}

/// One output row `oy` of a max-pool over image `img [H, W, C]`: maxima into `y_row [OW, C]`,
/// their positions into `a_row`.
struct PoolRow<'a, T> {
    img: &'a [T],
    h: usize,
    w: usize,
    c: usize,
    p: MaxPool2dParams,
    oy: usize,
    y_row: &'a mut [T],
    a_row: &'a mut [u32],
}

/// Channels per register-resident block of the max-pool (one AVX-512 register of f32).
const LANES: usize = 16;

/// Clipped window `[lo, hi)` of output position `o` along an axis of `size` pixels.
#[inline(always)]
fn window(p: &MaxPool2dParams, o: usize, size: usize) -> (usize, usize) {
    let start = (o * p.stride) as isize - p.padding as isize;
    let lo = start.max(0) as usize;
    let hi = ((start + p.kernel as isize) as usize).min(size);
    (lo, hi)
}

impl<T: Float> simd::Kernel for PoolRow<'_, T> {
    #[inline(always)]
    fn run(self) {
        let PoolRow {
            img,
            h,
            w,
            c,
            p,
            oy,
            y_row,
            a_row,
        } = self;
        let (y_lo, y_hi) = window(&p, oy, h);
        for (ox, (best, arg)) in y_row
            .chunks_exact_mut(c)
            .zip(a_row.chunks_exact_mut(c))
            .enumerate()
        {
            let (x_lo, x_hi) = window(&p, ox, w);
            let first = (y_lo * w + x_lo) as u32;
            // Blocks of LANES channels whose running maximum stays in registers for the whole
            // window; the remaining channels go through the same update from memory.
            let blocks = c / LANES * LANES;
            for cb in (0..blocks).step_by(LANES) {
                let mut b = [T::neg_infinity(); LANES];
                let mut a = [first; LANES];
                for iy in y_lo..y_hi {
                    for ix in x_lo..x_hi {
                        let pos = iy * w + ix;
                        let px = &img[pos * c + cb..pos * c + cb + LANES];
                        max_update(&mut b, &mut a, px, pos as u32);
                    }
                }
                best[cb..cb + LANES].copy_from_slice(&b);
                arg[cb..cb + LANES].copy_from_slice(&a);
            }
            let (best, arg) = (&mut best[blocks..], &mut arg[blocks..]);
            best.fill(T::neg_infinity());
            arg.fill(first);
            for iy in y_lo..y_hi {
                for ix in x_lo..x_hi {
                    let pos = iy * w + ix;
                    max_update(best, arg, &img[pos * c + blocks..(pos + 1) * c], pos as u32);
                }
            }
        }
    }
}

/// Folds one window pixel `px` (at position `pos`) into the running channel-wise maximum `best`
/// and its position `arg`: takes `px` where it is larger (so the first maximum wins) or NaN.
/// Written as loads, selects and unconditional stores so that it vectorises; a branch per element
/// would mispredict on every random comparison.
#[inline(always)]
fn max_update<T: Float>(best: &mut [T], arg: &mut [u32], px: &[T], pos: u32) {
    let n = best.len().min(arg.len()).min(px.len());
    let (best, arg, px) = (&mut best[..n], &mut arg[..n], &px[..n]);
    for i in 0..n {
        let (v, b, a) = (px[i], best[i], arg[i]);
        let take = (v > b) | v.is_nan();
        best[i] = if take { v } else { b };
        arg[i] = if take { pos } else { a };
    }
}

/// Runs a kernel compiled for the widest vector unit the CPU has. The crate builds for baseline
/// x86-64 (SSE2) so that one binary runs everywhere; the element-wise loops of this file gain 2-4x
/// from AVX2 / AVX-512, so their kernels are inlined into copies compiled with those features and
/// the copy matching the CPU is picked at run time (a cached check).
mod simd {
    /// A loop body to compile once per instruction set; `run` must be `#[inline(always)]` so that
    /// it is compiled into each feature-enabled copy.
    pub trait Kernel {
        fn run(self);
    }

    /// Calls `k.run()` through the AVX-512 or AVX2 copy where the CPU supports it.
    #[inline(always)]
    pub fn dispatch(k: impl Kernel) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU supports AVX-512F, checked just above.
                return unsafe { avx512(k) };
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU supports AVX2 and FMA, checked just above.
                return unsafe { avx2(k) };
            }
        }
        k.run()
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn avx512(k: impl Kernel) {
        k.run()
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(k: impl Kernel) {
        k.run()
    }
}

/// Backward of [`max_pool2d_forward`]: `dx [N, H, W, C]` gets each `dy` value added at its
/// window's arg-max (windows overlap when stride < kernel, so positions can receive several).
///
/// Parallel over images (every scatter stays inside its image, so writes never race); within an
/// image the outputs are visited in order, so the sums are deterministic.
pub fn max_pool2d_backward<T: Float>(dy: &Tensor<T>, saved: &MaxPool2dSaved) -> Result<Tensor<T>> {
    const OP: &str = "max_pool2d_backward";
    let [n, h, w, c] = saved.x_shape;
    if dy.shape() != saved.y_shape || saved.argmax.len() != dy.numel() {
        return Err(Error::shape(
            OP,
            format!(
                "dy has shape {:?}, but the forward mapped input {:?} to {:?} ({} arg-max entries saved)",
                dy.shape(),
                saved.x_shape,
                saved.y_shape,
                saved.argmax.len()
            ),
        ));
    }
    let mut dx = Tensor::zeros(&saved.x_shape);
    let img_out = dy.numel() / n.max(1);
    if dx.numel() == 0 || img_out == 0 {
        return Ok(dx);
    }
    let (dyd, args) = (dy.data(), &saved.argmax);
    dx.data_mut()
        .par_chunks_mut(h * w * c)
        .enumerate()
        .for_each(|(ni, dx_img)| {
            let range = ni * img_out..(ni + 1) * img_out;
            for (g, a) in dyd[range.clone()]
                .chunks_exact(c)
                .zip(args[range].chunks_exact(c))
            {
                for (ch, (&v, &pos)) in g.iter().zip(a).enumerate() {
                    dx_img[pos as usize * c + ch] += v;
                }
            }
        });
    Ok(dx)
}

/// Global average pool `x [N, H, W, C]` → `y [N, C]`, the mean over all pixels of each channel.
/// Parallel over images; each sums its pixels' contiguous channel vectors.
pub fn global_avg_pool_forward<T: Float>(x: &Tensor<T>) -> Result<Tensor<T>> {
    const OP: &str = "global_avg_pool_forward";
    x.expect_rank(OP, "input (NHWC)", 4)?;
    let (n, h, w, c) = (x.dim(0), x.dim(1), x.dim(2), x.dim(3));
    let mut y = Tensor::zeros(&[n, c]);
    if h * w == 0 || c == 0 {
        return Ok(y);
    }
    let scale = T::one() / T::c((h * w) as f64);
    y.data_mut()
        .par_chunks_mut(c)
        .zip(x.data().par_chunks(h * w * c))
        .for_each(|(acc, img)| {
            for px in img.chunks_exact(c) {
                for (a, &v) in acc.iter_mut().zip(px) {
                    *a += v;
                }
            }
            for a in acc.iter_mut() {
                *a *= scale;
            }
        });
    Ok(y)
}

/// Backward of [`global_avg_pool_forward`]: every pixel of image `n` gets `dy[n] / (H·W)`.
/// `x_shape` is the forward's input shape `[N, H, W, C]`.
pub fn global_avg_pool_backward<T: Float>(dy: &Tensor<T>, x_shape: &[usize]) -> Result<Tensor<T>> {
    const OP: &str = "global_avg_pool_backward";
    if x_shape.len() != 4 {
        return Err(Error::shape(
            OP,
            format!("input shape {x_shape:?} must have 4 dimensions (NHWC)"),
        ));
    }
    let (n, h, w, c) = (x_shape[0], x_shape[1], x_shape[2], x_shape[3]);
    dy.expect_shape(OP, "dy", &[n, c])?;
    let mut dx = Tensor::zeros(x_shape);
    if dx.numel() == 0 {
        return Ok(dx);
    }
    let scale = T::one() / T::c((h * w) as f64);
    dx.data_mut()
        .par_chunks_mut(h * w * c)
        .zip(dy.data().par_chunks(c))
        .for_each(|(img, g)| {
            for px in img.chunks_exact_mut(c) {
                for (d, &v) in px.iter_mut().zip(g) {
                    *d = v * scale;
                }
            }
        });
    Ok(dx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_gradients, randn64, GradCheck};

    /// Distinct values: a random permutation of 0..n scaled, plus small noise, so that every
    /// window's maximum is unique and a finite-difference step (1e-6) cannot change which wins.
    fn distinct(seed: u64, shape: &[usize]) -> Tensor<f64> {
        let n: usize = shape.iter().product();
        let mut r = crate::rng::Rng::named(seed, "distinct");
        let perm = r.permutation(n);
        let noise = randn64(seed, "noise", shape);
        let data = perm
            .iter()
            .zip(noise.data())
            .map(|(&p, &e)| p as f64 * 0.01 + 1e-4 * e)
            .collect();
        Tensor::from_vec(data, shape).unwrap()
    }

    const POOLS: &[([usize; 4], MaxPool2dParams)] = &[
        (
            [2, 9, 7, 3],
            MaxPool2dParams {
                kernel: 3,
                stride: 2,
                padding: 1,
            },
        ),
        (
            [3, 6, 5, 4],
            MaxPool2dParams {
                kernel: 2,
                stride: 2,
                padding: 0,
            },
        ),
        (
            [2, 7, 8, 3],
            MaxPool2dParams {
                kernel: 3,
                stride: 1,
                padding: 1,
            },
        ),
        // 16-channel register blocks plus a tail.
        (
            [2, 7, 6, 19],
            MaxPool2dParams {
                kernel: 3,
                stride: 2,
                padding: 1,
            },
        ),
    ];

    #[test]
    fn max_pool_matches_the_definition() {
        for &(shape, p) in POOLS {
            let x = distinct(4, &shape);
            let (y, saved) = max_pool2d_forward(&x, p).unwrap();
            let [n, h, w, c] = shape;
            let (oh, ow) = (y.dim(1), y.dim(2));
            assert_eq!(oh, (h + 2 * p.padding - p.kernel) / p.stride + 1);
            for ni in 0..n {
                for oy in 0..oh {
                    for ox in 0..ow {
                        for ci in 0..c {
                            let mut best = (f64::NEG_INFINITY, 0);
                            for ky in 0..p.kernel {
                                for kx in 0..p.kernel {
                                    let iy = (oy * p.stride + ky) as isize - p.padding as isize;
                                    let ix = (ox * p.stride + kx) as isize - p.padding as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let pos = iy as usize * w + ix as usize;
                                    let v = x.data()[(ni * h * w + pos) * c + ci];
                                    if v > best.0 {
                                        best = (v, pos);
                                    }
                                }
                            }
                            let o = ((ni * oh + oy) * ow + ox) * c + ci;
                            assert_eq!(y.data()[o], best.0);
                            assert_eq!(saved.argmax[o] as usize, best.1);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn max_pool_ties_go_to_the_first_and_nan_propagates() {
        let p = MaxPool2dParams {
            kernel: 2,
            stride: 2,
            padding: 0,
        };
        let x = Tensor::from_vec(vec![1.0f64, 3.0, 3.0, 2.0], &[1, 2, 2, 1]).unwrap();
        let (y, s) = max_pool2d_forward(&x, p).unwrap();
        assert_eq!((y.data()[0], s.argmax[0]), (3.0, 1));
        let x = Tensor::from_vec(vec![1.0f64, f64::NAN, 3.0, 2.0], &[1, 2, 2, 1]).unwrap();
        let (y, s) = max_pool2d_forward(&x, p).unwrap();
        assert!(y.data()[0].is_nan());
        assert_eq!(s.argmax[0], 1);
    }

    #[test]
    fn max_pool_gradient() {
        for &(shape, p) in POOLS {
            let x = distinct(5, &shape);
            check_gradients(
                "max_pool2d",
                std::slice::from_ref(&x),
                |v| Ok(max_pool2d_forward(&v[0], p)?.0),
                |v, dy| {
                    let (_, saved) = max_pool2d_forward(&v[0], p)?;
                    Ok(vec![Some(max_pool2d_backward(dy, &saved)?)])
                },
                GradCheck::default(),
            );
        }
    }

    #[test]
    fn avg_pool_forward_and_gradient() {
        let x = randn64(6, "x", &[3, 5, 7, 4]);
        let y = global_avg_pool_forward(&x).unwrap();
        assert_eq!(y.shape(), &[3, 4]);
        let want: f64 = (0..35).map(|p| x.data()[(35 + p) * 4 + 2]).sum::<f64>() / 35.0;
        assert!((y.data()[4 + 2] - want).abs() < 1e-12);
        check_gradients(
            "global_avg_pool",
            std::slice::from_ref(&x),
            |v| global_avg_pool_forward(&v[0]),
            |v, dy| Ok(vec![Some(global_avg_pool_backward(dy, v[0].shape())?)]),
            GradCheck::default(),
        );
    }

    #[test]
    fn shape_errors_name_the_shapes() {
        let p = MaxPool2dParams {
            kernel: 3,
            stride: 2,
            padding: 1,
        };
        let e = max_pool2d_forward(&Tensor::<f64>::zeros(&[2, 5, 5]), p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("max_pool2d_forward") && e.contains("[2, 5, 5]"),
            "{e}"
        );
        let e = max_pool2d_forward(
            &Tensor::<f64>::zeros(&[1, 1, 1, 2]),
            MaxPool2dParams {
                kernel: 5,
                stride: 1,
                padding: 1,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("[1, 1, 1, 2]"), "{e}");
        let bad = MaxPool2dParams {
            kernel: 3,
            stride: 2,
            padding: 2,
        };
        assert!(max_pool2d_forward(&Tensor::<f64>::zeros(&[1, 5, 5, 2]), bad).is_err());
        let (_, saved) = max_pool2d_forward(&Tensor::<f64>::zeros(&[2, 5, 5, 3]), p).unwrap();
        let e = max_pool2d_backward(&Tensor::<f64>::zeros(&[2, 3, 3, 4]), &saved)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("max_pool2d_backward")
                && e.contains("[2, 3, 3, 4]")
                && e.contains("[2, 5, 5, 3]"),
            "{e}"
        );
        let e = global_avg_pool_forward(&Tensor::<f64>::zeros(&[2, 3]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("global_avg_pool_forward") && e.contains("[2, 3]"),
            "{e}"
        );
        let e = global_avg_pool_backward(&Tensor::<f64>::zeros(&[2, 4]), &[2, 3, 3, 5])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("global_avg_pool_backward") && e.contains("[2, 4]") && e.contains("[2, 5]"),
            "{e}"
        );
    }
}
