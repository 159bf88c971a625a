//! CPU launches of `kernels/mixup.cu`: Mixup / CutMix of an NHWC batch with its reversed self
//! (`mix_batch_f32`, `mix_batch_bf16`) and the soft targets (`mixup_targets`), with the sampled
//! [`MixParams`] of `src/data/mixup.rs` as input and the launch configuration the GPU uses.

use super::{arg, as_i32, check_len, launch_raw, LaunchConfig, Mode};
use crate::data::mixup::MixParams;
use crate::error::{Error, Result};
use half::bf16;

/// Threads per block of the mixup kernels on the GPU.
pub const DEFAULT_THREADS: u32 = 256;
/// Most blocks per image (grid.x) of a `mix_batch` launch: a grid-stride loop covers the rest.
pub const MAX_BLOCKS_PER_IMAGE: usize = 1024;

/// Grid and block of `mix_batch_*` on a batch of `batch` images of `per_image` elements:
/// grid.y is the image, grid.x covers its elements.
pub fn mix_config(batch: usize, per_image: usize, threads: u32) -> LaunchConfig {
    let blocks = per_image
        .div_ceil(threads.max(1) as usize)
        .clamp(1, MAX_BLOCKS_PER_IMAGE);
    LaunchConfig {
        grid: (blocks as u32, batch as u32, 1),
        block: (threads, 1, 1),
        shared_bytes: 0,
    }
}

/// The kernel's scalar arguments for `p` on an `h x w` image: (cutmix, y_lo, y_hi, x_lo, x_hi).
fn box_args(op: &'static str, p: &MixParams, h: usize, w: usize) -> Result<[i32; 5]> {
    match p.cutmix_box {
        None => Ok([0; 5]),
        Some((yl, yh, xl, xh)) => {
            if yl > yh || yh > h || xl > xh || xh > w {
                return Err(Error::invalid(
                    op,
                    format!("CutMix box rows {yl}..{yh}, columns {xl}..{xh} is not inside {h}x{w}"),
                ));
            }
            Ok([1, yl as i32, yh as i32, xl as i32, xh as i32])
        }
    }
}

fn check(op: &'static str, shape: [usize; 4], lens: [usize; 3], threads: u32) -> Result<[i32; 4]> {
    if threads == 0 || threads > 1024 || !threads.is_multiple_of(32) {
        return Err(Error::invalid(
            op,
            format!("{threads} threads per block: need a multiple of 32 in 32..=1024"),
        ));
    }
    let n: usize = shape.iter().product();
    for (what, len) in ["x1", "x2", "out"].iter().zip(lens) {
        check_len(op, what, len, n)?;
    }
    if shape[0] > 65535 {
        return Err(Error::invalid(
            op,
            format!(
                "batch of {} images: at most 65535 per launch (grid.y)",
                shape[0]
            ),
        ));
    }
    as_i32(op, "image elements", shape[1] * shape[2] * shape[3])?;
    Ok([
        as_i32(op, "batch", shape[0])?,
        as_i32(op, "height", shape[1])?,
        as_i32(op, "width", shape[2])?,
        as_i32(op, "channels", shape[3])?,
    ])
}

/// `out[i] = mix(x1[i], x2[B-1-i])` on `[B, H, W, C]` f32 batches (`shape`), as
/// `src/data/mixup.rs::mix_batch`. `out` is a separate buffer (e.g. the second half of the
/// extended labelled batch).
pub fn mix_batch(
    mode: Mode,
    x1: &[f32],
    x2: &[f32],
    out: &mut [f32],
    shape: [usize; 4],
    p: &MixParams,
    threads: u32,
) -> Result<()> {
    const OP: &str = "emu::mix_batch";
    let [b, h, w, c] = check(OP, shape, [x1.len(), x2.len(), out.len()], threads)?;
    let [cm, yl, yh, xl, xh] = box_args(OP, p, shape[1], shape[2])?;
    if out.is_empty() {
        return Ok(());
    }
    let (p1, p2, po, l) = (x1.as_ptr(), x2.as_ptr(), out.as_mut_ptr(), p.lambda);
    let mut args = [
        arg(&p1),
        arg(&p2),
        arg(&po),
        arg(&b),
        arg(&h),
        arg(&w),
        arg(&c),
        arg(&l),
        arg(&cm),
        arg(&yl),
        arg(&yh),
        arg(&xl),
        arg(&xh),
    ];
    // SAFETY: argument types follow mix_batch_f32; the three buffers have B·H·W·C elements.
    unsafe {
        launch_raw(
            mode,
            "mixup",
            "mix_batch_f32",
            mix_config(shape[0], shape[1] * shape[2] * shape[3], threads),
            &mut args,
        )
    }
}

/// [`mix_batch`] on bf16 batches (computed in f32, rounded once).
pub fn mix_batch_bf16(
    mode: Mode,
    x1: &[bf16],
    x2: &[bf16],
    out: &mut [bf16],
    shape: [usize; 4],
    p: &MixParams,
    threads: u32,
) -> Result<()> {
    const OP: &str = "emu::mix_batch_bf16";
    let [b, h, w, c] = check(OP, shape, [x1.len(), x2.len(), out.len()], threads)?;
    let [cm, yl, yh, xl, xh] = box_args(OP, p, shape[1], shape[2])?;
    if out.is_empty() {
        return Ok(());
    }
    let (p1, p2, po, l) = (x1.as_ptr(), x2.as_ptr(), out.as_mut_ptr(), p.lambda);
    let mut args = [
        arg(&p1),
        arg(&p2),
        arg(&po),
        arg(&b),
        arg(&h),
        arg(&w),
        arg(&c),
        arg(&l),
        arg(&cm),
        arg(&yl),
        arg(&yh),
        arg(&xl),
        arg(&xh),
    ];
    // SAFETY: as mix_batch; bf16 is 16-bit storage on both sides.
    unsafe {
        launch_raw(
            mode,
            "mixup",
            "mix_batch_bf16",
            mix_config(shape[0], shape[1] * shape[2] * shape[3], threads),
            &mut args,
        )
    }
}

/// `mixup_targets`: `[B, classes]` soft targets `λ onehot(y) + (1-λ) onehot(flip(y))` with label
/// smoothing, as `src/data/mixup.rs::mixup_targets`.
pub fn mixup_targets(
    mode: Mode,
    labels: &[usize],
    classes: usize,
    lambda: f32,
    smoothing: f32,
    threads: u32,
) -> Result<Vec<f32>> {
    const OP: &str = "emu::mixup_targets";
    if threads == 0 || threads > 1024 || !threads.is_multiple_of(32) {
        return Err(Error::invalid(
            OP,
            format!("{threads} threads per block: need a multiple of 32 in 32..=1024"),
        ));
    }
    if labels.is_empty() || classes == 0 {
        return Err(Error::shape(
            OP,
            format!(
                "{} labels, {classes} classes: need at least one of each",
                labels.len()
            ),
        ));
    }
    if let Some(&y) = labels.iter().find(|&&y| y >= classes) {
        return Err(Error::invalid(
            OP,
            format!("label {y} is not below the {classes} classes"),
        ));
    }
    let ys: Vec<i32> = labels.iter().map(|&y| y as i32).collect();
    let (b, k) = (
        as_i32(OP, "batch", labels.len())?,
        as_i32(OP, "classes", classes)?,
    );
    as_i32(OP, "batch x classes", labels.len() * classes)?;
    let mut out = vec![0.0f32; labels.len() * classes];
    let (py, po) = (ys.as_ptr(), out.as_mut_ptr());
    let mut args = [
        arg(&py),
        arg(&b),
        arg(&k),
        arg(&lambda),
        arg(&smoothing),
        arg(&po),
    ];
    let cfg = LaunchConfig::linear(out.len().div_ceil(threads as usize) as u32, threads, 0);
    // SAFETY: argument types follow mixup_targets; labels are in range, out has B·classes entries.
    unsafe { launch_raw(mode, "mixup", "mixup_targets", cfg, &mut args)? };
    Ok(out)
}
