use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::codec::{Message, Signer};
use crate::sim::sample_record;

// --- codec ---

#[test]
fn record_round_trips() {
    let key = SigningKey::from_bytes(&[1; 32]);
    let mut rec = sample_record(7);
    rec.identity = key.verifying_key().to_bytes();
    rec.version = 300;
    let signed = sign(&key, &rec, Signer::Origin);
    let (back, signer, _, _) = codec::decode_signed(&signed).unwrap();
    assert_eq!(back, rec);
    assert_eq!(signer, Signer::Origin);
    assert!(signed.len() < 260, "{} bytes", signed.len());
}

#[test]
fn messages_round_trip() {
    let msgs = [
        Message::Summary {
            hash: [9; 16],
            count: 1000,
            reply: true,
        },
        Message::Digest {
            lo: 5,
            hi: u64::MAX,
            entries: vec![(7, 3), (u64::MAX, 1 << 49)],
        },
        Message::Request(vec![1, 2, u64::MAX]),
        Message::Records(vec![vec![1, 2, 3], vec![]]),
    ];
    for m in msgs {
        assert_eq!(Message::decode(&m.encode()).unwrap(), m);
    }
}

#[test]
fn unknown_format_version_is_rejected_clearly() {
    let mut b = Message::Request(vec![1]).encode();
    b[0] = 2;
    assert_eq!(Message::decode(&b), Err(DecodeError::UnsupportedVersion(2)));
    let mut s = replica(1).export_state();
    s[0] = 9;
    assert!(matches!(
        replica(2).import_state(&s, t0()),
        Err(Error::Decode(DecodeError::UnsupportedVersion(9)))
    ));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1500)) {
        let _ = Message::decode(&bytes);
        let _ = codec::decode_state(&bytes);
        let _ = codec::decode_signed(&bytes);
    }

    #[test]
    fn decode_mutated_never_panics(which in 0usize..4, pos in any::<prop::sample::Index>(), val in any::<u8>(), cut in any::<prop::sample::Index>()) {
        let valid = valid_messages();
        let mut b = valid[which % valid.len()].clone();
        let i = pos.index(b.len());
        b[i] = val;
        let _ = Message::decode(&b);
        b.truncate(cut.index(b.len() + 1));
        let _ = Message::decode(&b);
        if let Ok(Message::Records(recs)) = Message::decode(&b) {
            for r in recs {
                let _ = codec::decode_signed(&r);
            }
        }
    }
}

// --- validation ---

#[test]
fn forged_record_is_rejected_and_counted() {
    let mut a = replica(1);
    let victim = replica(2);
    // Node 3 re-signs node 2's record with its own key.
    let evil = SigningKey::from_bytes(&[3; 32]);
    let mut rec = victim.own().clone();
    rec.version = 5;
    rec.endpoints.clear();
    let forged = sign(&evil, &rec, Signer::Origin);
    let err = a
        .handle_message(2, &records_msg(std::slice::from_ref(&forged)), t0())
        .unwrap_err();
    assert!(matches!(err, Error::Rejected(Reject::BadSignature)));
    assert_eq!(a.stats().rejected.bad_signature, 1);
    // Flipping one bit of a genuine record breaks it too.
    let mut tampered = victim_signed(&victim);
    tampered[20] ^= 1;
    let _ = a.handle_message(2, &records_msg(&[tampered]), t0());
    assert_eq!(a.records().count(), 1);
    // Authority-signed records are refused without an authority, and live ones always.
    let fake_tomb = sign(
        &evil,
        &NodeRecord {
            deleted: true,
            ..rec
        },
        Signer::Authority,
    );
    let err = a
        .handle_message(2, &records_msg(&[fake_tomb]), t0())
        .unwrap_err();
    assert!(matches!(err, Error::Rejected(Reject::Unauthorized)));
}

#[test]
fn equivocation_is_rejected() {
    let mut a = replica(1);
    let key = SigningKey::from_bytes(&[2; 32]);
    let mut rec = sample_record(2);
    rec.identity = key.verifying_key().to_bytes();
    rec.version = 4;
    let first = sign(&key, &rec, Signer::Origin);
    rec.zone = "other".into();
    let second = sign(&key, &rec, Signer::Origin);
    a.handle_message(2, &records_msg(&[first]), t0()).unwrap();
    let err = a
        .handle_message(2, &records_msg(&[second]), t0())
        .unwrap_err();
    assert!(matches!(err, Error::Rejected(Reject::Equivocation)));
    assert_eq!(a.stats().rejected.equivocation, 1);
    assert_eq!(a.records().find(|r| r.version == 4).unwrap().zone, "zone-2");
}

#[test]
fn version_zero_and_far_future_are_rejected() {
    let mut a = replica(1);
    let key = SigningKey::from_bytes(&[2; 32]);
    let mut rec = sample_record(2);
    rec.identity = key.verifying_key().to_bytes();
    for (v, reason) in [
        (0, Reject::VersionZero),
        (MAX_VERSION + 1, Reject::VersionTooFar),
    ] {
        rec.version = v;
        let err = a
            .handle_message(2, &records_msg(&[sign(&key, &rec, Signer::Origin)]), t0())
            .unwrap_err();
        assert!(matches!(err, Error::Rejected(r) if r == reason));
    }
    assert_eq!(a.stats().rejected.version_zero, 1);
    assert_eq!(a.stats().rejected.version_too_far, 1);
}

#[test]
fn overlapping_cidr_and_name_collision_keep_the_existing_record() {
    let mut a = replica(1);
    let b = replica(2);
    a.handle_message(2, &records_msg(&[victim_signed(&b)]), t0())
        .unwrap();
    // Node 3 claims a /16 covering node 2's /24.
    let key = SigningKey::from_bytes(&[3; 32]);
    let mut rec = sample_record(3);
    rec.identity = key.verifying_key().to_bytes();
    rec.version = 1;
    rec.pod_cidrs = vec!["10.64.0.0/16".parse().unwrap()];
    let err = a
        .handle_message(3, &records_msg(&[sign(&key, &rec, Signer::Origin)]), t0())
        .unwrap_err();
    assert!(matches!(err, Error::Rejected(Reject::CidrOverlap)));
    // ... or node 2's name.
    rec.pod_cidrs = vec!["10.200.0.0/24".parse().unwrap()];
    rec.name = b.own().name.clone();
    let err = a
        .handle_message(3, &records_msg(&[sign(&key, &rec, Signer::Origin)]), t0())
        .unwrap_err();
    assert!(matches!(err, Error::Rejected(Reject::NameCollision)));
    let s = a.stats().rejected;
    assert_eq!((s.cidr_overlap, s.name_collision), (1, 1));
    assert_eq!(a.records().count(), 2);
    // A node may move its own CIDR.
    let mut rec2 = b.own().clone();
    rec2.version = 2;
    rec2.pod_cidrs = vec!["10.64.2.0/23".parse().unwrap()];
    let key2 = SigningKey::from_bytes(&[2; 32]);
    a.handle_message(2, &records_msg(&[sign(&key2, &rec2, Signer::Origin)]), t0())
        .unwrap();
}

#[test]
fn tombstone_supersedes_older_versions_and_is_itself_gossiped() {
    let auth = SigningKey::from_bytes(&[42; 32]);
    let config = Config {
        authority: Some(auth.verifying_key().to_bytes()),
        ..Config::default()
    };
    let mut a = Replica::new(config, [1; 32], sample_record(1), [0; 32], t0()).unwrap();
    let b = replica(2);
    a.add_peer(2, link());
    a.handle_message(2, &records_msg(&[victim_signed(&b)]), t0())
        .unwrap();
    drain(&mut a);
    assert!(matches!(
        a.tombstone([7; 32], b.identity(), t0()),
        Err(Error::NotAuthority)
    ));
    a.tombstone([42; 32], b.identity(), t0()).unwrap();
    assert_eq!(a.records().count(), 1);
    assert!(matches!(a.poll_event(), Some(Event::RecordRemoved { .. })));
    // The tombstone is pushed at once.
    let t = a.poll_transmit().unwrap();
    assert!(matches!(Message::decode(&t.payload).unwrap(), Message::Records(r) if r.len() == 1));
    // The same live record again is stale.
    a.handle_message(2, &records_msg(&[victim_signed(&b)]), t0())
        .unwrap();
    assert_eq!(a.records().count(), 1);
    // A newer version from the node itself brings it back (it is alive after all).
    let mut rec = b.own().clone();
    rec.version = 2;
    a.handle_message(
        2,
        &records_msg(&[sign(
            &SigningKey::from_bytes(&[2; 32]),
            &rec,
            Signer::Origin,
        )]),
        t0(),
    )
    .unwrap();
    assert_eq!(a.records().count(), 2);
}

#[test]
fn expired_tombstone_still_refuses_older_records() {
    let mut a = replica(1);
    let mut b = replica(2);
    a.handle_message(2, &records_msg(&[victim_signed(&b)]), t0())
        .unwrap();
    b.leave(t0()).unwrap();
    a.handle_message(2, &records_msg(&[victim_signed(&b)]), t0())
        .unwrap();
    assert_eq!(a.records().count(), 1);
    a.handle_timeout(t0() + Config::default().tombstone_ttl + Duration::from_secs(1));
    assert_eq!(a.versions().count(), 1);
    let old = replica(2);
    a.handle_message(2, &records_msg(&[victim_signed(&old)]), t0())
        .unwrap();
    assert_eq!(a.records().count(), 1);
}

#[test]
fn own_version_is_monotonic_across_import_and_echoes() {
    let mut a = replica(1);
    for _ in 0..4 {
        a.update_own(|r| r.zone.push('z'), t0()).unwrap();
    }
    assert_eq!(a.own().version, 5);
    let state = a.export_state();
    let mut restarted = replica(1);
    assert_eq!(restarted.own().version, 1);
    let n = restarted.import_state(&state, t0()).unwrap();
    assert_eq!(n, 0, "own record is not imported as a remote record");
    assert_eq!(restarted.own().version, 6);
    // A peer echoing an even newer copy (state lost) pushes the version above it.
    let mut fresh = replica(1);
    fresh
        .handle_message(9, &records_msg(&[victim_signed(&restarted)]), t0())
        .unwrap();
    assert_eq!(fresh.own().version, 7);
    assert_eq!(fresh.own().zone, "zone-1");
}

#[test]
fn import_verifies_and_restores_records() {
    let mut a = replica(1);
    let b = replica(2);
    a.handle_message(2, &records_msg(&[victim_signed(&b)]), t0())
        .unwrap();
    let state = a.export_state();
    let mut c = replica(3);
    assert_eq!(c.import_state(&state, t0()).unwrap(), 2);
    assert_eq!(c.records().count(), 3);
    assert!(matches!(c.poll_event(), Some(Event::RecordUpserted(_))));
}

// --- protocol ---

#[test]
fn equal_summaries_exchange_nothing_more() {
    let mut a = replica(1);
    let mut b = replica(2);
    a.add_peer(2, link());
    b.add_peer(1, link());
    let now = pump(&mut a, &mut b, t0(), 20);
    assert_eq!(a.state_hash(), b.state_hash());
    let sent = a.stats().tx_bytes.total() + b.stats().tx_bytes.total();
    a.handle_timeout(now + Duration::from_secs(60));
    let t = a.poll_transmit().unwrap();
    assert!(
        t.payload.len() <= 24,
        "summary is {} bytes",
        t.payload.len()
    );
    b.handle_message(1, &t.payload, now).unwrap();
    let reply = b.poll_transmit().unwrap();
    a.handle_message(2, &reply.payload, now).unwrap();
    assert!(a.poll_transmit().is_none() && b.poll_transmit().is_none());
    assert!(a.stats().tx_bytes.total() + b.stats().tx_bytes.total() - sent < 60);
}

#[test]
fn datagrams_fit_and_budget_limits_rate() {
    let mut a = replica(1);
    let mut others = Vec::new();
    for i in 2..40 {
        others.push(victim_signed(&replica_with(i, sample_record(i))));
    }
    for chunk in others.chunks(4) {
        a.handle_message(99, &records_msg(chunk), t0()).unwrap();
    }
    a.add_peer(
        7,
        LinkInfo {
            cost: 100,
            budget_bytes_per_sec: Some(1000),
        },
    );
    drain(&mut a);
    // Peer 7 asks for everything.
    let shorts: Vec<u64> = a.versions().map(|(id, ..)| short_id(&id)).collect();
    a.handle_message(7, &Message::Request(shorts).encode(), t0())
        .unwrap();
    let mut first = 0;
    while let Some(t) = a.poll_transmit() {
        assert!(t.payload.len() <= MAX_DATAGRAM);
        first += t.payload.len();
    }
    assert!(first <= 2 * MAX_DATAGRAM + 1000, "burst {first}");
    let wake = a.budget_wake.expect("records wait for the budget");
    assert!(a.poll_timeout().unwrap().0 <= wake);
    let mut total = first;
    let mut now = wake;
    while now < t0() + Duration::from_secs(30) {
        a.handle_timeout(now);
        while let Some(t) = a.poll_transmit() {
            total += t.payload.len();
        }
        now += Duration::from_millis(100);
    }
    assert!(a.status(now).peers[0].queued == 0);
    let limit = 2.0 * MAX_DATAGRAM as f64 + 1000.0 * 30.0;
    assert!((total as f64) <= limit, "{total} > {limit}");
}

#[test]
fn own_record_goes_first() {
    let mut a = replica(1);
    a.add_peer(2, link());
    for i in 3..12 {
        let r = replica_with(i, sample_record(i));
        a.handle_message(2, &records_msg(&[victim_signed(&r)]), t0())
            .unwrap();
    }
    drain(&mut a);
    let shorts: Vec<u64> = a.versions().map(|(id, ..)| short_id(&id)).collect();
    a.handle_message(2, &Message::Request(shorts).encode(), t0())
        .unwrap();
    let t = a.poll_transmit().unwrap();
    let Message::Records(recs) = Message::decode(&t.payload).unwrap() else {
        panic!("records")
    };
    let (first, ..) = codec::decode_signed(&recs[0]).unwrap();
    assert_eq!(first.identity, a.identity());
}

// --- helpers ---

fn t0() -> Instant {
    use std::sync::OnceLock;
    static T0: OnceLock<Instant> = OnceLock::new();
    *T0.get_or_init(Instant::now)
}

fn link() -> LinkInfo {
    LinkInfo {
        cost: 10,
        budget_bytes_per_sec: None,
    }
}

fn replica(i: u8) -> Replica<u32> {
    replica_with(u32::from(i), sample_record(u32::from(i)))
}

fn replica_with(i: u32, rec: NodeRecord) -> Replica<u32> {
    Replica::new(Config::default(), [i as u8; 32], rec, [i as u8; 32], t0()).unwrap()
}

fn victim_signed(r: &Replica<u32>) -> Vec<u8> {
    r.entries.get(&r.identity()).unwrap().signed.to_vec()
}

fn records_msg(recs: &[Vec<u8>]) -> Vec<u8> {
    Message::Records(recs.to_vec()).encode()
}

fn drain(r: &mut Replica<u32>) {
    while r.poll_transmit().is_some() {}
    while r.poll_event().is_some() {}
}

/// Runs two replicas against each other without loss; returns the time reached.
fn pump(a: &mut Replica<u32>, b: &mut Replica<u32>, mut now: Instant, rounds: u32) -> Instant {
    for _ in 0..rounds {
        a.handle_timeout(now);
        b.handle_timeout(now);
        for _ in 0..10 {
            while let Some(t) = a.poll_transmit() {
                let _ = b.handle_message(1, &t.payload, now);
            }
            while let Some(t) = b.poll_transmit() {
                let _ = a.handle_message(2, &t.payload, now);
            }
        }
        now += Duration::from_secs(1);
    }
    now
}

fn valid_messages() -> &'static [Vec<u8>] {
    use std::sync::OnceLock;
    static VALID: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    VALID.get_or_init(|| {
        let r = replica(5);
        vec![
            Message::Summary {
                hash: [3; 16],
                count: 7,
                reply: false,
            }
            .encode(),
            Message::Digest {
                lo: 0,
                hi: u64::MAX,
                entries: vec![(1, 2), (3, 4)],
            }
            .encode(),
            Message::Request(vec![1, 2, 3]).encode(),
            records_msg(&[victim_signed(&r), victim_signed(&r)]),
        ]
    })
}
