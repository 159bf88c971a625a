//! The training loop end to end on a tiny real dataset (40 CIFAR-10 images cut from the embedded
//! set): a run stopped and resumed gives bit-identical losses and weights to a straight run, for
//! Suave and Daino, across an epoch boundary; bad settings fail before any work; a diverging
//! run stops on the first non-finite loss and names it.

use sdengine::io::safetensors::read_tensors;
use sdengine::train::{train, Method, RunOptions, TrainConfig};
use std::path::Path;
use std::sync::atomic::AtomicBool;

mod common;
use common::tiny_dataset;

fn tiny_config(method: Method, data: &Path, out: &Path) -> TrainConfig {
    let vit = method == Method::Daino;
    let mut c = TrainConfig::embedded_demo(method, vit);
    c.data_path = Some(data.to_path_buf());
    c.output = out.to_path_buf();
    c.labels_per_class = Some(2);
    c.batch_size = 8; // 40 images: 5 iterations an epoch
    c.lab_batch_size = 4;
    c.epochs = 2;
    c.warmup_epochs = 1;
    c.nmb_crops = vec![2, 2];
    c.local_crops_number = 2;
    c.workers = 2;
    c.log_every = 1;
    c.eval_batch_size = 7;
    c.hidden_mlp = 32;
    c.feat_dim = 16;
    c.queue_length = 16; // active after two iterations: its state must survive the resume
    c
}

fn quiet() -> RunOptions {
    RunOptions {
        quiet: true,
        ..RunOptions::default()
    }
}

fn step_lines(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

fn resume_is_exact(method: Method) {
    let (_d, data) = tiny_dataset();
    let runs = tempfile::tempdir().unwrap();
    let stop = AtomicBool::new(false);
    // Straight: 8 iterations (epoch 0 entirely, 3 of epoch 1).
    let a = runs.path().join("a");
    let mut ca = tiny_config(method, &data, &a);
    ca.max_steps = Some(8);
    let sa = train(ca, &quiet(), &stop).unwrap();
    assert_eq!(sa.steps, 8);
    // Stopped after 3, resumed to 8.
    let b = runs.path().join("b");
    let mut cb = tiny_config(method, &data, &b);
    cb.max_steps = Some(3);
    let sb = train(cb.clone(), &quiet(), &stop).unwrap();
    assert!(sb.stopped);
    cb.max_steps = Some(8);
    let resume = RunOptions {
        resume: true,
        ..quiet()
    };
    let sb = train(cb, &resume, &stop).unwrap();
    assert_eq!(sb.steps, 8);
    assert_eq!(
        step_lines(&a),
        step_lines(&b),
        "metrics differ after a resume"
    );
    let (ta, _) = read_tensors(&a.join("checkpoint.safetensors")).unwrap();
    let (tb, _) = read_tensors(&b.join("checkpoint.safetensors")).unwrap();
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    let mut compared = 0;
    for (k, v) in &ta {
        assert!(
            v.data().iter().all(|x| x.is_finite()),
            "{k} has non-finite values"
        );
        assert_eq!(v.data(), tb[k].data(), "{k} differs after a resume");
        compared += 1;
    }
    assert!(compared > 20);
    // The straight run also evaluated once (end of epoch 0).
    let lines = step_lines(&a);
    assert!(
        lines.iter().any(|l| l.contains("val_acc1")),
        "no evaluation line"
    );
}

#[test]
fn suave_resume_is_bit_identical() {
    resume_is_exact(Method::Suave);
}

#[test]
fn daino_resume_is_bit_identical() {
    resume_is_exact(Method::Daino);
}

#[test]
fn finished_run_writes_weights_and_refuses_overwrite() {
    let (_d, data) = tiny_dataset();
    let runs = tempfile::tempdir().unwrap();
    let out = runs.path().join("s");
    let mut c = tiny_config(Method::Supervised, &data, &out);
    c.epochs = 1;
    let stop = AtomicBool::new(false);
    let s = train(c.clone(), &quiet(), &stop).unwrap();
    assert!(!s.stopped);
    assert_eq!(s.steps, 5);
    let acc = s.last["val_acc1"];
    assert!((0.0..=100.0).contains(&acc));
    let (w, _) = read_tensors(&out.join("final.safetensors")).unwrap();
    assert!(w.contains_key("conv1.weight") && w.contains_key("prototypes.weight"));
    let cfg: TrainConfig =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg.num_classes, 10);
    // A second run into the same folder is refused without --force / --resume.
    let e = train(c.clone(), &quiet(), &stop).unwrap_err().to_string();
    assert!(e.contains("--resume") && e.contains("--force"), "{e}");
    // Resuming with different numbers is refused and names the setting.
    let mut other = c.clone();
    other.base_lr *= 2.0;
    let resume = RunOptions {
        resume: true,
        ..quiet()
    };
    let e = train(other, &resume, &stop).unwrap_err().to_string();
    assert!(e.contains("base_lr"), "{e}");
    // The evaluation command reads the checkpoint and gives the same accuracy.
    let m = sdengine::train::run::evaluate_run(&out, None).unwrap();
    assert_eq!(m["val_acc1"], acc);
}

#[test]
fn bad_settings_fail_before_work() {
    let (_d, data) = tiny_dataset();
    let runs = tempfile::tempdir().unwrap();
    let stop = AtomicBool::new(false);
    // More labelled images per batch than labelled images.
    let mut c = tiny_config(Method::Suave, &data, &runs.path().join("x"));
    c.lab_batch_size = 64;
    let e = train(c, &quiet(), &stop).unwrap_err().to_string();
    assert!(e.contains("labelled"), "{e}");
    // An output folder that cannot be created (below a file).
    let file = runs.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let c = tiny_config(Method::Suave, &data, &file.join("run"));
    assert!(train(c, &quiet(), &stop).is_err());
    // A missing data folder.
    let c = tiny_config(
        Method::Suave,
        &runs.path().join("nope"),
        &runs.path().join("y"),
    );
    let e = train(c, &quiet(), &stop).unwrap_err().to_string();
    assert!(e.contains("nope"), "{e}");
    // Resume without a checkpoint.
    let c = tiny_config(Method::Suave, &data, &runs.path().join("z"));
    let resume = RunOptions {
        resume: true,
        ..quiet()
    };
    let e = train(c, &resume, &stop).unwrap_err().to_string();
    assert!(e.contains("no checkpoint"), "{e}");
}

#[test]
fn diverging_run_stops_on_the_first_non_finite_loss() {
    let (_d, data) = tiny_dataset();
    let runs = tempfile::tempdir().unwrap();
    let out = runs.path().join("nan");
    let mut c = tiny_config(Method::Daino, &data, &out);
    c.base_lr = 1e30;
    c.warmup_epochs = 0;
    let stop = AtomicBool::new(false);
    let e = train(c, &quiet(), &stop).unwrap_err().to_string();
    assert!(e.contains("non-finite loss"), "{e}");
    assert!(e.contains("iteration"), "{e}");
    assert!(e.contains("checkpoint"), "{e}");
}
