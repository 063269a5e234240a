//! The media half of tests/hostile.rs: decompression bombs (headers claiming 30000×30000),
//! extreme aspect ratios, empty and 100k-character texts, broken tar members.
use super::*;
use clipforge::io::image_decode::{decode_rgb8_hf, load_rgb8_hf, probe, probe_bytes};
use clipforge::io::image_prep::{preprocess, PreprocessConfig, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD};

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { (c >> 1) ^ 0xEDB8_8320 } else { c >> 1 };
        }
    }
    !c
}

fn png_chunk(out: &mut Vec<u8>, ty: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let mut body = ty.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
}

/// A small, well-formed PNG whose header says `w`×`h` RGB: one stored zlib block of zeros (the
/// rows a decoder would have to allocate are not there).
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    let n = 1024u16;
    let mut z = vec![0x78, 0x01, 0x01];
    z.extend_from_slice(&n.to_le_bytes());
    z.extend_from_slice(&(!n).to_le_bytes());
    z.extend(std::iter::repeat_n(0u8, n as usize));
    z.extend_from_slice(&(((n as u32) << 16) | 1).to_be_bytes()); // adler32 of zeros
    png_chunk(&mut out, b"IDAT", &z);
    png_chunk(&mut out, b"IEND", &[]);
    out
}

fn encoded(img: &image::RgbImage, fmt: image::ImageFormat) -> Vec<u8> {
    let mut b = vec![];
    img.write_to(&mut std::io::Cursor::new(&mut b), fmt).unwrap();
    b
}

/// Bomb headers in several formats: a real small file with its size fields set to 30000×30000.
fn bombs() -> Vec<(&'static str, Vec<u8>)> {
    let small = image::RgbImage::from_fn(16, 16, |x, y| image::Rgb([x as u8 * 9, y as u8 * 9, 7]));
    let mut jpg = encoded(&small, image::ImageFormat::Jpeg);
    let sof = jpg.windows(2).position(|w| w == [0xFF, 0xC0]).expect("baseline JPEG");
    jpg[sof + 5..sof + 9].copy_from_slice(&[0x75, 0x30, 0x75, 0x30]); // height, width (big-endian)
    let mut bmp = encoded(&small, image::ImageFormat::Bmp);
    bmp[18..22].copy_from_slice(&30000i32.to_le_bytes());
    bmp[22..26].copy_from_slice(&30000i32.to_le_bytes());
    let mut gif = encoded(&small, image::ImageFormat::Gif);
    gif[6..10].copy_from_slice(&[0x30, 0x75, 0x30, 0x75]); // logical screen (little-endian)
    vec![("bomb.png", png_claiming(30000, 30000)), ("bomb.jpg", jpg), ("bomb.bmp", bmp), ("bomb.gif", gif), ("wide.png", png_claiming(u32::MAX >> 1, 2))]
}

/// The largest resident size of any child process waited for so far, in bytes.
fn children_max_rss() -> u64 {
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes the struct it is given.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) }, 0);
    u.ru_maxrss as u64 * 1024
}

#[test]
fn decompression_bombs_are_refused_before_decoding() {
    let t = Tmp::new("bombs");
    let m = fixture("tiny");
    for (name, bytes) in bombs() {
        let e = decode_rgb8_hf(&bytes).err().unwrap_or_else(|| panic!("{name}: decoded")).to_string();
        assert!(e.contains("decompression bomb"), "{name}: {e}");
        assert!(probe_bytes(&bytes).is_err(), "{name}: probe_bytes");
        let p = t.join(name);
        std::fs::write(&p, &bytes).unwrap();
        for e in [load_rgb8_hf(&p).unwrap_err().to_string(), probe(&p).unwrap_err().to_string()] {
            assert!(e.contains(name) && !e.contains('\n'), "{name}: {e}");
        }
        let out = t.join("e.npy");
        refused(
            &[
                OsStr::new("embed-image"),
                "--device".as_ref(),
                "cpu".as_ref(),
                "--model".as_ref(),
                m.as_os_str(),
                "--out".as_ref(),
                out.as_os_str(),
                p.as_os_str(),
            ],
            &[name],
        );
        assert!(!out.exists());
        // in a training set: the up-front check (header only) names the data file's line and image
        let jsonl = t.join("d.jsonl");
        std::fs::write(&jsonl, format!("{{\"image\": \"{name}\", \"caption\": \"x\"}}\n")).unwrap();
        let samples = clipforge::train::data::read_samples(&jsonl, None).unwrap();
        let tok = clipforge::io::tokenizer::ClipTokenizer::from_file(&m, 77).unwrap();
        let e = clipforge::train::data::check(&samples, &tok, 77).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains(name), "{name}: {e}");
    }
    // the PNG bomb's header is read, its 2.7 GB of pixels never allocated
    let rss = children_max_rss();
    assert!(rss < 1 << 30, "a child reached {} MB", rss >> 20);
}

/// A `w`×`h` image of level 200 with a patch of level 77 around the centre (`r` pixels either side).
fn stripe(w: u32, h: u32, r: u32) -> image::RgbImage {
    let near = |i: u32, n: u32| (i as i64 - n as i64 / 2).abs() <= r as i64;
    image::RgbImage::from_fn(w, h, |x, y| if near(x, w) && near(y, h) { image::Rgb([77; 3]) } else { image::Rgb([200; 3]) })
}

#[test]
fn extreme_aspect_ratios_preprocess_to_the_centre() {
    let t = Tmp::new("aspect");
    let s = 224;
    let cfg = PreprocessConfig::openai(s);
    let level = |c: usize| ((77.0f64 / 255.0) as f32 - OPENAI_CLIP_MEAN[c]) / OPENAI_CLIP_STD[c];
    for (w, h) in [(1, 10000), (10000, 1), (2, 10000), (10000, 3), (1, 1)] {
        let img = decode_rgb8_hf(&encoded(&stripe(w, h, 10), image::ImageFormat::Png)).unwrap();
        let px = preprocess(&img, &cfg);
        assert_eq!(px.len(), 3 * (s * s) as usize, "{w}x{h}");
        // the centre crop of the upscaled long side lies inside the patch: every pixel is level 77
        for (i, v) in px.iter().enumerate() {
            let want = level(i / (s * s) as usize);
            assert!((v - want).abs() <= 1e-6, "{w}x{h}: pixel {i} = {v}, want {want}");
        }
    }
    // the binary on both shapes: one embedding each, finite
    let (a, b) = (t.join("tall.png"), t.join("wide.png"));
    stripe(1, 10000, 10).save(&a).unwrap();
    stripe(10000, 1, 10).save(&b).unwrap();
    let out = t.join("e.npy");
    let m = fixture("tiny");
    ok(&[
        OsStr::new("embed-image"),
        "--device".as_ref(),
        "cpu".as_ref(),
        "--model".as_ref(),
        m.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        a.as_os_str(),
        b.as_os_str(),
    ]);
    let (v, shape) = read_npy(&out).unwrap();
    assert_eq!(shape[0], 2);
    assert!(v.iter().all(|x| x.is_finite()));
}

#[test]
fn empty_and_100k_character_texts() {
    let t = Tmp::new("texts");
    let m = fixture("tiny");
    let long_word = "a".repeat(100_000);
    let long_words = "a photo of a cat ".repeat(100_000 / 17 + 1);
    let f = t.join("texts.txt");
    std::fs::write(&f, format!("\n{long_word}\n{long_words}\n \n")).unwrap();
    let out = t.join("e.npy");
    let start = std::time::Instant::now();
    let err = ok(&[
        OsStr::new("embed-text"),
        "--device".as_ref(),
        "cpu".as_ref(),
        "--model".as_ref(),
        m.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--file".as_ref(),
        f.as_os_str(),
    ]);
    assert!(start.elapsed().as_secs() < 60, "{:?}", start.elapsed());
    assert!(err.contains("note: 2 of 4 texts are longer"), "{err}");
    let (v, shape) = read_npy(&out).unwrap();
    assert_eq!(shape[0], 4);
    assert!(v.iter().all(|x| x.is_finite()));
    // the empty text and the blank one both tokenize to [SOT, EOT] alone: the same embedding
    let d = shape[1];
    let tok = clipforge::io::tokenizer::ClipTokenizer::from_file(&m, 77).unwrap();
    if tok.encode(" ").unwrap().len() == 2 {
        assert_eq!(v[..d], v[3 * d..], "empty vs blank");
    }
    // an empty text as an argument; a 100k-character label for classify
    ok(&[OsStr::new("embed-text"), "--device".as_ref(), "cpu".as_ref(), "--model".as_ref(), m.as_os_str(), "--out".as_ref(), out.as_os_str(), "".as_ref()]);
    let img = fixture("images/chelsea.png");
    let labels = format!("{long_word},cat");
    let o = cli(&[
        OsStr::new("classify"),
        "--device".as_ref(),
        "cpu".as_ref(),
        "--json".as_ref(),
        "--model".as_ref(),
        m.as_os_str(),
        "--labels".as_ref(),
        labels.as_ref(),
        img.as_os_str(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    refused(&[OsStr::new("classify"), "--model".as_ref(), m.as_os_str(), "--labels".as_ref(), " , ,".as_ref(), img.as_os_str()], &["no class names"]);
    // an error about a 100k-character text quotes a short excerpt of it, not all of it
    let e = refused(
        &[
            OsStr::new("classify"),
            "--model".as_ref(),
            m.as_os_str(),
            "--labels".as_ref(),
            "cat".as_ref(),
            "--template".as_ref(),
            long_word.as_ref(),
            img.as_os_str(),
        ],
        &["--template"],
    );
    assert!(e.len() < 1000, "an error line of {} bytes", e.len());
}

/// A member: raw name (maybe not UTF-8) and bytes.
fn mb<'a>(name: &'a [u8], data: &'a [u8]) -> (&'a [u8], &'a [u8]) {
    (name, data)
}

/// A tar of `members`.
fn tar_of(path: &Path, members: &[(&[u8], &[u8])]) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, data) in members {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, OsStr::from_bytes(name), *data).unwrap();
    }
    b.finish().unwrap();
}

#[test]
fn broken_tar_members() {
    let t = Tmp::new("tar");
    let png = std::fs::read(fixture("images/astronaut_small.png")).unwrap();
    let read = |p: &Path| clipforge::train::data::read_shards(&[p.to_path_buf()]);
    // a member name that is not UTF-8 is a sample like any other
    let p = t.join("names.tar");
    tar_of(&p, &[mb(b"k\xff0.png", &png), mb(b"k\xff0.txt", b"a cat")]);
    let s = read(&p).unwrap();
    assert_eq!((s.len(), s[0].caption.as_str()), (1, "a cat"));
    let bomb = png_claiming(30000, 30000);
    type Case<'a> = (&'a str, Vec<(&'a [u8], &'a [u8])>, &'a [&'a str]); // (shard, members, error words)
    let cases: [Case; 4] = [
        ("caption.tar", vec![mb(b"k0.png", &png), mb(b"k0.txt", b"caf\xe9")], &["member k0.txt", "not UTF-8"]),
        ("json.tar", vec![mb(b"k0.png", &png), mb(b"k0.json", b"{\"caption\": ")], &["member k0.json", "not JSON"]),
        ("array.tar", vec![mb(b"k0.png", &png), mb(b"k0.json", b"[\"a cat\"]")], &["\"k0\"", "no caption"]),
        ("bomb.tar", vec![mb(b"k0.png", &bomb), mb(b"k0.txt", b"a cat")], &["k0.png", "decompression bomb"]),
    ];
    let m = fixture("tiny");
    for (name, members, want) in cases {
        let p = t.join(name);
        tar_of(&p, &members);
        let e = match read(&p) {
            Err(e) => e.to_string(),
            Ok(s) => {
                let tok = clipforge::io::tokenizer::ClipTokenizer::from_file(&m, 77).unwrap();
                clipforge::train::data::check(&s, &tok, 77).unwrap_err().to_string()
            }
        };
        assert!(e.contains(name) && !e.contains('\n'), "{name}: {e}");
        for w in want {
            assert!(e.contains(w), "{name}: {e} (expected {w:?})");
        }
    }
    // a header whose size field claims 1 TiB (base-256): truncated, not a 1 TiB allocation
    let p = t.join("huge.tar");
    let mut h = tar::Header::new_gnu();
    h.set_path("k0.png").unwrap();
    h.set_size(1 << 40);
    h.set_mode(0o644);
    h.set_cksum();
    let mut b = h.as_bytes().to_vec();
    b.extend_from_slice(&png);
    b.extend(std::iter::repeat_n(0u8, 1024));
    std::fs::write(&p, &b).unwrap();
    let e = read(&p).unwrap_err().to_string();
    assert!(e.contains("huge.tar") && e.contains("k0.png") && e.contains("truncated"), "{e}");
    let out = t.join("out");
    refused(
        &[OsStr::new("embed-image"), "--model".as_ref(), m.as_os_str(), "--shards".as_ref(), p.as_os_str(), "--out".as_ref(), out.as_os_str()],
        &["huge.tar", "truncated"],
    );
}
