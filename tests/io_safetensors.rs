//! Safetensors checkpoints of ParamStores: PyTorch layout in the file, metadata, prefixes for
//! several stores, dtypes PyTorch writes, atomic writes and clear errors.

use sdengine::io::import::ImportOptions;
use sdengine::io::safetensors::{load_store, read_tensors, save_store, save_stores};
use sdengine::nn::ParamStore;
use sdengine::testing::fixtures_dir;
use sdengine::Tensor;
use std::collections::BTreeMap;

fn model(seed: u64) -> ParamStore {
    let mut s = ParamStore::new();
    // Engine layout O×KH×KW×I.
    s.conv_param(
        "conv1.weight",
        Tensor::randn_named(seed, "conv1.weight", &[4, 3, 3, 2], 1.0),
    );
    s.param(
        "bn1.weight",
        Tensor::randn_named(seed, "bn1.weight", &[4], 1.0),
    );
    s.buffer(
        "bn1.running_var",
        Tensor::rand_named(seed, "bn1.running_var", &[4], 0.5, 1.5),
    );
    s.buffer(
        "bn1.num_batches_tracked",
        Tensor::from_vec(vec![17.0], &[]).unwrap(),
    );
    s.param(
        "fc.weight",
        Tensor::randn_named(seed, "fc.weight", &[5, 4], 1.0),
    );
    s
}

fn zeros_like(s: &ParamStore) -> ParamStore {
    let mut z = s.clone();
    for e in z.entries_mut() {
        e.value.data_mut().fill(0.0);
    }
    z
}

#[test]
fn round_trip_in_pytorch_layout_with_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ckpt.safetensors");
    let s = model(1);
    let mut meta = BTreeMap::new();
    meta.insert("rest".to_string(), r#"{"epoch":3,"step":120}"#.to_string());
    save_store(&p, &s, &meta).unwrap();

    let (t, m) = read_tensors(&p).unwrap();
    assert_eq!(m, meta);
    assert_eq!(t.len(), s.len());
    // The file holds PyTorch's O×I×KH×KW: element (o, i, kh, kw) = engine (o, kh, kw, i).
    let w = &t["conv1.weight"];
    assert_eq!(w.shape(), &[4, 2, 3, 3]);
    let e = s.value(s.id("conv1.weight").unwrap());
    for (o, i, y, x) in [(0, 0, 0, 0), (3, 1, 2, 0), (2, 0, 1, 2)] {
        assert_eq!(
            w.data()[((o * 2 + i) * 3 + y) * 3 + x],
            e.data()[((o * 3 + y) * 3 + x) * 2 + i]
        );
    }

    let mut back = zeros_like(&s);
    let (report, m2) = load_store(&p, &mut back, "", &ImportOptions::strict()).unwrap();
    assert_eq!(m2, meta);
    assert_eq!(report.loaded.len(), s.len());
    for (a, b) in s.entries().iter().zip(back.entries()) {
        assert_eq!(a.value, b.value, "{}", a.name);
    }
    // No temp file is left beside the checkpoint.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn student_and_teacher_share_a_file_under_prefixes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("both.safetensors");
    let (st, te) = (model(1), model(2));
    save_stores(
        &p,
        &[("student.", &st), ("teacher.", &te)],
        &BTreeMap::new(),
    )
    .unwrap();
    let (t, _) = read_tensors(&p).unwrap();
    assert_eq!(t.len(), 2 * st.len());
    let mut back = zeros_like(&te);
    load_store(&p, &mut back, "teacher.", &ImportOptions::strict()).unwrap();
    for (a, b) in te.entries().iter().zip(back.entries()) {
        assert_eq!(a.value, b.value, "{}", a.name);
    }
    let e = save_stores(&p, &[("", &st), ("", &te)], &BTreeMap::new())
        .unwrap_err()
        .to_string();
    assert!(e.contains("two entries"), "{e}");
}

#[test]
fn accepts_the_float_dtypes_pytorch_writes() {
    let (t, _) = read_tensors(&fixtures_dir().join("io/dtypes.safetensors")).unwrap();
    let x = Tensor::randn_named(7, "x", &[3, 5], 1.0);
    assert_eq!(t["f32"], x);
    assert_eq!(t["f64"], x);
    assert_eq!(t["bf16"], x.to_bf16().to_f32());
    let f16: Vec<f32> = x
        .data()
        .iter()
        .map(|&v| half::f16::from_f32(v).to_f32())
        .collect();
    assert_eq!(t["f16"].data(), f16.as_slice());
    assert_ne!(t["f16"], x, "f16 must be rounded, not a copy of f32");
}

#[test]
fn shape_mismatch_is_an_error_and_leaves_the_store_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.safetensors");
    save_store(&p, &model(1), &BTreeMap::new()).unwrap();
    let mut other = ParamStore::new();
    other.conv_param("conv1.weight", Tensor::zeros(&[4, 3, 3, 2]));
    other.param("bn1.weight", Tensor::zeros(&[4]));
    other.buffer("bn1.running_var", Tensor::zeros(&[4]));
    other.buffer("bn1.num_batches_tracked", Tensor::zeros(&[]));
    other.param("fc.weight", Tensor::zeros(&[6, 4]));
    let before = other.clone();
    let e = load_store(&p, &mut other, "", &ImportOptions::strict())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("m.safetensors") && e.contains("fc.weight [6, 4] vs [5, 4]"),
        "{e}"
    );
    for (a, b) in before.entries().iter().zip(other.entries()) {
        assert_eq!(a.value, b.value, "{} changed by a failed load", a.name);
    }
}

#[test]
fn truncated_file_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.safetensors");
    save_store(&p, &model(1), &BTreeMap::new()).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    for cut in [0, 5, 20, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = read_tensors(&p).unwrap_err().to_string();
        assert!(e.contains("t.safetensors"), "{e}");
    }
}
