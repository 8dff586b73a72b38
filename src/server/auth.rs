//! The key check in front of the API: `/v1/*` needs a tenant or admin key (unless the server runs
//! open), `/metrics` an admin key when `metrics_require_key` is set; `/health`, `/ready` and
//! `/openapi.json` stay open for probes. The caller goes into the request's extensions; nothing
//! later reads a tenant from anywhere else.
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;
use crate::telemetry::names;
use crate::tenancy::Caller;

pub async fn require_key(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path();
    let metrics = path == "/metrics";
    // The console's page and assets hold no data; its live feed does.
    let keyed = path.starts_with("/v1/") || path == "/console/live";
    if !(keyed || (metrics && state.metrics_require_key)) {
        return next.run(req).await;
    }
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match state.directory().authenticate(authorization) {
        None => {
            metrics::counter!(names::UNAUTHORIZED_REQUESTS).increment(1);
            let mut resp = ApiError::unauthorized().into_response();
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            resp
        }
        Some(Caller::Tenant { .. }) if metrics => {
            ApiError::forbidden("/metrics needs an admin key").into_response()
        }
        Some(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
    }
}
