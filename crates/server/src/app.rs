//! The HTTP surface: routes, authentication, CORS, request ids, body limit and per-request spans.

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use subtle::ConstantTimeEq;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::CorsLayer;
use tower_http::request_id::{MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::chat::chat_completions;
use crate::completions::completions;
use crate::error::ApiError;
use crate::extract::BodyLimit;
use crate::state::AppState;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub fn router(state: AppState) -> Router {
    let limit = state.settings.body_limit;
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(api)
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("Unknown route.") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(middleware::from_fn_with_state(state.clone(), count_and_limit))
        .layer(DefaultBodyLimit::max(limit))
        .layer(CatchPanicLayer::custom(ApiError::from_panic))
        .layer(CorsLayer::permissive())
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let id = req.headers().get(&REQUEST_ID).and_then(|v| v.to_str().ok()).unwrap_or("");
            tracing::info_span!("request", id, method = %req.method(), path = %req.uri().path())
        }))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, NextRequestId))
        .with_state(state)
}

/// Request ids for requests that come without one.
#[derive(Clone, Copy)]
struct NextRequestId;

impl MakeRequestId for NextRequestId {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        HeaderValue::from_str(&crate::output::request_id("req")).ok().map(RequestId::new)
    }
}

async fn authenticate(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.settings.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, token)| token.trim());
        if !bool::from(given.as_bytes().ct_eq(key.as_bytes())) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// Counts responses by status and tells the body extractor the size limit.
async fn count_and_limit(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    req.extensions_mut().insert(BodyLimit(state.settings.body_limit));
    let response = next.run(req).await;
    state.metrics.count_response(response.status().as_u16());
    response
}

async fn models(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let serving = state.loaded().ok_or_else(|| ApiError::unavailable("The model is still loading."))?;
    Ok(Json(json!({"object": "list", "data": [{
        "id": serving.model_name, "object": "model", "created": serving.created, "owned_by": "mlaserve",
        "max_model_len": serving.engine.max_model_len(),
    }]})))
}

async fn ready(State(state): State<AppState>) -> Response {
    if state.is_ready() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "not ready"}))).into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    let engine = state.loaded();
    let body = state.metrics.render(engine.as_ref().map(|s| s.engine.metrics()));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}
