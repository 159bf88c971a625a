//! Sampling of augmentation parameters (torchvision's RandomResizedCrop / ColorJitter logic),
//! the recipes' structure, composition of a view from the parity-tested transforms, and Mixup /
//! CutMix in batch "extend" mode (spec §1.9).

use std::path::Path;

use sdengine::data::augment::{
    eval_into, sample_crop, MultiCrop, ViewParams, DAINO_NORM, SUAVE_NORM,
};
use sdengine::data::mixup::{cutmix_box, extend_labelled, mix_batch, sample_mix, MixParams};
use sdengine::data::transforms::{self as tf, CropBox, Interpolation};
use sdengine::data::{decode_file, Image};
use sdengine::rng::Rng;
use sdengine::tensor::Tensor;

fn load(name: &str) -> Image<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/data")
        .join(name);
    decode_file(&p).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn random_resized_crop_sampling_follows_torchvision() {
    let mut rng = Rng::new(1);
    let (h, w) = (300, 400);
    let mut fractions = Vec::new();
    for _ in 0..2000 {
        let c = sample_crop(&mut rng, h, w, (0.14, 1.0), (0.75, 4.0 / 3.0));
        assert!(c.top + c.height <= h && c.left + c.width <= w, "{c:?}");
        let frac = (c.height * c.width) as f64 / (h * w) as f64;
        let ratio = c.width as f64 / c.height as f64;
        // Rounding of w and h to integers widens the ranges slightly.
        assert!((0.13..=1.0).contains(&frac), "{c:?}");
        assert!((0.74..=1.35).contains(&ratio), "{c:?}");
        fractions.push(frac);
    }
    let mean = fractions.iter().sum::<f64>() / fractions.len() as f64;
    // Accepted draws skew small (large areas fail the fit more often), as in torchvision.
    assert!((0.45..0.6).contains(&mean), "mean area fraction {mean}");

    // The fallback: no try fits a 10x1000 image at scale >= 0.9, so the centre crop clamped to
    // ratio 4/3 is returned: h 10, w round(13.33) = 13, centred.
    let c = sample_crop(&mut rng, 10, 1000, (0.9, 1.0), (0.75, 4.0 / 3.0));
    assert_eq!(
        c,
        CropBox {
            top: 0,
            left: 493,
            height: 10,
            width: 13
        }
    );
    let c = sample_crop(&mut rng, 1000, 10, (0.9, 1.0), (0.75, 4.0 / 3.0));
    assert_eq!(
        c,
        CropBox {
            top: 493,
            left: 0,
            height: 13,
            width: 10
        }
    );
    // Same stream, same crop.
    let a = sample_crop(&mut Rng::new(5), h, w, (0.05, 0.14), (0.75, 4.0 / 3.0));
    let b = sample_crop(&mut Rng::new(5), h, w, (0.05, 0.14), (0.75, 4.0 / 3.0));
    assert_eq!(a, b);
}

#[test]
fn recipes_have_the_spec_structure() {
    let s = MultiCrop::suave_unlabelled(true);
    assert_eq!(s.views.len(), 10);
    assert!(s.views[..2]
        .iter()
        .all(|v| v.size == 224 && v.scale == (0.14, 1.0)));
    assert!(s.views[2..]
        .iter()
        .all(|v| v.size == 96 && v.scale == (0.05, 0.14)));
    assert!(s.views.iter().all(|v| v.interp == Interpolation::Bilinear
        && v.blur_p == 0.5
        && v.solarize_p == 0.0
        && v.norm == SUAVE_NORM
        && v.jitter.map(|j| (j.brightness, j.hue, j.p)) == Some((0.8, 0.2, 0.8))));
    let f = MultiCrop::suave_unlabelled(false);
    assert!(f
        .views
        .iter()
        .all(|v| v.jitter.is_none() && v.gray_p == 0.0 && v.blur_p == 0.0));
    let ft = MultiCrop::suave_finetune_unlabelled();
    assert_eq!(ft.views.len(), 2);
    assert!(ft
        .views
        .iter()
        .all(|v| v.scale == (0.08, 1.0) && v.jitter.is_none()));

    let d = MultiCrop::daino_unlabelled();
    assert_eq!(d.views.len(), 10);
    assert_eq!((d.views[0].blur_p, d.views[0].solarize_p), (1.0, 0.0));
    assert_eq!((d.views[1].blur_p, d.views[1].solarize_p), (0.1, 0.2));
    assert!(d.views[2..]
        .iter()
        .all(|v| v.size == 96 && v.scale == (0.05, 0.25) && v.blur_p == 0.5));
    assert!(d
        .views
        .iter()
        .all(|v| v.interp == Interpolation::Bicubic && v.norm == DAINO_NORM));
    assert_eq!(DAINO_NORM.std[0], 0.229);
    assert_eq!(SUAVE_NORM.std[0], 0.228);

    let l = MultiCrop::labelled();
    assert_eq!(l.views.len(), 1);
    assert_eq!(
        (l.views[0].gray_p, l.views[0].blur_p, l.views[0].scale),
        (0.2, 0.0, (0.08, 1.0))
    );
    let ll = MultiCrop::labelled_light();
    assert_eq!(ll.views[0].gray_p, 0.0);
    assert_eq!(ll.views[0].jitter.map(|j| j.saturation), Some(0.1));
}

#[test]
fn sampled_probabilities_match_the_recipe() {
    let d = MultiCrop::daino_unlabelled();
    let n = 4000;
    let (mut flip, mut jit, mut gray, mut blur0, mut blur1, mut sol1, mut blur_l) =
        (0, 0, 0, 0, 0, 0, 0);
    let root = Rng::new(11);
    for i in 0..n {
        let ps = d.sample(&root.fork(i), 375, 500);
        flip += ps[2].flip as usize;
        jit += ps[2].jitter.is_some() as usize;
        gray += ps[2].gray as usize;
        blur0 += ps[0].blur.is_some() as usize;
        blur1 += ps[1].blur.is_some() as usize;
        sol1 += ps[1].solarize as usize;
        blur_l += ps[5].blur.is_some() as usize;
        assert!(!ps[0].solarize && !ps[3].solarize);
        if let Some(s) = ps[0].blur {
            assert!((0.1..=2.0).contains(&s));
        }
        if let Some((order, f)) = ps[2].jitter {
            let mut o = order;
            o.sort_unstable();
            assert_eq!(o, [0, 1, 2, 3]);
            assert!((0.6..=1.4).contains(&f[0]) && (0.8..=1.2).contains(&f[2]));
            assert!((-0.1..=0.1).contains(&f[3]));
        }
    }
    let p = |k: usize| k as f64 / n as f64;
    assert!((p(flip) - 0.5).abs() < 0.03, "flip {}", p(flip));
    assert!((p(jit) - 0.8).abs() < 0.03, "jitter {}", p(jit));
    assert!((p(gray) - 0.2).abs() < 0.03, "gray {}", p(gray));
    assert_eq!(blur0, n as usize);
    assert!((p(blur1) - 0.1).abs() < 0.02, "blur g2 {}", p(blur1));
    assert!((p(sol1) - 0.2).abs() < 0.03, "solarize {}", p(sol1));
    assert!((p(blur_l) - 0.5).abs() < 0.03, "blur local {}", p(blur_l));
}

#[test]
fn a_view_is_the_composition_of_the_tested_transforms() {
    let img = load("rgb_a.png");
    let mut aug = MultiCrop::daino_unlabelled().views[1].clone();
    aug.size = 24;
    let p = ViewParams {
        crop: CropBox {
            top: 2,
            left: 3,
            height: 30,
            width: 40,
        },
        flip: true,
        jitter: Some(([3, 0, 2, 1], [1.2, 0.8, 1.1, 0.05])),
        gray: true,
        blur: Some(0.9),
        solarize: true,
    };
    let mut got = vec![0.0; aug.numel()];
    aug.apply(&img, &p, &mut got);
    let mut x = tf::resized_crop(&img, p.crop, 24, Interpolation::Bicubic, false);
    tf::hflip(&mut x);
    tf::adjust_hue(&mut x, 0.05);
    tf::adjust_brightness(&mut x, 1.2);
    tf::adjust_saturation(&mut x, 1.1);
    tf::adjust_contrast(&mut x, 0.8);
    tf::grayscale(&mut x);
    tf::gaussian_blur_pil(&mut x, 0.9);
    tf::solarize(&mut x);
    let mut want = vec![0.0; aug.numel()];
    tf::normalize_into(&x, DAINO_NORM.mean, DAINO_NORM.std, &mut want);
    assert_eq!(got, want);
    // Grayscale output: the three channels are equal.
    assert!(got
        .chunks_exact(3)
        .all(|c| (c[0] * 0.229 + 0.485 - (c[2] * 0.225 + 0.406)).abs() < 1e-5));
}

#[test]
fn eval_transform_shape_and_range() {
    let img = load("rgb_a.png");
    let mut out = vec![0.0; 24 * 24 * 3];
    eval_into(&img, 30, 24, SUAVE_NORM, &mut out);
    let lo = (0.0 - 0.485) / 0.228 - 1e-5;
    let hi = (1.0 - 0.406) / 0.225 + 1e-5;
    assert!(out.iter().all(|v| (lo..=hi).contains(v)));
}

#[test]
fn cutmix_box_and_lambda_as_timm() {
    // h = w = 10, λ = 0.64: ratio 0.6, cut 6, centre (5, 5) -> [2, 8) x [2, 8), λ = 1 - 36/100.
    let p = cutmix_box(10, 10, 0.64, 5, 5);
    assert_eq!(p.cutmix_box, Some((2, 8, 2, 8)));
    assert!((p.lambda - 0.64).abs() < 1e-6);
    // Clipped at the corner: centre (0, 9) -> [0, 3) x [6, 10), λ = 1 - 12/100.
    let p = cutmix_box(10, 10, 0.64, 0, 9);
    assert_eq!(p.cutmix_box, Some((0, 3, 6, 10)));
    assert!((p.lambda - 0.88).abs() < 1e-6);
    // Odd cut: λ = 0.75 on 9x9: ratio 0.5, cut 4 (int(4.5)), half 2.
    let p = cutmix_box(9, 9, 0.75, 4, 4);
    assert_eq!(p.cutmix_box, Some((2, 6, 2, 6)));
}

#[test]
fn mix_batch_and_extended_targets() {
    let b = 4;
    let x = Tensor::rand_named(0, "mix_x", &[b, 5, 6, 3], -1.0, 1.0);
    let labels = [3usize, 0, 2, 3];
    // Mixup.
    let p = MixParams {
        lambda: 0.3,
        cutmix_box: None,
    };
    let (imgs, tg) = extend_labelled(&x, &labels, 5, &p).expect("extend");
    assert_eq!(imgs.shape(), &[2 * b, 5, 6, 3]);
    assert_eq!(tg.shape(), &[2 * b, 5]);
    let per = 5 * 6 * 3;
    assert_eq!(&imgs.data()[..b * per], x.data());
    for i in 0..b {
        let j = b - 1 - i;
        for k in 0..per {
            let want = 0.3 * x.data()[i * per + k] + 0.7 * x.data()[j * per + k];
            assert!((imgs.data()[(b + i) * per + k] - want).abs() < 1e-6);
        }
        let one = &tg.data()[i * 5..(i + 1) * 5];
        assert_eq!(one.iter().sum::<f32>(), 1.0);
        assert_eq!(one[labels[i]], 1.0);
        let soft = &tg.data()[(b + i) * 5..(b + i + 1) * 5];
        let mut want = [0.0f32; 5];
        want[labels[i]] += 0.3;
        want[labels[j]] += 0.7;
        for c in 0..5 {
            assert!((soft[c] - want[c]).abs() < 1e-6, "row {i}");
        }
    }
    // CutMix: the box comes from the flipped partner, the rest stays.
    let p = cutmix_box(5, 6, 0.5, 2, 3);
    let (y0, y1, x0, x1) = p.cutmix_box.expect("box");
    let m = mix_batch(&x, &x, &p).expect("mix");
    for i in 0..b {
        let j = b - 1 - i;
        for y in 0..5 {
            for xx in 0..6 {
                for c in 0..3 {
                    let k = (y * 6 + xx) * 3 + c;
                    let inside = (y0..y1).contains(&y) && (x0..x1).contains(&xx);
                    let src = if inside { j } else { i };
                    assert_eq!(m.data()[i * per + k], x.data()[src * per + k]);
                }
            }
        }
    }
    assert!(extend_labelled(&x, &[0, 1, 2], 5, &p).is_err());
    assert!(extend_labelled(&x, &[0, 1, 2, 9], 5, &p).is_err());
}

#[test]
fn mix_sampling_switches_half_the_time() {
    let mut rng = Rng::new(3);
    let n = 4000;
    let mut cut = 0;
    let mut lsum = 0.0;
    for _ in 0..n {
        let p = sample_mix(&mut rng, 1.0, 0.5, 224, 224);
        assert!((0.0..=1.0).contains(&p.lambda));
        if p.cutmix_box.is_some() {
            cut += 1;
        } else {
            lsum += p.lambda as f64;
        }
    }
    assert!(((cut as f64 / n as f64) - 0.5).abs() < 0.03);
    // Mixup's λ is U(0, 1); CutMix's is corrected upwards by clipping, so only Mixup is checked.
    assert!(((lsum / (n - cut) as f64) - 0.5).abs() < 0.03);
    let none = sample_mix(&mut rng, 0.0, 0.5, 224, 224);
    assert_eq!(
        none,
        MixParams {
            lambda: 1.0,
            cutmix_box: None
        }
    );
}
