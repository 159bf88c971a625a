//! The augmentations as pure functions of an image and explicit parameters. Randomness lives in
//! [`super::augment`], which samples the parameters; keeping the two apart is what lets the tests
//! feed torchvision and this module the same crop box, flip and factors and compare pixels.
//!
//! Formulas follow torchvision's tensor path (`torchvision.transforms.functional` on float images
//! in [0, 1]), except the Gaussian blur, which follows PIL's `ImageFilter.GaussianBlur` because
//! that is what the SwAV/DINO recipes call. Differences from the official PIL pipeline are only
//! the absence of u8 rounding between steps.

use super::image::Image;

/// Resampling filter of a resize.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interpolation {
    /// Triangle filter (Suave; torchvision's default).
    Bilinear,
    /// Keys cubic with a = -0.5, PIL's and torch's antialiased bicubic (Daino's crops).
    Bicubic,
}

/// A crop rectangle in input pixels, as torchvision's `(i, j, h, w)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    /// First row (`i`).
    pub top: usize,
    /// First column (`j`).
    pub left: usize,
    /// Rows (`h`).
    pub height: usize,
    /// Columns (`w`).
    pub width: usize,
}

/// Grayscale weights of torchvision's tensor `rgb_to_grayscale` (PIL uses 0.299; the difference
/// is at most 1e-4 of the value range).
pub const GRAY_WEIGHTS: [f32; 3] = [0.2989, 0.587, 0.114];

/// Per-output-pixel filter taps of one axis: `start[i]`, `count[i]`, and `kmax` weights per row.
struct Taps {
    start: Vec<usize>,
    count: Vec<usize>,
    kmax: usize,
    weights: Vec<f32>,
}

#[inline]
fn filter(interp: Interpolation, x: f64) -> f64 {
    let x = x.abs();
    match interp {
        Interpolation::Bilinear => {
            if x < 1.0 {
                1.0 - x
            } else {
                0.0
            }
        }
        Interpolation::Bicubic => {
            const A: f64 = -0.5;
            if x < 1.0 {
                ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
            } else if x < 2.0 {
                (((x - 5.0) * x + 8.0) * x - 4.0) * A
            } else {
                0.0
            }
        }
    }
}

/// Antialiased resampling taps (PIL's `precompute_coeffs`, torch's `_upsample_*2d_aa`): when
/// downscaling the filter is stretched by the scale so every input pixel contributes.
fn taps(in_size: usize, out_size: usize, interp: Interpolation, gain: f64) -> Taps {
    let support0 = match interp {
        Interpolation::Bilinear => 1.0,
        Interpolation::Bicubic => 2.0,
    };
    let scale = in_size as f64 / out_size as f64;
    let (support, invscale) = if scale >= 1.0 {
        (support0 * scale, 1.0 / scale)
    } else {
        (support0, 1.0)
    };
    let kmax = (support.ceil() as usize) * 2 + 1;
    let mut t = Taps {
        start: Vec::with_capacity(out_size),
        count: Vec::with_capacity(out_size),
        kmax,
        weights: vec![0.0; out_size * kmax],
    };
    let mut w = vec![0.0f64; kmax];
    for i in 0..out_size {
        let center = scale * (i as f64 + 0.5);
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).clamp(0, in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin).min(kmax);
        let mut total = 0.0;
        for (j, wj) in w.iter_mut().enumerate().take(n) {
            *wj = filter(interp, (j as f64 + xmin as f64 - center + 0.5) * invscale);
            total += *wj;
        }
        let norm = if total != 0.0 { gain / total } else { 0.0 };
        for (dst, &wj) in t.weights[i * kmax..i * kmax + n].iter_mut().zip(&w) {
            *dst = (wj * norm) as f32;
        }
        t.start.push(xmin);
        t.count.push(n);
    }
    t
}

/// Types a resize can read: u8 images are scaled to [0, 1] on the fly (`ToTensor`).
pub trait Texel: Copy + Send + Sync {
    /// The value in [0, 1] units times `1 / SCALE`.
    fn raw(self) -> f32;
    /// `raw() * SCALE` is in [0, 1].
    const SCALE: f64;
}
impl Texel for u8 {
    #[inline]
    fn raw(self) -> f32 {
        self as f32
    }
    const SCALE: f64 = 1.0 / 255.0;
}
impl Texel for f32 {
    #[inline]
    fn raw(self) -> f32 {
        self
    }
    const SCALE: f64 = 1.0;
}

/// `resized_crop(img, i, j, h, w, [out_h, out_w], interp, antialias=True)` as torchvision's
/// tensor path on a float image, restricted to the output window `rows x cols` (the whole output
/// for a plain resized crop, the centre for `CenterCrop` after `Resize`). With `flip`, the result
/// is mirrored left-right (`hflip` after the resize). Bicubic results are clamped to [0, 1], as
/// torchvision does for u8 images and PIL always does, so later colour ops see valid values.
#[allow(clippy::too_many_arguments)]
pub fn resized_crop_window<T: Texel>(
    img: &Image<T>,
    crop: CropBox,
    out_h: usize,
    out_w: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    interp: Interpolation,
    flip: bool,
) -> Image<f32> {
    let th = taps(crop.height, out_h, interp, 1.0);
    let tw = taps(crop.width, out_w, interp, T::SCALE);
    let (wh, ww) = (rows.len(), cols.len());
    // Rows of the crop that the vertical taps of the window touch.
    let r0 = rows.clone().map(|y| th.start[y]).min().unwrap_or(0);
    let r1 = rows
        .clone()
        .map(|y| th.start[y] + th.count[y])
        .max()
        .unwrap_or(0);
    // Horizontal pass: crop rows r0..r1 -> tmp[(r - r0), x, c].
    let mut tmp = vec![0.0f32; (r1 - r0) * ww * 3];
    for r in r0..r1 {
        let src_row = (crop.top + r) * img.width * 3;
        let dst = &mut tmp[(r - r0) * ww * 3..(r - r0 + 1) * ww * 3];
        for (xo, x) in cols.clone().enumerate() {
            let (s, n) = (tw.start[x], tw.count[x]);
            let wts = &tw.weights[x * tw.kmax..x * tw.kmax + n];
            let mut acc = [0.0f32; 3];
            let base = src_row + (crop.left + s) * 3;
            for (k, &wk) in wts.iter().enumerate() {
                let p = base + k * 3;
                acc[0] += wk * img.data[p].raw();
                acc[1] += wk * img.data[p + 1].raw();
                acc[2] += wk * img.data[p + 2].raw();
            }
            dst[xo * 3..xo * 3 + 3].copy_from_slice(&acc);
        }
    }
    // Vertical pass.
    let mut out = Image::<f32>::new(wh, ww);
    let clamp = interp == Interpolation::Bicubic;
    for (yo, y) in rows.enumerate() {
        let (s, n) = (th.start[y], th.count[y]);
        let wts = &th.weights[y * th.kmax..y * th.kmax + n];
        let dst = &mut out.data[yo * ww * 3..(yo + 1) * ww * 3];
        for (k, &wk) in wts.iter().enumerate() {
            let src = &tmp[(s + k - r0) * ww * 3..(s + k - r0 + 1) * ww * 3];
            for (d, &v) in dst.iter_mut().zip(src) {
                *d += wk * v;
            }
        }
        if clamp {
            for d in dst.iter_mut() {
                *d = d.clamp(0.0, 1.0);
            }
        }
        if flip {
            for x in 0..ww / 2 {
                for c in 0..3 {
                    dst.swap(x * 3 + c, (ww - 1 - x) * 3 + c);
                }
            }
        }
    }
    out
}

/// `F.resized_crop(img, i, j, h, w, [size, size], interp, antialias=True)` (+ optional `hflip`).
pub fn resized_crop<T: Texel>(
    img: &Image<T>,
    crop: CropBox,
    size: usize,
    interp: Interpolation,
    flip: bool,
) -> Image<f32> {
    resized_crop_window(img, crop, size, size, 0..size, 0..size, interp, flip)
}

/// Output size of torchvision's `Resize(size)` with an int: the shorter side becomes `size`, the
/// longer `int(size * long / short)`. Returns (height, width).
pub fn resize_shorter_size(height: usize, width: usize, size: usize) -> (usize, usize) {
    let (short, long) = if width <= height {
        (width, height)
    } else {
        (height, width)
    };
    let new_long = (size as f64 * long as f64 / short as f64) as usize;
    if width <= height {
        (new_long, size)
    } else {
        (size, new_long)
    }
}

/// `Resize(resize, bilinear, antialias=True)` then `CenterCrop(crop)`: the evaluation transform.
/// Only the centre window of the resized image is computed; it is identical to resizing all of it.
/// Images whose resized side is below `crop` are padded with zeros, as `CenterCrop` pads.
pub fn resize_center_crop<T: Texel>(img: &Image<T>, resize: usize, crop: usize) -> Image<f32> {
    let (rh, rw) = resize_shorter_size(img.height, img.width, resize);
    let full = CropBox {
        top: 0,
        left: 0,
        height: img.height,
        width: img.width,
    };
    // torchvision: crop_top = int(round((h - crop) / 2.0)) (Python rounds half to even).
    let offset = |n: usize| ((n as f64 - crop as f64) / 2.0).round_ties_even() as i64;
    let (top, left) = (offset(rh), offset(rw));
    if top >= 0 && left >= 0 {
        let (t, l) = (top as usize, left as usize);
        return resized_crop_window(
            img,
            full,
            rh,
            rw,
            t..t + crop,
            l..l + crop,
            Interpolation::Bilinear,
            false,
        );
    }
    // Padding case (a resized side shorter than the crop): resize all, then paste centred.
    let r = resized_crop_window(
        img,
        full,
        rh,
        rw,
        0..rh,
        0..rw,
        Interpolation::Bilinear,
        false,
    );
    let mut out = Image::<f32>::new(crop, crop);
    for y in 0..crop {
        let sy = y as i64 + top;
        if sy < 0 || sy >= rh as i64 {
            continue;
        }
        for x in 0..crop {
            let sx = x as i64 + left;
            if sx < 0 || sx >= rw as i64 {
                continue;
            }
            let s = (sy as usize * rw + sx as usize) * 3;
            out.data[(y * crop + x) * 3..(y * crop + x) * 3 + 3].copy_from_slice(&r.data[s..s + 3]);
        }
    }
    out
}

/// `hflip`: mirror left-right.
pub fn hflip(img: &mut Image<f32>) {
    let w = img.width;
    for row in img.data.chunks_exact_mut(w * 3) {
        for x in 0..w / 2 {
            for c in 0..3 {
                row.swap(x * 3 + c, (w - 1 - x) * 3 + c);
            }
        }
    }
}

#[inline]
fn gray(p: &[f32]) -> f32 {
    GRAY_WEIGHTS[0] * p[0] + GRAY_WEIGHTS[1] * p[1] + GRAY_WEIGHTS[2] * p[2]
}

/// `adjust_brightness`: blend with black, clamp to [0, 1].
pub fn adjust_brightness(img: &mut Image<f32>, factor: f32) {
    for v in img.data.iter_mut() {
        *v = (factor * *v).clamp(0.0, 1.0);
    }
}

/// `adjust_contrast`: blend with the mean of the grayscale image, clamp to [0, 1].
pub fn adjust_contrast(img: &mut Image<f32>, factor: f32) {
    let n = (img.height * img.width).max(1);
    let sum: f64 = img.data.chunks_exact(3).map(|p| gray(p) as f64).sum();
    let mean = (sum / n as f64) as f32;
    let off = (1.0 - factor) * mean;
    for v in img.data.iter_mut() {
        *v = (factor * *v + off).clamp(0.0, 1.0);
    }
}

/// `adjust_saturation`: blend each pixel with its grayscale value, clamp to [0, 1].
pub fn adjust_saturation(img: &mut Image<f32>, factor: f32) {
    for p in img.data.chunks_exact_mut(3) {
        let g = (1.0 - factor) * gray(p);
        for v in p.iter_mut() {
            *v = (factor * *v + g).clamp(0.0, 1.0);
        }
    }
}

/// `adjust_hue`: RGB -> HSV (torchvision's `_rgb2hsv`), shift h by `factor` modulo 1, back
/// (`_hsv2rgb`). `factor` in [-0.5, 0.5].
pub fn adjust_hue(img: &mut Image<f32>, factor: f32) {
    for p in img.data.chunks_exact_mut(3) {
        let (r, g, b) = (p[0], p[1], p[2]);
        let maxc = r.max(g).max(b);
        let minc = r.min(g).min(b);
        let eqc = maxc == minc;
        let cr = maxc - minc;
        let s = cr / if eqc { 1.0 } else { maxc };
        let crd = if eqc { 1.0 } else { cr };
        let rc = (maxc - r) / crd;
        let gc = (maxc - g) / crd;
        let bc = (maxc - b) / crd;
        let h = if maxc == r {
            bc - gc
        } else if maxc == g {
            2.0 + rc - bc
        } else {
            4.0 + gc - rc
        };
        let h = (h / 6.0 + 1.0) % 1.0;
        // torch.remainder: the result takes the sign of the divisor.
        let mut h = (h + factor) % 1.0;
        if h < 0.0 {
            h += 1.0;
        }
        let v = maxc;
        let h6 = h * 6.0;
        let i = h6.floor();
        let f = h6 - i;
        let i = (i as i32).rem_euclid(6);
        let pp = (v * (1.0 - s)).clamp(0.0, 1.0);
        let q = (v * (1.0 - s * f)).clamp(0.0, 1.0);
        let t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0);
        let rgb = match i {
            0 => [v, t, pp],
            1 => [q, v, pp],
            2 => [pp, v, t],
            3 => [pp, q, v],
            4 => [t, pp, v],
            _ => [v, pp, q],
        };
        p.copy_from_slice(&rgb);
    }
}

/// `rgb_to_grayscale(img, num_output_channels=3)`.
pub fn grayscale(img: &mut Image<f32>) {
    for p in img.data.chunks_exact_mut(3) {
        let g = gray(p);
        p.fill(g);
    }
}

/// PIL's `ImageOps.solarize(img, 128)` on [0, 1] values: values >= 128/255 become 1 - v.
pub fn solarize(img: &mut Image<f32>) {
    const T: f32 = 128.0 / 255.0;
    for v in img.data.iter_mut() {
        if *v >= T {
            *v = 1.0 - *v;
        }
    }
}

/// The fractional box radius of PIL's `_gaussian_blur_radius` for a Gaussian of std `sigma`
/// approximated by `passes` box blurs (Gwosdek et al., "extended box filter").
pub fn pil_box_radius(sigma: f32, passes: u32) -> f32 {
    let sigma2 = sigma * sigma / passes as f32;
    let l_big = (12.0 * sigma2 as f64 + 1.0).sqrt() as f32;
    let l = ((l_big as f64 - 1.0) / 2.0).floor() as f32;
    let mut a = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2);
    a /= 6.0 * (sigma2 - (l + 1.0) * (l + 1.0));
    l + a
}

/// One extended-box pass along `n` values spaced `stride` apart, edges extended (clamped).
/// Weights are PIL's 24-bit fixed-point `ww` (inner taps) and `fw` (the two fractional taps).
fn box_line(src: &[f32], dst: &mut [f32], n: usize, stride: usize, r: usize, ww: f32, fw: f32) {
    let last = n - 1;
    let at = |i: i64| src[(i.clamp(0, last as i64) as usize) * stride];
    let r = r as i64;
    let mut acc = 0.0f32;
    for k in -r..=r {
        acc += at(k);
    }
    for x in 0..n as i64 {
        dst[x as usize * stride] = acc * ww + (at(x - r - 1) + at(x + r + 1)) * fw;
        acc += at(x + r + 1) - at(x - r);
    }
}

/// PIL's `ImageFilter.GaussianBlur(radius=sigma)`: three extended box blurs horizontally, then
/// three vertically, with PIL's box radius and fixed-point weights, edges extended. Computed in
/// f32 without PIL's rounding to u8 between passes.
pub fn gaussian_blur_pil(img: &mut Image<f32>, sigma: f32) {
    const PASSES: u32 = 3;
    let radius = pil_box_radius(sigma, PASSES);
    if radius == 0.0 || img.width == 0 || img.height == 0 {
        return;
    }
    let ri = radius as usize;
    let one = (1u32 << 24) as f32;
    let ww_i = (one / (radius * 2.0 + 1.0)) as u32;
    let fw_i = ((1u32 << 24) - (ri as u32 * 2 + 1) * ww_i) / 2;
    let (ww, fw) = (ww_i as f32 / one, fw_i as f32 / one);
    let (h, w) = (img.height, img.width);
    let mut tmp = vec![0.0f32; img.data.len()];
    for _ in 0..PASSES {
        for y in 0..h {
            for c in 0..3 {
                let o = y * w * 3 + c;
                box_line(&img.data[o..], &mut tmp[o..], w, 3, ri, ww, fw);
            }
        }
        std::mem::swap(&mut img.data, &mut tmp);
    }
    for _ in 0..PASSES {
        for x in 0..w {
            for c in 0..3 {
                let o = x * 3 + c;
                box_line(&img.data[o..], &mut tmp[o..], h, w * 3, ri, ww, fw);
            }
        }
        std::mem::swap(&mut img.data, &mut tmp);
    }
}

/// `Normalize(mean, std)` written into an NHWC batch slot (`out.len() == h * w * 3`).
pub fn normalize_into(img: &Image<f32>, mean: [f32; 3], std: [f32; 3], out: &mut [f32]) {
    for (o, p) in out.chunks_exact_mut(3).zip(img.data.chunks_exact(3)) {
        for c in 0..3 {
            o[c] = (p[c] - mean[c]) / std[c];
        }
    }
}

/// `ColorJitter.forward` with explicit parameters: `order` is torchvision's `fn_idx` (0
/// brightness, 1 contrast, 2 saturation, 3 hue) and `factors` the four sampled factors
/// (brightness, contrast, saturation, hue).
pub fn color_jitter(img: &mut Image<f32>, order: [usize; 4], factors: [f32; 4]) {
    for fn_id in order {
        match fn_id {
            0 => adjust_brightness(img, factors[0]),
            1 => adjust_contrast(img, factors[1]),
            2 => adjust_saturation(img, factors[2]),
            3 => adjust_hue(img, factors[3]),
            _ => {}
        }
    }
}
