//! Models: the backbones with torchvision / timm parameter names and the method heads
//! (`suave_head`: projection head, prototypes and online heads on a ResNet, with Suave's
//! multi-crop forward).

pub mod resnet;
pub mod suave_head;
