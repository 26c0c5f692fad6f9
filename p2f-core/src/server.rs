//! Serves an axum `Router` over TLS on a TCP listener, answering plain-HTTP clients with a clear
//! 400 instead of garbage, and shutting down gracefully.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

/// How long a new connection may stay silent before its first byte.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long open connections get to finish once shutdown starts.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` (say, out of file descriptors) before trying again.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// How long to keep reading from a plain-HTTP client after answering it (see `answer_plain`).
const PLAIN_LINGER: Duration = Duration::from_secs(1);
/// The most connections served at once; more are closed at once.
const MAX_CONNECTIONS: usize = 512;
/// The first byte of every TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The body of the answer to a client speaking plain HTTP to the TLS port.
const PLAIN_HTTP_BODY: &str =
    "this port speaks HTTPS only: use https:// and the cluster CA (p2f's control API)\n";

/// Serves `app` on `listener` over TLS until `shutdown` resolves; then stops accepting and gives
/// open connections up to 5 s to finish.
///
/// Plain-HTTP clients get a `400 Bad Request` saying to use HTTPS. Errors accepting or serving
/// single connections are logged and never end the server.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    let mut http = auto::Builder::new(TokioExecutor::new()).http1_only();
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let http = Arc::new(http);
    let service = TowerToHyperService::new(app);
    // Shutdown flips `stopping`: connections serving HTTP then finish their request in flight
    // and close; those still before that (first byte, handshake) are dropped. (hyper-util's
    // `GracefulShutdown` needs its `server-graceful` feature; this is the same with a watch.)
    let (stopping_tx, stopping_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    if let Ok(addr) = listener.local_addr() {
        tracing::debug!(%addr, "serving TLS");
    }

    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done
                    && e.is_panic()
                {
                    tracing::error!(error = %e, "connection task panicked");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) if connections.len() >= MAX_CONNECTIONS => {
                    // Unauthenticated peers must not exhaust tasks and descriptors.
                    tracing::warn!(%peer, "too many open connections ({MAX_CONNECTIONS}): refused");
                    drop(stream);
                }
                Ok((stream, peer)) => {
                    let conn = Connection {
                        stream,
                        peer,
                        acceptor: acceptor.clone(),
                        http: Arc::clone(&http),
                        service: service.clone(),
                        stopping: stopping_rx.clone(),
                    };
                    connections.spawn(conn.run());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
        }
    }

    drop(listener);
    tracing::debug!(
        open = connections.len(),
        "shutting down: no longer accepting connections"
    );
    let _ = stopping_tx.send(true);
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        tracing::debug!(
            open = connections.len(),
            "connections still open after the grace period; closing them"
        );
    }
    connections.shutdown().await;
    Ok(())
}

/// One accepted connection, with everything needed to serve it.
struct Connection {
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    http: Arc<auto::Builder<TokioExecutor>>,
    service: TowerToHyperService<axum::Router>,
    stopping: watch::Receiver<bool>,
}

impl Connection {
    async fn run(self) {
        let Connection {
            stream,
            peer,
            acceptor,
            http,
            service,
            mut stopping,
        } = self;
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
        }

        // Until HTTP serving starts, shutdown simply drops the connection.
        let tls = tokio::select! {
            () = stopped(&mut stopping) => return,
            tls = Self::start(stream, peer, acceptor) => tls,
        };
        let Some(tls) = tls else { return };

        let conn = http.serve_connection(TokioIo::new(tls), service);
        let mut conn = std::pin::pin!(conn);
        let result = tokio::select! {
            result = conn.as_mut() => result,
            () = stopped(&mut stopping) => {
                // Finish the request in flight (if any), then close.
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    }

    /// Reads the first byte: a TLS client gets its handshake, anyone else the plain answer.
    async fn start(
        stream: TcpStream,
        peer: SocketAddr,
        acceptor: TlsAcceptor,
    ) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
        let mut first = [0u8; 1];
        match tokio::time::timeout(FIRST_BYTE_TIMEOUT, stream.peek(&mut first)).await {
            Err(_) => {
                tracing::debug!(%peer, "no data within {FIRST_BYTE_TIMEOUT:?}; closing");
                return None;
            }
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "cannot read from connection");
                return None;
            }
            Ok(Ok(0)) => return None,
            Ok(Ok(_)) => {}
        }
        if first[0] != TLS_HANDSHAKE_RECORD {
            answer_plain(stream, peer).await;
            return None;
        }
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => Some(tls),
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                None
            }
        }
    }
}

/// Resolves once shutdown has begun (or the server is gone).
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stop| *stop).await;
}

/// The complete HTTP/1.1 response for plain-text clients.
fn plain_http_response() -> String {
    format!(
        "HTTP/1.1 400 Bad Request\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\n\
         Connection: close\r\n\
         \r\n\
         {PLAIN_HTTP_BODY}",
        PLAIN_HTTP_BODY.len()
    )
}

/// Tells a plain-HTTP client to use HTTPS, then closes.
///
/// After writing, the socket is half-closed and whatever the client sent is read and discarded
/// for a moment: closing with unread data makes the kernel send a reset, which can destroy the
/// response before the client reads it.
async fn answer_plain(mut stream: TcpStream, peer: SocketAddr) {
    tracing::debug!(%peer, "plain-text client on the TLS port; answering 400");
    let written = async {
        stream.write_all(plain_http_response().as_bytes()).await?;
        stream.shutdown().await
    };
    if let Err(e) = tokio::time::timeout(PLAIN_LINGER, written)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
    {
        tracing::debug!(%peer, error = %e, "cannot answer plain-text client");
        return;
    }
    let drain = async {
        let mut sink = [0u8; 4096];
        while let Ok(n) = stream.read(&mut sink).await
            && n > 0
        {}
    };
    let _ = tokio::time::timeout(PLAIN_LINGER, drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{ClusterCa, client_config, server_config};
    use std::time::Instant;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    const WAIT: Duration = Duration::from_secs(10);

    struct Running {
        addr: SocketAddr,
        ca: ClusterCa,
        stop: Option<oneshot::Sender<()>>,
        server: JoinHandle<io::Result<()>>,
    }

    async fn start() -> Running {
        let ca = ClusterCa::generate("test").expect("ca");
        let cert = ca.issue("n1", &[]).expect("issue");
        let tls = server_config(&cert).expect("server config");
        let app = axum::Router::new()
            .route("/ping", axum::routing::get(|| async { "pong" }))
            .route(
                "/slow",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    "slow pong"
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(serve_tls(listener, tls, app, async {
            let _ = stopped.await;
        }));
        Running {
            addr,
            ca,
            stop: Some(stop),
            server,
        }
    }

    fn client(ca_pem: &str, addr: SocketAddr) -> reqwest::Client {
        reqwest::Client::builder()
            .tls_backend_preconfigured(client_config(ca_pem).expect("client config"))
            .no_proxy()
            // Pin `localhost` to the listener's address: it may resolve to ::1 first.
            .resolve("localhost", addr)
            .timeout(WAIT)
            .build()
            .expect("client")
    }

    async fn get(client: &reqwest::Client, url: &str) -> reqwest::Result<(u16, String)> {
        let response = client.get(url).send().await?;
        let status = response.status().as_u16();
        Ok((status, response.text().await?))
    }

    #[tokio::test]
    async fn serves_https_with_the_cluster_ca() {
        let running = start().await;
        let port = running.addr.port();
        let client = client(running.ca.cert_pem(), running.addr);
        for url in [
            format!("https://127.0.0.1:{port}/ping"),
            format!("https://localhost:{port}/ping"),
        ] {
            let answer = get(&client, &url).await.expect(&url);
            assert_eq!(answer, (200, "pong".to_owned()), "{url}");
        }
        // Keep-alive: a second round trip on the same client works too.
        let answer = get(&client, &format!("https://127.0.0.1:{port}/ping"))
            .await
            .expect("second request");
        assert_eq!(answer, (200, "pong".to_owned()));
        running.server.abort();
    }

    #[tokio::test]
    async fn answers_plain_http_with_a_clear_400() {
        let running = start().await;
        let exchange = async {
            let mut stream = TcpStream::connect(running.addr).await.expect("connect");
            stream
                .write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .expect("write");
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.expect("read");
            answer
        };
        let answer = tokio::time::timeout(WAIT, exchange)
            .await
            .expect("timed out");
        let expected = format!(
            "HTTP/1.1 400 Bad Request\r\n\
             Content-Type: text/plain; charset=utf-8\r\n\
             Content-Length: {}\r\n\
             Connection: close\r\n\
             \r\n\
             this port speaks HTTPS only: use https:// and the cluster CA (p2f's control API)\n",
            PLAIN_HTTP_BODY.len()
        );
        assert_eq!(answer, expected);

        // The server is still there for TLS clients afterwards.
        let client = client(running.ca.cert_pem(), running.addr);
        let url = format!("https://127.0.0.1:{}/ping", running.addr.port());
        assert_eq!(
            get(&client, &url).await.expect("https after plain"),
            (200, "pong".to_owned())
        );
        running.server.abort();
    }

    #[tokio::test]
    async fn rejects_clients_trusting_another_ca() {
        let running = start().await;
        let other = ClusterCa::generate("other").expect("other ca");
        let client = client(other.cert_pem(), running.addr);
        let url = format!("https://127.0.0.1:{}/ping", running.addr.port());
        let err = get(&client, &url).await.expect_err("foreign CA must fail");
        assert!(err.is_connect(), "{err:?}");

        // A failed handshake does not hurt the server.
        let client = super::tests::client(running.ca.cert_pem(), running.addr);
        assert_eq!(
            get(&client, &url).await.expect("https after failure"),
            (200, "pong".to_owned())
        );
        running.server.abort();
    }

    #[tokio::test]
    async fn shutdown_returns_promptly_even_with_open_connections() {
        let mut running = start().await;
        let client = client(running.ca.cert_pem(), running.addr);
        let url = format!("https://127.0.0.1:{}/ping", running.addr.port());
        // An idle keep-alive connection and a connection that never says anything.
        get(&client, &url).await.expect("request");
        let _silent = TcpStream::connect(running.addr).await.expect("connect");
        tokio::time::sleep(Duration::from_millis(50)).await;

        let started = Instant::now();
        running
            .stop
            .take()
            .expect("stop")
            .send(())
            .expect("send stop");
        let result = tokio::time::timeout(Duration::from_secs(6), running.server)
            .await
            .expect("serve_tls did not return within 6 s")
            .expect("server task");
        result.expect("serve_tls result");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );

        // Nothing listens any more.
        let refused = TcpStream::connect(running.addr).await;
        assert!(refused.is_err(), "listener still open");
    }

    #[tokio::test]
    async fn shutdown_lets_requests_in_flight_finish() {
        let mut running = start().await;
        let client = client(running.ca.cert_pem(), running.addr);
        let url = format!("https://127.0.0.1:{}/slow", running.addr.port());
        let in_flight = tokio::spawn(async move { get(&client, &url).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        running
            .stop
            .take()
            .expect("stop")
            .send(())
            .expect("send stop");
        let answer = tokio::time::timeout(WAIT, in_flight)
            .await
            .expect("request timed out")
            .expect("request task")
            .expect("request in flight must complete");
        assert_eq!(answer, (200, "slow pong".to_owned()));
        tokio::time::timeout(Duration::from_secs(6), running.server)
            .await
            .expect("serve_tls did not return within 6 s")
            .expect("server task")
            .expect("serve_tls result");
    }

    #[test]
    fn plain_response_has_the_right_length() {
        let response = plain_http_response();
        let (head, body) = response.split_once("\r\n\r\n").expect("head and body");
        assert_eq!(body, PLAIN_HTTP_BODY);
        assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())));
    }
}
