//! Sans-IO control channel core (pure: no sockets, no clock): replicates signed node records
//! between mistnet nodes with partition-tolerant, compressed anti-entropy gossip.
//!
//! A [`Replica`] holds every node's latest [`NodeRecord`] (signed by that node) and tombstones
//! for deleted nodes. The shell feeds it datagrams from peers
//! ([`Replica::handle_message`]) and timer ticks ([`Replica::handle_timeout`]), and sends what
//! [`Replica::poll_transmit`] returns; [`Replica::poll_event`] reports records appearing,
//! changing and disappearing.
//!
//! Keys: a node has one key pair, its WireGuard (X25519) key. It signs its records with XEdDSA
//! ([`xeddsa`]), and its `identity` (the origin id) is the ed25519 public key derived from the
//! WireGuard public key: records carry only the WireGuard key and every receiver derives the
//! identity. XEdDSA exists for exactly this reuse of a Diffie-Hellman key for signatures.
//!
//! Invariants:
//! - Only a record's origin can create it: every record carries a signature by its
//!   `identity`, checked on every receive (full or rebuilt from a delta) and on import.
//!   Tombstones may instead be signed by the cluster authority key ([`Config::authority`], a
//!   plain ed25519 key). Forwarders cannot alter records.
//! - Per origin, the replica keeps the record with the highest `(version, deleted)`; a
//!   tombstone at version `v` beats every record of that origin with version `<= v`. The
//!   origin alone increments its version, and [`Replica`] never lets its own version go
//!   backwards: it continues above persisted state ([`Replica::import_state`]) and above any
//!   copy of its own record a peer echoes back.
//! - Tombstones are kept and gossiped for [`Config::tombstone_ttl`], then reduced to a local
//!   floor (origin → version) that still rejects older copies, so a deletion made on one side
//!   of a partition is not undone when it heals.
//! - Live records never overlap in pod CIDRs and never share a name: the record that arrived
//!   first is kept, the newcomer is rejected and counted ([`Stats`]). The own record always wins
//!   locally.
//! - Every datagram fits [`MAX_DATAGRAM`] bytes; decoding is total (any bytes give `Ok` or
//!   `Err`, never a panic).
//!
//! Protocol (anti-entropy, push-pull):
//! 1. Every round (base [`Config::round_interval`] with ±25% jitter, doubling up to
//!    [`Config::max_round_interval`] while nothing changes) a node sends `Summary` (a 16-byte
//!    hash of its whole (origin, version, deleted) set) to [`Config::fanout`] random peers,
//!    preferring cheaper links (weight ∝ 1/(16 + cost): expensive links are picked less often,
//!    never never).
//! 2. A receiver with the same hash answers with a `Summary` reply (both sides record the
//!    sync); with a different hash it answers with its `Digest`: sorted (short id, version)
//!    entries, split into self-contained ranges `lo..=hi` so each datagram can be acted on
//!    alone.
//! 3. Per digest range the summary's sender pushes `Records` the peer lacks or has older, and
//!    sends a `Request` for the short ids it lacks; unanswered requests are retried after
//!    [`Config::request_timeout`].
//! 4. Own changes ([`Replica::update_own`], [`Replica::leave`], [`Replica::tombstone`]) are
//!    pushed at once to [`Config::push_fanout`] peers; records newly learned from a peer are
//!    forwarded once to [`Config::forward_fanout`] others (rumor), which makes one change
//!    spread in a few RTTs; anti-entropy repairs whatever the rumor misses.
//! 5. A record goes out as a `Delta` from the version it replaced when the peer is known to
//!    hold that version (its digest or request says so) and for pushes and rumors (the peer
//!    most likely holds it); otherwise in full. A receiver that lacks the base ignores the
//!    delta (counted in [`Stats::deltas_no_base`]) and requests the full record from the
//!    sender; one that has it rebuilds the record and checks the origin's signature over it,
//!    so a forged delta is rejected like a forged record. Authority tombstones never travel as
//!    deltas, and are never a base.
//! 6. Records leave through a per-peer token bucket ([`LinkInfo::budget_bytes_per_sec`]), own
//!    record first, then the most recently learned.
//!
//! Wire format (all integers are LEB128 varints unless sized; see [`codec`]):
//! - Header: `format_version (=2) | kind | flags` (bit 0: body is a zstd frame, used only when
//!   smaller). Unknown versions, kinds and flags are rejected with a clear error; version 1
//!   (records with a separate identity key) is not understood.
//! - `Summary(1)`: `hash[16] | count | reply(0/1)`.
//! - `Digest(2)`: `lo u64be | hi u64be | n | n × (short u64be | version<<1|deleted)`.
//! - `Request(3)`: `n | n × (short u64be | version<<1|deleted held, 0 if none)`.
//! - `Records(4)`: `n | n × (len | signed record)`.
//! - `Delta(5)`: `n | n × delta`; a delta is `short u64be | base version | new − base |
//!   mask u8 | changed fields in mask order | signature[64]` (mask bits: 1 name, 2 flags,
//!   4 zone, 8 endpoints, 16 pod CIDRs, 32 tunnel addresses; a list field is
//!   `keep_front | keep_back | n | n × item`: the items kept from the front and back of the
//!   base's list, and the new middle). The signature is the origin's over the full new record.
//! - Signed record: `name | wg_key[32] | version | flags (1 deleted, 2 signed by authority) |
//!   zone | endpoints (n × iface, ip, port u16be, cost) | pod_cidrs (n × ip, prefix u8) |
//!   tunnel_addrs (n × ip) | signature[64]`; strings are `len | utf8`, ips are `4|a[4]` or
//!   `6|a[16]`. The signature covers `"mistnet-sync record v2\0" || body`. The identity is
//!   not sent: it is derived from `wg_key`, and a key without one (non-canonical, small
//!   order) makes the record malformed.
//! - Short id: the first 8 bytes of the identity (big endian).
//! - Persisted state: `version (=2) | 0x53 | flags | n | n × (len | signed record)`. A state
//!   of another version is refused with [`DecodeError::UnsupportedVersion`]; the shell starts
//!   empty and gossip refills it.
//!
//! Peers: `P` is the caller's id of a peer (e.g. the node name, which is what records carry in
//! [`NodeRecord::name`]). The replica does not add peers by itself: the shell adds every node it
//! can reach ([`Replica::add_peer`]); any connected peer graph converges. Messages from peers
//! not added are still answered.
//!
//! Time and randomness: `now` is passed in everywhere; peer choice and jitter come from the
//! seed given to [`Replica::new`]; signatures need no randomness (see [`xeddsa`]).
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod codec;
mod delta;
mod rng;
pub mod sim;
pub mod xeddsa;

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::{Signer as _, SigningKey};
use ipnet::IpNet;
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tracing::{debug, trace};

pub use codec::{DecodeError, FORMAT_VERSION, Kind, MAX_DATAGRAM};
use codec::{Delta, Message, Signer};
use rng::Rng;
use xeddsa::KeyPair;

/// Versions above this are rejected as absurd (a node would need ~9000 years at 1 update/µs).
pub const MAX_VERSION: u64 = 1 << 48;
/// Largest signed record (so one always fits a datagram).
pub const MAX_RECORD: usize = 1000;
/// Domain separation for record signatures (the format version is part of it, so a signature
/// over one body layout never verifies as another).
const SIG_CONTEXT: &[u8] = b"mistnet-sync record v2\0";
/// Raw bytes packed into one Records datagram before compression is tried.
const RAW_TARGET: usize = 1500;
/// Digest entries per datagram (11 bytes each for versions < 2^20).
const DIGEST_CHUNK: usize = 100;
/// Entries per Request datagram (up to 16 bytes each).
const REQUEST_CHUNK: usize = 70;

/// A node's reachable endpoint on one interface.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Endpoint {
    /// Interface name (≤ 255 bytes).
    pub iface: String,
    /// Underlay address and port.
    pub addr: SocketAddr,
    /// Path cost (lower is preferred; metered links are high).
    pub cost: u32,
}

/// One node's published state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeRecord {
    /// Node name, 1..=63 bytes.
    pub name: String,
    /// WireGuard (X25519) public key: the node's one key, which also signs its records.
    pub wg_key: [u8; 32],
    /// ed25519 public key derived from `wg_key` ([`xeddsa::identity_of`]): the origin id.
    /// Computed on decode, never sent.
    pub identity: [u8; 32],
    /// Underlay endpoints.
    pub endpoints: Vec<Endpoint>,
    /// Pod CIDRs.
    pub pod_cidrs: Vec<IpNet>,
    /// Overlay tunnel addresses.
    pub tunnel_addrs: Vec<IpAddr>,
    /// Zone (≤ 255 bytes).
    pub zone: String,
    /// Incremented only by the origin.
    pub version: u64,
    /// Tombstone.
    pub deleted: bool,
}

/// Replica configuration. Defaults suit an edge cluster over WAN links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Base anti-entropy round interval (default 1 s; ±25% jitter).
    pub round_interval: Duration,
    /// Round interval reached by doubling while nothing changes (default 20 s).
    pub max_round_interval: Duration,
    /// Peers sent a Summary per round (default 2).
    pub fanout: usize,
    /// Peers an own change is pushed to at once (default 3).
    pub push_fanout: usize,
    /// Peers a newly learned record is forwarded to once (default 2; 0 disables rumoring).
    pub forward_fanout: usize,
    /// Time before an unanswered Request is retried (default 2 s).
    pub request_timeout: Duration,
    /// Retries per Request before leaving it to the next round (default 3).
    pub request_retries: u32,
    /// How long a tombstone is kept and gossiped (default 7 days).
    pub tombstone_ttl: Duration,
    /// Cluster authority public key allowed to sign tombstones of other nodes (default none).
    pub authority: Option<[u8; 32]>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            round_interval: Duration::from_secs(1),
            max_round_interval: Duration::from_secs(20),
            fanout: 2,
            push_fanout: 3,
            forward_fanout: 2,
            request_timeout: Duration::from_secs(2),
            request_retries: 3,
            tombstone_ttl: Duration::from_secs(7 * 24 * 3600),
            authority: None,
        }
    }
}

/// What the replica knows about the link to a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LinkInfo {
    /// Link cost; cheaper peers are chosen more often.
    pub cost: u32,
    /// Bytes per second this replica may send to the peer (`None`: unlimited).
    pub budget_bytes_per_sec: Option<u32>,
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit<P> {
    /// Destination peer.
    pub to: P,
    /// At most [`MAX_DATAGRAM`] bytes.
    pub payload: Vec<u8>,
}

/// A change of the replicated state (remote records; the own record's removal by the
/// authority is reported too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A live record appeared or changed.
    RecordUpserted(Arc<NodeRecord>),
    /// A record was deleted (tombstone) or evicted.
    RecordRemoved {
        /// Origin id.
        identity: [u8; 32],
        /// Its last name.
        name: String,
    },
}

/// Why a received record was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// An authority-signed record that is not a tombstone, or no authority is configured.
    #[error("authority signature not allowed")]
    Unauthorized,
    /// Version 0.
    #[error("version 0")]
    VersionZero,
    /// Version above [`MAX_VERSION`].
    #[error("version too far ahead")]
    VersionTooFar,
    /// Same (origin, version) as a known record with different content.
    #[error("equivocation")]
    Equivocation,
    /// Pod CIDRs overlap another live node's.
    #[error("pod CIDR overlap")]
    CidrOverlap,
    /// Name used by another live identity.
    #[error("name collision")]
    NameCollision,
    /// Short id (first 8 key bytes) used by another identity.
    #[error("short id collision")]
    ShortIdCollision,
    /// Larger than [`MAX_RECORD`].
    #[error("record too large")]
    TooLarge,
}

/// Errors of the replica.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bytes could not be decoded.
    #[error("decode failed")]
    Decode(#[from] DecodeError),
    /// A record was rejected (counted in [`Stats`]).
    #[error("record rejected")]
    Rejected(#[from] Reject),
    /// The own record is invalid (name length, string length, size, overlapping CIDRs).
    #[error("invalid own record: {0}")]
    InvalidOwnRecord(#[source] DecodeError),
    /// The own record encodes larger than [`MAX_RECORD`].
    #[error("own record encodes to {0} bytes (max {MAX_RECORD})")]
    OwnRecordTooLarge(usize),
    /// The secret given to [`Replica::tombstone`] is not [`Config::authority`].
    #[error("not the configured authority key")]
    NotAuthority,
    /// [`Replica::tombstone`] for an origin this replica does not know.
    #[error("unknown origin")]
    UnknownOrigin,
}

/// Counters per message kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PerKind {
    /// Summary messages.
    pub summary: u64,
    /// Digest messages.
    pub digest: u64,
    /// Request messages.
    pub request: u64,
    /// Records messages.
    pub records: u64,
    /// Delta messages.
    pub delta: u64,
}

impl PerKind {
    fn add(&mut self, k: Kind, n: u64) {
        let slot = match k {
            Kind::Summary => &mut self.summary,
            Kind::Digest => &mut self.digest,
            Kind::Request => &mut self.request,
            Kind::Records => &mut self.records,
            Kind::Delta => &mut self.delta,
        };
        *slot += n;
    }

    /// Sum over kinds.
    pub fn total(&self) -> u64 {
        self.summary + self.digest + self.request + self.records + self.delta
    }
}

/// Rejections by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Rejects {
    /// [`Reject::BadSignature`].
    pub bad_signature: u64,
    /// [`Reject::Unauthorized`].
    pub unauthorized: u64,
    /// [`Reject::VersionZero`].
    pub version_zero: u64,
    /// [`Reject::VersionTooFar`].
    pub version_too_far: u64,
    /// [`Reject::Equivocation`].
    pub equivocation: u64,
    /// [`Reject::CidrOverlap`].
    pub cidr_overlap: u64,
    /// [`Reject::NameCollision`].
    pub name_collision: u64,
    /// [`Reject::ShortIdCollision`].
    pub short_id_collision: u64,
    /// [`Reject::TooLarge`].
    pub too_large: u64,
}

impl Rejects {
    fn count(&mut self, r: Reject) {
        let slot = match r {
            Reject::BadSignature => &mut self.bad_signature,
            Reject::Unauthorized => &mut self.unauthorized,
            Reject::VersionZero => &mut self.version_zero,
            Reject::VersionTooFar => &mut self.version_too_far,
            Reject::Equivocation => &mut self.equivocation,
            Reject::CidrOverlap => &mut self.cidr_overlap,
            Reject::NameCollision => &mut self.name_collision,
            Reject::ShortIdCollision => &mut self.short_id_collision,
            Reject::TooLarge => &mut self.too_large,
        };
        *slot += 1;
    }
}

/// Replica-wide counters (the shell exports them as `sync_*` metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Records accepted (new origin or newer version).
    pub accepted: u64,
    /// Records ignored because an equal or newer one is known.
    pub stale: u64,
    /// Records rejected, by reason.
    pub rejected: Rejects,
    /// Messages or records that failed to decode.
    pub malformed: u64,
    /// Deltas applied to the base version held here (the rebuilt record was then accepted,
    /// stale or rejected like a full one).
    pub deltas_applied: u64,
    /// Deltas ignored because the base version is not held here (the full record is requested
    /// from the sender).
    pub deltas_no_base: u64,
    /// Messages sent per kind.
    pub tx_messages: PerKind,
    /// Bytes sent per kind.
    pub tx_bytes: PerKind,
    /// Messages received per kind.
    pub rx_messages: PerKind,
    /// Bytes received per kind.
    pub rx_bytes: PerKind,
    /// Digest datagrams not sent because the peer's budget was exhausted.
    pub budget_skipped: u64,
}

/// One origin in [`SyncStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OriginStatus {
    /// Node name.
    pub name: String,
    /// Latest version known.
    pub version: u64,
    /// Tombstone.
    pub deleted: bool,
}

/// One peer in [`SyncStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerSyncStatus<P> {
    /// The peer.
    pub peer: P,
    /// Its link.
    pub link: Option<LinkInfo>,
    /// Milliseconds since the last exchange that found both sides equal.
    pub last_sync_ms_ago: Option<u64>,
    /// Milliseconds since anything was received from it.
    pub last_heard_ms_ago: Option<u64>,
    /// Records queued for it (waiting for budget).
    pub queued: usize,
}

/// A snapshot for `mistnetctl status` and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SyncStatus<P> {
    /// Live records, own included.
    pub records: usize,
    /// Tombstones kept.
    pub tombstones: usize,
    /// Size of the last [`Replica::export_state`] (encoded and compressed; the shell exports
    /// to persist, at most once a second after changes).
    pub state_bytes: usize,
    /// Hash of the (origin, version) set, hex (equal on converged replicas).
    pub state_hash: String,
    /// Per origin, in identity order.
    pub origins: Vec<OriginStatus>,
    /// Per peer.
    pub peers: Vec<PeerSyncStatus<P>>,
    /// Counters.
    pub stats: Stats,
}

/// Remembers signatures that verified and identities derived from WireGuard keys, so many
/// replicas in one process (simulations, benchmarks) do each of these once. Only successes are
/// cached, keyed by SHA-256 of key and signed bytes, so a hit proves the same bytes verified
/// before.
#[derive(Debug, Default)]
pub struct VerifyCache {
    seen: Mutex<HashSet<[u8; 32]>>,
    identities: Mutex<HashMap<[u8; 32], [u8; 32]>>,
}

impl VerifyCache {
    fn key(key: &[u8; 32], signed: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(key);
        h.update(signed);
        h.finalize().into()
    }
}

/// The replicated store and gossip state machine. `P` is the caller's peer id.
#[derive(Debug)]
pub struct Replica<P> {
    config: Config,
    signing: KeyPair,
    own_id: [u8; 32],
    /// Own record content with the current version.
    own: NodeRecord,
    /// An earlier incarnation's own record that a peer echoed: the version peers hold, so the
    /// next own version is sent as a delta from it.
    own_base: Option<Arc<NodeRecord>>,
    entries: BTreeMap<[u8; 32], Entry>,
    by_short: BTreeMap<u64, [u8; 32]>,
    names: BTreeMap<String, [u8; 32]>,
    /// Disjoint pod CIDR intervals of live records: (family, start) → (end, identity).
    cidrs: BTreeMap<(u8, u128), (u128, [u8; 32])>,
    /// Expired tombstones, by short id: (origin, version at or below which it is refused).
    floors: BTreeMap<u64, ([u8; 32], u64)>,
    peers: BTreeMap<P, Peer>,
    /// Peers with queued records.
    dirty: BTreeSet<P>,
    budget_wake: Option<Instant>,
    pending: BTreeMap<u64, Pending<P>>,
    next_retry: Option<Instant>,
    rng: Rng,
    next_round: Instant,
    interval: Duration,
    changed: bool,
    hash: Option<[u8; 16]>,
    seq: u64,
    transmits: VecDeque<Transmit<P>>,
    events: VecDeque<Event>,
    stats: Stats,
    verify_cache: Option<Arc<VerifyCache>>,
    /// Size of the last export: status reports it rather than compressing the whole state on
    /// every call.
    exported_len: Cell<Option<usize>>,
}

#[derive(Debug, Clone)]
struct Entry {
    rec: Arc<NodeRecord>,
    signed: Arc<[u8]>,
    signer: Signer,
    /// The origin-signed record this one replaced: the base of deltas sent to peers that
    /// hold it.
    prev: Option<Arc<NodeRecord>>,
    short: u64,
    /// Acceptance order (higher is more recent): send priority.
    seq: u64,
    expires: Option<Instant>,
}

impl Entry {
    fn key(&self) -> u64 {
        version_key(self.rec.version, self.rec.deleted)
    }

    /// The version a delta of this record starts from: the one it replaced, if both are
    /// signed by the origin.
    fn delta_from(&self) -> Option<u64> {
        self.prev
            .as_ref()
            .filter(|_| self.signer == Signer::Origin)
            .map(|p| p.version)
    }

    /// [`Entry::delta_from`], if `their_key` (a peer's `version_key`) is that version.
    fn delta_base(&self, their_key: u64) -> Option<u64> {
        let prev = self.prev.as_ref()?;
        self.delta_from()
            .filter(|_| version_key(prev.version, prev.deleted) == their_key)
    }
}

#[derive(Debug)]
struct Peer {
    link: Option<LinkInfo>,
    tokens: f64,
    /// Last refill (`None` until first used: the bucket starts full).
    refilled: Option<Instant>,
    /// Records to send, each with the version the peer is believed to hold (`Some`: a delta
    /// from it will do; `None`: the full record).
    queue: BTreeMap<[u8; 32], Option<u64>>,
    last_sync: Option<Instant>,
    last_heard: Option<Instant>,
}

#[derive(Debug)]
struct Pending<P> {
    peer: P,
    want: u64,
    deadline: Instant,
    retries: u32,
}

/// Outcome of offering one signed record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Offer {
    Accepted,
    Stale,
}

/// An offered record that decoded and verified: what happened and which one it was.
#[derive(Debug, Clone, Copy)]
struct Offered {
    offer: Offer,
    id: [u8; 32],
    /// `version_key` of the offered record.
    key: u64,
}

impl<P> Replica<P>
where
    P: Ord + Clone + std::fmt::Debug,
{
    /// Creates a replica publishing `own`. `wg_secret` is the node's WireGuard (X25519)
    /// private key, its one secret: `own.wg_key` and `own.identity` are set from it, and it
    /// signs the records (XEdDSA). The version starts at 1; a persisted state imported next
    /// raises it.
    pub fn new(
        config: Config,
        wg_secret: [u8; 32],
        mut own: NodeRecord,
        seed: [u8; 32],
        now: Instant,
    ) -> Result<Self, Error> {
        let signing = KeyPair::from_x25519_secret(wg_secret);
        let own_id = signing.identity();
        own.wg_key = signing.wg_public();
        own.identity = own_id;
        own.version = 0;
        own.deleted = false;
        let mut r = Replica {
            config,
            signing,
            own_id,
            own: own.clone(),
            own_base: None,
            entries: BTreeMap::new(),
            by_short: BTreeMap::new(),
            names: BTreeMap::new(),
            cidrs: BTreeMap::new(),
            floors: BTreeMap::new(),
            peers: BTreeMap::new(),
            dirty: BTreeSet::new(),
            budget_wake: None,
            pending: BTreeMap::new(),
            next_retry: None,
            rng: Rng::new(seed),
            next_round: now,
            interval: config.round_interval,
            changed: true,
            hash: None,
            seq: 0,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
            verify_cache: None,
            exported_len: Cell::new(None),
        };
        r.publish_own(own, now)?;
        Ok(r)
    }

    /// Shares a [`VerifyCache`] with other replicas in the same process.
    pub fn set_verify_cache(&mut self, cache: Arc<VerifyCache>) {
        self.verify_cache = Some(cache);
    }

    /// This node's identity (the ed25519 form of its WireGuard public key).
    pub fn identity(&self) -> [u8; 32] {
        self.own_id
    }

    /// The own record as last published.
    pub fn own(&self) -> &NodeRecord {
        &self.own
    }

    /// Changes the own record: bumps the version, signs and pushes it first. `wg_key`,
    /// `identity`, `version` and `deleted` set by `f` are ignored. On error nothing changes.
    pub fn update_own(
        &mut self,
        f: impl FnOnce(&mut NodeRecord),
        now: Instant,
    ) -> Result<(), Error> {
        let mut rec = self.own.clone();
        f(&mut rec);
        rec.deleted = false;
        self.publish_own(rec, now)
    }

    /// Publishes a tombstone for the own node (graceful leave), signed by the own key.
    pub fn leave(&mut self, now: Instant) -> Result<(), Error> {
        let mut rec = self.own.clone();
        rec.deleted = true;
        self.publish_own(rec, now)
    }

    /// Deletes another node with a tombstone signed by the cluster authority. The tombstone
    /// carries the latest version this replica knows, so it supersedes every record up to it.
    pub fn tombstone(
        &mut self,
        authority_secret: [u8; 32],
        identity: [u8; 32],
        now: Instant,
    ) -> Result<(), Error> {
        let key = SigningKey::from_bytes(&authority_secret);
        if self.config.authority != Some(key.verifying_key().to_bytes()) {
            return Err(Error::NotAuthority);
        }
        let Some(e) = self.entries.get(&identity) else {
            return Err(Error::UnknownOrigin);
        };
        let rec = NodeRecord {
            name: e.rec.name.clone(),
            // The key names the origin: its identity is derived from it.
            wg_key: e.rec.wg_key,
            identity,
            endpoints: Vec::new(),
            pod_cidrs: Vec::new(),
            tunnel_addrs: Vec::new(),
            zone: String::new(),
            version: e.rec.version,
            deleted: true,
        };
        let signed = sign(&rec, Signer::Authority, |m| key.sign(m).to_bytes());
        self.offer(&signed, now)?;
        debug!(origin = %hex_short(&identity), "authority tombstone");
        self.push_to_some(identity, self.config.push_fanout, None);
        self.flush(now);
        Ok(())
    }

    /// Adds or updates a peer this replica may talk to.
    pub fn add_peer(&mut self, peer: P, link: LinkInfo) {
        let capacity = bucket_capacity(&link);
        let p = self.peers.entry(peer).or_insert_with(|| Peer {
            link: None,
            tokens: 0.0,
            refilled: None,
            queue: BTreeMap::new(),
            last_sync: None,
            last_heard: None,
        });
        if p.link.is_none() {
            p.tokens = capacity;
        }
        p.link = Some(link);
        p.tokens = p.tokens.min(capacity);
    }

    /// Forgets a peer and what was queued or requested for it.
    pub fn remove_peer(&mut self, peer: &P) {
        self.peers.remove(peer);
        self.dirty.remove(peer);
        self.pending.retain(|_, p| &p.peer != peer);
    }

    /// Handles one datagram from a peer. Malformed messages and rejected records are counted;
    /// the first rejection is returned after the whole message was processed.
    pub fn handle_message(&mut self, from: P, bytes: &[u8], now: Instant) -> Result<(), Error> {
        let msg = match Message::decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                self.stats.malformed += 1;
                trace!(peer = ?from, error = %e, "malformed message");
                return Err(e.into());
            }
        };
        let kind = msg.kind();
        self.stats.rx_messages.add(kind, 1);
        self.stats.rx_bytes.add(kind, bytes.len() as u64);
        trace!(peer = ?from, kind = kind.as_str(), len = bytes.len(), "rx");
        let peer = self.peer_mut(&from, now);
        peer.last_heard = Some(now);
        let result = match msg {
            Message::Summary { hash, reply, .. } => {
                self.on_summary(&from, hash, reply, now);
                Ok(())
            }
            Message::Digest { lo, hi, entries } => {
                self.on_digest(&from, lo, hi, &entries, now);
                Ok(())
            }
            Message::Request(wants) => {
                for (s, have) in wants {
                    if let Some(e) = self.by_short.get(&s).and_then(|id| self.entries.get(id)) {
                        let (id, base) = (e.rec.identity, e.delta_base(have));
                        self.enqueue(&from, id, base);
                    }
                }
                Ok(())
            }
            Message::Records(recs) => self.on_records(&from, &recs, now),
            Message::Delta(deltas) => self.on_deltas(&from, &deltas, now),
        };
        self.flush(now);
        result
    }

    /// Runs due timers: the anti-entropy round, request retries, budget refills, tombstone
    /// expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.next_round {
            self.round(now);
        }
        if self.next_retry.is_some_and(|t| now >= t) {
            self.retry_requests(now);
        }
        if self.budget_wake.is_some_and(|t| now >= t) {
            self.flush(now);
        }
    }

    /// When [`Replica::handle_timeout`] wants to run next, and why.
    pub fn poll_timeout(&self) -> Option<(Instant, &'static str)> {
        let mut best = (self.next_round, "anti-entropy round");
        for (t, why) in [
            (self.next_retry, "request retry"),
            (self.budget_wake, "bandwidth budget"),
        ] {
            if let Some(t) = t
                && t < best.0
            {
                best = (t, why);
            }
        }
        Some(best)
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit<P>> {
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Live records, own included, in identity order.
    pub fn records(&self) -> impl Iterator<Item = &NodeRecord> {
        self.entries
            .values()
            .filter(|e| !e.rec.deleted)
            .map(|e| &*e.rec)
    }

    /// (origin, version, deleted) of every record and tombstone kept, in identity order.
    pub fn versions(&self) -> impl Iterator<Item = ([u8; 32], u64, bool)> + '_ {
        self.entries
            .iter()
            .map(|(id, e)| (*id, e.rec.version, e.rec.deleted))
    }

    /// Hash of the (origin, version, deleted) set: equal on converged replicas.
    pub fn state_hash(&self) -> [u8; 16] {
        self.hash.unwrap_or_else(|| self.compute_hash())
    }

    /// Every signed record and tombstone, encoded for persistence (the shell writes it
    /// atomically).
    pub fn export_state(&self) -> Vec<u8> {
        let state = codec::encode_state(
            self.entries
                .values()
                .map(|e| &*e.signed)
                .collect::<Vec<_>>()
                .into_iter(),
        );
        self.exported_len.set(Some(state.len()));
        state
    }

    /// Restores persisted state, re-verifying every record; returns how many were accepted.
    /// The own version continues above the persisted one. Tombstone lifetimes restart at `now`.
    pub fn import_state(&mut self, bytes: &[u8], now: Instant) -> Result<usize, Error> {
        let recs = codec::decode_state(bytes)?;
        let mut n = 0;
        for r in &recs {
            match self.offer(r, now) {
                Ok(Offered {
                    offer: Offer::Accepted,
                    ..
                }) => n += 1,
                Ok(Offered {
                    offer: Offer::Stale,
                    ..
                }) => {}
                Err(e) => debug!(error = %e, "persisted record refused"),
            }
        }
        debug!(records = recs.len(), accepted = n, "state imported");
        Ok(n)
    }

    /// A status snapshot.
    pub fn status(&self, now: Instant) -> SyncStatus<P> {
        let ago =
            |t: Option<Instant>| t.map(|t| now.saturating_duration_since(t).as_millis() as u64);
        SyncStatus {
            records: self.records().count(),
            tombstones: self.entries.values().filter(|e| e.rec.deleted).count(),
            state_bytes: self
                .exported_len
                .get()
                .unwrap_or_else(|| self.export_state().len()),
            state_hash: self
                .state_hash()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            origins: self
                .entries
                .values()
                .map(|e| OriginStatus {
                    name: e.rec.name.clone(),
                    version: e.rec.version,
                    deleted: e.rec.deleted,
                })
                .collect(),
            peers: self
                .peers
                .iter()
                .map(|(id, p)| PeerSyncStatus {
                    peer: id.clone(),
                    link: p.link,
                    last_sync_ms_ago: ago(p.last_sync),
                    last_heard_ms_ago: ago(p.last_heard),
                    queued: p.queue.len(),
                })
                .collect(),
            stats: self.stats,
        }
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }
}

impl<P> Replica<P>
where
    P: Ord + Clone + std::fmt::Debug,
{
    /// Signs `rec` at the next own version, installs it and pushes it first.
    fn publish_own(&mut self, mut rec: NodeRecord, now: Instant) -> Result<(), Error> {
        rec.identity = self.own_id;
        rec.wg_key = self.signing.wg_public();
        rec.version = self.own.version + 1;
        let signed = sign(&rec, Signer::Origin, |m| self.signing.sign(m));
        if signed.len() > MAX_RECORD {
            return Err(Error::OwnRecordTooLarge(signed.len()));
        }
        codec::decode_signed(&signed).map_err(Error::InvalidOwnRecord)?;
        if !rec.deleted && cidrs_self_overlap(&rec) {
            return Err(Error::Rejected(Reject::CidrOverlap));
        }
        // The own record wins locally: evict remote records it conflicts with.
        if !rec.deleted {
            let mut evict = BTreeSet::new();
            if let Some(other) = self.names.get(&rec.name)
                && *other != self.own_id
            {
                evict.insert(*other);
            }
            for net in &rec.pod_cidrs {
                evict.extend(
                    self.cidr_owners(net)
                        .into_iter()
                        .filter(|o| *o != self.own_id),
                );
            }
            for id in evict {
                self.evict(&id);
            }
        }
        self.own = rec.clone();
        let rec = Arc::new(rec);
        self.insert(rec, signed.into(), Signer::Origin, now);
        debug!(
            version = self.own.version,
            deleted = self.own.deleted,
            "own record published"
        );
        // The partners were sent the previous version: a delta from it reaches most of them.
        self.push_to_some(self.own_id, self.config.push_fanout, None);
        self.flush(now);
        Ok(())
    }

    fn evict(&mut self, id: &[u8; 32]) {
        self.remove_indexes(id);
        if let Some(e) = self.entries.remove(id) {
            self.by_short.remove(&e.short);
            self.hash = None;
            self.stats.rejected.count(Reject::CidrOverlap);
            debug!(origin = %hex_short(id), "remote record evicted by own record");
            self.events.push_back(Event::RecordRemoved {
                identity: *id,
                name: e.rec.name.clone(),
            });
        }
    }

    /// Offers one signed record from a peer, a rebuilt delta or persisted state.
    fn offer(&mut self, bytes: &[u8], now: Instant) -> Result<Offered, Error> {
        match self.try_offer(bytes, now) {
            Ok(o) => {
                match o.offer {
                    Offer::Accepted => self.stats.accepted += 1,
                    Offer::Stale => self.stats.stale += 1,
                }
                Ok(o)
            }
            Err(Error::Rejected(r)) => {
                self.stats.rejected.count(r);
                debug!(reason = %r, "record rejected");
                Err(Error::Rejected(r))
            }
            Err(e) => {
                self.stats.malformed += 1;
                Err(e)
            }
        }
    }

    fn try_offer(&mut self, bytes: &[u8], now: Instant) -> Result<Offered, Error> {
        if bytes.len() > MAX_RECORD {
            return Err(Reject::TooLarge.into());
        }
        let (rec, signer, body, sig) = codec::decode_signed_with(bytes, |wg| self.identity_of(wg))?;
        if rec.version == 0 {
            return Err(Reject::VersionZero.into());
        }
        if rec.version > MAX_VERSION {
            return Err(Reject::VersionTooFar.into());
        }
        let id = rec.identity;
        let short = short_id(&id);
        let key = version_key(rec.version, rec.deleted);
        let stale = Offered {
            offer: Offer::Stale,
            id,
            key,
        };
        if self.below_floor(short, &id, rec.version) {
            return Ok(stale);
        }
        if let Some(e) = self.entries.get(&id) {
            let cur = e.key();
            if &*e.signed == bytes || key < cur || (key == cur && rec.deleted) {
                return Ok(stale);
            }
        }
        let signer_key = match signer {
            Signer::Origin => id,
            Signer::Authority => match self.config.authority {
                Some(a) if rec.deleted => a,
                Some(_) | None => return Err(Reject::Unauthorized.into()),
            },
        };
        self.verify(&signer_key, body, &sig)?;
        if id == self.own_id {
            let offer = self.offer_own(rec, signer, bytes, now)?;
            return Ok(Offered { offer, id, key });
        }
        if self.entries.get(&id).is_some_and(|e| e.key() == key) {
            return Err(Reject::Equivocation.into());
        }
        if self.by_short.get(&short).is_some_and(|other| *other != id) {
            return Err(Reject::ShortIdCollision.into());
        }
        if !rec.deleted {
            if self.names.get(&rec.name).is_some_and(|other| *other != id) {
                return Err(Reject::NameCollision.into());
            }
            if cidrs_self_overlap(&rec)
                || rec
                    .pod_cidrs
                    .iter()
                    .any(|n| self.cidr_owners(n).iter().any(|o| *o != id))
            {
                return Err(Reject::CidrOverlap.into());
            }
        }
        let was_live = self
            .entries
            .get(&id)
            .filter(|e| !e.rec.deleted)
            .map(|e| e.rec.name.clone());
        let rec = Arc::new(rec);
        self.insert(rec.clone(), bytes.into(), signer, now);
        debug!(origin = %hex_short(&id), version = rec.version, deleted = rec.deleted, "record accepted");
        if rec.deleted {
            if let Some(name) = was_live {
                self.events
                    .push_back(Event::RecordRemoved { identity: id, name });
            }
        } else {
            self.events.push_back(Event::RecordUpserted(rec));
        }
        Ok(Offered {
            offer: Offer::Accepted,
            id,
            key,
        })
    }

    /// A copy of the own record came back: an authority tombstone deletes this node; an own
    /// record at or above the current version (an earlier incarnation's) makes the version
    /// continue above it.
    fn offer_own(
        &mut self,
        rec: NodeRecord,
        signer: Signer,
        bytes: &[u8],
        now: Instant,
    ) -> Result<Offer, Error> {
        if rec.version < self.own.version {
            return Ok(Offer::Stale);
        }
        match signer {
            Signer::Authority => {
                self.own.version = rec.version;
                let name = rec.name.clone();
                self.insert(Arc::new(rec), bytes.into(), Signer::Authority, now);
                debug!("own record deleted by the authority");
                self.events.push_back(Event::RecordRemoved {
                    identity: self.own_id,
                    name,
                });
                Ok(Offer::Accepted)
            }
            Signer::Origin => {
                debug!(
                    seen = rec.version,
                    "own version continues above an earlier incarnation's"
                );
                self.own.version = rec.version;
                self.own_base = Some(Arc::new(rec));
                let current = self.own.clone();
                self.publish_own(current, now)?;
                Ok(Offer::Stale)
            }
        }
    }

    fn verify(
        &self,
        key: &[u8; 32],
        body: &[u8],
        sig: &[u8; codec::SIG_LEN],
    ) -> Result<(), Reject> {
        let cache_key = self.verify_cache.as_ref().map(|_| {
            let mut signed = Vec::with_capacity(body.len() + sig.len());
            signed.extend_from_slice(body);
            signed.extend_from_slice(sig);
            VerifyCache::key(key, &signed)
        });
        if let (Some(cache), Some(k)) = (&self.verify_cache, &cache_key)
            && cache.seen.lock().is_ok_and(|s| s.contains(k))
        {
            return Ok(());
        }
        let mut msg = Vec::with_capacity(SIG_CONTEXT.len() + body.len());
        msg.extend_from_slice(SIG_CONTEXT);
        msg.extend_from_slice(body);
        if !xeddsa::verify(key, &msg, sig) {
            return Err(Reject::BadSignature);
        }
        if let (Some(cache), Some(k)) = (&self.verify_cache, cache_key)
            && let Ok(mut s) = cache.seen.lock()
        {
            s.insert(k);
        }
        Ok(())
    }

    /// [`xeddsa::identity_of`], through the shared cache if there is one.
    fn identity_of(&self, wg_key: &[u8; 32]) -> Option<[u8; 32]> {
        let Some(cache) = &self.verify_cache else {
            return xeddsa::identity_of(wg_key);
        };
        if let Some(id) = cache
            .identities
            .lock()
            .ok()
            .and_then(|m| m.get(wg_key).copied())
        {
            return Some(id);
        }
        let id = xeddsa::identity_of(wg_key)?;
        if let Ok(mut m) = cache.identities.lock() {
            m.insert(*wg_key, id);
        }
        Some(id)
    }

    fn below_floor(&self, short: u64, id: &[u8; 32], version: u64) -> bool {
        self.floors
            .get(&short)
            .is_some_and(|(fid, v)| fid == id && version <= *v)
    }

    /// Identities of live records whose pod CIDRs overlap `net`.
    fn cidr_owners(&self, net: &IpNet) -> Vec<[u8; 32]> {
        let (fam, s, e) = interval(net);
        let mut out = Vec::new();
        // Stored intervals are disjoint, so scanning down from `e` can stop at the first one
        // ending before `s`.
        for ((f, _), (end, owner)) in self.cidrs.range(..=(fam, e)).rev() {
            if *f != fam || *end < s {
                break;
            }
            out.push(*owner);
        }
        out
    }

    fn remove_indexes(&mut self, id: &[u8; 32]) {
        let Some(e) = self.entries.get(id) else {
            return;
        };
        if e.rec.deleted {
            return;
        }
        if self.names.get(&e.rec.name) == Some(id) {
            self.names.remove(&e.rec.name);
        }
        for net in &e.rec.pod_cidrs {
            let (fam, s, _) = interval(net);
            if self.cidrs.get(&(fam, s)).is_some_and(|(_, o)| o == id) {
                self.cidrs.remove(&(fam, s));
            }
        }
    }

    fn insert(&mut self, rec: Arc<NodeRecord>, signed: Arc<[u8]>, signer: Signer, now: Instant) {
        let id = rec.identity;
        self.remove_indexes(&id);
        let echoed = if id == self.own_id {
            self.own_base.take()
        } else {
            None
        };
        let prev = echoed.or_else(|| {
            self.entries
                .get(&id)
                .filter(|e| e.signer == Signer::Origin)
                .map(|e| e.rec.clone())
        });
        let short = short_id(&id);
        if !rec.deleted {
            self.names.insert(rec.name.clone(), id);
            for net in &rec.pod_cidrs {
                let (fam, s, e) = interval(net);
                self.cidrs.insert((fam, s), (e, id));
            }
        }
        self.by_short.insert(short, id);
        self.seq += 1;
        let entry = Entry {
            expires: rec.deleted.then(|| now + self.config.tombstone_ttl),
            rec,
            signed,
            signer,
            prev,
            short,
            seq: self.seq,
        };
        let key = entry.key();
        self.entries.insert(id, entry);
        if self.pending.get(&short).is_some_and(|p| p.want <= key) {
            self.pending.remove(&short);
        }
        self.hash = None;
        self.mark_changed(now);
    }

    fn mark_changed(&mut self, now: Instant) {
        self.changed = true;
        let soon = now + self.config.round_interval;
        if self.next_round > soon {
            self.next_round = now + self.jitter(self.config.round_interval);
        }
    }

    fn jitter(&mut self, d: Duration) -> Duration {
        d.mul_f64(0.75 + 0.5 * self.rng.unit())
    }

    fn current_hash(&mut self) -> [u8; 16] {
        if let Some(h) = self.hash {
            return h;
        }
        let h = self.compute_hash();
        self.hash = Some(h);
        h
    }

    fn compute_hash(&self) -> [u8; 16] {
        let mut h = Sha256::new();
        for (id, e) in &self.entries {
            h.update(id);
            h.update(e.key().to_be_bytes());
        }
        let full: [u8; 32] = h.finalize().into();
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        out
    }

    fn peer_mut(&mut self, peer: &P, _now: Instant) -> &mut Peer {
        self.peers.entry(peer.clone()).or_insert_with(|| Peer {
            link: None,
            tokens: 0.0,
            refilled: None,
            queue: BTreeMap::new(),
            last_sync: None,
            last_heard: None,
        })
    }

    /// Picks up to `k` distinct added peers, weighted towards cheap links.
    fn choose_peers(&mut self, k: usize, exclude: Option<&P>) -> Vec<P> {
        let mut cands: Vec<(&P, f64)> = self
            .peers
            .iter()
            .filter_map(|(id, p)| p.link.map(|l| (id, l)))
            .filter(|(id, _)| Some(*id) != exclude)
            .map(|(id, l)| (id, 1.0 / (16.0 + f64::from(l.cost))))
            .collect();
        let mut out = Vec::with_capacity(k);
        let mut total: f64 = cands.iter().map(|c| c.1).sum();
        while out.len() < k && !cands.is_empty() {
            let mut x = self.rng.unit() * total;
            let mut idx = cands.len() - 1;
            for (i, (_, w)) in cands.iter().enumerate() {
                if x < *w {
                    idx = i;
                    break;
                }
                x -= w;
            }
            let (p, w) = cands.swap_remove(idx);
            total -= w;
            out.push(p.clone());
        }
        out
    }

    /// Pushes a record that just changed to `k` peers, as a delta from the version it
    /// replaced: the chosen peers most likely hold that one, and those that do not ask for the
    /// full record.
    fn push_to_some(&mut self, id: [u8; 32], k: usize, exclude: Option<&P>) {
        let base = self.entries.get(&id).and_then(Entry::delta_from);
        for p in self.choose_peers(k, exclude) {
            self.enqueue(&p, id, base);
        }
    }

    /// Queues a record for a peer: as a delta from `base` if given, else in full. A full
    /// request wins over a delta, and two different bases make it full.
    fn enqueue(&mut self, peer: &P, id: [u8; 32], base: Option<u64>) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.queue
                .entry(id)
                .and_modify(|b| {
                    if *b != base {
                        *b = None;
                    }
                })
                .or_insert(base);
            self.dirty.insert(peer.clone());
        }
    }

    fn on_summary(&mut self, from: &P, hash: [u8; 16], reply: bool, now: Instant) {
        let mine = self.current_hash();
        if mine == hash {
            if let Some(p) = self.peers.get_mut(from) {
                p.last_sync = Some(now);
            }
            if !reply {
                let count = self.entries.len() as u64;
                self.send_control(
                    from,
                    &Message::Summary {
                        hash: mine,
                        count,
                        reply: true,
                    },
                    now,
                );
            }
        } else if !reply {
            self.mark_changed(now);
            self.send_digest(from, now);
        }
    }

    fn send_digest(&mut self, to: &P, now: Instant) {
        let all: Vec<(u64, u64)> = self
            .by_short
            .iter()
            .filter_map(|(s, id)| self.entries.get(id).map(|e| (*s, e.key())))
            .collect();
        let budget = MAX_DATAGRAM - codec::HEADER_LEN - 16 - 3;
        let mut chunks: Vec<Vec<(u64, u64)>> = vec![Vec::new()];
        let mut size = 0;
        for (s, k) in all {
            let n = 8 + varint_len(k);
            if size + n > budget || chunks.last().is_some_and(|c| c.len() >= DIGEST_CHUNK) {
                chunks.push(Vec::new());
                size = 0;
            }
            size += n;
            if let Some(c) = chunks.last_mut() {
                c.push((s, k));
            }
        }
        let firsts: Vec<Option<u64>> = chunks.iter().map(|c| c.first().map(|e| e.0)).collect();
        for (i, entries) in chunks.into_iter().enumerate() {
            let lo = if i == 0 {
                0
            } else {
                firsts.get(i).copied().flatten().unwrap_or(0)
            };
            let hi = match firsts.get(i + 1).copied().flatten() {
                Some(next) => next.saturating_sub(1),
                None => u64::MAX,
            };
            let payload = Message::Digest { lo, hi, entries }.encode();
            if !self.try_spend(to, payload.len(), now) {
                self.stats.budget_skipped += 1;
                continue;
            }
            self.emit(to, Kind::Digest, payload);
        }
    }

    fn on_digest(&mut self, from: &P, lo: u64, hi: u64, entries: &[(u64, u64)], now: Instant) {
        if lo > hi {
            return;
        }
        let theirs: BTreeMap<u64, u64> = entries
            .iter()
            .filter(|(s, _)| (lo..=hi).contains(s))
            .copied()
            .collect();
        let mut push = Vec::new();
        for (s, id) in self.by_short.range(lo..=hi) {
            let Some(e) = self.entries.get(id) else {
                continue;
            };
            match theirs.get(s) {
                None => push.push((*id, None)),
                Some(k) if *k < e.key() => push.push((*id, e.delta_base(*k))),
                Some(_) => {}
            }
        }
        let mut want = Vec::new();
        for (s, k) in &theirs {
            let ours = self
                .by_short
                .get(s)
                .and_then(|id| self.entries.get(id))
                .map(Entry::key);
            let floor = self
                .floors
                .get(s)
                .is_some_and(|(_, v)| version_key(*v, true) >= *k);
            if ours.is_none_or(|o| o < *k) && !floor {
                let busy = self
                    .pending
                    .get(s)
                    .is_some_and(|p| p.want >= *k && p.deadline > now);
                if !busy {
                    want.push(*s);
                    self.pending.insert(
                        *s,
                        Pending {
                            peer: from.clone(),
                            want: *k,
                            deadline: now + self.config.request_timeout,
                            retries: 0,
                        },
                    );
                }
            }
        }
        if push.is_empty() && want.is_empty() {
            if lo == 0
                && hi == u64::MAX
                && let Some(p) = self.peers.get_mut(from)
            {
                p.last_sync = Some(now);
            }
            return;
        }
        trace!(peer = ?from, push = push.len(), want = want.len(), "digest diff");
        self.mark_changed(now);
        for (id, base) in push {
            self.enqueue(from, id, base);
        }
        self.send_requests(from, want, now);
        self.update_next_retry();
    }

    /// Asks for records by short id, saying which version of each is held here.
    fn send_requests(&mut self, to: &P, shorts: Vec<u64>, now: Instant) {
        let wants: Vec<(u64, u64)> = shorts
            .into_iter()
            .map(|s| {
                let have = self
                    .by_short
                    .get(&s)
                    .and_then(|id| self.entries.get(id))
                    .map_or(0, Entry::key);
                (s, have)
            })
            .collect();
        for chunk in wants.chunks(REQUEST_CHUNK) {
            self.send_control(to, &Message::Request(chunk.to_vec()), now);
        }
    }

    fn on_records(&mut self, from: &P, recs: &[Vec<u8>], now: Instant) -> Result<(), Error> {
        let mut first_err = None;
        for bytes in recs {
            if let Err(e) = self.offer_from(from, bytes, now) {
                first_err.get_or_insert(e);
            }
        }
        self.update_next_retry();
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Offers a record a peer sent (in full or as a delta) and follows up: forwards what is
    /// new (rumor), answers a sender that is behind with the newer copy.
    fn offer_from(&mut self, from: &P, bytes: &[u8], now: Instant) -> Result<(), Error> {
        let o = self.offer(bytes, now)?;
        match o.offer {
            Offer::Accepted => {
                if o.id != self.own_id {
                    self.push_to_some(o.id, self.config.forward_fanout, Some(from));
                }
            }
            Offer::Stale => {
                // The sender has something older: answer with ours.
                if let Some(e) = self.entries.get(&o.id)
                    && e.key() > o.key
                {
                    let base = e.delta_base(o.key);
                    self.enqueue(from, o.id, base);
                }
            }
        }
        Ok(())
    }

    /// Applies deltas to the base versions held here. A delta whose base is missing is
    /// ignored and the full record asked for; a rebuilt record goes through the same checks
    /// as a full one, so a forged delta is rejected (and counted) as a bad signature.
    fn on_deltas(&mut self, from: &P, deltas: &[Delta], now: Instant) -> Result<(), Error> {
        let mut first_err = None;
        let mut want = Vec::new();
        for d in deltas {
            let entry = self
                .by_short
                .get(&d.short)
                .and_then(|id| self.entries.get(id));
            let floored = self
                .floors
                .get(&d.short)
                .is_some_and(|(_, v)| d.version <= *v);
            if floored || entry.is_some_and(|e| e.rec.version >= d.version) {
                self.stats.stale += 1;
                if let Some(e) = entry
                    && e.rec.version > d.version
                {
                    // The sender is behind; it holds at least the delta's version.
                    let (id, base) = (e.rec.identity, e.delta_base(version_key(d.version, false)));
                    self.enqueue(from, id, base);
                }
                continue;
            }
            let base = entry.filter(|e| e.rec.version == d.base && e.signer == Signer::Origin);
            let Some(e) = base else {
                self.stats.deltas_no_base += 1;
                trace!(peer = ?from, short = d.short, base = d.base, "delta without its base");
                let wanted = version_key(d.version, false);
                let busy = self
                    .pending
                    .get(&d.short)
                    .is_some_and(|p| p.want >= wanted && p.deadline > now);
                if !busy {
                    want.push(d.short);
                    self.pending.insert(
                        d.short,
                        Pending {
                            peer: from.clone(),
                            want: wanted,
                            deadline: now + self.config.request_timeout,
                            retries: 0,
                        },
                    );
                }
                continue;
            };
            let Some(rec) = d.apply(&e.rec) else {
                self.stats.malformed += 1;
                trace!(peer = ?from, short = d.short, "delta does not fit its base");
                first_err.get_or_insert(DecodeError::DeltaMismatch.into());
                continue;
            };
            let mut bytes = Vec::with_capacity(e.signed.len() + 16);
            codec::encode_record(&rec, Signer::Origin, &mut bytes);
            bytes.extend_from_slice(&d.signature);
            self.stats.deltas_applied += 1;
            if let Err(e) = self.offer_from(from, &bytes, now) {
                first_err.get_or_insert(e);
            }
        }
        if !want.is_empty() {
            self.mark_changed(now);
            self.send_requests(from, want, now);
        }
        self.update_next_retry();
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn retry_requests(&mut self, now: Instant) {
        let mut by_peer: BTreeMap<P, Vec<u64>> = BTreeMap::new();
        let max = self.config.request_retries;
        let timeout = self.config.request_timeout;
        self.pending.retain(|s, p| {
            if p.deadline > now {
                return true;
            }
            if p.retries >= max {
                return false;
            }
            p.retries += 1;
            p.deadline = now + timeout;
            by_peer.entry(p.peer.clone()).or_default().push(*s);
            true
        });
        for (peer, shorts) in by_peer {
            trace!(peer = ?peer, n = shorts.len(), "request retry");
            self.send_requests(&peer, shorts, now);
        }
        self.update_next_retry();
    }

    fn update_next_retry(&mut self) {
        self.next_retry = self.pending.values().map(|p| p.deadline).min();
    }

    fn round(&mut self, now: Instant) {
        self.expire_tombstones(now);
        self.interval = if self.changed {
            self.config.round_interval
        } else {
            (self.interval * 2).min(self.config.max_round_interval)
        };
        self.changed = false;
        let hash = self.current_hash();
        let count = self.entries.len() as u64;
        for p in self.choose_peers(self.config.fanout, None) {
            self.send_control(
                &p,
                &Message::Summary {
                    hash,
                    count,
                    reply: false,
                },
                now,
            );
        }
        self.next_round = now + self.jitter(self.interval);
        self.flush(now);
    }

    fn expire_tombstones(&mut self, now: Instant) {
        let expired: Vec<[u8; 32]> = self
            .entries
            .iter()
            .filter(|(id, e)| **id != self.own_id && e.expires.is_some_and(|t| t <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(e) = self.entries.remove(&id) {
                self.by_short.remove(&e.short);
                self.floors.insert(e.short, (id, e.rec.version));
                self.hash = None;
                debug!(origin = %hex_short(&id), "tombstone expired");
            }
        }
    }

    /// Sends a small control message; it is charged to the budget but never held back.
    fn send_control(&mut self, to: &P, msg: &Message, now: Instant) {
        let payload = msg.encode();
        self.refill(to, now);
        if let Some(p) = self.peers.get_mut(to) {
            p.tokens -= payload.len() as f64;
        }
        self.emit(to, msg.kind(), payload);
    }

    fn emit(&mut self, to: &P, kind: Kind, payload: Vec<u8>) {
        self.stats.tx_messages.add(kind, 1);
        self.stats.tx_bytes.add(kind, payload.len() as u64);
        trace!(peer = ?to, kind = kind.as_str(), len = payload.len(), "tx");
        self.transmits.push_back(Transmit {
            to: to.clone(),
            payload,
        });
    }

    fn refill(&mut self, peer: &P, now: Instant) {
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        let Some(link) = p.link else {
            return;
        };
        let Some(rate) = link.budget_bytes_per_sec else {
            return;
        };
        let cap = bucket_capacity(&link);
        match p.refilled {
            None => p.tokens = cap,
            Some(t) => {
                let dt = now.saturating_duration_since(t).as_secs_f64();
                p.tokens = (p.tokens + dt * f64::from(rate)).min(cap);
            }
        }
        p.refilled = Some(now);
    }

    /// Spends `n` budget bytes if available.
    fn try_spend(&mut self, peer: &P, n: usize, now: Instant) -> bool {
        self.refill(peer, now);
        let Some(p) = self.peers.get_mut(peer) else {
            return true;
        };
        if p.link.and_then(|l| l.budget_bytes_per_sec).is_none() {
            return true;
        }
        if p.tokens >= n as f64 {
            p.tokens -= n as f64;
            return true;
        }
        false
    }

    /// When the peer's bucket will hold `n` bytes.
    fn budget_ready_at(&self, peer: &P, n: usize, now: Instant) -> Instant {
        let Some(p) = self.peers.get(peer) else {
            return now;
        };
        let rate = p
            .link
            .and_then(|l| l.budget_bytes_per_sec)
            .unwrap_or(u32::MAX)
            .max(1);
        let missing = (n as f64 - p.tokens).max(0.0);
        now + Duration::from_secs_f64(missing / f64::from(rate)) + Duration::from_millis(1)
    }

    /// Sends queued records to every dirty peer within its budget.
    fn flush(&mut self, now: Instant) {
        let dirty: Vec<P> = self.dirty.iter().cloned().collect();
        let mut wake: Option<Instant> = None;
        for peer in dirty {
            if let Some(t) = self.flush_peer(&peer, now) {
                wake = Some(wake.map_or(t, |w| w.min(t)));
            } else {
                self.dirty.remove(&peer);
            }
        }
        self.budget_wake = wake;
    }

    /// Sends what fits; returns when to try again if records are left.
    fn flush_peer(&mut self, peer: &P, now: Instant) -> Option<Instant> {
        let queue: Vec<([u8; 32], Option<u64>)> = self
            .peers
            .get(peer)?
            .queue
            .iter()
            .map(|(id, base)| (*id, *base))
            .collect();
        let mut order: Vec<(bool, u64, [u8; 32], Option<u64>)> = queue
            .iter()
            .filter_map(|(id, base)| {
                self.entries
                    .get(id)
                    .map(|e| (*id == self.own_id, e.seq, *id, *base))
            })
            .collect();
        // Own record first, then the most recently learned.
        order.sort_by(|a, b| b.cmp(a));
        if let Some(p) = self.peers.get_mut(peer) {
            p.queue.retain(|id, _| self.entries.contains_key(id));
        }
        // Runs of one kind in send order, each cut at RAW_TARGET bytes (a delta counted at its
        // record's size: it is never larger, and encode_fit splits what does not fit).
        let mut batches: Vec<Batch> = Vec::new();
        let mut raw = 0;
        for (_, _, id, base) in order {
            let Some(e) = self.entries.get(&id) else {
                continue;
            };
            let n = e.signed.len() + 2;
            let delta = base.and_then(|b| delta_of(e, b));
            let fits = raw + n <= RAW_TARGET;
            match (batches.last_mut(), delta) {
                (Some(Batch::Deltas(v)), Some(d)) if fits => v.push((id, d)),
                (Some(Batch::Records(v)), None) if fits => v.push((id, e.signed.clone())),
                (Some(_) | None, Some(d)) => {
                    raw = 0;
                    batches.push(Batch::Deltas(vec![(id, d)]));
                }
                (Some(_) | None, None) => {
                    raw = 0;
                    batches.push(Batch::Records(vec![(id, e.signed.clone())]));
                }
            }
            raw += n;
        }
        for b in batches {
            let encoded = match b {
                Batch::Records(v) => encode_fit(v, &|recs: Vec<Arc<[u8]>>| {
                    Message::Records(recs.iter().map(|r| r.to_vec()).collect())
                }),
                Batch::Deltas(v) => encode_fit(v, &Message::Delta),
            };
            for (ids, kind, payload) in encoded {
                if !self.try_spend(peer, payload.len(), now) {
                    return Some(self.budget_ready_at(peer, payload.len(), now));
                }
                if let Some(p) = self.peers.get_mut(peer) {
                    for id in &ids {
                        p.queue.remove(id);
                    }
                }
                self.emit(peer, kind, payload);
            }
        }
        None
    }
}

/// Records bound for one datagram (or a few, if they do not fit one).
enum Batch {
    Records(Vec<([u8; 32], Arc<[u8]>)>),
    Deltas(Vec<([u8; 32], Delta)>),
}

/// Encodes items into datagrams of at most [`MAX_DATAGRAM`] bytes, splitting as needed.
fn encode_fit<T: Clone>(
    items: Vec<([u8; 32], T)>,
    msg: &impl Fn(Vec<T>) -> Message,
) -> Vec<(Vec<[u8; 32]>, Kind, Vec<u8>)> {
    let m = msg(items.iter().map(|(_, t)| t.clone()).collect());
    let payload = m.encode();
    if payload.len() <= MAX_DATAGRAM || items.len() <= 1 {
        return vec![(
            items.into_iter().map(|(id, _)| id).collect(),
            m.kind(),
            payload,
        )];
    }
    let mut left = items;
    let right = left.split_off(left.len() / 2);
    let mut out = encode_fit(left, msg);
    out.extend(encode_fit(right, msg));
    out
}

/// The delta from `base` to the entry's record, if the entry replaced that version and both
/// are signed by the origin.
fn delta_of(e: &Entry, base: u64) -> Option<Delta> {
    let prev = e.prev.as_ref()?;
    if e.signer != Signer::Origin || prev.version != base {
        return None;
    }
    let split = e.signed.len().checked_sub(codec::SIG_LEN)?;
    let sig: [u8; codec::SIG_LEN] = e.signed.get(split..)?.try_into().ok()?;
    Some(Delta::between(e.short, prev, &e.rec, sig))
}

/// `version << 1 | deleted`: the order in which records of one origin supersede each other.
fn version_key(version: u64, deleted: bool) -> u64 {
    (version << 1) | u64::from(deleted)
}

/// The first 8 bytes of an identity key.
fn short_id(id: &[u8; 32]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&id[..8]);
    u64::from_be_bytes(b)
}

fn hex_short(id: &[u8; 32]) -> String {
    format!("{:016x}", short_id(id))
}

fn varint_len(v: u64) -> usize {
    (64 - v.leading_zeros() as usize).max(1).div_ceil(7)
}

fn bucket_capacity(link: &LinkInfo) -> f64 {
    match link.budget_bytes_per_sec {
        Some(rate) => (f64::from(rate) * 2.0).max(2.0 * MAX_DATAGRAM as f64),
        None => f64::INFINITY,
    }
}

/// Address family and first/last address of a prefix, as integers.
fn interval(net: &IpNet) -> (u8, u128, u128) {
    match net {
        IpNet::V4(n) => (
            4,
            u128::from(u32::from(n.network())),
            u128::from(u32::from(n.broadcast())),
        ),
        IpNet::V6(n) => (6, u128::from(n.network()), u128::from(n.broadcast())),
    }
}

fn cidrs_self_overlap(rec: &NodeRecord) -> bool {
    let ivs: Vec<_> = rec.pod_cidrs.iter().map(interval).collect();
    ivs.iter().enumerate().any(|(i, a)| {
        ivs.iter()
            .skip(i + 1)
            .any(|b| a.0 == b.0 && a.1 <= b.2 && b.1 <= a.2)
    })
}

/// `body || signature` over the canonical body; `sign` signs `SIG_CONTEXT || body` (XEdDSA
/// with the node key for [`Signer::Origin`], ed25519 with the authority key otherwise).
fn sign(rec: &NodeRecord, signer: Signer, sign: impl FnOnce(&[u8]) -> [u8; 64]) -> Vec<u8> {
    let mut body = Vec::with_capacity(256);
    codec::encode_record(rec, signer, &mut body);
    let mut msg = Vec::with_capacity(SIG_CONTEXT.len() + body.len());
    msg.extend_from_slice(SIG_CONTEXT);
    msg.extend_from_slice(&body);
    body.extend_from_slice(&sign(&msg));
    body
}

#[cfg(test)]
mod tests;
