//! Hostile inputs (issue 15, point 4): sharded weights broken every way, lying safetensors
//! headers, unaligned tensor data, non-UTF-8 file names and contents, decompression bombs,
//! extreme aspect ratios, empty and 100k-character texts, broken JSONL and tar members. Every
//! bad file is made here in a temporary directory (removed at the end). Each refused input runs
//! the real binary and expects a non-zero exit, exactly one line on stderr naming the file, no
//! panic, and nothing written; each odd but valid input must give the right answer.
use clipforge::io::npy::read_npy;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(p)
}

/// A fresh directory, removed when dropped.
struct Tmp(PathBuf);
impl Tmp {
    fn new(name: &str) -> Tmp {
        let d = std::env::temp_dir().join(format!("clipforge-hostile-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Tmp(d)
    }
    fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}
impl Drop for Tmp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn cli<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_clipforge")).args(args).output().unwrap()
}

fn os(p: &Path) -> OsString {
    p.as_os_str().to_owned()
}

/// Runs clipforge and expects a refusal: exit 1, one line on stderr holding every `want`, no panic.
fn refused<S: AsRef<OsStr> + std::fmt::Debug>(args: &[S], want: &[&str]) -> String {
    let o = cli(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "expected exit 1 for {args:?}; stderr: {err}");
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "panic for {args:?}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line for {args:?}, got: {err}");
    for w in want {
        assert!(err.contains(w), "{err} (expected {w:?}) for {args:?}");
    }
    err
}

/// Runs clipforge and expects success.
fn ok<S: AsRef<OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let o = cli(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "failed: {args:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// The tiny model's config, tokenizer and preprocessing in `d` (no weights).
fn model_files(d: &Path) {
    std::fs::create_dir_all(d).unwrap();
    for f in ["config.json", "tokenizer.json", "preprocessor_config.json"] {
        std::fs::copy(fixture("tiny").join(f), d.join(f)).unwrap();
    }
}

fn embed_text_args(model: &Path, out: &Path) -> Vec<OsString> {
    vec!["embed-text".into(), "--device".into(), "cpu".into(), "--model".into(), os(model), "--out".into(), os(out), "a photo of a cat".into()]
}

/// Nothing left in `d` but the files named (no output, no temp file).
fn only(d: &Path, names: &[&str]) {
    let mut got: Vec<String> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    got.sort();
    let mut want: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(got, want, "files left in {}", d.display());
}

/// The tiny model's tensors split into two shards (alternating by name) with an index → names of
/// the tensors in each shard.
fn shard_tiny(d: &Path) -> [Vec<String>; 2] {
    model_files(d);
    let bytes = std::fs::read(fixture("tiny/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let mut parts: [Vec<String>; 2] = [vec![], vec![]];
    for (i, n) in names.into_iter().enumerate() {
        parts[i % 2].push(n);
    }
    let mut map = serde_json::Map::new();
    for (k, part) in parts.iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", k + 1);
        write_shard(&d.join(&file), &st, part);
        for n in part {
            map.insert(n.clone(), file.clone().into());
        }
    }
    std::fs::write(d.join("model.safetensors.index.json"), serde_json::json!({"metadata": {}, "weight_map": map}).to_string()).unwrap();
    parts
}

fn write_shard(path: &Path, st: &safetensors::SafeTensors, names: &[String]) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = names.iter().map(|n| (n.clone(), st.tensor(n).unwrap())).collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

const SHARDS: [&str; 2] = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
const INDEX: &str = "model.safetensors.index.json";

#[test]
fn sharded_weights_broken_every_way() {
    let t = Tmp::new("shards");
    let want_npy = t.join("want.npy");
    ok(&embed_text_args(&fixture("tiny"), &want_npy));
    let want = read_npy(&want_npy).unwrap();
    let m = t.join("m");
    let parts = shard_tiny(&m);
    let out = t.join("e.npy");
    // the good shards: the same numbers as the single file
    ok(&embed_text_args(&m, &out));
    assert_eq!(read_npy(&out).unwrap(), want);
    std::fs::remove_file(&out).unwrap();
    let index = std::fs::read_to_string(m.join(INDEX)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&index).unwrap();
    let set_index = |s: &[u8]| std::fs::write(m.join(INDEX), s).unwrap();
    let with_map = |f: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let mut v = v.clone();
        f(v["weight_map"].as_object_mut().unwrap());
        v.to_string().into_bytes()
    };
    let first = parts[0][0].clone();
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        ("not JSON", b"{\"weight_map\": {".to_vec(), vec![INDEX, "not valid JSON"]),
        ("not UTF-8", b"{\"weight_map\": {\"a\xff\": \"x\"}}".to_vec(), vec![INDEX, "not valid JSON"]),
        ("no weight_map", br#"{"metadata": {}}"#.to_vec(), vec![INDEX, "weight_map"]),
        ("weight_map an array", br#"{"weight_map": ["a"]}"#.to_vec(), vec![INDEX, "weight_map"]),
        ("empty weight_map", br#"{"weight_map": {}}"#.to_vec(), vec![INDEX, "lists no tensors"]),
        (
            "a number for a file",
            with_map(&|w| {
                w.insert(first.clone(), 7.into());
            }),
            vec![INDEX, "must be a file name"],
        ),
        (
            "outside the directory",
            with_map(&|w| {
                w.insert(first.clone(), "../x.safetensors".into());
            }),
            vec![INDEX, "../x.safetensors", "plain file name"],
        ),
        (
            "an absolute path",
            with_map(&|w| {
                w.insert(first.clone(), "/etc/passwd".into());
            }),
            vec![INDEX, "plain file name"],
        ),
        (
            "a shard listed but missing",
            with_map(&|w| {
                w.insert(first.clone(), "model-00003-of-00002.safetensors".into());
            }),
            vec!["model-00003-of-00002.safetensors", "missing"],
        ),
        (
            "a tensor in the wrong shard",
            with_map(&|w| {
                w.insert(first.clone(), SHARDS[1].into());
            }),
            vec![INDEX, &first, SHARDS[0]],
        ),
        (
            "a tensor in no shard",
            with_map(&|w| {
                w.insert("no.such.tensor".into(), SHARDS[0].into());
            }),
            vec![INDEX, "no.such.tensor", "does not hold it"],
        ),
    ];
    for (what, bytes, want) in cases {
        set_index(&bytes);
        let e = refused(&embed_text_args(&m, &out), &want);
        assert!(!out.exists(), "{what}: {e}");
    }
    set_index(index.as_bytes());
    // a tensor in both shards: an error naming both files, not one copy silently kept
    let bytes = std::fs::read(fixture("tiny/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut second = parts[1].clone();
    second.push(first.clone());
    write_shard(&m.join(SHARDS[1]), &st, &second);
    refused(&embed_text_args(&m, &out), &[SHARDS[0], SHARDS[1], &first, "also in"]);
    // stretch reads the shards itself: the same checks, nothing written
    let st_out = t.join("stretched");
    refused(&["stretch".into(), "--model".into(), os(&m), "--out".into(), os(&st_out)], &[&first, "also in"]);
    assert!(!st_out.exists());
    // a shard that is not a safetensors file, a shard that is a directory
    std::fs::write(m.join(SHARDS[1]), b"garbage").unwrap();
    refused(&embed_text_args(&m, &out), &[SHARDS[1], "not a valid safetensors file"]);
    std::fs::remove_file(m.join(SHARDS[1])).unwrap();
    std::fs::create_dir(m.join(SHARDS[1])).unwrap();
    refused(&embed_text_args(&m, &out), &[SHARDS[1]]);
    only(&m, &["config.json", "tokenizer.json", "preprocessor_config.json", INDEX, SHARDS[0], SHARDS[1]]);
}

/// A safetensors file from a raw header (its length field computed unless `len` is given) and data.
fn st_raw(path: &Path, len: Option<u64>, header: &[u8], data: &[u8]) {
    let mut b = len.unwrap_or(header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header);
    b.extend_from_slice(data);
    std::fs::write(path, b).unwrap();
}

#[test]
fn lying_safetensors_headers_are_refused() {
    let t = Tmp::new("headers");
    let m = t.join("m");
    model_files(&m);
    let st = m.join("model.safetensors");
    let out = t.join("e.npy");
    let h = |s: &str| s.as_bytes().to_vec();
    let f32x4 = vec![0u8; 16];
    type Case<'a> = (&'a str, Option<u64>, Vec<u8>, Vec<u8>); // (what, length field, header, data)
    let cases: Vec<Case> = vec![
        ("header longer than the file", Some(4096), h(r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#), f32x4.clone()),
        ("header length 0", Some(0), h(r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#), f32x4.clone()),
        ("header length 2^64-1", Some(u64::MAX), h("{}"), vec![]),
        ("header length 90 MB", Some(90 << 20), h("{}"), vec![]),
        ("header not UTF-8", None, b"{\"a\xff\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}".to_vec(), f32x4.clone()),
        ("header not JSON", None, h(r#"{"a":{"dtype":"F32","#), f32x4.clone()),
        ("offsets past the end", None, h(r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,1099511627776]}}"#), f32x4.clone()),
        (
            "overlapping offsets",
            None,
            h(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#),
            f32x4.clone(),
        ),
        (
            "a gap between tensors",
            None,
            h(r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#),
            vec![0; 12],
        ),
        ("end before start", None, h(r#"{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}"#), vec![0; 8]),
        ("shape product ≠ bytes", None, h(r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,16]}}"#), f32x4.clone()),
        ("2^60 elements", None, h(r#"{"a":{"dtype":"F32","shape":[1152921504606846976],"data_offsets":[0,16]}}"#), f32x4.clone()),
        ("shape overflows", None, h(r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,16]}}"#), f32x4.clone()),
        ("negative dimension", None, h(r#"{"a":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}}"#), f32x4.clone()),
        ("unknown dtype name", None, h(r#"{"a":{"dtype":"F99","shape":[4],"data_offsets":[0,16]}}"#), f32x4.clone()),
        ("data after the last tensor", None, h(r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#), vec![0; 20]),
        ("an empty file", None, vec![], vec![]),
    ];
    for (what, len, header, data) in cases {
        if header.is_empty() && len.is_none() {
            std::fs::write(&st, b"").unwrap();
        } else {
            st_raw(&st, len, &header, &data);
        }
        // the library: an error naming the file
        let e = clipforge::model::Weights::open(&st).err().unwrap_or_else(|| panic!("{what}: accepted")).to_string();
        assert!(e.contains("model.safetensors") && !e.contains('\n'), "{what}: {e}");
        // the binary: one line, exit 1, nothing written
        refused(&embed_text_args(&m, &out), &["model.safetensors"]);
        assert!(!out.exists(), "{what}");
    }
    // a file 7 bytes long (shorter than the length field)
    std::fs::write(&st, [1u8; 7]).unwrap();
    refused(&embed_text_args(&m, &out), &["model.safetensors"]);
    only(&m, &["config.json", "tokenizer.json", "preprocessor_config.json", "model.safetensors"]);
}

/// The tiny model re-written with `pad` extra spaces after its header JSON, which moves every
/// tensor's data off its natural alignment when `pad` is not a multiple of 4.
fn tiny_padded(path: &Path, pad: usize) {
    let b = std::fs::read(fixture("tiny/model.safetensors")).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let mut header = b[8..8 + n].to_vec();
    header.extend(std::iter::repeat_n(b' ', pad));
    st_raw(path, None, &header, &b[8 + n..]);
}

#[test]
fn unaligned_tensor_data_loads_exactly() {
    let t = Tmp::new("unaligned");
    let good = clipforge::model::Weights::open(&fixture("tiny/model.safetensors")).unwrap();
    let want_npy = t.join("want.npy");
    ok(&embed_text_args(&fixture("tiny"), &want_npy));
    let img = fixture("images/chelsea.png");
    let want_img = t.join("want_img.npy");
    ok(&[
        OsStr::new("embed-image"),
        "--device".as_ref(),
        "cpu".as_ref(),
        "--model".as_ref(),
        fixture("tiny").as_os_str(),
        "--out".as_ref(),
        want_img.as_os_str(),
        img.as_os_str(),
    ]);
    for pad in [1, 2, 3, 5] {
        let m = t.join(format!("m{pad}"));
        model_files(&m);
        tiny_padded(&m.join("model.safetensors"), pad);
        let w = clipforge::model::Weights::open(&m).unwrap();
        for name in good.names() {
            assert_eq!(w.get(name).unwrap().to_vec_f32(), good.get(name).unwrap().to_vec_f32(), "pad {pad}: {name}");
        }
        let out = t.join(format!("e{pad}.npy"));
        ok(&embed_text_args(&m, &out));
        assert_eq!(read_npy(&out).unwrap(), read_npy(&want_npy).unwrap(), "pad {pad}");
        let out = t.join(format!("i{pad}.npy"));
        ok(&[
            OsStr::new("embed-image"),
            "--device".as_ref(),
            "cpu".as_ref(),
            "--model".as_ref(),
            m.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
            img.as_os_str(),
        ]);
        assert_eq!(read_npy(&out).unwrap(), read_npy(&want_img).unwrap(), "pad {pad}");
    }
}

fn bytes_name(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

#[test]
fn non_utf8_names_and_contents() {
    let t = Tmp::new("utf8");
    // a model directory whose name is not UTF-8: it works
    let m = t.join(bytes_name(b"mod\xffel"));
    model_files(&m);
    std::fs::copy(fixture("tiny/model.safetensors"), m.join("model.safetensors")).unwrap();
    let out = t.join("e.npy");
    ok(&embed_text_args(&m, &out));
    // an image whose name is not UTF-8: it works; a broken one is named (lossily) in the error
    let img = t.join(bytes_name(b"caf\xe9.png"));
    std::fs::copy(fixture("images/chelsea.png"), &img).unwrap();
    let iout = t.join("i.npy");
    ok(&[
        OsStr::new("embed-image"),
        "--device".as_ref(),
        "cpu".as_ref(),
        "--model".as_ref(),
        m.as_os_str(),
        "--out".as_ref(),
        iout.as_os_str(),
        img.as_os_str(),
    ]);
    let bad = t.join(bytes_name(b"bro\xe9ken.png"));
    std::fs::write(&bad, b"not a png").unwrap();
    std::fs::remove_file(&iout).unwrap();
    refused(
        &[
            OsStr::new("embed-image"),
            "--device".as_ref(),
            "cpu".as_ref(),
            "--model".as_ref(),
            m.as_os_str(),
            "--out".as_ref(),
            iout.as_os_str(),
            bad.as_os_str(),
        ],
        &["bro\u{fffd}ken.png"],
    );
    assert!(!iout.exists());
    // a texts file with a bad byte on line 2: the file, the line and the column
    let texts = t.join("texts.txt");
    std::fs::write(&texts, b"a cat\na d\xf0g\n").unwrap();
    std::fs::remove_file(&out).unwrap();
    refused(
        &[OsStr::new("embed-text"), "--model".as_ref(), m.as_os_str(), "--out".as_ref(), out.as_os_str(), "--file".as_ref(), texts.as_os_str()],
        &["texts.txt", "not UTF-8", "line 2, column 4"],
    );
    // class names for classify
    refused(
        &[OsStr::new("classify"), "--model".as_ref(), m.as_os_str(), "--labels-file".as_ref(), texts.as_os_str(), img.as_os_str()],
        &["texts.txt", "line 2"],
    );
    // config.json, tokenizer.json, preprocessor_config.json with a bad byte
    for (f, cmd, want) in [
        ("config.json", "embed-text", "line 1, column 2"),
        ("tokenizer.json", "embed-text", "tokenizer.json"),
        ("preprocessor_config.json", "embed-image", "preprocessor_config.json"),
    ] {
        let p = m.join(f);
        let good = std::fs::read(&p).unwrap();
        let mut b = good.clone();
        b.insert(1, 0xff);
        std::fs::write(&p, &b).unwrap();
        let input = if cmd == "embed-text" { OsStr::new("a cat") } else { img.as_os_str() };
        let args = [OsStr::new(cmd), "--device".as_ref(), "cpu".as_ref(), "--model".as_ref(), m.as_os_str(), "--out".as_ref(), iout.as_os_str(), input];
        refused(&args, &[f, want]);
        std::fs::write(&p, &good).unwrap();
    }
    assert!(!out.exists() && !iout.exists());
    // a JSONL line that is not UTF-8: read_samples names the line
    let jsonl = t.join("d.jsonl");
    std::fs::write(&jsonl, b"{\"image\": \"a.png\", \"caption\": \"ok\"}\n{\"image\": \"b.png\", \"caption\": \"caf\xe9\"}\n").unwrap();
    let e = clipforge::train::data::read_samples(&jsonl, None).unwrap_err().to_string();
    assert!(e.contains("d.jsonl") && e.contains("line 2"), "{e}");
    refused(
        &[OsStr::new("eval"), "retrieval".as_ref(), "--model".as_ref(), m.as_os_str(), "--data".as_ref(), jsonl.as_os_str(), "--no-cache".as_ref()],
        &["d.jsonl", "line 2"],
    );
}

/// A .pt (a zip of stored entries) whose data.pkl is `pkl`, with a 16-byte storage `data/0`.
fn pt_with_pickle(path: &Path, pkl: &[u8]) {
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let o = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", o).unwrap();
    std::io::Write::write_all(&mut z, pkl).unwrap();
    z.start_file("archive/data/0", o).unwrap();
    std::io::Write::write_all(&mut z, &[0u8; 16]).unwrap();
    z.start_file("archive/byteorder", o).unwrap();
    std::io::Write::write_all(&mut z, b"little").unwrap();
    z.finish().unwrap();
}

#[test]
fn a_pickle_nested_a_million_deep() {
    // 2 MB of pickle: a list in a list in a list ... a million deep. Dropping it recursively
    // overflowed the stack (an abort, not an error).
    let n = 1_000_000;
    let mut pkl = b"\x80\x02".to_vec();
    pkl.extend(std::iter::repeat_n(b']', n));
    pkl.extend(std::iter::repeat_n(b'a', n - 1));
    let cut = pkl.clone();
    pkl.push(b'.');
    let t = Tmp::new("deep");
    for (name, bytes) in [("deep.pt", &pkl), ("deep_cut.pt", &cut)] {
        let p = t.join(name);
        pt_with_pickle(&p, bytes);
        let out = t.join("converted");
        refused(&[OsStr::new("convert"), "--from".as_ref(), p.as_os_str(), "--out".as_ref(), out.as_os_str()], &[name]);
        assert!(!out.exists());
    }
}

/// The pickle `torch.save` writes for {"visual.proj": a [2^30, 2^30] f32 tensor} on a storage
/// of `numel` elements (Python's pickle, protocol 2, of `_rebuild_tensor_v2` with a persistent id).
fn huge_tensor_pickle(numel: u64) -> Vec<u8> {
    let mut p = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01X\x0b\x00\x00\x00visual.projq\x02ctorch._utils\n_rebuild_tensor_v2\nq\x03((X\x07\x00\x00\x00storageq\x04ctorch\nFloatStorage\nq\x05X\x01\x00\x00\x000q\x06X\x03\x00\x00\x00cpuq\x07\x8a\x08".to_vec();
    p.extend_from_slice(&numel.to_le_bytes());
    p.extend_from_slice(b"tq\x08QK\x00J\x00\x00\x00@J\x00\x00\x00@\x86q\tJ\x00\x00\x00@K\x01\x86q\n\x89h\x00)Rq\x0btq\x0cRq\rs.");
    p
}

#[test]
fn a_pt_claiming_2_to_the_60_elements() {
    // the storage or the view claims 2^60 elements (4 EiB): refused from the sizes, never allocated
    let t = Tmp::new("huge-pt");
    for (name, numel, want) in
        [("storage.pt", 1u64 << 60, "the pickle says 4611686018427387904"), ("view.pt", 4, "view of 1152921504606846976 elements on a storage of 4")]
    {
        let p = t.join(name);
        pt_with_pickle(&p, &huge_tensor_pickle(numel));
        let e = clipforge::io::pt::read_pt(&p).err().unwrap_or_else(|| panic!("{name}: read")).to_string();
        assert!(e.contains(name) && e.contains(want), "{e}");
        let out = t.join("converted");
        refused(&[OsStr::new("convert"), "--from".as_ref(), p.as_os_str(), "--out".as_ref(), out.as_os_str()], &[name, want]);
        assert!(!out.exists());
    }
}

#[test]
fn broken_tokenizer_json() {
    // tokenizers 0.23 panics on a tokenizer.json cut inside its "decoder" (found by tests/fuzz.rs)
    let t = Tmp::new("tokenizer");
    let m = t.join("m");
    model_files(&m);
    std::fs::copy(fixture("tiny/model.safetensors"), m.join("model.safetensors")).unwrap();
    let out = t.join("e.npy");
    let full = std::fs::read(m.join("tokenizer.json")).unwrap();
    let cut = full.windows(10).position(|w| w == b"\"decoder\":").map(|i| i + 30).unwrap_or(full.len() / 2);
    for (what, bytes) in [
        ("cut in its decoder", &full[..cut]),
        ("cut", &full[..full.len() / 3]),
        ("a fuzz input", &std::fs::read(fixture("fuzz/tokenizer_json/decoder_cut")).unwrap()[..]),
        ("a merge longer than the vocabulary", &std::fs::read(fixture("fuzz/tokenizer_json/merge_too_long")).unwrap()[..]),
        ("an empty Replace pattern", &std::fs::read(fixture("fuzz/tokenizer_json/replace_empty_pattern")).unwrap()[..]),
    ] {
        std::fs::write(m.join("tokenizer.json"), bytes).unwrap();
        let e = refused(&embed_text_args(&m, &out), &["tokenizer.json"]);
        assert!(!out.exists(), "{what}: {e}");
    }
}

#[test]
fn broken_jsonl_lines() {
    let t = Tmp::new("jsonl");
    let m = fixture("tiny");
    let good = r#"{"image": "a.png", "caption": "a cat. on a mat", "short_caption": "a cat"}"#;
    let cases: [(&str, String, &[&str]); 7] = [
        ("truncated", format!("{good}\n{{\"image\": \"b.png\", \"capt"), &["line 2", "not JSON"]),
        ("image a number", format!("{good}\n{{\"image\": 5, \"caption\": \"x\"}}"), &["line 2", "\"image\""]),
        ("caption an object", format!("{good}\n{{\"image\": \"b.png\", \"caption\": {{}}}}"), &["line 2", "\"caption\""]),
        ("an array line", format!("{good}\n[1, 2]"), &["line 2"]),
        ("a null line", format!("{good}\nnull"), &["line 2"]),
        ("a string line", format!("{good}\n\"just text\""), &["line 2"]),
        ("only blank lines", "\n  \n\t\n".to_string(), &["no samples"]),
    ];
    for (what, text, want) in cases {
        let p = t.join("d.jsonl");
        std::fs::write(&p, &text).unwrap();
        let e = clipforge::train::data::read_samples(&p, None).err().unwrap_or_else(|| panic!("{what}: accepted")).to_string();
        assert!(e.contains("d.jsonl") && !e.contains('\n'), "{what}: {e}");
        for w in want {
            assert!(e.contains(w), "{what}: {e} (expected {w:?})");
        }
    }
    // a first line that is an array: read as the ShareGPT4V form, which it is not
    let p = t.join("d.jsonl");
    std::fs::write(&p, format!("[1, 2]\n{good}\n")).unwrap();
    let e = clipforge::train::data::read_samples(&p, None).unwrap_err().to_string();
    assert!(e.contains("d.jsonl") && e.contains("ShareGPT4V"), "{e}");
    // the binary: finetune and eval retrieval refuse with one line and write nothing
    std::fs::write(&p, format!("{good}\n[1, 2]\n")).unwrap();
    let out = t.join("run");
    refused(
        &[OsStr::new("finetune"), "--model".as_ref(), m.as_os_str(), "--data".as_ref(), p.as_os_str(), "--out".as_ref(), out.as_os_str()],
        &["d.jsonl", "line 2"],
    );
    assert!(!out.exists());
    refused(
        &[OsStr::new("eval"), "retrieval".as_ref(), "--model".as_ref(), m.as_os_str(), "--data".as_ref(), p.as_os_str(), "--no-cache".as_ref()],
        &["d.jsonl", "line 2"],
    );
}

#[path = "hostile_media/mod.rs"]
mod hostile_media;
