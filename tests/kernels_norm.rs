//! kernels/norm.cu on the CPU emulation against `backend::cpu::norm` (the reference), on the
//! same bf16-rounded inputs, at awkward sizes (37 rows, 70 channels = 2 tiles + 6, 16-row
//! blocks, D = 129 and 200): bf16 outputs within 1e-2 (relative L2), fp32 statistics and
//! parameter gradients within 1e-5 (1e-4 where a bf16 ReLU mask enters), NaN never passes. The
//! column and per-block reductions also run in threads mode (real concurrency in a block).

use half::bf16;
use sdengine::backend::cpu::elementwise::{add_forward, relu_backward, relu_forward};
use sdengine::backend::cpu::norm::*;
use sdengine::backend::emu::norm::*;
use sdengine::backend::emu::Mode;
use sdengine::testing::rel_l2;
use sdengine::Tensor;

fn bf(t: &Tensor<f32>) -> Vec<bf16> {
    t.data().iter().map(|&x| bf16::from_f32(x)).collect()
}
fn f32s(x: &[bf16]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}
/// A bf16 tensor and its exact f32 image: both backends see the same values.
fn input(name: &str, shape: &[usize], offset: f32, scale: f64) -> (Vec<bf16>, Tensor<f32>) {
    let mut t = Tensor::randn_named(11, name, shape, scale);
    t.data_mut().iter_mut().for_each(|v| *v += offset);
    let b = bf(&t);
    let f = Tensor::from_vec(f32s(&b), shape).unwrap();
    (b, f)
}
#[track_caller]
fn close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_l2(got, want);
    eprintln!("{what}: rel_l2 {e:.2e}");
    assert!(e <= tol, "{what}: rel_l2 {e:.3e} > {tol:.0e}");
}
fn f64_to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

#[test]
fn l2norm_forward_backward() {
    let (r, d) = (37, 129);
    let (xb, x) = input("l2_x", &[r, d], 0.0, 1.0);
    let (gb, g) = input("l2_dy", &[r, d], 0.0, 1.0);
    let (want_y, ctx) = l2_normalize_forward(&x).unwrap();
    let want_dx = l2_normalize_backward(&g, &x, &ctx).unwrap();
    for (mode, threads) in [(Mode::Fibers, 128), (Mode::Threads, 64)] {
        let (y, n) = l2norm_forward(mode, &xb, r, d, threads).unwrap();
        close("l2norm y", &f32s(&y), want_y.data(), 1e-2);
        close("l2norm norm", &n, &ctx.norm, 1e-5);
        let dx = l2norm_backward(mode, &gb, &xb, &n, r, d, threads).unwrap();
        close("l2norm dx", &f32s(&dx), want_dx.data(), 1e-2);
    }
}

#[test]
fn prototypes_renorm_in_place() {
    let (k, d) = (37, 129);
    let w0 = Tensor::randn_named(12, "protos", &[k, d], 0.3);
    let (want, _) = l2_normalize_forward(&w0).unwrap();
    let mut w = w0.data().to_vec();
    let wb = prototypes_renorm(Mode::Fibers, &mut w, k, d, true, 96)
        .unwrap()
        .unwrap();
    close("renorm fp32", &w, want.data(), 1e-6);
    close("renorm bf16 copy", &f32s(&wb), want.data(), 1e-2);
    let mut w2 = w0.data().to_vec();
    assert!(prototypes_renorm(Mode::Fibers, &mut w2, k, d, false, 64)
        .unwrap()
        .is_none());
    assert_eq!(w2, w);
}

struct Bn {
    r: usize,
    c: usize,
    xb: Vec<bf16>,
    x: Tensor<f32>,
    gamma: Tensor<f32>,
    beta: Tensor<f32>,
}

fn bn_case() -> Bn {
    let (r, c) = (3 * 5 * 7, 70);
    let (xb, x) = input("bn_x", &[3, 5, 7, c], 0.5, 1.5);
    let gamma = Tensor::randn_named(13, "bn_g", &[c], 0.5);
    let beta = Tensor::randn_named(14, "bn_b", &[c], 0.5);
    Bn {
        r,
        c,
        xb,
        x: x.reshape(&[r, c]).unwrap(),
        gamma,
        beta,
    }
}

#[test]
fn batch_norm_statistics_finalize_and_apply() {
    let Bn {
        r,
        c,
        xb,
        x,
        gamma,
        beta,
    } = bn_case();
    let want = batch_norm_stats(&x).unwrap();
    for (mode, threads, rpb) in [(Mode::Fibers, 128, 16), (Mode::Threads, 96, 40)] {
        let (s, q) = bn_stats(mode, &xb, r, c, rpb, threads).unwrap();
        close("bn sum", &s, &f64_to_f32(&want.sum), 1e-5);
        close("bn sumsq", &q, &f64_to_f32(&want.sumsq), 1e-5);
    }
    let (s, q) = bn_stats(Mode::Fibers, &xb, r, c, 16, 64).unwrap();
    let params = BatchNormParams::default();
    let (mut rm, mut rv) = (Tensor::full(&[c], 0.1f32), Tensor::full(&[c], 0.9f32));
    let stats = batch_norm_finalize(&want, &mut rm, &mut rv, params).unwrap();
    let (mut grm, mut grv) = (vec![0.1f32; c], vec![0.9f32; c]);
    let (mean, invstd) =
        bn_finalize(Mode::Fibers, &s, &q, r, 1e-5, 0.1, &mut grm, &mut grv, 64).unwrap();
    close("bn mean", &mean, &stats.mean, 1e-5);
    close("bn invstd", &invstd, &stats.invstd, 1e-5);
    close("bn running mean", &grm, rm.data(), 1e-5);
    close("bn running var", &grv, rv.data(), 1e-5);

    let ch = BnChannels {
        mean: &mean,
        invstd: &invstd,
        gamma: gamma.data(),
        beta: beta.data(),
    };
    let (rb, res) = input("bn_res", &[r, c], 0.0, 1.0);
    for relu in [false, true] {
        let p = BatchNormParams { relu, ..params };
        let (want_y, _) = batch_norm_apply(&x, &gamma, &beta, stats.clone(), p).unwrap();
        let y = bn_apply(Mode::Fibers, &xb, None, ch, r, c, relu, 128).unwrap();
        close(
            &format!("bn apply relu={relu}"),
            &f32s(&y),
            want_y.data(),
            1e-2,
        );
        // With a residual: relu?(bn(x) + r), composed from the reference ops.
        let p0 = BatchNormParams {
            relu: false,
            ..params
        };
        let (bn, _) = batch_norm_apply(&x, &gamma, &beta, stats.clone(), p0).unwrap();
        let mut want_z = add_forward(&bn, &res).unwrap();
        if relu {
            want_z = relu_forward(&want_z).unwrap();
        }
        let z = bn_apply(Mode::Fibers, &xb, Some(&rb), ch, r, c, relu, 96).unwrap();
        close(
            &format!("bn apply + residual relu={relu}"),
            &f32s(&z),
            want_z.data(),
            1e-2,
        );
        assert!(!relu || z.iter().all(|v| v.to_f32() >= 0.0));
    }
}

#[test]
fn batch_norm_backward_training_eval_relu_residual() {
    let Bn {
        r,
        c,
        xb,
        x,
        gamma,
        beta,
    } = bn_case();
    let (gb, dy) = input("bn_dy", &[r, c], 0.0, 1.0);
    let (rb, res) = input("bn_res", &[r, c], 0.0, 1.0);
    let partials = batch_norm_stats(&x).unwrap();
    for (training, relu, residual, mode) in [
        (true, false, false, Mode::Threads),
        (true, true, false, Mode::Fibers),
        (true, true, true, Mode::Fibers),
        (false, true, false, Mode::Fibers),
    ] {
        let what = format!("bn bwd training={training} relu={relu} residual={residual}");
        let params = BatchNormParams {
            training,
            relu: relu && !residual,
            ..Default::default()
        };
        let (mut rm, mut rv) = (Tensor::full(&[c], 0.1f32), Tensor::full(&[c], 0.9f32));
        let stats = if training {
            batch_norm_finalize(&partials, &mut rm, &mut rv, params).unwrap()
        } else {
            batch_norm_eval_stats(&rm, &rv, 1e-5).unwrap()
        };
        let (bn_y, ctx) = batch_norm_apply(&x, &gamma, &beta, stats.clone(), params).unwrap();
        let ch = BnChannels {
            mean: &stats.mean,
            invstd: &stats.invstd,
            gamma: gamma.data(),
            beta: beta.data(),
        };
        let res_in = residual.then_some(&rb[..]);
        let y = bn_apply(Mode::Fibers, &xb, res_in, ch, r, c, relu, 128).unwrap();
        // Reference gradient into the BN: dy masked by the ReLU of the sum when there is a residual.
        let dy_bn = if residual && relu {
            let z = add_forward(&bn_y, &res).unwrap();
            relu_backward(&dy, &relu_forward(&z).unwrap()).unwrap()
        } else {
            dy.clone()
        };
        let want_p = batch_norm_backward_reduce(&dy_bn, &x, &ctx).unwrap();
        let want_dx = batch_norm_backward_apply(&dy_bn, &x, &ctx, &want_p).unwrap();
        let (want_dg, want_db) = batch_norm_param_grads(&want_p, &ctx).unwrap();

        let y_mask = relu.then_some(&y[..]);
        let (sdy, sdx) =
            bn_backward_reduce(mode, &gb, &xb, y_mask, &stats.mean, r, c, 16, 64).unwrap();
        let tol = if relu { 1e-4 } else { 1e-5 };
        close(
            &format!("{what}: sum dy"),
            &sdy,
            &f64_to_f32(&want_p.sum_dy),
            tol,
        );
        close(
            &format!("{what}: sum dy xmu"),
            &sdx,
            &f64_to_f32(&want_p.sum_dy_xmu),
            tol,
        );
        let (dg, db) = bn_param_grads(mode, &sdy, &sdx, &stats.invstd, 64).unwrap();
        close(&format!("{what}: dgamma"), &dg, want_dg.data(), tol);
        close(&format!("{what}: dbeta"), &db, want_db.data(), tol);
        let (dx, dres) = bn_backward_apply(
            mode,
            &gb,
            &xb,
            y_mask,
            ch,
            (&sdy, &sdx),
            r,
            r,
            c,
            training,
            residual,
            96,
        )
        .unwrap();
        close(&format!("{what}: dx"), &f32s(&dx), want_dx.data(), 1e-2);
        if residual {
            close(
                &format!("{what}: d residual"),
                &f32s(&dres.unwrap()),
                dy_bn.data(),
                1e-2,
            );
        }
    }
}

#[test]
fn layer_norm_forward_backward() {
    let (r, d) = (37, 200);
    let (xb, x) = input("ln_x", &[r, d], 0.3, 1.2);
    let (gb, dy) = input("ln_dy", &[r, d], 0.0, 1.0);
    let gamma = Tensor::randn_named(15, "ln_g", &[d], 0.5);
    let beta = Tensor::randn_named(16, "ln_b", &[d], 0.5);
    let (want_y, ctx) = layer_norm_forward(&x, &gamma, &beta, 1e-6).unwrap();
    let want = layer_norm_backward(&dy, &x, &gamma, &ctx).unwrap();
    for (mode, threads, rpb) in [(Mode::Fibers, 128, 5), (Mode::Threads, 64, 11)] {
        let (y, mean, rstd) =
            layernorm_forward(mode, &xb, gamma.data(), beta.data(), r, d, 1e-6, threads).unwrap();
        close("ln y", &f32s(&y), want_y.data(), 1e-2);
        close("ln mean", &mean, &ctx.mean, 1e-5);
        close("ln rstd", &rstd, &ctx.rstd, 1e-5);
        let (dx, dg, db) = layernorm_backward(
            mode,
            &gb,
            &xb,
            gamma.data(),
            &mean,
            &rstd,
            r,
            d,
            rpb,
            threads,
        )
        .unwrap();
        close("ln dx", &f32s(&dx), want.dx.data(), 1e-2);
        close("ln dgamma", &dg, want.dgamma.data(), 1e-5);
        close("ln dbeta", &db, want.dbeta.data(), 1e-5);
    }
}

#[test]
fn nan_propagates_and_bad_shapes_are_errors() {
    let (r, d) = (4, 40);
    let (mut xb, _) = input("nan_x", &[r, d], 0.0, 1.0);
    xb[d + 1] = bf16::NAN;
    let (y, n) = l2norm_forward(Mode::Fibers, &xb, r, d, 32).unwrap();
    assert!(n[1].is_nan() && y[d..2 * d].iter().all(|v| v.is_nan()));
    let dx = l2norm_backward(Mode::Fibers, &xb, &xb, &n, r, d, 32).unwrap();
    assert!(dx[d..2 * d].iter().all(|v| v.is_nan()) && dx[..d].iter().all(|v| v.is_finite()));
    let (s, _) = bn_stats(Mode::Fibers, &xb, r, d, 3, 32).unwrap();
    assert!(s[1].is_nan() && s[0].is_finite());
    let g = vec![1.0f32; d];
    let (y, _, _) = layernorm_forward(Mode::Fibers, &xb, &g, &g, r, d, 1e-6, 32).unwrap();
    assert!(y[d..2 * d].iter().all(|v| v.is_nan()) && y[..d].iter().all(|v| v.is_finite()));
    assert!(l2norm_forward(Mode::Fibers, &xb, r, d + 1, 32).is_err());
    assert!(bn_stats(Mode::Fibers, &xb, r, d, 0, 32).is_err());
    assert!(layernorm_forward(Mode::Fibers, &xb, &g[1..], &g, r, d, 1e-6, 32).is_err());
}
