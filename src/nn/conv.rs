//! `Conv2d` layer over NHWC activations, weights registered O×KH×KW×I ("KRSC").
//!
//! Follows the [`Linear`](super::linear::Linear) pattern (ids into the [`ParamStore`], forward
//! returns a cache, backward accumulates parameter gradients) with one difference: the input is
//! taken as an `Arc`. A ResNet's activations are large (batch 8 at 224 px: ~1 GB), and each one is
//! needed by the backward of the layer that consumed it and sometimes by a second layer (a block's
//! input feeds both `conv1` and the downsample). Sharing the tensor instead of cloning it keeps
//! every activation in memory exactly once and saves a copy per layer. An owned `Tensor` converts
//! into an `Arc` without a copy, so `conv.forward(&store, y)` works for a fresh output too.

use super::init::{kaiming_normal_fan_out, linear_default, oihw_to_krsc};
use super::{ParamId, ParamStore};
use crate::backend::cpu::conv::{conv2d_backward, conv2d_forward, Conv2dParams};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::sync::Arc;

/// A 2-D convolution `y = conv(x, W) + b`, `x [N, H, W, C_in]` → `y [N, OH, OW, C_out]`, square
/// kernel, the same stride and zero padding along H and W (all torchvision's ResNet needs).
#[derive(Clone, Debug)]
pub struct Conv2d {
    /// `{prefix}.weight`, stored `[out, k, k, in]` (PyTorch: `[out, in, k, k]`).
    pub weight: ParamId,
    /// `{prefix}.bias`, `[out]`, when the layer has one.
    pub bias: Option<ParamId>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub params: Conv2dParams,
}

/// What [`Conv2d::backward`] needs from the forward: the input, shared.
#[derive(Clone, Debug)]
pub struct Conv2dCache {
    x: Arc<Tensor<f32>>,
}

impl Conv2dCache {
    /// The forward's input (lets a caller reuse it, e.g. as a residual identity, without keeping
    /// its own reference).
    pub fn input(&self) -> &Arc<Tensor<f32>> {
        &self.x
    }
}

impl Conv2d {
    /// Registers `{prefix}.weight` (and `{prefix}.bias`) with torchvision's ResNet init:
    /// Kaiming-normal, fan-out, ReLU gain, drawn by (seed, name) in PyTorch's layout and stored
    /// KRSC. The bias (ResNet has none) gets PyTorch's default Conv2d bias init
    /// U(±1/√fan_in).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: &mut ParamStore,
        prefix: &str,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
        seed: u64,
    ) -> Self {
        let wn = format!("{prefix}.weight");
        let w = kaiming_normal_fan_out(seed, &wn, &[out_channels, in_channels, kernel, kernel]);
        let weight = store.conv_param(&wn, oihw_to_krsc(&w));
        let bias = bias.then(|| {
            let bn = format!("{prefix}.bias");
            let fan_in = in_channels * kernel * kernel;
            store.param(&bn, linear_default(seed, &bn, &[out_channels], fan_in))
        });
        Conv2d {
            weight,
            bias,
            in_channels,
            out_channels,
            kernel,
            params: Conv2dParams { stride, padding },
        }
    }

    /// Forward over `x [N, H, W, in_channels]`; the cache keeps `x` (shared, not copied).
    pub fn forward(
        &self,
        store: &ParamStore,
        x: impl Into<Arc<Tensor<f32>>>,
    ) -> Result<(Tensor<f32>, Conv2dCache)> {
        let x = x.into();
        if x.rank() != 4 || x.dim(3) != self.in_channels {
            return Err(Error::shape(
                "Conv2d::forward",
                format!(
                    "{}: input {:?}, expected NHWC [N, H, W, {}]",
                    store.entry(self.weight).name,
                    x.shape(),
                    self.in_channels
                ),
            ));
        }
        let y = conv2d_forward(
            &x,
            store.value(self.weight),
            self.bias.map(|b| store.value(b)),
            self.params,
        )?;
        Ok((y, Conv2dCache { x }))
    }

    /// Backward: accumulates dW (and db) into the store; returns dx when `need_dx` (a network's
    /// first layer skips it).
    pub fn backward(
        &self,
        store: &mut ParamStore,
        cache: Conv2dCache,
        dy: &Tensor<f32>,
        need_dx: bool,
    ) -> Result<Option<Tensor<f32>>> {
        let g = conv2d_backward(
            &cache.x,
            store.value(self.weight),
            dy,
            self.params,
            need_dx,
            self.bias.is_some(),
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
    use crate::nn::Layout;

    #[test]
    fn registers_krsc_weight_and_shapes() {
        let mut s = ParamStore::new();
        let c = Conv2d::new(&mut s, "conv1", 3, 8, 7, 2, 3, false, 0);
        let e = s.entry(c.weight);
        assert_eq!(e.name, "conv1.weight");
        assert_eq!(e.value.shape(), &[8, 7, 7, 3]);
        assert_eq!(e.layout, Layout::ConvKrsc);
        assert!(c.bias.is_none());
        let x = Tensor::randn_named(0, "x", &[2, 16, 16, 3], 1.0);
        let (y, cache) = c.forward(&s, x).unwrap();
        assert_eq!(y.shape(), &[2, 8, 8, 8]);
        let dx = c.backward(&mut s, cache, &y, true).unwrap().unwrap();
        assert_eq!(dx.shape(), &[2, 16, 16, 3]);
        // dL/dW for L = ½‖y‖² is nonzero
        assert!(s.grad(c.weight).data().iter().any(|v| *v != 0.0));
        let bad = Tensor::zeros(&[2, 16, 16, 4]);
        let err = c.forward(&s, bad).unwrap_err().to_string();
        assert!(err.contains("conv1.weight"), "{err}");
    }

    #[test]
    fn two_passes_accumulate_like_one_concatenated_pass() {
        let mk = |s: &mut ParamStore| Conv2d::new(s, "c", 3, 4, 3, 1, 1, true, 1);
        let x1 = Tensor::randn_named(0, "x1", &[1, 5, 5, 3], 1.0);
        let x2 = Tensor::randn_named(0, "x2", &[2, 5, 5, 3], 1.0);
        let dy1 = Tensor::randn_named(0, "d1", &[1, 5, 5, 4], 1.0);
        let dy2 = Tensor::randn_named(0, "d2", &[2, 5, 5, 4], 1.0);
        let mut s = ParamStore::new();
        let c = mk(&mut s);
        let (_, c1) = c.forward(&s, x1.clone()).unwrap();
        let (_, c2) = c.forward(&s, x2.clone()).unwrap();
        c.backward(&mut s, c1, &dy1, false).unwrap();
        c.backward(&mut s, c2, &dy2, false).unwrap();
        let mut s2 = ParamStore::new();
        let c_ = mk(&mut s2);
        let x = Tensor::cat_batch(&[&x1, &x2]).unwrap();
        let dy = Tensor::cat_batch(&[&dy1, &dy2]).unwrap();
        let (_, cc) = c_.forward(&s2, x).unwrap();
        c_.backward(&mut s2, cc, &dy, false).unwrap();
        for id in [c.weight, c.bias.unwrap()] {
            let e = crate::testing::rel_l2(s.grad(id).data(), s2.grad(id).data());
            assert!(e < 1e-6, "{e}");
        }
    }
}
