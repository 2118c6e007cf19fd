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
    /// Emulated underlay: a netbench profile file with per-link profiles and schedules.
    pub topology: Option<PathBuf>,
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
    pub underlay: Ipv4Addr,
    pub pod_cidrs: Vec<String>,
    pub dir: PathBuf,
    #[serde(default)]
    pub daemon_pid: Option<u32>,
    #[serde(default)]
    pub public_key: Option<String>,
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
        let emulated = spec.profile.is_some() || spec.topology.is_some();
        if !emulated {
            let wan = self.state.wan_ns.clone();
            ns::add(&wan)?;
            ns::exec(&wan, &["ip", "link", "add", "wan", "type", "bridge"])?;
            ns::exec(&wan, &["ip", "link", "set", "wan", "up"])?;
        }
        self.save()?;
        for i in 1..=spec.nodes {
            let node = self.add_node(i, spec.dual_stack, !emulated)?;
            self.state.nodes.push(node);
            self.save()?;
        }
        if emulated {
            self.start_emulator(spec)?;
        }
        match spec.overlay {
            Overlay::Routed => self.install_routes()?,
            Overlay::Mistnet => {
                self.write_daemon_configs()?;
                for n in 0..self.state.nodes.len() {
                    self.start_daemon(n)?;
                }
                self.save()?;
                for n in 0..self.state.nodes.len() {
                    self.wait_ready(n)?;
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

    fn add_node(&mut self, i: usize, dual_stack: bool, bridge: bool) -> Result<NodeInfo> {
        let name = format!("n{i}");
        let netns = format!("{}{name}", ns_prefix(&self.state.name));
        let dir = self.dir.join(&name);
        std::fs::create_dir_all(&dir)?;
        ns::add(&netns)?;
        let octet = u8::try_from(i).context("node index")?;
        let underlay = Ipv4Addr::new(10, 99, 0, octet);
        if bridge {
            self.bridge_underlay(&name, &netns, underlay)?;
        }
        let mut pod_cidrs = vec![format!("10.244.{i}.0/24")];
        if dual_stack {
            pod_cidrs.push(format!("fd00:10:244:{i:x}::/80"));
        }
        if self.state.overlay == Overlay::Routed {
            // Without an overlay daemon the lab publishes the node state itself.
            let node_state =
                json!({"version": 1, "nodeName": name, "podCidrs": pod_cidrs, "mtu": UNDERLAY_MTU});
            std::fs::write(dir.join("node.json"), node_state.to_string())?;
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
        Ok(NodeInfo {
            name,
            netns,
            underlay,
            pod_cidrs,
            dir,
            daemon_pid: None,
            public_key,
        })
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

    /// Underlay through `netbench emulate`: it creates wan0 in every node (with the node's
    /// underlay address) and emulates every node pair as a link.
    fn start_emulator(&mut self, spec: &LabSpec) -> Result<()> {
        let bin = self.state.bin_dir.join("netbench");
        ensure!(
            bin.exists(),
            "{} missing: build it (cargo build -p netbench)",
            bin.display()
        );
        let mut cmd = std::process::Command::new(&bin);
        cmd.args(["emulate", "run", "--ifname", "wan0", "--seed", "1"]);
        cmd.arg("--control").arg(self.dir.join("emulate.sock"));
        for n in &self.state.nodes {
            cmd.arg("--node")
                .arg(format!("{}={}:{}/24", n.name, n.netns, n.underlay));
        }
        if let Some(p) = &spec.profile {
            cmd.arg("--default").arg(p);
        }
        if let Some(t) = &spec.topology {
            cmd.arg("--profile").arg(t);
        }
        let log = std::fs::File::create(self.dir.join("emulate.log"))?;
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting netbench emulate")?;
        let pid = child.id();
        std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
        });
        self.state.emulator_pid = Some(pid);
        self.save()?;
        for _ in 0..250 {
            let ready = self.state.nodes.iter().all(|n| {
                ns::exec(&n.netns, &["ip", "-o", "addr", "show", "dev", "wan0"])
                    .is_ok_and(|o| o.contains("inet "))
            });
            if ready && self.dir.join("emulate.sock").exists() {
                return Ok(());
            }
            if !process_alive(pid) {
                let log = std::fs::read_to_string(self.dir.join("emulate.log")).unwrap_or_default();
                bail!("netbench emulate exited: {log}");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        bail!("the emulated underlay is not up after 5 s")
    }

    /// Whether the underlay is emulated by netbench.
    pub fn emulated(&self) -> bool {
        self.state.emulator_pid.is_some()
    }

    /// Emulated underlay only: applies netbench link settings to the link between two nodes
    /// (both directions), e.g. `delay=80ms loss=2%`, `down`, `profile=satellite`.
    pub fn link_spec(&mut self, a: &str, b: &str, spec: &str) -> Result<()> {
        ensure!(
            self.emulated(),
            "delay, jitter, rate and profiles need an emulated underlay (mistlab up --profile ...)"
        );
        self.node(a)?;
        self.node(b)?;
        netbench::emulate::control_request(
            &self.dir.join("emulate.sock"),
            &format!("set link={a}-{b} {spec}"),
        )?;
        Ok(())
    }

    /// Writes every node's mistnetd config: all other nodes are its peers.
    fn write_daemon_configs(&self) -> Result<()> {
        for n in &self.state.nodes {
            let mut t = String::new();
            t.push_str(&format!("node_name = \"{}\"\n", n.name));
            t.push_str(&format!(
                "private_key_file = \"{}\"\n",
                n.dir.join("private.key").display()
            ));
            t.push_str(&format!("pod_cidrs = {:?}\n", n.pod_cidrs));
            t.push_str("underlay_interfaces = [\"wan0\"]\n");
            t.push_str(&format!(
                "node_state_file = \"{}\"\n",
                n.dir.join("node.json").display()
            ));
            t.push_str(&format!(
                "api_socket = \"{}\"\n",
                n.dir.join("mistnetd.sock").display()
            ));
            for p in &self.state.nodes {
                if p.name == n.name {
                    continue;
                }
                t.push_str("\n[[peers]]\n");
                t.push_str(&format!("name = \"{}\"\n", p.name));
                t.push_str(&format!(
                    "public_key = \"{}\"\n",
                    p.public_key.as_deref().unwrap_or_default()
                ));
                t.push_str(&format!("endpoints = [\"{}:51820\"]\n", p.underlay));
                t.push_str(&format!("pod_cidrs = {:?}\n", p.pod_cidrs));
                t.push_str("persistent_keepalive = 10\n");
            }
            std::fs::write(n.dir.join("mistnetd.toml"), t)?;
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
                for a in &self.state.nodes {
                    for b in &self.state.nodes {
                        if a.name == b.name {
                            continue;
                        }
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
                                    &b.underlay.to_string(),
                                    "dev",
                                    "wan0",
                                ],
                            )?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Sets the impairment of the underlay link between two nodes (both directions).
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
            netbench::emulate::control_request(
                &self.dir.join("emulate.sock"),
                &format!("set link={a}-{b} {spec}"),
            )?;
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
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &self.state.wan_ns, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("running nft")?;
        std::io::Write::write_all(
            child.stdin.as_mut().context("nft stdin")?,
            script.as_bytes(),
        )?;
        let out = child.wait_with_output()?;
        anyhow::ensure!(
            out.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&out.stderr)
        );
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
        Ok(self.node(target)?.netns.clone())
    }

    /// Runs a command in a node or pod and returns its output (whatever its status).
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
        json!({"lab": self.state.name, "overlay": self.state.overlay, "nodes": nodes, "pods": pods,
               "underlay": if self.emulated() { "netbench emulate" } else { "bridge" },
               "links": self.state.links})
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
            if let Some(pid) = lab.state.emulator_pid
                && stop_process(pid, &lab.state.name)
            {
                report.processes.push(pid);
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
