//! Criterion benchmarks of the GPU ops: cuBLASLt GEMMs (ViT-S/16 linear layers), cuDNN
//! convolutions (ResNet-50 shapes, forward and both backward passes), the runtime's own
//! kernel, and the engine's own kernels through their device ops (the Sinkhorn paths at the
//! aim's K = 1000, B = 4096, the fused softmax-CE over Suave's scores, ViT-S's layer norm). Times are taken with CUDA events around `iters` back-to-back launches (host clocks
//! would measure the enqueue, not the work). Without a GPU every benchmark prints
//! `SKIP: no GPU` and does nothing. The one-command GPU check (`scripts/device-check.sh`)
//! reports the same ops against the machine's ceilings and PyTorch; these are for iterating on
//! one op.

use criterion::{criterion_group, criterion_main, Criterion};
use cudarc::driver::sys::CUevent_flags;
use half::bf16;
use sdengine::backend::cuda::check::random;
use sdengine::backend::cuda::cublaslt::{Epilogue, Gemm};
use sdengine::backend::cuda::cudnn::ConvShape;
use sdengine::backend::cuda::{self as cuda, Gpu, LaunchDims, PushKernelArg};
use std::time::Duration;

/// The GPU, or `None` after saying why the benchmarks do nothing.
fn gpu() -> Option<Gpu> {
    if !cuda::gpu_available() {
        println!(
            "SKIP: no GPU ({})",
            cuda::probe().reason.as_deref().unwrap_or("unknown")
        );
        return None;
    }
    match Gpu::new(0) {
        Ok(g) => Some(g),
        Err(e) => {
            println!("SKIP: no GPU ({e})");
            None
        }
    }
}

/// Device time of `iters` runs of `work`, measured with a pair of CUDA events.
fn device_time(g: &Gpu, iters: u64, mut work: impl FnMut()) -> Duration {
    let ev = || {
        g.context()
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .expect("creating a CUDA event")
    };
    let (a, b) = (ev(), ev());
    a.record(g.stream()).expect("recording an event");
    for _ in 0..iters {
        work();
    }
    b.record(g.stream()).expect("recording an event");
    let ms = a.elapsed_ms(&b).expect("reading events");
    Duration::from_secs_f64(ms as f64 / 1e3)
}

fn bench_gpu(c: &mut Criterion) {
    let Some(g) = gpu() else { return };
    let mut grp = c.benchmark_group("gpu");
    grp.sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));

    // ViT-S/16 at batch 64: 64 × 197 token rows.
    let rows = 64 * 197;
    if let Ok(lt) = g.lt() {
        for (name, inp, out, epi) in [
            ("fc1_bias_gelu", 384, 1536, Epilogue::BiasGelu),
            ("fc2_bias", 1536, 384, Epilogue::Bias),
            ("qkv", 384, 1152, Epilogue::None),
        ] {
            let gm = Gemm::linear(rows, inp, out, epi);
            let x = g.upload_bf16(&random("x", rows * inp)).expect("upload");
            let w = g.upload_bf16(&random("w", out * inp)).expect("upload");
            let b = g.upload_bf16(&random("b", out)).expect("upload");
            let mut y = g.alloc::<bf16>(rows * out).expect("alloc");
            let bias = (epi != Epilogue::None).then_some(&b);
            grp.bench_function(format!("gemm_{name}"), |bch| {
                bch.iter_custom(|iters| {
                    device_time(&g, iters, || {
                        lt.matmul(&gm, &x, &w, bias, &mut y).expect("gemm")
                    })
                })
            });
        }
    } else {
        println!("SKIP: cuBLASLt not found");
    }

    if let Ok(dnn) = g.dnn() {
        let base = ConvShape {
            n: 64,
            h: 56,
            w: 56,
            c: 64,
            o: 64,
            kh: 3,
            kw: 3,
            stride: 1,
            pad: 1,
        };
        for (name, s) in [
            ("conv3x3_c64", base),
            (
                "conv1x1_c256_o64",
                ConvShape {
                    c: 256,
                    kh: 1,
                    kw: 1,
                    pad: 0,
                    ..base
                },
            ),
            (
                "conv3x3_s2_c128",
                ConvShape {
                    c: 128,
                    o: 128,
                    stride: 2,
                    ..base
                },
            ),
        ] {
            let x = g.upload_bf16(&random("cx", s.x_len())).expect("upload");
            let w = g.upload_bf16(&random("cw", s.w_len())).expect("upload");
            let dy = g.upload_bf16(&random("cdy", s.y_len())).expect("upload");
            let mut y = g.alloc::<bf16>(s.y_len()).expect("alloc");
            let mut dx = g.alloc::<bf16>(s.x_len()).expect("alloc");
            let mut dw = g.alloc::<bf16>(s.w_len()).expect("alloc");
            let pool = g.pool();
            grp.bench_function(format!("{name}_fwd"), |bch| {
                bch.iter_custom(|iters| {
                    device_time(&g, iters, || {
                        dnn.conv2d_forward(pool, &s, &x, &w, &mut y).expect("fwd")
                    })
                })
            });
            grp.bench_function(format!("{name}_dgrad"), |bch| {
                bch.iter_custom(|iters| {
                    device_time(&g, iters, || {
                        dnn.conv2d_backward_data(pool, &s, &w, &dy, &mut dx)
                            .expect("dgrad")
                    })
                })
            });
            grp.bench_function(format!("{name}_wgrad"), |bch| {
                bch.iter_custom(|iters| {
                    device_time(&g, iters, || {
                        dnn.conv2d_backward_filter(pool, &s, &x, &dy, &mut dw)
                            .expect("wgrad")
                    })
                })
            });
        }
    } else {
        println!("SKIP: cuDNN not found");
    }

    if let Ok(k) = g.kernel(cuda::module::RUNTIME_MODULE.name, "axpy_f32") {
        let n = 1usize << 26;
        let x = g.upload(&random("ax", n)).expect("upload");
        let y = g.upload(&random("ay", n)).expect("upload");
        let (a, xp, yp, nn) = (0.5f32, x.ptr(), y.ptr(), n as u64);
        grp.bench_function("axpy_f32_64M", |bch| {
            bch.iter_custom(|iters| {
                device_time(&g, iters, || {
                    let mut b = k.builder(g.stream());
                    b.arg(&a).arg(&xp).arg(&yp).arg(&nn);
                    // SAFETY: (float, const float*, float*, u64); both buffers hold n floats.
                    unsafe { k.launch(&mut b, LaunchDims::linear(n, 256, 132 * 16)) }
                        .expect("launch")
                })
            })
        });
    }
    own_kernels(&g, &mut grp);
    grp.finish();
}

/// The own kernels through `backend::device` (the same calls the GPU check times).
fn own_kernels(g: &Gpu, grp: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    use sdengine::backend::cpu::loss::CrossEntropyParams;
    use sdengine::backend::device::{norm, sinkhorn as sk, softmax_ce as ce};
    use sdengine::methods::sinkhorn::SinkhornParams;
    let (b, k) = (4096, 1000);
    let p = SinkhornParams::default();
    let s = g.upload(&random("bench.sk", b * k)).expect("upload");
    grp.bench_function("sinkhorn_fused_b4096_k1000", |bch| {
        bch.iter_custom(|iters| {
            device_time(g, iters, || {
                sk::sinkhorn_fused(g, &s, b, k, p, sk::FUSED_THREADS).expect("sinkhorn_fused");
            })
        })
    });
    grp.bench_function("sinkhorn_blocked_b4096_k1000", |bch| {
        bch.iter_custom(|iters| {
            device_time(g, iters, || {
                sk::sinkhorn_blocked(g, &s, b, k, p, b, sk::PASS_ROWS, sk::THREADS, |_| Ok(()))
                    .expect("sinkhorn_blocked");
            })
        })
    });
    let (rows, classes) = (4096, 3000);
    let z = g
        .upload_bf16(&random("bench.ce.z", rows * classes))
        .expect("upload");
    let t = g
        .upload(&vec![1.0 / classes as f32; rows * classes])
        .expect("upload");
    let cp = CrossEntropyParams {
        temperature: 0.1,
        label_smoothing: 0.1,
    };
    grp.bench_function("softmax_ce_fused_b4096_k3000", |bch| {
        bch.iter_custom(|iters| {
            device_time(g, iters, || {
                ce::softmax_ce_fused(g, &z, &t, rows, classes, cp, 1.0, ce::row_threads(classes))
                    .expect("softmax_ce_fused");
            })
        })
    });
    let (r, d) = (64 * 197, 384);
    let x = g.upload_bf16(&random("bench.ln.x", r * d)).expect("upload");
    let (gm, bt) = (
        g.upload(&vec![1.0f32; d]).expect("upload"),
        g.upload(&vec![0.0f32; d]).expect("upload"),
    );
    grp.bench_function("layernorm_fwd_vit_s_b64", |bch| {
        bch.iter_custom(|iters| {
            device_time(g, iters, || {
                norm::layernorm_forward(g, &x, &gm, &bt, r, d, 1e-6, norm::THREADS)
                    .expect("layernorm_forward");
            })
        })
    });
}

criterion_group!(benches, bench_gpu);
criterion_main!(benches);
