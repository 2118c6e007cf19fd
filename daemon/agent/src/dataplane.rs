//! The I/O shell around the overlay core: TUN and UDP worker threads and the timer thread.
//!
//! The core sits behind one mutex held only while it runs (encrypt, decrypt, bookkeeping):
//! never across a syscall. Each worker owns its buffers, so the hot paths allocate nothing.
//! Datagrams the core queues (handshake replies, keepalives, flushed queues) are drained in
//! the same critical section into a per-thread list and sent after the lock is released.

use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mistnet_overlay::{Decap, Encap, Event, MIN_BUFFER, Node, Transmit};
use tracing::{debug, info, trace, warn};

/// Socket buffer size asked for (as root, past rmem_max): tunnel loss under load was the
/// receiving socket's buffer overflowing (DESIGN.md §10).
const SOCKET_BUFFER: i32 = 8 << 20;

/// State shared by the threads.
pub struct Shared {
    pub node: Mutex<Node<String>>,
    pub sock: UdpSocket,
    pub tun: tun_rs::SyncDevice,
    pub stopping: AtomicBool,
}

impl Shared {
    /// Locks the core; a poisoned lock (a panicked worker) is taken over, as the core's state
    /// stays consistent between calls.
    pub fn node(&self) -> MutexGuard<'_, Node<String>> {
        self.node
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn send(&self, dst: SocketAddr, datagram: &[u8]) {
        if let Err(e) = self.sock.send_to(datagram, v6_mapped(dst)) {
            trace!(%dst, error = %e, "send failed");
        }
    }

    fn send_queued(&self, queued: &mut Vec<Transmit<String>>) {
        for t in queued.drain(..) {
            self.send(t.dst, &t.payload);
        }
    }
}

/// Opens the dual-stack UDP socket with large buffers.
pub fn bind_udp(port: u16) -> Result<UdpSocket> {
    let sock = UdpSocket::bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port))
        .with_context(|| format!("binding UDP port {port}"))?;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: setsockopt with a valid int option on our socket.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&SOCKET_BUFFER as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            debug!(error = %std::io::Error::last_os_error(), "cannot force socket buffer size");
        }
    }
    Ok(sock)
}

/// IPv4 destinations go through the dual-stack socket as v4-mapped addresses.
fn v6_mapped(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V4(v4) => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        SocketAddr::V6(_) => a,
    }
}

/// Received v4-mapped sources are reported as IPv4.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Starts the workers and the timer thread.
pub fn spawn(shared: &Arc<Shared>, workers: usize) -> Result<Vec<std::thread::JoinHandle<()>>> {
    let mut handles = Vec::new();
    for i in 0..workers {
        let sh = shared.clone();
        handles.push(
            std::thread::Builder::new()
                .name(format!("tun-{i}"))
                .spawn(move || tun_loop(&sh))?,
        );
        let sh = shared.clone();
        handles.push(
            std::thread::Builder::new()
                .name(format!("udp-{i}"))
                .spawn(move || udp_loop(&sh))?,
        );
    }
    let sh = shared.clone();
    handles.push(
        std::thread::Builder::new()
            .name("timers".into())
            .spawn(move || timer_loop(&sh))?,
    );
    Ok(handles)
}

fn tun_loop(sh: &Shared) {
    let mut pkt = vec![0u8; 65536];
    let mut out = vec![0u8; MIN_BUFFER];
    let mut queued = Vec::new();
    while !sh.stopping.load(Ordering::Relaxed) {
        let n = match sh.tun.recv(&mut pkt) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if !sh.stopping.load(Ordering::Relaxed) {
                    warn!(error = %e, "TUN read failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
        };
        let send = {
            let mut node = sh.node();
            let r = match node.handle_tun_packet(&pkt[..n], &mut out, Instant::now()) {
                Encap::Send { dst, datagram, .. } => Some((dst, datagram.len())),
                Encap::Queued { .. }
                | Encap::NoEndpoint { .. }
                | Encap::NoRoute
                | Encap::Malformed => None,
            };
            queued.extend(std::iter::from_fn(|| node.poll_transmit()));
            r
        };
        // boringtun writes the datagram at the start of the buffer.
        if let Some((dst, len)) = send {
            sh.send(dst, &out[..len]);
        }
        sh.send_queued(&mut queued);
    }
}

fn udp_loop(sh: &Shared) {
    let mut dgram = vec![0u8; 65536];
    let mut out = vec![0u8; MIN_BUFFER];
    let mut queued = Vec::new();
    while !sh.stopping.load(Ordering::Relaxed) {
        let (n, src) = match sh.sock.recv_from(&mut dgram) {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if !sh.stopping.load(Ordering::Relaxed) {
                    warn!(error = %e, "UDP read failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
        };
        let src = canonical(src);
        let write = {
            let mut node = sh.node();
            let r = match node.handle_datagram(src, &dgram[..n], &mut out, Instant::now()) {
                Decap::Tunnel { packet, .. } => Some(packet.len()),
                Decap::Consumed { .. } | Decap::Foreign | Decap::Dropped(_) => None,
            };
            queued.extend(std::iter::from_fn(|| node.poll_transmit()));
            r
        };
        if let Some(len) = write
            && let Err(e) = sh.tun.send(&out[..len])
        {
            trace!(error = %e, "TUN write failed");
        }
        sh.send_queued(&mut queued);
    }
}

fn timer_loop(sh: &Shared) {
    let mut queued = Vec::new();
    let mut events = Vec::new();
    while !sh.stopping.load(Ordering::Relaxed) {
        let wake = {
            let mut node = sh.node();
            let now = Instant::now();
            node.handle_timeout(now);
            queued.extend(std::iter::from_fn(|| node.poll_transmit()));
            events.extend(std::iter::from_fn(|| node.poll_event()));
            node.poll_timeout().map(|(t, _)| t)
        };
        sh.send_queued(&mut queued);
        for e in events.drain(..) {
            match e {
                Event::PeerUp(p) => info!(peer = %p, "peer up"),
                Event::PeerDown(p) => info!(peer = %p, "peer down"),
                Event::EndpointChanged { peer, endpoint } => {
                    debug!(%peer, %endpoint, "endpoint changed")
                }
            }
        }
        let sleep = wake
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(mistnet_overlay::TIMER_TICK)
            .max(Duration::from_millis(5));
        std::thread::sleep(sleep);
    }
}
