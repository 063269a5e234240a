//! Long-CLIP fine-tuning end to end on the tiny model stretched to 248 positions:
//! - parity with the project's PyTorch reference (scripts/longclip_reference.py → fixtures
//!   tests/fixtures/longclip/expected_*.json): every step's loss, L_long, L_short, lr and logit
//!   scale within 1e-4 relative, for batch 8 and for micro-batch 4 × accumulation 2;
//! - frozen position rows bit-identical after training;
//! - resume from a checkpoint (and from a Ctrl-C stop) continues the same loss curve exactly;
//! - a non-finite loss stops the run with the last good state saved;
//! - the data formats (JSONL, ShareGPT4V), the short-caption rule and line-numbered errors.
mod common;
mod finetune_common;
use clipforge::model::Weights;
use clipforge::train::data::{first_sentence, read_samples, Loader};
use clipforge::train::trainer::{run, StepLog};
use common::{fixture, tmpdir};
use finetune_common::*;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[test]
fn matches_the_pytorch_reference_step_by_step() {
    let d = tmpdir("parity");
    let model = stretched(&d);
    for (name, batch, accum) in [("expected_b8.json", 8, 1), ("expected_b4x2.json", 4, 2)] {
        let out = d.join(name);
        let r = run(&config(&model, &out, batch, accum), None, no_stop(), true).unwrap();
        assert_matches_reference("cpu", name, &r.steps, 1e-4);
        assert_frozen_rows_kept(&model, &out.join("model"));
        assert!(out.join("log.jsonl.svg").is_file());
    }
}

#[test]
fn resume_continues_the_same_curve() {
    let d = tmpdir("resume");
    let model = stretched(&d);
    let full = d.join("full");
    run(&config(&model, &full, 4, 1), None, no_stop(), true).unwrap();
    let want = read_log(&full.join("log.jsonl"));
    // from the step-4 checkpoint of that run into a fresh OUT: the resumed run itself must log
    // steps 5.. (a resume that ran nothing logs nothing) and end with the same weights
    let part = d.join("part");
    let r = run(&config(&model, &part, 4, 1), Some(&full.join("checkpoints/step-000004")), no_stop(), true).unwrap();
    let got = read_log(&part.join("log.jsonl"));
    let strip = |v: &[StepLog]| v.iter().map(|s| (s.step, s.loss, s.loss_long, s.loss_short, s.lr, s.logit_scale)).collect::<Vec<_>>();
    assert!(want.len() > 4, "the straight run is too short to test a resume");
    assert_eq!(strip(&got), strip(&want[4..]), "resumed curve differs");
    assert_eq!(r.steps.iter().map(|s| s.step).collect::<Vec<_>>(), (5..=want.len()).collect::<Vec<_>>(), "the resumed run did not run steps 5..");
    let bytes = |d: &Path| std::fs::read(d.join("model/model.safetensors")).unwrap();
    assert_eq!(bytes(&part), bytes(&full), "resumed weights differ from the straight run's");
    // a Ctrl-C stop after the first step writes a checkpoint; resuming from it gives the same curve
    let stopped = d.join("stopped");
    let err = run(&config(&model, &stopped, 4, 1), None, Arc::new(AtomicBool::new(true)), true).err().unwrap().to_string();
    assert!(err.contains("interrupted after step 1"), "{err}");
    let ck = clipforge::train::checkpoint::latest(&stopped).unwrap();
    run(&config(&model, &stopped, 4, 1), Some(&ck), no_stop(), true).unwrap();
    assert_eq!(strip(&read_log(&stopped.join("log.jsonl"))), strip(&want));
}

#[test]
fn a_non_finite_loss_stops_with_the_last_good_state() {
    let d = tmpdir("nan");
    let model = stretched(&d);
    let out = d.join("run");
    let mut cfg = config(&model, &out, 8, 1);
    cfg.lr = 1e30;
    cfg.warmup = 0;
    let err = run(&cfg, None, no_stop(), true).err().expect("a run at lr 1e30 must stop").to_string();
    assert!(err.contains("stopped; the last good state is saved in"), "{err}");
    let ck = clipforge::train::checkpoint::latest(&out).unwrap();
    let w = Weights::open(&ck).unwrap();
    assert!(w.get("logit_scale").unwrap().to_vec_f32()[0].is_finite());
}

#[test]
fn data_formats_and_errors() {
    assert_eq!(first_sentence("A cat. It sits. On a mat."), "A cat");
    assert_eq!(first_sentence("no period here"), "no period here");
    let s = read_samples(&fixture("longclip/train.jsonl"), None).unwrap();
    assert_eq!(s.len(), 16);
    assert_eq!(s[5].short_caption, "a small orange triangle");
    assert_eq!(s[0].short_caption, first_sentence(&s[0].caption));
    assert!(s[0].image.path().unwrap().starts_with(fixture("longclip")));
    let d = tmpdir("data");
    let sg = d.join("sharegpt.json");
    std::fs::write(&sg, r#"[{"image": "a.png", "conversations": [{"value": "describe"}, {"value": "Line one.\nTwo. Three"}]}]"#).unwrap();
    let s = read_samples(&sg, Some(Path::new("/imgs"))).unwrap();
    assert_eq!(
        (s[0].caption.as_str(), s[0].short_caption.as_str(), s[0].image.path().unwrap()),
        ("Line one. Two. Three", "Line one", Path::new("/imgs/a.png"))
    );
    let bad = d.join("bad.jsonl");
    std::fs::write(&bad, "{\"image\": \"a.png\", \"caption\": \"x\"}\n{\"image\": \"b.png\"}\n").unwrap();
    let e = read_samples(&bad, None).unwrap_err().to_string();
    assert!(e.contains("line 2") && e.contains("caption") && e.contains("bad.jsonl"), "{e}");
    std::fs::write(&bad, "not json\n").unwrap();
    assert!(read_samples(&bad, None).unwrap_err().to_string().contains("line 1"));
}

#[test]
fn shuffling_is_seeded_and_positions_replay() {
    let model = fixture("tiny");
    let pre = clipforge::io::image_prep::PreprocessConfig::for_model_dir(&model, 32).unwrap();
    let tok = || clipforge::io::tokenizer::ClipTokenizer::from_file(&model, 77).unwrap();
    let s = read_samples(&fixture("longclip/train.jsonl"), None).unwrap();
    let mut a = Loader::new(s.clone(), 3, 7, true, pre.clone(), tok()).unwrap();
    let b = Loader::new(s.clone(), 3, 8, true, pre.clone(), tok()).unwrap();
    assert_ne!(a.permutation(0), a.permutation(1), "epochs differ");
    assert_ne!(a.permutation(0), b.permutation(0), "seeds differ");
    let mut sorted = a.permutation(3);
    sorted.sort();
    assert_eq!(sorted, (0..16).collect::<Vec<_>>());
    let first: Vec<Vec<usize>> = (0..12).map(|_| a.next_indices()).collect();
    assert!(first.iter().all(|b| b.len() == 3), "the partial last batch (16 = 5·3 + 1) is dropped");
    let mut c = Loader::new(s, 3, 7, true, pre, tok()).unwrap();
    for _ in 0..7 {
        c.next_indices();
    }
    let pos = c.position;
    let mut d = Loader::new(
        read_samples(&fixture("longclip/train.jsonl"), None).unwrap(),
        3,
        7,
        true,
        clipforge::io::image_prep::PreprocessConfig::for_model_dir(&model, 32).unwrap(),
        tok(),
    )
    .unwrap();
    d.position = pos;
    assert_eq!((0..5).map(|_| d.next_indices()).collect::<Vec<_>>(), first[7..12].to_vec());
    let batch = d.load(&[0, 5]).unwrap();
    assert_eq!(batch.pixels.shape(), &[2, 3, 32, 32]);
}

#[test]
fn bad_finetune_input_is_a_one_line_error() {
    let d = tmpdir("ft-bad");
    let (tiny, data) = (fixture("tiny"), fixture("longclip/train.jsonl"));
    let (t, da) = (tiny.to_str().unwrap(), data.to_str().unwrap());
    let out = d.join("out");
    let o = out.to_str().unwrap();
    let binary = fixture("pca_grad.safetensors");
    let mut cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--model", t, "--data", "/nonexistent.jsonl", "--out", o], "nonexistent.jsonl"),
        (vec!["--model", t, "--data", da, "--out", o, "--batch", "4", "--device", "cpu", "--dtype", "f16"], "--dtype f16 needs a CUDA device"),
        (vec!["--model", t, "--data", da, "--out", o, "--batch", "4", "--method", "smartclip", "--device", "cuda"], "SmartCLIP"),
        (vec!["--model", "/nonexistent-model", "--data", da, "--out", o], "config.json"),
        (vec!["--model", t, "--data", da, "--out", o, "--batch", "100"], "--batch"),
        (vec!["--model", t, "--data", da, "--out", o, "--accum", "0"], "--accum"),
        (vec!["--model", t, "--data", da, "--out", o, "--resume"], "no checkpoint"),
        (vec!["--model", t, "--data", binary.to_str().unwrap(), "--out", o], "pca_grad.safetensors"),
    ];
    if clipforge::cuda::GpuOps::open().is_err() {
        cases.push((vec!["--model", t, "--data", da, "--out", o, "--batch", "4", "--device", "cuda"], "--device cuda"));
    }
    for (args, needle) in cases {
        let mut a = vec!["finetune"];
        a.extend(&args);
        let r = Command::new(env!("CARGO_BIN_EXE_clipforge")).args(&a).output().unwrap();
        let e = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success() && e.trim().lines().count() == 1 && e.contains(needle), "{a:?}: {e}");
    }
    assert!(!out.join("model").exists(), "a failed run wrote a model");
}

#[test]
fn a_crash_between_the_two_renames_of_a_replace_loses_no_checkpoint() {
    use clipforge::train::checkpoint::{latest, save, TrainerState};
    let d = tmpdir("ckpt-crash");
    let model = clipforge::train::model::TrainClip::load_dir(&fixture("tiny")).unwrap();
    let ck = d.join("checkpoints/step-000002");
    let state = TrainerState { step: 2, position: clipforge::train::data::Position { epoch: 0, index: 2 }, args: serde_json::json!({}), world: 1 };
    save(&ck, &fixture("tiny"), &model.params, None, Some(&state)).unwrap();
    save(&ck, &fixture("tiny"), &model.params, None, Some(&state)).unwrap(); // a replace
                                                                             // a crash inside the next replace: the old directory moved aside, the new one unfinished
    std::fs::rename(&ck, d.join("checkpoints/.step-000002.old-4242")).unwrap();
    std::fs::create_dir_all(d.join("checkpoints/.step-000002.tmp-4242")).unwrap();
    assert_eq!(latest(&d), Some(ck.clone()));
    assert_eq!(Weights::open(&ck).unwrap().get("logit_scale").unwrap().to_vec_f32(), model.params[model.index("logit_scale").unwrap()].1.to_vec_f32());
}

/// Runs `clipforge finetune ARGS` → (success, stderr).
fn finetune_cli(args: &[&str]) -> (bool, String) {
    let r = Command::new(env!("CARGO_BIN_EXE_clipforge")).arg("finetune").args(args).output().unwrap();
    (r.status.success(), String::from_utf8_lossy(&r.stderr).into_owned())
}

#[test]
fn an_existing_out_needs_resume_or_force_and_resume_finds_checkpoints_by_name() {
    let d = tmpdir("ft-out");
    let (tiny, data, out) = (fixture("tiny"), fixture("longclip/train.jsonl"), d.join("out"));
    let base = [
        "--model",
        tiny.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--batch",
        "4",
        "--max-steps",
        "2",
        "--save-every",
        "1",
        "--device",
        "cpu",
        "--pca-dim",
        "2",
    ];
    let with = |extra: &[&str]| finetune_cli(&[&base[..], extra].concat());
    let (ok, e) = with(&[]);
    assert!(ok, "{e}");
    assert!(e.contains("long captions are longer than the 77-token context") && e.contains("stretch the model first"), "no note on cut captions: {e}");
    let (ok, e) = with(&[]);
    assert!(!ok && e.trim().lines().count() == 1 && e.contains("--resume") && e.contains("--force"), "{e}");
    for name in ["step-000001", "1"] {
        let (ok, e) = with(&["--resume", name]);
        assert!(ok, "--resume {name}: {e}");
    }
    let (ok, e) = with(&["--force"]);
    assert!(ok && e.contains("removed"), "{e}");
    let (ok, e) = with(&["--resume", "step-000077"]);
    assert!(!ok && e.contains("step-000077") && e.contains("no such checkpoint"), "{e}");
    // a checkpoint of another architecture
    let odd = fixture("odd");
    let (ok, e) = finetune_cli(&[
        "--model",
        odd.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--batch",
        "4",
        "--device",
        "cpu",
        "--resume",
    ]);
    assert!(!ok && e.trim().lines().count() == 1 && e.contains("checkpoint and model differ"), "{e}");
}

#[test]
fn a_half_written_checkpoint_of_a_dead_run_is_removed() {
    let d = tmpdir("ckpt-stale");
    let ck = d.join("checkpoints");
    let (dead, mine) = (ck.join(".step-000004.tmp-999999999"), ck.join(format!(".step-000004.tmp-{}", std::process::id())));
    std::fs::create_dir_all(&dead).unwrap();
    std::fs::create_dir_all(&mine).unwrap();
    assert_eq!(clipforge::train::checkpoint::latest(&d), None);
    assert!(!dead.exists(), "the dead run's temp checkpoint stayed");
    assert!(mine.exists(), "a running process's temp checkpoint was removed");
}

/// JSONL of the 16 fixture images (absolute paths), `bad` replacing the image of line `at`.
fn data_with(d: &Path, at: usize, bad: &Path) -> std::path::PathBuf {
    let lines: Vec<String> = (0..16)
        .map(|i| {
            let img = if i + 1 == at { bad.to_path_buf() } else { fixture(&format!("longclip/img_{i:03}.png")) };
            serde_json::json!({"image": img, "caption": format!("shape number {i}")}).to_string()
        })
        .collect();
    let p = d.join(format!("data-{at}.jsonl"));
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

#[test]
fn bad_training_images_are_found_up_front_or_stop_with_the_last_good_step() {
    let d = tmpdir("ft-data");
    let tiny = fixture("tiny");
    let run_on = |data: &Path, out: &Path| {
        finetune_cli(&[
            "--model",
            tiny.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--batch",
            "4",
            "--no-shuffle",
            "--device",
            "cpu",
            "--pca-dim",
            "2",
        ])
    };
    // a missing file and a file that is no image: found before the first step, file and line named
    std::fs::write(d.join("notes.png"), "not an image").unwrap();
    for (at, bad) in [(11, d.join("missing.png")), (3, d.join("notes.png"))] {
        let data = data_with(&d, at, &bad);
        let out = d.join(format!("out-{at}"));
        let (ok, e) = run_on(&data, &out);
        let name = bad.file_name().unwrap().to_str().unwrap();
        assert!(!ok && e.trim().lines().count() == 1 && e.contains(&format!("line {at}")) && e.contains(name) && e.contains("data-"), "{e}");
        assert!(!out.join("checkpoints").exists(), "a run started");
    }
    // a JPEG whose header is fine but whose data is cut: found when its batch (the third) comes
    let img = image::RgbImage::from_fn(256, 256, |x, y| image::Rgb([(x * y) as u8, ((x + y) * 37) as u8, (x ^ y) as u8]));
    let mut bytes = vec![];
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Jpeg).unwrap();
    let cut = d.join("cut.jpg");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = d.join("out-cut");
    let (ok, e) = run_on(&data_with(&d, 10, &cut), &out);
    let last = e.trim().lines().last().unwrap_or_default();
    assert!(!ok && last.contains("line 10") && last.contains("cut.jpg") && last.contains("truncated") && last.contains("step 2"), "{e}");
    assert!(out.join("checkpoints/step-000002/trainer_state.json").is_file(), "no checkpoint of the last good step: {e}");
}
