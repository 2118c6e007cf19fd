//! The node's pure state as the dataplane threads see it: the WireGuard overlay core and the
//! path selector, side by side behind one mutex (`dataplane::Shared::core`), plus the keys
//! that turn the selector's path choices into datagrams (relay envelopes, probe MACs).
//!
//! Every peer's datagrams leave on the selector's active path (and, in redundant mode, also
//! on its secondary path); the overlay's own path is only the fallback while the selector has
//! none (path selection off, or nothing probed yet). Roaming is off in the overlay when the
//! selector runs, so duplicates and relayed datagrams never move a peer's path behind the
//! selector's back.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mistnet_overlay::{Node, Path, PeerConfig};
use mistnet_path::wire::{self, Nack};
use mistnet_path::{LocalInfo, PathId, PeerKeys, Selector, Via};
use tracing::debug;

use crate::config::PeerConf;
use crate::dataplane::SockId;
use crate::reorder::{Reorder, Verdict};
use crate::repair::{Judge, Mode as RepairMode, Repair, RepairStats};

/// Where one copy of a datagram goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// Straight to the peer.
    Direct(Path<SockId>),
    /// Wrapped in a relay envelope for `dst`, sent to the relay on `via`.
    Relay {
        via: Path<SockId>,
        relay_key: [u8; 32],
        dst: [u8; 8],
    },
}

/// Up to two destinations for one datagram (the second in redundant mode).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dests {
    pub first: Option<Dest>,
    pub second: Option<Dest>,
}

/// A peer's id in the cores: small and `Copy`, so the per-packet paths never clone a name.
pub type PeerId = u32;

struct PeerInfo {
    name: String,
    keys: PeerKeys,
    endpoints: Vec<SocketAddr>,
}

/// The overlay core, the path selector and the peers' keys.
pub struct Core {
    pub overlay: Node<PeerId, SockId>,
    pub paths: Option<Selector<PeerId, SockId>>,
    private: [u8; 32],
    my_id: [u8; 8],
    locals: Vec<SockId>,
    local_names: BTreeMap<SockId, String>,
    relay: bool,
    control_port: Option<u16>,
    /// Per peer: how long the reorder buffer holds (zero: off) and the buffer.
    reorder: BTreeMap<PeerId, (Duration, Reorder)>,
    /// Selective repair on (`[paths] repair`).
    repair_enabled: bool,
    /// Per peer: the sending side of selective repair ([`crate::repair`]).
    repair: BTreeMap<PeerId, Repair>,
    /// Per peer: the receiving side of selective repair (the mode its nacks wish).
    judges: BTreeMap<PeerId, Judge>,
    /// Peers whose reorder buffer saw gaps since the last [`Core::poll_nacks`].
    nack_due: Vec<PeerId>,
    /// Nacks sent and their wire bytes (every copy), for metrics.
    nacks_sent: u64,
    nack_bytes_sent: u64,
    peers: BTreeMap<PeerId, PeerInfo>,
    by_name: BTreeMap<String, PeerId>,
    next_id: PeerId,
}

/// The short id of a node on the wire: the first 8 bytes of its WireGuard public key.
pub fn short_id(public_key: &[u8; 32]) -> [u8; 8] {
    let mut id = [0u8; 8];
    id.copy_from_slice(&public_key[..8]);
    id
}

/// The key two nodes share for path probes and relay envelopes: their X25519 static-static
/// secret, hashed with a label so it is never the input of anything else.
pub fn pairwise_key(private: &[u8; 32], peer_public: &[u8; 32]) -> [u8; 32] {
    use blake2::Digest;
    let secret = mistnet_overlay::StaticSecret::from(*private);
    let shared = secret.diffie_hellman(&mistnet_overlay::PublicKey::from(*peer_public));
    let mut h = blake2::Blake2s256::new();
    h.update(b"mistnet path mac v1");
    h.update(shared.as_bytes());
    h.finalize().into()
}

impl Core {
    pub fn new(
        overlay: Node<PeerId, SockId>,
        paths: Option<Selector<PeerId, SockId>>,
        private: [u8; 32],
        locals: Vec<(SockId, String, LocalInfo)>,
        relay: bool,
    ) -> Self {
        let my_id = short_id(&overlay.public_key());
        let mut core = Self {
            overlay,
            paths,
            private,
            my_id,
            locals: locals.iter().map(|(l, _, _)| *l).collect(),
            local_names: locals.iter().map(|(l, n, _)| (*l, n.clone())).collect(),
            relay,
            control_port: None,
            reorder: BTreeMap::new(),
            repair_enabled: true,
            repair: BTreeMap::new(),
            judges: BTreeMap::new(),
            nack_due: Vec::new(),
            nacks_sent: 0,
            nack_bytes_sent: 0,
            peers: BTreeMap::new(),
            by_name: BTreeMap::new(),
            next_id: 1,
        };
        if let Some(sel) = core.paths.as_mut() {
            for (l, _, info) in locals {
                sel.set_local(l, info);
            }
            core.overlay.set_roaming(false);
        }
        core
    }

    /// This node's short id.
    pub fn my_id(&self) -> [u8; 8] {
        self.my_id
    }

    /// Sets the control channel's UDP port, whose packets are not user traffic.
    pub fn set_control_port(&mut self, port: Option<u16>) {
        self.control_port = port;
    }

    /// True for an IP packet of the control channel (UDP from or to its port): it keeps a
    /// peer's paths alive without making the peer busy (fast probing is for user traffic).
    pub fn is_control(&self, packet: &[u8]) -> bool {
        let Some(port) = self.control_port else {
            return false;
        };
        let (proto, l4) = match packet.first().map(|b| b >> 4) {
            Some(4) => {
                let ihl = usize::from(packet[0] & 0x0f) * 4;
                (packet.get(9).copied(), ihl)
            }
            Some(6) => (packet.get(6).copied(), 40),
            _ => return false,
        };
        if proto != Some(17) {
            return false;
        }
        let port_at = |at: usize| {
            packet
                .get(l4 + at..l4 + at + 2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]))
        };
        port_at(0) == Some(port) || port_at(2) == Some(port)
    }

    /// Sets each peer's reorder limit from its paths, and the mode its nacks wish. While a
    /// peer is in redundant mode the limit is three smoothed RTTs of the active (fast) path,
    /// about what TCP needs to detect and repair a loss by itself (RACK's reordering window,
    /// the retransmission's round trip, and the window it then loses); while resends fill the
    /// gaps ([`crate::repair`]) it is at least the two paths' RTTs added, the time a nack (on
    /// the active path) and the resend it asks for (on the second) take. Called from the
    /// timer thread, not per packet.
    pub fn refresh_reorder(&mut self, now: Instant) {
        let Some(sel) = self.paths.as_ref() else {
            return;
        };
        for id in self.peers.keys() {
            let sp = sel.send_paths(id);
            let srtt = |p| sel.path_metrics(id, p).and_then(|m| m.srtt);
            let (hold, buf) = self.reorder.entry(*id).or_default();
            let judge = self.judges.entry(*id).or_default();
            let (Some(active), Some(secondary)) = (sp.active, sp.secondary) else {
                *hold = Duration::ZERO;
                judge.reset();
                if let Some(r) = self.repair.get_mut(id) {
                    r.reset();
                }
                continue;
            };
            let Some(rtt) = srtt(active) else {
                *hold = Duration::ZERO;
                continue;
            };
            let both = rtt + srtt(secondary).unwrap_or(rtt);
            // A resend lands about a one-way trip on each path after the gap shows (the nack
            // on the active path, the resend on the second), plus a receive batch and a timer
            // tick: copies later than that are worse than repair.
            buf.set_horizon(both / 2 + Duration::from_millis(5));
            if self.repair_enabled && judge.update(now, !buf.copies_missing(), both) {
                buf.reset_evidence();
            }
            let limit = if judge.wants_repair() {
                (3 * rtt).max(both)
            } else {
                3 * rtt
            };
            *hold = limit.clamp(Duration::from_millis(10), crate::reorder::MAX_HOLD);
        }
    }

    /// Turns selective repair on or off (`[paths] repair`).
    pub fn set_repair(&mut self, on: bool) {
        self.repair_enabled = on;
    }

    /// Where a data message for `peer` goes: [`Core::dests`], except that the copy on the
    /// second path is left out while the peer's sending side repairs instead of copying; the
    /// message is then kept for a nack ([`crate::repair`]).
    pub fn data_dests(
        &mut self,
        peer: PeerId,
        fallback: Option<Path<SockId>>,
        datagram: &[u8],
        now: Instant,
    ) -> Dests {
        let mut d = self.dests(peer, fallback);
        if d.second.is_some()
            && let Some(r) = self.repair.get_mut(&peer)
            && r.mode() == RepairMode::Repair
        {
            d.second = None;
            if let Some((session, counter)) = crate::reorder::data_counter(datagram) {
                r.record(session, counter, datagram, now);
            }
        }
        d
    }

    /// Takes a nack from `peer`: resends (on the second path) what it asks for, when this
    /// node's side repairs; may switch the side from copying to repairing.
    pub fn handle_nack(&mut self, peer: PeerId, nack: &Nack, out: &mut Vec<(Dest, Vec<u8>)>) {
        if !self.repair_enabled {
            return;
        }
        let Some(second) = self.dests(peer, None).second else {
            // Out of redundant mode here: no second path to repair on.
            return;
        };
        let mut resend = Vec::new();
        self.repair
            .entry(peer)
            .or_default()
            .handle_nack(nack, &mut resend);
        out.extend(resend.into_iter().map(|d| (second, d)));
    }

    /// Nacks for the gaps the reorder buffers saw since the last call, one per peer (more
    /// past [`wire::MAX_NACK_RANGES`] gaps), on both of the peer's paths: the active one is
    /// the fastest, the second one the surest.
    pub fn poll_nacks(&mut self, out: &mut Vec<(Dest, Vec<u8>)>) {
        for peer in std::mem::take(&mut self.nack_due) {
            let Some((_, buf)) = self.reorder.get_mut(&peer) else {
                continue;
            };
            let Some((session, ranges)) = buf.take_gaps() else {
                continue;
            };
            let copies_late = self.judges.get(&peer).is_some_and(Judge::wants_repair);
            let Some(key) = self.peers.get(&peer).map(|p| p.keys.mac_key) else {
                continue;
            };
            let d = self.dests(peer, None);
            for chunk in ranges.chunks(wire::MAX_NACK_RANGES) {
                let nack = Nack {
                    session,
                    copies_late,
                    ranges: chunk.to_vec(),
                };
                let mut bytes = Vec::new();
                wire::encode_nack(&self.my_id, &nack, &key, &mut bytes);
                self.nacks_sent += 1;
                if let Some(second) = d.second {
                    self.nack_bytes_sent += bytes.len() as u64;
                    out.push((second, bytes.clone()));
                }
                if let Some(first) = d.first {
                    self.nack_bytes_sent += bytes.len() as u64;
                    out.push((first, bytes));
                }
            }
        }
    }

    /// A peer's selective repair: how this node sends to it, the mode this node's nacks
    /// wish of it, the sending side's counters, and the receiving side's evidence.
    pub fn repair_status(
        &self,
        peer: PeerId,
    ) -> (RepairMode, RepairMode, RepairStats, (f64, f64, f64)) {
        let (mode, stats) = self
            .repair
            .get(&peer)
            .map_or((RepairMode::Copy, RepairStats::default()), |r| {
                (r.mode(), r.stats())
            });
        let wish = self.judges.get(&peer).map_or(RepairMode::Copy, Judge::mode);
        let evidence = self
            .reorder
            .get(&peer)
            .map_or((0.0, 0.0, 0.0), |(_, b)| b.evidence());
        (mode, wish, stats, evidence)
    }

    /// Nacks sent by this node, and their wire bytes.
    pub fn nacks_sent(&self) -> (u64, u64) {
        (self.nacks_sent, self.nack_bytes_sent)
    }

    /// Puts a decrypted data packet of `peer` through its reorder buffer.
    pub fn reorder_push(
        &mut self,
        peer: PeerId,
        session: u32,
        counter: u64,
        packet: &[u8],
        now: Instant,
    ) -> Verdict {
        let (hold, buf) = self.reorder.entry(peer).or_default();
        let verdict = buf.push(session, counter, packet, *hold, now);
        // Gaps are recorded only in redundant mode; the check per packet is one length test.
        if buf.has_gaps() && self.repair_enabled && !self.nack_due.contains(&peer) {
            self.nack_due.push(peer);
        }
        verdict
    }

    /// Packets whose wait in a reorder buffer is over, in order per peer.
    pub fn reorder_expired(&mut self, now: Instant, out: &mut Vec<Vec<u8>>) {
        for (_, buf) in self.reorder.values_mut() {
            out.extend(buf.poll_expired(now));
        }
    }

    /// The earliest reorder deadline.
    pub fn reorder_deadline(&self) -> Option<Instant> {
        self.reorder
            .values()
            .filter_map(|(_, b)| b.next_deadline())
            .min()
    }

    /// A path for logs and status: `wlan0 -> 10.99.0.2:51820` or `relay n3`.
    pub fn describe(&self, path: &PathId<PeerId, SockId>) -> String {
        let local = self
            .local_names
            .get(&path.local)
            .map_or("?", String::as_str);
        match &path.via {
            Via::Direct(addr) => format!("{local} -> {addr}"),
            Via::Relay(r) => format!("relay {}", self.name_of(*r).unwrap_or("?")),
        }
    }

    /// Names of all peers.
    pub fn peer_names(&self) -> impl Iterator<Item = &String> {
        self.by_name.keys()
    }

    /// A peer's id.
    pub fn id_of(&self, name: &str) -> Option<PeerId> {
        self.by_name.get(name).copied()
    }

    /// A peer's name.
    pub fn name_of(&self, id: PeerId) -> Option<&str> {
        self.peers.get(&id).map(|p| p.name.as_str())
    }

    /// The pairwise key with a peer.
    pub fn key_of(&self, peer: PeerId) -> Option<[u8; 32]> {
        self.peers.get(&peer).map(|p| p.keys.mac_key)
    }

    /// Adds or updates a peer in the overlay and the selector (candidates are set by
    /// [`Core::refresh_relays`]).
    pub fn upsert_peer(&mut self, p: &PeerConf, now: Instant) {
        let id = match self.by_name.get(&p.name) {
            Some(id) => *id,
            None => {
                let id = self.next_id;
                self.next_id += 1;
                self.by_name.insert(p.name.clone(), id);
                id
            }
        };
        self.overlay.upsert_peer(
            id,
            PeerConfig {
                public_key: p.public_key,
                endpoint: p.endpoints.first().map(|remote| Path {
                    local: self.locals.first().copied().unwrap_or(0),
                    remote: *remote,
                }),
                allowed_ips: p.pod_cidrs.clone(),
                persistent_keepalive: p.persistent_keepalive,
            },
            now,
        );
        let keys = PeerKeys {
            id: short_id(&p.public_key),
            mac_key: pairwise_key(&self.private, &p.public_key),
        };
        let changed = self.peers.get(&id).is_none_or(|old| old.keys.id != keys.id);
        if changed {
            if let Some(sel) = self.paths.as_mut() {
                sel.remove_peer(&id);
                sel.add_peer(id, keys, now);
            }
            debug!(peer = %p.name, "peer keys set");
        }
        self.peers.insert(
            id,
            PeerInfo {
                name: p.name.clone(),
                keys,
                endpoints: p.endpoints.clone(),
            },
        );
    }

    /// Removes a peer everywhere.
    pub fn remove_peer(&mut self, name: &str) {
        let Some(id) = self.by_name.remove(name) else {
            return;
        };
        self.overlay.remove_peer(&id);
        self.reorder.remove(&id);
        self.repair.remove(&id);
        self.judges.remove(&id);
        if let Some(sel) = self.paths.as_mut() {
            sel.remove_peer(&id);
        }
        self.peers.remove(&id);
    }

    /// Gives the selector every peer's candidates: each local underlay to each endpoint of
    /// the same family, plus (relays allowed) a relay path through every other peer.
    pub fn refresh_relays(&mut self, now: Instant) {
        let Some(sel) = self.paths.as_mut() else {
            return;
        };
        let ids: Vec<PeerId> = self.peers.keys().copied().collect();
        for (id, info) in &self.peers {
            let mut candidates = Vec::new();
            for l in &self.locals {
                for e in &info.endpoints {
                    candidates.push(PathId {
                        local: *l,
                        via: Via::Direct(*e),
                    });
                }
            }
            if self.relay {
                for r in ids.iter().filter(|r| *r != id) {
                    candidates.push(PathId {
                        local: self.locals.first().copied().unwrap_or(0),
                        via: Via::Relay(*r),
                    });
                }
            }
            sel.set_candidates(id, candidates, now);
        }
    }

    /// Where a datagram for `peer` goes: the selector's paths, or `fallback` (the overlay's
    /// own path) while the selector has none.
    pub fn dests(&self, peer: PeerId, fallback: Option<Path<SockId>>) -> Dests {
        let Some(sel) = self.paths.as_ref() else {
            return Dests {
                first: fallback.map(Dest::Direct),
                second: None,
            };
        };
        let sp = sel.send_paths(&peer);
        let first = sp
            .active
            .as_ref()
            .and_then(|p| self.resolve(peer, p))
            .or(fallback.map(Dest::Direct));
        let second = sp
            .secondary
            .as_ref()
            .and_then(|p| self.resolve(peer, p))
            .filter(|d| Some(*d) != first);
        Dests { first, second }
    }

    /// Turns a selector path into a destination; a relay is reached on its own direct path.
    pub fn resolve(&self, peer: PeerId, path: &PathId<PeerId, SockId>) -> Option<Dest> {
        match &path.via {
            Via::Direct(remote) => Some(Dest::Direct(Path {
                local: path.local,
                remote: *remote,
            })),
            Via::Relay(r) => {
                let via = self.direct_path(*r)?;
                let relay_key = self.key_of(*r)?;
                let dst = self.peers.get(&peer)?.keys.id;
                Some(Dest::Relay {
                    via,
                    relay_key,
                    dst,
                })
            }
        }
    }

    /// The direct path to a peer (used to reach relays): the selector's active path if it is
    /// direct, else the overlay's.
    pub fn direct_path(&self, peer: PeerId) -> Option<Path<SockId>> {
        if let Some(sel) = self.paths.as_ref()
            && let Some(PathId {
                local,
                via: Via::Direct(remote),
            }) = sel.send_paths(&peer).active
        {
            return Some(Path {
                local: *local,
                remote: *remote,
            });
        }
        self.overlay.peer_path(&peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_packets_are_recognised() {
        let now = Instant::now();
        let overlay = Node::new([1; 32], now, std::time::Duration::ZERO);
        let mut core = Core::new(overlay, None, [1; 32], Vec::new(), false);
        let mut udp = vec![0u8; 28];
        udp[0] = 0x45;
        udp[9] = 17;
        udp[22..24].copy_from_slice(&51870u16.to_be_bytes());
        assert!(!core.is_control(&udp), "no control port set");
        core.set_control_port(Some(51870));
        assert!(core.is_control(&udp));
        udp[22..24].copy_from_slice(&80u16.to_be_bytes());
        assert!(!core.is_control(&udp));
        udp[20..22].copy_from_slice(&51870u16.to_be_bytes());
        assert!(core.is_control(&udp), "replies from the port count too");
        udp[9] = 6;
        assert!(!core.is_control(&udp), "TCP is user traffic");
        assert!(!core.is_control(&[0x45]), "truncated");
        assert!(!core.is_control(&[]));
    }
}
