//! The CPU backend: every op the ResNet-50 / ViT-S/16 graphs and the Suave / Daino losses need,
//! forward and backward, written once generic over [`Float`](crate::tensor::Float) (f32 for
//! training, f64 for gradient checks) and parallel with rayon.
//!
//! One file per op family, mirroring `kernels/<family>.cu` and `src/backend/cuda/<family>.rs`.
//! Each forward returns its output plus, where the backward needs it, a small saved context
//! (batch-norm statistics, max-pool arg-max, attention probabilities); each backward takes the
//! upstream gradient and returns the gradients of the inputs and parameters.

pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod interp;
pub mod linear;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod pool;
pub mod softmax;
