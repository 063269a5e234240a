//! The server's one error shape, OpenAI's: `{"error": {"message", "type", "code"}}` with the HTTP
//! status it goes out with. Every failure a handler or middleware meets becomes one of these;
//! nothing a client sends can panic the server.
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// A failed request: HTTP status, OpenAI-style error type and code, and one clear line.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, kind, code, message: message.into() }
    }
    /// 400: the request is malformed or asks for something the model cannot do.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", "invalid_input", message)
    }
    /// 400 for an input longer than the model's context.
    pub fn too_long(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", "context_length_exceeded", message)
    }
    /// 401: no or a wrong `Authorization: Bearer` key.
    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_api_key",
            "missing or invalid API key (send the header Authorization: Bearer KEY)",
        )
    }
    /// 404: no such route.
    pub fn not_found(path: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
            format!("no route {path} (POST /v1/embeddings, /v1/similarity, /v1/tokenize; GET /health, /info, /metrics)"),
        )
    }
    /// 405: a known route with the wrong method.
    pub fn method_not_allowed() -> ApiError {
        ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", "method_not_allowed", "method not allowed on this route")
    }
    /// 413: the body or one image is over its limit.
    pub fn too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", "payload_too_large", message)
    }
    /// 429: `--max-concurrent-requests` requests are already in flight.
    pub fn overloaded(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "too_many_requests",
            format!("the server is at its limit of {limit} concurrent requests; retry later"),
        )
    }
    /// 503: the request ran past `--request-timeout-s`, or the server is shutting down.
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", code, message)
    }
    /// 500: the model failed on this request (the worker keeps serving others).
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "model_error", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"message": self.message, "type": self.kind, "code": self.code}});
        (self.status, axum::Json(body)).into_response()
    }
}

/// A handler's result: a JSON value, or an [`ApiError`].
pub type ApiResult<T> = std::result::Result<T, ApiError>;
