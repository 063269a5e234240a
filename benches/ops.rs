//! Criterion benches of the CPU ops at CLIP shapes (ViT-B/32 batch 32: 1600 image tokens,
//! 2464 text tokens). Names: cpu/<op>/<shape>. Run: cargo bench --bench ops
use clipforge::model::synthetic::normal_vec;
use clipforge::ops::attention::{attention, AttnShape};
use clipforge::ops::gemm_bf16::{matmul_bf16, PackedBf16};
use clipforge::ops::elementwise::{unary_inplace, Unary};
use clipforge::ops::layernorm::layer_norm;
use clipforge::ops::matmul::linear;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;

fn bench_matmul(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu/linear");
    g.sample_size(10);
    for &(m, k, n) in &[(1600, 768, 768), (1600, 768, 3072), (1600, 3072, 768), (2464, 512, 2048)] {
        let (x, w, b) = (normal_vec(m * k, 0.0, 1.0, 1), normal_vec(n * k, 0.0, 0.02, 2), normal_vec(n, 0.0, 0.02, 3));
        g.throughput(Throughput::Elements((2 * m * n * k) as u64)); // FLOPs
        g.bench_function(format!("{m}x{k}x{n}"), |bch| bch.iter(|| black_box(linear(&x, m, k, &w, n, Some(&b)))));
    }
    g.finish();
}

fn bench_matmul_bf16(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu/linear_bf16");
    g.sample_size(10);
    for &(m, k, n) in &[(1600, 768, 768), (1600, 768, 3072), (1600, 3072, 768), (2464, 512, 2048)] {
        let (x, w, b) = (normal_vec(m * k, 0.0, 1.0, 1), normal_vec(n * k, 0.0, 0.02, 2), normal_vec(n, 0.0, 0.02, 3));
        let p = PackedBf16::from_f32(&w, n, k);
        let mut y = vec![0f32; m * n];
        g.throughput(Throughput::Elements((2 * m * n * k) as u64)); // FLOPs
        g.bench_function(format!("{m}x{k}x{n}"), |bch| bch.iter(|| matmul_bf16(black_box(&x), m, &p, Some(&b), &mut y)));
    }
    g.finish();
}

fn bench_attention(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu/attention");
    g.sample_size(10);
    for &(b, t, h, causal) in &[(32, 50, 12, false), (32, 77, 8, true), (8, 197, 12, false)] {
        let s = AttnShape { batch: b, seq: t, heads: h, head_dim: 64, causal, scale: 0.125 };
        let (q, k, v) = (normal_vec(s.numel(), 0.0, 1.0, 4), normal_vec(s.numel(), 0.0, 1.0, 5), normal_vec(s.numel(), 0.0, 1.0, 6));
        g.throughput(Throughput::Elements((4 * b * h * t * t * 64) as u64));
        g.bench_function(format!("B{b}xT{t}xH{h}xd64{}", if causal { "-causal" } else { "" }), |bch| bch.iter(|| black_box(attention(&q, &k, &v, &s))));
    }
    g.finish();
}

fn bench_layernorm(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu/layernorm");
    for &(rows, n) in &[(1600, 768), (2464, 512)] {
        let (x, gm, bt) = (normal_vec(rows * n, 0.0, 1.0, 7), normal_vec(n, 1.0, 0.1, 8), normal_vec(n, 0.0, 0.1, 9));
        g.throughput(Throughput::Bytes((2 * rows * n * 4) as u64));
        g.bench_function(format!("{rows}x{n}"), |bch| bch.iter(|| black_box(layer_norm(&x, n, &gm, &bt, 1e-5))));
    }
    g.finish();
}

fn bench_quick_gelu(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu/quick_gelu");
    let mut x = normal_vec(1600 * 3072, 0.0, 1.0, 10);
    g.throughput(Throughput::Bytes((2 * x.len() * 4) as u64));
    g.bench_function("1600x3072", |bch| bch.iter(|| unary_inplace(Unary::QuickGelu, black_box(&mut x))));
    g.finish();
}

criterion_group!(benches, bench_matmul, bench_matmul_bf16, bench_attention, bench_layernorm, bench_quick_gelu);
criterion_main!(benches);
