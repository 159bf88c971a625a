//! Parameters and buffers of a model, kept in one ordered store.
//!
//! Layers hold [`ParamId`]s into a [`ParamStore`] instead of owning tensors. That gives one place
//! for everything that walks all parameters in state-dict order: the optimiser, gradient
//! all-reduce, EMA of a teacher, checkpoints, import and export. Names are the official PyTorch
//! state-dict keys (torchvision / timm / the Suave and Daino heads), so weights interoperate.
//!
//! Each entry records its [`Layout`]: convolution weights are stored O×KH×KW×I ("KRSC", the
//! layout of NHWC convolutions) and converted to PyTorch's O×I×KH×KW only at import and export.

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::collections::HashMap;

pub mod batchnorm;
pub mod conv;
pub mod init;
pub mod layernorm;
pub mod linear;
pub mod vit_block;

/// Index of an entry in a [`ParamStore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ParamId(pub usize);

/// How an entry's memory layout relates to PyTorch's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Same layout as PyTorch.
    Plain,
    /// A convolution weight stored O×KH×KW×I; PyTorch stores O×I×KH×KW.
    ConvKrsc,
}

/// Whether an entry is learned or is state (BN running statistics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A parameter; `trainable == false` freezes it (e.g. DINO's teacher, a frozen `weight_g`).
    Param { trainable: bool },
    /// A buffer: saved with the model, never differentiated (running mean/var, batch counters).
    Buffer,
}

/// One named tensor of a model.
#[derive(Clone, Debug)]
pub struct Entry {
    pub name: String,
    pub value: Tensor<f32>,
    /// Gradient accumulator, same shape as `value` (empty for buffers).
    pub grad: Tensor<f32>,
    pub kind: Kind,
    pub layout: Layout,
}

/// All parameters and buffers of a model, in registration (= PyTorch state-dict) order.
#[derive(Clone, Debug, Default)]
pub struct ParamStore {
    entries: Vec<Entry>,
    index: HashMap<String, usize>,
}

impl ParamStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&mut self, name: &str, value: Tensor<f32>, kind: Kind, layout: Layout) -> ParamId {
        assert!(
            !self.index.contains_key(name),
            "ParamStore: {name} registered twice (a bug in the model definition)"
        );
        let grad = match kind {
            Kind::Param { .. } => Tensor::zeros(value.shape()),
            Kind::Buffer => Tensor::zeros(&[0]),
        };
        let id = self.entries.len();
        self.entries.push(Entry {
            name: name.to_string(),
            value,
            grad,
            kind,
            layout,
        });
        self.index.insert(name.to_string(), id);
        ParamId(id)
    }

    /// Registers a trainable parameter in PyTorch's layout.
    pub fn param(&mut self, name: &str, value: Tensor<f32>) -> ParamId {
        self.push(name, value, Kind::Param { trainable: true }, Layout::Plain)
    }

    /// Registers a trainable convolution weight stored O×KH×KW×I.
    pub fn conv_param(&mut self, name: &str, value: Tensor<f32>) -> ParamId {
        self.push(
            name,
            value,
            Kind::Param { trainable: true },
            Layout::ConvKrsc,
        )
    }

    /// Registers a buffer.
    pub fn buffer(&mut self, name: &str, value: Tensor<f32>) -> ParamId {
        self.push(name, value, Kind::Buffer, Layout::Plain)
    }

    /// Number of entries (parameters and buffers).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry with this id.
    pub fn entry(&self, id: ParamId) -> &Entry {
        &self.entries[id.0]
    }

    /// The entry with this id, mutable.
    pub fn entry_mut(&mut self, id: ParamId) -> &mut Entry {
        &mut self.entries[id.0]
    }

    /// The value of an entry.
    pub fn value(&self, id: ParamId) -> &Tensor<f32> {
        &self.entries[id.0].value
    }

    /// The value of an entry, mutable.
    pub fn value_mut(&mut self, id: ParamId) -> &mut Tensor<f32> {
        &mut self.entries[id.0].value
    }

    /// The gradient accumulator of a parameter.
    pub fn grad(&self, id: ParamId) -> &Tensor<f32> {
        &self.entries[id.0].grad
    }

    /// Adds `g` into the gradient accumulator of parameter `id` (nothing for frozen ones).
    pub fn accumulate_grad(&mut self, id: ParamId, g: &Tensor<f32>) -> Result<()> {
        let e = &mut self.entries[id.0];
        if e.kind != (Kind::Param { trainable: true }) {
            return Ok(());
        }
        if g.shape() != e.value.shape() {
            return Err(Error::shape(
                "accumulate_grad",
                format!(
                    "{}: gradient {:?} for a parameter of {:?}",
                    e.name,
                    g.shape(),
                    e.value.shape()
                ),
            ));
        }
        for (a, b) in e.grad.data_mut().iter_mut().zip(g.data()) {
            *a += *b;
        }
        Ok(())
    }

    /// Sets every parameter's gradient to zero.
    pub fn zero_grads(&mut self) {
        for e in &mut self.entries {
            e.grad.data_mut().fill(0.0);
        }
    }

    /// Freezes or unfreezes a parameter (no effect on buffers).
    pub fn set_trainable(&mut self, id: ParamId, trainable: bool) {
        if let Kind::Param { .. } = self.entries[id.0].kind {
            self.entries[id.0].kind = Kind::Param { trainable };
        }
    }

    /// The id of the entry called `name`.
    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.index.get(name).copied().map(ParamId)
    }

    /// All entries in order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// All entries in order, mutable (names and kinds stay fixed by construction).
    pub fn entries_mut(&mut self) -> &mut [Entry] {
        &mut self.entries
    }

    /// Ids of the trainable parameters, in order.
    pub fn trainable(&self) -> Vec<ParamId> {
        (0..self.entries.len())
            .filter(|&i| self.entries[i].kind == Kind::Param { trainable: true })
            .map(ParamId)
            .collect()
    }

    /// Total number of parameter elements (buffers excluded).
    pub fn num_params(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| matches!(e.kind, Kind::Param { .. }))
            .map(|e| e.value.numel())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grads_accumulate_only_for_trainable_params() {
        let mut s = ParamStore::new();
        let a = s.param("a.weight", Tensor::zeros(&[2]));
        let b = s.buffer("a.running_mean", Tensor::zeros(&[2]));
        let g = Tensor::from_vec(vec![1.0, 2.0], &[2]).unwrap();
        s.accumulate_grad(a, &g).unwrap();
        s.accumulate_grad(a, &g).unwrap();
        assert_eq!(s.grad(a).data(), &[2.0, 4.0]);
        s.set_trainable(a, false);
        s.accumulate_grad(a, &g).unwrap();
        assert_eq!(s.grad(a).data(), &[2.0, 4.0]);
        assert!(s.trainable().is_empty());
        assert_eq!(s.id("a.running_mean"), Some(b));
        assert_eq!(s.num_params(), 2);
        s.set_trainable(a, true);
        let e = s
            .accumulate_grad(a, &Tensor::zeros(&[3]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("a.weight") && e.contains("[3]"), "{e}");
        s.zero_grads();
        assert_eq!(s.grad(a).data(), &[0.0, 0.0]);
    }
}
