//! GPU launches of `kernels/optim.cu` (kernel layer, branch `cuda-kernels2`): the multi-tensor
//! AdamW update of Daino. CPU reference: `optim::adamw` (the formula below, per element, f32,
//! in this order):
//! `p ← p·decay; m ← m + (1−β1)(g − m); v ← β2·v + (1−β2)·g²; p ← p − step_size·m / (√v / bc2 + ε)`
//! with `decay = 1 − lr·wd`, `step_size = lr / (1 − β1^k)`, `bc2 = √(1 − β2^k)` computed in f64
//! per tensor and rounded to f32 ([`AdamWScalars`]).
//!
//! Multi-tensor layout (see the kernel file): a table of per-tensor descriptors in device memory
//! (pointers as 64-bit integers), every tensor cut into chunks of [`CHUNK`] elements, one block
//! per chunk, so one launch updates the whole model. The table is uploaded each call from
//! pageable host memory (the driver stages it before returning, so the host vector may go);
//! a training loop that keeps its hyper-parameters in a pinned, rewritten table avoids that copy.
//!
//! The module is looked up by name at run time: on a build whose kernel table has no `optim`
//! module, [`adamw_step`] returns an error naming it (and the GPU check skips its row).

use super::alloc::DeviceBuffer;
use super::context::Gpu;
use super::module::LaunchDims;
use super::PushKernelArg;
use crate::error::{Error, Result};
use half::bf16;

/// Elements per block (one chunk): ~1 400 blocks for ViT-S's 22 M parameters.
pub const CHUNK: usize = 16384;
/// Threads per block.
pub const THREADS: u32 = 256;

/// `optim_detail::AdamWTensor` of `kernels/optim.cu`, 64 bytes, field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AdamWTensor {
    /// `float*` fp32 master weights.
    pub param: u64,
    /// `const float*` gradient.
    pub grad: u64,
    /// `float*` first moment (zero before the first step).
    pub exp_avg: u64,
    /// `float*` second moment (zero before the first step).
    pub exp_avg_sq: u64,
    /// `bf16*` shadow of the updated weights, or 0.
    pub param_bf16: u64,
    /// Elements.
    pub n: i64,
    /// First chunk of this tensor.
    pub chunk0: i32,
    /// `1 − lr·wd`.
    pub decay: f32,
    /// `lr / (1 − β1^k)`.
    pub step_size: f32,
    /// `√(1 − β2^k)`.
    pub bc2_sqrt: f32,
}

/// Per-tensor scalars of one step, computed in f64 and rounded to f32 as `optim::adamw` does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWScalars {
    /// `1 − lr·wd`.
    pub decay: f32,
    /// `lr / (1 − β1^k)`.
    pub step_size: f32,
    /// `√(1 − β2^k)`.
    pub bc2_sqrt: f32,
}

impl AdamWScalars {
    /// Scalars for a tensor at its step `step` (1-based) with its group's `lr` and weight decay.
    pub fn new(lr: f64, weight_decay: f64, beta1: f64, beta2: f64, step: u64) -> Self {
        let k = step as f64;
        AdamWScalars {
            decay: (1.0 - lr * weight_decay) as f32,
            step_size: (lr / (1.0 - beta1.powf(k))) as f32,
            bc2_sqrt: (1.0 - beta2.powf(k)).sqrt() as f32,
        }
    }
}

/// One tensor of an [`adamw_step`]: its device buffers and scalars.
pub struct AdamWSlot<'a> {
    /// fp32 weights, updated in place.
    pub param: &'a mut DeviceBuffer<f32>,
    /// Gradient.
    pub grad: &'a DeviceBuffer<f32>,
    /// First moment.
    pub exp_avg: &'a mut DeviceBuffer<f32>,
    /// Second moment.
    pub exp_avg_sq: &'a mut DeviceBuffer<f32>,
    /// Receives the updated weights in bf16, if given.
    pub param_bf16: Option<&'a mut DeviceBuffer<bf16>>,
    /// This tensor's scalars.
    pub scalars: AdamWScalars,
}

/// One AdamW step over every slot, in one launch. Errors name the slot whose buffers disagree.
pub fn adamw_step(
    gpu: &Gpu,
    slots: &mut [AdamWSlot<'_>],
    beta1: f64,
    beta2: f64,
    eps: f64,
) -> Result<()> {
    const OP: &str = "cuda::adamw_step";
    let mut tab = Vec::with_capacity(slots.len());
    let mut chunks = 0usize;
    for (i, s) in slots.iter().enumerate() {
        let n = s.param.len();
        let bf = s.param_bf16.as_ref().map(|b| (b.len(), b.ptr()));
        if s.grad.len() != n
            || s.exp_avg.len() != n
            || s.exp_avg_sq.len() != n
            || bf.is_some_and(|b| b.0 != n)
        {
            return Err(Error::shape(
                OP,
                format!(
                    "slot {i}: param {n}, grad {}, exp_avg {}, exp_avg_sq {} elements",
                    s.grad.len(),
                    s.exp_avg.len(),
                    s.exp_avg_sq.len()
                ),
            ));
        }
        if n == 0 {
            continue;
        }
        tab.push(AdamWTensor {
            param: s.param.ptr(),
            grad: s.grad.ptr(),
            exp_avg: s.exp_avg.ptr(),
            exp_avg_sq: s.exp_avg_sq.ptr(),
            param_bf16: bf.map_or(0, |b| b.1),
            n: n as i64,
            chunk0: i32::try_from(chunks).map_err(|_| Error::shape(OP, "more than 2^31 chunks"))?,
            decay: s.scalars.decay,
            step_size: s.scalars.step_size,
            bc2_sqrt: s.scalars.bc2_sqrt,
        });
        chunks += n.div_ceil(CHUNK);
    }
    if tab.is_empty() {
        return Ok(());
    }
    // SAFETY: AdamWTensor is repr(C) plain data with no padding holes read by the kernel; its
    // bytes are what the kernel's struct expects.
    let bytes: &[u8] = unsafe {
        std::slice::from_raw_parts(
            tab.as_ptr() as *const u8,
            std::mem::size_of_val(tab.as_slice()),
        )
    };
    let table = gpu.upload(bytes)?;
    let k = gpu.kernel("optim", "adamw_update")?;
    let (pt, nt, ch) = (table.ptr(), tab.len() as i32, CHUNK as i32);
    let (w1, b2, w2, e) = (
        (1.0 - beta1) as f32,
        beta2 as f32,
        (1.0 - beta2) as f32,
        eps as f32,
    );
    let mut a = k.builder(gpu.stream());
    a.arg(&pt)
        .arg(&nt)
        .arg(&ch)
        .arg(&w1)
        .arg(&b2)
        .arg(&w2)
        .arg(&e);
    let dims = LaunchDims {
        grid: (chunks as u32, 1, 1),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    };
    // SAFETY: (const AdamWTensor*, int, int, float, float, float, float) as the kernel declares;
    // every table pointer addresses a live buffer of n elements (checked above).
    unsafe { k.launch(&mut a, dims) }
}

/// The CPU formula of one element (for checks): returns (p, m, v).
#[allow(clippy::too_many_arguments)]
pub fn adamw_reference(
    p: f32,
    g: f32,
    m: f32,
    v: f32,
    s: AdamWScalars,
    beta1: f64,
    beta2: f64,
    eps: f64,
) -> (f32, f32, f32) {
    let (w1, b2, w2, e) = (
        (1.0 - beta1) as f32,
        beta2 as f32,
        (1.0 - beta2) as f32,
        eps as f32,
    );
    let mut pv = p * s.decay;
    let mut mv = m;
    mv += w1 * (g - mv);
    let vv = v * b2 + w2 * g * g;
    let denom = vv.sqrt() / s.bc2_sqrt + e;
    pv += -s.step_size * mv / denom;
    (pv, mv, vv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_matches_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<AdamWTensor>(), 64);
        assert_eq!(std::mem::offset_of!(AdamWTensor, n), 40);
        assert_eq!(std::mem::offset_of!(AdamWTensor, chunk0), 48);
        assert_eq!(std::mem::offset_of!(AdamWTensor, bc2_sqrt), 60);
    }

    #[test]
    fn scalars_and_reference_follow_torch_adamw() {
        let s = AdamWScalars::new(1e-3, 0.04, 0.9, 0.999, 1);
        assert!((s.step_size - 1e-2).abs() < 1e-8);
        assert!((s.bc2_sqrt - (0.001f64).sqrt() as f32).abs() < 1e-7);
        // First step from zero moments: m = 0.1 g, v = 0.001 g², update = lr·sign(g) (ε aside).
        let (p, m, v) = adamw_reference(1.0, 0.5, 0.0, 0.0, s, 0.9, 0.999, 1e-8);
        assert!((m - 0.05).abs() < 1e-7 && (v - 0.00025).abs() < 1e-9);
        assert!((p - (1.0 * (1.0 - 4e-5) - 1e-3)).abs() < 1e-6, "{p}");
    }
}
