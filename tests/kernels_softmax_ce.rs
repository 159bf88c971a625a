//! kernels/softmax_ce.cu through its device ops (`backend::device::softmax_ce`) on the CPU
//! emulation (`Emu`, fibers and threads) against `backend::cpu::loss` (the reference), on the
//! same bf16-rounded logits: 37 rows × 1000 classes (not a multiple of any block size),
//! temperatures 0.1 and 1, soft / one-hot / unnormalised targets, label smoothing 0 and 0.1.
//! Loss and saved lse in fp32 within 1e-5 (relative); the bf16 gradient within 1e-2 (its own
//! rounding is ~3e-3). NaN never passes. Outputs come from poisoned (NaN-filled) allocations,
//! so a kernel that leaves part of an output unwritten fails here.

use half::bf16;
use sdengine::backend::cpu::loss::{
    cross_entropy_backward, cross_entropy_forward, one_hot, CrossEntropyParams,
};
use sdengine::backend::cpu::softmax::softmax_forward;
use sdengine::backend::device::softmax_ce::{
    ce_loss_mean, row_threads, softmax_ce_backward, softmax_ce_forward, softmax_ce_fused, THREADS,
    WIDE_THREADS,
};
use sdengine::backend::device::{Emu, Exec, Mode};
use sdengine::testing::rel_l2;
use sdengine::Tensor;

const B: usize = 37;
const K: usize = 1000;

fn to_f32(x: &[bf16]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

fn targets(kind: &str) -> Tensor<f32> {
    match kind {
        "soft" => softmax_forward(&Tensor::randn_named(2, "ce_t", &[B, K], 2.0)).unwrap(),
        "hard" => one_hot(&(0..B).map(|b| (b * 7919) % K).collect::<Vec<_>>(), K).unwrap(),
        _ => {
            let mut t = Tensor::rand_named(3, "ce_t_unnorm", &[B, K], 0.0, 0.01);
            t.data_mut()[5] = 0.7;
            t
        }
    }
}

fn check(mode: Mode, threads: u32, tau: f64, ls: f64, kind: &str) {
    let ex = Emu::new(mode);
    // Logits like prototype scores (cosines, |z| <= 1) plus a few large ones.
    let z32 = Tensor::rand_named(1, "ce_z", &[B, K], -1.0, 1.0);
    let zb: Vec<bf16> = z32.data().iter().map(|&x| bf16::from_f32(x)).collect();
    let z = Tensor::from_vec(to_f32(&zb), &[B, K]).unwrap();
    let t = targets(kind);
    let params = CrossEntropyParams {
        temperature: tau,
        label_smoothing: ls,
    };
    let (want_loss, ctx) = cross_entropy_forward(&z, &t, params).unwrap();
    let dloss = 0.75f32;
    let want_dz = cross_entropy_backward(dloss, &t, &ctx).unwrap();
    let what = format!("{mode:?} {threads}thr tau={tau} ls={ls} {kind}");

    let (zd, td) = (ex.upload(&zb).unwrap(), ex.upload(t.data()).unwrap());
    let fwd = softmax_ce_forward(&ex, &zd, &td, B, K, params, threads).unwrap();
    let loss = ex.download(&fwd.loss).unwrap();
    assert_eq!(loss.len(), 1);
    let e_loss = ((loss[0] - want_loss) / want_loss).abs() as f64;
    assert!(
        e_loss <= 1e-5,
        "{what}: loss {} vs {want_loss} ({e_loss:.2e})",
        loss[0]
    );
    // The saved lse reproduces the reference probabilities.
    let lse = ex.download(&fwd.lse).unwrap();
    let p: Vec<f32> = (0..B * K)
        .map(|i| (z.data()[i] * (1.0 / tau as f32) - lse[i / K]).exp())
        .collect();
    let e_p = rel_l2(&p, ctx.probs.data());
    assert!(e_p <= 1e-5, "{what}: probabilities from lse {e_p:.2e}");
    // The saved mass is the smoothed targets' row sum; the row losses average to the loss.
    let mass = ex.download(&fwd.mass).unwrap();
    let want_mass: Vec<f32> = t
        .data()
        .chunks(K)
        .map(|r| ((1.0 - ls) * r.iter().map(|&x| x as f64).sum::<f64>() + ls) as f32)
        .collect();
    assert!(rel_l2(&mass, &want_mass) <= 1e-5, "{what}: mass");
    let row_loss = ex.download(&fwd.row_loss).unwrap();
    let mean = row_loss.iter().map(|&x| x as f64).sum::<f64>() / B as f64;
    assert!(
        ((mean - loss[0] as f64) / mean).abs() <= 1e-5,
        "{what}: row losses"
    );

    let dzd = softmax_ce_backward(&ex, &zd, &td, &fwd, B, K, params, dloss, threads).unwrap();
    let dz = ex.download(&dzd).unwrap();
    let e_dz = rel_l2(&to_f32(&dz), want_dz.data());
    eprintln!("{what}: loss {e_loss:.1e}, p {e_p:.1e}, dz {e_dz:.1e}");
    assert!(e_dz <= 1e-2, "{what}: dz rel_l2 {e_dz:.2e}");

    // The fused kernel computes the same numbers in the same order.
    let fused = softmax_ce_fused(&ex, &zd, &td, B, K, params, dloss, threads).unwrap();
    let floss = ex.download(&fused.loss).unwrap();
    assert_eq!(floss[0].to_bits(), loss[0].to_bits(), "{what}: fused loss");
    assert_eq!(ex.download(&fused.lse).unwrap(), lse, "{what}: fused lse");
    let frow = ex.download(&fused.row_loss).unwrap();
    assert!(
        frow.iter()
            .zip(&row_loss)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "{what}: fused row losses"
    );
    let dzf = ex.download(&fused.dz).unwrap();
    assert!(
        dzf.iter().zip(&dz).all(|(a, b)| a.to_bits() == b.to_bits()),
        "{what}: fused dz"
    );
}

#[test]
fn soft_targets_fibers() {
    for (tau, ls) in [(0.1, 0.0), (1.0, 0.1)] {
        check(Mode::Fibers, 128, tau, ls, "soft");
    }
}

#[test]
fn hard_and_unnormalised_targets_fibers() {
    check(Mode::Fibers, 96, 0.1, 0.1, "hard");
    check(Mode::Fibers, 64, 0.5, 0.2, "unnormalised");
}

#[test]
fn block_reductions_in_threads_mode() {
    check(Mode::Threads, 64, 0.1, 0.1, "soft");
}

#[test]
fn nan_logit_poisons_its_row_only() {
    let (b, k) = (3, 70);
    let ex = Emu::new(Mode::Fibers);
    let mut zb: Vec<bf16> = Tensor::rand_named(4, "ce_z", &[b, k], -1.0, 1.0)
        .data()
        .iter()
        .map(|&x| bf16::from_f32(x))
        .collect();
    zb[k + 3] = bf16::NAN;
    let t = softmax_forward(&Tensor::randn_named(5, "ce_t", &[b, k], 1.0)).unwrap();
    let p = CrossEntropyParams::default();
    let (zd, td) = (ex.upload(&zb).unwrap(), ex.upload(t.data()).unwrap());
    let fwd = softmax_ce_forward(&ex, &zd, &td, b, k, p, 32).unwrap();
    let row_loss = ex.download(&fwd.row_loss).unwrap();
    assert!(ex.download(&fwd.loss).unwrap()[0].is_nan() && row_loss[1].is_nan());
    assert!(row_loss[0].is_finite() && row_loss[2].is_finite());
    let dz = ex
        .download(&softmax_ce_backward(&ex, &zd, &td, &fwd, b, k, p, 1.0, 32).unwrap())
        .unwrap();
    assert!(dz[k..2 * k].iter().all(|v| v.is_nan()));
    assert!(dz[..k].iter().chain(&dz[2 * k..]).all(|v| v.is_finite()));
}

/// Every output is written in full: allocations are poisoned with NaN on the emulation; the
/// rows (77 classes) leave partial warps, and 40 rows for `ce_loss_mean` a partial block.
#[test]
fn outputs_into_poisoned_memory_have_no_nan() {
    let (b, k) = (40, 77);
    let zb: Vec<bf16> = Tensor::rand_named(6, "ce_z", &[b, k], -1.0, 1.0)
        .data()
        .iter()
        .map(|&x| bf16::from_f32(x))
        .collect();
    let t = softmax_forward(&Tensor::randn_named(7, "ce_t", &[b, k], 1.0)).unwrap();
    let p = CrossEntropyParams {
        temperature: 0.1,
        label_smoothing: 0.1,
    };
    for (mode, threads) in [(Mode::Fibers, 64), (Mode::Threads, 32)] {
        let ex = Emu::new(mode);
        let (zd, td) = (ex.upload(&zb).unwrap(), ex.upload(t.data()).unwrap());
        let f = softmax_ce_forward(&ex, &zd, &td, b, k, p, threads).unwrap();
        let dz = softmax_ce_backward(&ex, &zd, &td, &f, b, k, p, 0.5, threads).unwrap();
        let g = softmax_ce_fused(&ex, &zd, &td, b, k, p, 0.5, threads).unwrap();
        for (name, buf, n) in [
            ("loss", &f.loss, 1),
            ("row_loss", &f.row_loss, b),
            ("lse", &f.lse, b),
            ("mass", &f.mass, b),
            ("fused loss", &g.loss, 1),
            ("fused row_loss", &g.row_loss, b),
            ("fused lse", &g.lse, b),
        ] {
            let h = ex.download(buf).unwrap();
            assert_eq!(h.len(), n, "{name}");
            assert!(h.iter().all(|x| x.is_finite()), "{mode:?}: {name} has NaN");
        }
        for (name, buf) in [("dz", &dz), ("fused dz", &g.dz)] {
            let h = ex.download(buf).unwrap();
            assert_eq!(h.len(), b * k);
            assert!(h.iter().all(|x| x.is_finite()), "{mode:?}: {name} has NaN");
        }
        // ce_loss_mean on its own: the mean of the given rows.
        let rows: Vec<f32> = (0..b).map(|i| i as f32).collect();
        let m = ce_loss_mean(&ex, &ex.upload(&rows).unwrap(), threads).unwrap();
        assert_eq!(ex.download(&m).unwrap(), vec![19.5]);
    }
}

#[test]
fn bad_arguments_are_errors() {
    let ex = Emu::new(Mode::Fibers);
    let zb = ex.upload(&[bf16::ONE; 6]).unwrap();
    let t = ex.upload(&[0.5f32; 6]).unwrap();
    let t5 = ex.upload(&[0.5f32; 5]).unwrap();
    let p = CrossEntropyParams::default();
    assert!(softmax_ce_forward(&ex, &zb, &t, 2, 4, p, 32).is_err());
    let e = softmax_ce_forward(&ex, &zb, &t5, 2, 3, p, 32)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("softmax_ce_forward") && e.contains("targets"),
        "{e}"
    );
    assert!(softmax_ce_forward(&ex, &zb, &t, 2, 3, p, 40).is_err());
    let bad = CrossEntropyParams {
        temperature: 0.0,
        label_smoothing: 0.0,
    };
    assert!(softmax_ce_forward(&ex, &zb, &t, 2, 3, bad, 32).is_err());
    assert!(softmax_ce_fused(&ex, &zb, &t, 3, 3, p, 1.0, 32).is_err());
    // The saved values must be for the same rows.
    let f = softmax_ce_forward(&ex, &zb, &t, 2, 3, p, 32).unwrap();
    let z3 = ex.upload(&[bf16::ONE; 3]).unwrap();
    let t3 = ex.upload(&[0.5f32; 3]).unwrap();
    let e = softmax_ce_backward(&ex, &z3, &t3, &f, 1, 3, p, 1.0, 32)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("lse"), "{e}");
    let empty = ex.upload::<f32>(&[]).unwrap();
    assert!(ce_loss_mean(&ex, &empty, 32).is_err());
    // The GPU's block sizes: 256 threads, 1024 for DINO-wide rows.
    assert_eq!(
        (row_threads(3000), row_threads(65536)),
        (THREADS, WIDE_THREADS)
    );
}
