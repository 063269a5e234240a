//! Criterion benches of the CPU backward ops the autograd tape uses, at ViT-B/32 shapes (batch
//! 32: 1600 image tokens), and of the PCA reconstruction with its gradient (B = 128, D = 512,
//! k = 32), and the per-step packing of bf16 fine-tuning (the weight's and xᵀ's bf16 panels, dyᵀ)
//! at the Long-CLIP text fc1 (1984 tokens = 8 captions × 248, 512 → 2048), each against its
//! scalar reference. Names: cpu-train/<op>/<shape>. Run: cargo bench --bench train_ops
use clipforge::model::synthetic::normal_vec;
use clipforge::ops::attention::{attention, attention_backward, attention_packed, attention_packed_backward, AttnShape};
use clipforge::ops::elementwise::{unary_bwd, Unary};
use clipforge::ops::embedding::{embedding_bwd, embedding_bwd_grouped};
use clipforge::ops::gemm_bf16::PackedBf16;
use clipforge::ops::layernorm::layer_norm_bwd;
use clipforge::ops::patch_embed::{patch_embed_bwd_weight, PatchShape};
use clipforge::ops::pca_grad::{pca_reconstruct, pca_reconstruct_bwd};
use clipforge::ops::softmax::{softmax, softmax_bwd};
use clipforge::ops::transpose::{transpose_bf16, transpose_bf16_reference};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// The binary's allocator (large blocks cache-line aligned), so these numbers are the binary's.
#[global_allocator]
static ALLOC: clipforge::alloc::CacheLineAlloc = clipforge::alloc::CacheLineAlloc;
use std::hint::black_box;

fn bench_backward(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu-train");
    g.sample_size(10);
    let (rows, n) = (1600, 768);
    let (x, dy, gm) = (normal_vec(rows * n, 0.0, 1.0, 1), normal_vec(rows * n, 0.0, 1.0, 2), normal_vec(n, 1.0, 0.1, 3));
    g.throughput(Throughput::Bytes((3 * rows * n * 4) as u64));
    g.bench_function("layernorm_bwd/1600x768", |b| b.iter(|| black_box(layer_norm_bwd(&x, n, &gm, &dy, 1e-5))));
    let (h, dh) = (normal_vec(1600 * 3072, 0.0, 1.0, 4), normal_vec(1600 * 3072, 0.0, 1.0, 5));
    g.throughput(Throughput::Bytes((3 * h.len() * 4) as u64));
    g.bench_function("quick_gelu_bwd/1600x3072", |b| b.iter(|| black_box(unary_bwd(Unary::QuickGelu, &h, &dh))));
    let y = softmax(&normal_vec(256 * 256, 0.0, 1.0, 6), 256);
    let dsm = normal_vec(256 * 256, 0.0, 1.0, 7);
    g.throughput(Throughput::Bytes((3 * y.len() * 4) as u64));
    g.bench_function("softmax_bwd/256x256", |b| b.iter(|| black_box(softmax_bwd(&y, &dsm, 256))));
    let s = AttnShape { batch: 32, seq: 50, heads: 12, head_dim: 64, causal: false, scale: 0.125 };
    let (q, k, v) = (normal_vec(s.numel(), 0.0, 1.0, 8), normal_vec(s.numel(), 0.0, 1.0, 9), normal_vec(s.numel(), 0.0, 1.0, 10));
    let (o, lse) = attention(&q, &k, &v, &s);
    let dout = normal_vec(s.numel(), 0.0, 1.0, 11);
    g.throughput(Throughput::Elements(10 * 32 * 12 * 50 * 50 * 64u64));
    g.bench_function("attention_bwd/B32xT50xH12xd64", |b| b.iter(|| black_box(attention_backward(&q, &k, &v, &o, &lse, &dout, &s))));
    // packed text (the training text tower's layout): 8 Long-CLIP captions of mixed length, no padding
    let lens = [55usize, 180, 248, 55, 180, 248, 55, 180];
    let nt: usize = lens.iter().sum();
    let (q, k, v) = (normal_vec(nt * 512, 0.0, 1.0, 16), normal_vec(nt * 512, 0.0, 1.0, 17), normal_vec(nt * 512, 0.0, 1.0, 18));
    let dout = normal_vec(nt * 512, 0.0, 1.0, 19);
    g.throughput(Throughput::Elements(lens.iter().map(|&l| 2 * l * l * 512).sum::<usize>() as u64));
    g.bench_function("attention_packed/8-captions-H8xd64", |b| b.iter(|| black_box(attention_packed(&q, &k, &v, &lens, 8, true))));
    let (o, lse) = attention_packed(&q, &k, &v, &lens, 8, true);
    g.bench_function("attention_packed_bwd/8-captions-H8xd64", |b| {
        b.iter(|| black_box(attention_packed_backward(&q, &k, &v, &o, &lse, &dout, &lens, 8, true)))
    });
    let ps = PatchShape { batch: 32, channels: 3, height: 224, width: 224, patch: 32, dim: 768 };
    let (px, dp) = (normal_vec(32 * 3 * 224 * 224, 0.0, 1.0, 12), normal_vec(32 * 49 * 768, 0.0, 1.0, 13));
    g.throughput(Throughput::Elements(2 * 32 * 49 * 768 * 3072u64));
    g.bench_function("patch_embed_bwd_weight/B32-224-p32-768", |b| b.iter(|| black_box(patch_embed_bwd_weight(&px, &dp, &ps))));
    let (bb, d, kk) = (128, 512, 32);
    let (xf, gf) = (normal_vec(bb * d, 0.0, 1.0, 14), normal_vec(bb * d, 0.0, 1.0, 15));
    g.throughput(Throughput::Elements(1));
    g.bench_function("pca_reconstruct/B128xD512xk32", |b| b.iter(|| black_box(pca_reconstruct(&xf, bb, d, kk).unwrap())));
    let (_, cache) = pca_reconstruct(&xf, bb, d, kk).unwrap();
    g.bench_function("pca_reconstruct_bwd/B128xD512xk32", |b| b.iter(|| black_box(pca_reconstruct_bwd(&cache, &gf).unwrap())));
    // token-embedding gradient, B/32 text at batch 32 (32·77 positions, W 512, vocabulary 49408):
    // the reference scatter vs the grouped CPU twin of embedding_bwd_rows_f32
    let (n, w, v) = (32 * 77, 512, 49408);
    let ids: Vec<u32> = (0..n).map(|i| ((i * 2654435761usize) % 4000) as u32).collect();
    let dx = normal_vec(n * w, 0.0, 1.0, 9);
    g.bench_function("embedding_bwd/B32xT77xW512", |b| b.iter(|| black_box(embedding_bwd(&dx, v, w, &ids).unwrap())));
    let mut table = vec![0f32; v * w];
    g.bench_function("embedding_bwd_grouped/B32xT77xW512", |b| b.iter(|| embedding_bwd_grouped(&dx, black_box(&mut table), w, &ids).unwrap()));
    g.finish();
}

/// The bf16 fine-tune step's packing per Linear: W (forward), Wᵀ and xᵀ (backward) into bf16
/// pair panels, and dyᵀ (the dW GEMM's A) — fast paths and their scalar references.
fn bench_packing(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu-train");
    g.sample_size(10);
    let (m, k, n) = (1984, 512, 2048);
    let (w, x, dy) = (normal_vec(n * k, 0.0, 0.02, 20), normal_vec(m * k, 0.0, 1.0, 21), normal_vec(m * n, 0.0, 1.0, 22));
    g.throughput(Throughput::Bytes((w.len() * 4) as u64));
    g.bench_function("pack_bf16_w/2048x512", |b| b.iter(|| black_box(PackedBf16::from_f32(&w, n, k))));
    g.bench_function("pack_bf16_w_reference/2048x512", |b| b.iter(|| black_box(PackedBf16::from_f32_reference(&w, n, k))));
    g.bench_function("pack_bf16_wt/2048x512", |b| b.iter(|| black_box(PackedBf16::from_f32_t(&w, n, k))));
    g.throughput(Throughput::Bytes((x.len() * 4) as u64));
    g.bench_function("pack_bf16_xt/1984x512", |b| b.iter(|| black_box(PackedBf16::from_f32_t(&x, m, k))));
    g.bench_function("pack_bf16_xt_reference/1984x512", |b| b.iter(|| black_box(PackedBf16::from_f32_t_reference(&x, m, k))));
    g.throughput(Throughput::Bytes((dy.len() * 4) as u64));
    g.bench_function("transpose_bf16/1984x2048", |b| b.iter(|| black_box(transpose_bf16(&dy, m, n))));
    g.bench_function("transpose_bf16_reference/1984x2048", |b| b.iter(|| black_box(transpose_bf16_reference(&dy, m, n))));
    g.finish();
}

criterion_group!(benches, bench_backward, bench_packing);
criterion_main!(benches);
