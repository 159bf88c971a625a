//! Daino's loss (spec §2.4, §7.2): DINO's self-distillation term on the unlabelled views plus a
//! label-smoothed cross-entropy on the labelled batch, weighted by their share of the batch.
//!
//! DINO term: teacher targets `softmax((t − c)/τ_t)` for the global views (constants), student
//! log-softmax `s/τ_s` for every view, averaged over all (teacher view, student view) pairs except
//! the pairs where both see the same global view (2·V − 2 pairs). The centre `c` is an EMA
//! (momentum 0.9) of the batch mean of the teacher's *raw* logits over both global views and all
//! ranks; it is updated *after* the loss (official `DINOLoss.forward`), through the
//! [`Communicator`]. As in [`super::suave_loss`], the pure parts ([`dino_targets`],
//! [`dino_student_loss`]) are separate from the stateful centre so that they can be checked alone.

use crate::backend::cpu::loss::{
    cross_entropy_backward, cross_entropy_forward, CrossEntropyParams,
};
use crate::backend::cpu::softmax::softmax_forward;
use crate::dist::Communicator;
use crate::error::{Error, Result};
use crate::tensor::{Float, Tensor};

/// Teacher temperature at `epoch`: `linspace(warmup, final, warmup_epochs)` (inclusive ends, as
/// `np.linspace`) during warm-up, `final` afterwards. Daino: 0.04 → 0.07 over 10 epochs.
pub fn teacher_temperature(
    epoch: usize,
    warmup: f64,
    final_temp: f64,
    warmup_epochs: usize,
) -> f64 {
    if epoch >= warmup_epochs {
        final_temp
    } else if warmup_epochs == 1 {
        warmup
    } else {
        warmup + (final_temp - warmup) * epoch as f64 / (warmup_epochs - 1) as f64
    }
}

fn check_views<T: Float>(
    op: &'static str,
    what: &str,
    views: &[Tensor<T>],
) -> Result<(usize, usize)> {
    let first = views
        .first()
        .ok_or_else(|| Error::invalid(op, format!("no {what} views given")))?;
    first.expect_rank(op, what, 2)?;
    let shape = first.shape().to_vec();
    for (i, v) in views.iter().enumerate() {
        if v.shape() != shape.as_slice() {
            return Err(Error::shape(
                op,
                format!(
                    "{what} view {i} has shape {:?}, view 0 has {:?}",
                    v.shape(),
                    shape
                ),
            ));
        }
    }
    Ok((shape[0], shape[1]))
}

/// Teacher targets `softmax((t_a − c)/τ_t)` per teacher (global) view `[bs, K]`.
pub fn dino_targets<T: Float>(
    teacher: &[Tensor<T>],
    center: &[T],
    teacher_temp: f64,
) -> Result<Vec<Tensor<T>>> {
    const OP: &str = "dino_targets";
    let (_, k) = check_views(OP, "teacher", teacher)?;
    if center.len() != k {
        return Err(Error::shape(
            OP,
            format!("centre has {} entries for {k} outputs", center.len()),
        ));
    }
    if !(teacher_temp > 0.0 && teacher_temp.is_finite()) {
        return Err(Error::invalid(
            OP,
            format!("teacher temperature {teacher_temp} must be finite and > 0"),
        ));
    }
    let inv = T::c(1.0 / teacher_temp);
    teacher
        .iter()
        .map(|t| {
            let mut x = t.clone();
            for row in x.data_mut().chunks_exact_mut(k) {
                for (v, &c) in row.iter_mut().zip(center) {
                    *v = (*v - c) * inv;
                }
            }
            softmax_forward(&x)
        })
        .collect()
}

/// The DINO term `L = (1/n) Σ_a Σ_{v≠a} CE(s_v/τ_s, q_a)`, `n` the number of pairs, and
/// `dloss·∂L/∂s_v` per student view. Teacher view `a` is the student's view `a` (the global
/// views come first in both).
pub fn dino_student_loss<T: Float>(
    student: &[Tensor<T>],
    targets: &[Tensor<T>],
    student_temp: f64,
    dloss: T,
) -> Result<(T, Vec<Tensor<T>>)> {
    const OP: &str = "dino_student_loss";
    let (bs, k) = check_views(OP, "student", student)?;
    check_views(OP, "target", targets)?;
    let pairs = targets.len() * student.len() - targets.len().min(student.len());
    if pairs == 0 {
        return Err(Error::invalid(
            OP,
            "no (teacher, student) pair with different views",
        ));
    }
    let params = CrossEntropyParams {
        temperature: student_temp,
        label_smoothing: 0.0,
    };
    let scale = dloss / T::c(pairs as f64);
    let mut loss = T::ZERO;
    let mut grads: Vec<Tensor<T>> = student.iter().map(|_| Tensor::zeros(&[bs, k])).collect();
    for (a, q) in targets.iter().enumerate() {
        for (v, (s, g)) in student.iter().zip(grads.iter_mut()).enumerate() {
            if v == a {
                continue;
            }
            let (l, ctx) = cross_entropy_forward(s, q, params)?;
            loss += l;
            let d = cross_entropy_backward(scale, q, &ctx)?;
            for (gi, di) in g.data_mut().iter_mut().zip(d.data()) {
                *gi += *di;
            }
        }
    }
    Ok((loss / T::c(pairs as f64), grads))
}

/// DINO's centre: `c ← m·c + (1 − m)·mean(teacher logits over views, batch and ranks)`.
#[derive(Clone, Debug, PartialEq)]
pub struct DinoCenter<T> {
    /// The centre `[K]`, zero at the start; part of the checkpoint.
    pub center: Vec<T>,
    /// EMA momentum (0.9, hard-coded in DINO and Daino).
    pub momentum: f64,
}

impl<T: Float> DinoCenter<T> {
    /// A zero centre of `k` outputs, momentum 0.9.
    pub fn new(k: usize) -> Self {
        DinoCenter {
            center: vec![T::ZERO; k],
            momentum: 0.9,
        }
    }

    /// The EMA update from this rank's raw teacher logits (collective over the ranks).
    pub fn update(&mut self, teacher: &[Tensor<T>], comm: &dyn Communicator) -> Result<()> {
        const OP: &str = "DinoCenter::update";
        let (bs, k) = check_views(OP, "teacher", teacher)?;
        if k != self.center.len() {
            return Err(Error::shape(
                OP,
                format!("centre has {} entries for {k} outputs", self.center.len()),
            ));
        }
        let mut sum = vec![0.0f64; k];
        for t in teacher {
            for row in t.data().chunks_exact(k) {
                for (s, &x) in sum.iter_mut().zip(row) {
                    *s += x.as_f64();
                }
            }
        }
        comm.all_reduce_sum_f64(&mut sum)?;
        let n = (teacher.len() * bs * comm.world_size()) as f64;
        let m = self.momentum;
        for (c, s) in self.center.iter_mut().zip(sum) {
            *c = T::c(c.as_f64() * m + s / n * (1.0 - m));
        }
        Ok(())
    }
}

/// Parameters of the Daino loss (defaults: the scripts' values).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DainoConfig {
    /// Student temperature τ_s of both terms (`--temperature`, 0.1).
    pub student_temperature: f64,
    /// Label smoothing of the labelled term (0.01).
    pub label_smoothing: f64,
}

impl Default for DainoConfig {
    fn default() -> Self {
        DainoConfig {
            student_temperature: 0.1,
            label_smoothing: 0.01,
        }
    }
}

/// What [`daino_loss`] returns.
#[derive(Clone, Debug)]
pub struct DainoLoss<T> {
    /// `w_unlab·L_unlab + w_lab·L_lab`, with `w = n/T`, `T = V·bs + lab_bs` (0.909 / 0.091).
    pub total: T,
    /// The DINO term.
    pub unlab: T,
    /// The labelled term, when a labelled batch was given.
    pub lab: Option<T>,
    /// `(w_unlab, w_lab)`.
    pub weights: (f64, f64),
    /// `∂total/∂s_v` per student view.
    pub d_student: Vec<Tensor<T>>,
    /// `∂total/∂s_lab`.
    pub d_lab: Option<Tensor<T>>,
}

/// One Daino loss evaluation: targets from the teacher and the current centre, the DINO term,
/// the labelled CE on `(scores, soft targets)`, the weighted total with its gradients, and then
/// the centre update (collective).
pub fn daino_loss<T: Float>(
    student: &[Tensor<T>],
    teacher: &[Tensor<T>],
    lab: Option<(&Tensor<T>, &Tensor<T>)>,
    center: &mut DinoCenter<T>,
    teacher_temp: f64,
    cfg: DainoConfig,
    comm: &dyn Communicator,
) -> Result<DainoLoss<T>> {
    let (bs, _) = check_views("daino_loss", "student", student)?;
    let lab_bs = lab.map_or(0, |(s, _)| s.shape().first().copied().unwrap_or(0));
    let t = (student.len() * bs + lab_bs).max(1) as f64;
    let w = ((student.len() * bs) as f64 / t, lab_bs as f64 / t);
    let targets = dino_targets(teacher, &center.center, teacher_temp)?;
    let (unlab, d_student) =
        dino_student_loss(student, &targets, cfg.student_temperature, T::c(w.0))?;
    let mut total = T::c(w.0) * unlab;
    let (lab_loss, d_lab) = match lab {
        Some((s, y)) => {
            let params = CrossEntropyParams {
                temperature: cfg.student_temperature,
                label_smoothing: cfg.label_smoothing,
            };
            let (l, ctx) = cross_entropy_forward(s, y, params)?;
            total += T::c(w.1) * l;
            (Some(l), Some(cross_entropy_backward(T::c(w.1), y, &ctx)?))
        }
        None => (None, None),
    };
    center.update(teacher, comm)?;
    Ok(DainoLoss {
        total,
        unlab,
        lab: lab_loss,
        weights: w,
        d_student,
        d_lab,
    })
}
