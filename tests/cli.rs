//! The commands end to end on the tiny fixture model: output shapes, normalisation, row order,
//! the --dir file list, and JSON outputs that parse.
use clipforge::io::npy::read_npy;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(p)
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("clipforge-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_clipforge")).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn images() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixture("images")).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}

#[test]
fn embed_text_rows_are_normalised_and_in_order() {
    let d = tmpdir("text");
    let m = fixture("tiny");
    let (a, b) = (d.join("a.npy"), d.join("b.npy"));
    run(&["embed-text", "--model", m.to_str().unwrap(), "--out", a.to_str().unwrap(), "a photo of a cat", "a diagram", "x"]);
    run(&["embed-text", "--model", m.to_str().unwrap(), "--batch", "1", "--out", b.to_str().unwrap(), "x", "a diagram", "a photo of a cat"]);
    let (va, sa) = read_npy(&a).unwrap();
    let (vb, sb) = read_npy(&b).unwrap();
    assert_eq!(sa, vec![3, 24]);
    assert_eq!(sb, sa);
    for r in va.chunks(24) {
        let n: f32 = r.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((n - 1.0).abs() < 1e-5, "norm {n}");
    }
    for i in 0..3 {
        for j in 0..24 {
            assert!((va[i * 24 + j] - vb[(2 - i) * 24 + j]).abs() < 1e-5, "row order / batching changed row {i}");
        }
    }
    let raw = d.join("raw.npy");
    run(&["embed-text", "--model", m.to_str().unwrap(), "--no-normalize", "--out", raw.to_str().unwrap(), "a photo of a cat"]);
    let (vr, _) = read_npy(&raw).unwrap();
    let n: f32 = vr.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((n - 1.0).abs() > 1e-3, "--no-normalize still normalised");
}

#[test]
fn embed_image_dir_writes_file_list() {
    let d = tmpdir("img");
    let m = fixture("odd");
    let out = d.join("emb.npy");
    run(&["embed-image", "--model", m.to_str().unwrap(), "--batch", "2", "--out", out.to_str().unwrap(), "--dir", fixture("images").to_str().unwrap()]);
    let (_, shape) = read_npy(&out).unwrap();
    let imgs = images();
    assert_eq!(shape, vec![imgs.len(), 72]);
    let list = std::fs::read_to_string(d.join("emb.files.txt")).unwrap();
    let listed: Vec<PathBuf> = list.lines().map(PathBuf::from).collect();
    assert_eq!(listed, imgs);
    // One image alone gives the same row as inside the batch.
    let one = d.join("one.npy");
    run(&["embed-image", "--model", m.to_str().unwrap(), "--out", one.to_str().unwrap(), imgs[1].to_str().unwrap()]);
    let (all, _) = read_npy(&out).unwrap();
    let (o, _) = read_npy(&one).unwrap();
    for j in 0..72 {
        assert!((all[72 + j] - o[j]).abs() < 1e-5);
    }
}

#[test]
fn classify_and_similarity_json() {
    let m = fixture("tiny");
    let imgs = images();
    let img = imgs[0].to_str().unwrap();
    let out = run(&["classify", "--model", m.to_str().unwrap(), "--labels", "cat,dog,car", "--top-k", "2", "--json", img]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["top"].as_array().unwrap().len(), 2);
    let out = run(&["similarity", "--model", m.to_str().unwrap(), "--image", img, "--text", "a cat", "a dog", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let p: Vec<f64> = v["probs"][0].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-5);
    assert!(v["cosine"][0][0].as_f64().unwrap().abs() <= 1.0);
}

#[test]
fn bench_json_on_a_model_directory() {
    let m = fixture("tiny");
    let out = run(&["bench", "--model", m.to_str().unwrap(), "--batch", "2", "--iters", "1", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["images_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["texts_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["gemm_ceiling_gflops"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_train_json_and_its_errors() {
    let m = fixture("tiny");
    let mt = m.to_str().unwrap();
    for extra in [&[][..], &["--recompute"][..], &["--stretch", "--text-len", "248"][..]] {
        let mut args = vec!["bench", "--task", "train", "--model", mt, "--batch", "4", "--iters", "1", "--device", "cpu", "--json"];
        args.extend(extra);
        let v: serde_json::Value = serde_json::from_str(&run(&args)).unwrap();
        assert!(v["samples_per_s"].as_f64().unwrap() > 0.0 && v["loss"].as_f64().unwrap().is_finite(), "{v}");
        assert_eq!(v["recompute"].as_bool().unwrap(), extra == ["--recompute"]);
        assert_eq!(v["long_tokens"].as_u64().unwrap(), if extra.contains(&"--stretch") { 248 } else { 77 });
    }
    for (args, needle) in [
        (vec!["bench", "--task", "nope"], "--task nope"),
        (vec!["bench", "--task", "train", "--model", mt, "--batch", "1"], "--batch"),
        (vec!["bench", "--task", "train", "--model", mt, "--batch", "4", "--device", "cpu", "--dtype", "bf16"], "bf16"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_clipforge")).args(&args).output().unwrap();
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && e.trim().lines().count() == 1 && e.contains(needle), "{args:?}: {e}");
    }
}

#[test]
fn help_on_every_command() {
    for c in ["bench", "embed-image", "embed-text", "classify", "similarity"] {
        let out = run(&[c, "--help"]);
        assert!(out.contains("Usage"), "{c} --help: {out}");
    }
}
