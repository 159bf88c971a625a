//! kernels/elementwise.cu on the CPU emulation against `backend::cpu::elementwise` and
//! `backend::cpu::softmax` (the references), on the same bf16-rounded inputs at awkward sizes
//! (37 × 70, rows of 197 keys): bf16 outputs within 1e-2 (relative L2; their own rounding is
//! ~2e-3), fp32 column sums within 1e-5, NaN never passes.

use half::bf16;
use sdengine::backend::cpu::elementwise::*;
use sdengine::backend::cpu::softmax::{softmax_backward, softmax_forward};
use sdengine::backend::emu::elementwise::*;
use sdengine::backend::emu::Mode;
use sdengine::testing::rel_l2;
use sdengine::Tensor;

fn f32s(x: &[bf16]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}
fn input(name: &str, shape: &[usize], std: f64) -> (Vec<bf16>, Tensor<f32>) {
    let t = Tensor::randn_named(21, name, shape, std);
    let b: Vec<bf16> = t.data().iter().map(|&x| bf16::from_f32(x)).collect();
    let f = Tensor::from_vec(f32s(&b), shape).unwrap();
    (b, f)
}
#[track_caller]
fn close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_l2(got, want);
    eprintln!("{what}: rel_l2 {e:.2e}");
    assert!(e <= tol, "{what}: rel_l2 {e:.3e} > {tol:.0e}");
}
fn col_sums(a: &[f32], c: usize) -> Vec<f32> {
    let mut s = vec![0.0f64; c];
    for row in a.chunks(c) {
        s.iter_mut().zip(row).for_each(|(s, &v)| *s += v as f64);
    }
    s.into_iter().map(|v| v as f32).collect()
}

#[test]
fn gelu_with_bias_forward_backward_and_bias_gradient() {
    let (r, c) = (37, 70);
    let (xb, x) = input("gelu_x", &[r, c], 1.5);
    let (gb, dy) = input("gelu_dy", &[r, c], 1.0);
    let bias = Tensor::randn_named(22, "gelu_b", &[c], 0.5);
    let u: Vec<f32> = x
        .data()
        .iter()
        .enumerate()
        .map(|(i, &v)| v + bias.data()[i % c])
        .collect();
    let u = Tensor::from_vec(u, &[r, c]).unwrap();
    let want_y = gelu_forward(&u).unwrap();
    let want_du = gelu_backward(&dy, &u).unwrap();
    for (bias_in, wy, wdu) in [
        (Some(bias.data()), &want_y, &want_du),
        (
            None,
            &gelu_forward(&x).unwrap(),
            &gelu_backward(&dy, &x).unwrap(),
        ),
    ] {
        let y = gelu_bias_forward(Mode::Fibers, &xb, bias_in, r, c, 128).unwrap();
        close("gelu y", &f32s(&y), wy.data(), 1e-2);
        let du = gelu_bias_backward(Mode::Fibers, &gb, &xb, bias_in, r, c, 96).unwrap();
        close("gelu du", &f32s(&du), wdu.data(), 1e-2);
    }
    // dbias = column sums of du: against the f32 reference du (bf16 rounding of du dominates),
    // and exactly against the sums of the kernel's own du, in both modes.
    let du = gelu_bias_backward(Mode::Fibers, &gb, &xb, Some(bias.data()), r, c, 64).unwrap();
    for (mode, rpb) in [(Mode::Fibers, 8), (Mode::Threads, 13)] {
        let db = column_sum(mode, &du, r, c, rpb, 64).unwrap();
        close(
            "dbias vs reference",
            &db,
            &col_sums(want_du.data(), c),
            1e-2,
        );
        close("dbias vs own du", &db, &col_sums(&f32s(&du), c), 1e-5);
    }
}

#[test]
fn bias_add_in_place() {
    let (r, c) = (37, 70);
    let (mut xb, x) = input("badd_x", &[r, c], 1.0);
    let bias = Tensor::randn_named(23, "badd_b", &[c], 1.0);
    let want: Vec<f32> = x
        .data()
        .iter()
        .enumerate()
        .map(|(i, &v)| v + bias.data()[i % c])
        .collect();
    bias_add(Mode::Fibers, &mut xb, bias.data(), r, c, 128).unwrap();
    close("bias add", &f32s(&xb), &want, 1e-2);
}

#[test]
fn drop_path_and_fused_residual() {
    let (b, m) = (5, 37 * 13);
    let (xb, x) = input("dp_x", &[b, m], 1.0);
    let (rb, r) = input("dp_r", &[b, m], 1.0);
    let mask = [true, false, true, true, false];
    let p = 0.3;
    let want = drop_path_forward(&x, &mask, p, true).unwrap();
    let y = drop_path(Mode::Fibers, &xb, &mask, p, b, m, 128).unwrap();
    close("drop path", &f32s(&y), want.data(), 1e-2);
    assert!(y[m..2 * m].iter().all(|v| v.to_f32() == 0.0));
    let want_b = drop_path_backward(&x, &mask, p, true).unwrap();
    close("drop path backward", &f32s(&y), want_b.data(), 1e-2);
    let want_add = add_forward(&r, &want).unwrap();
    let z = drop_path_add(Mode::Fibers, &rb, &xb, &mask, p, b, m, 96).unwrap();
    close("drop path + residual", &f32s(&z), want_add.data(), 1e-2);
    assert!(drop_path(Mode::Fibers, &xb, &mask[..4], p, b, m, 128).is_err());
    assert!(drop_path(Mode::Fibers, &xb, &mask, 1.0, b, m, 128).is_err());
}

#[test]
fn attention_softmax_forward_backward() {
    let (rows, n) = (2 * 3 * 7, 197);
    let scale = 1.0 / 8.0f32;
    let (sb, s) = input("att_s", &[rows, n], 4.0);
    let (gb, dp) = input("att_dp", &[rows, n], 1.0);
    let scaled =
        Tensor::from_vec(s.data().iter().map(|&v| v * scale).collect(), &[rows, n]).unwrap();
    let want_p = softmax_forward(&scaled).unwrap();
    let want_ds: Vec<f32> = softmax_backward(&dp, &want_p)
        .unwrap()
        .data()
        .iter()
        .map(|&v| v * scale)
        .collect();
    for (mode, threads) in [(Mode::Fibers, 128), (Mode::Threads, 64)] {
        let p = attn_softmax_forward(mode, &sb, rows, n, scale, threads).unwrap();
        close("attn softmax P", &f32s(&p), want_p.data(), 1e-2);
        let ds = attn_softmax_backward(mode, &gb, &p, rows, n, scale, threads).unwrap();
        close("attn softmax dS", &f32s(&ds), &want_ds, 1e-2);
    }
    // A NaN score poisons its row only.
    let mut bad = sb.clone();
    bad[n + 5] = bf16::NAN;
    let p = attn_softmax_forward(Mode::Fibers, &bad, rows, n, scale, 64).unwrap();
    assert!(p[n..2 * n].iter().all(|v| v.is_nan()));
    assert!(p[..n].iter().chain(&p[2 * n..]).all(|v| v.is_finite()));
}
