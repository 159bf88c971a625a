//! `LayerNorm` layer over the last dimension (PyTorch's `nn.LayerNorm(dim, eps)`, names
//! `{prefix}.weight`, `{prefix}.bias`).
//!
//! timm's and DINO's ViTs build it with eps = 1e-6 (PyTorch's default is 1e-5), so eps is an
//! explicit argument. Follows the [`Linear`](super::linear::Linear) pattern: ids into the store,
//! a forward returning a cache, a backward accumulating dγ, dβ.

use super::{ParamId, ParamStore};
use crate::backend::cpu::norm::{layer_norm_backward, layer_norm_forward, LayerNormCtx};
use crate::error::Result;
use crate::tensor::Tensor;

/// `y = (x − mean)/√(var + eps)·γ + β` over the last dimension `dim`.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: ParamId,
    pub bias: ParamId,
    pub dim: usize,
    pub eps: f64,
}

/// What [`LayerNorm::backward`] needs: the input and the row statistics.
#[derive(Clone, Debug)]
pub struct LayerNormCache {
    x: Tensor<f32>,
    ctx: LayerNormCtx<f32>,
}

impl LayerNormCache {
    /// The forward's input (a residual block adds it to its branch without keeping a copy).
    pub fn input(&self) -> &Tensor<f32> {
        &self.x
    }
}

impl LayerNorm {
    /// Registers `{prefix}.weight` (ones) and `{prefix}.bias` (zeros): the init of PyTorch, timm
    /// and DINO alike.
    pub fn new(store: &mut ParamStore, prefix: &str, dim: usize, eps: f64) -> Self {
        let weight = store.param(&format!("{prefix}.weight"), Tensor::full(&[dim], 1.0));
        let bias = store.param(&format!("{prefix}.bias"), Tensor::zeros(&[dim]));
        LayerNorm {
            weight,
            bias,
            dim,
            eps,
        }
    }

    /// Forward without a cache (inference, the DINO teacher).
    pub fn infer(&self, store: &ParamStore, x: &Tensor<f32>) -> Result<Tensor<f32>> {
        Ok(layer_norm_forward(
            x,
            store.value(self.weight),
            store.value(self.bias),
            self.eps,
        )?
        .0)
    }

    /// Forward over `x: [..., dim]`; the cache keeps `x` (moved in: the caller gives it up, so no
    /// copy is made).
    pub fn forward(
        &self,
        store: &ParamStore,
        x: Tensor<f32>,
    ) -> Result<(Tensor<f32>, LayerNormCache)> {
        let (y, ctx) = layer_norm_forward(
            &x,
            store.value(self.weight),
            store.value(self.bias),
            self.eps,
        )?;
        Ok((y, LayerNormCache { x, ctx }))
    }

    /// Backward: accumulates dγ, dβ into the store and returns dx.
    pub fn backward(
        &self,
        store: &mut ParamStore,
        cache: LayerNormCache,
        dy: &Tensor<f32>,
    ) -> Result<Tensor<f32>> {
        let g = layer_norm_backward(dy, &cache.x, store.value(self.weight), &cache.ctx)?;
        store.accumulate_grad(self.weight, &g.dgamma)?;
        store.accumulate_grad(self.bias, &g.dbeta)?;
        Ok(g.dx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_and_gradients_accumulate_over_passes() {
        let mut s = ParamStore::new();
        let ln = LayerNorm::new(&mut s, "norm", 8, 1e-6);
        assert_eq!(s.value(ln.weight).data(), &[1.0; 8]);
        assert_eq!(s.value(ln.bias).data(), &[0.0; 8]);
        let x = Tensor::randn_named(0, "x", &[3, 8], 1.0);
        let dy = Tensor::randn_named(0, "dy", &[3, 8], 1.0);
        let (y, c) = ln.forward(&s, x.clone()).unwrap();
        assert_eq!(y, ln.infer(&s, &x).unwrap());
        let (_, c2) = ln.forward(&s, x).unwrap();
        ln.backward(&mut s, c, &dy).unwrap();
        let once = s.grad(ln.bias).clone();
        ln.backward(&mut s, c2, &dy).unwrap();
        for (a, b) in s.grad(ln.bias).data().iter().zip(once.data()) {
            assert!((a - 2.0 * b).abs() < 1e-6);
        }
    }
}
