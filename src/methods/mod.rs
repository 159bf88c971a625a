//! The two methods' losses on top of the model outputs: Suave (SwAV swapped prediction with
//! Sinkhorn codes and a queue, plus labels) and Daino (DINO self-distillation with a centred
//! teacher, plus labels). Each loss is a pure function from scores to (loss, gradients w.r.t.
//! the scores); targets (codes, teacher outputs, labels) are constants, as in the official code.
//! Cross-rank sums go through [`crate::dist::Communicator`].

pub mod dino_loss;
pub mod queue;
pub mod sinkhorn;
pub mod suave_loss;

pub use dino_loss::{
    daino_loss, dino_student_loss, dino_targets, teacher_temperature, DainoConfig, DainoLoss,
    DinoCenter,
};
pub use queue::Queue;
pub use sinkhorn::{sinkhorn, SinkhornParams};
pub use suave_loss::{
    suave_codes, suave_loss, Labelled, Mixed, MixedCount, SuaveConfig, SuaveLoss, SuaveWeights,
};
