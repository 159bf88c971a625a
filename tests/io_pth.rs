//! The `.pth` reader against files written by `torch.save` (tests/reference/io_fixtures.py):
//! every tensor equals what PyTorch held (strides, offsets, f16/bf16/int64 included), the
//! non-tensor structure of the official checkpoints is readable, and damaged files give errors
//! naming the file, never panics.

use sdengine::io::pth::{
    find_state_dict, load_state_dict, parse_pth, read_pth, PthDType, PthValue,
};
use sdengine::testing::{fixtures_dir, Fixtures};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    fixtures_dir().join("io").join(name)
}

/// Every tensor under dicts, keyed "<prefix>/<key>/..." as the Python script's `collect`.
fn collect(
    prefix: &str,
    v: &PthValue,
    out: &mut BTreeMap<String, Vec<f32>>,
    dtypes: &mut BTreeMap<String, PthDType>,
) {
    match v {
        PthValue::Tensor(t) => {
            out.insert(prefix.to_string(), t.to_f32().into_vec());
            dtypes.insert(prefix.to_string(), t.dtype);
        }
        PthValue::Dict(items) => {
            for (k, v) in items {
                let k = match k {
                    PthValue::Str(s) => s.clone(),
                    PthValue::Int(i) => i.to_string(),
                    other => panic!("unexpected key {other:?}"),
                };
                collect(&format!("{prefix}/{k}"), v, out, dtypes);
            }
        }
        _ => {}
    }
}

fn check_all_tensors(file: &str, tag: &str) -> (PthValue, BTreeMap<String, PthDType>) {
    let root = read_pth(&fixture(file)).unwrap();
    let mut got = BTreeMap::new();
    let mut dtypes = BTreeMap::new();
    collect(tag, &root, &mut got, &mut dtypes);
    let want = Fixtures::open("io/pth_values.safetensors").unwrap();
    let want_names: Vec<&str> = want
        .names()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{tag}/")))
        .collect();
    let got_names: Vec<&str> = got.keys().map(|s| s.as_str()).collect();
    assert_eq!(got_names, want_names, "{file}: tensor set differs");
    for (name, v) in &got {
        let w = want.get(name).unwrap();
        // Bit-exact: f16/bf16/int64 widen to f32 exactly, strides only move values.
        assert_eq!(v.as_slice(), w.data(), "{file}: {name}");
    }
    (root, dtypes)
}

#[test]
fn swav_zip_checkpoint_values_and_structure() {
    let (root, dtypes) = check_all_tensors("swav_like.pth", "swav");
    assert_eq!(root.get("epoch"), Some(&PthValue::Int(800)));
    let amp = root.at_path("amp/loss_scaler0").unwrap();
    assert_eq!(amp.get("loss_scale"), Some(&PthValue::Float(65536.0)));
    assert_eq!(amp.get("unskipped"), Some(&PthValue::Int(12)));
    let PthValue::List(groups) = root.at_path("optimizer/param_groups").unwrap() else {
        panic!("param_groups is not a list")
    };
    assert_eq!(groups[0].get("lr").and_then(|v| v.as_f64()), Some(4.8));
    assert_eq!(groups[0].get("nesterov"), Some(&PthValue::Bool(false)));
    assert_eq!(
        groups[0].get("params"),
        Some(&PthValue::List(vec![
            PthValue::Int(0),
            PthValue::Int(1),
            PthValue::Int(2)
        ]))
    );
    assert_eq!(
        dtypes["swav/state_dict/module.bn1.num_batches_tracked"],
        PthDType::I64
    );
    // State-dict order is kept (OrderedDict).
    let keys = root.at_path("state_dict").unwrap().keys();
    assert_eq!(keys[0], "module.conv1.weight");
    assert_eq!(keys.last().unwrap(), "module.prototypes.weight");
}

#[test]
fn swav_legacy_container_reads_the_same() {
    let (zip_root, _) = check_all_tensors("swav_like.pth", "swav");
    let (legacy_root, _) = check_all_tensors("swav_like_legacy.pth", "swav");
    assert_eq!(zip_root, legacy_root);
}

#[test]
fn dino_checkpoint_values_namespace_and_dtypes() {
    let (root, dtypes) = check_all_tensors("dino_like.pth", "dino");
    assert_eq!(
        dtypes["dino/student/module.backbone.norm.weight"],
        PthDType::F16
    );
    assert_eq!(
        dtypes["dino/student/module.backbone.norm.bias"],
        PthDType::BF16
    );
    assert_eq!(
        dtypes["dino/student/module.backbone.blocks.0.attn.qkv.weight"],
        PthDType::F32
    );
    let PthValue::Object { class, state, .. } = root.get("args").unwrap() else {
        panic!("args is not an object")
    };
    assert_eq!(class, "argparse.Namespace");
    assert!(state.is_some());
    let args = root.get("args").unwrap();
    assert_eq!(args.get("arch").and_then(|v| v.as_str()), Some("vit_small"));
    assert_eq!(args.get("lr").and_then(|v| v.as_f64()), Some(0.0005));
    assert_eq!(args.get("use_fp16"), Some(&PthValue::Bool(true)));
    assert_eq!(args.get("gpu"), Some(&PthValue::None));
    assert_eq!(
        args.get("global_crops_scale"),
        Some(&PthValue::Tuple(vec![
            PthValue::Float(0.4),
            PthValue::Float(1.0)
        ]))
    );
    assert_eq!(root.get("epoch").and_then(|v| v.as_int()), Some(800));
    let PthValue::Tensor(c) = root.at_path("dino_loss/center").unwrap() else {
        panic!("center is not a tensor")
    };
    assert_eq!(c.shape, vec![1, 10]);
    // Optimizer state is keyed by ints.
    let PthValue::Dict(st) = root.at_path("optimizer/state").unwrap() else {
        panic!("optimizer state is not a dict")
    };
    assert_eq!(st[0].0, PthValue::Int(0));
}

#[test]
fn state_dict_helper_finds_converts_and_reports() {
    let p = fixture("dino_like.pth");
    let sd = load_state_dict(&p, &["state_dict", "student"]).unwrap();
    let want = Fixtures::open("io/pth_values.safetensors").unwrap();
    let qkv = &sd["module.backbone.blocks.0.attn.qkv.weight"];
    let w = want
        .get("dino/student/module.backbone.blocks.0.attn.qkv.weight")
        .unwrap();
    assert_eq!(qkv, w, "transposed view: shape and values");
    assert_eq!(qkv.shape(), &[12, 4]);
    assert_eq!(sd["module.backbone.pos_embed"].shape(), &[1, 5, 4]);
    assert!(sd.contains_key("module.head.last_layer.weight_v"));

    let root = read_pth(&p).unwrap();
    let e = find_state_dict(&root, &["model", "state_dict"], &p)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("dino_like.pth") && e.contains("student") && e.contains("\"model\""),
        "{e}"
    );
    let e = find_state_dict(&root, &["dino_loss"], &p).unwrap();
    assert_eq!(e.len(), 1);
    // The top level is not a state dict: its entries are not all tensors.
    let e = find_state_dict(&root, &[""], &p).unwrap_err().to_string();
    assert!(e.contains("not a tensor"), "{e}");
}

#[test]
fn not_a_checkpoint_and_missing_file_name_the_file() {
    let p = fixture("pth_values.safetensors");
    let e = read_pth(&p).unwrap_err().to_string();
    assert!(
        e.contains("pth_values.safetensors") && e.contains("not a PyTorch checkpoint"),
        "{e}"
    );
    let p = fixture("does_not_exist.pth");
    let e = read_pth(&p).unwrap_err().to_string();
    assert!(e.contains("does_not_exist.pth"), "{e}");
}

fn parse_never_panics(bytes: &[u8], name: &Path) -> bool {
    match std::panic::catch_unwind(|| parse_pth(bytes, name)) {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            let msg = e.to_string();
            assert!(
                msg.contains("cut.pth"),
                "error does not name the file: {msg}"
            );
            false
        }
        Err(_) => panic!("parse_pth panicked on {} bytes", bytes.len()),
    }
}

#[test]
fn truncated_files_are_errors_never_panics() {
    let name = Path::new("cut.pth");
    for f in ["swav_like.pth", "swav_like_legacy.pth", "dino_like.pth"] {
        let bytes = std::fs::read(fixture(f)).unwrap();
        assert!(
            parse_never_panics(&bytes, name),
            "{f}: full file must parse"
        );
        // Every offset of the legacy file (the pickle is parsed byte by byte); for the zip files
        // a stride plus every offset of the last 600 bytes (the central directory).
        let n = bytes.len();
        let offsets: Vec<usize> = if f.contains("legacy") {
            (0..n).collect()
        } else {
            (0..n).step_by(13).chain(n.saturating_sub(600)..n).collect()
        };
        for cut in offsets {
            assert!(
                !parse_never_panics(&bytes[..cut], name),
                "{f} cut at {cut} of {n} parsed as valid"
            );
        }
    }
}

#[test]
fn corrupted_bytes_never_panic() {
    // Flipping each byte of the legacy file exercises every opcode, length and index of the
    // unpickler with nonsense values. Ok or Err are both fine; a panic is not.
    let bytes = std::fs::read(fixture("swav_like_legacy.pth")).unwrap();
    let name = Path::new("cut.pth");
    for i in 0..bytes.len() {
        for x in [0xffu8, 0x01] {
            let mut b = bytes.clone();
            b[i] ^= x;
            parse_never_panics(&b, name);
        }
    }
    // Same for the pickle inside the zip: the zip CRC catches it or the unpickler does.
    let bytes = std::fs::read(fixture("swav_like.pth")).unwrap();
    for i in (0..bytes.len()).step_by(3) {
        let mut b = bytes.clone();
        b[i] ^= 0x5a;
        parse_never_panics(&b, name);
    }
}
