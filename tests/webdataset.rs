//! WebDataset tar shards (src/io/shards.rs, webdataset.rs, shard_stream.rs, src/cli/embed_shards.rs).
//! The shards are written here with the `tar` crate from tests/fixtures images (no Python, no
//! committed tar):
//! - brace patterns, `::` lists, missing shards; the key/extension grouping of members;
//! - a sample without an image, a corrupt member, a cut or corrupted tar → one-line errors that
//!   name the shard and the member (and `--skip-bad` leaves them out);
//! - `embed-image --shards` = `embed-image` on the same images as loose files (≤ 1e-6), the
//!   rank/world split, resume by skipping shards whose outputs exist;
//! - fine-tuning on shards runs the same steps, bit for bit, as on the same data as JSONL, and its
//!   data check finds a bad image up front; `eval retrieval` on shards = on the JSONL.
mod common;
mod finetune_common;
use clipforge::io::shards::{expand_braces, is_shard_spec, rank_shards, shard_list};
use clipforge::io::webdataset::{index_shard, split_key};
use common::{assert_close, fixture, tmpdir};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Writes a tar of (name, bytes) members as WebDataset writers do (GNU headers, end blocks).
fn write_tar(path: &Path, members: &[(String, Vec<u8>)]) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    for (name, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    b.finish().unwrap();
}

fn encoded(name: &str, fmt: image::ImageFormat) -> Vec<u8> {
    let img = image::open(fixture(&format!("images/{name}"))).unwrap().to_rgb8();
    let mut out = vec![];
    img.write_to(&mut std::io::Cursor::new(&mut out), fmt).unwrap();
    out
}

/// Three shards of the fixture photos (a JPEG, a WebP and the PNGs as they are, 16-bit, gray,
/// palette and RGBA among them), each sample with a .txt or a .json → (shard paths, (key, image
/// member name, bytes) in order).
fn photo_shards(d: &Path) -> (Vec<PathBuf>, Vec<(String, String, Vec<u8>)>) {
    let names =
        ["astronaut_small.png", "camera_16bit.png", "camera_gray.png", "chelsea_rgb16.png", "coffee_palette.png", "coffee_portrait.png", "rocket_rgba.png"];
    let mut imgs: Vec<(String, Vec<u8>)> =
        vec![("jpg".into(), encoded("chelsea.png", image::ImageFormat::Jpeg)), ("webp".into(), encoded("coffee_portrait.png", image::ImageFormat::WebP))];
    imgs.extend(names.iter().map(|n| ("png".to_string(), std::fs::read(fixture(&format!("images/{n}"))).unwrap())));
    let (mut shards, mut all) = (vec![], vec![]);
    for (s, chunk) in imgs.chunks(4).enumerate() {
        let mut members = vec![];
        for (i, (ext, bytes)) in chunk.iter().enumerate() {
            let key = format!("part/{s:05}{i:04}");
            members.push((format!("{key}.{ext}"), bytes.clone()));
            if i % 2 == 0 {
                members.push((format!("{key}.txt"), format!("photo {s} {i}. more words").into_bytes()));
            } else {
                members.push((format!("{key}.json"), serde_json::json!({"caption": format!("picture {s}-{i}"), "width": 1}).to_string().into_bytes()));
            }
            all.push((key.clone(), format!("{key}.{ext}"), bytes.clone()));
        }
        let p = d.join(format!("{s:05}.tar"));
        write_tar(&p, &members);
        shards.push(p);
    }
    (shards, all)
}

fn cli(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_clipforge")).args(args).output().unwrap();
    (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// A failing command whose stderr is one line holding every one of `want`.
fn one_line_error(args: &[&str], want: &[&str]) {
    let (ok, _, e) = cli(args);
    assert!(!ok, "succeeded: {args:?}");
    assert_eq!(e.trim().lines().count(), 1, "not one line: {e}");
    for w in want {
        assert!(e.contains(w), "{e:?} does not name {w:?}");
    }
}

fn npy(p: &Path) -> (Vec<f32>, Vec<usize>) {
    clipforge::io::npy::read_npy(p).unwrap()
}

#[test]
fn brace_patterns_and_shard_lists() {
    assert_eq!(expand_braces("d/{00000..00003}.tar").unwrap(), ["d/00000.tar", "d/00001.tar", "d/00002.tar", "d/00003.tar"]);
    assert_eq!(expand_braces("{a,b}-{8..10}.tar").unwrap(), ["a-8.tar", "a-9.tar", "a-10.tar", "b-8.tar", "b-9.tar", "b-10.tar"]);
    assert_eq!(expand_braces("x{3..1}").unwrap(), ["x3", "x2", "x1"]);
    assert_eq!(expand_braces("{08..010}").unwrap(), ["008", "009", "010"]);
    assert_eq!(expand_braces("plain.tar").unwrap(), ["plain.tar"]);
    for bad in ["d/{0..3.tar", "d/0..3}.tar", "d/{x}.tar", "d/{a..3}.tar", "d/{{0..1}}.tar", "{0..99999999999}"] {
        let e = expand_braces(bad).unwrap_err().to_string();
        assert!(e.contains(bad) && !e.contains('\n'), "{bad}: {e}");
    }
    assert!(is_shard_spec("d/{0..3}.tar") && is_shard_spec("a.tar") && is_shard_spec("a.tar::b.tar"));
    assert!(!is_shard_spec("train.jsonl") && !is_shard_spec("sharegpt4v.json"));
    let d = tmpdir("wds-list");
    for i in 0..3 {
        write_tar(&d.join(format!("{i}.tar")), &[]);
    }
    let p = |s: &str| format!("{}/{s}", d.display());
    let l = shard_list(&[p("{0..1}.tar") + "::" + &p("2.tar")]).unwrap();
    assert_eq!(l, (0..3).map(|i| d.join(format!("{i}.tar"))).collect::<Vec<_>>());
    assert_eq!(rank_shards(&l, 1, 2).unwrap(), [d.join("1.tar")]);
    assert!(rank_shards(&l, 2, 2).is_err());
    let e = shard_list(&[p("{0..3}.tar")]).unwrap_err().to_string();
    assert!(e.contains("3.tar") && e.contains("does not exist"), "{e}");
    assert!(shard_list(&[p("0.tar"), p("{0,1}.tar")]).unwrap_err().to_string().contains("twice"));
}

#[test]
fn members_group_into_samples_by_key() {
    assert_eq!(split_key("dir/000123.jpg"), Some(("dir/000123", "jpg")));
    assert_eq!(split_key("a.b/x.seg.png"), Some(("a.b/x", "seg.png")));
    assert_eq!(split_key("dir/.hidden"), None);
    assert_eq!(split_key("README"), None);
    let d = tmpdir("wds-group");
    let p = d.join("s.tar");
    let m = |n: &str, b: &[u8]| (n.to_string(), b.to_vec());
    write_tar(
        &p,
        &[
            m("README", b"x"),
            m("s/000.JPG", b"j"),
            m("s/000.txt", b"t"),
            m("s/000.json", b"{}"),
            m("s/001.seg.png", b"s"),
            m("s/001.webp", b"w"),
            m("s/002.txt", b"only text"),
            m("s/000.png", b"again"),
        ],
    );
    let sh = index_shard(&p).unwrap();
    let got: Vec<(String, Vec<String>)> = sh.samples.iter().map(|s| (s.key.clone(), s.members.iter().map(|(e, _)| e.clone()).collect())).collect();
    let want = [("s/000", vec!["jpg", "txt", "json"]), ("s/001", vec!["seg.png", "webp"]), ("s/002", vec!["txt"]), ("s/000", vec!["png"])];
    assert_eq!(got, want.iter().map(|(k, e)| (k.to_string(), e.iter().map(|s| s.to_string()).collect())).collect::<Vec<_>>());
    assert_eq!(sh.samples[1].image().unwrap().name, "s/001.webp");
    assert!(sh.samples[2].image().is_none());
    let t = sh.samples[0].get("txt").unwrap();
    assert_eq!(clipforge::io::webdataset::read_member(&p, t).unwrap(), b"t");
    // a second .txt for one key in one sample is an error
    write_tar(&p, &[m("a.txt", b"1"), m("a.TXT", b"2")]);
    let e = index_shard(&p).unwrap_err().to_string();
    assert!(e.contains("s.tar") && e.contains("a.TXT"), "{e}");
}

#[test]
fn embed_shards_equal_loose_files_split_by_rank_and_resume() {
    let d = tmpdir("wds-embed");
    let (shards, all) = photo_shards(&d);
    let m = fixture("tiny");
    let m = m.to_str().unwrap();
    // the same bytes as loose files, embedded the usual way
    let loose = d.join("loose");
    std::fs::create_dir_all(&loose).unwrap();
    let files: Vec<String> = all
        .iter()
        .map(|(_, name, b)| {
            let f = loose.join(name.replace('/', "_"));
            std::fs::write(&f, b).unwrap();
            f.display().to_string()
        })
        .collect();
    let want_npy = d.join("loose.npy");
    let mut a = vec!["embed-image", "--model", m, "--device", "cpu", "--batch", "3", "--out", want_npy.to_str().unwrap()];
    a.extend(files.iter().map(|s| s.as_str()));
    assert!(cli(&a).0);
    let (want, shape) = npy(&want_npy);
    let dim = shape[1];
    let pattern = format!("{}/{{00000..00002}}.tar", d.display());
    let embed = |out: &Path, extra: &[&str]| {
        let mut a = vec!["embed-image", "--model", m, "--device", "cpu", "--batch", "3", "--shards", &pattern, "--out", out.to_str().unwrap()];
        a.extend(extra);
        cli(&a)
    };
    let out = d.join("all");
    let (ok, _, e) = embed(&out, &[]);
    assert!(ok, "{e}");
    let mut row = 0;
    for s in &shards {
        let stem = s.file_stem().unwrap().to_str().unwrap();
        let (got, gshape) = npy(&out.join(format!("{stem}.npy")));
        let keys: Vec<String> = std::fs::read_to_string(out.join(format!("{stem}.keys.txt"))).unwrap().lines().map(String::from).collect();
        assert_eq!(gshape, [keys.len(), dim]);
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(k, &all[row].0);
            assert_close(&format!("{stem} row {i} ({k})"), &got[i * dim..][..dim], &want[row * dim..][..dim], 1e-6, 0.0);
            row += 1;
        }
    }
    assert_eq!(row, all.len());
    // two ranks: rank 0 gets shards 0 and 2, rank 1 shard 1; together the same files
    let split = d.join("split");
    for r in ["0", "1"] {
        let (ok, _, e) = embed(&split, &["--shard-rank", r, "--shard-world", "2"]);
        assert!(ok, "{e}");
        let names: Vec<bool> = (0..3).map(|i| split.join(format!("{i:05}.keys.txt")).exists()).collect();
        assert_eq!(names, if r == "0" { [true, false, true] } else { [true, true, true] });
    }
    for i in 0..3 {
        for ext in ["npy", "keys.txt"] {
            assert_eq!(std::fs::read(split.join(format!("{i:05}.{ext}"))).unwrap(), std::fs::read(out.join(format!("{i:05}.{ext}"))).unwrap());
        }
    }
    // resume: done shards are skipped (untouched); a shard missing its keys file is redone
    let mtime = |p: PathBuf| std::fs::metadata(p).unwrap().modified().unwrap();
    let t0 = mtime(out.join("00000.npy"));
    std::fs::remove_file(out.join("00001.keys.txt")).unwrap();
    let (ok, _, e) = embed(&out, &[]);
    assert!(ok && e.contains("2 of this rank's 3 shard(s) already have their outputs"), "{e}");
    assert_eq!(mtime(out.join("00000.npy")), t0);
    assert!(out.join("00001.keys.txt").is_file());
    let (ok, _, e) = embed(&out, &[]);
    assert!(ok && e.contains("nothing to do"), "{e}");
    // --out a file, a bad rank
    one_line_error(&["embed-image", "--model", m, "--shards", &pattern, "--out", want_npy.to_str().unwrap()], &["loose.npy", "directory"]);
    one_line_error(
        &["embed-image", "--model", m, "--shards", &pattern, "--out", split.to_str().unwrap(), "--shard-rank", "2", "--shard-world", "2"],
        &["--shard-rank 2"],
    );
    one_line_error(&["embed-image", "--model", m, "--out", split.to_str().unwrap(), "--shard-rank", "1", &files[0]], &["--shards"]);
}

/// A shard with a good sample, a sample without an image, and (optionally) a corrupt image.
fn bad_shard(d: &Path, corrupt: bool) -> PathBuf {
    let png = std::fs::read(fixture("images/astronaut_small.png")).unwrap();
    let mut members = vec![("k0.png".to_string(), png.clone()), ("k0.txt".into(), b"fine".to_vec()), ("k1.txt".into(), b"no image here".to_vec())];
    if corrupt {
        members.extend([("k2.png".to_string(), b"\x89PNG\r\n\x1a\ngarbage".to_vec()), ("k2.txt".into(), b"bad".to_vec())]);
    }
    members.extend([("k3.png".to_string(), png), ("k3.txt".into(), b"fine too".to_vec())]);
    let p = d.join(if corrupt { "corrupt.tar" } else { "noimage.tar" });
    write_tar(&p, &members);
    p
}

#[test]
fn bad_samples_and_bad_tars_are_one_line_errors() {
    let d = tmpdir("wds-bad");
    let m = fixture("tiny");
    let m = m.to_str().unwrap();
    let out = d.join("out");
    let o = out.to_str().unwrap();
    let noimg = bad_shard(&d, false);
    one_line_error(&["embed-image", "--model", m, "--shards", noimg.to_str().unwrap(), "--out", o], &["noimage.tar", "\"k1\"", "no image"]);
    let corrupt = bad_shard(&d, true);
    one_line_error(&["embed-image", "--model", m, "--shards", corrupt.to_str().unwrap(), "--out", o], &["corrupt.tar", "\"k1\""]);
    // --skip-bad: the good samples are written, each bad one named
    let (ok, _, e) = cli(&["embed-image", "--model", m, "--shards", corrupt.to_str().unwrap(), "--out", o, "--skip-bad"]);
    assert!(ok && e.contains("skipped: ") && e.contains("member k2.png") && e.contains("\"k1\"") && e.contains("2 sample(s) skipped"), "{e}");
    assert_eq!(std::fs::read_to_string(out.join("corrupt.keys.txt")).unwrap(), "k0\nk3\n");
    assert_eq!(npy(&out.join("corrupt.npy")).1, [2, 24]);
    // cut and corrupted tars, from a good one
    let good = std::fs::read(d.join("noimage.tar")).unwrap();
    let png_len = std::fs::metadata(fixture("images/astronaut_small.png")).unwrap().len() as usize;
    // k0.png at 0 (header) and 512 (data, P bytes padded), k0.txt at 512+P, k1.txt at 1536+P,
    // k3.png at 2560+P (data at 3072+P), k3.txt at 3072+2P, the end blocks at 4096+2P
    let pp = png_len.div_ceil(512) * 512;
    let cases: [(&str, Vec<u8>, &[&str]); 4] = [
        ("mid-data", good[..3072 + pp + pp / 2].to_vec(), &["member k3.png", "truncated"]),
        ("at-boundary", good[..4096 + 2 * pp].to_vec(), &["k3.txt", "end-of-archive"]),
        ("mid-header", good[..1536 + pp + 200].to_vec(), &["after member k0.txt"]),
        (
            "bad-checksum",
            {
                let mut g = good.clone();
                g[512 + pp + 3] ^= 0x55;
                g
            },
            &["after member k0.png", "checksum"],
        ),
    ];
    for (name, bytes, want) in cases {
        let p = d.join(format!("{name}.tar"));
        std::fs::write(&p, bytes).unwrap();
        let mut w = vec![p.file_name().unwrap().to_str().unwrap()];
        w.extend(want);
        one_line_error(&["embed-image", "--model", m, "--shards", p.to_str().unwrap(), "--out", o], &w);
        one_line_error(&["eval", "retrieval", "--model", m, "--data", p.to_str().unwrap(), "--no-cache"], &w);
        // --skip-bad: a shard that cannot be indexed is left without outputs, to be retried
        let (ok, _, e) = cli(&["embed-image", "--model", m, "--shards", p.to_str().unwrap(), "--out", o, "--skip-bad"]);
        assert!(ok && e.contains("skipped shard") && !out.join(format!("{name}.npy")).exists(), "{e}");
    }
}

/// The 16 Long-CLIP fixture samples as JSONL and as three shards → (jsonl, shard pattern).
fn training_data(d: &Path, bad_image_at: Option<usize>) -> (PathBuf, String) {
    let text = std::fs::read_to_string(fixture("longclip/train.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut lines = vec![];
    let mut shards: Vec<Vec<(String, Vec<u8>)>> = vec![vec![]; 3];
    for (i, r) in rows.iter().enumerate() {
        let img = fixture("longclip").join(r["image"].as_str().unwrap());
        let mut v = r.clone();
        v["image"] = img.display().to_string().into();
        lines.push(v.to_string());
        let key = format!("{i:06}");
        let bytes = if bad_image_at == Some(i) { b"not an image".to_vec() } else { std::fs::read(&img).unwrap() };
        let s = &mut shards[i * 3 / rows.len()];
        s.push((format!("{key}.png"), bytes));
        // the long caption in the .txt, the short one (where given) in the .json
        s.push((format!("{key}.txt"), r["caption"].as_str().unwrap().as_bytes().to_vec()));
        if let Some(sc) = r.get("short_caption") {
            s.push((format!("{key}.json"), serde_json::json!({"short_caption": sc}).to_string().into_bytes()));
        }
    }
    let jsonl = d.join("train.jsonl");
    std::fs::write(&jsonl, lines.join("\n") + "\n").unwrap();
    for (i, m) in shards.iter().enumerate() {
        write_tar(&d.join(format!("train-{i}.tar")), m);
    }
    (jsonl, format!("{}/train-{{0..2}}.tar", d.display()))
}

#[test]
fn finetune_on_shards_runs_the_same_steps_as_on_jsonl() {
    use clipforge::train::trainer::run;
    let d = tmpdir("wds-finetune");
    let model = finetune_common::stretched(&d);
    let (jsonl, pattern) = training_data(&d, None);
    let a = clipforge::train::data::read_data(&jsonl, None).unwrap();
    let b = clipforge::train::data::read_data(Path::new(&pattern), None).unwrap();
    assert_eq!(a.len(), 16);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((&x.caption, &x.short_caption), (&y.caption, &y.short_caption));
        assert!(y.at.contains("train-") && y.at.contains("sample"), "{}", y.at);
    }
    let mut logs = vec![];
    for (name, data) in [("jsonl", jsonl.clone()), ("shards", PathBuf::from(&pattern))] {
        let out = d.join(name);
        let mut cfg = finetune_common::config(&model, &out, 4, 1);
        (cfg.data, cfg.max_steps, cfg.save_every) = (data, Some(3), 0);
        let r = run(&cfg, None, finetune_common::no_stop(), true).unwrap();
        logs.push(r.steps.iter().map(|s| (s.step, s.loss, s.loss_long, s.loss_short, s.lr)).collect::<Vec<_>>());
    }
    // a sample without an image, one without a caption: errors naming the shard and the key
    let e = clipforge::train::data::read_data(&bad_shard(&d, false), None).unwrap_err().to_string();
    assert!(e.contains("noimage.tar") && e.contains("\"k1\"") && e.contains("no image"), "{e}");
    write_tar(&d.join("nocap.tar"), &[("k.png".into(), std::fs::read(fixture("images/chelsea.png")).unwrap()), ("k.json".into(), b"{}".to_vec())]);
    let e = clipforge::train::data::read_data(&d.join("nocap.tar"), None).unwrap_err().to_string();
    assert!(e.contains("nocap.tar") && e.contains("\"k\"") && e.contains("no caption"), "{e}");
    assert_eq!(logs[0].len(), 3);
    assert_eq!(logs[0], logs[1], "fine-tuning on shards differs from the same data as JSONL");
    // the CLI, and its data check: a bad image in a shard is found before the first step
    let bad = d.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    let (_, bad_pattern) = training_data(&bad, Some(9));
    let out = d.join("out-bad");
    let args = [
        "finetune",
        "--model",
        model.to_str().unwrap(),
        "--data",
        &bad_pattern,
        "--out",
        out.to_str().unwrap(),
        "--batch",
        "4",
        "--device",
        "cpu",
        "--pca-dim",
        "2",
        "--max-steps",
        "1",
    ];
    one_line_error(&args, &["train-1.tar", "member 000009.png", "not a readable image"]);
    assert!(!out.join("checkpoints").exists());
    let out = d.join("out-cli");
    let (ok, so, e) = cli(&[
        "finetune",
        "--model",
        model.to_str().unwrap(),
        "--data",
        &pattern,
        "--out",
        out.to_str().unwrap(),
        "--batch",
        "4",
        "--device",
        "cpu",
        "--pca-dim",
        "2",
        "--max-steps",
        "2",
        "--json",
    ]);
    assert!(ok && so.contains("\"steps\":2"), "{so}{e}");
}

#[test]
fn eval_retrieval_on_shards_equals_the_jsonl() {
    let d = tmpdir("wds-eval");
    let (shards, all) = photo_shards(&d);
    assert_eq!(shards.len(), 3);
    // the same images as files, with the captions each sample's .txt / .json holds
    let mut lines = vec![];
    for (i, (_, name, b)) in all.iter().enumerate() {
        let f = d.join(name.replace('/', "_"));
        std::fs::write(&f, b).unwrap();
        let (s, k) = (i / 4, i % 4);
        let cap = if k % 2 == 0 { format!("photo {s} {k}. more words") } else { format!("picture {s}-{k}") };
        lines.push(serde_json::json!({"image": f, "caption": cap}).to_string());
    }
    let jsonl = d.join("ret.jsonl");
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    let m = fixture("tiny");
    let run = |data: &str| {
        let (ok, so, e) = cli(&[
            "eval",
            "retrieval",
            "--model",
            m.to_str().unwrap(),
            "--device",
            "cpu",
            "--data",
            data,
            "--no-cache",
            "--plot",
            d.join("r.svg").to_str().unwrap(),
            "--json",
        ]);
        assert!(ok, "{e}");
        let mut v: serde_json::Value = serde_json::from_str(&so).unwrap();
        v.as_object_mut().unwrap().remove("plot");
        v
    };
    let a = run(jsonl.to_str().unwrap());
    let b = run(&format!("{}/{{00000..00002}}.tar", d.display()));
    assert_eq!(a["images"], 9);
    assert_eq!(a, b);
}
