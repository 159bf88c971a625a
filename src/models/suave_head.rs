//! Suave's heads on a ResNet backbone, and the whole Suave network with its multi-crop forward
//! (spec §1.2, §1.3, §1.7; official `src/resnet50.py`).
//!
//! ```text
//! features f [N, 2048]
//!   → projection_head.0.0 Linear(2048→2048) → projection_head.0.1 BatchNorm1d+ReLU → a
//!   → projection_head.1 Linear(2048→128) → z_raw → L2-normalise → z (the embedding)
//!   → prototypes Linear(128→K, no bias) → scores (cosines once the rows are unit-norm)
//! online linear heads on DETACHED features of the first `lab_rows` rows (the labelled ones):
//!   cls_heads.0(f) 2048→C, cls_heads.1(a) 2048→C, cls_heads.2(z_raw) 128→C, all with bias
//! ```
//! Key names are the official ones: the projection head is a `ModuleList` (so
//! `projection_head.0.{0,1}.*`, `projection_head.1.*`, not SwAV's `Sequential` keys) and the online
//! heads are the `ModuleList` `cls_heads` (`cls_heads.{0,1,2}.{weight,bias}`), registered after the
//! projection head and before `prototypes`, as the official module registers them.
//! All Linears use PyTorch's default init; the BN weight 1, bias 0.
//!
//! Overlap: the `backward_hooked` forms report each layer's parameters to a [`GradReady`] hook
//! as soon as its gradient is final (the heads run once a step, so right after their own
//! backward; the backbone in its last pass only), so that the gradient all-reduce can run
//! while the backward goes on (`dist::overlap`).

use super::backbone::{BackboneCache, BackboneRun, CpuBackbone};
use super::resnet::{ResNet, ResNetConfig};
use crate::backend::cpu::elementwise::add_assign;
use crate::backend::cpu::norm::{l2_normalize_backward, l2_normalize_forward, L2NormalizeCtx};
use crate::dist::overlap::{GradReady, NoGradSink};
use crate::dist::{Communicator, SingleProcess};
use crate::error::{Error, Result};
use crate::nn::batchnorm::{BatchNorm, BatchNormCache};
use crate::nn::linear::{Linear, LinearCache};
use crate::nn::{ParamId, ParamStore};
use crate::tensor::Tensor;

/// The online heads' names in the official logs, in `cls_heads` order.
pub const ONLINE_HEADS: [&str; 3] = ["bbone", "proj_0", "proj_last"];

/// Sizes of Suave's heads (the training scripts: 2048 → 2048 → 128, 1000 prototypes = classes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SuaveHeadConfig {
    /// Backbone features (2048 for ResNet-50).
    pub in_dim: usize,
    /// Hidden width of the projection head (`hidden_mlp`, 2048).
    pub hidden: usize,
    /// Embedding width (`feat_dim`, 128).
    pub out_dim: usize,
    /// Prototypes (`nmb_prototypes`, = the number of classes in Suave).
    pub n_prototypes: usize,
    /// Classes of the online linear heads.
    pub n_classes: usize,
    /// Build the three online linear heads (`--multihead_eval true` in every script).
    pub online_heads: bool,
}

impl Default for SuaveHeadConfig {
    fn default() -> Self {
        SuaveHeadConfig {
            in_dim: 2048,
            hidden: 2048,
            out_dim: 128,
            n_prototypes: 1000,
            n_classes: 1000,
            online_heads: true,
        }
    }
}

/// The projection head, prototypes and online heads.
#[derive(Clone, Debug)]
pub struct SuaveHead {
    pub config: SuaveHeadConfig,
    /// `projection_head.0.0`.
    pub proj_fc1: Linear,
    /// `projection_head.0.1` (BatchNorm1d with the ReLU fused).
    pub proj_bn: BatchNorm,
    /// `projection_head.1`.
    pub proj_fc2: Linear,
    /// `cls_heads.{0,1,2}` on the backbone features, the hidden layer and the projection.
    pub cls_heads: Option<[Linear; 3]>,
    /// `prototypes` (no bias); rows renormalised by [`SuaveHead::normalize_prototypes`].
    pub prototypes: Linear,
}

/// The head's outputs for all rows.
#[derive(Clone, Debug)]
pub struct SuaveOutput {
    /// L2-normalised projection z `[N, out_dim]` (what the queue stores).
    pub embedding: Tensor<f32>,
    /// Prototype scores `z·Cᵀ` `[N, n_prototypes]`.
    pub scores: Tensor<f32>,
    /// Online heads' logits `[lab_rows, n_classes]` in [`ONLINE_HEADS`] order (None when the
    /// model has no online heads).
    pub online_logits: Option<[Tensor<f32>; 3]>,
}

/// Upstream gradients for the backward. `embedding` is optional because Suave only uses z
/// detached (queue); `online` is required when the forward produced online logits and they
/// are trained.
#[derive(Clone, Copy, Debug)]
pub struct SuaveGrads<'a> {
    pub scores: &'a Tensor<f32>,
    pub embedding: Option<&'a Tensor<f32>>,
    pub online: Option<[&'a Tensor<f32>; 3]>,
}

/// What [`SuaveHead::backward`] needs.
#[derive(Debug)]
pub struct SuaveHeadCache {
    fc1: LinearCache,
    bn: BatchNormCache,
    fc2: LinearCache,
    z_raw: Tensor<f32>,
    l2: L2NormalizeCtx<f32>,
    proto: LinearCache,
    online: Option<[LinearCache; 3]>,
}

/// The first `rows` rows of `x [N, D]`, as a new tensor (the detached input of an online head).
fn first_rows(x: &Tensor<f32>, rows: usize) -> Result<Tensor<f32>> {
    let n = x.dim(0);
    if rows > n {
        return Err(Error::shape(
            "SuaveHead::forward",
            format!("lab_rows {rows} > batch {n}"),
        ));
    }
    let d = x.numel() / n.max(1);
    Tensor::from_vec(x.data()[..rows * d].to_vec(), &[rows, d])
}

impl SuaveHead {
    /// Registers the heads in the official order (projection head, online heads, prototypes).
    pub fn new(store: &mut ParamStore, config: SuaveHeadConfig, seed: u64) -> Self {
        let c = config;
        let proj_fc1 = Linear::new(store, "projection_head.0.0", c.in_dim, c.hidden, true, seed);
        let proj_bn = BatchNorm::new(store, "projection_head.0.1", c.hidden, true);
        let proj_fc2 = Linear::new(store, "projection_head.1", c.hidden, c.out_dim, true, seed);
        let cls_heads = c.online_heads.then(|| {
            [c.in_dim, c.hidden, c.out_dim]
                .iter()
                .enumerate()
                .map(|(i, &d)| {
                    Linear::new(store, &format!("cls_heads.{i}"), d, c.n_classes, true, seed)
                })
                .collect::<Vec<_>>()
                .try_into()
                .expect("three heads")
        });
        let prototypes = Linear::new(store, "prototypes", c.out_dim, c.n_prototypes, false, seed);
        SuaveHead {
            config,
            proj_fc1,
            proj_bn,
            proj_fc2,
            cls_heads,
            prototypes,
        }
    }

    /// Renormalises every prototype row to unit L2 norm in place (`F.normalize(w, dim=1)`), no
    /// gradient. Suave does this before every step's forward, so the scores are cosines.
    pub fn normalize_prototypes(&self, store: &mut ParamStore) -> Result<()> {
        let (w, _) = l2_normalize_forward(store.value(self.prototypes.weight))?;
        *store.value_mut(self.prototypes.weight) = w;
        Ok(())
    }

    /// Forward over the backbone features `f [N, in_dim]`; the online heads see the first
    /// `lab_rows` rows, detached.
    pub fn forward(
        &self,
        store: &mut ParamStore,
        f: &Tensor<f32>,
        lab_rows: usize,
        training: bool,
    ) -> Result<(SuaveOutput, SuaveHeadCache)> {
        self.forward_with(store, f, lab_rows, training, &SingleProcess)
    }

    /// Forward with the projection's BatchNorm1d synchronised over the ranks of `comm`.
    pub fn forward_with(
        &self,
        store: &mut ParamStore,
        f: &Tensor<f32>,
        lab_rows: usize,
        training: bool,
        comm: &dyn Communicator,
    ) -> Result<(SuaveOutput, SuaveHeadCache)> {
        f.expect_shape(
            "SuaveHead::forward",
            "features",
            &[f.dim(0), self.config.in_dim],
        )?;
        let mut online_in = Vec::new();
        if self.cls_heads.is_some() {
            online_in.push(first_rows(f, lab_rows)?);
        }
        let (h, fc1) = self.proj_fc1.forward(store, f)?;
        let (a, bn) = self.proj_bn.forward_with(store, h, training, comm)?;
        if self.cls_heads.is_some() {
            online_in.push(first_rows(&a, lab_rows)?);
        }
        let (z_raw, fc2) = self.proj_fc2.forward(store, &a)?;
        drop(a);
        if self.cls_heads.is_some() {
            online_in.push(first_rows(&z_raw, lab_rows)?);
        }
        let (z, l2) = l2_normalize_forward(&z_raw)?;
        let (scores, proto) = self.prototypes.forward(store, &z)?;
        let (online_logits, online) = match &self.cls_heads {
            Some(heads) => {
                let mut logits = Vec::with_capacity(3);
                let mut caches = Vec::with_capacity(3);
                for (head, x) in heads.iter().zip(&online_in) {
                    let (y, c) = head.forward(store, x)?;
                    logits.push(y);
                    caches.push(c);
                }
                (
                    Some(logits.try_into().expect("three heads")),
                    Some(caches.try_into().expect("three heads")),
                )
            }
            None => (None, None),
        };
        let out = SuaveOutput {
            embedding: z,
            scores,
            online_logits,
        };
        let cache = SuaveHeadCache {
            fc1,
            bn,
            fc2,
            z_raw,
            l2,
            proto,
            online,
        };
        Ok((out, cache))
    }

    /// Backward: accumulates the gradients of every head parameter and returns the gradient of
    /// the backbone features. The online heads' gradients stop at their (detached) inputs.
    pub fn backward(
        &self,
        store: &mut ParamStore,
        cache: SuaveHeadCache,
        grads: SuaveGrads<'_>,
    ) -> Result<Tensor<f32>> {
        self.backward_with(store, cache, grads, &SingleProcess)
    }

    /// Backward of [`SuaveHead::forward_with`] (the same communicator).
    pub fn backward_with(
        &self,
        store: &mut ParamStore,
        cache: SuaveHeadCache,
        grads: SuaveGrads<'_>,
        comm: &dyn Communicator,
    ) -> Result<Tensor<f32>> {
        self.backward_hooked(store, cache, grads, comm, &mut NoGradSink)
    }

    /// [`SuaveHead::backward_with`] that reports each layer's parameters to `ready` once its
    /// gradient is final: the online heads, the prototypes, `projection_head.1`, the BN, then
    /// `projection_head.0.0`.
    pub fn backward_hooked(
        &self,
        store: &mut ParamStore,
        cache: SuaveHeadCache,
        grads: SuaveGrads<'_>,
        comm: &dyn Communicator,
        ready: &mut dyn GradReady,
    ) -> Result<Tensor<f32>> {
        if let (Some(heads), Some(caches), Some(dl)) = (&self.cls_heads, cache.online, grads.online)
        {
            for ((head, c), g) in heads.iter().zip(caches).zip(dl) {
                head.backward(store, c, g, false)?;
                ready.ready(store, &linear_params(head))?;
            }
        }
        let mut dz = need(
            self.prototypes
                .backward(store, cache.proto, grads.scores, true)?,
        )?;
        ready.ready(store, &linear_params(&self.prototypes))?;
        if let Some(g) = grads.embedding {
            add_assign(&mut dz, g)?;
        }
        let dz_raw = l2_normalize_backward(&dz, &cache.z_raw, &cache.l2)?;
        let da = need(self.proj_fc2.backward(store, cache.fc2, &dz_raw, true)?)?;
        ready.ready(store, &linear_params(&self.proj_fc2))?;
        let dh = self.proj_bn.backward_with(store, cache.bn, &da, comm)?;
        ready.ready(store, &[self.proj_bn.weight, self.proj_bn.bias])?;
        let df = need(self.proj_fc1.backward(store, cache.fc1, &dh, true)?)?;
        ready.ready(store, &linear_params(&self.proj_fc1))?;
        Ok(df)
    }
}

/// A Linear's weight and bias ids.
fn linear_params(l: &Linear) -> Vec<ParamId> {
    std::iter::once(l.weight).chain(l.bias).collect()
}

fn need(dx: Option<Tensor<f32>>) -> Result<Tensor<f32>> {
    dx.ok_or_else(|| Error::invalid("SuaveHead::backward", "layer returned no input gradient"))
}

/// The whole Suave network as the official `ResNet` module with heads: backbone parameters at
/// the top level (`conv1.weight`, ...), then the heads.
#[derive(Clone, Debug)]
pub struct SuaveNet {
    pub backbone: ResNet,
    pub head: SuaveHead,
}

/// What [`SuaveNet::backward`] needs: one backbone cache per resolution group, the rows of each
/// group, and the head's cache.
#[derive(Debug)]
pub struct SuaveCache {
    groups: Vec<(usize, BackboneCache)>,
    head: SuaveHeadCache,
}

impl SuaveCache {
    /// Rows of each backbone pass, in input order.
    pub fn group_rows(&self) -> Vec<usize> {
        self.groups.iter().map(|(n, _)| *n).collect()
    }
}

impl SuaveNet {
    /// Builds the backbone and heads; `head.in_dim` is set from the backbone.
    pub fn new(
        store: &mut ParamStore,
        backbone: ResNetConfig,
        head: SuaveHeadConfig,
        seed: u64,
    ) -> Result<Self> {
        let backbone = ResNet::new(store, backbone, seed)?;
        let head = SuaveHead::new(
            store,
            SuaveHeadConfig {
                in_dim: backbone.feature_dim(),
                ..head
            },
            seed,
        );
        Ok(SuaveNet { backbone, head })
    }

    /// Multi-crop forward as the official `forward`: `inputs` = `[labelled batch, views...]`,
    /// each NHWC. Consecutive inputs of the same spatial size are concatenated and run through
    /// the backbone together (one pass, one cache and one BN-statistics update per group), the
    /// features are concatenated in input order and the head runs once on all rows. The online
    /// heads see the first `inputs[0].dim(0)` rows. (The official code groups by width alone and
    /// would fail to concatenate views of equal width and different height; grouping by
    /// (H, W) gives the same groups wherever that code works.)
    pub fn forward(
        &self,
        store: &mut ParamStore,
        inputs: &[Tensor<f32>],
        training: bool,
    ) -> Result<(SuaveOutput, SuaveCache)> {
        self.forward_with(store, inputs, training, &SingleProcess)
    }

    /// Forward as [`SuaveNet::forward`] with every BN (backbone, per resolution group, and the
    /// projection's BatchNorm1d) a SyncBatchNorm over the ranks of `comm` (spec §1.3: the
    /// statistics of a group mix labelled and unlabelled rows of every rank). Every rank must
    /// pass inputs of the same resolutions in the same order.
    pub fn forward_with(
        &self,
        store: &mut ParamStore,
        inputs: &[Tensor<f32>],
        training: bool,
        comm: &dyn Communicator,
    ) -> Result<(SuaveOutput, SuaveCache)> {
        self.forward_on(store, inputs, training, comm, &mut CpuBackbone)
    }

    /// [`SuaveNet::forward_with`] with the backbone passes run by `runner` (the CPU model, or a
    /// device); the head runs here either way. Pass the same runner to
    /// [`SuaveNet::backward_on`].
    pub fn forward_on(
        &self,
        store: &mut ParamStore,
        inputs: &[Tensor<f32>],
        training: bool,
        comm: &dyn Communicator,
        runner: &mut dyn BackboneRun,
    ) -> Result<(SuaveOutput, SuaveCache)> {
        let first = inputs
            .first()
            .ok_or_else(|| Error::invalid("SuaveNet::forward", "no inputs"))?;
        for (i, x) in inputs.iter().enumerate() {
            if x.rank() != 4 {
                return Err(Error::shape(
                    "SuaveNet::forward",
                    format!("input {i} has shape {:?}, expected NHWC", x.shape()),
                ));
            }
        }
        let lab_rows = first.dim(0);
        let mut groups = Vec::new();
        let mut feats = Vec::new();
        let mut start = 0;
        while start < inputs.len() {
            let hw = (inputs[start].dim(1), inputs[start].dim(2));
            let mut end = start + 1;
            while end < inputs.len() && (inputs[end].dim(1), inputs[end].dim(2)) == hw {
                end += 1;
            }
            let parts: Vec<&Tensor<f32>> = inputs[start..end].iter().collect();
            let x = Tensor::cat_batch(&parts)?;
            let rows = x.dim(0);
            let (f, c) = runner.forward(&self.backbone, store, x, training, comm)?;
            groups.push((rows, c));
            feats.push(f);
            start = end;
        }
        let f = if feats.len() == 1 {
            feats.pop().expect("one group")
        } else {
            Tensor::cat_batch(&feats.iter().collect::<Vec<_>>())?
        };
        let (out, head) = self
            .head
            .forward_with(store, &f, lab_rows, training, comm)?;
        Ok((out, SuaveCache { groups, head }))
    }

    /// Backward from the gradients of the scores (and embedding / online logits): the head once,
    /// then the feature gradient split by group and each backbone pass's backward. Every
    /// parameter gradient is accumulated into the store.
    pub fn backward(
        &self,
        store: &mut ParamStore,
        cache: SuaveCache,
        grads: SuaveGrads<'_>,
    ) -> Result<()> {
        self.backward_with(store, cache, grads, &SingleProcess)
    }

    /// Backward of [`SuaveNet::forward_with`] (the same communicator).
    pub fn backward_with(
        &self,
        store: &mut ParamStore,
        cache: SuaveCache,
        grads: SuaveGrads<'_>,
        comm: &dyn Communicator,
    ) -> Result<()> {
        self.backward_hooked(store, cache, grads, comm, &mut NoGradSink)
    }

    /// [`SuaveNet::backward_with`] that reports finished gradients to `ready`: the head's layer
    /// by layer, then the backbone's block by block during its LAST pass (the groups run in
    /// reverse, so that is the first group's: the labelled rows and the global views, the
    /// largest pass), when no later pass adds to them. Every trainable parameter is reported
    /// exactly once when the forward produced online logits and `grads.online` is given.
    pub fn backward_hooked(
        &self,
        store: &mut ParamStore,
        cache: SuaveCache,
        grads: SuaveGrads<'_>,
        comm: &dyn Communicator,
        ready: &mut dyn GradReady,
    ) -> Result<()> {
        self.backward_on(store, cache, grads, comm, ready, &mut CpuBackbone)
    }

    /// [`SuaveNet::backward_hooked`] with the backbone passes run by `runner` (the one that ran
    /// the forward).
    pub fn backward_on(
        &self,
        store: &mut ParamStore,
        cache: SuaveCache,
        grads: SuaveGrads<'_>,
        comm: &dyn Communicator,
        ready: &mut dyn GradReady,
        runner: &mut dyn BackboneRun,
    ) -> Result<()> {
        let df = self
            .head
            .backward_hooked(store, cache.head, grads, comm, ready)?;
        let rows: Vec<usize> = cache.groups.iter().map(|(n, _)| *n).collect();
        let parts = df.split_batch(&rows)?;
        for (i, ((_, c), d)) in cache.groups.into_iter().zip(parts).enumerate().rev() {
            let hook = if i == 0 { Some(&mut *ready) } else { None };
            runner.backward(&self.backbone, store, c, &d, comm, hook)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_head() -> SuaveHeadConfig {
        SuaveHeadConfig {
            in_dim: 0,
            hidden: 32,
            out_dim: 8,
            n_prototypes: 10,
            n_classes: 7,
            online_heads: true,
        }
    }

    #[test]
    fn head_names_in_official_order() {
        let mut s = ParamStore::new();
        SuaveHead::new(&mut s, SuaveHeadConfig::default(), 0);
        let names: Vec<&str> = s.entries().iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "projection_head.0.0.weight",
                "projection_head.0.0.bias",
                "projection_head.0.1.weight",
                "projection_head.0.1.bias",
                "projection_head.0.1.running_mean",
                "projection_head.0.1.running_var",
                "projection_head.0.1.num_batches_tracked",
                "projection_head.1.weight",
                "projection_head.1.bias",
                "cls_heads.0.weight",
                "cls_heads.0.bias",
                "cls_heads.1.weight",
                "cls_heads.1.bias",
                "cls_heads.2.weight",
                "cls_heads.2.bias",
                "prototypes.weight",
            ]
        );
        let p = s.value(s.id("prototypes.weight").unwrap());
        assert_eq!(p.shape(), &[1000, 128]);
    }

    #[test]
    fn prototypes_become_unit_rows() {
        let mut s = ParamStore::new();
        let h = SuaveHead::new(&mut s, tiny_head(), 0);
        crate::nn::init::reference_fill(&mut s, 2);
        h.normalize_prototypes(&mut s).unwrap();
        for row in s.value(h.prototypes.weight).data().chunks(8) {
            let n: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((n - 1.0).abs() < 1e-6, "{n}");
        }
    }

    /// Online heads are detached: their logits' gradients train only them; the scores'
    /// gradient reaches the backbone. Groups: two resolutions → two backbone passes.
    #[test]
    fn multicrop_groups_and_detached_heads() {
        let mut s = ParamStore::new();
        let net = SuaveNet::new(&mut s, ResNetConfig::tiny(), tiny_head(), 0).unwrap();
        let x =
            |name: &str, n: usize, px: usize| Tensor::randn_named(0, name, &[n, px, px, 3], 1.0);
        let inputs = [
            x("lab", 2, 32),
            x("g", 3, 32),
            x("l1", 2, 16),
            x("l2", 2, 16),
        ];
        let (out, cache) = net.forward(&mut s, &inputs, true).unwrap();
        assert_eq!(cache.group_rows(), vec![5, 4]);
        assert_eq!(out.scores.shape(), &[9, 10]);
        assert_eq!(out.embedding.shape(), &[9, 8]);
        let logits = out.online_logits.as_ref().unwrap();
        assert_eq!(logits[0].shape(), &[2, 7]);
        let zero = Tensor::zeros(&[9, 10]);
        let dl = Tensor::randn_named(0, "dl", &[2, 7], 1.0);
        net.backward(
            &mut s,
            cache,
            SuaveGrads {
                scores: &zero,
                embedding: None,
                online: Some([&dl, &dl, &dl]),
            },
        )
        .unwrap();
        for e in s.entries() {
            if e.grad.numel() == 0 {
                continue;
            }
            let nz = e.grad.data().iter().any(|v| *v != 0.0);
            assert_eq!(nz, e.name.starts_with("cls_heads"), "{}", e.name);
        }
        // two passes: backbone BN statistics updated twice, the head's once
        let nbt = |n: &str| s.value(s.id(n).unwrap()).data()[0];
        assert_eq!(nbt("layer4.0.bn3.num_batches_tracked"), 2.0);
        assert_eq!(nbt("projection_head.0.1.num_batches_tracked"), 1.0);
        assert!(net.forward(&mut s, &[], true).is_err());
    }
}
