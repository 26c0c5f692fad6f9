//! Authenticated gossip: a chitchat [`Transport`] whose every datagram carries a header and an
//! HMAC-SHA256 tag over both header and chitchat's bytes; a datagram that is not authentic, not
//! fresh, or already seen is dropped before chitchat sees a byte of it.
//!
//! # Datagram
//!
//! ```text
//! offset  bytes  field
//!      0      1  format: 1
//!      1      4  key id: which key of the ring tagged it (ring.rs, KeyId)
//!      5      8  sender id: random, drawn once per transport instance (node start)
//!     13      8  timestamp: the sender's clock, ms since the Unix epoch
//!     21      8  counter: +1 per datagram sent; starts at the sender's clock in µs since the
//!                Unix epoch, so a node's counters keep growing across its restarts
//!     29      n  chitchat's bytes
//!   29+n     32  tag: HMAC-SHA256(key, bytes 0 .. 29+n)
//! ```
//!
//! Integers are big-endian. [`HEADER_LEN`] + [`TAG_LEN`] = 61 bytes ride on top of chitchat's.
//!
//! # What a receiver checks, in order
//!
//! 1. the format and length, then that the key id names a key of its ring (no other key is
//!    tried), then the tag (constant-time): otherwise [`Counters::rejected`];
//! 2. that the timestamp is within [`MAX_SKEW`] (30 s) of its own clock: otherwise
//!    [`Counters::stale`];
//! 3. that this sender id has not used this counter before ([`super::replay`]): otherwise
//!    [`Counters::replayed`].
//!
//! Only then do chitchat's bytes go on, so a replayed datagram is never answered: replaying
//! one, from any source address, cannot make a node reflect gossip at someone. Replay state is
//! keyed by the authenticated sender id, not the source address, so a spoofed address cannot
//! touch a real peer's state. A restarted node is a new sender id, so receivers need not keep
//! its counters across the restart (they grow across it anyway, as the counter starts from the
//! clock). Replay state is bounded ([`super::replay::MAX_SENDERS`], least recently
//! accepted forgotten first) and takes a datagram overtaken by a later one once
//! ([`super::replay::REORDER`]).
//!
//! The clock window bounds what a receiver without state for a sender (it restarted, or forgot
//! the sender) could be fed again: datagrams at most 30 s old. ±30 s because home machines are
//! NTP-synced to well under a second when all is well, but not always promptly: an SNTP client
//! that polls rarely, a machine that missed syncs for a few days (a cheap crystal drifts up to
//! ~4 s a day) or whose time server was unreachable for a while. A window of a few seconds would
//! silence such a node, and its peers would declare it dead; 30 s tolerates days of drift while
//! keeping replays to a receiver without state within half a minute. A node whose clock is off
//! by more (a board without a real-time clock before its first sync) is not heard: its peers
//! say so in their logs (a warning at most once a minute) and in [`Counters::stale`]. Freshness
//! between two datagrams of a sender is the counter's job, not the clock's, so a clock stepped
//! by a few seconds while a node runs does not silence it.
//!
//! What this does not stop: a datagram captured on its way to one node and delivered to
//! another before that one heard a later datagram of the same sender is new to it (the tag
//! does not name the receiver; chitchat's gossip carries no destination identity this
//! transport could bind to). That node answers it once; replaying it again is dropped.
//!
//! # Relays
//!
//! chitchat 0.13 keeps its wire encoding private (`ChitchatEnvelope::serialize` and
//! `deserialize` are `pub(crate)`), so this transport cannot encode messages itself. It puts
//! chitchat's own `UdpSocket` (the "inner" socket) behind loopback relays instead:
//!
//! ```text
//! send: chitchat ─envelope─▶ inner ─bytes─▶ tap ─header‖bytes‖tag─▶ outer ──▶ peer
//! recv: peer ─header‖bytes‖tag─▶ outer ─check─▶ relay(peer) ─bytes─▶ inner ─envelope─▶ chitchat
//! ```
//!
//! Only the outer socket faces the network. The inner socket, the tap and the relays are bound
//! to 127.0.0.1 and accept nothing but each other (checked by source address), so a local
//! program that sends plain chitchat to the inner socket is dropped too. Each authenticated peer
//! address gets its own relay, so the envelope chitchat decodes maps back to the peer that sent
//! it without relying on datagram order; relays are bounded ([`MAX_RELAYS`], least recently
//! used evicted).

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use chitchat::ChitchatEnvelope;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpSocket};
use tokio::net::UdpSocket as TokioUdpSocket;

use super::replay::Senders;
pub(super) use super::ring::TAG_LEN;
use super::ring::{GossipKey, KEY_ID_LEN, KeyId, KeyRing};

/// The format byte datagrams start with.
const FORMAT: u8 = 1;
/// Bytes of the header in front of chitchat's.
pub(super) const HEADER_LEN: usize = 1 + KEY_ID_LEN + 8 + 8 + 8;
/// The largest UDP payload over IPv4, and chitchat's own datagram limit (its
/// `MAX_UDP_DATAGRAM_PAYLOAD_SIZE`, private in 0.13). chitchat fills a datagram up to this many
/// bytes *before* our header and tag, so a datagram within [`HEADER_LEN`] + [`TAG_LEN`] bytes
/// of it cannot be sent; deltas are zstd-compressed and cut by an uncompressed upper bound, so
/// only near-incompressible values get there ([`Counters::oversized`] counts them).
pub(super) const MAX_DATAGRAM: usize = 65_507;
/// How far a datagram's timestamp may be from the receiver's clock, either way (see the
/// module documentation for the choice).
pub(super) const MAX_SKEW: Duration = Duration::from_secs(30);
/// Most peers with a relay at once (one loopback socket each).
const MAX_RELAYS: usize = 256;
/// How long `send` waits for chitchat's encoded bytes to come back over loopback.
const CAPTURE_TIMEOUT: Duration = Duration::from_secs(1);
/// Least time between two warnings of one kind (clock skew, unknown key id).
const WARN_EVERY: Duration = Duration::from_secs(60);

/// What the transport did, readable while it runs.
#[derive(Debug, Default)]
pub(super) struct Counters {
    /// Datagrams sent with a header and tag.
    pub(super) sent: AtomicU64,
    /// Bytes of those datagrams, headers and tags included.
    pub(super) sent_bytes: AtomicU64,
    /// The largest datagram sent, header and tag included.
    pub(super) largest_sent: AtomicU64,
    /// Datagrams received authentic, fresh and new, handed to chitchat.
    pub(super) accepted: AtomicU64,
    /// Datagrams dropped as not authentic: malformed, unknown key id, wrong tag, or plain bytes
    /// reaching the inner socket or the tap.
    pub(super) rejected: AtomicU64,
    /// Authentic datagrams dropped because their timestamp is more than [`MAX_SKEW`] from this
    /// node's clock.
    pub(super) stale: AtomicU64,
    /// Authentic datagrams dropped because their sender already used their counter.
    pub(super) replayed: AtomicU64,
    /// Outgoing datagrams dropped because header and tag would not fit in [`MAX_DATAGRAM`].
    pub(super) oversized: AtomicU64,
    /// Outgoing datagrams dropped because this host has no route to their address (a member
    /// behind NAT, whose own address is private to its network).
    pub(super) unreachable: AtomicU64,
}

/// The header of a datagram (module documentation, "Datagram").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Header {
    /// The key that tagged it.
    pub(super) key: KeyId,
    /// Its sender's transport instance.
    pub(super) sender: u64,
    /// The sender's clock when it was sent, ms since the Unix epoch.
    pub(super) timestamp_ms: u64,
    /// The sender's counter.
    pub(super) counter: u64,
}

impl Header {
    fn write(&self, out: &mut [u8]) {
        out[0] = FORMAT;
        out[1..5].copy_from_slice(&self.key.to_bytes());
        out[5..13].copy_from_slice(&self.sender.to_be_bytes());
        out[13..21].copy_from_slice(&self.timestamp_ms.to_be_bytes());
        out[21..29].copy_from_slice(&self.counter.to_be_bytes());
    }

    /// The header at the start of `bytes`, if they are long enough and of this format.
    fn read(bytes: &[u8]) -> Option<Header> {
        let header: &[u8; HEADER_LEN] = bytes.get(..HEADER_LEN)?.try_into().ok()?;
        if header[0] != FORMAT {
            return None;
        }
        let u64_at = |at: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&header[at..at + 8]);
            u64::from_be_bytes(word)
        };
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&header[1..5]);
        Some(Header {
            key: KeyId::from_bytes(id),
            sender: u64_at(5),
            timestamp_ms: u64_at(13),
            counter: u64_at(21),
        })
    }
}

/// Writes `header` into `datagram[..HEADER_LEN]` and the tag of everything before the last
/// [`TAG_LEN`] bytes into those: chitchat's bytes must already be in between. `datagram` must
/// be at least [`HEADER_LEN`] + [`TAG_LEN`] bytes long.
fn seal_in_place(key: &GossipKey, header: &Header, datagram: &mut [u8]) {
    debug_assert_eq!(header.key, key.id());
    header.write(&mut datagram[..HEADER_LEN]);
    let split = datagram.len() - TAG_LEN;
    let tag = key.tag(&datagram[..split]);
    datagram[split..].copy_from_slice(&tag);
}

/// A datagram carrying `payload` under `header`, tagged with `key` (whose id `header` names).
#[cfg(test)]
pub(super) fn seal(key: &GossipKey, header: &Header, payload: &[u8]) -> Vec<u8> {
    let mut datagram = vec![0u8; HEADER_LEN + payload.len() + TAG_LEN];
    datagram[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
    seal_in_place(key, header, &mut datagram);
    datagram
}

/// Why a received datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(super) enum Refusal {
    /// Shorter than a header and a tag, or another format.
    #[error("not a gossip datagram of this format")]
    Malformed,
    /// Tagged with a key this node's ring does not hold.
    #[error("tagged with key {0}, which this node does not have")]
    UnknownKey(KeyId),
    /// The tag does not match the header and bytes.
    #[error("wrong tag")]
    BadTag,
    /// Authentic, but its timestamp is too far from this node's clock.
    #[error("timestamp {skew_ms} ms off this node's clock (at most ±{} s)", MAX_SKEW.as_secs())]
    Stale {
        /// The datagram's timestamp minus this node's clock, in ms.
        skew_ms: i64,
    },
    /// Authentic and fresh, but its sender already used its counter.
    #[error("counter {counter} of sender {sender:016x} already seen")]
    Replayed {
        /// The sender id.
        sender: u64,
        /// The counter.
        counter: u64,
    },
}

/// The receiving side's checks (module documentation, "What a receiver checks").
#[derive(Debug, Default)]
pub(super) struct Gate {
    senders: Senders,
}

impl Gate {
    /// Checks `datagram` against `ring`, the clock `now_ms` (ms since the Unix epoch) and the
    /// senders seen so far; returns chitchat's bytes when it passes, and records its counter.
    pub(super) fn check<'a>(
        &mut self,
        ring: &KeyRing,
        datagram: &'a [u8],
        now_ms: u64,
        now: Instant,
    ) -> Result<&'a [u8], Refusal> {
        if datagram.len() < HEADER_LEN + TAG_LEN {
            return Err(Refusal::Malformed);
        }
        let header = Header::read(datagram).ok_or(Refusal::Malformed)?;
        let key = ring
            .get(header.key)
            .ok_or(Refusal::UnknownKey(header.key))?;
        let split = datagram.len() - TAG_LEN;
        let (signed, tag) = datagram.split_at(split);
        if !key.verify(signed, tag) {
            return Err(Refusal::BadTag);
        }
        if header.timestamp_ms.abs_diff(now_ms) > millis(MAX_SKEW) {
            let skew = i128::from(header.timestamp_ms) - i128::from(now_ms);
            return Err(Refusal::Stale {
                skew_ms: i64::try_from(skew).unwrap_or(if skew < 0 { i64::MIN } else { i64::MAX }),
            });
        }
        if !self.senders.accept(header.sender, header.counter, now) {
            return Err(Refusal::Replayed {
                sender: header.sender,
                counter: header.counter,
            });
        }
        Ok(&signed[HEADER_LEN..])
    }
}

/// The sending side's identity and counter.
#[derive(Debug)]
pub(super) struct Sender {
    id: u64,
    next_counter: u64,
}

impl Sender {
    /// A new sender: a random id, the counter starting at the clock in µs since the Unix epoch.
    pub(super) fn new() -> Sender {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| {
                u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
            });
        Sender {
            id: rand::random(),
            next_counter: micros,
        }
    }

    /// The header of the next datagram, tagged with `key` at `now_ms`.
    pub(super) fn next(&mut self, key: KeyId, now_ms: u64) -> Header {
        let counter = self.next_counter;
        self.next_counter = self.next_counter.saturating_add(1);
        Header {
            key,
            sender: self.id,
            timestamp_ms: now_ms,
            counter,
        }
    }
}

/// The clock in ms since the Unix epoch (0 before it).
pub(super) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, millis)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Lets a kind of warning through at most once per [`WARN_EVERY`].
#[derive(Debug, Default)]
struct Throttle(Option<Instant>);

impl Throttle {
    fn ready(&mut self, now: Instant) -> bool {
        match self.0 {
            Some(last) if now.duration_since(last) < WARN_EVERY => false,
            _ => {
                self.0 = Some(now);
                true
            }
        }
    }
}

/// The transport chitchat is started with: opens the [`AuthSocket`].
pub(super) struct AuthTransport {
    ring: Arc<RwLock<KeyRing>>,
    counters: Arc<Counters>,
    /// The outer socket, bound before chitchat starts (so a port 0 is known in advance).
    bound: StdMutex<Option<TokioUdpSocket>>,
}

impl AuthTransport {
    /// A transport tagging with `ring`'s primary key and accepting its keys (read at each
    /// datagram, so changes apply at once), counting into `counters`, on `bound`.
    pub(super) fn new(
        ring: Arc<RwLock<KeyRing>>,
        counters: Arc<Counters>,
        bound: TokioUdpSocket,
    ) -> AuthTransport {
        AuthTransport {
            ring,
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
            .unwrap_or_else(PoisonError::into_inner)
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
            ring: Arc::clone(&self.ring),
            counters: Arc::clone(&self.counters),
            sender: Sender::new(),
            gate: Gate::default(),
            outer,
            inner,
            inner_addr,
            tap,
            tap_addr,
            relays: Relays::default(),
            recv_buf: vec![0; MAX_DATAGRAM].into_boxed_slice(),
            send_buf: vec![0; HEADER_LEN + MAX_DATAGRAM + TAG_LEN].into_boxed_slice(),
            skew_warning: Throttle::default(),
            unknown_key_warning: Throttle::default(),
            unreachable: HashSet::new(),
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
    ring: Arc<RwLock<KeyRing>>,
    counters: Arc<Counters>,
    sender: Sender,
    gate: Gate,
    outer: TokioUdpSocket,
    inner: UdpSocket,
    inner_addr: SocketAddr,
    tap: TokioUdpSocket,
    tap_addr: SocketAddr,
    relays: Relays,
    recv_buf: Box<[u8]>,
    /// Header, then chitchat's bytes as captured from the tap, then room for the tag.
    send_buf: Box<[u8]>,
    skew_warning: Throttle,
    unknown_key_warning: Throttle,
    /// Addresses this host has had no route to since their last datagram sent (said once each).
    unreachable: HashSet<SocketAddr>,
}

impl AuthSocket {
    /// Reads from the tap, into `send_buf` after the header, the bytes the inner socket just
    /// sent there; returns their length.
    async fn capture(&mut self) -> anyhow::Result<usize> {
        let read = async {
            loop {
                let (len, from) = self
                    .tap
                    .recv_from(&mut self.send_buf[HEADER_LEN..HEADER_LEN + MAX_DATAGRAM])
                    .await?;
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

    /// Checks the datagram in `recv_buf[..len]` from `peer` and, when it passes, hands
    /// chitchat's bytes to the inner socket through the peer's relay.
    fn forward(&mut self, peer: SocketAddr, len: usize) {
        let now = Instant::now();
        let checked = {
            let ring = self.ring.read().unwrap_or_else(PoisonError::into_inner);
            self.gate
                .check(&ring, &self.recv_buf[..len], unix_ms(), now)
        };
        let payload = match checked {
            Ok(payload) => payload,
            Err(refusal) => {
                let counter = match refusal {
                    Refusal::Stale { .. } => &self.counters.stale,
                    Refusal::Replayed { .. } => &self.counters.replayed,
                    Refusal::Malformed | Refusal::UnknownKey(_) | Refusal::BadTag => {
                        &self.counters.rejected
                    }
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let warn = match refusal {
                    Refusal::Stale { .. } => self.skew_warning.ready(now),
                    Refusal::UnknownKey(_) => self.unknown_key_warning.ready(now),
                    _ => false,
                };
                if warn {
                    tracing::warn!(%peer, "gossip: dropped a datagram: {refusal} (this warning is shown at most once a minute)");
                } else {
                    tracing::debug!(%peer, len, "gossip: dropped a datagram: {refusal}");
                }
                return;
            }
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

/// Whether a send failed because this host has no route to the address.
fn is_unroutable(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::NetworkUnreachable | io::ErrorKind::HostUnreachable
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
        let total = HEADER_LEN + len + TAG_LEN;
        if total > MAX_DATAGRAM {
            self.counters.oversized.fetch_add(1, Ordering::Relaxed);
            anyhow::bail!(
                "gossip datagram of {len} bytes leaves no room for its header and tag \
                 (limit {MAX_DATAGRAM})"
            );
        }
        let key = self
            .ring
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .primary_key()
            .clone();
        let header = self.sender.next(key.id(), unix_ms());
        seal_in_place(&key, &header, &mut self.send_buf[..total]);
        let sent = match self.outer.send_to(&self.send_buf[..total], to).await {
            Ok(sent) => sent,
            // No route to the peer: the datagram is lost, as it would be on the way. Not an
            // error for chitchat, which would warn at every round (4 a second) and, with
            // `RUST_BACKTRACE` set, have anyhow capture a backtrace each time and print it: the
            // first print made std load the binary's debug info for good (31 MiB more anonymous
            // memory on the root of bench_relay, whose gossip reached a NAT'd member's address).
            Err(error) if is_unroutable(&error) => {
                self.counters.unreachable.fetch_add(1, Ordering::Relaxed);
                if self.unreachable.len() >= MAX_RELAYS {
                    self.unreachable.clear();
                }
                if self.unreachable.insert(to) {
                    tracing::info!(
                        peer = %to,
                        "gossip: no route to {to} ({error}); its datagrams are dropped until one \
                         gets through (a member behind NAT gossips out only)"
                    );
                } else {
                    tracing::trace!(peer = %to, "gossip: no route: {error}");
                }
                return Ok(SendOutcome { num_bytes_sent: 0 });
            }
            Err(error) => {
                return Err(error).with_context(|| format!("cannot send gossip to {to}"));
            }
        };
        if !self.unreachable.is_empty() {
            self.unreachable.remove(&to);
        }
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
    use crate::cluster::Secret;

    /// What Linux's `send_to` fails with when no route leads to the peer (ENETUNREACH,
    /// EHOSTUNREACH) is a lost datagram; anything else is still an error.
    #[test]
    fn no_route_is_a_lost_datagram() {
        assert!(is_unroutable(&io::Error::from_raw_os_error(101)));
        assert!(is_unroutable(&io::Error::from_raw_os_error(113)));
        assert!(!is_unroutable(&io::Error::from_raw_os_error(1)));
        assert!(!is_unroutable(&io::Error::from(
            io::ErrorKind::AddrNotAvailable
        )));
    }

    fn ring(text: &str) -> KeyRing {
        KeyRing::new(&Secret::parse(text).expect("test secrets are valid"))
    }

    const NOW_MS: u64 = 1_800_000_000_000;

    /// A datagram of `ring`'s primary key from `sender`, at `timestamp_ms`, with `counter`.
    fn datagram(ring: &KeyRing, sender: u64, timestamp_ms: u64, counter: u64) -> Vec<u8> {
        let key = ring.primary_key();
        let header = Header {
            key: key.id(),
            sender,
            timestamp_ms,
            counter,
        };
        seal(key, &header, b"chitchat bytes")
    }

    #[test]
    fn the_header_is_laid_out_as_documented() {
        let ring = ring("auth-test-secret-0123456789");
        let sealed = datagram(&ring, 0x0102_0304_0506_0708, 0x1112_1314_1516_1718, 42);
        assert_eq!(sealed.len(), HEADER_LEN + 14 + TAG_LEN);
        assert_eq!(HEADER_LEN, 29);
        assert_eq!(sealed[0], FORMAT);
        assert_eq!(sealed[1..5], ring.primary_id().to_bytes());
        assert_eq!(sealed[5..13], [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(
            sealed[13..21],
            [0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18]
        );
        assert_eq!(sealed[21..29], 42u64.to_be_bytes());
        assert_eq!(&sealed[29..43], b"chitchat bytes");
        let key = ring.primary_key();
        assert!(key.verify(&sealed[..43], &sealed[43..]));
    }

    #[test]
    fn a_sealed_datagram_passes_once() {
        let ring = ring("auth-test-secret-0123456789");
        let mut gate = Gate::default();
        let now = Instant::now();
        let sealed = datagram(&ring, 1, NOW_MS, 10);
        assert_eq!(
            gate.check(&ring, &sealed, NOW_MS, now),
            Ok(&b"chitchat bytes"[..])
        );
        assert_eq!(
            gate.check(&ring, &sealed, NOW_MS, now),
            Err(Refusal::Replayed {
                sender: 1,
                counter: 10
            })
        );
        // The sender's next one passes; the same counter from another sender too.
        assert!(
            gate.check(&ring, &datagram(&ring, 1, NOW_MS, 11), NOW_MS, now)
                .is_ok()
        );
        assert!(
            gate.check(&ring, &datagram(&ring, 2, NOW_MS, 10), NOW_MS, now)
                .is_ok()
        );
    }

    #[test]
    fn a_datagram_outside_the_time_window_is_rejected() {
        let ring = ring("auth-test-secret-0123456789");
        let mut gate = Gate::default();
        let now = Instant::now();
        let skew = millis(MAX_SKEW);
        let past = datagram(&ring, 1, NOW_MS - skew - 1, 1);
        assert_eq!(
            gate.check(&ring, &past, NOW_MS, now),
            Err(Refusal::Stale {
                skew_ms: -(skew as i64) - 1
            })
        );
        let future = datagram(&ring, 1, NOW_MS + skew + 1, 2);
        assert_eq!(
            gate.check(&ring, &future, NOW_MS, now),
            Err(Refusal::Stale {
                skew_ms: skew as i64 + 1
            })
        );
        let ancient = datagram(&ring, 1, 0, 3);
        assert!(matches!(
            gate.check(&ring, &ancient, NOW_MS, now),
            Err(Refusal::Stale { .. })
        ));
        // The window's edges are inside; a stale datagram did not use up its counter.
        for (timestamp, counter) in [(NOW_MS - skew, 1), (NOW_MS + skew, 2)] {
            let edge = datagram(&ring, 1, timestamp, counter);
            assert!(gate.check(&ring, &edge, NOW_MS, now).is_ok());
        }
    }

    #[test]
    fn an_unknown_key_id_is_rejected_and_no_other_key_is_tried() {
        let ours = ring("auth-test-secret-0123456789");
        let theirs = ring("auth-test-other-secret-0123456789");
        let mut gate = Gate::default();
        let now = Instant::now();
        let sealed = datagram(&theirs, 1, NOW_MS, 1);
        assert_eq!(
            gate.check(&ours, &sealed, NOW_MS, now),
            Err(Refusal::UnknownKey(theirs.primary_id()))
        );
        // Their key with our id is a wrong tag, not a success.
        let key = theirs.primary_key();
        let lying = Header {
            key: ours.primary_id(),
            sender: 1,
            timestamp_ms: NOW_MS,
            counter: 2,
        };
        let mut forged = vec![0u8; HEADER_LEN + 3 + TAG_LEN];
        forged[HEADER_LEN..HEADER_LEN + 3].copy_from_slice(b"abc");
        lying.write(&mut forged[..HEADER_LEN]);
        let split = forged.len() - TAG_LEN;
        let tag = key.tag(&forged[..split]);
        forged[split..].copy_from_slice(&tag);
        assert_eq!(
            gate.check(&ours, &forged, NOW_MS, now),
            Err(Refusal::BadTag)
        );
    }

    #[test]
    fn a_tampered_header_payload_or_tag_is_rejected() {
        let ring = ring("auth-test-secret-0123456789");
        let mut gate = Gate::default();
        let now = Instant::now();
        let sealed = datagram(&ring, 1, NOW_MS, 1);
        for at in 0..sealed.len() {
            let mut tampered = sealed.clone();
            tampered[at] ^= 0x01;
            let refusal = gate.check(&ring, &tampered, NOW_MS, now);
            let expected = match at {
                0 => Err(Refusal::Malformed),
                1..5 => Err(Refusal::UnknownKey(
                    Header::read(&tampered).expect("a header").key,
                )),
                _ => Err(Refusal::BadTag),
            };
            assert_eq!(refusal, expected, "byte {at} flipped");
        }
        // Too short, empty, and the untouched datagram after all that (its counter unused).
        assert_eq!(gate.check(&ring, &[], NOW_MS, now), Err(Refusal::Malformed));
        assert_eq!(
            gate.check(&ring, &sealed[..HEADER_LEN + TAG_LEN - 1], NOW_MS, now),
            Err(Refusal::Malformed)
        );
        assert!(gate.check(&ring, &sealed, NOW_MS, now).is_ok());
    }

    #[test]
    fn a_datagram_of_a_removed_key_is_rejected() {
        let old = Secret::parse("auth-test-secret-old-0123456789").expect("valid");
        let new = Secret::parse("auth-test-secret-new-0123456789").expect("valid");
        let mut ring = KeyRing::new(&old);
        let old_id = ring.primary_id();
        let before = datagram(&ring, 1, NOW_MS, 1);
        let new_id = ring.install(&new).expect("room");
        let mut gate = Gate::default();
        let now = Instant::now();
        assert!(gate.check(&ring, &before, NOW_MS, now).is_ok());
        ring.use_key(new_id).expect("installed");
        ring.remove(old_id).expect("not primary");
        let again = datagram(&KeyRing::new(&old), 1, NOW_MS, 2);
        assert_eq!(
            gate.check(&ring, &again, NOW_MS, now),
            Err(Refusal::UnknownKey(old_id))
        );
        assert!(
            gate.check(&ring, &datagram(&ring, 1, NOW_MS, 3), NOW_MS, now)
                .is_ok()
        );
    }

    #[test]
    fn a_sender_counts_up_from_the_clock() {
        let id = KeyId::from_bytes([1, 2, 3, 4]);
        let before = unix_ms();
        let mut sender = Sender::new();
        let first = sender.next(id, before);
        let second = sender.next(id, before);
        assert_eq!(second.counter, first.counter + 1);
        assert_eq!(first.sender, second.sender);
        // Started at the clock in µs: a later start begins above this run's counters.
        assert!(
            first.counter / 1000 >= before,
            "{} vs {before}",
            first.counter
        );
        std::thread::sleep(Duration::from_millis(2));
        let later = Sender::new().next(id, unix_ms());
        assert!(later.counter > second.counter);
        assert_ne!(later.sender, first.sender);
    }
}
