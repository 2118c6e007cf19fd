//! The node config file (TOML), validated with errors that name the bad field.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ipnet::IpNet;
use serde::Deserialize;

/// Default UDP port (WireGuard's).
pub const DEFAULT_PORT: u16 = 51820;
/// WireGuard's overhead over an IPv4 underlay: IPv4 (20) + UDP (8) + WireGuard (32).
pub const OVERHEAD_V4: u32 = 60;
/// ... and over an IPv6 underlay.
pub const OVERHEAD_V6: u32 = 80;

/// A validated config.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub node_name: String,
    pub private_key_file: PathBuf,
    pub listen_port: u16,
    pub interface: String,
    pub underlay_interfaces: Vec<String>,
    pub pod_cidrs: Vec<IpNet>,
    pub tunnel_addresses: Vec<IpAddr>,
    pub mtu: Mtu,
    pub node_state_file: PathBuf,
    pub api_socket: PathBuf,
    pub workers: usize,
    pub peers: Vec<PeerConf>,
}

/// MTU of mist0 and pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mtu {
    /// Underlay MTU minus WireGuard's overhead.
    Auto,
    Fixed(u32),
}

/// One peer.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerConf {
    pub name: String,
    pub public_key: [u8; 32],
    pub endpoints: Vec<SocketAddr>,
    pub pod_cidrs: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    node_name: String,
    private_key_file: PathBuf,
    #[serde(default)]
    listen_port: Option<u16>,
    #[serde(default)]
    interface: Option<String>,
    #[serde(default)]
    underlay_interfaces: Vec<String>,
    pod_cidrs: Vec<String>,
    #[serde(default)]
    tunnel_addresses: Vec<String>,
    #[serde(default)]
    mtu: Option<toml::Value>,
    #[serde(default)]
    node_state_file: Option<PathBuf>,
    #[serde(default)]
    api_socket: Option<PathBuf>,
    #[serde(default)]
    workers: Option<usize>,
    #[serde(default)]
    peers: Vec<RawPeer>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: String,
    public_key: String,
    #[serde(default)]
    endpoints: Vec<String>,
    pod_cidrs: Vec<String>,
    #[serde(default)]
    persistent_keepalive: Option<u16>,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("config {}", path.display()))
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Self> {
        let raw: Raw = toml::from_str(text).context("invalid TOML")?;
        if raw.node_name.is_empty() || raw.node_name.len() > 63 {
            bail!("node_name: must be 1-63 characters");
        }
        let pod_cidrs = cidrs("pod_cidrs", &raw.pod_cidrs)?;
        if pod_cidrs.is_empty() {
            bail!("pod_cidrs: at least one network is required");
        }
        if pod_cidrs.iter().filter(|n| n.addr().is_ipv4()).count() > 1
            || pod_cidrs.iter().filter(|n| n.addr().is_ipv6()).count() > 1
        {
            bail!("pod_cidrs: at most one IPv4 and one IPv6 network");
        }
        let tunnel_addresses = if raw.tunnel_addresses.is_empty() {
            // The first host address of each pod CIDR: the CNI plugin never hands it out.
            pod_cidrs.iter().filter_map(|n| n.hosts().next()).collect()
        } else {
            raw.tunnel_addresses
                .iter()
                .enumerate()
                .map(|(i, a)| {
                    a.parse::<IpAddr>().with_context(|| {
                        format!("tunnel_addresses[{i}]: {a:?} is not an IP address")
                    })
                })
                .collect::<Result<Vec<_>>>()?
        };
        for (i, a) in tunnel_addresses.iter().enumerate() {
            if !pod_cidrs.iter().any(|n| n.contains(a)) {
                bail!(
                    "tunnel_addresses[{i}]: {a} is outside pod_cidrs (peers only accept sources in them)"
                );
            }
        }
        let mtu = match raw.mtu {
            None => Mtu::Auto,
            Some(toml::Value::String(s)) if s == "auto" => Mtu::Auto,
            Some(toml::Value::Integer(n)) if (1280..=65535).contains(&n) => {
                Mtu::Fixed(u32::try_from(n).context("mtu")?)
            }
            Some(other) => bail!("mtu: {other} must be \"auto\" or an integer in 1280..=65535"),
        };
        let interface = raw.interface.unwrap_or_else(|| "mist0".into());
        if interface.is_empty() || interface.len() > 15 {
            bail!("interface: {interface:?} must be 1-15 characters");
        }
        let mut peers = Vec::new();
        for (i, p) in raw.peers.iter().enumerate() {
            let at = format!("peers[{i}] ({})", p.name);
            if p.name.is_empty() || p.name == raw.node_name {
                bail!("{at}.name: must be non-empty and differ from node_name");
            }
            if peers.iter().any(|q: &PeerConf| q.name == p.name) {
                bail!("{at}.name: duplicate peer name");
            }
            let public_key =
                crate::keys::decode(&p.public_key).with_context(|| format!("{at}.public_key"))?;
            let endpoints = p
                .endpoints
                .iter()
                .enumerate()
                .map(|(j, e)| {
                    e.parse::<SocketAddr>()
                        .with_context(|| format!("{at}.endpoints[{j}]: {e:?} is not IP:port"))
                })
                .collect::<Result<Vec<_>>>()?;
            let pod = cidrs(&format!("{at}.pod_cidrs"), &p.pod_cidrs)?;
            for n in &pod {
                if pod_cidrs
                    .iter()
                    .any(|own| own.contains(&n.network()) || n.contains(&own.network()))
                {
                    bail!("{at}.pod_cidrs: {n} overlaps this node's pod_cidrs");
                }
            }
            peers.push(PeerConf {
                name: p.name.clone(),
                public_key,
                endpoints,
                pod_cidrs: pod,
                persistent_keepalive: p.persistent_keepalive,
            });
        }
        Ok(Config {
            node_name: raw.node_name,
            private_key_file: raw.private_key_file,
            listen_port: raw.listen_port.unwrap_or(DEFAULT_PORT),
            interface,
            underlay_interfaces: raw.underlay_interfaces,
            pod_cidrs,
            tunnel_addresses,
            mtu,
            node_state_file: raw
                .node_state_file
                .unwrap_or_else(|| PathBuf::from(mistnet_cni::node_state::DEFAULT_PATH)),
            api_socket: raw
                .api_socket
                .unwrap_or_else(|| PathBuf::from(crate::api::DEFAULT_SOCKET)),
            workers: raw.workers.unwrap_or(2).clamp(1, 16),
            peers,
        })
    }
}

fn cidrs(field: &str, list: &[String]) -> Result<Vec<IpNet>> {
    list.iter()
        .enumerate()
        .map(|(i, c)| {
            let n: IpNet = c
                .parse()
                .with_context(|| format!("{field}[{i}]: {c:?} is not a CIDR"))?;
            if n.trunc() != n {
                bail!("{field}[{i}]: {c} has host bits set");
            }
            Ok(n)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "YAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";

    fn base() -> String {
        format!(
            r#"node_name = "n1"
private_key_file = "/tmp/k"
pod_cidrs = ["10.244.1.0/24"]
[[peers]]
name = "n2"
public_key = "{KEY}"
endpoints = ["10.99.0.2:51820"]
pod_cidrs = ["10.244.2.0/24"]
persistent_keepalive = 25
"#
        )
    }

    #[test]
    fn defaults() {
        let c = Config::parse(&base()).unwrap();
        assert_eq!(c.listen_port, 51820);
        assert_eq!(c.interface, "mist0");
        assert_eq!(c.mtu, Mtu::Auto);
        assert_eq!(
            c.tunnel_addresses,
            vec!["10.244.1.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(c.peers[0].endpoints[0], "10.99.0.2:51820".parse().unwrap());
    }

    fn err(text: &str) -> String {
        format!("{:#}", Config::parse(text).unwrap_err())
    }

    #[test]
    fn errors_name_the_field() {
        assert!(
            err(&base().replace("10.244.2.0/24", "10.244.2.1/24"))
                .contains("peers[0] (n2).pod_cidrs[0]")
        );
        assert!(err(&base().replace(KEY, "short")).contains("peers[0] (n2).public_key"));
        assert!(err(&base().replace("10.99.0.2:51820", "nope")).contains("endpoints[0]"));
        assert!(err(&base().replace("10.244.2.0/24", "10.244.1.0/25")).contains("overlaps"));
        assert!(
            err(&format!(
                "{}mtu = 100\n",
                base().split("[[peers]]").next().unwrap()
            ))
            .contains("mtu")
        );
        assert!(err(&base().replace("node_name", "nodename")).contains("unknown field"));
        assert!(err("not toml [").contains("invalid TOML"));
    }
}
