//! A receive-side reorder buffer for peers sending on two paths (redundant mode).
//!
//! In redundant mode every datagram travels a fast and a slow path; the receiver keeps the
//! first copy. When the fast path loses a burst, the slow path's copies of those packets
//! arrive *after* packets sent later, and TCP reads the hole as loss: it retransmits
//! spuriously and shrinks its window, although nothing was lost. The buffer restores the
//! sender's order using WireGuard's own per-session counter (every data message carries it,
//! in order of sending): a packet that arrives after a gap is held until the gap is filled or
//! for at most the hold time, then released in counter order.
//!
//! The buffer judges itself, so it never makes things worse:
//! - Waiting pays only while it is shorter than what TCP would need to repair the gap itself:
//!   a few round trips of the fast path. That is the caller's `limit`; a copy arriving later
//!   than it is "too late".
//! - The hold follows how late the copies that fill gaps actually are (twice their smoothed
//!   lateness plus 2 ms, at least 5 ms), never more than `limit`.
//! - Holding stops while most missing packets do not turn up in time: then gaps are real
//!   losses, or the slow path is too slow or too small to carry the copies in time (less
//!   capacity than the fast path: it queues and drops them), and waiting would only delay the
//!   packets behind the gaps. Late packets keep being measured while it is off, so holding
//!   resumes when copies come in time again.
//!
//! Pure logic: time comes in as `now`; the shell writes what [`Reorder::push`] and
//! [`Reorder::poll_expired`] return to the TUN device.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// Longest a packet is ever held.
pub const MAX_HOLD: Duration = Duration::from_millis(100);
/// Shortest hold (scheduling noise of the receive path).
const MIN_HOLD: Duration = Duration::from_millis(5);
/// Most packets held per peer; past this the oldest gap is given up.
const MAX_HELD: usize = 256;
/// Missing packets counted before the buffer judges whether holding pays off.
const MIN_EVIDENCE: f64 = 20.0;
/// Missing packets counted before the buffer says copies go missing (a switch of the peer's
/// sending mode follows, so it wants more evidence than holding does).
const MIN_REPAIR_EVIDENCE: f64 = 50.0;
/// Share of missing packets below which copies count as going missing: a second path that
/// drops or queues half of them is too small for them, one that loses a few is not.
const COPIES_ARRIVE: f64 = 0.5;
/// Share of missing packets that must turn up in time for holding to pay off.
const WORTH_HOLDING: f64 = 0.75;
/// Evidence is halved past this, so the judgement follows changing links.
const EVIDENCE_WINDOW: f64 = 400.0;
/// Gaps passed over that late packets are matched against.
const SKIPPED_GAPS: usize = 32;
/// Longest gap reported for resending: a longer one is an outage, not a burst, and what was
/// sent in it is gone from the sender's log.
const MAX_REPORTED_GAP: u64 = 1024;
/// Gaps kept for one report at most (a nack carries 16; the rest go in further nacks).
const MAX_GAPS: usize = 64;

/// One peer's buffer.
#[derive(Debug, Default)]
pub struct Reorder {
    /// The session (our receiver index) the counters belong to.
    session: Option<u32>,
    /// The next counter to deliver.
    next: u64,
    /// Packets that arrived ahead of a gap: counter → (deadline, bytes).
    held: BTreeMap<u64, (Instant, Vec<u8>)>,
    /// When the oldest held gap opened.
    gap_opened: Option<Instant>,
    /// Packets found missing (gaps filled or given up), decayed.
    missing: f64,
    /// Of those, packets that turned up in time, decayed.
    recovered: f64,
    /// Of those, packets that turned up within the horizon at all, decayed.
    arrived: f64,
    /// How late a missing packet may turn up and still count as arriving: about when a resend
    /// would land (zero: no horizon set, nothing counts).
    horizon: Duration,
    /// The latest `limit` given: what "in time" means.
    limit: Duration,
    /// Smoothed lateness of the packets that filled gaps.
    lateness: Option<Duration>,
    /// Recent gaps passed over: counters `from..to`, opened at.
    skipped: VecDeque<(u64, u64, Instant)>,
    /// The highest counter seen in the session.
    highest: u64,
    /// Gaps seen since the last [`Reorder::take_gaps`], as `first, len` (redundant mode only):
    /// what the peer is asked to resend ([`crate::repair`]).
    gaps: Vec<(u64, u16)>,
}

/// What to do with a packet just decrypted.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Write it now, then the packets in `then` (released by it, in order).
    Deliver { then: Vec<Vec<u8>> },
    /// Held (copied); written later.
    Held,
    /// Write these in order instead (the packet itself is among them).
    Flush(Vec<Vec<u8>>),
}

impl Reorder {
    /// Takes a decrypted packet with its WireGuard session and counter. `limit` is the
    /// longest a packet may wait: what TCP would need to repair a gap by itself, a few round
    /// trips of the fast path (zero: the peer sends on one path and the buffer only drains).
    pub fn push(
        &mut self,
        session: u32,
        counter: u64,
        packet: &[u8],
        limit: Duration,
        now: Instant,
    ) -> Verdict {
        self.limit = limit.min(MAX_HOLD);
        if self.session != Some(session) {
            // A new session starts its counters at 0; what is held belongs to the old one
            // and goes out first.
            self.session = Some(session);
            self.next = counter + 1;
            self.highest = counter;
            self.gaps.clear();
            self.skipped.clear();
            self.gap_opened = None;
            if self.held.is_empty() {
                return Verdict::Deliver { then: Vec::new() };
            }
            let mut all: Vec<Vec<u8>> = std::mem::take(&mut self.held)
                .into_values()
                .map(|(_, p)| p)
                .collect();
            all.push(packet.to_vec());
            return Verdict::Flush(all);
        }
        if counter > self.highest {
            if !self.limit.is_zero() && counter > self.highest + 1 {
                self.note_gap(self.highest + 1, counter);
            }
            self.highest = counter;
        }
        if counter < self.next {
            // A late packet of a gap given up (WireGuard dropped any duplicate): deliver as
            // is, and learn from it whether waiting would have paid off.
            let opened = self
                .skipped
                .iter()
                .find(|(from, to, _)| (*from..*to).contains(&counter))
                .map(|(_, _, at)| *at);
            if let Some(at) = opened {
                self.note_late(now.saturating_duration_since(at));
            }
            return Verdict::Deliver { then: Vec::new() };
        }
        if counter == self.next {
            if !self.held.is_empty() {
                // It fills the gap held for.
                self.note_missing(1);
                if let Some(at) = self.gap_opened {
                    self.note_late(now.saturating_duration_since(at));
                }
            }
            self.next += 1;
            return Verdict::Deliver {
                then: self.release_ready(now),
            };
        }
        // A gap before this packet.
        let hold = self.hold();
        if hold.is_zero() || self.held.len() >= MAX_HELD {
            if self.held.is_empty() {
                self.pass_over(self.next, counter, now);
                self.next = counter + 1;
                return Verdict::Deliver { then: Vec::new() };
            }
            // Give the held gaps up: everything goes out in counter order, this packet too.
            self.held.insert(counter, (now, packet.to_vec()));
            let all: Vec<(u64, Vec<u8>)> = std::mem::take(&mut self.held)
                .into_iter()
                .map(|(c, (_, p))| (c, p))
                .collect();
            let mut expected = self.next;
            for (c, _) in &all {
                if *c > expected {
                    self.pass_over(expected, *c, now);
                }
                expected = c + 1;
            }
            self.next = expected;
            self.gap_opened = None;
            return Verdict::Flush(all.into_iter().map(|(_, p)| p).collect());
        }
        if self.held.is_empty() {
            self.gap_opened = Some(now);
        }
        self.held
            .entry(counter)
            .or_insert_with(|| (now + hold, packet.to_vec()));
        Verdict::Held
    }

    /// Releases packets whose wait is over (passing over the gaps before them), in counter
    /// order.
    pub fn poll_expired(&mut self, now: Instant) -> Vec<Vec<u8>> {
        let Some((&first, (deadline, _))) = self.held.iter().next() else {
            return Vec::new();
        };
        if *deadline > now {
            return Vec::new();
        }
        let opened = self.gap_opened.unwrap_or(now);
        self.pass_over(self.next, first, opened);
        self.next = first;
        self.release_ready(now)
    }

    /// The earliest deadline of a held packet.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.held.values().map(|(d, _)| *d).min()
    }

    /// Whether gaps were seen since the last [`Reorder::take_gaps`].
    pub fn has_gaps(&self) -> bool {
        !self.gaps.is_empty()
    }

    /// The gaps seen since the last call (in redundant mode), with their session: what to ask
    /// the peer to resend.
    pub fn take_gaps(&mut self) -> Option<(u32, Vec<(u64, u16)>)> {
        if self.gaps.is_empty() {
            return None;
        }
        Some((self.session?, std::mem::take(&mut self.gaps)))
    }

    /// Whether holding has paid off lately: most missing packets turned up in time.
    pub fn worth_holding(&self) -> bool {
        self.missing < MIN_EVIDENCE || self.recovered >= WORTH_HOLDING * self.missing
    }

    /// Whether the packets missing on the fast path mostly never turn up, or later than a
    /// resend would (the horizon): what a second path too small for the copies looks like
    /// (it drops and queues them), as opposed to one that is only slow, whose copies all come,
    /// late, but before a resend could.
    pub fn copies_missing(&self) -> bool {
        self.missing >= MIN_REPAIR_EVIDENCE && self.arrived < COPIES_ARRIVE * self.missing
    }

    /// The decayed evidence: packets found missing, of those turned up in time to hold for,
    /// and turned up within the horizon (for status).
    pub fn evidence(&self) -> (f64, f64, f64) {
        (self.missing, self.recovered, self.arrived)
    }

    /// Sets the horizon of [`Reorder::copies_missing`].
    pub fn set_horizon(&mut self, horizon: Duration) {
        self.horizon = horizon;
    }

    /// Forgets what was learned of missing packets: the sender changed how it fills gaps.
    pub fn reset_evidence(&mut self) {
        self.missing = 0.0;
        self.recovered = 0.0;
        self.arrived = 0.0;
        self.lateness = None;
    }

    /// Packets held right now.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// The hold for a new gap: zero when off or not worth it.
    fn hold(&self) -> Duration {
        if self.limit.is_zero() || !self.worth_holding() {
            return Duration::ZERO;
        }
        self.lateness
            .map_or(self.limit, |l| 2 * l + Duration::from_millis(2))
            .max(MIN_HOLD)
            .min(self.limit)
    }

    /// Counters `from..to` did not arrive (yet) when a later one did.
    fn note_gap(&mut self, from: u64, to: u64) {
        if to - from > MAX_REPORTED_GAP {
            return;
        }
        let mut first = from;
        while first < to && self.gaps.len() < MAX_GAPS {
            let len = (to - first).min(u64::from(u16::MAX));
            // `len` fits: it is at most u16::MAX.
            self.gaps.push((first, len as u16));
            first += len;
        }
    }

    /// Counters `from..to` are given up (as of `at`, when the gap opened).
    fn pass_over(&mut self, from: u64, to: u64, at: Instant) {
        if to <= from {
            return;
        }
        self.note_missing(to - from);
        if self.skipped.len() == SKIPPED_GAPS {
            self.skipped.pop_front();
        }
        self.skipped.push_back((from, to, at));
    }

    fn note_missing(&mut self, n: u64) {
        self.missing += n as f64;
        if self.missing > EVIDENCE_WINDOW {
            self.missing /= 2.0;
            self.recovered /= 2.0;
            self.arrived /= 2.0;
        }
    }

    /// A missing packet turned up `late` after its gap opened.
    fn note_late(&mut self, late: Duration) {
        if late <= self.horizon {
            self.arrived += 1.0;
        }
        if late > self.limit.max(MIN_HOLD) {
            return;
        }
        self.recovered += 1.0;
        self.lateness = Some(match self.lateness {
            None => late,
            Some(l) => (l * 7 + late) / 8,
        });
    }

    fn release_ready(&mut self, now: Instant) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some((_, p)) = self.held.remove(&self.next) {
            out.push(p);
            self.next += 1;
        }
        // What is still held waits for a younger gap.
        self.gap_opened = (!self.held.is_empty()).then_some(now);
        out
    }
}

/// Session (receiver index) and counter of a WireGuard data message, if it is one.
pub fn data_counter(datagram: &[u8]) -> Option<(u32, u64)> {
    if datagram.first() != Some(&4) {
        return None;
    }
    let idx = u32::from_le_bytes(datagram.get(4..8)?.try_into().ok()?);
    let counter = u64::from_le_bytes(datagram.get(8..16)?.try_into().ok()?);
    Some((idx, counter))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOLD: Duration = Duration::from_millis(30);

    #[test]
    fn in_order_packets_pass_straight_through() {
        let (mut r, now) = (Reorder::default(), Instant::now());
        for c in 0..5 {
            assert_eq!(r.push(1, c, &[c as u8], HOLD, now), deliver(&[]));
        }
        assert_eq!(r.held(), 0);
    }

    #[test]
    fn a_gap_filled_by_the_slow_copy_restores_the_order() {
        let (mut r, now) = (Reorder::default(), Instant::now());
        r.push(1, 0, &[0], HOLD, now);
        // 1 and 2 lost on the fast path; 3 and 4 arrive first.
        assert_eq!(r.push(1, 3, &[3], HOLD, now), Verdict::Held);
        assert_eq!(r.push(1, 4, &[4], HOLD, now), Verdict::Held);
        assert_eq!(r.next_deadline(), Some(now + HOLD));
        // The slow path's copies of 1 and 2 arrive 10 ms later.
        let later = now + Duration::from_millis(10);
        assert_eq!(r.push(1, 1, &[1], HOLD, later), deliver(&[]));
        assert_eq!(r.push(1, 2, &[2], HOLD, later), deliver(&[&[3], &[4]]));
        assert_eq!(r.held(), 0);
        assert_eq!(r.push(1, 5, &[5], HOLD, later), deliver(&[]));
    }

    #[test]
    fn gaps_are_reported_once_in_redundant_mode_only() {
        let (mut r, now) = (Reorder::default(), Instant::now());
        r.push(1, 0, &[0], Duration::ZERO, now);
        r.push(1, 3, &[3], Duration::ZERO, now);
        assert_eq!(r.take_gaps(), None, "one path: nothing to ask for");
        r.push(1, 4, &[4], HOLD, now);
        r.push(1, 7, &[7], HOLD, now);
        r.push(1, 9, &[9], HOLD, now);
        // The late arrival of 5 opens no new gap.
        r.push(1, 5, &[5], HOLD, now);
        assert_eq!(r.take_gaps(), Some((1, vec![(5, 2), (8, 1)])));
        assert_eq!(r.take_gaps(), None);
        // An outage is no burst: not reported.
        r.push(1, 9 + 2 * MAX_REPORTED_GAP, &[0], HOLD, now);
        assert_eq!(r.take_gaps(), None);
        // A new session forgets the old one's gaps.
        r.push(1, 5000, &[0], HOLD, now);
        r.push(2, 0, &[0], HOLD, now);
        assert_eq!(r.take_gaps(), None);
        r.push(2, 2, &[2], HOLD, now);
        assert_eq!(r.take_gaps(), Some((2, vec![(1, 1)])));
    }

    #[test]
    fn slow_copies_arrive_and_dropped_copies_go_missing() {
        let now = Instant::now();
        // A slow second path: every copy comes, 40 ms late (past the 30 ms limit, within
        // the 80 ms horizon).
        let mut slow = Reorder::default();
        slow.set_horizon(Duration::from_millis(80));
        // A small second path: two copies in three never come.
        let mut small = Reorder::default();
        small.set_horizon(Duration::from_millis(80));
        let late = Duration::from_millis(40);
        for i in 0..120u64 {
            let t = now + Duration::from_millis(i * 100);
            for r in [&mut slow, &mut small] {
                r.push(1, 3 * i, &[0], HOLD, t);
                // 3i + 1 lost on the fast path; 3i + 2 arrives.
                r.push(1, 3 * i + 2, &[2], HOLD, t);
                r.poll_expired(t + HOLD);
            }
            slow.push(1, 3 * i + 1, &[1], HOLD, t + late);
            if i % 3 == 0 {
                small.push(1, 3 * i + 1, &[1], HOLD, t + late);
            }
        }
        assert!(!slow.copies_missing(), "slow copies arrive");
        assert!(!slow.worth_holding(), "but too late to hold for");
        assert!(small.copies_missing());
        slow.reset_evidence();
        assert!(slow.worth_holding() && !slow.copies_missing());
    }

    #[test]
    fn a_gap_lost_on_both_paths_costs_at_most_the_hold_time() {
        let (mut r, now) = (Reorder::default(), Instant::now());
        r.push(1, 0, &[0], HOLD, now);
        assert_eq!(r.push(1, 2, &[2], HOLD, now), Verdict::Held);
        assert_eq!(r.push(1, 3, &[3], HOLD, now), Verdict::Held);
        assert!(
            r.poll_expired(now + HOLD - Duration::from_millis(1))
                .is_empty()
        );
        assert_eq!(r.poll_expired(now + HOLD), vec![vec![2], vec![3]]);
        // The packet given up on may still come: delivered as it is.
        assert_eq!(r.push(1, 1, &[1], HOLD, now + HOLD), deliver(&[]));
        assert_eq!(r.push(1, 4, &[4], HOLD, now + HOLD), deliver(&[]));
    }

    #[test]
    fn off_means_no_holding_and_a_new_session_starts_over() {
        let (mut r, now) = (Reorder::default(), Instant::now());
        r.push(1, 0, &[0], HOLD, now);
        assert_eq!(r.push(1, 5, &[5], HOLD, now), Verdict::Held);
        assert_eq!(r.push(1, 9, &[9], HOLD, now), Verdict::Held);
        // Turned off: a packet inside the gap flushes everything in counter order.
        assert_eq!(
            r.push(1, 7, &[7], Duration::ZERO, now),
            Verdict::Flush(vec![vec![5], vec![7], vec![9]])
        );
        assert_eq!(r.push(1, 10, &[10], Duration::ZERO, now), deliver(&[]));
        assert_eq!(r.push(1, 12, &[12], Duration::ZERO, now), deliver(&[]));
        assert_eq!(r.push(1, 14, &[14], HOLD, now), Verdict::Held);
        // Rekeyed: counters restart in another session; the old session's packets go first.
        assert_eq!(
            r.push(2, 0, &[0], HOLD, now),
            Verdict::Flush(vec![vec![14], vec![0]])
        );
        assert_eq!(r.push(2, 1, &[1], HOLD, now), deliver(&[]));
    }

    #[test]
    fn holding_stops_when_gaps_are_real_losses_and_resumes_when_copies_come() {
        let (mut r, mut now) = (Reorder::default(), Instant::now());
        let mut c = 0;
        r.push(1, c, &[], HOLD, now);
        // Gaps that never fill (the slow path drops the copies too): each costs a hold.
        for _ in 0..30 {
            c += 2;
            if r.push(1, c, &[], HOLD, now) == Verdict::Held {
                now += HOLD;
                assert_eq!(r.poll_expired(now).len(), 1);
            }
        }
        assert!(!r.worth_holding(), "no gap ever filled");
        c += 2;
        assert_eq!(
            r.push(1, c, &[], HOLD, now),
            deliver(&[]),
            "passed straight on"
        );
        // Copies start arriving late again: holding becomes worth it once they outweigh the
        // old evidence.
        for _ in 0..200 {
            r.push(1, c - 1, &[], HOLD, now + Duration::from_millis(5));
            c += 2;
            r.push(1, c, &[], HOLD, now);
        }
        assert!(r.worth_holding());
        assert_eq!(r.push(1, c + 2, &[], HOLD, now), Verdict::Held);
    }

    #[test]
    fn copies_later_than_the_hold_do_not_count_as_worth_waiting_for() {
        let (mut r, mut now) = (Reorder::default(), Instant::now());
        let mut c = 0;
        r.push(1, c, &[], HOLD, now);
        for _ in 0..100 {
            c += 2;
            if r.push(1, c, &[], HOLD, now) == Verdict::Held {
                now += HOLD;
                r.poll_expired(now);
            }
            // The copy of the missing packet comes, but later than any hold (a queued slow
            // path).
            now += MAX_HOLD + HOLD;
            r.push(1, c - 1, &[], HOLD, now);
        }
        assert!(!r.worth_holding());
    }

    #[test]
    fn the_buffer_is_bounded() {
        let (mut r, now) = (Reorder::default(), Instant::now());
        r.push(1, 0, &[0], HOLD, now);
        for c in 2..(2 + MAX_HELD as u64) {
            assert_eq!(r.push(1, c, &[], HOLD, now), Verdict::Held);
        }
        let Verdict::Flush(all) = r.push(1, 10_000, &[], HOLD, now) else {
            panic!("a full buffer gives up its gap");
        };
        assert_eq!(all.len(), MAX_HELD + 1);
        assert_eq!(r.held(), 0);
    }

    #[test]
    fn counters_come_from_data_messages_only() {
        let mut d = vec![0u8; 32];
        d[0] = 4;
        d[4..8].copy_from_slice(&7u32.to_le_bytes());
        d[8..16].copy_from_slice(&42u64.to_le_bytes());
        assert_eq!(data_counter(&d), Some((7, 42)));
        d[0] = 1;
        assert_eq!(data_counter(&d), None);
        assert_eq!(data_counter(&[4, 0, 0]), None);
    }

    fn deliver(then: &[&[u8]]) -> Verdict {
        Verdict::Deliver {
            then: then.iter().map(|p| p.to_vec()).collect(),
        }
    }
}
