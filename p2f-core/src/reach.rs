//! Opening a port of a process on the node that runs it: the one check every way in makes
//! (the agent's tunnel `node/tunnel.rs`, the ingress's direct path on the root, a NAT'd
//! member's end of its link to the root), and the datagram framing that carries UDP over a
//! byte stream.
//!
//! A node opens only a port of a process it runs now, `Running`, of the asked generation:
//! the process's own `port` (TCP), or the target of one of its public ports (TCP or UDP).
//! Nothing else, whoever asks.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

pub use p2f_model::Protocol;
use p2f_model::{NodeName, Process, ProcessId, Status};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpStream, UdpSocket};

/// A byte stream to a process (TCP bytes, or UDP datagrams framed by [`write_datagram`]).
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// Why [`PortOpener::open`] did not open a port.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The node answered no.
    #[error(transparent)]
    Refused(Refusal),
    /// The node could not be asked.
    #[error("{0}")]
    Unreachable(String),
}

/// Something that opens ports of processes on some nodes by a way of its own (the relay's hub,
/// for nodes behind NAT linked to the root).
pub trait PortOpener: Send + Sync + 'static {
    /// Whether `node` is reached through this opener now.
    fn handles(&self, node: &NodeName) -> bool;
    /// A byte stream to the port `request` names on `node`; `None` when this opener does not
    /// handle `node`.
    fn open(
        &self,
        node: &NodeName,
        request: PortRequest,
    ) -> Option<futures_util::future::BoxFuture<'static, Result<Box<dyn Io>, OpenError>>>;
}

/// The longest connecting to one loopback address of a process's port may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A UDP flow with no datagram either way for this long is closed.
pub const UDP_IDLE: Duration = Duration::from_secs(120);
/// The largest datagram carried (IPv4's largest UDP payload).
pub const MAX_DATAGRAM: usize = 65_507;

/// The public ports' targets of a process: `(protocol, port on its node)`.
fn public_targets(process: &Process) -> impl Iterator<Item = (Protocol, u16)> + '_ {
    process
        .spec
        .public()
        .iter()
        .map(|p| (p.protocol(), p.target()))
}

/// `tcp` or `udp`, as queries and the tunnel's header name a protocol.
pub fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

/// Which port of a process, and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortRequest {
    /// The process.
    pub id: ProcessId,
    /// Only this copy (a copy the root replaced is refused); `None`: whichever runs here.
    pub generation: Option<u64>,
    /// TCP (a byte stream) or UDP (datagrams, framed by [`write_datagram`]).
    pub protocol: Protocol,
    /// The port on the node; `None`: the process's own `port`.
    pub port: Option<u16>,
}

/// Why a port was not opened: the HTTP status the agent's tunnel answers in the same case
/// (404 not here; 409 not running, another generation, not one of its ports; 502 the port
/// answers nothing) and a one-line message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// 404, 409 or 502.
    pub status: u16,
    /// Why, for people.
    pub message: String,
}

impl Refusal {
    fn new(status: u16, message: impl Into<String>) -> Refusal {
        Refusal {
            status,
            message: message.into(),
        }
    }
}

/// The port of `process` that `request` may open, or why not.
pub fn check(process: &Process, request: &PortRequest) -> Result<(Protocol, u16), Refusal> {
    let id = &request.id;
    let conflict = |message: String| Refusal::new(409, message);
    if process.status != Status::Running {
        return Err(conflict(format!(
            "{id} is not running here ({})",
            process.status
        )));
    }
    if let Some(generation) = request.generation
        && generation != process.generation
    {
        return Err(conflict(format!(
            "{id} runs here with generation {}, not {generation}",
            process.generation
        )));
    }
    let port = match request.port {
        Some(port) => port,
        None => process
            .port
            .ok_or_else(|| conflict(format!("{id} has no port")))?,
    };
    let own = request.protocol == Protocol::Tcp && process.port == Some(port);
    let public = public_targets(process).any(|target| target == (request.protocol, port));
    if !own && !public {
        return Err(conflict(format!(
            "{id} has no {} port {port} (its port: {})",
            request.protocol,
            process
                .port
                .map_or_else(|| "none".to_owned(), |p| p.to_string())
        )));
    }
    Ok((request.protocol, port))
}

/// A process's port, opened on its node.
#[derive(Debug)]
pub enum Opened {
    /// A TCP connection to it.
    Tcp(TcpStream),
    /// A UDP socket connected to it.
    Udp(UdpSocket),
}

impl Opened {
    /// As one byte stream: a TCP connection itself; a UDP socket behind a pipe whose other end
    /// a task relays as framed datagrams.
    pub fn into_io(self) -> Box<dyn Io> {
        match self {
            Opened::Tcp(stream) => Box::new(stream),
            Opened::Udp(socket) => {
                let (ours, theirs) = tokio::io::duplex(2 * (MAX_DATAGRAM + 2));
                tokio::spawn(async move {
                    let _ = relay_datagrams(theirs, socket).await;
                });
                Box::new(ours)
            }
        }
    }

    /// Carries `io` to the port until either side ends: TCP spliced as bytes, UDP as framed
    /// datagrams ([`relay_datagrams`]).
    pub async fn splice<T: AsyncRead + AsyncWrite + Unpin>(self, mut io: T) -> std::io::Result<()> {
        match self {
            Opened::Tcp(mut stream) => splice(&mut io, &mut stream).await,
            Opened::Udp(socket) => relay_datagrams(io, socket).await,
        }
    }
}

/// The buffer of each direction of a [`splice`]: 64 KiB (tokio's default of 8 KiB cost the
/// relay a third of its throughput: BENCHMARKS.md).
pub const SPLICE_BUFFER: usize = 64 * 1024;

/// The buffer a direction of a [`splice`] starts with; it grows to [`SPLICE_BUFFER`] once a
/// read fills it.
const FIRST_BUFFER: usize = 4 * 1024;

/// Copies both ways between `a` and `b` until both directions ended (each direction's end shuts
/// the other side's write half down).
///
/// A direction's buffer starts at 4 KiB and grows to [`SPLICE_BUFFER`] the first time a read
/// fills it, so an idle connection holds 8 KiB of buffers. tokio's
/// `copy_bidirectional_with_sizes` allocated both 64 KiB buffers zeroed at the start: after
/// bulk traffic had grown and trimmed the heap, `calloc` cleared them page by page, and 1 000
/// idle relayed connections cost the root 52 KiB each instead of 20 (BENCHMARKS.md, "Relay
/// for NAT'd members", run R3). The buffers are initialized memory: a reader that needs it
/// (a yamux stream, through `tokio_util::compat`) would otherwise clear the unfilled part at
/// every read.
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> std::io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut a_to_b, mut b_to_a) = (Direction::default(), Direction::default());
    std::future::poll_fn(|cx| {
        let ab = a_to_b.poll(cx, &mut *a, &mut *b)?;
        let ba = b_to_a.poll(cx, &mut *b, &mut *a)?;
        match (ab, ba) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    })
    .await
}

/// One direction of a [`splice`]: read into the buffer, write it all, flush when the reader
/// has nothing more for now; at the reader's end, shut the writer down.
#[derive(Default)]
struct Direction {
    /// Empty until the first read; then [`FIRST_BUFFER`], later [`SPLICE_BUFFER`] bytes.
    buffer: Vec<u8>,
    /// `buffer[start..end]` is read and not written yet.
    start: usize,
    end: usize,
    /// The last read filled the buffer: it grows once it is written out.
    grow: bool,
    /// The reader ended.
    read_done: bool,
    /// Written since the last flush.
    need_flush: bool,
    /// The writer is shut down: this direction is over.
    done: bool,
}

impl Direction {
    fn poll<R, W>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<std::io::Result<()>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        use std::pin::Pin;
        use std::task::ready;
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.start == self.end && !self.read_done {
                if self.grow || self.buffer.is_empty() {
                    let size = if self.grow {
                        SPLICE_BUFFER
                    } else {
                        FIRST_BUFFER
                    };
                    self.buffer = vec![0; size];
                    self.grow = false;
                }
                let mut read = tokio::io::ReadBuf::new(&mut self.buffer);
                match Pin::new(&mut *reader).poll_read(cx, &mut read) {
                    Poll::Ready(Ok(())) => {
                        let n = read.filled().len();
                        (self.start, self.end) = (0, n);
                        self.read_done = n == 0;
                        self.grow = n == self.buffer.len() && n < SPLICE_BUFFER;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        if self.need_flush {
                            ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }
            while self.start < self.end {
                let n = ready!(
                    Pin::new(&mut *writer).poll_write(cx, &self.buffer[self.start..self.end])
                )?;
                if n == 0 {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                self.start += n;
                self.need_flush = true;
            }
            if self.read_done {
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Where a port is tried, in order: `127.0.0.1`, `::1`, then the node's own address (`host`,
/// when it is an IP that is neither loopback nor unspecified): a service may bind loopback only.
pub fn candidates(host: &str, port: u16) -> Vec<SocketAddr> {
    let mut candidates: Vec<SocketAddr> = vec![
        (Ipv4Addr::LOCALHOST, port).into(),
        (Ipv6Addr::LOCALHOST, port).into(),
    ];
    if let Ok(ip) = host.parse::<IpAddr>()
        && !ip.is_loopback()
        && !ip.is_unspecified()
    {
        candidates.push((ip, port).into());
    }
    candidates
}

/// Opens `port` on this machine (`host` is the node's own address): TCP at the first candidate
/// that answers; UDP from a fresh loopback socket connected to `127.0.0.1:port` (a datagram
/// has no answer to wait for, so the node's own address is not tried).
pub async fn open(protocol: Protocol, port: u16, host: &str) -> Result<Opened, Refusal> {
    match protocol {
        Protocol::Tcp => connect_tcp(port, candidates(host, port))
            .await
            .map(Opened::Tcp),
        Protocol::Udp => {
            let failed = |e: std::io::Error| Refusal::new(502, format!("UDP port {port}: {e}"));
            let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
                .await
                .map_err(failed)?;
            socket
                .connect((Ipv4Addr::LOCALHOST, port))
                .await
                .map_err(failed)?;
            Ok(Opened::Udp(socket))
        }
    }
}

/// A TCP connection to `port` at the first of `candidates` that takes it.
async fn connect_tcp(port: u16, candidates: Vec<SocketAddr>) -> Result<TcpStream, Refusal> {
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
    Err(Refusal::new(
        502,
        format!("port {port} does not answer on this machine ({last})"),
    ))
}

/// The processes of one node as its supervisor has them now: what a request to open a port is
/// checked against. `node/mod.rs` builds it from the supervisor (the rooms that use it never
/// name `node`).
#[derive(Clone)]
pub struct LocalProcesses {
    node: NodeName,
    host: String,
    find: Arc<FindProcess>,
}

/// How [`LocalProcesses`] looks a process up: its supervisor's record of the id, now.
type FindProcess = dyn Fn(&ProcessId) -> Option<Process> + Send + Sync;

impl std::fmt::Debug for LocalProcesses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalProcesses")
            .field("node", &self.node)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl LocalProcesses {
    /// The processes of node `node` (whose own address is `host`, tried after loopback),
    /// looked up by `find` (the supervisor's record of an id, now).
    pub fn new(
        node: NodeName,
        host: impl Into<String>,
        find: impl Fn(&ProcessId) -> Option<Process> + Send + Sync + 'static,
    ) -> LocalProcesses {
        LocalProcesses {
            node,
            host: host.into(),
            find: Arc::new(find),
        }
    }

    /// The node they run on.
    pub fn node(&self) -> &NodeName {
        &self.node
    }

    /// The port `request` may open now ([`check`]), 404 when the process is not here.
    pub fn check(&self, request: &PortRequest) -> Result<(Protocol, u16), Refusal> {
        let id = &request.id;
        let process =
            (self.find)(id).ok_or_else(|| Refusal::new(404, format!("no process {id} here")))?;
        check(&process, request)
    }

    /// Checks `request` and opens its port.
    pub async fn open(&self, request: &PortRequest) -> Result<Opened, Refusal> {
        let (protocol, port) = self.check(request)?;
        open(protocol, port, &self.host).await
    }
}

/// Writes one datagram as a frame: its length (2 bytes, big-endian), then its bytes.
///
/// # Errors
/// A datagram longer than [`MAX_DATAGRAM`] (`InvalidInput`), or the writer's error.
pub async fn write_datagram<W: AsyncWrite + Unpin>(
    w: &mut W,
    datagram: &[u8],
) -> std::io::Result<()> {
    let len = u16::try_from(datagram.len())
        .ok()
        .filter(|n| usize::from(*n) <= MAX_DATAGRAM)
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "datagram too long")
        })?;
    let mut frame = Vec::with_capacity(2 + datagram.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(datagram);
    w.write_all(&frame).await?;
    w.flush().await
}

/// Reads one framed datagram into `buf` (which must hold [`MAX_DATAGRAM`] bytes); `Ok(None)` at
/// a clean end of the stream.
///
/// # Errors
/// A frame longer than [`MAX_DATAGRAM`] (`InvalidData`), a stream ending inside a frame, or the
/// reader's error.
pub async fn read_datagram<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
) -> std::io::Result<Option<usize>> {
    let mut len = [0u8; 2];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = usize::from(u16::from_be_bytes(len));
    if len > MAX_DATAGRAM || len > buf.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a datagram frame of {len} bytes"),
        ));
    }
    r.read_exact(&mut buf[..len]).await?;
    Ok(Some(len))
}

/// Carries framed datagrams from `io` to the connected `socket` and the socket's datagrams back
/// as frames, until `io` ends, fails, or nothing moves for [`UDP_IDLE`].
pub async fn relay_datagrams<T: AsyncRead + AsyncWrite + Unpin>(
    io: T,
    socket: UdpSocket,
) -> std::io::Result<()> {
    let (mut read, mut write) = tokio::io::split(io);
    let socket = Arc::new(socket);
    let (activity, mut seen) = tokio::sync::watch::channel(());
    let inbound = {
        let socket = Arc::clone(&socket);
        let activity = activity.clone();
        async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Some(n) = read_datagram(&mut read, &mut buf).await? {
                // A refused datagram (nothing listens yet) is dropped, as UDP does.
                let _ = socket.send(&buf[..n]).await;
                let _ = activity.send(());
            }
            Ok::<_, std::io::Error>(())
        }
    };
    let outbound = async move {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            match socket.recv(&mut buf).await {
                Ok(n) => {
                    write_datagram(&mut write, &buf[..n]).await?;
                    let _ = activity.send(());
                }
                // ICMP port unreachable from an earlier send: nothing listens yet.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(e) => return Err::<(), _>(e),
            }
        }
    };
    let idle = async move {
        loop {
            match tokio::time::timeout(UDP_IDLE, seen.changed()).await {
                Ok(Ok(())) => {}
                _ => return Ok::<(), std::io::Error>(()),
            }
        }
    };
    tokio::select! {
        r = inbound => r,
        r = outbound => r,
        r = idle => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes cross both ways, larger than a buffer; each side's end reaches the other as
    /// end of stream, and the splice ends once both have.
    #[tokio::test]
    async fn splice_copies_both_ways_and_passes_each_end_on() {
        let (mut client, mut a) = tokio::io::duplex(4096);
        let (mut b, mut server) = tokio::io::duplex(4096);
        let spliced = tokio::spawn(async move { splice(&mut a, &mut b).await });
        let up: Vec<u8> = (0..3 * SPLICE_BUFFER + 17)
            .map(|i| (i % 251) as u8)
            .collect();
        let down: Vec<u8> = (0..SPLICE_BUFFER + 5).map(|i| (i % 241) as u8).collect();
        let (up2, down2) = (up.clone(), down.clone());
        let client_side = tokio::spawn(async move {
            client.write_all(&up2).await.expect("write up");
            client.shutdown().await.expect("end up");
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.expect("read down");
            got
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.expect("read up");
        assert_eq!(got, up, "client to server");
        server.write_all(&down2).await.expect("write down");
        server.shutdown().await.expect("end down");
        let got = tokio::time::timeout(Duration::from_secs(10), client_side)
            .await
            .expect("in time")
            .expect("client task");
        assert_eq!(got, down, "server to client");
        tokio::time::timeout(Duration::from_secs(10), spliced)
            .await
            .expect("the splice ends")
            .expect("task")
            .expect("no error");
    }

    #[tokio::test]
    async fn datagrams_round_trip_through_frames() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        for datagram in [&b""[..], b"x", &[7u8; MAX_DATAGRAM][..]] {
            write_datagram(&mut a, datagram).await.expect("write");
            let mut buf = vec![0u8; MAX_DATAGRAM];
            let n = read_datagram(&mut b, &mut buf).await.expect("read");
            assert_eq!(n, Some(datagram.len()));
            assert_eq!(&buf[..datagram.len()], datagram);
        }
        drop(a);
        let mut buf = vec![0u8; MAX_DATAGRAM];
        assert_eq!(read_datagram(&mut b, &mut buf).await.expect("end"), None);
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        a.write_all(&u16::MAX.to_be_bytes()).await.expect("write");
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let e = read_datagram(&mut b, &mut buf).await.expect_err("too long");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(
            write_datagram(&mut a, &vec![0; MAX_DATAGRAM + 1])
                .await
                .is_err()
        );
    }
}
