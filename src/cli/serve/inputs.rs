//! Request inputs → model work: texts tokenised (an error past the context unless `truncate`),
//! token ids checked against the vocabulary and the context, images from base64 data URLs (or,
//! with `--allow-file-paths`, local files) size-checked, decoded and preprocessed exactly as
//! `embed-image` does. Every problem is a 400 or 413 naming the input.
use super::batcher::ModelInfo;
use super::errors::{ApiError, ApiResult};
use base64::Engine;
use clipforge::io::image_decode::decode_rgb8_hf;
use clipforge::io::image_prep::preprocess;
use serde_json::Value;

/// The `input` of a text request, as sent.
pub enum TextInput {
    Texts(Vec<String>),
    Ids(Vec<Vec<u64>>),
}

/// Limits on what one request may hold.
#[derive(Clone, Copy, Debug)]
pub struct InputLimits {
    pub max_inputs: usize,
    pub max_image_bytes: usize,
    pub max_image_pixels: u64,
    pub allow_file_paths: bool,
}

const SHAPES: &str = "input must be a string, a list of strings, a list of token ids, or a list of lists of token ids";

fn count_ok(n: usize, lim: &InputLimits) -> ApiResult<()> {
    if n == 0 {
        return Err(ApiError::bad_request("input is empty: give at least one text or image"));
    }
    if n > lim.max_inputs {
        return Err(ApiError::bad_request(format!("input has {n} items, more than the server's limit of {} per request (--max-inputs)", lim.max_inputs)));
    }
    Ok(())
}

fn id_list(v: &[Value]) -> Option<Vec<u64>> {
    v.iter().map(|x| x.as_u64()).collect()
}

/// A string, list of strings, list of ints, or list of lists of ints.
pub fn text_input(input: &Value, lim: &InputLimits) -> ApiResult<TextInput> {
    let out = match input {
        Value::String(s) => TextInput::Texts(vec![s.clone()]),
        Value::Array(a) if a.iter().all(Value::is_string) => TextInput::Texts(a.iter().filter_map(|s| s.as_str().map(String::from)).collect()),
        Value::Array(a) if a.iter().all(Value::is_number) => {
            TextInput::Ids(vec![id_list(a).ok_or_else(|| ApiError::bad_request("token ids must be non-negative integers"))?])
        }
        Value::Array(a) if a.iter().all(Value::is_array) => {
            let lists = a.iter().map(|x| x.as_array().and_then(|l| id_list(l))).collect::<Option<Vec<_>>>();
            TextInput::Ids(lists.ok_or_else(|| ApiError::bad_request("token ids must be lists of non-negative integers"))?)
        }
        _ => return Err(ApiError::bad_request(SHAPES)),
    };
    count_ok(
        match &out {
            TextInput::Texts(t) => t.len(),
            TextInput::Ids(i) => i.len(),
        },
        lim,
    )?;
    Ok(out)
}

/// Strings only (image data URLs or paths): a string or a list of strings.
pub fn string_list(input: &Value, what: &str, lim: &InputLimits) -> ApiResult<Vec<String>> {
    let v: Vec<String> = match input {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) if a.iter().all(Value::is_string) => a.iter().filter_map(|s| s.as_str().map(String::from)).collect(),
        _ => return Err(ApiError::bad_request(format!("{what} must be a string or a list of strings"))),
    };
    count_ok(v.len(), lim)?;
    Ok(v)
}

fn too_long(i: usize, n: usize, ctx: usize) -> ApiError {
    ApiError::too_long(format!(
        "input[{i}] has {n} tokens, more than the model's context of {ctx} (start and end tokens included); send \"truncate\": true to cut it CLIP-style"
    ))
}

/// Texts or ids → token id sequences (start and end tokens included), checked.
/// Id lists that do not begin with the start token get the start and end tokens added.
pub fn tokens(input: TextInput, info: &ModelInfo, truncate: bool) -> ApiResult<Vec<Vec<u32>>> {
    let tok = &info.tokenizer;
    let ctx = tok.context_length;
    match input {
        TextInput::Texts(texts) => texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let (ids, lost) = tok.encode_counting(t).map_err(|e| ApiError::bad_request(format!("input[{i}]: {}", e.message())))?;
                if lost > 0 && !truncate {
                    return Err(too_long(i, ids.len() + lost, ctx));
                }
                Ok(ids)
            })
            .collect(),
        TextInput::Ids(lists) => lists
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                if let Some(bad) = l.iter().find(|&&t| t >= info.vocab as u64) {
                    return Err(ApiError::bad_request(format!("input[{i}] has token id {bad}, outside the vocabulary of {}", info.vocab)));
                }
                let mut ids: Vec<u32> = l.into_iter().map(|t| t as u32).collect();
                if ids.first() != Some(&tok.sot) {
                    ids.insert(0, tok.sot);
                    ids.push(tok.eot);
                }
                if ids.len() > ctx {
                    if !truncate {
                        return Err(too_long(i, ids.len(), ctx));
                    }
                    ids.truncate(ctx - 1);
                    ids.push(tok.eot);
                }
                Ok(ids)
            })
            .collect(),
    }
}

/// The bytes of one image input: a `data:<mime>;base64,<data>` URL, or a local file path where
/// the server allows them.
fn image_bytes(i: usize, s: &str, lim: &InputLimits) -> ApiResult<Vec<u8>> {
    let big =
        |n: u64| ApiError::too_large(format!("input[{i}] is an image of {n} bytes, over the server's limit of {} (--max-image-bytes)", lim.max_image_bytes));
    if let Some(rest) = s.strip_prefix("data:") {
        let (meta, data) = rest.split_once(',').ok_or_else(|| ApiError::bad_request(format!("input[{i}]: a data URL needs a comma before its data")))?;
        if !meta.ends_with(";base64") {
            return Err(ApiError::bad_request(format!("input[{i}]: only base64 data URLs are taken (data:image/png;base64,...)")));
        }
        if data.len() / 4 * 3 > lim.max_image_bytes + 3 {
            return Err(big((data.len() / 4 * 3) as u64));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| ApiError::bad_request(format!("input[{i}]: the data URL is not valid base64: {e}")))?;
        if bytes.len() > lim.max_image_bytes {
            return Err(big(bytes.len() as u64));
        }
        return Ok(bytes);
    }
    if !lim.allow_file_paths {
        return Err(ApiError::bad_request(format!(
            "input[{i}] is not a data URL (data:image/png;base64,...); local file paths are taken only when the server runs with --allow-file-paths"
        )));
    }
    let meta = std::fs::metadata(s).map_err(|e| ApiError::bad_request(format!("input[{i}]: {s}: cannot read image: {e}")))?;
    if meta.len() > lim.max_image_bytes as u64 {
        return Err(big(meta.len()));
    }
    std::fs::read(s).map_err(|e| ApiError::bad_request(format!("input[{i}]: {s}: cannot read image: {e}")))
}

/// One image input → its pixels [3, S, S], preprocessed as `embed-image` does (HF's
/// convert_to_rgb, then the model's resize, crop and normalisation). Blocking: run it off the
/// async threads.
pub fn image_pixels(i: usize, s: &str, info: &ModelInfo, lim: &InputLimits) -> ApiResult<Vec<f32>> {
    let bytes = image_bytes(i, s, lim)?;
    let reader = image::ImageReader::new(std::io::Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|e| ApiError::bad_request(format!("input[{i}]: cannot read image: {e}")))?;
    let (w, h) = reader.into_dimensions().map_err(|e| ApiError::bad_request(format!("input[{i}]: cannot decode image: {e}")))?;
    if w as u64 * h as u64 > lim.max_image_pixels {
        return Err(ApiError::too_large(format!(
            "input[{i}] is a {w}×{h} image, over the server's limit of {} pixels (--max-image-pixels)",
            lim.max_image_pixels
        )));
    }
    let img = decode_rgb8_hf(&bytes).map_err(|e| ApiError::bad_request(format!("input[{i}]: cannot decode image: {}", e.message())))?;
    Ok(preprocess(&img, &info.preprocess)) // [3, S, S]
}
