//! The control channel's I/O shell: one thread around the `mistnet-sync` replica.
//!
//! - Transport: a UDP socket on this node's tunnel address. Messages to a peer go to its
//!   tunnel address, so they travel through `mist0` and the WireGuard overlay: encrypted and
//!   authenticated by the peer's key. A message is attributed to the peer whose allowed IPs
//!   hold its source address (the overlay already dropped spoofed inner sources), so a node
//!   can only speak for itself; records carry their origin's signature on top of that.
//! - Peers: every peer of the node (configured seeds and learned ones) is a gossip partner;
//!   its link cost is the cheapest underlay that reaches it.
//! - Records → peers: every change of the replicated state recomputes the learned peers and
//!   reconciles the overlay, the path selector and the routes (`peers::Reconciler`).
//! - Own record: name, keys, pod CIDRs, tunnel addresses, zone, and endpoints: each underlay
//!   interface's addresses with its port and cost, plus the addresses peers observe for us
//!   (a NAT's public mapping, reported by path probes). Refreshed when any of them changes.
//! - Keys: the WireGuard private key (`private_key_file`) is the node's one secret. The replica
//!   signs the own record with it (XEdDSA) and every node derives the signer's identity from
//!   the WireGuard key in the record, so no separate identity key exists (an `identity.key`
//!   left in `state_dir` by an older build is not read).
//! - Persistence: the replica's state is written atomically to `<state_dir>/cluster.state`
//!   after changes (at most once a second) and imported on start, so a node that restarts
//!   during a partition still knows its peers. A state in another format version is ignored
//!   with a warning; gossip re-learns it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mistnet_cni::fsutil;
use mistnet_cni::netlink::Netlink;
use mistnet_sync::{Endpoint, Event, LinkInfo, NodeRecord, Replica};
use tracing::{debug, info, trace, warn};

use crate::config::{Config, PeerConf};
use crate::dataplane::Shared;
use crate::lock;
use crate::peers::{LEARNED_KEEPALIVE, Reconciler};

/// Largest control datagram accepted.
const MAX_MESSAGE: usize = 2048;
/// How often the own endpoints are re-read from the interfaces.
const ENDPOINT_REFRESH: Duration = Duration::from_secs(2);
/// Least time between two writes of the persisted state.
const PERSIST_EVERY: Duration = Duration::from_secs(1);
/// Longest sleep of the loop (stop flag, endpoint refresh).
const MAX_WAIT: Duration = Duration::from_millis(200);

/// The running control thread.
pub struct Handle {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Handle {
    /// Stops the thread (the state was persisted on every change).
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

/// Starts the control thread.
pub fn spawn(
    config: &Config,
    private: &[u8; 32],
    shared: Arc<Shared>,
    reconciler: Arc<Mutex<Reconciler>>,
) -> Result<Handle> {
    let local = config
        .tunnel_addresses
        .iter()
        .find(|a| a.is_ipv4())
        .or(config.tunnel_addresses.first())
        .copied()
        .context("no tunnel address for the control channel")?;
    let sock = UdpSocket::bind(SocketAddr::new(local, config.sync.port)).with_context(|| {
        format!(
            "binding the control channel to {local}:{}",
            config.sync.port
        )
    })?;
    sock.set_read_timeout(Some(MAX_WAIT))?;
    let now = Instant::now();
    let mut shell = Shell {
        config: config.clone(),
        wg_key: crate::keys::public(private),
        sock,
        shared,
        reconciler,
        peers: BTreeMap::new(),
        state_file: config.state_dir.join("cluster.state"),
        dirty: false,
        last_persist: None,
        endpoints_read: None,
        nl: Netlink::open().context("netlink for the control channel")?,
    };
    let own = shell.own_record()?;
    let mut replica = Replica::new(
        mistnet_sync::Config {
            authority: config.sync.authority,
            ..mistnet_sync::Config::default()
        },
        *private,
        own,
        crate::keys::generate_seed(),
        now,
    )
    .context("creating the replica")?;
    match std::fs::read(&shell.state_file) {
        Ok(bytes) => match replica.import_state(&bytes, now) {
            Ok(n) => info!(records = n, "restored the cluster state"),
            Err(mistnet_sync::Error::Decode(mistnet_sync::DecodeError::UnsupportedVersion(v))) => {
                warn!(
                    found = v,
                    supported = mistnet_sync::FORMAT_VERSION,
                    file = %shell.state_file.display(),
                    "ignoring a cluster state written in another format; peers re-send it"
                )
            }
            Err(e) => {
                warn!(error = %e, file = %shell.state_file.display(), "ignoring an unreadable cluster state")
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(error = %e, "cannot read the cluster state"),
    }
    shell.on_change(&mut replica);
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::Builder::new()
        .name("control".into())
        .spawn(move || shell.run(&mut replica, &flag))?;
    Ok(Handle { stop, thread })
}

struct Shell {
    config: Config,
    wg_key: [u8; 32],
    sock: UdpSocket,
    shared: Arc<Shared>,
    reconciler: Arc<Mutex<Reconciler>>,
    /// Gossip partners: name → tunnel address.
    peers: BTreeMap<String, IpAddr>,
    state_file: PathBuf,
    dirty: bool,
    last_persist: Option<Instant>,
    endpoints_read: Option<Instant>,
    nl: Netlink,
}

impl Shell {
    fn run(mut self, replica: &mut Replica<String>, stop: &AtomicBool) {
        let mut buf = vec![0u8; MAX_MESSAGE];
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            replica.handle_timeout(now);
            self.refresh_own(replica, now);
            self.drain(replica);
            let wait = replica
                .poll_timeout()
                .map(|(t, _)| t.saturating_duration_since(Instant::now()))
                .unwrap_or(MAX_WAIT)
                .clamp(Duration::from_millis(1), MAX_WAIT);
            let _ = self.sock.set_read_timeout(Some(wait));
            match self.sock.recv_from(&mut buf) {
                Ok((len, src)) => {
                    let Some(from) = self.peer_of(src.ip()) else {
                        trace!(%src, "control message from no known peer");
                        continue;
                    };
                    let Some(bytes) = buf.get(..len) else {
                        continue;
                    };
                    if !self.peers.contains_key(&from) {
                        // A peer configured since the last refresh (SIGHUP): answer it now.
                        self.refresh_partners(replica);
                    }
                    if let Err(e) = replica.handle_message(from.clone(), bytes, Instant::now()) {
                        debug!(peer = %from, error = %e, "control message refused");
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    debug!(error = %e, "control socket");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            self.drain(replica);
            self.persist(replica, Instant::now());
            self.publish_status(replica);
        }
        self.dirty = true;
        self.last_persist = None;
        self.persist(replica, Instant::now());
    }

    /// Sends queued messages and applies state changes.
    fn drain(&mut self, replica: &mut Replica<String>) {
        while let Some(t) = replica.poll_transmit() {
            let Some(ip) = self.peers.get(&t.to) else {
                continue;
            };
            if let Err(e) = self
                .sock
                .send_to(&t.payload, SocketAddr::new(*ip, self.config.sync.port))
            {
                trace!(peer = %t.to, error = %e, "control send failed");
            }
        }
        let mut changed = false;
        while let Some(e) = replica.poll_event() {
            match e {
                Event::RecordUpserted(r) => {
                    debug!(node = %r.name, version = r.version, "record learned")
                }
                Event::RecordRemoved { name, .. } => info!(node = %name, "node removed"),
            }
            changed = true;
        }
        if changed {
            self.on_change(replica);
        }
    }

    /// Recomputes the learned peers and the gossip partners from the replicated records.
    fn on_change(&mut self, replica: &mut Replica<String>) {
        self.dirty = true;
        let own = replica.identity();
        let learned: Vec<PeerConf> = replica
            .records()
            .filter(|r| r.identity != own)
            .map(record_peer)
            .collect();
        {
            let mut rec = lock(&self.reconciler);
            rec.set_learned(learned);
            if let Err(e) = rec.apply(&self.shared) {
                warn!("applying learned peers: {e:#}");
            }
        }
        self.refresh_partners(replica);
    }

    /// Makes the gossip partners the node's effective peers (configured ones change on
    /// SIGHUP, learned ones with the records).
    fn refresh_partners(&mut self, replica: &mut Replica<String>) {
        let effective = lock(&self.reconciler).effective();
        let mut partners = BTreeMap::new();
        for p in &effective {
            let Some(ip) = default_tunnel_address(p) else {
                continue;
            };
            partners.insert(p.name.clone(), ip);
            replica.add_peer(p.name.clone(), self.link_to(&p.name));
        }
        for gone in self.peers.keys().filter(|n| !partners.contains_key(*n)) {
            replica.remove_peer(gone);
        }
        if partners != self.peers {
            debug!(partners = partners.len(), "gossip partners changed");
        }
        self.peers = partners;
    }

    /// The link a peer is reached over: the underlay of its current path (cheapest one while
    /// none is chosen); over a metered underlay, control traffic gets a budget.
    fn link_to(&self, name: &str) -> LinkInfo {
        let local = {
            let core = self.shared.core();
            core.id_of(name)
                .and_then(|id| core.dests(id, core.overlay.peer_path(&id)).first)
                .map(|d| match d {
                    crate::core::Dest::Direct(p) => p.local,
                    crate::core::Dest::Relay { via, .. } => via.local,
                })
        };
        let underlay = local
            .and_then(|l| self.config.underlays.get(usize::from(l)))
            .or_else(|| self.config.underlays.iter().min_by_key(|u| u.cost));
        match underlay {
            Some(u) => LinkInfo {
                cost: u.cost,
                budget_bytes_per_sec: u.metered.then_some(self.config.sync.metered_budget),
            },
            None => LinkInfo {
                cost: crate::config::DEFAULT_UNDERLAY_COST,
                budget_bytes_per_sec: None,
            },
        }
    }

    fn peer_of(&self, src: IpAddr) -> Option<String> {
        let core = self.shared.core();
        let id = core.overlay.route(src)?;
        core.name_of(*id).map(str::to_owned)
    }

    /// Re-reads the own endpoints now and then and republishes the record if they changed.
    fn refresh_own(&mut self, replica: &mut Replica<String>, now: Instant) {
        if self
            .endpoints_read
            .is_some_and(|t| now.saturating_duration_since(t) < ENDPOINT_REFRESH)
        {
            return;
        }
        self.endpoints_read = Some(now);
        self.refresh_partners(replica);
        let endpoints = self.endpoints();
        if let Some(sel) = self.shared.core().paths.as_mut() {
            sel.set_advertised(endpoints.iter().map(|e| e.addr));
        }
        if endpoints != replica.own().endpoints {
            info!(endpoints = endpoints.len(), "own endpoints changed");
            if let Err(e) = replica.update_own(|r| r.endpoints = endpoints, now) {
                warn!(error = %e, "cannot publish the own record");
            }
        }
    }

    fn own_record(&mut self) -> Result<NodeRecord> {
        Ok(NodeRecord {
            name: self.config.node_name.clone(),
            wg_key: self.wg_key,
            identity: [0; 32],
            endpoints: self.endpoints(),
            pod_cidrs: self.config.pod_cidrs.clone(),
            tunnel_addrs: self.config.tunnel_addresses.clone(),
            zone: self.config.zone.clone(),
            version: 0,
            deleted: false,
        })
    }

    /// Every underlay's addresses with its port and cost, then the observed ones.
    fn endpoints(&mut self) -> Vec<Endpoint> {
        let mut out = BTreeSet::new();
        for u in &self.config.underlays {
            let names: Vec<String> = match &u.interface {
                Some(n) => vec![n.clone()],
                None => self.config.underlay_interfaces.clone(),
            };
            for name in names {
                let Ok(link) = self.nl.link_by_name(&name) else {
                    continue;
                };
                let Ok(addrs) = self.nl.addresses(link.header.index) else {
                    continue;
                };
                for (ip, _) in addrs {
                    if usable(ip) {
                        out.insert(Endpoint {
                            iface: name.clone(),
                            addr: SocketAddr::new(ip, u.port),
                            cost: u.cost,
                        });
                    }
                }
            }
        }
        let observed: Vec<SocketAddr> = lock(&self.shared.observed).iter().copied().collect();
        let known: BTreeSet<SocketAddr> = out.iter().map(|e| e.addr).collect();
        for addr in observed.into_iter().filter(|a| !known.contains(a)) {
            out.insert(Endpoint {
                iface: "observed".into(),
                addr,
                cost: crate::config::DEFAULT_UNDERLAY_COST,
            });
        }
        out.into_iter().take(8).collect()
    }

    fn persist(&mut self, replica: &Replica<String>, now: Instant) {
        if !self.dirty
            || self
                .last_persist
                .is_some_and(|t| now.saturating_duration_since(t) < PERSIST_EVERY)
        {
            return;
        }
        self.dirty = false;
        self.last_persist = Some(now);
        if let Some(dir) = self.state_file.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let bytes = replica.export_state();
        if let Err(e) = fsutil::write_atomic(&self.state_file, &bytes, fsutil::Sync::Data) {
            warn!(error = %e, file = %self.state_file.display(), "cannot persist the cluster state");
        }
    }

    fn publish_status(&self, replica: &Replica<String>) {
        let status = replica.status(Instant::now());
        if let Ok(v) = serde_json::to_value(&status) {
            *lock(&self.shared.sync_status) = Some(v);
        }
    }
}

/// A learned peer from a record (its tunnel address kept for the control channel).
fn record_peer(r: &NodeRecord) -> PeerConf {
    PeerConf {
        name: r.name.clone(),
        public_key: r.wg_key,
        endpoints: r.endpoints.iter().map(|e| e.addr).collect(),
        pod_cidrs: r.pod_cidrs.clone(),
        persistent_keepalive: Some(LEARNED_KEEPALIVE),
        tunnel: r.tunnel_addrs.iter().find(|a| a.is_ipv4()).copied(),
    }
}

/// A configured peer's tunnel address: the first host of its IPv4 pod CIDR (the default the
/// daemon uses for itself).
fn default_tunnel_address(p: &PeerConf) -> Option<IpAddr> {
    p.tunnel.or_else(|| {
        p.pod_cidrs
            .iter()
            .find(|n| n.addr().is_ipv4())
            .and_then(|n| n.hosts().next())
    })
}

/// Addresses worth publishing: not loopback, not link-local, not unspecified.
fn usable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_loopback() || v4.is_link_local() || v4.is_unspecified()),
        IpAddr::V6(v6) => {
            !(v6.is_loopback() || v6.is_unspecified() || v6.segments()[0] & 0xffc0 == 0xfe80)
        }
    }
}
