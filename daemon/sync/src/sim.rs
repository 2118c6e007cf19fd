//! Deterministic network simulation of many replicas (tests and `sync-bench`): simulated time,
//! one-way delay, Bernoulli loss and partitions; events ordered in a heap by time.
//!
//! Pure like the rest of the crate: the caller gives the start instant and a seed.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::rng::Rng;
use crate::{Config, Endpoint, Event, LinkInfo, NodeRecord, Replica, VerifyCache};

/// Who talks to whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// Every node has every other node as a peer.
    FullMesh,
    /// Every node adds `k` random others (both directions), plus a ring so the graph is
    /// connected.
    Random(usize),
}

/// Network parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NetConfig {
    /// One-way delay.
    pub delay: Duration,
    /// Probability a datagram is lost.
    pub loss: f64,
    /// Seed of the network and of node keys.
    pub seed: u64,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            delay: Duration::from_millis(150),
            loss: 0.05,
            seed: 1,
        }
    }
}

/// One simulated node.
#[derive(Debug)]
pub struct SimNode {
    /// The system under test.
    pub sut: Replica<u32>,
    /// Its WireGuard private key, the one key it signs with (for restarts).
    pub secret: [u8; 32],
    /// Whether it runs.
    pub up: bool,
    /// Bytes it sent.
    pub tx_bytes: u64,
    /// Add every node it learns of as a peer (standalone shell behaviour).
    pub auto_peer: bool,
    scheduled: Option<Instant>,
}

/// The simulation.
#[derive(Debug)]
pub struct Sim {
    /// Simulated time.
    pub now: Instant,
    /// Nodes, indexed by peer id.
    pub nodes: Vec<SimNode>,
    /// Partition side per node (`None`: no partition).
    pub sides: Option<Vec<u8>>,
    /// Bytes delivered or lost, all nodes.
    pub bytes: u64,
    config: Config,
    net: NetConfig,
    rng: Rng,
    heap: BinaryHeap<Scheduled>,
    seq: u64,
    cache: Arc<VerifyCache>,
}

#[derive(Debug)]
struct Scheduled {
    at: Instant,
    seq: u64,
    ev: SimEvent,
}

#[derive(Debug)]
enum SimEvent {
    Deliver {
        to: u32,
        from: u32,
        payload: Vec<u8>,
    },
    Timer(u32),
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> Ordering {
        // Min-heap on (time, insertion order).
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// Deterministic WireGuard private key of node `i`.
pub fn secret_of(seed: u64, i: u32) -> [u8; 32] {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    s[8..12].copy_from_slice(&i.to_le_bytes());
    s[31] = 0x5a;
    s
}

/// A realistic record for node `i`: two endpoints, a v4 and a v6 pod CIDR, a tunnel address
/// and a zone.
pub fn sample_record(i: u32) -> NodeRecord {
    let b = i.to_be_bytes();
    let mut wg = [0u8; 32];
    let mut x = u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for c in wg.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    NodeRecord {
        name: format!("edge-{i:04}"),
        wg_key: wg,
        identity: [0; 32],
        endpoints: vec![
            Endpoint {
                iface: "eth0".into(),
                addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(100, 64 + b[2], b[3], 7)), 51820),
                cost: 10,
            },
            Endpoint {
                iface: "wwan0".into(),
                addr: SocketAddr::new(
                    IpAddr::V6(Ipv6Addr::new(
                        0x2001,
                        0xdb8,
                        0x4000,
                        u16::from(b[2]),
                        u16::from(b[3]),
                        0,
                        0,
                        1,
                    )),
                    51820,
                ),
                cost: 100,
            },
        ],
        pod_cidrs: vec![
            IpNet::V4(
                Ipv4Net::new(Ipv4Addr::new(10, 64 + (b[2] & 0x3f), b[3], 0), 24)
                    .unwrap_or_default(),
            ),
            IpNet::V6(
                Ipv6Net::new(
                    Ipv6Addr::new(0xfd00, 0x10, u16::from(b[2]), u16::from(b[3]), 0, 0, 0, 0),
                    64,
                )
                .unwrap_or_default(),
            ),
        ],
        tunnel_addrs: vec![IpAddr::V4(Ipv4Addr::new(100, 96, b[2], b[3]))],
        zone: format!("zone-{}", i % 8),
        version: 0,
        deleted: false,
    }
}

impl Sim {
    /// Creates `n` replicas with the given topology; every one starts its first round at once.
    pub fn new(n: u32, topology: Topology, config: Config, net: NetConfig, start: Instant) -> Self {
        let cache = Arc::new(VerifyCache::default());
        let mut sim = Sim {
            now: start,
            nodes: Vec::new(),
            sides: None,
            bytes: 0,
            config,
            net,
            rng: Rng::new(seed32(net.seed, u32::MAX)),
            heap: BinaryHeap::new(),
            seq: 0,
            cache,
        };
        for i in 0..n {
            let node = sim.make_node(i, sample_record(i));
            sim.nodes.push(node);
        }
        let mut edges = Vec::new();
        match topology {
            Topology::FullMesh => {
                for a in 0..n {
                    for b in 0..n {
                        if a != b {
                            edges.push((a, b));
                        }
                    }
                }
            }
            Topology::Random(k) => {
                for a in 0..n {
                    let next = (a + 1) % n;
                    if next != a {
                        edges.push((a, next));
                        edges.push((next, a));
                    }
                    for _ in 0..k {
                        let b = (sim.rng.next_u64() % u64::from(n)) as u32;
                        if b != a {
                            edges.push((a, b));
                            edges.push((b, a));
                        }
                    }
                }
            }
        }
        for (a, b) in edges {
            sim.link(a, b);
        }
        for i in 0..n {
            sim.after_io(i);
        }
        sim
    }

    /// Adds a node that knows only `seeds` (and adds every node it learns of).
    pub fn add_node(&mut self, rec: NodeRecord, seeds: &[u32]) -> u32 {
        let i = self.nodes.len() as u32;
        let mut node = self.make_node(i, rec);
        node.auto_peer = true;
        self.nodes.push(node);
        for s in seeds {
            self.link(i, *s);
        }
        self.after_io(i);
        i
    }

    /// Adds `b` as a peer of `a` (one direction).
    pub fn link(&mut self, a: u32, b: u32) {
        if let Some(n) = self.nodes.get_mut(a as usize) {
            n.sut.add_peer(b, default_link());
        }
    }

    /// Stops node `i` and starts it again from its exported state.
    pub fn restart(&mut self, i: u32) {
        let Some(old) = self.nodes.get(i as usize) else {
            return;
        };
        let state = old.sut.export_state();
        let own = old.sut.own().clone();
        let peers: Vec<u32> = old
            .sut
            .status(self.now)
            .peers
            .iter()
            .map(|p| p.peer)
            .collect();
        let mut node = self.make_node(i, own);
        let _ = node.sut.import_state(&state, self.now);
        // The shell re-adds the peers it learns from the restored records.
        for p in peers {
            node.sut.add_peer(p, default_link());
        }
        while node.sut.poll_event().is_some() {}
        if let Some(slot) = self.nodes.get_mut(i as usize) {
            *slot = node;
        }
        self.after_io(i);
    }

    /// Applies `f` to node `i`'s replica at the current time, then collects its output.
    pub fn with<R>(
        &mut self,
        i: u32,
        f: impl FnOnce(&mut Replica<u32>, Instant) -> R,
    ) -> Option<R> {
        let now = self.now;
        let r = self.nodes.get_mut(i as usize).map(|n| f(&mut n.sut, now));
        self.after_io(i);
        r
    }

    /// Runs until `deadline` or until `done` holds (checked every `every`); returns the time
    /// `done` first held.
    pub fn run_until(
        &mut self,
        deadline: Instant,
        every: Duration,
        mut done: impl FnMut(&Sim) -> bool,
    ) -> Option<Instant> {
        let mut next_check = self.now;
        loop {
            if self.now >= next_check {
                if done(self) {
                    return Some(self.now);
                }
                next_check = self.now + every;
            }
            let top = self.heap.peek()?;
            let at = top.at.min(next_check);
            if at > deadline {
                self.now = deadline;
                return done(self).then_some(deadline);
            }
            if at < top.at {
                self.now = at;
                continue;
            }
            let s = self.heap.pop()?;
            self.now = self.now.max(s.at);
            match s.ev {
                SimEvent::Deliver { to, from, payload } => {
                    let now = self.now;
                    if let Some(n) = self.nodes.get_mut(to as usize)
                        && n.up
                    {
                        let _ = n.sut.handle_message(from, &payload, now);
                        self.after_io(to);
                    }
                }
                SimEvent::Timer(i) => {
                    let now = self.now;
                    if let Some(n) = self.nodes.get_mut(i as usize) {
                        if n.scheduled.is_some_and(|t| t <= now) {
                            n.scheduled = None;
                        }
                        if n.up {
                            n.sut.handle_timeout(now);
                        }
                    }
                    self.after_io(i);
                }
            }
        }
    }

    /// Runs for `d` simulated time.
    pub fn run_for(&mut self, d: Duration) {
        let deadline = self.now + d;
        self.run_until(deadline, d, |_| false);
    }

    /// Whether every running node holds the same (origin → version) set.
    pub fn converged(&self) -> bool {
        let mut hashes = self
            .nodes
            .iter()
            .filter(|n| n.up)
            .map(|n| n.sut.state_hash());
        let Some(first) = hashes.next() else {
            return true;
        };
        hashes.all(|h| h == first)
    }

    /// Every running node's (origin → (version, deleted)) map.
    pub fn maps(&self) -> Vec<BTreeMap<[u8; 32], (u64, bool)>> {
        self.nodes
            .iter()
            .filter(|n| n.up)
            .map(|n| n.sut.versions().map(|(id, v, d)| (id, (v, d))).collect())
            .collect()
    }

    /// Splits the network: datagrams between nodes on different sides are dropped.
    pub fn partition(&mut self, side: impl Fn(u32) -> u8) {
        self.sides = Some((0..self.nodes.len() as u32).map(side).collect());
    }

    /// Removes the partition.
    pub fn heal(&mut self) {
        self.sides = None;
    }

    fn make_node(&self, i: u32, rec: NodeRecord) -> SimNode {
        let secret = secret_of(self.net.seed, i);
        let mut sut = Replica::new(self.config, secret, rec, seed32(self.net.seed, i), self.now)
            .unwrap_or_else(|e| panic!("sample record {i} is valid: {e}"));
        sut.set_verify_cache(self.cache.clone());
        SimNode {
            sut,
            secret,
            up: true,
            tx_bytes: 0,
            auto_peer: false,
            scheduled: None,
        }
    }

    /// Moves node `i`'s output into the network and re-arms its timer.
    fn after_io(&mut self, i: u32) {
        let Some(n) = self.nodes.get_mut(i as usize) else {
            return;
        };
        let mut out = Vec::new();
        while let Some(t) = n.sut.poll_transmit() {
            n.tx_bytes += t.payload.len() as u64;
            out.push(t);
        }
        let mut learned = Vec::new();
        while let Some(ev) = n.sut.poll_event() {
            if let Event::RecordUpserted(r) = ev
                && n.auto_peer
            {
                learned.push(r.name.clone());
            }
        }
        for name in learned {
            if let Some(p) = name
                .strip_prefix("edge-")
                .and_then(|s| s.parse::<u32>().ok())
                && p != i
            {
                n.sut.add_peer(p, default_link());
            }
        }
        let timer = n.sut.poll_timeout().map(|(t, _)| t).filter(|_| n.up);
        let mut arm = None;
        if let Some(t) = timer
            && n.scheduled.is_none_or(|s| t < s)
        {
            n.scheduled = Some(t);
            arm = Some(t);
        }
        if let Some(t) = arm {
            self.push(t.max(self.now), SimEvent::Timer(i));
        }
        for t in out {
            self.bytes += t.payload.len() as u64;
            let cut = self
                .sides
                .as_ref()
                .is_some_and(|s| s.get(i as usize) != s.get(t.to as usize));
            if cut || self.rng.unit() < self.net.loss {
                continue;
            }
            let at = self.now + self.net.delay;
            self.push(
                at,
                SimEvent::Deliver {
                    to: t.to,
                    from: i,
                    payload: t.payload,
                },
            );
        }
    }

    fn push(&mut self, at: Instant, ev: SimEvent) {
        self.seq += 1;
        self.heap.push(Scheduled {
            at,
            seq: self.seq,
            ev,
        });
    }
}

fn default_link() -> LinkInfo {
    LinkInfo {
        cost: 10,
        budget_bytes_per_sec: None,
    }
}

fn seed32(seed: u64, i: u32) -> [u8; 32] {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    s[8..12].copy_from_slice(&i.to_le_bytes());
    s[12] = 0xa5;
    s
}
