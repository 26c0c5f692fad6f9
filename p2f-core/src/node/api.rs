//! The control API (`/v1`, JSON, HTTPS): the seed's four operations, logs and the node's own
//! entry. Every request carries the cluster secret (`Authorization: Bearer SECRET`, compared in
//! constant time); anything else gets `401` and changes nothing. Malformed input gets a 4xx with
//! a one-line JSON error, never a crash. `docs/api.md` is the reference.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use p2f_model::{Node, Process, ProcessId, ProcessKey};

use super::supervisor::{Supervisor, SupervisorError};
use crate::cluster::{ClusterCa, Secret};
use crate::join::{JoinRequest, JoinResponse};
use crate::records::Records;
use crate::root::{MoveError, Root, RootError};
use crate::wire::{
    DeploymentRequest, DesiredState, ErrorBody, ListQuery, LogsQuery, MAX_BODY_BYTES, MoveRequest,
    NodeStatus, Scope, SpinQuery, SpinRequest,
};

/// The longest `POST /v1/processes?wait=true` waits for the process to run.
const SPIN_WAIT: Duration = Duration::from_secs(30 * 60);

/// What the handlers share.
#[derive(Clone)]
struct Api {
    supervisor: Supervisor,
    secret: Arc<Secret>,
    node: Arc<Node>,
    /// The cluster CA with its key, on the root only: it signs members' certificates.
    ca: Option<Arc<ClusterCa>>,
    /// The whole network's records, when this node gossips.
    records: Option<Records>,
    /// The root's decisions, on the root.
    root: Option<Root>,
}

/// The API's router over `supervisor`, answering only requests that carry `secret`. With a
/// CA that holds its key (the root), it also answers `POST /v1/join`.
pub fn router(
    supervisor: Supervisor,
    secret: Secret,
    node: Node,
    ca: Option<ClusterCa>,
    records: Option<Records>,
    root: Option<Root>,
) -> Router {
    let api = Api {
        supervisor,
        secret: Arc::new(secret),
        node: Arc::new(node),
        ca: ca.filter(|ca| ca.key_pem().is_some()).map(Arc::new),
        records,
        root,
    };
    Router::new()
        .route("/v1/node", get(node_entry))
        .route("/v1/nodes", get(nodes))
        .route("/v1/processes", get(list).post(spin))
        .route("/v1/processes/{id}", get(info).delete(remove))
        .route("/v1/processes/{id}/kill", post(kill))
        .route("/v1/processes/{id}/logs", get(logs))
        .route("/v1/domains/{domain}", get(by_domain))
        .route("/v1/join", post(join))
        .route("/v1/deployment", get(desired).put(set_desired))
        .route("/v1/processes/{id}/move", post(move_process))
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(api.clone(), authenticate))
        .with_state(api)
}

/// An error answer: a status and a one-line JSON body.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    fn new(status: StatusCode, error: impl Into<String>) -> ApiError {
        ApiError {
            status,
            body: ErrorBody {
                error: error.into(),
                findings: Vec::new(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<SupervisorError> for ApiError {
    fn from(e: SupervisorError) -> ApiError {
        match e {
            SupervisorError::Invalid(invalid) => ApiError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                body: ErrorBody {
                    error: format!(
                        "invalid spec: {} finding{}",
                        invalid.findings.len(),
                        if invalid.findings.len() == 1 { "" } else { "s" }
                    ),
                    findings: invalid.findings,
                },
            },
            SupervisorError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
            SupervisorError::Exists { .. }
            | SupervisorError::PortTaken { .. }
            | SupervisorError::StartedAgain { .. } => {
                ApiError::new(StatusCode::CONFLICT, e.to_string())
            }
            SupervisorError::ShuttingDown => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            other => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> ApiError {
        let status = rejection.status();
        let message = match status {
            StatusCode::PAYLOAD_TOO_LARGE => {
                format!("request body is larger than {} MiB", MAX_BODY_BYTES >> 20)
            }
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                "expected a JSON body (Content-Type: application/json)".to_owned()
            }
            _ => rejection.body_text(),
        };
        ApiError::new(status, message)
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, rejection.body_text())
    }
}

async fn authenticate(State(api): State<Api>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "));
    match presented {
        Some(secret) if api.secret.matches(secret) => next.run(request).await,
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "wrong cluster secret").into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing cluster secret (Authorization: Bearer SECRET)",
        )
        .into_response(),
    }
}

async fn unknown_route(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no route {} {} (see docs/api.md)",
            request.method(),
            request.uri().path()
        ),
    )
}

async fn wrong_method(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{} is not allowed on {} (see docs/api.md)",
            request.method(),
            request.uri().path()
        ),
    )
}

fn parse_id(text: &str) -> Result<ProcessId, ApiError> {
    ProcessId::new(text).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))
}

async fn node_entry(State(api): State<Api>) -> Json<Node> {
    Json((*api.node).clone())
}

async fn nodes(State(api): State<Api>) -> Json<Vec<NodeStatus>> {
    Json(match &api.records {
        Some(records) => records.nodes(&api.node).await,
        None => vec![NodeStatus {
            node: (*api.node).clone(),
            alive: true,
            generation: 0,
            processes: api.supervisor.len(),
            memory_available: super::os::memory_available(),
        }],
    })
}

/// Every record (of the network, or `?scope=local` of this node), each encoded once per change
/// and joined here: ten thousand records cost a copy of their JSON, not an encoding.
async fn list(
    State(api): State<Api>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let records = match (&api.records, query.scope) {
        (Some(records), Scope::Network) => records.listed(),
        _ => api.supervisor.listed(),
    };
    let body = crate::records::listing::json_array(&records);
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}

impl Api {
    /// For a process of another node: a client of that node and its record.
    fn owner(&self, id: &ProcessId) -> Option<(crate::Network, Process)> {
        if self.supervisor.find(&ProcessKey::Id(id.clone())).is_some() {
            return None;
        }
        self.records.as_ref()?.owner(id)
    }

    /// A record of this node, else of the network.
    fn find(&self, key: &ProcessKey) -> Option<Process> {
        match &self.records {
            Some(records) => records.find(key),
            None => self.supervisor.find(key),
        }
    }
}

async fn spin(
    State(api): State<Api>,
    query: Result<Query<SpinQuery>, QueryRejection>,
    body: Result<Json<SpinRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Process>), ApiError> {
    let Query(query) = query?;
    let Json(request) = body?;
    let process = api
        .supervisor
        .spin(request.spec, request.id, request.generation)?;
    if !query.wait {
        return Ok((StatusCode::CREATED, Json(process)));
    }
    let settled = |p: &Process| p.is_running() || p.status.is_final() || p.restarts > 0;
    let process = api
        .supervisor
        .wait_for(&process.id, SPIN_WAIT, settled)
        .await
        .unwrap_or(process);
    Ok((StatusCode::CREATED, Json(process)))
}

async fn info(State(api): State<Api>, Path(id): Path<String>) -> Result<Json<Process>, ApiError> {
    let id = parse_id(&id)?;
    api.find(&ProcessKey::Id(id.clone()))
        .map(Json)
        .ok_or_else(|| SupervisorError::NotFound(id).into())
}

async fn by_domain(
    State(api): State<Api>,
    Path(domain): Path<String>,
) -> Result<Json<Process>, ApiError> {
    api.find(&ProcessKey::Domain(domain.clone()))
        .map(Json)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no process serves {domain}")))
}

async fn kill(State(api): State<Api>, Path(id): Path<String>) -> Result<Json<Process>, ApiError> {
    let id = parse_id(&id)?;
    if let Some((owner, record)) = api.owner(&id) {
        return Ok(Json(owner.kill_process(&record).await.map_err(forwarded)?));
    }
    Ok(Json(api.supervisor.kill(&id).await?))
}

async fn remove(State(api): State<Api>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id)?;
    if let Some((owner, _)) = api.owner(&id) {
        owner.remove_process(&id).await.map_err(forwarded)?;
        return Ok(StatusCode::NO_CONTENT);
    }
    api.supervisor.remove(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// An error from the node a request was forwarded to, answered as that node answered it.
fn forwarded(error: crate::ClientError) -> ApiError {
    match error {
        crate::ClientError::Api {
            status,
            message,
            findings,
        } => ApiError {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
            body: ErrorBody {
                error: message,
                findings,
            },
        },
        other => ApiError::new(StatusCode::BAD_GATEWAY, other.to_string()),
    }
}

async fn logs(
    State(api): State<Api>,
    Path(id): Path<String>,
    query: Result<Query<LogsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let Query(query) = query?;
    if let Some((owner, _)) = api.owner(&id) {
        use futures_util::StreamExt;
        let stream = owner.logs(&id, query).await.map_err(forwarded)?;
        let stream = stream.map(|chunk| chunk.map_err(std::io::Error::other));
        return Ok((
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            Body::from_stream(stream),
        )
            .into_response());
    }
    if api.supervisor.find(&ProcessKey::Id(id.clone())).is_none() {
        return Err(SupervisorError::NotFound(id).into());
    }
    let stream = api
        .supervisor
        .logs()
        .stream(&id, query.lines, query.follow)
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read the log: {e}"),
            )
        })?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Body::from_stream(stream),
    )
        .into_response())
}

async fn join(
    State(api): State<Api>,
    body: Result<Json<JoinRequest>, JsonRejection>,
) -> Result<Json<JoinResponse>, ApiError> {
    let Json(request) = body?;
    let ca = api.ca.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "this node is not the root: only the root holds the CA key that signs members",
        )
    })?;
    // Members are identified by name: a second live node with the same one would take over
    // the first one's records. A dead member's name may be taken again (a reinstalled machine).
    let taken = request.name == api.node.name
        || match &api.records {
            Some(records) => records
                .mesh()
                .membership()
                .await
                .live
                .iter()
                .any(|member| member.node == request.name),
            None => false,
        };
    if taken {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "a live node is already called {}: choose another node name (`--name`, or `name` in node.toml), or wait until that node has been gone for a few seconds",
                request.name
            ),
        ));
    }
    let cert_pem = ca
        .sign(request.name.as_str(), &request.hosts, &request.csr_pem)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    tracing::info!(member = %request.name, "signed a member's certificate");
    Ok(Json(JoinResponse { cert_pem }))
}

fn the_root(api: &Api) -> Result<&Root, ApiError> {
    api.root.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "this node is not the root: send the deployment to the root node",
        )
    })
}

async fn desired(State(api): State<Api>) -> Result<Json<DesiredState>, ApiError> {
    Ok(Json(the_root(&api)?.desired()))
}

async fn set_desired(
    State(api): State<Api>,
    body: Result<Json<DeploymentRequest>, JsonRejection>,
) -> Result<Json<DesiredState>, ApiError> {
    let Json(request) = body?;
    let root = the_root(&api)?;
    match root.set_desired(request.services) {
        Ok(state) => Ok(Json(state)),
        Err(RootError::Invalid(invalid)) => Err(SupervisorError::Invalid(invalid).into()),
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
        )),
    }
}

async fn move_process(
    State(api): State<Api>,
    Path(id): Path<String>,
    body: Result<Json<MoveRequest>, JsonRejection>,
) -> Result<Json<Process>, ApiError> {
    let id = parse_id(&id)?;
    let Json(request) = body?;
    let root = the_root(&api)?;
    root.move_to(&id, &request.node)
        .await
        .map(Json)
        .map_err(|e| match e {
            MoveError::NotManaged(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
            MoveError::Refused(inner) => forwarded(inner),
            _ => ApiError::new(StatusCode::CONFLICT, e.to_string()),
        })
}
