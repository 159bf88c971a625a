//! kernels/augment.cu through the CPU emulation against `ViewAug::apply`: every view of a crop
//! set in one launch, with parameters sampled by `ViewAug::sample` (Suave's bilinear and Daino's
//! bicubic multi-crop at their real sizes) and hand-made ones that force each stage: strong
//! downscaling and upscaling, flip, ColorJitter with contrast first / in the middle / last,
//! grayscale, PIL blur at both ends of its sigma range, solarise, and a view with nothing but the
//! crop. Awkward image sizes; f32 within 1e-5 relative L2 of the CPU per view, and the bf16
//! variant is the f32 result rounded once.

use half::bf16;
use sdengine::backend::emu::augment::{augment_views, augment_views_bf16, ViewJob};
use sdengine::backend::emu::Mode;
use sdengine::data::augment::{MultiCrop, ViewAug, ViewParams};
use sdengine::data::image::Image;
use sdengine::data::transforms::{CropBox, Interpolation};
use sdengine::rng::Rng;
use sdengine::testing::rel_l2;

const TOL: f64 = 1e-5;

fn image(seed: u64, h: usize, w: usize) -> Image<u8> {
    let mut r = Rng::named(seed, "augment.image");
    // Smooth structure plus noise, so resampling and blur see both gradients and edges.
    let data = (0..h * w * 3)
        .map(|i| {
            let (y, x, c) = (i / (w * 3), (i / 3) % w, i % 3);
            let base = (y * 7 + x * 3 + c * 50) % 200;
            (base + r.below(56) as usize) as u8
        })
        .collect();
    Image::from_vec(h, w, data).expect("size")
}

/// CPU reference views and kernel views (f32, and bf16 from a second launch) for `jobs`.
fn check(tag: &str, jobs: &[ViewJob<'_>], mode: Mode, threads: u32) {
    let mut got: Vec<Vec<f32>> = jobs.iter().map(|j| vec![f32::NAN; j.aug.numel()]).collect();
    let mut slots: Vec<&mut [f32]> = got.iter_mut().map(|v| v.as_mut_slice()).collect();
    augment_views(mode, jobs, &mut slots, threads).expect("emu augment");
    let mut gotb: Vec<Vec<bf16>> = jobs
        .iter()
        .map(|j| vec![bf16::NAN; j.aug.numel()])
        .collect();
    let mut slots: Vec<&mut [bf16]> = gotb.iter_mut().map(|v| v.as_mut_slice()).collect();
    augment_views_bf16(Mode::Fibers, jobs, &mut slots, threads).expect("emu augment bf16");
    let mut worst = 0.0f64;
    for (i, j) in jobs.iter().enumerate() {
        let mut want = vec![0.0f32; j.aug.numel()];
        j.aug.apply(j.img, j.params, &mut want);
        let e = rel_l2(&got[i], &want);
        assert!(
            e <= TOL,
            "{tag} view {i} ({:?}): relative L2 error {e:.3e}",
            j.params
        );
        worst = worst.max(e);
        let exact = gotb[i]
            .iter()
            .zip(&got[i])
            .all(|(b, &f)| *b == bf16::from_f32(f));
        assert!(
            exact,
            "{tag} view {i}: bf16 output is not the f32 output rounded"
        );
    }
    eprintln!(
        "{tag}: {} views, worst relative L2 error {worst:.3e}",
        jobs.len()
    );
}

#[test]
fn sampled_multi_crop_sets_match_view_aug_apply() {
    // One image per recipe, all ten views (2 x 224 + 8 x 96) in one launch each.
    let img_a = image(1, 181, 243);
    let img_b = image(2, 250, 167);
    for (tag, mc, img) in [
        ("suave", MultiCrop::suave_unlabelled(true), &img_a),
        ("daino", MultiCrop::daino_unlabelled(), &img_b),
    ] {
        let params = mc.sample(&Rng::named(3, tag), img.height, img.width);
        let jobs: Vec<ViewJob<'_>> = mc
            .views
            .iter()
            .zip(&params)
            .map(|(aug, params)| ViewJob { img, aug, params })
            .collect();
        check(tag, &jobs, Mode::Fibers, 256);
    }
}

fn small(aug: &ViewAug, size: usize, interp: Interpolation) -> ViewAug {
    let mut v = aug.clone();
    v.size = size;
    v.interp = interp;
    v
}

#[test]
fn every_stage_matches_view_aug_apply_in_threads_mode() {
    let imgs = [image(4, 37, 53), image(5, 61, 29), image(6, 23, 23)];
    let base = MultiCrop::daino_unlabelled().views.remove(0);
    let crop = |top, left, height, width| CropBox {
        top,
        left,
        height,
        width,
    };
    let p = |c: CropBox| ViewParams {
        crop: c,
        flip: false,
        jitter: None,
        gray: false,
        blur: None,
        solarize: false,
    };
    let mut cases: Vec<(usize, ViewAug, ViewParams)> = Vec::new();
    for interp in [Interpolation::Bilinear, Interpolation::Bicubic] {
        // Crop only: strong downscale (61 -> 10 rows), upscale (9 -> 24), non-square crops.
        cases.push((1, small(&base, 10, interp), p(crop(0, 0, 61, 29))));
        cases.push((0, small(&base, 24, interp), p(crop(3, 40, 9, 11))));
        // Flip + jitter with contrast first, in the middle, last; grayscale; solarise.
        let mut q = p(crop(2, 5, 30, 41));
        q.flip = true;
        q.jitter = Some(([1, 0, 3, 2], [1.3, 0.6, 1.4, 0.08]));
        cases.push((0, small(&base, 24, interp), q.clone()));
        q.jitter = Some(([3, 2, 1, 0], [0.7, 1.5, 0.3, -0.1]));
        q.solarize = true;
        cases.push((0, small(&base, 17, interp), q.clone()));
        q.jitter = Some(([0, 2, 3, 1], [1.1, 1.2, 0.9, 0.2]));
        q.gray = true;
        cases.push((
            2,
            small(&base, 20, interp),
            ViewParams {
                crop: crop(1, 2, 20, 19),
                ..q.clone()
            },
        ));
        // Blur at sigma 2.0 (radius > 1) and 0.1 (fractional radius only), with and without jitter.
        q.gray = false;
        q.blur = Some(2.0);
        cases.push((0, small(&base, 24, interp), q.clone()));
        let mut r = p(crop(5, 3, 50, 20));
        r.blur = Some(0.1);
        r.solarize = true;
        cases.push((1, small(&base, 12, interp), r));
    }
    let jobs: Vec<ViewJob<'_>> = cases
        .iter()
        .map(|(i, aug, params)| ViewJob {
            img: &imgs[*i],
            aug,
            params,
        })
        .collect();
    // Threads mode: real concurrency inside a block (the contrast mean is a block reduction and
    // every stage hands its image to the next through __syncthreads).
    check("stages", &jobs, Mode::Threads, 64);
    check("stages, 96 threads", &jobs, Mode::Fibers, 96);
}

#[test]
fn bad_view_tables_are_errors() {
    let img = image(7, 20, 20);
    let aug = MultiCrop::labelled().views.remove(0);
    let params = ViewParams {
        crop: CropBox {
            top: 10,
            left: 0,
            height: 11,
            width: 5,
        },
        flip: false,
        jitter: None,
        gray: false,
        blur: None,
        solarize: false,
    };
    let jobs = [ViewJob {
        img: &img,
        aug: &aug,
        params: &params,
    }];
    let mut out = vec![0.0f32; aug.numel()];
    let e = augment_views(Mode::Fibers, &jobs, &mut [out.as_mut_slice()], 64).unwrap_err();
    assert!(e.to_string().contains("crop box"), "{e}");
    let mut short = vec![0.0f32; 5];
    assert!(augment_views(Mode::Fibers, &jobs, &mut [short.as_mut_slice()], 64).is_err());
}
