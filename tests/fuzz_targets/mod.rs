//! The fuzz targets of tests/fuzz.rs: for each parser, its valid seeds (made here, or small
//! committed fixtures) and how one input is run through it. A target ignores the parser's
//! `Result` (an error is the right answer to most inputs) and, on success, uses what was parsed
//! the way clipforge would next (reads every tensor, preprocesses the image, encodes texts).
use clipforge::io::image_prep::{preprocess, PreprocessConfig};
use std::io::Write;
use std::path::{Path, PathBuf};

/// How a target's inputs are mutated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Bytes only.
    Bytes,
    /// JSON (or JSONL) text: bytes, numbers in the text, or the parsed tree.
    Json,
    /// A safetensors file: bytes, or its header's JSON tree (the length field kept right).
    Safetensors,
}

pub struct Target {
    pub name: &'static str,
    pub kind: Kind,
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Runs one input → whether the parser accepted it.
    pub run: fn(&[u8]) -> bool,
}

pub fn targets() -> Vec<Target> {
    vec![
        Target { name: "safetensors", kind: Kind::Safetensors, seeds: safetensors_seeds, run: run_safetensors },
        Target { name: "config_json", kind: Kind::Json, seeds: config_seeds, run: run_config },
        Target { name: "preprocessor_config", kind: Kind::Json, seeds: preprocessor_seeds, run: run_preprocessor },
        Target { name: "tokenizer_json", kind: Kind::Json, seeds: tokenizer_seeds, run: run_tokenizer },
        Target { name: "jsonl", kind: Kind::Json, seeds: jsonl_seeds, run: run_jsonl },
        Target { name: "images", kind: Kind::Bytes, seeds: image_seeds, run: run_image },
        Target { name: "pt", kind: Kind::Bytes, seeds: pt_seeds, run: run_pt },
        Target { name: "pickle", kind: Kind::Bytes, seeds: pickle_seeds, run: run_pickle },
        Target { name: "tar_index", kind: Kind::Bytes, seeds: tar_seeds, run: run_tar },
        Target { name: "npy", kind: Kind::Bytes, seeds: npy_seeds, run: run_npy },
    ]
}

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(p)
}

/// This thread's scratch directory: in /dev/shm when there is one (no disk I/O per input).
fn scratch_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
    base.join(format!("clipforge-fuzz-{}-{:?}", std::process::id(), std::thread::current().id()).replace(['(', ')'], ""))
}

/// A scratch file of this thread (the parsers that take a path read it from there).
fn scratch(name: &str, data: &[u8]) -> PathBuf {
    let d = scratch_dir();
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join(name);
    std::fs::File::create(&p).and_then(|mut f| f.write_all(data)).unwrap();
    p
}

/// Removes this thread's scratch files.
pub fn clean_scratch() {
    let _ = std::fs::remove_dir_all(scratch_dir());
}

// ---- safetensors ------------------------------------------------------------------------

fn st_file(tensors: &[(&str, &str, &[usize], usize)], meta: bool, pad: usize) -> Vec<u8> {
    let mut h = serde_json::Map::new();
    if meta {
        h.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    }
    let mut data = vec![];
    for (name, dtype, shape, size) in tensors {
        let n: usize = shape.iter().product::<usize>() * size;
        let start = data.len();
        data.extend((0..n).map(|i| (i * 37 + 11) as u8));
        h.insert(name.to_string(), serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}));
    }
    let mut header = serde_json::to_string(&h).unwrap();
    header.extend(std::iter::repeat_n(' ', pad));
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&data);
    out
}

fn safetensors_seeds() -> Vec<Vec<u8>> {
    vec![
        st_file(&[("a.weight", "F32", &[3, 4], 4), ("a.bias", "F16", &[4], 2), ("b", "BF16", &[2, 1, 3], 2)], true, 0),
        st_file(&[("x", "F32", &[5], 4), ("y", "I64", &[2], 8), ("z", "F32", &[], 4)], false, 3),
        st_file(&[("e", "F32", &[0, 7], 4), ("w", "F16", &[2, 2], 2)], false, 1),
    ]
}

fn run_safetensors(b: &[u8]) -> bool {
    let p = scratch("st.safetensors", b);
    let Ok(w) = clipforge::model::Weights::open(&p) else { return false };
    let _ = w.total_bytes();
    for n in w.names() {
        if let Ok(t) = w.get(n) {
            assert_eq!(t.to_vec_f32().len(), t.numel());
            let _ = t.f32_data().len();
        }
    }
    true
}

// ---- config.json, preprocessor_config.json ----------------------------------------------

fn config_seeds() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = ["tiny/config.json", "odd/config.json"].iter().map(|p| std::fs::read(fixture(p)).unwrap()).collect();
    v.push(clipforge::model::config::ClipConfig::preset("longclip-b16").unwrap().to_json().to_string().into_bytes());
    v.push(b"{}".to_vec());
    v
}

fn run_config(b: &[u8]) -> bool {
    let s = String::from_utf8_lossy(b);
    if b.len().is_multiple_of(8) {
        let _ = clipforge::model::config::ClipConfig::from_file(&scratch("config.json", b));
    }
    let Ok(c) = clipforge::model::config::ClipConfig::from_json(&s) else { return false };
    let _ = (c.vision.grid(), c.vision.tokens(), c.to_json());
    true
}

fn preprocessor_seeds() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = ["tiny/preprocessor_config.json", "odd/preprocessor_config.json"].iter().map(|p| std::fs::read(fixture(p)).unwrap()).collect();
    v.push(
        br#"{"size": {"height": 20, "width": 30}, "crop_size": [16, 12], "image_mean": 0.5, "image_std": [0.2, 0.3, 0.4], "do_center_crop": false}"#.to_vec(),
    );
    v.push(br#"{"size": 18, "crop_size": 16, "resample": 3, "rescale_factor": 0.5, "do_normalize": false}"#.to_vec());
    v
}

fn run_preprocessor(b: &[u8]) -> bool {
    let Ok(cfg) = PreprocessConfig::from_json_str(&String::from_utf8_lossy(b)) else { return false };
    // preprocess a small image with it, when its output is of a sane size
    let img = clipforge::io::image_prep::RgbImage8 { width: 5, height: 3, data: (0..45).map(|i| (i * 5) as u8).collect() };
    let (w, h) = clipforge::io::image_prep::output_size(img.width, img.height, &cfg);
    if (w as u64) * (h as u64) <= 1 << 16 {
        let px = preprocess(&img, &cfg);
        assert_eq!(px.len(), 3 * w as usize * h as usize);
    }
    true
}

// ---- tokenizer.json ---------------------------------------------------------------------

/// The CLIP BPE cut down to its first 600 tokens (and the merges among them), so that a
/// mutated copy parses in a millisecond.
fn tokenizer_seeds() -> Vec<Vec<u8>> {
    let mut t: serde_json::Value = serde_json::from_slice(&std::fs::read(fixture("tokenizer.json")).unwrap()).unwrap();
    let vocab = t["model"]["vocab"].as_object().unwrap().clone();
    let keep: serde_json::Map<String, serde_json::Value> = vocab.into_iter().filter(|(k, v)| v.as_u64().unwrap() < 600 || k.starts_with("<|")).collect();
    let merges: Vec<serde_json::Value> = t["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| {
            let (a, b) = (m[0].as_str().unwrap(), m[1].as_str().unwrap());
            keep.contains_key(a) && keep.contains_key(b) && keep.contains_key(&format!("{a}{b}"))
        })
        .cloned()
        .collect();
    t["model"]["vocab"] = keep.into();
    t["model"]["merges"] = merges.into();
    vec![serde_json::to_vec(&t).unwrap()]
}

fn run_tokenizer(b: &[u8]) -> bool {
    let p = scratch("tok.json", b);
    let Ok(tok) = clipforge::io::tokenizer::ClipTokenizer::from_file(&p, 16) else { return false };
    for text in ["", "a photo of a cat", "  \u{300}\u{feff}x\u{10ffff}", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"] {
        if let Ok(ids) = tok.encode(text) {
            assert!(ids.len() <= 16);
        }
    }
    true
}

// ---- JSONL ------------------------------------------------------------------------------

fn jsonl_seeds() -> Vec<Vec<u8>> {
    vec![
        b"{\"image\": \"a.png\", \"caption\": \"a cat. on a mat\"}\n{\"image\": \"d/b.jpg\", \"caption\": \"two dogs\", \"short_caption\": \"dogs\"}\n\n"
            .to_vec(),
        br#"[{"image": "a.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a long\ncaption"}]}]"#.to_vec(),
    ]
}

fn run_jsonl(b: &[u8]) -> bool {
    let p = scratch("d.jsonl", b);
    let a = clipforge::train::data::read_samples(&p, None).is_ok();
    clipforge::eval::data::retrieval_set(&p).is_ok() || a
}

// ---- images -----------------------------------------------------------------------------

fn image_seeds() -> Vec<Vec<u8>> {
    use image::ImageFormat as F;
    let rgb = image::RgbImage::from_fn(9, 6, |x, y| image::Rgb([(x * 28) as u8, (y * 40) as u8, ((x + y) * 15) as u8]));
    let rgba = image::RgbaImage::from_fn(7, 5, |x, y| image::Rgba([(x * 30) as u8, (y * 50) as u8, 90, ((x * y) * 20) as u8]));
    let gray = image::GrayImage::from_fn(6, 7, |x, y| image::Luma([(x * 40 + y) as u8]));
    let gray16 = image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::from_fn(5, 4, |x, y| image::Luma([(x * 9000 + y * 300) as u16]));
    let enc = |img: image::DynamicImage, f: F| {
        let mut b = vec![];
        img.write_to(&mut std::io::Cursor::new(&mut b), f).unwrap();
        b
    };
    vec![
        enc(rgb.clone().into(), F::Png),
        enc(rgba.clone().into(), F::Png),
        enc(gray.clone().into(), F::Png),
        enc(gray16.into(), F::Png),
        enc(rgb.clone().into(), F::Jpeg),
        enc(gray.into(), F::Jpeg),
        enc(rgb.clone().into(), F::Gif),
        enc(rgb.clone().into(), F::Bmp),
        enc(rgba.clone().into(), F::Bmp),
        enc(rgb.clone().into(), F::WebP),
        enc(rgba.into(), F::WebP),
        enc(rgb.into(), F::Tiff),
    ]
}

fn run_image(b: &[u8]) -> bool {
    let _ = clipforge::io::image_decode::probe_bytes(b);
    let _ = clipforge::io::image_decode::decode_rgb8(b);
    let Ok(img) = clipforge::io::image_decode::decode_rgb8_hf(b) else { return false };
    assert_eq!(img.data.len(), img.width as usize * img.height as usize * 3);
    let px = preprocess(&img, &PreprocessConfig::openai(8));
    assert_eq!(px.len(), 3 * 8 * 8);
    true
}

// ---- .pt, pickle ------------------------------------------------------------------------

const PT_SEEDS: [&str; 4] = ["views.pt", "bad_missing.pt", "bad_foreign.pt", "bad_truncated.pt"];

fn pt_seeds() -> Vec<Vec<u8>> {
    PT_SEEDS.iter().map(|p| std::fs::read(fixture(&format!("pt/{p}"))).unwrap()).collect()
}

fn run_pt(b: &[u8]) -> bool {
    let p = scratch("ckpt.pt", b);
    let Ok(c) = clipforge::io::pt::read_pt(&p) else { return false };
    for t in c.tensors.values() {
        let _ = t.to_vec_f32();
    }
    true
}

/// The data.pkl of the small .pt fixtures (a state dict, a TorchScript module tree).
fn pickle_seeds() -> Vec<Vec<u8>> {
    use std::io::Read;
    let mut out = vec![];
    for name in ["views.pt", "bad_missing.pt", "bad_foreign.pt"] {
        let mut z = zip::ZipArchive::new(std::fs::File::open(fixture(&format!("pt/{name}"))).unwrap()).unwrap();
        let pkl = z.file_names().filter_map(|n| n.ok()).find(|n| n.ends_with("/data.pkl")).unwrap().into_owned();
        let mut b = vec![];
        z.by_name(&pkl).unwrap().read_to_end(&mut b).unwrap();
        out.push(b);
    }
    out
}

fn run_pickle(b: &[u8]) -> bool {
    use clipforge::io::pt::pickle::{dismantle, unpickle};
    let a = unpickle(b, false).map(dismantle).is_ok();
    unpickle(b, true).map(dismantle).is_ok() || a
}

// ---- tar shards -------------------------------------------------------------------------

fn tar_seeds() -> Vec<Vec<u8>> {
    let tar = |members: &[(&str, &[u8])], gnu: bool| {
        let mut b = tar::Builder::new(vec![]);
        for (name, data) in members {
            let mut h = if gnu { tar::Header::new_gnu() } else { tar::Header::new_ustar() };
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    };
    let long = format!("{}/k9.txt", "d".repeat(120));
    vec![
        tar(&[("k0.png", b"\x89PNG not really"), ("k0.txt", b"a cat"), ("k1.jpg", b"\xff\xd8"), ("k1.json", b"{\"caption\": \"x\"}")], false),
        tar(&[("a/b.c.png", b"12345"), ("a/b.c.cls", b"3"), (&long, b"long name"), ("k2.TXT", b"")], true),
    ]
}

fn run_tar(b: &[u8]) -> bool {
    let p = scratch("shard.tar", b);
    let Ok(s) = clipforge::io::webdataset::index_shard(&p) else { return false };
    for smp in &s.samples {
        for (_, m) in &smp.members {
            let _ = clipforge::io::webdataset::read_member(&p, m);
        }
    }
    true
}

// ---- .npy -------------------------------------------------------------------------------

fn npy_seeds() -> Vec<Vec<u8>> {
    vec![
        clipforge::io::npy::npy_bytes(&[1.0, -2.5, 3.0, 0.0, 7.0, 8.0], &[2, 3]),
        clipforge::io::npy::npy_bytes(&[], &[0, 4]),
        clipforge::io::npy::npy_bytes(&[5.0], &[]),
    ]
}

fn run_npy(b: &[u8]) -> bool {
    let Ok((data, shape)) = clipforge::io::npy::read_npy(&scratch("a.npy", b)) else { return false };
    assert_eq!(shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)), Some(data.len()), "shape {shape:?}");
    true
}
