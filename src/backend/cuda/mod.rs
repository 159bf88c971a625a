//! The CUDA backend: device detection, a context with one compute stream and a caching
//! allocator, kernel modules, cuBLASLt GEMMs, cuDNN convolutions, nvJPEG decoding, and the GPU
//! check that compares every GPU op with the CPU backend.
//!
//! Everything CUDA is loaded at run time (`cudarc` with `dynamic-loading`, nvJPEG through
//! `libloading`), so the binary builds and runs on machines with no CUDA at all. The entry point
//! is [`probe`] / [`gpu_available`]: they never panic and are cached, and every other function
//! here assumes they said yes. `cudarc::driver::CudaContext::new` panics when libcuda is missing,
//! which is why nothing else may be called first.
//!
//! Where the files are: detection in `device.rs`; the [`Gpu`] context (stream, events, timing)
//! in `context.rs`; the caching allocator and device buffers in `alloc.rs`; kernel loading and
//! launching in `module.rs`; library wrappers in `cublaslt.rs`, `cudnn.rs`, `nvjpeg.rs`; the
//! GPU check in `check.rs` (its rows for the own kernels are the device ops' rows,
//! `backend::device::<family>::check_rows`); `exec.rs` makes the [`Gpu`] an
//! `backend::device::Exec`, on which the own kernels' device ops run.

pub mod alloc;
pub mod check;
pub mod context;
pub mod cublaslt;
pub mod cudnn;
pub mod device;
pub mod exec;
pub mod module;
pub mod nvjpeg;

pub use alloc::{AllocStats, DeviceBuffer};
pub use check::{run_check, CheckOptions, CheckReport, CheckRow};
pub use context::Gpu;
/// The trait that gives kernel launch builders their `.arg(..)` method.
pub use cudarc::driver::PushKernelArg;
pub use device::{gpu_available, probe, DeviceChoice, DeviceInfo, Probe};
pub use module::{Kernel, LaunchDims};

use crate::error::Error;

/// An engine error for a failed CUDA call: `op` names the engine operation, `what` the call or
/// object, and `err` is the library's own error (its name, e.g. `CUDA_ERROR_OUT_OF_MEMORY`).
pub(crate) fn cuda_err(
    op: &'static str,
    what: impl std::fmt::Display,
    err: impl std::fmt::Debug,
) -> Error {
    Error::invalid(op, format!("{what}: {err:?}"))
}
