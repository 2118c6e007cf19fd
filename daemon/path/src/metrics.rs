//! Per-path measurements (RTT, jitter, loss windows), the score and the switch comparator,
//! plus the small helpers the selector needs (token bucket, PRNG).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::Config;

/// RTT assumed for a path that has no RTT sample (only passive signals): pessimistic, so a
/// measured path wins over an unmeasured one of the same class.
pub const UNKNOWN_RTT: Duration = Duration::from_millis(250);
/// Loss is clamped here before scoring so the score stays finite.
const MAX_SCORED_LOSS: f64 = 0.95;

/// What the comparator knows about a path.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PathMetrics {
    /// Smoothed RTT (RFC 6298), none before the first probe reply.
    pub srtt: Option<Duration>,
    /// Mean deviation between consecutive RTT samples (RFC 3550 §6.4.1 style).
    pub jitter: Duration,
    /// Round-trip probe loss over the window, 0.0..=1.0.
    pub loss: f64,
    /// Probes in the window whose fate is known (answered or timed out).
    pub samples: u32,
    /// The local underlay's operator-given cost.
    pub cost: u32,
    /// The path goes through a relay.
    pub relay: bool,
}

/// Score of a path in milliseconds-equivalent; lower is better.
///
/// `score = (srtt + 2·jitter + score_base) / (1 − loss)² + cost · cost_weight`
///
/// `(1 − loss)⁻²` is the ETX of a round trip whose two directions each lose `loss/2`
/// (close enough for small loss, and it punishes loss harder than RTT, as TCP over the tunnel
/// does); `score_base` keeps loss mattering on very short paths (a lost packet costs at least
/// a retransmission, not 2·1 ms). `cost` turns operator preference (metered LTE vs Wi-Fi)
/// into milliseconds. Relay vs direct is not in the score: it is a class rule in [`better`].
pub fn score(m: &PathMetrics, cfg: &Config) -> f64 {
    let rtt = ms(m.srtt.unwrap_or(UNKNOWN_RTT));
    let delay = rtt + 2.0 * ms(m.jitter) + ms(cfg.score_base);
    let keep = 1.0 - m.loss.clamp(0.0, MAX_SCORED_LOSS);
    delay / (keep * keep) + f64::from(m.cost) * ms(cfg.cost_weight)
}

/// True if `candidate` is clearly better than `current`, ignoring how long it has been.
///
/// Rules, in order: a candidate needs `cfg.min_samples` decided probes; a direct path beats a
/// relayed one and a relayed one never beats a direct one; otherwise the candidate's score must
/// be lower by `max(current · switch_margin_pct %, switch_margin_abs)`, with the candidate's
/// loss taken one standard error higher and the current path's one lower.
pub fn better(candidate: &PathMetrics, current: &PathMetrics, cfg: &Config) -> bool {
    if candidate.samples < cfg.min_samples {
        return false;
    }
    match (candidate.relay, current.relay) {
        (false, true) => true,
        (true, false) => false,
        (false, false) | (true, true) => {
            // Loss estimates are noisy (a 64-probe window at 19 % loss has a standard error of
            // 5 points): judge the candidate pessimistically and the current path
            // optimistically, one standard error each, so two equal paths do not trade places
            // on noise.
            let pessimistic = PathMetrics {
                loss: candidate.loss + std_error(candidate),
                ..*candidate
            };
            let optimistic = PathMetrics {
                loss: (current.loss - std_error(current)).max(0.0),
                ..*current
            };
            let (c, a) = (score(&pessimistic, cfg), score(&optimistic, cfg));
            let margin =
                (a * f64::from(cfg.switch_margin_pct) / 100.0).max(ms(cfg.switch_margin_abs));
            c < a - margin
        }
    }
}

/// Standard error of a loss estimate from `samples` probes (with a continuity term, so a
/// clean window of few probes is not taken as proof of 0 % loss).
fn std_error(m: &PathMetrics) -> f64 {
    let n = f64::from(m.samples.max(1));
    (m.loss * (1.0 - m.loss) / n).sqrt() + 0.5 / n
}

/// True if the selector switches from `current` to `candidate` after the candidate has been
/// [`better`] for `better_for` without interruption (hysteresis: margin AND hold time).
pub fn should_switch(
    candidate: &PathMetrics,
    current: &PathMetrics,
    better_for: Duration,
    cfg: &Config,
) -> bool {
    better(candidate, current, cfg) && better_for >= cfg.switch_hold
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// RTT estimator: RFC 6298 smoothing plus RFC 3550-style jitter over RTT samples.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Rtt {
    srtt: Option<f64>,
    rttvar: f64,
    jitter: f64,
    last: Option<f64>,
}

impl Rtt {
    pub(crate) fn sample(&mut self, rtt: Duration) {
        let r = ms(rtt);
        match self.srtt {
            None => {
                self.srtt = Some(r);
                self.rttvar = r / 2.0;
            }
            Some(s) => {
                self.rttvar = 0.75 * self.rttvar + 0.25 * (s - r).abs();
                self.srtt = Some(0.875 * s + 0.125 * r);
            }
        }
        if let Some(last) = self.last {
            self.jitter += ((r - last).abs() - self.jitter) / 16.0;
        }
        self.last = Some(r);
    }

    pub(crate) fn srtt(&self) -> Option<Duration> {
        self.srtt.map(from_ms)
    }

    pub(crate) fn rttvar(&self) -> Option<Duration> {
        self.srtt.map(|_| from_ms(self.rttvar))
    }

    pub(crate) fn jitter(&self) -> Duration {
        from_ms(self.jitter)
    }

    /// When a reply is overdue: `srtt + max(4·rttvar, doubt interval)`, 1 s before any sample
    /// (RFC 6298's initial RTO), at most 3 s.
    pub(crate) fn rto(&self, cfg: &Config) -> Duration {
        let Some(s) = self.srtt else {
            return Duration::from_secs(1);
        };
        let var = (4.0 * self.rttvar).max(ms(cfg.doubt_probe_interval));
        from_ms(s + var).min(Duration::from_secs(3))
    }
}

fn from_ms(v: f64) -> Duration {
    Duration::from_secs_f64((v / 1000.0).max(0.0))
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    seq: u32,
    sent_at: Instant,
    acked: bool,
    /// Sent while the path was not up: an outage, not link loss (see
    /// [`LossWindow::excuse_unanswered`]).
    excused: bool,
}

/// Fate of the last `cap` probes sent on a path (sequence numbers are consecutive per path,
/// so an ack finds its slot by subtraction).
#[derive(Debug, Clone)]
pub(crate) struct LossWindow {
    slots: VecDeque<Slot>,
    cap: usize,
}

impl LossWindow {
    pub(crate) fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        Self {
            slots: VecDeque::with_capacity(cap),
            cap,
        }
    }

    pub(crate) fn on_sent(&mut self, seq: u32, now: Instant) {
        if self.slots.len() >= self.cap {
            self.slots.pop_front();
        }
        self.slots.push_back(Slot {
            seq,
            sent_at: now,
            acked: false,
            excused: false,
        });
    }

    /// Marks `seq` answered; returns its send time the first time only.
    pub(crate) fn on_ack(&mut self, seq: u32) -> Option<Instant> {
        let front = self.slots.front()?.seq;
        let idx = usize::try_from(seq.wrapping_sub(front)).ok()?;
        let slot = self.slots.get_mut(idx)?;
        if slot.seq != seq || slot.acked {
            return None;
        }
        slot.acked = true;
        Some(slot.sent_at)
    }

    /// Takes the probes still unanswered out of the loss estimate. Called when a path that
    /// was not up (down, or never up) comes up: its probes went unanswered because the path
    /// did not work at all, which liveness already accounts for. Counted as loss they would
    /// keep a healed path's score bad for a whole window (64 probes: minutes at the standby
    /// rate), and it would never win back. A late answer still counts as a reply.
    pub(crate) fn excuse_unanswered(&mut self) {
        for s in self.slots.iter_mut().filter(|s| !s.acked) {
            s.excused = true;
        }
    }

    /// (lost, decided): a probe is lost once unanswered for `timeout`.
    pub(crate) fn loss(&self, now: Instant, timeout: Duration) -> (u32, u32) {
        let (mut lost, mut decided) = (0, 0);
        for s in &self.slots {
            if s.acked {
                decided += 1;
            } else if s.excused {
            } else if now.saturating_duration_since(s.sent_at) >= timeout {
                decided += 1;
                lost += 1;
            }
        }
        (lost, decided)
    }
}

/// Which of the peer's last 64 ping sequence numbers arrived on a path (inbound loss).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RxWindow {
    tag: u32,
    highest: Option<u32>,
    first: u32,
    bits: u64,
}

impl RxWindow {
    pub(crate) fn on_ping(&mut self, tag: u32, seq: u32) {
        let Some(high) = self.highest.filter(|_| self.tag == tag) else {
            *self = Self {
                tag,
                highest: Some(seq),
                first: seq,
                bits: 1,
            };
            return;
        };
        let ahead = seq.wrapping_sub(high);
        if ahead == 0 {
        } else if ahead < 1 << 31 {
            self.bits = self.bits.checked_shl(ahead).unwrap_or(0) | 1;
            self.highest = Some(seq);
        } else {
            let behind = high.wrapping_sub(seq);
            if behind < 64 {
                self.bits |= 1 << behind;
            }
        }
    }

    /// Inbound loss over the window, once 8 sequence numbers are covered.
    pub(crate) fn loss(&self) -> Option<f64> {
        let high = self.highest?;
        let span = u64::from(high.wrapping_sub(self.first))
            .saturating_add(1)
            .min(64);
        if span < 8 {
            return None;
        }
        let mask = if span >= 64 {
            u64::MAX
        } else {
            (1 << span) - 1
        };
        let got = (self.bits & mask).count_ones();
        Some(1.0 - f64::from(got) / span as f64)
    }
}

/// Token bucket in bytes. Low-priority takes leave half the capacity for high-priority ones.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Bucket {
    rate: f64,
    cap: f64,
    tokens: f64,
    last: Instant,
}

/// Smallest bucket capacity: enough for the largest probe message twice, so a low-priority
/// take (which keeps half the bucket in reserve) can ever succeed.
pub const MIN_BUCKET_BYTES: u32 = 1024;

impl Bucket {
    pub(crate) fn new(rate: u32, now: Instant) -> Self {
        let cap = f64::from(rate.max(MIN_BUCKET_BYTES));
        Self {
            rate: f64::from(rate),
            cap,
            tokens: cap,
            last: now,
        }
    }

    pub(crate) fn capacity(&self) -> u32 {
        // cap is built from a u32.
        self.cap as u32
    }

    /// Takes `cost` bytes, or says how long until it could.
    pub(crate) fn try_take(
        &mut self,
        cost: usize,
        high: bool,
        now: Instant,
    ) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.cap);
        self.last = now.max(self.last);
        let cost = cost as f64;
        let need = if high { cost } else { cost + self.cap / 2.0 };
        if self.tokens >= need {
            self.tokens -= cost;
            return Ok(());
        }
        if self.rate <= 0.0 {
            return Err(Duration::from_secs(3600));
        }
        let wait = (need - self.tokens) / self.rate;
        Err(Duration::from_secs_f64(wait.min(3600.0)).max(Duration::from_millis(1)))
    }
}

/// splitmix64: jitter for probe timers (no cryptographic use).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: [u8; 32]) -> Self {
        let mut s = 0u64;
        for (i, b) in seed.iter().enumerate() {
            s ^= u64::from(*b) << (8 * (i % 8));
            if i % 8 == 7 {
                s = s.rotate_left(17).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            }
        }
        Self(s)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// `d` scaled by a uniform factor in `1 ± pct/100`.
    pub(crate) fn jitter(&mut self, d: Duration, pct: u8) -> Duration {
        if pct == 0 {
            return d;
        }
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let f = 1.0 + (unit * 2.0 - 1.0) * f64::from(pct.min(90)) / 100.0;
        d.mul_f64(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtt_follows_rfc6298() {
        let mut r = Rtt::default();
        r.sample(Duration::from_millis(100));
        assert_eq!(r.srtt(), Some(Duration::from_millis(100)));
        assert_eq!(r.rttvar(), Some(Duration::from_millis(50)));
        r.sample(Duration::from_millis(200));
        // rttvar = 3/4·50 + 1/4·100 = 62.5; srtt = 7/8·100 + 1/8·200 = 112.5
        assert_eq!(r.srtt(), Some(Duration::from_micros(112_500)));
        assert_eq!(r.rttvar(), Some(Duration::from_micros(62_500)));
        assert_eq!(r.jitter(), Duration::from_micros(6_250));
    }

    #[test]
    fn loss_window_counts_timeouts_and_ignores_duplicates() {
        let t0 = Instant::now();
        let mut w = LossWindow::new(4);
        for seq in 0..6 {
            w.on_sent(seq, t0 + Duration::from_millis(u64::from(seq) * 10));
        }
        assert_eq!(w.on_ack(0), None, "evicted");
        assert!(w.on_ack(3).is_some());
        assert_eq!(w.on_ack(3), None, "duplicate");
        let later = t0 + Duration::from_secs(10);
        assert_eq!(w.loss(later, Duration::from_secs(1)), (3, 4));
        assert_eq!(w.loss(t0, Duration::from_secs(1)), (0, 1));
    }

    #[test]
    fn excused_probes_are_not_loss_but_late_answers_count() {
        let t0 = Instant::now();
        let mut w = LossWindow::new(8);
        for seq in 0..4 {
            w.on_sent(seq, t0);
        }
        assert!(w.on_ack(0).is_some());
        w.excuse_unanswered();
        assert!(w.on_ack(3).is_some(), "a late answer to an excused probe");
        w.on_sent(4, t0);
        let later = t0 + Duration::from_secs(10);
        assert_eq!(w.loss(later, Duration::from_secs(1)), (1, 3));
    }

    #[test]
    fn rx_window_measures_gaps() {
        let mut w = RxWindow::default();
        for seq in (0..64).filter(|s| s % 4 != 1) {
            w.on_ping(1, seq);
        }
        assert_eq!(w.loss(), Some(0.25));
        w.on_ping(2, 0);
        assert_eq!(w.loss(), None, "new tag restarts");
    }

    #[test]
    fn bucket_reserves_half_for_high_priority() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1000, t0);
        assert!(b.try_take(400, false, t0).is_ok());
        assert!(b.try_take(400, false, t0).is_err());
        assert!(b.try_take(400, true, t0).is_ok());
        let wait = b.try_take(400, true, t0).unwrap_err();
        // Capacity is max(rate, MIN_BUCKET_BYTES) = 1024: 224 left, 176 missing at 1000 B/s.
        assert_eq!(wait, Duration::from_millis(176));
        assert!(b.try_take(400, true, t0 + wait).is_ok());
    }

    #[test]
    fn jitter_stays_in_range_and_is_seeded() {
        let mut a = Rng::new([1; 32]);
        let mut b = Rng::new([1; 32]);
        for _ in 0..1000 {
            let d = a.jitter(Duration::from_secs(2), 20);
            assert_eq!(d, b.jitter(Duration::from_secs(2), 20));
            assert!(d >= Duration::from_millis(1600) && d <= Duration::from_millis(2400));
        }
    }
}
