//! Reductions over the last dim of a contiguous [rows × n] array (other dims are moved last by
//! the tensor layer). Reference: f64 accumulation. Fast: f32 lanes, rows in parallel.
use super::fastmath::par_rows;
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduce {
    Sum,
    Mean,
    Max,
    Min,
}

pub fn reduce_reference(op: Reduce, x: &[f32], n: usize) -> Vec<f32> {
    if n == 0 {
        return vec![];
    }
    x.chunks(n)
        .map(|r| match op {
            Reduce::Sum => r.iter().map(|&v| v as f64).sum::<f64>() as f32,
            Reduce::Mean => (r.iter().map(|&v| v as f64).sum::<f64>() / n as f64) as f32,
            Reduce::Max => r.iter().cloned().fold(f32::NEG_INFINITY, f32::max),
            Reduce::Min => r.iter().cloned().fold(f32::INFINITY, f32::min),
        })
        .collect()
}

/// Sum of a slice with 16 independent accumulators (vectorises; better rounding than one chain).
#[inline]
pub fn sum_f32(r: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = r.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    let tail: f32 = chunks.remainder().iter().sum();
    acc.iter().sum::<f32>() + tail
}

#[inline]
pub fn max_f32(r: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = r.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] = acc[i].max(c[i]);
        }
    }
    chunks.remainder().iter().chain(acc.iter()).cloned().fold(f32::NEG_INFINITY, f32::max)
}

pub fn reduce(op: Reduce, x: &[f32], n: usize) -> Vec<f32> {
    if n == 0 {
        return vec![];
    }
    let rows = x.len() / n;
    let mut out = vec![0f32; rows];
    par_rows(&mut out, 1, |i, o| {
        let r = &x[i * n..(i + 1) * n];
        o[0] = match op {
            Reduce::Sum => sum_f32(r),
            Reduce::Mean => sum_f32(r) / n as f32,
            Reduce::Max => max_f32(r),
            Reduce::Min => -max_f32(&r.iter().map(|v| -v).collect::<Vec<_>>()),
        };
    });
    out
}

/// Column sums of a row-major [m, n] matrix, rows added in order (a fixed reduction order:
/// bitwise-reproducible): bias gradients.
pub fn col_sums(g: &[f32], n: usize) -> Vec<f32> {
    let mut s = vec![0f32; n];
    if n == 0 {
        return s;
    }
    // column ranges in parallel, each summing all rows in order (the same bits as one pass)
    let per = if g.len() < 1 << 16 { n } else { n.div_ceil(4 * rayon::current_num_threads()).next_multiple_of(16) };
    s.par_chunks_mut(per).enumerate().for_each(|(c, sc)| {
        for row in g.chunks_exact(n) {
            sc.iter_mut().zip(&row[c * per..]).for_each(|(a, b)| *a += b);
        }
    });
    s
}
