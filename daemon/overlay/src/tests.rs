//! Scenario tests of the overlay core: two and three nodes in memory with real WireGuard
//! handshakes; datagrams are carried by hand, so loss and roaming are explicit.

use super::*;

// ---- handshake and data -------------------------------------------------------------------

#[test]
fn first_packet_triggers_handshake_then_flows() {
    let mut net = Pair::new();
    let pkt = ipv4([10, 244, 1, 2], [10, 244, 2, 2], b"hello");
    let delivered = net.send_a_to_b(&pkt);
    assert_eq!(
        delivered,
        vec![pkt.clone()],
        "the packet queued during the handshake is delivered"
    );
    assert!(net.a.peer_status(&"b").unwrap().last_handshake.is_some());
    assert!(net.b.peer_status(&"a").unwrap().last_handshake.is_some());
    assert_eq!(net.a.poll_event(), Some(Event::PeerUp("b")));
    // Next packet goes straight out as one data message.
    let pkt2 = ipv4([10, 244, 1, 2], [10, 244, 2, 2], b"again");
    let mut buf = vec![0; MIN_BUFFER];
    let Encap::Send { datagram, path, .. } = net.a.handle_tun_packet(&pkt2, &mut buf, net.now)
    else {
        panic!("expected a data message");
    };
    assert_eq!(path, B_PATH);
    // boringtun does not pad; the overhead is exactly 32 bytes.
    assert_eq!(datagram.len(), pkt2.len() + WG_DATA_OVERHEAD);
    let datagram = datagram.to_vec();
    let mut out = vec![0; MIN_BUFFER];
    let Decap::Tunnel { peer, packet } =
        net.b.handle_datagram(A_PATH, &datagram, &mut out, net.now)
    else {
        panic!("expected a tunnel packet");
    };
    assert_eq!((peer, packet), ("a", &pkt2[..]));
}

#[test]
fn plaintext_never_appears_on_the_wire() {
    let mut net = Pair::new();
    let pkt = ipv4(
        [10, 244, 1, 2],
        [10, 244, 2, 2],
        b"SECRET-MARKER-0123456789",
    );
    net.send_a_to_b(&pkt);
    for d in &net.wire {
        assert!(
            !d.windows(13).any(|w| w == b"SECRET-MARKER"),
            "plaintext on the wire"
        );
    }
}

// ---- routing decisions ----------------------------------------------------------------------

#[test]
fn no_route_and_malformed() {
    let mut net = Pair::new();
    let mut buf = vec![0; MIN_BUFFER];
    let pkt = ipv4([10, 244, 1, 2], [192, 0, 2, 1], b"x");
    assert_eq!(
        net.a.handle_tun_packet(&pkt, &mut buf, net.now),
        Encap::NoRoute
    );
    assert_eq!(net.a.stats().no_route, 1);
    assert_eq!(
        net.a.handle_tun_packet(&[], &mut buf, net.now),
        Encap::Malformed
    );
}

#[test]
fn spoofed_inner_source_is_dropped_and_counted() {
    let mut net = Pair::new();
    net.send_a_to_b(&ipv4([10, 244, 1, 2], [10, 244, 2, 2], b"hi"));
    // b sends a packet claiming a source that belongs to nobody (or to a).
    for src in [[10, 244, 9, 9], [10, 244, 1, 7]] {
        let pkt = ipv4(src, [10, 244, 1, 2], b"spoof");
        let mut buf = vec![0; MIN_BUFFER];
        let Encap::Send { datagram, .. } = net.b.handle_tun_packet(&pkt, &mut buf, net.now) else {
            panic!("b should send");
        };
        let datagram = datagram.to_vec();
        let mut out = vec![0; MIN_BUFFER];
        assert_eq!(
            net.a.handle_datagram(B_PATH, &datagram, &mut out, net.now),
            Decap::Dropped(DropReason::SpoofedSource)
        );
    }
    assert_eq!(net.a.stats().spoofed, 2);
    assert_eq!(net.a.peer_status(&"b").unwrap().spoofed, 2);
}

#[test]
fn unknown_peer_and_foreign_datagrams() {
    let mut net = Pair::new();
    // A third node whose key a does not know.
    let mut c: Node<&str, u8> = Node::new([7; 32], net.now, UNIX_TIME);
    c.upsert_peer(
        "a",
        peer_config(net.a.public_key(), A_ADDR, "10.244.1.0/24"),
        net.now,
    );
    let mut buf = vec![0; MIN_BUFFER];
    let Encap::Send { datagram, .. } = c.handle_tun_packet(
        &ipv4([10, 244, 3, 2], [10, 244, 1, 2], b"x"),
        &mut buf,
        net.now,
    ) else {
        panic!("c should start a handshake");
    };
    let datagram = datagram.to_vec();
    let mut out = vec![0; MIN_BUFFER];
    assert_eq!(
        net.a
            .handle_datagram(path(0, "10.99.0.3:51820"), &datagram, &mut out, net.now),
        Decap::Dropped(DropReason::UnknownPeer)
    );
    // Not WireGuard at all (type byte outside 1..=4): handed to the caller's protocols.
    assert_eq!(
        net.a
            .handle_datagram(B_PATH, &[0x80, 1, 2, 3], &mut out, net.now),
        Decap::Foreign
    );
    // Garbage with a WireGuard type byte is rejected without panicking.
    for t in 1u8..=4 {
        let mut junk = vec![t, 0, 0, 0];
        junk.extend_from_slice(&[0xab; 140]);
        assert!(matches!(
            net.a.handle_datagram(B_PATH, &junk, &mut out, net.now),
            Decap::Dropped(_) | Decap::Foreign
        ));
    }
}

// ---- roaming and reconfiguration ------------------------------------------------------------

#[test]
fn endpoint_follows_latest_authenticated_source() {
    let mut net = Pair::new();
    net.send_a_to_b(&ipv4([10, 244, 1, 2], [10, 244, 2, 2], b"hi"));
    while net.a.poll_event().is_some() {}
    // b moves to another address (new link, NAT rebinding) and a hears it on its second socket.
    let roamed = path(1, "10.99.7.2:40000");
    let mut buf = vec![0; MIN_BUFFER];
    let Encap::Send { datagram, .. } = net.b.handle_tun_packet(
        &ipv4([10, 244, 2, 2], [10, 244, 1, 2], b"moved"),
        &mut buf,
        net.now,
    ) else {
        panic!("b should send");
    };
    let datagram = datagram.to_vec();
    let mut out = vec![0; MIN_BUFFER];
    assert!(matches!(
        net.a.handle_datagram(roamed, &datagram, &mut out, net.now),
        Decap::Tunnel { .. }
    ));
    assert_eq!(net.a.peer_status(&"b").unwrap().path, Some(roamed));
    assert_eq!(
        net.a.poll_event(),
        Some(Event::PathChanged {
            peer: "b",
            path: roamed
        })
    );
    // Replies take the new path.
    let Encap::Send {
        path: reply_path, ..
    } = net.a.handle_tun_packet(
        &ipv4([10, 244, 1, 2], [10, 244, 2, 2], b"back"),
        &mut buf,
        net.now,
    )
    else {
        panic!("a should send");
    };
    assert_eq!(reply_path, roamed);
    // An unauthenticated datagram from elsewhere does not move the endpoint.
    let bogus = path(0, "10.66.6.6:1");
    let mut forged = datagram.clone();
    let last = forged.len() - 1;
    forged[last] ^= 0xff;
    assert!(matches!(
        net.a.handle_datagram(bogus, &forged, &mut out, net.now),
        Decap::Dropped(DropReason::Crypto)
    ));
    assert_eq!(net.a.peer_status(&"b").unwrap().path, Some(roamed));
    // A path selector may pin another path; the next packet goes there.
    assert!(net.a.set_active_path(&"b", B_PATH));
    let Encap::Send { path: pinned, .. } = net.a.handle_tun_packet(
        &ipv4([10, 244, 1, 2], [10, 244, 2, 2], b"pinned"),
        &mut buf,
        net.now,
    ) else {
        panic!("a should send");
    };
    assert_eq!(pinned, B_PATH);
}

#[test]
fn without_roaming_the_selector_owns_the_path() {
    let mut net = Pair::new();
    net.a.set_roaming(false);
    net.send_a_to_b(&ipv4([10, 244, 1, 2], [10, 244, 2, 2], b"hi"));
    while net.a.poll_event().is_some() {}
    let mut buf = vec![0; MIN_BUFFER];
    let Encap::Send { datagram, .. } = net.b.handle_tun_packet(
        &ipv4([10, 244, 2, 2], [10, 244, 1, 2], b"dup"),
        &mut buf,
        net.now,
    ) else {
        panic!("b should send");
    };
    let datagram = datagram.to_vec();
    // Heard on a second path (a duplicate in redundant mode, or a relay): accepted, but the
    // active path stays where the selector put it.
    let other = path(1, "10.99.7.2:40000");
    let mut out = vec![0; MIN_BUFFER];
    assert!(matches!(
        net.a.handle_datagram(other, &datagram, &mut out, net.now),
        Decap::Tunnel { .. }
    ));
    assert_eq!(net.a.peer_status(&"b").unwrap().path, Some(B_PATH));
    assert_eq!(net.a.poll_event(), None);
    // A peer with no path at all still gets one from its first authenticated datagram.
    let mut cfg = peer_config(net.b.public_key(), B_ADDR, "10.244.2.0/24");
    cfg.endpoint = None;
    net.a.remove_peer(&"b");
    net.a.upsert_peer("b", cfg, net.now);
    assert_eq!(net.a.peer_status(&"b").unwrap().path, None);
}

#[test]
fn reconfiguring_a_peer_keeps_its_session() {
    let mut net = Pair::new();
    net.send_a_to_b(&ipv4([10, 244, 1, 2], [10, 244, 2, 2], b"hi"));
    let before = net.a.peer_status(&"b").unwrap().last_handshake;
    // Reload with an extra allowed network: same key, session kept, no new handshake needed.
    let mut cfg = peer_config(net.b.public_key(), B_ADDR, "10.244.2.0/24");
    cfg.allowed_ips.push("10.250.0.0/16".parse().unwrap());
    net.a.upsert_peer("b", cfg, net.now);
    assert!(net.a.peer_status(&"b").unwrap().last_handshake.is_some());
    assert!(before.is_some());
    let mut buf = vec![0; MIN_BUFFER];
    assert!(matches!(
        net.a.handle_tun_packet(
            &ipv4([10, 244, 1, 2], [10, 250, 0, 9], b"new"),
            &mut buf,
            net.now
        ),
        Encap::Send { .. }
    ));
    net.a.remove_peer(&"b");
    assert_eq!(
        net.a.handle_tun_packet(
            &ipv4([10, 244, 1, 2], [10, 244, 2, 2], b"x"),
            &mut buf,
            net.now
        ),
        Encap::NoRoute
    );
}

#[test]
fn timer_tick_is_announced() {
    let net = Pair::new();
    let (at, why) = net.a.poll_timeout().unwrap();
    assert_eq!(at, net.now + TIMER_TICK);
    assert_eq!(why, "wireguard timers");
}

// ---- WireGuard timers, driven by explicit time ----------------------------------------------

/// Steps both nodes like the daemon's timer thread does (every tick), so every deadline is
/// seen, and carries nothing: the wire is cut unless a test carries datagrams itself.
fn advance(net: &mut Pair, by: Duration) -> Vec<Transmit<&'static str, u8>> {
    let mut sent = Vec::new();
    let end = net.now + by;
    while net.now < end {
        net.now = (net.now + TIMER_TICK).min(end);
        net.a.handle_timeout(net.now);
        net.b.handle_timeout(net.now);
        sent.extend(std::iter::from_fn(|| net.a.poll_transmit()));
        while net.b.poll_transmit().is_some() {}
    }
    sent
}

#[test]
fn handshake_initiation_is_retried_every_rekey_timeout() {
    let mut net = Pair::new();
    let mut buf = vec![0; MIN_BUFFER];
    // b never answers: a's first packet starts a handshake that goes unanswered.
    let Encap::Send { datagram, .. } = net.a.handle_tun_packet(
        &ipv4([10, 244, 1, 2], [10, 244, 2, 2], b"x"),
        &mut buf,
        net.now,
    ) else {
        panic!("a should start a handshake");
    };
    assert_eq!(datagram[0], 1, "handshake initiation");
    // Nothing before REKEY_TIMEOUT (5 s)...
    let early = advance(&mut net, Duration::from_millis(4750));
    assert!(early.iter().all(|t| t.payload[0] != 1), "{early:?}");
    // ... a retry right after it.
    let retry = advance(&mut net, Duration::from_millis(500));
    assert_eq!(retry.iter().filter(|t| t.payload[0] == 1).count(), 1);
    assert_eq!(retry[0].path, B_PATH);
}

#[test]
fn persistent_keepalive_is_sent_when_idle() {
    let mut net = Pair::with_keepalive(Some(5));
    net.send_a_to_b(&ipv4([10, 244, 1, 2], [10, 244, 2, 2], b"hi"));
    while net.a.poll_transmit().is_some() {}
    let sent = advance(&mut net, Duration::from_secs(6));
    let keepalives: Vec<_> = sent
        .iter()
        .filter(|t| t.payload[0] == 4 && t.payload.len() == WG_DATA_OVERHEAD)
        .collect();
    assert_eq!(keepalives.len(), 1, "{sent:?}");
    // Reload turns it off without a new session.
    let mut cfg = peer_config(net.b.public_key(), B_ADDR, "10.244.2.0/24");
    cfg.persistent_keepalive = None;
    net.a.upsert_peer("b", cfg, net.now);
    let sent = advance(&mut net, Duration::from_secs(12));
    assert!(
        sent.iter().all(|t| t.payload.len() != WG_DATA_OVERHEAD),
        "{sent:?}"
    );
}

#[test]
fn passive_keepalive_answers_received_data() {
    let mut net = Pair::new();
    net.send_a_to_b(&ipv4([10, 244, 1, 2], [10, 244, 2, 2], b"hi"));
    // WireGuard's timers have tick resolution (boringtun stamps events with the time of the
    // last timer run): data received in the handshake's own tick counts as simultaneous with
    // b's handshake response, so the next data arrives a tick later.
    advance(&mut net, TIMER_TICK);
    net.send_a_to_b(&ipv4([10, 244, 1, 2], [10, 244, 2, 2], b"more"));
    // b received data and sent nothing back: after KEEPALIVE_TIMEOUT (10 s) it sends an empty
    // data message.
    let mut b_sent = Vec::new();
    let end = net.now + Duration::from_secs(11);
    while net.now < end {
        net.now += TIMER_TICK;
        net.b.handle_timeout(net.now);
        b_sent.extend(std::iter::from_fn(|| net.b.poll_transmit()));
    }
    assert!(
        b_sent
            .iter()
            .any(|t| t.payload[0] == 4 && t.payload.len() == WG_DATA_OVERHEAD),
        "{b_sent:?}"
    );
}

#[test]
fn rekey_after_rekey_after_time_keeps_traffic_flowing() {
    let mut net = Pair::new();
    net.send_a_to_b(&ipv4([10, 244, 1, 2], [10, 244, 2, 2], b"hi"));
    let first = net.a.peer_status(&"b").unwrap().last_handshake;
    assert_eq!(first, Some(Duration::ZERO));
    // 121 s later, a sends again: its key is older than REKEY_AFTER_TIME (120 s), so the
    // packet still goes out on the old session and the next timer tick starts a handshake.
    advance(&mut net, Duration::from_secs(121));
    let delivered = net.send_a_to_b(&ipv4([10, 244, 1, 2], [10, 244, 2, 2], b"late"));
    assert_eq!(delivered.len(), 1);
    let sent = advance(&mut net, TIMER_TICK);
    let init: Vec<_> = sent.iter().filter(|t| t.payload[0] == 1).collect();
    assert_eq!(init.len(), 1, "one handshake initiation: {sent:?}");
    // Carry the rekey: b answers, a's session is new, and data flows on it.
    let init = init[0].payload.clone();
    net.carry_to_b(vec![init]);
    assert_eq!(
        net.a.peer_status(&"b").unwrap().last_handshake,
        Some(Duration::ZERO)
    );
    let delivered = net.send_a_to_b(&ipv4([10, 244, 1, 2], [10, 244, 2, 2], b"fresh"));
    assert_eq!(delivered.len(), 1);
}

#[test]
fn session_expires_when_the_peer_goes_silent() {
    let mut net = Pair::new();
    net.send_a_to_b(&ipv4([10, 244, 1, 2], [10, 244, 2, 2], b"hi"));
    while net.a.poll_event().is_some() {}
    // b goes silent. a keeps retrying for REKEY_ATTEMPT_TIME (90 s) after it started a new
    // handshake; the session itself is gone after REJECT_AFTER_TIME * 3 (540 s).
    advance(&mut net, Duration::from_secs(539));
    assert_eq!(net.a.poll_event(), None);
    advance(&mut net, Duration::from_secs(2));
    assert_eq!(net.a.poll_event(), Some(Event::PeerDown("b")));
    assert!(!net.a.peer_status(&"b").unwrap().up);
    // A new packet starts over with a fresh handshake, and the peer comes back.
    let delivered = net.send_a_to_b(&ipv4([10, 244, 1, 2], [10, 244, 2, 2], b"back"));
    assert_eq!(delivered.len(), 1);
    assert_eq!(net.a.poll_event(), Some(Event::PeerUp("b")));
}

#[test]
fn unanswered_handshakes_give_up_after_rekey_attempt_time() {
    let mut net = Pair::new();
    let mut buf = vec![0; MIN_BUFFER];
    assert!(matches!(
        net.a.handle_tun_packet(
            &ipv4([10, 244, 1, 2], [10, 244, 2, 2], b"x"),
            &mut buf,
            net.now
        ),
        Encap::Send { .. }
    ));
    let sent = advance(&mut net, Duration::from_secs(95));
    let inits = sent.iter().filter(|t| t.payload[0] == 1).count();
    // One every REKEY_TIMEOUT (5 s, on 250 ms ticks) for REKEY_ATTEMPT_TIME (90 s), then none.
    assert!((16..=18).contains(&inits), "{inits} retries");
    let later = advance(&mut net, Duration::from_secs(30));
    assert!(later.is_empty(), "{later:?}");
}

// ---- helpers --------------------------------------------------------------------------------

const A_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(10, 99, 0, 1)), 51820);
const B_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(10, 99, 0, 2)), 51820);
/// How a sees b (on its socket 0) and b sees a.
const B_PATH: Path<u8> = Path {
    local: 0,
    remote: B_ADDR,
};
const A_PATH: Path<u8> = Path {
    local: 0,
    remote: A_ADDR,
};
/// 2026-11-24T00:00:00Z.
const UNIX_TIME: Duration = Duration::from_secs(1_795_478_400);

fn path(local: u8, remote: &str) -> Path<u8> {
    Path {
        local,
        remote: remote.parse().unwrap(),
    }
}

struct Pair {
    a: Node<&'static str, u8>,
    b: Node<&'static str, u8>,
    now: Instant,
    wire: Vec<Vec<u8>>,
}

fn peer_config(key: Key, endpoint: SocketAddr, net: &str) -> PeerConfig<u8> {
    PeerConfig {
        public_key: key,
        endpoint: Some(Path {
            local: 0,
            remote: endpoint,
        }),
        allowed_ips: vec![net.parse().unwrap()],
        persistent_keepalive: None,
    }
}

impl Pair {
    fn new() -> Self {
        Self::with_keepalive(None)
    }

    fn with_keepalive(ka: Option<u16>) -> Self {
        // The only clock reading of these tests: an arbitrary origin.
        let now = Instant::now();
        let mut a = Node::new([1; 32], now, UNIX_TIME);
        let mut b = Node::new([2; 32], now, UNIX_TIME);
        let mut ca = peer_config(b.public_key(), B_ADDR, "10.244.2.0/24");
        ca.persistent_keepalive = ka;
        a.upsert_peer("b", ca, now);
        b.upsert_peer(
            "a",
            peer_config(a.public_key(), A_ADDR, "10.244.1.0/24"),
            now,
        );
        Self {
            a,
            b,
            now,
            wire: Vec::new(),
        }
    }

    /// Sends a packet from a's TUN and carries datagrams both ways until quiet; returns what
    /// b's TUN received.
    fn send_a_to_b(&mut self, pkt: &[u8]) -> Vec<Vec<u8>> {
        let mut buf = vec![0; MIN_BUFFER];
        let mut to_b: Vec<Vec<u8>> = Vec::new();
        if let Encap::Send { datagram, .. } = self.a.handle_tun_packet(pkt, &mut buf, self.now) {
            to_b.push(datagram.to_vec());
        }
        while let Some(t) = self.a.poll_transmit() {
            to_b.push(t.payload);
        }
        self.carry_to_b(to_b)
    }

    /// Carries datagrams from a to b and replies back until quiet; returns what b's TUN
    /// received.
    fn carry_to_b(&mut self, mut to_b: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
        let mut to_a: Vec<Vec<u8>> = Vec::new();
        let mut delivered = Vec::new();
        for _ in 0..10 {
            if to_b.is_empty() && to_a.is_empty() {
                break;
            }
            for d in to_b.drain(..) {
                self.wire.push(d.clone());
                let mut out = vec![0; MIN_BUFFER];
                if let Decap::Tunnel { packet, .. } =
                    self.b.handle_datagram(A_PATH, &d, &mut out, self.now)
                {
                    delivered.push(packet.to_vec());
                }
            }
            while let Some(t) = self.b.poll_transmit() {
                to_a.push(t.payload);
            }
            for d in to_a.drain(..) {
                self.wire.push(d.clone());
                let mut out = vec![0; MIN_BUFFER];
                let _ = self.a.handle_datagram(B_PATH, &d, &mut out, self.now);
            }
            while let Some(t) = self.a.poll_transmit() {
                to_b.push(t.payload);
            }
        }
        delivered
    }
}

/// A minimal IPv4/UDP packet.
fn ipv4(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let total = 20 + 8 + payload.len();
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&u16::try_from(total).unwrap().to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[20..22].copy_from_slice(&4000u16.to_be_bytes());
    p[22..24].copy_from_slice(&5000u16.to_be_bytes());
    p[24..26].copy_from_slice(&u16::try_from(8 + payload.len()).unwrap().to_be_bytes());
    p[28..].copy_from_slice(payload);
    p
}
