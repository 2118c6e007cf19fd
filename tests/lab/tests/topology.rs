//! Root tests of the lab's edge topologies: several underlay networks per node, zones, nodes
//! behind NAT routers. They test the lab's wiring (node to node over each network, through
//! NAT), not the overlay, so they run without mistnetd. Needs root and the binaries built next
//! to this test (scripts/test.sh); fails, never skips, without them.
#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};

use mistlab::{Lab, LabSpec};

const TWO_NETWORKS: &str = r#"
[networks.wlan0]
subnet = "10.99.0.0/24"
default = "delay=1ms"
cost = 10
metered = false
[networks.lte0]
subnet = "10.98.0.0/24"
default = "delay=5ms"
cost = 50
metered = true
[nodes.n1]
zone = "field-a"
[nodes.n2]
zone = "field-b"
[links.lte0]
"n1-n2" = "delay=4ms"
"#;

#[test]
fn two_networks_each_carry_traffic_and_cut_separately() {
    let before = root_snapshot();
    let spec = spec("tnets", 2).with_topology_str(TWO_NETWORKS).unwrap();
    let mut lab = Lab::up(&spec).unwrap();

    // mistnetd.toml: one [[underlay]] per network, the zone, every address of the peer.
    let conf = std::fs::read_to_string(lab.node("n1").unwrap().dir.join("mistnetd.toml")).unwrap();
    assert_eq!(conf.matches("[[underlay]]").count(), 2, "{conf}");
    assert!(
        conf.contains(
            "[[underlay]]\ninterface = \"wlan0\"\nport = 51820\ncost = 10\nmetered = false\n"
        ),
        "{conf}"
    );
    assert!(
        conf.contains(
            "[[underlay]]\ninterface = \"lte0\"\nport = 51820\ncost = 50\nmetered = true\n"
        ),
        "{conf}"
    );
    assert!(conf.contains("zone = \"field-a\"\n"), "{conf}");
    assert!(
        conf.contains("endpoints = [\"10.99.0.2:51820\", \"10.98.0.2:51820\"]"),
        "{conf}"
    );
    assert!(!conf.contains("underlay_interfaces"), "{conf}");

    // Each node has both interfaces with its addresses.
    for (node, i) in [("n1", 1), ("n2", 2)] {
        let info = lab.node(node).unwrap();
        assert_eq!(info.interfaces.len(), 2);
        for (net, prefix) in [("wlan0", "10.99.0"), ("lte0", "10.98.0")] {
            let want = format!("{prefix}.{i}");
            assert_eq!(info.interface(net).unwrap().addr.to_string(), want);
            let out = lab
                .exec(node, &["ip", "-o", "-4", "addr", "show", "dev", net])
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains(&format!("{want}/24")), "{node} {net}: {text}");
        }
    }
    let status = lab.status();
    assert_eq!(
        status["networks"].as_array().unwrap().len(),
        2,
        "{status:#}"
    );
    assert_eq!(status["nodes"][1]["zone"], "field-b", "{status:#}");

    // Node to node over each network separately.
    assert!(lab.ping("n1", "10.99.0.2", 2).unwrap(), "over wlan0");
    assert!(lab.ping("n1", "10.98.0.2", 2).unwrap(), "over lte0");

    // Cutting wlan0's n1-n2 link leaves lte0 alone.
    lab.link_spec_on("wlan0", "n1", "n2", "down").unwrap();
    assert!(!lab.ping("n1", "10.99.0.2", 2).unwrap(), "wlan0 is cut");
    assert!(
        lab.ping("n1", "10.98.0.2", 2).unwrap(),
        "lte0 still carries"
    );
    let stats = lab.link_stats("wlan0").unwrap();
    assert!(
        stats
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["link"] == "n1>n2" && l["dropped_down"].as_u64().unwrap() > 0),
        "{stats:#}"
    );
    // link_spec keeps meaning the first network.
    lab.link_spec("n1", "n2", "up").unwrap();
    assert!(lab.ping("n1", "10.99.0.2", 3).unwrap(), "wlan0 restored");

    let report = lab.down().unwrap();
    assert_eq!(
        report.processes.len(),
        2,
        "one emulator per network: {report:?}"
    );
    assert_gone("tnets", &before);
}

const NAT: &str = r#"
[networks.wlan0]
subnet = "10.99.0.0/24"
default = "delay=1ms"
cost = 10
[nodes.n1]
zone = "field-a"
nat = "masquerade"
[nodes.n3]
nat = "symmetric"
port_forward = true
"#;

#[test]
fn nat_node_reaches_the_wan_as_its_router() {
    let before = root_snapshot();
    let spec = spec("tnat", 3).with_topology_str(NAT).unwrap();
    let lab = Lab::up(&spec).unwrap();
    let bin = spec.bin_dir.join("netbench");

    // The router exists and holds the node's WAN address; the node has a private one.
    let n1 = lab.node("n1").unwrap().clone();
    let router = lab.router("n1").unwrap().clone();
    assert_eq!(router.name, "n1r");
    assert!(mistlab::ns::list("ml-tnat-").contains(&router.netns));
    assert_eq!(n1.underlay.to_string(), "192.168.1.2");
    assert_eq!(n1.wan_addr("wlan0").unwrap().to_string(), "10.99.0.1");
    let out = lab
        .exec("n1r", &["ip", "-o", "-4", "addr", "show", "dev", "wlan0"])
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("10.99.0.1/24"));

    // Configs: no endpoint for a NATed peer without a port forward, the router's address
    // with one; NATed nodes keep their mappings open every 5 s.
    let conf =
        |n: &str| std::fs::read_to_string(lab.node(n).unwrap().dir.join("mistnetd.toml")).unwrap();
    let n2 = conf("n2");
    assert!(n2.contains("name = \"n1\"\npublic_key"), "{n2}");
    let peer_n1 = &n2[n2.find("name = \"n1\"").unwrap()..];
    assert!(peer_n1.contains("endpoints = []"), "{n2}");
    let peer_n3 = &n2[n2.find("name = \"n3\"").unwrap()..];
    assert!(
        peer_n3.contains("endpoints = [\"10.99.0.3:51820\"]"),
        "{n2}"
    );
    assert!(n2.contains("persistent_keepalive = 10"), "{n2}");
    let n1c = conf("n1");
    assert!(n1c.contains("persistent_keepalive = 5"), "{n1c}");
    assert!(!n1c.contains("persistent_keepalive = 10"), "{n1c}");

    // n2 counts what arrives from the router's address and from n1's private one.
    lab.exec(
        "n2",
        &[
            "nft",
            "add table ip t; add chain ip t in { type filter hook input priority 0; }; \
             add rule ip t in ip saddr 10.99.0.1 udp dport 9300 counter; \
             add rule ip t in ip saddr 192.168.1.2 counter",
        ],
    )
    .map(|o| assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr)))
    .unwrap();
    let _server = Server::start(&lab, "n2", &bin, 9300);

    // Ping and a UDP exchange from behind the NAT.
    assert!(
        lab.ping("n1", "10.99.0.2", 2).unwrap(),
        "n1 reaches n2 through its NAT"
    );
    let rtt = lab
        .exec(
            "n1",
            &[
                bin.to_str().unwrap(),
                "rtt",
                "10.99.0.2",
                "-t",
                "1s",
                "-i",
                "20ms",
                "--json",
            ],
        )
        .unwrap();
    let text = String::from_utf8_lossy(&rtt.stdout);
    assert!(
        rtt.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&rtt.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(r["received"].as_u64().unwrap() > 0, "{r:#}");
    let rules = String::from_utf8_lossy(
        &lab.exec("n2", &["nft", "list", "chain", "ip", "t", "in"])
            .unwrap()
            .stdout,
    )
    .into_owned();
    let counts: Vec<u64> = rules
        .lines()
        .filter_map(|l| l.split("packets ").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(counts.len(), 2, "{rules}");
    assert!(
        counts[0] > 0,
        "n2 sees the router's address as the source: {rules}"
    );
    assert_eq!(
        counts[1], 0,
        "n1's private address never reaches the WAN: {rules}"
    );

    // Nothing gets in unasked: n1's private address is unreachable from the WAN.
    assert!(!lab.ping("n2", "192.168.1.2", 1).unwrap());

    // n3's router forwards UDP 51820 to n3.
    let _fwd = Server::start(&lab, "n3", &bin, 51820);
    let rtt = lab
        .exec(
            "n2",
            &[
                bin.to_str().unwrap(),
                "rtt",
                "10.99.0.3:51820",
                "-t",
                "500ms",
                "-i",
                "20ms",
                "--json",
            ],
        )
        .unwrap();
    assert!(
        rtt.status.success(),
        "port forward: {}",
        String::from_utf8_lossy(&rtt.stderr)
    );

    drop(_server);
    drop(_fwd);
    let report = lab.down().unwrap();
    assert!(
        report.namespaces.contains(&"ml-tnat-n1r".to_owned()),
        "{report:?}"
    );
    assert_gone("tnat", &before);
}

#[test]
fn bad_topologies_are_refused_naming_the_field() {
    let err = |text: &str| {
        let spec = spec("tbad", 2).with_topology_str(text);
        let e = spec.and_then(|s| Lab::up(&s).map(|_| ()));
        format!("{:#}", e.err().unwrap())
    };
    let e = err("[networks.wlan0]\n[nodes.n1]\nnetworks = [\"lte0\"]\n");
    assert!(e.contains("nodes.n1.networks"), "{e}");
    let e = err("[networks.wlan0]\n[links.wlan0]\n\"n1-n7\" = \"lte\"\n");
    assert!(e.contains("links.wlan0"), "{e}");
    let e = err("[networks.wlan0]\n[links.wlan0]\n\"n1-n2\" = \"warp=9\"\n");
    assert!(e.contains("wlan0") && e.contains("warp"), "{e}");
    assert!(mistlab::ns::list("ml-tbad-").is_empty());
    assert!(!mistlab::lab::state_dir("tbad").exists());
}

/// A `netbench server` in a node, stopped on drop (deleting a namespace does not stop the
/// processes in it).
struct Server(Child);

impl Server {
    fn start(lab: &Lab, node: &str, bin: &std::path::Path, port: u16) -> Server {
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.node(node).unwrap().netns])
            .arg(bin)
            .args(["server", "--port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Ready once the UDP port is bound.
        for _ in 0..100 {
            let out = lab.exec(node, &["ss", "-Hlun"]).unwrap();
            if String::from_utf8_lossy(&out.stdout).contains(&format!(":{port} ")) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Server(child)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spec(name: &str, nodes: usize) -> LabSpec {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "lab tests create network namespaces: run as root (sudo scripts/test.sh)"
    );
    let spec = LabSpec::new(name, nodes, 0).without_daemons();
    for bin in ["mistnet", "mistnetd", "netbench"] {
        assert!(
            spec.bin_dir.join(bin).exists(),
            "{} has no {bin} binary: run `cargo build --workspace --bins` first",
            spec.bin_dir.display()
        );
    }
    spec
}

/// Nothing of the lab is left: namespaces, state, processes, and the root namespace's links,
/// routes and rules are as before.
fn assert_gone(name: &str, before: &str) {
    let left = mistlab::ns::list(&format!("ml-{name}-"));
    assert!(left.is_empty(), "namespaces left: {left:?}");
    assert!(!mistlab::lab::state_dir(name).exists(), "state dir left");
    let marker = mistlab::lab::state_dir(name).display().to_string() + "/";
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            assert!(!cmd.contains(&marker), "process left: {cmd}");
        }
    }
    assert_eq!(root_snapshot(), before, "root namespace changed");
}

fn root_snapshot() -> String {
    ["route show", "-6 route show", "rule show", "-o link show"]
        .iter()
        .map(|a| mistlab::ns::ip(&a.split(' ').collect::<Vec<_>>()).unwrap())
        .collect()
}
