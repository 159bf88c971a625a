//! Data-pipeline throughput on real ImageNet files (`../shared/data/imagenet-samples`): JPEG
//! decoding, decoding + RandomResizedCrop(224) + Normalize, and the full Suave multi-crop set
//! (2x224 + 8x96 with jitter, grayscale and blur) per image. Everything runs on one thread, so
//! the throughput criterion reports is images per second per core. benches/torch/data.py times
//! Pillow + torchvision on the same files (`python3 benches/torch/run.py --families data
//! --threads 1`).

use std::path::{Path, PathBuf};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sdengine::data::augment::{sample_crop, MultiCrop, SUAVE_NORM};
use sdengine::data::transforms::{normalize_into, resized_crop, Interpolation};
use sdengine::data::{decode_bytes, Dataset};
use sdengine::rng::Rng;

/// Images per iteration (the first N of the sorted folder, the same N as the PyTorch side).
const N: usize = 64;

fn samples_dir() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    [root.join("../shared/data"), root.join("../../shared/data")]
        .into_iter()
        .map(|d| d.join("imagenet-samples/train"))
        .find(|p| p.is_dir())
}

fn bench(c: &mut Criterion) {
    let Some(dir) = samples_dir() else {
        println!(
            "SKIP data benches: ../shared/data/imagenet-samples not found beside the checkout"
        );
        return;
    };
    let ds = match Dataset::image_folder(&dir) {
        Ok(d) => d,
        Err(e) => {
            println!("SKIP data benches: {e}");
            return;
        }
    };
    let files: Vec<(PathBuf, Vec<u8>)> = ds
        .samples
        .iter()
        .take(N)
        .filter_map(|s| std::fs::read(&s.path).ok().map(|b| (s.path.clone(), b)))
        .collect();
    let mut g = c.benchmark_group("data");
    g.sample_size(10);
    g.throughput(Throughput::Elements(files.len() as u64));

    g.bench_function("decode", |b| {
        b.iter(|| {
            for (p, bytes) in &files {
                let img = decode_bytes(bytes, p).expect("decode");
                std::hint::black_box(img);
            }
        })
    });

    let mut out = vec![0.0f32; 224 * 224 * 3];
    g.bench_function("decode_rrc224", |b| {
        b.iter(|| {
            for (i, (p, bytes)) in files.iter().enumerate() {
                let img = decode_bytes(bytes, p).expect("decode");
                let mut rng = Rng::new(0).fork(i as u64);
                let crop = sample_crop(
                    &mut rng,
                    img.height,
                    img.width,
                    (0.08, 1.0),
                    (0.75, 4.0 / 3.0),
                );
                let x = resized_crop(&img, crop, 224, Interpolation::Bilinear, false);
                normalize_into(&x, SUAVE_NORM.mean, SUAVE_NORM.std, &mut out);
                std::hint::black_box(&out);
            }
        })
    });

    let suave = MultiCrop::suave_unlabelled(true);
    let mut bufs: Vec<Vec<f32>> = suave.views.iter().map(|v| vec![0.0; v.numel()]).collect();
    g.bench_function("suave_multicrop", |b| {
        b.iter(|| {
            for (i, (p, bytes)) in files.iter().enumerate() {
                let img = decode_bytes(bytes, p).expect("decode");
                let params = suave.sample(&Rng::new(0).fork(i as u64), img.height, img.width);
                for ((aug, par), buf) in suave.views.iter().zip(&params).zip(bufs.iter_mut()) {
                    aug.apply(&img, par, buf);
                }
                std::hint::black_box(&bufs);
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
