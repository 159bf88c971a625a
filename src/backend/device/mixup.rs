//! Device ops of `kernels/mixup.cu`: Mixup / CutMix of an NHWC batch with its reversed self
//! (timm's "batch" mode) and the soft targets, with λ and the CutMix box sampled on the host by
//! `data::mixup::sample_mix` ([`MixParams`]). CPU references: [`mix_batch`] /
//! [`mix_batch_into`] against `data::mixup::mix_batch` (bit for bit in f32; the bf16 kernel is
//! the f32 mix rounded once), [`mixup_targets`] against `data::mixup::mixup_targets` (bit for
//! bit), and the pair together against `data::mixup::extend_labelled`.
//!
//! Launches as `kernels/mixup.cu` documents: `mix_batch_*` grid
//! `(min(ceil(H·W·C / T), 1024), B)` (grid.y = image, a grid-stride loop over its elements),
//! block T = 256; `mixup_targets` one thread per target. Both write every output element, so
//! outputs are [`Exec::alloc`]ed.

use super::check::{random, round_bf16, Checker, Measured, TOL_BF16, TOL_F32};
use super::{as_i32, check_len, check_threads, DevBuf, Elem, Exec, KArg, LaunchConfig};
use crate::data::mixup::{self as host, cutmix_box, MixParams};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use crate::testing::rel_l2;
use half::bf16;
use serde_json::json;

const MODULE: &str = "mixup";

/// Threads per block of the mixup kernels on the GPU.
pub const THREADS: u32 = 256;
/// Most blocks per image (grid.x) of a `mix_batch` launch: a grid-stride loop covers the rest.
pub const MAX_BLOCKS_PER_IMAGE: usize = 1024;

/// An element type with a `mix_batch` kernel: f32 (the CPU path's batch) and bf16 (the bf16
/// activations path, computed in f32 and rounded once).
pub trait MixElem: Elem + private::Sealed {
    /// The kernel for this type.
    const KERNEL: &'static str;
}
impl MixElem for f32 {
    const KERNEL: &'static str = "mix_batch_f32";
}
impl MixElem for bf16 {
    const KERNEL: &'static str = "mix_batch_bf16";
}
mod private {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
}

/// Grid and block of `mix_batch_*` on a batch of `batch` images of `per_image` elements:
/// grid.y is the image, grid.x covers its elements (at most [`MAX_BLOCKS_PER_IMAGE`]).
pub fn mix_config(batch: usize, per_image: usize, threads: u32) -> LaunchConfig {
    let blocks = per_image
        .div_ceil(threads.max(1) as usize)
        .clamp(1, MAX_BLOCKS_PER_IMAGE);
    LaunchConfig {
        grid: (blocks as u32, batch as u32, 1),
        block: (threads, 1, 1),
        shared_bytes: 0,
    }
}

/// The kernel's scalar arguments for `p` on an `h x w` image: (cutmix, y_lo, y_hi, x_lo, x_hi).
fn box_args(op: &'static str, p: &MixParams, h: usize, w: usize) -> Result<[i32; 5]> {
    match p.cutmix_box {
        None => Ok([0; 5]),
        Some((yl, yh, xl, xh)) => {
            if yl > yh || yh > h || xl > xh || xh > w {
                return Err(Error::invalid(
                    op,
                    format!("CutMix box rows {yl}..{yh}, columns {xl}..{xh} is not inside {h}x{w}"),
                ));
            }
            Ok([1, yl as i32, yh as i32, xl as i32, xh as i32])
        }
    }
}

/// `out[i] = mix(x1[i], x2[B-1-i])` of `[B, H, W, C]` batches (`shape`), as
/// `data::mixup::mix_batch`, in a new buffer.
pub fn mix_batch<E: Exec, T: MixElem>(
    ex: &E,
    x1: &E::Buf<T>,
    x2: &E::Buf<T>,
    shape: [usize; 4],
    p: &MixParams,
    threads: u32,
) -> Result<E::Buf<T>> {
    let mut out = ex.alloc::<T>(shape.iter().product())?;
    mix_batch_into(ex, x1, x2, &mut out, 0, shape, p, threads)?;
    Ok(out)
}

/// [`mix_batch`] written into `out` from element `at` on: Suave's extended labelled batch
/// `[x; mix(x, x)]` writes its mixed half straight into the second half of the `[2B]` buffer.
/// `out` cannot alias `x1` / `x2` (the kernel reads the partner image while writing), which the
/// borrows guarantee.
#[allow(clippy::too_many_arguments)]
pub fn mix_batch_into<E: Exec, T: MixElem>(
    ex: &E,
    x1: &E::Buf<T>,
    x2: &E::Buf<T>,
    out: &mut E::Buf<T>,
    at: usize,
    shape: [usize; 4],
    p: &MixParams,
    threads: u32,
) -> Result<()> {
    const OP: &str = "mix_batch";
    check_threads(OP, threads)?;
    let n: usize = shape.iter().product();
    check_len(OP, "x1", x1.len(), n)?;
    check_len(OP, "x2", x2.len(), n)?;
    if at.checked_add(n).is_none_or(|end| end > out.len()) {
        return Err(Error::shape(
            OP,
            format!(
                "out has {} elements: too few for {n} from element {at}",
                out.len()
            ),
        ));
    }
    if shape[0] > 65535 {
        return Err(Error::invalid(
            OP,
            format!(
                "batch of {} images: at most 65535 per launch (grid.y); split the batch",
                shape[0]
            ),
        ));
    }
    let per = shape[1] * shape[2] * shape[3];
    as_i32(OP, "image elements", per)?;
    let [b, h, w, c] = [
        as_i32(OP, "batch", shape[0])?,
        as_i32(OP, "height", shape[1])?,
        as_i32(OP, "width", shape[2])?,
        as_i32(OP, "channels", shape[3])?,
    ];
    let [cm, yl, yh, xl, xh] = box_args(OP, p, shape[1], shape[2])?;
    if n == 0 {
        return Ok(());
    }
    let po = out.addr() + (at * std::mem::size_of::<T>()) as u64;
    let args = [
        x1.arg(),
        x2.arg(),
        KArg::Ptr(po),
        b.into(),
        h.into(),
        w.into(),
        c.into(),
        p.lambda.into(),
        cm.into(),
        yl.into(),
        yh.into(),
        xl.into(),
        xh.into(),
    ];
    // SAFETY: (const T* x1, const T* x2, T* out, int b, int h, int w, int c, float lambda,
    // int cutmix, int y_lo, int y_hi, int x_lo, int x_hi) as mix_batch_{f32,bf16} declare; x1
    // and x2 hold B·H·W·C values, out as many from element `at`; the box lies inside the image;
    // out is a distinct buffer (&mut) from x1 and x2.
    unsafe { ex.launch(MODULE, T::KERNEL, mix_config(shape[0], per, threads), &args) }
}

/// Class labels on the device for [`mixup_targets`], each checked against `classes` (the
/// kernel would silently give a label out of range no weight).
pub fn upload_labels<E: Exec>(ex: &E, labels: &[usize], classes: usize) -> Result<E::Buf<i32>> {
    const OP: &str = "mixup labels";
    if let Some(&y) = labels.iter().find(|&&y| y >= classes) {
        return Err(Error::invalid(
            OP,
            format!("label {y} is not below the {classes} classes"),
        ));
    }
    let ys: Vec<i32> = labels
        .iter()
        .map(|&y| as_i32(OP, "label", y))
        .collect::<Result<_>>()?;
    ex.upload(&ys)
}

/// `[B, classes]` soft targets `λ onehot(y) + (1-λ) onehot(flip(y))` with label smoothing, as
/// `data::mixup::mixup_targets` (labels from [`upload_labels`]).
pub fn mixup_targets<E: Exec>(
    ex: &E,
    labels: &E::Buf<i32>,
    classes: usize,
    lambda: f32,
    smoothing: f32,
    threads: u32,
) -> Result<E::Buf<f32>> {
    const OP: &str = "mixup_targets";
    check_threads(OP, threads)?;
    let nb = labels.len();
    if nb == 0 || classes == 0 {
        return Err(Error::shape(
            OP,
            format!("{nb} labels, {classes} classes: need at least one of each"),
        ));
    }
    let (b, k) = (as_i32(OP, "batch", nb)?, as_i32(OP, "classes", classes)?);
    as_i32(OP, "batch x classes", nb.saturating_mul(classes))?;
    let out = ex.alloc::<f32>(nb * classes)?;
    let args = [
        labels.arg(),
        b.into(),
        k.into(),
        lambda.into(),
        smoothing.into(),
        out.arg(),
    ];
    let cfg = LaunchConfig::linear((nb * classes).div_ceil(threads as usize) as u32, threads, 0);
    // SAFETY: (const int* labels, int b, int classes, float lambda, float smoothing, float* out)
    // as declared; labels holds b values (only compared, never used as an index), out b·classes;
    // threads past b·classes return.
    unsafe { ex.launch(MODULE, "mixup_targets", cfg, &args)? };
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The device check's rows

const GROUP: &str = "mixup";

/// The rows: Mixup and CutMix of a [64, 224, 224, 3] bf16 batch (the images as the bf16
/// activations path feeds them; 4 images when quick), Mixup of the f32 batch, and the soft
/// targets of 64 labels over 1000 classes.
pub fn check_rows<E: Exec>(c: &mut Checker<'_, E>) {
    let b = if c.opts.quick { 4 } else { 64 };
    let shape = [b, 224, 224, 3];
    let mixup = MixParams {
        lambda: 0.37,
        cutmix_box: None,
    };
    let cutmix = cutmix_box(224, 224, 0.55, 100, 150);
    for (id, p, is_bf16) in [
        ("mix_batch_bf16_mixup", mixup, true),
        ("mix_batch_bf16_cutmix", cutmix, true),
        ("mix_batch_f32_mixup", mixup, false),
    ] {
        mix_row(c, id, shape, p, is_bf16);
    }
    let classes = 1000;
    c.row(
        GROUP,
        "mixup_targets",
        format!("B{b} classes{classes} ls0.1"),
        json!({"kind": "mixup_targets", "b": b, "classes": classes, "lambda": 0.37, "ls": 0.1}),
        |c| {
            let labels: Vec<usize> = random("mx.labels", b)
                .iter()
                .map(|v| ((v + 1.0) * 0.5 * classes as f32) as usize % classes)
                .collect();
            let want = host::mixup_targets(&labels, classes, 0.37, 0.1);
            let ld = upload_labels(c.dev, &labels, classes)?;
            let t = mixup_targets(c.dev, &ld, classes, 0.37, 0.1, THREADS)?;
            let got = c.dev.download(&t)?;
            let tm = c.time(|| mixup_targets(c.dev, &ld, classes, 0.37, 0.1, THREADS).map(drop))?;
            Ok(Measured {
                err: Some((rel_l2(&got, want.data()), TOL_F32)),
                time: Some(tm),
                bytes: 4.0 * (b + b * classes) as f64,
                note: format!(
                    "launch-bound: {} KB of targets",
                    (4 * b * classes).div_ceil(1024)
                ),
                ..Default::default()
            })
        },
    );
}

fn mix_row<E: Exec>(
    c: &mut Checker<'_, E>,
    id: &str,
    shape: [usize; 4],
    p: MixParams,
    is_bf16: bool,
) {
    let n: usize = shape.iter().product();
    let [b, h, w, ch] = shape;
    let elem = if is_bf16 { 2.0 } else { 4.0 };
    let spec = json!({
        "kind": "mix_batch", "b": b, "h": h, "w": w, "c": ch, "lambda": p.lambda,
        "box": p.cutmix_box.map(|(a, bb, cc, d)| [a, bb, cc, d]),
        "dtype": if is_bf16 { "bf16" } else { "f32" },
    });
    let what = match p.cutmix_box {
        Some((yl, yh, xl, xh)) => format!("cutmix {yl}..{yh}x{xl}..{xh}"),
        None => format!("mixup l{}", p.lambda),
    };
    let dtype = if is_bf16 { "bf16" } else { "f32" };
    c.row(
        GROUP,
        id,
        format!("[{b}, {h}, {w}, {ch}] {dtype} {what}"),
        spec,
        |c| {
            let mut x1 = random(&format!("mx.{id}.x1"), n);
            let mut x2 = random(&format!("mx.{id}.x2"), n);
            if is_bf16 {
                x1 = round_bf16(&x1);
                x2 = round_bf16(&x2);
            }
            let want = host::mix_batch(
                &Tensor::from_vec(x1.clone(), &shape)?,
                &Tensor::from_vec(x2.clone(), &shape)?,
                &p,
            )
            .map_err(|e| Error::invalid("device-check", e.to_string()))?;
            let (got, tm) = if is_bf16 {
                let (d1, d2) = (c.dev.upload_bf16(&x1)?, c.dev.upload_bf16(&x2)?);
                let out = mix_batch::<E, bf16>(c.dev, &d1, &d2, shape, &p, THREADS)?;
                let got = c.dev.download_bf16(&out)?;
                let mut o = c.dev.alloc::<bf16>(n)?;
                let tm =
                    c.time(|| mix_batch_into(c.dev, &d1, &d2, &mut o, 0, shape, &p, THREADS))?;
                (got, tm)
            } else {
                let (d1, d2) = (c.dev.upload(&x1)?, c.dev.upload(&x2)?);
                let out = mix_batch::<E, f32>(c.dev, &d1, &d2, shape, &p, THREADS)?;
                let got = c.dev.download(&out)?;
                let mut o = c.dev.alloc::<f32>(n)?;
                let tm =
                    c.time(|| mix_batch_into(c.dev, &d1, &d2, &mut o, 0, shape, &p, THREADS))?;
                (got, tm)
            };
            // CutMix reads x1 outside the box and x2 inside: one input's worth in all.
            let reads = if p.cutmix_box.is_some() { 1.0 } else { 2.0 };
            Ok(Measured {
                err: Some((
                    rel_l2(&got, want.data()),
                    if is_bf16 { TOL_BF16 } else { TOL_F32 },
                )),
                time: Some(tm),
                flops: if p.cutmix_box.is_some() {
                    0.0
                } else {
                    3.0 * n as f64
                },
                bytes: (reads + 1.0) * elem * n as f64,
                note: "aim: >= 70% of copy bandwidth (%floor)".into(),
                ..Default::default()
            })
        },
    );
}
