//! The towers for training, written once over [`Ops`]: the forward of [`super::tower`] keeping
//! what the backward needs (every block's activations, or with `recompute` only each block's
//! input), and the backward by hand to every parameter of the tower — through the one block's
//! backward, the LayerNorms, the projection, the embeddings (row scatter-adds in a fixed order) and
//! the patch convolution. Gradients are added into a per-tower list indexed like
//! [`TowerParams`]' parameters.
use super::block::{backward, finish, forward, Saved};
use super::config::{TextConfig, TowerConfig, VisionConfig};
use super::schema::names;
use super::text::pool_position;
use super::tower::TowerParams;
use crate::backend::{Ops, Seqs};
use crate::error::Result;
use crate::shape_err;

/// What one block kept.
enum Kept<O: Ops> {
    All(Saved<O>),
    /// The block's input (the forward re-runs in the backward).
    Input(O::Buf),
}

/// What a tower's training forward keeps.
pub struct TowerSaved<O: Ops> {
    seqs: Seqs,
    /// The rows the last block computes (None: all of them).
    pool: Option<Vec<usize>>,
    blocks: Vec<Kept<O>>,
    /// The encoder's input (for the first LayerNorm's backward: pre-LN input, or embeddings).
    x0: O::Buf,
    /// The pooled rows before the final LayerNorm, their statistics, and after it.
    pooled: O::Buf,
    stats: O::Buf,
    normed: O::Buf,
    /// Vision: the pixels and the pre-LN statistics; text: token and position ids.
    pixels: Option<(O::Buf, usize, O::Buf)>,
    ids: Option<(Vec<usize>, Vec<usize>)>,
    /// Token states (SmartCLIP): the end-token rows of `normed`, the projection's input.
    states_pool: Option<(Vec<usize>, O::Buf)>,
}

impl<O: Ops> TowerSaved<O> {
    /// The rows the encoder computed (text: Σ caption lengths when packed, B·T when padded).
    pub fn rows(&self) -> usize {
        self.seqs.rows()
    }
    /// Whether the sequences ran packed (no padding).
    pub fn packed(&self) -> bool {
        matches!(self.seqs, Seqs::Packed(_))
    }
}

/// Per-tower gradients, by the tower's parameter index (None: no gradient yet).
pub type Grads<O> = Vec<Option<<O as Ops>::Buf>>;

fn add<O: Ops>(ops: &O, g: &mut Grads<O>, i: usize, d: O::Buf, n: usize) -> Result<()> {
    match &mut g[i] {
        Some(acc) => ops.axpy(acc, &d, 1.0, n),
        slot => {
            *slot = Some(d);
            Ok(())
        }
    }
}

impl<O: Ops> TowerParams<O> {
    fn encoder_train(&self, ops: &O, cfg: &TowerConfig, mut x: O::Buf, seqs: &Seqs, pool: Option<&[usize]>, recompute: bool) -> Result<(O::Buf, Vec<Kept<O>>)> {
        let (n, w) = (seqs.rows(), cfg.hidden);
        let mut kept = Vec::with_capacity(cfg.layers);
        for l in 0..cfg.layers {
            let rows = pool.filter(|_| l + 1 == cfg.layers);
            let r = rows.map_or(n, |r| r.len());
            let blk = self.block(l, cfg)?;
            let (xm, f, saved) = if recompute {
                let input = ops.copy(&x, n * w)?;
                let (xm, f, _) = forward(ops, &blk, x, None, seqs, rows, false)?;
                kept.push(Kept::Input(input));
                (xm, f, None)
            } else {
                forward(ops, &blk, x, None, seqs, rows, true)?
            };
            if let Some(s) = saved {
                kept.push(Kept::All(s));
            }
            x = finish(ops, xm, &f, r * w)?; // [R, W]
        }
        if let Some(p) = pool.filter(|_| cfg.layers == 0) {
            x = ops.gather_rows(&x, p, w)?;
        }
        Ok((x, kept))
    }

    /// dy [R, W] → d(encoder input) [N, W]; block gradients added into `g`.
    fn encoder_backward(&self, ops: &O, cfg: &TowerConfig, s: &TowerSaved<O>, mut dy: O::Buf, g: &mut Grads<O>) -> Result<O::Buf> {
        let w = cfg.hidden;
        if cfg.layers == 0 {
            return match &s.pool {
                Some(p) => ops.scatter_rows(&dy, p, s.seqs.rows(), w),
                None => Ok(dy),
            };
        }
        for l in (0..cfg.layers).rev() {
            let blk = self.block(l, cfg)?;
            let rows = s.pool.as_deref().filter(|_| l + 1 == cfg.layers);
            let rerun;
            let saved = match &s.blocks[l] {
                Kept::All(sv) => sv,
                Kept::Input(x) => {
                    rerun = forward(ops, &blk, ops.copy(x, s.seqs.rows() * w)?, None, &s.seqs, rows, true)?.2;
                    rerun.as_ref().ok_or_else(|| crate::error::Error::msg("recompute kept nothing"))?
                }
            };
            let (dx, grads) = backward(ops, &blk, saved, &dy)?;
            let first = self.block_index(l)?;
            for (k, d) in grads.into_iter().enumerate() {
                add(ops, g, first + k, d, self.numel(first + k))?;
            }
            dy = dx;
        }
        Ok(dy)
    }

    /// The final LayerNorm `ln` of the pooled rows and the projection `proj`, keeping both inputs.
    fn head_train(&self, ops: &O, x: O::Buf, ln: &str, proj: &str, rows: usize, cfg: &TowerConfig) -> Result<(O::Buf, O::Buf, O::Buf, O::Buf)> {
        let (normed, stats) = ops.layernorm(&x, self.param(&format!("{ln}.weight"))?, self.param(&format!("{ln}.bias"))?, rows, cfg.hidden, cfg.eps)?;
        let e = ops.linear(&normed, self.linear(proj)?, None, rows)?; // [R, D]
        Ok((e, x, stats, normed))
    }

    /// de [R, D] → d(pooled rows) [R, W]; the projection and LayerNorm gradients added into `g`.
    fn head_backward(&self, ops: &O, s: &TowerSaved<O>, de: &O::Buf, ln: &str, proj: &str, cfg: &TowerConfig, g: &mut Grads<O>) -> Result<O::Buf> {
        let (r, w) = (s.pool.as_ref().map_or(s.seqs.rows(), |p| p.len()), cfg.hidden);
        let pw = self.linear(proj)?;
        let mut dn = ops.zeros(r * w)?;
        let (dproj, _) = ops.linear_bwd(de, &s.normed, pw, r, &mut dn, false)?;
        add(ops, g, self.local(proj)?, dproj, pw.n * pw.k)?;
        let (lw, lb) = (format!("{ln}.weight"), format!("{ln}.bias"));
        let (dx, dg, db) = ops.layernorm_bwd(&dn, &s.pooled, self.param(&lw)?, &s.stats, r, w, cfg.eps)?;
        add(ops, g, self.local(&lw)?, dg, w)?;
        add(ops, g, self.local(&lb)?, db, w)?;
        Ok(dx)
    }

    /// Pixels [B, C, S, S] (on the backend) → image embeddings [B, D] and what the backward needs.
    pub fn vision_train(&self, ops: &O, cfg: &VisionConfig, pixels: O::Buf, b: usize, recompute: bool) -> Result<(O::Buf, TowerSaved<O>)> {
        let (w, t, c, s, p) = (cfg.tower.hidden, cfg.tokens(), cfg.channels, cfg.image_size, cfg.patch_size);
        let patches = ops.patch_embed(&pixels, self.linear(names::PATCH_EMBEDDING)?, b, c, s, p)?; // [B·N, W]
        let x = ops.vision_embed(&patches, self.param(names::CLASS_EMBEDDING)?, self.param(names::VISION_POSITIONS)?, b, t - 1, w)?; // [B·T, W]
        drop(patches);
        let ln = names::PRE_LN;
        let (h, st0) = ops.layernorm(&x, self.param(&format!("{ln}.weight"))?, self.param(&format!("{ln}.bias"))?, b * t, w, cfg.tower.eps)?;
        let pool: Vec<usize> = (0..b).map(|i| i * t).collect();
        let seqs = Seqs::Batch { batch: b, seq: t, causal: false };
        let (pooled, blocks) = self.encoder_train(ops, &cfg.tower, h, &seqs, Some(&pool), recompute)?; // [B, W]
        let (e, pooled, stats, normed) = self.head_train(ops, pooled, names::POST_LN, names::VISUAL_PROJECTION, b, &cfg.tower)?;
        Ok((e, TowerSaved { seqs, pool: Some(pool), blocks, x0: x, pooled, stats, normed, pixels: Some((pixels, b, st0)), ids: None, states_pool: None }))
    }

    /// de [B, D] → every vision parameter's gradient added into `g`.
    pub fn vision_backward(&self, ops: &O, cfg: &VisionConfig, s: &TowerSaved<O>, de: &O::Buf, g: &mut Grads<O>) -> Result<()> {
        let (w, t, c, sz, p) = (cfg.tower.hidden, cfg.tokens(), cfg.channels, cfg.image_size, cfg.patch_size);
        let dpool = self.head_backward(ops, s, de, names::POST_LN, names::VISUAL_PROJECTION, &cfg.tower, g)?;
        let dh = self.encoder_backward(ops, &cfg.tower, s, dpool, g)?; // [B·T, W]
        let (px, b, st0) = s.pixels.as_ref().ok_or_else(|| shape_err!("not a vision forward"))?;
        let (lw, lb) = (format!("{}.weight", names::PRE_LN), format!("{}.bias", names::PRE_LN));
        let (dx, dg, db) = ops.layernorm_bwd(&dh, &s.x0, self.param(&lw)?, st0, b * t, w, cfg.tower.eps)?;
        add(ops, g, self.local(&lw)?, dg, w)?;
        add(ops, g, self.local(&lb)?, db, w)?;
        let (dpatches, dcls, dpos) = ops.vision_embed_bwd(&dx, *b, t - 1, w)?;
        add(ops, g, self.local(names::CLASS_EMBEDDING)?, dcls, w)?;
        add(ops, g, self.local(names::VISION_POSITIONS)?, dpos, t * w)?;
        let dw = ops.patch_embed_bwd(px, &dpatches, *b, c, sz, p, w)?;
        add(ops, g, self.local(names::PATCH_EMBEDDING)?, dw, w * c * p * p)
    }

    /// Token ids (start/end tokens included) → text embeddings [B, D] and what the backward
    /// needs: packed where the backend has packed attention, else a padded batch.
    pub fn text_train(&self, ops: &O, cfg: &TextConfig, ids: &[Vec<u32>], recompute: bool) -> Result<(O::Buf, TowerSaved<O>)> {
        let (tok, pos, seqs, ends) = self.text_rows(ops, cfg, ids, ops.packed_attention())?;
        let x = self.text_embed(ops, cfg, &tok, &pos)?; // [N, W]
        let (pooled, blocks) = self.encoder_train(ops, &cfg.tower, x, &seqs, Some(&ends), recompute)?; // [B, W]
        let x0 = ops.zeros(0)?; // (the text tower has no LayerNorm before its blocks)
        let (e, pooled, stats, normed) = self.head_train(ops, pooled, names::FINAL_LN, names::TEXT_PROJECTION, ids.len(), &cfg.tower)?;
        Ok((e, TowerSaved { seqs, pool: Some(ends), blocks, x0, pooled, stats, normed, pixels: None, ids: Some((tok, pos)), states_pool: None }))
    }

    /// The text tower's final token states [B·T, W] (after the final LayerNorm; T = the longest
    /// sequence, shorter ones padded with the end token) and the text embeddings [B, D], with what
    /// the backward needs (SmartCLIP's mask network reads every token state).
    pub fn text_states_train(&self, ops: &O, cfg: &TextConfig, ids: &[Vec<u32>], recompute: bool) -> Result<(O::Buf, O::Buf, TowerSaved<O>)> {
        let (tok, pos, seqs, ends) = self.text_rows(ops, cfg, ids, false)?;
        let (n, w) = (tok.len(), cfg.tower.hidden);
        let x = self.text_embed(ops, cfg, &tok, &pos)?; // [N, W]
        let (x, blocks) = self.encoder_train(ops, &cfg.tower, x, &seqs, None, recompute)?; // [N, W]
        let x0 = ops.zeros(0)?;
        let ln = names::FINAL_LN;
        let (states, stats) = ops.layernorm(&x, self.param(&format!("{ln}.weight"))?, self.param(&format!("{ln}.bias"))?, n, w, cfg.tower.eps)?; // [N, W]
        let pooled = ops.gather_rows(&states, &ends, w)?; // [B, W]
        let e = ops.linear(&pooled, self.linear(names::TEXT_PROJECTION)?, None, ids.len())?; // [B, D]
        let out = ops.copy(&states, n * w)?;
        let saved = TowerSaved { seqs, pool: None, blocks, x0, pooled: x, stats, normed: states, pixels: None, ids: Some((tok, pos)), states_pool: Some((ends, pooled)) };
        Ok((out, e, saved))
    }

    /// The rows of a text batch (see [`super::tower::text_layout`]) after checking it.
    #[allow(clippy::type_complexity)]
    fn text_rows(&self, _ops: &O, cfg: &TextConfig, ids: &[Vec<u32>], packed: bool) -> Result<(Vec<usize>, Vec<usize>, Seqs, Vec<usize>)> {
        let lens: Vec<usize> = ids.iter().map(|s| if s.is_empty() { 0 } else { pool_position(s, cfg.eos_token_id) + 1 }).collect();
        let t = ids.iter().map(|s| s.len()).max().unwrap_or(0);
        if ids.is_empty() || lens.contains(&0) || t > cfg.max_positions {
            return Err(shape_err!("text batch of {} sequences up to {t} tokens (model: {} positions)", ids.len(), cfg.max_positions));
        }
        Ok(super::tower::text_layout(ids, &lens, t, cfg.eos_token_id as usize, packed))
    }

    /// Token + position embeddings of the rows → [N, W].
    fn text_embed(&self, ops: &O, cfg: &TextConfig, tok: &[usize], pos: &[usize]) -> Result<O::Buf> {
        let w = cfg.tower.hidden;
        let mut x = ops.gather_rows(self.param(names::TOKEN_EMBEDDING)?, tok, w)?; // [N, W]
        ops.axpy(&mut x, &ops.gather_rows(self.param(names::TEXT_POSITIONS)?, pos, w)?, 1.0, tok.len() * w)?;
        Ok(x)
    }

    /// de [B, D] → every text parameter's gradient added into `g` (the token table's and the
    /// positions' as deterministic row scatter-adds).
    pub fn text_backward(&self, ops: &O, cfg: &TextConfig, s: &TowerSaved<O>, de: &O::Buf, g: &mut Grads<O>) -> Result<()> {
        let dpool = self.head_backward(ops, s, de, names::FINAL_LN, names::TEXT_PROJECTION, &cfg.tower, g)?;
        let dx = self.encoder_backward(ops, &cfg.tower, s, dpool, g)?; // [N, W]
        self.text_embed_backward(ops, cfg, s, &dx, g)
    }

    /// The backward of [`text_states_train`](Self::text_states_train) from d(states) [B·T, W]
    /// (if any) and d(embeddings) [B, D].
    pub fn text_states_backward(&self, ops: &O, cfg: &TextConfig, s: &TowerSaved<O>, dstates: Option<&O::Buf>, de: &O::Buf, g: &mut Grads<O>) -> Result<()> {
        let (n, w) = (s.seqs.rows(), cfg.tower.hidden);
        let (ends, pooled) = s.states_pool.as_ref().ok_or_else(|| shape_err!("not a text-states forward"))?;
        let pw = self.linear(names::TEXT_PROJECTION)?;
        let mut dpooled = ops.zeros(ends.len() * w)?;
        let (dproj, _) = ops.linear_bwd(de, pooled, pw, ends.len(), &mut dpooled, false)?;
        add(ops, g, self.local(names::TEXT_PROJECTION)?, dproj, pw.n * pw.k)?;
        let mut dn = ops.scatter_rows(&dpooled, ends, n, w)?; // [N, W]
        if let Some(d) = dstates {
            ops.axpy(&mut dn, d, 1.0, n * w)?;
        }
        let (lw, lb) = (format!("{}.weight", names::FINAL_LN), format!("{}.bias", names::FINAL_LN));
        let (dx, dg, db) = ops.layernorm_bwd(&dn, &s.pooled, self.param(&lw)?, &s.stats, n, w, cfg.tower.eps)?;
        add(ops, g, self.local(&lw)?, dg, w)?;
        add(ops, g, self.local(&lb)?, db, w)?;
        let dx = self.encoder_backward(ops, &cfg.tower, s, dx, g)?; // [N, W]
        self.text_embed_backward(ops, cfg, s, &dx, g)
    }

    fn text_embed_backward(&self, ops: &O, cfg: &TextConfig, s: &TowerSaved<O>, dx: &O::Buf, g: &mut Grads<O>) -> Result<()> {
        let w = cfg.tower.hidden;
        let (tok, pos) = s.ids.as_ref().ok_or_else(|| shape_err!("not a text forward"))?;
        for (name, ids, rows) in [(names::TOKEN_EMBEDDING, tok, cfg.vocab), (names::TEXT_POSITIONS, pos, cfg.max_positions)] {
            let i = self.local(name)?;
            if g[i].is_none() {
                g[i] = Some(ops.zeros(rows * w)?);
            }
            ops.embedding_bwd(dx, ids, g[i].as_mut().expect("set above"), w)?;
        }
        Ok(())
    }
}
