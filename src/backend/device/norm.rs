//! Device ops of `kernels/norm.cu`: the normalisation layers of both models, as safe functions
//! generic over [`Exec`] (the GPU, or the CPU emulation that `cargo test` runs). Activations
//! and their gradients are bf16; statistics, γ/β and master weights fp32.
//!
//! Each kernel and its CPU reference (`backend::cpu::norm` unless said otherwise):
//! - `l2norm_forward` / `l2norm_backward` ([`l2norm_forward`], [`l2norm_backward`]):
//!   `l2_normalize_forward` / `l2_normalize_backward` (Suave's projection-head output).
//! - `prototypes_renorm` ([`prototypes_renorm`]): `l2_normalize_forward` on the fp32 prototype
//!   weight, in place (SwAV renormalises it every step), plus the bf16 copy the GEMM reads.
//! - Batch norm, split as SyncBatchNorm needs it (all-reduce the sums between the steps):
//!   `bn_stats_partial` + `sum_partials2` ([`bn_stats`]): `batch_norm_stats`;
//!   `bn_finalize` ([`bn_finalize`]): `batch_norm_finalize`;
//!   `bn_apply` ([`bn_apply`]): `batch_norm_apply` (+ `cpu::elementwise` add and ReLU for the
//!   fused residual);
//!   `bn_backward_partial` + `sum_partials2` ([`bn_backward_reduce`]):
//!   `batch_norm_backward_reduce`; `bn_param_grads` ([`bn_param_grads`]):
//!   `batch_norm_param_grads`; `bn_backward_apply` ([`bn_backward_apply`]):
//!   `batch_norm_backward_apply`.
//! - Layer norm: `layernorm_forward` ([`layernorm_forward`]): `layer_norm_forward`;
//!   `layernorm_backward` + `sum_partials2` ([`layernorm_backward`]): `layer_norm_backward`.
//!
//! The reductions are deterministic (partials per block reduced in a fixed order, no atomics),
//! so every kernel writes all of its outputs and [`Exec::alloc`] (poisoned on the emulation)
//! suffices everywhere; the tests check that no poison survives.
//!
//! [`check_rows`] holds the family's rows of the device check (group `norm`), at the shapes of
//! training: L2 norm `[4096, 128]`, prototypes `[3000, 128]`, batch norm of ResNet-50's layer1
//! (`64·56·56` rows, 256 channels), layer norm of ViT-S (`64·197` rows, width 384).

use super::check::{random, round_bf16, Checker, Measured, TOL_BF16, TOL_F32};
use super::{as_i32, check_len, check_threads, DevBuf, Exec, KArg, LaunchConfig};
use crate::backend::cpu::elementwise::{add_forward, relu_backward, relu_forward};
use crate::backend::cpu::norm as cpu;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::testing::rel_l2;
use half::bf16;
use serde_json::{json, Value};
use std::cell::OnceCell;

/// The kernel module these ops launch from.
const MODULE: &str = "norm";

/// Threads per block the kernels are tuned for on the GPU (8 warps: 8 rows at a time for the
/// row kernels, 8 row lanes per 32-channel tile for the column reductions).
pub const THREADS: u32 = 256;

/// Rows per block of the batch-norm column reductions (`bn_stats_partial`,
/// `bn_backward_partial`): the kernel's comment asks for 256..1024; 512 gives 392 row groups at
/// ResNet-50's layer1 (200 704 rows), enough blocks for every SM with little partial traffic.
pub const BN_ROWS_PER_BLOCK: usize = 512;

/// Rows per block of `layernorm_backward`: 32 gives 394 blocks for ViT-S (12 608 rows) while
/// the `[2, G, D]` partials stay ~4 % of the activation traffic.
pub const LN_ROWS_PER_BLOCK: usize = 32;

/// Dynamic shared memory a launch may use without opting in (`cudaFuncSetAttribute`).
const MAX_DYN_SHARED: usize = 48 * 1024;

/// Largest grid.y of a CUDA launch (the column reductions put their row groups there).
const MAX_GRID_Y: usize = 65_535;

/// Checks `[rows, cols]` (both non-zero, `rows·cols` fits the kernels' `int`/`unsigned`
/// indexing) and the block size; returns them as kernel `int`s.
fn dims(op: &'static str, rows: usize, cols: usize, threads: u32) -> Result<(i32, i32)> {
    check_threads(op, threads)?;
    if rows == 0 || cols == 0 {
        return Err(Error::shape(
            op,
            format!("[{rows}, {cols}]: need at least one row and one column"),
        ));
    }
    let n = rows
        .checked_mul(cols)
        .ok_or_else(|| Error::shape(op, format!("[{rows}, {cols}] overflows")))?;
    as_i32(op, "rows·columns", n)?;
    Ok((as_i32(op, "rows", rows)?, as_i32(op, "columns", cols)?))
}

/// One warp per row: grid `ceil(rows / (threads/32))`, block `threads` (`rows` fits i32).
fn warp_rows(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig::linear(rows.div_ceil(threads as usize / 32) as u32, threads, 0)
}

/// One thread per element: grid `ceil(n / threads)`, block `threads` (`n` fits i32).
fn per_element(n: usize, threads: u32) -> LaunchConfig {
    LaunchConfig::linear(n.div_ceil(threads as usize) as u32, threads, 0)
}

/// Row groups of a column reduction: `G = ceil(rows / rpb)`, checked against the grid limit.
fn row_groups(op: &'static str, rows: usize, rpb: usize) -> Result<(usize, i32)> {
    if rpb == 0 {
        return Err(Error::invalid(op, "rows per block must be > 0"));
    }
    let g = rows.div_ceil(rpb);
    if g > MAX_GRID_Y {
        return Err(Error::invalid(
            op,
            format!("{rows} rows at {rpb} rows per block make {g} row groups (at most {MAX_GRID_Y}): use more rows per block"),
        ));
    }
    Ok((g, as_i32(op, "rows per block", rpb)?))
}

/// A bf16 buffer as an optional pointer argument (null = `KArg::Ptr(0)`).
fn opt_arg<B: DevBuf<T>, T>(b: Option<&B>) -> KArg {
    b.map_or(KArg::Ptr(0), |b| b.arg())
}

// ---------------------------------------------------------------- L2 normalisation

/// Outputs of [`l2norm_forward`].
pub struct L2NormOut<E: Exec> {
    /// `x / max(‖x‖, 1e-12)` per row, `[R, D]` bf16.
    pub y: E::Buf<bf16>,
    /// `‖x‖` per row, `[R]` fp32: what the backward needs (with x).
    pub norm: E::Buf<f32>,
}

/// `l2norm_forward`: `y = x / max(‖x‖, 1e-12)` per row of `x [r, d]` (F.normalize over the last
/// dimension), one warp per row; a NaN row stays NaN.
pub fn l2norm_forward<E: Exec>(
    ex: &E,
    x: &E::Buf<bf16>,
    r: usize,
    d: usize,
    threads: u32,
) -> Result<L2NormOut<E>> {
    const OP: &str = "device::l2norm_forward";
    let (ri, di) = dims(OP, r, d, threads)?;
    check_len(OP, "x", x.len(), r * d)?;
    let y = ex.alloc::<bf16>(r * d)?;
    let norm = ex.alloc::<f32>(r)?;
    let args = [x.arg(), y.arg(), norm.arg(), ri.into(), di.into()];
    // SAFETY: (const bf16* x, bf16* y, float* norm, int R, int D) as declared; x and y hold
    // R·D elements, norm R; the kernel returns for rows >= R.
    unsafe { ex.launch(MODULE, "l2norm_forward", warp_rows(r, threads), &args)? };
    Ok(L2NormOut { y, norm })
}

/// `l2norm_backward`: dx of the L2 normalisation from dy, x and the forward's per-row norms
/// (`dy / 1e-12` where the norm was clamped).
pub fn l2norm_backward<E: Exec>(
    ex: &E,
    dy: &E::Buf<bf16>,
    x: &E::Buf<bf16>,
    norm: &E::Buf<f32>,
    r: usize,
    d: usize,
    threads: u32,
) -> Result<E::Buf<bf16>> {
    const OP: &str = "device::l2norm_backward";
    let (ri, di) = dims(OP, r, d, threads)?;
    check_len(OP, "dy", dy.len(), r * d)?;
    check_len(OP, "x", x.len(), r * d)?;
    check_len(OP, "norm", norm.len(), r)?;
    let dx = ex.alloc::<bf16>(r * d)?;
    let args = [
        dy.arg(),
        x.arg(),
        norm.arg(),
        dx.arg(),
        ri.into(),
        di.into(),
    ];
    // SAFETY: (const bf16* dy, const bf16* x, const float* norm, bf16* dx, int R, int D) as
    // declared; lengths checked above; one warp per row.
    unsafe { ex.launch(MODULE, "l2norm_backward", warp_rows(r, threads), &args)? };
    Ok(dx)
}

/// `prototypes_renorm`: rows of the fp32 prototype weight `w [k, d]` to unit norm in place and,
/// when `w_bf16` is given, the bf16 copy the score GEMM reads, in the same pass. The copy is a
/// caller-owned buffer because it lives as long as the weight (rewritten every step).
pub fn prototypes_renorm<E: Exec>(
    ex: &E,
    w: &mut E::Buf<f32>,
    w_bf16: Option<&mut E::Buf<bf16>>,
    k: usize,
    d: usize,
    threads: u32,
) -> Result<()> {
    const OP: &str = "device::prototypes_renorm";
    let (ki, di) = dims(OP, k, d, threads)?;
    check_len(OP, "w", w.len(), k * d)?;
    if let Some(b) = &w_bf16 {
        check_len(OP, "w_bf16", b.len(), k * d)?;
    }
    let args = [w.arg(), opt_arg(w_bf16.as_deref()), ki.into(), di.into()];
    // SAFETY: (float* w, bf16* w_bf16 or null, int K, int D) as declared; w (and w_bf16) hold
    // K·D elements; one warp per row.
    unsafe { ex.launch(MODULE, "prototypes_renorm", warp_rows(k, threads), &args) }
}

// ---------------------------------------------------------------- column sums

/// `sum_partials2`: `(Σ_g part[0][g][c], Σ_g part[1][g][c])` over `part [2, g, c]`, summed in
/// row-group order (deterministic). Finishes every column reduction of this family.
pub fn sum_partials2<E: Exec>(
    ex: &E,
    part: &E::Buf<f32>,
    g: usize,
    c: usize,
    threads: u32,
) -> Result<(E::Buf<f32>, E::Buf<f32>)> {
    const OP: &str = "device::sum_partials2";
    let (gi, ci) = dims(OP, g, c, threads)?;
    check_len(OP, "part", part.len(), 2 * g * c)?;
    let out0 = ex.alloc::<f32>(c)?;
    let out1 = ex.alloc::<f32>(c)?;
    let args = [part.arg(), out0.arg(), out1.arg(), gi.into(), ci.into()];
    // SAFETY: (const float* part, float* out0, float* out1, int G, int C) as declared; part
    // holds 2·G·C floats, out0/out1 C; one thread per column.
    unsafe { ex.launch(MODULE, "sum_partials2", per_element(c, threads), &args)? };
    Ok((out0, out1))
}

/// Launch of a column reduction over `[r, c]`: grid `(ceil(c/32), g)`, block `threads`.
fn column_cfg(c: usize, g: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid: (c.div_ceil(32) as u32, g as u32, 1),
        block: (threads, 1, 1),
        shared_bytes: 0,
    }
}

// ---------------------------------------------------------------- batch norm

/// Per-channel sums of a batch-norm input: what SyncBatchNorm all-reduces before
/// [`bn_finalize`].
pub struct BnSums<E: Exec> {
    /// `Σx` per channel, `[C]`.
    pub sum: E::Buf<f32>,
    /// `Σx²` per channel, `[C]`.
    pub sumsq: E::Buf<f32>,
}

/// `bn_stats_partial`: per-channel `(Σx, Σx²)` of `x [r, c]` over row groups of `rpb` rows,
/// as `part [2, ceil(r/rpb), c]` (reduce with [`sum_partials2`]; [`bn_stats`] does both).
pub fn bn_stats_partial<E: Exec>(
    ex: &E,
    x: &E::Buf<bf16>,
    r: usize,
    c: usize,
    rpb: usize,
    threads: u32,
) -> Result<E::Buf<f32>> {
    const OP: &str = "device::bn_stats_partial";
    let (ri, ci) = dims(OP, r, c, threads)?;
    check_len(OP, "x", x.len(), r * c)?;
    let (g, rpbi) = row_groups(OP, r, rpb)?;
    let part = ex.alloc::<f32>(2 * g * c)?;
    let args = [x.arg(), part.arg(), ri.into(), ci.into(), rpbi.into()];
    // SAFETY: (const bf16* x, float* part, int R, int C, int rpb) as declared; x holds R·C
    // elements, part 2·G·C with G = ceil(R/rpb) = grid.y; no dynamic shared memory.
    unsafe { ex.launch(MODULE, "bn_stats_partial", column_cfg(c, g, threads), &args)? };
    Ok(part)
}

/// `bn_stats_partial` + `sum_partials2`: per-channel `(Σx, Σx²)` of `x [r, c]` (NHWC viewed
/// as rows × channels), deterministic, `rpb` rows per block ([`BN_ROWS_PER_BLOCK`]).
pub fn bn_stats<E: Exec>(
    ex: &E,
    x: &E::Buf<bf16>,
    r: usize,
    c: usize,
    rpb: usize,
    threads: u32,
) -> Result<BnSums<E>> {
    let part = bn_stats_partial(ex, x, r, c, rpb, threads)?;
    let (sum, sumsq) = sum_partials2(ex, &part, r.div_ceil(rpb), c, threads)?;
    Ok(BnSums { sum, sumsq })
}

/// The statistics batch norm normalises with.
pub struct BnStats<E: Exec> {
    /// Per-channel mean, `[C]`.
    pub mean: E::Buf<f32>,
    /// Per-channel `1/√(var + eps)` (biased variance), `[C]`.
    pub invstd: E::Buf<f32>,
}

/// `bn_finalize`: `(mean, invstd)` from (all-reduced) sums over `count` values per channel, in
/// double; updates the running statistics in place as PyTorch does (momentum, unbiased
/// variance).
#[allow(clippy::too_many_arguments)]
pub fn bn_finalize<E: Exec>(
    ex: &E,
    sum: &E::Buf<f32>,
    sumsq: &E::Buf<f32>,
    count: usize,
    eps: f32,
    momentum: f32,
    running_mean: &mut E::Buf<f32>,
    running_var: &mut E::Buf<f32>,
    threads: u32,
) -> Result<BnStats<E>> {
    const OP: &str = "device::bn_finalize";
    let c = sum.len();
    let (_, ci) = dims(OP, 1, c, threads)?;
    check_len(OP, "sumsq", sumsq.len(), c)?;
    check_len(OP, "running_mean", running_mean.len(), c)?;
    check_len(OP, "running_var", running_var.len(), c)?;
    if count < 2 {
        return Err(Error::invalid(
            OP,
            format!("expected more than 1 value per channel when training, got {count}"),
        ));
    }
    if !(eps >= 0.0 && eps.is_finite()) {
        return Err(Error::invalid(
            OP,
            format!("eps {eps} must be finite and >= 0"),
        ));
    }
    if !(0.0..=1.0).contains(&momentum) {
        return Err(Error::invalid(
            OP,
            format!("momentum {momentum} must be in [0, 1]"),
        ));
    }
    let mean = ex.alloc::<f32>(c)?;
    let invstd = ex.alloc::<f32>(c)?;
    let args = [
        sum.arg(),
        sumsq.arg(),
        ci.into(),
        (count as f32).into(),
        eps.into(),
        momentum.into(),
        running_mean.arg(),
        running_var.arg(),
        mean.arg(),
        invstd.arg(),
    ];
    // SAFETY: (const float* sum, const float* sumsq, int C, float count, float eps, float
    // momentum, float* running_mean, float* running_var, float* mean, float* invstd) as
    // declared; every buffer holds C floats; one thread per channel.
    unsafe { ex.launch(MODULE, "bn_finalize", per_element(c, threads), &args)? };
    Ok(BnStats { mean, invstd })
}

/// Per-channel vectors of batch norm (all `[C]` fp32): the statistics and the affine
/// parameters, passed together because the apply and backward kernels read them together.
pub struct BnChannels<'a, E: Exec> {
    /// Mean used to normalise.
    pub mean: &'a E::Buf<f32>,
    /// `1/√(var + eps)` used to normalise.
    pub invstd: &'a E::Buf<f32>,
    /// Scale γ.
    pub gamma: &'a E::Buf<f32>,
    /// Shift β.
    pub beta: &'a E::Buf<f32>,
}

impl<E: Exec> Clone for BnChannels<'_, E> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<E: Exec> Copy for BnChannels<'_, E> {}

impl<E: Exec> BnChannels<'_, E> {
    fn check(&self, op: &'static str, c: usize) -> Result<()> {
        check_len(op, "mean", self.mean.len(), c)?;
        check_len(op, "invstd", self.invstd.len(), c)?;
        check_len(op, "gamma", self.gamma.len(), c)?;
        check_len(op, "beta", self.beta.len(), c)
    }
}

/// `bn_apply`: `y = relu?(x·scale + shift + residual?)` over `x [r, c]` with `scale = γ·invstd`,
/// `shift = β − mean·scale`: the whole batch-norm output (and a bottleneck block's residual add
/// and ReLU) in one read of x (and the residual) and one write of y.
#[allow(clippy::too_many_arguments)]
pub fn bn_apply<E: Exec>(
    ex: &E,
    x: &E::Buf<bf16>,
    residual: Option<&E::Buf<bf16>>,
    ch: BnChannels<'_, E>,
    r: usize,
    c: usize,
    relu: bool,
    threads: u32,
) -> Result<E::Buf<bf16>> {
    const OP: &str = "device::bn_apply";
    let (ri, ci) = dims(OP, r, c, threads)?;
    check_len(OP, "x", x.len(), r * c)?;
    if let Some(res) = residual {
        check_len(OP, "residual", res.len(), r * c)?;
    }
    ch.check(OP, c)?;
    let y = ex.alloc::<bf16>(r * c)?;
    let args = [
        x.arg(),
        opt_arg(residual),
        ch.mean.arg(),
        ch.invstd.arg(),
        ch.gamma.arg(),
        ch.beta.arg(),
        y.arg(),
        ri.into(),
        ci.into(),
        (relu as i32).into(),
    ];
    // SAFETY: (const bf16* x, const bf16* residual or null, const float* mean, invstd, gamma,
    // beta, bf16* y, int R, int C, int relu) as declared; x, residual, y hold R·C elements, the
    // channel vectors C; grid-stride loop over R·C.
    unsafe { ex.launch(MODULE, "bn_apply", per_element(r * c, threads), &args)? };
    Ok(y)
}

/// Per-channel sums of the batch-norm backward (`dy'` = dy masked by a fused ReLU): what
/// SyncBatchNorm all-reduces before [`bn_backward_apply`].
pub struct BnGradSums<E: Exec> {
    /// `Σdy'` per channel, `[C]` (= dβ).
    pub sum_dy: E::Buf<f32>,
    /// `Σdy'·(x − mean)` per channel, `[C]` (= dγ / invstd).
    pub sum_dy_xmu: E::Buf<f32>,
}

/// `bn_backward_partial`: per-channel `(Σdy', Σdy'·(x − mean))` over row groups of `rpb` rows,
/// as `part [2, ceil(r/rpb), c]`; `y` is the forward output when it fused a ReLU (mask
/// `y > 0`, which also covers the residual case), else `None`.
#[allow(clippy::too_many_arguments)]
pub fn bn_backward_partial<E: Exec>(
    ex: &E,
    dy: &E::Buf<bf16>,
    x: &E::Buf<bf16>,
    y: Option<&E::Buf<bf16>>,
    mean: &E::Buf<f32>,
    r: usize,
    c: usize,
    rpb: usize,
    threads: u32,
) -> Result<E::Buf<f32>> {
    const OP: &str = "device::bn_backward_partial";
    let (ri, ci) = dims(OP, r, c, threads)?;
    check_len(OP, "dy", dy.len(), r * c)?;
    check_len(OP, "x", x.len(), r * c)?;
    if let Some(y) = y {
        check_len(OP, "y", y.len(), r * c)?;
    }
    check_len(OP, "mean", mean.len(), c)?;
    let (g, rpbi) = row_groups(OP, r, rpb)?;
    let part = ex.alloc::<f32>(2 * g * c)?;
    let args = [
        dy.arg(),
        x.arg(),
        opt_arg(y),
        mean.arg(),
        part.arg(),
        ri.into(),
        ci.into(),
        rpbi.into(),
    ];
    // SAFETY: (const bf16* dy, const bf16* x, const bf16* y or null, const float* mean, float*
    // part, int R, int C, int rpb) as declared; dy, x, y hold R·C elements, mean C, part 2·G·C
    // with G = grid.y.
    unsafe {
        ex.launch(
            MODULE,
            "bn_backward_partial",
            column_cfg(c, g, threads),
            &args,
        )?
    };
    Ok(part)
}

/// `bn_backward_partial` + `sum_partials2`: per-channel `(Σdy', Σdy'·(x − mean))`, dy' = dy
/// masked by `y > 0` when the forward output `y` of a fused ReLU is given.
#[allow(clippy::too_many_arguments)]
pub fn bn_backward_reduce<E: Exec>(
    ex: &E,
    dy: &E::Buf<bf16>,
    x: &E::Buf<bf16>,
    y: Option<&E::Buf<bf16>>,
    mean: &E::Buf<f32>,
    r: usize,
    c: usize,
    rpb: usize,
    threads: u32,
) -> Result<BnGradSums<E>> {
    let part = bn_backward_partial(ex, dy, x, y, mean, r, c, rpb, threads)?;
    let (sum_dy, sum_dy_xmu) = sum_partials2(ex, &part, r.div_ceil(rpb), c, threads)?;
    Ok(BnGradSums { sum_dy, sum_dy_xmu })
}

/// Gradients of batch norm's affine parameters.
pub struct BnParamGrads<E: Exec> {
    /// dγ, `[C]`.
    pub dgamma: E::Buf<f32>,
    /// dβ, `[C]`.
    pub dbeta: E::Buf<f32>,
}

/// `bn_param_grads`: `dγ = invstd·Σdy'(x − mean)`, `dβ = Σdy'` from this process's LOCAL sums
/// (before the all-reduce: the gradient all-reduce sums them later).
pub fn bn_param_grads<E: Exec>(
    ex: &E,
    sum_dy: &E::Buf<f32>,
    sum_dy_xmu: &E::Buf<f32>,
    invstd: &E::Buf<f32>,
    threads: u32,
) -> Result<BnParamGrads<E>> {
    const OP: &str = "device::bn_param_grads";
    let c = sum_dy.len();
    let (_, ci) = dims(OP, 1, c, threads)?;
    check_len(OP, "sum_dy_xmu", sum_dy_xmu.len(), c)?;
    check_len(OP, "invstd", invstd.len(), c)?;
    let dgamma = ex.alloc::<f32>(c)?;
    let dbeta = ex.alloc::<f32>(c)?;
    let args = [
        sum_dy.arg(),
        sum_dy_xmu.arg(),
        invstd.arg(),
        dgamma.arg(),
        dbeta.arg(),
        ci.into(),
    ];
    // SAFETY: (const float* sum_dy, const float* sum_dy_xmu, const float* invstd, float*
    // dgamma, float* dbeta, int C) as declared; all hold C floats; one thread per channel.
    unsafe { ex.launch(MODULE, "bn_param_grads", per_element(c, threads), &args)? };
    Ok(BnParamGrads { dgamma, dbeta })
}

/// Outputs of [`bn_backward_apply`].
pub struct BnBackward<E: Exec> {
    /// dx, `[R, C]` bf16.
    pub dx: E::Buf<bf16>,
    /// The residual's gradient dy' (when asked for), `[R, C]` bf16.
    pub dres: Option<E::Buf<bf16>>,
}

/// `bn_backward_apply`: dx (and, with `want_dres`, the residual branch's gradient dy') from the
/// (all-reduced) sums over `count` values; `training = false` treats the statistics as
/// constants (`dx = γ·invstd·dy'`, the sums unused). `y` as in [`bn_backward_reduce`].
#[allow(clippy::too_many_arguments)]
pub fn bn_backward_apply<E: Exec>(
    ex: &E,
    dy: &E::Buf<bf16>,
    x: &E::Buf<bf16>,
    y: Option<&E::Buf<bf16>>,
    ch: BnChannels<'_, E>,
    sums: (&E::Buf<f32>, &E::Buf<f32>),
    count: usize,
    r: usize,
    c: usize,
    training: bool,
    want_dres: bool,
    threads: u32,
) -> Result<BnBackward<E>> {
    const OP: &str = "device::bn_backward_apply";
    let (ri, ci) = dims(OP, r, c, threads)?;
    check_len(OP, "dy", dy.len(), r * c)?;
    check_len(OP, "x", x.len(), r * c)?;
    if let Some(y) = y {
        check_len(OP, "y", y.len(), r * c)?;
    }
    ch.check(OP, c)?;
    check_len(OP, "sum_dy", sums.0.len(), c)?;
    check_len(OP, "sum_dy_xmu", sums.1.len(), c)?;
    if training && count == 0 {
        return Err(Error::invalid(OP, "the sums cover 0 values"));
    }
    let dx = ex.alloc::<bf16>(r * c)?;
    let dres = if want_dres {
        Some(ex.alloc::<bf16>(r * c)?)
    } else {
        None
    };
    let args = [
        dy.arg(),
        x.arg(),
        opt_arg(y),
        ch.mean.arg(),
        ch.invstd.arg(),
        ch.gamma.arg(),
        sums.0.arg(),
        sums.1.arg(),
        (count as f32).into(),
        dx.arg(),
        opt_arg(dres.as_ref()),
        ri.into(),
        ci.into(),
        (training as i32).into(),
    ];
    // SAFETY: (const bf16* dy, x, y or null, const float* mean, invstd, gamma, sum_dy,
    // sum_dy_xmu, float count, bf16* dx, bf16* dres or null, int R, int C, int training) as
    // declared; the [R, C] buffers hold R·C elements, the channel vectors C; grid-stride loop.
    unsafe {
        ex.launch(
            MODULE,
            "bn_backward_apply",
            per_element(r * c, threads),
            &args,
        )?
    };
    Ok(BnBackward { dx, dres })
}

// ---------------------------------------------------------------- layer norm

/// Outputs of [`layernorm_forward`].
pub struct LayerNormOut<E: Exec> {
    /// Normalised rows `[R, D]`, bf16.
    pub y: E::Buf<bf16>,
    /// Per-row mean `[R]` (saved for the backward).
    pub mean: E::Buf<f32>,
    /// Per-row `1/√(var + eps)` `[R]` (saved for the backward).
    pub rstd: E::Buf<f32>,
}

/// `layernorm_forward`: `y = (x − mean)·rstd·γ + β` over the last dimension of `x [r, d]`,
/// one warp per row (two passes over the L1-resident row: no cancellation).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward<E: Exec>(
    ex: &E,
    x: &E::Buf<bf16>,
    gamma: &E::Buf<f32>,
    beta: &E::Buf<f32>,
    r: usize,
    d: usize,
    eps: f32,
    threads: u32,
) -> Result<LayerNormOut<E>> {
    const OP: &str = "device::layernorm_forward";
    let (ri, di) = dims(OP, r, d, threads)?;
    check_len(OP, "x", x.len(), r * d)?;
    check_len(OP, "gamma", gamma.len(), d)?;
    check_len(OP, "beta", beta.len(), d)?;
    if !(eps >= 0.0 && eps.is_finite()) {
        return Err(Error::invalid(
            OP,
            format!("eps {eps} must be finite and >= 0"),
        ));
    }
    let y = ex.alloc::<bf16>(r * d)?;
    let mean = ex.alloc::<f32>(r)?;
    let rstd = ex.alloc::<f32>(r)?;
    let args = [
        x.arg(),
        gamma.arg(),
        beta.arg(),
        y.arg(),
        mean.arg(),
        rstd.arg(),
        ri.into(),
        di.into(),
        eps.into(),
    ];
    // SAFETY: (const bf16* x, const float* gamma, const float* beta, bf16* y, float* mean,
    // float* rstd, int R, int D, float eps) as declared; x, y hold R·D elements, gamma/beta D,
    // mean/rstd R; one warp per row.
    unsafe { ex.launch(MODULE, "layernorm_forward", warp_rows(r, threads), &args)? };
    Ok(LayerNormOut { y, mean, rstd })
}

/// Outputs of [`layernorm_backward`].
pub struct LayerNormGrads<E: Exec> {
    /// dx, `[R, D]` bf16.
    pub dx: E::Buf<bf16>,
    /// dγ, `[D]` fp32.
    pub dgamma: E::Buf<f32>,
    /// dβ, `[D]` fp32.
    pub dbeta: E::Buf<f32>,
}

/// The kernel `layernorm_backward` alone: `(dx, part [2, ceil(r/rpb), d])` where the partials
/// are per-block `(Σdy·x̂, Σdy)` (reduce with [`sum_partials2`]; [`layernorm_backward`] does
/// both).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward_partial<E: Exec>(
    ex: &E,
    dy: &E::Buf<bf16>,
    x: &E::Buf<bf16>,
    gamma: &E::Buf<f32>,
    mean: &E::Buf<f32>,
    rstd: &E::Buf<f32>,
    r: usize,
    d: usize,
    rpb: usize,
    threads: u32,
) -> Result<(E::Buf<bf16>, E::Buf<f32>)> {
    const OP: &str = "device::layernorm_backward";
    let (ri, di) = dims(OP, r, d, threads)?;
    check_len(OP, "dy", dy.len(), r * d)?;
    check_len(OP, "x", x.len(), r * d)?;
    check_len(OP, "gamma", gamma.len(), d)?;
    check_len(OP, "mean", mean.len(), r)?;
    check_len(OP, "rstd", rstd.len(), r)?;
    let (g, rpbi) = row_groups(OP, r, rpb)?;
    let shared = 2 * (threads as usize / 32) * d * std::mem::size_of::<f32>();
    if shared > MAX_DYN_SHARED {
        return Err(Error::invalid(
            OP,
            format!("width {d} at {threads} threads needs {shared} bytes of shared memory (at most {MAX_DYN_SHARED}): use fewer threads per block"),
        ));
    }
    let dx = ex.alloc::<bf16>(r * d)?;
    let part = ex.alloc::<f32>(2 * g * d)?;
    let args = [
        dy.arg(),
        x.arg(),
        gamma.arg(),
        mean.arg(),
        rstd.arg(),
        dx.arg(),
        part.arg(),
        ri.into(),
        di.into(),
        rpbi.into(),
    ];
    // SAFETY: (const bf16* dy, const bf16* x, const float* gamma, const float* mean, const
    // float* rstd, bf16* dx, float* part, int R, int D, int rpb) as declared; dy, x, dx hold
    // R·D elements, gamma D, mean/rstd R, part 2·G·D with G = grid; dynamic shared memory
    // 2·(T/32)·D floats as the kernel's accumulators need.
    unsafe {
        ex.launch(
            MODULE,
            "layernorm_backward",
            LaunchConfig::linear(g as u32, threads, shared),
            &args,
        )?
    };
    Ok((dx, part))
}

/// `layernorm_backward` + `sum_partials2`: dx, dγ, dβ of the layer norm, `rpb` rows per block
/// ([`LN_ROWS_PER_BLOCK`]), deterministic.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward<E: Exec>(
    ex: &E,
    dy: &E::Buf<bf16>,
    x: &E::Buf<bf16>,
    gamma: &E::Buf<f32>,
    mean: &E::Buf<f32>,
    rstd: &E::Buf<f32>,
    r: usize,
    d: usize,
    rpb: usize,
    threads: u32,
) -> Result<LayerNormGrads<E>> {
    let (dx, part) = layernorm_backward_partial(ex, dy, x, gamma, mean, rstd, r, d, rpb, threads)?;
    let (dgamma, dbeta) = sum_partials2(ex, &part, r.div_ceil(rpb), d, threads)?;
    Ok(LayerNormGrads { dx, dgamma, dbeta })
}

// ---------------------------------------------------------------- device check

/// The row note of a memory-bound op.
const AIM: &str = "aim: >= 70% of copy bandwidth";

/// The largest of several relative errors, each scaled from its own tolerance to `tol`, so
/// that one number against one tolerance decides a row with outputs of mixed precision; NaN
/// wins (and fails the row).
fn scaled_max(tol: f64, errs: &[(f64, f64)]) -> f64 {
    errs.iter().fold(0.0f64, |m, &(e, t)| {
        let s = e * tol / t;
        if s.is_nan() || m.is_nan() {
            f64::NAN
        } else {
            m.max(s)
        }
    })
}

/// f64 sums as the f32 the kernels take.
fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// The device check's rows of this family (group `norm`): each op against its CPU reference on
/// the same (bf16-rounded) values, timed, with its PyTorch counterpart's spec.
pub fn check_rows<E: Exec>(c: &mut Checker<'_, E>) {
    l2_rows(c);
    bn_rows(c);
    ln_rows(c);
}

/// Suave's L2 normalisation of the projections (`[4096, 128]`) and its prototype
/// renormalisation (`[3000, 128]`).
fn l2_rows<E: Exec>(c: &mut Checker<'_, E>) {
    let (r, d) = if c.opts.quick {
        (512, 128)
    } else {
        (4096, 128)
    };
    let spec = |dir: &str| json!({"kind": "l2norm", "dir": dir, "rows": r, "d": d});
    c.row(
        "norm",
        "l2norm_fwd",
        format!("R{r} D{d}"),
        spec("fwd"),
        |c| {
            let x = round_bf16(&random("l2.x", r * d));
            let (want, ctx) = cpu::l2_normalize_forward(&Tensor::from_vec(x.clone(), &[r, d])?)?;
            let xd = c.dev.upload_bf16(&x)?;
            let out = l2norm_forward(c.dev, &xd, r, d, THREADS)?;
            let e = scaled_max(
                TOL_BF16,
                &[
                    (rel_l2(&c.dev.download_bf16(&out.y)?, want.data()), TOL_BF16),
                    (rel_l2(&c.dev.download(&out.norm)?, &ctx.norm), TOL_F32),
                ],
            );
            let t = c.time(|| l2norm_forward(c.dev, &xd, r, d, THREADS).map(drop))?;
            Ok(Measured {
                err: Some((e, TOL_BF16)),
                time: Some(t),
                bytes: (4 * r * d + 4 * r) as f64,
                note: format!("err = max(y, norm scaled); {AIM}"),
                ..Default::default()
            })
        },
    );
    c.row(
        "norm",
        "l2norm_bwd",
        format!("R{r} D{d}"),
        spec("bwd"),
        |c| {
            let x = round_bf16(&random("l2.x", r * d));
            let dy = round_bf16(&random("l2.dy", r * d));
            let xt = Tensor::from_vec(x.clone(), &[r, d])?;
            let (_, ctx) = cpu::l2_normalize_forward(&xt)?;
            let want =
                cpu::l2_normalize_backward(&Tensor::from_vec(dy.clone(), &[r, d])?, &xt, &ctx)?;
            let (xd, dyd, nd) = (
                c.dev.upload_bf16(&x)?,
                c.dev.upload_bf16(&dy)?,
                c.dev.upload(&ctx.norm)?,
            );
            let dx = l2norm_backward(c.dev, &dyd, &xd, &nd, r, d, THREADS)?;
            let e = rel_l2(&c.dev.download_bf16(&dx)?, want.data());
            let t = c.time(|| l2norm_backward(c.dev, &dyd, &xd, &nd, r, d, THREADS).map(drop))?;
            Ok(Measured {
                err: Some((e, TOL_BF16)),
                time: Some(t),
                bytes: (6 * r * d + 4 * r) as f64,
                note: AIM.into(),
                ..Default::default()
            })
        },
    );
    let (k, d) = if c.opts.quick {
        (300, 128)
    } else {
        (3000, 128)
    };
    c.row(
        "norm",
        "protos_renorm",
        format!("K{k} D{d} +bf16 copy"),
        json!({"kind": "protos_renorm", "k": k, "d": d}),
        |c| {
            let w: Vec<f32> = random("pr.w", k * d).iter().map(|v| 0.3 * v).collect();
            let (want, _) = cpu::l2_normalize_forward(&Tensor::from_vec(w.clone(), &[k, d])?)?;
            let mut wd = c.dev.upload(&w)?;
            let mut wb = c.dev.alloc::<bf16>(k * d)?;
            prototypes_renorm(c.dev, &mut wd, Some(&mut wb), k, d, THREADS)?;
            let e = scaled_max(
                TOL_BF16,
                &[
                    (rel_l2(&c.dev.download(&wd)?, want.data()), TOL_F32),
                    (rel_l2(&c.dev.download_bf16(&wb)?, want.data()), TOL_BF16),
                ],
            );
            // In place: later runs renormalise unit rows, the same work.
            let t = c.time(|| prototypes_renorm(c.dev, &mut wd, Some(&mut wb), k, d, THREADS))?;
            Ok(Measured {
                err: Some((e, TOL_BF16)),
                time: Some(t),
                bytes: (10 * k * d) as f64,
                note: format!("err = max(bf16 copy, fp32 w scaled); {AIM}"),
                ..Default::default()
            })
        },
    );
}

/// One batch-norm case and everything its rows compare against, computed once on the CPU (at
/// ResNet-50's layer1 shape it is 51 M values per tensor).
struct BnCase {
    x: Vec<f32>,
    res: Vec<f32>,
    dy: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    partials: cpu::BatchNormPartials,
    stats: cpu::BatchNormStats<f32>,
    running: (Vec<f32>, Vec<f32>),
    running_after: (Vec<f32>, Vec<f32>),
    /// relu(bn(x)).
    y_relu: Vec<f32>,
    /// relu(bn(x) + res): the bottleneck block's output.
    z: Vec<f32>,
    /// The gradient into the BN: dy masked by z > 0.
    dy_bn: Vec<f32>,
    ctx: cpu::BatchNormCtx<f32>,
    grad_partials: cpu::BatchNormGradPartials,
    dx: Vec<f32>,
    dgamma: Vec<f32>,
    dbeta: Vec<f32>,
}

fn bn_case(r: usize, c: usize) -> Result<BnCase> {
    let x = round_bf16(
        &random("bn.x", r * c)
            .iter()
            .map(|v| 0.5 + 1.5 * v)
            .collect::<Vec<_>>(),
    );
    let res = round_bf16(&random("bn.res", r * c));
    let dy = round_bf16(&random("bn.dy", r * c));
    let gamma: Vec<f32> = random("bn.g", c).iter().map(|v| 1.0 + 0.5 * v).collect();
    let beta: Vec<f32> = random("bn.b", c).iter().map(|v| 0.5 * v).collect();
    let running: (Vec<f32>, Vec<f32>) = (
        random("bn.rm", c).iter().map(|v| 0.1 * v).collect(),
        random("bn.rv", c).iter().map(|v| 1.0 + 0.5 * v).collect(),
    );
    let xt = Tensor::from_vec(x.clone(), &[r, c])?;
    let (gt, bt) = (
        Tensor::from_vec(gamma.clone(), &[c])?,
        Tensor::from_vec(beta.clone(), &[c])?,
    );
    let partials = cpu::batch_norm_stats(&xt)?;
    let (mut rm, mut rv) = (
        Tensor::from_vec(running.0.clone(), &[c])?,
        Tensor::from_vec(running.1.clone(), &[c])?,
    );
    let params = cpu::BatchNormParams::default();
    let stats = cpu::batch_norm_finalize(&partials, &mut rm, &mut rv, params)?;
    let relu = cpu::BatchNormParams {
        relu: true,
        ..params
    };
    let (y_relu, _) = cpu::batch_norm_apply(&xt, &gt, &bt, stats.clone(), relu)?;
    let (bn, ctx) = cpu::batch_norm_apply(&xt, &gt, &bt, stats.clone(), params)?;
    let z = relu_forward(&add_forward(&bn, &Tensor::from_vec(res.clone(), &[r, c])?)?)?;
    drop(bn);
    let dy_bn = relu_backward(&Tensor::from_vec(dy.clone(), &[r, c])?, &z)?;
    let grad_partials = cpu::batch_norm_backward_reduce(&dy_bn, &xt, &ctx)?;
    let dx = cpu::batch_norm_backward_apply(&dy_bn, &xt, &ctx, &grad_partials)?;
    let (dg, db) = cpu::batch_norm_param_grads(&grad_partials, &ctx)?;
    Ok(BnCase {
        x,
        res,
        dy,
        gamma,
        beta,
        partials,
        stats,
        running,
        running_after: (rm.data().to_vec(), rv.data().to_vec()),
        y_relu: y_relu.data().to_vec(),
        z: z.data().to_vec(),
        dy_bn: dy_bn.data().to_vec(),
        ctx,
        grad_partials,
        dx: dx.data().to_vec(),
        dgamma: dg.data().to_vec(),
        dbeta: db.data().to_vec(),
    })
}

/// The per-channel vectors of a case on the device.
struct BnChannelBufs<E: Exec> {
    mean: E::Buf<f32>,
    invstd: E::Buf<f32>,
    gamma: E::Buf<f32>,
    beta: E::Buf<f32>,
}

impl<E: Exec> BnChannelBufs<E> {
    fn upload(ex: &E, k: &BnCase) -> Result<Self> {
        Ok(BnChannelBufs {
            mean: ex.upload(&k.stats.mean)?,
            invstd: ex.upload(&k.stats.invstd)?,
            gamma: ex.upload(&k.gamma)?,
            beta: ex.upload(&k.beta)?,
        })
    }
    fn view(&self) -> BnChannels<'_, E> {
        BnChannels {
            mean: &self.mean,
            invstd: &self.invstd,
            gamma: &self.gamma,
            beta: &self.beta,
        }
    }
}

/// ResNet-50's layer1 batch norm (64 images of 56×56, 256 channels: the widest activation of
/// the network), forward and backward, split as SyncBatchNorm runs it.
fn bn_rows<E: Exec>(c: &mut Checker<'_, E>) {
    let (n, h, w, ch) = if c.opts.quick {
        (2, 28, 28, 256)
    } else {
        (64, 56, 56, 256)
    };
    let r = n * h * w;
    let rc = (r * ch) as f64;
    let cf = ch as f64;
    let shape = format!("R{r} (N{n} {h}x{w}) C{ch}");
    let spec = |kind: &str| json!({"kind": kind, "n": n, "h": h, "w": w, "c": ch});
    let cell: OnceCell<std::result::Result<BnCase, String>> = OnceCell::new();
    let case = || -> Result<&BnCase> {
        cell.get_or_init(|| bn_case(r, ch).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| Error::invalid("device-check", format!("batch-norm reference: {e}")))
    };
    let rpb = BN_ROWS_PER_BLOCK;

    c.row("norm", "bn_stats", shape.clone(), spec("bn_stats"), |c| {
        let k = case()?;
        let xd = c.dev.upload_bf16(&k.x)?;
        let s = bn_stats(c.dev, &xd, r, ch, rpb, THREADS)?;
        let e = rel_l2(&c.dev.download(&s.sum)?, &f32s(&k.partials.sum))
            .max(rel_l2(&c.dev.download(&s.sumsq)?, &f32s(&k.partials.sumsq)));
        let t = c.time(|| bn_stats(c.dev, &xd, r, ch, rpb, THREADS).map(drop))?;
        Ok(Measured {
            err: Some((e, TOL_F32)),
            time: Some(t),
            bytes: 2.0 * rc + 8.0 * cf,
            note: format!("{rpb} rows/block; {AIM}"),
            ..Default::default()
        })
    });
    c.row(
        "norm",
        "bn_finalize",
        format!("C{ch} count {r}"),
        json!({"kind": "bn_finalize", "c": ch, "count": r}),
        |c| {
            let k = case()?;
            let (sd, qd) = (
                c.dev.upload(&f32s(&k.partials.sum))?,
                c.dev.upload(&f32s(&k.partials.sumsq))?,
            );
            let mut rm = c.dev.upload(&k.running.0)?;
            let mut rv = c.dev.upload(&k.running.1)?;
            let st = bn_finalize(c.dev, &sd, &qd, r, 1e-5, 0.1, &mut rm, &mut rv, THREADS)?;
            let e = [
                rel_l2(&c.dev.download(&st.mean)?, &k.stats.mean),
                rel_l2(&c.dev.download(&st.invstd)?, &k.stats.invstd),
                rel_l2(&c.dev.download(&rm)?, &k.running_after.0),
                rel_l2(&c.dev.download(&rv)?, &k.running_after.1),
            ]
            .into_iter()
            .fold(0.0f64, |m, e| if e.is_nan() { e } else { m.max(e) });
            let t = c.time(|| {
                bn_finalize(c.dev, &sd, &qd, r, 1e-5, 0.1, &mut rm, &mut rv, THREADS).map(drop)
            })?;
            Ok(Measured {
                err: Some((e, TOL_F32)),
                time: Some(t),
                bytes: 32.0 * cf,
                note: "launch-bound (C values); err = max(mean, invstd, running stats)".into(),
                ..Default::default()
            })
        },
    );
    for residual in [false, true] {
        let id = if residual {
            "bn_apply_relu_res"
        } else {
            "bn_apply_relu"
        };
        let mut torch = spec("bn_apply");
        torch["relu"] = json!(true);
        torch["residual"] = json!(residual);
        c.row("norm", id, shape.clone(), torch, |c| {
            let k = case()?;
            let xd = c.dev.upload_bf16(&k.x)?;
            let resd = if residual {
                Some(c.dev.upload_bf16(&k.res)?)
            } else {
                None
            };
            let cb = BnChannelBufs::upload(c.dev, k)?;
            let y = bn_apply(c.dev, &xd, resd.as_ref(), cb.view(), r, ch, true, THREADS)?;
            let want = if residual { &k.z } else { &k.y_relu };
            let e = rel_l2(&c.dev.download_bf16(&y)?, want);
            let t = c.time(|| {
                bn_apply(c.dev, &xd, resd.as_ref(), cb.view(), r, ch, true, THREADS).map(drop)
            })?;
            Ok(Measured {
                err: Some((e, TOL_BF16)),
                time: Some(t),
                bytes: if residual { 6.0 } else { 4.0 } * rc + 16.0 * cf,
                note: AIM.into(),
                ..Default::default()
            })
        });
    }
    c.row(
        "norm",
        "bn_bwd_reduce",
        shape.clone(),
        spec("bn_bwd_reduce"),
        |c| {
            let k = case()?;
            let (dyd, xd, yd) = (
                c.dev.upload_bf16(&k.dy)?,
                c.dev.upload_bf16(&k.x)?,
                c.dev.upload_bf16(&k.z)?,
            );
            let md = c.dev.upload(&k.stats.mean)?;
            let s = bn_backward_reduce(c.dev, &dyd, &xd, Some(&yd), &md, r, ch, rpb, THREADS)?;
            let e =
                rel_l2(&c.dev.download(&s.sum_dy)?, &f32s(&k.grad_partials.sum_dy)).max(rel_l2(
                    &c.dev.download(&s.sum_dy_xmu)?,
                    &f32s(&k.grad_partials.sum_dy_xmu),
                ));
            let t = c.time(|| {
                bn_backward_reduce(c.dev, &dyd, &xd, Some(&yd), &md, r, ch, rpb, THREADS).map(drop)
            })?;
            Ok(Measured {
                err: Some((e, TOL_F32)),
                time: Some(t),
                bytes: 6.0 * rc + 12.0 * cf,
                note: format!("ReLU mask from y; {rpb} rows/block; {AIM}"),
                ..Default::default()
            })
        },
    );
    c.row(
        "norm",
        "bn_param_grads",
        format!("C{ch}"),
        Value::Null,
        |c| {
            let k = case()?;
            let (sd, sx, id) = (
                c.dev.upload(&f32s(&k.grad_partials.sum_dy))?,
                c.dev.upload(&f32s(&k.grad_partials.sum_dy_xmu))?,
                c.dev.upload(&k.ctx.invstd)?,
            );
            let g = bn_param_grads(c.dev, &sd, &sx, &id, THREADS)?;
            let e = rel_l2(&c.dev.download(&g.dgamma)?, &k.dgamma)
                .max(rel_l2(&c.dev.download(&g.dbeta)?, &k.dbeta));
            let t = c.time(|| bn_param_grads(c.dev, &sd, &sx, &id, THREADS).map(drop))?;
            Ok(Measured {
                err: Some((e, TOL_F32)),
                time: Some(t),
                bytes: 20.0 * cf,
                note: "launch-bound (C values); PyTorch does it inside batch_norm_backward_reduce"
                    .into(),
                ..Default::default()
            })
        },
    );
    let mut torch = spec("bn_bwd_apply");
    torch["residual"] = json!(true);
    c.row("norm", "bn_bwd_apply", shape, torch, |c| {
        let k = case()?;
        let (dyd, xd, yd) = (
            c.dev.upload_bf16(&k.dy)?,
            c.dev.upload_bf16(&k.x)?,
            c.dev.upload_bf16(&k.z)?,
        );
        let cb = BnChannelBufs::upload(c.dev, k)?;
        let (sd, sx) = (
            c.dev.upload(&f32s(&k.grad_partials.sum_dy))?,
            c.dev.upload(&f32s(&k.grad_partials.sum_dy_xmu))?,
        );
        let run = || {
            bn_backward_apply(
                c.dev,
                &dyd,
                &xd,
                Some(&yd),
                cb.view(),
                (&sd, &sx),
                r,
                r,
                ch,
                true,
                true,
                THREADS,
            )
        };
        let out = run()?;
        let dres = out
            .dres
            .as_ref()
            .ok_or_else(|| Error::invalid("device-check", "bn_backward_apply gave no dres"))?;
        let e = rel_l2(&c.dev.download_bf16(&out.dx)?, &k.dx)
            .max(rel_l2(&c.dev.download_bf16(dres)?, &k.dy_bn));
        let t = c.time(|| run().map(drop))?;
        Ok(Measured {
            err: Some((e, TOL_BF16)),
            time: Some(t),
            bytes: 10.0 * rc + 20.0 * cf,
            note: format!("training, ReLU mask, d residual; err = max(dx, dres); {AIM}"),
            ..Default::default()
        })
    });
}

/// ViT-S/16's layer norm (64 images × 197 tokens, width 384), forward and backward.
fn ln_rows<E: Exec>(c: &mut Checker<'_, E>) {
    let rows = if c.opts.quick { 2 * 197 } else { 64 * 197 };
    let d = 384;
    let eps = 1e-6f32;
    let spec =
        |dir: &str| json!({"kind": "layernorm", "dir": dir, "rows": rows, "d": d, "eps": eps});
    let inputs = || -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let x = round_bf16(&random("ln.x", rows * d));
        let g: Vec<f32> = random("ln.g", d).iter().map(|v| 1.0 + 0.5 * v).collect();
        Ok((x, g, random("ln.b", d)))
    };
    let tensors = |x: &[f32], g: &[f32], b: &[f32]| -> Result<[Tensor<f32>; 3]> {
        Ok([
            Tensor::from_vec(x.to_vec(), &[rows, d])?,
            Tensor::from_vec(g.to_vec(), &[d])?,
            Tensor::from_vec(b.to_vec(), &[d])?,
        ])
    };
    c.row(
        "norm",
        "layernorm_fwd",
        format!("R{rows} D{d}"),
        spec("fwd"),
        |c| {
            let (x, g, b) = inputs()?;
            let [xt, gt, bt] = tensors(&x, &g, &b)?;
            let (want, ctx) = cpu::layer_norm_forward(&xt, &gt, &bt, eps as f64)?;
            let (xd, gd, bd) = (c.dev.upload_bf16(&x)?, c.dev.upload(&g)?, c.dev.upload(&b)?);
            let out = layernorm_forward(c.dev, &xd, &gd, &bd, rows, d, eps, THREADS)?;
            let e = scaled_max(
                TOL_BF16,
                &[
                    (rel_l2(&c.dev.download_bf16(&out.y)?, want.data()), TOL_BF16),
                    (rel_l2(&c.dev.download(&out.mean)?, &ctx.mean), TOL_F32),
                    (rel_l2(&c.dev.download(&out.rstd)?, &ctx.rstd), TOL_F32),
                ],
            );
            let t = c.time(|| {
                layernorm_forward(c.dev, &xd, &gd, &bd, rows, d, eps, THREADS).map(drop)
            })?;
            Ok(Measured {
                err: Some((e, TOL_BF16)),
                time: Some(t),
                bytes: (4 * rows * d + 8 * d + 8 * rows) as f64,
                note: format!("err = max(y, mean and rstd scaled); {AIM}"),
                ..Default::default()
            })
        },
    );
    c.row(
        "norm",
        "layernorm_bwd",
        format!("R{rows} D{d}"),
        spec("bwd"),
        |c| {
            let (x, g, b) = inputs()?;
            let dy = round_bf16(&random("ln.dy", rows * d));
            let [xt, gt, bt] = tensors(&x, &g, &b)?;
            let (_, ctx) = cpu::layer_norm_forward(&xt, &gt, &bt, eps as f64)?;
            let want = cpu::layer_norm_backward(
                &Tensor::from_vec(dy.clone(), &[rows, d])?,
                &xt,
                &gt,
                &ctx,
            )?;
            let (dyd, xd, gd) = (
                c.dev.upload_bf16(&dy)?,
                c.dev.upload_bf16(&x)?,
                c.dev.upload(&g)?,
            );
            let (md, sd) = (c.dev.upload(&ctx.mean)?, c.dev.upload(&ctx.rstd)?);
            let rpb = LN_ROWS_PER_BLOCK;
            let run = || layernorm_backward(c.dev, &dyd, &xd, &gd, &md, &sd, rows, d, rpb, THREADS);
            let out = run()?;
            let e = scaled_max(
                TOL_BF16,
                &[
                    (
                        rel_l2(&c.dev.download_bf16(&out.dx)?, want.dx.data()),
                        TOL_BF16,
                    ),
                    (
                        rel_l2(&c.dev.download(&out.dgamma)?, want.dgamma.data()),
                        TOL_F32,
                    ),
                    (
                        rel_l2(&c.dev.download(&out.dbeta)?, want.dbeta.data()),
                        TOL_F32,
                    ),
                ],
            );
            let t = c.time(|| run().map(drop))?;
            Ok(Measured {
                err: Some((e, TOL_BF16)),
                time: Some(t),
                bytes: (6 * rows * d + 12 * d + 8 * rows) as f64,
                note: format!("err = max(dx, dgamma and dbeta scaled); {rpb} rows/block; {AIM}"),
                ..Default::default()
            })
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_precision_errors_are_scaled_to_one_tolerance_and_nan_fails() {
        // An f32 output at 2e-5 (of 1e-4) counts as 2e-3 against bf16's 1e-2.
        let e = scaled_max(TOL_BF16, &[(1e-3, TOL_BF16), (2e-5, TOL_F32)]);
        assert!((e - 2e-3).abs() < 1e-12, "{e}");
        // An f32 output just over its own tolerance fails the row even when bf16 is fine.
        assert!(scaled_max(TOL_BF16, &[(1e-3, TOL_BF16), (2e-4, TOL_F32)]) > TOL_BF16);
        assert!(scaled_max(TOL_BF16, &[(f64::NAN, TOL_F32), (1e-3, TOL_BF16)]).is_nan());
        assert!(scaled_max(TOL_BF16, &[(1e-3, TOL_BF16), (f64::NAN, TOL_F32)]).is_nan());
    }
}
