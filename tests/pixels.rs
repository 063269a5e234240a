//! Image preprocessing equal to HF CLIPImageProcessor (PIL-based) on real photos in every mode
//! the fixtures hold (RGB, L, RGBA, P, I;16, 16-bit RGB), up- and downscaling, at 224, 32 and 98:
//! normalised pixels within 0.02 per element.
use clipforge::io::image_prep::{load_rgb8_hf, preprocess, PreprocessConfig};
use clipforge::model::Weights;
use std::path::Path;

#[test]
fn pixels_match_hf_processor() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let refs = Weights::open(&root.join("pixels.safetensors")).unwrap();
    let cfg = |m: &str| PreprocessConfig::from_json_str(&std::fs::read_to_string(root.join(m).join("preprocessor_config.json")).unwrap()).unwrap();
    let configs = [("224", PreprocessConfig::openai(224)), ("32", cfg("tiny")), ("98", cfg("odd"))];
    let mut checked = 0;
    let mut report = vec![];
    for e in std::fs::read_dir(root.join("images")).unwrap() {
        let path = e.unwrap().path();
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        let img = load_rgb8_hf(&path).unwrap();
        for (size, c) in &configs {
            let key = format!("{stem}.{size}");
            let want = refs.get(&key).unwrap().to_vec_f32();
            let got = preprocess(&img, c);
            assert_eq!(got.len(), want.len(), "{key}");
            let mut max = 0f32;
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let err = (g - w).abs();
                assert!(g.is_finite() && err <= 0.02, "{key}: element {i} = {g}, HF has {w}");
                max = max.max(err);
            }
            report.push(format!("{key}: {max:.2e}"));
            checked += 1;
        }
    }
    eprintln!("max abs error per image: {}", report.join(", "));
    assert!(checked >= 24, "expected 8 images × 3 sizes, checked {checked}");
}
