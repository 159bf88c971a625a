//! Backbone export: the key sets equal torchvision's resnet50 and timm's vit_small_patch16_224
//! (tests/fixtures/io/torch_keys.json, printed by PyTorch), full-size stores export with the
//! right layouts and dtypes, and incomplete stores give errors listing what is missing.
//!
//! The files written here go to `$CARGO_TARGET_TMPDIR/io_export/`;
//! `python3 tests/reference/io_export_check.py` loads them into torchvision / timm with
//! `strict=True` and checks every value.

use sdengine::io::export::{backbone_keys, backbone_tensors, export_backbone, Arch, Classifier};
use sdengine::io::safetensors::FileTensor;
use sdengine::nn::ParamStore;
use sdengine::testing::torch_keys;
use sdengine::Tensor;
use std::collections::BTreeMap;
use std::path::PathBuf;

fn with_classifier(arch: Arch) -> Vec<(String, Vec<usize>)> {
    let mut k = backbone_keys(arch);
    let (w, b) = arch.classifier_names();
    k.push((w.into(), vec![1000, arch.feature_dim()]));
    k.push((b.into(), vec![1000]));
    k
}

#[test]
fn key_sets_match_torchvision_and_timm() {
    assert_eq!(with_classifier(Arch::ResNet50), torch_keys("resnet50"));
    assert_eq!(
        with_classifier(Arch::VitSmallPatch16),
        torch_keys("vit_small_patch16_224")
    );
}

/// A store with every backbone entry of `arch` under `prefix`, filled from the shared generator
/// exactly as io_export_check.py expects: rank-4 weights as engine convolutions (O×KH×KW×I,
/// randn of that shape), running_var uniform in [0.5, 1.5), counters = 7, the rest randn.
fn full_store(arch: Arch, prefix: &str) -> ParamStore {
    let mut s = ParamStore::new();
    for (name, shape) in backbone_keys(arch) {
        let full = format!("{prefix}{name}");
        if let &[o, i, kh, kw] = shape.as_slice() {
            s.conv_param(&full, Tensor::randn_named(0, &name, &[o, kh, kw, i], 1.0));
        } else if name.ends_with("running_var") {
            s.buffer(&full, Tensor::rand_named(0, &name, &shape, 0.5, 1.5));
        } else if name.ends_with("running_mean") {
            s.buffer(&full, Tensor::randn_named(0, &name, &shape, 1.0));
        } else if name.ends_with("num_batches_tracked") {
            s.buffer(&full, Tensor::full(&shape, 7.0));
        } else {
            s.param(&full, Tensor::randn_named(0, &name, &shape, 0.02));
        }
    }
    s
}

fn out_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("io_export");
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn resnet50_export_is_complete_and_in_pytorch_layout() {
    let s = full_store(Arch::ResNet50, "");
    let path = out_dir().join("resnet50.safetensors");
    let names = export_backbone(
        &s,
        Arch::ResNet50,
        "",
        &Classifier::Zeros { num_classes: 1000 },
        &path,
        &BTreeMap::new(),
    )
    .unwrap();
    assert_eq!(names.len(), 320);
    eprintln!("wrote {}", path.display());

    // Read back with the safetensors crate itself: dtypes and layouts as PyTorch has them.
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let nbt = st.tensor("layer3.5.bn2.num_batches_tracked").unwrap();
    assert_eq!(nbt.dtype(), safetensors::Dtype::I64);
    assert!(nbt.shape().is_empty());
    assert_eq!(nbt.data(), 7i64.to_le_bytes());
    let w = st.tensor("layer2.0.conv2.weight").unwrap();
    assert_eq!(w.shape(), &[128, 128, 3, 3]);
    let krsc = Tensor::randn_named(0, "layer2.0.conv2.weight", &[128, 3, 3, 128], 1.0);
    let f = |i: usize| {
        let c = &w.data()[4 * i..4 * i + 4];
        f32::from_le_bytes([c[0], c[1], c[2], c[3]])
    };
    for (o, i, y, x) in [(0, 0, 0, 0), (5, 77, 2, 1), (127, 3, 1, 2)] {
        assert_eq!(
            f(((o * 128 + i) * 3 + y) * 3 + x),
            krsc.data()[((o * 3 + y) * 3 + x) * 128 + i]
        );
    }
    let fc = st.tensor("fc.weight").unwrap();
    assert_eq!(fc.shape(), &[1000, 2048]);
    assert!(fc.data().iter().all(|&b| b == 0));
}

#[test]
fn vit_export_from_a_prefixed_student_with_a_given_head() {
    let mut s = full_store(Arch::VitSmallPatch16, "backbone.");
    // Daino's DINO head lives in the same store; it must not be exported.
    s.param("head.mlp.0.weight", Tensor::zeros(&[2048, 384]));
    let weight = Tensor::randn_named(0, "head.weight", &[1000, 384], 0.02);
    let bias = Tensor::randn_named(0, "head.bias", &[1000], 0.02);
    let path = out_dir().join("vit_small_patch16_224.safetensors");
    let names = export_backbone(
        &s,
        Arch::VitSmallPatch16,
        "backbone.",
        &Classifier::Given { weight, bias },
        &path,
        &BTreeMap::new(),
    )
    .unwrap();
    assert_eq!(names.len(), 152);
    assert!(!names.iter().any(|n| n.starts_with("head.mlp")));
    eprintln!("wrote {}", path.display());

    let t = backbone_tensors(&s, Arch::VitSmallPatch16, "backbone.", &Classifier::None).unwrap();
    assert_eq!(t.len(), 150);
    let FileTensor::F32(p) = &t["patch_embed.proj.weight"] else {
        panic!("patch embedding must be f32")
    };
    assert_eq!(p.shape(), &[384, 3, 16, 16]);
}

#[test]
fn incomplete_or_mis_shaped_stores_are_refused_with_names() {
    let mut s = ParamStore::new();
    for (name, shape) in backbone_keys(Arch::ResNet50) {
        if name == "layer4.2.conv3.weight" || name.ends_with("num_batches_tracked") {
            continue; // one weight missing; counters absent are written as 0
        }
        let shape = if name == "bn1.weight" {
            vec![65]
        } else {
            shape
        };
        s.param(&name, Tensor::zeros(&shape));
    }
    let e = backbone_tensors(&s, Arch::ResNet50, "", &Classifier::None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 missing, 1 mis-shaped"), "{e}");
    assert!(
        e.contains("missing layer4.2.conv3.weight [2048, 512, 1, 1]"),
        "{e}"
    );
    assert!(
        e.contains("mis-shaped bn1.weight (torch [64], store [65])"),
        "{e}"
    );

    // Given classifier of the wrong width.
    let s = full_store(Arch::ResNet50, "");
    let c = Classifier::Given {
        weight: Tensor::zeros(&[10, 384]),
        bias: Tensor::zeros(&[10]),
    };
    let e = backbone_tensors(&s, Arch::ResNet50, "", &c)
        .unwrap_err()
        .to_string();
    assert!(e.contains("[10, 384]"), "{e}");
    // Missing counters become int64 zeros.
    let mut s2 = ParamStore::new();
    for e in s.entries() {
        if !e.name.ends_with("num_batches_tracked") {
            if e.layout == sdengine::nn::Layout::ConvKrsc {
                s2.conv_param(&e.name, e.value.clone());
            } else {
                s2.param(&e.name, e.value.clone());
            }
        }
    }
    let t = backbone_tensors(&s2, Arch::ResNet50, "", &Classifier::None).unwrap();
    assert_eq!(
        t["bn1.num_batches_tracked"],
        FileTensor::I64 {
            shape: vec![],
            data: vec![0]
        }
    );
}
