//! The CLIP towers on a CUDA device (or its emulator): the one tower code of [`super::tower`] on
//! the device backend ([`crate::backend::device::Device`]), every weight uploaded once from the
//! host model. In f32 all of it is f32; in bf16/f16 every Linear weight (q, k, v, o, fc1, fc2, the
//! projections) also gets a 16-bit copy that the forward GEMMs read (f32 accumulation and output),
//! while the residual stream, LayerNorm, attention, embeddings and the patch convolution stay f32 —
//! the same split as the CPU bf16 towers. Text is packed (no padding); the last block computes only the
//! pooled rows on both towers.
use super::clip::ClipParts;
use super::tower::{Mode, TowerParams};
use crate::backend::cpu::Cpu;
use crate::backend::device::Device;
use crate::backend::Ops;
use crate::cuda::DeviceOps;
use crate::error::{Error, Result};
use crate::model::config::ClipConfig;
use crate::tensor::DType;

/// CLIP on a CUDA device (or the emulator): weights resident, towers run per batch.
pub struct CudaClip {
    dev: Device,
    config: ClipConfig,
    vision: Option<TowerParams<Device>>,
    text: Option<TowerParams<Device>>,
    pub projection_dim: usize,
}

impl CudaClip {
    /// Uploads the weights of the loaded towers of `model` (as f32) to `ops`' device.
    pub fn new(ops: Box<dyn DeviceOps>, model: &ClipParts) -> Result<CudaClip> {
        Self::with_dtype(ops, model, DType::F32)
    }

    /// The towers computing in `dtype`: F32, or BF16 (Linear weights bf16, see the module docs).
    pub fn with_dtype(ops: Box<dyn DeviceOps>, model: &ClipParts, dtype: DType) -> Result<CudaClip> {
        if dtype == DType::F16 {
            return Err(Error::msg("the CUDA towers compute in f32 or bf16, not f16"));
        }
        let dev = Device::new(ops);
        let vision = model.vision.as_ref().map(|v| v.params.upload(&Cpu, &dev, dtype)).transpose()?;
        let text = model.text.as_ref().map(|t| t.params.upload(&Cpu, &dev, dtype)).transpose()?;
        Ok(CudaClip { dev, config: model.config.clone(), vision, text, projection_dim: model.config.projection_dim })
    }

    /// Which device runs the towers, in words.
    pub fn describe(&self) -> String {
        self.dev.describe()
    }

    /// pixels [B, C, S, S] (host, row-major) → image embeddings [B, D] (not normalised).
    pub fn embed_images(&self, pixels: &[f32], batch: usize) -> Result<Vec<f32>> {
        let v = self.vision.as_ref().ok_or_else(|| Error::msg("image tower not loaded"))?;
        let c = &self.config.vision;
        let s = c.image_size;
        if batch == 0 || pixels.len() != batch * c.channels * s * s {
            return Err(crate::shape_err!("image tower expects pixels [B, {}, {s}, {s}] with B >= 1, got {} values for B = {batch}", c.channels, pixels.len()));
        }
        let px = self.dev.upload_input(pixels)?;
        let (e, _) = v.vision(&self.dev, c, px, batch, Mode::Infer, &mut None)?; // [B, D]
        self.dev.download(&e)
    }

    /// Hidden state `layer` of every image token ([`super::hidden`]) → ([B·T, W], [B·D]).
    pub fn vision_hidden(&self, pixels: &[f32], batch: usize, layer: usize, final_ln: bool) -> Result<(Vec<f32>, Vec<f32>)> {
        let v = self.vision.as_ref().ok_or_else(|| Error::msg("image tower not loaded"))?;
        let c = &self.config.vision;
        if batch == 0 || pixels.len() != batch * c.channels * c.image_size * c.image_size {
            return Err(crate::shape_err!(
                "image tower expects pixels [B, {}, {s}, {s}] with B >= 1, got {} values for B = {batch}",
                c.channels,
                pixels.len(),
                s = c.image_size
            ));
        }
        let (s, e) = v.vision_hidden(&self.dev, c, self.dev.upload_input(pixels)?, batch, layer, final_ln)?; // [B·T, W], [B, D]
        Ok((self.dev.download(&s)?, self.dev.download(&e)?))
    }

    /// Hidden state `layer` of every text token, padded with the end token to `t`
    /// ([`super::hidden`]) → ([B·T, W], [B·D]).
    pub fn text_hidden(&self, ids: &[Vec<u32>], t: usize, layer: usize, final_ln: bool) -> Result<(Vec<f32>, Vec<f32>)> {
        let tw = self.text.as_ref().ok_or_else(|| Error::msg("text tower not loaded"))?;
        let (s, e) = tw.text_hidden(&self.dev, &self.config.text, ids, t, layer, final_ln)?; // [B·T, W], [B, D]
        Ok((self.dev.download(&s)?, self.dev.download(&e)?))
    }

    /// Token ids (with start/end tokens, unpadded) → text embeddings [B, D] (not normalised).
    pub fn embed_texts(&self, ids: &[Vec<u32>]) -> Result<Vec<f32>> {
        let t = self.text.as_ref().ok_or_else(|| Error::msg("text tower not loaded"))?;
        let (e, _) = t.text(&self.dev, &self.config.text, ids, None, Mode::Infer, &mut None)?; // [B, D]
        self.dev.download(&e)
    }
}
