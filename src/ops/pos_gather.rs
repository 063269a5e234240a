//! Positional-embedding gather through Long-CLIP's knowledge-preserved stretch (methods.md §2.1),
//! and its backward. CPU twin of kernels/pos_gather.cu.
//!
//! A base table P [L, W] is stretched with (keep, ratio) to Ln = ratio·L − (ratio−1)·keep rows
//! (77, 20, 4 → 248); stretched row j is
//! ```text
//!   j < keep:                         P[j]                                              (9)
//!   keep ≤ j < E = keep+ratio(L−1−keep), i = (j−keep)/ratio, r = (j−keep)%ratio:
//!                                     (1 − r/ratio)·P[keep+i] + (r/ratio)·P[keep+i+1]     (10)
//!   E ≤ j < Ln, r = j − E:            P[L−1] + (r/ratio)·(P[L−1] − P[L−2])               (11)
//! ```
//! The gather reads `out[n] = stretched[pos[n]]` without materialising the table; the backward
//! scatters d_out into dP [L, W] deterministically (each dP row sums its own contributions in a
//! fixed order; no atomics anywhere). ratio = 1 is the identity: a plain gather/scatter.
//!
//! References are plain loops in f64 ([`stretch_reference`], [`pos_gather_reference`],
//! [`pos_gather_bwd_reference`]); the fast paths ([`stretch`], [`pos_gather`],
//! [`pos_gather_bwd`]) are f32, rows in parallel, with exactly the kernel's per-row arithmetic.
use super::fastmath::par_rows;
use crate::error::{Error, Result};
use rayon::prelude::*;

/// Stretch parameters: base length `len` (L), `keep` rows copied, `ratio` (interpolation factor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stretch {
    pub len: usize,
    pub keep: usize,
    pub ratio: usize,
}

impl Stretch {
    /// Long-CLIP: 77 → 248 positions.
    pub const LONG_CLIP: Stretch = Stretch { len: 77, keep: 20, ratio: 4 };

    /// Checked constructor: L ≥ 2, keep ≤ L − 1, ratio ≥ 1.
    pub fn new(len: usize, keep: usize, ratio: usize) -> Result<Self> {
        if len < 2 || keep >= len || ratio == 0 || ratio.checked_mul(len).is_none_or(|v| v > i32::MAX as usize) {
            return Err(Error::msg(format!("invalid positional stretch: L = {len}, keep = {keep}, ratio = {ratio} (need L >= 2, keep <= L-1, ratio >= 1)")));
        }
        Ok(Stretch { len, keep, ratio })
    }

    /// Ln = ratio·L − (ratio−1)·keep.
    pub fn new_len(&self) -> usize {
        self.ratio * self.len - (self.ratio - 1) * self.keep
    }

    /// First row of the extrapolated tail, E = keep + ratio·(L−1−keep).
    fn mid_end(&self) -> usize {
        self.keep + self.ratio * (self.len - 1 - self.keep)
    }

    /// Stretched row j as `w0·P[i0] + w1·P[i1]` with f32 weights (the fast path's and the kernel's).
    #[inline]
    pub fn coef(&self, j: usize) -> (usize, f32, usize, f32) {
        let (keep, ratio, len) = (self.keep, self.ratio, self.len);
        if j < keep {
            (j, 1.0, j, 0.0)
        } else if j < self.mid_end() {
            let (i, r) = ((j - keep) / ratio, (j - keep) % ratio);
            let w = r as f32 / ratio as f32;
            (keep + i, 1.0 - w, keep + i + 1, w)
        } else {
            let w = (j - self.mid_end()) as f32 / ratio as f32;
            (len - 1, 1.0 + w, len - 2, -w)
        }
    }

    fn check(&self, table_len: usize, width: usize, pos: &[u32]) -> Result<()> {
        Stretch::new(self.len, self.keep, self.ratio)?;
        if table_len != self.len * width {
            return Err(crate::shape_err!("positional table has {table_len} values, expected L·W = {}·{width}", self.len));
        }
        let ln = self.new_len();
        if let Some(&bad) = pos.iter().find(|&&p| p as usize >= ln) {
            return Err(Error::msg(format!("position id {bad} out of range for a stretched length of {ln}")));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- references (f64, plain)

/// The whole stretched table [Ln, W] in f64, written case by case as formulas (9)–(11).
/// Generic over the element type so finite differences can perturb an f64 table.
pub fn stretch_reference<T: Copy + Into<f64>>(p: &[T], width: usize, s: Stretch) -> Vec<f64> {
    let (l, keep, ratio) = (s.len, s.keep, s.ratio);
    let p: Vec<f64> = p.iter().map(|&v| v.into()).collect();
    let row = |i: usize| &p[i * width..(i + 1) * width];
    let mut out = Vec::with_capacity(s.new_len() * width);
    for j in 0..keep {
        out.extend_from_slice(row(j));
    }
    for i in 0..l - 1 - keep {
        for r in 0..ratio {
            let w = r as f64 / ratio as f64;
            let (a, b) = (row(keep + i), row(keep + i + 1));
            out.extend(a.iter().zip(b).map(|(&a, &b)| (1.0 - w) * a + w * b));
        }
    }
    for r in 0..ratio {
        let w = r as f64 / ratio as f64;
        let (last, prev) = (row(l - 1), row(l - 2));
        out.extend(last.iter().zip(prev).map(|(&a, &b)| a + w * (a - b)));
    }
    debug_assert_eq!(out.len(), s.new_len() * width);
    out
}

/// `out[n] = stretched[pos[n]]` in f64 `[rows, W]`.
pub fn pos_gather_reference<T: Copy + Into<f64>>(p: &[T], width: usize, s: Stretch, pos: &[u32]) -> Result<Vec<f64>> {
    s.check(p.len(), width, pos)?;
    let table = stretch_reference(p, width, s);
    Ok(pos.iter().flat_map(|&j| table[j as usize * width..(j as usize + 1) * width].iter().copied()).collect())
}

/// dP [L, W] in f64: the transpose of the gather, one scatter-add per (n, contributing base row).
pub fn pos_gather_bwd_reference<T: Copy + Into<f64>>(dout: &[T], width: usize, s: Stretch, pos: &[u32]) -> Result<Vec<f64>> {
    s.check(s.len * width, width, pos)?;
    if dout.len() != pos.len() * width {
        return Err(crate::shape_err!("d_out has {} values, expected rows·W = {}·{width}", dout.len(), pos.len()));
    }
    let (l, keep, ratio) = (s.len, s.keep, s.ratio);
    let mut dp = vec![0f64; l * width];
    for (n, &j) in pos.iter().enumerate() {
        let j = j as usize;
        let d = &dout[n * width..(n + 1) * width];
        // the same three cases as stretch_reference, in f64
        let terms: Vec<(usize, f64)> = if j < keep {
            vec![(j, 1.0)]
        } else if j < keep + ratio * (l - 1 - keep) {
            let (i, r) = ((j - keep) / ratio, (j - keep) % ratio);
            let w = r as f64 / ratio as f64;
            vec![(keep + i, 1.0 - w), (keep + i + 1, w)]
        } else {
            let w = (j - keep - ratio * (l - 1 - keep)) as f64 / ratio as f64;
            vec![(l - 1, 1.0 + w), (l - 2, -w)]
        };
        for (i, w) in terms {
            for (o, &v) in dp[i * width..(i + 1) * width].iter_mut().zip(d) {
                *o += w * v.into();
            }
        }
    }
    Ok(dp)
}

// ---------------------------------------------------------------- fast paths (f32)

#[inline]
fn combine(o: &mut [f32], a: &[f32], w0: f32, b: &[f32], w1: f32) {
    for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
        *o = w0 * a + w1 * b;
    }
}

/// out `[rows, W]` = `stretched[pos[n]]`; errors on shapes or position ids ≥ Ln.
pub fn pos_gather(p: &[f32], width: usize, s: Stretch, pos: &[u32]) -> Result<Vec<f32>> {
    s.check(p.len(), width, pos)?;
    let mut out = vec![0f32; pos.len() * width];
    par_rows(&mut out, width, |n, o| {
        let (i0, w0, i1, w1) = s.coef(pos[n] as usize);
        combine(o, &p[i0 * width..(i0 + 1) * width], w0, &p[i1 * width..(i1 + 1) * width], w1);
    });
    Ok(out)
}

/// The whole stretched table [Ln, W] (for `clipforge stretch` and Long-CLIP checkpoints).
pub fn stretch(p: &[f32], width: usize, s: Stretch) -> Result<Vec<f32>> {
    let pos: Vec<u32> = (0..s.new_len() as u32).collect();
    pos_gather(p, width, s, &pos)
}

/// dP `[L, W]` from d_out `[rows, W]`. Deterministic and parallel in two gathers: (1) the gradient of
/// the stretched table, `dS[j] = Σ_{n: pos[n]=j} d_out[n]` (n ascending), rows j in parallel;
/// (2) `dP[i] = Σ_j w_ij·dS[j]` over the ≤ 3·ratio + 1 stretched rows that touch base row i
/// (j ascending), rows i in parallel.
pub fn pos_gather_bwd(dout: &[f32], width: usize, s: Stretch, pos: &[u32]) -> Result<Vec<f32>> {
    s.check(s.len * width, width, pos)?;
    if dout.len() != pos.len() * width {
        return Err(crate::shape_err!("d_out has {} values, expected rows·W = {}·{width}", dout.len(), pos.len()));
    }
    let ln = s.new_len();
    // bucket the rows by position (counting sort keeps n ascending inside a bucket)
    let mut start = vec![0usize; ln + 1];
    for &j in pos {
        start[j as usize + 1] += 1;
    }
    for j in 0..ln {
        start[j + 1] += start[j];
    }
    let mut fill = start.clone();
    let mut order = vec![0usize; pos.len()];
    for (n, &j) in pos.iter().enumerate() {
        order[fill[j as usize]] = n;
        fill[j as usize] += 1;
    }
    let mut ds = vec![0f32; ln * width];
    ds.par_chunks_mut(width).enumerate().for_each(|(j, row)| {
        for &n in &order[start[j]..start[j + 1]] {
            row.iter_mut().zip(&dout[n * width..(n + 1) * width]).for_each(|(o, &d)| *o += d);
        }
    });
    let mut dp = vec![0f32; s.len * width];
    dp.par_chunks_mut(width).enumerate().for_each(|(i, row)| {
        for j in contributors(s, i) {
            let (i0, w0, i1, w1) = s.coef(j);
            let w = if i0 == i { w0 } else { 0.0 } + if i1 == i && w1 != 0.0 { w1 } else { 0.0 };
            if w != 0.0 {
                row.iter_mut().zip(&ds[j * width..(j + 1) * width]).for_each(|(o, &d)| *o += w * d);
            }
        }
    });
    Ok(dp)
}

/// Stretched rows whose coefficients may name base row i (a superset; ascending, no repeats).
fn contributors(s: Stretch, i: usize) -> Vec<usize> {
    let (keep, ratio, ln) = (s.keep, s.ratio, s.new_len());
    let mut js = Vec::new();
    if i < keep {
        js.push(i);
    }
    // middle rows keep + ratio·(i − keep − 1) .. keep + ratio·(i − keep + 1)
    if i >= keep {
        let lo = keep + ratio * (i - keep).saturating_sub(1);
        let hi = (keep + ratio * (i - keep + 1)).min(s.mid_end());
        js.extend(lo..hi);
    }
    if i + 2 >= s.len {
        js.extend(s.mid_end()..ln);
    }
    js.sort_unstable();
    js.dedup();
    js
}
