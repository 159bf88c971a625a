//! The CUDA runtime against the CPU backend: allocator, kernel launch, cuBLASLt GEMMs, cuDNN
//! convolutions and nvJPEG decoding, on small shapes chosen to hit the awkward cases (odd sizes,
//! transposes, strides, padding). Every test that needs a GPU (or one of its libraries) prints
//! `SKIP: <reason>` and returns on a machine without it; detection itself is tested everywhere.

use half::bf16;
use sdengine::backend::cpu;
use sdengine::backend::cuda::check::{random, round_bf16};
use sdengine::backend::cuda::cublaslt::{Epilogue, Gemm};
use sdengine::backend::cuda::cudnn::ConvShape;
use sdengine::backend::cuda::nvjpeg::{self, JpegDecoder};
use sdengine::backend::cuda::{self as cuda, Gpu, LaunchDims, PushKernelArg};
use sdengine::tensor::Tensor;
use sdengine::testing::rel_l2;
use std::path::Path;

/// The GPU, or `None` after printing why the test is skipped.
fn gpu(test: &str) -> Option<Gpu> {
    if !cuda::gpu_available() {
        println!(
            "SKIP {test}: no GPU ({})",
            cuda::probe().reason.as_deref().unwrap_or("unknown")
        );
        return None;
    }
    match Gpu::new(0) {
        Ok(g) => Some(g),
        Err(e) => panic!("a GPU was detected but cannot be opened: {e}"),
    }
}

#[test]
fn detection_never_panics_and_explains_itself() {
    let p = cuda::probe();
    assert_eq!(cuda::gpu_available(), !p.devices.is_empty());
    if p.devices.is_empty() {
        let reason = p.reason.as_deref().unwrap_or("");
        assert!(!reason.is_empty(), "no GPU but no reason given");
        // Opening a device must be an error, not a panic, and must say why.
        let e = Gpu::new(0).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("no GPU cuda:0"), "{e}");
    } else {
        let d = &p.devices[0];
        assert!(
            !d.name.is_empty() && d.total_mem > 0 && d.compute_capability.0 >= 5,
            "{d:?}"
        );
        assert!(p.driver_version.is_some_and(|v| v >= 11000));
    }
}

#[test]
fn uploads_round_trip_and_the_allocator_reuses_blocks() {
    let Some(g) = gpu("uploads_round_trip") else {
        return;
    };
    let x = random("rt.x", 10_007);
    let d = g.upload(&x).unwrap();
    assert_eq!(g.download(&d).unwrap(), x);
    let h = g.upload_bf16(&x).unwrap();
    assert_eq!(g.download_bf16(&h).unwrap(), round_bf16(&x));
    let z = g.zeros::<f32>(777).unwrap();
    assert!(g.download(&z).unwrap().iter().all(|&v| v == 0.0));
    let mut copy = g.alloc::<f32>(x.len()).unwrap();
    g.copy(&d, &mut copy).unwrap();
    assert_eq!(g.download(&copy).unwrap(), x);
    drop((d, h, z, copy));
    let before = g.alloc_stats();
    let again = g.upload(&x).unwrap();
    let after = g.alloc_stats();
    assert_eq!(
        after.misses, before.misses,
        "a freed block of the same class should be reused"
    );
    assert_eq!(after.hits, before.hits + 1);
    drop(again);
    assert!(g.trim() > 0);
}

#[test]
fn runtime_kernel_matches_the_cpu_and_bad_launches_name_themselves() {
    let Some(g) = gpu("runtime_kernel") else {
        return;
    };
    if !cuda::probe().nvrtc {
        println!("SKIP runtime_kernel: NVRTC not found");
        return;
    }
    let k = g
        .kernel(cuda::module::RUNTIME_MODULE.name, "axpy_f32")
        .unwrap();
    // 1000 elements over a grid smaller than needed: the grid-stride loop must cover the rest.
    let n = 1000usize;
    let x = random("k.x", n);
    let y = random("k.y", n);
    let (xd, yd) = (g.upload(&x).unwrap(), g.upload(&y).unwrap());
    let (a, xp, yp, nn) = (-1.5f32, xd.ptr(), yd.ptr(), n as u64);
    let mut b = k.builder(g.stream());
    b.arg(&a).arg(&xp).arg(&yp).arg(&nn);
    unsafe { k.launch(&mut b, LaunchDims::linear(n, 64, 3)) }.unwrap();
    let got = g.download(&yd).unwrap();
    let want: Vec<f32> = x.iter().zip(&y).map(|(&x, &y)| a.mul_add(x, y)).collect();
    assert_eq!(got, want);
    // A configuration over the device limits is refused with the kernel and the config named.
    let mut b = k.builder(g.stream());
    b.arg(&a).arg(&xp).arg(&yp).arg(&nn);
    let bad = LaunchDims {
        grid: (1, 1, 1),
        block: (2048, 1, 1),
        shared_bytes: 0,
    };
    let e = unsafe { k.launch(&mut b, bad) }.unwrap_err().to_string();
    assert!(
        e.contains("sdengine_runtime::axpy_f32") && e.contains("block (2048,1,1)"),
        "{e}"
    );
    // Unknown functions and modules are named too.
    let e = g
        .kernel(cuda::module::RUNTIME_MODULE.name, "nope")
        .unwrap_err()
        .to_string();
    assert!(e.contains("'nope'"), "{e}");
}

/// Runs one GEMM on the GPU and on the CPU (on the same bf16-rounded inputs).
fn gemm_case(g: &Gpu, gm: Gemm, f32_out: bool) -> f64 {
    let tag = format!("{gm:?}");
    let a = round_bf16(&random(&format!("{tag}a"), gm.m * gm.k));
    let b = round_bf16(&random(&format!("{tag}b"), gm.k * gm.n));
    let bias = round_bf16(&random(&format!("{tag}bias"), gm.n));
    let c0 = round_bf16(&random(&format!("{tag}c"), gm.m * gm.n));
    let has_bias = matches!(
        gm.epilogue,
        Epilogue::Bias | Epilogue::BiasGelu | Epilogue::BiasRelu
    );
    let mut want = if gm.accumulate {
        c0.clone()
    } else {
        vec![0.0; gm.m * gm.n]
    };
    if has_bias {
        for row in want.chunks_exact_mut(gm.n) {
            for (v, &bb) in row.iter_mut().zip(&bias) {
                *v += bb;
            }
        }
    }
    cpu::matmul::matmul(
        gm.m, gm.n, gm.k, &a, gm.trans_a, &b, gm.trans_b, &mut want, true,
    );
    let want = match gm.epilogue {
        Epilogue::BiasGelu | Epilogue::Gelu => {
            cpu::elementwise::gelu_forward(&Tensor::from_vec(want, &[gm.m, gm.n]).unwrap())
                .unwrap()
                .into_vec()
        }
        Epilogue::BiasRelu => want.into_iter().map(|v| v.max(0.0)).collect(),
        _ => want,
    };
    let lt = g.lt().unwrap();
    let (ad, bd, biasd) = (
        g.upload_bf16(&a).unwrap(),
        g.upload_bf16(&b).unwrap(),
        g.upload_bf16(&bias).unwrap(),
    );
    let got = if f32_out {
        let mut c = g.upload(&c0).unwrap();
        lt.matmul_f32_out(&gm, &ad, &bd, &mut c).unwrap();
        g.download(&c).unwrap()
    } else {
        let mut c = g.upload_bf16(&c0).unwrap();
        lt.matmul(&gm, &ad, &bd, has_bias.then_some(&biasd), &mut c)
            .unwrap();
        g.download_bf16(&c).unwrap()
    };
    rel_l2(&got, &want)
}

#[test]
fn cublaslt_gemms_match_the_cpu_in_row_major_layout() {
    let Some(g) = gpu("cublaslt_gemms") else {
        return;
    };
    if !cuda::probe().cublaslt {
        println!("SKIP cublaslt_gemms: cuBLASLt not found");
        return;
    }
    let base = Gemm {
        m: 37,
        n: 64,
        k: 72,
        trans_a: false,
        trans_b: false,
        epilogue: Epilogue::None,
        accumulate: false,
    };
    // Every transpose combination on non-square odd shapes: a wrong leading dimension or a swapped
    // operand gives O(1) errors, not rounding.
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let gm = Gemm {
            trans_a: ta,
            trans_b: tb,
            ..base
        };
        let e = gemm_case(&g, gm, false);
        assert!(e < 1e-2, "{gm:?}: rel err {e}");
        let e = gemm_case(&g, gm, true);
        assert!(e < 1e-4, "{gm:?} f32 out: rel err {e}");
    }
    // Linear layers with fused epilogues ([out, in] weights, bias per output column).
    for epi in [
        Epilogue::Bias,
        Epilogue::BiasGelu,
        Epilogue::BiasRelu,
        Epilogue::Gelu,
    ] {
        let gm = Gemm::linear(50, 96, 136, epi);
        let e = gemm_case(&g, gm, false);
        assert!(e < 1e-2, "{gm:?}: rel err {e}");
    }
    // Accumulation (C += A·B) into fp32, as weight gradients are summed over micro-batches.
    let acc = Gemm {
        accumulate: true,
        trans_a: true,
        ..base
    };
    let e = gemm_case(&g, acc, true);
    assert!(e < 1e-4, "{acc:?}: rel err {e}");
    // The same shape twice reuses its plan.
    let n = g.lt().unwrap().cached_plans();
    gemm_case(&g, base, false);
    assert_eq!(g.lt().unwrap().cached_plans(), n);
    g.synchronize().unwrap();
}

#[test]
fn linear_forward_matches_the_cpu_linear_layer() {
    let Some(g) = gpu("linear_forward") else {
        return;
    };
    if !cuda::probe().cublaslt {
        println!("SKIP linear_forward: cuBLASLt not found");
        return;
    }
    let (rows, inp, out) = (30, 48, 80);
    let x = round_bf16(&random("lin.x", rows * inp));
    let w = round_bf16(&random("lin.w", out * inp));
    let b = round_bf16(&random("lin.b", out));
    let want = cpu::linear::linear_forward(
        &Tensor::from_vec(x.clone(), &[rows, inp]).unwrap(),
        &Tensor::from_vec(w.clone(), &[out, inp]).unwrap(),
        Some(&Tensor::from_vec(b.clone(), &[out]).unwrap()),
    )
    .unwrap();
    let (xd, wd, bd) = (
        g.upload_bf16(&x).unwrap(),
        g.upload_bf16(&w).unwrap(),
        g.upload_bf16(&b).unwrap(),
    );
    let mut yd = g.alloc::<bf16>(rows * out).unwrap();
    g.lt()
        .unwrap()
        .linear_forward(&xd, &wd, Some(&bd), false, rows, inp, out, &mut yd)
        .unwrap();
    let e = rel_l2(&g.download_bf16(&yd).unwrap(), want.data());
    assert!(e < 1e-2, "rel err {e}");
}

#[test]
fn cudnn_convolutions_match_the_cpu_backend() {
    let Some(g) = gpu("cudnn_convolutions") else {
        return;
    };
    if !cuda::probe().cudnn {
        println!("SKIP cudnn_convolutions: cuDNN not found");
        return;
    }
    let dnn = g.dnn().unwrap();
    let cases = [
        ConvShape {
            n: 2,
            h: 9,
            w: 11,
            c: 16,
            o: 24,
            kh: 3,
            kw: 3,
            stride: 1,
            pad: 1,
        },
        ConvShape {
            n: 3,
            h: 12,
            w: 10,
            c: 32,
            o: 16,
            kh: 3,
            kw: 3,
            stride: 2,
            pad: 1,
        },
        ConvShape {
            n: 2,
            h: 8,
            w: 8,
            c: 64,
            o: 32,
            kh: 1,
            kw: 1,
            stride: 1,
            pad: 0,
        },
        ConvShape {
            n: 2,
            h: 10,
            w: 10,
            c: 32,
            o: 64,
            kh: 1,
            kw: 1,
            stride: 2,
            pad: 0,
        },
        ConvShape {
            n: 1,
            h: 32,
            w: 32,
            c: 8,
            o: 16,
            kh: 7,
            kw: 7,
            stride: 2,
            pad: 3,
        },
    ];
    for s in cases {
        let (oh, ow) = s.out_hw().unwrap();
        let tag = format!("{s:?}");
        let x = round_bf16(&random(&format!("{tag}x"), s.x_len()));
        let w = round_bf16(&random(&format!("{tag}w"), s.w_len()));
        let dy = round_bf16(&random(&format!("{tag}dy"), s.y_len()));
        let xt = Tensor::from_vec(x.clone(), &[s.n, s.h, s.w, s.c]).unwrap();
        let wt = Tensor::from_vec(w.clone(), &[s.o, s.kh, s.kw, s.c]).unwrap();
        let dyt = Tensor::from_vec(dy.clone(), &[s.n, oh, ow, s.o]).unwrap();
        let p = cpu::conv::Conv2dParams {
            stride: s.stride,
            padding: s.pad,
        };
        let y = cpu::conv::conv2d_forward(&xt, &wt, None, p).unwrap();
        let gr = cpu::conv::conv2d_backward(&xt, &wt, &dyt, p, true, false).unwrap();

        let (xd, wd, dyd) = (
            g.upload_bf16(&x).unwrap(),
            g.upload_bf16(&w).unwrap(),
            g.upload_bf16(&dy).unwrap(),
        );
        let mut yd = g.alloc::<bf16>(s.y_len()).unwrap();
        let mut dxd = g.alloc::<bf16>(s.x_len()).unwrap();
        let mut dwd = g.alloc::<bf16>(s.w_len()).unwrap();
        dnn.conv2d_forward(g.pool(), &s, &xd, &wd, &mut yd).unwrap();
        dnn.conv2d_backward_data(g.pool(), &s, &wd, &dyd, &mut dxd)
            .unwrap();
        dnn.conv2d_backward_filter(g.pool(), &s, &xd, &dyd, &mut dwd)
            .unwrap();
        let e_y = rel_l2(&g.download_bf16(&yd).unwrap(), y.data());
        let e_dx = rel_l2(
            &g.download_bf16(&dxd).unwrap(),
            gr.dx.as_ref().unwrap().data(),
        );
        let e_dw = rel_l2(&g.download_bf16(&dwd).unwrap(), gr.dw.data());
        assert!(
            e_y < 1e-2 && e_dx < 1e-2 && e_dw < 1e-2,
            "{s:?}: y {e_y} dx {e_dx} dw {e_dw}"
        );
    }
    assert_eq!(dnn.cached_plans(), 5);
    // A second pass over a known shape makes no new plan and no new driver allocation.
    let s = cases[0];
    let (xd, wd) = (
        g.upload_bf16(&random("again.x", s.x_len())).unwrap(),
        g.upload_bf16(&random("again.w", s.w_len())).unwrap(),
    );
    let mut yd = g.alloc::<bf16>(s.y_len()).unwrap();
    dnn.conv2d_forward(g.pool(), &s, &xd, &wd, &mut yd).unwrap();
    let misses = g.alloc_stats().misses;
    dnn.conv2d_forward(g.pool(), &s, &xd, &wd, &mut yd).unwrap();
    assert_eq!(g.alloc_stats().misses, misses);
    assert_eq!(dnn.cached_plans(), 5);
    // Wrong buffer sizes are refused before cuDNN sees them.
    let short = g.alloc::<bf16>(3).unwrap();
    let e = dnn
        .conv2d_forward(g.pool(), &s, &short, &wd, &mut yd)
        .unwrap_err()
        .to_string();
    assert!(e.contains("x holds 3"), "{e}");
}

#[test]
fn nvjpeg_decodes_like_the_cpu_decoder() {
    let Some(g) = gpu("nvjpeg_decode") else {
        return;
    };
    if !nvjpeg::library_present() {
        println!("SKIP nvjpeg_decode: nvJPEG not found");
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data");
    let names = ["q420.jpg", "q444.jpg", "gray.jpg", "progressive.jpg"];
    let bytes: Vec<Vec<u8>> = names
        .iter()
        .map(|n| std::fs::read(dir.join(n)).unwrap())
        .collect();
    let slices: Vec<&[u8]> = bytes.iter().map(|b| b.as_slice()).collect();
    let mut dec = JpegDecoder::new(&g).unwrap();
    let out = dec.decode_batch(&g, &slices).unwrap();
    for ((img, b), name) in out.iter().zip(&bytes).zip(names) {
        let want = sdengine::data::decode_bytes(b, Path::new(name)).unwrap();
        assert_eq!((img.height, img.width), (want.height, want.width), "{name}");
        let got: Vec<f32> = g
            .download(&img.data)
            .unwrap()
            .into_iter()
            .map(f32::from)
            .collect();
        let wf: Vec<f32> = want.data.iter().map(|&v| f32::from(v)).collect();
        let e = rel_l2(&got, &wf);
        assert!(e < 3e-2, "{name}: rel err {e}");
    }
    // Garbage is an error naming the image, not a crash.
    let bad: [&[u8]; 2] = [&bytes[0], b"not a jpeg at all"];
    let e = dec
        .decode_batch(&g, &bad)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("image 1"), "{e}");
}

#[test]
fn the_quick_device_check_passes_or_reports_no_gpu() {
    let opts = cuda::CheckOptions {
        quick: true,
        reps: 3,
        warmup: 1,
        ..Default::default()
    };
    match cuda::run_check(&opts) {
        Err(e) => {
            assert!(
                !cuda::gpu_available(),
                "a GPU is present but the check failed to start: {e}"
            );
            assert!(e.to_string().contains("no GPU"), "{e}");
            println!("SKIP the_quick_device_check: {e}");
        }
        Ok(report) => {
            println!("{}", report.table());
            assert!(report.copy_gbps > 0.0 && report.gemm_tflops > 0.0);
            assert!(report.passed, "{}", report.table());
        }
    }
}

#[test]
fn sinkhorn_kernels_match_the_cpu_codes() {
    use sdengine::backend::device::sinkhorn::{
        sinkhorn_fused, sinkhorn_per_iteration, FUSED_THREADS, THREADS,
    };
    use sdengine::dist::SingleProcess;
    use sdengine::methods::sinkhorn::{sinkhorn as cpu_sinkhorn, SinkhornParams};
    let Some(g) = gpu("sinkhorn_kernels") else {
        return;
    };
    // Odd sizes (partial warps and blocks) and a Suave-like shape; 0 and 3 iterations.
    for (b, k, it) in [(37usize, 53usize, 3usize), (512, 300, 3), (64, 100, 0)] {
        let p = SinkhornParams {
            epsilon: 0.05,
            iterations: it,
        };
        let s = random(&format!("sk{b}.{k}"), b * k);
        let want = cpu_sinkhorn(
            &Tensor::from_vec(s.clone(), &[b, k]).unwrap(),
            p,
            &SingleProcess,
        )
        .unwrap();
        let sd = g.upload(&s).unwrap();
        let q = sinkhorn_fused(&g, &sd, b, k, p, FUSED_THREADS).unwrap();
        let e = rel_l2(&g.download(&q.codes).unwrap(), want.data());
        assert!(e < 1e-4, "fused B{b} K{k} it{it}: rel err {e}");
        if it > 0 {
            let q = sinkhorn_per_iteration(&g, &sd, b, k, p, b, THREADS, |_| Ok(())).unwrap();
            let e = rel_l2(&g.download(&q).unwrap(), want.data());
            assert!(e < 1e-4, "per-iteration B{b} K{k}: rel err {e}");
        }
    }
}

#[test]
fn softmax_ce_kernels_match_the_cpu_loss() {
    use sdengine::backend::cpu::loss::{
        cross_entropy_backward, cross_entropy_forward, CrossEntropyParams,
    };
    use sdengine::backend::device::softmax_ce::{
        row_threads, softmax_ce_backward, softmax_ce_forward, softmax_ce_fused,
    };
    let Some(g) = gpu("softmax_ce_kernels") else {
        return;
    };
    let p = CrossEntropyParams {
        temperature: 0.1,
        label_smoothing: 0.01,
    };
    // 256-thread rows and the 1024-thread path for wide rows (K >= 16384).
    for (b, k) in [(7usize, 1000usize), (3, 20_000)] {
        let z = round_bf16(&random(&format!("z{b}.{k}"), b * k));
        let mut t: Vec<f32> = random(&format!("t{b}.{k}"), b * k)
            .iter()
            .map(|v| v.abs() + 1e-3)
            .collect();
        for row in t.chunks_exact_mut(k) {
            let s: f32 = row.iter().sum();
            row.iter_mut().for_each(|v| *v /= s);
        }
        let zt = Tensor::from_vec(z.clone(), &[b, k]).unwrap();
        let tt = Tensor::from_vec(t.clone(), &[b, k]).unwrap();
        let (loss, ctx) = cross_entropy_forward(&zt, &tt, p).unwrap();
        let dz = cross_entropy_backward(0.5f32, &tt, &ctx).unwrap();
        let (zd, td) = (g.upload_bf16(&z).unwrap(), g.upload(&t).unwrap());
        let th = row_threads(k);
        let f = softmax_ce_forward(&g, &zd, &td, b, k, p, th).unwrap();
        let got = g.download(&f.loss).unwrap();
        assert!(
            rel_l2(&got, &[loss]) < 1e-4,
            "B{b} K{k}: loss {got:?} vs {loss}"
        );
        let dzd = softmax_ce_backward(&g, &zd, &td, &f, b, k, p, 0.5, th).unwrap();
        let e = rel_l2(&g.download_bf16(&dzd).unwrap(), dz.data());
        assert!(e < 1e-2, "B{b} K{k}: dz rel err {e}");
        let fu = softmax_ce_fused(&g, &zd, &td, b, k, p, 0.5, th).unwrap();
        assert!(rel_l2(&g.download(&fu.loss).unwrap(), &[loss]) < 1e-4);
        let e = rel_l2(&g.download_bf16(&fu.dz).unwrap(), dz.data());
        assert!(e < 1e-2, "B{b} K{k}: fused dz rel err {e}");
    }
    // Mismatched sizes are refused before any launch.
    let zd = g.upload_bf16(&random("zz", 10)).unwrap();
    let td = g.upload(&random("tt", 12)).unwrap();
    assert!(softmax_ce_forward(&g, &zd, &td, 2, 5, p, 256).is_err());
}

#[test]
fn adamw_multi_tensor_update_matches_the_cpu_formula() {
    use sdengine::backend::device::optim::{adamw_step, AdamWScalars, AdamWSlot, CHUNK, THREADS};
    // The CPU formula of one element (optim::adamw's order, f32): returns (p, m, v).
    let adamw_reference =
        |p: f32, g: f32, m: f32, v: f32, s: AdamWScalars, b1: f64, b2: f64, e: f64| {
            let (w1, b2, w2, e) = ((1.0 - b1) as f32, b2 as f32, (1.0 - b2) as f32, e as f32);
            let pv = p * s.decay;
            let mv = m + w1 * (g - m);
            let vv = v * b2 + w2 * g * g;
            (
                pv + -s.step_size * mv / (vv.sqrt() / s.bc2_sqrt + e),
                mv,
                vv,
            )
        };
    let Some(g) = gpu("adamw_multi_tensor") else {
        return;
    };
    if sdengine::backend::kernels::module("optim").is_none() {
        println!("SKIP adamw_multi_tensor: no optim module in this build's kernel table");
        return;
    }
    // Tensors smaller than, equal to and larger than one chunk, and an empty one.
    let sizes = [5usize, 16384, 40_000, 0, 999];
    let (b1, b2, eps) = (0.9, 0.999, 1e-8);
    let mut host = Vec::new();
    let mut dev = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let p = random(&format!("p{i}"), n);
        let gr = random(&format!("g{i}"), n);
        let m: Vec<f32> = random(&format!("m{i}"), n)
            .iter()
            .map(|v| 0.1 * v)
            .collect();
        let v: Vec<f32> = random(&format!("v{i}"), n).iter().map(|v| v * v).collect();
        let s = AdamWScalars::new(1e-3, 0.05 * i as f64, b1, b2, 1 + i as u64);
        dev.push((
            g.upload(&p).unwrap(),
            g.upload(&gr).unwrap(),
            g.upload(&m).unwrap(),
            g.upload(&v).unwrap(),
            g.alloc::<bf16>(n).unwrap(),
            s,
        ));
        host.push((p, gr, m, v, s));
    }
    let mut slots: Vec<AdamWSlot<'_, Gpu>> = dev
        .iter_mut()
        .map(|(p, gr, m, v, pb, s)| AdamWSlot {
            param: p,
            grad: gr,
            exp_avg: m,
            exp_avg_sq: v,
            param_bf16: Some(pb),
            scalars: *s,
        })
        .collect();
    adamw_step(&g, &mut slots, b1, b2, eps, CHUNK, THREADS).unwrap();
    drop(slots);
    for ((p, gr, m, v, s), (pd, _, md, vd, pbd, _)) in host.iter().zip(&dev) {
        let want: Vec<(f32, f32, f32)> = (0..p.len())
            .map(|i| adamw_reference(p[i], gr[i], m[i], v[i], *s, b1, b2, eps))
            .collect();
        let wp: Vec<f32> = want.iter().map(|w| w.0).collect();
        let wm: Vec<f32> = want.iter().map(|w| w.1).collect();
        let wv: Vec<f32> = want.iter().map(|w| w.2).collect();
        assert!(rel_l2(&g.download(pd).unwrap(), &wp) < 1e-6);
        assert!(rel_l2(&g.download(md).unwrap(), &wm) < 1e-6);
        assert!(rel_l2(&g.download(vd).unwrap(), &wv) < 1e-6);
        assert_eq!(
            g.download_bf16(pbd).unwrap(),
            round_bf16(&g.download(pd).unwrap())
        );
    }
}

#[test]
fn layernorm_forward_matches_the_cpu() {
    use sdengine::backend::cpu::norm::layer_norm_forward;
    use sdengine::backend::device::norm::{layernorm_forward, THREADS};
    let Some(g) = gpu("layernorm_forward") else {
        return;
    };
    if sdengine::backend::kernels::module("norm").is_none() {
        println!("SKIP layernorm_forward: no norm module in this build's kernel table");
        return;
    }
    // Rows not a multiple of the 8 rows per block, widths below and above one warp's stride.
    for (rows, d) in [(13usize, 384usize), (9, 20), (3, 1000)] {
        let x = round_bf16(&random(&format!("lnx{d}"), rows * d));
        let gm: Vec<f32> = random(&format!("lng{d}"), d)
            .iter()
            .map(|v| 1.0 + 0.5 * v)
            .collect();
        let b = random(&format!("lnb{d}"), d);
        let (want, _) = layer_norm_forward(
            &Tensor::from_vec(x.clone(), &[rows, d]).unwrap(),
            &Tensor::from_vec(gm.clone(), &[d]).unwrap(),
            &Tensor::from_vec(b.clone(), &[d]).unwrap(),
            1e-6,
        )
        .unwrap();
        let (xd, gd, bd) = (
            g.upload_bf16(&x).unwrap(),
            g.upload(&gm).unwrap(),
            g.upload(&b).unwrap(),
        );
        let out = layernorm_forward(&g, &xd, &gd, &bd, rows, d, 1e-6, THREADS).unwrap();
        let e = rel_l2(&g.download_bf16(&out.y).unwrap(), want.data());
        assert!(e < 1e-2, "R{rows} D{d}: rel err {e}");
        let means = g.download(&out.mean).unwrap();
        let want_mean: Vec<f32> = x
            .chunks(d)
            .map(|r| r.iter().sum::<f32>() / d as f32)
            .collect();
        assert!(rel_l2(&means, &want_mean) < 1e-3);
    }
}
