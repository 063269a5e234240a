//! NumPy .npy output (format 1.0, little-endian f32, C order), written by `io::output`'s policy
//! (a temp file and a rename; special files in place; symlinks followed).
use crate::error::{Error, Result};
use std::path::Path;

/// The bytes of an .npy file holding `data` with `shape`.
pub fn npy_bytes(data: &[f32], shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_s = if shape.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_s}, }}");
    // Pad so that magic(6) + version(2) + len(2) + header + '\n' is a multiple of 64.
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

pub fn write_npy(path: &Path, data: &[f32], shape: &[usize]) -> Result<()> {
    super::output::write_file(path, &npy_bytes(data, shape))
}

/// Reads an .npy written by `write_npy` (f32, C order) → (data, shape).
pub fn read_npy(path: &Path) -> Result<(Vec<f32>, Vec<usize>)> {
    let b = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let bad = |m: &str| Error::file(path, format!("not a float32 .npy file: {m}"));
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err(bad("bad magic"));
    }
    let hl = u16::from_le_bytes([b[8], b[9]]) as usize;
    let header = std::str::from_utf8(b.get(10..10 + hl).ok_or_else(|| bad("short header"))?).map_err(|_| bad("header"))?;
    if !header.contains("'<f4'") || header.contains("'fortran_order': True") {
        return Err(bad("dtype must be <f4, C order"));
    }
    let s = header.split("'shape': (").nth(1).and_then(|r| r.split(')').next()).ok_or_else(|| bad("no shape"))?;
    let shape: Vec<usize> = s.split(',').map(str::trim).filter(|x| !x.is_empty()).map(|x| x.parse().map_err(|_| bad("shape"))).collect::<Result<_>>()?;
    let data: Vec<f32> = b[10 + hl..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    if shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) != Some(data.len()) {
        return Err(bad("data length does not match shape"));
    }
    Ok((data, shape))
}
