//! netbench: link testing and link emulation (the CLI shell).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use netbench::client::{self, PmtuOpts, RrulOpts, RttOpts, TcpOpts, UdpOpts};
use netbench::emulate::{self, Config, Emulator, Node, ProfileFile, ScheduledChange, profile};
use netbench::{output, proto, server};

#[derive(Parser)]
#[command(
    name = "netbench",
    version,
    about = "Link testing and link emulation for edge links"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Answer clients (TCP and UDP on the same port).
    Server {
        /// Address to listen on.
        #[arg(short, long, default_value = "0.0.0.0")]
        bind: String,
        #[arg(short, long, default_value_t = proto::DEFAULT_PORT)]
        port: u16,
        /// UDP sessions kept at once (memory bound).
        #[arg(long, default_value_t = 1024)]
        max_sessions: usize,
        /// TCP streams served at once.
        #[arg(long, default_value_t = 128)]
        max_tcp: usize,
    },
    /// TCP throughput.
    Tcp {
        #[command(flatten)]
        common: Common,
        /// Parallel streams.
        #[arg(short = 'P', long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=128))]
        streams: u16,
        /// Server sends, client receives.
        #[arg(short = 'R', long)]
        reverse: bool,
        /// Test length (e.g. 10s, 500ms).
        #[arg(short = 't', long, default_value = "10s", value_parser = parse_duration)]
        duration: Duration,
        /// Bytes per write (e.g. 128kb).
        #[arg(short, long, default_value = "128kb", value_parser = parse_bytes)]
        length: u64,
    },
    /// UDP at a target rate: loss, RFC 3550 jitter, reordering, duplicates.
    Udp {
        #[command(flatten)]
        common: Common,
        /// Target rate (e.g. 10mbit, 1gbit).
        #[arg(short, long, default_value = "10mbit", value_parser = parse_rate)]
        rate: u64,
        /// UDP payload per packet (e.g. 1200, 1kb).
        #[arg(short, long, default_value = "1200", value_parser = parse_bytes)]
        length: u64,
        #[arg(short = 't', long, default_value = "10s", value_parser = parse_duration)]
        duration: Duration,
    },
    /// Round-trip times: distribution, jitter, loss (up/down).
    Rtt {
        #[command(flatten)]
        common: Common,
        /// Probe interval (e.g. 10ms).
        #[arg(short, long, default_value = "10ms", value_parser = parse_duration)]
        interval: Duration,
        /// UDP payload per probe, both ways.
        #[arg(short, long, default_value = "64", value_parser = parse_bytes)]
        length: u64,
        #[arg(short = 't', long, default_value = "10s", value_parser = parse_duration)]
        duration: Duration,
    },
    /// Latency under load: RTT while TCP saturates both directions.
    Rrul {
        #[command(flatten)]
        common: Common,
        /// TCP streams per direction.
        #[arg(short = 'P', long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
        streams: u16,
        #[arg(short = 't', long, default_value = "10s", value_parser = parse_duration)]
        duration: Duration,
        #[arg(short, long, default_value = "20ms", value_parser = parse_duration)]
        interval: Duration,
    },
    /// Path MTU by DF probing.
    Pmtu {
        #[command(flatten)]
        common: Common,
        /// Largest IP packet to try (default: the local route MTU).
        #[arg(long, value_parser = parse_bytes)]
        max: Option<u64>,
        /// Wait per probe.
        #[arg(long, default_value = "300ms", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Emulate links between network namespaces (no netem needed).
    #[command(subcommand)]
    Emulate(EmulateCmd),
}

#[derive(Args)]
struct Common {
    /// Server address: host, ip, host:port or [v6]:port.
    server: String,
    /// Server port (when not given in the address).
    #[arg(short, long)]
    port: Option<u16>,
    /// Print every figure as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Write an SVG plot (latency distribution, throughput over time).
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
}

#[derive(Subcommand)]
enum EmulateCmd {
    /// Create the links and forward until interrupted.
    Run {
        /// A node: NAME=NETNS[:ADDR/LEN,...], e.g. n1=lab-n1:10.99.0.1/24 (repeat).
        #[arg(short, long = "node")]
        nodes: Vec<String>,
        /// Link settings: SELECTOR=PROFILE, e.g. n1-n2=lte, n1>n2="delay=50ms loss=1%" (repeat).
        #[arg(short, long = "link")]
        links: Vec<String>,
        /// Settings of links not named (a preset or a spec).
        #[arg(short, long)]
        default: Option<String>,
        /// Profile file (TOML) with nodes, profiles, links and schedule.
        #[arg(short = 'f', long)]
        profile: Option<PathBuf>,
        /// Scheduled change: "AT[/EVERY] LINKS SETTINGS", e.g. "5s/10s n1-n2 down" (repeat).
        #[arg(short, long = "schedule")]
        schedule: Vec<String>,
        /// Interface name inside the namespaces.
        #[arg(long, default_value = "nb0")]
        ifname: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(short, long, default_value = DEFAULT_CONTROL)]
        control: PathBuf,
    },
    /// Change links at runtime: `set link=n1-n2 loss=10% delay=50ms`, `set link=n1-* down`.
    Set {
        #[arg(short, long, default_value = DEFAULT_CONTROL)]
        control: PathBuf,
        /// link=SELECTOR followed by settings.
        #[arg(required = true, num_args = 1..)]
        args: Vec<String>,
    },
    /// Per-link counters: forwarded, dropped by cause, queued.
    Stats {
        #[arg(short, long, default_value = DEFAULT_CONTROL)]
        control: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// List the presets and their settings.
    Presets,
}

const DEFAULT_CONTROL: &str = "/run/netbench/emulate.sock";

fn parse_duration(s: &str) -> Result<Duration> {
    Ok(profile::duration(s)?)
}
fn parse_bytes(s: &str) -> Result<u64> {
    Ok(profile::bytes(s)?)
}
fn parse_rate(s: &str) -> Result<u64> {
    Ok(profile::rate(s)?)
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        let _ = writeln!(std::io::stderr(), "netbench: error: {e:#}");
        std::process::exit(1);
    }
}

fn out(s: &str) -> Result<()> {
    let mut o = std::io::stdout().lock();
    o.write_all(s.as_bytes())?;
    o.flush()?;
    Ok(())
}

fn emit<T: serde::Serialize>(json: bool, v: &T, table: impl FnOnce(&T) -> String) -> Result<()> {
    if json {
        out(&(serde_json::to_string_pretty(v)? + "\n"))
    } else {
        out(&table(v))
    }
}

fn server_addr(c: &Common) -> Result<SocketAddr> {
    client::resolve(&c.server, c.port)
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Server {
            bind,
            port,
            max_sessions,
            max_tcp,
        } => {
            let ip: std::net::IpAddr = bind
                .parse()
                .with_context(|| format!("--bind {bind:?} is not an IP address"))?;
            let stop = Arc::new(AtomicBool::new(false));
            install_sigint(&stop)?;
            server::serve(
                &server::ServerConfig {
                    bind: SocketAddr::new(ip, port),
                    max_sessions,
                    max_tcp,
                },
                &stop,
            )
        }
        Cmd::Tcp {
            common,
            streams,
            reverse,
            duration,
            length,
        } => {
            let r = client::tcp(&TcpOpts {
                server: server_addr(&common)?,
                streams,
                duration,
                reverse,
                len: length.clamp(1, 16 << 20) as usize,
            })?;
            if let Some(p) = &common.plot {
                output::plot(p, "TCP", None, &[("total", &r.series)])?;
            }
            emit(common.json, &r, output::tcp_table)
        }
        Cmd::Udp {
            common,
            rate,
            length,
            duration,
        } => {
            if rate == 0 {
                bail!("--rate must be positive");
            }
            let r = client::udp(&UdpOpts {
                server: server_addr(&common)?,
                rate_bps: rate,
                len: length.clamp(1, 65_000) as usize,
                duration,
            })?;
            if let Some(p) = &common.plot {
                output::plot(p, "UDP", None, &[("sent", &r.series)])?;
            }
            emit(common.json, &r, output::udp_table)
        }
        Cmd::Rtt {
            common,
            interval,
            length,
            duration,
        } => {
            if interval.is_zero() {
                bail!("--interval must be positive");
            }
            let r = client::rtt(&RttOpts {
                server: server_addr(&common)?,
                interval,
                len: length.clamp(1, 65_000) as usize,
                duration,
            })?;
            if let Some(p) = &common.plot {
                output::plot(p, "RTT", Some(&r.buckets), &[])?;
            }
            emit(common.json, &r, output::rtt_table)
        }
        Cmd::Rrul {
            common,
            streams,
            duration,
            interval,
        } => {
            if duration < Duration::from_secs(1) {
                bail!("--duration must be at least 1s for rrul");
            }
            let r = client::rrul(&RrulOpts {
                server: server_addr(&common)?,
                streams,
                duration,
                interval,
            })?;
            if let Some(p) = &common.plot {
                output::plot(
                    p,
                    "RRUL",
                    Some(&r.loaded.buckets),
                    &[
                        ("upload", &r.upload.series),
                        ("download", &r.download.series),
                    ],
                )?;
            }
            emit(common.json, &r, output::rrul_table)
        }
        Cmd::Pmtu {
            common,
            max,
            timeout,
        } => {
            let r = client::pmtu(&PmtuOpts {
                server: server_addr(&common)?,
                min: 68,
                max: max.map(|m| m as usize),
                timeout,
            })?;
            emit(common.json, &r, output::pmtu_table)
        }
        Cmd::Emulate(e) => emulate_cmd(e),
    }
}

fn emulate_cmd(cmd: EmulateCmd) -> Result<()> {
    match cmd {
        EmulateCmd::Run {
            nodes,
            links,
            default,
            profile: file,
            schedule,
            ifname,
            seed,
            control,
        } => {
            let mut cfg = match &file {
                Some(p) => {
                    let text = std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    Config::from_profile(
                        &ProfileFile::parse(&text)
                            .with_context(|| format!("profile {}", p.display()))?,
                    )?
                }
                None => Config {
                    seed,
                    ..Config::default()
                },
            };
            let resolver = ProfileFile::default();
            if let Some(d) = &default {
                cfg.default = resolver.resolve(d).context("--default")?;
            }
            for n in &nodes {
                let mut node = Node::parse(n)?;
                node.ifname.clone_from(&ifname);
                cfg.nodes.push(node);
            }
            for l in &links {
                let (sel, spec) = l
                    .split_once('=')
                    .with_context(|| format!("--link {l:?}: expected SELECTOR=PROFILE"))?;
                cfg.links.push((
                    sel.to_owned(),
                    resolver
                        .resolve(spec)
                        .with_context(|| format!("--link {l:?}"))?,
                ));
            }
            for s in &schedule {
                cfg.schedule.push(ScheduledChange::parse(s)?);
            }
            cfg.control = Some(control.clone());
            let stop = Arc::new(AtomicBool::new(false));
            install_sigint(&stop)?;
            let emu = Emulator::start(cfg)?;
            tracing::info!(control = %control.display(), "emulator running");
            let _ = writeln!(
                std::io::stderr(),
                "netbench emulate: running; control socket {}; Ctrl-C to stop",
                control.display()
            );
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
            }
            emu.stop()
        }
        EmulateCmd::Set { control, args } => {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let (links, spec) = emulate::parse_set_args(&refs)?;
            let reply = emulate::control_request(&control, &format!("set link={links} {spec}"))?;
            out(&format!("{reply} link direction(s) changed\n"))
        }
        EmulateCmd::Stats { control, json } => {
            let reply = emulate::control_request(&control, "stats")?;
            let stats: Vec<emulate::LinkStats> =
                serde_json::from_str(&reply).context("decoding the emulator's stats")?;
            if json {
                out(&(reply + "\n"))
            } else {
                out(&output::stats_table(&stats))
            }
        }
        EmulateCmd::Presets => {
            let mut s = String::new();
            for name in emulate::PRESETS {
                if let Some(p) = emulate::preset(name) {
                    s += &format!("{name:<14} {}\n", profile::describe(&p));
                }
            }
            out(&s)
        }
    }
}

static SIGINT: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGINT.store(true, Ordering::Relaxed);
}

/// Turns SIGINT/SIGTERM into `stop` becoming true, for a clean shutdown.
fn install_sigint(stop: &Arc<AtomicBool>) -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let prev = unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
        if prev == libc::SIG_ERR {
            bail!("cannot install a signal handler");
        }
    }
    let stop = Arc::clone(stop);
    std::thread::spawn(move || {
        while !SIGINT.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, Ordering::Relaxed);
    });
    Ok(())
}
