//! PyTorch parity of the `linear` op family (linear, weight-normalised linear, softmax,
//! log-softmax, soft-target cross-entropy) in f32, against `tests/fixtures/ops/linear.safetensors`
//! written by `tests/reference/ops_linear.py`. Inputs are regenerated here from the same
//! (seed, name) streams; every output and gradient must be within 1e-5 relative L2.

use sdengine::backend::cpu::linear::{
    linear_backward, linear_forward, weight_norm_linear_backward, weight_norm_linear_forward,
    LinearNeeds, WeightNormNeeds,
};
use sdengine::backend::cpu::loss::{
    cross_entropy_backward, cross_entropy_forward, one_hot, CrossEntropyParams,
};
use sdengine::backend::cpu::softmax::{
    log_softmax_backward, log_softmax_forward, softmax_backward, softmax_forward,
};
use sdengine::testing::{assert_close, Fixtures};
use sdengine::Tensor;

const SEED: u64 = 7;
const TOL: f64 = 1e-5;

fn fixtures() -> Fixtures {
    Fixtures::open("ops/linear.safetensors").expect("fixture file")
}

fn input(name: &str, shape: &[usize]) -> Tensor<f32> {
    Tensor::randn_named(SEED, name, shape, 1.0)
}

fn dy_for(name: &str, shape: &[usize]) -> Tensor<f32> {
    Tensor::randn_named(SEED, &format!("{name}.dy"), shape, 1.0)
}

fn check(f: &Fixtures, name: &str, got: &Tensor<f32>) {
    assert_close(name, got, f.get(name).expect("fixture entry"), TOL);
}

fn linear_case(f: &Fixtures, name: &str, xshape: &[usize], out: usize, bias: bool) {
    let inp = *xshape.last().unwrap();
    let x = input(&format!("{name}.x"), xshape);
    let w = input(&format!("{name}.w"), &[out, inp]);
    let b = bias.then(|| input(&format!("{name}.b"), &[out]));
    let y = linear_forward(&x, &w, b.as_ref()).unwrap();
    check(f, &format!("{name}.y"), &y);
    let dy = dy_for(name, y.shape());
    let g = linear_backward(&dy, &x, &w, LinearNeeds { dx: true, db: bias }).unwrap();
    check(f, &format!("{name}.dx"), g.dx.as_ref().unwrap());
    check(f, &format!("{name}.dw"), &g.dw);
    if bias {
        check(f, &format!("{name}.db"), g.db.as_ref().unwrap());
    }
}

#[test]
fn linear_matches_pytorch() {
    let f = fixtures();
    linear_case(&f, "linear_bias", &[2, 3, 5], 4, true);
    linear_case(&f, "linear_nobias", &[7, 6], 3, false);
}

fn weight_norm_case(f: &Fixtures, name: &str, xshape: &[usize], out: usize) {
    let inp = *xshape.last().unwrap();
    let x = input(&format!("{name}.x"), xshape);
    let v = input(&format!("{name}.v"), &[out, inp]);
    let g = input(&format!("{name}.g"), &[out]);
    let (y, ctx) = weight_norm_linear_forward(&x, &v, &g).unwrap();
    check(f, &format!("{name}.y"), &y);
    let dy = dy_for(name, y.shape());
    let gr = weight_norm_linear_backward(&dy, &x, &v, &g, &ctx, WeightNormNeeds::ALL).unwrap();
    check(f, &format!("{name}.dx"), gr.dx.as_ref().unwrap());
    check(f, &format!("{name}.dv"), &gr.dv);
    check(f, &format!("{name}.dg"), gr.dg.as_ref().unwrap());
    // Frozen g (teacher, norm_last_layer=True): same dv, no dg, and dx can be skipped.
    let frozen = WeightNormNeeds {
        dx: false,
        dg: false,
    };
    let gf = weight_norm_linear_backward(&dy, &x, &v, &g, &ctx, frozen).unwrap();
    assert!(gf.dx.is_none() && gf.dg.is_none());
    check(f, &format!("{name}.dv"), &gf.dv);
}

#[test]
fn weight_norm_linear_matches_pytorch() {
    let f = fixtures();
    weight_norm_case(&f, "wn", &[5, 6], 4);
    weight_norm_case(&f, "wn_lead", &[2, 3, 7], 5);
}

#[test]
fn softmax_and_log_softmax_match_pytorch() {
    let f = fixtures();
    let x = input("softmax.x", &[4, 9]);
    let y = softmax_forward(&x).unwrap();
    check(&f, "softmax.y", &y);
    let dx = softmax_backward(&dy_for("softmax", &[4, 9]), &y).unwrap();
    check(&f, "softmax.dx", &dx);

    let x = input("log_softmax.x", &[2, 3, 11]);
    let y = log_softmax_forward(&x).unwrap();
    check(&f, "log_softmax.y", &y);
    let dx = log_softmax_backward(&dy_for("log_softmax", &[2, 3, 11]), &y).unwrap();
    check(&f, "log_softmax.dx", &dx);
}

/// Positive rows normalised to sum to 1, as `soft_targets` in the Python script.
fn soft_targets(name: &str, b: usize, k: usize) -> Tensor<f32> {
    let mut t = Tensor::rand_named(SEED, &format!("{name}.t"), &[b, k], 0.1, 1.0);
    for row in t.data_mut().chunks_mut(k) {
        let s: f32 = row.iter().sum();
        for v in row {
            *v /= s;
        }
    }
    t
}

#[test]
fn cross_entropy_matches_pytorch() {
    let f = fixtures();
    let (b, k) = (6, 10);
    for tau in [0.1, 1.0] {
        for ls in [0.0, 0.1] {
            for soft in [true, false] {
                let name = format!(
                    "ce_{}_t{tau:.1}_ls{ls:.1}",
                    if soft { "soft" } else { "hard" }
                );
                let z = input(&format!("{name}.z"), &[b, k]);
                let t = if soft {
                    soft_targets(&name, b, k)
                } else {
                    let labels: Vec<usize> = (0..b).map(|i| (3 * i + 1) % k).collect();
                    one_hot(&labels, k).unwrap()
                };
                let params = CrossEntropyParams {
                    temperature: tau,
                    label_smoothing: ls,
                };
                let (loss, ctx) = cross_entropy_forward(&z, &t, params).unwrap();
                check(
                    &f,
                    &format!("{name}.loss"),
                    &Tensor::from_vec(vec![loss], &[1]).unwrap(),
                );
                let dloss = input(&format!("{name}.dloss"), &[1]).data()[0];
                let dz = cross_entropy_backward(dloss, &t, &ctx).unwrap();
                check(&f, &format!("{name}.dz"), &dz);
            }
        }
    }
}
