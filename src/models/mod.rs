//! Models: the ViT-S/16 backbone with the Daino (DINO) head and its multi-crop wrapper.

pub mod daino_head;
pub mod vit;
