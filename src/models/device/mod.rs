//! The models on device buffers: the same graphs as the CPU models, run through the device ops
//! of [`crate::backend::device`] (own kernels, and GEMMs / convolutions through
//! [`Exec::gemm`] / [`Exec::conv_forward`] and friends), generic over where they run: a CUDA GPU,
//! or the CPU emulation of one, which is how `cargo test` checks them against the CPU models.
//!
//! A device model does not redefine the network: it walks the CPU model's structure (the
//! [`ResNet`](crate::models::resnet::ResNet)'s layers, their [`ParamId`]s, strides, BN
//! settings) and reads and writes the parameters through [`DevParams`], the device mirror of a
//! [`ParamStore`]. One definition of the graph, two executions; import, export, checkpoints and
//! the optimiser's parameter order stay those of the store.
//!
//! Precision (DESIGN.md): fp32 master weights, fp32 gradient accumulators, fp32 BN statistics
//! and running buffers; bf16 activations and bf16 operand copies of the weights that feed a
//! convolution or a GEMM ([`DevParams::refresh_operands`] re-rounds them after every optimiser
//! step). A weight gradient that cuDNN / cuBLASLt returns in bf16 is added to its fp32
//! accumulator at once, so several passes of a step (one per crop resolution) sum in fp32.

pub mod backbone;
pub mod resnet;
pub mod verify;

pub use backbone::DeviceBackbone;

use crate::backend::device::{elementwise, DevBuf, Exec};
use crate::error::{Error, Result};
use crate::nn::{Kind, ParamId, ParamStore};
use half::bf16;

/// Threads per block of the elementwise launches the device models make.
pub(crate) const THREADS: u32 = 256;

/// One entry of a [`ParamStore`] on the device.
pub struct DevEntry<E: Exec> {
    /// The entry's name in the store (errors name it).
    pub name: String,
    /// Shape of the value.
    pub shape: Vec<usize>,
    /// The fp32 value: master weight of a parameter, state of a buffer (running mean / var).
    /// `None` for a scalar counter kept on the host (`num_batches_tracked`).
    pub value: Option<E::Buf<f32>>,
    /// The fp32 gradient accumulator of a trainable parameter.
    pub grad: Option<E::Buf<f32>>,
    /// The bf16 copy of a weight that is a convolution / GEMM operand (rank ≥ 2).
    pub operand: Option<E::Buf<bf16>>,
    /// A scalar buffer kept on the host, updated by the device models as the CPU layers do.
    pub host_scalar: Option<f32>,
}

/// The device mirror of a [`ParamStore`]: one [`DevEntry`] per entry, indexed by the same
/// [`ParamId`].
pub struct DevParams<E: Exec> {
    entries: Vec<DevEntry<E>>,
}

impl<E: Exec> DevParams<E> {
    /// Uploads every entry of `store`: values (fp32), zeroed gradient accumulators for the
    /// trainable parameters, and bf16 operand copies of every parameter of rank ≥ 2 (convolution
    /// and linear weights). Scalars (`num_batches_tracked`) stay on the host.
    pub fn upload(ex: &E, store: &ParamStore) -> Result<Self> {
        let mut entries = Vec::with_capacity(store.len());
        for e in store.entries() {
            let shape = e.value.shape().to_vec();
            let is_param = matches!(e.kind, Kind::Param { .. });
            if shape.is_empty() {
                if e.kind == (Kind::Param { trainable: true }) {
                    return Err(Error::invalid(
                        "DevParams::upload",
                        format!(
                            "{} is a trainable scalar; the device mirror keeps scalars on the host without a gradient",
                            e.name
                        ),
                    ));
                }
                entries.push(DevEntry {
                    name: e.name.clone(),
                    shape,
                    value: None,
                    grad: None,
                    operand: None,
                    host_scalar: Some(e.value.data()[0]),
                });
                continue;
            }
            let value = ex.upload(e.value.data())?;
            let grad = match e.kind {
                Kind::Param { trainable: true } => Some(ex.zeros::<f32>(e.value.numel())?),
                _ => None,
            };
            let operand = if is_param && shape.len() >= 2 {
                let mut h = ex.alloc::<bf16>(e.value.numel())?;
                elementwise::cast_f32_bf16(ex, &value, &mut h, THREADS)?;
                Some(h)
            } else {
                None
            };
            entries.push(DevEntry {
                name: e.name.clone(),
                shape,
                value: Some(value),
                grad,
                operand,
                host_scalar: None,
            });
        }
        Ok(DevParams { entries })
    }

    /// Number of entries (as the store).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry `id`.
    pub fn entry(&self, id: ParamId) -> Result<&DevEntry<E>> {
        self.entries.get(id.0).ok_or_else(|| {
            Error::invalid(
                "DevParams",
                format!(
                    "no entry {} (the mirror has {}): the model and the device parameters come from different stores",
                    id.0,
                    self.entries.len()
                ),
            )
        })
    }

    fn entry_mut(&mut self, id: ParamId) -> Result<&mut DevEntry<E>> {
        let n = self.entries.len();
        self.entries.get_mut(id.0).ok_or_else(|| {
            Error::invalid(
                "DevParams",
                format!("no entry {} (the mirror has {n})", id.0),
            )
        })
    }

    /// The fp32 value of entry `id`.
    pub fn value(&self, id: ParamId) -> Result<&E::Buf<f32>> {
        let e = self.entry(id)?;
        e.value
            .as_ref()
            .ok_or_else(|| Error::invalid("DevParams", format!("{} is a host scalar", e.name)))
    }

    /// The bf16 operand copy of weight `id`.
    pub fn operand(&self, id: ParamId) -> Result<&E::Buf<bf16>> {
        let e = self.entry(id)?;
        e.operand.as_ref().ok_or_else(|| {
            Error::invalid(
                "DevParams",
                format!(
                    "{} has no bf16 operand copy (not a weight of rank ≥ 2)",
                    e.name
                ),
            )
        })
    }

    /// The gradient accumulator of `id`, or `None` for a frozen parameter or a buffer (whose
    /// gradients are dropped, as `ParamStore::accumulate_grad` does).
    pub fn grad_mut(&mut self, id: ParamId) -> Result<Option<&mut E::Buf<f32>>> {
        Ok(self.entry_mut(id)?.grad.as_mut())
    }

    #[allow(clippy::type_complexity)]
    /// Two different entries' fp32 values, mutable (batch norm's running mean and variance).
    pub fn values_mut2(
        &mut self,
        a: ParamId,
        b: ParamId,
    ) -> Result<(&mut E::Buf<f32>, &mut E::Buf<f32>)> {
        if a == b {
            return Err(Error::invalid(
                "DevParams::values_mut2",
                format!("the same entry {} twice", a.0),
            ));
        }
        self.entry(a)?;
        self.entry(b)?;
        let (lo, hi, swap) = if a.0 < b.0 {
            (a.0, b.0, false)
        } else {
            (b.0, a.0, true)
        };
        let (left, right) = self.entries.split_at_mut(hi);
        let (x, y) = (&mut left[lo], &mut right[0]);
        let name = |e: &DevEntry<E>| e.name.clone();
        let (nx, ny) = (name(x), name(y));
        let xv = x
            .value
            .as_mut()
            .ok_or_else(|| Error::invalid("DevParams", format!("{nx} is a host scalar")))?;
        let yv = y
            .value
            .as_mut()
            .ok_or_else(|| Error::invalid("DevParams", format!("{ny} is a host scalar")))?;
        Ok(if swap { (yv, xv) } else { (xv, yv) })
    }

    /// Adds 1 to the host scalar `id` (a BN layer's `num_batches_tracked`).
    pub fn bump(&mut self, id: ParamId) -> Result<()> {
        let e = self.entry_mut(id)?;
        match e.host_scalar.as_mut() {
            Some(v) => {
                *v += 1.0;
                Ok(())
            }
            None => Err(Error::invalid(
                "DevParams::bump",
                format!("{} is not a scalar counter", e.name),
            )),
        }
    }

    /// Adds a bf16 gradient (from cuDNN / cuBLASLt) into the fp32 accumulator of `id`; nothing
    /// for a frozen parameter.
    pub fn accumulate_bf16(&mut self, ex: &E, id: ParamId, g: &E::Buf<bf16>) -> Result<()> {
        if let Some(acc) = self.grad_mut(id)? {
            elementwise::accumulate_bf16_f32(ex, g, acc, THREADS)?;
        }
        Ok(())
    }

    /// Adds an fp32 gradient into the accumulator of `id`; nothing for a frozen parameter.
    pub fn accumulate_f32(&mut self, ex: &E, id: ParamId, g: &E::Buf<f32>) -> Result<()> {
        if let Some(acc) = self.grad_mut(id)? {
            elementwise::accumulate_f32(ex, g, acc, THREADS)?;
        }
        Ok(())
    }

    /// Zeroes every gradient accumulator (the start of a step).
    pub fn zero_grads(&mut self, ex: &E) -> Result<()> {
        for e in &mut self.entries {
            if let Some(g) = e.grad.as_mut() {
                *g = ex.zeros::<f32>(g.len())?;
            }
        }
        Ok(())
    }

    /// Re-rounds every bf16 operand copy from its fp32 master (after an optimiser step).
    pub fn refresh_operands(&mut self, ex: &E) -> Result<()> {
        for e in &mut self.entries {
            if let (Some(v), Some(h)) = (e.value.as_ref(), e.operand.as_mut()) {
                elementwise::cast_f32_bf16(ex, v, h, THREADS)?;
            }
        }
        Ok(())
    }

    /// Writes every value (parameters, running statistics, counters) back into `store`, which
    /// must be the store this mirror was uploaded from (same names and shapes).
    pub fn download_values(&self, ex: &E, store: &mut ParamStore) -> Result<()> {
        let all: Vec<ParamId> = (0..self.entries.len()).map(ParamId).collect();
        self.download_values_of(ex, store, &all)
    }

    /// Writes every gradient accumulator into the store's gradients (frozen parameters and
    /// buffers untouched).
    pub fn download_grads(&self, ex: &E, store: &mut ParamStore) -> Result<()> {
        self.check_store(store)?;
        for (d, e) in self.entries.iter().zip(store.entries_mut()) {
            if let Some(g) = &d.grad {
                let data = ex.download(g)?;
                e.grad.data_mut().copy_from_slice(&data);
            }
        }
        Ok(())
    }

    /// Overwrites the device values of `ids` with the store's (after the optimiser stepped the
    /// store) and re-rounds their operand copies.
    pub fn upload_values_of(&mut self, ex: &E, store: &ParamStore, ids: &[ParamId]) -> Result<()> {
        self.check_store(store)?;
        for &id in ids {
            let src = store.value(id).data();
            let e = self.entry_mut(id)?;
            match (e.value.as_mut(), e.host_scalar.as_mut()) {
                (Some(v), _) => {
                    ex.upload_into(src, v)?;
                    if let Some(h) = e.operand.as_mut() {
                        elementwise::cast_f32_bf16(ex, v, h, THREADS)?;
                    }
                }
                (None, Some(s)) => *s = src[0],
                (None, None) => {}
            }
        }
        Ok(())
    }

    /// Copies the device values of `ids` (running statistics, counters) into the store.
    pub fn download_values_of(
        &self,
        ex: &E,
        store: &mut ParamStore,
        ids: &[ParamId],
    ) -> Result<()> {
        self.check_store(store)?;
        for &id in ids {
            let e = self.entry(id)?;
            let data = match (&e.value, e.host_scalar) {
                (Some(v), _) => ex.download(v)?,
                (None, Some(s)) => vec![s],
                (None, None) => continue,
            };
            store.value_mut(id).data_mut().copy_from_slice(&data);
        }
        Ok(())
    }

    /// Adds the device gradients of `ids` into the store's accumulators and zeroes them on the
    /// device (the step's gradients have moved to the store).
    pub fn move_grads_of(&mut self, ex: &E, store: &mut ParamStore, ids: &[ParamId]) -> Result<()> {
        self.check_store(store)?;
        for &id in ids {
            let shape = self.entry(id)?.shape.clone();
            if let Some(g) = self.grad_mut(id)? {
                let t = crate::tensor::Tensor::from_vec(ex.download(g)?, &shape)?;
                *g = ex.zeros::<f32>(g.len())?;
                store.accumulate_grad(id, &t)?;
            }
        }
        Ok(())
    }

    fn check_store(&self, store: &ParamStore) -> Result<()> {
        if store.len() != self.entries.len() {
            return Err(Error::invalid(
                "DevParams",
                format!(
                    "the store has {} entries, the device mirror {}",
                    store.len(),
                    self.entries.len()
                ),
            ));
        }
        for (d, e) in self.entries.iter().zip(store.entries()) {
            if d.name != e.name || d.shape != e.value.shape() {
                return Err(Error::invalid(
                    "DevParams",
                    format!(
                        "entry {} {:?} on the device vs {} {:?} in the store",
                        d.name,
                        d.shape,
                        e.name,
                        e.value.shape()
                    ),
                ));
            }
        }
        Ok(())
    }
}
