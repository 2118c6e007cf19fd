//! The measuring clients: TCP throughput, UDP at a rate, RTT, latency under load, path MTU.
//! Shared here: address resolution, sampling and progress, and the UDP session handshake.

mod pmtu;
mod rtt;
mod tcp;
mod udp;

use std::io::ErrorKind;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};

use crate::proto::{DEFAULT_PORT, Message, Mode, Report};

pub use pmtu::{PmtuOpts, PmtuResult, pmtu};
pub use rtt::{RrulOpts, RrulResult, RttOpts, RttResult, rrul, rtt};
pub use tcp::{TcpOpts, TcpResult, tcp};
pub use udp::{UdpOpts, UdpResult, udp};

/// Resolves `host`, `host:port`, `ip` or `[v6]:port`.
pub fn resolve(server: &str, port: Option<u16>) -> Result<SocketAddr> {
    if let Ok(a) = server.parse::<SocketAddr>() {
        return Ok(a);
    }
    let port = port.unwrap_or(DEFAULT_PORT);
    let host = server.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    (host, port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {server:?}"))?
        .next()
        .with_context(|| format!("{server:?} has no address"))
}

/// Throughput samples: (seconds since start, Mbit/s over the sample).
pub type Series = Vec<(f64, f64)>;

/// Samples `counter` every 250 ms for `dur` into Mbit/s, driving a progress bar.
pub(crate) fn sample(counter: &AtomicU64, start: Instant, dur: Duration, label: &str) -> Series {
    let pb = progress(dur, label);
    let step = Duration::from_millis(250);
    let mut out = Vec::new();
    let mut last = (0.0f64, 0u64);
    loop {
        let t = start.elapsed();
        if t >= dur {
            break;
        }
        std::thread::sleep(step.min(dur - t));
        let t = start.elapsed().as_secs_f64();
        let b = counter.load(Ordering::Relaxed);
        let rate = (b - last.1) as f64 * 8.0 / (t - last.0) / 1e6;
        out.push((t, rate));
        last = (t, b);
        if let Some(pb) = &pb {
            pb.set_position((t * 1000.0) as u64);
            pb.set_message(format!("{rate:.1} Mbit/s"));
        }
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    out
}

/// A progress bar on stderr, only for runs over a second and only on a terminal.
pub(crate) fn progress(dur: Duration, label: &str) -> Option<ProgressBar> {
    use std::io::IsTerminal;
    if dur <= Duration::from_secs(1) || !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = ProgressBar::new(dur.as_millis() as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{prefix} [{bar:30}] {elapsed}/{duration} {msg}")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_prefix(label.to_owned());
    Some(pb)
}

pub(crate) fn mbps(bytes: u64, ns: u64) -> f64 {
    if ns == 0 {
        0.0
    } else {
        bytes as f64 * 8.0 / (ns as f64 / 1e9) / 1e6
    }
}

pub(crate) fn session_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    crate::emulate::impair::Rng::new(t ^ u64::from(std::process::id()) << 32).next_u64()
}

// ---------------------------------------------------------------- UDP sessions

/// A connected UDP socket with an open session on the server.
pub(crate) struct UdpSession {
    sock: UdpSocket,
    session: u64,
    server: SocketAddr,
    /// Round trip of the handshake, a first estimate of the path's RTT.
    handshake_rtt: Duration,
}

impl UdpSession {
    fn open(server: SocketAddr, mode: Mode) -> Result<Self> {
        let local: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        }
        .parse()?;
        let sock = UdpSocket::bind(local).context("binding a UDP socket")?;
        sock.connect(server)
            .with_context(|| format!("cannot reach {server}"))?;
        let session = session_id();
        let mut s = Self {
            sock,
            session,
            server,
            handshake_rtt: Duration::ZERO,
        };
        let t0 = Instant::now();
        s.request(
            Message::Hello { session, mode },
            |m| matches!(m, Message::HelloAck { session: x } if *x == session),
        )?;
        s.handshake_rtt = t0.elapsed();
        Ok(s)
    }

    /// Sends `msg` until a reply matching `want` arrives: 5 tries over 3.75 s, waiting longer
    /// each time so that slow links (satellite: 600 ms and more) still answer.
    fn request(&self, msg: Message, want: impl Fn(&Message) -> bool) -> Result<Message> {
        let mut buf = Vec::new();
        msg.encode(&mut buf, 0);
        let mut rx = vec![0u8; 65_536];
        for wait_ms in [250u64, 500, 750, 1000, 1250] {
            let wait = Duration::from_millis(wait_ms);
            self.sock.set_read_timeout(Some(wait))?;
            if let Err(e) = self.sock.send(&buf) {
                return Err(self.explain(e));
            }
            let deadline = Instant::now() + wait;
            while Instant::now() < deadline {
                match self.sock.recv(&mut rx) {
                    Ok(n) => {
                        if let Ok(m) = Message::decode(&rx[..n])
                            && want(&m)
                        {
                            return Ok(m);
                        }
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        break;
                    }
                    Err(e) => return Err(self.explain(e)),
                }
            }
        }
        bail!(
            "no reply from {} after 3.75 s: server unreachable, or not running `netbench server`",
            self.server
        )
    }

    fn explain(&self, e: std::io::Error) -> anyhow::Error {
        if e.kind() == ErrorKind::ConnectionRefused {
            anyhow::Error::new(e).context(format!(
                "{} refused (ICMP port unreachable): is `netbench server` running there?",
                self.server
            ))
        } else {
            anyhow::Error::new(e).context(format!("cannot reach {}", self.server))
        }
    }

    fn report(&self) -> Result<Report> {
        let session = self.session;
        match self.request(
            Message::ReportReq { session },
            |m| matches!(m, Message::Report(r) if r.session == session),
        )? {
            Message::Report(r) => Ok(r),
            other @ (Message::Hello { .. }
            | Message::HelloAck { .. }
            | Message::Probe { .. }
            | Message::Echo { .. }
            | Message::Data { .. }
            | Message::ReportReq { .. }
            | Message::TcpHello { .. }
            | Message::TcpResult { .. }) => bail!("unexpected reply {other:?}"),
        }
    }
}

pub(crate) fn pct(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 * 100.0 / b as f64
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn server_addresses_resolve_with_default_port() {
        assert_eq!(
            resolve("10.0.0.2", None).unwrap(),
            "10.0.0.2:9300".parse().unwrap()
        );
        assert_eq!(
            resolve("10.0.0.2", Some(1)).unwrap(),
            "10.0.0.2:1".parse().unwrap()
        );
        assert_eq!(
            resolve("10.0.0.2:7", Some(1)).unwrap(),
            "10.0.0.2:7".parse().unwrap()
        );
        assert_eq!(
            resolve("[::1]", None).unwrap(),
            "[::1]:9300".parse().unwrap()
        );
        assert_eq!(
            resolve("fd00::1", Some(5)).unwrap(),
            "[fd00::1]:5".parse().unwrap()
        );
        assert_eq!(pct(1, 4), 25.0);
        assert_eq!(mbps(1_000_000, 1_000_000_000), 8.0);
        assert_eq!(mbps(5, 0), 0.0);
    }
}
