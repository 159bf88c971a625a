//! The GPU check's rows for the engine's own kernels (`kernels/<family>.cu`, launched by
//! `cuda/<family>.rs`): each against its CPU op, timed against the copy-bandwidth floor (these
//! kernels are memory-bound: bytes are the inputs read once and the outputs written once).
//!
//! A family of the kernel table without rows here gets a skipped row saying so, so that the
//! table never omits a kernel silently.

use super::check::{random, round_bf16, Checker, Measured, TOL_BF16};
use super::context::Gpu;
use super::module::table;
use crate::tensor::Tensor;
use crate::testing::rel_l2;
use serde_json::{json, Value};

/// Families with check rows below.
const WRAPPED: [&str; 2] = ["optim", "norm"];

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
    if table::module("optim").is_some() {
        optim_rows(c);
    }
    if table::module("norm").is_some() {
        norm_rows(c);
    }
}

/// ViT-S/16's layer norm (64 images x 197 tokens, width 384) against `cpu::norm`.
fn norm_rows(c: &mut Checker<'_, Gpu>) {
    use crate::backend::cpu::norm::layer_norm_forward;
    let rows = if c.opts.quick { 2 * 197 } else { 64 * 197 };
    let d = 384;
    let eps = 1e-6f32;
    c.row(
        "norm",
        "layernorm_fwd",
        format!("R{rows} D{d}"),
        json!({"kind": "layernorm", "rows": rows, "d": d, "eps": eps}),
        |c| {
            let x = round_bf16(&random("ln.x", rows * d));
            let g: Vec<f32> = random("ln.g", d).iter().map(|v| 1.0 + 0.5 * v).collect();
            let b = random("ln.b", d);
            let (want, _) = layer_norm_forward(
                &Tensor::from_vec(x.clone(), &[rows, d])?,
                &Tensor::from_vec(g.clone(), &[d])?,
                &Tensor::from_vec(b.clone(), &[d])?,
                eps as f64,
            )?;
            let (xd, gd, bd) = (c.dev.upload_bf16(&x)?, c.dev.upload(&g)?, c.dev.upload(&b)?);
            let out = super::norm::layernorm_forward(c.dev, &xd, &gd, &bd, rows, d, eps)?;
            let got = c.dev.download_bf16(&out.y)?;
            let t = c.time(|| {
                super::norm::layernorm_forward(c.dev, &xd, &gd, &bd, rows, d, eps).map(drop)
            })?;
            Ok(Measured {
                err: Some((rel_l2(&got, want.data()), TOL_BF16)),
                time: Some(t),
                bytes: 4.0 * (rows * d) as f64,
                note: "aim: >= 70% of copy bandwidth (%floor)".into(),
                ..Default::default()
            })
        },
    );
    c.row("norm", "norm_other_kernels", "-".into(), Value::Null, |_| {
        Ok(Measured {
            skipped: true,
            note: "SKIP: batch norm, L2 normalise, prototype renorm, layer norm backward have no GPU wrapper yet".into(),
            ..Default::default()
        })
    });
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
