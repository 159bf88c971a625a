//! Criterion benchmark of a full Suave training forward + backward on the CPU: the exact
//! ResNet-50 backbone plus Suave's heads (projection 2048→2048→128 with BN, 1000 prototypes,
//! three online linear heads), batch 8 at 224 px, train mode, f32. The upstream gradients of the
//! prototype scores and the online logits are fixed random tensors (the loss is not included).
//! `benches/torch/model_resnet.py` times the same step in PyTorch (channels-last);
//! `python3 benches/torch/run.py --threads 2 --families model_resnet` prints the ratio.

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use sdengine::models::resnet::ResNetConfig;
use sdengine::models::suave_head::{SuaveGrads, SuaveHeadConfig, SuaveNet};
use sdengine::nn::ParamStore;
use sdengine::Tensor;
use std::hint::black_box;
use std::time::Duration;

const BATCH: usize = 8;
const PX: usize = 224;

fn bench_model(c: &mut Criterion) {
    let mut g = c.benchmark_group("model_resnet");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(3))
        .measurement_time(Duration::from_secs(10));

    let mut store = ParamStore::new();
    let net = SuaveNet::new(
        &mut store,
        ResNetConfig::resnet50(),
        SuaveHeadConfig::default(),
        0,
    )
    .unwrap();
    let x = Tensor::randn_named(0, "x", &[BATCH, PX, PX, 3], 1.0);
    let inputs = [x];
    let d_scores = Tensor::randn_named(0, "d.scores", &[BATCH, 1000], 1.0);
    let d_online = Tensor::randn_named(0, "d.online", &[BATCH, 1000], 1.0);
    g.bench_function("suave_r50_b8_224_train_bwd", |b| {
        b.iter(|| {
            net.head.normalize_prototypes(&mut store).unwrap();
            let (out, cache) = net.forward(&mut store, &inputs, true).unwrap();
            net.backward(
                &mut store,
                cache,
                SuaveGrads {
                    scores: &d_scores,
                    embedding: None,
                    online: Some([&d_online, &d_online, &d_online]),
                },
            )
            .unwrap();
            black_box(out.scores);
        })
    });
    g.finish();
}

criterion_group!(benches, bench_model);
criterion_main!(benches);
