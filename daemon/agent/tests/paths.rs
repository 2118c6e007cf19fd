//! Root tests of adaptive path selection in real `mistnetd`s (through the lab): failover to a
//! second underlay and back, TCP across a failover, redundancy under burst loss, relaying
//! around a cut link, and NAT traversal. Links are emulated by netbench (`link_spec_on`).
//! Timing bounds are generous (the machine is small and shared); the precise figures are
//! `path-bench`'s (docs/BENCHMARKS.md "Path selection"). Need root and the workspace binaries
//! built next to this test; they fail, never skip, without them.
#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use mistlab::{Lab, LabSpec, ProbeStream, ns};
use serde_json::Value;

/// Two underlays per node: Wi-Fi (cheap, fast) and metered LTE.
const TWO_NETWORKS: &str = r#"
[networks.wlan0]
subnet = "10.99.0.0/24"
default = "delay=2ms"
cost = 10
[networks.lte0]
subnet = "10.98.0.0/24"
default = "delay=8ms"
cost = 50
metered = true
"#;

/// Bound on a failover outage in these tests (the target, p95 ≤ 300 ms, is the benchmark's).
const OUTAGE_BOUND: Duration = Duration::from_millis(1500);
const PROBE_PORT: u16 = 9400;

#[test]
fn active_path_cut_fails_over_to_second_interface_and_back() {
    let mut lab = up("pfail", 2, TWO_NETWORKS);
    wait_active(&lab, "n1", "n2", |a| a.starts_with("wlan0 ->"), 10);
    let stream = stream(&lab, "n1-p1", "n2-p1", Duration::from_millis(10));
    std::thread::sleep(Duration::from_millis(800));

    lab.link_spec_on("wlan0", "n1", "n2", "down").unwrap();
    let cut = stream.sent();
    let st = wait_active(&lab, "n1", "n2", |a| a.starts_with("lte0 ->"), 5);
    assert_eq!(
        peer(&st, "n2")["paths"]["reason"],
        "active path silent",
        "{st:#}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let during = stream.report();
    assert!(
        during.delivery(during.sent - 100..during.sent - 10) > 0.95,
        "traffic over lte0 after the cut\n{}",
        lab.logs()
    );

    lab.link_spec_on("wlan0", "n1", "n2", "up").unwrap();
    // Back after the retry backoff (≤ 2 s here) and the hold time (2 s).
    let st = wait_active(&lab, "n1", "n2", |a| a.starts_with("wlan0 ->"), 12);
    let reason = peer(&st, "n2")["paths"]["reason"].clone();
    assert_eq!(reason, "better score", "{st:#}");
    std::thread::sleep(Duration::from_millis(300));
    let report = stream.stop();
    let gap = report.longest_gap();
    assert!(
        gap < OUTAGE_BOUND,
        "outage {gap:?} after the cut at probe {cut}: gaps {:?}\n{}",
        report.gaps(),
        lab.logs()
    );
    assert!(report.recovered());
}

#[test]
fn tcp_transfer_survives_a_failover() {
    let mut lab = up("ptcp", 2, TWO_NETWORKS);
    wait_active(&lab, "n1", "n2", |a| a.starts_with("wlan0 ->"), 10);
    let dst = pod_ip(&lab, "n2-p1").to_string();
    let server = Bg::spawn(ns::command(
        &lab.pod("n2-p1").unwrap().netns,
        &["iperf3", "-s", "-1"],
    ));
    std::thread::sleep(Duration::from_millis(300));
    let client = Bg::spawn_piped(ns::command(
        &lab.pod("n1-p1").unwrap().netns,
        // A modest rate: the point is continuity, not speed (the machine is shared).
        &["iperf3", "-c", &dst, "-t", "5", "-b", "20M", "-J"],
    ));
    std::thread::sleep(Duration::from_millis(1500));
    lab.link_spec_on("wlan0", "n1", "n2", "down").unwrap();
    let out = client.wait_output();
    drop(server);
    assert!(
        out.status.success(),
        "iperf3 across the cut: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        lab.logs()
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let received = report["end"]["sum_received"]["bytes"].as_f64().unwrap();
    // 5 s at 20 Mbit/s is 12.5 MB; more than half arrives even with a second-long stall.
    assert!(
        received > 6e6,
        "only {received} bytes arrived\n{}",
        lab.logs()
    );
    let st = lab.daemon_status("n1").unwrap();
    let active = peer(&st, "n2")["paths"]["active"].as_str().unwrap_or("");
    assert!(active.starts_with("lte0 ->"), "{st:#}");
}

#[test]
fn burst_loss_turns_on_redundancy_and_delivery_stays_high() {
    let mut lab = up("pburst", 2, TWO_NETWORKS);
    wait_active(&lab, "n1", "n2", |a| a.starts_with("wlan0 ->"), 10);
    let stream = stream(&lab, "n1-p1", "n2-p1", Duration::from_millis(10));
    std::thread::sleep(Duration::from_millis(500));
    // 20 % loss in bursts of 5 packets on average (p/(p+r) = 0.2, r = 0.2).
    lab.link_spec_on("wlan0", "n1", "n2", "ge=5%,20%,0%,100%")
        .unwrap();
    let from = stream.sent();
    let deadline = Instant::now() + Duration::from_secs(8);
    let reacted = loop {
        let st = lab.daemon_status("n1").unwrap();
        let p = &peer(&st, "n2")["paths"];
        if p["mode"] == "redundant" || p["active"].as_str().unwrap_or("").starts_with("lte0") {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "no reaction to 20 % burst loss: {st:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let reacted_at = stream.sent();
    std::thread::sleep(Duration::from_secs(3));
    let report = stream.stop();
    let after = report.delivery(reacted_at..report.sent - 20);
    assert!(
        after > 0.97,
        "delivery {after:.3} after the reaction (before: {:.3})\n{reacted:#}\n{}",
        report.delivery(from..reacted_at),
        lab.logs()
    );
    // LTE is slower but has room: its copies all arrive, so the receiver never asks for
    // selective repair instead (that is for a second path too small for the copies).
    let st = lab.daemon_status("n1").unwrap();
    let repair = &peer(&st, "n2")["repair"];
    assert_eq!(repair["repairEntered"], 0, "{st:#}");
    assert_eq!(repair["mode"], "copy", "{st:#}");
}

#[test]
fn burst_loss_beside_a_small_second_path_resends_only_what_is_lost() {
    // LTE with a quarter of Wi-Fi's rate: copies of a full-rate TCP stream cannot fit it.
    let topology = TWO_NETWORKS
        .replace("\"delay=2ms\"", "\"delay=5ms rate=40mbit\"")
        .replace("\"delay=8ms\"", "\"delay=15ms rate=10mbit\"");
    let mut lab = up("prepair", 2, &topology);
    wait_active(&lab, "n1", "n2", |a| a.starts_with("wlan0 ->"), 10);
    lab.link_spec_on("wlan0", "n1", "n2", "ge=5%,20%,0%,100%")
        .unwrap();
    let dst = pod_ip(&lab, "n2-p1").to_string();
    let server = Bg::spawn(ns::command(
        &lab.pod("n2-p1").unwrap().netns,
        &["iperf3", "-s", "-1"],
    ));
    std::thread::sleep(Duration::from_millis(300));
    let out = Bg::spawn_piped(ns::command(
        &lab.pod("n1-p1").unwrap().netns,
        &["iperf3", "-c", &dst, "-t", "6", "-J"],
    ))
    .wait_output();
    drop(server);
    assert!(
        out.status.success(),
        "iperf3 under burst loss: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        lab.logs()
    );
    let sender = lab.daemon_status("n1").unwrap();
    let receiver = lab.daemon_status("n2").unwrap();
    let repair = &peer(&sender, "n2")["repair"];
    let resent = repair["resent"].as_u64().unwrap_or(0);
    let sent = sender["stats"]["txPackets"].as_u64().unwrap_or(0);
    assert!(
        repair["repairEntered"].as_u64().unwrap_or(0) >= 1,
        "the sender never switched from copies to repair: {sender:#}\n{}",
        lab.logs()
    );
    assert!(
        receiver["nacksSent"].as_u64().unwrap_or(0) > 0,
        "{receiver:#}"
    );
    // Resends replace lost packets only: about a fifth of what went out, far from a copy
    // of everything.
    assert!(
        resent > 0 && resent * 2 < sent,
        "{resent} resent of {sent} sent: {sender:#}"
    );
    let sock = lab.node("n1").unwrap().dir.join("mistnetd.sock");
    let bin = mistlab::lab::default_bin_dir().join("mistnetd");
    let out = lab
        .exec(
            "n1",
            &[
                bin.to_str().unwrap(),
                "metrics",
                "--socket",
                sock.to_str().unwrap(),
            ],
        )
        .unwrap();
    let metrics = String::from_utf8_lossy(&out.stdout);
    assert!(
        metrics.contains("pathsel_repair_resent_total{peer=\"n2\"}"),
        "{metrics}"
    );
}

#[test]
fn cut_direct_link_is_relayed_through_third_node_and_wins_back() {
    let mut spec = root_spec("prelay", 3, 1);
    spec.profile = Some("delay=1ms".into());
    let mut lab = Lab::up(&spec).unwrap();
    // Without named networks the underlay socket is unbound: "udp51820 -> ...".
    let direct = |a: &str| a.contains(" -> ");
    wait_active(&lab, "n1", "n2", direct, 10);
    let dst = pod_ip(&lab, "n2-p1").to_string();
    lab.link_spec("n1", "n2", "down").unwrap();
    let st = wait_active(&lab, "n1", "n2", |a| a == "relay n3", 8);
    assert_eq!(
        peer(&st, "n2")["paths"]["reason"],
        "active path silent",
        "{st:#}"
    );
    assert!(
        lab.ping("n1-p1", &dst, 3).unwrap(),
        "n1's pod reaches n2's pod through n3\n{st:#}\n{}",
        lab.logs()
    );
    let src = pod_ip(&lab, "n1-p1").to_string();
    assert!(
        lab.ping("n2-p1", &src, 3).unwrap(),
        "and back\n{}",
        lab.logs()
    );
    let relay = lab.daemon_status("n3").unwrap();
    assert!(
        relay["pathStats"]["relay_forwarded"].as_u64().unwrap() > 0,
        "{relay:#}"
    );

    lab.link_spec("n1", "n2", "up").unwrap();
    let st = wait_active(&lab, "n1", "n2", direct, 14);
    assert_eq!(
        peer(&st, "n2")["paths"]["reason"],
        "direct path recovered",
        "{st:#}"
    );
    assert!(lab.ping("n1-p1", &dst, 2).unwrap(), "{}", lab.logs());
}

/// n1 public; n2 and n3 each behind their own masquerade router.
const NAT: &str = r#"
[networks.wlan0]
subnet = "10.99.0.0/24"
default = "delay=2ms"
[nodes.n2]
nat = "masquerade"
[nodes.n3]
nat = "masquerade"
"#;

#[test]
fn nodes_behind_nat_reach_each_other_and_punch_a_direct_path() {
    let lab = up("pnat", 3, NAT);
    let (p1, p2, p3) = (
        pod_ip(&lab, "n1-p1").to_string(),
        pod_ip(&lab, "n2-p1").to_string(),
        pod_ip(&lab, "n3-p1").to_string(),
    );
    // The public node reaches the NATed one once it has heard from it (keepalive 5 s, but
    // the first handshake goes out at start-up).
    let deadline = Instant::now() + Duration::from_secs(8);
    while !lab.ping("n1-p1", &p2, 1).unwrap() {
        assert!(
            Instant::now() < deadline,
            "n1 -> n2 behind NAT\n{}",
            lab.logs()
        );
    }
    assert!(
        lab.ping("n2-p1", &p1, 2).unwrap(),
        "n2 -> n1\n{}",
        lab.logs()
    );
    // Two NATed nodes: through the relay at first, then directly once call-me-maybe made
    // both sides send at once (Linux masquerade keeps the source port: endpoint-independent
    // mapping, so each side's mapping seen by n1 is the one the other can reach).
    let deadline = Instant::now() + Duration::from_secs(8);
    while !lab.ping("n2-p1", &p3, 1).unwrap() {
        assert!(
            Instant::now() < deadline,
            "n2 -> n3, both behind NAT\n{}",
            lab.logs()
        );
    }
    assert!(
        lab.ping("n3-p1", &p2, 2).unwrap(),
        "n3 -> n2\n{}",
        lab.logs()
    );
    let st = wait_active(&lab, "n2", "n3", |a| a.starts_with("wlan0 ->"), 15);
    let n3_wan = lab
        .node("n3")
        .unwrap()
        .wan_addr("wlan0")
        .unwrap()
        .to_string();
    let active = peer(&st, "n3")["paths"]["active"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        active.contains(&n3_wan),
        "direct to n3's NAT mapping: {st:#}"
    );
    assert!(lab.ping("n2-p1", &p3, 2).unwrap(), "{}", lab.logs());
}

const SYMMETRIC_NAT: &str = r#"
[networks.wlan0]
subnet = "10.99.0.0/24"
default = "delay=2ms"
[nodes.n2]
nat = "symmetric"
[nodes.n3]
nat = "symmetric"
"#;

#[test]
fn nodes_behind_symmetric_nats_fall_back_to_a_relay() {
    let lab = up("psym", 3, SYMMETRIC_NAT);
    let (p2, p3) = (
        pod_ip(&lab, "n2-p1").to_string(),
        pod_ip(&lab, "n3-p1").to_string(),
    );
    // Symmetric NATs (a new random port per destination) defeat hole punching: the port n1
    // observes for n2 is not the one n2 uses towards n3. The public node relays.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lab.ping("n2-p1", &p3, 1).unwrap() {
        assert!(
            Instant::now() < deadline,
            "n2 -> n3, both behind symmetric NATs\n{}",
            lab.logs()
        );
    }
    assert!(
        lab.ping("n3-p1", &p2, 2).unwrap(),
        "n3 -> n2\n{}",
        lab.logs()
    );
    let st = wait_active(&lab, "n2", "n3", |a| a == "relay n1", 10);
    assert_eq!(
        peer(&st, "n3")["paths"]["active"],
        "relay n1",
        "relayed through the public node: {st:#}"
    );
    let relayed = lab.daemon_status("n1").unwrap()["pathStats"]["relay_forwarded"]
        .as_u64()
        .unwrap();
    assert!(relayed > 0, "n1 forwarded for them");
    assert!(lab.ping("n2-p1", &p3, 2).unwrap(), "{}", lab.logs());
}

// --- helpers ---

fn root_spec(name: &str, nodes: usize, pods: usize) -> LabSpec {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "path tests need root (sudo scripts/test.sh)"
    );
    let s = LabSpec::new(name, nodes, pods);
    for bin in ["mistnet", "mistnetd", "netbench"] {
        assert!(
            s.bin_dir.join(bin).exists(),
            "{bin} not built in {}: run cargo build --workspace --bins",
            s.bin_dir.display()
        );
    }
    s
}

fn up(name: &str, nodes: usize, topology: &str) -> Lab {
    let spec = root_spec(name, nodes, 1)
        .with_topology_str(topology)
        .unwrap();
    Lab::up(&spec).unwrap()
}

fn pod_ip(lab: &Lab, pod: &str) -> IpAddr {
    lab.pod(pod).unwrap().ips[0].parse().unwrap()
}

fn stream(lab: &Lab, from: &str, to: &str, interval: Duration) -> ProbeStream {
    ProbeStream::start(
        &lab.pod(from).unwrap().netns,
        &lab.pod(to).unwrap().netns,
        pod_ip(lab, to),
        PROBE_PORT,
        interval,
    )
    .unwrap()
}

/// A peer's entry in a status document.
fn peer<'a>(st: &'a Value, name: &str) -> &'a Value {
    st["peers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .unwrap_or(&Value::Null)
}

/// Polls `node`'s status until its active path to `to` satisfies `ok`; panics with the
/// status and logs after `secs`.
fn wait_active(lab: &Lab, node: &str, to: &str, ok: impl Fn(&str) -> bool, secs: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let st = lab.daemon_status(node).unwrap();
        if let Some(a) = peer(&st, to)["paths"]["active"].as_str()
            && ok(a)
        {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "{node}'s active path to {to} not as expected after {secs} s: {:#}\n{}",
            peer(&st, to),
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A background process killed on drop.
struct Bg(Option<Child>);

impl Bg {
    fn spawn(mut c: std::process::Command) -> Self {
        Bg(Some(
            c.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ))
    }

    fn spawn_piped(mut c: std::process::Command) -> Self {
        Bg(Some(
            c.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        ))
    }

    fn wait_output(mut self) -> std::process::Output {
        self.0.take().unwrap().wait_with_output().unwrap()
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
