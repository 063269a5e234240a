//! Per-token outputs of the towers, as HF's `output_hidden_states=True` numbers them: state 0 is
//! the encoder's input (text: token + position embeddings; vision: after `pre_layrnorm`), state i
//! the output of block i, negative indices count from the end (−1 the last block, −2 the
//! penultimate, the layer diffusion pipelines read). The final LayerNorm (text `final_layer_norm`,
//! vision `post_layernorm`) may be applied to every token, as diffusion pipelines do for the last
//! layer. The pooled, projected embedding (SDXL's `text_embeds`) comes with it from the same pass.
//!
//! Written once over [`Ops`], so every backend has it. Text runs padded (HF's layout: each
//! sequence padded with the end token to a common length; causal, so positions up to the end
//! token do not see the padding); the last block computes every row.
use super::config::{TextConfig, TowerConfig, VisionConfig};
use super::schema::names;
use super::tower::{text_rows, Hook, Mode, TowerParams};
use crate::backend::{Ops, Seqs};
use crate::error::{Error, Result};

/// HF's `hidden_states` index (0 ..= layers, or −(layers+1) ..= −1) → the number of blocks run
/// before the state is taken.
pub fn resolve_layer(layer: i64, layers: usize) -> Result<usize> {
    let n = layers as i64 + 1;
    let k = if layer < 0 { n + layer } else { layer };
    if !(0..n).contains(&k) {
        return Err(Error::msg(format!(
            "hidden-states layer {layer}: this tower has {layers} layers, so the index is between {} and {layers} (0: the embeddings, -1: the last layer, -2: the penultimate)",
            -n
        )));
    }
    Ok(k as usize)
}

impl<O: Ops> TowerParams<O> {
    /// Token ids (start/end tokens included, unpadded, each at most `t` long) → (hidden state
    /// `layer` of every token [B·T, W] with T = `t`, padded with the end token; the projected
    /// pooled embeddings [B, D], not normalised). `layer` as [`resolve_layer`] returns it.
    pub fn text_hidden(&self, ops: &O, cfg: &TextConfig, ids: &[Vec<u32>], t: usize, layer: usize, final_ln: bool) -> Result<(O::Buf, O::Buf)> {
        let w = cfg.tower.hidden;
        let (tok, pos, seqs, ends) = text_rows(cfg, ids, Some(t), false)?;
        let x = self.text_embed(ops, &tok, &pos, w)?; // [B·T, W]
        self.hidden(ops, &cfg.tower, x, &seqs, &ends, layer, final_ln, Head { name: "text", ln: names::FINAL_LN, proj: names::TEXT_PROJECTION })
    }

    /// Pixels [B, C, S, S] (consumed) → (hidden state `layer` of every token [B·T, W], class
    /// token first; the projected class embeddings [B, D], not normalised).
    pub fn vision_hidden(&self, ops: &O, cfg: &VisionConfig, pixels: O::Buf, b: usize, layer: usize, final_ln: bool) -> Result<(O::Buf, O::Buf)> {
        let t = cfg.tokens();
        let (_, h, _) = self.vision_stem(ops, cfg, &pixels, b)?; // [B·T, W]
        drop(pixels);
        let cls: Vec<usize> = (0..b).map(|i| i * t).collect();
        let seqs = Seqs::Batch { batch: b, seq: t, causal: false };
        self.hidden(ops, &cfg.tower, h, &seqs, &cls, layer, final_ln, Head { name: "vision", ln: names::POST_LN, proj: names::VISUAL_PROJECTION })
    }

    /// The encoder on x [N, W] keeping the input of block `layer` (the output of block
    /// `layer − 1`), then the head on the `pool` rows of its output.
    #[allow(clippy::too_many_arguments)]
    fn hidden(&self, ops: &O, cfg: &TowerConfig, x: O::Buf, seqs: &Seqs, pool: &[usize], layer: usize, final_ln: bool, head: Head) -> Result<(O::Buf, O::Buf)> {
        let (n, w) = (seqs.rows(), cfg.hidden);
        let mut kept: Option<Result<O::Buf>> = (layer == 0).then(|| ops.copy(&x, n * w));
        let want = format!("{}.layer.{}", head.name, layer.wrapping_sub(1));
        let x = {
            let mut grab = |name: &str, y: &O::Buf, _: &[usize]| {
                if layer > 0 && name == want {
                    kept = Some(ops.copy(y, n * w));
                }
            };
            let mut hook: Hook<O> = Some(&mut grab);
            self.encoder(ops, cfg, x, seqs, None, Mode::Infer, head.name, &mut hook)?.0
            // [N, W]
        };
        let states = kept.ok_or_else(|| Error::msg(format!("internal: hidden state {layer} was not reached")))??; // [N, W]
        let xr = ops.gather_rows(&x, pool, w)?; // [R, W]
        drop(x);
        let (_, e, _) = self.head(ops, xr, head.ln, head.proj, pool.len(), cfg)?; // [R, D]
        if !final_ln {
            return Ok((states, e));
        }
        let (g, b) = (self.param(&format!("{}.weight", head.ln))?, self.param(&format!("{}.bias", head.ln))?);
        let (normed, _) = ops.layernorm(&states, g, b, n, w, cfg.eps)?; // [N, W]
        Ok((normed, e))
    }
}

/// Which tower's names a [`TowerParams::hidden`] call uses.
struct Head {
    name: &'static str,
    ln: &'static str,
    proj: &'static str,
}
