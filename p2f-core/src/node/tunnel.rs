//! The agent's end of the ingress's tunnel:
//! `GET /v1/processes/{id}/tunnel[?generation=N&port=P&protocol=tcp|udp]` with
//! `Connection: upgrade` and `Upgrade: p2f-tunnel` (authenticated like every route of the
//! control API, over its TLS). For a process this agent runs, `Running`, it opens the port
//! (the process's own, or the target of one of its public ports: `reach::check`) on this
//! machine — TCP on loopback first (`127.0.0.1`, then `::1`, then the node's own address), UDP
//! from a loopback socket — answers `101 Switching Protocols` and splices the two: bytes for
//! TCP, framed datagrams for UDP. Only the ports of this agent's own running processes can be
//! opened, never an arbitrary one.

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::TokioIo;
use p2f_model::ProcessKey;

use super::supervisor::Supervisor;
use crate::api_error::{ApiError, parse_id};
use crate::reach::{PortRequest, Refusal};
use crate::wire::{TUNNEL_PROTOCOL, TunnelQuery};

/// The tunnel's route, for the node's API.
pub fn routes(supervisor: Supervisor) -> Router {
    Router::new()
        .route("/v1/processes/{id}/tunnel", get(open))
        .with_state(supervisor)
}

fn refused(refusal: Refusal) -> ApiError {
    let status = StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::CONFLICT);
    ApiError::new(status, refusal.message)
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
    let port_request = PortRequest {
        id: id.clone(),
        generation: query.generation,
        protocol: query.protocol.unwrap_or(p2f_model::Protocol::Tcp),
        port: query.port,
    };
    let (protocol, port) = crate::reach::check(&process, &port_request).map_err(refused)?;
    let opened = crate::reach::open(protocol, port, &supervisor.node().address)
        .await
        .map_err(refused)?;
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                if let Err(e) = opened.splice(TokioIo::new(upgraded)).await {
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
