//! Where the ResNet backbone's passes run: on the CPU model ([`CpuBackbone`], the default) or
//! on a device ([`crate::models::device::DeviceBackbone`]: a GPU, or the CPU emulation of one).
//!
//! The seam is the backbone pass, not the whole step: the backbone is ~95 % of a Suave step's
//! arithmetic (ResNet-50 at 224 px against a 2048→2048→128 head), while the rest of the step —
//! multi-crop grouping, the heads, Sinkhorn, the queue, the losses, the online heads, the
//! gradient all-reduce, LARS, checkpoints — stays one piece of code for every device. The
//! parameters and their gradients meet in the [`ParamStore`] at the pass boundaries, which the
//! device runner keeps in sync (see its docs for what moves when).

use crate::dist::overlap::GradReady;
use crate::dist::Communicator;
use crate::error::Result;
use crate::models::resnet::{ResNet, ResNetCache};
use crate::nn::ParamStore;
use crate::tensor::Tensor;

/// What the backward of one backbone pass needs: the CPU model's cache, or the slot where a
/// device runner keeps its own saved activations (on the device).
#[derive(Debug)]
pub enum BackboneCache {
    /// A pass of the CPU model.
    Cpu(Box<ResNetCache>),
    /// A pass on a device runner, by slot.
    Device(usize),
}

/// Runs backbone passes (one per resolution group of a multi-crop step).
pub trait BackboneRun {
    /// A one-line description for the log ("cpu", "cuda:0 NVIDIA H200 ...").
    fn describe(&self) -> String;

    /// Forward of `x [N, H, W, 3]` → features `[N, feature_dim]`; training mode updates the
    /// BN running statistics once, as [`ResNet::forward_with`].
    fn forward(
        &mut self,
        net: &ResNet,
        store: &mut ParamStore,
        x: Tensor<f32>,
        training: bool,
        comm: &dyn Communicator,
    ) -> Result<(Tensor<f32>, BackboneCache)>;

    /// Backward of one pass from its features' gradient; the parameter gradients end up in
    /// `store` by the time `ready` (given for the step's last pass only) is told they are final.
    fn backward(
        &mut self,
        net: &ResNet,
        store: &mut ParamStore,
        cache: BackboneCache,
        dfeats: &Tensor<f32>,
        comm: &dyn Communicator,
        ready: Option<&mut (dyn GradReady + '_)>,
    ) -> Result<()>;
}

/// The CPU model itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackbone;

impl BackboneRun for CpuBackbone {
    fn describe(&self) -> String {
        "cpu".into()
    }

    fn forward(
        &mut self,
        net: &ResNet,
        store: &mut ParamStore,
        x: Tensor<f32>,
        training: bool,
        comm: &dyn Communicator,
    ) -> Result<(Tensor<f32>, BackboneCache)> {
        let (f, c) = net.forward_with(store, x, training, comm)?;
        Ok((f, BackboneCache::Cpu(Box::new(c))))
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
        match cache {
            BackboneCache::Cpu(c) => net.backward_hooked(store, *c, dfeats, comm, ready),
            BackboneCache::Device(_) => Err(crate::error::Error::invalid(
                "CpuBackbone::backward",
                "a device pass's cache given to the CPU runner",
            )),
        }
    }
}
