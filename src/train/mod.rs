//! Training: the resolved configuration and presets (`config`), one iteration of each method
//! (`suave`, `daino`), metrics, checkpoints, the loop with evaluation and resume (`run`), the
//! progress display and the curves (`plot`).

pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod daino;
pub mod metrics;
pub mod plot;
pub mod progress;
pub mod run;
pub mod suave;

pub use config::{Arch, Method, TrainConfig};
pub use run::{train, train_with, RunOptions, RunSummary};

use crate::backend::cpu::loss::one_hot;
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Rows `start..start + n` of a `[N, D]` tensor, as a new tensor (a view's scores or logits).
pub(crate) fn rows(t: &Tensor<f32>, start: usize, n: usize) -> Result<Tensor<f32>> {
    let d = t.numel() / t.dim(0).max(1);
    if start + n > t.dim(0) {
        return Err(Error::shape(
            "rows",
            format!("rows {start}..{} of {:?}", start + n, t.shape()),
        ));
    }
    Tensor::from_vec(t.data()[start * d..(start + n) * d].to_vec(), &[n, d])
}

/// The labelled batch as both methods consume it: the input (with its mixed copies in
/// "extend" mode), the targets over `k` classes (mixup's soft targets, else one-hot), and the
/// number of un-mixed rows (`lab_bs_no_mixed`, which come first).
pub(crate) fn labelled_input<'a>(
    op: &'static str,
    lab: &'a Batch,
    k: usize,
) -> Result<(&'a Tensor<f32>, Tensor<f32>, usize)> {
    let x = lab
        .views
        .first()
        .ok_or_else(|| Error::invalid(op, "empty labelled batch"))?;
    let targets = match &lab.targets {
        Some(t) => t.clone(),
        None => one_hot::<f32>(&lab.labels, k)?,
    };
    Ok((x, targets, lab.labels.len()))
}
