//! ResNet backbone in torchvision's "v1.5" layout (the one SwAV and Suave train): bottleneck
//! blocks with the stride in the 3x3 conv, NHWC activations, parameter names = torchvision's
//! state-dict keys without `fc` (`conv1.weight`, `bn1.*`, `layer1.0.conv1.weight`,
//! `layer1.0.downsample.0.weight`, `layer1.0.downsample.1.*`, ...), registered in state-dict
//! order so that import/export is a rename-free walk.
//!
//! ```text
//! x [N,H,W,3] → conv1 7x7/2 pad 3 → bn1+ReLU → maxpool 3x3/2 pad 1
//!             → layer1..layer4 (bottlenecks, planes = width·2^i, expansion 4)
//!             → global average pool → [N, 32·width]   (2048 for ResNet-50)
//! bottleneck: 1x1 → bn+ReLU → 3x3/stride → bn+ReLU → 1x1 → bn → (+ identity | downsample) → ReLU
//! downsample (first block of a layer): 1x1/stride conv → bn
//! ```
//! The official Suave code pads the input by 1 (`ConstantPad2d(1, 0)`) and uses conv1 padding 2:
//! the same numbers as padding 3, which is what this module does.
//!
//! Init (torchvision / SwAV): Kaiming-normal fan-out for every conv, BN weight 1 and bias 0, no
//! zero-init of the last BN of a block. In practice Suave overwrites the backbone with a SwAV
//! checkpoint.
//!
//! Data parallelism: the `*_with` forms take a [`Communicator`] and run every BN as a
//! SyncBatchNorm over its ranks (the official code converts every BN); the plain forms are
//! the one-process case.
//!
//! Overlap: [`ResNet::backward_hooked`] reports each bottleneck's parameters to a
//! [`GradReady`] hook as soon as the block's backward is done, and the stem's last, so that the
//! trainer can all-reduce finished gradients while the backward goes on with earlier blocks
//! (`dist::overlap`). Only the last backbone pass of a step may report: a multi-crop step runs
//! one pass per resolution, and every pass adds to every gradient.
//!
//! Memory: every activation is held once, in an `Arc` shared by the layer that produced it (as
//! its output) and the layers that read it in the backward; nothing is cloned.

use crate::backend::cpu::pool::{
    global_avg_pool_backward, global_avg_pool_forward, max_pool2d_backward, max_pool2d_forward,
    MaxPool2dParams, MaxPool2dSaved,
};
use crate::dist::overlap::GradReady;
use crate::dist::{Communicator, SingleProcess};
use crate::error::{Error, Result};
use crate::nn::batchnorm::{BatchNorm, BatchNormCache};
use crate::nn::conv::{Conv2d, Conv2dCache};
use crate::nn::{ParamId, ParamStore};
use crate::tensor::Tensor;
use rayon::prelude::*;
use std::sync::Arc;

/// Bottleneck expansion: a block's output has 4x its `planes` channels.
pub const EXPANSION: usize = 4;

/// Depth and width of a bottleneck ResNet. [`ResNetConfig::resnet50`] (the default) is the exact
/// torchvision / SwAV ResNet-50; narrower or shallower members of the same family keep every
/// name and op and only change sizes (for CPU demos and fast tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResNetConfig {
    /// Bottleneck blocks per stage (`layer1..layer4`).
    pub layers: [usize; 4],
    /// Channels of the stem and `planes` of layer1 (torchvision's `width_per_group·widen`, 64).
    pub width: usize,
}

impl Default for ResNetConfig {
    fn default() -> Self {
        Self::resnet50()
    }
}

impl ResNetConfig {
    /// ResNet-50: [3, 4, 6, 3] bottlenecks, width 64, 2048 features.
    pub const fn resnet50() -> Self {
        ResNetConfig {
            layers: [3, 4, 6, 3],
            width: 64,
        }
    }

    /// A small member of the family for CPU demos and tests: one bottleneck per stage, width 16
    /// (512 features).
    pub const fn tiny() -> Self {
        ResNetConfig {
            layers: [1, 1, 1, 1],
            width: 16,
        }
    }

    /// Channels of the pooled features: `width · 8 · 4`.
    pub fn feature_dim(&self) -> usize {
        self.width * 8 * EXPANSION
    }

    fn validate(&self) -> Result<()> {
        if self.width == 0 || self.layers.contains(&0) {
            return Err(Error::invalid(
                "ResNetConfig",
                format!(
                    "layers {:?} and width {} must all be ≥ 1",
                    self.layers, self.width
                ),
            ));
        }
        Ok(())
    }
}

/// `h ← max(h + identity, 0)` in one pass (the block's residual add and its last ReLU). NaN
/// propagates (`NaN < 0` is false), as in PyTorch.
fn add_relu_inplace(h: &mut Tensor<f32>, identity: &Tensor<f32>) -> Result<()> {
    if h.shape() != identity.shape() {
        return Err(Error::shape(
            "Bottleneck::forward",
            format!(
                "residual {:?} vs identity {:?}",
                h.shape(),
                identity.shape()
            ),
        ));
    }
    const CHUNK: usize = 1 << 14;
    h.data_mut()
        .par_chunks_mut(CHUNK)
        .zip(identity.data().par_chunks(CHUNK))
        .for_each(|(a, b)| {
            for (u, &v) in a.iter_mut().zip(b) {
                let s = *u + v;
                *u = if s < 0.0 { 0.0 } else { s };
            }
        });
    Ok(())
}

/// `g ← g·[y > 0]` in place: the ReLU backward from its output.
fn relu_mask_inplace(g: &mut Tensor<f32>, y: &Tensor<f32>) -> Result<()> {
    if g.shape() != y.shape() {
        return Err(Error::shape(
            "Bottleneck::backward",
            format!("dy {:?} vs block output {:?}", g.shape(), y.shape()),
        ));
    }
    const CHUNK: usize = 1 << 14;
    g.data_mut()
        .par_chunks_mut(CHUNK)
        .zip(y.data().par_chunks(CHUNK))
        .for_each(|(a, b)| {
            for (u, &v) in a.iter_mut().zip(b) {
                if v.is_nan() || v <= 0.0 {
                    *u = 0.0;
                }
            }
        });
    Ok(())
}

/// `acc += x` (same shapes), in parallel.
fn add_inplace(acc: &mut Tensor<f32>, x: &Tensor<f32>) -> Result<()> {
    crate::backend::cpu::elementwise::add_assign(acc, x)
}

/// torchvision's `Bottleneck` (v1.5: stride in `conv2`).
#[derive(Clone, Debug)]
pub struct Bottleneck {
    pub conv1: Conv2d,
    pub bn1: BatchNorm,
    pub conv2: Conv2d,
    pub bn2: BatchNorm,
    pub conv3: Conv2d,
    pub bn3: BatchNorm,
    /// `downsample.0` (1x1/stride conv) and `downsample.1` (BN) where the shape changes.
    pub downsample: Option<(Conv2d, BatchNorm)>,
}

/// What [`Bottleneck::backward`] needs.
#[derive(Debug)]
pub struct BottleneckCache {
    c1: Conv2dCache,
    b1: BatchNormCache,
    c2: Conv2dCache,
    b2: BatchNormCache,
    c3: Conv2dCache,
    b3: BatchNormCache,
    ds: Option<(Conv2dCache, BatchNormCache)>,
    /// The block output (after the last ReLU), for that ReLU's backward; shared with the next
    /// layer's cache.
    y: Arc<Tensor<f32>>,
}

impl Bottleneck {
    fn new(
        store: &mut ParamStore,
        prefix: &str,
        inplanes: usize,
        planes: usize,
        stride: usize,
        seed: u64,
    ) -> Self {
        let out = planes * EXPANSION;
        let p = |s: &str| format!("{prefix}.{s}");
        let conv1 = Conv2d::new(store, &p("conv1"), inplanes, planes, 1, 1, 0, false, seed);
        let bn1 = BatchNorm::new(store, &p("bn1"), planes, true);
        let conv2 = Conv2d::new(
            store,
            &p("conv2"),
            planes,
            planes,
            3,
            stride,
            1,
            false,
            seed,
        );
        let bn2 = BatchNorm::new(store, &p("bn2"), planes, true);
        let conv3 = Conv2d::new(store, &p("conv3"), planes, out, 1, 1, 0, false, seed);
        let bn3 = BatchNorm::new(store, &p("bn3"), out, false);
        let downsample = (stride != 1 || inplanes != out).then(|| {
            let c = Conv2d::new(
                store,
                &p("downsample.0"),
                inplanes,
                out,
                1,
                stride,
                0,
                false,
                seed,
            );
            (c, BatchNorm::new(store, &p("downsample.1"), out, false))
        });
        Bottleneck {
            conv1,
            bn1,
            conv2,
            bn2,
            conv3,
            bn3,
            downsample,
        }
    }

    /// The block's trainable parameters (conv weights, BN weights and biases, downsample), in
    /// registration order: what its backward leaves final.
    pub fn params(&self) -> Vec<ParamId> {
        let mut ids = Vec::with_capacity(12);
        let mut conv_bn = |c: &Conv2d, b: &BatchNorm| {
            ids.push(c.weight);
            ids.extend(c.bias);
            ids.extend([b.weight, b.bias]);
        };
        conv_bn(&self.conv1, &self.bn1);
        conv_bn(&self.conv2, &self.bn2);
        conv_bn(&self.conv3, &self.bn3);
        if let Some((c, b)) = &self.downsample {
            conv_bn(c, b);
        }
        ids
    }

    /// Forward of one block; returns its output (shared with the cache).
    pub fn forward(
        &self,
        store: &mut ParamStore,
        x: Arc<Tensor<f32>>,
        training: bool,
    ) -> Result<(Arc<Tensor<f32>>, BottleneckCache)> {
        self.forward_with(store, x, training, &SingleProcess)
    }

    /// Forward with every BN synchronised over the ranks of `comm` in training mode.
    pub fn forward_with(
        &self,
        store: &mut ParamStore,
        x: Arc<Tensor<f32>>,
        training: bool,
        comm: &dyn Communicator,
    ) -> Result<(Arc<Tensor<f32>>, BottleneckCache)> {
        let ds = match &self.downsample {
            Some((conv, bn)) => {
                let (h, cc) = conv.forward(store, x.clone())?;
                let (h, bc) = bn.forward_with(store, h, training, comm)?;
                Some((h, cc, bc))
            }
            None => None,
        };
        let (h, c1) = self.conv1.forward(store, x)?;
        let (h, b1) = self.bn1.forward_with(store, h, training, comm)?;
        let (h, c2) = self.conv2.forward(store, h)?;
        let (h, b2) = self.bn2.forward_with(store, h, training, comm)?;
        let (h, c3) = self.conv3.forward(store, h)?;
        let (mut h, b3) = self.bn3.forward_with(store, h, training, comm)?;
        let ds = match ds {
            Some((identity, cc, bc)) => {
                add_relu_inplace(&mut h, &identity)?;
                Some((cc, bc))
            }
            None => {
                add_relu_inplace(&mut h, c1.input())?;
                None
            }
        };
        let y = Arc::new(h);
        let cache = BottleneckCache {
            c1,
            b1,
            c2,
            b2,
            c3,
            b3,
            ds,
            y: y.clone(),
        };
        Ok((y, cache))
    }

    /// Backward of one block from the gradient of its output; returns the input gradient.
    pub fn backward(
        &self,
        store: &mut ParamStore,
        cache: BottleneckCache,
        dy: Tensor<f32>,
    ) -> Result<Tensor<f32>> {
        self.backward_with(store, cache, dy, &SingleProcess)
    }

    /// Backward of [`Bottleneck::forward_with`] (the same communicator).
    pub fn backward_with(
        &self,
        store: &mut ParamStore,
        cache: BottleneckCache,
        dy: Tensor<f32>,
        comm: &dyn Communicator,
    ) -> Result<Tensor<f32>> {
        let mut g = dy;
        relu_mask_inplace(&mut g, &cache.y)?;
        drop(cache.y);
        let d = self.bn3.backward_with(store, cache.b3, &g, comm)?;
        let d = need(self.conv3.backward(store, cache.c3, &d, true)?)?;
        let d = self.bn2.backward_with(store, cache.b2, &d, comm)?;
        let d = need(self.conv2.backward(store, cache.c2, &d, true)?)?;
        let d = self.bn1.backward_with(store, cache.b1, &d, comm)?;
        let mut dx = need(self.conv1.backward(store, cache.c1, &d, true)?)?;
        match (&self.downsample, cache.ds) {
            (Some((conv, bn)), Some((cc, bc))) => {
                let d = bn.backward_with(store, bc, &g, comm)?;
                let d = need(conv.backward(store, cc, &d, true)?)?;
                add_inplace(&mut dx, &d)?;
            }
            (None, None) => add_inplace(&mut dx, &g)?,
            _ => {
                return Err(Error::invalid(
                    "Bottleneck::backward",
                    "cache from a different block (downsample mismatch)",
                ))
            }
        }
        Ok(dx)
    }
}

/// A conv backward asked for dx always returns it; this turns the Option into a Result.
fn need(dx: Option<Tensor<f32>>) -> Result<Tensor<f32>> {
    dx.ok_or_else(|| Error::invalid("ResNet::backward", "conv returned no input gradient"))
}

/// The ResNet backbone (no `fc`): NHWC images in, pooled features `[N, feature_dim]` out.
#[derive(Clone, Debug)]
pub struct ResNet {
    pub config: ResNetConfig,
    pub conv1: Conv2d,
    pub bn1: BatchNorm,
    /// `layer1..layer4`, each a list of bottlenecks.
    pub layers: Vec<Vec<Bottleneck>>,
}

/// What [`ResNet::backward`] needs: one per forward pass (one per crop resolution).
#[derive(Debug)]
pub struct ResNetCache {
    conv1: Conv2dCache,
    bn1: BatchNormCache,
    pool: MaxPool2dSaved,
    blocks: Vec<BottleneckCache>,
    /// Shape of layer4's output, for the average pool's backward.
    last_shape: Vec<usize>,
}

/// The stem's max-pool: 3x3, stride 2, padding 1.
const STEM_POOL: MaxPool2dParams = MaxPool2dParams {
    kernel: 3,
    stride: 2,
    padding: 1,
};

impl ResNet {
    /// Registers every parameter and buffer in torchvision's state-dict order, with the official
    /// init drawn by (seed, name).
    pub fn new(store: &mut ParamStore, config: ResNetConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let w = config.width;
        let conv1 = Conv2d::new(store, "conv1", 3, w, 7, 2, 3, false, seed);
        let bn1 = BatchNorm::new(store, "bn1", w, true);
        let mut inplanes = w;
        let mut layers = Vec::with_capacity(4);
        for (i, &blocks) in config.layers.iter().enumerate() {
            let planes = w << i;
            let stride = if i == 0 { 1 } else { 2 };
            let stage = (0..blocks)
                .map(|b| {
                    let s = if b == 0 { stride } else { 1 };
                    let blk = Bottleneck::new(
                        store,
                        &format!("layer{}.{b}", i + 1),
                        inplanes,
                        planes,
                        s,
                        seed,
                    );
                    inplanes = planes * EXPANSION;
                    blk
                })
                .collect();
            layers.push(stage);
        }
        Ok(ResNet {
            config,
            conv1,
            bn1,
            layers,
        })
    }

    /// Channels of the pooled features.
    pub fn feature_dim(&self) -> usize {
        self.config.feature_dim()
    }

    /// Forward over `x [N, H, W, 3]` (owned or shared; kept for conv1's weight gradient).
    /// Training mode updates every BN's running statistics once.
    pub fn forward(
        &self,
        store: &mut ParamStore,
        x: impl Into<Arc<Tensor<f32>>>,
        training: bool,
    ) -> Result<(Tensor<f32>, ResNetCache)> {
        self.forward_with(store, x, training, &SingleProcess)
    }

    /// Forward as [`ResNet::forward`] with every BN a SyncBatchNorm over the ranks of `comm`
    /// (training mode; collective, so every rank runs the same passes in the same order).
    pub fn forward_with(
        &self,
        store: &mut ParamStore,
        x: impl Into<Arc<Tensor<f32>>>,
        training: bool,
        comm: &dyn Communicator,
    ) -> Result<(Tensor<f32>, ResNetCache)> {
        let (h, conv1) = self.conv1.forward(store, x)?;
        let (h, bn1) = self.bn1.forward_with(store, h, training, comm)?;
        let (h, pool) = max_pool2d_forward(&h, STEM_POOL)?;
        let mut h = Arc::new(h);
        let mut blocks = Vec::with_capacity(self.layers.iter().map(Vec::len).sum());
        for blk in self.layers.iter().flatten() {
            let (y, c) = blk.forward_with(store, h, training, comm)?;
            blocks.push(c);
            h = y;
        }
        let feats = global_avg_pool_forward(&*h)?;
        let cache = ResNetCache {
            conv1,
            bn1,
            pool,
            blocks,
            last_shape: h.shape().to_vec(),
        };
        Ok((feats, cache))
    }

    /// Backward from the gradient of the pooled features `[N, feature_dim]`: accumulates every
    /// parameter gradient into the store (the image gradient is not computed).
    pub fn backward(
        &self,
        store: &mut ParamStore,
        cache: ResNetCache,
        dfeats: &Tensor<f32>,
    ) -> Result<()> {
        self.backward_with(store, cache, dfeats, &SingleProcess)
    }

    /// Backward of [`ResNet::forward_with`] (the same communicator): dx of every BN uses the
    /// gradient sums of all ranks.
    pub fn backward_with(
        &self,
        store: &mut ParamStore,
        cache: ResNetCache,
        dfeats: &Tensor<f32>,
        comm: &dyn Communicator,
    ) -> Result<()> {
        self.backward_hooked(store, cache, dfeats, comm, None)
    }

    /// [`ResNet::backward_with`] that reports finished gradients to `ready`: each bottleneck's
    /// parameters once its backward is done (layer4 first), then the stem's (`conv1`, `bn1`).
    /// Pass `Some` only for the last backbone pass of a step (earlier passes' gradients are not
    /// final), `None` for the others.
    pub fn backward_hooked(
        &self,
        store: &mut ParamStore,
        cache: ResNetCache,
        dfeats: &Tensor<f32>,
        comm: &dyn Communicator,
        mut ready: Option<&mut (dyn GradReady + '_)>,
    ) -> Result<()> {
        let mut d = global_avg_pool_backward(dfeats, &cache.last_shape)?;
        let mut caches = cache.blocks;
        for blk in self.layers.iter().flatten().rev() {
            let c = caches.pop().ok_or_else(|| {
                Error::invalid("ResNet::backward", "cache has fewer blocks than the model")
            })?;
            d = blk.backward_with(store, c, d, comm)?;
            if let Some(r) = ready.as_deref_mut() {
                r.ready(store, &blk.params())?;
            }
        }
        let d = max_pool2d_backward(&d, &cache.pool)?;
        let d = self.bn1.backward_with(store, cache.bn1, &d, comm)?;
        self.conv1.backward(store, cache.conv1, &d, false)?;
        if let Some(r) = ready {
            let mut stem = vec![self.conv1.weight];
            stem.extend(self.conv1.bias);
            stem.extend([self.bn1.weight, self.bn1.bias]);
            r.ready(store, &stem)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resnet50_names_and_count() {
        let mut s = ParamStore::new();
        let m = ResNet::new(&mut s, ResNetConfig::resnet50(), 0).unwrap();
        // torchvision resnet50 without fc: 25,557,032 − (2048·1000 + 1000)
        assert_eq!(s.num_params(), 23_508_032);
        assert_eq!(m.feature_dim(), 2048);
        let names: Vec<&str> = s.entries().iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            &names[..7],
            &[
                "conv1.weight",
                "bn1.weight",
                "bn1.bias",
                "bn1.running_mean",
                "bn1.running_var",
                "bn1.num_batches_tracked",
                "layer1.0.conv1.weight"
            ]
        );
        assert!(names.contains(&"layer1.0.downsample.0.weight"));
        assert!(names.contains(&"layer4.2.bn3.num_batches_tracked"));
        assert!(!names.contains(&"layer1.1.downsample.0.weight"));
        assert_eq!(*names.last().unwrap(), "layer4.2.bn3.num_batches_tracked");
        // 53 convs + 53 BNs (5 entries each)
        assert_eq!(s.len(), 53 + 53 * 5);
    }

    #[test]
    fn bad_config_and_input_are_errors() {
        let mut s = ParamStore::new();
        let bad = ResNetConfig {
            layers: [1, 0, 1, 1],
            width: 8,
        };
        assert!(ResNet::new(&mut s, bad, 0).is_err());
        let m = ResNet::new(&mut s, ResNetConfig::tiny(), 0).unwrap();
        assert!(m
            .forward(&mut s, Tensor::zeros(&[2, 32, 32, 4]), true)
            .is_err());
        assert!(m
            .forward(&mut s, Tensor::zeros(&[2, 32, 32]), true)
            .is_err());
    }

    /// A model runs once per crop resolution, each pass with its own cache. In evaluation mode
    /// every image is processed independently, so two passes over the halves of a batch must
    /// accumulate the same gradients as one pass over the whole (gradient values themselves are
    /// checked against PyTorch in tests/model_resnet.rs).
    #[test]
    fn two_passes_accumulate_like_one() {
        let cfg = ResNetConfig {
            layers: [1, 2, 1, 1],
            width: 8,
        };
        let x1 = Tensor::randn_named(0, "x1", &[2, 32, 32, 3], 1.0);
        let x2 = Tensor::randn_named(0, "x2", &[3, 32, 32, 3], 1.0);
        let d1 = Tensor::randn_named(0, "d1", &[2, cfg.feature_dim()], 1.0);
        let d2 = Tensor::randn_named(0, "d2", &[3, cfg.feature_dim()], 1.0);
        let build = || {
            let mut s = ParamStore::new();
            let m = ResNet::new(&mut s, cfg, 3).unwrap();
            crate::nn::init::reference_fill(&mut s, 5);
            (s, m)
        };
        let (mut s, m) = build();
        let (f1, c1) = m.forward(&mut s, x1.clone(), false).unwrap();
        let (f2, c2) = m.forward(&mut s, x2.clone(), false).unwrap();
        m.backward(&mut s, c2, &d2).unwrap();
        m.backward(&mut s, c1, &d1).unwrap();
        let (mut s_, m_) = build();
        let x = Tensor::cat_batch(&[&x1, &x2]).unwrap();
        let (f, c) = m_.forward(&mut s_, x, false).unwrap();
        m_.backward(&mut s_, c, &Tensor::cat_batch(&[&d1, &d2]).unwrap())
            .unwrap();
        let f12 = Tensor::cat_batch(&[&f1, &f2]).unwrap();
        assert!(crate::testing::rel_l2(f12.data(), f.data()) < 1e-6);
        for id in s.trainable() {
            let e = crate::testing::rel_l2(s.grad(id).data(), s_.grad(id).data());
            assert!(e < 1e-5, "{}: {e}", s.entry(id).name);
            assert!(s.grad(id).data().iter().any(|v| *v != 0.0));
        }
    }

    #[test]
    fn residual_helpers() {
        let mut h = Tensor::from_vec(vec![1.0, -2.0, 0.5, f32::NAN], &[4]).unwrap();
        let id = Tensor::from_vec(vec![-3.0, 1.0, 0.5, 0.0], &[4]).unwrap();
        add_relu_inplace(&mut h, &id).unwrap();
        assert_eq!(&h.data()[..3], &[0.0, 0.0, 1.0]);
        assert!(h.data()[3].is_nan());
        let mut g = Tensor::full(&[4], 2.0);
        relu_mask_inplace(&mut g, &h).unwrap();
        assert_eq!(g.data(), &[0.0, 0.0, 2.0, 0.0]);
    }
}
