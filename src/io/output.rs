//! How every output is written (.npy, file lists, SVG pictures, logs, checkpoint directories),
//! one policy in one place:
//! - a regular file (or a new path) is written to a temp file beside it, then renamed over it, so
//!   a failed run never leaves a half-written file (the old file's permissions are kept);
//! - a symlink is followed (all the way) and its final target written that way, so the link stays;
//! - an existing special file (character or block device, FIFO) is written in place (opened and
//!   written, never replaced), so `--out /dev/null` or a named pipe work and are not clobbered;
//!   a socket or a directory where a file is expected is an error.
//!
//! Files and directories are fsynced before the rename that publishes them and their folder after
//! it, so neither a crash nor a power cut leaves a published output with missing data.
//!
//! Directories (checkpoints, the fine-tuned model) are filled under a temp name beside the
//! (resolved) target and renamed into place; an old one is moved aside first and removed after,
//! and [`recover_dirs`] repairs what a crash between those steps left.
use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Follows `path` through symlinks (relative links resolved against the link's folder, at most
/// 40 hops) to the path that is really written; the result may not exist yet.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    let mut p = path.to_path_buf();
    for _ in 0..40 {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let t = std::fs::read_link(&p).map_err(|e| Error::file(&p, format!("cannot read the link: {e}")))?;
                p = parent_of(&p).join(t);
            }
            _ => return Ok(p),
        }
    }
    Err(Error::file(path, "too many levels of symbolic links"))
}

/// The folder a path lives in ("." for a bare name).
fn parent_of(p: &Path) -> PathBuf {
    p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf()
}

/// A sibling of `p` named `.NAME.<tag>-PID`.
fn sibling(p: &Path, tag: &str) -> Result<PathBuf> {
    let name = p.file_name().ok_or_else(|| Error::file(p, "not a file name"))?;
    Ok(parent_of(p).join(format!(".{}.{tag}-{}", name.to_string_lossy(), std::process::id())))
}

/// Writes `bytes` to `path` by the policy of the module docs.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let target = resolve(path)?;
    let meta = std::fs::metadata(&target).ok();
    if let Some(m) = &meta {
        use std::os::unix::fs::FileTypeExt;
        let ft = m.file_type();
        if ft.is_dir() {
            return Err(Error::file(path, "is a directory, not a file"));
        }
        if ft.is_socket() {
            return Err(Error::file(path, "is a socket; cannot write to it"));
        }
        if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
            let mut f = std::fs::OpenOptions::new().write(true).open(&target).map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
            return f.write_all(bytes).and_then(|_| f.flush()).map_err(|e| Error::file(path, format!("cannot write: {e}")));
        }
    }
    let tmp = sibling(&target, "tmp")?;
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        if let Some(m) = &meta {
            std::fs::set_permissions(&tmp, m.permissions())?;
        }
        std::fs::rename(&tmp, &target)?;
        sync_dir(&parent_of(&target))
    })();
    res.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::file(path, format!("cannot write: {e}"))
    })
}

/// Writes the directory `dir` whole: `fill` writes its files into an empty temp directory beside
/// the (symlink-resolved) target, which then replaces `dir`. Returns the directory written.
pub fn write_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    let target = resolve(dir)?;
    if target.exists() && !target.is_dir() {
        return Err(Error::file(dir, "exists and is not a directory"));
    }
    let parent = parent_of(&target);
    std::fs::create_dir_all(&parent).map_err(|e| Error::file(&parent, format!("cannot create: {e}")))?;
    let tmp = sibling(&target, "tmp")?;
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::file(&tmp, format!("cannot create: {e}")))?;
    if let Err(e) = fill(&tmp).and_then(|_| sync_tree(&tmp).map_err(|e| Error::file(&tmp, format!("cannot sync: {e}")))) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let old = sibling(&target, "old")?;
    if target.exists() {
        std::fs::rename(&target, &old).map_err(|e| Error::file(dir, format!("cannot replace: {e}")))?;
    }
    std::fs::rename(&tmp, &target).map_err(|e| Error::file(dir, format!("cannot move into place: {e}")))?;
    sync_dir(&parent).map_err(|e| Error::file(&parent, format!("cannot sync: {e}")))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(target)
}

/// fsync of a directory: its entries (a rename into it) reach the disk.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// fsync of every file under `dir`, then of the directories themselves (before the rename that
/// publishes them, so a power cut never leaves a published directory with empty files).
fn sync_tree(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let ft = e.file_type()?;
        if ft.is_dir() {
            sync_tree(&e.path())?;
        } else if ft.is_file() {
            std::fs::File::open(e.path())?.sync_all()?;
        }
    }
    sync_dir(dir)
}

/// Repairs what a crash inside [`write_dir`] left in `parent`: a complete `.NAME.old-PID` with no
/// `NAME` beside it is renamed back; an unfinished `.NAME.tmp-PID` of a process that is no longer
/// running is removed.
pub fn recover_dirs(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for e in entries.filter_map(|e| e.ok()) {
        let n = e.file_name().to_string_lossy().to_string();
        let Some(rest) = n.strip_prefix('.') else { continue };
        if let Some((name, _)) = rest.rsplit_once(".old-") {
            let target = parent.join(name);
            if !target.exists() {
                let _ = std::fs::rename(e.path(), &target);
            }
        } else if let Some((_, pid)) = rest.rsplit_once(".tmp-") {
            if pid.parse::<u32>().is_ok_and(|p| p != std::process::id() && !running(p)) && e.path().is_dir() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Whether a process `pid` exists (signal 0 probes without sending anything).
fn running(pid: u32) -> bool {
    let Ok(p) = i32::try_from(pid) else { return false };
    // SAFETY: kill with signal 0 only checks that the process exists and may be signalled.
    let r = unsafe { libc::kill(p, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}
