//! `BatchNorm` layer: BatchNorm2d over NHWC activations and BatchNorm1d over `[N, C]` rows (the
//! same op: channels are the last dimension either way), with an optional fused ReLU.
//!
//! Registers `{prefix}.weight`, `{prefix}.bias` (parameters, init 1 and 0 as torchvision) and the
//! buffers `{prefix}.running_mean` (0), `{prefix}.running_var` (1) and
//! `{prefix}.num_batches_tracked` (0, kept as f32; exact up to 2²⁴ steps), in PyTorch's
//! state-dict order.
//!
//! Training mode updates the running statistics DURING the forward, as PyTorch does, so the
//! forward takes `&mut ParamStore`. Every forward call is one update: a multi-crop step that runs
//! the backbone once per resolution updates the statistics once per pass (as the official code).
//!
//! The forward and backward are written as the split ops of `backend::cpu::norm`
//! (statistics → finalize → apply; gradient sums → apply → parameter gradients) rather than the
//! one-call wrappers: SyncBatchNorm all-reduces exactly the two partial sums in between, so the
//! cross-rank hook slots in at the two marked places without changing the layer's shape.

use super::{ParamId, ParamStore};
use crate::backend::cpu::norm::{
    batch_norm_apply, batch_norm_backward_apply, batch_norm_backward_reduce, batch_norm_eval_stats,
    batch_norm_finalize, batch_norm_param_grads, batch_norm_stats, BatchNormCtx, BatchNormParams,
};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::sync::Arc;

/// Batch normalisation over the last dimension of a channels-last input, optional fused ReLU.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    pub weight: ParamId,
    pub bias: ParamId,
    pub running_mean: ParamId,
    pub running_var: ParamId,
    pub num_batches_tracked: ParamId,
    pub channels: usize,
    /// PyTorch's defaults: 1e-5.
    pub eps: f64,
    /// PyTorch's defaults: 0.1.
    pub momentum: f64,
    /// Apply ReLU to the output in the same pass (ResNet's `bn → relu` pairs).
    pub relu: bool,
}

/// What [`BatchNorm::backward`] needs from the forward: the input (shared, see
/// [`Conv2d`](super::conv::Conv2d) for why) and the per-channel statistics.
#[derive(Clone, Debug)]
pub struct BatchNormCache {
    x: Arc<Tensor<f32>>,
    ctx: BatchNormCtx<f32>,
}

impl BatchNorm {
    /// Registers the layer's parameters and buffers under `prefix` with torchvision's init.
    pub fn new(store: &mut ParamStore, prefix: &str, channels: usize, relu: bool) -> Self {
        let c = [channels];
        BatchNorm {
            weight: store.param(&format!("{prefix}.weight"), Tensor::full(&c, 1.0)),
            bias: store.param(&format!("{prefix}.bias"), Tensor::zeros(&c)),
            running_mean: store.buffer(&format!("{prefix}.running_mean"), Tensor::zeros(&c)),
            running_var: store.buffer(&format!("{prefix}.running_var"), Tensor::full(&c, 1.0)),
            num_batches_tracked: store
                .buffer(&format!("{prefix}.num_batches_tracked"), Tensor::zeros(&[])),
            channels,
            eps: 1e-5,
            momentum: 0.1,
            relu,
        }
    }

    fn params(&self, training: bool) -> BatchNormParams {
        BatchNormParams {
            eps: self.eps,
            momentum: self.momentum,
            training,
            relu: self.relu,
        }
    }

    /// Forward over `x [..., C]`. Training: batch statistics, running statistics and
    /// `num_batches_tracked` updated in the store. Evaluation: running statistics, nothing
    /// updated.
    pub fn forward(
        &self,
        store: &mut ParamStore,
        x: impl Into<Arc<Tensor<f32>>>,
        training: bool,
    ) -> Result<(Tensor<f32>, BatchNormCache)> {
        let x = x.into();
        if x.rank() < 2 || x.dim(-1) != self.channels {
            return Err(Error::shape(
                "BatchNorm::forward",
                format!(
                    "{}: input {:?}, expected [N, C] or NHWC with C = {}",
                    store.entry(self.weight).name,
                    x.shape(),
                    self.channels
                ),
            ));
        }
        let p = self.params(training);
        let stats = if training {
            let partials = batch_norm_stats(&*x)?;
            // SyncBatchNorm: all-reduce `partials` (sum, sumsq, count) across ranks here.
            let mut rm = std::mem::replace(store.value_mut(self.running_mean), Tensor::zeros(&[0]));
            let mut rv = std::mem::replace(store.value_mut(self.running_var), Tensor::zeros(&[0]));
            let stats = batch_norm_finalize(&partials, &mut rm, &mut rv, p);
            *store.value_mut(self.running_mean) = rm;
            *store.value_mut(self.running_var) = rv;
            let stats = stats?;
            store.value_mut(self.num_batches_tracked).data_mut()[0] += 1.0;
            stats
        } else {
            batch_norm_eval_stats(
                store.value(self.running_mean),
                store.value(self.running_var),
                self.eps,
            )?
        };
        let (y, ctx) = batch_norm_apply(
            &*x,
            store.value(self.weight),
            store.value(self.bias),
            stats,
            p,
        )?;
        Ok((y, BatchNormCache { x, ctx }))
    }

    /// Backward: accumulates dγ, dβ into the store and returns dx (through the batch statistics
    /// in training mode; the ReLU mask when fused).
    pub fn backward(
        &self,
        store: &mut ParamStore,
        cache: BatchNormCache,
        dy: &Tensor<f32>,
    ) -> Result<Tensor<f32>> {
        let local = batch_norm_backward_reduce(dy, &cache.x, &cache.ctx)?;
        // SyncBatchNorm: dx needs the all-reduced sums (a clone of `local` reduced across ranks);
        // dγ, dβ take the LOCAL sums (reduced later with every other gradient).
        let dx = batch_norm_backward_apply(dy, &cache.x, &cache.ctx, &local)?;
        let (dgamma, dbeta) = batch_norm_param_grads(&local, &cache.ctx)?;
        store.accumulate_grad(self.weight, &dgamma)?;
        store.accumulate_grad(self.bias, &dbeta)?;
        Ok(dx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::norm::{batch_norm_backward, batch_norm_forward};
    use crate::testing::rel_l2;

    #[test]
    fn init_names_and_order() {
        let mut s = ParamStore::new();
        BatchNorm::new(&mut s, "bn1", 4, false);
        let names: Vec<&str> = s.entries().iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "bn1.weight",
                "bn1.bias",
                "bn1.running_mean",
                "bn1.running_var",
                "bn1.num_batches_tracked"
            ]
        );
        assert_eq!(s.num_params(), 8);
        assert_eq!(s.entries()[0].value.data(), &[1.0; 4]);
        assert_eq!(s.entries()[3].value.data(), &[1.0; 4]);
    }

    /// The layer is the op plus bookkeeping: same outputs, gradients and running statistics as
    /// the one-call op, in both modes, with and without ReLU, 2-d and 1-d.
    #[test]
    fn matches_the_op_and_updates_buffers() {
        for (shape, relu) in [([2usize, 3, 3, 5], true), ([6, 1, 1, 5], false)] {
            let mut s = ParamStore::new();
            let bn = BatchNorm::new(&mut s, "bn", 5, relu);
            crate::nn::init::reference_fill(&mut s, 1);
            let x = Tensor::randn_named(0, "x", &shape, 1.0);
            let x = if shape[1] == 1 {
                x.reshape(&[6, 5]).unwrap()
            } else {
                x
            };
            let dy = Tensor::randn_named(0, "dy", x.shape(), 1.0);
            for training in [true, false] {
                let mut rm = s.value(bn.running_mean).clone();
                let mut rv = s.value(bn.running_var).clone();
                let p = bn.params(training);
                let (y0, ctx0) = batch_norm_forward(
                    &x,
                    s.value(bn.weight),
                    s.value(bn.bias),
                    &mut rm,
                    &mut rv,
                    p,
                )
                .unwrap();
                let g0 = batch_norm_backward(&dy, &x, &ctx0).unwrap();
                s.zero_grads();
                let nbt = s.value(bn.num_batches_tracked).data()[0];
                let (y, cache) = bn.forward(&mut s, x.clone(), training).unwrap();
                let dx = bn.backward(&mut s, cache, &dy).unwrap();
                assert_eq!(y, y0);
                assert!(rel_l2(dx.data(), g0.dx.data()) < 1e-7);
                assert!(rel_l2(s.grad(bn.weight).data(), g0.dgamma.data()) < 1e-7);
                assert!(rel_l2(s.grad(bn.bias).data(), g0.dbeta.data()) < 1e-7);
                assert_eq!(s.value(bn.running_mean), &rm);
                assert_eq!(s.value(bn.running_var), &rv);
                let step = if training { 1.0 } else { 0.0 };
                assert_eq!(s.value(bn.num_batches_tracked).data()[0], nbt + step);
            }
        }
    }

    #[test]
    fn rejects_wrong_channels_and_single_values() {
        let mut s = ParamStore::new();
        let bn = BatchNorm::new(&mut s, "bn", 3, false);
        let e = bn
            .forward(&mut s, Tensor::zeros(&[2, 4]), true)
            .unwrap_err();
        assert!(e.to_string().contains("bn.weight"), "{e}");
        // one value per channel cannot be normalised in training mode; buffers stay intact
        assert!(bn.forward(&mut s, Tensor::zeros(&[1, 3]), true).is_err());
        assert_eq!(s.value(bn.running_mean).shape(), &[3]);
        assert_eq!(s.value(bn.num_batches_tracked).data()[0], 0.0);
    }
}
