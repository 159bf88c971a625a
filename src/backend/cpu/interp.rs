//! Bicubic interpolation of a channels-last 2-D grid, for resizing the ViT position embedding to
//! another number of patches (DINO's `interpolate_pos_encoding`, timm's `resample_abs_pos_embed`).
//!
//! It reproduces `torch.nn.functional.interpolate(mode="bicubic", align_corners=False,
//! antialias=False)`: for output index i along an axis the source coordinate is
//! `s = scale·(i + ½) − ½` with `scale = 1/scale_factor` when a scale factor is given and
//! `in/out` otherwise (PyTorch's `area_pixel_compute_scale`), computed in the element type as
//! PyTorch does; the four taps `floor(s) − 1 .. floor(s) + 2` are clamped to the border and
//! weighted by Keys' cubic convolution with A = −0.75. The output is
//! `Σ_i wy_i · (Σ_j wx_j · x[row_i, col_j, :])`, PyTorch's summation order.
//!
//! Layout: `[H, W, C]` with the channels contiguous, so every tap is a contiguous C-vector
//! multiply-add. The forward runs one rayon task per output row; the backward (the adjoint:
//! dy scattered with the same weights) is rearranged as a gather per *input* row, so that its
//! tasks write disjoint rows and need no atomics.

use crate::error::{Error, Result};
use crate::tensor::{Float, Tensor};
use rayon::prelude::*;

const OP_FWD: &str = "bicubic_forward";
const OP_BWD: &str = "bicubic_backward";

/// Geometry of one bicubic resize `[in_h, in_w, C] → [out_h, out_w, C]`.
///
/// Build it with [`Bicubic::to_size`] (F.interpolate's `size=`) or
/// [`Bicubic::with_scale_factor`] (`scale_factor=`, whose source mapping uses 1/scale_factor,
/// which differs from in/out when in·scale_factor is not an integer).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bicubic {
    /// Input rows.
    pub in_h: usize,
    /// Input columns.
    pub in_w: usize,
    /// Output rows.
    pub out_h: usize,
    /// Output columns.
    pub out_w: usize,
    /// Scale factor along the rows when given (`None`: the mapping uses in_h/out_h).
    pub scale_h: Option<f64>,
    /// Scale factor along the columns when given.
    pub scale_w: Option<f64>,
}

impl Bicubic {
    /// Resize to an explicit output size (`F.interpolate(x, size=(out_h, out_w), ...)`).
    pub fn to_size(in_h: usize, in_w: usize, out_h: usize, out_w: usize) -> Self {
        Bicubic {
            in_h,
            in_w,
            out_h,
            out_w,
            scale_h: None,
            scale_w: None,
        }
    }

    /// Resize by scale factors (`F.interpolate(x, scale_factor=(sf_h, sf_w), ...)` without
    /// `recompute_scale_factor`): the output size is `floor(in · sf)` and the source mapping uses
    /// `1/sf`. Errors unless both factors are finite and positive and the output is non-empty.
    pub fn with_scale_factor(in_h: usize, in_w: usize, sf_h: f64, sf_w: f64) -> Result<Self> {
        if !(sf_h.is_finite() && sf_h > 0.0 && sf_w.is_finite() && sf_w > 0.0) {
            return Err(Error::invalid(
                "Bicubic::with_scale_factor",
                format!("scale factors ({sf_h}, {sf_w}) must be finite and positive"),
            ));
        }
        Ok(Bicubic {
            in_h,
            in_w,
            out_h: (in_h as f64 * sf_h).floor() as usize,
            out_w: (in_w as f64 * sf_w).floor() as usize,
            scale_h: Some(sf_h),
            scale_w: Some(sf_w),
        })
    }

    /// DINO's `interpolate_pos_encoding` for a `grid × grid` patch grid and an image of
    /// `w0 × h0` patches (DINO's names: w0 = width / patch, h0 = height / patch): scale factors
    /// `((w0 + 0.1)/grid, (h0 + 0.1)/grid)` applied to (rows, columns), in that order as the
    /// official code does (the two agree for the square crops DINO uses). The 0.1 avoids
    /// floating-point error in `floor(grid · sf)`.
    pub fn dino_pos_embed(grid: usize, w0: usize, h0: usize) -> Result<Self> {
        let g = grid as f64;
        Self::with_scale_factor(grid, grid, (w0 as f64 + 0.1) / g, (h0 as f64 + 0.1) / g)
    }

    fn validate(&self, op: &'static str) -> Result<()> {
        if self.in_h == 0 || self.in_w == 0 || self.out_h == 0 || self.out_w == 0 {
            return Err(Error::invalid(
                op,
                format!(
                    "sizes must be positive: input {}x{}, output {}x{}",
                    self.in_h, self.in_w, self.out_h, self.out_w
                ),
            ));
        }
        Ok(())
    }
}

/// The four (clamped source index, weight) taps of each output index along one axis.
struct Taps<T> {
    idx: Vec<[usize; 4]>,
    w: Vec<[T; 4]>,
}

/// PyTorch's `get_cubic_upsample_coefficients` (Keys' kernel, A = −0.75) at fraction `t`.
fn cubic_coefficients<T: Float>(t: T) -> [T; 4] {
    let a = T::c(-0.75);
    // cubic_convolution1 for |x| <= 1, cubic_convolution2 for 1 < |x| < 2.
    let near = |x: T| ((a + T::c(2.0)) * x - (a + T::c(3.0))) * x * x + T::one();
    let far = |x: T| ((a * x - T::c(5.0) * a) * x + T::c(8.0) * a) * x - T::c(4.0) * a;
    let t2 = T::one() - t;
    [far(t + T::one()), near(t), near(t2), far(t2 + T::one())]
}

fn axis_taps<T: Float>(input: usize, output: usize, scale_factor: Option<f64>) -> Taps<T> {
    // area_pixel_compute_scale: 1/sf when a positive scale factor is given, else in/out, in T.
    let scale = match scale_factor {
        Some(sf) if sf > 0.0 => T::c(1.0 / sf),
        _ => T::c(input as f64) / T::c(output as f64),
    };
    let half = T::c(0.5);
    let last = input as i64 - 1;
    let mut idx = Vec::with_capacity(output);
    let mut w = Vec::with_capacity(output);
    for i in 0..output {
        // area_pixel_compute_source_index with cubic = true: no clamping of the coordinate.
        let src = scale * (T::c(i as f64) + half) - half;
        let f = src.floor();
        let base = f.to_i64().unwrap_or(0);
        idx.push(std::array::from_fn(|j| {
            (base - 1 + j as i64).clamp(0, last) as usize
        }));
        w.push(cubic_coefficients(src - f));
    }
    Taps { idx, w }
}

/// Bicubic resize of a channels-last grid `x` `[in_h, in_w, C]` to `[out_h, out_w, C]`, exactly
/// as `F.interpolate(mode="bicubic", align_corners=False)` on the NCHW permutation. Errors when
/// `x` does not have shape `[in_h, in_w, C]` or a size is zero.
pub fn bicubic_forward<T: Float>(x: &Tensor<T>, p: Bicubic) -> Result<Tensor<T>> {
    p.validate(OP_FWD)?;
    x.expect_rank(OP_FWD, "x", 3)?;
    let c = x.dim(2);
    x.expect_shape(OP_FWD, "x", &[p.in_h, p.in_w, c])?;
    let ty = axis_taps::<T>(p.in_h, p.out_h, p.scale_h);
    let tx = axis_taps::<T>(p.in_w, p.out_w, p.scale_w);
    let xd = x.data();
    let in_row = p.in_w * c;
    let mut out = vec![T::ZERO; p.out_h * p.out_w * c];
    if c > 0 {
        out.par_chunks_mut(p.out_w * c).enumerate().for_each_init(
            || vec![T::ZERO; c],
            |t, (oy, orow)| {
                for (i, (&iy, &wy)) in ty.idx[oy].iter().zip(&ty.w[oy]).enumerate() {
                    let xrow = &xd[iy * in_row..(iy + 1) * in_row];
                    for (ox, o) in orow.chunks_exact_mut(c).enumerate() {
                        // t = Σ_j wx_j · x[iy, ix_j, :]
                        let (ix, wx) = (&tx.idx[ox], &tx.w[ox]);
                        let x0 = &xrow[ix[0] * c..(ix[0] + 1) * c];
                        for (tv, &xv) in t.iter_mut().zip(x0) {
                            *tv = wx[0] * xv;
                        }
                        for j in 1..4 {
                            let xj = &xrow[ix[j] * c..(ix[j] + 1) * c];
                            for (tv, &xv) in t.iter_mut().zip(xj) {
                                *tv += wx[j] * xv;
                            }
                        }
                        if i == 0 {
                            for (ov, &tv) in o.iter_mut().zip(t.iter()) {
                                *ov = tv * wy;
                            }
                        } else {
                            for (ov, &tv) in o.iter_mut().zip(t.iter()) {
                                *ov += tv * wy;
                            }
                        }
                    }
                }
            },
        );
    }
    Tensor::from_vec(out, &[p.out_h, p.out_w, c])
}

/// Backward of [`bicubic_forward`]: `dy` `[out_h, out_w, C]` → dx `[in_h, in_w, C]`, the adjoint
/// (every dy value scattered to its 16 taps with the forward's weights; clamped taps add up).
///
/// Computed per input row iy: `r[ox, :] = Σ_{(oy, i) : row_i(oy) = iy} wy_i · dy[oy, ox, :]`,
/// then `dx[iy, col_j(ox), :] += wx_j · r[ox, :]`. Rows are independent rayon tasks.
pub fn bicubic_backward<T: Float>(dy: &Tensor<T>, p: Bicubic) -> Result<Tensor<T>> {
    p.validate(OP_BWD)?;
    dy.expect_rank(OP_BWD, "dy", 3)?;
    let c = dy.dim(2);
    dy.expect_shape(OP_BWD, "dy", &[p.out_h, p.out_w, c])?;
    let ty = axis_taps::<T>(p.in_h, p.out_h, p.scale_h);
    let tx = axis_taps::<T>(p.in_w, p.out_w, p.scale_w);
    // For every input row, the (output row, weight) pairs that read it.
    let mut readers: Vec<Vec<(usize, T)>> = vec![Vec::new(); p.in_h];
    for (oy, (ids, ws)) in ty.idx.iter().zip(&ty.w).enumerate() {
        for (&iy, &wy) in ids.iter().zip(ws) {
            readers[iy].push((oy, wy));
        }
    }
    let g = dy.data();
    let out_row = p.out_w * c;
    let mut dx = vec![T::ZERO; p.in_h * p.in_w * c];
    if c > 0 {
        dx.par_chunks_mut(p.in_w * c)
            .zip(readers.par_iter())
            .for_each_init(
                || vec![T::ZERO; out_row],
                |r, (dxrow, rd)| {
                    if rd.is_empty() {
                        return;
                    }
                    r.fill(T::ZERO);
                    for &(oy, wy) in rd {
                        for (rv, &gv) in r.iter_mut().zip(&g[oy * out_row..(oy + 1) * out_row]) {
                            *rv += wy * gv;
                        }
                    }
                    for (ox, rx) in r.chunks_exact(c).enumerate() {
                        for (&ix, &wx) in tx.idx[ox].iter().zip(&tx.w[ox]) {
                            for (d, &rv) in dxrow[ix * c..(ix + 1) * c].iter_mut().zip(rx) {
                                *d += wx * rv;
                            }
                        }
                    }
                },
            );
    }
    Tensor::from_vec(dx, &[p.in_h, p.in_w, c])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_gradients, randn64, GradCheck};

    fn grad_check(p: Bicubic, c: usize) {
        let x = randn64(3, "grid", &[p.in_h, p.in_w, c]);
        check_gradients(
            &format!("bicubic {p:?}"),
            &[x],
            |xs| bicubic_forward(&xs[0], p),
            |_, w| Ok(vec![Some(bicubic_backward(w, p)?)]),
            GradCheck::default(),
        );
    }

    #[test]
    fn gradients_match_finite_differences() {
        grad_check(Bicubic::to_size(5, 5, 3, 3), 3);
        grad_check(Bicubic::to_size(4, 4, 7, 6), 2);
        grad_check(Bicubic::to_size(1, 3, 2, 5), 3);
        grad_check(Bicubic::with_scale_factor(5, 5, 0.61, 0.61).unwrap(), 3);
        grad_check(Bicubic::with_scale_factor(4, 3, 1.7, 2.3).unwrap(), 2);
        let dino = Bicubic::dino_pos_embed(14, 6, 6).unwrap();
        assert_eq!((dino.out_h, dino.out_w), (6, 6));
        grad_check(dino, 3);
    }

    #[test]
    fn identity_size_copies() {
        let x = randn64(4, "x", &[3, 5, 2]);
        let y = bicubic_forward(&x, Bicubic::to_size(3, 5, 3, 5)).unwrap();
        assert_eq!(x, y);
    }

    #[test]
    fn scale_factor_mapping_differs_from_size_mapping() {
        // 14 · (6.1/14) = 6.1 → 6 outputs, but the mapping uses 14/6.1, not 14/6.
        let x = randn64(5, "x", &[14, 14, 2]);
        let a = bicubic_forward(&x, Bicubic::dino_pos_embed(14, 6, 6).unwrap()).unwrap();
        let b = bicubic_forward(&x, Bicubic::to_size(14, 14, 6, 6)).unwrap();
        assert_eq!(a.shape(), b.shape());
        assert_ne!(a, b);
    }

    #[test]
    fn shape_errors_name_the_shapes() {
        let x = Tensor::<f64>::zeros(&[4, 5, 3]);
        let e = bicubic_forward(&x, Bicubic::to_size(5, 4, 2, 2))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bicubic_forward") && e.contains("[4, 5, 3]"),
            "{e}"
        );
        let e = bicubic_forward(&Tensor::<f64>::zeros(&[4, 5]), Bicubic::to_size(4, 5, 2, 2))
            .unwrap_err()
            .to_string();
        assert!(e.contains("[4, 5]"), "{e}");
        let e = bicubic_backward(
            &Tensor::<f64>::zeros(&[3, 2, 3]),
            Bicubic::to_size(4, 5, 2, 2),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("bicubic_backward") && e.contains("[3, 2, 3]"),
            "{e}"
        );
        assert!(bicubic_forward(&x, Bicubic::to_size(4, 5, 0, 2)).is_err());
        assert!(Bicubic::with_scale_factor(4, 5, 0.0, 1.0).is_err());
        assert!(Bicubic::with_scale_factor(4, 5, f64::NAN, 1.0).is_err());
        assert!(bicubic_forward(&x, Bicubic::with_scale_factor(4, 5, 0.1, 1.0).unwrap()).is_err());
    }
}
