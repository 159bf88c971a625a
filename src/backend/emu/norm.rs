//! CPU launches of `kernels/norm.cu` (reference: `backend::cpu::norm`): L2 normalisation,
//! prototype renormalisation, batch norm split as SyncBatchNorm needs it (partial sums, finalize,
//! apply with ReLU/residual, backward partials, parameter gradients, backward apply), and layer
//! norm. Each wrapper launches with the configuration documented in the kernel's comment.

use super::{arg, as_i32, check_len, check_threads, launch_raw, LaunchConfig, Mode};
use crate::error::{Error, Result};
use half::bf16;
use std::ffi::c_void;

const MODULE: &str = "norm";

fn launch(mode: Mode, kernel: &str, cfg: LaunchConfig, args: &mut [*mut c_void]) -> Result<()> {
    // SAFETY: every caller below builds `args` in the kernel's parameter order and types, from
    // buffers whose lengths it has checked against the launch's shape.
    unsafe { launch_raw(mode, MODULE, kernel, cfg, args) }
}

/// Checks `[rows, cols]` (both non-zero) and the block size; returns them as i32.
fn dims(op: &'static str, rows: usize, cols: usize, threads: u32) -> Result<(i32, i32)> {
    check_threads(op, threads)?;
    if rows == 0 || cols == 0 {
        return Err(Error::shape(
            op,
            format!("[{rows}, {cols}]: need rows and columns"),
        ));
    }
    as_i32(op, "rows·cols", rows * cols)?;
    Ok((as_i32(op, "rows", rows)?, as_i32(op, "columns", cols)?))
}

/// A launch with one warp per row.
fn warp_rows(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig::linear(rows.div_ceil(threads as usize / 32) as u32, threads, 0)
}

/// `l2norm_forward`: `y = x/max(‖x‖, 1e-12)` per row of `[r, d]`; returns `(y, ‖x‖ per row)`.
pub fn l2norm_forward(
    mode: Mode,
    x: &[bf16],
    r: usize,
    d: usize,
    threads: u32,
) -> Result<(Vec<bf16>, Vec<f32>)> {
    const OP: &str = "emu::l2norm_forward";
    let (ri, di) = dims(OP, r, d, threads)?;
    check_len(OP, "x", x.len(), r * d)?;
    let (mut y, mut n) = (vec![bf16::ZERO; r * d], vec![0.0f32; r]);
    let (px, py, pn) = (x.as_ptr(), y.as_mut_ptr(), n.as_mut_ptr());
    launch(
        mode,
        "l2norm_forward",
        warp_rows(r, threads),
        &mut [arg(&px), arg(&py), arg(&pn), arg(&ri), arg(&di)],
    )?;
    Ok((y, n))
}

/// `l2norm_backward`: dx from dy, x and the forward's norms.
pub fn l2norm_backward(
    mode: Mode,
    dy: &[bf16],
    x: &[bf16],
    norm: &[f32],
    r: usize,
    d: usize,
    threads: u32,
) -> Result<Vec<bf16>> {
    const OP: &str = "emu::l2norm_backward";
    let (ri, di) = dims(OP, r, d, threads)?;
    check_len(OP, "dy", dy.len(), r * d)?;
    check_len(OP, "x", x.len(), r * d)?;
    check_len(OP, "norm", norm.len(), r)?;
    let mut dx = vec![bf16::ZERO; r * d];
    let (pg, px, pn, pd) = (dy.as_ptr(), x.as_ptr(), norm.as_ptr(), dx.as_mut_ptr());
    launch(
        mode,
        "l2norm_backward",
        warp_rows(r, threads),
        &mut [arg(&pg), arg(&px), arg(&pn), arg(&pd), arg(&ri), arg(&di)],
    )?;
    Ok(dx)
}

/// `prototypes_renorm`: rows of `w [k, d]` to unit norm in place; with `want_bf16`, also the
/// bf16 copy written in the same pass.
pub fn prototypes_renorm(
    mode: Mode,
    w: &mut [f32],
    k: usize,
    d: usize,
    want_bf16: bool,
    threads: u32,
) -> Result<Option<Vec<bf16>>> {
    const OP: &str = "emu::prototypes_renorm";
    let (ki, di) = dims(OP, k, d, threads)?;
    check_len(OP, "w", w.len(), k * d)?;
    let mut wb = want_bf16.then(|| vec![bf16::ZERO; k * d]);
    let pw = w.as_mut_ptr();
    let pb = wb.as_mut().map_or(std::ptr::null_mut(), |v| v.as_mut_ptr());
    launch(
        mode,
        "prototypes_renorm",
        warp_rows(k, threads),
        &mut [arg(&pw), arg(&pb), arg(&ki), arg(&di)],
    )?;
    Ok(wb)
}

/// Runs `sum_partials2` over `part [2, g, c]`.
fn sum_partials(
    mode: Mode,
    part: &[f32],
    g: usize,
    c: usize,
    threads: u32,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (gi, ci) = (g as i32, c as i32);
    let (mut a, mut b) = (vec![0.0f32; c], vec![0.0f32; c]);
    let (pp, pa, pb) = (part.as_ptr(), a.as_mut_ptr(), b.as_mut_ptr());
    let cfg = LaunchConfig::linear(c.div_ceil(threads as usize) as u32, threads, 0);
    launch(
        mode,
        "sum_partials2",
        cfg,
        &mut [arg(&pp), arg(&pa), arg(&pb), arg(&gi), arg(&ci)],
    )?;
    Ok((a, b))
}

fn column_cfg(
    op: &'static str,
    r: usize,
    c: usize,
    rpb: usize,
    threads: u32,
) -> Result<(LaunchConfig, usize, i32)> {
    if rpb == 0 {
        return Err(Error::invalid(op, "rows per block must be > 0"));
    }
    let g = r.div_ceil(rpb);
    let cfg = LaunchConfig {
        grid: (c.div_ceil(32) as u32, g as u32, 1),
        block: (threads, 1, 1),
        shared_bytes: 0,
    };
    Ok((cfg, g, as_i32(op, "rows per block", rpb)?))
}

/// `bn_stats_partial` + `sum_partials2`: per-channel `(Σx, Σx²)` of `x [r, c]` (what
/// SyncBatchNorm all-reduces), with `rpb` rows per block.
pub fn bn_stats(
    mode: Mode,
    x: &[bf16],
    r: usize,
    c: usize,
    rpb: usize,
    threads: u32,
) -> Result<(Vec<f32>, Vec<f32>)> {
    const OP: &str = "emu::bn_stats";
    let (ri, ci) = dims(OP, r, c, threads)?;
    check_len(OP, "x", x.len(), r * c)?;
    let (cfg, g, rpbi) = column_cfg(OP, r, c, rpb, threads)?;
    let mut part = vec![f32::NAN; 2 * g * c];
    let (px, pp) = (x.as_ptr(), part.as_mut_ptr());
    launch(
        mode,
        "bn_stats_partial",
        cfg,
        &mut [arg(&px), arg(&pp), arg(&ri), arg(&ci), arg(&rpbi)],
    )?;
    sum_partials(mode, &part, g, c, threads)
}

/// `bn_finalize`: `(mean, invstd)` from sums over `count` values per channel; updates the
/// running statistics in place (momentum, unbiased variance).
#[allow(clippy::too_many_arguments)]
pub fn bn_finalize(
    mode: Mode,
    sum: &[f32],
    sumsq: &[f32],
    count: usize,
    eps: f32,
    momentum: f32,
    running_mean: &mut [f32],
    running_var: &mut [f32],
    threads: u32,
) -> Result<(Vec<f32>, Vec<f32>)> {
    const OP: &str = "emu::bn_finalize";
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
    let (mut mean, mut invstd) = (vec![0.0f32; c], vec![0.0f32; c]);
    let n = count as f32;
    let (ps, pq, prm, prv, pm, pi) = (
        sum.as_ptr(),
        sumsq.as_ptr(),
        running_mean.as_mut_ptr(),
        running_var.as_mut_ptr(),
        mean.as_mut_ptr(),
        invstd.as_mut_ptr(),
    );
    let cfg = LaunchConfig::linear(c.div_ceil(threads as usize) as u32, threads, 0);
    launch(
        mode,
        "bn_finalize",
        cfg,
        &mut [
            arg(&ps),
            arg(&pq),
            arg(&ci),
            arg(&n),
            arg(&eps),
            arg(&momentum),
            arg(&prm),
            arg(&prv),
            arg(&pm),
            arg(&pi),
        ],
    )?;
    Ok((mean, invstd))
}

/// Per-channel vectors of batch norm: mean, invstd, γ, β (all `[C]`).
#[derive(Clone, Copy, Debug)]
pub struct BnChannels<'a> {
    /// Mean used to normalise.
    pub mean: &'a [f32],
    /// `1/√(var + eps)` used to normalise.
    pub invstd: &'a [f32],
    /// Scale γ.
    pub gamma: &'a [f32],
    /// Shift β.
    pub beta: &'a [f32],
}

impl BnChannels<'_> {
    fn check(&self, op: &'static str, c: usize) -> Result<()> {
        check_len(op, "mean", self.mean.len(), c)?;
        check_len(op, "invstd", self.invstd.len(), c)?;
        check_len(op, "gamma", self.gamma.len(), c)?;
        check_len(op, "beta", self.beta.len(), c)
    }
}

/// `bn_apply`: `y = relu?(x·scale + shift + residual?)` over `[r, c]`.
#[allow(clippy::too_many_arguments)]
pub fn bn_apply(
    mode: Mode,
    x: &[bf16],
    residual: Option<&[bf16]>,
    ch: BnChannels<'_>,
    r: usize,
    c: usize,
    relu: bool,
    threads: u32,
) -> Result<Vec<bf16>> {
    const OP: &str = "emu::bn_apply";
    let (ri, ci) = dims(OP, r, c, threads)?;
    check_len(OP, "x", x.len(), r * c)?;
    if let Some(res) = residual {
        check_len(OP, "residual", res.len(), r * c)?;
    }
    ch.check(OP, c)?;
    let mut y = vec![bf16::ZERO; r * c];
    let pr = residual.map_or(std::ptr::null(), |v| v.as_ptr());
    let (px, pm, pi, pg, pb, py) = (
        x.as_ptr(),
        ch.mean.as_ptr(),
        ch.invstd.as_ptr(),
        ch.gamma.as_ptr(),
        ch.beta.as_ptr(),
        y.as_mut_ptr(),
    );
    let relu_i = relu as i32;
    let cfg = LaunchConfig::linear((r * c).div_ceil(threads as usize) as u32, threads, 0);
    launch(
        mode,
        "bn_apply",
        cfg,
        &mut [
            arg(&px),
            arg(&pr),
            arg(&pm),
            arg(&pi),
            arg(&pg),
            arg(&pb),
            arg(&py),
            arg(&ri),
            arg(&ci),
            arg(&relu_i),
        ],
    )?;
    Ok(y)
}

/// `bn_backward_partial` + `sum_partials2`: per-channel `(Σdy', Σdy'·(x − mean))`, dy' = dy
/// masked by `y > 0` when the forward output `y` (of a fused ReLU) is given.
#[allow(clippy::too_many_arguments)]
pub fn bn_backward_reduce(
    mode: Mode,
    dy: &[bf16],
    x: &[bf16],
    y: Option<&[bf16]>,
    mean: &[f32],
    r: usize,
    c: usize,
    rpb: usize,
    threads: u32,
) -> Result<(Vec<f32>, Vec<f32>)> {
    const OP: &str = "emu::bn_backward_reduce";
    let (ri, ci) = dims(OP, r, c, threads)?;
    check_len(OP, "dy", dy.len(), r * c)?;
    check_len(OP, "x", x.len(), r * c)?;
    if let Some(y) = y {
        check_len(OP, "y", y.len(), r * c)?;
    }
    check_len(OP, "mean", mean.len(), c)?;
    let (cfg, g, rpbi) = column_cfg(OP, r, c, rpb, threads)?;
    let mut part = vec![f32::NAN; 2 * g * c];
    let py = y.map_or(std::ptr::null(), |v| v.as_ptr());
    let (pg, px, pm, pp) = (dy.as_ptr(), x.as_ptr(), mean.as_ptr(), part.as_mut_ptr());
    launch(
        mode,
        "bn_backward_partial",
        cfg,
        &mut [
            arg(&pg),
            arg(&px),
            arg(&py),
            arg(&pm),
            arg(&pp),
            arg(&ri),
            arg(&ci),
            arg(&rpbi),
        ],
    )?;
    sum_partials(mode, &part, g, c, threads)
}

/// `bn_param_grads`: `(dγ, dβ) = (invstd·Σdy'(x − mean), Σdy')` from the local sums.
pub fn bn_param_grads(
    mode: Mode,
    sum_dy: &[f32],
    sum_dy_xmu: &[f32],
    invstd: &[f32],
    threads: u32,
) -> Result<(Vec<f32>, Vec<f32>)> {
    const OP: &str = "emu::bn_param_grads";
    let c = sum_dy.len();
    let (_, ci) = dims(OP, 1, c, threads)?;
    check_len(OP, "sum_dy_xmu", sum_dy_xmu.len(), c)?;
    check_len(OP, "invstd", invstd.len(), c)?;
    let (mut dg, mut db) = (vec![0.0f32; c], vec![0.0f32; c]);
    let (pa, pb, pi, pg, pd) = (
        sum_dy.as_ptr(),
        sum_dy_xmu.as_ptr(),
        invstd.as_ptr(),
        dg.as_mut_ptr(),
        db.as_mut_ptr(),
    );
    let cfg = LaunchConfig::linear(c.div_ceil(threads as usize) as u32, threads, 0);
    launch(
        mode,
        "bn_param_grads",
        cfg,
        &mut [arg(&pa), arg(&pb), arg(&pi), arg(&pg), arg(&pd), arg(&ci)],
    )?;
    Ok((dg, db))
}

/// `bn_backward_apply`: dx (and, with `want_dres`, the residual's gradient dy') from the
/// (all-reduced) sums over `count` values; `training = false` treats the statistics as constants.
#[allow(clippy::too_many_arguments)]
pub fn bn_backward_apply(
    mode: Mode,
    dy: &[bf16],
    x: &[bf16],
    y: Option<&[bf16]>,
    ch: BnChannels<'_>,
    sums: (&[f32], &[f32]),
    count: usize,
    r: usize,
    c: usize,
    training: bool,
    want_dres: bool,
    threads: u32,
) -> Result<(Vec<bf16>, Option<Vec<bf16>>)> {
    const OP: &str = "emu::bn_backward_apply";
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
    let mut dx = vec![bf16::ZERO; r * c];
    let mut dres = want_dres.then(|| vec![bf16::ZERO; r * c]);
    let py = y.map_or(std::ptr::null(), |v| v.as_ptr());
    let pdr = dres
        .as_mut()
        .map_or(std::ptr::null_mut(), |v| v.as_mut_ptr());
    let (pg, px, pm, pi, pga) = (
        dy.as_ptr(),
        x.as_ptr(),
        ch.mean.as_ptr(),
        ch.invstd.as_ptr(),
        ch.gamma.as_ptr(),
    );
    let (ps, psx, pdx) = (sums.0.as_ptr(), sums.1.as_ptr(), dx.as_mut_ptr());
    let (n, tr) = (count as f32, training as i32);
    let cfg = LaunchConfig::linear((r * c).div_ceil(threads as usize) as u32, threads, 0);
    launch(
        mode,
        "bn_backward_apply",
        cfg,
        &mut [
            arg(&pg),
            arg(&px),
            arg(&py),
            arg(&pm),
            arg(&pi),
            arg(&pga),
            arg(&ps),
            arg(&psx),
            arg(&n),
            arg(&pdx),
            arg(&pdr),
            arg(&ri),
            arg(&ci),
            arg(&tr),
        ],
    )?;
    Ok((dx, dres))
}

/// `layernorm_forward`: `(y, mean [r], rstd [r])` over the last dimension `d`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    mode: Mode,
    x: &[bf16],
    gamma: &[f32],
    beta: &[f32],
    r: usize,
    d: usize,
    eps: f32,
    threads: u32,
) -> Result<(Vec<bf16>, Vec<f32>, Vec<f32>)> {
    const OP: &str = "emu::layernorm_forward";
    let (ri, di) = dims(OP, r, d, threads)?;
    check_len(OP, "x", x.len(), r * d)?;
    check_len(OP, "gamma", gamma.len(), d)?;
    check_len(OP, "beta", beta.len(), d)?;
    let (mut y, mut mean, mut rstd) = (vec![bf16::ZERO; r * d], vec![0.0f32; r], vec![0.0f32; r]);
    let (px, pg, pb, py, pm, ps) = (
        x.as_ptr(),
        gamma.as_ptr(),
        beta.as_ptr(),
        y.as_mut_ptr(),
        mean.as_mut_ptr(),
        rstd.as_mut_ptr(),
    );
    launch(
        mode,
        "layernorm_forward",
        warp_rows(r, threads),
        &mut [
            arg(&px),
            arg(&pg),
            arg(&pb),
            arg(&py),
            arg(&pm),
            arg(&ps),
            arg(&ri),
            arg(&di),
            arg(&eps),
        ],
    )?;
    Ok((y, mean, rstd))
}

/// `layernorm_backward` + `sum_partials2`: `(dx, dγ, dβ)`, `rpb` rows per block.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    mode: Mode,
    dy: &[bf16],
    x: &[bf16],
    gamma: &[f32],
    mean: &[f32],
    rstd: &[f32],
    r: usize,
    d: usize,
    rpb: usize,
    threads: u32,
) -> Result<(Vec<bf16>, Vec<f32>, Vec<f32>)> {
    const OP: &str = "emu::layernorm_backward";
    let (ri, di) = dims(OP, r, d, threads)?;
    check_len(OP, "dy", dy.len(), r * d)?;
    check_len(OP, "x", x.len(), r * d)?;
    check_len(OP, "gamma", gamma.len(), d)?;
    check_len(OP, "mean", mean.len(), r)?;
    check_len(OP, "rstd", rstd.len(), r)?;
    if rpb == 0 {
        return Err(Error::invalid(OP, "rows per block must be > 0"));
    }
    let g = r.div_ceil(rpb);
    let rpbi = as_i32(OP, "rows per block", rpb)?;
    let mut dx = vec![bf16::ZERO; r * d];
    let mut part = vec![f32::NAN; 2 * g * d];
    let (pg, px, pga, pm, ps, pdx, pp) = (
        dy.as_ptr(),
        x.as_ptr(),
        gamma.as_ptr(),
        mean.as_ptr(),
        rstd.as_ptr(),
        dx.as_mut_ptr(),
        part.as_mut_ptr(),
    );
    let shared = 2 * (threads as usize / 32) * d * 4;
    launch(
        mode,
        "layernorm_backward",
        LaunchConfig::linear(g as u32, threads, shared),
        &mut [
            arg(&pg),
            arg(&px),
            arg(&pga),
            arg(&pm),
            arg(&ps),
            arg(&pdx),
            arg(&pp),
            arg(&ri),
            arg(&di),
            arg(&rpbi),
        ],
    )?;
    let (dgamma, dbeta) = sum_partials(mode, &part, g, d, threads)?;
    Ok((dx, dgamma, dbeta))
}
