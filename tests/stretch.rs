//! `clipforge stretch` end to end: the stretched table equals the f64 reference of the Long-CLIP
//! formula (tiny f32 and odd f16/sharded), config.json says 248 positions and 20 frozen rows, the
//! stretched tiny model's text embeddings equal HF transformers' on the same directory
//! (tests/fixtures/stretch_expected.json, made by scripts/check_stretch_hf.py, which also checked
//! that CLIPModel loads it with no missing or unexpected keys), texts of up to 248 tokens embed,
//! and bad input is a one-line error that leaves nothing behind.
mod common;
use clipforge::io::npy::read_npy;
use clipforge::model::{ClipParts, LoadOptions, Towers, Weights};
use clipforge::ops::pos_gather::{stretch_reference, Stretch};
use common::{fixture, tmpdir};
use std::path::PathBuf;
use std::process::{Command, Output};

fn clipforge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clipforge")).args(args).output().unwrap()
}

/// The stretched model's directory, and the scratch directory holding it (removed when dropped).
fn stretched(name: &str, tag: &str) -> (common::TmpDir, PathBuf) {
    let dir = tmpdir(&format!("{name}-{tag}"));
    let out = dir.join("long");
    let o = clipforge(&["stretch", "--model", fixture(name).to_str().unwrap(), "--out", out.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((r["old_len"].as_u64(), r["new_len"].as_u64()), (Some(77), Some(248)));
    (dir, out)
}

#[test]
fn table_and_config_follow_the_formula() {
    for (name, atol, rtol) in [("tiny", 1e-6, 1e-6), ("odd", 1e-3, 1.0 / 1024.0)] {
        let (_dir, out) = stretched(name, "table");
        let orig = Weights::open(&fixture(name)).unwrap().get("text_model.embeddings.position_embedding.weight").unwrap();
        let w = orig.dim(1);
        let want = stretch_reference(&orig.to_vec_f32(), w, Stretch::LONG_CLIP);
        let got = Weights::open(&out).unwrap().get("text_model.embeddings.position_embedding.weight").unwrap();
        assert_eq!(got.shape(), &[248, w]);
        assert_eq!(got.dtype(), orig.dtype(), "{name}: stored dtype kept");
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (i, (&g, &r)) in got.to_vec_f32().iter().zip(&want).enumerate() {
            assert!((g as f64 - r).abs() <= atol * scale + rtol * r.abs(), "{name} row {} col {}: {g} vs {r}", i / w, i % w);
        }
        // rows below keep are bit-identical copies
        assert_eq!(&got.to_vec_f32()[..20 * w], &orig.to_vec_f32()[..20 * w]);
        let m = ClipParts::load_dir(&out, Towers::Both, &LoadOptions::default()).unwrap();
        assert_eq!((m.config.text.max_positions, m.config.text.frozen_positions), (248, 20));
    }
}

#[test]
fn stretched_text_embeddings_equal_hf() {
    let (_dir, out) = stretched("tiny", "hf");
    let exp: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("stretch_expected.json")).unwrap()).unwrap();
    let ids: Vec<Vec<u32>> =
        exp["ids"].as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()).collect();
    assert_eq!(ids.iter().map(|s| s.len()).max(), Some(248), "the fixture exercises the full 248 positions");
    let m = ClipParts::load_dir(&out, Towers::Text, &LoadOptions::default()).unwrap();
    let got = m.text().unwrap().forward(&ids, None, &mut |_, _| {}).unwrap().to_vec_f32();
    let want: Vec<f32> = exp["text_embeds"].as_array().unwrap().iter().flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32)).collect();
    let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= 1e-4 * (scale + w.abs()), "embedding element {i}: {g} vs HF {w}");
    }
    // the CLI embeds a text longer than 77 tokens with the stretched model (context 248)
    let long: String = (0..150).map(|i| format!("w{i} ")).collect();
    let npy = out.parent().unwrap().join("e.npy");
    let o = clipforge(&["embed-text", "--model", out.to_str().unwrap(), "--out", npy.to_str().unwrap(), &long]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(read_npy(&npy).unwrap().1, vec![1, 24]);
}

#[test]
fn bad_input_is_a_one_line_error() {
    let d = tmpdir("bad");
    let tiny = fixture("tiny");
    let bad_cfg = d.join("badcfg");
    std::fs::create_dir_all(&bad_cfg).unwrap();
    std::fs::write(bad_cfg.join("config.json"), "{ not json").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--model".into(), d.join("missing").display().to_string()], "config.json"),
        (vec!["--model".into(), tiny.display().to_string(), "--keep".into(), "77".into()], "keep"),
        (vec!["--model".into(), tiny.display().to_string(), "--ratio".into(), "0".into()], "ratio"),
        (vec!["--model".into(), bad_cfg.display().to_string()], "config.json"),
        (vec!["--model".into(), tiny.display().to_string(), "--length".into(), "60".into()], "--length 60"),
    ];
    for (i, (args, needle)) in cases.into_iter().enumerate() {
        let out = d.join(format!("out{i}"));
        let mut a: Vec<&str> = vec!["stretch", "--out", out.to_str().unwrap()];
        a.extend(args.iter().map(|s| s.as_str()));
        let o = clipforge(&a);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{a:?} succeeded");
        assert_eq!(err.trim().lines().count(), 1, "{a:?}: {err}");
        assert!(err.contains(needle), "{a:?}: {err}");
        assert!(!out.exists(), "{a:?} left {} behind", out.display());
    }
    // no temporary directories left next to the outputs
    let leftovers: Vec<_> = std::fs::read_dir(&d).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().contains(".tmp-")).collect();
    assert!(leftovers.is_empty());
}

#[test]
fn stretch_writes_through_a_symlink_and_keeps_it() {
    // The output policy of every clipforge output (src/io/output.rs): `--out` naming a symlink
    // fills the link's target and leaves the link in place.
    let d = tmpdir("stretch-symlink");
    let real = d.join("real-long");
    let link = d.join("long");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let o = clipforge(&["stretch", "--model", fixture("tiny").to_str().unwrap(), "--out", link.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the symlink was replaced");
    assert!(real.join("config.json").is_file() && real.join("model.safetensors").is_file(), "the target holds the model");
}

#[test]
fn keep_ratio_and_length_choose_the_table() {
    let d = tmpdir("stretch-length");
    let orig = Weights::open(&fixture("tiny")).unwrap().get("text_model.embeddings.position_embedding.weight").unwrap();
    let (w, tiny) = (orig.dim(1), fixture("tiny"));
    // --keep 10 --ratio 3: 3·77 − 2·10 = 211 rows; --keep 10 --length 300: ⌈290/67⌉ = 5, 345 rows cut to 300
    for (args, len, keep, ratio) in [(vec!["--keep", "10", "--ratio", "3"], 211, 10, 3), (vec!["--keep", "10", "--length", "300"], 300, 10, 5)] {
        let out = d.join(format!("m{len}"));
        let mut a = vec!["stretch", "--json", "--model", tiny.to_str().unwrap(), "--out", out.to_str().unwrap()];
        a.extend(args);
        let o = clipforge(&a);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!((r["new_len"].as_u64(), r["ratio"].as_u64(), r["keep"].as_u64()), (Some(len), Some(ratio), Some(keep)));
        let want = stretch_reference(&orig.to_vec_f32(), w, Stretch::new(77, keep as usize, ratio as usize).unwrap());
        let got = Weights::open(&out).unwrap().get("text_model.embeddings.position_embedding.weight").unwrap();
        assert_eq!(got.shape(), &[len as usize, w]);
        for (i, (&g, &r)) in got.to_vec_f32().iter().zip(&want).enumerate() {
            assert!((g as f64 - r).abs() <= 1e-6 + 1e-6 * r.abs(), "row {} col {}: {g} vs {r}", i / w, i % w);
        }
        let m = ClipParts::load_dir(&out, Towers::Both, &LoadOptions::default()).unwrap();
        assert_eq!((m.config.text.max_positions, m.config.text.frozen_positions), (len as usize, keep as usize), "frozen rows follow --keep");
        // a text filling the whole new context embeds
        let text = vec!["word"; len as usize].join(" ");
        let npy = d.join(format!("e{len}.npy"));
        let o = clipforge(&["embed-text", "--device", "cpu", "--model", out.to_str().unwrap(), "--out", npy.to_str().unwrap(), &text]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    // a ratio and a length together: refused by the argument parser
    let o = clipforge(&["stretch", "--model", tiny.to_str().unwrap(), "--out", d.join("both").to_str().unwrap(), "--length", "300", "--ratio", "4"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("cannot be used with"));
    assert!(!d.join("both").exists());
}
