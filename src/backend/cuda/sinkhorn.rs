//! GPU launches of `kernels/sinkhorn.cu`: SwAV/Suave's Sinkhorn-Knopp codes from prototype
//! scores (CPU reference: `methods::sinkhorn`), all in fp32 (exp(S/0.05) reaches e^20).
//!
//! Two paths, as the kernel file explains: [`fused`] runs every iteration in one single-block
//! launch (one GPU, the small per-GPU problems of Suave), and [`per_iteration`] runs the
//! row-sum / column-update / codes kernels that a multi-GPU run interleaves with an all-reduce
//! of the row sums (here, on one GPU, there is nothing to reduce between them).

use super::alloc::DeviceBuffer;
use super::context::Gpu;
use super::module::LaunchDims;
use super::PushKernelArg;
use crate::error::{Error, Result};
use crate::methods::sinkhorn::SinkhornParams;

const MODULE: &str = "sinkhorn";

/// Checks the problem; returns `(B, K, 1/ε, iterations)` as the kernels take them.
fn prepare(
    op: &'static str,
    s: &DeviceBuffer<f32>,
    b: usize,
    k: usize,
    p: SinkhornParams,
) -> Result<(i32, i32, f32, i32)> {
    if !(p.epsilon > 0.0 && p.epsilon.is_finite()) {
        return Err(Error::invalid(
            op,
            format!("epsilon {} must be > 0", p.epsilon),
        ));
    }
    if b == 0 || k == 0 || s.len() != b * k {
        return Err(Error::shape(
            op,
            format!(
                "scores hold {} values, expected [{b}, {k}] with B, K > 0",
                s.len()
            ),
        ));
    }
    let i = |v: usize| i32::try_from(v).map_err(|_| Error::shape(op, format!("{v} exceeds i32")));
    Ok((i(b)?, i(k)?, (1.0 / p.epsilon) as f32, i(p.iterations)?))
}

/// Codes `Q [B, K]` (each row sums to 1) from scores `S [B, K]`, one launch, one block.
pub fn fused(
    gpu: &Gpu,
    scores: &DeviceBuffer<f32>,
    b: usize,
    k: usize,
    p: SinkhornParams,
) -> Result<DeviceBuffer<f32>> {
    let (bi, ki, inv_eps, it) = prepare("cuda::sinkhorn_fused", scores, b, k, p)?;
    let u = gpu.alloc::<f32>(k)?;
    let v = gpu.alloc::<f32>(b)?;
    let q = gpu.alloc::<f32>(b * k)?;
    let kf = gpu.kernel(MODULE, "sinkhorn_fused")?;
    let (ps, pu, pv, pq) = (scores.ptr(), u.ptr(), v.ptr(), q.ptr());
    let mut a = kf.builder(gpu.stream());
    a.arg(&ps)
        .arg(&pu)
        .arg(&pv)
        .arg(&pq)
        .arg(&bi)
        .arg(&ki)
        .arg(&inv_eps)
        .arg(&it);
    // SAFETY: (const float*, float*, float*, float*, int, int, float, int); u holds K, v B, S and
    // Q B·K floats.
    unsafe { kf.launch(&mut a, LaunchDims::rows(1, 1024, 0))? };
    Ok(q)
}

/// The same codes through the per-iteration kernels (the multi-GPU path, without the
/// all-reduce).
pub fn per_iteration(
    gpu: &Gpu,
    scores: &DeviceBuffer<f32>,
    b: usize,
    k: usize,
    p: SinkhornParams,
) -> Result<DeviceBuffer<f32>> {
    let (bi, ki, inv_eps, it) = prepare("cuda::sinkhorn_per_iteration", scores, b, k, p)?;
    if it == 0 {
        return Err(Error::invalid(
            "cuda::sinkhorn_per_iteration",
            "0 iterations: use the fused kernel (it handles the global normalisation)",
        ));
    }
    let r = gpu.alloc::<f32>(k)?;
    let v = gpu.alloc::<f32>(b)?;
    let q = gpu.alloc::<f32>(b * k)?;
    let b_total = b as f32;
    let rows = gpu.kernel(MODULE, "sinkhorn_row_sums")?;
    let cols = gpu.kernel(MODULE, "sinkhorn_col_update")?;
    let codes = gpu.kernel(MODULE, "sinkhorn_codes")?;
    let (ps, pr, pv, pq) = (scores.ptr(), r.ptr(), v.ptr(), q.ptr());
    let null = 0u64;
    let warp_rows = LaunchDims {
        grid: (b.div_ceil(8) as u32, 1, 1),
        block: (256, 1, 1),
        shared_bytes: 0,
    };
    for i in 0..it {
        let pv_in = if i == 0 { &null } else { &pv };
        let mut a = rows.builder(gpu.stream());
        a.arg(&ps)
            .arg(pv_in)
            .arg(&pr)
            .arg(&bi)
            .arg(&ki)
            .arg(&inv_eps);
        // SAFETY: (const float*, const float* or null, float*, int, int, float); sizes as above.
        unsafe { rows.launch(&mut a, LaunchDims::linear(k, 256, u32::MAX))? };
        let mut a = cols.builder(gpu.stream());
        a.arg(&ps)
            .arg(&pr)
            .arg(&pv)
            .arg(&bi)
            .arg(&ki)
            .arg(&inv_eps)
            .arg(&b_total);
        // SAFETY: one warp per sample row: 8 rows per 256-thread block.
        unsafe { cols.launch(&mut a, warp_rows)? };
    }
    let mut a = codes.builder(gpu.stream());
    a.arg(&ps)
        .arg(&pr)
        .arg(&pv)
        .arg(&pq)
        .arg(&bi)
        .arg(&ki)
        .arg(&inv_eps)
        .arg(&b_total);
    // SAFETY: one thread per code; sizes as above.
    unsafe { codes.launch(&mut a, LaunchDims::linear(b * k, 256, u32::MAX))? };
    Ok(q)
}
