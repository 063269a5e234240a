//! The device text tower for training (src/cuda/train_text.rs) on the CUDA emulator against the
//! CPU tape's text tower (`TrainClip::text_embeds`) on the tiny fixture: the embeddings and the
//! gradient of every text parameter (token and position tables, every block, final LayerNorm,
//! projection), per element.
mod common;
use clipforge::autograd::Tape;
use clipforge::cuda::train_block::DevBlock;
use clipforge::cuda::train_text::{backward, forward, DevText};
use clipforge::cuda::{DeviceOps, EmuOps};
use clipforge::train::model::{TrainClip, BLOCK_PARAMS};
use clipforge::Tensor;


#[test]
fn device_text_tower_matches_the_cpu_tape() {
    let model = TrainClip::load_dir(&common::fixture("tiny")).unwrap();
    let ids: Vec<Vec<u32>> = vec![vec![49406, 320, 1125, 539, 320, 2368, 49407], vec![49406, 2368, 49407], vec![49406, 320, 320, 1125, 49407]];
    let tape = Tape::new();
    let sv = model.vars(&tape);
    let e = model.text_embeds(&tape, &sv, &ids).unwrap();
    let r = common::randn(e.value().numel(), 11);
    let grads = tape.backward_from(&e, Tensor::from_vec(r.clone(), e.shape()).unwrap()).unwrap();
    let g = |name: &str| grads.get(&sv.vars[model.index(name).unwrap()]).unwrap().to_vec_f32();

    let ops = EmuOps;
    let up = |name: &str| ops.upload(&model.params[model.index(name).unwrap()].1.to_vec_f32()).unwrap();
    let c = &model.config.text;
    let layer_bufs: Vec<Vec<_>> = (0..c.tower.layers).map(|l| BLOCK_PARAMS.iter().map(|n| up(&format!("text_model.encoder.layers.{l}.{n}"))).collect()).collect();
    let (tok, pos, fg, fb, proj) = (
        up("text_model.embeddings.token_embedding.weight"),
        up("text_model.embeddings.position_embedding.weight"),
        up("text_model.final_layer_norm.weight"),
        up("text_model.final_layer_norm.bias"),
        up("text_projection.weight"),
    );
    let dev = DevText {
        cfg: c,
        tok: &tok,
        pos: &pos,
        blocks: layer_bufs.iter().map(|bufs| DevBlock { p: std::array::from_fn(|i| &bufs[i]), cfg: &c.tower, half: None }).collect(),
        final_g: &fg,
        final_b: &fb,
        proj: &proj,
        d: model.config.projection_dim,
        recompute: false,
    };
    let (ed, saved) = forward(&ops, &dev, &ids).unwrap();
    common::assert_close_scaled("embeddings", &ops.download(&ed).unwrap(), &e.value().to_vec_f32(), 0.0);
    let dtok = ops.alloc(c.vocab * c.tower.hidden).unwrap();
    let tg = backward(&ops, &dev, &saved, &ops.upload(&r).unwrap(), &dtok).unwrap();
    let floor = 1e-2 * g("text_projection.weight").iter().fold(0f32, |m, v| m.max(v.abs()));
    common::assert_close_scaled("d token_embedding", &ops.download(&dtok).unwrap(), &g("text_model.embeddings.token_embedding.weight"), floor);
    common::assert_close_scaled("d position_embedding", &ops.download(&tg.pos).unwrap(), &g("text_model.embeddings.position_embedding.weight"), floor);
    common::assert_close_scaled("d final_layer_norm.weight", &ops.download(&tg.final_g).unwrap(), &g("text_model.final_layer_norm.weight"), floor);
    common::assert_close_scaled("d final_layer_norm.bias", &ops.download(&tg.final_b).unwrap(), &g("text_model.final_layer_norm.bias"), floor);
    common::assert_close_scaled("d text_projection", &ops.download(&tg.proj).unwrap(), &g("text_projection.weight"), floor);
    for (l, bg) in tg.blocks.iter().enumerate() {
        for (k, buf) in bg.iter().enumerate() {
            let name = format!("text_model.encoder.layers.{l}.{}", BLOCK_PARAMS[k]);
            common::assert_close_scaled(&format!("d {name}"), &ops.download(buf).unwrap(), &g(&name), floor);
        }
    }
}
