//! The GPU check: every GPU op against the CPU backend (relative L2 error), every op's time
//! against the floor set by the machine's own ceilings, in one run of a few minutes.
//!
//! Ceilings are measured first, on the device itself (as the project's method asks): a large
//! device-to-device copy (bytes read + written per second) and a large bf16 GEMM through the
//! engine's cuBLASLt wrapper (FLOP/s). An op's floor is `max(bytes / copy rate, flops / GEMM
//! rate)`, with bytes counted as each input read once and each output written once; the table
//! gives the op's median time (CUDA events, after warm-up) and the floor as a percentage of it.
//!
//! The rows here are the GPU-only ones (ceilings, the runtime's own kernel, cuBLASLt, cuDNN,
//! nvJPEG, the allocator); the engine's own kernels are checked by the device ops' rows
//! ([`kernel_rows`]), which also run on the CPU emulation. Correctness rules, the row runner
//! and the report are in `backend::device::check`.

use super::alloc::AllocStats;
use super::context::Gpu;
use super::cublaslt::{Epilogue, Gemm};
use super::cudnn::ConvShape;
use super::device::{gpu_available, probe};
use super::module::LaunchDims;
use crate::backend::cpu;
pub use crate::backend::device::check::{
    finish, kernel_rows, random, round_bf16, CheckOptions, CheckReport, CheckRow, Checker,
    Measured, TOL_BF16, TOL_F32,
};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
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
    gemm_rows(&mut c);
    conv_rows(&mut c);
    jpeg_rows(&mut c);
    alloc_rows(&mut c);
    kernel_rows(&mut c);
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
            let lt = c.dev.lt()?;
            let t = c.time(|| lt.matmul(&g, &a, &b, None, &mut y))?;
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

/// A GEMM row: random bf16 operands, the CPU's `matmul` on the same rounded values.
fn gemm_row(c: &mut Checker<'_, Gpu>, id: &str, g: Gemm, f32_out: bool) {
    let shape = format!(
        "{}x{}x{}{}{}",
        g.m,
        g.n,
        g.k,
        if g.trans_a { " Aᵀ" } else { "" },
        if g.trans_b { " Bᵀ" } else { "" }
    );
    let torch = json!({
        "kind": "matmul", "m": g.m, "n": g.n, "k": g.k, "trans_a": g.trans_a, "trans_b": g.trans_b,
        "out": if f32_out { "f32" } else { "bf16" },
        "bias": matches!(g.epilogue, Epilogue::Bias | Epilogue::BiasGelu | Epilogue::BiasRelu),
        "gelu": matches!(g.epilogue, Epilogue::BiasGelu | Epilogue::Gelu),
        "relu": matches!(g.epilogue, Epilogue::BiasRelu),
    });
    c.row("gemm", id, shape, torch, |c| {
        let a = round_bf16(&random(&format!("{id}.a"), g.m * g.k));
        let b = round_bf16(&random(&format!("{id}.b"), g.k * g.n));
        let bias = round_bf16(&random(&format!("{id}.bias"), g.n));
        let has_bias = matches!(
            g.epilogue,
            Epilogue::Bias | Epilogue::BiasGelu | Epilogue::BiasRelu
        );
        // CPU reference.
        let mut want = vec![0f32; g.m * g.n];
        if has_bias {
            for row in want.chunks_exact_mut(g.n) {
                row.copy_from_slice(&bias);
            }
        }
        cpu::matmul::matmul(
            g.m, g.n, g.k, &a, g.trans_a, &b, g.trans_b, &mut want, has_bias,
        );
        let want = match g.epilogue {
            Epilogue::BiasGelu | Epilogue::Gelu => {
                cpu::elementwise::gelu_forward(&Tensor::from_vec(want, &[g.m, g.n])?)?.into_vec()
            }
            Epilogue::BiasRelu => want.into_iter().map(|v| v.max(0.0)).collect(),
            _ => want,
        };
        let (ad, bd) = (c.dev.upload_bf16(&a)?, c.dev.upload_bf16(&b)?);
        let biasd = c.dev.upload_bf16(&bias)?;
        let lt = c.dev.lt()?;
        let bias_arg = has_bias.then_some(&biasd);
        let (got, t, out_bytes) = if f32_out {
            let mut y = c.dev.alloc::<f32>(g.m * g.n)?;
            lt.matmul_f32_out(&g, &ad, &bd, &mut y)?;
            let got = c.dev.download(&y)?;
            let t = c.time(|| lt.matmul_f32_out(&g, &ad, &bd, &mut y))?;
            (got, t, 4.0)
        } else {
            let mut y = c.dev.alloc::<bf16>(g.m * g.n)?;
            lt.matmul(&g, &ad, &bd, bias_arg, &mut y)?;
            let got = c.dev.download_bf16(&y)?;
            let t = c.time(|| lt.matmul(&g, &ad, &bd, bias_arg, &mut y))?;
            (got, t, 2.0)
        };
        let tol = if f32_out { 1e-3 } else { TOL_BF16 };
        Ok(Measured {
            err: Some((rel_l2(&got, &want), tol)),
            time: Some(t),
            flops: g.flops(),
            bytes: 2.0 * (g.m * g.k + g.k * g.n) as f64 + out_bytes * (g.m * g.n) as f64,
            note: format!("{:.0} TFLOP/s", g.flops() / t.median_ms / 1e9),
            ..Default::default()
        })
    });
}

/// ViT-S/16 linear layers (forward with fused epilogues, both backward products) and a head.
fn gemm_rows(c: &mut Checker<'_, Gpu>) {
    let rows = if c.opts.quick { 394 } else { 64 * 197 };
    let (d, h) = (384, 1536);
    gemm_row(
        c,
        "linear_fc1_bias_gelu",
        Gemm::linear(rows, d, h, Epilogue::BiasGelu),
        false,
    );
    gemm_row(
        c,
        "linear_fc2_bias",
        Gemm::linear(rows, h, d, Epilogue::Bias),
        false,
    );
    gemm_row(
        c,
        "linear_qkv_plain",
        Gemm::linear(rows, d, 3 * d, Epilogue::None),
        false,
    );
    // Backward of fc1: dx = dy[rows, h] · w[h, d]; dw = dy[rows, h]ᵀ · x[rows, d] (fp32 out).
    let dx = Gemm {
        m: rows,
        n: d,
        k: h,
        trans_a: false,
        trans_b: false,
        epilogue: Epilogue::None,
        accumulate: false,
    };
    gemm_row(c, "linear_fc1_dx", dx, false);
    let dw = Gemm {
        m: h,
        n: d,
        k: rows,
        trans_a: true,
        trans_b: false,
        epilogue: Epilogue::None,
        accumulate: false,
    };
    gemm_row(c, "linear_fc1_dw_f32", dw, true);
    let b = if c.opts.quick { 64 } else { 512 };
    gemm_row(
        c,
        "head_relu",
        Gemm::linear(b, 2048, 2048, Epilogue::BiasRelu),
        false,
    );
}

/// One convolution shape: forward, backward-data and backward-filter against the CPU backend.
fn conv_case(c: &mut Checker<'_, Gpu>, name: &str, s: ConvShape) {
    let (oh, ow) = match s.out_hw() {
        Ok(v) => v,
        Err(_) => return,
    };
    let shape = format!(
        "n{} {}x{}x{}->{} k{} s{} p{}",
        s.n, s.h, s.w, s.c, s.o, s.kh, s.stride, s.pad
    );
    let torch = |dir: &str| {
        json!({"kind": "conv", "dir": dir, "n": s.n, "h": s.h, "w": s.w, "c": s.c, "o": s.o,
               "k": s.kh, "stride": s.stride, "pad": s.pad})
    };
    let p = cpu::conv::Conv2dParams {
        stride: s.stride,
        padding: s.pad,
    };
    let x = round_bf16(&random(&format!("{name}.x"), s.x_len()));
    let w = round_bf16(&random(&format!("{name}.w"), s.w_len()));
    let dy = round_bf16(&random(&format!("{name}.dy"), s.y_len()));
    let xt = Tensor::from_vec(x.clone(), &[s.n, s.h, s.w, s.c]);
    let wt = Tensor::from_vec(w.clone(), &[s.o, s.kh, s.kw, s.c]);
    let dyt = Tensor::from_vec(dy.clone(), &[s.n, oh, ow, s.o]);
    let elems = |a: usize, b: usize, o: usize| 2.0 * (a + b + o) as f64;
    c.row(
        "conv",
        &format!("{name}_fwd"),
        shape.clone(),
        torch("fwd"),
        |c| {
            let want = cpu::conv::conv2d_forward(
                xt.as_ref().map_err(clone_err)?,
                wt.as_ref().map_err(clone_err)?,
                None,
                p,
            )?;
            let (xd, wd) = (c.dev.upload_bf16(&x)?, c.dev.upload_bf16(&w)?);
            let mut yd = c.dev.alloc::<bf16>(s.y_len())?;
            let dnn = c.dev.dnn()?;
            dnn.conv2d_forward(c.dev.pool(), &s, &xd, &wd, &mut yd)?;
            let got = c.dev.download_bf16(&yd)?;
            let t = c.time(|| dnn.conv2d_forward(c.dev.pool(), &s, &xd, &wd, &mut yd))?;
            Ok(Measured {
                err: Some((rel_l2(&got, want.data()), TOL_BF16)),
                time: Some(t),
                flops: s.flops(),
                bytes: elems(s.x_len(), s.w_len(), s.y_len()),
                ..Default::default()
            })
        },
    );
    let grads = || {
        cpu::conv::conv2d_backward(
            xt.as_ref().map_err(clone_err)?,
            wt.as_ref().map_err(clone_err)?,
            dyt.as_ref().map_err(clone_err)?,
            p,
            true,
            false,
        )
    };
    let grads = grads();
    let grads = grads.as_ref();
    c.row(
        "conv",
        &format!("{name}_dgrad"),
        shape.clone(),
        torch("bwd_data"),
        |c| {
            let g = grads.map_err(clone_err)?;
            let want =
                g.dx.as_ref()
                    .ok_or_else(|| Error::invalid("device-check", "CPU conv returned no dx"))?;
            let (wd, dyd) = (c.dev.upload_bf16(&w)?, c.dev.upload_bf16(&dy)?);
            let mut dxd = c.dev.alloc::<bf16>(s.x_len())?;
            let dnn = c.dev.dnn()?;
            dnn.conv2d_backward_data(c.dev.pool(), &s, &wd, &dyd, &mut dxd)?;
            let got = c.dev.download_bf16(&dxd)?;
            let t = c.time(|| dnn.conv2d_backward_data(c.dev.pool(), &s, &wd, &dyd, &mut dxd))?;
            Ok(Measured {
                err: Some((rel_l2(&got, want.data()), TOL_BF16)),
                time: Some(t),
                flops: s.flops(),
                bytes: elems(s.x_len(), s.w_len(), s.y_len()),
                ..Default::default()
            })
        },
    );
    c.row(
        "conv",
        &format!("{name}_wgrad"),
        shape,
        torch("bwd_filter"),
        |c| {
            let g = grads.map_err(clone_err)?;
            let (xd, dyd) = (c.dev.upload_bf16(&x)?, c.dev.upload_bf16(&dy)?);
            let mut dwd = c.dev.alloc::<bf16>(s.w_len())?;
            let dnn = c.dev.dnn()?;
            dnn.conv2d_backward_filter(c.dev.pool(), &s, &xd, &dyd, &mut dwd)?;
            let got = c.dev.download_bf16(&dwd)?;
            let t = c.time(|| dnn.conv2d_backward_filter(c.dev.pool(), &s, &xd, &dyd, &mut dwd))?;
            Ok(Measured {
                err: Some((rel_l2(&got, g.dw.data()), TOL_BF16)),
                time: Some(t),
                flops: s.flops(),
                bytes: elems(s.x_len(), s.w_len(), s.y_len()),
                ..Default::default()
            })
        },
    );
}

/// Re-creates an engine error from a borrowed one (a reference computed once, used by rows).
fn clone_err(e: &Error) -> Error {
    Error::invalid("device-check", e.to_string())
}

/// ResNet-50's convolution kinds: stem, 3x3 stride 1 and 2, 1x1, and ViT's patch embedding.
fn conv_rows(c: &mut Checker<'_, Gpu>) {
    let n = if c.opts.quick { 2 } else { 16 };
    let base = ConvShape {
        n,
        h: 56,
        w: 56,
        c: 64,
        o: 64,
        kh: 3,
        kw: 3,
        stride: 1,
        pad: 1,
    };
    conv_case(c, "conv3x3_s1", base);
    conv_case(
        c,
        "conv1x1_c256",
        ConvShape {
            c: 256,
            o: 64,
            kh: 1,
            kw: 1,
            pad: 0,
            ..base
        },
    );
    conv_case(
        c,
        "conv3x3_s2_c128",
        ConvShape {
            h: 56,
            w: 56,
            c: 128,
            o: 128,
            stride: 2,
            ..base
        },
    );
    conv_case(
        c,
        "stem7x7_s2",
        ConvShape {
            h: 224,
            w: 224,
            c: 3,
            o: 64,
            kh: 7,
            kw: 7,
            stride: 2,
            pad: 3,
            ..base
        },
    );
    conv_case(
        c,
        "patch16_s16",
        ConvShape {
            h: 224,
            w: 224,
            c: 3,
            o: 384,
            kh: 16,
            kw: 16,
            stride: 16,
            pad: 0,
            ..base
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
