//! The root's routes, merged into the node's control API on the root: `PUT|GET
//! /v1/deployment` (the desired services), `POST /v1/processes/{id}/move` (migrate), and
//! `POST /v1/join` (the CA signs a member's certificate). On every other node the same paths
//! answer `409` saying so ([`elsewhere`]). `docs/api.md` is the reference.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use p2f_model::{NodeName, Process};

use super::{MigrateError, Root, RootError};
use crate::api_error::{ApiError, forwarded, parse_id};
use crate::cluster::ClusterCa;
use crate::join::{JoinRequest, JoinResponse};
use crate::records::Records;
use crate::wire::{DeploymentRequest, DesiredState, MoveRequest};

/// The root-only paths.
const DEPLOYMENT: &str = "/v1/deployment";
const MOVE: &str = "/v1/processes/{id}/move";
const JOIN: &str = "/v1/join";

#[derive(Clone)]
struct RootApi {
    root: Root,
    /// The cluster CA with its key.
    ca: Arc<ClusterCa>,
    records: Records,
    /// The root's own name (no member may take it).
    own: NodeName,
}

/// The root's routes (without authentication: the node's API adds it to every route).
pub fn routes(root: Root, ca: ClusterCa, records: Records, own: NodeName) -> Router {
    let api = RootApi {
        root,
        ca: Arc::new(ca),
        records,
        own,
    };
    Router::new()
        .route(DEPLOYMENT, get(desired).put(set_desired))
        .route(MOVE, post(migrate))
        .route(JOIN, post(join))
        .with_state(api)
}

/// The root's paths on a node that is not the root: `409`, saying where to go.
pub fn elsewhere() -> Router {
    async fn not_root() -> ApiError {
        ApiError::new(
            StatusCode::CONFLICT,
            "this node is not the root: send this to the root node (see `role` in GET /v1/node)",
        )
    }
    Router::new()
        .route(DEPLOYMENT, get(not_root).put(not_root))
        .route(MOVE, post(not_root))
        .route(JOIN, post(not_root))
}

async fn desired(State(api): State<RootApi>) -> Json<DesiredState> {
    Json(api.root.desired())
}

async fn set_desired(
    State(api): State<RootApi>,
    body: Result<Json<DeploymentRequest>, JsonRejection>,
) -> Result<Json<DesiredState>, ApiError> {
    let Json(request) = body?;
    match api.root.set_desired(request.services).await {
        Ok(state) => Ok(Json(state)),
        Err(RootError::Invalid(invalid)) => Err(invalid.into()),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
        )),
    }
}

async fn migrate(
    State(api): State<RootApi>,
    Path(id): Path<String>,
    body: Result<Json<MoveRequest>, JsonRejection>,
) -> Result<Json<Process>, ApiError> {
    let id = parse_id(&id)?;
    let Json(request) = body?;
    api.root
        .migrate(&id, &request.node)
        .await
        .map(Json)
        .map_err(|e| match e {
            MigrateError::NotManaged(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
            MigrateError::Refused(inner) => forwarded(inner),
            _ => ApiError::new(StatusCode::CONFLICT, e.to_string()),
        })
}

async fn join(
    State(api): State<RootApi>,
    body: Result<Json<JoinRequest>, JsonRejection>,
) -> Result<Json<JoinResponse>, ApiError> {
    let Json(request) = body?;
    // Members are identified by name: a second live node with the same one would take over
    // the first one's records. A dead member's name may be taken again (a reinstalled machine).
    let taken = request.name == api.own
        || api
            .records
            .nodes()
            .iter()
            .any(|n| n.alive && n.node.name == request.name);
    if taken {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "a live node is already called {}: choose another node name (`--name`, or `name` in node.toml), or wait until that node has been gone for a few seconds",
                request.name
            ),
        ));
    }
    let cert_pem = api
        .ca
        .sign(request.name.as_str(), &request.hosts, &request.csr_pem)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    tracing::info!(member = %request.name, "signed a member's certificate");
    Ok(Json(JoinResponse { cert_pem }))
}
