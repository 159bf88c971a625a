//! Execution backends. `cpu` holds the reference implementation of every op (forward and
//! backward), generic over f32/f64. The engine's own CUDA kernels (`kernels/*.cu`, table in
//! `kernels`) have one safe wrapper each in `device`, generic over where they run: the GPU
//! (`cuda`: runtime, libraries, the GPU check) or the CPU emulation of one (`emu`: the same
//! sources compiled with g++), which is how the tests check them against `cpu`.

pub mod cpu;
pub mod cuda;
pub mod device;
pub mod emu;
pub mod kernels;
