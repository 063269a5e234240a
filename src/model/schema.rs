//! The one description of a CLIP model's parameters: HF name, shape, tower, place in the order,
//! the leading rows fine-tuning never changes, and the random initialisation of synthetic
//! weights. Loading, synthetic weights, checkpoints, the optimizer and every backend read it; no
//! other file spells a parameter name or counts parameters by hand.
//!
//! The order is fixed: vision embeddings (class, patch, positions), pre-LN, the vision blocks
//! (16 tensors each, [`BlockParam`] order), post-LN, visual projection; token and position
//! embeddings, the text blocks, final LN, text projection; the logit scale.
use super::config::{ClipConfig, TowerConfig};
use std::collections::HashMap;
use std::ops::Range;

/// Which part of the model a parameter belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tower {
    Vision,
    Text,
    /// The logit scale: shared by both towers.
    Head,
}

impl Tower {
    /// The HF prefix of the tower's transformer (`vision_model`, `text_model`).
    pub fn prefix(self) -> &'static str {
        match self {
            Tower::Vision => "vision_model",
            Tower::Text => "text_model",
            Tower::Head => "",
        }
    }
}

/// The 16 tensors of one pre-LN transformer block, in their fixed order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockParam {
    Ln1Weight,
    Ln1Bias,
    QWeight,
    QBias,
    KWeight,
    KBias,
    VWeight,
    VBias,
    OutWeight,
    OutBias,
    Ln2Weight,
    Ln2Bias,
    Fc1Weight,
    Fc1Bias,
    Fc2Weight,
    Fc2Bias,
}

impl BlockParam {
    pub const ALL: [BlockParam; 16] = {
        use BlockParam::*;
        [Ln1Weight, Ln1Bias, QWeight, QBias, KWeight, KBias, VWeight, VBias, OutWeight, OutBias, Ln2Weight, Ln2Bias, Fc1Weight, Fc1Bias, Fc2Weight, Fc2Bias]
    };
    /// The Linear weights (the tensors a bf16/f16 copy is made of), in block order.
    pub const LINEAR_WEIGHTS: [BlockParam; 6] =
        [BlockParam::QWeight, BlockParam::KWeight, BlockParam::VWeight, BlockParam::OutWeight, BlockParam::Fc1Weight, BlockParam::Fc2Weight];

    /// Position in the block's 16 tensors.
    pub fn index(self) -> usize {
        self as usize
    }
    /// The HF name under `{tower}.encoder.layers.{i}.`.
    pub fn name(self) -> &'static str {
        BLOCK_PARAMS[self as usize]
    }
    /// The shape for hidden width `h` and MLP width `i`.
    pub fn shape(self, h: usize, i: usize) -> Vec<usize> {
        use BlockParam::*;
        match self {
            QWeight | KWeight | VWeight | OutWeight => vec![h, h],
            Fc1Weight => vec![i, h],
            Fc1Bias => vec![i],
            Fc2Weight => vec![h, i],
            _ => vec![h],
        }
    }
    /// CLIP's initialisation for a tower of width `h` and `layers` blocks (synthetic weights).
    pub fn init(self, h: usize, layers: usize) -> Init {
        use BlockParam::*;
        let attn = (h as f32).powf(-0.5);
        let out = attn * (2.0 * layers as f32).powf(-0.5);
        match self {
            Ln1Weight | Ln2Weight => Init::normal(1.0, 0.1),
            QWeight | KWeight | VWeight => Init::normal(0.0, attn),
            OutWeight | Fc2Weight => Init::normal(0.0, out),
            Fc1Weight => Init::normal(0.0, (2.0 * h as f32).powf(-0.5)),
            _ => Init::normal(0.0, 0.02),
        }
    }
}

/// The block tensors' HF names, in [`BlockParam`] order.
pub const BLOCK_PARAMS: [&str; 16] = [
    "layer_norm1.weight",
    "layer_norm1.bias",
    "self_attn.q_proj.weight",
    "self_attn.q_proj.bias",
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
    "self_attn.out_proj.weight",
    "self_attn.out_proj.bias",
    "layer_norm2.weight",
    "layer_norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
];

/// The HF names of the tensors outside the blocks.
pub mod names {
    pub const CLASS_EMBEDDING: &str = "vision_model.embeddings.class_embedding";
    pub const PATCH_EMBEDDING: &str = "vision_model.embeddings.patch_embedding.weight";
    pub const VISION_POSITIONS: &str = "vision_model.embeddings.position_embedding.weight";
    pub const PRE_LN: &str = "vision_model.pre_layrnorm";
    pub const POST_LN: &str = "vision_model.post_layernorm";
    pub const VISUAL_PROJECTION: &str = "visual_projection.weight";
    pub const TOKEN_EMBEDDING: &str = "text_model.embeddings.token_embedding.weight";
    pub const TEXT_POSITIONS: &str = "text_model.embeddings.position_embedding.weight";
    pub const FINAL_LN: &str = "text_model.final_layer_norm";
    pub const TEXT_PROJECTION: &str = "text_projection.weight";
    pub const LOGIT_SCALE: &str = "logit_scale";
}

/// The HF name of a block tensor.
pub fn block_name(tower: Tower, layer: usize, p: BlockParam) -> String {
    format!("{}.encoder.layers.{layer}.{}", tower.prefix(), p.name())
}

/// Random initialisation of a synthetic parameter: mean + std·N(0, 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Init {
    pub mean: f32,
    pub std: f32,
}

impl Init {
    pub fn normal(mean: f32, std: f32) -> Init {
        Init { mean, std }
    }
}

/// One parameter of the model.
#[derive(Clone, Debug, PartialEq)]
pub struct Param {
    /// The HF name (the safetensors key).
    pub name: String,
    pub shape: Vec<usize>,
    pub tower: Tower,
    /// The block it belongs to, with its place in the block.
    pub block: Option<(usize, BlockParam)>,
    /// Leading rows fine-tuning never changes (Long-CLIP's kept position rows).
    pub frozen_rows: usize,
    pub init: Init,
}

impl Param {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Leading elements fine-tuning never changes (frozen rows × row width).
    pub fn frozen_elems(&self) -> usize {
        let row: usize = self.shape.iter().skip(1).product();
        (self.frozen_rows * row).min(self.numel())
    }
    /// A Linear weight of a block (one that gets a bf16/f16 copy).
    pub fn is_block_linear(&self) -> bool {
        self.block.is_some_and(|(_, p)| BlockParam::LINEAR_WEIGHTS.contains(&p))
    }
}

/// Every parameter of a CLIP model, in the fixed order, with a name index.
#[derive(Clone, Debug)]
pub struct Schema {
    params: Vec<Param>,
    index: HashMap<String, usize>,
    /// Where each tower's blocks start, and their counts.
    blocks: [(usize, usize); 2],
}

impl Schema {
    /// The schema of a CLIP model with `c`'s sizes.
    pub fn clip(c: &ClipConfig) -> Schema {
        let (v, t) = (&c.vision, &c.text);
        let (vh, th, d) = (v.tower.hidden, t.tower.hidden, c.projection_dim);
        let mut p = Vec::new();
        let one = |name: &str, shape: Vec<usize>, tower: Tower, init: Init| Param { name: name.into(), shape, tower, block: None, frozen_rows: 0, init };
        let ln = |p: &mut Vec<Param>, prefix: &str, n: usize, tower: Tower| {
            p.push(one(&format!("{prefix}.weight"), vec![n], tower, Init::normal(1.0, 0.1)));
            p.push(one(&format!("{prefix}.bias"), vec![n], tower, Init::normal(0.0, 0.02)));
        };
        let vstd = (vh as f32).powf(-0.5);
        p.push(one(names::CLASS_EMBEDDING, vec![vh], Tower::Vision, Init::normal(0.0, vstd)));
        p.push(one(names::PATCH_EMBEDDING, vec![vh, v.channels, v.patch_size, v.patch_size], Tower::Vision, Init::normal(0.0, 0.02)));
        p.push(one(names::VISION_POSITIONS, vec![v.tokens(), vh], Tower::Vision, Init::normal(0.0, vstd)));
        ln(&mut p, names::PRE_LN, vh, Tower::Vision);
        let vision_blocks = p.len();
        push_blocks(&mut p, Tower::Vision, &v.tower);
        ln(&mut p, names::POST_LN, vh, Tower::Vision);
        p.push(one(names::VISUAL_PROJECTION, vec![d, vh], Tower::Vision, Init::normal(0.0, vstd)));
        p.push(one(names::TOKEN_EMBEDDING, vec![t.vocab, th], Tower::Text, Init::normal(0.0, 0.02)));
        let mut pos = one(names::TEXT_POSITIONS, vec![t.max_positions, th], Tower::Text, Init::normal(0.0, 0.01));
        pos.frozen_rows = t.frozen_positions;
        p.push(pos);
        let text_blocks = p.len();
        push_blocks(&mut p, Tower::Text, &t.tower);
        ln(&mut p, names::FINAL_LN, th, Tower::Text);
        p.push(one(names::TEXT_PROJECTION, vec![d, th], Tower::Text, Init::normal(0.0, (th as f32).powf(-0.5))));
        p.push(one(names::LOGIT_SCALE, vec![], Tower::Head, Init::normal(c.logit_scale_init, 0.0)));
        let index = p.iter().enumerate().map(|(i, q)| (q.name.clone(), i)).collect();
        Schema { params: p, index, blocks: [(vision_blocks, v.tower.layers), (text_blocks, t.tower.layers)] }
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }
    pub fn len(&self) -> usize {
        self.params.len()
    }
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }
    /// The place of a parameter in the order.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }
    pub fn get(&self, name: &str) -> Option<&Param> {
        self.index(name).map(|i| &self.params[i])
    }
    /// (name, shape) pairs in order.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.params.iter().map(|p| (p.name.clone(), p.shape.clone())).collect()
    }
    /// How many blocks a tower has.
    pub fn layers(&self, tower: Tower) -> usize {
        match tower {
            Tower::Vision => self.blocks[0].1,
            Tower::Text => self.blocks[1].1,
            Tower::Head => 0,
        }
    }
    /// The indices of block `layer`'s 16 tensors ([`BlockParam`] order).
    pub fn block(&self, tower: Tower, layer: usize) -> Range<usize> {
        let (start, n) = match tower {
            Tower::Vision => self.blocks[0],
            Tower::Text => self.blocks[1],
            Tower::Head => (0, 0),
        };
        assert!(layer < n, "block {layer} of a {n}-block tower");
        start + 16 * layer..start + 16 * (layer + 1)
    }
    /// The indices of a tower's parameters, in order.
    pub fn tower(&self, tower: Tower) -> Vec<usize> {
        (0..self.params.len()).filter(|&i| self.params[i].tower == tower).collect()
    }
}

fn push_blocks(p: &mut Vec<Param>, tower: Tower, t: &TowerConfig) {
    for l in 0..t.layers {
        for b in BlockParam::ALL {
            p.push(Param {
                name: block_name(tower, l, b),
                shape: b.shape(t.hidden, t.intermediate),
                tower,
                block: Some((l, b)),
                frozen_rows: 0,
                init: b.init(t.hidden, t.layers),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_ranges_name_their_tensors() {
        let mut c = ClipConfig::preset("b32").unwrap();
        c.text.frozen_positions = 20;
        let s = Schema::clip(&c);
        assert_eq!(s.len(), 5 + 16 * 12 + 3 + 2 + 16 * 12 + 3 + 1);
        for tower in [Tower::Vision, Tower::Text] {
            for l in [0, 11] {
                for (i, b) in s.block(tower, l).zip(BlockParam::ALL) {
                    assert_eq!(s.params()[i].name, block_name(tower, l, b));
                    assert_eq!(s.params()[i].block, Some((l, b)));
                }
            }
        }
        assert_eq!(s.get(names::TEXT_POSITIONS).unwrap().frozen_elems(), 20 * 512);
        assert_eq!(s.params().last().unwrap().name, names::LOGIT_SCALE);
    }
}
