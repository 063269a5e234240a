//! How outputs are written (src/io/output.rs): a device, a FIFO or a symlink named as `--out`,
//! `--plot` or a checkpoint path is written through, never replaced by a regular file; a regular
//! file is replaced whole.
mod common;
use clipforge::io::npy::read_npy;
use common::{fixture, tmpdir};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::Command;

fn ok(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_clipforge")).args(args).output().unwrap();
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn kind(p: &Path) -> std::fs::FileType {
    std::fs::symlink_metadata(p).unwrap().file_type()
}

/// `mknod NAME c 1 3` (a /dev/null twin); None where that is not allowed (not root).
fn null_device(p: &Path) -> Option<()> {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path; mknod only creates a node.
    let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    (r == 0).then_some(())
}

#[test]
fn a_device_given_as_out_or_plot_stays_a_device() {
    let d = tmpdir("out-dev");
    let dev = d.join("fakenull");
    if null_device(&dev).is_none() {
        eprintln!("skipped: mknod needs root");
        return;
    }
    let m = fixture("tiny");
    ok(&["embed-text", "--model", m.to_str().unwrap(), "--out", dev.to_str().unwrap(), "a cat"]);
    assert!(kind(&dev).is_char_device(), "--out replaced the device");
    let root = d.join("folder");
    for c in ["red", "blue"] {
        std::fs::create_dir_all(root.join(c)).unwrap();
        std::fs::copy(fixture("longclip/img_000.png"), root.join(c).join("a.png")).unwrap();
    }
    ok(&[
        "eval",
        "zeroshot",
        "--model",
        m.to_str().unwrap(),
        "--data",
        root.to_str().unwrap(),
        "--templates",
        "simple",
        "--no-cache",
        "--plot",
        dev.to_str().unwrap(),
        "--json",
    ]);
    assert!(kind(&dev).is_char_device(), "--plot replaced the device");
    assert!(std::fs::read_dir(&d).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains(".tmp")), "a temp file was left");
}

#[test]
fn a_fifo_given_as_out_is_written_through() {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let d = tmpdir("out-fifo");
    let fifo = d.join("pipe.npy");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    // the reading end, opened first without blocking: the writer's open then succeeds at once,
    // and a run that replaced the FIFO instead leaves this end with nothing to read (no hang)
    let mut reader = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&fifo).unwrap();
    let m = fixture("tiny");
    ok(&["embed-text", "--model", m.to_str().unwrap(), "--out", fifo.to_str().unwrap(), "a cat"]);
    let mut bytes = vec![];
    let _ = reader.read_to_end(&mut bytes);
    assert!(kind(&fifo).is_fifo(), "--out replaced the FIFO");
    assert!(bytes.starts_with(b"\x93NUMPY"), "the pipe got {} bytes, not an .npy", bytes.len());
}

#[test]
fn a_symlink_is_followed_and_kept() {
    let d = tmpdir("out-link");
    let real = d.join("real");
    std::fs::create_dir_all(&real).unwrap();
    let (target, link) = (real.join("e.npy"), d.join("link.npy"));
    std::fs::write(&target, "old").unwrap();
    std::os::unix::fs::symlink("real/e.npy", &link).unwrap();
    let m = fixture("tiny");
    ok(&["embed-text", "--model", m.to_str().unwrap(), "--out", link.to_str().unwrap(), "a cat"]);
    assert!(kind(&link).is_symlink(), "--out replaced the symlink");
    assert_eq!(read_npy(&target).unwrap().1, vec![1, 24], "the link's target was not written");
    // a dangling link: its target is created
    let (dangling, plot) = (d.join("plot.svg"), real.join("r.svg"));
    std::os::unix::fs::symlink(&plot, &dangling).unwrap();
    let data = d.join("ret.jsonl");
    std::fs::write(&data, format!("{}\n", serde_json::json!({"image": fixture("longclip/img_000.png"), "caption": "a red square"}))).unwrap();
    ok(&["eval", "retrieval", "--model", m.to_str().unwrap(), "--data", data.to_str().unwrap(), "--no-cache", "--plot", dangling.to_str().unwrap()]);
    assert!(kind(&dangling).is_symlink() && std::fs::read_to_string(&plot).unwrap().starts_with("<svg"));
}

#[test]
fn checkpoint_paths_follow_symlinks_and_refuse_other_files() {
    use clipforge::io::output::{write_dir, write_file};
    let d = tmpdir("out-dir");
    let elsewhere = d.join("big-disk/step-000001");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("stale"), "x").unwrap();
    let ck = d.join("checkpoints/step-000001");
    std::fs::create_dir_all(ck.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &ck).unwrap();
    let model = clipforge::train::model::TrainClip::load_dir(&fixture("tiny")).unwrap();
    clipforge::train::checkpoint::save(&ck, &fixture("tiny"), &model.params, None, None).unwrap();
    assert!(kind(&ck).is_symlink(), "the checkpoint's symlink was replaced");
    assert!(elsewhere.join("model.safetensors").is_file() && !elsewhere.join("stale").exists());
    let fifo = d.join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let e = write_dir(&fifo, |_| Ok(())).unwrap_err().to_string();
    assert!(e.contains("not a directory") && kind(&fifo).is_fifo(), "{e}");
    let e = write_file(&d, b"x").unwrap_err().to_string();
    assert!(e.contains("is a directory"), "{e}");
    // a regular file is replaced whole and keeps its permissions
    use std::os::unix::fs::PermissionsExt;
    let f = d.join("f.txt");
    std::fs::write(&f, "old contents").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    write_file(&f, b"new").unwrap();
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "new");
    assert_eq!(std::fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o600);
}
