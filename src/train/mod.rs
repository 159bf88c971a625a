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
pub use run::{train, RunOptions, RunSummary};
