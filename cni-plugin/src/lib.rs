//! The mistnet CNI plugin (pure synchronous library behind the `mistnet` binary).
//!
//! It parses the runtime's config and environment, allocates pod addresses from the node-local
//! IPAM store, builds the pod's veth, addresses, neighbours and routes over rtnetlink, and
//! prints the result in the config's spec version. It never talks to mistnetd: the daemon
//! publishes the node state file ([`node_state`]) and reads the IPAM store's allocation records
//! ([`ipam`]), so pods keep being created while the daemon restarts.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod config;
pub mod debugknobs;
pub mod error;
pub mod fsutil;
pub mod ipam;
pub mod netlink;
pub mod netns;
pub mod node_state;
pub mod plugin;
pub mod pod;
pub mod result;
