//! Softmax and log-softmax over the last dimension, forward and backward.
//!
//! Layout: any `[..., K]` tensor is a stack of independent rows of `K` contiguous values; rayon
//! tasks take whole rows (several short rows per task). Each row is max-subtracted before `exp`,
//! so nothing overflows for large logits; NaN/Inf in a row propagate to that row's output.
//! The row kernels are shared with the cross-entropy loss (`loss.rs`), which runs them on
//! temperature-scaled logits.
//!
//! Speed: in f32 the exponential is a branch-free polynomial compiled for AVX-512 or AVX2 and
//! chosen at run time (`exp_in_place`), and row reductions keep 16 partial sums; with libm's
//! scalar `expf` and one running sum, these loops ran 3-6x slower than PyTorch's. f64 (gradient
//! checks) keeps libm's `exp`.

use crate::error::{Error, Result};
use crate::tensor::{Float, Tensor};
use rayon::prelude::*;

/// About this many values per rayon task: short rows are grouped so that scheduling costs little.
const VALUES_PER_TASK: usize = 4096;

/// Independent accumulators of the row reductions. One running sum is a chain of dependent adds
/// (4 cycles each); 16 of them let the compiler keep a whole vector register busy per cycle.
/// The summation order is fixed, so results do not depend on threads.
const LANES: usize = 16;

/// Rows per rayon task for rows of length `k`.
pub(crate) fn rows_per_task(k: usize) -> usize {
    (VALUES_PER_TASK / k.max(1)).max(1)
}

/// `Σ_i f(a_i, b_i)` over two slices of equal length, with [`LANES`] partial sums.
#[inline(always)]
pub(crate) fn lane_sum<T: Float>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> T {
    let mut acc = [T::ZERO; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for ((s, &u), &v) in acc.iter_mut().zip(xa).zip(xb) {
            *s += f(u, v);
        }
    }
    for ((s, &u), &v) in acc.iter_mut().zip(ra).zip(rb) {
        *s += f(u, v);
    }
    acc.iter().copied().sum()
}

/// Largest value of a row (NaNs are skipped here; they reach the output through `exp`).
#[inline(always)]
fn row_max<T: Float>(x: &[T]) -> T {
    let mut acc = [T::neg_infinity(); LANES];
    let c = x.chunks_exact(LANES);
    let r = c.remainder();
    for xs in c {
        for (m, &v) in acc.iter_mut().zip(xs) {
            *m = if v > *m { v } else { *m };
        }
    }
    for (m, &v) in acc.iter_mut().zip(r) {
        *m = if v > *m { v } else { *m };
    }
    acc.iter()
        .fold(T::neg_infinity(), |m, &v| if v > m { v } else { m })
}

/// `x ← exp(x)` over a slice. In f32 (the training type) this runs a vectorised exponential
/// (AVX-512 or AVX2 chosen at run time, see [`exp_f32`]); libm's scalar `expf` would be the
/// bottleneck of every softmax. Other types (f64, for gradient checks) use `Float::exp`.
pub(crate) fn exp_in_place<T: Float>(x: &mut [T]) {
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        // SAFETY: T is f32 (same TypeId), so the slice reinterpreted as f32 is the same memory
        // with the same length, alignment and validity.
        let f = unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr() as *mut f32, x.len()) };
        exp_f32(f);
    } else {
        for v in x.iter_mut() {
            *v = v.exp();
        }
    }
}

/// Vectorised `exp` over f32 values, dispatched on the CPU's features once per call.
fn exp_f32(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            return unsafe { exp_f32_avx512(x) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { exp_f32_avx2(x) };
        }
    }
    for v in x.iter_mut() {
        *v = exp_f32_one(*v);
    }
}

/// [`exp_f32_one`] over a slice, compiled for AVX-512 (the loop auto-vectorises 16-wide).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_f32_avx512(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = exp_f32_one(*v);
    }
}

/// [`exp_f32_one`] over a slice, compiled for AVX2 + FMA (8-wide).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_f32_avx2(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = exp_f32_one(*v);
    }
}

/// Branch-free f32 `exp` (Cephes' `expf`: Cody-Waite reduction `x = n·ln2 + r`, degree-7
/// polynomial on `|r| ≤ ln2/2`, `2^n` built in the exponent bits), within 2 ulp of the true value.
/// Written with selects only, so that the loops above vectorise. NaN stays NaN, `x < −87.3`
/// (including −∞) gives 0 (subnormal results are flushed), `x > 88.3` gives +∞ (the engine
/// only calls it on max-subtracted arguments `≤ 0`).
#[inline(always)]
fn exp_f32_one(x: f32) -> f32 {
    const LO: f32 = -87.336_54;
    const HI: f32 = 88.3;
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer (ties to even)
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Comparisons are false for NaN, so NaN passes through both clamps and the arithmetic.
    let xc = if x < LO { LO } else { x };
    let xc = if xc > HI { HI } else { xc };
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * (r * r) + r + 1.0;
    // n + 127 in the exponent field: t's low mantissa bits hold n (offset by ROUND's bits).
    let k = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let scale = f32::from_bits((k.wrapping_add(127) << 23) as u32);
    let y = e * scale;
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        y
    }
}

/// `y = softmax(s·x)` for one row (`s > 0` is the inverse temperature; 1 for a plain softmax).
/// Returns `logsumexp(s·x)`, from which the caller can form log-probabilities `s·x_i − lse`.
/// Passes: max, shift, exp (vectorised), sum, normalise; a row of a few thousand values stays
/// in L1 throughout. `max(s·x) = s·max(x)` exactly because rounding is monotone.
#[inline]
pub(crate) fn softmax_row<T: Float>(x: &[T], s: T, y: &mut [T]) -> T {
    let m = s * row_max(x);
    for (o, &v) in y.iter_mut().zip(x) {
        *o = s * v - m;
    }
    exp_in_place(y);
    let sum = lane_sum(y, y, |a, _| a);
    let inv = T::one() / sum;
    for o in y.iter_mut() {
        *o *= inv;
    }
    m + sum.ln()
}

/// `y = log_softmax(s·x)` for one row, computed as `(s·x_i − m) − ln Σ exp(s·x_j − m)`; the
/// exponentials go through a small stack buffer so that only the log-probabilities are written.
#[inline]
pub(crate) fn log_softmax_row<T: Float>(x: &[T], s: T, y: &mut [T]) {
    const BUF: usize = 256;
    let m = s * row_max(x);
    for (o, &v) in y.iter_mut().zip(x) {
        *o = s * v - m;
    }
    let mut buf = [T::ZERO; BUF];
    let mut sum = T::ZERO;
    for c in y.chunks(BUF) {
        let b = &mut buf[..c.len()];
        b.copy_from_slice(c);
        exp_in_place(b);
        sum += lane_sum(b, b, |a, _| a);
    }
    let l = sum.ln();
    for o in y.iter_mut() {
        *o -= l;
    }
}

/// The row length `K` of `x: [..., K]`; errors for a 0-dimensional tensor.
fn last_dim<T: Float>(op: &'static str, x: &Tensor<T>) -> Result<usize> {
    x.shape().last().copied().ok_or_else(|| {
        Error::shape(
            op,
            format!(
                "input has shape {:?}, expected at least 1 dimension",
                x.shape()
            ),
        )
    })
}

/// Runs `f(x_row, y_row)` over every row of `x: [..., K]`, in parallel, into a new tensor.
fn map_rows<T: Float>(x: &Tensor<T>, k: usize, f: impl Fn(&[T], &mut [T]) + Sync) -> Tensor<T> {
    let mut y = Tensor::zeros(x.shape());
    if k > 0 {
        y.data_mut()
            .par_chunks_mut(k)
            .zip(x.data().par_chunks(k))
            .with_min_len(rows_per_task(k))
            .for_each(|(yr, xr)| f(xr, yr));
    }
    y
}

/// Softmax over the last dimension: `y[..., i] = exp(x_i − max x) / Σ_j exp(x_j − max x)`.
/// The backward needs only `y` (the output), so there is no separate context.
pub fn softmax_forward<T: Float>(x: &Tensor<T>) -> Result<Tensor<T>> {
    let k = last_dim("softmax_forward", x)?;
    Ok(map_rows(x, k, |xr, yr| {
        softmax_row(xr, T::one(), yr);
    }))
}

/// Log-softmax over the last dimension: `y_i = x_i − max x − ln Σ_j exp(x_j − max x)`.
/// The backward needs only `y` (the output).
pub fn log_softmax_forward<T: Float>(x: &Tensor<T>) -> Result<Tensor<T>> {
    let k = last_dim("log_softmax_forward", x)?;
    Ok(map_rows(x, k, |xr, yr| log_softmax_row(xr, T::one(), yr)))
}

/// Checks that `dy` and the saved output `y` agree; returns the row length.
fn check_pair<T: Float>(op: &'static str, dy: &Tensor<T>, y: &Tensor<T>) -> Result<usize> {
    let k = last_dim(op, y)?;
    if dy.shape() != y.shape() {
        return Err(Error::shape(
            op,
            format!(
                "dy has shape {:?}, saved output has shape {:?}",
                dy.shape(),
                y.shape()
            ),
        ));
    }
    Ok(k)
}

/// Softmax backward from the saved output `y`: `dx_i = y_i·(dy_i − Σ_j dy_j·y_j)` per row.
pub fn softmax_backward<T: Float>(dy: &Tensor<T>, y: &Tensor<T>) -> Result<Tensor<T>> {
    let k = check_pair("softmax_backward", dy, y)?;
    let mut dx = Tensor::zeros(y.shape());
    if k > 0 {
        dx.data_mut()
            .par_chunks_mut(k)
            .zip(dy.data().par_chunks(k).zip(y.data().par_chunks(k)))
            .with_min_len(rows_per_task(k))
            .for_each(|(dxr, (dyr, yr))| {
                let dot = lane_sum(dyr, yr, |a, b| a * b);
                for ((o, &g), &p) in dxr.iter_mut().zip(dyr).zip(yr) {
                    *o = p * (g - dot);
                }
            });
    }
    Ok(dx)
}

/// Log-softmax backward from the saved output `y`: `dx_i = dy_i − exp(y_i)·Σ_j dy_j` per row
/// (`exp(y)` is the softmax, recomputed rather than stored).
pub fn log_softmax_backward<T: Float>(dy: &Tensor<T>, y: &Tensor<T>) -> Result<Tensor<T>> {
    let k = check_pair("log_softmax_backward", dy, y)?;
    let mut dx = Tensor::zeros(y.shape());
    if k > 0 {
        dx.data_mut()
            .par_chunks_mut(k)
            .zip(dy.data().par_chunks(k).zip(y.data().par_chunks(k)))
            .with_min_len(rows_per_task(k))
            .for_each(|(dxr, (dyr, yr))| {
                let sum = lane_sum(dyr, dyr, |a, _| a);
                dxr.copy_from_slice(yr);
                exp_in_place(dxr);
                for (o, &g) in dxr.iter_mut().zip(dyr) {
                    *o = g - *o * sum;
                }
            });
    }
    Ok(dx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_gradients, randn64, GradCheck};

    #[test]
    fn softmax_gradients() {
        let x = randn64(21, "x", &[2, 3, 5]);
        check_gradients(
            "softmax",
            &[x],
            |xs| softmax_forward(&xs[0]),
            |xs, dy| {
                let y = softmax_forward(&xs[0])?;
                Ok(vec![Some(softmax_backward(dy, &y)?)])
            },
            GradCheck::default(),
        );
    }

    #[test]
    fn log_softmax_gradients() {
        let x = randn64(22, "x", &[3, 7]);
        check_gradients(
            "log_softmax",
            &[x],
            |xs| log_softmax_forward(&xs[0]),
            |xs, dy| {
                let y = log_softmax_forward(&xs[0])?;
                Ok(vec![Some(log_softmax_backward(dy, &y)?)])
            },
            GradCheck::default(),
        );
    }

    #[test]
    fn rows_sum_to_one_and_large_logits_do_not_overflow() {
        let mut x = randn64(23, "x", &[4, 9]);
        for v in x.data_mut() {
            *v *= 500.0;
        }
        let y = softmax_forward(&x).unwrap();
        let l = log_softmax_forward(&x).unwrap();
        for r in 0..4 {
            let s: f64 = y.data()[r * 9..r * 9 + 9].iter().sum();
            assert!((s - 1.0).abs() < 1e-12);
            for i in 0..9 {
                let (p, lp) = (y.data()[r * 9 + i], l.data()[r * 9 + i]);
                assert!(p.is_finite() && lp <= 0.0);
                assert!((p - lp.exp()).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn nan_propagates_to_its_row_only() {
        let mut x = randn64(24, "x", &[2, 4]);
        x.data_mut()[1] = f64::NAN;
        let y = softmax_forward(&x).unwrap();
        assert!(y.data()[..4].iter().all(|v| v.is_nan()));
        assert!(y.data()[4..].iter().all(|v| v.is_finite()));
        let l = log_softmax_forward(&x).unwrap();
        assert!(l.data()[..4].iter().all(|v| v.is_nan()));
    }

    #[test]
    fn fast_exp_is_accurate_and_keeps_special_values() {
        let mut xs: Vec<f32> = (0..20_000)
            .map(|i| -87.0 + i as f32 * (175.0 / 20_000.0))
            .collect();
        xs.extend([0.0, -0.0, 1e-8, -1e-8, 0.5, -0.5, 88.0, -87.3]);
        let mut ys = xs.clone();
        exp_in_place(&mut ys);
        for (&x, &y) in xs.iter().zip(&ys) {
            let want = (x as f64).exp();
            let err = ((y as f64 - want) / want).abs();
            assert!(
                err < 3.0 * f32::EPSILON as f64,
                "exp({x}) = {y}, want {want}, rel {err:e}"
            );
        }
        let mut sp = [f32::NAN, f32::NEG_INFINITY, -1000.0, f32::INFINITY, 1000.0];
        exp_in_place(&mut sp);
        assert!(sp[0].is_nan());
        assert_eq!(&sp[1..], &[0.0, 0.0, f32::INFINITY, f32::INFINITY]);
        // The portable path (what non-x86 machines run) agrees with the dispatched one.
        for &x in &xs {
            let mut v = [x];
            exp_in_place(&mut v);
            assert_eq!(v[0].to_bits(), exp_f32_one(x).to_bits());
        }
    }

    #[test]
    fn f32_softmax_matches_f64() {
        let x = randn64(25, "x", &[3, 1000]);
        let want = softmax_forward(&x).unwrap().cast::<f32>();
        let got = softmax_forward(&x.cast::<f32>()).unwrap();
        assert!(crate::testing::rel_l2(got.data(), want.data()) < 1e-6);
        let want = log_softmax_forward(&x).unwrap().cast::<f32>();
        let got = log_softmax_forward(&x.cast::<f32>()).unwrap();
        assert!(crate::testing::rel_l2(got.data(), want.data()) < 1e-6);
    }

    #[test]
    fn shape_errors() {
        let x = Tensor::<f64>::zeros(&[]);
        let e = softmax_forward(&x).unwrap_err().to_string();
        assert!(e.contains("softmax_forward") && e.contains("[]"), "{e}");
        let y = randn64(0, "y", &[2, 3]);
        let dy = randn64(0, "dy", &[3, 2]);
        let e = softmax_backward(&dy, &y).unwrap_err().to_string();
        assert!(
            e.contains("softmax_backward") && e.contains("[3, 2]") && e.contains("[2, 3]"),
            "{e}"
        );
        let e = log_softmax_backward(&dy, &y).unwrap_err().to_string();
        assert!(e.contains("log_softmax_backward"), "{e}");
        assert!(log_softmax_forward(&x).is_err());
    }
}
