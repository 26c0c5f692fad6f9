//! Health checks: a TCP connect to the port, an HTTP `GET` answering 2xx/3xx, or a command
//! exiting 0 — each bounded in time, each failing with a one-line reason.

use std::time::Duration;

use p2f_model::Health;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::supervisor::spawn::Shell;

/// A check that is not done after this long failed.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// How a check is named in a `HealthCheckFailed` failure (`tcp :8080`, `http :8080/`, `cmd ...`).
pub fn describe(health: &Health, port: Option<u16>) -> String {
    let port = port.map(|p| format!(":{p}")).unwrap_or_default();
    match health {
        Health::Tcp => format!("tcp {port}"),
        Health::Http(path) => format!("http {port}{path}"),
        Health::Cmd(command) => format!("cmd `{command}`"),
        Health::None => "none".to_owned(),
    }
}

/// Runs one check. A `Cmd` runs in `shell`: the process's bundle directory, variables and user.
pub(crate) async fn check(health: &Health, port: Option<u16>, shell: &Shell) -> Result<(), String> {
    let work = async {
        match health {
            Health::None => Ok(()),
            Health::Tcp => {
                let port = port.ok_or("no port to check")?;
                TcpStream::connect(("127.0.0.1", port))
                    .await
                    .map(drop)
                    .map_err(|e| format!("cannot connect to 127.0.0.1:{port}: {e}"))
            }
            Health::Http(path) => {
                let port = port.ok_or("no port to check")?;
                http_get(port, path).await
            }
            Health::Cmd(command) => {
                // A group of its own, killed whole when the check ends, times out or is
                // dropped: a pipeline (`sleep 120 | cat`) leaves nothing behind.
                if let Some(why) = shell.refused() {
                    return Err(format!("not run: {why}"));
                }
                let mut check = shell.quiet(command);
                check.process_group(0);
                let mut child = super::os::spawn_off(check)
                    .await
                    .map_err(|e| format!("cannot run it: {e}"))?;
                let _group = KillGroupOnDrop(child.id());
                let status = child
                    .wait()
                    .await
                    .map_err(|e| format!("cannot wait for it: {e}"))?;
                match status.code() {
                    Some(0) => Ok(()),
                    Some(code) => Err(format!("exited with code {code}")),
                    None => Err("killed by a signal".to_owned()),
                }
            }
        }
    };
    match tokio::time::timeout(CHECK_TIMEOUT, work).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no answer within {}",
            p2f_model::format_duration(CHECK_TIMEOUT)
        )),
    }
}

/// Kills a check's process group (SIGKILL) when dropped.
struct KillGroupOnDrop(Option<u32>);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            let _ = super::os::signal_group(pgid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// A minimal `GET` over HTTP/1.0 to loopback: the status line decides.
async fn http_get(port: u16, path: &str) -> Result<(), String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("cannot connect to 127.0.0.1:{port}: {e}"))?;
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: p2f-health\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("cannot send the request: {e}"))?;
    let mut head = [0u8; 64];
    let mut read = 0;
    while read < 12 {
        match stream.read(&mut head[read..]).await {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) => return Err(format!("cannot read the answer: {e}")),
        }
    }
    let line = String::from_utf8_lossy(&head[..read]);
    let code: Option<u16> = line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse().ok());
    match code {
        Some(code) if (200..400).contains(&code) => Ok(()),
        Some(code) => Err(format!("GET {path} answered {code}")),
        None => Err(format!("GET {path} got no HTTP answer")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_are_named_for_failures() {
        let cases = [
            (Health::Tcp, Some(80), "tcp :80"),
            (Health::Http("/up".into()), Some(8080), "http :8080/up"),
            (Health::Cmd("true".into()), None, "cmd `true`"),
        ];
        for (health, port, want) in cases {
            assert_eq!(describe(&health, port), want);
        }
    }

    #[tokio::test]
    async fn http_and_tcp_checks_see_a_real_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = tokio::spawn(async move {
            for answer in ["HTTP/1.0 200 OK\r\n\r\n", "HTTP/1.0 503 Busy\r\n\r\n"] {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        let shell = Shell::plain(&std::env::temp_dir(), &[("CODE".into(), "4".into())]);
        assert_eq!(
            check(&Health::Http("/".into()), Some(port), &shell).await,
            Ok(())
        );
        let busy = check(&Health::Http("/".into()), Some(port), &shell).await;
        assert_eq!(busy, Err("GET / answered 503".to_owned()));
        server.await.expect("server");
        // A port held (bound, not listening) so that no other test can listen on it meanwhile.
        let held = tokio::net::TcpSocket::new_v4().expect("socket");
        held.bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let closed_port = held.local_addr().expect("addr").port();
        let closed = check(&Health::Tcp, Some(closed_port), &shell).await;
        assert!(closed.is_err(), "{closed:?}");
        assert_eq!(
            check(&Health::Cmd("exit $CODE".into()), None, &shell).await,
            Err("exited with code 4".to_owned())
        );
    }
}
