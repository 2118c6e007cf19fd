//! Compact binary codec: varints, canonical record bodies, field deltas, messages and the
//! persisted state.
//!
//! Every decoder here is total: any input yields `Ok` or a [`DecodeError`], never a panic, and
//! never allocates more than the input can justify (counts are checked against the bytes left).
//! A record body is canonical: decoding and re-encoding a body the origin produced gives the
//! same bytes, which is what lets a receiver rebuild a signed record from a [`Delta`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

pub use crate::delta::{Delta, ListEdit};
use crate::{Endpoint, NodeRecord, xeddsa};

/// Leading byte of every message and of the persisted state. Version 2: records carry the
/// WireGuard key only (the identity is derived from it), and field deltas exist.
pub const FORMAT_VERSION: u8 = 2;
/// Largest datagram payload the replica emits (fits one UDP datagram over the overlay).
pub const MAX_DATAGRAM: usize = 1200;
/// Largest decompressed message body accepted.
const MAX_MESSAGE_BODY: usize = 64 * 1024;
/// Largest decompressed persisted state accepted.
const MAX_STATE_BODY: usize = 256 * 1024 * 1024;
/// Header: format version, message kind, flags.
pub const HEADER_LEN: usize = 3;
const FLAG_ZSTD: u8 = 1;
const ZSTD_LEVEL: i32 = 3;
/// The state is written at most once a second and read once at start, so it gets zstd's
/// strongest level: for 1000 records 4% smaller than level 9 (110 KB against 114 KB), at about
/// 40 ms per write (level 9: 5 ms).
const ZSTD_STATE_LEVEL: i32 = 19;
/// Length of an ed25519 signature.
pub const SIG_LEN: usize = xeddsa::SIG_LEN;
/// Longest node name.
pub const MAX_NAME: usize = 63;
const MAX_STR: usize = 255;
/// Record flag: a tombstone.
pub(crate) const REC_FLAG_DELETED: u8 = 1;
const REC_FLAG_AUTHORITY: u8 = 2;

/// Why bytes could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ended early.
    #[error("input truncated")]
    Truncated,
    /// Bytes were left after the last field.
    #[error("{0} trailing bytes")]
    Trailing(usize),
    /// A varint is longer than 10 bytes or overflows 64 bits.
    #[error("varint overflow")]
    Varint,
    /// The leading format version is one this build does not know.
    #[error("unsupported format version {0} (this build speaks {FORMAT_VERSION})")]
    UnsupportedVersion(u8),
    /// The message kind byte is unknown.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// Unknown flag bits are set.
    #[error("unknown flags {0:#04x}")]
    UnknownFlags(u8),
    /// A string is not UTF-8 or too long.
    #[error("invalid string")]
    BadString,
    /// A node name is empty or longer than 63 bytes.
    #[error("invalid node name length {0}")]
    BadName(usize),
    /// An address family byte is neither 4 nor 6, or a prefix length is out of range.
    #[error("invalid address")]
    BadAddress,
    /// The zstd frame is corrupt or expands beyond the limit.
    #[error("decompression failed")]
    Decompress,
    /// A count claims more items than the input can hold.
    #[error("count {0} exceeds the input")]
    Count(u64),
    /// A WireGuard key that no X25519 key pair has (non-canonical, on the twist, or of small
    /// order), so it has no identity.
    #[error("unusable WireGuard public key")]
    BadKey,
    /// A delta whose new version is not above its base (or overflows).
    #[error("delta does not advance the version")]
    DeltaStep,
    /// A delta whose list edits keep more items than the base version holds: it was not made
    /// from the origin's record at that version.
    #[error("delta does not fit its base version")]
    DeltaMismatch,
}

/// The message kinds on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Hash of the whole (origin, version) set.
    Summary = 1,
    /// A range of (short id, version) entries.
    Digest = 2,
    /// Short ids whose records the sender wants.
    Request = 3,
    /// Signed records and tombstones.
    Records = 4,
    /// Field deltas of origin-signed records.
    Delta = 5,
}

impl Kind {
    /// Every kind, in wire order.
    pub const ALL: [Kind; 5] = [
        Kind::Summary,
        Kind::Digest,
        Kind::Request,
        Kind::Records,
        Kind::Delta,
    ];

    fn from_u8(b: u8) -> Result<Self, DecodeError> {
        match b {
            1 => Ok(Kind::Summary),
            2 => Ok(Kind::Digest),
            3 => Ok(Kind::Request),
            4 => Ok(Kind::Records),
            5 => Ok(Kind::Delta),
            other => Err(DecodeError::UnknownKind(other)),
        }
    }

    /// A stable lowercase name (metrics, status).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Summary => "summary",
            Kind::Digest => "digest",
            Kind::Request => "request",
            Kind::Records => "records",
            Kind::Delta => "delta",
        }
    }

    /// Index into per-kind counter arrays.
    pub fn index(self) -> usize {
        self as usize - 1
    }
}

/// A digest entry: short origin id and `version << 1 | deleted`.
pub type DigestEntry = (u64, u64);

/// A decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Hash of the sender's whole (origin, version, deleted) set.
    Summary {
        /// First 16 bytes of SHA-256 over the sorted set.
        hash: [u8; 16],
        /// Entries in the set.
        count: u64,
        /// An answer to a summary (never answered itself).
        reply: bool,
    },
    /// The sender's entries with short id in `lo..=hi`, sorted.
    Digest {
        /// Lowest short id covered.
        lo: u64,
        /// Highest short id covered.
        hi: u64,
        /// Entries in the range.
        entries: Vec<DigestEntry>,
    },
    /// Records the sender wants: short id and the `version << 1 | deleted` it holds (0: none),
    /// so the answer can be a delta.
    Request(Vec<DigestEntry>),
    /// Signed records (each `body || signature`).
    Records(Vec<Vec<u8>>),
    /// Field deltas.
    Delta(Vec<Delta>),
}

impl Message {
    /// The message kind.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Summary { .. } => Kind::Summary,
            Message::Digest { .. } => Kind::Digest,
            Message::Request(_) => Kind::Request,
            Message::Records(_) => Kind::Records,
            Message::Delta(_) => Kind::Delta,
        }
    }

    /// Encodes the body (no header, uncompressed).
    pub fn encode_body(&self, out: &mut Vec<u8>) {
        match self {
            Message::Summary { hash, count, reply } => {
                out.extend_from_slice(hash);
                put_varint(out, *count);
                out.push(u8::from(*reply));
            }
            Message::Digest { lo, hi, entries } => {
                out.extend_from_slice(&lo.to_be_bytes());
                out.extend_from_slice(&hi.to_be_bytes());
                put_varint(out, entries.len() as u64);
                for (short, v) in entries {
                    out.extend_from_slice(&short.to_be_bytes());
                    put_varint(out, *v);
                }
            }
            Message::Request(wants) => {
                put_varint(out, wants.len() as u64);
                for (short, have) in wants {
                    out.extend_from_slice(&short.to_be_bytes());
                    put_varint(out, *have);
                }
            }
            Message::Records(recs) => {
                put_varint(out, recs.len() as u64);
                for r in recs {
                    put_bytes(out, r);
                }
            }
            Message::Delta(deltas) => {
                put_varint(out, deltas.len() as u64);
                for d in deltas {
                    d.encode(out);
                }
            }
        }
    }

    /// Encodes a whole datagram: header, then the body, zstd-compressed when that is smaller.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(256);
        self.encode_body(&mut body);
        frame(self.kind(), &body, ZSTD_LEVEL)
    }

    /// Decodes a whole datagram.
    pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
        let (kind, body) = unframe(bytes, MAX_MESSAGE_BODY)?;
        let mut r = Reader::new(&body);
        let msg = match kind {
            Kind::Summary => {
                let hash = r.array::<16>()?;
                let count = r.varint()?;
                let reply = match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError::UnknownFlags(1)),
                };
                Message::Summary { hash, count, reply }
            }
            Kind::Digest => {
                let lo = u64::from_be_bytes(r.array::<8>()?);
                let hi = u64::from_be_bytes(r.array::<8>()?);
                let n = r.count(9)?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    let s = u64::from_be_bytes(r.array::<8>()?);
                    entries.push((s, r.varint()?));
                }
                Message::Digest { lo, hi, entries }
            }
            Kind::Request => {
                let n = r.count(9)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    let s = u64::from_be_bytes(r.array::<8>()?);
                    v.push((s, r.varint()?));
                }
                Message::Request(v)
            }
            Kind::Records => {
                let n = r.count(1)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(r.bytes()?.to_vec());
                }
                Message::Records(v)
            }
            Kind::Delta => {
                let n = r.count(crate::delta::MIN_LEN)?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(Delta::decode(&mut r)?);
                }
                Message::Delta(v)
            }
        };
        r.finish()?;
        Ok(msg)
    }
}

/// Wraps a body in the header, compressing when that saves bytes.
pub fn frame(kind: Kind, body: &[u8], level: i32) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.push(FORMAT_VERSION);
    out.push(kind as u8);
    match zstd::bulk::compress(body, level) {
        Ok(z) if z.len() < body.len() => {
            out.push(FLAG_ZSTD);
            out.extend_from_slice(&z);
        }
        Ok(_) | Err(_) => {
            out.push(0);
            out.extend_from_slice(body);
        }
    }
    out
}

fn unframe(bytes: &[u8], limit: usize) -> Result<(Kind, Vec<u8>), DecodeError> {
    let [version, kind, flags, body @ ..] = bytes else {
        return Err(DecodeError::Truncated);
    };
    if *version != FORMAT_VERSION {
        return Err(DecodeError::UnsupportedVersion(*version));
    }
    let kind = Kind::from_u8(*kind)?;
    let body = match *flags {
        0 => body.to_vec(),
        FLAG_ZSTD => decompress(body, limit)?,
        other => return Err(DecodeError::UnknownFlags(other)),
    };
    Ok((kind, body))
}

fn decompress(body: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    // The frame header states the content size; refuse before allocating if it is too big.
    let n = match zstd::zstd_safe::get_frame_content_size(body) {
        Ok(Some(n)) if n <= limit as u64 => n as usize,
        Ok(Some(_)) | Ok(None) | Err(_) => return Err(DecodeError::Decompress),
    };
    let out = zstd::bulk::decompress(body, n).map_err(|_| DecodeError::Decompress)?;
    if out.len() != n {
        return Err(DecodeError::Decompress);
    }
    Ok(out)
}

/// Kind byte used for the persisted state (not a message kind).
const STATE_KIND: u8 = 0x53;

/// Encodes the persisted state: header (version, 'S', flags), then a count and signed records.
pub fn encode_state<'a>(records: impl ExactSizeIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut body = Vec::new();
    put_varint(&mut body, records.len() as u64);
    for r in records {
        put_bytes(&mut body, r);
    }
    let mut out = frame(Kind::Records, &body, ZSTD_STATE_LEVEL);
    if let Some(b) = out.get_mut(1) {
        *b = STATE_KIND;
    }
    out
}

/// Decodes the persisted state into signed records.
pub fn decode_state(bytes: &[u8]) -> Result<Vec<Vec<u8>>, DecodeError> {
    let [version, kind, rest @ ..] = bytes else {
        return Err(DecodeError::Truncated);
    };
    if *version != FORMAT_VERSION {
        return Err(DecodeError::UnsupportedVersion(*version));
    }
    if *kind != STATE_KIND {
        return Err(DecodeError::UnknownKind(*kind));
    }
    let [flags, body @ ..] = rest else {
        return Err(DecodeError::Truncated);
    };
    let body = match *flags {
        0 => body.to_vec(),
        FLAG_ZSTD => decompress(body, MAX_STATE_BODY)?,
        other => return Err(DecodeError::UnknownFlags(other)),
    };
    let mut r = Reader::new(&body);
    let n = r.count(1)?;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(r.bytes()?.to_vec());
    }
    r.finish()?;
    Ok(v)
}

/// Who signed a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signer {
    /// The record's own identity key.
    Origin,
    /// The cluster authority key (tombstones only).
    Authority,
}

/// Canonical body of a record: the bytes that are signed. Field order is fixed; lists keep the
/// order the origin gave them. The identity is not encoded: it is derived from the WireGuard
/// key.
pub fn encode_record(rec: &NodeRecord, signer: Signer, out: &mut Vec<u8>) {
    put_str(out, &rec.name);
    out.extend_from_slice(&rec.wg_key);
    put_varint(out, rec.version);
    let mut flags = 0;
    if rec.deleted {
        flags |= REC_FLAG_DELETED;
    }
    if signer == Signer::Authority {
        flags |= REC_FLAG_AUTHORITY;
    }
    out.push(flags);
    put_str(out, &rec.zone);
    put_list(out, &rec.endpoints, put_endpoint);
    put_list(out, &rec.pod_cidrs, put_cidr);
    put_list(out, &rec.tunnel_addrs, put_ip);
}

/// A decoded signed record: the record, its signer, the signed body and the signature.
pub type SignedParts<'a> = (NodeRecord, Signer, &'a [u8], [u8; SIG_LEN]);

/// Splits `body || signature` and decodes the body, deriving the identity from the WireGuard
/// key.
pub fn decode_signed(bytes: &[u8]) -> Result<SignedParts<'_>, DecodeError> {
    decode_signed_with(bytes, xeddsa::identity_of)
}

/// [`decode_signed`] with the WireGuard key → identity map given (a cache in front of
/// [`xeddsa::identity_of`]; the map costs about as much as a third of a signature check).
pub fn decode_signed_with(
    bytes: &[u8],
    identity_of: impl FnOnce(&[u8; 32]) -> Option<[u8; 32]>,
) -> Result<SignedParts<'_>, DecodeError> {
    let split = bytes
        .len()
        .checked_sub(SIG_LEN)
        .ok_or(DecodeError::Truncated)?;
    let (body, sig) = bytes.split_at(split);
    let mut sig_arr = [0u8; SIG_LEN];
    sig_arr.copy_from_slice(sig);
    let mut r = Reader::new(body);
    let name = r.name()?;
    let wg_key = r.array::<32>()?;
    let version = r.varint()?;
    let flags = r.u8()?;
    if flags & !(REC_FLAG_DELETED | REC_FLAG_AUTHORITY) != 0 {
        return Err(DecodeError::UnknownFlags(flags));
    }
    let signer = if flags & REC_FLAG_AUTHORITY != 0 {
        Signer::Authority
    } else {
        Signer::Origin
    };
    let zone = r.string()?;
    let endpoints = r.list(Reader::endpoint)?;
    let pod_cidrs = r.list(Reader::cidr)?;
    let tunnel_addrs = r.list(Reader::ip)?;
    r.finish()?;
    let identity = identity_of(&wg_key).ok_or(DecodeError::BadKey)?;
    let rec = NodeRecord {
        name,
        wg_key,
        identity,
        endpoints,
        pod_cidrs,
        tunnel_addrs,
        zone,
        version,
        deleted: flags & REC_FLAG_DELETED != 0,
    };
    Ok((rec, signer, body, sig_arr))
}

/// Appends an unsigned LEB128 varint.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bytes(out, s.as_bytes());
}

/// `n | n × item`.
pub(crate) fn put_list<T>(out: &mut Vec<u8>, items: &[T], put: fn(&mut Vec<u8>, &T)) {
    put_varint(out, items.len() as u64);
    for i in items {
        put(out, i);
    }
}

pub(crate) fn put_endpoint(out: &mut Vec<u8>, e: &Endpoint) {
    put_str(out, &e.iface);
    put_ip(out, &e.addr.ip());
    out.extend_from_slice(&e.addr.port().to_be_bytes());
    put_varint(out, u64::from(e.cost));
}

pub(crate) fn put_cidr(out: &mut Vec<u8>, c: &IpNet) {
    put_ip(out, &c.addr());
    out.push(c.prefix_len());
}

pub(crate) fn put_ip(out: &mut Vec<u8>, ip: &IpAddr) {
    match ip {
        IpAddr::V4(a) => {
            out.push(4);
            out.extend_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            out.push(6);
            out.extend_from_slice(&a.octets());
        }
    }
}

/// A bounds-checked cursor.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        let [b] = self.array::<1>()?;
        Ok(b)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub(crate) fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = self.u8()?;
            let part = u64::from(b & 0x7f);
            if i == 9 && part > 1 {
                return Err(DecodeError::Varint);
            }
            v |= part << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::Varint)
    }

    /// A count of items each at least `min_item` bytes long, checked against what is left.
    pub(crate) fn count(&mut self, min_item: usize) -> Result<usize, DecodeError> {
        let n = self.varint()?;
        let fits = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_mul(min_item))
            .is_some_and(|need| need <= self.buf.len());
        if !fits {
            return Err(DecodeError::Count(n));
        }
        usize::try_from(n).map_err(|_| DecodeError::Count(n))
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.varint()?;
        let n = usize::try_from(n).map_err(|_| DecodeError::Count(n))?;
        self.take(n)
    }

    pub(crate) fn string(&mut self) -> Result<String, DecodeError> {
        let b = self.bytes()?;
        if b.len() > MAX_STR {
            return Err(DecodeError::BadString);
        }
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::BadString)
    }

    pub(crate) fn name(&mut self) -> Result<String, DecodeError> {
        let name = self.string()?;
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(DecodeError::BadName(name.len()));
        }
        Ok(name)
    }

    /// `n | n × item`; every item takes at least 4 bytes (checked against what is left).
    pub(crate) fn list<T>(
        &mut self,
        item: fn(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, DecodeError> {
        let n = self.count(4)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(item(self)?);
        }
        Ok(v)
    }

    pub(crate) fn endpoint(&mut self) -> Result<Endpoint, DecodeError> {
        let iface = self.string()?;
        let ip = self.ip()?;
        let port = u16::from_be_bytes(self.array::<2>()?);
        let cost = u32::try_from(self.varint()?).map_err(|_| DecodeError::Varint)?;
        Ok(Endpoint {
            iface,
            addr: SocketAddr::new(ip, port),
            cost,
        })
    }

    pub(crate) fn cidr(&mut self) -> Result<IpNet, DecodeError> {
        let ip = self.ip()?;
        let len = self.u8()?;
        match ip {
            IpAddr::V4(a) => Ipv4Net::new(a, len).map(IpNet::V4),
            IpAddr::V6(a) => Ipv6Net::new(a, len).map(IpNet::V6),
        }
        .map_err(|_| DecodeError::BadAddress)
    }

    pub(crate) fn ip(&mut self) -> Result<IpAddr, DecodeError> {
        match self.u8()? {
            4 => Ok(IpAddr::V4(Ipv4Addr::from(self.array::<4>()?))),
            6 => Ok(IpAddr::V6(Ipv6Addr::from(self.array::<16>()?))),
            _ => Err(DecodeError::BadAddress),
        }
    }

    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}
