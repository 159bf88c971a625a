//! Importing PyTorch state dicts into ParamStores: name mapping, layout conversion, the load
//! report, and the official Suave (SwAV) / Daino (DINO) init rules, on checkpoints shaped like
//! the official ones (tests/reference/io_fixtures.py) and stores built by hand with the real
//! torchvision / timm / Suave key names.

use sdengine::io::from_pytorch_layout;
use sdengine::io::import::{
    dino_init, load_into, read_dino_init, read_swav_init, swav_init, ImportOptions,
};
use sdengine::io::pth::load_state_dict;
use sdengine::nn::{Layout, ParamStore};
use sdengine::testing::{fixtures_dir, Fixtures};
use sdengine::Tensor;
use std::collections::BTreeMap;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    fixtures_dir().join("io").join(name)
}

fn bn(s: &mut ParamStore, p: &str, c: usize) {
    s.param(&format!("{p}.weight"), Tensor::zeros(&[c]));
    s.param(&format!("{p}.bias"), Tensor::zeros(&[c]));
    s.buffer(&format!("{p}.running_mean"), Tensor::zeros(&[c]));
    s.buffer(&format!("{p}.running_var"), Tensor::zeros(&[c]));
    s.buffer(&format!("{p}.num_batches_tracked"), Tensor::zeros(&[]));
}

/// A tiny Suave model with torchvision backbone names and Suave's ModuleList head.
fn suave_store() -> ParamStore {
    let mut s = ParamStore::new();
    s.conv_param("conv1.weight", Tensor::zeros(&[4, 3, 3, 3]));
    bn(&mut s, "bn1", 4);
    s.conv_param("layer1.0.conv1.weight", Tensor::zeros(&[4, 1, 1, 4]));
    bn(&mut s, "layer1.0.bn1", 4);
    s.conv_param("layer1.0.downsample.0.weight", Tensor::zeros(&[8, 1, 1, 4]));
    bn(&mut s, "layer1.0.downsample.1", 8);
    s.param("projection_head.0.0.weight", Tensor::zeros(&[6, 8]));
    s.param("projection_head.0.0.bias", Tensor::zeros(&[6]));
    bn(&mut s, "projection_head.0.1", 6);
    s.param("projection_head.1.weight", Tensor::zeros(&[3, 6]));
    s.param("projection_head.1.bias", Tensor::zeros(&[3]));
    s.param("prototypes.weight", Tensor::full(&[10, 3], 0.5));
    s
}

fn reference(name: &str) -> Tensor<f32> {
    Fixtures::open("io/pth_values.safetensors")
        .unwrap()
        .get(name)
        .unwrap()
        .clone()
}

fn value(s: &ParamStore, name: &str) -> Tensor<f32> {
    s.value(s.id(name).unwrap()).clone()
}

#[test]
fn suave_init_from_swav_loads_the_backbone_only() {
    for file in ["swav_like.pth", "swav_like_legacy.pth"] {
        let map = read_swav_init(&fixture(file), false).unwrap();
        assert!(map.keys().all(|k| !k.starts_with("module.")
            && !k.starts_with("prototypes.")
            && !k.starts_with("projection_head.")));
        let mut s = suave_store();
        let r = load_into(&mut s, map, &ImportOptions::official_init(), file).unwrap();
        assert_eq!(r.loaded.len(), 1 + 5 + 1 + 5 + 1 + 5, "{r}");
        assert!(r.unexpected.is_empty() && r.mismatched.is_empty(), "{r}");
        let missing: Vec<&str> = r.missing.iter().map(|(n, _)| n.as_str()).collect();
        assert!(
            missing.contains(&"prototypes.weight") && missing.contains(&"projection_head.1.weight")
        );
        // Convolutions converted to the engine's O×KH×KW×I.
        let w = reference("swav/state_dict/module.conv1.weight");
        assert_eq!(
            value(&s, "conv1.weight"),
            from_pytorch_layout(Layout::ConvKrsc, w).unwrap()
        );
        let w = reference("swav/state_dict/module.layer1.0.downsample.0.weight");
        assert_eq!(
            value(&s, "layer1.0.downsample.0.weight"),
            from_pytorch_layout(Layout::ConvKrsc, w).unwrap()
        );
        assert_eq!(
            value(&s, "bn1.running_var"),
            reference("swav/state_dict/module.bn1.running_var")
        );
        assert_eq!(value(&s, "bn1.num_batches_tracked").data(), &[1000.0]);
        // Missing entries keep their init.
        assert_eq!(value(&s, "prototypes.weight"), Tensor::full(&[10, 3], 0.5));
    }
}

#[test]
fn keeping_the_head_maps_swav_sequential_names_to_suave_module_list() {
    let map = read_swav_init(&fixture("swav_like.pth"), true).unwrap();
    assert!(map.contains_key("projection_head.0.0.weight"));
    assert!(map.contains_key("projection_head.0.1.running_mean"));
    assert!(map.contains_key("projection_head.1.bias"));
    assert!(!map
        .keys()
        .any(|k| k.starts_with("projection_head.3") || k.starts_with("prototypes")));
    let mut s = suave_store();
    let r = load_into(&mut s, map, &ImportOptions::official_init(), "swav").unwrap();
    assert_eq!(r.missing.len(), 1, "only the prototypes stay random: {r}");
    assert_eq!(
        value(&s, "projection_head.1.weight"),
        reference("swav/state_dict/module.projection_head.3.weight")
    );
    assert_eq!(
        value(&s, "projection_head.0.1.weight"),
        reference("swav/state_dict/module.projection_head.1.weight")
    );
    assert_eq!(
        value(&s, "projection_head.0.0.bias"),
        reference("swav/state_dict/module.projection_head.0.bias")
    );

    // A Suave checkpoint (fine-tuning starts from one) already has Suave's names: unchanged,
    // and its prototypes are still dropped (the official quirk).
    let mut suave_ckpt = BTreeMap::new();
    for (k, shape) in [
        ("module.projection_head.0.0.weight", vec![6, 8]),
        ("module.projection_head.0.1.weight", vec![6]),
        ("module.projection_head.1.weight", vec![3, 6]),
        ("module.prototypes.weight", vec![10, 3]),
    ] {
        suave_ckpt.insert(k.to_string(), Tensor::zeros(&shape));
    }
    let m = swav_init(suave_ckpt, true);
    let keys: Vec<&str> = m.keys().map(|s| s.as_str()).collect();
    assert_eq!(
        keys,
        [
            "projection_head.0.0.weight",
            "projection_head.0.1.weight",
            "projection_head.1.weight"
        ]
    );
}

/// A tiny Daino student with DINO's names (`backbone.` timm names, `head.` DINOHead).
fn daino_store(with_backbone_prefix: bool) -> ParamStore {
    let b = if with_backbone_prefix {
        "backbone."
    } else {
        ""
    };
    let mut s = ParamStore::new();
    let d = 4;
    s.param(&format!("{b}cls_token"), Tensor::zeros(&[1, 1, d]));
    s.param(&format!("{b}pos_embed"), Tensor::zeros(&[1, 5, d]));
    s.conv_param(
        &format!("{b}patch_embed.proj.weight"),
        Tensor::zeros(&[d, 2, 2, 3]),
    );
    s.param(&format!("{b}patch_embed.proj.bias"), Tensor::zeros(&[d]));
    for (n, shape) in [
        ("norm1.weight", vec![d]),
        ("norm1.bias", vec![d]),
        ("attn.qkv.weight", vec![3 * d, d]),
        ("attn.qkv.bias", vec![3 * d]),
        ("attn.proj.weight", vec![d, d]),
        ("attn.proj.bias", vec![d]),
        ("norm2.weight", vec![d]),
        ("norm2.bias", vec![d]),
        ("mlp.fc1.weight", vec![4 * d, d]),
        ("mlp.fc1.bias", vec![4 * d]),
        ("mlp.fc2.weight", vec![d, 4 * d]),
        ("mlp.fc2.bias", vec![d]),
    ] {
        s.param(&format!("{b}blocks.0.{n}"), Tensor::zeros(&shape));
    }
    s.param(&format!("{b}norm.weight"), Tensor::zeros(&[d]));
    s.param(&format!("{b}norm.bias"), Tensor::zeros(&[d]));
    s.param("head.mlp.0.weight", Tensor::zeros(&[8, d]));
    s.param("head.mlp.0.bias", Tensor::zeros(&[8]));
    s.param("head.last_layer.weight_g", Tensor::full(&[10, 1], 1.0));
    s.param("head.last_layer.weight_v", Tensor::zeros(&[10, 4]));
    s
}

#[test]
fn daino_init_from_dino_student() {
    let map = read_dino_init(&fixture("dino_like.pth"), false).unwrap();
    assert_eq!(map.len(), 18);
    assert!(
        map.keys().all(|k| k.starts_with("backbone.")),
        "{:?}",
        map.keys()
    );
    let mut s = daino_store(true);
    let r = load_into(&mut s, map, &ImportOptions::official_init(), "dino").unwrap();
    assert_eq!(r.loaded.len(), 18, "{r}");
    assert_eq!(r.missing.len(), 4, "the head stays random: {r}");
    // The student's values (not the teacher's), transposed view and f16 included.
    assert_eq!(
        value(&s, "backbone.blocks.0.attn.qkv.weight"),
        reference("dino/student/module.backbone.blocks.0.attn.qkv.weight")
    );
    assert_eq!(
        value(&s, "backbone.norm.weight"),
        reference("dino/student/module.backbone.norm.weight")
    );
    assert_eq!(
        value(&s, "backbone.patch_embed.proj.weight"),
        from_pytorch_layout(
            Layout::ConvKrsc,
            reference("dino/student/module.backbone.patch_embed.proj.weight")
        )
        .unwrap()
    );
    assert_eq!(
        value(&s, "head.last_layer.weight_g"),
        Tensor::full(&[10, 1], 1.0)
    );

    // --init_proj true keeps the MLP but never DINO's last layer.
    let map = read_dino_init(&fixture("dino_like.pth"), true).unwrap();
    assert!(map.contains_key("head.mlp.4.weight"));
    assert!(!map.keys().any(|k| k.starts_with("head.last_layer")));

    // A store with bare timm names strips `backbone.`.
    let student = load_state_dict(&fixture("dino_like.pth"), &["student"]).unwrap();
    let mut s = daino_store(false);
    let r = load_into(
        &mut s,
        dino_init(student, false),
        &ImportOptions::official_init().strip("backbone."),
        "dino",
    )
    .unwrap();
    assert_eq!(r.loaded.len(), 18, "{r}");
}

#[test]
fn strict_load_lists_missing_unexpected_and_mis_shaped() {
    let mut map = read_swav_init(&fixture("swav_like.pth"), false).unwrap();
    map.insert("layer9.weight".into(), Tensor::zeros(&[2, 3]));
    let w = map.remove("bn1.weight").unwrap();
    map.insert("bn1.weight".into(), Tensor::zeros(&[5]));
    drop(w);
    let mut s = suave_store();
    s.param("bbone_head.weight", Tensor::zeros(&[10, 8])); // an 11th missing entry
    let before = s.clone();
    let e = load_into(&mut s, map.clone(), &ImportOptions::strict(), "ckpt.pth")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("ckpt.pth"), "{e}");
    assert!(e.contains("bn1.weight [4] vs [5]"), "{e}");
    assert!(e.contains("layer9.weight [2, 3]"), "{e}");
    assert!(e.contains("projection_head.0.0.weight [6, 8]"), "{e}");
    assert!(e.contains("prototypes.weight [10, 3]"), "{e}");
    assert!(
        e.contains("11 missing") && e.contains("... and 1 more"),
        "long lists are cut: {e}"
    );
    for (a, b) in before.entries().iter().zip(s.entries()) {
        assert_eq!(a.value, b.value, "{} changed by a failed load", a.name);
    }
    // Missing allowed: still an error for the unexpected and mis-shaped ones.
    let e = load_into(
        &mut s,
        map.clone(),
        &ImportOptions::official_init(),
        "ckpt.pth",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("layer9.weight") && e.contains("bn1.weight"),
        "{e}"
    );
    // Ignored unexpected names are reported, not errors; mis-shaped stays an error.
    map.insert("bn1.weight".into(), Tensor::zeros(&[4]));
    let r = load_into(
        &mut s,
        map,
        &ImportOptions::official_init().ignore("layer9.*"),
        "ckpt.pth",
    )
    .unwrap();
    assert_eq!(r.ignored, vec!["layer9.weight".to_string()]);
    assert!(r.to_string().contains("1 ignored"), "{r}");
}

#[test]
fn renames_and_name_collisions() {
    let mut s = ParamStore::new();
    s.param("fc.weight", Tensor::zeros(&[2, 2]));
    let mut m = BTreeMap::new();
    m.insert(
        "module.linear.weight".to_string(),
        Tensor::full(&[2, 2], 3.0),
    );
    let o = ImportOptions::strict()
        .strip("module.")
        .rename("linear.", "fc.");
    load_into(&mut s, m.clone(), &o, "x").unwrap();
    assert_eq!(value(&s, "fc.weight"), Tensor::full(&[2, 2], 3.0));
    m.insert("linear.weight".to_string(), Tensor::zeros(&[2, 2]));
    let e = load_into(&mut s, m, &o, "x.pth").unwrap_err().to_string();
    assert!(e.contains("both map to \"fc.weight\""), "{e}");
}
