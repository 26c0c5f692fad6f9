//! The root's routes, merged into the node's control API on the root: `PUT|GET
//! /v1/deployment` (the desired services), `POST /v1/processes/{id}/move` (migrate),
//! `POST /v1/join-tokens` (a new join token) and `POST /v1/join` (with a join token, the CA
//! signs a member's certificate). On every other node the same paths answer `409` saying so
//! ([`elsewhere`]). `docs/api.md` is the reference.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use p2f_model::{NodeName, Process};

use super::issued::Issued;
use super::tokens::{TokenBook, TokenBookError};
use super::{MigrateError, Root, RootError};
use crate::api_error::{ApiError, forwarded, parse_id};
use crate::cluster::{ClusterCa, Secret};
use crate::identity::Role;
use crate::join::{JoinRequest, JoinResponse, JoinToken};
use crate::records::Records;
use crate::trust::gossip_keys::GossipKeys;
use crate::trust::revoked::{Revocation, Revoked};
use crate::wire::{
    DeploymentRequest, DesiredState, MoveRequest, OperatorRequest, OperatorResponse, RemovalReport,
    RotationReport, TokenRequest, TokenResponse,
};

/// The root-only paths.
const DEPLOYMENT: &str = "/v1/deployment";
const MOVE: &str = "/v1/processes/{id}/move";
const JOIN: &str = "/v1/join";
const JOIN_TOKENS: &str = "/v1/join-tokens";
const ROTATE_KEY: &str = "/v1/cluster/rotate-key";
const OPERATORS: &str = "/v1/operators";
const OPERATOR: &str = "/v1/operators/{name}";
const NODE: &str = "/v1/nodes/{name}";

#[derive(Clone)]
struct RootApi {
    root: Root,
    /// The cluster CA with its key.
    ca: Arc<ClusterCa>,
    records: Records,
    /// The root's own name (no member may take it) and hosts (no member may claim them).
    own: NodeName,
    own_hosts: Arc<[String]>,
    /// The gossip keys: a join hands out the primary's secret; a rotation changes them.
    gossip_keys: Arc<GossipKeys>,
    /// One rotation at a time.
    rotating: Arc<tokio::sync::Mutex<()>>,
    /// The certificates every node refuses, and those the CA issued.
    revoked: Arc<Revoked>,
    issued: Arc<Issued>,
    tokens: Arc<TokenBook>,
    /// The root's API and gossip addresses, as join tokens name them.
    api_address: Arc<str>,
    gossip_address: Option<Arc<str>>,
}

/// What the root's routes need besides the root itself.
#[allow(missing_debug_implementations)]
pub struct RootApiParts {
    /// The cluster CA, with its key.
    pub ca: ClusterCa,
    /// The network's records.
    pub records: Records,
    /// The root's node name.
    pub own: NodeName,
    /// The names and addresses the root's own certificate carries.
    pub own_hosts: Vec<String>,
    /// The root's gossip keys (a joining member gets the primary's secret).
    pub gossip_keys: Arc<GossipKeys>,
    /// The certificates every node refuses.
    pub revoked: Arc<Revoked>,
    /// The certificates the CA issued.
    pub issued: Issued,
    /// The join tokens.
    pub tokens: TokenBook,
    /// The root's API address (`host:port`), for join tokens.
    pub api_address: String,
    /// The root's gossip address, for join tokens.
    pub gossip_address: Option<String>,
}

/// The root's routes (without authorization: the node's API adds it to every route; only the
/// root's and operators' certificates reach these, but `POST /v1/join`, which needs none).
pub fn routes(root: Root, parts: RootApiParts) -> Router {
    let api = RootApi {
        root,
        ca: Arc::new(parts.ca),
        records: parts.records,
        own: parts.own,
        own_hosts: parts.own_hosts.into(),
        gossip_keys: parts.gossip_keys,
        rotating: Arc::default(),
        revoked: parts.revoked,
        issued: Arc::new(parts.issued),
        tokens: Arc::new(parts.tokens),
        api_address: parts.api_address.into(),
        gossip_address: parts.gossip_address.map(Into::into),
    };
    Router::new()
        .route(DEPLOYMENT, get(desired).put(set_desired))
        .route(MOVE, post(migrate))
        .route(JOIN, post(join))
        .route(JOIN_TOKENS, post(new_token))
        .route(ROTATE_KEY, post(rotate_key))
        .route(OPERATORS, post(add_operator))
        .route(OPERATOR, delete(remove_operator))
        .route(NODE, delete(remove_node))
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
        .route(JOIN_TOKENS, post(not_root))
        .route(ROTATE_KEY, post(not_root))
        .route(OPERATORS, post(not_root))
        .route(OPERATOR, delete(not_root))
        .route(NODE, delete(not_root))
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

async fn new_token(
    State(api): State<RootApi>,
    body: Result<Json<TokenRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<TokenResponse>), ApiError> {
    let Json(request) = body?;
    let token = JoinToken::generate(
        api.api_address.to_string(),
        api.gossip_address.as_deref().map(str::to_owned),
        api.ca.cert_pem().to_owned(),
    );
    let ttl = std::time::Duration::from_secs(request.ttl_secs);
    let expires_at = api
        .tokens
        .add(&token, ttl, request.uses)
        .map_err(|e| match e {
            TokenBookError::Invalid(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
            }
            other => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
        })?;
    tracing::info!(uses = request.uses, ttl = ?ttl, "made a join token");
    Ok((
        StatusCode::CREATED,
        Json(TokenResponse {
            token: token.encode(),
            expires_at,
            uses: request.uses,
        }),
    ))
}

async fn join(
    State(api): State<RootApi>,
    body: Result<Json<JoinRequest>, JsonRejection>,
) -> Result<Json<JoinResponse>, ApiError> {
    let Json(request) = body?;
    let sign = || -> Result<String, ApiError> {
        // Members are identified by name: a second live node with the same one would take
        // over the first one's records. A dead member's name may be taken again (a
        // reinstalled machine).
        let nodes = api.records.nodes();
        let taken =
            request.name == api.own || nodes.iter().any(|n| n.alive && n.node.name == request.name);
        if taken {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "a live node is already called {}: choose another node name (`--name`, or `name` in node.toml), or wait until that node has been gone for a few seconds",
                    request.name
                ),
            ));
        }
        // The CA vouches only for addresses no other node has.
        for host in &request.hosts {
            let host = host.trim().trim_start_matches('[').trim_end_matches(']');
            let claimed_by = nodes
                .iter()
                .filter(|n| n.node.name != request.name)
                .find(|n| {
                    node_hosts(&n.node)
                        .iter()
                        .any(|h| h.eq_ignore_ascii_case(host))
                })
                .map(|n| n.node.name.to_string())
                .or_else(|| {
                    api.own_hosts
                        .iter()
                        .any(|h| h.eq_ignore_ascii_case(host) && !is_loopback(h))
                        .then(|| api.own.to_string())
                });
            if let Some(owner) = claimed_by {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!(
                        "host {host} belongs to node {owner}: a certificate for it is not signed for another node"
                    ),
                ));
            }
        }
        let cert_pem = api
            .ca
            .sign(request.name.as_str(), &request.hosts, &request.csr_pem)
            .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
        api.issued
            .record(&cert_pem)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        Ok(cert_pem)
    };
    let cert_pem = api
        .tokens
        .redeem(&request.token, sign)
        .map_err(|e| match e {
            Ok(refused) => ApiError::new(StatusCode::UNAUTHORIZED, refused.to_string()),
            Err(api_error) => api_error,
        })?;
    tracing::info!(member = %request.name, "signed a member's certificate");
    Ok(Json(JoinResponse {
        cert_pem,
        gossip_secret: api.gossip_keys.primary().expose().to_owned(),
    }))
}

/// The hosts a node is known by: its API address's host and its IP addresses.
fn node_hosts(node: &p2f_model::Node) -> Vec<String> {
    let mut hosts = Vec::new();
    if let Some(api) = node.api_address() {
        let host = api.rsplit_once(':').map_or(api.as_str(), |(host, _)| host);
        hosts.push(
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
        );
    }
    hosts.extend(node.ipv4.map(|ip| ip.to_string()));
    hosts.extend(node.ipv6.map(|ip| ip.to_string()));
    hosts.retain(|h| !is_loopback(h));
    hosts
}

/// `localhost`, `127.0.0.1` and `::1`: every node's certificate has them, for local tools.
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| {
            ip == std::net::IpAddr::from([127, 0, 0, 1]) || ip == std::net::Ipv6Addr::LOCALHOST
        })
}

/// Rotates the cluster's gossip key on every live node, in three rounds so that every node
/// always accepts what every other sends: install the new key everywhere, make it primary
/// everywhere, remove the old one everywhere. A node that cannot take the new key in the first
/// round stops the rotation, and the new key is removed where it was installed: nothing
/// changed. Dead nodes are skipped and named (they must join again).
async fn rotate_key(State(api): State<RootApi>) -> Result<Json<RotationReport>, ApiError> {
    rotate(&api, None).await.map(Json)
}

/// [`rotate_key`], leaving node `without` out (it is being removed).
async fn rotate(api: &RootApi, without: Option<&NodeName>) -> Result<RotationReport, ApiError> {
    let _one_at_a_time = api.rotating.lock().await;
    let mesh = Some(api.records.mesh());
    let old = api
        .gossip_keys
        .list()
        .into_iter()
        .find(|k| k.primary)
        .map(|k| k.id)
        .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "no primary gossip key"))?;
    let nodes = api.records.nodes();
    let mut members = Vec::new();
    let mut skipped = Vec::new();
    for status in nodes
        .iter()
        .filter(|n| n.node.name != api.own && Some(&n.node.name) != without)
    {
        let name = status.node.name.clone();
        match (status.alive, api.records.client_for(&name)) {
            (true, Some(client)) => members.push((name, client)),
            _ => skipped.push(name),
        }
    }
    let failed = |round: &str, node: &NodeName, e: &dyn std::fmt::Display| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("the rotation stopped at {round} on {node}: {e}"),
        )
    };
    let secret = Secret::generate();
    let new = api.gossip_keys.install(&secret, mesh)?;
    let mut installed: Vec<&(NodeName, crate::Network)> = Vec::new();
    for member in &members {
        if let Err(e) = bounded(&member.1, member.1.install_gossip_key(&secret)).await {
            for (_, client) in installed {
                let _ = bounded(client, client.remove_gossip_key(new)).await;
            }
            let _ = api.gossip_keys.remove(new, mesh);
            return Err(failed(
                "installing the new key (nothing changed)",
                &member.0,
                &e,
            ));
        }
        installed.push(member);
    }
    for (name, client) in &members {
        bounded(client, client.use_gossip_key(new))
            .await
            .map_err(|e| {
                failed(
                    "switching to the new key (the old one stays accepted everywhere)",
                    name,
                    &e,
                )
            })?;
    }
    api.gossip_keys.use_key(new, mesh)?;
    for (name, client) in &members {
        bounded(client, client.remove_gossip_key(old))
            .await
            .map_err(|e| failed("removing the old key", name, &e))?;
    }
    api.gossip_keys.remove(old, mesh)?;
    let mut rotated: Vec<NodeName> = members.into_iter().map(|(name, _)| name).collect();
    rotated.push(api.own.clone());
    tracing::info!(%old, %new, ?skipped, "gossip key rotated");
    Ok(RotationReport {
        old,
        new,
        rotated,
        skipped,
    })
}

async fn add_operator(
    State(api): State<RootApi>,
    body: Result<Json<OperatorRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<OperatorResponse>), ApiError> {
    let Json(request) = body?;
    let cert_pem = api
        .ca
        .sign_as(Role::Operator, request.name.as_str(), &[], &request.csr_pem)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    api.issued
        .record(&cert_pem)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    tracing::info!(operator = %request.name, "signed an operator's certificate");
    Ok((
        StatusCode::CREATED,
        Json(OperatorResponse {
            cert_pem,
            ca_pem: api.ca.cert_pem().to_owned(),
        }),
    ))
}

/// Revokes every certificate issued to `role` `name`, and gives the list to every live node
/// but `without`; returns the whole list.
async fn revoke(
    api: &RootApi,
    role: Role,
    name: &str,
    without: Option<&NodeName>,
) -> Result<(usize, Vec<Revocation>), ApiError> {
    let issued = api.issued.of(role, name);
    if issued.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no {role} {name} was ever admitted by this root"),
        ));
    }
    let now = super::tokens::now_secs();
    let count = issued.len();
    let entries = issued
        .into_iter()
        .map(|cert| Revocation {
            serial: cert.serial,
            role,
            name: cert.name,
            at: now,
        })
        .collect();
    let list = api
        .revoked
        .add(entries)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    for status in api.records.nodes() {
        let name = &status.node.name;
        if !status.alive || *name == api.own || Some(name) == without {
            continue;
        }
        let Some(client) = api.records.client_for(name) else {
            continue;
        };
        // A node that misses it fetches it from the root within a minute.
        if let Err(e) = bounded(&client, client.put_revoked(&list)).await {
            tracing::warn!(node = %name, "cannot give the revocation list: {e}");
        }
    }
    tracing::info!(%role, %name, count, "revoked");
    Ok((count, list))
}

async fn remove_operator(
    State(api): State<RootApi>,
    Path(name): Path<String>,
) -> Result<Json<Vec<Revocation>>, ApiError> {
    let (_, list) = revoke(&api, Role::Operator, &name, None).await?;
    Ok(Json(list))
}

/// Removes member `name`: its certificates are refused by every node, and the gossip key is
/// rotated without it, so it is no longer heard; the root then sees it lost and places its
/// processes elsewhere.
async fn remove_node(
    State(api): State<RootApi>,
    Path(name): Path<String>,
) -> Result<Json<RemovalReport>, ApiError> {
    let node =
        NodeName::new(&name).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    if node == api.own {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "the root cannot remove itself",
        ));
    }
    let (revoked, _) = revoke(&api, Role::Member, node.as_str(), Some(&node)).await?;
    let rotation = rotate(&api, Some(&node)).await?;
    Ok(Json(RemovalReport { revoked, rotation }))
}

/// How long the root waits for one node's answer in a rotation or a revocation (a node that
/// hangs must not hold the others up for the client's 5 minutes).
const NODE_CALL_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// `call` to `client`'s node, given up after [`NODE_CALL_LIMIT`].
async fn bounded<T>(
    client: &crate::Network,
    call: impl std::future::Future<Output = Result<T, crate::ClientError>>,
) -> Result<T, crate::ClientError> {
    tokio::time::timeout(NODE_CALL_LIMIT, call)
        .await
        .unwrap_or_else(|_| {
            Err(crate::ClientError::Unreachable {
                address: client.address().to_owned(),
                detail: format!(
                    "no answer within {}",
                    p2f_model::format_duration(NODE_CALL_LIMIT)
                ),
            })
        })
}
