//! CPU launches of `kernels/optim.cu`: multi-tensor LARS and AdamW, the teacher EMA and the DINO
//! centre update, with the descriptor tables and launch configurations the GPU runtime uses.
//!
//! The `#[repr(C)]` descriptors ([`LarsTensor`], [`AdamWTensor`], [`EmaTensor`]) are the exact
//! layout of the kernels' tables (pointers as 64-bit integers, so the same structs describe
//! device memory on the GPU and host memory here); [`chunk_layout`] assigns each tensor its
//! chunks and [`multi_tensor_config`] gives the grid. The safe wrappers take host slices, build
//! the table, and launch with the caller's chunk size and block size, so that tests can use
//! small, awkward ones; [`DEFAULT_CHUNK`] and [`DEFAULT_THREADS`] are the GPU's.

use super::{arg, as_i32, check_len, launch_raw, LaunchConfig, Mode};
use crate::error::{Error, Result};
use half::bf16;

/// Elements per block of the multi-tensor kernels on the GPU: about 1 500 blocks for
/// ResNet-50's 25.6 M parameters, 64 elements per thread at 256 threads.
pub const DEFAULT_CHUNK: usize = 16384;
/// Threads per block of the multi-tensor kernels on the GPU.
pub const DEFAULT_THREADS: u32 = 256;

/// One tensor of a LARS step (`optim_detail::LarsTensor`, 56 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LarsTensor {
    /// `float*`: fp32 master weights, updated in place.
    pub param: u64,
    /// `const float*`: the accumulated gradient.
    pub grad: u64,
    /// `float*`: the momentum buffer; must be zero before the tensor's first step (then the
    /// update gives `buf = d`, torch's first-step `clone`).
    pub mom: u64,
    /// `bf16*`: a bf16 copy of the updated weights, or 0 for none.
    pub param_bf16: u64,
    /// Elements.
    pub n: i64,
    /// Index of the tensor's first chunk (from [`chunk_layout`]).
    pub chunk0: i32,
    /// Learning rate of this step.
    pub lr: f32,
    /// Weight decay.
    pub weight_decay: f32,
    /// Padding to a multiple of 8 bytes.
    pub pad_: i32,
}

/// One tensor of an AdamW step (`optim_detail::AdamWTensor`, 64 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AdamWTensor {
    /// `float*`: fp32 master weights.
    pub param: u64,
    /// `const float*`: the gradient.
    pub grad: u64,
    /// `float*`: first moment (zero before the first step).
    pub exp_avg: u64,
    /// `float*`: second moment (zero before the first step).
    pub exp_avg_sq: u64,
    /// `bf16*`: a bf16 copy of the updated weights, or 0.
    pub param_bf16: u64,
    /// Elements.
    pub n: i64,
    /// Index of the tensor's first chunk.
    pub chunk0: i32,
    /// `1 − lr·wd` (see [`AdamWScalars`]).
    pub decay: f32,
    /// `lr / (1 − β1^k)`.
    pub step_size: f32,
    /// `√(1 − β2^k)`.
    pub bc2_sqrt: f32,
}

/// One (teacher, student) pair of the EMA (`optim_detail::EmaTensor`, 40 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EmaTensor {
    /// `float*`: the teacher's fp32 weights, updated in place.
    pub teacher: u64,
    /// `const float*`: the student's weights.
    pub student: u64,
    /// `bf16*`: a bf16 copy of the updated teacher, or 0.
    pub teacher_bf16: u64,
    /// Elements.
    pub n: i64,
    /// Index of the tensor's first chunk.
    pub chunk0: i32,
    /// Padding.
    pub pad_: i32,
}

/// The per-tensor scalars of one AdamW step, computed as `src/optim/adamw.rs` does (f64, then
/// rounded to f32) so that the kernel's f32 arithmetic is the CPU's.
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
    /// Scalars of the tensor's step number `step` (1-based: the count *after* this step) with its
    /// group's `lr` and `weight_decay`.
    pub fn new(lr: f64, weight_decay: f64, beta1: f64, beta2: f64, step: u64) -> Self {
        let k = step as f64;
        AdamWScalars {
            decay: (1.0 - lr * weight_decay) as f32,
            step_size: (lr / (1.0 - beta1.powf(k))) as f32,
            bc2_sqrt: (1.0 - beta2.powf(k)).sqrt() as f32,
        }
    }
}

/// First chunk of each tensor of `sizes` (elements) cut into chunks of `chunk` elements, and
/// the total number of chunks (= blocks of the launch). Empty tensors get no chunk.
pub fn chunk_layout(sizes: &[usize], chunk: usize) -> Result<(Vec<i32>, u32)> {
    const OP: &str = "emu::optim::chunk_layout";
    if chunk == 0 {
        return Err(Error::invalid(OP, "chunk size 0: use e.g. DEFAULT_CHUNK"));
    }
    let mut starts = Vec::with_capacity(sizes.len());
    let mut total = 0usize;
    for &n in sizes {
        starts.push(as_i32(OP, "chunk index", total)?);
        total += n.div_ceil(chunk);
    }
    as_i32(OP, "total chunks", total)?;
    Ok((starts, total as u32))
}

/// Grid and block of a multi-tensor launch over `total_chunks` chunks (no dynamic shared memory).
pub fn multi_tensor_config(total_chunks: u32, threads: u32) -> LaunchConfig {
    LaunchConfig::linear(total_chunks, threads, 0)
}

fn check_threads(op: &'static str, threads: u32) -> Result<()> {
    if threads == 0 || threads > 1024 || !threads.is_multiple_of(32) {
        return Err(Error::invalid(
            op,
            format!("{threads} threads per block: need a multiple of 32 in 32..=1024"),
        ));
    }
    Ok(())
}

fn bf16_ptr(op: &'static str, what: &str, b: &mut Option<&mut [bf16]>, n: usize) -> Result<u64> {
    match b {
        Some(s) => {
            check_len(op, what, s.len(), n)?;
            Ok(s.as_mut_ptr() as u64)
        }
        None => Ok(0),
    }
}

/// One tensor of [`lars_step`]: weights, gradient, momentum buffer, optional bf16 shadow.
#[derive(Debug)]
pub struct LarsSlot<'a> {
    /// fp32 weights, updated in place.
    pub param: &'a mut [f32],
    /// Gradient (same length).
    pub grad: &'a [f32],
    /// Momentum buffer (same length), zero before the first step.
    pub momentum_buf: &'a mut [f32],
    /// Receives the updated weights rounded to bf16, if given.
    pub param_bf16: Option<&'a mut [bf16]>,
    /// Learning rate.
    pub lr: f32,
    /// Weight decay.
    pub weight_decay: f32,
}

/// One LARS step over all `slots` (`lars_norms` then `lars_update`, one launch each), as
/// `src/optim/lars.rs` with momentum `momentum`, trust coefficient `eta` and `eps`.
pub fn lars_step(
    mode: Mode,
    slots: &mut [LarsSlot<'_>],
    momentum: f32,
    eta: f32,
    eps: f32,
    chunk: usize,
    threads: u32,
) -> Result<()> {
    const OP: &str = "emu::lars_step";
    check_threads(OP, threads)?;
    let slots: Vec<&mut LarsSlot<'_>> = slots.iter_mut().filter(|s| !s.param.is_empty()).collect();
    let sizes: Vec<usize> = slots.iter().map(|s| s.param.len()).collect();
    let (starts, total) = chunk_layout(&sizes, chunk)?;
    if total == 0 {
        return Ok(());
    }
    let mut tab = Vec::with_capacity(slots.len());
    for (s, c0) in slots.into_iter().zip(starts) {
        let n = s.param.len();
        check_len(OP, "gradient", s.grad.len(), n)?;
        check_len(OP, "momentum buffer", s.momentum_buf.len(), n)?;
        tab.push(LarsTensor {
            param: s.param.as_mut_ptr() as u64,
            grad: s.grad.as_ptr() as u64,
            mom: s.momentum_buf.as_mut_ptr() as u64,
            param_bf16: bf16_ptr(OP, "bf16 weights", &mut s.param_bf16, n)?,
            n: n as i64,
            chunk0: c0,
            lr: s.lr,
            weight_decay: s.weight_decay,
            pad_: 0,
        });
    }
    let mut partial = vec![0.0f64; 2 * total as usize];
    let (pt, nt, ch) = (tab.as_ptr(), tab.len() as i32, as_i32(OP, "chunk", chunk)?);
    let pp = partial.as_mut_ptr();
    let cfg = multi_tensor_config(total, threads);
    let mut args = [arg(&pt), arg(&nt), arg(&ch), arg(&pp)];
    // SAFETY: argument types follow lars_norms' signature; every table pointer addresses a
    // checked slice of n elements, and partial has 2 entries per chunk.
    unsafe { launch_raw(mode, "optim", "lars_norms", cfg, &mut args)? };
    let pc = partial.as_ptr();
    let mut args = [
        arg(&pt),
        arg(&nt),
        arg(&ch),
        arg(&pc),
        arg(&momentum),
        arg(&eta),
        arg(&eps),
    ];
    // SAFETY: as above, for lars_update.
    unsafe { launch_raw(mode, "optim", "lars_update", cfg, &mut args) }
}

/// One tensor of [`adamw_step`].
#[derive(Debug)]
pub struct AdamWSlot<'a> {
    /// fp32 weights, updated in place.
    pub param: &'a mut [f32],
    /// Gradient.
    pub grad: &'a [f32],
    /// First moment, zero before the first step.
    pub exp_avg: &'a mut [f32],
    /// Second moment, zero before the first step.
    pub exp_avg_sq: &'a mut [f32],
    /// Receives the updated weights rounded to bf16, if given.
    pub param_bf16: Option<&'a mut [bf16]>,
    /// This tensor's step scalars (group lr / wd, its step count).
    pub scalars: AdamWScalars,
}

/// One AdamW step over all `slots` in one launch (`adamw_update`), as `src/optim/adamw.rs`.
pub fn adamw_step(
    mode: Mode,
    slots: &mut [AdamWSlot<'_>],
    beta1: f64,
    beta2: f64,
    eps: f64,
    chunk: usize,
    threads: u32,
) -> Result<()> {
    const OP: &str = "emu::adamw_step";
    check_threads(OP, threads)?;
    let slots: Vec<&mut AdamWSlot<'_>> = slots.iter_mut().filter(|s| !s.param.is_empty()).collect();
    let sizes: Vec<usize> = slots.iter().map(|s| s.param.len()).collect();
    let (starts, total) = chunk_layout(&sizes, chunk)?;
    if total == 0 {
        return Ok(());
    }
    let mut tab = Vec::with_capacity(slots.len());
    for (s, c0) in slots.into_iter().zip(starts) {
        let n = s.param.len();
        check_len(OP, "gradient", s.grad.len(), n)?;
        check_len(OP, "exp_avg", s.exp_avg.len(), n)?;
        check_len(OP, "exp_avg_sq", s.exp_avg_sq.len(), n)?;
        tab.push(AdamWTensor {
            param: s.param.as_mut_ptr() as u64,
            grad: s.grad.as_ptr() as u64,
            exp_avg: s.exp_avg.as_mut_ptr() as u64,
            exp_avg_sq: s.exp_avg_sq.as_mut_ptr() as u64,
            param_bf16: bf16_ptr(OP, "bf16 weights", &mut s.param_bf16, n)?,
            n: n as i64,
            chunk0: c0,
            decay: s.scalars.decay,
            step_size: s.scalars.step_size,
            bc2_sqrt: s.scalars.bc2_sqrt,
        });
    }
    // As the CPU reference: (1 − β1), β2, (1 − β2), ε rounded to f32.
    let (w1, b2, w2, e) = (
        (1.0 - beta1) as f32,
        beta2 as f32,
        (1.0 - beta2) as f32,
        eps as f32,
    );
    let (pt, nt, ch) = (tab.as_ptr(), tab.len() as i32, as_i32(OP, "chunk", chunk)?);
    let mut args = [
        arg(&pt),
        arg(&nt),
        arg(&ch),
        arg(&w1),
        arg(&b2),
        arg(&w2),
        arg(&e),
    ];
    // SAFETY: argument types follow adamw_update's signature; table pointers address checked
    // slices of n elements.
    unsafe {
        launch_raw(
            mode,
            "optim",
            "adamw_update",
            multi_tensor_config(total, threads),
            &mut args,
        )
    }
}

/// One pair of [`ema_step`].
#[derive(Debug)]
pub struct EmaSlot<'a> {
    /// Teacher weights, updated in place.
    pub teacher: &'a mut [f32],
    /// Student weights.
    pub student: &'a [f32],
    /// Receives the updated teacher rounded to bf16, if given.
    pub teacher_bf16: Option<&'a mut [bf16]>,
}

/// The teacher EMA `t ← m·t + (1 − m)·s` over all pairs in one launch (`ema_update`), as
/// `src/optim/ema.rs` (both scalars rounded to f32).
pub fn ema_step(
    mode: Mode,
    slots: &mut [EmaSlot<'_>],
    momentum: f64,
    chunk: usize,
    threads: u32,
) -> Result<()> {
    const OP: &str = "emu::ema_step";
    if !(0.0..=1.0).contains(&momentum) {
        return Err(Error::invalid(
            OP,
            format!("momentum {momentum} is outside [0, 1]"),
        ));
    }
    check_threads(OP, threads)?;
    let slots: Vec<&mut EmaSlot<'_>> = slots.iter_mut().filter(|s| !s.teacher.is_empty()).collect();
    let sizes: Vec<usize> = slots.iter().map(|s| s.teacher.len()).collect();
    let (starts, total) = chunk_layout(&sizes, chunk)?;
    if total == 0 {
        return Ok(());
    }
    let mut tab = Vec::with_capacity(slots.len());
    for (s, c0) in slots.into_iter().zip(starts) {
        let n = s.teacher.len();
        check_len(OP, "student", s.student.len(), n)?;
        tab.push(EmaTensor {
            teacher: s.teacher.as_mut_ptr() as u64,
            student: s.student.as_ptr() as u64,
            teacher_bf16: bf16_ptr(OP, "bf16 teacher", &mut s.teacher_bf16, n)?,
            n: n as i64,
            chunk0: c0,
            pad_: 0,
        });
    }
    let (a, b) = (momentum as f32, (1.0 - momentum) as f32);
    let (pt, nt, ch) = (tab.as_ptr(), tab.len() as i32, as_i32(OP, "chunk", chunk)?);
    let mut args = [arg(&pt), arg(&nt), arg(&ch), arg(&a), arg(&b)];
    // SAFETY: argument types follow ema_update's signature; table pointers address checked slices.
    unsafe {
        launch_raw(
            mode,
            "optim",
            "ema_update",
            multi_tensor_config(total, threads),
            &mut args,
        )
    }
}

/// Grid and block of the centre kernels over `cols` columns.
pub fn center_config(cols: usize, threads: u32) -> LaunchConfig {
    LaunchConfig::linear(cols.div_ceil(threads.max(1) as usize) as u32, threads, 0)
}

fn colsum_args(
    op: &'static str,
    len: usize,
    rows: usize,
    cols: usize,
    colsum: &[f64],
    threads: u32,
) -> Result<(i32, i32)> {
    check_threads(op, threads)?;
    if cols == 0 {
        return Err(Error::shape(op, "teacher logits with 0 columns"));
    }
    check_len(op, "teacher logits", len, rows * cols)?;
    check_len(op, "column sums", colsum.len(), cols)?;
    Ok((as_i32(op, "rows", rows)?, as_i32(op, "columns", cols)?))
}

/// `dino_center_colsum_f32`: f64 column sums of the teacher's raw logits `[rows, cols]` into
/// `colsum` (added to it when `accumulate`), ready for the f64 all-reduce over ranks.
pub fn dino_center_colsum(
    mode: Mode,
    logits: &[f32],
    rows: usize,
    cols: usize,
    colsum: &mut [f64],
    accumulate: bool,
    threads: u32,
) -> Result<()> {
    const OP: &str = "emu::dino_center_colsum";
    let (r, c) = colsum_args(OP, logits.len(), rows, cols, colsum, threads)?;
    let (px, pc, acc) = (logits.as_ptr(), colsum.as_mut_ptr(), accumulate as i32);
    let mut args = [arg(&px), arg(&r), arg(&c), arg(&pc), arg(&acc)];
    // SAFETY: argument types follow the kernel; lengths checked above.
    unsafe {
        launch_raw(
            mode,
            "optim",
            "dino_center_colsum_f32",
            center_config(cols, threads),
            &mut args,
        )
    }
}

/// `dino_center_colsum_bf16`: as [`dino_center_colsum`] for bf16 logits.
pub fn dino_center_colsum_bf16(
    mode: Mode,
    logits: &[bf16],
    rows: usize,
    cols: usize,
    colsum: &mut [f64],
    accumulate: bool,
    threads: u32,
) -> Result<()> {
    const OP: &str = "emu::dino_center_colsum_bf16";
    let (r, c) = colsum_args(OP, logits.len(), rows, cols, colsum, threads)?;
    let (px, pc, acc) = (logits.as_ptr(), colsum.as_mut_ptr(), accumulate as i32);
    let mut args = [arg(&px), arg(&r), arg(&c), arg(&pc), arg(&acc)];
    // SAFETY: as dino_center_colsum; bf16 is 16-bit storage on both sides.
    unsafe {
        launch_raw(
            mode,
            "optim",
            "dino_center_colsum_bf16",
            center_config(cols, threads),
            &mut args,
        )
    }
}

/// `dino_center_update`: `c ← m·c + (1 − m)·colsum/n` with the all-reduced column sums, `n` =
/// views × batch × world size rows.
pub fn dino_center_update(
    mode: Mode,
    center: &mut [f32],
    colsum: &[f64],
    n: f64,
    momentum: f64,
    threads: u32,
) -> Result<()> {
    const OP: &str = "emu::dino_center_update";
    check_threads(OP, threads)?;
    if center.is_empty() {
        return Err(Error::shape(OP, "empty centre"));
    }
    check_len(OP, "column sums", colsum.len(), center.len())?;
    if !(n > 0.0 && n.is_finite()) {
        return Err(Error::invalid(
            OP,
            format!("row count {n} must be finite and > 0"),
        ));
    }
    let cols = as_i32(OP, "columns", center.len())?;
    let (pc, ps) = (center.as_mut_ptr(), colsum.as_ptr());
    let mut args = [arg(&pc), arg(&ps), arg(&cols), arg(&n), arg(&momentum)];
    // SAFETY: argument types follow the kernel; lengths checked above.
    unsafe {
        launch_raw(
            mode,
            "optim",
            "dino_center_update",
            center_config(center.len(), threads),
            &mut args,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_have_the_kernels_layout() {
        assert_eq!(std::mem::size_of::<LarsTensor>(), 56);
        assert_eq!(std::mem::size_of::<AdamWTensor>(), 64);
        assert_eq!(std::mem::size_of::<EmaTensor>(), 40);
    }

    #[test]
    fn chunks_are_prefix_sums_and_bad_sizes_are_errors() {
        let (s, t) = chunk_layout(&[10, 0, 1, 21], 10).unwrap();
        assert_eq!((s, t), (vec![0, 1, 1, 2], 5));
        assert!(chunk_layout(&[1], 0).is_err());
        let mut p = vec![0.0f32; 3];
        let g = vec![0.0f32; 2];
        let mut m = vec![0.0f32; 3];
        let mut slots = [LarsSlot {
            param: &mut p,
            grad: &g,
            momentum_buf: &mut m,
            param_bf16: None,
            lr: 0.1,
            weight_decay: 0.0,
        }];
        let e = lars_step(Mode::Fibers, &mut slots, 0.9, 1e-3, 1e-8, 4, 32).unwrap_err();
        assert!(e.to_string().contains("gradient"), "{e}");
    }
}
