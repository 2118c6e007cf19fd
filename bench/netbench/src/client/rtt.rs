//! Round trips with sequence numbers and timestamps, and latency under load (RRUL).

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::tcp::{TcpOpts, TcpResult, tcp};
use super::{UdpSession, pct, progress};
use crate::proto::{Message, Mode};
use crate::stats::{Latency, LatencySummary, SeqTracker};

#[derive(Debug, Clone)]
pub struct RttOpts {
    pub server: SocketAddr,
    pub interval: Duration,
    /// UDP payload bytes per probe (both ways).
    pub len: usize,
    pub duration: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct RttResult {
    pub server: String,
    pub interval_ms: f64,
    pub packet_bytes: usize,
    pub sent: u64,
    pub received: u64,
    pub loss_pct: f64,
    /// Probes that never reached the server (when the server could count them).
    pub lost_up: u64,
    /// Echoes that never came back.
    pub lost_down: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub rtt: LatencySummary,
    /// (upper bound µs, count) buckets of the distribution, from min to p99.9.
    #[serde(rename = "histogram")]
    pub buckets: Vec<(f64, u64)>,
    /// (seconds since start, RTT ms) of every reply, for plots.
    #[serde(skip)]
    pub samples: Vec<(f64, f64)>,
}

pub fn rtt(o: &RttOpts) -> Result<RttResult> {
    rtt_with(o, &AtomicBool::new(false), true)
}

/// Runs RTT probes; `stop` ends early (used by rrul), `show_progress` drives a bar.
fn rtt_with(o: &RttOpts, stop: &AtomicBool, show_progress: bool) -> Result<RttResult> {
    let s = UdpSession::open(o.server, Mode::Rtt)?;
    let len = o.len.max(
        Message::Probe {
            session: 0,
            seq: 0,
            send_ns: 0,
            reply_len: 0,
        }
        .encoded_len(),
    );
    let start = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let max_rtt = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let receiver = {
        let sock = s.sock.try_clone()?;
        let (session, done, server) = (s.session, Arc::clone(&done), s.server);
        let max_rtt = Arc::clone(&max_rtt);
        std::thread::spawn(move || -> Result<Echoes> {
            sock.set_read_timeout(Some(Duration::from_millis(50)))?;
            let mut lat = Latency::new();
            let mut seqs = SeqTracker::default();
            let mut samples = Vec::new();
            let mut buf = vec![0u8; 65_536];
            while !done.load(Ordering::Relaxed) {
                let n = match sock.recv(&mut buf) {
                    Ok(n) => n,
                    Err(e)
                        if matches!(
                            e.kind(),
                            ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                        ) =>
                    {
                        continue;
                    }
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                        bail!(
                            "{server} stopped answering (ICMP port unreachable): did `netbench server` exit?"
                        )
                    }
                    Err(e) => return Err(e).context("receiving echoes"),
                };
                let now = start.elapsed().as_nanos() as u64;
                if let Ok(Message::Echo {
                    session: sid,
                    seq,
                    send_ns,
                    ..
                }) = Message::decode(&buf[..n])
                    && sid == session
                    && seqs.record(seq)
                    && send_ns <= now
                {
                    lat.record(now - send_ns);
                    max_rtt.fetch_max(now - send_ns, Ordering::Relaxed);
                    samples.push((now as f64 / 1e9, (now - send_ns) as f64 / 1e6));
                }
            }
            Ok((lat, seqs, samples))
        })
    };
    let pb = if show_progress {
        progress(o.duration, "rtt")
    } else {
        None
    };
    let mut buf = Vec::with_capacity(len);
    let mut seq = 0u64;
    while start.elapsed() < o.duration && !stop.load(Ordering::Relaxed) {
        let send_ns = start.elapsed().as_nanos() as u64;
        Message::Probe {
            session: s.session,
            seq,
            send_ns,
            reply_len: len as u16,
        }
        .encode(&mut buf, len);
        if let Err(e) = s.sock.send(&buf)
            && e.kind() == ErrorKind::ConnectionRefused
        {
            done.store(true, Ordering::Relaxed);
            return Err(s.explain(e));
        }
        seq += 1;
        sent.store(seq, Ordering::Relaxed);
        if let Some(pb) = &pb {
            pb.set_position(start.elapsed().as_millis() as u64);
        }
        let next = o.interval * (seq as u32);
        std::thread::sleep(next.saturating_sub(start.elapsed()));
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    // Grace period for the last echoes: three times the worst round trip seen (bounded), or
    // a second when nothing came back yet.
    let worst = max_rtt.load(Ordering::Relaxed);
    let grace = if worst == 0 {
        Duration::from_secs(1)
    } else {
        Duration::from_nanos(worst * 3)
    };
    std::thread::sleep(grace.clamp(Duration::from_millis(200), Duration::from_secs(3)));
    done.store(true, Ordering::Relaxed);
    let (lat, seqs, samples) = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    let report = s.report()?;
    let received = seqs.unique;
    let lost_up = seq.saturating_sub(report.unique);
    Ok(RttResult {
        server: o.server.to_string(),
        interval_ms: o.interval.as_secs_f64() * 1e3,
        packet_bytes: len,
        sent: seq,
        received,
        loss_pct: pct(seq.saturating_sub(received), seq),
        lost_up,
        lost_down: report.unique.saturating_sub(received),
        duplicates: seqs.duplicates,
        reordered: seqs.reordered,
        rtt: lat.summary(),
        buckets: lat.buckets(40),
        samples,
    })
}

/// What the echo receiver collected: latencies, sequence accounting, (time, RTT) samples.
type Echoes = (Latency, SeqTracker, Vec<(f64, f64)>);

// ---------------------------------------------------------------- RRUL

#[derive(Debug, Clone)]
pub struct RrulOpts {
    pub server: SocketAddr,
    pub streams: u16,
    pub duration: Duration,
    pub interval: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct RrulResult {
    pub server: String,
    pub idle: RttResult,
    pub loaded: RttResult,
    pub upload: TcpResult,
    pub download: TcpResult,
    /// Median RTT under load minus idle median, ms.
    pub added_latency_ms: f64,
}

/// Latency under load: 1 s of idle RTT, then RTT while `streams` TCP streams saturate each
/// direction.
pub fn rrul(o: &RrulOpts) -> Result<RrulResult> {
    let ropts = RttOpts {
        server: o.server,
        interval: o.interval,
        len: 64,
        duration: Duration::from_secs(1),
    };
    let idle = rtt_with(&ropts, &AtomicBool::new(false), false)?;
    let up_opts = TcpOpts {
        server: o.server,
        streams: o.streams,
        duration: o.duration,
        reverse: false,
        len: 128 * 1024,
    };
    let down_opts = TcpOpts {
        reverse: true,
        ..up_opts.clone()
    };
    let up = std::thread::spawn(move || tcp(&up_opts));
    let down = std::thread::spawn(move || tcp(&down_opts));
    // Start probing once the streams have ramped up a little.
    std::thread::sleep(Duration::from_millis(200));
    let loaded_opts = RttOpts {
        duration: o.duration.saturating_sub(Duration::from_millis(400)),
        ..ropts
    };
    let loaded = rtt_with(&loaded_opts, &AtomicBool::new(false), false);
    let upload = up
        .join()
        .map_err(|_| anyhow::anyhow!("upload panicked"))??;
    let download = down
        .join()
        .map_err(|_| anyhow::anyhow!("download panicked"))??;
    let loaded = loaded?;
    Ok(RrulResult {
        server: o.server.to_string(),
        added_latency_ms: (loaded.rtt.median_us - idle.rtt.median_us) / 1e3,
        idle,
        loaded,
        upload,
        download,
    })
}
