//! Selective repair for peers in redundant mode whose second path cannot carry full copies.
//!
//! Redundant mode copies every data message onto a second path, so a burst lost on the
//! active path is filled by the copies. That works while the second path has the capacity of
//! the traffic. When it has less (an LTE uplink beside a faster Wi-Fi), the copies queue and
//! drop on it, arrive too late to fill the gaps, and the active path's losses reach TCP.
//!
//! The receiver decides, because it sees the outcome: its reorder buffer ([`crate::reorder`])
//! measures whether missing packets turn up, and how late. While the peer is in redundant mode
//! it sends a nack for every gap it sees, and each nack carries its wish ([`Judge`]):
//! - *copies* (flag clear): the sender copies everything and ignores the ranges;
//! - *repair* (flag `copies late`, wished when half or more of the missing packets never turn
//!   up, or later than a resend would: the second path drops or queues the copies): the sender
//!   stops copying and resends exactly the nacked messages on the second path, once each
//!   ([`Repair`]): about the loss rate of the active path instead of all of its traffic.
//!
//! A second path that is only slow (a satellite or congested LTE beside Wi-Fi) keeps copies:
//! they all arrive, late, but a resend would arrive later still, and copies already in flight
//! make a cut of the active path cost nothing.
//!
//! After a while the receiver wishes copies again (copies arrive sooner than resends, when the
//! path has room); each failed try doubles the while, from [`FIRST_BACKOFF`] to
//! [`MAX_BACKOFF`], and copies that hold for [`STABLE`] start it over. Evidence gathered in
//! one mode says nothing of the other: it is cleared at each switch, and when redundant mode
//! begins (losses from before the copies started have none), once the messages sent before
//! have had time to land.
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

/// How long the receiver wishes repair the first time before it tries copies again.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(10);
/// The longest it wishes repair before trying copies again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(320);
/// Copies that fill gaps in time for this long reset the backoff.
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
    /// Only nacked messages are resent on the second path.
    Repair,
}

/// Counters for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RepairStats {
    /// Nacks received from the peer.
    pub nacks: u64,
    /// Data messages resent.
    pub resent: u64,
    /// Nacked messages no longer kept (too old, or sent while copying).
    pub missed: u64,
    /// Switches from copying to repairing (on the peer's wish).
    pub repair_entered: u64,
}

/// One peer's sending side: copies or repairs, as the peer's latest nack wishes.
#[derive(Debug)]
pub struct Repair {
    mode: Mode,
    /// Data messages sent while repairing.
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
            log: VecDeque::new(),
            spare: Vec::new(),
            stats: RepairStats::default(),
        }
    }
}

impl Repair {
    /// The sending mode.
    pub fn mode(&self) -> Mode {
        self.mode
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

    /// Takes a nack: follows the peer's wish, and while repairing puts the nacked messages
    /// still kept (each once) into `out`.
    pub fn handle_nack(&mut self, nack: &Nack, out: &mut Vec<Vec<u8>>) {
        self.stats.nacks += 1;
        match (self.mode, nack.copies_late) {
            (Mode::Copy, false) => return,
            (Mode::Repair, false) => {
                self.mode = Mode::Copy;
                self.recycle_all();
                return;
            }
            (Mode::Copy, true) => {
                self.mode = Mode::Repair;
                self.stats.repair_entered += 1;
                // Messages sent before the switch were copied (or not kept): nothing to resend.
                return;
            }
            (Mode::Repair, true) => {}
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

    /// Leaves redundant mode: copies again, nothing kept.
    pub fn reset(&mut self) {
        self.mode = Mode::Copy;
        self.recycle_all();
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

/// One peer's receiving side: which mode to wish for, from the reorder buffer's evidence.
#[derive(Debug)]
pub struct Judge {
    repair: bool,
    /// While wishing repair: when copies are tried again.
    until: Option<Instant>,
    /// When copies were last wished (for [`STABLE`]).
    copying_since: Option<Instant>,
    backoff: Duration,
    /// After a switch: evidence is cleared at this time, when what was sent before the switch
    /// has landed.
    settle_at: Option<Instant>,
    /// Redundant mode has begun (and its first settling with it).
    started: bool,
}

impl Default for Judge {
    fn default() -> Self {
        Self {
            repair: false,
            until: None,
            copying_since: None,
            backoff: FIRST_BACKOFF,
            settle_at: None,
            started: false,
        }
    }
}

impl Judge {
    /// Whether nacks wish repair (flag `copies late`).
    pub fn wants_repair(&self) -> bool {
        self.repair
    }

    /// The wished mode.
    pub fn mode(&self) -> Mode {
        if self.repair {
            Mode::Repair
        } else {
            Mode::Copy
        }
    }

    /// Updates the wish at `now` from the reorder buffer's evidence (`copies_arrive`: most
    /// packets missing on the fast path turn up within the two paths' RTTs, or too little
    /// evidence yet). `settle`: how long messages sent before a switch may still arrive (the
    /// paths' RTTs). Returns true when the caller must clear the buffer's evidence.
    pub fn update(&mut self, now: Instant, copies_arrive: bool, settle: Duration) -> bool {
        if !self.started {
            // Losses from before the sender began copying have no copies: settle first.
            self.started = true;
            self.settle_at = Some(now + settle);
            return true;
        }
        let mut clear = false;
        if let Some(at) = self.settle_at {
            if now < at {
                return false;
            }
            self.settle_at = None;
            clear = true;
        }
        if self.repair {
            if self.until.is_some_and(|u| now >= u) {
                self.repair = false;
                self.until = None;
                self.copying_since = Some(now);
                self.settle_at = Some(now + settle);
                return true;
            }
            return clear;
        }
        // Evidence cleared just now says nothing yet.
        if clear || copies_arrive {
            return clear;
        }
        let failed_try = self
            .copying_since
            .is_some_and(|t| now.saturating_duration_since(t) < STABLE);
        self.backoff = if failed_try {
            (self.backoff * 2).min(MAX_BACKOFF)
        } else {
            FIRST_BACKOFF
        };
        self.repair = true;
        self.until = Some(now + self.backoff);
        self.settle_at = Some(now + settle);
        true
    }

    /// Leaves redundant mode: the next time starts with copies; the backoff is remembered.
    pub fn reset(&mut self) {
        self.repair = false;
        self.until = None;
        self.settle_at = None;
        self.started = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTLE: Duration = Duration::from_millis(40);

    #[test]
    fn the_sender_follows_the_wish_of_the_latest_nack() {
        let t0 = Instant::now();
        let mut r = Repair::default();
        let mut out = Vec::new();
        assert_eq!(r.mode(), Mode::Copy);
        r.record(7, 0, b"not kept while copying", t0);
        assert_eq!(r.kept(), 0);
        r.handle_nack(&nack(false, 0, 1), &mut out);
        assert_eq!(r.mode(), Mode::Copy, "copies that fill gaps are fine");
        r.handle_nack(&nack(true, 0, 1), &mut out);
        assert_eq!(r.mode(), Mode::Repair);
        assert!(out.is_empty(), "messages sent while copying are not resent");
        r.record(7, 1, b"kept", t0);
        r.handle_nack(&nack(false, 1, 1), &mut out);
        assert_eq!(r.mode(), Mode::Copy);
        assert!(out.is_empty());
        assert_eq!(r.kept(), 0, "copying keeps nothing");
        assert_eq!(r.stats().repair_entered, 1);
    }

    #[test]
    fn resends_nacked_messages_once_each() {
        let t0 = Instant::now();
        let mut r = repairing();
        for c in 10..20 {
            r.record(7, c, &[c as u8; 3], t0);
        }
        let mut out = Vec::new();
        r.handle_nack(&nack(true, 12, 3), &mut out);
        assert_eq!(out, vec![vec![12; 3], vec![13; 3], vec![14; 3]]);
        out.clear();
        r.handle_nack(&nack(true, 13, 3), &mut out);
        assert_eq!(out, vec![vec![15; 3]], "13 and 14 went already");
        out.clear();
        let mut other = nack(true, 16, 1);
        other.session = 8;
        r.handle_nack(&other, &mut out);
        assert!(out.is_empty(), "another session's counters are not ours");
        r.handle_nack(&nack(true, 100, 2), &mut out);
        assert!(out.is_empty());
        let s = r.stats();
        assert_eq!((s.resent, s.missed), (4, 3));
    }

    #[test]
    fn keeps_a_bounded_log() {
        let t0 = Instant::now();
        let mut r = repairing();
        for c in 0..(LOG_MAX as u64 + 100) {
            r.record(7, c, &[0; 1400], t0);
        }
        assert_eq!(r.kept(), LOG_MAX);
        let mut out = Vec::new();
        r.handle_nack(&nack(true, 0, 1), &mut out);
        assert!(out.is_empty(), "the oldest were dropped");
        r.record(7, 5000, &[0; 10], t0 + LOG_AGE + Duration::from_millis(1));
        assert_eq!(r.kept(), 1, "old messages expire");
        // A huge range is capped.
        r.handle_nack(&nack(true, 0, u16::MAX), &mut out);
        assert_eq!(r.stats().missed, 1 + MAX_NACKED);
        r.reset();
        assert_eq!((r.mode(), r.kept()), (Mode::Copy, 0));
    }

    #[test]
    fn the_receiver_wishes_repair_when_copies_come_late_and_retries_with_backoff() {
        let t0 = Instant::now();
        let mut j = Judge::default();
        assert!(
            j.update(t0, false, SETTLE),
            "redundant mode begins: clear, then settle"
        );
        assert!(!j.update(t0, false, SETTLE));
        assert!(
            !j.wants_repair(),
            "losses from before the copies do not count"
        );
        let t0 = t0 + SETTLE;
        assert!(j.update(t0, true, SETTLE), "settled: evidence cleared");
        assert!(!j.update(t0, true, SETTLE), "copies fill the gaps");
        assert!(!j.wants_repair());

        assert!(
            j.update(t0, false, SETTLE),
            "evidence cleared at the switch"
        );
        assert!(j.wants_repair());
        assert!(!j.update(t0 + SETTLE / 2, false, SETTLE), "settling");
        assert!(
            j.update(t0 + SETTLE, true, SETTLE),
            "cleared again once settled"
        );
        assert!(
            !j.update(t0 + FIRST_BACKOFF / 2, false, SETTLE),
            "repair holds"
        );
        assert!(j.wants_repair());

        // Copies are tried again after the backoff ...
        let mut t = t0 + FIRST_BACKOFF;
        assert!(j.update(t, true, SETTLE));
        assert!(!j.wants_repair());
        t += SETTLE;
        assert!(j.update(t, true, SETTLE));
        // ... and fail again: twice the wait, up to the maximum.
        let mut wait = FIRST_BACKOFF;
        for _ in 0..8 {
            assert!(j.update(t, false, SETTLE));
            assert!(j.wants_repair());
            wait = (wait * 2).min(MAX_BACKOFF);
            assert_eq!(j.until, Some(t + wait));
            t += wait;
            assert!(j.update(t, true, SETTLE));
            t += SETTLE;
            assert!(j.update(t, true, SETTLE));
        }
        assert_eq!(wait, MAX_BACKOFF);
        // Copies that last start the backoff over.
        t += STABLE;
        assert!(j.update(t, false, SETTLE));
        assert_eq!(j.until, Some(t + FIRST_BACKOFF));
        j.reset();
        assert_eq!(j.mode(), Mode::Copy);
    }

    fn repairing() -> Repair {
        let mut r = Repair::default();
        r.handle_nack(&nack(true, 0, 1), &mut Vec::new());
        assert_eq!(r.mode(), Mode::Repair);
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
