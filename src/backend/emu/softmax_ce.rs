//! CPU launches of `kernels/softmax_ce.cu`: softmax cross-entropy with temperature, soft
//! targets and label smoothing (reference: `backend::cpu::loss`), forward, backward from the
//! saved log-sum-exp, and the fused forward+backward; one block per row.

use super::{arg, as_i32, check_len, check_threads, launch_raw, LaunchConfig, Mode};
use crate::backend::cpu::loss::CrossEntropyParams;
use crate::error::{Error, Result};
use half::bf16;

/// What [`softmax_ce_forward`] returns: the batch-mean loss and the per-row saved values.
#[derive(Clone, Debug)]
pub struct SoftmaxCeForward {
    /// Mean loss over the rows (from `ce_loss_mean`).
    pub loss: f32,
    /// Per-row losses `[B]`.
    pub row_loss: Vec<f32>,
    /// Per-row `logsumexp(z/τ)` `[B]`, what the backward needs instead of the probabilities.
    pub lse: Vec<f32>,
    /// Per-row smoothed target mass `Σ_k t'_k` `[B]` (1 for probability targets).
    pub mass: Vec<f32>,
}

/// Checks the shapes and parameters; returns `(B, K, 1/τ, ls)` as the kernels take them.
fn prepare(
    op: &'static str,
    logits: &[bf16],
    target: &[f32],
    b: usize,
    k: usize,
    params: CrossEntropyParams,
    threads: u32,
) -> Result<(i32, i32, f32, f32)> {
    params.validate(op)?;
    if b == 0 || k == 0 {
        return Err(Error::shape(
            op,
            format!("logits [{b}, {k}]: need rows and classes"),
        ));
    }
    check_len(op, "logits", logits.len(), b * k)?;
    check_len(op, "targets", target.len(), b * k)?;
    check_threads(op, threads)?;
    Ok((
        as_i32(op, "rows", b)?,
        as_i32(op, "classes", k)?,
        (1.0 / params.temperature) as f32,
        params.label_smoothing as f32,
    ))
}

/// `ce_loss_mean`: the mean of `row_loss` (grid 1, block `threads`).
pub fn ce_loss_mean(mode: Mode, row_loss: &[f32], threads: u32) -> Result<f32> {
    const OP: &str = "emu::ce_loss_mean";
    let bi = as_i32(OP, "rows", row_loss.len())?;
    check_threads(OP, threads)?;
    if bi == 0 {
        return Err(Error::invalid(OP, "no rows to average: row_loss is empty"));
    }
    let mut loss = 0.0f32;
    let (pl, po) = (row_loss.as_ptr(), &mut loss as *mut f32);
    let mut args = [arg(&pl), arg(&po), arg(&bi)];
    // SAFETY: argument types follow the kernel; one output float.
    unsafe {
        launch_raw(
            mode,
            "softmax_ce",
            "ce_loss_mean",
            LaunchConfig::linear(1, threads, 0),
            &mut args,
        )?
    };
    Ok(loss)
}

/// `softmax_ce_forward` (grid B, block `threads`) then `ce_loss_mean`.
pub fn softmax_ce_forward(
    mode: Mode,
    logits: &[bf16],
    target: &[f32],
    b: usize,
    k: usize,
    params: CrossEntropyParams,
    threads: u32,
) -> Result<SoftmaxCeForward> {
    const OP: &str = "emu::softmax_ce_forward";
    let (bi, ki, inv_tau, ls) = prepare(OP, logits, target, b, k, params, threads)?;
    let (mut row_loss, mut lse, mut mass) = (vec![0.0f32; b], vec![0.0f32; b], vec![0.0f32; b]);
    let (pz, pt) = (logits.as_ptr(), target.as_ptr());
    let (pl, pe, pm) = (row_loss.as_mut_ptr(), lse.as_mut_ptr(), mass.as_mut_ptr());
    let mut args = [
        arg(&pz),
        arg(&pt),
        arg(&pl),
        arg(&pe),
        arg(&pm),
        arg(&bi),
        arg(&ki),
        arg(&inv_tau),
        arg(&ls),
    ];
    // SAFETY: argument types follow the kernel; buffers have the checked lengths.
    unsafe {
        launch_raw(
            mode,
            "softmax_ce",
            "softmax_ce_forward",
            LaunchConfig::linear(b as u32, threads, 0),
            &mut args,
        )?
    };
    let loss = ce_loss_mean(mode, &row_loss, threads)?;
    Ok(SoftmaxCeForward {
        loss,
        row_loss,
        lse,
        mass,
    })
}

/// `softmax_ce_backward` (grid B, block `threads`): `dz` (bf16) from the forward's lse/mass.
#[allow(clippy::too_many_arguments)]
pub fn softmax_ce_backward(
    mode: Mode,
    logits: &[bf16],
    target: &[f32],
    saved: &SoftmaxCeForward,
    b: usize,
    k: usize,
    params: CrossEntropyParams,
    dloss: f32,
    threads: u32,
) -> Result<Vec<bf16>> {
    const OP: &str = "emu::softmax_ce_backward";
    let (bi, ki, inv_tau, ls) = prepare(OP, logits, target, b, k, params, threads)?;
    check_len(OP, "lse", saved.lse.len(), b)?;
    check_len(OP, "mass", saved.mass.len(), b)?;
    let mut dz = vec![bf16::ZERO; b * k];
    let (pz, pt, pe, pm, pd) = (
        logits.as_ptr(),
        target.as_ptr(),
        saved.lse.as_ptr(),
        saved.mass.as_ptr(),
        dz.as_mut_ptr(),
    );
    let mut args = [
        arg(&pz),
        arg(&pt),
        arg(&pe),
        arg(&pm),
        arg(&pd),
        arg(&bi),
        arg(&ki),
        arg(&inv_tau),
        arg(&ls),
        arg(&dloss),
    ];
    // SAFETY: as in softmax_ce_forward.
    unsafe {
        launch_raw(
            mode,
            "softmax_ce",
            "softmax_ce_backward",
            LaunchConfig::linear(b as u32, threads, 0),
            &mut args,
        )?
    };
    Ok(dz)
}

/// `softmax_ce_fused` (grid B, block `threads`) then `ce_loss_mean`: returns
/// `(mean loss, lse [B], dz [B, K] bf16)` for an upstream gradient `dloss` known in advance.
#[allow(clippy::too_many_arguments)]
pub fn softmax_ce_fused(
    mode: Mode,
    logits: &[bf16],
    target: &[f32],
    b: usize,
    k: usize,
    params: CrossEntropyParams,
    dloss: f32,
    threads: u32,
) -> Result<(f32, Vec<f32>, Vec<bf16>)> {
    const OP: &str = "emu::softmax_ce_fused";
    let (bi, ki, inv_tau, ls) = prepare(OP, logits, target, b, k, params, threads)?;
    let (mut row_loss, mut lse, mut dz) =
        (vec![0.0f32; b], vec![0.0f32; b], vec![bf16::ZERO; b * k]);
    let (pz, pt, pl, pe, pd) = (
        logits.as_ptr(),
        target.as_ptr(),
        row_loss.as_mut_ptr(),
        lse.as_mut_ptr(),
        dz.as_mut_ptr(),
    );
    let mut args = [
        arg(&pz),
        arg(&pt),
        arg(&pl),
        arg(&pe),
        arg(&pd),
        arg(&bi),
        arg(&ki),
        arg(&inv_tau),
        arg(&ls),
        arg(&dloss),
    ];
    // SAFETY: as in softmax_ce_forward.
    unsafe {
        launch_raw(
            mode,
            "softmax_ce",
            "softmax_ce_fused",
            LaunchConfig::linear(b as u32, threads, 0),
            &mut args,
        )?
    };
    let loss = ce_loss_mean(mode, &row_loss, threads)?;
    Ok((loss, lse, dz))
}
