//! kernels/softmax_ce.cu on the CPU emulation against `backend::cpu::loss` (the reference),
//! on the same bf16-rounded logits: 37 rows × 1000 classes (not a multiple of any block size),
//! temperatures 0.1 and 1, soft / one-hot / unnormalised targets, label smoothing 0 and 0.1.
//! Loss and saved lse in fp32 within 1e-5 (relative); the bf16 gradient within 1e-2 (its own
//! rounding is ~3e-3). NaN never passes.

use half::bf16;
use sdengine::backend::cpu::loss::{
    cross_entropy_backward, cross_entropy_forward, one_hot, CrossEntropyParams,
};
use sdengine::backend::cpu::softmax::softmax_forward;
use sdengine::backend::emu::softmax_ce::{
    softmax_ce_backward, softmax_ce_forward, softmax_ce_fused,
};
use sdengine::backend::emu::Mode;
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

    let fwd = softmax_ce_forward(mode, &zb, t.data(), B, K, params, threads).unwrap();
    let e_loss = ((fwd.loss - want_loss) / want_loss).abs() as f64;
    assert!(
        e_loss <= 1e-5,
        "{what}: loss {} vs {want_loss} ({e_loss:.2e})",
        fwd.loss
    );
    // The saved lse reproduces the reference probabilities.
    let p: Vec<f32> = (0..B * K)
        .map(|i| (z.data()[i] * (1.0 / tau as f32) - fwd.lse[i / K]).exp())
        .collect();
    let e_p = rel_l2(&p, ctx.probs.data());
    assert!(e_p <= 1e-5, "{what}: probabilities from lse {e_p:.2e}");
    let dz = softmax_ce_backward(mode, &zb, t.data(), &fwd, B, K, params, dloss, threads).unwrap();
    let e_dz = rel_l2(&to_f32(&dz), want_dz.data());
    eprintln!("{what}: loss {e_loss:.1e}, p {e_p:.1e}, dz {e_dz:.1e}");
    assert!(e_dz <= 1e-2, "{what}: dz rel_l2 {e_dz:.2e}");

    // The fused kernel computes the same numbers in the same order.
    let (loss, lse, dzf) =
        softmax_ce_fused(mode, &zb, t.data(), B, K, params, dloss, threads).unwrap();
    assert_eq!(loss.to_bits(), fwd.loss.to_bits(), "{what}: fused loss");
    assert_eq!(lse, fwd.lse, "{what}: fused lse");
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
    let mut zb: Vec<bf16> = Tensor::rand_named(4, "ce_z", &[b, k], -1.0, 1.0)
        .data()
        .iter()
        .map(|&x| bf16::from_f32(x))
        .collect();
    zb[k + 3] = bf16::NAN;
    let t = softmax_forward(&Tensor::randn_named(5, "ce_t", &[b, k], 1.0)).unwrap();
    let p = CrossEntropyParams::default();
    let fwd = softmax_ce_forward(Mode::Fibers, &zb, t.data(), b, k, p, 32).unwrap();
    assert!(fwd.loss.is_nan() && fwd.row_loss[1].is_nan());
    assert!(fwd.row_loss[0].is_finite() && fwd.row_loss[2].is_finite());
    let dz = softmax_ce_backward(Mode::Fibers, &zb, t.data(), &fwd, b, k, p, 1.0, 32).unwrap();
    assert!(dz[k..2 * k].iter().all(|v| v.is_nan()));
    assert!(dz[..k].iter().chain(&dz[2 * k..]).all(|v| v.is_finite()));
}

#[test]
fn bad_arguments_are_errors() {
    let zb = vec![bf16::ONE; 6];
    let t = vec![0.5f32; 6];
    let p = CrossEntropyParams::default();
    assert!(softmax_ce_forward(Mode::Fibers, &zb, &t, 2, 4, p, 32).is_err());
    assert!(softmax_ce_forward(Mode::Fibers, &zb, &t[..5], 2, 3, p, 32).is_err());
    assert!(softmax_ce_forward(Mode::Fibers, &zb, &t, 2, 3, p, 40).is_err());
    let bad = CrossEntropyParams {
        temperature: 0.0,
        label_smoothing: 0.0,
    };
    assert!(softmax_ce_forward(Mode::Fibers, &zb, &t, 2, 3, bad, 32).is_err());
}
