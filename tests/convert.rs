//! Released PyTorch checkpoints (tests/fixtures/pt, made by scripts/make_pt_fixtures.py from
//! open_clip's OpenAI-structured CLIP): the .pt reader against the tensors PyTorch saved, the
//! converted models' embeddings against what the PyTorch code computed from the same weights
//! (per element, ≤ 1e-4 relative), the converted directory, Long-CLIP's frozen rows, SmartCLIP's
//! mask network, and bad files as one-line errors.
mod common;
use clipforge::io::pt::{read_pt, PtKind};
use clipforge::model::convert::{convert_pt, Flavour};
use clipforge::model::{ClipConfig, Schema, Weights};
use clipforge::train::model::TrainClip;
use clipforge::{ClipModel, DeviceChoice, OpenOptions};
use common::{assert_close, fixture, tmpdir};
use std::path::{Path, PathBuf};
use std::process::Command;

fn pt(name: &str) -> PathBuf {
    fixture(&format!("pt/{name}"))
}

fn reference(name: &str) -> (Vec<f32>, Vec<usize>) {
    let w = Weights::open(&pt("reference.safetensors")).unwrap();
    let t = w.get(name).unwrap();
    (t.to_vec_f32(), t.shape().to_vec())
}

/// Token id rows of the reference, cut after their end token (the largest id), as clipforge takes them.
fn ids(name: &str) -> Vec<Vec<u32>> {
    let (v, s) = reference(name);
    v.chunks(s[1])
        .map(|r| {
            let end = r.iter().enumerate().fold(0, |b, (i, &x)| if x > r[b] { i } else { b });
            r[..=end].iter().map(|&x| x as u32).collect()
        })
        .collect()
}

fn cpu() -> OpenOptions {
    OpenOptions::default().device(DeviceChoice::Cpu)
}

fn check_embeddings(model: &ClipModel, prefix: &str, ids_name: &str) {
    let (px, ps) = reference("pixels");
    let img = model.embed_pixels(&px, ps[0]).unwrap();
    let (want, _) = reference(&format!("{prefix}_image_embeds"));
    assert_close(&format!("{prefix} image embeds"), &img.data, &want, 1e-5, 1e-4);
    let txt = model.embed_token_ids(&ids(ids_name), false, 8, &mut |_| {}).unwrap();
    let (want, _) = reference(&format!("{prefix}_text_embeds"));
    assert_close(&format!("{prefix} text embeds"), &txt.data, &want, 1e-5, 1e-4);
}

#[test]
fn reader_materialises_shared_strided_and_half_storages() {
    let ck = read_pt(&pt("views.pt")).unwrap();
    assert_eq!(ck.kind, PtKind::StateDict);
    let want = Weights::open(&pt("views_expected.safetensors")).unwrap();
    assert_eq!(ck.tensors.len(), want.names().len());
    for name in want.names() {
        let w = want.get(name).unwrap();
        let g = ck.tensors.get(name).unwrap_or_else(|| panic!("{name} not read"));
        assert_eq!(g.shape(), w.shape(), "{name}");
        assert_eq!(g.to_vec_f32(), w.to_vec_f32(), "{name}");
    }
}

#[test]
fn openai_torchscript_archive_matches_pytorch() {
    let c = convert_pt(&pt("openai_jit.pt")).unwrap();
    assert_eq!((c.kind, c.flavour), (PtKind::TorchScript, Flavour::OpenAi));
    let (v, t) = (&c.config.vision, &c.config.text);
    assert_eq!((v.image_size, v.patch_size, v.tower.layers, v.tower.hidden, v.tower.heads), (32, 8, 2, 64, 1));
    assert_eq!((t.max_positions, t.frozen_positions, t.vocab, t.tower.layers, c.config.projection_dim), (77, 0, 300, 2, 32));
    for extra in ["input_resolution", "context_length", "vocab_size"] {
        assert!(c.ignored.iter().any(|n| n == extra), "{extra} not listed as ignored: {:?}", c.ignored);
    }
    // opened directly from the .pt (in memory) and from the converted directory
    let direct = ClipModel::open(pt("openai_jit.pt"), &cpu()).unwrap();
    check_embeddings(&direct, "openai", "openai_ids");
    let tmp = tmpdir("convert-openai");
    let dir = tmp.join("model");
    let r = c.write(&dir, false).unwrap();
    assert_eq!(r.tensors, Schema::clip(&c.config).len());
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    let from_dir = ClipModel::open(&dir, &cpu()).unwrap();
    check_embeddings(&from_dir, "openai", "openai_ids");
    assert_eq!(ClipConfig::from_file(&dir.join("config.json")).unwrap(), c.config);
    // the built-in tokenizer serves the .pt as the written tokenizer.json serves the directory
    let (a, b) = (direct.tokenizer(None).unwrap(), from_dir.tokenizer(None).unwrap());
    assert_eq!(a.encode("a photo of a cat").unwrap(), b.encode("a photo of a cat").unwrap());
    assert_eq!(a.encode("a photo of a cat").unwrap(), vec![49406, 320, 1125, 539, 320, 2368, 49407]);
    // a second write needs --force
    assert!(c.write(&dir, false).unwrap_err().to_string().contains("--force"));
    c.write(&dir, true).unwrap();
}

#[test]
fn longclip_state_dict_merges_position_tables_and_freezes_twenty_rows() {
    let c = convert_pt(&pt("longclip.pt")).unwrap();
    assert_eq!((c.kind, c.flavour), (PtKind::StateDict, Flavour::LongClip));
    assert_eq!((c.config.text.max_positions, c.config.text.frozen_positions), (248, 20));
    let model = ClipModel::open(pt("longclip.pt"), &cpu()).unwrap();
    assert_eq!(model.context_length(), 248);
    check_embeddings(&model, "longclip", "longclip_ids");
    // the written directory records the frozen rows as `stretch` does; training keeps them
    let tmp = tmpdir("convert-longclip");
    let dir = tmp.join("model");
    c.write(&dir, false).unwrap();
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["text_config"]["clipforge_frozen_positions"], 20);
    assert_eq!(v["text_config"]["max_position_embeddings"], 248);
    let tc = TrainClip::load_dir(&dir).unwrap();
    let pos = tc.schema.get(clipforge::model::schema::names::TEXT_POSITIONS).unwrap();
    assert_eq!(pos.frozen_rows, 20);
}

#[test]
fn smartclip_mask_network_is_mapped_and_matches_pytorch() {
    use clipforge::train::smartclip::{id_masks, load_mask_params, MASK_FILE};
    let c = convert_pt(&pt("smartclip.pt")).unwrap();
    assert_eq!(c.flavour, Flavour::SmartClip);
    let mask = c.mask_net.clone().unwrap();
    // the fixture's 300-token vocabulary ends its texts with id 299, not CLIP's 49407 (the
    // training towers pad with the end token)
    let mut cfg = c.config.clone();
    cfg.text.eos_token_id = 299;
    let got = id_masks(TrainClip::from_weights(&c.weights(), &cfg).unwrap(), mask, &ids("longclip_ids"), 8).unwrap();
    let (soft, _) = reference("smartclip_soft");
    let (want, _) = reference("smartclip_masks");
    assert_eq!(got.len(), want.len());
    let decided: Vec<usize> = (0..want.len()).filter(|&i| (soft[i] - 0.5).abs() > 1e-4).collect();
    assert!(decided.len() > want.len() * 9 / 10);
    assert!(want.contains(&0.0) && want.contains(&1.0), "reference masks are all one value");
    for i in decided {
        assert_eq!(got[i], want[i], "mask element {i} (soft {})", soft[i]);
    }
    // written beside the model in the layout `finetune --method smartclip` reads
    let tmp = tmpdir("convert-smartclip");
    let dir = tmp.join("model");
    c.write(&dir, false).unwrap();
    let tc = TrainClip::load_dir(&dir).unwrap();
    let loaded = load_mask_params(&tc, &dir.join(MASK_FILE)).unwrap();
    for ((n, a), (m, b)) in loaded.iter().zip(c.mask_net.as_ref().unwrap()) {
        assert_eq!(n, m);
        assert_eq!(a.to_vec_f32(), b.to_vec_f32(), "{n}");
    }
}

/// A bad file: an error of one line naming the file and saying `what`.
fn refused(path: &Path, what: &str) {
    let e = convert_pt(path).err().unwrap_or_else(|| panic!("{} was accepted", path.display())).to_string();
    assert!(!e.contains('\n'), "{e}");
    assert!(e.contains(&*path.to_string_lossy()), "{e}");
    assert!(e.contains(what), "{e} (expected: {what})");
}

#[test]
fn bad_files_are_one_line_errors() {
    refused(&pt("bad_truncated.pt"), "not a PyTorch zip checkpoint");
    refused(&pt("bad_foreign.pt"), "unsupported pickle global posix.system at byte");
    refused(&pt("bad_missing.pt"), "missing tensor \"visual.conv1.weight\"");
    refused(&pt("bad_nopkl.pt"), "no <folder>/data.pkl");
    refused(&pt("bad_legacy.pt"), "pre-1.6 torch.save");
    // a ResNet state dict and a Long-CLIP file stretched again
    let dir = tmpdir("convert-bad");
    let copy = dir.join("views.pt");
    std::fs::copy(pt("views.pt"), &copy).unwrap();
    refused(&copy, "missing tensor");
}

#[test]
fn cli_converts_and_reads_pt_directly() {
    let bin = env!("CARGO_BIN_EXE_clipforge");
    let dir = tmpdir("convert-cli");
    let out = dir.join("model");
    let o = Command::new(bin).args(["convert", "--from"]).arg(pt("longclip.pt")).arg("--out").arg(&out).arg("--json").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["flavour"].as_str(), v["frozen_positions"].as_u64(), v["text_positions"].as_u64()), (Some("LongClip"), Some(20), Some(248)));
    // embed-image with the .pt itself as --model, and with the converted directory: same numbers
    let img = fixture("images")
        .read_dir()
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "png" || x == "jpg"))
        .unwrap();
    let mut got = vec![];
    for (m, name) in [(pt("longclip.pt"), "a.npy"), (out.clone(), "b.npy")] {
        let npy = dir.join(name);
        let o = Command::new(bin).args(["embed-image", "--device", "cpu", "--model"]).arg(&m).arg("--out").arg(&npy).arg(&img).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        got.push(clipforge::io::npy::read_npy(&npy).unwrap().0);
    }
    assert_eq!(got[0], got[1]);
    // stretch takes OpenAI's .pt; a Long-CLIP .pt is already stretched (named in the error)
    let o = Command::new(bin).args(["stretch", "--json", "--model"]).arg(pt("openai_jit.pt")).arg("--out").arg(dir.join("stretched")).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((v["old_len"].as_u64(), v["new_len"].as_u64()), (Some(77), Some(248)));
    assert!(!std::fs::read_dir(&dir).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().contains("pt-source")), "temporary conversion left behind");
    let o = Command::new(bin).args(["stretch", "--model"]).arg(pt("longclip.pt")).arg("--out").arg(dir.join("again")).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("longclip.pt: already stretched"), "{err}");
    // a foreign pickle: exit 1, one line on stderr, nothing written
    let bad = dir.join("bad");
    let o = Command::new(bin).args(["convert", "--from"]).arg(pt("bad_foreign.pt")).arg("--out").arg(&bad).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("bad_foreign.pt") && err.contains("posix.system"), "{err}");
    assert!(!bad.exists());
}

#[test]
fn altered_bytes_never_panic() {
    // every 5th byte of a small checkpoint overwritten, and every 50th length cut: an error or a
    // read, never a panic
    let good = std::fs::read(pt("views.pt")).unwrap();
    let dir = tmpdir("convert-fuzz");
    let f = dir.join("x.pt");
    for i in (0..good.len()).step_by(5) {
        let mut b = good.clone();
        b[i] ^= 0x5a;
        std::fs::write(&f, &b).unwrap();
        let _ = read_pt(&f);
    }
    for n in (0..good.len()).step_by(50) {
        std::fs::write(&f, &good[..n]).unwrap();
        assert!(read_pt(&f).is_err(), "a cut at {n} bytes was read");
    }
}
