//! Simulated network for selector tests (STYLE §4 tier 3): nodes with several underlays,
//! directional links with delay, jitter, Bernoulli or Gilbert-Elliott loss and up/down
//! switches, a relay node forwarding with the wire helpers, and data flows. Time jumps to the
//! earliest deadline across nodes, packets and data ticks; no sleeps.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mistnet_path::wire::{self, ShortId};
use mistnet_path::{Config, Event, Handled, LocalInfo, PathId, PeerKeys, Selector, Via};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub type Id = u8;
pub type Local = u8;
pub type Sel = Selector<Id, Local>;
pub type Path = PathId<Id, Local>;

pub fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

pub fn short_id(node: Id) -> ShortId {
    [node + 1; 8]
}

pub fn mac_key(a: Id, b: Id) -> [u8; 32] {
    let (lo, hi) = (a.min(b), a.max(b));
    [lo.wrapping_mul(16).wrapping_add(hi).wrapping_add(1); 32]
}

pub fn keys(me: Id, peer: Id) -> PeerKeys {
    PeerKeys {
        id: short_id(peer),
        mac_key: mac_key(me, peer),
    }
}

pub fn addr(node: Id, local: Local) -> SocketAddr {
    SocketAddr::from(([10, node, local, 1], 51820))
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Loss {
    None,
    Bernoulli(f64),
    /// Gilbert-Elliott: transition probabilities per packet and loss in each state.
    Gilbert {
        p_good_bad: f64,
        p_bad_good: f64,
        loss_good: f64,
        loss_bad: f64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    pub delay: Duration,
    /// Extra delay, uniform in [0, jitter] (reorders).
    pub jitter: Duration,
    pub loss: Loss,
    pub up: bool,
}

impl Link {
    pub fn new(delay_ms: u64) -> Self {
        Self {
            delay: ms(delay_ms),
            jitter: Duration::ZERO,
            loss: Loss::None,
            up: true,
        }
    }

    pub fn loss(mut self, p: f64) -> Self {
        self.loss = Loss::Bernoulli(p);
        self
    }

    pub fn jitter(mut self, j: Duration) -> Self {
        self.jitter = j;
        self
    }
}

struct LinkState {
    link: Link,
    bad: bool,
}

pub struct Node {
    pub sel: Sel,
    pub locals: Vec<Local>,
    pub events: Vec<(Instant, Event<Id, Local>)>,
    /// (time, local, wire bytes) of every probe message the selector asked to send.
    pub probe_log: Vec<(Instant, Local, usize)>,
}

struct Packet {
    from: SocketAddr,
    to: SocketAddr,
    bytes: Vec<u8>,
}

pub struct Net {
    pub t0: Instant,
    pub now: Instant,
    pub nodes: Vec<Node>,
    links: BTreeMap<(SocketAddr, SocketAddr), LinkState>,
    queue: BTreeMap<(Instant, u64), Packet>,
    seq: u64,
    rng: StdRng,
    /// Data flows (from, to), each sending one datagram per `data_interval`.
    pub flows: Vec<(Id, Id)>,
    pub data_interval: Duration,
    next_data: Option<Instant>,
    /// Data datagrams delivered per (from, to).
    pub delivered: BTreeMap<(Id, Id), u64>,
    pub steps: u64,
}

impl Net {
    /// `locals[i]` are node i's underlays; every node knows every other as a peer.
    pub fn new(locals: &[&[Local]], cfgs: &[Config], seed: u64) -> Self {
        let t0 = Instant::now();
        let mut nodes = Vec::new();
        for (i, ls) in locals.iter().enumerate() {
            let id = i as Id;
            let cfg = cfgs.get(i).copied().unwrap_or_default();
            let mut s = [0u8; 32];
            s[..8].copy_from_slice(&seed.to_le_bytes());
            s[8] = id;
            let mut sel = Sel::new(cfg, short_id(id), s, t0);
            for &l in *ls {
                sel.set_local(l, LocalInfo::default());
            }
            for j in 0..locals.len() {
                if j != i {
                    sel.add_peer(j as Id, keys(id, j as Id), t0);
                }
            }
            nodes.push(Node {
                sel,
                locals: ls.to_vec(),
                events: Vec::new(),
                probe_log: Vec::new(),
            });
        }
        Self {
            t0,
            now: t0,
            nodes,
            links: BTreeMap::new(),
            queue: BTreeMap::new(),
            seq: 0,
            rng: StdRng::seed_from_u64(seed),
            flows: Vec::new(),
            data_interval: ms(20),
            next_data: None,
            delivered: BTreeMap::new(),
            steps: 0,
        }
    }

    pub fn at(&self, offset: Duration) -> Instant {
        self.t0 + offset
    }

    /// Sets the link between two underlays, both directions.
    pub fn link(&mut self, a: Id, la: Local, b: Id, lb: Local, link: Link) {
        self.link_dir(a, la, b, lb, link);
        self.link_dir(b, lb, a, la, link);
    }

    /// Sets one direction of a link.
    pub fn link_dir(&mut self, a: Id, la: Local, b: Id, lb: Local, link: Link) {
        let bad = self
            .links
            .get(&(addr(a, la), addr(b, lb)))
            .is_some_and(|s| s.bad);
        self.links
            .insert((addr(a, la), addr(b, lb)), LinkState { link, bad });
    }

    /// Edits both directions of an existing link.
    pub fn edit(&mut self, a: Id, la: Local, b: Id, lb: Local, f: impl Fn(&mut Link)) {
        for k in [(addr(a, la), addr(b, lb)), (addr(b, lb), addr(a, la))] {
            if let Some(s) = self.links.get_mut(&k) {
                f(&mut s.link);
            }
        }
    }

    pub fn set_up(&mut self, a: Id, la: Local, b: Id, lb: Local, up: bool) {
        self.edit(a, la, b, lb, |l| l.up = up);
    }

    /// Gives `a` the direct candidates to every underlay of `b` from every underlay of `a`,
    /// plus relay paths through `relays`.
    pub fn candidates(&mut self, a: Id, b: Id, relays: &[Id]) {
        let mut c = Vec::new();
        for &la in &self.nodes[a as usize].locals.clone() {
            for &lb in &self.nodes[b as usize].locals.clone() {
                c.push(PathId::direct(la, addr(b, lb)));
            }
            for &r in relays {
                c.push(PathId::relay(la, r));
            }
        }
        let now = self.now;
        self.nodes[a as usize].sel.set_candidates(&b, c, now);
    }

    /// Candidates both ways between `a` and `b`, and direct candidates to each relay.
    pub fn mesh(&mut self, a: Id, b: Id, relays: &[Id]) {
        self.candidates(a, b, relays);
        self.candidates(b, a, relays);
        for &r in relays {
            for (x, y) in [(a, r), (r, a), (b, r), (r, b)] {
                self.candidates(x, y, &[]);
            }
        }
    }

    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        self.run_until(end);
    }

    pub fn run_until(&mut self, end: Instant) {
        let mut stuck = 0u32;
        loop {
            self.flush();
            let mut next = self.queue.keys().next().map(|k| k.0);
            for n in &self.nodes {
                if let Some((t, _)) = n.sel.poll_timeout() {
                    next = Some(next.map_or(t, |x: Instant| x.min(t)));
                }
            }
            if !self.flows.is_empty() {
                let t = *self.next_data.get_or_insert(self.now);
                next = Some(next.map_or(t, |x| x.min(t)));
            }
            let Some(next) = next.filter(|t| *t <= end) else {
                self.now = end;
                return;
            };
            if next <= self.now {
                stuck += 1;
                assert!(stuck < 10_000, "livelock at {:?}", self.now - self.t0);
            } else {
                stuck = 0;
            }
            self.now = self.now.max(next);
            self.steps += 1;
            let now = self.now;
            while let Some(entry) = self.queue.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                let p = entry.remove();
                self.deliver(p);
            }
            for n in &mut self.nodes {
                if n.sel.poll_timeout().is_some_and(|(t, _)| t <= now) {
                    n.sel.handle_timeout(now);
                }
            }
            if self.next_data.is_some_and(|t| t <= now) {
                self.next_data = Some(now + self.data_interval);
                for (a, b) in self.flows.clone() {
                    self.send_data(a, b);
                }
            }
        }
    }

    fn send_data(&mut self, a: Id, b: Id) {
        let now = self.now;
        let node = &mut self.nodes[a as usize];
        let sp = node.sel.send_paths(&b);
        let paths: Vec<Path> = [sp.active, sp.secondary]
            .into_iter()
            .flatten()
            .copied()
            .collect();
        node.sel.handle_data_sent(&b, now);
        let mut payload = vec![4u8, a];
        payload.resize(64, 0);
        for p in paths {
            self.send(a, b, &p, &payload);
        }
    }

    /// Drains every node's transmits (sending them) and events (recording them).
    fn flush(&mut self) {
        let now = self.now;
        for i in 0..self.nodes.len() {
            while let Some(t) = self.nodes[i].sel.poll_transmit() {
                let extra = if t.path.is_relay() {
                    wire::RELAY_OVERHEAD
                } else {
                    0
                };
                self.nodes[i]
                    .probe_log
                    .push((now, t.path.local, t.payload.len() + 28 + extra));
                self.send(i as Id, t.peer, &t.path, &t.payload);
            }
            while let Some(e) = self.nodes[i].sel.poll_event() {
                self.nodes[i].events.push((now, e));
            }
        }
    }

    fn send(&mut self, from: Id, peer: Id, path: &Path, payload: &[u8]) {
        let src = addr(from, path.local);
        let (dst, bytes) = match path.via {
            Via::Direct(a) => (a, payload.to_vec()),
            Via::Relay(r) => {
                let mut out = Vec::new();
                match self.nodes[from as usize]
                    .sel
                    .relay_envelope(&peer, &r, path.local, payload, &mut out)
                {
                    Ok(a) => (a, out),
                    Err(_) => return,
                }
            }
        };
        self.raw(src, dst, bytes);
    }

    fn raw(&mut self, from: SocketAddr, to: SocketAddr, bytes: Vec<u8>) {
        let Some(s) = self.links.get_mut(&(from, to)) else {
            return;
        };
        if !s.link.up {
            return;
        }
        let lost = match s.link.loss {
            Loss::None => false,
            Loss::Bernoulli(p) => self.rng.random_bool(p),
            Loss::Gilbert {
                p_good_bad,
                p_bad_good,
                loss_good,
                loss_bad,
            } => {
                let flip = if s.bad { p_bad_good } else { p_good_bad };
                if self.rng.random_bool(flip) {
                    s.bad = !s.bad;
                }
                self.rng
                    .random_bool(if s.bad { loss_bad } else { loss_good })
            }
        };
        if lost {
            return;
        }
        let jitter = if s.link.jitter.is_zero() {
            Duration::ZERO
        } else {
            s.link.jitter.mul_f64(self.rng.random::<f64>())
        };
        let at = self.now + s.link.delay + jitter;
        self.seq += 1;
        self.queue
            .insert((at, self.seq), Packet { from, to, bytes });
    }

    fn deliver(&mut self, p: Packet) {
        let node = p.to.ip().to_string();
        let octets: Vec<u8> = node.split('.').filter_map(|o| o.parse().ok()).collect();
        let (id, local) = (octets[1], octets[2]);
        let now = self.now;
        let Some(n) = self.nodes.get_mut(id as usize) else {
            return;
        };
        if p.bytes.first() == Some(&4) {
            let from = p.bytes[1];
            n.sel
                .handle_data_received(&from, &PathId::direct(local, p.from), now);
            *self.delivered.entry((from, id)).or_default() += 1;
            return;
        }
        match n.sel.handle_datagram(local, p.from, &p.bytes, now) {
            Ok(Handled::Consumed { .. } | Handled::Nack { .. }) | Err(_) => {}
            Ok(Handled::Forward { path, datagram, .. }) => {
                if let Via::Direct(a) = path.via {
                    self.raw(addr(id, path.local), a, datagram);
                }
            }
            Ok(Handled::Relayed { from, relay, inner }) => {
                if p.bytes.get(inner).and_then(|b| b.first()) == Some(&4) {
                    n.sel
                        .handle_data_received(&from, &PathId::relay(local, relay), now);
                    *self.delivered.entry((from, id)).or_default() += 1;
                }
            }
        }
    }

    /// Active-path changes of node `n` as (time since t0, to, reason).
    pub fn switches(&self, n: Id) -> Vec<(Duration, Option<Path>, &'static str)> {
        self.nodes[n as usize]
            .events
            .iter()
            .filter_map(|(t, e)| match e {
                Event::ActivePathChanged { to, reason, .. } => {
                    Some((*t - self.t0, *to, reason.as_str()))
                }
                Event::RedundancyChanged { .. }
                | Event::CandidateDiscovered { .. }
                | Event::ObservedAddress { .. } => None,
            })
            .collect()
    }

    pub fn active(&self, n: Id, peer: Id) -> Option<Path> {
        let sp = self.nodes[n as usize].sel.send_paths(&peer);
        sp.confirmed.then_some(()).and(sp.active.copied())
    }
}
