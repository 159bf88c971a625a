//! Fully connected layers: the plain linear layer (`y = x·wᵀ + b`) of every ViT block and head,
//! and the weight-normalised linear layer (`torch.nn.utils.weight_norm(nn.Linear(.., bias=False))`)
//! that closes DINO's projection head.
//!
//! Layout: the input is `[..., in]` with every leading dimension flattened into rows (tokens of
//! `[B, N, C]` are just `B·N` rows), weights are `[out, in]` as in PyTorch, outputs `[..., out]`.
//! Every product is one call to [`matmul`] (a cache-blocked AVX-512 GEMM): the row-major `[out, in]`
//! weight is read as its transpose through strides, so no weight is ever copied or transposed.
//! Bias is fused into the forward GEMM by pre-filling the output rows and accumulating.

use super::matmul::matmul;
use super::softmax::lane_sum;
use crate::error::{Error, Result};
use crate::tensor::{Float, Tensor};
use rayon::prelude::*;

/// Columns of the bias gradient summed by one rayon task (contiguous in each row of `dy`).
const DB_COLS_PER_TASK: usize = 64;

/// Splits `x: [..., in]` into (rows, in), checking it against a weight of shape `[out, in]`.
fn rows_of<T: Float>(
    op: &'static str,
    x: &Tensor<T>,
    w: &Tensor<T>,
) -> Result<(usize, usize, usize)> {
    w.expect_rank(op, "weight", 2)?;
    let (out, inp) = (w.shape()[0], w.shape()[1]);
    if x.rank() == 0 || x.shape()[x.rank() - 1] != inp {
        return Err(Error::shape(
            op,
            format!(
                "input has shape {:?}, weight has shape {:?}: the input's last dimension must be {inp}",
                x.shape(),
                w.shape()
            ),
        ));
    }
    let rows = x.shape()[..x.rank() - 1].iter().product();
    Ok((rows, inp, out))
}

/// The output shape `[..., out]` of a linear layer on `x: [..., in]`.
fn out_shape(x: &[usize], out: usize) -> Vec<usize> {
    let mut s = x.to_vec();
    if let Some(last) = s.last_mut() {
        *last = out;
    }
    s
}

/// Checks the upstream gradient `dy` against the input's shape with the last dimension `out`.
fn check_dy<T: Float>(op: &'static str, dy: &Tensor<T>, x: &Tensor<T>, out: usize) -> Result<()> {
    let want = out_shape(x.shape(), out);
    if dy.shape() != want.as_slice() {
        return Err(Error::shape(
            op,
            format!(
                "dy has shape {:?}, expected {:?} (input {:?}, {out} outputs)",
                dy.shape(),
                want,
                x.shape()
            ),
        ));
    }
    Ok(())
}

/// `db[j] = Σ_rows dy[r, j]`: rayon tasks own blocks of columns and walk every row, so each inner
/// loop runs along a contiguous slice of a row and the sum order (hence the result) is fixed.
fn column_sums<T: Float>(dy: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut db = vec![T::ZERO; cols];
    db.par_chunks_mut(DB_COLS_PER_TASK)
        .enumerate()
        .for_each(|(blk, acc)| {
            let c0 = blk * DB_COLS_PER_TASK;
            for r in 0..rows {
                let src = &dy[r * cols + c0..r * cols + c0 + acc.len()];
                for (a, &v) in acc.iter_mut().zip(src) {
                    *a += v;
                }
            }
        });
    db
}

/// Linear layer forward: `y[r, :] = x[r, :]·wᵀ + b` for every row `r` of `x: [..., in]`,
/// with `w: [out, in]` (PyTorch layout) and an optional `b: [out]`; returns `y: [..., out]`.
///
/// The bias is copied into each output row first and the GEMM accumulates onto it, so the bias
/// costs one write pass and no separate read-modify-write pass. The backward needs only `x` and
/// `w`, which the caller already holds, so there is no saved context.
pub fn linear_forward<T: Float>(
    x: &Tensor<T>,
    w: &Tensor<T>,
    bias: Option<&Tensor<T>>,
) -> Result<Tensor<T>> {
    const OP: &str = "linear_forward";
    let (rows, inp, out) = rows_of(OP, x, w)?;
    let mut y = Tensor::zeros(&out_shape(x.shape(), out));
    let accumulate = match bias {
        Some(b) => {
            b.expect_shape(OP, "bias", &[out])?;
            if out > 0 {
                let bd = b.data();
                y.data_mut()
                    .par_chunks_mut(out)
                    .with_min_len(64)
                    .for_each(|row| row.copy_from_slice(bd));
            }
            true
        }
        None => false,
    };
    matmul(
        rows,
        out,
        inp,
        x.data(),
        false,
        w.data(),
        true,
        y.data_mut(),
        accumulate,
    );
    Ok(y)
}

/// Which gradients [`linear_backward`] computes (the weight gradient is always computed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearNeeds {
    /// Compute `dx`; false when the input is detached (e.g. the first layer, or a frozen trunk).
    pub dx: bool,
    /// Compute `db`; false for a layer without bias.
    pub db: bool,
}

impl LinearNeeds {
    /// Every gradient: `dx`, `dw` and `db`.
    pub const ALL: LinearNeeds = LinearNeeds { dx: true, db: true };
}

/// Gradients of a linear layer. `None` where [`LinearNeeds`] asked for none.
#[derive(Clone, Debug)]
pub struct LinearGrads<T> {
    /// `dx = dy·w`, shape of `x` (`[..., in]`).
    pub dx: Option<Tensor<T>>,
    /// `dw = dyᵀ·x`, `[out, in]`.
    pub dw: Tensor<T>,
    /// `db = Σ_rows dy`, `[out]`.
    pub db: Option<Tensor<T>>,
}

/// Linear layer backward for `y = x·wᵀ + b`: `dx = dy·w`, `dw = dyᵀ·x` (summed over all rows of
/// all leading dimensions), `db = Σ_rows dy`. `dy` has the output's shape `[..., out]`.
///
/// Both products read `dy`, `x` and `w` in place through transposed strides; `dx` is skipped
/// when `needs.dx` is false, which saves a third of the backward's work on detached inputs.
pub fn linear_backward<T: Float>(
    dy: &Tensor<T>,
    x: &Tensor<T>,
    w: &Tensor<T>,
    needs: LinearNeeds,
) -> Result<LinearGrads<T>> {
    const OP: &str = "linear_backward";
    let (rows, inp, out) = rows_of(OP, x, w)?;
    check_dy(OP, dy, x, out)?;
    let dx = if needs.dx {
        let mut dx = Tensor::zeros(x.shape());
        matmul(
            rows,
            inp,
            out,
            dy.data(),
            false,
            w.data(),
            false,
            dx.data_mut(),
            false,
        );
        Some(dx)
    } else {
        None
    };
    let mut dw = Tensor::zeros(&[out, inp]);
    matmul(
        out,
        inp,
        rows,
        dy.data(),
        true,
        x.data(),
        false,
        dw.data_mut(),
        false,
    );
    let db = if needs.db {
        Some(Tensor::from_vec(column_sums(dy.data(), rows, out), &[out])?)
    } else {
        None
    };
    Ok(LinearGrads { dx, dw, db })
}

/// What [`weight_norm_linear_forward`] saves for the backward.
#[derive(Clone, Debug)]
pub struct WeightNormCtx<T> {
    /// The effective weight `W = g·v/‖v_row‖`, `[out, in]` (also what the layer exports as).
    pub weight: Tensor<T>,
    /// The row norms `‖v_o‖`, `[out]`.
    pub norm: Tensor<T>,
}

/// The effective weight of a weight-normalised layer: `W[o, :] = g[o]·v[o, :]/‖v[o, :]‖` with
/// `v: [out, in]` (`weight_v`) and `g: [out]` (`weight_g`, PyTorch's `[out, 1]` flattened).
/// Returns `(W, norms)`. A zero row of `v` gives a non-finite row of `W`, as in PyTorch.
pub fn weight_norm_weight<T: Float>(
    v: &Tensor<T>,
    g: &Tensor<T>,
) -> Result<(Tensor<T>, Tensor<T>)> {
    const OP: &str = "weight_norm_weight";
    v.expect_rank(OP, "v", 2)?;
    let (out, inp) = (v.shape()[0], v.shape()[1]);
    g.expect_shape(OP, "g", &[out])?;
    let mut w = Tensor::zeros(&[out, inp]);
    let mut norm = vec![T::ZERO; out];
    if inp > 0 {
        w.data_mut()
            .par_chunks_mut(inp)
            .zip(norm.par_iter_mut())
            .zip(v.data().par_chunks(inp).zip(g.data().par_iter()))
            .with_min_len(16)
            .for_each(|((wr, n), (vr, &gv))| {
                let ss = lane_sum(vr, vr, |a, _| a * a);
                *n = ss.sqrt();
                let s = gv / *n;
                for (o, &a) in wr.iter_mut().zip(vr) {
                    *o = s * a;
                }
            });
    }
    Ok((w, Tensor::from_vec(norm, &[out])?))
}

/// Weight-normalised linear forward (no bias, as DINO's last layer):
/// `y = x·Wᵀ` with `W = g·v/‖v_row‖`, `x: [..., in]`, `v: [out, in]`, `g: [out]`; returns
/// `y: [..., out]` and the context (`W` and the row norms).
///
/// `W` is materialised once (`out·in` values, far fewer than the `rows·out` outputs of DINO's
/// head), which turns the layer into one GEMM and gives the backward `dx = dy·W` directly.
pub fn weight_norm_linear_forward<T: Float>(
    x: &Tensor<T>,
    v: &Tensor<T>,
    g: &Tensor<T>,
) -> Result<(Tensor<T>, WeightNormCtx<T>)> {
    const OP: &str = "weight_norm_linear_forward";
    let (rows, inp, out) = rows_of(OP, x, v)?;
    g.expect_shape(OP, "g", &[out])?;
    let (weight, norm) = weight_norm_weight(v, g)?;
    let mut y = Tensor::zeros(&out_shape(x.shape(), out));
    matmul(
        rows,
        out,
        inp,
        x.data(),
        false,
        weight.data(),
        true,
        y.data_mut(),
        false,
    );
    Ok((y, WeightNormCtx { weight, norm }))
}

/// Which gradients [`weight_norm_linear_backward`] computes (`dv` is always computed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WeightNormNeeds {
    /// Compute `dx`; false when the input is detached.
    pub dx: bool,
    /// Compute `dg`; false when `g` is frozen (DINO's `norm_last_layer=True`, and the teacher).
    pub dg: bool,
}

impl WeightNormNeeds {
    /// Every gradient: `dx`, `dv` and `dg`.
    pub const ALL: WeightNormNeeds = WeightNormNeeds { dx: true, dg: true };
}

/// Gradients of a weight-normalised linear layer. `None` where [`WeightNormNeeds`] asked for none.
#[derive(Clone, Debug)]
pub struct WeightNormGrads<T> {
    /// `dx = dy·W`, shape of `x`.
    pub dx: Option<Tensor<T>>,
    /// `dv[o] = (g_o/‖v_o‖)·(dW_o − (dW_o·v_o)/‖v_o‖²·v_o)`, `[out, in]`.
    pub dv: Tensor<T>,
    /// `dg[o] = dW_o·v_o/‖v_o‖`, `[out]`.
    pub dg: Option<Tensor<T>>,
}

/// Weight-normalised linear backward. With `dW = dyᵀ·x` the gradient of the effective weight,
/// the chain rule through `W_o = g_o·v_o/‖v_o‖` gives `dg_o = dW_o·v_o/‖v_o‖` and
/// `dv_o = (g_o/‖v_o‖)·(dW_o − (dW_o·v_o)/‖v_o‖²·v_o)` (the component of `dW_o` along `v_o` is
/// removed: scaling `v_o` does not change `W`). `dv` is projected even when `g` is frozen.
///
/// `dW` is computed by one GEMM straight into the `dv` buffer and projected in place row by row,
/// so nothing beyond `W` (saved by the forward) and the gradients themselves is allocated.
pub fn weight_norm_linear_backward<T: Float>(
    dy: &Tensor<T>,
    x: &Tensor<T>,
    v: &Tensor<T>,
    g: &Tensor<T>,
    ctx: &WeightNormCtx<T>,
    needs: WeightNormNeeds,
) -> Result<WeightNormGrads<T>> {
    const OP: &str = "weight_norm_linear_backward";
    let (rows, inp, out) = rows_of(OP, x, v)?;
    g.expect_shape(OP, "g", &[out])?;
    ctx.weight.expect_shape(OP, "saved weight", &[out, inp])?;
    ctx.norm.expect_shape(OP, "saved norm", &[out])?;
    check_dy(OP, dy, x, out)?;
    let dx = if needs.dx {
        let mut dx = Tensor::zeros(x.shape());
        matmul(
            rows,
            inp,
            out,
            dy.data(),
            false,
            ctx.weight.data(),
            false,
            dx.data_mut(),
            false,
        );
        Some(dx)
    } else {
        None
    };
    let mut dv = Tensor::zeros(&[out, inp]);
    matmul(
        out,
        inp,
        rows,
        dy.data(),
        true,
        x.data(),
        false,
        dv.data_mut(),
        false,
    );
    let mut dg = vec![T::ZERO; out];
    if inp > 0 {
        dv.data_mut()
            .par_chunks_mut(inp)
            .zip(dg.par_iter_mut())
            .zip(v.data().par_chunks(inp))
            .zip(ctx.norm.data().par_iter().zip(g.data().par_iter()))
            .with_min_len(16)
            .for_each(|(((dvr, dgo), vr), (&n, &gv))| {
                let dot = lane_sum(dvr, vr, |a, b| a * b);
                let inv = T::one() / n;
                *dgo = dot * inv;
                let s = gv * inv;
                let c = s * dot * inv * inv;
                for (d, &a) in dvr.iter_mut().zip(vr) {
                    *d = s * *d - c * a;
                }
            });
    }
    let dg = if needs.dg {
        Some(Tensor::from_vec(dg, &[out])?)
    } else {
        None
    };
    Ok(WeightNormGrads { dx, dv, dg })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_gradients, randn64, GradCheck};

    fn lin_check(name: &str, xshape: &[usize], out: usize, with_bias: bool) {
        let inp = *xshape.last().unwrap();
        let mut inputs = vec![randn64(1, "x", xshape), randn64(2, "w", &[out, inp])];
        if with_bias {
            inputs.push(randn64(3, "b", &[out]));
        }
        check_gradients(
            name,
            &inputs,
            |xs| linear_forward(&xs[0], &xs[1], xs.get(2)),
            |xs, dy| {
                let g = linear_backward(
                    dy,
                    &xs[0],
                    &xs[1],
                    LinearNeeds {
                        dx: true,
                        db: with_bias,
                    },
                )?;
                let mut v = vec![g.dx, Some(g.dw)];
                if with_bias {
                    v.push(g.db);
                }
                Ok(v)
            },
            GradCheck::default(),
        );
    }

    #[test]
    fn linear_gradients_with_bias() {
        lin_check("linear_bias", &[5, 7], 3, true);
    }

    #[test]
    fn linear_gradients_without_bias() {
        lin_check("linear_nobias", &[4, 3], 5, false);
    }

    #[test]
    fn linear_gradients_leading_dims() {
        lin_check("linear_lead", &[2, 3, 5], 4, true);
    }

    #[test]
    fn linear_matches_naive_and_skips_dx() {
        let x = randn64(4, "x", &[3, 4]);
        let w = randn64(5, "w", &[2, 4]);
        let b = randn64(6, "b", &[2]);
        let y = linear_forward(&x, &w, Some(&b)).unwrap();
        for r in 0..3 {
            for o in 0..2 {
                let mut s = b.data()[o];
                for i in 0..4 {
                    s += x.data()[r * 4 + i] * w.data()[o * 4 + i];
                }
                assert!((y.data()[r * 2 + o] - s).abs() < 1e-12);
            }
        }
        let g = linear_backward(
            &y,
            &x,
            &w,
            LinearNeeds {
                dx: false,
                db: false,
            },
        )
        .unwrap();
        assert!(g.dx.is_none() && g.db.is_none());
        assert_eq!(g.dw.shape(), &[2, 4]);
    }

    #[test]
    fn linear_shape_errors() {
        let x = randn64(0, "x", &[2, 3, 5]);
        let w = randn64(0, "w", &[4, 6]);
        let e = linear_forward(&x, &w, None).unwrap_err().to_string();
        assert!(
            e.contains("linear_forward") && e.contains("[2, 3, 5]") && e.contains("[4, 6]"),
            "{e}"
        );
        let w = randn64(0, "w", &[4, 5]);
        let b = randn64(0, "b", &[3]);
        let e = linear_forward(&x, &w, Some(&b)).unwrap_err().to_string();
        assert!(e.contains("bias") && e.contains("[3]"), "{e}");
        let dy = randn64(0, "dy", &[2, 3, 5]);
        let e = linear_backward(&dy, &x, &w, LinearNeeds::ALL)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("linear_backward") && e.contains("[2, 3, 4]"),
            "{e}"
        );
        let w3 = randn64(0, "w", &[4, 5, 1]);
        assert!(linear_forward(&x, &w3, None).is_err());
    }

    fn wn_check(name: &str, xshape: &[usize], out: usize, train_g: bool) {
        let inp = *xshape.last().unwrap();
        let inputs = vec![
            randn64(11, "x", xshape),
            randn64(12, "v", &[out, inp]),
            randn64(13, "g", &[out]),
        ];
        check_gradients(
            name,
            &inputs,
            |xs| Ok(weight_norm_linear_forward(&xs[0], &xs[1], &xs[2])?.0),
            |xs, dy| {
                let (_, ctx) = weight_norm_linear_forward(&xs[0], &xs[1], &xs[2])?;
                let g = weight_norm_linear_backward(
                    dy,
                    &xs[0],
                    &xs[1],
                    &xs[2],
                    &ctx,
                    WeightNormNeeds {
                        dx: true,
                        dg: train_g,
                    },
                )?;
                assert_eq!(g.dg.is_some(), train_g);
                Ok(vec![g.dx, Some(g.dv), g.dg])
            },
            GradCheck::default(),
        );
    }

    #[test]
    fn weight_norm_gradients_g_trainable() {
        wn_check("wn_train_g", &[5, 6], 4, true);
        wn_check("wn_train_g_lead", &[2, 3, 5], 3, true);
    }

    #[test]
    fn weight_norm_gradients_g_frozen() {
        wn_check("wn_frozen_g", &[3, 7], 5, false);
    }

    #[test]
    fn weight_norm_weight_has_norm_g() {
        let v = randn64(7, "v", &[3, 5]);
        let g = randn64(8, "g", &[3]);
        let (w, n) = weight_norm_weight(&v, &g).unwrap();
        for o in 0..3 {
            let wn: f64 = w.data()[o * 5..o * 5 + 5]
                .iter()
                .map(|a| a * a)
                .sum::<f64>()
                .sqrt();
            assert!((wn - g.data()[o].abs()).abs() < 1e-12);
            let vn: f64 = v.data()[o * 5..o * 5 + 5]
                .iter()
                .map(|a| a * a)
                .sum::<f64>()
                .sqrt();
            assert!((vn - n.data()[o]).abs() < 1e-12);
        }
    }

    #[test]
    fn weight_norm_shape_errors() {
        let x = randn64(0, "x", &[2, 5]);
        let v = randn64(0, "v", &[4, 5]);
        let g = randn64(0, "g", &[4, 1]);
        let e = weight_norm_linear_forward(&x, &v, &g)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("weight_norm_linear_forward") && e.contains("[4, 1]"),
            "{e}"
        );
        let g = randn64(0, "g", &[4]);
        let x6 = randn64(0, "x", &[2, 6]);
        let e = weight_norm_linear_forward(&x6, &v, &g)
            .unwrap_err()
            .to_string();
        assert!(e.contains("[2, 6]") && e.contains("[4, 5]"), "{e}");
        let (_, ctx) = weight_norm_linear_forward(&x, &v, &g).unwrap();
        let dy = randn64(0, "dy", &[3, 4]);
        let e = weight_norm_linear_backward(&dy, &x, &v, &g, &ctx, WeightNormNeeds::ALL)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("weight_norm_linear_backward") && e.contains("[3, 4]"),
            "{e}"
        );
    }
}
