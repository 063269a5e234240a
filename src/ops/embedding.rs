//! Embedding gather: out[i] = table[ids[i]]. Ids are checked (an error, not a panic).
use crate::error::{Error, Result};

pub fn embedding(table: &[f32], vocab: usize, width: usize, ids: &[u32]) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(ids.len() * width);
    for &id in ids {
        let id = id as usize;
        if id >= vocab {
            return Err(Error::msg(format!("token id {id} out of range for a vocabulary of {vocab}")));
        }
        out.extend_from_slice(&table[id * width..(id + 1) * width]);
    }
    Ok(out)
}

/// Backward of [`embedding`]: dtable[ids[i]] += dout[i] (ids repeat: their rows add up). The ids
/// were checked by the forward. One pass in id order: this is the reference and the fast path
/// (the work is a copy of dout; the table-sized zeroing dominates).
pub fn embedding_bwd(dout: &[f32], vocab: usize, width: usize, ids: &[u32]) -> Result<Vec<f32>> {
    if dout.len() != ids.len() * width {
        return Err(crate::shape_err!("embedding backward: {} gradient values for {} ids of width {width}", dout.len(), ids.len()));
    }
    let mut g = vec![0f32; vocab * width];
    for (i, &id) in ids.iter().enumerate() {
        let id = id as usize;
        if id >= vocab {
            return Err(Error::msg(format!("token id {id} out of range for a vocabulary of {vocab}")));
        }
        g[id * width..(id + 1) * width].iter_mut().zip(&dout[i * width..(i + 1) * width]).for_each(|(a, b)| *a += b);
    }
    Ok(g)
}
