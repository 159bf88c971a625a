//! The `sdengine` binary as a user runs it: import/export conversions end to end on full-size
//! weights, and the errors bad input gets (a clear message, a non-zero exit, no output written).

use sdengine::io::safetensors::{read_tensors, save_store};
use sdengine::models::daino_head::{DinoHeadConfig, MultiCropWrapper};
use sdengine::models::resnet::ResNetConfig;
use sdengine::models::suave_head::{SuaveHeadConfig, SuaveNet};
use sdengine::models::vit::VitConfig;
use sdengine::nn::init::krsc_to_oihw;
use sdengine::nn::ParamStore;
use sdengine::testing::{fixtures_dir, torch_keys};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn sdengine(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdengine"))
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("the sdengine binary runs")
}

/// `sdengine export --format FORMAT --weights W --output O [extra...]`.
fn export(format: &str, weights: &Path, output: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "export",
        "--format",
        format,
        "--weights",
        weights.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    sdengine(&args)
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sdengine-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn keys_of(path: &Path) -> Vec<(String, Vec<usize>)> {
    let (t, _) = read_tensors(path).unwrap();
    t.iter()
        .map(|(k, v)| (k.clone(), v.shape().to_vec()))
        .collect()
}

fn sorted(mut v: Vec<(String, Vec<usize>)>) -> Vec<(String, Vec<usize>)> {
    v.sort();
    v
}

#[test]
fn export_torchvision_writes_resnet50_keys_and_values() {
    let dir = tmp_dir("tv");
    let mut store = ParamStore::new();
    SuaveNet::new(
        &mut store,
        ResNetConfig::resnet50(),
        SuaveHeadConfig::default(),
        5,
    )
    .unwrap();
    let weights = dir.join("suave.safetensors");
    save_store(&weights, &store, &BTreeMap::new()).unwrap();
    let out = dir.join("resnet50.safetensors");
    let r = export("torchvision", &weights, &out, &[]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    // exactly torchvision's resnet50 keys and shapes, as PyTorch prints them (strict=True loads),
    // with Suave's online linear head on the backbone features as `fc`
    assert_eq!(sorted(keys_of(&out)), sorted(torch_keys("resnet50")));
    let (t, _) = read_tensors(&out).unwrap();
    let online = store.value(store.id("cls_heads.0.weight").unwrap());
    assert_eq!(&t["fc.weight"], online);
    let conv1 = store.value(store.id("conv1.weight").unwrap());
    assert_eq!(
        t["conv1.weight"],
        krsc_to_oihw(conv1),
        "conv weights go out as OIHW"
    );
    let rv = store.value(store.id("layer3.2.bn2.running_var").unwrap());
    assert_eq!(&t["layer3.2.bn2.running_var"], rv);

    // an existing output is never overwritten without --force
    let before = std::fs::read(&out).unwrap();
    let r = export("torchvision", &weights, &out, &[]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("--force"));
    assert_eq!(std::fs::read(&out).unwrap(), before);
    assert!(export("torchvision", &weights, &out, &["--force"])
        .status
        .success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn export_timm_strips_dinos_backbone_prefix() {
    let dir = tmp_dir("timm");
    let mut store = ParamStore::new();
    MultiCropWrapper::new(
        &mut store,
        VitConfig::vit_small(),
        DinoHeadConfig::daino(384),
        5,
    )
    .unwrap();
    let weights = dir.join("daino.safetensors");
    save_store(&weights, &store, &BTreeMap::new()).unwrap();
    let out = dir.join("vit.safetensors");
    let r = export("timm", &weights, &out, &["--no-classifier"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let want: Vec<_> = torch_keys("vit_small_patch16_224")
        .into_iter()
        .filter(|(k, _)| !k.starts_with("head."))
        .collect();
    assert_eq!(sorted(keys_of(&out)), sorted(want));
    let (t, _) = read_tensors(&out).unwrap();
    let pos = store.value(store.id("backbone.pos_embed").unwrap());
    assert_eq!(&t["pos_embed"], pos);

    // a ResNet export of ViT weights lists what is missing instead of writing a file
    let bad = dir.join("bad.safetensors");
    let r = export("torchvision", &weights, &bad, &[]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("conv1.weight"), "{err}");
    assert!(!bad.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn import_reports_mis_shaped_tensors_and_writes_nothing() {
    let dir = tmp_dir("import");
    let out = dir.join("init.safetensors");
    // a SwAV-structured checkpoint with tiny widths: every tensor is mis-shaped for ResNet-50
    let ckpt = fixtures_dir().join("io/swav_like.pth");
    let r = sdengine(&[
        "import",
        "--from",
        "swav",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("mis-shaped") && err.contains("conv1.weight") && err.contains("swav_like"),
        "{err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    assert!(!out.exists());

    // a file that is not a checkpoint: named in the error
    let not_ckpt = fixtures_dir().join("io/torch_keys.json");
    let r = sdengine(&[
        "import",
        "--from",
        "dino",
        "--checkpoint",
        not_ckpt.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("torch_keys.json"), "{err}");
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unknown_flags_and_values_are_rejected_before_any_work() {
    let r = sdengine(&[
        "export",
        "--format",
        "keras",
        "--weights",
        "a",
        "--output",
        "b",
    ]);
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("keras"));
    let r = sdengine(&["bench", "--filter", "no-such-case"]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("no-such-case"));
    let r = sdengine(&["info"]);
    assert!(r.status.success());
    assert!(String::from_utf8_lossy(&r.stdout).contains("threads"));
}

/// `--device`: a value that is not a device, Daino asked onto the device (its ViT has no device
/// path yet) and `cuda` on a machine without a GPU are clear errors before any training; `emu`
/// trains Suave with the backbone on the emulated device and says so.
#[test]
fn device_choices_are_checked_and_emu_trains() {
    let out = tmp_dir("device_choices");
    let o = out.to_string_lossy().to_string();
    let run = |method: &str, device: &str| {
        sdengine(&[
            "train",
            "--method",
            method,
            "--device",
            device,
            "--output",
            &o,
            "--force",
            "--max-steps",
            "2",
            "--log-every",
            "1",
        ])
    };
    let r = run("suave", "tpu");
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("use cpu, cuda, emu or auto"));
    let r = run("daino", "emu");
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("Daino (ViT) trains with --device cpu"));
    if !sdengine::backend::cuda::gpu_available() {
        let r = run("suave", "cuda");
        assert!(!r.status.success());
        assert!(String::from_utf8_lossy(&r.stderr).contains("no usable GPU"));
    } else {
        println!("SKIP: the no-GPU error of --device cuda (this machine has a GPU)");
    }
    let r = run("suave", "emu");
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{err}");
    assert!(err.contains("backbone on the CPU emulation"), "{err}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default();
    assert!(metrics.contains("train_loss"), "{metrics}");
}
