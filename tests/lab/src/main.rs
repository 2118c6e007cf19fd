//! `mistlab`: run an N-node mistnet edge cluster on this machine.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mistlab::{Lab, LabSpec};

#[derive(Parser)]
#[command(
    name = "mistlab",
    version,
    about = "An N-node mistnet edge cluster in network namespaces"
)]
struct Cli {
    /// Lab name (1-8 lowercase letters/digits); every namespace and the state dir carry it.
    #[arg(long, global = true, default_value = "lab")]
    name: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Bring a lab up.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 2)]
        pods_per_node: usize,
        /// Give nodes IPv6 pod CIDRs too.
        #[arg(long)]
        dual_stack: bool,
        /// Emulate every underlay link with netbench: a preset (wifi-good, wifi-flaky, lte,
        /// lte-congested, satellite, partitioned) or a spec ("delay=20ms loss=1%").
        #[arg(long)]
        profile: Option<String>,
        /// Emulate the underlay from a topology file: networks (several interfaces per node),
        /// zones, NAT, per-link profiles, schedules (docs/lab.md).
        #[arg(long)]
        topology: Option<std::path::PathBuf>,
        /// Do not start mistnetd (the lab's wiring only; configs are still written).
        #[arg(long)]
        no_daemons: bool,
    },
    /// Show nodes, pods and their addresses.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Run a command in a node, a pod or a NAT router (`n1r`): `mistlab exec n1-p1 -- ping ...`.
    Exec {
        target: String,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Change an underlay link: `mistlab link set n1 n2 loss=10%`, `... down`, `... up`.
    Link {
        #[command(subcommand)]
        cmd: LinkCmd,
    },
    /// Tear a lab down (idempotent; also cleans up a lab whose processes died).
    Down,
    /// A narrated tour: 3 nodes, 2 pods each, a degraded and a cut link, then teardown.
    Demo,
}

#[derive(Subcommand)]
enum LinkCmd {
    /// Set a link's state: `loss=PCT%`, `down`, or `up` (clears every impairment); with an
    /// emulated underlay any netbench setting (`delay=80ms jitter=10ms rate=5mbit profile=lte`).
    Set {
        a: String,
        b: String,
        /// The network (emulated underlay); default: the first one.
        #[arg(long)]
        network: Option<String>,
        #[arg(required = true)]
        settings: Vec<String>,
    },
    /// Show the links of every network (emulated: every direction with its settings and
    /// counters; bridge: impaired links).
    Show,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MISTLAB_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mistlab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match cli.cmd {
        Cmd::Up {
            nodes,
            pods_per_node,
            dual_stack,
            profile,
            topology,
            no_daemons,
        } => {
            let mut spec = LabSpec::new(&cli.name, nodes, pods_per_node);
            spec.dual_stack = dual_stack;
            spec.profile = profile;
            spec.topology = topology;
            spec.daemons = !no_daemons;
            let lab = Lab::up(&spec)?;
            print_status(&mut out, &lab)?;
            lab.keep();
        }
        Cmd::Status { json } => {
            let lab = Lab::open(&cli.name)?;
            if json {
                writeln!(out, "{:#}", lab.status())?;
            } else {
                print_status(&mut out, &lab)?;
            }
        }
        Cmd::Exec { target, argv } => {
            let lab = Lab::open(&cli.name)?;
            let netns = lab.netns_of(&target)?;
            let status =
                mistlab::ns::command(&netns, &argv.iter().map(String::as_str).collect::<Vec<_>>())
                    .stdin(std::process::Stdio::inherit())
                    .status()
                    .context("running the command")?;
            return Ok(ExitCode::from(
                u8::try_from(status.code().unwrap_or(1)).unwrap_or(1),
            ));
        }
        Cmd::Link { cmd: LinkCmd::Show } if Lab::open(&cli.name)?.emulated() => {
            let lab = Lab::open(&cli.name)?;
            print_links(&mut out, &lab)?;
        }
        Cmd::Link { cmd: LinkCmd::Show } => {
            let lab = Lab::open(&cli.name)?;
            if lab.links().is_empty() {
                writeln!(out, "all links clean")?;
            }
            for (k, imp) in lab.links() {
                writeln!(
                    out,
                    "{k}: {}",
                    if imp.down {
                        "down".to_owned()
                    } else {
                        format!("loss {}%", imp.loss_pct)
                    }
                )?;
            }
        }
        Cmd::Link {
            cmd:
                LinkCmd::Set {
                    a,
                    b,
                    network,
                    settings,
                },
        } if Lab::open(&cli.name)?.emulated() => {
            let mut lab = Lab::open(&cli.name)?;
            let network = network.unwrap_or_else(|| lab.first_network().to_owned());
            lab.link_spec_on(&network, &a, &b, &settings.join(" "))?;
            writeln!(out, "{a} <-> {b} on {network}: {}", settings.join(" "))?;
        }
        Cmd::Link {
            cmd:
                LinkCmd::Set {
                    a,
                    b,
                    network,
                    settings,
                },
        } => {
            let mut lab = Lab::open(&cli.name)?;
            if let Some(n) = network {
                anyhow::ensure!(
                    n == lab.first_network(),
                    "--network {n}: the bridge underlay has one network, {}",
                    lab.first_network()
                );
            }
            let mut imp = mistlab::LinkImpairment::default();
            for s in &settings {
                match s.as_str() {
                    "down" => imp.down = true,
                    "up" => imp = mistlab::LinkImpairment::default(),
                    other => {
                        let Some(v) = other.strip_prefix("loss=") else {
                            anyhow::bail!(
                                "unknown link setting {other:?} (use loss=PCT%, down, up)"
                            );
                        };
                        imp.loss_pct = v
                            .trim_end_matches('%')
                            .parse()
                            .with_context(|| format!("loss={v}: not a number"))?;
                    }
                }
            }
            lab.link_set(&a, &b, imp)?;
            writeln!(
                out,
                "{a} <-> {b}: {}",
                if imp.down {
                    "down".to_owned()
                } else if imp.loss_pct > 0.0 {
                    format!("loss {}%", imp.loss_pct)
                } else {
                    "clean".to_owned()
                }
            )?;
        }
        Cmd::Demo => {
            teardown_on_signal(&cli.name);
            mistlab::demo::run(&cli.name, &mut out)?;
        }
        Cmd::Down => {
            let r = Lab::down_by_name(&cli.name)?;
            writeln!(
                out,
                "lab {}: removed {} namespaces, stopped {} processes{}",
                cli.name,
                r.namespaces.len(),
                r.processes.len(),
                if r.state_dir_removed {
                    ", state removed"
                } else {
                    ""
                }
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Ctrl-C (or SIGTERM) during a demo tears the lab down before exiting.
fn teardown_on_signal(name: &str) {
    // SAFETY: plain sigset manipulation; the mask is inherited by threads spawned after it.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    let name = name.to_owned();
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: waiting on the signals blocked above.
        unsafe { libc::sigwait(&set, &mut sig) };
        eprintln!("\nmistlab: interrupted, tearing lab {name} down");
        if let Err(e) = Lab::down_by_name(&name) {
            eprintln!("mistlab: teardown failed: {e:#}");
        }
        std::process::exit(130);
    });
}

/// Every network's link directions with their settings and counters.
fn print_links(out: &mut impl Write, lab: &Lab) -> Result<()> {
    for net in lab.networks() {
        writeln!(out, "network {} ({})", net.name, net.subnet)?;
        let stats = lab.link_stats(&net.name)?;
        for l in stats.as_array().into_iter().flatten() {
            writeln!(
                out,
                "  {:<10} forwarded {:>8}  dropped down {:>6} loss {:>6} queue {:>6}  {}",
                l["link"].as_str().unwrap_or("?"),
                l["forwarded"],
                l["dropped_down"],
                l["dropped_loss"],
                l["dropped_queue"],
                l["settings"].as_str().unwrap_or("?")
            )?;
        }
    }
    Ok(())
}

fn print_status(out: &mut impl Write, lab: &Lab) -> Result<()> {
    writeln!(out, "lab {}", lab.name())?;
    writeln!(
        out,
        "{:<10} {:<16} {:<5} {:<7} emulator",
        "network", "subnet", "cost", "metered"
    )?;
    for n in lab.networks() {
        writeln!(
            out,
            "{:<10} {:<16} {:<5} {:<7} {}",
            n.name,
            n.subnet,
            n.cost,
            n.metered,
            match n.emulator_pid {
                Some(pid) if mistlab::lab::process_alive(pid) => format!("running (pid {pid})"),
                Some(pid) => format!("DEAD (pid {pid})"),
                None => "bridge".to_owned(),
            }
        )?;
    }
    let status = lab.status();
    writeln!(
        out,
        "{:<6} {:<10} {:<44} {:<16} {:<20} NAT router",
        "node", "zone", "interfaces", "pod CIDRs", "daemon"
    )?;
    for (n, st) in lab
        .nodes()
        .iter()
        .zip(status["nodes"].as_array().into_iter().flatten())
    {
        let ifaces: Vec<String> = n
            .interfaces
            .iter()
            .map(|i| {
                if i.addr == i.wan_addr {
                    format!("{} {}", i.network, i.addr)
                } else {
                    format!("{} {} (as {})", i.network, i.addr, i.wan_addr)
                }
            })
            .collect();
        let router = match &n.router {
            Some(r) => format!(
                "{} ({}{})",
                r.name,
                r.nat.as_str(),
                if r.port_forward { ", port forward" } else { "" }
            ),
            None => "-".to_owned(),
        };
        let daemon = match (st["daemonPid"].as_u64(), st["daemonAlive"].as_bool()) {
            (Some(pid), Some(true)) => format!("running (pid {pid})"),
            (Some(pid), _) => format!("DEAD (pid {pid})"),
            (None, _) => "-".to_owned(),
        };
        let cidrs: Vec<String> = n.pod_cidrs.iter().map(ToString::to_string).collect();
        writeln!(
            out,
            "{:<6} {:<10} {:<44} {:<16} {:<20} {router}",
            n.name,
            n.zone.as_deref().unwrap_or("-"),
            ifaces.join(", "),
            cidrs.join(","),
            daemon
        )?;
    }
    writeln!(
        out,
        "{:<6} {:<6} {:<30} {:<10} {:<11} {:>10}",
        "node", "peer", "path", "mode", "handshake", "rx bytes"
    )?;
    for st in status["nodes"].as_array().into_iter().flatten() {
        for p in st["peers"].as_array().into_iter().flatten() {
            let hs = p["latestHandshakeSecondsAgo"]
                .as_u64()
                .map_or("never".to_owned(), |s| format!("{s}s ago"));
            let path = p["paths"]["active"]
                .as_str()
                .or(p["endpoint"].as_str())
                .unwrap_or("-");
            writeln!(
                out,
                "{:<6} {:<6} {:<30} {:<10} {:<11} {:>10}",
                st["name"].as_str().unwrap_or("?"),
                p["name"].as_str().unwrap_or("?"),
                path,
                p["paths"]["mode"].as_str().unwrap_or("-"),
                hs,
                p["rxBytes"]
            )?;
        }
    }
    writeln!(out, "{:<8} {:<6} addresses", "pod", "node")?;
    for p in lab.pods() {
        writeln!(out, "{:<8} {:<6} {}", p.name, p.node, p.ips.join(", "))?;
    }
    Ok(())
}
