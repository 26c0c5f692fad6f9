//! The benchmarks' backend and its clients. `backend ADDR PORT` is a one-thread server on one
//! port that speaks two protocols, told apart by the first byte a client sends:
//!
//! - HTTP/1.1 (hyper): every request is answered `hello from NODE` (`P2F_NODE`, set by the
//!   agent); a request with `Upgrade: p2f-bench` is answered `101` and the connection then
//!   speaks the raw protocol (how raw bytes get through the ingress);
//! - raw (a lowercase first byte): `e` echoes everything back; `d` + a big-endian u64 N sends
//!   N bytes and closes.
//!
//! On the same port number it also echoes UDP datagrams.

use std::convert::Infallible;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// The `Upgrade` protocol that switches an HTTP connection to the raw protocol.
pub(crate) const UPGRADE: &str = "p2f-bench";

/// Serves on `addr:port` until killed.
pub(crate) fn backend(addr: IpAddr, port: u16) -> Result<()> {
    use http_body_util::Full;
    use hyper_util::rt::TokioIo;
    let node = std::env::var("P2F_NODE").unwrap_or_else(|_| "nowhere".into());
    let body = bytes::Bytes::from(format!("hello from {node}\n"));
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = tokio::net::TcpListener::bind((addr, port)).await?;
            let udp = tokio::net::UdpSocket::bind((addr, port)).await?;
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                    let _ = udp.send_to(&buf[..n], from).await;
                }
            });
            loop {
                let (stream, _) = listener.accept().await?;
                let _ = stream.set_nodelay(true);
                let body = body.clone();
                tokio::spawn(async move {
                    let mut first = [0u8; 1];
                    if stream.peek(&mut first).await.unwrap_or(0) == 1
                        && first[0].is_ascii_lowercase()
                    {
                        let _ = raw(stream).await;
                        return;
                    }
                    let service = hyper::service::service_fn(move |mut request| {
                        let body = body.clone();
                        async move {
                            let upgrade = request
                                .headers()
                                .get(hyper::header::UPGRADE)
                                .is_some_and(|v| v.as_bytes() == UPGRADE.as_bytes());
                            if !upgrade {
                                return Ok::<_, Infallible>(hyper::Response::new(Full::new(body)));
                            }
                            let on = hyper::upgrade::on(&mut request);
                            tokio::spawn(async move {
                                if let Ok(upgraded) = on.await {
                                    let _ = raw(TokioIo::new(upgraded)).await;
                                }
                            });
                            let mut response = hyper::Response::new(Full::new(bytes::Bytes::new()));
                            *response.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
                            let headers = response.headers_mut();
                            headers.insert(
                                hyper::header::CONNECTION,
                                hyper::header::HeaderValue::from_static("upgrade"),
                            );
                            headers.insert(
                                hyper::header::UPGRADE,
                                hyper::header::HeaderValue::from_static(UPGRADE),
                            );
                            Ok(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        })
}

/// The raw protocol's server side.
async fn raw<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    match stream.read_u8().await? {
        b'd' => {
            let mut left = stream.read_u64().await?;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                stream.write_all(&buf[..n]).await?;
                left -= n as u64;
            }
            stream.flush().await?;
            stream.shutdown().await
        }
        _ => loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return stream.shutdown().await;
            }
            stream.write_all(&buf[..n]).await?;
            stream.flush().await?;
        },
    }
}

/// Asks for the raw protocol on an HTTP connection for `host` (`Upgrade: p2f-bench`); the
/// stream speaks it after the `101`.
pub(crate) async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    host: &str,
) -> Result<()> {
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: upgrade\r\nUpgrade: {UPGRADE}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    stream.flush().await?;
    // Byte by byte: nothing after the head may be taken from the raw protocol.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(
            stream
                .read_u8()
                .await
                .context("closed in the upgrade's answer")?,
        );
    }
    let head = String::from_utf8_lossy(&head);
    ensure!(head.starts_with("HTTP/1.1 101"), "no upgrade: {head}");
    Ok(())
}

/// Downloads `bytes` with the raw protocol's `d`: the time from the request to the last byte.
pub(crate) async fn download<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: u64,
) -> Result<Duration> {
    let mut buf = vec![0u8; 256 * 1024];
    let start = Instant::now();
    stream.write_u8(b'd').await?;
    stream.write_u64(bytes).await?;
    stream.flush().await?;
    let mut got = 0u64;
    while got < bytes {
        let n = stream.read(&mut buf).await?;
        ensure!(n > 0, "closed after {got} of {bytes} bytes");
        got += n as u64;
    }
    Ok(start.elapsed())
}

/// Starts the raw protocol's echo (`e`) on `stream`.
pub(crate) async fn start_echo<S: AsyncWrite + Unpin>(stream: &mut S) -> Result<()> {
    stream.write_u8(b'e').await?;
    stream.flush().await?;
    Ok(())
}

/// `count` round trips of `size` bytes on an echoing stream (after [`start_echo`]): each one's
/// time.
pub(crate) async fn ping_pong<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    size: usize,
    count: usize,
) -> Result<Vec<Duration>> {
    let out = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        stream.write_all(&out).await?;
        stream.flush().await?;
        stream.read_exact(&mut back).await?;
        times.push(start.elapsed());
    }
    ensure!(back == out, "the echo changed the bytes");
    Ok(times)
}

/// `count` round trips of `size`-byte datagrams on a connected UDP socket, each waiting at
/// most `wait` for its answer: each answered one's time, and how many got none.
pub(crate) async fn udp_ping_pong(
    socket: &tokio::net::UdpSocket,
    size: usize,
    count: usize,
    wait: Duration,
) -> Result<(Vec<Duration>, usize)> {
    let mut out = vec![0x5au8; size];
    let mut back = vec![0u8; size + 1];
    let mut times = Vec::with_capacity(count);
    let mut lost = 0;
    for i in 0..count {
        // Each datagram says its number, so a late answer is not taken for the next one's.
        out[..8].copy_from_slice(&(i as u64).to_be_bytes());
        let start = Instant::now();
        socket.send(&out).await?;
        let answered = tokio::time::timeout(wait, async {
            loop {
                let n = socket.recv(&mut back).await?;
                if n == size && back[..8] == out[..8] {
                    return std::io::Result::Ok(());
                }
            }
        })
        .await;
        match answered {
            Ok(result) => {
                result?;
                times.push(start.elapsed());
            }
            Err(_) => lost += 1,
        }
    }
    Ok((times, lost))
}

/// Sends `GET / HTTP/1.1` for `host` on `stream` and reads one answer (with a `Content-Length`);
/// its status line and body.
pub(crate) async fn get_once<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    host: &str,
) -> Result<(String, String)> {
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: bench_ingress\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    // (tokio-rustls may keep written records until flushed.)
    stream.flush().await?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let length = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .context("no Content-Length")?;
            while buf.len() < end + 4 + length {
                let n = stream.read(&mut chunk).await?;
                ensure!(n > 0, "closed in the body");
                buf.extend_from_slice(&chunk[..n]);
            }
            let status = head.lines().next().unwrap_or_default().to_owned();
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + length]).into_owned();
            return Ok((status, body));
        }
        let n = stream.read(&mut chunk).await?;
        ensure!(n > 0, "closed before the answer's head");
        buf.extend_from_slice(&chunk[..n]);
    }
}
