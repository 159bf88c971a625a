//! Criterion benchmarks of the norm family (f32, training-mode shapes of ResNet-50 and ViT-S/16
//! at batch 8). `benches/torch/norm.py` times the same cases in PyTorch.
use criterion::{criterion_group, criterion_main, Criterion};
use sdengine::backend::cpu::elementwise::{gelu_backward, gelu_forward, relu_forward};
use sdengine::backend::cpu::norm::{
    batch_norm_backward, batch_norm_forward, layer_norm_backward, layer_norm_forward,
    BatchNormParams,
};
use sdengine::Tensor;
use std::hint::black_box;
use std::time::Duration;

/// Training-mode batch norm with fused ReLU over an NHWC input: forward and backward cases.
fn bench_bn(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    shape: &[usize],
) {
    let c = *shape.last().unwrap();
    let x = Tensor::randn_named(0, "x", shape, 1.0);
    let dy = Tensor::randn_named(0, "dy", shape, 1.0);
    let gamma = Tensor::randn_named(0, "g", &[c], 1.0);
    let beta = Tensor::randn_named(0, "b", &[c], 1.0);
    let (mut rm, mut rv) = (Tensor::zeros(&[c]), Tensor::full(&[c], 1.0f32));
    let p = BatchNormParams {
        relu: true,
        ..Default::default()
    };
    g.bench_function(format!("{name}_fwd"), |b| {
        b.iter(|| batch_norm_forward(black_box(&x), &gamma, &beta, &mut rm, &mut rv, p).unwrap())
    });
    let (_, ctx) = batch_norm_forward(&x, &gamma, &beta, &mut rm, &mut rv, p).unwrap();
    g.bench_function(format!("{name}_bwd"), |b| {
        b.iter(|| batch_norm_backward(black_box(&dy), &x, &ctx).unwrap())
    });
}

fn norm(c: &mut Criterion) {
    let mut g = c.benchmark_group("norm");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));

    bench_bn(&mut g, "bn_s1", &[8, 56, 56, 256]);
    bench_bn(&mut g, "bn_stem", &[8, 112, 112, 64]);

    let (rows, d) = (8 * 197, 384);
    let x = Tensor::randn_named(0, "x", &[rows, d], 1.0);
    let dy = Tensor::randn_named(0, "dy", &[rows, d], 1.0);
    let gamma = Tensor::randn_named(0, "g", &[d], 1.0);
    let beta = Tensor::randn_named(0, "b", &[d], 1.0);
    g.bench_function("layernorm_fwd", |b| {
        b.iter(|| layer_norm_forward(black_box(&x), &gamma, &beta, 1e-6).unwrap())
    });
    let (_, ctx) = layer_norm_forward(&x, &gamma, &beta, 1e-6).unwrap();
    g.bench_function("layernorm_bwd", |b| {
        b.iter(|| layer_norm_backward(black_box(&dy), &x, &gamma, &ctx).unwrap())
    });

    let x = Tensor::randn_named(0, "x", &[rows, 1536], 1.0);
    let dy = Tensor::randn_named(0, "dy", &[rows, 1536], 1.0);
    g.bench_function("gelu_fwd", |b| {
        b.iter(|| gelu_forward(black_box(&x)).unwrap())
    });
    g.bench_function("gelu_bwd", |b| {
        b.iter(|| gelu_backward(black_box(&dy), &x).unwrap())
    });

    let x = Tensor::randn_named(0, "x", &[8, 56, 56, 256], 1.0);
    g.bench_function("relu_fwd", |b| {
        b.iter(|| relu_forward(black_box(&x)).unwrap())
    });
    g.finish();
}

criterion_group!(benches, norm);
criterion_main!(benches);
