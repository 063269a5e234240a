//! The CLIP text tower (HF CLIPTextTransformer + text_projection) on the CPU: the one tower of
//! [`super::tower`] on the CPU backend, with host tensors out.
//!
//! With a causal mask no position attends to anything after it, so the pooled end-token state is
//! the same whatever follows it: batches are packed with no padding at all (or, for parity with
//! HF, padded to the longest sequence or a fixed length).
use super::config::TextConfig;
use super::layers::LoadOptions;
use super::schema::{Schema, Tower};
use super::tower::{Hook, Mode, TowerParams};
use super::weights::Weights;
use crate::backend::cpu::Cpu;
use crate::error::Result;
use crate::tensor::Tensor;

pub struct TextTower {
    pub cfg: TextConfig,
    pub params: TowerParams<Cpu>,
}

impl TextTower {
    pub fn load(w: &Weights, schema: &Schema, cfg: &TextConfig, opt: &LoadOptions) -> Result<TextTower> {
        Ok(TextTower { cfg: cfg.clone(), params: TowerParams::load(&Cpu, schema, Tower::Text, w, opt.dtype)?.freeze(&Cpu)? })
    }

    /// Where a sequence is pooled: see [`pool_position`].
    pub fn pool_position(&self, ids: &[u32]) -> usize {
        pool_position(ids, self.cfg.eos_token_id)
    }

    /// Token ids (with start/end tokens, unpadded) → text embeddings [B, D] (not normalised).
    /// Packed without `pad_to` (each sequence cut after its pooled token, no padding); padded with
    /// the end token to the longest sequence or `pad_to` otherwise (HF's layout, for parity).
    /// `hook` sees text.embeddings, text.layer.{i} (the last for the pooled rows only, [B, W]),
    /// text.pooled (the final LayerNorm of those rows), text.embeds.
    pub fn forward(&self, ids: &[Vec<u32>], pad_to: Option<usize>, hook: &mut dyn FnMut(&str, &Tensor)) -> Result<Tensor> {
        let mut see = |n: &str, x: &Tensor, shape: &[usize]| {
            if let Ok(t) = x.reshape(shape) {
                hook(n, &t)
            }
        };
        self.run(ids, pad_to, &mut Some(&mut see))
    }

    /// Packed [`forward`](Self::forward) with nothing observed.
    pub fn embed(&self, ids: &[Vec<u32>]) -> Result<Tensor> {
        self.run(ids, None, &mut None)
    }

    /// Hidden state `layer` of every token ([`super::hidden`]): ids padded with the end token to
    /// `t` → ([B, T, W], text embeddings [B, D], not normalised).
    pub fn hidden_states(&self, ids: &[Vec<u32>], t: usize, layer: usize, final_ln: bool) -> Result<(Tensor, Tensor)> {
        let (s, e) = self.params.text_hidden(&Cpu, &self.cfg, ids, t, layer, final_ln)?; // [B·T, W], [B·D]
        let b = ids.len();
        Ok((s.reshape(&[b, t, self.cfg.tower.hidden])?, e.reshape(&[b, e.numel() / b])?))
    }

    fn run(&self, ids: &[Vec<u32>], pad_to: Option<usize>, hook: &mut Hook<Cpu>) -> Result<Tensor> {
        let (e, _) = self.params.text(&Cpu, &self.cfg, ids, pad_to, Mode::Infer, hook)?; // [B·D]
        e.reshape(&[ids.len(), e.numel() / ids.len()])
    }
}

/// Where a sequence is pooled: the first end-of-text token (HF's rule for eos 49407 configs),
/// or the largest id when there is none (OpenAI's argmax rule).
pub fn pool_position(ids: &[u32], eos: u32) -> usize {
    ids.iter().position(|&t| t == eos).unwrap_or_else(|| {
        let mut best = 0;
        for (i, &t) in ids.iter().enumerate() {
            if t > ids[best] {
                best = i;
            }
        }
        best
    })
}
