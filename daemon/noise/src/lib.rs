//! WireGuard's Noise handshake, sessions and timers: boringtun 0.7.1's `noise` module with the
//! clock taken out. Pure: no sockets, no threads, and no clock reads.
//!
//! Upstream reads `Instant::now()` (and `SystemTime::now()` for handshake timestamps) inside
//! `Tunn`; its only test hook is the global `mock-instant` clock. Here every entry point takes
//! the caller's `now` ([`noise::Tunn::new_at`], [`noise::Tunn::encapsulate_at`],
//! [`noise::Tunn::decapsulate_at`], [`noise::Tunn::update_timers_at`],
//! [`noise::Tunn::format_handshake_initiation_at`], [`noise::rate_limiter::RateLimiter::new_at`]),
//! so tests move WireGuard's timers (rekey, keepalive, expiry) by passing later instants, and
//! several tunnels in one process can live on different clocks. This is the Firezone approach
//! (they carry a boringtun fork for the same reason).
//!
//! Differences from upstream, all mechanical:
//! - time parameters as listed above; a `Tunn` keeps the latest `now` it was given and ignores
//!   an earlier one (callers on several threads may pass slightly stale readings);
//! - handshake TAI64N timestamps are `unix_time` given at creation plus the elapsed caller time;
//! - [`noise::Tunn::set_persistent_keepalive`] (upstream needs a new `Tunn` to change it);
//! - upstream's `device`, FFI, JNI and mock-clock code is not included.
//!
//! Upstream timers count from `std::time::Instant` through a boot-time clock on Linux
//! (suspend included); callers here choose their clock.
#![allow(
    deprecated,
    clippy::all,
    clippy::unwrap_used,
    clippy::wildcard_enum_match_arm
)]

pub mod noise;

/// Re-export of the x25519 types
pub mod x25519 {
    pub use x25519_dalek::{
        EphemeralSecret, PublicKey, ReusableSecret, SharedSecret, StaticSecret,
    };
}
