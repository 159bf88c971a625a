//! Device ops of `kernels/optim.cu`, the optimiser side of a training step: multi-tensor LARS
//! (Suave), multi-tensor AdamW and the teacher EMA (Daino), and the two passes of the DINO centre
//! update. One generic wrapper per kernel, run by the GPU and by the CPU emulation alike.
//!
//! CPU references (what the tests and the device check compare with):
//! * [`lars_norms`] + [`lars_update`] ([`lars_step`]): `optim::Lars::step`;
//! * [`adamw_step`] (`adamw_update`): `optim::AdamW::step` (per-tensor scalars: [`AdamWScalars`]);
//! * [`ema_step`] (`ema_update`): `optim::ema_update`;
//! * [`dino_center_colsum`] / [`dino_center_colsum_accumulate`] (`dino_center_colsum_f32`,
//!   `dino_center_colsum_bf16`) and [`dino_center_update`]: `methods::dino_loss::DinoCenter::update`
//!   (the column sums are all-reduced over ranks between the two passes).
//!
//! Multi-tensor layout (see the kernel file): every call builds a table of per-tensor descriptors
//! (pointers as 64-bit integers, element counts, first chunk, per-tensor hyper-parameters) and
//! uploads it as `u64` words ([`Exec::upload`]), every tensor cut into chunks of `chunk` elements,
//! one block per chunk, so one launch covers the whole model. The words are packed here in the
//! kernel structs' exact layout (little-endian, `int`/`float` pairs sharing a word), so the same
//! table works in device memory and in the emulation's host memory. Empty tensors get no chunk.
//! State buffers (LARS momentum, AdamW moments) must be zero before a tensor's first step, as
//! the CPU optimisers start them: the caller owns them, so it allocates them with
//! [`Exec::zeros`]. Outputs created here (LARS partial norms, column sums) are written in full by
//! their kernel, so they come from [`Exec::alloc`].

use super::check::{random, round_bf16, Checker, Measured, TOL_F32};
use super::{as_i32, check_len, check_threads, DevBuf, Elem, Exec, KArg, LaunchConfig};
use crate::dist::SingleProcess;
use crate::error::{Error, Result};
use crate::methods::dino_loss::DinoCenter;
use crate::nn::{Kind, ParamStore};
use crate::optim::{dino_group, ema_update, AdamW, AdamWState, Lars};
use crate::tensor::Tensor;
use crate::testing::rel_l2;
use half::bf16;
use serde_json::json;
use std::collections::BTreeMap;

/// The kernel module.
const MODULE: &str = "optim";

/// Elements per block of the multi-tensor kernels on the GPU: about 1 600 blocks for
/// ResNet-50's 25.5 M parameters, 64 elements per thread at [`THREADS`].
pub const CHUNK: usize = 16384;
/// Threads per block of the multi-tensor kernels (the kernel file's recommendation).
pub const THREADS: u32 = 256;
/// Threads per block of the DINO centre kernels (one thread per column).
pub const CENTER_THREADS: u32 = 256;

/// 64-bit words of `optim_detail::LarsTensor` (56 bytes).
const LARS_WORDS: usize = 7;
/// 64-bit words of `optim_detail::AdamWTensor` (64 bytes).
const ADAMW_WORDS: usize = 8;
/// 64-bit words of `optim_detail::EmaTensor` (40 bytes).
const EMA_WORDS: usize = 5;

/// Two 32-bit fields sharing one 64-bit word of a descriptor (the first in the low half, as a
/// little-endian `struct { int a; float b; }` lays them out; GPUs and x86 are little-endian).
fn pair(lo: u32, hi: u32) -> u64 {
    u64::from(lo) | (u64::from(hi) << 32)
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
    /// Scalars of the tensor's step number `step` (1-based: the count *after* this step) with
    /// its group's `lr` and `weight_decay`.
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
    const OP: &str = "device::optim::chunk_layout";
    if chunk == 0 {
        return Err(Error::invalid(OP, "chunk size 0: use e.g. CHUNK"));
    }
    as_i32(OP, "chunk size", chunk)?;
    let mut starts = Vec::with_capacity(sizes.len());
    let mut total = 0usize;
    for &n in sizes {
        starts.push(as_i32(OP, "chunk index", total)?);
        total += n.div_ceil(chunk);
    }
    as_i32(OP, "total chunks", total)?;
    Ok((starts, total as u32))
}

/// Grid and block of a multi-tensor launch over `total_chunks` chunks (no dynamic shared
/// memory: the norms' reduction uses a static 32-entry scratch).
pub fn multi_tensor_config(total_chunks: u32, threads: u32) -> LaunchConfig {
    LaunchConfig::linear(total_chunks, threads, 0)
}

/// Grid and block of the centre kernels over `cols` columns (one thread per column).
pub fn center_config(cols: usize, threads: u32) -> LaunchConfig {
    LaunchConfig::linear(cols.div_ceil(threads.max(1) as usize) as u32, threads, 0)
}

/// Address of an optional bf16 shadow of `n` elements, or 0 (the kernels' "none").
fn shadow_addr<B: DevBuf<bf16>>(
    op: &'static str,
    what: &str,
    b: &Option<&mut B>,
    n: usize,
) -> Result<u64> {
    match b {
        Some(s) => {
            check_len(op, what, s.len(), n)?;
            Ok(s.addr())
        }
        None => Ok(0),
    }
}

/// An uploaded descriptor table and the launch geometry it implies.
struct Table<B> {
    /// The descriptors, as 64-bit words.
    words: B,
    /// Descriptors in the table (non-empty tensors).
    ntensors: i32,
    /// Chunks over all tensors (blocks of the launch).
    total: u32,
    /// Elements per chunk.
    chunk: i32,
}

impl<B: DevBuf<u64>> Table<B> {
    /// The first three kernel arguments: `(const Tensor* tab, int ntensors, int chunk)`.
    fn args(&self) -> [KArg; 3] {
        [self.words.arg(), self.ntensors.into(), self.chunk.into()]
    }
}

/// Builds and uploads a table: `sizes` are every slot's element count (empty ones skipped),
/// `fill(slot, chunk0, words)` writes one descriptor. `None` when there is nothing to update.
fn build_table<E: Exec>(
    ex: &E,
    op: &'static str,
    sizes: &[usize],
    chunk: usize,
    words_per: usize,
    mut fill: impl FnMut(usize, i32, &mut Vec<u64>),
) -> Result<Option<Table<E::Buf<u64>>>> {
    let live: Vec<usize> = (0..sizes.len()).filter(|&i| sizes[i] > 0).collect();
    let live_sizes: Vec<usize> = live.iter().map(|&i| sizes[i]).collect();
    let (starts, total) = chunk_layout(&live_sizes, chunk)?;
    if total == 0 {
        return Ok(None);
    }
    let mut words = Vec::with_capacity(live.len() * words_per);
    for (&i, c0) in live.iter().zip(starts) {
        fill(i, c0, &mut words);
    }
    debug_assert_eq!(words.len(), live.len() * words_per);
    Ok(Some(Table {
        words: ex.upload::<u64>(&words)?,
        ntensors: as_i32(op, "tensors", live.len())?,
        total,
        chunk: as_i32(op, "chunk", chunk)?,
    }))
}

/// One tensor of a LARS step: weights, gradient, momentum buffer, optional bf16 shadow.
pub struct LarsSlot<'a, E: Exec> {
    /// fp32 weights, updated in place.
    pub param: &'a mut E::Buf<f32>,
    /// Gradient (same length).
    pub grad: &'a E::Buf<f32>,
    /// Momentum buffer (same length), zero before the tensor's first step ([`Exec::zeros`]).
    pub momentum_buf: &'a mut E::Buf<f32>,
    /// Receives the updated weights rounded to bf16, if given (may be [`Exec::alloc`]ed).
    pub param_bf16: Option<&'a mut E::Buf<bf16>>,
    /// Learning rate of this step.
    pub lr: f32,
    /// Weight decay.
    pub weight_decay: f32,
}

/// Checks every slot's lengths and builds the LARS table.
fn lars_table<E: Exec>(
    ex: &E,
    op: &'static str,
    slots: &[LarsSlot<'_, E>],
    chunk: usize,
) -> Result<Option<Table<E::Buf<u64>>>> {
    let mut shadows = Vec::with_capacity(slots.len());
    for (i, s) in slots.iter().enumerate() {
        let n = s.param.len();
        check_len(op, &format!("slot {i} gradient"), s.grad.len(), n)?;
        check_len(
            op,
            &format!("slot {i} momentum buffer"),
            s.momentum_buf.len(),
            n,
        )?;
        shadows.push(shadow_addr(
            op,
            &format!("slot {i} bf16 weights"),
            &s.param_bf16,
            n,
        )?);
    }
    let sizes: Vec<usize> = slots.iter().map(|s| s.param.len()).collect();
    build_table(ex, op, &sizes, chunk, LARS_WORDS, |i, c0, w| {
        let s = &slots[i];
        w.extend_from_slice(&[
            s.param.addr(),
            s.grad.addr(),
            s.momentum_buf.addr(),
            shadows[i],
            s.param.len() as u64,
            pair(c0 as u32, s.lr.to_bits()),
            pair(s.weight_decay.to_bits(), 0),
        ]);
    })
}

/// Launches `lars_norms` over an uploaded table; the partial sums (2 per chunk) come back.
fn launch_lars_norms<E: Exec>(
    ex: &E,
    tab: &Table<E::Buf<u64>>,
    threads: u32,
) -> Result<E::Buf<f64>> {
    let partial = ex.alloc::<f64>(2 * tab.total as usize)?;
    let [t, nt, ch] = tab.args();
    let args = [t, nt, ch, partial.arg()];
    // SAFETY: (const LarsTensor*, int, int, double*) as the kernel declares; every descriptor
    // addresses buffers of its n elements (lengths checked when the table was built) and
    // partial holds 2 doubles per chunk of the grid, each written by its block.
    unsafe {
        ex.launch(
            MODULE,
            "lars_norms",
            multi_tensor_config(tab.total, threads),
            &args,
        )?
    };
    Ok(partial)
}

/// Launches `lars_update` over an uploaded table with the partial sums of `lars_norms`.
fn launch_lars_update<E: Exec>(
    ex: &E,
    tab: &Table<E::Buf<u64>>,
    partial: &E::Buf<f64>,
    momentum: f32,
    eta: f32,
    eps: f32,
    threads: u32,
) -> Result<()> {
    check_len(
        "device::lars_update",
        "partial norms",
        partial.len(),
        2 * tab.total as usize,
    )?;
    let [t, nt, ch] = tab.args();
    let args = [
        t,
        nt,
        ch,
        partial.arg(),
        momentum.into(),
        eta.into(),
        eps.into(),
    ];
    // SAFETY: (const LarsTensor*, int, int, const double*, float, float, float) as the kernel
    // declares; descriptors address checked buffers, partial has 2 entries per chunk.
    unsafe {
        ex.launch(
            MODULE,
            "lars_update",
            multi_tensor_config(tab.total, threads),
            &args,
        )
    }
}

/// `lars_norms`: per-chunk partial sums of squares of the weights and gradients of `slots`
/// (f64 `[2 × chunks]`: `Σp²` then `Σg²` of each chunk, chunks as [`chunk_layout`] assigns
/// them), the first pass of a LARS step. Empty when every tensor is empty.
pub fn lars_norms<E: Exec>(
    ex: &E,
    slots: &[LarsSlot<'_, E>],
    chunk: usize,
    threads: u32,
) -> Result<E::Buf<f64>> {
    const OP: &str = "device::lars_norms";
    check_threads(OP, threads)?;
    match lars_table(ex, OP, slots, chunk)? {
        Some(tab) => launch_lars_norms(ex, &tab, threads),
        None => ex.alloc(0),
    }
}

/// `lars_update`: the second pass of a LARS step (trust ratio from each tensor's norms, then the
/// momentum update), with `partial` from [`lars_norms`] over the same slots and chunk.
#[allow(clippy::too_many_arguments)]
pub fn lars_update<E: Exec>(
    ex: &E,
    slots: &mut [LarsSlot<'_, E>],
    partial: &E::Buf<f64>,
    momentum: f32,
    eta: f32,
    eps: f32,
    chunk: usize,
    threads: u32,
) -> Result<()> {
    const OP: &str = "device::lars_update";
    check_threads(OP, threads)?;
    match lars_table(ex, OP, slots, chunk)? {
        Some(tab) => launch_lars_update(ex, &tab, partial, momentum, eta, eps, threads),
        None => check_len(OP, "partial norms", partial.len(), 0),
    }
}

/// One LARS step over all `slots` (`lars_norms` then `lars_update`, one table upload, two
/// launches), as `optim::Lars::step` with momentum `momentum`, trust coefficient `eta`, `eps`.
#[allow(clippy::too_many_arguments)]
pub fn lars_step<E: Exec>(
    ex: &E,
    slots: &mut [LarsSlot<'_, E>],
    momentum: f32,
    eta: f32,
    eps: f32,
    chunk: usize,
    threads: u32,
) -> Result<()> {
    const OP: &str = "device::lars_step";
    check_threads(OP, threads)?;
    let Some(tab) = lars_table(ex, OP, slots, chunk)? else {
        return Ok(());
    };
    let partial = launch_lars_norms(ex, &tab, threads)?;
    launch_lars_update(ex, &tab, &partial, momentum, eta, eps, threads)
}

/// One tensor of [`adamw_step`].
pub struct AdamWSlot<'a, E: Exec> {
    /// fp32 weights, updated in place.
    pub param: &'a mut E::Buf<f32>,
    /// Gradient.
    pub grad: &'a E::Buf<f32>,
    /// First moment, zero before the first step ([`Exec::zeros`]).
    pub exp_avg: &'a mut E::Buf<f32>,
    /// Second moment, zero before the first step.
    pub exp_avg_sq: &'a mut E::Buf<f32>,
    /// Receives the updated weights rounded to bf16, if given.
    pub param_bf16: Option<&'a mut E::Buf<bf16>>,
    /// This tensor's step scalars (group lr / wd, its own step count).
    pub scalars: AdamWScalars,
}

/// `adamw_update`: one AdamW step over all `slots` in one launch, as `optim::AdamW::step`
/// (torch's single-tensor path).
pub fn adamw_step<E: Exec>(
    ex: &E,
    slots: &mut [AdamWSlot<'_, E>],
    beta1: f64,
    beta2: f64,
    eps: f64,
    chunk: usize,
    threads: u32,
) -> Result<()> {
    const OP: &str = "device::adamw_step";
    check_threads(OP, threads)?;
    let mut shadows = Vec::with_capacity(slots.len());
    for (i, s) in slots.iter().enumerate() {
        let n = s.param.len();
        check_len(OP, &format!("slot {i} gradient"), s.grad.len(), n)?;
        check_len(OP, &format!("slot {i} exp_avg"), s.exp_avg.len(), n)?;
        check_len(OP, &format!("slot {i} exp_avg_sq"), s.exp_avg_sq.len(), n)?;
        shadows.push(shadow_addr(
            OP,
            &format!("slot {i} bf16 weights"),
            &s.param_bf16,
            n,
        )?);
    }
    let sizes: Vec<usize> = slots.iter().map(|s| s.param.len()).collect();
    let tab = build_table(ex, OP, &sizes, chunk, ADAMW_WORDS, |i, c0, w| {
        let s = &slots[i];
        let k = s.scalars;
        w.extend_from_slice(&[
            s.param.addr(),
            s.grad.addr(),
            s.exp_avg.addr(),
            s.exp_avg_sq.addr(),
            shadows[i],
            s.param.len() as u64,
            pair(c0 as u32, k.decay.to_bits()),
            pair(k.step_size.to_bits(), k.bc2_sqrt.to_bits()),
        ]);
    })?;
    let Some(tab) = tab else { return Ok(()) };
    // As the CPU reference: (1 − β1), β2, (1 − β2), ε rounded to f32.
    let [t, nt, ch] = tab.args();
    let args = [
        t,
        nt,
        ch,
        ((1.0 - beta1) as f32).into(),
        (beta2 as f32).into(),
        ((1.0 - beta2) as f32).into(),
        (eps as f32).into(),
    ];
    // SAFETY: (const AdamWTensor*, int, int, float, float, float, float) as the kernel declares;
    // every descriptor addresses buffers of its n elements (checked above), borrowed mutably
    // where the kernel writes.
    unsafe {
        ex.launch(
            MODULE,
            "adamw_update",
            multi_tensor_config(tab.total, threads),
            &args,
        )
    }
}

/// One (teacher, student) pair of [`ema_step`].
pub struct EmaSlot<'a, E: Exec> {
    /// Teacher weights, updated in place.
    pub teacher: &'a mut E::Buf<f32>,
    /// Student weights (same length).
    pub student: &'a E::Buf<f32>,
    /// Receives the updated teacher rounded to bf16, if given.
    pub teacher_bf16: Option<&'a mut E::Buf<bf16>>,
}

/// `ema_update`: the teacher EMA `t ← m·t + (1 − m)·s` over all pairs in one launch, as
/// `optim::ema_update` (both scalars rounded to f32 from the f64 momentum).
pub fn ema_step<E: Exec>(
    ex: &E,
    slots: &mut [EmaSlot<'_, E>],
    momentum: f64,
    chunk: usize,
    threads: u32,
) -> Result<()> {
    const OP: &str = "device::ema_step";
    if !(0.0..=1.0).contains(&momentum) {
        return Err(Error::invalid(
            OP,
            format!("momentum {momentum} is outside [0, 1]"),
        ));
    }
    check_threads(OP, threads)?;
    let mut shadows = Vec::with_capacity(slots.len());
    for (i, s) in slots.iter().enumerate() {
        let n = s.teacher.len();
        check_len(OP, &format!("slot {i} student"), s.student.len(), n)?;
        shadows.push(shadow_addr(
            OP,
            &format!("slot {i} bf16 teacher"),
            &s.teacher_bf16,
            n,
        )?);
    }
    let sizes: Vec<usize> = slots.iter().map(|s| s.teacher.len()).collect();
    let tab = build_table(ex, OP, &sizes, chunk, EMA_WORDS, |i, c0, w| {
        let s = &slots[i];
        w.extend_from_slice(&[
            s.teacher.addr(),
            s.student.addr(),
            shadows[i],
            s.teacher.len() as u64,
            pair(c0 as u32, 0),
        ]);
    })?;
    let Some(tab) = tab else { return Ok(()) };
    let [t, nt, ch] = tab.args();
    let args = [
        t,
        nt,
        ch,
        (momentum as f32).into(),
        ((1.0 - momentum) as f32).into(),
    ];
    // SAFETY: (const EmaTensor*, int, int, float, float) as the kernel declares; descriptors
    // address checked buffers, the teachers borrowed mutably.
    unsafe {
        ex.launch(
            MODULE,
            "ema_update",
            multi_tensor_config(tab.total, threads),
            &args,
        )
    }
}

/// Element types of teacher logits the centre's column sums read: f32 and bf16, each with its
/// own kernel.
pub trait CenterLogit: Elem {
    /// The kernel of `kernels/optim.cu` for this type.
    const COLSUM_KERNEL: &'static str;
}
impl CenterLogit for f32 {
    const COLSUM_KERNEL: &'static str = "dino_center_colsum_f32";
}
impl CenterLogit for bf16 {
    const COLSUM_KERNEL: &'static str = "dino_center_colsum_bf16";
}

/// Launches a column-sum kernel into `colsum` (`accumulate`: add to it).
fn launch_colsum<E: Exec, T: CenterLogit>(
    ex: &E,
    logits: &E::Buf<T>,
    rows: usize,
    cols: usize,
    colsum: &mut E::Buf<f64>,
    accumulate: bool,
    threads: u32,
) -> Result<()> {
    let op = if accumulate {
        "device::dino_center_colsum_accumulate"
    } else {
        "device::dino_center_colsum"
    };
    check_threads(op, threads)?;
    if cols == 0 {
        return Err(Error::shape(op, "teacher logits with 0 columns"));
    }
    let cells = rows
        .checked_mul(cols)
        .ok_or_else(|| Error::shape(op, format!("{rows} x {cols} logits overflow")))?;
    check_len(op, "teacher logits", logits.len(), cells)?;
    check_len(op, "column sums", colsum.len(), cols)?;
    let args = [
        logits.arg(),
        as_i32(op, "rows", rows)?.into(),
        as_i32(op, "columns", cols)?.into(),
        colsum.arg(),
        KArg::I32(accumulate as i32),
    ];
    // SAFETY: (const T*, int, int, double*, int) as the kernel declares; logits hold rows × cols
    // elements and colsum cols, one thread per column within the grid.
    unsafe {
        ex.launch(
            MODULE,
            T::COLSUM_KERNEL,
            center_config(cols, threads),
            &args,
        )
    }
}

/// `dino_center_colsum_{f32,bf16}`: f64 column sums of the teacher's raw logits `[rows, cols]`
/// (both global views' rows stacked), in a new buffer, ready for the f64 all-reduce over ranks.
pub fn dino_center_colsum<E: Exec, T: CenterLogit>(
    ex: &E,
    logits: &E::Buf<T>,
    rows: usize,
    cols: usize,
    threads: u32,
) -> Result<E::Buf<f64>> {
    let mut colsum = ex.alloc::<f64>(cols)?;
    launch_colsum(ex, logits, rows, cols, &mut colsum, false, threads)?;
    Ok(colsum)
}

/// As [`dino_center_colsum`], adding to existing column sums (views kept in separate buffers:
/// the sum order stays the CPU reference's, views then rows).
pub fn dino_center_colsum_accumulate<E: Exec, T: CenterLogit>(
    ex: &E,
    logits: &E::Buf<T>,
    rows: usize,
    cols: usize,
    colsum: &mut E::Buf<f64>,
    threads: u32,
) -> Result<()> {
    launch_colsum(ex, logits, rows, cols, colsum, true, threads)
}

/// `dino_center_update`: `c ← m·c + (1 − m)·colsum/n` with the all-reduced column sums, `n` =
/// views × batch × world size rows.
pub fn dino_center_update<E: Exec>(
    ex: &E,
    center: &mut E::Buf<f32>,
    colsum: &E::Buf<f64>,
    n: f64,
    momentum: f64,
    threads: u32,
) -> Result<()> {
    const OP: &str = "device::dino_center_update";
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
    if !(0.0..=1.0).contains(&momentum) {
        return Err(Error::invalid(
            OP,
            format!("momentum {momentum} is outside [0, 1]"),
        ));
    }
    let args = [
        center.arg(),
        colsum.arg(),
        as_i32(OP, "columns", center.len())?.into(),
        n.into(),
        momentum.into(),
    ];
    // SAFETY: (float*, const double*, int, double, double) as the kernel declares; both buffers
    // hold cols elements, one thread per column within the grid.
    unsafe {
        ex.launch(
            MODULE,
            "dino_center_update",
            center_config(center.len(), threads),
            &args,
        )
    }
}

// ------------------------------------------------------------------------------------------
// The device check's rows.

/// ResNet-50's parameters (torchvision names, engine shapes): 161 tensors, 25.56 M values.
/// `layers` limits the residual stages (4: the whole network; fewer: a quick subset).
fn resnet50_params(layers: usize) -> Vec<(String, Vec<usize>)> {
    let mut v: Vec<(String, Vec<usize>)> = vec![
        ("conv1.weight".into(), vec![64, 7, 7, 3]),
        ("bn1.weight".into(), vec![64]),
        ("bn1.bias".into(), vec![64]),
    ];
    let mut inplanes = 64;
    for (l, &(planes, blocks)) in [(64, 3), (128, 4), (256, 6), (512, 3)]
        .iter()
        .enumerate()
        .take(layers)
    {
        for b in 0..blocks {
            let p = format!("layer{}.{b}", l + 1);
            let cin = if b == 0 { inplanes } else { planes * 4 };
            v.push((format!("{p}.conv1.weight"), vec![planes, 1, 1, cin]));
            v.push((format!("{p}.bn1.weight"), vec![planes]));
            v.push((format!("{p}.bn1.bias"), vec![planes]));
            v.push((format!("{p}.conv2.weight"), vec![planes, 3, 3, planes]));
            v.push((format!("{p}.bn2.weight"), vec![planes]));
            v.push((format!("{p}.bn2.bias"), vec![planes]));
            v.push((format!("{p}.conv3.weight"), vec![planes * 4, 1, 1, planes]));
            v.push((format!("{p}.bn3.weight"), vec![planes * 4]));
            v.push((format!("{p}.bn3.bias"), vec![planes * 4]));
            if b == 0 {
                v.push((
                    format!("{p}.downsample.0.weight"),
                    vec![planes * 4, 1, 1, cin],
                ));
                v.push((format!("{p}.downsample.1.weight"), vec![planes * 4]));
                v.push((format!("{p}.downsample.1.bias"), vec![planes * 4]));
            }
        }
        inplanes = planes * 4;
    }
    if layers >= 4 {
        v.push(("fc.weight".into(), vec![1000, 2048]));
        v.push(("fc.bias".into(), vec![1000]));
    }
    v
}

/// ViT-S/16's parameters (timm names): 150 tensors, 21.67 M values with `depth` = 12 blocks.
fn vit_s_params(depth: usize) -> Vec<(String, Vec<usize>)> {
    let d = 384;
    let mut v: Vec<(String, Vec<usize>)> = vec![
        ("cls_token".into(), vec![1, 1, d]),
        ("pos_embed".into(), vec![1, 197, d]),
        ("patch_embed.proj.weight".into(), vec![d, 16, 16, 3]),
        ("patch_embed.proj.bias".into(), vec![d]),
    ];
    for i in 0..depth {
        let p = format!("blocks.{i}");
        for (name, shape) in [
            ("norm1.weight", vec![d]),
            ("norm1.bias", vec![d]),
            ("attn.qkv.weight", vec![3 * d, d]),
            ("attn.qkv.bias", vec![3 * d]),
            ("attn.proj.weight", vec![d, d]),
            ("attn.proj.bias", vec![d]),
            ("norm2.weight", vec![d]),
            ("norm2.bias", vec![d]),
            ("mlp.fc1.weight", vec![4 * d, d]),
            ("mlp.fc1.bias", vec![4 * d]),
            ("mlp.fc2.weight", vec![d, 4 * d]),
            ("mlp.fc2.bias", vec![d]),
        ] {
            v.push((format!("{p}.{name}"), shape));
        }
    }
    v.push(("norm.weight".into(), vec![d]));
    v.push(("norm.bias".into(), vec![d]));
    v
}

/// A store of `params` with fresh values from the stream `tag` (and gradients when `grads`).
fn random_store(tag: &str, params: &[(String, Vec<usize>)], grads: bool) -> Result<ParamStore> {
    let mut s = ParamStore::new();
    for (name, shape) in params {
        let n = shape.iter().product();
        let id = s.param(
            name,
            Tensor::from_vec(random(&format!("{tag}.p.{name}"), n), shape)?,
        );
        if grads {
            let g = random(&format!("{tag}.g.{name}"), n);
            s.accumulate_grad(id, &Tensor::from_vec(g, shape)?)?;
        }
    }
    Ok(s)
}

/// `new − old`, elementwise.
fn delta(new: &[f32], old: &[f32]) -> Vec<f32> {
    new.iter().zip(old).map(|(a, b)| a - b).collect()
}

/// Relative error of a bf16 shadow against the rounding of the fp32 result it must equal.
fn shadow_err(shadow: &[f32], fp32: &[f32]) -> f64 {
    rel_l2(shadow, &round_bf16(fp32))
}

/// NaN-propagating maximum of relative errors.
fn worst(errs: impl IntoIterator<Item = f64>) -> f64 {
    errs.into_iter().fold(0.0, |w, e| {
        if e.is_nan() || w.is_nan() {
            f64::NAN
        } else {
            w.max(e)
        }
    })
}

/// The values of every parameter of `s`, in registration order.
fn values(s: &ParamStore) -> Vec<Vec<f32>> {
    s.entries()
        .iter()
        .map(|e| e.value.data().to_vec())
        .collect()
}

/// The device check's rows of this family: the whole optimiser side of a step at the real
/// models' sizes (LARS over ResNet-50, AdamW and the EMA over ViT-S/16, the DINO centre of 64
/// images × 2 global views over 65536 prototypes), each against its CPU optimiser on the same
/// values, with the error of the *update* (parameters move by a tiny fraction per step, so
/// comparing them alone would hide a wrong update), the state and the bf16 shadow.
pub fn check_rows<E: Exec>(c: &mut Checker<'_, E>) {
    let quick = c.opts.quick;
    lars_row(c, if quick { 1 } else { 4 });
    adamw_row(c, if quick { 1 } else { 12 });
    ema_row(c, if quick { 1 } else { 12 });
    let (rows, cols) = if quick {
        (2 * 8, 2048)
    } else {
        (2 * 64, 65536)
    };
    center_rows(c, rows, cols);
}

/// A LARS row's device tensors: weights, gradient, momentum, bf16 shadow.
type LarsDev<E> = (
    <E as Exec>::Buf<f32>,
    <E as Exec>::Buf<f32>,
    <E as Exec>::Buf<f32>,
    <E as Exec>::Buf<bf16>,
);

fn lars_slots<E: Exec>(dev: &mut [LarsDev<E>], lr: f32, wd: f32) -> Vec<LarsSlot<'_, E>> {
    dev.iter_mut()
        .map(|(p, g, m, b)| LarsSlot {
            param: p,
            grad: &*g,
            momentum_buf: m,
            param_bf16: Some(b),
            lr,
            weight_decay: wd,
        })
        .collect()
}

/// An AdamW row's device tensors: weights, gradient, moments, bf16 shadow, scalars.
type AdamWDev<E> = (
    <E as Exec>::Buf<f32>,
    <E as Exec>::Buf<f32>,
    <E as Exec>::Buf<f32>,
    <E as Exec>::Buf<f32>,
    <E as Exec>::Buf<bf16>,
    AdamWScalars,
);

fn adamw_slots<E: Exec>(dev: &mut [AdamWDev<E>]) -> Vec<AdamWSlot<'_, E>> {
    dev.iter_mut()
        .map(|(p, g, m, v, b, s)| AdamWSlot {
            param: p,
            grad: &*g,
            exp_avg: m,
            exp_avg_sq: v,
            param_bf16: Some(b),
            scalars: *s,
        })
        .collect()
}

/// An EMA row's device tensors: teacher, student, bf16 shadow.
type EmaDev<E> = (
    <E as Exec>::Buf<f32>,
    <E as Exec>::Buf<f32>,
    <E as Exec>::Buf<bf16>,
);

fn ema_slots<E: Exec>(dev: &mut [EmaDev<E>]) -> Vec<EmaSlot<'_, E>> {
    dev.iter_mut()
        .map(|(t, s, b)| EmaSlot {
            teacher: t,
            student: &*s,
            teacher_bf16: Some(b),
        })
        .collect()
}

fn lars_row<E: Exec>(c: &mut Checker<'_, E>, layers: usize) {
    let params = resnet50_params(layers);
    let total: usize = params
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let sizes: Vec<usize> = params.iter().map(|(_, s)| s.iter().product()).collect();
    let (lr, wd) = (0.6f32, 1e-6f32);
    c.row(
        "optim",
        "lars_multi_tensor",
        format!("{} tensors, {:.2} M params", params.len(), total as f64 / 1e6),
        json!({"kind": "lars", "sizes": sizes, "lr": lr, "wd": wd}),
        |c| {
            let mut cpu = random_store("lars", &params, true)?;
            let mut lars = Lars::new(wd);
            // A step with momentum from earlier steps: random buffers on both sides.
            let mom0: Vec<Vec<f32>> = params
                .iter()
                .map(|(n, s)| random(&format!("lars.m.{n}"), s.iter().product()))
                .collect();
            let bufs: BTreeMap<String, Vec<f32>> = params
                .iter()
                .zip(&mom0)
                .map(|((n, _), m)| (n.clone(), m.clone()))
                .collect();
            lars.set_buffers(bufs);
            let old = values(&cpu);
            let ex = c.dev;
            let mut dev: Vec<LarsDev<E>> = Vec::with_capacity(params.len());
            for (e, m) in cpu.entries().iter().zip(&mom0) {
                let n = e.value.numel();
                dev.push((
                    ex.upload(e.value.data())?,
                    ex.upload(e.grad.data())?,
                    ex.upload(m)?,
                    ex.alloc::<bf16>(n)?,
                ));
            }
            lars.step(&mut cpu, lr)?;
            let (mo, eta, eps) = (lars.momentum, lars.eta, lars.eps);
            lars_step(ex, &mut lars_slots::<E>(&mut dev, lr, wd), mo, eta, eps, CHUNK, THREADS)?;
            let mut errs = Vec::new();
            for (k, e) in cpu.entries().iter().enumerate() {
                let (p, _, m, b) = &dev[k];
                let got = ex.download(p)?;
                errs.push(rel_l2(&delta(&got, &old[k]), &delta(e.value.data(), &old[k])));
                errs.push(rel_l2(&ex.download(m)?, &lars.buffers()[&e.name]));
                errs.push(shadow_err(&ex.download_bf16(b)?, &got));
            }
            let t = c.time(|| lars_step(ex, &mut lars_slots::<E>(&mut dev, lr, wd), mo, eta, eps, CHUNK, THREADS))?;
            Ok(Measured {
                err: Some((worst(errs), TOL_F32)),
                time: Some(t),
                // Reads p, g, momentum (fp32); writes p, momentum (fp32) and the bf16 shadow.
                bytes: 22.0 * total as f64,
                note: "aim: >= 70% of copy bandwidth; err: max over tensors of update, momentum, shadow"
                    .into(),
                ..Default::default()
            })
        },
    );
}

fn adamw_row<E: Exec>(c: &mut Checker<'_, E>, depth: usize) {
    let params = vit_s_params(depth);
    let total: usize = params
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let sizes: Vec<usize> = params.iter().map(|(_, s)| s.iter().product()).collect();
    let (lr, wd, step0) = (5e-4, 0.04, 6u64);
    c.row(
        "optim",
        "adamw_multi_tensor",
        format!("{} tensors, {:.2} M params", params.len(), total as f64 / 1e6),
        json!({"kind": "adamw", "sizes": sizes, "lr": lr, "wd": wd}),
        |c| {
            let mut cpu = random_store("adamw", &params, true)?;
            let mut adamw = AdamW::new();
            adamw.set_schedule(lr, wd);
            // Resumed moments (step 6), so both moments and the bias corrections matter.
            let mut state = BTreeMap::new();
            for (n, s) in &params {
                let len = s.iter().product();
                state.insert(
                    n.clone(),
                    AdamWState {
                        step: step0,
                        exp_avg: random(&format!("adamw.m.{n}"), len)
                            .iter()
                            .map(|v| 0.1 * v)
                            .collect(),
                        exp_avg_sq: random(&format!("adamw.v.{n}"), len)
                            .iter()
                            .map(|v| 0.01 * v * v)
                            .collect(),
                    },
                );
            }
            let ex = c.dev;
            let mut dev: Vec<AdamWDev<E>> = Vec::with_capacity(params.len());
            for e in cpu.entries() {
                let st = &state[&e.name];
                let h = adamw.groups[dino_group(&e.name, e.value.shape())];
                let s = AdamWScalars::new(h.lr, h.weight_decay, adamw.beta1, adamw.beta2, step0 + 1);
                dev.push((
                    ex.upload(e.value.data())?,
                    ex.upload(e.grad.data())?,
                    ex.upload(&st.exp_avg)?,
                    ex.upload(&st.exp_avg_sq)?,
                    ex.alloc::<bf16>(e.value.numel())?,
                    s,
                ));
            }
            adamw.set_state(state);
            let old = values(&cpu);
            adamw.step(&mut cpu)?;
            let (b1, b2, eps) = (adamw.beta1, adamw.beta2, adamw.eps);
            adamw_step(ex, &mut adamw_slots::<E>(&mut dev), b1, b2, eps, CHUNK, THREADS)?;
            let mut errs = Vec::new();
            for (k, e) in cpu.entries().iter().enumerate() {
                let (p, _, m, v, b, _) = &dev[k];
                let st = &adamw.state()[&e.name];
                let got = ex.download(p)?;
                errs.push(rel_l2(&delta(&got, &old[k]), &delta(e.value.data(), &old[k])));
                errs.push(rel_l2(&ex.download(m)?, &st.exp_avg));
                errs.push(rel_l2(&ex.download(v)?, &st.exp_avg_sq));
                errs.push(shadow_err(&ex.download_bf16(b)?, &got));
            }
            let t = c.time(|| adamw_step(ex, &mut adamw_slots::<E>(&mut dev), b1, b2, eps, CHUNK, THREADS))?;
            Ok(Measured {
                err: Some((worst(errs), TOL_F32)),
                time: Some(t),
                // Reads p, g, m, v (fp32); writes p, m, v (fp32) and the bf16 shadow.
                bytes: 30.0 * total as f64,
                note: "aim: >= 70% of copy bandwidth; err: max over tensors of update, moments, shadow"
                    .into(),
                ..Default::default()
            })
        },
    );
}

fn ema_row<E: Exec>(c: &mut Checker<'_, E>, depth: usize) {
    let params = vit_s_params(depth);
    let total: usize = params
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    let sizes: Vec<usize> = params.iter().map(|(_, s)| s.iter().product()).collect();
    let m = 0.996;
    c.row(
        "optim",
        "ema_multi_tensor",
        format!(
            "{} tensors, {:.2} M params",
            params.len(),
            total as f64 / 1e6
        ),
        json!({"kind": "ema", "sizes": sizes, "m": m}),
        |c| {
            let mut teacher = random_store("ema.t", &params, false)?;
            let student = random_store("ema.s", &params, false)?;
            let ex = c.dev;
            let mut dev: Vec<EmaDev<E>> = Vec::with_capacity(params.len());
            for (t, s) in teacher.entries().iter().zip(student.entries()) {
                dev.push((
                    ex.upload(t.value.data())?,
                    ex.upload(s.value.data())?,
                    ex.alloc::<bf16>(t.value.numel())?,
                ));
            }
            let old = values(&teacher);
            ema_update(&mut teacher, &student, m)?;
            ema_step(ex, &mut ema_slots::<E>(&mut dev), m, CHUNK, THREADS)?;
            let mut errs = Vec::new();
            for (k, e) in teacher.entries().iter().enumerate() {
                debug_assert!(matches!(e.kind, Kind::Param { .. }));
                let (t, _, b) = &dev[k];
                let got = ex.download(t)?;
                errs.push(rel_l2(
                    &delta(&got, &old[k]),
                    &delta(e.value.data(), &old[k]),
                ));
                errs.push(shadow_err(&ex.download_bf16(b)?, &got));
            }
            let t = c.time(|| ema_step(ex, &mut ema_slots::<E>(&mut dev), m, CHUNK, THREADS))?;
            Ok(Measured {
                err: Some((worst(errs), TOL_F32)),
                time: Some(t),
                // Reads teacher and student (fp32); writes the teacher (fp32) and its bf16 shadow.
                bytes: 14.0 * total as f64,
                note: "aim: >= 70% of copy bandwidth; err: max over tensors of update, shadow"
                    .into(),
                ..Default::default()
            })
        },
    );
}

/// The two global views of the teacher's logits (`rows / 2` images each), f32 or rounded to
/// bf16 values.
fn center_views(rows: usize, cols: usize, bf: bool) -> Result<Vec<Tensor<f32>>> {
    (0..2)
        .map(|v| {
            let x = random(&format!("center.x{v}.{rows}.{cols}"), rows / 2 * cols);
            let x = if bf { round_bf16(&x) } else { x };
            Tensor::from_vec(x, &[rows / 2, cols])
        })
        .collect()
}

/// The CPU centre after one update of `start` with momentum `m` from `views`.
fn cpu_center(views: &[Tensor<f32>], start: &[f32], m: f64) -> Result<Vec<f32>> {
    let mut c = DinoCenter::<f32>::new(start.len());
    c.center = start.to_vec();
    c.momentum = m;
    c.update(views, &SingleProcess)?;
    Ok(c.center)
}

fn center_rows<E: Exec>(c: &mut Checker<'_, E>, rows: usize, cols: usize) {
    let shape = format!("R{rows} K{cols}");
    for bf in [false, true] {
        let dtype = if bf { "bf16" } else { "f32" };
        c.row(
            "optim",
            &format!("dino_center_colsum_{dtype}"),
            shape.clone(),
            json!({"kind": "dino_center_colsum", "rows": rows, "cols": cols, "dtype": dtype}),
            |c| {
                let views = center_views(rows, cols, bf)?;
                let x: Vec<f32> = views.iter().flat_map(|v| v.data().to_vec()).collect();
                // Momentum 0: the CPU centre is exactly colsum / n, rounded to f32.
                let want = cpu_center(&views, &vec![0.0; cols], 0.0)?;
                let ex = c.dev;
                let n = rows as f64;
                let (got, t) = if bf {
                    let xd = ex.upload_bf16(&x)?;
                    let s = dino_center_colsum(ex, &xd, rows, cols, CENTER_THREADS)?;
                    let t = c.time(|| {
                        dino_center_colsum(ex, &xd, rows, cols, CENTER_THREADS).map(drop)
                    })?;
                    (ex.download(&s)?, t)
                } else {
                    let xd = ex.upload(&x)?;
                    let s = dino_center_colsum(ex, &xd, rows, cols, CENTER_THREADS)?;
                    let t = c.time(|| {
                        dino_center_colsum(ex, &xd, rows, cols, CENTER_THREADS).map(drop)
                    })?;
                    (ex.download(&s)?, t)
                };
                let got: Vec<f32> = got.iter().map(|s| (s / n) as f32).collect();
                let elem = if bf { 2.0 } else { 4.0 };
                Ok(Measured {
                    err: Some((rel_l2(&got, &want), TOL_F32)),
                    time: Some(t),
                    // Reads the logits; writes f64 column sums.
                    bytes: elem * (rows * cols) as f64 + 8.0 * cols as f64,
                    note:
                        "aim: >= 70% of copy bandwidth; err: colsum / n vs the CPU centre (m = 0)"
                            .into(),
                    ..Default::default()
                })
            },
        );
    }
    c.row(
        "optim",
        "dino_center_update",
        format!("K{cols}"),
        json!({"kind": "dino_center_update", "rows": rows, "cols": cols, "m": 0.9}),
        |c| {
            let views = center_views(rows, cols, false)?;
            let x: Vec<f32> = views.iter().flat_map(|v| v.data().to_vec()).collect();
            let start: Vec<f32> = random(&format!("center.c.{cols}"), cols)
                .iter()
                .map(|v| 0.5 * v)
                .collect();
            let want = cpu_center(&views, &start, 0.9)?;
            let ex = c.dev;
            let xd = ex.upload(&x)?;
            let s = dino_center_colsum(ex, &xd, rows, cols, CENTER_THREADS)?;
            let mut cd = ex.upload(&start)?;
            dino_center_update(ex, &mut cd, &s, rows as f64, 0.9, CENTER_THREADS)?;
            let got = ex.download(&cd)?;
            let t =
                c.time(|| dino_center_update(ex, &mut cd, &s, rows as f64, 0.9, CENTER_THREADS))?;
            Ok(Measured {
                err: Some((rel_l2(&delta(&got, &start), &delta(&want, &start)), TOL_F32)),
                time: Some(t),
                // Reads the centre (f32) and the column sums (f64); writes the centre.
                bytes: 16.0 * cols as f64,
                note: "err: the centre's change vs DinoCenter::update".into(),
                ..Default::default()
            })
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's `LarsTensor`, field for field, to check the word packing against (only its
    /// bytes are read).
    #[allow(dead_code)]
    #[repr(C)]
    struct LarsMirror {
        param: u64,
        grad: u64,
        mom: u64,
        param_bf16: u64,
        n: i64,
        chunk0: i32,
        lr: f32,
        weight_decay: f32,
        pad: i32,
    }

    /// The kernel's `AdamWTensor`.
    #[allow(dead_code)]
    #[repr(C)]
    struct AdamWMirror {
        ptrs: [u64; 5],
        n: i64,
        chunk0: i32,
        decay: f32,
        step_size: f32,
        bc2_sqrt: f32,
    }

    fn bytes_of<T>(v: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain repr(C) value with no padding.
        unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
            .to_vec()
    }

    fn word_bytes(w: &[u64]) -> Vec<u8> {
        w.iter().flat_map(|x| x.to_ne_bytes()).collect()
    }

    #[test]
    fn packed_words_have_the_kernel_structs_layout() {
        assert_eq!(std::mem::size_of::<LarsMirror>(), 8 * LARS_WORDS);
        assert_eq!(std::mem::size_of::<AdamWMirror>(), 8 * ADAMW_WORDS);
        let l = LarsMirror {
            param: 0x1111,
            grad: 0x2222,
            mom: 0x3333,
            param_bf16: 0,
            n: 40_000,
            chunk0: 7,
            lr: 0.25,
            weight_decay: 1e-6,
            pad: 0,
        };
        let w = [
            0x1111,
            0x2222,
            0x3333,
            0,
            40_000,
            pair(7, 0.25f32.to_bits()),
            pair(1e-6f32.to_bits(), 0),
        ];
        assert_eq!(word_bytes(&w), bytes_of(&l));
        let a = AdamWMirror {
            ptrs: [1, 2, 3, 4, 5],
            n: 9,
            chunk0: 3,
            decay: 0.5,
            step_size: 0.125,
            bc2_sqrt: 2.0,
        };
        let w = [
            1,
            2,
            3,
            4,
            5,
            9,
            pair(3, 0.5f32.to_bits()),
            pair(0.125f32.to_bits(), 2.0f32.to_bits()),
        ];
        assert_eq!(word_bytes(&w), bytes_of(&a));
    }

    #[test]
    fn chunks_are_prefix_sums_and_bad_sizes_are_errors() {
        let (s, t) = chunk_layout(&[10, 0, 1, 21], 10).unwrap();
        assert_eq!((s, t), (vec![0, 1, 1, 2], 5));
        assert!(chunk_layout(&[1], 0).is_err());
        assert_eq!(chunk_layout(&[], 10).unwrap(), (vec![], 0));
    }

    #[test]
    fn model_parameter_lists_have_the_real_sizes() {
        let r = resnet50_params(4);
        let n: usize = r.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        assert_eq!((r.len(), n), (161, 25_557_032));
        let v = vit_s_params(12);
        let n: usize = v.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        assert_eq!((v.len(), n), (150, 21_665_664));
    }
}
