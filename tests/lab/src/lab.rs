//! Bringing a lab up and down, and driving it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Output;

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use crate::cni::{ConfList, Runtime};
use crate::ns;
use crate::topology::{Nat, Network, Topology, WG_PORT};

/// Root of every lab's state.
pub const STATE_ROOT: &str = "/run/mistlab";
/// Prefix of every namespace a lab creates.
pub const NS_PREFIX: &str = "ml-";
/// MTU of the underlay links.
pub const UNDERLAY_MTU: u32 = 1500;

/// How cross-node pod traffic is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Overlay {
    /// mistnetd on every node: the userspace WireGuard overlay.
    Mistnet,
    /// Plain routes over the underlay, no tunnel (the baseline).
    Routed,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct LabSpec {
    /// Lab name: 1–8 lowercase letters or digits; part of every namespace name.
    pub name: String,
    pub nodes: usize,
    pub pods_per_node: usize,
    /// Give nodes an IPv6 pod CIDR too.
    pub dual_stack: bool,
    pub overlay: Overlay,
    /// Directory holding `mistnet`, `mistnetd` and `netbench`.
    pub bin_dir: PathBuf,
    /// Emulated underlay: the profile of every link (a netbench preset such as `lte`, or a
    /// spec such as `delay=20ms loss=1%`). `None` and no topology: an ideal bridge.
    pub profile: Option<String>,
    /// Emulated underlay: a topology file (networks, nodes, zones, NAT, per-link profiles and
    /// schedules; see [`Topology`]).
    pub topology: Option<PathBuf>,
    /// Emulated underlay: a topology built in Rust (instead of `topology`).
    pub layout: Option<Topology>,
    /// Start mistnetd on every node (`false`: configs and keys are written, the lab publishes
    /// the node state itself, for tests of the lab's wiring).
    pub daemons: bool,
}

impl LabSpec {
    /// A spec with the binaries next to the running executable (target/<profile>/).
    pub fn new(name: &str, nodes: usize, pods_per_node: usize) -> Self {
        Self {
            name: name.to_owned(),
            nodes,
            pods_per_node,
            dual_stack: false,
            overlay: Overlay::Mistnet,
            bin_dir: default_bin_dir(),
            profile: None,
            topology: None,
            layout: None,
            daemons: true,
        }
    }

    /// The same spec with an emulated underlay described by `topology`.
    pub fn with_topology(mut self, topology: Topology) -> Self {
        self.layout = Some(topology);
        self
    }

    /// The same spec with a topology parsed from TOML text (the `--topology` file format).
    pub fn with_topology_str(self, text: &str) -> Result<Self> {
        Ok(self.with_topology(Topology::parse(text)?))
    }

    /// The same spec without mistnetd (see [`LabSpec::daemons`]).
    pub fn without_daemons(mut self) -> Self {
        self.daemons = false;
        self
    }

    /// The topology this spec asks for, if any.
    pub fn resolve_topology(&self) -> Result<Option<Topology>> {
        match (&self.topology, &self.layout) {
            (Some(_), Some(_)) => bail!("give a topology file or a built topology, not both"),
            (Some(path), None) => Ok(Some(Topology::load(path)?)),
            (None, Some(t)) => Ok(Some(t.clone())),
            (None, None) => Ok(None),
        }
    }
}

/// Where the project's binaries are: `MISTLAB_BIN_DIR`, else next to the running executable
/// (or its parent, for test binaries in target/<profile>/deps/).
pub fn default_bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MISTLAB_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// A node of the lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub netns: String,
    /// The node's own address on its first underlay interface (behind NAT: a private one).
    pub underlay: Ipv4Addr,
    /// Every underlay interface, in network order.
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub zone: Option<String>,
    /// The NAT router in front of the node.
    #[serde(default)]
    pub router: Option<RouterInfo>,
    pub pod_cidrs: Vec<String>,
    pub dir: PathBuf,
    #[serde(default)]
    pub daemon_pid: Option<u32>,
    #[serde(default)]
    pub public_key: Option<String>,
}

impl NodeInfo {
    /// The interface on a network.
    pub fn interface(&self, network: &str) -> Result<&Interface> {
        self.interfaces
            .iter()
            .find(|i| i.network == network)
            .with_context(|| format!("node {} is not on network {network}", self.name))
    }

    /// The address others reach this node at on a network (the router's, behind NAT).
    pub fn wan_addr(&self, network: &str) -> Result<Ipv4Addr> {
        Ok(self.interface(network)?.wan_addr)
    }
}

/// One underlay interface of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interface {
    /// The network, which is also the interface name.
    pub network: String,
    /// The node's own address (behind NAT: on the link to its router).
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    /// The address the node has on the network: its own, or its router's behind NAT.
    pub wan_addr: Ipv4Addr,
}

/// The NAT router namespace in front of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouterInfo {
    /// Name used with [`Lab::exec`]: the node's name plus `r` (`n1r`).
    pub name: String,
    pub netns: String,
    pub nat: Nat,
    /// UDP 51820 on the router's WAN addresses is forwarded to the node.
    pub port_forward: bool,
}

/// One underlay network of a running lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkInfo {
    pub name: String,
    pub subnet: String,
    pub cost: u32,
    pub metered: bool,
    /// The pid of this network's `netbench emulate`; `None` on the plain bridge.
    pub emulator_pid: Option<u32>,
    /// The emulator's control socket.
    pub control: PathBuf,
}

/// A pod of the lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodInfo {
    pub name: String,
    pub node: String,
    pub netns: String,
    pub container_id: String,
    pub ips: Vec<String>,
    pub result: Value,
}

/// The impairment of one underlay link (both directions).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkImpairment {
    /// Bernoulli loss in percent (0..=100).
    pub loss_pct: f64,
    /// The link is cut.
    pub down: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LabState {
    name: String,
    /// The emulator's pid when the underlay is emulated by `netbench emulate`.
    #[serde(default)]
    emulator_pid: Option<u32>,
    #[serde(default)]
    links: BTreeMap<String, LinkImpairment>,
    /// Underlay networks in order (one `wan0` without a topology).
    #[serde(default)]
    networks: Vec<NetworkInfo>,
    /// The topology has `[networks]`: mistnetd gets `[[underlay]]` tables and zones.
    #[serde(default)]
    multi_underlay: bool,
    overlay: Overlay,
    wan_ns: String,
    bin_dir: PathBuf,
    nodes: Vec<NodeInfo>,
    pods: Vec<PodInfo>,
}

/// A running lab. Dropping a lab made with [`Lab::up`] in a test tears it down (see
/// [`Lab::keep`]).
pub struct Lab {
    state: LabState,
    dir: PathBuf,
    down_on_drop: bool,
}

/// What `down` removed.
#[derive(Debug, Default, Clone, Serialize)]
pub struct DownReport {
    pub namespaces: Vec<String>,
    pub processes: Vec<u32>,
    pub state_dir_removed: bool,
}

fn validate_name(name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name.len() <= 8
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
        "lab name {name:?}: use 1-8 lowercase letters or digits"
    );
    Ok(())
}

/// The state directory of a lab.
pub fn state_dir(name: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(name)
}

impl Lab {
    /// Brings a lab up. On failure everything created so far is removed again.
    pub fn up(spec: &LabSpec) -> Result<Lab> {
        validate_name(&spec.name)?;
        ensure!((1..=200).contains(&spec.nodes), "--nodes must be 1..=200");
        ensure!(
            spec.pods_per_node <= 50,
            "--pods-per-node must be at most 50"
        );
        // SAFETY: geteuid has no preconditions.
        ensure!(
            unsafe { libc::geteuid() } == 0,
            "mistlab creates network namespaces: run it as root"
        );
        let plugin = spec.bin_dir.join("mistnet");
        ensure!(
            plugin.exists(),
            "{} missing: build it first (cargo build -p mistnet-cni) or set MISTLAB_BIN_DIR",
            plugin.display()
        );
        let dir = state_dir(&spec.name);
        if dir.join("lab.json").exists() || !ns::list(&ns_prefix(&spec.name)).is_empty() {
            bail!(
                "lab {} already exists: run `mistlab down --name {}` first",
                spec.name,
                spec.name
            );
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let state = LabState {
            name: spec.name.clone(),
            overlay: spec.overlay,
            wan_ns: format!("{}wan", ns_prefix(&spec.name)),
            bin_dir: spec.bin_dir.clone(),
            nodes: Vec::new(),
            pods: Vec::new(),
            links: BTreeMap::new(),
            networks: Vec::new(),
            multi_underlay: false,
            emulator_pid: None,
        };
        let mut lab = Lab {
            state,
            dir,
            down_on_drop: true,
        };
        if let Err(e) = lab.build(spec) {
            warn!(error = %e, "lab bring-up failed; tearing down");
            let logs = lab.logs();
            let _ = Lab::down_by_name(&spec.name);
            lab.down_on_drop = false;
            return Err(e.context(format!("bringing lab {} up\n{logs}", spec.name)));
        }
        Ok(lab)
    }

    fn build(&mut self, spec: &LabSpec) -> Result<()> {
        let topology = spec.resolve_topology()?;
        let emulated = spec.profile.is_some() || topology.is_some();
        if let Some(t) = &topology {
            t.validate(spec.nodes).context("invalid topology")?;
        }
        let topo = topology.unwrap_or_default();
        ensure!(
            spec.overlay == Overlay::Mistnet || topo.nodes.values().all(|n| n.nat == Nat::None),
            "the routed overlay does not support NAT (use the mistnet overlay)"
        );
        self.state.multi_underlay = topo.has_networks();
        for (k, net) in topo.effective_networks().iter().enumerate() {
            let control = if k == 0 {
                self.dir.join("emulate.sock")
            } else {
                self.dir.join(format!("emulate-{}.sock", net.name))
            };
            self.state.networks.push(NetworkInfo {
                name: net.name.clone(),
                subnet: net.subnet.to_string(),
                cost: net.cost,
                metered: net.metered,
                emulator_pid: None,
                control,
            });
        }
        if !emulated {
            let wan = self.state.wan_ns.clone();
            ns::add(&wan)?;
            ns::exec(&wan, &["ip", "link", "add", "wan", "type", "bridge"])?;
            ns::exec(&wan, &["ip", "link", "set", "wan", "up"])?;
        }
        self.save()?;
        for i in 1..=spec.nodes {
            let node = self.add_node(i, spec.dual_stack, !emulated, &topo)?;
            self.state.nodes.push(node);
            self.save()?;
        }
        if emulated {
            for (k, net) in topo.effective_networks().iter().enumerate() {
                self.start_emulator(spec, &topo, k, net)?;
            }
        }
        match spec.overlay {
            Overlay::Routed => self.install_routes()?,
            Overlay::Mistnet if spec.daemons => {
                self.write_daemon_configs()?;
                for n in 0..self.state.nodes.len() {
                    self.start_daemon(n)?;
                }
                self.save()?;
                for n in 0..self.state.nodes.len() {
                    self.wait_ready(n)?;
                }
            }
            Overlay::Mistnet => {
                self.write_daemon_configs()?;
                // No daemon publishes the node state; the lab does, so the CNI plugin works.
                for n in &self.state.nodes {
                    write_node_state(n)?;
                }
            }
        }
        for n in 0..self.state.nodes.len() {
            for p in 1..=spec.pods_per_node {
                let node = self.state.nodes[n].name.clone();
                self.add_pod(&node, &format!("p{p}"))?;
            }
        }
        info!(lab = %self.state.name, nodes = spec.nodes, pods = self.state.pods.len(), "lab up");
        Ok(())
    }

    fn add_node(
        &mut self,
        i: usize,
        dual_stack: bool,
        bridge: bool,
        topo: &Topology,
    ) -> Result<NodeInfo> {
        let name = format!("n{i}");
        let netns = format!("{}{name}", ns_prefix(&self.state.name));
        let dir = self.dir.join(&name);
        std::fs::create_dir_all(&dir)?;
        ns::add(&netns)?;
        let node_spec = topo.node(&name);
        let nets = topo.node_networks(&name);
        let router = match node_spec.nat {
            Nat::None => None,
            Nat::Masquerade | Nat::Symmetric => {
                let rname = format!("{name}r");
                Some(RouterInfo {
                    netns: format!("{}{rname}", ns_prefix(&self.state.name)),
                    name: rname,
                    nat: node_spec.nat,
                    port_forward: node_spec.port_forward,
                })
            }
        };
        let mut interfaces = Vec::new();
        for (k, net) in nets.iter().enumerate() {
            let wan_addr = net
                .subnet
                .host(i)
                .with_context(|| format!("network {}", net.name))?;
            let iface = match &router {
                None => Interface {
                    network: net.name.clone(),
                    addr: wan_addr,
                    prefix_len: net.subnet.len,
                    wan_addr,
                },
                Some(_) => Interface {
                    network: net.name.clone(),
                    addr: lan_addrs(i, k)?.1,
                    prefix_len: 24,
                    wan_addr,
                },
            };
            interfaces.push(iface);
        }
        if let Some(r) = &router {
            self.nat_router(r, &netns, &nets, &interfaces, i)
                .with_context(|| format!("NAT router of {name}"))?;
        }
        let underlay = interfaces
            .first()
            .map(|f| f.addr)
            .with_context(|| format!("node {name} has no network"))?;
        if bridge {
            self.bridge_underlay(&name, &netns, underlay)?;
        }
        let mut pod_cidrs = vec![format!("10.244.{i}.0/24")];
        if dual_stack {
            pod_cidrs.push(format!("fd00:10:244:{i:x}::/80"));
        }
        let conflist = json!({
            "cniVersion": "1.1.0",
            "name": "mistnet",
            "plugins": [{
                "type": "mistnet",
                "nodeStateFile": dir.join("node.json"),
                "daemonSocket": dir.join("mistnetd.sock"),
                "dataDir": dir.join("cni"),
            }]
        });
        std::fs::create_dir_all(dir.join("net.d"))?;
        std::fs::write(
            dir.join("net.d/10-mistnet.conflist"),
            serde_json::to_vec_pretty(&conflist)?,
        )?;
        debug!(node = %name, %underlay, "node up");
        let public_key = if self.state.overlay == Overlay::Mistnet {
            let key = dir.join("private.key");
            let bin = self.state.bin_dir.join("mistnetd");
            let out = crate::ns::run(
                std::process::Command::new(&bin)
                    .arg("keygen")
                    .arg("--out")
                    .arg(&key),
            )
            .with_context(|| {
                format!(
                    "{} keygen (build it: cargo build -p mistnet-agent)",
                    bin.display()
                )
            })?;
            Some(out.trim().to_owned())
        } else {
            None
        };
        let node = NodeInfo {
            name,
            netns,
            underlay,
            interfaces,
            zone: node_spec.zone,
            router,
            pod_cidrs,
            dir,
            daemon_pid: None,
            public_key,
        };
        if self.state.overlay == Overlay::Routed {
            // Without an overlay daemon the lab publishes the node state itself.
            write_node_state(&node)?;
        }
        Ok(node)
    }

    /// A NAT router namespace in front of node `i`: one veth per network to the node (the
    /// node's end carries the network's name), masquerade on its WAN interfaces, which the
    /// emulator creates later, and isolation between networks.
    fn nat_router(
        &self,
        r: &RouterInfo,
        node_ns: &str,
        nets: &[Network],
        interfaces: &[Interface],
        i: usize,
    ) -> Result<()> {
        ns::add(&r.netns)?;
        ns::exec(&r.netns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        let mut post = String::new();
        let mut pre = String::new();
        let mut fwd = String::new();
        let mut input = String::new();
        for (k, (net, iface)) in nets.iter().zip(interfaces).enumerate() {
            let lan = format!("lan{k}");
            let (gw, addr) = lan_addrs(i, k)?;
            ns::exec(
                &r.netns,
                &[
                    "ip", "link", "add", &lan, "type", "veth", "peer", "name", &net.name, "netns",
                    node_ns,
                ],
            )?;
            ns::exec(
                &r.netns,
                &["ip", "addr", "add", &format!("{gw}/24"), "dev", &lan],
            )?;
            ns::exec(&r.netns, &["ip", "link", "set", &lan, "up"])?;
            let mtu = UNDERLAY_MTU.to_string();
            ns::exec(
                node_ns,
                &["ip", "addr", "add", &format!("{addr}/24"), "dev", &net.name],
            )?;
            ns::exec(
                node_ns,
                &["ip", "link", "set", &net.name, "mtu", &mtu, "up"],
            )?;
            let gw_s = gw.to_string();
            let metric = (100 + k).to_string();
            let subnet = net.subnet.to_string();
            // The network's own subnet through its router; anything else through the first.
            ns::exec(
                node_ns,
                &[
                    "ip", "route", "add", &subnet, "via", &gw_s, "dev", &net.name,
                ],
            )?;
            ns::exec(
                node_ns,
                &[
                    "ip", "route", "add", "default", "via", &gw_s, "dev", &net.name, "metric",
                    &metric,
                ],
            )?;
            let random = match r.nat {
                Nat::Symmetric => " fully-random",
                Nat::Masquerade | Nat::None => "",
            };
            post.push_str(&format!(
                "    oifname \"{}\" masquerade{random}\n",
                net.name
            ));
            if r.port_forward {
                pre.push_str(&format!(
                    "    iifname \"{}\" udp dport {WG_PORT} dnat to {}\n",
                    net.name, iface.addr
                ));
            }
            fwd.push_str(&format!(
                "    iifname \"{lan}\" oifname != \"{}\" drop\n",
                net.name
            ));
            // Like a home router's firewall: unsolicited datagrams to the router itself are
            // dropped, not answered. Accepted, each would leave a conntrack entry that takes
            // the node's port on the router (the node's own datagram to that peer then gets
            // a new port), which defeats simultaneous-open hole punching.
            input.push_str(&format!("    iifname \"{}\" ct state new drop\n", net.name));
        }
        let script = format!(
            "table ip mistlab {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n{post}  }}\n  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n{pre}  }}\n  chain forward {{\n    type filter hook forward priority filter; policy accept;\n{fwd}  }}\n  chain input {{\n    type filter hook input priority filter; policy accept;\n{input}  }}\n}}\n"
        );
        nft_apply(&r.netns, &script)
    }

    /// Underlay without emulation: wan0 in the node, its peer enslaved to the lab's bridge.
    fn bridge_underlay(&self, name: &str, netns: &str, underlay: Ipv4Addr) -> Result<()> {
        let peer = format!("{name}-wan");
        ns::exec(
            &self.state.wan_ns,
            &[
                "ip", "link", "add", &peer, "type", "veth", "peer", "name", "wan0", "netns", netns,
            ],
        )?;
        ns::exec(
            &self.state.wan_ns,
            &["ip", "link", "set", &peer, "master", "wan", "up"],
        )?;
        ns::exec(
            netns,
            &[
                "ip",
                "addr",
                "add",
                &format!("{underlay}/24"),
                "dev",
                "wan0",
            ],
        )?;
        ns::exec(
            netns,
            &[
                "ip",
                "link",
                "set",
                "wan0",
                "mtu",
                &UNDERLAY_MTU.to_string(),
                "up",
            ],
        )?;
        Ok(())
    }

    /// One network through `netbench emulate`: it creates the network's interface in every
    /// attached node (or in the node's NAT router) and emulates every pair as a link.
    fn start_emulator(
        &mut self,
        spec: &LabSpec,
        topo: &Topology,
        k: usize,
        net: &Network,
    ) -> Result<()> {
        let bin = self.state.bin_dir.join("netbench");
        ensure!(
            bin.exists(),
            "{} missing: build it (cargo build -p netbench)",
            bin.display()
        );
        // Members in node order; behind NAT the router joins under the node's name, so link
        // selectors keep naming nodes.
        let mut members = Vec::new();
        for n in &self.state.nodes {
            let Ok(iface) = n.interface(&net.name) else {
                continue;
            };
            let netns = n.router.as_ref().map_or(&n.netns, |r| &r.netns);
            members.push(format!(
                "{}={netns}:{}/{}",
                n.name, iface.wan_addr, net.subnet.len
            ));
        }
        let profile = topo.emulator_profile(net);
        let mut check = netbench::emulate::Config::from_profile(&profile)
            .with_context(|| format!("network {}", net.name))?;
        for m in &members {
            check.nodes.push(netbench::emulate::Node::parse(m)?);
        }
        check
            .fabric(0)
            .with_context(|| format!("network {}: links and schedule", net.name))?;
        let file = self.dir.join(format!("emulate-{}.toml", net.name));
        std::fs::write(&file, crate::topology::profile_toml(&profile))
            .with_context(|| format!("writing {}", file.display()))?;
        let control = self.state.networks[k].control.clone();
        let log_path = if k == 0 {
            self.dir.join("emulate.log")
        } else {
            self.dir.join(format!("emulate-{}.log", net.name))
        };
        let mut cmd = std::process::Command::new(&bin);
        cmd.args(["emulate", "run", "--ifname", &net.name]);
        cmd.arg("--profile").arg(&file);
        cmd.arg("--control").arg(&control);
        for m in &members {
            cmd.arg("--node").arg(m);
        }
        if let Some(p) = &spec.profile {
            cmd.arg("--default").arg(p);
        }
        let log = std::fs::File::create(&log_path)?;
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting netbench emulate for network {}", net.name))?;
        let pid = child.id();
        std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
        });
        self.state.networks[k].emulator_pid = Some(pid);
        if k == 0 {
            self.state.emulator_pid = Some(pid);
        }
        self.save()?;
        let ends: Vec<String> = self
            .state
            .nodes
            .iter()
            .filter(|n| n.interface(&net.name).is_ok())
            .map(|n| n.router.as_ref().map_or(&n.netns, |r| &r.netns).clone())
            .collect();
        for _ in 0..250 {
            let ready = ends.iter().all(|netns| {
                ns::exec(netns, &["ip", "-o", "addr", "show", "dev", &net.name])
                    .is_ok_and(|o| o.contains("inet "))
            });
            if ready && control.exists() {
                return Ok(());
            }
            if !process_alive(pid) {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("netbench emulate for network {} exited: {log}", net.name);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        bail!("network {} is not up after 5 s", net.name)
    }

    /// Whether the underlay is emulated by netbench.
    pub fn emulated(&self) -> bool {
        self.state.emulator_pid.is_some()
            || self.state.networks.iter().any(|n| n.emulator_pid.is_some())
    }

    /// The lab's underlay networks, in order (one `wan0` without a topology).
    pub fn networks(&self) -> &[NetworkInfo] {
        &self.state.networks
    }

    /// The control socket of a network's emulator.
    fn control(&self, network: &str) -> Result<PathBuf> {
        ensure!(
            self.emulated(),
            "delay, jitter, rate and profiles need an emulated underlay (mistlab up --profile ...)"
        );
        if self.state.networks.is_empty() {
            // A lab brought up before networks were recorded: its one emulator.
            return Ok(self.dir.join("emulate.sock"));
        }
        let net = self
            .state
            .networks
            .iter()
            .find(|n| n.name == network)
            .with_context(|| format!("no network {network} in lab {}", self.state.name))?;
        Ok(net.control.clone())
    }

    /// The first network's name (`wan0` without a topology).
    pub fn first_network(&self) -> &str {
        self.state
            .networks
            .first()
            .map_or(crate::topology::DEFAULT_NETWORK, |n| n.name.as_str())
    }

    /// Emulated underlay only: applies netbench link settings to the link between two nodes
    /// on the first network (both directions), e.g. `delay=80ms loss=2%`, `down`,
    /// `profile=satellite`.
    pub fn link_spec(&mut self, a: &str, b: &str, spec: &str) -> Result<()> {
        let net = self.first_network().to_owned();
        self.link_spec_on(&net, a, b, spec)
    }

    /// Emulated underlay only: applies netbench link settings to the link between two nodes
    /// on one network (both directions). Behind NAT the link is the router's.
    pub fn link_spec_on(&mut self, network: &str, a: &str, b: &str, spec: &str) -> Result<()> {
        let control = self.control(network)?;
        for n in [a, b] {
            let node = self.node(n)?;
            if !node.interfaces.is_empty() {
                node.interface(network)?;
            }
        }
        ensure!(a != b, "a link joins two different nodes");
        netbench::emulate::control_request(&control, &format!("set link={a}-{b} {spec}"))
            .with_context(|| format!("link {a}-{b} on network {network}"))?;
        Ok(())
    }

    /// Emulated underlay only: every link direction of a network with its counters and
    /// settings (`netbench emulate stats --json`).
    pub fn link_stats(&self, network: &str) -> Result<Value> {
        let control = self.control(network)?;
        let reply = netbench::emulate::control_request(&control, "stats")
            .with_context(|| format!("stats of network {network}"))?;
        serde_json::from_str(&reply).with_context(|| format!("stats of network {network}"))
    }

    /// Writes every node's mistnetd config: all other nodes are its peers.
    fn write_daemon_configs(&self) -> Result<()> {
        for n in &self.state.nodes {
            let text = daemon_config(
                n,
                &self.state.nodes,
                &self.state.networks,
                self.state.multi_underlay,
            );
            let path = n.dir.join("mistnetd.toml");
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    /// Starts (or restarts) a node's mistnetd; its log goes to `<node dir>/mistnetd.log`.
    pub fn start_daemon(&mut self, n: usize) -> Result<u32> {
        let node = &self.state.nodes[n];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("mistnetd.log"))?;
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &node.netns])
            .arg(self.state.bin_dir.join("mistnetd"))
            .arg("run")
            .arg("--config")
            .arg(node.dir.join("mistnetd.toml"))
            .env(
                "MISTNETD_LOG",
                std::env::var("MISTNETD_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting mistnetd on {}", node.name))?;
        // `ip netns exec` execs the daemon, so the child is the daemon itself. A thread reaps
        // it so a daemon that exits never lingers as a zombie.
        let pid = child.id();
        std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
        });
        self.state.nodes[n].daemon_pid = Some(pid);
        self.save()?;
        Ok(pid)
    }

    /// Stops a node's mistnetd (SIGTERM, then SIGKILL).
    pub fn stop_daemon(&mut self, node: &str) -> Result<()> {
        let i = self.node_index(node)?;
        if let Some(pid) = self.state.nodes[i].daemon_pid.take() {
            stop_process(pid, &self.state.name);
        }
        self.save()
    }

    /// Kills a node's mistnetd hard, as a crash would (no cleanup).
    pub fn kill_daemon(&mut self, node: &str) -> Result<()> {
        let i = self.node_index(node)?;
        if let Some(pid) = self.state.nodes[i].daemon_pid
            && let Ok(pid_i) = i32::try_from(pid)
        {
            // SAFETY: a pid this lab started and recorded.
            unsafe { libc::kill(pid_i, libc::SIGKILL) };
            for _ in 0..100 {
                if !process_alive(pid) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        Ok(())
    }

    /// Restarts a node's mistnetd and waits until it is ready.
    pub fn restart_daemon(&mut self, node: &str) -> Result<()> {
        let i = self.node_index(node)?;
        self.stop_daemon(node)?;
        let _ = std::fs::remove_file(self.state.nodes[i].dir.join("mistnetd.sock"));
        self.start_daemon(i)?;
        self.wait_ready(i)
    }

    fn node_index(&self, node: &str) -> Result<usize> {
        self.state
            .nodes
            .iter()
            .position(|n| n.name == node)
            .with_context(|| format!("no node {node}"))
    }

    /// Waits until a node's daemon answers on its API socket.
    fn wait_ready(&self, n: usize) -> Result<()> {
        let node = &self.state.nodes[n];
        let sock = node.dir.join("mistnetd.sock");
        for _ in 0..250 {
            if std::os::unix::net::UnixStream::connect(&sock).is_ok()
                && node.dir.join("node.json").exists()
            {
                return Ok(());
            }
            if let Some(pid) = node.daemon_pid
                && !process_alive(pid)
            {
                bail!("mistnetd on {} exited during start-up", node.name);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        bail!("mistnetd on {} not ready after 5 s", node.name)
    }

    /// A node's `mistnetd status --json` document.
    pub fn daemon_status(&self, node: &str) -> Result<Value> {
        let n = self.node(node)?;
        let mut conn = std::os::unix::net::UnixStream::connect(n.dir.join("mistnetd.sock"))
            .with_context(|| format!("mistnetd on {node} is not answering"))?;
        std::io::Write::write_all(&mut conn, b"status\n")?;
        let mut text = String::new();
        std::io::Read::read_to_string(&mut conn, &mut text)?;
        Ok(serde_json::from_str(&text)?)
    }

    fn install_routes(&self) -> Result<()> {
        match self.state.overlay {
            Overlay::Mistnet => {}
            Overlay::Routed => {
                // Over the first network; nodes not on it get no routes.
                let net = self.first_network();
                for a in &self.state.nodes {
                    for b in &self.state.nodes {
                        if a.name == b.name {
                            continue;
                        }
                        let via = match b.interfaces.is_empty() {
                            true => b.underlay,
                            false => match b.wan_addr(net) {
                                Ok(v) => v,
                                Err(_) => continue,
                            },
                        };
                        for cidr in &b.pod_cidrs {
                            if cidr.contains(':') {
                                continue;
                            }
                            ns::exec(
                                &a.netns,
                                &[
                                    "ip",
                                    "route",
                                    "replace",
                                    cidr,
                                    "via",
                                    &via.to_string(),
                                    "dev",
                                    net,
                                ],
                            )?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Sets the impairment of the underlay link between two nodes (both directions), on the
    /// first network.
    ///
    /// Links are emulated in the lab's WAN namespace with an nftables bridge filter: loss is a
    /// per-packet random drop, a cut drops everything. (Delay, jitter, rate and burst loss need
    /// netbench's emulator, which has no kernel netem to lean on; see docs/lab.md.)
    pub fn link_set(&mut self, a: &str, b: &str, imp: LinkImpairment) -> Result<()> {
        anyhow::ensure!(
            (0.0..=100.0).contains(&imp.loss_pct),
            "loss must be 0..=100 %"
        );
        self.node(a)?;
        self.node(b)?;
        anyhow::ensure!(a != b, "a link joins two different nodes");
        let key = link_key(a, b);
        if imp == LinkImpairment::default() {
            self.state.links.remove(&key);
        } else {
            self.state.links.insert(key, imp);
        }
        if self.emulated() {
            let spec = if imp.down {
                "down".to_owned()
            } else {
                format!("up loss={}%", imp.loss_pct)
            };
            let net = self.first_network().to_owned();
            self.link_spec_on(&net, a, b, &spec)?;
        } else {
            self.apply_links()?;
        }
        self.save()
    }

    /// Current link impairments, keyed `a-b`.
    pub fn links(&self) -> &BTreeMap<String, LinkImpairment> {
        &self.state.links
    }

    fn apply_links(&self) -> Result<()> {
        let mut rules = String::new();
        for (key, imp) in &self.state.links {
            let Some((a, b)) = key.split_once('-') else {
                continue;
            };
            let (ia, ib) = (self.node(a)?.underlay, self.node(b)?.underlay);
            for (s, d) in [(ia, ib), (ib, ia)] {
                if imp.down || imp.loss_pct >= 100.0 {
                    rules.push_str(&format!("    ip saddr {s} ip daddr {d} counter drop\n"));
                } else if imp.loss_pct > 0.0 {
                    // Per-million resolution.
                    let threshold = (imp.loss_pct * 10_000.0).round() as u64;
                    rules.push_str(&format!(
                        "    ip saddr {s} ip daddr {d} numgen random mod 1000000 < {threshold} counter drop\n"
                    ));
                }
            }
        }
        let script = format!(
            "table bridge mistlab\ndelete table bridge mistlab\ntable bridge mistlab {{\n  chain forward {{\n    type filter hook forward priority 0; policy accept;\n{rules}  }}\n}}\n"
        );
        nft_apply(&self.state.wan_ns, &script)?;
        Ok(())
    }

    /// Creates a pod on a node through the node's conflist, as a container runtime would.
    pub fn add_pod(&mut self, node: &str, pod: &str) -> Result<PodInfo> {
        let n = self.node(node)?.clone();
        let name = format!("{node}-{pod}");
        ensure!(
            self.state.pods.iter().all(|p| p.name != name),
            "pod {name} exists"
        );
        let netns = format!("{}{name}", ns_prefix(&self.state.name));
        ns::add(&netns)?;
        let container_id = format!("{}-{name}", self.state.name);
        let list = ConfList::load(&n.dir.join("net.d/10-mistnet.conflist"))?;
        let result = match self
            .runtime(&n)
            .add(&list, &container_id, &ns::path(&netns), "eth0")
        {
            Ok(r) => r,
            Err(e) => {
                ns::del(&netns);
                return Err(e.context(format!("CNI ADD for pod {name}")));
            }
        };
        let ips = result["ips"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|ip| ip["address"].as_str())
                    .map(|s| s.split('/').next().unwrap_or(s).to_owned())
                    .collect()
            })
            .unwrap_or_default();
        let info = PodInfo {
            name,
            node: node.to_owned(),
            netns,
            container_id,
            ips,
            result,
        };
        self.state.pods.push(info.clone());
        self.save()?;
        Ok(info)
    }

    /// Deletes a pod through CNI DEL and removes its namespace.
    pub fn del_pod(&mut self, name: &str) -> Result<()> {
        let Some(i) = self.state.pods.iter().position(|p| p.name == name) else {
            bail!("no pod {name}");
        };
        let pod = self.state.pods.remove(i);
        let n = self.node(&pod.node)?.clone();
        let list = ConfList::load(&n.dir.join("net.d/10-mistnet.conflist"))?;
        let res = self.runtime(&n).del(
            &list,
            &pod.container_id,
            &ns::path(&pod.netns),
            "eth0",
            Some(&pod.result),
        );
        ns::del(&pod.netns);
        self.save()?;
        res
    }

    fn runtime(&self, node: &NodeInfo) -> Runtime {
        Runtime {
            node_ns: node.netns.clone(),
            cni_path: vec![self.state.bin_dir.clone(), PathBuf::from("/usr/lib/cni")],
        }
    }

    /// Opens a lab that is up (for `status`, `exec`, ...). The lab stays up when dropped.
    pub fn open(name: &str) -> Result<Lab> {
        validate_name(name)?;
        let dir = state_dir(name);
        let path = dir.join("lab.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("no lab {name} ({} missing)", path.display()))?;
        let state: LabState =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Ok(Lab {
            state,
            dir,
            down_on_drop: false,
        })
    }

    /// Keeps the lab up when this handle is dropped.
    pub fn keep(mut self) {
        self.down_on_drop = false;
    }

    fn save(&self) -> Result<()> {
        let path = self.dir.join("lab.json");
        let tmp = self.dir.join(".lab.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.state)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// The lab's name.
    pub fn name(&self) -> &str {
        &self.state.name
    }

    /// The lab's nodes.
    pub fn nodes(&self) -> &[NodeInfo] {
        &self.state.nodes
    }

    /// The lab's pods.
    pub fn pods(&self) -> &[PodInfo] {
        &self.state.pods
    }

    /// A node by name.
    pub fn node(&self, name: &str) -> Result<&NodeInfo> {
        self.state
            .nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name} in lab {}", self.state.name))
    }

    /// A pod by name (`n1-p1`).
    pub fn pod(&self, name: &str) -> Result<&PodInfo> {
        self.state
            .pods
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("no pod {name} in lab {}", self.state.name))
    }

    /// The namespace of a node or pod.
    pub fn netns_of(&self, target: &str) -> Result<String> {
        if let Ok(p) = self.pod(target) {
            return Ok(p.netns.clone());
        }
        if let Some(r) = self
            .state
            .nodes
            .iter()
            .filter_map(|n| n.router.as_ref())
            .find(|r| r.name == target)
        {
            return Ok(r.netns.clone());
        }
        Ok(self.node(target)?.netns.clone())
    }

    /// The NAT router in front of a node.
    pub fn router(&self, node: &str) -> Result<&RouterInfo> {
        self.node(node)?
            .router
            .as_ref()
            .with_context(|| format!("node {node} is not behind NAT"))
    }

    /// Runs a command in the NAT router in front of a node (same as `exec("n1r", ..)`).
    pub fn exec_router(&self, node: &str, argv: &[&str]) -> Result<Output> {
        ns::output(&mut ns::command(&self.router(node)?.netns, argv))
    }

    /// Runs a command in a node, a pod or a NAT router (`n1r`) and returns its output (whatever
    /// its status).
    pub fn exec(&self, target: &str, argv: &[&str]) -> Result<Output> {
        ns::output(&mut ns::command(&self.netns_of(target)?, argv))
    }

    /// Whether `from` (a node or pod) gets ping replies from `to_ip`.
    pub fn ping(&self, from: &str, to_ip: &str, count: u32) -> Result<bool> {
        let fam = if to_ip.contains(':') { "-6" } else { "-4" };
        let out = self.exec(
            from,
            &[
                "ping",
                fam,
                "-c",
                &count.to_string(),
                "-i",
                "0.2",
                "-W",
                "1",
                to_ip,
            ],
        )?;
        Ok(out.status.success())
    }

    /// A status document: nodes, pods, addresses.
    pub fn status(&self) -> Value {
        let nodes: Vec<Value> = self
            .state
            .nodes
            .iter()
            .map(|n| {
                let alive = n.daemon_pid.map(process_alive);
                let peers = self
                    .daemon_status(&n.name)
                    .ok()
                    .map(|d| d["peers"].clone())
                    .unwrap_or(Value::Null);
                json!({"name": n.name, "netns": n.netns, "underlay": n.underlay.to_string(),
                       "zone": n.zone, "interfaces": n.interfaces, "router": n.router,
                       "podCidrs": n.pod_cidrs, "daemonPid": n.daemon_pid, "daemonAlive": alive,
                       "peers": peers})
            })
            .collect();
        let pods: Vec<Value> = self
            .state
            .pods
            .iter()
            .map(|p| json!({"name": p.name, "node": p.node, "netns": p.netns, "ips": p.ips}))
            .collect();
        let networks: Vec<Value> = self
            .state
            .networks
            .iter()
            .map(|n| {
                json!({"name": n.name, "subnet": n.subnet, "cost": n.cost, "metered": n.metered,
                       "emulatorPid": n.emulator_pid,
                       "emulatorAlive": n.emulator_pid.map(process_alive)})
            })
            .collect();
        json!({"lab": self.state.name, "overlay": self.state.overlay, "nodes": nodes, "pods": pods,
               "underlay": if self.emulated() { "netbench emulate" } else { "bridge" },
               "networks": networks, "links": self.state.links})
    }

    /// Every node's daemon log, for failing tests.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for n in &self.state.nodes {
            let path = n.dir.join("mistnetd.log");
            if let Ok(text) = std::fs::read_to_string(&path) {
                out.push_str(&format!("----- {} mistnetd log -----\n{text}\n", n.name));
            }
        }
        out
    }

    /// Tears the lab down (see [`Lab::down_by_name`]).
    pub fn down(mut self) -> Result<DownReport> {
        self.down_on_drop = false;
        Lab::down_by_name(&self.state.name)
    }

    /// Tears down a lab by name: stops the processes it started, DELs its pods, removes its
    /// namespaces and state. Works on half-built labs and labs whose processes died; running it
    /// twice is fine.
    pub fn down_by_name(name: &str) -> Result<DownReport> {
        validate_name(name)?;
        let mut report = DownReport::default();
        let dir = state_dir(name);
        if let Ok(lab) = Lab::open(name) {
            let mut emulators: Vec<u32> = lab
                .state
                .networks
                .iter()
                .filter_map(|n| n.emulator_pid)
                .collect();
            emulators.extend(lab.state.emulator_pid);
            emulators.sort_unstable();
            emulators.dedup();
            for pid in emulators {
                if stop_process(pid, &lab.state.name) {
                    report.processes.push(pid);
                }
            }
            for n in &lab.state.nodes {
                if let Some(pid) = n.daemon_pid
                    && stop_process(pid, &lab.state.name)
                {
                    report.processes.push(pid);
                }
            }
            // CNI DEL for each pod so the plugin's store and the node stay consistent even if a
            // namespace somehow survives.
            for p in &lab.state.pods {
                if let Ok(n) = lab.node(&p.node)
                    && let Ok(list) = ConfList::load(&n.dir.join("net.d/10-mistnet.conflist"))
                {
                    let _ = lab.runtime(n).del(
                        &list,
                        &p.container_id,
                        &ns::path(&p.netns),
                        "eth0",
                        Some(&p.result),
                    );
                }
            }
        }
        // Pods first, then nodes, then the WAN: every namespace with the lab's prefix.
        let mut names = ns::list(&ns_prefix(name));
        names.sort_by_key(|n| std::cmp::Reverse(n.len()));
        for n in names {
            ns::del(&n);
            report.namespaces.push(n);
        }
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
            report.state_dir_removed = true;
        }
        Ok(report)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.down_on_drop
            && let Err(e) = Lab::down_by_name(&self.state.name)
        {
            warn!(error = %e, lab = %self.state.name, "teardown failed");
        }
    }
}

fn link_key(a: &str, b: &str) -> String {
    if a < b {
        format!("{a}-{b}")
    } else {
        format!("{b}-{a}")
    }
}

fn ns_prefix(lab: &str) -> String {
    format!("{NS_PREFIX}{lab}-")
}

/// Whether a process exists (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

/// Stops a process the lab started: only if its command line names this lab's state
/// directory, so a recycled PID is never killed.
fn stop_process(pid: u32, lab: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let marker = state_dir(lab).display().to_string();
    if !String::from_utf8_lossy(&cmdline).contains(&marker) {
        return false;
    }
    let Ok(pid_i) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: kill on a pid verified above to be ours.
    unsafe { libc::kill(pid_i, libc::SIGTERM) };
    for _ in 0..50 {
        if !process_alive(pid) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid_i, libc::SIGKILL) };
    true
}

/// A node's mistnetd.toml. With named networks (`multi`): one `[[underlay]]` per network and
/// the zone; without, the single-underlay keys. A NATed peer without a port forward has no
/// endpoint (it is reached once it sends); a NATed node keeps its mappings open with a 5 s
/// keepalive.
pub fn daemon_config(
    n: &NodeInfo,
    nodes: &[NodeInfo],
    networks: &[NetworkInfo],
    multi: bool,
) -> String {
    let mut t = String::new();
    t.push_str(&format!("node_name = \"{}\"\n", n.name));
    if multi && let Some(z) = &n.zone {
        t.push_str(&format!("zone = \"{z}\"\n"));
    }
    t.push_str(&format!(
        "private_key_file = \"{}\"\n",
        n.dir.join("private.key").display()
    ));
    t.push_str(&format!("pod_cidrs = {:?}\n", n.pod_cidrs));
    if !multi {
        t.push_str("underlay_interfaces = [\"wan0\"]\n");
    }
    t.push_str(&format!(
        "node_state_file = \"{}\"\n",
        n.dir.join("node.json").display()
    ));
    t.push_str(&format!(
        "api_socket = \"{}\"\n",
        n.dir.join("mistnetd.sock").display()
    ));
    if multi {
        for iface in &n.interfaces {
            let Some(net) = networks.iter().find(|x| x.name == iface.network) else {
                continue;
            };
            t.push_str("\n[[underlay]]\n");
            t.push_str(&format!("interface = \"{}\"\n", net.name));
            t.push_str(&format!("port = {WG_PORT}\n"));
            t.push_str(&format!("cost = {}\n", net.cost));
            t.push_str(&format!("metered = {}\n", net.metered));
        }
    }
    let keepalive = if n.router.is_some() { 5 } else { 10 };
    for p in nodes {
        if p.name == n.name {
            continue;
        }
        let endpoints: Vec<String> = match &p.router {
            Some(r) if !r.port_forward => Vec::new(),
            Some(_) | None if p.interfaces.is_empty() => vec![format!("{}:{WG_PORT}", p.underlay)],
            Some(_) | None => p
                .interfaces
                .iter()
                .map(|i| format!("{}:{WG_PORT}", i.wan_addr))
                .collect(),
        };
        t.push_str("\n[[peers]]\n");
        t.push_str(&format!("name = \"{}\"\n", p.name));
        t.push_str(&format!(
            "public_key = \"{}\"\n",
            p.public_key.as_deref().unwrap_or_default()
        ));
        t.push_str(&format!("endpoints = {endpoints:?}\n"));
        t.push_str(&format!("pod_cidrs = {:?}\n", p.pod_cidrs));
        t.push_str(&format!("persistent_keepalive = {keepalive}\n"));
    }
    t
}

/// The node state mistnetd would publish, for labs without a daemon.
fn write_node_state(n: &NodeInfo) -> Result<()> {
    let node_state =
        json!({"version": 1, "nodeName": n.name, "podCidrs": n.pod_cidrs, "mtu": UNDERLAY_MTU});
    let path = n.dir.join("node.json");
    std::fs::write(&path, node_state.to_string())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The router's and the node's address on the link for network `k` of NATed node `i`:
/// 192.168.i.0/24 for the first network, 172.(15+k).i.0/24 for the others.
fn lan_addrs(i: usize, k: usize) -> Result<(Ipv4Addr, Ipv4Addr)> {
    let i = u8::try_from(i).context("node index")?;
    let (a, b) = if k == 0 {
        (192, 168)
    } else {
        (172, 15 + u8::try_from(k).context("network index")?)
    };
    Ok((Ipv4Addr::new(a, b, i, 1), Ipv4Addr::new(a, b, i, 2)))
}

/// Loads an nftables script into a namespace.
fn nft_apply(netns: &str, script: &str) -> Result<()> {
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running nft in {netns}"))?;
    std::io::Write::write_all(
        child.stdin.as_mut().context("nft stdin")?,
        script.as_bytes(),
    )?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "nft in {netns}: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
