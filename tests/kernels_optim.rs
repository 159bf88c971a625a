//! kernels/optim.cu through the CPU emulation against the engine's CPU optimisers: multi-tensor
//! LARS (`Lars::step`), AdamW with DINO's two groups (`AdamW::step`), the teacher EMA
//! (`ema_update`) and the DINO centre (`DinoCenter::update`, one rank and two ranks). Fresh
//! random tensors of awkward sizes, chunks smaller than most tensors so that one launch spans
//! many blocks and tensors, and several steps so that momentum / moments carry over.
//!
//! Parameters move by a tiny fraction of their value per step, so comparing the parameters alone
//! would pass even with a wrong update: every test compares the update `p_new − p_old` (and the
//! optimizer state) as well.

use half::bf16;
use sdengine::backend::emu::optim::{
    adamw_step, dino_center_colsum, dino_center_colsum_bf16, dino_center_update, ema_step,
    lars_step, AdamWScalars, AdamWSlot, EmaSlot, LarsSlot,
};
use sdengine::backend::emu::Mode;
use sdengine::dist::{LocalGroup, SingleProcess};
use sdengine::methods::dino_loss::DinoCenter;
use sdengine::nn::{Kind, ParamStore};
use sdengine::optim::{dino_group, ema_update, AdamW, AdamWState, Lars};
use sdengine::testing::rel_l2;
use sdengine::Tensor;

/// (name, shape, trainable). Sizes straddle the test chunk (100): 1, 13, 29, 51, 315, 1073, 2311.
const PARAMS: &[(&str, &[usize], bool)] = &[
    ("conv.weight", &[7, 3, 3, 5], true),
    ("fc.weight", &[37, 29], true),
    ("fc.bias", &[29], true),
    ("zero.weight", &[13], true),
    ("still.weight", &[51], true),
    ("frozen.weight", &[4, 4], false),
    ("one.weight", &[1], true),
    ("cls_token", &[1, 1, 19], true),
    ("head.last_layer.weight_g", &[23], true),
    ("big.weight", &[2311], true),
];
const CHUNK: usize = 100;

fn store(seed: u64) -> ParamStore {
    let mut s = ParamStore::new();
    for &(name, shape, trainable) in PARAMS {
        // A zero tensor takes LARS's non-adaptive branch (‖p‖ = 0).
        let v = if name == "zero.weight" {
            Tensor::zeros(shape)
        } else {
            Tensor::randn_named(seed, &format!("init.{name}"), shape, 1.0)
        };
        let id = s.param(name, v);
        s.set_trainable(id, trainable);
    }
    s.buffer("bn.running_mean", Tensor::full(&[3], 7.0));
    s
}

/// Fresh gradients for `step`; `still.weight` keeps a zero gradient (‖g‖ = 0 branch).
fn set_grads(s: &mut ParamStore, step: usize) {
    s.zero_grads();
    for &(name, shape, trainable) in PARAMS {
        if name == "still.weight" || !trainable {
            continue;
        }
        let id = s.id(name).expect("registered");
        let g = Tensor::randn_named(9, &format!("grad.{step}.{name}"), shape, 0.5);
        s.accumulate_grad(id, &g).expect("grad shape");
    }
}

fn trainable(s: &ParamStore) -> Vec<usize> {
    (0..s.entries().len())
        .filter(|&i| s.entries()[i].kind == (Kind::Param { trainable: true }))
        .collect()
}

fn delta(new: &[f32], old: &[f32]) -> Vec<f32> {
    new.iter().zip(old).map(|(a, b)| a - b).collect()
}

/// Worst relative L2 error of the parameters, of their updates, and bf16 shadow exactness.
fn compare_params(
    tag: &str,
    got: &[Vec<f32>],
    cpu: &ParamStore,
    old: &[Vec<f32>],
    ids: &[usize],
    shadow: &[Vec<bf16>],
) {
    let mut worst = (0.0f64, 0.0f64);
    for (k, &i) in ids.iter().enumerate() {
        let e = &cpu.entries()[i];
        let want = e.value.data();
        let ep = rel_l2(&got[k], want);
        let ed = rel_l2(&delta(&got[k], &old[k]), &delta(want, &old[k]));
        assert!(ep <= 1e-6, "{tag} {}: parameters off by {ep:.3e}", e.name);
        assert!(ed <= 1e-5, "{tag} {}: update off by {ed:.3e}", e.name);
        worst = (worst.0.max(ep), worst.1.max(ed));
        let exact = shadow[k]
            .iter()
            .zip(&got[k])
            .all(|(b, &p)| *b == bf16::from_f32(p));
        assert!(
            exact,
            "{tag} {}: bf16 shadow is not the rounded update",
            e.name
        );
    }
    eprintln!(
        "{tag}: worst relative L2 error: parameters {:.3e}, updates {:.3e}",
        worst.0, worst.1
    );
}

#[test]
fn lars_multi_tensor_matches_cpu_lars() {
    let mut cpu = store(1);
    let ids = trainable(&cpu);
    let mut lars = Lars::new(1e-4);
    let mut p: Vec<Vec<f32>> = ids
        .iter()
        .map(|&i| cpu.entries()[i].value.data().to_vec())
        .collect();
    let mut mom: Vec<Vec<f32>> = p.iter().map(|v| vec![0.0; v.len()]).collect();
    let mut shadow: Vec<Vec<bf16>> = p.iter().map(|v| vec![bf16::ZERO; v.len()]).collect();
    for (step, lr) in [0.3f32, 0.1, 0.05].into_iter().enumerate() {
        set_grads(&mut cpu, step);
        let old = p.clone();
        let grads: Vec<Vec<f32>> = ids
            .iter()
            .map(|&i| cpu.entries()[i].grad.data().to_vec())
            .collect();
        lars.step(&mut cpu, lr).expect("cpu lars");
        let mut slots: Vec<LarsSlot<'_>> = p
            .iter_mut()
            .zip(&grads)
            .zip(mom.iter_mut())
            .zip(shadow.iter_mut())
            .map(|(((p, g), m), b)| LarsSlot {
                param: p,
                grad: g,
                momentum_buf: m,
                param_bf16: Some(b),
                lr,
                weight_decay: lars.weight_decay,
            })
            .collect();
        // Threads mode: the norms are a shared-memory reduction.
        let (mode, threads) = if step == 1 {
            (Mode::Fibers, 256)
        } else {
            (Mode::Threads, 64)
        };
        lars_step(
            mode,
            &mut slots,
            lars.momentum,
            lars.eta,
            lars.eps,
            CHUNK,
            threads,
        )
        .expect("emu lars");
        let tag = format!("lars step {step}");
        compare_params(&tag, &p, &cpu, &old, &ids, &shadow);
        for (k, &i) in ids.iter().enumerate() {
            let name = &cpu.entries()[i].name;
            let e = rel_l2(&mom[k], &lars.buffers()[name]);
            assert!(e <= 1e-5, "{tag} {name}: momentum off by {e:.3e}");
        }
    }
    // The zero-gradient tensor never moved, the zero tensor moved (by its plain gradient).
    let still = ids
        .iter()
        .position(|&i| cpu.entries()[i].name == "still.weight")
        .unwrap();
    assert_eq!(p[still], cpu.value(cpu.id("still.weight").unwrap()).data());
    let zero = ids
        .iter()
        .position(|&i| cpu.entries()[i].name == "zero.weight")
        .unwrap();
    assert!(p[zero].iter().any(|&v| v != 0.0));
}

#[test]
fn adamw_multi_tensor_matches_cpu_adamw_with_groups_and_resumed_state() {
    let mut cpu = store(2);
    let ids = trainable(&cpu);
    let mut adamw = AdamW::new();
    // One tensor resumes from a checkpoint at step 5 with non-zero moments: its bias corrections
    // differ from the others', which the per-tensor scalars must carry.
    let resumed = "fc.weight";
    let n_res = cpu.value(cpu.id(resumed).unwrap()).numel();
    let m0 = Tensor::randn_named(3, "m0", &[n_res], 0.1).into_vec();
    let v0: Vec<f32> = Tensor::randn_named(3, "v0", &[n_res], 0.1)
        .data()
        .iter()
        .map(|v| v * v)
        .collect();
    let mut state = std::collections::BTreeMap::new();
    state.insert(
        resumed.to_string(),
        AdamWState {
            step: 5,
            exp_avg: m0.clone(),
            exp_avg_sq: v0.clone(),
        },
    );
    adamw.set_state(state);

    let mut p: Vec<Vec<f32>> = ids
        .iter()
        .map(|&i| cpu.entries()[i].value.data().to_vec())
        .collect();
    let mut steps: Vec<u64> = ids
        .iter()
        .map(|&i| {
            if cpu.entries()[i].name == resumed {
                5
            } else {
                0
            }
        })
        .collect();
    let mut m: Vec<Vec<f32>> = ids
        .iter()
        .map(|&i| {
            if cpu.entries()[i].name == resumed {
                m0.clone()
            } else {
                vec![0.0; cpu.entries()[i].value.numel()]
            }
        })
        .collect();
    let mut v: Vec<Vec<f32>> = ids
        .iter()
        .map(|&i| {
            if cpu.entries()[i].name == resumed {
                v0.clone()
            } else {
                vec![0.0; cpu.entries()[i].value.numel()]
            }
        })
        .collect();
    let mut shadow: Vec<Vec<bf16>> = p.iter().map(|v| vec![bf16::ZERO; v.len()]).collect();
    for (step, (lr, wd)) in [(0.01, 0.04), (0.02, 0.1), (0.005, 0.3)]
        .into_iter()
        .enumerate()
    {
        set_grads(&mut cpu, step);
        adamw.set_schedule(lr, wd);
        let old = p.clone();
        let grads: Vec<Vec<f32>> = ids
            .iter()
            .map(|&i| cpu.entries()[i].grad.data().to_vec())
            .collect();
        adamw.step(&mut cpu).expect("cpu adamw");
        let scalars: Vec<AdamWScalars> = ids
            .iter()
            .zip(steps.iter_mut())
            .map(|(&i, k)| {
                let e = &cpu.entries()[i];
                let h = adamw.groups[dino_group(&e.name, e.value.shape())];
                *k += 1;
                AdamWScalars::new(h.lr, h.weight_decay, adamw.beta1, adamw.beta2, *k)
            })
            .collect();
        let mut slots: Vec<AdamWSlot<'_>> = p
            .iter_mut()
            .zip(&grads)
            .zip(m.iter_mut().zip(v.iter_mut()))
            .zip(shadow.iter_mut().zip(&scalars))
            .map(|(((p, g), (m, v)), (b, s))| AdamWSlot {
                param: p,
                grad: g,
                exp_avg: m,
                exp_avg_sq: v,
                param_bf16: Some(b),
                scalars: *s,
            })
            .collect();
        adamw_step(
            Mode::Fibers,
            &mut slots,
            adamw.beta1,
            adamw.beta2,
            adamw.eps,
            CHUNK,
            96,
        )
        .expect("emu adamw");
        let tag = format!("adamw step {step}");
        compare_params(&tag, &p, &cpu, &old, &ids, &shadow);
        for (k, &i) in ids.iter().enumerate() {
            let name = &cpu.entries()[i].name;
            let st = &adamw.state()[name];
            assert_eq!(st.step, steps[k], "{tag} {name}: step count");
            let (em, ev) = (rel_l2(&m[k], &st.exp_avg), rel_l2(&v[k], &st.exp_avg_sq));
            assert!(
                em <= 1e-6 && ev <= 1e-6,
                "{tag} {name}: moments off by {em:.3e} / {ev:.3e}"
            );
        }
    }
}

#[test]
fn ema_multi_tensor_matches_cpu_ema() {
    let mut teacher = store(4);
    let student = store(5);
    // Every parameter, frozen or not; buffers are not part of the EMA.
    let ids: Vec<usize> = (0..teacher.entries().len())
        .filter(|&i| matches!(teacher.entries()[i].kind, Kind::Param { .. }))
        .collect();
    let mut t: Vec<Vec<f32>> = ids
        .iter()
        .map(|&i| teacher.entries()[i].value.data().to_vec())
        .collect();
    let s: Vec<Vec<f32>> = ids
        .iter()
        .map(|&i| student.entries()[i].value.data().to_vec())
        .collect();
    let mut shadow: Vec<Vec<bf16>> = t.iter().map(|v| vec![bf16::ZERO; v.len()]).collect();
    for (step, momentum) in [0.996, 0.7, 1.0].into_iter().enumerate() {
        let old = t.clone();
        ema_update(&mut teacher, &student, momentum).expect("cpu ema");
        let mut slots: Vec<EmaSlot<'_>> = t
            .iter_mut()
            .zip(&s)
            .zip(shadow.iter_mut())
            .map(|((t, s), b)| EmaSlot {
                teacher: t,
                student: s,
                teacher_bf16: Some(b),
            })
            .collect();
        ema_step(Mode::Fibers, &mut slots, momentum, CHUNK, 64).expect("emu ema");
        let tag = format!("ema step {step} (m = {momentum})");
        compare_params(&tag, &t, &teacher, &old, &ids, &shadow);
    }
    let mut none: Vec<EmaSlot<'_>> = Vec::new();
    assert!(
        ema_step(Mode::Fibers, &mut none, 1.5, CHUNK, 64).is_err(),
        "momentum outside [0, 1]"
    );
}

const K: usize = 1037;
const BS: usize = 6;

fn logits(rank: usize, view: usize) -> Tensor<f32> {
    Tensor::randn_named(7, &format!("teacher.{rank}.{view}"), &[BS, K], 3.0)
}

fn initial_center() -> Vec<f32> {
    Tensor::randn_named(7, "center0", &[K], 0.5).into_vec()
}

/// Column sums of this rank's two views with the kernel (the second launch accumulates).
fn colsums(views: &[Tensor<f32>], bf: bool) -> Vec<f64> {
    let mut s = vec![f64::NAN; K];
    for (i, v) in views.iter().enumerate() {
        if bf {
            let b: Vec<bf16> = v.data().iter().map(|&x| bf16::from_f32(x)).collect();
            dino_center_colsum_bf16(Mode::Fibers, &b, BS, K, &mut s, i > 0, 128)
                .expect("colsum bf16");
        } else {
            dino_center_colsum(Mode::Fibers, v.data(), BS, K, &mut s, i > 0, 128).expect("colsum");
        }
    }
    s
}

#[test]
fn dino_center_matches_cpu_on_one_rank_f32_and_bf16() {
    for bf in [false, true] {
        let mut views = vec![logits(0, 0), logits(0, 1)];
        if bf {
            // The CPU reference sees exactly the bf16 values the kernel reads.
            for v in views.iter_mut() {
                *v = v.to_bf16().to_f32();
            }
        }
        let mut cpu = DinoCenter::<f32>::new(K);
        cpu.center = initial_center();
        let mut center = cpu.center.clone();
        for _ in 0..2 {
            cpu.update(&views, &SingleProcess).expect("cpu centre");
            let s = colsums(&views, bf);
            dino_center_update(
                Mode::Fibers,
                &mut center,
                &s,
                (2 * BS) as f64,
                cpu.momentum,
                64,
            )
            .expect("update");
        }
        let start = initial_center();
        let e = rel_l2(&delta(&center, &start), &delta(&cpu.center, &start));
        assert!(e <= 1e-6, "centre (bf16 input: {bf}) off by {e:.3e}");
    }
}

#[test]
fn dino_center_column_sums_all_reduce_like_the_cpu_over_two_ranks() {
    const WORLD: usize = 2;
    let comms = LocalGroup::new(WORLD).expect("group");
    let cpu: Vec<Vec<f32>> = std::thread::scope(|sc| {
        let hs: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(r, comm)| {
                sc.spawn(move || {
                    let mut c = DinoCenter::<f32>::new(K);
                    c.center = initial_center();
                    c.update(&[logits(r, 0), logits(r, 1)], &comm)
                        .expect("cpu centre");
                    c.center
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    });
    assert_eq!(cpu[0], cpu[1]);
    // The kernel's column sums of each rank, summed in rank order as the all-reduce does.
    let per_rank: Vec<Vec<f64>> = (0..WORLD)
        .map(|r| colsums(&[logits(r, 0), logits(r, 1)], false))
        .collect();
    let reduced: Vec<f64> = (0..K)
        .map(|k| per_rank.iter().map(|s| s[k]).sum())
        .collect();
    let mut center = initial_center();
    dino_center_update(
        Mode::Threads,
        &mut center,
        &reduced,
        (2 * BS * WORLD) as f64,
        0.9,
        64,
    )
    .expect("update");
    let start = initial_center();
    let e = rel_l2(&delta(&center, &start), &delta(&cpu[0], &start));
    assert!(e <= 1e-6, "two-rank centre off by {e:.3e}");
}
