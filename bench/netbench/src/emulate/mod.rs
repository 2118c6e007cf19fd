//! `netbench emulate`: joins network namespaces through emulated links (no netem needed).
//!
//! Design: the emulator runs its forwarding thread in a private network namespace of its own.
//! For every node it creates a veth pair there, moves one end into the node's namespace (with
//! the node's addresses) and keeps the other, on which it reads and writes raw Ethernet frames
//! with an `AF_PACKET` socket. Frames go through [`fabric::Fabric`], a learning switch whose
//! every ordered pair of ports is one emulated link direction ([`impair`]).
//!
//! Why veth + AF_PACKET rather than TUN: the nodes see an ordinary Ethernet interface (ARP,
//! IPv6 ND, any protocol) on one shared subnet, as on a real LAN/WAN edge, and a veth can be
//! moved into a namespace before it carries addresses. Why a private namespace: the emulator's
//! ends never appear on the host, their names cannot clash, and when the emulator stops (or
//! dies) the kernel deletes the namespace, which deletes every veth pair it made, so nothing
//! leaks. TX checksum offload is turned off on the veths: a frame captured with a partial
//! checksum would arrive corrupt once re-sent, and offload off also turns off TSO, so the
//! emulator only sees MTU-sized frames and per-packet impairments mean what they say.

pub mod fabric;
pub mod impair;
pub mod profile;
mod sys;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};

pub use fabric::{Fabric, LinkStats, ScheduledChange};
pub use impair::Params;
pub use profile::{PRESETS, ProfileFile, preset};

/// One namespace to join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Name used in link selectors (`n1-n2`).
    pub name: String,
    /// Network namespace name (`ip netns`).
    pub netns: String,
    /// Addresses with prefix length, e.g. `10.99.0.1/24`.
    pub addrs: Vec<String>,
    /// Interface name in the namespace.
    pub ifname: String,
    pub mtu: u32,
}

impl Node {
    /// Parses `NAME=NETNS[:ADDR/LEN[,ADDR/LEN...]]`; e.g. `n1=lab-n1:10.99.0.1/24`.
    pub fn parse(s: &str) -> Result<Self> {
        let (name, rest) = s
            .split_once('=')
            .with_context(|| format!("node {s:?}: expected NAME=NETNS[:ADDR/LEN,...]"))?;
        let (netns, addrs) = rest.split_once(':').unwrap_or((rest, ""));
        if name.is_empty() || netns.is_empty() || name.contains(['-', '>', '*', ',']) {
            bail!(
                "node {s:?}: name must be non-empty without -, >, *, ',' and the namespace given"
            );
        }
        Ok(Self {
            name: name.to_owned(),
            netns: netns.to_owned(),
            addrs: addrs
                .split(',')
                .filter(|a| !a.is_empty())
                .map(str::to_owned)
                .collect(),
            ifname: "nb0".to_owned(),
            mtu: 1500,
        })
    }
}

/// Everything the emulator needs to start.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub nodes: Vec<Node>,
    /// Settings of every link not named in `links`.
    pub default: Params,
    /// `(selector, params)`, applied in order on top of `default`.
    pub links: Vec<(String, Params)>,
    pub schedule: Vec<ScheduledChange>,
    pub seed: u64,
    /// Where to listen for `set`/`stats` commands.
    pub control: Option<PathBuf>,
}

impl Config {
    /// Builds a config from a profile file's nodes, links and schedule.
    pub fn from_profile(f: &ProfileFile) -> Result<Self> {
        let mut c = Config {
            seed: f.seed.unwrap_or(1),
            ..Config::default()
        };
        if let Some(d) = &f.default {
            c.default = f.resolve(d)?;
        }
        for (name, n) in &f.nodes {
            let mut node = Node::parse(&format!("{name}={}", n.netns))?;
            node.addrs.clone_from(&n.addrs);
            if let Some(i) = &n.ifname {
                node.ifname.clone_from(i);
            }
            node.mtu = n.mtu.unwrap_or(1500);
            c.nodes.push(node);
        }
        for (sel, spec) in &f.links {
            c.links.push((sel.clone(), f.resolve(spec)?));
        }
        for s in &f.schedule {
            let text = match &s.every {
                Some(e) => format!("{}/{} {} {}", s.at, e, s.link, s.set),
                None => format!("{} {} {}", s.at, s.link, s.set),
            };
            c.schedule.push(ScheduledChange::parse(&text)?);
        }
        Ok(c)
    }

    /// The fabric this config describes, at `now_ns`; validates selectors.
    pub fn fabric(&self, now_ns: u64) -> Result<Fabric> {
        if self.nodes.len() < 2 {
            bail!("the emulator needs at least two nodes");
        }
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        for (i, n) in names.iter().enumerate() {
            if names[..i].contains(n) {
                bail!("node {n:?} given twice");
            }
        }
        let mut f = Fabric::new(names, self.default, self.seed, now_ns);
        for (i, n) in self.nodes.iter().enumerate() {
            f.set_port_mtu(i, n.mtu);
        }
        for (sel, p) in &self.links {
            f.replace(sel, *p)?;
        }
        for s in &self.schedule {
            f.add_schedule(s.clone())?;
        }
        Ok(f)
    }
}

enum Cmd {
    Set {
        links: String,
        spec: String,
        reply: mpsc::Sender<Result<usize>>,
    },
    Stats {
        reply: mpsc::Sender<Vec<LinkStats>>,
    },
    Stop,
}

/// A running emulator; stops (and removes its interfaces) on drop.
pub struct Emulator {
    tx: mpsc::Sender<Cmd>,
    waker: UnixStream,
    thread: Option<JoinHandle<Result<()>>>,
    control: Option<PathBuf>,
}

impl Emulator {
    /// Creates the interfaces and starts forwarding. Needs CAP_NET_ADMIN and CAP_SYS_ADMIN.
    pub fn start(config: Config) -> Result<Self> {
        config.fabric(0)?;
        let (tx, rx) = mpsc::channel();
        let (waker, wake_rx) = UnixStream::pair().context("socketpair")?;
        let (ready_tx, ready_rx) = mpsc::channel();
        let cfg = config.clone();
        let thread = std::thread::Builder::new()
            .name("emulate".into())
            .spawn(move || sys::run(cfg, rx, wake_rx, ready_tx))
            .context("spawning the emulator thread")?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let res = thread.join();
                return match res {
                    Ok(Err(e)) => Err(e),
                    Ok(Ok(())) | Err(_) => {
                        Err(anyhow::anyhow!("emulator thread stopped during setup"))
                    }
                };
            }
        }
        let mut emu = Self {
            tx,
            waker,
            thread: Some(thread),
            control: None,
        };
        if let Some(path) = &config.control {
            emu.serve_control(path)?;
        }
        Ok(emu)
    }

    /// Applies a spec to the selected links (see [`Fabric::set`]).
    pub fn set(&self, links: &str, spec: &str) -> Result<usize> {
        let (reply, rx) = mpsc::channel();
        self.send(Cmd::Set {
            links: links.to_owned(),
            spec: spec.to_owned(),
            reply,
        })?;
        rx.recv().context("emulator stopped")?
    }

    /// Per-direction statistics.
    pub fn stats(&self) -> Result<Vec<LinkStats>> {
        let (reply, rx) = mpsc::channel();
        self.send(Cmd::Stats { reply })?;
        rx.recv().context("emulator stopped")
    }

    /// Blocks until the forwarding thread ends (it ends only on error or `stop`).
    pub fn wait(mut self) -> Result<()> {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => bail!("emulator thread panicked"),
            None => Ok(()),
        }
    }

    /// Stops forwarding and removes the interfaces.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        let _ = self.send(Cmd::Stop);
        if let Some(p) = self.control.take() {
            let _ = std::fs::remove_file(p);
        }
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) => bail!("emulator thread panicked"),
            None => Ok(()),
        }
    }

    fn send(&self, cmd: Cmd) -> Result<()> {
        self.tx.send(cmd).ok().context("emulator stopped")?;
        (&self.waker)
            .write_all(&[1])
            .context("waking the emulator")?;
        Ok(())
    }

    /// Serves `set LINKS SPEC...` and `stats` lines on a unix socket, one command per
    /// connection, replying with one line (`ok N` / `error: ...` / JSON stats).
    fn serve_control(&mut self, path: &Path) -> Result<()> {
        if path.exists() {
            // A stale socket from a dead emulator; a live one would still accept.
            if UnixStream::connect(path).is_ok() {
                bail!("another emulator listens on {}", path.display());
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale {}", path.display()))?;
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("binding control socket {}", path.display()))?;
        let tx = self.tx.clone();
        let waker = self.waker.try_clone().context("cloning waker")?;
        std::thread::Builder::new()
            .name("emulate-control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    if handle_control(conn, &tx, &waker).is_err() {
                        tracing::debug!("control connection failed");
                    }
                }
            })
            .context("spawning the control thread")?;
        self.control = Some(path.to_owned());
        Ok(())
    }
}

impl std::ops::Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

fn handle_control(conn: UnixStream, tx: &mpsc::Sender<Cmd>, waker: &UnixStream) -> Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(&conn).take(64 * 1024).read_line(&mut line)?;
    let mut words = line.split_whitespace();
    let reply = match words.next() {
        Some("set") => {
            let args: Vec<&str> = words.collect();
            match parse_set_args(&args) {
                Ok((links, spec)) => {
                    let (rtx, rrx) = mpsc::channel();
                    tx.send(Cmd::Set {
                        links,
                        spec,
                        reply: rtx,
                    })
                    .ok()
                    .context("emulator stopped")?;
                    (&*waker).write_all(&[1])?;
                    match rrx.recv()? {
                        Ok(n) => format!("ok {n}"),
                        Err(e) => format!("error: {e:#}"),
                    }
                }
                Err(e) => format!("error: {e:#}"),
            }
        }
        Some("stats") => {
            let (rtx, rrx) = mpsc::channel();
            tx.send(Cmd::Stats { reply: rtx })
                .ok()
                .context("emulator stopped")?;
            (&*waker).write_all(&[1])?;
            serde_json::to_string(&rrx.recv()?)?
        }
        _ => "error: expected `set link=LINKS SETTINGS...` or `stats`".to_owned(),
    };
    (&conn).write_all(format!("{reply}\n").as_bytes())?;
    Ok(())
}

use std::io::Read as _;

/// Splits `link=SEL` from the settings in `set` arguments.
pub fn parse_set_args(args: &[&str]) -> Result<(String, String)> {
    let mut links = None;
    let mut spec = Vec::new();
    for a in args {
        match a.strip_prefix("link=").or_else(|| a.strip_prefix("links=")) {
            Some(l) => links = Some(l.to_owned()),
            None => spec.push(*a),
        }
    }
    let links =
        links.context("missing link=NAME (e.g. link=n1-n2, link=n1>n2, link=n1-*, link=*)")?;
    if spec.is_empty() {
        bail!("nothing to set (e.g. loss=10% delay=50ms, down, up)");
    }
    let spec = spec.join(" ");
    profile::apply(Params::default(), &spec)?;
    Ok((links, spec))
}

/// Sends one command line to a running emulator's control socket and returns its reply.
pub fn control_request(path: &Path, line: &str) -> Result<String> {
    let mut s = UnixStream::connect(path).with_context(|| {
        format!(
            "cannot reach the emulator's control socket {} (is `netbench emulate run` running?)",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply)?;
    let reply = reply.trim_end().to_owned();
    if let Some(e) = reply.strip_prefix("error: ") {
        bail!("emulator: {e}");
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn nodes_and_set_args_parse() {
        let n = Node::parse("n1=lab-n1:10.0.0.1/24,fd00::1/64").unwrap();
        assert_eq!(n.netns, "lab-n1");
        assert_eq!(n.addrs, vec!["10.0.0.1/24", "fd00::1/64"]);
        assert!(Node::parse("n-1=x").is_err());
        assert!(Node::parse("n1").is_err());
        let (l, s) = parse_set_args(&["link=n1-n2", "loss=10%", "delay=50ms"]).unwrap();
        assert_eq!((l.as_str(), s.as_str()), ("n1-n2", "loss=10% delay=50ms"));
        assert!(parse_set_args(&["loss=10%"]).is_err());
        assert!(parse_set_args(&["link=a-b"]).is_err());
        assert!(parse_set_args(&["link=a-b", "loss=x"]).is_err());
    }

    #[test]
    fn config_from_profile_validates_links() {
        let f = ProfileFile::parse(
            "default = \"lte\"\n[nodes]\na = { netns = \"x\" }\nb = { netns = \"y\" }\n[links]\n\"a>b\" = \"delay=5ms\"\n[[schedule]]\nat = \"1s\"\nlink = \"a-b\"\nset = \"down\"\n",
        )
        .unwrap();
        let c = Config::from_profile(&f).unwrap();
        let fab = c.fabric(0).unwrap();
        let s = fab.stats();
        assert_eq!(s[0].settings, "delay=5ms");
        assert_eq!(s[1].settings, profile::describe(&preset("lte").unwrap()));
        let bad = ProfileFile::parse("[nodes]\na = { netns = \"x\" }\nb = { netns = \"y\" }\n[links]\n\"a-c\" = \"delay=5ms\"\n").unwrap();
        assert!(Config::from_profile(&bad).unwrap().fabric(0).is_err());
        assert!(Config::default().fabric(0).is_err());
    }
}
