//! How the device ResNet is verified against the CPU model, in the tests (on the emulation)
//! and in the GPU check (`sdengine device-check`, rows `resnet*_pass_*`).
//!
//! Two kinds of comparison. The forward is compared block by block (each block on the CPU from
//! the device's input: bf16 rounding only) and end to end (features, running statistics). The
//! gradients are compared layer by layer on the device's OWN saved activations ("teacher
//! forcing"): end to end they cannot be held to a bf16 tolerance, because a ReLU whose input
//! lies within bf16 rounding of zero passes the gradient in one precision and blocks it in the
//! other, and with zero-mean gradients those few flips move per-channel sums by about
//! √(flip fraction): 5–40 % on small batches (measured here; PyTorch's autocast against its
//! own f32 behaves the same). On the same activations the masks agree, and each layer's
//! gradients must agree to bf16 rounding, while a miswired buffer, a missing residual or a
//! wrong mask is off by O(1) (the tests' mutations: 0.56 and 2.2).

use super::resnet::{
    self, block_backward, bn_backward, conv_backward, BlockSaved, BnSaved, Nhwc, ResNetSaved,
    POOL_K, POOL_P, POOL_S,
};
use super::{DevParams, THREADS};
use crate::backend::cpu::conv::conv2d_backward;
use crate::backend::cpu::norm::{batch_norm_backward, BatchNormCtx};
use crate::backend::device::check::{random, round_bf16, Checker, Measured};
use crate::backend::device::{pool, Exec};
use crate::dist::SingleProcess;
use crate::error::{Error, Result};
use crate::models::resnet::{Bottleneck, ResNet, ResNetConfig};
use crate::nn::batchnorm::BatchNorm;
use crate::nn::conv::Conv2d;
use crate::nn::{ParamId, ParamStore};
use crate::tensor::Tensor;
use crate::testing::rel_l2;
use half::bf16;
use serde_json::{json, Value};
use std::sync::Arc;

/// Tolerance of one block's output, or one layer's gradients, on the same inputs (bf16
/// activations and gradients between the ops, fp32 inside them).
pub const LAYER_TOL: f64 = 2e-2;
/// Tolerance of the whole forward end to end (features, running statistics) in bf16 against
/// the f32 CPU model, per layer of the chain (the stem and each block): the blocks' own errors
/// (≤ 1e-2 each on the same inputs, measured 5e-3–8e-3) add up along the chain, so the bound
/// grows with the depth — measured 2.8e-2 over resnet-tiny's 5 and 1.1e-1 over ResNet-50's 17
/// (randomly initialised, where nothing damps them).
pub const PASS_TOL_PER_LAYER: f64 = 1e-2;

/// [`PASS_TOL_PER_LAYER`] over the stem and every block of `model`.
pub fn pass_tol(model: &ResNet) -> f64 {
    PASS_TOL_PER_LAYER * (1 + model.layers.iter().map(Vec::len).sum::<usize>()) as f64
}

/// The worst errors of a verified pass.
#[derive(Clone, Debug, Default)]
pub struct PassReport {
    /// Worst block output, each block run on the CPU from the device's input.
    pub block_forward: (f64, String),
    /// Features of the whole pass against the CPU model's.
    pub features: f64,
    /// The end-to-end tolerance for this model ([`pass_tol`]).
    pub pass_tol: f64,
    /// Worst running statistic after the pass.
    pub running: (f64, String),
    /// Worst gradient (a block's input gradient or a parameter's), teacher-forced.
    pub grads: (f64, String),
    /// Number of parameter gradients compared.
    pub compared: usize,
}

fn worse(w: &mut (f64, String), e: f64, what: impl FnOnce() -> String) {
    // NaN is the worst of all.
    if e.is_nan() || e > w.0 {
        *w = (e, what());
    }
}

fn host<E: Exec>(ex: &E, b: &E::Buf<bf16>, s: Nhwc) -> Result<Tensor<f32>> {
    Tensor::from_vec(ex.download_bf16(b)?, &[s.n, s.h, s.w, s.c])
}

fn rounded(t: &Tensor<f32>) -> Result<Tensor<f32>> {
    Tensor::from_vec(round_bf16(t.data()), t.shape())
}

fn masked(dy: &Tensor<f32>, y: &Tensor<f32>) -> Tensor<f32> {
    let mut d = dy.clone();
    for (g, &v) in d.data_mut().iter_mut().zip(y.data()) {
        // NaN blocks the gradient, as in the kernels and the CPU model.
        if v.is_nan() || v <= 0.0 {
            *g = 0.0;
        }
    }
    d
}

/// Batch-norm backward on the CPU with the device's statistics and input, dy already masked:
/// `(dx, dγ, dβ)`.
fn bn_ref<E: Exec>(
    ex: &E,
    p: &DevParams<E>,
    bn: &BatchNorm,
    s: &BnSaved<E>,
    xs: Nhwc,
    dy: &Tensor<f32>,
) -> Result<(Tensor<f32>, Vec<f32>, Vec<f32>)> {
    let mean = ex.download(&s.mean)?;
    let invstd = ex.download(&s.invstd)?;
    let gamma = ex.download(p.value(bn.weight)?)?;
    let beta = ex.download(p.value(bn.bias)?)?;
    let scale: Vec<f32> = gamma.iter().zip(&invstd).map(|(g, i)| g * i).collect();
    let shift: Vec<f32> = (0..mean.len())
        .map(|c| beta[c] - mean[c] * scale[c])
        .collect();
    let ctx = BatchNormCtx {
        mean,
        invstd,
        scale,
        shift,
        training: true,
        relu: false,
    };
    let g = batch_norm_backward(dy, &host(ex, &s.x, xs)?, &ctx)?;
    Ok((g.dx, g.dgamma.into_vec(), g.dbeta.into_vec()))
}

/// Convolution backward on the CPU with the device's input and bf16 weight: `(dx, dw)`.
fn conv_ref<E: Exec>(
    ex: &E,
    p: &DevParams<E>,
    conv: &Conv2d,
    x: &Tensor<f32>,
    dy: &Tensor<f32>,
) -> Result<(Tensor<f32>, Vec<f32>)> {
    let shape = p.entry(conv.weight)?.shape.clone();
    let w = Tensor::from_vec(ex.download_bf16(p.operand(conv.weight)?)?, &shape)?;
    let g = conv2d_backward(x, &w, &rounded(dy)?, conv.params, true, false)?;
    let dx =
        g.dx.ok_or_else(|| Error::invalid("verify", "conv2d_backward gave no dx"))?;
    Ok((dx, g.dw.into_vec()))
}

fn add(a: &Tensor<f32>, b: &Tensor<f32>) -> Result<Tensor<f32>> {
    let v = a.data().iter().zip(b.data()).map(|(x, y)| x + y).collect();
    Tensor::from_vec(v, a.shape())
}

/// A block's expected input gradient and parameter gradients.
type Expected = (Tensor<f32>, Vec<(ParamId, Vec<f32>)>);

/// The expected gradients of one block from its device activations and `dy`:
/// `(dx, [(param, gradient)])`.
fn block_ref<E: Exec>(
    ex: &E,
    p: &DevParams<E>,
    blk: &Bottleneck,
    s: &BlockSaved<E>,
    x: &Tensor<f32>,
    dy: &Tensor<f32>,
) -> Result<Expected> {
    let s1 = Nhwc {
        c: blk.conv1.out_channels,
        ..s.inp
    };
    let mut g = Vec::new();
    let dres = masked(dy, &host(ex, &s.b3.y, s.out)?);
    let (d3, g3, b3) = bn_ref(ex, p, &blk.bn3, &s.b3, s.out, &dres)?;
    g.extend([(blk.bn3.weight, g3), (blk.bn3.bias, b3)]);
    let h2 = host(ex, &s.b2.y, s.mid)?;
    let (d2, w3) = conv_ref(ex, p, &blk.conv3, &h2, &d3)?;
    g.push((blk.conv3.weight, w3));
    let (d2, g2, b2) = bn_ref(ex, p, &blk.bn2, &s.b2, s.mid, &masked(&rounded(&d2)?, &h2))?;
    g.extend([(blk.bn2.weight, g2), (blk.bn2.bias, b2)]);
    let h1 = host(ex, &s.b1.y, s1)?;
    let (d1, w2) = conv_ref(ex, p, &blk.conv2, &h1, &d2)?;
    g.push((blk.conv2.weight, w2));
    let (d1, g1, b1) = bn_ref(ex, p, &blk.bn1, &s.b1, s1, &masked(&rounded(&d1)?, &h1))?;
    g.extend([(blk.bn1.weight, g1), (blk.bn1.bias, b1)]);
    let (dx, w1) = conv_ref(ex, p, &blk.conv1, x, &d1)?;
    g.push((blk.conv1.weight, w1));
    let dx = match (&blk.downsample, &s.ds) {
        (Some((conv, bn)), Some(ds)) => {
            let (dd, gd, bd) = bn_ref(ex, p, bn, ds, s.out, &rounded(&dres)?)?;
            g.extend([(bn.weight, gd), (bn.bias, bd)]);
            let (dxd, wd) = conv_ref(ex, p, conv, x, &dd)?;
            g.push((conv.weight, wd));
            add(&dx, &dxd)?
        }
        _ => add(&dx, &dres)?,
    };
    Ok((dx, g))
}

/// The input of block `i` of a saved pass and its geometry.
fn block_input<E: Exec>(saved: &ResNetSaved<E>, i: usize) -> (&E::Buf<bf16>, Nhwc) {
    if i == 0 {
        (&saved.pooled, saved.pooled_shape)
    } else {
        (&saved.blocks[i - 1].b3.y, saved.blocks[i - 1].out)
    }
}

/// A freshly initialised `cfg` ResNet (seed 1), its store, and the store mirrored on `ex`.
fn fresh<E: Exec>(ex: &E, cfg: ResNetConfig) -> Result<(ResNet, ParamStore, DevParams<E>)> {
    let mut store = ParamStore::new();
    let model = ResNet::new(&mut store, cfg, 1)?;
    let p = DevParams::upload(ex, &store)?;
    Ok((model, store, p))
}

/// Runs one training pass of a freshly initialised `cfg` ResNet (seed 1) on `ex` over `n`
/// images of `hw`² pixels and verifies it against the CPU model (see the module docs).
pub fn verify_pass<E: Exec>(ex: &E, cfg: ResNetConfig, n: usize, hw: usize) -> Result<PassReport> {
    let (model, store, mut p) = fresh(ex, cfg)?;
    let shape = Nhwc {
        n,
        h: hw,
        w: hw,
        c: 3,
    };
    let img = round_bf16(&random("resnet.image", shape.len()));
    let (f, saved) = resnet::forward(
        ex,
        &model,
        &mut p,
        ex.upload_bf16(&img)?,
        shape,
        &SingleProcess,
    )?;
    let mut r = PassReport {
        pass_tol: pass_tol(&model),
        ..Default::default()
    };
    let blocks: Vec<&Bottleneck> = model.layers.iter().flatten().collect();

    // Forward, block by block on the device's inputs, then end to end.
    for (i, blk) in blocks.iter().enumerate() {
        let (x, xs) = block_input(&saved, i);
        let mut st = store.clone();
        let (y, _) = blk.forward(&mut st, Arc::new(host(ex, x, xs)?), true)?;
        let b = &saved.blocks[i];
        let e = rel_l2(host(ex, &b.b3.y, b.out)?.data(), y.data());
        worse(&mut r.block_forward, e, || format!("block {i}"));
    }
    let mut cpu = store.clone();
    let (feats, _) = model.forward(&mut cpu, Tensor::from_vec(img, &[n, hw, hw, 3])?, true)?;
    r.features = rel_l2(&ex.download_bf16(&f)?, feats.data());
    let mut dev = store.clone();
    p.download_values(ex, &mut dev)?;
    for id in resnet::buffers(&model) {
        let e = rel_l2(dev.value(id).data(), cpu.value(id).data());
        worse(&mut r.running, e, || dev.entry(id).name.clone());
    }

    // Backward, layer by layer on the device's activations.
    for (i, blk) in blocks.iter().enumerate() {
        let (x, xs) = block_input(&saved, i);
        let b = &saved.blocks[i];
        let dy = round_bf16(&random(&format!("resnet.dy{i}"), b.out.len()));
        let dyt = Tensor::from_vec(dy.clone(), &[b.out.n, b.out.h, b.out.w, b.out.c])?;
        let (want_dx, want) = block_ref(ex, &p, blk, b, &host(ex, x, xs)?, &dyt)?;
        p.zero_grads(ex)?;
        let dx = block_backward(ex, &mut p, blk, b, x, &ex.upload_bf16(&dy)?, &SingleProcess)?;
        let e = rel_l2(&ex.download_bf16(&dx)?, want_dx.data());
        worse(&mut r.grads, e, || format!("block {i} input"));
        for (id, g) in &want {
            let got = match p.grad_mut(*id)? {
                Some(buf) => ex.download(buf)?,
                None => continue,
            };
            let e = rel_l2(&got, g);
            worse(&mut r.grads, e, || store.entry(*id).name.clone());
            r.compared += 1;
        }
    }
    // The stem: max-pool backward, bn1 (+ ReLU), conv1's weight gradient.
    let cs = saved.stem_shape;
    let dp = round_bf16(&random("resnet.dpool", saved.pooled_shape.len()));
    p.zero_grads(ex)?;
    let dstem = pool::maxpool2d_backward(
        ex,
        &ex.upload_bf16(&dp)?,
        &saved.argmax,
        cs.n,
        cs.h,
        cs.w,
        cs.c,
        POOL_K,
        POOL_S,
        POOL_P,
        THREADS,
    )?;
    let dstem_h = host(ex, &dstem, cs)?;
    let (d, _) = bn_backward(
        ex,
        &mut p,
        &model.bn1,
        &saved.stem,
        cs,
        &dstem,
        true,
        false,
        &SingleProcess,
    )?;
    conv_backward(
        ex,
        &mut p,
        &model.conv1,
        &saved.image,
        saved.image_shape,
        &d,
        false,
    )?;
    let m = host(ex, &saved.stem.y, cs)?;
    let (dc, g1, b1) = bn_ref(ex, &p, &model.bn1, &saved.stem, cs, &masked(&dstem_h, &m))?;
    let image = host(ex, &saved.image, saved.image_shape)?;
    let (_, w1) = conv_ref(ex, &p, &model.conv1, &image, &dc)?;
    for (id, g) in [
        (model.bn1.weight, g1),
        (model.bn1.bias, b1),
        (model.conv1.weight, w1),
    ] {
        if let Some(buf) = p.grad_mut(id)? {
            let e = rel_l2(&ex.download(buf)?, &g);
            worse(&mut r.grads, e, || store.entry(id).name.clone());
            r.compared += 1;
        }
    }
    Ok(r)
}

/// FLOPs of one training pass (forward, backward-data and backward-filter of every
/// convolution; the batch norms, pools and adds are bandwidth, not arithmetic) over `x`.
pub fn train_pass_flops(model: &ResNet, x: Nhwc) -> Result<f64> {
    let mut total = 0.0;
    let mut conv = |c: &Conv2d, xs: Nhwc, first: bool| -> Result<Nhwc> {
        let (s, ys) = resnet::conv_shape(c, xs)?;
        // conv1's input gradient is not computed.
        total += s.flops() * if first { 2.0 } else { 3.0 };
        Ok(ys)
    };
    let cs = conv(&model.conv1, x, true)?;
    let mut xs = Nhwc {
        h: (cs.h + 2 * POOL_P - POOL_K) / POOL_S + 1,
        w: (cs.w + 2 * POOL_P - POOL_K) / POOL_S + 1,
        ..cs
    };
    for blk in model.layers.iter().flatten() {
        let s1 = conv(&blk.conv1, xs, false)?;
        let s2 = conv(&blk.conv2, s1, false)?;
        let s3 = conv(&blk.conv3, s2, false)?;
        if let Some((d, _)) = &blk.downsample {
            conv(d, xs, false)?;
        }
        xs = s3;
    }
    Ok(total)
}

/// The device check's model rows: one training pass of the device ResNet verified against the
/// CPU model ([`verify_pass`]: one row for the forward end to end, one for the gradients
/// layer by layer), and the pass timed, at full size also at the training batch against
/// torchvision's ResNet-50 in PyTorch (bf16 autocast, channels-last; `scripts/torch_ops/
/// model.py`). Quick: resnet-tiny at 64 px.
pub fn check_rows<E: Exec>(c: &mut Checker<'_, E>) {
    let quick = c.opts.quick;
    let (cfg, n, hw, name) = if quick {
        (ResNetConfig::tiny(), 2, 64, "resnet_tiny")
    } else {
        (ResNetConfig::resnet50(), 8, 224, "resnet50")
    };
    let shape = format!("{n}x{hw}x{hw}x3");
    let report = std::cell::RefCell::new(None);
    let verify = |c: &Checker<'_, E>| -> Result<PassReport> {
        if let Some(r) = report.borrow().as_ref() {
            return Ok(PassReport::clone(r));
        }
        let r = verify_pass(c.dev, cfg, n, hw)?;
        *report.borrow_mut() = Some(r.clone());
        Ok(r)
    };
    c.row("model", &format!("{name}_pass_forward"), shape.clone(), Value::Null, |c| {
        let r = verify(c)?;
        // One row, one tolerance: the block errors are scaled to the end-to-end bound.
        let worst = r
            .features
            .max(r.running.0)
            .max(r.block_forward.0 * r.pass_tol / LAYER_TOL);
        Ok(Measured {
            err: Some((worst, r.pass_tol)),
            note: format!(
                "features {:.1e}, running stats {:.1e} ({}), blocks on the device's inputs {:.1e} ({})",
                r.features, r.running.0, r.running.1, r.block_forward.0, r.block_forward.1
            ),
            ..Default::default()
        })
    });
    c.row(
        "model",
        &format!("{name}_pass_gradients"),
        shape,
        Value::Null,
        |c| {
            let r = verify(c)?;
            Ok(Measured {
                err: Some((r.grads.0, LAYER_TOL)),
                note: format!(
                    "{} gradients layer by layer; worst: {}",
                    r.compared, r.grads.1
                ),
                ..Default::default()
            })
        },
    );
    // Timing at the training batch means something on a GPU only; on the emulation the quick
    // row still exercises the timed path.
    let batches: &[usize] = match (quick, c.dev.is_gpu()) {
        (true, _) => &[n],
        (false, true) => &[32, 64],
        (false, false) => &[],
    };
    for &b in batches {
        c.row(
            "model",
            &format!("{name}_train_pass_b{b}"),
            format!("{b}x{hw}x{hw}x3 fwd+bwd"),
            if quick {
                Value::Null
            } else {
                json!({"kind": "resnet_train", "n": b, "hw": hw})
            },
            |c| timed_pass(c, cfg, b, hw),
        );
    }
}

/// One forward + backward of the device ResNet at batch `n`, timed (images copied in place
/// each run, gradients accumulating: what a step's backbone pass costs).
fn timed_pass<E: Exec>(
    c: &Checker<'_, E>,
    cfg: ResNetConfig,
    n: usize,
    hw: usize,
) -> Result<Measured> {
    let ex = c.dev;
    let (model, _store, mut p) = fresh(ex, cfg)?;
    let shape = Nhwc {
        n,
        h: hw,
        w: hw,
        c: 3,
    };
    let img = ex.upload_bf16(&random("resnet.image", shape.len()))?;
    let df = ex.upload_bf16(&random("resnet.dfeat", n * model.feature_dim()))?;
    let time = c.time(|| {
        let mut x = ex.alloc::<bf16>(shape.len())?;
        ex.copy(&img, &mut x)?;
        let (_, saved) = resnet::forward(ex, &model, &mut p, x, shape, &SingleProcess)?;
        resnet::backward(ex, &model, &mut p, saved, &df, &SingleProcess)
    })?;
    let flops = train_pass_flops(&model, shape)?;
    Ok(Measured {
        time: Some(time),
        flops,
        note: format!("{:.0} img/s", n as f64 / (time.median_ms / 1e3)),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::device::{Emu, Mode};

    /// The device ResNet on the emulation: forward within bf16 rounding block by block and
    /// within the pass tolerance end to end; every gradient within bf16 rounding of the CPU
    /// ops on the device's activations.
    #[test]
    fn device_resnet_is_verified_against_the_cpu_model() {
        let ex = Emu::new(Mode::Fibers);
        let r = verify_pass(&ex, ResNetConfig::tiny(), 2, 64).unwrap();
        eprintln!("{r:?}");
        assert!(r.block_forward.0 <= LAYER_TOL, "{:?}", r.block_forward);
        assert_eq!(r.pass_tol, 5.0 * PASS_TOL_PER_LAYER);
        assert!(r.features <= r.pass_tol, "features {:.2e}", r.features);
        assert!(r.running.0 <= r.pass_tol, "{:?}", r.running);
        assert!(r.grads.0 <= LAYER_TOL, "{:?}", r.grads);
        let mut store = ParamStore::new();
        let model = ResNet::new(&mut store, ResNetConfig::tiny(), 1).unwrap();
        assert_eq!(r.compared, resnet::params(&model).len());
    }

    /// The FLOP count of ResNet-50 at 224 px: torchvision's 4.09 GMAC forward per image, ×2
    /// for FLOPs, ×3 for the pass (less conv1's unneeded input gradient).
    #[test]
    fn resnet50_pass_flops() {
        let mut store = ParamStore::new();
        let model = ResNet::new(&mut store, ResNetConfig::resnet50(), 0).unwrap();
        let f = train_pass_flops(
            &model,
            Nhwc {
                n: 1,
                h: 224,
                w: 224,
                c: 3,
            },
        )
        .unwrap();
        assert!((24.0e9..24.8e9).contains(&f), "{f:e}");
    }
}
