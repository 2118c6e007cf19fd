//! The emulated network (pure, sans-IO): N ports joined by a learning switch whose every
//! ordered pair of ports is one direction of an emulated link.
//!
//! The I/O shell feeds it Ethernet frames with `handle_frame(now, port, frame)`, runs
//! `handle_timeout(now)` when `poll_timeout()` says so, and writes out whatever
//! `poll_transmit(now)` returns. Time is nanoseconds on the caller's clock; randomness comes
//! from the seed, so a run is reproducible. Invariants: a frame never goes back out of the
//! port it came in on; the bytes held in flight never exceed [`MAX_IN_FLIGHT`].

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::impair::{Counters, Direction, Params, Verdict};
use super::profile::{self, SpecError};

/// Why a link selector, a setting or a schedule was rejected.
#[derive(Debug, Error)]
pub enum FabricError {
    #[error("unknown node {name:?} (nodes: {nodes})")]
    UnknownNode { name: String, nodes: String },
    #[error("link {0:?}: expected a-b, a>b, a-* or *")]
    Selector(String),
    #[error("link {0:?} joins a node to itself")]
    SelfLink(String),
    #[error("no link selected by {0:?}")]
    NoLink(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("schedule {text:?}: {reason}")]
    Schedule { text: String, reason: &'static str },
    #[error("schedule {text:?}")]
    ScheduleSpec {
        text: String,
        #[source]
        source: SpecError,
    },
}

/// Upper bound on bytes held in delay lines and queues, whatever the link settings.
pub const MAX_IN_FLIGHT: usize = 256 << 20;

/// A change applied at a point in time, optionally repeated (`every`) for flaps.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduledChange {
    pub at: Duration,
    pub every: Option<Duration>,
    pub links: String,
    pub spec: String,
}

impl ScheduledChange {
    /// Parses `AT[/EVERY] LINKS SPEC...`, e.g. `5s n1-n2 down` or `2s/10s n1-* loss=50%`.
    pub fn parse(s: &str) -> Result<Self, FabricError> {
        let fail = |reason| FabricError::Schedule {
            text: s.to_owned(),
            reason,
        };
        let spec_err = |source| FabricError::ScheduleSpec {
            text: s.to_owned(),
            source,
        };
        let mut it = s.split_whitespace();
        let (Some(when), Some(links)) = (it.next(), it.next()) else {
            return Err(fail("expected `AT[/EVERY] LINKS SETTINGS...`"));
        };
        let spec = it.collect::<Vec<_>>().join(" ");
        if spec.is_empty() {
            return Err(fail("no settings"));
        }
        let (at, every) = match when.split_once('/') {
            Some((a, e)) => (a, Some(e)),
            None => (when, None),
        };
        let time = |t: &str| {
            profile::duration(t).map_err(|source| {
                spec_err(SpecError::Value {
                    token: t.to_owned(),
                    source,
                })
            })
        };
        let at = time(at)?;
        let every = every.map(time).transpose()?;
        if every.is_some_and(|e| e.is_zero()) {
            return Err(fail("period must be positive"));
        }
        profile::apply(Params::default(), &spec).map_err(spec_err)?;
        Ok(Self {
            at,
            every,
            links: links.to_owned(),
            spec,
        })
    }
}

/// Statistics of one direction of a link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkStats {
    /// `a>b`.
    pub link: String,
    #[serde(flatten)]
    pub counters: Counters,
    /// Frames accepted but not yet delivered.
    pub queued: u64,
    pub settings: String,
}

/// The switch and its links.
pub struct Fabric {
    names: Vec<String>,
    /// Largest IP packet each port's interface takes (0 = any): a real segment does not
    /// deliver frames larger than the receiver's MTU, and veth would let a few bytes over by.
    port_mtu: Vec<u32>,
    /// Index `from * n + to`.
    dirs: Vec<Direction>,
    queued: Vec<u64>,
    macs: BTreeMap<[u8; 6], usize>,
    heap: BinaryHeap<Reverse<Pending>>,
    seq: u64,
    in_flight: usize,
    start_ns: u64,
    schedule: Vec<(u64, ScheduledChange)>,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Pending {
    at: u64,
    seq: u64,
    dir: usize,
    frame: Vec<u8>,
}

impl Fabric {
    /// A fabric of the named ports, every link with `default` parameters, direction `i`
    /// seeded from `seed` and its index so that links are independent.
    pub fn new(names: Vec<String>, default: Params, seed: u64, now_ns: u64) -> Self {
        let n = names.len();
        let dirs = (0..n * n)
            .map(|i| {
                Direction::new(
                    default,
                    seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                )
            })
            .collect();
        Self {
            port_mtu: vec![0; n],
            names,
            dirs,
            queued: vec![0; n * n],
            macs: BTreeMap::new(),
            heap: BinaryHeap::new(),
            seq: 0,
            in_flight: 0,
            start_ns: now_ns,
            schedule: Vec::new(),
        }
    }

    pub fn port_names(&self) -> &[String] {
        &self.names
    }

    /// Sets the MTU of the interface behind `port`; larger packets to it count as MTU drops.
    pub fn set_port_mtu(&mut self, port: usize, mtu: u32) {
        if let Some(m) = self.port_mtu.get_mut(port) {
            *m = mtu;
        }
    }

    /// Adds a scheduled change, timed from the fabric's creation.
    pub fn add_schedule(&mut self, change: ScheduledChange) -> Result<(), FabricError> {
        self.select(&change.links)?;
        let due = self.start_ns + change.at.as_nanos() as u64;
        self.schedule.push((due, change));
        Ok(())
    }

    /// Applies `spec` on top of the current settings of the selected link directions;
    /// returns how many directions changed.
    ///
    /// Selectors, comma-separated: `a-b` (both directions), `a>b` (one), `a-*` (all links of
    /// `a`, both directions), `*` (every link).
    pub fn set(&mut self, links: &str, spec: &str) -> Result<usize, FabricError> {
        let sel = self.select(links)?;
        // Validate once on defaults so a bad spec changes nothing.
        profile::apply(Params::default(), spec)?;
        for &d in &sel {
            self.dirs[d].params = profile::apply(self.dirs[d].params, spec)?;
        }
        Ok(sel.len())
    }

    /// Replaces the settings of the selected directions.
    pub fn replace(&mut self, links: &str, params: Params) -> Result<usize, FabricError> {
        let sel = self.select(links)?;
        for &d in &sel {
            self.dirs[d].params = params;
        }
        Ok(sel.len())
    }

    /// Takes one frame arriving on `port`.
    pub fn handle_frame(&mut self, now_ns: u64, port: usize, frame: &[u8]) {
        let n = self.names.len();
        if port >= n || frame.len() < 14 {
            return;
        }
        let mut dst = [0u8; 6];
        let mut src = [0u8; 6];
        dst.copy_from_slice(&frame[..6]);
        src.copy_from_slice(&frame[6..12]);
        if src[0] & 1 == 0 {
            self.macs.insert(src, port);
        }
        let unicast_to = if dst[0] & 1 == 0 {
            self.macs.get(&dst).copied()
        } else {
            None
        };
        match unicast_to {
            Some(to) if to == port => {}
            Some(to) => self.forward(now_ns, port * n + to, frame),
            None => {
                for to in (0..n).filter(|&t| t != port) {
                    self.forward(now_ns, port * n + to, frame);
                }
            }
        }
    }

    /// Applies scheduled changes that are due.
    pub fn handle_timeout(&mut self, now_ns: u64) {
        let mut i = 0;
        while i < self.schedule.len() {
            if self.schedule[i].0 > now_ns {
                i += 1;
                continue;
            }
            let (due, change) = self.schedule[i].clone();
            // Selectors and specs were validated when the change was added.
            let _ = self.set(&change.links, &change.spec);
            match change.every {
                Some(e) => self.schedule[i].0 = due + e.as_nanos() as u64,
                None => {
                    self.schedule.swap_remove(i);
                }
            }
        }
    }

    /// The next frame due at `now_ns`, with the port to send it out of.
    pub fn poll_transmit(&mut self, now_ns: u64) -> Option<(usize, Vec<u8>)> {
        if self.heap.peek().is_none_or(|Reverse(p)| p.at > now_ns) {
            return None;
        }
        let Reverse(p) = self.heap.pop()?;
        self.in_flight -= p.frame.len();
        self.queued[p.dir] -= 1;
        Some((p.dir % self.names.len(), p.frame))
    }

    /// When something is next due, and why.
    pub fn poll_timeout(&self) -> Option<(u64, &'static str)> {
        let frame = self.heap.peek().map(|Reverse(p)| (p.at, "frame due"));
        let sched = self
            .schedule
            .iter()
            .map(|(t, _)| (*t, "scheduled change"))
            .min();
        match (frame, sched) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
            (a, b) => a.or(b),
        }
    }

    /// Per-direction statistics, in port order.
    pub fn stats(&self) -> Vec<LinkStats> {
        let n = self.names.len();
        (0..n * n)
            .filter(|d| d / n != d % n)
            .map(|d| LinkStats {
                link: format!("{}>{}", self.names[d / n], self.names[d % n]),
                counters: self.dirs[d].counters,
                queued: self.queued[d],
                settings: profile::describe(&self.dirs[d].params),
            })
            .collect()
    }

    fn forward(&mut self, now_ns: u64, dir: usize, frame: &[u8]) {
        let len = frame.len() - 14;
        let to_mtu = self.port_mtu[dir % self.names.len()];
        if to_mtu > 0 && len > to_mtu as usize {
            self.dirs[dir].counters.dropped_mtu += 1;
            return;
        }
        match self.dirs[dir].handle(now_ns, len) {
            Verdict::Drop(_) => {}
            Verdict::Deliver { at, again } => {
                for at in std::iter::once(at).chain(again) {
                    if self.in_flight + frame.len() > MAX_IN_FLIGHT {
                        self.dirs[dir].counters.dropped_queue += 1;
                        continue;
                    }
                    self.in_flight += frame.len();
                    self.queued[dir] += 1;
                    self.seq += 1;
                    self.heap.push(Reverse(Pending {
                        at,
                        seq: self.seq,
                        dir,
                        frame: frame.to_vec(),
                    }));
                }
            }
        }
    }

    fn port(&self, name: &str) -> Result<usize, FabricError> {
        self.names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| FabricError::UnknownNode {
                name: name.to_owned(),
                nodes: self.names.join(", "),
            })
    }

    /// Direction indices named by a selector list.
    fn select(&self, links: &str) -> Result<Vec<usize>, FabricError> {
        let n = self.names.len();
        let mut out = Vec::new();
        for sel in links.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if sel == "*" {
                out.extend((0..n * n).filter(|d| d / n != d % n));
                continue;
            }
            let (a, b, both) = if let Some((a, b)) = sel.split_once('>') {
                (a, b, false)
            } else if let Some((a, b)) = sel.split_once('-') {
                (a, b, true)
            } else {
                return Err(FabricError::Selector(sel.to_owned()));
            };
            let a = self.port(a)?;
            let bs: Vec<usize> = if b == "*" {
                (0..n).filter(|&x| x != a).collect()
            } else {
                vec![self.port(b)?]
            };
            for b in bs {
                if a == b {
                    return Err(FabricError::SelfLink(sel.to_owned()));
                }
                out.push(a * n + b);
                if both {
                    out.push(b * n + a);
                }
            }
        }
        if out.is_empty() {
            return Err(FabricError::NoLink(links.to_owned()));
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const MS: u64 = 1_000_000;
    const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const BCAST: [u8; 6] = [0xff; 6];

    proptest::proptest! {
        #[test]
        fn arbitrary_frames_never_panic_and_conserve_counts(
            frames in proptest::collection::vec((0usize..4, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80)), 0..50)
        ) {
            let mut f = fabric(3);
            f.set("*", "loss=20% dup=20% delay=1ms jitter=1ms reorder rate=1mbit queue=1kb").unwrap();
            for (i, (port, bytes)) in frames.iter().enumerate() {
                f.handle_frame(i as u64 * 1000, *port, bytes);
            }
            let out = drain(&mut f, u64::MAX).len() as u64;
            let sent: u64 = f.stats().iter().map(|l| l.counters.forwarded + l.counters.duplicated).sum();
            proptest::prop_assert_eq!(out, sent);
            proptest::prop_assert!(f.stats().iter().all(|l| l.queued == 0));
        }
    }

    fn frame(dst: [u8; 6], src: [u8; 6], len: usize) -> Vec<u8> {
        let mut f = Vec::with_capacity(14 + len);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x08, 0x00]);
        f.resize(14 + len, 0xab);
        f
    }

    fn fabric(n: usize) -> Fabric {
        Fabric::new(
            (1..=n).map(|i| format!("n{i}")).collect(),
            Params::default(),
            7,
            0,
        )
    }

    fn drain(f: &mut Fabric, now: u64) -> Vec<(usize, Vec<u8>)> {
        std::iter::from_fn(|| f.poll_transmit(now)).collect()
    }

    #[test]
    fn floods_broadcast_then_learns_unicast() {
        let mut f = fabric(3);
        f.handle_frame(0, 0, &frame(BCAST, MAC_A, 50));
        let out: Vec<usize> = drain(&mut f, 0).into_iter().map(|(p, _)| p).collect();
        assert_eq!(out, vec![1, 2]);
        f.handle_frame(0, 1, &frame(MAC_A, MAC_B, 50));
        assert_eq!(
            drain(&mut f, 0)
                .into_iter()
                .map(|(p, _)| p)
                .collect::<Vec<_>>(),
            vec![0]
        );
        f.handle_frame(0, 0, &frame(MAC_B, MAC_A, 50));
        assert_eq!(
            drain(&mut f, 0)
                .into_iter()
                .map(|(p, _)| p)
                .collect::<Vec<_>>(),
            vec![1]
        );
        // Frames over the receiving port's MTU are dropped.
        f.set_port_mtu(1, 1000);
        f.handle_frame(0, 0, &frame(MAC_B, MAC_A, 1001));
        assert!(drain(&mut f, 0).is_empty());
        assert_eq!(f.stats()[0].counters.dropped_mtu, 1);
        // Runt frames are ignored.
        f.handle_frame(0, 0, &[1, 2, 3]);
        assert!(f.poll_timeout().is_none());
    }

    #[test]
    fn per_direction_delay_and_timeout_reason() {
        let mut f = fabric(2);
        assert_eq!(f.set("n1>n2", "delay=50ms").unwrap(), 1);
        f.handle_frame(0, 0, &frame(BCAST, MAC_A, 100));
        assert_eq!(f.poll_timeout(), Some((50 * MS, "frame due")));
        assert!(f.poll_transmit(50 * MS - 1).is_none());
        assert_eq!(f.stats()[0].queued, 1);
        assert_eq!(f.poll_transmit(50 * MS).unwrap().0, 1);
        // The reverse direction is untouched.
        f.handle_frame(MS, 1, &frame(BCAST, MAC_B, 100));
        assert_eq!(f.poll_timeout(), Some((MS, "frame due")));
    }

    #[test]
    fn partition_and_heal_with_selectors() {
        let mut f = fabric(3);
        assert_eq!(f.set("n1-*", "down").unwrap(), 4);
        f.handle_frame(0, 0, &frame(BCAST, MAC_A, 10));
        assert!(drain(&mut f, 0).is_empty());
        f.handle_frame(0, 1, &frame(BCAST, MAC_B, 10));
        assert_eq!(drain(&mut f, 0).len(), 1, "n2 still reaches n3");
        f.set("*", "up").unwrap();
        f.handle_frame(0, 0, &frame(BCAST, MAC_A, 10));
        assert_eq!(drain(&mut f, 0).len(), 2);
        let s = f.stats();
        assert_eq!(
            s.iter()
                .find(|l| l.link == "n1>n2")
                .unwrap()
                .counters
                .dropped_down,
            1
        );
        assert!(f.set("n1-n9", "down").is_err());
        assert!(f.set("n1-n1", "down").is_err());
        assert!(f.set("n1-n2", "loss=300%").is_err());
    }

    #[test]
    fn schedules_flap_links() {
        let mut f = fabric(2);
        f.add_schedule(ScheduledChange::parse("1s/2s n1-n2 down").unwrap())
            .unwrap();
        f.add_schedule(ScheduledChange::parse("2s/2s n1-n2 up").unwrap())
            .unwrap();
        assert_eq!(f.poll_timeout(), Some((1000 * MS, "scheduled change")));
        let mut up_at = Vec::new();
        for t in (0..6000).step_by(500) {
            f.handle_timeout(t * MS);
            f.handle_frame(t * MS, 0, &frame(BCAST, MAC_A, 10));
            up_at.push(!drain(&mut f, t * MS).is_empty());
        }
        // Up for [0,1), down [1,2), up [2,3), down [3,4) ...
        assert_eq!(
            up_at,
            vec![
                true, true, false, false, true, true, false, false, true, true, false, false
            ]
        );
        assert!(ScheduledChange::parse("soon n1-n2 down").is_err());
        assert!(ScheduledChange::parse("1s n1-n2").is_err());
        assert!(ScheduledChange::parse("1s/0s n1-n2 down").is_err());
    }

    #[test]
    fn duplicates_and_loss_are_counted_per_direction() {
        let mut f = fabric(2);
        f.set("n1>n2", "loss=10% dup=5%").unwrap();
        for i in 0..20_000 {
            f.handle_frame(i, 0, &frame(BCAST, MAC_A, 64));
        }
        let out = drain(&mut f, u64::MAX).len() as f64;
        let c = f.stats()[0].counters;
        let loss = c.dropped_loss as f64 / 20_000.0;
        assert!((loss - 0.10).abs() < 0.01, "{loss}");
        assert_eq!(out as u64, c.forwarded + c.duplicated);
        assert_eq!(f.stats()[0].queued, 0);
    }
}
