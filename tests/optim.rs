//! Parity of src/optim with tests/reference/optim.py: the official schedules (numpy, f64) and
//! five steps of LARS, AdamW and the teacher EMA (PyTorch, f32) on a small parameter set with a
//! zero-initialised parameter, an intermittent and a permanent zero gradient, a frozen parameter
//! and a weight-norm `weight_g` (engine `[out]`, PyTorch `[out, 1]`).

use sdengine::nn::ParamStore;
use sdengine::optim::{ema_update, AdamW, CosineSchedule, Lars, TeacherTempSchedule};
use sdengine::testing::{assert_close, fixtures_dir, rel_l2, Fixtures};
use sdengine::Tensor;
use std::collections::HashMap;

const STEPS: usize = 5;
/// (name, engine shape, trainable), as PARAMS in the script.
const PARAMS: &[(&str, &[usize], bool)] = &[
    ("conv.weight", &[4, 3, 3, 3], true),
    ("fc.bias", &[6], true),
    ("fc.weight", &[5, 4], true),
    ("norm.weight", &[6], true),
    ("still.weight", &[3, 2], true),
    ("frozen.weight", &[2, 2], false),
    ("head.last_layer.weight_g", &[5], true),
];
const LARS_LR: [f32; STEPS] = [0.1, 0.2, 0.3, 0.25, 0.05];
const ADAMW_LR: [f64; STEPS] = [0.01, 0.02, 0.05, 0.03, 0.001];
const ADAMW_WD: [f64; STEPS] = [0.04, 0.1, 0.4, 0.2, 0.3];
const EMA_M: [f64; STEPS] = [0.99, 0.995, 0.9, 0.5, 1.0];
/// Elementwise f32 updates: only rounding differs from PyTorch.
const TOL: f64 = 1e-6;

fn store() -> ParamStore {
    let mut s = ParamStore::new();
    for &(name, shape, trainable) in PARAMS {
        let v = if name == "fc.bias" {
            Tensor::zeros(shape)
        } else {
            Tensor::randn_named(0, &format!("init.{name}"), shape, 1.0)
        };
        let id = s.param(name, v);
        s.set_trainable(id, trainable);
    }
    // A buffer no optimiser or EMA may touch.
    s.buffer("bn.running_mean", Tensor::full(&[3], 7.0));
    s
}

fn set_grads(s: &mut ParamStore, step: usize) {
    s.zero_grads();
    for &(name, shape, _) in PARAMS {
        if name == "still.weight" || (name == "fc.weight" && step == 2) {
            continue;
        }
        let id = s.id(name).expect("registered");
        let g = Tensor::randn_named(0, &format!("grad.{step}.{name}"), shape, 1.0);
        s.accumulate_grad(id, &g).expect("grad shape");
    }
}

/// Largest error over the parameters after each step; checks the buffer is untouched.
fn check_params(fx: &Fixtures, tag: &str, step: usize, s: &ParamStore) -> f64 {
    let mut worst = 0.0f64;
    for &(name, _, _) in PARAMS {
        let got = s.value(s.id(name).expect("registered"));
        let want = fx.get(&format!("{tag}.{step}.{name}")).expect("fixture");
        assert_close(&format!("{tag} step {step} {name}"), got, want, TOL);
        worst = worst.max(rel_l2(got.data(), want.data()));
    }
    let b = s.value(s.id("bn.running_mean").expect("buffer"));
    assert_eq!(b.data(), &[7.0; 3], "{tag}: a buffer changed");
    worst
}

fn check_flat(fx: &Fixtures, what: &str, got: &[f32]) -> f64 {
    let want = fx.get(what).expect("fixture");
    let e = rel_l2(got, want.data());
    assert!(e <= TOL, "{what}: relative L2 error {e:.3e}");
    e
}

fn lars_case(tag: &str, eta: f32, wd: f32) {
    let fx = Fixtures::open("optim/steps.safetensors").expect("fixture file");
    let mut s = store();
    let mut opt = Lars::new(wd);
    opt.eta = eta;
    let (mut wp, mut wb) = (0.0f64, 0.0f64);
    for (step, &lr) in LARS_LR.iter().enumerate() {
        set_grads(&mut s, step);
        opt.step(&mut s, lr).expect("step");
        wp = wp.max(check_params(&fx, tag, step, &s));
        for &(name, _, trainable) in PARAMS {
            let b = opt.buffers().get(name);
            assert_eq!(b.is_some(), trainable, "{name}: momentum buffer presence");
            if let Some(b) = b {
                wb = wb.max(check_flat(&fx, &format!("{tag}.buf.{step}.{name}"), b));
            }
        }
    }
    // The zero-gradient parameter at step 2 still moved (momentum), the frozen one did not.
    let fc_before = fx.get(&format!("{tag}.1.fc.weight")).expect("fixture");
    let fc_after = fx.get(&format!("{tag}.2.fc.weight")).expect("fixture");
    assert_ne!(fc_before.data(), fc_after.data());
    println!("{tag}: params max rel err {wp:.2e}, momentum buffers {wb:.2e}");
}

#[test]
fn lars_matches_apex_larc_sgd() {
    lars_case("lars", 0.001, 1e-6);
}

#[test]
fn lars_large_eta_and_weight_decay() {
    lars_case("lars_big", 0.5, 0.05);
}

#[test]
fn lars_state_survives_a_checkpoint() {
    // Save the buffers after 2 steps, restore into a fresh optimiser: same result as straight.
    let mut a = store();
    let mut oa = Lars::new(0.05);
    let mut b = store();
    let mut ob = Lars::new(0.05);
    for step in 0..4 {
        set_grads(&mut a, step);
        oa.step(&mut a, 0.1).expect("step");
        set_grads(&mut b, step);
        ob.step(&mut b, 0.1).expect("step");
        if step == 1 {
            let saved = ob.buffers().clone();
            ob = Lars::new(0.05);
            ob.set_buffers(saved);
        }
    }
    for e in a.entries() {
        let id = b.id(&e.name).expect("same names");
        assert_eq!(e.value.data(), b.value(id).data(), "{}", e.name);
    }
    let mut bad = oa.buffers().clone();
    bad.insert("fc.weight".into(), vec![0.0; 3]);
    oa.set_buffers(bad);
    let err = oa.step(&mut a, 0.1).unwrap_err().to_string();
    assert!(err.contains("fc.weight"), "{err}");
}

#[test]
fn adamw_matches_torch_with_dino_groups() {
    let fx = Fixtures::open("optim/steps.safetensors").expect("fixture file");
    let mut s = store();
    let mut opt = AdamW::new();
    let (mut wp, mut wm) = (0.0f64, 0.0f64);
    for step in 0..STEPS {
        set_grads(&mut s, step);
        opt.set_schedule(ADAMW_LR[step], ADAMW_WD[step]);
        assert_eq!(opt.groups[1].weight_decay, 0.0);
        opt.step(&mut s).expect("step");
        wp = wp.max(check_params(&fx, "adamw", step, &s));
        for &(name, _, trainable) in PARAMS {
            let st = opt.state().get(name);
            assert_eq!(st.is_some(), trainable, "{name}: state presence");
            if let Some(st) = st {
                assert_eq!(st.step, step as u64 + 1);
                wm = wm.max(check_flat(
                    &fx,
                    &format!("adamw.m.{step}.{name}"),
                    &st.exp_avg,
                ));
                wm = wm.max(check_flat(
                    &fx,
                    &format!("adamw.v.{step}.{name}"),
                    &st.exp_avg_sq,
                ));
            }
        }
    }
    println!("adamw: params max rel err {wp:.2e}, moments {wm:.2e}");
}

#[test]
fn adamw_state_survives_a_checkpoint() {
    let mut a = store();
    let mut oa = AdamW::new();
    let mut b = store();
    let mut ob = AdamW::new();
    for step in 0..4 {
        for (s, o) in [(&mut a, &mut oa), (&mut b, &mut ob)] {
            set_grads(s, step);
            o.set_schedule(0.01, 0.1);
            o.step(s).expect("step");
        }
        if step == 1 {
            let saved = ob.state().clone();
            ob = AdamW::new();
            ob.set_state(saved);
        }
    }
    for e in a.entries() {
        let id = b.id(&e.name).expect("same names");
        assert_eq!(e.value.data(), b.value(id).data(), "{}", e.name);
    }
}

#[test]
fn ema_matches_dino_over_parameters_only() {
    let fx = Fixtures::open("optim/steps.safetensors").expect("fixture file");
    let mut teacher = ParamStore::new();
    for &(name, shape, _) in PARAMS {
        let id = teacher.param(
            name,
            Tensor::randn_named(0, &format!("teacher.{name}"), shape, 1.0),
        );
        teacher.set_trainable(id, false);
    }
    teacher.buffer("bn.running_mean", Tensor::full(&[3], 7.0));
    let mut worst = 0.0f64;
    for (step, &m) in EMA_M.iter().enumerate() {
        let mut student = ParamStore::new();
        for &(name, shape, trainable) in PARAMS {
            let v = Tensor::randn_named(0, &format!("student.{step}.{name}"), shape, 1.0);
            let id = student.param(name, v);
            student.set_trainable(id, trainable);
        }
        student.buffer("bn.running_mean", Tensor::full(&[3], -1.0));
        ema_update(&mut teacher, &student, m).expect("ema");
        worst = worst.max(check_params(&fx, "ema", step, &teacher));
    }
    println!("ema: max rel err {worst:.2e}");
}

#[test]
fn ema_rejects_mismatched_stores() {
    let mut t = ParamStore::new();
    t.param("a.weight", Tensor::zeros(&[2]));
    let mut s = ParamStore::new();
    s.param("a.weight", Tensor::zeros(&[3]));
    assert!(ema_update(&mut t, &s, 0.9).is_err());
    let mut s = ParamStore::new();
    s.param("b.weight", Tensor::zeros(&[2]));
    assert!(ema_update(&mut t, &s, 0.9).is_err());
    let mut s = ParamStore::new();
    s.param("a.weight", Tensor::zeros(&[2]));
    s.param("b.weight", Tensor::zeros(&[2]));
    assert!(ema_update(&mut t, &s, 0.9).is_err());
    let same = t.clone();
    assert!(ema_update(&mut t, &same, 1.5).is_err());
}

/// f64 / i64 tensors of the schedule fixture (Fixtures rounds to f32, too coarse here).
fn read_f64(name: &str) -> HashMap<String, Vec<f64>> {
    let path = fixtures_dir().join(name);
    let bytes = std::fs::read(&path).expect("schedule fixture");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut out = HashMap::new();
    for (k, v) in st.tensors() {
        let vals: Vec<f64> = v
            .data()
            .chunks_exact(8)
            .map(|c| {
                let b: [u8; 8] = c.try_into().expect("8 bytes");
                match v.dtype() {
                    safetensors::Dtype::F64 => f64::from_le_bytes(b),
                    safetensors::Dtype::I64 => i64::from_le_bytes(b) as f64,
                    d => panic!("{k}: unexpected dtype {d:?}"),
                }
            })
            .collect();
        out.insert(k.to_string(), vals);
    }
    out
}

/// Largest relative difference over the sampled iterations; panics above 1e-13.
fn check_schedule(fx: &HashMap<String, Vec<f64>>, key: &str, s: &CosineSchedule) -> f64 {
    let idx = &fx[&format!("{key}.idx")];
    let val = &fx[&format!("{key}.val")];
    let mut worst = 0.0f64;
    for (&i, &want) in idx.iter().zip(val) {
        let got = s.at(i as usize).expect("in range");
        let e = (got - want).abs() / want.abs().max(1e-300);
        assert!(e <= 1e-13, "{key}[{i}]: {got:e} vs {want:e} (rel {e:.2e})");
        worst = worst.max(e);
    }
    worst
}

#[test]
fn schedules_match_the_official_numpy_code() {
    let fx = read_f64("optim/schedules.safetensors");
    let cases = [
        (
            "suave",
            CosineSchedule::suave_lr(0.4, 0.001, 100, 5004, 5, 0.0),
        ),
        (
            "swav",
            CosineSchedule::suave_lr(4.8, 0.0048, 800, 312, 10, 0.3),
        ),
        (
            "dino_lr",
            CosineSchedule::dino_lr(0.00024, 64, 16, 1e-5, 60, 1251, 4),
        ),
        (
            "dino_wd",
            CosineSchedule::dino_weight_decay(0.04, 0.4, 60, 1251),
        ),
        (
            "dino_momentum",
            CosineSchedule::dino_teacher_momentum(0.990, 60, 1251),
        ),
    ];
    for (key, s) in cases {
        let s = s.expect("valid schedule");
        let e = check_schedule(&fx, key, &s);
        println!("{key}: {} iterations, max rel err {e:.2e}", s.len());
    }
    let suave = CosineSchedule::suave_lr(0.4, 0.001, 100, 5004, 5, 0.0).expect("valid");
    assert_eq!(suave.len(), 500_400);
    assert_eq!(suave.at(0).expect("in range"), 0.0);
    assert_eq!(suave.at(5 * 5004 - 1).expect("in range"), 0.4);
    assert_eq!(suave.at(5 * 5004).expect("in range"), 0.4);

    let small = CosineSchedule::new(1.0, 0.1, 3, 7, 1, 0.5)
        .expect("valid")
        .values();
    let want = &fx["small.val"];
    assert_eq!(small.len(), want.len());
    for (i, (g, w)) in small.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-15 * w.abs(), "small[{i}]: {g} vs {w}");
    }
    for (key, s) in [
        ("temp_daino", TeacherTempSchedule::new(0.04, 0.07, 10, 60)),
        ("temp_dino", TeacherTempSchedule::new(0.04, 0.04, 0, 100)),
    ] {
        let s = s.expect("valid");
        let want = &fx[&format!("{key}.val")];
        assert_eq!(s.len(), want.len());
        for (e, &w) in want.iter().enumerate() {
            assert_eq!(s.at(e).expect("in range"), w, "{key} epoch {e}");
        }
    }
}
