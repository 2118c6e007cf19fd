//! The link model: what happens to each packet on one direction of an emulated link.
//!
//! Pure and deterministic: it takes `now` and a seeded random source and says, per packet,
//! whether and when it leaves (possibly twice). Order of effects, as on a real path: the link
//! must be up; packets over the MTU are dropped; random loss (Bernoulli or Gilbert-Elliott
//! bursts); the rate limiter serialises packets into a bounded queue (tail drop when full);
//! then propagation delay plus jitter; duplication last. Without `reorder`, jitter never lets
//! a packet overtake the one before it (as on a single physical path); with it, it may.

use std::time::Duration;

/// A small, fast, seedable random source (SplitMix64): the emulator must be reproducible.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }
}

/// Loss model.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Loss {
    #[default]
    None,
    /// Each packet lost independently with probability `p`.
    Bernoulli { p: f64 },
    /// Gilbert-Elliott: a good and a bad state with their own loss probabilities and
    /// per-packet transition probabilities (good→bad `p`, bad→good `r`). Mean burst length is
    /// 1/r packets; stationary share of bad is p/(p+r).
    GilbertElliott {
        p: f64,
        r: f64,
        loss_good: f64,
        loss_bad: f64,
    },
}

impl Loss {
    /// Long-run loss rate.
    pub fn mean(&self) -> f64 {
        match *self {
            Loss::None => 0.0,
            Loss::Bernoulli { p } => p,
            Loss::GilbertElliott {
                p,
                r,
                loss_good,
                loss_bad,
            } => {
                let bad = if p + r > 0.0 { p / (p + r) } else { 0.0 };
                bad * loss_bad + (1.0 - bad) * loss_good
            }
        }
    }
}

/// One direction of a link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    pub delay: Duration,
    /// Delay varies uniformly in ±jitter.
    pub jitter: Duration,
    /// Let jitter reorder packets.
    pub reorder: bool,
    pub loss: Loss,
    /// Probability a packet is delivered twice.
    pub duplicate: f64,
    /// Bits per second; 0 = unlimited.
    pub rate_bps: u64,
    /// Queue in front of the rate limiter, in bytes; packets that do not fit are dropped.
    pub queue_bytes: u64,
    /// Largest frame payload (IP packet) that passes; 0 = unlimited.
    pub mtu: u32,
    pub up: bool,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            reorder: false,
            loss: Loss::None,
            duplicate: 0.0,
            rate_bps: 0,
            queue_bytes: 256 * 1024,
            mtu: 0,
            up: true,
        }
    }
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    Down,
    Mtu,
    Loss,
    Queue,
}

/// Per-direction counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    pub forwarded: u64,
    pub duplicated: u64,
    pub dropped_down: u64,
    pub dropped_mtu: u64,
    pub dropped_loss: u64,
    pub dropped_queue: u64,
    pub bytes: u64,
}

/// What to do with one packet: deliver at these times (nanoseconds on the caller's clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Drop(Drop),
    Deliver { at: u64, again: Option<u64> },
}

/// The state of one direction of a link.
#[derive(Debug, Clone)]
pub struct Direction {
    pub params: Params,
    rng: Rng,
    bad_state: bool,
    /// When the rate limiter finishes sending what it has accepted.
    busy_until: u64,
    /// Departure of the latest packet (for order keeping).
    last_departure: u64,
    pub counters: Counters,
}

impl Direction {
    pub fn new(params: Params, seed: u64) -> Self {
        Self {
            params,
            rng: Rng::new(seed),
            bad_state: false,
            busy_until: 0,
            last_departure: 0,
            counters: Counters::default(),
        }
    }

    /// Decides the fate of a packet of `len` bytes (IP packet, L2 header excluded) arriving at
    /// `now_ns`.
    pub fn handle(&mut self, now_ns: u64, len: usize) -> Verdict {
        let p = self.params;
        if !p.up {
            self.counters.dropped_down += 1;
            return Verdict::Drop(Drop::Down);
        }
        if p.mtu > 0 && len > p.mtu as usize {
            self.counters.dropped_mtu += 1;
            return Verdict::Drop(Drop::Mtu);
        }
        if self.lost() {
            self.counters.dropped_loss += 1;
            return Verdict::Drop(Drop::Loss);
        }
        let mut depart = now_ns;
        if p.rate_bps > 0 {
            let start = self.busy_until.max(now_ns);
            let backlog_ns = start - now_ns;
            let backlog_bytes = backlog_ns as u128 * u128::from(p.rate_bps) / 8 / 1_000_000_000;
            if backlog_bytes + len as u128 > u128::from(p.queue_bytes) {
                self.counters.dropped_queue += 1;
                return Verdict::Drop(Drop::Queue);
            }
            let tx_ns = (len as u128 * 8 * 1_000_000_000 / u128::from(p.rate_bps)) as u64;
            self.busy_until = start + tx_ns;
            depart = self.busy_until;
        }
        let mut at = depart + p.delay.as_nanos() as u64;
        if !p.jitter.is_zero() {
            let j = p.jitter.as_nanos() as f64;
            let offset = (self.rng.unit() * 2.0 - 1.0) * j;
            at = (at as f64 + offset).max(depart as f64) as u64;
        }
        if !p.reorder {
            at = at.max(self.last_departure);
        }
        self.last_departure = self.last_departure.max(at);
        self.counters.forwarded += 1;
        self.counters.bytes += len as u64;
        let again = if self.rng.chance(p.duplicate) {
            self.counters.duplicated += 1;
            Some(at)
        } else {
            None
        };
        Verdict::Deliver { at, again }
    }

    fn lost(&mut self) -> bool {
        match self.params.loss {
            Loss::None => false,
            Loss::Bernoulli { p } => self.rng.chance(p),
            Loss::GilbertElliott {
                p,
                r,
                loss_good,
                loss_bad,
            } => {
                // Transition, then lose with the new state's probability.
                if self.bad_state {
                    if self.rng.chance(r) {
                        self.bad_state = false;
                    }
                } else if self.rng.chance(p) {
                    self.bad_state = true;
                }
                let l = if self.bad_state { loss_bad } else { loss_good };
                self.rng.chance(l)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const MS: u64 = 1_000_000;

    fn run(params: Params, n: usize, gap_ns: u64, len: usize) -> (Direction, Vec<Verdict>) {
        let mut d = Direction::new(params, 42);
        let v = (0..n).map(|i| d.handle(i as u64 * gap_ns, len)).collect();
        (d, v)
    }

    #[test]
    fn delay_is_exact_without_jitter() {
        let p = Params {
            delay: Duration::from_millis(50),
            ..Params::default()
        };
        let (_, v) = run(p, 3, MS, 100);
        assert_eq!(
            v[1],
            Verdict::Deliver {
                at: MS + 50 * MS,
                again: None
            }
        );
    }

    #[test]
    fn bernoulli_loss_rate() {
        let p = Params {
            loss: Loss::Bernoulli { p: 0.1 },
            ..Params::default()
        };
        let (d, _) = run(p, 100_000, MS, 100);
        let rate = d.counters.dropped_loss as f64 / 100_000.0;
        assert!((rate - 0.1).abs() < 0.005, "{rate}");
    }

    #[test]
    fn gilbert_elliott_mean_and_bursts() {
        let loss = Loss::GilbertElliott {
            p: 0.01,
            r: 0.2,
            loss_good: 0.0,
            loss_bad: 1.0,
        };
        let p = Params {
            loss,
            ..Params::default()
        };
        let (_, v) = run(p, 200_000, MS, 100);
        let lost: Vec<bool> = v
            .iter()
            .map(|x| matches!(x, Verdict::Drop(Drop::Loss)))
            .collect();
        let rate = lost.iter().filter(|l| **l).count() as f64 / lost.len() as f64;
        assert!(
            (rate - loss.mean()).abs() < 0.01,
            "rate {rate} vs {}",
            loss.mean()
        );
        // Mean burst length 1/r = 5 packets.
        let bursts = lost.windows(2).filter(|w| !w[0] && w[1]).count();
        let mean_burst = lost.iter().filter(|l| **l).count() as f64 / bursts as f64;
        assert!((mean_burst - 5.0).abs() < 0.5, "{mean_burst}");
    }

    #[test]
    fn rate_limit_serialises_and_queue_overflows() {
        // 8 Mbit/s: a 1000-byte packet takes 1 ms on the wire. Queue of 4 packets.
        let p = Params {
            rate_bps: 8_000_000,
            queue_bytes: 4000,
            ..Params::default()
        };
        let mut d = Direction::new(p, 1);
        let mut at = Vec::new();
        for _ in 0..6 {
            at.push(d.handle(0, 1000));
        }
        assert_eq!(
            at[0],
            Verdict::Deliver {
                at: MS,
                again: None
            }
        );
        assert_eq!(
            at[3],
            Verdict::Deliver {
                at: 4 * MS,
                again: None
            }
        );
        assert_eq!(at[4], Verdict::Drop(Drop::Queue));
        assert_eq!(d.counters.dropped_queue, 2);
        // Long-run throughput equals the rate.
        let (d, v) = run(
            Params {
                rate_bps: 8_000_000,
                queue_bytes: 1 << 30,
                ..Params::default()
            },
            1000,
            0,
            1000,
        );
        let Verdict::Deliver { at: last, .. } = v[999] else {
            panic!()
        };
        assert_eq!(last, 1000 * MS);
        assert_eq!(d.counters.forwarded, 1000);
    }

    #[test]
    fn jitter_keeps_order_unless_reordering_is_allowed() {
        let base = Params {
            delay: Duration::from_millis(20),
            jitter: Duration::from_millis(10),
            ..Params::default()
        };
        let (_, v) = run(base, 5000, 100_000, 100);
        let times: Vec<u64> = v
            .iter()
            .filter_map(|x| {
                if let Verdict::Deliver { at, .. } = x {
                    Some(*at)
                } else {
                    None
                }
            })
            .collect();
        assert!(
            times.windows(2).all(|w| w[0] <= w[1]),
            "no reordering without reorder"
        );
        let (_, v) = run(
            Params {
                reorder: true,
                ..base
            },
            5000,
            100_000,
            100,
        );
        let times: Vec<u64> = v
            .iter()
            .filter_map(|x| {
                if let Verdict::Deliver { at, .. } = x {
                    Some(*at)
                } else {
                    None
                }
            })
            .collect();
        assert!(
            times.windows(2).any(|w| w[0] > w[1]),
            "reordering with reorder"
        );
        for (i, t) in times.iter().enumerate() {
            let sent = i as u64 * 100_000;
            assert!(
                *t >= sent + 10 * MS && *t <= sent + 30 * MS,
                "delay within 20 ± 10 ms"
            );
        }
    }

    #[test]
    fn mtu_down_and_duplicates() {
        let (d, v) = run(
            Params {
                mtu: 1000,
                ..Params::default()
            },
            1,
            MS,
            1001,
        );
        assert_eq!(v[0], Verdict::Drop(Drop::Mtu));
        assert_eq!(d.counters.dropped_mtu, 1);
        let (_, v) = run(
            Params {
                up: false,
                ..Params::default()
            },
            3,
            MS,
            10,
        );
        assert!(v.iter().all(|x| *x == Verdict::Drop(Drop::Down)));
        let (d, _) = run(
            Params {
                duplicate: 0.25,
                ..Params::default()
            },
            10_000,
            MS,
            10,
        );
        let rate = d.counters.duplicated as f64 / 10_000.0;
        assert!((rate - 0.25).abs() < 0.02, "{rate}");
    }

    #[test]
    fn same_seed_same_fate() {
        let p = Params {
            loss: Loss::Bernoulli { p: 0.3 },
            jitter: Duration::from_millis(5),
            ..Params::default()
        };
        assert_eq!(run(p, 1000, MS, 100).1, run(p, 1000, MS, 100).1);
    }
}
