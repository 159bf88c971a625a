//! LARS as Suave uses it: the hand-written equivalent of apex `LARC(SGD, trust_coefficient=0.001,
//! clip=False)` with SGD momentum 0.9 (spec §1.10).
//!
//! Per parameter p with gradient g, weight decay wd and trust coefficient η:
//! * if ‖p‖ ≠ 0 and ‖g‖ ≠ 0: λ = η‖p‖ / (‖g‖ + wd‖p‖ + 1e-8) and d = (g + wd·p)·λ;
//! * otherwise d = g, *without* weight decay (apex only adds wd inside the adaptive branch);
//! * buf = momentum·buf + d, where the first step sets buf = d (torch SGD's `clone`);
//! * p ← p − lr·buf.
//!
//! Weight decay and adaptation apply to every parameter, biases and BN included
//! (`exclude_bias_n_norm=False`). The official code skips parameters whose grad is `None`; the
//! engine has no `None` grads, so it skips exactly the non-trainable entries. A trainable
//! parameter with an all-zero gradient still moves by its momentum, as in PyTorch.
//!
//! Norms are accumulated in f64 (PyTorch reduces in f32 with its own order; f64 is closer to
//! the exact value and keeps the result independent of thread count). The elementwise update is
//! f32 like PyTorch's. Parameters are processed in parallel with rayon: each one is independent.

use crate::error::{Error, Result};
use crate::nn::{Kind, ParamStore};
use rayon::prelude::*;
use std::collections::BTreeMap;

/// LARS optimiser state and hyper-parameters.
#[derive(Clone, Debug)]
pub struct Lars {
    /// Weight decay (Suave: `--wd`, 1e-6).
    pub weight_decay: f32,
    /// SGD momentum (0.9).
    pub momentum: f32,
    /// Trust coefficient η (0.001).
    pub eta: f32,
    /// ε of the trust ratio's denominator (1e-8).
    pub eps: f32,
    /// Momentum buffers by parameter name; absent until a parameter's first step.
    buffers: BTreeMap<String, Vec<f32>>,
}

impl Lars {
    /// Suave's LARS with weight decay `weight_decay`: momentum 0.9, η 0.001, ε 1e-8.
    pub fn new(weight_decay: f32) -> Self {
        Lars {
            weight_decay,
            momentum: 0.9,
            eta: 0.001,
            eps: 1e-8,
            buffers: BTreeMap::new(),
        }
    }

    /// Momentum buffers by parameter name, for checkpoints (flat, in the parameter's storage
    /// layout, i.e. KRSC for convolution weights).
    pub fn buffers(&self) -> &BTreeMap<String, Vec<f32>> {
        &self.buffers
    }

    /// Restores momentum buffers saved by [`Lars::buffers`]. Shapes are checked at the next step.
    pub fn set_buffers(&mut self, buffers: BTreeMap<String, Vec<f32>>) {
        self.buffers = buffers;
    }

    /// One step with learning rate `lr` over the trainable parameters of `store`, using their
    /// accumulated gradients. Errors (before changing anything) when a restored buffer does not
    /// match its parameter's size.
    pub fn step(&mut self, store: &mut ParamStore, lr: f32) -> Result<()> {
        for e in store.entries() {
            if e.kind != (Kind::Param { trainable: true }) {
                continue;
            }
            if let Some(b) = self.buffers.get(&e.name) {
                if b.len() != e.value.numel() {
                    return Err(Error::shape(
                        "Lars::step",
                        format!(
                            "{}: momentum buffer of {} elements for a parameter of {:?}",
                            e.name,
                            b.len(),
                            e.value.shape()
                        ),
                    ));
                }
            }
        }
        let mut old: BTreeMap<&str, &mut Vec<f32>> = self
            .buffers
            .iter_mut()
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        let mut work = Vec::new();
        let mut new_names = Vec::new();
        for e in store.entries_mut() {
            if e.kind != (Kind::Param { trainable: true }) {
                continue;
            }
            match old.remove(e.name.as_str()) {
                Some(b) => work.push((e, Some(b))),
                None => {
                    new_names.push(e.name.clone());
                    work.push((e, None));
                }
            }
        }
        let (wd, mom, eta, eps) = (self.weight_decay, self.momentum, self.eta, self.eps);
        let created: Vec<Option<Vec<f32>>> = work
            .into_par_iter()
            .map(|(e, buf)| {
                let p = e.value.data_mut();
                let g = e.grad.data();
                let pn = p.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
                let gn = g.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
                // d = (g + wd·p)·λ, or g when either norm is zero.
                let (scale, wd_eff) = if pn != 0.0 && gn != 0.0 {
                    let lambda = eta as f64 * pn / (gn + wd as f64 * pn + eps as f64);
                    (lambda as f32, wd)
                } else {
                    (1.0f32, 0.0f32)
                };
                let adaptive = wd_eff != 0.0 || scale != 1.0;
                match buf {
                    Some(b) => {
                        for ((pv, &gv), bv) in p.iter_mut().zip(g).zip(b.iter_mut()) {
                            let d = if adaptive {
                                (gv + wd_eff * *pv) * scale
                            } else {
                                gv
                            };
                            *bv = *bv * mom + d;
                            *pv -= lr * *bv;
                        }
                        None
                    }
                    None => {
                        let mut b = Vec::with_capacity(p.len());
                        for (pv, &gv) in p.iter_mut().zip(g) {
                            let d = if adaptive {
                                (gv + wd_eff * *pv) * scale
                            } else {
                                gv
                            };
                            b.push(d);
                            *pv -= lr * d;
                        }
                        Some(b)
                    }
                }
            })
            .collect();
        for (name, b) in new_names.into_iter().zip(created.into_iter().flatten()) {
            self.buffers.insert(name, b);
        }
        Ok(())
    }
}
