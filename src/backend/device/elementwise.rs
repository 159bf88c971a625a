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
//!
//! Launch configurations are the ones `kernels/elementwise.cu` documents: element-wise kernels
//! one thread per element (`ceil(n / T)` blocks of `T`), row kernels one warp per row
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
/// 2 images instead of 64 (1 for the softmax).
pub fn check_rows<E: Exec>(c: &mut Checker<'_, E>) {
    let imgs = if c.opts.quick { 2 } else { 64 };
    let tokens = imgs * 197;
    gelu_rows(c, tokens, 1536);
    bias_rows(c, tokens, 384);
    drop_path_rows(c, imgs, 197 * 384);
    let heads_rows = if c.opts.quick { 6 * 197 } else { 64 * 6 * 197 };
    softmax_rows(c, heads_rows, 197);
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
