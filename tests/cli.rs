//! The commands end to end on the tiny fixture model: output shapes, normalisation, row order,
//! the --dir file list, and JSON outputs that parse.
mod common;
use clipforge::io::npy::read_npy;
use common::{fixture, tmpdir}; // scratch directories removed when each test ends
use std::path::PathBuf;
use std::process::Command;

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
fn bench_reports_the_cpu_and_its_paths() {
    let m = fixture("tiny");
    let mt = m.to_str().unwrap();
    let cpu_of = |env: Option<&str>, args: &[&str]| -> serde_json::Value {
        let mut c = Command::new(env!("CARGO_BIN_EXE_clipforge"));
        c.args(args).env_remove("CLIPFORGE_CPU_GEMM").env_remove("CLIPFORGE_CPU_ATTN");
        if let Some(p) = env {
            c.env("CLIPFORGE_CPU_GEMM", p);
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["cpu"].clone()
    };
    let embed = ["bench", "--model", mt, "--batch", "2", "--iters", "1", "--device", "cpu", "--dtype", "bf16", "--json"];
    let c = cpu_of(None, &embed);
    assert!(!c["name"].as_str().unwrap().is_empty() && ["intel", "amd", "other"].contains(&c["vendor"].as_str().unwrap()), "{c}");
    assert!(["amx", "avx512bf16", "avx512", "scalar"].contains(&c["gemm_path"].as_str().unwrap()), "{c}");
    // the amx path only where CPUID says AMX-BF16; vdpbf16ps only where the CPU has AVX512-BF16
    assert!(c["gemm_path"] != "amx" || c["amx_bf16"] == true, "{c}");
    assert!(c["bf16_kernel"] != "vdpbf16ps" || c["avx512_bf16"] == true, "{c}");
    // capped to the portable path: every report says so
    let c = cpu_of(Some("scalar"), &embed);
    assert_eq!((c["gemm_path"].as_str(), c["bf16_kernel"].as_str(), c["bf16_attention"].as_bool()), (Some("scalar"), Some("portable"), Some(false)), "{c}");
    let train = ["bench", "--task", "train", "--model", mt, "--batch", "4", "--iters", "1", "--device", "cpu", "--json"];
    assert_eq!(cpu_of(Some("scalar"), &train)["gemm_path"], "scalar");
    let text = run(&["bench", "--model", mt, "--batch", "2", "--iters", "1", "--device", "cpu", "--towers", "image"]);
    assert!(text.lines().any(|l| l.starts_with("cpu ") && l.contains("GEMM path")), "{text}");
}

/// A reader that stops early (`clipforge bench --json | head -1`) ends the command quietly: no
/// panic message from a write to the closed pipe.
#[test]
fn a_closed_stdout_is_not_a_panic() {
    let m = fixture("tiny");
    let mut c = Command::new(env!("CARGO_BIN_EXE_clipforge"))
        .args(["bench", "--model", m.to_str().unwrap(), "--batch", "2", "--iters", "1", "--device", "cpu", "--profile", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(c.stdout.take()); // the reader is gone before the first write
    let out = c.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");
    assert!(!out.status.success(), "a write to a closed pipe cannot succeed");
}

#[test]
fn bench_profile_tables() {
    let m = fixture("tiny");
    let mt = m.to_str().unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&run(&["bench", "--model", mt, "--batch", "2", "--iters", "2", "--device", "cpu", "--profile", "--json"])).unwrap();
    for tower in ["image", "text"] {
        let p = &v[format!("{tower}_profile")];
        let ops = p["ops"].as_array().unwrap_or_else(|| panic!("{tower}: no profile in {v}"));
        assert_eq!(p["batches"].as_u64(), Some(2));
        assert!(ops.iter().any(|r| r["op"] == "qkv" && r["calls_per_batch"].as_f64() == Some(1.0)), "{tower}: {p}");
        assert_eq!(ops.last().unwrap()["op"], "(between operations)");
        let share: f64 = ops.iter().map(|r| r["share"].as_f64().unwrap()).sum();
        assert!((share - 1.0).abs() < 1e-6 || share < 1.0, "{tower}: shares sum to {share}");
        let ms: f64 = ops.iter().map(|r| r["ms_per_batch"].as_f64().unwrap()).sum();
        assert!(ms <= p["ms_per_batch"].as_f64().unwrap() * (1.0 + 1e-9), "{tower}: {ms} ms of rows");
    }
    let text = run(&["bench", "--model", mt, "--batch", "2", "--iters", "1", "--device", "cpu", "--profile", "--towers", "image"]);
    assert!(text.contains("image tower:") && text.contains("by CPU backend operation") && text.contains("qkv"), "{text}");
    let v: serde_json::Value =
        serde_json::from_str(&run(&["bench", "--task", "train", "--model", mt, "--batch", "4", "--iters", "1", "--device", "cpu", "--profile", "--json"]))
            .unwrap();
    let ops = v["step_profile"]["ops"].as_array().unwrap_or_else(|| panic!("no step profile in {v}"));
    assert!(ops.iter().any(|r| r["op"] == "linear_bwd") && ops.iter().any(|r| r["op"] == "attention_bwd"), "{v}");
    for (args, needle) in
        [(vec!["bench", "--profile", "--dry-run", "--device", "cuda"], "--profile"), (vec!["bench", "--profile", "--task", "loader"], "--profile")]
    {
        let (ok, _, e) = run_any(&args);
        assert!(!ok && e.trim().lines().count() == 1 && e.contains(needle), "{args:?}: {e}");
    }
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
        (vec!["bench", "--task", "train", "--model", mt, "--batch", "4", "--device", "cpu", "--dtype", "f16"], "f16"),
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

/// Runs clipforge → (success, stdout, stderr).
fn run_any(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_clipforge")).args(args).output().unwrap();
    (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn bench_text_len_beyond_the_model_is_an_error_not_a_clamp() {
    let m = fixture("tiny");
    let mt = m.to_str().unwrap();
    for (extra, needle) in [
        (&["--task", "train", "--text-len", "248"][..], "--stretch"),
        (&["--task", "train", "--stretch", "--text-len", "300"][..], "248"),
        (&["--text-len", "100"][..], "77"),
    ] {
        let mut args = vec!["bench", "--model", mt, "--batch", "2", "--iters", "1", "--device", "cpu", "--json"];
        args.extend(extra);
        let (ok, _, e) = run_any(&args);
        assert!(!ok && e.trim().lines().count() == 1 && e.contains("--text-len") && e.contains(needle), "{args:?}: {e}");
    }
}

#[test]
fn inference_commands_offer_only_the_dtypes_they_compute_in() {
    for c in ["embed-text", "embed-image", "classify", "similarity"] {
        let help = run(&[c, "--help"]);
        assert!(help.contains("[possible values: f32, bf16]"), "{c} --help lists other dtypes: {help}");
    }
    let (ok, _, e) = run_any(&["embed-text", "--model", "m", "--out", "o.npy", "--dtype", "f16", "x"]);
    assert!(!ok && e.contains("f16") && e.contains("f32, bf16"), "{e}");
    assert!(run(&["bench", "--help"]).contains("f16"), "bench --task train keeps f16");
}

#[test]
fn embed_image_dir_skips_other_files_and_skip_bad_skips_broken_images() {
    let d = tmpdir("skip");
    let dir = d.join("photos");
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..3 {
        std::fs::copy(fixture(&format!("longclip/img_{i:03}.png")), dir.join(format!("{i}.png"))).unwrap();
    }
    std::fs::write(dir.join(".DS_Store"), b"\x00\x00\x00\x01Bud1").unwrap();
    std::fs::write(dir.join("README.txt"), "my photos").unwrap();
    let m = fixture("tiny");
    let out = d.join("e.npy");
    let (ok, _, e) = run_any(&["embed-image", "--model", m.to_str().unwrap(), "--out", out.to_str().unwrap(), "--dir", dir.to_str().unwrap()]);
    assert!(ok, "{e}");
    assert!(e.contains("skipped 2") && e.contains("README.txt"), "{e}");
    assert_eq!(read_npy(&out).unwrap().1, vec![3, 24]);
    // a broken image: an error without --skip-bad, skipped and named with it
    std::fs::write(dir.join("1.png"), b"not a png").unwrap();
    let (ok, _, e) = run_any(&["embed-image", "--model", m.to_str().unwrap(), "--out", out.to_str().unwrap(), "--dir", dir.to_str().unwrap()]);
    assert!(!ok && e.contains("1.png"), "{e}");
    let (ok, _, e) = run_any(&["embed-image", "--model", m.to_str().unwrap(), "--out", out.to_str().unwrap(), "--dir", dir.to_str().unwrap(), "--skip-bad"]);
    assert!(ok && e.contains("skipped") && e.contains("1.png"), "{e}");
    assert_eq!(read_npy(&out).unwrap().1, vec![2, 24]);
    let listed = std::fs::read_to_string(d.join("e.files.txt")).unwrap();
    assert_eq!(listed.lines().map(PathBuf::from).collect::<Vec<_>>(), vec![dir.join("0.png"), dir.join("2.png")]);
}

#[test]
fn a_text_longer_than_the_context_is_noted() {
    let d = tmpdir("long");
    let m = fixture("tiny");
    let long = "a cat sitting on a mat ".repeat(30);
    let out = d.join("t.npy");
    let (ok, _, e) = run_any(&["embed-text", "--model", m.to_str().unwrap(), "--out", out.to_str().unwrap(), "short", &long]);
    assert!(ok && e.contains("1 of 2 texts") && e.contains("77-token") && e.contains("tokens lost") && e.contains("stretch the model first"), "{e}");
    let (ok, _, e) = run_any(&["embed-text", "--model", m.to_str().unwrap(), "--out", out.to_str().unwrap(), "short"]);
    assert!(ok && !e.contains("note"), "{e}");
}

#[test]
fn a_missing_preprocessor_config_is_noted() {
    let d = tmpdir("nopre");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("tiny").join(f), d.join(f)).unwrap();
    }
    let out = d.join("e.npy");
    let (ok, _, e) = run_any(&["embed-image", "--model", d.to_str().unwrap(), "--out", out.to_str().unwrap(), images()[0].to_str().unwrap()]);
    assert!(ok && e.contains("preprocessor_config.json") && e.contains("OpenAI"), "{e}");
}

#[test]
fn the_similarity_table_is_aligned_and_help_says_how_ties_rank() {
    let m = fixture("tiny");
    let d = tmpdir("sim");
    let short = d.join("a.png");
    std::fs::copy(images()[0].as_path(), &short).unwrap();
    let long = images()[1].clone();
    let out = run(&["similarity", "--model", m.to_str().unwrap(), "--image", short.to_str().unwrap(), long.to_str().unwrap(), "--text", "a cat", "a dog"]);
    let rows: Vec<&str> = out.lines().filter(|l| l.contains('[')).collect();
    assert_eq!(rows.len(), 2, "{out}");
    let cols = |l: &str| l.char_indices().filter(|&(_, c)| c == '[').map(|(i, _)| l[..i].chars().count()).collect::<Vec<_>>();
    assert_eq!(cols(rows[0]), cols(rows[1]), "columns misaligned:\n{out}");
    let head = out.lines().find(|l| l.contains("T0") && l.contains("T1") && !l.contains(':')).unwrap_or_else(|| panic!("no column header:\n{out}"));
    assert_eq!(head.chars().count(), rows[0].chars().count(), "header and rows differ in width:\n{out}");
    for c in ["retrieval", "zeroshot"] {
        assert!(run(&["eval", c, "--help"]).contains("clip_benchmark"), "eval {c} --help");
    }
}
