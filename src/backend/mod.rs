//! Execution backends. `cpu` holds the reference implementation of every op (forward and
//! backward), generic over f32/f64; the CUDA backend mirrors it op family by op family.

pub mod cpu;
pub mod cuda;
pub mod device;
pub mod emu;
pub mod kernels;
