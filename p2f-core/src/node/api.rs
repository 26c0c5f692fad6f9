//! The control API (`/v1`, JSON, HTTPS): the seed's four operations, logs and the node's own
//! entry. Every request is authorized by the client certificate of its connection (mutual
//! TLS, [`crate::identity`]): the root and operators may do anything; a member may read, act
//! on its own node, and kill or remove its own processes anywhere; without a certificate only
//! joining (with a join token) is possible. Anything else gets `401` or `403` and changes
//! nothing. Malformed input gets a 4xx with a one-line JSON error, never a crash.
//! `docs/api.md` is the reference.

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
use crate::api_error::{ApiError, forwarded, parse_id};
use crate::identity::{Caller, Role};
use crate::records::{LocalRecords, Records};
use crate::server::ConnectionInfo;
use crate::wire::{
    ListQuery, LogsQuery, MAX_BODY_BYTES, NodeStatus, Scope, SpinQuery, SpinRequest,
};

/// The longest `POST /v1/processes?wait=true` waits for the process to run.
const SPIN_WAIT: Duration = Duration::from_secs(30 * 60);

/// What the handlers share.
#[derive(Clone)]
struct Api {
    supervisor: Supervisor,
    revoked: Arc<super::revoked::Revoked>,
    node: Arc<Node>,
    /// The whole network's records, when this node gossips.
    records: Option<Records>,
    /// Sources of this node's records that run nothing (the root's unplaced records).
    unrun: Arc<[Arc<dyn LocalRecords>]>,
    /// The root's end of members' links (`GET /v1/nodes` shows them).
    hub: Option<crate::relay::hub::Hub>,
}

/// The parts of a node's control API.
#[derive(Clone)]
#[allow(missing_debug_implementations)] // `dyn LocalRecords` has no Debug; nothing to show.
pub struct ApiParts {
    /// What runs here.
    pub supervisor: Supervisor,
    /// The certificates refused.
    pub revoked: Arc<super::revoked::Revoked>,
    /// This node's directory entry (`GET /v1/node`).
    pub node: Node,
    /// The network's records, when this node gossips.
    pub records: Option<Records>,
    /// Sources of this node's records that run nothing (the root's unplaced records).
    pub unrun: Vec<Arc<dyn LocalRecords>>,
    /// The root's end of members' links.
    pub hub: Option<crate::relay::hub::Hub>,
}

/// The API's router: the node's routes and `features` (routers with their own state, such as
/// the root's), every route answering only the requests its caller may make ([`authorize`]).
pub fn router(parts: ApiParts, features: Vec<Router>) -> Router {
    let api = Api {
        supervisor: parts.supervisor,
        revoked: parts.revoked,
        node: Arc::new(parts.node),
        records: parts.records,
        unrun: parts.unrun.into(),
        hub: parts.hub,
    };
    let node = Router::new()
        .route("/v1/node", get(node_entry))
        .route("/v1/nodes", get(nodes))
        .route("/v1/processes", get(list).post(spin))
        .route("/v1/processes/{id}", get(info).delete(remove))
        .route("/v1/processes/{id}/kill", post(kill))
        .route("/v1/processes/{id}/logs", get(logs))
        .route("/v1/domains/{domain}", get(by_domain))
        .with_state(api.clone());
    features
        .into_iter()
        .fold(node, Router::merge)
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(api, authorize))
}

impl From<SupervisorError> for ApiError {
    fn from(e: SupervisorError) -> ApiError {
        match e {
            SupervisorError::Invalid(invalid) => invalid.into(),
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

/// The path of joining, the one call made without a client certificate (the root checks the
/// join token it carries).
const JOIN_PATH: &str = "/v1/join";

/// Lets a request through when its caller may make it:
/// - no client certificate: only `POST /v1/join` (`401` otherwise);
/// - the root and operators: everything;
/// - member `M`: every read (`GET`, but not a tunnel to a process's port, the root's); on
///   its own node, everything; elsewhere, killing or removing a process whose record says it
///   runs on `M` (`403` for the rest).
async fn authorize(State(api): State<Api>, request: Request, next: Next) -> Response {
    let caller = request
        .extensions()
        .get::<ConnectionInfo>()
        .and_then(|info| info.caller.clone());
    let Some(caller) = caller else {
        if request.uri().path() == JOIN_PATH {
            return next.run(request).await;
        }
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "a client certificate from the cluster CA is required: an operator's (`p2f operator add`) or the node's own",
        )
        .into_response();
    };
    if api.revoked.refuses(&caller) {
        tracing::info!(%caller, "refused: a revoked certificate");
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!("the certificate of {caller} was revoked"),
        )
        .into_response();
    }
    match api.refusal(&caller, &request) {
        None => next.run(request).await,
        Some(why) => {
            tracing::info!(%caller, method = %request.method(), path = request.uri().path(), "refused: {why}");
            ApiError::new(StatusCode::FORBIDDEN, why).into_response()
        }
    }
}

impl Api {
    /// Why `caller` may not make `request` (`None`: it may).
    fn refusal(&self, caller: &Caller, request: &Request) -> Option<String> {
        if caller.administers() {
            return None;
        }
        let path = request.uri().path();
        let method = request.method();
        let is_tunnel = path.ends_with("/tunnel");
        if caller.role != Role::Member {
            return Some(format!("{caller} may not call this API"));
        }
        if *method == axum::http::Method::GET && !is_tunnel {
            return None;
        }
        if caller.name == self.node.name.as_str() && !is_tunnel {
            return None;
        }
        // Killing or removing its own process through another node (the root) is allowed.
        let own_process = process_action(method, path)
            .and_then(|id| ProcessId::new(id).ok())
            .and_then(|id| self.find(&ProcessKey::Id(id), Scope::Network))
            .is_some_and(|record| record.node.name.as_str() == caller.name);
        if own_process {
            return None;
        }
        Some(format!(
            "{caller} may only act on its own processes and its own node: ask the root or an operator"
        ))
    }
}

/// The process id of `POST /v1/processes/{id}/kill` and `DELETE /v1/processes/{id}`.
fn process_action<'a>(method: &axum::http::Method, path: &'a str) -> Option<&'a str> {
    let rest = path.strip_prefix("/v1/processes/")?;
    match (method.as_str(), rest.split_once('/')) {
        ("POST", Some((id, "kill"))) => Some(id),
        ("DELETE", None) => Some(rest),
        _ => None,
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

async fn node_entry(State(api): State<Api>) -> Json<Node> {
    Json((*api.node).clone())
}

async fn nodes(State(api): State<Api>) -> Json<Vec<NodeStatus>> {
    Json(match &api.records {
        Some(records) => {
            let mut nodes = records.nodes();
            if let Some(hub) = &api.hub {
                let links = hub.links();
                for node in &mut nodes {
                    node.link = links.get(&node.node.name).copied();
                    if node.reach == crate::wire::Reach::Root && node.link.is_none() {
                        node.link = Some(crate::wire::LinkInfo {
                            linked: false,
                            since_ms: 0,
                            rtt_us: None,
                        });
                    }
                }
            }
            nodes
        }
        None => vec![NodeStatus {
            node: (*api.node).clone(),
            alive: true,
            incarnation: 0,
            processes: api.supervisor.len(),
            memory_available: super::os::memory_available(),
            reach: crate::wire::Reach::Direct,
            link: None,
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
        _ => api.local_listed(),
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
    /// This node's own records: what runs here, and what it keeps without running.
    fn local_listed(&self) -> Vec<crate::records::listing::Listed> {
        let mut all = self.supervisor.listed_in_any_order();
        for source in self.unrun.iter() {
            all.extend(source.listed());
        }
        all.sort_by(|a, b| a.process().id.cmp(&b.process().id));
        all
    }

    /// This node's own record of `id`.
    fn local(&self, id: &ProcessId) -> Option<Process> {
        self.supervisor
            .find(&ProcessKey::Id(id.clone()))
            .or_else(|| self.unrun_record(id))
    }

    /// The record of `id` a source that runs nothing keeps here (an unplaced one).
    fn unrun_record(&self, id: &ProcessId) -> Option<Process> {
        self.unrun.iter().find_map(|source| {
            source
                .listed()
                .into_iter()
                .find(|l| &l.process().id == id)
                .map(|l| (**l.process()).clone())
        })
    }

    /// Whether this node acts on other nodes' processes itself when asked to (the root: its
    /// certificate may); a member sends the caller to the owner instead.
    fn acts_for_others(&self) -> bool {
        self.node.p2f_info().and_then(|info| info.role) == Some(p2f_model::NodeRole::Root)
    }

    /// For a process of another node: a client of that node and its record.
    fn owner(&self, id: &ProcessId) -> Option<(crate::Network, Process)> {
        if self.local(id).is_some() {
            return None;
        }
        self.records.as_ref()?.owner(id)
    }

    /// A record of the network (`scope=network`) or of this node.
    fn find(&self, key: &ProcessKey, scope: Scope) -> Option<Process> {
        match (&self.records, scope, key) {
            (Some(records), Scope::Network, _) => records.find(key),
            (_, _, ProcessKey::Id(id)) => self.local(id),
            (_, _, key) => self.supervisor.find(key),
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
    // The record's fsync happens in `spin`: on a blocking thread, not a runtime worker.
    let supervisor = api.supervisor.clone();
    let process = tokio::task::spawn_blocking(move || {
        supervisor.spin_moved(
            request.spec,
            request.id,
            request.generation,
            request.moved_from,
            request.external,
        )
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("spin: {e}")))??;
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

async fn info(
    State(api): State<Api>,
    Path(id): Path<String>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Process>, ApiError> {
    let id = parse_id(&id)?;
    let Query(query) = query?;
    api.find(&ProcessKey::Id(id.clone()), query.scope)
        .map(Json)
        .ok_or_else(|| SupervisorError::NotFound(id).into())
}

async fn by_domain(
    State(api): State<Api>,
    Path(domain): Path<String>,
) -> Result<Json<Process>, ApiError> {
    api.find(&ProcessKey::Domain(domain.clone()), Scope::Network)
        .map(Json)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no process serves {domain}")))
}

async fn kill(
    State(api): State<Api>,
    Path(id): Path<String>,
    uri: axum::http::Uri,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    if let Some((owner, record)) = api.owner(&id) {
        if !api.acts_for_others() {
            return Ok(redirect(&owner, &uri));
        }
        let killed = owner.kill_process(&record).await.map_err(forwarded)?;
        return Ok(Json(killed).into_response());
    }
    if let Some(stopped) = api.unrun.iter().find_map(|s| s.kill_unrun(&id)) {
        return Ok(Json(stopped).into_response());
    }
    Ok(Json(api.supervisor.kill(&id).await?).into_response())
}

/// `307 Temporary Redirect` to the same path on `owner`'s API: a member does not act on
/// another node's processes itself (its certificate may not), so the caller goes there with
/// its own certificate.
fn redirect(owner: &crate::Network, uri: &axum::http::Uri) -> Response {
    let path = uri.path_and_query().map_or(uri.path(), |p| p.as_str());
    let location = format!("https://{}{path}", owner.address());
    match HeaderValue::from_str(&location) {
        Ok(location) => (
            StatusCode::TEMPORARY_REDIRECT,
            [(header::LOCATION, location)],
        )
            .into_response(),
        Err(_) => ApiError::new(StatusCode::BAD_GATEWAY, "the owner's address is not a URL")
            .into_response(),
    }
}

async fn remove(
    State(api): State<Api>,
    Path(id): Path<String>,
    uri: axum::http::Uri,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    if let Some((owner, _)) = api.owner(&id) {
        if !api.acts_for_others() {
            return Ok(redirect(&owner, &uri));
        }
        owner.remove_process(&id).await.map_err(forwarded)?;
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    if api.supervisor.find(&ProcessKey::Id(id.clone())).is_none() && api.unrun_record(&id).is_some()
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "process {id} runs nowhere: the root keeps its record while the deployment wants it; give the deployment without it (`down`, or `apply`), or kill it"
            ),
        ));
    }
    api.supervisor.remove(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
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
