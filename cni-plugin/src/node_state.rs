//! The node state file: what the daemon tells the CNI plugin about this node.
//!
//! `mistnetd` writes it (atomically: temp file + rename) to `/run/mistnet/node.json` when it has
//! learned the node's pod CIDRs and MTU; the plugin reads it on every ADD and STATUS. It lives on
//! tmpfs on purpose: after a reboot the plugin reports "not available" until the daemon has
//! started and re-established the node's identity. Format (JSON, camelCase):
//!
//! ```json
//! { "version": 1, "nodeName": "edge-1",
//!   "podCidrs": ["10.244.1.0/24", "fd00:10:244:1::/80"],
//!   "mtu": 1420, "gatewayV4": "169.254.1.1", "gatewayV6": "fe80::1" }
//! ```
//!
//! `podCidrs` holds at most one IPv4 and at most one IPv6 network; `gatewayV4`/`gatewayV6` are
//! optional and default to the link-local gateways of DESIGN.md §2.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Default location of the node state file.
pub const DEFAULT_PATH: &str = "/run/mistnet/node.json";
/// The format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// Default pod-side IPv4 gateway (answered by the host end of every pod veth).
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// Default pod-side IPv6 gateway.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// Smallest MTU accepted: IPv6 needs 1280, and IPv4 pods should not go below 576.
pub const MIN_MTU: u32 = 576;

/// The node state as written by the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeState {
    /// Format version, [`FORMAT_VERSION`].
    pub version: u32,
    /// The node's name (informational; logged and shown by `mistnetd status`).
    pub node_name: String,
    /// The node's pod networks: at most one IPv4 and one IPv6.
    pub pod_cidrs: Vec<IpNet>,
    /// MTU of pod interfaces (the overlay MTU).
    pub mtu: u32,
    /// Pod-side IPv4 gateway; defaults to 169.254.1.1.
    #[serde(default = "default_gw4")]
    pub gateway_v4: Ipv4Addr,
    /// Pod-side IPv6 gateway; defaults to fe80::1.
    #[serde(default = "default_gw6")]
    pub gateway_v6: Ipv6Addr,
}

fn default_gw4() -> Ipv4Addr {
    GATEWAY_V4
}
fn default_gw6() -> Ipv6Addr {
    GATEWAY_V6
}

/// Why a node state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum NodeStateError {
    #[error("node state file {path} does not exist (is mistnetd running?)")]
    Missing { path: PathBuf },
    #[error("cannot read node state file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("node state file {path} is not valid JSON for format version {FORMAT_VERSION}")]
    Decode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("node state file {path} is invalid: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot write node state file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl NodeState {
    /// Builds a state with the default gateways.
    pub fn new(node_name: impl Into<String>, pod_cidrs: Vec<IpNet>, mtu: u32) -> Self {
        Self {
            version: FORMAT_VERSION,
            node_name: node_name.into(),
            pod_cidrs,
            mtu,
            gateway_v4: GATEWAY_V4,
            gateway_v6: GATEWAY_V6,
        }
    }

    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, NodeStateError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(NodeStateError::Missing {
                    path: path.to_owned(),
                });
            }
            Err(source) => {
                return Err(NodeStateError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let state: NodeState =
            serde_json::from_slice(&bytes).map_err(|source| NodeStateError::Decode {
                path: path.to_owned(),
                source,
            })?;
        state.validate().map_err(|reason| NodeStateError::Invalid {
            path: path.to_owned(),
            reason,
        })?;
        Ok(state)
    }

    /// Writes the state atomically (temp file in the same directory, fsync, rename).
    pub fn store(&self, path: &Path) -> Result<(), NodeStateError> {
        let werr = |source| NodeStateError::Write {
            path: path.to_owned(),
            source,
        };
        self.validate().map_err(|reason| NodeStateError::Invalid {
            path: path.to_owned(),
            reason,
        })?;
        let json = serde_json::to_vec_pretty(self).map_err(|e| werr(io::Error::other(e)))?;
        crate::fsutil::write_atomic(path, &json, crate::fsutil::Sync::Data).map_err(werr)?;
        Ok(())
    }

    /// The IPv4 pod network, if any.
    pub fn cidr_v4(&self) -> Option<IpNet> {
        self.pod_cidrs.iter().copied().find(|n| n.addr().is_ipv4())
    }

    /// The IPv6 pod network, if any.
    pub fn cidr_v6(&self) -> Option<IpNet> {
        self.pod_cidrs.iter().copied().find(|n| n.addr().is_ipv6())
    }

    /// The pod-side gateway for an address family.
    pub fn gateway_for(&self, addr: IpAddr) -> IpAddr {
        match addr {
            IpAddr::V4(_) => IpAddr::V4(self.gateway_v4),
            IpAddr::V6(_) => IpAddr::V6(self.gateway_v6),
        }
    }

    /// Checks the invariants the plugin relies on; the error names the bad field.
    pub fn validate(&self) -> Result<(), String> {
        if self.version != FORMAT_VERSION {
            return Err(format!(
                "version: {} is not supported (expected {FORMAT_VERSION})",
                self.version
            ));
        }
        if self.pod_cidrs.is_empty() {
            return Err("podCidrs: must hold at least one network".into());
        }
        let v4 = self.pod_cidrs.iter().filter(|n| n.addr().is_ipv4()).count();
        let v6 = self.pod_cidrs.len() - v4;
        if v4 > 1 || v6 > 1 {
            return Err("podCidrs: at most one IPv4 and one IPv6 network".into());
        }
        for net in &self.pod_cidrs {
            if net.trunc() != *net {
                return Err(format!("podCidrs: {net} has host bits set"));
            }
            let max = if net.addr().is_ipv4() { 30 } else { 126 };
            if net.prefix_len() > max {
                return Err(format!("podCidrs: {net} is too small for pods"));
            }
        }
        if self.mtu < MIN_MTU || self.mtu > 65535 {
            return Err(format!("mtu: {} is outside {MIN_MTU}..=65535", self.mtu));
        }
        if v6 == 1 && self.mtu < 1280 {
            return Err(format!("mtu: {} is below IPv6's minimum of 1280", self.mtu));
        }
        Ok(())
    }
}
