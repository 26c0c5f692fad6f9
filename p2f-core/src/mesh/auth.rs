//! Authenticated gossip: a chitchat [`Transport`] whose every datagram ends with an
//! HMAC-SHA256 tag keyed by the cluster secret; a datagram whose tag is missing or wrong is
//! dropped (debug log, [`Counters::rejected`]) before chitchat sees a byte of it.
//!
//! chitchat 0.13 keeps its wire encoding private (`ChitchatEnvelope::serialize` and
//! `deserialize` are `pub(crate)`), so this transport cannot encode messages itself. It puts
//! chitchat's own `UdpSocket` (the "inner" socket) behind loopback relays instead:
//!
//! ```text
//! send: chitchat ─envelope─▶ inner ─bytes─▶ tap ─bytes‖tag─▶ outer ──▶ peer
//! recv: peer ─bytes‖tag─▶ outer ─verify─▶ relay(peer) ─bytes─▶ inner ─envelope─▶ chitchat
//! ```
//!
//! Only the outer socket faces the network. The inner socket, the tap and the relays are bound
//! to 127.0.0.1 and accept nothing but each other (checked by source address), so a local
//! program that sends plain chitchat to the inner socket is dropped too. Each authenticated peer
//! address gets its own relay, so the envelope chitchat decodes maps back to the peer that sent
//! it without relying on datagram order; relays are bounded ([`MAX_RELAYS`], least recently
//! used evicted).
//!
//! There is no replay protection: chitchat's heartbeats and versions only grow, so a replayed
//! datagram carries nothing new (at worst it makes a node answer it once more).

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::Arc;
use std::sync::Mutex as StdMutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use chitchat::ChitchatEnvelope;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpSocket};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::net::UdpSocket as TokioUdpSocket;

/// Bytes of the tag appended to every datagram (a full HMAC-SHA256 output).
pub(super) const TAG_LEN: usize = 32;
/// The largest UDP payload over IPv4, and chitchat's own datagram limit (its
/// `MAX_UDP_DATAGRAM_PAYLOAD_SIZE`, private in 0.13). chitchat fills a datagram up to this many
/// bytes *before* our tag, so a datagram within [`TAG_LEN`] bytes of it cannot be sent; deltas are
/// zstd-compressed and cut by an uncompressed upper bound, so only near-incompressible values
/// get there ([`Counters::oversized`] counts them).
pub(super) const MAX_DATAGRAM: usize = 65_507;
/// Most peers with a relay at once (one loopback socket each).
const MAX_RELAYS: usize = 256;
/// How long `send` waits for chitchat's encoded bytes to come back over loopback.
const CAPTURE_TIMEOUT: Duration = Duration::from_secs(1);
/// Domain separation: the gossip key is derived from the secret, never the secret itself.
const KEY_LABEL: &[u8] = b"p2f/mesh/gossip/v1";

/// What the transport did, readable while it runs.
#[derive(Debug, Default)]
pub(super) struct Counters {
    /// Datagrams sent with a tag.
    pub(super) sent: AtomicU64,
    /// Bytes of those datagrams, tags included.
    pub(super) sent_bytes: AtomicU64,
    /// The largest datagram sent, tag included.
    pub(super) largest_sent: AtomicU64,
    /// Datagrams received with a valid tag.
    pub(super) accepted: AtomicU64,
    /// Datagrams dropped: tag missing or wrong, or plain bytes reaching the inner socket.
    pub(super) rejected: AtomicU64,
    /// Outgoing datagrams dropped because the tag would not fit in [`MAX_DATAGRAM`].
    pub(super) oversized: AtomicU64,
}

/// The per-cluster HMAC key, ready to tag or verify.
#[derive(Clone)]
pub(super) struct Key(Hmac<Sha256>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

impl Key {
    /// The gossip key of the cluster whose secret is `secret`: HMAC-SHA256(secret, label).
    pub(super) fn derive(secret: &[u8]) -> Key {
        let derived = Hmac::<Sha256>::new_from_slice(secret)
            .expect("HMAC takes a key of any length")
            .chain_update(KEY_LABEL)
            .finalize()
            .into_bytes();
        Key(Hmac::<Sha256>::new_from_slice(&derived).expect("HMAC takes a key of any length"))
    }

    /// The tag of `payload`.
    pub(super) fn tag(&self, payload: &[u8]) -> [u8; TAG_LEN] {
        self.0
            .clone()
            .chain_update(payload)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Splits `datagram` into its payload when its last [`TAG_LEN`] bytes are the payload's
    /// tag (compared in constant time by `hmac`).
    pub(super) fn open<'a>(&self, datagram: &'a [u8]) -> Option<&'a [u8]> {
        let split = datagram.len().checked_sub(TAG_LEN)?;
        let (payload, tag) = datagram.split_at(split);
        self.0
            .clone()
            .chain_update(payload)
            .verify_slice(tag)
            .ok()
            .map(|()| payload)
    }
}

/// The transport chitchat is started with: opens the [`AuthSocket`].
pub(super) struct AuthTransport {
    key: Key,
    counters: Arc<Counters>,
    /// The outer socket, bound before chitchat starts (so a port 0 is known in advance).
    bound: StdMutex<Option<TokioUdpSocket>>,
}

impl AuthTransport {
    pub(super) fn new(key: Key, counters: Arc<Counters>, bound: TokioUdpSocket) -> AuthTransport {
        AuthTransport {
            key,
            counters,
            bound: StdMutex::new(Some(bound)),
        }
    }
}

#[async_trait::async_trait]
impl Transport for AuthTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let prebound = self
            .bound
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        let outer = match prebound {
            Some(socket) => socket,
            None => TokioUdpSocket::bind(listen_addr)
                .await
                .with_context(|| format!("cannot bind {listen_addr}/udp for gossip"))?,
        };
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let inner = UdpSocket::open(loopback).await?;
        let inner_addr = inner.local_addr()?;
        let tap = TokioUdpSocket::bind(loopback)
            .await
            .context("cannot bind the gossip tap")?;
        let tap_addr = tap.local_addr()?;
        Ok(Box::new(AuthSocket {
            key: self.key.clone(),
            counters: Arc::clone(&self.counters),
            outer,
            inner,
            inner_addr,
            tap,
            tap_addr,
            relays: Relays::default(),
            recv_buf: vec![0; MAX_DATAGRAM].into_boxed_slice(),
            tap_buf: vec![0; MAX_DATAGRAM].into_boxed_slice(),
        }))
    }
}

/// One peer's loopback relay: authenticated bytes from the peer enter the inner socket from it.
struct Relay {
    socket: StdUdpSocket,
    local: SocketAddr,
    last_used: Instant,
}

/// The relays by peer address, and the way back from a relay's address to its peer.
#[derive(Default)]
struct Relays {
    by_peer: HashMap<SocketAddr, Relay>,
    peer_of: HashMap<SocketAddr, SocketAddr>,
}

impl Relays {
    fn get_or_open(&mut self, peer: SocketAddr) -> io::Result<&mut Relay> {
        if !self.by_peer.contains_key(&peer) {
            if self.by_peer.len() >= MAX_RELAYS {
                self.evict_oldest();
            }
            let socket = StdUdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
            socket.set_nonblocking(true)?;
            let local = socket.local_addr()?;
            self.peer_of.insert(local, peer);
            self.by_peer.insert(
                peer,
                Relay {
                    socket,
                    local,
                    last_used: Instant::now(),
                },
            );
        }
        let relay = self
            .by_peer
            .get_mut(&peer)
            .ok_or_else(|| io::Error::other("relay vanished"))?;
        relay.last_used = Instant::now();
        Ok(relay)
    }

    fn evict_oldest(&mut self) {
        let oldest = self
            .by_peer
            .iter()
            .min_by_key(|(_, relay)| relay.last_used)
            .map(|(peer, _)| *peer);
        if let Some(relay) = oldest.and_then(|peer| self.by_peer.remove(&peer)) {
            self.peer_of.remove(&relay.local);
        }
    }
}

/// The socket chitchat talks through (see the module documentation).
struct AuthSocket {
    key: Key,
    counters: Arc<Counters>,
    outer: TokioUdpSocket,
    inner: UdpSocket,
    inner_addr: SocketAddr,
    tap: TokioUdpSocket,
    tap_addr: SocketAddr,
    relays: Relays,
    recv_buf: Box<[u8]>,
    tap_buf: Box<[u8]>,
}

impl AuthSocket {
    /// Reads from the tap the bytes the inner socket just sent there; returns their length.
    async fn capture(&mut self) -> anyhow::Result<usize> {
        let read = async {
            loop {
                let (len, from) = self.tap.recv_from(&mut self.tap_buf[..]).await?;
                if from == self.inner_addr {
                    return Ok::<usize, io::Error>(len);
                }
                self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%from, "gossip tap: dropped a datagram from a stranger");
            }
        };
        tokio::time::timeout(CAPTURE_TIMEOUT, read)
            .await
            .context("gossip tap: chitchat's datagram did not come back over loopback")?
            .context("gossip tap: receive failed")
    }

    /// Checks the datagram in `recv_buf[..len]` from `peer` and, when its tag is right, hands
    /// the payload to the inner socket through the peer's relay.
    fn forward(&mut self, peer: SocketAddr, len: usize) {
        let Some(payload) = self.key.open(&self.recv_buf[..len]) else {
            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, len, "gossip: dropped a datagram with a missing or wrong tag");
            return;
        };
        self.counters.accepted.fetch_add(1, Ordering::Relaxed);
        let relay = match self.relays.get_or_open(peer) {
            Ok(relay) => relay,
            Err(error) => {
                tracing::warn!(%peer, %error, "gossip: cannot open a loopback relay");
                return;
            }
        };
        // Non-blocking: a full loopback buffer loses the datagram, as the network could have.
        if let Err(error) = relay.socket.send_to(payload, self.inner_addr) {
            tracing::debug!(%peer, %error, "gossip: relay dropped a datagram");
        }
    }
}

/// Receive errors that say nothing about the socket itself (as chitchat's `UdpSocket` treats
/// them).
fn is_transient(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::OutOfMemory
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}

#[async_trait::async_trait]
impl Socket for AuthSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.outer
            .local_addr()
            .context("cannot read the gossip socket's address")
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        self.inner.send(self.tap_addr, envelope).await?;
        let len = self.capture().await?;
        if len + TAG_LEN > MAX_DATAGRAM {
            self.counters.oversized.fetch_add(1, Ordering::Relaxed);
            anyhow::bail!(
                "gossip datagram of {len} bytes leaves no room for its tag (limit {MAX_DATAGRAM})"
            );
        }
        let tag = self.key.tag(&self.tap_buf[..len]);
        self.tap_buf[len..len + TAG_LEN].copy_from_slice(&tag);
        let sent = self
            .outer
            .send_to(&self.tap_buf[..len + TAG_LEN], to)
            .await
            .with_context(|| format!("cannot send gossip to {to}"))?;
        self.counters.sent.fetch_add(1, Ordering::Relaxed);
        self.counters
            .sent_bytes
            .fetch_add(sent as u64, Ordering::Relaxed);
        self.counters
            .largest_sent
            .fetch_max(sent as u64, Ordering::Relaxed);
        Ok(SendOutcome {
            num_bytes_sent: sent,
        })
    }

    /// Cancel-safe, as chitchat needs: both awaited reads are, and forwarding does not await.
    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            tokio::select! {
                received = self.outer.recv_from(&mut self.recv_buf[..]) => match received {
                    Ok((len, peer)) => self.forward(peer, len),
                    Err(error) if is_transient(&error) => {
                        tracing::debug!(%error, "gossip: transient receive error");
                    }
                    Err(error) => return Err(error).context("gossip socket broken"),
                },
                decoded = self.inner.recv() => {
                    let outcome = decoded?;
                    match self.relays.peer_of.get(&outcome.from_addr) {
                        Some(peer) => return Ok(RecvOutcome { from_addr: *peer, ..outcome }),
                        None => {
                            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(
                                from = %outcome.from_addr,
                                "gossip: dropped plain bytes sent to the inner socket"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_opens_only_with_the_same_secret_and_bytes() {
        let key = Key::derive(b"0123456789abcdef-secret");
        let mut datagram = b"hello gossip".to_vec();
        datagram.extend_from_slice(&key.tag(b"hello gossip"));
        assert_eq!(key.open(&datagram), Some(&b"hello gossip"[..]));

        let other = Key::derive(b"0123456789abcdef-other!");
        assert_eq!(other.open(&datagram), None);

        let mut flipped = datagram.clone();
        flipped[0] ^= 1;
        assert_eq!(key.open(&flipped), None);

        assert_eq!(key.open(b"short"), None);
        assert_eq!(key.open(&datagram[..datagram.len() - 1]), None);
    }
}
