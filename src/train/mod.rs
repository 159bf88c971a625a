//! Training: the trainer loop (the lead's), its progress display and the metrics plot.

pub mod plot;
pub mod progress;
