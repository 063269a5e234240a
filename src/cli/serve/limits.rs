//! The middleware every request passes: metrics (endpoint, status, latency), the API key (401;
//! `/health` stays open for load balancers), and for the `/v1/` routes the concurrency limit
//! (429 past `--max-concurrent-requests`, never queued) and the request timeout (503).
use super::errors::ApiError;
use super::routes::AppState;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::atomic::Ordering;
use std::time::Instant;

/// Counts a request in flight for as long as it lives (a dropped request too).
struct InFlight<'a>(&'a std::sync::atomic::AtomicUsize);
impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether `Authorization: Bearer KEY` carries the key (compared in constant time).
fn authorized(req: &Request, key: &str) -> bool {
    let got = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
    match got {
        Some(g) if g.len() == key.len() => g.bytes().zip(key.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0,
        _ => false,
    }
}

/// The one middleware: see the module docs.
pub async fn guard(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let t0 = Instant::now();
    let endpoint = req.extensions().get::<MatchedPath>().map_or_else(|| "other".to_string(), |p| p.as_str().to_string());
    let resp = guarded(&s, &endpoint, req, next).await;
    s.metrics.request(&endpoint, resp.status().as_u16(), t0.elapsed().as_secs_f64());
    resp
}

async fn guarded(s: &AppState, endpoint: &str, req: Request, next: Next) -> Response {
    if let Some(key) = &s.cfg.api_key {
        if endpoint != "/health" && !authorized(&req, key) {
            return ApiError::unauthorized().into_response();
        }
    }
    if !endpoint.starts_with("/v1/") {
        return next.run(req).await;
    }
    let Ok(_permit) = s.cfg.slots.clone().try_acquire_owned() else {
        s.metrics.rejected.fetch_add(1, Ordering::Relaxed);
        return ApiError::overloaded(s.cfg.max_concurrent).into_response();
    };
    s.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
    let _counted = InFlight(&s.metrics.in_flight);
    match tokio::time::timeout(s.cfg.timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::unavailable(
            "timeout",
            format!("the request took longer than the server's {:.1} s limit (--request-timeout-s)", s.cfg.timeout.as_secs_f64()),
        )
        .into_response(),
    }
}
