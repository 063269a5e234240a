//! Embedding gather: `out[i] = table[ids[i]]`, and its backward (a scatter-add). Ids are checked
//! (an error, not a panic). [`embedding_bwd`] is the CPU reference; [`group_by_id`] +
//! [`embedding_bwd_grouped`] is the CPU twin of the CUDA kernel `embedding_bwd_rows_f32`
//! (kernels/embed.cu: one thread per (distinct id, column), rows summed in position order).
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

/// Backward of [`embedding`]: `dtable[ids[i]] += dout[i]` (ids repeat: their rows add up). The ids
/// were checked by the forward. One pass in id order: this is the reference and the fast path
/// (the work is a copy of dout; the table-sized zeroing dominates).
pub fn embedding_bwd(dout: &[f32], vocab: usize, width: usize, ids: &[u32]) -> Result<Vec<f32>> {
    if dout.len() != ids.len() * width {
        return Err(crate::shape_err!("embedding backward: {} gradient values for {} ids of width {width}", dout.len(), ids.len()));
    }
    let mut g = crate::ops::fastmath::zeros(vocab * width);
    for (i, &id) in ids.iter().enumerate() {
        let id = id as usize;
        if id >= vocab {
            return Err(Error::msg(format!("token id {id} out of range for a vocabulary of {vocab}")));
        }
        g[id * width..(id + 1) * width].iter_mut().zip(&dout[i * width..(i + 1) * width]).for_each(|(a, b)| *a += b);
    }
    Ok(g)
}

/// The positions grouped by id for `embedding_bwd_rows_f32`: (order, starts, uniq) with the
/// distinct ids ascending, `starts` the U + 1 group offsets into `order`, and each group's
/// positions in increasing order (a stable sort), so the sums add up in the reference's order.
pub fn group_by_id(ids: &[u32]) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let mut order: Vec<i32> = (0..ids.len() as i32).collect();
    order.sort_by_key(|&i| ids[i as usize]); // stable
    let (mut starts, mut uniq) = (vec![], vec![]);
    for (j, &i) in order.iter().enumerate() {
        let id = ids[i as usize] as i32;
        if uniq.last() != Some(&id) {
            uniq.push(id);
            starts.push(j as i32);
        }
    }
    starts.push(order.len() as i32);
    (order, starts, uniq)
}

/// The kernel's arithmetic on the CPU: for each distinct id, sum its rows (in position order)
/// and add the sum to the table row — equal bit for bit to [`embedding_bwd`] into a zero table.
pub fn embedding_bwd_grouped(dout: &[f32], dtable: &mut [f32], width: usize, ids: &[u32]) -> Result<()> {
    if dout.len() != ids.len() * width {
        return Err(crate::shape_err!("embedding backward: {} gradient values for {} ids of width {width}", dout.len(), ids.len()));
    }
    let (order, starts, uniq) = group_by_id(ids);
    for (u, &id) in uniq.iter().enumerate() {
        let row = id as usize * width;
        if row + width > dtable.len() {
            return Err(Error::msg(format!("token id {id} out of range for a table of {} rows", dtable.len() / width.max(1))));
        }
        for c in 0..width {
            let s = (starts[u]..starts[u + 1]).fold(0f32, |s, j| s + dout[order[j as usize] as usize * width + c]);
            dtable[row + c] += s;
        }
    }
    Ok(())
}
