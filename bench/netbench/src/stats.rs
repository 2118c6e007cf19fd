//! Statistics (pure): sequence accounting, RFC 3550 jitter and latency summaries.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Sequence numbers remembered for duplicate detection. Older packets count as duplicates
/// if they fall behind the window: a bounded window keeps per-session memory fixed.
pub const SEQ_WINDOW: u64 = 8192;

/// Accounts received sequence numbers: distinct, duplicates and reordered packets.
///
/// A packet is *reordered* when a packet with a higher sequence number arrived before it
/// (RFC 4737's "reordered" singleton). Memory is a fixed bitmap of [`SEQ_WINDOW`] bits.
#[derive(Debug, Clone)]
pub struct SeqTracker {
    bits: Vec<u64>,
    /// Highest sequence seen + 1 (0 = none yet).
    next: u64,
    pub received: u64,
    pub unique: u64,
    pub duplicates: u64,
    pub reordered: u64,
}

impl Default for SeqTracker {
    fn default() -> Self {
        Self {
            bits: vec![0; (SEQ_WINDOW / 64) as usize],
            next: 0,
            received: 0,
            unique: 0,
            duplicates: 0,
            reordered: 0,
        }
    }
}

impl SeqTracker {
    /// Records one arrival; returns false for a duplicate.
    pub fn record(&mut self, seq: u64) -> bool {
        self.received += 1;
        if seq >= self.next {
            // Clear the bits of sequence numbers skipped over: they are new in the window.
            let from = self.next.max(seq.saturating_sub(SEQ_WINDOW - 1));
            for s in from..seq {
                self.set(s, false);
            }
            self.set(seq, true);
            self.next = seq + 1;
            self.unique += 1;
            return true;
        }
        if self.next - seq >= SEQ_WINDOW || self.get(seq) {
            self.duplicates += 1;
            return false;
        }
        self.set(seq, true);
        self.unique += 1;
        self.reordered += 1;
        true
    }

    /// Packets lost out of `sent` (never negative).
    pub fn lost(&self, sent: u64) -> u64 {
        sent.saturating_sub(self.unique)
    }

    fn get(&self, seq: u64) -> bool {
        let i = seq % SEQ_WINDOW;
        self.bits[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, seq: u64, v: bool) {
        let i = seq % SEQ_WINDOW;
        let w = &mut self.bits[(i / 64) as usize];
        if v {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
    }
}

/// RFC 3550 §6.4.1 interarrival jitter: J += (|D| − J)/16 with
/// D = (R_j − R_i) − (S_j − S_i) for consecutive arrivals; clocks need not agree.
#[derive(Debug, Clone, Copy, Default)]
pub struct Jitter {
    last: Option<(i128, i128)>,
    j: f64,
}

impl Jitter {
    pub fn record(&mut self, send_ns: u64, recv_ns: u64) {
        let (s, r) = (i128::from(send_ns), i128::from(recv_ns));
        if let Some((ls, lr)) = self.last {
            let d = ((r - lr) - (s - ls)).unsigned_abs() as f64;
            self.j += (d - self.j) / 16.0;
        }
        self.last = Some((s, r));
    }

    pub fn ns(&self) -> u64 {
        self.j as u64
    }
}

/// Round-trip samples with an hdrhistogram (1 µs … 60 s, 3 significant digits).
pub struct Latency {
    pub hist: Histogram<u64>,
    prev: Option<u64>,
    ipdv_sum: u128,
    ipdv_n: u64,
    jitter: f64,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Self {
        // 1 ns .. 60 s at 3 significant digits: the bounds are constants, so this cannot fail.
        #[allow(clippy::unwrap_used)]
        let hist = Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap();
        Self {
            hist,
            prev: None,
            ipdv_sum: 0,
            ipdv_n: 0,
            jitter: 0.0,
        }
    }

    /// Records one round trip in nanoseconds, in the order the replies arrived.
    pub fn record(&mut self, rtt_ns: u64) {
        self.hist.saturating_record(rtt_ns.max(1));
        if let Some(p) = self.prev {
            let d = rtt_ns.abs_diff(p);
            self.ipdv_sum += u128::from(d);
            self.ipdv_n += 1;
            self.jitter += (d as f64 - self.jitter) / 16.0;
        }
        self.prev = Some(rtt_ns);
    }

    pub fn summary(&self) -> LatencySummary {
        let h = &self.hist;
        if h.is_empty() {
            return LatencySummary::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        LatencySummary {
            samples: h.len(),
            min_us: us(h.min()),
            mean_us: h.mean() / 1000.0,
            median_us: us(h.value_at_quantile(0.5)),
            p90_us: us(h.value_at_quantile(0.9)),
            p99_us: us(h.value_at_quantile(0.99)),
            max_us: us(h.max()),
            stdev_us: h.stdev() / 1000.0,
            ipdv_us: if self.ipdv_n > 0 {
                self.ipdv_sum as f64 / self.ipdv_n as f64 / 1000.0
            } else {
                0.0
            },
            jitter_us: self.jitter / 1000.0,
        }
    }

    /// (upper bound µs, count) buckets for plotting, `n` linear buckets from min to p99.9.
    pub fn buckets(&self, n: usize) -> Vec<(f64, u64)> {
        let h = &self.hist;
        if h.is_empty() || n == 0 {
            return Vec::new();
        }
        let lo = h.min();
        let hi = h.value_at_quantile(0.999).max(lo + 1);
        let step = ((hi - lo) / n as u64).max(1);
        h.iter_linear(step)
            .skip_while(|v| v.value_iterated_to() + step < lo)
            .take_while(|v| v.value_iterated_to() <= hi + step)
            .map(|v| {
                (
                    v.value_iterated_to() as f64 / 1000.0,
                    v.count_since_last_iteration(),
                )
            })
            .collect()
    }
}

/// Latency figures, microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct LatencySummary {
    pub samples: u64,
    pub min_us: f64,
    pub mean_us: f64,
    pub median_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub stdev_us: f64,
    /// Mean absolute difference of consecutive round trips (IPDV, as irtt reports it).
    pub ipdv_us: f64,
    /// RFC 3550-style smoothed variation of consecutive round trips.
    pub jitter_us: f64,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn in_order_stream_has_no_loss_or_reordering() {
        let mut t = SeqTracker::default();
        for s in 0..20_000 {
            assert!(t.record(s));
        }
        assert_eq!(
            (t.unique, t.duplicates, t.reordered, t.lost(20_000)),
            (20_000, 0, 0, 0)
        );
    }

    #[test]
    fn loss_reorder_and_duplicates_are_told_apart() {
        let mut t = SeqTracker::default();
        for s in [0, 1, 3, 2, 2, 5, 5, 7, 6] {
            t.record(s);
        }
        // Seen: 0 1 2 3 5 6 7; lost: 4 (of 8 sent).
        assert_eq!(t.unique, 7);
        assert_eq!(t.duplicates, 2);
        assert_eq!(t.reordered, 2);
        assert_eq!(t.lost(8), 1);
        assert_eq!(t.received, 9);
    }

    #[test]
    fn window_wraps_without_false_duplicates() {
        let mut t = SeqTracker::default();
        // Skip far ahead: the bits of the old window must not make new packets look seen.
        for s in 0..100 {
            t.record(s);
        }
        t.record(SEQ_WINDOW + 50);
        assert!(
            t.record(SEQ_WINDOW + 10),
            "late but within the window: reordered, not dup"
        );
        assert_eq!(t.reordered, 1);
        assert!(!t.record(3), "behind the window counts as duplicate");
        assert_eq!(t.duplicates, 1);
    }

    #[test]
    fn rfc3550_jitter_converges_to_constant_deviation() {
        let mut j = Jitter::default();
        // Sent every 10 ms; arrivals alternate 1 ms early/late, so |D| = 2 ms each time.
        for i in 0..500u64 {
            let send = i * 10_000_000;
            let recv = send + 5_000_000 + if i % 2 == 0 { 1_000_000 } else { 0 };
            j.record(send, recv);
        }
        assert!((j.ns() as i64 - 1_000_000).abs() < 1_000, "{}", j.ns());
        // Constant transit: zero jitter whatever the clock offset.
        let mut j = Jitter::default();
        for i in 0..100u64 {
            j.record(i * 1000, i * 1000 + 123_456_789);
        }
        assert_eq!(j.ns(), 0);
    }

    #[test]
    fn latency_percentiles() {
        let mut l = Latency::new();
        for v in 1..=1000u64 {
            l.record(v * 1000); // 1..1000 µs
        }
        let s = l.summary();
        assert_eq!(s.samples, 1000);
        assert!((s.min_us - 1.0).abs() < 0.01);
        assert!((s.median_us - 500.0).abs() < 1.0, "{}", s.median_us);
        assert!((s.p90_us - 900.0).abs() < 1.0);
        assert!((s.p99_us - 990.0).abs() < 1.0);
        assert!((s.max_us - 1000.0).abs() < 1.0);
        assert!((s.mean_us - 500.5).abs() < 1.0);
        assert!((s.ipdv_us - 1.0).abs() < 0.01);
        assert!(!l.buckets(20).is_empty());
        assert_eq!(Latency::new().summary(), LatencySummary::default());
    }
}
