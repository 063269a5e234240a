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
