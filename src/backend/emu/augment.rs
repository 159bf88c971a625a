//! CPU launches of `kernels/augment.cu`: the multi-crop augmentation of a batch of decoded 8-bit
//! images, one block per view, from parameters sampled on the host by `ViewAug::sample`.
//!
//! [`AugView`] is the kernel's table row (`#[repr(C)]`, pointers as 64-bit integers);
//! [`AugView::new`] fills it from a [`ViewAug`] and its sampled [`ViewParams`] (crop box, flip,
//! jitter order and factors, grayscale, PIL blur radius and weights, solarise, normalisation),
//! checking what a corrupt row would turn into an out-of-bounds read. [`assign_workspace`] lays
//! out the per-view workspace slices; [`augment_config`] is the launch. The GPU runtime uses the
//! same three with device addresses; [`augment_views`] / [`augment_views_bf16`] run them here on
//! host memory.

use super::{arg, launch_raw, LaunchConfig, Mode};
use crate::data::augment::{ViewAug, ViewParams};
use crate::data::image::Image;
use crate::data::transforms::{pil_box_radius, CropBox, Interpolation};
use crate::error::{Error, Result};
use half::bf16;

/// Threads per block (one block per view) on the GPU.
pub const DEFAULT_THREADS: u32 = 256;

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
        const OP: &str = "emu::AugView::new";
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

/// One view to augment: the decoded image, the recipe, and its sampled parameters.
#[derive(Clone, Copy, Debug)]
pub struct ViewJob<'a> {
    /// The decoded image.
    pub img: &'a Image<u8>,
    /// The view's recipe (size, filter, normalisation).
    pub aug: &'a ViewAug,
    /// Parameters from `aug.sample(...)`.
    pub params: &'a ViewParams,
}

fn run<T>(
    op: &'static str,
    kernel: &str,
    mode: Mode,
    jobs: &[ViewJob<'_>],
    out: &mut [&mut [T]],
    threads: u32,
) -> Result<()> {
    if threads == 0 || threads > 1024 || !threads.is_multiple_of(32) {
        return Err(Error::invalid(
            op,
            format!("{threads} threads per block: need a multiple of 32 in 32..=1024"),
        ));
    }
    if jobs.len() != out.len() {
        return Err(Error::shape(
            op,
            format!("{} views but {} output slots", jobs.len(), out.len()),
        ));
    }
    if jobs.is_empty() {
        return Ok(());
    }
    let mut rows = Vec::with_capacity(jobs.len());
    for (j, o) in jobs.iter().zip(out.iter_mut()) {
        if j.img.data.len() != j.img.height * j.img.width * 3 {
            return Err(Error::shape(
                op,
                format!(
                    "image of {} values for {}x{}x3",
                    j.img.data.len(),
                    j.img.height,
                    j.img.width
                ),
            ));
        }
        super::check_len(op, "view output", o.len(), j.aug.numel())?;
        let mut r = AugView::new(j.aug, j.params, j.img.height, j.img.width)?;
        r.img = j.img.data.as_ptr() as u64;
        r.out = o.as_mut_ptr() as u64;
        rows.push(r);
    }
    let total = assign_workspace(&mut rows);
    let mut ws = vec![0.0f32; total];
    let (pt, pw) = (rows.as_ptr(), ws.as_mut_ptr());
    let mut args = [arg(&pt), arg(&pw)];
    // SAFETY: argument types follow the kernel; every row's image and output pointers address
    // slices of the checked sizes, its crop lies inside its image, and the workspace holds each
    // row's slice as assign_workspace laid it out.
    unsafe {
        launch_raw(
            mode,
            "augment",
            kernel,
            augment_config(rows.len(), threads),
            &mut args,
        )
    }
}

/// Runs `augment_views_f32`: view `i` of `jobs` is written to `out[i]` (`size * size * 3` f32,
/// HWC), as `ViewAug::apply` computes it.
pub fn augment_views(
    mode: Mode,
    jobs: &[ViewJob<'_>],
    out: &mut [&mut [f32]],
    threads: u32,
) -> Result<()> {
    run(
        "emu::augment_views",
        "augment_views_f32",
        mode,
        jobs,
        out,
        threads,
    )
}

/// Runs `augment_views_bf16`: as [`augment_views`], rounded to bf16 at the store.
pub fn augment_views_bf16(
    mode: Mode,
    jobs: &[ViewJob<'_>],
    out: &mut [&mut [bf16]],
    threads: u32,
) -> Result<()> {
    run(
        "emu::augment_views_bf16",
        "augment_views_bf16",
        mode,
        jobs,
        out,
        threads,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_has_the_kernels_layout() {
        assert_eq!(std::mem::size_of::<AugView>(), 144);
    }

    #[test]
    fn bad_rows_are_errors() {
        let aug = crate::data::augment::MultiCrop::labelled().views.remove(0);
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
