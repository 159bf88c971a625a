//! Normalisation ops: batch norm (channels-last, optional fused ReLU, split for SyncBatchNorm),
//! layer norm over the last dimension, and L2 normalisation (`F.normalize`), forward and backward.
//!
//! Batch norm views its input as `rows × C` with C the last (contiguous) dimension: NHWC
//! `[N,H,W,C]` for BatchNorm2d, `[N,C]` for BatchNorm1d. Per-channel statistics are therefore
//! column sums of a row-major matrix: each parallel task walks a fixed block of rows with the
//! channel loop innermost (contiguous, vectorised) and accumulates into per-block f64 vectors,
//! which are then added in block order, so results do not depend on the thread count.
//!
//! Memory passes (these ops are memory-bound), training mode:
//! - forward: one read of x for the statistics, one read of x and one write of y for
//!   `y = relu?(x·scale + shift)` (PyTorch: a separate ReLU adds a read and a write);
//! - backward: one read of (dy, x) for `Σdy`, `Σdy·(x−μ)`, one read of (dy, x) and one write of dx.
//!   The fused ReLU's mask `y > 0` is recomputed from x with the forward's exact expression, so
//!   the backward never reads y.
//!
//! Outputs of 16 MB and more are written with streaming stores (see `elementwise::emit`), which
//! saves the read-for-ownership of every destination line; outputs are never zero-filled first.
//!
//! The training forward is split as a later SyncBatchNorm needs it: [`batch_norm_stats`] (local
//! partial sums) → all-reduce of [`BatchNormPartials`] → [`batch_norm_finalize`] (mean, invstd,
//! running statistics) → [`batch_norm_apply`]. Likewise the backward: [`batch_norm_backward_reduce`]
//! → all-reduce of [`BatchNormGradPartials`] → [`batch_norm_backward_apply`], with
//! [`batch_norm_param_grads`] giving dγ, dβ. [`batch_norm_forward`] / [`batch_norm_backward`]
//! chain the pieces for one process.
//!
//! Layer norm and L2 normalisation work row by row over the last dimension: a row (384 floats
//! for ViT-S) stays in L1 between its reduction and its output, so each is one pass over memory.

use super::elementwise::{emit, par_fill, should_stream, simd, CHUNK, TILE};
use crate::error::{Error, Result};
use crate::tensor::{Float, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

// ---------------------------------------------------------------------------------------------
// Shared helpers

/// Rows per block of a deterministic column reduction over `rows × c`: at most 64 blocks of at
/// least ~32K elements. Depends on the shape only, never on the thread count.
fn reduce_rows_per_block(rows: usize, c: usize) -> usize {
    let blocks = (rows * c / (1 << 15)).clamp(1, 64);
    rows.div_ceil(blocks).max(1)
}

/// Rows per task of a row-parallel element-wise kernel (~[`CHUNK`] elements, at least one row).
fn rows_per_task(d: usize) -> usize {
    (CHUNK / d.max(1)).max(1)
}

/// Sum of `f(x[i])` with 16 independent accumulators, so that LLVM vectorises it; the order of
/// additions is fixed (deterministic).
///
/// The accumulators pass through `black_box` before the final fold: without that barrier LLVM's
/// SLP vectoriser "sees" the horizontal fold and splits the loop into 2-wide pieces; with it the
/// loop body becomes two full-width vector adds.
#[inline(always)]
fn lane_sum<T: Float>(x: &[T], f: impl Fn(T) -> T) -> T {
    let mut acc = [T::zero(); 16];
    let mut it = x.chunks_exact(16);
    for ch in &mut it {
        for (a, &v) in acc.iter_mut().zip(ch) {
            *a += f(v);
        }
    }
    let mut tail = T::zero();
    for &v in it.remainder() {
        tail += f(v);
    }
    fold16(std::hint::black_box(acc)) + tail
}

/// Two-input version of [`lane_sum`]: `Σ f(a[i], b[i])`.
#[inline(always)]
fn lane_sum2<T: Float>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> T {
    let mut acc = [T::zero(); 16];
    let mut ia = a.chunks_exact(16);
    let mut ib = b.chunks_exact(16);
    for (ca, cb) in (&mut ia).zip(&mut ib) {
        for ((s, &u), &v) in acc.iter_mut().zip(ca).zip(cb) {
            *s += f(u, v);
        }
    }
    let mut tail = T::zero();
    for (&u, &v) in ia.remainder().iter().zip(ib.remainder()) {
        tail += f(u, v);
    }
    fold16(std::hint::black_box(acc)) + tail
}

/// Pairwise sum of 16 lanes (fixed order).
#[inline(always)]
fn fold16<T: Float>(mut acc: [T; 16]) -> T {
    for w in [8, 4, 2, 1] {
        for i in 0..w {
            acc[i] += acc[i + w];
        }
    }
    acc[0]
}

/// Errors unless `t` has shape `[c]`.
fn expect_vec<T: Float>(op: &'static str, what: &str, t: &Tensor<T>, c: usize) -> Result<()> {
    t.expect_shape(op, what, &[c])
}

/// Errors unless a per-channel (or per-row) vector has length `c`.
fn expect_len(op: &'static str, what: &str, len: usize, c: usize) -> Result<()> {
    if len != c {
        return Err(Error::shape(
            op,
            format!("{what} has length {len}, expected {c}"),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Batch norm: types

/// Parameters of batch norm.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormParams {
    /// Added to the variance before the square root (PyTorch's default 1e-5).
    pub eps: f64,
    /// Running-statistics update weight: `r ← (1 − momentum)·r + momentum·batch` (default 0.1).
    pub momentum: f64,
    /// Training mode (batch statistics, running statistics updated) or evaluation mode (running
    /// statistics used, nothing updated).
    pub training: bool,
    /// Apply ReLU to the output (fused: no extra pass; its backward masks dy by `y > 0`).
    pub relu: bool,
}

impl Default for BatchNormParams {
    fn default() -> Self {
        BatchNormParams {
            eps: 1e-5,
            momentum: 0.1,
            training: true,
            relu: false,
        }
    }
}

/// Per-channel partial statistics of a batch-norm input: what a SyncBatchNorm all-reduces
/// (element-wise sums of all three fields across processes). Accumulated in f64 so that
/// `E[x²] − E[x]²` keeps its precision.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNormPartials {
    /// `Σ x` per channel.
    pub sum: Vec<f64>,
    /// `Σ x²` per channel.
    pub sumsq: Vec<f64>,
    /// Number of values per channel (rows) the sums cover.
    pub count: usize,
}

impl BatchNormPartials {
    /// Adds another process's (or another shard's) partials: the CPU form of the all-reduce.
    pub fn merge(&mut self, other: &BatchNormPartials) -> Result<()> {
        expect_len(
            "BatchNormPartials::merge",
            "other",
            other.sum.len(),
            self.sum.len(),
        )?;
        for (a, b) in self.sum.iter_mut().zip(&other.sum) {
            *a += b;
        }
        for (a, b) in self.sumsq.iter_mut().zip(&other.sumsq) {
            *a += b;
        }
        self.count += other.count;
        Ok(())
    }
}

/// The normalisation statistics applied to the input: `x̂ = (x − mean)·invstd`.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNormStats<T> {
    /// Per-channel mean (batch mean in training, running mean in evaluation).
    pub mean: Vec<T>,
    /// Per-channel `1/√(var + eps)` (biased batch variance in training, running variance in
    /// evaluation).
    pub invstd: Vec<T>,
}

/// What the batch-norm backward needs besides dy and x (all per channel, length C).
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNormCtx<T> {
    /// Mean used to normalise.
    pub mean: Vec<T>,
    /// `1/√(var + eps)` used to normalise.
    pub invstd: Vec<T>,
    /// `γ·invstd`: the forward computed `y = x·scale + shift`.
    pub scale: Vec<T>,
    /// `β − mean·γ·invstd`.
    pub shift: Vec<T>,
    /// Whether the forward ran in training mode (selects the backward formula).
    pub training: bool,
    /// Whether the forward applied the fused ReLU.
    pub relu: bool,
}

/// Per-channel partial sums of the batch-norm backward, all-reduced by a SyncBatchNorm before
/// [`batch_norm_backward_apply`]. `dy'` is dy masked by the fused ReLU (dy itself without ReLU).
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNormGradPartials {
    /// `Σ dy'` per channel (= dβ).
    pub sum_dy: Vec<f64>,
    /// `Σ dy'·(x − mean)` per channel (= dγ / invstd).
    pub sum_dy_xmu: Vec<f64>,
    /// Number of values per channel the sums cover.
    pub count: usize,
}

impl BatchNormGradPartials {
    /// Adds another process's partials (the CPU form of the all-reduce).
    pub fn merge(&mut self, other: &BatchNormGradPartials) -> Result<()> {
        expect_len(
            "BatchNormGradPartials::merge",
            "other",
            other.sum_dy.len(),
            self.sum_dy.len(),
        )?;
        for (a, b) in self.sum_dy.iter_mut().zip(&other.sum_dy) {
            *a += b;
        }
        for (a, b) in self.sum_dy_xmu.iter_mut().zip(&other.sum_dy_xmu) {
            *a += b;
        }
        self.count += other.count;
        Ok(())
    }
}

/// Gradients of batch norm.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNormGrads<T> {
    /// Gradient of the input, shape of x.
    pub dx: Tensor<T>,
    /// Gradient of γ, `[C]`.
    pub dgamma: Tensor<T>,
    /// Gradient of β, `[C]`.
    pub dbeta: Tensor<T>,
}

/// `(rows, C)` of a channels-last batch-norm input (rank ≥ 2, C = last dimension).
fn bn_dims<T: Float>(op: &'static str, x: &Tensor<T>) -> Result<(usize, usize)> {
    if x.rank() < 2 || x.dim(-1) == 0 {
        return Err(Error::shape(
            op,
            format!(
                "input has shape {:?}, expected [N, C] or NHWC [N, H, W, C] with C > 0",
                x.shape()
            ),
        ));
    }
    let c = x.dim(-1);
    Ok((x.numel() / c, c))
}

// ---------------------------------------------------------------------------------------------
// Batch norm: kernels

/// The forward's affine map, written once so that the backward's ReLU mask recomputes exactly
/// the forward's value.
#[inline(always)]
fn bn_affine<T: Float>(x: T, scale: T, shift: T) -> T {
    x * scale + shift
}

/// Rows per "super-row" of the per-channel kernels. For small C, `k = 256 / C` consecutive rows
/// are processed as one row of `k·C` elements against per-channel vectors repeated k times, so
/// that every inner loop is ≥ 256 elements long: with C = 64 the per-row loop set-up otherwise
/// costs as much as the loop itself.
fn bn_group(c: usize) -> usize {
    if c >= 256 {
        1
    } else {
        256 / c.max(1)
    }
}

/// Adds `rep[j]` (a per-super-row-position sum) into `out[j % c]`, in order of `j`.
fn fold_groups(rep: &[f64], out: &mut [f64]) {
    let c = out.len();
    for (j, &v) in rep.iter().enumerate() {
        out[j % c] += v;
    }
}

/// Adds the column sums and sums of squares of a block of super-rows to `s`, `q` (length
/// `k·C`, see [`bn_group`]); a trailing partial super-row adds to the leading positions.
#[inline(always)]
fn bn_column_sums<T: Float>(x: &[T], s: &mut [f64], q: &mut [f64]) {
    let mut rows = x.chunks_exact(s.len());
    for row in &mut rows {
        for ((s, q), &v) in s.iter_mut().zip(q.iter_mut()).zip(row) {
            let v = v.as_f64();
            *s += v;
            *q += v * v;
        }
    }
    for ((s, q), &v) in s.iter_mut().zip(q.iter_mut()).zip(rows.remainder()) {
        let v = v.as_f64();
        *s += v;
        *q += v * v;
    }
}

/// Splits a span of a row-major `rows × c` matrix that starts at column `ch0` into runs that
/// each lie within one row: `run(i, ch, n)` covers span elements `i..i + n`, columns
/// `ch..ch + n`. Lets the per-channel kernels work on tiles that do not start at a row.
#[inline(always)]
fn for_each_run(len: usize, c: usize, ch0: usize, mut run: impl FnMut(usize, usize, usize)) {
    let (mut i, mut ch) = (0, ch0);
    while i < len {
        let n = (c - ch).min(len - i);
        run(i, ch, n);
        i += n;
        ch = 0;
    }
}

/// `out = relu?(x·scale + shift)` over a span of rows starting at channel `ch0`.
#[inline(always)]
fn bn_apply_span<T: Float, const RELU: bool>(
    x: &[T],
    out: &mut [MaybeUninit<T>],
    ch0: usize,
    scale: &[T],
    shift: &[T],
) {
    let zero = T::zero();
    for_each_run(x.len(), scale.len(), ch0, |i, ch, n| {
        let it = out[i..i + n]
            .iter_mut()
            .zip(&x[i..i + n])
            .zip(scale[ch..ch + n].iter().zip(&shift[ch..ch + n]));
        for ((o, &v), (&s, &b)) in it {
            let y = bn_affine(v, s, b);
            o.write(if RELU && y < zero { zero } else { y });
        }
    });
}

/// `dy'`: dy masked by the fused ReLU (`y > 0`, y recomputed from x).
#[inline(always)]
fn bn_masked_dy<T: Float, const RELU: bool>(g: T, x: T, scale: T, shift: T) -> T {
    if RELU && bn_affine(x, scale, shift) <= T::zero() {
        T::zero()
    } else {
        g
    }
}

/// Per-channel vectors of the backward, repeated [`bn_group`] times.
struct BnRep<T> {
    mean: Vec<T>,
    scale: Vec<T>,
    shift: Vec<T>,
}

impl<T: Float> BnRep<T> {
    fn new(ctx: &BatchNormCtx<T>, k: usize) -> Self {
        BnRep {
            mean: ctx.mean.repeat(k),
            scale: ctx.scale.repeat(k),
            shift: ctx.shift.repeat(k),
        }
    }
}

/// Adds `Σ dy'` and `Σ dy'·(x − mean)` of a block of super-rows to `sdy`, `sdx` (length `k·C`);
/// a trailing partial super-row adds to the leading positions.
#[inline(always)]
fn bn_grad_sums<T: Float, const RELU: bool>(
    dy: &[T],
    x: &[T],
    rep: &BnRep<T>,
    sdy: &mut [f64],
    sdx: &mut [f64],
) {
    let ce = rep.mean.len();
    let mut gi = dy.chunks_exact(ce);
    let mut xi = x.chunks_exact(ce);
    let mut row = |grow: &[T], xrow: &[T]| {
        let it = grow
            .iter()
            .zip(xrow)
            .zip(rep.scale.iter().zip(&rep.shift))
            .zip(rep.mean.iter())
            .zip(sdy.iter_mut().zip(sdx.iter_mut()));
        for ((((&g, &v), (&s, &b)), &m), (a, bx)) in it {
            let g = bn_masked_dy::<T, RELU>(g, v, s, b).as_f64();
            *a += g;
            *bx += g * (v - m).as_f64();
        }
    };
    for (grow, xrow) in (&mut gi).zip(&mut xi) {
        row(grow, xrow);
    }
    row(gi.remainder(), xi.remainder());
}

/// `dx = dy'·scale + (x − mean)·k1 + k0` over a span of super-rows starting at position `ch0`
/// (training: k0, k1 carry the batch-statistics terms; evaluation: k0 = k1 = 0 and
/// `dx = dy'·scale`); all per-channel vectors repeated [`bn_group`] times.
#[inline(always)]
fn bn_grad_apply_span<T: Float, const RELU: bool>(
    dy: &[T],
    x: &[T],
    out: &mut [MaybeUninit<T>],
    ch0: usize,
    rep: &BnRep<T>,
    k0: &[T],
    k1: &[T],
) {
    for_each_run(x.len(), rep.mean.len(), ch0, |i, ch, n| {
        let r = ch..ch + n;
        let it = out[i..i + n]
            .iter_mut()
            .zip(dy[i..i + n].iter().zip(&x[i..i + n]))
            .zip(rep.scale[r.clone()].iter().zip(&rep.shift[r.clone()]))
            .zip(
                rep.mean[r.clone()]
                    .iter()
                    .zip(k0[r.clone()].iter().zip(&k1[r])),
            );
        for (((o, (&g, &v)), (&s, &b)), (&m, (&a0, &a1))) in it {
            let g = bn_masked_dy::<T, RELU>(g, v, s, b);
            o.write(g * s + (v - m) * a1 + a0);
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Batch norm: forward

/// Per-channel partial statistics (`Σx`, `Σx²` in f64, and the row count) of a channels-last
/// input `[..., C]`: the first step of the training forward, and what SyncBatchNorm all-reduces.
/// One read of x; parallel over fixed row blocks, summed in block order (deterministic).
pub fn batch_norm_stats<T: Float>(x: &Tensor<T>) -> Result<BatchNormPartials> {
    let (rows, c) = bn_dims("batch_norm_stats", x)?;
    let k = bn_group(c);
    let ce = k * c;
    // Blocks start on super-row boundaries, so position j of a block's sums is channel j % c.
    let rpb = reduce_rows_per_block(rows, c).next_multiple_of(k);
    let parts: Vec<(Vec<f64>, Vec<f64>)> = x
        .data()
        .par_chunks(rpb * c)
        .map(|blk| {
            let mut s = vec![0.0; ce];
            let mut q = vec![0.0; ce];
            simd(
                #[inline(always)]
                || bn_column_sums(blk, &mut s, &mut q),
            );
            (s, q)
        })
        .collect();
    let mut p = BatchNormPartials {
        sum: vec![0.0; c],
        sumsq: vec![0.0; c],
        count: rows,
    };
    for (s, q) in &parts {
        fold_groups(s, &mut p.sum);
        fold_groups(q, &mut p.sumsq);
    }
    Ok(p)
}

/// Turns (possibly all-reduced) partials into the batch mean and `invstd = 1/√(var + eps)`
/// (biased variance `E[x²] − E[x]²`, in f64), and updates the running statistics in place as
/// PyTorch does: `running_mean ← (1−m)·running_mean + m·mean`,
/// `running_var ← (1−m)·running_var + m·var·n/(n−1)` (the UNBIASED variance).
/// Errors when a channel has fewer than 2 values (PyTorch refuses too).
pub fn batch_norm_finalize<T: Float>(
    partials: &BatchNormPartials,
    running_mean: &mut Tensor<T>,
    running_var: &mut Tensor<T>,
    params: BatchNormParams,
) -> Result<BatchNormStats<T>> {
    const OP: &str = "batch_norm_finalize";
    let c = partials.sum.len();
    expect_len(OP, "partials.sumsq", partials.sumsq.len(), c)?;
    expect_vec(OP, "running_mean", running_mean, c)?;
    expect_vec(OP, "running_var", running_var, c)?;
    if partials.count < 2 {
        return Err(Error::invalid(
            OP,
            format!(
                "expected more than 1 value per channel when training, got {}",
                partials.count
            ),
        ));
    }
    if params.eps.is_nan() || params.eps < 0.0 {
        return Err(Error::invalid(OP, format!("eps {} < 0", params.eps)));
    }
    let n = partials.count as f64;
    let m = params.momentum;
    let mut mean = Vec::with_capacity(c);
    let mut invstd = Vec::with_capacity(c);
    let it = partials.sum.iter().zip(&partials.sumsq).zip(
        running_mean
            .data_mut()
            .iter_mut()
            .zip(running_var.data_mut()),
    );
    for ((&s, &q), (rm, rv)) in it {
        let mu = s / n;
        let var = (q / n - mu * mu).max(0.0);
        mean.push(T::from_f64(mu));
        invstd.push(T::from_f64(1.0 / (var + params.eps).sqrt()));
        *rm = T::from_f64((1.0 - m) * rm.as_f64() + m * mu);
        *rv = T::from_f64((1.0 - m) * rv.as_f64() + m * var * n / (n - 1.0));
    }
    Ok(BatchNormStats { mean, invstd })
}

/// Evaluation-mode statistics: the running mean and `1/√(running_var + eps)`.
pub fn batch_norm_eval_stats<T: Float>(
    running_mean: &Tensor<T>,
    running_var: &Tensor<T>,
    eps: f64,
) -> Result<BatchNormStats<T>> {
    let c = running_mean.numel();
    running_mean.expect_shape("batch_norm_eval_stats", "running_mean", &[c])?;
    expect_vec("batch_norm_eval_stats", "running_var", running_var, c)?;
    Ok(BatchNormStats {
        mean: running_mean.data().to_vec(),
        invstd: running_var
            .data()
            .iter()
            .map(|&v| T::from_f64(1.0 / (v.as_f64() + eps).sqrt()))
            .collect(),
    })
}

/// Applies batch norm with given statistics: `y = relu?((x − mean)·invstd·γ + β)` over a
/// channels-last input `[..., C]`, computed as `x·scale + shift` with per-channel
/// `scale = γ·invstd`, `shift = β − mean·scale` (one read of x, one write of y). Returns y and the
/// backward's context (`params.training` and `params.relu` are recorded in it).
pub fn batch_norm_apply<T: Float>(
    x: &Tensor<T>,
    gamma: &Tensor<T>,
    beta: &Tensor<T>,
    stats: BatchNormStats<T>,
    params: BatchNormParams,
) -> Result<(Tensor<T>, BatchNormCtx<T>)> {
    const OP: &str = "batch_norm_apply";
    let (_, c) = bn_dims(OP, x)?;
    expect_vec(OP, "gamma", gamma, c)?;
    expect_vec(OP, "beta", beta, c)?;
    expect_len(OP, "stats.mean", stats.mean.len(), c)?;
    expect_len(OP, "stats.invstd", stats.invstd.len(), c)?;
    let mut scale = Vec::with_capacity(c);
    let mut shift = Vec::with_capacity(c);
    for ch in 0..c {
        let s = gamma.data()[ch].as_f64() * stats.invstd[ch].as_f64();
        scale.push(T::from_f64(s));
        shift.push(T::from_f64(
            beta.data()[ch].as_f64() - stats.mean[ch].as_f64() * s,
        ));
    }
    // Per-channel vectors repeated over super-rows (see `bn_group`); chunks hold whole
    // super-rows, so element `off` of a chunk sits at position `off % ce` of the repetition.
    let ce = bn_group(c) * c;
    let (sc, sh) = (scale.repeat(ce / c), shift.repeat(ce / c));
    let chunk = (CHUNK / ce).max(1) * ce;
    let stream = should_stream::<T>(x.numel());
    let xs = x.data();
    let (sc, sh) = (&sc[..], &sh[..]);
    // SAFETY: `bn_apply_span` writes every element of the span it is given.
    let y = unsafe {
        par_fill(x.numel(), chunk, |i, out| {
            let xb = &xs[i * chunk..i * chunk + out.len()];
            simd(
                #[inline(always)]
                || {
                    emit(
                        out,
                        stream,
                        TILE,
                        #[inline(always)]
                        |off, o| {
                            let xt = &xb[off..off + o.len()];
                            if params.relu {
                                bn_apply_span::<T, true>(xt, o, off % ce, sc, sh)
                            } else {
                                bn_apply_span::<T, false>(xt, o, off % ce, sc, sh)
                            }
                        },
                    )
                },
            )
        })
    };
    let ctx = BatchNormCtx {
        mean: stats.mean,
        invstd: stats.invstd,
        scale,
        shift,
        training: params.training,
        relu: params.relu,
    };
    Ok((Tensor::from_vec(y, x.shape())?, ctx))
}

/// Batch norm forward over a channels-last input `[..., C]` (NHWC for BatchNorm2d, `[N, C]` for
/// BatchNorm1d) with γ, β of shape `[C]`. Training mode normalises with the batch statistics and
/// updates `running_mean`/`running_var` in place (momentum, unbiased variance, as PyTorch);
/// evaluation mode normalises with the running statistics. Optional fused ReLU.
/// Chains [`batch_norm_stats`] → [`batch_norm_finalize`] → [`batch_norm_apply`].
pub fn batch_norm_forward<T: Float>(
    x: &Tensor<T>,
    gamma: &Tensor<T>,
    beta: &Tensor<T>,
    running_mean: &mut Tensor<T>,
    running_var: &mut Tensor<T>,
    params: BatchNormParams,
) -> Result<(Tensor<T>, BatchNormCtx<T>)> {
    let (_, c) = bn_dims("batch_norm_forward", x)?;
    expect_vec("batch_norm_forward", "running_mean", running_mean, c)?;
    expect_vec("batch_norm_forward", "running_var", running_var, c)?;
    let stats = if params.training {
        let p = batch_norm_stats(x)?;
        batch_norm_finalize(&p, running_mean, running_var, params)?
    } else {
        batch_norm_eval_stats(running_mean, running_var, params.eps)?
    };
    batch_norm_apply(x, gamma, beta, stats, params)
}

// ---------------------------------------------------------------------------------------------
// Batch norm: backward

/// Checks dy/x/ctx of the backward and returns `(rows, C)`.
fn bn_backward_dims<T: Float>(
    op: &'static str,
    dy: &Tensor<T>,
    x: &Tensor<T>,
    ctx: &BatchNormCtx<T>,
) -> Result<(usize, usize)> {
    let (rows, c) = bn_dims(op, x)?;
    dy.expect_shape(op, "dy", x.shape())?;
    for (what, len) in [
        ("ctx.mean", ctx.mean.len()),
        ("ctx.invstd", ctx.invstd.len()),
        ("ctx.scale", ctx.scale.len()),
        ("ctx.shift", ctx.shift.len()),
    ] {
        expect_len(op, what, len, c)?;
    }
    Ok((rows, c))
}

/// First step of the backward: per-channel `Σ dy'` and `Σ dy'·(x − mean)` in f64 (dy' = dy
/// masked by the fused ReLU), one read of (dy, x). SyncBatchNorm all-reduces the result.
pub fn batch_norm_backward_reduce<T: Float>(
    dy: &Tensor<T>,
    x: &Tensor<T>,
    ctx: &BatchNormCtx<T>,
) -> Result<BatchNormGradPartials> {
    let (rows, c) = bn_backward_dims("batch_norm_backward_reduce", dy, x, ctx)?;
    let k = bn_group(c);
    let rep = BnRep::new(ctx, k);
    let blk = reduce_rows_per_block(rows, c).next_multiple_of(k) * c;
    let parts: Vec<(Vec<f64>, Vec<f64>)> = dy
        .data()
        .par_chunks(blk)
        .zip(x.data().par_chunks(blk))
        .map(|(g, v)| {
            let mut sdy = vec![0.0; k * c];
            let mut sdx = vec![0.0; k * c];
            simd(
                #[inline(always)]
                || {
                    if ctx.relu {
                        bn_grad_sums::<T, true>(g, v, &rep, &mut sdy, &mut sdx)
                    } else {
                        bn_grad_sums::<T, false>(g, v, &rep, &mut sdy, &mut sdx)
                    }
                },
            );
            (sdy, sdx)
        })
        .collect();
    let mut p = BatchNormGradPartials {
        sum_dy: vec![0.0; c],
        sum_dy_xmu: vec![0.0; c],
        count: rows,
    };
    for (a, b) in &parts {
        fold_groups(a, &mut p.sum_dy);
        fold_groups(b, &mut p.sum_dy_xmu);
    }
    Ok(p)
}

/// Second step of the backward: dx from (possibly all-reduced) partials, one read of (dy, x) and
/// one write of dx. Training mode: `dx = γ·invstd·(dy' − mean(dy') − x̂·mean(dy'·x̂))` with the
/// means over `partials.count` values; evaluation mode (statistics are constants):
/// `dx = γ·invstd·dy'` (the partials are then unused).
pub fn batch_norm_backward_apply<T: Float>(
    dy: &Tensor<T>,
    x: &Tensor<T>,
    ctx: &BatchNormCtx<T>,
    partials: &BatchNormGradPartials,
) -> Result<Tensor<T>> {
    const OP: &str = "batch_norm_backward_apply";
    let (_, c) = bn_backward_dims(OP, dy, x, ctx)?;
    let (k0, k1): (Vec<T>, Vec<T>) = if ctx.training {
        expect_len(OP, "partials.sum_dy", partials.sum_dy.len(), c)?;
        expect_len(OP, "partials.sum_dy_xmu", partials.sum_dy_xmu.len(), c)?;
        if partials.count == 0 {
            return Err(Error::invalid(OP, "partials cover 0 values"));
        }
        let n = partials.count as f64;
        (0..c)
            .map(|ch| {
                let s = ctx.scale[ch].as_f64();
                let is = ctx.invstd[ch].as_f64();
                (
                    T::from_f64(-s * partials.sum_dy[ch] / n),
                    T::from_f64(-s * is * is * partials.sum_dy_xmu[ch] / n),
                )
            })
            .unzip()
    } else {
        (vec![T::zero(); c], vec![T::zero(); c])
    };
    let k = bn_group(c);
    let ce = k * c;
    let rep = BnRep::new(ctx, k);
    let (k0, k1) = (k0.repeat(k), k1.repeat(k));
    let chunk = (CHUNK / ce).max(1) * ce;
    let stream = should_stream::<T>(x.numel());
    let (g, v) = (dy.data(), x.data());
    let (rep, k0, k1) = (&rep, &k0[..], &k1[..]);
    // SAFETY: chunks hold whole super-rows (element `off` is at position `off % ce`), and
    // `bn_grad_apply_span` writes every element of its span.
    let dx = unsafe {
        par_fill(x.numel(), chunk, |i, out| {
            let r = i * chunk..i * chunk + out.len();
            let (gb, vb) = (&g[r.clone()], &v[r]);
            simd(
                #[inline(always)]
                || {
                    emit(
                        out,
                        stream,
                        TILE,
                        #[inline(always)]
                        |off, o| {
                            let r = off..off + o.len();
                            let (gt, vt) = (&gb[r.clone()], &vb[r]);
                            if ctx.relu {
                                bn_grad_apply_span::<T, true>(gt, vt, o, off % ce, rep, k0, k1)
                            } else {
                                bn_grad_apply_span::<T, false>(gt, vt, o, off % ce, rep, k0, k1)
                            }
                        },
                    )
                },
            )
        })
    };
    Tensor::from_vec(dx, x.shape())
}

/// `(dγ, dβ) = (invstd·Σdy'·(x − mean), Σdy')`, each `[C]`, from the partials. Use the LOCAL
/// partials (before any all-reduce): parameter gradients are reduced with the others later.
pub fn batch_norm_param_grads<T: Float>(
    partials: &BatchNormGradPartials,
    ctx: &BatchNormCtx<T>,
) -> Result<(Tensor<T>, Tensor<T>)> {
    const OP: &str = "batch_norm_param_grads";
    let c = ctx.invstd.len();
    expect_len(OP, "partials.sum_dy", partials.sum_dy.len(), c)?;
    expect_len(OP, "partials.sum_dy_xmu", partials.sum_dy_xmu.len(), c)?;
    let dgamma = (0..c)
        .map(|ch| T::from_f64(partials.sum_dy_xmu[ch] * ctx.invstd[ch].as_f64()))
        .collect();
    let dbeta = partials.sum_dy.iter().map(|&v| T::from_f64(v)).collect();
    Ok((
        Tensor::from_vec(dgamma, &[c])?,
        Tensor::from_vec(dbeta, &[c])?,
    ))
}

/// Batch norm backward: dx, dγ, dβ for the mode the forward ran in (training: through the batch
/// statistics; evaluation: statistics constant), with dy masked by `y > 0` when the forward fused
/// a ReLU. Chains [`batch_norm_backward_reduce`] → [`batch_norm_backward_apply`] and
/// [`batch_norm_param_grads`]: two reads of (dy, x), one write of dx.
pub fn batch_norm_backward<T: Float>(
    dy: &Tensor<T>,
    x: &Tensor<T>,
    ctx: &BatchNormCtx<T>,
) -> Result<BatchNormGrads<T>> {
    let p = batch_norm_backward_reduce(dy, x, ctx)?;
    let dx = batch_norm_backward_apply(dy, x, ctx, &p)?;
    let (dgamma, dbeta) = batch_norm_param_grads(&p, ctx)?;
    Ok(BatchNormGrads { dx, dgamma, dbeta })
}

// ---------------------------------------------------------------------------------------------
// Layer norm

/// What the layer-norm backward needs besides dy, x and γ: per-row statistics (one per row of
/// the input viewed as `rows × D`).
#[derive(Clone, Debug, PartialEq)]
pub struct LayerNormCtx<T> {
    /// Row means.
    pub mean: Vec<T>,
    /// Row `1/√(var + eps)` (biased variance).
    pub rstd: Vec<T>,
}

/// Gradients of layer norm.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerNormGrads<T> {
    /// Gradient of the input, shape of x.
    pub dx: Tensor<T>,
    /// Gradient of γ, `[D]`.
    pub dgamma: Tensor<T>,
    /// Gradient of β, `[D]`.
    pub dbeta: Tensor<T>,
}

/// `(rows, D)` of a layer-norm input (rank ≥ 1, normalised over the last dimension D > 0).
fn ln_dims<T: Float>(op: &'static str, x: &Tensor<T>) -> Result<(usize, usize)> {
    if x.rank() < 1 || x.dim(-1) == 0 {
        return Err(Error::shape(
            op,
            format!(
                "input has shape {:?}, expected [..., D] with D > 0",
                x.shape()
            ),
        ));
    }
    let d = x.dim(-1);
    Ok((x.numel() / d, d))
}

/// Normalises one row: returns `(mean, rstd)` and writes `(x − mean)·rstd·γ + β`. Mean, then
/// variance as the mean of squared deviations (two passes over an L1-resident row: no
/// cancellation).
#[inline(always)]
fn ln_row<T: Float>(x: &[T], g: &[T], b: &[T], eps: T, out: &mut [MaybeUninit<T>]) -> (T, T) {
    let d = T::from_f64(x.len() as f64);
    let mean = lane_sum(x, |v| v) / d;
    let var = lane_sum(x, |v| (v - mean) * (v - mean)) / d;
    let rstd = T::one() / (var + eps).sqrt();
    for (((o, &v), &gg), &bb) in out.iter_mut().zip(x).zip(g).zip(b) {
        o.write((v - mean) * rstd * gg + bb);
    }
    (mean, rstd)
}

/// Layer norm forward over the last dimension: `y = (x − mean)·rstd·γ + β` per row, γ, β of
/// shape `[D]`, `rstd = 1/√(var + eps)` (biased variance; ViT uses eps = 1e-6, PyTorch's default
/// is 1e-5). Parallel over blocks of rows; one read of x, one write of y.
pub fn layer_norm_forward<T: Float>(
    x: &Tensor<T>,
    gamma: &Tensor<T>,
    beta: &Tensor<T>,
    eps: f64,
) -> Result<(Tensor<T>, LayerNormCtx<T>)> {
    const OP: &str = "layer_norm_forward";
    let (rows, d) = ln_dims(OP, x)?;
    expect_vec(OP, "gamma", gamma, d)?;
    expect_vec(OP, "beta", beta, d)?;
    if eps.is_nan() || eps < 0.0 {
        return Err(Error::invalid(OP, format!("eps {eps} < 0")));
    }
    let rpt = rows_per_task(d);
    let (g, b, e) = (gamma.data(), beta.data(), T::from_f64(eps));
    let mut mean = vec![T::zero(); rows];
    let mut rstd = vec![T::zero(); rows];
    let mut y: Vec<T> = Vec::with_capacity(rows * d);
    y.spare_capacity_mut()[..rows * d]
        .par_chunks_mut(rpt * d)
        .zip(x.data().par_chunks(rpt * d))
        .zip(mean.par_chunks_mut(rpt).zip(rstd.par_chunks_mut(rpt)))
        .for_each(|((out, xb), (mb, rb))| {
            simd(
                #[inline(always)]
                || {
                    for (((orow, xrow), m), r) in out
                        .chunks_exact_mut(d)
                        .zip(xb.chunks_exact(d))
                        .zip(mb.iter_mut())
                        .zip(rb.iter_mut())
                    {
                        (*m, *r) = ln_row(xrow, g, b, e, orow);
                    }
                },
            )
        });
    // SAFETY: the output chunks are whole rows (rows·d elements in all) and `ln_row` wrote every
    // element of every row.
    unsafe { y.set_len(rows * d) };
    Ok((Tensor::from_vec(y, x.shape())?, LayerNormCtx { mean, rstd }))
}

/// Layer norm backward: with `x̂ = (x − mean)·rstd` and `g = dy·γ` per row,
/// `dx = rstd·(g − mean(g) − x̂·mean(g·x̂))`, `dγ = Σ_rows dy·x̂`, `dβ = Σ_rows dy`. One read of
/// (dy, x) and one write of dx: each row is reduced and then written while it is in L1; dγ, dβ
/// are accumulated per fixed block of rows and added in block order (deterministic).
pub fn layer_norm_backward<T: Float>(
    dy: &Tensor<T>,
    x: &Tensor<T>,
    gamma: &Tensor<T>,
    ctx: &LayerNormCtx<T>,
) -> Result<LayerNormGrads<T>> {
    const OP: &str = "layer_norm_backward";
    let (rows, d) = ln_dims(OP, x)?;
    dy.expect_shape(OP, "dy", x.shape())?;
    expect_vec(OP, "gamma", gamma, d)?;
    expect_len(OP, "ctx.mean", ctx.mean.len(), rows)?;
    expect_len(OP, "ctx.rstd", ctx.rstd.len(), rows)?;
    let rpb = reduce_rows_per_block(rows, d);
    let gm = gamma.data();
    let inv_d = T::from_f64(1.0 / d as f64);
    let mut dx: Vec<T> = Vec::with_capacity(rows * d);
    let parts: Vec<(Vec<T>, Vec<T>)> = dx.spare_capacity_mut()[..rows * d]
        .par_chunks_mut(rpb * d)
        .zip(
            dy.data()
                .par_chunks(rpb * d)
                .zip(x.data().par_chunks(rpb * d)),
        )
        .zip(ctx.mean.par_chunks(rpb).zip(ctx.rstd.par_chunks(rpb)))
        .map(|((out, (gb, xb)), (mb, rb))| {
            let mut dgamma = vec![T::zero(); d];
            let mut dbeta = vec![T::zero(); d];
            simd(
                #[inline(always)]
                || {
                    let rows_it = out
                        .chunks_exact_mut(d)
                        .zip(gb.chunks_exact(d).zip(xb.chunks_exact(d)))
                        .zip(mb.iter().zip(rb));
                    for ((orow, (grow, xrow)), (&m, &r)) in rows_it {
                        // Σ g and Σ g·x̂ with g = dy·γ.
                        let (sum_g, sum_gxm) = ln_row_grad_sums(grow, xrow, gm, m);
                        let sum_gx = sum_gxm * r;
                        let c1 = sum_g * inv_d;
                        let c2 = sum_gx * inv_d;
                        for ((((o, &u), &v), &w), (dg, db)) in orow
                            .iter_mut()
                            .zip(grow)
                            .zip(xrow)
                            .zip(gm)
                            .zip(dgamma.iter_mut().zip(dbeta.iter_mut()))
                        {
                            let xh = (v - m) * r;
                            o.write(r * (u * w - c1 - xh * c2));
                            *dg += u * xh;
                            *db += u;
                        }
                    }
                },
            );
            (dgamma, dbeta)
        })
        .collect();
    // SAFETY: the output chunks are whole rows (rows·d elements in all) and every element of
    // every row was written above.
    unsafe { dx.set_len(rows * d) };
    let mut dgamma = vec![0.0f64; d];
    let mut dbeta = vec![0.0f64; d];
    for (a, b) in &parts {
        for (s, v) in dgamma.iter_mut().zip(a) {
            *s += v.as_f64();
        }
        for (s, v) in dbeta.iter_mut().zip(b) {
            *s += v.as_f64();
        }
    }
    Ok(LayerNormGrads {
        dx: Tensor::from_vec(dx, x.shape())?,
        dgamma: Tensor::from_vec(dgamma.into_iter().map(T::from_f64).collect(), &[d])?,
        dbeta: Tensor::from_vec(dbeta.into_iter().map(T::from_f64).collect(), &[d])?,
    })
}

/// `(Σ dy·γ, Σ dy·γ·(x − mean))` over a row: two [`lane_sum2`]-style loops over the (L1-resident)
/// row rather than one loop with two accumulator sets, which LLVM vectorises poorly.
#[inline(always)]
fn ln_row_grad_sums<T: Float>(dy: &[T], x: &[T], g: &[T], mean: T) -> (T, T) {
    let mut a = [T::zero(); 16];
    let mut b = [T::zero(); 16];
    let (mut idy, mut ig) = (dy.chunks_exact(16), g.chunks_exact(16));
    for (cd, cg) in (&mut idy).zip(&mut ig) {
        for ((s, &u), &w) in a.iter_mut().zip(cd).zip(cg) {
            *s += u * w;
        }
    }
    let a = std::hint::black_box(a);
    let mut ix = x.chunks_exact(16);
    let (mut idy, mut ig) = (dy.chunks_exact(16), g.chunks_exact(16));
    for ((cd, cg), cx) in (&mut idy).zip(&mut ig).zip(&mut ix) {
        for (((s, &u), &w), &v) in b.iter_mut().zip(cd).zip(cg).zip(cx) {
            *s += u * w * (v - mean);
        }
    }
    let b = std::hint::black_box(b);
    let (mut ta, mut tb) = (T::zero(), T::zero());
    for ((&d, &v), &w) in idy
        .remainder()
        .iter()
        .zip(ix.remainder())
        .zip(ig.remainder())
    {
        let u = d * w;
        ta += u;
        tb += u * (v - mean);
    }
    (fold16(a) + ta, fold16(b) + tb)
}

// ---------------------------------------------------------------------------------------------
// L2 normalisation

/// `F.normalize`'s lower bound on the norm: `y = x / max(‖x‖, 1e-12)`.
pub const L2_NORMALIZE_EPS: f64 = 1e-12;

/// What the L2-normalisation backward needs besides dy and x.
#[derive(Clone, Debug, PartialEq)]
pub struct L2NormalizeCtx<T> {
    /// `‖x‖` of each row (before clamping to [`L2_NORMALIZE_EPS`]).
    pub norm: Vec<T>,
}

/// L2 normalisation over the last dimension, as `torch.nn.functional.normalize(x, dim=-1)`:
/// `y = x / max(‖x‖₂, 1e-12)` per row. One read of x, one write of y (rows stay in L1).
pub fn l2_normalize_forward<T: Float>(x: &Tensor<T>) -> Result<(Tensor<T>, L2NormalizeCtx<T>)> {
    let (rows, d) = ln_dims("l2_normalize_forward", x)?;
    let rpt = rows_per_task(d);
    let eps = T::from_f64(L2_NORMALIZE_EPS);
    let mut norm = vec![T::zero(); rows];
    let mut y: Vec<T> = Vec::with_capacity(rows * d);
    y.spare_capacity_mut()[..rows * d]
        .par_chunks_mut(rpt * d)
        .zip(x.data().par_chunks(rpt * d))
        .zip(norm.par_chunks_mut(rpt))
        .for_each(|((out, xb), nb)| {
            simd(
                #[inline(always)]
                || {
                    for ((orow, xrow), n) in out
                        .chunks_exact_mut(d)
                        .zip(xb.chunks_exact(d))
                        .zip(nb.iter_mut())
                    {
                        *n = lane_sum(xrow, |v| v * v).sqrt();
                        let inv = T::one() / n.max(eps);
                        for (o, &v) in orow.iter_mut().zip(xrow) {
                            o.write(v * inv);
                        }
                    }
                },
            )
        });
    // SAFETY: the output chunks are whole rows (rows·d elements) and each row was written.
    unsafe { y.set_len(rows * d) };
    Ok((Tensor::from_vec(y, x.shape())?, L2NormalizeCtx { norm }))
}

/// L2 normalisation backward: with `n = ‖x‖`, `dx = (dy − x·(x·dy)/n²)/n` where `n > 1e-12`,
/// and `dx = dy/1e-12` where the norm was clamped (then y = x/1e-12 is linear in x).
pub fn l2_normalize_backward<T: Float>(
    dy: &Tensor<T>,
    x: &Tensor<T>,
    ctx: &L2NormalizeCtx<T>,
) -> Result<Tensor<T>> {
    const OP: &str = "l2_normalize_backward";
    let (rows, d) = ln_dims(OP, x)?;
    dy.expect_shape(OP, "dy", x.shape())?;
    expect_len(OP, "ctx.norm", ctx.norm.len(), rows)?;
    let rpt = rows_per_task(d);
    let eps = T::from_f64(L2_NORMALIZE_EPS);
    let (g, v) = (dy.data(), x.data());
    // SAFETY: output chunks are whole rows and every element of every row is written.
    let dx = unsafe {
        par_fill(rows * d, rpt * d, |i, out| {
            let r = i * rpt * d..i * rpt * d + out.len();
            let (gb, xb) = (&g[r.clone()], &v[r]);
            let nb = &ctx.norm[i * rpt..];
            simd(
                #[inline(always)]
                || {
                    for (((orow, grow), xrow), &n) in out
                        .chunks_exact_mut(d)
                        .zip(gb.chunks_exact(d))
                        .zip(xb.chunks_exact(d))
                        .zip(nb)
                    {
                        if n > eps {
                            let inv = T::one() / n;
                            let k = lane_sum2(xrow, grow, |a, b| a * b) * inv * inv;
                            for ((o, &u), &w) in orow.iter_mut().zip(grow).zip(xrow) {
                                o.write((u - w * k) * inv);
                            }
                        } else {
                            let inv = T::one() / eps;
                            for (o, &u) in orow.iter_mut().zip(grow) {
                                o.write(u * inv);
                            }
                        }
                    }
                },
            )
        })
    };
    Tensor::from_vec(dx, x.shape())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_gradients, randn64, GradCheck};

    /// Random f64 tensor with values `offset + scale·N(0,1)`.
    fn rnd(name: &str, shape: &[usize], offset: f64, scale: f64) -> Tensor<f64> {
        let t = randn64(7, name, shape);
        Tensor::from_vec(t.data().iter().map(|v| offset + scale * v).collect(), shape).unwrap()
    }

    /// Running statistics that are not the batch's: random mean, variance in [0.5, 1.5).
    fn running(c: usize) -> (Tensor<f64>, Tensor<f64>) {
        let rm = rnd("rm", &[c], 0.2, 0.3);
        let rv = rnd("rv", &[c], 0.0, 1.0);
        let rv = Tensor::from_vec(
            rv.data().iter().map(|v| 1.0 + 0.4 * v.tanh()).collect(),
            &[c],
        )
        .unwrap();
        (rm, rv)
    }

    fn bn_gradcheck(name: &str, shape: &[usize], training: bool, relu: bool) {
        let c = *shape.last().unwrap();
        let x = rnd(&format!("{name}_x"), shape, 0.5, 1.5);
        let gamma = rnd(&format!("{name}_g"), &[c], 1.0, 0.5);
        let beta = rnd(&format!("{name}_b"), &[c], 0.0, 0.5);
        let (rm, rv) = running(c);
        let params = BatchNormParams {
            training,
            relu,
            ..Default::default()
        };
        let fwd = |xs: &[Tensor<f64>]| -> Result<(Tensor<f64>, BatchNormCtx<f64>)> {
            let (mut m, mut v) = (rm.clone(), rv.clone());
            let (y, ctx) = batch_norm_forward(&xs[0], &xs[1], &xs[2], &mut m, &mut v, params)?;
            Ok((y, ctx))
        };
        check_gradients(
            name,
            &[x, gamma, beta],
            |xs| Ok(fwd(xs)?.0),
            |xs, dy| {
                let (_, ctx) = fwd(xs)?;
                let g = batch_norm_backward(dy, &xs[0], &ctx)?;
                Ok(vec![Some(g.dx), Some(g.dgamma), Some(g.dbeta)])
            },
            GradCheck::default(),
        );
    }

    #[test]
    fn batch_norm_train_2d_gradient() {
        bn_gradcheck("bn_train_2d", &[7, 5], true, false);
    }

    #[test]
    fn batch_norm_train_2d_relu_gradient() {
        bn_gradcheck("bn_train_2d_relu", &[9, 3], true, true);
    }

    #[test]
    fn batch_norm_train_4d_gradient() {
        bn_gradcheck("bn_train_4d", &[2, 3, 5, 4], true, false);
    }

    #[test]
    fn batch_norm_train_4d_relu_gradient() {
        bn_gradcheck("bn_train_4d_relu", &[3, 5, 3, 5], true, true);
    }

    #[test]
    fn batch_norm_eval_gradients() {
        bn_gradcheck("bn_eval_4d", &[2, 3, 5, 4], false, false);
        bn_gradcheck("bn_eval_4d_relu", &[2, 5, 3, 3], false, true);
        bn_gradcheck("bn_eval_2d", &[6, 5], false, false);
    }

    #[test]
    fn batch_norm_running_stats_follow_pytorch_formula() {
        let x = rnd("rs_x", &[4, 3, 5, 6], 1.0, 2.0);
        let (g, b) = (rnd("rs_g", &[6], 1.0, 0.1), rnd("rs_b", &[6], 0.0, 0.1));
        let (mut rm, mut rv) = running(6);
        let (rm0, rv0) = (rm.clone(), rv.clone());
        let p = BatchNormParams::default();
        let (y, ctx) = batch_norm_forward(&x, &g, &b, &mut rm, &mut rv, p).unwrap();
        let n = 4 * 3 * 5;
        for c in 0..6 {
            let col: Vec<f64> = x.data().iter().skip(c).step_by(6).copied().collect();
            let mean = col.iter().sum::<f64>() / n as f64;
            let ss = col.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>();
            let (var_b, var_u) = (ss / n as f64, ss / (n - 1) as f64);
            assert!((ctx.mean[c] - mean).abs() < 1e-12);
            assert!((ctx.invstd[c] - 1.0 / (var_b + 1e-5).sqrt()).abs() < 1e-10);
            assert!((rm.data()[c] - (0.9 * rm0.data()[c] + 0.1 * mean)).abs() < 1e-12);
            assert!((rv.data()[c] - (0.9 * rv0.data()[c] + 0.1 * var_u)).abs() < 1e-12);
            // each output channel is normalised: mean β, standard deviation ≈ |γ|
            let ycol: Vec<f64> = y.data().iter().skip(c).step_by(6).copied().collect();
            let ym = ycol.iter().sum::<f64>() / n as f64;
            assert!((ym - b.data()[c]).abs() < 1e-10);
        }
        // evaluation mode leaves the running statistics alone
        let (rm1, rv1) = (rm.clone(), rv.clone());
        let pe = BatchNormParams {
            training: false,
            ..p
        };
        batch_norm_forward(&x, &g, &b, &mut rm, &mut rv, pe).unwrap();
        assert_eq!((rm, rv), (rm1, rv1));
    }

    #[test]
    fn batch_norm_split_matches_merged_shards() {
        // Two "processes" each hold half of the batch: all-reducing their partials (merge) must
        // give the full batch's forward and backward, which is what SyncBatchNorm relies on.
        let x = rnd("split_x", &[4, 3, 3, 5], 0.3, 1.0);
        let dy = rnd("split_dy", &[4, 3, 3, 5], 0.0, 1.0);
        let (g, b) = (
            rnd("split_g", &[5], 1.0, 0.3),
            rnd("split_b", &[5], 0.0, 0.3),
        );
        let p = BatchNormParams {
            relu: true,
            ..Default::default()
        };
        let (mut rm, mut rv) = running(5);
        let (y, ctx) = batch_norm_forward(&x, &g, &b, &mut rm, &mut rv, p).unwrap();
        let full = batch_norm_backward(&dy, &x, &ctx).unwrap();

        let xs = x.split_batch(&[1, 3]).unwrap();
        let dys = dy.split_batch(&[1, 3]).unwrap();
        let mut part = batch_norm_stats(&xs[0]).unwrap();
        part.merge(&batch_norm_stats(&xs[1]).unwrap()).unwrap();
        assert_eq!(part.count, 36);
        let (mut rm2, mut rv2) = running(5);
        let stats = batch_norm_finalize(&part, &mut rm2, &mut rv2, p).unwrap();
        let mut outs = vec![];
        let mut ctxs = vec![];
        for xi in &xs {
            let (yi, ci) = batch_norm_apply(xi, &g, &b, stats.clone(), p).unwrap();
            outs.push(yi);
            ctxs.push(ci);
        }
        let y2 = Tensor::cat_batch(&[&outs[0], &outs[1]]).unwrap();
        let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(u, v)| (u - v).abs() < 1e-12);
        assert!(close(y.data(), y2.data()));
        assert!(close(rm.data(), rm2.data()) && close(rv.data(), rv2.data()));

        let mut gp = batch_norm_backward_reduce(&dys[0], &xs[0], &ctxs[0]).unwrap();
        let gp1 = batch_norm_backward_reduce(&dys[1], &xs[1], &ctxs[1]).unwrap();
        let (dg0, _) = batch_norm_param_grads(&gp, &ctxs[0]).unwrap();
        let (dg1, _) = batch_norm_param_grads(&gp1, &ctxs[1]).unwrap();
        gp.merge(&gp1).unwrap();
        let dx0 = batch_norm_backward_apply(&dys[0], &xs[0], &ctxs[0], &gp).unwrap();
        let dx1 = batch_norm_backward_apply(&dys[1], &xs[1], &ctxs[1], &gp).unwrap();
        let dx2 = Tensor::cat_batch(&[&dx0, &dx1]).unwrap();
        assert!(close(full.dx.data(), dx2.data()));
        let dg: Vec<f64> = dg0
            .data()
            .iter()
            .zip(dg1.data())
            .map(|(a, b)| a + b)
            .collect();
        assert!(close(full.dgamma.data(), &dg));
    }

    #[test]
    fn batch_norm_errors() {
        let x = Tensor::<f32>::zeros(&[2, 3, 3, 4]);
        let (g, b) = (Tensor::<f32>::zeros(&[4]), Tensor::<f32>::zeros(&[4]));
        let (mut rm, mut rv) = (Tensor::<f32>::zeros(&[4]), Tensor::<f32>::zeros(&[4]));
        let p = BatchNormParams::default();
        let bad = Tensor::<f32>::zeros(&[3]);
        let e = batch_norm_forward(&x, &bad, &b, &mut rm, &mut rv, p).unwrap_err();
        assert!(matches!(e, Error::Shape { .. }));
        let msg = e.to_string();
        assert!(
            msg.contains("gamma") && msg.contains("[3]") && msg.contains("[4]"),
            "{msg}"
        );
        let e = batch_norm_forward(&bad, &g, &b, &mut rm, &mut rv, p).unwrap_err();
        assert!(e.to_string().contains("[3]"), "{e}");
        let (_, ctx) = batch_norm_forward(&x, &g, &b, &mut rm, &mut rv, p).unwrap();
        let e = batch_norm_backward(&Tensor::zeros(&[2, 3, 3, 5]), &x, &ctx).unwrap_err();
        assert!(e.to_string().contains("[2, 3, 3, 5]"), "{e}");
        // one value per channel cannot be normalised in training mode
        let one = Tensor::<f32>::zeros(&[1, 4]);
        let e = batch_norm_forward(&one, &g, &b, &mut rm, &mut rv, p).unwrap_err();
        assert!(matches!(e, Error::Invalid { .. }), "{e}");
        let pe = BatchNormParams {
            training: false,
            ..p
        };
        assert!(batch_norm_forward(&one, &g, &b, &mut rm, &mut rv, pe).is_ok());
    }

    #[test]
    fn layer_norm_gradient() {
        for (name, shape) in [("ln_a", vec![2, 3, 7]), ("ln_b", vec![3, 37])] {
            let d = *shape.last().unwrap();
            let x = rnd(&format!("{name}_x"), &shape, 0.7, 2.0);
            let g = rnd(&format!("{name}_g"), &[d], 1.0, 0.5);
            let b = rnd(&format!("{name}_b"), &[d], 0.0, 0.5);
            check_gradients(
                name,
                &[x, g, b],
                |xs| Ok(layer_norm_forward(&xs[0], &xs[1], &xs[2], 1e-6)?.0),
                |xs, dy| {
                    let (_, ctx) = layer_norm_forward(&xs[0], &xs[1], &xs[2], 1e-6)?;
                    let gr = layer_norm_backward(dy, &xs[0], &xs[1], &ctx)?;
                    Ok(vec![Some(gr.dx), Some(gr.dgamma), Some(gr.dbeta)])
                },
                GradCheck::default(),
            );
        }
    }

    #[test]
    fn layer_norm_errors() {
        let x = Tensor::<f32>::zeros(&[2, 5]);
        let g = Tensor::<f32>::zeros(&[4]);
        let e = layer_norm_forward(&x, &g, &g, 1e-6)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("gamma") && e.contains("[4]") && e.contains("[5]"),
            "{e}"
        );
        let g5 = Tensor::<f32>::zeros(&[5]);
        let (_, ctx) = layer_norm_forward(&x, &g5, &g5, 1e-6).unwrap();
        let e = layer_norm_backward(&Tensor::zeros(&[5, 2]), &x, &g5, &ctx)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[5, 2]"), "{e}");
    }

    #[test]
    fn l2_normalize_gradient() {
        let x = rnd("l2_x", &[4, 19], 0.1, 1.0);
        check_gradients(
            "l2_normalize",
            std::slice::from_ref(&x),
            |xs| Ok(l2_normalize_forward(&xs[0])?.0),
            |xs, dy| {
                let (_, ctx) = l2_normalize_forward(&xs[0])?;
                Ok(vec![Some(l2_normalize_backward(dy, &xs[0], &ctx)?)])
            },
            GradCheck::default(),
        );
        // Rows whose norm is below 1e-12 are divided by 1e-12 (F.normalize's clamp); the step
        // is scaled down with the values so that the perturbed norm stays below the clamp.
        let tiny = rnd("l2_tiny", &[2, 5], 0.0, 1e-13);
        check_gradients(
            "l2_normalize_clamped",
            std::slice::from_ref(&tiny),
            |xs| Ok(l2_normalize_forward(&xs[0])?.0),
            |xs, dy| {
                let (_, ctx) = l2_normalize_forward(&xs[0])?;
                Ok(vec![Some(l2_normalize_backward(dy, &xs[0], &ctx)?)])
            },
            GradCheck {
                eps: 1e-17,
                ..Default::default()
            },
        );
        let (y, _) = l2_normalize_forward(&x).unwrap();
        for row in y.data().chunks(19) {
            let n: f64 = row.iter().map(|v| v * v).sum();
            assert!((n - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn l2_normalize_errors() {
        let x = Tensor::<f32>::zeros(&[3, 4]);
        let (_, ctx) = l2_normalize_forward(&x).unwrap();
        let e = l2_normalize_backward(&Tensor::zeros(&[4, 3]), &x, &ctx)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[4, 3]") && e.contains("[3, 4]"), "{e}");
        let e = l2_normalize_forward(&Tensor::<f32>::zeros(&[3, 0])).unwrap_err();
        assert!(e.to_string().contains("[3, 0]"), "{e}");
    }

    #[test]
    fn large_batch_norm_streams_and_matches_f64() {
        // ≥ 16 MB of f32 (the streaming threshold). 265 channels: tiles start mid-row; 48
        // channels: rows are grouped 5 at a time (`bn_group`) and tiles straddle the groups.
        for shape in [[4, 62, 64, 265], [5, 61, 287, 48]] {
            let c = shape[3];
            let x = Tensor::randn_named(2, "bigx", &shape, 1.5);
            assert!(crate::backend::cpu::elementwise::should_stream::<f32>(
                x.numel()
            ));
            let dy = Tensor::randn_named(2, "bigdy", &shape, 1.0);
            let g = Tensor::randn_named(2, "bigg", &[c], 1.0);
            let b = Tensor::randn_named(2, "bigb", &[c], 1.0);
            for relu in [false, true] {
                let p = BatchNormParams {
                    relu,
                    ..Default::default()
                };
                let (mut rm, mut rv) = (Tensor::zeros(&[c]), Tensor::full(&[c], 1.0f32));
                let (y, ctx) = batch_norm_forward(&x, &g, &b, &mut rm, &mut rv, p).unwrap();
                let gr = batch_norm_backward(&dy, &x, &ctx).unwrap();
                let (mut rm6, mut rv6) = (Tensor::zeros(&[c]), Tensor::full(&[c], 1.0f64));
                let x64 = x.cast::<f64>();
                let (y6, ctx6) =
                    batch_norm_forward(&x64, &g.cast(), &b.cast(), &mut rm6, &mut rv6, p).unwrap();
                let gr6 = batch_norm_backward(&dy.cast(), &x64, &ctx6).unwrap();
                crate::testing::assert_close("big bn y", &y, &y6.cast(), 1e-6);
                crate::testing::assert_close("big bn dx", &gr.dx, &gr6.dx.cast(), 1e-5);
                crate::testing::assert_close("big bn dgamma", &gr.dgamma, &gr6.dgamma.cast(), 1e-5);
                crate::testing::assert_close("big bn rv", &rv, &rv6.cast(), 1e-6);
            }
        }
    }

    #[test]
    fn f32_matches_f64() {
        // The f32 kernels run the AVX2 path; the f64 results are the reference.
        let x = Tensor::randn_named(1, "f32x", &[5, 7, 3, 40], 2.0);
        let g = Tensor::randn_named(1, "f32g", &[40], 1.0);
        let b = Tensor::randn_named(1, "f32b", &[40], 1.0);
        let dy = Tensor::randn_named(1, "f32dy", &[5, 7, 3, 40], 1.0);
        let p = BatchNormParams {
            relu: true,
            ..Default::default()
        };
        let (mut rm, mut rv) = (Tensor::zeros(&[40]), Tensor::full(&[40], 1.0f32));
        let (y, ctx) = batch_norm_forward(&x, &g, &b, &mut rm, &mut rv, p).unwrap();
        let gr = batch_norm_backward(&dy, &x, &ctx).unwrap();
        let x64 = x.cast::<f64>();
        let (mut rm6, mut rv6) = (Tensor::zeros(&[40]), Tensor::full(&[40], 1.0f64));
        let (y6, ctx6) =
            batch_norm_forward(&x64, &g.cast(), &b.cast(), &mut rm6, &mut rv6, p).unwrap();
        let gr6 = batch_norm_backward(&dy.cast(), &x64, &ctx6).unwrap();
        crate::testing::assert_close("bn y", &y, &y6.cast(), 1e-6);
        crate::testing::assert_close("bn dx", &gr.dx, &gr6.dx.cast(), 1e-5);
        crate::testing::assert_close("bn dgamma", &gr.dgamma, &gr6.dgamma.cast(), 1e-6);
        let (y, ctx) = layer_norm_forward(&x, &g, &b, 1e-6).unwrap();
        let gr = layer_norm_backward(&dy, &x, &g, &ctx).unwrap();
        let (y6, ctx6) = layer_norm_forward(&x64, &g.cast(), &b.cast(), 1e-6).unwrap();
        let gr6 = layer_norm_backward(&dy.cast(), &x64, &g.cast(), &ctx6).unwrap();
        crate::testing::assert_close("ln y", &y, &y6.cast(), 1e-6);
        crate::testing::assert_close("ln dx", &gr.dx, &gr6.dx.cast(), 1e-5);
        crate::testing::assert_close("ln dgamma", &gr.dgamma, &gr6.dgamma.cast(), 1e-6);
    }
}
