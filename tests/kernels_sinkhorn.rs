//! kernels/sinkhorn.cu on the CPU emulation against `methods::sinkhorn` (the CPU reference):
//! the fused single-launch kernel and the per-iteration kernels, one rank and two ranks, at an
//! awkward size (37 samples × 1000 prototypes, blocks of 64/96/128 threads). fp32 codes must
//! match within DESIGN.md's 1e-5 (relative L2); NaN never passes.

use sdengine::backend::emu::sinkhorn::{
    sinkhorn_codes, sinkhorn_col_update, sinkhorn_fused, sinkhorn_row_sums,
};
use sdengine::backend::emu::Mode;
use sdengine::dist::{LocalGroup, SingleProcess};
use sdengine::methods::sinkhorn::{sinkhorn, SinkhornParams};
use sdengine::testing::rel_l2;
use sdengine::Tensor;

const TOL: f64 = 1e-5;

/// Scores like the real ones: cosines in [-1, 1], spread wide enough that exp(S/0.05) spans
/// e^±20 (uniform), so the scaling vectors cover the whole f32 range the kernel meets.
fn scores(seed: u64, b: usize, k: usize) -> Tensor<f32> {
    let t = Tensor::rand_named(seed, "sinkhorn_scores", &[b, k], -1.0, 1.0);
    assert!(t.data().iter().any(|&x| x > 0.9) && t.data().iter().any(|&x| x < -0.9));
    t
}

#[test]
fn fused_matches_reference_in_both_modes() {
    let (b, k) = (37, 1000);
    let s = scores(1, b, k);
    let want = sinkhorn(&s, SinkhornParams::default(), &SingleProcess).unwrap();
    for (mode, threads) in [(Mode::Fibers, 128), (Mode::Threads, 96)] {
        let got = sinkhorn_fused(mode, s.data(), b, k, 0.05, 3, threads).unwrap();
        let e = rel_l2(&got.codes, want.data());
        eprintln!("sinkhorn_fused {mode:?} {threads} threads: rel_l2 {e:.2e}");
        assert!(e <= TOL, "{mode:?}: rel_l2 {e:.3e}");
        // Rows are distributions; the scaling vectors are finite and positive.
        for row in got.codes.chunks(k) {
            let sum: f64 = row.iter().map(|&x| x as f64).sum();
            assert!((sum - 1.0).abs() < 1e-4, "row sum {sum}");
        }
        assert!(got
            .u
            .iter()
            .chain(&got.v)
            .all(|&x| x.is_finite() && x > 0.0));
    }
}

#[test]
fn fused_other_iteration_counts_and_epsilon() {
    let (b, k) = (19, 300);
    let s = scores(2, b, k);
    for (iters, eps) in [(0, 0.05), (1, 0.1), (5, 0.05)] {
        let p = SinkhornParams {
            epsilon: eps,
            iterations: iters,
        };
        let want = sinkhorn(&s, p, &SingleProcess).unwrap();
        let got = sinkhorn_fused(Mode::Fibers, s.data(), b, k, eps, iters, 64).unwrap();
        let e = rel_l2(&got.codes, want.data());
        assert!(e <= TOL, "{iters} iterations, eps {eps}: rel_l2 {e:.3e}");
    }
}

/// The multi-rank path: per rank, iterations of row_sums → all-reduce → col_update, then codes,
/// against the reference run collectively over the same two ranks.
#[test]
fn per_iteration_kernels_over_two_ranks_match_reference() {
    let (b, k, world) = (23, 1000, 2);
    let parts: Vec<Tensor<f32>> = (0..world).map(|r| scores(10 + r as u64, b, k)).collect();
    let ranks = LocalGroup::new(world).unwrap();
    let want: Vec<Tensor<f32>> = std::thread::scope(|sc| {
        let hs: Vec<_> = ranks
            .iter()
            .zip(&parts)
            .map(|(r, s)| sc.spawn(move || sinkhorn(s, SinkhornParams::default(), r).unwrap()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // The emulated kernels run rank by rank; the "all-reduce" is a sum of the ranks' r.
    let mut v: Vec<Option<Vec<f32>>> = vec![None; world];
    let mut r_all = vec![0.0f32; k];
    for it in 0..3 {
        r_all.iter_mut().for_each(|x| *x = 0.0);
        for rank in 0..world {
            let mode = if it == 0 && rank == 0 {
                Mode::Threads
            } else {
                Mode::Fibers
            };
            let r = sinkhorn_row_sums(mode, parts[rank].data(), v[rank].as_deref(), b, k, 0.05, 64)
                .unwrap();
            r_all.iter_mut().zip(&r).for_each(|(a, x)| *a += x);
        }
        for rank in 0..world {
            let mode = if it == 1 { Mode::Threads } else { Mode::Fibers };
            v[rank] = Some(
                sinkhorn_col_update(mode, parts[rank].data(), &r_all, b, k, 0.05, b * world, 96)
                    .unwrap(),
            );
        }
    }
    for rank in 0..world {
        let vr = v[rank].as_deref().unwrap();
        let q = sinkhorn_codes(
            Mode::Fibers,
            parts[rank].data(),
            &r_all,
            vr,
            b,
            k,
            0.05,
            b * world,
            128,
        )
        .unwrap();
        let e = rel_l2(&q, want[rank].data());
        eprintln!("sinkhorn per-iteration rank {rank}: rel_l2 {e:.2e}");
        assert!(e <= TOL, "rank {rank}: rel_l2 {e:.3e}");
    }
}

#[test]
fn nan_scores_give_nan_codes_and_bad_arguments_are_errors() {
    let (b, k) = (5, 70);
    let mut s = scores(3, b, k);
    s.data_mut()[77] = f32::NAN;
    let got = sinkhorn_fused(Mode::Fibers, s.data(), b, k, 0.05, 3, 64).unwrap();
    assert!(got.codes.iter().any(|x| x.is_nan()));
    assert!(rel_l2(&got.codes, &vec![0.1; b * k]).is_nan());
    let ok = scores(3, b, k);
    assert!(sinkhorn_fused(Mode::Fibers, ok.data(), b, k + 1, 0.05, 3, 64).is_err());
    assert!(sinkhorn_fused(Mode::Fibers, ok.data(), b, k, 0.0, 3, 64).is_err());
    assert!(sinkhorn_fused(Mode::Fibers, ok.data(), b, k, 0.05, 3, 48).is_err());
    assert!(sinkhorn_row_sums(Mode::Fibers, ok.data(), Some(&[1.0; 4]), b, k, 0.05, 64).is_err());
}
