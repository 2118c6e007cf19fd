//! Sans-IO WireGuard overlay core of mistnetd: pure logic, no sockets, no TUN, no threads.
//!
//! A [`Node`] holds one WireGuard [`Tunn`] per peer (boringtun 0.7.1's, from the
//! time-injected fork `mistnet-noise`) and the cryptokey routing table ([`AllowedIps`]). The I/O shell feeds it packets read from the TUN device
//! ([`Node::handle_tun_packet`]), datagrams read from UDP sockets ([`Node::handle_datagram`]) and
//! timer ticks ([`Node::handle_timeout`]), and carries out what it returns: a datagram to send,
//! a packet to write to the TUN device, or queued output drained with [`Node::poll_transmit`]
//! and [`Node::poll_event`]. Buffers are the caller's: the hot paths return slices of them and
//! allocate nothing.
//!
//! Invariants:
//! - A decrypted packet reaches the caller only if its inner source address belongs to the
//!   peer it came from (longest-prefix match over all peers' allowed IPs); others are dropped
//!   and counted ([`Stats::spoofed`]).
//! - Datagrams travel on a [`Path`]: a local underlay socket (the caller's id `S`) and a
//!   remote address. A peer's active path follows the path of its latest authenticated
//!   datagram (roaming), which is what keeps nodes behind NAT and on changing links reachable.
//!   [`Node::set_active_path`] lets a path selector override it; every [`Encap::Send`] names
//!   the path, and the caller may send the datagram on any other path of the peer too
//!   (per-packet choice, duplication): WireGuard's replay window drops duplicates.
//! - Handshakes, rekeying, keepalives and session expiry follow WireGuard's timers as
//!   implemented by boringtun; the core calls `update_timers` on every peer at least every
//!   [`TIMER_TICK`].
//! - Datagrams that are not WireGuard messages (types outside 1..=4) are returned to the caller
//!   as [`Decap::Foreign`]: the hook for mistnet's own path probes and relay envelopes.
//!
//! Time: `now` is passed in everywhere and is the only clock: it drives the core's timers and,
//! through `mistnet-noise`'s `*_at(now)` calls, WireGuard's (handshake retries, rekey,
//! keepalive, expiry). boringtun 0.7.1 itself reads the clock inside `Tunn`; the fork exists
//! to take that out (as Firezone does), so tests move time by passing later instants. The
//! wall-clock time given to [`Node::new`] seeds handshake timestamps (WireGuard's replay
//! protection for initiations needs them to grow across restarts).
//!
//! Randomness: handshake ephemeral keys, session indexes' low bits and cookie secrets come
//! from the OS inside `mistnet-noise` (key material must not be seedable).
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod allowed_ips;

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use allowed_ips::AllowedIps;
use ipnet::IpNet;
use mistnet_noise::noise::errors::WireGuardError;
use mistnet_noise::noise::handshake::parse_handshake_anon;
use mistnet_noise::noise::rate_limiter::RateLimiter;
use mistnet_noise::noise::{Packet, Tunn, TunnResult};
pub use mistnet_noise::x25519::{PublicKey, StaticSecret};
use tracing::{debug, trace};

/// How often every peer's WireGuard timers must be updated.
pub const TIMER_TICK: Duration = Duration::from_millis(250);
/// Bytes WireGuard adds to a packet (IPv4/UDP headers excluded): type, index, counter, tag.
pub const WG_DATA_OVERHEAD: usize = 32;
/// Smallest buffer the hot paths accept: the largest IP packet plus WireGuard's overhead.
pub const MIN_BUFFER: usize = 65535 + WG_DATA_OVERHEAD;
/// Handshakes per second a node answers before demanding cookies (boringtun's limit).
const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// A 32-byte X25519 key.
pub type Key = [u8; 32];

/// Where a datagram goes or came from: a local underlay socket and a remote address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Path<S> {
    /// The caller's id of the local socket.
    pub local: S,
    pub remote: SocketAddr,
}

impl<S: std::fmt::Debug> std::fmt::Display for Path<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}->{}", self.local, self.remote)
    }
}

/// How to reach and what to accept from one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig<S> {
    pub public_key: Key,
    /// Where to send until the peer is heard from (roaming then takes over).
    pub endpoint: Option<Path<S>>,
    /// Inner addresses this peer may send from and is routed to.
    pub allowed_ips: Vec<IpNet>,
    /// Seconds between keepalives when idle; keeps NAT mappings open.
    pub persistent_keepalive: Option<u16>,
}

/// What to do with a packet read from the TUN device.
#[derive(Debug, PartialEq, Eq)]
pub enum Encap<'a, P, S> {
    /// Send `datagram` (in the caller's buffer) to `dst`.
    Send {
        peer: P,
        path: Path<S>,
        datagram: &'a [u8],
    },
    /// Queued inside the peer's tunnel until its handshake completes.
    Queued { peer: P },
    /// The peer has no known endpoint yet.
    NoEndpoint { peer: P },
    /// No peer owns the destination.
    NoRoute,
    /// Not an IP packet.
    Malformed,
}

/// What came out of a datagram read from the network.
#[derive(Debug, PartialEq, Eq)]
pub enum Decap<'a, P> {
    /// Write `packet` (in the caller's buffer) to the TUN device.
    Tunnel { peer: P, packet: &'a [u8] },
    /// A handshake message, keepalive or cookie: nothing for the TUN device (replies, if any,
    /// are queued for [`Node::poll_transmit`]).
    Consumed { peer: P },
    /// Not a WireGuard message: for the caller's own protocols (probes, relay).
    Foreign,
    /// Dropped, with the reason (counted in [`Stats`]).
    Dropped(DropReason),
}

/// Why a datagram or its content was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// No peer has the sender's key or session index.
    UnknownPeer,
    /// The inner source address is outside the sending peer's allowed IPs.
    SpoofedSource,
    /// Decryption, replay or handshake validation failed.
    Crypto,
}

impl DropReason {
    /// A short name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::Crypto => "crypto",
        }
    }
}

/// A datagram queued by the core (handshake replies, keepalives, flushed queues).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit<P, S> {
    pub peer: P,
    pub path: Path<S>,
    pub payload: Vec<u8>,
}

/// Something the shell may want to log or export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<P, S> {
    /// A session with the peer was established (first or after having been down).
    PeerUp(P),
    /// The peer's session expired without a new handshake.
    PeerDown(P),
    /// The peer was heard on a new path (roaming), which is now its active path.
    PathChanged { peer: P, path: Path<S> },
}

/// Node-wide counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub tx_packets: u64,
    pub rx_packets: u64,
    pub no_route: u64,
    pub unknown_peer: u64,
    pub spoofed: u64,
    pub crypto_errors: u64,
}

/// A peer's state as shown by `mistnetd status`.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStatus<S> {
    pub public_key: Key,
    pub path: Option<Path<S>>,
    pub allowed_ips: Vec<IpNet>,
    pub last_handshake: Option<Duration>,
    pub tx_bytes: usize,
    pub rx_bytes: usize,
    pub spoofed: u64,
    pub up: bool,
}

struct Peer<S> {
    tunn: Tunn,
    config: PeerConfig<S>,
    path: Option<Path<S>>,
    index: u32,
    up: bool,
    spoofed: u64,
}

/// The overlay of one node, generic over the caller's peer id `P` and socket id `S`.
pub struct Node<P, S> {
    private: StaticSecret,
    public: PublicKey,
    rate_limiter: Arc<RateLimiter>,
    /// Wall-clock time at `created` (seeds handshake timestamps).
    unix_time: Duration,
    created: Instant,
    peers: BTreeMap<P, Peer<S>>,
    by_index: BTreeMap<u32, P>,
    by_key: BTreeMap<Key, P>,
    table: AllowedIps<P>,
    next_index: u32,
    transmits: VecDeque<Transmit<P, S>>,
    events: VecDeque<Event<P, S>>,
    next_tick: Option<Instant>,
    stats: Stats,
    scratch: Vec<u8>,
    roaming: bool,
}

impl<P, S> Node<P, S>
where
    P: Ord + Clone + std::fmt::Debug,
    S: Copy + Ord + std::fmt::Debug,
{
    /// Creates a node with its private key. `unix_time` is the wall-clock time at `now`
    /// (since the Unix epoch).
    pub fn new(private_key: Key, now: Instant, unix_time: Duration) -> Self {
        let private = StaticSecret::from(private_key);
        let public = PublicKey::from(&private);
        Self {
            rate_limiter: Arc::new(RateLimiter::new_at(&public, HANDSHAKE_RATE_LIMIT, now)),
            private,
            public,
            unix_time,
            created: now,
            peers: BTreeMap::new(),
            by_index: BTreeMap::new(),
            by_key: BTreeMap::new(),
            table: AllowedIps::default(),
            next_index: 1,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            next_tick: Some(now + TIMER_TICK),
            stats: Stats::default(),
            scratch: vec![0; MIN_BUFFER],
            roaming: true,
        }
    }

    /// This node's public key.
    pub fn public_key(&self) -> Key {
        self.public.to_bytes()
    }

    /// Adds a peer or updates one. An existing peer with the same key keeps its sessions (a
    /// configuration reload does not interrupt traffic); a changed key starts over.
    pub fn upsert_peer(&mut self, id: P, config: PeerConfig<S>, now: Instant) {
        if let Some(p) = self.peers.get_mut(&id)
            && p.config.public_key == config.public_key
        {
            if config.endpoint.is_some() && p.path.is_none() {
                p.path = config.endpoint;
            }
            if config.persistent_keepalive != p.config.persistent_keepalive {
                p.tunn.set_persistent_keepalive(config.persistent_keepalive);
            }
            p.config = config.clone();
            self.table.remove_peer(&id);
            for net in &config.allowed_ips {
                self.table.insert(*net, id.clone());
            }
            debug!(peer = ?id, "peer updated");
            return;
        }
        self.remove_peer(&id);
        let index = self.next_index;
        // Session indexes are index << 8 | session; 24 bits of peer index.
        self.next_index = (self.next_index % 0x00ff_ffff) + 1;
        let tunn = Tunn::new_at(
            self.private.clone(),
            PublicKey::from(config.public_key),
            None,
            config.persistent_keepalive,
            index,
            Some(self.rate_limiter.clone()),
            now,
            self.unix_time + now.saturating_duration_since(self.created),
        );
        for net in &config.allowed_ips {
            self.table.insert(*net, id.clone());
        }
        self.by_index.insert(index, id.clone());
        self.by_key.insert(config.public_key, id.clone());
        debug!(peer = ?id, index, "peer added");
        self.peers.insert(
            id,
            Peer {
                tunn,
                path: config.endpoint,
                config,
                index,
                up: false,
                spoofed: 0,
            },
        );
    }

    /// Removes a peer and its routes.
    pub fn remove_peer(&mut self, id: &P) {
        if let Some(p) = self.peers.remove(id) {
            self.by_index.remove(&p.index);
            self.by_key.remove(&p.config.public_key);
            self.table.remove_peer(id);
            debug!(peer = ?id, "peer removed");
        }
    }

    /// Ids of all peers.
    pub fn peer_ids(&self) -> impl Iterator<Item = &P> {
        self.peers.keys()
    }

    /// Turns roaming on (the default) or off. Off, a path selector owns every peer's active
    /// path: an authenticated datagram only sets the path of a peer that has none yet, and
    /// [`Event::PathChanged`] is not emitted after that.
    pub fn set_roaming(&mut self, on: bool) {
        self.roaming = on;
    }

    /// Makes `path` the peer's active path (for a path selector; roaming moves it again when
    /// the peer is heard on another path). Returns false for an unknown peer.
    pub fn set_active_path(&mut self, id: &P, path: Path<S>) -> bool {
        let Some(p) = self.peers.get_mut(id) else {
            return false;
        };
        p.path = Some(path);
        true
    }

    /// The peer owning an inner destination address (the cryptokey routing lookup).
    pub fn route(&self, dst: IpAddr) -> Option<&P> {
        self.table.lookup(dst)
    }

    /// Encrypts a packet read from the TUN device for the peer owning its destination.
    pub fn handle_tun_packet<'a>(
        &mut self,
        packet: &[u8],
        buf: &'a mut [u8],
        now: Instant,
    ) -> Encap<'a, P, S> {
        let Some(dst) = Tunn::dst_address(packet) else {
            return Encap::Malformed;
        };
        let Some(id) = self.table.lookup(dst).cloned() else {
            self.stats.no_route += 1;
            trace!(%dst, "no route");
            return Encap::NoRoute;
        };
        let Some(peer) = self.peers.get_mut(&id) else {
            return Encap::NoRoute;
        };
        let Some(path) = peer.path else {
            return Encap::NoEndpoint { peer: id };
        };
        match peer.tunn.encapsulate_at(packet, buf, now) {
            TunnResult::WriteToNetwork(datagram) => {
                self.stats.tx_packets += 1;
                Encap::Send {
                    peer: id,
                    path,
                    datagram,
                }
            }
            TunnResult::Done => Encap::Queued { peer: id },
            TunnResult::Err(e) => {
                debug!(peer = ?id, error = ?e, "encapsulate failed");
                Encap::Queued { peer: id }
            }
            TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                Encap::Queued { peer: id }
            }
        }
    }

    /// Handles a datagram that arrived on `path` (local socket, remote source address).
    pub fn handle_datagram<'a>(
        &mut self,
        path: Path<S>,
        datagram: &[u8],
        buf: &'a mut [u8],
        now: Instant,
    ) -> Decap<'a, P> {
        let src = path.remote;
        let Some(id) = self.peer_for(datagram) else {
            return match Tunn::parse_incoming_packet(datagram) {
                Err(_) => Decap::Foreign,
                Ok(_) => {
                    self.stats.unknown_peer += 1;
                    Decap::Dropped(DropReason::UnknownPeer)
                }
            };
        };
        let Some(peer) = self.peers.get_mut(&id) else {
            self.stats.unknown_peer += 1;
            return Decap::Dropped(DropReason::UnknownPeer);
        };
        let result = peer.tunn.decapsulate_at(Some(src.ip()), datagram, buf, now);
        // A cookie reply demanded by our rate limiter is sent before authentication.
        let authenticated = !matches!(result, TunnResult::Err(_))
            && !(matches!(result, TunnResult::WriteToNetwork(ref r) if r.first() == Some(&3)));
        if authenticated && peer.path != Some(path) && (self.roaming || peer.path.is_none()) {
            peer.path = Some(path);
            self.events.push_back(Event::PathChanged {
                peer: id.clone(),
                path,
            });
        }
        if authenticated && !peer.up && peer.tunn.time_since_last_handshake().is_some() {
            peer.up = true;
            debug!(peer = ?id, "peer up");
            self.events.push_back(Event::PeerUp(id.clone()));
        }
        match result {
            TunnResult::WriteToNetwork(reply) => {
                self.transmits.push_back(Transmit {
                    peer: id.clone(),
                    path,
                    payload: reply.to_vec(),
                });
                // Packets queued during the handshake go out now.
                while let TunnResult::WriteToNetwork(p) =
                    peer.tunn.decapsulate_at(None, &[], &mut self.scratch, now)
                {
                    self.transmits.push_back(Transmit {
                        peer: id.clone(),
                        path,
                        payload: p.to_vec(),
                    });
                }
                Decap::Consumed { peer: id }
            }
            TunnResult::WriteToTunnelV4(packet, inner_src) => {
                self.accept(id, IpAddr::V4(inner_src), packet)
            }
            TunnResult::WriteToTunnelV6(packet, inner_src) => {
                self.accept(id, IpAddr::V6(inner_src), packet)
            }
            TunnResult::Done => Decap::Consumed { peer: id },
            TunnResult::Err(e) => {
                trace!(peer = ?id, error = ?e, "decapsulate failed");
                self.stats.crypto_errors += 1;
                Decap::Dropped(DropReason::Crypto)
            }
        }
    }

    fn accept<'a>(&mut self, id: P, inner_src: IpAddr, packet: &'a mut [u8]) -> Decap<'a, P> {
        if !self.table.allows(&id, inner_src) {
            self.stats.spoofed += 1;
            if let Some(p) = self.peers.get_mut(&id) {
                p.spoofed += 1;
            }
            debug!(peer = ?id, %inner_src, "dropped packet with spoofed inner source");
            return Decap::Dropped(DropReason::SpoofedSource);
        }
        self.stats.rx_packets += 1;
        Decap::Tunnel { peer: id, packet }
    }

    fn peer_for(&self, datagram: &[u8]) -> Option<P> {
        match Tunn::parse_incoming_packet(datagram).ok()? {
            Packet::HandshakeInit(init) => {
                let half = parse_handshake_anon(&self.private, &self.public, &init).ok()?;
                self.by_key.get(&half.peer_static_public).cloned()
            }
            Packet::HandshakeResponse(r) => self.by_index.get(&(r.receiver_idx >> 8)).cloned(),
            Packet::PacketCookieReply(c) => self.by_index.get(&(c.receiver_idx >> 8)).cloned(),
            Packet::PacketData(d) => self.by_index.get(&(d.receiver_idx >> 8)).cloned(),
        }
    }

    /// Runs every peer's WireGuard timers: handshake (re)transmission, rekey, keepalives,
    /// expiry. Output is queued for [`Node::poll_transmit`] and [`Node::poll_event`].
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.next_tick.is_some_and(|t| now < t) {
            return;
        }
        self.next_tick = Some(now + TIMER_TICK);
        for (id, peer) in &mut self.peers {
            match peer.tunn.update_timers_at(&mut self.scratch, now) {
                TunnResult::WriteToNetwork(p) => {
                    if let Some(path) = peer.path {
                        self.transmits.push_back(Transmit {
                            peer: id.clone(),
                            path,
                            payload: p.to_vec(),
                        });
                    }
                }
                TunnResult::Err(WireGuardError::ConnectionExpired) => {
                    if peer.up {
                        peer.up = false;
                        debug!(peer = ?id, "peer down: session expired");
                        self.events.push_back(Event::PeerDown(id.clone()));
                    }
                }
                TunnResult::Err(e) => trace!(peer = ?id, error = ?e, "timer"),
                TunnResult::Done
                | TunnResult::WriteToTunnelV4(..)
                | TunnResult::WriteToTunnelV6(..) => {}
            }
        }
    }

    /// When [`Node::handle_timeout`] wants to run next, and why.
    pub fn poll_timeout(&self) -> Option<(Instant, &'static str)> {
        self.next_tick.map(|t| (t, "wireguard timers"))
    }

    /// The next queued datagram.
    pub fn poll_transmit(&mut self) -> Option<Transmit<P, S>> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event<P, S>> {
        self.events.pop_front()
    }

    /// Node-wide counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// A peer's current path (cheap: for per-packet decisions).
    pub fn peer_path(&self, id: &P) -> Option<Path<S>> {
        self.peers.get(id).and_then(|p| p.path)
    }

    /// A peer's state.
    pub fn peer_status(&self, id: &P) -> Option<PeerStatus<S>> {
        let p = self.peers.get(id)?;
        let (last_handshake, tx_bytes, rx_bytes, _, _) = p.tunn.stats();
        Some(PeerStatus {
            public_key: p.config.public_key,
            path: p.path,
            allowed_ips: p.config.allowed_ips.clone(),
            last_handshake,
            tx_bytes,
            rx_bytes,
            spoofed: p.spoofed,
            up: p.up,
        })
    }
}

#[cfg(test)]
mod tests;
