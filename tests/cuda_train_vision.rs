//! The device vision tower for training (src/cuda/train_vision.rs) on the CUDA emulator against
//! the CPU tape's vision tower (`TrainClip::image_embeds`) on the tiny fixture: the embeddings and
//! the gradient of every vision parameter, per element.
mod common;
use clipforge::autograd::Tape;
use clipforge::cuda::train_block::DevBlock;
use clipforge::cuda::train_vision::{backward, forward, DevVision};
use clipforge::cuda::{DeviceOps, EmuOps};
use clipforge::train::model::{TrainClip, BLOCK_PARAMS};
use clipforge::Tensor;


#[test]
fn device_vision_tower_matches_the_cpu_tape() {
    let model = TrainClip::load_dir(&common::fixture("tiny")).unwrap();
    let vc = &model.config.vision;
    let b = 3;
    let px = Tensor::from_vec(common::randn(b * 3 * vc.image_size * vc.image_size, 21), &[b, 3, vc.image_size, vc.image_size]).unwrap();
    let tape = Tape::new();
    let sv = model.vars(&tape);
    let e = model.image_embeds(&tape, &sv, &px).unwrap();
    let r = common::randn(e.value().numel(), 22);
    let grads = tape.backward_from(&e, Tensor::from_vec(r.clone(), e.shape()).unwrap()).unwrap();
    let g = |name: &str| grads.get(&sv.vars[model.index(name).unwrap()]).unwrap().to_vec_f32();

    let ops = EmuOps;
    let up = |name: &str| ops.upload(&model.params[model.index(name).unwrap()].1.to_vec_f32()).unwrap();
    let layer_bufs: Vec<Vec<_>> = (0..vc.tower.layers).map(|l| BLOCK_PARAMS.iter().map(|n| up(&format!("vision_model.encoder.layers.{l}.{n}"))).collect()).collect();
    let e_ = "vision_model.embeddings";
    let bufs = [
        up(&format!("{e_}.patch_embedding.weight")),
        up(&format!("{e_}.class_embedding")),
        up(&format!("{e_}.position_embedding.weight")),
        up("vision_model.pre_layrnorm.weight"),
        up("vision_model.pre_layrnorm.bias"),
        up("vision_model.post_layernorm.weight"),
        up("vision_model.post_layernorm.bias"),
        up("visual_projection.weight"),
    ];
    let dev = DevVision {
        cfg: vc,
        patch_w: &bufs[0],
        cls: &bufs[1],
        pos: &bufs[2],
        pre_g: &bufs[3],
        pre_b: &bufs[4],
        blocks: layer_bufs.iter().map(|bb| DevBlock { p: std::array::from_fn(|i| &bb[i]), cfg: &vc.tower, half: None }).collect(),
        post_g: &bufs[5],
        post_b: &bufs[6],
        proj: &bufs[7],
        d: model.config.projection_dim,
        recompute: false,
    };
    let (ed, saved) = forward(&ops, &dev, &px.to_vec_f32(), b).unwrap();
    common::assert_close_scaled("embeddings", &ops.download(&ed).unwrap(), &e.value().to_vec_f32(), 0.0);
    let vg = backward(&ops, &dev, &saved, &ops.upload(&r).unwrap()).unwrap();
    let floor = 1e-2 * g("visual_projection.weight").iter().fold(0f32, |m, v| m.max(v.abs()));
    for (name, buf) in [
        (format!("{e_}.patch_embedding.weight"), &vg.patch_w),
        (format!("{e_}.class_embedding"), &vg.cls),
        (format!("{e_}.position_embedding.weight"), &vg.pos),
        ("vision_model.pre_layrnorm.weight".into(), &vg.pre_g),
        ("vision_model.pre_layrnorm.bias".into(), &vg.pre_b),
        ("vision_model.post_layernorm.weight".into(), &vg.post_g),
        ("vision_model.post_layernorm.bias".into(), &vg.post_b),
        ("visual_projection.weight".into(), &vg.proj),
    ] {
        common::assert_close_scaled(&format!("d {name}"), &ops.download(buf).unwrap(), &g(&name), floor);
    }
    for (l, bg) in vg.blocks.iter().enumerate() {
        for (k, buf) in bg.iter().enumerate() {
            let name = format!("vision_model.encoder.layers.{l}.{}", BLOCK_PARAMS[k]);
            common::assert_close_scaled(&format!("d {name}"), &ops.download(buf).unwrap(), &g(&name), floor);
        }
    }
}
