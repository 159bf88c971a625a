//! PyTorch parity of the norm family in f32 (tolerance 1e-5 relative L2, DESIGN.md's f32-op
//! bound). The inputs are regenerated from the same (seed, name) streams as
//! `tests/reference/ops_norm.py`; the fixture holds PyTorch's outputs and gradients.
use sdengine::backend::cpu::elementwise::{
    add_backward, add_forward, drop_path_backward, drop_path_forward, gelu_backward, gelu_forward,
    relu_backward, relu_forward,
};
use sdengine::backend::cpu::norm::{
    batch_norm_backward, batch_norm_forward, l2_normalize_backward, l2_normalize_forward,
    layer_norm_backward, layer_norm_forward, BatchNormParams,
};
use sdengine::testing::{assert_close, Fixtures};
use sdengine::Tensor;

const SEED: u64 = 11;
const TOL: f64 = 1e-5;

fn fixtures() -> Fixtures {
    Fixtures::open("ops/norm.safetensors").expect("fixture (run tests/reference/ops_norm.py)")
}

fn randn(name: &str, shape: &[usize], std: f64) -> Tensor {
    Tensor::randn_named(SEED, name, shape, std)
}

/// `a + v` element-wise in f32 (as numpy does in the reference script).
fn plus(t: Tensor, a: f32) -> Tensor {
    let shape = t.shape().to_vec();
    Tensor::from_vec(t.into_vec().into_iter().map(|v| a + v).collect(), &shape).unwrap()
}

fn check(fx: &Fixtures, key: &str, got: &Tensor) {
    assert_close(key, got, fx.get(key).unwrap(), TOL);
}

fn batch_norm_case(fx: &Fixtures, name: &str, shape: &[usize], training: bool, relu: bool) {
    let c = *shape.last().unwrap();
    let x = plus(randn(&format!("{name}.x"), shape, 2.0), 0.5);
    let gamma = plus(randn(&format!("{name}.gamma"), &[c], 0.2), 1.0);
    let beta = randn(&format!("{name}.beta"), &[c], 0.3);
    let mut rm = randn(&format!("{name}.running_mean"), &[c], 0.3);
    let mut rv = Tensor::rand_named(SEED, &format!("{name}.running_var"), &[c], 0.5, 1.5);
    let dy = randn(&format!("{name}.dy"), shape, 1.0);
    let params = BatchNormParams {
        eps: 1e-5,
        momentum: 0.1,
        training,
        relu,
    };
    let (y, ctx) = batch_norm_forward(&x, &gamma, &beta, &mut rm, &mut rv, params).unwrap();
    let g = batch_norm_backward(&dy, &x, &ctx).unwrap();
    check(fx, &format!("{name}.y"), &y);
    check(fx, &format!("{name}.dx"), &g.dx);
    check(fx, &format!("{name}.dgamma"), &g.dgamma);
    check(fx, &format!("{name}.dbeta"), &g.dbeta);
    // Training mode updates the running statistics as PyTorch does (momentum 0.1, unbiased
    // variance); evaluation mode leaves them as they were.
    check(fx, &format!("{name}.running_mean"), &rm);
    check(fx, &format!("{name}.running_var"), &rv);
}

#[test]
fn batch_norm_2d_training_with_relu() {
    batch_norm_case(&fixtures(), "bn2d_train_relu", &[2, 5, 7, 6], true, true);
}

#[test]
fn batch_norm_2d_training() {
    batch_norm_case(&fixtures(), "bn2d_train", &[3, 4, 5, 7], true, false);
}

#[test]
fn batch_norm_2d_eval_with_relu() {
    batch_norm_case(&fixtures(), "bn2d_eval_relu", &[2, 5, 7, 6], false, true);
}

#[test]
fn batch_norm_2d_eval() {
    batch_norm_case(&fixtures(), "bn2d_eval", &[2, 3, 5, 7], false, false);
}

#[test]
fn batch_norm_1d_training_and_eval() {
    let fx = fixtures();
    batch_norm_case(&fx, "bn1d_train", &[9, 37], true, false);
    batch_norm_case(&fx, "bn1d_eval", &[9, 37], false, false);
}

#[test]
fn layer_norm() {
    let fx = fixtures();
    for (name, shape) in [("ln_a", vec![2, 7, 12]), ("ln_b", vec![3, 5, 40])] {
        let d = *shape.last().unwrap();
        let x = plus(randn(&format!("{name}.x"), &shape, 2.0), 0.5);
        let gamma = plus(randn(&format!("{name}.gamma"), &[d], 0.2), 1.0);
        let beta = randn(&format!("{name}.beta"), &[d], 0.3);
        let dy = randn(&format!("{name}.dy"), &shape, 1.0);
        let (y, ctx) = layer_norm_forward(&x, &gamma, &beta, 1e-6).unwrap();
        let g = layer_norm_backward(&dy, &x, &gamma, &ctx).unwrap();
        check(&fx, &format!("{name}.y"), &y);
        check(&fx, &format!("{name}.dx"), &g.dx);
        check(&fx, &format!("{name}.dgamma"), &g.dgamma);
        check(&fx, &format!("{name}.dbeta"), &g.dbeta);
    }
}

#[test]
fn l2_normalize() {
    let fx = fixtures();
    // "l2_tiny" has row norms below 1e-12: F.normalize divides by the clamp instead.
    for (name, shape, std) in [("l2", [5, 19], 1.0), ("l2_tiny", [2, 7], 1e-13)] {
        let x = randn(&format!("{name}.x"), &shape, std);
        let dy = randn(&format!("{name}.dy"), &shape, 1.0);
        let (y, ctx) = l2_normalize_forward(&x).unwrap();
        let dx = l2_normalize_backward(&dy, &x, &ctx).unwrap();
        check(&fx, &format!("{name}.y"), &y);
        check(&fx, &format!("{name}.dx"), &dx);
    }
}

#[test]
fn gelu() {
    let fx = fixtures();
    let x = randn("gelu.x", &[6, 33], 2.5);
    let dy = randn("gelu.dy", &[6, 33], 1.0);
    check(&fx, "gelu.y", &gelu_forward(&x).unwrap());
    check(&fx, "gelu.dx", &gelu_backward(&dy, &x).unwrap());
}

#[test]
fn relu() {
    let fx = fixtures();
    let x = randn("relu.x", &[4, 5, 6], 1.0);
    let dy = randn("relu.dy", &[4, 5, 6], 1.0);
    let y = relu_forward(&x).unwrap();
    check(&fx, "relu.y", &y);
    check(&fx, "relu.dx", &relu_backward(&dy, &y).unwrap());
}

#[test]
fn residual_add() {
    let fx = fixtures();
    let a = randn("add.a", &[3, 4, 5], 1.0);
    let b = randn("add.b", &[3, 4, 5], 1.0);
    let dy = randn("add.dy", &[3, 4, 5], 1.0);
    check(&fx, "add.y", &add_forward(&a, &b).unwrap());
    let (da, db) = add_backward(&dy).unwrap();
    check(&fx, "add.da", &da);
    check(&fx, "add.db", &db);
}

#[test]
fn drop_path_timm_style() {
    let fx = fixtures();
    let mask = [true, false, true, true];
    let x = randn("drop_path.x", &[4, 3, 5], 1.0);
    let dy = randn("drop_path.dy", &[4, 3, 5], 1.0);
    check(
        &fx,
        "drop_path.y",
        &drop_path_forward(&x, &mask, 0.25, true).unwrap(),
    );
    check(
        &fx,
        "drop_path.dx",
        &drop_path_backward(&dy, &mask, 0.25, true).unwrap(),
    );
}
