//! `mistlab demo`: a narrated tour for newcomers. Three nodes, two pods each, real daemons and
//! real pods; then a link degrades and is cut, and the demo shows what the overlay does.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::lab::LinkImpairment;
use crate::{Lab, LabSpec};

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
         runtime calls it. Every WAN link between nodes is emulated by netbench (profile\n\
         wifi-good: 2 ms +/- 1 ms, 0.1% loss, 100 Mbit/s)."
    )?;
    let t = Instant::now();
    let mut spec = LabSpec::new(name, 3, 2);
    // Every WAN link emulated by netbench as good Wi-Fi: 2 ms ± 1 ms, 0.1% loss, 100 Mbit/s.
    spec.profile = Some("wifi-good".into());
    let mut lab = Lab::up(&spec).context("bringing the demo lab up")?;
    writeln!(
        out,
        "\nup in {:.1} s: 3 nodes, 6 pods, a full mesh of 3 WireGuard tunnels",
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
    let st = lab.daemon_status("n1")?;
    for p in st["peers"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "  n1's tunnel to {}: endpoint {}, last handshake {} s ago, {} bytes in",
            p["name"].as_str().unwrap_or("?"),
            p["endpoint"].as_str().unwrap_or("-"),
            p["latestHandshakeSecondsAgo"],
            p["rxBytes"]
        )?;
    }

    let dst = lab.pod("n2-p1")?.ips[0].clone();
    say(
        out,
        "2. The WAN link n1 <-> n2 degrades: 20% packet loss each way",
    )?;
    lab.link_set(
        "n1",
        "n2",
        LinkImpairment {
            loss_pct: 20.0,
            down: false,
        },
    )?;
    let r = probe(&lab, "n1-p1", &dst, 100, Duration::from_millis(10))?;
    writeln!(
        out,
        "  n1-p1 -> n2-p1: {}/{} replies ({:.0}% lost round trip; 20% each way compounds to ~36%)",
        r.received,
        r.sent,
        100.0 * f64::from(r.sent - r.received) / f64::from(r.sent)
    )?;
    writeln!(
        out,
        "  WireGuard keeps the session; TCP would retransmit. (Adaptive path selection will\n  duplicate traffic over a second path when a link is this lossy.)"
    )?;

    say(out, "3. The link n1 <-> n2 is cut")?;
    lab.link_set(
        "n1",
        "n2",
        LinkImpairment {
            loss_pct: 0.0,
            down: true,
        },
    )?;
    let r = probe(&lab, "n1-p1", &dst, 20, Duration::from_millis(50))?;
    writeln!(
        out,
        "  n1-p1 -> n2-p1: {}/{} replies: the direct tunnel is the only path today",
        r.received, r.sent
    )?;
    let via3 = lab.pod("n3-p1")?.ips[0].clone();
    let r3 = probe(&lab, "n1-p1", &via3, 10, Duration::from_millis(20))?;
    writeln!(
        out,
        "  n1-p1 -> n3-p1: {}/{} replies: other tunnels are unaffected",
        r3.received, r3.sent
    )?;
    writeln!(
        out,
        "  (With path selection, n1 relays through n3, which still reaches both.)"
    )?;

    say(
        out,
        "4. The link comes back as a congested LTE link (60 ms +/- 30 ms, 2% loss, 5 Mbit/s)",
    )?;
    let t = Instant::now();
    lab.link_set("n1", "n2", LinkImpairment::default())?;
    lab.link_spec("n1", "n2", "profile=lte-congested")?;
    let mut recovered = None;
    while t.elapsed() < Duration::from_secs(10) {
        if probe(&lab, "n1-p1", &dst, 1, Duration::from_millis(0))?.received == 1 {
            recovered = Some(t.elapsed());
            break;
        }
    }
    match recovered {
        Some(d) => writeln!(
            out,
            "  traffic flows again {:.0} ms after the link is restored (same session, no re-handshake needed)",
            d.as_secs_f64() * 1e3
        )?,
        None => writeln!(out, "  traffic did not recover within 10 s")?,
    }
    if recovered.is_some() {
        let r = probe(&lab, "n1-p1", &dst, 20, Duration::from_millis(50))?;
        writeln!(
            out,
            "  over congested LTE: {}/{} replies, median RTT {:.1} ms (two LTE hops of 60 ms)",
            r.received, r.sent, r.median_ms
        )?;
    }

    say(out, "Tearing down")?;
    let report = lab.down()?;
    writeln!(
        out,
        "  removed {} namespaces, stopped {} daemons; nothing is left on the machine",
        report.namespaces.len(),
        report.processes.len()
    )?;
    writeln!(out, "\ndemo done in {:.1} s", total.elapsed().as_secs_f64())?;
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
