//! PyTorch parity of the conv family (conv2d, max-pool, global average pool), f32, forward and
//! backward, against `tests/fixtures/ops/conv.safetensors` written by
//! `tests/reference/ops_conv.py`. Inputs are regenerated here from the same (seed, name) streams.

use sdengine::backend::cpu::conv::{conv2d_backward, conv2d_forward, Conv2dParams};
use sdengine::backend::cpu::pool::{
    global_avg_pool_backward, global_avg_pool_forward, max_pool2d_backward, max_pool2d_forward,
    MaxPool2dParams,
};
use sdengine::testing::{assert_close, Fixtures};
use sdengine::Tensor;

const SEED: u64 = 7;
const TOL: f64 = 1e-5;

fn input(name: &str, shape: &[usize]) -> Tensor<f32> {
    Tensor::randn_named(SEED, name, shape, 1.0)
}

/// (name, x NHWC, w O×KH×KW×I, stride, padding, bias), as in ops_conv.py.
#[allow(clippy::type_complexity)]
const CONVS: &[(&str, [usize; 4], [usize; 4], usize, usize, bool)] = &[
    ("conv_1x1_s1", [2, 9, 9, 5], [6, 1, 1, 5], 1, 0, false),
    ("conv_1x1_s2", [2, 9, 9, 4], [6, 1, 1, 4], 2, 0, false),
    ("conv_3x3_s1", [2, 9, 9, 5], [4, 3, 3, 5], 1, 1, false),
    ("conv_3x3_s2", [2, 11, 11, 3], [5, 3, 3, 3], 2, 1, true),
    ("conv_7x7_s2", [2, 11, 11, 3], [4, 7, 7, 3], 2, 3, false),
    ("conv_patch4", [2, 8, 12, 3], [6, 4, 4, 3], 4, 0, true),
];

#[test]
fn conv2d_matches_pytorch() {
    let fx = Fixtures::open("ops/conv.safetensors").unwrap();
    for &(name, xs, ws, stride, padding, has_bias) in CONVS {
        let p = Conv2dParams { stride, padding };
        let x = input(&format!("{name}.x"), &xs);
        let w = input(&format!("{name}.w"), &ws);
        let b = has_bias.then(|| input(&format!("{name}.b"), &[ws[0]]));
        let y = conv2d_forward(&x, &w, b.as_ref(), p).unwrap();
        assert_close(
            &format!("{name}.y"),
            &y,
            fx.get(&format!("{name}.y")).unwrap(),
            TOL,
        );
        let dy = input(&format!("{name}.dy"), y.shape());
        let g = conv2d_backward(&x, &w, &dy, p, true, has_bias).unwrap();
        let want = |what: &str| fx.get(&format!("{name}.{what}")).unwrap();
        assert_close(
            &format!("{name}.dx"),
            g.dx.as_ref().unwrap(),
            want("dx"),
            TOL,
        );
        assert_close(&format!("{name}.dw"), &g.dw, want("dw"), TOL);
        if has_bias {
            assert_close(
                &format!("{name}.db"),
                g.db.as_ref().unwrap(),
                want("db"),
                TOL,
            );
        }
        // Without dx (a first layer) the other gradients are unchanged.
        let g2 = conv2d_backward(&x, &w, &dy, p, false, has_bias).unwrap();
        assert!(g2.dx.is_none());
        assert_eq!(g2.dw, g.dw, "{name}: dw depends on need_dx");
    }
}

#[test]
fn max_pool_matches_pytorch() {
    let fx = Fixtures::open("ops/conv.safetensors").unwrap();
    for (name, xs, kernel, stride, padding) in [
        ("maxpool_3s2p1", [2, 11, 11, 4], 3, 2, 1),
        ("maxpool_2s2p0", [2, 9, 8, 3], 2, 2, 0),
        ("maxpool_c20", [2, 9, 9, 20], 3, 2, 1),
    ] {
        let p = MaxPool2dParams {
            kernel,
            stride,
            padding,
        };
        let x = input(&format!("{name}.x"), &xs);
        let (y, saved) = max_pool2d_forward(&x, p).unwrap();
        assert_close(
            &format!("{name}.y"),
            &y,
            fx.get(&format!("{name}.y")).unwrap(),
            TOL,
        );
        let dy = input(&format!("{name}.dy"), y.shape());
        let dx = max_pool2d_backward(&dy, &saved).unwrap();
        assert_close(
            &format!("{name}.dx"),
            &dx,
            fx.get(&format!("{name}.dx")).unwrap(),
            TOL,
        );
    }
}

#[test]
fn global_avg_pool_matches_pytorch() {
    let fx = Fixtures::open("ops/conv.safetensors").unwrap();
    let x = input("avgpool.x", &[2, 7, 5, 8]);
    let y = global_avg_pool_forward(&x).unwrap();
    assert_close("avgpool.y", &y, fx.get("avgpool.y").unwrap(), TOL);
    let dy = input("avgpool.dy", &[2, 8]);
    let dx = global_avg_pool_backward(&dy, x.shape()).unwrap();
    assert_close("avgpool.dx", &dx, fx.get("avgpool.dx").unwrap(), TOL);
}
