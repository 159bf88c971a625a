//! The Daino head (DINO's `DINOHead` with `use_bn=False`) and DINO's `MultiCropWrapper`
//! (backbone once per run of equal-resolution crops, head once over all CLS features).
//!
//! Head, as `vision_transformer.py::DINOHead` (spec §2.2), keys under the given prefix:
//!
//! ```text
//! mlp.0 Linear(in → hidden) → GELU → mlp.2 Linear(hidden → hidden) → GELU → mlp.4 Linear(hidden → bottleneck)
//! → L2 normalise → last_layer: weight-normalised Linear(bottleneck → out_dim, no bias)
//! ```
//!
//! (`nlayers` Linears; `nlayers = 1` is a single Linear called `mlp`.) Init: the MLP weights
//! trunc-normal(0.02), biases 0; `last_layer.weight_v` keeps PyTorch's default Linear init
//! (DINO builds it after `apply(_init_weights)`), `last_layer.weight_g` is filled with 1 and is
//! frozen when `norm_last_layer` (DINO's default, Daino's teacher) and trainable otherwise (the
//! Daino student: `--norm_last_layer false`). The engine stores `weight_g` as `[out]`; PyTorch's
//! `[out, 1]` is the same data.
//!
//! Overlap: the `backward_hooked` forms report finished gradients to a [`GradReady`] hook (the
//! head's layer by layer, the backbone's in its last pass), so that the gradient all-reduce
//! runs while the backward goes on (`dist::overlap`).

use crate::backend::cpu::elementwise::{gelu_backward, gelu_forward};
use crate::backend::cpu::linear::{
    weight_norm_linear_backward, weight_norm_linear_forward, WeightNormCtx, WeightNormNeeds,
};
use crate::backend::cpu::norm::{l2_normalize_backward, l2_normalize_forward, L2NormalizeCtx};
use crate::dist::overlap::{GradReady, NoGradSink};
use crate::error::{Error, Result};
use crate::models::vit::{Vit, VitCache, VitConfig};
use crate::nn::init::linear_default;
use crate::nn::linear::Linear;
use crate::nn::vit_block::{join, linear_apply, linear_grad, linear_trunc_normal};
use crate::nn::{Kind, ParamId, ParamStore};
use crate::rng::Rng;
use crate::tensor::Tensor;

/// Sizes of a DINO head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DinoHeadConfig {
    /// Input width (the backbone's feature width, 384 for ViT-S).
    pub in_dim: usize,
    /// Number of prototypes K (DINO 65536, Daino 1000 = the number of classes).
    pub out_dim: usize,
    /// Hidden width of the MLP (2048).
    pub hidden_dim: usize,
    /// Width of the L2-normalised bottleneck (256).
    pub bottleneck_dim: usize,
    /// Number of Linears in the MLP (3), at least 1.
    pub nlayers: usize,
    /// Freeze `last_layer.weight_g` (DINO's default and the Daino teacher); false for the Daino
    /// student.
    pub norm_last_layer: bool,
}

impl DinoHeadConfig {
    /// The Daino student head: 3 layers, 2048 hidden, 256 bottleneck, 1000 prototypes,
    /// trainable `weight_g` (`--norm_last_layer false`).
    pub fn daino(in_dim: usize) -> Self {
        DinoHeadConfig {
            in_dim,
            out_dim: 1000,
            hidden_dim: 2048,
            bottleneck_dim: 256,
            nlayers: 3,
            norm_last_layer: false,
        }
    }
}

/// DINO's projection head with weight-normalised prototypes.
#[derive(Clone, Debug)]
pub struct DinoHead {
    pub cfg: DinoHeadConfig,
    /// The MLP's Linears, in order (`mlp.0`, `mlp.2`, `mlp.4` for 3 layers).
    pub mlp: Vec<Linear>,
    /// `last_layer.weight_g`, `[out_dim]`.
    pub weight_g: ParamId,
    /// `last_layer.weight_v`, `[out_dim, bottleneck_dim]`.
    pub weight_v: ParamId,
}

/// What [`DinoHead::backward`] needs from [`DinoHead::forward`].
#[derive(Debug)]
pub struct DinoHeadCache {
    /// Input of each Linear of the MLP.
    inputs: Vec<Tensor<f32>>,
    /// Output of each Linear followed by a GELU (the GELU's input).
    pre_gelu: Vec<Tensor<f32>>,
    /// The bottleneck before normalisation and its statistics.
    z: Tensor<f32>,
    l2: L2NormalizeCtx<f32>,
    /// The normalised bottleneck (the weight-norm layer's input).
    u: Tensor<f32>,
    wn: WeightNormCtx<f32>,
}

impl DinoHead {
    /// Registers the head under `prefix` (DINO's `MultiCropWrapper` uses `head`), init drawn by
    /// (seed, name).
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        cfg: DinoHeadConfig,
        seed: u64,
    ) -> Result<Self> {
        if cfg.nlayers == 0
            || cfg.in_dim == 0
            || cfg.out_dim == 0
            || cfg.bottleneck_dim == 0
            || (cfg.nlayers > 1 && cfg.hidden_dim == 0)
        {
            return Err(Error::invalid(
                "DinoHead::new",
                format!("sizes must be positive: {cfg:?}"),
            ));
        }
        let p = |n: &str| join(prefix, n);
        let mlp = if cfg.nlayers == 1 {
            vec![linear_trunc_normal(
                store,
                &p("mlp"),
                cfg.in_dim,
                cfg.bottleneck_dim,
                true,
                seed,
            )]
        } else {
            (0..cfg.nlayers)
                .map(|i| {
                    let inp = if i == 0 { cfg.in_dim } else { cfg.hidden_dim };
                    let out = if i + 1 == cfg.nlayers {
                        cfg.bottleneck_dim
                    } else {
                        cfg.hidden_dim
                    };
                    // Sequential indices: each Linear but the last is followed by a GELU.
                    linear_trunc_normal(store, &p(&format!("mlp.{}", 2 * i)), inp, out, true, seed)
                })
                .collect()
        };
        let weight_g = store.param(&p("last_layer.weight_g"), Tensor::full(&[cfg.out_dim], 1.0));
        store.set_trainable(weight_g, !cfg.norm_last_layer);
        let vn = p("last_layer.weight_v");
        let weight_v = store.param(
            &vn,
            linear_default(
                seed,
                &vn,
                &[cfg.out_dim, cfg.bottleneck_dim],
                cfg.bottleneck_dim,
            ),
        );
        Ok(DinoHead {
            cfg,
            mlp,
            weight_g,
            weight_v,
        })
    }

    fn check(&self, x: &Tensor<f32>) -> Result<()> {
        x.expect_rank("DinoHead::forward", "x", 2)?;
        x.expect_shape("DinoHead::forward", "x", &[x.dim(0), self.cfg.in_dim])
    }

    /// Forward over features `x [B, in_dim]` → logits `[B, out_dim]`.
    pub fn forward(
        &self,
        store: &ParamStore,
        x: &Tensor<f32>,
    ) -> Result<(Tensor<f32>, DinoHeadCache)> {
        self.check(x)?;
        let mut inputs = Vec::with_capacity(self.mlp.len());
        let mut pre_gelu = Vec::with_capacity(self.mlp.len());
        let mut h = x.clone();
        for (i, l) in self.mlp.iter().enumerate() {
            let y = linear_apply(store, l, &h)?;
            inputs.push(h);
            h = if i + 1 < self.mlp.len() {
                let a = gelu_forward(&y)?;
                pre_gelu.push(y);
                a
            } else {
                y
            };
        }
        let (u, l2) = l2_normalize_forward(&h)?;
        let (logits, wn) =
            weight_norm_linear_forward(&u, store.value(self.weight_v), store.value(self.weight_g))?;
        Ok((
            logits,
            DinoHeadCache {
                inputs,
                pre_gelu,
                z: h,
                l2,
                u,
                wn,
            },
        ))
    }

    /// Forward without a cache (the teacher): logits `[B, out_dim]`.
    pub fn infer(&self, store: &ParamStore, x: &Tensor<f32>) -> Result<Tensor<f32>> {
        self.check(x)?;
        let mut h = linear_apply(store, &self.mlp[0], x)?;
        for l in &self.mlp[1..] {
            h = linear_apply(store, l, &gelu_forward(&h)?)?;
        }
        let (u, _) = l2_normalize_forward(&h)?;
        Ok(
            weight_norm_linear_forward(&u, store.value(self.weight_v), store.value(self.weight_g))?
                .0,
        )
    }

    /// Backward from `dlogits [B, out_dim]`: accumulates the head's gradients (`weight_g` only
    /// when trainable) and returns the gradient of the input features.
    pub fn backward(
        &self,
        store: &mut ParamStore,
        cache: DinoHeadCache,
        dlogits: &Tensor<f32>,
    ) -> Result<Tensor<f32>> {
        self.backward_hooked(store, cache, dlogits, &mut NoGradSink)
    }

    /// [`DinoHead::backward`] that reports finished gradients to `ready`: the last layer's
    /// (`weight_v`, and `weight_g` when trainable), then each MLP Linear's, last first.
    pub fn backward_hooked(
        &self,
        store: &mut ParamStore,
        cache: DinoHeadCache,
        dlogits: &Tensor<f32>,
        ready: &mut dyn GradReady,
    ) -> Result<Tensor<f32>> {
        let DinoHeadCache {
            mut inputs,
            mut pre_gelu,
            z,
            l2,
            u,
            wn,
        } = cache;
        let g_trainable = store.entry(self.weight_g).kind == (Kind::Param { trainable: true });
        let gr = weight_norm_linear_backward(
            dlogits,
            &u,
            store.value(self.weight_v),
            store.value(self.weight_g),
            &wn,
            WeightNormNeeds {
                dx: true,
                dg: g_trainable,
            },
        )?;
        store.accumulate_grad(self.weight_v, &gr.dv)?;
        if let Some(dg) = gr.dg.as_ref() {
            store.accumulate_grad(self.weight_g, dg)?;
            ready.ready(store, &[self.weight_g])?;
        }
        ready.ready(store, &[self.weight_v])?;
        let du = gr.dx.expect("dx requested");
        let mut d = l2_normalize_backward(&du, &z, &l2)?;
        for (i, l) in self.mlp.iter().enumerate().rev() {
            if i + 1 < self.mlp.len() {
                let pre = pre_gelu
                    .pop()
                    .expect("one pre-GELU output per hidden layer");
                d = gelu_backward(&d, &pre)?;
            }
            let x = inputs.pop().expect("one input per layer");
            d = linear_grad(store, l, &x, &d, true)?.expect("dx requested");
            let ids: Vec<ParamId> = std::iter::once(l.weight).chain(l.bias).collect();
            ready.ready(store, &ids)?;
        }
        Ok(d)
    }
}

/// Output of a multi-crop pass.
#[derive(Clone, Debug)]
pub struct MultiCropOutput {
    /// CLS features of every crop, in crop order, `[Σ B_i, dim]`.
    pub features: Tensor<f32>,
    /// Head logits, `[Σ B_i, out_dim]`.
    pub logits: Tensor<f32>,
}

/// What [`MultiCropWrapper::backward`] needs: one backbone cache per resolution group.
#[derive(Debug)]
pub struct MultiCropCache {
    groups: Vec<(usize, VitCache)>,
    head: DinoHeadCache,
}

/// DINO's `MultiCropWrapper` around a ViT backbone and a DINO head; parameters `backbone.*` then
/// `head.*` (DINO's student / teacher state dict without DDP's `module.`).
#[derive(Clone, Debug)]
pub struct MultiCropWrapper {
    pub backbone: Vit,
    pub head: DinoHead,
}

/// Ranges of consecutive crops with the same (H, W), as DINO's
/// `unique_consecutive([inp.shape[-1] for inp in x])` (DINO compares the width only; crops of
/// one width but different heights would fail its `torch.cat`, and form separate groups here).
fn resolution_groups(crops: &[Tensor<f32>]) -> Result<Vec<std::ops::Range<usize>>> {
    let mut groups: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, c) in crops.iter().enumerate() {
        c.expect_rank("MultiCropWrapper", "crop", 4)?;
        let hw = (c.dim(1), c.dim(2));
        match groups.last_mut() {
            Some(g) if (crops[g.start].dim(1), crops[g.start].dim(2)) == hw => g.end = i + 1,
            _ => groups.push(i..i + 1),
        }
    }
    if groups.is_empty() {
        return Err(Error::invalid("MultiCropWrapper", "no crops"));
    }
    Ok(groups)
}

/// The crops of one group as one batch (no copy for a single crop).
fn group_batch(crops: &[Tensor<f32>]) -> Result<std::borrow::Cow<'_, Tensor<f32>>> {
    Ok(if crops.len() == 1 {
        std::borrow::Cow::Borrowed(&crops[0])
    } else {
        std::borrow::Cow::Owned(Tensor::cat_batch(&crops.iter().collect::<Vec<_>>())?)
    })
}

impl MultiCropWrapper {
    /// Registers `backbone.*` (a [`Vit`]) and `head.*` (a [`DinoHead`] on its features).
    pub fn new(
        store: &mut ParamStore,
        vit: VitConfig,
        head: DinoHeadConfig,
        seed: u64,
    ) -> Result<Self> {
        if head.in_dim != vit.dim {
            return Err(Error::invalid(
                "MultiCropWrapper::new",
                format!("head in_dim {} != backbone dim {}", head.in_dim, vit.dim),
            ));
        }
        let backbone = Vit::new(store, "backbone", vit, seed)?;
        let head = DinoHead::new(store, "head", head, seed)?;
        Ok(MultiCropWrapper { backbone, head })
    }

    /// Student forward over crops (each NHWC `[B_i, H_i, W_i, C]`): one backbone pass per run of
    /// consecutive equal-resolution crops (drop path masks drawn from `train`'s generator pass
    /// by pass; `None` = eval mode), features concatenated in crop order, head once.
    pub fn forward(
        &self,
        store: &ParamStore,
        crops: &[Tensor<f32>],
        mut train: Option<&mut Rng>,
    ) -> Result<(MultiCropOutput, MultiCropCache)> {
        let mut feats = Vec::new();
        let mut groups = Vec::new();
        for r in resolution_groups(crops)? {
            let x = group_batch(&crops[r])?;
            let (f, c) = self.backbone.forward(store, &x, train.as_deref_mut())?;
            groups.push((f.dim(0), c));
            feats.push(f);
        }
        let features = Tensor::cat_batch(&feats.iter().collect::<Vec<_>>())?;
        let (logits, head) = self.head.forward(store, &features)?;
        Ok((
            MultiCropOutput { features, logits },
            MultiCropCache { groups, head },
        ))
    }

    /// Teacher forward (eval, no caches, no gradients): the same grouping.
    pub fn infer(&self, store: &ParamStore, crops: &[Tensor<f32>]) -> Result<MultiCropOutput> {
        let mut feats = Vec::new();
        for r in resolution_groups(crops)? {
            let x = group_batch(&crops[r])?;
            feats.push(self.backbone.infer(store, &x)?);
        }
        let features = Tensor::cat_batch(&feats.iter().collect::<Vec<_>>())?;
        let logits = self.head.infer(store, &features)?;
        Ok(MultiCropOutput { features, logits })
    }

    /// Backward from `dlogits [Σ B_i, out_dim]` through the head and every backbone pass;
    /// parameter gradients of all passes add up in the store.
    pub fn backward(
        &self,
        store: &mut ParamStore,
        cache: MultiCropCache,
        dlogits: &Tensor<f32>,
    ) -> Result<()> {
        self.backward_hooked(store, cache, dlogits, &mut NoGradSink)
    }

    /// [`MultiCropWrapper::backward`] that reports finished gradients to `ready`: the head's
    /// layer by layer, then the backbone's block by block during its LAST pass (the groups run
    /// in crop order, so that is the last group's), when no later pass adds to them.
    pub fn backward_hooked(
        &self,
        store: &mut ParamStore,
        cache: MultiCropCache,
        dlogits: &Tensor<f32>,
        ready: &mut dyn GradReady,
    ) -> Result<()> {
        let dfeat = self
            .head
            .backward_hooked(store, cache.head, dlogits, ready)?;
        let sizes: Vec<usize> = cache.groups.iter().map(|(b, _)| *b).collect();
        let parts = dfeat.split_batch(&sizes)?;
        let last = cache.groups.len().saturating_sub(1);
        for (i, ((_, c), d)) in cache.groups.into_iter().zip(&parts).enumerate() {
            let hook = if i == last { Some(&mut *ready) } else { None };
            self.backbone.backward_hooked(store, c, d, hook)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::init::reference_fill;

    fn tiny_vit() -> VitConfig {
        VitConfig {
            patch: 4,
            dim: 8,
            depth: 2,
            heads: 2,
            mlp_ratio: 2.0,
            drop_path_rate: 0.0,
            img_size: 16,
            in_chans: 3,
            eps: 1e-6,
        }
    }

    fn tiny_head(norm_last_layer: bool) -> DinoHeadConfig {
        DinoHeadConfig {
            in_dim: 8,
            out_dim: 5,
            hidden_dim: 12,
            bottleneck_dim: 6,
            nlayers: 3,
            norm_last_layer,
        }
    }

    #[test]
    fn head_keys_and_init_follow_dino() {
        let mut s = ParamStore::new();
        let h = DinoHead::new(&mut s, "head", DinoHeadConfig::daino(384), 0).unwrap();
        let names: Vec<&str> = s.entries().iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "head.mlp.0.weight",
                "head.mlp.0.bias",
                "head.mlp.2.weight",
                "head.mlp.2.bias",
                "head.mlp.4.weight",
                "head.mlp.4.bias",
                "head.last_layer.weight_g",
                "head.last_layer.weight_v"
            ]
        );
        assert!(s.value(h.weight_g).data().iter().all(|&g| g == 1.0));
        assert_eq!(s.trainable().len(), 8);
        let mut t = ParamStore::new();
        let ht = DinoHead::new(
            &mut t,
            "",
            DinoHeadConfig {
                norm_last_layer: true,
                ..tiny_head(true)
            },
            0,
        )
        .unwrap();
        assert_eq!(t.trainable().len(), 7);
        assert_eq!(t.entry(ht.weight_g).name, "last_layer.weight_g");
        let mut one = ParamStore::new();
        DinoHead::new(
            &mut one,
            "",
            DinoHeadConfig {
                nlayers: 1,
                ..tiny_head(false)
            },
            0,
        )
        .unwrap();
        assert_eq!(one.entries()[0].name, "mlp.weight");
    }

    #[test]
    fn frozen_weight_g_gets_no_gradient() {
        let mut s = ParamStore::new();
        let h = DinoHead::new(&mut s, "head", tiny_head(true), 0).unwrap();
        reference_fill(&mut s, 1);
        let x = Tensor::randn_named(0, "x", &[3, 8], 1.0);
        let (y, c) = h.forward(&s, &x).unwrap();
        assert_eq!(y, h.infer(&s, &x).unwrap());
        let dx = h
            .backward(&mut s, c, &Tensor::randn_named(0, "d", &[3, 5], 1.0))
            .unwrap();
        assert_eq!(dx.shape(), &[3, 8]);
        assert!(s.grad(h.weight_g).data().iter().all(|&g| g == 0.0));
        assert!(s.grad(h.weight_v).data().iter().any(|&g| g != 0.0));
    }

    /// Consecutive crops of one resolution run as one backbone pass; the result equals running
    /// each group separately, and gradients equal the sum over the passes.
    #[test]
    fn multi_crop_groups_by_resolution() {
        let mut s = ParamStore::new();
        let m = MultiCropWrapper::new(&mut s, tiny_vit(), tiny_head(false), 0).unwrap();
        reference_fill(&mut s, 4);
        let a = Tensor::randn_named(0, "a", &[2, 16, 16, 3], 1.0);
        let b = Tensor::randn_named(0, "b", &[1, 16, 16, 3], 1.0);
        let c = Tensor::randn_named(0, "c", &[3, 8, 8, 3], 1.0);
        let crops = [a.clone(), b.clone(), c.clone()];
        assert_eq!(resolution_groups(&crops).unwrap(), vec![0..2, 2..3]);
        let (out, cache) = m.forward(&s, &crops, None).unwrap();
        assert_eq!(cache.groups.len(), 2);
        assert_eq!(out.logits.shape(), &[6, 5]);
        let inf = m.infer(&s, &crops).unwrap();
        assert_eq!(out.logits, inf.logits);
        let ab = Tensor::cat_batch(&[&a, &b]).unwrap();
        let f1 = m.backbone.infer(&s, &ab).unwrap();
        let f2 = m.backbone.infer(&s, &c).unwrap();
        assert_eq!(out.features, Tensor::cat_batch(&[&f1, &f2]).unwrap());
        // gradients: wrapper backward == head backward + two backbone backwards
        let dl = Tensor::randn_named(0, "dl", &[6, 5], 1.0);
        let mut s1 = s.clone();
        m.backward(&mut s1, cache, &dl).unwrap();
        let mut s2 = s.clone();
        let (_, c1) = m.backbone.forward(&s2, &ab, None).unwrap();
        let (_, c2) = m.backbone.forward(&s2, &c, None).unwrap();
        let (_, ch) = m.head.forward(&s2, &out.features).unwrap();
        let df = m.head.backward(&mut s2, ch, &dl).unwrap();
        let parts = df.split_batch(&[3, 3]).unwrap();
        m.backbone.backward(&mut s2, c1, &parts[0]).unwrap();
        m.backbone.backward(&mut s2, c2, &parts[1]).unwrap();
        for (e1, e2) in s1.entries().iter().zip(s2.entries()) {
            assert_eq!(e1.grad, e2.grad, "{}", e1.name);
        }
        assert!(s1
            .grad(m.backbone.pos_embed)
            .data()
            .iter()
            .any(|&g| g != 0.0));
        assert!(m.forward(&s, &[], None).is_err());
    }
}
