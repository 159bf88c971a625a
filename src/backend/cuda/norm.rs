//! GPU launches of `kernels/norm.cu` (CPU reference: `backend::cpu::norm`). Wrapped so far:
//! the layer norm forward of every ViT block. The kernel runs one warp per row of `[R, D]`
//! (D = 384 for ViT-S), bf16 in and out, fp32 statistics and affine parameters; it saves the
//! per-row mean and 1/σ for the backward.
//!
//! The module is looked up by name at run time: on a build whose kernel table has no `norm`
//! module, the call returns an error naming it (and the GPU check skips its row).

use super::alloc::DeviceBuffer;
use super::context::Gpu;
use super::module::LaunchDims;
use super::PushKernelArg;
use crate::error::{Error, Result};
use half::bf16;

/// Threads per block (8 rows, one warp each).
const THREADS: u32 = 256;

/// Outputs of [`layernorm_forward`].
pub struct LayerNormOut {
    /// Normalised rows `[R, D]`, bf16.
    pub y: DeviceBuffer<bf16>,
    /// Per-row mean `[R]`.
    pub mean: DeviceBuffer<f32>,
    /// Per-row `1/sqrt(var + eps)` `[R]`.
    pub rstd: DeviceBuffer<f32>,
}

/// `y = (x − mean)·rstd·γ + β` over the last dimension of `x [rows, d]`.
pub fn layernorm_forward(
    gpu: &Gpu,
    x: &DeviceBuffer<bf16>,
    gamma: &DeviceBuffer<f32>,
    beta: &DeviceBuffer<f32>,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<LayerNormOut> {
    const OP: &str = "cuda::layernorm_forward";
    if rows == 0 || d == 0 || x.len() != rows * d || gamma.len() != d || beta.len() != d {
        return Err(Error::shape(
            OP,
            format!(
                "x holds {}, gamma {}, beta {}: expected [{rows}, {d}], [{d}], [{d}] with rows, d > 0",
                x.len(),
                gamma.len(),
                beta.len()
            ),
        ));
    }
    if eps.is_nan() || eps < 0.0 {
        return Err(Error::invalid(OP, format!("eps {eps} must be >= 0")));
    }
    let i = |v: usize| i32::try_from(v).map_err(|_| Error::shape(OP, format!("{v} exceeds i32")));
    let (ri, di) = (i(rows)?, i(d)?);
    let out = LayerNormOut {
        y: gpu.alloc::<bf16>(rows * d)?,
        mean: gpu.alloc::<f32>(rows)?,
        rstd: gpu.alloc::<f32>(rows)?,
    };
    let k = gpu.kernel("norm", "layernorm_forward")?;
    let (px, pg, pb) = (x.ptr(), gamma.ptr(), beta.ptr());
    let (py, pm, pr) = (out.y.ptr(), out.mean.ptr(), out.rstd.ptr());
    let mut a = k.builder(gpu.stream());
    a.arg(&px)
        .arg(&pg)
        .arg(&pb)
        .arg(&py)
        .arg(&pm)
        .arg(&pr)
        .arg(&ri)
        .arg(&di)
        .arg(&eps);
    let dims = LaunchDims {
        grid: (rows.div_ceil((THREADS / 32) as usize) as u32, 1, 1),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    };
    // SAFETY: (const bf16*, const float*, const float*, bf16*, float*, float*, int, int, float)
    // as the kernel declares; sizes checked above; one warp per row.
    unsafe { k.launch(&mut a, dims)? };
    Ok(out)
}
