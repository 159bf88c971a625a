//! Build script. The CUDA kernels of `kernels/` are compiled here (NVRTC/nvcc to PTX and an sm_90
//! cubin, embedded) once the CUDA backend lands; until then the script only tells cargo which
//! inputs matter, so that a change under kernels/ rebuilds the crate.
fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
}
