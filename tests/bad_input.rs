//! Bad input never panics: each case runs the real binary and expects a non-zero exit, one line
//! on stderr that names the file and the problem, no backtrace, and no half-written output.
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(p)
}

/// A scratch directory under the system temp dir, removed when the test is done with it.
struct Tmp(PathBuf);

impl std::ops::Deref for Tmp {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tmpdir(name: &str) -> Tmp {
    let d = std::env::temp_dir().join(format!("clipforge-bad-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Tmp(d)
}

/// A copy of the tiny fixture model to break.
fn model_copy(name: &str) -> Tmp {
    let d = tmpdir(name);
    for f in ["config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"] {
        std::fs::copy(fixture("tiny").join(f), d.join(f)).unwrap();
    }
    d
}

/// Runs clipforge, expects failure; returns stderr.
fn fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_clipforge")).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected failure for {args:?}; stderr: {err}");
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "panic for {args:?}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line for {args:?}, got: {err}");
    err
}

fn embed_text(model: &Path, out: &Path) -> String {
    fails(&["embed-text", "--model", model.to_str().unwrap(), "--out", out.to_str().unwrap(), "a photo of a cat"])
}

/// Writes a safetensors file by hand: (name, dtype, shape, bytes) and an optional lie in the header.
fn write_safetensors(path: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)], extra_end: usize) {
    let mut header = serde_json::Map::new();
    let mut data = vec![];
    for (name, dtype, shape, bytes) in tensors {
        let start = data.len();
        data.extend_from_slice(bytes);
        header.insert(name.to_string(), serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len() + extra_end]}));
    }
    let mut h = serde_json::to_string(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(&data);
    std::fs::write(path, out).unwrap();
}

#[test]
fn missing_model_directory() {
    let out = tmpdir("missing").join("e.npy");
    let e = embed_text(Path::new("/nonexistent/model"), &out);
    assert!(e.contains("/nonexistent/model"), "{e}");
    assert!(!out.exists());
}

#[test]
fn missing_and_corrupt_config() {
    let d = model_copy("config");
    let out = d.join("e.npy");
    std::fs::remove_file(d.join("config.json")).unwrap();
    assert!(embed_text(&d, &out).contains("config.json"));
    std::fs::write(d.join("config.json"), "{ not json").unwrap();
    assert!(embed_text(&d, &out).contains("config.json"));
    std::fs::write(d.join("config.json"), r#"{"text_config": {"hidden_size": 30, "num_attention_heads": 7}}"#).unwrap();
    assert!(embed_text(&d, &out).contains("num_attention_heads"));
    assert!(!out.exists());
}

#[test]
fn corrupt_and_lying_safetensors() {
    let d = model_copy("st");
    let out = d.join("e.npy");
    let st = d.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap(); // truncated
    let e = embed_text(&d, &out);
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::write(&st, b"garbage that is not a safetensors file at all").unwrap();
    assert!(embed_text(&d, &out).contains("model.safetensors"));
    // Header claims more bytes than the file holds.
    write_safetensors(&st, &[("logit_scale", "F32", vec![], vec![0; 4])], 4096);
    assert!(embed_text(&d, &out).contains("model.safetensors"));
    assert!(!out.exists());
}

#[test]
fn shapes_that_contradict_the_config() {
    let d = model_copy("shape");
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["text_config"]["intermediate_size"] = serde_json::json!(100);
    std::fs::write(d.join("config.json"), v.to_string()).unwrap();
    let e = embed_text(&d, &d.join("e.npy"));
    assert!(e.contains("model.safetensors") && e.contains("fc1") && e.contains("shape"), "{e}");
}

#[test]
fn unknown_dtype() {
    let d = model_copy("dtype");
    let st = d.join("model.safetensors");
    write_safetensors(&st, &[("text_model.embeddings.token_embedding.weight", "F64", vec![1, 1], vec![0; 8])], 0);
    let e = embed_text(&d, &d.join("e.npy"));
    assert!(e.contains("F64") && e.contains("model.safetensors"), "{e}");
}

#[test]
fn unreadable_images_and_empty_inputs() {
    let d = tmpdir("img");
    let bad = d.join("not_an_image.png");
    std::fs::write(&bad, b"this is text").unwrap();
    let out = d.join("e.npy");
    let m = fixture("tiny");
    let e = fails(&["embed-image", "--model", m.to_str().unwrap(), "--out", out.to_str().unwrap(), bad.to_str().unwrap()]);
    assert!(e.contains("not_an_image.png"), "{e}");
    let e = fails(&["embed-image", "--model", m.to_str().unwrap(), "--out", out.to_str().unwrap(), "/nonexistent.jpg"]);
    assert!(e.contains("/nonexistent.jpg"), "{e}");
    fails(&["embed-image", "--model", m.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    fails(&["embed-text", "--model", m.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    let empty = d.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let e = fails(&["embed-text", "--model", m.to_str().unwrap(), "--out", out.to_str().unwrap(), "--file", empty.to_str().unwrap()]);
    assert!(e.contains("empty.txt"), "{e}");
    let emptydir = tmpdir("emptydir");
    fails(&["embed-image", "--model", m.to_str().unwrap(), "--out", out.to_str().unwrap(), "--dir", emptydir.to_str().unwrap()]);
    assert!(!out.exists());
}

#[test]
fn unwritable_output_leaves_nothing() {
    let m = fixture("tiny");
    let e = fails(&["embed-text", "--model", m.to_str().unwrap(), "--out", "/nonexistent-dir/e.npy", "a cat"]);
    assert!(e.contains("/nonexistent-dir/e.npy"), "{e}");
}

#[test]
fn cuda_without_a_driver_is_an_error_and_auto_falls_back() {
    let m = fixture("tiny");
    let d = tmpdir("cuda");
    let out = d.join("e.npy");
    let args = ["embed-text", "--model", m.to_str().unwrap(), "--device", "cuda", "--out", out.to_str().unwrap(), "a cat"];
    if clipforge::cuda::GpuOps::open().is_ok() {
        // a GPU machine: --device cuda must work there
        let o = Command::new(env!("CARGO_BIN_EXE_clipforge")).args(args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::remove_file(&out).unwrap();
    } else {
        let e = fails(&args);
        assert!(e.contains("cuda"), "{e}");
    }
    let ok = Command::new(env!("CARGO_BIN_EXE_clipforge"))
        .args(["embed-text", "--model", m.to_str().unwrap(), "--device", "auto", "--out", out.to_str().unwrap(), "a cat"])
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(out.exists());
}

#[test]
fn a_truncated_jpeg_is_an_error() {
    let d = tmpdir("jpeg");
    let img = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([(x * 4) as u8, (y * 5) as u8, ((x + y) * 2) as u8]));
    let mut bytes = vec![];
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Jpeg).unwrap();
    let m = fixture("tiny");
    let out = d.join("e.npy");
    let (good, cut) = (d.join("good.jpg"), d.join("cut.jpg"));
    let mut trailing = bytes.clone();
    trailing.extend_from_slice(b"trailing bytes after the end marker");
    std::fs::write(&good, &trailing).unwrap();
    let ok = Command::new(env!("CARGO_BIN_EXE_clipforge"))
        .args(["embed-image", "--model", m.to_str().unwrap(), "--out", out.to_str().unwrap(), good.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(ok.status.success(), "a whole JPEG: {}", String::from_utf8_lossy(&ok.stderr));
    std::fs::remove_file(&out).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let e = fails(&["embed-image", "--model", m.to_str().unwrap(), "--out", out.to_str().unwrap(), cut.to_str().unwrap()]);
    assert!(e.contains("cut.jpg") && e.contains("truncated"), "{e}");
    assert!(!out.exists());
}

/// libjpeg's fatal errors (its default handler would `exit()` the process) come back as one line
/// naming the file: a frame header with no components, 65535×65535 (refused from the header as a
/// decompression bomb before libjpeg sees it), a
/// frame header cut short. Corrupt entropy data is a libjpeg warning: decoded anyway, as Pillow does.
#[test]
fn a_corrupt_jpeg_is_a_clean_error() {
    let d = tmpdir("jpeg-corrupt");
    let m = fixture("tiny");
    let out = d.join("e.npy");
    let good = std::fs::read(fixture("formats/chelsea_420.jpg")).unwrap();
    let sof = good.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    let mut no_components = good.clone();
    no_components[sof + 9] = 0;
    let mut huge = good.clone();
    huge[sof + 5..sof + 9].copy_from_slice(&[0xFF; 4]);
    let mut short_sof = good.clone();
    short_sof[sof + 3] = 5; // segment length 5: too short for a frame header
    for (name, bytes, what) in
        [("nocomp.jpg", no_components, "Empty JPEG image"), ("huge.jpg", huge, "decompression bomb"), ("shortsof.jpg", short_sof, "JPEG")]
    {
        let p = d.join(name);
        std::fs::write(&p, bytes).unwrap();
        let e = fails(&["embed-image", "--model", m.to_str().unwrap(), "--out", out.to_str().unwrap(), p.to_str().unwrap()]);
        assert!(e.contains(name) && e.contains(what), "{name}: {e}");
        assert!(!out.exists());
    }
    let mut garbage = good.clone();
    let sos = garbage.windows(2).rposition(|w| w == [0xFF, 0xDA]).unwrap();
    garbage[sos + 200..sos + 260].iter_mut().for_each(|b| *b = if *b == 0xFF { 0x00 } else { b.wrapping_mul(7).wrapping_add(13) & 0xFE });
    let p = d.join("garbage.jpg");
    std::fs::write(&p, garbage).unwrap();
    let ok = Command::new(env!("CARGO_BIN_EXE_clipforge"))
        .args(["embed-image", "--model", m.to_str().unwrap(), "--out", out.to_str().unwrap(), p.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(ok.status.success(), "corrupt scan data decodes: {}", String::from_utf8_lossy(&ok.stderr));
}
