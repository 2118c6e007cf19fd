//! Root tests of the control channel in a mistlab: nodes learn each other from replicated,
//! signed records; a partition keeps both sides working; a node added on one side reaches the
//! other side once the partition heals. Needs root (network namespaces); CI runs as root.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use mistlab::{Lab, LabSpec};
use serde_json::Value;

fn spec(name: &str, nodes: usize) -> LabSpec {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "control channel tests need root (sudo scripts/test.sh)"
    );
    let mut s = LabSpec::new(name, nodes, 1);
    // An emulated WAN: links can be cut to partition the cluster.
    s.profile = Some("delay=5ms".into());
    s
}

#[test]
fn partition_then_a_node_joins_one_side_and_everyone_converges_after_heal() {
    let mut lab = Lab::up(&spec("sy4", 5)).unwrap();
    // Start from a 4-node cluster that has never heard of n5: n5 gets only n1 as its seed,
    // n1..n4 forget it (configs and persisted state).
    for n in ["n1", "n2", "n3", "n4", "n5"] {
        lab.stop_daemon(n).unwrap();
    }
    let n5_key = peer_entry(&lab, "n2", "n5");
    for n in ["n1", "n2", "n3", "n4"] {
        edit_peers(&lab, n, |name| name != "n5");
    }
    edit_peers(&lab, "n5", |name| name == "n1");
    for n in ["n1", "n2", "n3", "n4", "n5"] {
        let _ = std::fs::remove_file(lab.node(n).unwrap().dir.join("cluster.state"));
    }
    for n in ["n1", "n2", "n3", "n4"] {
        lab.restart_daemon(n).unwrap();
    }
    let start = Instant::now();
    wait(&lab, "4 nodes converge", Duration::from_secs(20), |lab| {
        converged(lab, &["n1", "n2", "n3", "n4"], 4)
    });
    println!("4 nodes converged in {:?}", start.elapsed());

    // Partition {n1, n2, n5} | {n3, n4}.
    for a in ["n1", "n2", "n5"] {
        for b in ["n3", "n4"] {
            lab.link_spec(a, b, "down").unwrap();
        }
    }
    // n5 joins side A: registered at its seed n1 (as a node registers with the API server),
    // started with n1 as its only peer.
    add_peer(&lab, "n1", &n5_key);
    reload(&lab, "n1");
    let i5 = lab.nodes().iter().position(|n| n.name == "n5").unwrap();
    lab.start_daemon(i5).unwrap();
    let joined = Instant::now();
    wait(&lab, "side A learns n5", Duration::from_secs(20), |lab| {
        converged(lab, &["n1", "n2", "n5"], 5)
    });
    println!("n5 known on its side in {:?}", joined.elapsed());
    // n2 never had n5 configured: it learned it from n1's gossip, and its pods reach n5's.
    let p5 = lab.pod("n5-p1").unwrap().ips[0].clone();
    assert!(
        lab.ping("n2-p1", &p5, 3).unwrap(),
        "n2 reaches n5 through gossip\n{}",
        lab.logs()
    );
    // Side B keeps working with what it had, and does not know n5 yet.
    let p4 = lab.pod("n4-p1").unwrap().ips[0].clone();
    assert!(lab.ping("n3-p1", &p4, 2).unwrap(), "{}", lab.logs());
    assert_eq!(records(&lab, "n3"), 4, "{}", lab.logs());

    // Heal: every node converges on 5 records and every pod reaches n5's.
    for a in ["n1", "n2", "n5"] {
        for b in ["n3", "n4"] {
            lab.link_spec(a, b, "up").unwrap();
        }
    }
    let healed = Instant::now();
    wait(
        &lab,
        "all converge after heal",
        Duration::from_secs(30),
        |lab| converged(lab, &["n1", "n2", "n3", "n4", "n5"], 5),
    );
    let converge = healed.elapsed();
    for from in ["n3-p1", "n4-p1"] {
        assert!(
            lab.ping(from, &p5, 5).unwrap(),
            "{from} reaches n5 after heal\n{}",
            lab.logs()
        );
    }
    println!(
        "after heal: state converged in {converge:?}, pods connected in {:?}",
        healed.elapsed()
    );
    // n5 learned n3 and n4 by gossip only, and reaches them.
    assert!(lab.ping("n5-p1", &p4, 3).unwrap(), "{}", lab.logs());

    // A restart restores the persisted state: n3 comes back knowing n5 although n5 is not
    // in its config, and reaches it before any gossip could have told it again.
    lab.link_spec("n3", "n1", "down").unwrap();
    lab.link_spec("n3", "n2", "down").unwrap();
    lab.link_spec("n3", "n4", "down").unwrap();
    lab.restart_daemon("n3").unwrap();
    wait(
        &lab,
        "n3 restores its state",
        Duration::from_secs(5),
        |lab| records(lab, "n3") == 5,
    );
    let restarted = Instant::now();
    wait(
        &lab,
        "n3 reaches n5 after restart",
        Duration::from_secs(10),
        |lab| lab.ping("n3-p1", &p5, 1).unwrap_or(false),
    );
    println!("n3 reached n5 {:?} after its restart", restarted.elapsed());

    // The control channel's traffic is exported per message type.
    let sock = lab.node("n1").unwrap().dir.join("mistnetd.sock");
    let out = lab
        .exec(
            "n1",
            &[
                mistlab::lab::default_bin_dir()
                    .join("mistnetd")
                    .to_str()
                    .unwrap(),
                "metrics",
                "--socket",
                sock.to_str().unwrap(),
            ],
        )
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "sync_records 5",
        "sync_tx_bytes_total{type=\"summary\"}",
        "sync_rx_bytes_total{type=\"records\"}",
        "pathsel_path_active{peer=\"n2\"",
        "overlay_rx_packets_total",
    ] {
        assert!(text.contains(want), "metrics lack {want}:\n{text}");
    }
}

// ---- helpers --------------------------------------------------------------------------------

fn sync_of(lab: &Lab, node: &str) -> Option<Value> {
    let st = lab.daemon_status(node).ok()?;
    let s = st["sync"].clone();
    (!s.is_null()).then_some(s)
}

fn records(lab: &Lab, node: &str) -> u64 {
    sync_of(lab, node)
        .and_then(|s| s["records"].as_u64())
        .unwrap_or(0)
}

/// Every node has `n` records and the same state hash.
fn converged(lab: &Lab, nodes: &[&str], n: u64) -> bool {
    let mut hash = None;
    for node in nodes {
        let Some(s) = sync_of(lab, node) else {
            return false;
        };
        if s["records"].as_u64() != Some(n) {
            return false;
        }
        let h = s["state_hash"].as_str().map(str::to_owned);
        if hash.is_some() && hash != h {
            return false;
        }
        hash = h;
    }
    true
}

fn wait(lab: &Lab, what: &str, limit: Duration, mut ok: impl FnMut(&Lab) -> bool) {
    let t = Instant::now();
    while t.elapsed() < limit {
        if ok(lab) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let status: Vec<String> = lab
        .nodes()
        .iter()
        .map(|n| {
            let s = sync_of(lab, &n.name).unwrap_or_default();
            let origins: Vec<String> = s["origins"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|o| format!("{}@{}", o["name"].as_str().unwrap_or("?"), o["version"]))
                .collect();
            format!(
                "{}: {} records, hash {}, origins {origins:?}, peers {}, stats {}",
                n.name, s["records"], s["state_hash"], s["peers"], s["stats"]
            )
        })
        .collect();
    panic!(
        "{what}: not within {limit:?}\n{}\n{}",
        status.join("\n"),
        lab.logs()
    );
}

fn config_path(lab: &Lab, node: &str) -> std::path::PathBuf {
    lab.node(node).unwrap().dir.join("mistnetd.toml")
}

fn read_config(lab: &Lab, node: &str) -> toml::Table {
    std::fs::read_to_string(config_path(lab, node))
        .unwrap()
        .parse()
        .unwrap()
}

fn write_config(lab: &Lab, node: &str, t: &toml::Table) {
    std::fs::write(config_path(lab, node), toml::to_string(t).unwrap()).unwrap();
}

/// Keeps the `[[peers]]` entries of a node's config whose name passes `keep`.
fn edit_peers(lab: &Lab, node: &str, keep: impl Fn(&str) -> bool) {
    let mut t = read_config(lab, node);
    if let Some(toml::Value::Array(peers)) = t.get_mut("peers") {
        peers.retain(|p| keep(p.get("name").and_then(|n| n.as_str()).unwrap_or("")));
    }
    write_config(lab, node, &t);
}

/// The `[[peers]]` entry for `peer` in `node`'s config.
fn peer_entry(lab: &Lab, node: &str, peer: &str) -> toml::Value {
    let t = read_config(lab, node);
    t["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p.get("name").and_then(|n| n.as_str()) == Some(peer))
        .cloned()
        .unwrap()
}

fn add_peer(lab: &Lab, node: &str, entry: &toml::Value) {
    let mut t = read_config(lab, node);
    if let Some(toml::Value::Array(peers)) = t.get_mut("peers") {
        peers.push(entry.clone());
    }
    write_config(lab, node, &t);
}

fn reload(lab: &Lab, node: &str) {
    let pid = lab.node(node).unwrap().daemon_pid.unwrap();
    // SAFETY: a pid the lab started and recorded.
    unsafe { libc::kill(pid as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(200));
}
