//! kernels/mixup.cu through the CPU emulation against `src/data/mixup.rs`: Mixup, CutMix (a box
//! clipped at the border and one inside), no mixing, the extended labelled batch, bf16, and the
//! soft targets. Odd batch (the middle row mixes with itself) and awkward image sizes; a
//! grid-stride launch with fewer blocks than elements.

use half::bf16;
use sdengine::backend::emu::mixup::{mix_batch, mix_batch_bf16, mixup_targets};
use sdengine::backend::emu::{arg, launch_raw, LaunchConfig, Mode};
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

#[test]
fn mix_batch_matches_cpu_for_mixup_cutmix_and_identity() {
    let (x1, x2) = (batch("x1"), batch("x2"));
    for (what, p) in cases() {
        let want = mixup::mix_batch(&x1, &x2, &p).expect("cpu mix");
        let mut got = vec![f32::NAN; x1.numel()];
        mix_batch(Mode::Fibers, x1.data(), x2.data(), &mut got, SHAPE, &p, 64).expect("emu mix");
        let e = rel_l2(&got, want.data());
        assert!(e <= 1e-7, "{what}: relative L2 error {e:.3e}");
    }
    // One block of 64 threads per image of 663 elements: the grid-stride loop must cover it all.
    let p = &cases()[1].1;
    let want = mixup::mix_batch(&x1, &x2, p).expect("cpu mix");
    let mut got = vec![f32::NAN; x1.numel()];
    let (p1, p2, po) = (x1.data().as_ptr(), x2.data().as_ptr(), got.as_mut_ptr());
    let [b, h, w, c] = SHAPE.map(|v| v as i32);
    let (yl, yh, xl, xh) = p.cutmix_box.expect("cutmix");
    let [yl, yh, xl, xh] = [yl, yh, xl, xh].map(|v| v as i32);
    let (l, cm) = (p.lambda, 1i32);
    let mut args = [
        arg(&p1),
        arg(&p2),
        arg(&po),
        arg(&b),
        arg(&h),
        arg(&w),
        arg(&c),
        arg(&l),
        arg(&cm),
        arg(&yl),
        arg(&yh),
        arg(&xl),
        arg(&xh),
    ];
    // SAFETY: the argument list is mix_batch_f32's signature; the buffers hold B·H·W·C values.
    unsafe {
        launch_raw(
            Mode::Threads,
            "mixup",
            "mix_batch_f32",
            LaunchConfig {
                grid: (1, 5, 1),
                block: (64, 1, 1),
                shared_bytes: 0,
            },
            &mut args,
        )
    }
    .expect("launch");
    assert!(rel_l2(&got, want.data()) <= 1e-7, "grid-stride coverage");
}

#[test]
fn extended_labelled_batch_and_targets_match_cpu() {
    let x = batch("lab");
    let labels = [3usize, 0, 9, 3, 7];
    let classes = 10;
    for (what, p) in cases() {
        let (want_x, want_t) =
            mixup::extend_labelled(&x, &labels, classes, &p).expect("cpu extend");
        // [x; mix(x, x)]: the mixed half is written straight into the second half of the buffer.
        let n = x.numel();
        let mut got = vec![f32::NAN; 2 * n];
        got[..n].copy_from_slice(x.data());
        mix_batch(
            Mode::Fibers,
            x.data(),
            x.data(),
            &mut got[n..],
            SHAPE,
            &p,
            96,
        )
        .expect("emu mix");
        assert!(rel_l2(&got, want_x.data()) <= 1e-7, "{what}: images");
        let mut t = mixup_targets(Mode::Fibers, &labels, classes, 1.0, 0.0, 32).expect("one-hot");
        t.extend(mixup_targets(Mode::Fibers, &labels, classes, p.lambda, 0.0, 32).expect("soft"));
        assert_eq!(t, want_t.data(), "{what}: targets");
    }
    let want = mixup::mixup_targets(&labels, classes, 0.3, 0.1);
    let got = mixup_targets(Mode::Fibers, &labels, classes, 0.3, 0.1, 64).expect("smoothed");
    assert_eq!(got, want.data(), "label-smoothed targets");
    assert!(
        mixup_targets(Mode::Fibers, &[10], classes, 0.3, 0.0, 64).is_err(),
        "label out of range"
    );
}

#[test]
fn bf16_mix_is_the_f32_mix_rounded_once() {
    let (x1, x2) = (batch("b1").to_bf16(), batch("b2").to_bf16());
    let (f1, f2) = (x1.to_f32(), x2.to_f32());
    for (what, p) in cases() {
        let want = mixup::mix_batch(&f1, &f2, &p).expect("cpu mix");
        let mut got = vec![bf16::NAN; f1.numel()];
        mix_batch_bf16(Mode::Fibers, x1.data(), x2.data(), &mut got, SHAPE, &p, 128)
            .expect("emu mix");
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
    let mut out = vec![bf16::ZERO; f1.numel()];
    assert!(
        mix_batch_bf16(
            Mode::Fibers,
            x1.data(),
            x2.data(),
            &mut out,
            SHAPE,
            &bad,
            64
        )
        .is_err(),
        "box outside the image"
    );
}
