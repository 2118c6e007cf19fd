//! mistlab: an N-node mistnet edge cluster on one machine.
//!
//! Every node is a network namespace (`ml-<lab>-<node>`) that plays a host: it runs the real
//! `mistnetd` and gets pods from the real `mistnet` CNI plugin, called through a conflist the
//! way a container runtime calls it ([`cni`]). Pods are namespaces too
//! (`ml-<lab>-<node>-<pod>`). Nodes reach each other over an underlay: by default one
//! interface `wan0` per node on a shared L2 segment that lives in its own namespace
//! (`ml-<lab>-wan`); with a [`topology`], one emulated network per underlay interface
//! (`wlan0`, `lte0`, ...), and nodes behind NAT router namespaces (`ml-<lab>-<node>r`).
//!
//! All state of a lab lives under `/run/mistlab/<lab>/` (`lab.json` plus one directory per
//! node with its config, keys, node state, IPAM store and daemon log). `down` works from that
//! state and from the namespace name prefix, so it also cleans up a lab whose processes died,
//! and it is idempotent. Namespace names are unique per lab, so labs (and tests) coexist.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod cni;
pub mod demo;
pub mod lab;
pub mod ns;
pub mod probe;
pub mod topology;

pub use lab::{Interface, Lab, LabSpec, LinkImpairment, NodeInfo, PodInfo, RouterInfo};
pub use probe::{ProbeReport, ProbeStream};
pub use topology::{Nat, Network, NodeSpec, Topology};
