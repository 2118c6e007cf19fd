//! A receive-side reorder buffer for peers sending on two paths (redundant mode).
//!
//! In redundant mode every datagram travels a fast and a slow path; the receiver keeps the
//! first copy. When the fast path loses a burst, the slow path's copies of those packets
//! arrive *after* packets sent later, and TCP reads the hole as loss: it retransmits
//! spuriously and shrinks its window, although nothing was lost. The buffer restores the
//! sender's order using WireGuard's own per-session counter (every data message carries it,
//! in order of sending): a packet that arrives after a gap is held until the gap is filled or
//! for at most `hold` (about the two paths' delay difference), then released in counter order.
//! A gap that never fills (lost on both paths) costs at most `hold` of extra delay.
//!
//! Pure logic: time comes in as `now`; the shell writes what [`Reorder::push`] and
//! [`Reorder::poll_expired`] return to the TUN device.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Most packets held per peer; past this the oldest gap is given up.
const MAX_HELD: usize = 256;

/// One peer's buffer.
#[derive(Debug, Default)]
pub struct Reorder {
    /// The session (our receiver index) the counters belong to.
    session: Option<u32>,
    /// The next counter to deliver.
    next: u64,
    /// Packets that arrived ahead of a gap: counter → (deadline, bytes).
    held: BTreeMap<u64, (Instant, Vec<u8>)>,
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
    /// Takes a decrypted packet with its WireGuard session and counter. `hold` is how long a
    /// packet may wait for a gap before it (zero: the buffer is off and only drains).
    pub fn push(
        &mut self,
        session: u32,
        counter: u64,
        packet: &[u8],
        hold: Duration,
        now: Instant,
    ) -> Verdict {
        if self.session != Some(session) {
            // A new session starts its counters at 0; what is held belongs to the old one
            // and goes out first.
            self.session = Some(session);
            self.next = counter + 1;
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
        if counter < self.next {
            // A late copy filling a gap already given up, or an old packet: deliver as is.
            return Verdict::Deliver { then: Vec::new() };
        }
        if counter == self.next {
            self.next += 1;
            return Verdict::Deliver {
                then: self.release_ready(),
            };
        }
        // A gap before this packet.
        if hold.is_zero() || self.held.len() >= MAX_HELD {
            // Off (or full): give the gap up; what is held goes out in counter order, this
            // packet among it.
            if self.held.is_empty() {
                self.next = counter + 1;
                return Verdict::Deliver { then: Vec::new() };
            }
            self.held.insert(counter, (now, packet.to_vec()));
            let all: Vec<(u64, Vec<u8>)> = std::mem::take(&mut self.held)
                .into_iter()
                .map(|(c, (_, p))| (c, p))
                .collect();
            self.next = all.last().map_or(counter, |(c, _)| *c) + 1;
            return Verdict::Flush(all.into_iter().map(|(_, p)| p).collect());
        }
        self.held
            .entry(counter)
            .or_insert_with(|| (now + hold, packet.to_vec()));
        Verdict::Held
    }

    /// Releases packets whose wait is over (skipping the gaps before them), in counter order.
    pub fn poll_expired(&mut self, now: Instant) -> Vec<Vec<u8>> {
        let Some((&first, (deadline, _))) = self.held.iter().next() else {
            return Vec::new();
        };
        if *deadline > now {
            return Vec::new();
        }
        self.next = first;
        self.release_ready()
    }

    /// The earliest deadline of a held packet.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.held.values().map(|(d, _)| *d).min()
    }

    /// Packets held right now.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.held.len()
    }

    fn release_ready(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some((_, p)) = self.held.remove(&self.next) {
            out.push(p);
            self.next += 1;
        }
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
