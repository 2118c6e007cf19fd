//! Sans-IO adaptive path selection for mistnetd (pure: no sockets, no clock, no threads).
//!
//! A [`Selector`] keeps, per peer, a set of candidate paths ([`PathId`]: a local underlay
//! and either a remote socket address or a relay node), probes them with small authenticated
//! messages ([`wire`]), measures each one (smoothed RTT and variance, jitter, round-trip loss
//! over a sliding window, inbound loss from the peer's own pings, liveness) and decides which
//! path carries the peer's traffic: [`Selector::send_paths`] names the active path and, in
//! redundant mode, a secondary one on which the shell duplicates every datagram (WireGuard's
//! replay window drops the copy). The shell feeds it probe datagrams, passive data-plane
//! signals and timer ticks, and carries out what it returns (probes to send, events).
//!
//! Model and invariants:
//! - **States.** A path is `Unknown` until probed, `Probing` until its first reply, then `Up`;
//!   an overdue reply (`srtt + max(4·rttvar, doubt interval)` after the first unanswered probe)
//!   puts it in `Doubt`, where it is probed every [`Config::doubt_probe_interval`]; it is `Down`
//!   once [`Config::miss_limit`] probes in a row went unanswered AND the first of them is older
//!   than `max(silence_timeout, rto + 2·doubt interval)`. Any authenticated signal on the path
//!   (pong, the peer's ping, WireGuard data) resets the silence clock; only a pong or data
//!   brings a path up (a ping proves just the inbound direction).
//! - **Fast failover.** When the active path goes `Down`, the best live path takes over in the
//!   same call, reason [`Reason::ActivePathSilent`]. With defaults and traffic flowing (active
//!   probed every 50 ms) a dead path is left within `silence_timeout + active interval`
//!   (≈ 250 ms) of its death, plus one RTT.
//! - **Hysteresis.** Otherwise the active path changes only to a candidate that [`better`]
//!   (score lower by a margin) without interruption for [`Config::switch_hold`]; a challenger is
//!   probed faster meanwhile, so the decision rests on fresh samples.
//! - **Classes.** Relay paths carry traffic only while no direct path is live (and only if
//!   [`Config::relay_allowed`]); a direct path that stays up for the hold time wins back,
//!   reason [`Reason::DirectPathRecovered`]. Direct paths keep being probed with backoff.
//! - **Probe cost.** Paths in use are probed fast only while the peer is busy (data within
//!   [`Config::idle_after`]); standby paths slowly with jitter; down paths with exponential
//!   backoff to [`Config::retry_max`]. Per underlay, probes and pongs spend a token bucket
//!   ([`LocalInfo::probe_budget`]); paths in use may drain it, others keep half in reserve. A
//!   probe the budget refuses is deferred, not counted as lost.
//! - **Determinism.** Time is `now` given by the caller; randomness (timer jitter) comes from
//!   the seed given to [`Selector::new`]; all maps are ordered. The same inputs give the same
//!   outputs.
//! - **Authentication.** Every probe carries a BLAKE2s MAC keyed with the pairwise key of the
//!   two nodes; unauthenticated input changes no state (it is counted in [`Stats`]).
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod metrics;
mod selector;
pub mod wire;

use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

use serde::Serialize;

pub use metrics::{MIN_BUCKET_BYTES, PathMetrics, UNKNOWN_RTT, better, score, should_switch};
pub use selector::Selector;

/// Where a path goes: straight to a remote socket address, or through a relay node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Via<P> {
    Direct(SocketAddr),
    Relay(P),
}

/// A candidate path: the local underlay (the caller's id: which interface/socket) and where
/// it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PathId<P, L> {
    pub local: L,
    pub via: Via<P>,
}

impl<P, L> PathId<P, L> {
    /// A direct path.
    pub fn direct(local: L, addr: SocketAddr) -> Self {
        Self {
            local,
            via: Via::Direct(addr),
        }
    }

    /// A path through `relay`.
    pub fn relay(local: L, relay: P) -> Self {
        Self {
            local,
            via: Via::Relay(relay),
        }
    }

    /// True for a relay path.
    pub fn is_relay(&self) -> bool {
        matches!(self.via, Via::Relay(_))
    }
}

/// Static facts of a local underlay, given by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct LocalInfo {
    /// Operator-given cost; each unit adds [`Config::cost_weight`] to a path's score.
    pub cost: u32,
    /// Metered: standby paths on it are probed [`Config::metered_standby_factor`] times less
    /// often.
    pub metered: bool,
    /// Bytes per second for probes on this underlay, all peers together (none: unlimited).
    /// Counted as wire bytes: message + 28 (IPv4/UDP; 48 for IPv6) + [`wire::RELAY_OVERHEAD`]
    /// on relay paths. The bucket holds `max(budget, MIN_BUCKET_BYTES)` bytes.
    pub probe_budget: Option<u32>,
}

/// A peer's identity for path messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerKeys {
    /// The peer's short id (first 8 bytes of its WireGuard public key).
    pub id: wire::ShortId,
    /// Pairwise secret both sides derive (the caller computes it from X25519 static-static
    /// DH); keys the MACs of probes between the two and of relay envelopes when one of them
    /// is the relay.
    pub mac_key: wire::MacKey,
}

/// When to send every datagram on a second path too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Redundancy {
    /// Never.
    Off,
    /// While the active path's loss is at or above the enter threshold.
    Auto,
    /// Whenever a second live path exists.
    Always,
}

/// Tuning of the selector. Plain `Copy` data; start from a preset and adjust.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Config {
    /// Probe interval of paths in use while the peer is busy. Default 50 ms: with the silence
    /// timeout this bounds failover to ≈ 250 ms; costs ≈ 1.4 kB/s each way while data flows.
    pub active_probe_interval: Duration,
    /// Probe interval of a path in doubt (reply overdue). Default 20 ms: confirms or refutes
    /// the doubt within a few RTTs.
    pub doubt_probe_interval: Duration,
    /// Probe interval of a challenger (a standby that looks better) and of paths still warming
    /// up (fewer than `min_samples`). Default 250 ms: ≈ 8 samples per hold time.
    pub challenge_probe_interval: Duration,
    /// Probe interval of live standby paths, and of paths in use while the peer is idle.
    /// Default 2 s (±jitter): keeps standby paths known-good for failover at ≈ 35 B/s each.
    pub standby_probe_interval: Duration,
    /// Standby interval multiplier on metered underlays. Default 4 (8 s).
    pub metered_standby_factor: u32,
    /// First retry interval of a path that is not up; doubles per probe. Default 250 ms.
    pub retry_initial: Duration,
    /// Cap of the retry backoff. Default 4 s: a healed link is noticed within that, at about
    /// 17 B/s per dead path (`frugal`: 16 s).
    pub retry_max: Duration,
    /// Random ± spread of standby and retry intervals, percent. Default 20: avoids many
    /// peers probing in lockstep. Fast intervals are not jittered.
    pub jitter_pct: u8,
    /// A peer without data sent or received for this long is idle. Default 5 s.
    pub idle_after: Duration,
    /// Silence before a path is declared down (at least; RTT-adapted above it). Default
    /// 200 ms: 4 active probes, 10 doubt probes.
    pub silence_timeout: Duration,
    /// Unanswered probes in a row before a path can be down. Default 3.
    pub miss_limit: u32,
    /// Probes in the loss window. Default 64: 1.6 % resolution, 3.2 s at the active rate.
    pub loss_window: u16,
    /// Decided probes a candidate needs before it may displace the active path. Default 8.
    pub min_samples: u32,
    /// Relative score margin for a switch, percent. Default 15: above the noise of a
    /// 64-probe loss estimate at 10 % loss.
    pub switch_margin_pct: u32,
    /// Absolute score margin for a switch. Default 5 ms: never switch for 1 ms.
    pub switch_margin_abs: Duration,
    /// How long a candidate must stay better before a switch. Default 2 s (Babel-like).
    pub switch_hold: Duration,
    /// Constant added to the RTT in the score. Default 25 ms (see [`score`]).
    pub score_base: Duration,
    /// Score per unit of underlay cost. Default 1 ms.
    pub cost_weight: Duration,
    /// Redundant sending. Default Auto.
    pub redundancy: Redundancy,
    /// Auto redundancy starts when the active path's loss is at least this, percent.
    /// Default 5.
    pub redundancy_enter_loss_pct: f64,
    /// Auto redundancy ends once the active path's loss stayed at most this, percent, for
    /// `redundancy_hold`. Default 1.
    pub redundancy_leave_loss_pct: f64,
    /// Default 10 s: loss is bursty; leaving too early loses the next burst.
    pub redundancy_hold: Duration,
    /// Use relay paths when no direct path is live. Default true.
    pub relay_allowed: bool,
    /// Forward other peers' relay envelopes. Default false: relaying costs this node's
    /// bandwidth; relay nodes enable it.
    pub serve_relay: bool,
    /// Discovered candidates unheard for this long are dropped. Default 60 s.
    pub discovered_ttl: Duration,
    /// Interval of call-me-maybe while a peer is reached through a relay only. Default 10 s.
    pub call_me_maybe_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            active_probe_interval: Duration::from_millis(50),
            doubt_probe_interval: Duration::from_millis(20),
            challenge_probe_interval: Duration::from_millis(250),
            standby_probe_interval: Duration::from_secs(2),
            metered_standby_factor: 4,
            retry_initial: Duration::from_millis(250),
            retry_max: Duration::from_secs(4),
            jitter_pct: 20,
            idle_after: Duration::from_secs(5),
            silence_timeout: Duration::from_millis(200),
            miss_limit: 3,
            loss_window: 64,
            min_samples: 8,
            switch_margin_pct: 15,
            switch_margin_abs: Duration::from_millis(5),
            switch_hold: Duration::from_secs(2),
            score_base: Duration::from_millis(25),
            cost_weight: Duration::from_millis(1),
            redundancy: Redundancy::Auto,
            redundancy_enter_loss_pct: 5.0,
            redundancy_leave_loss_pct: 1.0,
            redundancy_hold: Duration::from_secs(10),
            relay_allowed: true,
            serve_relay: false,
            discovered_ttl: Duration::from_secs(60),
            call_me_maybe_interval: Duration::from_secs(10),
        }
    }
}

impl Config {
    /// Cheaper probing for nodes whose every underlay is metered or slow (satellite): active
    /// paths every 100 ms, standby every 5 s, silence 400 ms (failover ≈ 0.5 s).
    pub fn frugal() -> Self {
        Self {
            active_probe_interval: Duration::from_millis(100),
            doubt_probe_interval: Duration::from_millis(40),
            standby_probe_interval: Duration::from_secs(5),
            silence_timeout: Duration::from_millis(400),
            retry_max: Duration::from_secs(16),
            ..Self::default()
        }
    }

    /// A relay node: defaults plus [`Config::serve_relay`].
    pub fn relay() -> Self {
        Self {
            serve_relay: true,
            ..Self::default()
        }
    }
}

/// Why a path decision was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    FirstPathUp,
    ActivePathSilent,
    BetterScore,
    DirectPathRecovered,
    Configured,
    LossAboveThreshold,
    LossRecovered,
    SecondaryPathDown,
    RedundancyAlways,
    RedundancyOff,
}

impl Reason {
    /// A short name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::FirstPathUp => "first path up",
            Reason::ActivePathSilent => "active path silent",
            Reason::BetterScore => "better score",
            Reason::DirectPathRecovered => "direct path recovered",
            Reason::Configured => "configured",
            Reason::LossAboveThreshold => "loss above threshold",
            Reason::LossRecovered => "loss recovered",
            Reason::SecondaryPathDown => "secondary path down",
            Reason::RedundancyAlways => "redundancy always",
            Reason::RedundancyOff => "redundancy off",
        }
    }
}

/// What [`Selector::handle_datagram`] made of a datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled<P, L> {
    /// A probe, pong or call-me-maybe from `peer` (replies are queued for
    /// [`Selector::poll_transmit`]).
    Consumed { peer: P },
    /// This node relays: send `datagram` (a `RelayFrom` envelope) on `path` to `to`.
    Forward {
        to: P,
        path: PathId<P, L>,
        datagram: Vec<u8>,
    },
    /// An authenticated nack from `peer` (directly or through a relay): it asks for data
    /// messages to be resent; the shell, which keeps what it sent, acts on it.
    Nack { peer: P, nack: wire::Nack },
    /// A relayed WireGuard datagram from `from` through `relay`: `datagram[inner]` goes to
    /// the overlay; its path is `PathId { local, via: Via::Relay(relay) }`.
    Relayed {
        from: P,
        relay: P,
        inner: Range<usize>,
    },
}

/// A message the core wants sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit<P, L> {
    pub peer: P,
    /// On `Via::Relay(r)`, wrap `payload` with [`Selector::relay_envelope`] and send it to
    /// the address that returns.
    pub path: PathId<P, L>,
    pub payload: Vec<u8>,
}

/// Something the shell acts on or logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event<P, L> {
    ActivePathChanged {
        peer: P,
        from: Option<PathId<P, L>>,
        to: Option<PathId<P, L>>,
        reason: Reason,
    },
    /// Redundant mode on (`Some`) or off (`None`), or its secondary path changed.
    RedundancyChanged {
        peer: P,
        secondary: Option<PathId<P, L>>,
        reason: Reason,
    },
    /// A path learnt from the network (ping source, call-me-maybe), probed from now on.
    CandidateDiscovered { peer: P, path: PathId<P, L> },
    /// How a peer sees this node on `local` (its public NAT mapping); the shell may publish it.
    ObservedAddress { local: L, addr: SocketAddr },
}

/// Where to send a peer's data. Borrowed from the selector: cheap, allocation-free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendPaths<'a, P, L> {
    pub active: Option<&'a PathId<P, L>>,
    /// Also send every datagram here (redundant mode).
    pub secondary: Option<&'a PathId<P, L>>,
    /// False while no path has answered yet and `active` is the first configured candidate
    /// (a guess so the first WireGuard handshake can go out).
    pub confirmed: bool,
}

impl<P, L> SendPaths<'_, P, L> {
    /// No path at all.
    pub fn is_empty(&self) -> bool {
        self.active.is_none() && self.secondary.is_none()
    }
}

/// Liveness of a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathState {
    Unknown,
    Probing,
    Up,
    Doubt,
    Down,
}

impl PathState {
    /// A short name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            PathState::Unknown => "unknown",
            PathState::Probing => "probing",
            PathState::Up => "up",
            PathState::Doubt => "doubt",
            PathState::Down => "down",
        }
    }
}

/// Single or redundant sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Single,
    Redundant,
}

/// A peer's paths as shown by `mistnetd status`. Times are relative to the latest `now`
/// the selector was given.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeerPathStatus<P, L> {
    pub active: Option<PathId<P, L>>,
    pub secondary: Option<PathId<P, L>>,
    pub mode: Mode,
    pub reason: Option<Reason>,
    pub since_change: Option<Duration>,
    pub busy: bool,
    pub paths: Vec<PathStatus<P, L>>,
}

/// One path's measurements.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PathStatus<P, L> {
    pub path: PathId<P, L>,
    pub state: PathState,
    pub configured: bool,
    pub discovered: bool,
    pub srtt: Option<Duration>,
    pub rttvar: Option<Duration>,
    pub jitter: Duration,
    /// Round-trip probe loss over the window, percent.
    pub loss_pct: f64,
    /// Inbound loss (from gaps in the peer's ping sequence), percent.
    pub loss_rx_pct: Option<f64>,
    /// Outbound loss derived from round-trip and inbound loss, percent.
    pub loss_tx_pct: Option<f64>,
    pub samples: u32,
    pub last_heard_ago: Option<Duration>,
    pub score: f64,
    pub cost: u32,
    pub probes_sent: u64,
    pub probe_bytes_sent: u64,
}

/// Node-wide counters (exported by the shell with the `pathsel_` prefix).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub pings_sent: u64,
    pub pings_received: u64,
    pub pongs_sent: u64,
    pub pongs_received: u64,
    pub call_me_maybe_sent: u64,
    pub call_me_maybe_received: u64,
    /// Wire bytes of probes, pongs and call-me-maybes sent (as charged to the budgets).
    pub probe_bytes_sent: u64,
    pub probe_bytes_received: u64,
    pub malformed: u64,
    pub bad_mac: u64,
    pub unknown_sender: u64,
    /// Pongs for no outstanding ping (duplicates, late beyond the window, replays).
    pub stale_pongs: u64,
    pub switches: u64,
    pub failovers: u64,
    pub redundancy_changes: u64,
    pub candidates_discovered: u64,
    pub candidates_expired: u64,
    pub relay_forwarded: u64,
    pub relay_refused: u64,
    /// Probes postponed by a probe budget.
    pub budget_deferred: u64,
    /// Pongs not sent because of a probe budget.
    pub pongs_dropped: u64,
    /// Authenticated nacks received (requests to resend data in redundant mode).
    pub nacks_received: u64,
}

/// Why an input was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("malformed path message")]
    Malformed(#[from] wire::Error),
    #[error("path message from unknown sender {0:02x?}")]
    UnknownSender(wire::ShortId),
    #[error("bad MAC on path message from {0:02x?}")]
    BadMac(wire::ShortId),
    #[error("relay envelope for unknown destination {0:02x?}")]
    UnknownDestination(wire::ShortId),
    #[error("relay serving is disabled on this node")]
    RelayDisabled,
    #[error("no live direct path to the relay destination")]
    NoDirectPath,
    #[error("relay envelope inside a relay envelope")]
    NestedRelay,
    #[error("relayed payload is not a path message")]
    NotProbe,
    #[error("inner sender {inner:02x?} differs from envelope sender {outer:02x?}")]
    SenderMismatch {
        outer: wire::ShortId,
        inner: wire::ShortId,
    },
    #[error("unknown peer")]
    UnknownPeer,
    #[error("no direct path to the relay on this underlay")]
    NoRouteToRelay,
}
