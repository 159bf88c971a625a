//! kernels/sinkhorn.cu through its device ops (`backend::device::sinkhorn`) on the CPU
//! emulation (`Emu`, fibers and threads) against `methods::sinkhorn` (the CPU reference): the
//! fused single-launch kernel and the per-iteration kernels, one rank and two ranks, at an
//! awkward size (37 samples × 1000 prototypes, blocks of 64/96/128 threads). fp32 codes must
//! match within DESIGN.md's 1e-5 (relative L2); NaN never passes. Outputs come from poisoned
//! (NaN-filled) allocations, so a kernel that leaves part of an output unwritten fails here.

use sdengine::backend::device::sinkhorn::{
    sinkhorn_codes, sinkhorn_col_update, sinkhorn_fused, sinkhorn_per_iteration, sinkhorn_row_sums,
};
use sdengine::backend::device::{Emu, Exec, HostBuf, Mode};
use sdengine::dist::{Communicator, LocalGroup, SingleProcess};
use sdengine::methods::sinkhorn::{sinkhorn, SinkhornParams};
use sdengine::testing::rel_l2;
use sdengine::Tensor;

const TOL: f64 = 1e-5;

/// ε and iterations as the emu wrappers took them.
fn params(epsilon: f64, iterations: usize) -> SinkhornParams {
    SinkhornParams {
        epsilon,
        iterations,
    }
}

/// Scores like the real ones: cosines in [-1, 1], spread wide enough that exp(S/0.05) spans
/// e^±20 (uniform), so the scaling vectors cover the whole f32 range the kernel meets.
fn scores(seed: u64, b: usize, k: usize) -> Tensor<f32> {
    let t = Tensor::rand_named(seed, "sinkhorn_scores", &[b, k], -1.0, 1.0);
    assert!(t.data().iter().any(|&x| x > 0.9) && t.data().iter().any(|&x| x < -0.9));
    t
}

fn up(ex: &Emu, x: &[f32]) -> HostBuf<f32> {
    ex.upload(x).unwrap()
}

fn down(ex: &Emu, x: &HostBuf<f32>) -> Vec<f32> {
    ex.download(x).unwrap()
}

#[test]
fn fused_matches_reference_in_both_modes() {
    let (b, k) = (37, 1000);
    let s = scores(1, b, k);
    let want = sinkhorn(&s, SinkhornParams::default(), &SingleProcess).unwrap();
    for (mode, threads) in [(Mode::Fibers, 128), (Mode::Threads, 96)] {
        let ex = Emu::new(mode);
        let got = sinkhorn_fused(&ex, &up(&ex, s.data()), b, k, params(0.05, 3), threads).unwrap();
        let (codes, u, v) = (down(&ex, &got.codes), down(&ex, &got.u), down(&ex, &got.v));
        let e = rel_l2(&codes, want.data());
        eprintln!("sinkhorn_fused {mode:?} {threads} threads: rel_l2 {e:.2e}");
        assert!(e <= TOL, "{mode:?}: rel_l2 {e:.3e}");
        // Rows are distributions; the scaling vectors are finite and positive.
        for row in codes.chunks(k) {
            let sum: f64 = row.iter().map(|&x| x as f64).sum();
            assert!((sum - 1.0).abs() < 1e-4, "row sum {sum}");
        }
        assert_eq!((u.len(), v.len()), (k, b));
        assert!(u.iter().chain(&v).all(|&x| x.is_finite() && x > 0.0));
    }
}

#[test]
fn fused_other_iteration_counts_and_epsilon() {
    let (b, k) = (19, 300);
    let s = scores(2, b, k);
    let ex = Emu::new(Mode::Fibers);
    let sd = up(&ex, s.data());
    for (iters, eps) in [(0, 0.05), (1, 0.1), (5, 0.05)] {
        let p = params(eps, iters);
        let want = sinkhorn(&s, p, &SingleProcess).unwrap();
        let got = sinkhorn_fused(&ex, &sd, b, k, p, 64).unwrap();
        let e = rel_l2(&down(&ex, &got.codes), want.data());
        assert!(e <= TOL, "{iters} iterations, eps {eps}: rel_l2 {e:.3e}");
    }
}

/// Two ranks' references, computed collectively over in-process ranks.
fn two_rank_reference(parts: &[Tensor<f32>]) -> Vec<Tensor<f32>> {
    let ranks = LocalGroup::new(parts.len()).unwrap();
    std::thread::scope(|sc| {
        let hs: Vec<_> = ranks
            .iter()
            .zip(parts)
            .map(|(r, s)| sc.spawn(move || sinkhorn(s, SinkhornParams::default(), r).unwrap()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The multi-rank path: per rank, iterations of row_sums → all-reduce → col_update, then codes,
/// against the reference run collectively over the same two ranks.
#[test]
fn per_iteration_kernels_over_two_ranks_match_reference() {
    let (b, k, world) = (23, 1000, 2);
    let parts: Vec<Tensor<f32>> = (0..world).map(|r| scores(10 + r as u64, b, k)).collect();
    let want = two_rank_reference(&parts);
    let fibers = Emu::new(Mode::Fibers);
    let threads = Emu::new(Mode::Threads);
    let sd: Vec<HostBuf<f32>> = parts.iter().map(|p| up(&fibers, p.data())).collect();
    // The emulated kernels run rank by rank; the "all-reduce" is a sum of the ranks' r.
    let mut v: Vec<Option<HostBuf<f32>>> = (0..world).map(|_| None).collect();
    let mut r_all = vec![0.0f32; k];
    for it in 0..3 {
        r_all.iter_mut().for_each(|x| *x = 0.0);
        for rank in 0..world {
            let ex = if it == 0 && rank == 0 {
                &threads
            } else {
                &fibers
            };
            let r = sinkhorn_row_sums(ex, &sd[rank], v[rank].as_ref(), b, k, 0.05, 64).unwrap();
            r_all
                .iter_mut()
                .zip(&down(ex, &r))
                .for_each(|(a, x)| *a += x);
        }
        let rd = up(&fibers, &r_all);
        for rank in 0..world {
            let ex = if it == 1 { &threads } else { &fibers };
            v[rank] =
                Some(sinkhorn_col_update(ex, &sd[rank], &rd, b, k, 0.05, b * world, 96).unwrap());
        }
    }
    let rd = up(&fibers, &r_all);
    for rank in 0..world {
        let vr = v[rank].as_ref().unwrap();
        let q = sinkhorn_codes(&fibers, &sd[rank], &rd, vr, b, k, 0.05, b * world, 128).unwrap();
        let e = rel_l2(&down(&fibers, &q), want[rank].data());
        eprintln!("sinkhorn per-iteration rank {rank}: rel_l2 {e:.2e}");
        assert!(e <= TOL, "rank {rank}: rel_l2 {e:.3e}");
    }
}

/// The composite per-iteration op with a real all-reduce between its launches: each rank runs
/// on its own thread, the all-reduce goes through the rank's communicator (download, sum,
/// upload, as a host-staged NCCL would).
#[test]
fn per_iteration_op_with_a_communicator_matches_reference() {
    let (b, k, world) = (23, 1000, 2);
    let parts: Vec<Tensor<f32>> = (0..world).map(|r| scores(10 + r as u64, b, k)).collect();
    let want = two_rank_reference(&parts);
    let ranks = LocalGroup::new(world).unwrap();
    let got: Vec<Vec<f32>> = std::thread::scope(|sc| {
        let hs: Vec<_> = ranks
            .iter()
            .zip(&parts)
            .map(|(comm, s)| {
                sc.spawn(move || {
                    let ex = Emu::new(Mode::Fibers);
                    let sd = up(&ex, s.data());
                    let mut reduces = 0;
                    let q = sinkhorn_per_iteration(
                        &ex,
                        &sd,
                        b,
                        k,
                        SinkhornParams::default(),
                        b * world,
                        64,
                        |r: &mut HostBuf<f32>| {
                            reduces += 1;
                            let mut h = ex.download(r)?;
                            comm.all_reduce_sum_f32(&mut h)?;
                            ex.upload_into(&h, r)
                        },
                    )
                    .unwrap();
                    assert_eq!(reduces, 3, "one all-reduce per iteration");
                    down(&ex, &q)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (rank, (g, w)) in got.iter().zip(&want).enumerate() {
        let e = rel_l2(g, w.data());
        eprintln!("sinkhorn_per_iteration rank {rank}: rel_l2 {e:.2e}");
        assert!(e <= TOL, "rank {rank}: rel_l2 {e:.3e}");
    }
    // One rank, no communication: the same codes as the fused kernel and the reference.
    let ex = Emu::new(Mode::Threads);
    let s = scores(4, 9, 130);
    let sd = up(&ex, s.data());
    let p = params(0.05, 2);
    let q = sinkhorn_per_iteration(&ex, &sd, 9, 130, p, 9, 32, |_| Ok(())).unwrap();
    let want = sinkhorn(&s, p, &SingleProcess).unwrap();
    assert!(rel_l2(&down(&ex, &q), want.data()) <= TOL);
}

/// Every output is written in full: allocations are poisoned with NaN on the emulation, and
/// awkward sizes leave partial warps and blocks in every launch.
#[test]
fn outputs_into_poisoned_memory_have_no_nan() {
    let (b, k) = (13, 77);
    let s = scores(5, b, k);
    for mode in [Mode::Fibers, Mode::Threads] {
        let ex = Emu::new(mode);
        let sd = up(&ex, s.data());
        for it in [0, 2] {
            let f = sinkhorn_fused(&ex, &sd, b, k, params(0.05, it), 64).unwrap();
            for (name, buf, n) in [("codes", &f.codes, b * k), ("u", &f.u, k), ("v", &f.v, b)] {
                let h = down(&ex, buf);
                assert_eq!(h.len(), n);
                assert!(
                    h.iter().all(|x| x.is_finite()),
                    "{mode:?} fused it{it}: {name} has NaN/Inf"
                );
            }
        }
        let r = sinkhorn_row_sums(&ex, &sd, None, b, k, 0.05, 64).unwrap();
        let v = sinkhorn_col_update(&ex, &sd, &r, b, k, 0.05, b, 96).unwrap();
        let q = sinkhorn_codes(&ex, &sd, &r, &v, b, k, 0.05, b, 128).unwrap();
        for (name, buf) in [("r", &r), ("v", &v), ("codes", &q)] {
            assert!(
                down(&ex, buf).iter().all(|x| x.is_finite()),
                "{mode:?}: {name} has NaN/Inf"
            );
        }
    }
}

#[test]
fn nan_scores_give_nan_codes_and_bad_arguments_are_errors() {
    let (b, k) = (5, 70);
    let ex = Emu::new(Mode::Fibers);
    let p = params(0.05, 3);
    let mut s = scores(3, b, k);
    s.data_mut()[77] = f32::NAN;
    let got = down(
        &ex,
        &sinkhorn_fused(&ex, &up(&ex, s.data()), b, k, p, 64)
            .unwrap()
            .codes,
    );
    assert!(got.iter().any(|x| x.is_nan()));
    assert!(rel_l2(&got, &vec![0.1; b * k]).is_nan());
    let ok = up(&ex, scores(3, b, k).data());
    assert!(sinkhorn_fused(&ex, &ok, b, k + 1, p, 64).is_err());
    assert!(sinkhorn_fused(&ex, &ok, b, k, params(0.0, 3), 64).is_err());
    assert!(sinkhorn_fused(&ex, &ok, b, k, p, 48).is_err());
    let e = sinkhorn_row_sums(&ex, &ok, Some(&up(&ex, &[1.0; 4])), b, k, 0.05, 64)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("sinkhorn_row_sums") && e.contains('v'), "{e}");
    let r = up(&ex, &[1.0; 70]);
    // b_total counts every rank's rows: fewer than this rank's is a mistake.
    assert!(sinkhorn_col_update(&ex, &ok, &r, b, k, 0.05, b - 1, 64).is_err());
    assert!(sinkhorn_col_update(&ex, &ok, &up(&ex, &[1.0; 69]), b, k, 0.05, b, 64).is_err());
    assert!(sinkhorn_codes(&ex, &ok, &r, &up(&ex, &[1.0; 4]), b, k, 0.05, b, 64).is_err());
    assert!(sinkhorn_per_iteration(&ex, &ok, b, k, params(0.05, 0), b, 64, |_| Ok(())).is_err());
    // A failing all-reduce stops the op with its error.
    let e = sinkhorn_per_iteration(&ex, &ok, b, k, p, b, 64, |_| {
        Err(sdengine::Error::invalid("all-reduce", "peer gone"))
    })
    .err()
    .unwrap();
    assert!(e.to_string().contains("peer gone"), "{e}");
}

/// The blocked passes (`sinkhorn_pass`, the large-B and multi-rank path) against the reference:
/// partial last blocks (37 rows in blocks of 8 and 16), K not a multiple of the block, 1 to 5
/// iterations, both modes; the result is deterministic (bit-identical when run again), and the
/// block counter is reset between passes (else a pass's row sums stay poisoned and NaN shows).
#[test]
fn blocked_passes_match_reference_and_are_deterministic() {
    use sdengine::backend::device::sinkhorn::sinkhorn_blocked;
    for (mode, b, k, rows, threads, iters) in [
        (Mode::Fibers, 37, 1000, 8, 128, 3),
        (Mode::Threads, 37, 129, 16, 64, 1),
        (Mode::Fibers, 300, 257, 32, 96, 5),
        (Mode::Threads, 5, 33, 32, 32, 2),
    ] {
        let ex = Emu::new(mode);
        let s = scores(20 + b as u64, b, k);
        let p = params(0.05, iters);
        let want = sinkhorn(&s, p, &SingleProcess).unwrap();
        let sd = up(&ex, s.data());
        let mut reduces = 0;
        let q = sinkhorn_blocked(&ex, &sd, b, k, p, b, rows, threads, |_| {
            reduces += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(
            reduces, iters,
            "one all-reduce of the row sums per iteration"
        );
        let got = down(&ex, &q);
        let e = rel_l2(&got, want.data());
        eprintln!("sinkhorn_blocked B{b} K{k} rows {rows} it{iters} {mode:?}: rel_l2 {e:.2e}");
        assert!(e <= TOL, "B{b} K{k}: rel_l2 {e:.3e}");
        for row in got.chunks_exact(k) {
            let sum: f32 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-4, "a row of codes sums to {sum}");
        }
        let again = sinkhorn_blocked(&ex, &sd, b, k, p, b, rows, threads, |_| Ok(())).unwrap();
        assert_eq!(
            down(&ex, &again),
            got,
            "blocked passes must be deterministic"
        );
    }
}

/// Two ranks through the blocked passes with a real all-reduce between them equal the
/// two-rank reference (`methods::sinkhorn` over a LocalGroup).
#[test]
fn blocked_passes_over_two_ranks_match_reference() {
    use sdengine::backend::device::sinkhorn::sinkhorn_blocked;
    let (b, k, world) = (23, 300, 2);
    let parts: Vec<Tensor<f32>> = (0..world).map(|r| scores(30 + r as u64, b, k)).collect();
    let want = two_rank_reference(&parts);
    let ranks = LocalGroup::new(world).unwrap();
    let got: Vec<Vec<f32>> = std::thread::scope(|sc| {
        let hs: Vec<_> = ranks
            .iter()
            .zip(&parts)
            .map(|(comm, s)| {
                sc.spawn(move || {
                    let ex = Emu::new(Mode::Fibers);
                    let sd = up(&ex, s.data());
                    let p = SinkhornParams::default();
                    let q = sinkhorn_blocked(&ex, &sd, b, k, p, b * world, 8, 64, |r| {
                        let mut h = ex.download(r)?;
                        comm.all_reduce_sum_f32(&mut h)?;
                        ex.upload_into(&h, r)
                    })
                    .unwrap();
                    down(&ex, &q)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (rank, (g, w)) in got.iter().zip(&want).enumerate() {
        let e = rel_l2(g, w.data());
        eprintln!("sinkhorn_blocked rank {rank}: rel_l2 {e:.2e}");
        assert!(e <= TOL, "rank {rank}: rel_l2 {e:.3e}");
    }
}

#[test]
fn blocked_passes_refuse_bad_arguments() {
    use sdengine::backend::device::sinkhorn::sinkhorn_blocked;
    let ex = Emu::new(Mode::Fibers);
    let s = scores(1, 4, 10);
    let sd = up(&ex, s.data());
    let p = SinkhornParams::default();
    let none = |_: &mut HostBuf<f32>| Ok(());
    let e = sinkhorn_blocked(&ex, &sd, 4, 10, params(0.05, 0), 4, 2, 32, none).unwrap_err();
    assert!(e.to_string().contains("0 iterations"), "{e}");
    let e = sinkhorn_blocked(&ex, &sd, 4, 10, p, 4, 0, 32, none).unwrap_err();
    assert!(e.to_string().contains("rows_per_block"), "{e}");
    let e = sinkhorn_blocked(&ex, &sd, 4, 10, p, 3, 2, 32, none).unwrap_err();
    assert!(e.to_string().contains("b_total"), "{e}");
    let e = sinkhorn_blocked(&ex, &sd, 5, 10, p, 5, 2, 32, none).unwrap_err();
    assert!(e.to_string().contains("scores"), "{e}");
    let big = ex.zeros::<f32>(70_000).unwrap();
    let e = sinkhorn_blocked(&ex, &big, 1, 70_000, p, 1, 1, 32, none).unwrap_err();
    assert!(e.to_string().contains("shared memory"), "{e}");
}
