//! PyTorch parity of the attention family in f32: multi-head self-attention (timm ViT order),
//! bicubic interpolation (F.interpolate, size and scale-factor modes) and batch cat / split.
//! Fixture written by `tests/reference/ops_attention.py`; inputs regenerated here from the
//! shared generator.

use sdengine::backend::cpu::attention::{attention_backward, attention_forward};
use sdengine::backend::cpu::interp::{bicubic_backward, bicubic_forward, Bicubic};
use sdengine::testing::{assert_close, check_gradients, randn64, Fixtures, GradCheck};
use sdengine::Tensor;

const SEED: u64 = 0;
const TOL: f64 = 1e-5;

fn fixtures() -> Fixtures {
    Fixtures::open("ops/attention.safetensors")
        .expect("fixture (run tests/reference/ops_attention.py)")
}

#[test]
fn attention_matches_timm() {
    let f = fixtures();
    for (name, b, n, h, d) in [("a", 2, 5, 2, 3), ("b", 3, 7, 3, 4), ("c", 2, 17, 6, 8)] {
        let c = h * d;
        let p = format!("attn_{name}");
        let qkv = Tensor::randn_named(SEED, &format!("{p}_qkv"), &[b, n, 3 * c], 1.0);
        let dy = Tensor::randn_named(SEED, &format!("{p}_dy"), &[b, n, c], 1.0);
        let (y, ctx) = attention_forward(&qkv, h).unwrap();
        assert_close(
            &format!("{p} out"),
            &y,
            f.get(&format!("{p}_out")).unwrap(),
            TOL,
        );
        let dqkv = attention_backward(&dy, &qkv, &ctx).unwrap();
        assert_close(
            &format!("{p} dqkv"),
            &dqkv,
            f.get(&format!("{p}_dqkv")).unwrap(),
            TOL,
        );
    }
}

#[test]
fn bicubic_matches_interpolate() {
    let f = fixtures();
    let dino = |w0: usize| (w0 as f64 + 0.1) / 196f64.sqrt();
    let cases = [
        ("size_down", 3, Bicubic::to_size(5, 5, 3, 3)),
        ("size_up", 5, Bicubic::to_size(4, 4, 7, 6)),
        ("size_odd", 4, Bicubic::to_size(3, 5, 8, 2)),
        ("sf_dino96", 4, Bicubic::dino_pos_embed(14, 6, 6).unwrap()),
        (
            "sf_dino224",
            3,
            Bicubic::with_scale_factor(14, 14, dino(14), dino(14)).unwrap(),
        ),
        (
            "sf_up",
            3,
            Bicubic::with_scale_factor(4, 3, 1.7, 2.3).unwrap(),
        ),
        (
            "sf_down",
            3,
            Bicubic::with_scale_factor(5, 5, 0.61, 0.61).unwrap(),
        ),
    ];
    for (name, c, geom) in cases {
        let p = format!("bicubic_{name}");
        let x = Tensor::randn_named(SEED, &format!("{p}_x"), &[geom.in_h, geom.in_w, c], 1.0);
        let y = bicubic_forward(&x, geom).unwrap();
        assert_close(
            &format!("{p} out"),
            &y,
            f.get(&format!("{p}_out")).unwrap(),
            TOL,
        );
        let dy = Tensor::randn_named(SEED, &format!("{p}_dy"), y.shape(), 1.0);
        let dx = bicubic_backward(&dy, geom).unwrap();
        assert_close(
            &format!("{p} dx"),
            &dx,
            f.get(&format!("{p}_dx")).unwrap(),
            TOL,
        );
    }
}

#[test]
fn cat_and_split_match_torch() {
    let f = fixtures();
    let a = Tensor::randn_named(SEED, "cat_a", &[2, 3, 4], 1.0);
    let b = Tensor::randn_named(SEED, "cat_b", &[5, 3, 4], 1.0);
    let c = Tensor::randn_named(SEED, "cat_c", &[1, 3, 4], 1.0);
    let cat = Tensor::cat_batch(&[&a, &b, &c]).unwrap();
    assert_close("cat", &cat, f.get("cat_out").unwrap(), 0.0);
    let s = Tensor::randn_named(SEED, "split_x", &[7, 2, 3], 1.0);
    let parts = s.split_batch(&[3, 0, 4]).unwrap();
    assert_eq!(parts.len(), 3);
    for (i, part) in parts.iter().enumerate() {
        assert_close(
            &format!("split {i}"),
            part,
            f.get(&format!("split_{i}")).unwrap(),
            0.0,
        );
    }
}

#[test]
fn cat_gradient_is_split() {
    let inputs = [
        randn64(1, "cat_a", &[2, 3, 2]),
        randn64(1, "cat_b", &[3, 3, 2]),
    ];
    check_gradients(
        "cat_batch",
        &inputs,
        |xs| Tensor::cat_batch(&[&xs[0], &xs[1]]),
        |_, w| Ok(w.split_batch(&[2, 3])?.into_iter().map(Some).collect()),
        GradCheck::default(),
    );
}
