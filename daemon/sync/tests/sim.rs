//! Scenario tests over the simulated network: 300 ms RTT, 5% loss, partitions.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use mistnet_sync::Config;
use mistnet_sync::sim::{NetConfig, Sim, Topology, sample_record};

const AUTHORITY_SECRET: [u8; 32] = [42; 32];

fn authority_config() -> Config {
    let pk = ed25519_dalek::SigningKey::from_bytes(&AUTHORITY_SECRET)
        .verifying_key()
        .to_bytes();
    Config {
        authority: Some(pk),
        ..Config::default()
    }
}

fn assert_converged(sim: &Sim) {
    let maps = sim.maps();
    assert!(maps.windows(2).all(|w| w[0] == w[1]), "replicas differ");
}

/// A full mesh of `n` replicas on the default simulated network, run until converged.
fn converged_mesh(n: u32, config: Config, t0: Instant) -> Sim {
    let mut sim = Sim::new(n, Topology::FullMesh, config, NetConfig::default(), t0);
    sim.run_until(t0 + secs(60), Duration::from_millis(200), |s| s.converged())
        .expect("initial convergence");
    sim
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[test]
fn hundred_nodes_converge() {
    let t0 = Instant::now();
    let mut sim = Sim::new(
        100,
        Topology::FullMesh,
        Config::default(),
        NetConfig::default(),
        t0,
    );
    let at = sim
        .run_until(t0 + secs(60), Duration::from_millis(100), |s| s.converged())
        .expect("converged");
    assert_converged(&sim);
    assert_eq!(sim.maps()[0].len(), 100);
    let per_node = sim.bytes / 100;
    eprintln!("100 nodes: {:?}, {} B/node", at - t0, per_node);
    assert!(at - t0 < secs(15), "took {:?}", at - t0);
    assert!(per_node < 200_000, "{per_node} B/node");
}

#[test]
#[cfg_attr(debug_assertions, ignore = "1000 signatures: run with --release")]
fn thousand_nodes_converge() {
    let t0 = Instant::now();
    let mut sim = Sim::new(
        1000,
        Topology::Random(8),
        Config::default(),
        NetConfig::default(),
        t0,
    );
    let at = sim
        .run_until(t0 + secs(120), Duration::from_millis(500), |s| {
            s.converged()
        })
        .expect("converged");
    assert_converged(&sim);
    assert_eq!(sim.maps()[0].len(), 1000);
    let per_node = sim.bytes / 1000;
    eprintln!("1000 nodes: {:?}, {} B/node", at - t0, per_node);
    assert!(at - t0 < secs(40), "took {:?}", at - t0);
    assert!(per_node < 2_000_000, "{per_node} B/node");
}

#[test]
fn partition_heals_and_converges() {
    let t0 = Instant::now();
    let mut sim = converged_mesh(60, Config::default(), t0);
    sim.partition(|i| u8::from(i >= 30));
    for i in [1u32, 2, 40, 41] {
        sim.with(i, |r, now| {
            r.update_own(|rec| rec.zone = format!("moved-{i}"), now)
                .unwrap()
        });
    }
    sim.run_for(secs(30));
    assert!(!sim.converged());
    let before = sim.bytes;
    let healed = sim.now;
    sim.heal();
    let at = sim
        .run_until(healed + secs(120), Duration::from_millis(100), |s| {
            s.converged()
        })
        .expect("healed");
    assert_converged(&sim);
    let bytes = sim.bytes - before;
    eprintln!("partition heal: {:?}, {} B", at - healed, bytes);
    assert!(at - healed < secs(30), "took {:?}", at - healed);
    assert!(bytes < 2_000_000, "{bytes} B");
    let versions: Vec<u64> = sim.nodes[0]
        .sut
        .records()
        .filter(|r| r.zone.starts_with("moved"))
        .map(|r| r.version)
        .collect();
    assert_eq!(versions, vec![2; 4]);
    // The other side held version 1 of each changed record: it got deltas.
    let applied: u64 = sim.nodes.iter().map(|n| n.sut.stats().deltas_applied).sum();
    assert!(applied > 0);
}

#[test]
fn node_that_missed_changes_ignores_their_deltas_and_catches_up() {
    let t0 = Instant::now();
    let mut sim = converged_mesh(30, Config::default(), t0);
    sim.nodes[5].up = false;
    for zone in ["a", "b"] {
        sim.with(7, |r, now| {
            r.update_own(|rec| rec.zone = zone.into(), now).unwrap()
        });
        sim.run_for(secs(5));
    }
    sim.nodes[5].up = true;
    sim.with(5, |_, _| ());
    // The next change reaches node 5 as deltas from version 3, which it lacks.
    sim.with(7, |r, now| {
        r.update_own(|rec| rec.zone = "c".into(), now).unwrap()
    });
    let back = sim.now;
    let at = sim
        .run_until(back + secs(60), Duration::from_millis(100), |s| {
            s.converged()
        })
        .expect("caught up");
    assert_converged(&sim);
    let node5 = sim.nodes[5].sut.stats();
    assert!(node5.deltas_no_base > 0, "{node5:?}");
    assert!(
        sim.nodes[5]
            .sut
            .records()
            .any(|r| r.zone == "c" && r.version == 4)
    );
    eprintln!("caught up: {:?}", at - back);
    assert!(at - back < secs(20));
}

#[test]
fn tombstone_during_partition_is_not_resurrected() {
    let t0 = Instant::now();
    let mut sim = converged_mesh(40, authority_config(), t0);
    // Node 39 dies; the other side (20..39) still has its live record.
    let victim = sim.nodes[39].sut.identity();
    sim.nodes[39].up = false;
    sim.partition(|i| u8::from(i >= 20));
    sim.with(0, |r, now| {
        r.tombstone(AUTHORITY_SECRET, victim, now).unwrap()
    });
    sim.run_for(secs(30));
    assert!(sim.nodes[25].sut.records().any(|r| r.identity == victim));
    sim.heal();
    let healed = sim.now;
    sim.run_until(healed + secs(120), Duration::from_millis(100), |s| {
        s.converged()
    })
    .expect("healed");
    assert_converged(&sim);
    for n in sim.nodes.iter().filter(|n| n.up) {
        assert!(!n.sut.records().any(|r| r.identity == victim));
    }
}

#[test]
fn restart_from_persisted_state_converges() {
    let t0 = Instant::now();
    let mut sim = converged_mesh(30, Config::default(), t0);
    for _ in 0..3 {
        sim.with(7, |r, now| {
            r.update_own(|rec| rec.zone.push('x'), now).unwrap()
        });
    }
    sim.run_until(sim.now + secs(60), Duration::from_millis(200), |s| {
        s.converged()
    })
    .expect("updates");
    let before = sim.nodes[7].sut.own().version;
    sim.restart(7);
    assert!(
        sim.nodes[7].sut.own().version > before,
        "version must not go backwards"
    );
    assert_eq!(sim.nodes[7].sut.records().count(), 30);
    sim.with(7, |r, now| {
        r.update_own(|rec| rec.zone = "after-restart".into(), now)
            .unwrap()
    });
    let at = sim.run_until(sim.now + secs(60), Duration::from_millis(100), |s| {
        s.converged()
    });
    assert!(at.is_some());
    assert_converged(&sim);
    assert!(
        sim.nodes[3]
            .sut
            .records()
            .any(|r| r.zone == "after-restart")
    );
}

#[test]
fn new_node_with_one_seed_learns_the_cluster() {
    let t0 = Instant::now();
    let mut sim = converged_mesh(50, Config::default(), t0);
    sim.run_for(secs(60)); // back off to the steady state
    let joined = sim.now;
    let n = sim.add_node(sample_record(50), &[3]);
    sim.link(3, n);
    let at = sim
        .run_until(joined + secs(60), Duration::from_millis(100), |s| {
            s.converged() && s.maps()[0].len() == 51
        })
        .expect("joined");
    assert_converged(&sim);
    assert_eq!(sim.nodes[n as usize].sut.records().count(), 51);
    eprintln!("join: {:?}", at - joined);
    assert!(at - joined < secs(20));
}

#[test]
fn steady_state_traffic_is_tiny() {
    let t0 = Instant::now();
    let mut sim = converged_mesh(40, Config::default(), t0);
    sim.run_for(secs(60));
    let before = sim.bytes;
    sim.run_for(secs(300));
    let per_node_per_sec = (sim.bytes - before) as f64 / 40.0 / 300.0;
    eprintln!("steady: {per_node_per_sec:.1} B/s/node");
    assert!(per_node_per_sec < 100.0);
}
