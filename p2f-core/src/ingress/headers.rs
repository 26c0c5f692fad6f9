//! Header rewriting for the proxy, pure: the host a request asks for, hop-by-hop headers
//! removed, `X-Forwarded-*` and `Forwarded` set. The root is the edge of the network, so what a
//! client sent in the forwarding headers is replaced, never trusted.

use std::net::IpAddr;

use hyper::Uri;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Headers that concern one connection only (RFC 9110 §7.6.1), never forwarded.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// The forwarding headers a client may not set.
const FORWARDING: [HeaderName; 4] = [
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-host"),
    header::FORWARDED,
];

/// Why a request names no host the ingress can route.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BadHost {
    /// Neither a `Host` header nor an authority in the request line (HTTP/2's `:authority`).
    #[error("the request names no host")]
    Missing,
    /// A host that is not a DNS name or an IP address, or a bad port.
    #[error("invalid host")]
    Invalid,
}

/// The host a request asks for — its URI's authority (HTTP/2, or an absolute-form request
/// line), else its `Host` header — lower case, without port or trailing dot; IPv6 literals
/// without brackets. Two `Host` headers, a malformed port, or a host that is neither a DNS
/// name (RFC 1123 labels) nor an IP address is [`BadHost::Invalid`].
pub fn host_of(uri: &Uri, headers: &HeaderMap) -> Result<String, BadHost> {
    let authority = match uri.authority() {
        Some(authority) => authority.as_str(),
        None => {
            let mut hosts = headers.get_all(header::HOST).iter();
            let host = hosts.next().ok_or(BadHost::Missing)?;
            if hosts.next().is_some() {
                return Err(BadHost::Invalid);
            }
            host.to_str().map_err(|_| BadHost::Invalid)?
        }
    };
    if authority.contains('@') {
        return Err(BadHost::Invalid);
    }
    let (host, port) = split_port(authority)?;
    if let Some(port) = port
        && (port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(BadHost::Invalid);
    }
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    if host.parse::<IpAddr>().is_ok() || is_dns_name(&host) {
        Ok(host)
    } else {
        Err(BadHost::Invalid)
    }
}

/// `host[:port]` or `[v6][:port]` → (host, port).
fn split_port(authority: &str) -> Result<(&str, Option<&str>), BadHost> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (v6, after) = rest.split_once(']').ok_or(BadHost::Invalid)?;
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(BadHost::Invalid);
        }
        return match after {
            "" => Ok((v6, None)),
            _ => after
                .strip_prefix(':')
                .map(|port| (v6, Some(port)))
                .ok_or(BadHost::Invalid),
        };
    }
    Ok(match authority.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    })
}

/// RFC 1123: dot-separated labels of 1-63 letters, digits and '-', not starting or ending with
/// '-', at most 253 characters in all.
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The protocol a request asks to switch to (`Upgrade`, with `upgrade` among the `Connection`
/// tokens), e.g. `websocket`.
pub fn upgrade_of(headers: &HeaderMap) -> Option<HeaderValue> {
    let asked = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(tokens)
        .any(|token| token.eq_ignore_ascii_case("upgrade"));
    asked
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

/// The comma-separated tokens of a header value.
fn tokens(value: &HeaderValue) -> impl Iterator<Item = &str> {
    value
        .to_str()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Removes the hop-by-hop headers and those `Connection` names; with `upgrade` (the protocol
/// of an upgrade being forwarded) keeps `Connection: upgrade` and `Upgrade: PROTOCOL`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, upgrade: Option<&HeaderValue>) {
    // Most messages have none: one look at the names they have spares a removal (a hash and a
    // probe) per hop-by-hop name. (`Connection`, which names the others, is one of them.)
    let any = headers
        .keys()
        .any(|name| *name == header::UPGRADE || HOP_BY_HOP.contains(name));
    if any {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(tokens)
            .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
            .collect();
        for name in named.iter().chain(HOP_BY_HOP.iter()) {
            headers.remove(name);
        }
        headers.remove(header::UPGRADE);
    }
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol.clone());
    }
}

/// What the proxy tells the process about the requests of one client connection: what is the
/// same for all of them (the client, the protocol) made once, the host added per request by
/// [`ClientForwarding::apply`].
#[derive(Debug, Clone)]
pub struct ClientForwarding {
    /// `X-Forwarded-For`.
    client: Option<HeaderValue>,
    /// `X-Forwarded-Proto`.
    proto: &'static str,
    /// `for=CLIENT;proto=PROTO`, the start of `Forwarded`.
    forwarded: String,
}

impl ClientForwarding {
    /// The forwarding of a connection from `client` over `proto` (`https` or `http`).
    pub fn new(client: IpAddr, proto: &'static str) -> ClientForwarding {
        let node = match client {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("\"[{ip}]\""),
        };
        ClientForwarding {
            client: HeaderValue::try_from(client.to_string()).ok(),
            proto,
            forwarded: format!("for={node};proto={proto}"),
        }
    }

    /// Replaces the forwarding headers of `headers` with `X-Forwarded-For: CLIENT`,
    /// `X-Forwarded-Proto`, `X-Forwarded-Host: HOST` and `Forwarded:
    /// for=CLIENT;proto=PROTO;host="HOST"` (RFC 7239; IPv6 clients quoted in brackets); `host`
    /// is the host the client asked for, as it asked (with its port, if it gave one). Without
    /// a host (or one that cannot be quoted) the host parts are left out: whatever the client
    /// sent under these names never passes.
    pub fn apply(&self, headers: &mut HeaderMap, host: Option<&HeaderValue>) {
        // Each is replaced (`insert`), or removed when there is nothing to say.
        let [for_, proto, forwarded_host, forwarded_] = &FORWARDING;
        let quotable = host
            .and_then(|h| h.to_str().ok())
            .filter(|h| !h.contains('"') && !h.contains('\\'));
        let mut forwarded =
            String::with_capacity(self.forwarded.len() + quotable.map_or(0, |h| h.len() + 8));
        forwarded.push_str(&self.forwarded);
        if let Some(host) = quotable {
            forwarded.push_str(";host=\"");
            forwarded.push_str(host);
            forwarded.push('"');
        }
        let mut set = |name: &HeaderName, value: Option<HeaderValue>| match value {
            Some(value) => {
                headers.insert(name.clone(), value);
            }
            None => {
                headers.remove(name);
            }
        };
        set(for_, self.client.clone());
        set(proto, Some(HeaderValue::from_static(self.proto)));
        set(forwarded_host, host.cloned());
        set(forwarded_, HeaderValue::try_from(forwarded).ok());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        map
    }

    fn sorted(map: &HeaderMap) -> Vec<(String, String)> {
        let mut all: Vec<(String, String)> = map
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("?").to_owned()))
            .collect();
        all.sort();
        all
    }

    #[test]
    fn the_host_comes_from_the_authority_or_the_host_header() {
        let check = |uri: &str, host: &[&str], expected: Result<&str, BadHost>| {
            let uri: Uri = uri.parse().expect("uri");
            let pairs: Vec<(&str, &str)> = host.iter().map(|h| ("host", *h)).collect();
            let got = host_of(&uri, &headers(&pairs));
            assert_eq!(
                got.as_deref(),
                expected.as_ref().map(|s| *s),
                "{uri} {host:?}"
            );
        };
        check("/", &["Wiki.Home.Arpa"], Ok("wiki.home.arpa"));
        check("/", &["wiki.home.arpa:8443"], Ok("wiki.home.arpa"));
        check("/", &["wiki.home.arpa."], Ok("wiki.home.arpa"));
        check("/", &["127.0.0.1:80"], Ok("127.0.0.1"));
        check("/", &["[::1]:80"], Ok("::1"));
        check("/", &["[::1]"], Ok("::1"));
        check("https://wiki.lan:443/x", &["other.lan"], Ok("wiki.lan"));
        check("/", &[], Err(BadHost::Missing));
        check("/", &["a.lan", "b.lan"], Err(BadHost::Invalid));
        check("/", &["bad host"], Err(BadHost::Invalid));
        check("/", &["under_score.lan"], Err(BadHost::Invalid));
        check("/", &["-lead.lan"], Err(BadHost::Invalid));
        check("/", &["a..lan"], Err(BadHost::Invalid));
        check("/", &["wiki.lan:"], Err(BadHost::Invalid));
        check("/", &["wiki.lan:8o"], Err(BadHost::Invalid));
        check("/", &["wiki.lan:1:2"], Err(BadHost::Invalid));
        check("/", &["user@wiki.lan"], Err(BadHost::Invalid));
        check("/", &["[::1"], Err(BadHost::Invalid));
        check("/", &["[nope]:80"], Err(BadHost::Invalid));
        check("/", &[""], Err(BadHost::Invalid));
        let long = format!("{}.lan", "a".repeat(64));
        check("/", &[long.as_str()], Err(BadHost::Invalid));
    }

    #[test]
    fn hop_by_hop_headers_go_and_upgrades_stay() {
        let check = |pairs: &[(&str, &str)], upgrade: bool, expected: &[(&str, &str)]| {
            let mut map = headers(pairs);
            let protocol = upgrade.then(|| upgrade_of(&map)).flatten();
            remove_hop_by_hop(&mut map, protocol.as_ref());
            let want: Vec<(String, String)> = expected
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect();
            let mut want = want;
            want.sort();
            assert_eq!(sorted(&map), want, "{pairs:?}");
        };
        check(
            &[
                ("connection", "keep-alive, X-Secret"),
                ("keep-alive", "timeout=5"),
                ("x-secret", "1"),
                ("te", "trailers"),
                ("transfer-encoding", "chunked"),
                ("proxy-authorization", "Basic x"),
                ("upgrade", "websocket"),
                ("accept", "*/*"),
            ],
            false,
            &[("accept", "*/*")],
        );
        check(
            &[
                ("connection", "Upgrade"),
                ("upgrade", "websocket"),
                ("sec-websocket-key", "k"),
            ],
            true,
            &[
                ("connection", "upgrade"),
                ("upgrade", "websocket"),
                ("sec-websocket-key", "k"),
            ],
        );
        // `Upgrade` without `Connection: upgrade` asks for nothing.
        assert_eq!(upgrade_of(&headers(&[("upgrade", "websocket")])), None);
        assert_eq!(
            upgrade_of(&headers(&[
                ("connection", "keep-alive, upgrade"),
                ("upgrade", "h2c")
            ])),
            Some(HeaderValue::from_static("h2c"))
        );
    }

    #[test]
    fn forwarding_headers_are_replaced_not_trusted() {
        let check =
            |client: &str, proto: &'static str, host: Option<&str>, expected: &[(&str, &str)]| {
                let mut map = headers(&[
                    ("x-forwarded-for", "6.6.6.6"),
                    ("x-forwarded-host", "evil"),
                    ("forwarded", "for=6.6.6.6"),
                    ("accept", "*/*"),
                ]);
                let client: IpAddr = client.parse().expect("ip");
                let host = host.map(|h| HeaderValue::from_str(h).expect("host"));
                ClientForwarding::new(client, proto).apply(&mut map, host.as_ref());
                let mut want: Vec<(String, String)> = expected
                    .iter()
                    .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                    .collect();
                want.push(("accept".into(), "*/*".into()));
                want.sort();
                assert_eq!(sorted(&map), want);
            };
        check(
            "192.0.2.7",
            "https",
            Some("wiki.lan:8443"),
            &[
                ("x-forwarded-for", "192.0.2.7"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "wiki.lan:8443"),
                (
                    "forwarded",
                    "for=192.0.2.7;proto=https;host=\"wiki.lan:8443\"",
                ),
            ],
        );
        check(
            "2001:db8::1",
            "http",
            Some("wiki.lan"),
            &[
                ("x-forwarded-for", "2001:db8::1"),
                ("x-forwarded-proto", "http"),
                ("x-forwarded-host", "wiki.lan"),
                (
                    "forwarded",
                    "for=\"[2001:db8::1]\";proto=http;host=\"wiki.lan\"",
                ),
            ],
        );
        // No host: the client's X-Forwarded-Host goes too.
        check(
            "192.0.2.7",
            "http",
            None,
            &[
                ("x-forwarded-for", "192.0.2.7"),
                ("x-forwarded-proto", "http"),
                ("forwarded", "for=192.0.2.7;proto=http"),
            ],
        );
    }
}
