//! Criterion benchmarks of whole training steps (forward + backward) at batch 8, 224 px:
//! ResNet-50 + Suave heads and ViT-S/16 + Daino head. The cases are defined once in
//! `sdengine::bench::model_cases` (also run by `sdengine bench`); `benches/torch/model_*.py`
//! time the same steps in PyTorch.
use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use std::time::Duration;

fn models(c: &mut Criterion) {
    let cases = sdengine::bench::model_cases().expect("building the benchmark models");
    for mut case in cases {
        let mut g = c.benchmark_group(case.family);
        g.sample_size(10)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_secs(3))
            .measurement_time(Duration::from_secs(10));
        g.bench_function(case.name, |b| b.iter(|| (case.run)().expect("step")));
        g.finish();
    }
}

criterion_group!(benches, models);
criterion_main!(benches);
