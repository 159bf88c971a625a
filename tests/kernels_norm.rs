//! The device ops of kernels/norm.cu (`backend::device::norm`) on the CPU emulation against
//! `backend::cpu::norm` (the reference), on the same bf16-rounded inputs, at awkward sizes (37
//! rows, 70 channels = 2 tiles + 6, 16-row blocks, D = 129 and 200): bf16 outputs within 1e-2
//! (relative L2), fp32 statistics and parameter gradients within 1e-5 (1e-4 where a bf16 ReLU
//! mask enters), NaN never passes. The column and per-block reductions also run in threads mode
//! (real concurrency in a block). Outputs come from `Exec::alloc`, which the emulation poisons
//! with NaN: a kernel that leaves any element unwritten fails here.

use half::bf16;
use sdengine::backend::cpu::elementwise::{add_forward, relu_backward, relu_forward};
use sdengine::backend::cpu::norm::*;
use sdengine::backend::device::norm as dev;
use sdengine::backend::device::{DevBuf, Emu, Exec, HostBuf, Mode};
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
fn up<T: sdengine::backend::device::Elem>(ex: &Emu, v: &[T]) -> HostBuf<T> {
    ex.upload(v).unwrap()
}
fn down(ex: &Emu, b: &HostBuf<f32>) -> Vec<f32> {
    ex.download(b).unwrap()
}
fn down_bf(ex: &Emu, b: &HostBuf<bf16>) -> Vec<f32> {
    ex.download_bf16(b).unwrap()
}
#[track_caller]
fn all_finite(what: &str, v: &[f32]) {
    let bad = v.iter().filter(|x| !x.is_finite()).count();
    assert_eq!(bad, 0, "{what}: {bad} of {} values not finite", v.len());
}

#[test]
fn l2norm_forward_backward() {
    let (r, d) = (37, 129);
    let (xb, x) = input("l2_x", &[r, d], 0.0, 1.0);
    let (gb, g) = input("l2_dy", &[r, d], 0.0, 1.0);
    let (want_y, ctx) = l2_normalize_forward(&x).unwrap();
    let want_dx = l2_normalize_backward(&g, &x, &ctx).unwrap();
    for (mode, threads) in [(Mode::Fibers, 128), (Mode::Threads, 64)] {
        let ex = Emu::new(mode);
        let (xd, gd) = (up(&ex, &xb), up(&ex, &gb));
        let out = dev::l2norm_forward(&ex, &xd, r, d, threads).unwrap();
        close("l2norm y", &down_bf(&ex, &out.y), want_y.data(), 1e-2);
        close("l2norm norm", &down(&ex, &out.norm), &ctx.norm, 1e-5);
        let dx = dev::l2norm_backward(&ex, &gd, &xd, &out.norm, r, d, threads).unwrap();
        close("l2norm dx", &down_bf(&ex, &dx), want_dx.data(), 1e-2);
    }
}

#[test]
fn prototypes_renorm_in_place() {
    let (k, d) = (37, 129);
    let w0 = Tensor::randn_named(12, "protos", &[k, d], 0.3);
    let (want, _) = l2_normalize_forward(&w0).unwrap();
    let ex = Emu::new(Mode::Fibers);
    let mut w = up(&ex, w0.data());
    let mut wb = ex.alloc::<bf16>(k * d).unwrap();
    dev::prototypes_renorm(&ex, &mut w, Some(&mut wb), k, d, 96).unwrap();
    let w = down(&ex, &w);
    close("renorm fp32", &w, want.data(), 1e-6);
    close("renorm bf16 copy", &down_bf(&ex, &wb), want.data(), 1e-2);
    // Without the copy, at another block size and in threads mode: bit-identical rows (a warp
    // per row whatever the block).
    let ex = Emu::new(Mode::Threads);
    let mut w2 = up(&ex, w0.data());
    dev::prototypes_renorm(&ex, &mut w2, None, k, d, 64).unwrap();
    assert_eq!(down(&ex, &w2), w);
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
        let ex = Emu::new(mode);
        let s = dev::bn_stats(&ex, &up(&ex, &xb), r, c, rpb, threads).unwrap();
        close("bn sum", &down(&ex, &s.sum), &f64_to_f32(&want.sum), 1e-5);
        close(
            "bn sumsq",
            &down(&ex, &s.sumsq),
            &f64_to_f32(&want.sumsq),
            1e-5,
        );
    }
    let ex = Emu::new(Mode::Fibers);
    let xd = up(&ex, &xb);
    let s = dev::bn_stats(&ex, &xd, r, c, 16, 64).unwrap();
    let params = BatchNormParams::default();
    let (mut rm, mut rv) = (Tensor::full(&[c], 0.1f32), Tensor::full(&[c], 0.9f32));
    let stats = batch_norm_finalize(&want, &mut rm, &mut rv, params).unwrap();
    let (mut grm, mut grv) = (up(&ex, &vec![0.1f32; c]), up(&ex, &vec![0.9f32; c]));
    let st = dev::bn_finalize(&ex, &s.sum, &s.sumsq, r, 1e-5, 0.1, &mut grm, &mut grv, 64).unwrap();
    close("bn mean", &down(&ex, &st.mean), &stats.mean, 1e-5);
    close("bn invstd", &down(&ex, &st.invstd), &stats.invstd, 1e-5);
    close("bn running mean", &down(&ex, &grm), rm.data(), 1e-5);
    close("bn running var", &down(&ex, &grv), rv.data(), 1e-5);

    let (gd, bd) = (up(&ex, gamma.data()), up(&ex, beta.data()));
    let ch = dev::BnChannels {
        mean: &st.mean,
        invstd: &st.invstd,
        gamma: &gd,
        beta: &bd,
    };
    let (rb, res) = input("bn_res", &[r, c], 0.0, 1.0);
    let rd = up(&ex, &rb);
    for relu in [false, true] {
        let p = BatchNormParams { relu, ..params };
        let (want_y, _) = batch_norm_apply(&x, &gamma, &beta, stats.clone(), p).unwrap();
        let y = dev::bn_apply(&ex, &xd, None, ch, r, c, relu, 128).unwrap();
        close(
            &format!("bn apply relu={relu}"),
            &down_bf(&ex, &y),
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
        let z = down_bf(
            &ex,
            &dev::bn_apply(&ex, &xd, Some(&rd), ch, r, c, relu, 96).unwrap(),
        );
        close(
            &format!("bn apply + residual relu={relu}"),
            &z,
            want_z.data(),
            1e-2,
        );
        assert!(!relu || z.iter().all(|&v| v >= 0.0));
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
        let ex = Emu::new(mode);
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
        let (md, id) = (up(&ex, &stats.mean), up(&ex, &stats.invstd));
        let (gd, bd) = (up(&ex, gamma.data()), up(&ex, beta.data()));
        let ch = dev::BnChannels {
            mean: &md,
            invstd: &id,
            gamma: &gd,
            beta: &bd,
        };
        let (xd, gbd, rd) = (up(&ex, &xb), up(&ex, &gb), up(&ex, &rb));
        let res_in = residual.then_some(&rd);
        let y = dev::bn_apply(&ex, &xd, res_in, ch, r, c, relu, 128).unwrap();
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

        let y_mask = relu.then_some(&y);
        let s = dev::bn_backward_reduce(&ex, &gbd, &xd, y_mask, &md, r, c, 16, 64).unwrap();
        let tol = if relu { 1e-4 } else { 1e-5 };
        close(
            &format!("{what}: sum dy"),
            &down(&ex, &s.sum_dy),
            &f64_to_f32(&want_p.sum_dy),
            tol,
        );
        close(
            &format!("{what}: sum dy xmu"),
            &down(&ex, &s.sum_dy_xmu),
            &f64_to_f32(&want_p.sum_dy_xmu),
            tol,
        );
        let g = dev::bn_param_grads(&ex, &s.sum_dy, &s.sum_dy_xmu, &id, 64).unwrap();
        close(
            &format!("{what}: dgamma"),
            &down(&ex, &g.dgamma),
            want_dg.data(),
            tol,
        );
        close(
            &format!("{what}: dbeta"),
            &down(&ex, &g.dbeta),
            want_db.data(),
            tol,
        );
        let out = dev::bn_backward_apply(
            &ex,
            &gbd,
            &xd,
            y_mask,
            ch,
            (&s.sum_dy, &s.sum_dy_xmu),
            r,
            r,
            c,
            training,
            residual,
            96,
        )
        .unwrap();
        close(
            &format!("{what}: dx"),
            &down_bf(&ex, &out.dx),
            want_dx.data(),
            1e-2,
        );
        assert_eq!(out.dres.is_some(), residual);
        if let Some(dres) = &out.dres {
            close(
                &format!("{what}: d residual"),
                &down_bf(&ex, dres),
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
        let ex = Emu::new(mode);
        let (xd, gbd) = (up(&ex, &xb), up(&ex, &gb));
        let (gd, bd) = (up(&ex, gamma.data()), up(&ex, beta.data()));
        let f = dev::layernorm_forward(&ex, &xd, &gd, &bd, r, d, 1e-6, threads).unwrap();
        close("ln y", &down_bf(&ex, &f.y), want_y.data(), 1e-2);
        close("ln mean", &down(&ex, &f.mean), &ctx.mean, 1e-5);
        close("ln rstd", &down(&ex, &f.rstd), &ctx.rstd, 1e-5);
        let b = dev::layernorm_backward(&ex, &gbd, &xd, &gd, &f.mean, &f.rstd, r, d, rpb, threads)
            .unwrap();
        close("ln dx", &down_bf(&ex, &b.dx), want.dx.data(), 1e-2);
        close("ln dgamma", &down(&ex, &b.dgamma), want.dgamma.data(), 1e-5);
        close("ln dbeta", &down(&ex, &b.dbeta), want.dbeta.data(), 1e-5);
    }
}

/// Every kernel writes all of its outputs: with finite inputs, nothing of the NaN poison of
/// `Exec::alloc` survives, including in the per-block partials (row groups that end early,
/// channel tiles that are partly past C, blocks whose last warps have no row).
#[test]
fn outputs_in_poisoned_memory_are_fully_written() {
    let (r, c) = (37, 70);
    let (xb, _) = input("p_x", &[r, c], 0.2, 1.0);
    let (gb, _) = input("p_dy", &[r, c], 0.0, 1.0);
    for mode in [Mode::Fibers, Mode::Threads] {
        let ex = Emu::new(mode);
        let (xd, gd) = (up(&ex, &xb), up(&ex, &gb));
        // Row kernels: 37 rows in blocks of 4 warps leave 3 idle warps in the last block.
        let l2 = dev::l2norm_forward(&ex, &xd, r, c, 128).unwrap();
        all_finite("l2norm y", &down_bf(&ex, &l2.y));
        all_finite("l2norm norm", &down(&ex, &l2.norm));
        let dx = dev::l2norm_backward(&ex, &gd, &xd, &l2.norm, r, c, 128).unwrap();
        all_finite("l2norm dx", &down_bf(&ex, &dx));
        let mut w = up(&ex, &f32s(&xb));
        let mut wb = ex.alloc::<bf16>(r * c).unwrap();
        dev::prototypes_renorm(&ex, &mut w, Some(&mut wb), r, c, 128).unwrap();
        all_finite("renorm bf16 copy", &down_bf(&ex, &wb));
        // Column reductions: 70 channels = 2 tiles + 6, 37 rows in groups of 16 (last: 5).
        let part = dev::bn_stats_partial(&ex, &xd, r, c, 16, 64).unwrap();
        assert_eq!(part.len(), 2 * 3 * c);
        all_finite("bn stats partials", &down(&ex, &part));
        let (s, q) = dev::sum_partials2(&ex, &part, 3, c, 64).unwrap();
        all_finite("bn sum", &down(&ex, &s));
        all_finite("bn sumsq", &down(&ex, &q));
        let (mut rm, mut rv) = (up(&ex, &vec![0.0f32; c]), up(&ex, &vec![1.0f32; c]));
        let st = dev::bn_finalize(&ex, &s, &q, r, 1e-5, 0.1, &mut rm, &mut rv, 64).unwrap();
        all_finite("bn mean", &down(&ex, &st.mean));
        all_finite("bn invstd", &down(&ex, &st.invstd));
        let (gam, bet) = (up(&ex, &vec![1.5f32; c]), up(&ex, &vec![0.25f32; c]));
        let ch = dev::BnChannels {
            mean: &st.mean,
            invstd: &st.invstd,
            gamma: &gam,
            beta: &bet,
        };
        let y = dev::bn_apply(&ex, &xd, Some(&gd), ch, r, c, true, 96).unwrap();
        all_finite("bn apply", &down_bf(&ex, &y));
        let part =
            dev::bn_backward_partial(&ex, &gd, &xd, Some(&y), &st.mean, r, c, 16, 64).unwrap();
        all_finite("bn backward partials", &down(&ex, &part));
        let (sdy, sdx) = dev::sum_partials2(&ex, &part, 3, c, 64).unwrap();
        let pg = dev::bn_param_grads(&ex, &sdy, &sdx, &st.invstd, 64).unwrap();
        all_finite("bn dgamma", &down(&ex, &pg.dgamma));
        all_finite("bn dbeta", &down(&ex, &pg.dbeta));
        let b = dev::bn_backward_apply(
            &ex,
            &gd,
            &xd,
            Some(&y),
            ch,
            (&sdy, &sdx),
            r,
            r,
            c,
            true,
            true,
            96,
        )
        .unwrap();
        all_finite("bn dx", &down_bf(&ex, &b.dx));
        all_finite("bn dres", &down_bf(&ex, b.dres.as_ref().unwrap()));
        // Layer norm: 37 rows in blocks of 5 (last: 2) with 4 warps each.
        let f = dev::layernorm_forward(&ex, &xd, &gam, &bet, r, c, 1e-6, 128).unwrap();
        all_finite("ln y", &down_bf(&ex, &f.y));
        all_finite("ln mean", &down(&ex, &f.mean));
        all_finite("ln rstd", &down(&ex, &f.rstd));
        let (dx, part) =
            dev::layernorm_backward_partial(&ex, &gd, &xd, &gam, &f.mean, &f.rstd, r, c, 5, 128)
                .unwrap();
        assert_eq!(part.len(), 2 * 8 * c);
        all_finite("ln dx", &down_bf(&ex, &dx));
        all_finite("ln partials", &down(&ex, &part));
    }
}

#[test]
fn nan_propagates_and_bad_shapes_are_errors() {
    let (r, d) = (4, 40);
    let (mut xb, _) = input("nan_x", &[r, d], 0.0, 1.0);
    xb[d + 1] = bf16::NAN;
    let ex = Emu::new(Mode::Fibers);
    let xd = up(&ex, &xb);
    let l2 = dev::l2norm_forward(&ex, &xd, r, d, 32).unwrap();
    let (y, n) = (down_bf(&ex, &l2.y), down(&ex, &l2.norm));
    assert!(n[1].is_nan() && y[d..2 * d].iter().all(|v| v.is_nan()));
    let dx = down_bf(
        &ex,
        &dev::l2norm_backward(&ex, &xd, &xd, &l2.norm, r, d, 32).unwrap(),
    );
    assert!(dx[d..2 * d].iter().all(|v| v.is_nan()) && dx[..d].iter().all(|v| v.is_finite()));
    let s = down(&ex, &dev::bn_stats(&ex, &xd, r, d, 3, 32).unwrap().sum);
    assert!(s[1].is_nan() && s[0].is_finite());
    let g = up(&ex, &vec![1.0f32; d]);
    let short = up(&ex, &vec![1.0f32; d - 1]);
    let f = dev::layernorm_forward(&ex, &xd, &g, &g, r, d, 1e-6, 32).unwrap();
    let y = down_bf(&ex, &f.y);
    assert!(y[d..2 * d].iter().all(|v| v.is_nan()) && y[..d].iter().all(|v| v.is_finite()));
    assert!(dev::l2norm_forward(&ex, &xd, r, d + 1, 32).is_err());
    assert!(dev::bn_stats(&ex, &xd, r, d, 0, 32).is_err());
    let e = dev::layernorm_forward(&ex, &xd, &short, &g, r, d, 1e-6, 32)
        .err()
        .unwrap();
    assert!(e.to_string().contains("layernorm_forward") && e.to_string().contains("gamma"));
    // Block sizes the warp reductions cannot use, and launches the GPU would refuse.
    assert!(dev::l2norm_forward(&ex, &xd, r, d, 48).is_err());
    assert!(dev::l2norm_forward(&ex, &xd, r, d, 2048).is_err());
    let wide = 1536;
    let (wb, _) = input("wide", &[2, wide], 0.0, 1.0);
    let (wd, gw) = (up(&ex, &wb), up(&ex, &vec![1.0f32; wide]));
    let st = up(&ex, &[0.0f32, 1.0]);
    let e = dev::layernorm_backward(&ex, &wd, &wd, &gw, &st, &st, 2, wide, 1, 256)
        .err()
        .unwrap();
    assert!(e.to_string().contains("shared memory"), "{e}");
    assert!(dev::layernorm_backward(&ex, &wd, &wd, &gw, &st, &st, 2, wide, 1, 64).is_ok());
    let e = dev::bn_stats(&ex, &xd, r, d, 1, 32);
    assert!(e.is_ok());
    let (big_r, big_c) = (70_000, 1);
    let big = up(&ex, &vec![bf16::ONE; big_r]);
    let e = dev::bn_stats(&ex, &big, big_r, big_c, 1, 32).err().unwrap();
    assert!(e.to_string().contains("row groups"), "{e}");
    let c1 = up(&ex, &[1.0f32]);
    let (mut m1, mut v1) = (up(&ex, &[0.0f32]), up(&ex, &[1.0f32]));
    assert!(dev::bn_finalize(&ex, &c1, &c1, 1, 1e-5, 0.1, &mut m1, &mut v1, 32).is_err());
    assert!(dev::bn_finalize(&ex, &c1, &c1, 4, 1e-5, 1.5, &mut m1, &mut v1, 32).is_err());
    let res = up(&ex, &vec![bf16::ONE; r * d - 1]);
    let ch = dev::BnChannels {
        mean: &g,
        invstd: &g,
        gamma: &g,
        beta: &g,
    };
    let e = dev::bn_apply(&ex, &xd, Some(&res), ch, r, d, false, 32)
        .err()
        .unwrap();
    assert!(e.to_string().contains("bn_apply") && e.to_string().contains("residual"));
}
