use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::codec::{Delta, ListEdit, Message, Signer};
use crate::sim::sample_record;

// --- codec ---

#[test]
fn record_round_trips_and_derives_the_identity() {
    let mut rec = keyed(1, sample_record(7));
    rec.version = 300;
    let signed = sign_origin(1, &rec);
    let (back, signer, _, _) = codec::decode_signed(&signed).unwrap();
    assert_eq!(back, rec);
    assert_eq!(
        back.identity,
        KeyPair::from_x25519_secret([1; 32]).identity()
    );
    assert_eq!(signer, Signer::Origin);
    assert!(signed.len() < 230, "{} bytes", signed.len());
}

#[test]
fn record_with_an_unusable_key_is_malformed() {
    let mut rec = keyed(1, sample_record(7));
    rec.version = 1;
    rec.wg_key = [0; 32];
    let mut a = replica(2);
    let err = a
        .handle_message(1, &records_msg(&[sign_origin(1, &rec)]), t0())
        .unwrap_err();
    assert!(matches!(err, Error::Decode(DecodeError::BadKey)));
    assert_eq!(a.stats().malformed, 1);
}

#[test]
fn delta_rebuilds_the_signed_record_byte_for_byte() {
    let mut old = keyed(3, sample_record(3));
    old.version = 4;
    let mut new = old.clone();
    new.version = 6;
    new.endpoints[0].addr.set_port(51821);
    new.zone = "moved".into();
    let signed = sign_origin(3, &new);
    let sig: [u8; 64] = signed[signed.len() - 64..].try_into().unwrap();
    let d = Delta::between(short_id(&old.identity), &old, &new, sig);
    assert!(d.name.is_none() && d.deleted.is_none() && d.pod_cidrs.is_none());
    // Only the moved endpoint travels.
    let e = d.endpoints.as_ref().unwrap();
    assert_eq!((e.keep_front, e.keep_back), (0, 1));
    assert_eq!(e.middle, vec![new.endpoints[0].clone()]);
    let msg = Message::Delta(vec![d.clone()]);
    assert_eq!(Message::decode(&msg.encode()).unwrap(), msg);
    let mut rebuilt = Vec::new();
    codec::encode_record(&d.apply(&old).unwrap(), Signer::Origin, &mut rebuilt);
    rebuilt.extend_from_slice(&d.signature);
    assert_eq!(rebuilt, signed);
    let (delta_len, full_len) = (msg.encode().len(), signed.len());
    assert!(
        delta_len + 50 < full_len,
        "delta {delta_len} B, record {full_len} B"
    );
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
        Message::Request(vec![(1, 0), (2, 5), (u64::MAX, u64::MAX)]),
        Message::Records(vec![vec![1, 2, 3], vec![]]),
        Message::Delta(vec![
            Delta {
                short: 7,
                base: 1,
                version: 1 << 40,
                deleted: Some(true),
                name: Some("n".into()),
                zone: Some(String::new()),
                endpoints: Some(ListEdit {
                    keep_front: 1,
                    keep_back: u64::MAX,
                    middle: sample_record(1).endpoints,
                }),
                pod_cidrs: Some(ListEdit {
                    keep_front: 0,
                    keep_back: 0,
                    middle: Vec::new(),
                }),
                tunnel_addrs: Some(ListEdit {
                    keep_front: 3,
                    keep_back: 0,
                    middle: sample_record(1).tunnel_addrs,
                }),
                signature: [5; 64],
            },
            Delta {
                short: u64::MAX,
                base: 9,
                version: 10,
                deleted: None,
                name: None,
                zone: None,
                endpoints: None,
                pod_cidrs: None,
                tunnel_addrs: None,
                signature: [6; 64],
            },
        ]),
    ];
    for m in msgs {
        assert_eq!(Message::decode(&m.encode()).unwrap(), m);
    }
}

#[test]
fn other_format_versions_are_rejected_clearly() {
    // Version 1 (records with a separate identity key) and a future one.
    for v in [1, 9] {
        let mut b = Message::Request(vec![(1, 0)]).encode();
        b[0] = v;
        assert_eq!(Message::decode(&b), Err(DecodeError::UnsupportedVersion(v)));
        let mut s = replica(1).export_state();
        s[0] = v;
        assert!(matches!(
            replica(2).import_state(&s, t0()),
            Err(Error::Decode(DecodeError::UnsupportedVersion(found))) if found == v
        ));
    }
}

#[test]
fn delta_that_does_not_advance_is_malformed() {
    let mut body = vec![1];
    body.extend_from_slice(&7u64.to_be_bytes());
    body.extend_from_slice(&[5, 0, 0]); // base 5, step 0, no fields
    body.extend_from_slice(&[0; 64]);
    let mut b = vec![FORMAT_VERSION, Kind::Delta as u8, 0];
    b.extend_from_slice(&body);
    assert_eq!(Message::decode(&b), Err(DecodeError::DeltaStep));
    let n = b.len();
    b[n - 66] = 1; // step 1
    assert!(matches!(Message::decode(&b), Ok(Message::Delta(_))));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn delta_round_trips(deleted in any::<Option<bool>>(), zone in proptest::option::of("[a-z]{0,20}"), ports in proptest::option::of(proptest::collection::vec(any::<u16>(), 0..4)), keep in (0u64..4, 0u64..4), base in 0u64..1 << 50, step in 1u64..1 << 20) {
        let d = Delta {
            short: base ^ 0x5555,
            base,
            version: base + step,
            deleted,
            name: None,
            zone,
            endpoints: ports.map(|ps| ListEdit { keep_front: keep.0, keep_back: keep.1, middle: ps.into_iter().map(|p| Endpoint { iface: "eth0".into(), addr: SocketAddr::new([10, 0, 0, 1].into(), p), cost: u32::from(p) }).collect() }),
            pod_cidrs: None,
            tunnel_addrs: None,
            signature: [7; 64],
        };
        let m = Message::Delta(vec![d]);
        prop_assert_eq!(Message::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1500)) {
        let _ = Message::decode(&bytes);
        let _ = codec::decode_state(&bytes);
        let _ = codec::decode_signed(&bytes);
    }

    #[test]
    fn decode_bodies_never_panic(kind in 1u8..=5, zstd in any::<bool>(), body in proptest::collection::vec(any::<u8>(), 0..1500)) {
        let mut b = vec![FORMAT_VERSION, kind, u8::from(zstd)];
        b.extend_from_slice(&body);
        let _ = Message::decode(&b);
    }

    #[test]
    fn decode_mutated_never_panics(which in 0usize..5, pos in any::<prop::sample::Index>(), val in any::<u8>(), cut in any::<prop::sample::Index>()) {
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
        // Whatever decodes, a replica digests without panicking.
        let mut r = replica(6);
        let _ = r.handle_message(5, &b, t0());
    }
}

// --- validation ---

#[test]
fn forged_record_is_rejected_and_counted() {
    let mut a = replica(1);
    let victim = replica(2);
    // Node 3 signs a record carrying node 2's key with its own key.
    let mut rec = victim.own().clone();
    rec.version = 5;
    rec.endpoints.clear();
    let forged = sign_origin(3, &rec);
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
    let evil = SigningKey::from_bytes(&[3; 32]);
    let fake_tomb = sign(
        &NodeRecord {
            deleted: true,
            ..rec
        },
        Signer::Authority,
        |m| evil.sign(m).to_bytes(),
    );
    let err = a
        .handle_message(2, &records_msg(&[fake_tomb]), t0())
        .unwrap_err();
    assert!(matches!(err, Error::Rejected(Reject::Unauthorized)));
}

#[test]
fn equivocation_is_rejected() {
    let mut a = replica(1);
    let mut rec = keyed(2, sample_record(2));
    rec.version = 4;
    let first = sign_origin(2, &rec);
    rec.zone = "other".into();
    let second = sign_origin(2, &rec);
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
    let mut rec = keyed(2, sample_record(2));
    for (v, reason) in [
        (0, Reject::VersionZero),
        (MAX_VERSION + 1, Reject::VersionTooFar),
    ] {
        rec.version = v;
        let err = a
            .handle_message(2, &records_msg(&[sign_origin(2, &rec)]), t0())
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
    let mut rec = keyed(3, sample_record(3));
    rec.version = 1;
    rec.pod_cidrs = vec!["10.64.0.0/16".parse().unwrap()];
    let err = a
        .handle_message(3, &records_msg(&[sign_origin(3, &rec)]), t0())
        .unwrap_err();
    assert!(matches!(err, Error::Rejected(Reject::CidrOverlap)));
    // ... or node 2's name.
    rec.pod_cidrs = vec!["10.200.0.0/24".parse().unwrap()];
    rec.name = b.own().name.clone();
    let err = a
        .handle_message(3, &records_msg(&[sign_origin(3, &rec)]), t0())
        .unwrap_err();
    assert!(matches!(err, Error::Rejected(Reject::NameCollision)));
    let s = a.stats().rejected;
    assert_eq!((s.cidr_overlap, s.name_collision), (1, 1));
    assert_eq!(a.records().count(), 2);
    // A node may move its own CIDR.
    let mut rec2 = b.own().clone();
    rec2.version = 2;
    rec2.pod_cidrs = vec!["10.64.2.0/23".parse().unwrap()];
    a.handle_message(2, &records_msg(&[sign_origin(2, &rec2)]), t0())
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
    a.handle_message(2, &records_msg(&[sign_origin(2, &rec)]), t0())
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
    let shorts: Vec<(u64, u64)> = a.versions().map(|(id, ..)| (short_id(&id), 0)).collect();
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
    let shorts: Vec<(u64, u64)> = a.versions().map(|(id, ..)| (short_id(&id), 0)).collect();
    a.handle_message(2, &Message::Request(shorts).encode(), t0())
        .unwrap();
    let t = a.poll_transmit().unwrap();
    let Message::Records(recs) = Message::decode(&t.payload).unwrap() else {
        panic!("records")
    };
    let (first, ..) = codec::decode_signed(&recs[0]).unwrap();
    assert_eq!(first.identity, a.identity());
}

// --- deltas ---

#[test]
fn own_change_is_pushed_as_a_delta_and_applied() {
    let (mut a, mut b, now) = converged_pair(Config::default());
    let payload = change(&mut a, |r| r.endpoints[0].addr.set_port(51821), now);
    assert!(payload.len() < 130, "{} bytes", payload.len());
    b.handle_message(1, &payload, now).unwrap();
    assert_eq!(b.stats().deltas_applied, 1);
    let rec = b.records().find(|r| r.identity == a.identity()).unwrap();
    assert_eq!(rec, a.own());
    assert!(matches!(b.poll_event(), Some(Event::RecordUpserted(r)) if r.version == 2));
    assert_eq!(b.state_hash(), a.state_hash());
}

#[test]
fn delta_without_its_base_is_ignored_then_the_full_record_is_fetched() {
    let (mut a, mut b, now) = converged_pair(Config::default());
    let _lost = change(&mut a, |r| r.zone = "v2".into(), now);
    let payload = change(&mut a, |r| r.zone = "v3".into(), now);
    b.handle_message(1, &payload, now).unwrap();
    assert_eq!(b.stats().deltas_no_base, 1);
    assert_eq!(b.stats().deltas_applied, 0);
    assert_eq!(version_of(&b, a.identity()), (1, false));
    // b asks the sender for the full record at once (a Request, retried like any other).
    let req = b.poll_transmit().unwrap();
    assert_eq!(
        Message::decode(&req.payload).unwrap(),
        Message::Request(vec![(short_id(&a.identity()), version_key(1, false))])
    );
    a.handle_message(2, &req.payload, now).unwrap();
    let full = a.poll_transmit().unwrap();
    assert!(matches!(
        Message::decode(&full.payload).unwrap(),
        Message::Records(_)
    ));
    b.handle_message(1, &full.payload, now).unwrap();
    assert_eq!(version_of(&b, a.identity()), (3, false));
    assert_eq!(b.own().version, 1);
}

#[test]
fn delta_without_its_base_is_repaired_by_anti_entropy_when_the_request_is_lost() {
    let (mut a, mut b, now) = converged_pair(Config::default());
    let _lost = change(&mut a, |r| r.zone = "v2".into(), now);
    let payload = change(&mut a, |r| r.zone = "v3".into(), now);
    b.handle_message(1, &payload, now).unwrap();
    drain(&mut b);
    pump(&mut a, &mut b, now + Duration::from_secs(1), 30);
    assert_eq!(b.state_hash(), a.state_hash());
    assert_eq!(version_of(&b, a.identity()), (3, false));
}

#[test]
fn anti_entropy_sends_a_delta_to_a_peer_holding_the_previous_version() {
    let (mut a, mut b, now) = converged_pair(Config::default());
    let _lost = change(&mut a, |r| r.zone = "v2".into(), now);
    let records_before = a.stats().tx_messages.records;
    pump(&mut a, &mut b, now + Duration::from_secs(1), 30);
    assert_eq!(b.state_hash(), a.state_hash());
    assert_eq!(b.stats().deltas_applied, 1);
    assert_eq!(a.stats().tx_messages.records, records_before);
}

#[test]
fn forged_delta_is_rejected_and_counted() {
    let (mut a, mut b, now) = converged_pair(Config::default());
    let payload = change(&mut a, |r| r.zone = "real".into(), now);
    let Message::Delta(genuine) = Message::decode(&payload).unwrap() else {
        panic!("delta")
    };
    // A forwarder alters a field: the signature does not cover the rebuilt record.
    let mut altered = genuine.clone();
    altered[0].zone = Some("evil".into());
    // Node 3 signs the same new record with its own key.
    let mut by_other = genuine.clone();
    by_other[0].signature = sign_origin(3, a.own())[..]
        .split_last_chunk::<64>()
        .unwrap()
        .1
        .to_owned();
    // One signature bit flipped.
    let mut flipped = genuine.clone();
    flipped[0].signature[40] ^= 0x10;
    for (i, forged) in [altered, by_other, flipped].into_iter().enumerate() {
        let err = b
            .handle_message(1, &Message::Delta(forged).encode(), now)
            .unwrap_err();
        assert!(matches!(err, Error::Rejected(Reject::BadSignature)));
        assert_eq!(b.stats().rejected.bad_signature, i as u64 + 1);
        assert_eq!(version_of(&b, a.identity()), (1, false));
    }
    // A list edit that does not fit the base was not made from the origin's record.
    let mut misfit = genuine.clone();
    misfit[0].endpoints = Some(ListEdit {
        keep_front: 9,
        keep_back: 0,
        middle: Vec::new(),
    });
    let err = b
        .handle_message(1, &Message::Delta(misfit).encode(), now)
        .unwrap_err();
    assert!(matches!(err, Error::Decode(DecodeError::DeltaMismatch)));
    assert_eq!(b.stats().malformed, 1);
    b.handle_message(1, &payload, now).unwrap();
    assert_eq!(version_of(&b, a.identity()), (2, false));
    assert_eq!(
        b.records()
            .find(|r| r.identity == a.identity())
            .unwrap()
            .zone,
        "real"
    );
}

#[test]
fn leave_travels_as_a_delta_and_a_replayed_older_delta_is_stale() {
    let (mut a, mut b, now) = converged_pair(Config::default());
    let v2 = change(&mut a, |r| r.zone = "v2".into(), now);
    b.handle_message(1, &v2, now).unwrap();
    drain(&mut b);
    a.leave(now).unwrap();
    let tomb = a.poll_transmit().unwrap().payload;
    let Message::Delta(d) = Message::decode(&tomb).unwrap() else {
        panic!("delta")
    };
    assert_eq!(d[0].deleted, Some(true));
    assert!(d[0].zone.is_none() && d[0].endpoints.is_none());
    b.handle_message(1, &tomb, now).unwrap();
    assert!(
        matches!(b.poll_event(), Some(Event::RecordRemoved { identity, .. }) if identity == a.identity())
    );
    assert_eq!(version_of(&b, a.identity()), (3, true));
    assert_eq!(b.records().count(), 1);
    let stale = b.stats().stale;
    b.handle_message(1, &v2, now).unwrap();
    assert_eq!(b.stats().stale, stale + 1);
    assert_eq!(version_of(&b, a.identity()), (3, true));
    assert!(b.poll_event().is_none());
}

#[test]
fn delta_onto_an_authority_tombstone_fetches_the_full_record() {
    let auth = SigningKey::from_bytes(&[42; 32]);
    let config = Config {
        authority: Some(auth.verifying_key().to_bytes()),
        ..Config::default()
    };
    let (mut a, mut b, now) = converged_pair(config);
    // b deletes a with the authority key; a is alive after all and changes.
    b.tombstone([42; 32], a.identity(), now).unwrap();
    drain(&mut b);
    assert_eq!(version_of(&b, a.identity()), (1, true));
    let payload = change(&mut a, |r| r.zone = "alive".into(), now);
    b.handle_message(1, &payload, now).unwrap();
    // Version 1 is held, but as the authority's tombstone: not a base for a's delta.
    assert_eq!(b.stats().deltas_no_base, 1);
    assert_eq!(b.stats().rejected.bad_signature, 0);
    let req = b.poll_transmit().unwrap();
    a.handle_message(2, &req.payload, now).unwrap();
    let full = a.poll_transmit().unwrap();
    b.handle_message(1, &full.payload, now).unwrap();
    assert_eq!(version_of(&b, a.identity()), (2, false));
    assert_eq!(b.records().count(), 2);
}

#[test]
fn restarted_node_continues_with_a_delta_from_the_version_peers_hold() {
    let (mut a, mut b, now) = converged_pair(Config::default());
    b.handle_message(1, &change(&mut a, |r| r.zone = "v2".into(), now), now)
        .unwrap();
    drain(&mut b);
    // a restarts without its state; b still holds a's version 2 and echoes it.
    let mut a2 = Replica::new(Config::default(), [1; 32], sample_record(1), [9; 32], now).unwrap();
    a2.add_peer(2, link());
    drain(&mut a2);
    let echo = records_msg(&[b.entries.get(&a.identity()).unwrap().signed.to_vec()]);
    a2.handle_message(2, &echo, now).unwrap();
    assert_eq!(a2.own().version, 3);
    let push = a2.poll_transmit().unwrap();
    let Message::Delta(d) = Message::decode(&push.payload).unwrap() else {
        panic!("delta")
    };
    assert_eq!((d[0].base, d[0].version), (2, 3));
    b.handle_message(1, &push.payload, now).unwrap();
    assert_eq!(version_of(&b, a.identity()), (3, false));
    assert_eq!(b.stats().deltas_applied, 2);
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

/// `rec` with the WireGuard key and identity of node secret `[secret; 32]`.
fn keyed(secret: u8, mut rec: NodeRecord) -> NodeRecord {
    let key = KeyPair::from_x25519_secret([secret; 32]);
    rec.wg_key = key.wg_public();
    rec.identity = key.identity();
    rec
}

/// `rec` signed by node secret `[secret; 32]` (whatever key `rec` carries).
fn sign_origin(secret: u8, rec: &NodeRecord) -> Vec<u8> {
    let key = KeyPair::from_x25519_secret([secret; 32]);
    sign(rec, Signer::Origin, |m| key.sign(m))
}

/// Two replicas (ids 1 and 2) that know each other, converged and drained.
fn converged_pair(config: Config) -> (Replica<u32>, Replica<u32>, Instant) {
    let mut a = Replica::new(config, [1; 32], sample_record(1), [1; 32], t0()).unwrap();
    let mut b = Replica::new(config, [2; 32], sample_record(2), [2; 32], t0()).unwrap();
    a.add_peer(2, link());
    b.add_peer(1, link());
    let now = pump(&mut a, &mut b, t0(), 20);
    assert_eq!(a.state_hash(), b.state_hash());
    drain(&mut a);
    drain(&mut b);
    (a, b, now)
}

/// Changes `r`'s own record and returns the push to its one peer (a delta).
fn change(r: &mut Replica<u32>, f: impl FnOnce(&mut NodeRecord), now: Instant) -> Vec<u8> {
    r.update_own(f, now).unwrap();
    let t = r.poll_transmit().unwrap();
    assert_eq!(t.payload[1], Kind::Delta as u8);
    assert!(r.poll_transmit().is_none());
    t.payload
}

fn version_of(r: &Replica<u32>, id: [u8; 32]) -> (u64, bool) {
    r.versions()
        .find(|(i, ..)| *i == id)
        .map(|(_, v, d)| (v, d))
        .unwrap()
}

fn own_delta() -> Vec<u8> {
    let mut r = replica(5);
    r.add_peer(1, link());
    drain(&mut r);
    change(&mut r, |rec| rec.zone = "delta".into(), t0())
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
            Message::Request(vec![(1, 0), (2, 4), (3, 1 << 30)]).encode(),
            records_msg(&[victim_signed(&r), victim_signed(&r)]),
            own_delta(),
        ]
    })
}
