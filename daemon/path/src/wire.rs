//! Wire format of mistnet's path messages: probes (ping, pong), call-me-maybe and relay
//! envelopes. Pure functions over byte slices; decoding is total (every input yields `Ok` or
//! [`Error`], never a panic).
//!
//! Every message starts with a type byte `>= 0x80`, so it never collides with WireGuard's
//! message types 1..=4 and the shell can dispatch on the first byte ([`is_path_message`]).
//! Integers are big-endian. `id` is a node's short id: the first 8 bytes of its WireGuard
//! public key. `mac` is keyed BLAKE2s-128 over every byte before it.
//!
//! ```text
//! Ping         0x80 | sender id 8 | seq u32 | tx timestamp u64 (µs, sender's epoch) | tag u32 | mac 16   = 41 B
//! Pong         0x81 | sender id 8 | seq u32 | timestamp u64 | tag u32 | observed addr    | mac 16   = 42..60 B
//! CallMeMaybe  0x82 | sender id 8 | count u8 (<= 16) | count x addr                     | mac 16
//! RelayTo      0x83 | dst id 8 | src id 8   | payload | mac 16 (key: src <-> relay)
//! RelayFrom    0x84 | relay id 8 | src id 8 | payload | mac 16 (key: relay <-> dst)
//! Nack         0x85 | sender id 8 | session u32 | flags u8 | count u8 (1..=16) | count x (first u64 | len u16) | mac 16 = 41..201 B
//!
//! addr = family u8 (0 none | 4 IPv4 | 6 IPv6) | IP 0/4/16 | port u16 (absent for family 0)
//! ```
//!
//! Probe MACs use the pairwise key of sender and receiver (derived by both from X25519
//! static-static DH, given to the selector as [`crate::PeerKeys::mac_key`]). A pong echoes the
//! ping's `seq`, `timestamp` and `tag` (the sender's id of the path the ping went out on) and
//! reports the source address the responder saw, which is how a node behind NAT learns its
//! public mapping.
//!
//! Relay envelopes carry opaque payloads (WireGuard datagrams or probes) through a third node.
//! `RelayFrom` names the relay so the receiver knows which key verifies it: the relay's source
//! address is no reliable identity behind NAT. Both envelopes add [`RELAY_OVERHEAD`] bytes.
//!
//! A `Nack` asks a peer in redundant mode to resend WireGuard data messages its sender never
//! saw arrive: `session` is the receiver's index (the one the data messages carry), the ranges
//! are their counters. Flag bit 0 (`copies late`) says the copies on the second path do not
//! fill gaps in time. Resending is safe: the datagram is the same ciphertext, and WireGuard's
//! replay window drops whatever arrives twice.
//!
//! Replay of a probe is harmless by construction: a pong is accepted once, for a ping the
//! receiver sent itself, and a replayed ping yields a pong of the same size (no amplification).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::Range;

use blake2::Blake2sMac;
use blake2::digest::consts::U16;
use blake2::digest::{KeyInit, Mac};

/// Message type: probe request.
pub const PING: u8 = 0x80;
/// Message type: probe reply.
pub const PONG: u8 = 0x81;
/// Message type: "probe these endpoints of mine" (NAT traversal).
pub const CALL_ME_MAYBE: u8 = 0x82;
/// Message type: envelope from a node to a relay.
pub const RELAY_TO: u8 = 0x83;
/// Message type: envelope from a relay to the destination.
pub const RELAY_FROM: u8 = 0x84;
/// Message type: "resend these data messages" (selective repair in redundant mode).
pub const NACK: u8 = 0x85;
/// Most counter ranges one nack carries.
pub const MAX_NACK_RANGES: usize = 16;
/// Length of a short id.
pub const ID_LEN: usize = 8;
/// Length of a MAC.
pub const MAC_LEN: usize = 16;
/// Length of a ping.
pub const PING_LEN: usize = HEADER_LEN + PING_BODY_LEN + MAC_LEN;
/// Largest pong (IPv6 observed address).
pub const MAX_PONG_LEN: usize = HEADER_LEN + PING_BODY_LEN + MAX_ADDR_LEN + MAC_LEN;
/// Most endpoints a call-me-maybe carries.
pub const MAX_ENDPOINTS: usize = 16;
/// Bytes a relay envelope adds to its payload (type, two ids, MAC); the shell lowers the
/// tunnel MTU of relayed paths by this much.
pub const RELAY_OVERHEAD: usize = 1 + 2 * ID_LEN + MAC_LEN;

const HEADER_LEN: usize = 1 + ID_LEN;
const PING_BODY_LEN: usize = 4 + 8 + 4;
const MAX_ADDR_LEN: usize = 1 + 16 + 2;

/// A node's short id (first 8 bytes of its WireGuard public key).
pub type ShortId = [u8; ID_LEN];
/// A pairwise MAC key.
pub type MacKey = [u8; 32];

type Blake2sMac128 = Blake2sMac<U16>;

/// Why bytes are not a well-formed path message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("empty datagram")]
    Empty,
    #[error("message type {0:#04x} is not a mistnet path message")]
    UnknownType(u8),
    #[error("truncated message: {len} bytes, at least {need} needed")]
    Truncated { len: usize, need: usize },
    #[error("{0} trailing bytes after the message body")]
    Trailing(usize),
    #[error("unknown address family {0}")]
    Family(u8),
    #[error("{0} endpoints, at most {MAX_ENDPOINTS} allowed")]
    TooManyEndpoints(usize),
    #[error("{0} nack ranges, 1 to {MAX_NACK_RANGES} allowed")]
    NackRanges(usize),
    #[error("unknown nack flags {0:#04x}")]
    NackFlags(u8),
}

/// True if the datagram's first byte is one of the message types above (the shell's
/// dispatch test; WireGuard's types are 1..=4).
pub fn is_path_message(datagram: &[u8]) -> bool {
    matches!(datagram.first(), Some(&(PING..=NACK)))
}

/// Body of a nack: which data messages of one WireGuard session went missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nack {
    /// The receiver index of the session (as carried by the data messages).
    pub session: u32,
    /// The second path's copies do not fill gaps in time (too late or lost): the sender
    /// should resend only what is missing instead of copying everything.
    pub copies_late: bool,
    /// Missing counters, as `first..first + len` ranges (1..=[`MAX_NACK_RANGES`]).
    pub ranges: Vec<(u64, u16)>,
}

/// A decoded, not yet verified nack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedNack<'a> {
    pub sender: ShortId,
    pub nack: Nack,
    signed: &'a [u8],
    mac: &'a [u8],
}

impl SignedNack<'_> {
    /// True if the MAC is valid under `key`.
    pub fn verify(&self, key: &MacKey) -> bool {
        verify(key, self.signed, self.mac)
    }
}

const NACK_FIXED_LEN: usize = HEADER_LEN + 4 + 1 + 1;
const NACK_RANGE_LEN: usize = 8 + 2;
const NACK_COPIES_LATE: u8 = 1;

/// Encodes a nack into `out` (cleared first); ranges past [`MAX_NACK_RANGES`] are left out
/// (the caller sends them in another nack).
pub fn encode_nack(sender: &ShortId, nack: &Nack, key: &MacKey, out: &mut Vec<u8>) {
    out.clear();
    out.push(NACK);
    out.extend_from_slice(sender);
    out.extend_from_slice(&nack.session.to_be_bytes());
    out.push(if nack.copies_late {
        NACK_COPIES_LATE
    } else {
        0
    });
    let ranges = nack.ranges.get(..MAX_NACK_RANGES).unwrap_or(&nack.ranges);
    // Bounded by MAX_NACK_RANGES above, so the cast cannot truncate.
    out.push(ranges.len() as u8);
    for (first, len) in ranges {
        out.extend_from_slice(&first.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
    }
    seal(key, out);
}

/// Decodes a nack (structure only: call [`SignedNack::verify`]).
pub fn decode_nack(datagram: &[u8]) -> Result<SignedNack<'_>, Error> {
    let (&ty, _) = datagram.split_first().ok_or(Error::Empty)?;
    if ty != NACK {
        return Err(Error::UnknownType(ty));
    }
    let (signed, mac) = split_mac(datagram, NACK_FIXED_LEN + NACK_RANGE_LEN + MAC_LEN)?;
    let mut r = Reader::new(signed, 1);
    let sender = r.id()?;
    let session = r.u32()?;
    let flags = r.u8()?;
    if flags & !NACK_COPIES_LATE != 0 {
        return Err(Error::NackFlags(flags));
    }
    let count = usize::from(r.u8()?);
    if count == 0 || count > MAX_NACK_RANGES {
        return Err(Error::NackRanges(count));
    }
    let mut ranges = Vec::with_capacity(count);
    for _ in 0..count {
        let first = r.u64()?;
        let len = u16::from_be_bytes(r.take()?);
        ranges.push((first, len));
    }
    r.finish()?;
    Ok(SignedNack {
        sender,
        nack: Nack {
            session,
            copies_late: flags & NACK_COPIES_LATE != 0,
            ranges,
        },
        signed,
        mac,
    })
}

/// Body of a ping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ping {
    pub seq: u32,
    /// Microseconds since the sender's own epoch; only echoed by the responder.
    pub timestamp_us: u64,
    /// The sender's tag of the path the ping went out on.
    pub tag: u32,
}

/// Body of a pong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pong {
    pub seq: u32,
    pub timestamp_us: u64,
    pub tag: u32,
    /// The source address the responder saw the ping come from (none through a relay).
    pub observed: Option<SocketAddr>,
}

/// Body of a probe message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Ping(Ping),
    Pong(Pong),
    CallMeMaybe(Vec<SocketAddr>),
}

/// A decoded, not yet verified probe message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe<'a> {
    pub sender: ShortId,
    pub body: Body,
    signed: &'a [u8],
    mac: &'a [u8],
}

impl Probe<'_> {
    /// True if the MAC is valid under `key` (constant-time comparison).
    pub fn verify(&self, key: &MacKey) -> bool {
        verify(key, self.signed, self.mac)
    }
}

/// Decodes a ping, pong or call-me-maybe (structure only: call [`Probe::verify`]).
pub fn decode_probe(datagram: &[u8]) -> Result<Probe<'_>, Error> {
    let (&ty, _) = datagram.split_first().ok_or(Error::Empty)?;
    let min = match ty {
        PING => PING_LEN,
        PONG => HEADER_LEN + PING_BODY_LEN + 1 + MAC_LEN,
        CALL_ME_MAYBE => HEADER_LEN + 1 + MAC_LEN,
        other => return Err(Error::UnknownType(other)),
    };
    let (signed, mac) = split_mac(datagram, min)?;
    let mut r = Reader::new(signed, 1);
    let sender = r.id()?;
    let body = match ty {
        PING => Body::Ping(Ping {
            seq: r.u32()?,
            timestamp_us: r.u64()?,
            tag: r.u32()?,
        }),
        PONG => Body::Pong(Pong {
            seq: r.u32()?,
            timestamp_us: r.u64()?,
            tag: r.u32()?,
            observed: r.addr()?,
        }),
        _ => {
            let count = usize::from(r.u8()?);
            if count > MAX_ENDPOINTS {
                return Err(Error::TooManyEndpoints(count));
            }
            let mut addrs = Vec::with_capacity(count);
            for _ in 0..count {
                if let Some(a) = r.addr()? {
                    addrs.push(a);
                }
            }
            Body::CallMeMaybe(addrs)
        }
    };
    r.finish()?;
    Ok(Probe {
        sender,
        body,
        signed,
        mac,
    })
}

/// Encodes a ping into `out` (cleared first).
pub fn encode_ping(sender: &ShortId, ping: &Ping, key: &MacKey, out: &mut Vec<u8>) {
    out.clear();
    out.push(PING);
    out.extend_from_slice(sender);
    put_ping_body(out, ping.seq, ping.timestamp_us, ping.tag);
    seal(key, out);
}

/// Encodes a pong into `out` (cleared first).
pub fn encode_pong(sender: &ShortId, pong: &Pong, key: &MacKey, out: &mut Vec<u8>) {
    out.clear();
    out.push(PONG);
    out.extend_from_slice(sender);
    put_ping_body(out, pong.seq, pong.timestamp_us, pong.tag);
    put_addr(out, pong.observed);
    seal(key, out);
}

/// Encodes a call-me-maybe into `out` (cleared first); at most [`MAX_ENDPOINTS`] addresses
/// are taken, the rest is ignored.
pub fn encode_call_me_maybe(
    sender: &ShortId,
    endpoints: &[SocketAddr],
    key: &MacKey,
    out: &mut Vec<u8>,
) {
    out.clear();
    out.push(CALL_ME_MAYBE);
    out.extend_from_slice(sender);
    let endpoints = endpoints.get(..MAX_ENDPOINTS).unwrap_or(endpoints);
    // Bounded by MAX_ENDPOINTS above, so the cast cannot truncate.
    out.push(endpoints.len() as u8);
    for a in endpoints {
        put_addr(out, Some(*a));
    }
    seal(key, out);
}

/// A parsed `RelayTo` envelope (structure only: call [`RelayTo::verify`] with the key shared
/// by `src` and the relay).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTo<'a> {
    pub dst: ShortId,
    pub src: ShortId,
    pub payload: &'a [u8],
    signed: &'a [u8],
    mac: &'a [u8],
}

impl RelayTo<'_> {
    /// True if the MAC is valid under `key`.
    pub fn verify(&self, key: &MacKey) -> bool {
        verify(key, self.signed, self.mac)
    }
}

/// A parsed `RelayFrom` envelope (structure only: call [`RelayFrom::verify`] with the key
/// shared with `relay`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayFrom<'a> {
    pub relay: ShortId,
    pub src: ShortId,
    pub payload: &'a [u8],
    /// Where `payload` sits in the parsed datagram.
    pub payload_range: Range<usize>,
    signed: &'a [u8],
    mac: &'a [u8],
}

impl RelayFrom<'_> {
    /// True if the MAC is valid under `key`.
    pub fn verify(&self, key: &MacKey) -> bool {
        verify(key, self.signed, self.mac)
    }
}

/// Wraps `payload` for the relay: `key` is the sender's pairwise key with the relay.
pub fn relay_to(dst: &ShortId, src: &ShortId, key: &MacKey, payload: &[u8], out: &mut Vec<u8>) {
    envelope(RELAY_TO, dst, src, key, payload, out);
}

/// Wraps `payload` for the destination: `key` is the relay's pairwise key with it.
pub fn relay_from(relay: &ShortId, src: &ShortId, key: &MacKey, payload: &[u8], out: &mut Vec<u8>) {
    envelope(RELAY_FROM, relay, src, key, payload, out);
}

/// Parses a `RelayTo` envelope.
pub fn parse_relay_to(datagram: &[u8]) -> Result<RelayTo<'_>, Error> {
    let (a, src, payload, _, signed, mac) = parse_envelope(RELAY_TO, datagram)?;
    Ok(RelayTo {
        dst: a,
        src,
        payload,
        signed,
        mac,
    })
}

/// Parses a `RelayFrom` envelope.
pub fn parse_relay_from(datagram: &[u8]) -> Result<RelayFrom<'_>, Error> {
    let (relay, src, payload, payload_range, signed, mac) = parse_envelope(RELAY_FROM, datagram)?;
    Ok(RelayFrom {
        relay,
        src,
        payload,
        payload_range,
        signed,
        mac,
    })
}

type Envelope<'a> = (ShortId, ShortId, &'a [u8], Range<usize>, &'a [u8], &'a [u8]);

fn parse_envelope(ty: u8, datagram: &[u8]) -> Result<Envelope<'_>, Error> {
    let (&got, _) = datagram.split_first().ok_or(Error::Empty)?;
    if got != ty {
        return Err(Error::UnknownType(got));
    }
    let (signed, mac) = split_mac(datagram, RELAY_OVERHEAD + 1)?;
    let mut r = Reader::new(signed, 1);
    let a = r.id()?;
    let b = r.id()?;
    let range = r.pos..signed.len();
    let payload = signed.get(range.clone()).ok_or(Error::Truncated {
        len: datagram.len(),
        need: RELAY_OVERHEAD + 1,
    })?;
    Ok((a, b, payload, range, signed, mac))
}

fn envelope(ty: u8, a: &ShortId, b: &ShortId, key: &MacKey, payload: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(payload.len() + RELAY_OVERHEAD);
    out.push(ty);
    out.extend_from_slice(a);
    out.extend_from_slice(b);
    out.extend_from_slice(payload);
    seal(key, out);
}

fn split_mac(datagram: &[u8], min: usize) -> Result<(&[u8], &[u8]), Error> {
    if datagram.len() < min {
        return Err(Error::Truncated {
            len: datagram.len(),
            need: min,
        });
    }
    Ok(datagram.split_at(datagram.len() - MAC_LEN))
}

fn mac_state(key: &MacKey) -> Blake2sMac128 {
    <Blake2sMac128 as KeyInit>::new(key.into())
}

fn seal(key: &MacKey, out: &mut Vec<u8>) {
    let mut m = mac_state(key);
    m.update(out);
    let tag = m.finalize().into_bytes();
    out.extend_from_slice(&tag);
}

fn verify(key: &MacKey, signed: &[u8], tag: &[u8]) -> bool {
    let mut m = mac_state(key);
    m.update(signed);
    m.verify_slice(tag).is_ok()
}

fn put_ping_body(out: &mut Vec<u8>, seq: u32, ts: u64, tag: u32) {
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&ts.to_be_bytes());
    out.extend_from_slice(&tag.to_be_bytes());
}

fn put_addr(out: &mut Vec<u8>, addr: Option<SocketAddr>) {
    let Some(addr) = addr else {
        out.push(0);
        return;
    };
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

/// A bounds-checked cursor: every read returns `Err(Truncated)` instead of panicking.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], pos: usize) -> Self {
        Self { buf, pos }
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let end = self.pos.saturating_add(N);
        let bytes = self
            .buf
            .get(self.pos..end)
            .and_then(|s| <[u8; N]>::try_from(s).ok())
            .ok_or(Error::Truncated {
                len: self.buf.len() + MAC_LEN,
                need: end + MAC_LEN,
            })?;
        self.pos = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_be_bytes(self.take()?))
    }

    fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_be_bytes(self.take()?))
    }

    fn id(&mut self) -> Result<ShortId, Error> {
        self.take()
    }

    fn addr(&mut self) -> Result<Option<SocketAddr>, Error> {
        let ip = match self.u8()? {
            0 => return Ok(None),
            4 => IpAddr::V4(Ipv4Addr::from(self.take::<4>()?)),
            6 => IpAddr::V6(Ipv6Addr::from(self.take::<16>()?)),
            other => return Err(Error::Family(other)),
        };
        let port = u16::from_be_bytes(self.take()?);
        Ok(Some(SocketAddr::new(ip, port)))
    }

    fn finish(&self) -> Result<(), Error> {
        match self.buf.len().saturating_sub(self.pos) {
            0 => Ok(()),
            n => Err(Error::Trailing(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: MacKey = [7; 32];
    const ID: ShortId = [1, 2, 3, 4, 5, 6, 7, 8];

    #[test]
    fn ping_round_trips_and_is_small() {
        let ping = Ping {
            seq: 9,
            timestamp_us: 123_456,
            tag: 3,
        };
        let mut out = Vec::new();
        encode_ping(&ID, &ping, &K, &mut out);
        assert_eq!(out.len(), PING_LEN);
        assert!(out.len() <= 48);
        let p = decode_probe(&out).unwrap();
        assert_eq!(p.sender, ID);
        assert_eq!(p.body, Body::Ping(ping));
        assert!(p.verify(&K));
        assert!(!p.verify(&[8; 32]));
    }

    #[test]
    fn pong_round_trips_with_each_address_family() {
        for observed in [
            None,
            Some("192.0.2.1:51820".parse().unwrap()),
            Some("[2001:db8::1]:9".parse().unwrap()),
        ] {
            let pong = Pong {
                seq: 1,
                timestamp_us: 2,
                tag: 3,
                observed,
            };
            let mut out = Vec::new();
            encode_pong(&ID, &pong, &K, &mut out);
            assert!(out.len() <= MAX_PONG_LEN);
            let p = decode_probe(&out).unwrap();
            assert_eq!(p.body, Body::Pong(pong));
            assert!(p.verify(&K));
        }
    }

    #[test]
    fn call_me_maybe_round_trips() {
        let addrs: Vec<SocketAddr> = vec![
            "198.51.100.7:4000".parse().unwrap(),
            "[2001:db8::2]:5".parse().unwrap(),
        ];
        let mut out = Vec::new();
        encode_call_me_maybe(&ID, &addrs, &K, &mut out);
        let p = decode_probe(&out).unwrap();
        assert_eq!(p.body, Body::CallMeMaybe(addrs));
        assert!(p.verify(&K));
    }

    #[test]
    fn flipped_bit_fails_mac() {
        let mut out = sample_ping();
        out[12] ^= 1;
        assert!(!decode_probe(&out).unwrap().verify(&K));
    }

    #[test]
    fn truncation_and_garbage_are_errors() {
        let mut out = sample_ping();
        for n in 0..out.len() {
            assert!(decode_probe(&out[..n]).is_err(), "len {n}");
        }
        out.push(0);
        assert!(decode_probe(&out).is_err());
        assert_eq!(decode_probe(&[4, 0, 0]), Err(Error::UnknownType(4)));
        assert_eq!(decode_probe(&[]), Err(Error::Empty));
    }

    #[test]
    fn relay_envelopes_round_trip() {
        let payload = [4u8, 0, 0, 0, 9, 9];
        let mut out = Vec::new();
        relay_to(&[2; 8], &ID, &K, &payload, &mut out);
        assert_eq!(out.len(), payload.len() + RELAY_OVERHEAD);
        let v = parse_relay_to(&out).unwrap();
        assert_eq!((v.dst, v.src, v.payload), ([2; 8], ID, &payload[..]));
        assert!(v.verify(&K));
        relay_from(&[3; 8], &ID, &K, &payload, &mut out);
        assert_eq!(out.len(), payload.len() + RELAY_OVERHEAD);
        let v = parse_relay_from(&out).unwrap();
        assert_eq!((v.relay, v.src, v.payload), ([3; 8], ID, &payload[..]));
        assert_eq!(&out[v.payload_range.clone()], &payload[..]);
        assert!(v.verify(&K));
        assert!(parse_relay_to(&out).is_err());
        assert!(parse_relay_from(&out[..RELAY_OVERHEAD]).is_err());
    }

    #[test]
    fn nack_round_trips_and_rejects_garbage() {
        let nack = Nack {
            session: 0xdead_beef,
            copies_late: true,
            ranges: vec![(7, 3), (u64::MAX - 1, 1)],
        };
        let mut out = Vec::new();
        encode_nack(&ID, &nack, &K, &mut out);
        assert_eq!(out.len(), NACK_FIXED_LEN + 2 * NACK_RANGE_LEN + MAC_LEN);
        assert!(is_path_message(&out));
        let n = decode_nack(&out).unwrap();
        assert_eq!((n.sender, &n.nack), (ID, &nack));
        assert!(n.verify(&K));
        assert!(!n.verify(&[8; 32]));
        for cut in 0..out.len() {
            assert!(decode_nack(&out[..cut]).is_err(), "len {cut}");
        }
        let mut flipped = out.clone();
        flipped[10] ^= 1;
        assert!(!decode_nack(&flipped).unwrap().verify(&K));
        let mut flags = out.clone();
        flags[13] = 0x80;
        assert_eq!(decode_nack(&flags), Err(Error::NackFlags(0x80)));
        let mut zero = out.clone();
        zero[14] = 0;
        assert_eq!(decode_nack(&zero), Err(Error::NackRanges(0)));
        assert!(decode_nack(&sample_ping()).is_err());
    }

    #[test]
    fn nack_keeps_at_most_sixteen_ranges() {
        let nack = Nack {
            session: 1,
            copies_late: false,
            ranges: (0..40).map(|i| (i * 10, 2)).collect(),
        };
        let mut out = Vec::new();
        encode_nack(&ID, &nack, &K, &mut out);
        let n = decode_nack(&out).unwrap();
        assert_eq!(n.nack.ranges.len(), MAX_NACK_RANGES);
        assert_eq!(n.nack.ranges[15], (150, 2));
    }

    fn sample_ping() -> Vec<u8> {
        let mut out = Vec::new();
        let ping = Ping {
            seq: 1,
            timestamp_us: 2,
            tag: 3,
        };
        encode_ping(&ID, &ping, &K, &mut out);
        out
    }
}
