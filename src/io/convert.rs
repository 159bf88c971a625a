//! The `sdengine import` / `sdengine export` conversions: official PyTorch checkpoints into engine
//! weights for a Suave or Daino model, and engine weights into backbone files that torchvision's
//! `resnet50()` and timm's `vit_small_patch16_224` load with `strict=True`.

use super::export::{export_backbone, Arch, Classifier};
use super::import::{load_into, read_dino_init, read_swav_init, ImportOptions, ImportReport};
use super::safetensors::{read_tensors, save_store};
use crate::error::{Error, Result};
use crate::models::daino_head::{DinoHeadConfig, MultiCropWrapper};
use crate::models::resnet::{ResNet, ResNetConfig};
use crate::models::suave_head::{SuaveHeadConfig, SuaveNet};
use crate::models::vit::{Vit, VitConfig};
use crate::nn::ParamStore;
use std::collections::BTreeMap;
use std::path::Path;

/// Which official checkpoint an import reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `swav_800ep_pretrain.pth.tar` (or a Suave checkpoint): ResNet-50 + Suave heads.
    Swav,
    /// `dino_deitsmall16_pretrain_full_checkpoint.pth`: its `student`, ViT-S/16 + Daino head.
    Dino,
}

/// Builds the model an import fills: the full Suave (ResNet-50 + heads) or Daino (ViT-S/16 +
/// head) parameter store with `classes` prototypes, freshly initialised (what the official
/// init leaves in place for the entries the checkpoint does not provide).
pub fn fresh_model(source: Source, classes: usize, seed: u64) -> Result<ParamStore> {
    let mut store = ParamStore::new();
    match source {
        Source::Swav => {
            let head = SuaveHeadConfig {
                n_prototypes: classes,
                n_classes: classes,
                ..SuaveHeadConfig::default()
            };
            SuaveNet::new(&mut store, ResNetConfig::resnet50(), head, seed)?;
        }
        Source::Dino => {
            let head = DinoHeadConfig {
                out_dim: classes,
                ..DinoHeadConfig::daino(384)
            };
            MultiCropWrapper::new(&mut store, VitConfig::vit_small(), head, seed)?;
        }
    }
    Ok(store)
}

/// Reads an official checkpoint, applies the official init rules (prototypes dropped; the head
/// dropped unless `keep_head`), loads it into a fresh model as the official code does
/// (`strict=False`: entries the file lacks keep their init; anything unexpected or mis-shaped is
/// an error that lists it), and writes the engine weights to `output` atomically.
pub fn import_checkpoint(
    source: Source,
    checkpoint: &Path,
    output: &Path,
    keep_head: bool,
    classes: usize,
) -> Result<ImportReport> {
    let map = match source {
        Source::Swav => read_swav_init(checkpoint, keep_head)?,
        Source::Dino => read_dino_init(checkpoint, keep_head)?,
    };
    let mut store = fresh_model(source, classes, 0)?;
    let report = load_into(
        &mut store,
        map,
        &ImportOptions::official_init(),
        &checkpoint.display().to_string(),
    )?;
    if report.loaded.is_empty() {
        return Err(Error::Format {
            path: checkpoint.display().to_string(),
            detail: "no tensor of the checkpoint matches the model: is it the right --from?".into(),
        });
    }
    let mut meta = BTreeMap::new();
    meta.insert("source".into(), checkpoint.display().to_string());
    meta.insert(
        "model".into(),
        match source {
            Source::Swav => "suave-resnet50",
            Source::Dino => "daino-vit_small",
        }
        .into(),
    );
    save_store(output, &store, &meta)?;
    Ok(report)
}

/// The classifier an export writes (`fc` for torchvision, `head` for timm).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportClassifier {
    /// None: the file fits `resnet50(num_classes=...)` with `fc` replaced, or timm's
    /// `num_classes=0`, or `strict=False`.
    Omit,
    /// A `classes`-way classifier so that `strict=True` loading into the default constructors
    /// works: Suave's online linear head on the backbone features (`cls_heads.0`, trained with
    /// the labels) when the weights have one of that size, zeros otherwise.
    Include { classes: usize },
}

/// Writes the backbone of engine weights `weights` (an import's output, or a training
/// checkpoint's model file) as a torchvision ResNet-50 or timm ViT-S/16 state dict in
/// safetensors. ViT weights may carry DINO's `backbone.` prefix or bare timm names. Returns the
/// number of tensors written.
pub fn export_weights(
    arch: Arch,
    weights: &Path,
    output: &Path,
    classifier: ExportClassifier,
) -> Result<usize> {
    let (tensors, _) = read_tensors(weights)?;
    let classifier = match classifier {
        ExportClassifier::Omit => Classifier::None,
        ExportClassifier::Include { classes } => {
            let f = arch.feature_dim();
            match (
                tensors.get("cls_heads.0.weight"),
                tensors.get("cls_heads.0.bias"),
            ) {
                (Some(w), Some(b)) if w.shape() == [classes, f] && b.shape() == [classes] => {
                    Classifier::Given {
                        weight: w.clone(),
                        bias: b.clone(),
                    }
                }
                _ => Classifier::Zeros {
                    num_classes: classes,
                },
            }
        }
    };
    let prefix = match arch {
        Arch::ResNet50 => "",
        Arch::VitSmallPatch16 => {
            if tensors.keys().any(|k| k.starts_with("backbone.")) {
                "backbone."
            } else {
                ""
            }
        }
    };
    let mut store = ParamStore::new();
    match arch {
        Arch::ResNet50 => {
            ResNet::new(&mut store, ResNetConfig::resnet50(), 0)?;
        }
        Arch::VitSmallPatch16 => {
            // `Vit::new` takes the prefix without its trailing dot.
            Vit::new(
                &mut store,
                prefix.trim_end_matches('.'),
                VitConfig::vit_small(),
                0,
            )?;
        }
    }
    // The backbone must be complete; heads and anything else in the file are left behind.
    let backbone: BTreeMap<_, _> = tensors
        .into_iter()
        .filter(|(k, _)| store.id(k).is_some())
        .collect();
    load_into(
        &mut store,
        backbone,
        &ImportOptions::strict(),
        &weights.display().to_string(),
    )?;
    let mut meta = BTreeMap::new();
    meta.insert("source".into(), weights.display().to_string());
    let names = export_backbone(&store, arch, prefix, &classifier, output, &meta)?;
    Ok(names.len())
}
