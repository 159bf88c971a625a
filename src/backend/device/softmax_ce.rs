//! Device ops of `kernels/softmax_ce.cu`: cross-entropy with temperature, soft targets and
//! label smoothing, the loss behind every Suave/Daino term (swapped prediction against
//! Sinkhorn codes, DINO's teacher/student term, the supervised term). CPU reference of every
//! op: `backend::cpu::loss` (`cross_entropy_forward` for the loss and the per-row log-sum-exp,
//! `cross_entropy_backward` for the gradient).
//!
//! Ops and kernels: [`softmax_ce_forward`] (`softmax_ce_forward` then `ce_loss_mean`) saves the
//! per-row log-sum-exp and target mass, so that [`softmax_ce_backward`]
//! (`softmax_ce_backward`) needs B floats instead of the B × K probabilities;
//! [`softmax_ce_fused`] (`softmax_ce_fused` then `ce_loss_mean`) does both in one launch when
//! the upstream gradient is known at forward time; [`ce_loss_mean`] is the deterministic batch
//! mean. Layout: logits `z [B, K]` bf16, targets `t [B, K]` fp32, row-major, one block per row.
//! The loss stays on the device (a one-element buffer): a training step needs no host
//! synchronisation. Every output is written in full by its kernel, so outputs come from
//! [`Exec::alloc`].
//!
//! This file also holds the family's rows of the device check ([`check_rows`]).

use super::check::{random, round_bf16, Checker, Measured, TOL_BF16, TOL_F32};
use super::{as_i32, check_len, check_threads, DevBuf, Exec, KArg, LaunchConfig};
use crate::backend::cpu::loss::{
    cross_entropy_backward, cross_entropy_forward, CrossEntropyParams,
};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::testing::rel_l2;
use half::bf16;
use serde_json::json;
use std::cell::OnceCell;

/// The kernel module (`kernels/softmax_ce.cu`).
pub const MODULE: &str = "softmax_ce";

/// Threads per row block on the GPU for ordinary rows (and for `ce_loss_mean`'s one block).
pub const THREADS: u32 = 256;

/// Threads per row block on the GPU for wide rows (K ≥ [`WIDE_ROW`], DINO's 65536 prototypes):
/// more loads in flight per row.
pub const WIDE_THREADS: u32 = 1024;

/// The row width from which [`WIDE_THREADS`] are used.
pub const WIDE_ROW: usize = 16384;

/// The recommended threads per row block for rows of `k` classes (what the kernel file says).
pub fn row_threads(k: usize) -> u32 {
    if k >= WIDE_ROW {
        WIDE_THREADS
    } else {
        THREADS
    }
}

/// Checks the shapes and parameters; returns `(B, K, 1/τ, ls)` as the kernels take them.
fn prepare<E: Exec>(
    op: &'static str,
    logits: &E::Buf<bf16>,
    target: &E::Buf<f32>,
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
    // Grid B (at most 2^31 - 1 blocks); row offsets are 64-bit in the kernels.
    Ok((
        as_i32(op, "rows", b)?,
        as_i32(op, "classes", k)?,
        (1.0 / params.temperature) as f32,
        params.label_smoothing as f32,
    ))
}

/// What [`softmax_ce_forward`] returns: the batch-mean loss and what the backward needs.
pub struct CeForward<E: Exec> {
    /// Mean loss over the rows, one element (from `ce_loss_mean`).
    pub loss: E::Buf<f32>,
    /// Per-row losses `[B]`.
    pub row_loss: E::Buf<f32>,
    /// Per-row `logsumexp(z/τ)` `[B]`, what the backward needs instead of the probabilities.
    pub lse: E::Buf<f32>,
    /// Per-row smoothed target mass `Σ_k t'_k` `[B]` (1 for probability targets).
    pub mass: E::Buf<f32>,
}

/// What [`softmax_ce_fused`] returns.
pub struct CeFused<E: Exec> {
    /// Mean loss over the rows, one element.
    pub loss: E::Buf<f32>,
    /// Per-row losses `[B]`.
    pub row_loss: E::Buf<f32>,
    /// Per-row `logsumexp(z/τ)` `[B]`.
    pub lse: E::Buf<f32>,
    /// Gradient of the loss times `dloss` with respect to the logits, `[B, K]` bf16.
    pub dz: E::Buf<bf16>,
}

/// `ce_loss_mean`: the mean of `row_loss` into a new one-element buffer, summed in a fixed
/// order (deterministic, no atomics). Launch: grid 1, block `threads` ([`THREADS`] on the GPU).
pub fn ce_loss_mean<E: Exec>(ex: &E, row_loss: &E::Buf<f32>, threads: u32) -> Result<E::Buf<f32>> {
    const OP: &str = "ce_loss_mean";
    check_threads(OP, threads)?;
    if row_loss.is_empty() {
        return Err(Error::invalid(OP, "no rows to average: row_loss is empty"));
    }
    let bi = as_i32(OP, "rows", row_loss.len())?;
    let loss = ex.alloc::<f32>(1)?;
    let args = [row_loss.arg(), loss.arg(), KArg::I32(bi)];
    // SAFETY: (const float* row_loss, float* loss, int B); row_loss holds B floats, loss one.
    unsafe {
        ex.launch(
            MODULE,
            "ce_loss_mean",
            LaunchConfig::linear(1, threads, 0),
            &args,
        )?
    };
    Ok(loss)
}

/// `softmax_ce_forward` (grid B, block `threads`, [`row_threads`] on the GPU) then
/// [`ce_loss_mean`]: the mean loss and the per-row values the backward needs.
pub fn softmax_ce_forward<E: Exec>(
    ex: &E,
    logits: &E::Buf<bf16>,
    target: &E::Buf<f32>,
    b: usize,
    k: usize,
    params: CrossEntropyParams,
    threads: u32,
) -> Result<CeForward<E>> {
    const OP: &str = "softmax_ce_forward";
    let (bi, ki, inv_tau, ls) = prepare::<E>(OP, logits, target, b, k, params, threads)?;
    let (row_loss, lse, mass) = (
        ex.alloc::<f32>(b)?,
        ex.alloc::<f32>(b)?,
        ex.alloc::<f32>(b)?,
    );
    let args = [
        logits.arg(),
        target.arg(),
        row_loss.arg(),
        lse.arg(),
        mass.arg(),
        KArg::I32(bi),
        KArg::I32(ki),
        KArg::F32(inv_tau),
        KArg::F32(ls),
    ];
    // SAFETY: (const bf16* z, const float* t, float* row_loss, float* lse, float* mass, int B,
    // int K, float inv_tau, float ls) as the kernel declares; z and t hold B·K elements, the
    // outputs B each; block b touches row b only.
    unsafe {
        ex.launch(
            MODULE,
            "softmax_ce_forward",
            LaunchConfig::linear(b as u32, threads, 0),
            &args,
        )?
    };
    let loss = ce_loss_mean(ex, &row_loss, threads)?;
    Ok(CeForward {
        loss,
        row_loss,
        lse,
        mass,
    })
}

/// `softmax_ce_backward` (grid B, block `threads`): `dz = dloss·(p·mass − t')/(τ·B)` in bf16,
/// with `p` recomputed from the forward's saved `lse` and `mass`.
#[allow(clippy::too_many_arguments)]
pub fn softmax_ce_backward<E: Exec>(
    ex: &E,
    logits: &E::Buf<bf16>,
    target: &E::Buf<f32>,
    saved: &CeForward<E>,
    b: usize,
    k: usize,
    params: CrossEntropyParams,
    dloss: f32,
    threads: u32,
) -> Result<E::Buf<bf16>> {
    const OP: &str = "softmax_ce_backward";
    let (bi, ki, inv_tau, ls) = prepare::<E>(OP, logits, target, b, k, params, threads)?;
    check_len(OP, "saved lse", saved.lse.len(), b)?;
    check_len(OP, "saved mass", saved.mass.len(), b)?;
    let dz = ex.alloc::<bf16>(b * k)?;
    let args = [
        logits.arg(),
        target.arg(),
        saved.lse.arg(),
        saved.mass.arg(),
        dz.arg(),
        KArg::I32(bi),
        KArg::I32(ki),
        KArg::F32(inv_tau),
        KArg::F32(ls),
        KArg::F32(dloss),
    ];
    // SAFETY: (const bf16* z, const float* t, const float* lse, const float* mass, bf16* dz,
    // int B, int K, float inv_tau, float ls, float dloss); z, t, dz hold B·K elements, lse and
    // mass B.
    unsafe {
        ex.launch(
            MODULE,
            "softmax_ce_backward",
            LaunchConfig::linear(b as u32, threads, 0),
            &args,
        )?
    };
    Ok(dz)
}

/// `softmax_ce_fused` (grid B, block `threads`) then [`ce_loss_mean`]: forward and backward
/// in one launch, for an upstream gradient `dloss` known in advance (the loss's weight in the
/// objective). Same numbers, bit for bit, as the forward then the backward.
#[allow(clippy::too_many_arguments)]
pub fn softmax_ce_fused<E: Exec>(
    ex: &E,
    logits: &E::Buf<bf16>,
    target: &E::Buf<f32>,
    b: usize,
    k: usize,
    params: CrossEntropyParams,
    dloss: f32,
    threads: u32,
) -> Result<CeFused<E>> {
    const OP: &str = "softmax_ce_fused";
    let (bi, ki, inv_tau, ls) = prepare::<E>(OP, logits, target, b, k, params, threads)?;
    let (row_loss, lse) = (ex.alloc::<f32>(b)?, ex.alloc::<f32>(b)?);
    let dz = ex.alloc::<bf16>(b * k)?;
    let args = [
        logits.arg(),
        target.arg(),
        row_loss.arg(),
        lse.arg(),
        dz.arg(),
        KArg::I32(bi),
        KArg::I32(ki),
        KArg::F32(inv_tau),
        KArg::F32(ls),
        KArg::F32(dloss),
    ];
    // SAFETY: (const bf16* z, const float* t, float* row_loss, float* lse, bf16* dz, int B,
    // int K, float inv_tau, float ls, float dloss); z, t, dz hold B·K elements, row_loss and
    // lse B.
    unsafe {
        ex.launch(
            MODULE,
            "softmax_ce_fused",
            LaunchConfig::linear(b as u32, threads, 0),
            &args,
        )?
    };
    let loss = ce_loss_mean(ex, &row_loss, threads)?;
    Ok(CeFused {
        loss,
        row_loss,
        lse,
        dz,
    })
}

/// Soft targets: positive rows summing to 1 (codes or teacher probabilities).
fn soft_targets(name: &str, b: usize, k: usize) -> Vec<f32> {
    let mut t: Vec<f32> = random(name, b * k)
        .into_iter()
        .map(|v| v.abs() + 1e-3)
        .collect();
    for row in t.chunks_exact_mut(k) {
        let s: f32 = row.iter().sum();
        row.iter_mut().for_each(|v| *v /= s);
    }
    t
}

/// The device check's rows of this family: forward, backward and fused against
/// `backend::cpu::loss` on the same bf16-rounded logits, τ = 0.1 and label smoothing 0.01, at
/// Suave's scores [4096, 3000] (and the earlier [4096, 1000]) and Daino's 65536 prototypes over
/// 64 images × 10 crops; 64 × 1000 with `quick`.
pub fn check_rows<E: Exec>(c: &mut Checker<'_, E>) {
    let shapes: &[(usize, usize)] = if c.opts.quick {
        &[(64, 1000)]
    } else {
        &[(4096, 3000), (4096, 1000), (640, 65536)]
    };
    let (tau, ls) = (0.1, 0.01);
    let p = CrossEntropyParams {
        temperature: tau,
        label_smoothing: ls,
    };
    let dloss = 0.5f32;
    let err = |e: &Error| Error::invalid("device-check", e.to_string());
    for &(b, k) in shapes {
        let threads = row_threads(k);
        // Inputs and the CPU reference, made when a row that needs them runs (not when
        // filtered out): [640, 65536] takes a while on the CPU.
        let data = OnceCell::new();
        let data = || {
            data.get_or_init(|| {
                let z = round_bf16(&random(&format!("ce.z.{b}.{k}"), b * k));
                let t = soft_targets(&format!("ce.t.{b}.{k}"), b, k);
                let reference = Tensor::from_vec(z.clone(), &[b, k]).and_then(|zt| {
                    let tt = Tensor::from_vec(t.clone(), &[b, k])?;
                    let (loss, ctx) = cross_entropy_forward(&zt, &tt, p)?;
                    let dz = cross_entropy_backward(dloss, &tt, &ctx)?;
                    Ok((loss, dz))
                });
                (z, t, reference)
            })
        };
        let bk = (b * k) as f64;
        let shape = format!("B{b} K{k} tau{tau} ls{ls}");
        let torch = |dir: &str| json!({"kind": "softmax_ce", "dir": dir, "b": b, "k": k, "tau": tau, "ls": ls});
        let aim = "aim: >= 70% of copy bandwidth (%floor)";
        c.row(
            "softmax_ce",
            &format!("ce_fwd_b{b}_k{k}"),
            shape.clone(),
            torch("fwd"),
            |c| {
                let (z, t, reference) = data();
                let (want, _) = reference.as_ref().map_err(err)?;
                let (zd, td) = (c.dev.upload_bf16(z)?, c.dev.upload(t)?);
                let run = || softmax_ce_forward(c.dev, &zd, &td, b, k, p, threads);
                let got = c.dev.download(&run()?.loss)?;
                let tm = c.time(|| run().map(drop))?;
                Ok(Measured {
                    err: Some((rel_l2(&got, &[*want]), TOL_F32)),
                    time: Some(tm),
                    // Reads z (bf16) and t (fp32); the per-row outputs are negligible.
                    bytes: 6.0 * bk,
                    note: aim.into(),
                    ..Default::default()
                })
            },
        );
        c.row(
            "softmax_ce",
            &format!("ce_bwd_b{b}_k{k}"),
            shape.clone(),
            torch("bwd"),
            |c| {
                let (z, t, reference) = data();
                let (_, want) = reference.as_ref().map_err(err)?;
                let (zd, td) = (c.dev.upload_bf16(z)?, c.dev.upload(t)?);
                let f = softmax_ce_forward(c.dev, &zd, &td, b, k, p, threads)?;
                let run = || softmax_ce_backward(c.dev, &zd, &td, &f, b, k, p, dloss, threads);
                let got = c.dev.download_bf16(&run()?)?;
                let tm = c.time(|| run().map(drop))?;
                Ok(Measured {
                    err: Some((rel_l2(&got, want.data()), TOL_BF16)),
                    time: Some(tm),
                    // Reads z (bf16), t (fp32); writes dz (bf16).
                    bytes: 8.0 * bk,
                    note: aim.into(),
                    ..Default::default()
                })
            },
        );
        c.row(
            "softmax_ce",
            &format!("ce_fused_b{b}_k{k}"),
            shape,
            torch("fwdbwd"),
            |c| {
                let (z, t, reference) = data();
                let (want_loss, want) = reference.as_ref().map_err(err)?;
                let (zd, td) = (c.dev.upload_bf16(z)?, c.dev.upload(t)?);
                let run = || softmax_ce_fused(c.dev, &zd, &td, b, k, p, dloss, threads);
                let out = run()?;
                let got = c.dev.download_bf16(&out.dz)?;
                let got_loss = c.dev.download(&out.loss)?;
                let tm = c.time(|| run().map(drop))?;
                let (e_dz, e_loss) = (
                    rel_l2(&got, want.data()),
                    rel_l2(&got_loss, &[*want_loss]) * TOL_BF16 / TOL_F32,
                );
                // NaN must fail the row (f64::max would drop it).
                let e = if e_dz.is_nan() || e_loss.is_nan() {
                    f64::NAN
                } else {
                    e_dz.max(e_loss)
                };
                Ok(Measured {
                    err: Some((e, TOL_BF16)),
                    time: Some(tm),
                    bytes: 8.0 * bk,
                    note: format!("err = max(dz, loss scaled to the dz tolerance); {aim}"),
                    ..Default::default()
                })
            },
        );
    }
}
