//! Image preprocessing equal to HF CLIPImageProcessor (PIL-based) on real photos in every mode
//! the fixtures hold (RGB, L, RGBA, P, 16-bit RGB), up- and downscaling, at 224, 32 and 98:
//! normalised pixels within 0.02 per element. 16-bit grayscale (I;16) differs on purpose: Pillow
//! clamps its samples to 255 (a 16-bit photo goes white), clipforge keeps the high byte.
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
        if stem == "camera_16bit" {
            continue; // I;16: see gray16_keeps_the_high_byte
        }
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
    assert!(checked >= 21, "expected 7 images × 3 sizes, checked {checked}");
}

/// 16-bit gray samples map to 8 bits by their high byte, as Pillow maps 16-bit RGB (Pillow and HF
/// clamp I;16 to 255 instead, which turns everything above 255 white).
#[test]
fn gray16_keeps_the_high_byte() {
    let vals: [u16; 6] = [0, 255, 256, 32768, 40000, 65535];
    let img = image::ImageBuffer::<image::Luma<u16>, _>::from_fn(6, 1, |x, _| image::Luma([vals[x as usize]]));
    let mut bytes = vec![];
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
    let rgb = clipforge::io::image_prep::decode_rgb8_hf(&bytes).unwrap();
    let want: Vec<u8> = vals.iter().flat_map(|v| [(v >> 8) as u8; 3]).collect();
    assert_eq!(rgb.data, want);
    // the fixture photo holds 10-bit values (0..1023): dark, not white
    let cam = load_rgb8_hf(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images/camera_16bit.png")).unwrap();
    assert!(cam.data.iter().all(|&v| v <= 3), "camera_16bit: 10-bit samples keep their high byte");
}
