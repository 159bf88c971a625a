//! kernels/optim.cu through its device ops (`backend::device::optim`) on the CPU emulation
//! (`Emu`, fibers and threads) against the engine's CPU optimisers: multi-tensor
//! LARS (`Lars::step`), AdamW with DINO's two groups (`AdamW::step`), the teacher EMA
//! (`ema_update`) and the DINO centre (`DinoCenter::update`, one rank and two ranks). Fresh
//! random tensors of awkward sizes, chunks smaller than most tensors so that one launch spans
//! many blocks and tensors, and several steps so that momentum / moments carry over.
//!
//! Parameters move by a tiny fraction of their value per step, so comparing the parameters alone
//! would pass even with a wrong update: every test compares the update `p_new − p_old` (and the
//! optimizer state) as well. Outputs the kernels write in full (bf16 shadows, partial norms,
//! column sums) come from `alloc`, which the emulation poisons with NaN, so a kernel that leaves
//! any element unwritten fails here.

use half::bf16;
use sdengine::backend::device::optim::{
    adamw_step, chunk_layout, dino_center_colsum, dino_center_colsum_accumulate,
    dino_center_update, ema_step, lars_norms, lars_step, lars_update, AdamWScalars, AdamWSlot,
    EmaSlot, LarsSlot,
};
use sdengine::backend::device::{Emu, Exec, HostBuf, Mode};
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

type Buf<T> = HostBuf<T>;

/// Uploads each vector to the emulated device.
fn upload_all(ex: &Emu, v: &[Vec<f32>]) -> Vec<Buf<f32>> {
    v.iter().map(|x| ex.upload(x).expect("upload")).collect()
}

/// Downloads each buffer.
fn download_all<T: sdengine::backend::device::Elem>(ex: &Emu, v: &[Buf<T>]) -> Vec<Vec<T>> {
    v.iter()
        .map(|b| ex.download(b).expect("download"))
        .collect()
}

/// Poisoned (NaN-filled) bf16 shadows of the given lengths: the kernels must write every element.
fn shadows(ex: &Emu, v: &[Vec<f32>]) -> Vec<Buf<bf16>> {
    v.iter()
        .map(|x| ex.alloc::<bf16>(x.len()).expect("alloc"))
        .collect()
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

fn lars_slots<'a>(
    p: &'a mut [Buf<f32>],
    g: &'a [Buf<f32>],
    m: &'a mut [Buf<f32>],
    b: &'a mut [Buf<bf16>],
    lr: f32,
    wd: f32,
) -> Vec<LarsSlot<'a, Emu>> {
    p.iter_mut()
        .zip(g)
        .zip(m.iter_mut())
        .zip(b.iter_mut())
        .map(|(((p, g), m), b)| LarsSlot {
            param: p,
            grad: g,
            momentum_buf: m,
            param_bf16: Some(b),
            lr,
            weight_decay: wd,
        })
        .collect()
}

#[test]
fn lars_multi_tensor_matches_cpu_lars() {
    let mut cpu = store(1);
    let ids = trainable(&cpu);
    let mut lars = Lars::new(1e-4);
    let host: Vec<Vec<f32>> = ids
        .iter()
        .map(|&i| cpu.entries()[i].value.data().to_vec())
        .collect();
    let setup = Emu::new(Mode::Fibers);
    let mut p = upload_all(&setup, &host);
    // The momentum buffers start at zero, as the contract requires.
    let mut mom: Vec<Buf<f32>> = host
        .iter()
        .map(|v| setup.zeros(v.len()).expect("zeros"))
        .collect();
    let mut shadow = shadows(&setup, &host);
    for (step, lr) in [0.3f32, 0.1, 0.05].into_iter().enumerate() {
        set_grads(&mut cpu, step);
        let old = download_all(&setup, &p);
        let grads: Vec<Vec<f32>> = ids
            .iter()
            .map(|&i| cpu.entries()[i].grad.data().to_vec())
            .collect();
        let g = upload_all(&setup, &grads);
        lars.step(&mut cpu, lr).expect("cpu lars");
        // Threads mode: the norms are a shared-memory reduction.
        let (mode, threads) = if step == 1 {
            (Mode::Fibers, 256)
        } else {
            (Mode::Threads, 64)
        };
        let ex = Emu::new(mode);
        let mut slots = lars_slots(&mut p, &g, &mut mom, &mut shadow, lr, lars.weight_decay);
        lars_step(
            &ex,
            &mut slots,
            lars.momentum,
            lars.eta,
            lars.eps,
            CHUNK,
            threads,
        )
        .expect("emu lars");
        drop(slots);
        let tag = format!("lars step {step}");
        let got = download_all(&ex, &p);
        compare_params(&tag, &got, &cpu, &old, &ids, &download_all(&ex, &shadow));
        let moms = download_all(&ex, &mom);
        for (k, &i) in ids.iter().enumerate() {
            let name = &cpu.entries()[i].name;
            let e = rel_l2(&moms[k], &lars.buffers()[name]);
            assert!(e <= 1e-5, "{tag} {name}: momentum off by {e:.3e}");
        }
    }
    // The zero-gradient tensor never moved, the zero tensor moved (by its plain gradient).
    let got = download_all(&setup, &p);
    let still = ids
        .iter()
        .position(|&i| cpu.entries()[i].name == "still.weight")
        .unwrap();
    assert_eq!(
        got[still],
        cpu.value(cpu.id("still.weight").unwrap()).data()
    );
    let zero = ids
        .iter()
        .position(|&i| cpu.entries()[i].name == "zero.weight")
        .unwrap();
    assert!(got[zero].iter().any(|&v| v != 0.0));
}

#[test]
fn lars_passes_one_at_a_time_give_the_cpu_norms_and_the_fused_step() {
    // lars_norms' partial sums, re-added per tensor, are the f64 sums of squares the CPU takes;
    // lars_update with them gives exactly what lars_step gives.
    let cpu = {
        let mut s = store(6);
        set_grads(&mut s, 0);
        s
    };
    let ids = trainable(&cpu);
    let host_p: Vec<Vec<f32>> = ids
        .iter()
        .map(|&i| cpu.entries()[i].value.data().to_vec())
        .collect();
    let host_g: Vec<Vec<f32>> = ids
        .iter()
        .map(|&i| cpu.entries()[i].grad.data().to_vec())
        .collect();
    let ex = Emu::new(Mode::Threads);
    let g = upload_all(&ex, &host_g);
    let mut runs = Vec::new();
    for split in [false, true] {
        let mut p = upload_all(&ex, &host_p);
        let mut mom: Vec<Buf<f32>> = upload_all(&ex, &host_g);
        let mut sh = shadows(&ex, &host_p);
        let mut slots = lars_slots(&mut p, &g, &mut mom, &mut sh, 0.2, 1e-4);
        if split {
            let partial = lars_norms(&ex, &slots, CHUNK, 96).expect("norms");
            let part = ex.download(&partial).expect("download");
            assert!(
                part.iter().all(|v| v.is_finite()),
                "partial sums left unwritten"
            );
            let sizes: Vec<usize> = host_p.iter().map(|v| v.len()).collect();
            let (starts, total) = chunk_layout(&sizes, CHUNK).expect("layout");
            assert_eq!(part.len(), 2 * total as usize);
            for (k, (pv, gv)) in host_p.iter().zip(&host_g).enumerate() {
                let c0 = starts[k] as usize;
                let nch = pv.len().div_ceil(CHUNK);
                let ps: f64 = (c0..c0 + nch).map(|c| part[2 * c]).sum();
                let gs: f64 = (c0..c0 + nch).map(|c| part[2 * c + 1]).sum();
                let wp: f64 = pv.iter().map(|&v| v as f64 * v as f64).sum();
                let wg: f64 = gv.iter().map(|&v| v as f64 * v as f64).sum();
                assert!(
                    (ps - wp).abs() <= 1e-12 * wp.max(1.0),
                    "tensor {k}: Σp² {ps} vs {wp}"
                );
                assert!(
                    (gs - wg).abs() <= 1e-12 * wg.max(1.0),
                    "tensor {k}: Σg² {gs} vs {wg}"
                );
            }
            let short = ex.alloc::<f64>(part.len() - 1).expect("alloc");
            let e = lars_update(&ex, &mut slots, &short, 0.9, 1e-3, 1e-8, CHUNK, 96).unwrap_err();
            assert!(e.to_string().contains("partial norms"), "{e}");
            lars_update(&ex, &mut slots, &partial, 0.9, 1e-3, 1e-8, CHUNK, 96).expect("update");
        } else {
            lars_step(&ex, &mut slots, 0.9, 1e-3, 1e-8, CHUNK, 96).expect("step");
        }
        drop(slots);
        runs.push((download_all(&ex, &p), download_all(&ex, &mom)));
    }
    assert_eq!(runs[0], runs[1], "two passes differ from lars_step");
    assert_ne!(runs[0].0, host_p, "parameters did not move");
}

fn adamw_slots<'a>(
    p: &'a mut [Buf<f32>],
    g: &'a [Buf<f32>],
    m: &'a mut [Buf<f32>],
    v: &'a mut [Buf<f32>],
    b: &'a mut [Buf<bf16>],
    s: &'a [AdamWScalars],
) -> Vec<AdamWSlot<'a, Emu>> {
    p.iter_mut()
        .zip(g)
        .zip(m.iter_mut().zip(v.iter_mut()))
        .zip(b.iter_mut().zip(s))
        .map(|(((p, g), (m, v)), (b, s))| AdamWSlot {
            param: p,
            grad: g,
            exp_avg: m,
            exp_avg_sq: v,
            param_bf16: Some(b),
            scalars: *s,
        })
        .collect()
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

    let host: Vec<Vec<f32>> = ids
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
    let setup = Emu::new(Mode::Fibers);
    let moment = |m0: &Vec<f32>, i: usize| {
        if cpu.entries()[i].name == resumed {
            setup.upload(m0).expect("upload")
        } else {
            setup.zeros(cpu.entries()[i].value.numel()).expect("zeros")
        }
    };
    let mut m: Vec<Buf<f32>> = ids.iter().map(|&i| moment(&m0, i)).collect();
    let mut v: Vec<Buf<f32>> = ids.iter().map(|&i| moment(&v0, i)).collect();
    let mut p = upload_all(&setup, &host);
    let mut shadow = shadows(&setup, &host);
    for (step, (lr, wd)) in [(0.01, 0.04), (0.02, 0.1), (0.005, 0.3)]
        .into_iter()
        .enumerate()
    {
        set_grads(&mut cpu, step);
        adamw.set_schedule(lr, wd);
        let old = download_all(&setup, &p);
        let grads: Vec<Vec<f32>> = ids
            .iter()
            .map(|&i| cpu.entries()[i].grad.data().to_vec())
            .collect();
        let g = upload_all(&setup, &grads);
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
        // The last step runs with a thread per CUDA thread as well.
        let ex = Emu::new(if step == 2 {
            Mode::Threads
        } else {
            Mode::Fibers
        });
        let mut slots = adamw_slots(&mut p, &g, &mut m, &mut v, &mut shadow, &scalars);
        adamw_step(
            &ex,
            &mut slots,
            adamw.beta1,
            adamw.beta2,
            adamw.eps,
            CHUNK,
            96,
        )
        .expect("emu adamw");
        drop(slots);
        let tag = format!("adamw step {step}");
        let got = download_all(&ex, &p);
        compare_params(&tag, &got, &cpu, &old, &ids, &download_all(&ex, &shadow));
        let (mh, vh) = (download_all(&ex, &m), download_all(&ex, &v));
        for (k, &i) in ids.iter().enumerate() {
            let name = &cpu.entries()[i].name;
            let st = &adamw.state()[name];
            assert_eq!(st.step, steps[k], "{tag} {name}: step count");
            let (em, ev) = (rel_l2(&mh[k], &st.exp_avg), rel_l2(&vh[k], &st.exp_avg_sq));
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
    let host_t: Vec<Vec<f32>> = ids
        .iter()
        .map(|&i| teacher.entries()[i].value.data().to_vec())
        .collect();
    let host_s: Vec<Vec<f32>> = ids
        .iter()
        .map(|&i| student.entries()[i].value.data().to_vec())
        .collect();
    let setup = Emu::new(Mode::Fibers);
    let mut t = upload_all(&setup, &host_t);
    let s = upload_all(&setup, &host_s);
    let mut shadow = shadows(&setup, &host_t);
    for (step, momentum) in [0.996, 0.7, 1.0].into_iter().enumerate() {
        let old = download_all(&setup, &t);
        ema_update(&mut teacher, &student, momentum).expect("cpu ema");
        let ex = Emu::new(if step == 1 {
            Mode::Threads
        } else {
            Mode::Fibers
        });
        let mut slots: Vec<EmaSlot<'_, Emu>> = t
            .iter_mut()
            .zip(&s)
            .zip(shadow.iter_mut())
            .map(|((t, s), b)| EmaSlot {
                teacher: t,
                student: s,
                teacher_bf16: Some(b),
            })
            .collect();
        ema_step(&ex, &mut slots, momentum, CHUNK, 64).expect("emu ema");
        drop(slots);
        let tag = format!("ema step {step} (m = {momentum})");
        let got = download_all(&ex, &t);
        compare_params(
            &tag,
            &got,
            &teacher,
            &old,
            &ids,
            &download_all(&ex, &shadow),
        );
    }
    let mut none: Vec<EmaSlot<'_, Emu>> = Vec::new();
    assert!(
        ema_step(&setup, &mut none, 1.5, CHUNK, 64).is_err(),
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

/// Column sums of this rank's two views with the kernel: the first launch writes a new
/// (poisoned) buffer, the second accumulates into it.
fn colsums(ex: &Emu, views: &[Tensor<f32>], bf: bool) -> Buf<f64> {
    let mut s: Option<Buf<f64>> = None;
    for v in views {
        if bf {
            let b = ex.upload_bf16(v.data()).expect("upload");
            match s.as_mut() {
                None => s = Some(dino_center_colsum(ex, &b, BS, K, 128).expect("colsum bf16")),
                Some(acc) => {
                    dino_center_colsum_accumulate(ex, &b, BS, K, acc, 128).expect("colsum bf16")
                }
            }
        } else {
            let x = ex.upload(v.data()).expect("upload");
            match s.as_mut() {
                None => s = Some(dino_center_colsum(ex, &x, BS, K, 128).expect("colsum")),
                Some(acc) => {
                    dino_center_colsum_accumulate(ex, &x, BS, K, acc, 128).expect("colsum")
                }
            }
        }
    }
    s.expect("at least one view")
}

#[test]
fn dino_center_matches_cpu_on_one_rank_f32_and_bf16() {
    let ex = Emu::new(Mode::Fibers);
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
        let mut center = ex.upload(&cpu.center).expect("upload");
        for _ in 0..2 {
            cpu.update(&views, &SingleProcess).expect("cpu centre");
            let s = colsums(&ex, &views, bf);
            dino_center_update(&ex, &mut center, &s, (2 * BS) as f64, cpu.momentum, 64)
                .expect("update");
        }
        let start = initial_center();
        let center = ex.download(&center).expect("download");
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
    let fib = Emu::new(Mode::Fibers);
    let per_rank: Vec<Vec<f64>> = (0..WORLD)
        .map(|r| {
            let s = colsums(&fib, &[logits(r, 0), logits(r, 1)], false);
            fib.download(&s).expect("download")
        })
        .collect();
    let reduced: Vec<f64> = (0..K)
        .map(|k| per_rank.iter().map(|s| s[k]).sum())
        .collect();
    let ex = Emu::new(Mode::Threads);
    let mut center = ex.upload(&initial_center()).expect("upload");
    let reduced = ex.upload(&reduced).expect("upload");
    dino_center_update(&ex, &mut center, &reduced, (2 * BS * WORLD) as f64, 0.9, 64)
        .expect("update");
    let start = initial_center();
    let center = ex.download(&center).expect("download");
    let e = rel_l2(&delta(&center, &start), &delta(&cpu[0], &start));
    assert!(e <= 1e-6, "two-rank centre off by {e:.3e}");
}

#[test]
fn kernels_writing_alloced_memory_leave_no_poison() {
    // Every output the kernels write in full comes from `alloc` (NaN on the emulation): bf16
    // shadows of all three multi-tensor updates, LARS's partial norms, fresh column sums. A
    // tensor of exactly one chunk, one of a chunk plus one element and a one-element tensor
    // cover the chunk edges.
    let sizes = [CHUNK, CHUNK + 1, 1, 3 * CHUNK - 7];
    let vals: Vec<Vec<f32>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| Tensor::randn_named(11, &format!("pz.{i}"), &[n], 1.0).into_vec())
        .collect();
    for mode in [Mode::Fibers, Mode::Threads] {
        let ex = Emu::new(mode);
        let g = upload_all(&ex, &vals);
        let no_nan = |what: &str, sh: &[Buf<bf16>]| {
            for (k, b) in download_all(&ex, sh).iter().enumerate() {
                assert!(
                    b.iter().all(|v| v.is_finite()),
                    "{mode:?} {what}: tensor {k} has unwritten (NaN) shadow elements"
                );
            }
        };

        let mut p = upload_all(&ex, &vals);
        let mut mom: Vec<Buf<f32>> = sizes.iter().map(|&n| ex.zeros(n).expect("zeros")).collect();
        let mut sh = shadows(&ex, &vals);
        let slots = lars_slots(&mut p, &g, &mut mom, &mut sh, 0.1, 1e-4);
        let part = ex
            .download(&lars_norms(&ex, &slots, CHUNK, 128).expect("norms"))
            .expect("download");
        assert!(
            part.iter().all(|v| v.is_finite()),
            "{mode:?}: partial norms unwritten"
        );
        let mut slots = slots;
        lars_step(&ex, &mut slots, 0.9, 1e-3, 1e-8, CHUNK, 128).expect("lars");
        drop(slots);
        no_nan("lars", &sh);

        let mut m: Vec<Buf<f32>> = sizes.iter().map(|&n| ex.zeros(n).expect("zeros")).collect();
        let mut v: Vec<Buf<f32>> = sizes.iter().map(|&n| ex.zeros(n).expect("zeros")).collect();
        let mut sh = shadows(&ex, &vals);
        let sc = vec![AdamWScalars::new(1e-3, 0.04, 0.9, 0.999, 1); sizes.len()];
        let mut slots = adamw_slots(&mut p, &g, &mut m, &mut v, &mut sh, &sc);
        adamw_step(&ex, &mut slots, 0.9, 0.999, 1e-8, CHUNK, 128).expect("adamw");
        drop(slots);
        no_nan("adamw", &sh);
        for x in download_all(&ex, &p) {
            assert!(
                x.iter().all(|v| v.is_finite()),
                "{mode:?}: adamw left NaN weights"
            );
        }

        let mut sh = shadows(&ex, &vals);
        let mut slots: Vec<EmaSlot<'_, Emu>> = p
            .iter_mut()
            .zip(&g)
            .zip(sh.iter_mut())
            .map(|((t, s), b)| EmaSlot {
                teacher: t,
                student: s,
                teacher_bf16: Some(b),
            })
            .collect();
        ema_step(&ex, &mut slots, 0.9, CHUNK, 128).expect("ema");
        drop(slots);
        no_nan("ema", &sh);

        // 300 columns: the last block of 256 threads is partly idle.
        let x = Tensor::randn_named(11, "pz.x", &[7, 300], 1.0);
        let x = ex.upload(x.data()).expect("upload");
        let s = dino_center_colsum(&ex, &x, 7, 300, 256).expect("colsum");
        let s = ex.download(&s).expect("download");
        assert!(
            s.iter().all(|v| v.is_finite()),
            "{mode:?}: column sums unwritten"
        );
    }
}

#[test]
fn mismatched_buffers_and_bad_launch_parameters_are_errors_naming_them() {
    let ex = Emu::new(Mode::Fibers);
    let mut p: Vec<Buf<f32>> = vec![ex.upload(&[0.5f32; 3]).expect("upload")];
    let g: Vec<Buf<f32>> = vec![ex.upload(&[0.5f32; 2]).expect("upload")];
    let mut m: Vec<Buf<f32>> = vec![ex.zeros(3).expect("zeros")];
    let mut b: Vec<Buf<bf16>> = vec![ex.alloc(3).expect("alloc")];
    let mut slots = lars_slots(&mut p, &g, &mut m, &mut b, 0.1, 0.0);
    let e = lars_step(&ex, &mut slots, 0.9, 1e-3, 1e-8, 4, 32).unwrap_err();
    assert!(e.to_string().contains("gradient"), "{e}");
    drop(slots);
    let g3: Vec<Buf<f32>> = vec![ex.upload(&[0.5f32; 3]).expect("upload")];
    let mut slots = lars_slots(&mut p, &g3, &mut m, &mut b, 0.1, 0.0);
    let e = lars_step(&ex, &mut slots, 0.9, 1e-3, 1e-8, 4, 48).unwrap_err();
    assert!(e.to_string().contains("48 threads"), "{e}");
    let e = lars_step(&ex, &mut slots, 0.9, 1e-3, 1e-8, 0, 32).unwrap_err();
    assert!(e.to_string().contains("chunk size 0"), "{e}");
    drop(slots);
    let mut v: Vec<Buf<f32>> = vec![ex.zeros(4).expect("zeros")];
    let sc = [AdamWScalars::new(1e-3, 0.0, 0.9, 0.999, 1)];
    let mut slots = adamw_slots(&mut p, &g3, &mut m, &mut v, &mut b, &sc);
    let e = adamw_step(&ex, &mut slots, 0.9, 0.999, 1e-8, 4, 32).unwrap_err();
    assert!(e.to_string().contains("exp_avg_sq"), "{e}");
    drop(slots);
    let x = ex.upload(&[1.0f32; 10]).expect("upload");
    let e = dino_center_colsum(&ex, &x, 3, 4, 64).map(drop).unwrap_err();
    assert!(e.to_string().contains("teacher logits"), "{e}");
    let mut c = ex.upload(&[0.0f32; 5]).expect("upload");
    let s = ex.zeros::<f64>(4).expect("zeros");
    let e = dino_center_update(&ex, &mut c, &s, 2.0, 0.9, 64).unwrap_err();
    assert!(e.to_string().contains("column sums"), "{e}");
    let s = ex.zeros::<f64>(5).expect("zeros");
    assert!(
        dino_center_update(&ex, &mut c, &s, 0.0, 0.9, 64).is_err(),
        "n = 0"
    );
    assert!(
        dino_center_update(&ex, &mut c, &s, 2.0, 1.5, 64).is_err(),
        "m > 1"
    );
    // Nothing to update: no launch, no error.
    let mut none: Vec<LarsSlot<'_, Emu>> = Vec::new();
    lars_step(&ex, &mut none, 0.9, 1e-3, 1e-8, 4, 32).expect("empty");
}
