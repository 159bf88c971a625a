//! Softmax and log-softmax over the last dimension, forward and backward.
//!
//! Layout: any `[..., K]` tensor is a stack of independent rows of `K` contiguous values; rayon
//! tasks take whole rows (several short rows per task). Each row is max-subtracted before `exp`,
//! so nothing overflows for large logits; NaN/Inf in a row propagate to that row's output.
//! The row kernels are shared with the cross-entropy loss (`loss.rs`), which runs them on
//! temperature-scaled logits.

use crate::error::{Error, Result};
use crate::tensor::{Float, Tensor};
use rayon::prelude::*;

/// About this many values per rayon task: short rows are grouped so that scheduling costs little.
const VALUES_PER_TASK: usize = 4096;

/// Rows per rayon task for rows of length `k`.
pub(crate) fn rows_per_task(k: usize) -> usize {
    (VALUES_PER_TASK / k.max(1)).max(1)
}

/// Largest of `s·x_i` (the max-subtraction constant of a row scaled by `s > 0`).
#[inline]
fn scaled_max<T: Float>(x: &[T], s: T) -> T {
    x.iter().fold(T::neg_infinity(), |m, &v| m.max(s * v))
}

/// `y = softmax(s·x)` for one row (`s > 0` is the inverse temperature; 1 for a plain softmax).
/// Returns `logsumexp(s·x)`, from which the caller can form log-probabilities `s·x_i − lse`.
#[inline]
pub(crate) fn softmax_row<T: Float>(x: &[T], s: T, y: &mut [T]) -> T {
    let m = scaled_max(x, s);
    let mut sum = T::ZERO;
    for (o, &v) in y.iter_mut().zip(x) {
        let e = (s * v - m).exp();
        *o = e;
        sum += e;
    }
    let inv = T::one() / sum;
    for o in y.iter_mut() {
        *o *= inv;
    }
    m + sum.ln()
}

/// `y = log_softmax(s·x)` for one row, computed as `(s·x_i − m) − ln Σ exp(s·x_j − m)`.
#[inline]
pub(crate) fn log_softmax_row<T: Float>(x: &[T], s: T, y: &mut [T]) {
    let m = scaled_max(x, s);
    let mut sum = T::ZERO;
    for (o, &v) in y.iter_mut().zip(x) {
        let d = s * v - m;
        *o = d;
        sum += d.exp();
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
                let dot: T = dyr.iter().zip(yr).map(|(&a, &b)| a * b).sum();
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
                let sum: T = dyr.iter().copied().sum();
                for ((o, &g), &l) in dxr.iter_mut().zip(dyr).zip(yr) {
                    *o = g - l.exp() * sum;
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
