//! Sans-IO WireGuard overlay core of mistnetd: pure logic, no sockets, no TUN, no threads.
//!
//! A [`Node`] holds one boringtun [`Tunn`] per peer and the cryptokey routing table
//! ([`AllowedIps`]). The I/O shell feeds it packets read from the TUN device
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
//! - A peer's endpoint follows the source address of its latest authenticated datagram
//!   (roaming), which is what keeps nodes behind NAT and on changing links reachable.
//! - Handshakes, rekeying, keepalives and session expiry follow WireGuard's timers as
//!   implemented by boringtun; the core calls `update_timers` on every peer at least every
//!   [`TIMER_TICK`].
//! - Datagrams that are not WireGuard messages (types outside 1..=4) are returned to the caller
//!   as [`Decap::Foreign`]: the hook for mistnet's own path probes and relay envelopes.
//!
//! Time: `now` is passed in everywhere and drives the core's own timers. boringtun 0.7 also
//! reads the monotonic clock inside `Tunn` (it has no `*_at(now)` API); tests that need to move
//! WireGuard's timers (rekey, expiry, keepalive) enable the `mock-clock` feature, which switches
//! boringtun to its mock clock, in a separate test run. Carrying a boringtun patch with
//! time-injected calls (as Firezone does) would remove that exception.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod allowed_ips;

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use allowed_ips::AllowedIps;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
pub use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;
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

/// How to reach and what to accept from one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: Key,
    /// Where to send until the peer is heard from (roaming then takes over).
    pub endpoint: Option<SocketAddr>,
    /// Inner addresses this peer may send from and is routed to.
    pub allowed_ips: Vec<IpNet>,
    /// Seconds between keepalives when idle; keeps NAT mappings open.
    pub persistent_keepalive: Option<u16>,
}

/// What to do with a packet read from the TUN device.
#[derive(Debug, PartialEq, Eq)]
pub enum Encap<'a, P> {
    /// Send `datagram` (in the caller's buffer) to `dst`.
    Send {
        peer: P,
        dst: SocketAddr,
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
pub struct Transmit<P> {
    pub peer: P,
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

/// Something the shell may want to log or export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<P> {
    /// A session with the peer was established (first or after having been down).
    PeerUp(P),
    /// The peer's session expired without a new handshake.
    PeerDown(P),
    /// The peer was heard from a new address.
    EndpointChanged { peer: P, endpoint: SocketAddr },
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
pub struct PeerStatus {
    pub public_key: Key,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub last_handshake: Option<Duration>,
    pub tx_bytes: usize,
    pub rx_bytes: usize,
    pub spoofed: u64,
    pub up: bool,
}

struct Peer {
    tunn: Tunn,
    config: PeerConfig,
    endpoint: Option<SocketAddr>,
    index: u32,
    up: bool,
    spoofed: u64,
}

/// The overlay of one node, generic over the caller's peer id.
pub struct Node<P> {
    private: StaticSecret,
    public: PublicKey,
    rate_limiter: Arc<RateLimiter>,
    peers: BTreeMap<P, Peer>,
    by_index: BTreeMap<u32, P>,
    by_key: BTreeMap<Key, P>,
    table: AllowedIps<P>,
    next_index: u32,
    transmits: VecDeque<Transmit<P>>,
    events: VecDeque<Event<P>>,
    next_tick: Option<Instant>,
    stats: Stats,
    scratch: Vec<u8>,
}

impl<P: Ord + Clone + std::fmt::Debug> Node<P> {
    /// Creates a node with its private key.
    pub fn new(private_key: Key, now: Instant) -> Self {
        let private = StaticSecret::from(private_key);
        let public = PublicKey::from(&private);
        Self {
            rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            private,
            public,
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
        }
    }

    /// This node's public key.
    pub fn public_key(&self) -> Key {
        self.public.to_bytes()
    }

    /// Adds a peer or updates one. An existing peer with the same key keeps its sessions (a
    /// configuration reload does not interrupt traffic); a changed key starts over.
    pub fn upsert_peer(&mut self, id: P, config: PeerConfig) {
        if let Some(p) = self.peers.get_mut(&id)
            && p.config.public_key == config.public_key
        {
            if config.endpoint.is_some() && p.endpoint.is_none() {
                p.endpoint = config.endpoint;
            }
            p.tunn_keepalive_unchanged(&config);
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
        let tunn = Tunn::new(
            self.private.clone(),
            PublicKey::from(config.public_key),
            None,
            config.persistent_keepalive,
            index,
            Some(self.rate_limiter.clone()),
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
                endpoint: config.endpoint,
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

    /// Encrypts a packet read from the TUN device for the peer owning its destination.
    pub fn handle_tun_packet<'a>(
        &mut self,
        packet: &[u8],
        buf: &'a mut [u8],
        _now: Instant,
    ) -> Encap<'a, P> {
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
        let Some(endpoint) = peer.endpoint else {
            return Encap::NoEndpoint { peer: id };
        };
        match peer.tunn.encapsulate(packet, buf) {
            TunnResult::WriteToNetwork(datagram) => {
                self.stats.tx_packets += 1;
                Encap::Send {
                    peer: id,
                    dst: endpoint,
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

    /// Handles a datagram from the network.
    pub fn handle_datagram<'a>(
        &mut self,
        src: SocketAddr,
        datagram: &[u8],
        buf: &'a mut [u8],
        _now: Instant,
    ) -> Decap<'a, P> {
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
        let result = peer.tunn.decapsulate(Some(src.ip()), datagram, buf);
        let authenticated = !matches!(result, TunnResult::Err(_));
        if authenticated && peer.endpoint != Some(src) {
            peer.endpoint = Some(src);
            self.events.push_back(Event::EndpointChanged {
                peer: id.clone(),
                endpoint: src,
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
                    dst: src,
                    payload: reply.to_vec(),
                });
                // Packets queued during the handshake go out now.
                while let TunnResult::WriteToNetwork(p) =
                    peer.tunn.decapsulate(None, &[], &mut self.scratch)
                {
                    self.transmits.push_back(Transmit {
                        peer: id.clone(),
                        dst: src,
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
            match peer.tunn.update_timers(&mut self.scratch) {
                TunnResult::WriteToNetwork(p) => {
                    if let Some(dst) = peer.endpoint {
                        self.transmits.push_back(Transmit {
                            peer: id.clone(),
                            dst,
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
    pub fn poll_transmit(&mut self) -> Option<Transmit<P>> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event<P>> {
        self.events.pop_front()
    }

    /// Node-wide counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// A peer's state.
    pub fn peer_status(&self, id: &P) -> Option<PeerStatus> {
        let p = self.peers.get(id)?;
        let (last_handshake, tx_bytes, rx_bytes, _, _) = p.tunn.stats();
        Some(PeerStatus {
            public_key: p.config.public_key,
            endpoint: p.endpoint,
            allowed_ips: p.config.allowed_ips.clone(),
            last_handshake,
            tx_bytes,
            rx_bytes,
            spoofed: p.spoofed,
            up: p.up,
        })
    }
}

impl Peer {
    /// Keepalive changes need a new Tunn in boringtun 0.7; they are applied on the next
    /// handshake-free restart. Logged so an operator knows.
    fn tunn_keepalive_unchanged(&self, new: &PeerConfig) {
        if new.persistent_keepalive != self.config.persistent_keepalive {
            debug!("persistent keepalive change takes effect when the peer is re-added");
        }
    }
}

#[cfg(test)]
mod tests;
