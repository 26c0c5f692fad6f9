//! The relay for nodes behind NAT: a member the root cannot reach keeps one outbound link to
//! the root — TLS with both nodes' certificates (the control API's own listener, upgraded with
//! `Upgrade: p2f-link`), carrying a yamux session — and the root opens streams on it.
//!
//! - [`link`] — the member's end: finds out whether the root reaches it (`[relay] via_root`:
//!   `auto` asks the root to try), keeps the link up (reconnecting with backoff and jitter),
//!   and serves each stream: its own control API, a port of one of its processes
//!   ([`crate::reach`]'s checks), or a ping.
//! - [`hub`] — the root's end: the links by node, a loopback forwarder per linked node that the
//!   cluster's client dials instead of the node's address (so every call to its API — placing,
//!   killing, fetching records, logs — goes through the link with TLS end to end), streams to
//!   processes' ports for the ingress and public ports, the round-trip time, and
//!   `GET /v1/relay/nodes/{name}` for other members.
//! - [`detour`] — on members, a loopback forwarder per node reached via the root, through that
//!   route.
//!
//! Every stream starts with an [`Open`] header from the root and an [`Answer`] from the member.

pub mod detour;
pub mod hub;
pub mod link;
pub mod session;

use p2f_model::ProcessId;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use crate::reach::{PortRequest, Protocol, Refusal};

/// The `Upgrade` protocol of the link (`GET /v1/relay/link` on the root).
pub const LINK_PROTOCOL: &str = "p2f-link";
/// The `Upgrade` protocol of a member's connection to another node's API through the root
/// (`GET /v1/relay/nodes/{name}`).
pub const VIA_ROOT_PROTOCOL: &str = "p2f-via-root";

/// The header's version byte.
const VERSION: u8 = 1;
/// The longest a stream's header or answer may take to arrive.
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// What a stream the root opens is for: its first bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Open {
    /// A connection to the member's control API (TLS end to end inside the stream).
    Api,
    /// A port of a process the member runs.
    Port(PortRequest),
    /// Echo 8 bytes (the link's round-trip time).
    Ping,
}

/// Why a stream's header or answer could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// The stream.
    #[error("tunnel stream: {0}")]
    Io(#[from] std::io::Error),
    /// Bytes that are no header of this version.
    #[error("bad tunnel stream header: {0}")]
    Malformed(String),
}

impl Open {
    /// Its encoding: version, kind (1 API, 2 port, 3 ping); a port adds the generation (8 bytes,
    /// 0 for any), the protocol (0 TCP, 1 UDP), the port (2 bytes, 0 for the process's own),
    /// the id's length (1 byte) and the id. Big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION];
        match self {
            Open::Api => out.push(1),
            Open::Ping => out.push(3),
            Open::Port(request) => {
                out.push(2);
                out.extend_from_slice(&request.generation.unwrap_or(0).to_be_bytes());
                out.push(match request.protocol {
                    Protocol::Tcp => 0,
                    Protocol::Udp => 1,
                });
                out.extend_from_slice(&request.port.unwrap_or(0).to_be_bytes());
                let id = request.id.as_str().as_bytes();
                // Process ids are at most 128 bytes (`ProcessId::new`).
                out.push(u8::try_from(id.len()).unwrap_or(u8::MAX));
                out.extend_from_slice(&id[..id.len().min(usize::from(u8::MAX))]);
            }
        }
        out
    }

    /// Reads a header.
    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Open, HeaderError> {
        let mut head = [0u8; 2];
        r.read_exact(&mut head).await?;
        if head[0] != VERSION {
            return Err(HeaderError::Malformed(format!("version {}", head[0])));
        }
        match head[1] {
            1 => Ok(Open::Api),
            3 => Ok(Open::Ping),
            2 => {
                let mut fixed = [0u8; 12];
                r.read_exact(&mut fixed).await?;
                let generation = u64::from_be_bytes(fixed[..8].try_into().unwrap_or_default());
                let protocol = match fixed[8] {
                    0 => Protocol::Tcp,
                    1 => Protocol::Udp,
                    other => return Err(HeaderError::Malformed(format!("protocol {other}"))),
                };
                let port = u16::from_be_bytes([fixed[9], fixed[10]]);
                let mut id = vec![0u8; usize::from(fixed[11])];
                r.read_exact(&mut id).await?;
                let id = String::from_utf8(id)
                    .ok()
                    .and_then(|id| ProcessId::new(id).ok())
                    .ok_or_else(|| HeaderError::Malformed("not a process id".into()))?;
                Ok(Open::Port(PortRequest {
                    id,
                    generation: (generation != 0).then_some(generation),
                    protocol,
                    port: (port != 0).then_some(port),
                }))
            }
            other => Err(HeaderError::Malformed(format!("kind {other}"))),
        }
    }

    /// Writes the header.
    pub async fn write<W: AsyncWrite + Unpin>(&self, w: &mut W) -> std::io::Result<()> {
        w.write_all(&self.encode()).await?;
        w.flush().await
    }
}

/// The member's answer to a header: `Ok` (then the stream carries what was asked) or a
/// [`Refusal`]. Encoded as the status (2 bytes; 200 for yes), the message's length (2 bytes)
/// and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer(pub Result<(), Refusal>);

impl Answer {
    /// Writes the answer.
    pub async fn write<W: AsyncWrite + Unpin>(&self, w: &mut W) -> std::io::Result<()> {
        let (status, message) = match &self.0 {
            Ok(()) => (200u16, ""),
            Err(refusal) => (refusal.status, refusal.message.as_str()),
        };
        let message = &message.as_bytes()[..message.len().min(1024)];
        let mut out = Vec::with_capacity(4 + message.len());
        out.extend_from_slice(&status.to_be_bytes());
        out.extend_from_slice(&u16::try_from(message.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(message);
        w.write_all(&out).await?;
        w.flush().await
    }

    /// Reads an answer.
    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Answer, HeaderError> {
        let mut head = [0u8; 4];
        r.read_exact(&mut head).await?;
        let status = u16::from_be_bytes([head[0], head[1]]);
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        if len > 1024 {
            return Err(HeaderError::Malformed(format!("an answer of {len} bytes")));
        }
        let mut message = vec![0u8; len];
        r.read_exact(&mut message).await?;
        if status == 200 {
            return Ok(Answer(Ok(())));
        }
        Ok(Answer(Err(Refusal {
            status,
            message: String::from_utf8_lossy(&message).into_owned(),
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn headers_round_trip() {
        let id = ProcessId::new("web-3f2a").expect("id");
        for open in [
            Open::Api,
            Open::Ping,
            Open::Port(PortRequest {
                id: id.clone(),
                generation: Some(7),
                protocol: Protocol::Udp,
                port: Some(10000),
            }),
            Open::Port(PortRequest {
                id,
                generation: None,
                protocol: Protocol::Tcp,
                port: None,
            }),
        ] {
            let bytes = open.encode();
            let read = Open::read(&mut bytes.as_slice()).await.expect("header");
            assert_eq!(read, open);
        }
    }

    #[tokio::test]
    async fn bad_headers_are_refused() {
        for bytes in [
            &[2u8, 1][..],
            &[1, 9],
            &[1, 2, 0, 0, 0, 0, 0, 0, 0, 1, 5, 0, 80, 1, b'x'],
            &[1, 2, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 80, 2, b'.', b'x'],
            &[1, 2, 0, 0],
        ] {
            assert!(Open::read(&mut &bytes[..]).await.is_err(), "{bytes:?}");
        }
    }

    #[tokio::test]
    async fn answers_round_trip() {
        for answer in [
            Answer(Ok(())),
            Answer(Err(Refusal {
                status: 409,
                message: "web is not running here (stopped)".into(),
            })),
        ] {
            let mut bytes = Vec::new();
            answer.write(&mut bytes).await.expect("write");
            assert_eq!(
                Answer::read(&mut bytes.as_slice()).await.expect("read"),
                answer
            );
        }
    }
}
