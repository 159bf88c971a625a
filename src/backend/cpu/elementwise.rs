//! Element-wise ops: ReLU, GELU (exact, erf form), residual add and per-sample drop path
//! (stochastic depth), forward and backward, plus the small helpers every memory-bound CPU kernel
//! of this backend shares.
//!
//! These ops are memory-bound: each does exactly one read of every input and one write of the
//! output, in parallel over fixed chunks of [`CHUNK`] elements, with the output allocated
//! uninitialised (no zero-fill pass: see [`par_fill`]) and, from 16 MB on, written with streaming
//! stores (no read-for-ownership: see [`emit`]). Inner loops run inside [`simd`], which compiles
//! them with AVX2+FMA when the CPU has it (the crate targets baseline x86-64, where LLVM would only
//! use 4-wide SSE2). GELU in f32 evaluates erf and exp with branch-free polynomials that LLVM
//! vectorises (it is compute-bound: ~30 vector operations per 8 values); in f64 (gradient
//! checks) it calls `libm::erf`.
//!
//! Layout: any shape; drop path treats dimension 0 as the sample dimension.

use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tensor::{DType, Float, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Elements per parallel task of the element-wise kernels: large enough that rayon's scheduling
/// cost is negligible (~64K elements, 256 KB of f32), small enough to balance two cores.
pub(crate) const CHUNK: usize = 1 << 16;

/// Runs `f` compiled with AVX2 and FMA enabled when the CPU supports them, else as is.
///
/// The crate is built for baseline x86-64; a kernel that is `#[inline(always)]` and called inside
/// `f` is inlined into the `target_feature` function and vectorised 8-wide. Call it inside each
/// rayon task (not around a parallel loop: rayon's workers would not inherit the features).
#[inline(always)]
pub(crate) fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports every feature `avx2` is compiled with (checked just above).
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// Allocates a vector of `n` elements and fills it in parallel: `f(i, chunk)` writes chunk `i`,
/// the elements `[i * chunk_len, min((i + 1) * chunk_len, n))`.
///
/// The output is never zero-filled first: for a memory-bound op that would be one more full
/// write pass over memory (glibc's `calloc` memsets reused memory).
///
/// # Safety
/// `f` must write every element of the chunk it is given (e.g. by zipping it with input chunks
/// of the same length). Elements it leaves unwritten would be read uninitialised.
pub(crate) unsafe fn par_fill<T, F>(n: usize, chunk_len: usize, f: F) -> Vec<T>
where
    T: Send,
    F: Fn(usize, &mut [MaybeUninit<T>]) + Sync + Send,
{
    let mut v: Vec<T> = Vec::with_capacity(n);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(chunk_len.max(1))
        .enumerate()
        .for_each(|(i, c)| f(i, c));
    // SAFETY: the caller guarantees that `f` initialised every element of every chunk, and the
    // chunks cover `0..n` (a panic inside `f` propagates before this line).
    unsafe { v.set_len(n) };
    v
}

/// Outputs of at least this many bytes are written with streaming (non-temporal) stores: they
/// do not stay in cache for the next op anyway, and ordinary stores would first read every
/// destination line (read-for-ownership), a third memory stream next to the input read and the
/// output write.
pub(crate) const STREAM_MIN_BYTES: usize = 16 << 20;

/// Largest tile (elements) [`emit`] stages through its stack buffer: 1 KB of f32, cache-line
/// aligned, stays in L1. (Measured on Zen 4: an unaligned buffer cost ~40% over direct streaming;
/// aligned, 256-element tiles cost nothing and keep the per-tile overhead of the per-channel
/// batch-norm kernels low.)
pub(crate) const TILE: usize = 256;

/// Whether an output of `n` elements of `T` is large enough to be streamed.
pub(crate) fn should_stream<T>(n: usize) -> bool {
    n * size_of::<T>() >= STREAM_MIN_BYTES
}

/// Writes `out` through `kernel(offset, dst)`, which computes the elements
/// `offset..offset + dst.len()` of `out` into `dst` and must initialise all of `dst`.
///
/// Without `stream` the kernel writes `out` directly (`offset` 0). With `stream` it fills a stack
/// tile of `tile` elements at a time, which is then copied to `out` with non-temporal stores
/// (see [`STREAM_MIN_BYTES`]), and a store fence ends the task so that the data is visible to the
/// thread that joins it. Streaming needs f32, a 16-byte-aligned `out` and a `tile` that is a
/// multiple of 4 and at most [`TILE`]; otherwise the direct path is taken.
#[inline(always)]
pub(crate) fn emit<T: Float>(
    out: &mut [MaybeUninit<T>],
    stream: bool,
    tile: usize,
    kernel: impl Fn(usize, &mut [MaybeUninit<T>]),
) {
    #[cfg(target_arch = "x86_64")]
    if stream
        && T::DTYPE == DType::F32
        && tile > 0
        && tile <= TILE
        && tile.is_multiple_of(4)
        && (out.as_ptr() as usize).is_multiple_of(16)
    {
        // Cache-line aligned: unaligned vector stores into the tile would straddle lines.
        #[repr(align(64))]
        struct Tile<T>([MaybeUninit<T>; TILE]);
        let mut buf = Tile([const { MaybeUninit::<T>::uninit() }; TILE]);
        for (i, dst) in out.chunks_mut(tile).enumerate() {
            let b = &mut buf.0[..dst.len()];
            kernel(i * tile, b);
            // SAFETY: `kernel` initialised all of `b`; T is f32 (checked above), so both pointers
            // address `dst.len()` f32 values; `dst` starts at a multiple of `tile` (a multiple of
            // 4 f32 = 16 bytes) from the 16-byte-aligned `out`.
            unsafe { stream_f32(dst.as_mut_ptr().cast(), b.as_ptr().cast(), dst.len()) };
        }
        // SAFETY: `sfence` is part of SSE, which every x86-64 CPU has.
        unsafe { std::arch::x86_64::_mm_sfence() };
        return;
    }
    kernel(0, out);
}

/// Copies `n` f32 from `src` to `dst` with 16-byte non-temporal stores (SSE: available on every
/// x86-64 CPU, whichever path [`simd`] took); a tail of fewer than 4 values is stored normally.
///
/// # Safety
/// `src` must be readable and `dst` writable for `n` values, and `dst` 16-byte aligned.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn stream_f32(dst: *mut f32, src: *const f32, n: usize) {
    use std::arch::x86_64::{_mm_loadu_ps, _mm_stream_ps};
    let n4 = n / 4 * 4;
    let mut i = 0;
    while i < n4 {
        // SAFETY: i + 4 <= n and dst + i is 16-byte aligned (dst is, i is a multiple of 4).
        unsafe { _mm_stream_ps(dst.add(i), _mm_loadu_ps(src.add(i))) };
        i += 4;
    }
    while i < n {
        // SAFETY: i < n.
        unsafe { *dst.add(i) = *src.add(i) };
        i += 1;
    }
}

/// `out[i] = f(x[i])` over a whole tensor, parallel and vectorised; the shared body of the
/// unary element-wise ops.
#[inline(always)]
fn map_unary<T: Float>(x: &[T], f: impl Fn(T) -> T + Sync + Send + Copy) -> Vec<T> {
    let stream = should_stream::<T>(x.len());
    // SAFETY: each output chunk has the length of the input chunk of the same index, and the
    // kernel writes every element of the part of it `emit` hands over.
    unsafe {
        par_fill(x.len(), CHUNK, |i, out| {
            let xs = &x[i * CHUNK..i * CHUNK + out.len()];
            simd(
                #[inline(always)]
                || {
                    emit(
                        out,
                        stream,
                        TILE,
                        #[inline(always)]
                        |off, o| {
                            for (o, &v) in o.iter_mut().zip(&xs[off..]) {
                                o.write(f(v));
                            }
                        },
                    )
                },
            )
        })
    }
}

/// `out[i] = f(a[i], b[i])`, parallel and vectorised (`a` and `b` of equal length).
#[inline(always)]
fn map_binary<T: Float>(a: &[T], b: &[T], f: impl Fn(T, T) -> T + Sync + Send + Copy) -> Vec<T> {
    debug_assert_eq!(a.len(), b.len());
    let stream = should_stream::<T>(a.len());
    // SAFETY: as in `map_unary`; `a` and `b` have the output's length.
    unsafe {
        par_fill(a.len(), CHUNK, |i, out| {
            let r = i * CHUNK..i * CHUNK + out.len();
            let (aa, bb) = (&a[r.clone()], &b[r]);
            simd(
                #[inline(always)]
                || {
                    emit(
                        out,
                        stream,
                        TILE,
                        #[inline(always)]
                        |off, o| {
                            for ((o, &u), &v) in o.iter_mut().zip(&aa[off..]).zip(&bb[off..]) {
                                o.write(f(u, v));
                            }
                        },
                    )
                },
            )
        })
    }
}

/// Errors unless `a` and `b` have the same shape.
fn same_shape<T: Float>(op: &'static str, what: &str, a: &Tensor<T>, b: &Tensor<T>) -> Result<()> {
    if a.shape() != b.shape() {
        return Err(Error::shape(
            op,
            format!("{what}: shapes {:?} and {:?} differ", a.shape(), b.shape()),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// ReLU

/// ReLU forward, `y = max(x, 0)` element-wise (any shape). NaN propagates, as in PyTorch.
pub fn relu_forward<T: Float>(x: &Tensor<T>) -> Result<Tensor<T>> {
    let zero = T::zero();
    let y = map_unary(
        x.data(),
        #[inline(always)]
        move |v| if v < zero { zero } else { v },
    );
    Tensor::from_vec(y, x.shape())
}

/// ReLU backward from the forward's OUTPUT: `dx = dy · [y > 0]` (as PyTorch's
/// `threshold_backward`; keeping `y` rather than `x` lets the forward run in place of its input).
pub fn relu_backward<T: Float>(dy: &Tensor<T>, y: &Tensor<T>) -> Result<Tensor<T>> {
    same_shape("relu_backward", "dy vs y", dy, y)?;
    let zero = T::zero();
    let dx = map_binary(
        dy.data(),
        y.data(),
        move |g, v| if v > zero { g } else { zero },
    );
    Tensor::from_vec(dx, dy.shape())
}

// ---------------------------------------------------------------------------------------------
// GELU

/// `(Φ(x), φ(x))` for f32, the standard normal CDF and density, branch-free so that LLVM
/// vectorises it (GELU in f32 is compute-bound: every instruction counts).
///
/// - `e = exp(−x²/2)` is computed as `2^(−b²)` with `b = |x|·√(log2(e)/2)`: `k = round(−b²)` by
///   the 1.5·2^23 trick, `r = −b² − k ∈ [−½, ½]` exactly, a degree-6 fit of `2^r` (relative error
///   ≤ 1e-7 in f32; coefficients fitted by weighted least squares on Chebyshev nodes), and `2^k`
///   built in the exponent bits. `b` is clamped at 11.18 so that `k ≥ −125` (beyond, Φ is 0 or 1
///   to f32 precision and φ < 1e-37).
/// - `½·erfc(|x|/√2)` uses Abramowitz–Stegun 7.1.26 (|error| ≤ 1.5e-7; the approximation
///   PyTorch's vectorised CPU GELU uses) with the ½ folded into its coefficients and `e` shared.
/// - Φ is `½erfc` on the negative side (no cancellation in the left tail), `1 − ½erfc` on the
///   positive side.
///
/// `mul_add` becomes one FMA instruction inside [`simd`].
#[inline(always)]
fn normal_cdf_pdf_f32(x: f32) -> (f32, f32) {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let b = (x.abs() * 0.849_321_8).min(11.18);
    let nb = -b;
    let tm = nb.mul_add(b, MAGIC); // MAGIC + round(−b²)
    let nk = MAGIC - tm; // −k
    let r = nb.mul_add(b, nk); // −b² − k
    let q = 1.534_581_1e-4_f32.mul_add(r, 1.339_993_1e-3);
    let q = q.mul_add(r, 9.618_489e-3);
    let q = q.mul_add(r, 5.550_328_6e-2);
    let q = q.mul_add(r, 0.240_226_46);
    let q = q.mul_add(r, std::f32::consts::LN_2);
    let q = q.mul_add(r, 1.0);
    // tm's bit pattern is 0x4B40_0000 + k; k + 127 is the biased exponent of 2^k.
    let e = q * f32::from_bits(tm.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23);
    // A&S 7.1.26 in terms of b: t = 1/(1 + 0.3275911·|x|/√2).
    let t = 1.0 / 0.272_737_48_f32.mul_add(b, 1.0);
    let p = 0.530_702_7_f32.mul_add(t, -0.726_576);
    let p = p.mul_add(t, 0.710_706_9);
    let p = p.mul_add(t, -0.142_248_37);
    let p = p.mul_add(t, 0.127_414_8);
    let half_erfc = p * t * e;
    let cdf = if x < 0.0 { half_erfc } else { 1.0 - half_erfc };
    // 1/√(2π)
    (cdf, e * 0.398_942_3)
}

/// `(Φ(x), φ(x))` in T: the vectorisable f32 form above for f32, `libm::erf` for f64.
#[inline(always)]
fn normal_cdf_pdf<T: Float>(x: T) -> (T, T) {
    if T::DTYPE == DType::F32 {
        // For T = f32 the f32→f64→f32 round trips fold away.
        let (c, p) = normal_cdf_pdf_f32(x.as_f64() as f32);
        (T::from_f64(c as f64), T::from_f64(p as f64))
    } else {
        let v = x.as_f64();
        let c = 0.5 * (1.0 + libm::erf(v * std::f64::consts::FRAC_1_SQRT_2));
        let p = (-0.5 * v * v).exp() * (0.5 * std::f64::consts::FRAC_2_SQRT_PI)
            / std::f64::consts::SQRT_2;
        (T::from_f64(c), T::from_f64(p))
    }
}

/// GELU forward, exact form (PyTorch's default `nn.GELU()`): `y = x · Φ(x)`,
/// `Φ(x) = ½(1 + erf(x/√2))`, element-wise (any shape).
pub fn gelu_forward<T: Float>(x: &Tensor<T>) -> Result<Tensor<T>> {
    let y = map_unary(
        x.data(),
        #[inline(always)]
        |v| v * normal_cdf_pdf(v).0,
    );
    Tensor::from_vec(y, x.shape())
}

/// GELU backward from the forward's input: `dx = dy · (Φ(x) + x·φ(x))`.
pub fn gelu_backward<T: Float>(dy: &Tensor<T>, x: &Tensor<T>) -> Result<Tensor<T>> {
    same_shape("gelu_backward", "dy vs x", dy, x)?;
    let dx = map_binary(
        dy.data(),
        x.data(),
        #[inline(always)]
        |g, v| {
            let (c, p) = normal_cdf_pdf(v);
            g * (c + v * p)
        },
    );
    Tensor::from_vec(dx, dy.shape())
}

// ---------------------------------------------------------------------------------------------
// Residual add

/// Residual add forward, `y = a + b` (same shapes; no broadcasting).
pub fn add_forward<T: Float>(a: &Tensor<T>, b: &Tensor<T>) -> Result<Tensor<T>> {
    same_shape("add_forward", "a vs b", a, b)?;
    let y = map_binary(
        a.data(),
        b.data(),
        #[inline(always)]
        |u, v| u + v,
    );
    Tensor::from_vec(y, a.shape())
}

/// Residual add backward: both inputs receive `dy` unchanged, returned as `(da, db)` copies.
/// A caller that owns `dy` can avoid the copies by passing it on and using [`add_assign`] where
/// gradients meet.
pub fn add_backward<T: Float>(dy: &Tensor<T>) -> Result<(Tensor<T>, Tensor<T>)> {
    Ok((dy.clone(), dy.clone()))
}

/// In-place accumulate, `acc += x` (same shapes): how a residual branch's gradient is added to
/// the gradient of the skip path without a new allocation.
pub fn add_assign<T: Float>(acc: &mut Tensor<T>, x: &Tensor<T>) -> Result<()> {
    same_shape("add_assign", "acc vs x", acc, x)?;
    let xs = x.data();
    acc.data_mut()
        .par_chunks_mut(CHUNK)
        .zip(xs.par_chunks(CHUNK))
        .for_each(|(a, b)| {
            simd(
                #[inline(always)]
                || {
                    for (u, &v) in a.iter_mut().zip(b) {
                        *u += v;
                    }
                },
            )
        });
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Drop path (stochastic depth)

/// Per-sample keep mask for [`drop_path_forward`]: sample `b` is kept (true) with probability
/// `1 − drop_prob`, one uniform draw per sample from `rng` (timm draws a Bernoulli(keep_prob)
/// per sample; the stream is the engine's, so masks are reproducible but not torch's).
pub fn drop_path_mask(rng: &mut Rng, batch: usize, drop_prob: f64) -> Vec<bool> {
    let keep = 1.0 - drop_prob;
    (0..batch).map(|_| rng.uniform() < keep).collect()
}

/// The per-sample factor of drop path: `mask_b / keep_prob` (0 for dropped samples; 0 for all
/// when `drop_prob` = 1, as timm, which then skips the division).
fn drop_path_scales<T: Float>(
    op: &'static str,
    shape: &[usize],
    mask: &[bool],
    drop_prob: f64,
) -> Result<Vec<T>> {
    if !(0.0..=1.0).contains(&drop_prob) {
        return Err(Error::invalid(
            op,
            format!("drop_prob {drop_prob} is outside [0, 1]"),
        ));
    }
    let batch = shape.first().copied().unwrap_or(0);
    if shape.is_empty() || mask.len() != batch {
        return Err(Error::shape(
            op,
            format!(
                "mask of {} samples for input of shape {:?} (dimension 0 is the batch)",
                mask.len(),
                shape
            ),
        ));
    }
    let keep = 1.0 - drop_prob;
    Ok(mask
        .iter()
        .map(|&m| {
            if m && keep > 0.0 {
                T::from_f64(1.0 / keep)
            } else {
                T::zero()
            }
        })
        .collect())
}

/// `out_b = x_b · s_b` per sample, parallel over samples.
fn scale_samples<T: Float>(x: &Tensor<T>, scales: &[T]) -> Result<Tensor<T>> {
    let per = if scales.is_empty() {
        0
    } else {
        x.numel() / scales.len()
    };
    let xs = x.data();
    let stream = should_stream::<T>(x.numel());
    // SAFETY: sample chunks of the output are zipped with the input chunks of the same length.
    let y = unsafe {
        par_fill(x.numel(), per, |b, out| {
            let s = scales[b];
            let xb = &xs[b * per..b * per + out.len()];
            simd(
                #[inline(always)]
                || {
                    emit(
                        out,
                        stream,
                        TILE,
                        #[inline(always)]
                        |off, o| {
                            for (o, &v) in o.iter_mut().zip(&xb[off..]) {
                                o.write(v * s);
                            }
                        },
                    )
                },
            )
        })
    };
    Tensor::from_vec(y, x.shape())
}

/// Drop path forward as timm's `drop_path(x, drop_prob, training)`: sample `b` (dimension 0) is
/// scaled by `mask[b] / (1 − drop_prob)`, i.e. dropped samples become 0 and kept ones are
/// rescaled so that the expectation is unchanged. With `training == false` or `drop_prob == 0`
/// it is the identity (a copy; `mask` is then ignored and may be empty). The mask is an argument
/// so that forward and backward (and the PyTorch reference) use the same one; draw it with
/// [`drop_path_mask`].
pub fn drop_path_forward<T: Float>(
    x: &Tensor<T>,
    mask: &[bool],
    drop_prob: f64,
    training: bool,
) -> Result<Tensor<T>> {
    if !training || drop_prob == 0.0 {
        return Ok(x.clone());
    }
    let s = drop_path_scales("drop_path_forward", x.shape(), mask, drop_prob)?;
    scale_samples(x, &s)
}

/// Drop path backward: the same per-sample scaling applied to `dy` (the op is linear).
pub fn drop_path_backward<T: Float>(
    dy: &Tensor<T>,
    mask: &[bool],
    drop_prob: f64,
    training: bool,
) -> Result<Tensor<T>> {
    if !training || drop_prob == 0.0 {
        return Ok(dy.clone());
    }
    let s = drop_path_scales("drop_path_backward", dy.shape(), mask, drop_prob)?;
    scale_samples(dy, &s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_gradients, randn64, GradCheck};

    #[test]
    fn normal_cdf_f32_matches_libm() {
        let mut worst = 0.0f64;
        let mut x = -9.0f32;
        while x < 9.0 {
            let (c, p) = normal_cdf_pdf_f32(x);
            let (c64, p64) = normal_cdf_pdf::<f64>(x as f64);
            worst = worst
                .max((c as f64 - c64).abs())
                .max((p as f64 - p64).abs());
            x += 0.000_93;
        }
        // A&S 7.1.26's erf error (1.5e-7) halves in Φ; near 0, `1 − p·t·e` cancels and adds
        // f32 rounding of the ~1 terms (~2e-7 more). PyTorch's vectorised GELU has the same.
        assert!(worst < 3.5e-7, "Φ/φ absolute error {worst:.3e}");
    }

    #[test]
    fn relu_gradient() {
        // Keep every input at least 0.05 away from the kink at 0.
        let mut x = randn64(1, "relu_x", &[3, 5, 7]);
        for v in x.data_mut() {
            *v += 0.05f64.copysign(*v);
        }
        check_gradients(
            "relu",
            &[x],
            |xs| relu_forward(&xs[0]),
            |xs, dy| {
                let y = relu_forward(&xs[0])?;
                Ok(vec![Some(relu_backward(dy, &y)?)])
            },
            GradCheck::default(),
        );
    }

    #[test]
    fn emit_streaming_writes_every_element() {
        for n in [0, 3, 64, 1000, 1027] {
            let mut v: Vec<f32> = Vec::with_capacity(n);
            let kernel = |off: usize, o: &mut [MaybeUninit<f32>]| {
                for (i, s) in o.iter_mut().enumerate() {
                    s.write((off + i) as f32 * 0.5);
                }
            };
            emit(&mut v.spare_capacity_mut()[..n], true, TILE, kernel);
            // SAFETY: emit's kernel wrote all n elements.
            unsafe { v.set_len(n) };
            assert!(v.iter().enumerate().all(|(i, &x)| x == i as f32 * 0.5));
        }
    }

    #[test]
    fn large_outputs_take_the_streaming_path() {
        // 17 MB of f32: above STREAM_MIN_BYTES, with an odd length.
        let n = (STREAM_MIN_BYTES / 4) + 12_345;
        assert!(should_stream::<f32>(n));
        let x = Tensor::randn_named(8, "big", &[n], 1.0);
        let y = relu_forward(&x).unwrap();
        assert!(y
            .data()
            .iter()
            .zip(x.data())
            .all(|(&y, &x)| y == x.max(0.0)));
        let z = add_forward(&x, &y).unwrap();
        assert!(z
            .data()
            .iter()
            .zip(x.data())
            .all(|(&z, &x)| z == x + x.max(0.0)));
        let mask = [true, false, true, true, false];
        let m = n / 5 * 5;
        let xs = Tensor::from_vec(x.data()[..m].to_vec(), &[5, m / 5]).unwrap();
        let d = drop_path_forward(&xs, &mask, 0.25, true).unwrap();
        for (b, row) in d.data().chunks(m / 5).enumerate() {
            let want = if mask[b] { 1.0 / 0.75 } else { 0.0 };
            let src = &xs.data()[b * m / 5..(b + 1) * m / 5];
            assert!(row.iter().zip(src).all(|(&u, &v)| u == v * want as f32));
        }
    }

    #[test]
    fn relu_values() {
        let x = Tensor::from_vec(vec![-1.0f32, 0.0, 2.0, f32::NAN], &[4]).unwrap();
        let y = relu_forward(&x).unwrap();
        assert_eq!(&y.data()[..3], &[0.0, 0.0, 2.0]);
        assert!(y.data()[3].is_nan());
    }

    #[test]
    fn gelu_gradient() {
        let x = randn64(2, "gelu_x", &[4, 9]);
        let x = Tensor::from_vec(x.data().iter().map(|v| 2.5 * v).collect(), &[4, 9]).unwrap();
        check_gradients(
            "gelu",
            &[x],
            |xs| gelu_forward(&xs[0]),
            |xs, dy| Ok(vec![Some(gelu_backward(dy, &xs[0])?)]),
            GradCheck::default(),
        );
    }

    #[test]
    fn gelu_f32_matches_f64() {
        let x = Tensor::randn_named(3, "gelu32", &[1000], 3.0);
        let y = gelu_forward(&x).unwrap();
        let y64 = gelu_forward(&x.cast::<f64>()).unwrap().cast::<f32>();
        crate::testing::assert_close("gelu f32", &y, &y64, 1e-6);
        let dy = Tensor::randn_named(3, "gelu32_dy", &[1000], 1.0);
        let dx = gelu_backward(&dy, &x).unwrap();
        let dx64 = gelu_backward(&dy.cast::<f64>(), &x.cast::<f64>())
            .unwrap()
            .cast::<f32>();
        crate::testing::assert_close("gelu f32 backward", &dx, &dx64, 1e-6);
    }

    #[test]
    fn add_gradient() {
        let a = randn64(4, "add_a", &[2, 3, 5]);
        let b = randn64(4, "add_b", &[2, 3, 5]);
        check_gradients(
            "add",
            &[a, b],
            |xs| add_forward(&xs[0], &xs[1]),
            |_, dy| {
                let (da, db) = add_backward(dy)?;
                Ok(vec![Some(da), Some(db)])
            },
            GradCheck::default(),
        );
    }

    #[test]
    fn add_assign_accumulates() {
        let mut acc = Tensor::randn_named(5, "acc", &[3, 70_001], 1.0);
        let x = Tensor::randn_named(5, "x", &[3, 70_001], 1.0);
        let want = add_forward(&acc, &x).unwrap();
        add_assign(&mut acc, &x).unwrap();
        assert_eq!(acc, want);
    }

    #[test]
    fn drop_path_gradient_and_values() {
        let x = randn64(6, "dp_x", &[4, 3, 5]);
        let mask = [true, false, true, false];
        check_gradients(
            "drop_path",
            std::slice::from_ref(&x),
            |xs| drop_path_forward(&xs[0], &mask, 0.3, true),
            |_, dy| Ok(vec![Some(drop_path_backward(dy, &mask, 0.3, true)?)]),
            GradCheck::default(),
        );
        let y = drop_path_forward(&x, &mask, 0.3, true).unwrap();
        assert!(y.data()[15..30].iter().all(|&v| v == 0.0));
        assert!((y.data()[0] - x.data()[0] / 0.7).abs() < 1e-15);
        // eval mode and drop_prob 0 are the identity, whatever the mask
        assert_eq!(drop_path_forward(&x, &[], 0.3, false).unwrap(), x);
        assert_eq!(drop_path_forward(&x, &mask, 0.0, true).unwrap(), x);
        // drop_prob 1 drops everything
        let z = drop_path_forward(&x, &[false; 4], 1.0, true).unwrap();
        assert!(z.data().iter().all(|&v| v == 0.0));
    }

    #[test]
    fn drop_path_mask_rate() {
        let mut rng = Rng::new(11);
        let m = drop_path_mask(&mut rng, 100_000, 0.1);
        let kept = m.iter().filter(|&&k| k).count() as f64 / 1e5;
        assert!((kept - 0.9).abs() < 0.005, "kept {kept}");
        assert!(drop_path_mask(&mut rng, 64, 0.0).iter().all(|&k| k));
    }

    #[test]
    fn shape_errors() {
        let a = Tensor::<f32>::zeros(&[2, 3]);
        let b = Tensor::<f32>::zeros(&[3, 2]);
        for e in [
            relu_backward(&a, &b).unwrap_err(),
            gelu_backward(&a, &b).unwrap_err(),
            add_forward(&a, &b).unwrap_err(),
            add_assign(&mut a.clone(), &b).unwrap_err(),
            drop_path_forward(&a, &[true; 3], 0.1, true).unwrap_err(),
            drop_path_backward(&a, &[true], 0.1, true).unwrap_err(),
        ] {
            let msg = e.to_string();
            assert!(msg.contains("[2, 3]"), "{msg}");
        }
        assert!(matches!(
            drop_path_forward(&a, &[true; 2], 1.5, true),
            Err(Error::Invalid { .. })
        ));
    }
}
