//! `Linear` layer: the pattern every layer of `nn` follows.
//!
//! A layer holds [`ParamId`]s into the model's [`ParamStore`] and no tensors. `forward` takes the
//! store by shared reference and returns the output plus a cache of what the backward needs
//! (here the input); `backward` consumes the cache, adds the parameter gradients into the
//! store's accumulators and returns the input gradient. A layer can run several times in one step
//! (one pass per crop resolution): each pass has its own cache, gradients add up.

use super::init::linear_default;
use super::{ParamId, ParamStore};
use crate::backend::cpu::linear::{linear_backward, linear_forward, LinearNeeds};
use crate::error::Result;
use crate::tensor::Tensor;

/// `y = x·Wᵀ + b` over the last dimension, `W: [out, in]` (PyTorch layout and names).
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: ParamId,
    pub bias: Option<ParamId>,
    pub in_features: usize,
    pub out_features: usize,
}

/// What [`Linear::backward`] needs from the forward.
#[derive(Clone, Debug)]
pub struct LinearCache {
    x: Tensor<f32>,
}

impl Linear {
    /// Registers `{prefix}.weight` (and `{prefix}.bias`) with PyTorch's default init,
    /// drawn by (seed, name).
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        in_features: usize,
        out_features: usize,
        bias: bool,
        seed: u64,
    ) -> Self {
        let wn = format!("{prefix}.weight");
        let weight = store.param(
            &wn,
            linear_default(seed, &wn, &[out_features, in_features], in_features),
        );
        let bias = bias.then(|| {
            let bn = format!("{prefix}.bias");
            store.param(&bn, linear_default(seed, &bn, &[out_features], in_features))
        });
        Linear {
            weight,
            bias,
            in_features,
            out_features,
        }
    }

    /// Forward over `x: [..., in]`.
    pub fn forward(
        &self,
        store: &ParamStore,
        x: &Tensor<f32>,
    ) -> Result<(Tensor<f32>, LinearCache)> {
        let y = linear_forward(
            x,
            store.value(self.weight),
            self.bias.map(|b| store.value(b)),
        )?;
        Ok((y, LinearCache { x: x.clone() }))
    }

    /// Backward: accumulates dW (and db) into the store; returns dx when `need_dx`.
    pub fn backward(
        &self,
        store: &mut ParamStore,
        cache: LinearCache,
        dy: &Tensor<f32>,
        need_dx: bool,
    ) -> Result<Option<Tensor<f32>>> {
        let g = linear_backward(
            dy,
            &cache.x,
            store.value(self.weight),
            LinearNeeds {
                dx: need_dx,
                db: self.bias.is_some(),
            },
        )?;
        store.accumulate_grad(self.weight, &g.dw)?;
        if let (Some(b), Some(db)) = (self.bias, g.db.as_ref()) {
            store.accumulate_grad(b, db)?;
        }
        Ok(g.dx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_passes_accumulate_weight_gradients() {
        let mut s = ParamStore::new();
        let l = Linear::new(&mut s, "fc", 3, 2, true, 0);
        let x1 = Tensor::randn_named(0, "x1", &[4, 3], 1.0);
        let x2 = Tensor::randn_named(0, "x2", &[5, 3], 1.0);
        let dy1 = Tensor::randn_named(0, "d1", &[4, 2], 1.0);
        let dy2 = Tensor::randn_named(0, "d2", &[5, 2], 1.0);
        let (_, c1) = l.forward(&s, &x1).unwrap();
        let (_, c2) = l.forward(&s, &x2).unwrap();
        l.backward(&mut s, c1, &dy1, false).unwrap();
        let dx = l.backward(&mut s, c2, &dy2, true).unwrap();
        assert_eq!(dx.unwrap().shape(), &[5, 3]);
        // the same as one pass over the concatenated batch
        let mut s2 = ParamStore::new();
        let l2 = Linear::new(&mut s2, "fc", 3, 2, true, 0);
        let x = Tensor::cat_batch(&[&x1, &x2]).unwrap();
        let dy = Tensor::cat_batch(&[&dy1, &dy2]).unwrap();
        let (_, c) = l2.forward(&s2, &x).unwrap();
        l2.backward(&mut s2, c, &dy, false).unwrap();
        for id in [l.weight, l.bias.unwrap()] {
            let e = crate::testing::rel_l2(s.grad(id).data(), s2.grad(id).data());
            assert!(e < 1e-6, "{e}");
        }
        assert!(s.grad(l.weight).data().iter().any(|v| *v != 0.0));
    }
}
