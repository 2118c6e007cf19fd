//! UDP at a target rate; the server reports loss, duplicates, reordering and jitter.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use super::{Series, UdpSession, mbps, pct, sample};
use crate::proto::{Message, Mode};

#[derive(Debug, Clone)]
pub struct UdpOpts {
    pub server: SocketAddr,
    pub rate_bps: u64,
    /// UDP payload bytes per packet.
    pub len: usize,
    pub duration: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct UdpResult {
    pub server: String,
    pub target_mbps: f64,
    pub packet_bytes: usize,
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub loss_pct: f64,
    pub duplicates: u64,
    pub reordered: u64,
    /// RFC 3550 interarrival jitter at the server, µs.
    pub jitter_us: f64,
    /// Goodput at the receiver, Mbit/s.
    pub received_mbps: f64,
    pub series: Series,
}

pub fn udp(o: &UdpOpts) -> Result<UdpResult> {
    let s = UdpSession::open(o.server, Mode::Stream)?;
    let len = o.len.max(
        Message::Data {
            session: 0,
            seq: 0,
            send_ns: 0,
        }
        .encoded_len(),
    );
    let pps = (o.rate_bps as f64 / 8.0 / len as f64).max(1.0);
    let counter = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let sender = {
        let sock = s.sock.try_clone()?;
        let (session, dur, counter) = (s.session, o.duration, Arc::clone(&counter));
        std::thread::spawn(move || -> Result<u64> {
            let mut buf = Vec::with_capacity(len);
            let mut seq = 0u64;
            loop {
                let t = start.elapsed();
                if t >= dur {
                    break;
                }
                // Send whatever is due (catching up after oversleeping), then nap briefly.
                let due = (t.as_secs_f64() * pps) as u64 + 1;
                while seq < due {
                    Message::Data {
                        session,
                        seq,
                        send_ns: start.elapsed().as_nanos() as u64,
                    }
                    .encode(&mut buf, len);
                    match sock.send(&buf) {
                        Ok(_) => {}
                        // A full socket buffer or a transient ICMP error: the packet counts as lost.
                        Err(e)
                            if matches!(
                                e.kind(),
                                ErrorKind::WouldBlock | ErrorKind::ConnectionRefused
                            ) => {}
                        Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                        Err(e) => return Err(e).context("sending"),
                    }
                    seq += 1;
                    counter.fetch_add(len as u64, Ordering::Relaxed);
                }
                let next = Duration::from_secs_f64(due as f64 / pps);
                std::thread::sleep(
                    next.saturating_sub(start.elapsed())
                        .min(Duration::from_millis(2)),
                );
            }
            Ok(seq)
        })
    };
    let series = sample(&counter, start, o.duration, "udp");
    let sent = sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    // Let packets still in flight (queues, emulated delay) land before asking.
    std::thread::sleep(Duration::from_millis(500));
    let r = s.report()?;
    let lost = sent.saturating_sub(r.unique);
    Ok(UdpResult {
        server: o.server.to_string(),
        target_mbps: o.rate_bps as f64 / 1e6,
        packet_bytes: len,
        sent,
        received: r.unique,
        lost,
        loss_pct: pct(lost, sent),
        duplicates: r.duplicates,
        reordered: r.reordered,
        jitter_us: r.jitter_ns as f64 / 1e3,
        received_mbps: mbps(r.bytes, r.span_ns),
        series,
    })
}
