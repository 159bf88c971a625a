//! The ResNet backbone on device buffers: [`forward`] and [`backward`] of the CPU
//! [`ResNet`]'s exact graph (torchvision v1.5 bottlenecks, NHWC), bf16 activations, fp32
//! statistics and gradients.
//!
//! Per layer, the ops are the fused ones the kernels were written for:
//! ```text
//! conv (cuDNN)  → bn_stats → bn_finalize (running stats) → bn_apply (+ residual) (+ ReLU)
//! backward: bn_backward_reduce (ReLU mask from the output) → bn_param_grads → bn_backward_apply
//!           (dx, and the residual's gradient in the same pass) → conv backward-filter / -data
//! ```
//! so a bottleneck is 3 convolutions and 3 (4 with the downsample) batch-norm passes, with the
//! residual add and the last ReLU inside the third batch norm's apply, where the CPU model adds
//! and clamps in separate passes. The numbers are the same up to bf16 rounding, which the tests
//! measure against the CPU model on the emulation.
//!
//! What is kept for the backward ([`ResNetSaved`]): each convolution's output (the batch norm's
//! input), each batch norm's output (the next convolution's input, and the ReLU mask), the
//! statistics, the max-pool's arg-max. That is the CPU model's set: nothing is recomputed.
//!
//! Several ranks: every batch norm is a SyncBatchNorm over the communicator's ranks, as in the
//! CPU model: the per-channel sums are exchanged (today through the host, see [`sync_sums`]).
//! Training mode only: evaluation (running statistics) runs on the CPU model, which shares the
//! parameters through the store.

use super::{DevParams, THREADS};
use crate::backend::device::blas::ConvShape;
use crate::backend::device::norm::{self, BnChannels, BN_ROWS_PER_BLOCK};
use crate::backend::device::{elementwise, pool, DevBuf, Exec};
use crate::dist::Communicator;
use crate::error::{Error, Result};
use crate::models::resnet::{Bottleneck, ResNet};
use crate::nn::batchnorm::BatchNorm;
use crate::nn::conv::Conv2d;
use crate::nn::ParamId;
use half::bf16;

/// The stem's max-pool: 3x3, stride 2, padding 1 (as the CPU model).
pub(super) const POOL_K: usize = 3;
pub(super) const POOL_S: usize = 2;
pub(super) const POOL_P: usize = 1;

/// An NHWC activation's geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nhwc {
    /// Batch.
    pub n: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
    /// Channels.
    pub c: usize,
}

impl Nhwc {
    /// Elements.
    pub fn len(&self) -> usize {
        self.n * self.h * self.w * self.c
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows of the `[N·H·W, C]` view batch norm works on.
    fn rows(&self) -> usize {
        self.n * self.h * self.w
    }
}

/// dx of a batch norm, and the residual's gradient when asked for.
pub(super) type BnGrads<E> = (<E as Exec>::Buf<bf16>, Option<<E as Exec>::Buf<bf16>>);

/// A batch norm's forward state for its backward.
pub(super) struct BnSaved<E: Exec> {
    /// The input (a convolution's output).
    pub(super) x: E::Buf<bf16>,
    /// The output (after the fused residual add and ReLU).
    pub(super) y: E::Buf<bf16>,
    pub(super) mean: E::Buf<f32>,
    pub(super) invstd: E::Buf<f32>,
}

/// One bottleneck's saved activations. Its input is the previous block's output (or the
/// stem's pooled output), read from there in the backward instead of being held twice.
pub(super) struct BlockSaved<E: Exec> {
    pub(super) b1: BnSaved<E>,
    pub(super) b2: BnSaved<E>,
    /// bn3's output is the block's output.
    pub(super) b3: BnSaved<E>,
    pub(super) ds: Option<BnSaved<E>>,
    /// Geometry of the block's input and of its output.
    pub(super) inp: Nhwc,
    pub(super) mid: Nhwc,
    pub(super) out: Nhwc,
}

/// What [`backward`] needs from one [`forward`] pass.
pub struct ResNetSaved<E: Exec> {
    pub(super) image: E::Buf<bf16>,
    pub(super) image_shape: Nhwc,
    pub(super) stem: BnSaved<E>,
    pub(super) stem_shape: Nhwc,
    pub(super) argmax: E::Buf<i32>,
    pub(super) pooled: E::Buf<bf16>,
    pub(super) pooled_shape: Nhwc,
    pub(super) blocks: Vec<BlockSaved<E>>,
}

impl<E: Exec> ResNetSaved<E> {
    /// The pass's last activation (layer4's output) and its geometry.
    fn last(&self) -> (&E::Buf<bf16>, Nhwc) {
        match self.blocks.last() {
            Some(b) => (&b.b3.y, b.out),
            None => (&self.pooled, self.pooled_shape),
        }
    }
}

pub(super) fn conv_shape(conv: &Conv2d, x: Nhwc) -> Result<(ConvShape, Nhwc)> {
    if conv.bias.is_some() {
        return Err(Error::invalid(
            "device ResNet",
            "a convolution with a bias (torchvision's ResNet has none)",
        ));
    }
    if x.c != conv.in_channels {
        return Err(Error::shape(
            "device ResNet",
            format!(
                "input {x:?} into a convolution of {} input channels",
                conv.in_channels
            ),
        ));
    }
    let s = ConvShape {
        n: x.n,
        h: x.h,
        w: x.w,
        c: x.c,
        o: conv.out_channels,
        kh: conv.kernel,
        kw: conv.kernel,
        stride: conv.params.stride,
        pad: conv.params.padding,
    };
    let (oh, ow) = s.out_hw()?;
    Ok((
        s,
        Nhwc {
            n: x.n,
            h: oh,
            w: ow,
            c: conv.out_channels,
        },
    ))
}

fn conv_forward<E: Exec>(
    ex: &E,
    p: &DevParams<E>,
    conv: &Conv2d,
    x: &E::Buf<bf16>,
    xs: Nhwc,
) -> Result<(E::Buf<bf16>, Nhwc)> {
    let (s, ys) = conv_shape(conv, xs)?;
    let mut y = ex.alloc::<bf16>(ys.len())?;
    ex.conv_forward(&s, x, p.operand(conv.weight)?, &mut y)?;
    Ok((y, ys))
}

/// Weight gradient into the accumulator, and dx when `need_dx`.
pub(super) fn conv_backward<E: Exec>(
    ex: &E,
    p: &mut DevParams<E>,
    conv: &Conv2d,
    x: &E::Buf<bf16>,
    xs: Nhwc,
    dy: &E::Buf<bf16>,
    need_dx: bool,
) -> Result<Option<E::Buf<bf16>>> {
    let (s, _) = conv_shape(conv, xs)?;
    if p.grad_mut(conv.weight)?.is_some() {
        let mut dw = ex.alloc::<bf16>(s.w_len())?;
        ex.conv_backward_filter(&s, x, dy, &mut dw)?;
        p.accumulate_bf16(ex, conv.weight, &dw)?;
    }
    if !need_dx {
        return Ok(None);
    }
    let mut dx = ex.alloc::<bf16>(s.x_len())?;
    ex.conv_backward_data(&s, p.operand(conv.weight)?, dy, &mut dx)?;
    Ok(Some(dx))
}

fn f32_of(v: f64, what: &str) -> Result<f32> {
    let f = v as f32;
    if !f.is_finite() {
        return Err(Error::invalid(
            "device ResNet",
            format!("{what} {v} is not finite"),
        ));
    }
    Ok(f)
}

/// SyncBatchNorm's exchange on device buffers: the two per-channel sums and the row count
/// summed over the ranks of `comm` (in f64, as the CPU layer packs them), through the host. With
/// one rank nothing moves and the count is `rows`. (On GPUs this becomes an NCCL all-reduce of
/// the device buffers; the host round trip is what the in-process and TCP communicators can do.)
fn sync_sums<E: Exec>(
    ex: &E,
    a: &mut E::Buf<f32>,
    b: &mut E::Buf<f32>,
    rows: usize,
    comm: &dyn Communicator,
) -> Result<usize> {
    if comm.world_size() <= 1 {
        return Ok(rows);
    }
    let (ha, hb) = (ex.download(a)?, ex.download(b)?);
    let c = ha.len();
    let mut buf: Vec<f64> = ha.iter().chain(&hb).map(|&v| v as f64).collect();
    buf.push(rows as f64);
    comm.all_reduce_sum_f64(&mut buf)?;
    let ra: Vec<f32> = buf[..c].iter().map(|&v| v as f32).collect();
    let rb: Vec<f32> = buf[c..2 * c].iter().map(|&v| v as f32).collect();
    ex.upload_into(&ra, a)?;
    ex.upload_into(&rb, b)?;
    Ok(buf[2 * c] as usize)
}

/// Training-mode batch norm of `x` (rows × channels of `xs`), with the layer's ReLU and an
/// optional residual added before it; updates the running statistics and the batch counter.
#[allow(clippy::too_many_arguments)]
fn bn_forward<E: Exec>(
    ex: &E,
    p: &mut DevParams<E>,
    bn: &BatchNorm,
    x: E::Buf<bf16>,
    xs: Nhwc,
    residual: Option<&E::Buf<bf16>>,
    relu: bool,
    comm: &dyn Communicator,
) -> Result<BnSaved<E>> {
    let (r, c) = (xs.rows(), xs.c);
    if c != bn.channels {
        return Err(Error::shape(
            "device ResNet",
            format!("{c} channels into a batch norm of {}", bn.channels),
        ));
    }
    let mut sums = norm::bn_stats(ex, &x, r, c, BN_ROWS_PER_BLOCK, THREADS)?;
    let count = sync_sums(ex, &mut sums.sum, &mut sums.sumsq, r, comm)?;
    let eps = f32_of(bn.eps, "batch-norm eps")?;
    let momentum = f32_of(bn.momentum, "batch-norm momentum")?;
    let stats = {
        let (rm, rv) = p.values_mut2(bn.running_mean, bn.running_var)?;
        norm::bn_finalize(
            ex,
            &sums.sum,
            &sums.sumsq,
            count,
            eps,
            momentum,
            rm,
            rv,
            THREADS,
        )?
    };
    p.bump(bn.num_batches_tracked)?;
    let ch = BnChannels {
        mean: &stats.mean,
        invstd: &stats.invstd,
        gamma: p.value(bn.weight)?,
        beta: p.value(bn.bias)?,
    };
    let y = norm::bn_apply(ex, &x, residual, ch, r, c, relu, THREADS)?;
    Ok(BnSaved {
        x,
        y,
        mean: stats.mean,
        invstd: stats.invstd,
    })
}

/// Backward of [`bn_forward`]: accumulates dγ, dβ; returns dx and (with `want_dres`) the
/// residual's gradient.
#[allow(clippy::too_many_arguments)]
pub(super) fn bn_backward<E: Exec>(
    ex: &E,
    p: &mut DevParams<E>,
    bn: &BatchNorm,
    s: &BnSaved<E>,
    xs: Nhwc,
    dy: &E::Buf<bf16>,
    relu: bool,
    want_dres: bool,
    comm: &dyn Communicator,
) -> Result<BnGrads<E>> {
    let (r, c) = (xs.rows(), xs.c);
    let y = relu.then_some(&s.y);
    let mut sums =
        norm::bn_backward_reduce(ex, dy, &s.x, y, &s.mean, r, c, BN_ROWS_PER_BLOCK, THREADS)?;
    // dγ, dβ from this rank's sums (the gradient all-reduce averages them later), dx from the
    // sums of every rank: SyncBatchNorm's backward, as the CPU layer.
    let g = norm::bn_param_grads(ex, &sums.sum_dy, &sums.sum_dy_xmu, &s.invstd, THREADS)?;
    p.accumulate_f32(ex, bn.weight, &g.dgamma)?;
    p.accumulate_f32(ex, bn.bias, &g.dbeta)?;
    let count = sync_sums(ex, &mut sums.sum_dy, &mut sums.sum_dy_xmu, r, comm)?;
    let ch = BnChannels {
        mean: &s.mean,
        invstd: &s.invstd,
        gamma: p.value(bn.weight)?,
        beta: p.value(bn.bias)?,
    };
    let out = norm::bn_backward_apply(
        ex,
        dy,
        &s.x,
        y,
        ch,
        (&sums.sum_dy, &sums.sum_dy_xmu),
        count,
        r,
        c,
        true,
        want_dres,
        THREADS,
    )?;
    Ok((out.dx, out.dres))
}

fn block_forward<E: Exec>(
    ex: &E,
    p: &mut DevParams<E>,
    blk: &Bottleneck,
    x: &E::Buf<bf16>,
    xs: Nhwc,
    comm: &dyn Communicator,
) -> Result<BlockSaved<E>> {
    // The downsample first, as the CPU block runs it: with several ranks every batch norm is a
    // collective, and ranks must reach them in the same order whatever runs each one.
    let ds = match &blk.downsample {
        Some((conv, bn)) => {
            let (cd, sd) = conv_forward(ex, p, conv, x, xs)?;
            Some((bn_forward(ex, p, bn, cd, sd, None, false, comm)?, sd))
        }
        None => None,
    };
    let (c1, s1) = conv_forward(ex, p, &blk.conv1, x, xs)?;
    let b1 = bn_forward(ex, p, &blk.bn1, c1, s1, None, true, comm)?;
    let (c2, s2) = conv_forward(ex, p, &blk.conv2, &b1.y, s1)?;
    let b2 = bn_forward(ex, p, &blk.bn2, c2, s2, None, true, comm)?;
    let (c3, s3) = conv_forward(ex, p, &blk.conv3, &b2.y, s2)?;
    let identity = ds.as_ref().map_or(xs, |(_, sd)| *sd);
    if identity != s3 {
        return Err(Error::shape(
            "device ResNet",
            format!("identity {identity:?} vs the block's output {s3:?}"),
        ));
    }
    let ds = ds.map(|(d, _)| d);
    // The residual add and the block's last ReLU happen inside bn3's apply.
    let residual = ds.as_ref().map_or(x, |d| &d.y);
    let b3 = bn_forward(ex, p, &blk.bn3, c3, s3, Some(residual), true, comm)?;
    Ok(BlockSaved {
        b1,
        b2,
        b3,
        ds,
        inp: xs,
        mid: s2,
        out: s3,
    })
}

pub(super) fn block_backward<E: Exec>(
    ex: &E,
    p: &mut DevParams<E>,
    blk: &Bottleneck,
    s: &BlockSaved<E>,
    x: &E::Buf<bf16>,
    dy: &E::Buf<bf16>,
    comm: &dyn Communicator,
) -> Result<E::Buf<bf16>> {
    let s1 = Nhwc {
        c: blk.conv1.out_channels,
        ..s.inp
    };
    // bn3 (+ residual + ReLU): dy masked by the block output, the residual's gradient too.
    let (d3, dres) = bn_backward(ex, p, &blk.bn3, &s.b3, s.out, dy, true, true, comm)?;
    let dres = dres.ok_or_else(|| Error::invalid("device ResNet", "no residual gradient"))?;
    let d2 = need(conv_backward(ex, p, &blk.conv3, &s.b2.y, s.mid, &d3, true)?)?;
    let (d2, _) = bn_backward(ex, p, &blk.bn2, &s.b2, s.mid, &d2, true, false, comm)?;
    let d1 = need(conv_backward(ex, p, &blk.conv2, &s.b1.y, s1, &d2, true)?)?;
    let (d1, _) = bn_backward(ex, p, &blk.bn1, &s.b1, s1, &d1, true, false, comm)?;
    let mut dx = need(conv_backward(ex, p, &blk.conv1, x, s.inp, &d1, true)?)?;
    match (&blk.downsample, &s.ds) {
        (Some((conv, bn)), Some(ds)) => {
            let (dd, _) = bn_backward(ex, p, bn, ds, s.out, &dres, false, false, comm)?;
            let dxd = need(conv_backward(ex, p, conv, x, s.inp, &dd, true)?)?;
            elementwise::add_assign_bf16(ex, &mut dx, &dxd, THREADS)?;
        }
        (None, None) => elementwise::add_assign_bf16(ex, &mut dx, &dres, THREADS)?,
        _ => {
            return Err(Error::invalid(
                "device ResNet",
                "the saved pass does not match the model's downsample layers",
            ))
        }
    }
    Ok(dx)
}

/// Every batch norm of the model, in forward order.
fn batch_norms(model: &ResNet) -> Vec<&BatchNorm> {
    let mut v = vec![&model.bn1];
    for blk in model.layers.iter().flatten() {
        v.extend([&blk.bn1, &blk.bn2, &blk.bn3]);
        if let Some((_, bn)) = &blk.downsample {
            v.push(bn);
        }
    }
    v
}

/// The stem's parameters (`conv1`, `bn1`), as the CPU model reports them to a gradient hook.
pub fn stem_params(model: &ResNet) -> Vec<ParamId> {
    let mut stem = vec![model.conv1.weight];
    stem.extend(model.conv1.bias);
    stem.extend([model.bn1.weight, model.bn1.bias]);
    stem
}

/// The model's state buffers (every batch norm's running mean, variance and counter): what a
/// device pass changes besides the gradients.
pub fn buffers(model: &ResNet) -> Vec<ParamId> {
    batch_norms(model)
        .into_iter()
        .flat_map(|b| [b.running_mean, b.running_var, b.num_batches_tracked])
        .collect()
}

/// The model's parameters: each block's (layer1 first), then the stem's.
pub fn params(model: &ResNet) -> Vec<ParamId> {
    let mut v: Vec<ParamId> = model
        .layers
        .iter()
        .flatten()
        .flat_map(|b| b.params())
        .collect();
    v.extend(stem_params(model));
    v
}

fn need<T>(v: Option<T>) -> Result<T> {
    v.ok_or_else(|| Error::invalid("device ResNet", "a needed input gradient was not computed"))
}

/// Training-mode forward over `image [n, h, w, 3]` (bf16 NHWC, kept for conv1's weight
/// gradient): the pooled features `[n, feature_dim]` (bf16) and what [`backward`] needs. Every
/// batch norm's running statistics and counter are updated once, as the CPU model's forward.
pub fn forward<E: Exec>(
    ex: &E,
    model: &ResNet,
    p: &mut DevParams<E>,
    image: E::Buf<bf16>,
    shape: Nhwc,
    comm: &dyn Communicator,
) -> Result<(E::Buf<bf16>, ResNetSaved<E>)> {
    if image.len() != shape.len() || shape.c != 3 {
        return Err(Error::shape(
            "device ResNet",
            format!(
                "image buffer of {} values for {shape:?}; expected NHWC RGB",
                image.len()
            ),
        ));
    }
    let (c, cs) = conv_forward(ex, p, &model.conv1, &image, shape)?;
    let stem = bn_forward(ex, p, &model.bn1, c, cs, None, true, comm)?;
    let mp = pool::maxpool2d_forward(
        ex, &stem.y, cs.n, cs.h, cs.w, cs.c, POOL_K, POOL_S, POOL_P, THREADS,
    )?;
    let ps = Nhwc {
        n: cs.n,
        h: mp.oh,
        w: mp.ow,
        c: cs.c,
    };
    let mut saved = ResNetSaved {
        image,
        image_shape: shape,
        stem,
        stem_shape: cs,
        argmax: mp.argmax,
        pooled: mp.y,
        pooled_shape: ps,
        blocks: Vec::with_capacity(model.layers.iter().map(Vec::len).sum()),
    };
    for blk in model.layers.iter().flatten() {
        let (x, xs) = saved.last();
        let b = block_forward(ex, p, blk, x, xs, comm)?;
        saved.blocks.push(b);
    }
    let (last, ls) = saved.last();
    let feats = pool::global_avgpool_forward(ex, last, ls.n, ls.h * ls.w, ls.c, THREADS)?;
    Ok((feats, saved))
}

/// Backward from the features' gradient `[n, feature_dim]` (bf16): adds every parameter's
/// gradient into its fp32 accumulator (the image gradient is not computed).
pub fn backward<E: Exec>(
    ex: &E,
    model: &ResNet,
    p: &mut DevParams<E>,
    saved: ResNetSaved<E>,
    dfeats: &E::Buf<bf16>,
    comm: &dyn Communicator,
) -> Result<()> {
    let blocks: Vec<&Bottleneck> = model.layers.iter().flatten().collect();
    if blocks.len() != saved.blocks.len() {
        return Err(Error::invalid(
            "device ResNet::backward",
            format!(
                "the saved pass has {} blocks, the model {}",
                saved.blocks.len(),
                blocks.len()
            ),
        ));
    }
    let (_, ls) = saved.last();
    let mut d = pool::global_avgpool_backward(ex, dfeats, ls.n, ls.h * ls.w, ls.c, THREADS)?;
    for (i, blk) in blocks.iter().enumerate().rev() {
        let x = if i == 0 {
            &saved.pooled
        } else {
            &saved.blocks[i - 1].b3.y
        };
        d = block_backward(ex, p, blk, &saved.blocks[i], x, &d, comm)?;
    }
    let cs = saved.stem_shape;
    let d = pool::maxpool2d_backward(
        ex,
        &d,
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
    let (d, _) = bn_backward(ex, p, &model.bn1, &saved.stem, cs, &d, true, false, comm)?;
    conv_backward(
        ex,
        p,
        &model.conv1,
        &saved.image,
        saved.image_shape,
        &d,
        false,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::device::check::{random, round_bf16};
    use crate::backend::device::{Emu, Mode};
    use crate::dist::SingleProcess;
    use crate::models::resnet::ResNetConfig;
    use crate::nn::ParamStore;
    use crate::testing::rel_l2;

    fn image(n: usize, hw: usize) -> Vec<f32> {
        round_bf16(&random("test.image", n * hw * hw * 3))
    }

    /// The public backward runs every block and the stem: after it, every trainable parameter
    /// has a finite, non-zero gradient, and a second pass adds to the first.
    #[test]
    fn full_backward_fills_every_gradient_and_passes_accumulate() {
        let ex = Emu::new(Mode::Fibers);
        let mut store = ParamStore::new();
        let model = ResNet::new(&mut store, ResNetConfig::tiny(), 3).unwrap();
        let mut p = DevParams::upload(&ex, &store).unwrap();
        let (n, hw) = (2, 64);
        let shape = Nhwc {
            n,
            h: hw,
            w: hw,
            c: 3,
        };
        let df = ex
            .upload_bf16(&round_bf16(&random("test.df", n * model.feature_dim())))
            .unwrap();
        let run = |p: &mut DevParams<Emu>| {
            let img = ex.upload_bf16(&image(n, hw)).unwrap();
            let (_, saved) = forward(&ex, &model, p, img, shape, &SingleProcess).unwrap();
            backward(&ex, &model, p, saved, &df, &SingleProcess).unwrap();
            let mut s = store.clone();
            p.download_grads(&ex, &mut s).unwrap();
            s
        };
        let one = run(&mut p);
        for id in params(&model) {
            let g = one.grad(id).data();
            assert!(g.iter().all(|v| v.is_finite()), "{}", one.entry(id).name);
            assert!(
                g.iter().any(|&v| v != 0.0),
                "{}: all zero",
                one.entry(id).name
            );
        }
        let two = run(&mut p);
        for id in params(&model) {
            let (a, b) = (one.grad(id).data(), two.grad(id).data());
            let doubled: Vec<f32> = a.iter().map(|v| 2.0 * v).collect();
            // The second pass sees the updated running statistics only in eval; in training
            // the same batch gives the same gradients (up to the fp32 accumulation).
            let e = rel_l2(b, &doubled);
            assert!(e <= 1e-5, "{}: rel {e:.2e}", one.entry(id).name);
        }
        assert_eq!(params(&model).len(), store.trainable().len());
        assert_eq!(
            buffers(&model).len(),
            store
                .entries()
                .iter()
                .filter(|e| e.kind == crate::nn::Kind::Buffer)
                .count()
        );
    }
}
