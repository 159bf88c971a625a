//! Models, with torchvision / timm / official parameter names so that weights interoperate:
//! ResNet-50 with the Suave heads (projection head, prototypes, online heads; Suave's multi-crop
//! forward), and ViT-S/16 with the Daino (DINO) head and DINO's multi-crop wrapper.

pub mod backbone;
pub mod daino_head;
pub mod device;
pub mod resnet;
pub mod suave_head;
pub mod vit;
