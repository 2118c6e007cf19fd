//! Tier 2/3: scenario tests with explicit time, on hand-driven selectors and on the simulated
//! network in `sim/`.
#![allow(clippy::unwrap_used)]

mod sim;

use std::time::Instant;

use mistnet_path::{Config, Event, LocalInfo, PathId, PathState, Reason, Redundancy, Via};
use sim::{Id, Link, Loss, Net, Path, Sel, addr, keys, ms, short_id};

fn quiet() -> Config {
    Config {
        jitter_pct: 0,
        ..Config::default()
    }
}

/// Two nodes, underlays 0 (10 ms one way) and 1 (30 ms), candidates 0→0 and 1→1 both ways.
fn two_paths(cfg: Config, seed: u64) -> Net {
    let mut net = Net::new(&[&[0, 1], &[0, 1]], &[cfg, cfg], seed);
    net.link(0, 0, 1, 0, Link::new(10));
    net.link(0, 1, 1, 1, Link::new(30));
    for (a, b) in [(0, 1), (1, 0)] {
        let c = [PathId::direct(0, addr(b, 0)), PathId::direct(1, addr(b, 1))];
        let now = net.now;
        net.nodes[a as usize].sel.set_candidates(&b, c, now);
    }
    net.flows = vec![(0, 1), (1, 0)];
    net
}

fn p(local: u8, node: Id, remote_local: u8) -> Path {
    PathId::direct(local, addr(node, remote_local))
}

// ---------------------------------------------------------------------------------------------
// First path up, with exact deadlines (hand-driven pair).
// ---------------------------------------------------------------------------------------------

#[test]
fn first_path_up_with_exact_deadlines() {
    let t0 = Instant::now();
    let mut a = Sel::new(quiet(), short_id(0), [1; 32], t0);
    let mut b = Sel::new(quiet(), short_id(1), [2; 32], t0);
    a.add_peer(1, keys(0, 1), t0);
    b.add_peer(0, keys(1, 0), t0);
    assert!(
        a.send_paths(&1).is_empty(),
        "no candidates, nothing to send on"
    );
    let path = p(0, 1, 0);
    a.set_candidates(&1, [path], t0);
    let guess = a.send_paths(&1);
    assert_eq!((guess.active, guess.confirmed), (Some(&path), false));

    let ping = a.poll_transmit().unwrap();
    assert_eq!(ping.path, path);
    assert_eq!(ping.payload.len(), mistnet_path::wire::PING_LEN);
    assert!(a.poll_transmit().is_none());
    assert_eq!(
        a.poll_timeout(),
        Some((t0 + ms(250), "probe")),
        "first retry"
    );

    // B answers the ping and learns A's address as a discovered candidate.
    let t1 = t0 + ms(10);
    b.handle_datagram(0, addr(0, 0), &ping.payload, t1).unwrap();
    let pong = b.poll_transmit().unwrap();
    assert_eq!(pong.path, p(0, 0, 0));
    assert!(matches!(
        b.poll_event(),
        Some(Event::CandidateDiscovered { peer: 0, .. })
    ));

    let t2 = t0 + ms(20);
    a.handle_datagram(0, addr(1, 0), &pong.payload, t2).unwrap();
    assert_eq!(
        a.poll_event(),
        Some(Event::ObservedAddress {
            local: 0,
            addr: addr(0, 0)
        })
    );
    assert_eq!(
        a.poll_event(),
        Some(Event::ActivePathChanged {
            peer: 1,
            from: None,
            to: Some(path),
            reason: Reason::FirstPathUp
        })
    );
    let sp = a.send_paths(&1);
    assert_eq!(
        (sp.active, sp.secondary, sp.confirmed),
        (Some(&path), None, true)
    );
    let st = a.status(&1).unwrap();
    assert_eq!(st.paths[0].state, PathState::Up);
    assert_eq!(st.paths[0].srtt, Some(ms(20)));
    // Warming up (fewer than min_samples replies): probed at the challenge interval.
    assert_eq!(a.poll_timeout(), Some((t0 + ms(250), "probe")));
    // Data makes the peer busy: the active path is probed at the active interval.
    a.handle_data_sent(&1, t0 + ms(30));
    assert_eq!(a.poll_timeout(), Some((t0 + ms(50), "probe")));
    a.handle_timeout(t0 + ms(50));
    assert!(a.poll_transmit().is_some());
    // Overdue at first_unanswered + srtt + max(4·rttvar, 20 ms) = 50 + 20 + 40.
    assert_eq!(a.poll_timeout(), Some((t0 + ms(100), "probe")));
    assert_eq!(a.stats().pings_sent, 2);
    assert_eq!(b.stats().pongs_sent, 1);
}

#[test]
fn silent_active_path_is_declared_down_at_the_silence_deadline() {
    let t0 = Instant::now();
    let mut a = Sel::new(quiet(), short_id(0), [1; 32], t0);
    let mut b = Sel::new(quiet(), short_id(1), [2; 32], t0);
    a.add_peer(1, keys(0, 1), t0);
    b.add_peer(0, keys(1, 0), t0);
    let (p0, p1) = (p(0, 1, 0), p(1, 1, 1));
    a.set_candidates(&1, [p0, p1], t0);
    // Answer everything for a while (RTT 2 ms), with data flowing.
    let mut now = t0;
    while now < t0 + ms(3000) {
        a.handle_data_sent(&1, now);
        a.handle_timeout(now);
        while let Some(t) = a.poll_transmit() {
            let Via::Direct(dst) = t.path.via else {
                unreachable!()
            };
            let local = if dst == addr(1, 0) { 0 } else { 1 };
            b.handle_datagram(local, addr(0, t.path.local), &t.payload, now + ms(1))
                .unwrap();
            while let Some(r) = b.poll_transmit() {
                a.handle_datagram(t.path.local, dst, &r.payload, now + ms(2))
                    .unwrap();
            }
        }
        now = a.poll_timeout().unwrap().0.min(now + ms(20));
    }
    assert_eq!(a.send_paths(&1).active, Some(&p0));
    while a.poll_event().is_some() {}
    // From now on path 0 is dead: probes go unanswered.
    let mut first_lost = None;
    let dead_at = now;
    while now < dead_at + ms(1000) {
        a.handle_data_sent(&1, now);
        a.handle_timeout(now);
        while let Some(t) = a.poll_transmit() {
            if t.path == p0 {
                first_lost.get_or_insert(now);
                continue;
            }
            b.handle_datagram(1, addr(0, 1), &t.payload, now + ms(1))
                .unwrap();
            while let Some(r) = b.poll_transmit() {
                a.handle_datagram(1, addr(1, 1), &r.payload, now + ms(2))
                    .unwrap();
            }
        }
        let switched = std::iter::from_fn(|| a.poll_event()).find_map(|e| match e {
            Event::ActivePathChanged { to, reason, .. } => Some((to, reason)),
            Event::RedundancyChanged { .. }
            | Event::CandidateDiscovered { .. }
            | Event::ObservedAddress { .. } => None,
        });
        if let Some((to, reason)) = switched {
            assert_eq!((to, reason), (Some(p1), Reason::ActivePathSilent));
            // Exactly silence_timeout after the first unanswered probe.
            assert_eq!(now, first_lost.unwrap() + ms(200));
            assert!(now - dead_at <= ms(250));
            assert_eq!(a.stats().failovers, 1);
            return;
        }
        now = a.poll_timeout().unwrap().0.min(now + ms(20));
    }
    panic!("no failover");
}

// ---------------------------------------------------------------------------------------------
// Failover, hysteresis and loss (simulated network).
// ---------------------------------------------------------------------------------------------

#[test]
fn failover_when_the_active_path_dies_is_bounded() {
    let mut net = two_paths(Config::default(), 1);
    net.run_for(ms(5000));
    assert_eq!(net.active(0, 1), Some(p(0, 1, 0)));
    assert_eq!(net.active(1, 0), Some(p(0, 0, 0)));
    let cut = net.now;
    net.set_up(0, 0, 1, 0, false);
    net.run_for(ms(1000));
    for (n, want) in [(0, p(1, 1, 1)), (1, p(1, 0, 1))] {
        let sw = net.switches(n);
        let (t, to, reason) = sw.last().copied().unwrap();
        assert_eq!((to, reason), (Some(want), "active path silent"), "node {n}");
        let outage = net.t0 + t - cut;
        assert!(outage <= ms(300), "node {n}: outage {outage:?}");
    }
}

#[test]
fn no_flapping_between_alternating_and_steady_loss() {
    for seed in [2, 12, 22] {
        let mut net = two_paths(Config::default(), seed);
        net.link(0, 0, 1, 0, Link::new(20).loss(0.05));
        net.link(0, 1, 1, 1, Link::new(20).loss(0.10));
        for i in 0..120u64 {
            let l = if i % 2 == 0 { 0.05 } else { 0.15 };
            net.edit(0, 0, 1, 0, |k| k.loss = Loss::Bernoulli(l));
            net.run_for(ms(1000));
        }
        for n in [0, 1] {
            let sw = net.switches(n);
            assert!(sw.len() <= 2, "seed {seed} node {n}: {sw:?}");
        }
    }
}

#[test]
fn gilbert_elliott_bursts_cause_no_failover_storm() {
    let mut net = two_paths(Config::default(), 3);
    let burst = Loss::Gilbert {
        p_good_bad: 0.01,
        p_bad_good: 0.25,
        loss_good: 0.0,
        loss_bad: 1.0,
    };
    net.edit(0, 0, 1, 0, |k| k.loss = burst);
    net.run_for(ms(60_000));
    let stats = net.nodes[0].sel.stats();
    assert!(stats.failovers <= 4, "{stats:?}");
    let st = net.nodes[0].sel.status(&1).unwrap();
    assert!(st.paths.iter().any(|p| p.loss_pct > 3.0), "{st:?}");
    // Redundancy or failover keeps nearly all data flowing.
    let sent = 60_000 / 20;
    let got = net.delivered[&(0, 1)];
    assert!(got as f64 > sent as f64 * 0.97, "{got} of {sent}");
}

#[test]
fn asymmetric_loss_is_split_and_avoided() {
    let mut net = two_paths(
        Config {
            redundancy: Redundancy::Off,
            ..Config::default()
        },
        4,
    );
    net.link(0, 1, 1, 1, Link::new(15));
    net.link_dir(0, 0, 1, 0, Link::new(10).loss(0.3));
    net.run_for(ms(20_000));
    assert_eq!(net.active(0, 1), Some(p(1, 1, 1)));
    assert_eq!(net.active(1, 0), Some(p(1, 0, 1)));
    let st = net.nodes[0].sel.status(&1).unwrap();
    let lossy = st.paths.iter().find(|s| s.path == p(0, 1, 0)).unwrap();
    let (rx, tx) = (lossy.loss_rx_pct.unwrap(), lossy.loss_tx_pct.unwrap());
    assert!(rx < 5.0 && tx > 15.0, "rx {rx} tx {tx}");
    assert!(net.switches(0).iter().any(|s| s.2 == "better score"));
}

// ---------------------------------------------------------------------------------------------
// Redundancy.
// ---------------------------------------------------------------------------------------------

#[test]
fn auto_redundancy_enters_on_loss_and_leaves_after_hold() {
    let mut net = two_paths(Config::default(), 5);
    net.link(0, 0, 1, 0, Link::new(10).loss(0.10));
    net.run_for(ms(15_000));
    let sp = net.nodes[0].sel.send_paths(&1);
    assert_eq!(
        (sp.active, sp.secondary),
        (Some(&p(0, 1, 0)), Some(&p(1, 1, 1)))
    );
    let healed = net.now;
    net.link(0, 0, 1, 0, Link::new(10));
    net.run_for(ms(20_000));
    assert_eq!(net.nodes[0].sel.send_paths(&1).secondary, None);
    let red: Vec<_> = net.nodes[0]
        .events
        .iter()
        .filter_map(|(t, e)| match e {
            Event::RedundancyChanged {
                secondary, reason, ..
            } => Some((*t, *secondary, *reason)),
            Event::ActivePathChanged { .. }
            | Event::CandidateDiscovered { .. }
            | Event::ObservedAddress { .. } => None,
        })
        .collect();
    assert_eq!(red.first().map(|r| r.2), Some(Reason::LossAboveThreshold));
    let (off_at, off, reason) = *red.last().unwrap();
    assert_eq!((off, reason), (None, Reason::LossRecovered));
    assert!(off_at - healed >= ms(10_000), "left before the hold time");
}

#[test]
fn redundancy_always_and_off() {
    let mut net = two_paths(
        Config {
            redundancy: Redundancy::Always,
            ..Config::default()
        },
        6,
    );
    net.run_for(ms(3000));
    let sp = net.nodes[0].sel.send_paths(&1);
    assert_eq!(
        (sp.active, sp.secondary),
        (Some(&p(0, 1, 0)), Some(&p(1, 1, 1)))
    );
    let mut net = two_paths(
        Config {
            redundancy: Redundancy::Off,
            ..Config::default()
        },
        6,
    );
    net.link(0, 0, 1, 0, Link::new(10).loss(0.2));
    net.run_for(ms(10_000));
    assert_eq!(net.nodes[0].sel.send_paths(&1).secondary, None);
}

// ---------------------------------------------------------------------------------------------
// Relay.
// ---------------------------------------------------------------------------------------------

fn relay_net(seed: u64) -> Net {
    let mut net = Net::new(
        &[&[0], &[0], &[0]],
        &[Config::default(), Config::default(), Config::relay()],
        seed,
    );
    net.link(0, 0, 1, 0, Link::new(10));
    net.link(0, 0, 2, 0, Link::new(15));
    net.link(1, 0, 2, 0, Link::new(15));
    net.mesh(0, 1, &[2]);
    net.flows = vec![(0, 1), (1, 0)];
    net
}

#[test]
fn relay_takes_over_when_direct_is_blocked_and_direct_wins_back() {
    let mut net = relay_net(7);
    net.run_for(ms(5000));
    assert_eq!(net.active(0, 1), Some(p(0, 1, 0)));
    let cut = net.now;
    net.set_up(0, 0, 1, 0, false);
    net.run_for(ms(2000));
    assert_eq!(net.active(0, 1), Some(PathId::relay(0, 2)));
    assert_eq!(net.active(1, 0), Some(PathId::relay(0, 2)));
    let (t, _, reason) = *net.switches(0).last().unwrap();
    assert_eq!(reason, "active path silent");
    assert!(net.t0 + t - cut <= ms(300));
    let before = net.delivered[&(0, 1)];
    net.run_for(ms(8000));
    assert!(
        net.delivered[&(0, 1)] - before > 350,
        "data flows through the relay"
    );
    assert!(net.nodes[2].sel.stats().relay_forwarded > 0);

    let healed = net.now;
    net.set_up(0, 0, 1, 0, true);
    net.run_for(ms(25_000));
    assert_eq!(net.active(0, 1), Some(p(0, 1, 0)));
    let (t, _, reason) = *net.switches(0).last().unwrap();
    assert_eq!(reason, "direct path recovered");
    assert!(
        net.t0 + t - healed <= ms(20_000),
        "{:?}",
        net.t0 + t - healed
    );
}

#[test]
fn relay_refuses_when_not_serving() {
    let mut net = Net::new(&[&[0], &[0], &[0]], &[Config::default(); 3], 8);
    net.link(0, 0, 2, 0, Link::new(15));
    net.link(1, 0, 2, 0, Link::new(15));
    net.mesh(0, 1, &[2]);
    net.run_for(ms(3000));
    assert_eq!(net.active(0, 1), None);
    assert!(net.nodes[2].sel.stats().relay_refused > 0);
}

#[test]
fn call_me_maybe_finds_the_direct_path() {
    // A and B only know each other through the relay; a direct link exists.
    let mut net = Net::new(
        &[&[0], &[0], &[0]],
        &[Config::default(), Config::default(), Config::relay()],
        9,
    );
    net.link(0, 0, 1, 0, Link::new(10));
    net.link(0, 0, 2, 0, Link::new(15));
    net.link(1, 0, 2, 0, Link::new(15));
    for (a, b) in [(0u8, 1u8), (1, 0)] {
        let now = net.now;
        net.nodes[a as usize]
            .sel
            .set_candidates(&b, [PathId::relay(0, 2)], now);
        net.candidates(a, 2, &[]);
        net.candidates(2, a, &[]);
    }
    net.flows = vec![(0, 1), (1, 0)];
    net.run_for(ms(15_000));
    assert_eq!(net.active(0, 1), Some(p(0, 1, 0)));
    assert_eq!(net.active(1, 0), Some(p(0, 0, 0)));
    for n in [0, 1] {
        let s = net.nodes[n].sel.stats();
        assert!(
            s.call_me_maybe_sent > 0 && s.candidates_discovered > 0,
            "{s:?}"
        );
        assert!(
            net.nodes[n]
                .events
                .iter()
                .any(|(_, e)| matches!(e, Event::CandidateDiscovered { .. }))
        );
        assert_eq!(
            net.switches(n as Id).last().unwrap().2,
            "direct path recovered"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Probe budget.
// ---------------------------------------------------------------------------------------------

#[test]
fn probe_budget_is_respected_on_a_metered_underlay() {
    let budget = 400u32;
    let mut net = Net::new(
        &[&[0, 1], &[0, 1], &[0, 1], &[0, 1]],
        &[Config::default(); 4],
        10,
    );
    net.nodes[0].sel.set_local(
        1,
        LocalInfo {
            cost: 50,
            metered: true,
            probe_budget: Some(budget),
        },
    );
    for b in 1..4u8 {
        net.link(0, 0, b, 0, Link::new(10).loss(0.02));
        net.link(0, 1, b, 1, Link::new(40));
        let c0 = [p(0, b, 0), p(1, b, 1)];
        let c1 = [p(0, 0, 0), p(1, 0, 1)];
        let now = net.now;
        net.nodes[0].sel.set_candidates(&b, c0, now);
        net.nodes[b as usize].sel.set_candidates(&0, c1, now);
        net.flows.push((0, b));
    }
    net.run_for(ms(20_000));
    // Kill the unmetered underlay: the metered one becomes active for everyone.
    for b in 1..4u8 {
        net.set_up(0, 0, b, 0, false);
    }
    net.run_for(ms(40_000));
    for b in 1..4u8 {
        assert_eq!(net.active(0, b).map(|p| p.local), Some(1));
    }
    let cap = net.nodes[0].sel.budget_capacity(1).unwrap() as f64;
    let log: Vec<(Instant, usize)> = net.nodes[0]
        .probe_log
        .iter()
        .filter(|e| e.1 == 1)
        .map(|e| (e.0, e.2))
        .collect();
    assert_within_budget(&log, f64::from(budget), cap);
    assert!(net.nodes[0].sel.stats().budget_deferred > 0);
}

pub fn assert_within_budget(log: &[(Instant, usize)], rate: f64, cap: f64) {
    for i in 0..log.len() {
        let mut sum = 0.0;
        for e in &log[i..] {
            sum += e.1 as f64;
            let span = (e.0 - log[i].0).as_secs_f64();
            assert!(
                sum <= cap + rate * span + 1e-6,
                "{sum} bytes in {span} s (cap {cap}, rate {rate})"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Rejected input.
// ---------------------------------------------------------------------------------------------

#[test]
fn forged_and_malformed_messages_are_rejected_and_counted() {
    use mistnet_path::Error;
    use mistnet_path::wire::{self, Ping};
    let t0 = Instant::now();
    let mut a = Sel::new(quiet(), short_id(0), [1; 32], t0);
    a.add_peer(1, keys(0, 1), t0);
    let src = addr(1, 0);
    let ping = Ping {
        seq: 1,
        timestamp_us: 5,
        tag: 1,
    };
    let mut buf = Vec::new();

    wire::encode_ping(&short_id(1), &ping, &[0xEE; 32], &mut buf);
    assert_eq!(
        a.handle_datagram(0, src, &buf, t0),
        Err(Error::BadMac(short_id(1)))
    );
    wire::encode_ping(&short_id(9), &ping, &keys(0, 9).mac_key, &mut buf);
    assert_eq!(
        a.handle_datagram(0, src, &buf, t0),
        Err(Error::UnknownSender(short_id(9)))
    );
    wire::encode_ping(&short_id(1), &ping, &keys(0, 1).mac_key, &mut buf);
    assert!(matches!(
        a.handle_datagram(0, src, &buf[..20], t0),
        Err(Error::Malformed(_))
    ));
    assert!(matches!(
        a.handle_datagram(0, src, &[4, 0, 0, 0], t0),
        Err(Error::Malformed(_))
    ));
    assert!(matches!(
        a.handle_datagram(0, src, &[], t0),
        Err(Error::Malformed(_))
    ));
    // A relay envelope to a node that does not serve relays.
    wire::relay_to(
        &short_id(2),
        &short_id(1),
        &keys(0, 1).mac_key,
        &buf,
        &mut buf.clone(),
    );
    let mut env = Vec::new();
    wire::relay_to(
        &short_id(2),
        &short_id(1),
        &keys(0, 1).mac_key,
        &buf,
        &mut env,
    );
    assert_eq!(
        a.handle_datagram(0, src, &env, t0),
        Err(Error::RelayDisabled)
    );
    // A RelayFrom whose MAC is not the relay's.
    wire::relay_from(&short_id(1), &short_id(1), &[0xAB; 32], &buf, &mut env);
    assert_eq!(
        a.handle_datagram(0, src, &env, t0),
        Err(Error::BadMac(short_id(1)))
    );

    let s = a.stats();
    assert_eq!(
        (s.bad_mac, s.unknown_sender, s.malformed, s.relay_refused),
        (2, 1, 3, 1)
    );
    assert!(a.poll_transmit().is_none(), "rejected input sends nothing");
    assert!(a.poll_event().is_none(), "rejected input changes nothing");
    assert!(a.status(&1).unwrap().paths.is_empty());

    // The genuine ping is answered.
    assert!(a.handle_datagram(0, src, &buf, t0).is_ok());
    assert!(a.poll_transmit().is_some());
}

#[test]
fn nacks_are_authenticated_and_handed_to_the_shell() {
    use mistnet_path::wire::{self, Nack};
    use mistnet_path::{Error, Handled};
    let t0 = Instant::now();
    let mut a = Sel::new(quiet(), short_id(0), [1; 32], t0);
    a.add_peer(1, keys(0, 1), t0);
    a.add_peer(2, keys(0, 2), t0);
    let src = addr(1, 0);
    let nack = Nack {
        session: 42,
        copies_late: true,
        ranges: vec![(100, 4)],
    };
    let mut buf = Vec::new();

    wire::encode_nack(&short_id(1), &nack, &keys(0, 1).mac_key, &mut buf);
    assert_eq!(
        a.handle_datagram(0, src, &buf, t0),
        Ok(Handled::Nack {
            peer: 1,
            nack: nack.clone()
        })
    );
    // The same nack relayed by node 2 still comes from node 1.
    let mut env = Vec::new();
    wire::relay_from(
        &short_id(2),
        &short_id(1),
        &keys(0, 2).mac_key,
        &buf,
        &mut env,
    );
    assert_eq!(
        a.handle_datagram(0, addr(2, 0), &env, t0),
        Ok(Handled::Nack {
            peer: 1,
            nack: nack.clone()
        })
    );

    // Forged: another peer's key, an unknown sender, a relay lying about the sender.
    wire::encode_nack(&short_id(1), &nack, &keys(0, 2).mac_key, &mut buf);
    assert_eq!(
        a.handle_datagram(0, src, &buf, t0),
        Err(Error::BadMac(short_id(1)))
    );
    wire::encode_nack(&short_id(9), &nack, &keys(0, 9).mac_key, &mut buf);
    assert_eq!(
        a.handle_datagram(0, src, &buf, t0),
        Err(Error::UnknownSender(short_id(9)))
    );
    wire::encode_nack(&short_id(2), &nack, &keys(0, 2).mac_key, &mut buf);
    wire::relay_from(
        &short_id(2),
        &short_id(1),
        &keys(0, 2).mac_key,
        &buf,
        &mut env,
    );
    assert!(matches!(
        a.handle_datagram(0, addr(2, 0), &env, t0),
        Err(Error::SenderMismatch { .. })
    ));
    let s = a.stats();
    assert_eq!(
        (s.nacks_received, s.bad_mac, s.unknown_sender, s.malformed),
        (2, 1, 1, 1)
    );
    assert!(a.poll_event().is_none(), "nacks change no path state");
}
