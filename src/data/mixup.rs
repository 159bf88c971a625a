//! Mixup / CutMix in timm's "batch" mode, as [SD]'s `src/mixup.py` (spec §1.9): one λ per batch,
//! λ ~ Beta(1, 1) = U(0, 1), CutMix with probability `switch_prob` (0.5), the partner of row i
//! is row B-1-i (`x2.flip(0)`), CutMix's λ corrected to the pasted area. The labelled batch is
//! "extended" (`[batch; mixed]` with `[one_hot(y); λ one_hot(y) + (1-λ) one_hot(flip(y))]`);
//! the unlabelled batch mixes global 1 with flipped global 2.
//!
//! Only α = 1 is supported (the recipes' value): Beta(1, 1) is the uniform distribution.

use crate::rng::Rng;
use crate::tensor::Tensor;

use super::error::{DataError, DataResult};

/// The sampled mixing of one batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MixParams {
    /// Weight of `x1` (after CutMix's area correction). 1 means no mixing.
    pub lambda: f32,
    /// CutMix box `(y_lo, y_hi, x_lo, x_hi)` (half-open), or `None` for Mixup.
    pub cutmix_box: Option<(usize, usize, usize, usize)>,
}

/// timm's `rand_bbox` + `cutmix_bbox_and_lam(correct_lam=True)` with explicit draws: side
/// fractions sqrt(1-λ), centre (`cy`, `cx`), both halves `cut // 2`, clipped to the image.
pub fn cutmix_box(h: usize, w: usize, lambda: f64, cy: usize, cx: usize) -> MixParams {
    let ratio = (1.0 - lambda).max(0.0).sqrt();
    let (cut_h, cut_w) = ((h as f64 * ratio) as i64, (w as f64 * ratio) as i64);
    let clip = |v: i64, n: usize| v.clamp(0, n as i64) as usize;
    let (cy, cx) = (cy as i64, cx as i64);
    let yl = clip(cy - cut_h / 2, h);
    let yh = clip(cy + cut_h / 2, h);
    let xl = clip(cx - cut_w / 2, w);
    let xh = clip(cx + cut_w / 2, w);
    let area = ((yh - yl) * (xh - xl)) as f64;
    MixParams {
        lambda: (1.0 - area / (h * w) as f64) as f32,
        cutmix_box: Some((yl, yh, xl, xh)),
    }
}

/// `Mixup._params_per_batch` with `prob` (1.0 in the recipes) and `switch_prob` (0.5), for
/// images of `h x w`.
pub fn sample_mix(rng: &mut Rng, prob: f64, switch_prob: f64, h: usize, w: usize) -> MixParams {
    if rng.uniform() >= prob {
        return MixParams {
            lambda: 1.0,
            cutmix_box: None,
        };
    }
    let use_cutmix = rng.uniform() < switch_prob;
    let lambda = rng.uniform(); // Beta(1, 1)
    if use_cutmix {
        let cy = rng.below(h as u64) as usize;
        let cx = rng.below(w as u64) as usize;
        cutmix_box(h, w, lambda, cy, cx)
    } else {
        MixParams {
            lambda: lambda as f32,
            cutmix_box: None,
        }
    }
}

/// `Mixup._mix_batch(x1, x2)` on NHWC batches: `λ x1 + (1-λ) x2.flip(0)`, or `x1` with the box
/// pasted from `x2.flip(0)`. Pure.
pub fn mix_batch(x1: &Tensor<f32>, x2: &Tensor<f32>, p: &MixParams) -> DataResult<Tensor<f32>> {
    if x1.shape() != x2.shape() || x1.rank() != 4 {
        return Err(DataError::Invalid(format!(
            "mix_batch: shapes {:?} and {:?} must be equal NHWC",
            x1.shape(),
            x2.shape()
        )));
    }
    let (b, h, w, c) = (x1.dim(0), x1.dim(1), x1.dim(2), x1.dim(3));
    let per = h * w * c;
    let mut out = x1.clone();
    if p.lambda == 1.0 && p.cutmix_box.is_none() {
        return Ok(out);
    }
    let (src, dst) = (x2.data(), out.data_mut());
    for i in 0..b {
        let j = b - 1 - i;
        let (d, s) = (
            &mut dst[i * per..(i + 1) * per],
            &src[j * per..(j + 1) * per],
        );
        match p.cutmix_box {
            Some((yl, yh, xl, xh)) => {
                for y in yl..yh {
                    let r = (y * w + xl) * c..(y * w + xh) * c;
                    d[r.clone()].copy_from_slice(&s[r]);
                }
            }
            None => {
                let (l, m) = (p.lambda, 1.0 - p.lambda);
                for (a, &v) in d.iter_mut().zip(s) {
                    *a = *a * l + v * m;
                }
            }
        }
    }
    Ok(out)
}

/// `mixup_target`: `λ onehot(y) + (1-λ) onehot(flip(y))` with label smoothing `smoothing`
/// (0 inside the recipes' mixup; CE smoothing is applied by the loss).
pub fn mixup_targets(labels: &[usize], classes: usize, lambda: f32, smoothing: f32) -> Tensor<f32> {
    let b = labels.len();
    let off = smoothing / classes as f32;
    let on = 1.0 - smoothing + off;
    let mut t = vec![off; b * classes];
    for (i, &y) in labels.iter().enumerate() {
        let yf = labels[b - 1 - i];
        let row = &mut t[i * classes..(i + 1) * classes];
        row[y] += (on - off) * lambda;
        row[yf] += (on - off) * (1.0 - lambda);
    }
    Tensor::from_vec(t, &[b, classes]).unwrap_or_else(|_| Tensor::zeros(&[b, classes]))
}

/// `CollateMixup(extend_batch=True)`: returns `[x; mix(x, x)]` (2B rows) and the soft targets
/// `[onehot(y); mixup_target(y, λ)]`.
pub fn extend_labelled(
    x: &Tensor<f32>,
    labels: &[usize],
    classes: usize,
    p: &MixParams,
) -> DataResult<(Tensor<f32>, Tensor<f32>)> {
    if labels.len() != x.dim(0) || labels.iter().any(|&y| y >= classes) {
        return Err(DataError::Invalid(format!(
            "extend_labelled: {} labels for {} rows, or a label >= {classes}",
            labels.len(),
            x.dim(0)
        )));
    }
    let mixed = mix_batch(x, x, p)?;
    let images = Tensor::cat_batch(&[x, &mixed]).map_err(|e| DataError::Invalid(e.to_string()))?;
    let one = mixup_targets(labels, classes, 1.0, 0.0);
    let soft = mixup_targets(labels, classes, p.lambda, 0.0);
    let targets =
        Tensor::cat_batch(&[&one, &soft]).map_err(|e| DataError::Invalid(e.to_string()))?;
    Ok((images, targets))
}
