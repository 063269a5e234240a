//! CPU tests of the row-major → cuBLASLt column-major mapping in `gemm.rs`: a reference of
//! cuBLASLt's column-major strided-batched semantics (with the BIAS epilogue) is driven by
//! `plan()` and compared with the row-major definition.
use super::*;

/// Deterministic pseudo-random values in [-1, 1).
fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// cuBLASLt: D_b = alpha·op(A_b)·op(B_b) + beta·C_b + bias (column-major, element (r, c) at
/// r + c·ld, batch b at offset b·stride). A' is our B buffer and B' our A buffer.
fn lt_reference(p: &LtPlan, a: &[f32], b: &[f32], c: &mut [f32], bias: Option<&[f32]>, alpha: f32, beta: f32) {
    for bt in 0..p.batch as usize {
        let (oa, ob, oc) = (bt * p.stride_a as usize, bt * p.stride_b as usize, bt * p.stride_c as usize);
        for i in 0..p.m as usize {
            for j in 0..p.n as usize {
                let mut acc = 0.0f32;
                for l in 0..p.k as usize {
                    let av = if p.trans_a { a[oa + l + i * p.a.2 as usize] } else { a[oa + i + l * p.a.2 as usize] };
                    let bv = if p.trans_b { b[ob + j + l * p.b.2 as usize] } else { b[ob + l + j * p.b.2 as usize] };
                    acc += av * bv;
                }
                let idx = oc + i + j * p.c.2 as usize;
                c[idx] = alpha * acc + beta * c[idx] + bias.map_or(0.0, |v| v[i]);
            }
        }
    }
}

/// The row-major definition in GemmDesc's docs.
fn row_major_reference(d: &GemmDesc, a: &[f32], b: &[f32], c: &mut [f32], bias: Option<&[f32]>) {
    for bt in 0..d.batch {
        for i in 0..d.m {
            for j in 0..d.n {
                let mut acc = 0.0f32;
                for l in 0..d.k {
                    let av = if d.trans_a { a[bt * d.stride_a + l * d.lda + i] } else { a[bt * d.stride_a + i * d.lda + l] };
                    let bv = if d.trans_b { b[bt * d.stride_b + j * d.ldb + l] } else { b[bt * d.stride_b + l * d.ldb + j] };
                    acc += av * bv;
                }
                let idx = bt * d.stride_c + i * d.ldc + j;
                c[idx] = d.alpha * acc + d.beta * c[idx] + bias.map_or(0.0, |v| v[j]);
            }
        }
    }
}

fn check(d: &GemmDesc, seed: u64) {
    let p = plan(d).unwrap();
    let len = |ld: usize, rows: usize, stride: usize| (d.batch - 1) * stride + rows * ld;
    let a = rand_vec(len(d.lda, if d.trans_a { d.k } else { d.m }, d.stride_a), seed);
    let b = rand_vec(len(d.ldb, if d.trans_b { d.n } else { d.k }, d.stride_b), seed + 1);
    let c0 = rand_vec(len(d.ldc, d.m, d.stride_c), seed + 2);
    let bias = d.bias.then(|| rand_vec(d.n, seed + 3));
    let (mut want, mut got) = (c0.clone(), c0);
    row_major_reference(d, &a, &b, &mut want, bias.as_deref());
    lt_reference(&p, &b, &a, &mut got, bias.as_deref(), d.alpha, d.beta); // operands swapped
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert!((w - g).abs() <= 1e-5 * (1.0 + w.abs()), "{d:?} index {i}: want {w}, got {g}");
    }
}

#[test]
fn linear_maps_to_tn_with_bias_over_features() {
    let d = GemmDesc::linear(5, 7, 3, DType::F32, true);
    let p = plan(&d).unwrap();
    assert_eq!((p.m, p.n, p.k), (7, 5, 3));
    assert!(p.trans_a && !p.trans_b);
    assert_eq!(p.a, (3, 7, 3)); // W: stored k×n col-major, ld k
    assert_eq!(p.b, (3, 5, 3)); // x: stored k×m col-major, ld k
    assert_eq!(p.c, (7, 5, 7)); // y: n×m col-major, ld n
    check(&d, 1);
    check(&GemmDesc::linear(1, 1, 1, DType::BF16, false), 2);
}

#[test]
fn batched_all_transpose_combinations() {
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let mut d = GemmDesc::batched(3, 4, 6, 5, ta, tb, DType::F32);
        d.alpha = 0.5;
        d.beta = 0.25;
        check(&d, 10 + ta as u64 * 2 + tb as u64);
    }
}

#[test]
fn attention_on_packed_qkv_with_row_strides() {
    // Q, K, V interleaved per token in [T, 3·D] rows, one head of width D per batch item
    // (heads at column offsets): scores = Q·Kᵀ with lda = ldb = 3·D; out = P·V.
    let (t, dh, heads) = (6, 4, 2);
    let ld = 3 * heads * dh;
    let mut d = GemmDesc::batched(heads, t, t, dh, false, true, DType::F32);
    d.lda = ld;
    d.ldb = ld;
    d.stride_a = dh;
    d.stride_b = dh;
    d.alpha = 0.5;
    check(&d, 20);
    let mut pv = GemmDesc::batched(heads, t, dh, t, false, false, DType::F32);
    pv.ldb = ld;
    pv.stride_b = dh;
    pv.ldc = heads * dh; // output heads side by side: [T, H·D]
    pv.stride_c = dh;
    check(&pv, 21);
}

#[test]
fn invalid_descs_are_rejected() {
    let ok = GemmDesc::linear(2, 3, 4, DType::F32, false);
    assert!(plan(&GemmDesc { k: 0, ..ok }).is_err());
    assert!(plan(&GemmDesc { ldb: 3, ..ok }).unwrap_err().to_string().contains("leading dimension"));
    assert!(plan(&GemmDesc { out_dtype: DType::BF16, ..ok }).is_err());
    assert!(plan(&GemmDesc { in_dtype: DType::BF16, ..ok }).is_ok()); // bf16 in, f32 out
    assert!(plan(&GemmDesc { batch: 2, stride_c: 5, ..ok }).unwrap_err().to_string().contains("overlap"));
}

#[test]
fn alignments() {
    assert_eq!(ptr_alignment(0x7f00_0000_0000), 256);
    assert_eq!(ptr_alignment(0x7f00_0000_0010), 16);
    assert_eq!(ptr_alignment(0x7f00_0000_0002), 2);
    assert_eq!(ptr_alignment(0), 256);
    assert_eq!(DType::BF16.size(), 2);
}
