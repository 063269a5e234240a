//! Criterion benches of the CPU ops at CLIP shapes (ViT-B/32 batch 32: 1600 image tokens,
//! 2464 text tokens). Names: cpu/<op>/<shape>. Run: cargo bench --bench ops
use clipforge::model::synthetic::normal_vec;
use clipforge::ops::attention::{attention, AttnShape};
use clipforge::ops::elementwise::{unary, Unary};
use clipforge::ops::gemm_bf16::{matmul_bf16, matmul_bf16_forced, resolve, Kernel, PackedBf16};
use clipforge::ops::gemm_f32::{gemm_tuned, Tuning};
use clipforge::ops::layernorm::layer_norm;
use clipforge::ops::matmul::{gemm, gemm_faer, linear, View};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

/// The binary's allocator (large blocks cache-line aligned), so these numbers are the binary's.
#[global_allocator]
static ALLOC: clipforge::alloc::CacheLineAlloc = clipforge::alloc::CacheLineAlloc;
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

/// The three GEMMs of a training Linear (y = x·Wᵀ, dX = dY·W, dW = dYᵀ·x) at fine-tune shapes
/// (B/32 batch 8: 400 image tokens; ~1250 packed text tokens), the AVX-512 path against faer.
fn bench_gemm_train(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu/gemm_train");
    g.sample_size(10);
    for &(m, k, n) in &[(400, 768, 3072), (1252, 512, 2048)] {
        let (x, w, dy) = (normal_vec(m * k, 0.0, 1.0, 1), normal_vec(n * k, 0.0, 0.02, 2), normal_vec(m * n, 0.0, 1.0, 3));
        let (xv, wv, gv) = (View::row_major(&x, m, k), View::row_major(&w, n, k), View::row_major(&dy, m, n));
        let (mut y, mut dx, mut dw) = (vec![0f32; m * n], vec![0f32; m * k], vec![0f32; n * k]);
        g.throughput(Throughput::Elements((2 * m * n * k) as u64)); // FLOPs
        for (name, f) in [("", gemm as fn(View, View, &mut [f32], bool)), ("-faer", gemm_faer)] {
            g.bench_function(format!("fwd{name}/{m}x{k}x{n}"), |b| b.iter(|| f(xv, wv.t(), black_box(&mut y), false)));
            g.bench_function(format!("dx{name}/{m}x{k}x{n}"), |b| b.iter(|| f(gv, wv, black_box(&mut dx), false)));
            g.bench_function(format!("dw{name}/{m}x{k}x{n}"), |b| b.iter(|| f(gv.t(), xv, black_box(&mut dw), false)));
        }
    }
    g.finish();
}

/// The AVX-512 f32 GEMM at the towers' Linear shapes (y = x·Wᵀ; ViT-B/32 batch 32: 1600 image
/// tokens, 2464 text tokens) under each tuning, so the two blockings compare on
/// whatever CPU runs the bench.
fn bench_gemm_f32_tunings(c: &mut Criterion) {
    if !clipforge::ops::gemm_f32::available() {
        return;
    }
    let mut g = c.benchmark_group("cpu/gemm_f32");
    g.sample_size(10);
    for &(m, k, n) in &[(1600, 768, 768), (1600, 768, 3072), (1600, 3072, 768), (2464, 512, 2048), (2464, 2048, 512)] {
        let (x, w) = (normal_vec(m * k, 0.0, 1.0, 1), normal_vec(n * k, 0.0, 0.02, 2));
        let (xv, wv) = (View::row_major(&x, m, k), View::row_major(&w, n, k));
        let mut y = vec![0f32; m * n];
        g.throughput(Throughput::Elements((2 * m * n * k) as u64)); // FLOPs
        for t in [Tuning::Prefetch, Tuning::Plain] {
            g.bench_function(format!("{t:?}/{m}x{k}x{n}"), |b| b.iter(|| gemm_tuned(xv, wv.t(), black_box(&mut y), false, t)));
        }
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
        // each kernel this CPU runs as asked (one it lacks would fall back to another: skipped)
        for kernel in [Kernel::Avx512Fp16, Kernel::Avx512Fma, Kernel::Avx512Bf16] {
            if resolve(kernel) == kernel {
                g.bench_function(format!("{kernel:?}/{m}x{k}x{n}"), |bch| bch.iter(|| matmul_bf16_forced(black_box(&x), m, &p, Some(&b), &mut y, kernel)));
            }
        }
    }
    g.finish();
}

/// The MLP of a ViT-B/32 block in bf16 (batch 32: 1600 tokens) through the CPU backend: fc1 with
/// its bias, bf16 rounding and QuickGELU fused in the GEMM's store (the output kept in bf16)
/// against the unfused composite (GEMM with bias, then a rounding pass and an activation pass, f32
/// between them); fc2 with the residual add fused against GEMM + add pass, from a bf16 and an
/// f32 input.
fn bench_linear_fused_bf16(c: &mut Criterion) {
    use clipforge::backend::cpu::Cpu;
    use clipforge::backend::{Act, Ops};
    use clipforge::ops::fastmath::par_rows;
    use clipforge::{DType, Tensor};
    let mut g = c.benchmark_group("cpu/linear_fused_bf16");
    g.sample_size(10);
    let (m, k, n) = (1600, 768, 3072);
    let t = |v: Vec<f32>| Tensor::from_vec(v.clone(), &[v.len()]).unwrap();
    let (x, b1, b2, res) =
        (t(normal_vec(m * k, 0.0, 1.0, 1)), t(normal_vec(n, 0.0, 0.02, 3)), t(normal_vec(k, 0.0, 0.02, 4)), t(normal_vec(m * k, 0.0, 1.0, 5)));
    let w1 = Cpu.weight(t(normal_vec(n * k, 0.0, 0.02, 2)), n, k, DType::BF16).unwrap();
    let w2 = Cpu.weight(t(normal_vec(k * n, 0.0, 0.02, 6)), k, n, DType::BF16).unwrap();
    g.throughput(Throughput::Elements((2 * m * n * k) as u64)); // FLOPs
    g.bench_function(format!("act-fused/{m}x{k}x{n}"), |bch| bch.iter(|| black_box(Cpu.linear_act(&x, &w1, &b1, m, Act::QuickGelu, false).unwrap())));
    let Some(clipforge::backend::cpu::CpuPacked::Bf16(h)) = w1.half.as_deref() else { unreachable!("a bf16 weight") };
    let p = &h.fwd;
    g.bench_function(format!("act-unfused/{m}x{k}x{n}"), |bch| {
        bch.iter(|| {
            let xd = x.f32_data();
            let mut pre = clipforge::ops::fastmath::zeros(m * n);
            matmul_bf16(&xd, m, p, Some(&b1.f32_data()), &mut pre);
            par_rows(&mut pre, n, |_, r| r.iter_mut().for_each(|v| *v = half::bf16::from_f32(*v).to_f32()));
            black_box(unary(Unary::QuickGelu, &pre))
        })
    });
    let h16 = Cpu.linear_act(&x, &w1, &b1, m, Act::QuickGelu, false).unwrap().0; // [m, n] bf16
    let h32 = t(h16.to_vec_f32());
    g.bench_function(format!("add-fused-bf16in/{m}x{n}x{k}"), |bch| bch.iter(|| black_box(Cpu.linear_add(&h16, &w2, &b2, m, &res).unwrap())));
    g.bench_function(format!("add-fused-f32in/{m}x{n}x{k}"), |bch| bch.iter(|| black_box(Cpu.linear_add(&h32, &w2, &b2, m, &res).unwrap())));
    g.bench_function(format!("add-unfused/{m}x{n}x{k}"), |bch| {
        bch.iter(|| {
            let mut y = Cpu.linear(&h32, &w2, Some(&b2), m).unwrap();
            Cpu.axpy(&mut y, &res, 1.0, m * k).unwrap();
            black_box(y)
        })
    });
    g.finish();
}

/// The f32 MLP Linears with the bias and activation / residual add fused into the AVX-512 GEMM's
/// tile stores (what the f32 towers run) against their composite twins (Linear, then the bias +
/// activation pass or the residual add pass), and with the weight frozen (`Ops::freeze_weight`:
/// packed once, as inference models hold it) against packing it per call.
fn bench_linear_fused_f32(c: &mut Criterion) {
    use clipforge::backend::cpu::Cpu;
    use clipforge::backend::{Act, Ops};
    use clipforge::{DType, Tensor};
    let mut g = c.benchmark_group("cpu/linear_fused_f32");
    g.sample_size(10);
    let (m, k, n) = (1600, 768, 3072);
    let t = |v: Vec<f32>| Tensor::from_vec(v.clone(), &[v.len()]).unwrap();
    let (x, b1, b2, res) =
        (t(normal_vec(m * k, 0.0, 1.0, 1)), t(normal_vec(n, 0.0, 0.02, 3)), t(normal_vec(k, 0.0, 0.02, 4)), t(normal_vec(m * k, 0.0, 1.0, 5)));
    let w1 = Cpu.weight(t(normal_vec(n * k, 0.0, 0.02, 2)), n, k, DType::F32).unwrap();
    let w2 = Cpu.weight(t(normal_vec(k * n, 0.0, 0.02, 6)), k, n, DType::F32).unwrap();
    g.throughput(Throughput::Elements((2 * m * n * k) as u64)); // FLOPs
    g.bench_function(format!("act-fused/{m}x{k}x{n}"), |bch| bch.iter(|| black_box(Cpu.linear_act(&x, &w1, &b1, m, Act::QuickGelu, false).unwrap())));
    g.bench_function(format!("act-unfused/{m}x{k}x{n}"), |bch| {
        bch.iter(|| black_box(Cpu.bias_act(Cpu.linear(&x, &w1, None, m).unwrap(), &b1, m, n, Act::QuickGelu, false).unwrap()))
    });
    // The same Linear with its weight frozen (packed once, as an inference model loads it).
    let mut w1p = Cpu.weight(t(normal_vec(n * k, 0.0, 0.02, 2)), n, k, DType::F32).unwrap();
    Cpu.freeze_weight(&mut w1p).unwrap();
    g.bench_function(format!("act-fused-frozen/{m}x{k}x{n}"), |bch| bch.iter(|| black_box(Cpu.linear_act(&x, &w1p, &b1, m, Act::QuickGelu, false).unwrap())));
    let h = Cpu.linear_act(&x, &w1, &b1, m, Act::QuickGelu, false).unwrap().0; // [m, n]
    g.bench_function(format!("add-fused/{m}x{n}x{k}"), |bch| bch.iter(|| black_box(Cpu.linear_add(&h, &w2, &b2, m, &res).unwrap())));
    let mut w2p = Cpu.weight(t(normal_vec(k * n, 0.0, 0.02, 6)), k, n, DType::F32).unwrap();
    Cpu.freeze_weight(&mut w2p).unwrap();
    g.bench_function(format!("add-fused-frozen/{m}x{n}x{k}"), |bch| bch.iter(|| black_box(Cpu.linear_add(&h, &w2p, &b2, m, &res).unwrap())));
    g.bench_function(format!("add-unfused/{m}x{n}x{k}"), |bch| {
        bch.iter(|| {
            let mut y = Cpu.linear(&h, &w2, Some(&b2), m).unwrap();
            Cpu.axpy(&mut y, &res, 1.0, m * k).unwrap();
            black_box(y)
        })
    });
    g.finish();
}

/// The attention forward's two CPU paths (AVX-512 small GEMMs + 16-lane softmax; portable faer +
/// scalar loops) at the towers' shapes.
fn bench_attention_paths(c: &mut Criterion) {
    use clipforge::ops::attention::attention_portable;
    let mut g = c.benchmark_group("cpu/attention_paths");
    g.sample_size(10);
    for &(b, t, h, causal) in &[(32, 50, 12, false), (32, 77, 8, true)] {
        let s = AttnShape { batch: b, seq: t, heads: h, head_dim: 64, causal, scale: 0.125 };
        let (q, k, v) = (normal_vec(s.numel(), 0.0, 1.0, 4), normal_vec(s.numel(), 0.0, 1.0, 5), normal_vec(s.numel(), 0.0, 1.0, 6));
        g.throughput(Throughput::Elements((4 * b * h * t * t * 64) as u64));
        let name = format!("B{b}xT{t}xH{h}xd64{}", if causal { "-causal" } else { "" });
        #[cfg(target_arch = "x86_64")]
        if clipforge::ops::gemm_f32::available() {
            g.bench_function(format!("avx512/{name}"), |bch| bch.iter(|| black_box(clipforge::ops::attention::attention_avx512(&q, &k, &v, &s))));
        }
        g.bench_function(format!("portable/{name}"), |bch| bch.iter(|| black_box(attention_portable(&q, &k, &v, &s))));
    }
    g.finish();
}

fn bench_attention(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu/attention");
    g.sample_size(10);
    // the towers at batch 32 / 8, and one long sequence alone (a served request: batch 1)
    for &(b, t, h, causal) in &[(32, 50, 12, false), (32, 77, 8, true), (8, 197, 12, false), (1, 248, 8, true), (1, 577, 16, false)] {
        let s = AttnShape { batch: b, seq: t, heads: h, head_dim: 64, causal, scale: 0.125 };
        let (q, k, v) = (normal_vec(s.numel(), 0.0, 1.0, 4), normal_vec(s.numel(), 0.0, 1.0, 5), normal_vec(s.numel(), 0.0, 1.0, 6));
        g.throughput(Throughput::Elements((4 * b * h * t * t * 64) as u64));
        g.bench_function(format!("B{b}xT{t}xH{h}xd64{}", if causal { "-causal" } else { "" }), |bch| bch.iter(|| black_box(attention(&q, &k, &v, &s))));
    }
    g.finish();
}

/// The attention backward's CPU paths ((sequence, head) tasks on the AVX-512 small GEMM; batches
/// in parallel on faer; the five products on the bf16 GEMM, `bf16-` its own kernel choice) at
/// fine-tuning shapes: the ViT-B/32 image tower and Long-CLIP's
/// 248-token text (batch 8), and a ViT-L/14 image (batch 4).
fn bench_attention_bwd(c: &mut Criterion) {
    use clipforge::ops::attention::{attention_backward_portable, attention_reference};
    use clipforge::ops::attention_bf16_bwd::attention_backward_bf16;
    use clipforge::ops::gemm_bf16::Kernel;
    let mut g = c.benchmark_group("cpu/attention_bwd");
    g.sample_size(10);
    for &(b, t, h, causal) in &[(8, 50, 12, false), (8, 248, 8, true), (4, 257, 16, false)] {
        let s = AttnShape { batch: b, seq: t, heads: h, head_dim: 64, causal, scale: 0.125 };
        let (q, k, v, dout) =
            (normal_vec(s.numel(), 0.0, 1.0, 4), normal_vec(s.numel(), 0.0, 1.0, 5), normal_vec(s.numel(), 0.0, 1.0, 6), normal_vec(s.numel(), 0.0, 1.0, 7));
        let (o, lse) = attention_reference(&q, &k, &v, &s);
        g.throughput(Throughput::Elements((10 * b * h * t * t * 64) as u64)); // five products
        let name = format!("B{b}xT{t}xH{h}xd64{}", if causal { "-causal" } else { "" });
        #[cfg(target_arch = "x86_64")]
        if clipforge::ops::gemm_f32::available() {
            use clipforge::ops::attention::attention_backward_avx512;
            g.bench_function(format!("avx512/{name}"), |bch| bch.iter(|| black_box(attention_backward_avx512(&q, &k, &v, &o, &lse, &dout, &s))));
        }
        g.bench_function(format!("portable/{name}"), |bch| bch.iter(|| black_box(attention_backward_portable(&q, &k, &v, &o, &lse, &dout, &s))));
        // the bf16 backward (`attention_bf16_bwd.rs`) on bf16 q, k, v, as a bf16 model gives them
        // (on `vdpbf16ps`: fused per 14-row panel); `bf16-f32-in`: f32 ones, rounded while
        // packing (the GEMM-composed path everywhere)
        let r = |x: &[f32]| x.iter().map(|&y| half::bf16::from_f32(y)).collect::<Vec<half::bf16>>();
        let (q16, k16, v16) = (r(&q), r(&k), r(&v));
        g.bench_function(format!("bf16/{name}"), |bch| bch.iter(|| black_box(attention_backward_bf16(&q16, &k16, &v16, &o, &lse, &dout, &s, Kernel::Auto))));
        g.bench_function(format!("bf16-f32-in/{name}"), |bch| bch.iter(|| black_box(attention_backward_bf16(&q, &k, &v, &o, &lse, &dout, &s, Kernel::Auto))));
    }
    g.finish();
}

/// The f32 attention against the bf16 one (QKᵀ and PV through the bf16 GEMM) on long sequences:
/// Long-CLIP's 248-token text (causal) and a ViT-L/14 image (257 tokens). `bf16-auto` is the
/// bf16 GEMM's own choice here (f32 FMAs on Intel without AMX), `bf16-vdpbf16ps` the AVX512-BF16
/// kernel (what AMD takes); on AMX, `bf16-auto` is the tile kernel. `bf16-in`: bf16 inputs, as a
/// bf16 model gives them (on `vdpbf16ps`: the fused per-head forward, `attention_bf16_fused.rs`).
fn bench_attention_bf16(c: &mut Criterion) {
    use clipforge::ops::attention_bf16::attention_bf16;
    use clipforge::ops::gemm_bf16::{has_avx512_bf16, Kernel};
    let mut g = c.benchmark_group("cpu/attention_bf16");
    g.sample_size(10);
    // Long-CLIP text, ViT-L/14 image, and the B/32 towers' batch-32 shapes (text causal, image)
    for &(b, t, h, causal) in &[(8, 248, 8, true), (4, 257, 16, false), (32, 77, 12, true), (32, 50, 12, false)] {
        let s = AttnShape { batch: b, seq: t, heads: h, head_dim: 64, causal, scale: 0.125 };
        let (q, k, v) = (normal_vec(s.numel(), 0.0, 1.0, 4), normal_vec(s.numel(), 0.0, 1.0, 5), normal_vec(s.numel(), 0.0, 1.0, 6));
        g.throughput(Throughput::Elements((4 * b * h * t * t * 64) as u64));
        let name = format!("B{b}xT{t}xH{h}xd64{}", if causal { "-causal" } else { "" });
        g.bench_function(format!("f32/{name}"), |bch| bch.iter(|| black_box(attention(&q, &k, &v, &s))));
        g.bench_function(format!("bf16-auto/{name}"), |bch| bch.iter(|| black_box(attention_bf16(&q, &k, &v, &s, Kernel::Auto))));
        if has_avx512_bf16() {
            g.bench_function(format!("bf16-vdpbf16ps/{name}"), |bch| bch.iter(|| black_box(attention_bf16(&q, &k, &v, &s, Kernel::Avx512Bf16))));
        }
        // q, k, v already bf16, as a bf16 model keeps them: on `vdpbf16ps` the fused per-head form
        let r = |x: &[f32]| x.iter().map(|&y| half::bf16::from_f32(y)).collect::<Vec<_>>();
        let (q16, k16, v16) = (r(&q), r(&k), r(&v));
        g.bench_function(format!("bf16-in/{name}"), |bch| bch.iter(|| black_box(attention_bf16(&q16, &k16, &v16, &s, Kernel::Auto))));
    }
    g.finish();
}

/// The attention's softmax alone (`attn_kernel::softmax_rows`: the max, the scaled exp with its
/// sum, the normalisation; four rows interleaved) over one query block's scores: B/32's 50×50,
/// a 56-row block of B/16 (197 keys) and of L/14-336 (577 keys). Each iteration first restores
/// the scores (a copy of rows × keys values, included in the time).
fn bench_softmax(c: &mut Criterion) {
    #[cfg(target_arch = "x86_64")]
    {
        use clipforge::ops::attn_kernel::softmax_rows;
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut g = c.benchmark_group("cpu/softmax_rows");
        for &(rows, nk) in &[(50, 50), (56, 197), (56, 577)] {
            let x = normal_vec(rows * nk, 0.0, 4.0, 3); // [rows, keys]
            let (mut sc, mut lse) = (x.clone(), vec![0f32; rows]);
            g.throughput(Throughput::Elements((rows * nk) as u64));
            g.bench_function(format!("{rows}x{nk}"), |bch| {
                bch.iter(|| {
                    sc.copy_from_slice(&x);
                    // SAFETY: AVX-512F was detected; every row sees its nk keys.
                    unsafe { softmax_rows(&mut sc, nk, 0.125, |_| nk, &mut lse) };
                    black_box(&lse);
                })
            });
        }
        g.finish();
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = c;
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
    let x = normal_vec(1600 * 3072, 0.0, 1.0, 10);
    g.throughput(Throughput::Bytes((2 * x.len() * 4) as u64));
    g.bench_function("1600x3072", |bch| bch.iter(|| black_box(unary(Unary::QuickGelu, black_box(&x)))));
    // the bf16 MLP's epilogue on one core, tile row by tile row (32 values): the pre-activation
    // rounded to bf16, QuickGELU, the output narrowed to bf16 — the CPU's narrowing against the
    // integer form
    {
        use clipforge::ops::act_simd::{act_row_with, ActDst, Narrow};
        let n = 14 * 32 * 8; // eight 14×32 tiles, L1-resident
        let src = &x[..n];
        let (mut r, mut o) = (src.to_vec(), vec![half::bf16::ZERO; n]);
        g.throughput(Throughput::Elements(n as u64));
        for narrow in [Narrow::Auto, Narrow::Integer] {
            g.bench_function(format!("act_row_round_bf16/{narrow:?}/{n}"), |bch| {
                bch.iter(|| {
                    r.copy_from_slice(src);
                    for (row, out) in r.chunks_mut(32).zip(o.chunks_mut(32)) {
                        act_row_with(Unary::QuickGelu, true, row, ActDst::Bf16(out), narrow);
                    }
                })
            });
        }
    }
    g.finish();
    // the backward dy·act′(x): the op (all threads), and one core's 16-lane and scalar loops
    use clipforge::ops::act_simd::{act_grad_into, act_grad_scalar};
    let mut g = c.benchmark_group("cpu/quick_gelu_bwd");
    let dy = normal_vec(x.len(), 0.0, 1.0, 11);
    g.throughput(Throughput::Bytes((3 * x.len() * 4) as u64));
    g.bench_function("unary_bwd/1600x3072", |bch| bch.iter(|| black_box(clipforge::ops::elementwise::unary_bwd(Unary::QuickGelu, black_box(&x), &dy))));
    let (xs, ds, mut out) = (&x[..1 << 16], &dy[..1 << 16], vec![0f32; 1 << 16]);
    g.throughput(Throughput::Elements(1 << 16));
    g.bench_function("simd-1core/65536", |bch| bch.iter(|| act_grad_into(Unary::QuickGelu, black_box(xs), ds, &mut out)));
    g.bench_function("scalar-1core/65536", |bch| bch.iter(|| act_grad_scalar(Unary::QuickGelu, black_box(xs), ds, &mut out)));
    // the loop `unary_bwd` ran before the 16-lane form: the formula inline, for LLVM to vectorise
    g.bench_function("scalar-inline-1core/65536", |bch| {
        bch.iter(|| {
            for ((o, &v), &d) in out.iter_mut().zip(black_box(xs)).zip(ds) {
                let s = clipforge::ops::fastmath::sigmoid(1.702 * v);
                *o = d * (s * (1.0 + 1.702 * v * (1.0 - s)));
            }
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_matmul,
    bench_gemm_train,
    bench_gemm_f32_tunings,
    bench_matmul_bf16,
    bench_linear_fused_bf16,
    bench_linear_fused_f32,
    bench_attention,
    bench_attention_bwd,
    bench_attention_bf16,
    bench_attention_paths,
    bench_softmax,
    bench_layernorm,
    bench_quick_gelu
);
criterion_main!(benches);
