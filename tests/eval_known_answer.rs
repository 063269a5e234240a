//! A dataset with a known answer: solid-colour 32×32 images named by their colour. The random
//! tiny model cannot tell the colours apart; after a short Long-CLIP fine-tune on captions naming
//! the colour, zero-shot accuracy, retrieval recall and the linear probe are clearly above chance.
mod common;
use std::path::{Path, PathBuf};
use std::process::Command;

const COLORS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 30, 30]),
    ("green", [30, 200, 40]),
    ("blue", [30, 40, 220]),
    ("yellow", [230, 220, 30]),
    ("purple", [140, 30, 160]),
    ("white", [245, 245, 245]),
];

fn cf(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_clipforge")).args(args).output().unwrap();
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

/// `per` noisy solid-colour images per colour under root/<colour>/ and a JSONL of captions.
fn make(root: &Path, per: usize, seed: u64) -> PathBuf {
    let mut rng = clipforge::model::synthetic::Rng::new(seed);
    let mut lines = vec![];
    for (name, rgb) in COLORS {
        std::fs::create_dir_all(root.join(name)).unwrap();
        for i in 0..per {
            let img = image::RgbImage::from_fn(32, 32, |_, _| image::Rgb(rgb.map(|c| (c as f32 + 20.0 * rng.normal()).clamp(0.0, 255.0) as u8)));
            let rel = format!("{name}/{i}.png");
            img.save(root.join(&rel)).unwrap();
            lines.push(serde_json::json!({"image": rel, "caption": format!("a photo of a {name} thing. It is {name} everywhere."), "captions": [format!("a photo of a {name} thing.")]}).to_string());
        }
    }
    let f = root.join("data.jsonl");
    std::fs::write(&f, lines.join("\n") + "\n").unwrap();
    f
}

#[test]
fn a_short_finetune_learns_the_colours() {
    let d = common::tmpdir("known"); // removed when the test ends
    let (train, test) = (d.join("train"), d.join("test"));
    let data = make(&train, 4, 1);
    let test_data = make(&test, 2, 2);
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny");
    let out = d.join("run");
    cf(&[
        "finetune",
        "--model",
        tiny.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--batch",
        "12",
        "--lr",
        "2e-3",
        "--warmup",
        "5",
        "--max-steps",
        "60",
        "--pca-dim",
        "4",
        "--seed",
        "3",
    ]);
    let tuned = out.join("model");
    let tmpl = d.join("t.txt");
    std::fs::write(&tmpl, "a photo of a {} thing.\n").unwrap();
    let zs = |m: &Path| -> f64 {
        let j: serde_json::Value = serde_json::from_str(&cf(&[
            "eval",
            "zeroshot",
            "--model",
            m.to_str().unwrap(),
            "--data",
            test.to_str().unwrap(),
            "--templates",
            tmpl.to_str().unwrap(),
            "--no-cache",
            "--plot",
            d.join("cm.svg").to_str().unwrap(),
            "--json",
        ]))
        .unwrap();
        j["top1"].as_f64().unwrap()
    };
    let (before, after) = (zs(&tiny), zs(&tuned));
    eprintln!("zero-shot top-1 on 6 colours: random model {before:.2}, fine-tuned {after:.2} (chance 0.17)");
    assert!(after >= 0.75, "fine-tuned zero-shot top-1 {after}");
    let r: serde_json::Value = serde_json::from_str(&cf(&[
        "eval",
        "retrieval",
        "--model",
        tuned.to_str().unwrap(),
        "--data",
        test_data.to_str().unwrap(),
        "--no-cache",
        "--plot",
        d.join("r.svg").to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    let r5 = r["recall"][1]["text_to_image"].as_f64().unwrap();
    eprintln!("retrieval text→image R@5 (12 images, 2 per colour): {r5:.2}");
    assert!(r5 >= 0.75, "{r}");
    let lp = d.join("lp.svg");
    let p: serde_json::Value = serde_json::from_str(&cf(&[
        "eval",
        "linear-probe",
        "--model",
        tuned.to_str().unwrap(),
        "--train",
        train.to_str().unwrap(),
        "--test",
        test.to_str().unwrap(),
        "--no-cache",
        "--plot",
        lp.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    let svg = std::fs::read_to_string(&lp).unwrap_or_else(|e| panic!("linear-probe --plot wrote nothing: {e}"));
    assert!(svg.starts_with("<svg") && svg.contains("validation accuracy"), "{svg}");
    let acc = p["result"]["test_accuracy"].as_f64().unwrap();
    eprintln!("linear probe test accuracy: {acc:.2}");
    assert!(acc >= 0.75, "{p}");
}
