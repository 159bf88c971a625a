//! Criterion benchmarks of the attention family in f32 at ViT-S/16 sizes (6 heads of 64):
//! 224-px crops (B=8, N=197), DINO's 96-px local crops (B=64, N=37), and the position-embedding
//! resize for a 96-px crop (14x14x384 → 6x6 with DINO's scale factor).
//! PyTorch side: benches/torch/attention.py (same case names).

use criterion::{criterion_group, criterion_main, Criterion};
use sdengine::backend::cpu::attention::{attention_backward, attention_forward};
use sdengine::backend::cpu::interp::{bicubic_forward, Bicubic};
use sdengine::Tensor;
use std::hint::black_box;
use std::time::Duration;

const HEADS: usize = 6;
const DIM: usize = 384;

fn attention_cases(c: &mut Criterion, name: &str, b: usize, n: usize) {
    let mut g = c.benchmark_group("attention");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let qkv = Tensor::randn_named(0, "qkv", &[b, n, 3 * DIM], 1.0);
    let dy = Tensor::randn_named(0, "dy", &[b, n, DIM], 1.0);
    g.bench_function(format!("{name}_fwd"), |bch| {
        bch.iter(|| attention_forward(black_box(&qkv), HEADS).expect("attention forward"))
    });
    let (_, ctx) = attention_forward(&qkv, HEADS).expect("attention forward");
    g.bench_function(format!("{name}_bwd"), |bch| {
        bch.iter(|| {
            attention_backward(black_box(&dy), black_box(&qkv), &ctx).expect("attention backward")
        })
    });
    g.finish();
}

fn bench(c: &mut Criterion) {
    attention_cases(c, "attn", 8, 197);
    attention_cases(c, "attn96", 64, 37);
    let mut g = c.benchmark_group("attention");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let pos = Tensor::randn_named(0, "pos", &[14, 14, DIM], 0.02);
    let geom = Bicubic::dino_pos_embed(14, 6, 6).expect("geometry");
    g.bench_function("pos_interp_fwd", |bch| {
        bch.iter(|| bicubic_forward(black_box(&pos), geom).expect("bicubic forward"))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
