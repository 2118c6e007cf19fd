//! mistnetd: the mistnet node agent.
//!
//! `run` brings up the overlay interface (`mist0`), its addresses and a route per remote pod
//! CIDR, writes the node state file the CNI plugin reads, and runs the WireGuard dataplane
//! (see `dataplane`). SIGHUP reloads peers without dropping sessions; SIGTERM/SIGINT remove the
//! routes and the device (pods' veths are left alone, and so is the node state file, so pods
//! keep being created while the daemon restarts).

mod api;
mod config;
mod control;
mod core;
mod dataplane;
mod keys;
mod metrics;
mod peers;
mod reorder;
mod repair;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use mistnet_cni::netlink::Netlink;
use mistnet_cni::node_state::NodeState;
use mistnet_overlay::Node;
use mistnet_path::{LocalInfo, Selector};
use tracing::{info, warn};

use crate::config::{Config, Mtu};

#[derive(Parser)]
#[command(
    name = "mistnetd",
    version,
    about = "mistnet node agent: userspace WireGuard overlay"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Write a new private key (mode 0600) and print its public key.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the public key of a private key file.
    Pubkey {
        #[arg(long)]
        key: PathBuf,
    },
    /// Print every metric of a running daemon (Prometheus text format).
    Metrics {
        #[arg(long, default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Show peers, endpoints, handshakes and counters of a running daemon.
    Status {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = api::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MISTNETD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match dispatch(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // `mistnetd status | head`: the reader left, which is no failure.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match cli.cmd {
        Cmd::Run { config } => run(&config),
        Cmd::Keygen { out: path } => {
            let k = keys::generate()?;
            keys::write_new(&path, &k)?;
            writeln!(out, "{}", keys::encode(&keys::public(&k)))?;
            Ok(())
        }
        Cmd::Pubkey { key } => {
            let k = keys::read(&key)?;
            writeln!(out, "{}", keys::encode(&keys::public(&k)))?;
            Ok(())
        }
        Cmd::Metrics { socket } => {
            write!(out, "{}", api::request(&socket, "metrics")?)?;
            Ok(())
        }
        Cmd::Status { json, socket } => {
            let doc = api::fetch(&socket)?;
            if json {
                writeln!(out, "{doc:#}")?;
            } else {
                print_status(&mut out, &doc)?;
            }
            Ok(())
        }
    }
}

fn print_status(out: &mut impl Write, doc: &serde_json::Value) -> Result<()> {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_owned();
    writeln!(
        out,
        "node {}  key {}  {} mtu {}  port {}",
        s(&doc["node"]),
        s(&doc["publicKey"]),
        s(&doc["interface"]),
        doc["mtu"],
        doc["listenPort"]
    )?;
    writeln!(
        out,
        "{:<10} {:<22} {:<12} {:>12} {:>12} {:>8}  {:<28} {:<9} reason",
        "peer", "endpoint", "handshake", "rx bytes", "tx bytes", "spoofed", "path", "mode"
    )?;
    for p in doc["peers"].as_array().into_iter().flatten() {
        let hs = p["latestHandshakeSecondsAgo"]
            .as_u64()
            .map_or("never".to_owned(), |s| format!("{s}s ago"));
        let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0).to_string();
        writeln!(
            out,
            "{:<10} {:<22} {:<12} {:>12} {:>12} {:>8}  {:<28} {:<9} {}",
            s(&p["name"]),
            s(&p["endpoint"]),
            hs,
            n(&p["rxBytes"]),
            n(&p["txBytes"]),
            n(&p["spoofedDrops"]),
            s(&p["paths"]["active"]),
            s(&p["paths"]["mode"]),
            s(&p["paths"]["reason"]),
        )?;
        for path in p["paths"]["paths"].as_array().into_iter().flatten() {
            let ms =
                |v: &serde_json::Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.1}"));
            writeln!(
                out,
                "    {:<30} {:<8} rtt {:>7} ms  jitter {:>6} ms  loss {:>5} %  cost {}",
                s(&path["path"]),
                s(&path["state"]),
                ms(&path["srttMs"]),
                ms(&path["jitterMs"]),
                ms(&path["lossPct"]),
                path["cost"],
            )?;
        }
    }
    let sync = &doc["sync"];
    if !sync.is_null() {
        writeln!(
            out,
            "control channel: {} records, {} tombstones, state {} bytes, hash {}",
            sync["records"],
            sync["tombstones"],
            sync["state_bytes"],
            s(&sync["state_hash"])
        )?;
        for o in sync["origins"].as_array().into_iter().flatten() {
            writeln!(
                out,
                "    {:<12} version {}{}",
                s(&o["name"]),
                o["version"],
                if o["deleted"].as_bool() == Some(true) {
                    " (deleted)"
                } else {
                    ""
                }
            )?;
        }
    }
    Ok(())
}

/// Blocks the signals the main thread waits for, so worker threads never receive them.
fn block_signals() -> libc::sigset_t {
    // SAFETY: plain sigset manipulation on a zeroed set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn run(config_path: &Path) -> Result<()> {
    let sigset = block_signals();
    let config = Config::load(config_path)?;
    let private = keys::load_or_create(&config.private_key_file)?;
    let public = keys::encode(&keys::public(&private));
    let mtu = match config.mtu {
        Mtu::Fixed(m) => m,
        Mtu::Auto => {
            let v6 = config
                .peers
                .iter()
                .any(|p| p.endpoints.iter().any(|e| e.is_ipv6()));
            let overhead = if v6 {
                config::OVERHEAD_V6
            } else {
                config::OVERHEAD_V4
            };
            // Relayed datagrams carry an envelope: pods must fit through a relay too.
            let relay = if config.paths.enabled && config.paths.relay {
                u32::try_from(mistnet_path::wire::RELAY_OVERHEAD).unwrap_or(64)
            } else {
                0
            };
            underlay_mtu(&config.underlay_interfaces).saturating_sub(overhead + relay)
        }
    };
    info!(node = %config.node_name, public_key = %public, mtu, "starting");

    let tun = tun_rs::DeviceBuilder::new()
        .name(config.interface.clone())
        .mtu(u16::try_from(mtu).context("mtu")?)
        .build_sync()
        .with_context(|| format!("creating TUN device {}", config.interface))?;
    let mut nl = Netlink::open().context("opening netlink")?;
    let index = nl
        .link_by_name(&config.interface)
        .with_context(|| format!("finding {}", config.interface))?
        .header
        .index;
    nl.set_link_up(index, Some(mtu))
        .context("bringing the overlay device up")?;
    for a in &config.tunnel_addresses {
        let prefix = if a.is_ipv4() { 32 } else { 128 };
        nl.add_address(index, *a, prefix)
            .with_context(|| format!("adding {a} to {}", config.interface))?;
    }
    enable_forwarding(&config);

    let socks = config
        .underlays
        .iter()
        .map(|u| dataplane::bind_udp(u.port, u.interface.as_deref()))
        .collect::<Result<Vec<_>>>()?;
    let now = Instant::now();
    let unix_time = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .context("the system clock is before 1970")?;
    let node = Node::new(private, now, unix_time);
    let selector = config.paths.enabled.then(|| {
        Selector::new(
            path_config(&config),
            core::short_id(&keys::public(&private)),
            keys::generate_seed(),
            now,
        )
    });
    let locals = config
        .underlays
        .iter()
        .enumerate()
        .filter_map(|(i, u)| {
            let id = dataplane::SockId::try_from(i).ok()?;
            let name = u
                .interface
                .clone()
                .unwrap_or_else(|| format!("udp{}", u.port));
            Some((
                id,
                name,
                LocalInfo {
                    cost: u.cost,
                    metered: u.metered,
                    probe_budget: u.probe_budget,
                },
            ))
        })
        .collect();
    let mut core = core::Core::new(node, selector, private, locals, config.paths.relay);
    core.set_control_port(config.sync.enabled.then_some(config.sync.port));
    core.set_repair(config.paths.repair);
    let shared = Arc::new(dataplane::Shared {
        core: Mutex::new(core),
        socks,
        tun,
        stopping: false.into(),
        observed: Mutex::new(BTreeSet::new()),
        sync_status: Mutex::new(None),
    });
    let reconciler = Arc::new(Mutex::new(peers::Reconciler::new(
        nl,
        index,
        config.node_name.clone(),
        config.peers.clone(),
    )));
    lock(&reconciler).apply(&shared)?;
    let facts = Arc::new(RwLock::new(api::NodeFacts {
        config: config.clone(),
        mtu,
        public_key: public,
    }));
    let deleter = api::spawn_deleter(config.interface.clone())?;
    api::serve(&config.api_socket, shared.clone(), facts.clone(), deleter)?;
    dataplane::spawn(&shared, config.workers)?;
    let control = if config.sync.enabled {
        Some(control::spawn(
            &config,
            &private,
            shared.clone(),
            reconciler.clone(),
        )?)
    } else {
        None
    };

    NodeState::new(config.node_name.clone(), config.pod_cidrs.clone(), mtu)
        .store(&config.node_state_file)
        .context("writing the node state file")?;
    info!(peers = config.peers.len(), "ready");

    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: sigwait on the set blocked above.
        let rc = unsafe { libc::sigwait(&sigset, &mut sig) };
        if rc != 0 {
            continue;
        }
        if sig == libc::SIGHUP {
            match reload(config_path, &shared, &facts, &reconciler) {
                Ok(n) => info!(peers = n, "reloaded"),
                Err(e) => warn!("reload failed, keeping the running config: {e:#}"),
            }
            continue;
        }
        info!(signal = sig, "stopping");
        shared.stopping.store(true, Ordering::Relaxed);
        if let Some(c) = control {
            c.stop();
        }
        let mut rec = lock(&reconciler);
        rec.remove_routes();
        rec.delete_link();
        let _ = std::fs::remove_file(&config.api_socket);
        return Ok(());
    }
}

/// Locks a mutex, taking over a poisoned one (the guarded state stays consistent between
/// calls: a panicking holder never leaves it half-changed).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The selector's settings from the config.
fn path_config(config: &Config) -> mistnet_path::Config {
    let p = &config.paths;
    let base = match p.preset {
        config::PathPreset::Default => mistnet_path::Config::default(),
        config::PathPreset::Frugal => mistnet_path::Config::frugal(),
    };
    let ms = |v: Option<u64>, default| v.map_or(default, std::time::Duration::from_millis);
    mistnet_path::Config {
        redundancy: match p.redundancy {
            config::Redundancy::Off => mistnet_path::Redundancy::Off,
            config::Redundancy::Auto => mistnet_path::Redundancy::Auto,
            config::Redundancy::Always => mistnet_path::Redundancy::Always,
        },
        relay_allowed: p.relay,
        serve_relay: p.relay,
        active_probe_interval: ms(p.active_probe_ms, base.active_probe_interval),
        standby_probe_interval: ms(p.standby_probe_ms, base.standby_probe_interval),
        silence_timeout: ms(p.silence_timeout_ms, base.silence_timeout),
        switch_hold: ms(p.switch_hold_ms, base.switch_hold),
        redundancy_enter_loss_pct: p
            .redundancy_enter_loss_pct
            .unwrap_or(base.redundancy_enter_loss_pct),
        redundancy_leave_loss_pct: p
            .redundancy_leave_loss_pct
            .unwrap_or(base.redundancy_leave_loss_pct),
        ..base
    }
}

fn reload(
    path: &Path,
    shared: &dataplane::Shared,
    facts: &RwLock<api::NodeFacts>,
    reconciler: &Mutex<peers::Reconciler>,
) -> Result<usize> {
    let new = Config::load(path)?;
    let old = facts
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .config
        .clone();
    if new.node_name != old.node_name
        || new.pod_cidrs != old.pod_cidrs
        || new.underlays != old.underlays
    {
        bail!("node_name, pod_cidrs and the underlays (listen ports) need a restart");
    }
    let n = {
        let mut rec = lock(reconciler);
        rec.set_configured(new.peers.clone());
        rec.apply(shared)?
    };
    facts
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .config = new;
    Ok(n)
}

/// The smallest MTU of the underlay interfaces (or of the default route's interface).
fn underlay_mtu(interfaces: &[String]) -> u32 {
    let mut names = interfaces.to_vec();
    if names.is_empty()
        && let Ok(routes) = std::fs::read_to_string("/proc/net/route")
    {
        names.extend(
            routes
                .lines()
                .skip(1)
                .filter(|l| l.split_whitespace().nth(1) == Some("00000000"))
                .filter_map(|l| l.split_whitespace().next().map(str::to_owned)),
        );
    }
    names
        .iter()
        .filter_map(|n| std::fs::read_to_string(format!("/sys/class/net/{n}/mtu")).ok())
        .filter_map(|s| s.trim().parse::<u32>().ok())
        .min()
        .unwrap_or(1500)
}

fn enable_forwarding(config: &Config) {
    let mut knobs = vec!["/proc/sys/net/ipv4/ip_forward"];
    if config.pod_cidrs.iter().any(|n| n.addr().is_ipv6()) {
        knobs.push("/proc/sys/net/ipv6/conf/all/forwarding");
    }
    for k in knobs {
        if let Err(e) = std::fs::write(k, "1") {
            warn!(knob = k, error = %e, "cannot enable forwarding");
        }
    }
}
