//! Device ops of `kernels/sinkhorn.cu`: SwAV/Suave's Sinkhorn-Knopp equipartition (the codes
//! of the swapped-prediction loss) from prototype scores, all in fp32 (exp(S/0.05) reaches
//! e^20 and overflows half precision). CPU reference of every op: `methods::sinkhorn`.
//!
//! Two paths, as the kernel file explains:
//! * [`sinkhorn_fused`] (`sinkhorn_fused`): every iteration in one single-block launch, for one
//!   GPU; it also handles 0 iterations (the global normalisation only).
//! * [`sinkhorn_blocked`] (`sinkhorn_pass`): one pass over the scores per iteration (plus one),
//!   spread over blocks of [`PASS_ROWS`] rows, with a caller-given all-reduce of the row sums
//!   between passes: the fast path for large B on one GPU (the single fused block runs on one
//!   SM) and the multi-rank path.
//! * the per-iteration kernels for several ranks: [`sinkhorn_row_sums`] (`sinkhorn_row_sums`,
//!   whose output is all-reduced between launches), [`sinkhorn_col_update`]
//!   (`sinkhorn_col_update`) and, after the last iteration, [`sinkhorn_codes`]
//!   (`sinkhorn_codes`). [`sinkhorn_per_iteration`] chains them with a caller-given all-reduce.
//!
//! Scores are `[B, K]` row-major (B samples of this rank, K prototypes contiguous); the codes
//! have the same layout, each row summing to 1. Every output is written in full by its kernel,
//! so outputs come from [`Exec::alloc`] (the emulation's poison would show any gap as NaN).
//!
//! This file also holds the family's rows of the device check ([`check_rows`]).

use super::check::{random, Checker, Measured, TOL_F32};
use super::{as_i32, check_len, check_threads, DevBuf, Exec, KArg, LaunchConfig};
use crate::dist::SingleProcess;
use crate::error::{Error, Result};
use crate::methods::sinkhorn::{sinkhorn, SinkhornParams};
use crate::tensor::Tensor;
use crate::testing::rel_l2;
use serde_json::json;
use std::cell::OnceCell;

/// The kernel module (`kernels/sinkhorn.cu`).
pub const MODULE: &str = "sinkhorn";

/// Threads of the single block of [`sinkhorn_fused`] on the GPU (the most a block can have:
/// the whole problem lives in one block).
pub const FUSED_THREADS: u32 = 1024;

/// Threads per block of the per-iteration kernels on the GPU.
pub const THREADS: u32 = 256;

/// Checks ε and the `[b, k]` scores; returns `(B, K, 1/ε)` as the kernels take them.
fn prepare<E: Exec>(
    op: &'static str,
    scores: &E::Buf<f32>,
    b: usize,
    k: usize,
    epsilon: f64,
    threads: u32,
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
    check_threads(op, threads)?;
    // The kernels index B·K with 32-bit integers.
    as_i32(op, "rows·prototypes", b * k)?;
    Ok((
        as_i32(op, "rows", b)?,
        as_i32(op, "prototypes", k)?,
        (1.0 / epsilon) as f32,
    ))
}

/// `b_total` (samples over all ranks) as the kernels' `float`, checked against the local rows.
fn total_rows(op: &'static str, b: usize, b_total: usize) -> Result<f32> {
    if b_total < b {
        return Err(Error::invalid(
            op,
            format!("b_total {b_total} is less than this rank's {b} rows: pass B x world size"),
        ));
    }
    as_i32(op, "b_total", b_total)?;
    Ok(b_total as f32)
}

/// Output of [`sinkhorn_fused`]: the codes and the scaling vectors, `Q = diag(v)·E·diag(u)·B`.
pub struct SinkhornCodes<E: Exec> {
    /// Codes `[B, K]`, each row summing to 1.
    pub codes: E::Buf<f32>,
    /// Prototype scaling `u[K]` of the last iteration.
    pub u: E::Buf<f32>,
    /// Sample scaling `v[B]` of the last iteration.
    pub v: E::Buf<f32>,
}

/// `sinkhorn_fused`: codes from scores `[b, k]` with every iteration in one launch (grid 1,
/// block `threads`, [`FUSED_THREADS`] on the GPU). The single-GPU path: no communication.
pub fn sinkhorn_fused<E: Exec>(
    ex: &E,
    scores: &E::Buf<f32>,
    b: usize,
    k: usize,
    p: SinkhornParams,
    threads: u32,
) -> Result<SinkhornCodes<E>> {
    const OP: &str = "sinkhorn_fused";
    let (bi, ki, inv_eps) = prepare::<E>(OP, scores, b, k, p.epsilon, threads)?;
    let it = as_i32(OP, "iterations", p.iterations)?;
    let out = SinkhornCodes::<E> {
        codes: ex.alloc(b * k)?,
        u: ex.alloc(k)?,
        v: ex.alloc(b)?,
    };
    let args = [
        scores.arg(),
        out.u.arg(),
        out.v.arg(),
        out.codes.arg(),
        KArg::I32(bi),
        KArg::I32(ki),
        KArg::F32(inv_eps),
        KArg::I32(it),
    ];
    // SAFETY: (const float* S, float* u, float* v, float* Q, int B, int K, float inv_eps,
    // int iterations) as the kernel declares; S and Q hold B·K floats, u K, v B (checked or
    // allocated above); one block touches nothing else.
    unsafe {
        ex.launch(
            MODULE,
            "sinkhorn_fused",
            LaunchConfig::linear(1, threads, 0),
            &args,
        )?
    };
    Ok(out)
}

/// `sinkhorn_row_sums`: `r[k] = Σ_b exp(S[b,k]/ε)·v_b` over this rank's rows (`v = None`: all
/// ones, the first iteration). Sum `r` over the ranks before [`sinkhorn_col_update`].
/// Launch: grid ⌈K/threads⌉, one thread per prototype ([`THREADS`] on the GPU).
pub fn sinkhorn_row_sums<E: Exec>(
    ex: &E,
    scores: &E::Buf<f32>,
    v: Option<&E::Buf<f32>>,
    b: usize,
    k: usize,
    epsilon: f64,
    threads: u32,
) -> Result<E::Buf<f32>> {
    const OP: &str = "sinkhorn_row_sums";
    let (bi, ki, inv_eps) = prepare::<E>(OP, scores, b, k, epsilon, threads)?;
    if let Some(v) = v {
        check_len(OP, "v", v.len(), b)?;
    }
    let r = ex.alloc::<f32>(k)?;
    let args = [
        scores.arg(),
        v.map_or(KArg::Ptr(0), |v| v.arg()),
        r.arg(),
        KArg::I32(bi),
        KArg::I32(ki),
        KArg::F32(inv_eps),
    ];
    let cfg = LaunchConfig::linear(k.div_ceil(threads as usize) as u32, threads, 0);
    // SAFETY: (const float* S, const float* v or null, float* r, int B, int K, float inv_eps);
    // S holds B·K floats, v B (or null: the kernel's "all ones"), r K; threads past K return.
    unsafe { ex.launch(MODULE, "sinkhorn_row_sums", cfg, &args)? };
    Ok(r)
}

/// `sinkhorn_col_update`: `v_b = 1/(b_total·Σ_k exp(S[b,k]/ε)/(K·r_k))` from the all-reduced
/// row sums `r[K]`; `b_total` = B × world size. Launch: one warp per sample, grid
/// ⌈B/(threads/32)⌉ ([`THREADS`] on the GPU).
#[allow(clippy::too_many_arguments)]
pub fn sinkhorn_col_update<E: Exec>(
    ex: &E,
    scores: &E::Buf<f32>,
    r: &E::Buf<f32>,
    b: usize,
    k: usize,
    epsilon: f64,
    b_total: usize,
    threads: u32,
) -> Result<E::Buf<f32>> {
    const OP: &str = "sinkhorn_col_update";
    let (bi, ki, inv_eps) = prepare::<E>(OP, scores, b, k, epsilon, threads)?;
    check_len(OP, "r", r.len(), k)?;
    let bt = total_rows(OP, b, b_total)?;
    let v = ex.alloc::<f32>(b)?;
    let args = [
        scores.arg(),
        r.arg(),
        v.arg(),
        KArg::I32(bi),
        KArg::I32(ki),
        KArg::F32(inv_eps),
        KArg::F32(bt),
    ];
    let cfg = LaunchConfig::linear(b.div_ceil(threads as usize / 32) as u32, threads, 0);
    // SAFETY: (const float* S, const float* r, float* v, int B, int K, float inv_eps,
    // float b_total); S holds B·K floats, r K, v B; warps past B return as a whole.
    unsafe { ex.launch(MODULE, "sinkhorn_col_update", cfg, &args)? };
    Ok(v)
}

/// `sinkhorn_codes`: `Q[b,k] = exp(S[b,k]/ε)/(K·r_k)·v_b·b_total` from the last iteration's
/// all-reduced `r[K]` and `v[B]`. Launch: one thread per code, grid ⌈B·K/threads⌉.
#[allow(clippy::too_many_arguments)]
pub fn sinkhorn_codes<E: Exec>(
    ex: &E,
    scores: &E::Buf<f32>,
    r: &E::Buf<f32>,
    v: &E::Buf<f32>,
    b: usize,
    k: usize,
    epsilon: f64,
    b_total: usize,
    threads: u32,
) -> Result<E::Buf<f32>> {
    const OP: &str = "sinkhorn_codes";
    let (bi, ki, inv_eps) = prepare::<E>(OP, scores, b, k, epsilon, threads)?;
    check_len(OP, "r", r.len(), k)?;
    check_len(OP, "v", v.len(), b)?;
    let bt = total_rows(OP, b, b_total)?;
    let q = ex.alloc::<f32>(b * k)?;
    let args = [
        scores.arg(),
        r.arg(),
        v.arg(),
        q.arg(),
        KArg::I32(bi),
        KArg::I32(ki),
        KArg::F32(inv_eps),
        KArg::F32(bt),
    ];
    let cfg = LaunchConfig::linear((b * k).div_ceil(threads as usize) as u32, threads, 0);
    // SAFETY: (const float* S, const float* r, const float* v, float* Q, int B, int K,
    // float inv_eps, float b_total); S and Q hold B·K floats, r K, v B; threads past B·K return.
    unsafe { ex.launch(MODULE, "sinkhorn_codes", cfg, &args)? };
    Ok(q)
}

/// The codes through the per-iteration kernels: per iteration [`sinkhorn_row_sums`], then
/// `all_reduce` (sums the row sums over the ranks in place: NCCL on GPUs, nothing on one
/// process), then [`sinkhorn_col_update`]; finally [`sinkhorn_codes`]. `b_total` is the
/// number of samples over all ranks (`b` on one process). At least one iteration: the
/// 0-iteration case (global normalisation only) is [`sinkhorn_fused`]'s.
#[allow(clippy::too_many_arguments)]
pub fn sinkhorn_per_iteration<E, R>(
    ex: &E,
    scores: &E::Buf<f32>,
    b: usize,
    k: usize,
    p: SinkhornParams,
    b_total: usize,
    threads: u32,
    mut all_reduce: R,
) -> Result<E::Buf<f32>>
where
    E: Exec,
    R: FnMut(&mut E::Buf<f32>) -> Result<()>,
{
    const OP: &str = "sinkhorn_per_iteration";
    if p.iterations == 0 {
        return Err(Error::invalid(
            OP,
            "0 iterations: use sinkhorn_fused (it does the global normalisation)",
        ));
    }
    prepare::<E>(OP, scores, b, k, p.epsilon, threads)?;
    total_rows(OP, b, b_total)?;
    let mut v: Option<E::Buf<f32>> = None;
    let mut r: Option<E::Buf<f32>> = None;
    for _ in 0..p.iterations {
        let mut rs = sinkhorn_row_sums(ex, scores, v.as_ref(), b, k, p.epsilon, threads)?;
        all_reduce(&mut rs)?;
        v = Some(sinkhorn_col_update(
            ex, scores, &rs, b, k, p.epsilon, b_total, threads,
        )?);
        r = Some(rs);
    }
    match (r, v) {
        (Some(r), Some(v)) => sinkhorn_codes(ex, scores, &r, &v, b, k, p.epsilon, b_total, threads),
        _ => Err(Error::invalid(OP, "no iteration ran")),
    }
}

/// Sample rows per block of [`sinkhorn_blocked`] on the GPU: B = 4096 gives 128 blocks, about
/// one per SM of an H200.
pub const PASS_ROWS: usize = 32;

/// The codes through the blocked passes (`sinkhorn_pass`): `iterations + 1` launches, each one
/// pass over this rank's scores spread over `ceil(b / rows_per_block)` blocks, with
/// `all_reduce` (in place, over the ranks; nothing on one process) applied to the row sums
/// between passes. The fast path for large `b` on one GPU, and the multi-rank path. `b_total`
/// is the number of samples over all ranks. At least one iteration (the 0-iteration case is
/// [`sinkhorn_fused`]'s).
#[allow(clippy::too_many_arguments)]
pub fn sinkhorn_blocked<E, R>(
    ex: &E,
    scores: &E::Buf<f32>,
    b: usize,
    k: usize,
    p: SinkhornParams,
    b_total: usize,
    rows_per_block: usize,
    threads: u32,
    mut all_reduce: R,
) -> Result<E::Buf<f32>>
where
    E: Exec,
    R: FnMut(&mut E::Buf<f32>) -> Result<()>,
{
    const OP: &str = "sinkhorn_blocked";
    if p.iterations == 0 {
        return Err(Error::invalid(
            OP,
            "0 iterations: use sinkhorn_fused (it does the global normalisation)",
        ));
    }
    let (bi, ki, inv_eps) = prepare::<E>(OP, scores, b, k, p.epsilon, threads)?;
    let bt = total_rows(OP, b, b_total)?;
    if rows_per_block == 0 {
        return Err(Error::invalid(OP, "rows_per_block must be at least 1"));
    }
    let rpb = as_i32(OP, "rows_per_block", rows_per_block.min(b))?;
    let blocks = b.div_ceil(rows_per_block.min(b));
    // u [K] and v of the block's rows in shared memory: at most what a Hopper block can have.
    let shared_bytes = 4 * (k + rows_per_block.min(b));
    if shared_bytes > 227 * 1024 {
        return Err(Error::invalid(
            OP,
            format!("K = {k}: {shared_bytes} bytes of shared memory per block exceed 227 KiB"),
        ));
    }
    let cfg = LaunchConfig::linear(as_i32(OP, "blocks", blocks)? as u32, threads, shared_bytes);
    let partial = ex.alloc::<f32>(blocks * k)?;
    let counter = ex.zeros::<u32>(1)?;
    let mut r = ex.alloc::<f32>(k)?;
    let mut r_next = ex.alloc::<f32>(k)?;
    let q = ex.alloc::<f32>(b * k)?;
    let null = KArg::Ptr(0);
    for pass in 0..=p.iterations {
        let first = pass == 0;
        let last = pass == p.iterations;
        let (r_in, r_out) = if first {
            (null, r.arg())
        } else if last {
            (r.arg(), null)
        } else {
            (r.arg(), r_next.arg())
        };
        let args = [
            scores.arg(),
            r_in,
            partial.arg(),
            counter.arg(),
            r_out,
            null,
            if last { q.arg() } else { null },
            KArg::I32(bi),
            KArg::I32(ki),
            KArg::F32(inv_eps),
            KArg::F32(bt),
            KArg::I32(rpb),
        ];
        // SAFETY: (const float* S, const float* r_in or null, float* partial [blocks·K],
        // unsigned* counter (zeroed, left zeroed), float* r_out [K] or null, float* v_out
        // (null), float* Q [B·K] or null, int, int, float, float, int) as the kernel declares;
        // lengths checked above; (K + rows) floats of dynamic shared memory.
        unsafe { ex.launch(MODULE, "sinkhorn_pass", cfg, &args)? };
        if first {
            all_reduce(&mut r)?;
        } else if !last {
            all_reduce(&mut r_next)?;
            std::mem::swap(&mut r, &mut r_next);
        }
    }
    Ok(q)
}

/// `exp(S/ε)` in f64 on the host (the per-step references).
fn exp_scores(s: &[f32], epsilon: f64) -> Vec<f64> {
    s.iter().map(|&x| (x as f64 / epsilon).exp()).collect()
}

/// Positive scalings like the iterations produce, spread over two orders of magnitude.
fn scaling(name: &str, n: usize, scale: f64) -> Vec<f32> {
    random(name, n)
        .iter()
        .map(|&x| (scale * 10f64.powf(x as f64)) as f32)
        .collect()
}

/// The device check's rows of this family: the fused and the per-iteration codes against
/// `methods::sinkhorn`, and each per-iteration kernel against its formula in f64, at the aim's
/// shape (K = 1000, B = 4096, 3 iterations) and Suave's per-GPU shape (queue 480 + batch 32
/// rows, 3000 prototypes); 256 × 1000 with `quick`.
pub fn check_rows<E: Exec>(c: &mut Checker<'_, E>) {
    let p = SinkhornParams::default();
    let shapes: &[(usize, usize)] = if c.opts.quick {
        &[(256, 1000)]
    } else {
        &[(4096, 1000), (512, 3000)]
    };
    let err = |e: &Error| Error::invalid("device-check", e.to_string());
    for &(b, k) in shapes {
        let bk = (b * k) as f64;
        // Cosine-like scores in [-1, 1): the whole range exp(S/0.05) meets.
        let s = random(&format!("sk.{b}.{k}"), b * k);
        // The CPU reference, computed when a row that needs it runs (not when filtered out).
        let want = OnceCell::new();
        let want = || {
            want.get_or_init(|| {
                Tensor::from_vec(s.clone(), &[b, k]).and_then(|t| sinkhorn(&t, p, &SingleProcess))
            })
            .as_ref()
        };
        let shape = format!("B{b} K{k} it{}", p.iterations);
        let torch = json!({"kind": "sinkhorn", "b": b, "k": k, "iters": p.iterations});
        let aim = "aim: >= 5x the official PyTorch function (torch/eng column)";
        // The three whole paths, each against the reference; the aim row is the fastest of them.
        for path in ["fused", "per_iter", "blocked"] {
            c.row(
                "sinkhorn",
                &format!("sinkhorn_{path}_b{b}_k{k}"),
                shape.clone(),
                torch.clone(),
                |c| {
                    let want = want().map_err(err)?;
                    let sd = c.dev.upload(&s)?;
                    let run = || match path {
                        "fused" => {
                            sinkhorn_fused(c.dev, &sd, b, k, p, FUSED_THREADS).map(|o| o.codes)
                        }
                        "per_iter" => {
                            sinkhorn_per_iteration(c.dev, &sd, b, k, p, b, THREADS, |_| Ok(()))
                        }
                        _ => {
                            sinkhorn_blocked(c.dev, &sd, b, k, p, b, PASS_ROWS, THREADS, |_| Ok(()))
                        }
                    };
                    let got = c.dev.download(&run()?)?;
                    let t = c.time(|| run().map(drop))?;
                    Ok(Measured {
                        err: Some((rel_l2(&got, want.data()), TOL_F32)),
                        time: Some(t),
                        // Reads S, writes Q (the scaling vectors are negligible).
                        bytes: 8.0 * bk,
                        note: aim.into(),
                        ..Default::default()
                    })
                },
            );
        }
        // The per-iteration kernels one by one, on scalings like a middle iteration's.
        let eps = p.epsilon;
        let v = scaling(&format!("sk.v.{b}.{k}"), b, 1.0 / b as f64);
        let r = scaling(&format!("sk.r.{b}.{k}"), k, b as f64);
        let step = |kind: &str| json!({"kind": kind, "b": b, "k": k, "eps": eps});
        c.row(
            "sinkhorn",
            &format!("sinkhorn_row_sums_b{b}_k{k}"),
            format!("B{b} K{k}"),
            step("sinkhorn_row_sums"),
            |c| {
                let e = exp_scores(&s, eps);
                let mut want = vec![0f64; k];
                for (row, &vb) in e.chunks_exact(k).zip(&v) {
                    want.iter_mut()
                        .zip(row)
                        .for_each(|(w, &x)| *w += x * vb as f64);
                }
                let want: Vec<f32> = want.iter().map(|&x| x as f32).collect();
                let (sd, vd) = (c.dev.upload(&s)?, c.dev.upload(&v)?);
                let run = || sinkhorn_row_sums(c.dev, &sd, Some(&vd), b, k, eps, THREADS);
                let got = c.dev.download(&run()?)?;
                let t = c.time(|| run().map(drop))?;
                Ok(Measured {
                    err: Some((rel_l2(&got, &want), TOL_F32)),
                    time: Some(t),
                    bytes: 4.0 * (bk + (b + k) as f64),
                    note: "aim: >= 70% of copy bandwidth (%floor)".into(),
                    ..Default::default()
                })
            },
        );
        c.row(
            "sinkhorn",
            &format!("sinkhorn_col_update_b{b}_k{k}"),
            format!("B{b} K{k}"),
            step("sinkhorn_col_update"),
            |c| {
                let e = exp_scores(&s, eps);
                let want: Vec<f32> = e
                    .chunks_exact(k)
                    .map(|row| {
                        let c: f64 = row
                            .iter()
                            .zip(&r)
                            .map(|(&x, &rk)| x / (k as f64 * rk as f64))
                            .sum();
                        (1.0 / (b as f64 * c)) as f32
                    })
                    .collect();
                let (sd, rd) = (c.dev.upload(&s)?, c.dev.upload(&r)?);
                let run = || sinkhorn_col_update(c.dev, &sd, &rd, b, k, eps, b, THREADS);
                let got = c.dev.download(&run()?)?;
                let t = c.time(|| run().map(drop))?;
                Ok(Measured {
                    err: Some((rel_l2(&got, &want), TOL_F32)),
                    time: Some(t),
                    bytes: 4.0 * (bk + (b + k) as f64),
                    note: "aim: >= 70% of copy bandwidth (%floor)".into(),
                    ..Default::default()
                })
            },
        );
        c.row(
            "sinkhorn",
            &format!("sinkhorn_codes_b{b}_k{k}"),
            format!("B{b} K{k}"),
            step("sinkhorn_codes"),
            |c| {
                let e = exp_scores(&s, eps);
                let want: Vec<f32> = e
                    .iter()
                    .enumerate()
                    .map(|(i, &x)| {
                        (x / (k as f64 * r[i % k] as f64) * v[i / k] as f64 * b as f64) as f32
                    })
                    .collect();
                let (sd, rd, vd) = (c.dev.upload(&s)?, c.dev.upload(&r)?, c.dev.upload(&v)?);
                let run = || sinkhorn_codes(c.dev, &sd, &rd, &vd, b, k, eps, b, THREADS);
                let got = c.dev.download(&run()?)?;
                let t = c.time(|| run().map(drop))?;
                Ok(Measured {
                    err: Some((rel_l2(&got, &want), TOL_F32)),
                    time: Some(t),
                    bytes: 4.0 * (2.0 * bk + (b + k) as f64),
                    note: "aim: >= 70% of copy bandwidth (%floor)".into(),
                    ..Default::default()
                })
            },
        );
    }
}
