//! The GPU check: every GPU op against the CPU backend (relative L2 error), every op's time
//! against the floor set by the machine's own ceilings, in one run of a few minutes.
//!
//! Ceilings are measured first, on the device itself (as the project's method asks): a large
//! device-to-device copy (bytes read + written per second) and a large bf16 GEMM through
//! `Exec::gemm` (cuBLASLt; FLOP/s). An op's floor is `max(bytes / copy rate, flops / GEMM
//! rate)`, with bytes counted as each input read once and each output written once; the table
//! gives the op's median time (CUDA events, after warm-up) and the floor as a percentage of it.
//!
//! The rows here are the GPU-only ones (ceilings, the runtime's own kernel, nvJPEG, the
//! allocator); the GEMM and convolution rows are `backend::device::blas::check_rows` (cuBLASLt
//! and cuDNN reached through `Exec::gemm`, `Exec::conv_forward`, ...: the very path the device
//! model takes), and the engine's own kernels are checked by the device ops' rows
//! ([`kernel_rows`]); both are generic over `Exec`, so they also run on the CPU emulation.
//! Correctness rules, the row runner and the report are in `backend::device::check`.

use super::alloc::AllocStats;
use super::context::Gpu;
use super::device::{gpu_available, probe};
use super::module::LaunchDims;
use crate::backend::device::blas::{self, Epilogue, Gemm};
pub use crate::backend::device::check::{
    finish, kernel_rows, random, round_bf16, CheckOptions, CheckReport, CheckRow, Checker,
    Measured, TOL_BF16, TOL_F32,
};
use crate::backend::device::Exec;
use crate::error::{Error, Result};
use crate::testing::rel_l2;
use cudarc::driver::PushKernelArg;
use half::bf16;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Tolerance of a GPU JPEG decode against the CPU decoder (IDCT and chroma upsampling differ by
/// a few levels on some pixels).
pub const TOL_JPEG: f64 = 3e-2;

/// Runs the whole check on `opts.device`. Errors only when there is no GPU to check (the message
/// says why); op failures are rows with `passed: false`.
pub fn run_check(opts: &CheckOptions) -> Result<CheckReport> {
    if !gpu_available() {
        return Err(Error::invalid(
            "device-check",
            format!(
                "no GPU: {} (run scripts/device-check.sh on a machine with an NVIDIA GPU; it sets LD_LIBRARY_PATH to pip's CUDA libraries)",
                probe().reason.as_deref().unwrap_or("no CUDA device")
            ),
        ));
    }
    let gpu = Gpu::new(opts.device)?;
    let info = gpu.info().clone();
    let mut c = Checker::new(&gpu, opts);
    ceilings(&mut c);
    runtime_rows(&mut c);
    blas::check_rows(&mut c);
    jpeg_rows(&mut c);
    alloc_rows(&mut c);
    kernel_rows(&mut c);
    // Whole-model rows last: they use the ops every row above checked one by one.
    crate::models::device::verify::check_rows(&mut c);
    let (bytes_per_ms, flops_per_ms) = (c.bytes_per_ms, c.flops_per_ms);
    let rows = c.into_rows();
    let stats: AllocStats = gpu.alloc_stats();
    let passed = rows.iter().all(|r| r.passed);
    Ok(CheckReport {
        device: format!(
            "cuda:{} {} (sm_{}{}, {:.1} GiB)",
            info.ordinal,
            info.name,
            info.compute_capability.0,
            info.compute_capability.1,
            info.total_mem as f64 / (1u64 << 30) as f64
        ),
        libraries: probe().summary(),
        kernel_compiler: super::module::table::COMPILER.to_string(),
        copy_gbps: bytes_per_ms * 1e3 / 1e9,
        gemm_tflops: flops_per_ms * 1e3 / 1e12,
        rows,
        alloc_peak_bytes: stats.peak_in_use,
        alloc_misses: stats.misses,
        alloc_hits: stats.hits,
        passed,
    })
}

/// The CLI entry (`sdengine device-check`): runs the check, prints the table, writes the report
/// as JSON to `json` when given, and errors when there is no GPU or any row failed.
pub fn cli(opts: &CheckOptions, json: Option<&Path>) -> Result<()> {
    finish(&run_check(opts)?, json)
}

/// The two ceilings: a large device-to-device copy and a large bf16 GEMM.
fn ceilings(c: &mut Checker<'_, Gpu>) {
    let bytes: usize = if c.opts.quick { 256 << 20 } else { 2 << 30 };
    let mut bw = 0.0;
    c.row(
        "ceiling",
        "copy_d2d",
        format!("{} MiB", bytes >> 20),
        json!({"kind": "copy", "bytes": bytes}),
        |c| {
            let src = c.dev.zeros::<u8>(bytes)?;
            let mut dst = c.dev.alloc::<u8>(bytes)?;
            // The copy is of zeros: a memcpy's speed does not depend on the values it moves.
            let t = c.time(|| c.dev.copy(&src, &mut dst))?;
            bw = 2.0 * bytes as f64 / t.median_ms;
            Ok(Measured {
                time: Some(t),
                bytes: 2.0 * bytes as f64,
                note: format!("{:.0} GB/s (read + write)", bw * 1e3 / 1e9),
                ..Default::default()
            })
        },
    );
    let n = if c.opts.quick { 2048 } else { 8192 };
    let mut rate = 0.0;
    c.row(
        "ceiling",
        "gemm_bf16",
        format!("{n}x{n}x{n}"),
        json!({"kind": "matmul", "m": n, "n": n, "k": n, "trans_a": false, "trans_b": false, "out": "bf16"}),
        |c| {
            let a = c.dev.upload_bf16(&random("ceil.a", n * n))?;
            let b = c.dev.upload_bf16(&random("ceil.b", n * n))?;
            let mut y = c.dev.alloc::<bf16>(n * n)?;
            let g = Gemm {
                m: n,
                n,
                k: n,
                trans_a: false,
                trans_b: false,
                epilogue: Epilogue::None,
                accumulate: false,
            };
            let t = c.time(|| c.dev.gemm(&g, &a, &b, None, &mut y))?;
            rate = g.flops() / t.median_ms;
            Ok(Measured {
                time: Some(t),
                flops: g.flops(),
                note: format!("{:.1} TFLOP/s on random data", rate * 1e3 / 1e12),
                ..Default::default()
            })
        },
    );
    c.bytes_per_ms = bw;
    c.flops_per_ms = rate;
}

/// The runtime's own NVRTC-compiled kernel: module loading, lookup and the launch helper.
fn runtime_rows(c: &mut Checker<'_, Gpu>) {
    let n: usize = if c.opts.quick { 1 << 20 } else { 1 << 26 };
    c.row(
        "runtime",
        "axpy_f32",
        format!("n={n}"),
        json!({"kind": "axpy", "n": n}),
        |c| {
            let x = random("axpy.x", n);
            let y0 = random("axpy.y", n);
            let a = 0.75f32;
            let k = c
                .dev
                .kernel(super::module::RUNTIME_MODULE.name, "axpy_f32")?;
            let xd = c.dev.upload(&x)?;
            let yd = c.dev.upload(&y0)?;
            let dims = LaunchDims::linear(n, 256, 132 * 16);
            let (xp, yp, nn) = (xd.ptr(), yd.ptr(), n as u64);
            let mut b = k.builder(c.dev.stream());
            b.arg(&a).arg(&xp).arg(&yp).arg(&nn);
            // SAFETY: (float, const float*, float*, u64) as the kernel declares; both buffers
            // hold n floats.
            unsafe { k.launch(&mut b, dims)? };
            let got = c.dev.download(&yd)?;
            let want: Vec<f32> = x.iter().zip(&y0).map(|(&x, &y)| a.mul_add(x, y)).collect();
            let err = rel_l2(&got, &want);
            // Timing reruns it on its own output: the values change, the work does not.
            let t = c.time(|| {
                let mut b = k.builder(c.dev.stream());
                b.arg(&a).arg(&xp).arg(&yp).arg(&nn);
                // SAFETY: as above.
                unsafe { k.launch(&mut b, dims) }
            })?;
            Ok(Measured {
                err: Some((err, 1e-6)),
                time: Some(t),
                flops: 2.0 * n as f64,
                bytes: 12.0 * n as f64,
                ..Default::default()
            })
        },
    );
}

/// JPEG files to decode: the options' paths, else the repository's fixtures and the samples.
fn jpeg_files(opts: &CheckOptions) -> Vec<PathBuf> {
    let roots: Vec<PathBuf> = if opts.images.is_empty() {
        let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        [cwd.clone(), here]
            .iter()
            .flat_map(|r| {
                [
                    r.join("tests/fixtures/data"),
                    r.join("shared/data/imagenet-samples"),
                    r.join("../shared/data/imagenet-samples"),
                ]
            })
            .collect()
    } else {
        opts.images.clone()
    };
    let mut out = Vec::new();
    let mut stack = roots;
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                let mut entries: Vec<PathBuf> =
                    rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
                entries.sort();
                stack.extend(entries.into_iter().rev());
            }
        } else if p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg"))
            && !out.contains(&p)
        {
            out.push(p);
        }
    }
    out
}

/// nvJPEG against the CPU decoder: each test JPEG alone, then the whole set as one timed batch.
fn jpeg_rows(c: &mut Checker<'_, Gpu>) {
    let files = jpeg_files(c.opts);
    let limit = if c.opts.quick { 16 } else { 256 };
    let files: Vec<PathBuf> = files.into_iter().take(limit).collect();
    c.row(
        "jpeg",
        "nvjpeg_decode_batch",
        format!("{} files", files.len()),
        json!({"kind": "jpeg", "files": files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>()}),
        |c| {
            if !super::nvjpeg::library_present() {
                return Ok(Measured {
                    skipped: true,
                    note: "SKIP: nvJPEG not found on this machine".into(),
                    ..Default::default()
                });
            }
            if files.is_empty() {
                return Ok(Measured {
                    skipped: true,
                    note: "SKIP: no JPEG files found (pass --images)".into(),
                    ..Default::default()
                });
            }
            let mut bytes = Vec::new();
            let mut refs = Vec::new();
            let mut names = Vec::new();
            let mut skipped = Vec::new();
            for f in &files {
                let b = std::fs::read(f).map_err(|err| Error::Io {
                    path: f.display().to_string(),
                    err,
                })?;
                // nvJPEG has no CMYK/YCCK path (4 components): such files stay on the CPU decoder.
                let cpu_img = crate::data::decode_bytes(&b, f)?;
                if crate::data::decode::sniff(&b).is_none() || f.to_string_lossy().contains("cmyk") {
                    skipped.push(f.display().to_string());
                    continue;
                }
                refs.push(cpu_img);
                names.push(f.clone());
                bytes.push(b);
            }
            let mut dec = super::nvjpeg::JpegDecoder::new(c.dev)?;
            let slices: Vec<&[u8]> = bytes.iter().map(|b| b.as_slice()).collect();
            let out = dec.decode_batch(c.dev, &slices)?;
            let (mut worst, mut worst_name) = (0.0f64, String::new());
            for ((img, want), f) in out.iter().zip(&refs).zip(&names) {
                if (img.height, img.width) != (want.height, want.width) {
                    return Err(Error::shape(
                        "nvjpeg",
                        format!(
                            "{}: {}x{} on the GPU, {}x{} on the CPU",
                            f.display(),
                            img.height,
                            img.width,
                            want.height,
                            want.width
                        ),
                    ));
                }
                let got: Vec<f32> = c.dev.download(&img.data)?.into_iter().map(f32::from).collect();
                let wf: Vec<f32> = want.data.iter().map(|&v| f32::from(v)).collect();
                let e = rel_l2(&got, &wf);
                if e.is_nan() || e > worst {
                    worst = e;
                    worst_name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                }
            }
            drop(out);
            let t = c.time(|| dec.decode_batch(c.dev, &slices).map(drop))?;
            let pixels: usize = refs.iter().map(|r| r.height * r.width * 3).sum();
            let in_bytes: usize = bytes.iter().map(|b| b.len()).sum();
            let mut note = format!(
                "{:.0} img/s; worst {worst_name}",
                slices.len() as f64 / (t.median_ms / 1e3)
            );
            if !skipped.is_empty() {
                note.push_str(&format!("; CPU-only (CMYK): {}", skipped.len()));
            }
            Ok(Measured {
                err: Some((worst, TOL_JPEG)),
                time: Some(t),
                bytes: (pixels + in_bytes) as f64,
                note,
                ..Default::default()
            })
        },
    );
}

/// The caching allocator in a loop shaped like a training step: no driver allocation after
/// the first iteration.
fn alloc_rows(c: &mut Checker<'_, Gpu>) {
    c.row(
        "alloc",
        "steady_state",
        "3 steps of 4 buffers".into(),
        Value::Null,
        |c| {
            let step = || -> Result<()> {
                let a = c.dev.alloc::<bf16>(1 << 20)?;
                let b = c.dev.alloc::<f32>(12_345)?;
                let d = c.dev.alloc::<bf16>(1 << 20)?;
                drop(b);
                let e = c.dev.alloc::<f32>(12_000)?;
                drop((a, d, e));
                Ok(())
            };
            step()?;
            let first = c.dev.alloc_stats().misses;
            step()?;
            step()?;
            let after = c.dev.alloc_stats().misses;
            Ok(Measured {
                err: Some(((after - first) as f64, 0.0)),
                note: format!(
                    "{} driver allocations after the first step (must be 0)",
                    after - first
                ),
                ..Default::default()
            })
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_gpu_the_check_says_so() {
        if gpu_available() {
            println!("SKIP: a GPU is present; the no-GPU error path cannot be exercised here");
            return;
        }
        let e = run_check(&CheckOptions::default()).unwrap_err().to_string();
        assert!(e.contains("no GPU") && e.contains("device-check.sh"), "{e}");
    }

    #[test]
    fn test_jpegs_are_found() {
        let files = jpeg_files(&CheckOptions::default());
        assert!(
            files.iter().any(|f| f.ends_with("q420.jpg")),
            "the repository's test JPEGs should be found: {files:?}"
        );
    }
}
