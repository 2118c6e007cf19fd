//! Root integration tests of the overlay: real `mistnetd`s in network namespaces (through the
//! lab), pods from the real `mistnet` plugin, real WireGuard on the wire, and a stock
//! `wireguard-go` peer. Need root (CI runs as root) and the workspace binaries built
//! (scripts/test.sh does both); they fail, never skip, without them.
#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mistlab::{Lab, LabSpec, ns};

fn spec(name: &str, nodes: usize, pods: usize) -> LabSpec {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "overlay tests need root (sudo scripts/test.sh)"
    );
    let s = LabSpec::new(name, nodes, pods);
    for bin in ["mistnet", "mistnetd"] {
        assert!(
            s.bin_dir.join(bin).exists(),
            "{bin} not built in {}: run cargo build --workspace --bins",
            s.bin_dir.display()
        );
    }
    s
}

fn ip(lab: &Lab, pod: &str) -> String {
    lab.pod(pod).unwrap().ips[0].clone()
}

#[test]
fn two_nodes_pod_ping_and_tcp() {
    let lab = Lab::up(&spec("ov2", 2, 1)).unwrap();
    let b = ip(&lab, "n2-p1");
    assert!(
        lab.ping("n1-p1", &b, 3).unwrap(),
        "ping across the overlay\n{}",
        lab.logs()
    );
    // TCP: a short iperf3 run through the tunnel.
    let server = Bg::spawn(ns::command(
        &lab.pod("n2-p1").unwrap().netns,
        &["iperf3", "-s", "-1"],
    ));
    std::thread::sleep(Duration::from_millis(300));
    let out = lab
        .exec("n1-p1", &["iperf3", "-c", &b, "-t", "1", "-J"])
        .unwrap();
    assert!(
        out.status.success(),
        "iperf3: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bps = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap();
    assert!(bps > 1e6, "TCP through the overlay moved only {bps} bit/s");
    drop(server);
    let st = lab.daemon_status("n1").unwrap();
    assert!(
        st["peers"][0]["latestHandshakeSecondsAgo"].is_u64(),
        "{st:#}"
    );
    assert!(st["peers"][0]["rxBytes"].as_u64().unwrap() > 0);
}

#[test]
fn three_nodes_every_pod_reaches_every_pod() {
    let lab = Lab::up(&spec("ov3", 3, 2)).unwrap();
    let pods = lab.pods().to_vec();
    for a in &pods {
        for b in &pods {
            if a.node != b.node {
                assert!(
                    lab.ping(&a.name, &b.ips[0], 1).unwrap(),
                    "{} -> {}\n{}",
                    a.name,
                    b.name,
                    lab.logs()
                );
            }
        }
    }
}

#[test]
fn spoofed_inner_source_is_dropped_and_counted() {
    let lab = Lab::up(&spec("ovspoof", 2, 1)).unwrap();
    let a = ip(&lab, "n1-p1");
    assert!(lab.ping("n2", &a, 1).unwrap());
    // n2 sends into the tunnel from an address that is not in its pod CIDR.
    let n2 = lab.node("n2").unwrap().netns.clone();
    ns::exec(&n2, &["ip", "addr", "add", "10.244.99.9/32", "dev", "lo"]).unwrap();
    let spoofed = lab
        .exec(
            "n2",
            &[
                "ping",
                "-c",
                "3",
                "-i",
                "0.2",
                "-W",
                "1",
                "-I",
                "10.244.99.9",
                &a,
            ],
        )
        .unwrap();
    assert!(
        !spoofed.status.success(),
        "spoofed packets must not be delivered"
    );
    let st = lab.daemon_status("n1").unwrap();
    assert!(st["stats"]["spoofed"].as_u64().unwrap() >= 3, "{st:#}");
    assert!(
        st["peers"][0]["spoofedDrops"].as_u64().unwrap() >= 3,
        "{st:#}"
    );
    // Legitimate traffic still flows.
    assert!(lab.ping("n2-p1", &a, 1).unwrap());
}

#[test]
fn underlay_never_carries_plaintext() {
    let lab = Lab::up(&spec("ovwire", 2, 1)).unwrap();
    let b = ip(&lab, "n2-p1");
    assert!(lab.ping("n1-p1", &b, 1).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let wire = dir.path().join("wire.pcap");
    let inner = dir.path().join("inner.pcap");
    let wan_ns = format!("ml-{}-wan", lab.name());
    let n2 = lab.node("n2").unwrap().netns.clone();
    let cap_wire = Bg::spawn(ns::command(
        &wan_ns,
        &[
            "tcpdump",
            "-U",
            "-s0",
            "-i",
            "wan",
            "-w",
            wire.to_str().unwrap(),
        ],
    ));
    let cap_inner = Bg::spawn(ns::command(
        &n2,
        &[
            "tcpdump",
            "-U",
            "-s0",
            "-i",
            "mist0",
            "-w",
            inner.to_str().unwrap(),
        ],
    ));
    // ICMP payload filled with a marker pattern, sent until the inner capture has it: tcpdump
    // takes a moment to start capturing, longer on a loaded machine, and a fixed sleep raced it.
    let marker = b"MISTNETMARKER";
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let out = lab
            .exec(
                "n1-p1",
                &[
                    "ping",
                    "-c",
                    "3",
                    "-i",
                    "0.1",
                    "-W",
                    "1",
                    "-p",
                    "4d4953544e45544d41524b4552",
                    &b,
                ],
            )
            .unwrap();
        assert!(out.status.success());
        std::thread::sleep(Duration::from_millis(300));
        let seen = std::fs::read(&inner)
            .is_ok_and(|bytes| bytes.windows(marker.len()).any(|w| w == marker));
        if seen || std::time::Instant::now() > deadline {
            break;
        }
    }
    drop(cap_wire);
    drop(cap_inner);
    let wire_bytes = std::fs::read(&wire).unwrap();
    let inner_bytes = std::fs::read(&inner).unwrap();
    assert!(
        inner_bytes.windows(marker.len()).any(|w| w == marker),
        "the capture method must see the marker in plaintext on mist0"
    );
    assert!(
        wire_bytes.len() > 500,
        "the underlay capture saw the tunnel traffic"
    );
    assert!(
        !wire_bytes.windows(marker.len()).any(|w| w == marker),
        "plaintext on the underlay"
    );
}

#[test]
fn restart_restores_pod_connectivity_within_two_seconds() {
    let mut lab = Lab::up(&spec("ovrst", 2, 1)).unwrap();
    let b = ip(&lab, "n2-p1");
    assert!(lab.ping("n1-p1", &b, 1).unwrap());
    lab.stop_daemon("n1").unwrap();
    // While the daemon is down the overlay route is gone; pods stay.
    assert!(!lab.ping("n1-p1", &b, 1).unwrap());
    let start = Instant::now();
    lab.restart_daemon("n1").unwrap();
    let mut ok = false;
    while start.elapsed() < Duration::from_secs(5) {
        let out = lab
            .exec("n1-p1", &["ping", "-c", "1", "-W", "0.1", &b])
            .unwrap();
        if out.status.success() {
            ok = true;
            break;
        }
    }
    let took = start.elapsed();
    assert!(ok, "no connectivity 5 s after restart\n{}", lab.logs());
    assert!(
        took < Duration::from_secs(2),
        "connectivity took {took:?} after the daemon's start"
    );
    // The pod created before the restart is still there, and a new one works too.
    let mut lab = lab;
    let p = lab.add_pod("n1", "p9").unwrap();
    assert!(
        lab.ping("n1-p9", &b, 1).unwrap(),
        "pod {} made after restart",
        p.name
    );
}

#[test]
fn stop_removes_device_and_routes_but_not_pods() {
    let mut lab = Lab::up(&spec("ovstop", 2, 1)).unwrap();
    let n1 = lab.node("n1").unwrap().netns.clone();
    assert!(
        ns::exec(&n1, &["ip", "-o", "link"])
            .unwrap()
            .contains("mist0")
    );
    lab.stop_daemon("n1").unwrap();
    let links = ns::exec(&n1, &["ip", "-o", "link"]).unwrap();
    assert!(!links.contains("mist0"), "{links}");
    assert!(links.contains("mist"), "pod veths stay: {links}");
    assert!(
        !ns::exec(&n1, &["ip", "route"])
            .unwrap()
            .contains("10.244.2.0/24")
    );
}

#[test]
fn interop_with_wireguard_go() {
    let lab = Lab::up(&spec("ovwg", 1, 1)).unwrap();
    let n1 = lab.node("n1").unwrap().clone();
    // A stock WireGuard peer: wireguard-go + wg in its own namespace on the lab's WAN.
    let wg_ns = format!("ml-{}-wgpeer", lab.name());
    ns::add(&wg_ns).unwrap();
    let wan_ns = format!("ml-{}-wan", lab.name());
    ns::exec(
        &wan_ns,
        &[
            "ip", "link", "add", "wgp-wan", "type", "veth", "peer", "name", "wan0", "netns", &wg_ns,
        ],
    )
    .unwrap();
    ns::exec(
        &wan_ns,
        &["ip", "link", "set", "wgp-wan", "master", "wan", "up"],
    )
    .unwrap();
    ns::exec(
        &wg_ns,
        &["ip", "addr", "add", "10.99.0.200/24", "dev", "wan0"],
    )
    .unwrap();
    ns::exec(&wg_ns, &["ip", "link", "set", "wan0", "up"]).unwrap();
    let wg_priv = ns::run(Command::new("wg").arg("genkey"))
        .unwrap()
        .trim()
        .to_owned();
    let wg_pub = ns::sh(&wg_ns, &format!("echo {wg_priv} | wg pubkey"))
        .unwrap()
        .trim()
        .to_owned();
    // The UAPI socket path (/var/run/wireguard/<dev>.sock) is machine-wide: a unique name.
    let dev = format!("wgi{}", std::process::id() % 100_000);
    let wgd = Bg::spawn({
        let mut c = ns::command(&wg_ns, &["wireguard-go", "-f", &dev]);
        c.env("WG_PROCESS_FOREGROUND", "1");
        c
    });
    let mut tries = 0;
    while !ns::exec(&wg_ns, &["ip", "-o", "link"])
        .unwrap()
        .contains(dev.as_str())
    {
        tries += 1;
        assert!(tries < 100, "wireguard-go did not create wg0");
        std::thread::sleep(Duration::from_millis(20));
    }
    let keyfile = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(keyfile.path(), &wg_priv).unwrap();
    let n1_pub = n1.public_key.clone().unwrap();
    ns::exec(
        &wg_ns,
        &[
            "wg",
            "set",
            &dev,
            "private-key",
            keyfile.path().to_str().unwrap(),
            "listen-port",
            "51820",
            "peer",
            &n1_pub,
            "endpoint",
            &format!("{}:51820", n1.underlay),
            "allowed-ips",
            "10.244.1.0/24",
        ],
    )
    .unwrap();
    ns::exec(
        &wg_ns,
        &["ip", "addr", "add", "10.244.200.1/32", "dev", &dev],
    )
    .unwrap();
    ns::exec(&wg_ns, &["ip", "link", "set", &dev, "up"]).unwrap();
    ns::exec(
        &wg_ns,
        &["ip", "route", "add", "10.244.1.0/24", "dev", &dev],
    )
    .unwrap();
    // The mistnet side learns the stock peer through its config and a SIGHUP reload.
    let cfg_path = n1.dir.join("mistnetd.toml");
    let mut cfg = std::fs::read_to_string(&cfg_path).unwrap();
    cfg.push_str(&format!("\n[[peers]]\nname = \"wggo\"\npublic_key = \"{wg_pub}\"\nendpoints = [\"10.99.0.200:51820\"]\npod_cidrs = [\"10.244.200.0/24\"]\n"));
    std::fs::write(&cfg_path, cfg).unwrap();
    // SAFETY: signalling the daemon this lab started.
    unsafe { libc::kill(n1.daemon_pid.unwrap() as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(300));
    let pod = ip(&lab, "n1-p1");
    // Both directions: the stock peer initiates to the pod, and the pod to the stock peer.
    let out = ns::output(&mut ns::command(
        &wg_ns,
        &["ping", "-c", "3", "-i", "0.2", "-W", "2", &pod],
    ))
    .unwrap();
    assert!(
        out.status.success(),
        "wireguard-go -> mistnet pod: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        lab.logs()
    );
    assert!(
        lab.ping("n1-p1", "10.244.200.1", 3).unwrap(),
        "mistnet pod -> wireguard-go"
    );
    let st = lab.daemon_status("n1").unwrap();
    let peer = st["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "wggo")
        .unwrap()
        .clone();
    assert!(peer["latestHandshakeSecondsAgo"].is_u64(), "{st:#}");
    drop(wgd);
    ns::del(&wg_ns);
    let _ = std::fs::remove_file(format!("/var/run/wireguard/{dev}.sock"));
}

/// A background process killed (and reaped) on drop.
struct Bg(Child);

impl Bg {
    fn spawn(mut cmd: Command) -> Self {
        Bg(cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap())
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        // SAFETY: signalling our own child (SIGINT lets tcpdump flush its file).
        unsafe { libc::kill(self.0.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn sighup_reload_keeps_sessions() {
    let lab = Lab::up(&spec("ovhup", 2, 1)).unwrap();
    let b = ip(&lab, "n2-p1");
    assert!(lab.ping("n1-p1", &b, 2).unwrap());
    let before = lab.daemon_status("n1").unwrap()["peers"][0].clone();
    // Reload with an unchanged config: the session must survive (no new handshake needed).
    let pid = lab.node("n1").unwrap().daemon_pid.unwrap();
    // SAFETY: signalling the daemon this lab started.
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        lab.ping("n1-p1", &b, 2).unwrap(),
        "traffic after reload\n{}",
        lab.logs()
    );
    let after = lab.daemon_status("n1").unwrap()["peers"][0].clone();
    assert!(
        after["latestHandshakeSecondsAgo"].as_u64().unwrap()
            >= before["latestHandshakeSecondsAgo"].as_u64().unwrap()
    );
    assert!(
        after["txBytes"].as_u64().unwrap() > before["txBytes"].as_u64().unwrap(),
        "counters continue: same session"
    );
    assert!(lab.logs().contains("reloaded"), "{}", lab.logs());
}

#[test]
fn second_underlay_socket_carries_a_peer_and_replies_follow_it() {
    let mut lab = Lab::up(&spec("ovsock", 2, 1)).unwrap();
    // n1 listens on two ports; n2 reaches n1 on the second one only.
    let (n1_dir, n2_dir) = (
        lab.node("n1").unwrap().dir.clone(),
        lab.node("n2").unwrap().dir.clone(),
    );
    let n1_underlay = lab.node("n1").unwrap().underlay.to_string();
    let n1_conf = std::fs::read_to_string(n1_dir.join("mistnetd.toml")).unwrap();
    std::fs::write(
        n1_dir.join("mistnetd.toml"),
        // Plain WireGuard roaming (no path selector) is what this test is about.
        format!("listen_ports = [51820, 51821]\n{n1_conf}\n[paths]\nenabled = false\n"),
    )
    .unwrap();
    let n2_conf = std::fs::read_to_string(n2_dir.join("mistnetd.toml")).unwrap();
    let old = format!("\"{n1_underlay}:51820\"");
    assert!(n2_conf.contains(&old), "{n2_conf}");
    std::fs::write(
        n2_dir.join("mistnetd.toml"),
        format!(
            "{}\n[paths]\nenabled = false\n",
            n2_conf.replace(&old, &format!("\"{n1_underlay}:51821\""))
        ),
    )
    .unwrap();
    lab.restart_daemon("n1").unwrap();
    lab.restart_daemon("n2").unwrap();
    let a = ip(&lab, "n1-p1");
    // n2 speaks first, so n1 learns n2 on its second socket and answers from it.
    assert!(
        lab.ping("n2-p1", &a, 3).unwrap(),
        "ping over the second socket\n{}",
        lab.logs()
    );
    let st1 = lab.daemon_status("n1").unwrap();
    assert_eq!(
        st1["listenPorts"],
        serde_json::json!([51820, 51821]),
        "{st1:#}"
    );
    assert_eq!(st1["peers"][0]["localPort"], 51821, "{st1:#}");
    let st2 = lab.daemon_status("n2").unwrap();
    assert_eq!(
        st2["peers"][0]["endpoint"],
        format!("{n1_underlay}:51821"),
        "{st2:#}"
    );
    assert!(lab.ping("n1-p1", &ip(&lab, "n2-p1"), 2).unwrap());
}
