//! The pre-norm transformer block of timm's / DINO's ViT, with timm's parameter names:
//!
//! ```text
//! x ─┬─ norm1 ─ attn.qkv ─ attention ─ attn.proj ─ drop path ─(+)─┬─ norm2 ─ mlp.fc1 ─ GELU ─ mlp.fc2 ─ drop path ─(+)─ y
//!    └────────────────────────────────────────────────────────────┘└────────────────────────────────────────────────┘
//! ```
//!
//! Keys: `{p}.norm1.{weight,bias}`, `{p}.attn.qkv.{weight,bias}`, `{p}.attn.proj.{weight,bias}`,
//! `{p}.norm2.*`, `{p}.mlp.fc1.*`, `{p}.mlp.fc2.*` (DINO's `Block` has the same names; timm's
//! extra `ls1`/`ls2`/`q_norm`/`k_norm` are identities without parameters for ViT-S).
//!
//! The block calls the backend's linear ops directly rather than [`Linear::forward`], because a
//! block's cache already holds every linear's input (norm outputs, the attention output, the
//! GELU output): going through `Linear::forward` would copy each of them once more per pass.
//! Drop path (stochastic depth) draws one mask per residual branch and pass from the caller's
//! generator, attention branch first, so runs are reproducible and the PyTorch reference can
//! replay the masks.

use super::init::trunc_normal;
use super::layernorm::{LayerNorm, LayerNormCache};
use super::linear::Linear;
use super::{ParamId, ParamStore};
use crate::backend::cpu::attention::{attention_backward, attention_forward, AttentionCtx};
use crate::backend::cpu::elementwise::{
    add_assign, drop_path_backward, drop_path_forward, drop_path_mask, gelu_backward, gelu_forward,
};
use crate::backend::cpu::linear::{linear_backward, linear_forward, LinearNeeds};
use crate::error::Result;
use crate::rng::Rng;
use crate::tensor::Tensor;

/// Joins a parameter prefix and a name (`""` + `x` = `x`).
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Registers a `Linear` with the ViT / DINO-head init (`_init_weights` of DINO and timm):
/// weight trunc-normal(0.02) drawn by (seed, name), bias zero.
pub fn linear_trunc_normal(
    store: &mut ParamStore,
    prefix: &str,
    in_features: usize,
    out_features: usize,
    bias: bool,
    seed: u64,
) -> Linear {
    let wn = format!("{prefix}.weight");
    let weight = store.param(
        &wn,
        trunc_normal(seed, &wn, &[out_features, in_features], 0.02),
    );
    let bias = bias.then(|| store.param(&format!("{prefix}.bias"), Tensor::zeros(&[out_features])));
    Linear {
        weight,
        bias,
        in_features,
        out_features,
    }
}

/// `y = x·Wᵀ + b` for a registered [`Linear`], without a cache.
pub fn linear_apply(store: &ParamStore, l: &Linear, x: &Tensor<f32>) -> Result<Tensor<f32>> {
    linear_forward(x, store.value(l.weight), l.bias.map(|b| store.value(b)))
}

/// Backward of [`linear_apply`] given its input `x`: accumulates dW (and db), returns dx when
/// `need_dx`.
pub fn linear_grad(
    store: &mut ParamStore,
    l: &Linear,
    x: &Tensor<f32>,
    dy: &Tensor<f32>,
    need_dx: bool,
) -> Result<Option<Tensor<f32>>> {
    let g = linear_backward(
        dy,
        x,
        store.value(l.weight),
        LinearNeeds {
            dx: need_dx,
            db: l.bias.is_some(),
        },
    )?;
    store.accumulate_grad(l.weight, &g.dw)?;
    if let (Some(b), Some(db)) = (l.bias, g.db.as_ref()) {
        store.accumulate_grad(b, db)?;
    }
    Ok(g.dx)
}

/// One pre-norm transformer block (timm `Block` / DINO `Block`).
#[derive(Clone, Debug)]
pub struct Block {
    pub norm1: LayerNorm,
    pub qkv: Linear,
    pub proj: Linear,
    pub norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    pub heads: usize,
    /// Stochastic-depth probability of both residual branches of this block.
    pub drop_path: f64,
}

/// What [`Block::backward`] needs from [`Block::forward`].
#[derive(Debug)]
pub struct BlockCache {
    ln1: LayerNormCache,
    h1: Tensor<f32>,
    qkv: Tensor<f32>,
    attn: AttentionCtx<f32>,
    a: Tensor<f32>,
    mask1: Option<Vec<bool>>,
    ln2: LayerNormCache,
    h2: Tensor<f32>,
    f: Tensor<f32>,
    g: Tensor<f32>,
    mask2: Option<Vec<bool>>,
}

impl Block {
    /// Registers the block's parameters under `prefix` (e.g. `blocks.3`) in timm's order:
    /// norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2. Linear weights trunc-normal(0.02),
    /// biases 0, LayerNorm 1/0 (DINO's init).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        dim: usize,
        heads: usize,
        hidden: usize,
        eps: f64,
        drop_path: f64,
        seed: u64,
    ) -> Self {
        let p = |n: &str| join(prefix, n);
        let norm1 = LayerNorm::new(store, &p("norm1"), dim, eps);
        let qkv = linear_trunc_normal(store, &p("attn.qkv"), dim, 3 * dim, true, seed);
        let proj = linear_trunc_normal(store, &p("attn.proj"), dim, dim, true, seed);
        let norm2 = LayerNorm::new(store, &p("norm2"), dim, eps);
        let fc1 = linear_trunc_normal(store, &p("mlp.fc1"), dim, hidden, true, seed);
        let fc2 = linear_trunc_normal(store, &p("mlp.fc2"), hidden, dim, true, seed);
        Block {
            norm1,
            qkv,
            proj,
            norm2,
            fc1,
            fc2,
            heads,
            drop_path,
        }
    }

    /// Ids of every parameter of the block, in registration order.
    pub fn params(&self) -> Vec<ParamId> {
        let lin = |l: &Linear| [Some(l.weight), l.bias];
        [self.norm1.weight, self.norm1.bias]
            .into_iter()
            .chain(lin(&self.qkv).into_iter().flatten())
            .chain(lin(&self.proj).into_iter().flatten())
            .chain([self.norm2.weight, self.norm2.bias])
            .chain(lin(&self.fc1).into_iter().flatten())
            .chain(lin(&self.fc2).into_iter().flatten())
            .collect()
    }

    /// A drop-path mask for this pass when training with a non-zero rate (DINO's block holds an
    /// identity instead of `DropPath` when the rate is 0: nothing is drawn then).
    fn mask(&self, rng: Option<&mut Rng>, batch: usize) -> Option<Vec<bool>> {
        match rng {
            Some(r) if self.drop_path > 0.0 => Some(drop_path_mask(r, batch, self.drop_path)),
            _ => None,
        }
    }

    fn drop(&self, x: Tensor<f32>, mask: Option<&Vec<bool>>) -> Result<Tensor<f32>> {
        match mask {
            Some(m) => drop_path_forward(&x, m, self.drop_path, true),
            None => Ok(x),
        }
    }

    /// Training forward over tokens `x: [B, N, dim]`. `train = Some(rng)` applies drop path with
    /// masks drawn from `rng` (attention branch, then MLP branch); `None` is the eval forward
    /// with caches (no drop path).
    pub fn forward(
        &self,
        store: &ParamStore,
        x: Tensor<f32>,
        mut train: Option<&mut Rng>,
    ) -> Result<(Tensor<f32>, BlockCache)> {
        let batch = x.dim(0);
        let (h1, ln1) = self.norm1.forward(store, x)?;
        let qkv = linear_apply(store, &self.qkv, &h1)?;
        let (a, attn) = attention_forward(&qkv, self.heads)?;
        let mask1 = self.mask(train.as_deref_mut(), batch);
        let mut y1 = self.drop(linear_apply(store, &self.proj, &a)?, mask1.as_ref())?;
        // y1 = x + branch: accumulated into the branch's buffer (no new allocation).
        add_assign(&mut y1, ln1.input())?;
        let (h2, ln2) = self.norm2.forward(store, y1)?;
        let f = linear_apply(store, &self.fc1, &h2)?;
        let g = gelu_forward(&f)?;
        let mask2 = self.mask(train, batch);
        let mut y2 = self.drop(linear_apply(store, &self.fc2, &g)?, mask2.as_ref())?;
        add_assign(&mut y2, ln2.input())?;
        Ok((
            y2,
            BlockCache {
                ln1,
                h1,
                qkv,
                attn,
                a,
                mask1,
                ln2,
                h2,
                f,
                g,
                mask2,
            },
        ))
    }

    /// Eval forward without caches (no drop path): the DINO teacher's pass.
    pub fn infer(&self, store: &ParamStore, x: Tensor<f32>) -> Result<Tensor<f32>> {
        let h1 = self.norm1.infer(store, &x)?;
        let qkv = linear_apply(store, &self.qkv, &h1)?;
        drop(h1);
        let (a, _) = attention_forward(&qkv, self.heads)?;
        drop(qkv);
        let mut y1 = linear_apply(store, &self.proj, &a)?;
        add_assign(&mut y1, &x)?;
        drop(x);
        let h2 = self.norm2.infer(store, &y1)?;
        let g = gelu_forward(&linear_apply(store, &self.fc1, &h2)?)?;
        let mut y2 = linear_apply(store, &self.fc2, &g)?;
        add_assign(&mut y2, &y1)?;
        Ok(y2)
    }

    fn drop_grad<'a>(
        &self,
        dy: &'a Tensor<f32>,
        mask: Option<&Vec<bool>>,
    ) -> Result<std::borrow::Cow<'a, Tensor<f32>>> {
        Ok(match mask {
            Some(m) => std::borrow::Cow::Owned(drop_path_backward(dy, m, self.drop_path, true)?),
            None => std::borrow::Cow::Borrowed(dy),
        })
    }

    /// Backward: accumulates every parameter gradient of the block, returns dx `[B, N, dim]`.
    pub fn backward(
        &self,
        store: &mut ParamStore,
        c: BlockCache,
        dy: Tensor<f32>,
    ) -> Result<Tensor<f32>> {
        // MLP branch.
        let d2 = self.drop_grad(&dy, c.mask2.as_ref())?;
        let dg = linear_grad(store, &self.fc2, &c.g, &d2, true)?.expect("dx requested");
        drop(d2);
        let df = gelu_backward(&dg, &c.f)?;
        drop(dg);
        let dh2 = linear_grad(store, &self.fc1, &c.h2, &df, true)?.expect("dx requested");
        drop(df);
        let mut dy1 = dy;
        add_assign(&mut dy1, &self.norm2.backward(store, c.ln2, &dh2)?)?;
        // Attention branch.
        let d1 = self.drop_grad(&dy1, c.mask1.as_ref())?;
        let da = linear_grad(store, &self.proj, &c.a, &d1, true)?.expect("dx requested");
        drop(d1);
        let dqkv = attention_backward(&da, &c.qkv, &c.attn)?;
        drop(da);
        let dh1 = linear_grad(store, &self.qkv, &c.h1, &dqkv, true)?.expect("dx requested");
        drop(dqkv);
        add_assign(&mut dy1, &self.norm1.backward(store, c.ln1, &dh1)?)?;
        Ok(dy1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(store: &mut ParamStore, dp: f64) -> Block {
        let b = Block::new(store, "blocks.0", 8, 2, 16, 1e-6, dp, 0);
        crate::nn::init::reference_fill(store, 1);
        b
    }

    #[test]
    fn names_follow_timm() {
        let mut s = ParamStore::new();
        let b = block(&mut s, 0.0);
        let names: Vec<&str> = s.entries().iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "blocks.0.norm1.weight",
                "blocks.0.norm1.bias",
                "blocks.0.attn.qkv.weight",
                "blocks.0.attn.qkv.bias",
                "blocks.0.attn.proj.weight",
                "blocks.0.attn.proj.bias",
                "blocks.0.norm2.weight",
                "blocks.0.norm2.bias",
                "blocks.0.mlp.fc1.weight",
                "blocks.0.mlp.fc1.bias",
                "blocks.0.mlp.fc2.weight",
                "blocks.0.mlp.fc2.bias",
            ]
        );
        assert_eq!(b.params().len(), 12);
    }

    /// Directional derivative of the loss Σ y·r against central differences (f32, so a loose
    /// tolerance: the op-level f64 checks live with the backend ops; this checks the wiring).
    #[test]
    fn backward_matches_finite_differences_with_drop_path() {
        let mut s = ParamStore::new();
        let b = block(&mut s, 0.5);
        let x = Tensor::randn_named(0, "x", &[4, 5, 8], 1.0);
        let r = Tensor::randn_named(0, "r", &[4, 5, 8], 1.0);
        let loss = |s: &ParamStore, x: &Tensor<f32>| -> f64 {
            let mut rng = Rng::named(7, "dp");
            let (y, _) = b.forward(s, x.clone(), Some(&mut rng)).unwrap();
            y.data()
                .iter()
                .zip(r.data())
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum()
        };
        let mut rng = Rng::named(7, "dp");
        let (_, c) = b.forward(&s, x.clone(), Some(&mut rng)).unwrap();
        assert!(c.mask1.is_some() && c.mask2.is_some());
        let dx = b.backward(&mut s, c, r.clone()).unwrap();
        let dir = Tensor::randn_named(0, "dir", &[4, 5, 8], 1.0);
        let eps = 1e-2f32;
        let shifted = |k: f32| {
            let mut v = x.clone();
            for (a, d) in v.data_mut().iter_mut().zip(dir.data()) {
                *a += k * d;
            }
            v
        };
        let fd = (loss(&s, &shifted(eps)) - loss(&s, &shifted(-eps))) / (2.0 * eps as f64);
        let an: f64 = dx
            .data()
            .iter()
            .zip(dir.data())
            .map(|(a, b)| (*a as f64) * (*b as f64))
            .sum();
        assert!((fd - an).abs() <= 2e-3 * an.abs().max(1.0), "{fd} vs {an}");
        // same for the fc1 weight
        let w = b.fc1.weight;
        let gw = s.grad(w).clone();
        let dw = Tensor::randn_named(0, "dw", s.value(w).shape(), 1.0);
        let mut sp = s.clone();
        let mut sm = s.clone();
        for ((p, m), d) in sp
            .value_mut(w)
            .data_mut()
            .iter_mut()
            .zip(sm.value_mut(w).data_mut().iter_mut())
            .zip(dw.data())
        {
            *p += eps * d;
            *m -= eps * d;
        }
        let fd = (loss(&sp, &x) - loss(&sm, &x)) / (2.0 * eps as f64);
        let an: f64 = gw
            .data()
            .iter()
            .zip(dw.data())
            .map(|(a, b)| (*a as f64) * (*b as f64))
            .sum();
        assert!((fd - an).abs() <= 2e-3 * an.abs().max(1.0), "{fd} vs {an}");
    }

    #[test]
    fn eval_forward_matches_cached_forward() {
        let mut s = ParamStore::new();
        let b = block(&mut s, 0.3);
        let x = Tensor::randn_named(0, "x", &[3, 5, 8], 1.0);
        let (y, c) = b.forward(&s, x.clone(), None).unwrap();
        assert!(c.mask1.is_none());
        assert_eq!(y, b.infer(&s, x).unwrap());
    }
}
