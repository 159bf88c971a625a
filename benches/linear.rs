//! Criterion benchmarks of the `linear` op family at ViT-S/16 batch-8 shapes (1576 token rows of
//! width 384) and Suave/DINO head shapes, f32. `benches/torch/linear.py` times the same cases in
//! PyTorch; `python3 benches/torch/run.py --families linear` prints the ratios.
//! `_bwd` cases time the backward alone (all gradients), from a context computed once.

use criterion::{criterion_group, criterion_main, Criterion};
use sdengine::backend::cpu::linear::{
    linear_backward, linear_forward, weight_norm_linear_backward, weight_norm_linear_forward,
    LinearNeeds, WeightNormNeeds,
};
use sdengine::backend::cpu::loss::{
    cross_entropy_backward, cross_entropy_forward, CrossEntropyParams,
};
use sdengine::backend::cpu::softmax::softmax_forward;
use sdengine::Tensor;
use std::hint::black_box;
use std::time::Duration;

/// ViT-S/16 at batch 8: 8 × (196 patches + class token).
const TOKENS: usize = 1576;

fn bench_linear(c: &mut Criterion) {
    let mut g = c.benchmark_group("linear");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));

    for (name, inp, out) in [("qkv", 384, 1152), ("fc1", 384, 1536), ("fc2", 1536, 384)] {
        let x = Tensor::randn_named(0, "x", &[TOKENS, inp], 1.0);
        let w = Tensor::randn_named(0, "w", &[out, inp], 0.05);
        let b = Tensor::randn_named(0, "b", &[out], 0.05);
        let dy = Tensor::randn_named(0, "dy", &[TOKENS, out], 1.0);
        g.bench_function(format!("{name}_fwd"), |bch| {
            bch.iter(|| black_box(linear_forward(&x, &w, Some(&b)).unwrap()))
        });
        g.bench_function(format!("{name}_bwd"), |bch| {
            bch.iter(|| black_box(linear_backward(&dy, &x, &w, LinearNeeds::ALL).unwrap()))
        });
    }

    // DINO/Suave-style weight-normalised last layer: 256 -> 1000 prototypes on 512 rows.
    let x = Tensor::randn_named(0, "x", &[512, 256], 1.0);
    let v = Tensor::randn_named(0, "v", &[1000, 256], 0.05);
    let gain = Tensor::rand_named(0, "g", &[1000], 0.5, 1.5);
    let dy = Tensor::randn_named(0, "dy", &[512, 1000], 1.0);
    g.bench_function("wn_head_fwd", |bch| {
        bch.iter(|| black_box(weight_norm_linear_forward(&x, &v, &gain).unwrap()))
    });
    let (_, ctx) = weight_norm_linear_forward(&x, &v, &gain).unwrap();
    g.bench_function("wn_head_bwd", |bch| {
        bch.iter(|| {
            black_box(
                weight_norm_linear_backward(&dy, &x, &v, &gain, &ctx, WeightNormNeeds::ALL)
                    .unwrap(),
            )
        })
    });

    // Cross-entropy on prototype scores [512, 1000], τ = 0.1, label smoothing 0.01, soft targets.
    let z = Tensor::randn_named(0, "z", &[512, 1000], 1.0);
    let t = softmax_forward(&Tensor::randn_named(0, "t", &[512, 1000], 1.0)).unwrap();
    let params = CrossEntropyParams {
        temperature: 0.1,
        label_smoothing: 0.01,
    };
    g.bench_function("proto_ce_fwd", |bch| {
        bch.iter(|| black_box(cross_entropy_forward(&z, &t, params).unwrap()))
    });
    let (_, ctx) = cross_entropy_forward(&z, &t, params).unwrap();
    g.bench_function("proto_ce_bwd", |bch| {
        bch.iter(|| black_box(cross_entropy_backward(1.0f32, &t, &ctx).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, bench_linear);
criterion_main!(benches);
