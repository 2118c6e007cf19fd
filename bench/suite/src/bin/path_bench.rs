//! Adaptive path selection, measured in mistlabs of two nodes with two underlays each (wlan0
//! cost 10, lte0 cost 50, both emulated by netbench), side by side with plain WireGuard
//! behaviour (mistnetd with `[paths] enabled = false`: one endpoint, never switched) in the
//! same run:
//!
//! - failover outage: a 5 ms UDP probe stream pod → pod, the active path's link is cut;
//!   outage = longest run of lost probes;
//! - TCP goodput with 20 % burst loss (Gilbert-Elliott) on the best path and a clean, slower
//!   second path, relative to the clean goodput;
//! - probe overhead (wire bytes/s per peer) idle and busy, from `pathStats`.
//!
//! Usage: `path-bench [--trials N] [--seconds S] [--only failover|goodput] [--json]` (root;
//! the lab's binaries in the directory of this one).
#![allow(clippy::print_stdout)]

use std::io::Write;
use std::net::IpAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use mistlab::{Lab, LabSpec, ProbeStream, ns};
use serde_json::{Value, json};

const PROBE_PORT: u16 = 9400;
/// 20 % Gilbert-Elliott loss in bursts of 5 packets on average (p/(p+r) = 0.2, r = 0.2).
const BURST_LOSS: &str = "ge=5%,20%,0%,100%";
/// How long a cut link stays cut in a failover trial (and the "never recovered" horizon).
const CUT: Duration = Duration::from_millis(1500);

struct Args {
    trials: usize,
    seconds: u32,
    json: bool,
    /// Run only this part: `failover` or `goodput` (both by default).
    only: Option<String>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        trials: 20,
        seconds: 5,
        json: false,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--trials" => a.trials = it.next().context("--trials N")?.parse()?,
            "--seconds" => a.seconds = it.next().context("--seconds S")?.parse()?,
            "--json" => a.json = true,
            "--only" => {
                let part = it.next().context("--only failover|goodput")?;
                ensure!(
                    part == "failover" || part == "goodput",
                    "--only {part}: failover or goodput"
                );
                a.only = Some(part);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

fn topology(wlan: &str, lte: &str) -> String {
    format!(
        "[networks.wlan0]\nsubnet = \"10.99.0.0/24\"\ndefault = \"{wlan}\"\ncost = 10\n\
         [networks.lte0]\nsubnet = \"10.98.0.0/24\"\ndefault = \"{lte}\"\ncost = 50\nmetered = true\n"
    )
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let bin_dir = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .to_path_buf();
    let started = Instant::now();

    let (mut mist, mut mist_redundant, mut plain, mut overhead) =
        (Vec::new(), Vec::new(), Vec::new(), json!({}));
    if args.only.as_deref() != Some("goodput") {
        eprintln!("failover: mistnet, {} trials ...", args.trials);
        let mut lab = new_lab("pbfail", &topology("delay=2ms", "delay=10ms"), &bin_dir)?;
        overhead = probe_overhead(&lab)?;
        (mist, mist_redundant) = failover_trials(&mut lab, args.trials)?;
        let (doubt, nacks) = doubt_overhead(&mut lab)?;
        overhead["busy, active path losing 20 % (in doubt)"] = json!(doubt);
        overhead["nacks of the receiver, same"] = json!(nacks);
        eprintln!("failover: plain WireGuard ...");
        set_paths(&mut lab, "enabled = false")?;
        plain = failover_trials(&mut lab, args.trials.min(3))?.0;
        lab.down()?;
    }

    let (mut goodput, mut equal) = (Vec::new(), Vec::new());
    if args.only.as_deref() != Some("failover") {
        eprintln!("goodput under 20 % burst loss ...");
        let mut lab = new_lab(
            "pbgood",
            &topology("delay=5ms rate=40mbit", "delay=15ms rate=20mbit"),
            &bin_dir,
        )?;
        goodput = goodput_rows(&mut lab, args.seconds, true)?;
        lab.down()?;
        // The other reading of "a clean, slower second path": as fast, but 3× the delay.
        eprintln!("goodput under 20 % burst loss, second path of equal capacity ...");
        let mut lab = new_lab(
            "pbgood2",
            &topology("delay=5ms rate=40mbit", "delay=15ms rate=40mbit"),
            &bin_dir,
        )?;
        equal = goodput_rows(&mut lab, args.seconds, false)?;
        lab.down()?;
    }

    let mut out = std::io::stdout().lock();
    if args.json {
        let doc = json!({
            "failover": [failover_json("mistnet", &mist), failover_json("plain WireGuard", &plain)],
            "failover_in_redundant_mode_ms": mist_redundant.iter().map(|d| d.as_millis() as u64).collect::<Vec<_>>(),
            "goodput": goodput.iter().map(|(n, m)| json!({"variant": n, "mbps": m})).collect::<Vec<_>>(),
            "goodput_equal_capacity": equal.iter().map(|(n, m)| json!({"variant": n, "mbps": m})).collect::<Vec<_>>(),
            "probe_overhead_bytes_per_s": overhead,
            "runtime_s": started.elapsed().as_secs_f64(),
        });
        writeln!(out, "{doc:#}")?;
        return Ok(());
    }
    if !mist.is_empty() {
        writeln!(
            out,
            "failover outage (5 ms UDP probe stream pod → pod, active link cut for {} ms)",
            CUT.as_millis()
        )?;
        writeln!(out, "| variant | trials | p50 | p95 | max | recovered |")?;
        writeln!(out, "|---|---|---|---|---|---|")?;
        for (name, t) in [("mistnet", &mist), ("plain WireGuard", &plain)] {
            let (p50, p95, max) = percentiles(t);
            let rec = t.iter().filter(|x| x.1).count();
            writeln!(
                out,
                "| {name} | {} | {} | {} | {} | {rec}/{} |",
                t.len(),
                fmt_gap(p50, t),
                fmt_gap(p95, t),
                fmt_gap(max, t),
                t.len()
            )?;
        }
        if !mist_redundant.is_empty() {
            let gaps: Vec<String> = mist_redundant
                .iter()
                .map(|d| format!("{} ms", d.as_millis()))
                .collect();
            writeln!(
                out,
                "\n{} more trials started in redundant mode (a copy already on the other path): outages {}",
                mist_redundant.len(),
                gaps.join(", ")
            )?;
        }
        writeln!(out)?;
    }
    if !goodput.is_empty() {
        goodput_table(
            &mut out,
            &format!(
                "TCP goodput pod → pod, {} s, wlan0 20 % burst loss ({BURST_LOSS}), lte0 clean",
                args.seconds
            ),
            &goodput,
        )?;
        writeln!(out)?;
        goodput_table(
            &mut out,
            "the same with lte0 as fast as wlan0 (40 Mbit/s) but 3× its delay (15 ms)",
            &equal,
        )?;
        writeln!(out)?;
    }
    if !mist.is_empty() {
        writeln!(
            out,
            "probe overhead per peer (wire bytes/s sent by one node)"
        )?;
        writeln!(out, "| state | bytes/s |")?;
        writeln!(out, "|---|---|")?;
        for (k, v) in overhead.as_object().into_iter().flatten() {
            writeln!(out, "| {k} | {:.0} |", v.as_f64().unwrap_or(0.0))?;
        }
    }
    writeln!(out, "\nruntime {:.0} s", started.elapsed().as_secs_f64())?;
    Ok(())
}

fn new_lab(name: &str, topo: &str, bin_dir: &std::path::Path) -> Result<Lab> {
    let mut spec = LabSpec::new(name, 2, 1).with_topology_str(topo)?;
    spec.bin_dir = bin_dir.to_path_buf();
    let lab = Lab::up(&spec)?;
    wait(&lab, |a| a.starts_with("wlan0"), 10)?;
    Ok(lab)
}

/// Rewrites both nodes' `[paths]` table and restarts their daemons.
fn set_paths(lab: &mut Lab, body: &str) -> Result<()> {
    for n in ["n1", "n2"] {
        let path = lab.node(n)?.dir.join("mistnetd.toml");
        let text = std::fs::read_to_string(&path)?;
        let base = text.split("\n[paths]\n").next().unwrap_or(&text).to_owned();
        std::fs::write(&path, format!("{base}\n[paths]\n{body}\n"))?;
    }
    for n in ["n1", "n2"] {
        lab.restart_daemon(n)?;
    }
    // Fresh daemons handshake again (over a lossy link, possibly after a few of WireGuard's
    // 5 s retries: plain WireGuard on a 20 % burst-loss link loses a handshake in three).
    let dst = pod_ip(lab, "n2-p1")?.to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lab.ping("n1-p1", &dst, 3)? {
        ensure!(
            Instant::now() < deadline,
            "no connectivity after reconfiguring [paths] {body}\n{}",
            lab.logs()
        );
    }
    Ok(())
}

/// One trial per entry: (outage, recovered).
/// Failover trials that started in single mode: (outage, recovered) each.
type Trials = Vec<(Duration, bool)>;

/// Failover trials: those that started in single mode, and the outages of those that started
/// in redundant mode.
fn failover_trials(lab: &mut Lab, trials: usize) -> Result<(Trials, Vec<Duration>)> {
    let mut out = Vec::new();
    let mut in_redundant_mode = Vec::new();
    for i in 0..trials {
        // Cut the network the active path is on (alternates as paths fail over and back),
        // once the other network's path is up again.
        let net = active_net(lab)?;
        let other = if net == "wlan0" { "lte0" } else { "wlan0" };
        wait_path_up(lab, other, 8)?;
        // A path just won back still has the last cut's losses in its window, and while they
        // count the peer is in redundant mode, where a cut costs nothing: wait that out so
        // the trial measures a failover. Trials that still start redundant are kept apart.
        let redundant = wait_single(lab, 12)?;
        let s = probe_stream(lab)?;
        std::thread::sleep(Duration::from_millis(300));
        lab.link_spec_on(net, "n1", "n2", "down")?;
        std::thread::sleep(CUT);
        let r = s.stop();
        lab.link_spec_on(net, "n1", "n2", "up")?;
        let gap = r.longest_gap();
        eprintln!(
            "  trial {i}: cut {net}, outage {gap:?}, recovered {}{}",
            r.recovered(),
            if redundant {
                " (redundant mode at the cut)"
            } else {
                ""
            }
        );
        if redundant {
            in_redundant_mode.push(gap);
        } else {
            out.push((gap, r.recovered()));
        }
        if !r.recovered() {
            // Plain WireGuard: give the restored link a moment before the next trial.
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    Ok((out, in_redundant_mode))
}

/// TCP goodput rows: clean, then 20 % burst loss on wlan0 with redundancy auto, with copies
/// only, and (`all`) with redundancy off and a single path (selection off: the first
/// endpoint, on wlan0).
fn goodput_rows(lab: &mut Lab, secs: u32, all: bool) -> Result<Vec<(String, f64)>> {
    let mut rows = Vec::new();
    rows.push(("clean links (mistnet)".to_owned(), tcp(lab, secs)?));
    lab.link_spec_on("wlan0", "n1", "n2", BURST_LOSS)?;
    rows.push((
        "20 % burst loss, redundancy auto".to_owned(),
        tcp(lab, secs)?,
    ));
    set_paths(lab, "repair = false")?;
    rows.push((
        "20 % burst loss, redundancy auto, repair off (copies only)".to_owned(),
        tcp(lab, secs)?,
    ));
    if !all {
        return Ok(rows);
    }
    set_paths(lab, "redundancy = \"off\"")?;
    rows.push((
        "20 % burst loss, redundancy off".to_owned(),
        tcp(lab, secs)?,
    ));
    set_paths(lab, "enabled = false")?;
    rows.push((
        "20 % burst loss, single path (wlan0 only)".to_owned(),
        tcp(lab, secs)?,
    ));
    Ok(rows)
}

/// A markdown table of goodput rows, each as a ratio to the first (the clean link).
fn goodput_table(out: &mut impl Write, title: &str, rows: &[(String, f64)]) -> Result<()> {
    let clean = rows.first().map_or(1.0, |r| r.1);
    writeln!(out, "{title}")?;
    writeln!(out, "| variant | goodput | vs clean |")?;
    writeln!(out, "|---|---|---|")?;
    for (n, m) in rows {
        writeln!(out, "| {n} | {m:.1} Mbit/s | {:.2}× |", m / clean)?;
    }
    Ok(())
}

fn tcp(lab: &Lab, secs: u32) -> Result<f64> {
    let dst = pod_ip(lab, "n2-p1")?.to_string();
    let mut server = ns::command(&lab.pod("n2-p1")?.netns, &["iperf3", "-s", "-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let out = lab.exec(
        "n1-p1",
        &["iperf3", "-c", &dst, "-t", &secs.to_string(), "-J"],
    );
    let _ = server.kill();
    let _ = server.wait();
    let out = out?;
    ensure!(
        out.status.success(),
        "iperf3: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON")?;
    // The sender's repair counters and the receiver's nacks, for the log.
    let repair = lab
        .daemon_status("n1")
        .map(|st| peer(&st)["repair"].clone())
        .unwrap_or_default();
    let nacks = lab
        .daemon_status("n2")
        .map(|st| st["nacksSent"].clone())
        .unwrap_or_default();
    eprintln!(
        "  {:.1} Mbit/s (n1 repair {repair}, n2 nacks sent {nacks})",
        bps / 1e6
    );
    Ok(bps / 1e6)
}

/// Probe bytes/s n1 sends to its one peer: idle (no data for > 5 s), and busy (a 5 ms
/// stream, whose own bytes are not counted: only `pathStats.probe_bytes_sent`).
fn probe_overhead(lab: &Lab) -> Result<Value> {
    let bytes = probe_bytes;
    std::thread::sleep(Duration::from_secs(6));
    let (b0, t0) = (bytes(lab)?, Instant::now());
    std::thread::sleep(Duration::from_secs(8));
    let idle = (bytes(lab)? - b0) / t0.elapsed().as_secs_f64();
    let s = probe_stream(lab)?;
    std::thread::sleep(Duration::from_secs(1));
    let (b0, t0) = (bytes(lab)?, Instant::now());
    std::thread::sleep(Duration::from_secs(4));
    let busy = (bytes(lab)? - b0) / t0.elapsed().as_secs_f64();
    drop(s);
    Ok(json!({"idle": idle, "busy (data flowing)": busy}))
}

fn active(lab: &Lab) -> Result<Option<String>> {
    let st = lab.daemon_status("n1")?;
    Ok(peer(&st)["paths"]["active"].as_str().map(str::to_owned))
}

fn peer(st: &Value) -> &Value {
    &st["peers"][0]
}

fn wait(lab: &Lab, ok: impl Fn(&str) -> bool, secs: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if active(lab)?.as_deref().is_some_and(&ok) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "active path not as expected: {:#}",
        lab.daemon_status("n1")?
    )
}

/// Waits until a path on `net` is up (selection off: no paths, nothing to wait for).
/// Probe bytes/s n1 sends to its peer while the active path loses a fifth of its packets
/// (a 5 ms stream flowing): its probes go unanswered, so it is in doubt (probed every 20 ms)
/// time and again; redundancy adds the receiver's nacks, reported beside.
fn doubt_overhead(lab: &mut Lab) -> Result<(f64, f64)> {
    let nack_bytes = |lab: &Lab| -> Result<f64> {
        let st = lab.daemon_status("n2")?;
        st["nackBytesSent"].as_f64().context("nackBytesSent")
    };
    let net = active_net(lab)?;
    let s = probe_stream(lab)?;
    lab.link_spec_on(net, "n1", "n2", "loss=20%")?;
    std::thread::sleep(Duration::from_secs(2));
    let (b0, n0, t0) = (probe_bytes(lab)?, nack_bytes(lab)?, Instant::now());
    std::thread::sleep(Duration::from_secs(4));
    let secs = t0.elapsed().as_secs_f64();
    let probes = (probe_bytes(lab)? - b0) / secs;
    let nacks = (nack_bytes(lab)? - n0) / secs;
    drop(s);
    lab.link_spec_on(net, "n1", "n2", "loss=0%")?;
    Ok((probes, nacks))
}

/// The network n1's active path to n2 is on.
fn active_net(lab: &Lab) -> Result<&'static str> {
    Ok(match active(lab)? {
        Some(a) if a.starts_with("lte0") => "lte0",
        Some(_) | None => "wlan0",
    })
}

/// A UDP probe every 5 ms from n1-p1 to n2-p1.
fn probe_stream(lab: &Lab) -> Result<ProbeStream> {
    ProbeStream::start(
        &lab.pod("n1-p1")?.netns,
        &lab.pod("n2-p1")?.netns,
        pod_ip(lab, "n2-p1")?,
        PROBE_PORT,
        Duration::from_millis(5),
    )
}

/// Probe bytes n1 has sent (`pathStats.probe_bytes_sent`).
fn probe_bytes(lab: &Lab) -> Result<f64> {
    let st = lab.daemon_status("n1")?;
    st["pathStats"]["probe_bytes_sent"]
        .as_f64()
        .context("pathStats.probe_bytes_sent")
}

/// Waits up to `secs` for n1's peer to leave redundant mode; true if it did not.
fn wait_single(lab: &Lab, secs: u64) -> Result<bool> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let st = lab.daemon_status("n1")?;
        if peer(&st)["paths"]["mode"] != "redundant" {
            return Ok(false);
        }
        if Instant::now() >= deadline {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn wait_path_up(lab: &Lab, net: &str, secs: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let st = lab.daemon_status("n1")?;
        let paths = &peer(&st)["paths"];
        if paths.is_null()
            || paths["paths"].as_array().into_iter().flatten().any(|p| {
                p["state"] == "up" && p["path"].as_str().is_some_and(|s| s.starts_with(net))
            })
        {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "no path up on {net}: {paths:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn pod_ip(lab: &Lab, pod: &str) -> Result<IpAddr> {
    Ok(lab.pod(pod)?.ips[0].parse()?)
}

fn percentiles(t: &[(Duration, bool)]) -> (Duration, Duration, Duration) {
    let mut v: Vec<Duration> = t.iter().map(|x| x.0).collect();
    v.sort();
    let at = |q: f64| {
        let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len().max(1)) - 1;
        v.get(i).copied().unwrap_or_default()
    };
    (at(0.5), at(0.95), v.last().copied().unwrap_or_default())
}

fn fmt_gap(d: Duration, t: &[(Duration, bool)]) -> String {
    if t.iter().all(|x| !x.1) {
        format!("never recovered within {} ms", CUT.as_millis())
    } else {
        format!("{} ms", d.as_millis())
    }
}

fn failover_json(name: &str, t: &[(Duration, bool)]) -> Value {
    let (p50, p95, max) = percentiles(t);
    json!({
        "variant": name,
        "trials": t.len(),
        "outage_ms": t.iter().map(|x| x.0.as_secs_f64() * 1e3).collect::<Vec<_>>(),
        "recovered": t.iter().filter(|x| x.1).count(),
        "p50_ms": p50.as_secs_f64() * 1e3,
        "p95_ms": p95.as_secs_f64() * 1e3,
        "max_ms": max.as_secs_f64() * 1e3,
    })
}
