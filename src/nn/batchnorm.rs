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
//!
//! SyncBatchNorm is [`BatchNorm::forward_with`] / [`BatchNorm::backward_with`] with a
//! communicator of several ranks: the forward all-reduces (Σx, Σx², count) before the
//! statistics are finalised, so every rank normalises with the statistics of the global batch
//! and updates its running statistics identically (unbiased variance over the global count); the
//! backward all-reduces (Σdy', Σdy'·(x−μ), count) before dx, as PyTorch's `SyncBatchNorm`
//! backward does, while dγ and dβ keep the local sums (they are averaged later with every other
//! gradient, which with the loss's per-rank mean gives the global-batch gradient). With one rank
//! nothing is exchanged, so [`BatchNorm::forward`] (= `forward_with(.., &SingleProcess)`) is
//! bit-identical to the plain layer.

use super::{ParamId, ParamStore};
use crate::backend::cpu::norm::{
    batch_norm_apply, batch_norm_backward_apply, batch_norm_backward_reduce, batch_norm_eval_stats,
    batch_norm_finalize, batch_norm_param_grads, batch_norm_stats, BatchNormCtx, BatchNormParams,
};
use crate::backend::cpu::norm::{BatchNormGradPartials, BatchNormPartials};
use crate::dist::{Communicator, SingleProcess};
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

    /// Forward over `x [..., C]` on one process. Training: batch statistics, running statistics
    /// and `num_batches_tracked` updated in the store. Evaluation: running statistics, nothing
    /// updated.
    pub fn forward(
        &self,
        store: &mut ParamStore,
        x: impl Into<Arc<Tensor<f32>>>,
        training: bool,
    ) -> Result<(Tensor<f32>, BatchNormCache)> {
        self.forward_with(store, x, training, &SingleProcess)
    }

    /// Forward as [`BatchNorm::forward`], with the training statistics taken over every rank of
    /// `comm` (SyncBatchNorm). Collective in training mode: every rank must call it in the same
    /// order.
    pub fn forward_with(
        &self,
        store: &mut ParamStore,
        x: impl Into<Arc<Tensor<f32>>>,
        training: bool,
        comm: &dyn Communicator,
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
            let mut partials = batch_norm_stats(&*x)?;
            sync_stats(&mut partials, comm)?;
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
        self.backward_with(store, cache, dy, &SingleProcess)
    }

    /// Backward of [`BatchNorm::forward_with`]: in training mode with several ranks, dx uses the
    /// gradient sums of every rank (SyncBatchNorm); dγ, dβ are this rank's. Collective in
    /// training mode, in the reverse order of the forwards.
    pub fn backward_with(
        &self,
        store: &mut ParamStore,
        cache: BatchNormCache,
        dy: &Tensor<f32>,
        comm: &dyn Communicator,
    ) -> Result<Tensor<f32>> {
        let local = batch_norm_backward_reduce(dy, &cache.x, &cache.ctx)?;
        // dx needs the all-reduced sums; dγ, dβ take the LOCAL sums (averaged later with every
        // other gradient).
        let dx = if cache.ctx.training && comm.world_size() > 1 {
            let mut global = local.clone();
            sync_grad_sums(&mut global, comm)?;
            batch_norm_backward_apply(dy, &cache.x, &cache.ctx, &global)?
        } else {
            batch_norm_backward_apply(dy, &cache.x, &cache.ctx, &local)?
        };
        let (dgamma, dbeta) = batch_norm_param_grads(&local, &cache.ctx)?;
        store.accumulate_grad(self.weight, &dgamma)?;
        store.accumulate_grad(self.bias, &dbeta)?;
        Ok(dx)
    }
}

/// Packs `[a, b, count]` into one f64 buffer, sums it over the ranks and unpacks it: one
/// collective per call. Counts below 2⁵³ are exact in f64.
fn sum_packed(
    a: &mut [f64],
    b: &mut [f64],
    count: &mut usize,
    comm: &dyn Communicator,
) -> Result<()> {
    let c = a.len();
    let mut buf = Vec::with_capacity(2 * c + 1);
    buf.extend_from_slice(a);
    buf.extend_from_slice(b);
    buf.push(*count as f64);
    comm.all_reduce_sum_f64(&mut buf)?;
    a.copy_from_slice(&buf[..c]);
    b.copy_from_slice(&buf[c..2 * c]);
    *count = buf[2 * c] as usize;
    Ok(())
}

/// SyncBatchNorm's forward exchange: (Σx, Σx², count) summed over the ranks. Nothing moves
/// for one rank, so the single-process result stays bit-identical.
fn sync_stats(p: &mut BatchNormPartials, comm: &dyn Communicator) -> Result<()> {
    if comm.world_size() <= 1 {
        return Ok(());
    }
    sum_packed(&mut p.sum, &mut p.sumsq, &mut p.count, comm)
}

/// SyncBatchNorm's backward exchange: (Σdy', Σdy'·(x−μ), count) summed over the ranks.
fn sync_grad_sums(p: &mut BatchNormGradPartials, comm: &dyn Communicator) -> Result<()> {
    sum_packed(&mut p.sum_dy, &mut p.sum_dy_xmu, &mut p.count, comm)
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

    /// SyncBatchNorm: two ranks on the halves of a batch give the rows, running statistics and
    /// dx of one rank on the whole batch, and their local dγ, dβ add up to the whole batch's.
    #[test]
    fn two_ranks_equal_one_on_the_whole_batch() {
        use crate::dist::LocalGroup;
        let x = Tensor::randn_named(3, "x", &[6, 2, 2, 5], 1.0);
        let dy = Tensor::randn_named(3, "dy", &[6, 2, 2, 5], 1.0);
        let build = || {
            let mut s = ParamStore::new();
            let bn = BatchNorm::new(&mut s, "bn", 5, true);
            crate::nn::init::reference_fill(&mut s, 2);
            (s, bn)
        };
        let (mut s, bn) = build();
        let (y, c) = bn.forward(&mut s, x.clone(), true).unwrap();
        let dx = bn.backward(&mut s, c, &dy).unwrap();
        let xs = x.split_batch(&[3, 3]).unwrap();
        let dys = dy.split_batch(&[3, 3]).unwrap();
        let ranks = LocalGroup::new(2).unwrap();
        let outs: Vec<_> = std::thread::scope(|sc| {
            let hs: Vec<_> = ranks
                .iter()
                .enumerate()
                .map(|(r, g)| {
                    let (xr, dyr) = (xs[r].clone(), dys[r].clone());
                    let build = &build;
                    sc.spawn(move || {
                        let (mut s, bn) = build();
                        let (y, c) = bn.forward_with(&mut s, xr, true, g).unwrap();
                        let dx = bn.backward_with(&mut s, c, &dyr, g).unwrap();
                        (y, dx, s)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let y2 = Tensor::cat_batch(&[&outs[0].0, &outs[1].0]).unwrap();
        let dx2 = Tensor::cat_batch(&[&outs[0].1, &outs[1].1]).unwrap();
        assert!(rel_l2(y2.data(), y.data()) < 1e-6);
        assert!(rel_l2(dx2.data(), dx.data()) < 1e-5);
        for (_, _, sr) in &outs {
            for id in [bn.running_mean, bn.running_var] {
                assert!(rel_l2(sr.value(id).data(), s.value(id).data()) < 1e-6);
            }
        }
        for id in [bn.weight, bn.bias] {
            let sum: Vec<f32> = outs[0]
                .2
                .grad(id)
                .data()
                .iter()
                .zip(outs[1].2.grad(id).data())
                .map(|(a, b)| a + b)
                .collect();
            assert!(rel_l2(&sum, s.grad(id).data()) < 1e-5);
        }
    }
}
