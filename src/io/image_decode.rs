//! Image decoding to 8-bit RGB exactly as Pillow opens and converts files (the first step of
//! HF's CLIPImageProcessor): `decode_rgb8` = `Image.open(f).convert("RGB")`; `decode_rgb8_hf` =
//! transformers' `convert_to_rgb` (transparency composited onto white). Checked against Pillow
//! 13.0.0 byte for byte (tests/pixels.rs `every_format_decodes_like_pillow`): PNG (all modes but
//! one, palette, tRNS), BMP, GIF (palette, transparent index), TIFF (LZW), WebP (lossless, lossy,
//! lossy + alpha) through the `image` crate; JPEG through libjpeg-turbo's own decoder
//! (`jpeg_decode`, as Pillow). No EXIF rotation (as Image.open and the HF processor; transformers'
//! `load_image` would apply it).
//! Deliberate differences from Pillow (and so from HF):
//! - 16-bit grayscale (PIL mode I;16) keeps the high byte of each sample (`v >> 8`), as Pillow
//!   itself does for 16-bit RGB; Pillow clamps to 0..255 instead, which turns a typical 16-bit
//!   gray photo white.
//! - An image of more than [`MAX_PIXELS`] pixels (Pillow's `MAX_IMAGE_PIXELS`, where Pillow only
//!   warns) is refused from its header, before any pixel is decoded: a small file can claim
//!   30000×30000, and a 178-byte WebP claiming 11826×12750 made the decoders allocate 1 GB.
//! - A JPEG without its end-of-image marker after the scan data (a truncated file) is an error, as
//!   Pillow's "image file is truncated"; libjpeg alone would fill the missing rows with gray.
use crate::error::{Error, Result};
use std::path::Path;

/// The most pixels an image may have (width × height), checked from the header before decoding:
/// Pillow's `Image.MAX_IMAGE_PIXELS` (9459×9459; Pillow warns above it and refuses above twice
/// it). With it no decode allocates more than ~360 MB at once (RGBA, or WebP's own buffer).
pub const MAX_PIXELS: u64 = 89_478_485;

/// Refuses a header that claims more than [`MAX_PIXELS`] pixels (a decompression bomb).
pub fn check_pixels(w: u32, h: u32) -> Result<()> {
    let n = w as u64 * h as u64;
    if n > MAX_PIXELS {
        return Err(Error::msg(format!("image is {w}x{h} = {n} pixels, more than the limit of {MAX_PIXELS} (a decompression bomb?)")));
    }
    Ok(())
}

/// Interleaved 8-bit RGB image, row-major, `data.len() == width * height * 3`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage8 {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// Read and decode an image file exactly like PIL's `Image.open(path).convert("RGB")`.
pub fn load_rgb8(path: &Path) -> Result<RgbImage8> {
    load_with(path, false)
}

/// Like [`load_rgb8`] but what transformers' `convert_to_rgb` produces (transparency over white).
pub fn load_rgb8_hf(path: &Path) -> Result<RgbImage8> {
    load_with(path, true)
}

fn load_with(path: &Path, hf: bool) -> Result<RgbImage8> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read image: {e}")))?;
    decode(&bytes, hf).map_err(|e| Error::file(path, format!("cannot decode image: {e}")))
}

/// Checks that `path` is a readable image from its header alone (format and size; no pixel is
/// decoded) → (width, height). Fast enough to check a whole training set up front.
pub fn probe(path: &Path) -> Result<(u32, u32)> {
    let bad = |e: &dyn std::fmt::Display| Error::file(path, format!("not a readable image: {e}"));
    let r = image::ImageReader::open(path).map_err(|e| Error::file(path, format!("cannot read image: {e}")))?;
    let r = r.with_guessed_format().map_err(|e| bad(&e))?;
    let Some(fmt) = r.format() else {
        return Err(bad(&"unrecognised or unsupported image format"));
    };
    let (w, h) = match r.into_dimensions() {
        Ok(wh) => wh,
        // the image crate's JPEG header parser stops at what it cannot decode (arithmetic
        // coding's DAC marker); ask the decoder that will decode it
        Err(e) if fmt == image::ImageFormat::Jpeg => {
            let bytes = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read image: {e}")))?;
            super::jpeg_decode::jpeg_size(&bytes).map_err(|_| bad(&e))?
        }
        Err(e) => return Err(bad(&e)),
    };
    if w == 0 || h == 0 {
        return Err(bad(&format!("zero size ({w}x{h})")));
    }
    check_pixels(w, h).map_err(|e| bad(&e))?;
    Ok((w, h))
}

/// [`probe`] of image file bytes held in memory (a tar member): format and size from the header
/// alone → (width, height).
pub fn probe_bytes(bytes: &[u8]) -> Result<(u32, u32)> {
    let bad = |e: &dyn std::fmt::Display| Error::msg(format!("not a readable image: {e}"));
    let r = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| bad(&e))?;
    if r.format().is_none() {
        return Err(bad(&"unrecognised or unsupported image format"));
    }
    let (w, h) = r.into_dimensions().map_err(|e| bad(&e))?;
    if w == 0 || h == 0 {
        return Err(bad(&format!("zero size ({w}x{h})")));
    }
    check_pixels(w, h).map_err(|e| bad(&e))?;
    Ok((w, h))
}

/// Whether JPEG bytes end their scan data with the end-of-image marker (FF D9). Entropy-coded
/// data never holds a marker (an FF there is stuffed as FF 00), so a file cut inside its last
/// scan has no FF D9 after its last start-of-scan (FF DA); the last, not the first, because an
/// EXIF thumbnail before the image is a complete JPEG of its own.
fn jpeg_complete(bytes: &[u8]) -> bool {
    let Some(sos) = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]) else { return false };
    bytes[sos..].windows(2).any(|w| w == [0xFF, 0xD9])
}

/// Decode file bytes (PNG, JPEG, WebP, BMP, GIF, TIFF, ... as the `image` crate supports) to RGB8
/// like PIL's `Image.open(...).convert("RGB")`: alpha is dropped, never composited.
pub fn decode_rgb8(bytes: &[u8]) -> Result<RgbImage8> {
    decode(bytes, false)
}

/// Decode like transformers' `convert_to_rgb` (what `CLIPImageProcessor` itself does to a PIL image):
/// an image with an alpha band or a `transparency` entry (tRNS, GIF transparent index) is
/// `alpha_composite`d onto opaque white; other images are exactly [`decode_rgb8`].
pub fn decode_rgb8_hf(bytes: &[u8]) -> Result<RgbImage8> {
    decode(bytes, true)
}

fn decode(bytes: &[u8], hf: bool) -> Result<RgbImage8> {
    use image::DynamicImage as D;
    if bytes.is_empty() {
        return Err(Error::msg("file is empty"));
    }
    let fmt = image::guess_format(bytes)
        .map_err(|_| Error::msg(format!("unrecognised or unsupported image format (starts with {:02x?})", &bytes[..bytes.len().min(8)])))?;
    if fmt == image::ImageFormat::Jpeg && !jpeg_complete(bytes) {
        return Err(Error::msg("JPEG file is truncated (no end-of-image marker after the scan data)"));
    }
    let header = std::panic::catch_unwind(|| image::ImageReader::with_format(std::io::Cursor::new(bytes), fmt).into_dimensions());
    match header {
        Ok(Ok((w, h))) => check_pixels(w, h)?, // before the decoder allocates w × h pixels
        Ok(Err(image::ImageError::Limits(e))) => {
            return Err(Error::msg(format!("{fmt:?} header claims an image too large to decode ({e}; a decompression bomb?)")))
        }
        _ => {}
    }
    if fmt == image::ImageFormat::Jpeg {
        return super::jpeg_decode::decode_jpeg(bytes); // no alpha: `hf` changes nothing
    }
    let dynimg = std::panic::catch_unwind(|| image::load_from_memory_with_format(bytes, fmt))
        .map_err(|_| Error::msg(format!("{fmt:?} decoder panicked (corrupt file?)")))?
        .map_err(|e| Error::msg(format!("{fmt:?} decode failed: {e}")))?;
    let (w, h) = (dynimg.width(), dynimg.height());
    if w == 0 || h == 0 {
        return Err(Error::msg(format!("image has zero size ({w}x{h})")));
    }
    // 16-bit samples keep their high byte: what PIL does when it unpacks 16-bit PNG RGB/RGBA/LA
    // ("RGB;16B", ...) to 8 bits, and here for 16-bit gray too (PIL clamps I;16 to 255 instead).
    let hi = |v: u16| (v >> 8) as u8;
    let map16 = |v: Vec<u16>, f: &dyn Fn(u16) -> u8| v.into_iter().map(f).collect::<Vec<u8>>();
    // (channels, 8-bit samples); an even channel count means the last one is alpha.
    let (nc, s): (usize, Vec<u8>) = match dynimg {
        // "L" -> RGB replicates; "1" and 2/4-bit gray are scaled x255/x85/x17 by both PIL and png.
        D::ImageLuma8(b) => (1, b.into_raw()),
        // LA -> RGB drops alpha; an 8-bit gray PNG with tRNS also lands here (alpha 0/255).
        D::ImageLumaA8(b) => (2, b.into_raw()),
        D::ImageRgb8(b) => (3, b.into_raw()),
        // RGBA / RGB+tRNS / P+tRNS / GIF transparent index: convert("RGB") keeps the stored colour.
        D::ImageRgba8(b) => (4, b.into_raw()),
        D::ImageLuma16(b) => (1, map16(b.into_raw(), &hi)),
        D::ImageLumaA16(b) => (2, map16(b.into_raw(), &hi)),
        D::ImageRgb16(b) => (3, map16(b.into_raw(), &hi)),
        D::ImageRgba16(b) => (4, map16(b.into_raw(), &hi)),
        // Float images (EXR/HDR/float TIFF): the image crate's clamp-and-round, not checked vs PIL.
        other => (4, other.to_rgba8().into_raw()),
    };
    // Only an alpha band that is composited needs per-pixel arithmetic (over_white is the
    // identity for a = 255, checked for every level in the tests below); RGB is kept as decoded,
    // gray replicated, a dropped alpha band skipped.
    let composite = hf && nc % 2 == 0;
    let rgb: Vec<u8> = match nc {
        3 => s,
        1 => s.iter().flat_map(|&v| [v; 3]).collect(),
        _ if !composite => s.chunks_exact(nc).flat_map(|p| if nc < 3 { [p[0]; 3] } else { [p[0], p[1], p[2]] }).collect(),
        _ => {
            let mut rgb = Vec::with_capacity(w as usize * h as usize * 3);
            for p in s.chunks_exact(nc) {
                let a = p[nc - 1];
                let v = if nc < 3 { [p[0]; 3] } else { [p[0], p[1], p[2]] };
                rgb.extend(v.map(|c| over_white(c, a)));
            }
            rgb
        }
    };
    Ok(RgbImage8 { width: w, height: h, data: rgb })
}

/// Pillow `ImagingAlphaComposite` (AlphaComposite.c, 7 extra bits) of (c, a) over opaque white.
fn over_white(c: u8, a: u8) -> u8 {
    if a == 0 {
        return 255;
    }
    let (sa, c) = (a as u32, c as u32);
    let outa255 = sa * 255 + 255 * (255 - sa);
    let coef1 = sa * 255 * 255 * 128 / outa255;
    let coef2 = 255 * 128 - coef1;
    let tmp = c * coef1 + 255 * coef2 + (0x80 << 7);
    ((((tmp >> 8) + tmp) >> 8) >> 7) as u8
}

#[cfg(test)]
mod tests {
    #[test]
    fn over_white_of_an_opaque_pixel_is_the_identity() {
        for c in 0..=255u8 {
            assert_eq!(super::over_white(c, 255), c);
        }
    }
}
