//! The tests' oracle: the CLIP block and towers composed of tape ops (each with its own tape rule,
//! tested against its f64 reference and finite differences), which the one block and tower code
//! of src/model/ (forward and hand-written backward) is compared with. Test-only: the library runs
//! the one code everywhere.
#![allow(dead_code)]
use clipforge::autograd::{Tape, Var};
use clipforge::backend::Seqs;
use clipforge::model::config::{Activation, TowerConfig};
use clipforge::model::schema::{names, Tower};
use clipforge::model::text::pool_position;
use clipforge::ops::elementwise::Unary;
use clipforge::train::model::{StepVars, TrainClip};
use clipforge::{Error, Result, Tensor};

fn v<'a>(m: &TrainClip, sv: &'a StepVars, name: &str) -> Result<&'a Var> {
    m.index(name).map(|i| &sv.vars[i]).ok_or_else(|| Error::msg(format!("no parameter {name}")))
}

/// Block `l`'s 16 tensors ([`BlockParam`](crate::model::BlockParam) order).
pub fn block_vars(m: &TrainClip, sv: &StepVars, tower: Tower, l: usize) -> Vec<Var> {
    sv.vars[m.schema.block(tower, l)].to_vec()
}

/// The tower's blocks on `x`. With `pool`, only those rows of the output are wanted: the last
/// block computes keys and values for every row but everything after attention for the
/// pooled rows only, and the result is [R, W] instead of x's shape.
pub fn encoder(m: &TrainClip, tape: &Tape, sv: &StepVars, tower: Tower, t: &TowerConfig, mut x: Var, seqs: &Seqs, pool: Option<&[usize]>) -> Result<Var> {
    let full = if pool.is_some() { t.layers.saturating_sub(1) } else { t.layers };
    for l in 0..full {
        let p = block_vars(m, sv, tower, l);
        x = block_on(tape, &x, &p, t, seqs)?; // x's shape
    }
    let Some(rows) = pool else { return Ok(x) };
    if full == t.layers {
        let n = x.value().numel() / t.hidden.max(1);
        return tape.gather_rows(&tape.reshape(&x, &[n, t.hidden])?, rows); // no blocks: [R, W]
    }
    block_rows(tape, &x, &block_vars(m, sv, tower, full), t, seqs, rows) // [R, W]
}

/// [`image_embeds`](Self::image_embeds) composed of tape ops (patch embedding, blocks, norms,
/// projection, each with its own tape rule): the oracle the tower code is tested against.
pub fn image_embeds_composite(m: &TrainClip, tape: &Tape, sv: &StepVars, pixels: &Tensor) -> Result<Var> {
    let vc = &m.config.vision;
    let (b, w, t) = (pixels.dim(0), vc.tower.hidden, vc.tokens());
    let px = tape.constant(pixels.clone());
    let patches = tape.patch_embed(&px, v(m, sv, names::PATCH_EMBEDDING)?)?; // [B, N, W]
    let cls = tape.reshape(v(m, sv, names::CLASS_EMBEDDING)?, &[1, 1, w])?;
    let cls = tape.add(&tape.constant(Tensor::zeros(&[b, 1, w])), &cls)?; // [B, 1, W]
    let x = tape.cat(&[&cls, &patches], 1)?; // [B, T, W]
    let x = tape.add(&x, v(m, sv, names::VISION_POSITIONS)?)?; // [B, T, W]
    let x = ln(m, tape, sv, names::PRE_LN, &x, vc.tower.eps)?;
    let cls: Vec<usize> = (0..b).map(|i| i * t).collect();
    let pooled = encoder(m, tape, sv, Tower::Vision, &vc.tower, x, &Seqs::Batch { batch: b, seq: t, causal: false }, Some(&cls))?; // [B, W]
    let pooled = ln(m, tape, sv, names::POST_LN, &pooled, vc.tower.eps)?;
    tape.linear(&pooled, v(m, sv, names::VISUAL_PROJECTION)?, None) // [B, D]
}

/// [`text_embeds`](Self::text_embeds) composed of tape ops: the oracle of the tower code.
pub fn text_embeds_composite(m: &TrainClip, tape: &Tape, sv: &StepVars, ids: &[Vec<u32>]) -> Result<Var> {
    let tc = &m.config.text;
    let lens: Vec<usize> = ids.iter().map(|s| if s.is_empty() { 0 } else { pool_position(s, tc.eos_token_id) + 1 }).collect();
    if ids.is_empty() || lens.iter().any(|&l| l == 0 || l > tc.max_positions) {
        let longest = ids.iter().map(|s| s.len()).max().unwrap_or(0);
        return Err(clipforge::shape_err!("text batch of {} sequences up to {longest} tokens (model: {} positions)", ids.len(), tc.max_positions));
    }
    let flat: Vec<u32> = ids.iter().zip(&lens).flat_map(|(s, &l)| s[..l].iter().copied()).collect();
    let pos: Vec<u32> = lens.iter().flat_map(|&l| 0..l as u32).collect();
    let tok = tape.embedding(v(m, sv, names::TOKEN_EMBEDDING)?, &flat)?; // [N, W]
    let pos = tape.embedding(v(m, sv, names::TEXT_POSITIONS)?, &pos)?; // [N, W]
    let x = tape.add(&tok, &pos)?; // [N, W]
    let ends: Vec<usize> = lens
        .iter()
        .scan(0, |off, &l| {
            *off += l;
            Some(*off - 1)
        })
        .collect();
    let pooled = encoder(m, tape, sv, Tower::Text, &tc.tower, x, &Seqs::Packed(lens), Some(&ends))?; // [B, W]
    let pooled = ln(m, tape, sv, names::FINAL_LN, &pooled, tc.tower.eps)?;
    tape.linear(&pooled, v(m, sv, names::TEXT_PROJECTION)?, None) // [B, D]
}

/// [`text_states`](Self::text_states) composed of tape ops: the oracle of the tower code.
pub fn text_states_composite(m: &TrainClip, tape: &Tape, sv: &StepVars, ids: &[Vec<u32>]) -> Result<(Var, Var)> {
    let tc = &m.config.text;
    let (b, w) = (ids.len(), tc.tower.hidden);
    let t = ids.iter().map(|s| s.len()).max().unwrap_or(0);
    if b == 0 || t == 0 || t > tc.max_positions {
        return Err(clipforge::shape_err!("text batch of {b} sequences up to {t} tokens (model: {} positions)", tc.max_positions));
    }
    let mut flat = Vec::with_capacity(b * t);
    for s in ids {
        flat.extend_from_slice(s);
        flat.extend(std::iter::repeat_n(tc.eos_token_id, t - s.len()));
    }
    let tok = tape.embedding(v(m, sv, names::TOKEN_EMBEDDING)?, &flat)?; // [B·T, W]
    let tok = tape.reshape(&tok, &[b, t, w])?; // [B, T, W]
    let pos = tape.narrow(v(m, sv, names::TEXT_POSITIONS)?, 0, 0, t)?; // [T, W]
    let x = tape.add(&tok, &pos)?; // [B, T, W]
    let x = encoder(m, tape, sv, Tower::Text, &tc.tower, x, &Seqs::Batch { batch: b, seq: t, causal: true }, None)?;
    let x = ln(m, tape, sv, names::FINAL_LN, &x, tc.tower.eps)?; // [B, T, W]
    let rows: Vec<usize> = ids.iter().enumerate().map(|(i, s)| i * t + pool_position(s, tc.eos_token_id)).collect();
    let pooled = tape.gather_rows(&tape.reshape(&x, &[b * t, w])?, &rows)?; // [B, W]
    let e = tape.linear(&pooled, v(m, sv, names::TEXT_PROJECTION)?, None)?; // [B, D]
    Ok((x, e))
}

pub fn ln(m: &TrainClip, tape: &Tape, sv: &StepVars, prefix: &str, x: &Var, eps: f32) -> Result<Var> {
    tape.layer_norm(x, v(m, sv, &format!("{prefix}.weight"))?, v(m, sv, &format!("{prefix}.bias"))?, eps)
}

/// One pre-LN block on any grouping of rows: x + attn(ln1 x), then + mlp(ln2 ·). `p` as [`BLOCK_PARAMS`].
pub fn block_on(tape: &Tape, x: &Var, p: &[Var], t: &TowerConfig, seqs: &Seqs) -> Result<Var> {
    let a = attend(tape, x, p, t, seqs)?; // x's shape
    block_tail(tape, x, &a, p, t)
}

/// [`block_on`] when only rows `rows` of its output are read (the pooled tokens): keys and values
/// for every row, then the output projection and the MLP on the chosen rows only → [R, W].
pub fn block_rows(tape: &Tape, x: &Var, p: &[Var], t: &TowerConfig, seqs: &Seqs, rows: &[usize]) -> Result<Var> {
    let a = attend(tape, x, p, t, seqs)?; // x's shape
    let n = x.value().numel() / t.hidden.max(1);
    let a = tape.gather_rows(&tape.reshape(&a, &[n, t.hidden])?, rows)?; // [R, W]
    let x = tape.gather_rows(&tape.reshape(x, &[n, t.hidden])?, rows)?; // [R, W]
    block_tail(tape, &x, &a, p, t)
}

/// attn(ln1 x), before the output projection.
fn attend(tape: &Tape, x: &Var, p: &[Var], t: &TowerConfig, seqs: &Seqs) -> Result<Var> {
    let h = tape.layer_norm(x, &p[0], &p[1], t.eps)?; // x's shape
    let q = tape.linear(&h, &p[2], Some(&p[3]))?;
    let k = tape.linear(&h, &p[4], Some(&p[5]))?;
    let v = tape.linear(&h, &p[6], Some(&p[7]))?;
    match seqs {
        Seqs::Batch { causal, .. } => tape.attention(&q, &k, &v, t.heads, *causal),
        Seqs::Packed(lens) => tape.attention_packed(&q, &k, &v, t.heads, true, lens),
    }
}

/// x + out_proj(a), then + mlp(ln2 ·).
fn block_tail(tape: &Tape, x: &Var, a: &Var, p: &[Var], t: &TowerConfig) -> Result<Var> {
    let x = tape.add(x, &tape.linear(a, &p[8], Some(&p[9]))?)?; // x's shape
    let h = tape.layer_norm(&x, &p[10], &p[11], t.eps)?;
    let act = match t.act {
        Activation::QuickGelu => Unary::QuickGelu,
        Activation::Gelu => Unary::Gelu,
    };
    let m = tape.unary(&tape.linear(&h, &p[12], Some(&p[13]))?, act); // [.., I]
    tape.add(&x, &tape.linear(&m, &p[14], Some(&p[15]))?) // x's shape
}
