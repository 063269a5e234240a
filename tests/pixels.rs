//! Image preprocessing equal to HF's CLIPImageProcessor (the PIL-based one) and Pillow, byte for byte.
//! * `pixels_match_hf_processor`: real photos in every mode the fixtures hold (RGB, L, RGBA, P,
//!   16-bit RGB), up- and downscaling, at 224, 32 and 98, against the processor's output stored as
//!   f16: within the f16 rounding (2^-11 relative), 30x less than one level (>= 0.0142), so every
//!   uint8 level is exact.
//! * tests/fixtures/pixels_u8.safetensors (scripts/make_format_fixtures.py): Pillow's BICUBIC resize
//!   on adversarial synthetic images, HF's uint8 resize + crop of every photo at 98 and 32, the
//!   rescale/normalise arithmetic of every level (1e-6), and every format in tests/fixtures/formats
//!   (BMP, GIF, TIFF, WebP lossless/lossy/alpha, JPEG baseline/progressive/4:2:0/4:2:2/4:4:4/gray/
//!   CMYK/arithmetic/EXIF-rotated) decoded exactly as Pillow then preprocessed exactly as HF: zero differences.
//!
//! 16-bit grayscale (I;16) differs on purpose: Pillow clamps its samples to 255 (a 16-bit photo goes
//! white), clipforge keeps the high byte.
use clipforge::io::image_prep::{load_rgb8_hf, preprocess, preprocess_u8, resize_bicubic_pillow, PreprocessConfig, RgbImage8};
use clipforge::model::Weights;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

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
                // the reference is HF's f32 rounded to f16: half an f16 ulp (2^-11 relative, 2^-25
                // below f16's normal range); one level apart is >= 1/255/0.2758 = 0.0142.
                let err = (g - w).abs();
                assert!(g.is_finite() && err <= 3e-8 + w.abs() / 2048.0, "{key}: element {i} = {g}, HF has {w}");
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

// ---- exact uint8 (tests/fixtures/pixels_u8.safetensors, scripts/make_format_fixtures.py) ----

/// pixels_u8.safetensors: name → (shape, little-endian bytes).
fn u8_refs() -> HashMap<String, (Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(fixtures().join("pixels_u8.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(k, v)| (k, (v.shape().to_vec(), v.data().to_vec()))).collect()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// HWC → CHW, the layout of the HF references.
fn chw(img: &RgbImage8) -> Vec<u8> {
    let n = img.width as usize * img.height as usize;
    (0..3).flat_map(|c| (0..n).map(move |i| img.data[i * 3 + c])).collect()
}

/// (elements that differ, largest difference in levels); exact equality is (0, 0).
fn diff(got: &[u8], want: &[u8]) -> (usize, u8) {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).filter(|(g, w)| g != w).fold((0, 0), |(n, m), (g, w)| (n + 1, m.max(g.abs_diff(*w))))
}

fn u8_config(size: u32) -> PreprocessConfig {
    PreprocessConfig { do_rescale: false, do_normalize: false, ..PreprocessConfig::openai(size) }
}

/// Pillow `Image.resize((w, h), BICUBIC)` on synthetic RGB images built to expose every rounding
/// step: noise and 0/255 patterns (overshoot clipped in both passes), up/down/mixed scaling, a
/// skipped pass, 1-pixel sizes, tall and wide images.
#[test]
fn resize_equals_pillow_exactly() {
    let refs = u8_refs();
    let mut bad = vec![];
    let mut i = 0;
    while let Some((si, a)) = refs.get(&format!("resize.{i}.in")) {
        let (so, want) = &refs[&format!("resize.{i}.out")];
        let img = RgbImage8 { width: si[1] as u32, height: si[0] as u32, data: a.clone() };
        let got = resize_bicubic_pillow(&img, so[1] as u32, so[0] as u32);
        let (n, m) = diff(&got.data, want);
        if n > 0 {
            bad.push(format!("case {i} {}x{} -> {}x{}: {n} values differ, by up to {m}", si[1], si[0], so[1], so[0]));
        }
        i += 1;
    }
    assert!(i >= 24, "expected 24 resize cases, found {i}");
    assert!(bad.is_empty(), "resize differs from Pillow:\n{}", bad.join("\n"));
}

/// The uint8 image HF rescales and normalises (resize to the shortest edge + centre crop) equals
/// the processor's, byte for byte, on every photo at 98 and 32 px (224 px: `pixels_match_hf_processor`).
#[test]
fn resized_photos_equal_hf_exactly() {
    let refs = u8_refs();
    let mut bad = vec![];
    let mut checked = 0;
    for (key, (shape, want)) in &refs {
        let Some(rest) = key.strip_prefix("photo.").filter(|k| !k.ends_with(".f32")) else { continue };
        let (stem, size) = rest.rsplit_once('.').unwrap();
        let img = load_rgb8_hf(&fixtures().join("images").join(format!("{stem}.png"))).unwrap();
        let got = preprocess_u8(&img, &u8_config(size.parse().unwrap()));
        assert_eq!(shape, &[3, got.height as usize, got.width as usize], "{key}");
        let (n, m) = diff(&chw(&got), want);
        if n > 0 {
            bad.push(format!("{key}: {n} values differ, by up to {m}"));
        }
        checked += 1;
    }
    assert!(checked >= 14, "expected 7 photos x 2 sizes, checked {checked}");
    assert!(bad.is_empty(), "uint8 images differ from HF:\n{}", bad.join("\n"));
}

/// Rescale + normalise is HF's f32 arithmetic: every level of every channel within 1e-6 of the
/// processor's value (1/255 in f64 then f32, `(x - mean) / std` in f32), and whole 32 px outputs.
#[test]
fn normalised_values_equal_hf() {
    let refs = u8_refs();
    let lut = f32s(&refs["lut"].1);
    let levels = RgbImage8 { width: 16, height: 16, data: (0..=255u8).flat_map(|v| [v; 3]).collect() };
    let cfg = PreprocessConfig { do_resize: false, do_center_crop: false, ..PreprocessConfig::openai(224) };
    let got = preprocess(&levels, &cfg); // [3, 16, 16]
    let close = |g: f32, w: f32| (g - w).abs() <= 1e-6 + 1e-6 * w.abs();
    for (i, (g, w)) in got.iter().zip(&lut).enumerate() {
        assert!(close(*g, *w), "channel {} level {}: {g} vs HF {w}", i / 256, i % 256);
    }
    let mut checked = 0;
    for (key, (_, want)) in refs.iter().filter(|(k, _)| k.ends_with(".32.f32")) {
        let stem = key.trim_start_matches("photo.").trim_end_matches(".32.f32");
        let img = load_rgb8_hf(&fixtures().join("images").join(format!("{stem}.png"))).unwrap();
        let got = preprocess(&img, &PreprocessConfig::openai(32));
        for (i, (g, w)) in got.iter().zip(&f32s(want)).enumerate() {
            assert!(close(*g, *w), "{key}: element {i} = {g}, HF has {w}");
        }
        checked += 1;
    }
    assert!(checked >= 7, "checked {checked}");
}

/// Every format fixture probes to its size and decodes to Pillow's uint8 pixels (after transformers' convert_to_rgb) and
/// preprocesses to the processor's uint8 image at 32 px: BMP, GIF (palette, transparent index),
/// TIFF (LZW), WebP (lossless, lossy, lossy + alpha), JPEG (4:2:0, 4:4:4, 4:2:2, progressive,
/// grayscale, CMYK, arithmetic-coded; an EXIF orientation tag is not applied, as neither Image.open nor the processor do).
#[test]
fn every_format_decodes_like_pillow() {
    let refs = u8_refs();
    let mut names: Vec<String> = std::fs::read_dir(fixtures().join("formats"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".md"))
        .collect();
    names.sort();
    let mut bad = vec![];
    for name in &names {
        let img = load_rgb8_hf(&fixtures().join("formats").join(name)).unwrap();
        let probed = clipforge::io::image_decode::probe(&fixtures().join("formats").join(name)).unwrap();
        assert_eq!(probed, (img.width, img.height), "{name}: probe");
        let (shape, want) = &refs[&format!("format.{name}.rgb")];
        assert_eq!(shape, &[img.height as usize, img.width as usize, 3], "{name}");
        let (n, m) = diff(&img.data, want);
        let (n32, m32) = diff(&chw(&preprocess_u8(&img, &u8_config(32))), &refs[&format!("format.{name}.32")].1);
        if n + n32 > 0 {
            bad.push(format!("{name}: decoded {n} values differ (max {m}); at 32 px {n32} differ (max {m32})"));
        }
    }
    for ext in ["bmp", "gif", "tif", "webp", "jpg"] {
        assert!(names.iter().any(|n| n.ends_with(ext)), "no .{ext} fixture");
    }
    assert!(names.len() >= 14, "{names:?}");
    assert!(bad.is_empty(), "differs from Pillow:\n{}", bad.join("\n"));
}

/// End to end: every format file embedded by clipforge (file → decode → preprocess → vision tower
/// → projection → l2) equals HF's embedding of `Image.open(file)` through the processor and
/// `CLIPModel.get_image_features`, within 1e-4 relative (the model parity bound), for the tiny
/// (32 px) and odd (98 px) fixture models. JPEG included: the pixels are the same bytes.
#[test]
fn every_format_embeds_like_hf() {
    let refs = u8_refs();
    let mut names: Vec<String> = refs.keys().filter_map(|k| k.strip_prefix("embed.tiny.").map(str::to_string)).collect();
    names.sort();
    assert!(names.len() >= 14, "{names:?}");
    let paths: Vec<PathBuf> = names.iter().map(|n| fixtures().join("formats").join(n)).collect();
    for model in ["tiny", "odd"] {
        let m = clipforge::ClipModel::open(fixtures().join(model), &clipforge::OpenOptions::default().device(clipforge::DeviceChoice::Cpu)).unwrap();
        let e = m.embed_image_files(&paths).unwrap();
        let (mut bad, mut max) = (vec![], 0f32);
        for (name, got) in names.iter().zip(e.iter_rows()) {
            let want = f32s(&refs[&format!("embed.{model}.{name}")].1);
            assert_eq!(got.len(), want.len(), "{model} {name}");
            let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs() / (1e-5 + 1e-4 * w.abs())).fold(0f32, f32::max);
            max = max.max(worst);
            if worst > 1.0 {
                bad.push(format!("{name}: worst |got - HF| / (1e-5 + 1e-4 |HF|) = {worst:.1}"));
            }
        }
        eprintln!("{model}: worst |got - HF| / (1e-5 + 1e-4 |HF|) over {} files: {max:.3}", names.len());
        assert!(bad.is_empty(), "{model}: embeddings differ from HF:\n{}", bad.join("\n"));
    }
}
