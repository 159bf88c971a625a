//! AdamW as `torch.optim.AdamW` (single-tensor CPU path), with DINO's two parameter groups.
//!
//! Per parameter, at its step k (1-based):
//! p ← p·(1 − lr·wd); m ← m + (1 − β1)(g − m); v ← β2·v + (1 − β2)·g²;
//! p ← p − (lr / (1 − β1^k)) · m / (√v / √(1 − β2^k) + ε).
//! The decay is decoupled (applied to p, not added to g) and uses the group's current lr, so the
//! schedules that set lr and wd each iteration change it too. Bias corrections are computed in
//! f64 from the per-parameter step count, as PyTorch does in Python floats.
//!
//! Groups (`daino/utils.py::get_params_groups`, spec §2.5): group 0 ("regularized") holds every
//! parameter with more than one dimension whose name does not end in ".bias"; group 1 holds
//! biases and 1-D parameters, with weight decay 0. The schedule sets lr for both and wd for group
//! 0 only. The rule is applied to **PyTorch** shapes: the engine stores a weight-norm
//! `weight_g` as `[out]`, but PyTorch's is `[out, 1]` (2-D), so `*.weight_g` is in group 0
//! (regularized), as in DINO, where `last_layer.weight_g` is decayed. Every other engine shape has
//! PyTorch's rank (convolution weights differ in layout only).
//!
//! As in PyTorch, a trainable parameter whose gradient is zero is still updated (decay and
//! moments); only non-trainable entries (grad `None` in PyTorch) are skipped.

use crate::error::{Error, Result};
use crate::nn::{Kind, ParamStore};
use rayon::prelude::*;
use std::collections::BTreeMap;

/// DINO's parameter group of a parameter, by its name and engine shape: 0 = regularized (weight
/// decay from the schedule), 1 = not regularized (biases, 1-D parameters; weight decay 0).
pub fn dino_group(name: &str, shape: &[usize]) -> usize {
    // PyTorch's ndim: weight_g of weight_norm(dim=0) keeps a singleton axis the engine drops.
    let torch_ndim = if name.ends_with(".weight_g") || name == "weight_g" {
        shape.len().max(2)
    } else {
        shape.len()
    };
    if name.ends_with(".bias") || torch_ndim == 1 {
        1
    } else {
        0
    }
}

/// Per-parameter AdamW state, as PyTorch's `state[p]`: `step`, `exp_avg`, `exp_avg_sq`.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWState {
    /// Number of steps taken by this parameter.
    pub step: u64,
    /// First moment m (flat, parameter storage layout).
    pub exp_avg: Vec<f32>,
    /// Second moment v (flat, parameter storage layout).
    pub exp_avg_sq: Vec<f32>,
}

/// Learning rate and weight decay of one parameter group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupHyper {
    /// Learning rate, set each iteration from the schedule.
    pub lr: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

/// AdamW over the trainable entries of a [`ParamStore`], grouped by [`dino_group`].
#[derive(Clone, Debug)]
pub struct AdamW {
    /// β1 (0.9).
    pub beta1: f64,
    /// β2 (0.999).
    pub beta2: f64,
    /// ε (1e-8).
    pub eps: f64,
    /// Group 0 (regularized) and group 1 (not regularized).
    pub groups: [GroupHyper; 2],
    state: BTreeMap<String, AdamWState>,
}

impl Default for AdamW {
    fn default() -> Self {
        Self::new()
    }
}

impl AdamW {
    /// `torch.optim.AdamW(get_params_groups(student))`: β 0.9/0.999, ε 1e-8, PyTorch's default
    /// lr 1e-3 and wd 1e-2 for group 0, wd 0 for group 1. The training loop overwrites lr (both
    /// groups) and wd (group 0) every iteration before stepping.
    pub fn new() -> Self {
        AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            groups: [
                GroupHyper {
                    lr: 1e-3,
                    weight_decay: 1e-2,
                },
                GroupHyper {
                    lr: 1e-3,
                    weight_decay: 0.0,
                },
            ],
            state: BTreeMap::new(),
        }
    }

    /// DINO's per-iteration update of the groups: lr for all, wd for group 0 only.
    pub fn set_schedule(&mut self, lr: f64, weight_decay: f64) {
        self.groups[0].lr = lr;
        self.groups[1].lr = lr;
        self.groups[0].weight_decay = weight_decay;
    }

    /// The state by parameter name, for checkpoints.
    pub fn state(&self) -> &BTreeMap<String, AdamWState> {
        &self.state
    }

    /// Restores state saved from [`AdamW::state`]. Sizes are checked at the next step.
    pub fn set_state(&mut self, state: BTreeMap<String, AdamWState>) {
        self.state = state;
    }

    /// One AdamW step over the trainable parameters of `store` with their accumulated gradients.
    /// Errors, before changing anything, when restored state does not match a parameter's size.
    pub fn step(&mut self, store: &mut ParamStore) -> Result<()> {
        for e in store.entries() {
            if e.kind != (Kind::Param { trainable: true }) {
                continue;
            }
            if let Some(s) = self.state.get(&e.name) {
                let n = e.value.numel();
                if s.exp_avg.len() != n || s.exp_avg_sq.len() != n {
                    return Err(Error::shape(
                        "AdamW::step",
                        format!(
                            "{}: state of {}/{} elements for a parameter of {:?}",
                            e.name,
                            s.exp_avg.len(),
                            s.exp_avg_sq.len(),
                            e.value.shape()
                        ),
                    ));
                }
            }
        }
        for e in store.entries() {
            if e.kind == (Kind::Param { trainable: true }) && !self.state.contains_key(&e.name) {
                let n = e.value.numel();
                self.state.insert(
                    e.name.clone(),
                    AdamWState {
                        step: 0,
                        exp_avg: vec![0.0; n],
                        exp_avg_sq: vec![0.0; n],
                    },
                );
            }
        }
        let mut states: BTreeMap<&str, &mut AdamWState> = self
            .state
            .iter_mut()
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        let mut work = Vec::new();
        for e in store.entries_mut() {
            if e.kind != (Kind::Param { trainable: true }) {
                continue;
            }
            let group = dino_group(&e.name, e.value.shape());
            if let Some(s) = states.remove(e.name.as_str()) {
                work.push((e, s, self.groups[group]));
            }
        }
        let (beta1, beta2, eps) = (self.beta1, self.beta2, self.eps);
        work.into_par_iter().for_each(|(e, s, h)| {
            s.step += 1;
            let k = s.step as f64;
            // As torch's _single_tensor_adamw: scalars in f64, tensors in f32.
            let decay = (1.0 - h.lr * h.weight_decay) as f32;
            let bc1 = 1.0 - beta1.powf(k);
            let bc2 = 1.0 - beta2.powf(k);
            let step_size = (h.lr / bc1) as f32;
            let bc2_sqrt = bc2.sqrt() as f32;
            let (w1, b2, w2, eps) = (
                (1.0 - beta1) as f32,
                beta2 as f32,
                (1.0 - beta2) as f32,
                eps as f32,
            );
            let p = e.value.data_mut();
            let g = e.grad.data();
            for (((pv, &gv), m), v) in p
                .iter_mut()
                .zip(g)
                .zip(s.exp_avg.iter_mut())
                .zip(s.exp_avg_sq.iter_mut())
            {
                *pv *= decay;
                *m += w1 * (gv - *m);
                *v = *v * b2 + w2 * gv * gv;
                let denom = v.sqrt() / bc2_sqrt + eps;
                // addcdiv_(m, denom, value=-step_size): p + (value·m)/denom.
                *pv += -step_size * *m / denom;
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dino_groups_follow_pytorch_shapes() {
        assert_eq!(dino_group("blocks.0.attn.qkv.weight", &[1152, 384]), 0);
        assert_eq!(dino_group("blocks.0.attn.qkv.bias", &[1152]), 1);
        assert_eq!(dino_group("norm.weight", &[384]), 1);
        assert_eq!(dino_group("cls_token", &[1, 1, 384]), 0);
        assert_eq!(dino_group("head.last_layer.weight_g", &[1000]), 0);
        assert_eq!(dino_group("head.last_layer.weight_v", &[1000, 256]), 0);
    }
}
