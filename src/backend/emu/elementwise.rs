//! CPU launches of `kernels/elementwise.cu` (reference: `backend::cpu::elementwise` and
//! `backend::cpu::softmax`): GELU with fused bias, bias add and its gradient (a deterministic
//! column sum), drop path (and fused with the residual add), attention row softmax.

use super::{arg, as_i32, check_len, check_threads, launch_raw, LaunchConfig, Mode};
use crate::error::{Error, Result};
use half::bf16;
use std::ffi::c_void;

const MODULE: &str = "elementwise";

fn launch(mode: Mode, kernel: &str, cfg: LaunchConfig, args: &mut [*mut c_void]) -> Result<()> {
    // SAFETY: every caller below builds `args` in the kernel's parameter order and types, from
    // buffers whose lengths it has checked against the launch's shape.
    unsafe { launch_raw(mode, MODULE, kernel, cfg, args) }
}

/// Checks `[rows, cols]` and the block size; returns them as i32.
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

fn flat(n: usize, threads: u32) -> LaunchConfig {
    LaunchConfig::linear(n.div_ceil(threads as usize) as u32, threads, 0)
}

fn bias_ptr(op: &'static str, bias: Option<&[f32]>, c: usize) -> Result<*const f32> {
    match bias {
        Some(b) => {
            check_len(op, "bias", b.len(), c)?;
            Ok(b.as_ptr())
        }
        None => Ok(std::ptr::null()),
    }
}

/// `gelu_bias_forward`: `y = gelu(x + bias)` over `[r, c]` (bias `[c]`, optional).
pub fn gelu_bias_forward(
    mode: Mode,
    x: &[bf16],
    bias: Option<&[f32]>,
    r: usize,
    c: usize,
    threads: u32,
) -> Result<Vec<bf16>> {
    const OP: &str = "emu::gelu_bias_forward";
    let (ri, ci) = dims(OP, r, c, threads)?;
    check_len(OP, "x", x.len(), r * c)?;
    let pb = bias_ptr(OP, bias, c)?;
    let mut y = vec![bf16::ZERO; r * c];
    let (px, py) = (x.as_ptr(), y.as_mut_ptr());
    launch(
        mode,
        "gelu_bias_forward",
        flat(r * c, threads),
        &mut [arg(&px), arg(&pb), arg(&py), arg(&ri), arg(&ci)],
    )?;
    Ok(y)
}

/// `gelu_bias_backward`: `du = dy·gelu'(x + bias)`; the bias gradient is [`column_sum`] of du.
pub fn gelu_bias_backward(
    mode: Mode,
    dy: &[bf16],
    x: &[bf16],
    bias: Option<&[f32]>,
    r: usize,
    c: usize,
    threads: u32,
) -> Result<Vec<bf16>> {
    const OP: &str = "emu::gelu_bias_backward";
    let (ri, ci) = dims(OP, r, c, threads)?;
    check_len(OP, "dy", dy.len(), r * c)?;
    check_len(OP, "x", x.len(), r * c)?;
    let pb = bias_ptr(OP, bias, c)?;
    let mut du = vec![bf16::ZERO; r * c];
    let (pg, px, pd) = (dy.as_ptr(), x.as_ptr(), du.as_mut_ptr());
    launch(
        mode,
        "gelu_bias_backward",
        flat(r * c, threads),
        &mut [arg(&pg), arg(&px), arg(&pb), arg(&pd), arg(&ri), arg(&ci)],
    )?;
    Ok(du)
}

/// `bias_add`: `y = x + bias`, in place on `x` (the kernel allows y = x).
pub fn bias_add(
    mode: Mode,
    x: &mut [bf16],
    bias: &[f32],
    r: usize,
    c: usize,
    threads: u32,
) -> Result<()> {
    const OP: &str = "emu::bias_add";
    let (ri, ci) = dims(OP, r, c, threads)?;
    check_len(OP, "x", x.len(), r * c)?;
    let pb = bias_ptr(OP, Some(bias), c)?;
    let px = x.as_mut_ptr();
    launch(
        mode,
        "bias_add",
        flat(r * c, threads),
        &mut [arg(&px), arg(&pb), arg(&px), arg(&ri), arg(&ci)],
    )
}

/// `column_sum_partial` + `column_sum_finish`: `Σ_rows a` per column (the bias gradient), `rpb`
/// rows per block.
pub fn column_sum(
    mode: Mode,
    a: &[bf16],
    r: usize,
    c: usize,
    rpb: usize,
    threads: u32,
) -> Result<Vec<f32>> {
    const OP: &str = "emu::column_sum";
    let (ri, ci) = dims(OP, r, c, threads)?;
    check_len(OP, "a", a.len(), r * c)?;
    if rpb == 0 {
        return Err(Error::invalid(OP, "rows per block must be > 0"));
    }
    let g = r.div_ceil(rpb);
    let (gi, rpbi) = (as_i32(OP, "groups", g)?, as_i32(OP, "rows per block", rpb)?);
    let mut part = vec![f32::NAN; g * c];
    let (pa, pp) = (a.as_ptr(), part.as_mut_ptr());
    let cfg = LaunchConfig {
        grid: (c.div_ceil(32) as u32, g as u32, 1),
        block: (threads, 1, 1),
        shared_bytes: 0,
    };
    launch(
        mode,
        "column_sum_partial",
        cfg,
        &mut [arg(&pa), arg(&pp), arg(&ri), arg(&ci), arg(&rpbi)],
    )?;
    let mut out = vec![0.0f32; c];
    let (pp, po) = (part.as_ptr(), out.as_mut_ptr());
    launch(
        mode,
        "column_sum_finish",
        flat(c, threads),
        &mut [arg(&pp), arg(&po), arg(&gi), arg(&ci)],
    )?;
    Ok(out)
}

/// Checks a drop-path mask and probability; returns the mask as bytes and `1/(1 − p)`.
fn drop_args(op: &'static str, mask: &[bool], b: usize, drop_prob: f64) -> Result<(Vec<u8>, f32)> {
    check_len(op, "mask", mask.len(), b)?;
    if !(0.0..1.0).contains(&drop_prob) {
        return Err(Error::invalid(
            op,
            format!("drop probability {drop_prob} must be in [0, 1)"),
        ));
    }
    Ok((
        mask.iter().map(|&k| k as u8).collect(),
        (1.0 / (1.0 - drop_prob)) as f32,
    ))
}

/// `drop_path`: sample `i` of `x [b, m]` scaled by `mask[i]/(1 − p)` (forward on x, backward on dy).
pub fn drop_path(
    mode: Mode,
    x: &[bf16],
    mask: &[bool],
    drop_prob: f64,
    b: usize,
    m: usize,
    threads: u32,
) -> Result<Vec<bf16>> {
    const OP: &str = "emu::drop_path";
    let (bi, mi) = dims(OP, b, m, threads)?;
    check_len(OP, "x", x.len(), b * m)?;
    let (mk, inv_keep) = drop_args(OP, mask, b, drop_prob)?;
    let mut y = vec![bf16::ZERO; b * m];
    let (px, pm, py) = (x.as_ptr(), mk.as_ptr(), y.as_mut_ptr());
    launch(
        mode,
        "drop_path",
        flat(b * m, threads),
        &mut [
            arg(&px),
            arg(&pm),
            arg(&inv_keep),
            arg(&py),
            arg(&bi),
            arg(&mi),
        ],
    )?;
    Ok(y)
}

/// `drop_path_add`: `y = r + drop_path(x)`.
#[allow(clippy::too_many_arguments)]
pub fn drop_path_add(
    mode: Mode,
    r: &[bf16],
    x: &[bf16],
    mask: &[bool],
    drop_prob: f64,
    b: usize,
    m: usize,
    threads: u32,
) -> Result<Vec<bf16>> {
    const OP: &str = "emu::drop_path_add";
    let (bi, mi) = dims(OP, b, m, threads)?;
    check_len(OP, "r", r.len(), b * m)?;
    check_len(OP, "x", x.len(), b * m)?;
    let (mk, inv_keep) = drop_args(OP, mask, b, drop_prob)?;
    let mut y = vec![bf16::ZERO; b * m];
    let (pr, px, pm, py) = (r.as_ptr(), x.as_ptr(), mk.as_ptr(), y.as_mut_ptr());
    launch(
        mode,
        "drop_path_add",
        flat(b * m, threads),
        &mut [
            arg(&pr),
            arg(&px),
            arg(&pm),
            arg(&inv_keep),
            arg(&py),
            arg(&bi),
            arg(&mi),
        ],
    )?;
    Ok(y)
}

/// `attn_softmax_forward`: `P = softmax(scale·S)` per row of `[rows, n]`.
pub fn attn_softmax_forward(
    mode: Mode,
    s: &[bf16],
    rows: usize,
    n: usize,
    scale: f32,
    threads: u32,
) -> Result<Vec<bf16>> {
    const OP: &str = "emu::attn_softmax_forward";
    let (ri, ni) = dims(OP, rows, n, threads)?;
    check_len(OP, "scores", s.len(), rows * n)?;
    let mut p = vec![bf16::ZERO; rows * n];
    let (ps, pp) = (s.as_ptr(), p.as_mut_ptr());
    let cfg = LaunchConfig::linear(rows.div_ceil(threads as usize / 32) as u32, threads, 0);
    launch(
        mode,
        "attn_softmax_forward",
        cfg,
        &mut [arg(&ps), arg(&pp), arg(&ri), arg(&ni), arg(&scale)],
    )?;
    Ok(p)
}

/// `attn_softmax_backward`: `dS = scale·P·(dP − Σ P·dP)` per row.
pub fn attn_softmax_backward(
    mode: Mode,
    dp: &[bf16],
    p: &[bf16],
    rows: usize,
    n: usize,
    scale: f32,
    threads: u32,
) -> Result<Vec<bf16>> {
    const OP: &str = "emu::attn_softmax_backward";
    let (ri, ni) = dims(OP, rows, n, threads)?;
    check_len(OP, "dP", dp.len(), rows * n)?;
    check_len(OP, "P", p.len(), rows * n)?;
    let mut ds = vec![bf16::ZERO; rows * n];
    let (pg, pp, pd) = (dp.as_ptr(), p.as_ptr(), ds.as_mut_ptr());
    let cfg = LaunchConfig::linear(rows.div_ceil(threads as usize / 32) as u32, threads, 0);
    launch(
        mode,
        "attn_softmax_backward",
        cfg,
        &mut [
            arg(&pg),
            arg(&pp),
            arg(&pd),
            arg(&ri),
            arg(&ni),
            arg(&scale),
        ],
    )?;
    Ok(ds)
}
