//! The bf16 GEMM's weight packers (`src/ops/gemm_bf16_pack.rs`) and the transpose that rounds to
//! bf16 (`transpose::transpose_bf16`, the dW GEMM's dyᵀ, and `transpose_bf16_sums`, with
//! the bias gradient's column sums) against their scalar references, bit for bit: odd shapes (1, 7,
//! 45×65, widths not divisible by 16 or 32, odd k), every kind of value (NaN payloads of both
//! signs, ±∞, subnormals, −0, RNE ties, the largest finite value that rounds to ∞), and the
//! panels' padding.
use clipforge::ops::gemm_bf16::PackedBf16;
use clipforge::ops::transpose::{transpose_bf16, transpose_bf16_reference, transpose_bf16_sums, transpose_bf16_sums_reference, transpose_reference, SUM_ROWS};

/// f32 values: mostly ordinary magnitudes, with special bit patterns mixed in.
fn values(len: usize, seed: u64) -> Vec<f32> {
    const SPECIAL: [u32; 12] = [
        0x7FC0_0000, // quiet NaN
        0x7F80_0001, // signalling NaN (made quiet by the rounding)
        0xFFFF_FFFF, // negative NaN, all payload bits
        0x7F80_0000, // +∞
        0xFF80_0000, // −∞
        0x0000_0001, // smallest subnormal
        0x807F_FFFF, // largest negative subnormal
        0x8000_0000, // −0
        0x3F80_8000, // a tie, even: stays
        0x3F81_8000, // a tie, odd: rounds up
        0x7F7F_FFFF, // the largest finite f32: rounds to +∞ in bf16
        0x3F80_7FFF, // just below a tie
    ];
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            if s.is_multiple_of(7) {
                f32::from_bits(SPECIAL[(s >> 8) as usize % SPECIAL.len()])
            } else {
                ((s >> 11) as f64 / (1u64 << 53) as f64 * 8.0 - 4.0) as f32
            }
        })
        .collect()
}

const SHAPES: [(usize, usize); 14] =
    [(1, 1), (1, 2), (7, 3), (7, 7), (16, 32), (31, 33), (32, 32), (33, 1), (45, 65), (65, 45), (100, 59), (3, 0), (0, 5), (70, 514)];

fn same_bits(what: &str, got: &[u32], want: &[u32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!("{what}: first difference at u32 {i}: {:#010x}, reference {:#010x}", got[i], want[i]);
    }
}

/// A packer against its reference on every shape, bit for bit, and each element (j, kk) of the
/// reference against bf16 of the value it packs (W = x, or W = xᵀ when `transposed`).
fn check_packer(what: &str, seed: u64, fast: fn(&[f32], usize, usize) -> PackedBf16, reference: fn(&[f32], usize, usize) -> PackedBf16, transposed: bool) {
    for (s, &(rows, cols)) in SHAPES.iter().enumerate() {
        let x = values(rows * cols, s as u64 + seed);
        let (got, want) = (fast(&x, rows, cols), reference(&x, rows, cols));
        same_bits(&format!("{what} {rows}x{cols}"), got.pairs(), want.pairs());
        // W is [rows×cols] as given, or [cols×rows] for a transposed packer
        let (n, k) = if transposed { (cols, rows) } else { (rows, cols) };
        assert_eq!((got.n(), got.k()), (n, k), "{what} {rows}x{cols}: the weight's shape");
        for j in 0..n {
            for kk in 0..k {
                let v = if transposed { x[kk * cols + j] } else { x[j * cols + kk] };
                assert_eq!(want.get(j, kk).to_bits(), half::bf16::from_f32(v).to_bits(), "{what} reference {rows}x{cols} at ({j}, {kk})");
            }
        }
    }
}

#[test]
fn from_f32_matches_the_reference_bit_for_bit() {
    check_packer("from_f32", 1, PackedBf16::from_f32, PackedBf16::from_f32_reference, false);
}

#[test]
fn from_f32_t_matches_the_reference_bit_for_bit() {
    check_packer("from_f32_t", 100, PackedBf16::from_f32_t, PackedBf16::from_f32_t_reference, true);
}

#[test]
fn transpose_reference_moves_every_value() {
    for (s, &(rows, cols)) in SHAPES.iter().chain(&[(17, 1000), (1000, 17), (300, 300)]).enumerate() {
        let x = values(rows * cols, s as u64 + 200);
        let reference = transpose_reference(&x, rows, cols);
        for i in 0..rows {
            for j in 0..cols {
                assert_eq!(reference[j * rows + i].to_bits(), x[i * cols + j].to_bits(), "transpose_reference {rows}x{cols} at ({i}, {j})");
            }
        }
    }
}

/// The transpose that rounds to bf16 (the dW GEMM's dyᵀ): the reference's bits — each value
/// `half::bf16::from_f32` of the element it moves — on every shape, including row counts around
/// its 32-row tasks (31, 32, 33, 65).
#[test]
fn transpose_bf16_matches_the_reference_bit_for_bit() {
    for (s, &(rows, cols)) in SHAPES.iter().chain(&[(17, 1000), (1000, 17), (300, 300), (64, 48), (96, 17)]).enumerate() {
        let x = values(rows * cols, s as u64 + 300);
        let (fast, reference) = (transpose_bf16(&x, rows, cols), transpose_bf16_reference(&x, rows, cols));
        let bits = |v: &[half::bf16]| v.iter().map(|x| x.to_bits() as u32).collect::<Vec<_>>();
        same_bits(&format!("transpose_bf16 {rows}x{cols}"), &bits(&fast), &bits(&reference));
        for i in 0..rows {
            for j in 0..cols {
                let want = half::bf16::from_f32(x[i * cols + j]).to_bits();
                assert_eq!(reference[j * rows + i].to_bits(), want, "transpose_bf16_reference {rows}x{cols} at ({i}, {j})");
            }
        }
    }
}

/// The transpose with the bias gradient's column sums: the transpose's bits as `transpose_bf16`,
/// the sums' bits as the reference's order (each 32-row block from zero, the blocks in order) —
/// which is checked against f64 sums on ordinary values; NaN and ∞ reach the sums.
#[test]
fn transpose_bf16_sums_match_the_reference_bit_for_bit() {
    for (s, &(rows, cols)) in SHAPES.iter().chain(&[(17, 1000), (1000, 17), (300, 300), (64, 48), (96, 17), (33, 7)]).enumerate() {
        for special in [true, false] {
            let x = if special { values(rows * cols, s as u64 + 900) } else { (0..rows * cols).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0).collect() };
            let ((ft, fs), (rt, rs)) = (transpose_bf16_sums(&x, rows, cols), transpose_bf16_sums_reference(&x, rows, cols));
            let bits = |v: &[half::bf16]| v.iter().map(|x| x.to_bits() as u32).collect::<Vec<_>>();
            same_bits(&format!("transpose_bf16_sums {rows}x{cols}"), &bits(&ft), &bits(&transpose_bf16(&x, rows, cols)));
            same_bits(&format!("transpose_bf16_sums_reference {rows}x{cols}"), &bits(&rt), &bits(&transpose_bf16_reference(&x, rows, cols)));
            // a NaN as one pattern: which NaN an addition of two returns is not specified in Rust
            // (LLVM may swap an addition's operands), only that it is NaN
            let f32bits = |v: &[f32]| v.iter().map(|x| if x.is_nan() { 0x7FC0_0000 } else { x.to_bits() }).collect::<Vec<_>>();
            same_bits(&format!("column sums {rows}x{cols}"), &f32bits(&fs), &f32bits(&rs));
            for j in 0..cols {
                // the reference's order, spelled out
                let mut total = 0f32;
                for b in (0..rows).step_by(SUM_ROWS) {
                    let part = (b..rows.min(b + SUM_ROWS)).fold(0f32, |p, i| p + x[i * cols + j]);
                    total += part;
                }
                assert!(rs[j].to_bits() == total.to_bits() || (rs[j].is_nan() && total.is_nan()), "reference sum {rows}x{cols} column {j}");
                if !special {
                    let exact: f64 = (0..rows).map(|i| x[i * cols + j] as f64).sum();
                    let bound = 1e-6 * (0..rows).map(|i| x[i * cols + j].abs() as f64).sum::<f64>() + 1e-6;
                    assert!((rs[j] as f64 - exact).abs() <= bound, "sum {rows}x{cols} column {j}: {} against {exact}", rs[j]);
                }
            }
        }
    }
}
