//! Device ops of `kernels/elementwise.cu`: the ViT block's element-wise and row-wise kernels,
//! bf16 storage with fp32 arithmetic. Each op's CPU reference (what the tests and the device
//! check compare with):
//!
//! | op | kernel(s) | CPU reference |
//! |---|---|---|
//! | [`gelu_bias_forward`] | `gelu_bias_forward` | `cpu::elementwise::gelu_forward(x + b)` |
//! | [`gelu_bias_backward`] | `gelu_bias_backward` | `cpu::elementwise::gelu_backward(dy, x + b)` |
//! | [`bias_add`] | `bias_add` | `x + b` per row |
//! | [`column_sum`] | `column_sum_partial` + `column_sum_finish` | sum over rows (the bias gradient) |
//! | [`drop_path`] | `drop_path` | `cpu::elementwise::drop_path_forward` / `_backward` |
//! | [`drop_path_add`], [`drop_path_add_assign`] | `drop_path_add` | `add_forward(r, drop_path_forward(x))` |
//! | [`attn_softmax_forward`] | `attn_softmax_forward` | `cpu::softmax::softmax_forward(scale·S)` |
//! | [`attn_softmax_backward`] | `attn_softmax_backward` | `scale · cpu::softmax::softmax_backward(dP, P)` |
//! | [`cast_f32_bf16`] | `cast_f32_bf16` | `half::bf16::from_f32` (bit for bit) |
//! | [`cast_bf16_f32`] | `cast_bf16_f32` | `half::bf16::to_f32` (bit for bit) |
//! | [`add_bf16`], [`add_assign_bf16`] | `add_bf16` | `bf16::from_f32(a + b)` (bit for bit) |
//! | [`accumulate_bf16_f32`] | `accumulate_bf16_f32` | `acc + g` in f32 (bit for bit) |
//! | [`accumulate_f32`] | `accumulate_f32` | `acc + g` in f32 (bit for bit) |
//!
//! The last five are the mixed-precision plumbing of a ResNet-50 training step: fp32 master
//! weights cast to their bf16 operand copies, bf16 activations added, bf16 weight gradients (from
//! cuDNN / cuBLASLt) and fp32 batch-norm gradients accumulated into the fp32 gradient buffer.
//! They work on flat buffers of any length (64-bit element counts).
//!
//! Launch configurations are the ones `kernels/elementwise.cu` documents: element-wise kernels
//! one thread per element (`ceil(n / T)` blocks of `T`; the flat 64-bit kernels at most
//! [`FLAT_MAX_BLOCKS`] blocks, grid-stride), row kernels one warp per row
//! (`ceil(rows / (T/32))` blocks), column sums `(ceil(C/32), G)` blocks of `T` then
//! `ceil(C / T)`. Every output is written in full by its kernel, so outputs come from
//! [`Exec::alloc`] (poisoned on the emulation: a gap would show up as NaN).

use super::check::{random, round_bf16, Checker, Measured, TOL_BF16};
use super::{as_i32, check_len, check_threads, DevBuf, Exec, KArg, LaunchConfig};
use crate::backend::cpu::elementwise::{drop_path_forward, gelu_backward, gelu_forward};
use crate::backend::cpu::softmax::{softmax_backward, softmax_forward};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::testing::rel_l2;
use half::bf16;
use serde_json::json;

const MODULE: &str = "elementwise";

/// Threads per block the GPU uses for every kernel of this family (8 warps: 8 rows at a time
/// for the row kernels, 8 row lanes of 32 columns for the column sums).
pub const THREADS: u32 = 256;

/// Rows per block of [`column_sum`]'s first pass on the GPU: [64·197, 1536] gives 197 × 48
/// blocks, enough to fill the GPU, while the partial sums stay ~3% of the input's bytes.
pub const COLUMN_SUM_ROWS_PER_BLOCK: usize = 64;

/// Most blocks of a flat 64-bit launch ([`cast_f32_bf16`], [`add_bf16`], ...): their grid-stride
/// loops cover the rest, so any length launches. An H200 holds 132 SMs × 8 resident blocks of
/// 256 threads: 4096 blocks are about four full waves, enough for these bandwidth-bound loops.
pub const FLAT_MAX_BLOCKS: usize = 4096;

/// ResNet-50's parameter count (torchvision), the length of the flat rows of the device check.
pub const RESNET50_PARAMS: usize = 25_557_032;

/// Checks the block size of a flat 64-bit launch over `n` elements; returns its configuration
/// and the kernel's `unsigned long long n`, or `None` when there is nothing to do (`n = 0`).
fn flat64(op: &'static str, n: usize, threads: u32) -> Result<Option<(LaunchConfig, KArg)>> {
    check_threads(op, threads)?;
    if n == 0 {
        return Ok(None);
    }
    let blocks = n.div_ceil(threads as usize).min(FLAT_MAX_BLOCKS);
    Ok(Some((
        LaunchConfig::linear(blocks as u32, threads, 0),
        KArg::U64(n as u64),
    )))
}

/// Checks `[rows, cols]` (both non-zero, the product an `int`) and the block size.
fn dims(op: &'static str, rows: usize, cols: usize, threads: u32) -> Result<(i32, i32)> {
    check_threads(op, threads)?;
    if rows == 0 || cols == 0 {
        return Err(Error::shape(
            op,
            format!("[{rows}, {cols}]: need rows and columns"),
        ));
    }
    as_i32(op, "rows·cols", rows.saturating_mul(cols))?;
    Ok((as_i32(op, "rows", rows)?, as_i32(op, "columns", cols)?))
}

/// One thread per element: `ceil(n / threads)` blocks (fits grid.x: n < 2^31, threads >= 32).
fn flat(n: usize, threads: u32) -> LaunchConfig {
    LaunchConfig::linear(n.div_ceil(threads as usize) as u32, threads, 0)
}

/// One warp per row.
fn warp_rows(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig::linear(rows.div_ceil(threads as usize / 32) as u32, threads, 0)
}

/// The optional bias as a kernel argument (null when absent), its length checked.
fn bias_arg<B: DevBuf<f32>>(op: &'static str, bias: Option<&B>, c: usize) -> Result<KArg> {
    match bias {
        Some(b) => {
            check_len(op, "bias", b.len(), c)?;
            Ok(b.arg())
        }
        None => Ok(KArg::Ptr(0)),
    }
}

/// `y = gelu(x + bias)` over `x [r, c]` (bias `[c]`, optional): the fused bias + exact-erf GELU
/// after a ViT MLP's first Linear, so that the pre-activation is never stored.
pub fn gelu_bias_forward<E: Exec>(
    ex: &E,
    x: &E::Buf<bf16>,
    bias: Option<&E::Buf<f32>>,
    r: usize,
    c: usize,
    threads: u32,
) -> Result<E::Buf<bf16>> {
    const OP: &str = "gelu_bias_forward";
    let (ri, ci) = dims(OP, r, c, threads)?;
    check_len(OP, "x", x.len(), r * c)?;
    let pb = bias_arg(OP, bias, c)?;
    let y = ex.alloc::<bf16>(r * c)?;
    let args = [x.arg(), pb, y.arg(), ri.into(), ci.into()];
    // SAFETY: (const bf16* x, const float* bias, bf16* y, int R, int C) as declared; x and y
    // hold R·C values, bias C or is null; the grid-stride loop stays below R·C.
    unsafe { ex.launch(MODULE, "gelu_bias_forward", flat(r * c, threads), &args)? };
    Ok(y)
}

/// `du = dy · gelu'(x + bias)` over `[r, c]` (u recomputed from x); the bias gradient is
/// [`column_sum`] of `du`.
pub fn gelu_bias_backward<E: Exec>(
    ex: &E,
    dy: &E::Buf<bf16>,
    x: &E::Buf<bf16>,
    bias: Option<&E::Buf<f32>>,
    r: usize,
    c: usize,
    threads: u32,
) -> Result<E::Buf<bf16>> {
    const OP: &str = "gelu_bias_backward";
    let (ri, ci) = dims(OP, r, c, threads)?;
    check_len(OP, "dy", dy.len(), r * c)?;
    check_len(OP, "x", x.len(), r * c)?;
    let pb = bias_arg(OP, bias, c)?;
    let du = ex.alloc::<bf16>(r * c)?;
    let args = [dy.arg(), x.arg(), pb, du.arg(), ri.into(), ci.into()];
    // SAFETY: (const bf16* dy, const bf16* x, const float* bias, bf16* du, int R, int C) as
    // declared; dy, x, du hold R·C values, bias C or is null.
    unsafe { ex.launch(MODULE, "gelu_bias_backward", flat(r * c, threads), &args)? };
    Ok(du)
}

/// `x += bias` per row of `x [r, c]`, in place (the kernel allows y = x): the bias of a Linear
/// whose epilogue cannot add it.
pub fn bias_add<E: Exec>(
    ex: &E,
    x: &mut E::Buf<bf16>,
    bias: &E::Buf<f32>,
    r: usize,
    c: usize,
    threads: u32,
) -> Result<()> {
    const OP: &str = "bias_add";
    let (ri, ci) = dims(OP, r, c, threads)?;
    check_len(OP, "x", x.len(), r * c)?;
    check_len(OP, "bias", bias.len(), c)?;
    let args = [x.arg(), bias.arg(), x.arg(), ri.into(), ci.into()];
    // SAFETY: (const bf16* x, const float* bias, bf16* y, int R, int C) with y = x, which the
    // kernel allows (no __restrict__ on x, y; each element is read then written by one thread).
    unsafe { ex.launch(MODULE, "bias_add", flat(r * c, threads), &args) }
}

/// `out[c] = Σ_rows a[r][c]` of `a [r, c]` in fp32, in a fixed order (deterministic): the bias
/// gradient of a Linear or of [`gelu_bias_backward`]. `rpb` rows per block of the first pass
/// ([`COLUMN_SUM_ROWS_PER_BLOCK`] on the GPU).
pub fn column_sum<E: Exec>(
    ex: &E,
    a: &E::Buf<bf16>,
    r: usize,
    c: usize,
    rpb: usize,
    threads: u32,
) -> Result<E::Buf<f32>> {
    const OP: &str = "column_sum";
    let (ri, ci) = dims(OP, r, c, threads)?;
    check_len(OP, "a", a.len(), r * c)?;
    if rpb == 0 {
        return Err(Error::invalid(OP, "rows per block must be > 0"));
    }
    let g = r.div_ceil(rpb);
    if g > 65535 {
        return Err(Error::invalid(
            OP,
            format!("{r} rows at {rpb} rows per block need {g} row groups: at most 65535 (grid.y); raise the rows per block"),
        ));
    }
    let (gi, rpbi) = (as_i32(OP, "groups", g)?, as_i32(OP, "rows per block", rpb)?);
    as_i32(OP, "groups·columns", g * c)?;
    let part = ex.alloc::<f32>(g * c)?;
    let cfg = LaunchConfig {
        grid: (c.div_ceil(32) as u32, g as u32, 1),
        block: (threads, 1, 1),
        shared_bytes: 0,
    };
    let args = [a.arg(), part.arg(), ri.into(), ci.into(), rpbi.into()];
    // SAFETY: (const bf16* a, float* part, int R, int C, int rpb) as declared; a holds R·C
    // values, part G·C with G = ceil(R / rpb) = grid.y; columns >= C are skipped.
    unsafe { ex.launch(MODULE, "column_sum_partial", cfg, &args)? };
    let out = ex.alloc::<f32>(c)?;
    let args = [part.arg(), out.arg(), gi.into(), ci.into()];
    // SAFETY: (const float* part, float* out, int G, int C) as declared; part holds G·C values
    // (all written above), out C; threads with c >= C return.
    unsafe { ex.launch(MODULE, "column_sum_finish", flat(c, threads), &args)? };
    Ok(out)
}

/// A drop-path keep mask (one byte per sample, 1 = keep) on the device, for [`drop_path`].
pub fn upload_mask<E: Exec>(ex: &E, mask: &[bool]) -> Result<E::Buf<u8>> {
    let bytes: Vec<u8> = mask.iter().map(|&k| k as u8).collect();
    ex.upload(&bytes)
}

/// Checks a drop-path mask and probability; returns `1 / (1 − p)`.
fn keep_scale<B: DevBuf<u8>>(op: &'static str, mask: &B, b: usize, drop_prob: f64) -> Result<f32> {
    check_len(op, "mask", mask.len(), b)?;
    if !(0.0..1.0).contains(&drop_prob) {
        return Err(Error::invalid(
            op,
            format!("drop probability {drop_prob} must be in [0, 1) (at 1 every sample is dropped: skip the branch instead)"),
        ));
    }
    Ok((1.0 / (1.0 - drop_prob)) as f32)
}

/// `y[i] = mask[i] ? x[i] / (1 − p) : 0` per sample `i` of `x [b, m]` (timm's drop path with
/// the mask given; linear, so the same op on `dy` is its backward).
pub fn drop_path<E: Exec>(
    ex: &E,
    x: &E::Buf<bf16>,
    mask: &E::Buf<u8>,
    drop_prob: f64,
    b: usize,
    m: usize,
    threads: u32,
) -> Result<E::Buf<bf16>> {
    const OP: &str = "drop_path";
    let (bi, mi) = dims(OP, b, m, threads)?;
    check_len(OP, "x", x.len(), b * m)?;
    let inv_keep = keep_scale(OP, mask, b, drop_prob)?;
    let y = ex.alloc::<bf16>(b * m)?;
    let args = [
        x.arg(),
        mask.arg(),
        inv_keep.into(),
        y.arg(),
        bi.into(),
        mi.into(),
    ];
    // SAFETY: (const bf16* x, const unsigned char* mask, float inv_keep, bf16* y, int B, int M)
    // as declared; x and y hold B·M values, mask B.
    unsafe { ex.launch(MODULE, "drop_path", flat(b * m, threads), &args)? };
    Ok(y)
}

/// `y = r + drop_path(x)`, the residual branch of a ViT block in one pass (its backward:
/// `dr = dy`, `dx = drop_path(dy)`).
#[allow(clippy::too_many_arguments)]
pub fn drop_path_add<E: Exec>(
    ex: &E,
    r: &E::Buf<bf16>,
    x: &E::Buf<bf16>,
    mask: &E::Buf<u8>,
    drop_prob: f64,
    b: usize,
    m: usize,
    threads: u32,
) -> Result<E::Buf<bf16>> {
    const OP: &str = "drop_path_add";
    let y = ex.alloc::<bf16>(r.len())?;
    drop_path_add_launch(
        ex,
        OP,
        r.arg(),
        r.len(),
        x,
        mask,
        drop_prob,
        b,
        m,
        threads,
        y.arg(),
    )?;
    Ok(y)
}

/// [`drop_path_add`] into the residual stream itself: `r += drop_path(x)` (the kernel allows
/// y = r), so a ViT block updates its residual without a second buffer.
#[allow(clippy::too_many_arguments)]
pub fn drop_path_add_assign<E: Exec>(
    ex: &E,
    r: &mut E::Buf<bf16>,
    x: &E::Buf<bf16>,
    mask: &E::Buf<u8>,
    drop_prob: f64,
    b: usize,
    m: usize,
    threads: u32,
) -> Result<()> {
    const OP: &str = "drop_path_add_assign";
    drop_path_add_launch(
        ex,
        OP,
        r.arg(),
        r.len(),
        x,
        mask,
        drop_prob,
        b,
        m,
        threads,
        r.arg(),
    )
}

#[allow(clippy::too_many_arguments)]
fn drop_path_add_launch<E: Exec>(
    ex: &E,
    op: &'static str,
    r: KArg,
    r_len: usize,
    x: &E::Buf<bf16>,
    mask: &E::Buf<u8>,
    drop_prob: f64,
    b: usize,
    m: usize,
    threads: u32,
    y: KArg,
) -> Result<()> {
    let (bi, mi) = dims(op, b, m, threads)?;
    check_len(op, "r", r_len, b * m)?;
    check_len(op, "x", x.len(), b * m)?;
    let inv_keep = keep_scale(op, mask, b, drop_prob)?;
    let args = [
        r,
        x.arg(),
        mask.arg(),
        inv_keep.into(),
        y,
        bi.into(),
        mi.into(),
    ];
    // SAFETY: (const bf16* r, const bf16* x, const unsigned char* mask, float inv_keep, bf16* y,
    // int B, int M) as declared; r, x hold B·M values, mask B; y is either r (allowed: no
    // __restrict__, element-wise read-then-write) or a fresh buffer of r's length.
    unsafe { ex.launch(MODULE, "drop_path_add", flat(b * m, threads), &args) }
}

/// `P = softmax(scale · S)` per row of `S [rows, n]` (rows = B·H·N queries, n = keys): the
/// attention probabilities, max-subtracted in fp32, one warp per row.
pub fn attn_softmax_forward<E: Exec>(
    ex: &E,
    s: &E::Buf<bf16>,
    rows: usize,
    n: usize,
    scale: f32,
    threads: u32,
) -> Result<E::Buf<bf16>> {
    const OP: &str = "attn_softmax_forward";
    let (ri, ni) = dims(OP, rows, n, threads)?;
    check_len(OP, "scores", s.len(), rows * n)?;
    let p = ex.alloc::<bf16>(rows * n)?;
    let args = [s.arg(), p.arg(), ri.into(), ni.into(), scale.into()];
    // SAFETY: (const bf16* S, bf16* P, int rows, int N, float scale) as declared; S and P hold
    // rows·N values; warps with row >= rows return.
    unsafe {
        ex.launch(
            MODULE,
            "attn_softmax_forward",
            warp_rows(rows, threads),
            &args,
        )?
    };
    Ok(p)
}

/// `dS = scale · P · (dP − Σ_j P dP)` per row: the backward of [`attn_softmax_forward`] from its
/// output `P`.
pub fn attn_softmax_backward<E: Exec>(
    ex: &E,
    dp: &E::Buf<bf16>,
    p: &E::Buf<bf16>,
    rows: usize,
    n: usize,
    scale: f32,
    threads: u32,
) -> Result<E::Buf<bf16>> {
    const OP: &str = "attn_softmax_backward";
    let (ri, ni) = dims(OP, rows, n, threads)?;
    check_len(OP, "dP", dp.len(), rows * n)?;
    check_len(OP, "P", p.len(), rows * n)?;
    let ds = ex.alloc::<bf16>(rows * n)?;
    let args = [
        dp.arg(),
        p.arg(),
        ds.arg(),
        ri.into(),
        ni.into(),
        scale.into(),
    ];
    // SAFETY: (const bf16* dP, const bf16* P, bf16* dS, int rows, int N, float scale) as
    // declared; all three hold rows·N values.
    unsafe {
        ex.launch(
            MODULE,
            "attn_softmax_backward",
            warp_rows(rows, threads),
            &args,
        )?
    };
    Ok(ds)
}

/// `y = bf16(x)` (round to nearest even) over equal-length buffers: the fp32 master weights to
/// the bf16 copies the forward and backward GEMMs / convolutions read.
pub fn cast_f32_bf16<E: Exec>(
    ex: &E,
    x: &E::Buf<f32>,
    y: &mut E::Buf<bf16>,
    threads: u32,
) -> Result<()> {
    const OP: &str = "cast_f32_bf16";
    check_len(OP, "y", y.len(), x.len())?;
    let Some((cfg, n)) = flat64(OP, x.len(), threads)? else {
        return Ok(());
    };
    let args = [x.arg(), y.arg(), n];
    // SAFETY: (const float* x, bf16* y, unsigned long long n) as declared; x and y hold n values;
    // the 64-bit grid-stride loop stays below n.
    unsafe { ex.launch(MODULE, "cast_f32_bf16", cfg, &args) }
}

/// `y = f32(x)` (exact) over equal-length buffers: bf16 values back to fp32 (checks, and fp32
/// consumers of bf16 results).
pub fn cast_bf16_f32<E: Exec>(
    ex: &E,
    x: &E::Buf<bf16>,
    y: &mut E::Buf<f32>,
    threads: u32,
) -> Result<()> {
    const OP: &str = "cast_bf16_f32";
    check_len(OP, "y", y.len(), x.len())?;
    let Some((cfg, n)) = flat64(OP, x.len(), threads)? else {
        return Ok(());
    };
    let args = [x.arg(), y.arg(), n];
    // SAFETY: (const bf16* x, float* y, unsigned long long n) as declared; x and y hold n values.
    unsafe { ex.launch(MODULE, "cast_bf16_f32", cfg, &args) }
}

/// `a + b` in fp32, rounded once to bf16, in a new buffer: two bf16 activations or gradients
/// summed (a residual branch's gradient meeting the shortcut's).
pub fn add_bf16<E: Exec>(
    ex: &E,
    a: &E::Buf<bf16>,
    b: &E::Buf<bf16>,
    threads: u32,
) -> Result<E::Buf<bf16>> {
    const OP: &str = "add_bf16";
    check_len(OP, "b", b.len(), a.len())?;
    let y = ex.alloc::<bf16>(a.len())?;
    let Some((cfg, n)) = flat64(OP, a.len(), threads)? else {
        return Ok(y);
    };
    let args = [a.arg(), b.arg(), y.arg(), n];
    // SAFETY: (const bf16* a, const bf16* b, bf16* y, unsigned long long n) as declared; a, b and
    // the fresh y hold n values.
    unsafe { ex.launch(MODULE, "add_bf16", cfg, &args)? };
    Ok(y)
}

/// `acc += b` (fp32 sum rounded to bf16) in place: [`add_bf16`]'s kernel with `y = a`, so a
/// gradient that several branches feed is summed without a second buffer.
pub fn add_assign_bf16<E: Exec>(
    ex: &E,
    acc: &mut E::Buf<bf16>,
    b: &E::Buf<bf16>,
    threads: u32,
) -> Result<()> {
    const OP: &str = "add_assign_bf16";
    check_len(OP, "b", b.len(), acc.len())?;
    let Some((cfg, n)) = flat64(OP, acc.len(), threads)? else {
        return Ok(());
    };
    let args = [acc.arg(), b.arg(), acc.arg(), n];
    // SAFETY: (const bf16* a, const bf16* b, bf16* y, unsigned long long n) with y = a, which the
    // kernel allows (no __restrict__ on a, y; each element is read then written by one thread);
    // both buffers hold n values.
    unsafe { ex.launch(MODULE, "add_bf16", cfg, &args) }
}

/// `acc += f32(g)`: a bf16 weight gradient (cuDNN / cuBLASLt output) added to the fp32
/// gradient accumulator that the optimiser reads.
pub fn accumulate_bf16_f32<E: Exec>(
    ex: &E,
    g: &E::Buf<bf16>,
    acc: &mut E::Buf<f32>,
    threads: u32,
) -> Result<()> {
    const OP: &str = "accumulate_bf16_f32";
    check_len(OP, "acc", acc.len(), g.len())?;
    let Some((cfg, n)) = flat64(OP, g.len(), threads)? else {
        return Ok(());
    };
    let args = [g.arg(), acc.arg(), n];
    // SAFETY: (const bf16* g, float* acc, unsigned long long n) as declared; g and acc hold n
    // values.
    unsafe { ex.launch(MODULE, "accumulate_bf16_f32", cfg, &args) }
}

/// `acc += g` in fp32: batch norm's dγ/dβ (fp32) added to the gradient accumulator.
pub fn accumulate_f32<E: Exec>(
    ex: &E,
    g: &E::Buf<f32>,
    acc: &mut E::Buf<f32>,
    threads: u32,
) -> Result<()> {
    const OP: &str = "accumulate_f32";
    check_len(OP, "acc", acc.len(), g.len())?;
    let Some((cfg, n)) = flat64(OP, g.len(), threads)? else {
        return Ok(());
    };
    let args = [g.arg(), acc.arg(), n];
    // SAFETY: (const float* g, float* acc, unsigned long long n) as declared; g and acc hold n
    // values (distinct buffers: `&mut acc` cannot alias `&g`).
    unsafe { ex.launch(MODULE, "accumulate_f32", cfg, &args) }
}

// ---------------------------------------------------------------------------------------------
// The device check's rows

const GROUP: &str = "elementwise";
const AIM: &str = "aim: >= 70% of copy bandwidth (%floor)";

/// `x + b` per row (the pre-activation), in f32.
fn add_rows(x: &[f32], b: &[f32]) -> Vec<f32> {
    let c = b.len();
    x.iter().enumerate().map(|(i, &v)| v + b[i % c]).collect()
}

/// Column sums in f64, rounded once.
fn col_sums(a: &[f32], c: usize) -> Vec<f32> {
    let mut s = vec![0.0f64; c];
    for row in a.chunks(c) {
        s.iter_mut().zip(row).for_each(|(s, &v)| *s += v as f64);
    }
    s.into_iter().map(|v| v as f32).collect()
}

/// A drop-path mask keeping about 90% of the samples (ViT-S's deepest block drops 10%), with
/// at least one dropped and one kept sample.
fn mask_of(b: usize) -> Vec<bool> {
    let r = random("ew.dp.mask", b);
    let mut m: Vec<bool> = r.iter().map(|&v| v > -0.8).collect();
    m[0] = false;
    if b > 1 {
        m[1] = true;
    }
    m
}

/// The rows of this family: GELU+bias forward/backward and the column sum at ViT-S's MLP width
/// ([64·197, 1536]), bias add and drop path (+ residual) on the residual stream ([64·197, 384],
/// i.e. [64, 197·384] per sample), attention softmax forward/backward at [64·6·197, 197]. Quick:
/// 2 images instead of 64 (1 for the softmax). The casts and accumulations run over ResNet-50's
/// 25.6 M parameters (100 003 when quick).
pub fn check_rows<E: Exec>(c: &mut Checker<'_, E>) {
    let imgs = if c.opts.quick { 2 } else { 64 };
    let tokens = imgs * 197;
    gelu_rows(c, tokens, 1536);
    bias_rows(c, tokens, 384);
    drop_path_rows(c, imgs, 197 * 384);
    let heads_rows = if c.opts.quick { 6 * 197 } else { 64 * 6 * 197 };
    softmax_rows(c, heads_rows, 197);
    flat_rows(
        c,
        if c.opts.quick {
            100_003
        } else {
            RESNET50_PARAMS
        },
    );
}

fn gelu_rows<E: Exec>(c: &mut Checker<'_, E>, r: usize, d: usize) {
    let n = (r * d) as f64;
    let shape = format!("[{r}, {d}] bf16 + bias f32");
    let spec = |dir: &str| json!({"kind": "gelu_bias", "dir": dir, "rows": r, "cols": d});
    c.row(GROUP, "gelu_bias_fwd", shape.clone(), spec("fwd"), |c| {
        let x = round_bf16(&random("ew.gelu.x", r * d));
        let b = random("ew.gelu.b", d);
        let want = gelu_forward(&Tensor::from_vec(add_rows(&x, &b), &[r, d])?)?;
        let (xd, bd) = (c.dev.upload_bf16(&x)?, c.dev.upload(&b)?);
        let y = gelu_bias_forward(c.dev, &xd, Some(&bd), r, d, THREADS)?;
        let got = c.dev.download_bf16(&y)?;
        let t = c.time(|| gelu_bias_forward(c.dev, &xd, Some(&bd), r, d, THREADS).map(drop))?;
        Ok(Measured {
            err: Some((rel_l2(&got, want.data()), TOL_BF16)),
            time: Some(t),
            flops: 20.0 * n,
            bytes: 4.0 * n + 4.0 * d as f64,
            note: AIM.into(),
            ..Default::default()
        })
    });
    c.row(GROUP, "gelu_bias_bwd", shape.clone(), spec("bwd"), |c| {
        let x = round_bf16(&random("ew.gelu.x", r * d));
        let dy = round_bf16(&random("ew.gelu.dy", r * d));
        let b = random("ew.gelu.b", d);
        let u = Tensor::from_vec(add_rows(&x, &b), &[r, d])?;
        let want = gelu_backward(&Tensor::from_vec(dy.clone(), &[r, d])?, &u)?;
        let (xd, gd, bd) = (
            c.dev.upload_bf16(&x)?,
            c.dev.upload_bf16(&dy)?,
            c.dev.upload(&b)?,
        );
        let du = gelu_bias_backward(c.dev, &gd, &xd, Some(&bd), r, d, THREADS)?;
        let got = c.dev.download_bf16(&du)?;
        let t =
            c.time(|| gelu_bias_backward(c.dev, &gd, &xd, Some(&bd), r, d, THREADS).map(drop))?;
        Ok(Measured {
            err: Some((rel_l2(&got, want.data()), TOL_BF16)),
            time: Some(t),
            flops: 30.0 * n,
            bytes: 6.0 * n + 4.0 * d as f64,
            note: AIM.into(),
            ..Default::default()
        })
    });
    c.row(
        GROUP,
        "column_sum",
        format!("[{r}, {d}] bf16 -> [{d}] f32"),
        json!({"kind": "column_sum", "rows": r, "cols": d}),
        |c| {
            let a = round_bf16(&random("ew.colsum.a", r * d));
            let want = col_sums(&a, d);
            let ad = c.dev.upload_bf16(&a)?;
            let rpb = COLUMN_SUM_ROWS_PER_BLOCK;
            let s = column_sum(c.dev, &ad, r, d, rpb, THREADS)?;
            let got = c.dev.download(&s)?;
            let t = c.time(|| column_sum(c.dev, &ad, r, d, rpb, THREADS).map(drop))?;
            Ok(Measured {
                // fp32 sums of bf16 values in another order than the f64 reference.
                err: Some((rel_l2(&got, &want), super::check::TOL_F32)),
                time: Some(t),
                flops: n,
                bytes: 2.0 * n + 4.0 * d as f64,
                note: AIM.into(),
                ..Default::default()
            })
        },
    );
}

fn bias_rows<E: Exec>(c: &mut Checker<'_, E>, r: usize, d: usize) {
    let n = (r * d) as f64;
    c.row(
        GROUP,
        "bias_add",
        format!("[{r}, {d}] bf16 + bias f32, in place"),
        json!({"kind": "bias_add", "rows": r, "cols": d}),
        |c| {
            let x = round_bf16(&random("ew.badd.x", r * d));
            let b = random("ew.badd.b", d);
            let want = add_rows(&x, &b);
            let mut xd = c.dev.upload_bf16(&x)?;
            let bd = c.dev.upload(&b)?;
            bias_add(c.dev, &mut xd, &bd, r, d, THREADS)?;
            let got = c.dev.download_bf16(&xd)?;
            // In place: the timed runs keep adding the bias (values stay small enough).
            let t = c.time(|| bias_add(c.dev, &mut xd, &bd, r, d, THREADS))?;
            Ok(Measured {
                err: Some((rel_l2(&got, &want), TOL_BF16)),
                time: Some(t),
                flops: n,
                bytes: 4.0 * n + 4.0 * d as f64,
                note: AIM.into(),
                ..Default::default()
            })
        },
    );
}

fn drop_path_rows<E: Exec>(c: &mut Checker<'_, E>, b: usize, m: usize) {
    let n = (b * m) as f64;
    let p = 0.1;
    let shape = format!("[{b}, {m}] bf16 p{p}");
    c.row(
        GROUP,
        "drop_path",
        shape.clone(),
        json!({"kind": "drop_path", "add": false, "b": b, "m": m, "p": p}),
        |c| {
            let x = round_bf16(&random("ew.dp.x", b * m));
            let mask = mask_of(b);
            let want = drop_path_forward(&Tensor::from_vec(x.clone(), &[b, m])?, &mask, p, true)?;
            let (xd, md) = (c.dev.upload_bf16(&x)?, upload_mask(c.dev, &mask)?);
            let y = drop_path(c.dev, &xd, &md, p, b, m, THREADS)?;
            let got = c.dev.download_bf16(&y)?;
            let t = c.time(|| drop_path(c.dev, &xd, &md, p, b, m, THREADS).map(drop))?;
            Ok(Measured {
                err: Some((rel_l2(&got, want.data()), TOL_BF16)),
                time: Some(t),
                flops: n,
                bytes: 4.0 * n + b as f64,
                note: AIM.into(),
                ..Default::default()
            })
        },
    );
    c.row(
        GROUP,
        "drop_path_add",
        shape,
        json!({"kind": "drop_path", "add": true, "b": b, "m": m, "p": p}),
        |c| {
            let x = round_bf16(&random("ew.dp.x", b * m));
            let r = round_bf16(&random("ew.dp.r", b * m));
            let mask = mask_of(b);
            let dp = drop_path_forward(&Tensor::from_vec(x.clone(), &[b, m])?, &mask, p, true)?;
            let want: Vec<f32> = r.iter().zip(dp.data()).map(|(a, b)| a + b).collect();
            let (xd, rd, md) = (
                c.dev.upload_bf16(&x)?,
                c.dev.upload_bf16(&r)?,
                upload_mask(c.dev, &mask)?,
            );
            let y = drop_path_add(c.dev, &rd, &xd, &md, p, b, m, THREADS)?;
            let got = c.dev.download_bf16(&y)?;
            let t = c.time(|| drop_path_add(c.dev, &rd, &xd, &md, p, b, m, THREADS).map(drop))?;
            Ok(Measured {
                err: Some((rel_l2(&got, &want), TOL_BF16)),
                time: Some(t),
                flops: 2.0 * n,
                bytes: 6.0 * n + b as f64,
                note: AIM.into(),
                ..Default::default()
            })
        },
    );
}

fn softmax_rows<E: Exec>(c: &mut Checker<'_, E>, rows: usize, n: usize) {
    let scale = 1.0 / 8.0f32; // 1/sqrt(head dim 64)
    let shape = format!("[{rows}, {n}] bf16 scale 1/8");
    let spec = |dir: &str| json!({"kind": "attn_softmax", "dir": dir, "rows": rows, "n": n, "scale": scale});
    let e = (rows * n) as f64;
    // Scores of a few units (|scale·S| up to 0.5 would be too flat to test the max subtraction).
    let scores = || -> Vec<f32> {
        round_bf16(
            &random("ew.att.s", rows * n)
                .iter()
                .map(|v| 24.0 * v)
                .collect::<Vec<_>>(),
        )
    };
    c.row(GROUP, "attn_softmax_fwd", shape.clone(), spec("fwd"), |c| {
        let s = scores();
        let scaled: Vec<f32> = s.iter().map(|v| v * scale).collect();
        let want = softmax_forward(&Tensor::from_vec(scaled, &[rows, n])?)?;
        let sd = c.dev.upload_bf16(&s)?;
        let p = attn_softmax_forward(c.dev, &sd, rows, n, scale, THREADS)?;
        let got = c.dev.download_bf16(&p)?;
        let t = c.time(|| attn_softmax_forward(c.dev, &sd, rows, n, scale, THREADS).map(drop))?;
        Ok(Measured {
            err: Some((rel_l2(&got, want.data()), TOL_BF16)),
            time: Some(t),
            flops: 5.0 * e,
            bytes: 4.0 * e,
            note: AIM.into(),
            ..Default::default()
        })
    });
    c.row(GROUP, "attn_softmax_bwd", shape, spec("bwd"), |c| {
        // P from the CPU softmax (rounded as the forward stores it), dP fresh.
        let s = scores();
        let scaled: Vec<f32> = s.iter().map(|v| v * scale).collect();
        let p = round_bf16(softmax_forward(&Tensor::from_vec(scaled, &[rows, n])?)?.data());
        let dp = round_bf16(&random("ew.att.dp", rows * n));
        let want: Vec<f32> = softmax_backward(
            &Tensor::from_vec(dp.clone(), &[rows, n])?,
            &Tensor::from_vec(p.clone(), &[rows, n])?,
        )?
        .data()
        .iter()
        .map(|v| v * scale)
        .collect();
        let (gd, pd) = (c.dev.upload_bf16(&dp)?, c.dev.upload_bf16(&p)?);
        let ds = attn_softmax_backward(c.dev, &gd, &pd, rows, n, scale, THREADS)?;
        let got = c.dev.download_bf16(&ds)?;
        let t =
            c.time(|| attn_softmax_backward(c.dev, &gd, &pd, rows, n, scale, THREADS).map(drop))?;
        Ok(Measured {
            err: Some((rel_l2(&got, &want), TOL_BF16)),
            time: Some(t),
            flops: 5.0 * e,
            bytes: 6.0 * e,
            note: AIM.into(),
            ..Default::default()
        })
    });
}

/// The flat rows: every one exact (bit for bit against `half` and f32 addition), so held to 0.
fn flat_rows<E: Exec>(c: &mut Checker<'_, E>, n: usize) {
    let nf = n as f64;
    let exact = "exact; ".to_string() + AIM;
    c.row(
        GROUP,
        "cast_f32_bf16",
        format!("[{n}] f32 -> bf16"),
        json!({"kind": "cast", "from": "f32", "to": "bf16", "n": n}),
        |c| {
            let x = random("ew.cast.w", n);
            let want = round_bf16(&x);
            let xd = c.dev.upload(&x)?;
            let mut y = c.dev.alloc::<bf16>(n)?;
            cast_f32_bf16(c.dev, &xd, &mut y, THREADS)?;
            let got = c.dev.download_bf16(&y)?;
            let t = c.time(|| cast_f32_bf16(c.dev, &xd, &mut y, THREADS))?;
            Ok(Measured {
                err: Some((rel_l2(&got, &want), 0.0)),
                time: Some(t),
                bytes: 6.0 * nf,
                note: exact.clone(),
                ..Default::default()
            })
        },
    );
    c.row(
        GROUP,
        "cast_bf16_f32",
        format!("[{n}] bf16 -> f32"),
        json!({"kind": "cast", "from": "bf16", "to": "f32", "n": n}),
        |c| {
            let x = round_bf16(&random("ew.cast.w", n));
            let xd = c.dev.upload_bf16(&x)?;
            let mut y = c.dev.alloc::<f32>(n)?;
            cast_bf16_f32(c.dev, &xd, &mut y, THREADS)?;
            let got = c.dev.download(&y)?;
            let t = c.time(|| cast_bf16_f32(c.dev, &xd, &mut y, THREADS))?;
            Ok(Measured {
                err: Some((rel_l2(&got, &x), 0.0)),
                time: Some(t),
                bytes: 6.0 * nf,
                note: exact.clone(),
                ..Default::default()
            })
        },
    );
    c.row(
        GROUP,
        "add_bf16",
        format!("[{n}] bf16 + bf16"),
        json!({"kind": "add_bf16", "n": n}),
        |c| {
            let a = round_bf16(&random("ew.add.a", n));
            let b = round_bf16(&random("ew.add.b", n));
            let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
            let (ad, bd) = (c.dev.upload_bf16(&a)?, c.dev.upload_bf16(&b)?);
            let y = add_bf16(c.dev, &ad, &bd, THREADS)?;
            let got = c.dev.download_bf16(&y)?;
            let t = c.time(|| add_bf16(c.dev, &ad, &bd, THREADS).map(drop))?;
            Ok(Measured {
                err: Some((rel_l2(&got, &round_bf16(&sum)), 0.0)),
                time: Some(t),
                flops: nf,
                bytes: 6.0 * nf,
                note: exact.clone(),
                ..Default::default()
            })
        },
    );
    for (id, g_bf16) in [("accumulate_bf16_f32", true), ("accumulate_f32", false)] {
        let g_name = if g_bf16 { "bf16" } else { "f32" };
        c.row(
            GROUP,
            id,
            format!("[{n}] f32 += {g_name}"),
            json!({"kind": "accumulate", "g": g_name, "n": n}),
            |c| {
                let acc = random("ew.acc.acc", n);
                let mut g = random("ew.acc.g", n);
                if g_bf16 {
                    g = round_bf16(&g);
                }
                let want: Vec<f32> = acc.iter().zip(&g).map(|(a, b)| a + b).collect();
                let mut accd = c.dev.upload(&acc)?;
                let (got, t) = if g_bf16 {
                    let gd = c.dev.upload_bf16(&g)?;
                    accumulate_bf16_f32(c.dev, &gd, &mut accd, THREADS)?;
                    let got = c.dev.download(&accd)?;
                    // The timed runs keep accumulating: values stay small (|acc| < reps + 2).
                    (
                        got,
                        c.time(|| accumulate_bf16_f32(c.dev, &gd, &mut accd, THREADS))?,
                    )
                } else {
                    let gd = c.dev.upload(&g)?;
                    accumulate_f32(c.dev, &gd, &mut accd, THREADS)?;
                    let got = c.dev.download(&accd)?;
                    (
                        got,
                        c.time(|| accumulate_f32(c.dev, &gd, &mut accd, THREADS))?,
                    )
                };
                Ok(Measured {
                    err: Some((rel_l2(&got, &want), 0.0)),
                    time: Some(t),
                    flops: nf,
                    bytes: if g_bf16 { 10.0 } else { 12.0 } * nf,
                    note: exact.clone(),
                    ..Default::default()
                })
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::device::{Emu, Mode};

    /// Random values over several magnitudes plus the awkward ones: exact halfway cases of the
    /// bf16 rounding (ties to even, both directions), values just past halfway, the largest
    /// finite f32 (rounds to infinity), subnormals, signed zeros, infinities and NaN.
    fn values(name: &str, n: usize) -> Vec<f32> {
        let specials = [
            0.0,
            -0.0,
            f32::from_bits(0x3f80_8000), // 1 + 2^-8: halfway, to even = 1.0
            f32::from_bits(0x3f81_8000), // halfway, to even = 0x3f82
            f32::from_bits(0xbf80_8001), // past halfway: away from zero
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            -f32::from_bits(0x0000_8000),
            f32::from_bits(0x007f_ffff),
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ];
        let r = random(name, n);
        (0..n)
            .map(|i| match specials.get(i) {
                Some(&v) => v,
                None => r[i] * [1.0, 1e-3, 1e5, 3e-39][i % 4],
            })
            .collect()
    }

    /// Bit-for-bit equality, NaN matching NaN.
    #[track_caller]
    fn assert_bits(what: &str, got: &[u32], want: &[u32], nan: impl Fn(u32) -> bool) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                g == w || (nan(g) && nan(w)),
                "{what}[{i}]: got {g:#x}, want {w:#x}"
            );
        }
    }
    fn bf_bits(v: &[bf16]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits() as u32).collect()
    }
    fn f_bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }
    fn bf_nan(b: u32) -> bool {
        bf16::from_bits(b as u16).is_nan()
    }
    fn f_nan(b: u32) -> bool {
        f32::from_bits(b).is_nan()
    }

    /// Every flat op against its host definition on `n` elements; outputs are poisoned
    /// allocations (0xFF: NaN) or inputs, so an unwritten or wrong element fails.
    fn check_flat(ex: &Emu, n: usize, threads: u32) {
        let what = format!("n{n} T{threads} {:?}", ex.mode);
        let x = values("ew.test.x", n);
        let want_bf: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let xd = ex.upload(&x).unwrap();
        let mut y = ex.alloc::<bf16>(n).unwrap();
        cast_f32_bf16(ex, &xd, &mut y, threads).unwrap();
        let got = ex.download(&y).unwrap();
        assert_bits(
            &format!("{what} f32->bf16"),
            &bf_bits(&got),
            &bf_bits(&want_bf),
            bf_nan,
        );

        let mut back = ex.alloc::<f32>(n).unwrap();
        cast_bf16_f32(ex, &y, &mut back, threads).unwrap();
        let want_f: Vec<f32> = want_bf.iter().map(|v| v.to_f32()).collect();
        assert_bits(
            &format!("{what} bf16->f32"),
            &f_bits(&ex.download(&back).unwrap()),
            &f_bits(&want_f),
            f_nan,
        );

        let b: Vec<bf16> = values("ew.test.b", n)
            .iter()
            .rev()
            .map(|&v| bf16::from_f32(v))
            .collect();
        let bd = ex.upload(&b).unwrap();
        let want_sum: Vec<bf16> = want_bf
            .iter()
            .zip(&b)
            .map(|(a, b)| bf16::from_f32(a.to_f32() + b.to_f32()))
            .collect();
        let s = add_bf16(ex, &y, &bd, threads).unwrap();
        assert_bits(
            &format!("{what} add"),
            &bf_bits(&ex.download(&s).unwrap()),
            &bf_bits(&want_sum),
            bf_nan,
        );
        add_assign_bf16(ex, &mut y, &bd, threads).unwrap();
        assert_bits(
            &format!("{what} add in place"),
            &bf_bits(&ex.download(&y).unwrap()),
            &bf_bits(&want_sum),
            bf_nan,
        );

        let acc0 = random("ew.test.acc", n);
        let mut acc = ex.upload(&acc0).unwrap();
        accumulate_bf16_f32(ex, &bd, &mut acc, threads).unwrap();
        let want1: Vec<f32> = acc0.iter().zip(&b).map(|(a, g)| a + g.to_f32()).collect();
        assert_bits(
            &format!("{what} acc += bf16"),
            &f_bits(&ex.download(&acc).unwrap()),
            &f_bits(&want1),
            f_nan,
        );
        accumulate_f32(ex, &xd, &mut acc, threads).unwrap();
        let want2: Vec<f32> = want1.iter().zip(&x).map(|(a, g)| a + g).collect();
        assert_bits(
            &format!("{what} acc += f32"),
            &f_bits(&ex.download(&acc).unwrap()),
            &f_bits(&want2),
            f_nan,
        );
    }

    #[test]
    fn casts_and_adds_are_bit_exact_in_both_modes() {
        check_flat(&Emu::new(Mode::Fibers), 1037, 96);
        check_flat(&Emu::new(Mode::Threads), 1037, 64);
        check_flat(&Emu::new(Mode::Fibers), 15, 256);
    }

    #[test]
    fn flat_grid_stride_covers_more_elements_than_the_grid_has_threads() {
        // 32 threads per block: n exceeds FLAT_MAX_BLOCKS · 32, so threads loop.
        let n = 200_003;
        assert!(n > FLAT_MAX_BLOCKS * 32);
        check_flat(&Emu::new(Mode::Fibers), n, 32);
    }

    #[test]
    fn flat_ops_reject_wrong_lengths_and_block_sizes_and_skip_empty_buffers() {
        let ex = Emu::new(Mode::Fibers);
        let (x, b) = (
            ex.upload(&[1.0f32; 5]).unwrap(),
            ex.upload_bf16(&[1.0; 5]).unwrap(),
        );
        let (mut y4, mut f4) = (ex.alloc::<bf16>(4).unwrap(), ex.alloc::<f32>(4).unwrap());
        let msg = |r: Result<()>| r.err().map(|e| e.to_string()).unwrap_or_default();
        let e = msg(cast_f32_bf16(&ex, &x, &mut y4, 64));
        assert!(
            e.contains("cast_f32_bf16") && e.contains("y has 4 elements, expected 5"),
            "{e}"
        );
        let e = msg(cast_bf16_f32(&ex, &b, &mut f4, 64));
        assert!(e.contains("cast_bf16_f32") && e.contains("y has 4"), "{e}");
        let e = add_bf16(&ex, &b, &y4, 64)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("add_bf16") && e.contains("b has 4 elements, expected 5"),
            "{e}"
        );
        let e = msg(add_assign_bf16(&ex, &mut y4, &b, 64));
        assert!(
            e.contains("add_assign_bf16") && e.contains("b has 5 elements, expected 4"),
            "{e}"
        );
        let e = msg(accumulate_bf16_f32(&ex, &b, &mut f4, 64));
        assert!(
            e.contains("accumulate_bf16_f32") && e.contains("acc has 4"),
            "{e}"
        );
        let e = msg(accumulate_f32(&ex, &x, &mut f4, 64));
        assert!(
            e.contains("accumulate_f32") && e.contains("acc has 4"),
            "{e}"
        );
        let mut y5 = ex.alloc::<bf16>(5).unwrap();
        for t in [0, 40, 2048] {
            let e = msg(cast_f32_bf16(&ex, &x, &mut y5, t));
            assert!(e.contains("threads per block"), "{e}");
        }
        // Empty buffers: nothing to launch, no error.
        let (e32, mut e16) = (ex.upload::<f32>(&[]).unwrap(), ex.alloc::<bf16>(0).unwrap());
        cast_f32_bf16(&ex, &e32, &mut e16, 64).unwrap();
        assert_eq!(add_bf16(&ex, &e16, &e16, 64).unwrap().len(), 0);
    }
}
