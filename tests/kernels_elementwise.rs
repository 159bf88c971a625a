//! kernels/elementwise.cu through the device ops (`backend::device::elementwise`) on the CPU
//! emulation, against `backend::cpu::elementwise` and `backend::cpu::softmax` (the references),
//! on the same bf16-rounded inputs at awkward sizes (37 × 70, rows of 197 keys): bf16 outputs
//! within 1e-2 (relative L2; their own rounding is ~2e-3), fp32 column sums within 1e-5, NaN
//! never passes. Outputs come from poisoned (NaN) allocations, so an element a kernel forgets
//! to write fails the comparison.

use half::bf16;
use sdengine::backend::cpu::elementwise::*;
use sdengine::backend::cpu::softmax::{softmax_backward, softmax_forward};
use sdengine::backend::device::elementwise::*;
use sdengine::backend::device::{Emu, Exec, Mode};
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
fn bf(ex: &Emu, b: &<Emu as Exec>::Buf<bf16>) -> Vec<f32> {
    ex.download_bf16(b).unwrap()
}

#[test]
fn gelu_with_bias_forward_backward_and_bias_gradient() {
    let ex = Emu::new(Mode::Fibers);
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
    let (xd, gd) = (ex.upload(&xb).unwrap(), ex.upload(&gb).unwrap());
    let bd = ex.upload(bias.data()).unwrap();
    for (bias_in, wy, wdu) in [
        (Some(&bd), &want_y, &want_du),
        (
            None,
            &gelu_forward(&x).unwrap(),
            &gelu_backward(&dy, &x).unwrap(),
        ),
    ] {
        let y = gelu_bias_forward(&ex, &xd, bias_in, r, c, 128).unwrap();
        close("gelu y", &bf(&ex, &y), wy.data(), 1e-2);
        let du = gelu_bias_backward(&ex, &gd, &xd, bias_in, r, c, 96).unwrap();
        close("gelu du", &bf(&ex, &du), wdu.data(), 1e-2);
    }
    // dbias = column sums of du: against the f32 reference du (bf16 rounding of du dominates),
    // and exactly against the sums of the kernel's own du, in both modes.
    let du = gelu_bias_backward(&ex, &gd, &xd, Some(&bd), r, c, 64).unwrap();
    let du_host = bf(&ex, &du);
    for (mode, rpb) in [(Mode::Fibers, 8), (Mode::Threads, 13)] {
        let em = Emu::new(mode);
        let db = em
            .download(&column_sum(&em, &du, r, c, rpb, 64).unwrap())
            .unwrap();
        close(
            "dbias vs reference",
            &db,
            &col_sums(want_du.data(), c),
            1e-2,
        );
        close("dbias vs own du", &db, &col_sums(&du_host, c), 1e-5);
    }
    // Shape errors name the op and the buffer instead of launching.
    let short = ex.upload(&bias.data()[..c - 1]).unwrap();
    let Err(e) = gelu_bias_forward(&ex, &xd, Some(&short), r, c, 128) else {
        panic!("a short bias was accepted");
    };
    assert!(
        e.to_string().contains("gelu_bias_forward") && e.to_string().contains("bias"),
        "{e}"
    );
    assert!(gelu_bias_backward(&ex, &gd, &xd, None, r, c + 1, 128).is_err());
    assert!(
        gelu_bias_forward(&ex, &xd, None, r, c, 100).is_err(),
        "threads not warps"
    );
    assert!(
        column_sum(&ex, &du, r, c, 0, 64).is_err(),
        "rows per block 0"
    );
}

#[test]
fn bias_add_in_place() {
    let ex = Emu::new(Mode::Fibers);
    let (r, c) = (37, 70);
    let (xb, x) = input("badd_x", &[r, c], 1.0);
    let bias = Tensor::randn_named(23, "badd_b", &[c], 1.0);
    let want: Vec<f32> = x
        .data()
        .iter()
        .enumerate()
        .map(|(i, &v)| v + bias.data()[i % c])
        .collect();
    let mut xd = ex.upload(&xb).unwrap();
    let bd = ex.upload(bias.data()).unwrap();
    bias_add(&ex, &mut xd, &bd, r, c, 128).unwrap();
    close("bias add", &bf(&ex, &xd), &want, 1e-2);
}

#[test]
fn drop_path_and_fused_residual() {
    let ex = Emu::new(Mode::Fibers);
    let (b, m) = (5, 37 * 13);
    let (xb, x) = input("dp_x", &[b, m], 1.0);
    let (rb, r) = input("dp_r", &[b, m], 1.0);
    let mask = [true, false, true, true, false];
    let p = 0.3;
    let want = drop_path_forward(&x, &mask, p, true).unwrap();
    let (xd, rd) = (ex.upload(&xb).unwrap(), ex.upload(&rb).unwrap());
    let md = upload_mask(&ex, &mask).unwrap();
    let y = bf(&ex, &drop_path(&ex, &xd, &md, p, b, m, 128).unwrap());
    close("drop path", &y, want.data(), 1e-2);
    assert!(y[m..2 * m].iter().all(|&v| v == 0.0));
    let want_b = drop_path_backward(&x, &mask, p, true).unwrap();
    close("drop path backward", &y, want_b.data(), 1e-2);
    let want_add = add_forward(&r, &want).unwrap();
    let z = drop_path_add(&ex, &rd, &xd, &md, p, b, m, 96).unwrap();
    close("drop path + residual", &bf(&ex, &z), want_add.data(), 1e-2);
    // Into the residual itself: the same values, bit for bit.
    let mut rr = ex.upload(&rb).unwrap();
    drop_path_add_assign(&ex, &mut rr, &xd, &md, p, b, m, 64).unwrap();
    assert_eq!(ex.download(&rr).unwrap(), ex.download(&z).unwrap());
    let short = upload_mask(&ex, &mask[..4]).unwrap();
    assert!(drop_path(&ex, &xd, &short, p, b, m, 128).is_err());
    assert!(drop_path(&ex, &xd, &md, 1.0, b, m, 128).is_err());
    assert!(drop_path_add(&ex, &rd, &xd, &md, p, b, m - 1, 128).is_err());
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
        let ex = Emu::new(mode);
        let (sd, gd) = (ex.upload(&sb).unwrap(), ex.upload(&gb).unwrap());
        let p = attn_softmax_forward(&ex, &sd, rows, n, scale, threads).unwrap();
        close("attn softmax P", &bf(&ex, &p), want_p.data(), 1e-2);
        let ds = attn_softmax_backward(&ex, &gd, &p, rows, n, scale, threads).unwrap();
        close("attn softmax dS", &bf(&ex, &ds), &want_ds, 1e-2);
    }
    // A NaN score poisons its row only.
    let ex = Emu::new(Mode::Fibers);
    let mut bad = sb.clone();
    bad[n + 5] = bf16::NAN;
    let bd = ex.upload(&bad).unwrap();
    let p = ex
        .download(&attn_softmax_forward(&ex, &bd, rows, n, scale, 64).unwrap())
        .unwrap();
    assert!(p[n..2 * n].iter().all(|v| v.is_nan()));
    assert!(p[..n].iter().chain(&p[2 * n..]).all(|v| v.is_finite()));
}

/// Every op's output starts as the emulation's poison (NaN); after the op no NaN is left, at
/// sizes where the last block is partial (a kernel skipping its tail would leave poison).
#[test]
fn outputs_from_poisoned_allocations_are_written_everywhere() {
    for mode in [Mode::Fibers, Mode::Threads] {
        let ex = Emu::new(mode);
        let (r, c) = (33, 45);
        let (xb, _) = input("poison_x", &[r, c], 1.0);
        let (gb, _) = input("poison_g", &[r, c], 1.0);
        let bias = Tensor::randn_named(24, "poison_b", &[c], 1.0);
        let (xd, gd, bd) = (
            ex.upload(&xb).unwrap(),
            ex.upload(&gb).unwrap(),
            ex.upload(bias.data()).unwrap(),
        );
        let md = upload_mask(&ex, &[true, false, true]).unwrap();
        let m = r * c / 3;
        let outs: Vec<(&str, Vec<f32>)> = vec![
            (
                "gelu fwd",
                bf(
                    &ex,
                    &gelu_bias_forward(&ex, &xd, Some(&bd), r, c, 64).unwrap(),
                ),
            ),
            (
                "gelu bwd",
                bf(
                    &ex,
                    &gelu_bias_backward(&ex, &gd, &xd, None, r, c, 64).unwrap(),
                ),
            ),
            (
                "column sum",
                ex.download(&column_sum(&ex, &xd, r, c, 7, 64).unwrap())
                    .unwrap(),
            ),
            (
                "drop path",
                bf(&ex, &drop_path(&ex, &xd, &md, 0.2, 3, m, 64).unwrap()),
            ),
            (
                "drop path add",
                bf(
                    &ex,
                    &drop_path_add(&ex, &gd, &xd, &md, 0.2, 3, m, 64).unwrap(),
                ),
            ),
            (
                "softmax fwd",
                bf(&ex, &attn_softmax_forward(&ex, &xd, r, c, 0.3, 64).unwrap()),
            ),
            (
                "softmax bwd",
                bf(
                    &ex,
                    &attn_softmax_backward(&ex, &gd, &xd, r, c, 0.3, 64).unwrap(),
                ),
            ),
        ];
        for (what, v) in outs {
            let nan = v.iter().filter(|x| x.is_nan()).count();
            assert_eq!(
                nan,
                0,
                "{mode:?} {what}: {nan} of {} values left as poison",
                v.len()
            );
        }
    }
}
