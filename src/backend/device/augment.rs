//! Device ops of `kernels/augment.cu`: the multi-crop augmentation of a batch of decoded 8-bit
//! images on the device, one block per view, from parameters sampled on the host by
//! `ViewAug::sample`. CPU reference: `data::augment::ViewAug::apply` (RandomResizedCrop, flip,
//! ColorJitter, grayscale, PIL blur, solarise, Normalize), which the f32 kernel matches within
//! 1e-5 relative L2 per view; the bf16 kernel is the f32 result rounded once.
//!
//! [`AugView`] is the kernel's table row (`#[repr(C)]`, pointers as 64-bit integers, 144 bytes
//! = 18 `u64` words, uploaded as such); [`AugView::new`] fills it from a [`ViewAug`] and its
//! sampled [`ViewParams`] (crop box, flip, jitter order and factors, grayscale, PIL blur radius
//! and weights, solarise, normalisation), checking what a corrupt row would turn into an
//! out-of-bounds read. [`assign_workspace`] lays out the per-view workspace slices;
//! [`augment_config`] is the launch (grid = views, block [`THREADS`]). [`augment_views`] checks
//! every image, slot and crop, then builds, uploads and launches the table. The kernel writes
//! every workspace value before reading it, so the workspace comes from [`Exec::alloc`].

use super::check::{Checker, Measured, TOL_BF16, TOL_F32};
use super::{check_len, check_threads, DevBuf, Elem, Exec, LaunchConfig};
use crate::data::augment::{MultiCrop, ViewAug, ViewParams};
use crate::data::image::Image;
use crate::data::transforms::{pil_box_radius, CropBox, Interpolation};
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::testing::rel_l2;
use half::bf16;
use serde_json::json;

const MODULE: &str = "augment";

/// Threads per block (one block per view) on the GPU.
pub const THREADS: u32 = 256;

/// One view of a crop set (`augment_detail::AugView`, 144 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AugView {
    /// `const unsigned char*`: the decoded image, HWC RGB.
    pub img: u64,
    /// `float*` or `bf16*`: this view's output slot, `size * size * 3` values (HWC).
    pub out: u64,
    /// Offset of this view's workspace slice, in floats (see [`assign_workspace`]).
    pub ws: i64,
    /// Image rows.
    pub img_h: i32,
    /// Image columns.
    pub img_w: i32,
    /// Crop box: first row.
    pub top: i32,
    /// Crop box: first column.
    pub left: i32,
    /// Crop box: rows.
    pub crop_h: i32,
    /// Crop box: columns.
    pub crop_w: i32,
    /// Output side.
    pub size: i32,
    /// 1 for bicubic, 0 for bilinear.
    pub bicubic: i32,
    /// 1 to mirror left-right.
    pub flip: i32,
    /// 4 when ColorJitter applies, else 0.
    pub njitter: i32,
    /// ColorJitter order (torchvision's `fn_idx`).
    pub order: [i32; 4],
    /// Brightness, contrast, saturation and hue factors.
    pub factors: [f32; 4],
    /// 1 to convert to grayscale.
    pub gray: i32,
    /// Integer box radius of PIL's blur, or -1 for no blur.
    pub blur_r: i32,
    /// PIL's inner box weight (24-bit fixed point, as f32).
    pub blur_ww: f32,
    /// PIL's weight of the two fractional edge taps.
    pub blur_fw: f32,
    /// 1 to solarise.
    pub solarize: i32,
    /// Normalisation mean (RGB).
    pub mean: [f32; 3],
    /// Normalisation standard deviation (RGB).
    pub stdv: [f32; 3],
    /// Padding.
    pub pad_: i32,
}

/// PIL's `GaussianBlur(sigma)` as the kernel takes it: (integer radius, inner weight, edge
/// weight), exactly as `transforms::gaussian_blur_pil` derives them; `None` when the radius is 0
/// (PIL leaves the image unchanged).
pub fn pil_blur_weights(sigma: f32) -> Option<(i32, f32, f32)> {
    let radius = pil_box_radius(sigma, 3);
    if radius == 0.0 {
        return None;
    }
    let ri = radius as usize;
    let one = (1u32 << 24) as f32;
    let ww_i = (one / (radius * 2.0 + 1.0)) as u32;
    let fw_i = ((1u32 << 24) - (ri as u32 * 2 + 1) * ww_i) / 2;
    Some((ri as i32, ww_i as f32 / one, fw_i as f32 / one))
}

fn kmax(in_size: usize, out_size: usize, interp: Interpolation) -> usize {
    let support0 = match interp {
        Interpolation::Bilinear => 1.0,
        Interpolation::Bicubic => 2.0,
    };
    let scale = in_size as f64 / out_size as f64;
    let support = if scale >= 1.0 {
        support0 * scale
    } else {
        support0
    };
    (support.ceil() as usize) * 2 + 1
}

/// Floats of workspace one view needs: both axes' filter taps, the horizontal pass (one row per
/// crop row, at least `size` rows for the blur's ping-pong) and the view itself.
pub fn workspace_floats(size: usize, crop: CropBox, interp: Interpolation) -> usize {
    let taps = size * (kmax(crop.width, size, interp) + kmax(crop.height, size, interp) + 4);
    taps + (crop.height.max(size) + size) * size * 3
}

impl AugView {
    /// The row of view `aug` with sampled parameters `p` on an `img_h x img_w` image; `img`,
    /// `out` and `ws` are left 0 for the caller. Errors when the crop box is empty or outside the
    /// image, the jitter order is not a permutation of 0..4, or a size exceeds the kernel's ints.
    pub fn new(aug: &ViewAug, p: &ViewParams, img_h: usize, img_w: usize) -> Result<AugView> {
        const OP: &str = "AugView::new";
        let c = p.crop;
        if c.height == 0 || c.width == 0 || c.top + c.height > img_h || c.left + c.width > img_w {
            return Err(Error::invalid(
                OP,
                format!("crop box {c:?} is empty or not inside the {img_h}x{img_w} image"),
            ));
        }
        if aug.size == 0 || img_h.max(img_w).max(aug.size) > 1 << 20 {
            return Err(Error::invalid(
                OP,
                format!(
                    "view size {} on a {img_h}x{img_w} image: need 1..=2^20 pixels a side",
                    aug.size
                ),
            ));
        }
        let (njitter, order, factors) = match p.jitter {
            Some((order, factors)) => {
                let mut seen = [false; 4];
                for &o in &order {
                    if o >= 4 || std::mem::replace(&mut seen[o], true) {
                        return Err(Error::invalid(
                            OP,
                            format!("ColorJitter order {order:?} is not a permutation of 0..4"),
                        ));
                    }
                }
                (4, order.map(|o| o as i32), factors)
            }
            None => (0, [0; 4], [1.0, 1.0, 1.0, 0.0]),
        };
        let (blur_r, blur_ww, blur_fw) =
            p.blur.and_then(pil_blur_weights).unwrap_or((-1, 0.0, 0.0));
        Ok(AugView {
            img: 0,
            out: 0,
            ws: 0,
            img_h: img_h as i32,
            img_w: img_w as i32,
            top: c.top as i32,
            left: c.left as i32,
            crop_h: c.height as i32,
            crop_w: c.width as i32,
            size: aug.size as i32,
            bicubic: (aug.interp == Interpolation::Bicubic) as i32,
            flip: p.flip as i32,
            njitter,
            order,
            factors,
            gray: p.gray as i32,
            blur_r,
            blur_ww,
            blur_fw,
            solarize: p.solarize as i32,
            mean: aug.norm.mean,
            stdv: aug.norm.std,
            pad_: 0,
        })
    }

    fn crop(&self) -> CropBox {
        CropBox {
            top: self.top as usize,
            left: self.left as usize,
            height: self.crop_h as usize,
            width: self.crop_w as usize,
        }
    }

    fn interp(&self) -> Interpolation {
        if self.bicubic != 0 {
            Interpolation::Bicubic
        } else {
            Interpolation::Bilinear
        }
    }
}

/// Sets each row's `ws` to consecutive workspace slices; returns the total floats to allocate.
pub fn assign_workspace(rows: &mut [AugView]) -> usize {
    let mut total = 0usize;
    for r in rows.iter_mut() {
        r.ws = total as i64;
        total += workspace_floats(r.size as usize, r.crop(), r.interp());
    }
    total
}

/// One block per view, `threads` threads, no dynamic shared memory.
pub fn augment_config(views: usize, threads: u32) -> LaunchConfig {
    LaunchConfig::linear(views as u32, threads, 0)
}

impl AugView {
    /// The row as the kernel reads it: its 144 bytes in field order (no padding: every field
    /// is 4 or 8 bytes and the 8-byte ones come first), as 18 native-endian words.
    pub fn to_words(&self) -> [u64; 18] {
        let mut b: Vec<u8> = Vec::with_capacity(144);
        b.extend(self.img.to_ne_bytes());
        b.extend(self.out.to_ne_bytes());
        b.extend(self.ws.to_ne_bytes());
        for v in [
            self.img_h,
            self.img_w,
            self.top,
            self.left,
            self.crop_h,
            self.crop_w,
            self.size,
            self.bicubic,
            self.flip,
            self.njitter,
        ]
        .into_iter()
        .chain(self.order)
        {
            b.extend(v.to_ne_bytes());
        }
        self.factors.iter().for_each(|v| b.extend(v.to_ne_bytes()));
        b.extend(self.gray.to_ne_bytes());
        b.extend(self.blur_r.to_ne_bytes());
        b.extend(self.blur_ww.to_ne_bytes());
        b.extend(self.blur_fw.to_ne_bytes());
        b.extend(self.solarize.to_ne_bytes());
        self.mean.iter().for_each(|v| b.extend(v.to_ne_bytes()));
        self.stdv.iter().for_each(|v| b.extend(v.to_ne_bytes()));
        b.extend(self.pad_.to_ne_bytes());
        let mut w = [0u64; 18];
        for (w, c) in w.iter_mut().zip(b.chunks_exact(8)) {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            *w = u64::from_ne_bytes(a);
        }
        w
    }
}

/// An element type with an `augment_views` kernel: f32 (the CPU-compatible batch) and bf16
/// (the bf16 activations path, rounded once at the store).
pub trait AugElem: Elem + private::Sealed {
    /// The kernel for this type.
    const KERNEL: &'static str;
    /// The value as f32 (to compare with the CPU reference).
    fn widen(v: Self) -> f32;
}
impl AugElem for f32 {
    const KERNEL: &'static str = "augment_views_f32";
    fn widen(v: f32) -> f32 {
        v
    }
}
impl AugElem for bf16 {
    const KERNEL: &'static str = "augment_views_bf16";
    fn widen(v: bf16) -> f32 {
        v.to_f32()
    }
}
mod private {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
}

/// A decoded image on the device: `height x width` HWC RGB bytes.
pub struct DevImage<'a, B> {
    /// The pixels (`height * width * 3` bytes).
    pub data: &'a B,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

/// A decoded host image uploaded for [`augment_views`].
pub fn upload_image<E: Exec>(ex: &E, img: &Image<u8>) -> Result<E::Buf<u8>> {
    check_len(
        "upload_image",
        "image pixels",
        img.data.len(),
        img.height * img.width * 3,
    )?;
    ex.upload(&img.data)
}

/// One view to make: which image, the recipe and its sampled parameters, and where the view
/// goes (`outs[out]`, `size * size * 3` values HWC from element `at`, i.e. slot `at / numel`
/// of an NHWC batch).
#[derive(Clone, Copy, Debug)]
pub struct ViewJob<'a> {
    /// Index into the images.
    pub image: usize,
    /// The view's recipe (size, filter, normalisation).
    pub aug: &'a ViewAug,
    /// Parameters from `aug.sample(...)`.
    pub params: &'a ViewParams,
    /// Index into the output buffers.
    pub out: usize,
    /// First element of the view in that buffer.
    pub at: usize,
}

/// Runs every view of `jobs` in one launch (one block per view; put the large views first so
/// that they start first), as `ViewAug::apply` computes them. Errors (naming the view) when an
/// image or output index is out of range, an image's length is not `height·width·3`, a crop box
/// is not inside its image, a slot does not fit its buffer, or two slots overlap.
pub fn augment_views<E: Exec, T: AugElem>(
    ex: &E,
    images: &[DevImage<'_, E::Buf<u8>>],
    jobs: &[ViewJob<'_>],
    outs: &mut [&mut E::Buf<T>],
    threads: u32,
) -> Result<()> {
    const OP: &str = "augment_views";
    check_threads(OP, threads)?;
    if jobs.is_empty() {
        return Ok(());
    }
    if jobs.len() > i32::MAX as usize {
        return Err(Error::invalid(
            OP,
            format!("{} views in one launch", jobs.len()),
        ));
    }
    for (i, img) in images.iter().enumerate() {
        check_len(
            OP,
            &format!("image {i} ({}x{}x3)", img.height, img.width),
            img.data.len(),
            img.height * img.width * 3,
        )?;
    }
    let mut rows = Vec::with_capacity(jobs.len());
    let mut slots: Vec<(usize, usize, usize, usize)> = Vec::with_capacity(jobs.len());
    for (v, j) in jobs.iter().enumerate() {
        let img = images.get(j.image).ok_or_else(|| {
            Error::invalid(
                OP,
                format!("view {v}: image {} of {} images", j.image, images.len()),
            )
        })?;
        let out = outs.get(j.out).ok_or_else(|| {
            Error::invalid(
                OP,
                format!("view {v}: output {} of {} buffers", j.out, outs.len()),
            )
        })?;
        let n = j.aug.numel();
        if j.at.checked_add(n).is_none_or(|end| end > out.len()) {
            return Err(Error::shape(
                OP,
                format!(
                    "view {v}: output {} has {} elements, too few for {n} from element {}",
                    j.out,
                    out.len(),
                    j.at
                ),
            ));
        }
        let mut r = AugView::new(j.aug, j.params, img.height, img.width)
            .map_err(|e| Error::invalid(OP, format!("view {v}: {e}")))?;
        r.img = img.data.addr();
        r.out = out.addr() + (j.at * std::mem::size_of::<T>()) as u64;
        rows.push(r);
        slots.push((j.out, j.at, j.at + n, v));
    }
    slots.sort_unstable();
    for w in slots.windows(2) {
        if w[0].0 == w[1].0 && w[1].1 < w[0].2 {
            return Err(Error::invalid(
                OP,
                format!(
                    "views {} and {} overlap in output {}",
                    w[0].3, w[1].3, w[0].0
                ),
            ));
        }
    }
    let total = assign_workspace(&mut rows);
    let ws = ex.alloc::<f32>(total)?;
    let words: Vec<u64> = rows.iter().flat_map(|r| r.to_words()).collect();
    let table = ex.upload::<u64>(&words)?;
    let args = [table.arg(), ws.arg()];
    // SAFETY: (const AugView* tab, float* ws) as declared; the table holds one 144-byte row per
    // block (to_words is the kernel's layout); every row's image address holds img_h·img_w·3
    // bytes with the crop box inside, its output address holds size²·3 elements of T inside a
    // buffer borrowed mutably (slots disjoint, images only read), and the workspace holds every
    // row's slice as assign_workspace laid it out.
    unsafe {
        ex.launch(
            MODULE,
            T::KERNEL,
            augment_config(rows.len(), threads),
            &args,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// The device check's rows

const GROUP: &str = "augment";

/// A deterministic test image: smooth structure plus noise, so that resampling and blur see
/// gradients and edges.
fn test_image(i: usize, h: usize, w: usize) -> Result<Image<u8>> {
    let mut r = Rng::named(0x5d_a06, "augment.check.image").fork(i as u64);
    let data = (0..h * w * 3)
        .map(|k| {
            let (y, x, c) = (k / (w * 3), (k / 3) % w, k % 3);
            ((y * 7 + x * 3 + c * 50) % 200 + r.below(56) as usize) as u8
        })
        .collect();
    Image::from_vec(h, w, data).ok_or_else(|| Error::invalid("augment check", "test image size"))
}

/// The rows: the multi-crop augmentation of 64 decoded images (alternately 375x500 and
/// 500x375, ImageNet's typical sizes; 1 image when quick) with Suave's recipe (2x224 + 8x96,
/// bilinear) in bf16 and f32, and Daino's (bicubic, solarise) in bf16, every view of the batch
/// in one launch, each view against `ViewAug::apply`.
pub fn check_rows<E: Exec>(c: &mut Checker<'_, E>) {
    let n_img = if c.opts.quick { 1 } else { 64 };
    multicrop_row::<E, bf16>(c, "multicrop_suave_bf16", "suave", n_img);
    multicrop_row::<E, f32>(c, "multicrop_suave_f32", "suave", n_img);
    multicrop_row::<E, bf16>(c, "multicrop_daino_bf16", "daino", n_img);
}

fn multicrop_row<E: Exec, T: AugElem>(
    c: &mut Checker<'_, E>,
    id: &str,
    recipe: &str,
    n_img: usize,
) {
    let mc = if recipe == "daino" {
        MultiCrop::daino_unlabelled()
    } else {
        MultiCrop::suave_unlabelled(true)
    };
    let is_bf16 = std::mem::size_of::<T>() == 2;
    let sizes: Vec<(usize, usize)> = (0..n_img)
        .map(|i| if i % 2 == 0 { (375, 500) } else { (500, 375) })
        .collect();
    let big = mc.views[0].size;
    let n_big = mc.views.iter().filter(|v| v.size == big).count();
    let (n_small, small) = (
        mc.views.len() - n_big,
        mc.views.last().map_or(big, |v| v.size),
    );
    let views_spec: Vec<_> = mc
        .views
        .iter()
        .map(|v| {
            json!({
                "size": v.size, "scale": [v.scale.0, v.scale.1],
                "bicubic": v.interp == Interpolation::Bicubic,
                "jitter": v.jitter.map(|j| [j.brightness, j.contrast, j.saturation, j.hue]),
                "jitter_p": v.jitter.map_or(0.0, |j| j.p),
                "gray_p": v.gray_p, "blur_p": v.blur_p, "solarize_p": v.solarize_p,
                "mean": v.norm.mean, "std": v.norm.std,
            })
        })
        .collect();
    let spec = json!({
        "kind": "multicrop", "images": sizes, "views": views_spec,
        "dtype": if is_bf16 { "bf16" } else { "f32" },
    });
    let shape = format!(
        "{n_img} imgs -> {}x{big} + {}x{small} {}",
        n_img * n_big,
        n_img * n_small,
        if is_bf16 { "bf16" } else { "f32" }
    );
    c.row(GROUP, id, shape, spec, |c| {
        let imgs: Vec<Image<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &(h, w))| test_image(i, h, w))
            .collect::<Result<_>>()?;
        let params: Vec<Vec<ViewParams>> = imgs
            .iter()
            .enumerate()
            .map(|(i, im)| {
                mc.sample(
                    &Rng::named(7, "augment.check").fork(i as u64),
                    im.height,
                    im.width,
                )
            })
            .collect();
        // Globals of every image first (they are the long blocks), then the locals.
        let mut jobs = Vec::new();
        for (pass, out) in [(true, 0usize), (false, 1)] {
            let mut slot = 0;
            for (i, ps) in params.iter().enumerate() {
                for (aug, p) in mc.views.iter().zip(ps) {
                    if (aug.size == big) == pass {
                        jobs.push(ViewJob {
                            image: i,
                            aug,
                            params: p,
                            out,
                            at: slot * aug.numel(),
                        });
                        slot += 1;
                    }
                }
            }
        }
        let bufs: Vec<E::Buf<u8>> = imgs
            .iter()
            .map(|im| upload_image(c.dev, im))
            .collect::<Result<_>>()?;
        let dimgs: Vec<DevImage<'_, E::Buf<u8>>> = bufs
            .iter()
            .zip(&imgs)
            .map(|(data, im)| DevImage {
                data,
                height: im.height,
                width: im.width,
            })
            .collect();
        let mut o0 = c.dev.alloc::<T>(n_img * n_big * big * big * 3)?;
        let mut o1 = c
            .dev
            .alloc::<T>((n_img * n_small * small * small * 3).max(1))?;
        augment_views(c.dev, &dimgs, &jobs, &mut [&mut o0, &mut o1], THREADS)?;
        let got = [c.dev.download(&o0)?, c.dev.download(&o1)?];
        let worst = {
            use rayon::prelude::*;
            jobs.par_iter()
                .map(|j| {
                    let mut want = vec![0.0f32; j.aug.numel()];
                    j.aug.apply(&imgs[j.image], j.params, &mut want);
                    let g: Vec<f32> = got[j.out][j.at..j.at + want.len()]
                        .iter()
                        .map(|&v| T::widen(v))
                        .collect();
                    rel_l2(&g, &want)
                })
                .reduce(
                    || 0.0,
                    |a, b| {
                        if a.is_nan() || b.is_nan() {
                            f64::NAN
                        } else {
                            a.max(b)
                        }
                    },
                )
        };
        let t = c.time(|| augment_views(c.dev, &dimgs, &jobs, &mut [&mut o0, &mut o1], THREADS))?;
        let pixels_in: usize = imgs.iter().map(|im| im.data.len()).sum();
        let out_elems = n_img * (n_big * big * big + n_small * small * small) * 3;
        Ok(Measured {
            err: Some((worst, if is_bf16 { TOL_BF16 } else { TOL_F32 })),
            time: Some(t),
            bytes: (pixels_in + out_elems * std::mem::size_of::<T>()) as f64,
            note: "err: worst view; resampling + blur: more compute than a copy".into(),
            ..Default::default()
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_has_the_kernels_layout() {
        assert_eq!(std::mem::size_of::<AugView>(), 144);
        let r = AugView {
            img: 0x0102_0304_0506_0708,
            ws: -2,
            img_h: 7,
            order: [3, 2, 1, 0],
            factors: [1.5, 0.5, 2.0, -0.25],
            pad_: 9,
            stdv: [0.25, 0.5, 0.75],
            ..Default::default()
        };
        let w = r.to_words();
        // SAFETY: AugView is repr(C), 144 bytes without padding (asserted above): reading it
        // as 18 words is what the kernel does with the uploaded table.
        let direct: [u64; 18] = unsafe { std::mem::transmute(r) };
        assert_eq!(w, direct);
        assert_eq!(w[0], 0x0102_0304_0506_0708);
        assert_eq!(w[2] as i64, -2);
    }

    #[test]
    fn bad_rows_are_errors() {
        let aug = MultiCrop::labelled().views.remove(0);
        let mut p = ViewParams {
            crop: CropBox {
                top: 5,
                left: 0,
                height: 10,
                width: 10,
            },
            flip: false,
            jitter: Some(([0, 1, 2, 2], [1.0; 4])),
            gray: false,
            blur: None,
            solarize: false,
        };
        assert!(
            AugView::new(&aug, &p, 12, 12).is_err(),
            "crop outside the image"
        );
        assert!(
            AugView::new(&aug, &p, 20, 20).is_err(),
            "order not a permutation"
        );
        p.jitter = Some(([3, 1, 2, 0], [1.0; 4]));
        assert!(AugView::new(&aug, &p, 20, 20).is_ok());
    }
}
