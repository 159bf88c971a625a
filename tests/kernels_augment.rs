//! kernels/augment.cu through the device op (`backend::device::augment`) on the CPU emulation
//! against `ViewAug::apply`: every view of a crop set in one launch, with parameters sampled by `ViewAug::sample` (Suave's bilinear and Daino's
//! bicubic multi-crop at their real sizes) and hand-made ones that force each stage: strong
//! downscaling and upscaling, flip, ColorJitter with contrast first / in the middle / last,
//! grayscale, PIL blur at both ends of its sigma range, solarise, and a view with nothing but the
//! crop. Awkward image sizes; f32 within 1e-5 relative L2 of the CPU per view, and the bf16
//! variant is the f32 result rounded once. Views go to two poisoned (NaN) output buffers,
//! alternately, at consecutive offsets of mixed sizes, so a value the kernel does not write, or
//! a slot written at the wrong place, fails the comparison.

use half::bf16;
use sdengine::backend::device::augment::{augment_views, upload_image, AugElem, DevImage, ViewJob};
use sdengine::backend::device::{Emu, Exec, Mode};
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

/// One view of a test: the host image, the recipe, the sampled parameters.
#[derive(Clone, Copy)]
struct Job<'a> {
    img: &'a Image<u8>,
    aug: &'a ViewAug,
    params: &'a ViewParams,
}

/// The views of `jobs` on the device in one launch: the distinct images uploaded once, view `i`
/// into buffer `i % 2` right after the previous view of that buffer (both buffers poisoned);
/// returns each view's values.
fn run<T: AugElem>(ex: &Emu, jobs: &[Job<'_>], threads: u32) -> sdengine::Result<Vec<Vec<T>>> {
    let mut hosts: Vec<&Image<u8>> = Vec::new();
    let mut index = Vec::new();
    for j in jobs {
        match hosts.iter().position(|h| std::ptr::eq(*h, j.img)) {
            Some(k) => index.push(k),
            None => {
                hosts.push(j.img);
                index.push(hosts.len() - 1);
            }
        }
    }
    let bufs = hosts
        .iter()
        .map(|h| upload_image(ex, h))
        .collect::<sdengine::Result<Vec<_>>>()?;
    let images: Vec<DevImage<'_, _>> = bufs
        .iter()
        .zip(&hosts)
        .map(|(data, h)| DevImage {
            data,
            height: h.height,
            width: h.width,
        })
        .collect();
    let mut fill = [0usize; 2];
    let views: Vec<ViewJob<'_>> = jobs
        .iter()
        .enumerate()
        .map(|(i, j)| {
            let out = i % 2;
            let at = fill[out];
            fill[out] += j.aug.numel();
            ViewJob {
                image: index[i],
                aug: j.aug,
                params: j.params,
                out,
                at,
            }
        })
        .collect();
    let mut o0 = ex.alloc::<T>(fill[0].max(1))?;
    let mut o1 = ex.alloc::<T>(fill[1].max(1))?;
    augment_views(ex, &images, &views, &mut [&mut o0, &mut o1], threads)?;
    let outs = [ex.download(&o0)?, ex.download(&o1)?];
    Ok(views
        .iter()
        .map(|v| outs[v.out][v.at..v.at + v.aug.numel()].to_vec())
        .collect())
}

/// CPU reference views and kernel views (f32, and bf16 from a second launch) for `jobs`.
fn check(tag: &str, jobs: &[Job<'_>], mode: Mode, threads: u32) {
    let got: Vec<Vec<f32>> = run(&Emu::new(mode), jobs, threads).expect("emu augment");
    let gotb: Vec<Vec<bf16>> =
        run(&Emu::new(Mode::Fibers), jobs, threads).expect("emu augment bf16");
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
        let jobs: Vec<Job<'_>> = mc
            .views
            .iter()
            .zip(&params)
            .map(|(aug, params)| Job { img, aug, params })
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
    let jobs: Vec<Job<'_>> = cases
        .iter()
        .map(|(i, aug, params)| Job {
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
    let ex = Emu::new(Mode::Fibers);
    let data = upload_image(&ex, &img).unwrap();
    let images = [DevImage {
        data: &data,
        height: 20,
        width: 20,
    }];
    let job = |params, out, at| ViewJob {
        image: 0,
        aug: &aug,
        params,
        out,
        at,
    };
    let mut out = ex.alloc::<f32>(2 * aug.numel()).unwrap();
    let Err(e) = augment_views(&ex, &images, &[job(&params, 0, 0)], &mut [&mut out], 64) else {
        panic!("a crop box outside the image was accepted");
    };
    assert!(e.to_string().contains("crop box"), "{e}");
    let mut ok = params.clone();
    ok.crop.top = 0;
    augment_views(
        &ex,
        &images,
        &[job(&ok, 0, aug.numel())],
        &mut [&mut out],
        64,
    )
    .expect("a view in the second slot");
    let bad: [(&[ViewJob<'_>], &str); 4] = [
        (&[job(&ok, 0, aug.numel() + 1)], "slot past the end"),
        (&[job(&ok, 1, 0)], "no such output"),
        (
            &[job(&ok, 0, 0), job(&ok, 0, aug.numel() - 3)],
            "overlapping slots",
        ),
        (
            &[ViewJob {
                image: 1,
                ..job(&ok, 0, 0)
            }],
            "no such image",
        ),
    ];
    for (jobs, what) in bad {
        assert!(
            augment_views(&ex, &images, jobs, &mut [&mut out], 64).is_err(),
            "{what}"
        );
    }
    let short = ex.upload(&img.data[..img.data.len() - 3]).unwrap();
    let images = [DevImage {
        data: &short,
        height: 20,
        width: 20,
    }];
    assert!(
        augment_views(&ex, &images, &[job(&ok, 0, 0)], &mut [&mut out], 64).is_err(),
        "image shorter than its size"
    );
}

/// The outputs and the workspace come from poisoned (NaN) allocations: when the views tile
/// their buffers exactly, no NaN may be left anywhere, in either emulation mode (the blur and
/// contrast stages read workspace values that earlier stages must have written).
#[test]
fn outputs_from_poisoned_allocations_are_written_everywhere() {
    let img = image(8, 45, 38);
    let mc = MultiCrop::daino_unlabelled();
    let mut views: Vec<ViewAug> = vec![small(&mc.views[0], 20, Interpolation::Bicubic)];
    views.push(small(&mc.views[2], 9, Interpolation::Bilinear));
    let mut p = ViewParams {
        crop: CropBox {
            top: 3,
            left: 4,
            height: 30,
            width: 25,
        },
        flip: true,
        jitter: Some(([2, 1, 0, 3], [1.2, 0.7, 1.1, 0.05])),
        gray: false,
        blur: Some(1.3),
        solarize: true,
    };
    let params = [p.clone(), {
        p.jitter = None;
        p.crop.top = 10;
        p
    }];
    for mode in [Mode::Fibers, Mode::Threads] {
        let ex = Emu::new(mode);
        let data = upload_image(&ex, &img).unwrap();
        let images = [DevImage {
            data: &data,
            height: img.height,
            width: img.width,
        }];
        let jobs = [
            ViewJob {
                image: 0,
                aug: &views[0],
                params: &params[0],
                out: 0,
                at: 0,
            },
            ViewJob {
                image: 0,
                aug: &views[1],
                params: &params[1],
                out: 0,
                at: views[0].numel(),
            },
        ];
        let mut out = ex
            .alloc::<f32>(views[0].numel() + views[1].numel())
            .unwrap();
        augment_views(&ex, &images, &jobs, &mut [&mut out], 64).unwrap();
        let got = ex.download(&out).unwrap();
        let nan = got.iter().filter(|v| v.is_nan()).count();
        assert_eq!(
            nan,
            0,
            "{mode:?}: {nan} of {} values left as poison",
            got.len()
        );
    }
}
