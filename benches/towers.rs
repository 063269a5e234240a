//! Criterion benches of whole towers on synthetic ViT-B/32 weights (batch 8 to keep a run short;
//! `clipforge bench` measures batch 32). Run: cargo bench --bench towers
use clipforge::model::synthetic::{normal_vec, random_weights};
use clipforge::model::{ClipConfig, ClipParts, LoadOptions, Towers};
use clipforge::Tensor;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// The binary's allocator (large blocks cache-line aligned), so these numbers are the binary's.
#[global_allocator]
static ALLOC: clipforge::alloc::CacheLineAlloc = clipforge::alloc::CacheLineAlloc;

fn bench_towers(c: &mut Criterion) {
    let cfg = ClipConfig::preset("b32").unwrap();
    let w = random_weights(&cfg, 0);
    let model = ClipParts::load(&w, &cfg, Towers::Both, &LoadOptions::default()).unwrap();
    let b = 8;
    let px = Tensor::from_vec(normal_vec(b * 3 * 224 * 224, 0.0, 1.0, 1), &[b, 3, 224, 224]).unwrap();
    let ids: Vec<Vec<u32>> = (0..b)
        .map(|i| {
            (0..77)
                .map(|j| {
                    if j == 76 {
                        49407
                    } else if j == 0 {
                        49406
                    } else {
                        300 + (i * 77 + j) as u32
                    }
                })
                .collect()
        })
        .collect();
    let mut g = c.benchmark_group("cpu/tower");
    g.sample_size(10);
    g.throughput(Throughput::Elements(b as u64));
    g.bench_function("b32-image-B8", |bch| bch.iter(|| model.vision().unwrap().forward(&px, &mut |_, _| {}).unwrap()));
    g.bench_function("b32-text-B8x77", |bch| bch.iter(|| model.text().unwrap().forward(&ids, None, &mut |_, _| {}).unwrap()));
    g.finish();
}

criterion_group!(benches, bench_towers);
criterion_main!(benches);
