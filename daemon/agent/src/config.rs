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
    /// The first of `listen_ports`: the socket configured endpoints are reached from.
    pub listen_port: u16,
    /// One underlay UDP socket per port (each a local end of paths to peers).
    pub listen_ports: Vec<u16>,
    pub interface: String,
    pub underlay_interfaces: Vec<String>,
    pub pod_cidrs: Vec<IpNet>,
    pub tunnel_addresses: Vec<IpAddr>,
    pub mtu: Mtu,
    pub node_state_file: PathBuf,
    pub api_socket: PathBuf,
    pub workers: usize,
    pub peers: Vec<PeerConf>,
    /// One UDP socket each: the local ends of paths to peers.
    pub underlays: Vec<Underlay>,
    /// The node's zone (published in its record; informational for now).
    pub zone: String,
    /// Where the persisted cluster state lives.
    pub state_dir: PathBuf,
    pub paths: PathsConf,
    pub sync: SyncConf,
}

/// A local underlay: a UDP socket, optionally bound to one interface (SO_BINDTODEVICE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    /// The interface the socket is bound to; `None` = any (routing decides).
    pub interface: Option<String>,
    pub port: u16,
    /// Operator cost: a metered LTE link costs more than Wi-Fi (path scores add it).
    pub cost: u32,
    pub metered: bool,
    /// Bytes per second the path probes of this underlay may use (all peers together).
    pub probe_budget: Option<u32>,
}

/// Path selection settings (`[paths]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PathsConf {
    /// Probe and choose paths per peer; off = plain WireGuard roaming.
    pub enabled: bool,
    pub redundancy: Redundancy,
    /// Use other nodes as relays when no direct path works, and serve as one.
    pub relay: bool,
    /// In redundant mode, resend only the lost messages on the second path when the receiver
    /// reports that full copies arrive too late (a second path of less capacity).
    pub repair: bool,
    /// The selector preset the settings below adjust.
    pub preset: PathPreset,
    /// Probe interval of the active path while traffic flows (ms).
    pub active_probe_ms: Option<u64>,
    /// Probe interval of standby paths (ms).
    pub standby_probe_ms: Option<u64>,
    /// Silence after which the active path is declared dead (ms).
    pub silence_timeout_ms: Option<u64>,
    /// How long a better path must stay better before traffic moves (ms).
    pub switch_hold_ms: Option<u64>,
    /// Loss (%) of the active path at which redundancy turns on.
    pub redundancy_enter_loss_pct: Option<f64>,
    /// Loss (%) below which redundancy turns off again.
    pub redundancy_leave_loss_pct: Option<f64>,
}

/// The selector preset the `[paths]` settings start from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathPreset {
    /// Fast failover (≈ 250 ms), 50 ms probes while traffic flows.
    Default,
    /// Half the probe rate and a 400 ms silence timeout, for nodes that live on metered links.
    Frugal,
}

/// When to send each packet on two paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redundancy {
    Off,
    Auto,
    Always,
}

/// Control channel settings (`[sync]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncConf {
    /// Replicate node records with the other nodes (peers in the config are the seeds).
    pub enabled: bool,
    /// UDP port on the tunnel address (traffic stays inside the overlay).
    pub port: u16,
    /// Public key (base64 ed25519) of the cluster authority that may delete nodes.
    pub authority: Option<[u8; 32]>,
    /// Bytes per second of control traffic to a peer reached over a metered underlay.
    pub metered_budget: u32,
}

/// Default control-channel budget towards a peer over a metered link (bytes/s): two full
/// records a second, far above the steady state (a few bytes per second).
pub const DEFAULT_METERED_BUDGET: u32 = 512;

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
    /// The peer's tunnel address (where its control channel listens), if known.
    pub tunnel: Option<IpAddr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    node_name: String,
    private_key_file: PathBuf,
    #[serde(default)]
    listen_port: Option<u16>,
    #[serde(default)]
    listen_ports: Vec<u16>,
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
    #[serde(default)]
    underlay: Vec<RawUnderlay>,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    state_dir: Option<PathBuf>,
    #[serde(default)]
    paths: RawPaths,
    #[serde(default)]
    sync: RawSync,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUnderlay {
    #[serde(default)]
    interface: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    cost: Option<u32>,
    #[serde(default)]
    metered: bool,
    #[serde(default)]
    probe_budget: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPaths {
    /// Path selection on (default).
    #[serde(default = "yes")]
    enabled: bool,
    /// "auto" (default): duplicate over two paths while the best one is lossy.
    #[serde(default)]
    redundancy: Option<String>,
    /// Relays allowed (default).
    #[serde(default = "yes")]
    relay: bool,
    /// Selective repair in redundant mode (default on).
    #[serde(default = "yes")]
    repair: bool,
    #[serde(default)]
    preset: Option<String>,
    #[serde(default)]
    active_probe_ms: Option<u64>,
    #[serde(default)]
    standby_probe_ms: Option<u64>,
    #[serde(default)]
    silence_timeout_ms: Option<u64>,
    #[serde(default)]
    switch_hold_ms: Option<u64>,
    #[serde(default)]
    redundancy_enter_loss_pct: Option<f64>,
    #[serde(default)]
    redundancy_leave_loss_pct: Option<f64>,
}

impl Default for RawPaths {
    fn default() -> Self {
        Self {
            enabled: true,
            redundancy: None,
            relay: true,
            repair: true,
            preset: None,
            active_probe_ms: None,
            standby_probe_ms: None,
            silence_timeout_ms: None,
            switch_hold_ms: None,
            redundancy_enter_loss_pct: None,
            redundancy_leave_loss_pct: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSync {
    /// Replication on (default).
    #[serde(default = "yes")]
    enabled: bool,
    /// Default 51870.
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    authority_key: Option<String>,
    #[serde(default)]
    metered_budget: Option<u32>,
}

impl Default for RawSync {
    fn default() -> Self {
        Self {
            enabled: true,
            port: None,
            authority_key: None,
            metered_budget: None,
        }
    }
}

fn yes() -> bool {
    true
}

/// Default cost of an underlay (Babel's cost of a wired link is 96; ours is relative only).
pub const DEFAULT_UNDERLAY_COST: u32 = 10;
/// Default UDP port of the control channel (inside the overlay).
pub const DEFAULT_SYNC_PORT: u16 = 51870;

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
        let underlays = underlays(&raw)?;
        let mtu = match raw.mtu {
            None => Mtu::Auto,
            Some(toml::Value::String(s)) if s == "auto" => Mtu::Auto,
            Some(toml::Value::Integer(n)) if (1280..=65535).contains(&n) => {
                Mtu::Fixed(u32::try_from(n).context("mtu")?)
            }
            Some(other) => bail!("mtu: {other} must be \"auto\" or an integer in 1280..=65535"),
        };
        let listen_ports: Vec<u16> = underlays.iter().map(|u| u.port).collect();
        let mut underlay_interfaces = raw.underlay_interfaces.clone();
        underlay_interfaces.extend(underlays.iter().filter_map(|u| u.interface.clone()));
        let zone = raw.zone.clone().unwrap_or_default();
        if zone.len() > 63 {
            bail!("zone: at most 63 characters");
        }
        let redundancy = match raw.paths.redundancy.as_deref() {
            None | Some("auto") => Redundancy::Auto,
            Some("off") => Redundancy::Off,
            Some("always") => Redundancy::Always,
            Some(other) => bail!("paths.redundancy: {other:?} must be off, auto or always"),
        };
        let preset = match raw.paths.preset.as_deref() {
            None | Some("default") => PathPreset::Default,
            Some("frugal") => PathPreset::Frugal,
            Some(other) => bail!("paths.preset: {other:?} must be default or frugal"),
        };
        for (field, v) in [
            ("paths.active_probe_ms", raw.paths.active_probe_ms),
            ("paths.standby_probe_ms", raw.paths.standby_probe_ms),
            ("paths.silence_timeout_ms", raw.paths.silence_timeout_ms),
            ("paths.switch_hold_ms", raw.paths.switch_hold_ms),
        ] {
            if let Some(ms) = v
                && !(5..=600_000).contains(&ms)
            {
                bail!("{field}: {ms} must be 5..=600000 ms");
            }
        }
        for (field, v) in [
            (
                "paths.redundancy_enter_loss_pct",
                raw.paths.redundancy_enter_loss_pct,
            ),
            (
                "paths.redundancy_leave_loss_pct",
                raw.paths.redundancy_leave_loss_pct,
            ),
        ] {
            if let Some(pct) = v
                && !(0.0..=100.0).contains(&pct)
            {
                bail!("{field}: {pct} must be a percentage (0-100)");
            }
        }
        let authority = raw
            .sync
            .authority_key
            .as_deref()
            .map(|k| crate::keys::decode(k).context("sync.authority_key"))
            .transpose()?;
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
                tunnel: None,
            });
        }
        Ok(Config {
            node_name: raw.node_name,
            private_key_file: raw.private_key_file.clone(),
            listen_port: listen_ports[0],
            listen_ports,
            interface,
            underlay_interfaces,
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
            underlays,
            zone,
            // Beside the private key by default: one directory holds the node's identity.
            state_dir: raw.state_dir.clone().unwrap_or_else(|| {
                raw.private_key_file
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .map_or_else(|| PathBuf::from("/var/lib/mistnet"), Path::to_path_buf)
            }),
            paths: PathsConf {
                enabled: raw.paths.enabled,
                redundancy,
                relay: raw.paths.relay,
                repair: raw.paths.repair,
                preset,
                active_probe_ms: raw.paths.active_probe_ms,
                standby_probe_ms: raw.paths.standby_probe_ms,
                silence_timeout_ms: raw.paths.silence_timeout_ms,
                switch_hold_ms: raw.paths.switch_hold_ms,
                redundancy_enter_loss_pct: raw.paths.redundancy_enter_loss_pct,
                redundancy_leave_loss_pct: raw.paths.redundancy_leave_loss_pct,
            },
            sync: SyncConf {
                enabled: raw.sync.enabled,
                port: raw.sync.port.unwrap_or(DEFAULT_SYNC_PORT),
                authority,
                metered_budget: raw.sync.metered_budget.unwrap_or(DEFAULT_METERED_BUDGET),
            },
        })
    }
}

/// The underlay sockets: `[[underlay]]` tables, or the legacy `listen_port(s)` (unbound).
fn underlays(raw: &Raw) -> Result<Vec<Underlay>> {
    let legacy = raw.listen_port.is_some() || !raw.listen_ports.is_empty();
    if legacy && !raw.underlay.is_empty() {
        bail!("underlay, listen_port(s): give [[underlay]] tables or listen ports, not both");
    }
    let list: Vec<Underlay> = if raw.underlay.is_empty() {
        let ports = match (raw.listen_port, raw.listen_ports.is_empty()) {
            (Some(_), false) => bail!("listen_port, listen_ports: give one of them, not both"),
            (Some(p), true) => vec![p],
            (None, true) => vec![DEFAULT_PORT],
            (None, false) => raw.listen_ports.clone(),
        };
        for (i, p) in ports.iter().enumerate() {
            if ports[..i].contains(p) {
                bail!("listen_ports[{i}]: port {p} is listed twice");
            }
        }
        ports
            .into_iter()
            .map(|port| Underlay {
                interface: None,
                port,
                cost: DEFAULT_UNDERLAY_COST,
                metered: false,
                probe_budget: None,
            })
            .collect()
    } else {
        let mut list = Vec::new();
        for (i, u) in raw.underlay.iter().enumerate() {
            if let Some(name) = &u.interface
                && (name.is_empty() || name.len() > 15)
            {
                bail!("underlay[{i}].interface: {name:?} must be 1-15 characters");
            }
            let port = u.port.unwrap_or(DEFAULT_PORT);
            let clash = list.iter().any(|o: &Underlay| {
                o.port == port
                    && (o.interface.is_none()
                        || u.interface.is_none()
                        || o.interface == u.interface)
            });
            if clash {
                bail!(
                    "underlay[{i}]: port {port} is already used by another underlay on the same interface"
                );
            }
            list.push(Underlay {
                interface: u.interface.clone(),
                port,
                cost: u.cost.unwrap_or(DEFAULT_UNDERLAY_COST),
                metered: u.metered,
                probe_budget: u.probe_budget,
            });
        }
        list
    };
    if list.len() > 16 {
        bail!("underlay: at most 16 sockets");
    }
    Ok(list)
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
        assert_eq!(c.listen_ports, vec![51820]);
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
        let head = base().split("[[peers]]").next().unwrap().to_owned();
        assert!(
            err(&format!("{head}listen_port = 1\nlisten_ports = [2]\n"))
                .contains("listen_port, listen_ports")
        );
        assert!(err(&format!("{head}listen_ports = [7, 7]\n")).contains("listen_ports[1]"));
        let c = Config::parse(&format!("{head}listen_ports = [7, 8]\n")).unwrap();
        assert_eq!((c.listen_port, c.listen_ports), (7, vec![7, 8]));
        assert!(
            err(&format!(
                "{head}listen_port = 1\n[[underlay]]\ninterface = \"a\"\n"
            ))
            .contains("not both")
        );
        assert!(
            err(&format!(
                "{head}[[underlay]]\ninterface = \"a\"\n[[underlay]]\ninterface = \"a\"\n"
            ))
            .contains("underlay[1]")
        );
        assert!(
            err(&format!("{head}[paths]\nredundancy = \"twice\"\n")).contains("paths.redundancy")
        );
        assert!(
            err(&format!("{head}[sync]\nauthority_key = \"x\"\n")).contains("sync.authority_key")
        );
        for (text, field) in [
            ("silence_timeout_ms = 1", "paths.silence_timeout_ms"),
            (
                "redundancy_enter_loss_pct = 120.0",
                "redundancy_enter_loss_pct",
            ),
            ("preset = \"fast\"", "paths.preset"),
        ] {
            assert!(
                err(&format!("{head}[paths]\n{text}\n")).contains(field),
                "{field}"
            );
        }
    }

    #[test]
    fn underlays_with_costs() {
        let head = base().split("[[peers]]").next().unwrap().to_owned();
        let c = Config::parse(&format!(
            "{head}zone = \"field-a\"\n[[underlay]]\ninterface = \"wlan0\"\ncost = 10\n\
             [[underlay]]\ninterface = \"lte0\"\ncost = 50\nmetered = true\nprobe_budget = 500\n\
             [paths]\nredundancy = \"off\"\n"
        ))
        .unwrap();
        assert_eq!(c.zone, "field-a");
        assert_eq!(c.listen_ports, vec![51820, 51820]);
        assert_eq!(c.underlays[1].interface.as_deref(), Some("lte0"));
        assert_eq!((c.underlays[1].cost, c.underlays[1].metered), (50, true));
        assert_eq!(c.underlays[1].probe_budget, Some(500));
        assert_eq!(c.underlay_interfaces, vec!["wlan0", "lte0"]);
        assert_eq!(c.paths.redundancy, Redundancy::Off);
        assert!(c.sync.enabled && c.paths.relay);
    }
}
