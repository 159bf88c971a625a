//! Convolution and pooling at ResNet-50 training shapes (batch 8, 224 px, f32), the same cases as
//! `benches/torch/conv.py`: the stem conv (7x7/2, 3→64; its backward computes only dW, like a
//! first layer), per stage s1..s4 (width 64/128/256/512 at 56/28/14/7 px) the 3x3 conv
//! (width→width) and the expanding 1x1 conv (width→4·width), whose backwards compute dX and dW,
//! the stride-2 convs of stage 2's first block (3x3 128→128 and the 1x1 downsample 256→512, both
//! 56→28), and the stem max-pool (3/2/1, 64 channels, 112→56).

use criterion::{criterion_group, criterion_main, Criterion};
use sdengine::backend::cpu::conv::{conv2d_backward, conv2d_forward, Conv2dParams};
use sdengine::backend::cpu::pool::{max_pool2d_backward, max_pool2d_forward, MaxPool2dParams};
use sdengine::Tensor;
use std::hint::black_box;
use std::time::Duration;

const N: usize = 8;

/// Registers `<name>_fwd` and `<name>_bwd` for a conv `c→o`, kernel `k`, on `hw`x`hw` inputs.
#[allow(clippy::too_many_arguments)]
fn conv_cases(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    c: usize,
    o: usize,
    k: usize,
    p: Conv2dParams,
    hw: usize,
    need_dx: bool,
) {
    let x = Tensor::randn_named(0, "x", &[N, hw, hw, c], 1.0);
    let w = Tensor::randn_named(0, "w", &[o, k, k, c], 0.1);
    let y = conv2d_forward(&x, &w, None, p).expect("forward");
    let dy = Tensor::randn_named(0, "dy", y.shape(), 1.0);
    g.bench_function(format!("{name}_fwd"), |b| {
        b.iter(|| conv2d_forward(black_box(&x), black_box(&w), None, p).expect("forward"))
    });
    g.bench_function(format!("{name}_bwd"), |b| {
        b.iter(|| {
            conv2d_backward(
                black_box(&x),
                black_box(&w),
                black_box(&dy),
                p,
                need_dx,
                false,
            )
            .expect("backward")
        })
    });
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("conv");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let s1p0 = Conv2dParams {
        stride: 1,
        padding: 0,
    };
    let s1p1 = Conv2dParams {
        stride: 1,
        padding: 1,
    };
    let stem = Conv2dParams {
        stride: 2,
        padding: 3,
    };
    conv_cases(&mut g, "conv1", 3, 64, 7, stem, 224, false);
    for (k, (width, hw)) in [(64, 56), (128, 28), (256, 14), (512, 7)]
        .into_iter()
        .enumerate()
    {
        let s = k + 1;
        conv_cases(
            &mut g,
            &format!("s{s}_3x3"),
            width,
            width,
            3,
            s1p1,
            hw,
            true,
        );
        conv_cases(
            &mut g,
            &format!("s{s}_1x1"),
            width,
            4 * width,
            1,
            s1p0,
            hw,
            true,
        );
    }

    // Not in the brief's list, but on ResNet-50's path and the only users of the strided
    // (col2im) input gradient: stage 2's first 3x3 (stride 2) and its 1x1 downsample.
    let s2p1 = Conv2dParams {
        stride: 2,
        padding: 1,
    };
    let s2p0 = Conv2dParams {
        stride: 2,
        padding: 0,
    };
    conv_cases(&mut g, "s2_3x3s2", 128, 128, 3, s2p1, 56, true);
    conv_cases(&mut g, "s2_down", 256, 512, 1, s2p0, 56, true);

    let p = MaxPool2dParams {
        kernel: 3,
        stride: 2,
        padding: 1,
    };
    let x = Tensor::randn_named(0, "x", &[N, 112, 112, 64], 1.0);
    let (y, saved) = max_pool2d_forward(&x, p).expect("forward");
    let dy = Tensor::randn_named(0, "dy", y.shape(), 1.0);
    g.bench_function("maxpool_fwd", |b| {
        b.iter(|| max_pool2d_forward(black_box(&x), p).expect("forward"))
    });
    g.bench_function("maxpool_bwd", |b| {
        b.iter(|| max_pool2d_backward(black_box(&dy), black_box(&saved)).expect("backward"))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
