//! Cross-entropy with soft targets, temperature and label smoothing: the loss behind every Suave
//! and Daino term (swapped prediction against Sinkhorn codes, DINO's teacher/student term, the
//! supervised term on labelled images), forward and backward fused.
//!
//! For logits `z: [B, K]`, target probabilities `t: [B, K]`, temperature `τ > 0` and label
//! smoothing `ls ∈ [0, 1)`:
//! `loss = (1/B)·Σ_b Σ_k −t'_{b,k}·log_softmax(z_b/τ)_k`, with `t' = (1 − ls)·t + ls/K`,
//! which is exactly `torch.nn.functional.cross_entropy(z / τ, t, label_smoothing=ls)` with
//! probability targets. The forward computes each row's softmax once and keeps it; the backward
//! is then a single pass, `dz = dloss·(p·Σt' − t')/(τ·B)` (`Σt' = 1` for probability targets).
//! Rows are independent: rayon tasks take whole rows, and the per-row losses are summed in row
//! order afterwards, so the result does not depend on the thread count.

use super::softmax::{lane_sum, rows_per_task, softmax_row};
use crate::error::{Error, Result};
use crate::tensor::{Float, Tensor};
use rayon::prelude::*;

/// Temperature and label smoothing of [`cross_entropy_forward`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CrossEntropyParams {
    /// Softmax temperature `τ > 0`: the logits are divided by it (0.1 for SwAV/DINO students).
    pub temperature: f64,
    /// Label smoothing `ls ∈ [0, 1)`: targets become `(1 − ls)·t + ls/K`.
    pub label_smoothing: f64,
}

impl Default for CrossEntropyParams {
    /// `τ = 1`, no smoothing: the plain cross-entropy.
    fn default() -> Self {
        CrossEntropyParams {
            temperature: 1.0,
            label_smoothing: 0.0,
        }
    }
}

impl CrossEntropyParams {
    /// Errors for `τ ≤ 0` (or not finite) and `ls` outside `[0, 1)`.
    pub fn validate(&self, op: &'static str) -> Result<()> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(Error::invalid(
                op,
                format!("temperature {} must be finite and > 0", self.temperature),
            ));
        }
        if !(self.label_smoothing >= 0.0 && self.label_smoothing < 1.0) {
            return Err(Error::invalid(
                op,
                format!("label smoothing {} must be in [0, 1)", self.label_smoothing),
            ));
        }
        Ok(())
    }
}

/// What [`cross_entropy_forward`] saves for the backward.
#[derive(Clone, Debug)]
pub struct CrossEntropyCtx<T> {
    /// `softmax(z/τ)` row by row, `[B, K]`.
    pub probs: Tensor<T>,
    /// The parameters the forward ran with.
    pub params: CrossEntropyParams,
}

/// Checks `z` and `t` (`[B, K]` both, `B, K ≥ 1`); returns `(B, K)`.
fn check_shapes<T: Float>(
    op: &'static str,
    z: &Tensor<T>,
    t: &Tensor<T>,
) -> Result<(usize, usize)> {
    z.expect_rank(op, "logits", 2)?;
    let (b, k) = (z.shape()[0], z.shape()[1]);
    if t.shape() != z.shape() {
        return Err(Error::shape(
            op,
            format!(
                "targets have shape {:?}, logits have shape {:?}",
                t.shape(),
                z.shape()
            ),
        ));
    }
    if b == 0 || k == 0 {
        return Err(Error::shape(
            op,
            format!(
                "logits have shape {:?}: the batch and the class count must be non-zero",
                z.shape()
            ),
        ));
    }
    Ok((b, k))
}

/// Cross-entropy forward: returns the batch-mean loss and the context (row softmaxes).
///
/// Per row: `lse = logsumexp(z/τ)` (max-subtracted), `p = softmax(z/τ)` stored, and
/// `loss_b = −Σ_k t'_k·(z_k/τ − lse)` accumulated from the log-probabilities elementwise (as
/// PyTorch does), not as `lse·Σt' − Σt'z/τ`, which would cancel badly for confident rows.
/// NaN or Inf in the logits propagate to the loss and to the gradient; nothing is clamped.
pub fn cross_entropy_forward<T: Float>(
    logits: &Tensor<T>,
    target: &Tensor<T>,
    params: CrossEntropyParams,
) -> Result<(T, CrossEntropyCtx<T>)> {
    const OP: &str = "cross_entropy_forward";
    params.validate(OP)?;
    let (b, k) = check_shapes(OP, logits, target)?;
    let s = T::c(1.0 / params.temperature);
    let keep = T::c(1.0 - params.label_smoothing);
    let spread = T::c(params.label_smoothing / k as f64);
    let mut probs = Tensor::zeros(&[b, k]);
    let mut row_loss = vec![T::ZERO; b];
    probs
        .data_mut()
        .par_chunks_mut(k)
        .zip(row_loss.par_iter_mut())
        .zip(logits.data().par_chunks(k).zip(target.data().par_chunks(k)))
        .with_min_len(rows_per_task(k))
        .for_each(|((pr, lr), (zr, tr))| {
            let lse = softmax_row(zr, s, pr);
            *lr = -lane_sum(zr, tr, |z, t| (keep * t + spread) * (s * z - lse));
        });
    let total: T = row_loss.iter().copied().sum();
    Ok((total / T::c(b as f64), CrossEntropyCtx { probs, params }))
}

/// Cross-entropy backward: `dz_{b,k} = dloss·(p_{b,k}·Σ_j t'_{b,j} − t'_{b,k})/(τ·B)` with
/// `p = softmax(z/τ)` from the context and `t' = (1 − ls)·t + ls/K`; `dloss` is the upstream
/// gradient of the scalar loss (1 when it is the final objective). Only `dz` is computed: the
/// targets of every Suave/Daino term are detached (codes, teacher outputs, labels).
pub fn cross_entropy_backward<T: Float>(
    dloss: T,
    target: &Tensor<T>,
    ctx: &CrossEntropyCtx<T>,
) -> Result<Tensor<T>> {
    const OP: &str = "cross_entropy_backward";
    ctx.params.validate(OP)?;
    let (b, k) = check_shapes(OP, &ctx.probs, target)?;
    let keep = T::c(1.0 - ctx.params.label_smoothing);
    let spread = T::c(ctx.params.label_smoothing / k as f64);
    let scale = dloss / T::c(ctx.params.temperature * b as f64);
    let mut dz = Tensor::zeros(&[b, k]);
    dz.data_mut()
        .par_chunks_mut(k)
        .zip(
            ctx.probs
                .data()
                .par_chunks(k)
                .zip(target.data().par_chunks(k)),
        )
        .with_min_len(rows_per_task(k))
        .for_each(|(dr, (pr, tr))| {
            let mass = keep * lane_sum(tr, tr, |t, _| t) + spread * T::c(k as f64);
            let pm = scale * mass;
            for ((d, &p), &t) in dr.iter_mut().zip(pr).zip(tr) {
                *d = pm * p - scale * (keep * t + spread);
            }
        });
    Ok(dz)
}

/// One-hot target probabilities `[B, K]` from class indices (`t[b, labels[b]] = 1`), so that the
/// hard-label loss is the same op as the soft one. Errors for an index `≥ classes`.
pub fn one_hot<T: Float>(labels: &[usize], classes: usize) -> Result<Tensor<T>> {
    let mut t = Tensor::zeros(&[labels.len(), classes]);
    for (b, &c) in labels.iter().enumerate() {
        if c >= classes {
            return Err(Error::invalid(
                "one_hot",
                format!("label {c} of sample {b} is out of range for {classes} classes"),
            ));
        }
        t.data_mut()[b * classes + c] = T::one();
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::softmax::softmax_forward;
    use crate::testing::{check_gradients, randn64, GradCheck};

    fn soft_targets(seed: u64, shape: &[usize]) -> Tensor<f64> {
        softmax_forward(&randn64(seed, "t", shape)).unwrap()
    }

    fn ce_check(name: &str, z: Tensor<f64>, t: Tensor<f64>, params: CrossEntropyParams) {
        check_gradients(
            name,
            &[z, t],
            |xs| {
                let (l, _) = cross_entropy_forward(&xs[0], &xs[1], params)?;
                Tensor::from_vec(vec![l], &[1])
            },
            |xs, dy| {
                let (_, ctx) = cross_entropy_forward(&xs[0], &xs[1], params)?;
                let dz = cross_entropy_backward(dy.data()[0], &xs[1], &ctx)?;
                Ok(vec![Some(dz), None])
            },
            GradCheck::default(),
        );
    }

    #[test]
    fn gradients_soft_and_one_hot_targets() {
        for &tau in &[0.1, 1.0] {
            for &ls in &[0.0, 0.1] {
                let params = CrossEntropyParams {
                    temperature: tau,
                    label_smoothing: ls,
                };
                let z = randn64(31, "z", &[3, 7]);
                ce_check(
                    &format!("ce_soft_{tau}_{ls}"),
                    z.clone(),
                    soft_targets(32, &[3, 7]),
                    params,
                );
                let t = one_hot(&[4, 0, 6], 7).unwrap();
                ce_check(&format!("ce_hard_{tau}_{ls}"), z, t, params);
            }
        }
    }

    #[test]
    fn gradient_is_exact_for_unnormalised_targets() {
        let mut t = randn64(33, "t", &[2, 5]);
        for v in t.data_mut() {
            *v = v.abs();
        }
        let params = CrossEntropyParams {
            temperature: 0.5,
            label_smoothing: 0.2,
        };
        ce_check("ce_unnormalised", randn64(34, "z", &[2, 5]), t, params);
    }

    #[test]
    fn matches_definition() {
        let z = randn64(35, "z", &[2, 4]);
        let t = soft_targets(36, &[2, 4]);
        let (tau, ls) = (0.3, 0.1);
        let (l, ctx) = cross_entropy_forward(
            &z,
            &t,
            CrossEntropyParams {
                temperature: tau,
                label_smoothing: ls,
            },
        )
        .unwrap();
        let mut want = 0.0;
        for b in 0..2 {
            let row: Vec<f64> = (0..4).map(|k| z.data()[b * 4 + k] / tau).collect();
            let lse = row.iter().map(|v| v.exp()).sum::<f64>().ln();
            for (k, &zk) in row.iter().enumerate() {
                let tp = (1.0 - ls) * t.data()[b * 4 + k] + ls / 4.0;
                want -= tp * (zk - lse);
                assert!((ctx.probs.data()[b * 4 + k] - (zk - lse).exp()).abs() < 1e-14);
            }
        }
        want /= 2.0;
        assert!((l - want).abs() < 1e-13, "{l} vs {want}");
    }

    #[test]
    fn nan_and_inf_in_logits_propagate() {
        let t = soft_targets(37, &[2, 3]);
        for bad in [f64::NAN, f64::INFINITY] {
            let mut z = randn64(38, "z", &[2, 3]);
            z.data_mut()[4] = bad;
            let (l, ctx) = cross_entropy_forward(&z, &t, CrossEntropyParams::default()).unwrap();
            assert!(l.is_nan(), "loss {l} for a logit {bad}");
            let dz = cross_entropy_backward(1.0, &t, &ctx).unwrap();
            assert!(dz.data()[3..].iter().all(|v| v.is_nan()));
            assert!(dz.data()[..3].iter().all(|v| v.is_finite()));
            // f32 takes the vectorised exp: it must propagate the same way.
            let (l, ctx) =
                cross_entropy_forward(&z.cast::<f32>(), &t.cast(), CrossEntropyParams::default())
                    .unwrap();
            assert!(l.is_nan());
            let dz = cross_entropy_backward(1.0, &t.cast(), &ctx).unwrap();
            assert!(dz.data()[3..].iter().all(|v| v.is_nan()));
            assert!(dz.data()[..3].iter().all(|v| v.is_finite()));
        }
    }

    #[test]
    fn argument_and_shape_errors() {
        let z = randn64(0, "z", &[2, 3]);
        let t = soft_targets(0, &[2, 3]);
        for (tau, ls) in [
            (0.0, 0.0),
            (-1.0, 0.0),
            (f64::NAN, 0.0),
            (1.0, -0.1),
            (1.0, 1.0),
            (1.0, f64::NAN),
        ] {
            let p = CrossEntropyParams {
                temperature: tau,
                label_smoothing: ls,
            };
            let e = cross_entropy_forward(&z, &t, p).unwrap_err().to_string();
            assert!(
                e.contains("cross_entropy_forward") && e.contains("invalid"),
                "{e}"
            );
        }
        let t2 = soft_targets(0, &[3, 2]);
        let e = cross_entropy_forward(&z, &t2, CrossEntropyParams::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("[3, 2]") && e.contains("[2, 3]"), "{e}");
        let z1 = randn64(0, "z", &[6]);
        assert!(cross_entropy_forward(&z1, &z1, CrossEntropyParams::default()).is_err());
        let (_, ctx) = cross_entropy_forward(&z, &t, CrossEntropyParams::default()).unwrap();
        let e = cross_entropy_backward(1.0, &t2, &ctx)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cross_entropy_backward") && e.contains("[3, 2]"),
            "{e}"
        );
        let e = one_hot::<f64>(&[1, 3], 3).unwrap_err().to_string();
        assert!(e.contains("one_hot") && e.contains("label 3"), "{e}");
        let empty = Tensor::<f64>::zeros(&[0, 3]);
        assert!(cross_entropy_forward(&empty, &empty, CrossEntropyParams::default()).is_err());
    }
}
