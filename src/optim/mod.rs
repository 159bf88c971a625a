//! Optimisers, schedules and the teacher EMA of the two methods.
//!
//! * [`lars`]: Suave's LARS (apex `LARC(SGD)` semantics, spec §1.10), ResNet-50.
//! * [`adamw`]: Daino's AdamW (`torch.optim.AdamW`) with DINO's two parameter groups (spec §2.5).
//! * [`schedule`]: the per-iteration learning-rate / weight-decay / momentum schedules and the
//!   per-epoch teacher temperature, exactly as the official numpy code builds them.
//! * [`ema`]: DINO's teacher update over parameters (not buffers).
//!
//! Optimisers act on the trainable entries of a [`crate::nn::ParamStore`] and keep their state
//! keyed by parameter name (the PyTorch state-dict key), so checkpoints can save and restore it
//! independently of registration order. Master weights and state are f32, updates elementwise
//! in f32 as PyTorch does; only reductions (LARS norms) are accumulated in f64.

pub mod adamw;
pub mod ema;
pub mod lars;
pub mod schedule;

pub use adamw::{dino_group, AdamW, AdamWState};
pub use ema::ema_update;
pub use lars::Lars;
pub use schedule::{CosineSchedule, TeacherTempSchedule};
