//! Where an image's bytes are: a file, or a member of a WebDataset tar shard (src/io/webdataset.rs).
//! Both decode through the same `image_decode` functions, so an image gives the same pixels
//! whether it is a loose file or a tar member.
use super::image_decode::{decode_rgb8_hf, load_rgb8_hf, probe, probe_bytes, RgbImage8};
use super::webdataset::{read_member, read_prefix, Member};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An image file, or a member of a tar shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageSource {
    File(PathBuf),
    Member { shard: Arc<Path>, member: Member },
}

/// Bytes read to probe a member's header before reading all of it.
const PROBE_PREFIX: u64 = 64 << 10;

impl ImageSource {
    /// The file's path (`None` for a tar member).
    pub fn path(&self) -> Option<&Path> {
        match self {
            ImageSource::File(p) => Some(p),
            ImageSource::Member { .. } => None,
        }
    }

    /// The file or member bytes.
    pub fn read(&self) -> Result<Vec<u8>> {
        match self {
            ImageSource::File(p) => std::fs::read(p).map_err(|e| Error::file(p, format!("cannot read image: {e}"))),
            ImageSource::Member { shard, member } => read_member(shard, member),
        }
    }

    /// Decoded as `image_decode::load_rgb8_hf` does a file (transparency over white); an error
    /// names the file, or the shard and member.
    pub fn load_rgb8_hf(&self) -> Result<RgbImage8> {
        match self {
            ImageSource::File(p) => load_rgb8_hf(p),
            ImageSource::Member { shard, member } => {
                let bytes = read_member(shard, member)?;
                decode_rgb8_hf(&bytes).map_err(|e| self.err(format!("cannot decode image: {e}")))
            }
        }
    }

    /// Checks the header alone (format and size) → (width, height), as `image_decode::probe`.
    pub fn probe(&self) -> Result<(u32, u32)> {
        match self {
            ImageSource::File(p) => probe(p),
            ImageSource::Member { shard, member } => {
                let head = read_prefix(shard, member, PROBE_PREFIX)?;
                match probe_bytes(&head) {
                    Ok(wh) => Ok(wh),
                    // a header longer than the prefix (a large EXIF or ICC block): read it all
                    Err(_) if member.len > PROBE_PREFIX => probe_bytes(&read_member(shard, member)?),
                    Err(e) => Err(e),
                }
                .map_err(|e| self.err(e.message()))
            }
        }
    }

    /// An error about this image: "FILE: msg" or "SHARD: member NAME: msg".
    pub fn err(&self, msg: impl std::fmt::Display) -> Error {
        match self {
            ImageSource::File(p) => Error::file(p, msg),
            ImageSource::Member { shard, member } => Error::file(shard, format!("member {}: {msg}", member.name)),
        }
    }
}

impl std::fmt::Display for ImageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageSource::File(p) => write!(f, "{}", p.display()),
            ImageSource::Member { shard, member } => write!(f, "{}:{}", shard.display(), member.name),
        }
    }
}
