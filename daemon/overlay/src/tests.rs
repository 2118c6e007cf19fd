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
    let Encap::Send { datagram, dst, .. } = net.a.handle_tun_packet(&pkt2, &mut buf, net.now)
    else {
        panic!("expected a data message");
    };
    assert_eq!(dst, B_ADDR);
    // boringtun does not pad; the overhead is exactly 32 bytes.
    assert_eq!(datagram.len(), pkt2.len() + WG_DATA_OVERHEAD);
    let datagram = datagram.to_vec();
    let mut out = vec![0; MIN_BUFFER];
    let Decap::Tunnel { peer, packet } =
        net.b.handle_datagram(A_ADDR, &datagram, &mut out, net.now)
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
            net.a.handle_datagram(B_ADDR, &datagram, &mut out, net.now),
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
    let mut c: Node<&str> = Node::new([7; 32], net.now);
    c.upsert_peer(
        "a",
        peer_config(net.a.public_key(), A_ADDR, "10.244.1.0/24"),
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
        net.a.handle_datagram(
            "10.99.0.3:51820".parse().unwrap(),
            &datagram,
            &mut out,
            net.now
        ),
        Decap::Dropped(DropReason::UnknownPeer)
    );
    // Not WireGuard at all (type byte outside 1..=4): handed to the caller's protocols.
    assert_eq!(
        net.a
            .handle_datagram(B_ADDR, &[0x80, 1, 2, 3], &mut out, net.now),
        Decap::Foreign
    );
    // Garbage with a WireGuard type byte is rejected without panicking.
    for t in 1u8..=4 {
        let mut junk = vec![t, 0, 0, 0];
        junk.extend_from_slice(&[0xab; 140]);
        assert!(matches!(
            net.a.handle_datagram(B_ADDR, &junk, &mut out, net.now),
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
    // b moves to another address (new link, NAT rebinding) and sends.
    let roamed: SocketAddr = "10.99.7.2:40000".parse().unwrap();
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
    assert_eq!(net.a.peer_status(&"b").unwrap().endpoint, Some(roamed));
    assert_eq!(
        net.a.poll_event(),
        Some(Event::EndpointChanged {
            peer: "b",
            endpoint: roamed
        })
    );
    // An unauthenticated datagram from elsewhere does not move the endpoint.
    let bogus: SocketAddr = "10.66.6.6:1".parse().unwrap();
    let mut forged = datagram.clone();
    let last = forged.len() - 1;
    forged[last] ^= 0xff;
    assert!(matches!(
        net.a.handle_datagram(bogus, &forged, &mut out, net.now),
        Decap::Dropped(DropReason::Crypto)
    ));
    assert_eq!(net.a.peer_status(&"b").unwrap().endpoint, Some(roamed));
}

#[test]
fn reconfiguring_a_peer_keeps_its_session() {
    let mut net = Pair::new();
    net.send_a_to_b(&ipv4([10, 244, 1, 2], [10, 244, 2, 2], b"hi"));
    let before = net.a.peer_status(&"b").unwrap().last_handshake;
    // Reload with an extra allowed network: same key, session kept, no new handshake needed.
    let mut cfg = peer_config(net.b.public_key(), B_ADDR, "10.244.2.0/24");
    cfg.allowed_ips.push("10.250.0.0/16".parse().unwrap());
    net.a.upsert_peer("b", cfg);
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

// ---- WireGuard timers, driven through boringtun's mock clock ---------------------------------

#[cfg(feature = "mock-clock")]
mod timers {
    use super::*;
    use mock_instant::MockClock;

    fn advance(net: &mut Pair, by: Duration) {
        // Step like the daemon's timer thread does, so every deadline is seen.
        let step = Duration::from_millis(250);
        let mut left = by;
        while left > Duration::ZERO {
            let d = step.min(left);
            MockClock::advance(d);
            net.now += d;
            left -= d;
            net.a.handle_timeout(net.now);
            net.b.handle_timeout(net.now);
        }
    }

    #[test]
    fn keepalive_rekey_and_expiry() {
        let mut net = Pair::with_keepalive(Some(5));
        net.send_a_to_b(&ipv4([10, 244, 1, 2], [10, 244, 2, 2], b"hi"));
        while net.a.poll_transmit().is_some() {}
        // Persistent keepalive: an idle peer sends one within its interval.
        advance(&mut net, Duration::from_secs(6));
        let ka: Vec<_> = std::iter::from_fn(|| net.a.poll_transmit()).collect();
        assert!(
            ka.iter().any(|t| t.payload.len() == WG_DATA_OVERHEAD),
            "keepalive expected: {ka:?}"
        );
        // Rekey: after REKEY_AFTER_TIME (120 s) the sender starts a new handshake.
        advance(&mut net, Duration::from_secs(121));
        let mut buf = vec![0; MIN_BUFFER];
        let out = net.a.handle_tun_packet(
            &ipv4([10, 244, 1, 2], [10, 244, 2, 2], b"late"),
            &mut buf,
            net.now,
        );
        let mut init_seen = matches!(out, Encap::Send { datagram, .. } if datagram[0] == 1);
        // The next timer tick sees data sent on a key older than REKEY_AFTER_TIME.
        advance(&mut net, Duration::from_secs(1));
        init_seen |= std::iter::from_fn(|| net.a.poll_transmit()).any(|t| t.payload[0] == 1);
        assert!(
            init_seen,
            "a handshake initiation (type 1) after REKEY_AFTER_TIME"
        );
        // Expiry: with nothing answering for REJECT_AFTER_TIME * 3 the session is gone.
        advance(&mut net, Duration::from_secs(541));
        let events: Vec<_> = std::iter::from_fn(|| net.a.poll_event()).collect();
        assert!(events.contains(&Event::PeerDown("b")), "{events:?}");
    }
}

// ---- helpers --------------------------------------------------------------------------------

const A_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(10, 99, 0, 1)), 51820);
const B_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::new(10, 99, 0, 2)), 51820);

struct Pair {
    a: Node<&'static str>,
    b: Node<&'static str>,
    now: Instant,
    wire: Vec<Vec<u8>>,
}

fn peer_config(key: Key, endpoint: SocketAddr, net: &str) -> PeerConfig {
    PeerConfig {
        public_key: key,
        endpoint: Some(endpoint),
        allowed_ips: vec![net.parse().unwrap()],
        persistent_keepalive: None,
    }
}

impl Pair {
    fn new() -> Self {
        Self::with_keepalive(None)
    }

    fn with_keepalive(ka: Option<u16>) -> Self {
        let now = Instant::now();
        let mut a = Node::new([1; 32], now);
        let mut b = Node::new([2; 32], now);
        let mut ca = peer_config(b.public_key(), B_ADDR, "10.244.2.0/24");
        ca.persistent_keepalive = ka;
        a.upsert_peer("b", ca);
        b.upsert_peer("a", peer_config(a.public_key(), A_ADDR, "10.244.1.0/24"));
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
        let mut to_a: Vec<Vec<u8>> = Vec::new();
        if let Encap::Send { datagram, .. } = self.a.handle_tun_packet(pkt, &mut buf, self.now) {
            to_b.push(datagram.to_vec());
        }
        let mut delivered = Vec::new();
        for _ in 0..10 {
            if to_b.is_empty() && to_a.is_empty() {
                break;
            }
            for d in to_b.drain(..) {
                self.wire.push(d.clone());
                let mut out = vec![0; MIN_BUFFER];
                if let Decap::Tunnel { packet, .. } =
                    self.b.handle_datagram(A_ADDR, &d, &mut out, self.now)
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
                let _ = self.a.handle_datagram(B_ADDR, &d, &mut out, self.now);
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
