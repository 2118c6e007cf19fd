//! Root tests of the lab itself: it comes up, pods reach each other, it leaves nothing behind,
//! and labs coexist. Needs root (CI runs as root) and the `mistnet` binary built next to this
//! test (scripts/test.sh builds every binary first); fails, never skips, without them.
#![allow(clippy::unwrap_used)]

use mistlab::{Lab, LabSpec};

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "lab tests create network namespaces: run as root (sudo scripts/test.sh)"
    );
}

fn spec(name: &str, nodes: usize, pods: usize) -> LabSpec {
    require_root();
    let spec = LabSpec::new(name, nodes, pods);
    assert!(
        spec.bin_dir.join("mistnet").exists(),
        "{} has no mistnet binary: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        spec.bin_dir.display()
    );
    spec
}

/// Nothing of the lab is left on the machine: namespaces, state, routes in the root namespace.
fn assert_gone(name: &str, root_routes_before: &str) {
    let prefix = format!("ml-{name}-");
    let left = mistlab::ns::list(&prefix);
    assert!(left.is_empty(), "namespaces left: {left:?}");
    assert!(!mistlab::lab::state_dir(name).exists(), "state dir left");
    assert_eq!(
        root_routes(),
        root_routes_before,
        "root namespace routes changed"
    );
}

fn root_routes() -> String {
    mistlab::ns::ip(&["route", "show"]).unwrap()
        + &mistlab::ns::ip(&["-6", "route", "show"]).unwrap()
        + &mistlab::ns::ip(&["rule", "show"]).unwrap()
        + &mistlab::ns::ip(&["-o", "link", "show"]).unwrap()
}

#[test]
fn three_node_lab_full_pod_mesh_and_clean_down() {
    let before = root_routes();
    let lab = Lab::up(&spec("tmesh", 3, 2)).unwrap();
    assert_eq!(lab.pods().len(), 6);
    let pods = lab.pods().to_vec();
    for a in &pods {
        for b in &pods {
            if a.name != b.name {
                assert!(
                    lab.ping(&a.name, &b.ips[0], 1).unwrap(),
                    "{} cannot reach {} ({})\n{}",
                    a.name,
                    b.name,
                    b.ips[0],
                    lab.logs()
                );
            }
        }
    }
    let report = lab.down().unwrap();
    assert_eq!(report.namespaces.len(), 3 + 6 + 1, "{report:?}");
    assert_gone("tmesh", &before);
    // down is idempotent.
    let again = Lab::down_by_name("tmesh").unwrap();
    assert!(again.namespaces.is_empty() && !again.state_dir_removed);
}

#[test]
fn two_labs_coexist() {
    let a = Lab::up(&spec("tcoa", 2, 1)).unwrap();
    let b = Lab::up(&spec("tcob", 2, 1)).unwrap();
    // Same addresses in both labs: they are separate worlds.
    assert_eq!(a.pods()[0].ips, b.pods()[0].ips);
    assert!(a.ping("n1-p1", &a.pod("n2-p1").unwrap().ips[0], 1).unwrap());
    drop(a);
    assert!(
        b.ping("n1-p1", &b.pod("n2-p1").unwrap().ips[0], 1).unwrap(),
        "lab b broke when lab a went down"
    );
    assert!(Lab::open("tcoa").is_err());
    b.down().unwrap();
}

#[test]
fn down_cleans_a_half_dead_lab() {
    let before = root_routes();
    let lab = Lab::up(&spec("thalf", 2, 1)).unwrap();
    lab.keep();
    // Simulate a crash that lost part of the lab: a pod namespace vanished behind our back.
    let lab = Lab::open("thalf").unwrap();
    mistlab::ns::del(&lab.pod("n1-p1").unwrap().netns);
    drop(lab);
    let report = Lab::down_by_name("thalf").unwrap();
    assert!(report.state_dir_removed);
    assert_gone("thalf", &before);
}

#[test]
fn a_second_up_with_the_same_name_is_refused() {
    let lab = Lab::up(&spec("tdup", 1, 0)).unwrap();
    let err = Lab::up(&spec("tdup", 1, 0)).err().unwrap();
    assert!(format!("{err:#}").contains("already exists"), "{err:#}");
    assert!(
        lab.node("n1").is_ok(),
        "the failed second up must not touch the first lab"
    );
    lab.down().unwrap();
}

#[test]
fn killed_daemon_is_reported_and_down_still_cleans_up() {
    let before = root_routes();
    let mut lab = Lab::up(&spec("tkill", 2, 1)).unwrap();
    let status = lab.status();
    assert_eq!(status["nodes"][0]["daemonAlive"], true, "{status:#}");
    assert_eq!(status["nodes"][0]["peers"][0]["name"], "n2", "{status:#}");
    lab.kill_daemon("n1").unwrap();
    let status = lab.status();
    assert_eq!(status["nodes"][0]["daemonAlive"], false, "{status:#}");
    assert_eq!(status["nodes"][1]["daemonAlive"], true, "{status:#}");
    lab.keep();
    let report = Lab::down_by_name("tkill").unwrap();
    assert_eq!(
        report.processes.len(),
        1,
        "only the live daemon needed stopping: {report:?}"
    );
    assert_gone("tkill", &before);
    assert!(!mistlab::lab::process_alive(
        status["nodes"][1]["daemonPid"].as_u64().unwrap() as u32
    ));
}

#[test]
fn link_loss_and_cut_are_applied_and_lifted() {
    let mut lab = Lab::up(&spec("tlink", 3, 1)).unwrap();
    // The underlay itself, node to node: pods would be carried around the cut through n3
    // (path selection relays), which the path tests cover.
    let to_n2 = lab.node("n2").unwrap().underlay.to_string();
    let to_n3 = lab.node("n3").unwrap().underlay.to_string();
    assert!(lab.ping("n1", &to_n2, 1).unwrap());
    lab.link_set(
        "n1",
        "n2",
        mistlab::LinkImpairment {
            loss_pct: 0.0,
            down: true,
        },
    )
    .unwrap();
    assert!(
        !lab.ping("n1", &to_n2, 2).unwrap(),
        "a cut link carries nothing"
    );
    assert!(
        lab.ping("n1", &to_n3, 1).unwrap(),
        "other links are untouched"
    );
    lab.link_set(
        "n1",
        "n2",
        mistlab::LinkImpairment {
            loss_pct: 100.0,
            down: false,
        },
    )
    .unwrap();
    assert!(
        !lab.ping("n1", &to_n2, 2).unwrap(),
        "100% loss carries nothing"
    );
    lab.link_set("n1", "n2", mistlab::LinkImpairment::default())
        .unwrap();
    assert!(lab.links().is_empty());
    assert!(lab.ping("n1", &to_n2, 3).unwrap(), "restored");
    // Pods were never cut off: the overlay went around the cut link.
    let pod_n2 = lab.pod("n2-p1").unwrap().ips[0].clone();
    assert!(lab.ping("n1-p1", &pod_n2, 3).unwrap(), "{}", lab.logs());
}

#[test]
fn pod_delete_is_handed_to_the_daemon_and_leaves_nothing() {
    let mut lab = Lab::up(&spec("tdel", 1, 2)).unwrap();
    let node_ns = lab.node("n1").unwrap().netns.clone();
    let veths = || {
        mistlab::ns::exec(&node_ns, &["ip", "-o", "link"])
            .unwrap()
            .matches("mist")
            .count()
    };
    let before = veths();
    lab.del_pod("n1-p1").unwrap();
    // When DEL returns the veth is gone, though the daemon's thread did the deletion.
    assert_eq!(veths(), before - 1);
    // The daemon counts the deletion once the kernel's post-unregister wait is over, which is
    // after DEL has already returned.
    let mut st = lab.daemon_status("n1").unwrap();
    for _ in 0..100 {
        if st["stats"]["podVethsDeleted"] == 1 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
        st = lab.daemon_status("n1").unwrap();
    }
    assert_eq!(st["stats"]["podVethsDeleted"], 1, "{st:#}");
    // Without the daemon, DEL deletes in-process.
    lab.stop_daemon("n1").unwrap();
    lab.del_pod("n1-p2").unwrap();
    assert_eq!(veths(), before - 2 - 1, "pod veths and mist0 gone");
}

#[test]
fn emulated_underlay_profiles_and_runtime_changes() {
    let mut s = spec("temu", 2, 1);
    s.profile = Some("delay=20ms".into());
    let mut lab = Lab::up(&s).unwrap();
    assert!(lab.emulated());
    let dst = lab.pod("n2-p1").unwrap().ips[0].clone();
    let rtt = |lab: &Lab| {
        let out = lab
            .exec("n1-p1", &["ping", "-c", "5", "-i", "0.2", "-W", "2", &dst])
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let avg = text
            .lines()
            .find(|l| l.contains("min/avg"))
            .and_then(|l| l.split('=').nth(1))
            .and_then(|v| v.trim().split('/').nth(1))
            .and_then(|v| v.parse::<f64>().ok());
        (out.status.success(), avg)
    };
    let (ok, avg) = rtt(&lab);
    assert!(
        ok,
        "pods reach each other over the emulated WAN\n{}",
        lab.logs()
    );
    // 20 ms each way on the underlay: the overlay round trip is at least 40 ms.
    assert!(avg.unwrap() >= 39.0, "{avg:?}");
    lab.link_spec("n1", "n2", "delay=60ms").unwrap();
    let (_, avg) = rtt(&lab);
    assert!(avg.unwrap() >= 119.0, "{avg:?}");
    lab.link_set(
        "n1",
        "n2",
        mistlab::LinkImpairment {
            loss_pct: 0.0,
            down: true,
        },
    )
    .unwrap();
    assert!(!lab.ping("n1-p1", &dst, 2).unwrap(), "cut");
    lab.link_set("n1", "n2", mistlab::LinkImpairment::default())
        .unwrap();
    assert!(lab.ping("n1-p1", &dst, 3).unwrap(), "restored");
    let report = lab.down().unwrap();
    assert!(
        report.processes.len() >= 3,
        "two daemons and the emulator: {report:?}"
    );
}
