//! [`DeviceBackbone`]: the backbone passes of a training step on a device, behind the
//! [`BackboneRun`] seam, so that the trainer's step (heads, losses, all-reduce, optimiser,
//! checkpoints) is unchanged.
//!
//! What moves, per step (a ResNet-50 has 25.6 M parameters: ~100 MB each way in fp32):
//! - first training pass of a step: the store's parameter values (stepped by the optimiser since
//!   the last pass) are uploaded and their bf16 operand copies re-rounded; at the first pass ever
//!   the whole store is mirrored ([`DevParams::upload`]);
//! - each pass: the images (bf16) up, the pooled features down (`[N, 2048]`), their gradient up;
//! - the step's last backward: the gradients down (added into the store's), the batch-norm
//!   running statistics and counters down, then the gradient hook is told, block by block, as
//!   the CPU model tells it.
//!
//! Evaluation passes (`training = false`) run on the CPU model, which reads the same store.
//! The next steps of the CUDA path (heads and optimiser on the device, NCCL) remove the
//! per-step parameter and gradient transfers; the numbers do not change.

use super::resnet::{self, Nhwc, ResNetSaved};
use super::DevParams;
use crate::backend::device::Exec;
use crate::dist::overlap::GradReady;
use crate::dist::Communicator;
use crate::error::{Error, Result};
use crate::models::backbone::{BackboneCache, BackboneRun};
use crate::models::resnet::ResNet;
use crate::nn::ParamStore;
use crate::tensor::Tensor;
use half::bf16;

/// Runs training passes of a ResNet backbone on `E` (see the module docs).
pub struct DeviceBackbone<E: Exec> {
    params: Option<DevParams<E>>,
    /// The saved activations of this step's passes, by [`BackboneCache::Device`] slot.
    slots: Vec<Option<ResNetSaved<E>>>,
    /// The store's values changed since they were uploaded (an optimiser step ran).
    stale: bool,
    /// Declared last: dropped after every buffer it owns the memory of.
    ex: E,
}

impl<E: Exec> DeviceBackbone<E> {
    /// A runner on `ex`; the parameters are mirrored at the first training pass.
    pub fn new(ex: E) -> Self {
        DeviceBackbone {
            params: None,
            slots: Vec::new(),
            stale: false,
            ex,
        }
    }

    /// The executor.
    pub fn exec(&self) -> &E {
        &self.ex
    }
}

/// Runs a device pass with a panic inside a binding (cudarc asserts on some library answers, e.g.
/// cuDNN offering no algorithm for a shape) turned into an error naming the pass, so that the
/// trainer stops with a message and its last checkpoint rather than a panic trace.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let msg = crate::error::panic_message(p.as_ref());
        Err(Error::invalid(
            "DeviceBackbone",
            format!("the device {what} pass panicked: {msg}"),
        ))
    })
}

impl<E: Exec> BackboneRun for DeviceBackbone<E> {
    fn describe(&self) -> String {
        self.ex.describe()
    }

    fn forward(
        &mut self,
        net: &ResNet,
        store: &mut ParamStore,
        x: Tensor<f32>,
        training: bool,
        comm: &dyn Communicator,
    ) -> Result<(Tensor<f32>, BackboneCache)> {
        if !training {
            let (f, c) = net.forward_with(store, x, false, comm)?;
            return Ok((f, BackboneCache::Cpu(Box::new(c))));
        }
        if x.rank() != 4 {
            return Err(Error::shape(
                "DeviceBackbone::forward",
                format!("input {:?}, expected NHWC", x.shape()),
            ));
        }
        let ex = &self.ex;
        let p = match self.params.take() {
            None => DevParams::upload(ex, store)?,
            Some(mut p) => {
                if self.stale {
                    p.upload_values_of(ex, store, &resnet::params(net))?;
                }
                p
            }
        };
        self.stale = false;
        let p = self.params.insert(p);
        let shape = Nhwc {
            n: x.dim(0),
            h: x.dim(1),
            w: x.dim(2),
            c: x.dim(3),
        };
        let img = ex.upload_bf16(x.data())?;
        let (f, saved) = guarded("forward", || resnet::forward(ex, net, p, img, shape, comm))?;
        let feats = Tensor::from_vec(ex.download_bf16(&f)?, &[shape.n, net.feature_dim()])?;
        let slot = self.slots.len();
        self.slots.push(Some(saved));
        Ok((feats, BackboneCache::Device(slot)))
    }

    fn backward(
        &mut self,
        net: &ResNet,
        store: &mut ParamStore,
        cache: BackboneCache,
        dfeats: &Tensor<f32>,
        comm: &dyn Communicator,
        ready: Option<&mut (dyn GradReady + '_)>,
    ) -> Result<()> {
        let slot = match cache {
            BackboneCache::Cpu(c) => return net.backward_hooked(store, *c, dfeats, comm, ready),
            BackboneCache::Device(i) => i,
        };
        let saved = self
            .slots
            .get_mut(slot)
            .and_then(Option::take)
            .ok_or_else(|| {
                Error::invalid(
                    "DeviceBackbone::backward",
                    format!("no saved pass in slot {slot} (each pass runs backward once)"),
                )
            })?;
        let p = self.params.as_mut().ok_or_else(|| {
            Error::invalid("DeviceBackbone::backward", "backward before any forward")
        })?;
        let ex = &self.ex;
        let d: Vec<bf16> = dfeats.data().iter().map(|&v| bf16::from_f32(v)).collect();
        let d = ex.upload(&d)?;
        guarded("backward", || resnet::backward(ex, net, p, saved, &d, comm))?;
        let Some(ready) = ready else {
            return Ok(());
        };
        // The step's last pass: the gradients are final. Move them and the running statistics
        // to the store, then report them as the CPU model does (blocks from layer4, the stem).
        p.move_grads_of(ex, store, &resnet::params(net))?;
        p.download_values_of(ex, store, &resnet::buffers(net))?;
        self.slots.clear();
        self.stale = true;
        for blk in net.layers.iter().flatten().rev() {
            ready.ready(store, &blk.params())?;
        }
        ready.ready(store, &resnet::stem_params(net))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_in_a_pass_becomes_an_error() {
        let e = guarded::<()>("forward", || panic!("no algorithm")).unwrap_err();
        assert!(
            e.to_string()
                .contains("forward pass panicked: no algorithm"),
            "{e}"
        );
        assert_eq!(guarded("backward", || Ok(3)).unwrap(), 3);
        assert!(guarded::<()>("backward", || Err(Error::invalid("x", "y"))).is_err());
    }
}
