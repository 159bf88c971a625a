//! sdengine: a training engine for the semi-supervised methods Suave (SwAV + labels, ResNet-50)
//! and Daino (DINO + labels, ViT-S/16).
//!
//! The crate is organised as `../shared/DESIGN.md` lays out: tensors (`tensor`), the CPU backend
//! with every op's forward and backward (`backend::cpu`), a deterministic splittable generator
//! (`rng`), and test helpers (`testing`). Models, data, methods, training, CUDA and distribution
//! grow on top of these.

pub mod backend;
pub mod bench;
pub mod data;
pub mod dist;
pub mod error;
pub mod io;
pub mod methods;
pub mod models;
pub mod nn;
pub mod optim;
pub mod rng;
pub mod tensor;
pub mod testing;
pub mod train;

pub use error::{Error, Result};
pub use tensor::{Device, Tensor};
