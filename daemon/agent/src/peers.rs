//! The node's peer set: the config's peers (seeds) merged with the peers the control channel
//! learned, and its reconciliation into the overlay core, the path selector and the routes.
//!
//! Both the main thread (SIGHUP reload) and the control thread (records arriving) change the
//! set; [`Reconciler`] sits behind one mutex, computes the wanted state as a pure function of
//! the set, and applies only the difference (routes idempotently, peers by upsert, which keeps
//! the sessions of unchanged peers).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use anyhow::{Context, Result};
use ipnet::IpNet;
use mistnet_cni::netlink::Netlink;
use tracing::{debug, info};

use crate::config::PeerConf;
use crate::dataplane::Shared;

/// Keepalive for peers learned from the control channel: holds NAT mappings open.
pub const LEARNED_KEEPALIVE: u16 = 25;

/// Owns the overlay routes and the two sources of peers.
pub struct Reconciler {
    nl: Netlink,
    index: u32,
    own_name: String,
    configured: Vec<PeerConf>,
    learned: BTreeMap<String, PeerConf>,
    routes: BTreeSet<IpNet>,
}

impl Reconciler {
    pub fn new(nl: Netlink, index: u32, own_name: String, configured: Vec<PeerConf>) -> Self {
        Self {
            nl,
            index,
            own_name,
            configured,
            learned: BTreeMap::new(),
            routes: BTreeSet::new(),
        }
    }

    /// Replaces the configured peers (SIGHUP).
    pub fn set_configured(&mut self, peers: Vec<PeerConf>) {
        self.configured = peers;
    }

    /// Replaces the peers learned from the control channel.
    pub fn set_learned(&mut self, peers: impl IntoIterator<Item = PeerConf>) {
        self.learned = peers
            .into_iter()
            .filter(|p| p.name != self.own_name)
            .map(|p| (p.name.clone(), p))
            .collect();
    }

    /// The effective peers: a configured peer wins over a learned one of the same name, but
    /// learns its endpoints (a seed that moved is still found).
    pub fn effective(&self) -> Vec<PeerConf> {
        let mut out: BTreeMap<String, PeerConf> = self.learned.clone();
        for c in &self.configured {
            let mut p = c.clone();
            if let Some(l) = self.learned.get(&c.name)
                && l.public_key == c.public_key
            {
                if p.tunnel.is_none() {
                    p.tunnel = l.tunnel;
                }
                for e in &l.endpoints {
                    if !p.endpoints.contains(e) {
                        p.endpoints.push(*e);
                    }
                }
            }
            out.insert(p.name.clone(), p);
        }
        out.into_values().collect()
    }

    /// Makes the overlay, the path selector and the routes match the effective peers.
    pub fn apply(&mut self, shared: &Shared) -> Result<usize> {
        let peers = self.effective();
        let now = Instant::now();
        {
            let mut core = shared.core();
            let keep: BTreeSet<&str> = peers.iter().map(|p| p.name.as_str()).collect();
            let gone: Vec<String> = core
                .peer_names()
                .filter(|id| !keep.contains(id.as_str()))
                .cloned()
                .collect();
            for id in gone {
                info!(peer = %id, "peer removed");
                core.remove_peer(&id);
            }
            for p in &peers {
                core.upsert_peer(p, now);
            }
            core.refresh_relays(now);
        }
        let wanted: BTreeSet<IpNet> = peers
            .iter()
            .flat_map(|p| p.pod_cidrs.iter().copied())
            .collect();
        for r in self.routes.difference(&wanted) {
            self.nl
                .delete_route(*r, self.index)
                .with_context(|| format!("removing route {r}"))?;
            debug!(route = %r, "route removed");
        }
        for r in wanted.difference(&self.routes) {
            self.nl
                .replace_route(*r, self.index)
                .with_context(|| format!("adding route {r}"))?;
            debug!(route = %r, "route added");
        }
        self.routes = wanted;
        Ok(peers.len())
    }

    /// Deletes the overlay device (on stop).
    pub fn delete_link(&mut self) {
        let _ = self.nl.delete_link(self.index);
    }

    /// Removes every route this node added (on stop).
    pub fn remove_routes(&mut self) {
        for r in std::mem::take(&mut self.routes) {
            let _ = self.nl.delete_route(r, self.index);
        }
    }
}
