//! Patch embedding: a convolution whose stride equals its kernel (no bias), as CLIP's conv1.
//! Reference: direct convolution loops. Fast: im2col into [B·N, C·P·P] then one GEMM with the
//! weight viewed as [D, C·P·P]. Output [B, N, D] with N = (H/P)·(W/P), patches in raster order.
//! With bf16 weights the CPU backend builds the im2col rows in bf16 ([`im2col_bf16`]: the bf16
//! GEMM's own rounding of an f32 A, so the same bits, at half the bytes, packed as they are).
use super::act_simd::to_bf16_into;
use super::fastmath::written_by;
use super::matmul::{gemm, View};
use half::bf16;
use rayon::prelude::*;

#[derive(Clone, Copy, Debug)]
pub struct PatchShape {
    pub batch: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub patch: usize,
    pub dim: usize,
}

impl PatchShape {
    pub fn grid(&self) -> (usize, usize) {
        (self.height / self.patch, self.width / self.patch)
    }
    pub fn patches(&self) -> usize {
        let (gh, gw) = self.grid();
        gh * gw
    }
}

pub fn patch_embed_reference(px: &[f32], w: &[f32], s: &PatchShape) -> Vec<f32> {
    let (gh, gw) = s.grid();
    let (c, p) = (s.channels, s.patch);
    let mut out = vec![0f32; s.batch * gh * gw * s.dim];
    for b in 0..s.batch {
        for gy in 0..gh {
            for gx in 0..gw {
                for o in 0..s.dim {
                    let mut acc = 0f64;
                    for ci in 0..c {
                        for py in 0..p {
                            for pxx in 0..p {
                                let x = px[((b * c + ci) * s.height + gy * p + py) * s.width + gx * p + pxx];
                                acc += x as f64 * w[((o * c + ci) * p + py) * p + pxx] as f64;
                            }
                        }
                    }
                    out[((b * gh + gy) * gw + gx) * s.dim + o] = acc as f32;
                }
            }
        }
    }
    out
}

/// The im2col matrix [B·N, C·P·P] of the patches (rows in output order).
pub fn im2col(px: &[f32], s: &PatchShape) -> Vec<f32> {
    im2col_as(px, s, |src, dst| dst.copy_from_slice(src))
}

/// [`im2col`] rounded to bf16 (`half::bf16::from_f32`'s bits, as the bf16 GEMM rounds an f32 A):
/// the A of a bf16 patch GEMM, written at half the size and packed by the GEMM as it is.
pub fn im2col_bf16(px: &[f32], s: &PatchShape) -> Vec<bf16> {
    im2col_as(px, s, to_bf16_into)
}

/// im2col with `put` copying (or converting) each P-value run of a pixel row into its place; no
/// zero-fill first (every value is written).
fn im2col_as<T: Copy + Send + Sync>(px: &[f32], s: &PatchShape, put: impl Fn(&[f32], &mut [T]) + Sync) -> Vec<T> {
    let (gh, gw) = s.grid();
    let (c, p) = (s.channels, s.patch);
    let kdim = c * p * p;
    let rows = s.batch * gh * gw;
    assert!(px.len() >= s.batch * c * s.height * s.width, "im2col: fewer pixels than the shape");
    let fill = |cols: &mut [T]| {
        if kdim == 0 {
            return Ok::<(), std::convert::Infallible>(());
        }
        cols.par_chunks_mut(kdim).enumerate().with_min_len(8).for_each(|(r, row)| {
            let (b, g) = (r / (gh * gw), r % (gh * gw));
            let (gy, gx) = (g / gw, g % gw);
            for ci in 0..c {
                for py in 0..p {
                    let src = ((b * c + ci) * s.height + gy * p + py) * s.width + gx * p;
                    put(&px[src..src + p], &mut row[(ci * p + py) * p..][..p]);
                }
            }
        });
        Ok(())
    };
    // SAFETY: the (ci, py) runs of P values tile each row's C·P·P values: every value is written
    // once, none read. [B·N, C·P·P]
    match unsafe { written_by(rows * kdim, fill) } {
        Ok(v) => v,
        Err(never) => match never {},
    }
}

pub fn patch_embed(px: &[f32], w: &[f32], s: &PatchShape) -> Vec<f32> {
    let kdim = s.channels * s.patch * s.patch;
    let rows = s.batch * s.patches();
    let cols = im2col(px, s); // [B·N, C·P·P]
    let mut out = vec![0f32; rows * s.dim]; // [B·N, D]
    gemm(View::row_major(&cols, rows, kdim), View::row_major(w, s.dim, kdim).t(), &mut out, false);
    out
}

/// Backward to the weight (pixels need no gradient): dW [D, C·P·P] = doutᵀ [D, B·N] · cols.
pub fn patch_embed_bwd_weight(px: &[f32], dout: &[f32], s: &PatchShape) -> Vec<f32> {
    let kdim = s.channels * s.patch * s.patch;
    let rows = s.batch * s.patches();
    let cols = im2col(px, s); // [B·N, C·P·P]
    let mut dw = vec![0f32; s.dim * kdim]; // [D, C·P·P]
    gemm(View::row_major(dout, rows, s.dim).t(), View::row_major(&cols, rows, kdim), &mut dw, false);
    dw
}

/// Reference of [`patch_embed_bwd_weight`]: direct loops in f64.
pub fn patch_embed_bwd_weight_reference(px: &[f32], dout: &[f32], s: &PatchShape) -> Vec<f64> {
    let (gh, gw) = s.grid();
    let (c, p) = (s.channels, s.patch);
    let mut dw = vec![0f64; s.dim * c * p * p];
    for b in 0..s.batch {
        for gy in 0..gh {
            for gx in 0..gw {
                for o in 0..s.dim {
                    let d = dout[((b * gh + gy) * gw + gx) * s.dim + o] as f64;
                    for ci in 0..c {
                        for py in 0..p {
                            for pxx in 0..p {
                                let x = px[((b * c + ci) * s.height + gy * p + py) * s.width + gx * p + pxx] as f64;
                                dw[((o * c + ci) * p + py) * p + pxx] += d * x;
                            }
                        }
                    }
                }
            }
        }
    }
    dw
}
