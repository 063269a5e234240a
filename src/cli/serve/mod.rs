//! `clipforge serve`: text and image embeddings over HTTP (OpenAI-compatible `/v1/embeddings`),
//! the model opened once and requests dynamically batched (batcher.rs). This file: the flags,
//! startup (model, router, listener; the bound address on stderr) and shutdown (SIGTERM or
//! Ctrl-C: stop accepting, finish the requests in flight, exit 0).
mod batcher;
mod errors;
mod inputs;
mod limits;
mod metrics;
mod routes;

use super::Compute;
use axum::routing::{get, post};
use axum::Router;
use clap::Args;
use clipforge::error::{Error, Result};
use clipforge::model::Towers;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// HF CLIP model directory (or checkpoint the library opens)
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub compute: Compute,
    /// Address to listen on (loopback by default; 0.0.0.0 exposes the server to the network)
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the bound address is printed on stderr)
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Model name reported in responses and /info (default: the model path's last component)
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Most tokens (start and end tokens included) in one text batch
    #[arg(long, default_value_t = 8192)]
    pub max_batch_tokens: usize,
    /// Most images in one image batch
    #[arg(long, default_value_t = 32)]
    pub max_batch_images: usize,
    /// Longest wait, in milliseconds after the oldest queued request arrived, for more requests to fill a batch
    #[arg(long, default_value_t = 2)]
    pub max_wait_ms: u64,
    /// Requests served at once; more get 429 Too Many Requests
    #[arg(long, default_value_t = 512)]
    pub max_concurrent_requests: usize,
    /// Most texts or images in one request (400 beyond)
    #[arg(long, default_value_t = 2048)]
    pub max_inputs: usize,
    /// Largest request body in bytes (413 beyond)
    #[arg(long, default_value_t = 64 << 20)]
    pub max_body_bytes: usize,
    /// Largest encoded image in bytes (413 beyond)
    #[arg(long, default_value_t = 16 << 20)]
    pub max_image_bytes: usize,
    /// Largest image in pixels, width × height, checked before decoding (413 beyond)
    #[arg(long, default_value_t = 50_000_000)]
    pub max_image_pixels: u64,
    /// Seconds a request may take before it is answered 503
    #[arg(long, default_value_t = 60.0)]
    pub request_timeout_s: f64,
    /// Require `Authorization: Bearer KEY` on every route but /health (401 without); default: the CLIPFORGE_API_KEY environment variable, if set
    #[arg(long)]
    pub api_key: Option<String>,
    /// Also take local image file paths as image inputs (they are read with the server's permissions)
    #[arg(long)]
    pub allow_file_paths: bool,
}

fn check(a: &ServeArgs) -> Result<()> {
    let positive = [
        ("--max-batch-tokens", a.max_batch_tokens),
        ("--max-batch-images", a.max_batch_images),
        ("--max-concurrent-requests", a.max_concurrent_requests),
        ("--max-inputs", a.max_inputs),
        ("--max-body-bytes", a.max_body_bytes),
        ("--max-image-bytes", a.max_image_bytes),
    ];
    if let Some((flag, _)) = positive.iter().find(|(_, v)| *v == 0) {
        return Err(Error::msg(format!("{flag} must be at least 1")));
    }
    if !(a.request_timeout_s > 0.0 && a.request_timeout_s.is_finite()) {
        return Err(Error::msg(format!("--request-timeout-s {} must be a positive number of seconds", a.request_timeout_s)));
    }
    Ok(())
}

pub fn run(a: &ServeArgs) -> Result<()> {
    check(a)?;
    let api_key = a.api_key.clone().or_else(|| std::env::var("CLIPFORGE_API_KEY").ok()).filter(|k| !k.is_empty());
    let metrics = Arc::new(metrics::Metrics::new());
    let batch = batcher::BatchLimits { max_tokens: a.max_batch_tokens, max_images: a.max_batch_images, max_wait: Duration::from_millis(a.max_wait_ms) };
    let opts = super::common::open_options(Towers::Both, a.compute)?;
    let (batcher, info, worker) = batcher::start(a.model.clone(), opts, batch, metrics.clone())?;
    let name =
        a.served_model_name.clone().unwrap_or_else(|| a.model.file_name().map_or_else(|| a.model.display().to_string(), |n| n.to_string_lossy().into_owned()));
    let cfg = routes::ServeConfig {
        model_name: name,
        model_path: a.model.display().to_string(),
        inputs: inputs::InputLimits {
            max_inputs: a.max_inputs,
            max_image_bytes: a.max_image_bytes,
            max_image_pixels: a.max_image_pixels,
            allow_file_paths: a.allow_file_paths,
        },
        max_body_bytes: a.max_body_bytes,
        max_concurrent: a.max_concurrent_requests,
        timeout: Duration::from_secs_f64(a.request_timeout_s),
        api_key,
        slots: Arc::new(tokio::sync::Semaphore::new(a.max_concurrent_requests)),
        batch,
    };
    let state = routes::AppState { batcher: batcher.clone(), info: Arc::new(info), metrics, cfg: Arc::new(cfg) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 8))
        .enable_all()
        .build()
        .map_err(|e| Error::msg(format!("cannot start the async runtime: {e}")))?;
    let served = runtime.block_on(serve(a, state));
    batcher.close();
    let _ = worker.join();
    served
}

fn router(state: routes::AppState) -> Router {
    Router::new()
        .route("/v1/embeddings", post(routes::embeddings))
        .route("/v1/similarity", post(routes::similarity))
        .route("/v1/tokenize", post(routes::tokenize))
        .route("/health", get(routes::health))
        .route("/info", get(routes::info))
        .route("/metrics", get(routes::metrics))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::wrong_method)
        .layer(axum::middleware::from_fn_with_state(state.clone(), limits::guard))
        .with_state(state)
}

async fn serve(a: &ServeArgs, state: routes::AppState) -> Result<()> {
    let addr = format!("{}:{}", a.host, a.port);
    let listener = tokio::net::TcpListener::bind(&addr).await.map_err(|e| Error::msg(format!("cannot listen on {addr}: {e}")))?;
    let bound = listener.local_addr().map_err(|e| Error::msg(format!("cannot read the bound address: {e}")))?;
    if !bound.ip().is_loopback() && state.cfg.api_key.is_none() {
        eprintln!("warning: listening on {} without --api-key: anyone who reaches this address can use the server", bound.ip());
    }
    let i = &state.info;
    eprintln!(
        "clipforge serve: listening on http://{bound} (model {}, {}-dim, context {}, {} {})",
        state.cfg.model_name, i.dim, i.context_length, i.device, i.dtype
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let drain = state.cfg.timeout + Duration::from_secs(5);
    let metrics = state.metrics.clone();
    tokio::spawn(async move {
        stop_signal().await;
        let n = metrics.in_flight.load(std::sync::atomic::Ordering::Relaxed);
        eprintln!("clipforge serve: shutting down; finishing {n} request(s) in flight");
        let _ = stop_tx.send(true);
    });
    let mut graceful = stop_rx.clone();
    let server = axum::serve(listener, router(state)).with_graceful_shutdown(async move {
        let _ = graceful.wait_for(|s| *s).await;
    });
    let mut late = stop_rx;
    tokio::select! {
        r = std::future::IntoFuture::into_future(server) => r.map_err(|e| Error::msg(format!("server error: {e}")))?,
        _ = async move { let _ = late.wait_for(|s| *s).await; tokio::time::sleep(drain).await } => {
            eprintln!("clipforge serve: requests still open {} s after the signal; exiting", drain.as_secs());
        }
    }
    eprintln!("clipforge serve: stopped");
    Ok(())
}

/// SIGTERM or Ctrl-C (SIGINT).
async fn stop_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
