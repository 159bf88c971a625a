//! kernels/mixup.cu through the device ops (`backend::device::mixup`) on the CPU emulation
//! against `src/data/mixup.rs`: Mixup, CutMix (a box clipped at the border and one inside), no
//! mixing, the extended labelled batch, bf16, and the soft targets. Odd batch (the middle row
//! mixes with itself) and awkward image sizes; a grid-stride launch with fewer blocks than
//! elements. Outputs come from poisoned (NaN) allocations unless a test says otherwise.

use half::bf16;
use sdengine::backend::device::mixup::{mix_batch, mix_batch_into, mixup_targets, upload_labels};
use sdengine::backend::device::{DevBuf, Emu, Exec, KArg, LaunchConfig, Mode};
use sdengine::data::mixup::{self, cutmix_box, MixParams};
use sdengine::testing::rel_l2;
use sdengine::Tensor;

const SHAPE: [usize; 4] = [5, 13, 17, 3];

fn batch(name: &str) -> Tensor<f32> {
    Tensor::randn_named(11, name, &SHAPE, 1.0)
}

fn cases() -> Vec<(&'static str, MixParams)> {
    vec![
        (
            "mixup",
            MixParams {
                lambda: 0.37,
                cutmix_box: None,
            },
        ),
        ("cutmix inside", cutmix_box(SHAPE[1], SHAPE[2], 0.55, 6, 8)),
        ("cutmix clipped", cutmix_box(SHAPE[1], SHAPE[2], 0.2, 1, 15)),
        (
            "no mixing",
            MixParams {
                lambda: 1.0,
                cutmix_box: None,
            },
        ),
    ]
}

fn targets(ex: &Emu, labels: &[usize], classes: usize, lambda: f32, ls: f32, t: u32) -> Vec<f32> {
    let ld = upload_labels(ex, labels, classes).expect("labels");
    let out = mixup_targets(ex, &ld, classes, lambda, ls, t).expect("targets");
    ex.download(&out).expect("download")
}

#[test]
fn mix_batch_matches_cpu_for_mixup_cutmix_and_identity() {
    let ex = Emu::new(Mode::Fibers);
    let (x1, x2) = (batch("x1"), batch("x2"));
    let (d1, d2) = (ex.upload(x1.data()).unwrap(), ex.upload(x2.data()).unwrap());
    for (what, p) in cases() {
        let want = mixup::mix_batch(&x1, &x2, &p).expect("cpu mix");
        let out = mix_batch(&ex, &d1, &d2, SHAPE, &p, 64).expect("emu mix");
        let got = ex.download(&out).unwrap();
        let e = rel_l2(&got, want.data());
        assert!(e <= 1e-7, "{what}: relative L2 error {e:.3e}");
    }
    // One block of 64 threads per image of 663 elements: the grid-stride loop must cover it all.
    let p = &cases()[1].1;
    let want = mixup::mix_batch(&x1, &x2, p).expect("cpu mix");
    let ex = Emu::new(Mode::Threads);
    let out = ex.alloc::<f32>(x1.numel()).unwrap();
    let [b, h, w, c] = SHAPE.map(|v| v as i32);
    let (yl, yh, xl, xh) = p.cutmix_box.expect("cutmix");
    let [yl, yh, xl, xh] = [yl, yh, xl, xh].map(|v| v as i32);
    let args = [
        d1.arg(),
        d2.arg(),
        out.arg(),
        KArg::I32(b),
        KArg::I32(h),
        KArg::I32(w),
        KArg::I32(c),
        KArg::F32(p.lambda),
        KArg::I32(1),
        KArg::I32(yl),
        KArg::I32(yh),
        KArg::I32(xl),
        KArg::I32(xh),
    ];
    let cfg = LaunchConfig {
        grid: (1, 5, 1),
        block: (64, 1, 1),
        shared_bytes: 0,
    };
    // SAFETY: the argument list is mix_batch_f32's signature; the buffers hold B·H·W·C values.
    unsafe { ex.launch("mixup", "mix_batch_f32", cfg, &args) }.expect("launch");
    let got = ex.download(&out).unwrap();
    assert!(rel_l2(&got, want.data()) <= 1e-7, "grid-stride coverage");
}

#[test]
fn extended_labelled_batch_and_targets_match_cpu() {
    let ex = Emu::new(Mode::Fibers);
    let x = batch("lab");
    let xd = ex.upload(x.data()).unwrap();
    let labels = [3usize, 0, 9, 3, 7];
    let classes = 10;
    for (what, p) in cases() {
        let (want_x, want_t) =
            mixup::extend_labelled(&x, &labels, classes, &p).expect("cpu extend");
        // [x; mix(x, x)]: the mixed half is written straight into the second half of the buffer
        // (poisoned with NaN, so a value the kernel misses fails the comparison).
        let n = x.numel();
        let mut host = x.data().to_vec();
        host.extend(std::iter::repeat_n(f32::NAN, n));
        let mut got = ex.upload(&host).unwrap();
        mix_batch_into(&ex, &xd, &xd, &mut got, n, SHAPE, &p, 96).expect("emu mix");
        let got = ex.download(&got).unwrap();
        assert!(rel_l2(&got, want_x.data()) <= 1e-7, "{what}: images");
        let mut t = targets(&ex, &labels, classes, 1.0, 0.0, 32);
        t.extend(targets(&ex, &labels, classes, p.lambda, 0.0, 32));
        assert_eq!(t, want_t.data(), "{what}: targets");
    }
    let want = mixup::mixup_targets(&labels, classes, 0.3, 0.1);
    let got = targets(&ex, &labels, classes, 0.3, 0.1, 64);
    assert_eq!(got, want.data(), "label-smoothed targets");
    assert!(
        upload_labels(&ex, &[10], classes).is_err(),
        "label out of range"
    );
    // The second half of a [2B] buffer, but one element short.
    let mut short = ex.alloc::<f32>(2 * x.numel() - 1).unwrap();
    let p = &cases()[0].1;
    assert!(mix_batch_into(&ex, &xd, &xd, &mut short, x.numel(), SHAPE, p, 64).is_err());
}

#[test]
fn bf16_mix_is_the_f32_mix_rounded_once() {
    let ex = Emu::new(Mode::Fibers);
    let (x1, x2) = (batch("b1").to_bf16(), batch("b2").to_bf16());
    let (f1, f2) = (x1.to_f32(), x2.to_f32());
    let (d1, d2) = (ex.upload(x1.data()).unwrap(), ex.upload(x2.data()).unwrap());
    for (what, p) in cases() {
        let want = mixup::mix_batch(&f1, &f2, &p).expect("cpu mix");
        let out = mix_batch::<Emu, bf16>(&ex, &d1, &d2, SHAPE, &p, 128).expect("emu mix");
        let got = ex.download(&out).unwrap();
        let exact = got
            .iter()
            .zip(want.data())
            .all(|(g, &w)| *g == bf16::from_f32(w));
        assert!(exact, "{what}: bf16 output is not the rounded f32 mix");
    }
    let bad = MixParams {
        lambda: 0.5,
        cutmix_box: Some((0, 14, 0, 3)),
    };
    assert!(
        mix_batch::<Emu, bf16>(&ex, &d1, &d2, SHAPE, &bad, 64).is_err(),
        "box outside the image"
    );
}

/// Every op writes all of its poisoned (NaN) output, in both emulation modes, including the
/// targets at a size that leaves the last block partial.
#[test]
fn outputs_from_poisoned_allocations_are_written_everywhere() {
    let (x1, x2) = (batch("p1"), batch("p2"));
    for mode in [Mode::Fibers, Mode::Threads] {
        let ex = Emu::new(mode);
        let (d1, d2) = (ex.upload(x1.data()).unwrap(), ex.upload(x2.data()).unwrap());
        for (what, p) in cases() {
            let got = ex
                .download(&mix_batch(&ex, &d1, &d2, SHAPE, &p, 96).unwrap())
                .unwrap();
            assert!(
                got.iter().all(|v| !v.is_nan()),
                "{mode:?} {what}: poison left"
            );
            let (b1, b2) = (
                ex.upload(x1.to_bf16().data()).unwrap(),
                ex.upload(x2.to_bf16().data()).unwrap(),
            );
            let got = ex
                .download(&mix_batch::<Emu, bf16>(&ex, &b1, &b2, SHAPE, &p, 96).unwrap())
                .unwrap();
            assert!(
                got.iter().all(|v| !v.is_nan()),
                "{mode:?} {what} bf16: poison left"
            );
        }
        let t = targets(&ex, &[1, 2, 0, 6, 5], 7, 0.4, 0.1, 32);
        assert_eq!(t.len(), 35);
        assert!(
            t.iter().all(|v| !v.is_nan()),
            "{mode:?} targets: poison left"
        );
    }
}
