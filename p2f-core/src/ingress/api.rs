//! `GET /v1/routes` on the root (merged into the control API, authenticated there); on every
//! other node, or on a root without the ingress, `409` saying where it is ([`elsewhere`]).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};

use super::Ingress;
use crate::api_error::ApiError;
use crate::wire::RoutesReport;

const ROUTES: &str = "/v1/routes";

/// The ingress's routes.
pub fn routes(ingress: Ingress) -> Router {
    Router::new().route(ROUTES, get(list)).with_state(ingress)
}

async fn list(State(ingress): State<Ingress>) -> Json<RoutesReport> {
    Json(ingress.report())
}

/// `GET /v1/routes` where no ingress runs: `409`.
pub fn elsewhere() -> Router {
    async fn no_ingress() -> ApiError {
        ApiError::new(
            StatusCode::CONFLICT,
            "no ingress runs on this node: it runs on the root, with [ingress] in its node.toml",
        )
    }
    Router::new().route(ROUTES, get(no_ingress))
}
