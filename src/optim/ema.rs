//! DINO's teacher update: θ_t ← m·θ_t + (1 − m)·θ_s after every optimiser step (spec §2.5).
//!
//! DINO zips `student.parameters()` with `teacher.parameters()`: every *parameter*, trainable
//! or not (the teacher's are all frozen; its `last_layer.weight_g` follows the student's even
//! though the student's copy is the only trainable one), and no buffers. The engine matches by
//! name instead of by position, so a difference in registration order cannot silently pair the
//! wrong tensors, and errors when the two parameter sets or shapes differ. Arithmetic is
//! PyTorch's `mul_(m).add_((1 − m)·θ_s)`: both scalars rounded to f32, elementwise f32.

use crate::error::{Error, Result};
use crate::nn::{Kind, ParamStore};
use rayon::prelude::*;

/// Moves every parameter of `teacher` towards the same-named parameter of `student` with
/// momentum `m` (from [`crate::optim::CosineSchedule::dino_teacher_momentum`]). Buffers are left
/// alone. Errors, without changing anything, when names or shapes do not match.
pub fn ema_update(teacher: &mut ParamStore, student: &ParamStore, m: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&m) {
        return Err(Error::invalid(
            "ema_update",
            format!("momentum {m} is outside [0, 1]"),
        ));
    }
    let is_param = |k: Kind| matches!(k, Kind::Param { .. });
    let n_student = student
        .entries()
        .iter()
        .filter(|e| is_param(e.kind))
        .count();
    let n_teacher = teacher
        .entries()
        .iter()
        .filter(|e| is_param(e.kind))
        .count();
    let mut pairs = Vec::with_capacity(n_teacher);
    for (i, e) in teacher.entries().iter().enumerate() {
        if !is_param(e.kind) {
            continue;
        }
        let s = student
            .id(&e.name)
            .map(|id| student.entry(id))
            .filter(|s| is_param(s.kind))
            .ok_or_else(|| {
                Error::shape(
                    "ema_update",
                    format!("teacher parameter {} has no student parameter", e.name),
                )
            })?;
        if s.value.shape() != e.value.shape() {
            return Err(Error::shape(
                "ema_update",
                format!(
                    "{}: teacher {:?} vs student {:?}",
                    e.name,
                    e.value.shape(),
                    s.value.shape()
                ),
            ));
        }
        pairs.push((i, s.value.data()));
    }
    if n_student != n_teacher {
        return Err(Error::shape(
            "ema_update",
            format!("student has {n_student} parameters, teacher {n_teacher}"),
        ));
    }
    let a = m as f32;
    let b = (1.0 - m) as f32;
    let mut targets: Vec<Option<&[f32]>> = vec![None; teacher.len()];
    for (i, s) in pairs {
        targets[i] = Some(s);
    }
    teacher
        .entries_mut()
        .par_iter_mut()
        .zip(targets)
        .for_each(|(e, s)| {
            if let Some(s) = s {
                for (t, &sv) in e.value.data_mut().iter_mut().zip(s) {
                    *t = *t * a + b * sv;
                }
            }
        });
    Ok(())
}
