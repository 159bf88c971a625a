//! The method losses against PyTorch (`tests/reference/methods.py`: SwAV's distributed_sinkhorn,
//! Suave's loss loop, DINO's DINOLoss + Daino's labelled term; tolerance 1e-5 relative L2, the
//! DESIGN.md bound for losses and codes in f32), f64 gradient checks of both losses w.r.t. the
//! student scores with the targets held constant, multi-rank equivalence through `LocalGroup`,
//! and the queue's bookkeeping.
use sdengine::backend::cpu::softmax::softmax_forward;
use sdengine::dist::{Communicator, LocalGroup, SingleProcess};
use sdengine::methods::*;
use sdengine::testing::{assert_close, check_gradients, randn64, rel_l2, Fixtures, GradCheck};
use sdengine::Tensor;

const SEED: u64 = 21;
const TOL: f64 = 1e-5;

fn fixtures() -> Fixtures {
    Fixtures::open("methods/methods.safetensors").expect("fixture (run tests/reference/methods.py)")
}

fn uni(name: &str, shape: &[usize]) -> Tensor {
    Tensor::rand_named(SEED, name, shape, -1.0, 1.0)
}

fn scaled_randn(name: &str, shape: &[usize], s: f32) -> Tensor {
    let t = Tensor::randn_named(SEED, name, shape, 1.0);
    Tensor::from_vec(t.data().iter().map(|v| v * s).collect(), shape).unwrap()
}

fn scalar(x: f32) -> Tensor {
    Tensor::from_vec(vec![x], &[1]).unwrap()
}

/// Reports and asserts one comparison.
fn check(fx: &Fixtures, key: &str, got: &Tensor) {
    let want = fx.get(key).unwrap();
    eprintln!("{key}: rel_l2 {:.2e}", rel_l2(got.data(), want.data()));
    assert_close(key, got, want, TOL);
}

#[test]
fn sinkhorn_matches_pytorch() {
    let fx = fixtures();
    for (name, shape) in [("sk_a", [37, 11]), ("sk_b", [96, 10])] {
        let s = uni(&format!("{name}.s"), &shape);
        let q = sinkhorn(&s, SinkhornParams::default(), &SingleProcess).unwrap();
        check(&fx, &format!("{name}.q"), &q);
        // Columns (samples) sum to 1 after the last column step.
        for row in q.data().chunks_exact(shape[1]) {
            let sum: f32 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "{name}: row sum {sum}");
        }
    }
}

#[test]
fn sinkhorn_two_ranks_equal_one_rank_on_the_whole_batch() {
    let s = uni("sk_b.s", &[96, 10]);
    let whole = sinkhorn(&s, SinkhornParams::default(), &SingleProcess).unwrap();
    let halves = s.split_batch(&[48, 48]).unwrap();
    let ranks = LocalGroup::new(2).unwrap();
    let parts: Vec<Tensor> = std::thread::scope(|sc| {
        let hs: Vec<_> = ranks
            .iter()
            .zip(&halves)
            .map(|(r, h)| sc.spawn(move || sinkhorn(h, SinkhornParams::default(), r).unwrap()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let joined = Tensor::cat_batch(&[&parts[0], &parts[1]]).unwrap();
    let e = rel_l2(joined.data(), whole.data());
    eprintln!("sinkhorn 2 ranks vs 1: rel_l2 {e:.2e}");
    assert!(e <= 1e-6, "{e}");
    // And the ranks' codes are not those of a per-rank Sinkhorn (the sums really were shared).
    let local = sinkhorn(&halves[0], SinkhornParams::default(), &SingleProcess).unwrap();
    assert!(rel_l2(local.data(), parts[0].data()) > 1e-3);
}

#[test]
fn sinkhorn_rejects_bad_input() {
    let s = uni("bad", &[4, 3]);
    let p = SinkhornParams {
        epsilon: 0.0,
        iterations: 3,
    };
    assert!(sinkhorn(&s, p, &SingleProcess).is_err());
    let mut big = s.clone();
    big.data_mut()[5] = 10.0; // exp(200) overflows f32
    let e = sinkhorn(&big, SinkhornParams::default(), &SingleProcess)
        .unwrap_err()
        .to_string();
    assert!(e.contains("row 1, prototype 2"), "{e}");
    assert!(sinkhorn(
        &Tensor::<f32>::zeros(&[0, 3]),
        SinkhornParams::default(),
        &SingleProcess
    )
    .is_err());
}

fn suave_case(fx: &Fixtures, name: &str, use_queue: bool, count: MixedCount) {
    let (v, bs, k, qlen, lab_bs) = (4, 6, 9, 12, 5);
    let views = uni(&format!("{name}.views"), &[v * bs, k])
        .split_batch(&[bs; 4])
        .unwrap();
    let lab = uni(&format!("{name}.lab"), &[lab_bs, k]);
    let mixed = uni(&format!("{name}.mixed"), &[bs, k]);
    let y = softmax_forward(&scaled_randn(&format!("{name}.y"), &[lab_bs, k], 3.0)).unwrap();
    let qs: Vec<Tensor> = (0..2)
        .map(|i| uni(&format!("{name}.queue{i}"), &[qlen, k]))
        .collect();
    let cfg = SuaveConfig {
        mixed_count: count,
        ..SuaveConfig::default()
    };
    let qrefs: Vec<Option<&Tensor>> = if use_queue {
        qs.iter().map(Some).collect()
    } else {
        vec![]
    };
    let codes = suave_codes(&views, &qrefs, &cfg, &SingleProcess).unwrap();
    check(fx, &format!("{name}.code0"), &codes[0]);
    check(fx, &format!("{name}.code1"), &codes[1]);
    let out = suave_loss(
        &views,
        &codes,
        Some(Labelled {
            scores: &lab,
            targets: &y,
        }),
        Some(Mixed {
            scores: &mixed,
            lambda: 0.3,
        }),
        &cfg,
    )
    .unwrap();
    check(fx, &format!("{name}.loss"), &scalar(out.total));
    check(fx, &format!("{name}.unlab"), &scalar(out.unlab));
    check(fx, &format!("{name}.lab_loss"), &scalar(out.lab.unwrap()));
    check(
        fx,
        &format!("{name}.mixed_loss"),
        &scalar(out.mixed.unwrap()),
    );
    let refs: Vec<&Tensor> = out.d_views.iter().collect();
    check(
        fx,
        &format!("{name}.d_views"),
        &Tensor::cat_batch(&refs).unwrap(),
    );
    check(fx, &format!("{name}.d_lab"), out.d_lab.as_ref().unwrap());
    check(
        fx,
        &format!("{name}.d_mixed"),
        out.d_mixed.as_ref().unwrap(),
    );
}

#[test]
fn suave_loss_matches_pytorch() {
    let fx = fixtures();
    suave_case(&fx, "suave_noq", false, MixedCount::Views);
    suave_case(&fx, "suave_q", true, MixedCount::Samples);
}

#[test]
fn suave_weights_of_the_scripts() {
    // §1.8: V = 10, bs = 32, lab_bs = 32, one mixed view, 16 online rows: T = 353.
    let w = SuaveWeights::new(10, 32, 32, true, MixedCount::Views, 16);
    assert!((w.unlab - 320.0 / 353.0).abs() < 1e-15);
    assert!((w.lab - 32.0 / 353.0).abs() < 1e-15);
    assert!((w.mixed - 1.0 / 353.0).abs() < 1e-15);
    assert!((w.online - 16.0 / 353.0).abs() < 1e-15);
    let w = SuaveWeights::new(10, 32, 32, true, MixedCount::Samples, 16);
    assert!((w.mixed - 32.0 / 384.0).abs() < 1e-15);
}

#[test]
fn suave_loss_gradients_f64() {
    let (v, bs, k, lab_bs) = (3, 4, 5, 3);
    let mut inputs: Vec<Tensor<f64>> = (0..v)
        .map(|i| randn64(5, &format!("v{i}"), &[bs, k]))
        .collect();
    inputs.push(randn64(5, "lab", &[lab_bs, k]));
    inputs.push(randn64(5, "mixed", &[bs, k]));
    let y = softmax_forward(&randn64(5, "y", &[lab_bs, k])).unwrap();
    let cfg = SuaveConfig {
        temperature: 0.5,
        ..SuaveConfig::default()
    };
    // Codes are constants: computed once, outside the differentiated function.
    let codes = suave_codes(&inputs[..v], &[], &cfg, &SingleProcess).unwrap();
    let run = |xs: &[Tensor<f64>]| {
        suave_loss(
            &xs[..v],
            &codes,
            Some(Labelled {
                scores: &xs[v],
                targets: &y,
            }),
            Some(Mixed {
                scores: &xs[v + 1],
                lambda: 0.3,
            }),
            &cfg,
        )
    };
    check_gradients(
        "suave_loss",
        &inputs,
        |xs| Tensor::from_vec(vec![run(xs)?.total], &[1]),
        |xs, w| {
            let o = run(xs)?;
            let s = w.data()[0];
            let sc = |t: &Tensor<f64>| {
                Tensor::from_vec(t.data().iter().map(|g| g * s).collect(), t.shape())
            };
            let mut g: Vec<Option<Tensor<f64>>> = o
                .d_views
                .iter()
                .map(|d| sc(d).map(Some))
                .collect::<Result<_, _>>()?;
            g.push(Some(sc(o.d_lab.as_ref().unwrap())?));
            g.push(Some(sc(o.d_mixed.as_ref().unwrap())?));
            Ok(g)
        },
        GradCheck::default(),
    );
}

#[test]
fn daino_loss_matches_pytorch() {
    let fx = fixtures();
    let (v, bs, k, lab_bs) = (5, 4, 13, 6);
    let student = scaled_randn("daino.student", &[v * bs, k], 2.0)
        .split_batch(&[bs; 5])
        .unwrap();
    let teacher = scaled_randn("daino.teacher", &[2 * bs, k], 2.0)
        .split_batch(&[bs; 2])
        .unwrap();
    let c0 = scaled_randn("daino.center", &[k], 0.5);
    let lab = scaled_randn("daino.lab", &[lab_bs, k], 2.0);
    let y = softmax_forward(&scaled_randn("daino.y", &[lab_bs, k], 3.0)).unwrap();
    let mut center = DinoCenter::new(k);
    center.center = c0.data().to_vec();
    let out = daino_loss(
        &student,
        &teacher,
        Some((&lab, &y)),
        &mut center,
        0.0433,
        DainoConfig::default(),
        &SingleProcess,
    )
    .unwrap();
    check(&fx, "daino.loss", &scalar(out.total));
    check(&fx, "daino.unlab", &scalar(out.unlab));
    check(&fx, "daino.lab_loss", &scalar(out.lab.unwrap()));
    let refs: Vec<&Tensor> = out.d_student.iter().collect();
    check(&fx, "daino.d_student", &Tensor::cat_batch(&refs).unwrap());
    check(&fx, "daino.d_lab", out.d_lab.as_ref().unwrap());
    check(
        &fx,
        "daino.center",
        &Tensor::from_vec(center.center.clone(), &[k]).unwrap(),
    );
}

#[test]
fn dino_loss_gradients_f64() {
    let (v, bs, k) = (4, 3, 6);
    let student: Vec<Tensor<f64>> = (0..v)
        .map(|i| randn64(6, &format!("s{i}"), &[bs, k]))
        .collect();
    let teacher: Vec<Tensor<f64>> = (0..2)
        .map(|i| randn64(6, &format!("t{i}"), &[bs, k]))
        .collect();
    let center = randn64(6, "c", &[k]).into_vec();
    let targets = dino_targets(&teacher, &center, 0.07).unwrap();
    check_gradients(
        "dino_student_loss",
        &student,
        |xs| Tensor::from_vec(vec![dino_student_loss(xs, &targets, 0.1, 1.0)?.0], &[1]),
        |xs, w| {
            Ok(dino_student_loss(xs, &targets, 0.1, w.data()[0])?
                .1
                .into_iter()
                .map(Some)
                .collect())
        },
        GradCheck::default(),
    );
}

#[test]
fn dino_center_over_two_ranks_equals_one_rank() {
    let k = 7;
    let t: Vec<Tensor> = (0..2)
        .map(|i| scaled_randn(&format!("ct{i}"), &[8, k], 1.0))
        .collect();
    let mut one = DinoCenter::<f32>::new(k);
    one.update(&t, &SingleProcess).unwrap();
    let halves: Vec<Vec<Tensor>> = {
        let a: Vec<Vec<Tensor>> = t.iter().map(|x| x.split_batch(&[4, 4]).unwrap()).collect();
        (0..2)
            .map(|r| vec![a[0][r].clone(), a[1][r].clone()])
            .collect()
    };
    let ranks = LocalGroup::new(2).unwrap();
    let centers: Vec<Vec<f32>> = std::thread::scope(|sc| {
        let hs: Vec<_> = ranks
            .iter()
            .zip(&halves)
            .map(|(r, h)| {
                sc.spawn(move || {
                    let mut c = DinoCenter::<f32>::new(k);
                    c.update(h, r).unwrap();
                    assert_eq!(r.world_size(), 2);
                    c.center
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for c in &centers {
        assert!(rel_l2(c, &one.center) < 1e-6);
    }
    assert!(one.center.iter().any(|&x| x != 0.0));
}

#[test]
fn teacher_temperature_schedule() {
    let t: Vec<f64> = (0..12)
        .map(|e| teacher_temperature(e, 0.04, 0.07, 10))
        .collect();
    assert!((t[0] - 0.04).abs() < 1e-15);
    assert!((t[1] - (0.04 + 0.03 / 9.0)).abs() < 1e-15);
    assert!((t[9] - 0.07).abs() < 1e-15 && t[11] == 0.07);
}

#[test]
fn queue_shift_insert_activate_and_state() {
    assert_eq!(Queue::rows_per_rank(3840, 32, 8), 480);
    assert_eq!(Queue::rows_per_rank(3900, 32, 8), 480);
    let (len, dim, bs) = (6, 3, 2);
    let mut q = Queue::new(2, len, dim).unwrap();
    assert!(!q.is_active(0).unwrap());
    let batches: Vec<Tensor> = (0..3).map(|i| uni(&format!("qb{i}"), &[bs, dim])).collect();
    for (i, b) in batches.iter().enumerate() {
        assert!(!q.is_active(0).unwrap(), "active after {i} pushes");
        q.push(0, b).unwrap();
    }
    assert!(q.is_active(0).unwrap());
    assert!(!q.is_active(1).unwrap());
    // Newest first: rows = [b2; b1; b0].
    let c = q.crop(0).unwrap();
    let want = Tensor::cat_batch(&[&batches[2], &batches[1], &batches[0]]).unwrap();
    assert_eq!(c, want);
    // One more push drops the oldest batch.
    let b3 = uni("qb3", &[bs, dim]);
    q.push(0, &b3).unwrap();
    let want = Tensor::cat_batch(&[&b3, &batches[2], &batches[1]]).unwrap();
    assert_eq!(q.crop(0).unwrap(), want);
    let restored = Queue::from_tensor(&q.to_tensor()).unwrap();
    assert_eq!(restored, q);
    assert!(q.push(2, &b3).is_err());
    assert!(q.push(0, &uni("x", &[2, 4])).is_err());
    assert!(q.push(0, &uni("x", &[7, 3])).is_err());
}
