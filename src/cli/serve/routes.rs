//! The HTTP handlers: `POST /v1/embeddings` (OpenAI's request and response; texts, token ids, or
//! images with `"modality": "image"`), `POST /v1/similarity`, `POST /v1/tokenize`, `GET /health`,
//! `GET /info`, `GET /metrics`, and JSON answers for unknown routes and methods.
use super::batcher::{Batcher, ModelInfo, Work};
use super::errors::{ApiError, ApiResult};
use super::inputs::{image_pixels, string_list, text_input, tokens, InputLimits, TextInput};
use super::metrics::Metrics;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub batcher: Arc<Batcher>,
    pub info: Arc<ModelInfo>,
    pub metrics: Arc<Metrics>,
    pub cfg: Arc<ServeConfig>,
}

/// The server's settings the handlers and middleware read.
pub struct ServeConfig {
    pub model_name: String,
    pub model_path: String,
    pub inputs: InputLimits,
    pub max_body_bytes: usize,
    pub max_concurrent: usize,
    pub timeout: Duration,
    pub api_key: Option<String>,
    pub slots: Arc<tokio::sync::Semaphore>,
    pub batch: super::batcher::BatchLimits,
}

/// The body read whole (413 past `--max-body-bytes`) and parsed as JSON (400 otherwise).
async fn json_body<T: DeserializeOwned>(s: &AppState, req: Request) -> ApiResult<T> {
    let limit = s.cfg.max_body_bytes;
    let too_big = || ApiError::too_large(format!("request body over the server's limit of {limit} bytes (--max-body-bytes)"));
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_big());
    }
    let bytes = axum::body::to_bytes(req.into_body(), limit).await.map_err(|e| {
        let chain = format!("{e} {}", std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default());
        if chain.contains("length limit") {
            too_big()
        } else {
            ApiError::bad_request(format!("cannot read the request body: {e}"))
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// Runs blocking input preparation off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> ApiResult<T> + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(|_| ApiError::internal("input preparation failed"))?
}

/// Queues work and waits for its rows (rows × D).
async fn embed(s: &AppState, work: Work) -> ApiResult<Vec<f32>> {
    let rx = s.batcher.submit(work).ok_or_else(|| ApiError::unavailable("shutting_down", "the server is shutting down"))?;
    match rx.await {
        Ok(Ok(rows)) => Ok(rows),
        Ok(Err(msg)) => Err(ApiError::internal(msg)),
        Err(_) => Err(ApiError::internal("the model worker dropped the request")),
    }
}

/// Texts (or ids) → (token sequences, rows × D).
async fn embed_text_input(s: &AppState, input: TextInput, truncate: bool) -> ApiResult<(usize, Vec<f32>)> {
    let info = s.info.clone();
    let ids = blocking(move || tokens(input, &info, truncate)).await?;
    let n_tokens = ids.iter().map(|v| v.len()).sum();
    Ok((n_tokens, embed(s, Work::Text(ids)).await?))
}

/// Image inputs → rows × D; each image decoded and preprocessed on the blocking pool.
async fn embed_image_input(s: &AppState, inputs: Vec<String>) -> ApiResult<Vec<f32>> {
    let n = inputs.len();
    let tasks: Vec<_> = inputs
        .into_iter()
        .enumerate()
        .map(|(i, src)| {
            let (info, lim) = (s.info.clone(), s.cfg.inputs);
            tokio::task::spawn_blocking(move || image_pixels(i, &src, &info, &lim))
        })
        .collect();
    let mut pixels = Vec::new();
    for t in tasks {
        pixels.extend(t.await.map_err(|_| ApiError::internal("image preparation failed"))??);
        // [3, S, S] each
    }
    embed(s, Work::Image { pixels, n }).await
}

#[derive(Deserialize)]
struct EmbeddingsRequest {
    input: Value,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    modality: Option<String>,
    #[serde(default)]
    truncate: bool,
    #[serde(default)]
    dimensions: Option<usize>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Vector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Serialize)]
struct EmbeddingRow {
    object: &'static str,
    index: usize,
    embedding: Vector,
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: usize,
    total_tokens: usize,
}

/// OpenAI's embeddings response, serialised straight from f32 (shortest round-trip digits).
#[derive(Serialize)]
struct EmbeddingsResponse {
    object: &'static str,
    data: Vec<EmbeddingRow>,
    model: String,
    usage: Usage,
}

/// `POST /v1/embeddings`.
pub async fn embeddings(State(s): State<AppState>, req: Request) -> ApiResult<Response> {
    let r: EmbeddingsRequest = json_body(&s, req).await?;
    let b64 = match r.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(f) => return Err(ApiError::bad_request(format!("encoding_format {f:?}: use \"float\" or \"base64\""))),
    };
    let d = s.info.dim;
    if let Some(k) = r.dimensions.filter(|&k| k != d) {
        return Err(ApiError::bad_request(format!("dimensions {k}: this model's embeddings have {d} dimensions")));
    }
    let lim = s.cfg.inputs;
    let (n_tokens, rows) = match r.modality.as_deref() {
        None | Some("text") => embed_text_input(&s, text_input(&r.input, &lim)?, r.truncate).await?,
        Some("image") => (0, embed_image_input(&s, string_list(&r.input, "input", &lim)?).await?),
        Some(m) => return Err(ApiError::bad_request(format!("modality {m:?}: use \"text\" or \"image\""))),
    };
    let data: Vec<EmbeddingRow> = rows
        .chunks_exact(d.max(1))
        .enumerate()
        .map(|(index, e)| {
            let embedding = if b64 {
                Vector::Base64(base64::engine::general_purpose::STANDARD.encode(e.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()))
            } else {
                Vector::Float(e.to_vec())
            };
            EmbeddingRow { object: "embedding", index, embedding }
        })
        .collect();
    let model = r.model.unwrap_or_else(|| s.cfg.model_name.clone());
    Ok(Json(EmbeddingsResponse { object: "list", data, model, usage: Usage { prompt_tokens: n_tokens, total_tokens: n_tokens } }).into_response())
}

#[derive(Deserialize)]
struct SimilarityRequest {
    texts: Value,
    images: Value,
    #[serde(default)]
    truncate: bool,
}

/// `POST /v1/similarity`: cosine [I, T] and per image the softmax over the texts of
/// exp(logit scale)·cosine, as `clipforge similarity --json` prints them.
pub async fn similarity(State(s): State<AppState>, req: Request) -> ApiResult<Response> {
    let r: SimilarityRequest = json_body(&s, req).await?;
    let lim = s.cfg.inputs;
    let texts = string_list(&r.texts, "texts", &lim)?;
    let images = string_list(&r.images, "images", &lim)?;
    let (t, i) = (texts.len(), images.len());
    let (txt, img) = tokio::join!(embed_text_input(&s, TextInput::Texts(texts), r.truncate), embed_image_input(&s, images));
    let ((n_tokens, txt), img) = (txt?, img?);
    let d = s.info.dim;
    let txt = clipforge::api::Embeddings::new(txt, t, d).map_err(|e| ApiError::internal(e.message()))?;
    let img = clipforge::api::Embeddings::new(img, i, d).map_err(|e| ApiError::internal(e.message()))?;
    let cos = img.cosine(&txt).map_err(|e| ApiError::internal(e.message()))?; // [I, T]
    let scale = s.info.logit_scale.exp();
    let logits: Vec<f32> = cos.data.iter().map(|c| c * scale).collect();
    let probs = clipforge::ops::softmax::softmax(&logits, t.max(1)); // [I, T]
    let rows = |v: &[f32]| v.chunks(t.max(1)).map(|r| r.to_vec()).collect::<Vec<_>>();
    Ok(Json(json!({
        "object": "similarity", "model": s.cfg.model_name, "logit_scale": scale,
        "cosine": rows(&cos.data), "probs": rows(&probs),
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    }))
    .into_response())
}

#[derive(Deserialize)]
struct TokenizeRequest {
    input: Value,
}

/// `POST /v1/tokenize`: each text's ids as the model sees them (start and end tokens, cut
/// CLIP-style to the context) and how many tokens the cut lost.
pub async fn tokenize(State(s): State<AppState>, req: Request) -> ApiResult<Response> {
    let r: TokenizeRequest = json_body(&s, req).await?;
    let texts = string_list(&r.input, "input", &s.cfg.inputs)?;
    let info = s.info.clone();
    let data = blocking(move || {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let (ids, lost) = info.tokenizer.encode_counting(t).map_err(|e| ApiError::bad_request(format!("input[{i}]: {}", e.message())))?;
                Ok(json!({"index": i, "tokens": ids, "length": ids.len(), "tokens_cut": lost}))
            })
            .collect::<ApiResult<Vec<Value>>>()
    })
    .await?;
    Ok(Json(json!({"object": "list", "data": data, "model": s.cfg.model_name, "context_length": s.info.context_length})).into_response())
}

/// `GET /health`.
pub async fn health() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// `GET /info`: the model and the server's limits.
pub async fn info(State(s): State<AppState>) -> Response {
    let (i, c) = (&s.info, &s.cfg);
    Json(json!({
        "model": c.model_name, "model_path": c.model_path, "embedding_dim": i.dim, "context_length": i.context_length,
        "image_size": i.image_size, "device": i.device, "dtype": i.dtype, "version": env!("CARGO_PKG_VERSION"),
        "limits": {
            "max_batch_tokens": c.batch.max_tokens, "max_batch_images": c.batch.max_images,
            "max_wait_ms": c.batch.max_wait.as_millis() as u64, "max_concurrent_requests": c.max_concurrent,
            "max_inputs": c.inputs.max_inputs, "max_body_bytes": c.max_body_bytes, "max_image_bytes": c.inputs.max_image_bytes,
            "max_image_pixels": c.inputs.max_image_pixels, "request_timeout_s": c.timeout.as_secs_f64(),
            "allow_file_paths": c.inputs.allow_file_paths, "api_key": c.api_key.is_some(),
        },
    }))
    .into_response()
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics(State(s): State<AppState>) -> Response {
    let mut r = Response::new(Body::from(s.metrics.render()));
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    r
}

/// Unknown route: 404 in JSON.
pub async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(req.uri().path())
}

/// Known route, wrong method: 405 in JSON.
pub async fn wrong_method() -> ApiError {
    ApiError::method_not_allowed()
}
