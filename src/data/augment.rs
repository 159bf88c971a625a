//! The recipes' random augmentations: parameter sampling from [`Rng`] and the per-view pipelines
//! (RandomResizedCrop -> flip -> ColorJitter -> grayscale -> blur -> solarise -> Normalize) of
//! Suave (spec §1.11) and Daino (§2.6), the labelled and fine-tuning pipelines, and evaluation.
//!
//! Sampling ([`ViewAug::sample`]) is separate from application ([`ViewAug::apply`], a pure
//! function of the image and the sampled [`ViewParams`]), so that tests can pass explicit
//! parameters and a sample's crops depend only on its own stream.

use super::image::Image;
use super::transforms::{self as tf, CropBox, Interpolation};
use crate::rng::Rng;

/// `Normalize(mean, std)` constants.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Normalize {
    /// Per-channel mean (RGB).
    pub mean: [f32; 3],
    /// Per-channel standard deviation (RGB).
    pub std: [f32; 3],
}

/// Suave's normalisation (all Suave crops, the labelled pipelines of both methods, validation):
/// std 0.228 for red **as coded** in [SD] (spec §8 item 11), not ImageNet's 0.229.
pub const SUAVE_NORM: Normalize = Normalize {
    mean: [0.485, 0.456, 0.406],
    std: [0.228, 0.224, 0.225],
};

/// DINO's normalisation, used by Daino's unlabelled views only (std 0.229 for red).
pub const DAINO_NORM: Normalize = Normalize {
    mean: [0.485, 0.456, 0.406],
    std: [0.229, 0.224, 0.225],
};

/// `ColorJitter(brightness, contrast, saturation, hue)` applied with probability `p`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Jitter {
    /// Brightness factor drawn from [max(0, 1-b), 1+b].
    pub brightness: f32,
    /// Contrast factor drawn from [max(0, 1-c), 1+c].
    pub contrast: f32,
    /// Saturation factor drawn from [max(0, 1-s), 1+s].
    pub saturation: f32,
    /// Hue shift drawn from [-h, h] (h <= 0.5).
    pub hue: f32,
    /// Probability of `RandomApply`.
    pub p: f64,
}

/// One view's augmentation recipe.
#[derive(Clone, Debug, PartialEq)]
pub struct ViewAug {
    /// Output side (224 global, 96 local).
    pub size: usize,
    /// RandomResizedCrop area fraction range.
    pub scale: (f64, f64),
    /// RandomResizedCrop aspect-ratio range (3/4, 4/3), sampled log-uniformly.
    pub ratio: (f64, f64),
    /// Resize filter (bilinear for Suave, bicubic for Daino's views).
    pub interp: Interpolation,
    /// Horizontal flip probability.
    pub flip_p: f64,
    /// Colour jitter, if any.
    pub jitter: Option<Jitter>,
    /// RandomGrayscale probability.
    pub gray_p: f64,
    /// PIL Gaussian blur probability.
    pub blur_p: f64,
    /// Blur radius (PIL's sigma) range, uniform.
    pub blur_sigma: (f32, f32),
    /// Solarisation probability (threshold 128).
    pub solarize_p: f64,
    /// Final normalisation.
    pub norm: Normalize,
}

/// The sampled parameters of one view: everything [`ViewAug::apply`] needs.
#[derive(Clone, Debug, PartialEq)]
pub struct ViewParams {
    /// The crop box in the decoded image.
    pub crop: CropBox,
    /// Mirror left-right.
    pub flip: bool,
    /// ColorJitter order (torchvision's `fn_idx`) and factors (b, c, s, h), when applied.
    pub jitter: Option<([usize; 4], [f32; 4])>,
    /// Convert to grayscale.
    pub gray: bool,
    /// Blur sigma, when applied.
    pub blur: Option<f32>,
    /// Solarise.
    pub solarize: bool,
}

/// `RandomResizedCrop.get_params`: ten tries of (area U(scale), log-uniform ratio), with
/// Python's round-half-even, then the centre-crop fallback clamped to the ratio range.
pub fn sample_crop(
    rng: &mut Rng,
    height: usize,
    width: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
) -> CropBox {
    let area = (height * width) as f64;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.uniform_range(scale.0, scale.1);
        let aspect = rng.uniform_range(lr0, lr1).exp();
        let w = (target * aspect).sqrt().round_ties_even() as usize;
        let h = (target / aspect).sqrt().round_ties_even() as usize;
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = rng.below((height - h + 1) as u64) as usize;
            let left = rng.below((width - w + 1) as u64) as usize;
            return CropBox {
                top,
                left,
                height: h,
                width: w,
            };
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (h, w) = if in_ratio < ratio.0 {
        let w = width;
        (((w as f64) / ratio.0).round_ties_even() as usize, w)
    } else if in_ratio > ratio.1 {
        let h = height;
        (h, ((h as f64) * ratio.1).round_ties_even() as usize)
    } else {
        (height, width)
    };
    let (h, w) = (h.clamp(1, height), w.clamp(1, width));
    CropBox {
        top: (height - h) / 2,
        left: (width - w) / 2,
        height: h,
        width: w,
    }
}

/// `ColorJitter.get_params`: a random order of the four ops and one factor each.
pub fn sample_jitter(rng: &mut Rng, j: &Jitter) -> ([usize; 4], [f32; 4]) {
    let perm = rng.permutation(4);
    let order = [perm[0], perm[1], perm[2], perm[3]];
    let f = |rng: &mut Rng, v: f32| {
        rng.uniform_range((1.0 - v).max(0.0) as f64, (1.0 + v) as f64) as f32
    };
    let b = f(rng, j.brightness);
    let c = f(rng, j.contrast);
    let s = f(rng, j.saturation);
    let h = rng.uniform_range(-j.hue as f64, j.hue as f64) as f32;
    (order, [b, c, s, h])
}

impl ViewAug {
    /// Draws this view's parameters for an image of `height x width`. The number of draws
    /// varies with the outcome; callers give every view its own forked stream.
    pub fn sample(&self, rng: &mut Rng, height: usize, width: usize) -> ViewParams {
        let crop = sample_crop(rng, height, width, self.scale, self.ratio);
        let flip = rng.uniform() < self.flip_p;
        let jitter = match &self.jitter {
            Some(j) if rng.uniform() < j.p => Some(sample_jitter(rng, j)),
            _ => None,
        };
        let gray = self.gray_p > 0.0 && rng.uniform() < self.gray_p;
        let blur = (self.blur_p > 0.0 && rng.uniform() < self.blur_p)
            .then(|| rng.uniform_range(self.blur_sigma.0 as f64, self.blur_sigma.1 as f64) as f32);
        let solarize = self.solarize_p > 0.0 && rng.uniform() < self.solarize_p;
        ViewParams {
            crop,
            flip,
            jitter,
            gray,
            blur,
            solarize,
        }
    }

    /// Applies the view to a decoded image, writing `size * size * 3` normalised HWC values to
    /// `out` (one slot of an NHWC batch). Pure: the same parameters give the same pixels.
    pub fn apply(&self, img: &Image<u8>, p: &ViewParams, out: &mut [f32]) {
        let mut x = tf::resized_crop(img, p.crop, self.size, self.interp, p.flip);
        if let Some((order, factors)) = p.jitter {
            tf::color_jitter(&mut x, order, factors);
        }
        if p.gray {
            tf::grayscale(&mut x);
        }
        if let Some(sigma) = p.blur {
            tf::gaussian_blur_pil(&mut x, sigma);
        }
        if p.solarize {
            tf::solarize(&mut x);
        }
        tf::normalize_into(&x, self.norm.mean, self.norm.std, out);
    }

    /// Values per output image.
    pub fn numel(&self) -> usize {
        self.size * self.size * 3
    }
}

const RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);

fn view(size: usize, scale: (f64, f64), interp: Interpolation, norm: Normalize) -> ViewAug {
    ViewAug {
        size,
        scale,
        ratio: RATIO,
        interp,
        flip_p: 0.5,
        jitter: None,
        gray_p: 0.0,
        blur_p: 0.0,
        blur_sigma: (0.1, 2.0),
        solarize_p: 0.0,
        norm,
    }
}

/// A multi-crop recipe: the list of views made from every image.
#[derive(Clone, Debug, PartialEq)]
pub struct MultiCrop {
    /// The views, in the order the model consumes them (globals first).
    pub views: Vec<ViewAug>,
}

impl MultiCrop {
    /// Suave's unlabelled crops (spec §1.11): 2x224 at scale (0.14, 1) + 8x96 at (0.05, 0.14),
    /// bilinear, flip, ColorJitter(0.8, 0.8, 0.8, 0.2) p 0.8, grayscale 0.2, PIL blur p 0.5 on
    /// every crop, std 0.228. With `color_jit_unlab = false` (fine-tuning): crop and flip only.
    pub fn suave_unlabelled(color_jit_unlab: bool) -> MultiCrop {
        let mk = |size, scale| {
            let mut v = view(size, scale, Interpolation::Bilinear, SUAVE_NORM);
            if color_jit_unlab {
                v.jitter = Some(Jitter {
                    brightness: 0.8,
                    contrast: 0.8,
                    saturation: 0.8,
                    hue: 0.2,
                    p: 0.8,
                });
                v.gray_p = 0.2;
                v.blur_p = 0.5;
            }
            v
        };
        let mut views = vec![mk(224, (0.14, 1.0)); 2];
        views.extend(std::iter::repeat_n(mk(96, (0.05, 0.14)), 8));
        MultiCrop { views }
    }

    /// Suave's fine-tuning unlabelled crops (`finetune_{1,10}perc.sh`): 2x224 at scale
    /// (0.08, 1), no locals, no colour (`--color_jit_unlab false`).
    pub fn suave_finetune_unlabelled() -> MultiCrop {
        MultiCrop {
            views: vec![view(224, (0.08, 1.0), Interpolation::Bilinear, SUAVE_NORM); 2],
        }
    }

    /// Daino's unlabelled views (spec §2.6, DINO's `DataAugmentationDINO`): bicubic crops,
    /// flip + ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8 + grayscale 0.2 on every view; global 1
    /// (224, scale 0.25-1) blur p 1.0; global 2 blur p 0.1 + solarise p 0.2; 8 locals (96,
    /// 0.05-0.25) blur p 0.5; DINO's std 0.229.
    pub fn daino_unlabelled() -> MultiCrop {
        let mk = |size, scale, blur_p, solarize_p| {
            let mut v = view(size, scale, Interpolation::Bicubic, DAINO_NORM);
            v.jitter = Some(Jitter {
                brightness: 0.4,
                contrast: 0.4,
                saturation: 0.2,
                hue: 0.1,
                p: 0.8,
            });
            v.gray_p = 0.2;
            v.blur_p = blur_p;
            v.solarize_p = solarize_p;
            v
        };
        let mut views = vec![
            mk(224, (0.25, 1.0), 1.0, 0.0),
            mk(224, (0.25, 1.0), 0.1, 0.2),
        ];
        views.extend(std::iter::repeat_n(mk(96, (0.05, 0.25), 0.5, 0.0), 8));
        MultiCrop { views }
    }

    /// The labelled pipeline of both methods (Suave main L298-305, reused by Daino):
    /// RandomResizedCrop(224) at the default scale (0.08, 1), bilinear, flip,
    /// ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, grayscale 0.2, no blur, std 0.228.
    pub fn labelled() -> MultiCrop {
        let mut v = view(224, (0.08, 1.0), Interpolation::Bilinear, SUAVE_NORM);
        v.jitter = Some(Jitter {
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.4,
            hue: 0.1,
            p: 0.8,
        });
        v.gray_p = 0.2;
        MultiCrop { views: vec![v] }
    }

    /// The light labelled pipeline of fine-tuning (`--light_augment_lab true`):
    /// RandomResizedCrop(224), flip, ColorJitter(0.1, 0.1, 0.1, 0.1) p 0.8, no grayscale.
    pub fn labelled_light() -> MultiCrop {
        let mut v = view(224, (0.08, 1.0), Interpolation::Bilinear, SUAVE_NORM);
        v.jitter = Some(Jitter {
            brightness: 0.1,
            contrast: 0.1,
            saturation: 0.1,
            hue: 0.1,
            p: 0.8,
        });
        MultiCrop { views: vec![v] }
    }

    /// Parameters of every view for an image of `height x width`; view `v` draws from
    /// `rng.fork(v)`, so adding a view never changes the others.
    pub fn sample(&self, rng: &Rng, height: usize, width: usize) -> Vec<ViewParams> {
        self.views
            .iter()
            .enumerate()
            .map(|(v, aug)| aug.sample(&mut rng.fork(v as u64), height, width))
            .collect()
    }
}

/// The evaluation transform: Resize(256) + CenterCrop(224) + Normalize (std 0.228 for both
/// methods' validation), written into `out` (224 * 224 * 3 values).
pub fn eval_into(img: &Image<u8>, resize: usize, crop: usize, norm: Normalize, out: &mut [f32]) {
    let x = tf::resize_center_crop(img, resize, crop);
    tf::normalize_into(&x, norm.mean, norm.std, out);
}
