//! The CLIP image tower (HF CLIPVisionTransformer + visual_projection) on the CPU: the one tower
//! of [`super::tower`] on the CPU backend, with host tensors in and out.
use super::config::VisionConfig;
use super::layers::LoadOptions;
use super::schema::{Schema, Tower};
use super::tower::{Mode, TowerParams};
use super::weights::Weights;
use crate::backend::cpu::Cpu;
use crate::error::Result;
use crate::shape_err;
use crate::tensor::Tensor;

pub struct VisionTower {
    pub cfg: VisionConfig,
    pub params: TowerParams<Cpu>,
}

impl VisionTower {
    pub fn load(w: &Weights, schema: &Schema, cfg: &VisionConfig, opt: &LoadOptions) -> Result<VisionTower> {
        Ok(VisionTower { cfg: cfg.clone(), params: TowerParams::load(&Cpu, schema, Tower::Vision, w, opt.dtype)?.freeze(&Cpu)? })
    }

    /// pixels [B, C, S, S] → image embeddings [B, D] (not normalised). `hook` sees
    /// vision.embeddings, vision.pre_ln, vision.layer.{i} (the last for the class rows only, [B, W]),
    /// vision.pooled, vision.embeds.
    pub fn forward(&self, pixels: &Tensor, hook: &mut dyn FnMut(&str, &Tensor)) -> Result<Tensor> {
        let mut see = |n: &str, x: &Tensor, shape: &[usize]| {
            if let Ok(t) = x.reshape(shape) {
                hook(n, &t)
            }
        };
        self.run(pixels, &mut Some(&mut see))
    }

    /// [`forward`](Self::forward) with nothing observed (no per-layer copies for a hook).
    pub fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        self.run(pixels, &mut None)
    }

    /// Hidden state `layer` of every token ([`super::hidden`]), class token first: pixels
    /// [B, C, S, S] → ([B, T, W], image embeddings [B, D], not normalised).
    pub fn hidden_states(&self, pixels: &Tensor, layer: usize, final_ln: bool) -> Result<(Tensor, Tensor)> {
        let b = self.check(pixels)?;
        let (s, e) = self.params.vision_hidden(&Cpu, &self.cfg, pixels.contiguous(), b, layer, final_ln)?; // [B·T, W], [B·D]
        Ok((s.reshape(&[b, self.cfg.tokens(), self.cfg.tower.hidden])?, e.reshape(&[b, e.numel() / b])?))
    }

    /// The batch size of pixels [B, C, S, S], or why they do not fit.
    fn check(&self, pixels: &Tensor) -> Result<usize> {
        let s = self.cfg.image_size;
        if pixels.rank() != 4 || pixels.dim(1) != self.cfg.channels || pixels.dim(2) != s || pixels.dim(3) != s || pixels.dim(0) == 0 {
            return Err(shape_err!("image tower expects pixels [B, {}, {s}, {s}] with B ≥ 1, got {:?}", self.cfg.channels, pixels.shape()));
        }
        Ok(pixels.dim(0))
    }

    fn run(&self, pixels: &Tensor, hook: &mut crate::model::tower::Hook<Cpu>) -> Result<Tensor> {
        let b = self.check(pixels)?;
        let px = pixels.contiguous();
        let (e, _) = self.params.vision(&Cpu, &self.cfg, px, b, Mode::Infer, hook)?; // [B·D]
        e.reshape(&[b, e.numel() / b])
    }
}
