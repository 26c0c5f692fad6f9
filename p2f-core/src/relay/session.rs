//! One tunnel's multiplexing: a yamux session over the link's TLS connection, driven by a task
//! of its own. The root opens streams ([`Opener::open`]); the member accepts them
//! ([`Session::start`]'s `inbound` callback). Each stream is a tokio byte stream.

use std::future::poll_fn;
use std::task::Poll;

use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt as _, TokioAsyncReadCompatExt as _};

use crate::reach::Io;

/// One stream of a tunnel: a byte stream both ways; shutting down its write half sends yamux's
/// FIN.
pub type Stream = Compat<yamux::Stream>;

/// Streams open at once on one tunnel, at most (yamux refuses more). The member's link never
/// opens any: only the root does.
pub const MAX_STREAMS: usize = 4096;

/// The largest data frame yamux sends: one 64 KiB read of a splice becomes one frame (and
/// four TLS records) rather than four frames (yamux's default is 16 KiB).
const FRAME_SIZE: usize = 64 * 1024;

/// How far busy streams' receive windows may grow, together, beyond yamux's 256 KiB each:
/// yamux doubles a stream's window when its sender uses half of it within two round trips, so
/// a stream that moves bulk data gets a window of a few MiB. 256 KiB per stream only is
/// enough on an idle network but not when the relaying processes wait for a CPU: 64 KiB frames
/// without growth ran at 0.70–0.78× rathole's throughput; with it, 1.25–1.32× (BENCHMARKS.md,
/// "Relay for NAT'd members"). Also the most a member can make the root buffer beyond 256 KiB
/// per stream.
const WINDOW_GROWTH: usize = 32 * 1024 * 1024;

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The tunnel is closed (the link dropped, or the other side went away).
    #[error("the tunnel is closed")]
    Closed,
    /// yamux refused to open one more stream.
    #[error("the tunnel refused a new stream: {0}")]
    Refused(String),
}

type OpenRequest = oneshot::Sender<Result<yamux::Stream, SessionError>>;

/// Opens streams on a running session; cheap to clone. Every clone dropped closes nothing: the
/// session ends when its connection does ([`Session::closed`]).
#[derive(Debug, Clone)]
pub struct Opener {
    requests: mpsc::Sender<OpenRequest>,
    task: tokio::task::AbortHandle,
}

impl Opener {
    /// A new stream to the other side.
    pub async fn open(&self) -> Result<Stream, SessionError> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(tx)
            .await
            .map_err(|_| SessionError::Closed)?;
        let stream = rx.await.map_err(|_| SessionError::Closed)??;
        Ok(stream.compat())
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.requests.is_closed()
    }

    /// Ends the session when aborted: its connection is dropped, every stream fails.
    pub fn abort_handle(&self) -> tokio::task::AbortHandle {
        self.task.clone()
    }
}

/// A running yamux session.
#[derive(Debug)]
pub struct Session {
    /// Opens streams.
    pub opener: Opener,
    /// Resolves when the connection ends, with why.
    pub closed: oneshot::Receiver<String>,
}

/// Which side of the tunnel this is: the root is yamux's client (it opens the streams).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The root.
    Root,
    /// The member that keeps the link.
    Member,
}

impl Session {
    /// Drives a yamux session over `io` in a task of its own. Each stream the other side opens
    /// is given to `inbound` (from that task: it must not block).
    pub fn start(
        io: impl Io,
        side: Side,
        mut inbound: impl FnMut(Stream) + Send + 'static,
    ) -> Session {
        let mut config = yamux::Config::default();
        config.set_max_num_streams(MAX_STREAMS);
        config.set_max_connection_receive_window(Some(
            MAX_STREAMS * yamux::DEFAULT_CREDIT as usize + WINDOW_GROWTH,
        ));
        config.set_split_send_size(FRAME_SIZE);
        let mode = match side {
            Side::Root => yamux::Mode::Client,
            Side::Member => yamux::Mode::Server,
        };
        let mut connection = yamux::Connection::new(io.compat(), config, mode);
        let (requests, mut asked) = mpsc::channel::<OpenRequest>(64);
        let (done, closed) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut waiting: Option<OpenRequest> = None;
            let mut asking = true;
            let why = poll_fn(|cx| {
                loop {
                    // Outbound: one request at a time, until yamux has no stream to give now.
                    if let Some(reply) = waiting.take() {
                        match connection.poll_new_outbound(cx) {
                            Poll::Ready(stream) => {
                                let _ = reply
                                    .send(stream.map_err(|e| SessionError::Refused(e.to_string())));
                            }
                            Poll::Pending => {
                                waiting = Some(reply);
                                break;
                            }
                        }
                    }
                    if !asking {
                        break;
                    }
                    match asked.poll_recv(cx) {
                        Poll::Ready(Some(reply)) => waiting = Some(reply),
                        Poll::Ready(None) => asking = false,
                        Poll::Pending => break,
                    }
                }
                // Inbound (and the connection's progress: yamux moves only when polled here).
                loop {
                    match connection.poll_next_inbound(cx) {
                        Poll::Ready(Some(Ok(stream))) => inbound(stream.compat()),
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(e.to_string()),
                        Poll::Ready(None) => return Poll::Ready("closed by the other side".into()),
                        Poll::Pending => return Poll::Pending,
                    }
                }
            })
            .await;
            let _ = done.send(why);
        });
        Session {
            opener: Opener {
                requests,
                task: task.abort_handle(),
            },
            closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// The root drops every stream a member opens, and still opens its own: a member flooding
    /// it with streams gets none served.
    #[tokio::test]
    async fn streams_a_member_opens_are_dropped_and_the_roots_still_open() {
        let (root_io, member_io) = tokio::io::duplex(1 << 20);
        let root = Session::start(root_io, Side::Root, drop);
        let (served, mut accepted) = mpsc::channel::<Stream>(8);
        let member = Session::start(member_io, Side::Member, move |stream| {
            let _ = served.try_send(stream);
        });
        // 200 streams from the member: each is dropped by the root at once.
        for _ in 0..200 {
            let mut stream = member.opener.open().await.expect("opened");
            let _ = stream.write_all(b"x").await;
            let mut buf = [0u8; 1];
            let read =
                tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf))
                    .await
                    .expect("the root answers at once");
            assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        }
        // The root's own stream still works both ways.
        let mut ours = root.opener.open().await.expect("root opens");
        ours.write_all(b"ping").await.expect("write");
        ours.flush().await.expect("flush");
        let mut theirs = accepted.recv().await.expect("the member accepts");
        let mut buf = [0u8; 4];
        theirs.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"ping");
    }
}
