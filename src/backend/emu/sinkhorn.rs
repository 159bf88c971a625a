//! CPU launches of `kernels/sinkhorn.cu`: the fused single-GPU Sinkhorn-Knopp and the
//! per-iteration steps for several ranks, with the launch configurations the GPU runtime uses
//! (block size left to the caller so tests can pick small, awkward ones).

use super::{arg, as_i32, check_len, check_threads, launch_raw, LaunchConfig, Mode};
use crate::error::{Error, Result};

/// Checks ε and the `[b, k]` scores; returns `(B, K, 1/ε)` as the kernels take them.
fn prepare(
    op: &'static str,
    scores: &[f32],
    b: usize,
    k: usize,
    epsilon: f64,
) -> Result<(i32, i32, f32)> {
    if b == 0 || k == 0 {
        return Err(Error::shape(
            op,
            format!("scores [{b}, {k}]: need at least one row and one prototype"),
        ));
    }
    if !(epsilon > 0.0 && epsilon.is_finite()) {
        return Err(Error::invalid(
            op,
            format!("epsilon {epsilon} must be finite and > 0"),
        ));
    }
    check_len(op, "scores", scores.len(), b * k)?;
    as_i32(op, "rows·prototypes", b * k)?;
    Ok((
        as_i32(op, "rows", b)?,
        as_i32(op, "prototypes", k)?,
        (1.0 / epsilon) as f32,
    ))
}

/// Output of [`sinkhorn_fused`]: the codes and the scaling vectors `Q = diag(v)·E·diag(u)·B`.
#[derive(Clone, Debug)]
pub struct SinkhornCodes {
    /// Codes `[B, K]`, each row summing to 1.
    pub codes: Vec<f32>,
    /// Prototype scaling `u[K]` of the last iteration.
    pub u: Vec<f32>,
    /// Sample scaling `v[B]` of the last iteration.
    pub v: Vec<f32>,
}

/// `sinkhorn_fused`: all iterations in one single-block launch (grid 1, block `threads`).
pub fn sinkhorn_fused(
    mode: Mode,
    scores: &[f32],
    b: usize,
    k: usize,
    epsilon: f64,
    iterations: usize,
    threads: u32,
) -> Result<SinkhornCodes> {
    const OP: &str = "emu::sinkhorn_fused";
    let (bi, ki, inv_eps) = prepare(OP, scores, b, k, epsilon)?;
    check_threads(OP, threads)?;
    let it = as_i32(OP, "iterations", iterations)?;
    let mut out = SinkhornCodes {
        codes: vec![0.0; b * k],
        u: vec![0.0; k],
        v: vec![0.0; b],
    };
    let (ps, pu, pv, pq) = (
        scores.as_ptr(),
        out.u.as_mut_ptr(),
        out.v.as_mut_ptr(),
        out.codes.as_mut_ptr(),
    );
    let mut args = [
        arg(&ps),
        arg(&pu),
        arg(&pv),
        arg(&pq),
        arg(&bi),
        arg(&ki),
        arg(&inv_eps),
        arg(&it),
    ];
    // SAFETY: argument types follow the kernel's signature; buffers have the checked lengths.
    unsafe {
        launch_raw(
            mode,
            "sinkhorn",
            "sinkhorn_fused",
            LaunchConfig::linear(1, threads, 0),
            &mut args,
        )?
    };
    Ok(out)
}

/// `sinkhorn_row_sums`: `r[k] = Σ_b E[b,k]·v_b` over the local rows (`v = None`: all ones).
pub fn sinkhorn_row_sums(
    mode: Mode,
    scores: &[f32],
    v: Option<&[f32]>,
    b: usize,
    k: usize,
    epsilon: f64,
    threads: u32,
) -> Result<Vec<f32>> {
    const OP: &str = "emu::sinkhorn_row_sums";
    let (bi, ki, inv_eps) = prepare(OP, scores, b, k, epsilon)?;
    check_threads(OP, threads)?;
    if let Some(v) = v {
        check_len(OP, "v", v.len(), b)?;
    }
    let mut r = vec![0.0f32; k];
    let (ps, pv, pr) = (
        scores.as_ptr(),
        v.map_or(std::ptr::null(), |v| v.as_ptr()),
        r.as_mut_ptr(),
    );
    let mut args = [
        arg(&ps),
        arg(&pv),
        arg(&pr),
        arg(&bi),
        arg(&ki),
        arg(&inv_eps),
    ];
    let cfg = LaunchConfig::linear(k.div_ceil(threads as usize) as u32, threads, 0);
    // SAFETY: as in sinkhorn_fused; a null v is the kernel's "all ones".
    unsafe { launch_raw(mode, "sinkhorn", "sinkhorn_row_sums", cfg, &mut args)? };
    Ok(r)
}

/// `sinkhorn_col_update`: `v_b = 1/(b_total·Σ_k E[b,k]/(K·r_k))` from all-reduced row sums `r`.
#[allow(clippy::too_many_arguments)]
pub fn sinkhorn_col_update(
    mode: Mode,
    scores: &[f32],
    r: &[f32],
    b: usize,
    k: usize,
    epsilon: f64,
    b_total: usize,
    threads: u32,
) -> Result<Vec<f32>> {
    const OP: &str = "emu::sinkhorn_col_update";
    let (bi, ki, inv_eps) = prepare(OP, scores, b, k, epsilon)?;
    check_threads(OP, threads)?;
    check_len(OP, "r", r.len(), k)?;
    let mut v = vec![0.0f32; b];
    let bt = b_total as f32;
    let (ps, pr, pv) = (scores.as_ptr(), r.as_ptr(), v.as_mut_ptr());
    let mut args = [
        arg(&ps),
        arg(&pr),
        arg(&pv),
        arg(&bi),
        arg(&ki),
        arg(&inv_eps),
        arg(&bt),
    ];
    let cfg = LaunchConfig::linear(b.div_ceil(threads as usize / 32) as u32, threads, 0);
    // SAFETY: as in sinkhorn_fused.
    unsafe { launch_raw(mode, "sinkhorn", "sinkhorn_col_update", cfg, &mut args)? };
    Ok(v)
}

/// `sinkhorn_codes`: `Q[b,k] = E[b,k]/(K·r_k)·v_b·b_total`.
#[allow(clippy::too_many_arguments)]
pub fn sinkhorn_codes(
    mode: Mode,
    scores: &[f32],
    r: &[f32],
    v: &[f32],
    b: usize,
    k: usize,
    epsilon: f64,
    b_total: usize,
    threads: u32,
) -> Result<Vec<f32>> {
    const OP: &str = "emu::sinkhorn_codes";
    let (bi, ki, inv_eps) = prepare(OP, scores, b, k, epsilon)?;
    check_threads(OP, threads)?;
    check_len(OP, "r", r.len(), k)?;
    check_len(OP, "v", v.len(), b)?;
    let mut q = vec![0.0f32; b * k];
    let bt = b_total as f32;
    let (ps, pr, pv, pq) = (scores.as_ptr(), r.as_ptr(), v.as_ptr(), q.as_mut_ptr());
    let mut args = [
        arg(&ps),
        arg(&pr),
        arg(&pv),
        arg(&pq),
        arg(&bi),
        arg(&ki),
        arg(&inv_eps),
        arg(&bt),
    ];
    let cfg = LaunchConfig::linear((b * k).div_ceil(threads as usize) as u32, threads, 0);
    // SAFETY: as in sinkhorn_fused.
    unsafe { launch_raw(mode, "sinkhorn", "sinkhorn_codes", cfg, &mut args)? };
    Ok(q)
}
