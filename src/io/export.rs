//! Backbone export for the PyTorch ecosystem: a safetensors file that
//! `torchvision.models.resnet50()` or timm's `vit_small_patch16_224` loads with
//! `load_state_dict(safetensors.torch.load_file(path), strict=True)`.
//!
//! The exported key set is not "whatever the store has": it is the reference model's exact
//! state dict ([`backbone_keys`], checked in the tests against the one torchvision and timm
//! print), so a missing or extra entry is caught here and not in someone's PyTorch session.
//! BN counters are written as int64 as PyTorch keeps them; convolution weights are converted
//! to O×I×KH×KW.

use super::import::Mismatch;
use super::safetensors::{write_tensors, FileTensor};
use super::{format_err, to_pytorch_layout};
use crate::error::Result;
use crate::nn::ParamStore;
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::path::Path;

/// A backbone the engine trains, named after the PyTorch model that loads the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// `torchvision.models.resnet50()` (Suave's backbone; SwAV's names are torchvision's).
    ResNet50,
    /// `timm.create_model("vit_small_patch16_224")` (Daino's backbone; DINO's names are timm's).
    VitSmallPatch16,
}

impl Arch {
    /// Width of the pooled feature the classifier reads.
    pub fn feature_dim(self) -> usize {
        match self {
            Arch::ResNet50 => 2048,
            Arch::VitSmallPatch16 => 384,
        }
    }

    /// Names of the classifier's weight and bias in the reference model.
    pub fn classifier_names(self) -> (&'static str, &'static str) {
        match self {
            Arch::ResNet50 => ("fc.weight", "fc.bias"),
            Arch::VitSmallPatch16 => ("head.weight", "head.bias"),
        }
    }
}

/// The classifier written with the backbone.
#[derive(Clone, Debug)]
pub enum Classifier {
    /// None: for `resnet50(); model.fc = nn.Identity()` or timm's `num_classes=0`.
    None,
    /// Zeros of the reference shapes (`num_classes × feature_dim`, `num_classes`): what
    /// `resnet50(num_classes=...)` needs for strict loading when the method has no linear
    /// classifier (Suave and Daino predict with prototypes); fine-tuning then trains it.
    Zeros { num_classes: usize },
    /// A trained linear classifier (`num_classes × feature_dim` weight, `num_classes` bias).
    Given {
        weight: Tensor<f32>,
        bias: Tensor<f32>,
    },
}

fn push_bn(keys: &mut Vec<(String, Vec<usize>)>, name: &str, c: usize) {
    for p in ["weight", "bias", "running_mean", "running_var"] {
        keys.push((format!("{name}.{p}"), vec![c]));
    }
    keys.push((format!("{name}.num_batches_tracked"), vec![]));
}

/// The reference model's state-dict entries without the classifier, in its order, with
/// PyTorch shapes.
pub fn backbone_keys(arch: Arch) -> Vec<(String, Vec<usize>)> {
    let mut k: Vec<(String, Vec<usize>)> = Vec::new();
    match arch {
        Arch::ResNet50 => {
            k.push(("conv1.weight".into(), vec![64, 3, 7, 7]));
            push_bn(&mut k, "bn1", 64);
            let mut inp = 64;
            for (li, (blocks, width)) in [(3, 64), (4, 128), (6, 256), (3, 512)]
                .into_iter()
                .enumerate()
            {
                for b in 0..blocks {
                    let p = format!("layer{}.{b}", li + 1);
                    let out = width * 4;
                    k.push((format!("{p}.conv1.weight"), vec![width, inp, 1, 1]));
                    push_bn(&mut k, &format!("{p}.bn1"), width);
                    k.push((format!("{p}.conv2.weight"), vec![width, width, 3, 3]));
                    push_bn(&mut k, &format!("{p}.bn2"), width);
                    k.push((format!("{p}.conv3.weight"), vec![out, width, 1, 1]));
                    push_bn(&mut k, &format!("{p}.bn3"), out);
                    if b == 0 {
                        k.push((format!("{p}.downsample.0.weight"), vec![out, inp, 1, 1]));
                        push_bn(&mut k, &format!("{p}.downsample.1"), out);
                    }
                    inp = out;
                }
            }
        }
        Arch::VitSmallPatch16 => {
            let d = 384;
            k.push(("cls_token".into(), vec![1, 1, d]));
            k.push(("pos_embed".into(), vec![1, 197, d]));
            k.push(("patch_embed.proj.weight".into(), vec![d, 3, 16, 16]));
            k.push(("patch_embed.proj.bias".into(), vec![d]));
            for b in 0..12 {
                let p = format!("blocks.{b}");
                k.push((format!("{p}.norm1.weight"), vec![d]));
                k.push((format!("{p}.norm1.bias"), vec![d]));
                k.push((format!("{p}.attn.qkv.weight"), vec![3 * d, d]));
                k.push((format!("{p}.attn.qkv.bias"), vec![3 * d]));
                k.push((format!("{p}.attn.proj.weight"), vec![d, d]));
                k.push((format!("{p}.attn.proj.bias"), vec![d]));
                k.push((format!("{p}.norm2.weight"), vec![d]));
                k.push((format!("{p}.norm2.bias"), vec![d]));
                k.push((format!("{p}.mlp.fc1.weight"), vec![4 * d, d]));
                k.push((format!("{p}.mlp.fc1.bias"), vec![4 * d]));
                k.push((format!("{p}.mlp.fc2.weight"), vec![d, 4 * d]));
                k.push((format!("{p}.mlp.fc2.bias"), vec![d]));
            }
            k.push(("norm.weight".into(), vec![d]));
            k.push(("norm.bias".into(), vec![d]));
        }
    }
    k
}

/// Builds the exported tensors (PyTorch names, layouts and dtypes) from the store entries named
/// `prefix + <reference name>` (e.g. prefix `"backbone."` for Daino's student, `""` for Suave).
///
/// Missing `num_batches_tracked` counters are written as 0 (a model may not track them); any
/// other missing or mis-shaped entry is an error listing them (first ten of each).
pub fn backbone_tensors(
    store: &ParamStore,
    arch: Arch,
    prefix: &str,
    classifier: &Classifier,
) -> Result<BTreeMap<String, FileTensor>> {
    let mut out = BTreeMap::new();
    let mut missing = Vec::new();
    let mut mismatched = Vec::new();
    for (name, shape) in backbone_keys(arch) {
        let full = format!("{prefix}{name}");
        let Some(id) = store.id(&full) else {
            if name.ends_with(".num_batches_tracked") {
                out.insert(
                    name,
                    FileTensor::I64 {
                        shape: vec![],
                        data: vec![0],
                    },
                );
            } else {
                missing.push(format!("{full} {shape:?}"));
            }
            continue;
        };
        let e = store.entry(id);
        let t = match to_pytorch_layout(e.layout, &e.value) {
            Ok(t) if t.shape() == shape.as_slice() => t,
            // A scalar counter may be stored as [1].
            Ok(t) if name.ends_with(".num_batches_tracked") && t.numel() == 1 => t,
            _ => {
                mismatched.push(Mismatch {
                    name: full,
                    expected: shape,
                    found: super::pytorch_shape(e.layout, e.value.shape()),
                });
                continue;
            }
        };
        let ft = if name.ends_with(".num_batches_tracked") {
            FileTensor::I64 {
                shape: vec![],
                data: vec![t.data()[0].round() as i64],
            }
        } else {
            FileTensor::F32(t)
        };
        out.insert(name, ft);
    }
    if !missing.is_empty() || !mismatched.is_empty() {
        let mut msg = format!(
            "cannot export a {arch:?} backbone from entries prefixed {prefix:?}: {} missing, {} \
             mis-shaped",
            missing.len(),
            mismatched.len()
        );
        for m in missing.iter().take(10) {
            msg.push_str(&format!("\n    missing {m}"));
        }
        for m in mismatched.iter().take(10) {
            msg.push_str(&format!(
                "\n    mis-shaped {} (torch {:?}, store {:?})",
                m.name, m.expected, m.found
            ));
        }
        return Err(crate::error::Error::invalid("export", msg));
    }
    let (wn, bn) = arch.classifier_names();
    let f = arch.feature_dim();
    match classifier {
        Classifier::None => {}
        Classifier::Zeros { num_classes } => {
            out.insert(
                wn.into(),
                FileTensor::F32(Tensor::zeros(&[*num_classes, f])),
            );
            out.insert(bn.into(), FileTensor::F32(Tensor::zeros(&[*num_classes])));
        }
        Classifier::Given { weight, bias } => {
            let c = bias.numel();
            if weight.shape() != [c, f] || bias.shape() != [c] {
                return Err(crate::error::Error::shape(
                    "export",
                    format!(
                        "classifier weight {:?} / bias {:?}: expected [C, {f}] / [C]",
                        weight.shape(),
                        bias.shape()
                    ),
                ));
            }
            out.insert(wn.into(), FileTensor::F32(weight.clone()));
            out.insert(bn.into(), FileTensor::F32(bias.clone()));
        }
    }
    Ok(out)
}

/// Writes a backbone file for torchvision / timm (see [`backbone_tensors`]) atomically, with
/// `metadata` plus `format = pt` (what Hugging Face tooling looks for). Returns the names
/// written.
pub fn export_backbone(
    store: &ParamStore,
    arch: Arch,
    prefix: &str,
    classifier: &Classifier,
    path: &Path,
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<String>> {
    let tensors = backbone_tensors(store, arch, prefix, classifier)
        .map_err(|e| format_err(path, e.to_string()))?;
    let mut meta = metadata.clone();
    meta.entry("format".into()).or_insert_with(|| "pt".into());
    write_tensors(path, &tensors, &meta)?;
    Ok(tensors.into_keys().collect())
}
