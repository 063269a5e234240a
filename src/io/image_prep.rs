//! CLIP image preprocessing matching Hugging Face's slow `CLIPImageProcessor` (the PIL/NumPy
//! backend, `CLIPImageProcessorPil` in transformers 5.x) and Pillow, bit for bit.
//! Checked against Pillow 13.0.0 + transformers 5.25.0 (tests/pixels.rs on tests/fixtures, zero
//! differing bytes; fixtures from scripts/make_fixtures.py and scripts/make_format_fixtures.py):
//! * decoding to RGB8 (PIL's open + convert, or HF's convert_to_rgb): see `image_decode`;
//! * `resize_bicubic_pillow` = `Image.resize((w, h), Image.BICUBIC)`, bit-exact on 8-bit RGB,
//!   including Pillow 13's pass order (vertical first for some shapes; Pillow <= 12 always ran
//!   the horizontal pass first), checked on adversarial synthetic images;
//! * `preprocess_u8` = resize shortest edge + center crop (zero padding): HF's uint8 image;
//! * `preprocess` = that, rescaled and normalised: HF's f32 values (every level checked).
pub use super::image_decode::{decode_rgb8, decode_rgb8_hf, load_rgb8, load_rgb8_hf, RgbImage8};
use crate::error::{Error, Result};
use serde_json::Value;

/// The preprocessing parameters of a HF `preprocessor_config.json` (BICUBIC resampling only).
#[derive(Clone, Debug, PartialEq)]
pub struct PreprocessConfig {
    pub shortest_edge: u32,
    /// HF `size = {"height": h, "width": w}` (or `[h, w]`): resize to exactly (h, w), aspect
    /// ratio not kept; when `Some`, `shortest_edge` is ignored.
    pub size_hw: Option<(u32, u32)>,
    pub crop_h: u32,
    pub crop_w: u32,
    pub do_resize: bool,
    pub do_center_crop: bool,
    pub do_rescale: bool,
    pub rescale_factor: f32,
    pub do_normalize: bool,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub do_convert_rgb: bool,
}

#[allow(clippy::excessive_precision)] // the literals HF uses (image_utils.OPENAI_CLIP_*)
pub const OPENAI_CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
pub const OPENAI_CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

impl PreprocessConfig {
    /// OpenAI CLIP defaults: shortest edge `size`, `size`x`size` center crop, 1/255, OpenAI mean/std.
    pub fn openai(size: u32) -> Self {
        PreprocessConfig {
            shortest_edge: size,
            size_hw: None,
            crop_h: size,
            crop_w: size,
            do_resize: true,
            do_center_crop: true,
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            mean: OPENAI_CLIP_MEAN,
            std: OPENAI_CLIP_STD,
            do_convert_rgb: true,
        }
    }

    /// Parse a HF `preprocessor_config.json`. Missing (or null) keys take CLIPImageProcessor's
    /// defaults. `size`: int (shortest edge, CLIP's default_to_square=False), `{"shortest_edge"}`,
    /// `{"height","width"}` or `[h, w]`; `crop_size`: int (square), `{"height","width"}` or `[h, w]`.
    pub fn from_json_str(s: &str) -> Result<Self> {
        const E: &str = "preprocessor config";
        let v: Value = serde_json::from_str(s).map_err(|e| Error::msg(format!("{E}: invalid JSON: {e}")))?;
        let Some(obj) = v.as_object() else { return Err(Error::msg(format!("{E}: top level is not an object"))) };
        let get = |k: &str| obj.get(k).filter(|x| !x.is_null());
        let flag = |k: &str| match get(k) {
            None => Ok(true), // every do_* defaults to true for CLIP
            Some(x) => x.as_bool().ok_or_else(|| Error::msg(format!("{E}: \"{k}\" is not a bool: {x}"))),
        };
        let mut cfg = Self::openai(224);
        cfg.do_resize = flag("do_resize")?;
        cfg.do_center_crop = flag("do_center_crop")?;
        cfg.do_rescale = flag("do_rescale")?;
        cfg.do_normalize = flag("do_normalize")?;
        cfg.do_convert_rgb = flag("do_convert_rgb")?;
        if let Some(r) = get("resample").filter(|r| r.as_u64() != Some(3)) {
            return Err(Error::msg(format!("{E}: only resample=3 (BICUBIC) is implemented, got {r}")));
        }
        if let Some(x) = get("rescale_factor") {
            let Some(f) = x.as_f64() else { return Err(Error::msg(format!("{E}: bad rescale_factor {x}"))) };
            cfg.rescale_factor = f as f32;
        }
        if let Some(sz) = get("size") {
            match (dim(sz), hw(sz, "size")) {
                (Some(n), _) => cfg.shortest_edge = n,
                (None, Ok(Some(p))) => cfg.size_hw = Some(p),
                _ => match sz.get("shortest_edge").and_then(dim) {
                    Some(n) if sz.get("longest_edge").is_none_or(Value::is_null) => cfg.shortest_edge = n,
                    _ => return Err(Error::msg(format!("{E}: unsupported \"size\": {sz}"))),
                },
            }
        }
        if let Some(cs) = get("crop_size") {
            (cfg.crop_h, cfg.crop_w) = match dim(cs) {
                Some(n) => (n, n),
                None => hw(cs, "crop_size")?.ok_or_else(|| Error::msg(format!("{E}: unsupported \"crop_size\": {cs}")))?,
            };
        }
        for (key, dst) in [("image_mean", &mut cfg.mean), ("image_std", &mut cfg.std)] {
            let Some(x) = get(key) else { continue };
            let vals: Vec<f64> = match x {
                Value::Array(a) => a.iter().filter_map(Value::as_f64).collect(),
                _ => x.as_f64().map(|f| vec![f; 3]).unwrap_or_default(), // scalar = all channels
            };
            if vals.len() != 3 || matches!(x, Value::Array(a) if a.len() != 3) {
                return Err(Error::msg(format!("{E}: \"{key}\" must be 3 numbers or one number, got {x}")));
            }
            *dst = [vals[0] as f32, vals[1] as f32, vals[2] as f32];
        }
        Ok(cfg)
    }
}

fn dim(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|n| u32::try_from(n).ok())
}

/// `{"height": h, "width": w}` or `[h, w]` (HF's get_size_dict uses height-width order for lists).
fn hw(v: &Value, key: &str) -> Result<Option<(u32, u32)>> {
    let (h, w) = match v {
        Value::Array(a) if a.len() == 2 => (&a[0], &a[1]),
        Value::Object(o) if o.contains_key("height") || o.contains_key("width") => {
            (o.get("height").unwrap_or(&Value::Null), o.get("width").unwrap_or(&Value::Null))
        }
        _ => return Ok(None),
    };
    match (dim(h), dim(w)) {
        (Some(h), Some(w)) => Ok(Some((h, w))),
        _ => Err(Error::msg(format!("preprocessor config: bad \"{key}\": {v}"))),
    }
}

/// Pillow's bicubic kernel (Resample.c `bicubic_filter`, a = -0.5), same evaluation order.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;
/// (ksize, per output pixel (first source index, tap count), ksize fixed-point taps per pixel)
type Coeffs = (usize, Vec<(usize, usize)>, Vec<i32>);

/// Pillow `precompute_coeffs` + `normalize_coeffs_8bpc` for output pixels `out0..out1` of a
/// resize `in_size -> out_size` (box = whole image). Unchanged size: identity (Pillow skips
/// that pass; an identity kernel gives the same bytes).
fn coeffs(in_size: u32, out_size: u32, out0: u32, out1: u32) -> Coeffs {
    let n_out = (out1 - out0) as usize;
    if in_size == out_size {
        let ids = (out0..out1).map(|x| (x as usize, 1)).collect();
        return (1, ids, vec![1 << PRECISION_BITS; n_out]);
    }
    let scale = (in_size as f32 - 0.0f32) as f64 / out_size as f64; // (double)(in1 - in0) / outSize
    let filterscale = scale.max(1.0); // downscaling widens the kernel (antialiasing)
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let inv = 1.0 / filterscale;
    let mut bounds = Vec::with_capacity(n_out);
    let mut kk = vec![0i32; n_out * ksize];
    let mut k = vec![0f64; ksize];
    for (i, xx) in (out0..out1).enumerate() {
        let center = (xx as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5) as i32).max(0); // C (int) cast truncates toward zero
        let xmax = ((center + support + 0.5) as i32).min(in_size as i32) - xmin;
        let n = xmax.max(0) as usize;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            *kx = bicubic(((x as i32 + xmin) as f64 - center + 0.5) * inv);
            ww += *kx;
        }
        for (x, &kx) in k.iter().enumerate().take(n) {
            let kx = if ww != 0.0 { kx / ww } else { kx };
            let f = kx * (1u32 << PRECISION_BITS) as f64;
            kk[i * ksize + x] = (f + if kx < 0.0 { -0.5 } else { 0.5 }) as i32; // round half away
        }
        bounds.push((xmin as usize, n));
    }
    (ksize, bounds, kk)
}

#[inline]
fn clip8(ss: i32) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resize with Pillow's BICUBIC (`Image.resize((w, h), Image.BICUBIC)`), bit-exact for 8-bit RGB.
pub fn resize_bicubic_pillow(img: &RgbImage8, w: u32, h: u32) -> RgbImage8 {
    let data = resize_window(img, w, h, (0, 0, w, h));
    RgbImage8 { width: w, height: h, data }
}

/// Source index range a pass reads, with the bounds rebased to its start (Pillow's ybox trick).
fn span(c: &mut Coeffs, limit: usize) -> (usize, usize) {
    let first = c.1.first().map_or(0, |b| b.0);
    let last = c.1.iter().map(|&(m, n)| m + n).max().unwrap_or(first);
    let last = last.clamp(first, limit);
    c.1.iter_mut().for_each(|b| b.0 -= first);
    (first, last)
}

/// Horizontal pass: `src` rows of `sw` RGB pixels -> rows of `c.1.len()` pixels.
fn hpass(src: &[u8], sw: usize, (ks, b, k): &Coeffs) -> Vec<u8> {
    let ow = b.len();
    let mut out = vec![0u8; src.len() / (sw * 3) * ow * 3];
    for (row, dst) in src.chunks_exact(sw * 3).zip(out.chunks_exact_mut(ow * 3)) {
        for (xx, &(xmin, n)) in b.iter().enumerate() {
            let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
            let taps = row[xmin * 3..(xmin + n) * 3].chunks_exact(3);
            for (p, &kj) in taps.zip(&k[xx * ks..xx * ks + n]) {
                ss[0] += p[0] as i32 * kj;
                ss[1] += p[1] as i32 * kj;
                ss[2] += p[2] as i32 * kj;
            }
            dst[xx * 3..xx * 3 + 3].copy_from_slice(&[clip8(ss[0]), clip8(ss[1]), clip8(ss[2])]);
        }
    }
    out
}

/// Vertical pass over columns `c0..c1` of `src` (rows of `sw` pixels), row-vectorised.
fn vpass(src: &[u8], sw: usize, (c0, c1): (usize, usize), (ks, b, k): &Coeffs) -> Vec<u8> {
    let ow = (c1 - c0) * 3;
    let mut out = vec![0u8; b.len() * ow];
    let mut acc = vec![0i32; ow];
    for (yy, (&(ymin, n), dst)) in b.iter().zip(out.chunks_exact_mut(ow.max(1))).enumerate() {
        acc.iter_mut().for_each(|a| *a = 1 << (PRECISION_BITS - 1));
        for (j, &kj) in k[yy * ks..yy * ks + n].iter().enumerate() {
            let row = &src[((ymin + j) * sw + c0) * 3..][..ow];
            acc.iter_mut().zip(row).for_each(|(a, &p)| *a += p as i32 * kj);
        }
        dst.iter_mut().zip(&acc).for_each(|(o, &a)| *o = clip8(a));
    }
    out
}

/// Output pixels [x0,x1) x [y0,y1) of the full `w`x`h` Pillow bicubic resize (Resample.c
/// `ImagingResampleInner`): two separable passes with uint8 rounding+clipping in between, each
/// pass only over the source rows/columns the other pass reads. Pass order (Pillow 13, PR
/// #9549): vertical first iff `h < in_h && in_h - h > 2 * (in_w - w)`, else horizontal first.
fn resize_window(img: &RgbImage8, w: u32, h: u32, win: (u32, u32, u32, u32)) -> Vec<u8> {
    let (x0, y0, x1, y1) = win;
    let (ow, oh) = ((x1 - x0) as usize, (y1 - y0) as usize);
    if !valid(img) || ow == 0 || oh == 0 {
        return vec![0; ow * oh * 3];
    }
    let (iw, ih) = (img.width as usize, img.height as usize);
    let mut cv = coeffs(img.height, h, y0, y1);
    let mut ch = coeffs(img.width, w, x0, x1);
    if h < img.height && (ih - h as usize) as i64 > 2 * (iw as i64 - w as i64) {
        let cols = span(&mut ch, iw);
        let tmp = vpass(&img.data, iw, cols, &cv);
        hpass(&tmp, cols.1 - cols.0, &ch)
    } else {
        let (r0, r1) = span(&mut cv, ih);
        let tmp = hpass(&img.data[r0 * iw * 3..r1 * iw * 3], iw, &ch);
        vpass(&tmp, ow, (0, ow), &cv)
    }
}

fn valid(img: &RgbImage8) -> bool {
    let n = img.width as usize * img.height as usize * 3;
    n > 0 && img.data.len() == n
}

/// (width, height) after the resize step: HF `get_resize_output_image_size(default_to_square=False)`.
pub fn resized_size(img_w: u32, img_h: u32, cfg: &PreprocessConfig) -> (u32, u32) {
    if !cfg.do_resize {
        return (img_w, img_h);
    }
    if let Some((h, w)) = cfg.size_hw {
        return (w, h);
    }
    let (short, long, s) = (img_w.min(img_h), img_w.max(img_h), cfg.shortest_edge);
    // Python int(s * long / short): float division, then truncation
    let new_long = (s as f64 * long as f64 / short.max(1) as f64) as u32;
    match (short, img_w <= img_h) {
        (0, _) => (0, 0),
        (_, true) => (s, new_long),
        (_, false) => (new_long, s),
    }
}

/// (width, height) of the `preprocess` output: the crop size, or the resized size without crop.
pub fn output_size(img_w: u32, img_h: u32, cfg: &PreprocessConfig) -> (u32, u32) {
    if cfg.do_center_crop {
        (cfg.crop_w, cfg.crop_h)
    } else {
        resized_size(img_w, img_h, cfg)
    }
}

/// Per-channel map u8 -> output value, computed in HF's precision: rescale `x.astype(float64) *
/// scale` then cast to f32; normalise `(x - mean) / std` in f32 (mean/std as float32 arrays).
fn channel_luts(cfg: &PreprocessConfig) -> [[f32; 256]; 3] {
    // The config holds f32; HF multiplies by the Python float 1/255 (f64). f32(1/255) widened is a
    // different f64 and gives 1-ulp differences for 126 of 256 levels, so recover the exact value.
    let exact = cfg.rescale_factor == (1.0f64 / 255.0) as f32;
    let rf = if exact { 1.0 / 255.0 } else { cfg.rescale_factor as f64 };
    let mut lut = [[0f32; 256]; 3];
    for (c, l) in lut.iter_mut().enumerate() {
        for (v, o) in l.iter_mut().enumerate() {
            let x = if cfg.do_rescale { (v as f64 * rf) as f32 } else { v as f32 };
            *o = if cfg.do_normalize { (x - cfg.mean[c]) / cfg.std[c] } else { x };
        }
    }
    lut
}

/// The uint8 image HF rescales and normalises: resize (shortest edge, Pillow BICUBIC on uint8) →
/// center crop (HF offsets `(h - crop_h) // 2`, zero padding when the image is smaller). Returns
/// interleaved RGB (HWC) of [`output_size`]. An invalid image (zero size, wrong `data` length) is
/// treated as empty: all padding.
pub fn preprocess_u8(img: &RgbImage8, cfg: &PreprocessConfig) -> RgbImage8 {
    let (iw, ih) = (img.width, img.height);
    let (iw, ih) = if valid(img) { (iw, ih) } else { (0, 0) };
    let (rw, rh) = resized_size(iw, ih, cfg);
    let (ow, oh) = output_size(iw, ih, cfg);
    // HF: top = (h - crop_h) // 2 (floor); when negative it first pads ceil(-diff / 2) zeros,
    // which puts source row `top + y` at output row y either way.
    let top = (rh as i64 - oh as i64).div_euclid(2);
    let left = (rw as i64 - ow as i64).div_euclid(2);
    let (y0, y1) = (top.max(0), (top + oh as i64).min(rh as i64));
    let (x0, x1) = (left.max(0), (left + ow as i64).min(rw as i64));
    let (y1, x1) = (y1.max(y0), x1.max(x0));
    // Resample only the pixels that survive the crop (each output pixel is independent).
    let win = resize_window(img, rw, rh, (x0 as u32, y0 as u32, x1 as u32, y1 as u32));
    let (w, h) = (ow, oh);
    let (ow, oh, ww) = (ow as usize, oh as usize, (x1 - x0) as usize * 3);
    let mut canvas = vec![0u8; oh * ow * 3]; // zero padding happens before rescale/normalise
    let (dy, dx) = ((y0 - top) as usize, (x0 - left) as usize);
    for (r, src) in win.chunks_exact(ww.max(1)).enumerate() {
        let d = ((dy + r) * ow + dx) * 3;
        canvas[d..d + ww].copy_from_slice(src);
    }
    RgbImage8 { width: w, height: h, data: canvas }
}

/// The whole HF pipeline on an RGB8 image: [`preprocess_u8`] (resize, center crop) → rescale →
/// normalise. Returns CHW f32 of shape [3, H, W], (W, H) = [`output_size`] (the crop size when
/// `do_center_crop`). `do_convert_rgb` is a decode-time step (see [`decode_rgb8_hf`]).
pub fn preprocess(img: &RgbImage8, cfg: &PreprocessConfig) -> Vec<f32> {
    let canvas = preprocess_u8(img, cfg);
    let (lut, n) = (channel_luts(cfg), canvas.width as usize * canvas.height as usize);
    let mut out = vec![0f32; 3 * n]; // [3, H, W]
    for (i, p) in canvas.data.chunks_exact(3).enumerate() {
        (0..3).for_each(|c| out[c * n + i] = lut[c][p[c] as usize]);
    }
    out
}

impl PreprocessConfig {
    /// A model directory's preprocessing: its preprocessor_config.json (whose crop must match the
    /// model's `image_size`), or OpenAI's at that size when the file is absent.
    pub fn for_model_dir(dir: &std::path::Path, image_size: usize) -> crate::error::Result<PreprocessConfig> {
        use crate::error::Error;
        let p = dir.join("preprocessor_config.json");
        if !p.exists() {
            return Ok(PreprocessConfig::openai(image_size as u32));
        }
        let s = std::fs::read_to_string(&p).map_err(|e| Error::file(&p, format!("cannot read: {e}")))?;
        let c = PreprocessConfig::from_json_str(&s).map_err(|e| Error::file(&p, e))?;
        if c.crop_h as usize != image_size || c.crop_w as usize != image_size {
            return Err(Error::file(&p, format!("crop size {}×{} does not match the model's image_size {image_size}", c.crop_h, c.crop_w)));
        }
        Ok(c)
    }
}
