//! Criterion benchmark of a full training step's compute for the Daino student: ViT-S/16
//! (drop path 0.1) + Daino head (1000 prototypes, trainable weight_g), batch 8 at 224 px, f32,
//! forward + backward into every parameter gradient (gradients zeroed each step, as an optimiser
//! step would). `benches/torch/model_vit.py` times the same in PyTorch (timm + DINO's head):
//! `python3 benches/torch/run.py --threads 2 --families model_vit`.

use criterion::{criterion_group, criterion_main, Criterion};
use sdengine::models::daino_head::{DinoHeadConfig, MultiCropWrapper};
use sdengine::models::vit::VitConfig;
use sdengine::nn::ParamStore;
use sdengine::rng::Rng;
use sdengine::Tensor;
use std::hint::black_box;
use std::time::Duration;

fn bench(c: &mut Criterion) {
    let mut store = ParamStore::new();
    let model = MultiCropWrapper::new(
        &mut store,
        VitConfig::vit_small().with_drop_path(0.1),
        DinoHeadConfig::daino(384),
        0,
    )
    .expect("model");
    let crops = [Tensor::randn_named(0, "x", &[8, 224, 224, 3], 1.0)];
    let dl = Tensor::randn_named(0, "dl", &[8, 1000], 1.0);
    let mut g = c.benchmark_group("model_vit");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10));
    let mut step = 0u64;
    g.bench_function("vits16_daino_b8_224_fwd_bwd", |b| {
        b.iter(|| {
            step += 1;
            let mut rng = Rng::named(step, "drop_path");
            store.zero_grads();
            let (out, cache) = model
                .forward(&store, black_box(&crops), Some(&mut rng))
                .expect("forward");
            model.backward(&mut store, cache, &dl).expect("backward");
            out.logits
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
