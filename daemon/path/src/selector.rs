//! The [`Selector`] state machine: per-peer path sets, probing, selection, redundancy.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Debug;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tracing::{debug, trace};

use crate::metrics::{Bucket, LossWindow, Rng, Rtt, RxWindow};
use crate::wire::{self, Body, ShortId};
use crate::{
    Config, Error, Event, Handled, LocalInfo, Mode, PathId, PathMetrics, PathState, PathStatus,
    PeerKeys, PeerPathStatus, Reason, Redundancy, SendPaths, Stats, Transmit, Via, better, score,
};

/// Paths kept per peer; discovery beyond this is ignored (bounds memory against a peer that
/// advertises endless endpoints).
const MAX_PATHS: usize = 64;
/// Observed addresses remembered per local underlay.
const MAX_OBSERVED: usize = 4;
/// Backoff exponent cap (retry_initial · 2^16 is far above any sane retry_max).
const MAX_BACKOFF: u32 = 16;
const IPV4_UDP_HEADERS: usize = 28;
const IPV6_UDP_HEADERS: usize = 48;

/// Adaptive path selection for all peers of one node, generic over the caller's peer id `P`
/// and local underlay id `L`.
pub struct Selector<P, L> {
    ctx: Ctx<P, L>,
    peers: BTreeMap<P, Peer<P, L>>,
    by_id: BTreeMap<ShortId, P>,
    next_wake: Option<(Instant, &'static str)>,
}

/// Everything but the peers, so a peer and the context can be borrowed together.
struct Ctx<P, L> {
    cfg: Config,
    id: ShortId,
    epoch: Instant,
    now: Instant,
    rng: Rng,
    locals: BTreeMap<L, Local>,
    advertised: Vec<SocketAddr>,
    transmits: VecDeque<Transmit<P, L>>,
    events: VecDeque<Event<P, L>>,
    stats: Stats,
}

struct Local {
    info: LocalInfo,
    bucket: Option<Bucket>,
    observed: Vec<SocketAddr>,
}

struct Peer<P, L> {
    keys: PeerKeys,
    paths: BTreeMap<PathId<P, L>, PathEntry>,
    /// First configured candidate: where to send before any path answered.
    fallback: Option<PathId<P, L>>,
    active: Option<PathId<P, L>>,
    secondary: Option<PathId<P, L>>,
    reason: Option<Reason>,
    changed_at: Option<Instant>,
    challenger: Option<(PathId<P, L>, Instant)>,
    /// Since when the active path's loss is at or below the redundancy leave threshold.
    quiet_since: Option<Instant>,
    last_data: Option<Instant>,
    was_busy: bool,
    next_tag: u32,
    next_cmm: Option<Instant>,
    next_due: Option<(Instant, &'static str)>,
}

struct PathEntry {
    tag: u32,
    configured: bool,
    discovered: bool,
    state: PathState,
    rtt: Rtt,
    window: LossWindow,
    rx: RxWindow,
    next_seq: u32,
    replies: u64,
    last_heard: Option<Instant>,
    unanswered: u32,
    first_unanswered: Option<Instant>,
    next_probe: Instant,
    last_probe: Option<Instant>,
    backoff: u32,
    /// Role or state changed: recompute `next_probe` from `last_probe`.
    resched: bool,
    /// Creation or latest re-advertisement (discovered candidates expire from here).
    refreshed: Instant,
    probes_sent: u64,
    probe_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    InUse,
    Challenger,
    Standby,
}

impl<P, L> Selector<P, L>
where
    P: Ord + Clone + Debug,
    L: Ord + Copy + Debug,
{
    /// Creates a selector for the node whose short id is `id` (it is the sender id of every
    /// probe and relay envelope). `seed` drives timer jitter only.
    pub fn new(config: Config, id: ShortId, seed: [u8; 32], now: Instant) -> Self {
        Self {
            ctx: Ctx {
                cfg: config,
                id,
                epoch: now,
                now,
                rng: Rng::new(seed),
                locals: BTreeMap::new(),
                advertised: Vec::new(),
                transmits: VecDeque::new(),
                events: VecDeque::new(),
                stats: Stats::default(),
            },
            peers: BTreeMap::new(),
            by_id: BTreeMap::new(),
            next_wake: None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.ctx.cfg
    }

    /// Declares (or updates) an underlay of this node. A changed budget starts a full bucket.
    pub fn set_local(&mut self, local: L, info: LocalInfo) {
        let now = self.ctx.now;
        let entry = self.ctx.locals.entry(local).or_insert(Local {
            info,
            bucket: None,
            observed: Vec::new(),
        });
        if entry.bucket.is_none() || entry.info.probe_budget != info.probe_budget {
            entry.bucket = info.probe_budget.map(|b| Bucket::new(b, now));
        }
        entry.info = info;
        debug!(?local, ?info, "local underlay set");
    }

    /// This node's own endpoints (configured public addresses) for call-me-maybe; observed
    /// addresses are added automatically. At most [`wire::MAX_ENDPOINTS`] are sent.
    pub fn set_advertised(&mut self, endpoints: impl IntoIterator<Item = SocketAddr>) {
        let mut v: Vec<SocketAddr> = Vec::new();
        for e in endpoints {
            if !v.contains(&e) {
                v.push(e);
            }
        }
        self.ctx.advertised = v;
    }

    /// Adds a peer, or updates its keys.
    pub fn add_peer(&mut self, peer: P, keys: PeerKeys, now: Instant) {
        self.ctx.now = self.ctx.now.max(now);
        if let Some(p) = self.peers.get_mut(&peer) {
            if p.keys.id != keys.id {
                if self.by_id.get(&p.keys.id) == Some(&peer) {
                    self.by_id.remove(&p.keys.id);
                }
                self.by_id.insert(keys.id, peer.clone());
            }
            p.keys = keys;
            return;
        }
        if let Some(other) = self.by_id.insert(keys.id, peer.clone()) {
            debug!(?peer, ?other, "short id collision: the newer peer wins");
        }
        debug!(?peer, "peer added");
        self.peers.insert(
            peer,
            Peer {
                keys,
                paths: BTreeMap::new(),
                fallback: None,
                active: None,
                secondary: None,
                reason: None,
                changed_at: None,
                challenger: None,
                quiet_since: None,
                last_data: None,
                was_busy: false,
                next_tag: 1,
                next_cmm: None,
                next_due: None,
            },
        );
    }

    /// Removes a peer and its paths.
    pub fn remove_peer(&mut self, peer: &P) {
        if let Some(p) = self.peers.remove(peer) {
            if self.by_id.get(&p.keys.id) == Some(peer) {
                self.by_id.remove(&p.keys.id);
            }
            debug!(?peer, "peer removed");
        }
    }

    /// Replaces the configured candidates of a peer (in preference order: the first one is
    /// used before any path answered). Discovered candidates are kept and expire on their
    /// own; a removed active path is replaced at once (reason [`Reason::Configured`]).
    pub fn set_candidates(
        &mut self,
        peer: &P,
        candidates: impl IntoIterator<Item = PathId<P, L>>,
        now: Instant,
    ) {
        self.ctx.now = self.ctx.now.max(now);
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        let mut order: Vec<PathId<P, L>> = Vec::new();
        for c in candidates {
            if !order.contains(&c) {
                order.push(c);
            }
        }
        let set: BTreeSet<&PathId<P, L>> = order.iter().collect();
        for (pid, e) in &mut p.paths {
            e.configured = set.contains(pid);
        }
        p.paths.retain(|_, e| e.configured || e.discovered);
        for pid in &order {
            if !p.paths.contains_key(pid) {
                let mut e = PathEntry::new(p.next_tag, &self.ctx.cfg, now);
                p.next_tag = p.next_tag.wrapping_add(1);
                e.configured = true;
                p.paths.insert(pid.clone(), e);
            }
        }
        p.fallback = order
            .iter()
            .find(|c| !c.is_relay() || self.ctx.cfg.relay_allowed)
            .cloned();
        debug!(?peer, candidates = order.len(), "candidates set");
        process_peer(&mut self.ctx, peer, p, now);
        self.recompute_wake();
    }

    /// Handles a mistnet path message read from an underlay socket (first byte ≥ 0x80, see
    /// [`wire::is_path_message`]). Rejections are counted in [`Stats`] and change no state.
    pub fn handle_datagram(
        &mut self,
        local: L,
        src: SocketAddr,
        datagram: &[u8],
        now: Instant,
    ) -> Result<Handled<P, L>, Error> {
        self.ctx.now = self.ctx.now.max(now);
        let result = self.dispatch(local, src, datagram, now);
        if let Err(e) = &result {
            self.count_error(e);
            trace!(?local, %src, error = %e, "path message rejected");
        }
        result
    }

    /// Handles a path message that arrived inside a `RelayFrom` envelope from `relay` on
    /// `local`, for shells that unwrap envelopes themselves ([`Selector::handle_datagram`]
    /// does this already). Only probe messages are accepted.
    pub fn handle_relayed(
        &mut self,
        relay: P,
        local: L,
        inner: &[u8],
        now: Instant,
    ) -> Result<Handled<P, L>, Error> {
        self.ctx.now = self.ctx.now.max(now);
        let result = match inner.first() {
            Some(&(wire::PING..=wire::CALL_ME_MAYBE)) => self
                .handle_probe(local, Via::Relay(relay), None, inner, None, now)
                .map(|peer| Handled::Consumed { peer }),
            Some(&wire::NACK) => self.handle_nack(inner, None),
            Some(&(wire::RELAY_TO | wire::RELAY_FROM)) => Err(Error::NestedRelay),
            Some(_) => Err(Error::NotProbe),
            None => Err(wire::Error::Empty.into()),
        };
        if let Err(e) = &result {
            self.count_error(e);
        }
        result
    }

    /// Passive signal: an authenticated WireGuard datagram from `peer` arrived on `path`.
    /// Cheap when nothing changes (two map lookups); an unknown path becomes a discovered
    /// candidate (the peer roamed or sits behind NAT).
    pub fn handle_data_received(&mut self, peer: &P, path: &PathId<P, L>, now: Instant) {
        self.received(peer, path, now, true);
    }

    /// Passive signal: an authenticated datagram that is not user traffic (a keepalive, a
    /// handshake, a control-channel message) arrived on `path`. Proves the path alive like
    /// [`Selector::handle_data_received`], but does not make the peer busy, so an idle peer's
    /// paths stay on the cheap probe schedule.
    pub fn handle_alive(&mut self, peer: &P, path: &PathId<P, L>, now: Instant) {
        self.received(peer, path, now, false);
    }

    fn received(&mut self, peer: &P, path: &PathId<P, L>, now: Instant, data: bool) {
        self.ctx.now = self.ctx.now.max(now);
        let cfg = self.ctx.cfg;
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        let was_busy = p.busy(&cfg, now);
        if data {
            p.last_data = Some(now);
        }
        let changed = match p.paths.get_mut(path) {
            Some(e) => heard(peer, path, e, now, true),
            None if path.is_relay() && !cfg.relay_allowed => false,
            None => {
                add_discovered(&mut self.ctx, peer, p, path.clone(), now);
                if let Some(e) = p.paths.get_mut(path) {
                    heard(peer, path, e, now, true);
                }
                true
            }
        };
        if changed || (data && !was_busy) {
            process_peer(&mut self.ctx, peer, p, now);
            self.wake_for(peer);
        }
    }

    /// Passive signal: data was sent to `peer`. Makes the peer busy: its paths in use are
    /// probed at the active rate, which arms fast failover.
    pub fn handle_data_sent(&mut self, peer: &P, now: Instant) {
        self.ctx.now = self.ctx.now.max(now);
        let cfg = self.ctx.cfg;
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        let was_busy = p.busy(&cfg, now);
        p.last_data = Some(now);
        if !was_busy {
            process_peer(&mut self.ctx, peer, p, now);
            self.wake_for(peer);
        }
    }

    /// Runs due timers: probes, liveness checks, failover, switch and redundancy holds,
    /// call-me-maybe, expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.ctx.now = self.ctx.now.max(now);
        for (id, peer) in &mut self.peers {
            if peer.next_due.is_some_and(|(t, _)| t <= now) {
                process_peer(&mut self.ctx, id, peer, now);
            }
        }
        self.recompute_wake();
    }

    /// When [`Selector::handle_timeout`] wants to run next, and why. May be early (a wake-up
    /// with nothing to do is harmless), never late.
    pub fn poll_timeout(&self) -> Option<(Instant, &'static str)> {
        self.next_wake
    }

    /// The next probe, pong or call-me-maybe to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit<P, L>> {
        self.ctx.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event<P, L>> {
        self.ctx.events.pop_front()
    }

    /// Where to send the peer's data: the active path and, in redundant mode, the secondary.
    /// Before any path answered, the first configured candidate (`confirmed == false`); empty
    /// for an unknown peer or one without candidates. No allocation.
    pub fn send_paths(&self, peer: &P) -> SendPaths<'_, P, L> {
        let Some(p) = self.peers.get(peer) else {
            return SendPaths {
                active: None,
                secondary: None,
                confirmed: false,
            };
        };
        match &p.active {
            Some(a) => SendPaths {
                active: Some(a),
                secondary: p.secondary.as_ref(),
                confirmed: true,
            },
            None => SendPaths {
                active: p.fallback.as_ref(),
                secondary: None,
                confirmed: false,
            },
        }
    }

    /// Wraps `payload` (a probe from [`Selector::poll_transmit`] or a WireGuard datagram) for
    /// sending to `peer` through `relay` on `local`: writes the `RelayTo` envelope into `out`
    /// (cleared first) and returns the relay's address to send it to (its best live direct
    /// path on `local`). No allocation once `out` has grown.
    pub fn relay_envelope(
        &self,
        peer: &P,
        relay: &P,
        local: L,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<SocketAddr, Error> {
        let dst = self.peers.get(peer).ok_or(Error::UnknownPeer)?;
        let r = self.peers.get(relay).ok_or(Error::UnknownPeer)?;
        let route = direct_route(r, Some(local)).ok_or(Error::NoRouteToRelay)?;
        let Via::Direct(addr) = route.via else {
            return Err(Error::NoRouteToRelay);
        };
        wire::relay_to(&dst.keys.id, &self.ctx.id, &r.keys.mac_key, payload, out);
        Ok(addr)
    }

    /// A peer's paths and measurements.
    pub fn status(&self, peer: &P) -> Option<PeerPathStatus<P, L>> {
        let p = self.peers.get(peer)?;
        let now = self.ctx.now;
        let paths = p
            .paths
            .iter()
            .map(|(pid, e)| {
                let m = path_metrics(&self.ctx, pid, e, now);
                let rx = e.rx.loss();
                let tx = rx.map(|rx| {
                    let keep = (1.0 - m.loss) / (1.0 - rx).max(0.01);
                    ((1.0 - keep) * 100.0).clamp(0.0, 100.0)
                });
                PathStatus {
                    path: pid.clone(),
                    state: e.state,
                    configured: e.configured,
                    discovered: e.discovered,
                    srtt: e.rtt.srtt(),
                    rttvar: e.rtt.rttvar(),
                    jitter: e.rtt.jitter(),
                    loss_pct: m.loss * 100.0,
                    loss_rx_pct: rx.map(|l| l * 100.0),
                    loss_tx_pct: tx,
                    samples: m.samples,
                    last_heard_ago: e.last_heard.map(|t| now.saturating_duration_since(t)),
                    score: score(&m, &self.ctx.cfg),
                    cost: m.cost,
                    probes_sent: e.probes_sent,
                    probe_bytes_sent: e.probe_bytes,
                }
            })
            .collect();
        Some(PeerPathStatus {
            active: p.active.clone(),
            secondary: p.secondary.clone(),
            mode: if p.secondary.is_some() {
                Mode::Redundant
            } else {
                Mode::Single
            },
            reason: p.reason,
            since_change: p.changed_at.map(|t| now.saturating_duration_since(t)),
            busy: p.busy(&self.ctx.cfg, now),
            paths,
        })
    }

    /// The metrics the comparator sees for one path (for tests and diagnostics).
    pub fn path_metrics(&self, peer: &P, path: &PathId<P, L>) -> Option<PathMetrics> {
        let e = self.peers.get(peer)?.paths.get(path)?;
        Some(path_metrics(&self.ctx, path, e, self.ctx.now))
    }

    /// Node-wide counters.
    pub fn stats(&self) -> Stats {
        self.ctx.stats
    }

    /// Bucket capacity of an underlay's probe budget, in bytes (the burst a budget allows).
    pub fn budget_capacity(&self, local: L) -> Option<u32> {
        self.ctx.locals.get(&local)?.bucket.map(|b| b.capacity())
    }

    fn dispatch(
        &mut self,
        local: L,
        src: SocketAddr,
        datagram: &[u8],
        now: Instant,
    ) -> Result<Handled<P, L>, Error> {
        let Some(&ty) = datagram.first() else {
            return Err(wire::Error::Empty.into());
        };
        match ty {
            wire::PING | wire::PONG | wire::CALL_ME_MAYBE => {
                let peer =
                    self.handle_probe(local, Via::Direct(src), Some(src), datagram, None, now)?;
                Ok(Handled::Consumed { peer })
            }
            wire::NACK => self.handle_nack(datagram, None),
            wire::RELAY_TO => self.serve_relay(datagram),
            wire::RELAY_FROM => {
                let env = wire::parse_relay_from(datagram)?;
                let relay = self
                    .by_id
                    .get(&env.relay)
                    .cloned()
                    .ok_or(Error::UnknownSender(env.relay))?;
                let key = self
                    .peers
                    .get(&relay)
                    .ok_or(Error::UnknownSender(env.relay))?
                    .keys
                    .mac_key;
                if !env.verify(&key) {
                    return Err(Error::BadMac(env.relay));
                }
                let from = self
                    .by_id
                    .get(&env.src)
                    .cloned()
                    .ok_or(Error::UnknownSender(env.src))?;
                match env.payload.first() {
                    Some(&(wire::PING..=wire::CALL_ME_MAYBE)) => {
                        let peer = self.handle_probe(
                            local,
                            Via::Relay(relay),
                            None,
                            env.payload,
                            Some(env.src),
                            now,
                        )?;
                        Ok(Handled::Consumed { peer })
                    }
                    Some(&wire::NACK) => self.handle_nack(env.payload, Some(env.src)),
                    Some(&(wire::RELAY_TO | wire::RELAY_FROM)) => Err(Error::NestedRelay),
                    Some(_) | None => {
                        trace!(?from, ?relay, len = env.payload.len(), "relayed datagram");
                        Ok(Handled::Relayed {
                            from,
                            relay,
                            inner: env.payload_range,
                        })
                    }
                }
            }
            other => Err(wire::Error::UnknownType(other).into()),
        }
    }

    fn serve_relay(&mut self, datagram: &[u8]) -> Result<Handled<P, L>, Error> {
        let env = wire::parse_relay_to(datagram)?;
        let src = self
            .by_id
            .get(&env.src)
            .ok_or(Error::UnknownSender(env.src))?;
        let src_peer = self.peers.get(src).ok_or(Error::UnknownSender(env.src))?;
        if !env.verify(&src_peer.keys.mac_key) {
            return Err(Error::BadMac(env.src));
        }
        if !self.ctx.cfg.serve_relay {
            return Err(Error::RelayDisabled);
        }
        if matches!(
            env.payload.first(),
            Some(&(wire::RELAY_TO | wire::RELAY_FROM))
        ) {
            return Err(Error::NestedRelay);
        }
        let dst = self
            .by_id
            .get(&env.dst)
            .cloned()
            .ok_or(Error::UnknownDestination(env.dst))?;
        let dst_peer = self
            .peers
            .get(&dst)
            .ok_or(Error::UnknownDestination(env.dst))?;
        let path = direct_route(dst_peer, None).ok_or(Error::NoDirectPath)?;
        let mut out = Vec::with_capacity(env.payload.len() + wire::RELAY_OVERHEAD);
        wire::relay_from(
            &self.ctx.id,
            &env.src,
            &dst_peer.keys.mac_key,
            env.payload,
            &mut out,
        );
        self.ctx.stats.relay_forwarded += 1;
        trace!(to = ?dst, len = out.len(), "relay forward");
        Ok(Handled::Forward {
            to: dst,
            path,
            datagram: out,
        })
    }

    fn handle_probe(
        &mut self,
        local: L,
        via: Via<P>,
        src: Option<SocketAddr>,
        bytes: &[u8],
        expect_sender: Option<ShortId>,
        now: Instant,
    ) -> Result<P, Error> {
        let probe = wire::decode_probe(bytes)?;
        let id = self.authenticate(probe.sender, expect_sender, |k| probe.verify(k))?;
        let peer = self
            .peers
            .get_mut(&id)
            .ok_or(Error::UnknownSender(probe.sender))?;
        let ctx = &mut self.ctx;
        ctx.stats.probe_bytes_received += bytes.len() as u64;
        let path = PathId { local, via };
        match probe.body {
            Body::Ping(ping) => on_ping(ctx, &id, peer, path, src, ping, now),
            Body::Pong(pong) => on_pong(ctx, &id, peer, path, pong, now),
            Body::CallMeMaybe(addrs) => on_call_me_maybe(ctx, &id, peer, &addrs, now),
        }
        process_peer(ctx, &id, peer, now);
        self.wake_for(&id);
        Ok(id)
    }

    /// The peer a MACed message comes from: `sender` must be the envelope's sender when it
    /// came through a relay (`expect_sender`), a known peer, and its key must verify the MAC.
    fn authenticate(
        &self,
        sender: ShortId,
        expect_sender: Option<ShortId>,
        verify: impl FnOnce(&wire::MacKey) -> bool,
    ) -> Result<P, Error> {
        if let Some(outer) = expect_sender
            && outer != sender
        {
            return Err(Error::SenderMismatch {
                outer,
                inner: sender,
            });
        }
        let id = self
            .by_id
            .get(&sender)
            .cloned()
            .ok_or(Error::UnknownSender(sender))?;
        let peer = self.peers.get(&id).ok_or(Error::UnknownSender(sender))?;
        if !verify(&peer.keys.mac_key) {
            return Err(Error::BadMac(sender));
        }
        Ok(id)
    }

    fn handle_nack(
        &mut self,
        bytes: &[u8],
        expect_sender: Option<ShortId>,
    ) -> Result<Handled<P, L>, Error> {
        let signed = wire::decode_nack(bytes)?;
        let peer = self.authenticate(signed.sender, expect_sender, |k| signed.verify(k))?;
        self.ctx.stats.nacks_received += 1;
        Ok(Handled::Nack {
            peer,
            nack: signed.nack,
        })
    }

    fn count_error(&mut self, e: &Error) {
        let s = &mut self.ctx.stats;
        match e {
            Error::Malformed(_)
            | Error::NestedRelay
            | Error::NotProbe
            | Error::SenderMismatch { .. } => s.malformed += 1,
            Error::UnknownSender(_) | Error::UnknownDestination(_) => s.unknown_sender += 1,
            Error::BadMac(_) => s.bad_mac += 1,
            Error::RelayDisabled | Error::NoDirectPath => s.relay_refused += 1,
            Error::UnknownPeer | Error::NoRouteToRelay => {}
        }
    }

    fn wake_for(&mut self, peer: &P) {
        let Some(due) = self.peers.get(peer).and_then(|p| p.next_due) else {
            return;
        };
        if self.next_wake.is_none_or(|(t, _)| due.0 < t) {
            self.next_wake = Some(due);
        }
    }

    fn recompute_wake(&mut self) {
        self.next_wake = self
            .peers
            .values()
            .filter_map(|p| p.next_due)
            .min_by_key(|(t, _)| *t);
    }
}

impl PathEntry {
    fn new(tag: u32, cfg: &Config, now: Instant) -> Self {
        Self {
            tag,
            configured: false,
            discovered: false,
            state: PathState::Unknown,
            rtt: Rtt::default(),
            window: LossWindow::new(usize::from(cfg.loss_window)),
            rx: RxWindow::default(),
            next_seq: 0,
            replies: 0,
            last_heard: None,
            unanswered: 0,
            first_unanswered: None,
            next_probe: now,
            last_probe: None,
            backoff: 0,
            resched: false,
            refreshed: now,
            probes_sent: 0,
            probe_bytes: 0,
        }
    }

    fn live(&self) -> bool {
        matches!(self.state, PathState::Up | PathState::Doubt)
    }

    /// `max(silence_timeout, rto + 2·doubt interval)`: the RTT-adapted silence bound.
    fn dead_after(&self, cfg: &Config) -> Duration {
        cfg.silence_timeout
            .max(self.rtt.rto(cfg) + cfg.doubt_probe_interval * 2)
    }

    /// When the liveness state may change without new input.
    fn check_at(&self, cfg: &Config) -> Option<Instant> {
        let first = self.first_unanswered?;
        match self.state {
            PathState::Up => Some(first + self.rtt.rto(cfg)),
            PathState::Doubt | PathState::Probing if self.unanswered >= cfg.miss_limit => {
                Some(first + self.dead_after(cfg))
            }
            PathState::Doubt | PathState::Probing | PathState::Unknown | PathState::Down => None,
        }
    }
}

impl<P, L> Peer<P, L> {
    fn busy(&self, cfg: &Config, now: Instant) -> bool {
        self.last_data
            .is_some_and(|t| now.saturating_duration_since(t) < cfg.idle_after)
    }
}

fn process_peer<P, L>(ctx: &mut Ctx<P, L>, id: &P, peer: &mut Peer<P, L>, now: Instant)
where
    P: Ord + Clone + Debug,
    L: Ord + Copy + Debug,
{
    expire(ctx, id, peer, now);
    for (pid, e) in &mut peer.paths {
        evaluate(&ctx.cfg, id, pid, e, now);
    }
    select(ctx, id, peer, now);
    redundancy(ctx, id, peer, now);
    call_me_maybe(ctx, id, peer, now);
    probes(ctx, id, peer, now);
    schedule(ctx, peer, now);
}

fn expire<P, L>(ctx: &mut Ctx<P, L>, id: &P, peer: &mut Peer<P, L>, now: Instant)
where
    P: Ord + Clone + Debug,
    L: Ord + Copy + Debug,
{
    let ttl = ctx.cfg.discovered_ttl;
    let (active, secondary) = (&peer.active, &peer.secondary);
    let mut expired = 0;
    peer.paths.retain(|pid, e| {
        let in_use = active.as_ref() == Some(pid) || secondary.as_ref() == Some(pid);
        let fresh = e.last_heard.unwrap_or(e.refreshed).max(e.refreshed) + ttl > now;
        let keep = e.configured || in_use || fresh;
        if !keep {
            debug!(peer = ?id, path = ?pid, "discovered candidate expired");
            expired += 1;
        }
        keep
    });
    ctx.stats.candidates_expired += expired;
    if peer
        .challenger
        .as_ref()
        .is_some_and(|(c, _)| !peer.paths.contains_key(c))
    {
        peer.challenger = None;
    }
}

fn evaluate<P: Debug, L: Debug>(
    cfg: &Config,
    id: &P,
    pid: &PathId<P, L>,
    e: &mut PathEntry,
    now: Instant,
) {
    let Some(first) = e.first_unanswered else {
        return;
    };
    let before = e.state;
    match e.state {
        PathState::Unknown | PathState::Down => {}
        PathState::Probing | PathState::Up | PathState::Doubt => {
            if e.unanswered >= cfg.miss_limit && now >= first + e.dead_after(cfg) {
                e.state = PathState::Down;
                if before != PathState::Probing {
                    e.backoff = 0;
                }
            } else if e.state == PathState::Up && now >= first + e.rtt.rto(cfg) {
                e.state = PathState::Doubt;
            }
        }
    }
    if e.state != before {
        e.resched = true;
        debug!(peer = ?id, path = ?pid, from = before.as_str(), to = e.state.as_str(), "path state");
    }
}

/// Records an authenticated signal on a path. `confirms`: the signal proves both directions
/// (pong) or comes from the data plane; only those bring a path up. Returns true on a state
/// change.
fn heard<P: Debug, L: Debug>(
    id: &P,
    pid: &PathId<P, L>,
    e: &mut PathEntry,
    now: Instant,
    confirms: bool,
) -> bool {
    e.last_heard = Some(now);
    e.unanswered = 0;
    e.first_unanswered = None;
    let before = e.state;
    match e.state {
        PathState::Up => return false,
        PathState::Doubt => e.state = PathState::Up,
        PathState::Unknown | PathState::Probing | PathState::Down if confirms => {
            e.state = PathState::Up;
            e.backoff = 0;
            e.window.excuse_unanswered();
        }
        PathState::Unknown | PathState::Probing | PathState::Down => return false,
    }
    e.resched = true;
    debug!(peer = ?id, path = ?pid, from = before.as_str(), to = "up", "path state");
    true
}

fn select<P, L>(ctx: &mut Ctx<P, L>, id: &P, peer: &mut Peer<P, L>, now: Instant)
where
    P: Ord + Clone + Debug,
    L: Ord + Copy + Debug,
{
    let Some(active) = peer.active.clone() else {
        if let Some(best) = best_live(ctx, peer, None, now) {
            switch(ctx, id, peer, Some(best), Reason::FirstPathUp, now);
        }
        return;
    };
    match peer.paths.get(&active).map(|e| e.state) {
        None => {
            let best = best_live(ctx, peer, None, now);
            switch(ctx, id, peer, best, Reason::Configured, now);
        }
        Some(PathState::Down | PathState::Unknown | PathState::Probing) => {
            if let Some(best) = best_live(ctx, peer, Some(&active), now) {
                switch(ctx, id, peer, Some(best), Reason::ActivePathSilent, now);
            }
        }
        Some(PathState::Up | PathState::Doubt) => challenge(ctx, id, peer, &active, now),
    }
}

/// Hysteresis: a candidate must stay [`better`] for the hold time.
fn challenge<P, L>(
    ctx: &mut Ctx<P, L>,
    id: &P,
    peer: &mut Peer<P, L>,
    active: &PathId<P, L>,
    now: Instant,
) where
    P: Ord + Clone + Debug,
    L: Ord + Copy + Debug,
{
    let cfg = ctx.cfg;
    let Some(cur) = peer
        .paths
        .get(active)
        .map(|e| path_metrics(ctx, active, e, now))
    else {
        return;
    };
    let best = peer
        .paths
        .iter()
        .filter(|(pid, e)| {
            *pid != active && e.state == PathState::Up && (cfg.relay_allowed || !pid.is_relay())
        })
        .map(|(pid, e)| (pid, path_metrics(ctx, pid, e, now)))
        .min_by(|a, b| rank(&a.1, &cfg).total_cmp(&rank(&b.1, &cfg)));
    let candidate = best
        .filter(|(_, m)| better(m, &cur, &cfg))
        .map(|(p, _)| p.clone());
    let Some(candidate) = candidate else {
        clear_challenger(peer);
        return;
    };
    match &peer.challenger {
        Some((c, since)) if *c == candidate => {
            if now.saturating_duration_since(*since) >= cfg.switch_hold {
                let reason = if active.is_relay() && !candidate.is_relay() {
                    Reason::DirectPathRecovered
                } else {
                    Reason::BetterScore
                };
                switch(ctx, id, peer, Some(candidate), reason, now);
            }
        }
        Some(_) | None => {
            clear_challenger(peer);
            debug!(peer = ?id, path = ?candidate, "challenger");
            if let Some(e) = peer.paths.get_mut(&candidate) {
                e.resched = true;
            }
            peer.challenger = Some((candidate, now));
        }
    }
}

fn clear_challenger<P: Ord, L: Ord>(peer: &mut Peer<P, L>) {
    if let Some((c, _)) = peer.challenger.take()
        && let Some(e) = peer.paths.get_mut(&c)
    {
        e.resched = true;
    }
}

/// Ranking of live candidates: direct before relay, then score.
fn rank(m: &PathMetrics, cfg: &Config) -> f64 {
    let class = if m.relay { 1e12 } else { 0.0 };
    class + score(m, cfg)
}

/// The best live path: up before doubt, direct before relay, then score.
fn best_live<P, L>(
    ctx: &Ctx<P, L>,
    peer: &Peer<P, L>,
    exclude: Option<&PathId<P, L>>,
    now: Instant,
) -> Option<PathId<P, L>>
where
    P: Ord + Clone + Debug,
    L: Ord + Copy + Debug,
{
    best_live_where(ctx, peer, |pid| Some(pid) != exclude, now)
}

/// The secondary path of redundant mode: the best live path on another local underlay than
/// the active one, else the best live path. Paths sharing a local underlay share its first
/// hop, where burst loss usually is (a Wi-Fi radio), so a copy sent there is lost with the
/// original. (In the lab this also keeps a copy off a path that only looks different: an
/// address of the peer's other network reached through the same link.)
fn best_secondary<P, L>(
    ctx: &Ctx<P, L>,
    peer: &Peer<P, L>,
    active: &PathId<P, L>,
    now: Instant,
) -> Option<PathId<P, L>>
where
    P: Ord + Clone + Debug,
    L: Ord + Copy + Debug,
{
    best_live_where(ctx, peer, |pid| pid.local != active.local, now)
        .or_else(|| best_live(ctx, peer, Some(active), now))
}

/// The best-ranked live path among those `keep` accepts (paths in doubt rank last).
fn best_live_where<P, L>(
    ctx: &Ctx<P, L>,
    peer: &Peer<P, L>,
    keep: impl Fn(&PathId<P, L>) -> bool,
    now: Instant,
) -> Option<PathId<P, L>>
where
    P: Ord + Clone + Debug,
    L: Ord + Copy + Debug,
{
    let cfg = &ctx.cfg;
    peer.paths
        .iter()
        .filter(|(pid, e)| keep(pid) && e.live() && (cfg.relay_allowed || !pid.is_relay()))
        .map(|(pid, e)| {
            let doubt = if e.state == PathState::Doubt {
                1e15
            } else {
                0.0
            };
            (pid, doubt + rank(&path_metrics(ctx, pid, e, now), cfg))
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(p, _)| p.clone())
}

/// A live direct path to `peer` (on `local` if given): the active one if it qualifies, else
/// the best; else any not-down direct path on `local` (a guess before probes answered).
fn direct_route<P, L>(peer: &Peer<P, L>, local: Option<L>) -> Option<PathId<P, L>>
where
    P: Ord + Clone + Debug,
    L: Ord + Copy + Debug,
{
    let fits = |pid: &PathId<P, L>| !pid.is_relay() && local.is_none_or(|l| l == pid.local);
    if let Some(a) = &peer.active
        && fits(a)
        && peer.paths.get(a).is_some_and(PathEntry::live)
    {
        return Some(a.clone());
    }
    let live = peer
        .paths
        .iter()
        .filter(|(pid, e)| fits(pid) && e.live())
        .min_by(|a, b| {
            let sa = a.1.rtt.srtt().unwrap_or(crate::UNKNOWN_RTT);
            let sb = b.1.rtt.srtt().unwrap_or(crate::UNKNOWN_RTT);
            sa.cmp(&sb)
        })
        .map(|(p, _)| p.clone());
    live.or_else(|| {
        local?;
        peer.paths
            .iter()
            .find(|(pid, e)| fits(pid) && e.state != PathState::Down)
            .map(|(p, _)| p.clone())
    })
}

fn switch<P, L>(
    ctx: &mut Ctx<P, L>,
    id: &P,
    peer: &mut Peer<P, L>,
    to: Option<PathId<P, L>>,
    reason: Reason,
    now: Instant,
) where
    P: Ord + Clone + Debug,
    L: Ord + Copy + Debug,
{
    if peer.active == to {
        return;
    }
    clear_challenger(peer);
    let from = std::mem::replace(&mut peer.active, to.clone());
    reschedule(peer, [&from, &to]);
    peer.reason = Some(reason);
    peer.changed_at = Some(now);
    ctx.stats.switches += 1;
    if reason == Reason::ActivePathSilent {
        ctx.stats.failovers += 1;
    }
    debug!(peer = ?id, ?from, ?to, reason = reason.as_str(), "path switched");
    if to.is_some() && peer.secondary == to {
        set_secondary(ctx, id, peer, None, reason);
    }
    if to.as_ref().is_some_and(PathId::is_relay) {
        peer.next_cmm = Some(now);
    }
    ctx.events.push_back(Event::ActivePathChanged {
        peer: id.clone(),
        from,
        to,
        reason,
    });
}

fn redundancy<P, L>(ctx: &mut Ctx<P, L>, id: &P, peer: &mut Peer<P, L>, now: Instant)
where
    P: Ord + Clone + Debug,
    L: Ord + Copy + Debug,
{
    let cfg = ctx.cfg;
    let Some(active) = peer.active.clone() else {
        if peer.secondary.is_some() {
            set_secondary(ctx, id, peer, None, Reason::RedundancyOff);
        }
        return;
    };
    let secondary_live = peer
        .secondary
        .as_ref()
        .and_then(|s| peer.paths.get(s))
        .is_some_and(PathEntry::live);
    match cfg.redundancy {
        Redundancy::Off => {
            if peer.secondary.is_some() {
                set_secondary(ctx, id, peer, None, Reason::RedundancyOff);
            }
        }
        Redundancy::Always => {
            if !secondary_live {
                let reason = if peer.secondary.is_some() {
                    Reason::SecondaryPathDown
                } else {
                    Reason::RedundancyAlways
                };
                let best = best_secondary(ctx, peer, &active, now);
                set_secondary(ctx, id, peer, best, reason);
            }
        }
        Redundancy::Auto => {
            let Some(m) = peer
                .paths
                .get(&active)
                .map(|e| path_metrics(ctx, &active, e, now))
            else {
                return;
            };
            let loss_pct = m.loss * 100.0;
            let measured = m.samples >= cfg.min_samples;
            if peer.secondary.is_none() {
                if measured && loss_pct >= cfg.redundancy_enter_loss_pct {
                    let best = best_secondary(ctx, peer, &active, now);
                    if best.is_some() {
                        peer.quiet_since = None;
                        set_secondary(ctx, id, peer, best, Reason::LossAboveThreshold);
                    }
                }
                return;
            }
            if measured && loss_pct <= cfg.redundancy_leave_loss_pct {
                let since = *peer.quiet_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= cfg.redundancy_hold {
                    peer.quiet_since = None;
                    set_secondary(ctx, id, peer, None, Reason::LossRecovered);
                    return;
                }
            } else {
                peer.quiet_since = None;
            }
            if !secondary_live {
                let best = best_secondary(ctx, peer, &active, now);
                set_secondary(ctx, id, peer, best, Reason::SecondaryPathDown);
            }
        }
    }
}

/// Paths whose role changed get their probe schedule recomputed (in-use paths probe faster).
fn reschedule<P, L>(peer: &mut Peer<P, L>, paths: [&Option<PathId<P, L>>; 2])
where
    P: Ord + Clone + Debug,
    L: Ord + Copy + Debug,
{
    for p in paths.into_iter().flatten() {
        if let Some(e) = peer.paths.get_mut(p) {
            e.resched = true;
        }
    }
}

fn set_secondary<P, L>(
    ctx: &mut Ctx<P, L>,
    id: &P,
    peer: &mut Peer<P, L>,
    to: Option<PathId<P, L>>,
    reason: Reason,
) where
    P: Ord + Clone + Debug,
    L: Ord + Copy + Debug,
{
    if peer.secondary == to {
        return;
    }
    let from = std::mem::replace(&mut peer.secondary, to.clone());
    reschedule(peer, [&from, &to]);
    ctx.stats.redundancy_changes += 1;
    match (&from, &to) {
        (None, Some(_)) => {
            debug!(peer = ?id, secondary = ?to, reason = reason.as_str(), "redundancy on")
        }
        (Some(_), None) => debug!(peer = ?id, reason = reason.as_str(), "redundancy off"),
        (Some(_), Some(_)) | (None, None) => {
            debug!(peer = ?id, secondary = ?to, reason = reason.as_str(), "secondary path changed")
        }
    }
    ctx.events.push_back(Event::RedundancyChanged {
        peer: id.clone(),
        secondary: to,
        reason,
    });
}

fn call_me_maybe<P, L>(ctx: &mut Ctx<P, L>, id: &P, peer: &mut Peer<P, L>, now: Instant)
where
    P: Ord + Clone + Debug,
    L: Ord + Copy + Debug,
{
    if peer.next_cmm.is_none_or(|t| t > now) {
        return;
    }
    let direct_up = peer
        .paths
        .iter()
        .any(|(p, e)| !p.is_relay() && e.state == PathState::Up);
    if direct_up {
        peer.next_cmm = None;
        return;
    }
    let interval = ctx.cfg.call_me_maybe_interval;
    let path = peer
        .active
        .clone()
        .filter(|a| peer.paths.get(a).is_some_and(PathEntry::live))
        .or_else(|| best_live(ctx, peer, None, now));
    let endpoints = ctx.endpoints();
    let (Some(path), false) = (path, endpoints.is_empty()) else {
        peer.next_cmm = Some(now + interval);
        return;
    };
    let mut payload = Vec::new();
    wire::encode_call_me_maybe(&ctx.id, &endpoints, &peer.keys.mac_key, &mut payload);
    let cost = wire_cost(&path, payload.len());
    if let Err(wait) = ctx.take_budget(path.local, cost, true, now) {
        ctx.stats.budget_deferred += 1;
        peer.next_cmm = Some(now + wait);
        return;
    }
    ctx.stats.call_me_maybe_sent += 1;
    ctx.stats.probe_bytes_sent += cost as u64;
    debug!(peer = ?id, endpoints = endpoints.len(), "call-me-maybe");
    ctx.transmits.push_back(Transmit {
        peer: id.clone(),
        path,
        payload,
    });
    peer.next_cmm = Some(now + interval);
    // Simultaneous open: the peer starts probing our endpoints now, so do we.
    for (p, e) in &mut peer.paths {
        if !p.is_relay() && e.state != PathState::Up {
            e.next_probe = now;
        }
    }
}

fn on_ping<P, L>(
    ctx: &mut Ctx<P, L>,
    id: &P,
    peer: &mut Peer<P, L>,
    path: PathId<P, L>,
    src: Option<SocketAddr>,
    ping: wire::Ping,
    now: Instant,
) where
    P: Ord + Clone + Debug,
    L: Ord + Copy + Debug,
{
    ctx.stats.pings_received += 1;
    trace!(peer = ?id, ?path, seq = ping.seq, "ping");
    if !peer.paths.contains_key(&path) && (ctx.cfg.relay_allowed || !path.is_relay()) {
        add_discovered(ctx, id, peer, path.clone(), now);
    }
    if let Some(e) = peer.paths.get_mut(&path) {
        e.rx.on_ping(ping.tag, ping.seq);
        if e.live() {
            heard(id, &path, e, now, false);
        }
    }
    let pong = wire::Pong {
        seq: ping.seq,
        timestamp_us: ping.timestamp_us,
        tag: ping.tag,
        observed: src,
    };
    let mut payload = Vec::with_capacity(wire::MAX_PONG_LEN);
    wire::encode_pong(&ctx.id, &pong, &peer.keys.mac_key, &mut payload);
    let cost = wire_cost(&path, payload.len());
    let high = peer.active.as_ref() == Some(&path) || peer.secondary.as_ref() == Some(&path);
    if ctx.take_budget(path.local, cost, high, now).is_err() {
        ctx.stats.pongs_dropped += 1;
        return;
    }
    ctx.stats.pongs_sent += 1;
    ctx.stats.probe_bytes_sent += cost as u64;
    ctx.transmits.push_back(Transmit {
        peer: id.clone(),
        path,
        payload,
    });
}

fn on_pong<P, L>(
    ctx: &mut Ctx<P, L>,
    id: &P,
    peer: &mut Peer<P, L>,
    path: PathId<P, L>,
    pong: wire::Pong,
    now: Instant,
) where
    P: Ord + Clone + Debug,
    L: Ord + Copy + Debug,
{
    ctx.stats.pongs_received += 1;
    let Some((tagged, e)) = peer.paths.iter_mut().find(|(_, e)| e.tag == pong.tag) else {
        ctx.stats.stale_pongs += 1;
        return;
    };
    let Some(sent_at) = e.window.on_ack(pong.seq) else {
        ctx.stats.stale_pongs += 1;
        return;
    };
    let rtt = now.saturating_duration_since(sent_at);
    trace!(peer = ?id, path = ?tagged, seq = pong.seq, ?rtt, "pong");
    e.rtt.sample(rtt);
    e.replies += 1;
    heard(id, tagged, e, now, true);
    // A reply from another address than the one pinged: the peer's NAT maps its outbound
    // traffic elsewhere; that address is a path too.
    if *tagged != path && !path.is_relay() && !peer.paths.contains_key(&path) {
        add_discovered(ctx, id, peer, path.clone(), now);
    }
    if let (Some(addr), Via::Direct(_)) = (pong.observed, &path.via) {
        ctx.observe(path.local, addr);
    }
}

fn on_call_me_maybe<P, L>(
    ctx: &mut Ctx<P, L>,
    id: &P,
    peer: &mut Peer<P, L>,
    addrs: &[SocketAddr],
    now: Instant,
) where
    P: Ord + Clone + Debug,
    L: Ord + Copy + Debug,
{
    ctx.stats.call_me_maybe_received += 1;
    debug!(peer = ?id, endpoints = addrs.len(), "call-me-maybe received");
    let locals: BTreeSet<L> = ctx
        .locals
        .keys()
        .copied()
        .chain(peer.paths.keys().map(|p| p.local))
        .collect();
    for addr in addrs {
        for local in &locals {
            let pid = PathId::direct(*local, *addr);
            match peer.paths.get_mut(&pid) {
                Some(e) => e.refreshed = now,
                None => add_discovered(ctx, id, peer, pid, now),
            }
        }
    }
    for (p, e) in &mut peer.paths {
        if !p.is_relay() && e.state != PathState::Up {
            e.next_probe = now;
        }
    }
}

fn add_discovered<P, L>(
    ctx: &mut Ctx<P, L>,
    id: &P,
    peer: &mut Peer<P, L>,
    pid: PathId<P, L>,
    now: Instant,
) where
    P: Ord + Clone + Debug,
    L: Ord + Copy + Debug,
{
    if peer.paths.len() >= MAX_PATHS {
        debug!(peer = ?id, path = ?pid, "candidate ignored: too many paths");
        return;
    }
    let mut e = PathEntry::new(peer.next_tag, &ctx.cfg, now);
    peer.next_tag = peer.next_tag.wrapping_add(1);
    e.discovered = true;
    debug!(peer = ?id, path = ?pid, "candidate discovered");
    peer.paths.insert(pid.clone(), e);
    ctx.stats.candidates_discovered += 1;
    ctx.events.push_back(Event::CandidateDiscovered {
        peer: id.clone(),
        path: pid,
    });
}

fn probes<P, L>(ctx: &mut Ctx<P, L>, id: &P, peer: &mut Peer<P, L>, now: Instant)
where
    P: Ord + Clone + Debug,
    L: Ord + Copy + Debug,
{
    let busy = peer.busy(&ctx.cfg, now);
    let busy_changed = busy != peer.was_busy;
    peer.was_busy = busy;
    let Peer {
        paths,
        active,
        secondary,
        challenger,
        keys,
        ..
    } = peer;
    for (pid, e) in paths.iter_mut() {
        let role = if active.as_ref() == Some(pid) || secondary.as_ref() == Some(pid) {
            Role::InUse
        } else if challenger.as_ref().is_some_and(|(c, _)| c == pid) {
            Role::Challenger
        } else {
            Role::Standby
        };
        if e.resched || (busy_changed && role == Role::InUse) {
            e.resched = false;
            let iv = ctx.interval(pid, e, role, busy);
            e.next_probe = e.last_probe.map_or(now, |t| t + iv);
        }
        if e.next_probe <= now {
            send_probe(ctx, id, keys, pid, e, role, busy, now);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn send_probe<P, L>(
    ctx: &mut Ctx<P, L>,
    id: &P,
    keys: &PeerKeys,
    pid: &PathId<P, L>,
    e: &mut PathEntry,
    role: Role,
    busy: bool,
    now: Instant,
) where
    P: Ord + Clone + Debug,
    L: Ord + Copy + Debug,
{
    let seq = e.next_seq;
    let ping = wire::Ping {
        seq,
        timestamp_us: u64::try_from(now.saturating_duration_since(ctx.epoch).as_micros())
            .unwrap_or(u64::MAX),
        tag: e.tag,
    };
    let mut payload = Vec::with_capacity(wire::PING_LEN);
    wire::encode_ping(&ctx.id, &ping, &keys.mac_key, &mut payload);
    let cost = wire_cost(pid, payload.len());
    if let Err(wait) = ctx.take_budget(pid.local, cost, role == Role::InUse, now) {
        ctx.stats.budget_deferred += 1;
        e.next_probe = now + wait;
        trace!(peer = ?id, path = ?pid, ?wait, "probe deferred by budget");
        return;
    }
    e.next_seq = seq.wrapping_add(1);
    e.window.on_sent(seq, now);
    e.unanswered += 1;
    e.first_unanswered.get_or_insert(now);
    if e.state == PathState::Unknown {
        e.state = PathState::Probing;
    }
    e.probes_sent += 1;
    e.probe_bytes += cost as u64;
    ctx.stats.pings_sent += 1;
    ctx.stats.probe_bytes_sent += cost as u64;
    e.next_probe = now + ctx.interval(pid, e, role, busy);
    if matches!(e.state, PathState::Probing | PathState::Down) {
        e.backoff = (e.backoff + 1).min(MAX_BACKOFF);
    }
    e.last_probe = Some(now);
    trace!(peer = ?id, path = ?pid, seq, "ping");
    ctx.transmits.push_back(Transmit {
        peer: id.clone(),
        path: pid.clone(),
        payload,
    });
}

fn schedule<P, L>(ctx: &Ctx<P, L>, peer: &mut Peer<P, L>, now: Instant)
where
    P: Ord + Clone + Debug,
    L: Ord + Copy + Debug,
{
    let cfg = &ctx.cfg;
    let mut due: Option<(Instant, &'static str)> = None;
    let mut consider = |t: Instant, why: &'static str| {
        if due.is_none_or(|(d, _)| t < d) {
            due = Some((t, why));
        }
    };
    for (pid, e) in &peer.paths {
        consider(e.next_probe, "probe");
        if let Some(t) = e.check_at(cfg) {
            consider(t, "path check");
        }
        let in_use = peer.active.as_ref() == Some(pid) || peer.secondary.as_ref() == Some(pid);
        if !e.configured && !in_use {
            consider(
                e.last_heard.unwrap_or(e.refreshed).max(e.refreshed) + cfg.discovered_ttl,
                "candidate expiry",
            );
        }
    }
    if let Some((_, since)) = &peer.challenger {
        consider(*since + cfg.switch_hold, "switch hold");
    }
    if peer.secondary.is_some()
        && let Some(since) = peer.quiet_since
    {
        consider(since + cfg.redundancy_hold, "redundancy hold");
    }
    if let Some(t) = peer.next_cmm {
        consider(t, "call-me-maybe");
    }
    // Never ask to be woken in the past: a condition that stays due would spin the caller.
    peer.next_due = due.map(|(t, why)| (t.max(now + Duration::from_millis(1)), why));
}

fn path_metrics<P, L: Ord>(
    ctx: &Ctx<P, L>,
    pid: &PathId<P, L>,
    e: &PathEntry,
    now: Instant,
) -> PathMetrics {
    let timeout =
        (e.rtt.rto(&ctx.cfg) * 2).clamp(Duration::from_millis(100), Duration::from_secs(2));
    let (lost, decided) = e.window.loss(now, timeout);
    PathMetrics {
        srtt: e.rtt.srtt(),
        jitter: e.rtt.jitter(),
        loss: if decided == 0 {
            0.0
        } else {
            f64::from(lost) / f64::from(decided)
        },
        samples: decided,
        cost: ctx.locals.get(&pid.local).map_or(0, |l| l.info.cost),
        relay: pid.is_relay(),
    }
}

/// Bytes a message costs on the underlay, as charged to probe budgets.
fn wire_cost<P, L>(pid: &PathId<P, L>, len: usize) -> usize {
    match &pid.via {
        Via::Direct(a) if a.is_ipv4() => len + IPV4_UDP_HEADERS,
        Via::Direct(_) => len + IPV6_UDP_HEADERS,
        Via::Relay(_) => len + wire::RELAY_OVERHEAD + IPV4_UDP_HEADERS,
    }
}

impl<P, L: Ord + Copy + Debug> Ctx<P, L> {
    fn take_budget(
        &mut self,
        local: L,
        cost: usize,
        high: bool,
        now: Instant,
    ) -> Result<(), Duration> {
        match self.locals.get_mut(&local).and_then(|l| l.bucket.as_mut()) {
            Some(b) => b.try_take(cost, high, now),
            None => Ok(()),
        }
    }

    fn interval(&mut self, pid: &PathId<P, L>, e: &PathEntry, role: Role, busy: bool) -> Duration {
        let cfg = self.cfg;
        match e.state {
            PathState::Unknown | PathState::Probing | PathState::Down => {
                let retry = cfg
                    .retry_initial
                    .saturating_mul(1 << e.backoff.min(MAX_BACKOFF))
                    .min(cfg.retry_max);
                self.rng.jitter(retry, cfg.jitter_pct)
            }
            PathState::Doubt => cfg.doubt_probe_interval,
            PathState::Up => match role {
                Role::InUse if busy => cfg.active_probe_interval,
                Role::Challenger => cfg.challenge_probe_interval,
                Role::InUse | Role::Standby if e.replies < u64::from(cfg.min_samples) => {
                    cfg.challenge_probe_interval
                }
                Role::InUse => self.rng.jitter(cfg.standby_probe_interval, cfg.jitter_pct),
                Role::Standby => {
                    let metered = self.locals.get(&pid.local).is_some_and(|l| l.info.metered);
                    let factor = if metered {
                        cfg.metered_standby_factor.max(1)
                    } else {
                        1
                    };
                    self.rng.jitter(
                        cfg.standby_probe_interval.saturating_mul(factor),
                        cfg.jitter_pct,
                    )
                }
            },
        }
    }

    /// Endpoints for call-me-maybe: advertised ones, then observed ones.
    fn endpoints(&self) -> Vec<SocketAddr> {
        let mut v = self.advertised.clone();
        for l in self.locals.values() {
            for a in &l.observed {
                if !v.contains(a) {
                    v.push(*a);
                }
            }
        }
        v.truncate(wire::MAX_ENDPOINTS);
        v
    }

    fn observe(&mut self, local: L, addr: SocketAddr) {
        let l = self.locals.entry(local).or_insert(Local {
            info: LocalInfo::default(),
            bucket: None,
            observed: Vec::new(),
        });
        if l.observed.contains(&addr) {
            return;
        }
        if l.observed.len() >= MAX_OBSERVED {
            l.observed.remove(0);
        }
        l.observed.push(addr);
        debug!(?local, %addr, "observed address");
        self.events
            .push_back(Event::ObservedAddress { local, addr });
    }
}
