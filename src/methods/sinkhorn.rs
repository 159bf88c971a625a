//! Sinkhorn-Knopp equipartition, exactly as SwAV's and Suave's `distributed_sinkhorn`
//! (spec §1.4): soft codes whose prototypes are used equally often over the whole (global) batch.
//!
//! The official code materialises `Q = exp(S/ε)ᵀ` (K × B) and rescales it in place six times.
//! Every rescaling is a row or a column scaling, so here `E = exp(S/ε)` is computed once, in the
//! storage type (f32 on the CPU; with |S| ≤ 1 and ε = 0.05, E ≤ e^20 ≈ 4.9e8 cannot overflow
//! f32, whereas it would overflow f16), and the iterations update only a prototype scaling
//! `u[K]` and a sample scaling `v[B]`: `Q = diag(u)·Eᵀ·diag(v)`. That is one read of E per
//! half-iteration and no writes, which is also how the CUDA kernel will work. The scaling
//! vectors and sums are kept in f64 so that the result is at least as accurate as the
//! official f32 code.
//!
//! Distribution: as in the official code, the total and the K row sums are all-reduced through
//! the [`Communicator`] (one all-reduce for the total, one per iteration for the row sums), and
//! `B` counts the columns of all ranks. Columns (samples) are local, so the column step needs no communication.

use crate::dist::Communicator;
use crate::error::{Error, Result};
use crate::tensor::{Float, Tensor};

/// Sinkhorn's parameters (SwAV/Suave flags `--epsilon`, `--sinkhorn_iterations`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SinkhornParams {
    /// Entropic regularisation ε > 0: the scores are divided by it before the exponential.
    pub epsilon: f64,
    /// Number of (row, column) normalisation rounds.
    pub iterations: usize,
}

impl Default for SinkhornParams {
    /// ε = 0.05, 3 iterations: the values of every Suave and SwAV script.
    fn default() -> Self {
        SinkhornParams {
            epsilon: 0.05,
            iterations: 3,
        }
    }
}

/// Codes `[B_loc, K]` from prototype scores `[B_loc, K]` (this rank's rows; every rank calls this
/// collectively with the same K). Each returned row sums to 1 (up to rounding); over the global
/// batch every prototype receives mass B/K.
///
/// Errors for a non-2-D or empty input, ε ≤ 0, or scores whose exponential overflows the storage
/// type (|S|/ε too large: the official code has no max-subtraction either, and the scores are
/// cosines, so this indicates features that were not L2-normalised — SwAV issue #67).
pub fn sinkhorn<T: Float>(
    scores: &Tensor<T>,
    params: SinkhornParams,
    comm: &dyn Communicator,
) -> Result<Tensor<T>> {
    const OP: &str = "sinkhorn";
    scores.expect_rank(OP, "scores", 2)?;
    let (b_loc, k) = (scores.shape()[0], scores.shape()[1]);
    if b_loc == 0 || k == 0 {
        return Err(Error::shape(
            OP,
            format!(
                "scores have shape {:?}: need at least one row and one prototype",
                scores.shape()
            ),
        ));
    }
    if !(params.epsilon > 0.0 && params.epsilon.is_finite()) {
        return Err(Error::invalid(
            OP,
            format!("epsilon {} must be finite and > 0", params.epsilon),
        ));
    }
    let inv_eps = T::c(1.0 / params.epsilon);
    let e: Vec<T> = scores.data().iter().map(|&s| (s * inv_eps).exp()).collect();
    if let Some(i) = e.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(
            OP,
            format!(
                "exp(score/epsilon) is not finite at row {}, prototype {} (score {:?}, epsilon {}): \
                 scores must be cosines of L2-normalised features",
                i / k,
                i % k,
                scores.data()[i].as_f64(),
                params.epsilon
            ),
        ));
    }
    let b_total = (b_loc * comm.world_size()) as f64;
    let kf = k as f64;

    // Q ← Q / ΣQ (global): a uniform scaling, folded into u.
    let mut total = [e.iter().map(|v| v.as_f64()).sum::<f64>()];
    comm.all_reduce_sum_f64(&mut total)?;
    let mut u = vec![1.0 / total[0]; k];
    let mut v = vec![1.0f64; b_loc];
    let mut rows = vec![0.0f64; k];
    for _ in 0..params.iterations {
        // Row (prototype) sums over all ranks' samples: Q_k· ← Q_k· / r_k / K.
        rows.iter_mut().for_each(|r| *r = 0.0);
        for (er, &vb) in e.chunks_exact(k).zip(&v) {
            for (r, &x) in rows.iter_mut().zip(er) {
                *r += x.as_f64() * vb;
            }
        }
        comm.all_reduce_sum_f64(&mut rows)?;
        // `rows` was summed without u: the row sum is u_k·r_k, so u_k ← u_k/(u_k·r_k·K).
        for (uk, &r) in u.iter_mut().zip(&rows) {
            *uk = 1.0 / (r * kf);
        }
        // Column (sample) sums, local: Q_·b ← Q_·b / c_b / B.
        for (er, vb) in e.chunks_exact(k).zip(v.iter_mut()) {
            let c: f64 = er
                .iter()
                .zip(&u)
                .map(|(&x, &uk)| x.as_f64() * uk)
                .sum::<f64>()
                * *vb;
            *vb /= c * b_total;
        }
    }
    // Q ← Q·B: columns sum to 1. Returned transposed, i.e. [B_loc, K] like the scores.
    let out: Vec<T> = e
        .chunks_exact(k)
        .zip(&v)
        .flat_map(|(er, &vb)| {
            let u = &u;
            er.iter()
                .zip(u)
                .map(move |(&x, &uk)| T::c(uk * x.as_f64() * vb * b_total))
        })
        .collect();
    Tensor::from_vec(out, &[b_loc, k])
}
