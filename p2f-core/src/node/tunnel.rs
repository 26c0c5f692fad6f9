//! The agent's end of the ingress's tunnel: `GET /v1/processes/{id}/tunnel[?generation=N]`
//! with `Connection: upgrade` and `Upgrade: p2f-tunnel` (authenticated like every route of the
//! control API, over its TLS). For a process this agent runs, `Running`, with a port, it
//! connects to that port on this machine's loopback (`127.0.0.1`, then `::1`, then the node's
//! own address), answers `101 Switching Protocols` and splices the two connections. Only the
//! ports of this agent's own running processes can be opened, never an arbitrary one.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::TokioIo;
use p2f_model::{ProcessKey, Status};
use tokio::net::TcpStream;

use super::supervisor::Supervisor;
use crate::api_error::{ApiError, parse_id};
use crate::wire::{TUNNEL_PROTOCOL, TunnelQuery};

/// The longest the agent tries to connect to the process's port.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The tunnel's route, for the node's API.
pub fn routes(supervisor: Supervisor) -> Router {
    Router::new()
        .route("/v1/processes/{id}/tunnel", get(open))
        .with_state(supervisor)
}

async fn open(
    State(supervisor): State<Supervisor>,
    Path(id): Path<String>,
    query: Result<Query<TunnelQuery>, QueryRejection>,
    mut request: Request,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let id = parse_id(&id)?;
    let asked = request.headers().get(header::UPGRADE).is_some_and(|p| {
        p.as_bytes()
            .eq_ignore_ascii_case(TUNNEL_PROTOCOL.as_bytes())
    });
    if !asked {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            format!("the tunnel needs Connection: upgrade and Upgrade: {TUNNEL_PROTOCOL}"),
        ));
    }
    let process = supervisor
        .find(&ProcessKey::Id(id.clone()))
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no process {id} here")))?;
    let conflict = |why: String| ApiError::new(StatusCode::CONFLICT, why);
    if process.status != Status::Running {
        return Err(conflict(format!(
            "{id} is not running here ({})",
            process.status
        )));
    }
    if let Some(generation) = query.generation
        && generation != process.generation
    {
        return Err(conflict(format!(
            "{id} runs here with generation {}, not {generation}",
            process.generation
        )));
    }
    let port = process
        .port
        .ok_or_else(|| conflict(format!("{id} has no port")))?;
    let stream = connect_local(port, &supervisor.node().address).await?;
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let (mut tunnel, mut stream) = (TokioIo::new(upgraded), stream);
                if let Err(e) = tokio::io::copy_bidirectional(&mut tunnel, &mut stream).await {
                    tracing::debug!(%id, "tunnel ended: {e}");
                }
            }
            Err(e) => tracing::debug!(%id, "tunnel upgrade failed: {e}"),
        }
    });
    Ok((
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::CONNECTION, HeaderValue::from_static("upgrade")),
            (header::UPGRADE, HeaderValue::from_static(TUNNEL_PROTOCOL)),
        ],
    )
        .into_response())
}

/// A connection to `port` on this machine: loopback first (a service may bind only there),
/// then the node's own address.
async fn connect_local(port: u16, own_host: &str) -> Result<TcpStream, ApiError> {
    let mut candidates: Vec<SocketAddr> = vec![([127, 0, 0, 1], port).into()];
    candidates.push((std::net::Ipv6Addr::LOCALHOST, port).into());
    if let Ok(ip) = own_host.parse::<std::net::IpAddr>()
        && !ip.is_loopback()
        && !ip.is_unspecified()
    {
        candidates.push((ip, port).into());
    }
    let mut last = String::new();
    for address in candidates {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) => last = format!("{address}: {e}"),
            Err(_) => last = format!("{address}: no answer within {CONNECT_TIMEOUT:?}"),
        }
    }
    Err(ApiError::new(
        StatusCode::BAD_GATEWAY,
        format!("port {port} does not answer on this machine ({last})"),
    ))
}
