//! Tier 4-style properties over many seeded runs of the simulated network, and decoding of
//! arbitrary bytes.
#![allow(clippy::unwrap_used)]

mod sim;

use std::time::Instant;

use mistnet_path::{Config, LocalInfo, PathId, wire};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sim::{Link, Net, Sel, addr, keys, ms, short_id};

/// Never stays on a dead path longer than the bound: two underlays with random delay and
/// light loss, data both ways, the active path's link cut at a random time.
#[test]
fn never_stays_on_a_dead_path() {
    // 600 runs keep the debug-build suite fast; CI may raise it (MISTNET_SIM_RUNS=5000).
    let runs: usize = std::env::var("MISTNET_SIM_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let mut outages = Vec::with_capacity(runs);
    for seed in 0..runs as u64 {
        let mut r = StdRng::seed_from_u64(seed);
        let mut net = Net::new(&[&[0, 1], &[0, 1]], &[Config::default(); 2], seed);
        for l in 0..2u8 {
            let link = Link::new(r.random_range(2..40))
                .loss(r.random_range(0.0..0.02))
                .jitter(ms(r.random_range(0..5)));
            net.link(0, l, 1, l, link);
        }
        for (a, b) in [(0u8, 1u8), (1, 0)] {
            let now = net.now;
            net.nodes[a as usize].sel.set_candidates(
                &b,
                [PathId::direct(0, addr(b, 0)), PathId::direct(1, addr(b, 1))],
                now,
            );
        }
        net.flows = vec![(0, 1), (1, 0)];
        net.data_interval = ms(50);
        net.run_for(ms(r.random_range(800..1300)));
        let Some(dead) = net.active(0, 1) else {
            panic!("seed {seed}: no active path")
        };
        let l = dead.local;
        let on_dead = [true, net.active(1, 0).is_some_and(|p| p.local == l)];
        net.set_up(0, l, 1, l, false);
        let cut = net.now;
        net.run_for(ms(400));
        for n in [0u8, 1] {
            if !on_dead[n as usize] {
                continue;
            }
            let sw = net.switches(n);
            let left = sw
                .iter()
                .rev()
                .find(|s| net.t0 + s.0 >= cut && s.1.map(|p| p.local) != Some(l));
            let Some(left) = left else {
                panic!("seed {seed}: node {n} stayed on the dead path: {sw:?}")
            };
            let outage = net.t0 + left.0 - cut;
            assert!(
                outage <= ms(300),
                "seed {seed}: node {n} left after {outage:?}"
            );
            outages.push(outage);
        }
    }
    outages.sort();
    let p95 = outages[outages.len() * 95 / 100];
    eprintln!(
        "failover p50 {:?} p95 {p95:?} max {:?}",
        outages[outages.len() / 2],
        outages.last().unwrap()
    );
}

/// Never exceeds the probe budget, whatever the number of peers, loss and budget.
#[test]
fn never_exceeds_the_probe_budget() {
    for seed in 0..60u64 {
        let mut r = StdRng::seed_from_u64(seed);
        let peers = r.random_range(1..4u8);
        let locals: Vec<&[u8]> = (0..=peers).map(|_| &[0u8][..]).collect();
        let mut net = Net::new(&locals, &vec![Config::default(); locals.len()], seed);
        let budget = r.random_range(100..3000);
        net.nodes[0].sel.set_local(
            0,
            LocalInfo {
                cost: 10,
                metered: true,
                probe_budget: Some(budget),
            },
        );
        for b in 1..=peers {
            net.link(
                0,
                0,
                b,
                0,
                Link::new(r.random_range(5..50)).loss(r.random_range(0.0..0.3)),
            );
            net.candidates(0, b, &[]);
            net.candidates(b, 0, &[]);
            if r.random_bool(0.5) {
                net.flows.push((0, b));
            }
        }
        net.run_for(ms(10_000));
        let cap = f64::from(net.nodes[0].sel.budget_capacity(0).unwrap());
        let log: Vec<(Instant, usize)> =
            net.nodes[0].probe_log.iter().map(|e| (e.0, e.2)).collect();
        for i in 0..log.len() {
            let mut sum = 0.0;
            for e in &log[i..] {
                sum += e.1 as f64;
                let span = (e.0 - log[i].0).as_secs_f64();
                assert!(
                    sum <= cap + f64::from(budget) * span + 1e-6,
                    "seed {seed}: {sum} B in {span} s"
                );
            }
        }
    }
}

fn selector() -> Sel {
    let t0 = Instant::now();
    let mut s = Sel::new(Config::relay(), short_id(0), [0; 32], t0);
    s.add_peer(1, keys(0, 1), t0);
    s.add_peer(2, keys(0, 2), t0);
    s
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn decoding_arbitrary_bytes_never_panics(ty in 0x7eu8..0x87, id in 0u8..4, body in proptest::collection::vec(any::<u8>(), 0..120)) {
        let mut bytes = vec![ty];
        bytes.extend_from_slice(&[id; 8]);
        bytes.extend_from_slice(&body);
        let _ = wire::decode_probe(&bytes);
        let _ = wire::parse_relay_to(&bytes);
        let _ = wire::parse_relay_from(&bytes);
        let _ = wire::decode_nack(&bytes);
        let mut s = selector();
        let now = Instant::now();
        let _ = s.handle_datagram(0, addr(1, 0), &bytes, now);
        let _ = s.handle_relayed(1, 0, &bytes, now);
        let st = s.stats();
        // Without a valid MAC nothing is ever accepted.
        prop_assert_eq!(st.pings_received + st.pongs_received + st.call_me_maybe_received + st.relay_forwarded + st.nacks_received, 0);
    }

    #[test]
    fn truncated_valid_messages_are_rejected(cut in 0usize..41) {
        let mut buf = Vec::new();
        wire::encode_ping(&short_id(1), &wire::Ping { seq: 1, timestamp_us: 2, tag: 3 }, &keys(0, 1).mac_key, &mut buf);
        let mut s = selector();
        prop_assert!(s.handle_datagram(0, addr(1, 0), &buf[..cut], Instant::now()).is_err());
        prop_assert_eq!(s.stats().malformed, 1);
    }
}
