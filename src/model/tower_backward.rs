//! The towers' backward, written once over [`Ops`] from what a training forward of
//! [`super::tower`] kept (every block's activations, or with `recompute` only each block's input,
//! re-run here): by hand to every parameter of the tower — through the one block's backward, the
//! LayerNorms, the projection, the embeddings (row scatter-adds in a fixed order) and the patch
//! convolution. Gradients are added into a per-tower list indexed like [`TowerParams`]' parameters.
use super::block::{backward, forward};
use super::config::{TextConfig, TowerConfig, VisionConfig};
use super::schema::names;
use super::tower::{Input, Kept, TowerParams, TowerSaved};
use crate::backend::Ops;
use crate::error::Result;
use crate::shape_err;

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
    /// dy [R, W] → d(encoder input) [N, W]; block gradients added into `g`. Each block's kept
    /// activations are freed as soon as its backward is done (so a backward runs once).
    fn encoder_backward(&self, ops: &O, cfg: &TowerConfig, s: &mut TowerSaved<O>, mut dy: O::Buf, g: &mut Grads<O>) -> Result<O::Buf> {
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
            let kept = s.blocks.pop().ok_or_else(|| crate::error::Error::msg("the tower's backward ran already"))?;
            let saved = match kept {
                Kept::All(sv) => sv,
                Kept::Input(x) => forward(ops, &blk, x, &s.seqs, rows, true)?.1.ok_or_else(|| crate::error::Error::msg("recompute kept nothing"))?,
            };
            let (dx, grads) = backward(ops, &blk, &saved, &dy)?;
            drop(saved);
            let first = self.block_index(l)?;
            let count = grads.len();
            for (k, d) in grads.into_iter().enumerate() {
                add(ops, g, first + k, d, self.numel(first + k))?;
            }
            if let Some(done) = s.on_block.as_mut() {
                done(ops, g, &(first..first + count).collect::<Vec<_>>())?;
            }
            dy = dx;
        }
        Ok(dy)
    }

    /// de [R, D] → d(pooled rows) [R, W]; the projection and LayerNorm gradients added into `g`.
    fn head_backward(&self, ops: &O, s: &TowerSaved<O>, de: &O::Buf, ln: &str, proj: &str, cfg: &TowerConfig, g: &mut Grads<O>) -> Result<O::Buf> {
        let (r, w) = (s.pool.as_ref().map_or(s.seqs.rows(), |p| p.len()), cfg.hidden);
        let pw = self.linear(proj)?;
        let mut dn = ops.zeros(r * w)?;
        let (dproj, _) = ops.linear_bwd(de, &s.normed, pw, r, &mut dn, false, false)?; // no bias
        add(ops, g, self.local(proj)?, dproj, pw.n * pw.k)?;
        let (lw, lb) = (format!("{ln}.weight"), format!("{ln}.bias"));
        let (dx, dg, db) = ops.layernorm_bwd(&dn, &s.head.0, self.param(&lw)?, &s.head.1, r, w, cfg.eps)?;
        add(ops, g, self.local(&lw)?, dg, w)?;
        add(ops, g, self.local(&lb)?, db, w)?;
        Ok(dx)
    }

    /// de [B, D] → every vision parameter's gradient added into `g`.
    pub fn vision_backward(&self, ops: &O, cfg: &VisionConfig, s: &mut TowerSaved<O>, de: &O::Buf, g: &mut Grads<O>) -> Result<()> {
        let (w, t, c, sz, p) = (cfg.tower.hidden, cfg.tokens(), cfg.channels, cfg.image_size, cfg.patch_size);
        let dpool = self.head_backward(ops, s, de, names::POST_LN, names::VISUAL_PROJECTION, &cfg.tower, g)?;
        let dh = self.encoder_backward(ops, &cfg.tower, s, dpool, g)?; // [B·T, W]
        let Input::Pixels { pixels: px, b, x: x0, stats: st0 } = &s.input else { return Err(shape_err!("not a vision forward")) };
        let (lw, lb) = (format!("{}.weight", names::PRE_LN), format!("{}.bias", names::PRE_LN));
        let (dx, dg, db) = ops.layernorm_bwd(&dh, x0, self.param(&lw)?, st0, b * t, w, cfg.tower.eps)?;
        add(ops, g, self.local(&lw)?, dg, w)?;
        add(ops, g, self.local(&lb)?, db, w)?;
        let (dpatches, dcls, dpos) = ops.vision_embed_bwd(&dx, *b, t - 1, w)?;
        add(ops, g, self.local(names::CLASS_EMBEDDING)?, dcls, w)?;
        add(ops, g, self.local(names::VISION_POSITIONS)?, dpos, t * w)?;
        let dw = ops.patch_embed_bwd(px, &dpatches, *b, c, sz, p, w)?;
        add(ops, g, self.local(names::PATCH_EMBEDDING)?, dw, w * c * p * p)
    }

    /// de [B, D] → every text parameter's gradient added into `g` (the token table's and the
    /// positions' as deterministic row scatter-adds).
    pub fn text_backward(&self, ops: &O, cfg: &TextConfig, s: &mut TowerSaved<O>, de: &O::Buf, g: &mut Grads<O>) -> Result<()> {
        let dpool = self.head_backward(ops, s, de, names::FINAL_LN, names::TEXT_PROJECTION, &cfg.tower, g)?;
        let dx = self.encoder_backward(ops, &cfg.tower, s, dpool, g)?; // [N, W]
        self.text_embed_backward(ops, cfg, s, &dx, g)
    }

    /// The backward of [`text_states`](Self::text_states) (training) from d(states) [B·T, W]
    /// (if any) and d(embeddings) [B, D].
    pub fn text_states_backward(
        &self,
        ops: &O,
        cfg: &TextConfig,
        s: &mut TowerSaved<O>,
        dstates: Option<&O::Buf>,
        de: &O::Buf,
        g: &mut Grads<O>,
    ) -> Result<()> {
        let (n, w) = (s.seqs.rows(), cfg.tower.hidden);
        let Input::Tokens { states_pool: Some((ends, pooled)), .. } = &s.input else { return Err(shape_err!("not a text-states forward")) };
        let pw = self.linear(names::TEXT_PROJECTION)?;
        let mut dpooled = ops.zeros(ends.len() * w)?;
        let (dproj, _) = ops.linear_bwd(de, pooled, pw, ends.len(), &mut dpooled, false, false)?; // no bias
        add(ops, g, self.local(names::TEXT_PROJECTION)?, dproj, pw.n * pw.k)?;
        let mut dn = ops.scatter_rows(&dpooled, ends, n, w)?; // [N, W]
        if let Some(d) = dstates {
            ops.axpy(&mut dn, d, 1.0, n * w)?;
        }
        let (lw, lb) = (format!("{}.weight", names::FINAL_LN), format!("{}.bias", names::FINAL_LN));
        let (dx, dg, db) = ops.layernorm_bwd(&dn, &s.head.0, self.param(&lw)?, &s.head.1, n, w, cfg.tower.eps)?;
        add(ops, g, self.local(&lw)?, dg, w)?;
        add(ops, g, self.local(&lb)?, db, w)?;
        let dx = self.encoder_backward(ops, &cfg.tower, s, dx, g)?; // [N, W]
        self.text_embed_backward(ops, cfg, s, &dx, g)
    }

    fn text_embed_backward(&self, ops: &O, cfg: &TextConfig, s: &TowerSaved<O>, dx: &O::Buf, g: &mut Grads<O>) -> Result<()> {
        let w = cfg.tower.hidden;
        let Input::Tokens { tok, pos, .. } = &s.input else { return Err(shape_err!("not a text forward")) };
        for (name, ids, rows) in [(names::TOKEN_EMBEDDING, tok, cfg.vocab), (names::TEXT_POSITIONS, pos, cfg.max_positions)] {
            let slot = &mut g[self.local(name)?];
            let table = match slot {
                Some(t) => t,
                None => slot.insert(ops.zeros(rows * w)?),
            };
            ops.embedding_bwd(dx, ids, table, w)?;
        }
        Ok(())
    }
}
