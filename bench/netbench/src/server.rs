//! `netbench server`: answers TCP streams and UDP sessions from many clients at once.
//!
//! Memory is bounded: at most `max_sessions` UDP sessions (each a fixed-size record; the
//! oldest idle one is evicted) and `max_tcp` concurrent TCP streams (more are refused by
//! closing). Packets that do not decode, or name an unknown session, are counted and dropped.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::proto::{Message, Mode, Report, TCP_HELLO_LEN};
use crate::stats::{Jitter, SeqTracker};

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub bind: SocketAddr,
    /// UDP sessions kept at once.
    pub max_sessions: usize,
    /// TCP streams served at once.
    pub max_tcp: usize,
}

struct Session {
    mode: Mode,
    seq: SeqTracker,
    jitter: Jitter,
    bytes: u64,
    first: Option<Instant>,
    last: Instant,
}

/// Serves until `stop` becomes true.
pub fn serve(cfg: &ServerConfig, stop: &Arc<AtomicBool>) -> Result<()> {
    let udp = UdpSocket::bind(cfg.bind).with_context(|| format!("binding UDP {}", cfg.bind))?;
    let tcp = TcpListener::bind(cfg.bind).with_context(|| format!("binding TCP {}", cfg.bind))?;
    tcp.set_nonblocking(true)?;
    tracing::info!(addr = %cfg.bind, "netbench server listening (TCP and UDP)");
    let tcp_stop = Arc::clone(stop);
    let max_tcp = cfg.max_tcp;
    let tcp_thread = std::thread::Builder::new()
        .name("tcp-accept".into())
        .spawn(move || accept_loop(&tcp, max_tcp, &tcp_stop))?;
    udp_loop(&udp, cfg.max_sessions, stop)?;
    let _ = tcp_thread.join();
    tracing::info!("netbench server stopped");
    Ok(())
}

fn udp_loop(sock: &UdpSocket, max_sessions: usize, stop: &AtomicBool) -> Result<()> {
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let base = Instant::now();
    let mut sessions: BTreeMap<(SocketAddr, u64), Session> = BTreeMap::new();
    let mut buf = vec![0u8; 65_536];
    let mut out = Vec::with_capacity(65_536);
    let mut rejected: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let (n, peer) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            // ICMP errors from earlier sends to clients that went away.
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => continue,
            Err(e) => return Err(e).context("UDP receive"),
        };
        let now = Instant::now();
        let msg = match Message::decode(&buf[..n]) {
            Ok(m) => m,
            Err(e) => {
                rejected += 1;
                tracing::debug!(%peer, err = %e, rejected, "rejected packet");
                continue;
            }
        };
        let reply = match msg {
            Message::Hello { session, mode } => {
                let key = (peer, session);
                if !sessions.contains_key(&key) && sessions.len() >= max_sessions {
                    // Evict the longest-idle session.
                    let oldest = sessions.iter().min_by_key(|(_, s)| s.last).map(|(k, _)| *k);
                    if let Some(k) = oldest {
                        sessions.remove(&k);
                    }
                }
                sessions.entry(key).or_insert_with(|| Session {
                    mode,
                    seq: SeqTracker::default(),
                    jitter: Jitter::default(),
                    bytes: 0,
                    first: None,
                    last: now,
                });
                tracing::debug!(%peer, session, ?mode, "session opened");
                Some((Message::HelloAck { session }, 0))
            }
            Message::Probe {
                session,
                seq,
                send_ns,
                reply_len,
            } => match sessions.get_mut(&(peer, session)) {
                Some(s) if s.mode == Mode::Rtt => {
                    s.seq.record(seq);
                    s.last = now;
                    Some((
                        Message::Echo {
                            session,
                            seq,
                            send_ns,
                            server_seen: s.seq.unique,
                        },
                        usize::from(reply_len),
                    ))
                }
                Some(_) | None => None,
            },
            Message::Data {
                session,
                seq,
                send_ns,
            } => {
                if let Some(s) = sessions.get_mut(&(peer, session)) {
                    s.seq.record(seq);
                    s.jitter
                        .record(send_ns, now.duration_since(base).as_nanos() as u64);
                    s.bytes += n as u64;
                    s.first.get_or_insert(now);
                    s.last = now;
                }
                None
            }
            Message::ReportReq { session } => sessions.get(&(peer, session)).map(|s| {
                let r = Report {
                    session,
                    received: s.seq.received,
                    unique: s.seq.unique,
                    duplicates: s.seq.duplicates,
                    reordered: s.seq.reordered,
                    jitter_ns: s.jitter.ns(),
                    bytes: s.bytes,
                    span_ns: s
                        .first
                        .map_or(0, |f| s.last.duration_since(f).as_nanos() as u64),
                };
                (Message::Report(r), 0)
            }),
            Message::HelloAck { .. }
            | Message::Echo { .. }
            | Message::Report(_)
            | Message::TcpHello { .. }
            | Message::TcpResult { .. } => {
                rejected += 1;
                None
            }
        };
        if let Some((m, pad)) = reply {
            m.encode(&mut out, pad.min(65_000));
            if let Err(e) = sock.send_to(&out, peer) {
                tracing::trace!(%peer, err = %e, "reply failed");
            }
        }
    }
    Ok(())
}

fn accept_loop(listener: &TcpListener, max_tcp: usize, stop: &Arc<AtomicBool>) {
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, peer)) => {
                if active.load(Ordering::Relaxed) >= max_tcp {
                    tracing::debug!(%peer, "too many TCP streams, refusing");
                    continue;
                }
                active.fetch_add(1, Ordering::Relaxed);
                let active = Arc::clone(&active);
                let stop = Arc::clone(stop);
                let spawned = std::thread::Builder::new().name("tcp-stream".into()).spawn(move || {
                    if let Err(e) = tcp_stream(conn, &stop) {
                        tracing::debug!(%peer, err = %format!("{e:#}"), "TCP stream ended with an error");
                    }
                    active.fetch_sub(1, Ordering::Relaxed);
                });
                if spawned.is_err() {
                    tracing::warn!("cannot spawn a thread for a TCP stream");
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => {
                tracing::debug!(err = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn tcp_stream(mut conn: TcpStream, stop: &AtomicBool) -> Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut hello = [0u8; TCP_HELLO_LEN];
    conn.read_exact(&mut hello)
        .context("reading the stream header")?;
    let Message::TcpHello {
        reverse,
        duration_ms,
        ..
    } = Message::decode(&hello)?
    else {
        anyhow::bail!("first frame is not a TcpHello");
    };
    let mut buf = vec![0u8; 128 * 1024];
    if reverse {
        conn.set_write_timeout(Some(Duration::from_secs(10)))?;
        let end = Instant::now() + Duration::from_millis(u64::from(duration_ms.min(3_600_000)));
        while Instant::now() < end && !stop.load(Ordering::Relaxed) {
            conn.write_all(&buf)?;
        }
        conn.shutdown(Shutdown::Write)?;
        // Wait for the client to close so its last reads are not cut by a reset.
        let _ = conn.read(&mut buf[..1]);
        return Ok(());
    }
    let mut bytes = 0u64;
    let mut first = None;
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading the stream"),
        };
        first.get_or_insert_with(Instant::now);
        bytes += n as u64;
        if stop.load(Ordering::Relaxed) {
            break;
        }
    }
    let elapsed_ns = first.map_or(0, |f| f.elapsed().as_nanos() as u64);
    let mut out = Vec::new();
    Message::TcpResult { bytes, elapsed_ns }.encode(&mut out, 0);
    conn.write_all(&out)?;
    Ok(())
}
