//! GPU launches of `kernels/softmax_ce.cu`: cross-entropy with temperature, soft targets and
//! label smoothing (CPU reference: `backend::cpu::loss`), forward (saving the per-row
//! log-sum-exp and target mass), backward from them, and the fused forward+backward.
//!
//! Layout: logits `z [B, K]` bf16, targets `t [B, K]` fp32, row-major; one block per row, 256
//! threads (1024 for K ≥ 16384, DINO's 65536 prototypes); the batch mean is taken by
//! `ce_loss_mean` in a fixed order (deterministic). Results stay on the device: the scalar loss
//! is a one-element buffer, so a training step needs no host synchronisation.

use super::alloc::DeviceBuffer;
use super::context::Gpu;
use super::module::LaunchDims;
use super::PushKernelArg;
use crate::backend::cpu::loss::CrossEntropyParams;
use crate::error::{Error, Result};
use half::bf16;

const MODULE: &str = "softmax_ce";

/// Device results of [`forward`].
pub struct CeForward {
    /// Mean loss over the rows, one element.
    pub loss: DeviceBuffer<f32>,
    /// Per-row losses `[B]`.
    pub row_loss: DeviceBuffer<f32>,
    /// Per-row `logsumexp(z/τ)` `[B]`, what the backward needs instead of the probabilities.
    pub lse: DeviceBuffer<f32>,
    /// Per-row smoothed target mass `[B]`.
    pub mass: DeviceBuffer<f32>,
}

/// Threads per row block: 1024 for very wide rows, else 256.
fn threads(k: usize) -> u32 {
    if k >= 16384 {
        1024
    } else {
        256
    }
}

/// Checks shapes and parameters; returns `(B, K, 1/τ, ls)` as the kernels take them.
fn prepare(
    op: &'static str,
    z: &DeviceBuffer<bf16>,
    t: &DeviceBuffer<f32>,
    b: usize,
    k: usize,
    p: CrossEntropyParams,
) -> Result<(i32, i32, f32, f32)> {
    p.validate(op)?;
    if b == 0 || k == 0 {
        return Err(Error::shape(
            op,
            format!("logits [{b}, {k}]: need rows and classes"),
        ));
    }
    if z.len() != b * k || t.len() != b * k {
        return Err(Error::shape(
            op,
            format!(
                "logits hold {}, targets {}, expected [{b}, {k}] = {}",
                z.len(),
                t.len(),
                b * k
            ),
        ));
    }
    let i = |v: usize| {
        i32::try_from(v).map_err(|_| Error::shape(op, format!("dimension {v} exceeds i32")))
    };
    Ok((
        i(b)?,
        i(k)?,
        (1.0 / p.temperature) as f32,
        p.label_smoothing as f32,
    ))
}

/// `loss = mean(row_loss)` into a one-element buffer.
fn loss_mean(gpu: &Gpu, row_loss: &DeviceBuffer<f32>, b: i32) -> Result<DeviceBuffer<f32>> {
    let loss = gpu.alloc::<f32>(1)?;
    let k = gpu.kernel(MODULE, "ce_loss_mean")?;
    let (pr, pl) = (row_loss.ptr(), loss.ptr());
    let mut a = k.builder(gpu.stream());
    a.arg(&pr).arg(&pl).arg(&b);
    // SAFETY: (const float*, float*, int): row_loss holds b floats, loss one.
    unsafe { k.launch(&mut a, LaunchDims::rows(1, 256, 0))? };
    Ok(loss)
}

/// Forward: the mean loss and the per-row values the backward needs.
pub fn forward(
    gpu: &Gpu,
    z: &DeviceBuffer<bf16>,
    t: &DeviceBuffer<f32>,
    b: usize,
    k: usize,
    p: CrossEntropyParams,
) -> Result<CeForward> {
    let (bi, ki, inv_tau, ls) = prepare("cuda::softmax_ce_forward", z, t, b, k, p)?;
    let row_loss = gpu.alloc::<f32>(b)?;
    let lse = gpu.alloc::<f32>(b)?;
    let mass = gpu.alloc::<f32>(b)?;
    let kf = gpu.kernel(MODULE, "softmax_ce_forward")?;
    let (pz, pt, pr, pl, pm) = (z.ptr(), t.ptr(), row_loss.ptr(), lse.ptr(), mass.ptr());
    let mut a = kf.builder(gpu.stream());
    a.arg(&pz)
        .arg(&pt)
        .arg(&pr)
        .arg(&pl)
        .arg(&pm)
        .arg(&bi)
        .arg(&ki)
        .arg(&inv_tau)
        .arg(&ls);
    // SAFETY: argument list as the kernel declares; z, t hold b·k elements, outputs b each.
    unsafe { kf.launch(&mut a, LaunchDims::rows(b, threads(k), 0))? };
    let loss = loss_mean(gpu, &row_loss, bi)?;
    Ok(CeForward {
        loss,
        row_loss,
        lse,
        mass,
    })
}

/// Backward: `dz = dloss·(p·mass − t')/(τ·B)` (bf16) from the forward's saved values.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    gpu: &Gpu,
    z: &DeviceBuffer<bf16>,
    t: &DeviceBuffer<f32>,
    fwd: &CeForward,
    b: usize,
    k: usize,
    p: CrossEntropyParams,
    dloss: f32,
) -> Result<DeviceBuffer<bf16>> {
    let (bi, ki, inv_tau, ls) = prepare("cuda::softmax_ce_backward", z, t, b, k, p)?;
    if fwd.lse.len() != b || fwd.mass.len() != b {
        return Err(Error::shape(
            "cuda::softmax_ce_backward",
            format!("saved values for {} rows, logits have {b}", fwd.lse.len()),
        ));
    }
    let dz = gpu.alloc::<bf16>(b * k)?;
    let kb = gpu.kernel(MODULE, "softmax_ce_backward")?;
    let (pz, pt, pl, pm, pd) = (z.ptr(), t.ptr(), fwd.lse.ptr(), fwd.mass.ptr(), dz.ptr());
    let mut a = kb.builder(gpu.stream());
    a.arg(&pz)
        .arg(&pt)
        .arg(&pl)
        .arg(&pm)
        .arg(&pd)
        .arg(&bi)
        .arg(&ki)
        .arg(&inv_tau)
        .arg(&ls)
        .arg(&dloss);
    // SAFETY: argument list as the kernel declares; sizes checked above.
    unsafe { kb.launch(&mut a, LaunchDims::rows(b, threads(k), 0))? };
    Ok(dz)
}

/// Forward and backward in one launch (when `dloss` is known up front): `(loss, dz)`.
pub fn fused(
    gpu: &Gpu,
    z: &DeviceBuffer<bf16>,
    t: &DeviceBuffer<f32>,
    b: usize,
    k: usize,
    p: CrossEntropyParams,
    dloss: f32,
) -> Result<(DeviceBuffer<f32>, DeviceBuffer<bf16>)> {
    let (bi, ki, inv_tau, ls) = prepare("cuda::softmax_ce_fused", z, t, b, k, p)?;
    let row_loss = gpu.alloc::<f32>(b)?;
    let lse = gpu.alloc::<f32>(b)?;
    let dz = gpu.alloc::<bf16>(b * k)?;
    let kf = gpu.kernel(MODULE, "softmax_ce_fused")?;
    let (pz, pt, pr, pl, pd) = (z.ptr(), t.ptr(), row_loss.ptr(), lse.ptr(), dz.ptr());
    let mut a = kf.builder(gpu.stream());
    a.arg(&pz)
        .arg(&pt)
        .arg(&pr)
        .arg(&pl)
        .arg(&pd)
        .arg(&bi)
        .arg(&ki)
        .arg(&inv_tau)
        .arg(&ls)
        .arg(&dloss);
    // SAFETY: argument list as the kernel declares; sizes checked above.
    unsafe { kf.launch(&mut a, LaunchDims::rows(b, threads(k), 0))? };
    let loss = loss_mean(gpu, &row_loss, bi)?;
    Ok((loss, dz))
}
