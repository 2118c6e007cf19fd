//! `mistlab demo`: a narrated tour for newcomers. Three edge nodes, each on Wi-Fi and LTE,
//! two pods each, real daemons and real pods; then the Wi-Fi link between two nodes turns
//! lossy, is cut, LTE is cut too, and everything comes back, while the demo shows what
//! mistnet's path selection does and how long traffic stops.

use std::io::Write;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::{Lab, LabSpec, ProbeStream};

/// The demo's WAN: every node on good Wi-Fi (cheap) and on LTE (metered, costs more).
const TOPOLOGY: &str = r#"
[networks.wlan0]
subnet = "10.99.0.0/24"
default = "wifi-good"
cost = 10
[networks.lte0]
subnet = "10.98.0.0/24"
default = "lte"
cost = 50
metered = true
"#;
/// UDP port of the demo's probe stream inside the pods.
const PROBE_PORT: u16 = 7001;
/// Interval of the probe stream.
const TICK: Duration = Duration::from_millis(10);

/// Runs the demo under lab name `name`, printing to `out`. The lab is always torn down.
pub fn run(name: &str, out: &mut impl Write) -> Result<()> {
    let total = Instant::now();
    say(
        out,
        "mistnet demo: an edge cluster of 3 nodes on this machine",
    )?;
    writeln!(
        out,
        "Each node is a network namespace running the real mistnetd (userspace WireGuard);\n\
         each pod is a namespace wired by the real mistnet CNI plugin, called as a container\n\
         runtime calls it. Every node has two WAN interfaces, emulated by netbench:\n\
         wlan0 (wifi-good: 2 ms +/- 1 ms, 0.1% loss; cost 10) and lte0 (lte: 25 ms +/- 8 ms,\n\
         0.5% loss; cost 50, metered)."
    )?;
    let t = Instant::now();
    let spec = LabSpec::new(name, 3, 2).with_topology_str(TOPOLOGY)?;
    let mut lab = Lab::up(&spec).context("bringing the demo lab up")?;
    writeln!(
        out,
        "\nup in {:.1} s: 3 nodes, 6 pods, WireGuard between every pair of nodes",
        t.elapsed().as_secs_f64()
    )?;
    for p in lab.pods() {
        writeln!(
            out,
            "  pod {:<6} on {}  {}",
            p.name,
            p.node,
            p.ips.join(", ")
        )?;
    }

    say(
        out,
        "1. Pods on different nodes talk through the encrypted overlay",
    )?;
    for (from, to) in [("n1-p1", "n2-p1"), ("n1-p2", "n3-p2"), ("n3-p1", "n2-p2")] {
        let dst = lab.pod(to)?.ips[0].clone();
        let r = probe(&lab, from, &dst, 20, Duration::from_millis(20))?;
        writeln!(
            out,
            "  {from} -> {to} ({dst}): {}/{} replies, median RTT {:.2} ms",
            r.received, r.sent, r.median_ms
        )?;
    }
    wait_active(&lab, |a| a.starts_with("wlan0"), Duration::from_secs(5))?;
    show_paths(&lab, out)?;

    let dst: IpAddr = lab.pod("n2-p1")?.ips[0].parse()?;
    let stream = ProbeStream::start(
        &lab.pod("n1-p1")?.netns,
        &lab.pod("n2-p1")?.netns,
        dst,
        PROBE_PORT,
        TICK,
    )?;
    writeln!(
        out,
        "\n  From here on n1-p1 sends n2-p1 a UDP datagram every {} ms; gaps are outages.",
        TICK.as_millis()
    )?;

    say(
        out,
        "2. Wi-Fi between n1 and n2 turns awful: 20% loss in bursts",
    )?;
    lab.link_spec_on("wlan0", "n1", "n2", "ge=5%,20%,0%,100%")?;
    let from = stream.sent();
    std::thread::sleep(Duration::from_secs(3));
    let settle = stream.sent();
    std::thread::sleep(Duration::from_secs(2));
    let r = stream.report();
    let st = peer_paths(&lab)?;
    writeln!(
        out,
        "  n1 -> n2: mode {}, {}",
        st["mode"].as_str().unwrap_or("?"),
        st["secondary"].as_str().map_or_else(
            || "no second path".to_owned(),
            |s| format!("second path {s}")
        ),
    )?;
    writeln!(
        out,
        "  delivered: {:.1}% in the first 3 s (while the loss is measured), {:.1}% after;\n  \
         plain WireGuard would lose 20%: every packet now also goes over LTE, and\n  \
         WireGuard's replay window drops the copy that arrives second",
        100.0 * r.delivery(from..settle),
        100.0 * r.delivery(settle..r.sent)
    )?;

    say(out, "3. Wi-Fi between n1 and n2 is cut")?;
    let before = stream.sent();
    lab.link_spec_on("wlan0", "n1", "n2", "down")?;
    std::thread::sleep(Duration::from_secs(2));
    let r = stream.report();
    let gap = outage(&r, before);
    let st = peer_paths(&lab)?;
    writeln!(
        out,
        "  traffic stopped for {} ms, then continued on {} (reason: {})",
        gap.as_millis(),
        st["active"].as_str().unwrap_or("?"),
        st["reason"].as_str().unwrap_or("-")
    )?;
    if gap < Duration::from_millis(100) {
        writeln!(
            out,
            "  (hardly a gap: in redundant mode every packet was already going over LTE too)"
        )?;
    }
    writeln!(
        out,
        "  (plain WireGuard never changes endpoint by itself; Tailscale trusts a silent path 6.5 s)"
    )?;

    say(
        out,
        "4. LTE between n1 and n2 is cut too: no direct path is left",
    )?;
    let before = stream.sent();
    lab.link_spec_on("lte0", "n1", "n2", "down")?;
    wait_active(&lab, |a| a.starts_with("relay"), Duration::from_secs(5))?;
    std::thread::sleep(Duration::from_millis(500));
    let r = stream.report();
    let gap = outage(&r, before);
    let st = peer_paths(&lab)?;
    writeln!(
        out,
        "  traffic stopped for {} ms, then continued via {}: n3 reaches both and forwards the\n  \
         encrypted datagrams it cannot read (end-to-end WireGuard is intact)",
        gap.as_millis(),
        st["active"].as_str().unwrap_or("?")
    )?;

    say(out, "5. Both links come back")?;
    let t = Instant::now();
    lab.link_spec_on("lte0", "n1", "n2", "up")?;
    lab.link_spec_on("wlan0", "n1", "n2", "profile=wifi-good")?;
    wait_active(&lab, |a| a.starts_with("wlan0"), Duration::from_secs(20))?;
    let st = peer_paths(&lab)?;
    writeln!(
        out,
        "  back on {} after {:.1} s (reason: {}); a better path must stay better for 2 s\n  \
         before traffic moves, so a flapping link does not drag it back and forth",
        st["active"].as_str().unwrap_or("?"),
        t.elapsed().as_secs_f64(),
        st["reason"].as_str().unwrap_or("-")
    )?;
    let r = stream.stop();
    writeln!(
        out,
        "  over the whole run: {} datagrams sent, {:.1}% delivered",
        r.sent,
        100.0 * r.delivery(0..r.sent)
    )?;
    show_paths(&lab, out)?;

    say(out, "6. The nodes replicate their state among themselves")?;
    for n in ["n1", "n2", "n3"] {
        let st = lab.daemon_status(n)?;
        writeln!(
            out,
            "  {n}: {} node records, state {} bytes, hash {}",
            st["sync"]["records"],
            st["sync"]["state_bytes"],
            st["sync"]["state_hash"].as_str().unwrap_or("?")
        )?;
    }
    writeln!(
        out,
        "  (equal hashes: every node knows the same signed records, and keeps them across\n  \
         restarts and partitions)"
    )?;

    say(out, "Tearing down")?;
    let report = lab.down()?;
    writeln!(
        out,
        "  removed {} namespaces, stopped {} processes; nothing is left on the machine",
        report.namespaces.len(),
        report.processes.len()
    )?;
    writeln!(out, "\ndemo done in {:.1} s", total.elapsed().as_secs_f64())?;
    Ok(())
}

/// The longest outage among probes sent from `from` on.
fn outage(r: &crate::ProbeReport, from: u64) -> Duration {
    r.gaps()
        .into_iter()
        .filter(|(start, _)| *start >= from)
        .map(|(_, d)| d)
        .max()
        .unwrap_or_default()
}

/// n1's path state towards n2 (`status.peers[n2].paths`).
fn peer_paths(lab: &Lab) -> Result<serde_json::Value> {
    let st = lab.daemon_status("n1")?;
    st["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "n2")
        .map(|p| p["paths"].clone())
        .context("n1 has no peer n2")
}

fn wait_active(lab: &Lab, ok: impl Fn(&str) -> bool, limit: Duration) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if peer_paths(lab)?["active"].as_str().is_some_and(&ok) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn show_paths(lab: &Lab, out: &mut impl Write) -> Result<()> {
    let st = peer_paths(lab)?;
    writeln!(
        out,
        "  n1's paths to n2 (active: {}):",
        st["active"].as_str().unwrap_or("-")
    )?;
    for p in st["paths"].as_array().into_iter().flatten() {
        let ms = |v: &serde_json::Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.1}"));
        writeln!(
            out,
            "    {:<28} {:<6} rtt {:>6} ms  loss {:>5}%",
            p["path"].as_str().unwrap_or("?"),
            p["state"].as_str().unwrap_or("?"),
            ms(&p["srttMs"]),
            ms(&p["lossPct"])
        )?;
    }
    Ok(())
}

fn say(out: &mut impl Write, title: &str) -> Result<()> {
    writeln!(out, "\n== {title}")?;
    Ok(())
}

struct Probe {
    sent: u32,
    received: u32,
    median_ms: f64,
}

/// Sends `count` pings with `ping -W 1` at `interval`, returning replies and median RTT.
fn probe(lab: &Lab, from: &str, to: &str, count: u32, interval: Duration) -> Result<Probe> {
    let interval = format!("{:.3}", interval.as_secs_f64().max(0.01));
    let out = lab.exec(
        from,
        &[
            "ping",
            "-n",
            "-c",
            &count.to_string(),
            "-i",
            &interval,
            "-W",
            "1",
            to,
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rtts: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next())
        .filter_map(|t| t.parse().ok())
        .collect();
    rtts.sort_by(f64::total_cmp);
    let received = u32::try_from(rtts.len()).unwrap_or(u32::MAX);
    let median_ms = rtts.get(rtts.len() / 2).copied().unwrap_or(f64::NAN);
    Ok(Probe {
        sent: count,
        received,
        median_ms,
    })
}
