//! Selective repair for peers in redundant mode whose second path cannot carry full copies.
//!
//! Redundant mode copies every data message onto a second path, so a burst lost on the
//! active path is filled by the copies. That works while the second path has the capacity of
//! the traffic. When it has less (an LTE uplink beside a faster Wi-Fi), the copies queue and
//! drop on it, arrive too late to fill the gaps, and the active path's losses reach TCP.
//!
//! The receiver tells which case it is in: its reorder buffer ([`crate::reorder`]) measures
//! whether missing packets turn up in time, and it sends a nack for every gap it sees while
//! the peer is in redundant mode, flagged `copies late` when they do not. A sender that gets
//! such a nack stops copying for a while and resends only the messages nacked, on the second
//! path: about the loss rate of the active path instead of all of its traffic. After the
//! while it tries copying again (copies arrive sooner than resends, when the path has room);
//! each failed try doubles the while, from [`FIRST_BACKOFF`] to [`MAX_BACKOFF`], and a try
//! that holds for [`STABLE`] starts it over.
//!
//! Resending is safe: it is the same ciphertext (WireGuard's replay window drops a second
//! arrival), and only messages this node sent to that peer are resent, once each.
//!
//! Pure logic: time comes in as `now`; the shell records what it sends, hands nacks in, and
//! sends what comes out.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use mistnet_path::wire::Nack;
use serde::Serialize;

/// The first time a sender stops copying after a `copies late` nack.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(10);
/// The longest a sender goes without trying to copy again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(320);
/// Copying that lasts this long without a `copies late` nack resets the backoff.
pub const STABLE: Duration = Duration::from_secs(60);
/// Messages kept for resending while repairing (about 0.3 s at 3400 packets/s).
pub const LOG_MAX: usize = 1024;
/// Age past which a kept message is of no use: the receiver has given its gap up.
pub const LOG_AGE: Duration = Duration::from_millis(500);
/// Counters one nack may ask for in all (a forged or corrupt range cannot make us scan far).
const MAX_NACKED: u64 = LOG_MAX as u64;

/// How a peer's second path is used in redundant mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every data message is copied onto the second path.
    Copy,
    /// Only nacked messages are resent on the second path (until `until`).
    Repair,
}

/// Counters for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RepairStats {
    /// Nacks received from the peer.
    pub nacks: u64,
    /// Data messages resent.
    pub resent: u64,
    /// Nacked messages no longer kept (too old, or never sent while repairing).
    pub missed: u64,
    /// Switches from copying to repairing.
    pub repair_entered: u64,
}

/// One peer's sending side.
#[derive(Debug)]
pub struct Repair {
    mode: Mode,
    /// While repairing: when copying is tried again.
    until: Option<Instant>,
    /// When copying last started (for [`STABLE`]).
    copying_since: Option<Instant>,
    backoff: Duration,
    /// Data messages sent while repairing: (session, counter, sent at, datagram, resent).
    log: VecDeque<Kept>,
    /// Buffers of dropped entries, reused so the hot path does not allocate.
    spare: Vec<Vec<u8>>,
    stats: RepairStats,
}

#[derive(Debug)]
struct Kept {
    session: u32,
    counter: u64,
    at: Instant,
    bytes: Vec<u8>,
    resent: bool,
}

impl Default for Repair {
    fn default() -> Self {
        Self {
            mode: Mode::Copy,
            until: None,
            copying_since: None,
            backoff: FIRST_BACKOFF,
            log: VecDeque::new(),
            spare: Vec::new(),
            stats: RepairStats::default(),
        }
    }
}

impl Repair {
    /// The mode at `now` (a repair whose while is over goes back to copying).
    pub fn mode(&mut self, now: Instant) -> Mode {
        if self.mode == Mode::Repair && self.until.is_some_and(|u| now >= u) {
            self.mode = Mode::Copy;
            self.until = None;
            self.copying_since = Some(now);
            self.recycle_all();
        }
        self.mode
    }

    /// Whether data messages are copied onto the second path at `now`.
    pub fn copying(&mut self, now: Instant) -> bool {
        self.mode(now) == Mode::Copy
    }

    /// Keeps a data message sent while repairing (WireGuard type 4, with its receiver index
    /// `session` and `counter`), so a nack can have it resent.
    pub fn record(&mut self, session: u32, counter: u64, datagram: &[u8], now: Instant) {
        if self.mode != Mode::Repair {
            return;
        }
        while self.log.len() >= LOG_MAX
            || self
                .log
                .front()
                .is_some_and(|k| now.saturating_duration_since(k.at) > LOG_AGE)
        {
            let Some(old) = self.log.pop_front() else {
                break;
            };
            self.spare.push(old.bytes);
        }
        let mut bytes = self.spare.pop().unwrap_or_default();
        bytes.clear();
        bytes.extend_from_slice(datagram);
        self.log.push_back(Kept {
            session,
            counter,
            at: now,
            bytes,
            resent: false,
        });
    }

    /// Takes a nack: switches to repairing if the receiver says copies come too late, and
    /// while repairing puts the nacked messages still kept (each once) into `out`.
    pub fn handle_nack(&mut self, nack: &Nack, now: Instant, out: &mut Vec<Vec<u8>>) {
        self.stats.nacks += 1;
        if self.mode(now) == Mode::Copy {
            if !nack.copies_late {
                // The copies fill the gaps.
                return;
            }
            let failed_try = self
                .copying_since
                .is_some_and(|t| now.saturating_duration_since(t) < STABLE);
            self.backoff = if failed_try {
                (self.backoff * 2).min(MAX_BACKOFF)
            } else {
                FIRST_BACKOFF
            };
            self.mode = Mode::Repair;
            self.until = Some(now + self.backoff);
            self.stats.repair_entered += 1;
            // Messages sent before the switch were copied (or not kept): nothing to resend.
            return;
        }
        let mut budget = MAX_NACKED;
        for &(first, len) in &nack.ranges {
            let len = u64::from(len).min(budget);
            budget -= len;
            for counter in first..first.saturating_add(len) {
                match self
                    .log
                    .iter_mut()
                    .rev()
                    .find(|k| k.session == nack.session && k.counter == counter)
                {
                    Some(k) if !k.resent => {
                        k.resent = true;
                        self.stats.resent += 1;
                        out.push(k.bytes.clone());
                    }
                    Some(_) => {}
                    None => self.stats.missed += 1,
                }
            }
        }
    }

    /// Leaves redundant mode: nothing is kept; the backoff is remembered.
    pub fn reset(&mut self) {
        self.recycle_all();
    }

    /// When copying is tried again (while repairing).
    pub fn repair_until(&self) -> Option<Instant> {
        self.until
    }

    /// The mode at `now`, for status (changes nothing).
    pub fn peek_mode(&self, now: Instant) -> Mode {
        match self.until {
            Some(u) if now < u => Mode::Repair,
            Some(_) | None => Mode::Copy,
        }
    }

    /// Counters.
    pub fn stats(&self) -> RepairStats {
        self.stats
    }

    /// Messages kept right now.
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.log.len()
    }

    fn recycle_all(&mut self) {
        let log = std::mem::take(&mut self.log);
        self.spare.extend(log.into_iter().map(|k| k.bytes));
        // Enough spares for one full log; more would only hold memory.
        self.spare.truncate(LOG_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_until_the_receiver_says_they_are_late() {
        let t0 = Instant::now();
        let mut r = Repair::default();
        let mut out = Vec::new();
        assert!(r.copying(t0));
        r.record(1, 0, b"not kept while copying", t0);
        assert_eq!(r.kept(), 0);

        r.handle_nack(&nack(false, 5, 2), t0, &mut out);
        assert!(r.copying(t0), "copies that fill gaps are fine");

        r.handle_nack(&nack(true, 5, 2), t0, &mut out);
        assert!(!r.copying(t0));
        assert_eq!(r.repair_until(), Some(t0 + FIRST_BACKOFF));
        assert!(out.is_empty(), "messages sent while copying are not resent");
        assert!(r.copying(t0 + FIRST_BACKOFF), "copying is tried again");
    }

    #[test]
    fn resends_nacked_messages_once_each() {
        let t0 = Instant::now();
        let mut r = repairing(t0);
        for c in 10..20 {
            r.record(7, c, &[c as u8; 3], t0);
        }
        let mut out = Vec::new();
        r.handle_nack(&nack(false, 12, 3), t0, &mut out);
        assert_eq!(out, vec![vec![12; 3], vec![13; 3], vec![14; 3]]);
        out.clear();
        r.handle_nack(&nack(false, 13, 3), t0, &mut out);
        assert_eq!(out, vec![vec![15; 3]], "13 and 14 went already");
        out.clear();
        let mut other = nack(false, 16, 1);
        other.session = 8;
        r.handle_nack(&other, t0, &mut out);
        assert!(out.is_empty(), "another session's counters are not ours");
        r.handle_nack(&nack(false, 100, 2), t0, &mut out);
        assert!(out.is_empty());
        let s = r.stats();
        assert_eq!((s.resent, s.missed), (4, 3));
    }

    #[test]
    fn keeps_a_bounded_log() {
        let t0 = Instant::now();
        let mut r = repairing(t0);
        for c in 0..(LOG_MAX as u64 + 100) {
            r.record(1, c, &[0; 1400], t0);
        }
        assert_eq!(r.kept(), LOG_MAX);
        let mut out = Vec::new();
        r.handle_nack(&nack(false, 0, 1), t0, &mut out);
        assert!(out.is_empty(), "the oldest were dropped");
        r.record(1, 5000, &[0; 10], t0 + LOG_AGE + Duration::from_millis(1));
        assert_eq!(r.kept(), 1, "old messages expire");
        // A huge range is capped.
        r.handle_nack(&nack(false, 0, u16::MAX), t0, &mut out);
        assert_eq!(r.stats().missed, 1 + MAX_NACKED);
    }

    #[test]
    fn failed_tries_back_off_and_a_stable_try_starts_over() {
        let t0 = Instant::now();
        let mut r = repairing(t0);
        let mut out = Vec::new();
        let mut t = t0 + FIRST_BACKOFF;
        assert!(r.copying(t));
        r.handle_nack(&nack(true, 0, 1), t, &mut out);
        assert_eq!(r.repair_until(), Some(t + 2 * FIRST_BACKOFF));
        t += 2 * FIRST_BACKOFF;
        for _ in 0..10 {
            assert!(r.copying(t));
            r.handle_nack(&nack(true, 0, 1), t, &mut out);
            t = r.repair_until().unwrap();
        }
        assert_eq!(r.backoff, MAX_BACKOFF);
        assert!(r.copying(t));
        t += STABLE;
        r.handle_nack(&nack(true, 0, 1), t, &mut out);
        assert_eq!(r.repair_until(), Some(t + FIRST_BACKOFF));
        assert_eq!(r.stats().repair_entered, 13);
    }

    fn repairing(t0: Instant) -> Repair {
        let mut r = Repair::default();
        r.handle_nack(&nack(true, 0, 1), t0, &mut Vec::new());
        assert!(!r.copying(t0));
        r
    }

    fn nack(copies_late: bool, first: u64, len: u16) -> Nack {
        Nack {
            session: 7,
            copies_late,
            ranges: vec![(first, len)],
        }
    }
}
