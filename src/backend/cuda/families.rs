//! The GPU check's rows for the engine's own kernels (`kernels/<family>.cu`, launched by
//! `cuda/<family>.rs`): each against its CPU op, timed against the copy-bandwidth floor (these
//! kernels are memory-bound: bytes are the inputs read once and the outputs written once).
//!
//! A family of the kernel table without rows here gets a skipped row saying so, so that the
//! table never omits a kernel silently.

use super::alloc::DeviceBuffer;
use super::check::{random, round_bf16, Checker, Measured, TOL_BF16};
use super::context::Gpu;
use super::module::table;
use super::{sinkhorn, softmax_ce};
use crate::backend::cpu::loss::{
    cross_entropy_backward, cross_entropy_forward, CrossEntropyParams,
};
use crate::dist::SingleProcess;
use crate::error::Result;
use crate::methods::sinkhorn::SinkhornParams;
use crate::tensor::Tensor;
use crate::testing::rel_l2;
use serde_json::{json, Value};

/// Families with check rows below.
const WRAPPED: [&str; 3] = ["sinkhorn", "softmax_ce", "optim"];

/// Tolerance of fp32 kernels against the CPU's f32/f64 arithmetic.
const TOL_F32_KERNEL: f64 = 1e-4;

/// Adds every family's rows.
pub fn check_rows(c: &mut Checker<'_, Gpu>) {
    for m in table::MODULES {
        if !WRAPPED.contains(&m.name) {
            c.row("kernels", m.name, "-".into(), Value::Null, |_| {
                Ok(Measured {
                    skipped: true,
                    note: "SKIP: kernel module has no GPU wrapper yet".into(),
                    ..Default::default()
                })
            });
        }
    }
    if table::module("sinkhorn").is_some() {
        sinkhorn_rows(c);
    }
    if table::module("softmax_ce").is_some() {
        softmax_ce_rows(c);
    }
    if table::module("optim").is_some() {
        optim_rows(c);
    }
}

/// AdamW over ViT-S/16-like tensors (~21 M parameters in 96 tensors), with the bf16 shadow.
fn optim_rows(c: &mut Checker<'_, Gpu>) {
    use super::optim::{adamw_reference, adamw_step, AdamWScalars, AdamWSlot};
    let (b1, b2, eps) = (0.9, 0.999, 1e-8);
    let block: &[usize] = &[
        384 * 1152,
        1152,
        384 * 384,
        384,
        384 * 1536,
        1536,
        1536 * 384,
        384,
    ];
    let layers = if c.opts.quick { 1 } else { 12 };
    let sizes: Vec<usize> = (0..layers).flat_map(|_| block.iter().copied()).collect();
    let total: usize = sizes.iter().sum();
    c.row(
        "optim",
        "adamw_multi_tensor",
        format!(
            "{} tensors, {:.1} M params",
            sizes.len(),
            total as f64 / 1e6
        ),
        json!({"kind": "adamw", "sizes": sizes}),
        |c| {
            let mut host = Vec::new();
            let mut dev = Vec::new();
            for (i, &n) in sizes.iter().enumerate() {
                let p = random(&format!("aw.p{i}"), n);
                let g = random(&format!("aw.g{i}"), n);
                let m: Vec<f32> = random(&format!("aw.m{i}"), n)
                    .iter()
                    .map(|v| 0.1 * v)
                    .collect();
                let v: Vec<f32> = random(&format!("aw.v{i}"), n)
                    .iter()
                    .map(|v| 0.01 * v * v)
                    .collect();
                let s = AdamWScalars::new(5e-4, if i % 2 == 0 { 0.04 } else { 0.0 }, b1, b2, 7);
                dev.push((
                    c.dev.upload(&p)?,
                    c.dev.upload(&g)?,
                    c.dev.upload(&m)?,
                    c.dev.upload(&v)?,
                    c.dev.alloc::<half::bf16>(n)?,
                    s,
                ));
                host.push((p, g, m, v, s));
            }
            let mut slots: Vec<AdamWSlot<'_>> = dev
                .iter_mut()
                .map(|(p, g, m, v, pb, s)| AdamWSlot {
                    param: p,
                    grad: g,
                    exp_avg: m,
                    exp_avg_sq: v,
                    param_bf16: Some(pb),
                    scalars: *s,
                })
                .collect();
            adamw_step(c.dev, &mut slots, b1, b2, eps)?;
            drop(slots);
            let mut worst = 0f64;
            for ((p, g, m, v, s), (pd, _, md, vd, pbd, _)) in host.iter().zip(&dev) {
                let mut want = (Vec::new(), Vec::new(), Vec::new());
                for i in 0..p.len() {
                    let (a, b, cc) = adamw_reference(p[i], g[i], m[i], v[i], *s, b1, b2, eps);
                    want.0.push(a);
                    want.1.push(b);
                    want.2.push(cc);
                }
                let shadow = round_bf16(&want.0);
                for (got, w) in [
                    (c.dev.download(pd)?, &want.0),
                    (c.dev.download(md)?, &want.1),
                    (c.dev.download(vd)?, &want.2),
                    (c.dev.download_bf16(pbd)?, &shadow),
                ] {
                    let e = rel_l2(&got, w);
                    if e.is_nan() || e > worst {
                        worst = e;
                    }
                }
            }
            let mut slots: Vec<AdamWSlot<'_>> = dev
                .iter_mut()
                .map(|(p, g, m, v, pb, s)| AdamWSlot {
                    param: p,
                    grad: g,
                    exp_avg: m,
                    exp_avg_sq: v,
                    param_bf16: Some(pb),
                    scalars: *s,
                })
                .collect();
            let t = c.time(|| adamw_step(c.dev, &mut slots, b1, b2, eps))?;
            Ok(Measured {
                err: Some((worst, 1e-5)),
                time: Some(t),
                // Reads p, g, m, v (fp32); writes p, m, v (fp32) and the bf16 shadow.
                bytes: 30.0 * total as f64,
                note: "aim: >= 70% of copy bandwidth (%floor)".into(),
                ..Default::default()
            })
        },
    );
    c.row("optim", "optim_other_kernels", "-".into(), Value::Null, |_| {
        Ok(Measured {
            skipped: true,
            note: "SKIP: lars_norms/lars_update, ema_update, dino_center_* have no GPU wrapper yet".into(),
            ..Default::default()
        })
    });
}

/// Cosine-like scores in [-1, 1): normalised random features against normalised prototypes
/// would be closer to the real thing, but any |S| ≤ 1 exercises the same arithmetic.
fn scores(name: &str, b: usize, k: usize) -> Vec<f32> {
    random(name, b * k)
}

/// The signature shared by the Sinkhorn launch paths.
type SinkhornFn =
    fn(&Gpu, &DeviceBuffer<f32>, usize, usize, SinkhornParams) -> Result<DeviceBuffer<f32>>;

fn sinkhorn_rows(c: &mut Checker<'_, Gpu>) {
    let p = SinkhornParams::default();
    // The aim's shape (K = 1000, B = 4096, 3 iterations) and Suave's per-GPU shape (queue 480 +
    // batch 32 rows, 3000 prototypes).
    let shapes: &[(usize, usize)] = if c.opts.quick {
        &[(512, 1000)]
    } else {
        &[(4096, 1000), (512, 3000)]
    };
    for &(b, k) in shapes {
        let s = scores(&format!("sk.{b}.{k}"), b, k);
        let want = Tensor::from_vec(s.clone(), &[b, k])
            .and_then(|t| crate::methods::sinkhorn::sinkhorn(&t, p, &SingleProcess));
        let want = want.as_ref();
        let torch = json!({"kind": "sinkhorn", "b": b, "k": k, "iters": p.iterations});
        for (variant, run) in [
            ("fused", sinkhorn::fused as SinkhornFn),
            ("per_iter", sinkhorn::per_iteration as SinkhornFn),
        ] {
            c.row(
                "sinkhorn",
                &format!("sinkhorn_{variant}_b{b}_k{k}"),
                format!("B{b} K{k} it{}", p.iterations),
                torch.clone(),
                |c| {
                    let want =
                        want.map_err(|e| crate::Error::invalid("device-check", e.to_string()))?;
                    let sd = c.dev.upload(&s)?;
                    let q = run(c.dev, &sd, b, k, p)?;
                    let got = c.dev.download(&q)?;
                    let t = c.time(|| run(c.dev, &sd, b, k, p).map(drop))?;
                    Ok(Measured {
                        err: Some((rel_l2(&got, want.data()), TOL_F32_KERNEL)),
                        time: Some(t),
                        bytes: 8.0 * (b * k) as f64,
                        note: "aim: >= 5x the official PyTorch function (torch/eng column)".into(),
                        ..Default::default()
                    })
                },
            );
        }
    }
}

/// Soft targets: positive rows summing to 1 (codes or teacher probabilities).
fn soft_targets(name: &str, b: usize, k: usize) -> Vec<f32> {
    let mut t: Vec<f32> = random(name, b * k)
        .into_iter()
        .map(|v| v.abs() + 1e-3)
        .collect();
    for row in t.chunks_exact_mut(k) {
        let s: f32 = row.iter().sum();
        row.iter_mut().for_each(|v| *v /= s);
    }
    t
}

fn softmax_ce_rows(c: &mut Checker<'_, Gpu>) {
    // Suave: 1000 prototypes/classes over a 4096-row global batch view; Daino: 65536 prototypes
    // over 64 images x 10 crops.
    let shapes: &[(usize, usize)] = if c.opts.quick {
        &[(256, 1000)]
    } else {
        &[(4096, 1000), (640, 65536)]
    };
    let p = CrossEntropyParams {
        temperature: 0.1,
        label_smoothing: 0.01,
    };
    let dloss = 0.5f32;
    for &(b, k) in shapes {
        let z = round_bf16(&random(&format!("ce.z.{b}.{k}"), b * k));
        let t = soft_targets(&format!("ce.t.{b}.{k}"), b, k);
        let reference = Tensor::from_vec(z.clone(), &[b, k]).and_then(|zt| {
            let tt = Tensor::from_vec(t.clone(), &[b, k])?;
            let (loss, ctx) = cross_entropy_forward(&zt, &tt, p)?;
            let dz = cross_entropy_backward(dloss, &tt, &ctx)?;
            Ok((loss, dz))
        });
        let reference = reference.as_ref();
        let bkf = (b * k) as f64;
        let shape = format!("B{b} K{k} tau0.1 ls0.01");
        let torch = |dir: &str| json!({"kind": "softmax_ce", "dir": dir, "b": b, "k": k, "tau": 0.1, "ls": 0.01});
        let err = |e: &crate::Error| crate::Error::invalid("device-check", e.to_string());
        c.row(
            "softmax_ce",
            &format!("ce_fwd_b{b}_k{k}"),
            shape.clone(),
            torch("fwd"),
            |c| {
                let (want, _) = reference.map_err(err)?;
                let zd = c.dev.upload_bf16(&z)?;
                let td = c.dev.upload(&t)?;
                let f = softmax_ce::forward(c.dev, &zd, &td, b, k, p)?;
                let got = c.dev.download(&f.loss)?;
                let tm = c.time(|| softmax_ce::forward(c.dev, &zd, &td, b, k, p).map(drop))?;
                Ok(Measured {
                    err: Some((rel_l2(&got, &[*want]), TOL_F32_KERNEL)),
                    time: Some(tm),
                    bytes: 6.0 * bkf,
                    ..Default::default()
                })
            },
        );
        c.row(
            "softmax_ce",
            &format!("ce_bwd_b{b}_k{k}"),
            shape.clone(),
            Value::Null,
            |c| {
                let (_, want) = reference.map_err(err)?;
                let zd = c.dev.upload_bf16(&z)?;
                let td = c.dev.upload(&t)?;
                let f = softmax_ce::forward(c.dev, &zd, &td, b, k, p)?;
                let dz = softmax_ce::backward(c.dev, &zd, &td, &f, b, k, p, dloss)?;
                let got = c.dev.download_bf16(&dz)?;
                let tm =
                    c.time(|| softmax_ce::backward(c.dev, &zd, &td, &f, b, k, p, dloss).map(drop))?;
                Ok(Measured {
                    err: Some((rel_l2(&got, want.data()), TOL_BF16)),
                    time: Some(tm),
                    bytes: 8.0 * bkf,
                    ..Default::default()
                })
            },
        );
        c.row(
            "softmax_ce",
            &format!("ce_fused_b{b}_k{k}"),
            shape,
            torch("fwdbwd"),
            |c| {
                let (want_loss, want) = reference.map_err(err)?;
                let zd = c.dev.upload_bf16(&z)?;
                let td = c.dev.upload(&t)?;
                let (loss, dz) = softmax_ce::fused(c.dev, &zd, &td, b, k, p, dloss)?;
                let got = c.dev.download_bf16(&dz)?;
                let got_loss = c.dev.download(&loss)?;
                let tm = c.time(|| softmax_ce::fused(c.dev, &zd, &td, b, k, p, dloss).map(drop))?;
                let e = rel_l2(&got, want.data())
                    .max(rel_l2(&got_loss, &[*want_loss]) * TOL_BF16 / TOL_F32_KERNEL);
                Ok(Measured {
                    err: Some((e, TOL_BF16)),
                    time: Some(tm),
                    bytes: 8.0 * bkf,
                    note: "err = max(dz, loss scaled to the dz tolerance)".into(),
                    ..Default::default()
                })
            },
        );
    }
}
