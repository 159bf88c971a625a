//! Parity of every augmentation with torchvision / Pillow, given the same explicit parameters.
//! References: tests/reference/data_transforms.py on the small committed fixture images.

use std::path::Path;

use sdengine::data::transforms::{self as tf, CropBox, Interpolation};
use sdengine::data::{decode_file, Image};
use sdengine::testing::Fixtures;

fn load(name: &str) -> Image<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/data")
        .join(name);
    decode_file(&p).unwrap_or_else(|e| panic!("{e}"))
}

fn fixtures() -> Fixtures {
    Fixtures::open("data/transforms.safetensors").expect("run tests/reference/data_transforms.py")
}

/// Max absolute difference, after checking the shape; NaN fails.
fn max_diff(got: &Image<f32>, fx: &Fixtures, name: &str) -> f32 {
    let want = fx.get(name).expect("fixture entry");
    assert_eq!(want.shape(), &[got.height, got.width, 3], "{name}: shape");
    let mut m = 0.0f32;
    for (a, b) in got.data.iter().zip(want.data()) {
        let d = (a - b).abs();
        assert!(d.is_finite(), "{name}: non-finite value");
        m = m.max(d);
    }
    m
}

fn patch(
    img: &Image<f32>,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
) -> Image<f32> {
    let mut out = Image::new(rows.len(), cols.len());
    for (yo, y) in rows.enumerate() {
        for (xo, x) in cols.clone().enumerate() {
            let p = img.pixel(y, x);
            out.data[(yo * out.width + xo) * 3..(yo * out.width + xo) * 3 + 3].copy_from_slice(&p);
        }
    }
    out
}

#[test]
fn resized_crop_matches_torchvision_antialias() {
    let fx = fixtures();
    let cases = [
        (
            "crop_a_bl_down",
            "rgb_a.png",
            (3, 5, 30, 36),
            20,
            Interpolation::Bilinear,
            false,
        ),
        (
            "crop_a_bl_up_flip",
            "rgb_a.png",
            (2, 1, 12, 10),
            20,
            Interpolation::Bilinear,
            true,
        ),
        (
            "crop_b_bl_full",
            "rgb_b.png",
            (0, 0, 33, 37),
            16,
            Interpolation::Bilinear,
            false,
        ),
        (
            "crop_a_bc_down",
            "rgb_a.png",
            (3, 5, 30, 36),
            20,
            Interpolation::Bicubic,
            true,
        ),
        (
            "crop_b_bc_up",
            "rgb_b.png",
            (10, 4, 9, 14),
            18,
            Interpolation::Bicubic,
            false,
        ),
        (
            "crop_b_bc_odd",
            "rgb_b.png",
            (1, 2, 31, 29),
            7,
            Interpolation::Bicubic,
            false,
        ),
    ];
    for (name, file, (top, left, height, width), size, interp, flip) in cases {
        let img = load(file);
        let crop = CropBox {
            top,
            left,
            height,
            width,
        };
        let got = tf::resized_crop(&img, crop, size, interp, flip);
        let d = max_diff(&got, &fx, name);
        assert!(d <= 2e-6, "{name}: max |diff| {d:.3e}");
        // The same crop from an f32 image gives the same result.
        let gotf = tf::resized_crop(&img.to_f32(), crop, size, interp, flip);
        let d = max_diff(&gotf, &fx, name);
        assert!(d <= 2e-6, "{name} (f32 input): max |diff| {d:.3e}");
    }
}

#[test]
fn colour_ops_match_torchvision() {
    let fx = fixtures();
    let x = patch(&load("rgb_b.png").to_f32(), 8..24, 10..26);
    type Op = fn(&mut Image<f32>, f32);
    let cases: [(&str, Op, f32); 11] = [
        ("bright_up", tf::adjust_brightness, 1.6),
        ("bright_down", tf::adjust_brightness, 0.45),
        ("contrast_up", tf::adjust_contrast, 1.7),
        ("contrast_down", tf::adjust_contrast, 0.3),
        ("sat_up", tf::adjust_saturation, 1.8),
        ("sat_down", tf::adjust_saturation, 0.2),
        ("hue_pos", tf::adjust_hue, 0.15),
        ("hue_neg", tf::adjust_hue, -0.4),
        ("hue_half", tf::adjust_hue, 0.5),
        ("gray", |i, _| tf::grayscale(i), 0.0),
        ("solarize", |i, _| tf::solarize(i), 0.0),
    ];
    for (name, op, f) in cases {
        let mut y = x.clone();
        op(&mut y, f);
        let d = max_diff(&y, &fx, name);
        assert!(d <= 2e-6, "{name}: max |diff| {d:.3e}");
        assert_ne!(y, x, "{name}: op did nothing");
    }
}

#[test]
fn colour_jitter_in_given_order_matches_torchvision() {
    let fx = fixtures();
    let x = patch(&load("rgb_a.png").to_f32(), 4..20, 20..36);
    let cases = [
        ("jitter_1", [2usize, 0, 3, 1], [1.3f32, 0.7, 1.5, -0.08]),
        ("jitter_2", [3, 1, 0, 2], [0.6, 1.8, 0.1, 0.19]),
    ];
    for (name, order, fac) in cases {
        let mut y = x.clone();
        tf::color_jitter(&mut y, order, fac);
        let d = max_diff(&y, &fx, name);
        assert!(d <= 3e-6, "{name}: max |diff| {d:.3e}");
    }
}

#[test]
fn gaussian_blur_matches_pillow() {
    let fx = fixtures();
    let bytes = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/blur.safetensors"),
    )
    .expect("blur fixture");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    for (name, file, r) in [
        ("blur_a_07", "rgb_a.png", 0.7f32),
        ("blur_b_19", "rgb_b.png", 1.9),
        ("blur_a_01", "rgb_a.png", 0.1),
        ("blur_a_13", "rgb_a.png", 1.3),
    ] {
        let mut y = load(file).to_f32();
        tf::gaussian_blur_pil(&mut y, r);
        // Pillow rounds to u8 after each of its six box passes; the engine stays in f32.
        let view = st.tensor(name).expect("entry");
        assert_eq!(view.dtype(), safetensors::Dtype::U8);
        assert_eq!(view.shape(), &[y.height, y.width, 3]);
        let (mut max, mut sum) = (0.0f32, 0.0f64);
        for (a, &b) in y.data.iter().zip(view.data()) {
            let d = (a * 255.0 - b as f32).abs();
            max = max.max(d);
            sum += d as f64;
        }
        let mean = sum / y.data.len() as f64;
        // Six roundings to u8 add up to about half a level on average.
        assert!(
            max <= 3.0 && mean <= 0.75,
            "{name}: max {max:.2} mean {mean:.3} levels"
        );
        // The unrounded algorithm (a numpy transcription of Pillow that matches it exactly
        // when rounding) on a patch agrees to float precision.
        let mut p = patch(&load(file).to_f32(), 4..20, 20..36);
        tf::gaussian_blur_pil(&mut p, r);
        let d = max_diff(&p, &fx, &format!("{name}_f"));
        assert!(d <= 1e-5, "{name}_f: max |diff| {d:.3e}");
        if r >= 0.5 {
            assert_ne!(y, load(file).to_f32(), "{name}: blur did nothing");
        }
    }
}

#[test]
fn eval_resize_center_crop_and_normalize_match_torchvision() {
    let fx = fixtures();
    for (name, file) in [("eval_a", "rgb_a.png"), ("eval_b", "rgb_b.png")] {
        let y = tf::resize_center_crop(&load(file), 30, 24);
        let d = max_diff(&y, &fx, name);
        assert!(d <= 2e-6, "{name}: max |diff| {d:.3e}");
    }
    let x = patch(&load("rgb_b.png").to_f32(), 8..24, 10..26);
    let mut out = Image::<f32>::new(16, 16);
    tf::normalize_into(
        &x,
        [0.485, 0.456, 0.406],
        [0.228, 0.224, 0.225],
        &mut out.data,
    );
    let d = max_diff(&out, &fx, "normalize_b");
    assert!(d <= 2e-6, "normalize: max |diff| {d:.3e}");
    assert_eq!(tf::resize_shorter_size(375, 500, 256), (256, 341));
    assert_eq!(tf::resize_shorter_size(500, 333, 256), (384, 256));
}
