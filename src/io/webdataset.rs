//! WebDataset tar shards, read in place: [`index_shard`] scans a shard's tar headers (seeking
//! over the member data, nothing unpacked to disk) and groups the regular-file members into
//! samples by key as WebDataset does: a member's key is its path up to the first dot of its base
//! name and its extension the rest, lower-cased (`dir/000123.jpg` → key `dir/000123`, extension
//! `jpg`; `a.seg.png` → `a`, `seg.png`); consecutive members with the same key form one sample.
//! Members without an extension (or whose base name starts with a dot) and non-file entries are
//! ignored. [`read_member`] reads one member's bytes by offset.
//!
//! A shard must be a whole tar: a header with a bad checksum, a member whose data runs past the
//! end of the file, or a file that ends without the end-of-archive block (a truncated copy) is a
//! one-line error naming the shard and the member it stopped at.
use crate::error::{Error, Result};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;

/// Image extensions of a sample, in the order one is chosen when a sample holds several.
pub const IMAGE_EXTS: [&str; 8] = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"];

/// One member of a shard: its name in the tar and where its data lies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The member's path in the tar.
    pub name: String,
    /// Byte offset of its data in the shard.
    pub offset: u64,
    /// Its size in bytes.
    pub len: u64,
}

/// The members of one sample (one key), by lower-cased extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WdsSample {
    pub key: String,
    /// (extension, member), in tar order.
    pub members: Vec<(String, Member)>,
}

impl WdsSample {
    /// The member with extension `ext` (lower case).
    pub fn get(&self, ext: &str) -> Option<&Member> {
        self.members.iter().find(|(e, _)| e == ext).map(|(_, m)| m)
    }

    /// The sample's image: the first of [`IMAGE_EXTS`] it has.
    pub fn image(&self) -> Option<&Member> {
        IMAGE_EXTS.iter().find_map(|e| self.get(e))
    }
}

/// A shard's samples, in tar order.
#[derive(Clone, Debug)]
pub struct Shard {
    pub path: Arc<Path>,
    pub samples: Vec<WdsSample>,
}

/// WebDataset's key/extension split of a member path (`None`: no extension, or a base name that
/// starts with a dot).
pub fn split_key(name: &str) -> Option<(&str, &str)> {
    let base_at = name.rfind('/').map(|i| i + 1).unwrap_or(0);
    let dot = name[base_at..].find('.')?;
    if dot == 0 {
        return None;
    }
    Some((&name[..base_at + dot], &name[base_at + dot + 1..]))
}

const BLOCK: u64 = 512;

/// Indexes a shard: its samples with the offset and size of every member.
pub fn index_shard(path: &Path) -> Result<Shard> {
    let file = std::fs::File::open(path).map_err(|e| Error::file(path, format!("cannot open shard: {e}")))?;
    let file_len = file.metadata().map_err(|e| Error::file(path, format!("cannot read shard: {e}")))?.len();
    if file_len == 0 {
        return Err(Error::file(path, "shard is empty (not a tar)"));
    }
    let mut ar = tar::Archive::new(std::io::BufReader::with_capacity(BLOCK as usize * 2, file));
    let entries = ar.entries_with_seek().map_err(|e| Error::file(path, format!("not a tar: {e}")))?;
    let mut samples: Vec<WdsSample> = vec![];
    // (name, end of its data rounded up to a block) of the last entry read
    let mut last: Option<(String, u64)> = None;
    let after = |last: &Option<(String, u64)>| match last {
        Some((n, _)) => format!("after member {n}"),
        None => "at its first header".to_string(),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::file(path, format!("corrupt or truncated tar {}: {e}", after(&last))))?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let (offset, len) = (entry.raw_file_position(), entry.size());
        let end = offset.saturating_add(len);
        if end > file_len {
            return Err(Error::file(path, format!("member {name}: truncated ({len} bytes at byte {offset}, but the shard ends at byte {file_len})")));
        }
        last = Some((name.clone(), end.div_ceil(BLOCK) * BLOCK));
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let Some((key, ext)) = split_key(&name) else { continue };
        let ext = ext.to_lowercase();
        let m = Member { name: name.clone(), offset, len };
        match samples.last_mut() {
            Some(s) if s.key == key => {
                if s.get(&ext).is_some() {
                    return Err(Error::file(path, format!("member {name}: a second .{ext} for key {key:?} in one sample")));
                }
                s.members.push((ext, m));
            }
            _ => samples.push(WdsSample { key: key.to_string(), members: vec![(ext, m)] }),
        }
    }
    // The entries end at a zero block or at the end of the file; only a whole tar has the former.
    let end = last.as_ref().map(|l| l.1).unwrap_or(0);
    if file_len < end + BLOCK {
        return Err(Error::file(path, format!("truncated tar: it ends {} without the end-of-archive block", after(&last))));
    }
    Ok(Shard { path: Arc::from(path), samples })
}

/// A member's bytes.
pub fn read_member(shard: &Path, m: &Member) -> Result<Vec<u8>> {
    read_prefix(shard, m, m.len)
}

/// The first `max` bytes of a member (all of it if shorter).
pub fn read_prefix(shard: &Path, m: &Member, max: u64) -> Result<Vec<u8>> {
    let bad = |e: std::io::Error| Error::file(shard, format!("member {}: cannot read: {e}", m.name));
    let mut f = std::fs::File::open(shard).map_err(|e| Error::file(shard, format!("cannot open shard: {e}")))?;
    f.seek(SeekFrom::Start(m.offset)).map_err(bad)?;
    let n = m.len.min(max);
    let mut buf = vec![0u8; usize::try_from(n).map_err(|_| Error::file(shard, format!("member {}: too large ({n} bytes)", m.name)))?];
    f.read_exact(&mut buf).map_err(bad)?;
    Ok(buf)
}

/// A text member (`.txt`) as UTF-8.
pub fn read_text(shard: &Path, m: &Member) -> Result<String> {
    String::from_utf8(read_member(shard, m)?).map_err(|e| Error::file(shard, format!("member {}: not UTF-8 text: {e}", m.name)))
}

/// A JSON member (`.json`).
pub fn read_json(shard: &Path, m: &Member) -> Result<serde_json::Value> {
    serde_json::from_slice(&read_member(shard, m)?).map_err(|e| Error::file(shard, format!("member {}: not JSON: {e}", m.name)))
}

/// The error for a sample without an image member.
pub fn no_image(shard: &Path, s: &WdsSample) -> Error {
    let has: Vec<&str> = s.members.iter().map(|(e, _)| e.as_str()).collect();
    Error::file(shard, format!("sample {:?} has no image member ({}; it has {})", s.key, IMAGE_EXTS.join(", "), has.join(", ")))
}
