//! Per-token outputs (`--hidden-states`) against HF `output_hidden_states=True`, token by token:
//! the 77-position tiny model, its Long-CLIP stretch to 248 positions (max_length and longest
//! padding), the image tower, the emulated CUDA backend, the CLI's .safetensors file and its
//! errors. Reference: tests/fixtures/hidden/reference.safetensors (scripts/make_hidden_fixture.py).
mod common;
use clipforge::api::{ClipModel, DeviceChoice, HiddenOptions, OpenOptions, Padding};
use clipforge::model::hidden::resolve_layer;
use clipforge::model::{ClipParts, CudaClip, LoadOptions, Towers, Weights};
use clipforge::tensor::DType;
use common::{assert_close, fixture, tmpdir};
use std::path::Path;
use std::process::Command;

const ATOL: f32 = 2e-5;
const RTOL: f32 = 1e-4;

fn refs() -> Weights {
    Weights::open(&fixture("hidden/reference.safetensors")).unwrap()
}

fn get(r: &Weights, name: &str) -> Vec<f32> {
    r.get(name).unwrap().to_vec_f32()
}

/// The fixture's padded int64 ids, flat.
fn padded_ids(name: &str) -> (Vec<u32>, usize) {
    let bytes = std::fs::read(fixture("hidden/reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::I64);
    (t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect(), t.shape()[1])
}

/// The fixture's padded ids, each cut after its first end token.
fn ids(_: &Weights, name: &str) -> Vec<Vec<u32>> {
    let (v, len) = padded_ids(name);
    v.chunks(len).map(|s| s[..s.iter().position(|&x| x == 49407).unwrap() + 1].to_vec()).collect()
}

fn cpu(dir: &Path) -> ClipModel {
    ClipModel::open(dir, &OpenOptions::default().device(DeviceChoice::Cpu)).unwrap()
}

fn opts(layer: i64, final_layer_norm: bool) -> HiddenOptions {
    HiddenOptions { layer, final_layer_norm, ..HiddenOptions::default() }
}

/// Every layer index (positive and negative), the final LayerNorm and the embeddings of `prefix`.
fn check_text(m: &ClipModel, r: &Weights, prefix: &str, t: usize) {
    let ids = ids(r, &format!("{prefix}.input_ids"));
    for (layer, want) in [(0, 0), (1, 1), (2, 2), (-1, 2), (-2, 1), (-3, 0)] {
        let h = m.token_hidden_states(&ids, t, &opts(layer, false)).unwrap();
        assert_eq!(h.hidden_states.shape(), &[ids.len(), t, 32]);
        assert_close(&format!("{prefix} hidden_states[{layer}]"), &h.hidden_states.to_vec_f32(), &get(r, &format!("{prefix}.hidden.{want}")), ATOL, RTOL);
        assert_close(
            &format!("{prefix} text_embeds"),
            &h.text_embeds.iter_rows().flatten().copied().collect::<Vec<_>>(),
            &get(r, &format!("{prefix}.text_embeds")),
            ATOL,
            RTOL,
        );
    }
    let h = m.token_hidden_states(&ids, t, &opts(-1, true)).unwrap();
    assert_close(&format!("{prefix} last_hidden_state"), &h.hidden_states.to_vec_f32(), &get(r, &format!("{prefix}.last")), ATOL, RTOL);
    assert_eq!(h.input_ids, padded_ids(&format!("{prefix}.input_ids")).0, "{prefix}: input_ids padded with the end token");
    let mask_ones: usize = h.attention_mask.iter().map(|&m| m as usize).sum();
    assert_eq!(mask_ones, ids.iter().map(|s| s.len()).sum::<usize>(), "{prefix}: attention_mask marks each text's tokens");
}

#[test]
fn text_hidden_states_match_hf_at_77_positions() {
    check_text(&cpu(&fixture("tiny")), &refs(), "t77", 77);
}

#[test]
fn text_hidden_states_match_hf_on_a_248_token_stretched_model() {
    let tmp = tmpdir("hidden-248");
    let out = tmp.join("tiny248");
    clipforge::model::stretch::stretch_model(&fixture("tiny"), &out, 20, 4, false).unwrap();
    let (m, r) = (cpu(&out), refs());
    assert_eq!(m.context_length(), 248);
    check_text(&m, &r, "t248", 248);
    // --padding longest: padded to the longest text only.
    let ids = ids(&r, "t248l.input_ids");
    let t = ids.iter().map(|s| s.len()).max().unwrap();
    let h = m.token_hidden_states(&ids, 248, &HiddenOptions { layer: -2, padding: Padding::Longest, ..HiddenOptions::default() }).unwrap();
    assert_eq!(h.tokens, t);
    assert_close("t248 longest hidden_states[-2]", &h.hidden_states.to_vec_f32(), &get(&r, "t248l.hidden.1"), ATOL, RTOL);
}

#[test]
fn image_hidden_states_match_hf() {
    let (m, r) = (cpu(&fixture("tiny")), refs());
    let px = get(&r, "v.pixel_values");
    for (layer, want) in [(0, "v.hidden.0"), (1, "v.hidden.1"), (-1, "v.hidden.2"), (-2, "v.hidden.1")] {
        let h = m.pixel_hidden_states(&px, 2, &opts(layer, false)).unwrap();
        assert_eq!(h.hidden_states.shape(), &[2, 17, 64]);
        assert_close(&format!("vision hidden_states[{layer}]"), &h.hidden_states.to_vec_f32(), &get(&r, want), ATOL, RTOL);
        assert_close("image_embeds", &h.image_embeds.iter_rows().flatten().copied().collect::<Vec<_>>(), &get(&r, "v.image_embeds"), ATOL, RTOL);
    }
    let h = m.pixel_hidden_states(&px, 2, &opts(-1, true)).unwrap();
    assert_close("vision post_layernorm of every token", &h.hidden_states.to_vec_f32(), &get(&r, "v.post_ln"), ATOL, RTOL);
}

#[test]
fn emulated_cuda_hidden_states_match_hf() {
    let r = refs();
    let tmp = tmpdir("hidden-emu");
    let out = tmp.join("tiny248");
    clipforge::model::stretch::stretch_model(&fixture("tiny"), &out, 20, 4, false).unwrap();
    for (dir, prefix, t) in [(fixture("tiny"), "t77", 77), (out, "t248", 248)] {
        let parts = ClipParts::load_dir(&dir, Towers::Both, &LoadOptions { dtype: DType::F32 }).unwrap();
        let dev = CudaClip::new(Box::new(clipforge::cuda::EmuOps), &parts).unwrap();
        let (s, e) = dev.text_hidden(&ids(&r, &format!("{prefix}.input_ids")), t, resolve_layer(-2, 2).unwrap(), false).unwrap();
        assert_close(&format!("emulated {prefix} hidden_states[-2]"), &s, &get(&r, &format!("{prefix}.hidden.1")), ATOL, RTOL);
        assert_close(&format!("emulated {prefix} text_embeds"), &e, &get(&r, &format!("{prefix}.text_embeds")), ATOL, RTOL);
        if prefix == "t77" {
            let (s, e) = dev.vision_hidden(&get(&r, "v.pixel_values"), 2, 2, true).unwrap();
            assert_close("emulated vision post_ln", &s, &get(&r, "v.post_ln"), ATOL, RTOL);
            assert_close("emulated image_embeds", &e, &get(&r, "v.image_embeds"), ATOL, RTOL);
        }
    }
}

#[test]
fn a_layer_outside_the_tower_is_a_clear_error() {
    assert_eq!(resolve_layer(-1, 12).unwrap(), 12);
    assert_eq!(resolve_layer(-13, 12).unwrap(), 0);
    for bad in [13, -14] {
        let e = resolve_layer(bad, 12).unwrap_err().to_string();
        assert!(e.contains("between -13 and 12"), "{e}");
    }
    let m = cpu(&fixture("tiny"));
    let e = m.text_hidden_states(&["a cat"], &opts(3, false)).unwrap_err().to_string();
    assert!(e.contains("hidden-states layer 3"), "{e}");
}

fn clipforge() -> Command {
    Command::new(env!("CARGO_BIN_EXE_clipforge"))
}

#[test]
fn cli_writes_the_hidden_states_file() {
    let dir = tmpdir("hidden-cli");
    let texts: Vec<String> = serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(fixture("tokens.json")).unwrap()).unwrap()["texts"]
        .as_array()
        .unwrap()
        .iter()
        .take(3)
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    let out = dir.join("h.safetensors");
    let o = clipforge()
        .args(["embed-text", "--device", "cpu", "--model"])
        .arg(fixture("tiny"))
        .args(["--hidden-states", "-2", "--out-dtype", "f16", "--out"])
        .arg(&out)
        .args(&texts)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let shape = |n: &str| st.tensor(n).unwrap().shape().to_vec();
    assert_eq!(shape("hidden_states"), vec![3, 77, 32]);
    assert_eq!(shape("attention_mask"), vec![3, 77]);
    assert_eq!(shape("input_ids"), vec![3, 77]);
    assert_eq!(shape("text_embeds"), vec![3, 24]);
    assert_eq!(st.tensor("hidden_states").unwrap().dtype(), safetensors::Dtype::F16);
    assert_eq!(st.tensor("input_ids").unwrap().dtype(), safetensors::Dtype::I64);
    let got: Vec<f32> = st.tensor("hidden_states").unwrap().data().chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
    // f16 storage: half a unit in the 11th bit.
    assert_close("CLI f16 hidden_states[-2]", &got, &get(&refs(), "t77.hidden.1"), 1e-4, 1.0 / 1024.0);

    let o = clipforge()
        .args(["embed-image", "--device", "cpu", "--model"])
        .arg(fixture("tiny"))
        .args(["--hidden-states", "-1", "--final-layer-norm", "--out"])
        .arg(dir.join("i.safetensors"))
        .arg(fixture("images/chelsea.png"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(dir.join("i.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("hidden_states").unwrap().shape(), &[1, 17, 64]);
    assert_eq!(st.tensor("image_embeds").unwrap().shape(), &[1, 24]);

    // A .npy name, or a layer outside the tower: one line, non-zero exit, nothing written.
    for (args, msg) in [
        (vec!["--hidden-states", "-2", "--out", "x.npy"], "name the output FILE.safetensors"),
        (vec!["--hidden-states", "5", "--out", "y.safetensors"], "between -3 and 2"),
    ] {
        let o =
            clipforge().current_dir(&dir).args(["embed-text", "--device", "cpu", "--model"]).arg(fixture("tiny")).args(&args).arg("a cat").output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(msg) && err.trim().lines().count() == 1, "{err}");
    }
    assert!(!dir.join("x.npy").exists() && !dir.join("y.safetensors").exists());
}
