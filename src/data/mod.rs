//! The data pipeline: ImageNet-layout datasets and label lists, CPU decoding, the Suave and Daino
//! augmentations (multi-crop), Mixup/CutMix, and a deterministic multi-threaded loader.
//!
//! Every random draw comes from [`crate::rng::Rng`] keyed by (seed, epoch, rank, sample), so the
//! batches of a run do not depend on the number of worker threads or on timing. Parameters are
//! sampled separately from their application: the transforms in [`transforms`] are pure functions
//! of the image and explicit parameters, which is how they are checked against torchvision.

pub mod augment;
pub mod dataset;
pub mod decode;
pub mod embedded;
pub mod error;
pub mod image;
pub mod loader;
pub mod mixup;
pub mod transforms;

pub use dataset::{Dataset, LabelSpec, Sample, SemiSupervised};
pub use decode::{decode_bytes, decode_file, decode_files};
pub use error::{DataError, DataResult};
pub use image::Image;
pub use loader::{BadInput, Batch, BatchKind, CyclingLoader, EpochLoader, LoaderConfig};
