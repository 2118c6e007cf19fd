//! Overlay throughput and RTT, side by side in one run on one topology: a two-node mistlab
//! (veth underlay, MTU 1500; pods at the overlay MTU) where the pod-to-pod path is carried in
//! turn by plain routes (the limit), mistnet, wireguard-go and boringtun-cli.
//!
//! Usage: `overlay-bench [--seconds N] [--boringtun PATH] [--json]` (root; release binaries in
//! the same directory as this one, e.g. after `scripts/build.sh`).

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use mistlab::{Lab, LabSpec, ns};
use serde_json::{Value, json};

struct Args {
    seconds: u32,
    boringtun: Option<String>,
    json: bool,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        seconds: 5,
        boringtun: None,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--seconds" => a.seconds = it.next().context("--seconds N")?.parse()?,
            "--boringtun" => a.boringtun = Some(it.next().context("--boringtun PATH")?),
            "--json" => a.json = true,
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

/// Busy and total jiffies of all CPUs.
fn cpu_times() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    let total: u64 = v.iter().sum();
    Ok((total - idle, total))
}

struct Measured {
    gbps_1: f64,
    gbps_4: f64,
    rtt_ms: f64,
    cpu_s_per_gbit: f64,
}

fn iperf(lab: &Lab, dst: &str, streams: u32, secs: u32) -> Result<(f64, f64)> {
    let (b0, _) = cpu_times()?;
    let out = lab.exec(
        "n1-p1",
        &[
            "iperf3",
            "-c",
            dst,
            "-t",
            &secs.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ],
    )?;
    let (b1, _) = cpu_times()?;
    ensure!(
        out.status.success(),
        "iperf3 failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON")?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu_s = (b1 - b0) as f64 / hz;
    let gbits = bps * f64::from(secs) / 1e9;
    Ok((bps / 1e9, cpu_s / gbits.max(1e-9)))
}

fn rtt(lab: &Lab, dst: &str) -> Result<f64> {
    let out = lab.exec("n1-p1", &["ping", "-c", "50", "-i", "0.01", "-q", dst])?;
    let text = String::from_utf8_lossy(&out.stdout);
    // rtt min/avg/max/mdev = a/b/c/d ms
    let avg = text
        .lines()
        .find(|l| l.contains("min/avg"))
        .and_then(|l| l.split('=').nth(1))
        .and_then(|v| v.trim().split('/').nth(1))
        .context("ping summary")?;
    Ok(avg.parse()?)
}

fn measure(lab: &Lab, dst: &str, secs: u32) -> Result<Measured> {
    let server = Bg::spawn(ns::command(&lab.pod("n2-p1")?.netns, &["iperf3", "-s"]))?;
    std::thread::sleep(Duration::from_millis(300));
    ensure!(lab.ping("n1-p1", dst, 2)?, "no connectivity to {dst}");
    let (gbps_1, cpu1) = iperf(lab, dst, 1, secs)?;
    let (gbps_4, _) = iperf(lab, dst, 4, secs)?;
    let rtt_ms = rtt(lab, dst)?;
    drop(server);
    Ok(Measured {
        gbps_1,
        gbps_4,
        rtt_ms,
        cpu_s_per_gbit: cpu1,
    })
}

/// Swaps the pod-CIDR routes of both nodes to go via `dev` (or via the peer's underlay).
fn route_pods(lab: &Lab, how: &str) -> Result<()> {
    for (me, other, other_ip) in [
        ("n1", "10.244.2.0/24", "10.99.0.2"),
        ("n2", "10.244.1.0/24", "10.99.0.1"),
    ] {
        let netns = lab.node(me)?.netns.clone();
        let _ = ns::exec(&netns, &["ip", "route", "del", other]);
        if how == "underlay" {
            ns::exec(
                &netns,
                &["ip", "route", "add", other, "via", other_ip, "dev", "wan0"],
            )?;
        } else {
            ns::exec(&netns, &["ip", "route", "add", other, "dev", how])?;
        }
    }
    Ok(())
}

/// Runs a stock userspace WireGuard (`bin -f wg0`) on both nodes, configured with `wg`.
fn start_userspace_wg(lab: &Lab, bin: &str) -> Result<Vec<Bg>> {
    let keys: Vec<(String, String)> = (0..2)
        .map(|_| {
            let k = ns::run(Command::new("wg").arg("genkey"))?.trim().to_owned();
            let p = ns::sh(&lab.node("n1")?.netns, &format!("echo {k} | wg pubkey"))?
                .trim()
                .to_owned();
            Ok((k, p))
        })
        .collect::<Result<_>>()?;
    let mut procs = Vec::new();
    for (i, (me, peer_ip, peer_cidr, tun_addr)) in [
        ("n1", "10.99.0.2", "10.244.2.0/24", "10.244.1.1"),
        ("n2", "10.99.0.1", "10.244.1.0/24", "10.244.2.1"),
    ]
    .iter()
    .enumerate()
    {
        let netns = lab.node(me)?.netns.clone();
        // The UAPI socket (/var/run/wireguard/<dev>.sock) is shared by all namespaces: one name
        // per node.
        let dev = format!("wg{me}");
        let mut argv = vec![bin, "-f"];
        if bin.ends_with("boringtun-cli") {
            // One thread is boringtun-cli's fastest setting here (DESIGN.md §10).
            argv.extend(["--disable-drop-privileges", "--threads", "1"]);
        }
        argv.push(&dev);
        let mut c = ns::command(&netns, &argv);
        c.env("WG_PROCESS_FOREGROUND", "1");
        procs.push(Bg::spawn(c)?);
        for _ in 0..200 {
            if ns::exec(&netns, &["ip", "-o", "link"])?.contains(&dev) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let keyfile = format!("/tmp/overlay-bench-{}-{i}.key", std::process::id());
        std::fs::write(&keyfile, &keys[i].0)?;
        let peer_pub = &keys[1 - i].1;
        ns::exec(
            &netns,
            &[
                "wg",
                "set",
                &dev,
                "private-key",
                &keyfile,
                "listen-port",
                "51821",
                "peer",
                peer_pub,
                "endpoint",
                &format!("{peer_ip}:51821"),
                "allowed-ips",
                peer_cidr,
            ],
        )?;
        let _ = std::fs::remove_file(&keyfile);
        ns::exec(
            &netns,
            &["ip", "addr", "add", &format!("{tun_addr}/32"), "dev", &dev],
        )?;
        ns::exec(&netns, &["ip", "link", "set", &dev, "mtu", "1440", "up"])?;
        let other = if *me == "n1" {
            "10.244.2.0/24"
        } else {
            "10.244.1.0/24"
        };
        let _ = ns::exec(&netns, &["ip", "route", "del", other]);
        ns::exec(&netns, &["ip", "route", "add", other, "dev", &dev])?;
    }
    Ok(procs)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let mut spec = LabSpec::new("obench", 2, 1);
    // Release binaries next to this one.
    spec.bin_dir = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .to_path_buf();
    let mut lab = Lab::up(&spec)?;
    let dst = lab.pod("n2-p1")?.ips[0].clone();
    let mut rows: Vec<(&str, Measured)> = Vec::new();

    eprintln!("measuring mistnet ...");
    rows.push(("mistnet", measure(&lab, &dst, args.seconds)?));
    lab.stop_daemon("n1")?;
    lab.stop_daemon("n2")?;

    eprintln!("measuring plain routes over the veth underlay ...");
    route_pods(&lab, "underlay")?;
    rows.push(("bare veth (no tunnel)", measure(&lab, &dst, args.seconds)?));

    eprintln!("measuring wireguard-go ...");
    {
        let _wg = start_userspace_wg(&lab, "wireguard-go")?;
        rows.push(("wireguard-go", measure(&lab, &dst, args.seconds)?));
    }
    for n in ["n1", "n2"] {
        let _ = ns::exec(
            &lab.node(n)?.netns,
            &["ip", "link", "del", &format!("wg{n}")],
        );
        let _ = std::fs::remove_file(format!("/var/run/wireguard/wg{n}.sock"));
    }
    if let Some(bt) = &args.boringtun {
        eprintln!("measuring boringtun-cli ...");
        {
            let _bt = start_userspace_wg(&lab, bt)?;
            rows.push(("boringtun-cli", measure(&lab, &dst, args.seconds)?));
        }
        for n in ["n1", "n2"] {
            let _ = std::fs::remove_file(format!("/var/run/wireguard/wg{n}.sock"));
        }
    }
    let bare = rows
        .iter()
        .find(|r| r.0.starts_with("bare"))
        .map(|r| r.1.gbps_1)
        .unwrap_or(1.0);
    let wggo = rows
        .iter()
        .find(|r| r.0 == "wireguard-go")
        .map(|r| r.1.gbps_1)
        .unwrap_or(1.0);
    let mut out = std::io::stdout().lock();
    if args.json {
        let doc: Vec<Value> = rows
            .iter()
            .map(|(n, m)| {
                json!({"variant": n, "gbps_1_stream": m.gbps_1, "gbps_4_streams": m.gbps_4,
                                  "rtt_ms": m.rtt_ms, "cpu_s_per_gbit": m.cpu_s_per_gbit})
            })
            .collect();
        writeln!(out, "{:#}", Value::Array(doc))?;
    } else {
        writeln!(
            out,
            "pod-to-pod over a veth underlay, {} s per iperf3 run",
            args.seconds
        )?;
        writeln!(
            out,
            "| variant | TCP 1 stream | TCP 4 streams | RTT avg | CPU s/Gbit | vs bare | vs wireguard-go |"
        )?;
        writeln!(out, "|---|---|---|---|---|---|---|")?;
        for (n, m) in &rows {
            writeln!(
                out,
                "| {n} | {:.2} Gbit/s | {:.2} Gbit/s | {:.3} ms | {:.2} | {:.2}× | {:.2}× |",
                m.gbps_1,
                m.gbps_4,
                m.rtt_ms,
                m.cpu_s_per_gbit,
                m.gbps_1 / bare,
                m.gbps_1 / wggo
            )?;
        }
    }
    lab.down()?;
    Ok(())
}

/// A background process stopped on drop.
struct Bg(Child);

impl Bg {
    fn spawn(mut c: Command) -> Result<Self> {
        Ok(Bg(c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?))
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        // SIGTERM first: userspace WireGuard removes its UAPI socket on a clean exit.
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        for _ in 0..100 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
