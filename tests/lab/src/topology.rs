//! Lab topology: underlay networks, per-network links and schedules, zones and NAT.
//!
//! Pure: parsing and validation only; [`crate::lab`] builds what a topology describes. A
//! topology without `[networks]` is the classic lab: one network `wan0` (10.99.0.0/24) whose
//! links come from the top-level `[links]`.
//!
//! ```toml
//! default = "wifi-good"            # links not listed, on networks without their own default
//! seed = 7
//! [profiles]
//! field-lte = "profile=lte loss=3%"
//! [networks.wlan0]                 # one emulated network; also the interface name
//! subnet = "10.99.0.0/24"          # node i gets .i
//! default = "wifi-good"
//! cost = 10
//! metered = false
//! [networks.lte0]
//! subnet = "10.98.0.0/24"
//! default = "lte"
//! cost = 50
//! metered = true
//! [nodes.n1]
//! zone = "field-a"
//! networks = ["wlan0"]             # default: every network
//! nat = "masquerade"               # or "symmetric", "none" (default)
//! port_forward = false             # router forwards UDP 51820 to the node
//! [links]                          # the first network
//! "n1-n2" = "field-lte"
//! [links.lte0]                     # a given network
//! "n1-n2" = "lte-congested"
//! [[schedule]]
//! at = "10s"
//! link = "n1-n2"
//! set = "down"
//! network = "lte0"                 # default: the first network
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};

/// The interface, and the network, of a topology without `[networks]`.
pub const DEFAULT_NETWORK: &str = "wan0";
/// WireGuard's UDP port on every underlay.
pub const WG_PORT: u16 = 51820;

/// A parsed, validated-on-use lab topology. Build it in Rust or [`Topology::parse`] a file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Topology {
    /// Profile of every link on a network without its own `default`.
    pub default: Option<String>,
    /// The emulators' random seed (network *k* uses `seed + k`); 1 when unset.
    pub seed: Option<u64>,
    /// Named settings usable in links, defaults and schedules.
    pub profiles: BTreeMap<String, String>,
    /// Underlay networks in order; empty means one network `wan0` on 10.99.0.0/24.
    pub networks: Vec<Network>,
    /// Per-node zone, networks and NAT, keyed `n1`, `n2`, ...
    pub nodes: BTreeMap<String, NodeSpec>,
    /// Links of the first network: selector (`n1-n2`) to profile.
    pub links: BTreeMap<String, String>,
    pub schedule: Vec<Schedule>,
}

/// One emulated underlay network: one `netbench emulate` instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Network {
    /// Network name, also the interface name in every attached node.
    pub name: String,
    /// Node *i* (and the NAT router of node *i*) gets host address *i*.
    pub subnet: Subnet,
    /// Profile of this network's links not listed in `links`.
    pub default: Option<String>,
    /// Operator cost of this underlay, written into mistnetd.toml.
    pub cost: u32,
    pub metered: bool,
    /// Selector (`n1-n2`) to profile, on this network only.
    pub links: BTreeMap<String, String>,
}

impl Network {
    /// A network with the given subnet, cost 10, not metered, no links.
    pub fn new(name: &str, subnet: &str) -> Result<Network> {
        Ok(Network {
            name: name.to_owned(),
            subnet: subnet
                .parse()
                .with_context(|| format!("networks.{name}.subnet"))?,
            default: None,
            cost: 10,
            metered: false,
            links: BTreeMap::new(),
        })
    }
}

/// Where a node sits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeSpec {
    pub zone: Option<String>,
    /// Networks the node is attached to; `None` means all of them.
    pub networks: Option<Vec<String>>,
    pub nat: Nat,
    /// The NAT router forwards UDP port 51820 on its WAN addresses to the node.
    pub port_forward: bool,
}

/// The NAT in front of a node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Nat {
    /// The node is on the networks itself.
    #[default]
    None,
    /// Linux masquerade: port-preserving when it can, endpoint-independent mapping.
    Masquerade,
    /// Masquerade with a random source port per flow: endpoint-dependent mapping.
    Symmetric,
}

impl Nat {
    /// The name used in topology files.
    pub fn as_str(&self) -> &'static str {
        match self {
            Nat::None => "none",
            Nat::Masquerade => "masquerade",
            Nat::Symmetric => "symmetric",
        }
    }
}

impl std::str::FromStr for Nat {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Nat> {
        Ok(match s {
            "none" => Nat::None,
            "masquerade" => Nat::Masquerade,
            "symmetric" => Nat::Symmetric,
            other => bail!("unknown nat {other:?} (use none, masquerade, symmetric)"),
        })
    }
}

/// A timed link change on one network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Time from start, e.g. `"10s"`.
    pub at: String,
    /// Repeat period.
    #[serde(default)]
    pub every: Option<String>,
    /// Link selector: `a-b`, `a>b`, `a-*`, `*`.
    pub link: String,
    /// Settings, e.g. `"down"`.
    pub set: String,
    /// Network name; `None` means the first network.
    #[serde(default)]
    pub network: Option<String>,
}

/// An IPv4 subnet, `10.99.0.0/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnet {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Subnet {
    /// Host number `i` of the subnet; fails when it is outside or the broadcast address.
    pub fn host(&self, i: usize) -> Result<Ipv4Addr> {
        let size = 1u64 << (32 - u32::from(self.len));
        ensure!(
            i >= 1 && (i as u64) < size.saturating_sub(1),
            "{self} has no host address .{i}"
        );
        let base = u32::from(self.addr);
        Ok(Ipv4Addr::from(base + u32::try_from(i)?))
    }

    fn mask(&self) -> u32 {
        if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.len))
        }
    }

    /// Whether two subnets share any address.
    pub fn overlaps(&self, other: &Subnet) -> bool {
        let len = self.len.min(other.len);
        let m = Subnet {
            addr: self.addr,
            len,
        }
        .mask();
        u32::from(self.addr) & m == u32::from(other.addr) & m
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl std::str::FromStr for Subnet {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Subnet> {
        let (a, l) = s
            .split_once('/')
            .with_context(|| format!("{s:?}: expected ADDR/LEN, e.g. 10.99.0.0/24"))?;
        let addr: Ipv4Addr = a.parse().with_context(|| format!("{s:?}: bad address"))?;
        let len: u8 = l.parse().with_context(|| format!("{s:?}: bad length"))?;
        ensure!(
            (8..=30).contains(&len),
            "{s:?}: prefix length must be 8..=30"
        );
        let sub = Subnet { addr, len };
        ensure!(
            u32::from(addr) & !sub.mask() == 0,
            "{s:?}: host bits set (did you mean {}/{len}?)",
            Ipv4Addr::from(u32::from(addr) & sub.mask())
        );
        Ok(sub)
    }
}

impl Topology {
    /// Reads a topology file.
    pub fn load(path: &Path) -> Result<Topology> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading topology {}", path.display()))?;
        Topology::parse(&text).with_context(|| format!("topology {}", path.display()))
    }

    /// Parses a topology (see the module docs for the format).
    pub fn parse(text: &str) -> Result<Topology> {
        let raw: RawTopology = toml::from_str(text)?;
        // serde's maps lose the file's order; the order of networks matters (first network,
        // endpoint order), so it is read from the document itself.
        let doc: toml_edit::DocumentMut = text.parse()?;
        let order: Vec<String> = doc
            .get("networks")
            .and_then(|n| n.as_table_like())
            .map(|t| t.iter().map(|(k, _)| k.to_owned()).collect())
            .unwrap_or_default();
        let mut networks = Vec::new();
        for (k, name) in order.iter().enumerate() {
            let Some(r) = raw.networks.get(name) else {
                continue;
            };
            let subnet = match &r.subnet {
                Some(s) => s.as_str().to_owned(),
                None => format!("10.{}.0.0/24", 99usize.saturating_sub(k)),
            };
            let mut net = Network::new(name, &subnet)?;
            net.default.clone_from(&r.default);
            net.cost = r.cost.unwrap_or(10);
            net.metered = r.metered;
            networks.push(net);
        }
        let mut links = BTreeMap::new();
        for (key, v) in raw.links {
            match v {
                toml::Value::String(p) => {
                    links.insert(key, p);
                }
                toml::Value::Table(t) => {
                    let Some(net) = networks.iter_mut().find(|n| n.name == key) else {
                        bail!("[links.{key}]: no network {key} under [networks]");
                    };
                    for (sel, p) in t {
                        let toml::Value::String(p) = p else {
                            bail!("links.{key}.{sel:?}: expected a profile string");
                        };
                        net.links.insert(sel, p);
                    }
                }
                toml::Value::Integer(_)
                | toml::Value::Float(_)
                | toml::Value::Boolean(_)
                | toml::Value::Datetime(_)
                | toml::Value::Array(_) => {
                    bail!("links.{key:?}: expected a profile string or a [links.NETWORK] table")
                }
            }
        }
        let mut nodes = BTreeMap::new();
        for (name, r) in raw.nodes {
            let nat = match &r.nat {
                Some(s) => s.parse().with_context(|| format!("nodes.{name}.nat"))?,
                None => Nat::None,
            };
            nodes.insert(
                name,
                NodeSpec {
                    zone: r.zone,
                    networks: r.networks,
                    nat,
                    port_forward: r.port_forward,
                },
            );
        }
        Ok(Topology {
            default: raw.default,
            seed: raw.seed,
            profiles: raw.profiles,
            networks,
            nodes,
            links,
            schedule: raw.schedule,
        })
    }

    /// Whether the topology names its networks (and so uses the multi-underlay agent config).
    pub fn has_networks(&self) -> bool {
        !self.networks.is_empty()
    }

    /// The networks in order: the declared ones, or the single default `wan0`.
    pub fn effective_networks(&self) -> Vec<Network> {
        if self.networks.is_empty() {
            let mut wan = Network {
                name: DEFAULT_NETWORK.to_owned(),
                subnet: Subnet {
                    addr: Ipv4Addr::new(10, 99, 0, 0),
                    len: 24,
                },
                default: None,
                cost: 10,
                metered: false,
                links: BTreeMap::new(),
            };
            wan.links.clone_from(&self.links);
            return vec![wan];
        }
        let mut nets = self.networks.clone();
        if let Some(first) = nets.first_mut() {
            for (k, v) in &self.links {
                first.links.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        nets
    }

    /// The spec of a node (`n1`); the default spec when the topology does not name it.
    pub fn node(&self, name: &str) -> NodeSpec {
        self.nodes.get(name).cloned().unwrap_or_default()
    }

    /// The networks node `name` is attached to, in network order.
    pub fn node_networks(&self, name: &str) -> Vec<Network> {
        let spec = self.node(name);
        self.effective_networks()
            .into_iter()
            .filter(|n| spec.networks.as_ref().is_none_or(|l| l.contains(&n.name)))
            .collect()
    }

    /// Checks the topology against a lab of `nodes` nodes `n1..nN`; errors name the field.
    pub fn validate(&self, nodes: usize) -> Result<()> {
        let names: BTreeSet<String> = (1..=nodes).map(|i| format!("n{i}")).collect();
        let nets = self.effective_networks();
        let mut seen: Vec<&Network> = Vec::new();
        for n in &nets {
            validate_ifname(&n.name).with_context(|| format!("[networks.{}]", n.name))?;
            if let Some(o) = seen.iter().find(|o| o.subnet.overlaps(&n.subnet)) {
                bail!(
                    "networks.{}.subnet {} overlaps networks.{}.subnet {}",
                    n.name,
                    n.subnet,
                    o.name,
                    o.subnet
                );
            }
            n.subnet
                .host(nodes)
                .with_context(|| format!("networks.{}.subnet is too small", n.name))?;
            let pods = Subnet {
                addr: Ipv4Addr::new(10, 244, 0, 0),
                len: 16,
            };
            ensure!(
                !n.subnet.overlaps(&pods),
                "networks.{}.subnet {} overlaps the pod CIDRs 10.244.0.0/16",
                n.name,
                n.subnet
            );
            seen.push(n);
        }
        let any_nat = self.nodes.values().any(|s| s.nat != Nat::None);
        for n in &nets {
            for private in ["192.168.0.0/16", "172.16.0.0/12"] {
                let p: Subnet = private.parse()?;
                ensure!(
                    !any_nat || !n.subnet.overlaps(&p),
                    "networks.{}.subnet {} overlaps {private}, which NAT routers use inside",
                    n.name,
                    n.subnet
                );
            }
        }
        for (name, spec) in &self.nodes {
            ensure!(
                names.contains(name),
                "[nodes.{name}]: the lab has nodes n1..n{nodes}"
            );
            if let Some(list) = &spec.networks {
                ensure!(
                    !list.is_empty(),
                    "nodes.{name}.networks: a node needs at least one network"
                );
                for net in list {
                    ensure!(
                        nets.iter().any(|n| &n.name == net),
                        "nodes.{name}.networks: no network {net}"
                    );
                }
            }
            if let Some(z) = &spec.zone {
                ensure!(
                    !z.is_empty() && !z.contains(['"', '\\', '\n']),
                    "nodes.{name}.zone {z:?}: use a plain name"
                );
            }
            ensure!(
                spec.nat != Nat::None || !spec.port_forward,
                "nodes.{name}.port_forward needs a nat"
            );
            ensure!(
                spec.nat == Nat::None || self.node_networks(name).len() <= 16,
                "nodes.{name}: a NATed node takes at most 16 networks"
            );
        }
        for n in &nets {
            let members: Vec<String> = names
                .iter()
                .filter(|node| self.node_networks(node).iter().any(|m| m.name == n.name))
                .cloned()
                .collect();
            ensure!(
                members.len() >= 2,
                "[networks.{}]: joins {} node(s) ({}); a network needs at least two",
                n.name,
                members.len(),
                members.join(", ")
            );
            for sel in n.links.keys() {
                check_selector(sel, &members)
                    .with_context(|| format!("links.{}.{sel:?}", n.name))?;
            }
        }
        for (i, s) in self.schedule.iter().enumerate() {
            let net = match &s.network {
                Some(name) => nets
                    .iter()
                    .find(|n| &n.name == name)
                    .with_context(|| format!("schedule[{i}].network: no network {name}"))?,
                None => nets.first().context("no networks")?,
            };
            let members: Vec<String> = names
                .iter()
                .filter(|node| self.node_networks(node).iter().any(|m| m.name == net.name))
                .cloned()
                .collect();
            check_selector(&s.link, &members)
                .with_context(|| format!("schedule[{i}].link {:?}", s.link))?;
        }
        Ok(())
    }

    /// The netbench profile file of one network (nodes are passed separately).
    pub fn emulator_profile(&self, network: &Network) -> netbench::emulate::ProfileFile {
        let nets = self.effective_networks();
        let k = nets
            .iter()
            .position(|n| n.name == network.name)
            .unwrap_or(0);
        netbench::emulate::ProfileFile {
            default: network.default.clone().or_else(|| self.default.clone()),
            seed: Some(self.seed.unwrap_or(1) + k as u64),
            profiles: self.profiles.clone(),
            links: network.links.clone(),
            nodes: BTreeMap::new(),
            schedule: self
                .schedule
                .iter()
                .filter(|s| match &s.network {
                    Some(n) => n == &network.name,
                    None => k == 0,
                })
                .map(|s| netbench::emulate::profile::ScheduleEntry {
                    at: s.at.clone(),
                    every: s.every.clone(),
                    link: s.link.clone(),
                    set: s.set.clone(),
                })
                .collect(),
        }
    }
}

/// A netbench profile file as TOML text.
pub fn profile_toml(f: &netbench::emulate::ProfileFile) -> String {
    let q = |s: &str| toml::Value::String(s.to_owned()).to_string();
    let mut t = String::new();
    if let Some(d) = &f.default {
        t.push_str(&format!("default = {}\n", q(d)));
    }
    if let Some(s) = f.seed {
        t.push_str(&format!("seed = {s}\n"));
    }
    t.push_str("[profiles]\n");
    for (k, v) in &f.profiles {
        t.push_str(&format!("{} = {}\n", q(k), q(v)));
    }
    t.push_str("[links]\n");
    for (k, v) in &f.links {
        t.push_str(&format!("{} = {}\n", q(k), q(v)));
    }
    for s in &f.schedule {
        t.push_str(&format!(
            "[[schedule]]\nat = {}\nlink = {}\nset = {}\n",
            q(&s.at),
            q(&s.link),
            q(&s.set)
        ));
        if let Some(e) = &s.every {
            t.push_str(&format!("every = {}\n", q(e)));
        }
    }
    t
}

/// Whether `name` can be an interface name in a node: 1–15 of `[a-z0-9_]`, not one the lab
/// uses itself.
fn validate_ifname(name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= 15
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
        "network name {name:?}: use 1-15 lowercase letters, digits or _ (it is an interface name)"
    );
    let lan = name
        .strip_prefix("lan")
        .is_some_and(|r| !r.is_empty() && r.chars().all(|c| c.is_ascii_digit()));
    ensure!(
        !["lo", "mist0", "eth0"].contains(&name) && !lan,
        "network name {name:?} is reserved (lo, mist0, eth0 and lanN are the lab's own)"
    );
    Ok(())
}

/// Checks that a link selector names only `members` (or `*`).
fn check_selector(sel: &str, members: &[String]) -> Result<()> {
    for part in sel.split(',') {
        let (a, b) = part
            .split_once('-')
            .or_else(|| part.split_once('>'))
            .unwrap_or((part, "*"));
        for end in [a, b] {
            ensure!(
                end == "*" || members.iter().any(|m| m == end),
                "{end:?} is not a node on this network (its nodes: {})",
                members.join(", ")
            );
        }
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopology {
    #[serde(default)]
    default: Option<String>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    profiles: BTreeMap<String, String>,
    #[serde(default)]
    networks: BTreeMap<String, RawNetwork>,
    #[serde(default)]
    nodes: BTreeMap<String, RawNode>,
    #[serde(default)]
    links: BTreeMap<String, toml::Value>,
    #[serde(default)]
    schedule: Vec<Schedule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    #[serde(default)]
    subnet: Option<String>,
    #[serde(default)]
    default: Option<String>,
    #[serde(default)]
    cost: Option<u32>,
    #[serde(default)]
    metered: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    networks: Option<Vec<String>>,
    #[serde(default)]
    nat: Option<String>,
    #[serde(default)]
    port_forward: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    const EDGE: &str = r#"
default = "ideal"
[networks.wlan0]
subnet = "10.99.0.0/24"
default = "wifi-good"
cost = 10
[networks.lte0]
subnet = "10.98.0.0/24"
default = "lte"
cost = 50
metered = true
[nodes.n1]
zone = "field-a"
networks = ["wlan0"]
nat = "masquerade"
[links]
"n1-n2" = "wifi-flaky"
[links.lte0]
"n2-n3" = "down"
[[schedule]]
at = "1s"
link = "n2-n3"
set = "up"
network = "lte0"
"#;

    #[test]
    fn networks_keep_file_order_and_links_their_network() {
        let t = Topology::parse(EDGE).unwrap();
        let names: Vec<_> = t.networks.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["wlan0", "lte0"]);
        assert_eq!(t.networks[1].cost, 50);
        assert!(t.networks[1].metered);
        let nets = t.effective_networks();
        assert_eq!(nets[0].links["n1-n2"], "wifi-flaky");
        assert_eq!(nets[1].links["n2-n3"], "down");
        assert_eq!(t.node("n1").nat, Nat::Masquerade);
        assert_eq!(t.node_networks("n1").len(), 1);
        assert_eq!(t.node_networks("n2").len(), 2);
        t.validate(3).unwrap();
        let lte = t.emulator_profile(&nets[1]);
        assert_eq!(lte.default.as_deref(), Some("lte"));
        assert_eq!(lte.schedule.len(), 1);
        assert!(t.emulator_profile(&nets[0]).schedule.is_empty());
    }

    #[test]
    fn classic_file_is_one_wan0_network() {
        let t = Topology::parse("default = \"lte\"\n[links]\n\"n1-n2\" = \"satellite\"\n").unwrap();
        assert!(!t.has_networks());
        let nets = t.effective_networks();
        assert_eq!(nets.len(), 1);
        assert_eq!(nets[0].name, "wan0");
        assert_eq!(nets[0].subnet.host(2).unwrap(), Ipv4Addr::new(10, 99, 0, 2));
        t.validate(2).unwrap();
        let text = profile_toml(&t.emulator_profile(&nets[0]));
        netbench::emulate::ProfileFile::parse(&text).unwrap();
    }

    #[test]
    fn errors_name_the_bad_field() {
        let err = |text: &str, nodes: usize| {
            let e = Topology::parse(text).and_then(|t| t.validate(nodes));
            format!("{:#}", e.err().unwrap())
        };
        assert!(err(EDGE, 2).contains("lte0"), "{}", err(EDGE, 2));
        let e = err("[networks.wlan0]\nsubnet = \"10.99.0.1/24\"\n", 2);
        assert!(e.contains("host bits"), "{e}");
        let e = err("[networks.a]\n[nodes.n1]\nnat = \"cone\"\n", 2);
        assert!(e.contains("nodes.n1.nat"), "{e}");
        let e = err("[networks.a]\n[nodes.n1]\nnetworks = [\"b\"]\n", 2);
        assert!(e.contains("nodes.n1.networks"), "{e}");
        let e = err("[networks.a]\n[nodes.n9]\n", 2);
        assert!(e.contains("[nodes.n9]"), "{e}");
        let e = err("[networks.a]\n[links.b]\n\"n1-n2\" = \"lte\"\n", 2);
        assert!(e.contains("[links.b]"), "{e}");
        let e = err(
            "[networks.a]\nsubnet = \"10.9.0.0/24\"\n[networks.b]\nsubnet = \"10.9.0.0/16\"\n",
            2,
        );
        assert!(e.contains("overlaps"), "{e}");
        let e = err("[networks.lan0]\n", 2);
        assert!(e.contains("reserved"), "{e}");
        let e = err("[networks.a]\ncolor = 1\n", 2);
        assert!(e.contains("color"), "{e}");
    }
}
