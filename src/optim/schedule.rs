//! Per-iteration schedules of the official Suave and Daino training scripts.
//!
//! Both methods use the same shape: an inclusive `np.linspace` warm-up followed by a half cosine
//! (DINO's `utils.cosine_scheduler`; SwAV/Suave build the identical array inline in
//! `main_suave.py`). Values are computed on demand from the iteration index with the same f64
//! operations, in the same order, as the numpy code, so they agree with the official arrays to
//! the last ulp of `cos` (the Suave schedule would be a 4 MB array of 500,400 floats otherwise).
//!
//! Conventions that matter for matching (spec §7.3): the warm-up is inclusive at both ends, so
//! iteration 0 gets `start_warmup` and the last warm-up iteration gets `base`; the cosine index
//! runs `t = 0 … T−1` over `T` iterations, so `final` is approached but never reached. The
//! teacher temperature is the one schedule indexed by *epoch*.

use crate::error::{Error, Result};

/// `np.linspace(start, stop, num)[i]`: `start + i·step` with `step = (stop − start)/(num − 1)`,
/// and the last point set to `stop` exactly, as numpy does.
fn linspace_at(start: f64, stop: f64, num: usize, i: usize) -> f64 {
    if num == 1 {
        return start;
    }
    if i == num - 1 {
        return stop;
    }
    let div = (num - 1) as f64;
    let step = (stop - start) / div;
    if step == 0.0 {
        // numpy's branch for a zero step: y = i / div · delta.
        return (i as f64) / div * (stop - start) + start;
    }
    (i as f64) * step + start
}

/// A linear warm-up then a half-cosine decay, one value per iteration.
///
/// This is DINO's `cosine_scheduler(base_value, final_value, epochs, niter_per_ep,
/// warmup_epochs, start_warmup_value)` and Suave's learning-rate array, which is the same
/// function written inline.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CosineSchedule {
    base: f64,
    final_value: f64,
    start_warmup: f64,
    warmup_iters: usize,
    total_iters: usize,
}

impl CosineSchedule {
    /// `cosine_scheduler(base, final_value, epochs, niter_per_ep, warmup_epochs, start_warmup)`.
    ///
    /// Errors when there are no iterations or the warm-up is longer than training (numpy would
    /// fail the official `assert len(schedule) == epochs * niter_per_ep`).
    pub fn new(
        base: f64,
        final_value: f64,
        epochs: usize,
        niter_per_ep: usize,
        warmup_epochs: usize,
        start_warmup: f64,
    ) -> Result<Self> {
        let total_iters = epochs.checked_mul(niter_per_ep).ok_or_else(|| {
            Error::invalid("CosineSchedule", "epochs × iterations overflows usize")
        })?;
        if total_iters == 0 {
            return Err(Error::invalid(
                "CosineSchedule",
                format!("no iterations (epochs {epochs}, iterations per epoch {niter_per_ep})"),
            ));
        }
        if warmup_epochs > epochs {
            return Err(Error::invalid(
                "CosineSchedule",
                format!("{warmup_epochs} warm-up epochs exceed {epochs} epochs"),
            ));
        }
        if !(base.is_finite() && final_value.is_finite() && start_warmup.is_finite()) {
            return Err(Error::invalid("CosineSchedule", "non-finite value"));
        }
        Ok(CosineSchedule {
            base,
            final_value,
            start_warmup,
            warmup_iters: warmup_epochs * niter_per_ep,
            total_iters,
        })
    }

    /// Suave's learning rate (`main_suave.py`, spec §1.10): linspace(start_warmup, base, N·W),
    /// then `final + ½(base − final)(1 + cos(π t / (N·(E − W))))`.
    pub fn suave_lr(
        base_lr: f64,
        final_lr: f64,
        epochs: usize,
        niter_per_ep: usize,
        warmup_epochs: usize,
        start_warmup: f64,
    ) -> Result<Self> {
        Self::new(
            base_lr,
            final_lr,
            epochs,
            niter_per_ep,
            warmup_epochs,
            start_warmup,
        )
    }

    /// Daino's (DINO's) learning rate: the linear-scaling rule `lr · (batch_per_gpu · world) / 256`
    /// on the *unlabelled* per-GPU batch (spec §2.5), warm-up from 0, cosine to `min_lr`.
    pub fn dino_lr(
        lr: f64,
        batch_per_gpu: usize,
        world: usize,
        min_lr: f64,
        epochs: usize,
        niter_per_ep: usize,
        warmup_epochs: usize,
    ) -> Result<Self> {
        // Same operation order as `args.lr * (args.batch_size_per_gpu * world_size) / 256.`
        let base = lr * ((batch_per_gpu * world) as f64) / 256.0;
        Self::new(base, min_lr, epochs, niter_per_ep, warmup_epochs, 0.0)
    }

    /// Daino's weight decay of parameter group 0: cosine `wd → wd_end` without warm-up.
    pub fn dino_weight_decay(
        wd: f64,
        wd_end: f64,
        epochs: usize,
        niter_per_ep: usize,
    ) -> Result<Self> {
        Self::new(wd, wd_end, epochs, niter_per_ep, 0, 0.0)
    }

    /// Daino's teacher momentum: cosine `momentum_teacher → 1` without warm-up.
    pub fn dino_teacher_momentum(
        momentum_teacher: f64,
        epochs: usize,
        niter_per_ep: usize,
    ) -> Result<Self> {
        Self::new(momentum_teacher, 1.0, epochs, niter_per_ep, 0, 0.0)
    }

    /// Number of iterations the schedule covers (`epochs · niter_per_ep`).
    pub fn len(&self) -> usize {
        self.total_iters
    }

    /// Never true: construction rejects empty schedules. Present for clippy's `len` convention.
    pub fn is_empty(&self) -> bool {
        self.total_iters == 0
    }

    /// The value at global iteration `it` (= epoch · niter_per_ep + iteration in the epoch).
    ///
    /// Errors past the end, where the official array would raise `IndexError`.
    pub fn at(&self, it: usize) -> Result<f64> {
        if it >= self.total_iters {
            return Err(Error::invalid(
                "CosineSchedule::at",
                format!("iteration {it} is past the schedule's {}", self.total_iters),
            ));
        }
        if it < self.warmup_iters {
            return Ok(linspace_at(
                self.start_warmup,
                self.base,
                self.warmup_iters,
                it,
            ));
        }
        let t = (it - self.warmup_iters) as f64;
        let len = (self.total_iters - self.warmup_iters) as f64;
        // final + 0.5 * (base - final) * (1 + cos(pi * t / len)), left to right as numpy.
        Ok(self.final_value
            + 0.5 * (self.base - self.final_value) * (1.0 + (std::f64::consts::PI * t / len).cos()))
    }

    /// The whole array, as the official code materialises it.
    pub fn values(&self) -> Vec<f64> {
        (0..self.total_iters)
            .map(|i| self.at(i).unwrap_or(f64::NAN))
            .collect()
    }
}

/// DINO's teacher temperature (`DINOLoss.teacher_temp_schedule`), indexed by **epoch**:
/// `linspace(warmup_temp, temp, warmup_epochs)` then `temp` for the remaining epochs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TeacherTempSchedule {
    warmup_temp: f64,
    temp: f64,
    warmup_epochs: usize,
    epochs: usize,
}

impl TeacherTempSchedule {
    /// Daino: `TeacherTempSchedule::new(0.04, 0.07, 10, 60)`.
    pub fn new(warmup_temp: f64, temp: f64, warmup_epochs: usize, epochs: usize) -> Result<Self> {
        if warmup_epochs > epochs || epochs == 0 {
            return Err(Error::invalid(
                "TeacherTempSchedule",
                format!("{warmup_epochs} warm-up epochs for {epochs} epochs"),
            ));
        }
        if !(warmup_temp > 0.0 && temp > 0.0) {
            return Err(Error::invalid(
                "TeacherTempSchedule",
                format!("temperatures must be positive ({warmup_temp}, {temp})"),
            ));
        }
        Ok(TeacherTempSchedule {
            warmup_temp,
            temp,
            warmup_epochs,
            epochs,
        })
    }

    /// Number of epochs covered.
    pub fn len(&self) -> usize {
        self.epochs
    }

    /// Never true (construction rejects zero epochs).
    pub fn is_empty(&self) -> bool {
        self.epochs == 0
    }

    /// The temperature of `epoch`; errors past the last epoch.
    pub fn at(&self, epoch: usize) -> Result<f64> {
        if epoch >= self.epochs {
            return Err(Error::invalid(
                "TeacherTempSchedule::at",
                format!("epoch {epoch} is past the schedule's {}", self.epochs),
            ));
        }
        if epoch < self.warmup_epochs {
            return Ok(linspace_at(
                self.warmup_temp,
                self.temp,
                self.warmup_epochs,
                epoch,
            ));
        }
        Ok(self.temp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_is_inclusive_and_cosine_never_reaches_final() {
        let s = CosineSchedule::new(1.0, 0.0, 3, 4, 1, 0.0).unwrap();
        assert_eq!(s.at(0).unwrap(), 0.0);
        assert_eq!(s.at(3).unwrap(), 1.0);
        assert_eq!(s.at(4).unwrap(), 1.0);
        assert!(s.at(11).unwrap() > 0.0);
        assert!(s.at(12).is_err());
        assert_eq!(s.values().len(), 12);
        assert!(CosineSchedule::new(1.0, 0.0, 1, 4, 2, 0.0).is_err());
        assert!(CosineSchedule::new(1.0, 0.0, 0, 4, 0, 0.0).is_err());
    }

    #[test]
    fn teacher_temperature_by_epoch() {
        let s = TeacherTempSchedule::new(0.04, 0.07, 10, 60).unwrap();
        assert_eq!(s.at(0).unwrap(), 0.04);
        assert_eq!(s.at(9).unwrap(), 0.07);
        assert_eq!(s.at(59).unwrap(), 0.07);
        assert!(s.at(60).is_err());
    }
}
