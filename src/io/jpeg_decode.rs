//! JPEG decoding bit-exact with Pillow, which decodes through libjpeg-turbo: the same library code
//! (libjpeg-turbo's decoder as vendored by `mozjpeg-sys`, compiled from C by `cc` with no SIMD and
//! no nasm) with Pillow's settings: ISLOW integer IDCT, fancy (triangle) chroma upsampling, block
//! smoothing of progressive scans, libjpeg's YCbCr→RGB tables. Checked against Pillow 13.0.0
//! (libjpeg-turbo 3.2.0) on tests/fixtures/formats (baseline 4:2:0, 4:2:2, 4:4:4, progressive,
//! grayscale, CMYK): identical bytes. Grayscale is replicated to RGB (PIL `convert("RGB")` of mode
//! L). CMYK and YCCK (4 components) follow Pillow: libjpeg's CMYK output read as Adobe-inverted
//! (`CMYK;I`), then Pillow's `cmyk2rgb`. Arithmetic-coded files decode too (libjpeg-turbo's
//! arith_dec, which Pillow's build has).
//!
//! libjpeg reports a fatal error through `error_exit`, whose default calls `exit()`; the `mozjpeg`
//! crate installs one that unwinds (the C is compiled with `-fexceptions`), caught here and turned
//! into an `Error`. Warnings (corrupt entropy data, missing markers) are silent and decoding goes
//! on, as in Pillow. A file cut inside its scan data is rejected before decoding (see
//! `image_decode::jpeg_complete`): libjpeg would pad it with gray, Pillow raises "truncated".
use super::image_decode::RgbImage8;
use crate::error::{Error, Result};
use mozjpeg::{ColorSpace, DctMethod, Decompress};

// The decompression-bomb limit of src/io/image_decode.rs (Pillow's MAX_IMAGE_PIXELS).
use super::image_decode::MAX_PIXELS;

/// Decode JPEG bytes to RGB8 exactly as Pillow's `Image.open(f).convert("RGB")`.
pub(crate) fn decode_jpeg(bytes: &[u8]) -> Result<RgbImage8> {
    guarded(|| decode_unguarded(bytes))
}

/// (width, height) from the JPEG headers alone (libjpeg's `jpeg_read_header`).
pub(crate) fn jpeg_size(bytes: &[u8]) -> Result<(u32, u32)> {
    guarded(|| {
        let d = Decompress::new_mem(bytes).map_err(|e| Error::msg(format!("JPEG header: {e}")))?;
        Ok((d.width() as u32, d.height() as u32))
    })
}

/// Runs libjpeg code, turning its fatal errors into an `Error`.
fn guarded<T>(f: impl FnOnce() -> Result<T> + std::panic::UnwindSafe) -> Result<T> {
    // libjpeg's fatal errors unwind out of the C code as a String payload (not a panic: no hook).
    match std::panic::catch_unwind(f) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload.downcast_ref::<String>().map(String::as_str).or_else(|| payload.downcast_ref::<&str>().copied()).unwrap_or("libjpeg failed");
            Err(Error::msg(format!("JPEG decode failed: {}", msg.trim_start_matches("libjpeg fatal error: "))))
        }
    }
}

fn decode_unguarded(bytes: &[u8]) -> Result<RgbImage8> {
    let io = |e: std::io::Error| Error::msg(format!("JPEG decode failed: {e}"));
    let mut d = Decompress::new_mem(bytes).map_err(io)?;
    let (w, h) = (d.width(), d.height());
    if w == 0 || h == 0 {
        return Err(Error::msg(format!("image has zero size ({w}x{h})")));
    }
    if w as u64 * h as u64 > MAX_PIXELS {
        return Err(Error::msg(format!("image is {w}x{h}, more than {MAX_PIXELS} pixels (Pillow's decompression-bomb limit)")));
    }
    // Pillow's JpegDecode.c leaves both at libjpeg's defaults; set them anyway: they are the contract.
    d.dct_method(DctMethod::IntegerSlow);
    d.do_fancy_upsampling(true);
    let cmyk = d.components().len() == 4;
    let mut s = if cmyk {
        d.to_colorspace(ColorSpace::JCS_CMYK).map_err(io)?
    } else {
        d.rgb().map_err(io)? // 1 component: gray replicated, 3: YCbCr (or RGB) -> RGB
    };
    let samples: Vec<u8> = s.read_scanlines().map_err(io)?; // [h, w, 4 or 3]
    s.finish().map_err(io)?;
    let data = if cmyk { samples.chunks_exact(4).flat_map(cmyk_inverted_to_rgb).collect() } else { samples };
    if data.len() != w * h * 3 {
        return Err(Error::msg(format!("JPEG decode failed: {} samples for {w}x{h}", data.len())));
    }
    Ok(RgbImage8 { width: w as u32, height: h as u32, data })
}

/// Pillow's unpack `CMYK;I` (Adobe files store inverted ink) then Convert.c `cmyk2rgb`:
/// `nk = 255 - k; c' = clip(nk - muldiv255(c, nk))` with `muldiv255(a, b) = t = a*b + 128;
/// ((t >> 8) + t) >> 8`.
fn cmyk_inverted_to_rgb(p: &[u8]) -> [u8; 3] {
    let nk = p[3] as i32; // 255 - (255 - k)
    let ch = |v: u8| {
        let t = (255 - v as i32) * nk + 128;
        (nk - (((t >> 8) + t) >> 8)).clamp(0, 255) as u8
    };
    [ch(p[0]), ch(p[1]), ch(p[2])]
}
